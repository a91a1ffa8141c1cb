//! The headers every publisher kind puts on a message, whatever the broker calls them (Kafka
//! headers, NATS headers, AMQP headers, SQS/SNS message attributes, HTTP headers).
//!
//! Consumers read the event's identity from them without parsing the body: the event id is the
//! idempotency key on every broker. A producer's own header with the reserved prefix is never
//! sent (it could spoof these), see [`is_reserved`].

use crate::event::OutboxEvent;

/// The event id (a UUID): the same on every delivery of the event; consumers deduplicate on it.
pub const EVENT_ID: &str = "outbox-event-id";
/// The event type (`OrderPlaced`).
pub const EVENT_TYPE: &str = "outbox-event-type";
/// The aggregate type, the first half of the ordering key.
pub const AGGREGATE_TYPE: &str = "outbox-aggregate-type";
/// The aggregate id, the second half of the ordering key.
pub const AGGREGATE_ID: &str = "outbox-aggregate-id";
/// When the producer's transaction wrote the event (RFC 3339), where a kind has room for it.
pub const CREATED_AT: &str = "outbox-created-at";
/// The prefix of the names above: reserved for the relay.
pub const RESERVED_PREFIX: &str = "outbox-";

/// The four identity headers of `event`, in the order kinds send them.
pub fn identity(event: &OutboxEvent) -> [(&'static str, String); 4] {
    [
        (EVENT_ID, event.id.to_string()),
        (EVENT_TYPE, event.event_type.clone()),
        (AGGREGATE_TYPE, event.aggregate_type.clone()),
        (AGGREGATE_ID, event.aggregate_id.clone()),
    ]
}

/// Whether a producer's header `name` uses the relay's reserved prefix (any case) and is left out.
pub fn is_reserved(name: &str) -> bool {
    name.len() >= RESERVED_PREFIX.len()
        && name.as_bytes()[..RESERVED_PREFIX.len()].eq_ignore_ascii_case(RESERVED_PREFIX.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reserved_prefix_is_matched_in_any_case() {
        assert!(is_reserved("outbox-event-id") && is_reserved("Outbox-Anything"));
        assert!(
            !is_reserved("outbox") && !is_reserved("traceparent") && !is_reserved("x-outbox-a")
        );
    }
}
