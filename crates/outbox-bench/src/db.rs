//! The benchmark's own database: created fresh per run (`outbox_bench_<pid>`), migrated, and
//! dropped at the end; plus the table operations every scenario shares.

use anyhow::Context;
use outbox::{MigrateOptions, Schema};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};

/// What the `outbox_event_wakeup` trigger does during a measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wakeup {
    /// Trigger dropped: producers never look at the wake-up flag.
    Dropped,
    /// Trigger installed, no relay waiting (its request in the past): the normal busy case.
    NotWanted,
    /// Trigger installed and a relay waiting forever: every producer transaction NOTIFYs.
    Forced,
}

impl Wakeup {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Wakeup::Dropped => "trigger dropped",
            Wakeup::NotWanted => "trigger, relay busy",
            Wakeup::Forced => "trigger, NOTIFY every tx",
        }
    }
}

pub(crate) struct BenchDb {
    pub name: String,
    pub pool: PgPool,
    admin: PgConnectOptions,
    /// The wake-up trigger as the migration created it, to recreate it after dropping it.
    wakeup_trigger: String,
}

impl BenchDb {
    /// Creates `outbox_bench_<pid>` on the server of `admin_url` and migrates the outbox into it.
    pub(crate) async fn create(admin_url: &str) -> anyhow::Result<Self> {
        let admin: PgConnectOptions = admin_url
            .parse()
            .context("DATABASE_URL is not a PostgreSQL URL")?;
        let admin = admin.application_name("outbox-bench");
        let name = format!("outbox_bench_{}", std::process::id());
        let mut conn = admin.connect().await.with_context(|| {
            format!(
                "cannot connect to {}",
                outbox::config::redact_url(admin_url)
            )
        })?;
        sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&mut conn)
            .await?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await?;
        conn.close().await?;
        let pool = PgPoolOptions::new()
            .max_connections(30)
            .connect_with(admin.clone().database(&name))
            .await?;
        let mut db = Self {
            name,
            pool,
            admin,
            wakeup_trigger: String::new(),
        };
        db.migrate(false).await?;
        db.wakeup_trigger = sqlx::query_scalar(
            "SELECT pg_get_triggerdef(oid) FROM pg_trigger
             WHERE tgname = 'outbox_event_wakeup' AND tgrelid = 'outbox_event'::regclass",
        )
        .fetch_one(&db.pool)
        .await
        .context("the migration created no outbox_event_wakeup trigger")?;
        sqlx::query(
            "CREATE TABLE bench_order (
                 id bigserial PRIMARY KEY,
                 customer text NOT NULL,
                 total_cents integer NOT NULL,
                 created_at timestamptz NOT NULL DEFAULT now())",
        )
        .execute(&db.pool)
        .await?;
        Ok(db)
    }

    /// A connection of its own (producers each hold one, outside the pool).
    pub(crate) async fn connect(&self) -> anyhow::Result<PgConnection> {
        Ok(self.admin.clone().database(&self.name).connect().await?)
    }

    /// Re-runs the migration, which installs or removes the strict_key_order trigger.
    pub(crate) async fn migrate(&self, strict_key_order: bool) -> anyhow::Result<()> {
        let mut conn = self.pool.acquire().await?;
        outbox::migrate(
            &mut conn,
            &Schema::default(),
            MigrateOptions {
                strict_key_order,
                ..MigrateOptions::default()
            },
        )
        .await?;
        Ok(())
    }

    pub(crate) async fn drop_db(self) -> anyhow::Result<()> {
        self.pool.close().await;
        let mut conn = self.admin.connect().await?;
        sqlx::query(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ))
        .execute(&mut conn)
        .await?;
        Ok(())
    }

    /// Empties the outbox and the business table and resets the wake-up flag.
    /// The store a drain uses: wake-ups play no part in a drain (every claim is full), and
    /// without them no listener is left holding a connection after the run.
    pub(crate) async fn drain_store(&self) -> anyhow::Result<outbox::PgStore> {
        Ok(outbox::PgStore::new(
            self.pool.clone(),
            outbox::PgStoreOptions {
                notify: false,
                ..outbox::PgStoreOptions::default()
            },
        )
        .await?)
    }

    pub(crate) async fn reset(&self) -> anyhow::Result<()> {
        sqlx::query("TRUNCATE outbox_event, bench_order")
            .execute(&self.pool)
            .await?;
        sqlx::query("SELECT setval('outbox_wakeup_wanted_ms', 0)")
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Empties the outbox and loads `n` events of ~200 bytes over `keys` keys in one statement,
    /// through the same table, defaults, constraints and triggers a producer goes through, then
    /// vacuums so every scenario starts from the same physical state.
    pub(crate) async fn preload(&self, n: i64, keys: i64) -> anyhow::Result<()> {
        self.reset().await?;
        self.append(n, keys).await?;
        sqlx::query("VACUUM ANALYZE outbox_event")
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Appends `n` events (no vacuum), e.g. while a relay runs.
    pub(crate) async fn append(&self, n: i64, keys: i64) -> anyhow::Result<()> {
        sqlx::query(
            "INSERT INTO outbox_event (aggregate_type, aggregate_id, event_type, payload)
             SELECT 'account', 'acc-' || (g % $2), 'AccountCredited',
                    jsonb_build_object('n', g, 'amount_cents', g % 10000, 'currency', 'EUR',
                                       'note', repeat('x', 120))
             FROM generate_series(1, $1::bigint) AS g",
        )
        .bind(n)
        .bind(keys.max(1))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub(crate) async fn count(&self) -> anyhow::Result<i64> {
        Ok(sqlx::query_scalar("SELECT count(*) FROM outbox_event")
            .fetch_one(&self.pool)
            .await?)
    }

    pub(crate) async fn set_wakeup(&self, mode: Wakeup) -> anyhow::Result<()> {
        match mode {
            Wakeup::Dropped => {
                sqlx::query("DROP TRIGGER IF EXISTS outbox_event_wakeup ON outbox_event")
                    .execute(&self.pool)
                    .await?;
            }
            Wakeup::NotWanted | Wakeup::Forced => {
                let present: bool = sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'outbox_event_wakeup'
                                    AND tgrelid = 'outbox_event'::regclass)",
                )
                .fetch_one(&self.pool)
                .await?;
                if !present {
                    sqlx::query(&self.wakeup_trigger)
                        .execute(&self.pool)
                        .await?;
                }
                // The relays' request for NOTIFY: milliseconds since the epoch (see migration 2).
                let until: i64 = if mode == Wakeup::Forced { i64::MAX } else { 0 };
                sqlx::query("SELECT setval('outbox_wakeup_wanted_ms', $1)")
                    .bind(until)
                    .execute(&self.pool)
                    .await?;
            }
        }
        Ok(())
    }
}
