//! The inbox with other brokers' own clients: the Kafka and NATS consumer examples (included from
//! `examples/`, so what the examples show is what runs here), fed by the relay's publishers, apply
//! a re-sent or redelivered event once.

// Each example's `main` (and what only it uses) is dead code here.
#[allow(dead_code)]
#[path = "../../examples/kafka_consumer.rs"]
mod kafka_consumer;
#[allow(dead_code)]
#[path = "../../examples/nats_consumer.rs"]
mod nats_consumer;

use std::time::{Duration, Instant};

use outbox::{OutboxEvent, Publisher};
use outbox_consumer::PgInbox;
use outbox_testkit::conformance::event;
use outbox_testkit::{kafka_available, kafka_brokers, TestDb};

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

async fn publisher(config: &str) -> Box<dyn Publisher> {
    let config = outbox::Config::from_toml_str(config, "local").expect("config");
    outbox::Registry::new()
        .with(outbox_kafka::Kafka)
        .with(outbox_nats::Nats)
        .build(&config)
        .await
        .expect("publisher")
}

async fn publish(publisher: &dyn Publisher, events: &[OutboxEvent]) {
    for result in publisher.publish(events).await {
        result.expect("published");
    }
}

/// A fresh database with the example's table and the inbox.
async fn inbox(consumer: &str) -> (TestDb, PgInbox) {
    let db = TestDb::empty().await.expect("database");
    sqlx::query(kafka_consumer::SETUP)
        .execute(&db.pool)
        .await
        .expect("setup");
    let inbox = PgInbox::new(db.pool.clone(), consumer);
    inbox.migrate().await.expect("inbox");
    (db, inbox)
}

async fn shipments(db: &TestDb) -> Vec<String> {
    sqlx::query_scalar("SELECT order_id FROM shipments ORDER BY order_id")
        .fetch_all(&db.pool)
        .await
        .expect("shipments")
}

#[tokio::test]
async fn a_kafka_consumer_with_the_inbox_applies_a_re_sent_event_once() {
    if !kafka_available().await {
        return;
    }
    let topic = unique("inbox-");
    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
        rdkafka::ClientConfig::new()
            .set("bootstrap.servers", kafka_brokers())
            .create()
            .expect("admin client");
    let created = admin
        .create_topics(
            &[rdkafka::admin::NewTopic::new(
                &topic,
                1,
                rdkafka::admin::TopicReplication::Fixed(1),
            )],
            &rdkafka::admin::AdminOptions::new(),
        )
        .await
        .expect("create topic");
    assert!(created.iter().all(Result::is_ok), "{created:?}");
    let publisher = publisher(&format!(
        r#"
        [default]
        default_destination = "orders"
        [default.kafka]
        brokers = "{}"
        [default.destinations.orders]
        kind = "kafka"
        topic = "{topic}"
        "#,
        kafka_brokers()
    ))
    .await;
    let placed = event(1, "o-1", "OrderPlaced", serde_json::json!({"n": 1}));
    let other = event(2, "o-2", "OrderPlaced", serde_json::json!({"n": 2}));
    publish(&*publisher, &[placed.clone(), other]).await;
    // The relay crashed after the broker's ack and before recording it: the event goes out again.
    publish(&*publisher, &[placed]).await;

    let (db, inbox) = inbox("shipping").await;
    let consumer =
        kafka_consumer::subscribe(&kafka_brokers(), &topic, &unique("group-")).expect("consumer");
    let mut total = kafka_consumer::Counts::default();
    // Joining the group takes a few seconds on first use; keep consuming until all three arrived.
    let deadline = Instant::now() + Duration::from_secs(40);
    while total.applied + total.duplicates < 3 && Instant::now() < deadline {
        let counts = kafka_consumer::consume(&consumer, &inbox, Duration::from_secs(3))
            .await
            .expect("consume");
        total.applied += counts.applied;
        total.duplicates += counts.duplicates;
        total.skipped += counts.skipped;
    }
    assert_eq!(
        (total.applied, total.duplicates, total.skipped),
        (2, 1, 0),
        "{total:?}"
    );
    assert_eq!(shipments(&db).await, ["o-1", "o-2"]);
    db.drop_db().await.expect("drop");
}

#[tokio::test]
async fn a_nats_consumer_with_the_inbox_applies_a_redelivered_event_once() {
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned());
    let client = tokio::time::timeout(Duration::from_secs(5), async_nats::connect(url.as_str()))
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_else(|| {
            panic!("NATS with JetStream is not reachable at {url}: start `nats-server -js` (scripts/test.sh does)")
        });
    let id = unique("");
    let stream = format!("INBOX_{id}");
    async_nats::jetstream::new(client.clone())
        .create_stream(async_nats::jetstream::stream::Config {
            name: stream.clone(),
            subjects: vec![format!("inbox{id}.>")],
            ..Default::default()
        })
        .await
        .expect("stream");
    let publisher = publisher(&format!(
        r#"
        [default]
        default_destination = "orders"
        [default.nats]
        url = "{url}"
        [default.destinations.orders]
        kind = "nats"
        subject = "inbox{id}.{{aggregate_type}}"
        "#
    ))
    .await;
    let placed = event(1, "o-1", "OrderPlaced", serde_json::json!({"n": 1}));
    let other = event(2, "o-2", "OrderPlaced", serde_json::json!({"n": 2}));
    publish(&*publisher, &[placed, other]).await;

    let (db, inbox) = inbox("shipping").await;
    let ack_wait = Duration::from_secs(1);
    let mut messages = nats_consumer::subscribe(client.clone(), &stream, "shipping", ack_wait)
        .await
        .expect("consumer");
    // The first copy is applied, then the consumer "crashes" before its ack.
    let first = tokio::time::timeout(
        Duration::from_secs(5),
        futures_util::StreamExt::next(&mut messages),
    )
    .await
    .expect("a message within 5 s")
    .expect("a message")
    .expect("a message");
    let delivery = nats_consumer::delivery(&first).expect("delivery");
    assert!(nats_consumer::handle(&inbox, &delivery)
        .await
        .expect("handle"));
    drop(first);

    // The other event, then the unacknowledged one again after `ack_wait`: applied once.
    let counts = nats_consumer::consume(&mut messages, &inbox, Duration::from_secs(4))
        .await
        .expect("consume");
    assert_eq!(
        (counts.applied, counts.duplicates, counts.skipped),
        (1, 1, 0),
        "{counts:?}"
    );
    assert_eq!(shipments(&db).await, ["o-1", "o-2"]);
    async_nats::jetstream::new(client)
        .delete_stream(&stream)
        .await
        .expect("delete stream");
    db.drop_db().await.expect("drop");
}
