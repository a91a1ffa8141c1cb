//! The Kafka publisher against a real Kafka-protocol broker on loopback: tansu, started by
//! `scripts/kafka.sh start` (which `scripts/test.sh` runs). Topics are created per case through the
//! admin API, so runs never see each other's messages.
//!
//! `OUTBOX_TEST_KAFKA` overrides the broker (`host:port`, loopback only).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use outbox::{NewEvent, Outbox, PgStore, PgStoreOptions, Publisher, Relay, RelayOptions, Schema};
use outbox_kafka::Kafka;
use outbox_testkit::conformance::{self, Fixture, Received, Receiver};
use outbox_testkit::{kafka_available, kafka_brokers as brokers, TestDb};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Headers;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

const PARTITIONS: i32 = 3;

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

async fn create_topic(topic: &str) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()?;
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin
        .create_topics(
            &[NewTopic::new(topic, PARTITIONS, TopicReplication::Fixed(1))],
            &options,
        )
        .await?;
    for r in results {
        r.map_err(|(t, e)| anyhow::anyhow!("create topic {t}: {e}"))?;
    }
    Ok(())
}

/// A configuration with a `kafka` destination `orders` (plus `extra` TOML in `[default]`).
fn config_text(brokers: &str, topic: &str, extra: &str) -> String {
    format!(
        r#"
        [default]
        default_destination = "orders"
        {extra}
        [default.relay]
        publish_timeout = "4s"
        [default.kafka]
        brokers = "{brokers}"
        [default.destinations.orders]
        kind = "kafka"
        topic = "{topic}"
        "#
    )
}

async fn publisher(text: &str) -> anyhow::Result<Box<dyn Publisher>> {
    let config = outbox::Config::from_toml_str(text, "local")?;
    Ok(outbox::Registry::new().with(Kafka).build(&config).await?)
}

/// Reads a topic from the beginning, every partition.
struct TopicReceiver {
    consumer: StreamConsumer,
    total: usize,
}

impl TopicReceiver {
    fn new(topic: &str) -> anyhow::Result<Self> {
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .set("group.id", unique("outbox-test"))
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .create()?;
        let mut partitions = TopicPartitionList::new();
        for p in 0..PARTITIONS {
            partitions.add_partition_offset(topic, p, Offset::Beginning)?;
        }
        consumer.assign(&partitions)?;
        Ok(Self { consumer, total: 0 })
    }
}

fn received(message: &rdkafka::message::BorrowedMessage<'_>) -> anyhow::Result<Received> {
    let mut headers = BTreeMap::new();
    if let Some(h) = message.headers() {
        for header in h.iter() {
            let value = header
                .value
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default();
            headers.insert(header.key.to_owned(), value);
        }
    }
    let body = match message.payload() {
        Some(bytes) => serde_json::from_slice(bytes)?,
        None => serde_json::Value::Null,
    };
    Ok(Received {
        message_id: headers
            .get(outbox::publisher::headers::EVENT_ID)
            .cloned()
            .unwrap_or_default(),
        headers,
        body,
    })
}

#[async_trait]
impl Receiver for TopicReceiver {
    async fn receive(&mut self, n: usize, within: Duration) -> anyhow::Result<Vec<Received>> {
        let deadline = Instant::now() + within;
        let mut out = Vec::new();
        while self.total < n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match tokio::time::timeout(left, self.consumer.recv()).await {
                Err(_) => break,
                Ok(message) => {
                    out.push(received(&message?)?);
                    self.total += 1;
                }
            }
        }
        // Anything more that is already there (a duplicate would show up here).
        while let Ok(Ok(message)) =
            tokio::time::timeout(Duration::from_millis(300), self.consumer.recv()).await
        {
            out.push(received(&message)?);
            self.total += 1;
        }
        Ok(out)
    }
}

struct Tansu;

#[async_trait]
impl Fixture for Tansu {
    async fn fresh(&self) -> anyhow::Result<(Box<dyn Publisher>, Box<dyn Receiver>)> {
        let topic = unique("conformance");
        create_topic(&topic).await?;
        let publisher = publisher(&config_text(&brokers(), &topic, "")).await?;
        Ok((publisher, Box::new(TopicReceiver::new(&topic)?)))
    }

    async fn unreachable(&self) -> anyhow::Result<Box<dyn Publisher>> {
        // Port 1 on loopback: nothing listens, connections are refused at once.
        publisher(&config_text("127.0.0.1:1", "nowhere", "")).await
    }

    async fn missing(&self) -> anyhow::Result<(Box<dyn Publisher>, String)> {
        let topic = unique("missing");
        Ok((
            publisher(&config_text(&brokers(), &topic, "")).await?,
            topic,
        ))
    }

    fn oversized_payload_bytes(&self) -> Option<usize> {
        Some(outbox_kafka::config::DEFAULT_MAX_MESSAGE_BYTES + 1)
    }
}

