//! The two shapes of an event: [`NewEvent`], what a producer enqueues, and [`OutboxEvent`], what the
//! relay claims from the table and hands to a [`Publisher`](crate::Publisher).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use uuid::Uuid;

/// Event headers: string keys to string values (trace context, correlation ids, content hints).
///
/// Values are strings on purpose: every broker maps them to string attributes, and a producer writing
/// SQL gets the same rule enforced by a `CHECK` constraint.
pub type Headers = BTreeMap<String, String>;

/// The default of [`EventLimits::max_payload_bytes`]: 240 KiB. EventBridge takes entries of up to
/// 256 KiB (source, detail type and detail together) and SQS messages of up to 1 MiB (body and
/// attributes), so a payload within this limit fits every built-in destination with 16 KiB left
/// for the envelope, headers and attributes. Raise it only with destinations that take more (or
/// with an S3 claim check); `outbox config` warns when it is above what the destinations accept.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 240 * 1024;

/// The largest value [`EventLimits::max_payload_bytes`] may take: a `jsonb` value holds at most
/// 255 MiB.
pub const MAX_PAYLOAD_BYTES_CEILING: usize = 255 * 1024 * 1024;

/// Limits a producer's event must respect, also enforced on SQL producers by the table (see the
/// `outbox_event_payload_size` trigger).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventLimits {
    /// Largest payload accepted at enqueue, in bytes of its PostgreSQL text form (what the relay
    /// publishes; see [`NewEvent::payload_size`]).
    pub max_payload_bytes: usize,
    /// Largest length of `aggregate_type`, `aggregate_id`, `event_type`, a header name or value.
    pub max_field_bytes: usize,
}

impl Default for EventLimits {
    fn default() -> Self {
        Self {
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            max_field_bytes: 1024,
        }
    }
}

/// Why an event was refused at enqueue. Nothing was written when this is returned.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EventError {
    #[error("event field `{field}` is empty: give every event an aggregate type, an aggregate id and an event type")]
    EmptyField { field: &'static str },
    #[error("event field `{field}` is {len} bytes, over the limit of {limit}: shorten it")]
    FieldTooLong {
        field: &'static str,
        len: usize,
        limit: usize,
    },
    #[error(
        "event payload must be a JSON object, got {found}: wrap the value, e.g. {{\"value\": ...}}"
    )]
    PayloadNotObject { found: &'static str },
    #[error("event payload is {len} bytes, over the limit of {limit} (events.max_payload_bytes): store large data elsewhere and reference it, or raise the limit where the destinations take more (or with an S3 claim check, [aws.large_payloads])")]
    PayloadTooLarge { len: usize, limit: usize },
    #[error("event payload could not be serialized to JSON: {0}")]
    Serialize(String),
    #[error("header name is empty: give every header a name")]
    EmptyHeaderName,
    #[error("event {field} contains a NUL character (\\u0000), which PostgreSQL cannot store: remove it or encode the value")]
    NulCharacter { field: &'static str },
}

/// An event a producer enqueues in its own transaction.
///
/// ```
/// use outbox::NewEvent;
/// let event = NewEvent::new("order", "o-42", "OrderPlaced")
///     .payload(&serde_json::json!({"total_cents": 1250}))
///     .unwrap()
///     .header("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
/// assert_eq!(event.event_type(), "OrderPlaced");
/// ```
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub(crate) id: Uuid,
    pub(crate) aggregate_type: String,
    pub(crate) aggregate_id: String,
    pub(crate) event_type: String,
    pub(crate) payload: Box<RawValue>,
    pub(crate) headers: Headers,
    pub(crate) destination: Option<String>,
    /// Not published before this time (`available_at`); `None`: due at commit.
    pub(crate) deliver_after: Option<DateTime<Utc>>,
    /// While it waits for `deliver_after`, the later events of its key wait for it (`holds_key`).
    pub(crate) holds_key: bool,
}

impl NewEvent {
    /// An event with an empty object payload and a fresh time-ordered (v7) id.
    pub fn new(
        aggregate_type: impl Into<String>,
        aggregate_id: impl Into<String>,
        event_type: impl Into<String>,
    ) -> Self {
        Self {
            id: Uuid::now_v7(),
            aggregate_type: aggregate_type.into(),
            aggregate_id: aggregate_id.into(),
            event_type: event_type.into(),
            payload: empty_object(),
            headers: Headers::new(),
            destination: None,
            deliver_after: None,
            holds_key: true,
        }
    }

    /// Sets the payload from any serde value; it must serialize to a JSON object.
    pub fn payload<T: Serialize + ?Sized>(mut self, payload: &T) -> Result<Self, EventError> {
        let json =
            serde_json::to_string(payload).map_err(|e| EventError::Serialize(e.to_string()))?;
        self.payload =
            RawValue::from_string(json).map_err(|e| EventError::Serialize(e.to_string()))?;
        Ok(self)
    }

