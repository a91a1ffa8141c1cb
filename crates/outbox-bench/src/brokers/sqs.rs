//! SQS on the local AWS emulator: `outbox_aws` against a plain SDK `SendMessageBatch` loop.
//!
//! moto slows down as a queue grows (every send counts the queue), so the queue is emptied
//! between chunks, and chunks stay small.

use async_trait::async_trait;
use aws_sdk_sqs::types::{
    DeleteMessageBatchRequestEntry, MessageAttributeValue, SendMessageBatchRequestEntry,
};
use futures_util::future::join_all;
use outbox::OutboxEvent;

use super::{Plain, Target};

pub(crate) async fn target(endpoint: &str) -> anyhow::Result<Target> {
    let queue = super::unique_name("outbox-bench");
    let (toml, clients) = emulator("sqs", "queue", &queue, endpoint).await?;
    let sqs = clients.sqs;
    let url = sqs
        .create_queue()
        .queue_name(&queue)
        .send()
        .await
        .map_err(sdk("CreateQueue"))?
        .queue_url()
        .ok_or_else(|| anyhow::anyhow!("CreateQueue returned no URL"))?
        .to_owned();
    Ok(Target {
        name: "sqs",
        title: format!("SQS on the AWS emulator at {endpoint}, SendMessageBatch of 10, body = payload, 4 attributes"),
        toml,
        plain: Box::new(PlainSqs { sqs, url }),
    })
}

struct PlainSqs {
    sqs: aws_sdk_sqs::Client,
    url: String,
}

#[async_trait]
impl Plain for PlainSqs {
    async fn send(&self, batch: &[OutboxEvent]) -> anyhow::Result<()> {
        let entries: Vec<_> = batch.iter().enumerate().map(|(i, e)| entry(i, e)).collect();
        // As the publisher does: requests of 10, all of one batch at once.
        let sent = join_all(entries.chunks(10).map(|entries| {
            self.sqs
                .send_message_batch()
                .queue_url(&self.url)
                .set_entries(Some(entries.to_vec()))
                .send()
        }))
        .await;
        for out in sent {
            let out = out.map_err(sdk("SendMessageBatch"))?;
            anyhow::ensure!(out.failed().is_empty(), "SQS refused {:?}", out.failed());
        }
        Ok(())
    }

    /// moto refuses a purge within 60 s of the previous one (as SQS does), so this receives and
    /// deletes instead.
    async fn clear(&self) -> anyhow::Result<()> {
        loop {
            let out = self
                .sqs
                .receive_message()
                .queue_url(&self.url)
                .max_number_of_messages(10)
                .visibility_timeout(60)
                .send()
                .await
                .map_err(sdk("ReceiveMessage"))?;
            let messages = out.messages();
            if messages.is_empty() {
                return Ok(());
            }
            let entries = messages
                .iter()
                .enumerate()
                .filter_map(|(i, m)| {
                    DeleteMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .set_receipt_handle(m.receipt_handle().map(str::to_owned))
                        .build()
                        .ok()
                })
                .collect::<Vec<_>>();
            self.sqs
                .delete_message_batch()
                .queue_url(&self.url)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(sdk("DeleteMessageBatch"))?;
        }
    }

    async fn teardown(&self) {
        let _ = self.sqs.delete_queue().queue_url(&self.url).send().await;
    }
}

/// The relay's configuration for one destination of `kind` on the emulator at `endpoint` (its
/// `name_key` = `name`), and the SDK clients of the same settings, for the plain loop.
pub(super) async fn emulator(
    kind: &str,
    name_key: &str,
    name: &str,
    endpoint: &str,
) -> anyhow::Result<(String, outbox_aws::AwsClients)> {
    let toml = format!(
        "[local]\ndefault_destination = \"bench\"\n[local.destinations.bench]\nkind = \"{kind}\"\n{name_key} = \"{name}\"\n[local.aws]\nendpoint = \"{endpoint}\"\n"
    );
    let config = outbox::Config::from_toml_str(&toml, "local")?;
    let clients =
        outbox_aws::AwsClients::new(&outbox_aws::AwsSettings::from_config(&config)?).await?;
    Ok((toml, clients))
}

/// What a hand-written loop sends for an event: the payload as body, the identity headers as
/// attributes.
fn entry(i: usize, event: &OutboxEvent) -> SendMessageBatchRequestEntry {
    let attributes = super::attributes(event, |value| {
        MessageAttributeValue::builder()
            .data_type("String")
            .string_value(value)
            .build()
            .ok()
    });
    SendMessageBatchRequestEntry::builder()
        .id(format!("m{}", i % 10))
        .message_body(event.payload.get())
        .set_message_attributes(Some(attributes))
        .build()
        .expect("id and body are set")
}

/// An SDK error with its whole chain (the SDK's Display says only "service error").
pub(crate) fn sdk<E: std::error::Error>(what: &'static str) -> impl Fn(E) -> anyhow::Error {
    move |e| {
        anyhow::anyhow!(
            "AWS {what}: {}",
            aws_sdk_sqs::error::DisplayErrorContext(&e)
        )
    }
}
