//! NATS JetStream (127.0.0.1:4222): `outbox_nats` against a plain async-nats loop publishing the
//! same messages with `Nats-Msg-Id` = event id, all of a batch sent, then their acknowledgements
//! awaited together.

use async_nats::jetstream::{self, stream};
use async_nats::HeaderMap;
use async_trait::async_trait;
use futures_util::future::join_all;
use outbox::publisher::headers;
use outbox::OutboxEvent;

use super::{Plain, Target};

pub(crate) async fn target(url: &str) -> anyhow::Result<Target> {
    let name = super::unique_name("outbox-bench");
    let stream_name = name.replace('-', "_").to_uppercase();
    let client = async_nats::connect(url).await?;
    let js = jetstream::new(client);
    let stream = js
        .create_stream(stream::Config {
            name: stream_name.clone(),
            subjects: vec![format!("{name}.>")],
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow::anyhow!("create stream {stream_name}: {e}"))?;
    let toml = format!(
        "[local]\ndefault_destination = \"bench\"\n[local.nats]\nurl = \"{url}\"\n[local.destinations.bench]\nkind = \"nats\"\nsubject = \"{name}.{{event_type}}\"\nstream = \"{stream_name}\"\n"
    );
    Ok(Target {
        name: "nats",
        title: format!("JetStream at {url}, file stream, subject per event type, Nats-Msg-Id + identity headers"),
        toml,
        plain: Box::new(PlainNats {
            js,
            stream,
            subject: format!("{name}.AccountCredited"),
        }),
    })
}

struct PlainNats {
    js: jetstream::Context,
    stream: stream::Stream,
    subject: String,
}

#[async_trait]
impl Plain for PlainNats {
    async fn send(&self, batch: &[OutboxEvent]) -> anyhow::Result<()> {
        let mut acks = Vec::with_capacity(batch.len());
        for event in batch {
            let mut message_headers = HeaderMap::new();
            message_headers.insert("Nats-Msg-Id", event.id.to_string().as_str());
            for (name, value) in headers::identity(event) {
                message_headers.insert(name, value.as_str());
            }
            let message = jetstream::message::PublishMessage::build()
                .payload(event.payload.get().to_owned().into())
                .headers(message_headers);
            acks.push(self.js.send_publish(self.subject.clone(), message).await?);
        }
        for ack in join_all(acks.into_iter().map(std::future::IntoFuture::into_future)).await {
            ack?;
        }
        Ok(())
    }

    async fn clear(&self) -> anyhow::Result<()> {
        self.stream.purge().await?;
        Ok(())
    }

    async fn teardown(&self) {
        let _ = self
            .js
            .delete_stream(&self.stream.cached_info().config.name)
            .await;
    }
}
