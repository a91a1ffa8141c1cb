//! Versioned, idempotent schema migrations for the outbox tables, and the settings of the
//! configuration that the schema carries (`strict_key_order`, `events.max_payload_bytes`).
//!
//! Each migration is SQL with `{schema}`, `{channel}` and `{max_payload_bytes}` placeholders,
//! applied once in order inside one transaction under an advisory lock, so concurrent `migrate`
//! calls (several replicas starting at once) are safe. Applied versions are recorded in
//! `outbox_schema_version`. After the migrations, the settings are brought in line with the
//! configuration; a setting that already matches is not touched, because changing a trigger takes
//! a lock on the table that waits for every producer and relay transaction.
//!
//! Applications with their own migration tool take the script from [`migration_sql`] (or
//! `outbox migrate --print [--from N]`): the same statements, in the same order, as [`migrate`]
//! runs, with the version bookkeeping; only the settings are written unconditionally.

use sqlx::{Executor, PgConnection};

use super::schema::Schema;
use crate::event::{EventLimits, DEFAULT_MAX_PAYLOAD_BYTES};

/// A schema change, in order of `version`.
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    template: &'static str,
}

/// Every migration, oldest first. Never edit a released one: add a new version.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "outbox_event table, indexes, id function, wake-up trigger",
        template: include_str!("migrations/0001_outbox_event.sql"),
    },
    Migration {
        version: 2,
        name: "parked events, destination holds, snapshot-proof wake-up",
        template: include_str!("migrations/0002_claim_parking.sql"),
    },
    Migration {
        version: 3,
        name: "payload size limit for SQL producers (events.max_payload_bytes)",
        template: include_str!("migrations/0003_payload_size.sql"),
    },
    Migration {
        version: 4,
        name: "lean insert: headers rule without a function call, wake-up queued only when wanted",
        template: include_str!("migrations/0004_lean_insert.sql"),
    },
    Migration {
        version: 5,
        name: "delayed events: available_at set by producers, holds_key, scheduled status",
        template: include_str!("migrations/0005_delayed_events.sql"),
    },
];

/// The newest schema version this library knows.
pub fn latest_version() -> i32 {
    MIGRATIONS.iter().map(|m| m.version).max().unwrap_or(0)
}

/// The migrations in version order, whatever the order of their registration.
fn in_order() -> Vec<&'static Migration> {
    let mut all: Vec<&'static Migration> = MIGRATIONS.iter().collect();
    all.sort_by_key(|m| m.version);
    all
}

/// Arbitrary constant that namespaces the outbox's advisory locks.
pub(crate) const LOCK_CLASS: i32 = 0x6f75_7462; // "outb"

/// The columns of `outbox_event` as migration 1 creates them: a table of that name without them
/// is someone else's.
const EVENT_COLUMNS: &[&str] = &[
    "seq",
    "id",
    "aggregate_type",
    "aggregate_id",
    "event_type",
    "payload",
    "headers",
    "destination",
    "created_at",
    "status",
    "attempts",
    "available_at",
    "last_error",
    "published_at",
];
const VERSION_COLUMNS: &[&str] = &["version", "name"];

const STRICT_TRIGGER: &str = "outbox_event_strict_key_order";
const SIZE_TRIGGER: &str = super::enqueue::PAYLOAD_SIZE_CONSTRAINT;

impl Migration {
    /// The migration's SQL for `schema` and the configured settings.
    pub fn render(&self, schema: &Schema, options: &MigrateOptions) -> String {
        self.template
            .replace("{schema}", &schema.quoted())
            .replace("{channel}", &schema.channel())
            .replace(
                "{max_payload_bytes}",
                &options.max_payload_bytes.to_string(),
            )
    }
}

/// What the schema should look like besides its version: switches that the configuration sets and
/// [`migrate`] applies every time. Build it from the configuration ([`MigrateOptions::from`] a
/// [`Config`](crate::Config), or [`migrate_from_config`](crate::migrate_from_config)), so that every process that migrates
/// applies the same values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigrateOptions {
    /// Install the trigger that serializes enqueues per ordering key (see `docs/ARCHITECTURE.md`).
    pub strict_key_order: bool,
    /// The payload limit the table enforces on inserts (`events.max_payload_bytes`).
    pub max_payload_bytes: usize,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        Self {
            strict_key_order: false,
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
        }
    }
}

