//! # outbox-bench: the relay measured side by side with its baselines
//!
//! `cargo run --release -p outbox-bench -- --quick` (smoke run, under 2 minutes) or `-- --full`,
//! against `DATABASE_URL` (may be the admin URL: the run creates `outbox_bench_<pid>` and drops
//! it at the end). Every scenario runs its baseline in the same process on the same database, so
//! the ratios survive a noisy machine. Human tables first, then `RESULT ...` lines, last.
//!
//! ## Map of the crate
//! - `db`: the run's own database, preloading, the wake-up trigger and strict_key_order switches.
//! - `drain`: backlog drain vs the bare `DELETE ... SKIP LOCKED` loop (C) and a naive poller.
//! - `latency`: commit-to-publish latency at fixed producer rates (HdrHistogram), wake-up on/off.
//! - `producer`: producer transaction cost: business row alone, + enqueue, + raw SQL insert.
//! - `brokers`: per broker (SQS, SNS, Kafka, NATS, RabbitMQ, webhook), the relay vs a plain
//!   loop of the broker's own client sending the same messages with the same batching.
//! - `observability`: a drain with metrics, the backlog query, info logging and OpenTelemetry
//!   spans vs without them.
//! - `soak`: many events with retention; table/index size, dead tuples, RSS.
//! - `profile` (`--only profile`): claim vs settle time of one worker.
//! - `sys`: CPU time and RSS of this process; `report`: tables and RESULT lines.

mod brokers;
mod db;
mod drain;
mod latency;
mod observe;
mod producer;
mod profile;
mod report;
mod soak;
mod sys;

use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::Parser;
use opentelemetry::trace::TracerProvider as _;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer as _;

#[derive(Parser, Debug)]
#[command(about = "Benchmarks the outbox relay against the physical limit and naive designs")]
struct Args {
    /// Small sizes, under 2 minutes: a smoke run (no thresholds are asserted).
    #[arg(long, conflicts_with = "full", required_unless_present = "full")]
    quick: bool,
    /// The sizes of the issue: 1M-event drain, 10M-event soak.
    #[arg(long)]
    full: bool,
    /// Server to create the benchmark database on.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,
    /// Only these scenarios (comma-separated: drain,latency,producer,broker,observability,soak;
    /// and profile, which runs only when named).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Events in the drain backlog (default: 20k quick, 1M full).
    #[arg(long)]
    drain_events: Option<i64>,
    /// Producer counts of the producer scenario (comma-separated; default 1,16).
    #[arg(long, value_delimiter = ',')]
    producers: Vec<usize>,
    /// Seconds per producer cell (default 1.2 quick, 5 full).
    #[arg(long)]
    producer_secs: Option<f64>,
    /// Interleaved rounds of the producer cells, averaged (default 1 quick, 2 full).
    #[arg(long)]
    producer_rounds: Option<usize>,
    /// Events through the soak (full mode; default 10M).
    #[arg(long)]
    soak_events: Option<u64>,
    /// Record the relay's metrics into a Prometheus recorder, as `outbox relay --admin-listen`
    /// does (without it they go to the facade's no-op recorder): run once with and once without
    /// to see what the metrics cost.
    #[arg(long)]
    metrics: bool,
    /// Drain rounds per set-up of the `observability` scenario (default 2 quick, 5 full).
    #[arg(long)]
    observe_rounds: Option<usize>,
    /// The brokers of the `broker` scenario (comma-separated: sqs,sns,kafka,nats,rabbitmq,webhook;
    /// default all). A broker that does not answer is skipped with the command that starts it.
    #[arg(long, value_delimiter = ',')]
    brokers: Vec<String>,
    /// Relay workers (and plain batches in flight) of the `broker` scenario (default 1 quick,
    /// 1,4 full).
    #[arg(long, value_delimiter = ',')]
    broker_workers: Vec<usize>,
    /// The AWS emulator (loopback only; `scripts/aws-emulator.sh start`).
    #[arg(
        long,
        env = "OUTBOX_BENCH_AWS_ENDPOINT",
        default_value = "http://127.0.0.1:4566"
    )]
    aws_endpoint: String,
    /// The Kafka-protocol broker (loopback only; `scripts/kafka.sh start`).
    #[arg(long, env = "OUTBOX_BENCH_KAFKA", default_value = "127.0.0.1:19092")]
    kafka_brokers: String,
    /// The NATS server with JetStream (loopback only).
    #[arg(
        long,
        env = "OUTBOX_BENCH_NATS",
        default_value = "nats://127.0.0.1:4222"
    )]
    nats_url: String,
    /// The RabbitMQ server (loopback only).
    #[arg(
        long,
        env = "OUTBOX_BENCH_RABBITMQ",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    rabbitmq_url: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // The log filter can be switched while running, and the relay's spans recorded for
    // OpenTelemetry or not: the `observability` scenario measures both.
    let (log_filter, filter_handle) = tracing_subscriber::reload::Layer::new(
        tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
    );
    let traced = Arc::new(AtomicBool::new(false));
    let spans_exported = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let tracer_provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(observe::Discard(spans_exported.clone()))
        .build();
    let spans = tracing_opentelemetry::layer()
        .with_tracer(tracer_provider.tracer("outbox-bench"))
        .with_filter(
            // Asked on every span (not cached per callsite as `filter_fn` is): the switch moves.
            tracing_subscriber::filter::dynamic_filter_fn({
                let traced = traced.clone();
                move |meta, _| traced.load(Ordering::Relaxed) && meta.target().starts_with("outbox")
            })
            .with_max_level_hint(tracing::Level::DEBUG),
        );
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_filter(log_filter),
        )
        .with(spans)
        .init();
    let set_log_filter: observe::SetLogFilter = Box::new(move |directives: &str| {
        filter_handle
            .reload(tracing_subscriber::EnvFilter::try_new(directives)?)
            .map_err(anyhow::Error::from)
    });
    let args = Args::parse();
    // One recorder for the whole run, on with --metrics; the `observability` scenario switches it.
    let recorder = outbox_admin::prometheus_recorder().map_err(anyhow::Error::msg)?;
    let metrics = recorder.handle();
    let switch = Arc::new(observe::Switch::new(recorder, args.metrics));
    metrics::set_global_recorder(switch.clone())
        .map_err(|_| anyhow::anyhow!("a metrics recorder was installed before the benchmark's"))?;
    outbox::metrics::describe();
    outbox_admin::spawn_upkeep(metrics.clone()).map_err(anyhow::Error::msg)?;
    let controls = observe::Controls {
        metrics: switch,
        set_log_filter,
        traced,
        tracer_provider: tracer_provider.clone(),
        spans_exported,
    };
    let started = Instant::now();
    let db = db::BenchDb::create(&args.database_url).await?;
    let mut report = report::Report::default();
    let outcome = run(&args, &db, &controls, &mut report).await;
    let _ = tracer_provider.shutdown();
    let dropped = db.drop_db().await;
    report.print_results();
    println!(
        "# mode={} total_s={:.1} metrics={}",
        if args.full { "full" } else { "quick" },
        started.elapsed().as_secs_f64(),
        if args.metrics { "prometheus" } else { "off" }
    );
    if args.metrics {
        // Proof that the recorder saw the traffic: the published counter's lines.
        for line in metrics.render().lines() {
            if line.starts_with("outbox_events_published_total") {
                println!("# {line}");
            }
        }
    }
    outcome?;
    dropped?;
    Ok(())
}

