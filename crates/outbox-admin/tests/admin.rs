//! The admin listener against real PostgreSQL and a real relay: metric values after known
//! traffic, readiness that catches a stalled relay and a destination that is down (and recovers),
//! the token on mutations, the dashboards and alerts against the exported names, and the web
//! console in headless Chromium.
//!
//! The tests share one process-wide metrics recorder, so they run one at a time ([`serial`]) and
//! each uses destination names of its own.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use outbox::config::AdminToken;
use outbox::{
    Backoff, NewEvent, Outbox, OutboxEvent, PgStore, PgStoreOptions, PublishError, PublishResult,
    Publisher, Relay, RelayOptions, Schema,
};
use outbox_admin::{AdminSettings, AdminState};
use outbox_testkit::TestDb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One test at a time: the metrics recorder (and its gauges) is the process's.
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// A publisher with one destination of the test's own name, whose behaviour the test scripts:
/// while `poison` is set (from the start), events of type `Poison` fail for good; while `hang` is
/// set, publish calls wait; while `down` is set, the destination is unavailable.
#[derive(Clone)]
struct Scripted {
    destination: String,
    poison: Arc<AtomicBool>,
    hang: Arc<AtomicBool>,
    down: Arc<AtomicBool>,
    published: Arc<Mutex<Vec<uuid::Uuid>>>,
}

impl Scripted {
    fn new(destination: &str) -> Self {
        Self {
            destination: format!("{destination}-{}", uuid::Uuid::now_v7().simple()),
            poison: Arc::new(AtomicBool::new(true)),
            hang: Arc::default(),
            down: Arc::default(),
            published: Arc::default(),
        }
    }
}

#[async_trait]
impl Publisher for Scripted {
    async fn publish(&self, batch: &[OutboxEvent]) -> Vec<PublishResult> {
        while self.hang.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if self.down.load(Ordering::SeqCst) {
            return vec![
                Err(PublishError::unavailable("connection refused (scripted)"));
                batch.len()
            ];
        }
        batch
            .iter()
            .map(|e| {
                if e.event_type == "Poison" && self.poison.load(Ordering::SeqCst) {
                    Err(PublishError::permanent(
                        "rejected for its content (scripted)",
                    ))
                } else {
                    self.published.lock().unwrap().push(e.id);
                    Ok(())
                }
            })
            .collect()
    }

    fn destination_of(&self, _event: &OutboxEvent) -> String {
        self.destination.clone()
    }
}

fn options() -> RelayOptions {
    RelayOptions {
        poll_interval: Duration::from_millis(50),
        publish_timeout: Duration::from_secs(60),
        backoff: Backoff {
            base: Duration::from_millis(50),
            max: Duration::from_millis(200),
        },
        destination_backoff_max: Duration::from_millis(200),
        backlog_interval: Duration::from_millis(100),
        ..RelayOptions::default()
    }
}

const TOKEN: &str = "test-token-0123456789abcdef";

fn settings(stall_after: Duration, token: Option<&str>) -> AdminSettings {
    AdminSettings {
        token: token.map(AdminToken::new),
        stall_after,
        max_pending_age: None,
    }
}

/// Serves the admin router for `db` (and `relay`, when given) on a free loopback port.
async fn serve(
    db: &TestDb,
    relay: Option<Arc<dyn outbox::RelayMonitor>>,
    settings: AdminSettings,
) -> SocketAddr {
    let metrics = outbox_admin::prometheus().expect("the Prometheus recorder installs");
    let state = AdminState::new(
        db.pool.clone(),
        Schema::default(),
        relay,
        settings,
        Some(metrics),
    );
    let listener = outbox_admin::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(outbox_admin::serve(
        listener,
        outbox_admin::router(state),
        std::future::pending(),
    ));
    addr
}

/// A response: status code and body.
struct Reply {
    status: u16,
    body: String,
}

