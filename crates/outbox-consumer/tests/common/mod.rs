//! Shared by the consumer tests: the emulator, fresh queues (with a DLQ) and tables per test,
//! messages shaped like the relay's, and bounded waiting.
#![allow(dead_code)]

use std::future::Future;
use std::time::{Duration, Instant};

use aws_sdk_sqs::types::MessageAttributeValue;
use outbox::publisher::headers::{
    AGGREGATE_ID as ATTR_AGGREGATE_ID, AGGREGATE_TYPE as ATTR_AGGREGATE_TYPE,
    EVENT_ID as ATTR_EVENT_ID, EVENT_TYPE as ATTR_EVENT_TYPE,
};

pub(crate) fn endpoint() -> String {
    outbox_testkit::aws_endpoint()
}

pub(crate) fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// Queues and a table of one test, created through `outbox aws bootstrap`'s code.
pub(crate) struct Fixture {
    /// The configuration the queues were bootstrapped from (destination `q` = the queue).
    pub config: outbox::Config,
    pub clients: outbox_aws::AwsClients,
    pub queue_url: String,
    pub dlq_url: String,
    pub table: String,
}

/// A standard queue (or FIFO with `fifo`) with a DLQ after `max_receive` receives, and a DynamoDB
/// idempotency table with TTL.
pub(crate) async fn fixture(max_receive: u32, fifo: bool) -> Fixture {
    let suffix = if fifo { ".fifo" } else { "" };
    let queue = format!("{}{suffix}", unique("cq"));
    let dlq = format!("{}{suffix}", unique("cq-dlq"));
    let table = unique("idem");
    let toml = format!(
        r#"
        [default]
        publisher = "destinations"
        [default.destinations.q]
        kind = "sqs"
        queue = "{queue}"
        [local.aws]
        endpoint = "{endpoint}"
        [[local.aws.bootstrap.redrive]]
        queue = "{queue}"
        dead_letter_queue = "{dlq}"
        max_receive_count = {max_receive}
        [[local.aws.bootstrap.tables]]
        name = "{table}"
        ttl_attribute = "expires_at"
        "#,
        endpoint = endpoint()
    );
    let config = load_config(&toml);
    outbox_aws::bootstrap(&config).await.expect("bootstrap");
    let settings = outbox_aws::AwsSettings::from_config(&config).expect("settings");
    let clients = outbox_aws::AwsClients::new(&settings)
        .await
        .expect("clients");
    let queue_url = outbox_consumer::Consumer::queue_url(&clients.sqs, &queue)
        .await
        .expect("queue url");
    let dlq_url = outbox_consumer::Consumer::queue_url(&clients.sqs, &dlq)
        .await
        .expect("dlq url");
    Fixture {
        config,
        clients,
        queue_url,
        dlq_url,
        table,
    }
}

pub(crate) fn load_config(toml: &str) -> outbox::Config {
    let config = outbox::Config::from_toml_str(toml, "local");
    config.unwrap_or_else(|e| panic!("config: {e}\n{toml}"))
}

fn attr(value: &str) -> MessageAttributeValue {
    MessageAttributeValue::builder()
        .data_type("String")
        .string_value(value)
        .build()
        .expect("attribute")
}

/// Sends a message shaped like the relay's: payload body, outbox attributes. Sending the same
/// `event_id` twice is a re-sent event (e.g. the relay crashed after publishing).
pub(crate) async fn send(
    f: &Fixture,
    event_id: uuid::Uuid,
    order_id: &str,
    event_type: &str,
    payload: serde_json::Value,
) {
    let mut send = f
        .clients
        .sqs
        .send_message()
        .queue_url(&f.queue_url)
        .message_body(payload.to_string())
        .message_attributes(ATTR_EVENT_ID, attr(&event_id.to_string()))
        .message_attributes(ATTR_EVENT_TYPE, attr(event_type))
        .message_attributes(ATTR_AGGREGATE_TYPE, attr("order"))
        .message_attributes(ATTR_AGGREGATE_ID, attr(order_id));
    if f.queue_url.ends_with(".fifo") {
        send = send
            .message_group_id(format!("order/{order_id}"))
            // A fresh dedup id: a re-send SQS itself would not drop.
            .message_deduplication_id(uuid::Uuid::new_v4().simple().to_string());
    }
    send.send().await.expect("send");
}

/// Approximate number of messages in a queue (visible + in flight).
pub(crate) async fn depth(sqs: &aws_sdk_sqs::Client, url: &str) -> i64 {
    use aws_sdk_sqs::types::QueueAttributeName as A;
    let out = sqs
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(A::ApproximateNumberOfMessages)
        .attribute_names(A::ApproximateNumberOfMessagesNotVisible)
        .send()
        .await
        .expect("attributes");
    let get = |name: A| {
        out.attributes()
            .and_then(|a| a.get(&name))
            .and_then(|v| v.parse::<i64>().ok())
            .unwrap_or(0)
    };
    get(A::ApproximateNumberOfMessages) + get(A::ApproximateNumberOfMessagesNotVisible)
}

/// Polls `check` every 100 ms until it is true or `timeout` passes; returns the last result.
pub(crate) async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Fast options for tests: short polls and visibility.
pub(crate) fn options(queue_url: &str, visibility_secs: u64) -> outbox_consumer::ConsumerOptions {
    let mut o = outbox_consumer::ConsumerOptions::new(queue_url);
    o.wait_time = Duration::from_secs(1);
    o.visibility_timeout = Duration::from_secs(visibility_secs);
    o.extend_every = Duration::from_millis(visibility_secs * 1000 / 2);
    o.max_in_flight = 10;
    o
}
