//! Operator queries: the backlog at a glance, and the dead letters: list, show, replay, delete.
//!
//! The dead-letter functions are the library behind `outbox dead ...` (and any admin API built
//! later): typed errors, and every change in short transactions (of [`DEAD_CHANGE_BATCH`] events)
//! that each also release the later events of the affected keys that wait behind the dead ones,
//! then wake the relays. A long change reports progress and can stop between two transactions.

use std::ops::ControlFlow;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::postgres::PgRow;
use sqlx::types::Json;
use sqlx::{PgPool, Row};
use uuid::Uuid;

use super::schema::Schema;
use crate::event::Headers;
use crate::store::Backlog;

/// The outbox at a glance (`outbox status --json`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Status {
    /// Events not yet published (deliverable, waiting in backoff, held or blocked: all below;
    /// delayed events that are not due yet count here too).
    pub pending: i64,
    /// Pending events waiting out a backoff after a failed attempt.
    pub retrying: i64,
    /// Pending events held because their destination was unavailable (no attempt counted).
    pub held: i64,
    /// Pending events waiting behind an earlier event of their key (in backoff, held, or dead).
    pub blocked: i64,
    /// Dead-lettered events waiting for an operator.
    pub dead: i64,
    /// Published events kept for the retention period.
    pub published_retained: i64,
    /// Age of the oldest pending event; 0 when there is none.
    pub oldest_pending_age_seconds: f64,
    /// The key of the oldest event that waits behind another event of its key, if any.
    pub oldest_blocked_key: Option<String>,
    /// Per destination that events are held for: how many.
    pub held_by_destination: std::collections::BTreeMap<String, i64>,
    /// Keys whose later events wait behind an earlier event (dead, retrying or held).
    pub keys_blocked: i64,
    /// The first of those keys (`type/id`), oldest waiting event first, at most
    /// [`BLOCKED_KEYS_SHOWN`].
    pub blocked_keys: Vec<String>,
    /// Per destination named on dead events (`-` for events routed by type): how many.
    pub dead_by_destination: std::collections::BTreeMap<String, i64>,
}

/// How many blocked keys [`status`] names.
pub const BLOCKED_KEYS_SHOWN: i64 = 20;

/// The backlog in one cheap statement (every count on a partial index), for the relay's periodic
/// metrics and the readiness check.
pub async fn backlog(pool: &PgPool, schema: &Schema) -> Result<Backlog, sqlx::Error> {
    let t = schema.qualify("outbox_event");
    let row = sqlx::query(&format!(
        "SELECT
             (SELECT count(*) FROM {t} WHERE status IN ('pending', 'parked'))
               + (SELECT count(*) FROM {t} WHERE status = 'scheduled'),
             (SELECT count(*) FROM {t} WHERE status = 'pending'),
             (SELECT count(*) FROM {t} WHERE status = 'dead'),
             (SELECT count(*) FROM (SELECT DISTINCT aggregate_type, aggregate_id FROM {t}
                                    WHERE status = 'parked' AND available_at = 'infinity') k),
             {oldest}",
        oldest = OLDEST_AGE.replace("{t}", &t)
    ))
    .fetch_one(pool)
    .await?;
    Ok(Backlog {
        pending: row.try_get(0)?,
        deliverable: row.try_get(1)?,
        dead: row.try_get(2)?,
        keys_blocked: row.try_get(3)?,
        oldest_pending_age_seconds: row.try_get(4)?,
    })
}

/// The age of the oldest undelivered event in seconds (0 without one), as a select-list item.
/// A delayed event that is not due yet (parked, never tried, not held, a finite `available_at`
/// in the future) does not count: it is not late.
const OLDEST_AGE: &str = "COALESCE(EXTRACT(EPOCH FROM now() - LEAST(
                 (SELECT created_at FROM {t} WHERE status = 'pending' ORDER BY seq LIMIT 1),
                 (SELECT min(created_at) FROM {t} WHERE status = 'parked'
                    AND NOT (attempts = 0 AND held_for IS NULL
                             AND available_at > now() AND available_at < 'infinity')))), 0)::float8";

