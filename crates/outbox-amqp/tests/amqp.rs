//! `kind = "rabbitmq"` against the real RabbitMQ at 127.0.0.1:5672 (`AMQP_URL` overrides it):
//! the publisher conformance suite, unroutable messages, configuration errors. Every exchange and
//! queue a test declares has a fresh name and is deleted at the end.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use lapin::options::{
    BasicGetOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};
use outbox::{Config, PublishError, Publisher, Registry};
use outbox_amqp::{
    BodyFormat, Connection, RabbitDestination, RabbitMq, RabbitPublisher, RabbitSection,
};
use outbox_testkit::conformance::{self, Fixture, Received, Receiver};
use outbox_testkit::TestDb;

fn url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

const MAX_BODY: usize = 64 * 1024;

/// A channel of the test's own, or a failure that says what to start.
async fn admin() -> Channel {
    let properties = outbox_amqp::connection_properties("outbox-amqp-test");
    let connected = tokio::time::timeout(
        Duration::from_secs(5),
        lapin::Connection::connect(&url(), properties),
    )
    .await;
    match connected {
        Ok(Ok(c)) => c.create_channel().await.expect("a channel"),
        other => panic!(
            "RabbitMQ is not reachable at {} ({:?}): these tests need rabbitmq-server. Start it: \
             `rabbitmq-server -detached` (Debian: `apt-get install rabbitmq-server`), or run scripts/test.sh, \
             which starts it when installed",
            outbox::config::redact_url(&url()),
            other.map(|r| r.map(|_| ()))
        ),
    }
}

fn publisher(url: &str, exchange: &str, routing_key: &str) -> RabbitPublisher {
    RabbitPublisher::new(
        "test",
        RabbitDestination {
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
            body: BodyFormat::Payload,
            max_payload_bytes: MAX_BODY,
        },
        Arc::new(Connection::new(RabbitSection {
            url: url.to_owned(),
            timeout: Duration::from_secs(3),
        })),
    )
    .expect("valid templates")
}

fn unique() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_owned()
}

/// Reads a queue with `basic.get`: arrival order, duplicates included.
struct QueueReceiver {
    channel: Channel,
    queue: String,
    total: usize,
}

fn header_text(value: &AMQPValue) -> String {
    match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        other => format!("{other:?}"),
    }
}

