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

/// The JSON lines a file publisher wrote, as (id, key, seq), in file order. Only lines ended by a
/// newline count: the last one may still be being written while a test polls the file. A line
/// that does not parse was torn by a SIGKILL in the middle of a write (the kernel stops a write to
/// a regular file between pages for a fatal signal); its events were never settled, so the next
/// relay publishes them again, and the caller's loss and order checks cover them.
fn read_lines(path: &Path) -> Vec<(uuid::Uuid, String, i64)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.split_inclusive('\n')
        .filter(|line| line.ends_with('\n'))
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .map(|v| {
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

async fn count(db: &TestDb, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(&db.pool).await.unwrap()
}

/// Waits for `child` up to `within`; kills it and returns `None` when it is still running.
fn wait_within(
    child: &mut std::process::Child,
    within: Duration,
) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn child_stderr(child: &mut std::process::Child) -> String {
    let mut text = String::new();
    if let Some(mut err) = child.stderr.take() {
        use std::io::Read;
        let _ = err.read_to_string(&mut text);
    }
    text
}

/// `relay --drain` exits 0 only when it drained: 1 when events are left retrying or dead (and
/// says what), 1 when store errors ended it, 2 for bad usage.
#[tokio::test]
async fn drain_exit_codes_say_whether_the_outbox_was_drained() {
    let db = TestDb::new().await.unwrap();
    let ids = enqueue(&db, 4, 1).await;
    let out = run(outbox(&db.url).args(["relay", "--drain", "--publisher", "kafka"]));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));

    // One event left dead, one waiting out a backoff; the other two are deliverable.
    sqlx::query(
        "UPDATE outbox_event SET status = 'dead', attempts = 10, last_error = 'boom' WHERE id = $1",
    )
    .bind(ids[0])
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query("UPDATE outbox_event SET status = 'parked', attempts = 1, last_error = 'flaky', available_at = now() + interval '1 hour' WHERE id = $1")
        .bind(ids[1])
        .execute(&db.pool)
        .await
        .unwrap();
    let out = run(outbox(&db.url).args(["relay", "--drain", "--publisher", "null"]));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("not drained"), "{err}");
    assert!(
        err.contains("1 dead") && err.contains("1 retrying after a failed attempt"),
        "{err}"
    );
    assert_eq!(count(&db, "SELECT count(*) FROM outbox_event").await, 2);

    // Nothing left but what is deliverable: drained.
    sqlx::query("DELETE FROM outbox_event")
        .execute(&db.pool)
        .await
        .unwrap();
    enqueue(&db, 2, 2).await;
    let out = run(outbox(&db.url).args(["relay", "--drain", "--publisher", "null"]));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    // The store refuses every settle: the drain gives up and must not claim success.
    enqueue(&db, 2, 2).await;
    sqlx::query(
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS
         $$ BEGIN RAISE EXCEPTION 'settles refused by the test'; END $$",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query("CREATE TRIGGER refuse BEFORE DELETE ON outbox_event FOR EACH ROW EXECUTE FUNCTION refuse()")
        .execute(&db.pool)
        .await
        .unwrap();
    let out = run(outbox(&db.url).args(["relay", "--drain", "--publisher", "null"]));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("not drained") && err.contains("store errors"),
        "{err}"
    );
    assert!(err.contains("4 pending left"), "{err}");
    db.drop_db().await.unwrap();
}

/// SIGTERM during `relay --drain`: the batch in flight is published and settled, nothing more is
/// claimed, and the exit code says the outbox was not drained.
#[tokio::test]
async fn sigterm_during_a_drain_settles_the_batch_and_exits() {
    let db = TestDb::new().await.unwrap();
    let ids = enqueue(&db, 50, 40).await; // 2000 events, one batch of one each
    let file = temp_file("drain-sigterm.jsonl");
    let mut child = outbox(&db.url)
        .args(["relay", "--drain", "--publisher"])
        .arg(format!("file:{}", file.display()))
        .env("OUTBOX_RELAY__BATCH_SIZE", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while read_lines(&file).len() < 20 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    signal(child.id(), "TERM");
    let status = wait_within(&mut child, Duration::from_secs(10));
    let err = child_stderr(&mut child);
    let status = status.unwrap_or_else(|| panic!("the drain did not stop after SIGTERM: {err}"));

    let written: Vec<uuid::Uuid> = read_lines(&file).iter().map(|l| l.0).collect();
    let unique: HashSet<uuid::Uuid> = written.iter().copied().collect();
    assert_eq!(unique.len(), written.len(), "an event was written twice");
    let left: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT id FROM outbox_event")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert!(
        left.iter().all(|id| !unique.contains(id)),
        "a written event was not settled before exit"
    );
    assert_eq!(unique.len() + left.len(), ids.len(), "events were lost");
    assert!(
        !left.is_empty(),
        "the drain finished before the signal; make it longer"
    );
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("interrupted by SIGTERM"), "{err}");
    std::fs::remove_file(file).ok();
    db.drop_db().await.unwrap();
}

/// A `relay --publisher stdout` whose standard output nobody reads, over 300 events large enough
/// that one batch fills the pipe: after 1.5 s its first write is blocked.
async fn relay_with_unread_stdout(db: &TestDb, env: &[(&str, &str)]) -> std::process::Child {
    let api = Outbox::new(Schema::default());
    let mut tx = db.pool.begin().await.unwrap();
    let events = (0..300).map(|i| {
        NewEvent::new("order", format!("k{i}"), "E")
            .payload(&serde_json::json!({ "pad": "x".repeat(2000) }))
            .unwrap()
    });
    api.enqueue_all(&mut tx, events).await.unwrap();
    tx.commit().await.unwrap();
    let child = outbox(&db.url)
        .args(["relay", "--publisher", "stdout"])
        .envs(env.iter().copied())
        .stdout(Stdio::piped()) // kept open, never read
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    child
}

