//! Scenario `broker`: for each broker on loopback, the relay (claim + publish + settle, through
//! the broker's publisher crate) against a plain loop of the broker's standard client sending the
//! same messages with the same batching to the same broker, in one run.
//!
//! Every broker runs the same comparison ([`compare`]); a broker module only says how to reach
//! its broker, what configuration the relay gets, and what the hand-written loop sends
//! ([`Plain`]). Per chunk of `chunk` events:
//! - **relay**: the events are appended to the outbox, then `Relay::drain` with `batch` events per
//!   claim and `workers` workers publishes them (the time includes the per-drain `check()`);
//! - **plain**: the same number of events, built in memory, sent `batch` at a time with `workers`
//!   batches in flight, each batch sent and acknowledged the way the publisher does it (all
//!   messages of the batch out, then their acknowledgements awaited together);
//! - **publisher alone**: the relay's publisher called directly on in-memory batches, without the
//!   database, to show where the relay's time goes;
//! - **C**: the database's limit for the same chunk, batch and concurrency (the bare
//!   `DELETE ... SKIP LOCKED ... RETURNING` loop of the `drain` scenario, nothing published).
//!
//! The relay cannot go faster than the slower of its two limits, the plain loop (the broker) and
//! C (the database); both ratios are reported.
//!
//! The four alternate chunk by chunk (the first of them rotates), so drift of the broker or of
//! the machine hits all alike; what the broker retained is cleared between chunks, outside the
//! timed part.

pub(crate) mod kafka;
pub(crate) mod nats;
pub(crate) mod rabbitmq;
pub(crate) mod sns;
pub(crate) mod sqs;
pub(crate) mod webhook;

use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::{stream, StreamExt, TryStreamExt};
use outbox::{OutboxEvent, Publisher, Relay, RelayOptions};

use crate::db::BenchDb;
use crate::report::{fmt_num, Report, Table};

/// The brokers of the scenario, in the order they run.
pub(crate) const ALL: &[&str] = &["sqs", "sns", "kafka", "nats", "rabbitmq", "webhook"];

/// Sizes of one broker's comparison.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sizes {
    /// Chunks per side.
    pub chunks: usize,
    /// Events per chunk.
    pub chunk: usize,
    /// Events per claim (the relay) and per batch (the plain loop).
    pub batch: usize,
    /// Relay workers, and batches the plain loop keeps in flight.
    pub workers: usize,
}

/// What a hand-written loop of the broker's own client does with the same events.
#[async_trait]
pub(crate) trait Plain: Send + Sync {
    /// Sends one batch and waits until the broker acknowledged every message; an error if any
    /// message was refused.
    async fn send(&self, batch: &[OutboxEvent]) -> anyhow::Result<()>;
    /// Empties what the broker retained (outside the timed part).
    async fn clear(&self) -> anyhow::Result<()> {
        Ok(())
    }
    /// Removes what the run created on the broker.
    async fn teardown(&self) {}
}

/// One broker, ready to compare.
pub(crate) struct Target {
    /// The broker's name in `--brokers` and in RESULT lines.
    pub name: &'static str,
    /// The table's title: broker, address, what a message carries.
    pub title: String,
    /// The relay's configuration (profile `local`, default destination `bench`).
    pub toml: String,
    pub plain: Box<dyn Plain>,
}

/// Whether something accepts TCP connections at `127.0.0.1:port` within 2 s.
pub(crate) async fn port_open(port: u16) -> bool {
    tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect(("127.0.0.1", port)),
    )
    .await
    .is_ok_and(|r| r.is_ok())
}

