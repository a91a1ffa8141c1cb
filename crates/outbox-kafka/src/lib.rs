//! # outbox-kafka: the relay's Kafka destinations
//!
//! Publishes outbox events to Apache Kafka (or any Kafka-protocol broker) with `rdkafka` and its
//! bundled librdkafka: record key = the ordering key (so a key's events share a partition),
//! idempotent producer, `acks=all`, the event id and metadata in headers, a topic per destination
//! or from a template.
//!
//! ## Map of the crate
//! - [`Kafka`]: the [`outbox::PublisherFactory`] of `kind = "kafka"` and the `[kafka]` section;
//!   link it with `outbox::Registry::new().with(outbox_kafka::Kafka)`.
//! - [`config`]: the typed `[kafka]` section and destinations, validated ([`KafkaConfig`]).
//! - [`publisher`]: [`KafkaPublisher`], batching through the core's per-key wave engine.
//!
//! ```toml
//! [kafka]
//! brokers = "127.0.0.1:19092"
//! [kafka.properties]           # any librdkafka property, e.g.
//! "linger.ms" = 5
//! [destinations.orders]
//! kind = "kafka"
//! topic = "orders.{event_type}"   # or a fixed topic
//! body = "payload"                # or "envelope"
//! ```

#![forbid(unsafe_code)]

pub mod config;
pub mod publisher;

use std::sync::Arc;

use async_trait::async_trait;
use outbox::config::Problems;
use outbox::registry::{BuildError, DestinationRef, PublisherFactory};
use outbox::{Config, Publisher};
use rdkafka::producer::FutureProducer;

pub use config::{BodyFormat, KafkaConfig, KafkaDestination, KafkaSection};
pub use publisher::KafkaPublisher;

/// The kind `kafka` and its `[kafka]` section (brokers and librdkafka properties).
#[derive(Debug, Default, Clone, Copy)]
pub struct Kafka;

#[async_trait]
impl PublisherFactory for Kafka {
    fn kinds(&self) -> &'static [&'static str] {
        &["kafka"]
    }

    fn sections(&self) -> &'static [&'static str] {
        &["kafka"]
    }

    fn problems(&self, config: &Config, destinations: &[DestinationRef<'_>]) -> Problems {
        let mut p = Problems::default();
        KafkaConfig::read(config, destinations, &mut p);
        p
    }

    async fn build(
        &self,
        config: &Config,
        destinations: &[DestinationRef<'_>],
    ) -> Result<Vec<(String, Box<dyn Publisher>)>, BuildError> {
        let mut problems = Problems::default();
        let kafka = KafkaConfig::read(config, destinations, &mut problems);
        problems.into_result()?;
        let Some(kafka) = kafka else {
            return Ok(Vec::new());
        };
        build_destinations(&kafka, destinations)
    }

    fn describe(
        &self,
        config: &Config,
        destination: &DestinationRef<'_>,
    ) -> Option<serde_json::Value> {
        let d = KafkaDestination::read(destination).ok()?;
        let mut value = serde_json::to_value(d).ok()?;
        if let Some(map) = value.as_object_mut() {
            map.insert("kind".into(), "kafka".into());
            let mut problems = Problems::default();
            if let Some(kafka) = KafkaConfig::read(config, &[], &mut problems) {
                map.insert("cluster".into(), kafka.describe_section());
            }
        }
        Some(value)
    }

    fn max_payload_bytes(
        &self,
        _config: &Config,
        destination: &DestinationRef<'_>,
    ) -> Option<usize> {
        KafkaDestination::read(destination)
            .ok()
            .map(|d| d.max_message_bytes)
    }
}

/// Built destinations: each name with its publisher.
pub type Destinations = Vec<(String, Box<dyn Publisher>)>;

/// The publishers of `destinations` (validated), over one producer shared by all of them.
pub fn build_destinations(
    kafka: &KafkaConfig,
    destinations: &[DestinationRef<'_>],
) -> Result<Destinations, BuildError> {
    let Some(largest) = kafka
        .destinations
        .values()
        .max_by_key(|d| d.max_message_bytes)
    else {
        return Ok(Vec::new());
    };
    // One producer per cluster: its limit is the largest destination's; each destination checks
    // its own limit before enqueueing.
    let producer: FutureProducer = kafka.producer_config(largest).create().map_err(|e| {
        let d = destinations
            .first()
            .copied()
            .expect("a destination exists when one was read");
        // The error names the property, never its value (it may be a credential).
        BuildError::destination(
            &d,
            format!("cannot create the Kafka producer: {}", redact(&e)),
        )
    })?;
    let producer = Arc::new(producer);
    Ok(kafka
        .destinations
        .iter()
        .map(|(name, destination)| {
            let publisher: Box<dyn Publisher> = Box::new(KafkaPublisher::new(
                name,
                destination.clone(),
                producer.clone(),
                &kafka.section.brokers,
                kafka.delivery_timeout(),
            ));
            (name.clone(), publisher)
        })
        .collect())
}

fn redact(e: &rdkafka::error::KafkaError) -> String {
    match e {
        rdkafka::error::KafkaError::ClientConfig(_, description, key, _value) => {
            format!("property {key:?}: {description}")
        }
        other => other.to_string(),
    }
}
