//! The Postgres inbox: the consumer's own transaction records the event id together with the
//! handler's writes, so an event is applied effectively once.
//!
//! For each delivery, in one transaction: `INSERT INTO inbox (consumer, event_id, ...) ON CONFLICT
//! DO NOTHING`; no row inserted means the event was applied before (a duplicate: acknowledged,
//! nothing else runs); otherwise the handler's [`InboxHandler::apply`] runs on the same
//! transaction, and the commit makes the writes and the "seen" mark durable together. A handler
//! error rolls both back: the event is not marked seen and SQS redelivers it. Two copies handled
//! at once serialise on the primary key: the second insert waits for the first transaction and
//! then finds the row (or, if the first rolled back, proceeds).
//!
//! The same guarantee for any broker's own client (Kafka, NATS, RabbitMQ, HTTP): the event id
//! travels with every message (a header or the message id), and [`PgInbox::first_time`] is
//! "apply this event id in this transaction once":
//!
//! ```no_run
//! # async fn example(inbox: outbox_consumer::PgInbox, event_id: uuid::Uuid) -> Result<(), Box<dyn std::error::Error>> {
//! let mut tx = inbox.pool().begin().await?;
//! if inbox.first_time(&mut tx, event_id).await? {
//!     // ... the handler's writes, on `tx` ...
//! }
//! tx.commit().await?; // then acknowledge the message to the broker
//! # Ok(()) }
//! ```
//!
//! The table grows with every event: [`PgInbox::purge_older_than`] deletes the marks older than
//! the longest time the broker can redeliver a message (SQS keeps a message at most 14 days; a
//! Kafka consumer group can re-read what the topic retains). A mark deleted too early lets a late
//! redelivery apply twice; keep them at least that long.

use std::time::Duration;

use async_trait::async_trait;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::delivery::Delivery;
use crate::handler::{Handled, Handler, HandlerError};

/// Why the inbox could not be used.
#[derive(Debug, thiserror::Error)]
pub enum InboxError {
    #[error("inbox table name {0:?} is not a plain identifier (letters, digits, _; optionally schema.table)")]
    BadTableName(String),
    #[error("inbox database error: {0}")]
    Database(#[from] sqlx::Error),
}

/// Applies one event inside the inbox's transaction.
#[async_trait]
pub trait InboxHandler: Send + Sync + 'static {
    /// Writes the event's effects with `tx`; an error rolls them back with the "seen" mark.
    async fn apply(&self, tx: &mut PgConnection, delivery: &Delivery) -> Result<(), HandlerError>;
}

/// The inbox of one consumer (several consumers may share the table: the key is
/// `(consumer, event_id)`). Use [`PgInbox::handler`] to wrap an [`InboxHandler`].
#[derive(Debug, Clone)]
pub struct PgInbox {
    pool: PgPool,
    consumer: String,
    table: String,
}

impl PgInbox {
    /// An inbox for `consumer` in the table `inbox`.
    pub fn new(pool: PgPool, consumer: impl Into<String>) -> Self {
        Self {
            pool,
            consumer: consumer.into(),
            table: "inbox".to_owned(),
        }
    }

