//! Scenario `observability`: what metrics, the backlog query, the relay's logging and its traces
//! cost a drain, measured in one process by alternating three set-ups over the same preloaded
//! backlog:
//! - **bare**: the metrics facade's calls go nowhere (the recorder answers no-op handles), the
//!   backlog query (`RelayOptions::backlog_interval`) never runs, the log filter is `warn`;
//! - **observed**: what `outbox relay --admin-listen` runs: the Prometheus recorder with the
//!   outbox's buckets and its upkeep thread, the backlog query every 5 s (the default), and the
//!   CLI's default log filter `info,sqlx=warn`;
//! - **traced**: observed, plus the relay's spans (`claim`, `publish`, `settle`, debug level)
//!   recorded by `tracing-opentelemetry` into the OpenTelemetry SDK's batch span processor, as
//!   `outbox relay` does with `[telemetry] otlp_endpoint`, but exported to an exporter that drops
//!   them (no protobuf encoding, no network: those depend on the collector).
//!
//! The set-ups take turns round by round (the first of them rotates), so drift of the machine hits
//! all alike; the ratios are each set-up ÷ bare of the medians.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::PrometheusRecorder;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SpanData, SpanExporter};
use outbox::RelayOptions;

use crate::db::BenchDb;
use crate::drain::{relay_drain_with, Run};
use crate::report::{fmt_num, Report, Table};

/// The process's metrics recorder: the Prometheus recorder while switched on, no-op handles
/// while off (what the facade hands out when no recorder is installed).
pub(crate) struct Switch {
    on: AtomicBool,
    inner: PrometheusRecorder,
}

impl Switch {
    pub(crate) fn new(inner: PrometheusRecorder, on: bool) -> Self {
        Self {
            on: AtomicBool::new(on),
            inner,
        }
    }

    pub(crate) fn set(&self, on: bool) {
        self.on.store(on, Ordering::SeqCst);
    }

    fn on(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }
}

impl Recorder for Switch {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.inner.describe_counter(key, unit, description);
    }
    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.inner.describe_gauge(key, unit, description);
    }
    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.inner.describe_histogram(key, unit, description);
    }
    fn register_counter(&self, key: &Key, metadata: &Metadata<'_>) -> Counter {
        if self.on() {
            self.inner.register_counter(key, metadata)
        } else {
            Counter::noop()
        }
    }
    fn register_gauge(&self, key: &Key, metadata: &Metadata<'_>) -> Gauge {
        if self.on() {
            self.inner.register_gauge(key, metadata)
        } else {
            Gauge::noop()
        }
    }
    fn register_histogram(&self, key: &Key, metadata: &Metadata<'_>) -> Histogram {
        if self.on() {
            self.inner.register_histogram(key, metadata)
        } else {
            Histogram::noop()
        }
    }
}

/// Switches the log filter of the benchmark's subscriber.
pub(crate) type SetLogFilter = Box<dyn Fn(&str) -> anyhow::Result<()> + Send + Sync>;

/// What the scenario switches between drains.
pub(crate) struct Controls {
    pub(crate) metrics: Arc<Switch>,
    pub(crate) set_log_filter: SetLogFilter,
    /// Whether the OpenTelemetry layer records the outbox crates' spans.
    pub(crate) traced: Arc<AtomicBool>,
    /// The provider behind that layer, whose exporter is a [`Discard`].
    pub(crate) tracer_provider: opentelemetry_sdk::trace::SdkTracerProvider,
    /// What the [`Discard`] exporter was handed: proof that the traced drains recorded spans.
    pub(crate) spans_exported: Arc<AtomicU64>,
}

/// The span exporter of the `traced` set-up: counts every batch's spans and drops them.
#[derive(Debug)]
pub(crate) struct Discard(pub(crate) Arc<AtomicU64>);

