//! The relay engine against a real PostgreSQL: delivery, retries, dead letters, per-key order under
//! concurrent relays, bounded claims and fencing, wake-up, retention, shutdown.
//!
//! The in-memory publisher here stands for the broker so that the engine's guarantees can be
//! checked event by event; the broker publishers have their own end-to-end tests.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use outbox::publisher::Fault;
use outbox::store::{Claim, Store, StoreError};
use outbox::{
    Backoff, DeadLetterPolicy, MemoryPublisher, NewEvent, Outbox, PgStore, PgStoreOptions,
    Publisher, Relay, RelayOptions, Schema,
};
use outbox_testkit::{order_violations, TestDb};
use sqlx::Row;

fn fast_options() -> RelayOptions {
    RelayOptions {
        batch_size: 50,
        workers: 1,
        poll_interval: Duration::from_millis(50),
        publish_timeout: Duration::from_secs(5),
        max_attempts: 5,
        backoff: Backoff {
            base: Duration::from_millis(20),
            max: Duration::from_millis(100),
        },
        purge_interval: Duration::from_millis(100),
        ..RelayOptions::default()
    }
}

/// Whether a relay currently asks producers to NOTIFY (what their trigger reads).
const WANTED: &str = "SELECT last_value > (extract(epoch FROM clock_timestamp()) * 1000)::bigint FROM outbox_wakeup_wanted_ms";

async fn store(db: &TestDb, options: PgStoreOptions) -> PgStore {
    PgStore::new(db.pool.clone(), options).await.unwrap()
}

/// Enqueues `per_key` events for each of `keys` keys, interleaved, in transactions of `tx_size`.
async fn enqueue_interleaved(db: &TestDb, keys: usize, per_key: usize) -> Vec<uuid::Uuid> {
    let outbox = Outbox::new(Schema::default());
    let mut ids = Vec::new();
    let mut tx = db.pool.begin().await.unwrap();
    for i in 0..per_key {
        let batch: Vec<NewEvent> = (0..keys)
            .map(|k| {
                NewEvent::new("order", format!("k{k}"), format!("E{i}"))
                    .payload(&serde_json::json!({ "n": i }))
                    .unwrap()
            })
            .collect();
        ids.extend(outbox.enqueue_all(&mut tx, batch).await.unwrap());
    }
    tx.commit().await.unwrap();
    ids
}

async fn remaining(db: &TestDb) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM outbox_event WHERE status <> 'published'")
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

async fn wait_until<F: std::future::Future<Output = bool>>(
    timeout: Duration,
    mut check: impl FnMut() -> F,
) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test]
async fn publishes_every_event_once_in_key_order_and_deletes_it() {
    let db = TestDb::new().await.unwrap();
    let ids = enqueue_interleaved(&db, 7, 20).await;
    let publisher = MemoryPublisher::new();
    let relay = Relay::new(
        store(&db, PgStoreOptions::default()).await,
        publisher.clone(),
        fast_options(),
    );
    let report = relay.drain().await.unwrap();
    assert_eq!(report.published, 140);
    let published = publisher.published();
    assert_eq!(published.len(), ids.len());
    let got: HashSet<_> = published.iter().map(|e| e.id).collect();
    assert_eq!(got, ids.into_iter().collect());
    assert!(order_violations(&published).is_empty());
    assert_eq!(remaining(&db).await, 0);
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_event")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(left, 0, "retention 0 deletes published events");
    // Nothing is sent twice: a second drain finds nothing.
    assert_eq!(relay.drain().await.unwrap().published, 0);
    assert_eq!(publisher.published().len(), 140);
    db.drop_db().await.unwrap();
}

#[tokio::test]
async fn retryable_failures_back_off_then_succeed_holding_only_their_key() {
    let db = TestDb::new().await.unwrap();
    let ids = enqueue_interleaved(&db, 3, 4).await; // keys k0,k1,k2; ids[0] is k0's first
    let publisher = MemoryPublisher::new();
    publisher.fail(ids[0], Fault::Retryable(2));
    let mut options = fast_options();
    // Long enough that the first drain ends before the head is due again.
    options.backoff = Backoff {
        base: Duration::from_millis(800),
        max: Duration::from_secs(1),
    };
    let relay = Relay::new(
        store(&db, PgStoreOptions::default()).await,
        publisher.clone(),
        options,
    );
    // First pass: k1 and k2 flow completely; k0 is held behind its failed head.
    relay.drain().await.unwrap();
    let first: Vec<String> = publisher
        .published()
        .iter()
        .map(|e| e.aggregate_id.clone())
        .collect();
    assert_eq!(first.iter().filter(|k| *k == "k0").count(), 0);
    assert_eq!(first.len(), 8);
    let row = sqlx::query("SELECT attempts, last_error, available_at > now() AS later FROM outbox_event WHERE id = $1")
        .bind(ids[0])
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(row.get::<i32, _>("attempts"), 1);
    assert!(row
        .get::<Option<String>, _>("last_error")
        .unwrap()
        .contains("scripted"));
    assert!(
        row.get::<bool, _>("later"),
        "a failed event waits for its backoff"
    );
    let untouched: i32 = sqlx::query_scalar(
        "SELECT max(attempts) FROM outbox_event WHERE aggregate_id = 'k0' AND id <> $1",
    )
    .bind(ids[0])
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        untouched, 0,
        "later events of the key are not charged an attempt"
    );

    // Keep relaying: after the backoff the head succeeds and the key follows in order.
    let handle = relay.spawn();
    assert!(
        wait_until(Duration::from_secs(10), || async {
            remaining(&db).await == 0
        })
        .await
    );
    handle.stop().await.unwrap();
    let published = publisher.published();
    assert_eq!(published.len(), 12);
    assert!(order_violations(&published).is_empty());
    db.drop_db().await.unwrap();
}

#[tokio::test]
async fn exhausted_and_permanent_failures_dead_letter_with_the_reason() {
    let db = TestDb::new().await.unwrap();
    let outbox = Outbox::new(Schema::default());
    let mut conn = db.pool.acquire().await.unwrap();
    let poison = outbox
        .enqueue(&mut conn, NewEvent::new("a", "1", "Poison"))
        .await
        .unwrap();
    let flaky = outbox
        .enqueue(&mut conn, NewEvent::new("b", "1", "Flaky"))
        .await
        .unwrap();
    let after_poison = outbox
        .enqueue(&mut conn, NewEvent::new("a", "1", "AfterPoison"))
        .await
        .unwrap();
    drop(conn);
    let publisher = MemoryPublisher::new();
    publisher.fail(poison, Fault::Permanent);
    publisher.fail(flaky, Fault::Retryable(100));
    let mut options = fast_options();
    options.max_attempts = 3;
    let continue_past_dead = PgStoreOptions {
        dead_letter: DeadLetterPolicy::Continue,
        ..PgStoreOptions::default()
    };
    let relay = Relay::new(
        store(&db, continue_past_dead).await,
        publisher.clone(),
        options,
    );
    let handle = relay.spawn();
    assert!(
        wait_until(Duration::from_secs(10), || async {
            let dead: i64 =
                sqlx::query_scalar("SELECT count(*) FROM outbox_event WHERE status = 'dead'")
                    .fetch_one(&db.pool)
                    .await
                    .unwrap();
            dead == 2 && remaining(&db).await == 2
        })
        .await,
        "both bad events should end dead, the rest published"
    );
    handle.stop().await.unwrap();
    let rows =
        sqlx::query("SELECT id, attempts, last_error FROM outbox_event WHERE status = 'dead'")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    let dead: HashMap<uuid::Uuid, (i32, String)> = rows
        .iter()
        .map(|r| (r.get("id"), (r.get("attempts"), r.get("last_error"))))
        .collect();
    assert_eq!(dead[&poison].0, 1, "a permanent error dead-letters at once");
    assert!(dead[&poison].1.starts_with("permanent failure"));
    assert_eq!(dead[&flaky].0, 3);
    assert!(
        dead[&flaky].1.contains("gave up after 3 attempts"),
        "{}",
        dead[&flaky].1
    );
    // `continue`: the key of a dead event keeps flowing.
    assert!(publisher.published().iter().any(|e| e.id == after_poison));

    // An operator replays the dead events; now they go through.
    publisher.fail(poison, Fault::Retryable(0));
    publisher.fail(flaky, Fault::Retryable(0));
    let schema = Schema::default();
    let all = outbox::postgres::DeadSelection::Matching(Default::default());
    assert_eq!(
        outbox::postgres::replay_dead(&db.pool, &schema, &all)
            .await
            .unwrap()
            .changed
            .len(),
        2
    );
    relay.drain().await.unwrap();
    assert_eq!(remaining(&db).await, 0);
    db.drop_db().await.unwrap();
}

