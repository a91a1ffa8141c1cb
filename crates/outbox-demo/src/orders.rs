//! The producer: an "orders" web service that was already writing to Postgres and now also tells
//! other services what happened, through the outbox.
//!
//! - `POST /orders` `{customer, total_cents}`: inserts the order and enqueues `OrderPlaced` with
//!   the Rust API ([`Outbox::enqueue`]), in one transaction.
//! - `POST /orders/{id}/pay`: updates the order and enqueues `OrderPaid` with **plain SQL** (an
//!   `INSERT INTO outbox_event`), as code in another language or a stored procedure would.
//! - `POST /orders/{id}/cancel`: updates the order and enqueues `OrderCancelled`.
//! - `POST /orders/{id}/notes` `{note}`: still writes **without** an event: gradual adoption, the
//!   outbox goes in endpoint by endpoint.
//! - `GET /orders/{id}`, `GET /healthz`.
//!
//! Every change bumps the order's `version` under the row lock the `UPDATE` takes, so events of one
//! order are enqueued (and get their `seq`) in commit order; consumers see `version` 1, 2, 3…
//!
//! Errors are JSON (`{"error": "..."}`). An order whose event could never be delivered (its payload
//! over `events.max_payload_bytes`, which the demo's configuration keeps within what its SQS queue
//! accepts) is refused with **413** and nothing is written, instead of a 201 followed by a dead
//! letter; any other event the outbox refuses, and a body that is not the expected JSON, is a 4xx
//! too (422, or axum's status for the body).

use std::future::Future;
use std::net::SocketAddr;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use outbox::{Config, NewEvent, Outbox, RelayHandle};
use serde::{Deserialize, Serialize};
use sqlx::{PgPool, Row};

/// The domain tables (the outbox table comes from `outbox migrate`).
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::Error> {
    for statement in [
        "CREATE TABLE IF NOT EXISTS orders (
            id          text        PRIMARY KEY,
            customer    text        NOT NULL,
            total_cents bigint      NOT NULL CHECK (total_cents >= 0),
            status      text        NOT NULL,
            version     integer     NOT NULL,
            created_at  timestamptz NOT NULL DEFAULT now(),
            updated_at  timestamptz NOT NULL DEFAULT now()
        )",
        "CREATE TABLE IF NOT EXISTS order_notes (
            id         bigserial   PRIMARY KEY,
            order_id   text        NOT NULL REFERENCES orders (id),
            note       text        NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now()
        )",
    ] {
        sqlx::query(statement).execute(pool).await?;
    }
    Ok(())
}

#[derive(Clone)]
struct AppState {
    pool: PgPool,
    outbox: Outbox,
    /// The qualified outbox table, for the plain-SQL producer.
    outbox_table: String,
}

/// The HTTP API on `pool`, enqueuing into the outbox of `config.schema`.
pub fn router(pool: PgPool, config: &Config) -> Router {
    let state = AppState {
        pool,
        outbox: Outbox::with_limits(config.schema.clone(), config.events),
        outbox_table: config.schema.qualify("outbox_event"),
    };
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/orders", post(place))
        .route("/orders/{id}", get(show))
        .route("/orders/{id}/pay", post(pay))
        .route("/orders/{id}/cancel", post(cancel))
        .route("/orders/{id}/notes", post(add_note))
        .with_state(state)
}

#[derive(Debug, Deserialize)]
pub struct PlaceOrder {
    pub customer: String,
    pub total_cents: i64,
}

/// An order as the API returns it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OrderView {
    pub id: String,
    pub customer: String,
    pub total_cents: i64,
    pub status: String,
    pub version: i32,
}

/// An API error: a status and a message for the client.
#[derive(Debug)]
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({"error": self.1}))).into_response()
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        tracing::error!(error = %e, "database error");
        ApiError(StatusCode::INTERNAL_SERVER_ERROR, "database error".into())
    }
}

impl From<outbox::EnqueueError> for ApiError {
    fn from(e: outbox::EnqueueError) -> Self {
        use outbox::{EnqueueError, EventError};
        match e {
            // The request is fine as HTTP but its event could never be delivered: refuse the
            // whole order (the transaction rolls back) rather than accept it and dead-letter the
            // event. The limit is the one the destination imposes (see the demo's outbox.toml).
            EnqueueError::Invalid(EventError::PayloadTooLarge { len, limit }) => ApiError(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "order refused: its event would be {len} bytes, over the {limit} bytes the \
                     orders queue accepts (events.max_payload_bytes); shorten the customer name"
                ),
            ),
            EnqueueError::Invalid(invalid) => ApiError(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("order refused: {invalid}"),
            ),
            EnqueueError::Database(_) => {
                tracing::error!(error = %e, "enqueue failed");
                ApiError(StatusCode::INTERNAL_SERVER_ERROR, "database error".into())
            }
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        // axum's own status (400, 413, 415, 422) with its reason, as JSON like every other error.
        ApiError(rejection.status(), rejection.body_text())
    }
}

