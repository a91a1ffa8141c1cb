//! Scenario `soak` (full mode): many events through a running relay with retention (published rows
//! are marked, then purged in small batches), fed in chunks so the backlog stays bounded; table
//! and index size, dead tuples and the process's memory sampled from start to end.

use std::time::{Duration, Instant};

use outbox::{MemoryPublisher, PgStore, PgStoreOptions, Relay, RelayOptions};
use sqlx::Row;

use crate::db::BenchDb;
use crate::report::{fmt_num, Report, Table};
use crate::sys;

pub(crate) struct SoakConfig {
    pub events: u64,
    pub chunk: u64,
    pub keys: i64,
    pub retention: Duration,
}

struct Sample {
    label: String,
    published: u64,
    heap_mib: f64,
    index_mib: f64,
    live: i64,
    dead: i64,
    rss_mib: f64,
}

async fn sample(db: &BenchDb, label: impl Into<String>, published: u64) -> anyhow::Result<Sample> {
    let row = sqlx::query(
        "SELECT pg_relation_size('outbox_event')::float8 / 1048576 AS heap,
                pg_indexes_size('outbox_event')::float8 / 1048576 AS idx,
                coalesce(s.n_live_tup, 0) AS live, coalesce(s.n_dead_tup, 0) AS dead
         FROM pg_stat_user_tables s WHERE s.relname = 'outbox_event'",
    )
    .fetch_one(&db.pool)
    .await?;
    Ok(Sample {
        label: label.into(),
        published,
        heap_mib: row.try_get("heap")?,
        index_mib: row.try_get("idx")?,
        live: row.try_get("live")?,
        dead: row.try_get("dead")?,
        rss_mib: sys::rss_mib(),
    })
}

pub(crate) async fn run(db: &BenchDb, cfg: &SoakConfig, report: &mut Report) -> anyhow::Result<()> {
    db.reset().await?;
    sqlx::query("VACUUM outbox_event").execute(&db.pool).await?;
    let store = PgStore::new(
        db.pool.clone(),
        PgStoreOptions {
            retention: cfg.retention,
            ..PgStoreOptions::default()
        },
    )
    .await?;
    let relay = Relay::new(
        store,
        MemoryPublisher::counting(),
        RelayOptions {
            batch_size: 100,
            workers: 2,
            purge_interval: Duration::from_secs(1),
            ..RelayOptions::default()
        },
    );
    let mut samples = vec![sample(db, "start (empty, relay not started)", 0).await?];
    sys::reset_peak_rss();
    let cpu = sys::cpu_time();
    let start = Instant::now();
    let handle = relay.spawn();
    tokio::time::sleep(Duration::from_millis(500)).await;
    samples.push(sample(db, "relay started", 0).await?);

    let autovacuum: String = sqlx::query_scalar("SELECT current_setting('autovacuum')")
        .fetch_one(&db.pool)
        .await?;
    let autovacuum = autovacuum == "on";
    let mut vacuums = 0u32;
    let mut inserted = 0u64;
    let mut next_sample = cfg.events / 10;
    while inserted < cfg.events {
        let published = handle.stats().published;
        // Keep at most two chunks waiting, like a producer load that the relay keeps up with.
        if inserted.saturating_sub(published) <= cfg.chunk {
            let n = cfg.chunk.min(cfg.events - inserted);
            db.append(n as i64, cfg.keys).await?;
            inserted += n;
        } else {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if published >= next_sample {
            samples.push(
                sample(
                    db,
                    format!(
                        "{:.0} % published",
                        published as f64 * 100.0 / cfg.events as f64
                    ),
                    published,
                )
                .await?,
            );
            next_sample += cfg.events / 10;
            if !autovacuum {
                // Stand in for autovacuum where the server has it off, as a deployment would not.
                sqlx::query("VACUUM outbox_event").execute(&db.pool).await?;
                vacuums += 1;
            }
        }
    }
    while handle.stats().published < cfg.events {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let relay_time = start.elapsed();
    let relay_cpu = sys::cpu_time() - cpu;
    samples.push(sample(db, "all published", cfg.events).await?);
    // Retention: wait until the purger has removed every published row.
    let purge_deadline = Instant::now() + cfg.retention + Duration::from_secs(300);
    loop {
        let left = db.count().await?;
        if left == 0 || Instant::now() > purge_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let purged_after = start.elapsed();
    // pg_stat counters lag by up to the stats interval.
    tokio::time::sleep(Duration::from_secs(1)).await;
    samples.push(sample(db, "after retention purge", cfg.events).await?);
    let peak = sys::peak_rss_mib();
    let snapshot = handle.stop().await?;
    sqlx::query("VACUUM outbox_event").execute(&db.pool).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    samples.push(sample(db, "after VACUUM (what autovacuum does)", cfg.events).await?);

    let mut table = Table::new(
        format!(
            "soak: {} events through the relay (2 workers, batch 100, retention {:?}, purge every 1 s), fed in chunks of {}",
            cfg.events, cfg.retention, cfg.chunk
        ),
        &["moment", "published", "heap MiB", "indexes MiB", "live tuples", "dead tuples", "process RSS MiB"],
    );
    for s in &samples {
        table.row(vec![
            s.label.clone(),
            s.published.to_string(),
            format!("{:.1}", s.heap_mib),
            format!("{:.1}", s.index_mib),
            s.live.to_string(),
            s.dead.to_string(),
            format!("{:.1}", s.rss_mib),
        ]);
    }
    report.table(&table);
    if !autovacuum {
        report.note(format!(
            "soak: autovacuum is off on this server; the harness ran VACUUM outbox_event {vacuums} times during the run \
             (after each 10 % sample, concurrently with the relay) in its place"
        ));
    }
    let rate = cfg.events as f64 / relay_time.as_secs_f64();
    report.note(format!(
        "soak: {} events published in {:.1} s ({} ev/s, store errors {}, claims lost {}); all purged after {:.1} s; \
         process CPU {:.1} s ({:.2} s per 1M events); peak RSS {:.1} MiB",
        cfg.events,
        relay_time.as_secs_f64(),
        fmt_num(rate),
        snapshot.store_errors,
        snapshot.claims_lost,
        purged_after.as_secs_f64(),
        relay_cpu.as_secs_f64(),
        relay_cpu.as_secs_f64() * 1e6 / cfg.events as f64,
        peak
    ));
    let first = &samples[0];
    let started = &samples[1];
    let last_purge = &samples[samples.len() - 2];
    let vacuumed = &samples[samples.len() - 1];
    report.result(
        "soak",
        format!(
            "events={} events_per_s={} start_heap_mib={:.1} start_index_mib={:.1} end_heap_mib={:.1} end_index_mib={:.1} \
             end_dead_tuples={} vacuumed_heap_mib={:.1} vacuumed_index_mib={:.1} rss_start_mib={:.1} rss_end_mib={:.1} \
             peak_rss_mib={:.1} cpu_s_per_1m={:.2}",
            cfg.events,
            fmt_num(rate),
            first.heap_mib,
            first.index_mib,
            last_purge.heap_mib,
            last_purge.index_mib,
            last_purge.dead,
            vacuumed.heap_mib,
            vacuumed.index_mib,
            started.rss_mib,
            last_purge.rss_mib,
            peak,
            relay_cpu.as_secs_f64() * 1e6 / cfg.events as f64
        ),
    );
    Ok(())
}