/// A relay whose standard output nobody reads: after SIGTERM it exits within the publish
/// timeout and the shutdown grace, although the write is still blocked, and loses nothing.
#[tokio::test]
async fn shutdown_is_bounded_when_a_stdout_write_is_blocked() {
    let db = TestDb::new().await.unwrap();
    let mut child = relay_with_unread_stdout(&db, &[("OUTBOX_RELAY__PUBLISH_TIMEOUT", "1s")]).await;
    signal(child.id(), "TERM");
    let status = wait_within(&mut child, Duration::from_secs(10));
    let err = child_stderr(&mut child);
    assert!(
        status.is_some(),
        "the relay did not exit after SIGTERM: {err}"
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM outbox_event").await,
        300,
        "{err}"
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM outbox_event WHERE status = 'dead'"
        )
        .await,
        0
    );
    drop(child.stdout.take());
    db.drop_db().await.unwrap();
}

/// A second SIGTERM while the batch in flight cannot finish exits at once with 128 + 15.
#[tokio::test]
async fn a_second_signal_exits_at_once() {
    let db = TestDb::new().await.unwrap();
    let env = [
        ("OUTBOX_RELAY__PUBLISH_TIMEOUT", "60s"),
        ("OUTBOX_RELAY__TRANSACTION_TIMEOUT", "120s"),
    ];
    let mut child = relay_with_unread_stdout(&db, &env).await;
    signal(child.id(), "TERM");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        child.try_wait().unwrap().is_none(),
        "still finishing its batch"
    );
    let second = Instant::now();
    signal(child.id(), "TERM");
    let status = wait_within(&mut child, Duration::from_secs(5));
    let err = child_stderr(&mut child);
    let status = status.unwrap_or_else(|| panic!("a second SIGTERM did not exit at once: {err}"));
    assert!(second.elapsed() < Duration::from_secs(3));
    assert_eq!(status.code(), Some(143), "{err}");
    assert!(err.contains("second SIGTERM"), "{err}");
    // The unsettled batch went back with the connection: every event is still there.
    assert_eq!(count(&db, "SELECT count(*) FROM outbox_event").await, 300);
    db.drop_db().await.unwrap();
}

/// `outbox relay | head -2`: once the reader is gone, the relay stops with one clear line and
/// exit code 1; events it could not write stay pending, with no attempt charged.
#[tokio::test]
async fn relay_into_a_closed_pipe_stops_with_a_clear_message_and_loses_nothing() {
    use std::io::BufRead;
    let db = TestDb::new().await.unwrap();
    enqueue(&db, 5, 20).await; // 100 events
    let mut child = outbox(&db.url)
        .args(["relay", "--publisher", "stdout"])
        .env("OUTBOX_RELAY__BATCH_SIZE", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        for _ in 0..2 {
            lines.next().unwrap().unwrap();
        }
    } // `head -2` exits: the read end closes
    let status = wait_within(&mut child, Duration::from_secs(15));
    let err = child_stderr(&mut child);
    let status = status.unwrap_or_else(|| panic!("the relay kept running: {err}"));
    assert_eq!(status.code(), Some(1), "{err}");
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{err}");
    assert!(errors[0].contains("broken pipe"), "{err}");
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM outbox_event WHERE status <> 'pending' OR attempts > 0"
        )
        .await,
        0,
        "an event was charged for the closed pipe"
    );
    assert!(count(&db, "SELECT count(*) FROM outbox_event").await > 0);
    db.drop_db().await.unwrap();
}

/// `--publisher file:FIFO`: a FIFO cannot be fsynced; every event is delivered once and the drain
/// exits 0.
#[tokio::test]
async fn the_file_publisher_writes_to_a_fifo() {
    use std::io::BufRead;
    let db = TestDb::new().await.unwrap();
    let ids = enqueue(&db, 5, 10).await;
    let fifo = temp_file("events.fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let reader_path = fifo.clone();
    let reader = std::thread::spawn(move || {
        let file = std::fs::File::open(reader_path).unwrap();
        std::io::BufReader::new(file)
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(&l.unwrap()).unwrap()["id"]
                    .as_str()
                    .unwrap()
                    .parse::<uuid::Uuid>()
                    .unwrap()
            })
            .collect::<Vec<_>>()
    });
    let out = run(outbox(&db.url)
        .args(["relay", "--drain", "--publisher"])
        .arg(format!("file:{}", fifo.display()))
        .env("OUTBOX_RELAY__BATCH_SIZE", "7"));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let read = reader.join().unwrap();
    assert_eq!(read, ids, "every event once, in order");
    assert_eq!(count(&db, "SELECT count(*) FROM outbox_event").await, 0);
    std::fs::remove_file(fifo).ok();
    db.drop_db().await.unwrap();
}

/// `outbox config | head -1` and the other printing commands: a reader that went away ends the
/// command quietly (exit 0, no panic, no backtrace).
#[tokio::test]
async fn printing_into_a_closed_pipe_exits_quietly() {
    let db = TestDb::new().await.unwrap();
    enqueue(&db, 1, 1).await;
    sqlx::query("UPDATE outbox_event SET status = 'dead', last_error = 'x'")
        .execute(&db.pool)
        .await
        .unwrap();
    for args in [
        &["config"][..],
        &["status"],
        &["dead", "list"],
        &["dead", "list", "--json"],
        &["migrate", "--print"],
    ] {
        let mut child = outbox(&db.url)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take()); // the reader is gone before anything is written
        let status = wait_within(&mut child, Duration::from_secs(10));
        let err = child_stderr(&mut child);
        let status = status.unwrap_or_else(|| panic!("{args:?} did not exit: {err}"));
        assert!(
            !err.contains("panicked") && !err.contains("backtrace"),
            "{args:?}: {err}"
        );
        assert_eq!(status.code(), Some(0), "{args:?}: {err}");
    }
    db.drop_db().await.unwrap();
}

