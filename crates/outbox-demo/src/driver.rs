//! The demo's driver: sends a short stream of orders to the orders service over HTTP, waits until
//! shipping has applied every event they caused, and summarises what happened.
//!
//! Order `i` is placed; paid unless `i % 4 == 3`; cancelled when `i % 4` is 2 (after paying) or 3
//! (unpaid). Order 0 also gets a note through the endpoint that still writes without events.
//! Then one more order is attempted whose event would be too large to deliver: the service must
//! refuse it (413) and write nothing.
//! The summary counts only this run's orders, so the demo can be run again on the same databases.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::header::CONTENT_TYPE;
use hyper::{Request, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use sqlx::PgPool;

use crate::orders::OrderView;

const CUSTOMERS: &[&str] = &["ada", "grace", "linus", "barbara", "ken", "margaret"];

/// A small JSON-over-HTTP client for the orders API.
pub struct Api {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
}

impl Api {
    /// `base` like `http://127.0.0.1:8080`.
    pub fn new(base: impl Into<String>) -> Self {
        Self {
            client: Client::builder(TokioExecutor::new()).build_http(),
            base: base.into().trim_end_matches('/').to_owned(),
        }
    }

    /// POSTs JSON; returns the status and the JSON body (`null` when empty).
    pub async fn post(
        &self,
        path: &str,
        body: serde_json::Value,
    ) -> anyhow::Result<(StatusCode, serde_json::Value)> {
        let request = Request::post(format!("{}{path}", self.base))
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))?;
        let response = tokio::time::timeout(Duration::from_secs(10), self.client.request(request))
            .await
            .map_err(|_| anyhow::anyhow!("POST {path}: no answer within 10 s"))??;
        let status = response.status();
        let bytes = response.into_body().collect().await?.to_bytes();
        let json = if bytes.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&bytes)?
        };
        Ok((status, json))
    }

    /// Waits until `GET /healthz` answers (bounded).
    pub async fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let request =
                Request::get(format!("{}/healthz", self.base)).body(Full::new(Bytes::new()))?;
            let ok = tokio::time::timeout(Duration::from_secs(2), self.client.request(request))
                .await
                .ok()
                .and_then(Result::ok)
                .is_some_and(|r| r.status().is_success());
            if ok {
                return Ok(());
            }
            if Instant::now() >= deadline {
                anyhow::bail!(
                    "the orders service at {} did not answer within {timeout:?}",
                    self.base
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// What the driver sent.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Sent {
    pub order_ids: Vec<String>,
    /// Event types the API calls enqueued, by type.
    pub events: BTreeMap<String, u64>,
    /// Writes that enqueued nothing (the legacy notes endpoint).
    pub notes: u64,
    /// Orders refused because their event could not be delivered (413; nothing written).
    pub refused: u64,
}

impl Sent {
    pub fn events_total(&self) -> u64 {
        self.events.values().sum()
    }
}

fn expect(status: StatusCode, json: &serde_json::Value, what: &str) -> anyhow::Result<()> {
    if !status.is_success() {
        anyhow::bail!("{what} failed with {status}: {json}");
    }
    Ok(())
}

/// Sends the stream of `orders` orders; prints a line per request unless `quiet`.
pub async fn send_orders(api: &Api, orders: usize, quiet: bool) -> anyhow::Result<Sent> {
    let mut sent = Sent::default();
    let count =
        |sent: &mut Sent, event: &str| *sent.events.entry(event.to_owned()).or_default() += 1;
    for i in 0..orders {
        let customer = CUSTOMERS[i % CUSTOMERS.len()];
        let total = 1000 + 250 * i as i64;
        let (status, json) = api
            .post(
                "/orders",
                serde_json::json!({"customer": customer, "total_cents": total}),
            )
            .await?;
        expect(status, &json, "POST /orders")?;
        let order: OrderView = serde_json::from_value(json)?;
        count(&mut sent, "OrderPlaced");
        let id = order.id.clone();
        let mut line = format!(
            "orders    {id:<15} placed for {customer} ({:.2} EUR)",
            total as f64 / 100.0
        );
        if i % 4 != 3 {
            let (status, json) = api
                .post(&format!("/orders/{id}/pay"), serde_json::Value::Null)
                .await?;
            expect(status, &json, "POST /orders/{id}/pay")?;
            count(&mut sent, "OrderPaid");
            line.push_str(", paid");
        }
        if i % 4 == 2 || i % 4 == 3 {
            let (status, json) = api
                .post(&format!("/orders/{id}/cancel"), serde_json::Value::Null)
                .await?;
            expect(status, &json, "POST /orders/{id}/cancel")?;
            count(&mut sent, "OrderCancelled");
            line.push_str(", cancelled");
        }
        if i == 0 {
            let (status, json) = api
                .post(
                    &format!("/orders/{id}/notes"),
                    serde_json::json!({"note": "leave at the door"}),
                )
                .await?;
            expect(status, &json, "POST /orders/{id}/notes")?;
            sent.notes += 1;
            line.push_str(", note added (legacy endpoint: no event)");
        }
        if !quiet {
            println!("{line}");
        }
        sent.order_ids.push(id);
    }
    Ok(sent)
}

/// Attempts one order whose `OrderPlaced` event would be over `max_payload_bytes` (a customer
/// name that long) and checks that the service refuses it with 413, as it must for an event no
/// destination would take. Prints a line unless `quiet`; counted in `sent.refused`.
pub async fn send_undeliverable_order(
    api: &Api,
    sent: &mut Sent,
    max_payload_bytes: usize,
    quiet: bool,
) -> anyhow::Result<()> {
    let customer = "x".repeat(max_payload_bytes + 1);
    let (status, json) = api
        .post(
            "/orders",
            serde_json::json!({"customer": customer, "total_cents": 1000}),
        )
        .await?;
    if status != StatusCode::PAYLOAD_TOO_LARGE {
        anyhow::bail!(
            "POST /orders with a {} byte customer name answered {status} ({json}): expected 413, \
             its event is over events.max_payload_bytes and could never be delivered",
            customer.len()
        );
    }
    sent.refused += 1;
    if !quiet {
        let reason = json["error"].as_str().unwrap_or("no reason given");
        println!(
            "orders    (refused)       a {} KB customer name: 413 {reason}",
            customer.len() / 1000
        );
    }
    Ok(())
}

/// What happened to this run's orders, read from both databases.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Observed {
    /// Outbox rows of these orders (any status).
    pub enqueued: i64,
    pub published: i64,
    pub pending: i64,
    pub dead: i64,
    /// Distinct events shipping applied.
    pub consumed: i64,
    /// Rows shipping applied (more than `consumed` means an event was applied twice).
    pub applied: i64,
    /// Orders whose events shipping applied out of version order.
    pub out_of_order: Vec<String>,
    /// The whole outbox's backlog (pending), this run or not.
    pub backlog: i64,
}

