//! Scenario `kafka`: the relay publishing to the local Kafka-protocol broker (tansu,
//! `scripts/kafka.sh start`) through `outbox_kafka`, against a plain rdkafka loop sending the same
//! records (same key, value and headers) with the same batching: one chunk of one relay batch is
//! enqueued at once with `send_result` and its delivery reports awaited together, with the same
//! producer settings (idempotent, acks=all, linger.ms=1). Chunks of the two sides alternate, so
//! drift of the broker hits both alike.

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use outbox::{PgStore, PgStoreOptions, Publisher, Relay, RelayOptions};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

use crate::db::BenchDb;
use crate::report::{fmt_num, Report, Table};

pub struct KafkaConfig {
    pub brokers: String,
    pub chunks: usize,
    pub chunk: usize,
}

/// Whether something accepts TCP connections at `brokers` (one loopback `host:port`) within 2 s.
pub async fn reachable(brokers: &str) -> anyhow::Result<bool> {
    let (host, port) = brokers
        .rsplit_once(':')
        .ok_or_else(|| anyhow::anyhow!("the Kafka broker must be host:port, got {brokers}"))?;
    anyhow::ensure!(
        matches!(host, "127.0.0.1" | "localhost"),
        "the Kafka broker must be on loopback, got {brokers}"
    );
    let port: u16 = port.parse()?;
    Ok(tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect(("127.0.0.1", port)),
    )
    .await
    .map(|r| r.is_ok())
    .unwrap_or(false))
}

