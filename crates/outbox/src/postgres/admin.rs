//! Operator queries: the backlog at a glance, and replaying dead-lettered events.

use serde::Serialize;
use sqlx::{PgPool, Row};
use uuid::Uuid;

use super::schema::Schema;

/// The outbox at a glance (`outbox status --json`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Status {
    /// Events not yet published (deliverable, waiting in backoff, held or blocked: all below).
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
}

pub async fn status(pool: &PgPool, schema: &Schema) -> Result<Status, sqlx::Error> {
    let t = schema.qualify("outbox_event");
    // Separate sub-selects so each can use its partial index instead of one full scan.
    let row = sqlx::query(&format!(
        "SELECT
             (SELECT count(*) FROM {t} WHERE status IN ('pending', 'parked')),
             (SELECT count(*) FROM {t} WHERE status = 'parked' AND available_at < 'infinity'
                                         AND held_for IS NULL AND attempts > 0),
             (SELECT count(*) FROM {t} WHERE status = 'parked' AND held_for IS NOT NULL),
             (SELECT count(*) FROM {t} WHERE status = 'parked' AND available_at = 'infinity'),
             (SELECT count(*) FROM {t} WHERE status = 'dead'),
             (SELECT count(*) FROM {t} WHERE status = 'published'),
             COALESCE(EXTRACT(EPOCH FROM now() - LEAST(
                 (SELECT created_at FROM {t} WHERE status = 'pending' ORDER BY seq LIMIT 1),
                 (SELECT min(created_at) FROM {t} WHERE status = 'parked'))), 0)::float8,
             (SELECT aggregate_type || '/' || aggregate_id FROM {t}
               WHERE status = 'parked' AND available_at = 'infinity' ORDER BY available_at, seq LIMIT 1)"
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
    })
}

/// A dead-lettered event as an operator sees it.
#[derive(Debug, Clone, Serialize)]
pub struct DeadEvent {
    pub id: Uuid,
    pub seq: i64,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_type: String,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

pub async fn dead_events(
    pool: &PgPool,
    schema: &Schema,
    limit: i64,
) -> Result<Vec<DeadEvent>, sqlx::Error> {
    let t = schema.qualify("outbox_event");
    let rows = sqlx::query(&format!(
        "SELECT id, seq, aggregate_type, aggregate_id, event_type, attempts, last_error, created_at
         FROM {t} WHERE status = 'dead' ORDER BY seq LIMIT $1"
    ))
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(DeadEvent {
                id: r.try_get("id")?,
                seq: r.try_get("seq")?,
                aggregate_type: r.try_get("aggregate_type")?,
                aggregate_id: r.try_get("aggregate_id")?,
                event_type: r.try_get("event_type")?,
                attempts: r.try_get("attempts")?,
                last_error: r.try_get("last_error")?,
                created_at: r.try_get("created_at")?,
            })
        })
        .collect()
}

/// Makes dead events pending again with a fresh attempt budget: the given ids, or all when `None`.
/// Returns how many were replayed.
pub async fn replay_dead(
    pool: &PgPool,
    schema: &Schema,
    ids: Option<&[Uuid]>,
) -> Result<u64, sqlx::Error> {
    let t = schema.qualify("outbox_event");
    let done = sqlx::query(&format!(
        "UPDATE {t} SET status = 'pending', attempts = 0, available_at = now()
         WHERE status = 'dead' AND ($1::uuid[] IS NULL OR id = ANY($1))"
    ))
    .bind(ids)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}