impl MigrateOptions {
    /// The options with the payload limit of `limits`.
    pub fn with_limits(mut self, limits: &EventLimits) -> Self {
        self.max_payload_bytes = limits.max_payload_bytes;
        self
    }
}

/// What [`migrate`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrateReport {
    /// Versions applied by this call, in order.
    pub applied: Vec<i32>,
    pub current_version: i32,
    /// Settings this call changed, as sentences (e.g. "strict_key_order turned on: ...").
    pub changed: Vec<String>,
}

impl MigrateReport {
    /// Nothing was applied and no setting changed.
    pub fn is_unchanged(&self) -> bool {
        self.applied.is_empty() && self.changed.is_empty()
    }
}

/// Why [`migrate`] (or [`migration_sql`]) refused or failed. Nothing was changed when it returns.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("the outbox schema in `{schema}` is at version {found}, newer than this version of outbox knows ({known}): upgrade outbox (the CLI or the library) before migrating; nothing was changed")]
    Newer {
        schema: String,
        found: i32,
        known: i32,
    },
    #[error("{table} already exists and is not the outbox's (it has no column {}): keep the outbox in a schema of its own, e.g. `schema = \"outbox\"` in outbox.toml or OUTBOX_SCHEMA=outbox; nothing was changed", .missing.join(", "))]
    ForeignTable { table: String, missing: Vec<String> },
    #[error("no outbox migration {from}: use one of {}, or {} for the settings only", .known.iter().map(i32::to_string).collect::<Vec<_>>().join(", "), .known.last().map_or(1, |v| v + 1))]
    UnknownVersion { from: i32, known: Vec<i32> },
    #[error("outbox migration {version} ({name}) failed: {error}; nothing was changed")]
    Migration {
        version: i32,
        name: &'static str,
        error: sqlx::Error,
    },
    #[error("could not migrate the outbox schema: {0}")]
    Database(sqlx::Error),
}

impl From<sqlx::Error> for MigrateError {
    fn from(e: sqlx::Error) -> Self {
        Self::Database(e)
    }
}

/// The migration script for a schema at the version before `from` (1: an empty schema): what
/// [`migrate`] runs, with the version bookkeeping and the settings of `options`, for psql or a
/// migration tool. It refuses to run (raises an error, changing nothing) on a schema at another
/// version than the one it starts from. `from` one above the latest version gives the settings
/// only. Apply it in one transaction (`psql -v ON_ERROR_STOP=1 --single-transaction -f`).
pub fn migration_sql(
    schema: &Schema,
    options: &MigrateOptions,
    from: i32,
) -> Result<String, MigrateError> {
    let known: Vec<i32> = in_order().iter().map(|m| m.version).collect();
    let latest = latest_version();
    if !(known.contains(&from) || from == latest + 1) {
        return Err(MigrateError::UnknownVersion { from, known });
    }
    let previous = known
        .iter()
        .copied()
        .filter(|v| *v < from)
        .max()
        .unwrap_or(0);
    let mut sql = format!(
        "-- The outbox schema in {schema}: migrations {from} to {latest} (from version {previous}), then\n\
         -- the settings strict_key_order = {strict}, events.max_payload_bytes = {max}.\n\
         -- Printed by `outbox migrate --print`: the statements `outbox migrate` runs. Apply it in one\n\
         -- transaction: psql -v ON_ERROR_STOP=1 --single-transaction -f outbox.sql (migration tools\n\
         -- wrap each script in a transaction themselves).\n",
        schema = schema.quoted(),
        strict = options.strict_key_order,
        max = options.max_payload_bytes,
    );
    sql.push_str(&prologue_sql(schema));
    sql.push_str(&guard_sql(schema, previous));
    for m in in_order().into_iter().filter(|m| m.version >= from) {
        sql.push_str(&migration_step_sql(schema, m, options));
    }
    sql.push_str(
        "\n-- Settings of the configuration (`outbox migrate` skips those already in place).\n",
    );
    sql.push_str(&strict_key_order_sql(schema, options.strict_key_order));
    sql.push_str(&payload_size_sql(schema, options.max_payload_bytes));
    Ok(sql)
}

