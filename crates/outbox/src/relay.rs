//! The relay engine: claim a batch, publish it, settle the outcomes; repeat.
//!
//! It knows only the [`Store`] and [`Publisher`] contracts. The same engine runs embedded in an
//! application ([`Relay::spawn`], stopped through the [`RelayHandle`]), as the `outbox relay`
//! service ([`Relay::run`] with a signal future), or once per invocation ([`Relay::drain`], e.g.
//! from a Lambda function).
//!
//! Each worker loops: claim up to `batch_size` events; publish them bounded by
//! `publish_timeout`; turn every result into an [`Outcome`] (published, retry with backoff, or
//! dead) and settle them in one round trip. A full batch is followed at once by the next claim, so a
//! backlog drains without sleeping; an empty claim waits for a wake-up or the poll interval.

use std::collections::HashSet;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use futures_util::FutureExt;
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;

use crate::event::{OrderingKey, OutboxEvent};
use crate::publisher::{PublishError, PublishResult, Publisher};
use crate::store::{Claim, Outcome, Store, StoreError};

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
    /// How often published events past the retention are removed.
    pub purge_interval: Duration,
    /// While an event was found within `active_period`, an idle worker polls every
    /// `active_poll_interval` rather than waiting for a wake-up (see `worker`).
    pub active_poll_interval: Duration,
    pub active_period: Duration,
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
            purge_interval: Duration::from_secs(60),
            active_poll_interval: Duration::from_millis(2),
            active_period: Duration::from_millis(500),
        }
    }
}

/// Counters of a relay's work since it started.
#[derive(Debug, Default)]
pub struct RelayStats {
    pub batches: AtomicU64,
    pub published: AtomicU64,
    pub retried: AtomicU64,
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
    pub dead: u64,
    pub claims_lost: u64,
    pub store_errors: u64,
}

