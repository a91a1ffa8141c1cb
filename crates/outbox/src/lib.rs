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
//! - [`metrics`]: the names of the relay's metrics (recorded through the `metrics` facade).
//! - [`trace`]: the W3C trace context events carry; with the `otel` feature, captured at enqueue
//!   and linked from the relay's publish span.
//! - `logging` (feature `logging`): the log set-up the project's binaries share.
//!
//! The core names no broker: each broker's publisher lives in its own crate and registers its
//! kinds ([`registry::PublisherFactory`]); the CLI is `outbox-cli`.
//!
//! ## Example
//!
//! A business row and its event in one transaction, and the relay embedded in the application,
//! publishing to standard output. Besides `outbox`, an application depends on `sqlx` (with the
//! `postgres` and `runtime-tokio` features) and `tokio` (`macros`, `rt-multi-thread`).
//!
//! ```no_run
//! use outbox::{Config, ConfigSource, NewEvent, Outbox};
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     // outbox.toml if present, OUTBOX_* variables and DATABASE_URL; every problem at once.
//!     let config = Config::load(&ConfigSource::from_env())?;
//!     let pool = outbox::connect_from_config(&config, "orders").await?;
//!     // Creates or upgrades outbox_event, as `outbox migrate` does; safe on every start.
//!     outbox::migrate_from_config(&mut *pool.acquire().await?, &config).await?;
//!     sqlx::query("CREATE TABLE IF NOT EXISTS orders (id text PRIMARY KEY)")
//!         .execute(&pool)
//!         .await?;
//!
//!     // The publisher kinds linked here: stdout, file, null (+ .with(outbox_aws::Aws), ...).
//!     let publisher = outbox::Registry::new().build(&config).await?;
//!     let relay = outbox::start_relay_from_config(&config, pool.clone(), publisher).await?;
//!
//!     let outbox = Outbox::from_config(&config);
//!     let mut tx = pool.begin().await?;
//!     sqlx::query("INSERT INTO orders (id) VALUES ($1)")
//!         .bind("o-1")
//!         .execute(&mut *tx)
//!         .await?;
//!     let event = NewEvent::new("order", "o-1", "OrderPlaced")
//!         .payload(&serde_json::json!({"order_id": "o-1", "total_cents": 1250}))?;
//!     outbox.enqueue(&mut tx, event).await?;
//!     tx.commit().await?; // the event exists if and only if the order does
//!
//!     if let Some(relay) = relay {
//!         relay.stop().await?; // publishes and settles the batch in flight
//!     }
//!     Ok(())
//! }
//! ```

#![forbid(unsafe_code)]

pub mod config;
pub mod event;
#[cfg(feature = "logging")]
pub mod logging;
pub mod metrics;
pub mod postgres;
pub mod publisher;
pub mod registry;
pub mod relay;
pub mod setup;
pub mod store;
pub mod trace;

pub use config::{Config, ConfigError, ConfigSource, PublisherSpec};
pub use event::{EventError, EventLimits, Headers, NewEvent, OrderingKey, OutboxEvent};
pub use postgres::{
    migrate, DeadLetterPolicy, EnqueueError, MigrateError, MigrateOptions, Outbox, PgStore,
    PgStoreOptions, Schema,
};
pub use publisher::{
    FilePublisher, MemoryPublisher, PublishError, PublishResult, Publisher, StdoutPublisher,
};
pub use registry::{BuildError, Builtin, DestinationRef, PublisherFactory, Registry};
pub use relay::{
    Backoff, DestinationStatus, Relay, RelayHandle, RelayHealth, RelayMonitor, RelayOptions,
    RelaySnapshot,
};
pub use setup::{
    connect_from_config, migrate_from_config, relay_from_config, start_relay_from_config,
    StartError,
};
pub use store::{Backlog, Claim, Outcome, Store, StoreError};

// The crate's README (its page on crates.io) is compiled as a doc test, so its example stays true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

/// A configuration or connection problem at start-up.
#[derive(Debug, thiserror::Error)]
pub enum ConfigOrConnectError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Connect(#[from] postgres::ConnectError),
}
