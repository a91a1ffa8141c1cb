//! What a message carries: the payload as enqueued, the outbox's JSON envelope, or a CloudEvent.
//!
//! Every publisher kind offers the same choice (`body = "payload" | "envelope" | "cloudevents"`
//! in its destination), rendered here once:
//! - `payload`: the event's payload JSON as enqueued; the metadata travels in the broker's headers
//!   or attributes.
//! - `envelope`: the outbox envelope, [`envelope_json`]: `id`, `seq`, `aggregate_type`,
//!   `aggregate_id`, `event_type`, `payload`, `headers`, `created_at`.
//! - `cloudevents`: a [CloudEvents 1.0](https://github.com/cloudevents/spec) event in structured
//!   JSON mode ([`cloudevent_json`]): `id` = event id, `source` = `/outbox/<aggregate_type>`,
//!   `type` = event type, `subject` = aggregate id, `time` = `created_at`, `data` = the payload, and
//!   the W3C trace context as the `traceparent` / `tracestate` extensions.
//! - `cloudevents-binary`: the same CloudEvent in *binary* mode: the body is the data (the payload
//!   JSON) and the attributes travel as protocol headers ([`cloudevent_attributes`], each kind adds
//!   its binding's prefix: `ce-` for HTTP, `ce_` for Kafka, `cloudEvents_` for AMQP), with the
//!   content type `application/json` ([`CLOUDEVENTS_DATA_CONTENT_TYPE`]). Only kinds whose protocol
//!   has headers accept it; the others refuse it at validation ([`BodyFormat::is_binary`]).

use serde::{Deserialize, Serialize};

use crate::event::OutboxEvent;

/// The CloudEvents version this crate writes.
pub const CLOUDEVENTS_SPEC_VERSION: &str = "1.0";

/// What a message body holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BodyFormat {
    /// The event's payload JSON as enqueued; metadata travels in headers/attributes.
    #[default]
    Payload,
    /// The outbox's JSON envelope (see [`envelope_json`]).
    Envelope,
    /// A CloudEvents 1.0 event in structured JSON mode (see [`cloudevent_json`]).
    Cloudevents,
    /// A CloudEvents 1.0 event in binary mode: the body is the payload and the attributes are
    /// protocol headers (see [`cloudevent_attributes`]); `body = "cloudevents-binary"`.
    #[serde(rename = "cloudevents-binary", alias = "cloudevents_binary")]
    CloudeventsBinary,
}

impl BodyFormat {
    /// The body of `event`'s message in this format.
    pub fn render(self, event: &OutboxEvent) -> String {
        match self {
            Self::Payload => event.payload.get().to_owned(),
            Self::Envelope => envelope_json(event),
            Self::Cloudevents => cloudevent_json(event),
            Self::CloudeventsBinary => event.payload.get().to_owned(),
        }
    }

    /// Whether the CloudEvent attributes travel as protocol headers (binary mode): a kind whose
    /// protocol has no headers must refuse this format at validation
    /// ([`BodyFormat::binary_unsupported`] says how).
    pub fn is_binary(self) -> bool {
        matches!(self, Self::CloudeventsBinary)
    }

    /// The problem and the fix to report for `key` when a kind without headers is configured with
    /// `body = "cloudevents-binary"` (`None` for every other format).
    pub fn binary_unsupported(self, kind: &str) -> Option<(String, String)> {
        self.is_binary().then(|| {
            (
                format!(
                    "\"cloudevents-binary\" needs protocol headers for the CloudEvent attributes, and kind \"{kind}\" has none"
                ),
                "use body = \"cloudevents\" (structured mode: the attributes and the data in one JSON body)".to_owned(),
            )
        })
    }
}

/// The content type of the data in binary mode (the payload is JSON).
pub const CLOUDEVENTS_DATA_CONTENT_TYPE: &str = "application/json";

