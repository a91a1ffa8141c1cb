//! A NATS JetStream consumer that applies each outbox event once: async-nats for the broker, the
//! Postgres inbox for idempotency. No AWS dependency is needed for this (build the crate with
//! `default-features = false`).
//!
//! ```text
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres \
//!   cargo run -p outbox-consumer --example nats_consumer -- nats://127.0.0.1:4222 OUTBOX shipping
//! ```
//!
//! JetStream already drops a re-published copy of an event (the relay sets `Nats-Msg-Id` to the
//! event id; duplicates within the stream's window are not stored). What remains is redelivery: a
//! consumer that applied an event but crashed (or was too slow) before its ack gets the message
//! again after `ack_wait`. The effect and the inbox mark are written in one transaction, so the
//! redelivered copy finds the mark and is only acknowledged.

// Also compiled as a module of the consumer's tests (tests/any_broker), which use its items.
#![allow(unreachable_pub)]

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::consumer::pull::{Config as PullConfig, Stream as Messages};
use async_nats::jetstream::consumer::{AckPolicy, PullConsumer};
use async_nats::jetstream::{self, Message};
use futures_util::StreamExt;
use outbox_consumer::{Delivery, PgInbox};
use sqlx::PgConnection;

/// The application's table of effects (here: one row per shipped order event).
pub const SETUP: &str = "CREATE TABLE IF NOT EXISTS shipments (\
     event_id uuid PRIMARY KEY, order_id text NOT NULL, event_type text NOT NULL)";

/// A durable pull consumer `durable` on `stream` with explicit acks; unacknowledged messages come
/// back after `ack_wait`.
pub async fn subscribe(
    client: async_nats::Client,
    stream: &str,
    durable: &str,
    ack_wait: Duration,
) -> anyhow::Result<Messages> {
    let stream = jetstream::new(client)
        .get_stream(stream)
        .await
        .with_context(|| format!("stream {stream} (does `outbox_nats::bootstrap` create it?)"))?;
    let consumer: PullConsumer = stream
        .get_or_create_consumer(
            durable,
            PullConfig {
                durable_name: Some(durable.to_owned()),
                ack_policy: AckPolicy::Explicit,
                ack_wait,
                ..Default::default()
            },
        )
        .await
        .with_context(|| format!("consumer {durable}"))?;
    Ok(consumer.messages().await?)
}

/// The event a message carries: the relay's `outbox-*` headers and the body.
pub fn delivery(message: &Message) -> anyhow::Result<Delivery> {
    let mut headers = HashMap::new();
    if let Some(message_headers) = &message.headers {
        for (name, values) in message_headers.iter() {
            if let Some(value) = values.first() {
                headers.insert(name.to_string(), value.as_str().to_owned());
            }
        }
    }
    let body = String::from_utf8(message.payload.to_vec()).context("the body is not UTF-8")?;
    let position = match message.info() {
        Ok(info) => format!("{}/{}", info.stream, info.stream_sequence),
        Err(_) => message.subject.to_string(),
    };
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

/// Handles messages until none arrives for `idle`, acknowledging each after its transaction. A
/// message the relay did not send (no event id) is logged and terminated (never redelivered); a
/// database error stops the loop unacknowledged, so the message comes back.
pub async fn consume(
    messages: &mut Messages,
    inbox: &PgInbox,
    idle: Duration,
) -> anyhow::Result<Counts> {
    let mut counts = Counts::default();
    while let Ok(Some(received)) = tokio::time::timeout(idle, messages.next()).await {
        let message = received.map_err(|e| anyhow::anyhow!("receiving from NATS: {e}"))?;
        match delivery(&message) {
            Ok(delivery) => {
                if handle(inbox, &delivery).await? {
                    counts.applied += 1;
                } else {
                    counts.duplicates += 1;
                }
                message
                    .ack()
                    .await
                    .map_err(|e| anyhow::anyhow!("acknowledging: {e}"))?;
            }
            Err(e) => {
                eprintln!("terminating a message the relay did not send: {e:#}");
                counts.skipped += 1;
                message
                    .ack_with(jetstream::AckKind::Term)
                    .await
                    .map_err(|e| anyhow::anyhow!("terminating: {e}"))?;
            }
        }
    }
    Ok(counts)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, stream, durable] = args.as_slice() else {
        anyhow::bail!(
            "usage: nats_consumer URL STREAM DURABLE (e.g. nats://127.0.0.1:4222 OUTBOX shipping)"
        );
    };
    let database =
        std::env::var("DATABASE_URL").context("set DATABASE_URL to the consumer's database")?;
    let pool = sqlx::PgPool::connect(&database).await?;
    sqlx::query(SETUP).execute(&pool).await?;
    let inbox = PgInbox::new(pool, durable.clone());
    inbox.migrate().await?;
    let client = async_nats::connect(url.as_str()).await?;
    let mut messages = subscribe(client, stream, durable, Duration::from_secs(30)).await?;
    let counts = consume(&mut messages, &inbox, Duration::from_secs(30)).await?;
    println!("idle for 30 s; {counts:?}");
    Ok(())
}
