//! `outbox`: migrate the schema, run the relay, inspect the backlog and the dead letters.
//!
//! Configuration comes from `outbox.toml` (or `--config` / `OUTBOX_CONFIG`), the profile from
//! `--profile` / `OUTBOX_PROFILE`, overrides from `OUTBOX_*` and `DATABASE_URL`. Logs go to standard
//! error (standard output is the `stdout` publisher's and the commands' results): `OUTBOX_LOG` (or
//! `RUST_LOG`) filters them, `OUTBOX_LOG_FORMAT=json` writes JSON lines (see `outbox::logging`).
//!
//! Exit codes: 0 success, 1 runtime failure (or a drain that left work), 2 bad configuration or
//! usage; 128 + N after a second signal N.

mod dead;
mod out;
mod relay_cmd;
mod signals;
mod status_cmd;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use outbox::config::{Config, ConfigSource, PublisherSpec};
use outbox::logging::{self, LogFormat, LogOptions};
use outbox::postgres::{self, MigrateError, MigrateOptions};
use outbox::Publisher;

use crate::dead::DeadAction;
use crate::out::{out, BrokenPipe};

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
    ///
    /// On SIGINT/SIGTERM the batch in flight is published and settled, then the relay exits; a
    /// second signal exits at once (code 128 + signal). Exit codes: 0 stopped (or, with --drain,
    /// drained); 1 failed, or with --drain left events retrying or dead (or was interrupted with
    /// events pending); 2 bad configuration or usage.
    Relay {
        /// stdout, file:PATH, null or aws [default: the configured publisher]
        #[arg(long)]
        publisher: Option<PublisherSpec>,
        /// Publish until no deliverable event is left, then exit: 0 when nothing is left retrying
        /// or dead, 1 otherwise (what was left is printed).
        #[arg(long)]
        drain: bool,
        /// Log a summary line this often while running (published, retried, dead since the last
        /// line, and the backlog), only when something changed; 0 turns it off.
        #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = relay_cmd::parse_summary_interval)]
        summary_interval: Duration,
        /// Serve metrics, health checks, the admin API and the web console on ADDR (e.g.
        /// 127.0.0.1:9187) [default: admin.listen; none]. Loopback only unless
        /// admin.allow_remote = true.
        #[arg(long, value_name = "ADDR")]
        admin_listen: Option<std::net::SocketAddr>,
    },
    /// Show the backlog: pending, retrying, dead, oldest pending age, blocked keys.
    Status {
        /// One JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// Refresh every second with the rate events leave the backlog; Ctrl-C exits.
        #[arg(long, conflicts_with = "json")]
        watch: bool,
    },
    /// Inspect, replay or delete dead-lettered events.
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

#[cfg(feature = "aws")]
#[derive(Subcommand, Debug)]
enum AwsAction {
    /// Create the configured queues, bus, rules, bucket and tables (local profile only).
    Bootstrap,
}

/// A failure that is the user's to fix before anything runs: exit code 2.
#[derive(Debug)]
pub(crate) struct UsageError(anyhow::Error);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.0)
    }
}
impl std::error::Error for UsageError {}

/// How long the runtime may take to stop after the command finished. A publisher write blocked
/// on a reader that never reads (tokio writes standard output and files on blocking threads) would
/// otherwise keep the process alive forever after the relay stopped.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// The log format, for the lines printed outside the subscriber (the final error).
static LOG_FORMAT: OnceLock<LogFormat> = OnceLock::new();

fn main() -> ExitCode {
    out::quiet_broken_pipe_panics();
    let cli = Cli::parse();
    let format = match logging::init(LogOptions {
        default_filter: "info,sqlx=warn",
        timestamps: true,
    }) {
        Ok(format) => format,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let _ = LOG_FORMAT.set(format);
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
    let result = runtime.block_on(run(cli));
    runtime.shutdown_timeout(SHUTDOWN_GRACE);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<BrokenPipe>().is_some() => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}", logging::error_line(format, &format!("{e:#}")));
            if e.downcast_ref::<UsageError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
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

pub(crate) async fn connect(config: &Config, name: &str) -> Result<sqlx::PgPool> {
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
        Command::Relay {
            publisher,
            drain,
            summary_interval,
            admin_listen,
        } => {
            let spec = publisher.unwrap_or_else(|| config.publisher.clone());
            relay_cmd::RelayCommand {
                config: &config,
                spec: &spec,
                drain,
                summary_every: summary_interval,
                admin_listen: admin_listen.or(config.admin.listen),
                log_format: LOG_FORMAT.get().copied().unwrap_or_default(),
            }
            .run()
            .await
        }
        Command::Status { json, watch: false } => status(&config, json).await,
        Command::Status { watch: true, .. } => status_cmd::watch(&config).await,
        Command::Dead { action } => dead::run(&config, action).await,
        Command::Config => unreachable!("`config` returns before the configuration is loaded"),
        #[cfg(feature = "aws")]
        Command::Aws {
            action: AwsAction::Bootstrap,
        } => {
            let report = outbox_aws::bootstrap(&config)
                .await
                .map_err(|e| UsageError(e.into()))?;
            for name in &report.created {
                out(format!("created  {name}"))?;
            }
            for name in &report.existing {
                out(format!("exists   {name}"))?;
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

pub(crate) async fn build_publisher(
    config: &Config,
    spec: &PublisherSpec,
) -> Result<Box<dyn Publisher>> {
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
        println!("  retrying (backoff)        {}", status.retrying);
        println!("  held for a destination    {}", status.held);
        for (destination, n) in &status.held_by_destination {
            println!("    {destination:<23} {n}");
        }
        println!("  behind an earlier event   {}", status.blocked);
        if let Some(key) = &status.oldest_blocked_key {
            println!("    oldest blocked key      {key}");
        }
        println!("  keys blocked              {}", status.keys_blocked);
        for key in &status.blocked_keys {
            println!("    {key}");
        }
        if status.keys_blocked > status.blocked_keys.len() as i64 {
            println!(
                "    ... and {} more",
                status.keys_blocked - status.blocked_keys.len() as i64
            );
        }
        println!("dead                        {}", status.dead);
        for (destination, n) in &status.dead_by_destination {
            println!("    {destination:<23} {n}");
        }
        println!("published (retained)        {}", status.published_retained);
        println!(
            "oldest pending age          {:.1}s",
            status.oldest_pending_age_seconds
        );
    }
    Ok(())
}
