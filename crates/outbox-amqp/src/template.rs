//! `{aggregate_type}` / `{event_type}` / `{aggregate_id}` templates for exchanges and routing keys.

use outbox::OutboxEvent;

/// One piece of a parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    AggregateType,
    EventType,
    AggregateId,
}

/// A parsed template such as `{aggregate_type}.{event_type}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

/// The placeholders a template may use.
pub const PLACEHOLDERS: &str = "{aggregate_type}, {event_type}, {aggregate_id}";

impl Template {
    /// Parses `text`; the error says what is wrong (an unknown or unclosed placeholder).
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Literal(rest[..open].to_owned()));
            }
            let after = &rest[open + 1..];
            let Some(close) = after.find('}') else {
                return Err(format!("{text:?} has a `{{` without its `}}`"));
            };
            parts.push(match &after[..close] {
                "aggregate_type" => Part::AggregateType,
                "event_type" => Part::EventType,
                "aggregate_id" => Part::AggregateId,
                other => {
                    return Err(format!(
                        "{text:?} uses the unknown placeholder {{{other}}} (known: {PLACEHOLDERS})"
                    ))
                }
            });
            rest = &after[close + 1..];
        }
        if rest.contains('}') {
            return Err(format!("{text:?} has a `}}` without its `{{`"));
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_owned()));
        }
        Ok(Self { parts })
    }

    /// Whether the template has no placeholder.
    pub fn is_literal(&self) -> bool {
        self.parts.iter().all(|p| matches!(p, Part::Literal(_)))
    }

    /// The template with every placeholder replaced by `with`.
    pub fn fill(&self, with: &str) -> String {
        self.render_with(with, with, with)
    }

    /// The text for `event`.
    pub fn render(&self, event: &OutboxEvent) -> String {
        self.render_with(
            &event.aggregate_type,
            &event.event_type,
            &event.aggregate_id,
        )
    }

    fn render_with(&self, aggregate_type: &str, event_type: &str, aggregate_id: &str) -> String {
        let mut out = String::new();
        for part in &self.parts {
            out.push_str(match part {
                Part::Literal(text) => text,
                Part::AggregateType => aggregate_type,
                Part::EventType => event_type,
                Part::AggregateId => aggregate_id,
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_fills() {
        let t = Template::parse("outbox.{aggregate_type}.{event_type}").unwrap();
        assert_eq!(t.fill("*"), "outbox.*.*");
        assert!(!t.is_literal());
        let t = Template::parse("{aggregate_type}/{aggregate_id}").unwrap();
        assert_eq!(t.fill("k"), "k/k");
        assert!(Template::parse("plain").unwrap().is_literal());
    }

    #[test]
    fn names_what_is_wrong() {
        assert!(Template::parse("a.{aggregate}")
            .unwrap_err()
            .contains("unknown placeholder {aggregate}"));
        assert!(Template::parse("a.{event_type")
            .unwrap_err()
            .contains("without"));
        assert!(Template::parse("a.event_type}")
            .unwrap_err()
            .contains("without"));
    }
}
