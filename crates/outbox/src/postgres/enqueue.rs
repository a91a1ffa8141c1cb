//! The producer's API: write events in the caller's own transaction.

use sqlx::PgConnection;
use uuid::Uuid;

use super::schema::Schema;
use crate::event::{EventError, EventLimits, NewEvent};

/// Why an enqueue failed. Nothing was written; the caller's transaction decides what happens next.
///
/// The cause is part of the message (and not also a `source`), so that a report that prints the
/// chain (`{:#}`) shows it once.
#[derive(Debug, thiserror::Error)]
pub enum EnqueueError {
    /// The event breaks the table contract or the configured limits: the producer's input is at
    /// fault (an HTTP service answers 4xx; [`EnqueueError::is_too_large`] tells 413 apart).
    #[error("invalid event: {0}")]
    Invalid(EventError),
    #[error("could not insert into the outbox: {0}; is the schema migrated (`outbox migrate`)?")]
    Database(sqlx::Error),
}

impl From<EventError> for EnqueueError {
    fn from(e: EventError) -> Self {
        Self::Invalid(e)
    }
}

impl From<sqlx::Error> for EnqueueError {
    fn from(e: sqlx::Error) -> Self {
        Self::Database(e)
    }
}

/// The name under which the table refuses a payload over its size limit (the error's constraint
/// name, as for a CHECK), see migration 0003.
pub const PAYLOAD_SIZE_CONSTRAINT: &str = "outbox_event_payload_size";

impl EnqueueError {
    /// The payload is over the size limit: refused by the Rust check, or by the table's limit
    /// (`outbox_event_payload_size`) when the table was migrated with a lower
    /// `events.max_payload_bytes` than this producer's.
    pub fn is_too_large(&self) -> bool {
        match self {
            Self::Invalid(e) => matches!(e, EventError::PayloadTooLarge { .. }),
            Self::Database(e) => {
                e.as_database_error().and_then(|d| d.constraint()) == Some(PAYLOAD_SIZE_CONSTRAINT)
            }
        }
    }

    /// The event itself was refused (by the Rust checks or a table constraint), as opposed to the
    /// database failing: the producer's input is at fault and retrying it cannot help.
    pub fn is_invalid(&self) -> bool {
        match self {
            Self::Invalid(_) => true,
            Self::Database(e) => e.as_database_error().is_some_and(|d| {
                matches!(
                    d.kind(),
                    sqlx::error::ErrorKind::CheckViolation
                        | sqlx::error::ErrorKind::UniqueViolation
                        | sqlx::error::ErrorKind::NotNullViolation
                ) || d.constraint() == Some(PAYLOAD_SIZE_CONSTRAINT)
            }),
        }
    }
}

/// The producer side of the outbox: cheap to clone, holds no connection.
///
/// ```no_run
/// # async fn place_order(pool: sqlx::PgPool) -> anyhow::Result<()> {
/// use outbox::{NewEvent, Outbox};
/// let outbox = Outbox::new(Default::default());
/// let mut tx = pool.begin().await?;
/// sqlx::query("INSERT INTO orders (id) VALUES ($1)").bind("o-1").execute(&mut *tx).await?;
/// outbox
///     .enqueue(&mut tx, NewEvent::new("order", "o-1", "OrderPlaced").payload(&serde_json::json!({"id": "o-1"}))?)
///     .await?;
/// tx.commit().await?; // the event exists if and only if the order does
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Outbox {
    schema: Schema,
    limits: EventLimits,
    insert_one: String,
    insert_many: String,
    /// For delayed events: the same with `available_at` and `holds_key` (a producer role needs
    /// INSERT on those columns only if it delays events).
    insert_one_delayed: String,
    insert_many_delayed: String,
}

impl Outbox {
    /// An outbox in `schema` with the default [`EventLimits`]; prefer [`Outbox::from_config`](crate::Outbox::from_config),
    /// which applies the configured `[events]` limits too.
    pub fn new(schema: Schema) -> Self {
        Self::with_limits(schema, EventLimits::default())
    }

