//! The Kafka publisher: one destination (a topic or a topic template) over a shared producer.
//!
//! - Record key: the ordering key `aggregate_type/aggregate_id`, so a key's events go to one
//!   partition (Kafka's default partitioner hashes the key) and are read in order.
//! - Value: the payload JSON (default), the outbox envelope (`body = "envelope"`), a structured
//!   CloudEvent (`body = "cloudevents"`), or the payload as a binary-mode CloudEvent's data
//!   (`body = "cloudevents-binary"`).
//! - Headers: `outbox-event-id`, `outbox-event-type`, `outbox-aggregate-type`,
//!   `outbox-aggregate-id`, `outbox-created-at`, then in binary mode the CloudEvent attributes as
//!   `ce_specversion`, `ce_id`, `ce_source`, `ce_type`, `ce_subject`, `ce_time` (and
//!   `ce_traceparent` / `ce_tracestate`) with `content-type: application/json` (the Kafka protocol
//!   binding), then the event's own headers (`traceparent`, …); an event header named like ours
//!   (`outbox-…`, and in binary mode `ce_…` or `content-type`) is not copied.
//! - Producer: idempotent, `acks=all` (see [`crate::config::KafkaConfig::producer_config`]).
//!
//! Batches go through the core's wave engine ([`outbox::publisher::batch`]): a wave holds at most
//! one event per key; its records are enqueued at once with `send_result` (which enqueues without
//! waiting, unlike `send`, which enqueues only when polled) and their delivery reports awaited
//! together; the next event of a key is enqueued only after its previous one was acknowledged.
//! Why not enqueue a key's events back to back? The idempotent producer keeps them in order, but
//! if event k fails for good (e.g. refused as too large by the topic), k+1 may already be written:
//! the key would be published out of order. A hot key costs one round trip per event per batch.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::future::join_all;
use outbox::publisher::batch::{publish_in_waves, Prepared, RequestFailure, Sink};
use outbox::publisher::headers as outbox_headers;
use outbox::publisher::template::Template;
use outbox::publisher::{cloudevent_attributes, CLOUDEVENTS_DATA_CONTENT_TYPE};
use outbox::{OutboxEvent, PublishError, PublishResult, Publisher};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use crate::config::{is_topic_char, KafkaDestination, MAX_TOPIC_LEN};

/// The prefix of the CloudEvents attribute headers in binary mode (`body = "cloudevents-binary"`),
/// per the CloudEvents Kafka protocol binding.
pub const CE_HEADER_PREFIX: &str = "ce_";

/// Most records enqueued per wave request; librdkafka batches them into produce requests itself.
const MAX_ENTRIES: usize = 10_000;

/// One record, ready to enqueue.
#[derive(Debug, Clone)]
pub struct KafkaRecord {
    topic: String,
    key: String,
    value: String,
    headers: Vec<(&'static str, String)>,
    own_headers: Vec<(String, String)>,
}

/// Publishes to one Kafka destination.
pub struct KafkaPublisher {
    name: String,
    destination: KafkaDestination,
    topic: Template,
    producer: Arc<FutureProducer>,
    brokers: String,
    delivery_timeout: Duration,
}

impl std::fmt::Debug for KafkaPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the producer: its configuration may hold credentials.
        f.debug_struct("KafkaPublisher")
            .field("name", &self.name)
            .field("destination", &self.destination)
            .field("brokers", &self.brokers)
            .finish_non_exhaustive()
    }
}

impl KafkaPublisher {
    /// A publisher for destination `name` over `producer` (shared by the destinations of one
    /// cluster); `delivery_timeout` is the producer's `message.timeout.ms`.
    pub fn new(
        name: &str,
        destination: KafkaDestination,
        producer: Arc<FutureProducer>,
        brokers: &str,
        delivery_timeout: Duration,
    ) -> Self {
        // Validated with the configuration; the literal is only what an unvalidated text becomes.
        let topic = destination
            .topic_template()
            .unwrap_or_else(|_| Template::literal(destination.topic.clone()));
        Self {
            name: name.to_owned(),
            topic,
            destination,
            producer,
            brokers: brokers.to_owned(),
            delivery_timeout,
        }
    }