/// `OUTBOX_LOG_FORMAT=json`: every line on standard error is a JSON object: the start line names
/// profile, schema, redacted database, publisher and destinations; the summary and the shutdown
/// line carry counters as fields. Text logs on a pipe have no colour codes. A bad `OUTBOX_LOG` or
/// `OUTBOX_LOG_FORMAT` is a usage error naming the variable.
#[tokio::test]
async fn logs_are_json_lines_or_plain_text_and_bad_log_settings_exit_2() {
    let db = TestDb::new().await.unwrap();
    enqueue(&db, 3, 3).await;
    let with_password = db.url.replacen("postgres@", "postgres:hunter2@", 1);
    let file = temp_file("json-logs.jsonl");
    let mut child = outbox(&with_password)
        .args(["relay", "--summary-interval", "1s", "--publisher"])
        .arg(format!("file:{}", file.display()))
        .env("OUTBOX_LOG", "info")
        .env("OUTBOX_LOG_FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while read_lines(&file).len() < 9 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(2500)); // at least one summary interval
    signal(child.id(), "TERM");
    let status = wait_within(&mut child, Duration::from_secs(10));
    let err = child_stderr(&mut child);
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{err}");
    assert!(!err.contains("hunter2"), "the password leaked: {err}");
    let lines: Vec<serde_json::Value> = err
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let find = |message: &str| {
        lines
            .iter()
            .find(|l| l["message"] == message)
            .unwrap_or_else(|| panic!("no {message:?} line in {err}"))
    };
    let start = find("outbox relay starting");
    assert_eq!(start["profile"], "local");
    assert_eq!(start["schema"], "public");
    assert_eq!(start["publisher"], format!("file:{}", file.display()));
    assert_eq!(start["destinations"], file.display().to_string());
    assert!(
        start["database"]
            .as_str()
            .unwrap()
            .contains("postgres:***@"),
        "{start}"
    );
    assert!(
        start["level"] == "INFO" && start["timestamp"].is_string(),
        "{start}"
    );
    // One line per interval in which something changed: together they count every event, and
    // the last one shows the empty backlog.
    let summaries: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["message"] == "relay summary")
        .collect();
    let published: u64 = summaries
        .iter()
        .map(|l| l["published"].as_u64().unwrap())
        .sum();
    assert_eq!(published, 9, "{err}");
    let last = summaries.last().unwrap();
    assert_eq!(last["backlog_pending"], 0, "{last}");
    assert_eq!(last["backlog_dead"], 0, "{last}");
    let stopped = find("relay stopped");
    assert_eq!(stopped["published"], 9, "{stopped}");
    assert_eq!(stopped["dead"], 0, "{stopped}");

    // Text on a pipe: no ANSI escape sequences.
    let out = run(outbox(&db.url)
        .args(["relay", "--drain", "--publisher", "null"])
        .env("OUTBOX_LOG", "info"));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("drain finished"), "{}", stderr(&out));
    assert!(!stderr(&out).contains('\u{1b}'), "{:?}", stderr(&out));

    for (var, value) in [
        ("OUTBOX_LOG", "infoo"),
        ("OUTBOX_LOG", "info,sqlx=lots"),
        ("OUTBOX_LOG_FORMAT", "yaml"),
    ] {
        let out = run(outbox(&db.url).args(["status"]).env(var, value));
        assert_eq!(
            out.status.code(),
            Some(2),
            "{var}={value}: {}",
            stderr(&out)
        );
        assert!(
            stderr(&out).contains(var),
            "{var}={value}: {}",
            stderr(&out)
        );
    }
    std::fs::remove_file(file).ok();
    db.drop_db().await.unwrap();
}

