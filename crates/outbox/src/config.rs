//! Layered, typed configuration: built-in defaults, then a TOML file with a `[default]` section and
//! one section per profile (`[local]`, `[dev]`, `[prod]`), then environment variables.
//!
//! The profile comes from `OUTBOX_PROFILE` (default `local`). Environment overrides use the prefix
//! `OUTBOX_` and `__` between levels: `OUTBOX_RELAY__BATCH_SIZE=500`; `DATABASE_URL` sets
//! `database.url`. `OUTBOX_PROFILE`, `OUTBOX_CONFIG`, `OUTBOX_LOG`, `OUTBOX_LOG_FORMAT` and
//! `OUTBOX_TEST_*`, `OUTBOX_BENCH_*`, `OUTBOX_FAULTS_*`, `OUTBOX_DEMO_*` are not keys; any other
//! `OUTBOX_*` variable must name one. Everything is validated at start-up; an error names the key
//! and the fix.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Toml};
use figment::value::Value;
use figment::{Figment, Profile};
use serde::{Deserialize, Serialize};

use crate::event::EventLimits;
use crate::postgres::{DeadLetterPolicy, PgStoreOptions, Schema};
use crate::relay::{Backoff, RelayOptions};

/// The profiles a configuration file may have sections for.
pub const PROFILES: &[&str] = &["local", "dev", "prod"];
/// The profile used when `OUTBOX_PROFILE` is not set.
pub const DEFAULT_PROFILE: &str = "local";
/// The file read when no path is given and it exists in the working directory.
pub const DEFAULT_FILE: &str = "outbox.toml";

/// A configuration problem, found before anything runs.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "unknown profile `{0}` (from OUTBOX_PROFILE or --profile): use one of local, dev, prod"
    )]
    UnknownProfile(String),
    #[error("unknown section [{section}] in {file}: top-level sections are profiles; use [default], [local], [dev] or [prod]")]
    UnknownSection { section: String, file: String },
    #[error("configuration file {0} does not exist: create it or point OUTBOX_CONFIG / --config at an existing file")]
    MissingFile(String),
    #[error("invalid configuration: {0}")]
    Invalid(String),
    #[error("invalid value for `{key}`: {problem}; {fix}")]
    Value {
        key: &'static str,
        problem: String,
        fix: &'static str,
    },
}

impl From<figment::Error> for ConfigError {
    fn from(e: figment::Error) -> Self {
        // figment names the key path and the source (file or environment variable) of the value.
        let mut text = String::new();
        for (i, err) in e.into_iter().enumerate() {
            if i > 0 {
                text.push_str("; ");
            }
            text.push_str(&err.to_string());
        }
        ConfigError::Invalid(text)
    }
}

/// A database URL whose password never reaches logs, errors, `Debug` output or serialized
/// configuration (`outbox config` prints it redacted).
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct DatabaseUrl(String);

impl Serialize for DatabaseUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.redacted())
    }
}

impl DatabaseUrl {
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }
    /// The full URL, password included: only for connecting.
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// The URL with any password replaced by `***`.
    pub fn redacted(&self) -> String {
        redact_url(&self.0)
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.redacted(), f)
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// Replaces the password of a URL (`user:password@`) and any `password=` query value with `***`.
pub fn redact_url(url: &str) -> String {
    let mut out = url.to_owned();
    if let Some(scheme_end) = out.find("://") {
        let rest_start = scheme_end + 3;
        let authority_end = out[rest_start..]
            .find(['/', '?'])
            .map_or(out.len(), |i| rest_start + i);
        if let Some(at) = out[rest_start..authority_end].rfind('@') {
            let userinfo = &out[rest_start..rest_start + at];
            if let Some(colon) = userinfo.find(':') {
                out.replace_range(rest_start + colon + 1..rest_start + at, "***");
            }
        }
    }
    if let Some(q) = out.find('?') {
        let (head, query) = out.split_at(q + 1);
        let redacted: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                _ => pair.to_owned(),
            })
            .collect();
        out = format!("{head}{}", redacted.join("&"));
    }
    out
}