    /// Sets an already serialized JSON payload (it is validated at enqueue).
    pub fn raw_payload(mut self, payload: Box<RawValue>) -> Self {
        self.payload = payload;
        self
    }

    /// Adds a header; a later value for the same name replaces the earlier one.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Names the destination explicitly, bypassing the relay's routing rules.
    pub fn destination(mut self, destination: impl Into<String>) -> Self {
        self.destination = Some(destination.into());
        self
    }

    /// Delays the event: the relay publishes it not before `at` (the `available_at` column), and
    /// soon after (its maintenance releases due events every second and wakes the relay). A time
    /// in the past, or at the moment of the insert, is the same as no delay.
    ///
    /// Per-key order holds by default: the later events of the same key wait behind the delayed
    /// one and are published after it. [`NewEvent::holds_key`]`(false)` lets them pass instead.
    ///
    /// ```
    /// use outbox::NewEvent;
    /// let remind = NewEvent::new("cart", "c-7", "CartReminder")
    ///     .deliver_after(chrono::Utc::now() + chrono::Duration::hours(24));
    /// assert!(remind.delivery_time().is_some());
    /// ```
    pub fn deliver_after(mut self, at: DateTime<Utc>) -> Self {
        self.deliver_after = Some(at);
        self
    }

    /// For a delayed event ([`NewEvent::deliver_after`]): whether the later events of its key
    /// wait for it (`true`, the default: per-key order holds) or are published while it waits
    /// (`false`). With `false` the delayed event leaves its key's order until it is due: it is
    /// published after the earlier events of its key, possibly after later ones; once due, the
    /// later events that are not published yet wait for it as usual. Use it for timers and
    /// reminders that must not stall their aggregate's stream. No effect on an event without a
    /// delay. The SQL column is `holds_key`.
    pub fn holds_key(mut self, holds: bool) -> Self {
        self.holds_key = holds;
        self
    }

    /// Overrides the generated id, e.g. to derive it from a request id so retries of the producer's
    /// own request do not enqueue twice (the table rejects a duplicate id).
    pub fn with_id(mut self, id: Uuid) -> Self {
        self.id = id;
        self
    }

    pub fn id(&self) -> Uuid {
        self.id
    }
    pub fn aggregate_type(&self) -> &str {
        &self.aggregate_type
    }
    pub fn aggregate_id(&self) -> &str {
        &self.aggregate_id
    }
    pub fn event_type(&self) -> &str {
        &self.event_type
    }
    pub fn payload_json(&self) -> &str {
        self.payload.get()
    }
    pub fn headers(&self) -> &Headers {
        &self.headers
    }
    /// The time set by [`NewEvent::deliver_after`], if any.
    pub fn delivery_time(&self) -> Option<DateTime<Utc>> {
        self.deliver_after
    }
    /// See [`NewEvent::holds_key`].
    pub fn holds_its_key(&self) -> bool {
        self.holds_key
    }

    /// The payload's size as `events.max_payload_bytes` counts it: the bytes of the payload's
    /// PostgreSQL text form (`octet_length(payload::text)`), which is what the relay publishes and
    /// what the table's size trigger measures for SQL producers.
    pub fn payload_size(&self) -> usize {
        jsonb_text_len(self.payload.get())
    }

    /// Checks the event against the limits and the table contract, so that a bad event fails in the
    /// producer's code path with a clear message rather than as a database constraint error.
    pub fn validate(&self, limits: &EventLimits) -> Result<(), EventError> {
        for (field, value) in [
            ("aggregate_type", &self.aggregate_type),
            ("aggregate_id", &self.aggregate_id),
            ("event_type", &self.event_type),
        ] {
            check_field(field, value, limits)?;
        }
        if let Some(destination) = &self.destination {
            check_field("destination", destination, limits)?;
        }
        for (name, value) in &self.headers {
            if name.is_empty() {
                return Err(EventError::EmptyHeaderName);
            }
            check_field("header name", name, limits)?;
            check_field_len("header value", value, limits)?;
        }
        let payload = self.payload.get();
        let size = jsonb_text_len(payload);
        if size > limits.max_payload_bytes {
            return Err(EventError::PayloadTooLarge {
                len: size,
                limit: limits.max_payload_bytes,
            });
        }
        if has_nul_escape(payload) {
            return Err(EventError::NulCharacter { field: "payload" });
        }
        let first = payload.trim_start().as_bytes().first().copied();
        if first != Some(b'{') {
            return Err(EventError::PayloadNotObject {
                found: json_kind(first),
            });
        }
        Ok(())
    }
}

