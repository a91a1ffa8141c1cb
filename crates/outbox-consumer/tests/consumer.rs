//! The consumer against the emulator and a real Postgres: duplicates recognised by both
//! idempotency stores, failures redelivered and never marked seen, poison messages dead-lettered
//! by the redrive policy, slow handlers kept invisible, graceful shutdown.

mod any_broker;
mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use common::*;
use outbox_consumer::{
    Consumer, Delivery, DynamoIdempotency, DynamoOptions, Handled, Handler, HandlerError,
    InboxHandler, PgInbox,
};
use outbox_testkit::TestDb;
use sqlx::{PgConnection, PgPool};
use tokio::sync::watch;

/// Applies an event by inserting a row into `applied`; can fail its first `fail_first` calls (or
/// always) and be slow.
struct Recorder {
    calls: Arc<AtomicU32>,
    fail_first: u32,
    delay: Duration,
}

impl Recorder {
    fn new(fail_first: u32, delay: Duration) -> (Self, Arc<AtomicU32>) {
        let calls = Arc::new(AtomicU32::new(0));
        (
            Self {
                calls: calls.clone(),
                fail_first,
                delay,
            },
            calls,
        )
    }
}

#[async_trait]
impl InboxHandler for Recorder {
    async fn apply(&self, tx: &mut PgConnection, d: &Delivery) -> Result<(), HandlerError> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        // Written before the failure: the rollback must take it back with the "seen" mark.
        sqlx::query("INSERT INTO applied (event_id, receive_count) VALUES ($1, $2)")
            .bind(d.event_id)
            .bind(d.receive_count as i32)
            .execute(&mut *tx)
            .await?;
        tokio::time::sleep(self.delay).await;
        if call <= self.fail_first {
            return Err(format!("scripted failure {call}").into());
        }
        Ok(())
    }
}

/// Counts calls; the DynamoDB store's inner handler.
struct Counter(Arc<AtomicU32>);

#[async_trait]
impl Handler for Counter {
    async fn handle(&self, _: &Delivery) -> Result<Handled, HandlerError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(Handled::Processed)
    }
}

async fn applied_db() -> (TestDb, PgPool) {
    let db = TestDb::empty().await.unwrap();
    sqlx::query("CREATE TABLE applied (n bigserial PRIMARY KEY, event_id uuid NOT NULL, receive_count int NOT NULL)")
        .execute(&db.pool)
        .await
        .unwrap();
    let pool = db.pool.clone();
    (db, pool)
}

async fn applied(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM applied")
        .fetch_one(pool)
        .await
        .unwrap()
}

fn stopper() -> (
    watch::Sender<bool>,
    impl std::future::Future<Output = ()> + Send,
) {
    let (tx, mut rx) = watch::channel(false);
    (tx, async move {
        let _ = rx.wait_for(|s| *s).await;
    })
}

#[tokio::test]
async fn a_re_sent_event_is_applied_once_with_the_inbox() {
    let f = fixture(5, false).await;
    let (db, pool) = applied_db().await;
    let inbox = PgInbox::new(pool.clone(), "test");
    inbox.migrate().await.unwrap();
    let (recorder, calls) = Recorder::new(0, Duration::ZERO);
    let id = uuid::Uuid::now_v7();
    let body = serde_json::json!({"order_id": "o-1", "version": 1});
    send(&f, id, "o-1", "OrderPlaced", body.clone()).await;
    send(&f, id, "o-1", "OrderPlaced", body).await; // the re-sent copy

    let consumer = Consumer::new(
        f.clients.sqs.clone(),
        f.clients.s3.clone(),
        options(&f.queue_url, 5),
    )
    .unwrap();
    let stats = consumer.stats();
    let (stop, shutdown) = stopper();
    let handler = inbox.clone().handler(recorder);
    let run = tokio::spawn(async move { consumer.run(handler, shutdown).await });
    let both = eventually(Duration::from_secs(20), || async {
        let s = stats.snapshot();
        s.processed + s.duplicates >= 2
    })
    .await;
    stop.send(true).unwrap();
    let report = run.await.unwrap().unwrap();
    assert!(both, "both copies were not handled: {report:?}");
    assert_eq!(
        (report.processed, report.duplicates, report.failed),
        (1, 1, 0),
        "{report:?}"
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the handler ran for the duplicate"
    );
    assert_eq!(applied(&pool).await, 1);
    assert!(inbox.seen(id).await.unwrap());
    assert_eq!(report.deleted, 2, "both copies are deleted: {report:?}");
    assert_eq!(depth(&f.clients.sqs, &f.queue_url).await, 0);
    db.drop_db().await.unwrap();
}

