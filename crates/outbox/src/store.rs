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
//! - A claim fills its batch from keys whose whole undelivered prefix it can hold now: events of
//!   keys held by another claim never take a place in it, so an empty claim means that nothing is
//!   deliverable by this relay right now (not that everything it looked at was filtered).
//! - A claim's cost is bounded by its batch, not by the events that wait (in backoff, for a
//!   destination, or behind a dead event): the store keeps those out of the claim's way and brings
//!   them back in [`Store::maintain`], [`Store::release_held`] and when their key moves again.
//! - A claim's memory is bounded: the store stops adding events once the batch's payloads reach its
//!   byte budget (a claim always takes at least one event), and never loads an event larger than
//!   its event limit — it dead-letters it with the reason instead.

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
    /// The destination was unavailable: wait for it until `not_before` at the latest (it may be
    /// released earlier by [`Store::release_held`]), **without** counting an attempt.
    Deferred {
        error: String,
        destination: String,
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
    pub deferred: u64,
    pub dead: u64,
}

/// A point in the sequence of wake-ups of a store, taken before a claim: waiting "since" it returns
/// at once when a wake-up arrived meanwhile, so a wake-up during an empty claim is never lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WakeMark(pub u64);

/// What one round of [`Store::maintain`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Maintenance {
    /// Events whose backoff (or destination hold) ran out, made deliverable again.
    pub due: u64,
    /// Later events of blocked keys moved out of the claim's way.
    pub parked: u64,
    /// Waiting events whose key is no longer blocked (e.g. its dead event was removed by hand).
    pub unblocked: u64,
}

/// The backlog at one moment, read periodically for the metrics and the health checks.
#[derive(Debug, Default, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Backlog {
    /// Undelivered events: deliverable, retrying, held for a destination, or blocked.
    pub pending: i64,
    /// Of those, the events a claim could take now (not waiting for anything).
    pub deliverable: i64,
    /// Dead-lettered events.
    pub dead: i64,
    /// Keys whose later events wait behind an earlier event (dead, retrying or held).
    pub keys_blocked: i64,
    /// Age of the oldest undelivered event; 0 when there is none.
    pub oldest_pending_age_seconds: f64,
}

/// Where the relay claims events from.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    type Claim: Claim + 'static;

    /// Claims up to `limit` deliverable events; an empty claim when there are none.
    async fn claim(&self, limit: usize) -> Result<Self::Claim, StoreError>;

    /// The current wake-up mark; take it before a claim and wait with it after an empty one.
    fn wake_mark(&self) -> WakeMark;

    /// Waits until new events may be deliverable (a wake-up after `since`) or `timeout` passes,
    /// whichever is first. Spurious wake-ups are allowed; the relay then finds nothing and waits
    /// again.
    async fn wait_for_events(&self, since: WakeMark, timeout: std::time::Duration);

    /// Wakes this process's waiting workers (e.g. after maintenance made events deliverable).
    fn wake(&self) {}

    /// Whether a dead event holds back the later events of its key (the default policy), so that
    /// the relay can say so when it dead-letters one.
    fn dead_letter_holds_key(&self) -> bool {
        true
    }

    /// Housekeeping run periodically by the relay (retention of published events). Returns how many
    /// rows it removed.
    async fn purge_published(&self) -> Result<u64, StoreError> {
        Ok(0)
    }

    /// Frequent, cheap housekeeping: makes events whose backoff ran out deliverable again and keeps
    /// the later events of blocked keys out of the claim's way. Wakes the workers when it made
    /// something deliverable.
    async fn maintain(&self) -> Result<Maintenance, StoreError> {
        Ok(Maintenance::default())
    }

    /// Makes events deferred for `destination` deliverable again: at most `limit` of them (oldest
    /// first; `None` for all), e.g. one to probe a destination, all when it is back. Returns how
    /// many.
    async fn release_held(
        &self,
        destination: &str,
        limit: Option<usize>,
    ) -> Result<u64, StoreError> {
        let _ = (destination, limit);
        Ok(0)
    }

    /// The destinations that have deferred events waiting, so that a relay which did not see the
    /// outage (another process, or this one after a restart) probes them too.
    async fn held_destinations(&self) -> Result<Vec<String>, StoreError> {
        Ok(Vec::new())
    }

    /// The backlog now, for the backlog metrics (read every few seconds, never per claim);
    /// `None` when the store cannot tell.
    async fn backlog(&self) -> Result<Option<Backlog>, StoreError> {
        Ok(None)
    }
}
