//! Test support shared by the workspace's integration tests and benchmarks.
//!
//! - [`TestDb`]: a fresh PostgreSQL database per test (created on the server named by
//!   `DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/postgres`), migrated, dropped
//!   when the test ends.
//! - [`order_violations`]: checks that a sequence of published events keeps per-key order.
//! - [`conformance`]: the suite every publisher kind runs against its real broker.

#![forbid(unsafe_code)]

pub mod conformance;

use std::collections::HashMap;

// The workspace README's Rust example (the quick start) is compiled as a doc test of this crate,
// which is never published: the README stays true without being shipped in a package.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct WorkspaceReadme;

use outbox::{MigrateOptions, OutboxEvent, Schema};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};

/// The server tests create their databases on.
pub fn admin_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// A database of its own for one test; dropped (with its connections) by [`TestDb::drop_db`] or,
/// when the value is dropped without it (a test that failed an assertion), by its `Drop`.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
    admin: PgConnectOptions,
    dropped: bool,
}

impl Drop for TestDb {
    /// Drops the database of a test that ended without [`TestDb::drop_db`]. `Drop` cannot await,
    /// and the test's runtime may be the current thread's: the statement runs on a thread of its
    /// own, with a runtime of its own, and is waited for (a few milliseconds).
    fn drop(&mut self) {
        if self.dropped {
            return;
        }
        let admin = self.admin.clone();
        let name = self.name.clone();
        let dropping = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async move {
                let mut conn = admin.connect().await.ok()?;
                sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&mut conn)
                    .await
                    .ok()
            })
        });
        if dropping.join().ok().flatten().is_none() {
            eprintln!("warning: could not drop the test database {}", self.name);
        }
    }
}

impl TestDb {
    /// A fresh, migrated database with the outbox in `public`.
    pub async fn new() -> anyhow::Result<Self> {
        Self::with_schema(&Schema::default(), MigrateOptions::default()).await
    }

    /// A fresh database with the outbox migrated into `schema`.
    pub async fn with_schema(schema: &Schema, options: MigrateOptions) -> anyhow::Result<Self> {
        let db = Self::empty().await?;
        let mut conn = db.pool.acquire().await?;
        outbox::migrate(&mut conn, schema, options).await?;
        Ok(db)
    }

    /// A fresh database with nothing in it.
    pub async fn empty() -> anyhow::Result<Self> {
        let admin: PgConnectOptions = admin_url().parse()?;
        let name = format!("outbox_test_{}", uuid::Uuid::new_v4().simple());
        let mut conn = admin.connect().await?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await?;
        conn.close().await?;
        let options = admin.clone().database(&name);
        let url = url_with_database(&admin_url(), &name);
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .connect_with(options)
            .await?;
        Ok(Self {
            name,
            url,
            pool,
            admin,
            dropped: false,
        })
    }

    /// A single connection to the test database.
    pub async fn connect(&self) -> anyhow::Result<PgConnection> {
        Ok(self.admin.clone().database(&self.name).connect().await?)
    }

    /// Closes the pool and drops the database (terminating stray connections, e.g. of killed
    /// relay processes).
    pub async fn drop_db(mut self) -> anyhow::Result<()> {
        self.dropped = true;
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
}

/// The AWS emulator the tests use: `OUTBOX_TEST_AWS_ENDPOINT`, default `http://127.0.0.1:4566`
/// (started by `scripts/aws-emulator.sh start`). Only loopback is accepted, so no test can reach
/// real AWS or another machine.
pub fn aws_endpoint() -> String {
    let url = std::env::var("OUTBOX_TEST_AWS_ENDPOINT")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "http://127.0.0.1:4566".to_owned());
    assert!(
        ["http://127.0.0.1:", "http://localhost:", "http://[::1]:"]
            .iter()
            .any(|prefix| url.starts_with(prefix)),
        "OUTBOX_TEST_AWS_ENDPOINT must be an http:// URL on loopback, got {url}"
    );
    url
}

/// The Kafka-protocol broker the tests use: `OUTBOX_TEST_KAFKA` (`host:port`, loopback only), default
/// `127.0.0.1:19092`, where `scripts/kafka.sh start` runs tansu.
pub fn kafka_brokers() -> String {
    let brokers =
        std::env::var("OUTBOX_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:19092".to_owned());
    assert!(
        brokers.starts_with("127.0.0.1:") || brokers.starts_with("localhost:"),
        "OUTBOX_TEST_KAFKA must be a loopback host:port, got {brokers}"
    );
    brokers
}

async fn answers(brokers: &str) -> bool {
    tokio::time::timeout(
        std::time::Duration::from_secs(2),
        tokio::net::TcpStream::connect(brokers.to_owned()),
    )
    .await
    .map(|r| r.is_ok())
    .unwrap_or(false)
}

/// Whether the broker answers, starting it with `scripts/kafka.sh start` if tansu is installed.
/// `false` (the test is skipped, loudly) only when it cannot be started.
pub async fn kafka_available() -> bool {
    let brokers = kafka_brokers();
    if answers(&brokers).await {
        return true;
    }
    let script =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/kafka.sh");
    let started = std::process::Command::new("bash")
        .arg(script)
        .arg("start")
        // Installing tansu takes minutes: that is scripts/test.sh's job, not a test's.
        .env("KAFKA_INSTALL", "0")
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if started && answers(&brokers).await {
        return true;
    }
    eprintln!(
        "SKIPPED: no Kafka broker answers at {brokers} and tansu could not be started: run \
         `scripts/kafka.sh start` (it installs tansu once, ~7 min) or scripts/test.sh"
    );
    false
}

/// `url` with its database path replaced by `database`.
pub fn url_with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let base = match base[scheme_end..].find('/') {
        Some(slash) => &base[..scheme_end + slash],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{database}?{q}"),
        None => format!("{base}/{database}"),
    }
}

/// Every place where `published` breaks per-key order: the first copy of each event must come
/// after the first copy of every earlier (`seq`) event of its key. Returns readable descriptions.
pub fn order_violations(published: &[OutboxEvent]) -> Vec<String> {
    let mut last_seq: HashMap<(String, String), i64> = HashMap::new();
    let mut seen = std::collections::HashSet::new();
    let mut violations = Vec::new();
    for event in published {
        if !seen.insert(event.id) {
            continue; // a duplicate: at-least-once allows it
        }
        let key = (event.aggregate_type.clone(), event.aggregate_id.clone());
        if let Some(&prev) = last_seq.get(&key) {
            if event.seq < prev {
                violations.push(format!(
                    "key {}/{}: seq {} published after seq {}",
                    key.0, key.1, event.seq, prev
                ));
            }
        }
        last_seq.insert(key, event.seq);
    }
    violations
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_database_of_a_url() {
        assert_eq!(
            url_with_database("postgres://u:p@h:5432/postgres?sslmode=disable", "t1"),
            "postgres://u:p@h:5432/t1?sslmode=disable"
        );
        assert_eq!(url_with_database("postgres://h", "t1"), "postgres://h/t1");
    }
}
