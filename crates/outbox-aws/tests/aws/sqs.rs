//! SQS end to end against the emulator: events enqueued in PostgreSQL, relayed by the real relay
//! through the routing publisher, received from the queue. Run `scripts/aws-emulator.sh start`
//! first (or point OUTBOX_TEST_AWS_ENDPOINT at LocalStack).

use std::collections::HashMap;
use std::time::Duration;

use crate::common::*;
use aws_sdk_sqs::types::{MessageSystemAttributeName, QueueAttributeName};
use outbox_aws::{bootstrap, publisher_from_config, resolve_payload, AwsConfig};
use outbox_testkit::TestDb;

const QUIET: Duration = Duration::from_millis(1500);
const WAIT: Duration = Duration::from_secs(20);

/// A config with one SQS destination `orders` for aggregate type `order` (plus extra TOML).
fn sqs_config(queue: &str, extra: &str) -> outbox::Config {
    load_config(
        &format!(
            r#"
[local]
publisher = "destinations"
[local.destinations.orders]
kind = "sqs"
queue = "{queue}"
{extra}
[[local.routes]]
aggregate_type = "order"
destination = "orders"
{aws}
"#,
            aws = local_aws_section()
        ),
        "local",
    )
}

async fn settings(config: &outbox::Config) -> outbox_aws::AwsSettings {
    AwsConfig::from_config(config)
        .expect("aws config")
        .settings()
}

#[tokio::test]
async fn standard_queue_delivers_payload_body_and_metadata_attributes() {
    require_emulator().await;
    let queue = unique("std");
    let config = sqs_config(&queue, "");
    let report = bootstrap(&config).await.expect("bootstrap");
    assert_eq!(report.created, vec![format!("sqs queue {queue}")]);
    let db = TestDb::new().await.unwrap();

    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let ids = enqueue(
        &db,
        vec![
            event(
                "order",
                "o-1",
                "OrderPlaced",
                serde_json::json!({"total_cents": 1250}),
            )
            .header("traceparent", traceparent)
            .header("tenant", "acme"),
            event(
                "order",
                "o-2",
                "OrderPlaced",
                serde_json::json!({"total_cents": 99}),
            ),
            event(
                "order",
                "o-1",
                "OrderShipped",
                serde_json::json!({"carrier": "ups"}),
            ),
        ],
    )
    .await;

    let publisher = publisher_from_config(&config).await.expect("publisher");
    let snapshot = relay(&db, publisher).await.drain().await.expect("drain");
    assert_eq!(snapshot.published, 3);

    let sqs = sqs(&settings(&config).await).await;
    let url = queue_url(&sqs, &queue).await;
    let messages = receive(&sqs, &url, 3, WAIT, QUIET).await;
    assert_eq!(messages.len(), 3, "exactly the three events arrive");
    let by_id = by_event_id(&messages);

    let first = by_id[&ids[0].to_string()];
    assert_eq!(
        body_json(first),
        serde_json::json!({"total_cents": 1250}),
        "body is the payload"
    );
    assert_eq!(attr(first, "outbox-event-type"), Some("OrderPlaced"));
    assert_eq!(attr(first, "outbox-aggregate-type"), Some("order"));
    assert_eq!(attr(first, "outbox-aggregate-id"), Some("o-1"));
    assert_eq!(attr(first, "traceparent"), Some(traceparent));
    assert_eq!(attr(first, "tenant"), Some("acme"));
    assert_eq!(attr(first, "outbox-claim-check"), None);
    let third = by_id[&ids[2].to_string()];
    assert_eq!(body_json(third), serde_json::json!({"carrier": "ups"}));
    assert_eq!(attr(third, "outbox-event-type"), Some("OrderShipped"));

    assert_eq!(count_status(&db, "published").await, 3);
    db.drop_db().await.unwrap();
}