pub async fn status(pool: &PgPool, schema: &Schema) -> Result<Status, sqlx::Error> {
    let t = schema.qualify("outbox_event");
    // Separate sub-selects so each can use its partial index instead of one full scan.
    let row = sqlx::query(&format!(
        "SELECT
             (SELECT count(*) FROM {t} WHERE status IN ('pending', 'parked'))
               + (SELECT count(*) FROM {t} WHERE status = 'scheduled'),
             (SELECT count(*) FROM {t} WHERE status = 'parked' AND available_at < 'infinity'
                                         AND held_for IS NULL AND attempts > 0),
             (SELECT count(*) FROM {t} WHERE status = 'parked' AND held_for IS NOT NULL),
             (SELECT count(*) FROM {t} WHERE status = 'parked' AND available_at = 'infinity'),
             (SELECT count(*) FROM {t} WHERE status = 'dead'),
             (SELECT count(*) FROM {t} WHERE status = 'published'),
             {oldest},
             (SELECT aggregate_type || '/' || aggregate_id FROM {t}
               WHERE status = 'parked' AND available_at = 'infinity' ORDER BY available_at, seq LIMIT 1)",
        oldest = OLDEST_AGE.replace("{t}", &t)
    ))
    .fetch_one(pool)
    .await?;
    let held_by_destination = sqlx::query_as::<_, (String, i64)>(&format!(
        "SELECT held_for, count(*) FROM {t}
         WHERE status = 'parked' AND held_for IS NOT NULL GROUP BY held_for ORDER BY held_for"
    ))
    .fetch_all(pool)
    .await?
    .into_iter()
    .collect();
    // The first waiting event of each blocked key, oldest first.
    let blocked_keys = sqlx::query_scalar::<_, String>(&format!(
        "SELECT k FROM (SELECT aggregate_type || '/' || aggregate_id AS k, min(seq) AS first
                        FROM {t} WHERE status = 'parked' AND available_at = 'infinity'
                        GROUP BY aggregate_type, aggregate_id) b
         ORDER BY first LIMIT $1"
    ))
    .bind(BLOCKED_KEYS_SHOWN)
    .fetch_all(pool)
    .await?;
    let keys_blocked: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM (SELECT DISTINCT aggregate_type, aggregate_id FROM {t}
                               WHERE status = 'parked' AND available_at = 'infinity') k"
    ))
    .fetch_one(pool)
    .await?;
    let dead_by_destination = sqlx::query_as::<_, (String, i64)>(&format!(
        "SELECT COALESCE(destination, '-'), count(*) FROM {t}
         WHERE status = 'dead' GROUP BY 1 ORDER BY 1"
    ))
    .fetch_all(pool)
    .await?
    .into_iter()
    .collect();
    Ok(Status {
        pending: row.try_get(0)?,
        retrying: row.try_get(1)?,
        held: row.try_get(2)?,
        blocked: row.try_get(3)?,
        dead: row.try_get(4)?,
        published_retained: row.try_get(5)?,
        oldest_pending_age_seconds: row.try_get(6)?,
        oldest_blocked_key: row.try_get(7)?,
        held_by_destination,
        keys_blocked,
        blocked_keys,
        dead_by_destination,
    })
}

/// The most dead events one listing returns.
pub const MAX_DEAD_LIST_LIMIT: i64 = 10_000;

/// Why a dead-letter operation failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("limit {0} is out of range: use 1 to {MAX_DEAD_LIST_LIMIT}")]
    InvalidLimit(i64),
    #[error("an aggregate id needs its aggregate type: filter on the key TYPE/ID")]
    IdWithoutType,
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

/// A dead-lettered event as an operator sees it in a listing.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DeadEvent {
    pub id: Uuid,
    pub seq: i64,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_type: String,
    pub destination: Option<String>,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// A dead-lettered event with its content (`outbox dead show`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DeadEventDetail {
    #[serde(flatten)]
    pub event: DeadEvent,
    pub payload: serde_json::Value,
    pub headers: Headers,
}