/// `outbox dead ...`: list with filters, show one, replay several (naming the ids it did not
/// find), delete by filter with a dry run and a confirmation that a script must give with --yes.
#[tokio::test]
async fn dead_letter_commands_list_show_replay_and_delete() {
    let db = TestDb::new().await.unwrap();
    let outbox_api = Outbox::new(Schema::default());
    let mut tx = db.pool.begin().await.unwrap();
    let mut ids = Vec::new();
    for (key, ty) in [
        ("o-1", "OrderPlaced"),
        ("o-2", "OrderPaid"),
        ("o-3", "OrderPaid"),
        ("o-4", "OrderShipped"),
    ] {
        let event = NewEvent::new("order", key, ty)
            .payload(&serde_json::json!({ "order": key, "cents": 1250 }))
            .unwrap()
            .header("traceparent", "00-abc-01")
            .destination("orders");
        ids.push(outbox_api.enqueue(&mut tx, event).await.unwrap());
    }
    tx.commit().await.unwrap();
    sqlx::query(
        "UPDATE outbox_event SET status = 'dead', attempts = 10,
             last_error = CASE aggregate_id WHEN 'o-1' THEN 'gave up after 10 attempts: Timeout talking to SQS'
                                            ELSE 'permanent failure: message too large' END",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let list = |args: &[&str]| -> Vec<uuid::Uuid> {
        let out = run(outbox(&db.url).args(["dead", "list", "--json"]).args(args));
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        let v: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        v.iter()
            .map(|e| e["id"].as_str().unwrap().parse().unwrap())
            .collect()
    };
    assert_eq!(list(&[]), ids);
    assert_eq!(list(&["--type", "OrderPaid"]), ids[1..3].to_vec());
    assert_eq!(list(&["--key", "order/o-3"]), vec![ids[2]]);
    assert_eq!(list(&["--key", "order"]), ids);
    assert_eq!(list(&["--error", "TIMEOUT"]), vec![ids[0]]);
    assert_eq!(list(&["--since", "1h"]), ids);
    assert!(list(&["--since", "2999-01-01"]).is_empty());
    assert_eq!(list(&["--type", "OrderPaid", "--limit", "1"]), vec![ids[1]]);
    for bad in [
        &["--limit", "0"][..],
        &["--limit", "10001"],
        &["--key", "order/"],
        &["--since", "soon"],
    ] {
        let out = run(outbox(&db.url).args(["dead", "list"]).args(bad));
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {}", stderr(&out));
    }

    let out = run(outbox(&db.url)
        .args(["dead", "show"])
        .arg(ids[0].to_string()));
    assert!(out.status.success(), "{}", stderr(&out));
    let shown = String::from_utf8_lossy(&out.stdout);
    for part in [
        "order/o-1",
        "OrderPlaced",
        "orders",
        "attempts     10",
        "Timeout talking to SQS",
        "traceparent",
        "\"cents\": 1250",
    ] {
        assert!(shown.contains(part), "missing {part:?} in {shown}");
    }
    let out = run(outbox(&db.url)
        .args(["dead", "show", "--json"])
        .arg(ids[0].to_string()));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["payload"]["cents"], 1250);
    assert_eq!(v["headers"]["traceparent"], "00-abc-01");
    assert_eq!(v["destination"], "orders");
    let unknown = uuid::Uuid::now_v7();
    let out = run(outbox(&db.url)
        .args(["dead", "show"])
        .arg(unknown.to_string()));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&unknown.to_string()),
        "{}",
        stderr(&out)
    );

    // Replay two ids and one that is not dead: the two are replayed, the third is named, exit 1.
    let out = run(outbox(&db.url)
        .args(["dead", "replay", &ids[0].to_string(), &unknown.to_string()])
        .args(["--id", &ids[3].to_string()]));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&unknown.to_string()),
        "{}",
        stderr(&out)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("replayed 2 dead events"));
    let replayed: Vec<(uuid::Uuid, String, i32, Option<String>)> = sqlx::query_as(
        "SELECT id, status, attempts, last_error FROM outbox_event WHERE id = ANY($1) ORDER BY seq",
    )
    .bind(vec![ids[0], ids[3]])
    .fetch_all(&db.pool)
    .await
    .unwrap();
    for (id, status, attempts, error) in replayed {
        assert_eq!(
            (status.as_str(), attempts, error),
            ("pending", 0, None),
            "{id}"
        );
    }
    let out = run(outbox(&db.url).args(["dead", "replay"]));
    assert_eq!(
        out.status.code(),
        Some(2),
        "a replay needs ids, a filter or --all"
    );

    // Delete: refused without a terminal or --yes, a dry run changes nothing, --yes deletes.
    let dead = "SELECT count(*) FROM outbox_event WHERE status = 'dead'";
    let out = run(outbox(&db.url)
        .args(["dead", "delete", "--type", "OrderPaid"])
        .stdin(Stdio::null()));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--yes"), "{}", stderr(&out));
    assert_eq!(count(&db, dead).await, 2);
    let out = run(outbox(&db.url).args(["dead", "delete", "--dry-run", "--type", "OrderPaid"]));
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("would delete 2") && text.contains(&ids[2].to_string()),
        "{text}"
    );
    assert_eq!(count(&db, dead).await, 2);
    let out =
        run(outbox(&db.url).args(["dead", "delete", "--yes", "--json", "--key", "order/o-2"]));
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["deleted"], serde_json::json!([ids[1].to_string()]));
    assert_eq!(count(&db, dead).await, 1);
    let out = run(outbox(&db.url).args(["dead", "delete", "--yes"]));
    assert_eq!(
        out.status.code(),
        Some(2),
        "a delete needs ids, a filter or --all"
    );
    assert_eq!(count(&db, dead).await, 1);
    db.drop_db().await.unwrap();
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

/// A command that needs no configuration and no database: a configuration file that does not
/// exist and an unreachable database must not matter.
fn outbox_without_configuration() -> Command {
    let mut cmd = outbox("postgres://nobody@127.0.0.1:1/none");
    cmd.env("OUTBOX_CONFIG", "/nonexistent/outbox.toml");
    cmd
}

#[test]
fn completions_for_each_shell_and_the_man_page_come_from_the_cli_definition() {
    for shell in ["bash", "zsh", "fish"] {
        let out = run(outbox_without_configuration().args(["completions", shell]));
        assert!(out.status.success(), "{shell}: {}", stderr(&out));
        let script = String::from_utf8(out.stdout).unwrap();
        for word in [
            "migrate",
            "relay",
            "dead",
            "replay",
            "database-url",
            "drain",
        ] {
            assert!(script.contains(word), "{shell} completions lack {word}");
        }
    }
    let out = run(outbox_without_configuration().args(["completions", "tcsh"]));
    assert_eq!(
        out.status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );
    let err = stderr(&out);
    assert!(err.contains("tcsh") && err.contains("bash"), "{err}");
    let out = run(outbox_without_configuration().arg("completions"));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));

    let out = run(outbox_without_configuration().arg("man"));
    assert!(out.status.success(), "{}", stderr(&out));
    let page = String::from_utf8(out.stdout).unwrap();
    assert!(
        page.starts_with(".ie") || page.contains(".TH outbox"),
        "{page}"
    );
    for word in [
        "migrate",
        "relay",
        "DATABASE_URL",
        "OUTBOX_LOG",
        "Exit codes",
    ] {
        assert!(page.contains(word), "the man page lacks {word}");
    }
    // Rendered as `man` would: groff reports malformed roff as warnings on standard error.
    if Command::new("groff").arg("--version").output().is_ok() {
        let mut groff = Command::new("groff")
            .args(["-man", "-Tutf8", "-ww"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        groff
            .stdin
            .take()
            .unwrap()
            .write_all(page.as_bytes())
            .unwrap();
        let rendered = groff.wait_with_output().unwrap();
        assert!(rendered.status.success());
        assert_eq!(stderr(&rendered), "", "groff warnings");
        assert!(String::from_utf8_lossy(&rendered.stdout).contains("DATABASE_URL"));
    }
}

#[test]
fn help_names_the_database_url_the_log_variables_and_the_exit_codes() {
    let out = run(outbox_without_configuration().arg("--help"));
    assert!(out.status.success(), "{}", stderr(&out));
    let help = String::from_utf8(out.stdout).unwrap();
    for word in [
        "--database-url",
        "DATABASE_URL",
        "OUTBOX_LOG",
        "OUTBOX_LOG_FORMAT",
        "NO_COLOR",
        "Exit codes",
        "completions",
        "man",
    ] {
        assert!(help.contains(word), "--help lacks {word}:\n{help}");
    }
}

#[test]
fn no_color_turns_off_the_colours_of_messages() {
    // CLICOLOR_FORCE asks for colours without a terminal; NO_COLOR must still win.
    let out = run(outbox_without_configuration()
        .arg("no-such-command")
        .env("CLICOLOR_FORCE", "1"));
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("\u{1b}["),
        "colours were forced: {}",
        stderr(&out)
    );
    let out = run(outbox_without_configuration()
        .arg("no-such-command")
        .env("CLICOLOR_FORCE", "1")
        .env("NO_COLOR", "1"));
    assert_eq!(out.status.code(), Some(2));
    assert!(!stderr(&out).contains('\u{1b}'), "{}", stderr(&out));
    assert!(stderr(&out).contains("no-such-command"), "{}", stderr(&out));
}

