//! Properties of the parts that parse outside input: configuration, the event envelope, headers.
//! Kept as proptest properties (run with `cargo test --workspace --test suite properties::`;
//! `PROPTEST_CASES=10000` for a longer search).

use std::collections::BTreeMap;

use outbox::config::{redact_url, Config, ConfigSource};
use outbox::{EventError, EventLimits, NewEvent, OutboxEvent, Schema};
use proptest::prelude::*;
use proptest::strategy::ValueTree;

fn load(toml: &str) -> Result<Config, outbox::ConfigError> {
    let path = std::env::temp_dir().join(format!("outbox-prop-{}.toml", uuid::Uuid::now_v7()));
    std::fs::write(&path, toml).unwrap();
    let r = Config::load(&ConfigSource {
        file: Some(path.clone()),
        profile: Some("local".into()),
        use_env: false,
        ..Default::default()
    });
    let _ = std::fs::remove_file(path);
    r
}

fn plain_identifier(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(f) if f.is_ascii_alphabetic() || f == '_')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
        && s.len() <= 48
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Any string: accepted as a schema exactly when it is a plain identifier, and then it can be
    /// embedded quoted without escaping anything.
    #[test]
    fn schema_names_are_plain_identifiers_or_refused(name in "\\PC{0,60}|[a-zA-Z_][a-zA-Z0-9_]{0,50}") {
        match Schema::new(name.clone()) {
            Ok(s) => {
                prop_assert!(plain_identifier(&name));
                prop_assert_eq!(s.quoted(), format!("\"{name}\""));
            }
            Err(e) => {
                prop_assert!(!plain_identifier(&name));
                prop_assert!(e.to_string().contains("plain identifier"));
            }
        }
    }

    /// Any integer batch size: loads exactly when in 1..=10000, otherwise the error names the key.
    #[test]
    fn batch_size_is_range_checked(n in any::<i64>()) {
        match load(&format!("[default.relay]\nbatch_size = {n}\n")) {
            Ok(c) => prop_assert!((1..=10_000).contains(&n) && c.relay.batch_size as i64 == n),
            Err(e) => {
                prop_assert!(!(1..=10_000).contains(&n));
                prop_assert!(e.to_string().contains("batch_size"), "{}", e);
            }
        }
    }

    /// Any key in [default.relay] that is not a known one is refused, naming it.
    #[test]
    fn unknown_keys_are_named(key in "[a-z][a-z_]{0,20}") {
        let known = ["enabled", "batch_size", "workers", "poll_interval", "publish_timeout",
            "transaction_timeout", "statement_timeout", "max_attempts", "backoff_base",
            "backoff_max", "retention", "purge_interval", "purge_batch", "dead_letter", "notify"];
        prop_assume!(!known.contains(&key.as_str()));
        let err = load(&format!("[default.relay]\n{key} = 1\n")).unwrap_err();
        prop_assert!(err.to_string().contains(&key), "{}", err);
    }

    /// Arbitrary TOML text never panics the loader.
    #[test]
    fn arbitrary_config_text_never_panics(text in "\\PC{0,200}") {
        let _ = load(&text);
    }

    /// A password never survives redaction, wherever it sits in the URL.
    #[test]
    fn passwords_are_redacted(user in "[a-z]{1,8}", pw in "[A-Za-z0-9._~-]{12,24}", host in "[a-z]{1,10}", q in proptest::bool::ANY) {
        let url = if q {
            format!("postgres://{user}@{host}:5432/db?sslmode=require&password={pw}")
        } else {
            format!("postgres://{user}:{pw}@{host}:5432/db?sslmode=require")
        };
        let shown = redact_url(&url);
        prop_assert!(!shown.contains(&pw), "{}", shown);
        prop_assert!(shown.contains("***"));
    }

    /// The envelope round-trips: what a publisher serializes is what a consumer reads back.
    #[test]
    fn the_envelope_round_trips(
        agg in "\\PC{1,20}", id in "\\PC{1,20}", ty in "\\PC{1,20}",
        headers in proptest::collection::btree_map("\\PC{1,10}", "\\PC{0,10}", 0..5),
        payload in proptest::collection::btree_map("\\PC{0,8}", any::<i64>(), 0..5),
        seq in any::<i64>(),
    ) {
        let event = OutboxEvent {
            id: uuid::Uuid::now_v7(),
            seq,
            aggregate_type: agg,
            aggregate_id: id,
            event_type: ty,
            payload: serde_json::value::to_raw_value(&payload).unwrap(),
            headers: headers.clone(),
            destination: None,
            created_at: chrono::Utc::now(),
            attempts: 0,
        };
        let line = outbox::publisher::envelope_json(&event);
        prop_assert!(!line.contains('\n'), "one line per event");
        let back: OutboxEvent = serde_json::from_str(&line).unwrap();
        prop_assert_eq!(back.id, event.id);
        prop_assert_eq!(back.seq, seq);
        prop_assert_eq!(&back.aggregate_id, &event.aggregate_id);
        prop_assert_eq!(back.headers, headers);
        let p: BTreeMap<String, i64> = serde_json::from_str(back.payload.get()).unwrap();
        prop_assert_eq!(p, payload);
    }

    /// Validation never panics, and accepts exactly the events the table can store: non-empty
    /// fields and header names, limits, no NUL, an object payload.
    #[test]
    fn validation_matches_the_rules(
        agg in "\\PC{0,6}", ty in "[a-zA-Z\\x00]{0,6}",
        headers in proptest::collection::btree_map("[a-z\\x00]{0,4}", "[a-z\\x00]{0,4}", 0..3),
        payload in prop_oneof![Just("{}".to_owned()), Just("[]".to_owned()), Just("1".to_owned()),
            Just("{\"a\":\"\\u0000\"}".to_owned()), Just("{\"a\":\"\\\\u0000\"}".to_owned())],
    ) {
        let mut e = NewEvent::new(agg.clone(), "1", ty.clone())
            .raw_payload(serde_json::value::RawValue::from_string(payload.clone()).unwrap());
        for (k, v) in &headers {
            e = e.header(k.clone(), v.clone());
        }
        let r = e.validate(&EventLimits::default());
        let ok = !agg.is_empty() && !ty.is_empty() && !agg.contains('\0') && !ty.contains('\0')
            && headers.iter().all(|(k, v)| !k.is_empty() && !k.contains('\0') && !v.contains('\0'))
            && payload.starts_with('{') && !payload.contains("\"\\u0000\"");
        prop_assert_eq!(r.is_ok(), ok, "{:?}", r);
        if let Err(EventError::NulCharacter { field }) = r {
            prop_assert!(!field.is_empty());
        }
    }
}