fn check_field(field: &'static str, value: &str, limits: &EventLimits) -> Result<(), EventError> {
    if value.is_empty() {
        return Err(EventError::EmptyField { field });
    }
    check_field_len(field, value, limits)
}

fn check_field_len(
    field: &'static str,
    value: &str,
    limits: &EventLimits,
) -> Result<(), EventError> {
    // text and jsonb cannot hold NUL: refuse it here rather than as a database error that aborts
    // the producer's transaction.
    if value.contains('\0') {
        return Err(EventError::NulCharacter { field });
    }
    if value.len() > limits.max_field_bytes {
        return Err(EventError::FieldTooLong {
            field,
            len: value.len(),
            limit: limits.max_field_bytes,
        });
    }
    Ok(())
}

/// Whether serialized JSON holds the escape `\u0000` (backslashes only occur as escapes in JSON).
fn has_nul_escape(json: &str) -> bool {
    let b = json.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' {
            if b.get(i + 1) == Some(&b'u') && b.get(i + 2..i + 6) == Some(b"0000".as_slice()) {
                return true;
            }
            i += 2;
        } else {
            i += 1;
        }
    }
    false
}

/// The length of PostgreSQL's text form of the `jsonb` parsed from `json` (valid JSON text),
/// computed without a database round trip, so that the Rust API and the table's size trigger
/// (`octet_length(payload::text)`) agree. PostgreSQL drops insignificant whitespace, writes
/// `": "` and `", "` between members and elements, and escapes strings minimally (as serde_json
/// does); escapes such as `\/` or `\u00e9` become the character itself. Numbers are counted as
/// written: PostgreSQL prints `1e3` as `1000`, so for exponents the table has the last word.
pub fn jsonb_text_len(json: &str) -> usize {
    let b = json.as_bytes();
    let mut len = 0;
    let mut i = 0;
    let mut in_string = false;
    while i < b.len() {
        let c = b[i];
        if in_string {
            match c {
                b'"' => {
                    in_string = false;
                    len += 1;
                }
                b'\\' => {
                    let (consumed, out) = escape_len(&b[i..]);
                    len += out;
                    i += consumed;
                    continue;
                }
                _ => len += 1,
            }
        } else {
            match c {
                b' ' | b'\t' | b'\n' | b'\r' => {}
                b':' | b',' => len += 2,
                b'"' => {
                    in_string = true;
                    len += 1;
                }
                _ => len += 1,
            }
        }
        i += 1;
    }
    len
}

/// For an escape sequence at the start of `s`: how many input bytes it spans and how many bytes
/// PostgreSQL writes for it.
fn escape_len(s: &[u8]) -> (usize, usize) {
    match s.get(1) {
        Some(b'u') => {
            let code = s
                .get(2..6)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u32::from_str_radix(h, 16).ok());
            let out = match code {
                // \b \f \n \r \t keep a two-character escape; other controls stay \u00XX.
                Some(0x08 | 0x0c | 0x0a | 0x0d | 0x09) => 2,
                Some(c) if c < 0x20 => 6,
                Some(0x22 | 0x5c) => 2,
                Some(c) if c < 0x80 => 1,
                Some(c) if c < 0x800 => 2,
                // A high surrogate and its low surrogate make one 4-byte character.
                Some(0xd800..=0xdbff) => 4,
                Some(0xdc00..=0xdfff) => 0,
                Some(_) => 3,
                None => 6,
            };
            (6, out)
        }
        Some(b'/') => (2, 1),
        Some(_) => (2, 2),
        None => (1, 1),
    }
}

fn json_kind(first: Option<u8>) -> &'static str {
    match first {
        Some(b'[') => "an array",
        Some(b'"') => "a string",
        Some(b't' | b'f') => "a boolean",
        Some(b'n') => "null",
        Some(_) => "a number",
        None => "nothing",
    }
}

pub(crate) fn empty_object() -> Box<RawValue> {
    RawValue::from_string("{}".to_owned()).expect("`{}` is valid JSON")
}

/// An event claimed from the outbox, as a [`Publisher`](crate::Publisher) receives it.
///
/// Serialized (e.g. by the `stdout` and `file` publishers) it is the documented JSON envelope:
/// `id`, `seq`, `aggregate_type`, `aggregate_id`, `event_type`, `payload`, `headers`, `created_at`,
/// plus `destination` when the producer named one.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OutboxEvent {
    /// Stable identity: the same on every delivery attempt, so consumers deduplicate on it.
    pub id: Uuid,
    /// Position in the outbox; orders the events of one key.
    pub seq: i64,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_type: String,
    pub payload: Box<RawValue>,
    #[serde(default)]
    pub headers: Headers,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<String>,
    pub created_at: DateTime<Utc>,
    /// Failed delivery attempts before this one.
    #[serde(default, skip_serializing)]
    pub attempts: i32,
}

