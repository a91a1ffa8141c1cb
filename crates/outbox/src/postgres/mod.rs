//! Everything PostgreSQL: the schema name, migrations, the producer API ([`Outbox`]), the relay's
//! store ([`PgStore`]) and operator queries.

mod admin;
mod enqueue;
mod migrate;
mod schema;
mod store;

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

pub use admin::{
    dead_event, dead_events, delete_dead, replay_dead, select_dead, status, AdminError, DeadChange,
    DeadEvent, DeadEventDetail, DeadFilter, DeadSelection, Status, MAX_DEAD_LIST_LIMIT,
};
pub use enqueue::{EnqueueError, Outbox};
pub use migrate::{
    check_schema, migrate, migration_sql, MigrateOptions, MigrateReport, Migration,
    SchemaCheckError, MIGRATIONS,
};
pub use schema::{InvalidSchema, Schema, MAX_SCHEMA_LEN};
pub use store::{DeadLetterPolicy, PgClaim, PgStore, PgStoreOptions, Waker};

use crate::config::DatabaseUrl;

/// Why the database could not be reached; the message says where and what to check.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("database.url {url} is not a valid PostgreSQL URL: {reason}; use postgres://user:password@host:port/database")]
    BadUrl { url: String, reason: String },
    #[error("cannot connect to PostgreSQL at {url}: {reason}; check that the server is running and database.url / DATABASE_URL is right")]
    Unreachable { url: String, reason: String },
}

/// Opens a pool to `url` (TLS per its `sslmode`, `sslrootcert`, ... parameters) and checks that
/// the server answers within `connect_timeout`.
pub async fn connect(
    url: &DatabaseUrl,
    max_connections: u32,
    connect_timeout: Duration,
    application_name: &str,
) -> Result<PgPool, ConnectError> {
    let options: PgConnectOptions =
        url.expose()
            .parse()
            .map_err(|e: sqlx::Error| ConnectError::BadUrl {
                url: url.redacted(),
                reason: redact_error(&e, url),
            })?;
    let options = options.application_name(application_name);
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(connect_timeout)
        .connect_with(options)
        .await
        .map_err(|e| ConnectError::Unreachable {
            url: url.redacted(),
            reason: redact_error(&e, url),
        })?;
    Ok(pool)
}

/// An error's text with the URL's password removed, in case a driver echoes it.
fn redact_error(e: &sqlx::Error, url: &DatabaseUrl) -> String {
    let text = e.to_string();
    if url.expose().is_empty() {
        return text;
    }
    text.replace(url.expose(), &url.redacted())
}

/// Why a relay could not be set up on PostgreSQL.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Schema(#[from] SchemaCheckError),
    #[error("could not start the relay's store: {0}")]
    Store(#[from] crate::store::StoreError),
}

/// Builds the relay from the configuration on an existing pool, after checking that the schema is
/// migrated: the one call an embedding application needs (then [`Relay::spawn`](crate::Relay::spawn)).
pub async fn relay_from_config<P: crate::Publisher>(
    config: &crate::Config,
    pool: PgPool,
    publisher: P,
) -> Result<crate::Relay<PgStore, P>, SetupError> {
    check_schema(&pool, &config.schema).await?;
    let store = PgStore::new(pool, config.store_options()).await?;
    Ok(crate::Relay::new(store, publisher, config.relay_options()))
}

/// Opens the pool described by `config.database`.
pub async fn connect_from_config(
    config: &crate::Config,
    application_name: &str,
) -> Result<PgPool, crate::ConfigOrConnectError> {
    let url = config.require_database_url()?;
    Ok(connect(
        url,
        config.database.max_connections,
        config.database.connect_timeout,
        application_name,
    )
    .await?)
}