#[tokio::test]
async fn fifo_queue_keeps_per_key_order_and_deduplicates_a_resent_event() {
    require_emulator().await;
    let queue = format!("{}.fifo", unique("fifo"));
    let config = sqs_config(&queue, "");
    bootstrap(&config).await.expect("bootstrap");
    let db = TestDb::new().await.unwrap();

    // 3 keys x 4 events, interleaved in seq order.
    let mut events = Vec::new();
    for n in 0..4 {
        for k in 0..3 {
            events.push(event(
                "order",
                &format!("k{k}"),
                "OrderChanged",
                serde_json::json!({"n": n}),
            ));
        }
    }
    let ids = enqueue(&db, events).await;

    let publisher = publisher_from_config(&config).await.expect("publisher");
    let relay = relay(&db, publisher).await;
    assert_eq!(relay.drain().await.expect("drain").published, 12);

    // The relay crashed after publishing but before recording it: the event is sent again.
    // (Re-sent before the consumer deletes the first copy: moto, unlike SQS, only deduplicates
    // against messages still in the queue; SQS's window is 5 minutes either way.)
    sqlx::query("UPDATE outbox_event SET status = 'pending', published_at = NULL WHERE id = $1")
        .bind(ids[0])
        .execute(&db.pool)
        .await
        .unwrap();
    assert_eq!(relay.drain().await.expect("drain").published, 1, "re-sent");

    let sqs = sqs(&settings(&config).await).await;
    let url = queue_url(&sqs, &queue).await;
    let messages = receive(&sqs, &url, 12, WAIT, QUIET).await;
    assert_eq!(
        messages.len(),
        12,
        "12 events, the re-sent one deduplicated by SQS"
    );
    let by_id = by_event_id(&messages); // panics on a duplicate
    let mut order: HashMap<String, Vec<i64>> = HashMap::new();
    for m in &messages {
        let key = attr(m, "outbox-aggregate-id").unwrap().to_owned();
        order
            .entry(key)
            .or_default()
            .push(body_json(m)["n"].as_i64().unwrap());
        let system = m.attributes().expect("system attributes");
        assert_eq!(
            system
                .get(&MessageSystemAttributeName::MessageGroupId)
                .map(String::as_str),
            Some(format!("order/{}", attr(m, "outbox-aggregate-id").unwrap()).as_str()),
            "group = ordering key"
        );
        assert_eq!(
            system
                .get(&MessageSystemAttributeName::MessageDeduplicationId)
                .map(String::as_str),
            attr(m, "outbox-event-id"),
            "deduplication id = event id"
        );
    }
    for k in 0..3 {
        assert_eq!(
            order[&format!("k{k}")],
            vec![0, 1, 2, 3],
            "per-key order of k{k}"
        );
    }
    assert!(by_id.contains_key(&ids[0].to_string()));
    db.drop_db().await.unwrap();
}

#[tokio::test]
async fn one_bad_entry_in_a_batch_is_dead_lettered_and_the_rest_arrive_once() {
    require_emulator().await;
    let queue = unique("partial");
    let config = sqs_config(&queue, "");
    bootstrap(&config).await.expect("bootstrap");
    let sqs = sqs(&settings(&config).await).await;
    let url = queue_url(&sqs, &queue).await;
    // The queue refuses messages over 1 KiB while the destination's limit is the AWS default:
    // the broker, not the publisher, finds the bad entry.
    sqs.set_queue_attributes()
        .queue_url(&url)
        .attributes(QueueAttributeName::MaximumMessageSize, "1024")
        .send()
        .await
        .expect("set MaximumMessageSize");
    let db = TestDb::new().await.unwrap();

    let big = "x".repeat(2000);
    let ids = enqueue(
        &db,
        vec![
            event("order", "k0", "OrderPlaced", serde_json::json!({"n": 0})),
            event("order", "k1", "OrderPlaced", serde_json::json!({"n": 1})),
            event(
                "order",
                "k2",
                "OrderPlaced",
                serde_json::json!({"n": 2, "big": big}),
            ),
            event("order", "k3", "OrderPlaced", serde_json::json!({"n": 3})),
            event("order", "k2", "OrderShipped", serde_json::json!({"n": 4})),
            event("order", "k4", "OrderPlaced", serde_json::json!({"n": 5})),
        ],
    )
    .await;
    let publisher = publisher_from_config(&config).await.expect("publisher");
    let snapshot = relay(&db, publisher).await.drain().await.expect("drain");
    // The dead event holds its key (the default `relay.dead_letter = "block_key"`): k2's later
    // event waits for an operator; every other key flows.
    assert_eq!((snapshot.published, snapshot.dead), (4, 1), "{snapshot:?}");

    let messages = receive(&sqs, &url, 4, WAIT, QUIET).await;
    let by_id = by_event_id(&messages); // panics on a duplicate
    let mut expected: Vec<String> = ids.iter().map(ToString::to_string).collect();
    expected.remove(4);
    expected.remove(2);
    let mut got: Vec<String> = by_id.keys().cloned().collect();
    got.sort();
    expected.sort();
    assert_eq!(
        got, expected,
        "every good event once, the bad one not at all, its key's later event held"
    );
    let (status, _, _) = row(&db, ids[4]).await;
    assert_eq!(
        status, "parked",
        "k2's later event waits behind the dead one"
    );

    let (status, attempts, error) = row(&db, ids[2]).await;
    let error = error.unwrap_or_default();
    assert_eq!((status.as_str(), attempts), ("dead", 1), "{error}");
    assert!(
        error.contains("permanent") && error.contains("1024"),
        "{error}"
    );
    db.drop_db().await.unwrap();
}