#[tokio::test]
async fn block_key_policy_holds_a_dead_events_key_until_replayed() {
    let db = TestDb::new().await.unwrap();
    let outbox = Outbox::new(Schema::default());
    let mut conn = db.pool.acquire().await.unwrap();
    let poison = outbox
        .enqueue(&mut conn, NewEvent::new("a", "1", "Poison"))
        .await
        .unwrap();
    let held = outbox
        .enqueue(&mut conn, NewEvent::new("a", "1", "Held"))
        .await
        .unwrap();
    let other = outbox
        .enqueue(&mut conn, NewEvent::new("a", "2", "Other"))
        .await
        .unwrap();
    drop(conn);
    let publisher = MemoryPublisher::new();
    publisher.fail(poison, Fault::Permanent);
    let options = PgStoreOptions {
        dead_letter: DeadLetterPolicy::BlockKey,
        ..PgStoreOptions::default()
    };
    let relay = Relay::new(store(&db, options).await, publisher.clone(), fast_options());
    relay.drain().await.unwrap();
    relay.drain().await.unwrap();
    let sent: Vec<uuid::Uuid> = publisher.published().iter().map(|e| e.id).collect();
    assert_eq!(sent, vec![other], "the held key must wait; other keys flow");

    publisher.fail(poison, Fault::Retryable(0));
    let selection = outbox::postgres::DeadSelection::Ids(vec![poison]);
    outbox::postgres::replay_dead(&db.pool, &Schema::default(), &selection)
        .await
        .unwrap();
    relay.drain().await.unwrap();
    let sent: Vec<uuid::Uuid> = publisher.published().iter().map(|e| e.id).collect();
    assert_eq!(sent, vec![other, poison, held]);
    db.drop_db().await.unwrap();
}

/// Replaying or deleting dead events releases, in the same transaction, the later events of their
/// keys that wait parked behind them (status `parked`, `available_at = 'infinity'`), leaves other
/// keys' parked events alone, and wakes waiting relays with a NOTIFY.
#[tokio::test]
async fn replay_and_delete_release_the_events_parked_behind_and_wake_relays() {
    use outbox::postgres::{delete_dead, replay_dead, DeadFilter, DeadSelection};
    let db = TestDb::new().await.unwrap();
    let schema = Schema::default();
    // The parked state of a blocked key, as the relay writes it (allowed whatever the migration
    // that introduces it names its check).
    sqlx::query("ALTER TABLE outbox_event DROP CONSTRAINT IF EXISTS outbox_event_status_check")
        .execute(&db.pool)
        .await
        .unwrap();
    let outbox = Outbox::new(schema.clone());
    let mut conn = db.pool.acquire().await.unwrap();
    let mut ids = HashMap::new();
    for (key, name) in [
        ("1", "dead1"),
        ("1", "parked1"),
        ("2", "dead2"),
        ("2", "parked2"),
        ("3", "parked3"),
    ] {
        let id = outbox
            .enqueue(&mut conn, NewEvent::new("a", key, name))
            .await
            .unwrap();
        ids.insert(name, id);
    }
    drop(conn);
    sqlx::query("UPDATE outbox_event SET status = 'dead', attempts = 3, last_error = 'x' WHERE event_type LIKE 'dead%'")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE outbox_event SET status = 'parked', available_at = 'infinity' WHERE event_type LIKE 'parked%'")
        .execute(&db.pool)
        .await
        .unwrap();
    let status_of = |name: &'static str| {
        let pool = db.pool.clone();
        let id = ids[name];
        async move {
            sqlx::query_scalar::<_, String>("SELECT status FROM outbox_event WHERE id = $1")
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    let mut listener = sqlx::postgres::PgListener::connect_with(&db.pool)
        .await
        .unwrap();
    listener.listen(&schema.channel()).await.unwrap();

    let missing = uuid::Uuid::now_v7();
    let change = replay_dead(
        &db.pool,
        &schema,
        &DeadSelection::Ids(vec![ids["dead1"], missing]),
    )
    .await
    .unwrap();
    assert_eq!(change.changed, vec![ids["dead1"]]);
    assert_eq!(change.not_found, vec![missing]);
    assert_eq!(change.released, 1);
    assert_eq!(status_of("dead1").await, "pending");
    assert_eq!(status_of("parked1").await, "pending");
    assert_eq!(
        status_of("parked2").await,
        "parked",
        "another key stays parked"
    );
    let woke = tokio::time::timeout(Duration::from_secs(2), listener.recv()).await;
    assert!(woke.is_ok(), "the replay did not notify waiting relays");

    let filter = DeadFilter {
        aggregate_type: Some("a".into()),
        aggregate_id: Some("2".into()),
        ..DeadFilter::default()
    };
    let change = delete_dead(&db.pool, &schema, &DeadSelection::Matching(filter))
        .await
        .unwrap();
    assert_eq!((change.changed, change.released), (vec![ids["dead2"]], 1));
    assert_eq!(status_of("parked2").await, "pending");
    assert_eq!(
        status_of("parked3").await,
        "parked",
        "no dead event of its key was touched"
    );
    let woke = tokio::time::timeout(Duration::from_secs(2), listener.recv()).await;
    assert!(woke.is_ok(), "the delete did not notify waiting relays");
    let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_event WHERE status = 'dead'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(dead, 0);
    db.drop_db().await.unwrap();
}

/// Four relays (each its own store and pool, like four processes) race over thousands of events
/// on hundreds of keys while producers keep committing and some publishes fail: every event is
/// published, in order per key, and exactly once (no crash, so no duplicates).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_racing_relays_keep_per_key_order_and_publish_exactly_once() {
    let db = TestDb::new().await.unwrap();
    let publisher = MemoryPublisher::new();
    let mut ids = enqueue_interleaved(&db, 200, 10).await;
    // Some events fail a few times: their keys must wait while the rest flows.
    for id in ids.iter().step_by(37) {
        publisher.fail(*id, Fault::Retryable(2));
    }
    let mut handles = Vec::new();
    for _ in 0..4 {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .connect(&db.url)
            .await
            .unwrap();
        let store = PgStore::new(pool, PgStoreOptions::default()).await.unwrap();
        let mut options = fast_options();
        options.workers = 2;
        options.batch_size = 25;
        options.max_attempts = 100;
        handles.push(Relay::new(store, publisher.clone(), options).spawn());
    }
    // Producers keep committing while the relays run.
    let outbox = Outbox::new(Schema::default());
    for round in 0..20 {
        let mut tx = db.pool.begin().await.unwrap();
        let batch: Vec<NewEvent> = (0..50)
            .map(|k| NewEvent::new("order", format!("k{}", (k * 7 + round) % 200), "Later"))
            .collect();
        ids.extend(outbox.enqueue_all(&mut tx, batch).await.unwrap());
        tx.commit().await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        wait_until(Duration::from_secs(60), || async {
            remaining(&db).await == 0
        })
        .await,
        "backlog did not drain"
    );
    for h in handles {
        h.stop().await.unwrap();
    }
    let published = publisher.published();
    let violations = order_violations(&published);
    assert!(violations.is_empty(), "order violations: {violations:?}");
    let mut seen = HashSet::new();
    let duplicates = published.iter().filter(|e| !seen.insert(e.id)).count();
    assert_eq!(duplicates, 0, "steady state must not duplicate");
    assert_eq!(seen, ids.into_iter().collect::<HashSet<_>>(), "lost events");
    assert_eq!(published.len(), 3000);
    db.drop_db().await.unwrap();
}

