//! `{aggregate_type}` / `{event_type}` templates for URLs: the values are percent-encoded, so an
//! event type cannot change the URL's structure (no `/`, `?`, `#` or `..` sneaks in).

use outbox::OutboxEvent;

/// One piece of a parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    AggregateType,
    EventType,
}

/// A parsed URL template such as `https://hooks.example.com/{aggregate_type}/{event_type}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

/// The placeholders a template may use.
pub(crate) const PLACEHOLDERS: &str = "{aggregate_type}, {event_type}";

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

    /// The template with every placeholder replaced by `with` (not encoded).
    pub fn fill(&self, with: &str) -> String {
        self.render_with(with, with, false)
    }

    /// The URL for `event`, its values percent-encoded.
    pub fn render(&self, event: &OutboxEvent) -> String {
        self.render_with(&event.aggregate_type, &event.event_type, true)
    }

    fn render_with(&self, aggregate_type: &str, event_type: &str, encode: bool) -> String {
        let mut out = String::new();
        for part in &self.parts {
            let value = match part {
                Part::Literal(text) => {
                    out.push_str(text);
                    continue;
                }
                Part::AggregateType => aggregate_type,
                Part::EventType => event_type,
            };
            if encode {
                percent_encode(value, &mut out);
            } else {
                out.push_str(value);
            }
        }
        out
    }
}

/// Appends `value` to `out` with every byte but RFC 3986's unreserved characters
/// (`A-Z a-z 0-9 - . _ ~`) percent-encoded; `.` and `..` alone are encoded too (no path walking).
pub(crate) fn percent_encode(value: &str, out: &mut String) {
    if value == "." || value == ".." {
        out.push_str(&value.replace('.', "%2E"));
        return;
    }
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fills_and_encodes() {
        let t = Template::parse("http://h/{aggregate_type}/{event_type}").unwrap();
        assert!(!t.is_literal());
        assert_eq!(t.fill("x"), "http://h/x/x");
        assert_eq!(
            t.render_with("a/b", "c d?é", true),
            "http://h/a%2Fb/c%20d%3F%C3%A9"
        );
        assert_eq!(t.render_with("..", "ok", true), "http://h/%2E%2E/ok");
        assert!(Template::parse("http://h/").unwrap().is_literal());
    }

    #[test]
    fn names_what_is_wrong() {
        assert!(Template::parse("http://h/{aggregate_id}")
            .unwrap_err()
            .contains("unknown placeholder {aggregate_id}"));
        assert!(Template::parse("http://h/{event_type")
            .unwrap_err()
            .contains("without"));
        assert!(Template::parse("http://h/event_type}")
            .unwrap_err()
            .contains("without"));
    }
}
