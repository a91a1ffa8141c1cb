//! `{aggregate_type}` / `{event_type}` templates for subjects.

use outbox::OutboxEvent;

/// One piece of a parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    AggregateType,
    EventType,
}

/// A parsed subject template such as `outbox.{aggregate_type}.{event_type}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

/// The placeholders a template may use.
pub const PLACEHOLDERS: &str = "{aggregate_type}, {event_type}";

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
        self.render_with(with, with)
    }

    /// The subject filter a stream captures these subjects with: the literal tokens before the
    /// first placeholder, then `>` (`outbox.{aggregate_type}.{event_type}` → `outbox.>`), as an
    /// aggregate or event type may itself contain dots.
    pub fn stream_subject(&self) -> String {
        const MARK: &str = "\u{1}";
        if self.is_literal() {
            return self.fill("");
        }
        let filled = self.fill(MARK);
        let mut tokens: Vec<&str> = filled
            .split('.')
            .take_while(|t| !t.contains(MARK))
            .collect();
        tokens.push(">");
        tokens.join(".")
    }

    /// The text for `event`.
    pub fn render(&self, event: &OutboxEvent) -> String {
        self.render_with(&event.aggregate_type, &event.event_type)
    }

    fn render_with(&self, aggregate_type: &str, event_type: &str) -> String {
        let mut out = String::new();
        for part in &self.parts {
            out.push_str(match part {
                Part::Literal(text) => text,
                Part::AggregateType => aggregate_type,
                Part::EventType => event_type,
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
        assert_eq!(t.stream_subject(), "outbox.>");
        assert_eq!(
            Template::parse("a.b-{event_type}.c")
                .unwrap()
                .stream_subject(),
            "a.>"
        );
        assert!(Template::parse("plain").unwrap().is_literal());
        assert_eq!(Template::parse("plain").unwrap().stream_subject(), "plain");
    }

    #[test]
    fn names_what_is_wrong() {
        assert!(Template::parse("a.{aggregate_id}")
            .unwrap_err()
            .contains("unknown placeholder {aggregate_id}"));
        assert!(Template::parse("a.{event_type")
            .unwrap_err()
            .contains("without"));
        assert!(Template::parse("a.event_type}")
            .unwrap_err()
            .contains("without"));
    }
}