/// Transactions that commit out of seq order, and one that stays open while later ones are
/// published: nothing is skipped (the relay does not track an offset).
#[tokio::test]
async fn late_commits_and_long_transactions_are_not_skipped() {
    let db = TestDb::new().await.unwrap();
    let outbox = Outbox::new(Schema::default());
    let mut long_tx = db.pool.begin().await.unwrap();
    let early = outbox
        .enqueue(&mut long_tx, NewEvent::new("a", "slow", "Early"))
        .await
        .unwrap();
    let mut conn = db.pool.acquire().await.unwrap();
    for i in 0..20 {
        outbox
            .enqueue(&mut conn, NewEvent::new("a", format!("fast{i}"), "Later"))
            .await
            .unwrap();
    }
    drop(conn);
    let publisher = MemoryPublisher::new();
    let relay = Relay::new(
        store(&db, PgStoreOptions::default()).await,
        publisher.clone(),
        fast_options(),
    );
    assert_eq!(relay.drain().await.unwrap().published, 20);
    tokio::time::sleep(Duration::from_millis(200)).await;
    long_tx.commit().await.unwrap();
    assert_eq!(relay.drain().await.unwrap().published, 1);
    assert_eq!(publisher.published().last().unwrap().id, early);
    db.drop_db().await.unwrap();
}

/// A claim is bounded: a relay that holds events past the transaction bound loses them (the server
/// ends its session), another relay takes them, and the stale relay's settle changes nothing.
#[tokio::test]
async fn a_hung_claim_is_ended_by_the_bound_and_fenced() {
    let db = TestDb::new().await.unwrap();
    enqueue_interleaved(&db, 2, 3).await;
    let bounded = PgStoreOptions {
        transaction_timeout: Duration::from_millis(300),
        statement_timeout: Duration::from_millis(200),
        notify: false,
        ..PgStoreOptions::default()
    };
    let stalled_store = store(&db, bounded.clone()).await;
    let stalled = stalled_store.claim(10).await.unwrap();
    assert_eq!(stalled.events().len(), 6);

    // While the claim is held, another relay gets nothing (no later event of a held key).
    let other_store = store(&db, bounded).await;
    let nothing = other_store.claim(10).await.unwrap();
    assert_eq!(nothing.events().len(), 0);
    nothing.release().await.unwrap();

    tokio::time::sleep(Duration::from_millis(800)).await;
    let taken = other_store.claim(10).await.unwrap();
    assert_eq!(
        taken.events().len(),
        6,
        "events of a hung relay become claimable"
    );
    let outcomes = vec![outbox::Outcome::Published; 6];
    let report = taken.settle(&outcomes).await.unwrap();
    assert_eq!(report.published, 6);

    let stale = stalled.settle(&outcomes).await;
    assert!(matches!(stale, Err(StoreError::ClaimLost)), "{stale:?}");
    assert_eq!(remaining(&db).await, 0);
    db.drop_db().await.unwrap();
}

/// A broker that hangs is cut off by the publish timeout: its events are held for the
/// destination (a stall is the destination's failure: no attempt is counted), not stuck.
#[tokio::test]
async fn a_hanging_publisher_is_bounded_by_the_publish_timeout() {
    let db = TestDb::new().await.unwrap();
    enqueue_interleaved(&db, 1, 2).await;
    let hanging = MemoryPublisher::new().with_delay(Duration::from_secs(30));
    let mut options = fast_options();
    options.publish_timeout = Duration::from_millis(200);
    let relay = Relay::new(
        store(&db, PgStoreOptions::default()).await,
        hanging,
        options,
    );
    let started = Instant::now();
    let report = relay.run_once().await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(
        report.deferred, 1,
        "the key's head is held for the destination"
    );
    assert_eq!(report.retried, 0);
    let row = sqlx::query(
        "SELECT last_error, attempts, held_for FROM outbox_event WHERE status = 'parked' AND held_for IS NOT NULL",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let error: String = row.get(0);
    assert!(error.contains("relay.publish_timeout"), "{error}");
    assert_eq!(
        row.get::<i32, _>(1),
        0,
        "a stalled destination costs no attempt"
    );
    assert_eq!(row.get::<String, _>(2), "default");
    db.drop_db().await.unwrap();
}

/// A publisher that panics does not kill the relay; the event is retried and eventually dead.
#[tokio::test]
async fn a_panicking_publisher_fails_the_batch_not_the_relay() {
    struct Panics;
    #[async_trait::async_trait]
    impl Publisher for Panics {
        async fn publish(&self, _: &[outbox::OutboxEvent]) -> Vec<outbox::PublishResult> {
            panic!("bug in a publisher")
        }
    }
    let db = TestDb::new().await.unwrap();
    enqueue_interleaved(&db, 1, 1).await;
    let mut options = fast_options();
    options.max_attempts = 1;
    let relay = Relay::new(store(&db, PgStoreOptions::default()).await, Panics, options);
    let report = relay.run_once().await.unwrap();
    assert_eq!(report.dead, 1);
    let error: String = sqlx::query_scalar("SELECT last_error FROM outbox_event")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(error.contains("bug in a publisher"), "{error}");
    db.drop_db().await.unwrap();
}

/// With NOTIFY, a waiting relay publishes within milliseconds of a commit although its poll
/// interval is long; with notifications off it waits for the poll.
#[tokio::test]
async fn wakes_on_commit_instead_of_waiting_for_the_poll_interval() {
    let db = TestDb::new().await.unwrap();
    let publisher = MemoryPublisher::new();
    let mut options = fast_options();
    options.poll_interval = Duration::from_secs(30);
    let relay = Relay::new(
        store(&db, PgStoreOptions::default()).await,
        publisher.clone(),
        options,
    );
    let handle = relay.spawn();
    tokio::time::sleep(Duration::from_millis(300)).await; // let it go idle and ask for NOTIFY
    let outbox = Outbox::new(Schema::default());
    let mut conn = db.pool.acquire().await.unwrap();
    outbox
        .enqueue(&mut conn, NewEvent::new("a", "1", "Wake"))
        .await
        .unwrap();
    let woke = wait_until(Duration::from_secs(5), || async { publisher.count() == 1 }).await;
    handle.stop().await.unwrap();
    assert!(woke, "the relay did not wake on NOTIFY");

    // The request for notifications is what producers' trigger reads.
    let wanted: bool = sqlx::query_scalar(WANTED)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(wanted, "an idle relay keeps its wake-up request fresh");
    db.drop_db().await.unwrap();
}

/// An event committed while the relay starts (before it asked for notifications) is still found
/// at once: a relay whose request had lapsed looks once more before it waits.
#[tokio::test]
async fn an_event_committed_as_the_relay_starts_is_not_left_for_the_poll() {
    let db = TestDb::new().await.unwrap();
    let publisher = MemoryPublisher::new();
    let mut options = fast_options();
    options.poll_interval = Duration::from_secs(30);
    let relay = Relay::new(
        store(&db, PgStoreOptions::default()).await,
        publisher.clone(),
        options,
    );
    let outbox = Outbox::new(Schema::default());
    let mut tx = db.pool.begin().await.unwrap();
    outbox
        .enqueue(&mut tx, NewEvent::new("a", "1", "Racing"))
        .await
        .unwrap();
    let handle = relay.spawn();
    tokio::time::sleep(Duration::from_millis(50)).await;
    tx.commit().await.unwrap();
    let published = wait_until(Duration::from_secs(5), || async { publisher.count() == 1 }).await;
    handle.stop().await.unwrap();
    assert!(published, "the event waited for the 30 s poll");
    db.drop_db().await.unwrap();
}

/// Under a steady stream the relay polls instead of asking for NOTIFY, so producers stop paying
/// for wake-ups; once the stream stops it asks again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_under_load_stops_asking_producers_to_notify() {
    let db = TestDb::new().await.unwrap();
    let publisher = MemoryPublisher::new();
    let mut options = fast_options();
    options.poll_interval = Duration::from_millis(100); // the request lasts 2 × 200 ms
    options.active_period = Duration::from_millis(300);
    let relay = Relay::new(
        store(
            &db,
            PgStoreOptions {
                notify_window: Duration::from_millis(400),
                ..PgStoreOptions::default()
            },
        )
        .await,
        publisher.clone(),
        options,
    );
    let handle = relay.spawn();
    let wanted = || async {
        sqlx::query_scalar::<_, bool>(WANTED)
            .fetch_one(&db.pool)
            .await
            .unwrap()
    };
    assert!(
        wait_until(Duration::from_secs(5), &wanted).await,
        "an idle relay asks for NOTIFY"
    );

    let outbox = Outbox::new(Schema::default());
    let started = Instant::now();
    let mut lapsed_under_load = false;
    let mut sent = 0u64;
    while started.elapsed() < Duration::from_millis(1500) {
        let mut conn = db.pool.acquire().await.unwrap();
        outbox
            .enqueue(&mut conn, NewEvent::new("a", "stream", "Tick"))
            .await
            .unwrap();
        sent += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
        if started.elapsed() > Duration::from_millis(1000) && !wanted().await {
            lapsed_under_load = true;
        }
    }
    assert!(
        lapsed_under_load,
        "the request for NOTIFY should lapse while events keep coming"
    );
    assert!(
        wait_until(Duration::from_secs(5), || async {
            publisher.count() == sent
        })
        .await
    );
    assert!(
        wait_until(Duration::from_secs(5), &wanted).await,
        "idle again: asks for NOTIFY"
    );
    handle.stop().await.unwrap();
    db.drop_db().await.unwrap();
}