impl OutboxEvent {
    /// The ordering key: events with equal keys are published in `seq` order.
    pub fn ordering_key(&self) -> OrderingKey<'_> {
        OrderingKey {
            aggregate_type: &self.aggregate_type,
            aggregate_id: &self.aggregate_id,
        }
    }
}

/// `(aggregate_type, aggregate_id)`: the unit of ordering.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OrderingKey<'a> {
    pub aggregate_type: &'a str,
    pub aggregate_id: &'a str,
}

impl std::fmt::Display for OrderingKey<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.aggregate_type, self.aggregate_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_non_object_payloads_with_the_kind_found() {
        let limits = EventLimits::default();
        let event = NewEvent::new("order", "1", "Placed")
            .payload(&[1, 2])
            .unwrap();
        assert_eq!(
            event.validate(&limits),
            Err(EventError::PayloadNotObject { found: "an array" })
        );
        let event = NewEvent::new("order", "1", "Placed").payload(&"x").unwrap();
        assert_eq!(
            event.validate(&limits),
            Err(EventError::PayloadNotObject { found: "a string" })
        );
    }

    #[test]
    fn rejects_empty_and_long_fields() {
        let limits = EventLimits {
            max_field_bytes: 4,
            ..EventLimits::default()
        };
        assert_eq!(
            NewEvent::new("", "1", "Placed").validate(&limits),
            Err(EventError::EmptyField {
                field: "aggregate_type"
            })
        );
        assert!(matches!(
            NewEvent::new("order", "1", "P").validate(&limits),
            Err(EventError::FieldTooLong {
                field: "aggregate_type",
                ..
            })
        ));
        assert_eq!(
            NewEvent::new("o", "1", "P")
                .header("", "v")
                .validate(&limits),
            Err(EventError::EmptyHeaderName)
        );
    }

    #[test]
    fn rejects_oversized_payloads_naming_the_limit() {
        let limits = EventLimits {
            max_payload_bytes: 16,
            ..EventLimits::default()
        };
        let event = NewEvent::new("o", "1", "P")
            .payload(&serde_json::json!({"data": "0123456789abcdef"}))
            .unwrap();
        let err = event.validate(&limits).unwrap_err();
        assert!(matches!(err, EventError::PayloadTooLarge { limit: 16, .. }));
        assert!(err.to_string().contains("max_payload_bytes"));
    }

    #[test]
    fn rejects_nul_characters_that_postgres_cannot_store() {
        let limits = EventLimits::default();
        let nul = |e: NewEvent| matches!(e.validate(&limits), Err(EventError::NulCharacter { .. }));
        assert!(nul(NewEvent::new("o", "1\0", "P")));
        assert!(nul(NewEvent::new("o", "1", "P").header("h", "a\0b")));
        assert!(nul(NewEvent::new("o", "1", "P")
            .payload(&serde_json::json!({"s": "a\0b"}))
            .unwrap()));
        // An escaped backslash followed by `u0000` is an ordinary string.
        let fine = NewEvent::new("o", "1", "P")
            .payload(&serde_json::json!({"s": "\\u0000"}))
            .unwrap();
        assert_eq!(fine.validate(&limits), Ok(()));
    }

    #[test]
    fn payload_size_is_the_postgres_text_form() {
        // PostgreSQL renders `{"a":1,"b":[1,2]}` as `{"a": 1, "b": [1, 2]}`.
        assert_eq!(
            jsonb_text_len(r#"{"a":1,"b":[1,2]}"#),
            r#"{"a": 1, "b": [1, 2]}"#.len()
        );
        assert_eq!(jsonb_text_len("{ \"a\" :\n 1 }"), r#"{"a": 1}"#.len());
        assert_eq!(
            jsonb_text_len(r#"{"s":"a,b: c"}"#),
            r#"{"s": "a,b: c"}"#.len()
        );
        assert_eq!(
            jsonb_text_len(r#"{"s":"\u00e9\/\n\u0001\""}"#),
            r#"{"s": "é/\n\u0001\""}"#.len()
        );
        assert_eq!(
            jsonb_text_len(r#"{"s":"\ud83d\ude00"}"#),
            r#"{"s": "😀"}"#.len()
        );
        let event = NewEvent::new("o", "1", "P")
            .payload(&serde_json::json!({"a": 1}))
            .unwrap();
        assert_eq!(event.payload_size(), 8);
    }

    #[test]
    fn new_ids_are_time_ordered() {
        let a = NewEvent::new("o", "1", "P").id();
        let b = NewEvent::new("o", "1", "P").id();
        assert_eq!(a.get_version_num(), 7);
        assert!(a < b);
    }
}
