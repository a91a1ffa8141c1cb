//! `outbox-demo`: the parts of the end-to-end demo, each a long-running process or a one-shot.
//!
//! - `outbox-demo orders`: the orders service, relay embedded (unless `relay.enabled = false`).
//! - `outbox-demo shipping`: the shipping consumer, one line per applied event.
//! - `outbox-demo drive`: a stream of orders over HTTP, then the summary (exit 1 if not all OK).
//! - `outbox-demo bootstrap`: creates the configured broker's topic / stream / exchange and queue
//!   (or, for SQS, what `outbox aws bootstrap` creates); local profile and tests.
//!
//! Configuration: the demo's `outbox.toml` (or `--config` / `OUTBOX_CONFIG`; the other brokers'
//! are `outbox.kafka.toml`, `outbox.nats.toml`, `outbox.rabbitmq.toml`), profile from
//! `OUTBOX_PROFILE`. The broker is the kind of the `orders` destination. Logs go to standard error (`OUTBOX_LOG` / `RUST_LOG`, default `warn`;
//! `OUTBOX_LOG_FORMAT=json`), set up by `outbox::logging` as in the CLI.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use outbox_consumer::{ConsumerOptions, DynamoOptions};
use outbox_demo::broker::{self, Broker, Source};
use outbox_demo::{driver, orders, settings, shipping};