/// Which dead events a listing, replay or delete is about. Every condition set must hold; the
/// default (nothing set) matches every dead event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeadFilter {
    /// Exactly this `event_type`.
    pub event_type: Option<String>,
    /// Exactly this `aggregate_type`.
    pub aggregate_type: Option<String>,
    /// Exactly this `aggregate_id` (needs `aggregate_type`: an id means something only within its
    /// type).
    pub aggregate_id: Option<String>,
    /// Created at or after this instant.
    pub since: Option<DateTime<Utc>>,
    /// `last_error` contains this text, ignoring case.
    pub error_contains: Option<String>,
}

impl DeadFilter {
    /// Whether no condition is set (the filter matches every dead event).
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// The dead events a replay or delete changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeadSelection {
    /// These ids; the ones that are not dead events are reported back as not found.
    Ids(Vec<Uuid>),
    /// Every dead event that matches.
    Matching(DeadFilter),
}

/// What a replay or delete did.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct DeadChange {
    /// The dead events replayed or deleted, in `seq` order.
    pub changed: Vec<Uuid>,
    /// Ids asked for that are not dead events (never existed, or already replayed, deleted or
    /// published).
    pub not_found: Vec<Uuid>,
    /// Later events of the affected keys that waited behind the dead ones and were made pending.
    pub released: u64,
    /// The change stopped between two transactions when asked to (`*_with_progress`): what
    /// `changed` lists is done, the rest of the selection is untouched (and `not_found` is empty,
    /// as it is unknown). Running the same change again continues.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub interrupted: bool,
}

/// The `WHERE` conditions of a selection over `$1` (ids) and `$2..$6` (the filter), bound by
/// [`bind_selection`].
const SELECTION: &str = "status = 'dead'
    AND ($1::uuid[] IS NULL OR id = ANY($1))
    AND ($2::text IS NULL OR event_type = $2)
    AND ($3::text IS NULL OR aggregate_type = $3)
    AND ($4::text IS NULL OR aggregate_id = $4)
    AND ($5::timestamptz IS NULL OR created_at >= $5)
    AND ($6::text IS NULL OR strpos(lower(COALESCE(last_error, '')), lower($6)) > 0)";

fn bind_selection<'q>(
    query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ids: Option<&'q [Uuid]>,
    filter: &'q DeadFilter,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    query
        .bind(ids)
        .bind(filter.event_type.as_deref())
        .bind(filter.aggregate_type.as_deref())
        .bind(filter.aggregate_id.as_deref())
        .bind(filter.since)
        .bind(filter.error_contains.as_deref())
}

fn check_filter(filter: &DeadFilter) -> Result<(), AdminError> {
    if filter.aggregate_id.is_some() && filter.aggregate_type.is_none() {
        return Err(AdminError::IdWithoutType);
    }
    Ok(())
}

const LISTED: &str =
    "id, seq, aggregate_type, aggregate_id, event_type, destination, attempts, last_error, created_at";

fn decode_dead(r: &PgRow) -> Result<DeadEvent, sqlx::Error> {
    Ok(DeadEvent {
        id: r.try_get("id")?,
        seq: r.try_get("seq")?,
        aggregate_type: r.try_get("aggregate_type")?,
        aggregate_id: r.try_get("aggregate_id")?,
        event_type: r.try_get("event_type")?,
        destination: r.try_get("destination")?,
        attempts: r.try_get("attempts")?,
        last_error: r.try_get("last_error")?,
        created_at: r.try_get("created_at")?,
    })
}

/// The dead events that match `filter`, oldest (`seq`) first, at most `limit`
/// (1..=[`MAX_DEAD_LIST_LIMIT`]).
pub async fn dead_events(
    pool: &PgPool,
    schema: &Schema,
    filter: &DeadFilter,
    limit: i64,
) -> Result<Vec<DeadEvent>, AdminError> {
    if !(1..=MAX_DEAD_LIST_LIMIT).contains(&limit) {
        return Err(AdminError::InvalidLimit(limit));
    }
    check_filter(filter)?;
    let t = schema.qualify("outbox_event");
    let sql = format!("SELECT {LISTED} FROM {t} WHERE {SELECTION} ORDER BY seq LIMIT $7");
    let rows = bind_selection(sqlx::query(&sql), None, filter)
        .bind(limit)
        .fetch_all(pool)
        .await?;
    Ok(rows.iter().map(decode_dead).collect::<Result<_, _>>()?)
}

