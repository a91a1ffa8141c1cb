//! Adopting an existing outbox table (Debezium's outbox layout, or any table with the same kind of
//! columns): a trigger copies each row inserted into it into `outbox_event`, in the same
//! transaction, so the producers that write the existing table keep working unchanged and the relay
//! publishes their events as its own.
//!
//! Why a side table (`outbox_event`) rather than reading the existing table in place: the relay's
//! claim, parking and settle statements rely on its own columns (`seq`, `status`, `held_for`, ...)
//! and indexes; adding them to someone else's table would change the table its producers and
//! tools know, and every statement of the relay would have to be written twice. A copy at insert
//! costs one row per event and keeps both the producers and the relay as they are.
//!
//! The copy is made by an `AFTER INSERT ... FOR EACH ROW` trigger on the existing table, whose
//! function (in the outbox's schema) maps the columns: rows are copied in insert order, so the
//! events of a key get `seq` in the order they were inserted, as with a producer that writes
//! `outbox_event` itself (with `strict_key_order`, in commit order). The function runs with the
//! rights of the role that adopted the table (`SECURITY DEFINER`, with a fixed `search_path`), so
//! a producer role that may insert into its table needs no grant on `outbox_event`.
//!
//! A row the outbox contract refuses (a NULL or empty key or type, a payload that is not a JSON
//! object or is over `events.max_payload_bytes`, an id that is not a UUID) makes the producer's
//! insert fail, as an `INSERT INTO outbox_event` would: the event must exist if and only if the
//! business change commits.

use sqlx::{Executor, PgPool};

use super::migrate::{check_schema, SchemaCheckError, LOCK_CLASS};
use super::schema::Schema;

/// The name of the trigger on the adopted table.
pub const ADOPT_TRIGGER: &str = "outbox_adopt";

/// PostgreSQL truncates longer identifiers; a longer name cannot be the one the user means.
const MAX_IDENTIFIER_BYTES: usize = 63;

/// Which column of the existing table holds each part of an event. [`AdoptMapping::debezium`]
/// gives the column names of Debezium's outbox event router.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdoptMapping {
    /// The schema of the existing table.
    pub table_schema: String,
    /// The existing table.
    pub table: String,
    /// The event id: a `uuid` column (or text holding UUIDs).
    pub id: String,
    /// The first part of the ordering key.
    pub aggregate_type: String,
    /// The second part of the ordering key.
    pub aggregate_id: String,
    /// The event type.
    pub event_type: String,
    /// The payload: a `jsonb`, `json` or text column holding JSON objects.
    pub payload: String,
    /// Optional: headers, a `jsonb`, `json` or text column holding an object of strings.
    pub headers: Option<String>,
    /// Optional: when the event happened, a `timestamptz` or `timestamp` column (else the time of
    /// the insert).
    pub timestamp: Option<String>,
}

/// The parts of an event, with the option of `outbox adopt` that maps each.
const PARTS: &[(&str, &str)] = &[
    ("id", "--id"),
    ("aggregate_type", "--aggregate-type"),
    ("aggregate_id", "--aggregate-id"),
    ("event_type", "--event-type"),
    ("payload", "--payload"),
    ("headers", "--headers"),
    ("created_at", "--timestamp"),
];

impl AdoptMapping {
    /// The layout of Debezium's outbox event router: `id`, `aggregatetype`, `aggregateid`,
    /// `type`, `payload`. `table` is `name` or `schema.name` (default schema `public`); names are
    /// taken as written (case-sensitive), as PostgreSQL stores them.
    pub fn debezium(table: &str) -> Result<Self, AdoptError> {
        let (table_schema, table) = match table.split_once('.') {
            Some((schema, name)) => (schema.to_owned(), name.to_owned()),
            None => ("public".to_owned(), table.to_owned()),
        };
        let mapping = Self {
            table_schema,
            table,
            id: "id".to_owned(),
            aggregate_type: "aggregatetype".to_owned(),
            aggregate_id: "aggregateid".to_owned(),
            event_type: "type".to_owned(),
            payload: "payload".to_owned(),
            headers: None,
            timestamp: None,
        };
        mapping.check_names()?;
        Ok(mapping)
    }

    /// `"schema"."table"`.
    pub fn qualified_table(&self) -> String {
        format!("{}.{}", quote(&self.table_schema), quote(&self.table))
    }

    /// Each part with its column, optional ones only when mapped.
    fn columns(&self) -> Vec<(&'static str, &str)> {
        let mut columns = vec![
            ("id", self.id.as_str()),
            ("aggregate_type", self.aggregate_type.as_str()),
            ("aggregate_id", self.aggregate_id.as_str()),
            ("event_type", self.event_type.as_str()),
            ("payload", self.payload.as_str()),
        ];
        if let Some(headers) = &self.headers {
            columns.push(("headers", headers));
        }
        if let Some(timestamp) = &self.timestamp {
            columns.push(("created_at", timestamp));
        }
        columns
    }