impl From<outbox::EventError> for ApiError {
    fn from(e: outbox::EventError) -> Self {
        ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    }
}

fn view(row: &sqlx::postgres::PgRow) -> Result<OrderView, sqlx::Error> {
    Ok(OrderView {
        id: row.try_get("id")?,
        customer: row.try_get("customer")?,
        total_cents: row.try_get("total_cents")?,
        status: row.try_get("status")?,
        version: row.try_get("version")?,
    })
}

async fn place(
    State(app): State<AppState>,
    input: Result<Json<PlaceOrder>, JsonRejection>,
) -> Result<(StatusCode, Json<OrderView>), ApiError> {
    let Json(input) = input?;
    if input.customer.trim().is_empty() || input.total_cents < 0 {
        return Err(ApiError(
            StatusCode::UNPROCESSABLE_ENTITY,
            "give a customer and a total_cents >= 0".into(),
        ));
    }
    if input.customer.contains('\0') {
        // PostgreSQL text cannot hold NUL: say so instead of failing the INSERT with a 500.
        return Err(ApiError(
            StatusCode::UNPROCESSABLE_ENTITY,
            "customer contains a NUL character (\\u0000): remove it".into(),
        ));
    }
    let id = format!("ord-{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let mut tx = app.pool.begin().await?;
    let row = sqlx::query(
        "INSERT INTO orders (id, customer, total_cents, status, version) VALUES ($1, $2, $3, 'placed', 1) \
         RETURNING id, customer, total_cents, status, version",
    )
    .bind(&id)
    .bind(&input.customer)
    .bind(input.total_cents)
    .fetch_one(&mut *tx)
    .await?;
    let order = view(&row)?;
    let event = NewEvent::new("order", &order.id, "OrderPlaced").payload(&serde_json::json!({
        "order_id": order.id,
        "customer": order.customer,
        "total_cents": order.total_cents,
        "version": order.version,
    }))?;
    app.outbox.enqueue(&mut tx, event).await?;
    tx.commit().await?; // the event exists if and only if the order does
    Ok((StatusCode::CREATED, Json(order)))
}

async fn show(
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<OrderView>, ApiError> {
    let row =
        sqlx::query("SELECT id, customer, total_cents, status, version FROM orders WHERE id = $1")
            .bind(&id)
            .fetch_optional(&app.pool)
            .await?;
    match row {
        Some(row) => Ok(Json(view(&row)?)),
        None => Err(not_found(&id)),
    }
}

fn not_found(id: &str) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, format!("no order {id}"))
}

/// Moves an order from one of `from` to `to` under its row lock; `None` when it is not in `from`.
async fn transition(
    tx: &mut sqlx::PgConnection,
    id: &str,
    from: &[&str],
    to: &str,
) -> Result<OrderView, ApiError> {
    let row = sqlx::query(
        "UPDATE orders SET status = $2, version = version + 1, updated_at = now() \
         WHERE id = $1 AND status = ANY($3) RETURNING id, customer, total_cents, status, version",
    )
    .bind(id)
    .bind(to)
    .bind(from)
    .fetch_optional(&mut *tx)
    .await?;
    match row {
        Some(row) => Ok(view(&row)?),
        None => {
            let exists: Option<String> =
                sqlx::query_scalar("SELECT status FROM orders WHERE id = $1")
                    .bind(id)
                    .fetch_optional(&mut *tx)
                    .await?;
            Err(match exists {
                None => not_found(id),
                Some(status) => ApiError(
                    StatusCode::CONFLICT,
                    format!("order {id} is {status}: cannot become {to}"),
                ),
            })
        }
    }
}

async fn pay(
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<OrderView>, ApiError> {
    let mut tx = app.pool.begin().await?;
    let order = transition(&mut tx, &id, &["placed"], "paid").await?;
    // The plain-SQL producer: what a trigger, a stored procedure or another language would write.
    // id, seq, headers, status and timestamps come from the table's defaults.
    sqlx::query(&format!(
        "INSERT INTO {} (aggregate_type, aggregate_id, event_type, payload) \
         VALUES ('order', $1, 'OrderPaid', jsonb_build_object('order_id', $1::text, 'total_cents', $2::bigint, 'version', $3::int))",
        app.outbox_table
    ))
    .bind(&order.id)
    .bind(order.total_cents)
    .bind(order.version)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Json(order))
}

