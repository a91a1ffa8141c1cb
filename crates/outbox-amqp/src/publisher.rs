//! The RabbitMQ publisher: one persistent, mandatory message per event, with publisher confirms.
//!
//! - Exchange and routing key: the destination's templates, rendered per event.
//! - Properties: `message_id` = the event id, `delivery_mode` = 2 (persistent), `type` = the
//!   event type, `content_type` = `application/json`, `timestamp` = the event's `created_at`.
//! - Headers (AMQP table of long strings): `outbox-event-id`, `outbox-event-type`,
//!   `outbox-aggregate-type`, `outbox-aggregate-id`, then the event's own headers (`traceparent`
//!   included); a header name longer than 255 bytes or one of ours (`outbox-…`) is dropped. With
//!   `body = "cloudevents-binary"` the CloudEvent attributes are added as `cloudEvents_specversion`,
//!   `cloudEvents_id`, `cloudEvents_source`, `cloudEvents_type`, `cloudEvents_subject`,
//!   `cloudEvents_time` (and `cloudEvents_traceparent` / `cloudEvents_tracestate`) and the body
//!   is the payload (the CloudEvents AMQP binding, binary mode).
//! - `mandatory`: a message no queue is bound for comes back (`basic.return`, 312 NO_ROUTE) and
//!   is this event's **permanent** failure (it would be lost otherwise).
//! - Order: the core's wave engine sends one event per key at a time, the next only after the
//!   broker confirmed the previous one: a key's events reach a queue in order.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::future::join_all;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::publisher_confirm::Confirmation;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, ConnectionProperties, ExchangeKind};
use outbox::publisher::batch::{publish_in_waves, Prepared, RequestFailure, Sink};
use outbox::publisher::cloudevent_attributes;
use outbox::{OutboxEvent, PublishError, PublishResult, Publisher};
use tokio::sync::Mutex;

use outbox::publisher::headers as outbox_headers;

use crate::config::{short_string_problem, RabbitDestination, RabbitSection};
use outbox::publisher::template::{Placeholder, Template};

/// Events of one wave in flight at once.
const MAX_IN_FLIGHT: usize = 256;

/// The AMQP connection shared by every destination of one build: opened on first use (building
/// contacts no broker) and again after it was lost.
pub struct Connection {
    section: RabbitSection,
    connection: Mutex<Option<lapin::Connection>>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("url", &self.redacted_url())
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// A connection to the broker of `section`, not opened yet.
    pub fn new(section: RabbitSection) -> Self {
        Self {
            section,
            connection: Mutex::new(None),
        }
    }

    /// The broker URL without its password, for messages.
    pub fn redacted_url(&self) -> String {
        outbox::config::redact_url(&self.section.url)
    }

    /// The timeout of every call to the broker.
    pub fn timeout(&self) -> Duration {
        self.section.timeout
    }

    fn unavailable(&self, why: impl std::fmt::Display) -> PublishError {
        PublishError::unavailable(format!(
            "RabbitMQ at {} {why}: is rabbitmq-server running and rabbitmq.url right?",
            self.redacted_url()
        ))
    }

    /// A new channel on the (re)opened connection. A failure is the destination's.
    pub async fn channel(&self) -> Result<Channel, PublishError> {
        let timeout = self.section.timeout;
        let mut guard = self.connection.lock().await;
        let usable = guard.as_ref().is_some_and(|c| c.status().connected());
        if !usable {
            let properties = connection_properties("outbox-relay");
            let connected = tokio::time::timeout(
                timeout,
                lapin::Connection::connect(&self.section.url, properties),
            )
            .await
            .map_err(|_| self.unavailable(format!("did not answer within {timeout:?}")))?
            // lapin's errors name the I/O or protocol failure, never the URL's password.
            .map_err(|e| self.unavailable(format!("cannot be reached ({e})")))?;
            *guard = Some(connected);
        }
        let Some(connection) = guard.as_ref() else {
            return Err(self.unavailable("has no connection"));
        };
        let channel = tokio::time::timeout(timeout, connection.create_channel())
            .await
            .map_err(|_| self.unavailable(format!("did not open a channel within {timeout:?}")))?
            .map_err(|e| self.unavailable(format!("did not open a channel ({e})")));
        if channel.is_err() {
            // A connection that cannot open channels is not worth keeping.
            *guard = None;
        }
        channel
    }
}

