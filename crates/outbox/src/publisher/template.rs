//! Text templates for broker names that depend on the event: a Kafka topic, a NATS subject, an
//! AMQP exchange or routing key, an EventBridge source. `outbox.{aggregate_type}.{event_type}`
//! becomes `outbox.order.OrderPlaced`.
//!
//! Each kind decides which placeholders make sense for it (a NATS subject per aggregate id would
//! make a stream capture unbounded subjects, for instance) and passes them to [`Template::parse`],
//! which names an unknown or unbalanced placeholder in its error.

use crate::event::OutboxEvent;

/// What a placeholder stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placeholder {
    /// `{aggregate_type}`
    AggregateType,
    /// `{event_type}`
    EventType,
    /// `{aggregate_id}`
    AggregateId,
}

impl Placeholder {
    /// Every placeholder.
    pub const ALL: &'static [Placeholder] = &[
        Placeholder::AggregateType,
        Placeholder::EventType,
        Placeholder::AggregateId,
    ];

    /// The name between the braces.
    pub fn name(self) -> &'static str {
        match self {
            Placeholder::AggregateType => "aggregate_type",
            Placeholder::EventType => "event_type",
            Placeholder::AggregateId => "aggregate_id",
        }
    }

    /// `{aggregate_type}, {event_type}`: the list an error message or a fix shows.
    pub fn list(allowed: &[Placeholder]) -> String {
        allowed
            .iter()
            .map(|p| format!("{{{}}}", p.name()))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn value(self, event: &OutboxEvent) -> &str {
        match self {
            Placeholder::AggregateType => &event.aggregate_type,
            Placeholder::EventType => &event.event_type,
            Placeholder::AggregateId => &event.aggregate_id,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Value(Placeholder),
}

/// A parsed template such as `outbox.{aggregate_type}.{event_type}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

impl Template {
    /// Parses `text`, accepting the `allowed` placeholders; the error says what is wrong (an unknown
    /// or unclosed placeholder) and lists the allowed ones.
    pub fn parse(text: &str, allowed: &[Placeholder]) -> Result<Self, String> {
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
            let name = &after[..close];
            match allowed.iter().find(|p| p.name() == name) {
                Some(placeholder) => parts.push(Part::Value(*placeholder)),
                None => {
                    return Err(format!(
                        "{text:?} uses the unknown placeholder {{{name}}} (known: {})",
                        Placeholder::list(allowed)
                    ))
                }
            }
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

    /// A template that renders `text` as it is, braces included.
    pub fn literal(text: impl Into<String>) -> Self {
        Self {
            parts: vec![Part::Literal(text.into())],
        }
    }

    /// Whether the template has no placeholder.
    pub fn is_literal(&self) -> bool {
        self.parts.iter().all(|p| matches!(p, Part::Literal(_)))
    }

    /// The template with every placeholder replaced by `with` (e.g. `*` for a wildcard).
    pub fn fill(&self, with: &str) -> String {
        self.parts
            .iter()
            .map(|part| match part {
                Part::Literal(text) => text.as_str(),
                Part::Value(_) => with,
            })
            .collect()
    }

    /// The text for `event`.
    pub fn render(&self, event: &OutboxEvent) -> String {
        self.parts
            .iter()
            .map(|part| match part {
                Part::Literal(text) => text.as_str(),
                Part::Value(placeholder) => placeholder.value(event),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TYPES: &[Placeholder] = &[Placeholder::AggregateType, Placeholder::EventType];

    fn event() -> OutboxEvent {
        serde_json::from_value(serde_json::json!({
            "id": "0192d4e0-7b5a-7c1e-9f00-000000000001", "seq": 1,
            "aggregate_type": "order", "aggregate_id": "o-1", "event_type": "Placed",
            "payload": {}, "created_at": "2026-01-01T00:00:00Z"
        }))
        .expect("event")
    }

    #[test]
    fn renders_and_fills() {
        let t = Template::parse("outbox.{aggregate_type}.{event_type}", TYPES).unwrap();
        assert_eq!(t.render(&event()), "outbox.order.Placed");
        assert_eq!(t.fill("*"), "outbox.*.*");
        assert!(!t.is_literal());
        let t = Template::parse("{aggregate_type}/{aggregate_id}", Placeholder::ALL).unwrap();
        assert_eq!(t.render(&event()), "order/o-1");
        let plain = Template::parse("plain", TYPES).unwrap();
        assert!(plain.is_literal());
        assert_eq!(plain.render(&event()), "plain");
        assert_eq!(Template::parse("", TYPES).unwrap().render(&event()), "");
    }

    #[test]
    fn names_what_is_wrong_and_what_is_allowed() {
        let unknown = Template::parse("a.{aggregate_id}", TYPES).unwrap_err();
        assert!(
            unknown.contains("unknown placeholder {aggregate_id}")
                && unknown.contains("{aggregate_type}, {event_type}"),
            "{unknown}"
        );
        assert!(Template::parse("a.{event_type", TYPES)
            .unwrap_err()
            .contains("without"));
        assert!(Template::parse("a.event_type}", TYPES)
            .unwrap_err()
            .contains("without"));
    }
}
