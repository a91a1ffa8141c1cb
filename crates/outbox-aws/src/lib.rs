//! # outbox-aws: the relay's AWS destinations
//!
//! Publishes outbox events to Amazon SQS (standard and FIFO) and Amazon EventBridge, routes each
//! event to a named destination, offloads payloads too large for the broker to S3 (claim check),
//! and builds every client for the `local` (emulator), `dev` or `prod` profile.
//!
//! ## Map of the crate
//! - [`config`]: the typed `[aws]`, `[destinations]` and `[[routes]]` sections, validated
//!   ([`AwsConfig`], [`AwsSettings`], [`Profile`]); AWS limits as defaults ([`config::limits`]).
//! - [`sdk`]: SDK clients with the profile logic ([`sdk_config`], [`AwsClients`]); reusable by
//!   consumers.
//! - [`router`]: [`RoutingPublisher`], the [`outbox::Publisher`] the relay uses with `publisher = "aws"`.
//! - [`sqs`], [`eventbridge`]: one destination each; both batch through the wave engine in
//!   `batch` (per-key order: one event per key per request).
//! - [`claim_check`]: S3 offloading and the consumer helper [`resolve_payload`].
//! - [`bootstrap`](mod@bootstrap): creates the local profile's queues, buses, rules, bucket and tables.
//!
//! ## Entry points for the CLI
//! - [`publisher_from_config`] builds the publisher; the relay calls its `check` at start-up.
//! - [`bootstrap()`] backs `outbox aws bootstrap`.

pub mod bootstrap;
pub mod claim_check;
pub mod config;
pub mod eventbridge;
pub mod router;
pub mod sdk;
pub mod sqs;

mod batch;
mod errors;

pub use bootstrap::{bootstrap, bootstrap_with, BootstrapError, BootstrapReport};
pub use claim_check::{resolve_payload, ClaimCheck, ResolveError};
pub use config::{max_event_bytes, AwsConfig, AwsConfigError, AwsSettings, Profile};
pub use router::{Destination, RoutingPublisher};
pub use sdk::{sdk_config, AwsClients};

/// Builds the routing publisher for `publisher = "aws"` from the loaded configuration: validates
/// `[aws]`, `[destinations]` and `[[routes]]`, and creates the SDK clients for the profile. It does
/// not contact AWS; [`outbox::Publisher::check`] (run by the relay at start-up) verifies that every
/// destination exists.
pub async fn publisher_from_config(
    config: &outbox::Config,
) -> Result<RoutingPublisher, AwsConfigError> {
    RoutingPublisher::from_config(config).await
}
