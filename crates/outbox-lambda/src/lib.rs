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

use std::time::{Duration, Instant};

use outbox::postgres::{self, PgStore};
use outbox::relay::RelaySnapshot;
use outbox::{Config, ConfigSource, Publisher, Relay};
use serde::Serialize;

/// Why an invocation could not drain.
#[derive(Debug, thiserror::Error)]
pub enum LambdaError {
    #[error("configuration: {0}")]
    Config(#[from] outbox::ConfigError),
    #[error(transparent)]
    Connect(#[from] outbox::ConfigOrConnectError),
    #[error("AWS configuration: {0}")]
    Aws(#[from] outbox_aws::AwsConfigError),
    #[error("publisher: {0}")]
    Publisher(String),
    #[error("relay setup: {0}")]
    Setup(#[from] postgres::SetupError),
    #[error("relay task failed: {0}")]
    Task(String),
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

/// The relay of one Lambda execution environment: reused across warm invocations.
pub struct LambdaRelay {
    relay: Relay<PgStore, Box<dyn Publisher>>,
    pool: sqlx::PgPool,
    schema: outbox::Schema,
    workers: usize,
}

impl LambdaRelay {
    /// Connects, builds the configured publisher (normally `aws`), checks that its destinations
    /// exist and that the schema is migrated.
    pub async fn from_config(config: &Config) -> Result<Self, LambdaError> {
        let publisher: Box<dyn Publisher> = match outbox::publisher::builtin(&config.publisher)
            .await
            .map_err(|e| LambdaError::Publisher(e.reason().to_owned()))?
        {
            Some(builtin) => builtin,
            None => Box::new(outbox_aws::publisher_from_config(config).await?),
        };
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
            workers: config.relay.workers.max(1),
        })
    }

    /// Drains until nothing deliverable is left (no time budget).
    pub async fn drain_once(&self) -> Result<DrainReport, LambdaError> {
        self.drain_until(None).await
    }

    /// Drains until nothing deliverable is left or `deadline` passes; a batch in progress at the
    /// deadline finishes (so leave a margin of one `relay.publish_timeout` before the Lambda
    /// timeout).
    pub async fn drain_until(&self, deadline: Option<Instant>) -> Result<DrainReport, LambdaError> {
        let started = Instant::now();
        let before = self.relay.stats().snapshot();
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..self.workers {
            let relay = self.relay.clone();
            tasks.spawn(async move {
                let mut store_failures = 0u32;
                loop {
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return true;
                    }
                    match relay.run_once().await {
                        Ok(report) if report.claimed == 0 => return false,
                        Ok(_) => store_failures = 0,
                        Err(e) => {
                            store_failures += 1;
                            if store_failures > 5 {
                                tracing::error!(error = %e, "giving up this invocation after repeated store errors");
                                return false;
                            }
                            tokio::time::sleep(Duration::from_millis(100 << store_failures)).await;
                        }
                    }
                }
            });
        }
        let mut budget_exhausted = false;
        while let Some(joined) = tasks.join_next().await {
            budget_exhausted |= joined.map_err(|e| LambdaError::Task(e.to_string()))?;
        }
        let after = self.relay.stats().snapshot();
        let status = postgres::status(&self.pool, &self.schema).await?;
        let d = diff(&after, &before);
        Ok(DrainReport {
            published: d.published,
            retried: d.retried,
            dead: d.dead,
            batches: d.batches,
            claims_lost: d.claims_lost,
            store_errors: d.store_errors,
            backlog: status.pending,
            budget_exhausted,
            elapsed_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        })
    }
}

fn diff(after: &RelaySnapshot, before: &RelaySnapshot) -> RelaySnapshot {
    RelaySnapshot {
        batches: after.batches - before.batches,
        published: after.published - before.published,
        retried: after.retried - before.retried,
        deferred: after.deferred - before.deferred,
        dead: after.dead - before.dead,
        claims_lost: after.claims_lost - before.claims_lost,
        store_errors: after.store_errors - before.store_errors,
    }
}

/// One invocation from scratch: set up, drain, report.
pub async fn drain_once(config: &Config) -> Result<DrainReport, LambdaError> {
    LambdaRelay::from_config(config).await?.drain_once().await
}
