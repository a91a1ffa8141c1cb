//! The relay engine: claim a batch, publish it, settle the outcomes; repeat.
//!
//! It knows only the [`Store`] and [`Publisher`] contracts. The same engine runs embedded in an
//! application ([`Relay::spawn`], stopped through the [`RelayHandle`]), as the `outbox relay`
//! service ([`Relay::run`] with a signal future), or once per invocation ([`Relay::drain`], e.g.
//! from a Lambda function).
//!
//! Each worker loops: claim up to `batch_size` events; publish them bounded by
//! `publish_timeout`; turn every result into an [`Outcome`] and settle them in one round trip. A
//! full batch is followed at once by the next claim, so a backlog drains without sleeping; an empty
//! claim waits for a wake-up or the poll interval.
//!
//! Failures are judged by what they belong to ([`PublishError`]):
//! - a **destination** failure (the broker is down, slow, throttling, missing) charges no attempt:
//!   the destination is marked down, its events are deferred (held in the store, their keys wait
//!   behind them), and it is probed with its own backoff (`relay.backoff_base` doubling up to
//!   `relay.destination_backoff_max`) by releasing one held event; the first success releases the
//!   rest at once. Other destinations keep flowing.
//! - an **event** failure counts an attempt: retry with backoff, dead after `max_attempts`, or dead
//!   at once when permanent.
//! - a **fatal** publisher failure gives the batch back and stops the relay.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use futures_util::FutureExt;
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::event::{OrderingKey, OutboxEvent};
use crate::metrics as m;
use crate::publisher::{PublishError, PublishResult, Publisher};
use crate::store::{Backlog, Claim, Outcome, Store, StoreError};

/// Exponential backoff with jitter between delivery attempts of one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Delay after the first failed attempt (before jitter).
    pub base: Duration,
    /// Largest delay.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(500),
            max: Duration::from_secs(300),
        }
    }
}

impl Backoff {
    /// The delay after `failed_attempts` failures (1 for the first): `base * 2^(n-1)` capped at
    /// `max`, of which the upper half is random ("equal jitter"), so retries of many events that
    /// failed together spread out instead of hitting the broker at once.
    pub fn delay(&self, failed_attempts: u32) -> Duration {
        let exp = failed_attempts.saturating_sub(1).min(32);
        let nominal = self.base.saturating_mul(1u32 << exp.min(31)).min(self.max);
        let half = nominal / 2;
        half + half.mul_f64(fastrand::f64())
    }
}

/// How the relay engine works; see the configuration reference in the README for defaults.
#[derive(Debug, Clone)]
pub struct RelayOptions {
    pub batch_size: usize,
    /// Concurrent claim-publish-settle loops in this process.
    pub workers: usize,
    /// Longest wait between claims when no wake-up arrives.
    pub poll_interval: Duration,
    /// Bound of one publish call; past it, the batch counts as failed (retryable).
    pub publish_timeout: Duration,
    /// Attempts before a retryable failure becomes a dead letter.
    pub max_attempts: u32,
    pub backoff: Backoff,
    /// Probes of a destination that is down: `backoff.base` doubling up to this.
    pub destination_backoff_max: Duration,
    /// How often published events past the retention are removed.
    pub purge_interval: Duration,
    /// While an event was found within `active_period`, an idle worker polls every
    /// `active_poll_interval` rather than waiting for a wake-up (see `worker`).
    pub active_poll_interval: Duration,
    pub active_period: Duration,
    /// How often the backlog is read for the backlog metrics (a query, never per claim).
    pub backlog_interval: Duration,
}

impl Default for RelayOptions {
    fn default() -> Self {
        Self {
            batch_size: 100,
            workers: 1,
            poll_interval: Duration::from_secs(1),
            publish_timeout: Duration::from_secs(10),
            max_attempts: 10,
            backoff: Backoff::default(),
            destination_backoff_max: Duration::from_secs(10),
            purge_interval: Duration::from_secs(60),
            active_poll_interval: Duration::from_millis(2),
            active_period: Duration::from_millis(500),
            backlog_interval: Duration::from_secs(5),
        }
    }
}

/// Counters of a relay's work since it started.
#[derive(Debug, Default)]
pub struct RelayStats {
    pub batches: AtomicU64,
    pub published: AtomicU64,
    pub retried: AtomicU64,
    /// Events held back because their destination was unavailable (no attempt counted).
    pub deferred: AtomicU64,
    pub dead: AtomicU64,
    /// Claims that were lost before they were settled (their events are claimed again).
    pub claims_lost: AtomicU64,
    pub store_errors: AtomicU64,
}

/// A copy of [`RelayStats`] at one moment.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct RelaySnapshot {
    pub batches: u64,
    pub published: u64,
    pub retried: u64,
    pub deferred: u64,
    pub dead: u64,
    pub claims_lost: u64,
    pub store_errors: u64,
}

impl RelaySnapshot {
    /// Logs the counters as fields (for people and log shippers alike) with `message`.
    pub fn log(&self, message: &str) {
        tracing::info!(
            published = self.published,
            retried = self.retried,
            held = self.deferred,
            dead = self.dead,
            batches = self.batches,
            claims_lost = self.claims_lost,
            store_errors = self.store_errors,
            "{message}"
        );
    }
}

impl RelayStats {
    pub fn snapshot(&self) -> RelaySnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        RelaySnapshot {
            batches: get(&self.batches),
            published: get(&self.published),
            retried: get(&self.retried),
            deferred: get(&self.deferred),
            dead: get(&self.dead),
            claims_lost: get(&self.claims_lost),
            store_errors: get(&self.store_errors),
        }
    }
}

/// What one claim-publish-settle cycle did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BatchReport {
    pub claimed: usize,
    pub published: u64,
    pub retried: u64,
    pub deferred: u64,
    pub dead: u64,
}

/// Why a relay stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("publisher check failed: {0}")]
    PublisherCheck(PublishError),
    #[error("relay task failed: {0}")]
    Task(String),
    /// The publisher returned [`PublishError::Fatal`]: the claimed batch was given back and the
    /// relay stopped, since nothing more can be published by this process.
    #[error("the publisher cannot continue: {0}")]
    PublisherFatal(String),
    /// A drain's store calls failed this many times in a row (the database is unreachable or
    /// refuses the relay); what was published before is settled, the rest stays pending.
    #[error("gave up after {failures} store errors in a row: {last}")]
    StoreFailed { failures: u32, last: String },
}