    fn check_names(&self) -> Result<(), AdoptError> {
        let mut names = vec![("table schema", self.table_schema.as_str())];
        names.push(("table", self.table.as_str()));
        for (part, column) in self.columns() {
            names.push((part, column));
        }
        for (what, name) in names {
            if name.is_empty() || name.contains('\0') || name.len() > MAX_IDENTIFIER_BYTES {
                return Err(AdoptError::InvalidName {
                    what,
                    name: name.to_owned(),
                });
            }
        }
        Ok(())
    }
}

/// Why a table could not be adopted. Nothing was changed when it is returned.
#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    #[error(
        "{what} name {name:?} is not usable: give a non-empty name of at most 63 bytes without NUL"
    )]
    InvalidName { what: &'static str, name: String },
    #[error("table {table} does not exist: name the existing outbox table as schema.table (names are case-sensitive; the default schema is public)")]
    NoTable { table: String },
    #[error("table {table} has no column {}: map each to an existing column with {} (the table has: {})",
        .missing.iter().map(|(_, column, _)| format!("`{column}`")).collect::<Vec<_>>().join(", "),
        .missing.iter().map(|(part, _, flag)| format!("{flag} COLUMN for {part}")).collect::<Vec<_>>().join(", "),
        .present.join(", "))]
    MissingColumns {
        table: String,
        /// (event part, missing column, option that maps it)
        missing: Vec<(&'static str, String, &'static str)>,
        present: Vec<String>,
    },
    #[error("column `{column}` of {table} is of type {found}, which cannot hold the event's {part}: {expected}")]
    UnsupportedType {
        table: String,
        column: String,
        part: &'static str,
        found: String,
        expected: &'static str,
    },
    #[error("{0}")]
    Schema(SchemaCheckError),
    #[error("could not adopt the table: {0}")]
    Database(#[from] sqlx::Error),
}

impl From<SchemaCheckError> for AdoptError {
    fn from(e: SchemaCheckError) -> Self {
        Self::Schema(e)
    }
}

impl AdoptError {
    /// The user's input or database set-up is at fault (a name, a column, a missing migration),
    /// not the database connection.
    pub fn is_usage(&self) -> bool {
        !matches!(self, Self::Database(_))
    }
}

/// What [`adopt`] installed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdoptReport {
    /// `"schema"."table"` of the adopted table.
    pub table: String,
    /// The copy function, qualified.
    pub function: String,
}

/// The SQL that [`adopt`] runs for `mapping`, after checking the table and its columns: for psql or
/// a migration tool. Apply it in one transaction.
pub async fn adoption_sql(
    pool: &PgPool,
    schema: &Schema,
    mapping: &AdoptMapping,
) -> Result<String, AdoptError> {
    mapping.check_names()?;
    check_schema(pool, schema).await?;
    let types = column_types(pool, mapping).await?;
    let expressions = expressions(mapping, &types)?;
    Ok(install_sql(schema, mapping, &expressions))
}

/// Installs (or replaces) the trigger that copies every row inserted into `mapping`'s table into
/// `outbox_event` of `schema`. Idempotent; rows inserted before it are not copied. Takes a brief
/// lock on the table (creating a trigger waits for the transactions writing it).
pub async fn adopt(
    pool: &PgPool,
    schema: &Schema,
    mapping: &AdoptMapping,
) -> Result<AdoptReport, AdoptError> {
    let sql = adoption_sql(pool, schema, mapping).await?;
    let mut tx = pool.begin().await?;
    // Serialized with `migrate` of the same schema, which may be replacing outbox_event's triggers.
    sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext($2))")
        .bind(LOCK_CLASS)
        .bind(schema.as_str())
        .execute(&mut *tx)
        .await?;
    tx.execute(sql.as_str()).await?;
    tx.commit().await?;
    Ok(AdoptReport {
        table: mapping.qualified_table(),
        function: function_name(schema, mapping),
    })
}

/// Removes the copy trigger and its function: the table's rows are no longer copied (nothing
/// else changes). Returns whether a trigger was there.
pub async fn unadopt(
    pool: &PgPool,
    schema: &Schema,
    mapping: &AdoptMapping,
) -> Result<bool, AdoptError> {
    mapping.check_names()?;
    let table = mapping.qualified_table();
    let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(&table)
        .fetch_one(pool)
        .await?;
    if !exists {
        return Err(AdoptError::NoTable { table });
    }
    let had: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = to_regclass($1) AND tgname = $2)",
    )
    .bind(&table)
    .bind(ADOPT_TRIGGER)
    .fetch_one(pool)
    .await?;
    let mut tx = pool.begin().await?;
    tx.execute(
        format!(
            "DROP TRIGGER IF EXISTS {ADOPT_TRIGGER} ON {table};\nDROP FUNCTION IF EXISTS {}();",
            function_name(schema, mapping)
        )
        .as_str(),
    )
    .await?;
    tx.commit().await?;
    Ok(had)
}