impl Reply {
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

/// A minimal HTTP/1.1 client (one request per connection), enough for these endpoints.
async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Reply {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        head.push_str("Content-Type: application/json\r\n");
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("a response head");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status code");
    assert!(
        !head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "this client reads only sized bodies"
    );
    Reply {
        status,
        body: body.to_owned(),
    }
}

async fn get(addr: SocketAddr, path: &str) -> Reply {
    request(addr, "GET", path, &[], "").await
}

/// The value of a sample in Prometheus text (`name{labels} value`), matching the name and every
/// given label.
fn sample(metrics: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    metrics.lines().find_map(|line| {
        if line.starts_with('#') {
            return None;
        }
        let (series, value) = line.rsplit_once(' ')?;
        let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
        if metric != name {
            return None;
        }
        labels
            .iter()
            .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
            .then(|| value.parse().ok())?
    })
}

/// Polls `check` until it returns `Some`, failing with `what` after `within`.
async fn eventually<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn enqueue(db: &TestDb, events: &[(&str, &str)]) -> Vec<uuid::Uuid> {
    let outbox = Outbox::new(Schema::default());
    let mut tx = db.pool.begin().await.unwrap();
    let new = events.iter().map(|(key, ty)| {
        NewEvent::new("order", *key, *ty)
            .payload(&serde_json::json!({ "order": key }))
            .unwrap()
    });
    let ids = outbox.enqueue_all(&mut tx, new).await.unwrap();
    tx.commit().await.unwrap();
    ids
}

async fn store(db: &TestDb) -> PgStore {
    PgStore::new(db.pool.clone(), PgStoreOptions::default())
        .await
        .unwrap()
}

#[tokio::test]
async fn metrics_count_published_failed_and_dead_events_per_destination() {
    let _serial = serial().await;
    let db = TestDb::new().await.unwrap();
    let publisher = Scripted::new("metrics");
    let destination = publisher.destination.clone();
    let mut events: Vec<(&str, &str)> = vec![
        ("o-1", "Placed"),
        ("o-2", "Placed"),
        ("o-3", "Placed"),
        ("o-4", "Placed"),
        ("o-5", "Placed"),
    ];
    events.push(("o-6", "Poison"));
    let ids = enqueue(&db, &events).await;
    let relay = Relay::new(store(&db).await, publisher.clone(), options());
    let handle = relay.spawn();
    let addr = serve(
        &db,
        Some(handle.monitor()),
        settings(Duration::from_secs(60), None),
    )
    .await;

    let dest = [("destination", destination.as_str())];
    let text = eventually(
        Duration::from_secs(20),
        "the counters and gauges",
        || async {
            let text = get(addr, "/metrics").await.body;
            let done = sample(&text, "outbox_events_published_total", &dest) == Some(5.0)
                && sample(&text, "outbox_events_dead_total", &dest) == Some(1.0)
                && sample(&text, "outbox_dead_events", &[]) == Some(1.0)
                && sample(&text, "outbox_backlog_events", &[]) == Some(0.0);
            done.then_some(text)
        },
    )
    .await;
    let failed = [("destination", destination.as_str()), ("scope", "event")];
    assert_eq!(
        sample(&text, "outbox_events_failed_total", &failed),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "outbox_events_failed_total",
            &[
                ("destination", destination.as_str()),
                ("scope", "destination")
            ]
        ),
        None,
        "no destination failure happened"
    );
    assert_eq!(
        sample(&text, "outbox_destination_up", &dest),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "outbox_backlog_oldest_age_seconds", &[]),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "outbox_keys_blocked", &[]),
        Some(0.0),
        "{text}"
    );
    assert!(
        sample(&text, "outbox_publish_duration_seconds_count", &dest).unwrap_or(0.0) >= 1.0,
        "{text}"
    );
    assert_eq!(
        sample(&text, "outbox_commit_to_publish_seconds_count", &[]).map(|n| n >= 5.0),
        Some(true),
        "{text}"
    );
    assert!(
        sample(&text, "outbox_claim_duration_seconds_count", &[]).unwrap_or(0.0) >= 1.0,
        "{text}"
    );
    assert!(
        sample(&text, "outbox_batch_events_count", &[]).unwrap_or(0.0) >= 1.0,
        "{text}"
    );
    assert!(
        text.contains("# HELP outbox_events_published_total"),
        "{text}"
    );

    // The same traffic through the API: status counts and the dead event with its payload.
    let status = get(addr, "/api/status").await.json();
    assert_eq!(status["backlog"]["dead"], 1, "{status}");
    let d = status["relay"]["destinations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == destination.as_str())
        .cloned()
        .unwrap();
    assert_eq!(
        (d["published"].clone(), d["dead"].clone(), d["up"].clone()),
        (5.into(), 1.into(), true.into())
    );
    let dead = get(addr, "/api/dead?type=Poison").await.json();
    assert_eq!(dead.as_array().unwrap().len(), 1, "{dead}");
    assert_eq!(dead[0]["id"], ids[5].to_string());
    assert!(dead[0]["last_error"].as_str().unwrap().contains("rejected"));
    let shown = get(addr, &format!("/api/dead/{}", ids[5])).await.json();
    assert_eq!(shown["payload"]["order"], "o-6", "{shown}");
    assert_eq!(
        get(addr, "/api/dead?type=Placed").await.json(),
        serde_json::json!([])
    );
    assert_eq!(
        get(addr, &format!("/api/dead/{}", ids[0])).await.status,
        404
    );
    assert_eq!(get(addr, "/api/dead/not-a-uuid").await.status, 400);
    assert_eq!(get(addr, "/api/dead?limit=0").await.status, 400);
    assert_eq!(get(addr, "/api/dead?colour=red").await.status, 400);

    handle.stop().await.unwrap();
    db.drop_db().await.unwrap();
}