    fn record(&self, event: &OutboxEvent) -> Result<Prepared<KafkaRecord>, PublishError> {
        let topic = self.topic.render(event);
        if topic.is_empty()
            || topic.len() > MAX_TOPIC_LEN
            || !topic.chars().all(is_topic_char)
            || topic == "."
            || topic == ".."
        {
            return Err(PublishError::permanent(format!(
                "event {} renders topic {topic:?} from destinations.{}.topic ({:?}), which is not a valid \
                 Kafka topic name (letters, digits, `.`, `_`, `-`, up to {MAX_TOPIC_LEN}): fix the template \
                 or the event's aggregate/event type",
                event.id, self.name, self.destination.topic
            )));
        }
        let value = self.destination.body.render(event);
        let mut headers = outbox_headers::identity(event).to_vec();
        headers.push((outbox_headers::CREATED_AT, event.created_at.to_rfc3339()));
        let binary = self.destination.body.is_binary();
        let mut own_headers: Vec<(String, String)> = Vec::new();
        if binary {
            // The Kafka protocol binding of CloudEvents, binary mode: every attribute as a `ce_`
            // header, the data content type as `content-type`, the data as the value.
            own_headers.extend(
                cloudevent_attributes(event)
                    .into_iter()
                    .map(|(name, value)| (format!("{CE_HEADER_PREFIX}{name}"), value)),
            );
            own_headers.push((
                "content-type".to_owned(),
                CLOUDEVENTS_DATA_CONTENT_TYPE.to_owned(),
            ));
        }
        own_headers.extend(
            event
                .headers
                .iter()
                .filter(|(name, _)| {
                    !outbox_headers::is_reserved(name)
                        && !(binary
                            && (name.starts_with(CE_HEADER_PREFIX)
                                || name.eq_ignore_ascii_case("content-type")))
                })
                .map(|(n, v)| (n.clone(), v.clone())),
        );
        let key = event.ordering_key().to_string();
        let size = value.len()
            + key.len()
            + headers
                .iter()
                .map(|(n, v)| n.len() + v.len())
                .sum::<usize>()
            + own_headers
                .iter()
                .map(|(n, v)| n.len() + v.len())
                .sum::<usize>();
        if size > self.destination.max_message_bytes {
            return Err(PublishError::permanent(format!(
                "event {} makes a Kafka record of {size} bytes (value + key + headers), over the limit of {} \
                 bytes of destination `{}` (destinations.{}.max_message_bytes, which must not exceed the \
                 topic's max.message.bytes): make the event smaller",
                event.id, self.destination.max_message_bytes, self.name, self.name
            )));
        }
        Ok(Prepared {
            entry: KafkaRecord {
                topic,
                key,
                value,
                headers,
                own_headers,
            },
            size,
        })
    }

    /// Enqueues one record; waits while librdkafka's queue is full, at most the delivery timeout.
    async fn enqueue(
        &self,
        record: &KafkaRecord,
        deadline: Instant,
    ) -> Result<rdkafka::producer::DeliveryFuture, KafkaError> {
        let mut headers =
            OwnedHeaders::new_with_capacity(record.headers.len() + record.own_headers.len());
        for (name, value) in &record.headers {
            headers = headers.insert(Header {
                key: name,
                value: Some(value.as_bytes()),
            });
        }
        for (name, value) in &record.own_headers {
            headers = headers.insert(Header {
                key: name,
                value: Some(value.as_bytes()),
            });
        }
        let mut pending = FutureRecord::to(&record.topic)
            .key(record.key.as_bytes())
            .payload(record.value.as_bytes())
            .headers(headers);
        loop {
            match self.producer.send_result(pending) {
                Ok(delivery) => return Ok(delivery),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                    if Instant::now() < deadline =>
                {
                    // The producer's background thread drains the queue; give it a moment.
                    pending = back;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Err((e, _)) => return Err(e),
            }
        }
    }

    fn fix_for_unavailable(&self) -> String {
        format!(
            "is Kafka running at {}? (locally: scripts/kafka.sh start); is the topic created?",
            self.brokers
        )
    }

    async fn check_metadata(&self) -> Result<(), PublishError> {
        let producer = self.producer.clone();
        let topic = self
            .topic
            .is_literal()
            .then(|| self.destination.topic.clone());
        let timeout = self.delivery_timeout.min(Duration::from_secs(5));
        // `fetch_metadata` blocks its thread until the broker answers or the timeout passes.
        let metadata = tokio::task::spawn_blocking(move || {
            producer.client().fetch_metadata(topic.as_deref(), timeout)
        })
        .await
        .map_err(|e| PublishError::unavailable(format!("metadata request failed: {e}")))?;
        let metadata = metadata.map_err(|e| {
            PublishError::unavailable(format!(
                "cannot reach Kafka at {} (metadata request, {} ms): {e}: is the broker running and \
                 is kafka.brokers right? (locally: scripts/kafka.sh start)",
                self.brokers,
                timeout.as_millis()
            ))
        })?;
        if !self.topic.is_literal() {
            return Ok(());
        }
        let topic = &self.destination.topic;
        let found = metadata.topics().iter().find(|t| t.name() == topic);
        match found {
            Some(t) if t.error().is_none() && !t.partitions().is_empty() => Ok(()),
            Some(t) => Err(PublishError::permanent(format!(
                "topic `{topic}` is not usable on {} ({}): create it (e.g. with kafka-topics.sh \
                 --create or your infrastructure tool), or fix destinations.{}.topic",
                self.brokers,
                t.error()
                    .map(|e| RDKafkaErrorCode::from(e).to_string())
                    .unwrap_or_else(|| "no partitions".into()),
                self.name
            ))),
            None => Err(PublishError::permanent(format!(
                "topic `{topic}` does not exist on {}: create it, or fix destinations.{}.topic",
                self.brokers, self.name
            ))),
        }
    }
}

/// The scope of a Kafka error, for the relay's decision.
pub fn classify(error: &KafkaError, context: &str) -> PublishError {
    use RDKafkaErrorCode as C;
    let text = format!("{context}: {error}");
    let Some(code) = error.rdkafka_error_code() else {
        return PublishError::retryable(text);
    };
    match code {
        // The record itself is refused: it will never pass.
        C::MessageSizeTooLarge
        | C::InvalidMessageSize
        | C::MessageBatchTooLarge
        | C::InvalidMessage
        | C::InvalidRecord
        | C::InvalidTopic
        | C::PolicyViolation
        | C::BadMessage
        | C::UnsupportedForMessageFormat
        | C::InvalidTimestamp => PublishError::permanent(text),
        // The idempotent producer can never continue: the relay stops and a restart makes a new one.
        C::Fatal | C::ProducerFenced | C::InvalidProducerEpoch => PublishError::fatal(text),
        // The destination: broker down or moving, timeouts, a missing topic, credentials, quotas.
        C::MessageTimedOut
        | C::BrokerTransportFailure
        | C::AllBrokersDown
        | C::Resolve
        | C::OperationTimedOut
        | C::RequestTimedOut
        | C::TimedOutQueue
        | C::QueueFull
        | C::UnknownTopic
        | C::UnknownTopicOrPartition
        | C::UnknownPartition
        | C::LeaderNotAvailable
        | C::NotLeaderForPartition
        | C::BrokerNotAvailable
        | C::ReplicaNotAvailable
        | C::NetworkException
        | C::NotEnoughReplicas
        | C::NotEnoughReplicasAfterAppend
        | C::KafkaStorageError
        | C::ThrottlingQuotaExceeded
        | C::TopicAuthorizationFailed
        | C::ClusterAuthorizationFailed
        | C::SaslAuthenticationFailed
        | C::Authentication
        | C::SSL
        | C::BrokerDestroy
        | C::PurgeQueue
        | C::PurgeInflight
        | C::FencedLeaderEpoch
        | C::UnknownLeaderEpoch => PublishError::unavailable(text),
        _ => PublishError::retryable(text),
    }
}

#[async_trait]
impl Sink for KafkaPublisher {
    type Entry = KafkaRecord;