/// lapin's connection properties on the current tokio runtime (lapin is built without its own
/// executor), with `name` shown in RabbitMQ's connection list. Every lapin connection of the
/// workspace (relay, demo, tests, benchmark) is made with these.
pub fn connection_properties(name: &str) -> ConnectionProperties {
    ConnectionProperties::default()
        .with_connection_name(name.into())
        .with_executor(tokio_executor_trait::Tokio::current())
        .with_reactor(tokio_reactor_trait::Tokio::current())
}

/// Publishes to one `kind = "rabbitmq"` destination.
#[derive(Debug)]
pub struct RabbitPublisher {
    name: String,
    config: RabbitDestination,
    exchange: Template,
    routing_key: Template,
    connection: Arc<Connection>,
    /// The destination's confirm-mode channel, reopened after an error closed it.
    channel: Mutex<Option<Channel>>,
}

impl RabbitPublisher {
    /// A publisher for the destination `name` over `connection` (shared with the other RabbitMQ
    /// destinations of the relay).
    pub fn new(
        name: &str,
        config: RabbitDestination,
        connection: Arc<Connection>,
    ) -> Result<Self, String> {
        Ok(Self {
            name: name.to_owned(),
            exchange: Template::parse(&config.exchange, Placeholder::ALL)?,
            routing_key: Template::parse(&config.routing_key, Placeholder::ALL)?,
            config,
            connection,
            channel: Mutex::new(None),
        })
    }

    async fn confirm_channel(&self) -> Result<Channel, PublishError> {
        let mut guard = self.channel.lock().await;
        if let Some(channel) = guard.as_ref().filter(|c| c.status().connected()) {
            return Ok(channel.clone());
        }
        let channel = self.connection.channel().await?;
        let timeout = self.connection.timeout();
        tokio::time::timeout(
            timeout,
            channel.confirm_select(ConfirmSelectOptions::default()),
        )
        .await
        .map_err(|_| {
            self.connection
                .unavailable("did not enable publisher confirms in time")
        })?
        .map_err(|e| {
            self.connection
                .unavailable(format!("refused publisher confirms ({e})"))
        })?;
        *guard = Some(channel.clone());
        Ok(channel)
    }

    fn body(&self, event: &OutboxEvent) -> String {
        self.config.body.render(event)
    }
}

/// The AMQP headers of `event`, and the names of the event's headers left out.
pub fn headers_for(event: &OutboxEvent) -> (FieldTable, Vec<String>) {
    let mut table = FieldTable::default();
    let mut put = |name: &str, value: &str| {
        table.insert(
            ShortString::from(name.to_owned()),
            AMQPValue::LongString(LongString::from(value.to_owned())),
        );
    };
    for (name, value) in outbox_headers::identity(event) {
        put(name, &value);
    }
    let mut dropped = Vec::new();
    for (name, value) in &event.headers {
        if outbox_headers::is_reserved(name) || short_string_problem(name).is_some() {
            dropped.push(name.clone());
            continue;
        }
        put(name, value);
    }
    (table, dropped)
}

/// The prefix of the CloudEvents attributes in binary mode (`body = "cloudevents-binary"`): the
/// CloudEvents AMQP protocol binding maps each attribute to an application property named
/// `cloudEvents_<attribute>` (RabbitMQ's AMQP 0-9-1 headers table); the data content type is the
/// message's `content_type` property (`application/json`).
pub const CE_PROPERTY_PREFIX: &str = "cloudEvents_";

