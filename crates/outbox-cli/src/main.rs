//! `outbox`: migrate the schema, run the relay, inspect the backlog and the dead letters.
//!
//! Configuration comes from `outbox.toml` (or `--config` / `OUTBOX_CONFIG`), the profile from
//! `--profile` / `OUTBOX_PROFILE`, overrides from `OUTBOX_*` and `DATABASE_URL`, and the database
//! from `--database-url` over all of them. Logs go to standard
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
mod telemetry;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use outbox::config::{Config, ConfigError, ConfigSource, DatabaseUrl, Problems, PublisherSpec};
use outbox::logging::{self, LogFormat, LogSettings};
use outbox::postgres::{self, MigrateError, MigrateOptions};
use outbox::Publisher;

use crate::dead::DeadAction;
use crate::out::BrokenPipe;

mod config_cmd;
mod docs_cmd;

/// What `outbox --help` (and the man page) says after the options: the variables and exit codes
/// that scripts and service managers depend on.
const AFTER_HELP: &str = "\
Environment:
  DATABASE_URL             the database: postgres://user:password@host:port/db or the libpq
                           key/value form (--database-url wins over it)
  OUTBOX_CONFIG            the configuration file (as --config)
  OUTBOX_PROFILE           the profile (as --profile)
  OUTBOX_<SECTION>__<KEY>  any configuration key, e.g. OUTBOX_RELAY__BATCH_SIZE=500
  OUTBOX_LOG               log filter (else RUST_LOG), e.g. info,sqlx=warn (the default) or debug
  OUTBOX_LOG_FORMAT        text (the default) or json: one JSON object per line
  NO_COLOR                 no colours in logs and messages

Exit codes:
  0      success
  1      runtime failure (e.g. the database is unreachable); for relay --drain also events left
         retrying, held for a destination, blocked or dead
  2      bad configuration or usage
  128+N  a second signal N during shutdown (130 for SIGINT, 143 for SIGTERM)";