#[tokio::test]
async fn kafka_passes_the_conformance_suite() {
    if !kafka_available().await {
        return;
    }
    let db = TestDb::new().await.unwrap();
    conformance::run(&Tansu, &db).await.unwrap();
    db.drop_db().await.unwrap();
}

#[tokio::test]
async fn check_names_a_missing_topic_without_creating_it() {
    if !kafka_available().await {
        return;
    }
    let topic = unique("never-created");
    let publisher = publisher(&config_text(&brokers(), &topic, ""))
        .await
        .unwrap();
    let first = publisher.check().await.unwrap_err();
    assert!(first.reason().contains(&topic), "{first}");
    // The metadata request must not have created the topic (auto-creation is off).
    let second = publisher.check().await.unwrap_err();
    assert!(
        second.reason().contains("does not exist") || second.reason().contains("not usable"),
        "{second}"
    );
    let unreachable =
        outbox::Config::from_toml_str(&config_text("127.0.0.1:1", &topic, ""), "local").unwrap();
    let down = outbox::Registry::new()
        .with(Kafka)
        .build(&unreachable)
        .await
        .unwrap()
        .check()
        .await
        .unwrap_err();
    assert!(
        down.reason().contains("127.0.0.1:1") && down.reason().contains("scripts/kafka.sh start"),
        "{down}"
    );
}

/// While relaying, a missing topic or a down broker is the destination's failure (held, probed,
/// no attempt charged), reported before the relay's publish timeout (4 s here) would end the call.
#[tokio::test]
async fn a_missing_topic_or_a_down_broker_fails_as_the_destination_in_time() {
    if !kafka_available().await {
        return;
    }
    let event = || conformance::event(1, "a", "E", serde_json::json!({}));
    for brokers in [brokers(), "127.0.0.1:1".to_owned()] {
        let publisher = publisher(&config_text(&brokers, &unique("missing"), ""))
            .await
            .unwrap();
        let started = Instant::now();
        let results = publisher.publish(&[event()]).await;
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{:?}",
            started.elapsed()
        );
        match &results[0] {
            Err(e) if e.is_destination_failure() => {}
            other => panic!("{brokers}: expected Unavailable, got {other:?}"),
        }
    }
}

#[test]
fn configuration_problems_are_reported_together_with_their_keys() {
    let text = r#"
        [default]
        default_destination = "orders"
        [default.kafka]
        brokers = " , "
        [default.kafka.properties]
        "acks" = "1"
        "message.timeout.ms" = 60000
        "no.such.property" = "x"
        [default.destinations.orders]
        kind = "kafka"
        topic = "orders.{aggregate}"
        [default.destinations.audit]
        kind = "kafka"
        topic = "audit"
        partition = 3
    "#;
    let config = outbox::Config::from_toml_str(text, "local").unwrap();
    let err = outbox::Registry::new()
        .with(Kafka)
        .problems(&config)
        .into_result()
        .unwrap_err()
        .to_string();
    for expected in [
        "destinations.orders.topic",
        "{aggregate}",
        "[destinations.audit]",
        "partition",
        "kafka.brokers",
        "kafka.properties.\"acks\"",
        "kafka.properties.\"message.timeout.ms\"",
        "relay.publish_timeout",
        "no.such.property",
    ] {
        assert!(err.contains(expected), "{expected} missing in:\n{err}");
    }
    assert!(err.starts_with("6 configuration problems"), "{err}");
}

#[test]
fn a_deployment_profile_must_name_its_brokers() {
    let text = r#"
        [default]
        default_destination = "orders"
        [default.destinations.orders]
        kind = "kafka"
        topic = "orders"
    "#;
    let registry = outbox::Registry::new().with(Kafka);
    let local = outbox::Config::from_toml_str(text, "local").unwrap();
    assert!(registry.problems(&local).is_empty());
    let prod = outbox::Config::from_toml_str(text, "prod").unwrap();
    let err = registry
        .problems(&prod)
        .into_result()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("kafka.brokers") && err.contains("prod"),
        "{err}"
    );
}

#[test]
fn secrets_in_properties_are_never_shown() {
    let text = r#"
        [default]
        default_destination = "orders"
        [default.kafka.properties]
        "sasl.password" = "hunter2-very-secret"
        "security.protocol" = "carrier-pigeon"
        [default.destinations.orders]
        kind = "kafka"
        topic = "orders"
    "#;
    let config = outbox::Config::from_toml_str(text, "local").unwrap();
    let registry = outbox::Registry::new().with(Kafka);
    let err = registry
        .problems(&config)
        .into_result()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("security.protocol") && err.contains("carrier-pigeon"),
        "{err}"
    );
    let shown = format!(
        "{err}\n{}\n{}",
        serde_json::to_string(&registry.describe(&config)).unwrap(),
        serde_json::to_string(&config).unwrap()
    );
    assert!(!shown.contains("hunter2"), "{shown}");
}