#[tokio::test]
async fn readiness_turns_503_on_a_stalled_relay_and_200_after_recovery() {
    let _serial = serial().await;
    let db = TestDb::new().await.unwrap();
    let publisher = Scripted::new("stall");
    // The broker call hangs (within the publish timeout, so the relay itself sees nothing wrong).
    publisher.hang.store(true, Ordering::SeqCst);
    enqueue(
        &db,
        &[("o-1", "Placed"), ("o-2", "Placed"), ("o-3", "Placed")],
    )
    .await;
    let relay = Relay::new(store(&db).await, publisher.clone(), options());
    let handle = relay.spawn();
    let addr = serve(
        &db,
        Some(handle.monitor()),
        settings(Duration::from_secs(1), None),
    )
    .await;

    let stalled = eventually(
        Duration::from_secs(15),
        "readiness 503 for the stall",
        || async {
            let reply = get(addr, "/health/ready").await;
            (reply.status == 503).then(|| reply.json())
        },
    )
    .await;
    let reasons = stalled["reasons"].to_string();
    assert!(
        reasons.contains("stalled") && reasons.contains("3 events are deliverable"),
        "{stalled}"
    );
    assert_eq!(
        get(addr, "/health/live").await.status,
        200,
        "the loop still runs: only readiness fails"
    );

    publisher.hang.store(false, Ordering::SeqCst);
    let ready = eventually(
        Duration::from_secs(15),
        "readiness 200 after recovery",
        || async {
            let reply = get(addr, "/health/ready").await;
            (reply.status == 200).then(|| reply.json())
        },
    )
    .await;
    assert_eq!(ready["reasons"], serde_json::json!([]), "{ready}");
    assert_eq!(publisher.published.lock().unwrap().len(), 3);

    // A stopped relay is neither live nor ready.
    let monitor = handle.monitor();
    handle.stop().await.unwrap();
    assert!(!monitor.health().running);
    assert_eq!(get(addr, "/health/live").await.status, 503);
    let reply = get(addr, "/health/ready").await;
    assert_eq!(reply.status, 503);
    assert!(reply.body.contains("not running"), "{}", reply.body);
    db.drop_db().await.unwrap();
}

