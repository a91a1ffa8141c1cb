//! The broker side of the relay: the [`Publisher`] contract, and what every publisher shares.
//!
//! - [`batch`]: the per-key batching engine for brokers with a batch call (waves of one event
//!   per key per request, a key stops at its first failure, request count and byte limits).
//! - [`routing`]: one relay, several named destinations of any kinds (`[destinations]`,
//!   `[[routes]]`, `default_destination`).
//! - [`envelope`]: what a message body holds (payload, the outbox envelope, or a CloudEvent),
//!   the same choice for every kind.
//! - How a kind plugs in and how a program builds the configured publisher is the set-up layer's
//!   job: [`crate::registry`] ([`crate::PublisherFactory`], [`crate::Registry::build`]).
//! - the built-in kinds `stdout`, `file` and `null` ([`StdoutPublisher`], [`FilePublisher`]), and
//!   [`MemoryPublisher`] for tests.
//!
//! # The contract
//! [`Publisher::publish`] receives a batch sorted by `seq` and returns exactly one
//! [`PublishResult`] per event, in the same order. A publisher must:
//! - send the events of one ordering key in the order given;
//! - after an event of a key fails, not send the later events of that key in the same batch, and
//!   return [`PublishError::retryable`] for them ([`skipped_after_failure`] builds that error);
//!   events of other keys are unaffected;
//! - classify every error by what it belongs to:
//!   - [`PublishError::Unavailable`]: the **destination** cannot take anything right now (connection
//!     refused, DNS, TLS, timeouts, 5xx, throttling, the queue or topic is missing, credentials
//!     expired). The relay pauses that destination, probes it with backoff, and charges **no
//!     attempt** to any event: an outage never dead-letters or reorders anything.
//!   - [`PublishError::Retryable`]: this **event** failed and trying again later can succeed; the
//!     relay backs off and counts an attempt toward `relay.max_attempts`.
//!   - [`PublishError::Permanent`]: this **event** will never be accepted (too large, rejected for
//!     its content, no route). The relay dead-letters it at once.
//!   - [`PublishError::Fatal`]: the publisher can never work again in this process (its output
//!     was closed, e.g. `outbox relay | head`). The relay gives the batch back and stops.
//! - say which destination an event goes to ([`Publisher::destination_of`]) when it has several,
//!   so that one destination's outage does not hold back the others.
//!
//! The relay bounds every call with its publish timeout; a publisher need not add its own.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;

use crate::event::{OrderingKey, OutboxEvent};

pub mod batch;
mod builtin;
pub mod envelope;
pub mod headers;
mod memory;
pub mod routing;
pub mod template;

pub use builtin::{FilePublisher, StdoutPublisher};
pub use envelope::{
    cloudevent_attributes, envelope_json, BodyFormat, CLOUDEVENTS_DATA_CONTENT_TYPE,
};
pub use memory::{Fault, MemoryPublisher};
pub use routing::{RouteConfig, Router, Routes};

/// One event's delivery outcome.
pub type PublishResult = Result<(), PublishError>;

/// Why an event was not published, classified by scope for the relay's decision (see the
/// [module documentation](self)).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// The destination cannot take anything now: pause it and probe; no attempt is charged.
    #[error("destination unavailable: {0}")]
    Unavailable(String),
    /// This event failed and may succeed later: back off and count an attempt.
    #[error("retryable: {0}")]
    Retryable(String),
    /// This event will never be accepted: dead-letter it at once.
    #[error("permanent: {0}")]
    Permanent(String),
    /// The publisher can never work again in this process: give the batch back and stop the relay.
    #[error("fatal: {0}")]
    Fatal(String),
}

