//! # outbox-consumer: the receiving side of the outbox, effectively once
//!
//! Idempotency keyed on the event id, so a redelivered or re-sent message is applied once, with
//! any broker's own client; and, with the `aws` feature (default), an SQS consumer loop.
//!
//! ## Map of the crate
//! - [`inbox`]: [`PgInbox`], the `inbox` table written in the handler's own Postgres transaction:
//!   [`PgInbox::first_time`] ("apply this event id in this transaction once") works with any
//!   broker's client (Kafka, NATS, RabbitMQ, HTTP; see `examples/`), and
//!   [`PgInbox::purge_older_than`] keeps the table from growing forever.
//! - [`delivery`]: [`Delivery`], one received event: its id, type, aggregate, body, headers;
//!   [`Delivery::from_headers`] builds one from any broker's message.
//! - [`handler`]: the [`Handler`] contract ([`Handled`]: processed or duplicate; an error means
//!   "not done": the message is not acknowledged and the broker redelivers it).
//! - `consumer` (feature `aws`): `Consumer`, the SQS loop: long polling, bounded concurrency
//!   (FIFO groups in order), visibility extension for slow handlers, batched deletes, graceful
//!   shutdown. With the `otel` feature each message is handled in a `process` span that continues
//!   the producer's trace.
//! - `dynamo` (feature `aws`): `DynamoIdempotency`, a conditional put with a TTL in DynamoDB, for
//!   consumers without Postgres.
//!
//! Poison messages are not the consumer's business: the queue's redrive policy moves a message to
//! its dead-letter queue after `maxReceiveCount` receives (`outbox aws bootstrap` creates both
//! locally from `[[aws.bootstrap.redrive]]`).

#![forbid(unsafe_code)]

#[cfg(feature = "aws")]
pub mod consumer;
pub mod delivery;
#[cfg(feature = "aws")]
pub mod dynamo;
pub mod handler;
pub mod inbox;

#[cfg(feature = "aws")]
pub use consumer::{Consumer, ConsumerError, ConsumerOptions, ConsumerReport, ConsumerStats};
pub use delivery::{Delivery, DeliveryError};
#[cfg(feature = "aws")]
pub use dynamo::{DynamoIdempotency, DynamoOptions};
pub use handler::{Handled, Handler, HandlerError};
pub use inbox::{InboxError, InboxHandler, PgInbox};
