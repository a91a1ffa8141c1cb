//! The whole story against a real Postgres and the emulator: orders through the HTTP API (the
//! axum router served in-process), the relay (embedded, the standalone `outbox relay` process, or
//! both at once), a FIFO queue with a DLQ, and the shipping consumer with its inbox.
//!
//! The same story over the real Kafka-protocol broker (tansu, 127.0.0.1:19092, started by
//! `scripts/kafka.sh start` when installed), NATS JetStream (127.0.0.1:4222) and RabbitMQ
//! (127.0.0.1:5672): fresh topic / stream / exchange and queue per test, created by the demo's
//! own `outbox-demo bootstrap` code, and shipping consuming with each broker's own client.
//! `OUTBOX_TEST_KAFKA`, `NATS_URL`, `AMQP_URL` override the loopback addresses.
//!
//! Every run asserts the demo's own summary: every event published, consumed exactly once (inbox,
//! `shipping_log` rows = distinct event ids), in per-order sequence (versions 1, 2, 3 in the order
//! applied), nothing pending or dead.
//!
//! The standalone relay is the real `outbox` binary of crates/outbox-cli, found next to this test's
//! executable (`target/debug/outbox`; `cargo test --workspace` builds it, or run
//! `cargo build -p outbox-cli`). The back-to-back test runs the demo's own processes
//! (`outbox-demo orders` / `shipping`, built by cargo for this test) as `scripts/demo.sh` does.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};

use outbox_consumer::ConsumerOptions;
use outbox_demo::broker::{self, Broker};
use outbox_demo::driver::{self, Api, Summary};
use outbox_demo::{orders, shipping};
use outbox_testkit::TestDb;

fn endpoint() -> String {
    outbox_testkit::aws_endpoint()
}

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// The demo's own configuration for `broker` (crates/outbox-demo/outbox.toml, or
/// outbox.<broker>.toml), for the settings the tests must share with it.
fn demo_config(broker: Broker) -> outbox::Config {
    let file = match broker {
        Broker::Sqs => "outbox.toml".to_owned(),
        other => format!("outbox.{other}.toml"),
    };
    let config = outbox::Config::load(&outbox::ConfigSource {
        file: Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(file)),
        profile: Some("local".into()),
        use_env: false,
        ..Default::default()
    })
    .unwrap();
    assert_eq!(Broker::of(&config).unwrap(), broker);
    config
}

fn kafka_brokers() -> String {
    let brokers =
        std::env::var("OUTBOX_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:19092".to_owned());
    assert!(
        brokers.starts_with("127.0.0.1:") || brokers.starts_with("localhost:"),
        "OUTBOX_TEST_KAFKA must be a loopback host:port, got {brokers}"
    );
    brokers
}

fn nats_url() -> String {
    std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

async fn answers(address: &str) -> bool {
    tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect(address.to_owned()),
    )
    .await
    .is_ok_and(|r| r.is_ok())
}

/// Fails, saying what to start, when the broker does not answer; starts the Kafka-protocol broker
/// with `scripts/kafka.sh start` first when tansu is installed.
async fn require(broker: Broker) {
    let (address, hint) = match broker {
        Broker::Sqs => return,
        Broker::Kafka => (
            kafka_brokers(),
            "run `scripts/kafka.sh start` (it installs tansu once, ~7 min) or scripts/test.sh",
        ),
        Broker::Nats => (
            nats_url().trim_start_matches("nats://").to_owned(),
            "start `nats-server -a 127.0.0.1 -p 4222 -js` (Debian: apt-get install nats-server)",
        ),
        Broker::Rabbitmq => (
            amqp_url()
                .rsplit('@')
                .next()
                .and_then(|rest| rest.split('/').next())
                .unwrap_or_default()
                .to_owned(),
            "start `rabbitmq-server -detached` (Debian: apt-get install rabbitmq-server)",
        ),
    };
    if answers(&address).await {
        return;
    }
    if broker == Broker::Kafka {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/kafka.sh");
        let _ = std::process::Command::new("bash")
            .arg(script)
            .arg("start")
            // Installing tansu takes minutes: that is scripts/test.sh's job, not a test's.
            .env("KAFKA_INSTALL", "0")
            .status();
        if answers(&address).await {
            return;
        }
    }
    panic!("{broker} does not answer at {address}: {hint}");
}