impl RelayStats {
    pub fn snapshot(&self) -> RelaySnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        RelaySnapshot {
            batches: get(&self.batches),
            published: get(&self.published),
            retried: get(&self.retried),
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
            }),
        }
    }

    pub fn stats(&self) -> Arc<RelayStats> {
        self.inner.stats.clone()
    }

    pub fn store(&self) -> &S {
        &self.inner.store
    }

    /// Runs until `shutdown` completes, then lets every in-flight batch finish and returns.
    /// Checks the publisher first, so a misconfigured destination fails before anything is claimed.
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
            tasks.spawn(async move { relay.purger(stop).await });
        }
        tracing::info!(
            workers = self.inner.options.workers,
            batch_size = self.inner.options.batch_size,
            "relay started"
        );
        shutdown.await;
        tracing::info!("relay stopping: finishing in-flight batches");
        let _ = stop_tx.send(true);
        let mut failure = None;
        while let Some(joined) = tasks.join_next().await {
            if let Err(e) = joined {
                failure = Some(RelayError::Task(e.to_string()));
            }
        }
        let snapshot = self.inner.stats.snapshot();
        tracing::info!(?snapshot, "relay stopped");
        failure.map_or(Ok(snapshot), Err)
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
        if let Some(e) = failure {
            return Err(e);
        }
        let after = self.inner.stats.snapshot();
        Ok(RelaySnapshot {
            batches: after.batches - before.batches,
            published: after.published - before.published,
            retried: after.retried - before.retried,
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

    /// One claim-publish-settle cycle.
    pub async fn run_once(&self) -> Result<BatchReport, StoreError> {
        let inner = &self.inner;
        let result = self.cycle().await;
        match &result {
            Ok(report) if report.claimed > 0 => {
                inner.stats.batches.fetch_add(1, Ordering::Relaxed);
                inner
                    .stats
                    .published
                    .fetch_add(report.published, Ordering::Relaxed);
                inner
                    .stats
                    .retried
                    .fetch_add(report.retried, Ordering::Relaxed);
                inner.stats.dead.fetch_add(report.dead, Ordering::Relaxed);
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
        let claim = inner.store.claim(inner.options.batch_size).await?;
        let claimed = claim.events().len();
        if claimed == 0 {
            claim.release().await?;
            return Ok(BatchReport::default());
        }
        let results = self.publish(claim.events()).await;
        let outcomes = self.outcomes(claim.events(), results);
        let report = claim.settle(&outcomes).await?;
        if report.dead > 0 {
            tracing::warn!(dead = report.dead, "events moved to the dead-letter state");
        }
        Ok(BatchReport {
            claimed,
            published: report.published,
            retried: report.retried,
            dead: report.dead,
        })
    }

    /// Calls the publisher bounded by the publish timeout; a timeout or a panic fails the whole
    /// batch as retryable (some events may have been sent: at-least-once).
    async fn publish(&self, events: &[OutboxEvent]) -> Vec<PublishResult> {
        let options = &self.inner.options;
        let call = AssertUnwindSafe(self.inner.publisher.publish(events)).catch_unwind();
        let failure = match tokio::time::timeout(options.publish_timeout, call).await {
            Ok(Ok(results)) if results.len() == events.len() => return results,
            Ok(Ok(results)) => format!(
                "publisher broke its contract: {} results for {} events",
                results.len(),
                events.len()
            ),
            Ok(Err(panic)) => format!("publisher panicked: {}", panic_message(&panic)),
            Err(_) => format!(
                "publish timed out after {:?} (relay.publish_timeout)",
                options.publish_timeout
            ),
        };
        tracing::warn!(events = events.len(), "{failure}");
        vec![Err(PublishError::retryable(failure)); events.len()]
    }

    /// Turns publish results into outcomes. Within a key, only the first failed event counts an
    /// attempt; the later ones were not really tried and are given back untouched (they stay
    /// behind it through the claim's per-key check).
    fn outcomes(&self, events: &[OutboxEvent], results: Vec<PublishResult>) -> Vec<Outcome> {
        let options = &self.inner.options;
        let mut failed_keys: HashSet<OrderingKey<'_>> = HashSet::new();
        events
            .iter()
            .zip(results)
            .map(|(event, result)| {
                let key = event.ordering_key();
                let earlier_failed = failed_keys.contains(&key);
                match result {
                    Ok(()) => {
                        if earlier_failed {
                            tracing::error!(
                                id = %event.id,
                                "publisher sent an event after an earlier event of its key failed; \
                                 per-key order may be broken at the broker"
                            );
                        }
                        Outcome::Published
                    }
                    Err(_) if earlier_failed => Outcome::Untouched,
                    Err(error) => {
                        failed_keys.insert(key);
                        let attempts = u32::try_from(event.attempts).unwrap_or(0) + 1;
                        match error {
                            PublishError::Permanent(reason) => Outcome::Dead {
                                error: format!("permanent failure: {reason}"),
                            },
                            PublishError::Retryable(reason)
                            | PublishError::Unavailable(reason)
                            | PublishError::Fatal(reason)
                                if attempts >= options.max_attempts =>
                            {
                                Outcome::Dead {
                                    error: format!(
                                        "gave up after {attempts} attempts (relay.max_attempts): {reason}"
                                    ),
                                }
                            }
                            PublishError::Retryable(reason)
                            | PublishError::Unavailable(reason)
                            | PublishError::Fatal(reason) => {
                                let delay = options.backoff.delay(attempts);
                                Outcome::Retry {
                                    error: reason,
                                    not_before: Utc::now()
                                        + chrono::Duration::from_std(delay)
                                            .unwrap_or(chrono::Duration::MAX),
                                }
                            }
                        }
                    }
                }
            })
            .collect()
    }

    async fn worker(&self, worker: usize, mut stop: watch::Receiver<bool>) {
        let options = &self.inner.options;
        let mut store_failures = 0u32;
        loop {
            if *stop.borrow() {
                return;
            }
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
                _ = self.inner.store.wait_for_events(options.poll_interval) => {}
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

    async fn purger(&self, mut stop: watch::Receiver<bool>) {
        let interval = self.inner.options.purge_interval;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            match self.inner.store.purge_published().await {
                Ok(0) => {}
                Ok(n) => tracing::debug!(removed = n, "purged published events past retention"),
                Err(e) => tracing::warn!(error = %e, "purging published events failed; will retry"),
            }
        }
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
