//! The SQS side of the checker: a client for a scenario's emulator, FIFO queues, and a collector
//! that receives and deletes as it goes (moto slows down as a queue grows deep) and records the
//! event ids in arrival order.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_sqs::types::QueueAttributeName;
use aws_sdk_sqs::Client;
use tokio::sync::watch;
use uuid::Uuid;

/// An SQS client for a loopback emulator, with the same settings the relay's `local` profile uses.
pub async fn client(endpoint: &str) -> Client {
    let mut settings = outbox_aws::AwsSettings::new(outbox_aws::Profile::Local);
    settings.aws.endpoint = Some(endpoint.to_owned());
    outbox_aws::AwsClients::new(&settings)
        .await
        .expect("SQS client for the emulator")
        .sqs
}

/// Creates (or finds) a FIFO queue; returns its URL.
pub async fn fifo_queue(
    sqs: &Client,
    name: &str,
    visibility_timeout_s: u32,
) -> anyhow::Result<String> {
    let out = sqs
        .create_queue()
        .queue_name(name)
        .attributes(QueueAttributeName::FifoQueue, "true")
        .attributes(
            QueueAttributeName::VisibilityTimeout,
            visibility_timeout_s.to_string(),
        )
        .send()
        .await?;
    out.queue_url()
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("no queue url"))
}

/// Receives from a queue in the background until stopped.
pub struct Collector {
    ids: Arc<Mutex<Vec<Uuid>>>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Collector {
    pub fn start(sqs: Client, url: String) -> Self {
        let ids = Arc::new(Mutex::new(Vec::new()));
        let (stop, mut stop_rx) = watch::channel(false);
        let out = ids.clone();
        let task = tokio::spawn(async move {
            loop {
                if *stop_rx.borrow() {
                    return;
                }
                let received = tokio::select! {
                    r = sqs
                        .receive_message()
                        .queue_url(&url)
                        .max_number_of_messages(10)
                        .wait_time_seconds(1)
                        .message_attribute_names("All")
                        .send() => r,
                    _ = stop_rx.changed() => return,
                };
                let Ok(received) = received else {
                    // The emulator is down (a scenario stopped it): wait for it.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                let mut handles = Vec::new();
                for m in received.messages() {
                    let id = m
                        .message_attributes()
                        .and_then(|a| a.get("outbox-event-id"))
                        .and_then(|v| v.string_value())
                        .and_then(|s| s.parse::<Uuid>().ok());
                    if let Some(id) = id {
                        out.lock().unwrap_or_else(|p| p.into_inner()).push(id);
                    }
                    if let Some(h) = m.receipt_handle() {
                        handles.push(h.to_owned());
                    }
                }
                for h in handles {
                    let _ = sqs
                        .delete_message()
                        .queue_url(&url)
                        .receipt_handle(h)
                        .send()
                        .await;
                }
            }
        });
        Self { ids, stop, task }
    }

    /// Event ids received so far, in arrival order.
    pub fn ids(&self) -> Vec<Uuid> {
        self.ids.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub async fn stop(self) -> Vec<Uuid> {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        let ids = self.ids.lock().unwrap_or_else(|p| p.into_inner()).clone();
        ids
    }
}

/// Messages visible or in flight in a queue (moto's approximate counts are exact).
pub async fn depth(sqs: &Client, url: &str) -> anyhow::Result<i64> {
    let out = sqs
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
        .send()
        .await?;
    let attrs = out.attributes();
    let get = |n: QueueAttributeName| {
        attrs
            .and_then(|a| a.get(&n))
            .and_then(|v| v.parse::<i64>().ok())
            .unwrap_or(0)
    };
    Ok(get(QueueAttributeName::ApproximateNumberOfMessages)
        + get(QueueAttributeName::ApproximateNumberOfMessagesNotVisible))
}