/// `[database]`: where the outbox table lives.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// `postgres://user:password@host:port/db?sslmode=...`; also from `DATABASE_URL`.
    pub url: DatabaseUrl,
    pub max_connections: u32,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: DatabaseUrl::default(),
            max_connections: 8,
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// `[relay]`: how events are claimed, published, retried and kept.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    /// Run the relay in this process (an embedding application may turn it off and run
    /// `outbox relay` as a separate service instead).
    pub enabled: bool,
    pub batch_size: usize,
    pub workers: usize,
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub publish_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub transaction_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub statement_timeout: Duration,
    pub max_attempts: u32,
    #[serde(with = "humantime_serde")]
    pub backoff_base: Duration,
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// Keep published events this long ("0s": delete on publish).
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    #[serde(with = "humantime_serde")]
    pub purge_interval: Duration,
    pub purge_batch: i64,
    /// While events keep arriving (one was found within `active_period`), poll this often instead
    /// of asking producers to NOTIFY, so producers under load pay nothing for wake-ups.
    #[serde(with = "humantime_serde")]
    pub active_poll_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub active_period: Duration,
    pub dead_letter: DeadLetterPolicy,
    /// Wake on NOTIFY from producers (only while a relay waits); off: poll only.
    pub notify: bool,
}

impl Default for RelayConfig {
    fn default() -> Self {
        let relay = RelayOptions::default();
        let store = PgStoreOptions::default();
        Self {
            enabled: true,
            batch_size: relay.batch_size,
            workers: relay.workers,
            poll_interval: relay.poll_interval,
            publish_timeout: relay.publish_timeout,
            transaction_timeout: store.transaction_timeout,
            statement_timeout: store.statement_timeout,
            max_attempts: relay.max_attempts,
            backoff_base: relay.backoff.base,
            backoff_max: relay.backoff.max,
            retention: store.retention,
            purge_interval: relay.purge_interval,
            purge_batch: store.purge_batch,
            active_poll_interval: relay.active_poll_interval,
            active_period: relay.active_period,
            dead_letter: store.dead_letter,
            notify: store.notify,
        }
    }
}

/// Where the relay sends events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublisherSpec {
    /// JSON Lines on standard output.
    Stdout,
    /// JSON Lines appended to a file.
    File(PathBuf),
    /// Counts and discards (benchmarks, dry runs).
    Null,
    /// The AWS publishers (SQS, EventBridge) with the `[routes]` and `[aws]` sections.
    Aws,
}

impl std::str::FromStr for PublisherSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stdout" => Ok(Self::Stdout),
            "null" => Ok(Self::Null),
            "aws" => Ok(Self::Aws),
            _ => match s.strip_prefix("file:") {
                Some(path) if !path.is_empty() => Ok(Self::File(PathBuf::from(path))),
                _ => Err(format!(
                    "unknown publisher {s:?}: use stdout, file:PATH, null or aws"
                )),
            },
        }
    }
}

impl fmt::Display for PublisherSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Stdout => f.write_str("stdout"),
            Self::File(p) => write!(f, "file:{}", p.display()),
            Self::Null => f.write_str("null"),
            Self::Aws => f.write_str("aws"),
        }
    }
}

impl Serialize for PublisherSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PublisherSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The whole configuration of the outbox library, the relay and the CLI.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The selected profile (not read from the file).
    #[serde(skip)]
    pub profile: String,
    /// Schema of the `outbox_event` table.
    #[serde(default)]
    pub schema: Schema,
    /// Serialize enqueues per key in the database (see docs/ARCHITECTURE.md); applied by migrate.
    #[serde(default)]
    pub strict_key_order: bool,
    #[serde(default)]
    pub database: DatabaseConfig,
    #[serde(default)]
    pub relay: RelayConfig,
    #[serde(default)]
    pub events: EventLimits,
    #[serde(default = "default_publisher")]
    pub publisher: PublisherSpec,
    /// `[aws]`, `[destinations]` and `[routes]` are read by the `outbox-aws` crate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destinations: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routes: Option<Value>,
}

