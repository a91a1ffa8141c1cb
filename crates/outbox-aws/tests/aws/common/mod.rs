//! Shared by the emulator tests: the emulator endpoint, unique names, configuration from TOML
//! text, a relay over a fresh database, and an SQS receiver that consumes as it goes (moto's SQS
//! slows down as a queue grows deep).
#![allow(dead_code)] // each test binary uses a different subset

use std::collections::HashMap;
use std::time::{Duration, Instant};

use aws_sdk_sqs::types::Message;
use outbox::{
    Backoff, NewEvent, Outbox, PgStore, PgStoreOptions, Publisher, Relay, RelayOptions, Schema,
};
use outbox_testkit::TestDb;

/// The emulator the tests use: `OUTBOX_TEST_AWS_ENDPOINT`, default `http://127.0.0.1:4566`.
pub(crate) fn endpoint() -> String {
    outbox_testkit::aws_endpoint()
}

/// `host:port` of the endpoint; only loopback endpoints are accepted, so a test never reaches
/// real AWS or any other machine.
pub(crate) fn endpoint_addr() -> (String, u16) {
    let url = endpoint();
    let rest = url.strip_prefix("http://").unwrap_or_else(|| {
        panic!("OUTBOX_TEST_AWS_ENDPOINT must be an http:// URL on loopback, got {url}")
    });
    let authority = rest.split('/').next().unwrap_or(rest);
    let (host, port) = authority.rsplit_once(':').unwrap_or((authority, "80"));
    let port: u16 = port.parse().unwrap_or_else(|_| panic!("bad port in {url}"));
    assert!(
        matches!(host, "127.0.0.1" | "localhost" | "[::1]"),
        "OUTBOX_TEST_AWS_ENDPOINT must be on loopback (127.0.0.1 / localhost), got {url}"
    );
    (host.to_owned(), port)
}

/// Fails the test with the fix when nothing answers at the endpoint.
pub(crate) async fn require_emulator() {
    let (host, port) = endpoint_addr();
    let host = if host == "localhost" {
        "127.0.0.1".to_owned()
    } else {
        host
    };
    let reachable = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect((host.trim_matches(['[', ']']), port)),
    )
    .await
    .map(|r| r.is_ok())
    .unwrap_or(false);
    assert!(
        reachable,
        "no AWS emulator answers at {}: run `scripts/aws-emulator.sh start` (moto on port 4566), \
         or point OUTBOX_TEST_AWS_ENDPOINT at LocalStack",
        endpoint()
    );
}

/// A short unique name: `<prefix>-<8 hex>`.
pub(crate) fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// Loads an `outbox::Config` from TOML text for `profile`, without the process environment.
pub(crate) fn load_config(toml: &str, profile: &str) -> outbox::Config {
    let config = outbox::Config::from_toml_str(toml, profile);
    config.unwrap_or_else(|e| panic!("test config does not load: {e}\n{toml}"))
}

/// The `[local.aws]` section pointing at the test emulator.
pub(crate) fn local_aws_section() -> String {
    format!("[local.aws]\nendpoint = \"{}\"\n", endpoint())
}

pub(crate) fn relay_options() -> RelayOptions {
    RelayOptions {
        batch_size: 50,
        workers: 1,
        poll_interval: Duration::from_millis(50),
        publish_timeout: Duration::from_secs(15),
        max_attempts: 5,
        backoff: Backoff {
            base: Duration::from_millis(50),
            max: Duration::from_millis(500),
        },
        purge_interval: Duration::from_secs(60),
        ..RelayOptions::default()
    }
}

/// A store that keeps published rows (so tests can inspect and re-pend them).
pub(crate) async fn store(db: &TestDb) -> PgStore {
    PgStore::new(
        db.pool.clone(),
        PgStoreOptions {
            retention: Duration::from_secs(3600),
            ..PgStoreOptions::default()
        },
    )
    .await
    .expect("store")
}

pub(crate) async fn relay<P: Publisher>(db: &TestDb, publisher: P) -> Relay<PgStore, P> {
    Relay::new(store(db).await, publisher, relay_options())
}

