//! `kind = "webhook"` against a real HTTP server started by each test on 127.0.0.1 (an ephemeral
//! port): the publisher conformance suite (single and batch mode), the Standard Webhooks signature
//! checked by an independent implementation, `Retry-After`, refusals, a receiver down for longer
//! than the retry budget, CloudEvents binary mode, configuration errors.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use hmac::{Hmac, Mac};
use outbox::{
    Config, NewEvent, Outbox, OutboxEvent, PgStore, PgStoreOptions, PublishError, Publisher,
    Registry, Relay, RelayOptions, Schema,
};
use outbox_http::{BodyFormat, Mode, Webhook, WebhookDestination, WebhookPublisher};
use outbox_testkit::conformance::{self, Fixture, Received, Receiver};
use outbox_testkit::TestDb;

// ---------------------------------------------------------------------------------------------
// The receiver: a real HTTP server that records every request and answers as each path is told.

/// One request as the server saw it.
#[derive(Debug, Clone)]
struct Seen {
    at: Instant,
    method: String,
    path: String,
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
    /// The status the server answered.
    status: u16,
}

/// How a path answers.
#[derive(Debug, Clone)]
enum Rule {
    /// These answers in turn, then 200.
    Script(VecDeque<Reply>),
    /// Always this answer.
    Always(Reply),
    /// 400 with this long body when the request body contains the text, else 200.
    RefuseContaining(String),
}

#[derive(Debug, Clone)]
struct Reply {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: String,
}

impl Reply {
    fn status(status: u16) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: String::new(),
        }
    }
}

#[derive(Default)]
struct State {
    seen: Vec<Seen>,
    rules: HashMap<String, Rule>,
}

#[derive(Clone)]
struct Server {
    base: String,
    state: Arc<Mutex<State>>,
}

impl Server {
    async fn start() -> Self {
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        let app = axum::Router::new().fallback(
            move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                let state = shared.clone();
                async move { answer(&state, method, uri, headers, body) }
            },
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("a local address");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            base: format!("http://{addr}"),
            state,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn rule(&self, path: &str, rule: Rule) {
        self.state
            .lock()
            .unwrap()
            .rules
            .insert(path.to_owned(), rule);
    }

    /// The POSTs to `path`, in arrival order.
    fn posts(&self, path: &str) -> Vec<Seen> {
        self.state
            .lock()
            .unwrap()
            .seen
            .iter()
            .filter(|s| s.method == "POST" && s.path == path)
            .cloned()
            .collect()
    }

    /// The POSTs to `path` the server accepted (2xx).
    fn accepted(&self, path: &str) -> Vec<Seen> {
        self.posts(path)
            .into_iter()
            .filter(|s| (200..300).contains(&s.status))
            .collect()
    }
}

fn answer(
    state: &Mutex<State>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_owned();
    let mut state = state.lock().unwrap();
    let reply = if path.starts_with("/missing") {
        Reply::status(404)
    } else if method == Method::HEAD {
        Reply::status(405)
    } else {
        match state.rules.get_mut(&path) {
            Some(Rule::Script(replies)) => replies.pop_front().unwrap_or(Reply::status(200)),
            Some(Rule::Always(reply)) => reply.clone(),
            Some(Rule::RefuseContaining(text)) => {
                if String::from_utf8_lossy(&body).contains(text.as_str()) {
                    Reply {
                        status: 400,
                        headers: Vec::new(),
                        body: format!("invalid event ({text}): {}", "x".repeat(2000)),
                    }
                } else {
                    Reply::status(200)
                }
            }
            None => Reply::status(200),
        }
    };
    state.seen.push(Seen {
        at: Instant::now(),
        method: method.to_string(),
        path,
        headers: headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: body.to_vec(),
        status: reply.status,
    });
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, reply.body).into_response();
    for (name, value) in reply.headers {
        if let Ok(v) = value.parse() {
            response.headers_mut().insert(name, v);
        }
    }
    response
}

fn unique() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_owned()
}

/// A 32-byte Standard Webhooks secret.
fn secret() -> String {
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode([42u8; 32])
    )
}

