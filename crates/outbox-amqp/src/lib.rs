//! # outbox-amqp: the relay's RabbitMQ destinations
//!
//! `kind = "rabbitmq"` publishes each outbox event as a persistent, `mandatory` AMQP 0-9-1
//! message and waits for the broker's publisher confirm. `message_id` is the event id; a message
//! no queue is bound for is the event's permanent failure (dead-lettered with the reason).
//!
//! ```toml
//! [default.rabbitmq]
//! url = "amqp://guest:guest@127.0.0.1:5672/%2f"
//!
//! [default.destinations.orders]
//! kind = "rabbitmq"
//! exchange = "orders"
//! routing_key = "{aggregate_type}.{event_type}"
//! ```
//!
//! Link it with `outbox::Registry::new().with(outbox_amqp::RabbitMq)`.
//!
//! ## Map of the crate
//! - [`RabbitMq`]: the [`outbox::PublisherFactory`] of `kind = "rabbitmq"` and `[rabbitmq]`.
//! - [`config`]: the typed section and destination ([`RabbitSection`], [`RabbitDestination`]).
//! - [`publisher`]: [`RabbitPublisher`], over the core's per-key wave engine.

#![forbid(unsafe_code)]

pub mod config;
pub mod publisher;

use std::sync::Arc;

use async_trait::async_trait;
use outbox::config::Problems;
use outbox::registry::{BuildError, DestinationRef, PublisherFactory};
use outbox::{Config, Publisher};

pub use config::{BodyFormat, RabbitConfig, RabbitDestination, RabbitSection};
pub use publisher::{connection_properties, Connection, RabbitPublisher};

/// The RabbitMQ publisher kind (`kind = "rabbitmq"`) and its `[rabbitmq]` section.
#[derive(Debug, Default, Clone, Copy)]
pub struct RabbitMq;

#[async_trait]
impl PublisherFactory for RabbitMq {
    fn kinds(&self) -> &'static [&'static str] {
        &[config::KIND]
    }

    fn sections(&self) -> &'static [&'static str] {
        &[config::SECTION]
    }

    fn problems(&self, config: &Config, destinations: &[DestinationRef<'_>]) -> Problems {
        RabbitConfig::read(config, destinations)
            .err()
            .unwrap_or_default()
    }

    async fn build(
        &self,
        config: &Config,
        destinations: &[DestinationRef<'_>],
    ) -> Result<Vec<(String, Box<dyn Publisher>)>, BuildError> {
        let rabbit =
            RabbitConfig::read(config, destinations).map_err(|p| match p.into_result() {
                Err(e) => BuildError::Config(e),
                Ok(()) => {
                    BuildError::Config(outbox::ConfigError::Invalid("[rabbitmq]: invalid".into()))
                }
            })?;
        // One connection for every RabbitMQ destination; each destination has its own channel.
        let connection = Arc::new(Connection::new(rabbit.section));
        let mut built: Vec<(String, Box<dyn Publisher>)> = Vec::new();
        for (name, destination) in rabbit.destinations {
            let publisher = RabbitPublisher::new(&name, destination, connection.clone())
                .map_err(outbox::ConfigError::Invalid)?;
            built.push((name, Box::new(publisher)));
        }
        Ok(built)
    }

    fn describe(
        &self,
        _config: &Config,
        destination: &DestinationRef<'_>,
    ) -> Option<serde_json::Value> {
        let d = destination.settings::<RabbitDestination>().ok()?;
        serde_json::to_value(d).ok()
    }

    fn max_payload_bytes(
        &self,
        _config: &Config,
        destination: &DestinationRef<'_>,
    ) -> Option<usize> {
        destination
            .settings::<RabbitDestination>()
            .ok()
            .map(|d| d.max_payload_bytes)
    }
}
