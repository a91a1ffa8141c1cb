//! The database side of the relay: the [`Store`] and [`Claim`] contracts the engine relies on.
//! [`PgStore`](crate::PgStore) implements them for PostgreSQL.
//!
//! # The contract
//! - [`Store::claim`] takes up to `limit` deliverable events (pending, due, not held by another
//!   claim) and holds them exclusively until the claim is settled, released or dropped. It never
//!   takes an event unless every earlier undelivered event of its ordering key is in the same claim
//!   or already published; events come sorted by `seq`.
//! - [`Claim::settle`] records every outcome of the claim in one round trip and ends it. It fails
//!   with [`StoreError::ClaimLost`] and changes nothing when the claim is no longer held (it
//!   outlived the store's bound and another relay may own the events now: fencing).
//! - [`Claim::release`] and dropping a claim give its events back unchanged.
//! - A claim's hold is bounded in time by the store, even if the relay holding it hangs or dies.

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::event::OutboxEvent;

/// What happened to one claimed event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Acknowledged by the broker: never send again (deleted or marked, per retention).
    Published,
    /// Failed, may succeed later: count the attempt and make it due again at `not_before`.
    Retry {
        error: String,
        not_before: DateTime<Utc>,
    },
    /// Failed for good, or out of attempts: move to the dead-letter state with the reason.
    Dead { error: String },
    /// Not attempted (an earlier event of its key failed first): give it back unchanged.
    Untouched,
}

/// A failure of the store. The relay logs it, waits and tries again; nothing is lost because an
/// unsettled claim is given back.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the claim is no longer held (it outlived the transaction bound or the connection was lost); its events will be claimed again")]
    ClaimLost,
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("{0}")]
    Invalid(String),
}

/// Events held by one relay worker until they are settled.
#[async_trait]
pub trait Claim: Send {
    /// The claimed events, sorted by `seq`.
    fn events(&self) -> &[OutboxEvent];

    /// Records one outcome per event (same order as [`Claim::events`]) and ends the claim.
    async fn settle(self, outcomes: &[Outcome]) -> Result<SettleReport, StoreError>;

    /// Gives every event back unchanged (used at shutdown for events not yet published).
    async fn release(self) -> Result<(), StoreError>;
}

/// What a settle changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SettleReport {
    pub published: u64,
    pub retried: u64,
    pub dead: u64,
}

/// Where the relay claims events from.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    type Claim: Claim + 'static;

    /// Claims up to `limit` deliverable events; an empty claim when there are none.
    async fn claim(&self, limit: usize) -> Result<Self::Claim, StoreError>;

    /// Waits until new events may be deliverable or `timeout` passes, whichever is first. Spurious
    /// wake-ups are allowed; the relay then finds nothing and waits again.
    async fn wait_for_events(&self, timeout: std::time::Duration);

    /// Housekeeping run periodically by the relay (retention of published events). Returns how many
    /// rows it removed.
    async fn purge_published(&self) -> Result<u64, StoreError> {
        Ok(0)
    }
}