fn destination(url: &str, mode: Mode, body: BodyFormat) -> WebhookDestination {
    let mut d = WebhookDestination::new(url);
    d.mode = mode;
    d.body = body;
    d.secret = Some(secret());
    d.timeout = Duration::from_secs(3);
    d.max_body_bytes = 64 * 1024;
    d.max_retry_after = Duration::from_secs(30);
    d
}

fn publisher(d: WebhookDestination) -> WebhookPublisher {
    WebhookPublisher::new("test", d).expect("a valid destination")
}

// ---------------------------------------------------------------------------------------------
// The conformance suite.

/// What reached one path, as the suite reads it: one message per request (single mode) or per
/// element of each array (batch mode: the envelope's id and headers).
struct PathReceiver {
    server: Server,
    path: String,
    mode: Mode,
    next: usize,
    total: usize,
}

impl PathReceiver {
    fn messages(&self, seen: &Seen) -> anyhow::Result<Vec<Received>> {
        let body: serde_json::Value = serde_json::from_slice(&seen.body)?;
        Ok(match self.mode {
            Mode::Single => vec![Received {
                message_id: seen.headers.get("webhook-id").cloned().unwrap_or_default(),
                headers: seen.headers.clone(),
                body,
            }],
            Mode::Batch => {
                let Some(items) = body.as_array() else {
                    anyhow::bail!("a batch request's body is not an array: {body}");
                };
                items
                    .iter()
                    .map(|item| Received {
                        message_id: item["id"].as_str().unwrap_or_default().to_owned(),
                        headers: item["headers"]
                            .as_object()
                            .map(|h| {
                                h.iter()
                                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_owned()))
                                    .collect()
                            })
                            .unwrap_or_default(),
                        body: item.clone(),
                    })
                    .collect()
            }
        })
    }
}