#[tokio::test]
async fn a_re_sent_event_is_applied_once_with_dynamodb() {
    let f = fixture(5, false).await;
    let calls = Arc::new(AtomicU32::new(0));
    let mut dynamo = DynamoOptions::new(&f.table, "test");
    dynamo.ttl = Duration::from_secs(600);
    let handler = Arc::new(DynamoIdempotency::new(
        f.clients.dynamodb.clone(),
        dynamo,
        Counter(calls.clone()),
    ));
    let id = uuid::Uuid::now_v7();
    let body = serde_json::json!({"order_id": "o-1", "version": 1});
    send(&f, id, "o-1", "OrderPlaced", body.clone()).await;
    send(&f, id, "o-1", "OrderPlaced", body).await;
    // Handled one at a time (a concurrent copy would be refused as in progress and retried).
    let mut o = options(&f.queue_url, 5);
    o.max_in_flight = 1;
    let consumer = Consumer::new(f.clients.sqs.clone(), f.clients.s3.clone(), o).unwrap();
    let stats = consumer.stats();
    let (stop, shutdown) = stopper();
    let run = {
        let handler = handler.clone();
        tokio::spawn(async move { consumer.run(handler, shutdown).await })
    };
    let both = eventually(Duration::from_secs(20), || async {
        let s = stats.snapshot();
        s.processed + s.duplicates >= 2
    })
    .await;
    stop.send(true).unwrap();
    let report = run.await.unwrap().unwrap();
    assert!(both, "both copies were not handled: {report:?}");
    assert_eq!((report.processed, report.duplicates), (1, 1), "{report:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // The record is COMPLETED with a TTL in the future.
    let item = f
        .clients
        .dynamodb
        .get_item()
        .table_name(&f.table)
        .key(
            "pk",
            aws_sdk_dynamodb::types::AttributeValue::S(format!("test#{id}")),
        )
        .send()
        .await
        .unwrap();
    let item = item.item().expect("idempotency record");
    assert_eq!(item["status"].as_s().unwrap(), "COMPLETED");
    let expires: u64 = item["expires_at"].as_n().unwrap().parse().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        expires > now + 500 && expires <= now + 601,
        "expires_at {expires}, now {now}"
    );
}

