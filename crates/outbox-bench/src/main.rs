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
//! - `broker`: relay to the SQS emulator vs a plain SDK `SendMessageBatch` loop.
//! - `soak`: many events with retention; table/index size, dead tuples, RSS.
//! - `profile` (`--only profile`): claim vs settle time of one worker.
//! - `sys`: CPU time and RSS of this process; `report`: tables and RESULT lines.

mod broker;
mod db;
mod drain;
mod kafka;
mod latency;
mod producer;
mod profile;
mod report;
mod soak;
mod sys;

use std::time::{Duration, Instant};

use clap::Parser;

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
    /// Only these scenarios (comma-separated: drain,latency,producer,broker,kafka,soak).
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
    /// The AWS emulator (loopback only).
    #[arg(
        long,
        env = "OUTBOX_BENCH_AWS_ENDPOINT",
        default_value = "http://127.0.0.1:4566"
    )]
    aws_endpoint: String,
    /// Record the relay's metrics into a Prometheus recorder, as `outbox relay --admin-listen`
    /// does (without it they go to the facade's no-op recorder): run once with and once without
    /// to see what the metrics cost.
    #[arg(long)]
    metrics: bool,
    /// The Kafka-protocol broker (loopback only; `scripts/kafka.sh start`).
    #[arg(long, env = "OUTBOX_BENCH_KAFKA", default_value = "127.0.0.1:19092")]
    kafka_brokers: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let args = Args::parse();
    let metrics = if args.metrics {
        Some(outbox_admin::prometheus()?)
    } else {
        None
    };
    let started = Instant::now();
    let db = db::BenchDb::create(&args.database_url).await?;
    let mut report = report::Report::default();
    let outcome = run(&args, &db, &mut report).await;
    let dropped = db.drop_db().await;
    report.print_results();
    println!(
        "# mode={} total_s={:.1} metrics={}",
        if args.full { "full" } else { "quick" },
        started.elapsed().as_secs_f64(),
        if metrics.is_some() {
            "prometheus"
        } else {
            "off"
        }
    );
    if let Some(handle) = metrics {
        // Proof that the recorder saw the traffic: the published counter's lines.
        for line in handle.render().lines() {
            if line.starts_with("outbox_events_published_total") {
                println!("# {line}");
            }
        }
    }
    outcome?;
    dropped?;
    Ok(())
}

async fn run(args: &Args, db: &db::BenchDb, report: &mut report::Report) -> anyhow::Result<()> {
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
        if broker::reachable(&args.aws_endpoint).await? {
            let cfg = broker::BrokerConfig {
                endpoint: args.aws_endpoint.clone(),
                chunks: if full { 20 } else { 3 },
                chunk: 100,
            };
            broker::run(db, &cfg, report).await?;
        } else {
            report.note(format!(
                "\n### broker: SKIPPED, no AWS emulator answers at {} (run `bash scripts/aws-emulator.sh start`)",
                args.aws_endpoint
            ));
            report.result("broker", "skipped=emulator_unreachable");
        }
    }
    if wanted("kafka") {
        if kafka::reachable(&args.kafka_brokers).await? {
            let cfg = kafka::KafkaConfig {
                brokers: args.kafka_brokers.clone(),
                chunks: if full { 20 } else { 3 },
                chunk: 100,
            };
            kafka::run(db, &cfg, report).await?;
        } else {
            report.note(format!(
                "\n### kafka: SKIPPED, no Kafka broker answers at {} (run `bash scripts/kafka.sh start`)",
                args.kafka_brokers
            ));
            report.result("kafka", "skipped=broker_unreachable");
        }
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