    fn max_entries(&self) -> usize {
        MAX_ENTRIES
    }

    fn max_request_bytes(&self) -> usize {
        // A wave is not one request on the wire: librdkafka splits it into produce requests.
        usize::MAX
    }

    async fn prepare(&self, event: &OutboxEvent) -> Result<Prepared<KafkaRecord>, PublishError> {
        self.record(event)
    }

    async fn send(
        &self,
        entries: &[(String, KafkaRecord)],
    ) -> Result<Vec<PublishResult>, RequestFailure> {
        let deadline = Instant::now() + self.delivery_timeout;
        // Every record of the wave is enqueued before any report is awaited: librdkafka batches
        // them into as few produce requests as it can.
        let mut enqueued = Vec::with_capacity(entries.len());
        for (_, record) in entries {
            enqueued.push(self.enqueue(record, deadline).await);
        }
        let reports = join_all(enqueued.into_iter().map(|e| async move {
            match e {
                Err(e) => Err(classify(&e, "enqueue")),
                Ok(delivery) => match delivery.await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err((e, _message))) => Err(classify(&e, "delivery")),
                    Err(_canceled) => Err(PublishError::unavailable(
                        "the producer was closed before the delivery was reported",
                    )),
                },
            }
        }))
        .await;
        let fix = self.fix_for_unavailable();
        Ok(reports
            .into_iter()
            .map(|r| {
                r.map_err(|e| match e {
                    PublishError::Unavailable(reason) => {
                        PublishError::unavailable(format!("{reason} ({fix})"))
                    }
                    other => other,
                })
            })
            .collect())
    }
}

#[async_trait]
impl Publisher for KafkaPublisher {
    async fn publish(&self, batch: &[OutboxEvent]) -> Vec<PublishResult> {
        publish_in_waves(self, batch).await
    }

    /// Names an unreachable broker, and a missing topic (for a fixed topic; a template names
    /// topics per event, so only the broker is checked).
    async fn check(&self) -> Result<(), PublishError> {
        self.check_metadata().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_classified_by_scope() {
        let e = |c| KafkaError::MessageProduction(c);
        assert!(classify(&e(RDKafkaErrorCode::MessageSizeTooLarge), "x")
            .reason()
            .contains("x:"));
        assert!(!classify(&e(RDKafkaErrorCode::MessageSizeTooLarge), "x").is_retryable());
        assert!(classify(&e(RDKafkaErrorCode::MessageTimedOut), "x").is_destination_failure());
        assert!(
            classify(&e(RDKafkaErrorCode::UnknownTopicOrPartition), "x").is_destination_failure()
        );
        assert!(matches!(
            classify(&e(RDKafkaErrorCode::Fatal), "x"),
            PublishError::Fatal(_)
        ));
        assert!(matches!(
            classify(&e(RDKafkaErrorCode::InvalidRequiredAcks), "x"),
            PublishError::Retryable(_)
        ));
    }
}
