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
//! - [`publisher`]: the [`Publisher`] contract, and the `stdout`, `file` and in-memory publishers.
//! - [`relay`]: the engine ([`Relay`]): embedded ([`Relay::spawn`]), as a service
//!   ([`Relay::run`]) or once per invocation ([`Relay::drain`]).
//! - [`config`]: layered configuration with `local` / `dev` / `prod` profiles.
//! - [`metrics`]: the names of the relay's metrics (recorded through the `metrics` facade).
//! - `logging` (feature `logging`): the log set-up the project's binaries share.
//!
//! Broker publishers live in their own crates (`outbox-aws`), the CLI in `outbox-cli`.

pub mod config;
pub mod event;
#[cfg(feature = "logging")]
pub mod logging;
pub mod metrics;
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
    FilePublisher, MemoryPublisher, PublishError, PublishResult, Publisher, StdoutPublisher,
};
pub use relay::{
    Backoff, DestinationStatus, Relay, RelayHandle, RelayHealth, RelayMonitor, RelayOptions,
    RelaySnapshot,
};
pub use store::{Backlog, Claim, Outcome, Store, StoreError};

/// A configuration or connection problem at start-up.
#[derive(Debug, thiserror::Error)]
pub enum ConfigOrConnectError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Connect(#[from] postgres::ConnectError),
}