#[tokio::test]
async fn events_without_a_route_dead_letter_naming_the_missing_route() {
    require_emulator().await;
    let queue = unique("noroute");
    let config = sqs_config(&queue, "");
    bootstrap(&config).await.expect("bootstrap");
    let db = TestDb::new().await.unwrap();
    let ids = enqueue(
        &db,
        vec![
            event("user", "u-1", "UserCreated", serde_json::json!({})),
            event("order", "o-1", "OrderPlaced", serde_json::json!({})),
            event("order", "o-2", "OrderPlaced", serde_json::json!({})).destination("archive"),
        ],
    )
    .await;
    let publisher = publisher_from_config(&config).await.expect("publisher");
    let snapshot = relay(&db, publisher).await.drain().await.expect("drain");
    assert_eq!((snapshot.published, snapshot.dead), (1, 2), "{snapshot:?}");

    let (status, _, error) = row(&db, ids[0]).await;
    let error = error.unwrap_or_default();
    assert_eq!(status, "dead");
    assert!(
        error.contains("no route for event_type `UserCreated` / aggregate_type `user`")
            && error.contains("[[routes]]"),
        "{error}"
    );
    let (status, _, error) = row(&db, ids[2]).await;
    assert_eq!(status, "dead");
    assert!(error.unwrap_or_default().contains("destination `archive`"));

    let sqs = sqs(&settings(&config).await).await;
    let url = queue_url(&sqs, &queue).await;
    let messages = receive(&sqs, &url, 1, WAIT, QUIET).await;
    assert_eq!(messages.len(), 1);
    assert_eq!(
        attr(&messages[0], "outbox-event-id"),
        Some(ids[1].to_string().as_str())
    );
    db.drop_db().await.unwrap();
}

#[tokio::test]
async fn oversized_payload_goes_to_s3_as_a_claim_check_that_the_helper_resolves() {
    require_emulator().await;
    let queue = unique("large");
    let bucket = unique("outbox-large");
    let config = sqs_config(
        &queue,
        &format!("max_message_bytes = 4096\n[local.aws.large_payloads]\nbucket = \"{bucket}\"\n"),
    );
    let report = bootstrap(&config).await.expect("bootstrap");
    assert!(
        report.created.contains(&format!("s3 bucket {bucket}")),
        "{report:?}"
    );
    let db = TestDb::new().await.unwrap();

    let payload = serde_json::json!({"blob": "y".repeat(10_000)});
    let ids = enqueue(
        &db,
        vec![
            event("order", "o-1", "OrderPlaced", payload.clone()),
            event(
                "order",
                "o-2",
                "OrderPlaced",
                serde_json::json!({"small": true}),
            ),
        ],
    )
    .await;
    let publisher = publisher_from_config(&config).await.expect("publisher");
    let s3 = outbox_aws::AwsClients::new(&settings(&config).await)
        .await
        .expect("clients")
        .s3;
    assert_eq!(
        relay(&db, publisher)
            .await
            .drain()
            .await
            .expect("drain")
            .published,
        2
    );

    let sqs = sqs(&settings(&config).await).await;
    let url = queue_url(&sqs, &queue).await;
    let messages = receive(&sqs, &url, 2, WAIT, QUIET).await;
    let by_id = by_event_id(&messages);
    let large = by_id[&ids[0].to_string()];
    assert_eq!(attr(large, "outbox-claim-check"), Some("s3"));
    let body = large.body().unwrap();
    let check = outbox_aws::ClaimCheck::from_body(body).expect("a claim-check body");
    assert_eq!(check.bucket, bucket);
    assert_eq!(check.key, format!("outbox/{}.json", ids[0]));
    let resolved = resolve_payload(&s3, body, large.message_attributes())
        .await
        .expect("resolve");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&resolved).unwrap(),
        payload
    );

    let small = by_id[&ids[1].to_string()];
    assert_eq!(attr(small, "outbox-claim-check"), None);
    let resolved = resolve_payload(&s3, small.body().unwrap(), small.message_attributes())
        .await
        .expect("resolve");
    assert_eq!(
        resolved, r#"{"small": true}"#,
        "ordinary bodies pass through"
    );
    db.drop_db().await.unwrap();
}

