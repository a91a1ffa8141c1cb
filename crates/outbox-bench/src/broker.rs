//! Scenario `broker`: the relay publishing to the local SQS emulator through `outbox_aws`, against
//! a plain SDK `SendMessageBatch` loop of the same messages to the same emulator.
//!
//! moto slows down as a queue grows (every send counts the queue), so both sides work in chunks of
//! one relay batch and the queue is emptied between chunks, outside the timed part; chunks of the
//! two sides alternate so drift of the emulator hits both alike.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use aws_sdk_sqs::types::{MessageAttributeValue, SendMessageBatchRequestEntry};
use futures_util::future::join_all;
use outbox::{PgStore, PgStoreOptions, Publisher, Relay, RelayOptions};

use crate::db::BenchDb;
use crate::report::{fmt_num, Report, Table};

pub struct BrokerConfig {
    pub endpoint: String,
    pub chunks: usize,
    pub chunk: usize,
}

/// Whether something accepts TCP connections at the endpoint's host:port within 2 s. Only
/// loopback endpoints are accepted: a benchmark never talks to real AWS.
pub async fn reachable(endpoint: &str) -> anyhow::Result<bool> {
    let rest = endpoint.strip_prefix("http://").ok_or_else(|| {
        anyhow::anyhow!("the AWS emulator endpoint must be http:// on loopback, got {endpoint}")
    })?;
    let authority = rest.split('/').next().unwrap_or(rest);
    let (host, port) = authority.rsplit_once(':').unwrap_or((authority, "80"));
    anyhow::ensure!(
        matches!(host, "127.0.0.1" | "localhost"),
        "the AWS emulator endpoint must be on loopback, got {endpoint}"
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

pub async fn run(db: &BenchDb, cfg: &BrokerConfig, report: &mut Report) -> anyhow::Result<()> {
    let queue = format!(
        "outbox-bench-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let toml = format!(
        r#"
[local]
default_destination = "bench"
[local.destinations.bench]
kind = "sqs"
queue = "{queue}"
[local.aws]
endpoint = "{endpoint}"
"#,
        endpoint = cfg.endpoint
    );
    let config = outbox::Config::from_toml_str(&toml, "local")?;
    let publisher = outbox_aws::publisher_from_config(&config).await?;
    let sqs = outbox_aws::AwsClients::new(&outbox_aws::AwsSettings::from_config(&config)?)
        .await?
        .sqs;
    let url = sqs
        .create_queue()
        .queue_name(&queue)
        .send()
        .await
        .map_err(sdk("CreateQueue"))?
        .queue_url()
        .ok_or_else(|| anyhow::anyhow!("CreateQueue returned no URL"))?
        .to_owned();
    publisher
        .check()
        .await
        .map_err(|e| anyhow::anyhow!("publisher check: {e}"))?;

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
            publish_timeout: Duration::from_secs(60),
            ..RelayOptions::default()
        },
    );

    db.reset().await?;
    let mut ours = Duration::ZERO;
    let mut plain = Duration::ZERO;
    let mut ours_events = 0u64;
    let mut plain_events = 0u64;
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
        purge(&sqs, &url).await?;

        let messages = plain_messages(cfg.chunk);
        let start = Instant::now();
        // Same shape as the relay's publisher: one wave of up to 10 requests of 10, concurrently.
        let sent = join_all(messages.chunks(10).map(|entries| {
            sqs.send_message_batch()
                .queue_url(&url)
                .set_entries(Some(entries.to_vec()))
                .send()
        }))
        .await;
        plain += start.elapsed();
        for out in sent {
            let out = out.map_err(sdk("SendMessageBatch"))?;
            anyhow::ensure!(
                out.failed().is_empty(),
                "plain loop: failed entries {:?}",
                out.failed()
            );
            plain_events += out.successful().len() as u64;
        }
        purge(&sqs, &url).await?;
    }
    let _ = sqs.delete_queue().queue_url(&url).send().await;
    let ours_rate = ours_events as f64 / ours.as_secs_f64();
    let plain_rate = plain_events as f64 / plain.as_secs_f64();
    let mut table = Table::new(
        format!(
            "broker: SQS on the local emulator ({}), {} chunks of {} events (~200 B body, 4 attributes), queue emptied between chunks",
            cfg.endpoint, cfg.chunks, cfg.chunk
        ),
        &["relay (outbox_aws, incl. claim + settle) ev/s", "plain SDK SendMessageBatch ev/s", "relay / plain"],
    );
    table.row(vec![
        fmt_num(ours_rate),
        fmt_num(plain_rate),
        format!("{:.3}", ours_rate / plain_rate),
    ]);
    report.table(&table);
    report.result_vs(
        "broker",
        format!("events_per_s={} events={ours_events}", fmt_num(ours_rate)),
        ours_rate,
        plain_rate,
    );
    Ok(())
}

/// The messages a hand-written loop would send for the same events: the payload as body and the
/// same four metadata attributes the relay sets.
fn plain_messages(n: usize) -> Vec<SendMessageBatchRequestEntry> {
    let attr = |v: String| {
        MessageAttributeValue::builder()
            .data_type("String")
            .string_value(v)
            .build()
            .expect("data type is set")
    };
    (0..n)
        .map(|i| {
            let id = uuid::Uuid::now_v7();
            let body = serde_json::json!({
                "n": i, "amount_cents": i % 10000, "currency": "EUR", "note": "x".repeat(120)
            })
            .to_string();
            let attributes: HashMap<String, MessageAttributeValue> = [
                ("outbox-event-id", id.to_string()),
                ("outbox-event-type", "AccountCredited".to_owned()),
                ("outbox-aggregate-type", "account".to_owned()),
                ("outbox-aggregate-id", format!("acc-{i}")),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), attr(v)))
            .collect();
            SendMessageBatchRequestEntry::builder()
                .id(format!("m{}", i % 10))
                .message_body(body)
                .set_message_attributes(Some(attributes))
                .build()
                .expect("id and body are set")
        })
        .collect()
}

/// An SDK error with its whole chain (the SDK's Display says only "service error").
fn sdk<E: std::error::Error>(what: &'static str) -> impl Fn(E) -> anyhow::Error {
    move |e| {
        anyhow::anyhow!(
            "SQS {what}: {}",
            aws_sdk_sqs::error::DisplayErrorContext(&e)
        )
    }
}

/// Empties the queue outside the timed part. moto refuses a purge within 60 s of the previous one
/// (as SQS does), so this receives and deletes instead.
async fn purge(sqs: &aws_sdk_sqs::Client, url: &str) -> anyhow::Result<()> {
    loop {
        let out = sqs
            .receive_message()
            .queue_url(url)
            .max_number_of_messages(10)
            .visibility_timeout(60)
            .send()
            .await
            .map_err(sdk("ReceiveMessage"))?;
        let messages = out.messages();
        if messages.is_empty() {
            return Ok(());
        }
        let entries = messages
            .iter()
            .enumerate()
            .filter_map(|(i, m)| {
                aws_sdk_sqs::types::DeleteMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .set_receipt_handle(m.receipt_handle().map(str::to_owned))
                    .build()
                    .ok()
            })
            .collect::<Vec<_>>();
        sqs.delete_message_batch()
            .queue_url(url)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(sdk("DeleteMessageBatch"))?;
    }
}
