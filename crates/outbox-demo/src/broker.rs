//! Which broker the demo runs over, read from the `orders` destination's `kind`, where shipping
//! reads from on it, and the local resources the story needs there (created by
//! [`bootstrap()`], as `outbox aws bootstrap` creates the SQS queue).
//!
//! | broker     | the relay publishes to                       | shipping reads                                   |
//! |------------|----------------------------------------------|--------------------------------------------------|
//! | `sqs`      | a FIFO queue, group = ordering key           | the queue (outbox-consumer)                      |
//! | `kafka`    | a topic, record key = ordering key           | the topic, consumer group `shipping.<topic>`     |
//! | `nats`     | subjects captured by one JetStream stream    | the durable pull consumer `shipping` of the stream |
//! | `rabbitmq` | a topic exchange                             | the queue `shipping.<exchange>`, bound with `#`  |
//!
//! Each keeps an order's events in order to shipping: one partition per key, one stream, one queue.

use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::ExchangeKind;
use outbox::Config;
use outbox_amqp::{RabbitDestination, RabbitSection};
use outbox_kafka::{KafkaDestination, KafkaSection};
use outbox_nats::{NatsDestination, NatsSection};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientConfig;

use crate::settings::ORDERS_DESTINATION;
use crate::shipping::CONSUMER;

/// The brokers the demo runs over: the `kind` of its `orders` destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Broker {
    /// An SQS FIFO queue (the AWS story; the default).
    Sqs,
    /// A Kafka topic.
    Kafka,
    /// A NATS JetStream stream.
    Nats,
    /// A RabbitMQ exchange and queue.
    Rabbitmq,
}

impl Broker {
    /// Every broker, in the order the demo lists them.
    pub const ALL: [Broker; 4] = [Broker::Sqs, Broker::Kafka, Broker::Nats, Broker::Rabbitmq];

    /// The destination `kind`, which is also the name `--broker` takes.
    pub fn kind(self) -> &'static str {
        match self {
            Broker::Sqs => "sqs",
            Broker::Kafka => "kafka",
            Broker::Nats => "nats",
            Broker::Rabbitmq => "rabbitmq",
        }
    }

    /// The broker of `config`: the kind of its `orders` destination.
    pub fn of(config: &Config) -> anyhow::Result<Self> {
        let kind = orders_destination(config)?.kind;
        Self::ALL
            .into_iter()
            .find(|b| b.kind() == kind)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "destinations.{ORDERS_DESTINATION} is of kind {kind:?}; the demo runs over {}",
                    Self::ALL.map(Broker::kind).join(", ")
                )
            })
    }
}

impl std::fmt::Display for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.kind())
    }
}

fn orders_destination(config: &Config) -> anyhow::Result<outbox::registry::DestinationRef<'_>> {
    config
        .destination_refs()
        .find(|d| d.name == ORDERS_DESTINATION)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no [destinations.{ORDERS_DESTINATION}] in the configuration: the relay publishes \
                 order events there and shipping reads them from it"
            )
        })
}

/// Where shipping reads the `orders` destination on a broker other than SQS (for SQS:
/// [`crate::settings::orders_queue`]).
#[derive(Debug, Clone)]
pub enum Source {
    Kafka {
        section: KafkaSection,
        topic: String,
        /// The consumer group, `shipping.<topic>`.
        group: String,
    },
    Nats {
        section: NatsSection,
        /// The JetStream stream capturing the destination's subjects.
        stream: String,
        /// The subjects the stream captures.
        subjects: String,
        /// The durable pull consumer, `shipping`.
        consumer: String,
    },
    Rabbitmq {
        section: RabbitSection,
        exchange: String,
        /// Shipping's queue, `shipping.<exchange>`, bound to the exchange with `#`.
        queue: String,
    },
}

