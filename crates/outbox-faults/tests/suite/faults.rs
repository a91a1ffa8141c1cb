//! The fault scenarios (issue 6, 1-8), each with real processes, a fresh database and its own
//! emulator where a broker is involved. Quick mode by default; `OUTBOX_FAULTS_LONG=1` for the long
//! mode; `OUTBOX_FAULTS_REPORT=PATH` appends each result row (RELIABILITY.md's table) to PATH.
//!
//! Relays are the `outbox` CLI (`cargo build -p outbox-cli` first when running this crate alone),
//! except scenario 2, which needs stalls injected inside the publish step: it runs
//! `outbox-fault-relay`, the same library code path with a stalling publisher wrapper.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use outbox::{MigrateOptions, Outbox, Schema};
use outbox_faults::ledger::{self, Planned, ProducerPlan, Producers};
use outbox_faults::procs::{outbox_cli, scratch, Emulator, Proc};
use outbox_faults::proxy::{Mode, Proxy};
use outbox_faults::scenario::{pending, pick, wait_for, write_config, Outcome};
use outbox_faults::sqs;
use outbox_testkit::TestDb;

const BATCH: usize = 50;

/// How long a backlog may take to drain after the faults: moto's SQS is slow, and the long mode
/// leaves backlogs of thousands of events.
fn drain_timeout() -> Duration {
    Duration::from_secs(pick(120, 900))
}

fn env(db_url: &str, config: &Path) -> Vec<(&'static str, String)> {
    vec![
        ("DATABASE_URL", db_url.to_owned()),
        ("OUTBOX_CONFIG", config.display().to_string()),
        ("OUTBOX_PROFILE", "local".to_owned()),
    ]
}

/// For relays publishing to SQS: moto answers a batch in tens of milliseconds, so a 50-event batch
/// (five waves of ten) gets 5 s before it counts as failed.
fn sqs_env(db_url: &str, config: &Path) -> Vec<(&'static str, String)> {
    let mut e = env(db_url, config);
    e.push(("OUTBOX_RELAY__PUBLISH_TIMEOUT", "5s".into()));
    e.push(("OUTBOX_RELAY__STATEMENT_TIMEOUT", "2s".into()));
    e.push(("OUTBOX_RELAY__TRANSACTION_TIMEOUT", "10s".into()));
    e
}

fn file_relay(dir: &Path, env: &[(&str, String)], tag: &str) -> Proc {
    let out = format!("file:{}", dir.join("events.jsonl").display());
    Proc::spawn(
        &outbox_cli(),
        &["relay", "--publisher", &out],
        env,
        &dir.join(format!("relay-{tag}.log")),
    )
}

async fn fresh_db(strict: bool) -> TestDb {
    // Locate (or build) the CLI before any clock starts.
    let _ = outbox_cli();
    let db = TestDb::with_schema(
        &Schema::default(),
        MigrateOptions {
            strict_key_order: strict,
            ..MigrateOptions::default()
        },
    )
    .await
    .expect("test database");
    ledger::create_ledger(&db.pool).await.expect("ledger");
    db
}