fn default_publisher() -> PublisherSpec {
    PublisherSpec::Stdout
}

/// Where to read configuration from; [`ConfigSource::from_env`] is what the CLI uses.
#[derive(Debug, Clone, Default)]
pub struct ConfigSource {
    /// The file; `None` reads `outbox.toml` if it exists.
    pub file: Option<PathBuf>,
    /// The profile; `None` reads `OUTBOX_PROFILE`, then `local`.
    pub profile: Option<String>,
    /// Read environment variables (off in tests that must not see the caller's environment).
    pub use_env: bool,
}

impl ConfigSource {
    /// The file from `OUTBOX_CONFIG`, the profile from `OUTBOX_PROFILE`, environment overrides on.
    pub fn from_env() -> Self {
        Self {
            file: std::env::var_os("OUTBOX_CONFIG").map(PathBuf::from),
            profile: std::env::var("OUTBOX_PROFILE").ok(),
            use_env: true,
        }
    }
}

impl Config {
    /// Loads and validates the configuration.
    pub fn load(source: &ConfigSource) -> Result<Self, ConfigError> {
        let (figment, profile) = Self::figment(source)?;
        let mut config: Config = figment.extract()?;
        config.profile = profile;
        config.validate()?;
        Ok(config)
    }

    /// The merged providers, for extension crates that read their own sections
    /// (`figment.extract_inner("aws")`), and the selected profile.
    pub fn figment(source: &ConfigSource) -> Result<(Figment, String), ConfigError> {
        let profile = source
            .profile
            .clone()
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| DEFAULT_PROFILE.to_owned());
        if !PROFILES.contains(&profile.as_str()) {
            return Err(ConfigError::UnknownProfile(profile));
        }
        let mut figment = Figment::new();
        let file = match &source.file {
            Some(path) if !path.exists() => {
                return Err(ConfigError::MissingFile(path.display().to_string()))
            }
            Some(path) => Some(path.clone()),
            None => Some(PathBuf::from(DEFAULT_FILE)).filter(|p| p.exists()),
        };
        if let Some(path) = &file {
            check_sections(path)?;
            figment = figment.merge(Toml::file(path).nested());
        }
        if source.use_env {
            figment = figment
                .merge(
                    Env::raw()
                        .only(&["DATABASE_URL"])
                        .map(|_| "database.url".into())
                        .global(),
                )
                .merge(
                    Env::prefixed("OUTBOX_")
                        .filter(|key| !is_reserved_env(key.as_str()))
                        .split("__")
                        .global(),
                );
        }
        Ok((figment.select(Profile::new(&profile)), profile))
    }

    /// Checks values that types alone cannot, naming the key and the fix.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let r = &self.relay;
        let bad = |key, problem: String, fix| Err(ConfigError::Value { key, problem, fix });
        if !(1..=10_000).contains(&r.batch_size) {
            return bad(
                "relay.batch_size",
                format!("{} is out of range", r.batch_size),
                "use 1 to 10000 (100 is a good start)",
            );
        }
        if !(1..=256).contains(&r.workers) {
            return bad(
                "relay.workers",
                format!("{} is out of range", r.workers),
                "use 1 to 256",
            );
        }
        if r.max_attempts == 0 {
            return bad(
                "relay.max_attempts",
                "0 would dead-letter every event untried".into(),
                "use 1 or more (10 is the default)",
            );
        }
        if r.poll_interval.is_zero() {
            return bad(
                "relay.poll_interval",
                "0s would spin".into(),
                "use a duration such as \"1s\"",
            );
        }
        if r.publish_timeout.is_zero() {
            return bad(
                "relay.publish_timeout",
                "0s leaves no time to publish".into(),
                "use a duration such as \"10s\"",
            );
        }
        if r.transaction_timeout <= r.publish_timeout + r.statement_timeout {
            return bad(
                "relay.transaction_timeout",
                format!(
                    "{:?} is not longer than relay.publish_timeout ({:?}) + relay.statement_timeout ({:?})",
                    r.transaction_timeout, r.publish_timeout, r.statement_timeout
                ),
                "raise relay.transaction_timeout or lower relay.publish_timeout",
            );
        }
        if r.statement_timeout.is_zero() {
            return bad(
                "relay.statement_timeout",
                "0s disables the bound".into(),
                "use a duration such as \"10s\"",
            );
        }
        if r.backoff_base.is_zero() || r.backoff_max < r.backoff_base {
            return bad(
                "relay.backoff_base",
                format!(
                    "base {:?} and max {:?} do not make a backoff",
                    r.backoff_base, r.backoff_max
                ),
                "use a base above 0 and relay.backoff_max >= relay.backoff_base",
            );
        }
        if r.active_poll_interval.is_zero() {
            return bad(
                "relay.active_poll_interval",
                "0s would spin".into(),
                "use a duration such as \"2ms\" (or relay.active_period = \"0s\" to always wait for NOTIFY)",
            );
        }
        if r.purge_batch < 1 {
            return bad(
                "relay.purge_batch",
                format!("{} is below 1", r.purge_batch),
                "use 100 to 10000",
            );
        }
        if r.purge_interval.is_zero() {
            return bad(
                "relay.purge_interval",
                "0s would spin".into(),
                "use a duration such as \"60s\"",
            );
        }
        // Each worker holds a connection while it publishes; the wake-up listener holds one; the
        // purge task and status queries need one more.
        let needed = u32::try_from(r.workers)
            .unwrap_or(u32::MAX)
            .saturating_add(2);
        if self.database.max_connections < needed {
            return bad(
                "database.max_connections",
                format!(
                    "{} is too few for {} relay workers",
                    self.database.max_connections, r.workers
                ),
                "use at least relay.workers + 2",
            );
        }
        if self.events.max_payload_bytes == 0 || self.events.max_field_bytes == 0 {
            return bad(
                "events.max_payload_bytes",
                "a limit of 0 refuses every event".into(),
                "use a positive number of bytes",
            );
        }
        Ok(())
    }

    /// Checks that a database URL is set, for commands that need one.
    pub fn require_database_url(&self) -> Result<&DatabaseUrl, ConfigError> {
        if self.database.url.expose().is_empty() {
            return Err(ConfigError::Value {
                key: "database.url",
                problem: "no database URL is configured".into(),
                fix: "set DATABASE_URL (e.g. postgres://postgres@127.0.0.1:5432/app) or database.url in outbox.toml",
            });
        }
        Ok(&self.database.url)
    }

    pub fn relay_options(&self) -> RelayOptions {
        let r = &self.relay;
        RelayOptions {
            batch_size: r.batch_size,
            workers: r.workers,
            poll_interval: r.poll_interval,
            publish_timeout: r.publish_timeout,
            max_attempts: r.max_attempts,
            backoff: Backoff {
                base: r.backoff_base,
                max: r.backoff_max,
            },
            purge_interval: r.purge_interval,
            active_poll_interval: r.active_poll_interval,
            active_period: r.active_period,
        }
    }

    pub fn store_options(&self) -> PgStoreOptions {
        let r = &self.relay;
        PgStoreOptions {
            schema: self.schema.clone(),
            transaction_timeout: r.transaction_timeout,
            statement_timeout: r.statement_timeout,
            retention: r.retention,
            purge_batch: r.purge_batch,
            dead_letter: r.dead_letter,
            notify: r.notify,
            notify_window: r.poll_interval.max(Duration::from_millis(200)) * 2,
        }
    }
}

