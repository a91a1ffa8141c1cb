//! Security: injection through every configured name, secrets never printed, and the relay
//! running as a role with only the grants docs/SECURITY.md lists.

use std::path::Path;
use std::process::Output;

use outbox::{NewEvent, Outbox, Schema};
use outbox_faults::procs::{outbox_cli, run_cli, scratch};
use outbox_testkit::TestDb;

fn cli(dir: &Path, toml: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    run_cli(dir, toml, args, env)
}

fn all_output(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `outbox relay --drain` to a JSON Lines file, as the role of `url`.
fn drain_to_file(dir: &Path, toml: &str, url: &str, file: &Path) -> Output {
    cli(
        dir,
        toml,
        &[
            "relay",
            "--publisher",
            &format!("file:{}", file.display()),
            "--drain",
        ],
        &[("DATABASE_URL", url)],
    )
}

/// A login role of the test's own with `grants` (`{db}` and `{role}` filled in), created with
/// `setup` (more SQL, run as the owner), and the URL that connects as it.
async fn role_with(db: &TestDb, prefix: &str, grants: &str, setup: &str) -> (String, String) {
    let role = format!("{prefix}_{}", &db.name[db.name.len() - 8..]);
    sqlx::raw_sql(&format!(
        "CREATE ROLE {role} LOGIN; {setup} {}",
        grants.replace("{db}", &db.name).replace("{role}", &role)
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    let url = db
        .url
        .replacen("postgres://postgres@", &format!("postgres://{role}@"), 1);
    assert_ne!(url, db.url);
    (role, url)
}

const INJECTIONS: &[&str] = &[
    "x\"; DROP TABLE canary; --",
    "public; DROP TABLE canary",
    "a'b",
    "x\" CASCADE --",
    "pg_catalog.pg_class",
    "$1",
    "a b",
];

#[tokio::test]
async fn injection_through_every_configured_name_is_refused_before_sql() {
    // The only configured SQL identifier is the schema (tables, sequence, functions and the
    // NOTIFY channel are derived from it). Try it through the file and the environment, on every
    // command that touches the database.
    let db = TestDb::new().await.unwrap();
    sqlx::query("CREATE TABLE canary (x int)")
        .execute(&db.pool)
        .await
        .unwrap();
    let dir = scratch("injection");
    for name in INJECTIONS {
        assert!(Schema::new(*name).is_err(), "{name}");
        let toml = format!("[default]\nschema = {}\n", toml_string(name));
        for args in [
            &["migrate"][..],
            &["migrate", "--print"],
            &["relay", "--publisher", "null", "--drain"],
            &["status"],
            &["dead", "list"],
            &["dead", "replay", "--all"],
        ] {
            let from_file = cli(&dir, &toml, args, &[("DATABASE_URL", &db.url)]);
            let from_env = cli(
                &dir,
                "",
                args,
                &[("DATABASE_URL", &db.url), ("OUTBOX_SCHEMA", name)],
            );
            for out in [from_file, from_env] {
                assert_eq!(
                    out.status.code(),
                    Some(2),
                    "{name} {args:?}: {}",
                    all_output(&out)
                );
                assert!(all_output(&out).contains("not a plain identifier"));
            }
        }
    }
    let still_there: bool = sqlx::query_scalar("SELECT to_regclass('public.canary') IS NOT NULL")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(still_there);
    db.drop_db().await.unwrap();
}

fn toml_string(s: &str) -> String {
    serde_json::to_string(s).unwrap() // a JSON string is a valid TOML basic string here
}

#[tokio::test]
async fn event_values_with_sql_metacharacters_travel_verbatim() {
    // Event values are bound parameters everywhere: they are stored and published unchanged.
    let db = TestDb::new().await.unwrap();
    let outbox = Outbox::new(Schema::default());
    let nasty = "'); DROP TABLE outbox_event; --\"$1\\";
    let mut tx = db.pool.begin().await.unwrap();
    let id = outbox
        .enqueue(
            &mut tx,
            NewEvent::new(nasty, nasty, nasty)
                .payload(&serde_json::json!({ "v": nasty }))
                .unwrap()
                .header(nasty, nasty)
                .destination(nasty),
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let dir = scratch("verbatim");
    let file = dir.join("events.jsonl");
    let out = drain_to_file(&dir, "", &db.url, &file);
    assert_eq!(out.status.code(), Some(0), "{}", all_output(&out));
    let line = std::fs::read_to_string(&file).unwrap();
    let event: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    assert_eq!(event["id"], id.to_string());
    for field in [
        "aggregate_type",
        "aggregate_id",
        "event_type",
        "destination",
    ] {
        assert_eq!(event[field], nasty, "{field}");
    }
    assert_eq!(event["payload"]["v"], nasty);
    assert_eq!(event["headers"][nasty], nasty);
    db.drop_db().await.unwrap();
}

#[tokio::test]
async fn secrets_never_reach_stderr_stdout_or_debug_output() {
    let dir = scratch("secrets");
    let pw = "Pw-8c1d9f7e-Secret";
    // Unreachable server, password in the URL's userinfo, as a parameter, and in libpq's
    // key/value form (plain and quoted); verbose logs.
    for url in [
        format!("postgres://app:{pw}@127.0.0.1:1/app"),
        format!("postgres://app@127.0.0.1:1/app?password={pw}&sslmode=prefer"),
        format!("host=127.0.0.1 port=1 user=app password={pw} dbname=app"),
        format!("host=127.0.0.1 port=1 user=app password='{pw} x' dbname=app"),
    ] {
        for args in [&["relay"][..], &["migrate"], &["status"]] {
            let out = cli(
                &dir,
                "[default.database]\nconnect_timeout = \"1s\"\n",
                args,
                &[("DATABASE_URL", &url), ("OUTBOX_LOG", "trace")],
            );
            assert_ne!(out.status.code(), Some(0));
            let text = all_output(&out);
            assert!(text.contains("***"), "the URL is shown redacted: {text}");
            assert!(!text.contains(pw), "{args:?} leaked the password:\n{text}");
        }
        // `outbox config` prints the resolved configuration.
        let out = cli(&dir, "", &["config"], &[("DATABASE_URL", &url)]);
        assert_eq!(out.status.code(), Some(0));
        let text = all_output(&out);
        assert!(!text.contains(pw), "{text}");
        assert!(text.contains("***"), "{text}");
        // Debug of the loaded configuration.
        let config = outbox::Config::load(&outbox::ConfigSource {
            file: Some(dir.join("outbox.toml")),
            profile: None,
            use_env: false,
            ..Default::default()
        })
        .unwrap();
        let mut config = config;
        config.database.url = outbox::config::DatabaseUrl::new(url.clone());
        assert!(!format!("{config:?}").contains(pw));
        assert!(!serde_json::to_string(&config).unwrap().contains(pw));
    }

    // AWS keys: the prod profile reads them from the environment; a failing start-up check
    // (nothing listens on the loopback endpoint) must not print the secret key, even at trace.
    let secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYSECRETKEY1";
    let db = TestDb::new().await.unwrap(); // migrated, so the relay gets as far as the AWS check
    let toml = "[default]\npublisher = \"destinations\"\ndefault_destination = \"q\"\n[default.destinations.q]\nkind = \"sqs\"\nqueue = \"q\"\n[default.aws]\nregion = \"us-east-1\"\n";
    let out = cli(
        &dir,
        toml,
        &["relay"],
        &[
            ("OUTBOX_PROFILE", "prod"),
            ("DATABASE_URL", &db.url),
            ("AWS_ACCESS_KEY_ID", "AKIAFAKEFAKEFAKE1234"),
            ("AWS_SECRET_ACCESS_KEY", secret),
            ("AWS_ENDPOINT_URL", "http://127.0.0.1:1"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
            ("AWS_CONFIG_FILE", "/nonexistent"),
            ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent"),
            ("OUTBOX_LOG", "trace"),
        ],
    );
    let text = all_output(&out);
    assert_ne!(out.status.code(), Some(0), "{text}");
    assert!(!text.contains(secret), "the AWS secret key leaked:\n{text}");
    assert!(
        text.contains("publisher check failed"),
        "it got as far as the AWS check:\n{text}"
    );
    eprintln!("{}", text.lines().last().unwrap_or_default());
    let out = cli(
        &dir,
        toml,
        &["config"],
        &[
            ("OUTBOX_PROFILE", "prod"),
            ("AWS_SECRET_ACCESS_KEY", secret),
        ],
    );
    assert!(!all_output(&out).contains(secret));
    db.drop_db().await.unwrap();
}

/// A relay whose role lacks a grant it needs stops at start with the statement to run (exit 2),
/// instead of claiming events it cannot settle.
#[tokio::test]
async fn the_relay_refuses_to_start_without_the_privileges_it_needs() {
    let db = TestDb::new().await.unwrap();
    let without_delete = RELAY_GRANTS.replace(
        "SELECT, UPDATE, DELETE ON public.outbox_event",
        "SELECT, UPDATE ON public.outbox_event",
    );
    let (role, url) = role_with(&db, "outbox_nodelete", &without_delete, "").await;
    let outbox = Outbox::new(Schema::default());
    let mut tx = db.pool.begin().await.unwrap();
    outbox
        .enqueue(&mut tx, NewEvent::new("order", "o1", "Placed"))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let dir = scratch("missing-grant");
    let file = dir.join("events.jsonl");
    let out = drain_to_file(&dir, "", &url, &file);
    let text = all_output(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains(&format!(
            "the database role `{role}` lacks DELETE on \"public\".outbox_event"
        )) && text.contains(&format!(
            "GRANT DELETE ON \"public\".outbox_event TO \"{role}\";"
        )),
        "{text}"
    );
    assert!(
        std::fs::read_to_string(&file)
            .unwrap_or_default()
            .is_empty(),
        "nothing was published"
    );
    let (status, attempts): (String, i32) =
        sqlx::query_as("SELECT status, attempts FROM outbox_event")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        (status.as_str(), attempts),
        ("pending", 0),
        "nothing was claimed"
    );
    db.drop_db().await.unwrap();
    drop_role(&role).await;
}

/// The grants docs/SECURITY.md lists for producers: INSERT on the event columns only, so a SQL
/// producer cannot write the relay's state columns (status, attempts, available_at, ...).
const PRODUCER_GRANTS: &str = "
    GRANT CONNECT ON DATABASE {db} TO {role};
    GRANT USAGE ON SCHEMA public TO {role};
    GRANT INSERT (id, aggregate_type, aggregate_id, event_type, payload, headers, destination, created_at)
        ON public.outbox_event TO {role};
    GRANT USAGE ON SEQUENCE public.outbox_event_seq TO {role};
    GRANT SELECT ON SEQUENCE public.outbox_wakeup_wanted_ms TO {role};
";

#[tokio::test]
async fn producers_with_the_documented_grants_write_only_the_event_columns() {
    let db = TestDb::new().await.unwrap();
    let (role, url) = role_with(&db, "outbox_producer", PRODUCER_GRANTS, "").await;
    let mut conn: sqlx::PgConnection = sqlx::Connection::connect(&url).await.unwrap();
    // The Rust API and a plain SQL insert work.
    Outbox::new(Schema::default())
        .enqueue(
            &mut conn,
            NewEvent::new("order", "o1", "Placed").destination("orders"),
        )
        .await
        .unwrap();
    sqlx::query("INSERT INTO outbox_event (aggregate_type, aggregate_id, event_type, payload, created_at) VALUES ('order', 'o1', 'Paid', '{}', now())")
        .execute(&mut conn)
        .await
        .unwrap();
    // The relay's columns are refused, on insert and update.
    for statement in [
        "INSERT INTO outbox_event (aggregate_type, aggregate_id, event_type, payload, status) VALUES ('o', '1', 'E', '{}', 'dead')",
        "INSERT INTO outbox_event (aggregate_type, aggregate_id, event_type, payload, attempts) VALUES ('o', '1', 'E', '{}', 5)",
        "INSERT INTO outbox_event (aggregate_type, aggregate_id, event_type, payload, available_at) VALUES ('o', '1', 'E', '{}', 'infinity')",
        "INSERT INTO outbox_event (seq, aggregate_type, aggregate_id, event_type, payload) VALUES (1, 'o', '1', 'E', '{}')",
        "UPDATE outbox_event SET available_at = 'infinity'",
    ] {
        let err = sqlx::query(statement).execute(&mut conn).await.unwrap_err();
        assert!(err.to_string().contains("permission denied"), "{statement}: {err}");
    }
    drop(conn);
    let n: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox_event WHERE status = 'pending' AND attempts = 0",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(n, 2);
    db.drop_db().await.unwrap();
    drop_role(&role).await;
}

async fn drop_role(role: &str) {
    let admin: sqlx::PgPool = sqlx::PgPool::connect(&outbox_testkit::admin_url())
        .await
        .unwrap();
    sqlx::query(&format!("DROP ROLE IF EXISTS {role}"))
        .execute(&admin)
        .await
        .unwrap();
}

/// The grants docs/SECURITY.md lists for the relay's role, on the default schema.
const RELAY_GRANTS: &str = "
    GRANT CONNECT ON DATABASE {db} TO {role};
    GRANT USAGE ON SCHEMA public TO {role};
    GRANT SELECT, UPDATE, DELETE ON public.outbox_event TO {role};
    GRANT SELECT, UPDATE ON SEQUENCE public.outbox_wakeup_wanted_ms TO {role};
    GRANT SELECT ON public.outbox_schema_version TO {role};
";

#[tokio::test]
#[allow(unsafe_code)]
async fn the_relay_runs_as_a_role_with_only_the_documented_grants() {
    let db = TestDb::new().await.unwrap();
    let (role, url) = role_with(
        &db,
        "outbox_relay",
        RELAY_GRANTS,
        &format!(
            "REVOKE ALL ON DATABASE {} FROM PUBLIC;
             CREATE TABLE business_secret (x int); INSERT INTO business_secret VALUES (1);",
            db.name
        ),
    )
    .await;
    let outbox = Outbox::new(Schema::default());
    let mut tx = db.pool.begin().await.unwrap();
    let n = 120;
    for i in 0..n {
        outbox
            .enqueue(
                &mut tx,
                NewEvent::new("order", format!("o{}", i % 7), "Placed"),
            )
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    let dir = scratch("least-privilege");
    let file = dir.join("events.jsonl");
    // Both retention modes: delete on publish (default) and mark published (retention > 0).
    for (toml, expect_left) in [("", 0i64), ("[default.relay]\nretention = \"1h\"\n", 0)] {
        let out = drain_to_file(&dir, toml, &url, &file);
        assert_eq!(out.status.code(), Some(0), "{}", all_output(&out));
        let pending: i64 =
            sqlx::query_scalar("SELECT count(*) FROM outbox_event WHERE status = 'pending'")
                .fetch_one(&db.pool)
                .await
                .unwrap();
        assert_eq!(pending, expect_left);
        let mut tx = db.pool.begin().await.unwrap();
        for i in 0..10 {
            outbox
                .enqueue(&mut tx, NewEvent::new("order", format!("r{i}"), "Placed"))
                .await
                .unwrap();
        }
        tx.commit().await.unwrap();
    }
    // The long-running relay (NOTIFY wake-ups use the wake-up table) delivers the rest.
    let mut relay = tokio::process::Command::new(outbox_cli())
        .args(["relay", "--publisher", &format!("file:{}", file.display())])
        .env_clear()
        .env("DATABASE_URL", &url)
        .env("OUTBOX_CONFIG", dir.join("outbox.toml"))
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let drained = outbox_faults::scenario::wait_for(std::time::Duration::from_secs(30), || async {
        outbox_faults::scenario::pending(&db.pool).await == 0
    })
    .await;
    assert!(
        drained.is_some(),
        "the relay delivers as the restricted role"
    );
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(relay.id().unwrap() as i32, libc::SIGTERM) };
    let status = relay.wait().await.unwrap();
    assert_eq!(status.code(), Some(0));
    let lines = std::fs::read_to_string(&file).unwrap().lines().count();
    assert_eq!(lines, n + 20);
    // And the role really is restricted.
    let mut conn: sqlx::PgConnection = sqlx::Connection::connect(&url).await.unwrap();
    let denied = sqlx::query("SELECT * FROM business_secret")
        .execute(&mut conn)
        .await;
    assert!(denied
        .unwrap_err()
        .to_string()
        .contains("permission denied"));
    let denied = sqlx::query("INSERT INTO outbox_event (aggregate_type, aggregate_id, event_type, payload) VALUES ('a','b','c','{}')")
        .execute(&mut conn)
        .await;
    assert!(denied
        .unwrap_err()
        .to_string()
        .contains("permission denied"));
    drop(conn);
    db.drop_db().await.unwrap();
    drop_role(&role).await;
}