/// Enqueues the events in one transaction, in order; returns their ids.
pub(crate) async fn enqueue(db: &TestDb, events: Vec<NewEvent>) -> Vec<uuid::Uuid> {
    let outbox = Outbox::new(Schema::default());
    let mut tx = db.pool.begin().await.expect("begin");
    let ids = outbox.enqueue_all(&mut tx, events).await.expect("enqueue");
    tx.commit().await.expect("commit");
    ids
}

pub(crate) fn event(
    aggregate_type: &str,
    aggregate_id: &str,
    event_type: &str,
    payload: serde_json::Value,
) -> NewEvent {
    NewEvent::new(aggregate_type, aggregate_id, event_type)
        .payload(&payload)
        .expect("payload is an object")
}

/// `(status, attempts, last_error)` of an event.
pub(crate) async fn row(db: &TestDb, id: uuid::Uuid) -> (String, i32, Option<String>) {
    sqlx::query_as("SELECT status, attempts, last_error FROM outbox_event WHERE id = $1")
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .expect("event row")
}

pub(crate) async fn count_status(db: &TestDb, status: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM outbox_event WHERE status = $1")
        .bind(status)
        .fetch_one(&db.pool)
        .await
        .expect("count")
}

/// An SQS client for the test emulator (what a consumer would build).
pub(crate) async fn sqs(settings: &outbox_aws::AwsSettings) -> aws_sdk_sqs::Client {
    outbox_aws::AwsClients::new(settings)
        .await
        .expect("clients")
        .sqs
}

pub(crate) async fn queue_url(sqs: &aws_sdk_sqs::Client, name: &str) -> String {
    sqs.get_queue_url()
        .queue_name(name)
        .send()
        .await
        .unwrap_or_else(|e| panic!("queue {name}: {e:?}"))
        .queue_url()
        .expect("url")
        .to_owned()
}

/// Receives (and deletes) messages until `expected` arrived or `timeout` passed; then keeps
/// listening for `quiet` to catch extra (duplicate or unwanted) messages.
pub(crate) async fn receive(
    sqs: &aws_sdk_sqs::Client,
    url: &str,
    expected: usize,
    timeout: Duration,
    quiet: Duration,
) -> Vec<Message> {
    let mut messages = Vec::new();
    let deadline = Instant::now() + timeout;
    let mut quiet_until: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if messages.len() >= expected && quiet_until.is_none() {
            quiet_until = Some(now + quiet);
        }
        match quiet_until {
            Some(until) if now >= until => break,
            None if now >= deadline => break,
            _ => {}
        }
        let out = sqs
            .receive_message()
            .queue_url(url)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .message_attribute_names("All")
            .message_system_attribute_names(aws_sdk_sqs::types::MessageSystemAttributeName::All)
            .send()
            .await
            .expect("receive");
        for message in out.messages() {
            if let Some(handle) = message.receipt_handle() {
                sqs.delete_message()
                    .queue_url(url)
                    .receipt_handle(handle)
                    .send()
                    .await
                    .expect("delete");
            }
            messages.push(message.clone());
        }
    }
    messages
}

pub(crate) fn attr<'a>(message: &'a Message, name: &str) -> Option<&'a str> {
    message
        .message_attributes()
        .and_then(|a| a.get(name))
        .and_then(|v| v.string_value())
}

pub(crate) fn body_json(message: &Message) -> serde_json::Value {
    serde_json::from_str(message.body().unwrap_or("null")).expect("body is JSON")
}

/// Messages by their `outbox-event-id` attribute; panics on a duplicate.
pub(crate) fn by_event_id(messages: &[Message]) -> HashMap<String, &Message> {
    let mut map = HashMap::new();
    for m in messages {
        let id = attr(m, "outbox-event-id")
            .expect("outbox-event-id attribute")
            .to_owned();
        assert!(
            map.insert(id.clone(), m).is_none(),
            "event {id} received twice"
        );
    }
    map
}
