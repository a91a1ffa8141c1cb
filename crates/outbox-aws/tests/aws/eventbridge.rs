//! EventBridge end to end against the emulator, with an SQS destination active in the same relay:
//! a rule on a custom bus routes matched events to a queue, unmatched events do not arrive, and a
//! key whose events go to two destinations keeps its order. Also: bootstrap is idempotent and
//! creates the DynamoDB table a consumer needs.

use std::time::Duration;

use crate::common::*;
use outbox_aws::{bootstrap, publisher_from_config, AwsClients, AwsConfig};
use outbox_testkit::TestDb;

const QUIET: Duration = Duration::from_millis(1500);
const WAIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn a_rule_on_a_custom_bus_delivers_matched_events_to_a_queue_and_only_those() {
    require_emulator().await;
    let bus = unique("bus");
    let target = unique("placed");
    let audit = unique("audit");
    let table = unique("idem");
    let config = load_config(
        &format!(
            r#"
[local]
publisher = "destinations"
default_destination = "events"
[local.destinations.events]
kind = "eventbridge"
bus = "{bus}"
[local.destinations.audit]
kind = "sqs"
queue = "{audit}"
[[local.routes]]
aggregate_type = "user"
destination = "audit"
{aws}
[local.aws.bootstrap]
[[local.aws.bootstrap.rules]]
name = "{target}-rule"
bus = "{bus}"
event_pattern = '{{"detail-type": ["OrderPlaced"], "source": ["outbox.order"]}}'
target_queue = "{target}"
[[local.aws.bootstrap.tables]]
name = "{table}"
partition_key = "consumer"
sort_key = "event_id"
ttl_attribute = "expires_at"
"#,
            aws = local_aws_section()
        ),
        "local",
    );
    let report = bootstrap(&config).await.expect("bootstrap");
    for created in [
        format!("eventbridge bus {bus}"),
        format!("sqs queue {target}"),
        format!("sqs queue {audit}"),
        format!("dynamodb table {table}"),
    ] {
        assert!(
            report.created.contains(&created),
            "{created} not in {report:?}"
        );
    }
    let again = bootstrap(&config).await.expect("bootstrap again");
    assert!(
        again.existing.contains(&format!("eventbridge bus {bus}"))
            && again.existing.contains(&format!("dynamodb table {table}"))
            && again.existing.contains(&format!("sqs queue {target}")),
        "a second bootstrap finds everything: {again:?}"
    );

    let db = TestDb::new().await.unwrap();
    let ids = enqueue(
        &db,
        vec![
            event(
                "order",
                "o-1",
                "OrderPlaced",
                serde_json::json!({"total": 1}),
            ),
            event(
                "order",
                "o-2",
                "OrderPlaced",
                serde_json::json!({"total": 2}),
            ),
            event(
                "order",
                "o-1",
                "OrderCancelled",
                serde_json::json!({"why": "x"}),
            ),
            event(
                "user",
                "u-1",
                "UserCreated",
                serde_json::json!({"name": "ann"}),
            ),
            // o-3 goes to the bus, then explicitly to the audit queue: two destinations, one key.
            event(
                "order",
                "o-3",
                "OrderPlaced",
                serde_json::json!({"total": 3}),
            ),
            event("order", "o-3", "OrderAudited", serde_json::json!({})).destination("audit"),
        ],
    )
    .await;
    let publisher = publisher_from_config(&config).await.expect("publisher");
    let snapshot = relay(&db, publisher).await.drain().await.expect("drain");
    assert_eq!((snapshot.published, snapshot.dead), (6, 0), "{snapshot:?}");

    let settings = AwsConfig::from_config(&config).unwrap().settings();
    let clients = AwsClients::new(&settings).await.unwrap();
    let url = queue_url(&clients.sqs, &target).await;
    let messages = receive(&clients.sqs, &url, 3, WAIT, QUIET).await;
    assert_eq!(
        messages.len(),
        3,
        "the three OrderPlaced events, not OrderCancelled or UserCreated"
    );
    let mut totals: Vec<i64> = messages
        .iter()
        .map(|m| {
            let envelope = body_json(m);
            assert_eq!(envelope["detail-type"], "OrderPlaced");
            assert_eq!(envelope["source"], "outbox.order");
            envelope["detail"]["total"]
                .as_i64()
                .expect("detail is the payload")
        })
        .collect();
    totals.sort();
    assert_eq!(totals, vec![1, 2, 3]);

    let audit_url = queue_url(&clients.sqs, &audit).await;
    let audited = receive(&clients.sqs, &audit_url, 2, WAIT, QUIET).await;
    let by_id = by_event_id(&audited);
    assert!(by_id.contains_key(&ids[3].to_string()) && by_id.contains_key(&ids[5].to_string()));

    let described = clients
        .dynamodb
        .describe_table()
        .table_name(&table)
        .send()
        .await
        .expect("the bootstrap table exists");
    let keys: Vec<&str> = described
        .table()
        .map(|t| t.key_schema().iter().map(|k| k.attribute_name()).collect())
        .unwrap_or_default();
    assert_eq!(keys, vec!["consumer", "event_id"]);
    db.drop_db().await.unwrap();
}

#[tokio::test]
async fn envelope_detail_carries_the_event_id_and_headers() {
    require_emulator().await;
    let bus = unique("envbus");
    let target = unique("envq");
    let config = load_config(
        &format!(
            r#"
[local]
publisher = "destinations"
default_destination = "events"
[local.destinations.events]
kind = "eventbridge"
bus = "{bus}"
source = "shop.{{aggregate_type}}"
detail = "envelope"
{aws}
[[local.aws.bootstrap.rules]]
name = "{target}-rule"
bus = "{bus}"
event_pattern = '{{"source": ["shop.order"]}}'
target_queue = "{target}"
"#,
            aws = local_aws_section()
        ),
        "local",
    );
    bootstrap(&config).await.expect("bootstrap");
    let db = TestDb::new().await.unwrap();
    let ids = enqueue(
        &db,
        vec![event(
            "order",
            "o-1",
            "OrderPlaced",
            serde_json::json!({"total": 7}),
        )
        .header("traceparent", "00-aa-bb-01")],
    )
    .await;
    let publisher = publisher_from_config(&config).await.expect("publisher");
    assert_eq!(
        relay(&db, publisher).await.drain().await.unwrap().published,
        1
    );
    let settings = AwsConfig::from_config(&config).unwrap().settings();
    let sqs = sqs(&settings).await;
    let url = queue_url(&sqs, &target).await;
    let messages = receive(&sqs, &url, 1, WAIT, QUIET).await;
    assert_eq!(messages.len(), 1);
    let detail = &body_json(&messages[0])["detail"];
    assert_eq!(detail["id"], ids[0].to_string());
    assert_eq!(detail["payload"]["total"], 7);
    assert_eq!(detail["headers"]["traceparent"], "00-aa-bb-01");
    db.drop_db().await.unwrap();
}