impl PublishError {
    /// A failure of the destination (see [`PublishError::Unavailable`]).
    pub fn unavailable(reason: impl Into<String>) -> Self {
        Self::Unavailable(reason.into())
    }
    /// A failure of this event that may pass (see [`PublishError::Retryable`]).
    pub fn retryable(reason: impl Into<String>) -> Self {
        Self::Retryable(reason.into())
    }
    /// A failure of this event that will not pass (see [`PublishError::Permanent`]).
    pub fn permanent(reason: impl Into<String>) -> Self {
        Self::Permanent(reason.into())
    }
    /// A failure that ends the relay (see [`PublishError::Fatal`]).
    pub fn fatal(reason: impl Into<String>) -> Self {
        Self::Fatal(reason.into())
    }
    /// Whether trying again later can succeed (the event is not dead-lettered for this error).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Retryable(_) | Self::Unavailable(_))
    }
    /// Whether the destination, not the event, failed.
    pub fn is_destination_failure(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
    pub fn reason(&self) -> &str {
        match self {
            Self::Unavailable(r) | Self::Retryable(r) | Self::Permanent(r) | Self::Fatal(r) => r,
        }
    }
}

/// The error a publisher returns for an event it did not send because an earlier event of the same
/// key failed in this batch.
pub fn skipped_after_failure(failed: &OutboxEvent) -> PublishError {
    PublishError::retryable(format!(
        "not sent: earlier event {} (seq {}) of the same key failed in this batch",
        failed.id, failed.seq
    ))
}

/// Sends events to a broker. See the [module documentation](self) for the contract.
#[async_trait]
pub trait Publisher: Send + Sync + 'static {
    /// Publishes a batch sorted by `seq`; returns one result per event, in the same order.
    async fn publish(&self, batch: &[OutboxEvent]) -> Vec<PublishResult>;

    /// Checks at start-up that the destinations exist and are reachable, so a misconfiguration fails
    /// before anything is claimed. The default accepts everything.
    async fn check(&self) -> Result<(), PublishError> {
        Ok(())
    }

    /// The name of the destination `event` goes to. The relay keeps the health of each destination
    /// apart, so an outage of one holds back only the events routed to it. Publishers with one
    /// destination keep the default.
    fn destination_of(&self, event: &OutboxEvent) -> String {
        let _ = event;
        "default".to_owned()
    }
}

#[async_trait]
impl<P: Publisher + ?Sized> Publisher for Arc<P> {
    async fn publish(&self, batch: &[OutboxEvent]) -> Vec<PublishResult> {
        (**self).publish(batch).await
    }
    async fn check(&self) -> Result<(), PublishError> {
        (**self).check().await
    }
    fn destination_of(&self, event: &OutboxEvent) -> String {
        (**self).destination_of(event)
    }
}

#[async_trait]
impl<P: Publisher + ?Sized> Publisher for Box<P> {
    async fn publish(&self, batch: &[OutboxEvent]) -> Vec<PublishResult> {
        (**self).publish(batch).await
    }
    async fn check(&self) -> Result<(), PublishError> {
        (**self).check().await
    }
    fn destination_of(&self, event: &OutboxEvent) -> String {
        (**self).destination_of(event)
    }
}

/// Publishes a batch one event at a time with `send`, honouring the contract: per-key order, and a
/// failed event stops the rest of its key. For publishers without a native batch call.
pub async fn publish_sequentially<'a, F, Fut>(
    batch: &'a [OutboxEvent],
    mut send: F,
) -> Vec<PublishResult>
where
    F: FnMut(&'a OutboxEvent) -> Fut,
    Fut: std::future::Future<Output = PublishResult>,
{
    let mut failed_keys: HashMap<OrderingKey<'_>, &OutboxEvent> = HashMap::new();
    let mut results = Vec::with_capacity(batch.len());
    for event in batch {
        if let Some(failed) = failed_keys.get(&event.ordering_key()) {
            results.push(Err(skipped_after_failure(failed)));
            continue;
        }
        let result = send(event).await;
        if result.is_err() {
            failed_keys.insert(event.ordering_key(), event);
        }
        results.push(result);
    }
    results
}
