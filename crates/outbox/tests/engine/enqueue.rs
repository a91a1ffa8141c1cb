//! The producer side against a real PostgreSQL: atomic enqueue, the SQL contract for other
//! languages, migrations.

use outbox::postgres::{
    check_schema, latest_version, migrate, migration_sql, settings_drift, MigrateError,
    MigrateOptions, SchemaCheckError,
};
use outbox::{EnqueueError, EventError, EventLimits, NewEvent, Outbox, Schema};
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
    assert_eq!(
        applied,
        outbox::postgres::MIGRATIONS.len(),
        "exactly one concurrent migrate applies each version"
    );
    assert_eq!(
        check_schema(&db.pool, &schema).await.unwrap(),
        latest_version()
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

/// The printed script is what `migrate` runs: applied to an empty database it gives a schema that
/// the relay's check accepts and that `migrate` with the same settings leaves alone; it refuses to
/// run twice; `from` prints the rest for a schema at an earlier version.
#[tokio::test]
async fn the_printed_sql_is_what_migrate_runs_with_bookkeeping_and_settings() {
    let db = TestDb::empty().await.unwrap();
    let schema = Schema::new("printed").unwrap();
    let options = MigrateOptions {
        strict_key_order: true,
        max_payload_bytes: 1000,
    };
    let script = migration_sql(&schema, &options, 1).unwrap();
    sqlx::raw_sql(&script).execute(&db.pool).await.unwrap();
    assert_eq!(
        check_schema(&db.pool, &schema).await.unwrap(),
        latest_version(),
        "the script records the versions"
    );
    assert!(settings_drift(&db.pool, &schema, &options)
        .await
        .unwrap()
        .is_empty());
    let mut conn = db.pool.acquire().await.unwrap();
    let report = migrate(&mut conn, &schema, options).await.unwrap();
    assert!(report.is_unchanged(), "{report:?}");

    // The settings are in place: the strict trigger, and the payload limit.
    let strict: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'outbox_event_strict_key_order')",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(strict);
    let insert = |payload: String| {
        let pool = db.pool.clone();
        async move {
            sqlx::query(
                "INSERT INTO printed.outbox_event (aggregate_type, aggregate_id, event_type, payload)
                 VALUES ('a', '1', 'E', $1::jsonb)",
            )
            .bind(payload)
            .execute(&pool)
            .await
        }
    };
    insert("{}".into()).await.unwrap();
    let err = insert(format!("{{\"x\": \"{}\"}}", "y".repeat(1000)))
        .await
        .unwrap_err();
    let db_err = err.as_database_error().expect("refused by the table");
    assert_eq!(
        db_err.constraint(),
        Some("outbox_event_payload_size"),
        "{err}"
    );

    // Applied twice, it refuses to run (and changes nothing), naming the version and the fix.
    let again = sqlx::raw_sql(&script).execute(&db.pool).await.unwrap_err();
    let text = again.to_string();
    assert!(
        text.contains(&format!("is at version {}", latest_version()))
            && text.contains(&format!("--from {}", latest_version() + 1)),
        "{text}"
    );

    // A schema one version behind takes the script from the latest version.
    sqlx::query("DELETE FROM printed.outbox_schema_version WHERE version = $1")
        .bind(latest_version())
        .execute(&db.pool)
        .await
        .unwrap();
    assert!(matches!(
        check_schema(&db.pool, &schema).await,
        Err(SchemaCheckError::Outdated { .. })
    ));
    let rest = migration_sql(&schema, &options, latest_version()).unwrap();
    sqlx::raw_sql(&rest).execute(&db.pool).await.unwrap();
    assert_eq!(
        check_schema(&db.pool, &schema).await.unwrap(),
        latest_version()
    );
    // The settings only, after a configuration change.
    let looser = MigrateOptions {
        strict_key_order: false,
        max_payload_bytes: 5000,
    };
    let settings = migration_sql(&schema, &looser, latest_version() + 1).unwrap();
    sqlx::raw_sql(&settings).execute(&db.pool).await.unwrap();
    assert!(settings_drift(&db.pool, &schema, &looser)
        .await
        .unwrap()
        .is_empty());
    assert!(matches!(
        migration_sql(&schema, &looser, 99),
        Err(MigrateError::UnknownVersion { from: 99, .. })
    ));
    drop(conn);
    db.drop_db().await.unwrap();
}