#[async_trait]
impl Receiver for PathReceiver {
    async fn receive(&mut self, n: usize, within: Duration) -> anyhow::Result<Vec<Received>> {
        let deadline = Instant::now() + within;
        let mut out = Vec::new();
        loop {
            let accepted = self.server.accepted(&self.path);
            while self.next < accepted.len() {
                let messages = self.messages(&accepted[self.next])?;
                self.next += 1;
                self.total += messages.len();
                out.extend(messages);
            }
            if self.total >= n || Instant::now() >= deadline {
                return Ok(out);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

struct Endpoints {
    server: Server,
    mode: Mode,
    body: BodyFormat,
}

#[async_trait]
impl Fixture for Endpoints {
    async fn fresh(&self) -> anyhow::Result<(Box<dyn Publisher>, Box<dyn Receiver>)> {
        let path = format!("/conf/{}", unique());
        let p = publisher(destination(&self.server.url(&path), self.mode, self.body));
        let receiver = PathReceiver {
            server: self.server.clone(),
            path,
            mode: self.mode,
            next: 0,
            total: 0,
        };
        Ok((Box::new(p), Box::new(receiver)))
    }

    async fn unreachable(&self) -> anyhow::Result<Box<dyn Publisher>> {
        // Port 1 on loopback: nothing listens, the connection is refused.
        Ok(Box::new(publisher(destination(
            "http://127.0.0.1:1/hook",
            self.mode,
            self.body,
        ))))
    }

    async fn missing(&self) -> anyhow::Result<(Box<dyn Publisher>, String)> {
        let path = format!("/missing-{}", unique());
        Ok((
            Box::new(publisher(destination(
                &self.server.url(&path),
                self.mode,
                self.body,
            ))),
            path,
        ))
    }

    fn oversized_payload_bytes(&self) -> Option<usize> {
        Some(64 * 1024 + 1)
    }
}

#[tokio::test]
async fn webhook_passes_the_conformance_suite() {
    let server = Server::start().await;
    let db = TestDb::new().await.unwrap();
    let fixture = Endpoints {
        server,
        mode: Mode::Single,
        body: BodyFormat::Payload,
    };
    conformance::run(&fixture, &db).await.unwrap();
}

#[tokio::test]
async fn webhook_batch_mode_passes_the_conformance_suite() {
    let server = Server::start().await;
    let db = TestDb::new().await.unwrap();
    let fixture = Endpoints {
        server,
        mode: Mode::Batch,
        body: BodyFormat::Envelope,
    };
    conformance::run(&fixture, &db).await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// The signature, checked the way a receiver would (hmac + sha2, not the crate's ring).

/// The Standard Webhooks verification: `whsec_` secret, `{id}.{timestamp}.{body}`, HMAC-SHA256,
/// one of the space-separated `v1,<base64>` signatures matching, a timestamp within 5 minutes.
fn verify(secret: &str, headers: &BTreeMap<String, String>, body: &[u8]) -> Result<(), String> {
    let id = headers.get("webhook-id").ok_or("no webhook-id")?;
    let timestamp = headers
        .get("webhook-timestamp")
        .ok_or("no webhook-timestamp")?;
    let signatures = headers
        .get("webhook-signature")
        .ok_or("no webhook-signature")?;
    let sent: i64 = timestamp.parse().map_err(|_| "timestamp not a number")?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    if (now - sent).abs() > 300 {
        return Err(format!(
            "timestamp {sent} is more than 5 minutes from {now}"
        ));
    }
    let key = base64::engine::general_purpose::STANDARD
        .decode(secret.trim_start_matches("whsec_"))
        .map_err(|e| e.to_string())?;
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&key).map_err(|e| e.to_string())?;
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    let expected = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    if signatures
        .split(' ')
        .any(|s| s.strip_prefix("v1,") == Some(expected.as_str()))
    {
        Ok(())
    } else {
        Err(format!("no signature matches: {signatures}"))
    }
}

#[tokio::test]
async fn the_signature_verifies_with_an_independent_implementation() {
    let server = Server::start().await;
    let path = format!("/signed/{}", unique());
    let p = publisher(destination(
        &server.url(&path),
        Mode::Single,
        BodyFormat::Envelope,
    ));
    let event = conformance::event(1, "k", "Signed", serde_json::json!({"amount": "12.50"}));
    let results = p.publish(std::slice::from_ref(&event)).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let posts = server.posts(&path);
    assert_eq!(posts.len(), 1);
    let seen = &posts[0];
    assert_eq!(seen.headers["webhook-id"], event.id.to_string());
    assert_eq!(seen.headers["content-type"], "application/json");
    verify(&secret(), &seen.headers, &seen.body).unwrap();
    // The check is not vacuous: another body, id or secret fails it.
    let mut tampered = seen.body.clone();
    tampered.push(b' ');
    assert!(verify(&secret(), &seen.headers, &tampered).is_err());
    let mut other_id = seen.headers.clone();
    other_id.insert("webhook-id".into(), uuid::Uuid::now_v7().to_string());
    assert!(verify(&secret(), &other_id, &seen.body).is_err());
    let other_secret = format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode([7u8; 32])
    );
    assert!(verify(&other_secret, &seen.headers, &seen.body).is_err());
    let envelope: serde_json::Value = serde_json::from_slice(&seen.body).unwrap();
    assert_eq!(envelope["id"], event.id.to_string());
    assert_eq!(seen.headers["traceparent"], conformance::TRACEPARENT);
    assert_eq!(seen.headers["outbox-event-type"], "Signed");
}

#[tokio::test]
async fn without_a_secret_nothing_is_signed_and_static_headers_are_sent() {
    let server = Server::start().await;
    let path = format!("/plain/{}", unique());
    let mut d = destination(&server.url(&path), Mode::Single, BodyFormat::Payload);
    d.secret = None;
    d.headers
        .insert("Authorization".into(), "Bearer t0k3n".into());
    let p = publisher(d);
    let event = conformance::event(1, "k", "Plain", serde_json::json!({}));
    assert!(p.publish(&[event]).await.iter().all(Result::is_ok));
    let seen = &server.posts(&path)[0];
    assert!(!seen.headers.contains_key("webhook-signature"));
    assert!(seen.headers.contains_key("webhook-timestamp"));
    assert_eq!(seen.headers["authorization"], "Bearer t0k3n");
}

// ---------------------------------------------------------------------------------------------
// Failure paths, through the real relay where the outcome is the relay's (dead or not).

async fn enqueue(db: &TestDb, events: &[(&str, &str)]) -> Vec<uuid::Uuid> {
    let outbox = Outbox::new(Schema::default());
    let mut tx = db.pool.begin().await.unwrap();
    let mut ids = Vec::new();
    for (i, (key, event_type)) in events.iter().enumerate() {
        let id = uuid::Uuid::now_v7();
        outbox
            .enqueue(
                &mut tx,
                NewEvent::new("order", *key, *event_type)
                    .with_id(id)
                    .payload(&serde_json::json!({ "i": i, "key": key }))
                    .unwrap(),
            )
            .await
            .unwrap();
        ids.push(id);
    }
    tx.commit().await.unwrap();
    ids
}

async fn relay_over(
    db: &TestDb,
    publisher: WebhookPublisher,
    options: RelayOptions,
) -> Relay<PgStore, WebhookPublisher> {
    let store = PgStore::new(
        db.pool.clone(),
        PgStoreOptions {
            notify: false,
            retention: Duration::from_secs(3600),
            ..PgStoreOptions::default()
        },
    )
    .await
    .unwrap();
    Relay::new(store, publisher, options)
}

/// Fast probes and retries, so that a test would see any request sent too early.
fn quick_relay() -> RelayOptions {
    RelayOptions {
        batch_size: 16,
        poll_interval: Duration::from_millis(50),
        backoff: outbox::Backoff {
            base: Duration::from_millis(100),
            max: Duration::from_millis(400),
        },
        destination_backoff_max: Duration::from_millis(400),
        ..RelayOptions::default()
    }
}

/// The accepted requests' event ids (webhook-id) in arrival order.
fn accepted_ids(server: &Server, path: &str) -> Vec<String> {
    server
        .accepted(path)
        .iter()
        .map(|s| s.headers["webhook-id"].clone())
        .collect()
}

#[tokio::test]
async fn a_429_with_retry_after_holds_the_destination_then_everything_arrives_once_in_order() {
    let server = Server::start().await;
    let db = TestDb::new().await.unwrap();
    let path = format!("/throttled/{}", unique());
    server.rule(
        &path,
        Rule::Script(VecDeque::from([Reply {
            status: 429,
            headers: vec![("retry-after", "2".into())],
            body: "slow down".into(),
        }])),
    );
    let ids = enqueue(
        &db,
        &[("a", "E"), ("b", "E"), ("a", "E"), ("b", "E"), ("a", "E")],
    )
    .await;
    let mut d = destination(&server.url(&path), Mode::Single, BodyFormat::Payload);
    d.max_concurrency = 1; // the first request alone meets the 429
    let relay = relay_over(&db, publisher(d), quick_relay()).await;
    let handle = relay.spawn();
    let deadline = Instant::now() + Duration::from_secs(20);
    while handle.stats().published < 5 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stats = handle.stop().await.unwrap();
    assert_eq!((stats.published, stats.dead), (5, 0), "{stats:?}");
    assert!(
        stats.deferred >= 1,
        "the 429 deferred the destination: {stats:?}"
    );
    let posts = server.posts(&path);
    assert_eq!(posts[0].status, 429, "{posts:?}");
    // Nothing reached the receiver before its Retry-After passed, although the relay probed the
    // destination every 100-400 ms meanwhile.
    let waited = posts[1].at.duration_since(posts[0].at);
    assert!(
        waited >= Duration::from_millis(1900),
        "sent again after {waited:?}"
    );
    // Each event accepted once, each key in order.
    let accepted = accepted_ids(&server, &path);
    assert_eq!(accepted.len(), 5, "{accepted:?}");
    let position = |id: &uuid::Uuid| accepted.iter().position(|a| *a == id.to_string()).unwrap();
    assert!(position(&ids[0]) < position(&ids[2]) && position(&ids[2]) < position(&ids[4]));
    assert!(position(&ids[1]) < position(&ids[3]));
}

#[tokio::test]
async fn a_refused_event_is_permanent_with_the_status_and_other_keys_are_delivered() {
    let server = Server::start().await;
    let path = format!("/strict/{}", unique());
    server.rule(&path, Rule::RefuseContaining("Poison".into()));
    let p = publisher(destination(
        &server.url(&path),
        Mode::Single,
        BodyFormat::Envelope,
    ));
    let batch = vec![
        conformance::event(1, "a", "Poison", serde_json::json!({})),
        conformance::event(2, "b", "Fine", serde_json::json!({})),
        conformance::event(3, "a", "Fine", serde_json::json!({})),
        conformance::event(4, "c", "Fine", serde_json::json!({})),
    ];
    let results = p.publish(&batch).await;
    match &results[0] {
        Err(PublishError::Permanent(reason)) => {
            assert!(reason.contains("HTTP 400 Bad Request"), "{reason}");
            assert!(reason.contains("invalid event (Poison)"), "{reason}");
            assert!(
                reason.contains("(truncated)") && reason.len() < 1200,
                "{reason}"
            );
        }
        other => panic!("expected a permanent failure, got {other:?}"),
    }
    assert!(results[1].is_ok() && results[3].is_ok(), "{results:?}");
    assert!(
        matches!(&results[2], Err(PublishError::Retryable(r)) if r.contains("earlier event")),
        "the key stops at its failure: {results:?}"
    );
    let accepted = accepted_ids(&server, &path);
    assert_eq!(accepted.len(), 2);
    assert!(!accepted.contains(&batch[2].id.to_string()));

    // Through the relay: the refused event is dead at once, the other keys are published.
    let db = TestDb::new().await.unwrap();
    let relay_path = format!("/strict/{}", unique());
    server.rule(&relay_path, Rule::RefuseContaining("Poison".into()));
    let ids = enqueue(&db, &[("a", "Poison"), ("b", "Fine"), ("c", "Fine")]).await;
    let p = publisher(destination(
        &server.url(&relay_path),
        Mode::Single,
        BodyFormat::Envelope,
    ));
    let report = relay_over(&db, p, quick_relay())
        .await
        .drain()
        .await
        .unwrap();
    assert_eq!((report.published, report.dead), (2, 1), "{report:?}");
    let error = dead_error(&db, ids[0]).await;
    assert!(error.contains("HTTP 400"), "{error}");
}

/// The error recorded with a dead event.
async fn dead_error(db: &TestDb, id: uuid::Uuid) -> String {
    outbox::postgres::dead_event(&db.pool, &Schema::default(), id)
        .await
        .unwrap()
        .and_then(|d| d.event.last_error)
        .unwrap_or_default()
}

#[tokio::test]
async fn a_receiver_down_longer_than_the_retry_budget_holds_everything_and_kills_nothing() {
    let server = Server::start().await;
    let db = TestDb::new().await.unwrap();
    let path = format!("/down/{}", unique());
    server.rule(&path, Rule::Always(Reply::status(503)));
    let ids = enqueue(&db, &[("a", "E"), ("b", "E"), ("a", "E")]).await;
    let options = RelayOptions {
        max_attempts: 2,
        ..quick_relay()
    };
    let p = publisher(destination(
        &server.url(&path),
        Mode::Single,
        BodyFormat::Payload,
    ));
    let relay = relay_over(&db, p, options).await;
    let handle = relay.spawn();
    // Many more tries than max_attempts (2) reach the receiver...
    let deadline = Instant::now() + Duration::from_secs(40);
    while server.posts(&path).len() < 5 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let during = handle.stats();
    let tries = server.posts(&path).len();
    assert!(tries >= 5, "{tries} requests: {during:?}");
    // ...and nothing is dead or counted as an attempt: the outage is the destination's.
    assert_eq!(
        (during.published, during.dead, during.retried),
        (0, 0, 0),
        "{during:?}"
    );
    // Back up: everything arrives, in order.
    server.rule(&path, Rule::Script(VecDeque::new()));
    let deadline = Instant::now() + Duration::from_secs(20);
    while handle.stats().published < 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stats = handle.stop().await.unwrap();
    assert_eq!((stats.published, stats.dead), (3, 0), "{stats:?}");
    let accepted = accepted_ids(&server, &path);
    let position = |id: &uuid::Uuid| accepted.iter().position(|a| *a == id.to_string()).unwrap();
    assert!(position(&ids[0]) < position(&ids[2]), "{accepted:?}");
}

#[tokio::test]
async fn a_timeout_or_a_closed_port_is_the_destinations_failure() {
    let p = publisher(destination(
        "http://127.0.0.1:1/hook",
        Mode::Single,
        BodyFormat::Payload,
    ));
    let started = Instant::now();
    match p.check().await {
        Err(PublishError::Unavailable(reason)) => {
            assert!(reason.contains("127.0.0.1:1"), "{reason}")
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(5));
}

// ---------------------------------------------------------------------------------------------
// Batch mode and CloudEvents.

#[tokio::test]
async fn batch_mode_sends_arrays_with_one_event_per_key_in_key_order() {
    let server = Server::start().await;
    let path = format!("/batch/{}", unique());
    let p = publisher(destination(
        &server.url(&path),
        Mode::Batch,
        BodyFormat::Cloudevents,
    ));
    let batch: Vec<OutboxEvent> = (1..=9)
        .map(|seq| {
            let key = ["a", "b", "c"][(seq as usize - 1) % 3];
            conformance::event(seq, key, "Batched", serde_json::json!({ "seq": seq }))
        })
        .collect();
    let results = p.publish(&batch).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let posts = server.posts(&path);
    assert_eq!(posts.len(), 3, "three waves of one event per key");
    let mut order: Vec<(String, i64)> = Vec::new();
    for seen in &posts {
        assert_eq!(
            seen.headers["content-type"],
            "application/cloudevents-batch+json"
        );
        assert!(seen.headers["webhook-id"].starts_with("batch_"));
        assert_eq!(seen.headers["outbox-batch-size"], "3");
        verify(&secret(), &seen.headers, &seen.body).unwrap();
        let items: Vec<serde_json::Value> = serde_json::from_slice(&seen.body).unwrap();
        let mut keys: Vec<&str> = items
            .iter()
            .map(|i| i["subject"].as_str().unwrap())
            .collect();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), items.len(), "one event per key per request");
        for item in &items {
            assert_eq!(item["specversion"], "1.0");
            order.push((
                item["subject"].as_str().unwrap().to_owned(),
                item["data"]["seq"].as_i64().unwrap(),
            ));
        }
    }
    for key in ["a", "b", "c"] {
        let seqs: Vec<i64> = order
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, s)| *s)
            .collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{key}: {seqs:?}");
        assert_eq!(seqs.len(), 3);
    }
}