/// Renders the documented JSON envelope of an event, one line, no trailing newline.
pub fn envelope_json(event: &OutboxEvent) -> String {
    serde_json::to_string(event).expect("an OutboxEvent always serializes")
}

/// The CloudEvents `source` of an event: `/outbox/<aggregate_type>`.
pub fn cloudevent_source(event: &OutboxEvent) -> String {
    format!("/outbox/{}", event.aggregate_type)
}

/// The context attributes of an event's CloudEvent, by their CloudEvents names, for binary mode
/// (a protocol adds its prefix: `ce-` for HTTP, `ce_` for Kafka, `cloudEvents:` for AMQP).
pub fn cloudevent_attributes(event: &OutboxEvent) -> Vec<(&'static str, String)> {
    let mut attributes = vec![
        ("specversion", CLOUDEVENTS_SPEC_VERSION.to_owned()),
        ("id", event.id.to_string()),
        ("source", cloudevent_source(event)),
        ("type", event.event_type.clone()),
        ("subject", event.aggregate_id.clone()),
        (
            "time",
            event
                .created_at
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        ),
    ];
    for extension in ["traceparent", "tracestate"] {
        if let Some(value) = event.headers.get(extension) {
            attributes.push((extension, value.clone()));
        }
    }
    attributes
}

/// The event as a CloudEvents 1.0 event in structured JSON mode, one line.
pub fn cloudevent_json(event: &OutboxEvent) -> String {
    let mut object = serde_json::Map::new();
    for (name, value) in cloudevent_attributes(event) {
        object.insert(name.to_owned(), serde_json::Value::String(value));
    }
    object.insert(
        "datacontenttype".to_owned(),
        serde_json::Value::String("application/json".to_owned()),
    );
    // The payload is valid JSON (checked at enqueue and by the table); keep it verbatim.
    let data = serde_json::from_str::<serde_json::Value>(event.payload.get())
        .unwrap_or(serde_json::Value::Null);
    object.insert("data".to_owned(), data);
    serde_json::Value::Object(object).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cloudevent_carries_the_event_and_its_trace_context() {
        let event: OutboxEvent = serde_json::from_value(serde_json::json!({
            "id": "0190d5f6-0000-7000-8000-000000000001", "seq": 7,
            "aggregate_type": "order", "aggregate_id": "o-1", "event_type": "OrderPlaced",
            "payload": {"total": 12}, "headers": {"traceparent": "00-abc-def-01"},
            "created_at": "2026-11-30T12:00:00Z"
        }))
        .unwrap();
        let ce: serde_json::Value =
            serde_json::from_str(&BodyFormat::Cloudevents.render(&event)).unwrap();
        assert_eq!(ce["specversion"], "1.0");
        assert_eq!(ce["id"], "0190d5f6-0000-7000-8000-000000000001");
        assert_eq!(ce["source"], "/outbox/order");
        assert_eq!(ce["type"], "OrderPlaced");
        assert_eq!(ce["subject"], "o-1");
        assert_eq!(ce["time"], "2026-11-30T12:00:00.000000Z");
        assert_eq!(ce["traceparent"], "00-abc-def-01");
        assert_eq!(ce["data"]["total"], 12);
        assert!(ce.get("tracestate").is_none());
        assert_eq!(
            BodyFormat::CloudeventsBinary.render(&event),
            r#"{"total":12}"#
        );
        let binary: BodyFormat = serde_json::from_str(r#""cloudevents-binary""#).unwrap();
        assert!(binary.is_binary() && !BodyFormat::Cloudevents.is_binary());
        assert!(BodyFormat::Payload.binary_unsupported("sqs").is_none());
        assert!(binary.binary_unsupported("sqs").unwrap().0.contains("sqs"));
        assert_eq!(BodyFormat::Payload.render(&event), r#"{"total":12}"#);
        let envelope: serde_json::Value =
            serde_json::from_str(&BodyFormat::Envelope.render(&event)).unwrap();
        assert_eq!(envelope["seq"], 7);
    }
}