#[tokio::test]
async fn retention_keeps_published_events_then_purges_them_in_batches() {
    let db = TestDb::new().await.unwrap();
    enqueue_interleaved(&db, 5, 5).await;
    let options = PgStoreOptions {
        retention: Duration::from_millis(300),
        purge_batch: 7,
        ..PgStoreOptions::default()
    };
    let relay = Relay::new(
        store(&db, options).await,
        MemoryPublisher::new(),
        fast_options(),
    );
    relay.drain().await.unwrap();
    let kept: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox_event WHERE status = 'published' AND published_at IS NOT NULL",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(kept, 25, "published events are kept for the retention");
    let status = outbox::postgres::status(&db.pool, &Schema::default())
        .await
        .unwrap();
    assert_eq!((status.pending, status.published_retained), (0, 25));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(relay.store().purge_published().await.unwrap(), 25);
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_event")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(left, 0);
    db.drop_db().await.unwrap();
}

/// Stopping the embedded relay lets the in-flight batch finish (published and recorded) and claims
/// nothing more.
#[tokio::test]
async fn stop_finishes_the_in_flight_batch_and_claims_nothing_more() {
    let db = TestDb::new().await.unwrap();
    enqueue_interleaved(&db, 10, 10).await;
    let slow = MemoryPublisher::new().with_delay(Duration::from_millis(400));
    let mut options = fast_options();
    options.batch_size = 10;
    let relay = Relay::new(
        store(&db, PgStoreOptions::default()).await,
        slow.clone(),
        options,
    );
    let handle = relay.spawn();
    tokio::time::sleep(Duration::from_millis(100)).await; // the first batch is in flight
    let stats = handle.stop().await.unwrap();
    assert_eq!(stats.published, 10, "exactly the in-flight batch completes");
    assert_eq!(slow.count(), 10);
    assert_eq!(
        remaining(&db).await,
        90,
        "published events are recorded, the rest stay"
    );
    db.drop_db().await.unwrap();
}

// ---- Claim liveness, wake-ups and claim cost (issue 9, section 0) ----

/// Inserts rows by plain SQL: `(aggregate_type, aggregate_id, event_type)` in this order.
async fn insert_rows(db: &TestDb, rows: &[(&str, String, &str)]) {
    let mut tx = db.pool.begin().await.unwrap();
    for (t, id, event_type) in rows {
        sqlx::query(
            "INSERT INTO outbox_event (aggregate_type, aggregate_id, event_type, payload)
             VALUES ($1, $2, $3, '{}')",
        )
        .bind(t)
        .bind(id)
        .bind(event_type)
        .execute(&mut *tx)
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();
}

/// A relay frozen while it holds the heads of 100 keys (its broker stalled) must not keep a second
/// relay from 100 deliverable events of other keys, even though the next 100 rows in seq order all
/// belong to the held keys; and a drain behind it publishes every deliverable event.
#[tokio::test]
async fn a_frozen_relay_holding_a_claim_does_not_stall_other_keys() {
    let db = TestDb::new().await.unwrap();
    let mut rows = Vec::new();
    for round in ["First", "Second"] {
        for k in 0..100 {
            rows.push(("held", format!("o{k}"), round));
        }
    }
    for k in 0..100 {
        rows.push(("other", format!("k{k}"), "Deliverable"));
    }
    insert_rows(&db, &rows).await;
    let options = PgStoreOptions {
        notify: false,
        ..PgStoreOptions::default()
    };
    let frozen = store(&db, options.clone()).await;
    let held = frozen.claim(100).await.unwrap();
    assert_eq!(held.events().len(), 100);
    assert!(held.events().iter().all(|e| e.aggregate_type == "held"));

    let second = store(&db, options.clone()).await;
    let claim = second.claim(100).await.unwrap();
    assert_eq!(
        claim.events().len(),
        100,
        "the second relay must fill its batch from keys nobody holds"
    );
    assert!(claim.events().iter().all(|e| e.aggregate_type == "other"));
    claim.release().await.unwrap();

    let publisher = MemoryPublisher::new();
    let relay = Relay::new(store(&db, options).await, publisher.clone(), fast_options());
    let report = relay.drain().await.unwrap();
    assert_eq!(
        report.published, 100,
        "a drain behind a held claim publishes the rest"
    );
    assert!(publisher
        .published()
        .iter()
        .all(|e| e.aggregate_type == "other"));

    held.release().await.unwrap();
    let report = relay.drain().await.unwrap();
    assert_eq!(report.published, 200, "the held keys follow once released");
    assert!(order_violations(&publisher.published()).is_empty());
    db.drop_db().await.unwrap();
}

/// A wake-up that arrives while a claim finds nothing (here: right after it) ends the next wait at
/// once instead of being thrown away for a whole poll interval.
#[tokio::test]
async fn a_wake_up_during_an_empty_claim_is_not_lost() {
    let db = TestDb::new().await.unwrap();
    let store = store(&db, PgStoreOptions::default()).await;
    // The first wait returns at once to ask producers for notifications; from now on it waits.
    store
        .wait_for_events(store.wake_mark(), Duration::from_millis(10))
        .await;

    let mark = store.wake_mark();
    let claim = store.claim(10).await.unwrap();
    assert!(claim.events().is_empty());
    claim.release().await.unwrap();
    store.wake(); // what a NOTIFY received during the claim does
    let waited = tokio::time::timeout(
        Duration::from_secs(5),
        store.wait_for_events(mark, Duration::from_secs(30)),
    )
    .await;
    assert!(waited.is_ok(), "the wake-up during the claim was lost");
    db.drop_db().await.unwrap();
}

/// A producer in a REPEATABLE READ transaction whose snapshot predates the relay's request for
/// notifications still wakes it (the request is read outside MVCC).
#[tokio::test]
async fn repeatable_read_producers_wake_a_waiting_relay() {
    let db = TestDb::new().await.unwrap();
    let mut producer = db.pool.begin().await.unwrap();
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut *producer)
        .await
        .unwrap();
    sqlx::query("SELECT count(*) FROM outbox_event") // the snapshot is taken here
        .execute(&mut *producer)
        .await
        .unwrap();

    let publisher = MemoryPublisher::new();
    let mut options = fast_options();
    options.poll_interval = Duration::from_secs(30);
    let relay = Relay::new(
        store(&db, PgStoreOptions::default()).await,
        publisher.clone(),
        options,
    );
    let handle = relay.spawn();
    let wanted = || async {
        sqlx::query_scalar::<_, bool>(WANTED)
            .fetch_one(&db.pool)
            .await
            .unwrap()
    };
    assert!(wait_until(Duration::from_secs(5), wanted).await);
    tokio::time::sleep(Duration::from_millis(200)).await;

    Outbox::new(Schema::default())
        .enqueue(&mut producer, NewEvent::new("a", "1", "FromRepeatableRead"))
        .await
        .unwrap();
    producer.commit().await.unwrap();
    let woke = wait_until(Duration::from_secs(5), || async { publisher.count() == 1 }).await;
    handle.stop().await.unwrap();
    assert!(woke, "a REPEATABLE READ producer did not wake the relay");
    db.drop_db().await.unwrap();
}

