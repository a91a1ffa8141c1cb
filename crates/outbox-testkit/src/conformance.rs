//! The publisher conformance suite: one set of cases that every publisher kind runs against its
//! real broker (as Watermill's pub/sub tests do for its backends).
//!
//! A kind's test implements [`Fixture`] (fresh destinations, an unreachable broker, a missing
//! destination) and [`Receiver`] (reads what reached the broker), then calls [`run`]. The cases:
//! - **delivered in key order**: several keys interleaved, over several batches: everything
//!   arrives, each key in `seq` order, nothing twice;
//! - **ids and headers carried**: the event id is the broker's message / deduplication id, and the
//!   headers (with a W3C `traceparent`) travel with the message;
//! - **broker down**: every event fails as the *destination's* failure (no attempt charged, nothing
//!   dead), or the call is still waiting when the relay's publish timeout would end it (which the
//!   relay also counts as the destination's);
//! - **missing destination**: `check()` fails and names it, before anything is claimed;
//! - **oversized event**: permanent, with a reason; the other keys of the batch are delivered and
//!   the same key's later event is not sent;
//! - **through the relay**: events enqueued in PostgreSQL are drained by the real engine and all
//!   arrive in key order.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use async_trait::async_trait;
use outbox::{NewEvent, Outbox, OutboxEvent, PgStore, PgStoreOptions, Publisher, Relay};
use outbox::{RelayOptions, Schema};

use crate::TestDb;

/// The trace context every case sends in the headers.
pub const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// One message as the broker delivered it.
#[derive(Debug, Clone, PartialEq)]
pub struct Received {
    /// The broker's message or deduplication id (it must be the event id).
    pub message_id: String,
    /// The headers or attributes the message carried (as strings).
    pub headers: BTreeMap<String, String>,
    /// The body, parsed as JSON (the payload, an envelope or a CloudEvent, as configured).
    pub body: serde_json::Value,
}

/// Reads what reached one destination.
#[async_trait]
pub trait Receiver: Send {
    /// Waits until at least `n` messages arrived in all, or `within` passed; returns the messages
    /// that arrived since the last call, in arrival order (duplicates included).
    async fn receive(&mut self, n: usize, within: Duration) -> anyhow::Result<Vec<Received>>;
}

/// One publisher kind against its real broker.
#[async_trait]
pub trait Fixture: Send + Sync {
    /// A publisher to a fresh, empty destination, and a receiver of what reaches it.
    async fn fresh(&self) -> anyhow::Result<(Box<dyn Publisher>, Box<dyn Receiver>)>;
    /// A publisher configured for a broker that does not answer (e.g. a closed loopback port).
    async fn unreachable(&self) -> anyhow::Result<Box<dyn Publisher>>;
    /// A publisher to a destination that does not exist, and the name `check()` must mention.
    async fn missing(&self) -> anyhow::Result<(Box<dyn Publisher>, String)>;
    /// A payload size (bytes) the destination refuses; `None` when it takes any size.
    fn oversized_payload_bytes(&self) -> Option<usize>;
}

/// Runs every case against `fixture`; `db` runs the end-to-end case through the real relay.
pub async fn run(fixture: &dyn Fixture, db: &TestDb) -> anyhow::Result<()> {
    delivered_in_key_order(fixture)
        .await
        .context("case: delivered in key order")?;
    ids_and_headers_carried(fixture)
        .await
        .context("case: ids and headers carried")?;
    broker_down_is_the_destinations_failure(fixture)
        .await
        .context("case: broker down")?;
    missing_destination_is_named_by_check(fixture)
        .await
        .context("case: missing destination")?;
    oversized_event_is_permanent(fixture)
        .await
        .context("case: oversized event")?;
    through_the_relay(fixture, db)
        .await
        .context("case: through the relay")?;
    Ok(())
}

const WAIT: Duration = Duration::from_secs(20);

/// An event as the relay would hand it to a publisher.
pub fn event(seq: i64, key: &str, event_type: &str, payload: serde_json::Value) -> OutboxEvent {
    let mut headers = serde_json::Map::new();
    headers.insert("traceparent".into(), TRACEPARENT.into());
    headers.insert("x-conformance".into(), format!("{key}/{seq}").into());
    serde_json::from_value(serde_json::json!({
        "id": uuid::Uuid::now_v7(),
        "seq": seq,
        "aggregate_type": "conformance",
        "aggregate_id": key,
        "event_type": event_type,
        "payload": payload,
        "headers": headers,
        "created_at": chrono_now(),
    }))
    .expect("a valid event")
}