pub async fn run(db: &BenchDb, cfg: &KafkaConfig, report: &mut Report) -> anyhow::Result<()> {
    let topic = format!(
        "outbox-bench-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &cfg.brokers)
        .create()?;
    for r in admin
        .create_topics(
            &[NewTopic::new(&topic, 3, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await?
    {
        r.map_err(|(t, e)| anyhow::anyhow!("create topic {t}: {e}"))?;
    }
    let toml = format!(
        r#"
[local]
default_destination = "bench"
[local.kafka]
brokers = "{brokers}"
[local.destinations.bench]
kind = "kafka"
topic = "{topic}"
"#,
        brokers = cfg.brokers
    );
    let config = outbox::Config::from_toml_str(&toml, "local")?;
    let publisher = outbox::Registry::new()
        .with(outbox_kafka::Kafka)
        .build(&config)
        .await?;
    publisher
        .check()
        .await
        .map_err(|e| anyhow::anyhow!("publisher check: {e}"))?;
    // The publisher alone (no database), to separate its cost from the relay's claim and settle.
    let alone = outbox::Registry::new()
        .with(outbox_kafka::Kafka)
        .build(&config)
        .await?;
    // The plain loop's producer: the settings the crate uses.
    let plain_producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &cfg.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "1")
        .create()?;

    let store = PgStore::new(
        db.pool.clone(),
        PgStoreOptions {
            notify: false,
            ..PgStoreOptions::default()
        },
    )
    .await?;
    let relay = Relay::new(
        store,
        publisher,
        RelayOptions {
            batch_size: cfg.chunk,
            workers: 1,
            ..RelayOptions::default()
        },
    );

    // Warm-up outside the timed part: both producers connect and learn the topic's partitions.
    db.reset().await?;
    db.append(10, 10_000).await?;
    relay.drain().await?;
    for i in 0..10 {
        plain_producer
            .send_result(
                FutureRecord::to(&topic)
                    .key(&format!("warm-up/{i}"))
                    .payload("{}"),
            )
            .map_err(|(e, _)| anyhow::anyhow!("plain loop warm-up: {e}"))?
            .await?
            .map_err(|(e, _)| anyhow::anyhow!("plain loop warm-up: {e}"))?;
    }

    db.reset().await?;
    let (mut ours, mut plain) = (Duration::ZERO, Duration::ZERO);
    let (mut ours_events, mut plain_events) = (0u64, 0u64);
    let (mut publisher_only, mut publisher_events) = (Duration::ZERO, 0u64);
    for _ in 0..cfg.chunks {
        db.append(cfg.chunk as i64, 10_000).await?;
        let start = Instant::now();
        let snapshot = relay.drain().await?;
        ours += start.elapsed();
        anyhow::ensure!(
            snapshot.published == cfg.chunk as u64,
            "relay published {} of {} (retried {}, dead {})",
            snapshot.published,
            cfg.chunk,
            snapshot.retried,
            snapshot.dead
        );
        ours_events += snapshot.published;

        let records = plain_records(cfg.chunk);
        let start = Instant::now();
        let mut deliveries = Vec::with_capacity(records.len());
        for r in &records {
            let headers = r.headers.iter().fold(OwnedHeaders::new(), |h, (k, v)| {
                h.insert(Header {
                    key: k,
                    value: Some(v.as_bytes()),
                })
            });
            let record = FutureRecord::to(&topic)
                .key(r.key.as_bytes())
                .payload(r.value.as_bytes())
                .headers(headers);
            deliveries.push(
                plain_producer
                    .send_result(record)
                    .map_err(|(e, _)| anyhow::anyhow!("plain loop enqueue: {e}"))?,
            );
        }
        let reports = join_all(deliveries).await;
        plain += start.elapsed();
        for r in reports {
            r?.map_err(|(e, _)| anyhow::anyhow!("plain loop delivery: {e}"))?;
            plain_events += 1;
        }

        let events = outbox_events(cfg.chunk)?;
        let start = Instant::now();
        let results = alone.publish(&events).await;
        publisher_only += start.elapsed();
        anyhow::ensure!(
            results.iter().all(Result::is_ok),
            "publisher alone: {:?}",
            results.iter().find(|r| r.is_err())
        );
        publisher_events += results.len() as u64;
    }
    let ours_rate = ours_events as f64 / ours.as_secs_f64();
    let plain_rate = plain_events as f64 / plain.as_secs_f64();
    let publisher_rate = publisher_events as f64 / publisher_only.as_secs_f64();
    let mut table = Table::new(
        format!(
            "kafka: tansu on {} (topic of 3 partitions), {} chunks of {} events over 10k keys (~200 B value, 5 headers)",
            cfg.brokers, cfg.chunks, cfg.chunk
        ),
        &[
            "relay (outbox_kafka, incl. claim + settle) ev/s",
            "publisher alone (no database) ev/s",
            "plain rdkafka send_result loop ev/s",
            "relay / plain",
            "publisher alone / plain",
        ],
    );
    table.row(vec![
        fmt_num(ours_rate),
        fmt_num(publisher_rate),
        fmt_num(plain_rate),
        format!("{:.3}", ours_rate / plain_rate),
        format!("{:.3}", publisher_rate / plain_rate),
    ]);
    report.table(&table);
    report.result_vs(
        "kafka",
        format!("events_per_s={} events={ours_events}", fmt_num(ours_rate)),
        ours_rate,
        plain_rate,
    );
    Ok(())
}

/// The events the relay would hand the publisher for the same records.
fn outbox_events(n: usize) -> anyhow::Result<Vec<outbox::OutboxEvent>> {
    (0..n)
        .map(|i| {
            Ok(serde_json::from_value(serde_json::json!({
                "id": uuid::Uuid::now_v7(), "seq": i + 1, "aggregate_type": "account",
                "aggregate_id": format!("acc-{i}"), "event_type": "AccountCredited",
                "payload": { "n": i, "amount_cents": i % 10000, "currency": "EUR", "note": "x".repeat(120) },
                "created_at": chrono::Utc::now(),
            }))?)
        })
        .collect()
}

struct PlainRecord {
    key: String,
    value: String,
    headers: Vec<(&'static str, String)>,
}

/// The records a hand-written loop would send for the same events: key, payload and the same
/// five metadata headers the relay sets.
fn plain_records(n: usize) -> Vec<PlainRecord> {
    (0..n)
        .map(|i| {
            let value = serde_json::json!({
                "n": i, "amount_cents": i % 10000, "currency": "EUR", "note": "x".repeat(120)
            })
            .to_string();
            PlainRecord {
                key: format!("account/acc-{i}"),
                value,
                headers: vec![
                    ("outbox-event-id", uuid::Uuid::now_v7().to_string()),
                    ("outbox-event-type", "AccountCredited".to_owned()),
                    ("outbox-aggregate-type", "account".to_owned()),
                    ("outbox-aggregate-id", format!("acc-{i}")),
                    ("outbox-created-at", chrono::Utc::now().to_rfc3339()),
                ],
            }
        })
        .collect()
}
