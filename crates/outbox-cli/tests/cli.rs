//! The `outbox` binary as users and scripts run it: the documented commands, exit codes and
//! messages, a graceful SIGTERM, and a SIGKILL in the middle of batches losing nothing.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use outbox::{NewEvent, Outbox, Schema};
use outbox_testkit::TestDb;

fn outbox_bin() -> &'static str {
    env!("CARGO_BIN_EXE_outbox")
}

/// A command with a clean configuration environment: no file in the working directory, no
/// inherited OUTBOX_* variables.
fn outbox(db_url: &str) -> Command {
    let mut cmd = Command::new(outbox_bin());
    for (key, _) in std::env::vars() {
        if key.starts_with("OUTBOX_") || key.starts_with("AWS_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("DATABASE_URL", db_url)
        .env("OUTBOX_LOG", "warn")
        .current_dir(std::env::temp_dir());
    cmd
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("the outbox binary runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn temp_file(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("outbox-cli-{}-{name}", uuid::Uuid::now_v7()))
}

async fn enqueue(db: &TestDb, keys: usize, per_key: usize) -> Vec<uuid::Uuid> {
    let outbox = Outbox::new(Schema::default());
    let mut tx = db.pool.begin().await.unwrap();
    let mut ids = Vec::new();
    for i in 0..per_key {
        let events = (0..keys).map(|k| {
            NewEvent::new("order", format!("k{k}"), "E")
                .payload(&serde_json::json!({ "i": i, "pad": "x".repeat(150) }))
                .unwrap()
        });
        ids.extend(outbox.enqueue_all(&mut tx, events).await.unwrap());
    }
    tx.commit().await.unwrap();
    ids
}

/// The JSON lines a file publisher wrote, as (id, key, seq), in file order.
fn read_lines(path: &Path) -> Vec<(uuid::Uuid, String, i64)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).expect("whole JSON lines");
            (
                v["id"].as_str().unwrap().parse().unwrap(),
                v["aggregate_id"].as_str().unwrap().to_owned(),
                v["seq"].as_i64().unwrap(),
            )
        })
        .collect()
}

#[tokio::test]
async fn migrate_relay_drain_and_status_json() {
    let db = TestDb::empty().await.unwrap();
    let out = run(outbox(&db.url).arg("migrate"));
    assert!(out.status.success(), "{}", stderr(&out));
    let out = run(outbox(&db.url).arg("migrate"));
    assert!(stderr(&out).contains("up to date"), "{}", stderr(&out));

    let ids = enqueue(&db, 3, 2).await;
    let out = run(outbox(&db.url).args(["status", "--json"]));
    assert!(out.status.success());
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["pending"], 6);
    assert_eq!(status["dead"], 0);
    assert!(status["oldest_pending_age_seconds"].as_f64().unwrap() >= 0.0);

    let out = run(outbox(&db.url).args(["relay", "--drain", "--publisher", "stdout"]));
    assert!(out.status.success(), "{}", stderr(&out));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let published: Vec<uuid::Uuid> = lines
        .iter()
        .map(|l| l["id"].as_str().unwrap().parse().unwrap())
        .collect();
    assert_eq!(
        published, ids,
        "stdout carries one JSON line per event, in seq order"
    );
    for key in [
        "aggregate_type",
        "aggregate_id",
        "event_type",
        "payload",
        "headers",
    ] {
        assert!(lines[0].get(key).is_some(), "missing {key}");
    }
    let out = run(outbox(&db.url).args(["status", "--json"]));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["pending"], 0);
    db.drop_db().await.unwrap();
}

#[tokio::test]
async fn sigterm_finishes_the_batch_and_exits_zero() {
    let db = TestDb::new().await.unwrap();
    enqueue(&db, 10, 10).await;
    let file = temp_file("sigterm.jsonl");
    let child = outbox(&db.url)
        .args(["relay", "--publisher"])
        .arg(format!("file:{}", file.display()))
        .env("OUTBOX_RELAY__BATCH_SIZE", "10")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while read_lines(&file).len() < 100 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    signal(child.id(), "TERM");
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(read_lines(&file).len(), 100);
    let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_event")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(pending, 0, "every published event was recorded before exit");
    std::fs::remove_file(file).ok();
    db.drop_db().await.unwrap();
}

fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success());
}