/// The lock that serializes migrations of one schema, the schema and the version table.
fn prologue_sql(schema: &Schema) -> String {
    format!(
        "SELECT pg_advisory_xact_lock({LOCK_CLASS}, hashtext('{name}'));
CREATE SCHEMA IF NOT EXISTS {s};
CREATE TABLE IF NOT EXISTS {s}.outbox_schema_version (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
",
        name = schema.as_str(),
        s = schema.quoted()
    )
}

/// Stops a printed script on a schema at another version than the one it upgrades from (which
/// [`migrate`] finds out by reading the version table).
fn guard_sql(schema: &Schema, previous: i32) -> String {
    format!(
        "DO $outbox_guard$
DECLARE found integer;
BEGIN
    SELECT coalesce(max(version), 0) INTO found FROM {versions};
    IF found <> {previous} THEN
        RAISE EXCEPTION 'the outbox schema in {name} is at version %, this script upgrades from version {previous}: print the script for it with outbox migrate --print --from %', found, found + 1;
    END IF;
END
$outbox_guard$;
",
        versions = schema.qualify("outbox_schema_version"),
        name = schema.as_str(),
    )
}

fn migration_step_sql(schema: &Schema, m: &Migration, options: &MigrateOptions) -> String {
    format!(
        "\n-- outbox migration {version}: {name}\n{body}\nINSERT INTO {versions} (version, name) VALUES ({version}, '{quoted}');\n",
        version = m.version,
        name = m.name,
        body = m.render(schema, options).trim_end(),
        versions = schema.qualify("outbox_schema_version"),
        quoted = m.name.replace('\'', "''"),
    )
}

/// Installs or removes the per-key serialization trigger (its function is in migration 1).
fn strict_key_order_sql(schema: &Schema, enabled: bool) -> String {
    let s = schema.quoted();
    if enabled {
        format!(
            "CREATE OR REPLACE TRIGGER {STRICT_TRIGGER}
    BEFORE INSERT ON {s}.outbox_event
    FOR EACH ROW EXECUTE FUNCTION {s}.outbox_event_strict_key_order();\n"
        )
    } else {
        format!("DROP TRIGGER IF EXISTS {STRICT_TRIGGER} ON {s}.outbox_event;\n")
    }
}

/// Sets the payload limit of the insert trigger of migration 3. The WHEN condition is evaluated
/// in the executor: a payload within the limit costs one expression per row, no function call.
fn payload_size_sql(schema: &Schema, max_payload_bytes: usize) -> String {
    let s = schema.quoted();
    format!(
        "CREATE OR REPLACE TRIGGER {SIZE_TRIGGER}
    BEFORE INSERT ON {s}.outbox_event
    FOR EACH ROW WHEN (octet_length(NEW.payload::text) > {max_payload_bytes})
    EXECUTE FUNCTION {s}.outbox_event_payload_too_large('{max_payload_bytes}');\n"
    )
}

/// Creates or upgrades the outbox schema and applies the settings of `options`. Safe to call on
/// every start-up and concurrently; a call that changes nothing takes no lock on the table.
///
/// The future is boxed so that it is `Send` for every lifetime: callers can spawn it (sqlx's
/// executor bounds otherwise defeat the compiler's inference of that).
pub fn migrate<'a>(
    conn: &'a mut PgConnection,
    schema: &'a Schema,
    options: MigrateOptions,
) -> futures_util::future::BoxFuture<'a, Result<MigrateReport, MigrateError>> {
    Box::pin(migrate_now(conn, schema, options))
}

async fn migrate_now(
    conn: &mut PgConnection,
    schema: &Schema,
    options: MigrateOptions,
) -> Result<MigrateReport, MigrateError> {
    conn.execute("BEGIN").await?;
    match migrate_in_transaction(conn, schema, options).await {
        Ok(report) => {
            conn.execute("COMMIT").await?;
            for change in &report.changed {
                tracing::info!(schema = %schema, "outbox migrate: {change}");
            }
            Ok(report)
        }
        Err(e) => {
            let _ = conn.execute("ROLLBACK").await;
            Err(e)
        }
    }
}