#[derive(Parser, Debug)]
#[command(
    name = "outbox",
    version,
    about = "Transactional outbox for PostgreSQL: migrate, relay, inspect",
    after_help = AFTER_HELP
)]
struct Cli {
    /// Configuration file [default: outbox.toml when it exists]
    #[arg(long, global = true, env = "OUTBOX_CONFIG")]
    config: Option<PathBuf>,
    /// Profile: local, dev or prod [default: local]
    #[arg(long, global = true, env = "OUTBOX_PROFILE")]
    profile: Option<String>,
    /// PostgreSQL connection string; wins over DATABASE_URL, OUTBOX_DATABASE__URL and the file's
    /// database.url. A command line is visible to other local users (ps): pass a password in
    /// DATABASE_URL instead.
    // Not `env = "DATABASE_URL"`: the configuration reads that variable itself, below
    // OUTBOX_DATABASE__URL, and the flag must not change that order.
    #[arg(long, global = true, value_name = "URL")]
    database_url: Option<String>,
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
        /// stdout, file:PATH, null or destinations [default: the configured publisher]
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
    /// Publish an existing (e.g. Debezium-layout) outbox table's events; its producers stay as is.
    ///
    /// Installs an AFTER INSERT trigger on the table that copies each row into outbox_event, in the
    /// producer's transaction and in insert order; rows inserted before are not copied. The column options default to Debezium's
    /// outbox layout. Run `outbox migrate` first.
    Adopt {
        /// The existing table: TABLE or SCHEMA.TABLE (as written, case-sensitive; default schema
        /// public).
        table: String,
        /// The event id column (uuid, or text holding UUIDs).
        #[arg(long, value_name = "COLUMN", default_value = "id")]
        id: String,
        /// The aggregate type column (first part of the ordering key).
        #[arg(long, value_name = "COLUMN", default_value = "aggregatetype")]
        aggregate_type: String,
        /// The aggregate id column (second part of the ordering key).
        #[arg(long, value_name = "COLUMN", default_value = "aggregateid")]
        aggregate_id: String,
        /// The event type column.
        #[arg(long, value_name = "COLUMN", default_value = "type")]
        event_type: String,
        /// The payload column (jsonb, json or text holding JSON objects).
        #[arg(long, value_name = "COLUMN", default_value = "payload")]
        payload: String,
        /// Optional headers column (jsonb, json or text: an object of strings).
        #[arg(long, value_name = "COLUMN")]
        headers: Option<String>,
        /// Optional column of when the event happened (timestamptz or timestamp).
        #[arg(long, value_name = "COLUMN")]
        timestamp: Option<String>,
        /// Print the SQL instead of running it (the table and columns are still checked).
        #[arg(long, conflicts_with = "remove")]
        print: bool,
        /// Remove the trigger: rows inserted from now on are no longer copied.
        #[arg(long)]
        remove: bool,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    ///
    /// E.g. `outbox completions bash > ~/.local/share/bash-completion/completions/outbox`. bash: source it or put it in a bash-completion directory; zsh: save it as `_outbox` in a
    /// directory of $fpath; fish: save it as ~/.config/fish/completions/outbox.fish.
    Completions {
        /// The shell to complete in.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff).
    ///
    /// E.g. `outbox man > ~/.local/share/man/man1/outbox.1`, or read it at once: `outbox man | man -l -`.
    Man,
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
pub(crate) static LOG_FORMAT: OnceLock<LogFormat> = OnceLock::new();

fn main() -> ExitCode {
    out::quiet_broken_pipe_panics();
    let cli = Cli::parse();
    // Read first, so that a bad variable fails before anything else.
    let settings = match LogSettings::from_env("info,sqlx=warn") {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let format = settings.format;
    let _ = LOG_FORMAT.set(format);
    // The trace exporter is configured in the file, so the subscriber is installed once the
    // configuration is read, with the exporter's layer when there is one. Nothing logs before.
    let prepared = prepare(&cli);
    let exporter = match &prepared {
        Ok(Prepared {
            telemetry: Some(t), ..
        }) => Some(t.layer()),
        _ => None,
    };
    if let Err(e) = logging::install(&settings, true, exporter) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let result = prepared.and_then(|prepared| execute(cli, prepared));
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

/// What a command needs before it runs: the configuration (none for the commands that read it
/// themselves or not at all) and, for `relay`, the trace exporter that `[telemetry]` configures.
struct Prepared {
    config: Option<Config>,
    telemetry: Option<telemetry::Telemetry>,
}

fn prepare(cli: &Cli) -> Result<Prepared> {
    let config = match &cli.command {
        Command::Config | Command::Completions { .. } | Command::Man => None,
        _ => Some(load_config(cli)?),
    };
    let telemetry = match (&cli.command, &config) {
        (Command::Relay { .. }, Some(config)) => telemetry::Telemetry::from_config(config)?,
        _ => None,
    };
    Ok(Prepared { config, telemetry })
}

/// Runs the command on the async runtime; then, the runtime gone, exports the last spans.
fn execute(cli: Cli, prepared: Prepared) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let result = runtime.block_on(run(cli, prepared.config));
    runtime.shutdown_timeout(SHUTDOWN_GRACE);
    if let Some(telemetry) = prepared.telemetry {
        telemetry.shutdown();
    }
    result
}

/// The configuration and every problem with it, `--database-url` applied over every other source
/// of `database.url`. The override is applied here rather than in [`ConfigSource`], whose fields
/// every caller of the library spells out.
pub(crate) fn load_with_problems(
    source: &ConfigSource,
    database_url: Option<&str>,
) -> Result<(Config, Vec<ConfigError>), ConfigError> {
    let (mut config, problems) = Config::load_with_problems(source)?;
    let mut problems = problems.into_vec();
    if let Some(url) = database_url {
        config.database.url = DatabaseUrl::new(url);
        // The URL the flag replaced is not used, so its problems are not reported; the flag's
        // own are, naming the flag as their origin.
        problems.retain(|p| !is_database_url_problem(p));
        for mut problem in config.problems().into_vec() {
            if is_database_url_problem(&problem) {
                if let ConfigError::Value { origin, .. } = &mut problem {
                    *origin = Some("--database-url".to_owned());
                }
                problems.push(problem);
            }
        }
    }
    Ok((config, problems))
}

fn is_database_url_problem(problem: &ConfigError) -> bool {
    matches!(problem, ConfigError::Value { key, .. } if key.starts_with("database.url"))
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

/// Loads the configuration and validates all of it, the linked publisher kinds' sections too,
/// reporting every problem at once.
fn load_config(cli: &Cli) -> Result<Config> {
    let (config, problems) = load_with_problems(&config_source(cli), cli.database_url.as_deref())
        .map_err(|e| UsageError(e.into()))?;
    let mut all = Problems::default();
    for problem in problems {
        all.push(problem);
    }
    for problem in registry()
        .problems(&config)
        .into_vec()
        .into_iter()
        .chain(telemetry::problems(&config))
    {
        all.push(problem);
    }
    all.into_result().map_err(|e| UsageError(e.into()))?;
    Ok(config)
}

pub(crate) async fn connect(config: &Config, name: &str) -> Result<sqlx::PgPool> {
    outbox::connect_from_config(config, name)
        .await
        .map_err(|e| match e {
            outbox::ConfigOrConnectError::Config(e) => UsageError(e.into()).into(),
            e => anyhow::Error::new(e),
        })
}

async fn run(cli: Cli, config: Option<Config>) -> Result<()> {
    match &cli.command {
        // Validates on its own, so that it reports every problem (the AWS sections' too) at once.
        Command::Config => {
            return config_cmd::run(&config_source(&cli), cli.database_url.as_deref())
        }
        // Generated from the command definition alone: no configuration, no database.
        Command::Completions { shell } => return docs_cmd::completions(*shell),
        Command::Man => return docs_cmd::man(),
        _ => {}
    }
    let config = config.context("the configuration is loaded for every other command")?;
    match cli.command {
        Command::Migrate { print, from } => migrate(&config, print, from).await,
        Command::Relay {
            publisher,
            drain,
            summary_interval,
            admin_listen,
        } => {
            let mut config = config;
            if let Some(publisher) = publisher {
                config.publisher = publisher;
            }
            relay_cmd::RelayCommand {
                config: &config,
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
        Command::Adopt {
            table,
            id,
            aggregate_type,
            aggregate_id,
            event_type,
            payload,
            headers,
            timestamp,
            print,
            remove,
        } => {
            let mapping = postgres::AdoptMapping {
                id,
                aggregate_type,
                aggregate_id,
                event_type,
                payload,
                headers,
                timestamp,
                ..postgres::AdoptMapping::debezium(&table).map_err(|e| UsageError(e.into()))?
            };
            adopt(&config, &mapping, print, remove).await
        }
        Command::Config | Command::Completions { .. } | Command::Man => {
            unreachable!("returned before the configuration is loaded")
        }
        #[cfg(feature = "aws")]
        Command::Aws {
            action: AwsAction::Bootstrap,
        } => {
            let report = outbox_aws::bootstrap(&config)
                .await
                .map_err(|e| UsageError(e.into()))?;
            for name in &report.created {
                crate::out::out(format!("created  {name}"))?;
            }
            for name in &report.existing {
                crate::out::out(format!("exists   {name}"))?;
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

async fn adopt(
    config: &Config,
    mapping: &postgres::AdoptMapping,
    print: bool,
    remove: bool,
) -> Result<()> {
    let pool = connect(config, "outbox-adopt").await?;
    let usage = |e: postgres::AdoptError| -> anyhow::Error {
        if e.is_usage() {
            UsageError(e.into()).into()
        } else {
            e.into()
        }
    };
    if remove {
        let had = postgres::unadopt(&pool, &config.schema, mapping)
            .await
            .map_err(usage)?;
        eprintln!(
            "{}: {}",
            mapping.qualified_table(),
            if had {
                "no longer adopted: rows inserted from now on are not copied into the outbox"
            } else {
                "was not adopted; nothing to remove"
            }
        );
        return Ok(());
    }
    if print {
        let sql = postgres::adoption_sql(&pool, &config.schema, mapping)
            .await
            .map_err(usage)?;
        return config_cmd::write_stdout(&sql);
    }
    let report = postgres::adopt(&pool, &config.schema, mapping)
        .await
        .map_err(usage)?;
    eprintln!(
        "{} adopted: each row inserted into it is copied into {} by the trigger {} ({}); run `outbox relay` to publish them.\n\
         Producer roles that do not own the outbox schema need, for its commit-time wake-up trigger: \
         GRANT USAGE ON SCHEMA {schema} TO <role>; GRANT SELECT ON SEQUENCE {} TO <role>;",
        report.table,
        config.schema.qualify("outbox_event"),
        postgres::ADOPT_TRIGGER,
        report.function,
        config.schema.qualify("outbox_wakeup_wanted_ms"),
        schema = config.schema.quoted(),
    );
    Ok(())
}

/// The publisher kinds this build links: the only place that names them. Every command builds
/// and validates publishers through it.
pub(crate) fn registry() -> outbox::Registry {
    let registry = outbox::Registry::new();
    #[cfg(feature = "aws")]
    let registry = registry.with(outbox_aws::Aws);
    #[cfg(feature = "kafka")]
    let registry = registry.with(outbox_kafka::Kafka);
    #[cfg(feature = "nats")]
    let registry = registry.with(outbox_nats::Nats);
    #[cfg(feature = "rabbitmq")]
    let registry = registry.with(outbox_amqp::RabbitMq);
    #[cfg(feature = "webhook")]
    let registry = registry.with(outbox_http::Webhook);
    registry
}

/// Builds the configured publisher; configuration mistakes are usage errors (exit 2).
pub(crate) async fn build_publisher(config: &Config) -> Result<Box<dyn Publisher>> {
    registry().build(config).await.map_err(|e| match e {
        outbox::BuildError::Config(e) => UsageError(e.into()).into(),
        e => UsageError(e.into()).into(),
    })
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
