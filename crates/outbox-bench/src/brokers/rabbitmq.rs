//! RabbitMQ (127.0.0.1:5672): `outbox_amqp` against a plain lapin loop on a confirm channel:
//! persistent, mandatory messages with `message_id` = event id through the default exchange to
//! one durable queue, all of a batch published, then their confirms awaited together.

use async_trait::async_trait;
use futures_util::future::join_all;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
    QueuePurgeOptions,
};
use lapin::publisher_confirm::Confirmation;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel};
use outbox::publisher::headers;
use outbox::OutboxEvent;

use super::{Plain, Target};

pub(crate) async fn target(url: &str) -> anyhow::Result<Target> {
    let queue = super::unique_name("outbox-bench");
    let connection =
        lapin::Connection::connect(url, outbox_amqp::connection_properties("outbox-bench")).await?;
    let channel = connection.create_channel().await?;
    channel
        .queue_declare(
            &queue,
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let toml = format!(
        "[local]\ndefault_destination = \"bench\"\n[local.rabbitmq]\nurl = \"{url}\"\n[local.destinations.bench]\nkind = \"rabbitmq\"\nexchange = \"\"\nrouting_key = \"{queue}\"\n"
    );
    Ok(Target {
        name: "rabbitmq",
        title: format!("RabbitMQ at {url}, default exchange to one durable classic queue, persistent + mandatory, publisher confirms"),
        toml,
        plain: Box::new(PlainRabbit {
            connection,
            channel,
            queue,
        }),
    })
}

struct PlainRabbit {
    connection: lapin::Connection,
    channel: Channel,
    queue: String,
}

#[async_trait]
impl Plain for PlainRabbit {
    async fn send(&self, batch: &[OutboxEvent]) -> anyhow::Result<()> {
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let mut confirms = Vec::with_capacity(batch.len());
        for event in batch {
            let mut table = FieldTable::default();
            for (name, value) in headers::identity(event) {
                table.insert(
                    ShortString::from(name),
                    AMQPValue::LongString(LongString::from(value)),
                );
            }
            let properties = BasicProperties::default()
                .with_message_id(ShortString::from(event.id.to_string()))
                .with_delivery_mode(2)
                .with_content_type(ShortString::from("application/json"))
                .with_headers(table);
            confirms.push(
                self.channel
                    .basic_publish(
                        "",
                        &self.queue,
                        options,
                        event.payload.get().as_bytes(),
                        properties,
                    )
                    .await?,
            );
        }
        for confirm in join_all(confirms).await {
            match confirm? {
                Confirmation::Ack(None) => {}
                other => anyhow::bail!("RabbitMQ did not take a message: {other:?}"),
            }
        }
        Ok(())
    }

    async fn clear(&self) -> anyhow::Result<()> {
        self.channel
            .queue_purge(&self.queue, QueuePurgeOptions::default())
            .await?;
        Ok(())
    }

    async fn teardown(&self) {
        let _ = self
            .channel
            .queue_delete(&self.queue, QueueDeleteOptions::default())
            .await;
        // Closed before the runtime ends, or lapin logs the lost connection as an error.
        let _ = self.connection.close(200, "benchmark done").await;
    }
}
