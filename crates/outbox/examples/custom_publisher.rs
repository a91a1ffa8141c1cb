//! A publisher kind of your own, in about a hundred lines: `kind = "pg_table"` appends each event
//! to a table of another PostgreSQL database (a stand-in for any broker with a client library).
//! It passes the publisher conformance suite (`crates/outbox/tests/engine/relay.rs`,
//! `custom_publisher_passes_the_conformance_suite`).
//!
//! Run: `DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres cargo run -p outbox --example custom_publisher`

// Also compiled as a module of the engine's tests (tests/engine/relay.rs), which use its items.
#![allow(unreachable_pub)]

use async_trait::async_trait;
use outbox::config::Problems;
use outbox::publisher::publish_sequentially;
use outbox::registry::{BuildError, DestinationRef, PublisherFactory};
use outbox::{Config, OutboxEvent, PublishError, PublishResult, Publisher};
use sqlx::postgres::PgPoolOptions;

/// `[destinations.NAME] kind = "pg_table"`: what the kind reads (unknown keys are errors).
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PgTableSettings {
    pub url: String,
    pub table: String,
    #[serde(default = "default_max")]
    pub max_payload_bytes: usize,
}

fn default_max() -> usize {
    64 * 1024
}

/// The factory: validates its destinations without connecting, then builds them.
pub struct PgTableKind;

#[async_trait]
impl PublisherFactory for PgTableKind {
    fn kinds(&self) -> &'static [&'static str] {
        &["pg_table"]
    }

    fn problems(&self, _config: &Config, destinations: &[DestinationRef<'_>]) -> Problems {
        let mut p = Problems::default();
        for d in destinations {
            match d.settings::<PgTableSettings>() {
                Err(e) => p.push(e),
                Ok(s)
                    if !s
                        .table
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_') =>
                {
                    p.add(
                        d.key("table"),
                        format!("{:?} is not a plain table name", s.table),
                        "use letters, digits and _",
                    )
                }
                Ok(_) => {}
            }
        }
        p
    }

    async fn build(
        &self,
        _config: &Config,
        destinations: &[DestinationRef<'_>],
    ) -> Result<Vec<(String, Box<dyn Publisher>)>, BuildError> {
        let mut built: Vec<(String, Box<dyn Publisher>)> = Vec::new();
        for d in destinations {
            let settings: PgTableSettings = d.settings()?;
            built.push((
                d.name.to_owned(),
                Box::new(PgTablePublisher::new(settings)?),
            ));
        }
        Ok(built)
    }
}

/// Appends events to a table `(id uuid PRIMARY KEY, headers jsonb, payload jsonb, n bigserial)`.
pub struct PgTablePublisher {
    pool: sqlx::PgPool,
    settings: PgTableSettings,
}

impl PgTablePublisher {
    pub fn new(settings: PgTableSettings) -> Result<Self, BuildError> {
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(std::time::Duration::from_secs(3))
            .connect_lazy(&settings.url)
            .map_err(|e| BuildError::Config(outbox::ConfigError::Invalid(e.to_string())))?;
        Ok(Self { pool, settings })
    }

    async fn send(&self, event: &OutboxEvent) -> PublishResult {
        if event.payload.get().len() > self.settings.max_payload_bytes {
            return Err(PublishError::permanent(format!(
                "payload of {} bytes is over the table's limit of {}",
                event.payload.get().len(),
                self.settings.max_payload_bytes
            )));
        }
        let sql = format!(
            "INSERT INTO {} (id, headers, payload) VALUES ($1, $2, $3::text::jsonb) ON CONFLICT (id) DO NOTHING",
            self.settings.table
        );
        let headers = serde_json::to_value(&event.headers).unwrap_or_default();
        sqlx::query(&sql)
            .bind(event.id)
            .bind(headers)
            .bind(event.payload.get())
            .execute(&self.pool)
            .await
            .map(|_| ())
            // Connection trouble is the destination's; a refused row is this event's.
            .map_err(|e| match e {
                sqlx::Error::Database(db) => PublishError::retryable(db.to_string()),
                other => PublishError::unavailable(other.to_string()),
            })
    }
}

#[async_trait]
impl Publisher for PgTablePublisher {
    async fn publish(&self, batch: &[OutboxEvent]) -> Vec<PublishResult> {
        // One event at a time keeps the contract: per-key order, a failure stops its key.
        publish_sequentially(batch, |event| self.send(event)).await
    }

    async fn check(&self) -> Result<(), PublishError> {
        let sql = format!("SELECT 1 FROM {} LIMIT 0", self.settings.table);
        sqlx::query(&sql)
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(|e| {
                PublishError::permanent(format!(
                    "table `{}` is not usable: {e}",
                    self.settings.table
                ))
            })
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::var("DATABASE_URL")?;
    let config = Config::from_toml_str(
        &format!("[default.destinations.copy]\nkind = \"pg_table\"\nurl = \"{url}\"\ntable = \"outbox_copy\"\n[default]\ndefault_destination = \"copy\"\n"),
        "local",
    )?;
    let publisher = outbox::Registry::new()
        .with(PgTableKind)
        .build(&config)
        .await?;
    match publisher.check().await {
        Ok(()) => println!("destination `copy` is ready"),
        Err(e) => println!("{e} (create it: CREATE TABLE outbox_copy (id uuid PRIMARY KEY, headers jsonb, payload jsonb, n bigserial))"),
    }
    Ok(())
}