/// A relay killed with SIGKILL in the middle of batches, three times, then restarted: every
/// committed event is published, the first copies keep per-key order, and duplicates are only
/// events that were in flight at a kill (at most one batch per kill).
#[tokio::test]
async fn sigkill_mid_batch_loses_nothing_and_keeps_key_order() {
    let db = TestDb::new().await.unwrap();
    let ids = enqueue(&db, 50, 60).await; // 3000 events
    let file = temp_file("sigkill.jsonl");
    let batch_size = 20;
    let kills = 3;
    for round in 0..kills {
        let mut child = outbox(&db.url)
            .args(["relay", "--publisher"])
            .arg(format!("file:{}", file.display()))
            .env("OUTBOX_RELAY__BATCH_SIZE", batch_size.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let target = (round + 1) * 600;
        let deadline = Instant::now() + Duration::from_secs(30);
        while read_lines(&file).len() < target && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
    }
    let out = run(outbox(&db.url)
        .args(["relay", "--drain", "--publisher"])
        .arg(format!("file:{}", file.display())));
    assert!(out.status.success(), "{}", stderr(&out));

    let lines = read_lines(&file);
    let published: HashSet<uuid::Uuid> = lines.iter().map(|l| l.0).collect();
    let missing = ids.iter().filter(|id| !published.contains(id)).count();
    assert_eq!(missing, 0, "lost events after SIGKILL");
    let duplicates = lines.len() - published.len();
    assert!(
        duplicates <= kills * batch_size,
        "{duplicates} duplicates for {kills} kills of batch {batch_size}"
    );
    let mut first_seen = HashSet::new();
    let mut last_seq: HashMap<&str, i64> = HashMap::new();
    for (id, key, seq) in &lines {
        if !first_seen.insert(*id) {
            continue;
        }
        let last = last_seq.entry(key).or_insert(i64::MIN);
        assert!(*seq > *last, "key {key}: seq {seq} after {last}");
        *last = *seq;
    }
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_event")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(left, 0);
    std::fs::remove_file(file).ok();
    db.drop_db().await.unwrap();
}

#[tokio::test]
async fn bad_configuration_fails_before_anything_runs_naming_the_key() {
    let db = TestDb::new().await.unwrap();
    enqueue(&db, 1, 1).await;
    let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
        (
            vec![("OUTBOX_PROFILE", "staging")],
            "unknown profile `staging`",
        ),
        (vec![("OUTBOX_RELAY__BATCH_SIZE", "0")], "relay.batch_size"),
        (
            vec![("OUTBOX_RELAY__BATCH_SIZE", "lots")],
            "relay.batch_size",
        ),
        (vec![("OUTBOX_RELAY__BACTH_SIZE", "5")], "bacth_size"),
        (vec![("OUTBOX_SCHEMA", "x;drop")], "plain identifier"),
        (vec![("OUTBOX_PUBLISHER", "kafka")], "stdout, file:PATH"),
    ];
    for (env, expected) in cases {
        let mut cmd = outbox(&db.url);
        cmd.args(["relay", "--drain"]);
        for (k, v) in &env {
            cmd.env(k, v);
        }
        let out = run(&mut cmd);
        assert_eq!(out.status.code(), Some(2), "{env:?}: {}", stderr(&out));
        let err = stderr(&out).to_lowercase();
        assert!(err.contains(&expected.to_lowercase()), "{env:?}: {err}");
    }
    let config = temp_file("bad.toml");
    std::fs::write(&config, "[default.relay]\nworkers = 0\n").unwrap();
    let out = run(outbox(&db.url).arg("--config").arg(&config).arg("relay"));
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("relay.workers"), "{}", stderr(&out));
    std::fs::remove_file(config).ok();

    // An unmigrated database says to migrate; nothing was published.
    let empty = TestDb::empty().await.unwrap();
    let out = run(outbox(&empty.url).args(["relay", "--drain"]));
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("outbox migrate"), "{}", stderr(&out));
    empty.drop_db().await.unwrap();

    let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_event")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(pending, 1, "nothing ran");
    db.drop_db().await.unwrap();
}

#[test]
fn an_unreachable_database_is_a_clear_error_without_the_password() {
    let url = "postgres://app:hunter2-secret@127.0.0.1:1/app";
    let out = run(outbox(url)
        .args(["status", "--json"])
        .env("OUTBOX_DATABASE__CONNECT_TIMEOUT", "2s"));
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("cannot connect to PostgreSQL"), "{err}");
    // The real cause, not the pool's "timed out".
    assert!(
        err.contains("Connection refused") && !err.contains("timed out"),
        "{err}"
    );
    assert!(err.contains("app:***@127.0.0.1:1"), "{err}");
    assert!(!err.contains("hunter2"), "the password leaked: {err}");

    let out = run(outbox(url).arg("config"));
    assert!(out.status.success());
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        !shown.contains("hunter2") && shown.contains("***"),
        "{shown}"
    );
}

