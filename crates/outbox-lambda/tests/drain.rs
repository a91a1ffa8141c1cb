//! The Lambda handler's logic, without the Lambda runtime: a backlog in a real Postgres is drained
//! to an emulator queue in one invocation, which reports what it published; the next invocation
//! finds nothing to do.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use outbox::{NewEvent, Outbox, Schema};
use outbox_lambda::LambdaRelay;
use outbox_testkit::TestDb;

fn endpoint() -> String {
    outbox_testkit::aws_endpoint()
}

fn config(db: &TestDb, queue: &str) -> outbox::Config {
    let toml = format!(
        r#"
        [default]
        publisher = "destinations"
        [default.database]
        url = "{url}"
        [default.relay]
        batch_size = 10
        [default.destinations.orders]
        kind = "sqs"
        queue = "{queue}"
        [[default.routes]]
        aggregate_type = "order"
        destination = "orders"
        [local.aws]
        endpoint = "{endpoint}"
        "#,
        url = db.url,
        endpoint = endpoint()
    );
    outbox::Config::from_toml_str(&toml, "local").unwrap()
}

async fn receive_all(sqs: &aws_sdk_sqs::Client, url: &str, expected: usize) -> Vec<String> {
    let mut ids = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while ids.len() < expected && Instant::now() < deadline {
        let out = sqs
            .receive_message()
            .queue_url(url)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .message_attribute_names("All")
            .send()
            .await
            .unwrap();
        for m in out.messages() {
            ids.push(
                m.message_attributes().unwrap()["outbox-event-id"]
                    .string_value()
                    .unwrap()
                    .to_owned(),
            );
            sqs.delete_message()
                .queue_url(url)
                .receipt_handle(m.receipt_handle().unwrap())
                .send()
                .await
                .unwrap();
        }
    }
    ids
}

#[tokio::test]
async fn one_invocation_drains_the_backlog_and_reports_it() {
    let db = TestDb::new().await.unwrap();
    let queue = format!(
        "lambda-{}.fifo",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let config = config(&db, &queue);
    outbox_aws::bootstrap(&config).await.unwrap();

    // A backlog built up while no relay ran: 5 orders x 5 events.
    let outbox = Outbox::new(Schema::default());
    let mut tx = db.pool.begin().await.unwrap();
    let mut enqueued = HashSet::new();
    for step in 0..5 {
        for order in 0..5 {
            let event = NewEvent::new("order", format!("o-{order}"), "OrderUpdated")
                .payload(&serde_json::json!({"step": step}))
                .unwrap();
            enqueued.insert(outbox.enqueue(&mut tx, event).await.unwrap().to_string());
        }
    }
    tx.commit().await.unwrap();

    let relay = LambdaRelay::from_config(&config).await.unwrap();
    let report = relay.drain_once().await.unwrap();
    assert_eq!(report.published, 25, "{report:?}");
    assert_eq!(
        (report.retried, report.dead, report.backlog),
        (0, 0, 0),
        "{report:?}"
    );
    assert!(!report.budget_exhausted);
    assert!(
        report.batches >= 3,
        "batch_size 10 needs at least 3 batches: {report:?}"
    );

    let settings = outbox_aws::AwsSettings::from_config(&config).unwrap();
    let sqs = outbox_aws::AwsClients::new(&settings).await.unwrap().sqs;
    let url = sqs
        .get_queue_url()
        .queue_name(&queue)
        .send()
        .await
        .unwrap()
        .queue_url()
        .unwrap()
        .to_owned();
    let received: HashSet<String> = receive_all(&sqs, &url, 25).await.into_iter().collect();
    assert_eq!(received, enqueued);

    // A warm invocation with nothing to do.
    let again = relay.drain_once().await.unwrap();
    assert_eq!(
        (again.published, again.batches, again.backlog),
        (0, 0, 0),
        "{again:?}"
    );

    // A budget already spent publishes nothing and says so.
    let mut tx = db.pool.begin().await.unwrap();
    outbox
        .enqueue(&mut tx, NewEvent::new("order", "o-9", "OrderPlaced"))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let late = relay.drain_until(Some(Instant::now())).await.unwrap();
    assert!(
        late.budget_exhausted && late.published == 0 && late.backlog == 1,
        "{late:?}"
    );
    // ... and the one-call form picks it up.
    let once = outbox_lambda::drain_once(&config).await.unwrap();
    assert_eq!((once.published, once.backlog), (1, 0), "{once:?}");
    db.drop_db().await.unwrap();
}