impl SpanExporter for Discard {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        self.0.fetch_add(batch.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

struct SetUp {
    name: &'static str,
    metrics: bool,
    backlog_query: bool,
    log_filter: &'static str,
    traced: bool,
}

const SET_UPS: [SetUp; 3] = [
    SetUp {
        name: "bare",
        metrics: false,
        backlog_query: false,
        log_filter: "warn",
        traced: false,
    },
    SetUp {
        name: "observed",
        metrics: true,
        backlog_query: true,
        log_filter: "info,sqlx=warn",
        traced: false,
    },
    SetUp {
        name: "traced",
        metrics: true,
        backlog_query: true,
        log_filter: "info,sqlx=warn",
        traced: true,
    },
];

pub(crate) struct ObserveConfig {
    pub(crate) events: i64,
    pub(crate) keys: i64,
    pub(crate) rounds: usize,
}

pub(crate) async fn run(
    db: &BenchDb,
    cfg: &ObserveConfig,
    controls: &Controls,
    report: &mut Report,
) -> anyhow::Result<()> {
    let mut runs: Vec<Vec<Run>> = SET_UPS.iter().map(|_| Vec::new()).collect();
    for round in 0..cfg.rounds {
        for turn in 0..SET_UPS.len() {
            let which = (round + turn) % SET_UPS.len();
            let set_up = &SET_UPS[which];
            db.preload(cfg.events, cfg.keys).await?;
            controls.metrics.set(set_up.metrics);
            (controls.set_log_filter)(set_up.log_filter)?;
            controls.traced.store(set_up.traced, Ordering::SeqCst);
            let backlog_interval = if set_up.backlog_query {
                RelayOptions::default().backlog_interval
            } else {
                Duration::from_secs(24 * 3600)
            };
            let run = relay_drain_with(
                db,
                RelayOptions {
                    batch_size: 100,
                    workers: 1,
                    backlog_interval,
                    ..RelayOptions::default()
                },
            )
            .await;
            controls.metrics.set(false);
            (controls.set_log_filter)("warn")?;
            controls.traced.store(false, Ordering::SeqCst);
            let run = run?;
            anyhow::ensure!(
                run.events == cfg.events as u64,
                "the drain published {} of {}",
                run.events,
                cfg.events
            );
            runs[which].push(run);
        }
    }
    controls
        .tracer_provider
        .force_flush()
        .map_err(|e| anyhow::anyhow!("flushing the traced drains' spans: {e}"))?;
    let spans = controls.spans_exported.load(Ordering::SeqCst);
    anyhow::ensure!(
        spans > 0,
        "the traced drains recorded no span: the OpenTelemetry layer saw nothing"
    );
    let median = |runs: &[Run], f: fn(&Run) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let list = |runs: &[Run], f: fn(&Run) -> f64, decimals: usize| {
        runs.iter()
            .map(|r| format!("{:.*}", decimals, f(r)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut table = Table::new(
        format!(
            "observability: {} events of ~200 B over {} keys drained {} times per set-up (1 worker, batch 100, null publisher), taking turns",
            cfg.events, cfg.keys, cfg.rounds
        ),
        &[
            "set-up",
            "relay ev/s per run",
            "median ev/s",
            "÷ bare",
            "CPU s per 1M per run",
            "median CPU s per 1M",
        ],
    );
    let bare_rate = median(&runs[0], Run::rate);
    let bare_cpu = median(&runs[0], Run::cpu_s_per_million);
    for (set_up, runs) in SET_UPS.iter().zip(&runs) {
        table.row(vec![
            set_up.name.to_owned(),
            list(runs, Run::rate, 0),
            fmt_num(median(runs, Run::rate)),
            format!("{:.3}", median(runs, Run::rate) / bare_rate),
            list(runs, Run::cpu_s_per_million, 2),
            format!("{:.2}", median(runs, Run::cpu_s_per_million)),
        ]);
    }
    report.table(&table);
    for (set_up, runs) in SET_UPS.iter().zip(&runs).skip(1) {
        let spans = if set_up.traced {
            format!(" spans_exported={spans}")
        } else {
            String::new()
        };
        report.result_vs(
            "observability",
            format!(
                "setup={}{spans} events_per_s={} vs=bare cpu_s_per_1m={:.2} bare_cpu_s_per_1m={bare_cpu:.2} rounds={}",
                set_up.name,
                fmt_num(median(runs, Run::rate)),
                median(runs, Run::cpu_s_per_million),
                cfg.rounds
            ),
            median(runs, Run::rate),
            bare_rate,
        );
    }
    Ok(())
}