async fn cancel(
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<OrderView>, ApiError> {
    let mut tx = app.pool.begin().await?;
    let order = transition(&mut tx, &id, &["placed", "paid"], "cancelled").await?;
    let event =
        NewEvent::new("order", &order.id, "OrderCancelled").payload(&serde_json::json!({
            "order_id": order.id,
            "version": order.version,
        }))?;
    app.outbox.enqueue(&mut tx, event).await?;
    tx.commit().await?;
    Ok(Json(order))
}

#[derive(Debug, Deserialize)]
pub struct AddNote {
    pub note: String,
}

/// Not yet on the outbox: writes the note and nothing else (no event, nobody else learns of it).
async fn add_note(
    State(app): State<AppState>,
    Path(id): Path<String>,
    input: Result<Json<AddNote>, JsonRejection>,
) -> Result<StatusCode, ApiError> {
    let Json(input) = input?;
    if input.note.contains('\0') {
        return Err(ApiError(
            StatusCode::UNPROCESSABLE_ENTITY,
            "note contains a NUL character (\\u0000): remove it".into(),
        ));
    }
    let inserted = sqlx::query(
        "INSERT INTO order_notes (order_id, note) SELECT id, $2 FROM orders WHERE id = $1",
    )
    .bind(&id)
    .bind(&input.note)
    .execute(&app.pool)
    .await?
    .rows_affected();
    if inserted == 0 {
        return Err(not_found(&id));
    }
    Ok(StatusCode::CREATED)
}

/// The running orders service: its address, and the embedded relay when it has one.
pub struct Service {
    pub addr: SocketAddr,
    relay: Option<RelayHandle>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl Service {
    /// Connects, creates the domain tables, starts the embedded relay (unless
    /// `relay.enabled = false`, for when `outbox relay` runs as its own service) and serves the
    /// API on `listen` (use 127.0.0.1:0 for any free port).
    pub async fn start(config: &Config, listen: SocketAddr) -> anyhow::Result<Self> {
        let pool = outbox::connect_from_config(config, "orders-service").await?;
        migrate(&pool).await?;
        let relay = if config.relay.enabled {
            let publisher = build_publisher(config).await?;
            // Fails at start-up, not silently in the background, when a destination is missing.
            let relay = outbox::start_relay_from_config(config, pool.clone(), publisher)
                .await
                .map_err(|e| anyhow::anyhow!("the embedded relay cannot start: {e}"))?;
            tracing::info!(publisher = %config.publisher, "embedded relay started");
            relay
        } else {
            tracing::info!("relay.enabled = false: events wait for a standalone `outbox relay`");
            None
        };
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let app = router(pool, config);
        let server = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.wait_for(|s| *s).await;
                })
                .await
        });
        Ok(Self {
            addr,
            relay,
            server,
            stop,
        })
    }

    /// The embedded relay's counters (`None` when it is disabled).
    pub fn relay_stats(&self) -> Option<outbox::RelaySnapshot> {
        self.relay.as_ref().map(RelayHandle::stats)
    }

    /// Whether the embedded relay stopped on its own (e.g. its start-up check failed).
    pub fn relay_failed(&self) -> bool {
        self.relay.as_ref().is_some_and(RelayHandle::is_finished)
    }

    /// Stops serving (in-flight requests finish), then stops the relay after its in-flight batch.
    pub async fn stop(self) -> anyhow::Result<Option<outbox::RelaySnapshot>> {
        let _ = self.stop.send(true);
        self.server.await??;
        match self.relay {
            Some(relay) => Ok(Some(relay.stop().await?)),
            None => Ok(None),
        }
    }

    /// Runs until `shutdown` completes, then stops.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()>,
    ) -> anyhow::Result<Option<outbox::RelaySnapshot>> {
        shutdown.await;
        self.stop().await
    }
}

/// The publisher kinds the demo links: the built-in ones, AWS, Kafka, NATS and RabbitMQ.
pub fn registry() -> outbox::Registry {
    outbox::Registry::new()
        .with(outbox_aws::Aws)
        .with(outbox_kafka::Kafka)
        .with(outbox_nats::Nats)
        .with(outbox_amqp::RabbitMq)
}

/// The configured publisher, built with [`registry`].
pub async fn build_publisher(config: &Config) -> anyhow::Result<Box<dyn outbox::Publisher>> {
    Ok(registry().build(config).await?)
}