#[tokio::test]
async fn a_destination_down_turns_readiness_503_then_200_when_it_is_back() {
    let _serial = serial().await;
    let db = TestDb::new().await.unwrap();
    let publisher = Scripted::new("down");
    let destination = publisher.destination.clone();
    publisher.down.store(true, Ordering::SeqCst);
    enqueue(&db, &[("o-1", "Placed"), ("o-2", "Placed")]).await;
    let relay = Relay::new(store(&db).await, publisher.clone(), options());
    let handle = relay.spawn();
    let addr = serve(
        &db,
        Some(handle.monitor()),
        settings(Duration::from_secs(1), None),
    )
    .await;
    let dest = [("destination", destination.as_str())];

    let down = eventually(
        Duration::from_secs(15),
        "readiness 503 for the destination",
        || async {
            let reply = get(addr, "/health/ready").await;
            (reply.status == 503).then(|| reply.json())
        },
    )
    .await;
    let reasons = down["reasons"].to_string();
    assert!(
        reasons.contains(&format!("destination `{destination}` has been down")),
        "{down}"
    );
    assert!(reasons.contains("connection refused"), "{down}");
    let text = get(addr, "/metrics").await.body;
    assert_eq!(
        sample(&text, "outbox_destination_up", &dest),
        Some(0.0),
        "{text}"
    );
    let failed = [
        ("destination", destination.as_str()),
        ("scope", "destination"),
    ];
    assert!(
        sample(&text, "outbox_events_failed_total", &failed).unwrap_or(0.0) >= 1.0,
        "{text}"
    );
    assert_eq!(
        sample(&text, "outbox_events_dead_total", &dest),
        None,
        "an outage dead-letters nothing"
    );

    publisher.down.store(false, Ordering::SeqCst);
    eventually(
        Duration::from_secs(15),
        "readiness 200 once the destination is back",
        || async { (get(addr, "/health/ready").await.status == 200).then_some(()) },
    )
    .await;
    let text = eventually(Duration::from_secs(15), "both events published", || async {
        let text = get(addr, "/metrics").await.body;
        (sample(&text, "outbox_events_published_total", &dest) == Some(2.0)).then_some(text)
    })
    .await;
    assert_eq!(
        sample(&text, "outbox_destination_up", &dest),
        Some(1.0),
        "{text}"
    );
    handle.stop().await.unwrap();
    db.drop_db().await.unwrap();
}

/// Makes the events dead as a relay would have, and returns their ids.
async fn dead_events(db: &TestDb, n: usize) -> Vec<uuid::Uuid> {
    let keys: Vec<String> = (0..n).map(|i| format!("d-{i}")).collect();
    let events: Vec<(&str, &str)> = keys.iter().map(|k| (k.as_str(), "Broken")).collect();
    let ids = enqueue(db, &events).await;
    sqlx::query(
        "UPDATE outbox_event SET status = 'dead', attempts = 3, last_error = 'gave up (test)'",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    ids
}

#[tokio::test]
async fn mutations_need_the_configured_token() {
    let _serial = serial().await;
    let db = TestDb::new().await.unwrap();
    let ids = dead_events(&db, 3).await;
    let addr = serve(&db, None, settings(Duration::from_secs(60), Some(TOKEN))).await;
    let body = serde_json::json!({ "ids": [ids[0]] }).to_string();
    let bearer = format!("Bearer {TOKEN}");

    for path in ["/api/dead/replay", "/api/dead/delete"] {
        let none = request(addr, "POST", path, &[], &body).await;
        assert_eq!(none.status, 401, "{}", none.body);
        assert!(none.body.contains("Authorization: Bearer"), "{}", none.body);
        let wrong = request(
            addr,
            "POST",
            path,
            &[("Authorization", "Bearer test-token-0123456789abcdeX")],
            &body,
        )
        .await;
        assert_eq!(wrong.status, 401, "{}", wrong.body);
        let short = request(
            addr,
            "POST",
            path,
            &[("Authorization", "Bearer test")],
            &body,
        )
        .await;
        assert_eq!(short.status, 401, "{}", short.body);
        let basic = request(
            addr,
            "POST",
            path,
            &[("Authorization", &format!("Basic {TOKEN}"))],
            &body,
        )
        .await;
        assert_eq!(basic.status, 401, "{}", basic.body);
    }
    let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_event WHERE status = 'dead'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(dead, 3, "a refused mutation changes nothing");

    let auth = [("Authorization", bearer.as_str())];
    let replayed = request(addr, "POST", "/api/dead/replay", &auth, &body).await;
    assert_eq!(replayed.status, 200, "{}", replayed.body);
    assert_eq!(replayed.json()["changed"], serde_json::json!([ids[0]]));
    let again = request(addr, "POST", "/api/dead/replay", &auth, &body)
        .await
        .json();
    assert_eq!(again["not_found"], serde_json::json!([ids[0]]), "{again}");
    let deleted = request(
        addr,
        "POST",
        "/api/dead/delete",
        &auth,
        &serde_json::json!({ "filter": { "key": "order/d-1" } }).to_string(),
    )
    .await;
    assert_eq!(
        deleted.json()["changed"],
        serde_json::json!([ids[1]]),
        "{}",
        deleted.body
    );
    let bad = request(addr, "POST", "/api/dead/delete", &auth, "{}").await;
    assert_eq!(bad.status, 400, "{}", bad.body);
    let bad = request(addr, "POST", "/api/dead/delete", &auth, "not json").await;
    assert_eq!(bad.status, 400, "{}", bad.body);
    let status: Vec<(String,)> = sqlx::query_as("SELECT status FROM outbox_event ORDER BY seq")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        status.into_iter().map(|(s,)| s).collect::<Vec<_>>(),
        ["pending", "dead"],
        "replayed, deleted, untouched"
    );
    let status = get(addr, "/api/status").await;
    assert!(!status.body.contains(TOKEN), "the token is never shown");
    assert_eq!(status.json()["mutations_enabled"], true);

    // Without a configured token, every mutation is refused, whatever the request carries.
    let open = serve(&db, None, settings(Duration::from_secs(60), None)).await;
    let refused = request(
        open,
        "POST",
        "/api/dead/delete",
        &auth,
        &serde_json::json!({ "all": true }).to_string(),
    )
    .await;
    assert_eq!(refused.status, 403, "{}", refused.body);
    assert!(refused.body.contains("admin.token"), "{}", refused.body);
    let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_event WHERE status = 'dead'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(dead, 1);
    db.drop_db().await.unwrap();
}