#[tokio::test]
async fn a_refused_batch_is_split_to_find_the_refused_event() {
    let server = Server::start().await;
    let path = format!("/batch-strict/{}", unique());
    server.rule(&path, Rule::RefuseContaining("Poison".into()));
    let p = publisher(destination(
        &server.url(&path),
        Mode::Batch,
        BodyFormat::Envelope,
    ));
    let batch = vec![
        conformance::event(1, "a", "Fine", serde_json::json!({})),
        conformance::event(2, "b", "Poison", serde_json::json!({})),
        conformance::event(3, "c", "Fine", serde_json::json!({})),
    ];
    let results = p.publish(&batch).await;
    assert!(results[0].is_ok() && results[2].is_ok(), "{results:?}");
    assert!(
        matches!(&results[1], Err(PublishError::Permanent(r)) if r.contains("HTTP 400")),
        "{results:?}"
    );
    let mut delivered: Vec<String> = Vec::new();
    for seen in server.accepted(&path) {
        let items: Vec<serde_json::Value> = serde_json::from_slice(&seen.body).unwrap();
        delivered.extend(items.iter().map(|i| i["id"].as_str().unwrap().to_owned()));
    }
    delivered.sort();
    let mut expected = vec![batch[0].id.to_string(), batch[2].id.to_string()];
    expected.sort();
    assert_eq!(delivered, expected, "the good events are delivered once");
}

