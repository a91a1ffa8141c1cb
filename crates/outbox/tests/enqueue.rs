//! The producer side against a real PostgreSQL: atomic enqueue, the SQL contract for other
//! languages, migrations.

use outbox::postgres::{check_schema, migrate, MigrateOptions, SchemaCheckError};
use outbox::{EnqueueError, EventError, NewEvent, Outbox, Schema};
use outbox_testkit::TestDb;
use serde::Serialize;
use sqlx::Row;

#[derive(Serialize)]
struct OrderPlaced {
    order_id: String,
    total_cents: i64,
}

async fn count(db: &TestDb) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM outbox_event")
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn rolled_back_transactions_leave_no_event_and_committed_ones_keep_all() {
    let db = TestDb::new().await.unwrap();
    sqlx::query("CREATE TABLE orders (id text PRIMARY KEY)")
        .execute(&db.pool)
        .await
        .unwrap();
    let outbox = Outbox::new(Schema::default());

    let mut tx = db.pool.begin().await.unwrap();
    sqlx::query("INSERT INTO orders VALUES ('o-1')")
        .execute(&mut *tx)
        .await
        .unwrap();
    let typed = NewEvent::new("order", "o-1", "OrderPlaced")
        .payload(&OrderPlaced {
            order_id: "o-1".into(),
            total_cents: 1250,
        })
        .unwrap();
    outbox.enqueue(&mut tx, typed).await.unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(
        count(&db).await,
        0,
        "a rolled-back transaction left an event"
    );

    let mut tx = db.pool.begin().await.unwrap();
    sqlx::query("INSERT INTO orders VALUES ('o-2')")
        .execute(&mut *tx)
        .await
        .unwrap();
    let id = outbox
        .enqueue(
            &mut tx,
            NewEvent::new("order", "o-2", "OrderPlaced")
                .payload(&serde_json::json!({"order_id": "o-2"}))
                .unwrap()
                .header("traceparent", "00-abc-def-01"),
        )
        .await
        .unwrap();
    let more = outbox
        .enqueue_all(
            &mut tx,
            (0..3).map(|i| NewEvent::new("order", "o-2", format!("Step{i}"))),
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(count(&db).await, 4);

    let rows = sqlx::query("SELECT id, event_type, headers->>'traceparent' AS tp, payload->>'order_id' AS oid FROM outbox_event ORDER BY seq")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(rows[0].get::<uuid::Uuid, _>("id"), id);
    assert_eq!(
        rows[0].get::<Option<String>, _>("tp").as_deref(),
        Some("00-abc-def-01")
    );
    assert_eq!(
        rows[0].get::<Option<String>, _>("oid").as_deref(),
        Some("o-2")
    );
    let types: Vec<String> = rows.iter().map(|r| r.get("event_type")).collect();
    assert_eq!(types, ["OrderPlaced", "Step0", "Step1", "Step2"]);
    assert_eq!(
        rows[1..]
            .iter()
            .map(|r| r.get::<uuid::Uuid, _>("id"))
            .collect::<Vec<_>>(),
        more
    );
    db.drop_db().await.unwrap();
}

#[tokio::test]
async fn invalid_events_are_refused_before_anything_is_written() {
    let db = TestDb::new().await.unwrap();
    let outbox = Outbox::new(Schema::default());
    let mut conn = db.pool.acquire().await.unwrap();
    let err = outbox
        .enqueue(
            &mut conn,
            NewEvent::new("order", "1", "Placed")
                .payload(&[1, 2, 3])
                .unwrap(),
        )
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        EnqueueError::Invalid(EventError::PayloadNotObject { .. })
    ));
    let err = outbox
        .enqueue(&mut conn, NewEvent::new("order", "", "Placed"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("aggregate_id"), "{err}");

    // A duplicate id (a retried producer request) is refused by the table, not published twice.
    let event = NewEvent::new("order", "1", "Placed");
    outbox.enqueue(&mut conn, event.clone()).await.unwrap();
    let err = outbox.enqueue(&mut conn, event).await.unwrap_err();
    assert!(matches!(err, EnqueueError::Database(_)));
    drop(conn);
    assert_eq!(count(&db).await, 1);
    db.drop_db().await.unwrap();
}

