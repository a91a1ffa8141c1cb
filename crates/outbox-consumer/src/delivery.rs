//! [`Delivery`]: one received event, built from a message the outbox relay sent.
//!
//! The event id comes from the `outbox-event-id` header or attribute (every kind of destination
//! sends it, see [`outbox::publisher::headers`]), or, for `body = "envelope"` messages without
//! headers, from the envelope's `id`. [`Delivery::from_headers`] builds a delivery from any
//! broker's message; `Delivery::from_message` (feature `aws`) from an SQS message, with claim
//! checks resolved from S3.

use std::collections::HashMap;

#[cfg(feature = "aws")]
use aws_sdk_sqs::types::{Message, MessageSystemAttributeName};
use outbox::publisher::headers::{
    AGGREGATE_ID as ATTR_AGGREGATE_ID, AGGREGATE_TYPE as ATTR_AGGREGATE_TYPE,
    EVENT_ID as ATTR_EVENT_ID, EVENT_TYPE as ATTR_EVENT_TYPE,
};
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
    #[cfg(feature = "aws")]
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
    /// The broker's message id (differs between re-sent copies of one event), or a position such
    /// as `topic/partition/offset`.
    pub message_id: String,
    /// FIFO queues: the message group (the relay uses the ordering key).
    pub group_id: Option<String>,
    /// How many times the broker has handed this message out, this time included (1 when the
    /// broker does not say).
    pub receive_count: u32,
    /// The original body (payload or envelope JSON), claim check resolved.
    pub body: String,
    /// Every string header or message attribute (the event's own headers among them).
    pub attributes: HashMap<String, String>,
}

impl Delivery {
    /// Builds a delivery from any broker's message: its id (or position), its string headers and
    /// its body. Fails when neither the `outbox-event-id` header nor an envelope `id` names the
    /// event (a message the relay did not send).
    ///
    /// ```
    /// use std::collections::HashMap;
    /// use outbox_consumer::Delivery;
    ///
    /// let headers = HashMap::from([
    ///     ("outbox-event-id".to_owned(), "0192d4e0-7b5a-7c1e-9f00-000000000001".to_owned()),
    ///     ("outbox-event-type".to_owned(), "OrderPlaced".to_owned()),
    /// ]);
    /// let delivery = Delivery::from_headers("orders/0/42", headers, r#"{"total": 12}"#.into()).unwrap();
    /// assert_eq!(delivery.event_type.as_deref(), Some("OrderPlaced"));
    /// ```
    pub fn from_headers(
        message_id: impl Into<String>,
        headers: HashMap<String, String>,
        body: String,
    ) -> Result<Self, DeliveryError> {
        let message_id = message_id.into();
        let event_id = event_id(&message_id, &headers, &body)?;
        Ok(Self {
            event_id,
            event_type: headers.get(ATTR_EVENT_TYPE).cloned(),
            aggregate_type: headers.get(ATTR_AGGREGATE_TYPE).cloned(),
            aggregate_id: headers.get(ATTR_AGGREGATE_ID).cloned(),
            message_id,
            group_id: None,
            receive_count: 1,
            body,
            attributes: headers,
        })
    }

    /// A header or message attribute by name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.attributes.get(name).map(String::as_str)
    }

    /// Builds a delivery, fetching a claim-checked body from S3.
    #[cfg(feature = "aws")]
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
        let system = |name: MessageSystemAttributeName| {
            message
                .attributes()
                .and_then(|a| a.get(&name))
                .map(String::as_str)
        };
        let group_id = system(MessageSystemAttributeName::MessageGroupId).map(str::to_owned);
        let receive_count = system(MessageSystemAttributeName::ApproximateReceiveCount)
            .and_then(|c| c.parse().ok())
            .unwrap_or(1);
        Ok(Self {
            group_id,
            receive_count,
            ..Self::from_headers(message_id, attributes, body)?
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
