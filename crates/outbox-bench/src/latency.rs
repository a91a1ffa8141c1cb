//! Scenario `latency`: producers commit single-event transactions at a fixed rate while the relay
//! runs; commit-acknowledged to publish-acknowledged latency per event (HdrHistogram), and the
//! backlog, with the relay's wake-up (NOTIFY while idle) on and off.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use hdrhistogram::Histogram;
use outbox::{
    NewEvent, Outbox, OutboxEvent, PgStore, PgStoreOptions, PublishResult, Publisher, Relay,
    RelayOptions, Schema,
};
use uuid::Uuid;

use crate::db::BenchDb;
use crate::report::{fmt_num, Report, Table};

/// One phase: a target rate (None = as fast as `producers` connections go) for a duration.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Phase {
    pub rate: Option<u32>,
    pub producers: usize,
    pub duration: Duration,
}

pub(crate) struct LatencyConfig {
    pub phases: Vec<Phase>,
    pub keys: u64,
}

/// Joins each event's commit time (producer side) with its publish time (publisher side).
#[derive(Default)]
struct Clock {
    commits: HashMap<Uuid, Instant>,
    /// Published before the producer saw its commit acknowledged (counted as 0 latency).
    early: HashMap<Uuid, Instant>,
    hist: Option<Histogram<u64>>,
    early_count: u64,
}

impl Clock {
    fn record(&mut self, micros: u64) {
        if let Some(h) = self.hist.as_mut() {
            h.saturating_record(micros.max(1));
        }
    }
}

struct Shared {
    clock: Mutex<Clock>,
    committed: AtomicU64,
    published: AtomicU64,
}

struct LatencyPublisher(Arc<Shared>);

#[async_trait]
impl Publisher for LatencyPublisher {
    async fn publish(&self, batch: &[OutboxEvent]) -> Vec<PublishResult> {
        let now = Instant::now();
        let mut clock = self.0.clock.lock().unwrap_or_else(|p| p.into_inner());
        for event in batch {
            match clock.commits.remove(&event.id) {
                Some(t) => {
                    let us = now.saturating_duration_since(t).as_micros() as u64;
                    clock.record(us);
                }
                None => {
                    clock.early.insert(event.id, now);
                }
            }
        }
        self.0
            .published
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        vec![Ok(()); batch.len()]
    }
}

struct PhaseResult {
    achieved_rate: f64,
    hist: Histogram<u64>,
    early: u64,
    max_backlog: u64,
    end_backlog: u64,
    catch_up: Duration,
    committed: u64,
}

pub(crate) async fn run(
    db: &BenchDb,
    cfg: &LatencyConfig,
    report: &mut Report,
) -> anyhow::Result<()> {
    let mut table = Table::new(
        "latency: commit-ack to publish-ack, single-event transactions, null publisher, relay 2 workers batch 100",
        &[
            "wake-up",
            "target rate",
            "achieved ev/s",
            "p50 ms",
            "p99 ms",
            "p99.9 ms",
            "max ms",
            "max backlog",
            "backlog at end",
            "catch-up ms",
        ],
    );
    for wake in [true, false] {
        for phase in &cfg.phases {
            db.reset().await?;
            db.set_wakeup(crate::db::Wakeup::NotWanted).await?;
            let r = run_phase(db, cfg, *phase, wake).await?;
            let ms = |q: f64| r.hist.value_at_quantile(q) as f64 / 1000.0;
            let target = phase
                .rate
                .map_or(format!("max ({} producers)", phase.producers), |r| {
                    r.to_string()
                });
            table.row(vec![
                if wake { "on" } else { "off (poll 1 s)" }.to_owned(),
                target,
                fmt_num(r.achieved_rate),
                format!("{:.2}", ms(0.5)),
                format!("{:.2}", ms(0.99)),
                format!("{:.2}", ms(0.999)),
                format!("{:.2}", r.hist.max() as f64 / 1000.0),
                r.max_backlog.to_string(),
                r.end_backlog.to_string(),
                format!("{:.0}", r.catch_up.as_secs_f64() * 1000.0),
            ]);
            report.result(
                "latency",
                format!(
                    "wakeup={} rate={} achieved={} p50_ms={:.2} p99_ms={:.2} p999_ms={:.2} max_ms={:.2} max_backlog={} end_backlog={} events={} early={}",
                    if wake { "on" } else { "off" },
                    phase.rate.map_or("max".to_owned(), |r| r.to_string()),
                    fmt_num(r.achieved_rate),
                    ms(0.5),
                    ms(0.99),
                    ms(0.999),
                    r.hist.max() as f64 / 1000.0,
                    r.max_backlog,
                    r.end_backlog,
                    r.committed,
                    r.early
                ),
            );
        }
    }
    report.table(&table);
    Ok(())
}