#[tokio::test]
async fn a_failing_handler_is_not_marked_seen_and_is_redelivered() {
    let f = fixture(5, false).await;
    let (db, pool) = applied_db().await;
    let inbox = PgInbox::new(pool.clone(), "test");
    inbox.migrate().await.unwrap();
    let (recorder, calls) = Recorder::new(2, Duration::ZERO);
    let id = uuid::Uuid::now_v7();
    send(
        &f,
        id,
        "o-1",
        "OrderPlaced",
        serde_json::json!({"order_id": "o-1"}),
    )
    .await;

    let consumer = Consumer::new(
        f.clients.sqs.clone(),
        f.clients.s3.clone(),
        options(&f.queue_url, 1),
    )
    .unwrap();
    let stats = consumer.stats();
    let (stop, shutdown) = stopper();
    let handler = inbox.clone().handler(recorder);
    let run = tokio::spawn(async move { consumer.run(handler, shutdown).await });
    // After the first failure: nothing applied, not seen.
    assert!(
        eventually(Duration::from_secs(10), || async {
            stats.snapshot().failed >= 1
        })
        .await
    );
    assert!(
        !inbox.seen(id).await.unwrap(),
        "a failed event was marked seen"
    );
    assert_eq!(applied(&pool).await, 0, "a failed handler's write was kept");
    let done = eventually(Duration::from_secs(20), || async {
        stats.snapshot().processed >= 1
    })
    .await;
    stop.send(true).unwrap();
    let report = run.await.unwrap().unwrap();
    assert!(done, "never processed: {report:?}");
    assert_eq!((report.failed, report.processed), (2, 1), "{report:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    let receive_count: i32 = sqlx::query_scalar("SELECT receive_count FROM applied")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        receive_count, 3,
        "the success came with SQS's third delivery"
    );
    assert!(inbox.seen(id).await.unwrap());
    db.drop_db().await.unwrap();
}

#[tokio::test]
async fn a_poison_message_goes_to_the_dead_letter_queue() {
    let f = fixture(2, false).await;
    let (db, pool) = applied_db().await;
    let inbox = PgInbox::new(pool.clone(), "test");
    inbox.migrate().await.unwrap();
    let (recorder, calls) = Recorder::new(u32::MAX, Duration::ZERO);
    let poison = uuid::Uuid::now_v7();
    let fine = uuid::Uuid::now_v7();
    send(
        &f,
        poison,
        "o-1",
        "OrderPlaced",
        serde_json::json!({"order_id": "o-1"}),
    )
    .await;

    let consumer = Consumer::new(
        f.clients.sqs.clone(),
        f.clients.s3.clone(),
        options(&f.queue_url, 1),
    )
    .unwrap();
    let (stop, shutdown) = stopper();
    let handler = inbox.clone().handler(recorder);
    let run = tokio::spawn(async move { consumer.run(handler, shutdown).await });
    let moved = eventually(Duration::from_secs(25), || async {
        depth(&f.clients.sqs, &f.dlq_url).await == 1
    })
    .await;
    stop.send(true).unwrap();
    let report = run.await.unwrap().unwrap();
    assert!(
        moved,
        "the poison message did not reach the DLQ: {report:?}"
    );
    assert_eq!(
        report.failed, 2,
        "maxReceiveCount = 2 receives, then the DLQ: {report:?}"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(depth(&f.clients.sqs, &f.queue_url).await, 0);
    assert!(!inbox.seen(poison).await.unwrap());
    assert!(!inbox.seen(fine).await.unwrap());
    // The dead letter is the original message, with its event id.
    let out = f
        .clients
        .sqs
        .receive_message()
        .queue_url(&f.dlq_url)
        .message_attribute_names("All")
        .send()
        .await
        .unwrap();
    let id = out.messages()[0].message_attributes().unwrap()["outbox-event-id"]
        .string_value()
        .unwrap();
    assert_eq!(id, poison.to_string());
    db.drop_db().await.unwrap();
}

#[tokio::test]
async fn a_slow_handler_keeps_its_message_invisible_until_done() {
    let f = fixture(5, false).await;
    let (db, pool) = applied_db().await;
    let inbox = PgInbox::new(pool.clone(), "test");
    inbox.migrate().await.unwrap();
    // 4 s of work against a 2 s visibility timeout, renewed every second.
    let (recorder, calls) = Recorder::new(0, Duration::from_secs(4));
    send(
        &f,
        uuid::Uuid::now_v7(),
        "o-1",
        "OrderPlaced",
        serde_json::json!({"order_id": "o-1"}),
    )
    .await;
    let mut o = options(&f.queue_url, 2);
    o.extend_every = Duration::from_secs(1);
    let consumer = Consumer::new(f.clients.sqs.clone(), f.clients.s3.clone(), o).unwrap();
    let stats = consumer.stats();
    let (stop, shutdown) = stopper();
    let handler = inbox.handler(recorder);
    let run = tokio::spawn(async move { consumer.run(handler, shutdown).await });
    let done = eventually(Duration::from_secs(15), || async {
        stats.snapshot().processed >= 1
    })
    .await;
    // Past another visibility timeout: a lapse would have shown up as a second delivery.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.send(true).unwrap();
    let report = run.await.unwrap().unwrap();
    assert!(done, "{report:?}");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the message was delivered again while being handled: {report:?}"
    );
    assert!(report.visibility_extensions >= 2, "{report:?}");
    assert_eq!((report.received, report.duplicates), (1, 0), "{report:?}");
    assert_eq!(applied(&pool).await, 1);
    db.drop_db().await.unwrap();
}