/// An event whose backoff runs out is retried within about a second, not at the next poll.
#[tokio::test]
async fn an_expired_backoff_is_retried_without_waiting_for_the_poll() {
    let db = TestDb::new().await.unwrap();
    let id = Outbox::new(Schema::default())
        .enqueue(
            &mut db.pool.acquire().await.unwrap(),
            NewEvent::new("a", "1", "Flaky"),
        )
        .await
        .unwrap();
    let publisher = MemoryPublisher::new();
    publisher.fail(id, Fault::Retryable(1));
    let mut options = fast_options();
    options.poll_interval = Duration::from_secs(30);
    options.active_period = Duration::from_millis(100);
    options.backoff = Backoff {
        base: Duration::from_millis(1500),
        max: Duration::from_secs(2),
    };
    let relay = Relay::new(
        store(&db, PgStoreOptions::default()).await,
        publisher.clone(),
        options,
    );
    let handle = relay.spawn();
    let published = wait_until(Duration::from_secs(8), || async { publisher.count() == 1 }).await;
    handle.stop().await.unwrap();
    assert!(published, "the retry waited for the 30 s poll");
    db.drop_db().await.unwrap();
}

/// The most buffers any node of a claim's plan touched (the top node counts its children).
fn claim_buffers(plan: &serde_json::Value) -> u64 {
    fn walk(node: &serde_json::Value, most: &mut u64) {
        let get = |k: &str| node.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
        *most = (*most).max(get("Shared Hit Blocks") + get("Shared Read Blocks"));
        if let Some(children) = node.get("Plans").and_then(|p| p.as_array()) {
            for child in children {
                walk(child, most);
            }
        }
    }
    let mut most = 0;
    walk(&plan[0]["Plan"], &mut most);
    most
}

/// One line per plan node: type, index, rows, buffers (for the failure message).
fn plan_summary(plan: &serde_json::Value) -> String {
    fn walk(node: &serde_json::Value, depth: usize, out: &mut String) {
        let get = |k: &str| node.get(k).map(|v| v.to_string()).unwrap_or_default();
        out.push_str(&format!(
            "\n{}{} {} {} rows={} loops={} hit={} read={}",
            "  ".repeat(depth),
            get("Node Type"),
            get("Index Name"),
            get("Subplan Name"),
            get("Actual Rows"),
            get("Actual Loops"),
            get("Shared Hit Blocks"),
            get("Shared Read Blocks")
        ));
        if let Some(children) = node.get("Plans").and_then(|p| p.as_array()) {
            for child in children {
                walk(child, depth + 1, out);
            }
        }
    }
    let mut out = String::new();
    walk(&plan[0]["Plan"], 0, &mut out);
    out
}

/// The buffers a claim of `FRESH` new events touches when `keys` keys with 100 events each wait
/// at the front of the outbox (their first event in backoff, put there by the relay itself).
async fn claim_buffers_behind_waiting_keys(keys: usize) -> (u64, String) {
    const FRESH: usize = 50;
    let options = PgStoreOptions {
        notify: false,
        ..PgStoreOptions::default()
    };
    let db = TestDb::new().await.unwrap();
    sqlx::query(
        "INSERT INTO outbox_event (aggregate_type, aggregate_id, event_type, payload)
         SELECT 'blocked', 'b' || (g % $1), 'Blocked', '{}' FROM generate_series(0, $1 * 100 - 1) g",
    )
    .bind(i64::try_from(keys).unwrap())
    .execute(&db.pool)
    .await
    .unwrap();
    let publisher = MemoryPublisher::new();
    publisher.fail_event_type("Blocked", Fault::Retryable(u32::MAX));
    let mut relay_options = fast_options();
    relay_options.batch_size = 100;
    relay_options.max_attempts = 100;
    relay_options.backoff = Backoff {
        base: Duration::from_secs(3600),
        max: Duration::from_secs(3600),
    };
    let relay = Relay::new(store(&db, options.clone()).await, publisher, relay_options);
    let report = relay.drain().await.unwrap();
    assert_eq!(
        report.retried as usize, keys,
        "every blocked key's head is in backoff"
    );
    let fresh: Vec<(&str, String, &str)> = (0..FRESH)
        .map(|k| ("fresh", format!("f{k}"), "Fresh"))
        .collect();
    insert_rows(&db, &fresh).await;
    relay.store().maintain().await.unwrap();
    // What autovacuum does in production (it is off on the test server).
    sqlx::query("VACUUM ANALYZE outbox_event")
        .execute(&db.pool)
        .await
        .unwrap();
    let waiting: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox_event WHERE aggregate_type = 'blocked' AND status <> 'published'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(waiting as usize, keys * 100);
    let claimer = store(&db, options).await;
    let plan = claimer.explain_claim(FRESH).await.unwrap();
    let claim = claimer.claim(FRESH).await.unwrap();
    assert_eq!(claim.events().len(), FRESH);
    assert!(claim.events().iter().all(|e| e.aggregate_type == "fresh"));
    claim.release().await.unwrap();
    db.drop_db().await.unwrap();
    (claim_buffers(&plan), plan_summary(&plan))
}

/// A claim costs what its batch costs, not what waits: claiming 50 fresh events behind 200,000
/// waiting events (2,000 keys whose first event is in backoff, 99 more behind each) touches about
/// as many buffers as behind 20,000. Measured in buffers, not time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_cost_stays_flat_with_200k_events_waiting() {
    let (small, _) = claim_buffers_behind_waiting_keys(200).await;
    let (large, plan) = claim_buffers_behind_waiting_keys(2000).await;
    assert!(
        large <= small * 2,
        "a claim behind 200k waiting events touched {large} buffers, behind 20k {small}:{plan}"
    );
}

