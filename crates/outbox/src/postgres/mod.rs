//! Everything PostgreSQL: the schema name, migrations, the producer API ([`Outbox`]), the relay's
//! store ([`PgStore`]) and operator queries.

mod admin;
mod adopt;
mod enqueue;
mod migrate;
mod schema;
mod store;
mod url;

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};

pub use admin::{
    backlog, dead_event, dead_events, delete_dead, delete_dead_with_progress, replay_dead,
    replay_dead_with_progress, select_dead, status, AdminError, DeadChange, DeadEvent,
    DeadEventDetail, DeadFilter, DeadSelection, Status, BLOCKED_KEYS_SHOWN, DEAD_CHANGE_BATCH,
    MAX_DEAD_LIST_LIMIT,
};
pub use adopt::{
    adopt, adoption_sql, unadopt, AdoptError, AdoptMapping, AdoptReport, ADOPT_TRIGGER,
};
pub use enqueue::{EnqueueError, Outbox, PAYLOAD_SIZE_CONSTRAINT};
pub use migrate::{
    check_schema, latest_version, migrate, migration_sql, settings_drift, MigrateError,
    MigrateOptions, MigrateReport, Migration, SchemaCheckError, MIGRATIONS,
};
pub use schema::{InvalidSchema, Schema, MAX_SCHEMA_LEN};
pub use store::{DeadLetterPolicy, PgClaim, PgStore, PgStoreOptions, Waker};
pub use url::{keyword_values, redact_url, DatabaseUrl};

use url::{ConnectionParameter, CONNECTION_PARAMETERS};

/// Why the database could not be reached; the message says where and what to check. The URL is
/// always shown redacted, and a driver's error text is redacted too.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("database.url {url} is not a valid PostgreSQL connection string: {reason}; use postgres://user:password@host:port/database (or libpq key/value form: host=... port=... user=... password=... dbname=...)")]
    BadUrl { url: String, reason: String },
    #[error("cannot connect to PostgreSQL at {url}: {reason}; check that the server is running and reachable, and that database.url / DATABASE_URL (host, port, user, password, sslmode) is right")]
    Unreachable { url: String, reason: String },
}

/// Parses a connection string: a `postgres://` / `postgresql://` URL or a libpq key/value string.
/// Errors name the problem and never contain the password.
pub fn connect_options(url: &DatabaseUrl) -> Result<PgConnectOptions, ConnectError> {
    let text = url.expose().trim();
    let bad = |reason: String| ConnectError::BadUrl {
        url: url.redacted(),
        reason,
    };
    let as_url = match text.split_once("://") {
        Some((scheme, rest)) => {
            if !(scheme.eq_ignore_ascii_case("postgres")
                || scheme.eq_ignore_ascii_case("postgresql"))
            {
                return Err(bad(format!(
                    "the scheme `{scheme}` is not PostgreSQL (the outbox needs PostgreSQL)"
                )));
            }
            if let Some((_, query)) = rest.split_once('?') {
                for pair in query.split('&').filter(|p| !p.is_empty()) {
                    // Not echoed: a parameter without `=` may be a stray secret.
                    let Some((key, _)) = pair.split_once('=') else {
                        return Err(bad("a URL parameter has no `=` and value".to_owned()));
                    };
                    let known = CONNECTION_PARAMETERS.iter().any(|p| p.name == key)
                        || (key.starts_with("options[") && key.ends_with(']'));
                    if !known {
                        return Err(bad(format!(
                            "unknown parameter `{key}` (known: {})",
                            names(|_| true)
                        )));
                    }
                }
            }
            text.to_owned()
        }
        None if text.contains('=') => {
            // The key/value form becomes URL parameters, so both forms take the same path through
            // sqlx (environment defaults, ~/.pgpass).
            let pairs = keyword_values(text).map_err(bad)?;
            let mut query = Vec::new();
            for (key, value) in pairs {
                if !CONNECTION_PARAMETERS
                    .iter()
                    .any(|p| p.keyword && p.name == key)
                {
                    return Err(bad(format!(
                        "unsupported keyword `{key}` (supported: {})",
                        names(|p| p.keyword)
                    )));
                }
                query.push(format!("{key}={}", percent_encode(&value)));
            }
            format!("postgres://?{}", query.join("&"))
        }
        None => return Err(bad("it is neither a URL nor key/value pairs".to_owned())),
    };
    as_url
        .parse::<PgConnectOptions>()
        .map_err(|e| bad(redact_error(&e, url)))
}