#[tokio::test]
async fn shutdown_lets_in_flight_handlers_finish_and_flushes_deletes() {
    let f = fixture(5, false).await;
    let (db, pool) = applied_db().await;
    let inbox = PgInbox::new(pool.clone(), "test");
    inbox.migrate().await.unwrap();
    let (recorder, calls) = Recorder::new(0, Duration::from_millis(1500));
    for i in 0..3 {
        send(
            &f,
            uuid::Uuid::now_v7(),
            &format!("o-{i}"),
            "OrderPlaced",
            serde_json::json!({"order_id": i}),
        )
        .await;
    }
    let consumer = Consumer::new(
        f.clients.sqs.clone(),
        f.clients.s3.clone(),
        options(&f.queue_url, 10),
    )
    .unwrap();
    let (stop, shutdown) = stopper();
    let handler = inbox.handler(recorder);
    let run = tokio::spawn(async move { consumer.run(handler, shutdown).await });
    assert!(
        eventually(Duration::from_secs(10), || async {
            calls.load(Ordering::SeqCst) >= 1
        })
        .await
    );
    stop.send(true).unwrap();
    let report = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("shutdown is bounded")
        .unwrap()
        .unwrap();
    // Everything received was finished and deleted; nothing was left half done.
    assert_eq!(report.processed, report.received, "{report:?}");
    assert_eq!(report.deleted, report.processed, "{report:?}");
    assert_eq!(applied(&pool).await as u64, report.processed);
    assert_eq!(
        depth(&f.clients.sqs, &f.queue_url).await as u64,
        3 - report.processed
    );
    db.drop_db().await.unwrap();
}