    pub fn with_limits(schema: Schema, limits: EventLimits) -> Self {
        let table = schema.qualify("outbox_event");
        // jsonb is sent as text and cast by the server: the payload is already serialized JSON.
        let insert_one = format!(
            "INSERT INTO {table} (id, aggregate_type, aggregate_id, event_type, payload, headers, destination) \
             VALUES ($1, $2, $3, $4, $5::jsonb, $6::jsonb, $7)"
        );
        let insert_many = format!(
            "INSERT INTO {table} (id, aggregate_type, aggregate_id, event_type, payload, headers, destination) \
             SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::jsonb[], $6::jsonb[], $7::text[])"
        );
        let insert_one_delayed = format!(
            "INSERT INTO {table} (id, aggregate_type, aggregate_id, event_type, payload, headers, destination, available_at, holds_key) \
             VALUES ($1, $2, $3, $4, $5::jsonb, $6::jsonb, $7, $8, $9)"
        );
        // Events without a delay in the same batch are due now (the column's default).
        let insert_many_delayed = format!(
            "INSERT INTO {table} (id, aggregate_type, aggregate_id, event_type, payload, headers, destination, available_at, holds_key) \
             SELECT i, t, a, e, p, h, d, COALESCE(w, now()), k \
             FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::jsonb[], $6::jsonb[], $7::text[], $8::timestamptz[], $9::bool[]) \
                 AS u(i, t, a, e, p, h, d, w, k)"
        );
        Self {
            schema,
            limits,
            insert_one,
            insert_many,
            insert_one_delayed,
            insert_many_delayed,
        }
    }

    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    pub fn limits(&self) -> &EventLimits {
        &self.limits
    }

    /// Writes one event in the caller's transaction and returns its id. Pass `&mut tx` (or any
    /// `&mut PgConnection`); the event becomes visible to the relay when the caller commits.
    ///
    /// With the `otel` feature, the trace context of the span active here is stored with the
    /// event (its `traceparent` / `tracestate` headers) unless the event carries one already.
    pub async fn enqueue(
        &self,
        conn: &mut PgConnection,
        mut event: NewEvent,
    ) -> Result<Uuid, EnqueueError> {
        crate::trace::capture(&mut event.headers);
        event.validate(&self.limits)?;
        let sql = match event.deliver_after {
            Some(_) => &self.insert_one_delayed,
            None => &self.insert_one,
        };
        let query = sqlx::query(sql)
            .bind(event.id)
            .bind(&event.aggregate_type)
            .bind(&event.aggregate_id)
            .bind(&event.event_type)
            .bind(event.payload.get())
            .bind(headers_json(&event))
            .bind(&event.destination);
        let query = match event.deliver_after {
            Some(at) => query.bind(at).bind(event.holds_key),
            None => query,
        };
        query.execute(conn).await?;
        Ok(event.id)
    }

    /// Writes several events in one statement, in the order given (their `seq` follows it). The
    /// trace context is captured as by [`Outbox::enqueue`].
    pub async fn enqueue_all(
        &self,
        conn: &mut PgConnection,
        events: impl IntoIterator<Item = NewEvent>,
    ) -> Result<Vec<Uuid>, EnqueueError> {
        let mut events: Vec<NewEvent> = events.into_iter().collect();
        for event in &mut events {
            crate::trace::capture(&mut event.headers);
            event.validate(&self.limits)?;
        }
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<Uuid> = events.iter().map(|e| e.id).collect();
        let column = |f: fn(&NewEvent) -> String| events.iter().map(f).collect::<Vec<_>>();
        let delayed = events.iter().any(|e| e.deliver_after.is_some());
        let sql = if delayed {
            &self.insert_many_delayed
        } else {
            &self.insert_many
        };
        let query = sqlx::query(sql)
            .bind(&ids)
            .bind(column(|e| e.aggregate_type.clone()))
            .bind(column(|e| e.aggregate_id.clone()))
            .bind(column(|e| e.event_type.clone()))
            .bind(column(|e| e.payload.get().to_owned()))
            .bind(column(headers_json))
            .bind(
                events
                    .iter()
                    .map(|e| e.destination.clone())
                    .collect::<Vec<_>>(),
            );
        let query = if delayed {
            query
                .bind(events.iter().map(|e| e.deliver_after).collect::<Vec<_>>())
                .bind(events.iter().map(|e| e.holds_key).collect::<Vec<_>>())
        } else {
            query
        };
        query.execute(conn).await?;
        Ok(ids)
    }
}

fn headers_json(event: &NewEvent) -> String {
    serde_json::to_string(&event.headers).expect("a string map always serializes")
}