fn chrono_now() -> String {
    // RFC 3339 without a chrono dependency: the relay's events carry a UTC timestamp.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        now.subsec_micros()
    )
}

/// Days since 1970-01-01 to a (year, month, day) in the proleptic Gregorian calendar.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Checks that `received` holds each of `sent` exactly once, each key in `seq` order.
pub fn check_delivery(sent: &[OutboxEvent], received: &[Received]) -> anyhow::Result<()> {
    let by_id: HashMap<String, &OutboxEvent> = sent.iter().map(|e| (e.id.to_string(), e)).collect();
    let mut seen = HashSet::new();
    let mut last_seq: HashMap<&str, i64> = HashMap::new();
    for r in received {
        let Some(event) = by_id.get(&r.message_id) else {
            bail!(
                "received a message whose id {:?} is no event id",
                r.message_id
            );
        };
        ensure!(
            seen.insert(&r.message_id),
            "event {} arrived twice",
            r.message_id
        );
        if let Some(previous) = last_seq.insert(&event.aggregate_id, event.seq) {
            ensure!(
                previous < event.seq,
                "key {} out of order: seq {} after {previous}",
                event.aggregate_id,
                event.seq
            );
        }
    }
    ensure!(
        seen.len() == sent.len(),
        "{} of {} events arrived",
        seen.len(),
        sent.len()
    );
    Ok(())
}

async fn delivered_in_key_order(fixture: &dyn Fixture) -> anyhow::Result<()> {
    let (publisher, mut receiver) = fixture.fresh().await?;
    publisher
        .check()
        .await
        .map_err(|e| anyhow::anyhow!("check: {e}"))?;
    let mut sent = Vec::new();
    let mut seq = 0;
    for _batch in 0..3 {
        let mut batch = Vec::new();
        for i in 0..12 {
            seq += 1;
            let key = ["a", "b", "c"][i % 3];
            batch.push(event(seq, key, "Ordered", serde_json::json!({ "n": seq })));
        }
        let results = publisher.publish(&batch).await;
        ensure!(results.len() == batch.len(), "one result per event");
        for (e, r) in batch.iter().zip(&results) {
            ensure!(r.is_ok(), "event {} (seq {}) failed: {r:?}", e.id, e.seq);
        }
        sent.extend(batch);
    }
    let received = receiver.receive(sent.len(), WAIT).await?;
    check_delivery(&sent, &received)
}

async fn ids_and_headers_carried(fixture: &dyn Fixture) -> anyhow::Result<()> {
    let (publisher, mut receiver) = fixture.fresh().await?;
    let sent = vec![event(1, "h", "WithHeaders", serde_json::json!({ "x": 1 }))];
    let results = publisher.publish(&sent).await;
    ensure!(results.iter().all(|r| r.is_ok()), "{results:?}");
    let received = receiver.receive(1, WAIT).await?;
    check_delivery(&sent, &received)?;
    let headers = &received[0].headers;
    let has = |name: &str, value: &str| {
        headers.values().any(|v| v == value) || headers.get(name).map(String::as_str) == Some(value)
    };
    ensure!(
        has("traceparent", TRACEPARENT),
        "the traceparent header did not travel: {headers:?}"
    );
    ensure!(
        has("x-conformance", "h/1"),
        "the event's own header did not travel: {headers:?}"
    );
    Ok(())
}

async fn broker_down_is_the_destinations_failure(fixture: &dyn Fixture) -> anyhow::Result<()> {
    let publisher = fixture.unreachable().await?;
    let batch = vec![
        event(1, "d", "Down", serde_json::json!({})),
        event(2, "e", "Down", serde_json::json!({})),
    ];
    // The relay bounds every call with its publish timeout and counts a timeout as the
    // destination's failure; a publisher still waiting then is therefore conformant too.
    match tokio::time::timeout(Duration::from_secs(15), publisher.publish(&batch)).await {
        Err(_elapsed) => Ok(()),
        Ok(results) => {
            ensure!(results.len() == batch.len(), "one result per event");
            for r in &results {
                match r {
                    Err(e) if e.is_destination_failure() => {}
                    other => {
                        bail!("expected the destination's failure (Unavailable), got {other:?}")
                    }
                }
            }
            Ok(())
        }
    }
}