/// A column's type: its name (`pg_type.typname`) and how PostgreSQL writes it.
struct ColumnType {
    name: String,
    typname: String,
    shown: String,
}

async fn column_types(
    pool: &PgPool,
    mapping: &AdoptMapping,
) -> Result<Vec<ColumnType>, AdoptError> {
    let table = mapping.qualified_table();
    let rows: Option<Vec<(String, String, String)>> = {
        let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(&table)
            .fetch_one(pool)
            .await?;
        if exists {
            Some(
                sqlx::query_as(
                    "SELECT a.attname::text, t.typname::text, format_type(a.atttypid, a.atttypmod)
                     FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
                     WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped
                     ORDER BY a.attnum",
                )
                .bind(&table)
                .fetch_all(pool)
                .await?,
            )
        } else {
            None
        }
    };
    let Some(rows) = rows else {
        return Err(AdoptError::NoTable { table });
    };
    Ok(rows
        .into_iter()
        .map(|(name, typname, shown)| ColumnType {
            name,
            typname,
            shown,
        })
        .collect())
}

/// For each mapped part, the SQL expression over `NEW` that gives it; every missing column and the
/// first unusable type are errors.
fn expressions(
    mapping: &AdoptMapping,
    types: &[ColumnType],
) -> Result<Vec<(&'static str, String)>, AdoptError> {
    let table = mapping.qualified_table();
    let missing: Vec<(&'static str, String, &'static str)> = mapping
        .columns()
        .into_iter()
        .filter(|(_, column)| !types.iter().any(|t| t.name == *column))
        .map(|(part, column)| (part, column.to_owned(), flag(part)))
        .collect();
    if !missing.is_empty() {
        return Err(AdoptError::MissingColumns {
            table,
            missing,
            present: types.iter().map(|t| t.name.clone()).collect(),
        });
    }
    let mut out = Vec::new();
    for (part, column) in mapping.columns() {
        let Some(ty) = types.iter().find(|t| t.name == column) else {
            continue; // reported above
        };
        let value = format!("NEW.{}", quote(column));
        let unsupported = |expected| AdoptError::UnsupportedType {
            table: table.clone(),
            column: column.to_owned(),
            part,
            found: ty.shown.clone(),
            expected,
        };
        let text_like = matches!(ty.typname.as_str(), "text" | "varchar" | "bpchar" | "name");
        let expression = match part {
            "id" => match ty.typname.as_str() {
                "uuid" => value,
                _ if text_like => format!("{value}::uuid"),
                _ => return Err(unsupported("use a uuid column (or text holding UUIDs)")),
            },
            "payload" | "headers" => {
                let json = match ty.typname.as_str() {
                    "jsonb" => value,
                    "json" => format!("{value}::jsonb"),
                    _ if text_like => format!("{value}::jsonb"),
                    _ => {
                        return Err(unsupported(
                            "the relay publishes JSON: use a jsonb, json or text column holding JSON objects",
                        ))
                    }
                };
                if part == "headers" {
                    format!("coalesce({json}, '{{}}'::jsonb)")
                } else {
                    json
                }
            }
            "created_at" => match ty.typname.as_str() {
                "timestamptz" => format!("coalesce({value}, now())"),
                "timestamp" => format!("coalesce({value}::timestamptz, now())"),
                _ => return Err(unsupported("use a timestamptz or timestamp column")),
            },
            // The key and the type: any type with a text form (Debezium allows e.g. bigint ids).
            _ => format!("{value}::text"),
        };
        out.push((part, expression));
    }
    Ok(out)
}

fn flag(part: &str) -> &'static str {
    PARTS
        .iter()
        .find(|(p, _)| *p == part)
        .map_or("--column", |(_, flag)| flag)
}

