//! # outbox-demo: the whole story, end to end
//!
//! An "orders" web service writes its domain rows and its events in one transaction, the relay
//! embedded in it publishes them to SQS (or Kafka, NATS JetStream, RabbitMQ), and a "shipping"
//! service consumes them effectively once through its inbox. The `outbox-demo` binary runs each
//! part; `scripts/demo.sh [--broker sqs|kafka|nats|rabbitmq]` runs them all.
//!
//! ## Map of the crate
//! - [`orders`]: the producer: domain schema, the axum router (place / pay / cancel, and a legacy
//!   endpoint that writes without events), and [`orders::Service`], which serves it with the relay
//!   embedded unless `relay.enabled = false`.
//! - [`shipping`]: the consumer: its own tables, the event handler (one readable line per event),
//!   and [`shipping::start`], which runs an [`outbox_consumer::Consumer`] with the inbox or the
//!   DynamoDB idempotency store, or [`shipping::start_broker`] for the other brokers.
//! - [`consume`]: shipping's Kafka, NATS JetStream and RabbitMQ consumers, each with the broker's
//!   own client, one loop for the three.
//! - [`broker`]: which broker the configuration names, where shipping reads on it, and
//!   [`broker::bootstrap`], which creates the topic / stream / exchange and queue locally.
//! - [`driver`]: drives a stream of orders through the HTTP API, waits until shipping has applied
//!   every event, and builds the [`driver::Summary`] the demo prints.
//! - [`settings`]: loading the demo's `outbox.toml` (`outbox.<broker>.toml` for the other
//!   brokers) and finding the SQS queue the consumer reads.

#![forbid(unsafe_code)]

pub mod broker;
pub mod consume;
pub mod driver;
pub mod orders;
pub mod settings;
pub mod shipping;