#[tokio::test]
async fn the_database_url_flag_wins_over_the_environment() {
    let db = TestDb::empty().await.unwrap();
    let unreachable = "postgres://nobody@127.0.0.1:1/none";
    // Without the flag, the environment's database is used (and fails): the flag makes the difference.
    let out = run(outbox(unreachable).arg("migrate"));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));

    let out = run(outbox(unreachable)
        .env("OUTBOX_DATABASE__URL", unreachable)
        .args(["--database-url", &db.url, "migrate"]));
    assert!(out.status.success(), "{}", stderr(&out));
    // A global option: after the subcommand too.
    let out = run(outbox(unreachable).args(["status", "--json", "--database-url", &db.url]));
    assert!(out.status.success(), "{}", stderr(&out));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["pending"], 0);

    // Only the flag's URL is checked (not the environment's broken one), and a problem names it.
    let out = run(outbox("mysql://root@127.0.0.1/app").args([
        "--database-url",
        "postgres://u:hunter2@127.0.0.1:5432/app",
        "config",
    ]));
    assert!(out.status.success(), "{}", stderr(&out));
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains("postgres://u:***@127.0.0.1:5432/app"),
        "{shown}"
    );
    assert!(!shown.contains("hunter2"));
    let out =
        run(outbox(&db.url).args(["--database-url", "mysql://root:hunter2@h/app", "migrate"]));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("database.url") && err.contains("(set by --database-url)"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "{err}");
    db.drop_db().await.unwrap();
}

/// The producers of a Debezium-layout outbox table, as they were written before the outbox existed:
/// plain SQL, the same statements before and after `outbox adopt`.
const DEBEZIUM_TABLE: &str = "CREATE TABLE app.outboxevent (
    id uuid PRIMARY KEY,
    aggregatetype varchar(255) NOT NULL,
    aggregateid varchar(255) NOT NULL,
    type varchar(255) NOT NULL,
    payload jsonb
)";

async fn debezium_produce(db: &TestDb, key: &str, n: usize) -> Vec<uuid::Uuid> {
    let mut ids = Vec::new();
    let mut tx = db.pool.begin().await.unwrap();
    for i in 0..n {
        let id = uuid::Uuid::new_v4();
        sqlx::query(
            "INSERT INTO app.outboxevent (id, aggregatetype, aggregateid, type, payload)
             VALUES ($1, 'Order', $2, 'OrderLineAdded', $3::jsonb)",
        )
        .bind(id)
        .bind(key)
        .bind(serde_json::json!({ "order": key, "line": i }).to_string())
        .execute(&mut *tx)
        .await
        .unwrap();
        ids.push(id);
    }
    tx.commit().await.unwrap();
    ids
}