/// `migrate` applies the configured settings and says when it changed one; a schema of a newer
/// version and someone else's `outbox_event` table are refused with the reason, changing nothing.
#[tokio::test]
async fn migrate_reports_setting_changes_and_refuses_newer_and_foreign_schemas() {
    let db = TestDb::empty().await.unwrap();
    let schema = Schema::default();
    let mut conn = db.pool.acquire().await.unwrap();
    let first = migrate(&mut conn, &schema, MigrateOptions::default())
        .await
        .unwrap();
    assert_eq!(first.current_version, latest_version());
    assert!(first.changed.is_empty(), "{first:?}");

    let strict = MigrateOptions {
        strict_key_order: true,
        ..MigrateOptions::default()
    };
    let report = migrate(&mut conn, &schema, strict).await.unwrap();
    assert!(report.applied.is_empty());
    assert_eq!(report.changed.len(), 1, "{report:?}");
    assert!(report.changed[0].contains("strict_key_order turned on"));
    assert!(migrate(&mut conn, &schema, strict)
        .await
        .unwrap()
        .is_unchanged());
    // A process configured without it is told at start (the relay logs this).
    let drift = settings_drift(&db.pool, &schema, &MigrateOptions::default())
        .await
        .unwrap();
    assert!(
        drift.len() == 1
            && drift[0]
                .contains("strict_key_order is off in this configuration but on in the database"),
        "{drift:?}"
    );
    let smaller = MigrateOptions {
        max_payload_bytes: 1000,
        ..strict
    };
    let report = migrate(&mut conn, &schema, smaller).await.unwrap();
    assert_eq!(
        report.changed,
        [format!(
            "the table's payload limit (events.max_payload_bytes) changed from {} to 1000 bytes",
            outbox::event::DEFAULT_MAX_PAYLOAD_BYTES
        )]
    );

    // A newer schema: refused, naming both versions.
    sqlx::query(
        "INSERT INTO outbox_schema_version (version, name) VALUES (999, 'from the future')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let err = migrate(&mut conn, &schema, smaller).await.unwrap_err();
    assert!(
        matches!(err, MigrateError::Newer { found: 999, .. }),
        "{err}"
    );
    let text = err.to_string();
    assert!(
        text.contains("version 999") && text.contains(&format!("({})", latest_version())),
        "{text}"
    );
    drop(conn);

    // Someone else's outbox_event table.
    let other = TestDb::empty().await.unwrap();
    sqlx::query("CREATE TABLE outbox_event (id int PRIMARY KEY, body text)")
        .execute(&other.pool)
        .await
        .unwrap();
    let mut conn = other.pool.acquire().await.unwrap();
    let err = migrate(&mut conn, &schema, MigrateOptions::default())
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, MigrateError::ForeignTable { .. }), "{text}");
    assert!(
        text.contains("\"public\".outbox_event already exists and is not the outbox's")
            && text.contains("aggregate_type")
            && text.contains("schema = \"outbox\""),
        "{text}"
    );
    let created: bool =
        sqlx::query_scalar("SELECT to_regclass('public.outbox_schema_version') IS NOT NULL")
            .fetch_one(&other.pool)
            .await
            .unwrap();
    assert!(!created, "nothing was changed");
    // The advice works: another schema.
    let own = Schema::new("outbox").unwrap();
    migrate(&mut conn, &own, MigrateOptions::default())
        .await
        .unwrap();
    drop(conn);
    other.drop_db().await.unwrap();
    db.drop_db().await.unwrap();
}