/// `OUTBOX_*` variables that are not configuration keys: the selectors, the log filter, and the
/// knobs of the project's tests and tools. Every other `OUTBOX_*` variable must name a key, so a
/// mistyped override is an error rather than silently ignored.
fn is_reserved_env(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    matches!(key.as_str(), "profile" | "config" | "log" | "log_format")
        || ["test_", "bench_", "faults_", "demo_"]
            .iter()
            .any(|prefix| key.starts_with(prefix))
}

/// With `nested()`, every top-level table is a profile: reject anything that is not one, so a
/// mistyped section is an error instead of silently ignored.
fn check_sections(path: &Path) -> Result<(), ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::Invalid(format!("cannot read {}: {e}", path.display())))?;
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        ConfigError::Invalid(format!(
            "{} is not valid TOML: {}",
            path.display(),
            e.message()
        ))
    })?;
    for section in table.keys() {
        if section != "default" && !PROFILES.contains(&section.as_str()) {
            return Err(ConfigError::UnknownSection {
                section: section.clone(),
                file: path.display().to_string(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!("outbox-cfg-{}.toml", uuid::Uuid::now_v7()));
        std::fs::write(&path, text).unwrap();
        path
    }

    fn load(text: &str, profile: &str) -> Result<Config, ConfigError> {
        let path = write(text);
        let result = Config::load(&ConfigSource {
            file: Some(path.clone()),
            profile: Some(profile.into()),
            use_env: false,
        });
        std::fs::remove_file(path).unwrap();
        result
    }

    #[test]
    fn profile_sections_override_the_default_section() {
        let text = r#"
            [default]
            schema = "app"
            [default.relay]
            batch_size = 50
            poll_interval = "250ms"
            [prod.relay]
            batch_size = 500
        "#;
        let local = load(text, "local").unwrap();
        assert_eq!(local.relay.batch_size, 50);
        assert_eq!(local.schema.as_str(), "app");
        assert_eq!(local.relay.poll_interval, Duration::from_millis(250));
        let prod = load(text, "prod").unwrap();
        assert_eq!(prod.relay.batch_size, 500);
        assert_eq!(prod.profile, "prod");
    }

    #[test]
    fn errors_name_the_key_and_the_fix() {
        let err = load("[default.relay]\nbatch_size = 0\n", "local").unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("relay.batch_size") && text.contains("use 1 to 10000"),
            "{text}"
        );

        let err = load("[default.relay]\nbatchsize = 5\n", "local").unwrap_err();
        assert!(err.to_string().contains("batchsize"), "{err}");

        let err = load("[default.relay]\nbatch_size = \"many\"\n", "local").unwrap_err();
        assert!(err.to_string().contains("batch_size"), "{err}");

        let err = load("[staging]\nschema = \"x\"\n", "local").unwrap_err();
        assert!(err.to_string().contains("[staging]"), "{err}");

        let err = load("", "qa").unwrap_err();
        assert!(err.to_string().contains("unknown profile `qa`"), "{err}");

        let err = load("[default]\nschema = \"a;drop\"\n", "local").unwrap_err();
        assert!(err.to_string().contains("plain identifier"), "{err}");

        let err = load("[default.relay]\nworkers = 16\n", "local").unwrap_err();
        assert!(
            err.to_string().contains("database.max_connections"),
            "{err}"
        );

        let err = load("[default]\npublisher = \"kafka\"\n", "local").unwrap_err();
        assert!(err.to_string().contains("stdout, file:PATH"), "{err}");
    }

    #[test]
    fn publisher_specs_parse() {
        assert_eq!("stdout".parse(), Ok(PublisherSpec::Stdout));
        assert_eq!(
            "file:/tmp/x.jsonl".parse(),
            Ok(PublisherSpec::File("/tmp/x.jsonl".into()))
        );
        assert!("file:".parse::<PublisherSpec>().is_err());
    }

    #[test]
    fn database_urls_are_redacted() {
        let url = DatabaseUrl::new("postgres://app:s3cret@db:5432/app?sslmode=require&password=x2");
        for shown in [format!("{url:?}"), url.to_string(), url.redacted()] {
            assert!(
                !shown.contains("s3cret") && !shown.contains("x2"),
                "{shown}"
            );
            assert!(shown.contains("app:***@db"), "{shown}");
        }
        assert_eq!(redact_url("postgres://db/app"), "postgres://db/app");
    }
}
