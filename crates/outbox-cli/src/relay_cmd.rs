//! `outbox relay [--drain]`: the start line, signals, the periodic summary, and the exit code that
//! says whether a drain really drained.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{Context, Result};
use outbox::config::{Config, PublisherSpec};
use outbox::logging::LogFormat;
use outbox::postgres::{self, Status};
use outbox::relay::{RelayError, RelayStats};
use sqlx::PgPool;

use crate::signals::Signals;
use crate::UsageError;

/// The relay did not do what was asked of it (exit code 1), said in one line.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct NotDrained(String);

/// How `outbox relay` runs.
pub(crate) struct RelayCommand<'a> {
    pub config: &'a Config,
    pub drain: bool,
    /// How often to log the summary line while running; zero turns it off.
    pub summary_every: Duration,
    /// Where to serve the admin API (`--admin-listen`, else `admin.listen`); none: no listener.
    pub admin_listen: Option<std::net::SocketAddr>,
    pub log_format: LogFormat,
}

impl RelayCommand<'_> {
    pub(crate) async fn run(self) -> Result<()> {
        let config = self.config;
        let publisher = crate::build_publisher(config).await?;
        let pool = crate::connect(config, "outbox-relay").await?;
        if let Some(addr) = self.admin_listen {
            config
                .admin
                .check_listen(addr)
                .map_err(|problem| UsageError(anyhow::anyhow!("--admin-listen: {problem}")))?;
        }
        let relay = outbox::relay_from_config(config, pool.clone(), publisher)
            .await
            .map_err(|e| UsageError(e.into()))?;
        // Bound before the relay starts, so a taken port fails the start instead of a silent
        // relay without its health checks.
        let admin = match self.admin_listen {
            Some(addr) => Some(start_admin(config, addr, pool.clone(), relay.monitor()).await?),
            None => None,
        };
        tracing::info!(
            mode = if self.drain { "drain" } else { "run" },
            profile = %config.profile,
            schema = %config.schema,
            database = %config.database.url.redacted(),
            publisher = %config.publisher,
            destinations = %destinations(config),
            workers = config.relay.workers,
            batch_size = config.relay.batch_size,
            "outbox relay starting"
        );
        // Installed only now: until the relay runs, a signal's default action (terminate) loses
        // nothing, and set-up that waits (a FIFO without a reader) stays interruptible.
        let signals = Signals::install()?;
        let received = Arc::new(OnceLock::new());
        let stop = signals.first(received.clone(), self.log_format);
        let check = |e: RelayError| match e {
            RelayError::PublisherCheck(_) => anyhow::Error::new(UsageError(e.into())),
            e => anyhow::Error::new(e),
        };
        if self.drain {
            let result = relay.drain_until(stop).await;
            if let Err(e @ RelayError::PublisherCheck(_)) = result {
                return Err(check(e));
            }
            let left = postgres::status(&pool, &config.schema).await;
            let report = match result {
                Ok(report) => report,
                Err(e) => {
                    let left =
                        left.map_or_else(|_| String::new(), |s| format!(" ({})", left_text(&s)));
                    return Err(check(e).context(format!("the outbox was not drained{left}")));
                }
            };
            report.log("drain finished");
            let left = left.context("reading what the drain left (outbox status)")?;
            return drain_verdict(&left, received.get().copied());
        }
        let summary = (!self.summary_every.is_zero()).then(|| {
            tokio::spawn(periodic_summary(
                relay.stats(),
                pool.clone(),
                config.schema.clone(),
                self.summary_every,
            ))
        });
        let result = relay.run(stop).await;
        if let Some(task) = summary {
            task.abort();
        }
        if let Some(task) = admin {
            task.abort();
        }
        // The relay logged its counters as it stopped.
        result.map_err(check)?;
        Ok(())
    }
}