/// The dead events a selection names (for a dry run or a confirmation), oldest first, and the
/// requested ids that are not dead events.
pub async fn select_dead(
    pool: &PgPool,
    schema: &Schema,
    selection: &DeadSelection,
) -> Result<(Vec<DeadEvent>, Vec<Uuid>), AdminError> {
    let (ids, filter) = split(selection);
    check_filter(filter)?;
    let t = schema.qualify("outbox_event");
    let sql = format!("SELECT {LISTED} FROM {t} WHERE {SELECTION} ORDER BY seq");
    let rows = bind_selection(sqlx::query(&sql), ids, filter)
        .fetch_all(pool)
        .await?;
    let events: Vec<DeadEvent> = rows.iter().map(decode_dead).collect::<Result<_, _>>()?;
    let found: Vec<Uuid> = events.iter().map(|e| e.id).collect();
    Ok((events, missing(ids, &found)))
}

/// One dead event with its payload and headers; `None` when no dead event has this id.
pub async fn dead_event(
    pool: &PgPool,
    schema: &Schema,
    id: Uuid,
) -> Result<Option<DeadEventDetail>, AdminError> {
    let t = schema.qualify("outbox_event");
    let row = sqlx::query(&format!(
        "SELECT {LISTED}, payload, headers FROM {t} WHERE status = 'dead' AND id = $1"
    ))
    .bind(id)
    .fetch_optional(pool)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let payload: Json<serde_json::Value> = row.try_get("payload")?;
    let headers: Json<Headers> = row.try_get("headers")?;
    Ok(Some(DeadEventDetail {
        event: decode_dead(&row)?,
        payload: payload.0,
        headers: headers.0,
    }))
}

/// How many dead events one transaction of a replay or delete changes. A large selection is changed
/// in several short transactions, each complete on its own (its keys' later events released, the
/// relays woken), so an interruption between two loses nothing and running the same command again
/// continues where it stopped.
pub const DEAD_CHANGE_BATCH: usize = 1_000;

/// Makes the selected dead events pending again with a fresh attempt budget (attempts 0, due now,
/// no last error), releases the later events of their keys that wait behind them, and wakes the
/// relays, in transactions of [`DEAD_CHANGE_BATCH`] events.
pub async fn replay_dead(
    pool: &PgPool,
    schema: &Schema,
    selection: &DeadSelection,
) -> Result<DeadChange, AdminError> {
    replay_dead_with_progress(pool, schema, selection, |_| ControlFlow::Continue(())).await
}

/// [`replay_dead`], calling `progress` with the running total after each transaction but the
/// last; `ControlFlow::Break` stops there (the result says `interrupted`).
pub async fn replay_dead_with_progress(
    pool: &PgPool,
    schema: &Schema,
    selection: &DeadSelection,
    progress: impl FnMut(&DeadChange) -> ControlFlow<()>,
) -> Result<DeadChange, AdminError> {
    let t = schema.qualify("outbox_event");
    let batch = batch_of_selection(&t);
    let change = format!(
        "UPDATE {t} SET status = 'pending', attempts = 0, available_at = now(), last_error = NULL
         WHERE seq IN ({batch}) RETURNING seq, id, aggregate_type, aggregate_id"
    );
    change_dead(pool, schema, selection, &change, progress).await
}

/// Deletes the selected dead events for good, releases the later events of their keys that wait
/// behind them, and wakes the relays, in transactions of [`DEAD_CHANGE_BATCH`] events.
pub async fn delete_dead(
    pool: &PgPool,
    schema: &Schema,
    selection: &DeadSelection,
) -> Result<DeadChange, AdminError> {
    delete_dead_with_progress(pool, schema, selection, |_| ControlFlow::Continue(())).await
}

/// [`delete_dead`] with progress and interruption, as [`replay_dead_with_progress`].
pub async fn delete_dead_with_progress(
    pool: &PgPool,
    schema: &Schema,
    selection: &DeadSelection,
    progress: impl FnMut(&DeadChange) -> ControlFlow<()>,
) -> Result<DeadChange, AdminError> {
    let t = schema.qualify("outbox_event");
    let batch = batch_of_selection(&t);
    let change = format!(
        "DELETE FROM {t} WHERE seq IN ({batch}) RETURNING seq, id, aggregate_type, aggregate_id"
    );
    change_dead(pool, schema, selection, &change, progress).await
}

