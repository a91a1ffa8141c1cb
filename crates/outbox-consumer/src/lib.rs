//! # outbox-consumer: the receiving side of the outbox, effectively once
//!
//! An SQS consumer loop for events the outbox relay published, and two idempotency stores keyed on
//! the event id, so a redelivered or re-sent message is applied once.
//!
//! ## Map of the crate
//! - [`delivery`]: [`Delivery`], one received event: its id, type, aggregate, resolved body.
//! - [`handler`]: the [`Handler`] contract ([`Handled`]: processed or duplicate; an error means
//!   "not done": the message is not deleted and SQS redelivers it).
//! - [`consumer`]: [`Consumer`], the loop: long polling, bounded concurrency (FIFO groups in
//!   order), visibility extension for slow handlers, batched deletes, graceful shutdown.
//! - [`inbox`]: [`PgInbox`], the `inbox` table written in the handler's own Postgres transaction.
//! - [`dynamo`]: [`DynamoIdempotency`], a conditional put with a TTL in DynamoDB, for consumers
//!   without Postgres.
//!
//! Poison messages are not the consumer's business: the queue's redrive policy moves a message to
//! its dead-letter queue after `maxReceiveCount` receives (`outbox aws bootstrap` creates both
//! locally from `[[aws.bootstrap.redrive]]`).

pub mod consumer;
pub mod delivery;
pub mod dynamo;
pub mod handler;
pub mod inbox;

pub use consumer::{Consumer, ConsumerError, ConsumerOptions, ConsumerReport, ConsumerStats};
pub use delivery::{Delivery, DeliveryError};
pub use dynamo::{DynamoIdempotency, DynamoOptions};
pub use handler::{Handled, Handler, HandlerError};
pub use inbox::{InboxError, InboxHandler, PgInbox};