/// `migrate --print` applied by psql (as a deployment's own migration tool would) gives the schema
/// `outbox migrate` gives: the bookkeeping the relay checks, the configured settings; the relay
/// then delivers through the real binary.
#[tokio::test]
async fn migrate_print_applied_with_psql_gives_a_schema_the_relay_accepts() {
    let db = TestDb::empty().await.unwrap();
    let settings = [
        ("OUTBOX_STRICT_KEY_ORDER", "true"),
        ("OUTBOX_EVENTS__MAX_PAYLOAD_BYTES", "4096"),
    ];
    let out = run(outbox(&db.url).args(["migrate", "--print"]).envs(settings));
    assert!(out.status.success(), "{}", stderr(&out));
    let script = temp_file("migrate.sql");
    std::fs::write(&script, &out.stdout).unwrap();
    let psql = |args: &[&str]| {
        Command::new("psql")
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", &db.url])
            .args(args)
            .output()
            .expect("psql runs")
    };
    let applied = psql(&["--single-transaction", "-f", &script.display().to_string()]);
    assert!(applied.status.success(), "{}", stderr(&applied));

    // `outbox migrate` with the same configuration finds nothing to do.
    let out = run(outbox(&db.url).arg("migrate").envs(settings));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("up to date") && !stderr(&out).contains("changed"),
        "{}",
        stderr(&out)
    );
    // The relay and status accept the schema; events flow.
    let ids = enqueue(&db, 3, 2).await;
    let file = temp_file("printed.jsonl");
    let out = run(outbox(&db.url)
        .args(["relay", "--drain", "--publisher"])
        .arg(format!("file:{}", file.display()))
        .envs(settings));
    assert!(out.status.success(), "{}", stderr(&out));
    let published: Vec<uuid::Uuid> = read_lines(&file).iter().map(|l| l.0).collect();
    assert_eq!(published, ids);
    let out = run(outbox(&db.url).args(["status", "--json"]).envs(settings));
    assert!(out.status.success(), "{}", stderr(&out));
    // The configured payload limit reached SQL producers.
    let big = format!(
        "INSERT INTO outbox_event (aggregate_type, aggregate_id, event_type, payload) VALUES ('o', '1', 'E', '{{\"x\": \"{}\"}}')",
        "y".repeat(5000)
    );
    let refused = psql(&["-c", &big]);
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("over the limit of 4096 bytes"),
        "{}",
        stderr(&refused)
    );
    // Per version: nothing left to apply from the latest on, and an unknown version is refused.
    let latest = outbox::postgres::latest_version().to_string();
    let out = run(outbox(&db.url).args(["migrate", "--print", "--from", &latest]));
    assert!(out.status.success(), "{}", stderr(&out));
    let out = run(outbox(&db.url).args(["migrate", "--print", "--from", "99"]));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no outbox migration 99"),
        "{}",
        stderr(&out)
    );
    std::fs::remove_file(script).ok();
    std::fs::remove_file(file).ok();
    db.drop_db().await.unwrap();
}

/// `migrate` says when it changed a setting, refuses a newer schema and someone else's table
/// (exit 2, nothing changed), and a relay configured differently from the database says so.
#[tokio::test]
async fn migrate_reports_changes_and_refusals_and_the_relay_reports_drift() {
    let db = TestDb::new().await.unwrap();
    let out = run(outbox(&db.url)
        .arg("migrate")
        .env("OUTBOX_STRICT_KEY_ORDER", "true"));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("strict_key_order turned on") && !stderr(&out).contains("up to date"),
        "{}",
        stderr(&out)
    );
    // A relay whose configuration says otherwise warns at start, and still works.
    enqueue(&db, 1, 1).await;
    let out = run(outbox(&db.url)
        .args(["relay", "--drain", "--publisher", "null"])
        .env("OUTBOX_LOG", "warn"));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out)
            .contains("strict_key_order is off in this configuration but on in the database"),
        "{}",
        stderr(&out)
    );
    // A schema from a newer outbox: refused, naming both versions.
    sqlx::query("INSERT INTO outbox_schema_version (version, name) VALUES (999, 'future')")
        .execute(&db.pool)
        .await
        .unwrap();
    let out = run(outbox(&db.url).arg("migrate"));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let latest = outbox::postgres::latest_version();
    assert!(
        stderr(&out).contains("at version 999") && stderr(&out).contains(&format!("({latest})")),
        "{}",
        stderr(&out)
    );
    assert!(!stderr(&out).contains("up to date"));
    db.drop_db().await.unwrap();

    let other = TestDb::empty().await.unwrap();
    sqlx::query("CREATE TABLE outbox_event (id bigint PRIMARY KEY, body text)")
        .execute(&other.pool)
        .await
        .unwrap();
    let out = run(outbox(&other.url).arg("migrate"));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("already exists and is not the outbox's")
            && stderr(&out).contains("OUTBOX_SCHEMA"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        stderr(&out).matches("already exists").count(),
        1,
        "each cause once: {}",
        stderr(&out)
    );
    let out = run(outbox(&other.url)
        .arg("migrate")
        .env("OUTBOX_SCHEMA", "outbox"));
    assert!(out.status.success(), "{}", stderr(&out));
    other.drop_db().await.unwrap();
}
