//! The emulator goes down for far longer than the whole attempt budget while the relay runs and
//! producers keep committing: the outage is the destination's, so no attempt is charged and nothing
//! is dead-lettered; once the emulator is back every event is delivered within seconds, none lost,
//! none twice, in order per key (FIFO queue).
//!
//! It starts an emulator of its own on a free port with `scripts/aws-emulator.sh`, stops and
//! restarts it, and stops it at the end, so the shared emulator other tests use is never touched
//! (and a LocalStack on 4566 does not get in the way).

// A test binary of its own: run alongside the other AWS tests, its emulator restarts made them
// fail to reach the shared emulator (measured: 9 of 11 failed in one binary).
#[path = "aws/common/mod.rs"]
mod common;

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use outbox::{Backoff, Publisher, Relay, RelayOptions};
use outbox_aws::{bootstrap, publisher_from_config, AwsConfig};
use outbox_testkit::TestDb;

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/aws-emulator.sh")
}

fn emulator(action: &str) {
    let (_, port) = endpoint_addr();
    let status = Command::new("bash")
        .arg(script())
        .arg(action)
        .env("AWS_EMULATOR_PORT", port.to_string())
        .status()
        .unwrap_or_else(|e| panic!("cannot run scripts/aws-emulator.sh {action}: {e}"));
    assert!(status.success(), "scripts/aws-emulator.sh {action} failed");
}

/// Stops the test's own emulator however the test ends.
struct StopOnDrop;
impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let _ = std::panic::catch_unwind(|| emulator("stop"));
    }
}

#[tokio::test]
async fn relay_rides_out_an_emulator_outage_without_losing_events() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    // The only test in this binary: every helper in `common` now talks to the private emulator.
    std::env::set_var(
        "OUTBOX_TEST_AWS_ENDPOINT",
        format!("http://127.0.0.1:{port}"),
    );
    emulator("start");
    let _stop = StopOnDrop;
    require_emulator().await;

    let queue = format!("{}.fifo", unique("outage"));
    let config = load_config(
        &format!(
            "[local]\npublisher = \"destinations\"\ndefault_destination = \"q\"\n[local.destinations.q]\nkind = \"sqs\"\nqueue = \"{queue}\"\n{}\n",
            local_aws_section()
        ),
        "local",
    );
    bootstrap(&config).await.expect("bootstrap");
    let settings = AwsConfig::from_config(&config).unwrap().settings();
    let sqs = sqs(&settings).await;
    let url = queue_url(&sqs, &queue).await;
    let db = TestDb::new().await.unwrap();

    // A small attempt budget: 3 attempts over ~0.3 s of backoff. The outage below lasts more than
    // 10 times that; with the attempts charged to events, they would all be dead.
    let options = RelayOptions {
        max_attempts: 3,
        backoff: Backoff {
            base: Duration::from_millis(100),
            max: Duration::from_millis(200),
        },
        destination_backoff_max: Duration::from_secs(2),
        publish_timeout: Duration::from_secs(10),
        ..RelayOptions::default()
    };
    let publisher = publisher_from_config(&config).await.expect("publisher");
    let relay = Relay::new(store(&db).await, publisher, options);
    let handle = relay.spawn();

    // Before: the relay delivers.
    let before = enqueue(
        &db,
        (0..3)
            .map(|i| {
                event(
                    "order",
                    &format!("b{i}"),
                    "Before",
                    serde_json::json!({"i": i}),
                )
            })
            .collect(),
    )
    .await;
    let got = receive(&sqs, &url, 3, Duration::from_secs(20), Duration::ZERO).await;
    assert_eq!(got.len(), 3, "delivered before the outage");

    // Down: producers keep committing; the relay keeps failing and backing off.
    emulator("stop");
    let down = publisher_from_config(&config)
        .await
        .expect("publisher")
        .check()
        .await
        .expect_err("the start-up check fails while the emulator is down");
    assert!(
        down.reason().contains("scripts/aws-emulator.sh start"),
        "the error says how to fix it: {down}"
    );
    let mut during = Vec::new();
    let outage = Instant::now();
    let mut i = 0;
    while outage.elapsed() < Duration::from_secs(4) {
        during.extend(
            enqueue(
                &db,
                vec![event(
                    "order",
                    &format!("d{}", i % 4),
                    "During",
                    serde_json::json!({"i": i}),
                )],
            )
            .await,
        );
        i += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The SDK may take a while to give up on a connection (its own retries): wait for the relay
    // to record the outage rather than assume it did within the producers' 4 s.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let held: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM outbox_event WHERE status = 'parked' AND held_for = 'q'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        if held > 0 {
            break;
        }
        let rows: Vec<(String, i32, Option<String>, Option<String>)> = sqlx::query_as(
            "SELECT status, attempts, held_for, last_error FROM outbox_event ORDER BY seq LIMIT 3",
        )
        .fetch_all(&db.pool)
        .await
        .unwrap();
        assert!(
            Instant::now() < deadline,
            "events should wait for the destination while it is down: {rows:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let charged: i64 =
        sqlx::query_scalar("SELECT coalesce(max(attempts), 0)::bigint FROM outbox_event")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(charged, 0, "an outage charges no attempt to any event");
    assert_eq!(count_status(&db, "dead").await, 0);

    // Back: moto keeps its state in memory, so the queue is created again (as bootstrap would
    // after any emulator restart); the relay's retries then get through.
    emulator("start");
    bootstrap(&config)
        .await
        .expect("bootstrap after the restart");
    let back = Instant::now();
    let got = receive(
        &sqs,
        &url,
        during.len(),
        Duration::from_secs(30),
        Duration::from_millis(1500),
    )
    .await;
    eprintln!(
        "outage test: {} events delivered {:?} after the emulator was back",
        got.len(),
        back.elapsed()
    );
    let by_id = by_event_id(&got); // panics on a duplicate
    let mut last_i: std::collections::HashMap<String, i64> = Default::default();
    for m in &got {
        let key = attr(m, "outbox-aggregate-id")
            .unwrap_or_default()
            .to_owned();
        let i = body_json(m)["i"].as_i64().unwrap_or(-1);
        if let Some(prev) = last_i.insert(key.clone(), i) {
            assert!(
                prev < i,
                "key {key} out of order at the receiver: {prev} then {i}"
            );
        }
    }
    let expected: HashSet<String> = during.iter().map(ToString::to_string).collect();
    let received: HashSet<String> = by_id.keys().cloned().collect();
    assert_eq!(
        received, expected,
        "every event committed during the outage arrives, once"
    );

    let snapshot = handle.stop().await.expect("relay stops");
    assert!(snapshot.deferred > 0, "{snapshot:?}");
    assert_eq!(snapshot.retried, 0, "{snapshot:?}");
    assert_eq!(
        count_status(&db, "published").await,
        (before.len() + during.len()) as i64
    );
    assert_eq!(count_status(&db, "dead").await, 0);
    db.drop_db().await.unwrap();
}