/// Reads [`Observed`] for `order_ids`.
pub async fn observe(
    outbox_pool: &PgPool,
    outbox_table: &str,
    shipping_pool: &PgPool,
    order_ids: &[String],
) -> anyhow::Result<Observed> {
    let (enqueued, published, pending, dead): (i64, i64, i64, i64) = sqlx::query_as(&format!(
        "SELECT count(*), count(*) FILTER (WHERE status = 'published'), \
                count(*) FILTER (WHERE status = 'pending'), count(*) FILTER (WHERE status = 'dead') \
         FROM {outbox_table} WHERE aggregate_type = 'order' AND aggregate_id = ANY($1)"
    ))
    .bind(order_ids)
    .fetch_one(outbox_pool)
    .await?;
    let backlog: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {outbox_table} WHERE status = 'pending'"
    ))
    .fetch_one(outbox_pool)
    .await?;
    let (consumed, applied): (i64, i64) = sqlx::query_as(
        "SELECT count(DISTINCT event_id), count(*) FROM shipping_log WHERE order_id = ANY($1)",
    )
    .bind(order_ids)
    .fetch_one(shipping_pool)
    .await?;
    // An order is in order when the versions, in the order applied, are exactly 1, 2, 3, ...
    let out_of_order: Vec<String> = sqlx::query_scalar(
        "SELECT order_id FROM (
             SELECT order_id, version, row_number() OVER (PARTITION BY order_id ORDER BY n) AS k
             FROM shipping_log WHERE order_id = ANY($1)) t
         WHERE version <> k GROUP BY order_id ORDER BY order_id",
    )
    .bind(order_ids)
    .fetch_all(shipping_pool)
    .await?;
    Ok(Observed {
        enqueued,
        published,
        pending,
        dead,
        consumed,
        applied,
        out_of_order,
        backlog,
    })
}