#[tokio::test]
async fn an_adopted_debezium_table_is_relayed_in_key_order_and_its_producers_keep_working() {
    let db = TestDb::empty().await.unwrap();
    sqlx::raw_sql(&format!("CREATE SCHEMA app; {DEBEZIUM_TABLE}"))
        .execute(&db.pool)
        .await
        .unwrap();
    // Before the outbox: the producers work, and their rows are not the relay's business.
    let before = debezium_produce(&db, "o-0", 2).await;
    // The outbox in a schema of its own, next to the existing table.
    let cmd = |args: &[&str]| {
        let mut cmd = outbox(&db.url);
        cmd.env("OUTBOX_SCHEMA", "outbox").args(args);
        cmd
    };
    let out = run(&mut cmd(&["adopt", "app.outboxevent"]));
    assert_eq!(
        out.status.code(),
        Some(2),
        "adopting before migrate: {}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("outbox migrate"), "{}", stderr(&out));
    let out = run(&mut cmd(&["migrate"]));
    assert!(out.status.success(), "{}", stderr(&out));
    let out = run(&mut cmd(&["adopt", "app.outboxevent"]));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("adopted"), "{}", stderr(&out));
    // Idempotent: adopting again replaces the trigger, it does not add a second copy.
    let out = run(&mut cmd(&["adopt", "app.outboxevent"]));
    assert!(out.status.success(), "{}", stderr(&out));

    // Producers as before: several keys, several events per key, one transaction per batch.
    let mut expected: HashMap<String, Vec<uuid::Uuid>> = HashMap::new();
    for round in 0..3 {
        for k in 1..=4 {
            let key = format!("o-{k}");
            let ids = debezium_produce(&db, &key, round + 1).await;
            expected.entry(key).or_default().extend(ids);
        }
    }
    // The common Debezium pattern: insert and delete in one transaction (the log keeps the insert).
    let deleted = uuid::Uuid::new_v4();
    let mut tx = db.pool.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO app.outboxevent (id, aggregatetype, aggregateid, type, payload)
         VALUES ($1, 'Order', 'o-1', 'OrderShipped', '{\"order\": \"o-1\"}')",
    )
    .bind(deleted)
    .execute(&mut *tx)
    .await
    .unwrap();
    sqlx::query("DELETE FROM app.outboxevent WHERE id = $1")
        .bind(deleted)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    expected.get_mut("o-1").unwrap().push(deleted);
    // A producer role with rights on its own table needs no grant on outbox_event (the copy runs
    // with the rights of the role that adopted the table), only the two the README names for the
    // wake-up trigger, which runs at commit as the producer's role.
    let role = format!("outbox_test_producer_{}", uuid::Uuid::new_v4().simple());
    sqlx::raw_sql(&format!(
        "CREATE ROLE {role}; GRANT USAGE ON SCHEMA app TO {role}; GRANT INSERT ON app.outboxevent TO {role};"
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    let insert_as_producer = |id: uuid::Uuid| {
        let pool = db.pool.clone();
        let role = role.clone();
        async move {
            let mut tx = pool.begin().await?;
            sqlx::query(&format!("SET LOCAL ROLE {role}"))
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "INSERT INTO app.outboxevent (id, aggregatetype, aggregateid, type, payload)
                 VALUES ($1, 'Order', 'o-2', 'OrderLineAdded', '{\"order\": \"o-2\"}')",
            )
            .bind(id)
            .execute(&mut *tx)
            .await?;
            tx.commit().await
        }
    };
    // A relay waiting for notifications (its request is the sequence, a deadline in ms), as in
    // production: the wake-up runs at commit as the producer's role.
    sqlx::query(
        "SELECT setval('outbox.outbox_wakeup_wanted_ms', \
         (extract(epoch FROM clock_timestamp()) * 1000)::bigint + 600000)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let err = insert_as_producer(uuid::Uuid::new_v4()).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("permission denied for schema outbox"),
        "{err}"
    );
    sqlx::raw_sql(&format!(
        "GRANT USAGE ON SCHEMA outbox TO {role};
         GRANT SELECT ON SEQUENCE outbox.outbox_wakeup_wanted_ms TO {role};"
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    let restricted = uuid::Uuid::new_v4();
    insert_as_producer(restricted).await.unwrap();
    expected.get_mut("o-2").unwrap().push(restricted);
    // A rolled-back producer transaction leaves no event.
    let mut tx = db.pool.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO app.outboxevent (id, aggregatetype, aggregateid, type, payload)
         VALUES ($1, 'Order', 'o-9', 'Never', '{}')",
    )
    .bind(uuid::Uuid::new_v4())
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.rollback().await.unwrap();

    let file = temp_file("adopted.jsonl");
    let out = run(&mut cmd(&[
        "relay",
        "--drain",
        "--publisher",
        &format!("file:{}", file.display()),
    ]));
    assert!(out.status.success(), "{}", stderr(&out));
    let text = std::fs::read_to_string(&file).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut published: HashMap<String, Vec<uuid::Uuid>> = HashMap::new();
    for line in &lines {
        assert_eq!(line["aggregate_type"], "Order");
        let key = line["aggregate_id"].as_str().unwrap().to_owned();
        let id: uuid::Uuid = line["id"].as_str().unwrap().parse().unwrap();
        assert!(
            !before.contains(&id),
            "a row inserted before adoption was copied"
        );
        if id != deleted {
            assert_eq!(line["event_type"], "OrderLineAdded");
            assert_eq!(line["payload"]["order"], key.as_str());
        }
        published.entry(key).or_default().push(id);
    }
    assert_eq!(
        published, expected,
        "every adopted row once, with its own id, in insert order per key"
    );

    // The producers still write their table; a row the outbox contract refuses fails the
    // producer's insert (the event must exist if and only if the change commits), naming the rule.
    let err = sqlx::query(
        "INSERT INTO app.outboxevent (id, aggregatetype, aggregateid, type, payload)
         VALUES ($1, 'Order', 'o-1', 'Bad', '[1, 2]')",
    )
    .bind(uuid::Uuid::new_v4())
    .execute(&db.pool)
    .await
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("outbox_event_payload_must_be_object"),
        "{err}"
    );

    // Removing the adoption stops the copies; the producers are unaffected.
    let out = run(&mut cmd(&["adopt", "app.outboxevent", "--remove"]));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no longer adopted"),
        "{}",
        stderr(&out)
    );
    debezium_produce(&db, "o-1", 1).await;
    let copied: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox.outbox_event")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(copied, 0, "a row inserted after --remove was copied");
    std::fs::remove_file(file).ok();
    db.drop_db().await.unwrap();
    let admin = sqlx::PgPool::connect(&outbox_testkit::admin_url())
        .await
        .unwrap();
    sqlx::query(&format!("DROP ROLE {role}"))
        .execute(&admin)
        .await
        .unwrap();
}