#[tokio::test]
async fn oversized_payload_without_s3_dead_letters_with_the_size_and_the_limit() {
    require_emulator().await;
    let queue = unique("toolarge");
    let config = sqs_config(&queue, "max_message_bytes = 4096");
    bootstrap(&config).await.expect("bootstrap");
    let db = TestDb::new().await.unwrap();
    let ids = enqueue(
        &db,
        vec![event(
            "order",
            "o-1",
            "OrderPlaced",
            serde_json::json!({"blob": "z".repeat(10_000)}),
        )],
    )
    .await;
    let publisher = publisher_from_config(&config).await.expect("publisher");
    let snapshot = relay(&db, publisher).await.drain().await.expect("drain");
    assert_eq!(snapshot.dead, 1);
    let (status, attempts, error) = row(&db, ids[0]).await;
    let error = error.unwrap_or_default();
    assert_eq!((status.as_str(), attempts), ("dead", 1));
    assert!(
        error.contains("over the limit of 4096 bytes")
            && error.contains("max_message_bytes")
            && error.contains("large_payloads"),
        "{error}"
    );
    let size: usize = error
        .split("message of ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("the size is named");
    assert!(size > 10_000, "{error}");
    db.drop_db().await.unwrap();
}

/// The publisher conformance suite against a FIFO queue on the emulator, with CloudEvents bodies:
/// the message's `outbox-event-id` attribute (and FIFO dedup id) is the event id, the headers
/// travel as attributes, and the body is a CloudEvent carrying the same id and trace context.
mod conformance {
    use super::*;
    use async_trait::async_trait;
    use outbox::Publisher;
    use outbox_testkit::conformance::{self, Fixture, Received, Receiver};
    use std::collections::BTreeMap;

    struct Fifo {
        sqs: aws_sdk_sqs::Client,
    }

    struct QueueReceiver {
        sqs: aws_sdk_sqs::Client,
        url: String,
        total: usize,
        /// Whether the queue's FIFO deduplication id must be the event id (a queue the relay
        /// sends to; a queue fed by SNS gets the id SNS sets).
        fifo_dedup: bool,
    }

    #[async_trait]
    impl Receiver for QueueReceiver {
        async fn receive(&mut self, n: usize, within: Duration) -> anyhow::Result<Vec<Received>> {
            let wanted = n.saturating_sub(self.total);
            let messages = receive(&self.sqs, &self.url, wanted, within, QUIET).await;
            self.total += messages.len();
            let mut out = Vec::new();
            for m in &messages {
                let headers: BTreeMap<String, String> = m
                    .message_attributes()
                    .map(|a| {
                        a.iter()
                            .filter_map(|(k, v)| Some((k.clone(), v.string_value()?.to_owned())))
                            .collect()
                    })
                    .unwrap_or_default();
                let body = body_json(m);
                let id = headers
                    .get("outbox-event-id")
                    .cloned()
                    .ok_or_else(|| anyhow::anyhow!("no outbox-event-id attribute"))?;
                anyhow::ensure!(
                    body["id"] == id.as_str() && body["specversion"] == "1.0",
                    "the CloudEvent does not carry the event id: {body}"
                );
                anyhow::ensure!(
                    !self.fifo_dedup
                        || m.attributes()
                            .and_then(|a| {
                                a.get(
                            &aws_sdk_sqs::types::MessageSystemAttributeName::MessageDeduplicationId
                        )
                            })
                            .map(String::as_str)
                            == Some(id.as_str()),
                    "the FIFO deduplication id is not the event id"
                );
                out.push(Received {
                    message_id: id,
                    headers,
                    body,
                });
            }
            Ok(out)
        }
    }

    fn config(queue: &str, endpoint: &str) -> outbox::Config {
        load_config(
            &format!(
                "[local]\ndefault_destination = \"q\"\n[local.destinations.q]\nkind = \"sqs\"\nqueue = \"{queue}\"\nbody = \"cloudevents\"\nmax_message_bytes = 65536\n[local.aws]\nendpoint = \"{endpoint}\"\n"
            ),
            "local",
        )
    }

    #[async_trait]
    impl Fixture for Fifo {
        async fn fresh(&self) -> anyhow::Result<(Box<dyn Publisher>, Box<dyn Receiver>)> {
            let queue = format!("{}.fifo", unique("conf"));
            let config = config(&queue, &endpoint());
            bootstrap(&config).await?;
            let url = queue_url(&self.sqs, &queue).await;
            let publisher = publisher_from_config(&config).await?;
            let receiver = QueueReceiver {
                sqs: self.sqs.clone(),
                url,
                total: 0,
                fifo_dedup: true,
            };
            Ok((publisher, Box::new(receiver)))
        }

        async fn unreachable(&self) -> anyhow::Result<Box<dyn Publisher>> {
            let config = config("down.fifo", "http://127.0.0.1:1");
            Ok(publisher_from_config(&config).await?)
        }

        async fn missing(&self) -> anyhow::Result<(Box<dyn Publisher>, String)> {
            let queue = format!("{}.fifo", unique("missing"));
            let config = config(&queue, &endpoint());
            Ok((publisher_from_config(&config).await?, queue))
        }

        fn oversized_payload_bytes(&self) -> Option<usize> {
            Some(70_000)
        }
    }

    /// SNS FIFO topics, read through an SQS FIFO queue subscribed with raw message delivery.
    struct SnsFifo {
        sqs: aws_sdk_sqs::Client,
        sns: aws_sdk_sns::Client,
    }

    fn sns_config(topic: &str, endpoint: &str) -> outbox::Config {
        load_config(
            &format!(
                "[local]\ndefault_destination = \"t\"\n[local.destinations.t]\nkind = \"sns\"\ntopic = \"{topic}\"\nbody = \"cloudevents\"\nmax_message_bytes = 65536\n[local.aws]\nendpoint = \"{endpoint}\"\n"
            ),
            "local",
        )
    }

    #[async_trait]
    impl Fixture for SnsFifo {
        async fn fresh(&self) -> anyhow::Result<(Box<dyn Publisher>, Box<dyn Receiver>)> {
            let topic = format!("{}.fifo", unique("conf-topic"));
            let queue = format!("{}.fifo", unique("conf-sub"));
            let config = sns_config(&topic, &endpoint());
            bootstrap(&config).await?;
            let url = self
                .sqs
                .create_queue()
                .queue_name(&queue)
                .attributes(QueueAttributeName::FifoQueue, "true")
                .send()
                .await?
                .queue_url()
                .unwrap_or_default()
                .to_owned();
            let queue_arn = self
                .sqs
                .get_queue_attributes()
                .queue_url(&url)
                .attribute_names(QueueAttributeName::QueueArn)
                .send()
                .await?
                .attributes()
                .and_then(|a| a.get(&QueueAttributeName::QueueArn).cloned())
                .unwrap_or_default();
            let topic_arn = self
                .sns
                .create_topic()
                .name(&topic)
                .attributes("FifoTopic", "true")
                .send()
                .await?
                .topic_arn()
                .unwrap_or_default()
                .to_owned();
            self.sns
                .subscribe()
                .topic_arn(topic_arn)
                .protocol("sqs")
                .endpoint(queue_arn)
                .attributes("RawMessageDelivery", "true")
                .send()
                .await?;
            let publisher = publisher_from_config(&config).await?;
            let receiver = QueueReceiver {
                sqs: self.sqs.clone(),
                url,
                total: 0,
                fifo_dedup: false,
            };
            Ok((publisher, Box::new(receiver)))
        }

        async fn unreachable(&self) -> anyhow::Result<Box<dyn Publisher>> {
            Ok(publisher_from_config(&sns_config("down.fifo", "http://127.0.0.1:1")).await?)
        }

        async fn missing(&self) -> anyhow::Result<(Box<dyn Publisher>, String)> {
            let topic = format!("{}.fifo", unique("missing-topic"));
            let config = sns_config(&topic, &endpoint());
            Ok((publisher_from_config(&config).await?, topic))
        }

        fn oversized_payload_bytes(&self) -> Option<usize> {
            Some(70_000)
        }
    }

    #[tokio::test]
    async fn sns_passes_the_conformance_suite() {
        require_emulator().await;
        let settings = AwsConfig::from_config(&sns_config("unused.fifo", &endpoint()))
            .unwrap()
            .settings();
        let clients = outbox_aws::AwsClients::new(&settings).await.unwrap();
        let db = TestDb::new().await.unwrap();
        conformance::run(
            &SnsFifo {
                sqs: clients.sqs,
                sns: clients.sns,
            },
            &db,
        )
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn sqs_passes_the_conformance_suite() {
        require_emulator().await;
        let config = config("unused.fifo", &endpoint());
        let sqs = sqs(&AwsConfig::from_config(&config).unwrap().settings()).await;
        let db = TestDb::new().await.unwrap();
        conformance::run(&Fifo { sqs }, &db).await.unwrap();
    }
}
