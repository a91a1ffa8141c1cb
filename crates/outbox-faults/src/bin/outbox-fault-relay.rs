//! `outbox-fault-relay`: the relay and a queue consumer with injectable faults, for the fault suite.
//!
//! - `outbox-fault-relay relay [--publisher SPEC]`: the same code path as `outbox relay`
//!   (`Config::load` from `OUTBOX_CONFIG`/`DATABASE_URL`, `connect_from_config`,
//!   `relay_from_config`, `Relay::run` until SIGTERM), with the publisher wrapped so that, with
//!   probability `OUTBOX_FAULTS_STALL_PROB`, a publish call first stalls for
//!   `OUTBOX_FAULTS_STALL_MS` (longer than the claim's bound: a relay paused mid-publish).
//! - `outbox-fault-relay consume ENDPOINT QUEUE_URL DATABASE_URL CRASH_PROB`: receives from an SQS
//!   queue, handles each message in a database transaction with an inbox table (deduplication by
//!   event id), and with probability `CRASH_PROB` aborts the process after handling and before
//!   deleting the message (a consumer crash before its acknowledgement).

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use async_trait::async_trait;
use outbox::config::{Config, ConfigSource, PublisherSpec};
use outbox::{OutboxEvent, PublishResult, Publisher};

struct Stalling<P> {
    inner: P,
    probability: f64,
    stall: Duration,
}

#[async_trait]
impl<P: Publisher> Publisher for Stalling<P> {
    async fn publish(&self, batch: &[OutboxEvent]) -> Vec<PublishResult> {
        if self.probability > 0.0 && fastrand::f64() < self.probability {
            tracing::warn!(events = batch.len(), stall = ?self.stall, "injected stall inside publish");
            tokio::time::sleep(self.stall).await;
        }
        self.inner.publish(batch).await
    }
    async fn check(&self) -> Result<(), outbox::PublishError> {
        self.inner.check().await
    }
}

fn env_f64(name: &str) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

async fn relay(spec: Option<PublisherSpec>) -> Result<()> {
    let mut config = Config::load(&ConfigSource::from_env())?;
    if let Some(spec) = spec {
        config.publisher = spec;
    }
    let inner: Box<dyn Publisher> = outbox_aws::publisher_from_config(&config).await?;
    let publisher = Stalling {
        inner,
        probability: env_f64("OUTBOX_FAULTS_STALL_PROB"),
        stall: Duration::from_millis(env_f64("OUTBOX_FAULTS_STALL_MS") as u64),
    };
    let pool = outbox::connect_from_config(&config, "outbox-fault-relay").await?;
    let relay = outbox::relay_from_config(&config, pool, publisher).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    relay
        .run(async move {
            term.recv().await;
        })
        .await?;
    Ok(())
}

async fn consume(endpoint: &str, queue_url: &str, database_url: &str, crash: f64) -> Result<()> {
    let mut settings = outbox_aws::AwsSettings::new(outbox_aws::Profile::Local);
    settings.aws.endpoint = Some(endpoint.to_owned());
    let sqs = outbox_aws::AwsClients::new(&settings).await?.sqs;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(database_url)
        .await
        .context("consumer database")?;
    loop {
        let out = match sqs
            .receive_message()
            .queue_url(queue_url)
            // One message per receive: at a crash only that message is in flight. (With batches,
            // moto redelivers a FIFO group's in-flight messages out of order after their
            // visibility timeout, which real SQS does not: it blocks the group.)
            .max_number_of_messages(1)
            .wait_time_seconds(1)
            .message_attribute_names("All")
            .send()
            .await
        {
            Ok(out) => out,
            Err(e) => {
                tracing::warn!(error = %e, "receive failed");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        for m in out.messages() {
            let Some(id) = m
                .message_attributes()
                .and_then(|a| a.get("outbox-event-id"))
                .and_then(|v| v.string_value())
                .and_then(|s| s.parse::<uuid::Uuid>().ok())
            else {
                bail!("message without a valid outbox-event-id attribute");
            };
            let key = m
                .message_attributes()
                .and_then(|a| a.get("outbox-aggregate-id"))
                .and_then(|v| v.string_value())
                .unwrap_or_default()
                .to_owned();
            // Handle: the inbox row and the effect commit together, so a redelivery is a no-op.
            let mut tx = pool.begin().await?;
            let fresh = sqlx::query(
                "INSERT INTO fault_inbox (event_id) VALUES ($1) ON CONFLICT DO NOTHING",
            )
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected()
                == 1;
            if fresh {
                sqlx::query("INSERT INTO fault_effect (event_id, key) VALUES ($1, $2)")
                    .bind(id)
                    .bind(&key)
                    .execute(&mut *tx)
                    .await?;
            } else {
                sqlx::query(
                    "UPDATE fault_inbox SET redeliveries = redeliveries + 1 WHERE event_id = $1",
                )
                .bind(id)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            if crash > 0.0 && fastrand::f64() < crash {
                // Handled, not acknowledged: the broker redelivers after the visibility timeout.
                eprintln!("injected consumer crash after handling {id}, before delete");
                std::process::abort();
            }
            if let Some(h) = m.receipt_handle() {
                sqs.delete_message()
                    .queue_url(queue_url)
                    .receipt_handle(h)
                    .send()
                    .await?;
            }
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("OUTBOX_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match args.first().map(String::as_str) {
            Some("relay") => {
                let spec = match (args.get(1).map(String::as_str), args.get(2)) {
                    (Some("--publisher"), Some(s)) => {
                        Some(s.parse().map_err(|e: String| anyhow::anyhow!(e))?)
                    }
                    _ => None,
                };
                relay(spec).await
            }
            Some("consume") if args.len() == 5 => {
                let crash: f64 = args[4].parse().context("CRASH_PROB")?;
                consume(&args[1], &args[2], &args[3], crash).await
            }
            _ => bail!("usage: outbox-fault-relay relay [--publisher SPEC] | consume ENDPOINT QUEUE_URL DATABASE_URL CRASH_PROB"),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
