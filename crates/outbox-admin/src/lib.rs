//! # outbox-admin: metrics, health, the dead-letter API and a web console for the relay
//!
//! One HTTP router with:
//! - `GET /metrics`: the relay's metrics (see [`outbox::metrics`]) in Prometheus text format;
//! - `GET /health/live`: 200 while the relay's loops run;
//! - `GET /health/ready`: 200 when the database answers, the relay runs (its destinations passed
//!   their start-up check) and makes progress; 503 with the reasons as JSON otherwise (see
//!   [`readiness`]);
//! - `GET /api/status`, `GET /api/dead?...`, `GET /api/dead/{id}`: the backlog, the relay's
//!   counters and destinations, the dead letters;
//! - `POST /api/dead/replay`, `POST /api/dead/delete`: the same operations as `outbox dead replay |
//!   delete`, behind `Authorization: Bearer <admin.token>` (refused when no token is configured);
//!   every mutation, and every refused one, is logged;
//! - `GET /`: the web console, one static page embedded in the binary.
//!
//! `outbox relay --admin-listen 127.0.0.1:9187` serves it ([`serve`]); an application mounts
//! [`router`] in its own axum app, or installs its own `metrics` exporter and skips this crate.

#![forbid(unsafe_code)]

mod api;
mod health;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::routing::{get, post};
use axum::Router;
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use outbox::config::{AdminConfig, AdminToken};
use outbox::{RelayMonitor, Schema};
use sqlx::PgPool;

pub use health::{readiness, Readiness};

/// What the admin endpoints serve and how they judge readiness.
#[derive(Clone)]
pub struct AdminState {
    inner: Arc<StateInner>,
}

struct StateInner {
    pool: PgPool,
    schema: Schema,
    relay: Option<Arc<dyn RelayMonitor>>,
    settings: AdminSettings,
    metrics: Option<PrometheusHandle>,
}

/// The readiness thresholds and the mutation token (from `[admin]`).
#[derive(Clone, Debug)]
pub struct AdminSettings {
    /// Required by replay and delete; `None` refuses them.
    pub token: Option<AdminToken>,
    /// See `admin.stall_after`.
    pub stall_after: Duration,
    /// See `admin.max_pending_age`.
    pub max_pending_age: Option<Duration>,
}

impl AdminSettings {
    /// The settings of an `[admin]` section.
    pub fn from_config(config: &AdminConfig) -> Self {
        Self {
            token: config.token.clone(),
            stall_after: config.stall_after,
            max_pending_age: config.max_pending_age,
        }
    }
}

impl Default for AdminSettings {
    fn default() -> Self {
        Self::from_config(&AdminConfig::default())
    }
}

impl AdminState {
    /// The state over the outbox in `schema` of `pool`, the relay of this process (`None` when
    /// it runs elsewhere: then liveness is the process's and readiness leaves the relay out), and
    /// the metrics rendered by `metrics` (see [`prometheus`]; `None`: `/metrics` answers 404).
    pub fn new(
        pool: PgPool,
        schema: Schema,
        relay: Option<Arc<dyn RelayMonitor>>,
        settings: AdminSettings,
        metrics: Option<PrometheusHandle>,
    ) -> Self {
        Self {
            inner: Arc::new(StateInner {
                pool,
                schema,
                relay,
                settings,
                metrics,
            }),
        }
    }
}

/// The admin routes over `state`, to serve with [`serve`] or to merge into an application's own
/// router (`app.merge(outbox_admin::router(state))`, or `nest("/outbox", ...)`).
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/", get(api::console))
        .route("/metrics", get(api::metrics))
        .route("/health/live", get(health::live))
        .route("/health/ready", get(health::ready))
        .route("/api/status", get(api::status))
        .route("/api/dead", get(api::dead_list))
        .route("/api/dead/{id}", get(api::dead_show))
        .route("/api/dead/replay", post(api::dead_replay))
        .route("/api/dead/delete", post(api::dead_delete))
        .with_state(state)
}

/// Why the admin listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The address is taken or not ours.
    #[error("cannot listen on {addr} for the admin API: {source}; choose another admin.listen / --admin-listen")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// Another `metrics` recorder is installed in this process.
    #[error("cannot install the Prometheus recorder: {0}")]
    Metrics(String),
}

/// Binds the admin listener. Whether the address may be used (loopback, or `admin.allow_remote`)
/// is the configuration's to decide ([`AdminConfig::check_listen`]).
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, AdminError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| AdminError::Bind { addr, source })
}

/// Serves `router` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

/// How often the exporter folds recorded histogram samples into its buckets when nobody scrapes,
/// so that memory stays bounded between scrapes.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// The process's Prometheus recorder: installed as the global `metrics` recorder on first call
/// (with the outbox's histogram buckets and help texts), the same handle afterwards. Fails when
/// another recorder was installed first; the application then exports the metrics itself.
pub fn prometheus() -> Result<PrometheusHandle, AdminError> {
    static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = prometheus_recorder()?;
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).map_err(|e| e.to_string())?;
            outbox::metrics::describe();
            spawn_upkeep(handle.clone())?;
            Ok(handle)
        })
        .clone()
        .map_err(AdminError::Metrics)
}

/// A Prometheus recorder with the outbox's histogram buckets, not installed: for an application
/// (or the benchmark) that wraps it in a recorder of its own before installing it. It needs
/// [`spawn_upkeep`] as [`prometheus`] does.
pub fn prometheus_recorder() -> Result<PrometheusRecorder, String> {
    let mut builder = PrometheusBuilder::new();
    for (name, kind, _) in outbox::metrics::ALL {
        if *kind == outbox::metrics::Kind::Histogram {
            builder = builder
                .set_buckets_for_metric(
                    Matcher::Full((*name).to_owned()),
                    outbox::metrics::buckets(name),
                )
                .map_err(|e| e.to_string())?;
        }
    }
    Ok(builder.build_recorder())
}

/// Folds the recorder's histogram samples into buckets every few seconds on a thread of its own,
/// so that memory stays bounded when nobody scrapes.
pub fn spawn_upkeep(handle: PrometheusHandle) -> Result<(), String> {
    std::thread::Builder::new()
        .name("outbox-metrics-upkeep".into())
        .spawn(move || loop {
            std::thread::sleep(UPKEEP_INTERVAL);
            handle.run_upkeep();
        })
        .map(drop)
        .map_err(|e| e.to_string())
}