// ---- Destination outages are not event failures (issue 9, section 1) ----

/// With the broker down for 10× the whole attempt budget while producers keep committing, nothing
/// is dead-lettered, nothing is lost, every key stays in order, and the backlog drains within
/// seconds of the broker's return.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_outage_longer_than_the_attempt_budget_dead_letters_nothing() {
    let db = TestDb::new().await.unwrap();
    let publisher = MemoryPublisher::new();
    publisher.set_outage(Some("connection refused"));
    let mut options = fast_options(); // 5 attempts over ~0.3 s of backoff
    options.destination_backoff_max = Duration::from_millis(300);
    let relay = Relay::new(
        store(&db, PgStoreOptions::default()).await,
        publisher.clone(),
        options,
    );
    let handle = relay.spawn();
    let outbox = Outbox::new(Schema::default());
    let started = Instant::now();
    let mut committed = 0u64;
    while started.elapsed() < Duration::from_secs(3) {
        let mut tx = db.pool.begin().await.unwrap();
        for k in 0..5 {
            outbox
                .enqueue(&mut tx, NewEvent::new("order", format!("k{k}"), "Placed"))
                .await
                .unwrap();
            committed += 1;
        }
        tx.commit().await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let dead_during: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox_event WHERE status = 'dead'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    let charged: i64 =
        sqlx::query_scalar("SELECT coalesce(max(attempts), 0)::bigint FROM outbox_event")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    let probes = publisher.calls_while_down();
    publisher.set_outage(None);
    let drained = wait_until(Duration::from_secs(10), || async {
        publisher.count() == committed
    })
    .await;
    handle.stop().await.unwrap();
    assert_eq!(dead_during, 0, "an outage dead-lettered events");
    assert_eq!(charged, 0, "an outage charged attempts to events");
    assert!(
        probes < 100,
        "the relay should probe a down destination, not send every event to it ({probes} calls)"
    );
    assert!(
        drained,
        "published {} of {committed} after recovery",
        publisher.count()
    );
    assert_eq!(remaining(&db).await, 0);
    assert!(order_violations(&publisher.published()).is_empty());
    db.drop_db().await.unwrap();
}

/// Two destinations behind one publisher: while one is down, the other keeps flowing, and the
/// down one's events are held for it (no attempt) until it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_destination_down_does_not_hold_back_another() {
    #[derive(Clone)]
    struct TwoBrokers {
        up: MemoryPublisher,
        down: MemoryPublisher,
    }
    #[async_trait::async_trait]
    impl Publisher for TwoBrokers {
        async fn publish(&self, batch: &[outbox::OutboxEvent]) -> Vec<outbox::PublishResult> {
            let mut results = Vec::new();
            for event in batch {
                let broker = if event.aggregate_type == "audit" {
                    &self.down
                } else {
                    &self.up
                };
                results.extend(broker.publish(std::slice::from_ref(event)).await);
            }
            results
        }
        fn destination_of(&self, event: &outbox::OutboxEvent) -> String {
            event.aggregate_type.clone()
        }
    }
    let db = TestDb::new().await.unwrap();
    let mut rows = Vec::new();
    for i in 0..50 {
        rows.push(("audit", format!("a{}", i % 5), "Audited"));
        rows.push(("order", format!("o{}", i % 5), "Placed"));
    }
    insert_rows(&db, &rows).await;
    let brokers = TwoBrokers {
        up: MemoryPublisher::new(),
        down: MemoryPublisher::new(),
    };
    brokers.down.set_outage(Some("queue does not exist"));
    let relay = Relay::new(
        store(&db, PgStoreOptions::default()).await,
        brokers.clone(),
        fast_options(),
    );
    let handle = relay.spawn();
    assert!(
        wait_until(Duration::from_secs(10), || async {
            brokers.up.count() == 50
        })
        .await,
        "the healthy destination was held back"
    );
    let held: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox_event WHERE held_for = 'audit' AND attempts = 0",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(held > 0, "the down destination's events are held for it");
    assert_eq!(brokers.down.count(), 0);
    brokers.down.set_outage(None);
    assert!(
        wait_until(Duration::from_secs(10), || async {
            brokers.down.count() == 50
        })
        .await,
        "the destination's events follow once it is back"
    );
    handle.stop().await.unwrap();
    assert_eq!(remaining(&db).await, 0);
    assert!(order_violations(&brokers.down.published()).is_empty());
    db.drop_db().await.unwrap();
}

// ---- Bounded memory (issue 9, section 2) ----

/// A claim stops at its byte budget (always taking one event), and an event larger than the
/// event limit is dead-lettered with the reason without being loaded; its key waits behind it.
#[tokio::test]
async fn a_claim_stops_at_its_byte_budget_and_refuses_oversized_events() {
    let db = TestDb::new().await.unwrap();
    let blob = |bytes: usize| serde_json::json!({ "blob": "x".repeat(bytes) }).to_string();
    let insert = |t: &'static str, id: String, payload: String| {
        let pool = db.pool.clone();
        async move {
            sqlx::query(
                "INSERT INTO outbox_event (aggregate_type, aggregate_id, event_type, payload)
                 VALUES ($1, $2, 'Big', $3::jsonb)",
            )
            .bind(t)
            .bind(id)
            .bind(payload)
            .execute(&pool)
            .await
            .unwrap();
        }
    };
    // Rows larger than the limit reach the table when the limit is lowered after they were
    // written (or the insert trigger is dropped); the relay must cope with them either way.
    sqlx::query("DROP TRIGGER outbox_event_payload_size ON outbox_event")
        .execute(&db.pool)
        .await
        .unwrap();
    insert("huge", "h".into(), blob(2_000_000)).await;
    insert("huge", "h".into(), blob(10)).await;
    for k in 0..10 {
        insert("big", format!("b{k}"), blob(300_000)).await;
    }
    let options = PgStoreOptions {
        notify: false,
        max_batch_bytes: 1_000_000,
        max_event_bytes: 1_000_000,
        ..PgStoreOptions::default()
    };
    let store = store(&db, options).await;
    let claim = store.claim(100).await.unwrap();
    let kinds: Vec<&str> = claim
        .events()
        .iter()
        .map(|e| e.aggregate_type.as_str())
        .collect();
    assert_eq!(
        kinds,
        vec!["big"; 4],
        "four 300 kB events fit a 1 MB budget (the fourth starts below it); the huge key waits"
    );
    claim.release().await.unwrap();
    let (status, error): (String, String) = sqlx::query_as(
        "SELECT status, last_error FROM outbox_event WHERE aggregate_type = 'huge' ORDER BY seq LIMIT 1",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(status, "dead");
    assert!(
        error.contains("max_payload_bytes") && error.contains("not loaded"),
        "{error}"
    );
    db.drop_db().await.unwrap();
}

