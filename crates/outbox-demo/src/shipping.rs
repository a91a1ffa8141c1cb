//! The consumer: a "shipping" service with its own database. It applies order events to its
//! `shipments` table through the inbox (the event id and the change commit together), keeps a
//! `shipping_log` of what it applied in which order, and prints one readable line per event.
//!
//! It reads SQS with [`outbox_consumer::Consumer`] ([`start`]), and Kafka, NATS JetStream and
//! RabbitMQ with each broker's own client ([`start_broker`], in [`crate::consume`]); on every
//! broker an event is applied by the same [`Shipping`] logic, once, through the inbox.

use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;
use outbox_consumer::{
    Consumer, ConsumerOptions, ConsumerReport, ConsumerStats, Delivery, DynamoIdempotency,
    DynamoOptions, Handled, Handler, HandlerError, InboxHandler, PgInbox,
};
use serde::Deserialize;
use sqlx::{PgConnection, PgPool};

/// The consumer name in the inbox (and the DynamoDB key namespace).
pub const CONSUMER: &str = "shipping";

/// Shipping's own tables, and the inbox.
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    for statement in [
        "CREATE TABLE IF NOT EXISTS shipments (
            order_id   text        PRIMARY KEY,
            customer   text,
            status     text        NOT NULL,
            version    integer     NOT NULL,
            updated_at timestamptz NOT NULL DEFAULT now()
        )",
        // What was applied, in the order it was applied (n): the demo's order check reads it.
        "CREATE TABLE IF NOT EXISTS shipping_log (
            n          bigserial   PRIMARY KEY,
            order_id   text        NOT NULL,
            event_id   uuid        NOT NULL,
            event_type text        NOT NULL,
            version    integer     NOT NULL,
            applied_at timestamptz NOT NULL DEFAULT now()
        )",
        "CREATE INDEX IF NOT EXISTS shipping_log_order ON shipping_log (order_id, n)",
    ] {
        sqlx::query(statement).execute(pool).await?;
    }
    PgInbox::new(pool.clone(), CONSUMER).migrate().await?;
    Ok(())
}

#[derive(Debug, Deserialize)]
struct OrderEvent {
    order_id: String,
    version: i32,
    #[serde(default)]
    customer: Option<String>,
}

/// Applies order events to the shipping tables.
#[derive(Debug, Clone)]
pub struct Shipping {
    pool: PgPool,
    /// Print one line per applied event (the demo); off in tests.
    pub print: bool,
}

impl Shipping {
    pub fn new(pool: PgPool, print: bool) -> Self {
        Self { pool, print }
    }

    async fn apply_in(&self, tx: &mut PgConnection, d: &Delivery) -> Result<(), HandlerError> {
        let event_type = d.event_type.clone().unwrap_or_default();
        let event: OrderEvent = d.json()?;
        let status = match event_type.as_str() {
            "OrderPlaced" => "awaiting payment",
            "OrderPaid" => "ready to ship",
            "OrderCancelled" => "cancelled",
            // Events shipping does not care about are acknowledged and recorded, nothing more.
            _ => "unchanged",
        };
        let previous: Option<i32> =
            sqlx::query_scalar("SELECT version FROM shipments WHERE order_id = $1 FOR UPDATE")
                .bind(&event.order_id)
                .fetch_optional(&mut *tx)
                .await?;
        if status != "unchanged" {
            sqlx::query(
                "INSERT INTO shipments (order_id, customer, status, version) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (order_id) DO UPDATE SET status = EXCLUDED.status, version = EXCLUDED.version, \
                 customer = COALESCE(EXCLUDED.customer, shipments.customer), updated_at = now()",
            )
            .bind(&event.order_id)
            .bind(&event.customer)
            .bind(status)
            .bind(event.version)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query(
            "INSERT INTO shipping_log (order_id, event_id, event_type, version) VALUES ($1, $2, $3, $4)",
        )
        .bind(&event.order_id)
        .bind(d.event_id)
        .bind(&event_type)
        .bind(event.version)
        .execute(&mut *tx)
        .await?;
        if self.print {
            let expected = previous.unwrap_or(0) + 1;
            let order_note = if event.version == expected {
                String::new()
            } else {
                format!("  (OUT OF ORDER: expected v{expected})")
            };
            let redelivery = if d.receive_count > 1 {
                format!("  (delivery #{})", d.receive_count)
            } else {
                String::new()
            };
            println!(
                "shipping  {:<15} {:<15} v{}  -> {:<17} event {}{}{}",
                event.order_id,
                event_type,
                event.version,
                status,
                short(&d.event_id),
                redelivery,
                order_note
            );
        }
        Ok(())
    }
}

fn short(id: &uuid::Uuid) -> String {
    let s = id.simple().to_string();
    format!("…{}", &s[s.len() - 8..])
}

#[async_trait]
impl InboxHandler for Shipping {
    async fn apply(&self, tx: &mut PgConnection, d: &Delivery) -> Result<(), HandlerError> {
        self.apply_in(tx, d).await
    }
}

impl Shipping {
    /// Applies `d` once, through the inbox, for a broker's own client: in one transaction,
    /// [`PgInbox::first_time`] for its event id and, only the first time, the change. The caller
    /// acknowledges the message to its broker afterwards: a crash in between redelivers it, and
    /// the inbox recognises it ([`Handled::Duplicate`]). An error rolls both back.
    pub async fn apply_once(&self, inbox: &PgInbox, d: &Delivery) -> Result<Handled, HandlerError> {
        let mut tx = self.pool.begin().await?;
        if !inbox.first_time(&mut tx, d.event_id).await? {
            tx.rollback().await?;
            return Ok(Handled::Duplicate);
        }
        self.apply_in(&mut tx, d).await?;
        tx.commit().await?;
        Ok(Handled::Processed)
    }
}

/// Without the inbox (DynamoDB mode): each event in a transaction of its own.
#[async_trait]
impl Handler for Shipping {
    async fn handle(&self, d: &Delivery) -> Result<Handled, HandlerError> {
        let mut tx = self.pool.begin().await?;
        self.apply_in(&mut tx, d).await?;
        tx.commit().await?;
        Ok(Handled::Processed)
    }
}

/// Which idempotency store shipping uses.
#[derive(Debug, Clone)]
pub enum Idempotency {
    /// The `inbox` table in shipping's database, in the same transaction as the change.
    Inbox,
    /// A DynamoDB table (conditional put + TTL).
    DynamoDb(DynamoOptions),
}

/// The running shipping consumer.
pub struct ShippingService {
    stats: Arc<ConsumerStats>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<anyhow::Result<ConsumerReport>>,
}

impl ShippingService {
    pub fn stats(&self) -> ConsumerReport {
        self.stats.snapshot()
    }