#[tokio::test]
async fn adopting_a_table_that_does_not_fit_names_the_problem_and_changes_nothing() {
    let db = TestDb::empty().await.unwrap();
    sqlx::raw_sql(
        "CREATE SCHEMA app;
         CREATE TABLE app.events (id uuid PRIMARY KEY, aggregate_type text, aggregatetype text,
                                  type text, payload bytea, body jsonb);",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let cmd = |args: &[&str]| {
        let mut cmd = outbox(&db.url);
        cmd.env("OUTBOX_SCHEMA", "outbox").args(args);
        cmd
    };
    assert!(run(&mut cmd(&["migrate"])).status.success());

    let out = run(&mut cmd(&["adopt", "app.nosuchtable"]));
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("\"app\".\"nosuchtable\" does not exist"),
        "{}",
        stderr(&out)
    );
    // Debezium's column names, but the table lacks `aggregateid`: named, with the option to map it.
    let out = run(&mut cmd(&["adopt", "app.events"]));
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("no column `aggregateid`") && err.contains("--aggregate-id COLUMN"),
        "{err}"
    );
    assert!(
        err.contains("the table has: id, aggregate_type, aggregatetype, type, payload, body"),
        "{err}"
    );
    // A payload column that cannot hold JSON.
    let out = run(&mut cmd(&[
        "adopt",
        "app.events",
        "--aggregate-id",
        "aggregate_type",
    ]));
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("column `payload` of \"app\".\"events\" is of type bytea"),
        "{}",
        stderr(&out)
    );
    let triggers: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'app.events'::regclass AND NOT tgisinternal",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(triggers, 0, "a refused adoption installed a trigger");

    // Mapped right, --print shows the SQL and installs nothing.
    let out = run(&mut cmd(&[
        "adopt",
        "app.events",
        "--aggregate-id",
        "aggregate_type",
        "--payload",
        "body",
        "--print",
    ]));
    assert!(out.status.success(), "{}", stderr(&out));
    let sql = String::from_utf8_lossy(&out.stdout);
    assert!(
        sql.contains("AFTER INSERT ON \"app\".\"events\"") && sql.contains("NEW.\"body\""),
        "{sql}"
    );
    let triggers: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'app.events'::regclass AND NOT tgisinternal",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(triggers, 0, "--print installed a trigger");
    db.drop_db().await.unwrap();
}

/// A free loopback port (bound and released; the relay binds it right after).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// GET over a fresh connection: status code and body, or `None` while nothing listens.
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_owned()))
}

#[tokio::test]
async fn relay_admin_listener_serves_health_and_metrics_and_stays_on_loopback() {
    let db = TestDb::new().await.unwrap();
    enqueue(&db, 2, 3).await;

    // Not loopback, not allowed: refused before anything runs, saying how to allow it.
    let out = run(outbox(&db.url).args([
        "relay",
        "--publisher",
        "null",
        "--admin-listen",
        "0.0.0.0:9187",
    ]));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("admin.allow_remote = true"),
        "{}",
        stderr(&out)
    );
    let out = run(outbox(&db.url)
        .args(["relay", "--publisher", "null"])
        .env("OUTBOX_ADMIN__LISTEN", "0.0.0.0:9187"));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("admin.listen"), "{}", stderr(&out));

    let port = free_port();
    let mut child = outbox(&db.url)
        .args(["relay", "--publisher", "null", "--admin-listen"])
        .arg(format!("127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let metrics = loop {
        let published = http_get(port, "/metrics").filter(|(code, body)| {
            *code == 200
                && body.contains("outbox_events_published_total{destination=\"default\"} 6")
        });
        if let Some((_, body)) = published {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "no metrics with 6 published events"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(metrics.contains("outbox_relay_info{"), "{metrics}");
    assert!(metrics.contains("profile=\"local\""), "{metrics}");
    assert_eq!(http_get(port, "/health/live").map(|r| r.0), Some(200));
    let (code, body) = http_get(port, "/health/ready").unwrap();
    assert_eq!(code, 200, "{body}");
    let (code, page) = http_get(port, "/").unwrap();
    assert!(code == 200 && page.contains("outbox console"), "{page}");
    signal(child.id(), "TERM");
    let status = wait_within(&mut child, Duration::from_secs(20));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "{}",
        child_stderr(&mut child)
    );
    db.drop_db().await.unwrap();
}

#[tokio::test]
async fn status_shows_blocked_keys_and_watch_refreshes_until_ctrl_c() {
    let db = TestDb::new().await.unwrap();
    enqueue(&db, 2, 3).await;
    // k0's head is dead; its later events wait behind it (as the relay parks them).
    sqlx::query("UPDATE outbox_event SET status = 'dead', last_error = 'x' WHERE seq = (SELECT min(seq) FROM outbox_event WHERE aggregate_id = 'k0')")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE outbox_event SET status = 'parked', available_at = 'infinity' WHERE aggregate_id = 'k0' AND status = 'pending'")
        .execute(&db.pool)
        .await
        .unwrap();
    let out = run(outbox(&db.url).args(["status", "--json"]));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["keys_blocked"], 1, "{status}");
    assert_eq!(
        status["blocked_keys"],
        serde_json::json!(["order/k0"]),
        "{status}"
    );
    assert_eq!(
        status["dead_by_destination"],
        serde_json::json!({"-": 1}),
        "{status}"
    );
    let out = run(outbox(&db.url).arg("status"));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("keys blocked              1") && text.contains("order/k0"),
        "{text}"
    );

    let mut child = outbox(&db.url)
        .args(["status", "--watch"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Two refreshes: the second has a rate.
    let mut rates = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while rates.len() < 2 {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx.recv_timeout(left).expect("status --watch refreshes");
        if let Some(rate) = line.strip_prefix("published/s") {
            rates.push(rate.trim().to_owned());
        }
    }
    assert_eq!(rates[0], "-", "no rate before a second reading");
    assert_eq!(
        rates[1], "0.0",
        "nothing was published between the readings"
    );
    signal(child.id(), "INT");
    let status = wait_within(&mut child, Duration::from_secs(10));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "{}",
        child_stderr(&mut child)
    );
    db.drop_db().await.unwrap();
}