#[async_trait]
impl Receiver for QueueReceiver {
    async fn receive(&mut self, n: usize, within: Duration) -> anyhow::Result<Vec<Received>> {
        let deadline = Instant::now() + within;
        let mut out = Vec::new();
        loop {
            while let Some(m) = self
                .channel
                .basic_get(&self.queue, BasicGetOptions { no_ack: true })
                .await?
            {
                self.total += 1;
                let props = &m.delivery.properties;
                let headers: BTreeMap<String, String> = props
                    .headers()
                    .as_ref()
                    .map(|t| {
                        t.inner()
                            .iter()
                            .map(|(k, v)| (k.as_str().to_owned(), header_text(v)))
                            .collect()
                    })
                    .unwrap_or_default();
                anyhow::ensure!(
                    props.delivery_mode() == &Some(2),
                    "not persistent: {props:?}"
                );
                out.push(Received {
                    message_id: props
                        .message_id()
                        .as_ref()
                        .map(|s| s.as_str().to_owned())
                        .unwrap_or_default(),
                    headers,
                    body: serde_json::from_slice(&m.delivery.data)?,
                });
            }
            if self.total >= n || Instant::now() >= deadline {
                return Ok(out);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

struct Exchanges {
    channel: Channel,
    created: Mutex<Vec<(String, String)>>,
}

impl Exchanges {
    /// A fresh topic exchange with a queue bound for `binding`.
    async fn create(&self, binding: &str) -> anyhow::Result<(String, String)> {
        let id = unique();
        let (exchange, queue) = (format!("conf-{id}"), format!("conf-{id}"));
        self.channel
            .exchange_declare(
                &exchange,
                ExchangeKind::Topic,
                ExchangeDeclareOptions::default(),
                FieldTable::default(),
            )
            .await?;
        self.channel
            .queue_declare(
                &queue,
                QueueDeclareOptions::default(),
                FieldTable::default(),
            )
            .await?;
        self.channel
            .queue_bind(
                &queue,
                &exchange,
                binding,
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        self.created
            .lock()
            .unwrap()
            .push((exchange.clone(), queue.clone()));
        Ok((exchange, queue))
    }

    async fn clean_up(&self) {
        let created = self.created.lock().unwrap().clone();
        for (exchange, queue) in created {
            let _ = self
                .channel
                .queue_delete(&queue, QueueDeleteOptions::default())
                .await;
            let _ = self
                .channel
                .exchange_delete(&exchange, ExchangeDeleteOptions::default())
                .await;
        }
    }

    fn receiver(&self, queue: String) -> Box<dyn Receiver> {
        Box::new(QueueReceiver {
            channel: self.channel.clone(),
            queue,
            total: 0,
        })
    }
}

#[async_trait]
impl Fixture for Exchanges {
    async fn fresh(&self) -> anyhow::Result<(Box<dyn Publisher>, Box<dyn Receiver>)> {
        let (exchange, queue) = self.create("#").await?;
        let p = publisher(&url(), &exchange, "{aggregate_type}.{event_type}");
        Ok((Box::new(p), self.receiver(queue)))
    }

    async fn unreachable(&self) -> anyhow::Result<Box<dyn Publisher>> {
        Ok(Box::new(publisher(
            "amqp://guest:guest@127.0.0.1:1/%2f",
            "x",
            "{event_type}",
        )))
    }

    async fn missing(&self) -> anyhow::Result<(Box<dyn Publisher>, String)> {
        let exchange = format!("missing-{}", unique());
        Ok((
            Box::new(publisher(&url(), &exchange, "{event_type}")),
            exchange,
        ))
    }

    fn oversized_payload_bytes(&self) -> Option<usize> {
        Some(MAX_BODY + 1)
    }
}

#[tokio::test]
async fn rabbitmq_passes_the_conformance_suite() {
    let fixture = Exchanges {
        channel: admin().await,
        created: Mutex::default(),
    };
    let db = TestDb::new().await.unwrap();
    let result = conformance::run(&fixture, &db).await;
    fixture.clean_up().await;
    result.unwrap();
}

#[tokio::test]
async fn an_unroutable_event_is_permanent_and_holds_its_key_only() {
    let fixture = Exchanges {
        channel: admin().await,
        created: Mutex::default(),
    };
    // Only `conformance.Routed` has a queue.
    let (exchange, queue) = fixture.create("conformance.Routed").await.unwrap();
    let p = publisher(&url(), &exchange, "{aggregate_type}.{event_type}");
    let batch = vec![
        conformance::event(1, "a", "Unroutable", serde_json::json!({})),
        conformance::event(2, "b", "Routed", serde_json::json!({})),
        conformance::event(3, "a", "Routed", serde_json::json!({})),
        conformance::event(4, "b", "Routed", serde_json::json!({})),
    ];
    let results = p.publish(&batch).await;
    let received = fixture
        .receiver(queue)
        .receive(2, Duration::from_secs(5))
        .await
        .unwrap();
    fixture.clean_up().await;
    match &results[0] {
        Err(PublishError::Permanent(reason)) => {
            assert!(
                reason.contains("unroutable") && reason.contains("conformance.Unroutable"),
                "{reason}"
            )
        }
        other => panic!("expected a permanent failure, got {other:?}"),
    }
    assert!(results[1].is_ok() && results[3].is_ok(), "{results:?}");
    assert!(
        matches!(&results[2], Err(PublishError::Retryable(r)) if r.contains("earlier event")),
        "{results:?}"
    );
    conformance::check_delivery(&[batch[1].clone(), batch[3].clone()], &received).unwrap();
}

#[tokio::test]
async fn a_publish_to_a_missing_exchange_is_the_destinations_failure() {
    admin().await;
    let p = publisher(&url(), &format!("missing-{}", unique()), "{event_type}");
    let batch = vec![conformance::event(1, "a", "E", serde_json::json!({}))];
    // Twice: the first failure closes the channel; the second must open a new one, not hang.
    for _ in 0..2 {
        let results = p.publish(&batch).await;
        assert!(
            matches!(&results[0], Err(PublishError::Unavailable(r)) if r.contains("exchange")),
            "{results:?}"
        );
    }
}

#[tokio::test]
async fn check_names_an_unreachable_broker_without_its_password() {
    let p = publisher("amqp://guest:hunter2@127.0.0.1:1/%2f", "x", "k");
    match p.check().await {
        Err(PublishError::Unavailable(reason)) => {
            assert!(
                reason.contains("127.0.0.1:1") && reason.contains("rabbitmq-server"),
                "{reason}"
            );
            assert!(!reason.contains("hunter2"), "{reason}");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

fn config(text: &str) -> Config {
    Config::from_toml_str(text, "local").unwrap()
}

#[tokio::test]
async fn the_configured_publisher_is_built_by_the_registry() {
    let fixture = Exchanges {
        channel: admin().await,
        created: Mutex::default(),
    };
    let (exchange, queue) = fixture.create("#").await.unwrap();
    let c = config(&format!(
        r#"
        [default]
        default_destination = "orders"
        [default.rabbitmq]
        url = "{}"
        [default.destinations.orders]
        kind = "rabbitmq"
        exchange = "{exchange}"
        routing_key = "{{aggregate_type}}.{{aggregate_id}}"
        body = "envelope"
        "#,
        url()
    ));
    let publisher = Registry::new().with(RabbitMq).build(&c).await.unwrap();
    let checked = publisher.check().await;
    let event = conformance::event(1, "o-1", "Placed", serde_json::json!({"total": 5}));
    let results = publisher.publish(std::slice::from_ref(&event)).await;
    let received = fixture
        .receiver(queue)
        .receive(1, Duration::from_secs(5))
        .await;
    fixture.clean_up().await;
    checked.unwrap();
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let received = received.unwrap();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].body["id"], event.id.to_string());
}

#[test]
fn configuration_problems_name_every_key_and_the_fix_at_once() {
    let c = config(
        r#"
        [default.rabbitmq]
        url = "http://127.0.0.1:5672"
        timeout = "1m"
        [default.destinations.a]
        kind = "rabbitmq"
        exchange = "amq.mine"
        routing_key = "{aggregate}"
        [default.destinations.b]
        kind = "rabbitmq"
        exchange = "x"
        routing_key = "k"
        mandatory = false
        [default.destinations.c]
        kind = "rabbitmq"
        routing_key = "k"
        max_payload_bytes = 0
        "#,
    );
    let text = Registry::new()
        .with(RabbitMq)
        .problems(&c)
        .into_result()
        .unwrap_err()
        .to_string();
    for expected in [
        "rabbitmq.url",
        "amqp://USER:PASSWORD@HOST:5672",
        "rabbitmq.timeout",
        "destinations.a.exchange",
        "amq.",
        "destinations.a.routing_key",
        "{aggregate}",
        "[destinations.b]",
        "mandatory",
        "[destinations.c]",
        "exchange",
    ] {
        assert!(text.contains(expected), "{expected:?} missing from: {text}");
    }

    let c = config(
        r#"
        [default.destinations.a]
        kind = "rabbitmq"
        exchange = "x"
        routing_key = "k"
        "#,
    );
    let text = Registry::new()
        .with(RabbitMq)
        .problems(&c)
        .into_result()
        .unwrap_err()
        .to_string();
    assert!(
        text.contains("rabbitmq.url") && text.contains("[rabbitmq]"),
        "{text}"
    );
}

#[tokio::test]
async fn cloudevents_binary_mode_carries_the_attributes_as_application_properties() {
    let fixture = Exchanges {
        channel: admin().await,
        created: Mutex::default(),
    };
    let (exchange, queue) = fixture.create("#").await.unwrap();
    let destination = RabbitDestination {
        exchange,
        routing_key: "{aggregate_type}.{event_type}".into(),
        body: BodyFormat::CloudeventsBinary,
        max_payload_bytes: MAX_BODY,
    };
    let p = RabbitPublisher::new(
        "binary",
        destination,
        Arc::new(Connection::new(RabbitSection {
            url: url(),
            timeout: Duration::from_secs(3),
        })),
    )
    .unwrap();
    let event = conformance::event(1, "o-1", "OrderPlaced", serde_json::json!({"total": 12}));
    let results = p.publish(std::slice::from_ref(&event)).await;
    let received = fixture
        .receiver(queue)
        .receive(1, Duration::from_secs(5))
        .await;
    fixture.clean_up().await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let received = received.unwrap();
    assert_eq!(received.len(), 1, "{received:?}");
    let h = &received[0].headers;
    assert_eq!(h["cloudEvents_specversion"], "1.0");
    assert_eq!(h["cloudEvents_id"], event.id.to_string());
    assert_eq!(h["cloudEvents_source"], "/outbox/conformance");
    assert_eq!(h["cloudEvents_type"], "OrderPlaced");
    assert_eq!(h["cloudEvents_subject"], "o-1");
    assert!(h["cloudEvents_time"].ends_with('Z'), "{h:?}");
    assert_eq!(h["cloudEvents_traceparent"], conformance::TRACEPARENT);
    assert_eq!(
        received[0].body,
        serde_json::json!({"total": 12}),
        "the data alone"
    );
}