/// One test's world: the orders database (outbox migrated), shipping's database, the broker's
/// fresh resources (a FIFO queue with its DLQ; a topic; a stream; an exchange and queue), and the
/// configuration file both the in-process service and the `outbox` process read (with the demo's
/// event limits for that broker).
struct World {
    broker: Broker,
    orders_db: TestDb,
    shipping_db: TestDb,
    config: outbox::Config,
    config_path: PathBuf,
    /// SQS only.
    sqs: Option<(outbox_aws::AwsClients, String)>,
}

impl World {
    async fn new(embedded_relay: bool) -> Self {
        Self::over(Broker::Sqs, embedded_relay).await
    }

    async fn over(broker: Broker, embedded_relay: bool) -> Self {
        require(broker).await;
        let orders_db = TestDb::new().await.unwrap();
        let shipping_db = TestDb::empty().await.unwrap();
        let queue = format!("{}.fifo", unique("e2e"));
        let dlq = format!("{}.fifo", unique("e2e-dlq"));
        let name = unique("e2e");
        let destination = match broker {
            Broker::Sqs => format!(
                r#"
                [default.destinations.orders]
                kind = "sqs"
                queue = "{queue}"
                [local.aws]
                endpoint = "{endpoint}"
                [[local.aws.bootstrap.redrive]]
                queue = "{queue}"
                dead_letter_queue = "{dlq}"
                max_receive_count = 5
                "#,
                endpoint = endpoint(),
            ),
            Broker::Kafka => format!(
                r#"
                [default.kafka]
                brokers = "{brokers}"
                [default.destinations.orders]
                kind = "kafka"
                topic = "{name}"
                "#,
                brokers = kafka_brokers(),
            ),
            Broker::Nats => format!(
                r#"
                [default.nats]
                url = "{url}"
                [default.destinations.orders]
                kind = "nats"
                subject = "{subject}.{{event_type}}"
                stream = "{stream}"
                "#,
                url = nats_url(),
                subject = name.replace('-', "_"),
                stream = name.to_uppercase(),
            ),
            Broker::Rabbitmq => format!(
                r#"
                [default.rabbitmq]
                url = "{url}"
                [default.destinations.orders]
                kind = "rabbitmq"
                exchange = "{name}"
                routing_key = "{{aggregate_type}}.{{event_type}}"
                "#,
                url = amqp_url(),
            ),
        };
        let events = demo_config(broker).events;
        let toml = format!(
            r#"
            [default]
            publisher = "destinations"
            [default.database]
            url = "{url}"
            [default.events]
            max_payload_bytes = {max_payload_bytes}
            max_field_bytes = {max_field_bytes}
            [default.relay]
            enabled = {embedded_relay}
            poll_interval = "100ms"
            batch_size = 20
            retention = "1h"
            [[default.routes]]
            aggregate_type = "order"
            destination = "orders"
            {destination}
            "#,
            url = orders_db.url,
            max_payload_bytes = events.max_payload_bytes,
            max_field_bytes = events.max_field_bytes,
        );
        let config_path =
            std::env::temp_dir().join(format!("outbox-demo-e2e-{}.toml", uuid::Uuid::now_v7()));
        std::fs::write(&config_path, toml).unwrap();
        let config = outbox::Config::load(&outbox::ConfigSource {
            file: Some(config_path.clone()),
            profile: Some("local".into()),
            use_env: false,
            ..Default::default()
        })
        .unwrap();
        // The table carries the configured payload limit, as `outbox migrate` would set it.
        outbox::migrate_from_config(&mut orders_db.connect().await.unwrap(), &config)
            .await
            .unwrap();
        // The demo's own bootstrap: what `outbox-demo bootstrap` creates.
        let created = tokio::time::timeout(Duration::from_secs(30), broker::bootstrap(&config))
            .await
            .expect("bootstrap within 30 s")
            .unwrap();
        assert!(!created.is_empty(), "{created:?}");
        let sqs = if broker == Broker::Sqs {
            let settings = outbox_aws::AwsSettings::from_config(&config).unwrap();
            let clients = outbox_aws::AwsClients::new(&settings).await.unwrap();
            let queue_url = outbox_consumer::Consumer::queue_url(&clients.sqs, &queue)
                .await
                .unwrap();
            Some((clients, queue_url))
        } else {
            None
        };
        Self {
            broker,
            orders_db,
            shipping_db,
            config,
            config_path,
            sqs,
        }
    }