    /// Stops receiving, lets in-flight events finish, flushes deletes (acknowledges them).
    pub async fn stop(self) -> anyhow::Result<ConsumerReport> {
        let _ = self.stop.send(true);
        self.task.await?
    }

    /// Stops at once, as a crash would: in-flight handlers are dropped (their transactions roll
    /// back) and nothing is deleted; the broker redelivers what was not finished.
    pub fn kill(self) {
        self.task.abort();
    }

    /// Runs until `shutdown` completes, then stops.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()>,
    ) -> anyhow::Result<ConsumerReport> {
        shutdown.await;
        self.stop().await
    }
}

/// Starts consuming with `options` (its `queue_url` resolved) and `idempotency`.
pub async fn start(
    clients: &outbox_aws::AwsClients,
    pool: PgPool,
    options: ConsumerOptions,
    idempotency: Idempotency,
    print: bool,
) -> anyhow::Result<ShippingService> {
    migrate(&pool).await?;
    let consumer = Consumer::new(clients.sqs.clone(), clients.s3.clone(), options)?;
    let stats = consumer.stats();
    let shipping = Shipping::new(pool.clone(), print);
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let shutdown = async move {
        let _ = stopped.wait_for(|s| *s).await;
    };
    let task = match idempotency {
        Idempotency::Inbox => {
            let handler = PgInbox::new(pool, CONSUMER).handler(shipping);
            tokio::spawn(
                async move { Ok::<_, anyhow::Error>(consumer.run(handler, shutdown).await?) },
            )
        }
        Idempotency::DynamoDb(options) => {
            let handler = DynamoIdempotency::new(clients.dynamodb.clone(), options, shipping);
            tokio::spawn(
                async move { Ok::<_, anyhow::Error>(consumer.run(handler, shutdown).await?) },
            )
        }
    };
    Ok(ShippingService { stats, stop, task })
}

/// Starts consuming `source` (Kafka, NATS JetStream or RabbitMQ) with the broker's own client,
/// one message at a time in arrival order, each applied through the inbox
/// ([`Shipping::apply_once`]) and acknowledged after its transaction committed. `wait` bounds a
/// JetStream pull (a stop lets a pull in progress answer, and handles what it returns). Fails
/// when the broker cannot be reached or the stream/queue does not exist.
pub async fn start_broker(
    source: crate::broker::Source,
    pool: PgPool,
    wait: std::time::Duration,
    print: bool,
) -> anyhow::Result<ShippingService> {
    migrate(&pool).await?;
    let stats = Arc::new(ConsumerStats::default());
    let shipping = Shipping::new(pool.clone(), print);
    let inbox = PgInbox::new(pool, CONSUMER);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let task = crate::consume::spawn(source, wait, shipping, inbox, stats.clone(), stopped).await?;
    Ok(ShippingService { stats, stop, task })
}
