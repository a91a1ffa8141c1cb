//! Versioned, idempotent schema migrations for the outbox tables.
//!
//! Each migration is SQL with `{schema}` and `{channel}` placeholders, applied once in order inside
//! one transaction under an advisory lock, so concurrent `migrate` calls (several replicas
//! starting at once) are safe. Applied versions are recorded in `outbox_schema_version`.
//! Applications with their own migration tool can take the rendered SQL from [`migration_sql`]
//! (or `outbox migrate --print`) instead.

use sqlx::{Executor, PgConnection};

use super::schema::Schema;

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
];

/// Arbitrary constant that namespaces the outbox's advisory locks.
pub(crate) const LOCK_CLASS: i32 = 0x6f75_7462; // "outb"

impl Migration {
    /// The migration's SQL for `schema`.
    pub fn render(&self, schema: &Schema) -> String {
        self.template
            .replace("{schema}", &schema.quoted())
            .replace("{channel}", &schema.channel())
    }
}

/// The SQL of every migration for `schema`, for applications that run migrations themselves.
pub fn migration_sql(schema: &Schema) -> String {
    let mut sql = format!("CREATE SCHEMA IF NOT EXISTS {};\n", schema.quoted());
    for m in MIGRATIONS {
        sql.push_str(&format!(
            "\n-- outbox migration {}: {}\n",
            m.version, m.name
        ));
        sql.push_str(&m.render(schema));
    }
    sql.push_str(&strict_key_order_sql(schema, true));
    sql
}

/// Options of [`migrate`] that are not versioned schema changes but switches applied every time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MigrateOptions {
    /// Install the trigger that serializes enqueues per ordering key (see `docs/ARCHITECTURE.md`).
    pub strict_key_order: bool,
}

/// What [`migrate`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrateReport {
    pub applied: Vec<i32>,
    pub current_version: i32,
}

/// Creates or upgrades the outbox schema. Safe to call on every start-up and concurrently.
///
/// The future is boxed so that it is `Send` for every lifetime: callers can spawn it (sqlx's
/// executor bounds otherwise defeat the compiler's inference of that).
pub fn migrate<'a>(
    conn: &'a mut PgConnection,
    schema: &'a Schema,
    options: MigrateOptions,
) -> futures_util::future::BoxFuture<'a, Result<MigrateReport, sqlx::Error>> {
    Box::pin(migrate_now(conn, schema, options))
}

async fn migrate_now(
    conn: &mut PgConnection,
    schema: &Schema,
    options: MigrateOptions,
) -> Result<MigrateReport, sqlx::Error> {
    conn.execute("BEGIN").await?;
    match migrate_in_transaction(conn, schema, options).await {
        Ok(report) => {
            conn.execute("COMMIT").await?;
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
) -> Result<MigrateReport, sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext($2))")
        .bind(LOCK_CLASS)
        .bind(schema.as_str())
        .execute(&mut *conn)
        .await?;
    let create = format!(
        "CREATE SCHEMA IF NOT EXISTS {s};
         CREATE TABLE IF NOT EXISTS {s}.outbox_schema_version (
             version    integer     PRIMARY KEY,
             name       text        NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now()
         );",
        s = schema.quoted()
    );
    conn.execute(create.as_str()).await?;
    let versions = schema.qualify("outbox_schema_version");
    let done: Vec<i32> =
        sqlx::query_scalar(&format!("SELECT version FROM {versions} ORDER BY version"))
            .fetch_all(&mut *conn)
            .await?;
    let pending: Vec<&Migration> = MIGRATIONS
        .iter()
        .filter(|m| !done.contains(&m.version))
        .collect();
    let record = format!("INSERT INTO {versions} (version, name) VALUES ($1, $2)");
    let mut applied = Vec::new();
    for m in pending {
        let sql = m.render(schema);
        conn.execute(sql.as_str()).await?;
        sqlx::query(&record)
            .bind(m.version)
            .bind(m.name)
            .execute(&mut *conn)
            .await?;
        applied.push(m.version);
    }
    let trigger = strict_key_order_sql(schema, options.strict_key_order);
    conn.execute(trigger.as_str()).await?;
    let current_version = MIGRATIONS.last().map_or(0, |m| m.version);
    Ok(MigrateReport {
        applied,
        current_version,
    })
}

/// Why the outbox schema is not usable by this version of the library.
#[derive(Debug, thiserror::Error)]
pub enum SchemaCheckError {
    #[error("the outbox schema is not installed in schema `{0}`: run `outbox migrate` (or `outbox::migrate` from your application) first")]
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
    Database(#[from] sqlx::Error),
}

/// Checks that the schema is migrated to exactly the version this library knows, so a relay never
/// runs its statements against a missing or different table.
pub async fn check_schema(pool: &sqlx::PgPool, schema: &Schema) -> Result<i32, SchemaCheckError> {
    let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(schema.qualify("outbox_schema_version"))
        .fetch_one(pool)
        .await?;
    if !exists {
        return Err(SchemaCheckError::Missing(schema.to_string()));
    }
    let found: Option<i32> = sqlx::query_scalar(&format!(
        "SELECT max(version) FROM {}",
        schema.qualify("outbox_schema_version")
    ))
    .fetch_one(pool)
    .await?;
    let found = found.ok_or_else(|| SchemaCheckError::Missing(schema.to_string()))?;
    let known = MIGRATIONS.last().map_or(0, |m| m.version);
    match found.cmp(&known) {
        std::cmp::Ordering::Less => Err(SchemaCheckError::Outdated {
            schema: schema.to_string(),
            found,
            needed: known,
        }),
        std::cmp::Ordering::Greater => Err(SchemaCheckError::Newer {
            schema: schema.to_string(),
            found,
            known,
        }),
        std::cmp::Ordering::Equal => Ok(found),
    }
}

/// Installs or removes the per-key serialization trigger.
fn strict_key_order_sql(schema: &Schema, enabled: bool) -> String {
    let s = schema.quoted();
    if enabled {
        format!(
            "CREATE OR REPLACE TRIGGER outbox_event_strict_key_order
                 BEFORE INSERT ON {s}.outbox_event
                 FOR EACH ROW EXECUTE FUNCTION {s}.outbox_event_strict_key_order();\n"
        )
    } else {
        format!("DROP TRIGGER IF EXISTS outbox_event_strict_key_order ON {s}.outbox_event;\n")
    }
}