/// Waits until every committed event is in the JSON Lines file and nothing is pending; fails at
/// once if a relay process exits on its own.
async fn drained_to_file(
    db: &TestDb,
    dir: &Path,
    relays: &mut [Proc],
    timeout: Duration,
) -> Duration {
    let path = dir.join("events.jsonl");
    let start = Instant::now();
    loop {
        for r in relays.iter_mut() {
            if let Some(status) = r.exited() {
                panic!(
                    "a relay exited on its own ({status}); log:\n{}",
                    r.log_text()
                );
            }
        }
        let ledger = ledger::read_ledger(&db.pool).await.unwrap_or_default();
        let (ids, _) = ledger::read_jsonl(&path).unwrap_or_default();
        if pending(&db.pool).await == 0 && ledger::check(&ledger, &ids).lost == 0 {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < timeout,
            "backlog did not drain within {timeout:?}; see {}",
            dir.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn file_tally(db: &TestDb, dir: &Path) -> ledger::Tally {
    let ledger = ledger::read_ledger(&db.pool).await.unwrap();
    let (ids, torn) = ledger::read_jsonl(&dir.join("events.jsonl")).unwrap();
    assert_eq!(torn, 0, "torn lines in the publisher's file");
    ledger::check(&ledger, &ids)
}

fn plan(limit: u64) -> ProducerPlan {
    ProducerPlan {
        limit,
        ..ProducerPlan::default()
    }
}

/// 1. The relay process is SIGKILLed in the middle of batches, again and again, while producers
///    keep committing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s1_relay_sigkilled_repeatedly() {
    let db = fresh_db(false).await;
    let dir = scratch("s1");
    let config = write_config(&dir, "");
    let env = env(&db.url, &config);
    let kills = pick(3, 25);
    let producers = Producers::start(db.pool.clone(), plan(u64::MAX));
    for i in 0..kills {
        let relay = file_relay(&dir, &env, &i.to_string());
        // Long enough to start and be mid-batch, short enough to leave a backlog behind.
        tokio::time::sleep(Duration::from_millis(fastrand::u64(400..1000))).await;
        relay.kill9().await;
    }
    producers.stop().await;
    let mut relay = file_relay(&dir, &env, "final");
    let recover =
        drained_to_file(&db, &dir, std::slice::from_mut(&mut relay), drain_timeout()).await;
    assert_eq!(
        relay.terminate(Duration::from_secs(10)).await,
        Some(0),
        "SIGTERM exits 0"
    );
    let tally = file_tally(&db, &dir).await;
    assert!(
        tally.duplicated <= kills * BATCH,
        "duplicates only for batches in flight at a kill: {tally:?}"
    );
    Outcome {
        scenario: "1. relay SIGKILL",
        fault: format!("`outbox relay` SIGKILLed {kills}x, 0.4-1 s apart, producers committing"),
        tally,
        recover,
        note: format!("restart to empty backlog; duplicates bound {kills} x batch {BATCH}"),
    }
    .report();
    db.drop_db().await.unwrap();
}

/// 2. Four relays race over the same table; publish calls stall longer than the claim's bound
///    (in-process stalls) and whole relays are paused with SIGSTOP longer than it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s2_four_relays_with_stalls_longer_than_the_claim_bound() {
    let db = fresh_db(false).await;
    let dir = scratch("s2");
    let config = write_config(&dir, "");
    let mut env = env(&db.url, &config);
    env.push(("OUTBOX_FAULTS_STALL_PROB", "0.02".into()));
    env.push(("OUTBOX_FAULTS_STALL_MS", "4000".into())); // > transaction_timeout (3 s)
    let bin = Path::new(env!("CARGO_BIN_EXE_outbox-fault-relay"));
    let out = format!("file:{}", dir.join("events.jsonl").display());
    let mut relays: Vec<Proc> = (0..4)
        .map(|i| {
            Proc::spawn(
                bin,
                &["relay", "--publisher", &out],
                &env,
                &dir.join(format!("relay-{i}.log")),
            )
        })
        .collect();
    let producers = Producers::start(db.pool.clone(), plan(u64::MAX));
    let pauses = pick(2, 12);
    for _ in 0..pauses {
        tokio::time::sleep(Duration::from_millis(fastrand::u64(300..800))).await;
        let victim = &relays[fastrand::usize(..relays.len())];
        victim.signal(libc::SIGSTOP);
        tokio::time::sleep(Duration::from_millis(3500)).await; // > transaction_timeout
        victim.signal(libc::SIGCONT);
    }
    producers.stop().await;
    let recover = drained_to_file(&db, &dir, &mut relays, drain_timeout()).await;
    let mut stalls = 0;
    let mut lost_claims = 0;
    for r in relays {
        let log = r.log_text();
        stalls += log.matches("injected stall").count();
        lost_claims += log.matches("claim lost").count();
        assert_eq!(r.terminate(Duration::from_secs(15)).await, Some(0));
    }
    let tally = file_tally(&db, &dir).await;
    Outcome {
        scenario: "2. four racing relays, stalls",
        fault: format!(
            "4 relays; {stalls} publish stalls of 4 s and {pauses} SIGSTOPs of 3.5 s (claim bound 3 s)"
        ),
        tally,
        recover,
        note: format!("{lost_claims} settles refused (claim lost) after a stall"),
    }
    .report();
    db.drop_db().await.unwrap();
}

/// A configuration with the SQS destination `q` (`extra` goes into its table); the default
/// destination is `q` unless `extra` has routes.
fn aws_config(dir: &Path, endpoint: &str, queue: &str, extra: &str) -> std::path::PathBuf {
    let default = if extra.contains("routes") {
        ""
    } else {
        "default_destination = \"q\"\n"
    };
    write_config(
        dir,
        &format!(
            "[default]\npublisher = \"destinations\"\n{default}\
             [default.destinations.q]\nkind = \"sqs\"\nqueue = \"{queue}\"\n{extra}\n\
             [local.aws]\nendpoint = \"{endpoint}\"\n"
        ),
    )
}

async fn sqs_tally(db: &TestDb, ids: &[uuid::Uuid]) -> ledger::Tally {
    let ledger = ledger::read_ledger(&db.pool).await.unwrap();
    ledger::check(&ledger, ids)
}

async fn drained_to_queue(
    db: &TestDb,
    collector: &sqs::Collector,
    relay: &mut Proc,
    timeout: Duration,
) -> Duration {
    let start = Instant::now();
    loop {
        if let Some(status) = relay.exited() {
            panic!(
                "the relay exited on its own ({status}); log:\n{}",
                relay.log_text()
            );
        }
        let ledger = ledger::read_ledger(&db.pool).await.unwrap_or_default();
        if pending(&db.pool).await == 0 && ledger::check(&ledger, &collector.ids()).lost == 0 {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < timeout,
            "backlog did not reach the queue within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn slow_plan(limit: u64) -> ProducerPlan {
    // moto's SQS handles a few hundred messages a second: keep the broker scenarios small.
    ProducerPlan {
        producers: 1,
        keys_per_producer: 10,
        events_per_tx: 2,
        pause: Duration::from_millis(pick(15, 30)),
        limit,
        ..ProducerPlan::default()
    }
}

/// 3. The broker is stopped for a while and restarted while producers keep committing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_broker_stopped_and_restarted() {
    let db = fresh_db(false).await;
    let dir = scratch("s3");
    let mut moto = Emulator::start(&dir).await;
    let client = sqs::client(&moto.endpoint()).await;
    let queue = "faults-s3.fifo";
    let url = sqs::fifo_queue(&client, queue, 30).await.unwrap();
    // The relay reaches the broker through a proxy, so "down" is seen at once (connections
    // refused) while the checker drains what the broker already accepted before it dies.
    let proxy = Proxy::start(moto.addr()).await.unwrap();
    let config = aws_config(&dir, &format!("http://{}", proxy.addr), queue, "");
    let env = sqs_env(&db.url, &config);
    let collector = sqs::Collector::start(client.clone(), url.clone());
    let mut relay = Proc::spawn(&outbox_cli(), &["relay"], &env, &dir.join("relay.log"));
    let outages = pick(1, 3);
    let outage = Duration::from_secs(pick(3, 10));
    let producers = Producers::start(db.pool.clone(), slow_plan(u64::MAX));
    let mut recover = Duration::ZERO;
    for _ in 0..outages {
        tokio::time::sleep(Duration::from_secs(2)).await;
        proxy.set(Mode::Refuse);
        proxy.cut_all();
        wait_for(Duration::from_secs(30), || async {
            sqs::depth(&client, &url).await.is_ok_and(|d| d == 0)
        })
        .await
        .expect("the checker drains the queue before the broker goes down");
        moto.down().await;
        tokio::time::sleep(outage).await;
        moto.up().await;
        sqs::fifo_queue(&client, queue, 30).await.unwrap(); // moto starts empty
        proxy.set(Mode::Pass);
    }
    producers.stop().await;
    recover += drained_to_queue(&db, &collector, &mut relay, drain_timeout()).await;
    assert!(relay.child.id().is_some());
    assert_eq!(relay.terminate(Duration::from_secs(15)).await, Some(0));
    let tally = sqs_tally(&db, &collector.stop().await).await;
    Outcome {
        scenario: "3. broker outage",
        fault: format!(
            "emulator killed and restarted {outages}x, {} s down each, producers committing",
            outage.as_secs()
        ),
        tally,
        recover,
        note: "SQS FIFO via moto; broker back to empty backlog".into(),
    }
    .report();
    db.drop_db().await.unwrap();
}

/// 4. Every connection to the database is terminated (`pg_terminate_backend`) under load; the
///    relay reconnects by itself (the same process throughout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s4_every_connection_terminated_under_load() {
    let db = fresh_db(false).await;
    let dir = scratch("s4");
    let config = write_config(&dir, "");
    let env = env(&db.url, &config);
    let mut relay = file_relay(&dir, &env, "0");
    let producers = Producers::start(db.pool.clone(), plan(u64::MAX));
    let rounds = pick(3, 20);
    let admin: sqlx::PgPool = sqlx::PgPool::connect(&outbox_testkit::admin_url())
        .await
        .unwrap();
    let mut terminated = 0i64;
    for _ in 0..rounds {
        tokio::time::sleep(Duration::from_millis(fastrand::u64(500..1000))).await;
        let n: i64 = sqlx::query_scalar(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(&db.name)
        .fetch_one(&admin)
        .await
        .unwrap();
        terminated += n;
    }
    let failed = producers.failed.load(std::sync::atomic::Ordering::Relaxed);
    producers.stop().await;
    let recover =
        drained_to_file(&db, &dir, std::slice::from_mut(&mut relay), drain_timeout()).await;
    assert!(
        relay.exited().is_none(),
        "the relay reconnects instead of exiting"
    );
    assert_eq!(relay.terminate(Duration::from_secs(10)).await, Some(0));
    let tally = file_tally(&db, &dir).await;
    Outcome {
        scenario: "4. connections terminated",
        fault: format!("pg_terminate_backend on all {terminated} sessions of the database over {rounds} rounds"),
        tally,
        recover,
        note: format!("same relay process throughout; {failed} producer transactions failed and were retried"),
    }
    .report();
    admin.close().await;
    db.drop_db().await.unwrap();
}

/// 5. Transactions commit out of `seq` order, some stay open for seconds, and two producers write
///    the same key concurrently (with `strict_key_order`): no event is skipped or reordered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s5_out_of_order_commits_and_long_transactions() {
    let db = fresh_db(true).await;
    let dir = scratch("s5");
    let config = write_config(&dir, "");
    let env = env(&db.url, &config);
    let mut relay = file_relay(&dir, &env, "0");
    let producers = Producers::start(db.pool.clone(), plan(u64::MAX));
    let rounds = pick(3, 12);
    let mut long = Vec::new();
    for w in 0..3 {
        let pool = db.pool.clone();
        long.push(tokio::spawn(async move {
            let outbox = Outbox::new(Schema::default());
            let mut next_n = HashMap::new();
            let mut committed = 0usize;
            for r in 0..rounds {
                // Writer 0 and 1 share the key `shared`; each also has its own slow key.
                let events = vec![
                    Planned {
                        key: "shared".into(),
                        event_type: "Long".into(),
                        payload: serde_json::json!({"w": w, "r": r}),
                        poison: false,
                    },
                    Planned {
                        key: format!("slow-{w}"),
                        event_type: "Long".into(),
                        payload: serde_json::json!({"w": w, "r": r}),
                        poison: false,
                    },
                ];
                let events = if w == 2 { events[1..].to_vec() } else { events };
                let hold = Duration::from_millis(fastrand::u64(500..2500));
                committed += ledger::commit_events(&pool, &outbox, &events, &mut next_n, hold)
                    .await
                    .expect("long transaction")
                    .len();
            }
            committed
        }));
    }
    let mut long_events = 0;
    for t in long {
        long_events += t.await.unwrap();
    }
    producers.stop().await;
    let recover =
        drained_to_file(&db, &dir, std::slice::from_mut(&mut relay), drain_timeout()).await;
    assert_eq!(relay.terminate(Duration::from_secs(10)).await, Some(0));
    let tally = file_tally(&db, &dir).await;
    Outcome {
        scenario: "5. out-of-order commits, long transactions",
        fault: format!(
            "{long_events} events in transactions held open 0.5-2.5 s while later seqs commit; 2 writers on one key (strict_key_order)"
        ),
        tally,
        recover,
        note: "last commit to empty backlog".into(),
    }
    .report();
    db.drop_db().await.unwrap();
}

/// 6. Poison events (no route; too large for the queue) among good ones, on the same and on
///    other keys: they are dead-lettered at once with a reason, everything else flows in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s6_poison_events_among_good_ones() {
    let db = fresh_db(false).await;
    let dir = scratch("s6");
    let moto = Emulator::start(&dir).await;
    let client = sqs::client(&moto.endpoint()).await;
    let queue = "faults-s6.fifo";
    let url = sqs::fifo_queue(&client, queue, 30).await.unwrap();
    let config = aws_config(
        &dir,
        &moto.endpoint(),
        queue,
        "max_message_bytes = 8192\n[[default.routes]]\nevent_type = \"Good\"\ndestination = \"q\"",
    );
    let mut env = sqs_env(&db.url, &config);
    // Poison events on 12 shared keys: with the default `block_key` every key would end up held
    // behind one (tested in the relay's own tests); this scenario checks the explicit choice to
    // let keys continue past their dead events.
    env.push(("OUTBOX_RELAY__DEAD_LETTER", "continue".into()));
    let collector = sqs::Collector::start(client.clone(), url.clone());
    let mut relay = Proc::spawn(&outbox_cli(), &["relay"], &env, &dir.join("relay.log"));
    let outbox = Outbox::new(Schema::default());
    let mut next_n = HashMap::new();
    let total = pick(300, 1200);
    let big = "y".repeat(16 * 1024);
    let mut poison = 0;
    for i in 0..total / 3 {
        let events: Vec<Planned> = (0..3)
            .map(|j| {
                let key = format!("k{}", (i * 3 + j) % 12);
                let roll = fastrand::u32(..100);
                let (event_type, payload, bad) = if roll < 5 {
                    ("Unrouted", serde_json::json!({}), true)
                } else if roll < 8 {
                    ("Good", serde_json::json!({ "big": big }), true)
                } else {
                    ("Good", serde_json::json!({}), false)
                };
                Planned {
                    key,
                    event_type: event_type.into(),
                    payload,
                    poison: bad,
                }
            })
            .collect();
        poison += events.iter().filter(|e| e.poison).count();
        ledger::commit_events(&db.pool, &outbox, &events, &mut next_n, Duration::ZERO)
            .await
            .unwrap();
    }
    let recover = drained_to_queue(&db, &collector, &mut relay, drain_timeout()).await;
    let dead: Vec<(uuid::Uuid, i32, Option<String>)> =
        sqlx::query_as("SELECT id, attempts, last_error FROM outbox_event WHERE status = 'dead'")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        dead.len(),
        poison,
        "every poison event is dead-lettered, nothing else"
    );
    for (id, attempts, error) in &dead {
        let error = error.as_deref().unwrap_or_default();
        assert_eq!(
            *attempts, 1,
            "{id} dead at the first attempt, not retried: {error}"
        );
        assert!(
            error.contains("no route") || error.contains("max_message_bytes"),
            "{id}: the reason says why: {error}"
        );
    }
    assert!(
        relay.exited().is_none(),
        "no crash loop: the relay keeps running"
    );
    assert_eq!(relay.terminate(Duration::from_secs(15)).await, Some(0));
    let tally = sqs_tally(&db, &collector.stop().await).await;
    Outcome {
        scenario: "6. poison events",
        fault: "5 % unrouted and 3 % oversized (16 KiB > 8 KiB limit) events on 12 shared keys"
            .into(),
        tally,
        recover,
        note: format!(
            "{} dead-lettered at the first attempt with the reason; others flow",
            dead.len()
        ),
    }
    .report();
    db.drop_db().await.unwrap();
}

