//! `outbox status --watch`: the backlog refreshed every second, with the rate events are
//! published, until Ctrl-C (exit 0).

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use anyhow::Result;
use outbox::config::Config;
use outbox::postgres::{self, Status};
use sqlx::PgPool;

use crate::UsageError;

const REFRESH: Duration = Duration::from_secs(1);

/// The counters the rate is derived from, at one moment.
struct Reading {
    at: Instant,
    status: Status,
    /// Events ever inserted (the sequence's position); `None` when it cannot be read.
    inserted: Option<i64>,
}

pub(crate) async fn watch(config: &Config) -> Result<()> {
    let pool = crate::connect(config, "outbox-status").await?;
    postgres::check_schema(&pool, &config.schema)
        .await
        .map_err(|e| UsageError(e.into()))?;
    let mut term = signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut interrupt = signal(tokio::signal::unix::SignalKind::interrupt())?;
    let terminal = std::io::stdout().is_terminal();
    let mut last: Option<Reading> = None;
    loop {
        let reading = read(&pool, config).await?;
        let rate = last
            .as_ref()
            .and_then(|l| published_per_second(l, &reading));
        let text = render(&reading.status, rate);
        let mut out = std::io::stdout().lock();
        let written = if terminal {
            // Home and clear: a live view instead of a scrolling log.
            write!(out, "\x1b[H\x1b[2J{text}")
        } else {
            writeln!(out, "{text}")
        };
        if written.and_then(|()| out.flush()).is_err() {
            // The reader went away (`outbox status --watch | head`): nothing left to show.
            return Ok(());
        }
        drop(out);
        last = Some(reading);
        tokio::select! {
            _ = tokio::time::sleep(REFRESH) => {}
            _ = interrupt.recv() => return Ok(()),
            _ = term.recv() => return Ok(()),
        }
    }
}

fn signal(kind: tokio::signal::unix::SignalKind) -> Result<tokio::signal::unix::Signal> {
    Ok(tokio::signal::unix::signal(kind)?)
}

async fn read(pool: &PgPool, config: &Config) -> Result<Reading> {
    let status = postgres::status(pool, &config.schema).await?;
    let seq = config.schema.qualify("outbox_event_seq");
    // Without SELECT on the sequence the rate is simply not shown.
    let inserted = sqlx::query_scalar::<_, i64>(&format!(
        "SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END FROM {seq}"
    ))
    .fetch_one(pool)
    .await
    .ok();
    Ok(Reading {
        at: Instant::now(),
        status,
        inserted,
    })
}

/// Events published per second between two readings: what was inserted minus what the backlog
/// and the dead letters grew by (an estimate: deleted dead events and rolled-back inserts, which
/// also draw sequence numbers, count as published).
fn published_per_second(before: &Reading, now: &Reading) -> Option<f64> {
    let inserted = now.inserted? - before.inserted?;
    let grew =
        (now.status.pending - before.status.pending) + (now.status.dead - before.status.dead);
    let seconds = now.at.duration_since(before.at).as_secs_f64();
    (seconds > 0.0).then(|| ((inserted - grew).max(0) as f64) / seconds)
}

fn render(s: &Status, rate: Option<f64>) -> String {
    let rate = rate.map_or_else(|| "-".to_owned(), |r| format!("{r:.1}"));
    let mut text = format!(
        "outbox status (every {}s; Ctrl-C to quit)\n\
         published/s                 {rate}\n\
         pending                     {}\n\
         \x20 retrying (backoff)        {}\n\
         \x20 held for a destination    {}\n",
        REFRESH.as_secs(),
        s.pending,
        s.retrying,
        s.held
    );
    for (destination, n) in &s.held_by_destination {
        text.push_str(&format!("    {destination:<23} {n}\n"));
    }
    text.push_str(&format!(
        "  behind an earlier event   {}\n  keys blocked              {}\n",
        s.blocked, s.keys_blocked
    ));
    for key in &s.blocked_keys {
        text.push_str(&format!("    {key}\n"));
    }
    text.push_str(&format!("dead                        {}\n", s.dead));
    for (destination, n) in &s.dead_by_destination {
        text.push_str(&format!("    {destination:<23} {n}\n"));
    }
    text.push_str(&format!(
        "oldest pending age          {:.1}s\n",
        s.oldest_pending_age_seconds
    ));
    text
}