async fn migrate_in_transaction(
    conn: &mut PgConnection,
    schema: &Schema,
    options: MigrateOptions,
) -> Result<MigrateReport, MigrateError> {
    let versions = schema.qualify("outbox_schema_version");
    // Before creating anything: a version table of that name must be ours.
    check_own_table(conn, &versions, VERSION_COLUMNS).await?;
    conn.execute(prologue_sql(schema).as_str()).await?;
    let done: Vec<i32> =
        sqlx::query_scalar(&format!("SELECT version FROM {versions} ORDER BY version"))
            .fetch_all(&mut *conn)
            .await?;
    let latest = latest_version();
    if let Some(&found) = done.iter().max().filter(|v| **v > latest) {
        return Err(MigrateError::Newer {
            schema: schema.to_string(),
            found,
            known: latest,
        });
    }
    if !done.contains(&1) {
        // `CREATE TABLE IF NOT EXISTS` would keep someone else's table and fail later on a
        // missing column; say what is wrong instead.
        check_own_table(conn, &schema.qualify("outbox_event"), EVENT_COLUMNS).await?;
    }
    let mut applied = Vec::new();
    for m in in_order()
        .into_iter()
        .filter(|m| !done.contains(&m.version))
    {
        let step = migration_step_sql(schema, m, &options);
        conn.execute(step.as_str())
            .await
            .map_err(|error| MigrateError::Migration {
                version: m.version,
                name: m.name,
                error,
            })?;
        applied.push(m.version);
    }
    let state = read_settings(&mut *conn, schema).await?;
    let mut changed = Vec::new();
    if state.strict_key_order != options.strict_key_order {
        conn.execute(strict_key_order_sql(schema, options.strict_key_order).as_str())
            .await?;
        changed.push(if options.strict_key_order {
            "strict_key_order turned on: producers now serialize enqueues per key (trigger installed)".to_owned()
        } else {
            "strict_key_order turned off: the per-key serialization trigger was removed".to_owned()
        });
    }
    if state.max_payload_bytes != Some(options.max_payload_bytes) {
        conn.execute(payload_size_sql(schema, options.max_payload_bytes).as_str())
            .await?;
        changed.push(match state.max_payload_bytes {
            Some(old) => format!(
                "the table's payload limit (events.max_payload_bytes) changed from {old} to {} bytes",
                options.max_payload_bytes
            ),
            None => format!(
                "the table's payload limit (events.max_payload_bytes) set to {} bytes",
                options.max_payload_bytes
            ),
        });
    }
    Ok(MigrateReport {
        applied,
        current_version: latest,
        changed,
    })
}

/// Fails when `table` exists without all of `columns`.
async fn check_own_table(
    conn: &mut PgConnection,
    table: &str,
    columns: &[&str],
) -> Result<(), MigrateError> {
    let (exists, present): (bool, Vec<String>) = sqlx::query_as(
        "SELECT to_regclass($1) IS NOT NULL,
                ARRAY(SELECT attname::text FROM pg_attribute
                      WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped)",
    )
    .bind(table)
    .fetch_one(&mut *conn)
    .await?;
    if !exists {
        return Ok(());
    }
    let missing: Vec<String> = columns
        .iter()
        .filter(|c| !present.iter().any(|p| p == *c))
        .map(|c| (*c).to_owned())
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(MigrateError::ForeignTable {
            table: table.to_owned(),
            missing,
        })
    }
}

/// The settings the schema carries now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Settings {
    strict_key_order: bool,
    /// `None`: no size trigger (a schema before migration 3).
    max_payload_bytes: Option<usize>,
}

async fn read_settings<'c, E>(conn: E, schema: &Schema) -> Result<Settings, sqlx::Error>
where
    E: sqlx::Executor<'c, Database = sqlx::Postgres>,
{
    // The size trigger's argument is its limit; tgargs holds the arguments NUL-terminated.
    let (strict, limit): (bool, Option<String>) = sqlx::query_as(
        "SELECT
             EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = to_regclass($1) AND tgname = $2),
             (SELECT split_part(encode(tgargs, 'escape'), '\\000', 1)
              FROM pg_trigger WHERE tgrelid = to_regclass($1) AND tgname = $3)",
    )
    .bind(schema.qualify("outbox_event"))
    .bind(STRICT_TRIGGER)
    .bind(SIZE_TRIGGER)
    .fetch_one(conn)
    .await?;
    Ok(Settings {
        strict_key_order: strict,
        max_payload_bytes: limit.and_then(|l| l.parse().ok()),
    })
}