/// SQL producers get the Rust API's payload limit from the table, measured the same way; rows over
/// a limit lowered later still take the relay's updates; both refusals read as "too large".
#[tokio::test]
async fn the_table_enforces_the_payload_limit_of_the_configuration() {
    let db = TestDb::with_schema(
        &Schema::default(),
        MigrateOptions {
            max_payload_bytes: 2000,
            ..MigrateOptions::default()
        },
    )
    .await
    .unwrap();
    let payload = |n: usize| format!("{{\"x\":\"{}\"}}", "y".repeat(n));
    // `{"x": "yyy..."}` is n + 9 bytes in PostgreSQL's text form.
    let fits = NewEvent::new("a", "1", "E")
        .raw_payload(serde_json::value::RawValue::from_string(payload(1991)).unwrap());
    assert_eq!(fits.payload_size(), 2000);
    let over = NewEvent::new("a", "1", "E")
        .raw_payload(serde_json::value::RawValue::from_string(payload(1992)).unwrap());
    let configured = Outbox::with_limits(
        Schema::default(),
        EventLimits {
            max_payload_bytes: 2000,
            ..EventLimits::default()
        },
    );
    let mut conn = db.pool.acquire().await.unwrap();
    configured.enqueue(&mut conn, fits.clone()).await.unwrap();
    let err = configured
        .enqueue(&mut conn, over.clone())
        .await
        .unwrap_err();
    assert!(err.is_too_large() && err.is_invalid(), "{err}");
    assert!(matches!(
        err,
        EnqueueError::Invalid(EventError::PayloadTooLarge {
            len: 2001,
            limit: 2000
        })
    ));
    // A producer configured with a higher limit than the table's: the table refuses.
    let looser = Outbox::with_limits(
        Schema::default(),
        EventLimits {
            max_payload_bytes: 10_000,
            ..EventLimits::default()
        },
    );
    let err = looser.enqueue(&mut conn, over).await.unwrap_err();
    assert!(matches!(err, EnqueueError::Database(_)), "{err}");
    assert!(err.is_too_large() && err.is_invalid(), "{err}");
    assert!(
        err.to_string().contains("over the limit of 2000 bytes"),
        "{err}"
    );
    // The SQL path measures like the API.
    for (n, ok) in [(1991, true), (1992, false)] {
        let r = sqlx::query(
            "INSERT INTO outbox_event (aggregate_type, aggregate_id, event_type, payload) VALUES ('a', '2', 'E', $1::jsonb)",
        )
        .bind(payload(n))
        .execute(&mut *conn)
        .await;
        assert_eq!(r.is_ok(), ok, "{n}: {r:?}");
    }
    // Lowering the limit later leaves existing rows workable: the relay's updates go through.
    migrate(
        &mut conn,
        &Schema::default(),
        MigrateOptions {
            max_payload_bytes: 100,
            ..MigrateOptions::default()
        },
    )
    .await
    .unwrap();
    let updated = sqlx::query(
        "UPDATE outbox_event SET attempts = attempts + 1, available_at = now(), status = 'dead'",
    )
    .execute(&mut *conn)
    .await
    .unwrap();
    assert_eq!(updated.rows_affected(), 2);
    drop(conn);
    db.drop_db().await.unwrap();
}

/// The producer entry point applies the whole configuration: schema and `[events]` limits, and
/// `migrate_from_config` the same limit and `strict_key_order`.
#[tokio::test]
async fn from_config_applies_schema_limits_and_strict_key_order() {
    let db = TestDb::empty().await.unwrap();
    let mut config: outbox::Config = serde_json::from_value(serde_json::json!({
        "schema": "configured",
        "strict_key_order": true,
        "events": {"max_payload_bytes": 500, "max_field_bytes": 8},
    }))
    .unwrap();
    config.profile = outbox::config::Profile::Local;
    config.validate().unwrap();
    let mut conn = db.pool.acquire().await.unwrap();
    outbox::migrate_from_config(&mut conn, &config)
        .await
        .unwrap();
    assert!(
        settings_drift(&db.pool, &config.schema, &MigrateOptions::from(&config))
            .await
            .unwrap()
            .is_empty()
    );
    let outbox = Outbox::from_config(&config);
    assert_eq!(outbox.schema().as_str(), "configured");
    let err = outbox
        .enqueue(&mut conn, NewEvent::new("order", "too-long-id", "E"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("over the limit of 8"), "{err}");
    let big = NewEvent::new("o", "1", "E")
        .payload(&serde_json::json!({"x": "y".repeat(600)}))
        .unwrap();
    assert!(outbox
        .enqueue(&mut conn, big)
        .await
        .unwrap_err()
        .is_too_large());
    outbox
        .enqueue(&mut conn, NewEvent::new("o", "1", "E"))
        .await
        .unwrap();
    drop(conn);
    db.drop_db().await.unwrap();
}

#[tokio::test]
async fn strict_key_order_makes_seq_follow_commit_order_within_a_key() {
    let db = TestDb::with_schema(
        &Schema::default(),
        MigrateOptions {
            strict_key_order: true,
            ..MigrateOptions::default()
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