/// The port of a loopback `host:port` (or `scheme://host:port/...`); anything else is refused:
/// a benchmark never talks to a remote broker.
pub(crate) fn loopback_port(address: &str, default_port: u16) -> anyhow::Result<u16> {
    let rest = address.split_once("://").map_or(address, |(_, rest)| rest);
    let authority = rest.split('/').next().unwrap_or(rest);
    let authority = authority.rsplit('@').next().unwrap_or(authority);
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) => (host, port.parse()?),
        None => (authority, default_port),
    };
    anyhow::ensure!(
        matches!(host, "127.0.0.1" | "localhost"),
        "benchmark traffic stays on loopback: {address} is not 127.0.0.1 or localhost"
    );
    Ok(port)
}

/// The events of one chunk as the relay hands them to a publisher: the payload and keys of
/// [`BenchDb::append`] (about 200 B of JSON, one of 10,000 accounts).
pub(crate) fn events(n: usize) -> anyhow::Result<Vec<OutboxEvent>> {
    (0..n)
        .map(|i| {
            Ok(serde_json::from_value(serde_json::json!({
                "id": uuid::Uuid::now_v7(), "seq": i + 1, "aggregate_type": "account",
                "aggregate_id": format!("acc-{}", i % 10_000), "event_type": "AccountCredited",
                "payload": { "n": i, "amount_cents": i % 10000, "currency": "EUR", "note": "x".repeat(120) },
                "created_at": chrono::Utc::now(),
            }))?)
        })
        .collect()
}

