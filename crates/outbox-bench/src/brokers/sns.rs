//! SNS (standard topic) on the local AWS emulator: `outbox_aws` against a plain SDK
//! `PublishBatch` loop. The topic has no subscription: the emulator stores nothing, so nothing
//! is cleared between chunks.

use async_trait::async_trait;
use aws_sdk_sns::types::{MessageAttributeValue, PublishBatchRequestEntry};
use futures_util::future::join_all;
use outbox::OutboxEvent;

use super::sqs::sdk;
use super::{Plain, Target};

pub(crate) async fn target(endpoint: &str) -> anyhow::Result<Target> {
    let topic = super::unique_name("outbox-bench");
    let (toml, clients) = super::sqs::emulator("sns", "topic", &topic, endpoint).await?;
    let sns = clients.sns;
    let arn = sns
        .create_topic()
        .name(&topic)
        .send()
        .await
        .map_err(sdk("CreateTopic"))?
        .topic_arn()
        .ok_or_else(|| anyhow::anyhow!("CreateTopic returned no ARN"))?
        .to_owned();
    Ok(Target {
        name: "sns",
        title: format!("SNS standard topic on the AWS emulator at {endpoint}, PublishBatch of 10, body = payload, 4 attributes"),
        toml,
        plain: Box::new(PlainSns { sns, arn }),
    })
}

struct PlainSns {
    sns: aws_sdk_sns::Client,
    arn: String,
}

#[async_trait]
impl Plain for PlainSns {
    async fn send(&self, batch: &[OutboxEvent]) -> anyhow::Result<()> {
        let entries: Vec<_> = batch.iter().enumerate().map(|(i, e)| entry(i, e)).collect();
        let sent = join_all(entries.chunks(10).map(|entries| {
            self.sns
                .publish_batch()
                .topic_arn(&self.arn)
                .set_publish_batch_request_entries(Some(entries.to_vec()))
                .send()
        }))
        .await;
        for out in sent {
            let out = out.map_err(sdk("PublishBatch"))?;
            anyhow::ensure!(out.failed().is_empty(), "SNS refused {:?}", out.failed());
        }
        Ok(())
    }

    async fn teardown(&self) {
        let _ = self.sns.delete_topic().topic_arn(&self.arn).send().await;
    }
}

fn entry(i: usize, event: &OutboxEvent) -> PublishBatchRequestEntry {
    let attributes = super::attributes(event, |value| {
        MessageAttributeValue::builder()
            .data_type("String")
            .string_value(value)
            .build()
            .ok()
    });
    PublishBatchRequestEntry::builder()
        .id(format!("m{}", i % 10))
        .message(event.payload.get())
        .set_message_attributes(Some(attributes))
        .build()
        .expect("id and message are set")
}