#[tokio::test]
async fn cloudevents_binary_mode_puts_the_attributes_in_ce_headers() {
    let server = Server::start().await;
    let path = format!("/binary/{}", unique());
    let p = publisher(destination(
        &server.url(&path),
        Mode::Single,
        BodyFormat::CloudeventsBinary,
    ));
    let event = conformance::event(1, "o-1", "OrderPlaced", serde_json::json!({"total": 12}));
    assert!(p
        .publish(std::slice::from_ref(&event))
        .await
        .iter()
        .all(Result::is_ok));
    let seen = &server.posts(&path)[0];
    let h = &seen.headers;
    assert_eq!(h["ce-specversion"], "1.0");
    assert_eq!(h["ce-id"], event.id.to_string());
    assert_eq!(h["ce-source"], "/outbox/conformance");
    assert_eq!(h["ce-type"], "OrderPlaced");
    assert_eq!(h["ce-subject"], "o-1");
    assert!(h["ce-time"].ends_with('Z'), "{h:?}");
    assert_eq!(h["ce-traceparent"], conformance::TRACEPARENT);
    assert_eq!(h["traceparent"], conformance::TRACEPARENT);
    assert_eq!(h["content-type"], "application/json");
    let body: serde_json::Value = serde_json::from_slice(&seen.body).unwrap();
    assert_eq!(body, serde_json::json!({"total": 12}), "the data alone");
    verify(&secret(), h, &seen.body).unwrap();
}