impl Source {
    /// Reads it from the `orders` destination (and its kind's section); SQS is `Ok(None)`.
    pub fn of(config: &Config) -> anyhow::Result<Option<Self>> {
        let d = orders_destination(config)?;
        let broker = Broker::of(config)?;
        let source = match broker {
            Broker::Sqs => return Ok(None),
            Broker::Kafka => {
                let topic = d.settings::<KafkaDestination>()?.topic;
                anyhow::ensure!(
                    !topic.contains('{'),
                    "destinations.{ORDERS_DESTINATION}.topic is a template ({topic:?}): shipping \
                     reads one topic, name it"
                );
                Source::Kafka {
                    section: config.section::<KafkaSection>("kafka")?.unwrap_or_default(),
                    group: format!("{CONSUMER}.{topic}"),
                    topic,
                }
            }
            Broker::Nats => {
                let destination = d.settings::<NatsDestination>()?;
                let template = destination.template().map_err(|e| {
                    anyhow::anyhow!("destinations.{ORDERS_DESTINATION}.subject: {e}")
                })?;
                Source::Nats {
                    section: config
                        .section::<NatsSection>("nats")?
                        .context("no [nats] section: the demo needs the server's url")?,
                    stream: destination.stream_name(d.name),
                    subjects: outbox_nats::template::stream_subject(&template),
                    consumer: CONSUMER.to_owned(),
                }
            }
            Broker::Rabbitmq => {
                let exchange = d.settings::<RabbitDestination>()?.exchange;
                anyhow::ensure!(
                    !exchange.is_empty() && !exchange.contains('{'),
                    "destinations.{ORDERS_DESTINATION}.exchange must name one exchange (not the \
                     default exchange, not a template): shipping's queue is bound to it"
                );
                Source::Rabbitmq {
                    section: config
                        .section::<RabbitSection>("rabbitmq")?
                        .context("no [rabbitmq] section: the demo needs the broker's url")?,
                    queue: format!("{CONSUMER}.{exchange}"),
                    exchange,
                }
            }
        };
        Ok(Some(source))
    }

    /// What shipping reads, for its start-up line.
    pub fn describe(&self) -> String {
        match self {
            Source::Kafka { topic, group, .. } => {
                format!("Kafka topic {topic} (consumer group {group})")
            }
            Source::Nats {
                stream, consumer, ..
            } => format!("JetStream stream {stream} (pull consumer {consumer})"),
            Source::Rabbitmq {
                exchange, queue, ..
            } => format!("RabbitMQ queue {queue} (bound to exchange {exchange})"),
        }
    }
}

/// Partitions of the demo's Kafka topic: order events spread over them by key.
pub const KAFKA_PARTITIONS: i32 = 3;