/// Runs a sequence of network faults on a proxy: latency, a black hole, cuts.
async fn network_faults(proxy: &Proxy, rounds: usize) {
    for _ in 0..rounds {
        proxy.set(Mode::Delay(fastrand::u64(20..150)));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        proxy.set(Mode::Pass);
        proxy.cut_all();
        tokio::time::sleep(Duration::from_millis(700)).await;
        proxy.set(Mode::Hole);
        tokio::time::sleep(Duration::from_millis(fastrand::u64(1000..4000))).await;
        proxy.cut_all();
        proxy.set(Mode::Pass);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// 7a. The network between the relay and PostgreSQL delays, black-holes and cuts traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s7a_network_faults_to_postgres() {
    let db = fresh_db(false).await;
    let dir = scratch("s7a");
    let config = write_config(&dir, "");
    let proxy = Proxy::start("127.0.0.1:5432".parse().unwrap())
        .await
        .unwrap();
    let url = db.url.replace("127.0.0.1:5432", &proxy.addr.to_string());
    assert_ne!(url, db.url, "the relay goes through the proxy");
    let env = env(&url, &config);
    let mut relay = file_relay(&dir, &env, "0");
    let producers = Producers::start(db.pool.clone(), plan(u64::MAX));
    // Faults start once the relay is up and publishing (a failure before it has started is a
    // start-up error, exit 1, for the supervisor to restart).
    let out = dir.join("events.jsonl");
    wait_for(Duration::from_secs(30), || async {
        std::fs::metadata(&out).is_ok_and(|m| m.len() > 0)
    })
    .await
    .expect("the relay publishes before the faults start");
    let rounds = pick(2, 10);
    network_faults(&proxy, rounds).await;
    producers.stop().await;
    let recover =
        drained_to_file(&db, &dir, std::slice::from_mut(&mut relay), drain_timeout()).await;
    assert!(relay.exited().is_none(), "the relay rides it out");
    assert_eq!(relay.terminate(Duration::from_secs(10)).await, Some(0));
    let tally = file_tally(&db, &dir).await;
    Outcome {
        scenario: "7a. network to Postgres",
        fault: format!(
            "proxy relay->Postgres: {rounds}x (20-150 ms delay, cut, 1-4 s black hole, cut); {} connections",
            proxy.connections()
        ),
        tally,
        recover,
        note: "same relay process throughout".into(),
    }
    .report();
    db.drop_db().await.unwrap();
}

/// 7b. The network between the relay and the broker delays, black-holes and cuts traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s7b_network_faults_to_the_broker() {
    let db = fresh_db(false).await;
    let dir = scratch("s7b");
    let moto = Emulator::start(&dir).await;
    let client = sqs::client(&moto.endpoint()).await;
    let queue = "faults-s7.fifo";
    let url = sqs::fifo_queue(&client, queue, 30).await.unwrap();
    let proxy = Proxy::start(moto.addr()).await.unwrap();
    let config = aws_config(&dir, &format!("http://{}", proxy.addr), queue, "");
    let env = sqs_env(&db.url, &config);
    let collector = sqs::Collector::start(client.clone(), url.clone());
    let mut relay = Proc::spawn(&outbox_cli(), &["relay"], &env, &dir.join("relay.log"));
    let producers = Producers::start(db.pool.clone(), slow_plan(u64::MAX));
    wait_for(Duration::from_secs(30), || async {
        !collector.ids().is_empty()
    })
    .await
    .expect("the relay publishes before the faults start");
    let rounds = pick(2, 8);
    network_faults(&proxy, rounds).await;
    producers.stop().await;
    let recover = drained_to_queue(&db, &collector, &mut relay, drain_timeout()).await;
    assert!(relay.exited().is_none(), "the relay rides it out");
    assert_eq!(relay.terminate(Duration::from_secs(15)).await, Some(0));
    let tally = sqs_tally(&db, &collector.stop().await).await;
    Outcome {
        scenario: "7b. network to the broker",
        fault: format!(
            "proxy relay->SQS: {rounds}x (20-150 ms delay, cut, 1-4 s black hole, cut); {} connections",
            proxy.connections()
        ),
        tally,
        recover,
        note: "SQS FIFO via moto".into(),
    }
    .report();
    db.drop_db().await.unwrap();
}