async fn run_phase(
    db: &BenchDb,
    cfg: &LatencyConfig,
    phase: Phase,
    wake: bool,
) -> anyhow::Result<PhaseResult> {
    let shared = Arc::new(Shared {
        clock: Mutex::new(Clock {
            hist: Some(Histogram::new_with_bounds(1, 600_000_000, 3)?),
            ..Clock::default()
        }),
        committed: AtomicU64::new(0),
        published: AtomicU64::new(0),
    });
    let relay_options = RelayOptions {
        batch_size: 100,
        workers: 2,
        poll_interval: Duration::from_secs(1),
        ..RelayOptions::default()
    };
    let store = PgStore::new(
        db.pool.clone(),
        PgStoreOptions {
            notify: wake,
            notify_window: relay_options.poll_interval * 2,
            ..PgStoreOptions::default()
        },
    )
    .await?;
    let relay = Relay::new(store, LatencyPublisher(shared.clone()), relay_options);
    let handle = relay.spawn();
    // Let the relay reach its idle wait (and request wake-ups) before producers start.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let start = Instant::now();
    let deadline = start + phase.duration;
    let mut tasks = tokio::task::JoinSet::new();
    for p in 0..phase.producers {
        let mut conn = db.connect().await?;
        let shared = shared.clone();
        let producers = phase.producers as u64;
        let rate = phase.rate;
        let keys = cfg.keys;
        tasks.spawn(async move {
            let outbox = Outbox::new(Schema::default());
            let mut k = p as u64;
            loop {
                if let Some(rate) = rate {
                    let due = start + Duration::from_secs_f64(k as f64 / f64::from(rate));
                    if due >= deadline {
                        break;
                    }
                    tokio::time::sleep_until(due.into()).await;
                } else if Instant::now() >= deadline {
                    break;
                }
                let event = NewEvent::new(
                    "account",
                    format!("acc-{}", fastrand::u64(0..keys)),
                    "AccountCredited",
                )
                .payload(&serde_json::json!({
                    "n": k, "amount_cents": 1250, "currency": "EUR", "note": "x".repeat(120)
                }))?;
                let mut tx = sqlx::Connection::begin(&mut conn).await?;
                let id = outbox.enqueue(&mut tx, event).await?;
                tx.commit().await?;
                let now = Instant::now();
                {
                    let mut clock = shared.clock.lock().unwrap_or_else(|p| p.into_inner());
                    if clock.early.remove(&id).is_some() {
                        clock.early_count += 1;
                        clock.record(0);
                    } else {
                        clock.commits.insert(id, now);
                    }
                }
                shared.committed.fetch_add(1, Ordering::Relaxed);
                k += producers;
            }
            Ok::<(), anyhow::Error>(())
        });
    }
    let mut max_backlog = 0u64;
    let backlog = || {
        shared
            .committed
            .load(Ordering::Relaxed)
            .saturating_sub(shared.published.load(Ordering::Relaxed))
    };
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        max_backlog = max_backlog.max(backlog());
    }
    while let Some(joined) = tasks.join_next().await {
        joined??;
    }
    let produce_time = start.elapsed();
    let end_backlog = backlog();
    let committed = shared.committed.load(Ordering::Relaxed);
    let caught = Instant::now();
    let give_up = caught + Duration::from_secs(30);
    while shared.published.load(Ordering::Relaxed) < committed && Instant::now() < give_up {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let catch_up = caught.elapsed();
    handle.stop().await?;
    let mut clock = shared.clock.lock().unwrap_or_else(|p| p.into_inner());
    anyhow::ensure!(
        clock.commits.is_empty(),
        "{} committed events were not published within 30 s",
        clock.commits.len()
    );
    Ok(PhaseResult {
        achieved_rate: committed as f64 / produce_time.as_secs_f64(),
        hist: clock.hist.take().expect("histogram present"),
        early: clock.early_count,
        max_backlog,
        end_backlog,
        catch_up,
        committed,
    })
}