#[tokio::test]
async fn one_relay_publishes_to_kafka_and_a_file_by_route() {
    if !kafka_available().await {
        return;
    }
    let topic = unique("mixed");
    create_topic(&topic).await.unwrap();
    let dir = std::env::temp_dir().join(unique("outbox-kafka-mixed"));
    std::fs::create_dir_all(&dir).unwrap();
    let audit = dir.join("audit.jsonl");
    let text = format!(
        r#"{}
        [default.destinations.audit]
        kind = "file"
        path = "{}"
        [[default.routes]]
        event_type = "Audited"
        destination = "audit"
        "#,
        config_text(&brokers(), &topic, ""),
        audit.display()
    );
    let publisher = publisher(&text).await.unwrap();
    publisher.check().await.unwrap();

    let db = TestDb::new().await.unwrap();
    let outbox = Outbox::new(Schema::default());
    let mut tx = db.pool.begin().await.unwrap();
    for i in 0..12 {
        let event_type = if i % 3 == 0 { "Audited" } else { "OrderPlaced" };
        // One key crosses both destinations: its order must hold across them.
        let key = format!("k{}", i % 2);
        outbox
            .enqueue(
                &mut tx,
                NewEvent::new("order", &key, event_type)
                    .payload(&serde_json::json!({ "i": i }))
                    .unwrap(),
            )
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    let store = PgStore::new(
        db.pool.clone(),
        PgStoreOptions {
            notify: false,
            ..PgStoreOptions::default()
        },
    )
    .await
    .unwrap();
    let relay = Relay::new(
        store,
        publisher,
        RelayOptions {
            batch_size: 5,
            ..RelayOptions::default()
        },
    );
    let report = relay.drain().await.unwrap();
    assert_eq!((report.published, report.dead), (12, 0), "{report:?}");

    let mut receiver = TopicReceiver::new(&topic).unwrap();
    let got = receiver.receive(8, Duration::from_secs(20)).await.unwrap();
    assert_eq!(got.len(), 8, "{got:?}");
    assert!(got
        .iter()
        .all(|r| r.headers.get("outbox-event-type").map(String::as_str) == Some("OrderPlaced")));
    let mut last: BTreeMap<String, i64> = BTreeMap::new();
    for r in &got {
        let i = r.body["i"].as_i64().unwrap();
        let key = r.headers["outbox-aggregate-id"].clone();
        if let Some(prev) = last.insert(key, i) {
            assert!(prev < i, "out of order: {i} after {prev}");
        }
    }
    let lines = std::fs::read_to_string(&audit).unwrap();
    assert_eq!(lines.lines().count(), 4, "{lines}");
    std::fs::remove_dir_all(&dir).unwrap();
    db.drop_db().await.unwrap();
}

/// A template renders a topic per event; an event whose aggregate type makes an invalid topic is
/// dead-lettered with the reason (it would never be accepted), and nothing reaches a broker.
#[tokio::test]
async fn an_event_rendering_an_invalid_topic_is_permanent() {
    let publisher = publisher(&config_text("127.0.0.1:1", "outbox.{aggregate_type}", ""))
        .await
        .unwrap();
    let mut bad = conformance::event(1, "a", "E", serde_json::json!({}));
    bad.aggregate_type = "has space".into();
    let results = publisher.publish(&[bad]).await;
    match &results[0] {
        Err(e) if !e.is_retryable() => {
            assert!(
                e.reason().contains("outbox.has space")
                    && e.reason().contains("destinations.orders.topic"),
                "{e}"
            )
        }
        other => panic!("expected a permanent failure, got {other:?}"),
    }
}

#[tokio::test]
async fn cloudevents_binary_mode_carries_the_attributes_as_ce_headers() {
    if !kafka_available().await {
        return;
    }
    let topic = unique("binary");
    create_topic(&topic).await.unwrap();
    let text = config_text(&brokers(), &topic, "").replace(
        "kind = \"kafka\"",
        "kind = \"kafka\"\n        body = \"cloudevents-binary\"",
    );
    let publisher = publisher(&text).await.unwrap();
    let event = conformance::event(1, "o-1", "OrderPlaced", serde_json::json!({"total": 12}));
    let results = publisher.publish(std::slice::from_ref(&event)).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let received = TopicReceiver::new(&topic)
        .unwrap()
        .receive(1, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(received.len(), 1, "{received:?}");
    let h = &received[0].headers;
    assert_eq!(h["ce_specversion"], "1.0");
    assert_eq!(h["ce_id"], event.id.to_string());
    assert_eq!(h["ce_source"], "/outbox/conformance");
    assert_eq!(h["ce_type"], "OrderPlaced");
    assert_eq!(h["ce_subject"], "o-1");
    assert!(h["ce_time"].ends_with('Z'), "{h:?}");
    assert_eq!(h["ce_traceparent"], conformance::TRACEPARENT);
    assert_eq!(h["content-type"], "application/json");
    assert_eq!(
        received[0].body,
        serde_json::json!({"total": 12}),
        "the data alone"
    );
}
