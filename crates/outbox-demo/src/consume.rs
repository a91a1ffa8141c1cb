//! Shipping's consumers for Kafka, NATS JetStream and RabbitMQ, each with the broker's own client:
//! `rdkafka`'s `StreamConsumer` (offsets committed by hand), an `async-nats` JetStream pull
//! consumer (explicit acks), `lapin`'s `basic_consume` (manual acks).
//!
//! One loop serves the three (`run`): take the next message, build the [`Delivery`] from its
//! headers (`outbox-event-id`, `outbox-event-type`, `outbox-aggregate-type`,
//! `outbox-aggregate-id`, the names every outbox publisher uses) and body, apply it through the
//! inbox ([`Shipping::apply_once`]), and acknowledge it only after that transaction committed. A
//! message is redelivered when shipping stops or crashes before acknowledging it; the inbox
//! recognises an event applied before, so it is applied once.
//!
//! Order: messages are handled one at a time, in the order the broker hands them out, and a
//! failed one is retried in place (with a backoff) until it is applied or shipping stops, so an
//! order's later event never overtakes an earlier one. A message that is not an outbox event
//! (no event id) is logged, counted as failed, and acknowledged: it could never be applied.
//!
//! Stopping lets the message in hand finish (and, for JetStream, the pull in progress answer: its
//! messages are handled), then closes the subscription; what was received but not acknowledged
//! is redelivered to the next start, in order.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream;
use async_trait::async_trait;
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use outbox_consumer::{ConsumerReport, ConsumerStats, Delivery, Handled, PgInbox};
use rdkafka::consumer::{CommitMode, Consumer as _, StreamConsumer};
use rdkafka::message::Headers as _;
use rdkafka::{ClientConfig, Message as _, Offset, TopicPartitionList};
use tokio::sync::watch;

use crate::broker::{nats_consumer_config, Source};
use crate::shipping::Shipping;

/// The longest pause between two attempts at a message that failed.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Messages a RabbitMQ channel or a JetStream pull hands out ahead of the one being handled.
const PREFETCH: u16 = 10;
/// How long connecting and the set-up calls may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// A message's headers and body, as every broker's message carries them, into a [`Delivery`];
/// the error says why it is not an outbox event.
pub fn delivery(
    headers: HashMap<String, String>,
    body: &[u8],
    message_id: String,
    group_id: Option<String>,
    receive_count: u32,
) -> Result<Delivery, String> {
    let body = String::from_utf8(body.to_vec())
        .map_err(|_| format!("message {message_id}: the body is not UTF-8 text"))?;
    let delivery = Delivery::from_headers(message_id, headers, body).map_err(|e| e.to_string())?;
    Ok(Delivery {
        group_id,
        receive_count,
        ..delivery
    })
}

/// One broker subscription, as [`run`] uses it.
#[async_trait]
trait Inlet: Send + 'static {
    /// What acknowledges one message.
    type Token: Send;

    /// The next message (its delivery, or why it is not an outbox event), waiting for one;
    /// `None` once `stop` is set (or the subscription ended).
    async fn next(
        &mut self,
        stop: &mut watch::Receiver<bool>,
    ) -> anyhow::Result<Option<(Result<Delivery, String>, Self::Token)>>;

    /// Acknowledges a handled message (the broker will not hand it out again).
    async fn ack(&mut self, token: Self::Token) -> anyhow::Result<()>;

    /// Gives back a message that was not handled (shipping is stopping), so that it is
    /// redelivered at once rather than after a timeout.
    async fn release(&mut self, _token: Self::Token) {}

    /// Ends the subscription (unacknowledged messages go back to the broker).
    async fn close(self);
}

