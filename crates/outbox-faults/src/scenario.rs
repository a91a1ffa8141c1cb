//! Shared steps of the scenarios: quick or long mode, the relay's configuration file, waiting for
//! a drained backlog, and the result row.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sqlx::PgPool;

use crate::ledger::Tally;

/// `OUTBOX_FAULTS_LONG=1` selects the long mode (more kills, more events).
pub fn long_mode() -> bool {
    std::env::var("OUTBOX_FAULTS_LONG").is_ok_and(|v| v == "1" || v == "true")
}

/// `quick` in `cargo test`, `long` with `OUTBOX_FAULTS_LONG=1`.
pub fn pick<T>(quick: T, long: T) -> T {
    if long_mode() {
        long
    } else {
        quick
    }
}

/// Relay settings tight enough for a scenario to finish in seconds: a claim's transaction is
/// bounded at 3 s, publishing at 1 s, retries back off from 50 ms up to 1 s and never give up.
pub const FAST_RELAY: &str = r#"
[default.relay]
batch_size = 50
poll_interval = "100ms"
publish_timeout = "1s"
statement_timeout = "1s"
transaction_timeout = "3s"
max_attempts = 100000
backoff_base = "50ms"
backoff_max = "1s"
"#;

/// Writes `outbox.toml` into `dir` with [`FAST_RELAY`] and `extra`; returns its path.
pub fn write_config(dir: &Path, extra: &str) -> PathBuf {
    let path = dir.join("outbox.toml");
    std::fs::write(&path, format!("{FAST_RELAY}\n{extra}")).expect("write outbox.toml");
    path
}

/// Undelivered events in the outbox (pending, in backoff included).
pub async fn pending(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM outbox_event WHERE status IN ('pending', 'parked')")
        .fetch_one(pool)
        .await
        .unwrap_or(-1)
}

/// Polls `done` every 100 ms until it is true or `timeout` passes; returns the time it took.
pub async fn wait_for<F, Fut>(timeout: Duration, mut done: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if done().await {
            return Some(start.elapsed());
        }
        if start.elapsed() > timeout {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One scenario's result, as printed and as a row of RELIABILITY.md's table.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub scenario: &'static str,
    pub fault: String,
    pub tally: Tally,
    /// From the end of the last fault (producers stopped) to an empty backlog.
    pub recover: Duration,
    pub note: String,
}

impl Outcome {
    pub fn row(&self) -> String {
        let t = &self.tally;
        format!(
            "| {} | {} | {} committed{} | {} / {} / {} | {:.1} s | {} |",
            self.scenario,
            self.fault,
            t.committed,
            if t.poison > 0 {
                format!(" ({} poison)", t.poison)
            } else {
                String::new()
            },
            t.lost,
            t.duplicated,
            t.out_of_order,
            self.recover.as_secs_f64(),
            self.note
        )
    }

    /// Prints the row and appends it to `OUTBOX_FAULTS_REPORT` when set; then asserts the
    /// required result: nothing lost, nothing unknown or out of order.
    pub fn report(&self) {
        let row = self.row();
        eprintln!("{row}");
        if let Ok(path) = std::env::var("OUTBOX_FAULTS_REPORT") {
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
            {
                let _ = writeln!(f, "{row}");
            }
        }
        assert!(
            self.tally.is_clean(),
            "{}: {:?}\nexamples: {:#?}",
            self.scenario,
            self.tally,
            self.tally.examples
        );
    }
}