/// 8. The consumer crashes after handling a message and before deleting it. The broker redelivers;
///    the consumer's inbox table (event id, same transaction as the effect) makes it a no-op.
///    `crates/outbox-consumer` was not in the tree when this was written, so the consumer is a
///    minimal receive/handle/delete loop (`outbox-fault-relay consume`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s8_consumer_crashes_after_handling_before_ack() {
    let db = fresh_db(false).await;
    sqlx::raw_sql(
        "CREATE TABLE fault_inbox (event_id uuid PRIMARY KEY, redeliveries int NOT NULL DEFAULT 0);
         CREATE TABLE fault_effect (applied bigserial PRIMARY KEY, event_id uuid NOT NULL, key text NOT NULL)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let dir = scratch("s8");
    let moto = Emulator::start(&dir).await;
    let client = sqs::client(&moto.endpoint()).await;
    let queue = "faults-s8.fifo";
    let url = sqs::fifo_queue(&client, queue, 1).await.unwrap();
    let config = aws_config(&dir, &moto.endpoint(), queue, "");
    let env = sqs_env(&db.url, &config);
    let relay = Proc::spawn(&outbox_cli(), &["relay"], &env, &dir.join("relay.log"));
    let total = pick(300, 1000);
    let producers = Producers::start(db.pool.clone(), slow_plan(total));
    let bin = Path::new(env!("CARGO_BIN_EXE_outbox-fault-relay"));
    let crash = "0.03".to_owned();
    let consumer_args = ["consume", &moto.endpoint(), &url, &db.url, &crash].map(|s| s.to_owned());
    let args: Vec<&str> = consumer_args.iter().map(String::as_str).collect();
    let mut consumer = Proc::spawn(bin, &args, &[], &dir.join("consumer.log"));
    let mut crashes = 0;
    let deadline = Instant::now() + drain_timeout() + Duration::from_secs(60);
    let mut drained_at = None;
    let effects = |pool: sqlx::PgPool| async move {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM fault_effect")
            .fetch_one(&pool)
            .await
            .unwrap_or(0)
    };
    loop {
        if let Some(status) = consumer.exited() {
            assert!(!status.success(), "the consumer only stops by crashing");
            crashes += 1;
            consumer = Proc::spawn(bin, &args, &[], &dir.join("consumer.log"));
        }
        if producers.is_done() && drained_at.is_none() {
            drained_at = Some(Instant::now());
        }
        let committed = ledger::read_ledger(&db.pool).await.unwrap().len() as i64;
        if producers.is_done()
            && committed > 0
            && effects(db.pool.clone()).await >= committed
            && sqs::depth(&client, &url).await.is_ok_and(|d| d == 0)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the consumer did not catch up; see {}",
            dir.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let recover = drained_at.map_or(Duration::ZERO, |t| t.elapsed());
    producers.finish().await;
    consumer.kill9().await;
    assert_eq!(relay.terminate(Duration::from_secs(15)).await, Some(0));
    let applied: Vec<uuid::Uuid> =
        sqlx::query_scalar("SELECT event_id FROM fault_effect ORDER BY applied")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    let redelivered: i64 =
        sqlx::query_scalar("SELECT COALESCE(sum(redeliveries), 0)::bigint FROM fault_inbox")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    let tally = sqs_tally(&db, &applied).await;
    assert_eq!(
        tally.duplicated, 0,
        "each effect applied once: the inbox dedups redeliveries"
    );
    assert!(crashes > 0 || total < 100, "the scenario injected crashes");
    Outcome {
        scenario: "8. consumer crash before ack",
        fault: format!(
            "consumer aborted after handling, before delete, {crashes}x (3 % of messages); visibility timeout 1 s"
        ),
        tally,
        recover,
        note: format!("{redelivered} redeliveries absorbed by the inbox; effects counted, not deliveries"),
    }
    .report();
    db.drop_db().await.unwrap();
}

/// 9. A backlog of events far bigger than usual (40 × 10 MB) drained by the real `outbox` binary
/// under a 1 GiB address-space limit: the claim's byte budget (`relay.max_batch_bytes`, 16 MiB by
/// default) keeps memory bounded, so the relay neither aborts nor stalls, and every event goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s9_big_events_under_a_memory_limit() {
    const EVENTS: i64 = 40;
    const BYTES: i64 = 10 * 1024 * 1024;
    let db = fresh_db(false).await;
    let dir = scratch("s9");
    // The table's own limit is the default one; this backlog stands for events written under a
    // higher limit (the relay below runs with 16 MiB).
    sqlx::query("DROP TRIGGER outbox_event_payload_size ON outbox_event")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO outbox_event (aggregate_type, aggregate_id, event_type, payload)
         SELECT 'big', 'k' || g, 'Big', jsonb_build_object('blob', repeat(md5(g::text), ($2 / 32)::int))
         FROM generate_series(1, $1) g",
    )
    .bind(EVENTS)
    .bind(BYTES)
    .execute(&db.pool)
    .await
    .unwrap();
    let cli = outbox_cli();
    let script = "ulimit -v 1048576 && exec \"$0\" relay --drain --publisher null";
    let env = vec![
        ("DATABASE_URL", db.url.clone()),
        (
            "OUTBOX_EVENTS__MAX_PAYLOAD_BYTES",
            (16 * 1024 * 1024).to_string(),
        ),
        // glibc reserves 64 MiB of address space per malloc arena and thread; the limit is
        // about the relay's own memory.
        ("MALLOC_ARENA_MAX", "2".to_owned()),
    ];
    let cli_path = cli.display().to_string();
    let mut relay = Proc::spawn(
        Path::new("/bin/bash"),
        &["-c", script, &cli_path],
        &env,
        &dir.join("relay.log"),
    );
    let started = Instant::now();
    let status = loop {
        if let Some(status) = relay.exited() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "the drain did not finish; log:\n{}",
            relay.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        status.success(),
        "the relay failed under a 1 GiB limit ({status}); log:\n{}",
        relay.log_text()
    );
    assert_eq!(pending(&db.pool).await, 0, "every big event was published");
    db.drop_db().await.unwrap();
}
