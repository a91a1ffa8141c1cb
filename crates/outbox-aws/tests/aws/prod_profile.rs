//! The `prod` profile: default credential chain and region, no endpoint override, no bootstrap,
//! and a start-up check that fails clearly when a destination does not exist.
//!
//! No real AWS is contacted: the standard `AWS_ENDPOINT_URL` variable points the prod clients at
//! the loopback emulator (which also proves the SDK's environment variables keep working). The
//! process environment is set once, before anything else runs, which is why this file holds a
//! single test (its own test binary and process).

use crate::common::*;
use outbox::Publisher;
use outbox_aws::{bootstrap, publisher_from_config, AwsSettings, BootstrapError, Profile};
use outbox_testkit::TestDb;

fn isolate_environment() {
    let _ = endpoint_addr(); // asserts the endpoint is on loopback
                             // Static credentials end the default chain before it would look at files, SSO or the instance
                             // metadata service (a non-loopback address): disable those anyway.
    for (name, value) in [
        ("AWS_ENDPOINT_URL", endpoint()),
        ("AWS_ACCESS_KEY_ID", "test".to_owned()),
        ("AWS_SECRET_ACCESS_KEY", "test".to_owned()),
        ("AWS_REGION", "us-east-1".to_owned()),
        ("AWS_EC2_METADATA_DISABLED", "true".to_owned()),
        (
            "AWS_CONFIG_FILE",
            "/nonexistent/outbox-test-aws-config".to_owned(),
        ),
        (
            "AWS_SHARED_CREDENTIALS_FILE",
            "/nonexistent/outbox-test-aws-credentials".to_owned(),
        ),
    ] {
        std::env::set_var(name, value);
    }
    for name in [
        "AWS_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_ENDPOINT_URL_SQS",
        "AWS_ENDPOINT_URL_EVENTBRIDGE",
    ] {
        std::env::remove_var(name);
    }
}

#[tokio::test]
async fn prod_profile_fails_its_check_for_a_missing_queue_and_never_bootstraps() {
    isolate_environment();
    require_emulator().await;
    let missing = unique("missing");
    let bus = unique("missing-bus");
    let toml = format!(
        r#"
[prod]
publisher = "destinations"
default_destination = "orders"
[prod.destinations.orders]
kind = "sqs"
queue = "{missing}"
[prod.destinations.bus]
kind = "eventbridge"
bus = "{bus}"
"#
    );
    let config = load_config(&toml, "prod");

    let err = bootstrap(&config)
        .await
        .expect_err("bootstrap refuses prod");
    assert!(matches!(err, BootstrapError::NotLocal(_)), "{err}");
    assert!(err.to_string().contains("infrastructure tool"), "{err}");

    let publisher = publisher_from_config(&config).await.expect("publisher");
    let err = publisher
        .check()
        .await
        .expect_err("the queue does not exist");
    let text = err.reason().to_owned();
    assert!(!err.is_retryable());
    for needle in [
        "destination `orders`",
        &format!("SQS queue `{missing}` does not exist"),
        "profile prod",
        "create the queue",
        "destinations.orders.queue",
        "destination `bus`",
        &format!("EventBridge bus `{bus}` does not exist"),
    ] {
        assert!(text.contains(needle), "missing {needle:?} in: {text}");
    }

    // The relay refuses to start with it: nothing is claimed.
    let db = TestDb::new().await.unwrap();
    let ids = enqueue(
        &db,
        vec![event("order", "o-1", "OrderPlaced", serde_json::json!({}))],
    )
    .await;
    let publisher = publisher_from_config(&config).await.expect("publisher");
    let result = relay(&db, publisher).await.drain().await;
    assert!(result.is_err(), "drain must fail its publisher check");
    assert_eq!(row(&db, ids[0]).await.0, "pending");

    // Once the queue and bus exist (created here with local-profile clients), the same prod
    // configuration passes its check: the prod clients really reached the emulator through
    // AWS_ENDPOINT_URL.
    let local = outbox_aws::AwsClients::new(&{
        let mut s = AwsSettings::new(Profile::Local);
        s.aws.endpoint = Some(endpoint());
        s
    })
    .await
    .unwrap();
    local
        .sqs
        .create_queue()
        .queue_name(&missing)
        .send()
        .await
        .unwrap();
    local
        .eventbridge
        .create_event_bus()
        .name(&bus)
        .send()
        .await
        .unwrap();
    let publisher = publisher_from_config(&config).await.expect("publisher");
    publisher
        .check()
        .await
        .expect("check passes once the destinations exist");
    assert_eq!(
        relay(&db, publisher).await.drain().await.unwrap().published,
        1
    );
    db.drop_db().await.unwrap();
}
