//! `kind = "nats"` against the real NATS server with JetStream at 127.0.0.1:4222 (`NATS_URL`
//! overrides it): the publisher conformance suite, deduplication, bootstrap, configuration errors.
//! Every stream a test creates has a fresh name and is deleted at the end.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use async_trait::async_trait;
use outbox::{Config, PublishError, Publisher, Registry};
use outbox_nats::{BodyFormat, Connection, Nats, NatsDestination, NatsPublisher, NatsSection};
use outbox_testkit::conformance::{self, Fixture, Received, Receiver};
use outbox_testkit::TestDb;

fn url() -> String {
    std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

/// The test server's JetStream, or a failure that says what to start.
async fn server() -> (async_nats::Client, jetstream::Context) {
    let connected = tokio::time::timeout(Duration::from_secs(5), async_nats::connect(url())).await;
    let client = match connected {
        Ok(Ok(client)) => client,
        other => panic!(
            "NATS is not reachable at {} ({other:?}): these tests need nats-server with JetStream. \
             Start it: `nats-server -a 127.0.0.1 -p 4222 -js` (Debian: `apt-get install nats-server`), \
             or run scripts/test.sh, which starts it when installed",
            url()
        ),
    };
    let js = jetstream::new(client.clone());
    // A server without JetStream does not answer its API (no responders); one with it says the
    // stream does not exist.
    if let Err(e) = js.get_stream("OUTBOX_TEST_PROBE").await {
        if !matches!(
            e.kind(),
            jetstream::context::GetStreamErrorKind::JetStream(_)
        ) {
            panic!(
                "the NATS server at {} has no JetStream ({e}): start it with `-js`",
                url()
            );
        }
    }
    (client, js)
}

fn section(url: &str) -> NatsSection {
    NatsSection {
        url: url.to_owned(),
        token: None,
        timeout: Duration::from_secs(3),
    }
}

fn publisher(url: &str, subject: &str, stream: Option<&str>) -> NatsPublisher {
    NatsPublisher::new(
        "test",
        NatsDestination {
            subject: subject.to_owned(),
            stream: stream.map(str::to_owned),
            body: BodyFormat::Payload,
            max_payload_bytes: outbox_nats::config::DEFAULT_SERVER_MAX_PAYLOAD,
        },
        Arc::new(Connection::new(section(url))),
    )
    .expect("a valid template")
}

fn unique() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_owned()
}

/// Reads a stream by sequence: arrival order, duplicates included.
struct StreamReceiver {
    stream: jetstream::stream::Stream,
    next: u64,
    total: usize,
}

