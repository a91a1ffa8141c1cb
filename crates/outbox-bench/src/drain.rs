//! Scenario `drain`: a preloaded backlog drained by the relay (null publisher) against the
//! physical limit C (a bare `DELETE ... SKIP LOCKED ... RETURNING` loop, same batch size and
//! concurrency) and a textbook naive poller.

use std::time::{Duration, Instant};

use outbox::{MemoryPublisher, Relay, RelayOptions};
use sqlx::Row;

use crate::db::BenchDb;
use crate::report::{fmt_num, Report, Table};
use crate::sys;

pub(crate) struct DrainConfig {
    pub events: i64,
    pub keys: i64,
    pub batch: usize,
    pub workers: Vec<usize>,
    pub naive_events: i64,
    pub naive_interval: Duration,
}

/// One drain's figures.
pub(crate) struct Run {
    pub events: u64,
    pub elapsed: Duration,
    cpu: Duration,
    peak_rss_mib: f64,
}

impl Run {
    pub(crate) fn rate(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64()
    }
    pub(crate) fn cpu_s_per_million(&self) -> f64 {
        self.cpu.as_secs_f64() * 1e6 / self.events.max(1) as f64
    }
}

pub(crate) async fn run(
    db: &BenchDb,
    cfg: &DrainConfig,
    report: &mut Report,
) -> anyhow::Result<()> {
    let mut table = Table::new(
        format!(
            "drain: {} events of ~200 B over {} keys, batch {}, null publisher",
            cfg.events, cfg.keys, cfg.batch
        ),
        &[
            "workers",
            "relay ev/s",
            "C ev/s",
            "relay / C",
            "relay CPU s per 1M",
            "relay peak RSS MiB",
            "C CPU s per 1M",
        ],
    );
    let mut relay_rates = Vec::new();
    for &workers in &cfg.workers {
        db.preload(cfg.events, cfg.keys).await?;
        let ours = relay_drain(db, cfg, workers).await?;
        db.preload(cfg.events, cfg.keys).await?;
        let limit = delete_loop(db, cfg.batch, workers).await?;
        anyhow::ensure!(
            ours.events == cfg.events as u64 && limit.events == cfg.events as u64,
            "drain lost events: relay {} / C {} of {}",
            ours.events,
            limit.events,
            cfg.events
        );
        table.row(vec![
            workers.to_string(),
            fmt_num(ours.rate()),
            fmt_num(limit.rate()),
            format!("{:.3}", ours.rate() / limit.rate()),
            format!("{:.2}", ours.cpu_s_per_million()),
            format!("{:.1}", ours.peak_rss_mib),
            format!("{:.2}", limit.cpu_s_per_million()),
        ]);
        report.result_vs(
            "drain",
            format!(
                "workers={workers} events_per_s={} cpu_s_per_1m={:.2} peak_rss_mib={:.1}",
                fmt_num(ours.rate()),
                ours.cpu_s_per_million(),
                ours.peak_rss_mib
            ),
            ours.rate(),
            limit.rate(),
        );
        relay_rates.push((workers, ours.rate()));
    }
    report.table(&table);

    db.preload(cfg.naive_events, cfg.keys).await?;
    let naive = naive_poller(db, cfg).await?;
    let mut t = Table::new(
        format!(
            "drain: naive poller (select 100 pending, publish and UPDATE one at a time, sleep {:?}), {} events",
            cfg.naive_interval, cfg.naive_events
        ),
        &["poller ev/s", "relay (1 worker) / poller"],
    );
    let ours_1 = relay_rates
        .iter()
        .find(|(w, _)| *w == 1)
        .map_or(0.0, |(_, r)| *r);
    t.row(vec![
        fmt_num(naive.rate()),
        format!("{:.1}", ours_1 / naive.rate()),
    ]);
    report.table(&t);
    report.result_vs(
        "drain",
        format!(
            "peer=naive_poller workers=1 events_per_s={}",
            fmt_num(ours_1)
        ),
        ours_1,
        naive.rate(),
    );
    Ok(())
}

async fn relay_drain(db: &BenchDb, cfg: &DrainConfig, workers: usize) -> anyhow::Result<Run> {
    relay_drain_with(
        db,
        RelayOptions {
            batch_size: cfg.batch,
            workers,
            ..RelayOptions::default()
        },
    )
    .await
}