/// How the schema's settings differ from `options`, as sentences naming the fix; empty when they
/// match. The relay logs these at start, so a process configured differently from the database
/// says so instead of silently living with the other setting.
pub async fn settings_drift(
    pool: &sqlx::PgPool,
    schema: &Schema,
    options: &MigrateOptions,
) -> Result<Vec<String>, sqlx::Error> {
    let state = read_settings(pool, schema).await?;
    let mut drift = Vec::new();
    if state.strict_key_order != options.strict_key_order {
        drift.push(format!(
            "strict_key_order is {} in this configuration but {} in the database (schema `{schema}`): \
             run `outbox migrate` with the configuration every process shares, or set strict_key_order = {}",
            on_off(options.strict_key_order),
            on_off(state.strict_key_order),
            state.strict_key_order
        ));
    }
    match state.max_payload_bytes {
        Some(table) if table != options.max_payload_bytes => drift.push(format!(
            "events.max_payload_bytes is {} in this configuration but the table refuses payloads over {table} bytes \
             (schema `{schema}`): run `outbox migrate` with the configuration every process shares",
            options.max_payload_bytes
        )),
        _ => {}
    }
    Ok(drift)
}

fn on_off(on: bool) -> &'static str {
    if on {
        "on"
    } else {
        "off"
    }
}

/// Why the outbox schema is not usable by this version of the library.
///
/// The database error is part of the message (and not also a `source`), so a report that prints
/// the chain shows it once.
#[derive(Debug, thiserror::Error)]
pub enum SchemaCheckError {
    #[error("the outbox schema is not installed in schema `{0}`: run `outbox migrate` (or `outbox::migrate_from_config` from your application) first")]
    Missing(String),
    #[error("the outbox schema in `{schema}` is at version {found}, this relay needs {needed}: run `outbox migrate`")]
    Outdated {
        schema: String,
        found: i32,
        needed: i32,
    },
    #[error("the outbox schema in `{schema}` is at version {found}, newer than this relay knows ({known}): upgrade the relay")]
    Newer {
        schema: String,
        found: i32,
        known: i32,
    },
    #[error("could not read the outbox schema version: {0}")]
    Database(sqlx::Error),
}

impl From<sqlx::Error> for SchemaCheckError {
    fn from(e: sqlx::Error) -> Self {
        Self::Database(e)
    }
}

/// Checks that every migration this library knows is applied and none it does not know, so a
/// relay never runs its statements against a missing or different table. Returns the version.
pub async fn check_schema(pool: &sqlx::PgPool, schema: &Schema) -> Result<i32, SchemaCheckError> {
    let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(schema.qualify("outbox_schema_version"))
        .fetch_one(pool)
        .await?;
    if !exists {
        return Err(SchemaCheckError::Missing(schema.to_string()));
    }
    let done: Vec<i32> = sqlx::query_scalar(&format!(
        "SELECT version FROM {} ORDER BY version",
        schema.qualify("outbox_schema_version")
    ))
    .fetch_all(pool)
    .await?;
    let Some(&found) = done.last() else {
        return Err(SchemaCheckError::Missing(schema.to_string()));
    };
    let known = latest_version();
    if found > known {
        return Err(SchemaCheckError::Newer {
            schema: schema.to_string(),
            found,
            known,
        });
    }
    if MIGRATIONS.iter().any(|m| !done.contains(&m.version)) {
        return Err(SchemaCheckError::Outdated {
            schema: schema.to_string(),
            found,
            needed: known,
        });
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_unique_and_placeholders_all_filled() {
        let versions: Vec<i32> = in_order().iter().map(|m| m.version).collect();
        let mut unique = versions.clone();
        unique.dedup();
        assert_eq!(versions, unique, "two migrations share a version");
        let sql = migration_sql(&Schema::default(), &MigrateOptions::default(), 1).unwrap();
        for placeholder in ["{schema}", "{channel}", "{max_payload_bytes}"] {
            assert!(
                !sql.contains(placeholder),
                "{placeholder} left in the script"
            );
        }
    }
}
