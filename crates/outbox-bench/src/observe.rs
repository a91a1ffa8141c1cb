//! Scenario `observability`: what metrics, the backlog query and the relay's logging cost a
//! drain, measured in one process by alternating two set-ups over the same preloaded backlog:
//! - **bare**: the metrics facade's calls go nowhere (the recorder answers no-op handles), the
//!   backlog query (`RelayOptions::backlog_interval`) never runs, the log filter is `warn`;
//! - **observed**: what `outbox relay --admin-listen` runs: the Prometheus recorder with the
//!   outbox's buckets and its upkeep thread, the backlog query every 5 s (the default), and the
//!   CLI's default log filter `info,sqlx=warn`.
//!
//! The two alternate round by round (bare first in odd rounds, observed first in even ones), so
//! drift of the machine hits both alike; the ratio is observed ÷ bare of the medians.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::PrometheusRecorder;
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

pub(crate) struct ObserveConfig {
    pub events: i64,
    pub keys: i64,
    pub rounds: usize,
}

pub(crate) async fn run(
    db: &BenchDb,
    cfg: &ObserveConfig,
    switch: &Switch,
    set_log_filter: &SetLogFilter,
    report: &mut Report,
) -> anyhow::Result<()> {
    let (mut bare, mut observed) = (Vec::new(), Vec::new());
    for round in 0..cfg.rounds {
        for observe in [round % 2 == 1, round % 2 == 0] {
            db.preload(cfg.events, cfg.keys).await?;
            switch.set(observe);
            set_log_filter(if observe { "info,sqlx=warn" } else { "warn" })?;
            let backlog_interval = if observe {
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
            switch.set(false);
            set_log_filter("warn")?;
            let run = run?;
            anyhow::ensure!(
                run.events == cfg.events as u64,
                "the drain published {} of {}",
                run.events,
                cfg.events
            );
            if observe {
                observed.push(run);
            } else {
                bare.push(run);
            }
        }
    }
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
            "observability: {} events of ~200 B over {} keys drained {} times per set-up (1 worker, batch 100, null publisher), alternating",
            cfg.events, cfg.keys, cfg.rounds
        ),
        &["set-up", "relay ev/s per run", "median ev/s", "CPU s per 1M per run", "median CPU s per 1M"],
    );
    for (name, runs) in [("bare", &bare), ("observed", &observed)] {
        table.row(vec![
            name.to_owned(),
            list(runs, Run::rate, 0),
            fmt_num(median(runs, Run::rate)),
            list(runs, Run::cpu_s_per_million, 2),
            format!("{:.2}", median(runs, Run::cpu_s_per_million)),
        ]);
    }
    report.table(&table);
    let (ours, base) = (median(&observed, Run::rate), median(&bare, Run::rate));
    report.result_vs(
        "observability",
        format!(
            "events_per_s={} vs=bare cpu_s_per_1m={:.2} bare_cpu_s_per_1m={:.2} rounds={}",
            fmt_num(ours),
            median(&observed, Run::cpu_s_per_million),
            median(&bare, Run::cpu_s_per_million),
            cfg.rounds
        ),
        ours,
        base,
    );
    Ok(())
}
