//! Setting the outbox up from a [`Config`]: the calls an application makes at start-up, each
//! applying the whole configuration (the producer's limits, the migration's switches, the relay's
//! options), so that no setting is dropped on the way.
//!
//! This is the top layer of the crate: it reads the configuration and builds the lower layers
//! (`postgres`, `relay`), which know nothing of it.

use sqlx::{PgConnection, PgPool};

use crate::config::{Config, ConfigError};
use crate::postgres::{
    check_relay_privileges, check_schema, connect, migrate, settings_drift, ConnectError,
    MigrateError, MigrateOptions, MigrateReport, Outbox, PgStore, SetupError,
};
use crate::{ConfigOrConnectError, Publisher, Relay, RelayHandle};

impl Outbox {
    /// The producer side as the configuration describes it: `schema` and the `[events]` limits
    /// (the same limit `outbox migrate` gives the table for SQL producers).
    pub fn from_config(config: &Config) -> Self {
        Self::with_limits(config.schema.clone(), config.events)
    }
}

impl From<&Config> for MigrateOptions {
    fn from(config: &Config) -> Self {
        Self {
            strict_key_order: config.strict_key_order,
            max_payload_bytes: config.events.max_payload_bytes,
        }
    }
}

/// [`migrate`] with the schema and the settings of the configuration: the call an application
/// makes at start-up, so that it applies the same `strict_key_order` and payload limit as
/// `outbox migrate` with the same configuration.
pub fn migrate_from_config<'a>(
    conn: &'a mut PgConnection,
    config: &'a Config,
) -> futures_util::future::BoxFuture<'a, Result<MigrateReport, MigrateError>> {
    migrate(conn, &config.schema, MigrateOptions::from(config))
}

/// Why [`start_relay_from_config`] could not start the relay.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Setup(#[from] SetupError),
    /// A destination is missing or unreachable: found before anything is claimed.
    #[error(transparent)]
    Publisher(#[from] crate::relay::RelayError),
}

/// The embedded relay as the configuration says: `None` when `relay.enabled = false` (the
/// application leaves publishing to a standalone `outbox relay`); otherwise the relay is set up
/// ([`relay_from_config`]), its publisher is checked — so a missing destination fails here, at
/// start-up, not silently in a background task — and it is spawned. Stop it with
/// [`RelayHandle::stop`](crate::RelayHandle::stop), which finishes the batch in flight.
pub async fn start_relay_from_config<P: Publisher>(
    config: &Config,
    pool: PgPool,
    publisher: P,
) -> Result<Option<RelayHandle>, StartError> {
    if !config.relay.enabled {
        tracing::info!("relay.enabled = false: events wait for a standalone `outbox relay`");
        return Ok(None);
    }
    let relay = relay_from_config(config, pool, publisher).await?;
    relay.check().await?;
    Ok(Some(relay.spawn()))
}

/// Builds the relay from the configuration on an existing pool, after checking that the schema is
/// migrated and that the role holds the privileges the relay needs: the one call an embedding
/// application needs (then [`Relay::spawn`](crate::Relay::spawn)). Settings of the database that
/// differ from the configuration (`strict_key_order`, the payload limit) are logged as warnings.
pub async fn relay_from_config<P: Publisher>(
    config: &Config,
    pool: PgPool,
    publisher: P,
) -> Result<Relay<PgStore, P>, SetupError> {
    check_schema(&pool, &config.schema).await?;
    check_relay_privileges(&pool, &config.schema, config.relay.notify).await?;
    match settings_drift(&pool, &config.schema, &MigrateOptions::from(config)).await {
        Ok(drift) => {
            for problem in drift {
                tracing::warn!(schema = %config.schema, "{problem}");
            }
        }
        // Only a diagnostic: the relay works either way.
        Err(e) => {
            tracing::warn!(error = %e, "could not compare the database's outbox settings with the configuration")
        }
    }
    let store = PgStore::new(pool, config.store_options()).await?;
    crate::metrics::relay_info(config.profile.as_str(), config.schema.as_str());
    Ok(Relay::new(store, publisher, config.relay_options()))
}

/// Opens the pool described by `config.database`. A connection string that does not parse is a
/// configuration error (`database.url`), as at load.
pub async fn connect_from_config(
    config: &Config,
    application_name: &str,
) -> Result<PgPool, ConfigOrConnectError> {
    let url = config.require_database_url()?;
    match connect(
        url,
        config.database.max_connections,
        config.database.connect_timeout,
        application_name,
    )
    .await
    {
        Ok(pool) => Ok(pool),
        Err(ConnectError::BadUrl { reason, .. }) => {
            Err(ConfigError::database_url(url, reason).into())
        }
        Err(e) => Err(e.into()),
    }
}