/// A name no other run uses.
pub(crate) fn unique_name(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// The identity headers of `event` (what the publishers set) as a broker's attribute map, each
/// value built by `value`.
pub(crate) fn attributes<V>(
    event: &OutboxEvent,
    value: impl Fn(String) -> Option<V>,
) -> std::collections::HashMap<String, V> {
    outbox::publisher::headers::identity(event)
        .into_iter()
        .filter_map(|(name, v)| Some((name.to_owned(), value(v)?)))
        .collect()
}

/// Every broker crate's kinds, as the `outbox` CLI registers them.
pub(crate) fn registry() -> outbox::Registry {
    outbox::Registry::new()
        .with(outbox_aws::Aws)
        .with(outbox_kafka::Kafka)
        .with(outbox_nats::Nats)
        .with(outbox_amqp::RabbitMq)
        .with(outbox_http::Webhook)
}

#[derive(Default, Clone, Copy)]
struct Side {
    time: Duration,
    events: u64,
}

impl Side {
    fn rate(&self) -> f64 {
        self.events as f64 / self.time.as_secs_f64()
    }
}

/// Runs one broker's comparison and reports it; the broker's resources are removed afterwards
/// whatever the outcome.
pub(crate) async fn compare(
    db: &BenchDb,
    target: Target,
    sizes: Sizes,
    report: &mut Report,
) -> anyhow::Result<()> {
    let outcome = measure(db, &target, sizes).await;
    target.plain.teardown().await;
    let (relay, plain, alone, limit, check) = outcome?;
    let bound = plain.rate().min(limit.rate());
    let mut table = Table::new(
        format!(
            "broker {}: {}; {} chunks of {} events over 10k keys, batch {}, {} worker(s) / batches in flight",
            target.name, target.title, sizes.chunks, sizes.chunk, sizes.batch, sizes.workers
        ),
        &[
            "relay (claim + publish + settle) ev/s",
            "publisher alone (no database) ev/s",
            "plain client loop ev/s",
            "C (database) ev/s",
            "relay / plain",
            "relay / min(plain, C)",
            "publisher alone / plain",
            "first check() ms",
        ],
    );
    table.row(vec![
        fmt_num(relay.rate()),
        fmt_num(alone.rate()),
        fmt_num(plain.rate()),
        fmt_num(limit.rate()),
        format!("{:.3}", relay.rate() / plain.rate()),
        format!("{:.3}", relay.rate() / bound),
        format!("{:.3}", alone.rate() / plain.rate()),
        format!("{:.1}", check.as_secs_f64() * 1000.0),
    ]);
    report.table(&table);
    report.result_vs(
        "broker",
        format!(
            "destination={} workers={} events_per_s={} events={} publisher_alone_per_s={} db_limit_per_s={} vs_min_plain_db={:.3}",
            target.name,
            sizes.workers,
            fmt_num(relay.rate()),
            relay.events,
            fmt_num(alone.rate()),
            fmt_num(limit.rate()),
            relay.rate() / bound
        ),
        relay.rate(),
        plain.rate(),
    );
    Ok(())
}

async fn measure(
    db: &BenchDb,
    target: &Target,
    sizes: Sizes,
) -> anyhow::Result<(Side, Side, Side, Side, Duration)> {
    let config = outbox::Config::from_toml_str(&target.toml, "local")?;
    let registry = registry();
    let publisher = registry.build(&config).await?;
    let started = Instant::now();
    publisher
        .check()
        .await
        .map_err(|e| anyhow::anyhow!("{}: publisher check: {e}", target.name))?;
    // Every drain starts with a check(): what it costs is part of the relay's time per chunk.
    let check = started.elapsed();
    let alone = registry.build(&config).await?;
    let store = db.drain_store().await?;
    let relay = Relay::new(
        store,
        publisher,
        RelayOptions {
            batch_size: sizes.batch,
            workers: sizes.workers,
            ..RelayOptions::default()
        },
    );

    // Warm-up outside the timed part: connections, metadata, channels.
    db.reset().await?;
    db.append(10, 10_000).await?;
    relay.drain().await?;
    target.plain.send(&events(10)?).await?;
    let results = alone.publish(&events(10)?).await;
    anyhow::ensure!(
        results.iter().all(Result::is_ok),
        "{}: publisher alone, warm-up: {:?}",
        target.name,
        results.iter().find(|r| r.is_err())
    );
    target.plain.clear().await?;

    db.reset().await?;
    let (mut ours, mut plain, mut direct, mut limit) = <(Side, Side, Side, Side)>::default();
    for chunk in 0..sizes.chunks {
        for turn in 0..4 {
            match (chunk + turn) % 4 {
                0 => {
                    db.append(sizes.chunk as i64, 10_000).await?;
                    let start = Instant::now();
                    let snapshot = relay.drain().await?;
                    ours.time += start.elapsed();
                    anyhow::ensure!(
                        snapshot.published == sizes.chunk as u64,
                        "{}: the relay published {} of {} (retried {}, deferred {}, dead {})",
                        target.name,
                        snapshot.published,
                        sizes.chunk,
                        snapshot.retried,
                        snapshot.deferred,
                        snapshot.dead
                    );
                    ours.events += snapshot.published;
                }
                1 => {
                    let events = events(sizes.chunk)?;
                    let start = Instant::now();
                    stream::iter(events.chunks(sizes.batch))
                        .map(|batch| target.plain.send(batch))
                        .buffer_unordered(sizes.workers)
                        .try_collect::<()>()
                        .await?;
                    plain.time += start.elapsed();
                    plain.events += events.len() as u64;
                }
                2 => {
                    db.append(sizes.chunk as i64, 10_000).await?;
                    let run = crate::drain::delete_loop(db, sizes.batch, sizes.workers).await?;
                    anyhow::ensure!(
                        run.events == sizes.chunk as u64,
                        "C deleted {} of {}",
                        run.events,
                        sizes.chunk
                    );
                    limit.time += run.elapsed;
                    limit.events += run.events;
                }
                _ => {
                    let events = events(sizes.chunk)?;
                    let start = Instant::now();
                    let results: Vec<_> = stream::iter(events.chunks(sizes.batch))
                        .map(|batch| alone.publish(batch))
                        .buffer_unordered(sizes.workers)
                        .collect()
                        .await;
                    direct.time += start.elapsed();
                    let failed = results.iter().flatten().find(|r| r.is_err());
                    anyhow::ensure!(
                        failed.is_none(),
                        "{}: publisher alone: {failed:?}",
                        target.name
                    );
                    direct.events += events.len() as u64;
                }
            }
            target.plain.clear().await?;
        }
    }
    Ok((ours, plain, direct, limit, check))
}