/// The relay engine over a store and a publisher.
pub struct Relay<S: Store, P: Publisher> {
    inner: Arc<Inner<S, P>>,
}

struct Inner<S, P> {
    store: S,
    publisher: P,
    options: RelayOptions,
    stats: Arc<RelayStats>,
    /// Wakes idle sibling workers after a full batch: more work is likely waiting.
    more_work: Notify,
    /// When any worker last found events (milliseconds since `started`), for the active polling.
    last_found_ms: AtomicU64,
    started: Instant,
    /// The health of every destination that failed since the relay started.
    destinations: Mutex<HashMap<String, DestinationHealth>>,
    /// Set when a publisher failed fatally: every loop stops and `run` returns the reason.
    fatal: Mutex<Option<String>>,
    halt: watch::Sender<bool>,
    logs: LogBudgets,
    /// What the health checks and consoles read ([`Relay::health`]).
    progress: Progress,
}

/// The relay's progress as health checks see it: cheap to update (atomics, one short lock per
/// batch), read only when asked.
struct Progress {
    running: AtomicBool,
    /// When a claim with events was last settled, in milliseconds since `started`; `NEVER` before.
    last_settle_ms: AtomicU64,
    /// When a claim last returned (with or without events), likewise.
    last_claim_ms: AtomicU64,
    /// Counts per destination since the relay started.
    destinations: Mutex<HashMap<String, DestinationCounts>>,
    /// The last backlog reading and when it was taken.
    backlog: Mutex<Option<(Instant, Backlog)>>,
}

const NEVER: u64 = u64::MAX;

