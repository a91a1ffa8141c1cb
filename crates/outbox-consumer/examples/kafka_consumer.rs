//! A Kafka consumer that applies each outbox event once: rdkafka for the broker, the Postgres
//! inbox for idempotency. No AWS dependency is needed for this (build the crate with
//! `default-features = false`).
//!
//! ```text
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres \
//!   cargo run -p outbox-consumer --example kafka_consumer -- 127.0.0.1:19092 orders shipping
//! ```
//!
//! Why the inbox: the relay publishes at least once (a relay that crashes after the broker's ack
//! but before recording it publishes the event again), and a consumer that crashes after applying
//! an event but before committing its offset reads it again. Both copies carry the same
//! `outbox-event-id` header, so the effect and the inbox mark are written in one transaction and
//! the second copy finds the mark. The offset is committed only after that transaction: a crash
//! in between re-reads the message, never skips it.

// Also compiled as a module of the consumer's tests (tests/any_broker), which use its items.
#![allow(unreachable_pub)]

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context as _;
use outbox_consumer::{Delivery, PgInbox};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::ClientConfig;
use sqlx::PgConnection;

/// The application's table of effects (here: one row per shipped order event).
pub const SETUP: &str = "CREATE TABLE IF NOT EXISTS shipments (\
     event_id uuid PRIMARY KEY, order_id text NOT NULL, event_type text NOT NULL)";

/// A consumer of `topic` in `group` that commits offsets itself, after the database.
pub fn subscribe(brokers: &str, topic: &str, group: &str) -> anyhow::Result<StreamConsumer> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .context("creating the Kafka consumer")?;
    consumer
        .subscribe(&[topic])
        .with_context(|| format!("subscribing to {topic}"))?;
    Ok(consumer)
}

/// The event a record carries: the relay's `outbox-*` headers and the body.
pub fn delivery(message: &BorrowedMessage<'_>) -> anyhow::Result<Delivery> {
    let mut headers = HashMap::new();
    if let Some(record_headers) = message.headers() {
        for header in record_headers.iter() {
            if let Some(value) = header.value.and_then(|v| std::str::from_utf8(v).ok()) {
                headers.insert(header.key.to_owned(), value.to_owned());
            }
        }
    }
    let body = match message.payload() {
        Some(bytes) => {
            String::from_utf8(bytes.to_vec()).context("the record's value is not UTF-8")?
        }
        None => String::new(),
    };
    let position = format!(
        "{}/{}/{}",
        message.topic(),
        message.partition(),
        message.offset()
    );
    Ok(Delivery::from_headers(position, headers, body)?)
}

/// The application's effect, written in the inbox's transaction.
pub async fn apply(tx: &mut PgConnection, delivery: &Delivery) -> anyhow::Result<()> {
    sqlx::query("INSERT INTO shipments (event_id, order_id, event_type) VALUES ($1, $2, $3)")
        .bind(delivery.event_id)
        .bind(delivery.aggregate_id.as_deref().unwrap_or_default())
        .bind(delivery.event_type.as_deref().unwrap_or_default())
        .execute(tx)
        .await?;
    Ok(())
}

/// Applies `delivery` once: `true` when applied now, `false` for a copy seen before.
pub async fn handle(inbox: &PgInbox, delivery: &Delivery) -> anyhow::Result<bool> {
    let mut tx = inbox.pool().begin().await?;
    let first = inbox.first_time(&mut tx, delivery.event_id).await?;
    if first {
        apply(&mut tx, delivery).await?;
    }
    tx.commit().await?;
    Ok(first)
}

/// What one run of [`consume`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub applied: u64,
    pub duplicates: u64,
    pub skipped: u64,
}

/// Handles records until none arrives for `idle`. A record the relay did not send (no event id)
/// is logged and skipped; a database error stops the loop with the offset uncommitted, so the
/// record is read again after a restart.
pub async fn consume(
    consumer: &StreamConsumer,
    inbox: &PgInbox,
    idle: Duration,
) -> anyhow::Result<Counts> {
    let mut counts = Counts::default();
    while let Ok(received) = tokio::time::timeout(idle, consumer.recv()).await {
        let message = received.context("receiving from Kafka")?;
        match delivery(&message) {
            Ok(delivery) => {
                if handle(inbox, &delivery).await? {
                    counts.applied += 1;
                } else {
                    counts.duplicates += 1;
                }
            }
            Err(e) => {
                eprintln!("skipping a record the relay did not send: {e:#}");
                counts.skipped += 1;
            }
        }
        consumer
            .commit_message(&message, CommitMode::Sync)
            .context("committing the offset")?;
    }
    Ok(counts)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [brokers, topic, group] = args.as_slice() else {
        anyhow::bail!(
            "usage: kafka_consumer BROKERS TOPIC GROUP (e.g. 127.0.0.1:19092 orders shipping)"
        );
    };
    let url =
        std::env::var("DATABASE_URL").context("set DATABASE_URL to the consumer's database")?;
    let pool = sqlx::PgPool::connect(&url).await?;
    sqlx::query(SETUP).execute(&pool).await?;
    let inbox = PgInbox::new(pool, group.clone());
    inbox.migrate().await?;
    let consumer = subscribe(brokers, topic, group)?;
    let counts = consume(&consumer, &inbox, Duration::from_secs(30)).await?;
    println!("idle for 30 s; {counts:?}");
    Ok(())
}