#[tokio::test]
async fn a_url_template_percent_encodes_the_event_values() {
    let server = Server::start().await;
    let id = unique();
    let p = publisher(destination(
        &server.url(&format!("/t{id}/{{aggregate_type}}/{{event_type}}")),
        Mode::Single,
        BodyFormat::Payload,
    ));
    let event = conformance::event(1, "k", "a/b c", serde_json::json!({}));
    assert!(p.publish(&[event]).await.iter().all(Result::is_ok));
    let posts = server.posts(&format!("/t{id}/conformance/a%2Fb%20c"));
    assert_eq!(posts.len(), 1);
    // A template is checked at its origin: the receiver answers, whatever the path.
    p.check().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Configuration.

fn config(text: &str) -> Config {
    Config::from_toml_str(text, "local").unwrap()
}

#[test]
fn configuration_problems_name_every_key_and_the_fix_at_once() {
    let c = config(
        r#"
        [default.destinations.a]
        kind = "webhook"
        url = "ftp://example.com/{aggregate_id}"
        secret = "whsec_AAAA"
        timeout = "1h"
        [default.destinations.b]
        kind = "webhook"
        url = "https://example.com/hook"
        mode = "batch"
        max_body_bytes = 0
        urll = "typo"
        [default.destinations.c]
        kind = "webhook"
        url = "not a url"
        mode = "batch"
        body = "cloudevents-binary"
        max_batch_events = 0
        max_concurrency = 0
        [default.destinations.c.headers]
        "webhook-signature" = "forged"
        "bad header" = "x"
        [default.destinations.d]
        kind = "webhook"
        url = "https://example.com/hook"
        mode = "batch"
        "#,
    );
    let text = Registry::new()
        .with(Webhook)
        .problems(&c)
        .into_result()
        .unwrap_err()
        .to_string();
    for expected in [
        "destinations.a.url",
        "{aggregate_id}",
        "destinations.a.secret",
        "24 to 64",
        "openssl rand",
        "destinations.a.timeout",
        "relay.publish_timeout",
        "[destinations.b]",
        "urll",
        "destinations.c.url",
        "not an http(s) URL",
        "destinations.c.body",
        "destinations.c.max_batch_events",
        "destinations.c.max_concurrency",
        "destinations.c.headers.\"webhook-signature\"",
        "destinations.c.headers.\"bad header\"",
        "destinations.d.body",
        "envelope",
    ] {
        assert!(text.contains(expected), "{expected:?} missing from: {text}");
    }
    assert!(!text.contains("whsec_AAAA"), "{text}");
}

#[test]
fn secrets_are_never_printed() {
    let c = config(&format!(
        r#"
        [default]
        default_destination = "a"
        [default.destinations.a]
        kind = "webhook"
        url = "https://user:hunter2@example.com/hook?token=qwerty"
        secret = "{}"
        [default.destinations.a.headers]
        Authorization = "Bearer s3cr3t"
        X-Api-Key = "k3y"
        X-Tenant = "acme"
        "#,
        secret()
    ));
    let described = serde_json::to_string(&Registry::new().with(Webhook).describe(&c)).unwrap();
    let raw = serde_json::to_string(&c).unwrap();
    for shown in [&described, &raw] {
        for secret in ["hunter2", "qwerty", "s3cr3t", "k3y", &secret()[6..]] {
            assert!(!shown.contains(secret), "{secret:?} printed in {shown}");
        }
    }
    assert!(
        described.contains("acme") && described.contains("<redacted>"),
        "{described}"
    );
    assert!(
        described.contains("\"max_body_bytes\":1048576"),
        "{described}"
    );
    let p = WebhookPublisher::new(
        "a",
        c.destination_refs()
            .next()
            .unwrap()
            .settings::<WebhookDestination>()
            .unwrap(),
    )
    .unwrap();
    assert!(!format!("{p:?}").contains("hunter2"));
}