/// How long a bootstrap step may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Creates what the story needs on the configured broker, when it does not exist yet (idempotent;
/// for the local profile and tests: real infrastructure is created by your own tooling).
///
/// - `sqs`: what `outbox aws bootstrap` creates (the queue, its DLQ and redrive policy, the
///   DynamoDB table).
/// - `kafka`: the topic, [`KAFKA_PARTITIONS`] partitions (tansu does not create topics on use).
/// - `nats`: the stream capturing the destination's subjects ([`outbox_nats::bootstrap`]).
/// - `rabbitmq`: the durable topic exchange, shipping's durable queue, and the binding `#`.
///
/// Shipping's own reading position (Kafka consumer group, JetStream consumer) is created by
/// shipping when it starts.
///
/// Returns what was done, one line per resource, as `outbox aws bootstrap` prints it
/// (`created  ...`, `exists   ...`, `declared ...`).
pub async fn bootstrap(config: &Config) -> anyhow::Result<Vec<String>> {
    let Some(source) = Source::of(config)? else {
        let report = outbox_aws::bootstrap(config).await?;
        return Ok(reported(report.created, report.existing));
    };
    let mut done = Vec::new();
    match source {
        Source::Kafka { section, topic, .. } => {
            let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
                .set("bootstrap.servers", &section.brokers)
                .create()
                .context("creating the Kafka admin client")?;
            let options = AdminOptions::new().operation_timeout(Some(TIMEOUT));
            let results = tokio::time::timeout(
                TIMEOUT,
                admin.create_topics(
                    &[NewTopic::new(
                        &topic,
                        KAFKA_PARTITIONS,
                        TopicReplication::Fixed(1),
                    )],
                    &options,
                ),
            )
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "Kafka at {} did not answer within {TIMEOUT:?}: is it running (scripts/kafka.sh start)?",
                    section.brokers
                )
            })?
            .with_context(|| format!("creating the Kafka topic {topic}"))?;
            for result in results {
                match result {
                    Ok(t) => done.push(format!(
                        "created  kafka topic {t} ({KAFKA_PARTITIONS} partitions)"
                    )),
                    Err((t, RDKafkaErrorCode::TopicAlreadyExists)) => {
                        done.push(format!("exists   kafka topic {t}"))
                    }
                    Err((t, e)) => anyhow::bail!("creating the Kafka topic {t}: {e}"),
                }
            }
        }
        Source::Nats { .. } => {
            let report = outbox_nats::bootstrap(config).await?;
            done = reported(
                report
                    .created
                    .into_iter()
                    .map(|(stream, subjects)| {
                        format!("jetstream stream {stream} (subjects {subjects})")
                    })
                    .collect(),
                report
                    .existing
                    .into_iter()
                    .map(|stream| format!("jetstream stream {stream}"))
                    .collect(),
            );
        }
        Source::Rabbitmq {
            section,
            exchange,
            queue,
        } => {
            let connection = amqp_connect(&section).await?;
            let channel = bounded(connection.create_channel())
                .await
                .context("opening a RabbitMQ channel")?;
            // Declaring is idempotent: an existing exchange or queue with the same settings is
            // left as it is (different settings are an error, which names them).
            bounded(channel.exchange_declare(
                &exchange,
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            ))
            .await
            .with_context(|| format!("declaring the RabbitMQ exchange {exchange}"))?;
            let declared = bounded(channel.queue_declare(
                &queue,
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            ))
            .await
            .with_context(|| format!("declaring the RabbitMQ queue {queue}"))?;
            bounded(channel.queue_bind(
                &queue,
                &exchange,
                "#",
                QueueBindOptions::default(),
                FieldTable::default(),
            ))
            .await
            .with_context(|| format!("binding the RabbitMQ queue {queue} to {exchange}"))?;
            let _ = channel.close(200, "declared").await;
            let _ = connection.close(200, "declared").await;
            done.push(format!(
                "declared rabbitmq exchange {exchange} (topic, durable), queue {queue} (durable, \
                 {} messages ready) bound to it with #",
                declared.message_count()
            ));
        }
    }
    Ok(done)
}

fn reported(created: Vec<String>, existing: Vec<String>) -> Vec<String> {
    created
        .into_iter()
        .map(|r| format!("created  {r}"))
        .chain(existing.into_iter().map(|r| format!("exists   {r}")))
        .collect()
}

/// A connection to the RabbitMQ broker of `section`, on this tokio runtime. Close it
/// (`Connection::close`) before the runtime ends, or lapin logs the lost connection as an error.
pub async fn amqp_connect(section: &RabbitSection) -> anyhow::Result<lapin::Connection> {
    let properties = outbox_amqp::connection_properties("outbox-demo");
    bounded(lapin::Connection::connect(&section.url, properties))
        .await
        // lapin's errors name the I/O or protocol failure, never the URL's password.
        .with_context(|| {
            format!(
                "connecting to RabbitMQ at {}: is rabbitmq-server running?",
                outbox::config::redact_url(&section.url)
            )
        })
}

async fn bounded<T>(
    call: impl std::future::Future<Output = lapin::Result<T>>,
) -> anyhow::Result<T> {
    Ok(tokio::time::timeout(TIMEOUT, call)
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {TIMEOUT:?}"))??)
}

/// The JetStream consumer shipping pulls from: durable, explicit acks, from the stream's start.
pub fn nats_consumer_config(consumer: &str, subjects: &str) -> jetstream::consumer::pull::Config {
    jetstream::consumer::pull::Config {
        durable_name: Some(consumer.to_owned()),
        filter_subject: subjects.to_owned(),
        ack_policy: jetstream::consumer::AckPolicy::Explicit,
        deliver_policy: jetstream::consumer::DeliverPolicy::All,
        ..Default::default()
    }
}