async fn run(
    args: &Args,
    db: &db::BenchDb,
    controls: &observe::Controls,
    report: &mut report::Report,
) -> anyhow::Result<()> {
    let wanted = |s: &str| args.only.is_empty() || args.only.iter().any(|o| o == s);
    let full = args.full;
    let server: (String, String, String, String) = sqlx::query_as(
        "SELECT current_setting('server_version'), current_setting('shared_buffers'),
                current_setting('synchronous_commit'), current_setting('max_wal_size')",
    )
    .fetch_one(&db.pool)
    .await?;
    report.note(format!(
        "# outbox-bench {} mode; PostgreSQL {} (shared_buffers {}, synchronous_commit {}, max_wal_size {}); {} CPUs; database {}",
        if full { "full" } else { "quick" },
        server.0,
        server.1,
        server.2,
        server.3,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        db.name
    ));

    if wanted("drain") {
        let cfg = drain::DrainConfig {
            events: args
                .drain_events
                .unwrap_or(if full { 1_000_000 } else { 20_000 }),
            keys: 10_000,
            batch: 100,
            workers: vec![1, 4],
            naive_events: if full { 5_000 } else { 1_000 },
            naive_interval: Duration::from_millis(100),
        };
        drain::run(db, &cfg, report).await?;
    }
    if args.only.iter().any(|o| o == "profile") {
        profile::run(db, args.drain_events.unwrap_or(100_000), report).await?;
    }
    if wanted("latency") {
        let secs = |quick: u64, full_s: u64| Duration::from_secs(if full { full_s } else { quick });
        let cfg = latency::LatencyConfig {
            phases: vec![
                latency::Phase {
                    rate: Some(100),
                    producers: 2,
                    duration: secs(3, 15),
                },
                latency::Phase {
                    rate: Some(1000),
                    producers: 4,
                    duration: secs(4, 20),
                },
                latency::Phase {
                    rate: None,
                    producers: 8,
                    duration: secs(4, 20),
                },
            ],
            keys: 10_000,
        };
        latency::run(db, &cfg, report).await?;
    }
    if wanted("producer") {
        let cfg = producer::ProducerConfig {
            concurrency: if args.producers.is_empty() {
                vec![1, 16]
            } else {
                args.producers.clone()
            },
            duration: args
                .producer_secs
                .and_then(|s| Duration::try_from_secs_f64(s).ok())
                .filter(|d| !d.is_zero())
                .unwrap_or(if full {
                    Duration::from_secs(5)
                } else {
                    Duration::from_millis(1200)
                }),
            rounds: args
                .producer_rounds
                .filter(|r| *r > 0)
                .unwrap_or(if full { 2 } else { 1 }),
            keys: 10_000,
        };
        producer::run(db, &cfg, report).await?;
    }
    if wanted("broker") {
        run_brokers(args, db, report).await?;
    }
    if wanted("observability") {
        let cfg = observe::ObserveConfig {
            events: args
                .drain_events
                .unwrap_or(if full { 200_000 } else { 10_000 }),
            keys: 10_000,
            rounds: args
                .observe_rounds
                .filter(|r| *r > 0)
                .unwrap_or(if full { 5 } else { 2 }),
        };
        // The other scenarios run with the recorder as --metrics asked.
        let outcome = observe::run(db, &cfg, controls, report).await;
        controls.metrics.set(args.metrics);
        outcome?;
    }
    if full && wanted("soak") {
        let cfg = soak::SoakConfig {
            events: args.soak_events.unwrap_or(10_000_000),
            chunk: 200_000,
            keys: 10_000,
            retention: Duration::from_secs(5),
        };
        soak::run(db, &cfg, report).await?;
    }
    Ok(())
}