/// The metric names the relay exports, from the one list in the code.
fn exported() -> HashSet<String> {
    outbox::metrics::ALL
        .iter()
        .flat_map(|(name, kind, _)| match kind {
            outbox::metrics::Kind::Histogram => ["_bucket", "_sum", "_count"]
                .iter()
                .map(|suffix| format!("{name}{suffix}"))
                .collect::<Vec<_>>(),
            _ => vec![(*name).to_owned()],
        })
        .collect()
}

/// Every `outbox_...` identifier in `text`.
fn referenced(text: &str) -> HashSet<String> {
    let mut names = HashSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("outbox_") {
        let start = i + at;
        let boundary =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end = text[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(text.len(), |n| start + n);
        if boundary {
            names.insert(text[start..end].to_owned());
        }
        i = end;
    }
    names
}

fn repo_file(path: &str) -> String {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    std::fs::read_to_string(root.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn dashboard_alerts_and_readme_use_only_exported_metric_names() {
    let exported = exported();
    let dashboard = repo_file("ops/grafana/outbox.json");
    let parsed: serde_json::Value =
        serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    assert!(parsed["panels"].as_array().is_some_and(|p| !p.is_empty()));
    for (file, text) in [
        ("ops/grafana/outbox.json", dashboard.clone()),
        (
            "ops/prometheus/alerts.yml",
            repo_file("ops/prometheus/alerts.yml"),
        ),
    ] {
        let names = referenced(&text);
        assert!(!names.is_empty(), "{file} uses no outbox metric");
        let unknown: Vec<&String> = names.iter().filter(|n| !exported.contains(*n)).collect();
        assert!(
            unknown.is_empty(),
            "{file} uses metrics the relay does not export: {unknown:?}"
        );
    }
    // Every metric is in the README's table and on the dashboard.
    let readme = repo_file("README.md");
    for (name, _, _) in outbox::metrics::ALL {
        assert!(
            readme.contains(&format!("`{name}")),
            "README's metrics table lacks {name}"
        );
        assert!(
            dashboard.contains(name),
            "the dashboard does not show {name}"
        );
    }
}

/// Where the console test's browser tools are: `None` (the test is skipped) unless installed;
/// `scripts/test.sh` installs them and sets `OUTBOX_TEST_REQUIRE_BROWSER`, which makes their
/// absence a failure.
fn browser_tools() -> Option<std::path::PathBuf> {
    let target = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target");
    let dir = std::env::var_os("OUTBOX_TEST_PLAYWRIGHT_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| target.join("console-test"));
    let ready = dir
        .join("node_modules/playwright-core/package.json")
        .exists()
        && std::path::Path::new("/usr/bin/chromium").exists();
    if !ready {
        assert!(
            std::env::var_os("OUTBOX_TEST_REQUIRE_BROWSER").is_none(),
            "chromium or playwright-core missing in {}: run scripts/test.sh (it installs them)",
            dir.display()
        );
        eprintln!("skipped: chromium or playwright-core missing (scripts/test.sh installs them)");
        return None;
    }
    Some(dir)
}

#[tokio::test]
async fn the_console_in_headless_chromium_shows_the_outbox_and_replays_a_dead_event() {
    let Some(tools) = browser_tools() else { return };
    let _serial = serial().await;
    let db = TestDb::new().await.unwrap();
    let publisher = Scripted::new("console");
    let destination = publisher.destination.clone();
    let ids = enqueue(
        &db,
        &[
            ("c-1", "Placed"),
            ("c-2", "Placed"),
            ("c-3", "Placed"),
            ("c-4", "Placed"),
            ("c-5", "Poison"),
        ],
    )
    .await;
    let relay = Relay::new(store(&db).await, publisher.clone(), options());
    let handle = relay.spawn();
    let addr = serve(
        &db,
        Some(handle.monitor()),
        settings(Duration::from_secs(60), Some(TOKEN)),
    )
    .await;
    eventually(
        Duration::from_secs(20),
        "4 published and 1 dead",
        || async {
            let s = get(addr, "/api/status").await.json();
            (s["backlog"]["dead"] == 1 && s["relay"]["counters"]["published"] == 4).then_some(())
        },
    )
    .await;
    // The cause is fixed before the operator replays (as the runbook says).
    publisher.poison.store(false, Ordering::SeqCst);

    let shots =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/console-test/console");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/console/drive.cjs");
    let url = format!("http://{addr}/");
    let output = tokio::process::Command::new("node")
        .arg(&script)
        .args([
            url.as_str(),
            TOKEN,
            &ids[4].to_string(),
            &shots.display().to_string(),
        ])
        .env("NODE_PATH", tools.join("node_modules"))
        .output()
        .await
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let seen: serde_json::Value =
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert!(
        seen.get("error").is_none(),
        "the browser run failed: {seen}"
    );
    assert_eq!(seen["ready"], "ready", "{seen}");
    assert_eq!(seen["pending"], "0", "{seen}");
    assert_eq!(seen["dead"], "1", "{seen}");
    assert_eq!(seen["keys-blocked"], "0", "{seen}");
    let row = seen["destinations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r[0] == destination.as_str())
        .unwrap_or_else(|| panic!("{destination} shown: {seen}"));
    assert_eq!(
        (row[1].as_str(), row[2].as_str(), row[5].as_str()),
        (Some("up"), Some("4"), Some("1")),
        "{seen}"
    );
    assert_eq!(seen["deadRow"][1], "order/c-5", "{seen}");
    assert_eq!(seen["detailPayload"]["payload"]["order"], "c-5", "{seen}");
    assert!(
        seen["detailError"].as_str().unwrap().contains("rejected"),
        "{seen}"
    );
    assert!(
        seen["wrongToken"]
            .as_str()
            .unwrap()
            .contains("token is wrong"),
        "{seen}"
    );
    assert!(
        seen["replayed"]
            .as_str()
            .unwrap()
            .starts_with("replay: 1 changed"),
        "{seen}"
    );
    assert_eq!(seen["deadAfter"], "0", "{seen}");
    assert_eq!(seen["deadListAfter"], "no dead events", "{seen}");
    // The replayed event reached the broker.
    eventually(
        Duration::from_secs(20),
        "the replayed event published",
        || async {
            publisher
                .published
                .lock()
                .unwrap()
                .contains(&ids[4])
                .then_some(())
        },
    )
    .await;
    assert!(shots.with_file_name("console-after-replay.png").exists());
    handle.stop().await.unwrap();
    db.drop_db().await.unwrap();
}