async fn missing_destination_is_named_by_check(fixture: &dyn Fixture) -> anyhow::Result<()> {
    let (publisher, name) = fixture.missing().await?;
    match tokio::time::timeout(Duration::from_secs(30), publisher.check()).await {
        Err(_) => bail!("check() did not answer within 30 s"),
        Ok(Ok(())) => bail!("check() passed for a destination that does not exist ({name})"),
        Ok(Err(e)) => {
            ensure!(
                e.reason().contains(&name),
                "check() must name the missing destination {name:?}: {e}"
            );
            Ok(())
        }
    }
}

async fn oversized_event_is_permanent(fixture: &dyn Fixture) -> anyhow::Result<()> {
    let Some(size) = fixture.oversized_payload_bytes() else {
        return Ok(());
    };
    let (publisher, mut receiver) = fixture.fresh().await?;
    let big = "x".repeat(size);
    let batch = vec![
        event(1, "big", "Big", serde_json::json!({ "blob": big })),
        event(2, "small", "Small", serde_json::json!({})),
        event(3, "big", "AfterBig", serde_json::json!({})),
    ];
    let results = publisher.publish(&batch).await;
    ensure!(results.len() == 3, "one result per event");
    match &results[0] {
        Err(e) if !e.is_retryable() && !e.reason().is_empty() => {}
        other => bail!("an oversized event must fail permanently with a reason, got {other:?}"),
    }
    ensure!(
        results[1].is_ok(),
        "another key's event failed: {:?}",
        results[1]
    );
    ensure!(
        matches!(&results[2], Err(e) if e.is_retryable()),
        "the same key's later event must not be sent after its failure: {:?}",
        results[2]
    );
    let received = receiver.receive(1, WAIT).await?;
    check_delivery(&batch[1..2], &received)
}

async fn through_the_relay(fixture: &dyn Fixture, db: &TestDb) -> anyhow::Result<()> {
    let (publisher, mut receiver) = fixture.fresh().await?;
    let outbox = Outbox::new(Schema::default());
    let mut sent = Vec::new();
    let mut tx = db.pool.begin().await?;
    for i in 0..40 {
        let key = format!("r{}", i % 4);
        let payload = serde_json::json!({ "i": i });
        // Inserted in this order in one transaction: `seq` follows `i`, as the expected events'.
        let expected = event(i + 1, &key, "Relayed", payload.clone());
        outbox
            .enqueue(
                &mut tx,
                NewEvent::new("conformance", &key, "Relayed")
                    .with_id(expected.id)
                    .header("traceparent", TRACEPARENT)
                    .payload(&payload)?,
            )
            .await?;
        sent.push(expected);
    }
    tx.commit().await?;
    let store = PgStore::new(
        db.pool.clone(),
        PgStoreOptions {
            notify: false,
            retention: Duration::from_secs(3600),
            ..PgStoreOptions::default()
        },
    )
    .await?;
    let relay = Relay::new(
        store,
        publisher,
        RelayOptions {
            batch_size: 16,
            ..RelayOptions::default()
        },
    );
    let report = relay.drain().await?;
    ensure!(
        report.published == 40 && report.dead == 0,
        "the relay published {} and dead-lettered {} of 40",
        report.published,
        report.dead
    );
    let received = receiver.receive(sent.len(), WAIT).await?;
    check_delivery(&sent, &received)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_civil() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_788), (2026, 12, 1));
    }

    fn received(e: &OutboxEvent) -> Received {
        Received {
            message_id: e.id.to_string(),
            headers: BTreeMap::new(),
            body: serde_json::Value::Null,
        }
    }

    #[test]
    fn delivery_checks_catch_loss_duplicates_and_reordering() {
        let sent = vec![
            event(1, "a", "E", serde_json::json!({})),
            event(2, "a", "E", serde_json::json!({})),
            event(3, "b", "E", serde_json::json!({})),
        ];
        let ok: Vec<Received> = [&sent[0], &sent[2], &sent[1]].map(received).to_vec();
        check_delivery(&sent, &ok).unwrap();
        let lost: Vec<Received> = [&sent[0], &sent[1]].map(received).to_vec();
        assert!(check_delivery(&sent, &lost).is_err());
        let twice: Vec<Received> = [&sent[0], &sent[1], &sent[2], &sent[2]]
            .map(received)
            .to_vec();
        assert!(check_delivery(&sent, &twice).is_err());
        let reordered: Vec<Received> = [&sent[1], &sent[0], &sent[2]].map(received).to_vec();
        assert!(check_delivery(&sent, &reordered).is_err());
    }
}