/// The embedded entry point applies the configuration: `relay.enabled = false` starts nothing,
/// and a publisher whose destinations fail the check is refused before anything is claimed.
#[tokio::test]
async fn start_relay_from_config_honours_enabled_and_checks_the_destinations_first() {
    struct Missing;
    #[async_trait::async_trait]
    impl Publisher for Missing {
        async fn publish(&self, batch: &[outbox::OutboxEvent]) -> Vec<outbox::PublishResult> {
            vec![Ok(()); batch.len()]
        }
        async fn check(&self) -> Result<(), outbox::PublishError> {
            Err(outbox::PublishError::permanent(
                "queue `orders` does not exist",
            ))
        }
    }
    let db = TestDb::new().await.unwrap();
    enqueue_interleaved(&db, 1, 1).await;
    let config = |enabled: bool| {
        outbox::Config::from_toml_str(
            &format!(
                "[default.relay]\nenabled = {enabled}\n[default.database]\nurl = \"{}\"\n",
                db.url
            ),
            "local",
        )
        .unwrap()
    };
    let off =
        outbox::start_relay_from_config(&config(false), db.pool.clone(), MemoryPublisher::new())
            .await
            .unwrap();
    assert!(off.is_none(), "relay.enabled = false starts no relay");

    let refused = outbox::start_relay_from_config(&config(true), db.pool.clone(), Missing).await;
    assert!(
        matches!(refused, Err(outbox::StartError::Publisher(_))),
        "a failed destination check stops the start: {:?}",
        refused.err()
    );
    assert_eq!(remaining(&db).await, 1, "nothing was claimed");

    let publisher = MemoryPublisher::new();
    let handle = outbox::start_relay_from_config(&config(true), db.pool.clone(), publisher.clone())
        .await
        .unwrap()
        .expect("enabled by default");
    assert!(wait_until(Duration::from_secs(5), || async { publisher.count() == 1 }).await);
    handle.stop().await.unwrap();
    db.drop_db().await.unwrap();
}

/// The example of a publisher kind of one's own (examples/custom_publisher.rs), held to the same
/// conformance suite as the broker crates' publishers.
#[path = "../../examples/custom_publisher.rs"]
#[allow(dead_code)]
mod custom_publisher;

mod custom_publisher_conformance {
    use super::custom_publisher::{PgTablePublisher, PgTableSettings};
    use async_trait::async_trait;
    use outbox::Publisher;
    use outbox_testkit::conformance::{self, Fixture, Received, Receiver};
    use outbox_testkit::TestDb;
    use sqlx::Row;
    use std::time::{Duration, Instant};

    struct Tables<'a> {
        db: &'a TestDb,
    }

    struct TableReceiver {
        pool: sqlx::PgPool,
        table: String,
        after: i64,
        total: usize,
    }

    #[async_trait]
    impl Receiver for TableReceiver {
        async fn receive(&mut self, n: usize, within: Duration) -> anyhow::Result<Vec<Received>> {
            let deadline = Instant::now() + within;
            let mut out = Vec::new();
            loop {
                let rows = sqlx::query(&format!(
                    "SELECT n, id::text AS id, headers, payload FROM {} WHERE n > $1 ORDER BY n",
                    self.table
                ))
                .bind(self.after)
                .fetch_all(&self.pool)
                .await?;
                for row in rows {
                    self.after = row.get("n");
                    let headers: serde_json::Value = row.get("headers");
                    out.push(Received {
                        message_id: row.get("id"),
                        headers: serde_json::from_value(headers)?,
                        body: row.get("payload"),
                    });
                    self.total += 1;
                }
                if self.total >= n || Instant::now() >= deadline {
                    return Ok(out);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    impl Tables<'_> {
        fn publisher(&self, url: &str, table: &str) -> Box<dyn Publisher> {
            Box::new(
                PgTablePublisher::new(PgTableSettings {
                    url: url.to_owned(),
                    table: table.to_owned(),
                    max_payload_bytes: 64 * 1024,
                })
                .expect("a lazy pool"),
            )
        }
    }

    #[async_trait]
    impl Fixture for Tables<'_> {
        async fn fresh(&self) -> anyhow::Result<(Box<dyn Publisher>, Box<dyn Receiver>)> {
            let table = format!("copy_{}", uuid::Uuid::new_v4().simple());
            sqlx::query(&format!(
                "CREATE TABLE {table} (id uuid PRIMARY KEY, headers jsonb, payload jsonb, n bigserial)"
            ))
            .execute(&self.db.pool)
            .await?;
            let receiver = TableReceiver {
                pool: self.db.pool.clone(),
                table: table.clone(),
                after: 0,
                total: 0,
            };
            Ok((self.publisher(&self.db.url, &table), Box::new(receiver)))
        }

        async fn unreachable(&self) -> anyhow::Result<Box<dyn Publisher>> {
            Ok(self.publisher("postgres://postgres@127.0.0.1:1/nowhere", "t"))
        }

        async fn missing(&self) -> anyhow::Result<(Box<dyn Publisher>, String)> {
            let table = format!("missing_{}", uuid::Uuid::new_v4().simple());
            Ok((self.publisher(&self.db.url, &table), table))
        }

        fn oversized_payload_bytes(&self) -> Option<usize> {
            Some(64 * 1024 + 1)
        }
    }

    #[tokio::test]
    async fn custom_publisher_passes_the_conformance_suite() {
        let db = TestDb::new().await.unwrap();
        conformance::run(&Tables { db: &db }, &db).await.unwrap();
    }
}

/// Issue 10 §6: a replay or delete of many dead events runs in short transactions, reports its
/// progress between them, and stops cleanly when asked: what was done stays done, the rest stays
/// dead, and the same call continues. (Each transaction releases its keys' parked events; the
/// test above proves that part.)
#[tokio::test]
async fn a_long_replay_reports_progress_and_stops_between_batches() {
    use std::ops::ControlFlow;

    use outbox::postgres::{
        delete_dead_with_progress, replay_dead, replay_dead_with_progress, DeadFilter,
        DeadSelection, DEAD_CHANGE_BATCH,
    };
    let db = TestDb::new().await.unwrap();
    let schema = Schema::default();
    let total = 2 * DEAD_CHANGE_BATCH + 500;
    let outbox = Outbox::new(schema.clone());
    let mut conn = db.pool.acquire().await.unwrap();
    outbox
        .enqueue_all(
            &mut conn,
            (0..total).map(|i| NewEvent::new("a", format!("k{i}"), "Dead")),
        )
        .await
        .unwrap();
    drop(conn);
    sqlx::query("UPDATE outbox_event SET status = 'dead', attempts = 3, last_error = 'x'")
        .execute(&db.pool)
        .await
        .unwrap();
    let dead = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM outbox_event WHERE status = 'dead'")
            .fetch_one(&db.pool)
            .await
            .unwrap() as usize
    };
    let all = DeadSelection::Matching(DeadFilter::default());

    // Stopped after the first transaction.
    let mut reports = Vec::new();
    let change = replay_dead_with_progress(&db.pool, &schema, &all, |so_far| {
        reports.push(so_far.changed.len());
        ControlFlow::Break(())
    })
    .await
    .unwrap();
    assert!(change.interrupted);
    assert_eq!(reports, vec![DEAD_CHANGE_BATCH]);
    assert_eq!(change.changed.len(), DEAD_CHANGE_BATCH);
    assert!(
        change.not_found.is_empty(),
        "nothing is reported missing when interrupted"
    );
    assert_eq!(dead().await, total - DEAD_CHANGE_BATCH);

    // The same call continues, reporting after each full transaction.
    let mut reports = Vec::new();
    let change = replay_dead_with_progress(&db.pool, &schema, &all, |so_far| {
        reports.push(so_far.changed.len());
        ControlFlow::Continue(())
    })
    .await
    .unwrap();
    assert!(!change.interrupted);
    assert_eq!(reports, vec![DEAD_CHANGE_BATCH]);
    assert_eq!(change.changed.len(), total - DEAD_CHANGE_BATCH);
    assert_eq!(dead().await, 0);
    let pending: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox_event WHERE status = 'pending'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(pending as usize, total, "every event was replayed once");

    // Deletes batch the same way; ids over several batches keep their not-found report.
    sqlx::query("UPDATE outbox_event SET status = 'dead'")
        .execute(&db.pool)
        .await
        .unwrap();
    let mut ids: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT id FROM outbox_event ORDER BY seq")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    let missing = uuid::Uuid::now_v7();
    ids.push(missing);
    let change = delete_dead_with_progress(&db.pool, &schema, &DeadSelection::Ids(ids), |_| {
        ControlFlow::Continue(())
    })
    .await
    .unwrap();
    assert_eq!(change.changed.len(), total);
    assert_eq!(change.not_found, vec![missing]);
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_event")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(left, 0);
    assert!(replay_dead(&db.pool, &schema, &all)
        .await
        .unwrap()
        .changed
        .is_empty());
}