    fn consumer_options(&self, queue_url: &str) -> ConsumerOptions {
        let mut o = ConsumerOptions::new(queue_url);
        o.wait_time = Duration::from_secs(1);
        o.visibility_timeout = Duration::from_secs(2);
        o.extend_every = Duration::from_secs(1);
        o
    }

    async fn shipping(&self) -> shipping::ShippingService {
        let pool = self.shipping_db.pool.clone();
        match &self.sqs {
            Some((clients, queue_url)) => shipping::start(
                clients,
                pool,
                self.consumer_options(queue_url),
                shipping::Idempotency::Inbox,
                false,
            )
            .await
            .unwrap(),
            None => {
                let source = broker::Source::of(&self.config).unwrap().expect("not SQS");
                shipping::start_broker(source, pool, Duration::from_secs(1), false)
                    .await
                    .unwrap()
            }
        }
    }

    async fn settle(&self, sent: driver::Sent) -> Summary {
        driver::settle(
            &self.orders_db.pool,
            "outbox_event",
            &self.shipping_db.pool,
            sent,
            Duration::from_secs(60),
        )
        .await
        .unwrap()
    }

    async fn observe(&self, ids: &[String]) -> driver::Observed {
        driver::observe(
            &self.orders_db.pool,
            "outbox_event",
            &self.shipping_db.pool,
            ids,
        )
        .await
        .unwrap()
    }

    /// A command on this world's configuration file and databases, with the test environment's
    /// other `OUTBOX_*` settings removed.
    fn command(&self, bin: &std::path::Path) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(bin);
        command
            .env("OUTBOX_CONFIG", &self.config_path)
            .env("OUTBOX_PROFILE", "local")
            // The test environment's DATABASE_URL (the admin database) must not win over the file.
            .env("DATABASE_URL", &self.orders_db.url)
            .env("SHIPPING_DATABASE_URL", &self.shipping_db.url)
            .env("OUTBOX_LOG", "warn")
            .stdout(Stdio::null())
            .kill_on_drop(true);
        for (name, _) in std::env::vars() {
            if name.starts_with("OUTBOX_")
                && !matches!(
                    name.as_str(),
                    "OUTBOX_CONFIG" | "OUTBOX_PROFILE" | "OUTBOX_LOG"
                )
            {
                command.env_remove(name);
            }
        }
        command
    }

    /// `outbox relay` as its own process, on the same configuration file.
    fn standalone_relay(&self) -> tokio::process::Child {
        let bin = outbox_binary();
        self.command(&bin)
            .arg("relay")
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()))
    }

    /// `outbox-demo ARGS` as its own process, started as `scripts/demo.sh` starts it; returns
    /// once it printed the line containing `ready` (that line is returned; the rest of its
    /// standard error is forwarded to the test's).
    async fn demo_process(&self, args: &[&str], ready: &str) -> (tokio::process::Child, String) {
        let bin = PathBuf::from(env!("CARGO_BIN_EXE_outbox-demo"));
        let mut child = self
            .command(&bin)
            .args(args)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let mut lines = BufReader::new(child.stderr.take().expect("piped stderr")).lines();
        let line = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                eprintln!("[outbox-demo {}] {line}", args[0]);
                if line.contains(ready) {
                    return line;
                }
            }
            panic!("outbox-demo {args:?} exited before saying {ready:?}");
        })
        .await
        .unwrap_or_else(|_| panic!("outbox-demo {args:?} did not say {ready:?} within 30 s"));
        let name = args[0].to_owned();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("[outbox-demo {name}] {line}");
            }
        });
        (child, line)
    }

    async fn finish(self) {
        let _ = std::fs::remove_file(&self.config_path);
        self.orders_db.drop_db().await.unwrap();
        self.shipping_db.drop_db().await.unwrap();
    }
}