/// Starts the admin listener (metrics, health, admin API, console) in the background.
async fn start_admin(
    config: &Config,
    addr: std::net::SocketAddr,
    pool: PgPool,
    relay: std::sync::Arc<dyn outbox::RelayMonitor>,
) -> Result<tokio::task::JoinHandle<()>> {
    let metrics = outbox_admin::prometheus().context("starting the admin listener")?;
    // Installed only now: the relay's info gauge was set before there was a recorder.
    outbox::metrics::relay_info(config.profile.as_str(), config.schema.as_str());
    let state = outbox_admin::AdminState::new(
        pool,
        config.schema.clone(),
        Some(relay),
        outbox_admin::AdminSettings::from_config(&config.admin),
        Some(metrics),
    );
    let listener = outbox_admin::bind(addr).await?;
    let local = listener.local_addr().unwrap_or(addr);
    tracing::info!(
        address = %local,
        mutations = if config.admin.token.is_some() { "enabled (bearer token)" } else { "disabled (no admin.token)" },
        "admin listener: http://{local}/ (console), /metrics, /health/live, /health/ready, /api"
    );
    Ok(tokio::spawn(async move {
        let router = outbox_admin::router(state);
        if let Err(e) = outbox_admin::serve(listener, router, std::future::pending()).await {
            tracing::error!(error = %e, "the admin listener stopped");
        }
    }))
}

/// Exit 0 only when the drain left nothing it could have published: no event waiting out a
/// backoff or for a destination that is down, none dead (nor waiting behind one), and (after a
/// signal) nothing pending at all.
fn drain_verdict(left: &Status, signal: Option<&str>) -> Result<()> {
    if let Some(signal) = signal {
        if left.pending > 0 {
            return Err(NotDrained(format!(
                "the drain was interrupted by {signal} before the outbox was drained: {}",
                left_text(left)
            ))
            .into());
        }
    }
    if left.retrying > 0 || left.held > 0 || left.blocked > 0 || left.dead > 0 {
        return Err(NotDrained(format!(
            "the outbox was not drained: {}; see `outbox status` and `outbox dead list`",
            left_text(left)
        ))
        .into());
    }
    Ok(())
}

fn left_text(s: &Status) -> String {
    format!(
        "{} pending left ({} retrying after a failed attempt, {} held for a destination that is down, \
         {} waiting behind an earlier event of their key), {} dead",
        s.pending, s.retrying, s.held, s.blocked, s.dead
    )
}

/// Where the events go, for the start line: the configured destinations (`name:kind`), or the
/// built-in publisher's output.
fn destinations(config: &Config) -> String {
    match &config.publisher {
        PublisherSpec::Destinations => config
            .destinations
            .iter()
            .map(|(name, d)| format!("{name}:{}", d.kind))
            .collect::<Vec<_>>()
            .join(","),
        PublisherSpec::Stdout => "standard output".to_owned(),
        PublisherSpec::File(path) => path.display().to_string(),
        PublisherSpec::Null => "none (events are counted and discarded)".to_owned(),
    }
}

/// Every `every`, one line with what the relay did since the last line and the backlog, when
/// anything changed: a quiet relay stays quiet, a busy or stuck one says so.
async fn periodic_summary(
    stats: Arc<RelayStats>,
    pool: PgPool,
    schema: outbox::Schema,
    every: Duration,
) {
    let mut last = stats.snapshot();
    let mut last_backlog = None;
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let now = stats.snapshot();
        let backlog = match postgres::status(&pool, &schema).await {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::debug!(error = %e, "summary: could not read the backlog");
                None
            }
        };
        let counts = backlog.as_ref().map(|s| (s.pending, s.retrying, s.dead));
        if now == last && counts == last_backlog {
            continue;
        }
        let b = backlog.as_ref();
        tracing::info!(
            published = now.published - last.published,
            retried = now.retried - last.retried,
            dead = now.dead - last.dead,
            backlog_pending = b.map(|s| s.pending),
            backlog_retrying = b.map(|s| s.retrying),
            backlog_dead = b.map(|s| s.dead),
            oldest_pending_age_seconds = b.map(|s| s.oldest_pending_age_seconds),
            interval_seconds = every.as_secs(),
            "relay summary"
        );
        last = now;
        last_backlog = counts;
    }
}

/// `--summary-interval`: a duration (`60s`, `5m`), `0` for none, at least one second otherwise.
pub(crate) fn parse_summary_interval(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| format!("{s:?} is not a duration ({e}); use e.g. 60s or 5m, or 0 for none"))?;
    if !d.is_zero() && d < Duration::from_secs(1) {
        return Err(format!(
            "{s:?} is too short: use at least 1s, or 0 for none"
        ));
    }
    Ok(d)
}