#[async_trait]
impl Receiver for StreamReceiver {
    async fn receive(&mut self, n: usize, within: Duration) -> anyhow::Result<Vec<Received>> {
        let deadline = Instant::now() + within;
        let mut out = Vec::new();
        loop {
            let last = self.stream.info().await?.state.last_sequence;
            while self.next <= last {
                let m = self.stream.get_raw_message(self.next).await?;
                self.next += 1;
                self.total += 1;
                let headers: BTreeMap<String, String> = m
                    .headers
                    .iter()
                    .filter_map(|(k, v)| Some((k.to_string(), v.first()?.to_string())))
                    .collect();
                out.push(Received {
                    message_id: headers.get("Nats-Msg-Id").cloned().unwrap_or_default(),
                    headers,
                    body: serde_json::from_slice(&m.payload)?,
                });
            }
            if self.total >= n || Instant::now() >= deadline {
                return Ok(out);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

struct Streams {
    js: jetstream::Context,
    created: Mutex<Vec<String>>,
    max_payload: usize,
}

impl Streams {
    async fn create(&self) -> anyhow::Result<(String, jetstream::stream::Stream)> {
        let id = unique();
        let name = format!("CONF_{id}");
        let stream = self
            .js
            .create_stream(jetstream::stream::Config {
                name: name.clone(),
                subjects: vec![format!("conf{id}.>")],
                storage: jetstream::stream::StorageType::Memory,
                max_messages: 10_000,
                ..Default::default()
            })
            .await?;
        self.created.lock().unwrap().push(name.clone());
        Ok((id, stream))
    }

    async fn clean_up(&self) {
        let names = self.created.lock().unwrap().clone();
        for name in names {
            let _ = self.js.delete_stream(&name).await;
        }
    }
}

#[async_trait]
impl Fixture for Streams {
    async fn fresh(&self) -> anyhow::Result<(Box<dyn Publisher>, Box<dyn Receiver>)> {
        let (id, stream) = self.create().await?;
        let name = format!("CONF_{id}");
        let publisher = publisher(
            &url(),
            &format!("conf{id}.{{aggregate_type}}.{{event_type}}"),
            Some(&name),
        );
        let receiver = StreamReceiver {
            stream,
            next: 1,
            total: 0,
        };
        Ok((Box::new(publisher), Box::new(receiver)))
    }

    async fn unreachable(&self) -> anyhow::Result<Box<dyn Publisher>> {
        Ok(Box::new(publisher(
            "nats://127.0.0.1:1",
            "conf.{event_type}",
            None,
        )))
    }

    async fn missing(&self) -> anyhow::Result<(Box<dyn Publisher>, String)> {
        let prefix = format!("missing{}", unique());
        Ok((
            Box::new(publisher(&url(), &format!("{prefix}.{{event_type}}"), None)),
            prefix,
        ))
    }

    fn oversized_payload_bytes(&self) -> Option<usize> {
        Some(self.max_payload + 1)
    }
}

#[tokio::test]
async fn nats_passes_the_conformance_suite() {
    let (client, js) = server().await;
    let db = TestDb::new().await.unwrap();
    let fixture = Streams {
        js,
        created: Mutex::default(),
        max_payload: client.server_info().max_payload,
    };
    let result = conformance::run(&fixture, &db).await;
    fixture.clean_up().await;
    result.unwrap();
}

#[tokio::test]
async fn a_republished_event_is_stored_once() {
    let (_, js) = server().await;
    let fixture = Streams {
        js,
        created: Mutex::default(),
        max_payload: 1024 * 1024,
    };
    let (publisher, mut receiver) = fixture.fresh().await.unwrap();
    let event = conformance::event(1, "k", "Placed", serde_json::json!({"n": 1}));
    // The relay publishes again when an acknowledgement was lost: the stream must keep one copy,
    // and the second publish must count as published (not fail, not dead-letter).
    for _ in 0..2 {
        let results = publisher.publish(std::slice::from_ref(&event)).await;
        assert!(results.iter().all(Result::is_ok), "{results:?}");
    }
    let received = receiver
        .receive(2, Duration::from_millis(500))
        .await
        .unwrap();
    fixture.clean_up().await;
    assert_eq!(received.len(), 1, "{received:?}");
    assert_eq!(received[0].message_id, event.id.to_string());
    assert_eq!(received[0].headers["outbox-event-type"], "Placed");
}

#[tokio::test]
async fn an_event_whose_subject_nats_refuses_is_permanent_and_holds_its_key() {
    let (_, js) = server().await;
    let fixture = Streams {
        js,
        created: Mutex::default(),
        max_payload: 1024 * 1024,
    };
    let (publisher, mut receiver) = fixture.fresh().await.unwrap();
    let batch = vec![
        conformance::event(1, "a", "has space", serde_json::json!({})),
        conformance::event(2, "b", "Fine", serde_json::json!({})),
        conformance::event(3, "a", "Fine", serde_json::json!({})),
    ];
    let results = publisher.publish(&batch).await;
    let received = receiver.receive(1, Duration::from_secs(5)).await.unwrap();
    fixture.clean_up().await;
    match &results[0] {
        Err(PublishError::Permanent(reason)) => {
            assert!(reason.contains("whitespace"), "{reason}")
        }
        other => panic!("expected a permanent failure, got {other:?}"),
    }
    assert!(results[1].is_ok(), "{results:?}");
    assert!(
        matches!(&results[2], Err(PublishError::Retryable(r)) if r.contains("earlier event")),
        "{results:?}"
    );
    conformance::check_delivery(&batch[1..2], &received).unwrap();
}

#[tokio::test]
async fn check_names_an_unreachable_server_as_the_destinations_failure() {
    let p = publisher("nats://127.0.0.1:1", "x.{event_type}", None);
    let started = Instant::now();
    match p.check().await {
        Err(PublishError::Unavailable(reason)) => {
            assert!(reason.contains("127.0.0.1:1"), "{reason}");
            assert!(reason.contains("nats-server"), "{reason}");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn check_names_a_configured_stream_that_does_not_exist() {
    server().await;
    let stream = format!("NOPE_{}", unique());
    let p = publisher(&url(), "nope.{event_type}", Some(&stream));
    match p.check().await {
        Err(PublishError::Permanent(reason)) => {
            assert!(reason.contains(&stream), "{reason}");
            assert!(reason.contains("bootstrap"), "{reason}");
        }
        other => panic!("expected a permanent failure naming {stream}, got {other:?}"),
    }
}

fn config(text: &str) -> Config {
    Config::from_toml_str(text, "local").unwrap()
}

#[tokio::test]
async fn bootstrap_creates_the_streams_then_the_configured_publisher_works() {
    let (_, js) = server().await;
    let id = unique();
    let c = config(&format!(
        r#"
        [default]
        default_destination = "orders"
        [default.nats]
        url = "{}"
        timeout = "3s"
        [default.destinations.orders]
        kind = "nats"
        subject = "boot{id}.{{aggregate_type}}.{{event_type}}"
        body = "envelope"
        "#,
        url()
    ));
    let report = outbox_nats::bootstrap(&c).await.unwrap();
    let stream = "OUTBOX_ORDERS".to_owned();
    // A stream of this name may be left by an interrupted run: start from a fresh one.
    if report.existing.contains(&stream) {
        js.delete_stream(&stream).await.unwrap();
        outbox_nats::bootstrap(&c).await.unwrap();
    }
    let again = outbox_nats::bootstrap(&c).await.unwrap();
    let publisher = Registry::new().with(Nats).build(&c).await.unwrap();
    let checked = publisher.check().await;
    let event = conformance::event(1, "o-1", "Placed", serde_json::json!({"total": 5}));
    let results = publisher.publish(std::slice::from_ref(&event)).await;
    let mut s = js.get_stream(&stream).await.unwrap();
    let stored = s.get_raw_message(1).await;
    let last = s.info().await.unwrap().state.last_sequence;
    js.delete_stream(&stream).await.unwrap();
    assert_eq!(again.existing, vec![stream.clone()]);
    checked.unwrap();
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(last, 1);
    let stored = stored.unwrap();
    assert_eq!(
        stored.subject.as_str(),
        format!("boot{id}.conformance.Placed")
    );
    let body: serde_json::Value = serde_json::from_slice(&stored.payload).unwrap();
    assert_eq!(body["id"], event.id.to_string(), "the envelope: {body}");
}

#[test]
fn configuration_problems_name_every_key_and_the_fix_at_once() {
    let c = config(
        r#"
        [default.nats]
        url = "http://127.0.0.1:4222"
        timeout = "30s"
        [default.destinations.a]
        kind = "nats"
        subject = "outbox.{aggregate_id}"
        stream = "has.dot"
        [default.destinations.b]
        kind = "nats"
        subject = "ok.{event_type}"
        subjet = "typo"
        [default.destinations.c]
        kind = "nats"
        subject = "outbox.*.{event_type}"
        max_payload_bytes = 0
        body = "cloudevents-binary"
        "#,
    );
    let text = Registry::new()
        .with(Nats)
        .problems(&c)
        .into_result()
        .unwrap_err()
        .to_string();
    for expected in [
        "nats.url",
        "nats://HOST:PORT",
        "nats.timeout",
        "relay.publish_timeout",
        "destinations.a.subject",
        "{aggregate_id}",
        "destinations.a.stream",
        "[destinations.b]",
        "subjet",
        "destinations.c.subject",
        "wildcard",
        "destinations.c.max_payload_bytes",
        "destinations.c.body",
    ] {
        assert!(text.contains(expected), "{expected:?} missing from: {text}");
    }
}

#[test]
fn a_missing_nats_section_is_named_and_secrets_are_not_printed() {
    let c = config(
        r#"
        [default.destinations.a]
        kind = "nats"
        subject = "outbox.{event_type}"
        "#,
    );
    let text = Registry::new()
        .with(Nats)
        .problems(&c)
        .into_result()
        .unwrap_err()
        .to_string();
    assert!(
        text.contains("nats.url") && text.contains("[nats]"),
        "{text}"
    );

    let c = config(
        r#"
        [default.nats]
        url = "nats://user:hunter2@127.0.0.1:1"
        token = "s3cr3t-token"
        [default.destinations.a]
        kind = "nats"
        subject = "outbox.{event_type}"
        "#,
    );
    let shown = serde_json::to_string(&c).unwrap();
    assert!(
        !shown.contains("hunter2") && !shown.contains("s3cr3t"),
        "{shown}"
    );
    let connection = Connection::new(c.section::<NatsSection>("nats").unwrap().unwrap());
    assert!(!format!("{connection:?}").contains("hunter2"));
}

#[test]
fn headers_nats_cannot_carry_or_that_would_steer_the_server_are_dropped() {
    let mut event = conformance::event(1, "k", "E", serde_json::json!({}));
    for (name, value) in [
        ("Nats-Expected-Stream", "OTHER"),
        ("outbox-event-id", "forged"),
        ("has space", "v"),
        ("colon:name", "v"),
        ("multi-line", "a\r\nPUB x 1"),
    ] {
        event.headers.insert(name.into(), value.into());
    }
    let (headers, _, dropped) = outbox_nats::publisher::headers_for(&event);
    assert_eq!(dropped.len(), 5, "{dropped:?}");
    assert_eq!(
        headers.get("outbox-event-id").map(|v| v.as_str()),
        Some(event.id.to_string().as_str())
    );
    assert_eq!(
        headers.get("traceparent").map(|v| v.as_str()),
        Some(conformance::TRACEPARENT)
    );
    assert!(headers.get("Nats-Expected-Stream").is_none());
}

#[test]
fn subject_templates_and_the_bootstrap_filter() {
    let t = outbox_nats::template::parse_subject("outbox.{aggregate_type}.{event_type}").unwrap();
    assert_eq!(t.fill("*"), "outbox.*.*");
    assert_eq!(outbox_nats::template::stream_subject(&t), "outbox.>");
    assert!(outbox_nats::template::parse_subject("a.{aggregate_id}")
        .unwrap_err()
        .contains("unknown placeholder {aggregate_id}"));
}