// ---- Delayed events (issue 13) ----

/// A relay with a 30 s poll that stops polling 100 ms after its last event: anything published
/// later than that came from a wake-up, not from the poll.
async fn spawn_slow_poll_relay(db: &TestDb, publisher: &MemoryPublisher) -> outbox::RelayHandle {
    let mut options = fast_options();
    options.poll_interval = Duration::from_secs(30);
    options.active_period = Duration::from_millis(100);
    Relay::new(
        store(db, PgStoreOptions::default()).await,
        publisher.clone(),
        options,
    )
    .spawn()
}

fn event_types(publisher: &MemoryPublisher, aggregate_id: &str) -> Vec<String> {
    publisher
        .published()
        .into_iter()
        .filter(|e| e.aggregate_id == aggregate_id)
        .map(|e| e.event_type)
        .collect()
}

/// A delayed event is not published before its time and is published soon after it, without
/// waiting for the poll interval; later events of its key wait behind it and follow it in order;
/// other keys are not held up.
#[tokio::test]
async fn a_delayed_event_holds_its_key_until_it_is_published_soon_after_its_time() {
    let db = TestDb::new().await.unwrap();
    let publisher = MemoryPublisher::new();
    let handle = spawn_slow_poll_relay(&db, &publisher).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let due = chrono::Utc::now() + chrono::Duration::milliseconds(2000);
    let outbox = Outbox::new(Schema::default());
    let mut tx = db.pool.begin().await.unwrap();
    outbox
        .enqueue_all(
            &mut tx,
            [
                NewEvent::new("order", "k", "Delayed").deliver_after(due),
                NewEvent::new("order", "k", "After"),
                NewEvent::new("order", "other", "Now"),
            ],
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let other = wait_until(Duration::from_millis(1500), || async {
        !event_types(&publisher, "other").is_empty()
    })
    .await;
    assert!(other, "another key waited for the delayed event");
    let before = (due - chrono::Utc::now()).to_std().unwrap_or_default();
    tokio::time::sleep(before.saturating_sub(Duration::from_millis(150))).await;
    assert!(
        event_types(&publisher, "k").is_empty(),
        "published before its time"
    );
    let both = wait_until(Duration::from_secs(4), || async {
        event_types(&publisher, "k").len() == 2
    })
    .await;
    let at = chrono::Utc::now();
    handle.stop().await.unwrap();
    assert!(
        both,
        "not published within 4 s of its time (poll interval 30 s)"
    );
    assert!(at >= due);
    assert_eq!(event_types(&publisher, "k"), ["Delayed", "After"]);
    assert!(order_violations(&publisher.published()).is_empty());
    db.drop_db().await.unwrap();
}

/// `holds_key = false` (here from plain SQL, the column SQL producers set): the later events of
/// the key are published while the delayed one waits; it follows when due.
#[tokio::test]
async fn a_delayed_event_that_does_not_hold_its_key_lets_later_events_pass() {
    let db = TestDb::new().await.unwrap();
    let publisher = MemoryPublisher::new();
    let handle = spawn_slow_poll_relay(&db, &publisher).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut tx = db.pool.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO outbox_event (aggregate_type, aggregate_id, event_type, payload, available_at, holds_key)
         VALUES ('order', 'k', 'Reminder', '{}', now() + interval '2 seconds', false)",
    )
    .execute(&mut *tx)
    .await
    .unwrap();
    let due: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT available_at FROM outbox_event WHERE event_type = 'Reminder'")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
    Outbox::new(Schema::default())
        .enqueue(&mut tx, NewEvent::new("order", "k", "Paid"))
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let passed = wait_until(Duration::from_millis(1500), || async {
        event_types(&publisher, "k") == ["Paid"]
    })
    .await;
    assert!(
        passed,
        "the later event of the key waited for the delayed one"
    );
    assert!(chrono::Utc::now() < due, "the test ran too slowly to tell");
    let delayed = wait_until(Duration::from_secs(5), || async {
        event_types(&publisher, "k").len() == 2
    })
    .await;
    let at = chrono::Utc::now();
    handle.stop().await.unwrap();
    assert!(
        delayed,
        "the delayed event was not published within 3 s of its time"
    );
    assert!(at >= due, "published before its time");
    assert_eq!(event_types(&publisher, "k"), ["Paid", "Reminder"]);
    db.drop_db().await.unwrap();
}

/// A delayed event's state in the table: parked (holds its key) or scheduled (does not); the
/// later events of a key whose delayed head waits are parked by maintenance out of the claim's
/// way, and a claim meanwhile returns only the other keys.
#[tokio::test]
async fn delayed_events_stay_out_of_the_claim_until_due() {
    let db = TestDb::new().await.unwrap();
    let later = chrono::Utc::now() + chrono::Duration::hours(1);
    let outbox = Outbox::new(Schema::default());
    let mut tx = db.pool.begin().await.unwrap();
    outbox
        .enqueue_all(
            &mut tx,
            [
                NewEvent::new("a", "held", "Delayed").deliver_after(later),
                NewEvent::new("a", "held", "Behind"),
                NewEvent::new("a", "free", "Delayed")
                    .deliver_after(later)
                    .holds_key(false),
                NewEvent::new("a", "free", "Passes"),
                NewEvent::new("a", "past", "NotDelayed")
                    .deliver_after(chrono::Utc::now() - chrono::Duration::minutes(1)),
            ],
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let states: Vec<(String, String, String)> =
        sqlx::query_as("SELECT aggregate_id, event_type, status FROM outbox_event ORDER BY seq")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    let status = |id: &str, ty: &str| {
        states
            .iter()
            .find(|(a, t, _)| a == id && t == ty)
            .map(|(_, _, s)| s.clone())
            .unwrap_or_default()
    };
    assert_eq!(status("held", "Delayed"), "parked");
    assert_eq!(status("free", "Delayed"), "scheduled");
    assert_eq!(status("past", "NotDelayed"), "pending");

    let store = store(&db, PgStoreOptions::default()).await;
    store.maintain().await.unwrap();
    assert_eq!(status("held", "Behind"), "pending");
    let parked: String = sqlx::query_scalar(
        "SELECT status FROM outbox_event WHERE aggregate_id = 'held' AND event_type = 'Behind'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        parked, "parked",
        "maintenance parks what waits behind a delayed head"
    );
    let claim = store.claim(10).await.unwrap();
    let mut got: Vec<String> = claim
        .events()
        .iter()
        .map(|e| format!("{}/{}", e.aggregate_id, e.event_type))
        .collect();
    got.sort();
    assert_eq!(got, ["free/Passes", "past/NotDelayed"]);
    claim.release().await.unwrap();

    // Due now: maintenance releases both delayed events, and the key's order holds again.
    sqlx::query("UPDATE outbox_event SET available_at = now() WHERE event_type = 'Delayed'")
        .execute(&db.pool)
        .await
        .unwrap();
    store.maintain().await.unwrap();
    let publisher = MemoryPublisher::new();
    let relay = Relay::new(store, publisher.clone(), fast_options());
    relay.drain().await.unwrap();
    assert_eq!(
        event_types(&publisher, "held"),
        ["Delayed", "Behind"],
        "the delayed head is published first, then what waited behind it"
    );
    assert_eq!(
        event_types(&publisher, "free"),
        ["Delayed", "Passes"],
        "once due, a delayed event is ordered by its seq again: what was not published yet follows it"
    );
    assert_eq!(remaining(&db).await, 0);
    db.drop_db().await.unwrap();
}