/// The run, summarised.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub sent: Sent,
    pub observed: Observed,
    /// From the last request to the last event applied (or the timeout).
    pub settle_seconds: f64,
    /// Every event applied exactly once, in order, nothing pending or dead.
    pub ok: bool,
}

impl Summary {
    pub fn render(&self) -> String {
        let o = &self.observed;
        let by_type: Vec<String> = self
            .sent
            .events
            .iter()
            .map(|(t, n)| format!("{n} {t}"))
            .collect();
        let mut text = String::new();
        text.push_str("==================== demo summary ====================\n");
        text.push_str(&format!(
            "orders created          {}\n",
            self.sent.order_ids.len()
        ));
        text.push_str(&format!(
            "events enqueued         {}  ({})\n",
            o.enqueued,
            by_type.join(", ")
        ));
        text.push_str(&format!(
            "writes without events   {}  (legacy notes endpoint)\n",
            self.sent.notes
        ));
        text.push_str(&format!(
            "orders refused          {}  (413: event too large for the queue; nothing written)\n",
            self.sent.refused
        ));
        text.push_str(&format!("events published        {}\n", o.published));
        text.push_str(&format!(
            "events consumed         {}  (applied {} times: {} duplicates applied)\n",
            o.consumed,
            o.applied,
            o.applied - o.consumed
        ));
        text.push_str(&format!(
            "orders out of order     {}{}\n",
            o.out_of_order.len(),
            if o.out_of_order.is_empty() {
                String::new()
            } else {
                format!("  ({})", o.out_of_order.join(", "))
            }
        ));
        text.push_str(&format!("dead-lettered           {}\n", o.dead));
        text.push_str(&format!("backlog (pending)       {}\n", o.backlog));
        text.push_str(&format!(
            "settled in              {:.1}s after the last request\n",
            self.settle_seconds
        ));
        text.push_str(if self.ok {
            "result                  OK: every event was published and consumed exactly once, in order\n"
        } else {
            "result                  FAILED: see the counts above\n"
        });
        text.push_str("======================================================");
        text
    }
}

/// Waits (bounded by `timeout`) until shipping applied every event of `sent`, then summarises.
pub async fn settle(
    outbox_pool: &PgPool,
    outbox_table: &str,
    shipping_pool: &PgPool,
    sent: Sent,
    timeout: Duration,
) -> anyhow::Result<Summary> {
    let started = Instant::now();
    let expected = sent.events_total() as i64;
    let mut observed;
    loop {
        observed = observe(outbox_pool, outbox_table, shipping_pool, &sent.order_ids).await?;
        let done = observed.consumed >= expected && observed.pending == 0;
        if done || started.elapsed() >= timeout {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let settle_seconds = started.elapsed().as_secs_f64();
    // A short quiet period: a duplicate application would show up now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    observed = observe(outbox_pool, outbox_table, shipping_pool, &sent.order_ids).await?;
    let ok = observed.enqueued == expected
        && observed.published == expected
        && observed.consumed == expected
        && observed.applied == expected
        && observed.out_of_order.is_empty()
        && observed.pending == 0
        && observed.dead == 0;
    Ok(Summary {
        sent,
        observed,
        settle_seconds,
        ok,
    })
}