/// Adds `event`'s CloudEvent attributes to `headers` (binary mode), replacing an event header of
/// the same name.
pub fn add_cloudevent_attributes(headers: &mut FieldTable, event: &OutboxEvent) {
    for (name, value) in cloudevent_attributes(event) {
        headers.insert(
            ShortString::from(format!("{CE_PROPERTY_PREFIX}{name}")),
            AMQPValue::LongString(LongString::from(value)),
        );
    }
}

/// `text` cut to at most `max` bytes at a character boundary (AMQP short strings hold 255).
fn truncated(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// One message ready to publish.
#[derive(Debug, Clone)]
pub struct AmqpEntry {
    exchange: String,
    routing_key: String,
    properties: BasicProperties,
    body: Arc<[u8]>,
}

struct Wave<'a> {
    publisher: &'a RabbitPublisher,
    channel: Channel,
}

#[async_trait]
impl Sink for Wave<'_> {
    type Entry = AmqpEntry;

    fn max_entries(&self) -> usize {
        MAX_IN_FLIGHT
    }

    fn max_request_bytes(&self) -> usize {
        // Each entry is its own message; this bounds the bytes of one wave in flight.
        64 * 1024 * 1024
    }

    async fn prepare(&self, event: &OutboxEvent) -> Result<Prepared<AmqpEntry>, PublishError> {
        let p = self.publisher;
        let exchange = p.exchange.render(event);
        let routing_key = p.routing_key.render(event);
        for (key, value) in [("exchange", &exchange), ("routing_key", &routing_key)] {
            if let Some(problem) = short_string_problem(value) {
                return Err(PublishError::permanent(format!(
                    "event {} gives the {key} {value:?} (destinations.{}.{key}), which AMQP refuses: {problem}",
                    event.id, p.name
                )));
            }
        }
        let body = p.body(event);
        if body.len() > p.config.max_payload_bytes {
            return Err(PublishError::permanent(format!(
                "event {} makes a RabbitMQ message body of {} bytes, over the limit of {} bytes of destination `{}` \
                 (destinations.{}.max_payload_bytes): make the event smaller, or raise the limit (and the broker's max_message_size)",
                event.id,
                body.len(),
                p.config.max_payload_bytes,
                p.name,
                p.name
            )));
        }
        let (mut headers, dropped) = headers_for(event);
        if !dropped.is_empty() {
            tracing::debug!(id = %event.id, ?dropped, "headers not carried as AMQP headers");
        }
        if p.config.body.is_binary() {
            add_cloudevent_attributes(&mut headers, event);
        }
        let properties = BasicProperties::default()
            .with_message_id(ShortString::from(event.id.to_string()))
            .with_delivery_mode(2)
            .with_content_type(ShortString::from("application/json"))
            .with_type(ShortString::from(
                truncated(&event.event_type, 255).to_owned(),
            ))
            .with_timestamp(u64::try_from(event.created_at.timestamp()).unwrap_or(0))
            .with_headers(headers);
        let size = body.len();
        Ok(Prepared {
            entry: AmqpEntry {
                exchange,
                routing_key,
                properties,
                body: Arc::from(body.into_bytes()),
            },
            size,
        })
    }

    async fn send(
        &self,
        entries: &[(String, AmqpEntry)],
    ) -> Result<Vec<PublishResult>, RequestFailure> {
        let p = self.publisher;
        let timeout = p.connection.timeout();
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        // Every entry is of a different key: publish them all, then await the confirms together.
        let mut pending = Vec::with_capacity(entries.len());
        for (_, entry) in entries {
            let sent = tokio::time::timeout(
                timeout,
                self.channel.basic_publish(
                    &entry.exchange,
                    &entry.routing_key,
                    options,
                    &entry.body,
                    entry.properties.clone(),
                ),
            )
            .await;
            pending.push(sent);
        }
        let confirms = pending.into_iter().zip(entries).map(|(sent, (_, entry))| async move {
            let confirm = match sent {
                Err(_) => return Err(p.connection.unavailable(format!("did not take a message within {timeout:?}"))),
                Ok(Err(e)) => return Err(p.failed(entry, &e)),
                Ok(Ok(confirm)) => confirm,
            };
            match tokio::time::timeout(timeout, confirm).await {
                Err(_) => Err(p.connection.unavailable(format!(
                    "did not confirm a message to exchange {:?} within {timeout:?}",
                    entry.exchange
                ))),
                Ok(Err(e)) => Err(p.failed(entry, &e)),
                Ok(Ok(Confirmation::Ack(None))) => Ok(()),
                Ok(Ok(Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)))) => {
                    // `mandatory` and no queue bound: the broker dropped it. Nothing will bind a
                    // queue for this event by itself, so it is dead-lettered with the reason.
                    Err(PublishError::permanent(format!(
                        "unroutable: exchange {:?} has no queue bound for routing key {:?} (destination `{}`; {} {}): \
                         bind a queue for it, or fix destinations.{}.routing_key",
                        entry.exchange,
                        entry.routing_key,
                        p.name,
                        returned.reply_code,
                        returned.reply_text,
                        p.name
                    )))
                }
                Ok(Ok(Confirmation::Nack(None))) => Err(PublishError::retryable(format!(
                    "RabbitMQ did not accept the message to exchange {:?} (negative confirm: an internal error of the queue)",
                    entry.exchange
                ))),
                Ok(Ok(Confirmation::NotRequested)) => Err(PublishError::retryable(
                    "the channel was not in confirm mode: the message may not have been stored",
                )),
            }
        });
        Ok(join_all(confirms).await)
    }
}