#[tokio::test]
async fn a_stop_during_a_long_poll_abandons_no_message() {
    // A FIFO queue as the demo uses, and a visibility timeout far longer than the test: a message
    // taken by a poll nobody waits for any more would stay invisible for all of it.
    let f = fixture(5, true).await;
    let (db, pool) = applied_db().await;
    let inbox = PgInbox::new(pool.clone(), "test");
    inbox.migrate().await.unwrap();
    let mut o = options(&f.queue_url, 60);
    o.wait_time = Duration::from_secs(3);
    let (recorder, _) = Recorder::new(0, Duration::ZERO);
    let first = Consumer::new(f.clients.sqs.clone(), f.clients.s3.clone(), o.clone()).unwrap();
    let first_stats = first.stats();
    let (stop, shutdown) = stopper();
    let handler = inbox.clone().handler(recorder);
    let run = tokio::spawn(async move { first.run(handler, shutdown).await });
    // The queue is empty: the consumer is now inside a long poll.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.send(true).unwrap();
    // Events arrive while that poll is still open at the queue (as the next run's first events
    // did in the demo).
    let ids: Vec<uuid::Uuid> = (0..4).map(|_| uuid::Uuid::now_v7()).collect();
    for (i, id) in ids.iter().enumerate() {
        let order = format!("o-{}", i % 3);
        let body = serde_json::json!({"order_id": order, "n": i});
        send(&f, *id, &order, "OrderPlaced", body).await;
    }
    let bound = o.wait_time + outbox_consumer::consumer::RECEIVE_GRACE + Duration::from_secs(2);
    let report = tokio::time::timeout(bound, run)
        .await
        .expect("the stop is bounded by the wait time")
        .unwrap()
        .unwrap();

    // Whatever the stopped consumer did not handle, a new one receives at once, not after the
    // 60 s visibility timeout.
    let (recorder, _) = Recorder::new(0, Duration::ZERO);
    let second = Consumer::new(f.clients.sqs.clone(), f.clients.s3.clone(), o).unwrap();
    let second_stats = second.stats();
    let (stop, shutdown) = stopper();
    let handler = inbox.clone().handler(recorder);
    let run = tokio::spawn(async move { second.run(handler, shutdown).await });
    let all = eventually(Duration::from_secs(3), || async {
        first_stats.snapshot().processed + second_stats.snapshot().processed == 4
    })
    .await;
    stop.send(true).unwrap();
    let second_report = run.await.unwrap().unwrap();
    assert!(
        all,
        "messages sent during the stopped consumer's last poll stayed invisible: \
         stopped consumer {report:?}, new consumer {second_report:?}"
    );
    for id in &ids {
        assert!(inbox.seen(*id).await.unwrap(), "event {id} was not applied");
    }
    assert_eq!(applied(&pool).await, 4);
    assert_eq!(depth(&f.clients.sqs, &f.queue_url).await, 0);
    db.drop_db().await.unwrap();
}

/// The broker-independent API, as a Kafka or NATS consumer would use it with its own client: a
/// message redelivered (same event id) is applied once, a rolled-back attempt leaves no mark, and
/// the retention purge removes only marks older than asked.
#[tokio::test]
async fn first_time_applies_a_redelivered_event_once_for_any_broker_and_old_marks_are_purged() {
    let (_db, pool) = applied_db().await;
    let inbox = PgInbox::new(pool.clone(), "any-broker");
    inbox.migrate().await.unwrap();
    let event_id = uuid::Uuid::now_v7();
    // An attempt that fails after the mark: rolled back, so the redelivery applies it.
    let mut tx = pool.begin().await.unwrap();
    assert!(inbox.first_time(&mut tx, event_id).await.unwrap());
    tx.rollback().await.unwrap();
    assert!(!inbox.seen(event_id).await.unwrap());
    for _delivery in 0..3 {
        let mut tx = pool.begin().await.unwrap();
        if inbox.first_time(&mut tx, event_id).await.unwrap() {
            sqlx::query("INSERT INTO applied (event_id, receive_count) VALUES ($1, 1)")
                .bind(event_id)
                .execute(&mut *tx)
                .await
                .unwrap();
        }
        tx.commit().await.unwrap();
    }
    assert_eq!(
        applied(&pool).await,
        1,
        "applied once over three deliveries"
    );

    let old = uuid::Uuid::now_v7();
    let mut tx = pool.begin().await.unwrap();
    assert!(inbox.first_time(&mut tx, old).await.unwrap());
    tx.commit().await.unwrap();
    sqlx::query("UPDATE inbox SET received_at = now() - interval '20 days' WHERE event_id = $1")
        .bind(old)
        .execute(&pool)
        .await
        .unwrap();
    let purged = inbox
        .purge_older_than(Duration::from_secs(14 * 24 * 3600))
        .await
        .unwrap();
    assert_eq!(purged, 1);
    assert!(!inbox.seen(old).await.unwrap());
    assert!(inbox.seen(event_id).await.unwrap(), "recent marks stay");
}

/// Records the trace id of the span each delivery is handled in.
struct TraceRecorder(Arc<std::sync::Mutex<Vec<opentelemetry::trace::TraceId>>>);

