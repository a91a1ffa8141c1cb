//! Subjects: the core's [`Template`] with `{aggregate_type}` and `{event_type}`, and the filter a
//! stream captures them with.
//!
//! `{aggregate_id}` is not offered: a subject per aggregate would make the subject space (and a
//! stream's per-subject state) grow with the number of aggregates.

use outbox::publisher::template::{Placeholder, Template};

/// The placeholders a subject may use.
pub const SUBJECT_PLACEHOLDERS: &[Placeholder] =
    &[Placeholder::AggregateType, Placeholder::EventType];

/// Parses a subject template; the error names an unknown or unbalanced placeholder.
pub fn parse_subject(text: &str) -> Result<Template, String> {
    Template::parse(text, SUBJECT_PLACEHOLDERS)
}

/// The subject filter a stream captures a template's subjects with: the literal tokens before
/// the first placeholder, then `>` (`outbox.{aggregate_type}.{event_type}` → `outbox.>`), as an
/// aggregate or event type may itself contain dots.
pub fn stream_subject(template: &Template) -> String {
    const MARK: &str = "\u{1}";
    if template.is_literal() {
        return template.fill("");
    }
    let filled = template.fill(MARK);
    let mut tokens: Vec<&str> = filled
        .split('.')
        .take_while(|t| !t.contains(MARK))
        .collect();
    tokens.push(">");
    tokens.join(".")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stream_captures_everything_after_the_first_placeholder() {
        let subject = |t: &str| stream_subject(&parse_subject(t).unwrap());
        assert_eq!(subject("outbox.{aggregate_type}.{event_type}"), "outbox.>");
        assert_eq!(subject("a.b-{event_type}.c"), "a.>");
        assert_eq!(subject("plain"), "plain");
        assert!(parse_subject("a.{aggregate_id}")
            .unwrap_err()
            .contains("unknown placeholder {aggregate_id}"));
    }
}
