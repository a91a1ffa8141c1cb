//! Bad input: configuration mistakes fail through the `outbox` CLI with a clear error (the key and
//! the fix) and a non-zero exit before anything runs; bad events are refused at enqueue or
//! dead-lettered with a reason, and never crash the relay.

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use outbox::{EnqueueError, EventError, EventLimits, NewEvent, Outbox, Schema};
use outbox_faults::procs::{outbox_cli, run_cli, scratch};
use outbox_testkit::TestDb;

fn cli(dir: &Path, toml: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    run_cli(dir, toml, args, env)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[track_caller]
fn assert_fails(o: &Output, code: i32, needles: &[&str]) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(code), "exit code; stderr:\n{err}");
    for n in needles {
        assert!(err.contains(n), "stderr should contain {n:?}:\n{err}");
    }
}

#[test]
fn configuration_mistakes_name_the_key_and_the_fix_and_exit_2() {
    let dir = scratch("config");
    let db = "postgres://postgres@127.0.0.1:5432/postgres";
    let cases: &[(&str, &str, &[&str], &[&str])] = &[
        ("unknown profile", "", &["--profile", "qa", "relay"], &["unknown profile `qa`", "use one of local, dev, prod"]),
        ("unknown key", "[default.relay]\nbatchsize = 5\n", &["relay"], &["batchsize", "expected `one of", "batch_size"]),
        ("unknown section", "[staging]\nschema = \"x\"\n", &["relay"], &["[staging]", "use [default], [local], [dev] or [prod]"]),
        ("wrong type", "[default.relay]\nbatch_size = \"many\"\n", &["relay"], &["default.relay.batch_size", "expected usize"]),
        ("wrong duration", "[default.relay]\npoll_interval = \"soon\"\n", &["relay"], &["poll_interval"]),
        ("batch size 0", "[default.relay]\nbatch_size = 0\n", &["relay"], &["relay.batch_size", "use 1 to 10000"]),
        ("schema not an identifier", "[default]\nschema = \"app-outbox\"\n", &["relay"], &["default.schema", "not a plain identifier", "use letters, digits and `_`"]),
        ("publish timeout over the claim bound", "[default.relay]\npublish_timeout = \"60s\"\n", &["relay"], &["relay.transaction_timeout", "raise relay.transaction_timeout"]),
        ("unknown publisher", "[default]\npublisher = \"kafka\"\n", &["relay"], &["use stdout, file:PATH, null or destinations"]),
        ("unknown destination kind", "[default.destinations.q]\nkind = \"carrier-pigeon\"\n", &["relay"], &["destinations.q.kind", "carrier-pigeon", "use one of: ", "sqs", "file", "stdout"]),
        ("misspelt publisher section", "[default.awss]\nregion = \"eu-west-1\"\n", &["relay"], &["`awss`", "unknown key or section", "aws"]),
        ("destination without its required key", "[default.destinations.audit]\nkind = \"file\"\n", &["relay"], &["[destinations.audit]", "path"]),
        ("missing AWS destinations", "[default]\npublisher = \"destinations\"\n", &["relay"], &["`destinations`", "add one, e.g. [default.destinations.orders]"]),
        ("route to an unknown destination", "[default]\npublisher = \"destinations\"\n[default.destinations.q]\nkind = \"sqs\"\nqueue = \"q\"\n[[default.routes]]\nevent_type = \"X\"\ndestination = \"nope\"\n", &["relay"], &["routes[0].destination", "nope"]),
    ];
    for (what, toml, args, needles) in cases {
        let out = cli(&dir, toml, args, &[("DATABASE_URL", db)]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{what}: exit 2; stderr:\n{err}");
        for n in *needles {
            assert!(
                err.contains(n),
                "{what}: stderr should contain {n:?}:\n{err}"
            );
        }
        assert!(
            !err.contains("relay started"),
            "{what}: nothing ran:\n{err}"
        );
    }
    // The environment is configuration too, and is named as the source.
    let out = cli(
        &dir,
        "",
        &["config"],
        &[("OUTBOX_SCHEMA", "a;b"), ("DATABASE_URL", db)],
    );
    assert_fails(
        &out,
        2,
        &[
            "not a plain identifier",
            "environment variable OUTBOX_SCHEMA",
        ],
    );
    let out = cli(&dir, "", &["config"], &[("OUTBOX_RELAY__BATCH_SIZE", "0")]);
    assert_fails(
        &out,
        2,
        &["relay.batch_size", "(set by OUTBOX_RELAY__BATCH_SIZE)"],
    );
    // No database configured at all.
    let out = cli(&dir, "", &["relay"], &[]);
    assert_fails(&out, 2, &["database.url", "set DATABASE_URL"]);
    // A connection string that cannot work is a configuration error on every command.
    for (url, needle) in [
        ("postgres://app:Pw-9d2e@db:99999/app", "invalid port number"),
        (
            "mysql://app:Pw-9d2e@db/app",
            "the scheme `mysql` is not PostgreSQL",
        ),
        ("db.internal/app", "neither a URL nor key/value pairs"),
        ("host=db passwrd=Pw-9d2e", "unsupported keyword `passwrd`"),
    ] {
        for args in [&["relay"][..], &["migrate"], &["status"], &["config"]] {
            let out = cli(&dir, "", args, &[("DATABASE_URL", url)]);
            assert_fails(&out, 2, &["`database.url` (set by DATABASE_URL)", needle]);
            assert!(!stderr(&out).contains("Pw-9d2e"), "{}", stderr(&out));
        }
    }
    // Values that cannot work.
    for (toml, needle) in [
        (
            "[default.database]\nconnect_timeout = \"0s\"\n",
            "`database.connect_timeout`",
        ),
        (
            "[default.relay]\npoll_interval = \"1ms\"\n",
            "below the floor of 10ms",
        ),
        (
            "[default.events]\nmax_field_bytes = 0\n",
            "`events.max_field_bytes`",
        ),
    ] {
        let out = cli(&dir, toml, &["config"], &[]);
        assert_fails(&out, 2, &[needle]);
    }
}

#[test]
fn config_reports_every_problem_at_once_including_the_aws_sections() {
    let dir = scratch("config-all");
    let toml = "[default]\npublisher = \"destinations\"\n[default.relay]\nworkers = 0\n[default.destinations.q]\nkind = \"sqs\"\nqueue = \"q\"\nmax_entries = 11\n[[default.routes]]\nevent_type = \"X\"\ndestination = \"nope\"\n";
    let out = cli(
        &dir,
        toml,
        &["config"],
        &[
            ("OUTBOX_RELAY__BATCH_SIZE", "0"),
            ("DATABASE_URL", "mysql://app@db/app"),
        ],
    );
    assert_fails(
        &out,
        2,
        &[
            "5 configuration problems",
            "`relay.workers` (set by ",
            "`relay.batch_size` (set by OUTBOX_RELAY__BATCH_SIZE)",
            "`database.url` (set by DATABASE_URL)",
            "`destinations.q.max_entries`",
            "`routes[0].destination`",
        ],
    );
    assert!(out.stdout.is_empty(), "nothing printed as valid");
    // Valid: the resolved AWS settings with their defaults, and the largest deliverable event.
    let toml = "[default]\npublisher = \"destinations\"\ndefault_destination = \"q\"\n[default.destinations.q]\nkind = \"sqs\"\nqueue = \"q\"\n";
    let out = cli(&dir, toml, &["config"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["aws"]["region"], "us-east-1");
    assert_eq!(shown["aws"]["endpoints"]["sqs"], "http://localhost:4566");
    assert_eq!(shown["destinations"]["q"]["max_message_bytes"], 1_048_576);
    assert_eq!(shown["destinations"]["q"]["body"], "payload");
    assert_eq!(shown["max_event_bytes"], 1_048_576);
    assert_eq!(
        shown["events"]["max_payload_bytes"],
        outbox::event::DEFAULT_MAX_PAYLOAD_BYTES
    );
    // A payload limit above what every destination takes: valid, with a warning saying why.
    let out = cli(
        &dir,
        &format!("{toml}[default.events]\nmax_payload_bytes = 4194304\n"),
        &["config"],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("events.max_payload_bytes (4194304) is above the largest message any configured destination accepts (1048576 bytes)"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn an_unreachable_database_fails_fast_with_the_url_redacted() {
    let dir = scratch("unreachable");
    let _ = outbox_cli(); // built (if stale) before the clock starts
    let start = Instant::now();
    let out = cli(
        &dir,
        "[default.database]\nconnect_timeout = \"2s\"\n",
        &["relay"],
        &[(
            "DATABASE_URL",
            "postgres://app:Unreach4ble-Pw@127.0.0.1:1/app",
        )],
    );
    assert_fails(
        &out,
        1,
        &[
            "cannot connect to PostgreSQL at postgres://app:***@127.0.0.1:1/app",
            "check that the server is running",
        ],
    );
    assert!(!stderr(&out).contains("Unreach4ble-Pw"));
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "bounded by connect_timeout"
    );
}

#[tokio::test]
async fn a_bad_relay_configuration_claims_nothing() {
    // A database with a pending event: a relay whose configuration is wrong must exit before it
    // claims (the event keeps attempts = 0).
    let db = TestDb::new().await.unwrap();
    let outbox = Outbox::new(Schema::default());
    let mut tx = db.pool.begin().await.unwrap();
    outbox
        .enqueue(&mut tx, NewEvent::new("order", "1", "Placed"))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let dir = scratch("claims-nothing");
    for toml in [
        "[default]\npublisher = \"destinations\"\n",
        "[default]\npublisher = \"destinations\"\ndefault_destination = \"missing\"\n[default.destinations.q]\nkind = \"sqs\"\nqueue = \"q\"\n",
    ] {
        let out = cli(&dir, toml, &["relay"], &[("DATABASE_URL", &db.url)]);
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    }
    let (status, attempts): (String, i32) =
        sqlx::query_as("SELECT status, attempts FROM outbox_event")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!((status.as_str(), attempts), ("pending", 0));
    // An unmigrated schema: a clear error naming the fix.
    let out = cli(
        &dir,
        "[default]\nschema = \"elsewhere\"\n",
        &["relay", "--publisher", "null"],
        &[("DATABASE_URL", &db.url)],
    );
    assert_fails(
        &out,
        2,
        &[
            "not installed in schema `elsewhere`",
            "run `outbox migrate`",
        ],
    );
    db.drop_db().await.unwrap();
}

#[tokio::test]
async fn bad_events_are_refused_at_enqueue_with_a_clear_error() {
    let db = TestDb::new().await.unwrap();
    let outbox = Outbox::with_limits(
        Schema::default(),
        EventLimits {
            max_payload_bytes: 1024,
            max_field_bytes: 64,
        },
    );
    let mut conn = db.pool.acquire().await.unwrap();
    let cases: Vec<(NewEvent, &str)> = vec![
        (
            NewEvent::new("o", "1", "T").payload(&[1, 2]).unwrap(),
            "must be a JSON object, got an array",
        ),
        (
            NewEvent::new("o", "1", "T").payload(&"text").unwrap(),
            "got a string",
        ),
        (
            NewEvent::new("o", "1", "T")
                .payload(&serde_json::Value::Null)
                .unwrap(),
            "got null",
        ),
        (
            NewEvent::new("o", "1", "T")
                .payload(&serde_json::json!({"big": "x".repeat(2000)}))
                .unwrap(),
            "over the limit of 1024 (events.max_payload_bytes)",
        ),
        (
            NewEvent::new("o", "1", "T").header("", "v"),
            "header name is empty",
        ),
        (
            NewEvent::new("o", "1", "T").header("h", "v".repeat(100)),
            "header value",
        ),
        (NewEvent::new("", "1", "T"), "`aggregate_type` is empty"),
        (NewEvent::new("o", "1", "T").header("h", "nul\0byte"), "NUL"),
        (NewEvent::new("o", "id\0", "T"), "NUL"),
    ];
    for (event, needle) in cases {
        let err = outbox.enqueue(&mut conn, event).await.unwrap_err();
        assert!(
            matches!(err, EnqueueError::Invalid(_)),
            "refused before SQL: {err}"
        );
        assert!(err.to_string().contains(needle), "{needle:?} in: {err}");
    }
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_event")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(count, 0, "nothing was written");
    drop(conn);
    db.drop_db().await.unwrap();
}

#[tokio::test]
async fn the_sql_path_refuses_what_the_api_refuses() {
    let db = TestDb::new().await.unwrap();
    let insert = |payload: &'static str, headers: &'static str| {
        let pool = db.pool.clone();
        async move {
            sqlx::query(
                "INSERT INTO outbox_event (aggregate_type, aggregate_id, event_type, payload, headers)
                 VALUES ('o', '1', 'T', $1::jsonb, $2::jsonb)",
            )
            .bind(payload)
            .bind(headers)
            .execute(&pool)
            .await
        }
    };
    for (payload, headers, constraint) in [
        ("[1]", "{}", "outbox_event_payload_must_be_object"),
        ("\"s\"", "{}", "outbox_event_payload_must_be_object"),
        ("42", "{}", "outbox_event_payload_must_be_object"),
        ("null", "{}", "outbox_event_payload_must_be_object"),
        (
            "{}",
            "{\"n\": 1}",
            "outbox_event_headers_must_be_string_map",
        ),
        (
            "{}",
            "{\"\": \"v\"}",
            "outbox_event_headers_must_be_string_map",
        ),
        ("{}", "[\"a\"]", "outbox_event_headers_must_be_string_map"),
        (
            "{}",
            "{\"n\": {\"x\": \"y\"}}",
            "outbox_event_headers_must_be_string_map",
        ),
    ] {
        let err = insert(payload, headers).await.unwrap_err();
        let text = format!("{err}");
        let db_err = err
            .as_database_error()
            .map(|e| e.constraint().unwrap_or("").to_owned());
        assert_eq!(
            db_err.as_deref(),
            Some(constraint),
            "{payload} / {headers}: {text}"
        );
    }
    let empty: Result<_, _> = sqlx::query(
        "INSERT INTO outbox_event (aggregate_type, aggregate_id, event_type, payload) VALUES ('', '1', 'T', '{}')",
    )
    .execute(&db.pool)
    .await;
    assert!(empty
        .unwrap_err()
        .to_string()
        .contains("outbox_event_fields_not_empty"));
    db.drop_db().await.unwrap();
}

#[test]
fn limits_are_checked_in_the_producer_path() {
    let limits = EventLimits::default();
    let ok = NewEvent::new("o", "1", "T").header("traceparent", "00-abc-01");
    assert_eq!(ok.validate(&limits), Ok(()));
    assert!(matches!(
        NewEvent::new("o", "x".repeat(2000), "T").validate(&limits),
        Err(EventError::FieldTooLong {
            field: "aggregate_id",
            ..
        })
    ));
}