/// The `seq` of the next batch of the selection in `table` (`$7` = the batch size), locked for
/// the change.
fn batch_of_selection(table: &str) -> String {
    format!("SELECT seq FROM {table} WHERE {SELECTION} ORDER BY seq LIMIT $7 FOR UPDATE")
}

async fn change_dead(
    pool: &PgPool,
    schema: &Schema,
    selection: &DeadSelection,
    change: &str,
    mut progress: impl FnMut(&DeadChange) -> ControlFlow<()>,
) -> Result<DeadChange, AdminError> {
    let (ids, filter) = split(selection);
    check_filter(filter)?;
    let mut total = DeadChange::default();
    loop {
        let (changed, released) = change_dead_batch(pool, schema, ids, filter, change).await?;
        let last = changed.len() < DEAD_CHANGE_BATCH;
        total.changed.extend(changed);
        total.released += released;
        if last {
            break;
        }
        if progress(&total).is_break() {
            total.interrupted = true;
            break;
        }
    }
    if !total.interrupted {
        total.not_found = missing(ids, &total.changed);
    }
    Ok(total)
}

/// One transaction of a change: up to [`DEAD_CHANGE_BATCH`] dead events changed (in `seq` order),
/// and how many later events of their keys were released.
async fn change_dead_batch(
    pool: &PgPool,
    schema: &Schema,
    ids: Option<&[Uuid]>,
    filter: &DeadFilter,
    change: &str,
) -> Result<(Vec<Uuid>, u64), AdminError> {
    let t = schema.qualify("outbox_event");
    let mut tx = pool.begin().await?;
    let rows = bind_selection(sqlx::query(change), ids, filter)
        .bind(DEAD_CHANGE_BATCH as i64)
        .fetch_all(&mut *tx)
        .await?;
    let mut touched = rows
        .iter()
        .map(|r| {
            Ok((
                r.try_get::<i64, _>("seq")?,
                r.try_get::<Uuid, _>("id")?,
                r.try_get::<String, _>("aggregate_type")?,
                r.try_get::<String, _>("aggregate_id")?,
            ))
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    // RETURNING has no order; report in the order the events were written.
    touched.sort_by_key(|(seq, ..)| *seq);
    let changed: Vec<Uuid> = touched.iter().map(|(_, id, ..)| *id).collect();
    let (key_types, key_ids): (Vec<String>, Vec<String>) =
        touched.into_iter().map(|(_, _, ty, id)| (ty, id)).unzip();
    let mut released = 0;
    if !changed.is_empty() {
        // After the dead rows changed, in the same transaction: the later events of those keys
        // that the relay parked behind them (`available_at = 'infinity'`) may flow again. The
        // claim still orders them behind any earlier undelivered event of their key.
        released = sqlx::query(&format!(
            "UPDATE {t} SET status = 'pending', available_at = now()
             WHERE status = 'parked' AND available_at = 'infinity'
               AND (aggregate_type, aggregate_id) IN (
                   SELECT * FROM unnest($1::text[], $2::text[]))"
        ))
        .bind(&key_types)
        .bind(&key_ids)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        // Delivered at commit: relays waiting for events look at once instead of at their next
        // poll.
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(schema.channel())
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok((changed, released))
}

fn split(selection: &DeadSelection) -> (Option<&[Uuid]>, &DeadFilter) {
    static ALL: DeadFilter = DeadFilter {
        event_type: None,
        aggregate_type: None,
        aggregate_id: None,
        since: None,
        error_contains: None,
    };
    match selection {
        DeadSelection::Ids(ids) => (Some(ids.as_slice()), &ALL),
        DeadSelection::Matching(filter) => (None, filter),
    }
}

/// The requested ids (in request order, once each) that are not in `found`.
fn missing(requested: Option<&[Uuid]>, found: &[Uuid]) -> Vec<Uuid> {
    let mut seen: std::collections::HashSet<Uuid> = found.iter().copied().collect();
    requested
        .unwrap_or_default()
        .iter()
        .filter(|id| seen.insert(**id))
        .copied()
        .collect()
}
