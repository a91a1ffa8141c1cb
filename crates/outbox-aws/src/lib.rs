//! # outbox-aws: the relay's AWS destinations
//!
//! Publishes outbox events to Amazon SQS (standard and FIFO) and Amazon EventBridge, offloads
//! payloads too large for the broker to S3 (claim check), and builds every client for the `local`
//! (emulator), `dev` or `prod` profile.
//!
//! ## Map of the crate
//! - [`Aws`]: the [`outbox::PublisherFactory`] of the kinds `sqs` and `eventbridge` and the
//!   `[aws]` section; link it with `outbox::Registry::new().with(outbox_aws::Aws)`.
//! - [`config`]: the typed `[aws]` section and AWS destinations, validated ([`AwsConfig`],
//!   [`AwsSettings`], [`Profile`]); AWS limits as defaults ([`config::limits`]).
//! - [`sdk`]: SDK clients with the profile logic ([`sdk_config`], [`AwsClients`]); reusable by
//!   consumers.
//! - [`sqs`], [`eventbridge`]: one destination each; both batch through the core's per-key wave
//!   engine ([`outbox::publisher::batch`]). Routing between destinations is the core's.
//! - [`claim_check`]: S3 offloading and the consumer helper [`resolve_payload`].
//! - [`bootstrap`](mod@bootstrap): creates the local profile's queues, buses, rules, bucket and tables.

#![forbid(unsafe_code)]

pub mod bootstrap;
pub mod claim_check;
pub mod config;
pub mod eventbridge;
pub mod sdk;
pub mod sns;
pub mod sqs;

mod errors;

use async_trait::async_trait;
use outbox::config::Problems;
use outbox::registry::{BuildError, DestinationRef, PublisherFactory};
use outbox::{Config, Publisher};

pub use bootstrap::{bootstrap, bootstrap_with, BootstrapError, BootstrapReport};
pub use claim_check::{resolve_payload, ClaimCheck, ResolveError};
pub use config::{AwsConfig, AwsConfigError, AwsSettings, DestinationConfig, Profile};
pub use eventbridge::EventBridgePublisher;
pub use sdk::{sdk_config, AwsClients};
pub use sns::SnsPublisher;
pub use sqs::SqsPublisher;

use crate::claim_check::Offloader;
use crate::sdk::{effective_endpoint, Service};

/// The AWS publisher kinds: `sqs` (standard and FIFO queues), `sns` (standard and FIFO topics) and
/// `eventbridge` (buses), with the
/// shared `[aws]` section (region, endpoints for the local profile, S3 claim check).
#[derive(Debug, Default, Clone, Copy)]
pub struct Aws;

#[async_trait]
impl PublisherFactory for Aws {
    fn kinds(&self) -> &'static [&'static str] {
        config::KINDS
    }

    fn sections(&self) -> &'static [&'static str] {
        &["aws"]
    }

    fn problems(&self, config: &Config, destinations: &[DestinationRef<'_>]) -> Problems {
        let mut p = Problems::default();
        if let Err(e) = AwsConfig::from_destinations(config, destinations) {
            for problem in e.problems() {
                match problem {
                    AwsConfigError::Value { key, problem, fix } => {
                        p.add(key.clone(), problem.clone(), fix.clone())
                    }
                    other => p.push(outbox::ConfigError::Invalid(other.to_string())),
                }
            }
        }
        p
    }

    async fn build(
        &self,
        config: &Config,
        destinations: &[DestinationRef<'_>],
    ) -> Result<Vec<(String, Box<dyn Publisher>)>, BuildError> {
        let aws = AwsConfig::from_destinations(config, destinations)
            .map_err(|e| outbox::ConfigError::Invalid(e.to_string()))?;
        let clients = AwsClients::new(&aws.settings())
            .await
            .map_err(|e| outbox::ConfigError::Invalid(e.to_string()))?;
        Ok(build_destinations(&aws, &clients))
    }

    fn describe(
        &self,
        _config: &Config,
        destination: &DestinationRef<'_>,
    ) -> Option<serde_json::Value> {
        let d = DestinationConfig::read(destination).ok().flatten()?;
        serde_json::to_value(d).ok()
    }

    fn max_payload_bytes(
        &self,
        config: &Config,
        destination: &DestinationRef<'_>,
    ) -> Option<usize> {
        let large_payloads = config
            .section::<config::AwsSection>("aws")
            .ok()
            .flatten()
            .and_then(|aws| aws.large_payloads);
        if large_payloads.is_some() {
            return None;
        }
        DestinationConfig::read(destination)
            .ok()
            .flatten()
            .map(|d| d.max_payload_bytes())
    }
}

/// The publishers of every destination of a validated configuration, over existing clients.
pub fn build_destinations(
    aws: &AwsConfig,
    clients: &AwsClients,
) -> Vec<(String, Box<dyn Publisher>)> {
    let settings = aws.settings();
    let offloader = aws.aws.large_payloads.clone().map(|lp| Offloader {
        s3: clients.s3.clone(),
        config: lp,
    });
    aws.destinations
        .iter()
        .map(|(name, destination)| {
            let built: Box<dyn Publisher> = match destination {
                DestinationConfig::Sqs(sqs) => Box::new(SqsPublisher::new(
                    name,
                    sqs.clone(),
                    clients.sqs.clone(),
                    offloader.clone(),
                    aws.profile,
                    effective_endpoint(&settings, Service::Sqs),
                )),
                DestinationConfig::Sns(sns) => Box::new(SnsPublisher::new(
                    name,
                    sns.clone(),
                    clients.sns.clone(),
                    offloader.clone(),
                    aws.profile,
                    effective_endpoint(&settings, Service::Sns),
                )),
                DestinationConfig::Eventbridge(eb) => Box::new(EventBridgePublisher::new(
                    name,
                    eb.clone(),
                    clients.eventbridge.clone(),
                    offloader.clone(),
                    aws.profile,
                    effective_endpoint(&settings, Service::EventBridge),
                )),
            };
            (name.clone(), built)
        })
        .collect()
}

/// Builds the configured publisher with the built-in and AWS kinds linked: what
/// `outbox::Registry::new().with(Aws).build(config)` does. It does not contact AWS;
/// [`outbox::Publisher::check`] (run by the relay at start-up) verifies every destination.
pub async fn publisher_from_config(config: &Config) -> Result<Box<dyn Publisher>, BuildError> {
    outbox::Registry::new().with(Aws).build(config).await
}