    /// Uses another table (`name` or `schema.name`).
    pub fn with_table(mut self, table: &str) -> Result<Self, InboxError> {
        let plain = |part: &str| {
            !part.is_empty()
                && part.len() <= 63
                && part
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                && !part.starts_with(|c: char| c.is_ascii_digit())
        };
        let parts: Vec<&str> = table.split('.').collect();
        if parts.len() > 2 || !parts.iter().all(|p| plain(p)) {
            return Err(InboxError::BadTableName(table.to_owned()));
        }
        self.table = table.to_owned();
        Ok(self)
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Creates the inbox table if it does not exist.
    pub async fn migrate(&self) -> Result<(), InboxError> {
        sqlx::query(&format!(
            "CREATE TABLE IF NOT EXISTS {} (
                consumer    text        NOT NULL,
                event_id    uuid        NOT NULL,
                event_type  text,
                message_id  text,
                received_at timestamptz NOT NULL DEFAULT now(),
                PRIMARY KEY (consumer, event_id)
            )",
            self.table
        ))
        .execute(&self.pool)
        .await?;
        // For purge_older_than: without it, each purge scans the whole table.
        sqlx::query(&format!(
            "CREATE INDEX IF NOT EXISTS {} ON {} (received_at)",
            self.index_name(),
            self.table
        ))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    fn index_name(&self) -> String {
        format!(
            "{}_received_at",
            self.table.rsplit('.').next().unwrap_or(&self.table)
        )
    }

    /// Records `event_id` as applied by this consumer in `tx`; `true` the first time, `false` for a
    /// duplicate (applied before, or being applied by a transaction that then commits). Apply the
    /// event's effects on the same `tx` only when it returns `true`; rolling `tx` back forgets the
    /// mark with the effects. Works with any broker: only the event id is needed.
    pub async fn first_time(
        &self,
        tx: &mut PgConnection,
        event_id: Uuid,
    ) -> Result<bool, InboxError> {
        self.record(tx, event_id, None, None).await
    }

    async fn record(
        &self,
        tx: &mut PgConnection,
        event_id: Uuid,
        event_type: Option<&str>,
        message_id: Option<&str>,
    ) -> Result<bool, InboxError> {
        let inserted = sqlx::query(&format!(
            "INSERT INTO {} (consumer, event_id, event_type, message_id) VALUES ($1, $2, $3, $4) \
             ON CONFLICT DO NOTHING",
            self.table
        ))
        .bind(&self.consumer)
        .bind(event_id)
        .bind(event_type)
        .bind(message_id)
        .execute(tx)
        .await?
        .rows_affected();
        Ok(inserted == 1)
    }

    /// Deletes this consumer's marks older than `age`, in batches of 10,000 (short transactions);
    /// returns how many were deleted. See the module docs for how long to keep them.
    pub async fn purge_older_than(&self, age: Duration) -> Result<u64, InboxError> {
        let mut total = 0;
        loop {
            let deleted = sqlx::query(&format!(
                "DELETE FROM {table} WHERE ctid IN (SELECT ctid FROM {table} \
                 WHERE consumer = $1 AND received_at < now() - make_interval(secs => $2) LIMIT 10000)",
                table = self.table
            ))
            .bind(&self.consumer)
            .bind(age.as_secs_f64())
            .execute(&self.pool)
            .await?
            .rows_affected();
            total += deleted;
            if deleted < 10_000 {
                return Ok(total);
            }
        }
    }

    /// Whether the event was applied by this consumer.
    pub async fn seen(&self, event_id: Uuid) -> Result<bool, InboxError> {
        let seen: bool = sqlx::query_scalar(&format!(
            "SELECT EXISTS (SELECT 1 FROM {} WHERE consumer = $1 AND event_id = $2)",
            self.table
        ))
        .bind(&self.consumer)
        .bind(event_id)
        .fetch_one(&self.pool)
        .await?;
        Ok(seen)
    }

    /// Events this consumer has applied.
    pub async fn count(&self) -> Result<i64, InboxError> {
        let n: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM {} WHERE consumer = $1",
            self.table
        ))
        .bind(&self.consumer)
        .fetch_one(&self.pool)
        .await?;
        Ok(n)
    }

    /// The consumer [`Handler`]: dedup and apply in one transaction.
    pub fn handler<H: InboxHandler>(self, apply: H) -> Inbox<H> {
        Inbox { inbox: self, apply }
    }

    /// Marks the event seen in `tx` and reports whether it was new (false: a duplicate).
    pub async fn mark(
        &self,
        tx: &mut PgConnection,
        delivery: &Delivery,
    ) -> Result<bool, InboxError> {
        self.record(
            tx,
            delivery.event_id,
            delivery.event_type.as_deref(),
            Some(delivery.message_id.as_str()),
        )
        .await
    }
}

/// A [`Handler`] that applies each event once through the inbox.
pub struct Inbox<H> {
    inbox: PgInbox,
    apply: H,
}

impl<H> Inbox<H> {
    pub fn inbox(&self) -> &PgInbox {
        &self.inbox
    }
}

#[async_trait]
impl<H: InboxHandler> Handler for Inbox<H> {
    async fn handle(&self, delivery: &Delivery) -> Result<Handled, HandlerError> {
        let mut tx = self.inbox.pool.begin().await?;
        if !self.inbox.mark(&mut tx, delivery).await? {
            tx.rollback().await?;
            return Ok(Handled::Duplicate);
        }
        // On error, dropping `tx` rolls back the mark with the handler's writes.
        self.apply.apply(&mut tx, delivery).await?;
        tx.commit().await?;
        Ok(Handled::Processed)
    }
}