/// The names of the connection parameters that `filter` keeps, for messages.
fn names(filter: impl Fn(&ConnectionParameter) -> bool) -> String {
    CONNECTION_PARAMETERS
        .iter()
        .filter(|p| filter(p))
        .map(|p| p.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Percent-encodes everything but unreserved URL characters.
fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Opens a pool to `url` (TLS per its `sslmode`, `sslrootcert`, ... parameters) and checks that
/// the server answers within `connect_timeout`.
pub async fn connect(
    url: &DatabaseUrl,
    max_connections: u32,
    connect_timeout: Duration,
    application_name: &str,
) -> Result<PgPool, ConnectError> {
    let options = connect_options(url)?.application_name(application_name);
    let unreachable = |reason: String| ConnectError::Unreachable {
        url: url.redacted(),
        reason,
    };
    // The first connection is made directly: a pool reports every failure as "timed out", a
    // direct connection says what happened (refused, authentication, TLS, unknown database).
    match tokio::time::timeout(connect_timeout, options.connect()).await {
        Err(_) => {
            return Err(unreachable(format!(
                "no answer within {connect_timeout:?} (database.connect_timeout)"
            )))
        }
        Ok(Err(e)) => return Err(unreachable(redact_error(&e, url))),
        Ok(Ok(conn)) => {
            let _ = conn.close().await;
        }
    }
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(connect_timeout)
        .connect_with(options)
        .await
        .map_err(|e| unreachable(redact_error(&e, url)))?;
    Ok(pool)
}

/// An error's text with the connection string's password removed, in case a driver echoes it.
fn redact_error(e: &sqlx::Error, url: &DatabaseUrl) -> String {
    let text = e.to_string();
    if url.expose().is_empty() {
        return text;
    }
    let mut text = text.replace(url.expose(), &url.redacted());
    // Shorter passwords would mangle the message more than they could reveal.
    if let Some(password) = url.password().filter(|p| p.len() >= 4) {
        text = text.replace(&password, "***");
    }
    text
}

/// Why a relay could not be set up on PostgreSQL. The causes are part of the messages (and not
/// also `source`s), so a report that prints the chain shows each once.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Schema(#[from] SchemaCheckError),
    #[error("the database role `{role}` lacks {}, which the relay needs: run {} (the relay's grants are in docs/SECURITY.md)", .missing.join(", "), .grants.join(" "))]
    Privileges {
        role: String,
        /// e.g. `DELETE on "public".outbox_event`
        missing: Vec<String>,
        /// The statements that grant them.
        grants: Vec<String>,
    },
    #[error("could not check the relay's privileges: {0}")]
    Database(sqlx::Error),
    #[error("could not start the relay's store: {0}")]
    Store(crate::store::StoreError),
}

impl From<crate::store::StoreError> for SetupError {
    fn from(e: crate::store::StoreError) -> Self {
        Self::Store(e)
    }
}

/// Checks that the connected role holds the privileges the relay uses, so that a missing grant
/// stops the start with the statement to run instead of failing every claim.
pub async fn check_relay_privileges(
    pool: &PgPool,
    schema: &Schema,
    notify: bool,
) -> Result<(), SetupError> {
    let mut needed = vec![
        (schema.qualify("outbox_event"), "SELECT"),
        (schema.qualify("outbox_event"), "UPDATE"),
        (schema.qualify("outbox_event"), "DELETE"),
    ];
    if notify {
        // The relay's request for notifications (a sequence: see migration 2).
        for privilege in ["SELECT", "UPDATE"] {
            needed.push((schema.qualify("outbox_wakeup_wanted_ms"), privilege));
        }
    }
    let tables: Vec<String> = needed.iter().map(|(t, _)| t.clone()).collect();
    let privileges: Vec<&str> = needed.iter().map(|(_, p)| *p).collect();
    let (role, held): (String, Vec<bool>) = sqlx::query_as(
        "SELECT current_user::text,
                ARRAY(SELECT has_table_privilege(t, p)
                      FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS n(t, p, i) ORDER BY i)",
    )
    .bind(&tables)
    .bind(&privileges)
    .fetch_one(pool)
    .await
    .map_err(SetupError::Database)?;
    let lacking: Vec<&(String, &str)> = needed
        .iter()
        .zip(&held)
        .filter(|(_, held)| !**held)
        .map(|(n, _)| n)
        .collect();
    if lacking.is_empty() {
        return Ok(());
    }
    let quoted_role = format!("\"{}\"", role.replace('"', "\"\""));
    Err(SetupError::Privileges {
        missing: lacking.iter().map(|(t, p)| format!("{p} on {t}")).collect(),
        grants: lacking
            .iter()
            .map(|(t, p)| format!("GRANT {p} ON {t} TO {quoted_role};"))
            .collect(),
        role,
    })
}
