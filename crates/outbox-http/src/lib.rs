//! # outbox-http: the relay's HTTP webhook destinations
//!
//! `kind = "webhook"` POSTs each outbox event (or, with `mode = "batch"`, a JSON array of events)
//! to a URL, signed the [Standard Webhooks](https://www.standardwebhooks.com) way when a `secret`
//! is set, and counts it published when the receiver answers 2xx.
//!
//! ```toml
//! [default.destinations.partner]
//! kind = "webhook"
//! url = "https://hooks.example.com/outbox/{event_type}"
//! secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"   # optional: webhook-signature
//! body = "envelope"          # payload (default) | envelope | cloudevents | cloudevents-binary
//! mode = "single"            # or "batch": a JSON array of envelopes / CloudEvents per request
//! timeout = "5s"
//! [default.destinations.partner.headers]
//! Authorization = "Bearer ..."   # never printed
//! ```
//!
//! Link it with `outbox::Registry::new().with(outbox_http::Webhook)`.
//!
//! ## Map of the crate
//! - [`Webhook`]: the [`outbox::PublisherFactory`] of `kind = "webhook"`.
//! - [`config`]: the typed destination ([`WebhookDestination`]) and its validation.
//! - [`publisher`]: [`WebhookPublisher`], over the core's per-key wave engine: the requests, the
//!   signature ([`publisher::sign`]), the classification of answers, `Retry-After`.

#![forbid(unsafe_code)]

pub mod config;
pub mod publisher;
mod template;

use async_trait::async_trait;
use outbox::config::Problems;
use outbox::registry::{BuildError, DestinationRef, PublisherFactory};
use outbox::{Config, Publisher};

pub use config::{BodyFormat, Mode, WebhookConfig, WebhookDestination};
pub use publisher::{WebhookError, WebhookPublisher};
pub use template::Template;

/// The HTTP webhook publisher kind (`kind = "webhook"`).
#[derive(Debug, Default, Clone, Copy)]
pub struct Webhook;

#[async_trait]
impl PublisherFactory for Webhook {
    fn kinds(&self) -> &'static [&'static str] {
        &[config::KIND]
    }

    fn problems(&self, config: &Config, destinations: &[DestinationRef<'_>]) -> Problems {
        WebhookConfig::read(config, destinations)
            .err()
            .unwrap_or_default()
    }

    async fn build(
        &self,
        config: &Config,
        destinations: &[DestinationRef<'_>],
    ) -> Result<Vec<(String, Box<dyn Publisher>)>, BuildError> {
        let webhooks =
            WebhookConfig::read(config, destinations).map_err(|p| match p.into_result() {
                Err(e) => BuildError::Config(e),
                Ok(()) => BuildError::Config(outbox::ConfigError::Invalid(
                    "webhook destinations: invalid".into(),
                )),
            })?;
        let mut built: Vec<(String, Box<dyn Publisher>)> = Vec::new();
        for (name, destination) in webhooks.destinations {
            let publisher = WebhookPublisher::new(&name, destination).map_err(|e| {
                match destinations.iter().find(|d| d.name == name) {
                    Some(d) => BuildError::destination(d, e.to_string()),
                    None => BuildError::Config(outbox::ConfigError::Invalid(e.to_string())),
                }
            })?;
            built.push((name, Box::new(publisher)));
        }
        Ok(built)
    }

    fn describe(
        &self,
        _config: &Config,
        destination: &DestinationRef<'_>,
    ) -> Option<serde_json::Value> {
        let d = destination.settings::<WebhookDestination>().ok()?;
        let mut value = serde_json::to_value(d).ok()?;
        if let Some(object) = value.as_object_mut() {
            object.insert("kind".into(), config::KIND.into());
        }
        Some(value)
    }

    fn max_payload_bytes(
        &self,
        _config: &Config,
        destination: &DestinationRef<'_>,
    ) -> Option<usize> {
        destination
            .settings::<WebhookDestination>()
            .ok()
            .map(|d| d.max_body_bytes)
    }
}