/// Connects to `source` (creating shipping's Kafka consumer group membership or JetStream
/// consumer, starting RabbitMQ deliveries) and spawns `run` on it.
pub async fn spawn(
    source: Source,
    wait: Duration,
    shipping: Shipping,
    inbox: PgInbox,
    stats: Arc<ConsumerStats>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<tokio::task::JoinHandle<anyhow::Result<ConsumerReport>>> {
    Ok(match source {
        Source::Kafka {
            section,
            topic,
            group,
        } => {
            let inlet = KafkaInlet::new(&section.brokers, &topic, &group)?;
            tokio::spawn(run(inlet, shipping, inbox, stats, stop))
        }
        Source::Nats {
            section,
            stream,
            subjects,
            consumer,
        } => {
            let inlet = NatsInlet::new(section, &stream, &subjects, &consumer, wait).await?;
            tokio::spawn(run(inlet, shipping, inbox, stats, stop))
        }
        Source::Rabbitmq { section, queue, .. } => {
            let inlet = RabbitInlet::new(section, &queue).await?;
            tokio::spawn(run(inlet, shipping, inbox, stats, stop))
        }
    })
}

/// Receives, applies once, acknowledges; until `stop`.
async fn run<I: Inlet>(
    mut inlet: I,
    shipping: Shipping,
    inbox: PgInbox,
    stats: Arc<ConsumerStats>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<ConsumerReport> {
    let count = |counter: &std::sync::atomic::AtomicU64| counter.fetch_add(1, Ordering::Relaxed);
    loop {
        let (delivery, token) = match inlet.next(&mut stop).await {
            Ok(Some(message)) => message,
            Ok(None) => break,
            Err(e) => {
                count(&stats.receive_errors);
                tracing::warn!(error = %format!("{e:#}"), "receiving failed; retrying");
                if pause(&mut stop, Duration::from_secs(1)).await {
                    break;
                }
                continue;
            }
        };
        count(&stats.received);
        let delivery = match delivery {
            Ok(d) => d,
            Err(reason) => {
                count(&stats.failed);
                tracing::error!(%reason, "not an outbox event: acknowledged and skipped");
                if let Err(e) = inlet.ack(token).await {
                    tracing::warn!(error = %format!("{e:#}"), "acknowledging failed");
                }
                continue;
            }
        };
        let mut backoff = Duration::from_millis(100);
        let applied = loop {
            match shipping.apply_once(&inbox, &delivery).await {
                Ok(handled) => break Some(handled),
                Err(e) => {
                    count(&stats.failed);
                    tracing::warn!(
                        event_id = %delivery.event_id,
                        message_id = %delivery.message_id,
                        error = %e,
                        "applying the event failed; retrying in {backoff:?}"
                    );
                    if pause(&mut stop, backoff).await {
                        break None;
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        };
        match applied {
            Some(handled) => {
                count(match handled {
                    Handled::Processed => &stats.processed,
                    Handled::Duplicate => &stats.duplicates,
                });
                match inlet.ack(token).await {
                    Ok(()) => {
                        count(&stats.deleted);
                    }
                    // The event is applied; the broker redelivers it and the inbox skips it.
                    Err(e) => {
                        count(&stats.delete_failures);
                        tracing::warn!(
                            event_id = %delivery.event_id,
                            error = %format!("{e:#}"),
                            "acknowledging failed: the broker will redeliver the event, the inbox will skip it"
                        );
                    }
                }
            }
            None => {
                inlet.release(token).await;
                break;
            }
        }
    }
    inlet.close().await;
    Ok(stats.snapshot())
}

/// Sleeps `duration`; `true` when `stop` was set meanwhile (or before).
async fn pause(stop: &mut watch::Receiver<bool>, duration: Duration) -> bool {
    if *stop.borrow() {
        return true;
    }
    tokio::select! {
        _ = stop.wait_for(|s| *s) => true,
        _ = tokio::time::sleep(duration) => false,
    }
}

/// Completes when `stop` is set (never, if its sender is gone without setting it).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    if stop.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Kafka: the topic through a consumer group; the offset after a message is committed once it
/// was applied. One partition per order (the record key is the ordering key) keeps its order.
struct KafkaInlet {
    consumer: StreamConsumer,
}

/// A Kafka message's position: what its commit names.
struct KafkaPosition {
    topic: String,
    partition: i32,
    offset: i64,
}

impl KafkaInlet {
    fn new(brokers: &str, topic: &str, group: &str) -> anyhow::Result<Self> {
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            // A new group reads the topic from its start: nothing published before shipping first
            // ran is skipped.
            .set("auto.offset.reset", "earliest")
            .create()
            .context("creating the Kafka consumer")?;
        consumer
            .subscribe(&[topic])
            .with_context(|| format!("subscribing to the Kafka topic {topic}"))?;
        Ok(Self { consumer })
    }
}

#[async_trait]
impl Inlet for KafkaInlet {
    type Token = KafkaPosition;

    async fn next(
        &mut self,
        stop: &mut watch::Receiver<bool>,
    ) -> anyhow::Result<Option<(Result<Delivery, String>, KafkaPosition)>> {
        if *stop.borrow() {
            return Ok(None);
        }
        // Dropping a `recv` at stop loses nothing: the offset was not committed.
        let message = tokio::select! {
            _ = stopped(stop) => return Ok(None),
            m = self.consumer.recv() => m.context("receiving from Kafka")?,
        };
        let headers: HashMap<String, String> = message
            .headers()
            .map(|h| {
                h.iter()
                    .filter_map(|h| {
                        let value = std::str::from_utf8(h.value?).ok()?;
                        Some((h.key.to_owned(), value.to_owned()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let position = KafkaPosition {
            topic: message.topic().to_owned(),
            partition: message.partition(),
            offset: message.offset(),
        };
        let delivery = delivery(
            headers,
            message.payload().unwrap_or_default(),
            format!(
                "{}/{}@{}",
                position.topic, position.partition, position.offset
            ),
            message
                .key()
                .map(|k| String::from_utf8_lossy(k).into_owned()),
            1,
        );
        Ok(Some((delivery, position)))
    }

    async fn ack(&mut self, p: KafkaPosition) -> anyhow::Result<()> {
        let mut offsets = TopicPartitionList::new();
        offsets.add_partition_offset(&p.topic, p.partition, Offset::Offset(p.offset + 1))?;
        self.consumer
            .commit(&offsets, CommitMode::Sync)
            .with_context(|| {
                format!(
                    "committing offset {} of {}/{}",
                    p.offset + 1,
                    p.topic,
                    p.partition
                )
            })
    }

    async fn close(self) {
        // Dropping the consumer leaves the group (its partitions go to another member).
        self.consumer.unsubscribe();
    }
}

/// NATS JetStream: a durable pull consumer with explicit acks, pulling up to [`PREFETCH`]
/// messages at a time, each pull waiting up to `wait` for them.
struct NatsInlet {
    // Kept for the client's connection.
    _connection: outbox_nats::Connection,
    consumer: jetstream::consumer::PullConsumer,
    stream: String,
    wait: Duration,
    pull: Option<jetstream::consumer::pull::Batch>,
}

impl NatsInlet {
    async fn new(
        section: outbox_nats::NatsSection,
        stream: &str,
        subjects: &str,
        consumer: &str,
        wait: Duration,
    ) -> anyhow::Result<Self> {
        let connection = outbox_nats::Connection::new(section);
        let (_, js) = connection
            .get()
            .await
            .map_err(|e| anyhow::anyhow!("{}", e.reason()))?;
        let js = js.clone();
        let found = tokio::time::timeout(TIMEOUT, js.get_stream(stream))
            .await
            .map_err(|_| anyhow::anyhow!("NATS did not answer within {TIMEOUT:?}"))?
            .with_context(|| {
                format!("JetStream stream {stream} (run `outbox-demo bootstrap` to create it)")
            })?;
        let pull = tokio::time::timeout(
            TIMEOUT,
            found.get_or_create_consumer(consumer, nats_consumer_config(consumer, subjects)),
        )
        .await
        .map_err(|_| anyhow::anyhow!("NATS did not answer within {TIMEOUT:?}"))?
        .with_context(|| format!("the JetStream consumer {consumer} on {stream}"))?;
        Ok(Self {
            _connection: connection,
            consumer: pull,
            stream: stream.to_owned(),
            // JetStream wants a pull to expire after at least a second.
            wait: wait.max(Duration::from_secs(1)),
            pull: None,
        })
    }
}

#[async_trait]
impl Inlet for NatsInlet {
    type Token = jetstream::Message;

    async fn next(
        &mut self,
        stop: &mut watch::Receiver<bool>,
    ) -> anyhow::Result<Option<(Result<Delivery, String>, jetstream::Message)>> {
        loop {
            // A pull in progress is let answer, even at stop: what it hands out would otherwise
            // wait out the consumer's ack wait (30 s) before it is redelivered.
            if let Some(pull) = &mut self.pull {
                match pull.next().await {
                    Some(message) => {
                        let message =
                            message.map_err(|e| anyhow::anyhow!("pulling from JetStream: {e}"))?;
                        let (sequence, delivered) = message
                            .info()
                            .map(|i| (i.stream_sequence, i.delivered))
                            .unwrap_or_default();
                        let headers: HashMap<String, String> = message
                            .headers
                            .iter()
                            .flat_map(|h| h.iter())
                            .filter_map(|(name, values)| {
                                Some((name.to_string(), values.first()?.as_str().to_owned()))
                            })
                            .collect();
                        let delivery = delivery(
                            headers,
                            &message.payload,
                            format!("{}#{sequence}", self.stream),
                            None,
                            u32::try_from(delivered).unwrap_or(1).max(1),
                        );
                        return Ok(Some((delivery, message)));
                    }
                    None => self.pull = None,
                }
            }
            if *stop.borrow() {
                return Ok(None);
            }
            let pull = self
                .consumer
                .batch()
                .max_messages(PREFETCH.into())
                .expires(self.wait)
                .messages()
                .await
                .map_err(|e| anyhow::anyhow!("pulling from JetStream: {e}"))?;
            self.pull = Some(pull);
        }
    }

    async fn ack(&mut self, message: jetstream::Message) -> anyhow::Result<()> {
        message
            .ack()
            .await
            .map_err(|e| anyhow::anyhow!("acknowledging to JetStream: {e}"))
    }

    async fn release(&mut self, message: jetstream::Message) {
        let _ = message.ack_with(jetstream::AckKind::Nak(None)).await;
    }

    async fn close(mut self) {
        // Messages the last pull handed out and nobody handled: back at once, in order.
        if let Some(mut pull) = self.pull.take() {
            while let Some(Ok(message)) = pull.next().await {
                let _ = message.ack_with(jetstream::AckKind::Nak(None)).await;
            }
        }
    }
}

/// RabbitMQ: `basic.consume` on shipping's queue with manual acks and a prefetch of
/// [`PREFETCH`]; one queue keeps every order's events in order.
struct RabbitInlet {
    connection: lapin::Connection,
    channel: lapin::Channel,
    consumer: lapin::Consumer,
}

impl RabbitInlet {
    async fn new(section: outbox_amqp::RabbitSection, queue: &str) -> anyhow::Result<Self> {
        let connection = crate::broker::amqp_connect(&section).await?;
        let channel = tokio::time::timeout(TIMEOUT, connection.create_channel())
            .await
            .map_err(|_| anyhow::anyhow!("RabbitMQ did not open a channel within {TIMEOUT:?}"))?
            .context("opening a RabbitMQ channel")?;
        let bounded = |what: String| {
            move |_: tokio::time::error::Elapsed| {
                anyhow::anyhow!("RabbitMQ did not answer within {TIMEOUT:?}: {what}")
            }
        };
        tokio::time::timeout(
            TIMEOUT,
            channel.basic_qos(PREFETCH, BasicQosOptions::default()),
        )
        .await
        .map_err(bounded("basic.qos".into()))??;
        let consumer = tokio::time::timeout(
            TIMEOUT,
            channel.basic_consume(
                queue,
                crate::shipping::CONSUMER,
                BasicConsumeOptions::default(),
                FieldTable::default(),
            ),
        )
        .await
        .map_err(bounded(format!("consuming {queue}")))?
        .with_context(|| {
            format!(
                "consuming the RabbitMQ queue {queue} (run `outbox-demo bootstrap` to declare it)"
            )
        })?;
        Ok(Self {
            connection,
            channel,
            consumer,
        })
    }
}

fn amqp_text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

#[async_trait]
impl Inlet for RabbitInlet {
    type Token = lapin::acker::Acker;

    async fn next(
        &mut self,
        stop: &mut watch::Receiver<bool>,
    ) -> anyhow::Result<Option<(Result<Delivery, String>, lapin::acker::Acker)>> {
        if *stop.borrow() {
            return Ok(None);
        }
        // A delivery taken but not handled goes back to the queue, in place, when the channel
        // closes.
        let message = tokio::select! {
            _ = stopped(stop) => return Ok(None),
            m = self.consumer.next() => match m {
                Some(m) => m.context("receiving from RabbitMQ")?,
                None => return Ok(None),
            },
        };
        let headers: HashMap<String, String> = message
            .properties
            .headers()
            .as_ref()
            .map(|t| {
                t.inner()
                    .iter()
                    .filter_map(|(k, v)| Some((k.as_str().to_owned(), amqp_text(v)?)))
                    .collect()
            })
            .unwrap_or_default();
        let message_id = message
            .properties
            .message_id()
            .as_ref()
            .map(|m| m.as_str().to_owned())
            .unwrap_or_else(|| format!("delivery {}", message.delivery_tag));
        let delivery = delivery(
            headers,
            &message.data,
            message_id,
            None,
            if message.redelivered { 2 } else { 1 },
        );
        Ok(Some((delivery, message.acker)))
    }

    async fn ack(&mut self, acker: lapin::acker::Acker) -> anyhow::Result<()> {
        acker
            .ack(BasicAckOptions::default())
            .await
            .context("acknowledging to RabbitMQ")?;
        Ok(())
    }

    async fn close(self) {
        let RabbitInlet {
            connection,
            channel,
            consumer,
        } = self;
        // Cancels the subscription; unacknowledged deliveries return to the queue, in their
        // places, when the channel closes.
        drop(consumer);
        let _ = tokio::time::timeout(TIMEOUT, channel.close(200, "shipping stopped")).await;
        let _ = tokio::time::timeout(TIMEOUT, connection.close(200, "shipping stopped")).await;
    }
}
