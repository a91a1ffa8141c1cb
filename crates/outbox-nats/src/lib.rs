//! # outbox-nats: the relay's NATS JetStream destinations
//!
//! `kind = "nats"` publishes each outbox event to a JetStream subject and waits for the stream's
//! acknowledgement. The event id travels as `Nats-Msg-Id`, so the stream deduplicates an event
//! the relay publishes again (e.g. after a lost acknowledgement) within its `duplicate_window`.
//!
//! ```toml
//! [default.nats]
//! url = "nats://127.0.0.1:4222"
//!
//! [default.destinations.orders]
//! kind = "nats"
//! subject = "outbox.{aggregate_type}.{event_type}"
//! stream = "OUTBOX"          # optional: check() verifies it, bootstrap creates it
//! ```
//!
//! Link it with `outbox::Registry::new().with(outbox_nats::Nats)`.
//!
//! ## Map of the crate
//! - [`Nats`]: the [`outbox::PublisherFactory`] of `kind = "nats"` and the `[nats]` section.
//! - [`config`]: the typed section and destination ([`NatsSection`], [`NatsDestination`]).
//! - [`publisher`]: [`NatsPublisher`], over the core's per-key wave engine.
//! - [`bootstrap()`]: creates the streams of the configured destinations (local profile, tests).

#![forbid(unsafe_code)]

pub mod config;
pub mod publisher;
pub mod template;

use std::sync::Arc;

use async_nats::jetstream;
use async_trait::async_trait;
use outbox::config::Problems;
use outbox::registry::{BuildError, DestinationRef, PublisherFactory};
use outbox::{Config, Publisher};

pub use config::{BodyFormat, NatsConfig, NatsDestination, NatsSection};
pub use publisher::{Connection, NatsPublisher};

/// The NATS JetStream publisher kind (`kind = "nats"`) and its `[nats]` section.
#[derive(Debug, Default, Clone, Copy)]
pub struct Nats;

fn nats_destinations(config: &Config) -> Vec<DestinationRef<'_>> {
    config
        .destination_refs()
        .filter(|d| d.kind == config::KIND)
        .collect()
}

#[async_trait]
impl PublisherFactory for Nats {
    fn kinds(&self) -> &'static [&'static str] {
        &[config::KIND]
    }

    fn sections(&self) -> &'static [&'static str] {
        &[config::SECTION]
    }

    fn problems(&self, config: &Config, destinations: &[DestinationRef<'_>]) -> Problems {
        NatsConfig::read(config, destinations)
            .err()
            .unwrap_or_default()
    }

    async fn build(
        &self,
        config: &Config,
        destinations: &[DestinationRef<'_>],
    ) -> Result<Vec<(String, Box<dyn Publisher>)>, BuildError> {
        let nats = NatsConfig::read(config, destinations).map_err(|p| match p.into_result() {
            Err(e) => BuildError::Config(e),
            Ok(()) => BuildError::Config(outbox::ConfigError::Invalid("[nats]: invalid".into())),
        })?;
        // One connection for every NATS destination: the client multiplexes them.
        let connection = Arc::new(Connection::new(nats.section));
        let mut built: Vec<(String, Box<dyn Publisher>)> = Vec::new();
        for (name, destination) in nats.destinations {
            let d = destinations
                .iter()
                .find(|d| d.name == name)
                .copied()
                .ok_or_else(|| {
                    outbox::ConfigError::Invalid(format!("destination {name} vanished"))
                })?;
            let publisher = NatsPublisher::new(&name, destination, connection.clone())
                .map_err(|reason| BuildError::destination(&d, reason))?;
            built.push((name, Box::new(publisher)));
        }
        Ok(built)
    }

    fn describe(
        &self,
        _config: &Config,
        destination: &DestinationRef<'_>,
    ) -> Option<serde_json::Value> {
        let d = destination.settings::<NatsDestination>().ok()?;
        serde_json::to_value(d).ok()
    }

    fn max_payload_bytes(
        &self,
        _config: &Config,
        destination: &DestinationRef<'_>,
    ) -> Option<usize> {
        destination
            .settings::<NatsDestination>()
            .ok()
            .map(|d| d.max_payload_bytes)
    }
}

/// Why [`bootstrap()`] failed.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    /// The configuration is wrong (every problem is listed).
    #[error(transparent)]
    Config(#[from] outbox::ConfigError),
    /// The server could not be reached.
    #[error("{0}")]
    Unavailable(String),
    /// A stream could not be created.
    #[error(
        "creating JetStream stream `{stream}` for destination `{destination}` failed: {reason}"
    )]
    Stream {
        /// The destination.
        destination: String,
        /// The stream.
        stream: String,
        /// The server's answer.
        reason: String,
    },
}

/// What [`bootstrap()`] did, stream by stream.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BootstrapReport {
    /// `(stream, subjects)` created.
    pub created: Vec<(String, String)>,
    /// Streams that existed already (left as they are).
    pub existing: Vec<String>,
}

/// Creates, for every `kind = "nats"` destination, the JetStream stream that captures its
/// subjects, when it does not exist: named `stream` (else `OUTBOX_<DESTINATION NAME>`), capturing
/// the template's literal prefix and `>` (`outbox.{aggregate_type}.{event_type}` → `outbox.>`),
/// file storage, the server's default `duplicate_window` (2 minutes). Meant for the local profile
/// and tests: production streams (replicas, limits, retention) belong to your infrastructure code.
pub async fn bootstrap(config: &Config) -> Result<BootstrapReport, BootstrapError> {
    let destinations = nats_destinations(config);
    let nats = NatsConfig::read(config, &destinations).map_err(|p| match p.into_result() {
        Err(e) => BootstrapError::Config(e),
        Ok(()) => BootstrapError::Config(outbox::ConfigError::Invalid(
            "no [nats] section: nothing to bootstrap".into(),
        )),
    })?;
    let connection = Connection::new(nats.section);
    let (_, js) = connection
        .get()
        .await
        .map_err(|e| BootstrapError::Unavailable(e.reason().to_owned()))?;
    let timeout = connection.timeout();
    let mut report = BootstrapReport::default();
    for (name, destination) in &nats.destinations {
        let stream = destination.stream_name(name);
        let template = destination
            .template()
            .map_err(outbox::ConfigError::Invalid)?;
        let subjects = template::stream_subject(&template);
        let fail = |reason: String| BootstrapError::Stream {
            destination: name.clone(),
            stream: stream.clone(),
            reason,
        };
        let exists = tokio::time::timeout(timeout, js.get_stream(&stream))
            .await
            .map_err(|_| fail(format!("no answer within {timeout:?}")))?
            .is_ok();
        if exists {
            report.existing.push(stream);
            continue;
        }
        tokio::time::timeout(
            timeout,
            js.create_stream(jetstream::stream::Config {
                name: stream.clone(),
                subjects: vec![subjects.clone()],
                ..Default::default()
            }),
        )
        .await
        .map_err(|_| fail(format!("no answer within {timeout:?}")))?
        .map_err(|e| fail(e.to_string()))?;
        report.created.push((stream, subjects));
    }
    Ok(report)
}
