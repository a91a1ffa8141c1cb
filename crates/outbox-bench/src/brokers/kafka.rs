//! Kafka on the local Kafka-protocol broker (tansu, `scripts/kafka.sh start`): `outbox_kafka`
//! against a plain rdkafka loop with the crate's producer settings (idempotent, acks=all,
//! linger.ms=1): a batch's records enqueued with `send_result`, their delivery reports awaited
//! together.

use std::time::Duration;

use async_trait::async_trait;
use futures_util::future::join_all;
use outbox::publisher::headers;
use outbox::OutboxEvent;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

use super::{Plain, Target};

pub(crate) async fn target(brokers: &str) -> anyhow::Result<Target> {
    let topic = super::unique_name("outbox-bench");
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    for created in admin
        .create_topics(
            &[NewTopic::new(&topic, 3, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await?
    {
        created.map_err(|(t, e)| anyhow::anyhow!("create topic {t}: {e}"))?;
    }
    let toml = format!(
        "[local]\ndefault_destination = \"bench\"\n[local.kafka]\nbrokers = \"{brokers}\"\n[local.destinations.bench]\nkind = \"kafka\"\ntopic = \"{topic}\"\n"
    );
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "1")
        .create()?;
    Ok(Target {
        name: "kafka",
        title: format!("tansu at {brokers}, topic of 3 partitions, key = aggregate, value = payload, identity headers"),
        toml,
        plain: Box::new(PlainKafka {
            producer,
            topic,
            admin,
        }),
    })
}

struct PlainKafka {
    producer: FutureProducer,
    topic: String,
    admin: AdminClient<DefaultClientContext>,
}

#[async_trait]
impl Plain for PlainKafka {
    async fn send(&self, batch: &[OutboxEvent]) -> anyhow::Result<()> {
        let mut deliveries = Vec::with_capacity(batch.len());
        for event in batch {
            let headers =
                headers::identity(event)
                    .iter()
                    .fold(OwnedHeaders::new(), |h, (name, value)| {
                        h.insert(Header {
                            key: name,
                            value: Some(value.as_bytes()),
                        })
                    });
            let key = format!("{}/{}", event.aggregate_type, event.aggregate_id);
            let record = FutureRecord::to(&self.topic)
                .key(key.as_bytes())
                .payload(event.payload.get().as_bytes())
                .headers(headers);
            deliveries.push(
                self.producer
                    .send_result(record)
                    .map_err(|(e, _)| anyhow::anyhow!("Kafka enqueue: {e}"))?,
            );
        }
        for report in join_all(deliveries).await {
            report?.map_err(|(e, _)| anyhow::anyhow!("Kafka delivery: {e}"))?;
        }
        Ok(())
    }

    async fn teardown(&self) {
        let _ = self
            .admin
            .delete_topics(&[self.topic.as_str()], &AdminOptions::new())
            .await;
    }
}