/// Drains the preloaded backlog with a null publisher and `options`.
pub(crate) async fn relay_drain_with(db: &BenchDb, options: RelayOptions) -> anyhow::Result<Run> {
    let store = db.drain_store().await?;
    let relay = Relay::new(store, MemoryPublisher::counting(), options);
    sys::reset_peak_rss();
    let cpu = sys::cpu_time();
    let start = Instant::now();
    let snapshot = relay.drain().await?;
    let elapsed = start.elapsed();
    Ok(Run {
        events: snapshot.published,
        elapsed,
        cpu: sys::cpu_time() - cpu,
        peak_rss_mib: sys::peak_rss_mib(),
    })
}

/// The physical limit: no ordering, no transaction beyond the statement, the same columns out.
pub(crate) async fn delete_loop(db: &BenchDb, batch: usize, workers: usize) -> anyhow::Result<Run> {
    let sql = "DELETE FROM outbox_event WHERE seq IN (
                   SELECT seq FROM outbox_event ORDER BY seq LIMIT $1 FOR UPDATE SKIP LOCKED)
               RETURNING seq, id, aggregate_type, aggregate_id, event_type, payload::text AS payload,
                         headers::text AS headers, destination, created_at, attempts";
    let cpu = sys::cpu_time();
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let pool = db.pool.clone();
        let batch = batch as i64;
        tasks.spawn(async move {
            let mut n = 0u64;
            loop {
                let rows = sqlx::query(sql).bind(batch).fetch_all(&pool).await?;
                if rows.is_empty() {
                    return Ok::<u64, anyhow::Error>(n);
                }
                for row in &rows {
                    // Decode what the relay decodes, so both sides pay the same client work.
                    let _seq: i64 = row.try_get("seq")?;
                    let _id: uuid::Uuid = row.try_get("id")?;
                    let _t: String = row.try_get("aggregate_type")?;
                    let _a: String = row.try_get("aggregate_id")?;
                    let _e: String = row.try_get("event_type")?;
                    let p: String = row.try_get("payload")?;
                    let _p = serde_json::value::RawValue::from_string(p)?;
                    let h: String = row.try_get("headers")?;
                    let _h: std::collections::BTreeMap<String, String> = serde_json::from_str(&h)?;
                    let _d: Option<String> = row.try_get("destination")?;
                    let _c: chrono::DateTime<chrono::Utc> = row.try_get("created_at")?;
                    let _n: i32 = row.try_get("attempts")?;
                }
                n += rows.len() as u64;
            }
        });
    }
    let mut events = 0;
    while let Some(joined) = tasks.join_next().await {
        events += joined??;
    }
    Ok(Run {
        events,
        elapsed: start.elapsed(),
        cpu: sys::cpu_time() - cpu,
        peak_rss_mib: 0.0,
    })
}

/// The textbook poller: select unpublished rows, publish and mark them one at a time, sleep.
async fn naive_poller(db: &BenchDb, cfg: &DrainConfig) -> anyhow::Result<Run> {
    let mut conn = db.connect().await?;
    let cpu = sys::cpu_time();
    let start = Instant::now();
    let mut events = 0u64;
    loop {
        let rows = sqlx::query(
            "SELECT seq, id, aggregate_type, aggregate_id, event_type, payload::text AS payload
             FROM outbox_event WHERE status = 'pending' ORDER BY seq LIMIT 100",
        )
        .fetch_all(&mut conn)
        .await?;
        if rows.is_empty() {
            break;
        }
        for row in &rows {
            let seq: i64 = row.try_get("seq")?;
            let payload: String = row.try_get("payload")?;
            std::hint::black_box(payload); // the "publish"
            sqlx::query(
                "UPDATE outbox_event SET status = 'published', published_at = now() WHERE seq = $1",
            )
            .bind(seq)
            .execute(&mut conn)
            .await?;
            events += 1;
        }
        tokio::time::sleep(cfg.naive_interval).await;
    }
    Ok(Run {
        events,
        elapsed: start.elapsed(),
        cpu: sys::cpu_time() - cpu,
        peak_rss_mib: 0.0,
    })
}
