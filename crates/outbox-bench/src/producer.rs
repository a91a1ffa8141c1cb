//! Scenario `producer`: what the outbox costs the producer's transaction. The same business
//! transaction (insert one domain row) alone, with `Outbox::enqueue`, and with a raw SQL insert of
//! the same event row; with the wake-up trigger dropped, installed while the relay is busy, and
//! notifying on every commit; at 1 and many producers. Also the strict_key_order trigger.

use std::time::{Duration, Instant};

use outbox::{NewEvent, Outbox, Schema};
use sqlx::postgres::PgListener;
use sqlx::PgConnection;

use crate::db::{BenchDb, Wakeup};
use crate::report::{fmt_num, Report, Table};

pub(crate) struct ProducerConfig {
    pub concurrency: Vec<usize>,
    pub duration: Duration,
    pub rounds: usize,
    pub keys: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    Business,
    Enqueue,
    RawSql,
}

impl Variant {
    fn label(self) -> &'static str {
        match self {
            Variant::Business => "business row only",
            Variant::Enqueue => "+ Outbox::enqueue",
            Variant::RawSql => "+ raw SQL insert",
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Cell {
    variant: Variant,
    wake: Wakeup,
    strict: bool,
    producers: usize,
}

pub(crate) async fn run(
    db: &BenchDb,
    cfg: &ProducerConfig,
    report: &mut Report,
) -> anyhow::Result<()> {
    let mut cells = Vec::new();
    for &producers in &cfg.concurrency {
        cells.push(Cell {
            variant: Variant::Business,
            wake: Wakeup::Dropped,
            strict: false,
            producers,
        });
        for wake in [Wakeup::Dropped, Wakeup::NotWanted, Wakeup::Forced] {
            for variant in [Variant::RawSql, Variant::Enqueue] {
                cells.push(Cell {
                    variant,
                    wake,
                    strict: false,
                    producers,
                });
            }
        }
        cells.push(Cell {
            variant: Variant::Enqueue,
            wake: Wakeup::NotWanted,
            strict: true,
            producers,
        });
    }
    // Rounds interleave the cells so slow drift of the machine spreads over all of them.
    let mut totals = vec![0.0f64; cells.len()];
    for _ in 0..cfg.rounds {
        for (i, cell) in cells.iter().enumerate() {
            totals[i] += measure(db, cfg, *cell).await?;
        }
    }
    db.migrate(false).await?;
    db.set_wakeup(Wakeup::NotWanted).await?;
    let tps: Vec<f64> = totals.iter().map(|t| t / cfg.rounds as f64).collect();
    let find = |variant, wake, strict, producers| {
        cells
            .iter()
            .position(|c| {
                c.variant == variant
                    && c.wake == wake
                    && c.strict == strict
                    && c.producers == producers
            })
            .map_or(0.0, |i| tps[i])
    };

    let mut table = Table::new(
        format!(
            "producer: transactions/s (begin, insert business row [, event row], commit), {} s per cell, mean of {} round(s)",
            cfg.duration.as_secs_f64(),
            cfg.rounds
        ),
        &["producers", "transaction", "wake-up trigger", "strict_key_order", "tx/s", "vs raw SQL (same trigger)", "vs business only"],
    );
    for (i, cell) in cells.iter().enumerate() {
        let raw = find(Variant::RawSql, cell.wake, false, cell.producers);
        let business = find(Variant::Business, Wakeup::Dropped, false, cell.producers);
        table.row(vec![
            cell.producers.to_string(),
            cell.variant.label().to_owned(),
            if cell.variant == Variant::Business {
                "n/a".to_owned()
            } else {
                cell.wake.label().to_owned()
            },
            if cell.strict { "on" } else { "off" }.to_owned(),
            fmt_num(tps[i]),
            if cell.variant == Variant::Business {
                String::new()
            } else {
                format!("{:.3}", tps[i] / raw)
            },
            format!("{:.3}", tps[i] / business),
        ]);
    }
    report.table(&table);

    for &p in &cfg.concurrency {
        let wake_name = |w: Wakeup| match w {
            Wakeup::Dropped => "dropped",
            Wakeup::NotWanted => "busy",
            Wakeup::Forced => "notify_every_tx",
        };
        for wake in [Wakeup::Dropped, Wakeup::NotWanted, Wakeup::Forced] {
            let ours = find(Variant::Enqueue, wake, false, p);
            let raw = find(Variant::RawSql, wake, false, p);
            report.result_vs(
                "producer",
                format!(
                    "producers={p} trigger={} enqueue_tx_per_s={}",
                    wake_name(wake),
                    fmt_num(ours)
                ),
                ours,
                raw,
            );
        }
        let dropped = find(Variant::Enqueue, Wakeup::Dropped, false, p);
        for wake in [Wakeup::NotWanted, Wakeup::Forced] {
            let with = find(Variant::Enqueue, wake, false, p);
            report.result_vs(
                "producer",
                format!(
                    "producers={p} wakeup_cost trigger={} tx_per_s={} vs=trigger_dropped",
                    wake_name(wake),
                    fmt_num(with)
                ),
                with,
                dropped,
            );
        }
        let strict = find(Variant::Enqueue, Wakeup::NotWanted, true, p);
        let plain = find(Variant::Enqueue, Wakeup::NotWanted, false, p);
        report.result_vs(
            "producer",
            format!(
                "producers={p} strict_key_order=on tx_per_s={} vs=strict_off",
                fmt_num(strict)
            ),
            strict,
            plain,
        );
        let business = find(Variant::Business, Wakeup::Dropped, false, p);
        report.result_vs(
            "producer",
            format!(
                "producers={p} outbox_row_cost enqueue_tx_per_s={} vs=business_only",
                fmt_num(plain)
            ),
            plain,
            business,
        );
    }
    Ok(())
}

/// Transactions per second of one cell, from a clean table.
async fn measure(db: &BenchDb, cfg: &ProducerConfig, cell: Cell) -> anyhow::Result<f64> {
    db.migrate(cell.strict).await?;
    db.reset().await?;
    db.set_wakeup(cell.wake).await?;
    sqlx::query("CHECKPOINT").execute(&db.pool).await?;
    // A real waiting relay listens; the notification queue then has a reader, as in production.
    let mut listener = if cell.wake == Wakeup::Forced {
        let mut l = PgListener::connect_with(&db.pool).await?;
        l.listen(&Schema::default().channel()).await?;
        Some(l)
    } else {
        None
    };
    let drain_notifications = async {
        if let Some(l) = listener.as_mut() {
            while let Ok(Some(_)) = l.try_recv().await {}
        }
        std::future::pending::<()>().await
    };

    let mut conns = Vec::with_capacity(cell.producers);
    for _ in 0..cell.producers {
        conns.push(db.connect().await?);
    }
    let start = Instant::now();
    let deadline = start + cfg.duration;
    let mut tasks = tokio::task::JoinSet::new();
    for conn in conns {
        let keys = cfg.keys;
        tasks.spawn(async move { producer(conn, cell.variant, deadline, keys).await });
    }
    let work = async {
        let mut total = 0u64;
        while let Some(joined) = tasks.join_next().await {
            total += joined??;
        }
        Ok::<u64, anyhow::Error>(total)
    };
    let total = tokio::select! {
        t = work => t?,
        _ = drain_notifications => unreachable!("pending never completes"),
    };
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

async fn producer(
    mut conn: PgConnection,
    variant: Variant,
    deadline: Instant,
    keys: u64,
) -> anyhow::Result<u64> {
    let outbox = Outbox::new(Schema::default());
    let mut n = 0u64;
    while Instant::now() < deadline {
        let key = format!("acc-{}", fastrand::u64(0..keys));
        let payload = serde_json::json!({
            "n": n, "amount_cents": 1250, "currency": "EUR", "note": "x".repeat(120)
        });
        let mut tx = sqlx::Connection::begin(&mut conn).await?;
        sqlx::query("INSERT INTO bench_order (customer, total_cents) VALUES ($1, $2)")
            .bind(&key)
            .bind(1250i32)
            .execute(&mut *tx)
            .await?;
        match variant {
            Variant::Business => {}
            Variant::Enqueue => {
                let event = NewEvent::new("account", key, "AccountCredited").payload(&payload)?;
                outbox.enqueue(&mut tx, event).await?;
            }
            Variant::RawSql => {
                // What a hand-written producer sends for the same row: id from the client,
                // headers and destination left to their defaults.
                sqlx::query(
                    "INSERT INTO outbox_event (id, aggregate_type, aggregate_id, event_type, payload)
                     VALUES ($1, $2, $3, $4, $5::jsonb)",
                )
                .bind(uuid::Uuid::now_v7())
                .bind("account")
                .bind(&key)
                .bind("AccountCredited")
                .bind(payload.to_string())
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        n += 1;
    }
    Ok(n)
}