#[derive(Parser, Debug)]
#[command(
    name = "outbox-demo",
    about = "The outbox end-to-end demo: orders -> relay -> SQS, Kafka, NATS or RabbitMQ -> shipping"
)]
struct Cli {
    /// Configuration file [default: OUTBOX_CONFIG, ./outbox.toml, or the demo's outbox.toml]
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the orders API (with the embedded relay unless relay.enabled = false).
    Orders {
        #[arg(long, env = "DEMO_LISTEN", default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
    },
    /// Create what the configured broker needs (topic, stream, exchange + queue; AWS resources).
    Bootstrap,
    /// Consume order events into shipping's database.
    Shipping {
        /// The broker to read: must be the kind of destinations.orders in the configuration
        /// [default: that kind].
        #[arg(long, value_enum)]
        broker: Option<Broker>,
        #[arg(
            long,
            env = "SHIPPING_DATABASE_URL",
            default_value = "postgres://postgres@127.0.0.1:5432/outbox_demo_shipping"
        )]
        database_url: String,
        /// SQS only: the inbox, or a DynamoDB table (the other brokers use the inbox).
        #[arg(long, value_enum, default_value_t = Store::Inbox)]
        idempotency: Store,
        /// DynamoDB table for `--idempotency dynamodb`.
        #[arg(long, default_value = "demo-shipping-idempotency")]
        dynamodb_table: String,
        /// SQS only.
        #[arg(long, default_value_t = 10)]
        max_in_flight: usize,
        /// SQS only, seconds.
        #[arg(long, default_value_t = 30)]
        visibility_timeout: u64,
        /// Long-poll wait in seconds (0 to 20): SQS's receive, a JetStream pull. A stop lets a
        /// poll in progress answer.
        #[arg(long, default_value_t = 10)]
        wait: u64,
    },
    /// Send a stream of orders to the orders service, wait for shipping, print the summary.
    Drive {
        #[arg(long, env = "DEMO_PRODUCER", default_value = "http://127.0.0.1:8080")]
        producer: String,
        #[arg(long, default_value_t = 12)]
        orders: usize,
        #[arg(
            long,
            env = "SHIPPING_DATABASE_URL",
            default_value = "postgres://postgres@127.0.0.1:5432/outbox_demo_shipping"
        )]
        shipping_database_url: String,
        /// Seconds to wait for every event to be consumed.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Store {
    Inbox,
    Dynamodb,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The CLI's variables (OUTBOX_LOG, OUTBOX_LOG_FORMAT, NO_COLOR), quieter by default.
    if let Err(e) = outbox::logging::init(outbox::logging::LogOptions {
        default_filter: "warn",
        timestamps: true,
    }) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let config = settings::load(cli.config.clone())?;
    match cli.command {
        Command::Orders { listen } => {
            let service = orders::Service::start(&config, listen).await?;
            eprintln!(
                "orders service on http://{} (profile {}, relay {})",
                service.addr,
                config.profile,
                if config.relay.enabled {
                    "embedded"
                } else {
                    "off: run `outbox relay`"
                }
            );
            let stats = service.run_until(shutdown_signal()).await?;
            if let Some(s) = stats {
                eprintln!(
                    "orders service stopped; embedded relay published {} events",
                    s.published
                );
            }
        }
        Command::Bootstrap => {
            let broker = Broker::of(&config)?;
            for line in broker::bootstrap(&config).await? {
                println!("{line}");
            }
            eprintln!("{broker} resources ready (profile {})", config.profile);
        }
        Command::Shipping {
            broker,
            database_url,
            idempotency,
            dynamodb_table,
            max_in_flight,
            visibility_timeout,
            wait,
        } => {
            let configured = Broker::of(&config)?;
            if let Some(broker) = broker {
                anyhow::ensure!(
                    broker == configured,
                    "shipping --broker {broker}, but destinations.{} of the configuration is of kind \
                     {configured}: use the broker's configuration (OUTBOX_CONFIG=crates/outbox-demo/outbox.{broker}.toml; \
                     outbox.toml for sqs)",
                    settings::ORDERS_DESTINATION
                );
            }
            if let Some(source) = Source::of(&config)? {
                let pool = shipping_pool(&database_url, 4).await?;
                let what = source.describe();
                let service =
                    shipping::start_broker(source, pool, Duration::from_secs(wait), true).await?;
                eprintln!("shipping consumer reading {what} (inbox idempotency)");
                let report = service.run_until(shutdown_signal()).await?;
                eprintln!(
                    "shipping stopped: {} received, {} applied, {} duplicates skipped, {} failed",
                    report.received, report.processed, report.duplicates, report.failed
                );
                return Ok(ExitCode::SUCCESS);
            }
            let aws = outbox_aws::AwsSettings::from_config(&config)?;
            let clients = outbox_aws::AwsClients::new(&aws).await?;
            let queue = settings::orders_queue(&config)?;
            let url = outbox_consumer::Consumer::queue_url(&clients.sqs, &queue).await?;
            let pool = shipping_pool(&database_url, max_in_flight as u32 + 2).await?;
            let mut options = ConsumerOptions::new(url);
            options.max_in_flight = max_in_flight;
            options.visibility_timeout = Duration::from_secs(visibility_timeout);
            options.extend_every = Duration::from_secs((visibility_timeout / 3).max(1));
            options.wait_time = Duration::from_secs(wait);
            let store = match idempotency {
                Store::Inbox => shipping::Idempotency::Inbox,
                Store::Dynamodb => shipping::Idempotency::DynamoDb(DynamoOptions::new(
                    dynamodb_table,
                    shipping::CONSUMER,
                )),
            };
            let service = shipping::start(&clients, pool, options, store, true).await?;
            eprintln!("shipping consumer reading {queue} ({idempotency:?} idempotency)");
            let report = service.run_until(shutdown_signal()).await?;
            eprintln!(
                "shipping stopped: {} received, {} applied, {} duplicates skipped, {} failed",
                report.received, report.processed, report.duplicates, report.failed
            );
        }
        Command::Drive {
            producer,
            orders,
            shipping_database_url,
            timeout,
        } => {
            let api = driver::Api::new(&producer);
            api.wait_ready(Duration::from_secs(30)).await?;
            let outbox_pool = outbox::connect_from_config(&config, "demo-driver").await?;
            let shipping_pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(2)
                .connect(&shipping_database_url)
                .await
                .context("connecting to shipping's database")?;
            shipping::migrate(&shipping_pool).await?;
            let mut sent = driver::send_orders(&api, orders, false).await?;
            driver::send_undeliverable_order(
                &api,
                &mut sent,
                config.events.max_payload_bytes,
                false,
            )
            .await?;
            let table = config.schema.qualify("outbox_event");
            let summary = driver::settle(
                &outbox_pool,
                &table,
                &shipping_pool,
                sent,
                Duration::from_secs(timeout),
            )
            .await?;
            // Let the consumer's last lines reach the terminal before the summary.
            tokio::time::sleep(Duration::from_millis(200)).await;
            println!("{}", summary.render());
            return Ok(if summary.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn shipping_pool(url: &str, connections: u32) -> anyhow::Result<sqlx::PgPool> {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect(url)
        .await
        .with_context(|| {
            format!(
                "connecting to shipping's database {}",
                outbox::config::redact_url(url)
            )
        })
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