#[tokio::test]
async fn the_admin_token_is_never_shown_and_bad_admin_settings_exit_2() {
    let db = TestDb::new().await.unwrap();
    let token = "s3cret-admin-token-0123456789";
    let out = run(outbox(&db.url)
        .arg("config")
        .env("OUTBOX_ADMIN__TOKEN", token)
        .env("OUTBOX_ADMIN__LISTEN", "127.0.0.1:9187"));
    assert!(out.status.success(), "{}", stderr(&out));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
    assert!(!text.contains(token), "{text}");
    let config: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(config["admin"]["token"], "***");
    assert_eq!(config["admin"]["listen"], "127.0.0.1:9187");

    let out = run(outbox(&db.url)
        .arg("config")
        .env("OUTBOX_ADMIN__TOKEN", "tiny-tok3n")
        .env("OUTBOX_ADMIN__STALL_AFTER", "0s"));
    assert_eq!(out.status.code(), Some(2));
    let text = stderr(&out);
    assert!(
        text.contains("`admin.token`") && text.contains("`admin.stall_after`"),
        "{text}"
    );
    assert!(!text.contains("tiny-tok3n"), "{text}");
    db.drop_db().await.unwrap();
}

/// A collector's OTLP/HTTP traces endpoint on 127.0.0.1: every request it decodes, kept in order.
#[cfg(feature = "otlp")]
async fn otlp_receiver() -> (
    std::net::SocketAddr,
    std::sync::Arc<
        std::sync::Mutex<
            Vec<opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest>,
        >,
    >,
) {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use prost::Message;
    let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = received.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| async move {
            match ExportTraceServiceRequest::decode(body) {
                Ok(request) => {
                    sink.lock().unwrap().push(request);
                    // An empty ExportTraceServiceResponse: everything was accepted.
                    (
                        axum::http::StatusCode::OK,
                        [("content-type", "application/x-protobuf")],
                    )
                }
                Err(_) => (
                    axum::http::StatusCode::BAD_REQUEST,
                    [("content-type", "text/plain")],
                ),
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, received)
}

/// Issue 10: with `[telemetry] otlp_endpoint`, `outbox relay` exports its `publish` span to the
/// collector: a producer span linked to the trace of the event it published, with the service's
/// name and version. The batch processor's schedule is set beyond the test, so the span can only
/// come from the flush of the graceful stop (SIGTERM).
#[cfg(feature = "otlp")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_exports_its_publish_span_linked_to_the_events_trace_over_otlp() {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    use opentelemetry_proto::tonic::trace::v1::span::SpanKind;

    let (addr, received) = otlp_receiver().await;
    let db = TestDb::new().await.unwrap();
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut tx = db.pool.begin().await.unwrap();
    let event = NewEvent::new("order", "o-1", "OrderPlaced")
        .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
        .payload(&serde_json::json!({ "order_id": "o-1" }))
        .unwrap();
    Outbox::new(Schema::default())
        .enqueue(&mut tx, event)
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let config = temp_file("otlp.toml");
    std::fs::write(
        &config,
        format!(
            "[default.telemetry]\notlp_endpoint = \"http://{addr}\"\nservice_name = \"outbox-test\"\n"
        ),
    )
    .unwrap();
    let mut child = outbox(&db.url)
        .arg("--config")
        .arg(&config)
        .args(["relay", "--publisher", "null"])
        .env("OTEL_BSP_SCHEDULE_DELAY", "600000")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while count(&db, "SELECT count(*) FROM outbox_event").await > 0 {
        assert!(Instant::now() < deadline, "the event was not published");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        received.lock().unwrap().is_empty(),
        "exported before the stop: the test no longer shows the flush on exit"
    );
    signal(child.id(), "TERM");
    let status = wait_within(&mut child, Duration::from_secs(20));
    let err = child_stderr(&mut child);
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{err}");

    let requests = received.lock().unwrap().clone();
    let resource_spans: Vec<_> = requests.iter().flat_map(|r| &r.resource_spans).collect();
    let publish = resource_spans
        .iter()
        .flat_map(|rs| rs.scope_spans.iter().flat_map(|ss| &ss.spans))
        .find(|span| span.name == "publish")
        .unwrap_or_else(|| panic!("no publish span was exported: {requests:?}\n{err}"));
    assert_eq!(publish.kind, SpanKind::Producer as i32);
    let linked: Vec<String> = publish
        .links
        .iter()
        .map(|link| link.trace_id.iter().map(|b| format!("{b:02x}")).collect())
        .collect();
    assert_eq!(linked, vec![trace_id.to_owned()], "{publish:?}");
    let attribute = |key: &str| {
        resource_spans[0]
            .resource
            .as_ref()
            .and_then(|r| r.attributes.iter().find(|a| a.key == key))
            .and_then(|a| a.value.as_ref()?.value.clone())
    };
    assert_eq!(
        attribute("service.name"),
        Some(Value::StringValue("outbox-test".into()))
    );
    assert_eq!(
        attribute("service.version"),
        Some(Value::StringValue(env!("CARGO_PKG_VERSION").into()))
    );
    std::fs::remove_file(config).ok();
    db.drop_db().await.unwrap();
}

/// `telemetry.otlp_endpoint` must be an http(s) URL: anything else stops the relay (and
/// `outbox config`) before it starts, naming the key and where it was set.
#[test]
fn a_telemetry_endpoint_that_is_not_an_http_url_is_refused_at_start_up() {
    for command in [&["relay", "--publisher", "null"][..], &["config"]] {
        let out = run(outbox("postgres://postgres@127.0.0.1:1/none")
            .args(command)
            .env("OUTBOX_TELEMETRY__OTLP_ENDPOINT", "ftp://x"));
        assert_eq!(out.status.code(), Some(2), "{command:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(
            err.contains("`telemetry.otlp_endpoint`")
                && err.contains("OUTBOX_TELEMETRY__OTLP_ENDPOINT")
                && err.contains("not an http:// or https:// URL"),
            "{command:?}: {err}"
        );
    }
}