/// Headers through the database: for generated header maps, the Rust validation and the table's
/// CHECK constraint agree (what the API accepts the SQL path accepts, and the reverse).
#[tokio::test]
async fn header_validation_agrees_with_the_table() {
    let db = outbox_testkit::TestDb::new().await.unwrap();
    let outbox = outbox::Outbox::new(Schema::default());
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(48));
    let strategy =
        proptest::collection::btree_map("[a-z\\x00é]{0,3}", "[a-z\\x00\"\\\\]{0,3}", 0..3);
    for _ in 0..48 {
        let headers = strategy.new_tree(&mut runner).unwrap().current();
        let mut event = NewEvent::new("o", "1", "T");
        for (k, v) in &headers {
            event = event.header(k.clone(), v.clone());
        }
        let rust_ok = event.validate(&EventLimits::default()).is_ok();
        let mut tx = db.pool.begin().await.unwrap();
        let api = outbox.enqueue(&mut tx, event).await;
        tx.rollback().await.unwrap();
        assert_eq!(api.is_ok(), rust_ok, "{headers:?}: {api:?}");
        // The SQL path, with headers as JSON text.
        let json = serde_json::to_string(&headers).unwrap();
        let sql = sqlx::query(
            "INSERT INTO outbox_event (aggregate_type, aggregate_id, event_type, payload, headers) VALUES ('o','1','T','{}',$1::jsonb)",
        )
        .bind(&json)
        .execute(&db.pool)
        .await;
        assert_eq!(sql.is_ok(), rust_ok, "{headers:?}: {sql:?}");
    }
    db.drop_db().await.unwrap();
}

/// Payload sizes through the database: for generated JSON objects, the size the Rust API checks
/// against `events.max_payload_bytes` is the size the table's trigger measures
/// (`octet_length(payload::text)`), so both paths refuse the same events. (Floats are left out:
/// PostgreSQL prints `1e-7` as `0.0000001`, and the table has the last word there.)
#[tokio::test]
async fn payload_size_agrees_with_the_table() {
    let db = outbox_testkit::TestDb::new().await.unwrap();
    let leaf = prop_oneof![
        any::<i64>().prop_map(serde_json::Value::from),
        any::<bool>().prop_map(serde_json::Value::from),
        Just(serde_json::Value::Null),
        "[a-z \\x01-\\x1f\"\\\\/é😀\u{7f}]{0,12}".prop_map(serde_json::Value::from),
    ];
    let value = leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            proptest::collection::btree_map("[a-z\"\\\\\\x0a]{0,4}", inner, 0..4)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    });
    let object = proptest::collection::btree_map("[a-zé\\x09]{1,6}", value, 0..5);
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(64));
    for _ in 0..64 {
        let payload = object.new_tree(&mut runner).unwrap().current();
        let event = NewEvent::new("o", "1", "T").payload(&payload).unwrap();
        if event.validate(&EventLimits::default()).is_err() {
            continue; // NUL characters: refused before any size check
        }
        let table: i32 = sqlx::query_scalar("SELECT octet_length($1::jsonb::text)")
            .bind(event.payload_json())
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert_eq!(
            event.payload_size(),
            table as usize,
            "{}",
            event.payload_json()
        );
    }
    db.drop_db().await.unwrap();
}
