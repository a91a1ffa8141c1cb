//! # outbox: a transactional outbox for PostgreSQL, and the relay that publishes it
//!
//! An application writes its domain rows and its events in one transaction ([`Outbox::enqueue`]);
//! a relay claims committed events, publishes them through a [`Publisher`] and records the outcome,
//! so every committed event is delivered at least once, in order per aggregate.
//!
//! ## Map of the crate
//! - [`event`]: [`NewEvent`] (what producers enqueue) and [`OutboxEvent`] (what publishers get).
//! - [`postgres`]: the table contract and migrations, the producer API [`Outbox`], the relay's
//!   store [`PgStore`], and operator queries (status, dead letters).
//! - [`store`]: the [`Store`] / [`Claim`] contract the engine claims and settles through.
//! - [`publisher`]: the [`Publisher`] contract; the per-key batching engine, routing to named
//!   destinations, and the [`Registry`] that broker crates plug their kinds into; the built-in
//!   `stdout`, `file` and `null` kinds.
//! - [`relay`]: the engine ([`Relay`]): embedded ([`Relay::spawn`]), as a service
//!   ([`Relay::run`]) or once per invocation ([`Relay::drain`]).
//! - [`config`]: layered configuration with `local` / `dev` / `prod` profiles.
//! - `logging` (feature `logging`): the log set-up the project's binaries share.
//!
//! The core names no broker: each broker's publisher lives in its own crate and registers its
//! kinds ([`publisher::PublisherFactory`]); the CLI is `outbox-cli`.

pub mod config;
pub mod event;
#[cfg(feature = "logging")]
pub mod logging;
pub mod postgres;
pub mod publisher;
pub mod relay;
pub mod store;

pub use config::{Config, ConfigError, ConfigSource, PublisherSpec};
pub use event::{EventError, EventLimits, Headers, NewEvent, OrderingKey, OutboxEvent};
pub use postgres::{
    connect_from_config, migrate_from_config, relay_from_config, start_relay_from_config,
    StartError,
};
pub use postgres::{
    migrate, DeadLetterPolicy, EnqueueError, MigrateError, MigrateOptions, Outbox, PgStore,
    PgStoreOptions, Schema,
};
pub use publisher::{
    BuildError, FilePublisher, MemoryPublisher, PublishError, PublishResult, Publisher,
    PublisherFactory, Registry, StdoutPublisher,
};
pub use relay::{Backoff, Relay, RelayHandle, RelayOptions, RelaySnapshot};
pub use store::{Claim, Outcome, Store, StoreError};

/// A configuration or connection problem at start-up.
#[derive(Debug, thiserror::Error)]
pub enum ConfigOrConnectError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Connect(#[from] postgres::ConnectError),
}