/// `target/debug/outbox`, next to this test binary's `deps/` directory.
fn outbox_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/debug");
    let bin = dir.join(format!("outbox{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "{} not found: build the CLI first (`cargo build -p outbox-cli`; `cargo test --workspace` builds it)",
        bin.display()
    );
    bin
}

/// Stops a child process with SIGTERM (it finishes its in-flight work and exits 0), bounded.
async fn terminate(name: &str, mut child: tokio::process::Child) {
    if let Some(pid) = child.id() {
        let _ = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status();
    }
    match tokio::time::timeout(Duration::from_secs(15), child.wait()).await {
        Ok(status) => assert!(status.unwrap().success(), "{name} did not exit cleanly"),
        Err(_) => {
            let _ = child.kill().await;
            panic!("{name} did not stop within 15 s of SIGTERM");
        }
    }
}

fn assert_ok(summary: &Summary, expected_events: i64) {
    assert!(summary.ok, "{}\n{:?}", summary.render(), summary.observed);
    assert_eq!(
        summary.observed.consumed,
        expected_events,
        "{}",
        summary.render()
    );
}

/// 12 orders make 27 events (12 placed, 9 paid, 6 cancelled); see `driver`.
const ORDERS: usize = 12;
const EVENTS: i64 = 27;

#[tokio::test]
async fn orders_flow_end_to_end_with_the_embedded_relay() {
    let world = World::new(true).await;
    let service = orders::Service::start(&world.config, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let consumer = world.shipping().await;
    let api = Api::new(format!("http://{}", service.addr));
    let sent = driver::send_orders(&api, ORDERS, true).await.unwrap();
    assert_eq!(sent.events_total() as i64, EVENTS);
    let summary = world.settle(sent).await;
    assert_ok(&summary, EVENTS);
    let relay = service
        .stop()
        .await
        .unwrap()
        .expect("the relay is embedded");
    assert_eq!(relay.published, EVENTS as u64, "{relay:?}");
    let report = consumer.stop().await.unwrap();
    assert_eq!(
        (report.processed, report.duplicates, report.failed),
        (EVENTS as u64, 0, 0),
        "{report:?}"
    );
    world.finish().await;
}

#[tokio::test]
async fn orders_flow_end_to_end_with_the_standalone_relay() {
    let world = World::new(false).await;
    let service = orders::Service::start(&world.config, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    assert!(
        service.relay_stats().is_none(),
        "relay.enabled = false must not embed a relay"
    );
    let consumer = world.shipping().await;
    let api = Api::new(format!("http://{}", service.addr));
    let sent = driver::send_orders(&api, ORDERS, true).await.unwrap();
    // With the embedded relay off, nothing leaves the outbox until `outbox relay` runs.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let before = world.observe(&sent.order_ids).await;
    assert_eq!(
        (before.pending, before.published),
        (EVENTS, 0),
        "{before:?}"
    );
    let relay = world.standalone_relay();
    let summary = world.settle(sent).await;
    terminate("outbox relay", relay).await;
    assert_ok(&summary, EVENTS);
    service.stop().await.unwrap();
    consumer.stop().await.unwrap();
    world.finish().await;
}

#[tokio::test]
async fn embedded_and_standalone_relays_at_once_lose_nothing_and_keep_order() {
    let world = World::new(true).await;
    let service = orders::Service::start(&world.config, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let relay = world.standalone_relay();
    let consumer = world.shipping().await;
    let api = Api::new(format!("http://{}", service.addr));
    let sent = driver::send_orders(&api, 20, true).await.unwrap();
    let expected = sent.events_total() as i64;
    let summary = world.settle(sent).await;
    terminate("outbox relay", relay).await;
    let embedded = service.stop().await.unwrap().expect("embedded relay");
    let report = consumer.stop().await.unwrap();
    assert_ok(&summary, expected);
    // Steady state (no crash): each event was published by exactly one relay and delivered once.
    assert_eq!(report.duplicates, 0, "{report:?}");
    assert_eq!(report.processed, expected as u64, "{report:?}");
    assert!(embedded.published <= expected as u64, "{embedded:?}");
    world.finish().await;
}

#[tokio::test]
async fn a_consumer_killed_mid_way_and_restarted_loses_nothing_and_applies_nothing_twice() {
    let world = World::new(true).await;
    let service = orders::Service::start(&world.config, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let first = world.shipping().await;
    let api = Api::new(format!("http://{}", service.addr));
    // Orders keep coming while the consumer dies.
    let driving = tokio::spawn(async move { driver::send_orders(&api, 16, true).await });
    let shipping_pool = world.shipping_db.pool.clone();
    let mut started = false;
    for _ in 0..200 {
        let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM shipping_log")
            .fetch_one(&shipping_pool)
            .await
            .unwrap();
        if applied >= 5 {
            started = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(started, "the first consumer applied nothing within 10 s");
    let at_kill = first.stats();
    first.kill(); // no graceful stop: in-flight work is dropped, nothing more is deleted
                  // The killed consumer's long poll (wait_time 1 s) may still be open at the emulator. moto
                  // decides which FIFO groups are busy once per poll, so a poll overlapping it could be handed a
                  // later message of a group whose earlier message that dead poll just took (real SQS keeps the
                  // group blocked). Let it end first: the restart comes after it, as it would after a crash.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let second = world.shipping().await;
    let sent = driving.await.unwrap().unwrap();
    let expected = sent.events_total() as i64;
    let summary = world.settle(sent).await;
    let report = second.stop().await.unwrap();
    eprintln!("killed consumer at {at_kill:?}; restarted consumer: {report:?}");
    for order in &summary.observed.out_of_order {
        let rows: Vec<(i64, i32, String, String)> = sqlx::query_as(
            "SELECT n, version, event_type, to_char(applied_at, 'HH24:MI:SS.MS') FROM shipping_log WHERE order_id = $1 ORDER BY n",
        )
        .bind(order)
        .fetch_all(&world.shipping_db.pool)
        .await
        .unwrap();
        eprintln!("emulator reordered after the crash: {order}: {rows:?}");
    }
    // Nothing lost, nothing applied twice, nothing left behind. Per-order sequence is asserted by
    // the tests without a crash, not here: the killed consumer's abandoned long poll can still be
    // served by moto after the restart (it is slow under parallel tests), and moto decides which
    // FIFO groups are busy once per poll, so a poll overlapping it may be handed a later message
    // of a group whose earlier message the dead poll took. Real SQS keeps the group blocked.
    let o = &summary.observed;
    assert_eq!(
        (
            o.enqueued,
            o.published,
            o.consumed,
            o.applied,
            o.pending,
            o.dead
        ),
        (expected, expected, expected, expected, 0, 0),
        "{}",
        summary.render()
    );
    assert!(
        at_kill.processed < expected as u64,
        "the kill came after everything was done: {at_kill:?}"
    );
    // Every event the second consumer saw was either new or recognised by the inbox.
    assert_eq!(
        summary.observed.applied, expected,
        "an event was applied twice"
    );
    let inbox = outbox_consumer::PgInbox::new(shipping_pool, shipping::CONSUMER)
        .count()
        .await
        .unwrap();
    assert_eq!(inbox, expected);
    service.stop().await.unwrap();
    world.finish().await;
}

/// One run of `scripts/demo.sh` on `world`: the shipping consumer and the orders service (relay
/// embedded) as their own processes, with the script's options (a 2 s long poll; shipping's
/// default 30 s visibility timeout), the stream of orders and the undeliverable order as
/// `outbox-demo drive` sends them, the settle, then SIGTERM to both as the script's clean-up does.
async fn demo_run(world: &World) -> Summary {
    let (shipping, _) = world
        .demo_process(
            &["shipping", "--broker", world.broker.kind(), "--wait", "2"],
            "shipping consumer reading",
        )
        .await;
    let (orders, line) = world
        .demo_process(
            &["orders", "--listen", "127.0.0.1:0"],
            "orders service on http://",
        )
        .await;
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    let api = Api::new(format!("http://{addr}"));
    api.wait_ready(Duration::from_secs(10)).await.unwrap();
    let mut sent = driver::send_orders(&api, ORDERS, true).await.unwrap();
    driver::send_undeliverable_order(&api, &mut sent, world.config.events.max_payload_bytes, true)
        .await
        .unwrap();
    let summary = world.settle(sent).await;
    terminate("outbox-demo orders", orders).await;
    terminate("outbox-demo shipping", shipping).await;
    summary
}

#[tokio::test]
async fn the_demo_runs_twice_back_to_back_on_the_same_queue_and_databases() {
    back_to_back(Broker::Sqs).await;
}

/// Two runs of `scripts/demo.sh --broker BROKER`'s processes on one world.
async fn back_to_back(broker: Broker) {
    let world = World::over(broker, true).await;
    for run in 1..=2 {
        let started = Instant::now();
        let summary = demo_run(&world).await;
        eprintln!(
            "demo run {run} over {broker}: {:.1?} from start to stop, settled in {:.1}s",
            started.elapsed(),
            summary.settle_seconds
        );
        assert_ok(&summary, EVENTS);
        assert_eq!(summary.sent.refused, 1, "{}", summary.render());
        // A message the previous run's consumer took at its stop and abandoned would only come
        // back after shipping's 30 s visibility timeout (and could be overtaken by a later event
        // of its order).
        assert!(
            summary.settle_seconds < 15.0,
            "run {run} settled in {:.1}s: a message waited out the visibility timeout\n{}",
            summary.settle_seconds,
            summary.render()
        );
    }
    world.finish().await;
}

#[tokio::test]
async fn an_order_whose_event_could_never_be_delivered_is_refused_with_413_and_nothing_written() {
    let world = World::new(true).await;
    let limit = world.config.events.max_payload_bytes;
    let service = orders::Service::start(&world.config, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let consumer = world.shipping().await;
    let api = Api::new(format!("http://{}", service.addr));
    // The OrderPlaced payload around the customer name (order ids are always 14 characters),
    // measured as the limit measures it: the text form PostgreSQL gives the stored payload.
    let overhead: i32 = sqlx::query_scalar("SELECT octet_length($1::jsonb::text)")
        .bind(
            serde_json::json!({
                "order_id": "ord-0123456789", "customer": "", "total_cents": 1000, "version": 1
            })
            .to_string(),
        )
        .fetch_one(&world.orders_db.pool)
        .await
        .unwrap();
    let overhead = usize::try_from(overhead).unwrap();
    let order = |customer_len: usize| serde_json::json!({"customer": "x".repeat(customer_len), "total_cents": 1000});

    // One byte over the limit: refused with the reason.
    let (status, json) = api
        .post("/orders", order(limit - overhead + 1))
        .await
        .unwrap();
    assert_eq!(status, 413, "{json}");
    let reason = json["error"].as_str().unwrap_or_default();
    assert!(
        reason.contains("max_payload_bytes") && reason.contains(&limit.to_string()),
        "{json}"
    );
    // Over what an SQS message carries (1 MiB) but within the HTTP body limit: the order that
    // used to be a 201 followed by a dead letter.
    let (status, json) = api.post("/orders", order(1_200_000)).await.unwrap();
    assert_eq!(status, 413, "{json}");
    // Other bad input is a 4xx with a JSON reason too, never a 500.
    let (status, json) = api
        .post(
            "/orders",
            serde_json::json!({"customer": "a\u{0}b", "total_cents": 1}),
        )
        .await
        .unwrap();
    assert_eq!(status, 422, "{json}");
    assert!(json["error"].as_str().unwrap_or_default().contains("NUL"));
    let (status, json) = api
        .post("/orders", serde_json::json!({"customer": "ada"}))
        .await
        .unwrap();
    assert_eq!(status, 422, "{json}");
    assert!(json["error"].is_string(), "{json}");
    let written: (i64, i64) =
        sqlx::query_as("SELECT (SELECT count(*) FROM orders), (SELECT count(*) FROM outbox_event)")
            .fetch_one(&world.orders_db.pool)
            .await
            .unwrap();
    assert_eq!(written, (0, 0), "a refused order left rows behind");

    // Exactly at the limit: accepted, and delivered: the limit is one the queue can take.
    let (status, json) = api.post("/orders", order(limit - overhead)).await.unwrap();
    assert_eq!(status, 201, "{json}");
    let placed: orders::OrderView = serde_json::from_value(json).unwrap();
    let sent = driver::Sent {
        order_ids: vec![placed.id],
        events: [("OrderPlaced".to_owned(), 1)].into(),
        ..Default::default()
    };
    let summary = world.settle(sent).await;
    assert_ok(&summary, 1);
    service.stop().await.unwrap();
    consumer.stop().await.unwrap();
    world.finish().await;
}

/// The story over `broker` with everything in-process: the orders service with the relay
/// embedded, shipping on the broker's own client: every event published once, applied once, in
/// per-order sequence; the consumer's counts agree.
async fn orders_flow_over(broker: Broker) {
    let world = World::over(broker, true).await;
    let service = orders::Service::start(&world.config, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let consumer = world.shipping().await;
    let api = Api::new(format!("http://{}", service.addr));
    let sent = driver::send_orders(&api, ORDERS, true).await.unwrap();
    assert_eq!(sent.events_total() as i64, EVENTS);
    let summary = world.settle(sent).await;
    assert_ok(&summary, EVENTS);
    let relay = service
        .stop()
        .await
        .unwrap()
        .expect("the relay is embedded");
    assert_eq!(relay.published, EVENTS as u64, "{relay:?}");
    let report = tokio::time::timeout(Duration::from_secs(15), consumer.stop())
        .await
        .expect("shipping stops within 15 s")
        .unwrap();
    assert_eq!(
        (report.processed, report.duplicates, report.failed),
        (EVENTS as u64, 0, 0),
        "{report:?}"
    );
    world.finish().await;
}

/// Shipping over `broker` killed mid-stream (no graceful stop: what it had received and not
/// acknowledged goes back to the broker) and restarted: nothing lost, nothing applied twice (the
/// inbox recognises what the broker redelivers), nothing left behind.
async fn killed_consumer_over(broker: Broker) {
    let world = World::over(broker, true).await;
    let service = orders::Service::start(&world.config, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let first = world.shipping().await;
    let api = Api::new(format!("http://{}", service.addr));
    let driving = tokio::spawn(async move { driver::send_orders(&api, 16, true).await });
    let mut started = false;
    for _ in 0..300 {
        let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM shipping_log")
            .fetch_one(&world.shipping_db.pool)
            .await
            .unwrap();
        if applied >= 5 {
            started = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(started, "the first consumer applied nothing within 15 s");
    let at_kill = first.stats();
    first.kill();
    let second = world.shipping().await;
    let sent = driving.await.unwrap().unwrap();
    let expected = sent.events_total() as i64;
    let summary = world.settle(sent).await;
    let report = tokio::time::timeout(Duration::from_secs(15), second.stop())
        .await
        .expect("shipping stops within 15 s")
        .unwrap();
    eprintln!("{broker}: killed consumer at {at_kill:?}; restarted consumer: {report:?}");
    let o = &summary.observed;
    assert_eq!(
        (
            o.enqueued,
            o.published,
            o.consumed,
            o.applied,
            o.pending,
            o.dead
        ),
        (expected, expected, expected, expected, 0, 0),
        "{}",
        summary.render()
    );
    let inbox = outbox_consumer::PgInbox::new(world.shipping_db.pool.clone(), shipping::CONSUMER)
        .count()
        .await
        .unwrap();
    assert_eq!(inbox, expected);
    service.stop().await.unwrap();
    world.finish().await;
}

#[tokio::test]
async fn orders_flow_end_to_end_over_kafka() {
    orders_flow_over(Broker::Kafka).await;
}

#[tokio::test]
async fn orders_flow_end_to_end_over_nats_jetstream() {
    orders_flow_over(Broker::Nats).await;
}

#[tokio::test]
async fn orders_flow_end_to_end_over_rabbitmq() {
    orders_flow_over(Broker::Rabbitmq).await;
}

#[tokio::test]
async fn the_demo_over_kafka_runs_twice_back_to_back() {
    back_to_back(Broker::Kafka).await;
}

#[tokio::test]
async fn the_demo_over_nats_jetstream_runs_twice_back_to_back() {
    back_to_back(Broker::Nats).await;
}

#[tokio::test]
async fn the_demo_over_rabbitmq_runs_twice_back_to_back() {
    back_to_back(Broker::Rabbitmq).await;
}

#[tokio::test]
async fn a_kafka_consumer_killed_and_restarted_loses_nothing_and_applies_nothing_twice() {
    killed_consumer_over(Broker::Kafka).await;
}

#[tokio::test]
async fn a_nats_consumer_killed_and_restarted_loses_nothing_and_applies_nothing_twice() {
    killed_consumer_over(Broker::Nats).await;
}

#[tokio::test]
async fn a_rabbitmq_consumer_killed_and_restarted_loses_nothing_and_applies_nothing_twice() {
    killed_consumer_over(Broker::Rabbitmq).await;
}

/// A redelivery of every event (shipping's reading position reset to the start) applies
/// nothing: the inbox recognises each event id.
#[tokio::test]
async fn events_redelivered_by_nats_jetstream_are_applied_once() {
    let world = World::over(Broker::Nats, true).await;
    let service = orders::Service::start(&world.config, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let consumer = world.shipping().await;
    let api = Api::new(format!("http://{}", service.addr));
    let sent = driver::send_orders(&api, 4, true).await.unwrap();
    let expected = sent.events_total();
    let summary = world.settle(sent.clone()).await;
    assert_ok(&summary, expected as i64);
    consumer.stop().await.unwrap();
    // Delete shipping's JetStream consumer: the next start creates it again, from the stream's
    // first message, so every event comes again.
    let Some(broker::Source::Nats {
        section,
        stream,
        consumer: name,
        ..
    }) = broker::Source::of(&world.config).unwrap()
    else {
        panic!("not NATS")
    };
    let client = async_nats::connect(section.url.as_str()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    js.get_stream(&stream)
        .await
        .unwrap()
        .delete_consumer(&name)
        .await
        .unwrap();
    let again = world.shipping().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while again.stats().duplicates < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let report = again.stop().await.unwrap();
    assert_eq!(
        (report.processed, report.duplicates),
        (0, expected),
        "{report:?}"
    );
    let summary = world.settle(sent).await;
    assert_ok(&summary, expected as i64);
    service.stop().await.unwrap();
    world.finish().await;
}

/// A message becomes a delivery from its headers and body; one without a (UUID) event id is not
/// an outbox event, and says why.
#[test]
fn a_message_without_an_event_id_is_not_an_outbox_event() {
    use outbox::publisher::headers::{
        EVENT_ID as HEADER_EVENT_ID, EVENT_TYPE as HEADER_EVENT_TYPE,
    };
    use outbox_demo::consume::delivery;
    use std::collections::HashMap;
    let id = uuid::Uuid::now_v7();
    let headers = HashMap::from([
        (HEADER_EVENT_ID.to_owned(), id.to_string()),
        (HEADER_EVENT_TYPE.to_owned(), "OrderPlaced".to_owned()),
    ]);
    let d = delivery(
        headers,
        br#"{"order_id":"o","version":1}"#,
        "m".into(),
        None,
        1,
    )
    .unwrap();
    assert_eq!(
        (d.event_id, d.event_type.as_deref()),
        (id, Some("OrderPlaced"))
    );
    let missing = delivery(HashMap::new(), b"{}", "m".into(), None, 1).unwrap_err();
    assert!(missing.contains(HEADER_EVENT_ID), "{missing}");
    let bad = HashMap::from([(HEADER_EVENT_ID.to_owned(), "nope".to_owned())]);
    assert!(delivery(bad, b"{}", "m".into(), None, 1).is_err());
}

/// `--broker` names: the kinds of the demo's configurations.
#[test]
fn each_broker_has_its_configuration_and_kind() {
    for broker in Broker::ALL {
        let config = demo_config(broker);
        assert_eq!(Broker::of(&config).unwrap(), broker);
        assert_eq!(
            broker::Source::of(&config).unwrap().is_none(),
            broker == Broker::Sqs
        );
    }
}