/// The `broker` scenario: each wanted broker that answers, at each worker count.
async fn run_brokers(
    args: &Args,
    db: &db::BenchDb,
    report: &mut report::Report,
) -> anyhow::Result<()> {
    for name in &args.brokers {
        anyhow::ensure!(
            brokers::ALL.contains(&name.as_str()),
            "--brokers: unknown broker `{name}` (known: {})",
            brokers::ALL.join(", ")
        );
    }
    let workers = if !args.broker_workers.is_empty() {
        args.broker_workers.clone()
    } else if args.full {
        vec![1, 4]
    } else {
        vec![1]
    };
    anyhow::ensure!(
        workers.iter().all(|w| (1..=64).contains(w)),
        "--broker-workers: each count must be 1 to 64"
    );
    for &name in brokers::ALL {
        if !(args.brokers.is_empty() || args.brokers.iter().any(|b| b == name)) {
            continue;
        }
        // (address, default port, how to start it)
        let (address, default_port, start) = match name {
            "sqs" | "sns" => (
                args.aws_endpoint.as_str(),
                80,
                "bash scripts/aws-emulator.sh start",
            ),
            "kafka" => (
                args.kafka_brokers.as_str(),
                9092,
                "bash scripts/kafka.sh start",
            ),
            "nats" => (
                args.nats_url.as_str(),
                4222,
                "bash scripts/test.sh starts it (Debian package nats-server)",
            ),
            "rabbitmq" => (
                args.rabbitmq_url.as_str(),
                5672,
                "bash scripts/test.sh starts it (Debian package rabbitmq-server)",
            ),
            _ => ("127.0.0.1", 0, ""),
        };
        if default_port != 0
            && !brokers::port_open(brokers::loopback_port(address, default_port)?).await
        {
            report.note(format!(
                "\n### broker {name}: SKIPPED, nothing answers at {address} (start it: {start})"
            ));
            report.result("broker", format!("destination={name} skipped=unreachable"));
            continue;
        }
        // The emulator slows down as a queue grows: small chunks there.
        let chunk = if matches!(name, "sqs" | "sns") {
            100
        } else {
            1000
        };
        for &w in &workers {
            let target = match name {
                "sqs" => brokers::sqs::target(address).await?,
                "sns" => brokers::sns::target(address).await?,
                "kafka" => brokers::kafka::target(address).await?,
                "nats" => brokers::nats::target(address).await?,
                "rabbitmq" => brokers::rabbitmq::target(address).await?,
                _ => brokers::webhook::target().await?,
            };
            let sizes = brokers::Sizes {
                chunks: if args.full { 10 } else { 3 },
                chunk: chunk * w,
                batch: 100,
                workers: w,
            };
            brokers::compare(db, target, sizes, report).await?;
        }
    }
    Ok(())
}