#[tokio::test]
async fn plain_sql_producers_get_defaults_and_clear_constraint_errors() {
    let db = TestDb::new().await.unwrap();
    sqlx::query(
        "INSERT INTO outbox_event (aggregate_type, aggregate_id, event_type, payload)
         VALUES ('invoice', 'i-1', 'InvoiceIssued', '{\"amount\": 10}')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let row = sqlx::query("SELECT id, headers::text AS h, status, attempts FROM outbox_event")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let id: uuid::Uuid = row.get("id");
    assert_eq!(
        id.get_version_num(),
        7,
        "default id must be a time-ordered UUID"
    );
    assert_eq!(row.get::<String, _>("h"), "{}");
    assert_eq!(row.get::<String, _>("status"), "pending");

    let bad = [
        ("'[1,2]'", "'{}'", "outbox_event_payload_must_be_object"),
        ("'\"text\"'", "'{}'", "outbox_event_payload_must_be_object"),
        (
            "'{}'",
            "'{\"n\": 1}'",
            "outbox_event_headers_must_be_string_map",
        ),
        ("'{}'", "'[]'", "outbox_event_headers_must_be_string_map"),
    ];
    for (payload, headers, constraint) in bad {
        let err = sqlx::query(&format!(
            "INSERT INTO outbox_event (aggregate_type, aggregate_id, event_type, payload, headers)
             VALUES ('a', '1', 'E', {payload}, {headers})"
        ))
        .execute(&db.pool)
        .await
        .unwrap_err();
        let db_err = err.as_database_error().expect("a constraint violation");
        assert_eq!(db_err.constraint(), Some(constraint), "{payload} {headers}");
    }
    assert_eq!(count(&db).await, 1);
    db.drop_db().await.unwrap();
}

#[tokio::test]
async fn migrations_are_idempotent_concurrent_safe_and_schema_scoped() {
    let db = TestDb::empty().await.unwrap();
    let schema = Schema::new("app_events").unwrap();
    assert!(matches!(
        check_schema(&db.pool, &schema).await,
        Err(SchemaCheckError::Missing(_))
    ));
    let mut runs = Vec::new();
    for _ in 0..3 {
        let pool = db.pool.clone();
        let schema = schema.clone();
        runs.push(tokio::spawn(async move {
            let mut conn = pool.acquire().await.unwrap();
            migrate(&mut conn, &schema, MigrateOptions::default())
                .await
                .unwrap()
        }));
    }
    let mut applied = 0;
    for run in runs {
        applied += run.await.unwrap().applied.len();
    }
    let latest = outbox::postgres::MIGRATIONS.len();
    assert_eq!(
        applied, latest,
        "exactly one concurrent migrate applies each version"
    );
    assert_eq!(
        check_schema(&db.pool, &schema).await.unwrap() as usize,
        latest
    );
    let in_public: bool =
        sqlx::query_scalar("SELECT to_regclass('public.outbox_event') IS NOT NULL")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(
        !in_public,
        "the table must live only in the configured schema"
    );

    let outbox = Outbox::new(schema.clone());
    let mut conn = db.pool.acquire().await.unwrap();
    outbox
        .enqueue(&mut conn, NewEvent::new("a", "1", "E"))
        .await
        .unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM app_events.outbox_event")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(n, 1);
    drop(conn);
    db.drop_db().await.unwrap();
}

#[tokio::test]
async fn the_printed_sql_installs_a_working_outbox() {
    let db = TestDb::empty().await.unwrap();
    let schema = Schema::new("printed").unwrap();
    sqlx::raw_sql(&outbox::postgres::migration_sql(&schema))
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO printed.outbox_event (aggregate_type, aggregate_id, event_type, payload)
         VALUES ('a', '1', 'E', '{}')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    db.drop_db().await.unwrap();
}

#[tokio::test]
async fn strict_key_order_makes_seq_follow_commit_order_within_a_key() {
    let db = TestDb::with_schema(
        &Schema::default(),
        MigrateOptions {
            strict_key_order: true,
        },
    )
    .await
    .unwrap();
    let outbox = Outbox::new(Schema::default());
    let mut first = db.pool.begin().await.unwrap();
    outbox
        .enqueue(&mut first, NewEvent::new("order", "k", "First"))
        .await
        .unwrap();

    // A second producer on the same key waits for the first to commit before it draws its seq.
    let pool = db.pool.clone();
    let o2 = outbox.clone();
    let second = tokio::spawn(async move {
        let mut tx = pool.begin().await.unwrap();
        o2.enqueue(&mut tx, NewEvent::new("order", "k", "Second"))
            .await
            .unwrap();
        tx.commit().await.unwrap();
    });
    // Another key is not held up.
    let mut other = db.pool.begin().await.unwrap();
    outbox
        .enqueue(&mut other, NewEvent::new("order", "other", "Other"))
        .await
        .unwrap();
    other.commit().await.unwrap();

    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(
        !second.is_finished(),
        "the second producer should wait for the key"
    );
    first.commit().await.unwrap();
    second.await.unwrap();
    let types: Vec<String> = sqlx::query_scalar(
        "SELECT event_type FROM outbox_event WHERE aggregate_id = 'k' ORDER BY seq",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(types, ["First", "Second"]);
    db.drop_db().await.unwrap();
}