fn install_sql(schema: &Schema, mapping: &AdoptMapping, expressions: &[(&str, String)]) -> String {
    let table = mapping.qualified_table();
    let function = function_name(schema, mapping);
    let columns: Vec<&str> = expressions.iter().map(|(part, _)| *part).collect();
    let values: Vec<&str> = expressions.iter().map(|(_, e)| e.as_str()).collect();
    let described: Vec<String> = mapping
        .columns()
        .iter()
        .map(|(part, column)| format!("{part} <- {column}"))
        .collect();
    let comment = format!(
        "outbox adopt: copies each row inserted into {table} into {} ({})",
        schema.qualify("outbox_event"),
        described.join(", ")
    );
    format!(
        "-- outbox adopt: every row inserted into {table} is copied into {outbox_event}, in the
-- producer's transaction, and the relay publishes it. Rows inserted before are not copied.
CREATE OR REPLACE FUNCTION {function}() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $outbox_adopt$
BEGIN
    -- A row copied before (same id) is not copied again, as a retried producer insert would not be.
    INSERT INTO {outbox_event} ({columns})
    VALUES ({values})
    ON CONFLICT (id) DO NOTHING;
    RETURN NULL;
END
$outbox_adopt$;
COMMENT ON FUNCTION {function}() IS {comment};
CREATE OR REPLACE TRIGGER {ADOPT_TRIGGER}
    AFTER INSERT ON {table}
    FOR EACH ROW EXECUTE FUNCTION {function}();
",
        outbox_event = schema.qualify("outbox_event"),
        columns = columns.join(", "),
        values = values.join(", "),
        comment = literal(&comment),
    )
}

/// The copy function of `mapping`'s table: one per adopted table, named after a hash of the table's
/// name so that any table name fits PostgreSQL's 63-byte identifiers and the name is the same on
/// every run (adopting again replaces it).
fn function_name(schema: &Schema, mapping: &AdoptMapping) -> String {
    // FNV-1a: stable across Rust versions and platforms, unlike the standard library's hasher.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in format!("{}\0{}", mapping.table_schema, mapping.table).bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    schema.qualify(&format!("outbox_adopt_{:08x}", hash as u32))
}

/// An identifier, quoted for SQL.
fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A string literal for SQL.
fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn types(columns: &[(&str, &str)]) -> Vec<ColumnType> {
        columns
            .iter()
            .map(|(name, typname)| ColumnType {
                name: (*name).to_owned(),
                typname: (*typname).to_owned(),
                shown: (*typname).to_owned(),
            })
            .collect()
    }

    #[test]
    fn a_missing_column_is_named_with_the_option_that_maps_it() {
        let mapping = AdoptMapping::debezium("app.outboxevent").unwrap();
        let err = expressions(
            &mapping,
            &types(&[
                ("id", "uuid"),
                ("aggregate_type", "text"),
                ("payload", "jsonb"),
            ]),
        )
        .unwrap_err();
        let text = err.to_string();
        for expected in [
            "\"app\".\"outboxevent\"",
            "`aggregatetype`",
            "`aggregateid`",
            "`type`",
            "--aggregate-type COLUMN",
            "--event-type COLUMN",
            "the table has: id, aggregate_type, payload",
        ] {
            assert!(text.contains(expected), "{expected} not in: {text}");
        }
    }

    #[test]
    fn column_types_are_converted_or_refused() {
        let mut mapping = AdoptMapping::debezium("outboxevent").unwrap();
        mapping.timestamp = Some("ts".to_owned());
        let columns = [
            ("id", "varchar"),
            ("aggregatetype", "varchar"),
            ("aggregateid", "int8"),
            ("type", "text"),
            ("payload", "json"),
            ("ts", "timestamp"),
        ];
        let exprs = expressions(&mapping, &types(&columns)).unwrap();
        assert_eq!(exprs[0], ("id", "NEW.\"id\"::uuid".to_owned()));
        assert_eq!(
            exprs[2],
            ("aggregate_id", "NEW.\"aggregateid\"::text".to_owned())
        );
        assert_eq!(exprs[4], ("payload", "NEW.\"payload\"::jsonb".to_owned()));
        assert_eq!(
            exprs[5],
            (
                "created_at",
                "coalesce(NEW.\"ts\"::timestamptz, now())".to_owned()
            )
        );
        let mut bytea = columns;
        bytea[4] = ("payload", "bytea");
        let err = expressions(&mapping, &types(&bytea)).unwrap_err();
        assert!(
            err.to_string().contains("`payload`")
                && err.to_string().contains("jsonb, json or text"),
            "{err}"
        );
    }

    #[test]
    fn names_are_quoted_and_the_function_name_is_stable_and_short() {
        let mapping = AdoptMapping::debezium("we\"ird.Out Box").unwrap();
        assert_eq!(mapping.qualified_table(), "\"we\"\"ird\".\"Out Box\"");
        let a = function_name(&Schema::default(), &mapping);
        assert_eq!(a, function_name(&Schema::default(), &mapping));
        assert!(a.len() < 40, "{a}");
        let other = AdoptMapping::debezium("public.outboxevent").unwrap();
        assert_ne!(a, function_name(&Schema::default(), &other));
        assert!(AdoptMapping::debezium("").is_err());
        assert!(AdoptMapping::debezium(&"x".repeat(64)).is_err());
    }
}
