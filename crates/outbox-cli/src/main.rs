//! `outbox`: migrate the schema, run the relay, inspect the backlog and the dead letters.
//!
//! Configuration comes from `outbox.toml` (or `--config` / `OUTBOX_CONFIG`), the profile from
//! `--profile` / `OUTBOX_PROFILE`, overrides from `OUTBOX_*` and `DATABASE_URL`. Logs go to standard
//! error (standard output is the `stdout` publisher's); `OUTBOX_LOG` or `RUST_LOG` filter them.
//!
//! Exit codes: 0 success, 1 runtime failure, 2 bad configuration or usage.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use outbox::config::{Config, ConfigSource, PublisherSpec};
use outbox::postgres::{self, MigrateError, MigrateOptions};
use outbox::Publisher;

mod config_cmd;

#[derive(Parser, Debug)]
#[command(
    name = "outbox",
    version,
    about = "Transactional outbox for PostgreSQL: migrate, relay, inspect"
)]
struct Cli {
    /// Configuration file [default: outbox.toml when it exists]
    #[arg(long, global = true, env = "OUTBOX_CONFIG")]
    config: Option<PathBuf>,
    /// Profile: local, dev or prod [default: local]
    #[arg(long, global = true, env = "OUTBOX_PROFILE")]
    profile: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create or upgrade the outbox schema in the configured database.
    Migrate {
        /// Print the SQL instead of running it (for psql or your own migration tool).
        #[arg(long)]
        print: bool,
        /// With --print: only the migrations from version N on, for a schema at the version before.
        #[arg(long, value_name = "N", requires = "print")]
        from: Option<i32>,
    },
    /// Publish events until SIGINT/SIGTERM (or, with --drain, until none is deliverable).
    Relay {
        /// stdout, file:PATH, null or aws [default: the configured publisher]
        #[arg(long)]
        publisher: Option<PublisherSpec>,
        /// Publish until no deliverable event is left, then exit.
        #[arg(long)]
        drain: bool,
    },
    /// Show the backlog: pending, retrying, dead, oldest pending age.
    Status {
        /// One JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Inspect or replay dead-lettered events.
    Dead {
        #[command(subcommand)]
        action: DeadAction,
    },
    /// Print the resolved configuration (secrets redacted) after validating it.
    Config,
    /// Local AWS resources (queues, bus, rules, bucket, tables) for the `local` profile.
    #[cfg(feature = "aws")]
    Aws {
        #[command(subcommand)]
        action: AwsAction,
    },
}

#[derive(Subcommand, Debug)]
enum DeadAction {
    /// List dead events, oldest first.
    List {
        #[arg(long, default_value_t = 50)]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
    /// Make dead events pending again with a fresh attempt budget.
    Replay {
        /// Event ids to replay.
        #[arg(long = "id", required_unless_present = "all")]
        ids: Vec<uuid::Uuid>,
        /// Replay every dead event.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
    },
}

#[cfg(feature = "aws")]
#[derive(Subcommand, Debug)]
enum AwsAction {
    /// Create the configured queues, bus, rules, bucket and tables (local profile only).
    Bootstrap,
}

/// A failure that is the user's to fix before anything runs: exit code 2.
#[derive(Debug)]
struct UsageError(anyhow::Error);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.0)
    }
}
impl std::error::Error for UsageError {}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
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
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.downcast_ref::<UsageError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("OUTBOX_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .or_else(|| EnvFilter::try_from_default_env().ok())
        .unwrap_or_else(|| EnvFilter::new("info,sqlx=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn config_source(cli: &Cli) -> ConfigSource {
    let mut source = ConfigSource::from_env();
    if cli.config.is_some() {
        source.file = cli.config.clone();
    }
    if cli.profile.is_some() {
        source.profile = cli.profile.clone();
    }
    source
}

fn load_config(cli: &Cli) -> Result<Config> {
    Config::load(&config_source(cli)).map_err(|e| UsageError(e.into()).into())
}

async fn connect(config: &Config, name: &str) -> Result<sqlx::PgPool> {
    outbox::connect_from_config(config, name)
        .await
        .map_err(|e| match e {
            outbox::ConfigOrConnectError::Config(e) => UsageError(e.into()).into(),
            e => anyhow::Error::new(e),
        })
}

async fn run(cli: Cli) -> Result<()> {
    if let Command::Config = cli.command {
        // Validates on its own, so that it reports every problem (the AWS sections' too) at once.
        return config_cmd::run(&config_source(&cli));
    }
    let config = load_config(&cli)?;
    match cli.command {
        Command::Migrate { print, from } => migrate(&config, print, from).await,
        Command::Relay { publisher, drain } => {
            let spec = publisher.unwrap_or_else(|| config.publisher.clone());
            relay(&config, &spec, drain).await
        }
        Command::Status { json } => status(&config, json).await,
        Command::Dead { action } => dead(&config, action).await,
        Command::Config => unreachable!("`config` returns before the configuration is loaded"),
        #[cfg(feature = "aws")]
        Command::Aws {
            action: AwsAction::Bootstrap,
        } => {
            let report = outbox_aws::bootstrap(&config)
                .await
                .map_err(|e| UsageError(e.into()))?;
            for name in &report.created {
                println!("created  {name}");
            }
            for name in &report.existing {
                println!("exists   {name}");
            }
            Ok(())
        }
    }
}

async fn migrate(config: &Config, print: bool, from: Option<i32>) -> Result<()> {
    let options = MigrateOptions::from(config);
    if print {
        let sql = postgres::migration_sql(&config.schema, &options, from.unwrap_or(1))
            .map_err(|e| UsageError(e.into()))?;
        return config_cmd::write_stdout(&sql);
    }
    let pool = connect(config, "outbox-migrate").await?;
    let mut conn = pool.acquire().await?;
    let report = postgres::migrate(&mut conn, &config.schema, options)
        .await
        .map_err(|e| match e {
            // The user's to fix (upgrade outbox, choose a schema): like a configuration error.
            e @ (MigrateError::Newer { .. } | MigrateError::ForeignTable { .. }) => {
                UsageError(e.into()).into()
            }
            e => anyhow::Error::new(e),
        })
        .with_context(|| format!("migrating the outbox schema `{}`", config.schema))?;
    if report.is_unchanged() {
        eprintln!(
            "outbox schema `{}` is up to date (version {})",
            config.schema, report.current_version
        );
    }
    if !report.applied.is_empty() {
        eprintln!(
            "outbox schema `{}` migrated to version {} (applied {:?})",
            config.schema, report.current_version, report.applied
        );
    }
    // A setting flipped by whichever process migrates last must not pass unnoticed.
    for change in &report.changed {
        eprintln!("outbox schema `{}`: {change}", config.schema);
    }
    Ok(())
}

async fn build_publisher(config: &Config, spec: &PublisherSpec) -> Result<Box<dyn Publisher>> {
    if let Some(publisher) = outbox::publisher::builtin(spec)
        .await
        .map_err(|e| UsageError(anyhow::anyhow!("{}", e.reason())))?
    {
        return Ok(publisher);
    }
    #[cfg(feature = "aws")]
    {
        let publisher = outbox_aws::publisher_from_config(config)
            .await
            .map_err(|e| UsageError(e.into()))?;
        Ok(Box::new(publisher))
    }
    #[cfg(not(feature = "aws"))]
    {
        let _ = config;
        Err(UsageError(anyhow::anyhow!(
            "publisher `aws` needs the `aws` feature: rebuild with `cargo build -p outbox-cli --features aws`"
        ))
        .into())
    }
}

async fn relay(config: &Config, spec: &PublisherSpec, drain: bool) -> Result<()> {
    let publisher = build_publisher(config, spec).await?;
    let pool = connect(config, "outbox-relay").await?;
    let relay = outbox::relay_from_config(config, pool, publisher)
        .await
        .map_err(|e| UsageError(e.into()))?;
    let check = |e: outbox::relay::RelayError| match e {
        outbox::relay::RelayError::PublisherCheck(_) => UsageError(e.into()).into(),
        e => anyhow::Error::new(e),
    };
    if drain {
        let report = relay.drain().await.map_err(check)?;
        eprintln!(
            "drained: {} published, {} retrying, {} dead in {} batches",
            report.published, report.retried, report.dead, report.batches
        );
        return Ok(());
    }
    relay.run(shutdown_signal()).await.map_err(check)?;
    Ok(())
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT received"),
        _ = term => tracing::info!("SIGTERM received"),
    }
}

async fn status(config: &Config, json: bool) -> Result<()> {
    let pool = connect(config, "outbox-status").await?;
    postgres::check_schema(&pool, &config.schema)
        .await
        .map_err(|e| UsageError(e.into()))?;
    let status = postgres::status(&pool, &config.schema).await?;
    if json {
        println!("{}", serde_json::to_string(&status)?);
    } else {
        println!("pending                     {}", status.pending);
        println!("  of which retrying         {}", status.retrying);
        println!("dead                        {}", status.dead);
        println!("published (retained)        {}", status.published_retained);
        println!(
            "oldest pending age          {:.1}s",
            status.oldest_pending_age_seconds
        );
    }
    Ok(())
}

async fn dead(config: &Config, action: DeadAction) -> Result<()> {
    let pool = connect(config, "outbox-dead").await?;
    postgres::check_schema(&pool, &config.schema)
        .await
        .map_err(|e| UsageError(e.into()))?;
    match action {
        DeadAction::List { limit, json } => {
            let events = postgres::dead_events(&pool, &config.schema, limit).await?;
            if json {
                println!("{}", serde_json::to_string(&events)?);
            } else if events.is_empty() {
                println!("no dead events");
            } else {
                for e in events {
                    println!(
                        "{} seq={} {}/{} {} attempts={} error={}",
                        e.id,
                        e.seq,
                        e.aggregate_type,
                        e.aggregate_id,
                        e.event_type,
                        e.attempts,
                        e.last_error.as_deref().unwrap_or("-")
                    );
                }
            }
        }
        DeadAction::Replay { ids, all } => {
            let ids = (!all).then_some(ids.as_slice());
            let n = postgres::replay_dead(&pool, &config.schema, ids).await?;
            println!("replayed {n} dead events");
        }
    }
    Ok(())
}
