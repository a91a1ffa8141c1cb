//! # outbox-lambda: the relay as an AWS Lambda function
//!
//! An EventBridge schedule (e.g. `rate(1 minute)`) invokes the function; each invocation drains the
//! outbox once (claims, publishes and settles batches until nothing deliverable is left or the
//! invocation's time budget runs out) and returns a [`DrainReport`]. The same engine, store and
//! publishers as the embedded relay and `outbox relay`; the configuration is the same `outbox.toml`
//! / `OUTBOX_*` environment.
//!
//! ## Map of the crate
//! - [`LambdaRelay`]: built once per cold start (pool, publisher checked, relay), then
//!   [`LambdaRelay::drain_once`] / [`LambdaRelay::drain_until`] per invocation.
//! - [`drain_once`]: the one-call form for a single invocation.
//! - `src/main.rs` (feature `lambda`): the binary on the official `lambda_runtime`.
//!
//! Build and deploy: see this crate's README.md.

#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use outbox::postgres::{self, PgStore};
use outbox::relay::{RelayError, RelaySnapshot};
use outbox::{Config, ConfigSource, Publisher, Relay};
use serde::Serialize;

/// Why an invocation could not drain.
#[derive(Debug, thiserror::Error)]
pub enum LambdaError {
    #[error("configuration: {0}")]
    Config(#[from] outbox::ConfigError),
    #[error(transparent)]
    Connect(#[from] outbox::ConfigOrConnectError),
    #[error("publisher configuration: {0}")]
    Build(#[from] outbox::BuildError),
    #[error("publisher: {0}")]
    Publisher(String),
    #[error("relay setup: {0}")]
    Setup(#[from] postgres::SetupError),
    #[error("relay: {0}")]
    Relay(#[from] RelayError),
    #[error("reading the backlog: {0}")]
    Status(#[from] sqlx::Error),
}

/// What one invocation did (the function's response, as JSON).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct DrainReport {
    pub published: u64,
    pub retried: u64,
    pub dead: u64,
    pub batches: u64,
    pub claims_lost: u64,
    pub store_errors: u64,
    /// Events still pending afterwards (in backoff, claimed by another relay, or past the budget).
    pub backlog: i64,
    /// The invocation stopped because its time budget ran out, not because the outbox was empty.
    pub budget_exhausted: bool,
    pub elapsed_ms: u64,
}

/// Loads the configuration from the environment, as the CLI does (`OUTBOX_CONFIG`,
/// `OUTBOX_PROFILE`, `OUTBOX_*`, `DATABASE_URL`).
pub fn load_config() -> Result<Config, LambdaError> {
    Ok(Config::load(&ConfigSource::from_env())?)
}

/// The publisher kinds the Lambda links: the built-in ones and AWS.
pub fn registry() -> outbox::Registry {
    outbox::Registry::new().with(outbox_aws::Aws)
}

/// The relay of one Lambda execution environment: reused across warm invocations.
pub struct LambdaRelay {
    relay: Relay<PgStore, Box<dyn Publisher>>,
    pool: sqlx::PgPool,
    schema: outbox::Schema,
}

impl LambdaRelay {
    /// Connects, builds the configured publisher (normally AWS destinations), checks that its
    /// destinations exist and that the schema is migrated.
    pub async fn from_config(config: &Config) -> Result<Self, LambdaError> {
        let publisher = registry().build(config).await?;
        publisher
            .check()
            .await
            .map_err(|e| LambdaError::Publisher(e.reason().to_owned()))?;
        let pool = outbox::connect_from_config(config, "outbox-lambda").await?;
        let relay = outbox::relay_from_config(config, pool.clone(), publisher).await?;
        Ok(Self {
            relay,
            pool,
            schema: config.schema.clone(),
        })
    }

    /// Drains until nothing deliverable is left (no time budget).
    pub async fn drain_once(&self) -> Result<DrainReport, LambdaError> {
        self.drain_until(None).await
    }

    /// Drains until nothing deliverable is left or `deadline` passes; a batch in progress at the
    /// deadline finishes (so leave a margin of one `relay.publish_timeout` before the Lambda
    /// timeout). The core's [`Relay::drain_until`], so the Lambda drains exactly as `outbox relay
    /// --drain` does; repeated store errors fail the invocation.
    pub async fn drain_until(&self, deadline: Option<Instant>) -> Result<DrainReport, LambdaError> {
        let started = Instant::now();
        let exhausted = AtomicBool::new(false);
        let report = if deadline.is_some_and(|d| d <= started) {
            exhausted.store(true, Ordering::Relaxed);
            RelaySnapshot::default()
        } else {
            let stop = async {
                match deadline {
                    Some(d) => {
                        tokio::time::sleep_until(d.into()).await;
                        exhausted.store(true, Ordering::Relaxed);
                    }
                    None => std::future::pending().await,
                }
            };
            self.relay.drain_until(stop).await?
        };
        let status = postgres::status(&self.pool, &self.schema).await?;
        Ok(DrainReport {
            published: report.published,
            retried: report.retried,
            dead: report.dead,
            batches: report.batches,
            claims_lost: report.claims_lost,
            store_errors: report.store_errors,
            backlog: status.pending,
            budget_exhausted: exhausted.load(Ordering::Relaxed),
            elapsed_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        })
    }
}

/// One invocation from scratch: set up, drain, report.
pub async fn drain_once(config: &Config) -> Result<DrainReport, LambdaError> {
    LambdaRelay::from_config(config).await?.drain_once().await
}