impl RabbitPublisher {
    /// A lapin error on publish: the channel or connection is closed (by the broker because the
    /// exchange is missing, or because the broker went away). Either way the destination's.
    fn failed(&self, entry: &AmqpEntry, e: &lapin::Error) -> PublishError {
        self.connection.unavailable(format!(
            "failed a publish to exchange {:?} ({e}; a missing exchange closes the channel: check that it exists)",
            entry.exchange
        ))
    }
}

#[async_trait]
impl Publisher for RabbitPublisher {
    async fn publish(&self, batch: &[OutboxEvent]) -> Vec<PublishResult> {
        let channel = match self.confirm_channel().await {
            Ok(c) => c,
            Err(e) => return vec![Err(e); batch.len()],
        };
        let wave = Wave {
            publisher: self,
            channel,
        };
        publish_in_waves(&wave, batch).await
    }

    async fn check(&self) -> Result<(), PublishError> {
        let channel = self.connection.channel().await?;
        if !self.exchange.is_literal() {
            // Which exchanges a template names depends on the events: nothing to look up here.
            let _ = channel.close(200, "checked").await;
            return Ok(());
        }
        let exchange = self.exchange.fill("");
        if exchange.is_empty() {
            // The default exchange always exists.
            let _ = channel.close(200, "checked").await;
            return Ok(());
        }
        let timeout = self.connection.timeout();
        let declared = tokio::time::timeout(
            timeout,
            channel.exchange_declare(
                &exchange,
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    passive: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            ),
        )
        .await;
        match declared {
            Err(_) => Err(self.connection.unavailable(format!(
                "did not answer about exchange `{exchange}` within {timeout:?}"
            ))),
            Ok(Ok(())) => {
                let _ = channel.close(200, "checked").await;
                Ok(())
            }
            // A passive declare of a missing exchange closes the channel with 404 NOT_FOUND.
            Ok(Err(e)) if e.to_string().contains("NOT_FOUND") || e.to_string().contains("404") => {
                Err(PublishError::permanent(format!(
                    "exchange `{exchange}` (destinations.{}.exchange) does not exist on {}: declare it \
                     (e.g. `rabbitmqadmin declare exchange name={exchange} type=topic durable=true`) and bind the queues",
                    self.name,
                    self.connection.redacted_url()
                )))
            }
            Ok(Err(e)) => Err(self
                .connection
                .unavailable(format!("failed to look up exchange `{exchange}` ({e})"))),
        }
    }
}