impl Default for Progress {
    fn default() -> Self {
        Self {
            running: AtomicBool::new(false),
            last_settle_ms: AtomicU64::new(NEVER),
            last_claim_ms: AtomicU64::new(NEVER),
            destinations: Mutex::default(),
            backlog: Mutex::default(),
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct DestinationCounts {
    published: u64,
    failed_event: u64,
    failed_destination: u64,
    dead: u64,
}

/// What a health check or a console needs to know about a relay, at one moment
/// ([`Relay::health`], [`RelayHandle::health`]).
#[derive(Debug, Clone, serde::Serialize)]
pub struct RelayHealth {
    /// Whether the relay's loops run (false before `run`, after it returned, and after a fatal
    /// publisher failure).
    pub running: bool,
    /// Seconds since the relay was created.
    pub uptime_seconds: f64,
    /// Seconds since a claim with events was last settled; `None` when none was yet.
    pub last_settle_age_seconds: Option<f64>,
    /// Seconds since a claim last returned (empty or not); `None` when none did yet.
    pub last_claim_age_seconds: Option<f64>,
    /// Why the publisher stopped the relay, if it did.
    pub fatal: Option<String>,
    /// The relay's counters since it started.
    pub counters: RelaySnapshot,
    /// Every destination this relay published to, or knows to be down.
    pub destinations: Vec<DestinationStatus>,
    /// The last backlog reading (every `backlog_interval`), if the store reports one.
    pub backlog: Option<Backlog>,
    /// Seconds since that reading.
    pub backlog_reading_age_seconds: Option<f64>,
}

/// One destination as the relay sees it.
#[derive(Debug, Clone, serde::Serialize, PartialEq)]
pub struct DestinationStatus {
    pub name: String,
    /// False from its first unavailable result until a publish to it succeeds again.
    pub up: bool,
    /// Seconds it has been down; `None` while up.
    pub down_for_seconds: Option<f64>,
    /// The reason it is down; `None` while up.
    pub last_error: Option<String>,
    /// Events the broker acknowledged since the relay started.
    pub published: u64,
    /// Failures of events themselves (an attempt charged).
    pub failed_event: u64,
    /// Events that failed because the destination was unavailable (no attempt charged).
    pub failed_destination: u64,
    /// Events dead-lettered.
    pub dead: u64,
}

/// Reads a relay's health without knowing its store or publisher types, so an admin server (or
/// an application's own health endpoint) can hold any relay.
pub trait RelayMonitor: Send + Sync + 'static {
    /// The relay's health now.
    fn health(&self) -> RelayHealth;
}

/// A destination that failed with [`PublishError::Unavailable`] and is not back yet.
#[derive(Debug, Clone)]
struct DestinationHealth {
    since: Instant,
    /// Failed probes (and the first failure) in a row; drives the probe backoff.
    failures: u32,
    /// Before this, events for the destination are deferred without being sent.
    next_probe: Instant,
    last_error: String,
}

impl<S: Store, P: Publisher> Clone for Relay<S, P> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<S: Store, P: Publisher> Relay<S, P> {
    pub fn new(store: S, publisher: P, mut options: RelayOptions) -> Self {
        options.batch_size = options.batch_size.max(1);
        options.workers = options.workers.max(1);
        options.max_attempts = options.max_attempts.max(1);
        Self {
            inner: Arc::new(Inner {
                store,
                publisher,
                options,
                stats: Arc::default(),
                more_work: Notify::new(),
                last_found_ms: AtomicU64::new(u64::MAX),
                started: Instant::now(),
                destinations: Mutex::default(),
                fatal: Mutex::default(),
                halt: watch::channel(false).0,
                logs: LogBudgets::default(),
                progress: Progress::default(),
            }),
        }
    }

    pub fn stats(&self) -> Arc<RelayStats> {
        self.inner.stats.clone()
    }

    pub fn store(&self) -> &S {
        &self.inner.store
    }

    /// The destinations that are down now, with how long and why (for status and health checks).
    pub fn destinations_down(&self) -> Vec<(String, Duration, String)> {
        lock(&self.inner.destinations)
            .iter()
            .map(|(name, h)| (name.clone(), h.since.elapsed(), h.last_error.clone()))
            .collect()
    }

    /// The relay's health now: whether it runs, when it last settled, its destinations (see
    /// [`RelayHealth`]). Cheap: no query.
    pub fn health(&self) -> RelayHealth {
        let inner = &self.inner;
        let p = &inner.progress;
        let now_ms = self.now_ms();
        let age = |at: u64| (at != NEVER).then(|| now_ms.saturating_sub(at) as f64 / 1000.0);
        let counts = lock(&p.destinations).clone();
        let down = lock(&inner.destinations).clone();
        let mut names: Vec<&String> = counts.keys().chain(down.keys()).collect();
        names.sort();
        names.dedup();
        let destinations = names
            .into_iter()
            .map(|name| {
                let c = counts.get(name).copied().unwrap_or_default();
                let d = down.get(name);
                DestinationStatus {
                    name: name.clone(),
                    up: d.is_none(),
                    down_for_seconds: d.map(|d| d.since.elapsed().as_secs_f64()),
                    last_error: d.map(|d| d.last_error.clone()),
                    published: c.published,
                    failed_event: c.failed_event,
                    failed_destination: c.failed_destination,
                    dead: c.dead,
                }
            })
            .collect();
        let backlog = *lock(&p.backlog);
        RelayHealth {
            running: p.running.load(Ordering::Relaxed) && !*inner.halt.borrow(),
            uptime_seconds: inner.started.elapsed().as_secs_f64(),
            last_settle_age_seconds: age(p.last_settle_ms.load(Ordering::Relaxed)),
            last_claim_age_seconds: age(p.last_claim_ms.load(Ordering::Relaxed)),
            fatal: self.fatal(),
            counters: inner.stats.snapshot(),
            destinations,
            backlog: backlog.map(|(_, b)| b),
            backlog_reading_age_seconds: backlog.map(|(at, _)| at.elapsed().as_secs_f64()),
        }
    }

    /// A [`RelayMonitor`] of this relay, for an admin server.
    pub fn monitor(&self) -> Arc<dyn RelayMonitor> {
        Arc::new(self.clone())
    }

    /// Milliseconds since the relay was created (the clock of [`Progress`]).
    fn now_ms(&self) -> u64 {
        u64::try_from(self.inner.started.elapsed().as_millis()).unwrap_or(NEVER - 1)
    }

    /// Runs until `shutdown` completes, then lets every in-flight batch finish and returns.
    /// Checks the publisher first, so a misconfigured destination fails before anything is claimed.
    /// Returns [`RelayError::PublisherFatal`] when the publisher can no longer work.
    pub async fn run(
        &self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<RelaySnapshot, RelayError> {
        self.inner
            .publisher
            .check()
            .await
            .map_err(RelayError::PublisherCheck)?;
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        for worker in 0..self.inner.options.workers {
            let relay = self.clone();
            let stop = stop_rx.clone();
            tasks.spawn(async move { relay.worker(worker, stop).await });
        }
        {
            let relay = self.clone();
            let stop = stop_rx.clone();
            tasks.spawn(async move { relay.maintainer(stop).await });
        }
        self.inner.progress.running.store(true, Ordering::Relaxed);
        tracing::info!(
            workers = self.inner.options.workers,
            batch_size = self.inner.options.batch_size,
            "relay started"
        );
        let mut halted = self.inner.halt.subscribe();
        tokio::select! {
            _ = shutdown => tracing::info!("relay stopping: finishing in-flight batches"),
            _ = halted.wait_for(|h| *h) => {}
        }
        let _ = stop_tx.send(true);
        let mut failure = None;
        while let Some(joined) = tasks.join_next().await {
            if let Err(e) = joined {
                failure = Some(RelayError::Task(e.to_string()));
            }
        }
        self.inner.progress.running.store(false, Ordering::Relaxed);
        let s = self.inner.stats.snapshot();
        s.log("relay stopped");
        if let Some(reason) = self.fatal() {
            return Err(RelayError::PublisherFatal(reason));
        }
        failure.map_or(Ok(s), Err)
    }

    /// The reason the publisher failed fatally, if it did.
    fn fatal(&self) -> Option<String> {
        lock(&self.inner.fatal).clone()
    }

    /// Checks the publisher's destinations ([`Publisher::check`]), as `run` does first.
    pub async fn check(&self) -> Result<(), RelayError> {
        self.inner
            .publisher
            .check()
            .await
            .map_err(RelayError::PublisherCheck)
    }

    /// Starts the relay as a background task (the embedded mode). Stop it with
    /// [`RelayHandle::stop`]; dropping the handle stops it too.
    pub fn spawn(&self) -> RelayHandle {
        let (stop_tx, mut stop_rx) = watch::channel(false);
        let relay = self.clone();
        let task = tokio::spawn(async move {
            relay
                .run(async move {
                    let _ = stop_rx.wait_for(|stop| *stop).await;
                })
                .await
        });
        RelayHandle {
            stop: stop_tx,
            task: Some(task),
            stats: self.inner.stats.clone(),
            monitor: self.monitor(),
        }
    }

    /// Publishes until no deliverable event is left, with all workers, then returns. Events in
    /// backoff are left for later. See [`Relay::drain_until`].
    pub async fn drain(&self) -> Result<RelaySnapshot, RelayError> {
        self.drain_until(std::future::pending()).await
    }

    /// Publishes until no deliverable event is left or `stop` completes, whichever is first, and
    /// returns what this drain did. After `stop`, no worker claims again; a batch in flight is
    /// published and settled first (a signal handler, or a Lambda's deadline minus one
    /// `publish_timeout`). A `stop` that is already complete claims nothing.
    ///
    /// Fails with [`RelayError::StoreFailed`] when a worker's store calls keep failing (the
    /// database is gone): the caller must not report the outbox as drained.
    pub async fn drain_until(
        &self,
        stop: impl Future<Output = ()> + Send,
    ) -> Result<RelaySnapshot, RelayError> {
        let mut stop = std::pin::pin!(stop);
        if (&mut stop).now_or_never().is_some() {
            return Ok(RelaySnapshot::default());
        }
        self.inner
            .publisher
            .check()
            .await
            .map_err(RelayError::PublisherCheck)?;
        let before = self.inner.stats.snapshot();
        self.inner.progress.running.store(true, Ordering::Relaxed);
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        for _ in 0..self.inner.options.workers {
            let relay = self.clone();
            let stop = stop_rx.clone();
            tasks.spawn(async move { relay.drain_worker(stop).await });
        }
        let mut stopping = false;
        let mut failure = None;
        loop {
            tokio::select! {
                joined = tasks.join_next() => match joined {
                    None => break,
                    Some(Ok(Ok(()))) => {}
                    Some(Ok(Err(e))) => {
                        failure.get_or_insert(e);
                    }
                    Some(Err(e)) => {
                        failure.get_or_insert(RelayError::Task(e.to_string()));
                    }
                },
                () = &mut stop, if !stopping => {
                    stopping = true;
                    let _ = stop_tx.send(true);
                }
            }
        }
        self.inner.progress.running.store(false, Ordering::Relaxed);
        if let Some(e) = failure {
            return Err(e);
        }
        if let Some(reason) = self.fatal() {
            return Err(RelayError::PublisherFatal(reason));
        }
        let after = self.inner.stats.snapshot();
        Ok(RelaySnapshot {
            batches: after.batches - before.batches,
            published: after.published - before.published,
            retried: after.retried - before.retried,
            deferred: after.deferred - before.deferred,
            dead: after.dead - before.dead,
            claims_lost: after.claims_lost - before.claims_lost,
            store_errors: after.store_errors - before.store_errors,
        })
    }

    /// One worker of a drain: claims until a claim comes back empty or `stop` is set.
    async fn drain_worker(&self, mut stop: watch::Receiver<bool>) -> Result<(), RelayError> {
        /// Consecutive store failures after which the drain gives up (about 3 s of pauses).
        const MAX_STORE_FAILURES: u32 = 5;
        let mut store_failures = 0u32;
        loop {
            if *stop.borrow() {
                return Ok(());
            }
            match self.run_once().await {
                Ok(report) if report.claimed == 0 => return Ok(()),
                Ok(_) => store_failures = 0,
                Err(e) => {
                    store_failures += 1;
                    if store_failures > MAX_STORE_FAILURES {
                        tracing::error!(error = %e, failures = store_failures, "drain gives up after repeated store errors");
                        return Err(RelayError::StoreFailed {
                            failures: store_failures,
                            last: e.to_string(),
                        });
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(error_pause(store_failures)) => {}
                        _ = stop.wait_for(|s| *s) => return Ok(()),
                    }
                }
            }
        }
    }

    /// One claim-publish-settle cycle. After a fatal publisher failure it claims nothing.
    pub async fn run_once(&self) -> Result<BatchReport, StoreError> {
        let inner = &self.inner;
        if *inner.halt.borrow() {
            return Ok(BatchReport::default());
        }
        let result = self.cycle().await;
        match &result {
            Ok(report) if report.claimed > 0 => {
                let stats = &inner.stats;
                stats.batches.fetch_add(1, Ordering::Relaxed);
                stats
                    .published
                    .fetch_add(report.published, Ordering::Relaxed);
                stats.retried.fetch_add(report.retried, Ordering::Relaxed);
                stats.deferred.fetch_add(report.deferred, Ordering::Relaxed);
                stats.dead.fetch_add(report.dead, Ordering::Relaxed);
            }
            Ok(_) => {}
            Err(StoreError::ClaimLost) => {
                inner.stats.claims_lost.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                inner.stats.store_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        result
    }

    async fn cycle(&self) -> Result<BatchReport, StoreError> {
        let inner = &self.inner;
        let started = Instant::now();
        // Debug-level spans: free under the default `info` filter, there for whoever traces.
        let span = tracing::debug_span!(
            "claim",
            limit = inner.options.batch_size,
            claimed = tracing::field::Empty,
            first_id = tracing::field::Empty,
            last_id = tracing::field::Empty
        );
        let claim = inner
            .store
            .claim(inner.options.batch_size)
            .instrument(span.clone())
            .await?;
        ::metrics::histogram!(m::CLAIM_DURATION_SECONDS).record(started.elapsed().as_secs_f64());
        inner
            .progress
            .last_claim_ms
            .store(self.now_ms(), Ordering::Relaxed);
        let claimed = claim.events().len();
        if claimed == 0 {
            claim.release().await?;
            return Ok(BatchReport::default());
        }
        ::metrics::histogram!(m::BATCH_EVENTS).record(claimed as f64);
        let events = claim.events();
        if let (Some(first), Some(last)) = (events.first(), events.last()) {
            span.record("claimed", claimed);
            span.record("first_id", tracing::field::display(first.id));
            span.record("last_id", tracing::field::display(last.id));
        }
        let destinations: Vec<String> = events
            .iter()
            .map(|e| inner.publisher.destination_of(e))
            .collect();
        let results = self.publish_available(events, &destinations).await;
        if let Some(reason) = results.iter().find_map(|r| match r {
            Some(Err(PublishError::Fatal(reason))) => Some(reason.clone()),
            _ => None,
        }) {
            // Nothing of this batch is recorded: it is given back whole, and the relay stops.
            claim.release().await?;
            self.halt_with(reason);
            return Ok(BatchReport::default());
        }
        let (outcomes, recovered, counts) = self.outcomes(events, &destinations, results);
        let settle = tracing::debug_span!(
            "settle",
            events = outcomes.len(),
            published = tracing::field::Empty,
            retried = tracing::field::Empty,
            deferred = tracing::field::Empty,
            dead = tracing::field::Empty
        );
        let report = claim.settle(&outcomes).instrument(settle.clone()).await?;
        settle.record("published", report.published);
        settle.record("retried", report.retried);
        settle.record("deferred", report.deferred);
        settle.record("dead", report.dead);
        inner
            .progress
            .last_settle_ms
            .store(self.now_ms(), Ordering::Relaxed);
        // Counted once settled, like the relay's counters: a lost claim's events come again.
        self.record_counts(counts);
        for destination in recovered {
            self.release_recovered(&destination).await;
        }
        Ok(BatchReport {
            claimed,
            published: report.published,
            retried: report.retried,
            deferred: report.deferred,
            dead: report.dead,
        })
    }

    /// Publishes the events whose destination is up (or due for a probe) and that no earlier
    /// event of their key waits for; the others get `None` (not sent).
    async fn publish_available(
        &self,
        events: &[OutboxEvent],
        destinations: &[String],
    ) -> Vec<Option<PublishResult>> {
        let now = Instant::now();
        let paused: HashSet<&str> = {
            let health = lock(&self.inner.destinations);
            destinations
                .iter()
                .filter(|d| health.get(d.as_str()).is_some_and(|h| now < h.next_probe))
                .map(String::as_str)
                .collect()
        };
        if paused.is_empty() {
            return self
                .timed_publish(events, destinations.iter())
                .await
                .into_iter()
                .map(Some)
                .collect();
        }
        let mut held_keys: HashSet<OrderingKey<'_>> = HashSet::new();
        let send: Vec<bool> = events
            .iter()
            .zip(destinations)
            .map(|(event, destination)| {
                let key = event.ordering_key();
                if held_keys.contains(&key) || paused.contains(destination.as_str()) {
                    held_keys.insert(key);
                    false
                } else {
                    true
                }
            })
            .collect();
        let batch: Vec<OutboxEvent> = events
            .iter()
            .zip(&send)
            .filter(|(_, send)| **send)
            .map(|(e, _)| e.clone())
            .collect();
        let mut sent = if batch.is_empty() {
            Vec::new()
        } else {
            let sent_to = destinations.iter().zip(&send).filter(|(_, s)| **s);
            self.timed_publish(&batch, sent_to.map(|(d, _)| d)).await
        }
        .into_iter();
        send.iter()
            .map(|send| if *send { sent.next() } else { None })
            .collect()
    }

    /// [`Relay::publish`], recording its duration for each destination the batch went to.
    async fn timed_publish(
        &self,
        events: &[OutboxEvent],
        destinations: impl Iterator<Item = &String>,
    ) -> Vec<PublishResult> {
        // Usually one destination per batch; a short list beats hashing.
        let mut seen: Vec<&String> = Vec::new();
        for destination in destinations {
            if !seen.contains(&destination) {
                seen.push(destination);
            }
        }
        // The OpenTelemetry messaging conventions for a batch send: a producer span named after
        // the operation, linked to the context each event was created in (`outbox::trace`).
        let span = tracing::debug_span!(
            "publish",
            otel.name = "publish",
            otel.kind = "producer",
            messaging.operation.type = "send",
            messaging.destination.name = %DisplayList(&seen),
            messaging.batch.message_count = events.len(),
            first_id = tracing::field::Empty,
            last_id = tracing::field::Empty
        );
        if let (Some(first), Some(last)) = (events.first(), events.last()) {
            span.record("first_id", tracing::field::display(first.id));
            span.record("last_id", tracing::field::display(last.id));
        }
        crate::trace::link_events(&span, events);
        let started = Instant::now();
        let results = self.publish(events).instrument(span).await;
        let seconds = started.elapsed().as_secs_f64();
        for destination in seen {
            ::metrics::histogram!(m::PUBLISH_DURATION_SECONDS, "destination" => destination.clone())
                .record(seconds);
        }
        results
    }

    /// Calls the publisher bounded by the publish timeout. A timeout is the destination's failure
    /// (it stalls); a panic or a broken contract fails the batch as retryable (some events may
    /// have been sent: at-least-once).
    async fn publish(&self, events: &[OutboxEvent]) -> Vec<PublishResult> {
        let options = &self.inner.options;
        let call = AssertUnwindSafe(self.inner.publisher.publish(events)).catch_unwind();
        let failure = match tokio::time::timeout(options.publish_timeout, call).await {
            Ok(Ok(results)) if results.len() == events.len() => return results,
            Ok(Ok(results)) => PublishError::retryable(format!(
                "publisher broke its contract: {} results for {} events",
                results.len(),
                events.len()
            )),
            Ok(Err(panic)) => {
                PublishError::retryable(format!("publisher panicked: {}", panic_message(&panic)))
            }
            Err(_) => PublishError::unavailable(format!(
                "publish timed out after {:?} (relay.publish_timeout)",
                options.publish_timeout
            )),
        };
        vec![Err(failure); events.len()]
    }

    /// Turns publish results into outcomes, and updates the destinations' health. Within a key,
    /// only the first event that failed or was held back gets an outcome that changes it; the
    /// later ones were not tried and are given back untouched (they wait behind it). Returns the
    /// destinations that came back in this batch.
    fn outcomes<'d>(
        &self,
        events: &[OutboxEvent],
        destinations: &'d [String],
        results: Vec<Option<PublishResult>>,
    ) -> (
        Vec<Outcome>,
        Vec<String>,
        HashMap<&'d str, DestinationCounts>,
    ) {
        let options = &self.inner.options;
        let now = Instant::now();
        let acked_at = Utc::now();
        let mut counts: HashMap<&'d str, DestinationCounts> = HashMap::new();
        let commit_to_publish = ::metrics::histogram!(m::COMMIT_TO_PUBLISH_SECONDS);
        let mut stopped_keys: HashSet<OrderingKey<'_>> = HashSet::new();
        let mut failed_now: HashMap<&str, String> = HashMap::new();
        let mut succeeded: HashSet<&str> = HashSet::new();
        let hold_until = Utc::now() + to_chrono(options.backoff.max);
        let mut outcomes = Vec::with_capacity(events.len());
        for ((event, destination), result) in events.iter().zip(destinations).zip(results) {
            let key = event.ordering_key();
            let sent = result.is_some();
            let earlier_stopped = stopped_keys.contains(&key);
            let outcome = match result {
                Some(Ok(())) => {
                    if earlier_stopped {
                        tracing::error!(
                            id = %event.id,
                            key = %key,
                            "publisher sent an event after an earlier event of its key failed; \
                             per-key order may be broken at the broker"
                        );
                    }
                    succeeded.insert(destination);
                    let lag = (acked_at - event.created_at)
                        .num_microseconds()
                        .unwrap_or(0);
                    commit_to_publish.record(lag.max(0) as f64 / 1e6);
                    Outcome::Published
                }
                _ if earlier_stopped => Outcome::Untouched,
                None => {
                    stopped_keys.insert(key);
                    let health = lock(&self.inner.destinations);
                    let reason = health
                        .get(destination.as_str())
                        .map_or_else(String::new, |h| h.last_error.clone());
                    Outcome::Deferred {
                        error: format!("destination `{destination}` unavailable: {reason}"),
                        destination: destination.clone(),
                        not_before: hold_until,
                    }
                }
                Some(Err(error)) => {
                    stopped_keys.insert(key);
                    let attempts = u32::try_from(event.attempts).unwrap_or(0) + 1;
                    match error {
                        PublishError::Unavailable(reason) | PublishError::Fatal(reason) => {
                            failed_now
                                .entry(destination)
                                .or_insert_with(|| reason.clone());
                            Outcome::Deferred {
                                error: format!("destination `{destination}` unavailable: {reason}"),
                                destination: destination.clone(),
                                not_before: hold_until,
                            }
                        }
                        PublishError::Permanent(reason) => Outcome::Dead {
                            error: format!("permanent failure: {reason}"),
                        },
                        PublishError::Retryable(reason) if attempts >= options.max_attempts => {
                            Outcome::Dead {
                                error: format!(
                                    "gave up after {attempts} attempts (relay.max_attempts): {reason}"
                                ),
                            }
                        }
                        PublishError::Retryable(reason) => Outcome::Retry {
                            error: reason,
                            not_before: Utc::now() + to_chrono(options.backoff.delay(attempts)),
                        },
                    }
                }
            };
            self.log_outcome(event, destination, &outcome);
            if !matches!(outcome, Outcome::Untouched) {
                let c = counts.entry(destination.as_str()).or_default();
                match &outcome {
                    Outcome::Published => c.published += 1,
                    Outcome::Retry { .. } => c.failed_event += 1,
                    Outcome::Dead { .. } => {
                        c.failed_event += 1;
                        c.dead += 1;
                    }
                    // Only events that were sent and found the destination down failed; the others
                    // were held back unsent.
                    Outcome::Deferred { .. } if sent => c.failed_destination += 1,
                    Outcome::Deferred { .. } | Outcome::Untouched => {}
                }
            }
            outcomes.push(outcome);
        }
        let mut recovered = Vec::new();
        let mut health = lock(&self.inner.destinations);
        for (destination, reason) in failed_now {
            let probe = Backoff {
                base: options.backoff.base,
                max: options.destination_backoff_max,
            };
            match health.get_mut(destination) {
                Some(h) => {
                    h.failures = h.failures.saturating_add(1);
                    h.next_probe = now + probe.delay(h.failures);
                    h.last_error = reason;
                }
                None => {
                    ::metrics::gauge!(m::DESTINATION_UP, "destination" => destination.to_owned())
                        .set(0.0);
                    let next = probe.delay(1);
                    tracing::warn!(
                        destination,
                        error = %reason,
                        probe_in = ?next,
                        "destination unavailable: holding its events (no attempt is counted) and probing it"
                    );
                    health.insert(
                        destination.to_owned(),
                        DestinationHealth {
                            since: now,
                            failures: 1,
                            next_probe: now + next,
                            last_error: reason,
                        },
                    );
                }
            }
        }
        for destination in succeeded {
            if let Some(h) = health.remove(destination) {
                tracing::info!(
                    destination,
                    down_for = ?h.since.elapsed(),
                    "destination is back: releasing its held events"
                );
                recovered.push(destination.to_owned());
            }
        }
        (outcomes, recovered, counts)
    }

    /// Adds a settled batch's counts to the metrics and to the per-destination counts of
    /// [`Relay::health`]: one metrics update per destination and batch, not per event.
    fn record_counts(&self, counts: HashMap<&str, DestinationCounts>) {
        let mut totals = lock(&self.inner.progress.destinations);
        for (destination, c) in counts {
            let label = || destination.to_owned();
            if c.published > 0 {
                ::metrics::counter!(m::EVENTS_PUBLISHED_TOTAL, "destination" => label())
                    .increment(c.published);
                ::metrics::gauge!(m::DESTINATION_UP, "destination" => label()).set(1.0);
            }
            if c.failed_event > 0 {
                ::metrics::counter!(m::EVENTS_FAILED_TOTAL, "destination" => label(), "scope" => "event")
                    .increment(c.failed_event);
            }
            if c.failed_destination > 0 {
                ::metrics::counter!(m::EVENTS_FAILED_TOTAL, "destination" => label(), "scope" => "destination")
                    .increment(c.failed_destination);
            }
            if c.dead > 0 {
                ::metrics::counter!(m::EVENTS_DEAD_TOTAL, "destination" => label())
                    .increment(c.dead);
            }
            let t = totals.entry(destination.to_owned()).or_default();
            t.published += c.published;
            t.failed_event += c.failed_event;
            t.failed_destination += c.failed_destination;
            t.dead += c.dead;
        }
    }

    /// Logs a retry, a deferral or a dead letter with the event's id, key, destination, attempt
    /// and reason; past a budget per interval, only counted (the maintainer logs a summary).
    fn log_outcome(&self, event: &OutboxEvent, destination: &str, outcome: &Outcome) {
        let attempt = event.attempts + 1;
        let key = event.ordering_key();
        match outcome {
            Outcome::Retry { error, not_before } => {
                if self.inner.logs.retry.allow() {
                    tracing::warn!(id = %event.id, %key, destination, attempt, %error, retry_at = %not_before, "event failed; will retry");
                }
            }
            Outcome::Deferred { error, .. } => {
                if self.inner.logs.deferred.allow() {
                    tracing::info!(id = %event.id, %key, destination, %error, "event held until its destination is back (no attempt counted)");
                }
            }
            Outcome::Dead { error } => {
                if self.inner.logs.dead.allow() {
                    match self.inner_dead_policy_blocks() {
                        true => tracing::error!(id = %event.id, %key, destination, attempt, %error,
                            "event dead-lettered; later events of its key wait until it is replayed or deleted"),
                        false => {
                            tracing::error!(id = %event.id, %key, destination, attempt, %error,
                            "event dead-lettered; later events of its key continue (relay.dead_letter = \"continue\"): the key is out of order")
                        }
                    }
                }
            }
            Outcome::Published | Outcome::Untouched => {}
        }
    }

    fn inner_dead_policy_blocks(&self) -> bool {
        self.inner.store.dead_letter_holds_key()
    }

    /// Stops every loop of this relay: the publisher cannot go on.
    fn halt_with(&self, reason: String) {
        let mut fatal = lock(&self.inner.fatal);
        if fatal.is_none() {
            tracing::error!(error = %reason, "the publisher cannot continue; stopping the relay (the batch was given back unpublished)");
            *fatal = Some(reason);
        }
        drop(fatal);
        let _ = self.inner.halt.send(true);
    }

    async fn release_recovered(&self, destination: &str) {
        match self.inner.store.release_held(destination, None).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(destination, released = n, "held events released"),
            // The store's own timer releases them at the latest after relay.backoff_max.
            Err(e) => {
                tracing::warn!(destination, error = %e, "could not release held events; they come back by themselves")
            }
        }
    }

    async fn worker(&self, worker: usize, mut stop: watch::Receiver<bool>) {
        let options = &self.inner.options;
        let mut store_failures = 0u32;
        loop {
            if *stop.borrow() || *self.inner.halt.borrow() {
                return;
            }
            // Taken before the claim: a wake-up that arrives while it runs ends the wait below.
            let mark = self.inner.store.wake_mark();
            match self.run_once().await {
                Ok(report) if report.claimed > 0 => {
                    store_failures = 0;
                    self.mark_found();
                    if report.claimed >= options.batch_size {
                        self.inner.more_work.notify_waiters();
                    }
                    // Claim again at once: there may be more, and an empty claim is cheap.
                    continue;
                }
                Ok(_) => store_failures = 0,
                Err(StoreError::ClaimLost) => {
                    tracing::warn!(
                        worker,
                        "claim lost before it was settled; its events will be published again"
                    );
                    continue;
                }
                Err(e) => {
                    store_failures = store_failures.saturating_add(1);
                    let pause = error_pause(store_failures);
                    tracing::warn!(worker, error = %e, ?pause, "store error; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = stop.wait_for(|s| *s) => return,
                    }
                    continue;
                }
            }
            // While events keep arriving, poll again shortly instead of asking producers to
            // NOTIFY: a NOTIFY serializes commits, so under load producers would pay for every
            // wake-up. Only a relay that found nothing for `active_period` asks for them.
            // One worker polls; the others wait for it to find a full batch (or for the poll
            // interval), without renewing the request for NOTIFY either.
            if self.is_active() {
                let pause = if worker == 0 {
                    options.active_poll_interval
                } else {
                    options.poll_interval
                };
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = self.inner.more_work.notified() => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                continue;
            }
            tokio::select! {
                _ = self.inner.store.wait_for_events(mark, options.poll_interval) => {}
                _ = self.inner.more_work.notified() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }

    fn mark_found(&self) {
        let now = u64::try_from(self.inner.started.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
        self.inner.last_found_ms.store(now, Ordering::Relaxed);
    }

    /// Whether any worker found events within `active_period`.
    fn is_active(&self) -> bool {
        let last = self.inner.last_found_ms.load(Ordering::Relaxed);
        if last == u64::MAX {
            return false;
        }
        let now = u64::try_from(self.inner.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        now.saturating_sub(last)
            < u64::try_from(self.inner.options.active_period.as_millis()).unwrap_or(u64::MAX)
    }

    /// Housekeeping beside the workers: every second (or poll interval, if shorter) the store's
    /// maintenance (expired backoffs come back, later events of blocked keys move out of the
    /// claim's way), probes of the destinations that are down, summaries of what the log budget
    /// left out; every `purge_interval` the retention of published events.
    async fn maintainer(&self, mut stop: watch::Receiver<bool>) {
        let options = &self.inner.options;
        let tick = options.poll_interval.min(MAINTENANCE_TICK);
        let mut last_purge = Instant::now();
        let mut last_adopt: Option<Instant> = None;
        let mut last_backlog: Option<Instant> = None;
        let mut halted = self.inner.halt.subscribe();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(tick) => {}
                _ = stop.wait_for(|s| *s) => return,
                _ = halted.wait_for(|h| *h) => return,
            }
            if let Err(e) = self.inner.store.maintain().await {
                tracing::warn!(error = %e, "relay maintenance failed; will retry");
            }
            if last_adopt.is_none_or(|t| t.elapsed() >= ADOPT_INTERVAL) {
                last_adopt = Some(Instant::now());
                self.adopt_held_destinations().await;
            }
            self.probe_destinations().await;
            if last_backlog.is_none_or(|t| t.elapsed() >= options.backlog_interval) {
                last_backlog = Some(Instant::now());
                self.read_backlog().await;
            }
            self.inner.logs.summarize();
            if last_purge.elapsed() >= options.purge_interval {
                last_purge = Instant::now();
                match self.inner.store.purge_published().await {
                    Ok(0) => {}
                    Ok(n) => tracing::debug!(removed = n, "purged published events past retention"),
                    Err(e) => {
                        tracing::warn!(error = %e, "purging published events failed; will retry")
                    }
                }
            }
        }
    }

    /// Reads the backlog for its gauges and for [`Relay::health`].
    async fn read_backlog(&self) {
        match self.inner.store.backlog().await {
            Ok(Some(backlog)) => {
                m::backlog(&backlog);
                *lock(&self.inner.progress.backlog) = Some((Instant::now(), backlog));
            }
            Ok(None) => {}
            Err(e) => tracing::debug!(error = %e, "could not read the backlog for the metrics"),
        }
    }

    /// Destinations with held events that this relay does not know to be down (another process
    /// held them, or this one restarted) are probed like its own.
    async fn adopt_held_destinations(&self) {
        let held = match self.inner.store.held_destinations().await {
            Ok(held) => held,
            Err(e) => {
                tracing::debug!(error = %e, "could not list held destinations");
                return;
            }
        };
        let now = Instant::now();
        let mut health = lock(&self.inner.destinations);
        for destination in held {
            if !health.contains_key(&destination) {
                ::metrics::gauge!(m::DESTINATION_UP, "destination" => destination.clone()).set(0.0);
            }
            health
                .entry(destination)
                .or_insert_with(|| DestinationHealth {
                    since: now,
                    failures: 0,
                    next_probe: now,
                    last_error: "events were held for it before this relay looked".into(),
                });
        }
    }

    /// A destination whose probe is due gets one of its held events released: the claim that
    /// takes it sends it (the probe). Success releases the rest; failure backs the probe off.
    async fn probe_destinations(&self) {
        let now = Instant::now();
        let due: Vec<String> = lock(&self.inner.destinations)
            .iter()
            .filter(|(_, h)| h.next_probe <= now)
            .map(|(name, _)| name.clone())
            .collect();
        for destination in due {
            match self.inner.store.release_held(&destination, Some(1)).await {
                Ok(0) => {
                    // Nothing held any more (released elsewhere): forget it unless it fails again.
                    let mut health = lock(&self.inner.destinations);
                    if health.get(&destination).is_some_and(|h| h.failures == 0) {
                        health.remove(&destination);
                    }
                }
                Ok(_) => {
                    let mut health = lock(&self.inner.destinations);
                    if let Some(h) = health.get_mut(&destination) {
                        // Until the probe's own result comes, do not release another one.
                        let probe = Backoff {
                            base: self.inner.options.backoff.base,
                            max: self.inner.options.destination_backoff_max,
                        };
                        h.next_probe = now + probe.delay(h.failures.max(1));
                    }
                }
                Err(e) => {
                    tracing::debug!(destination, error = %e, "could not release a probe event")
                }
            }
        }
    }
}

/// Destination names joined with `,` for a span field, formatted only when the span is recorded.
struct DisplayList<'a>(&'a [&'a String]);

impl std::fmt::Display for DisplayList<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, name) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            f.write_str(name)?;
        }
        Ok(())
    }
}

/// How often the maintainer runs at most (the poll interval, when shorter).
const MAINTENANCE_TICK: Duration = Duration::from_secs(1);
/// How often the maintainer looks for destinations that other relays held events for.
const ADOPT_INTERVAL: Duration = Duration::from_secs(10);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves consistent data (plain maps and options).
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn to_chrono(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

/// Per-kind log budgets: a burst of failures (an outage of a busy destination) logs the first
/// lines of each interval one by one and then a count, not a line per event.
#[derive(Default)]
struct LogBudgets {
    retry: LogBudget,
    deferred: LogBudget,
    dead: LogBudget,
}

impl LogBudgets {
    fn summarize(&self) {
        for (what, budget) in [
            ("retries", &self.retry),
            ("held events", &self.deferred),
            ("dead letters", &self.dead),
        ] {
            if let Some((suppressed, window)) = budget.roll() {
                tracing::warn!(
                    suppressed,
                    ?window,
                    "{suppressed} more {what} in the last {window:?} were not logged one by one"
                );
            }
        }
    }
}

/// Lines allowed per window, and what was suppressed in the current one.
struct LogBudget {
    window_start: Mutex<Instant>,
    logged: AtomicU64,
    suppressed: AtomicU64,
}

impl Default for LogBudget {
    fn default() -> Self {
        Self {
            window_start: Mutex::new(Instant::now()),
            logged: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }
}

const LOG_LINES_PER_WINDOW: u64 = 20;
const LOG_WINDOW: Duration = Duration::from_secs(10);

impl LogBudget {
    fn allow(&self) -> bool {
        if self.logged.fetch_add(1, Ordering::Relaxed) < LOG_LINES_PER_WINDOW {
            true
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            false
        }
    }

    /// Starts a new window when the current one is over; returns what it suppressed.
    fn roll(&self) -> Option<(u64, Duration)> {
        let mut start = lock(&self.window_start);
        let window = start.elapsed();
        if window < LOG_WINDOW {
            return None;
        }
        *start = Instant::now();
        self.logged.store(0, Ordering::Relaxed);
        let suppressed = self.suppressed.swap(0, Ordering::Relaxed);
        (suppressed > 0).then_some((suppressed, window))
    }
}

fn error_pause(failures: u32) -> Duration {
    Backoff {
        base: Duration::from_millis(100),
        max: Duration::from_secs(5),
    }
    .delay(failures)
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_owned()
    }
}

/// Controls a relay started with [`Relay::spawn`].
pub struct RelayHandle {
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<Result<RelaySnapshot, RelayError>>>,
    stats: Arc<RelayStats>,
    monitor: Arc<dyn RelayMonitor>,
}

impl<S: Store, P: Publisher> RelayMonitor for Relay<S, P> {
    fn health(&self) -> RelayHealth {
        Relay::health(self)
    }
}

impl RelayMonitor for RelayHandle {
    fn health(&self) -> RelayHealth {
        self.monitor.health()
    }
}

impl RelayHandle {
    /// Asks the relay to stop, waits for in-flight batches to finish, and returns its counters.
    pub async fn stop(mut self) -> Result<RelaySnapshot, RelayError> {
        let _ = self.stop.send(true);
        match self.task.take() {
            Some(task) => task.await.map_err(|e| RelayError::Task(e.to_string()))?,
            None => Ok(self.stats.snapshot()),
        }
    }

    pub fn stats(&self) -> RelaySnapshot {
        self.stats.snapshot()
    }

    /// The relay's health now (see [`Relay::health`]).
    pub fn health(&self) -> RelayHealth {
        self.monitor.health()
    }

    /// A [`RelayMonitor`] of the relay, for an admin server; it outlives the handle.
    pub fn monitor(&self) -> Arc<dyn RelayMonitor> {
        self.monitor.clone()
    }

    /// Whether the relay stopped on its own (a failed publisher check or a crashed task).
    pub fn is_finished(&self) -> bool {
        self.task.as_ref().is_none_or(|t| t.is_finished())
    }
}

impl Drop for RelayHandle {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_exponentially_within_jitter_and_cap() {
        let b = Backoff {
            base: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        for _ in 0..50 {
            let d1 = b.delay(1);
            assert!(d1 >= Duration::from_millis(50) && d1 <= Duration::from_millis(100));
            let d3 = b.delay(3);
            assert!(d3 >= Duration::from_millis(200) && d3 <= Duration::from_millis(400));
            let d20 = b.delay(20);
            assert!(d20 >= Duration::from_millis(500) && d20 <= Duration::from_secs(1));
        }
        assert!(b.delay(u32::MAX) <= Duration::from_secs(1));
    }
}
