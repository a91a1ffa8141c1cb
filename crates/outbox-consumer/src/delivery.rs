//! [`Delivery`]: one received event, built from an SQS message the outbox relay sent.
//!
//! The event id comes from the `outbox-event-id` attribute (every message the relay sends has it),
//! or, for `body = "envelope"` destinations without attributes, from the envelope's `id`. The body
//! is the original one: claim checks are resolved from S3 with [`outbox_aws::resolve_payload`].

use std::collections::HashMap;

use aws_sdk_sqs::types::{Message, MessageSystemAttributeName};
use outbox_aws::sqs::{ATTR_AGGREGATE_ID, ATTR_AGGREGATE_TYPE, ATTR_EVENT_ID, ATTR_EVENT_TYPE};
use serde::de::DeserializeOwned;
use uuid::Uuid;

/// Why a message could not be turned into a delivery. The message is left for redelivery (and
/// reaches the dead-letter queue if this never changes).
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("message {message_id} has no event id (no `outbox-event-id` attribute and no envelope `id`): it was not sent by the outbox relay")]
    NoEventId { message_id: String },
    #[error("message {message_id} has an event id that is not a UUID: {value:?}")]
    BadEventId { message_id: String, value: String },
    #[error("message {message_id}: {source}")]
    Resolve {
        message_id: String,
        #[source]
        source: outbox_aws::ResolveError,
    },
}

/// One received event, as a [`Handler`](crate::Handler) sees it.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The outbox event id: the same on every delivery of the event; the idempotency key.
    pub event_id: Uuid,
    pub event_type: Option<String>,
    pub aggregate_type: Option<String>,
    pub aggregate_id: Option<String>,
    /// The SQS message id (differs between re-sent copies of one event).
    pub message_id: String,
    /// FIFO queues: the message group (the relay uses the ordering key).
    pub group_id: Option<String>,
    /// How many times SQS has handed this message out, this time included.
    pub receive_count: u32,
    /// The original body (payload or envelope JSON), claim check resolved.
    pub body: String,
    /// Every String message attribute (the event's headers among them).
    pub attributes: HashMap<String, String>,
}

impl Delivery {
    /// Builds a delivery, fetching a claim-checked body from S3.
    pub async fn from_message(
        s3: &aws_sdk_s3::Client,
        message: &Message,
    ) -> Result<Self, DeliveryError> {
        let message_id = message.message_id().unwrap_or_default().to_owned();
        let raw_body = message.body().unwrap_or_default();
        let body = outbox_aws::resolve_payload(s3, raw_body, message.message_attributes())
            .await
            .map_err(|source| DeliveryError::Resolve {
                message_id: message_id.clone(),
                source,
            })?;
        let attributes: HashMap<String, String> = message
            .message_attributes()
            .into_iter()
            .flatten()
            .filter_map(|(k, v)| v.string_value().map(|s| (k.clone(), s.to_owned())))
            .collect();
        let event_id = event_id(&message_id, &attributes, &body)?;
        let system = |name: MessageSystemAttributeName| {
            message
                .attributes()
                .and_then(|a| a.get(&name))
                .map(String::as_str)
        };
        Ok(Self {
            event_id,
            event_type: attributes.get(ATTR_EVENT_TYPE).cloned(),
            aggregate_type: attributes.get(ATTR_AGGREGATE_TYPE).cloned(),
            aggregate_id: attributes.get(ATTR_AGGREGATE_ID).cloned(),
            group_id: system(MessageSystemAttributeName::MessageGroupId).map(str::to_owned),
            receive_count: system(MessageSystemAttributeName::ApproximateReceiveCount)
                .and_then(|c| c.parse().ok())
                .unwrap_or(1),
            message_id,
            body,
            attributes,
        })
    }

    /// The body parsed as `T` (for `body = "payload"`: the payload the producer enqueued).
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_str(&self.body)
    }
}

fn event_id(
    message_id: &str,
    attributes: &HashMap<String, String>,
    body: &str,
) -> Result<Uuid, DeliveryError> {
    let value = match attributes.get(ATTR_EVENT_ID) {
        Some(v) => v.clone(),
        None => {
            #[derive(serde::Deserialize)]
            struct Envelope {
                id: String,
            }
            serde_json::from_str::<Envelope>(body)
                .map(|e| e.id)
                .map_err(|_| DeliveryError::NoEventId {
                    message_id: message_id.to_owned(),
                })?
        }
    };
    value.parse().map_err(|_| DeliveryError::BadEventId {
        message_id: message_id.to_owned(),
        value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_ids_come_from_the_attribute_or_the_envelope() {
        let id = Uuid::now_v7();
        let attrs = HashMap::from([(ATTR_EVENT_ID.to_owned(), id.to_string())]);
        assert_eq!(event_id("m", &attrs, "{}").unwrap(), id);
        let body = format!(r#"{{"id": "{id}", "seq": 1}}"#);
        assert_eq!(event_id("m", &HashMap::new(), &body).unwrap(), id);
        assert!(matches!(
            event_id("m", &HashMap::new(), "{}"),
            Err(DeliveryError::NoEventId { .. })
        ));
        let bad = HashMap::from([(ATTR_EVENT_ID.to_owned(), "nope".to_owned())]);
        assert!(matches!(
            event_id("m", &bad, "{}"),
            Err(DeliveryError::BadEventId { .. })
        ));
    }
}
