//! The producer's API: write events in the caller's own transaction.

use sqlx::PgConnection;
use uuid::Uuid;

use super::schema::Schema;
use crate::event::{EventError, EventLimits, NewEvent};

/// Why an enqueue failed. Nothing was written; the caller's transaction decides what happens next.
#[derive(Debug, thiserror::Error)]
pub enum EnqueueError {
    #[error("invalid event: {0}")]
    Invalid(#[from] EventError),
    #[error("could not insert into the outbox: {0}; is the schema migrated (`outbox migrate`)?")]
    Database(#[from] sqlx::Error),
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
}

impl Outbox {
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
        Self {
            schema,
            limits,
            insert_one,
            insert_many,
        }
    }

    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    /// Writes one event in the caller's transaction and returns its id. Pass `&mut tx` (or any
    /// `&mut PgConnection`); the event becomes visible to the relay when the caller commits.
    pub async fn enqueue(
        &self,
        conn: &mut PgConnection,
        event: NewEvent,
    ) -> Result<Uuid, EnqueueError> {
        event.validate(&self.limits)?;
        sqlx::query(&self.insert_one)
            .bind(event.id)
            .bind(&event.aggregate_type)
            .bind(&event.aggregate_id)
            .bind(&event.event_type)
            .bind(event.payload.get())
            .bind(headers_json(&event))
            .bind(&event.destination)
            .execute(conn)
            .await?;
        Ok(event.id)
    }

    /// Writes several events in one statement, in the order given (their `seq` follows it).
    pub async fn enqueue_all(
        &self,
        conn: &mut PgConnection,
        events: impl IntoIterator<Item = NewEvent>,
    ) -> Result<Vec<Uuid>, EnqueueError> {
        let events: Vec<NewEvent> = events.into_iter().collect();
        for event in &events {
            event.validate(&self.limits)?;
        }
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<Uuid> = events.iter().map(|e| e.id).collect();
        let column = |f: fn(&NewEvent) -> String| events.iter().map(f).collect::<Vec<_>>();
        sqlx::query(&self.insert_many)
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
            )
            .execute(conn)
            .await?;
        Ok(ids)
    }
}

fn headers_json(event: &NewEvent) -> String {
    serde_json::to_string(&event.headers).expect("a string map always serializes")
}