#[async_trait]
impl Handler for TraceRecorder {
    async fn handle(&self, _: &Delivery) -> Result<Handled, HandlerError> {
        use opentelemetry::trace::TraceContextExt;
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        let context = tracing::Span::current().context();
        let trace_id = context.span().span_context().trace_id();
        self.0.lock().expect("lock").push(trace_id);
        Ok(Handled::Processed)
    }
}

/// Issue 10 §3: the trace context of the span active at `Outbox::enqueue` is stored with the event
/// (no header set by hand), the relay's publish span links to it, it travels in the SQS message
/// attributes, and the consumer's processing span continues the producer's trace.
#[tokio::test]
async fn the_producers_trace_id_is_read_back_at_the_consumer() {
    use opentelemetry::trace::{TraceContextExt, TracerProvider};
    use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
    use tracing::Instrument;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    use tracing_subscriber::layer::SubscriberExt;

    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("outbox-test")));
    // The test's runtime is single-threaded: the relay and the consumer run on this thread too.
    let _guard = tracing::subscriber::set_default(subscriber);

    let f = fixture(5, false).await;
    let db = TestDb::new().await.unwrap();
    let span = tracing::info_span!("place_order");
    async {
        let mut tx = db.pool.begin().await.unwrap();
        let event = outbox::NewEvent::new("order", "o-1", "OrderPlaced")
            .destination("q")
            .payload(&serde_json::json!({"order_id": "o-1"}))
            .unwrap();
        outbox::Outbox::new(Default::default())
            .enqueue(&mut tx, event)
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
    .instrument(span.clone())
    .await;
    let producer = span.context().span().span_context().clone();
    assert!(
        producer.is_valid(),
        "the test's producer span is not recorded"
    );
    drop(span);

    let stored: serde_json::Value = sqlx::query_scalar("SELECT headers FROM outbox_event")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let traceparent = stored["traceparent"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        traceparent.contains(&producer.trace_id().to_string()),
        "enqueue did not store the producer's trace context: {stored}"
    );

    let publisher = outbox::Registry::new()
        .with(outbox_aws::Aws)
        .build(&f.config)
        .await
        .unwrap();
    let store = outbox::PgStore::new(db.pool.clone(), Default::default())
        .await
        .unwrap();
    let relay = outbox::Relay::new(store, publisher, Default::default());
    assert_eq!(relay.drain().await.unwrap().published, 1);

    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let consumer = Consumer::new(
        f.clients.sqs.clone(),
        f.clients.s3.clone(),
        options(&f.queue_url, 5),
    )
    .unwrap();
    let stats = consumer.stats();
    let (stop, shutdown) = stopper();
    let recorder = TraceRecorder(seen.clone());
    let run = tokio::spawn(async move { consumer.run(recorder, shutdown).await });
    let handled = eventually(Duration::from_secs(20), || async {
        stats.snapshot().processed >= 1
    })
    .await;
    stop.send(true).unwrap();
    run.await.unwrap().unwrap();
    assert!(handled, "the event was not consumed");
    assert_eq!(
        *seen.lock().unwrap(),
        vec![producer.trace_id()],
        "the consumer's span is not in the producer's trace"
    );

    let spans = exporter.get_finished_spans().unwrap();
    let publish = spans
        .iter()
        .find(|s| s.name == "publish")
        .expect("no publish span was exported");
    assert_eq!(publish.span_kind, opentelemetry::trace::SpanKind::Producer);
    assert!(
        publish
            .links
            .iter()
            .any(|l| l.span_context.trace_id() == producer.trace_id()),
        "the publish span does not link to the producer's span: {:?}",
        publish.links
    );
    let process = spans
        .iter()
        .find(|s| s.name == "process")
        .expect("no process span was exported");
    assert_eq!(process.span_kind, opentelemetry::trace::SpanKind::Consumer);
    assert_eq!(process.span_context.trace_id(), producer.trace_id());
    assert_eq!(process.parent_span_id, producer.span_id());
    db.drop_db().await.unwrap();
}
