//! Layered, typed configuration: built-in defaults, then a TOML file with a `[default]` section and
//! one section per profile (`[local]`, `[dev]`, `[prod]`), then environment variables.
//!
//! The profile comes from `OUTBOX_PROFILE` (default `local`). Environment overrides use the prefix
//! `OUTBOX_` and `__` between levels: `OUTBOX_RELAY__BATCH_SIZE=500`; `DATABASE_URL` sets
//! `database.url`. `OUTBOX_PROFILE`, `OUTBOX_CONFIG`, `OUTBOX_LOG`, `OUTBOX_LOG_FORMAT` and
//! `OUTBOX_TEST_*`, `OUTBOX_BENCH_*`, `OUTBOX_FAULTS_*`, `OUTBOX_DEMO_*` are not keys; any other
//! `OUTBOX_*` variable must name one. Everything is validated at start-up; an error names the key
//! and the fix.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use figment::providers::{Env, Format, Toml};
use figment::value::{Dict, Value};
use figment::{Figment, Profile as FigmentProfile};
use serde::{Deserialize, Serialize};

use crate::event::{EventLimits, MAX_PAYLOAD_BYTES_CEILING};
pub use crate::postgres::{keyword_values, redact_url, DatabaseUrl};
use crate::postgres::{DeadLetterPolicy, PgStoreOptions, Schema};
use crate::publisher::RouteConfig;
use crate::relay::{Backoff, RelayOptions};

/// The profiles a configuration file may have sections for.
pub const PROFILES: &[&str] = &["local", "dev", "prod"];
/// The profile used when `OUTBOX_PROFILE` is not set.
pub const DEFAULT_PROFILE: &str = "local";

/// Which world a configuration describes; selected by `OUTBOX_PROFILE` / `--profile`, it picks
/// the `[local]`, `[dev]` or `[prod]` section of the file. Publisher kinds read it too: only
/// `local` talks to emulators and may create infrastructure.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Profile {
    /// Emulators and brokers on this machine: dummy credentials, infrastructure may be created.
    #[default]
    Local,
    /// A shared development environment: real services, nothing created by the relay.
    Dev,
    /// Production: real services, nothing created by the relay.
    Prod,
}

impl Profile {
    /// The profile called `name` (`local`, `dev` or `prod`).
    pub fn parse(name: &str) -> Result<Self, ConfigError> {
        match name {
            "local" => Ok(Self::Local),
            "dev" => Ok(Self::Dev),
            "prod" => Ok(Self::Prod),
            other => Err(ConfigError::UnknownProfile(other.to_owned())),
        }
    }

    /// Its name, as in the file's section headers.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Dev => "dev",
            Self::Prod => "prod",
        }
    }

    /// Whether this is the `local` profile.
    pub fn is_local(self) -> bool {
        self == Self::Local
    }
}

impl std::fmt::Display for Profile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
/// The file read when no path is given and it exists in the working directory.
pub const DEFAULT_FILE: &str = "outbox.toml";

/// The shortest `relay.poll_interval` accepted: below it every idle relay would query the database
/// more than a hundred times a second for nothing (wake-ups come by NOTIFY anyway).
pub const MIN_POLL_INTERVAL: Duration = Duration::from_millis(10);

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
    #[error("invalid value for `{key}`{}: {problem}; {fix}", origin_suffix(.origin))]
    Value {
        key: Cow<'static, str>,
        problem: String,
        fix: Cow<'static, str>,
        /// Where the value came from when it was set (`OUTBOX_RELAY__BATCH_SIZE`, a file).
        origin: Option<String>,
    },
    /// Every problem found, when there is more than one.
    #[error("{} configuration problems:\n  - {}", .0.len(), .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n  - "))]
    Several(Vec<ConfigError>),
}

fn origin_suffix(origin: &Option<String>) -> String {
    origin
        .as_ref()
        .map(|o| format!(" (set by {o})"))
        .unwrap_or_default()
}

impl ConfigError {
    /// A connection string that does not parse; `reason` never contains the password.
    pub fn database_url(url: &DatabaseUrl, reason: String) -> Self {
        ConfigError::Value {
            key: "database.url".into(),
            problem: format!("{} is not a valid PostgreSQL connection string: {reason}", url.redacted()),
            fix: "use postgres://user:password@host:port/database (or libpq key/value form: host=... port=... user=... password=... dbname=...)".into(),
            origin: None,
        }
    }

    /// The individual problems (one, or those of [`ConfigError::Several`]).
    pub fn problems(&self) -> Vec<&ConfigError> {
        match self {
            ConfigError::Several(all) => all.iter().collect(),
            other => vec![other],
        }
    }
}

/// Collects every problem of a configuration, so that one run reports them all.
#[derive(Debug, Default)]
pub struct Problems(Vec<ConfigError>);

impl Problems {
    /// Records that `key` is wrong: what is wrong with it and how to fix it.
    pub fn add(
        &mut self,
        key: impl Into<Cow<'static, str>>,
        problem: impl Into<String>,
        fix: impl Into<Cow<'static, str>>,
    ) {
        self.0.push(ConfigError::Value {
            key: key.into(),
            problem: problem.into(),
            fix: fix.into(),
            origin: None,
        });
    }

    pub fn push(&mut self, error: ConfigError) {
        self.0.push(error);
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn into_vec(self) -> Vec<ConfigError> {
        self.0
    }

    /// `Ok` without problems, the problem itself for one, [`ConfigError::Several`] for more.
    pub fn into_result(mut self) -> Result<(), ConfigError> {
        match self.0.len() {
            0 => Ok(()),
            1 => Err(self.0.remove(0)),
            _ => Err(ConfigError::Several(self.0)),
        }
    }
}

impl From<figment::Error> for ConfigError {
    fn from(e: figment::Error) -> Self {
        ConfigError::Invalid(figment_message(e))
    }
}

/// Every error of a figment extraction in one line. figment names the key path and the source
/// (file or environment variable) of the value; for the environment it names only the prefix, so
/// name the exact variable.
pub(crate) fn figment_message(e: figment::Error) -> String {
    {
        let mut text = String::new();
        for (i, err) in e.into_iter().enumerate() {
            if i > 0 {
                text.push_str("; ");
            }
            match env_variable(err.metadata.as_ref(), &err.path) {
                Some(var) => text.push_str(&format!(
                    "{} for key `{}` in environment variable {var}",
                    err.kind,
                    err.path.join(".")
                )),
                None => text.push_str(&err.to_string()),
            }
        }
        text
    }
}

/// The environment variable a value at `path` came from, when its provider is the environment.
fn env_variable(metadata: Option<&figment::Metadata>, path: &[String]) -> Option<String> {
    let name = metadata?.name.as_ref();
    if path.is_empty() || !name.contains("environment variable") {
        return None;
    }
    if name.contains("`OUTBOX_`") {
        Some(format!("OUTBOX_{}", path.join("__").to_ascii_uppercase()))
    } else if path.join(".") == "database.url" {
        Some("DATABASE_URL".to_owned())
    } else {
        None
    }
}

/// `[destinations.NAME]` as the configuration holds it: the kind, and the rest of the table for
/// the kind's factory to read.
#[derive(Debug, Clone, PartialEq)]
pub struct DestinationSpec {
    /// `kind = "..."`: which [`PublisherFactory`](crate::PublisherFactory) builds it.
    pub kind: String,
    /// Every other key of the table.
    pub settings: Dict,
}

impl<'de> Deserialize<'de> for DestinationSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut settings = Dict::deserialize(d)?;
        let kind = match settings.remove("kind") {
            Some(Value::String(_, kind)) => kind,
            Some(other) => {
                return Err(serde::de::Error::custom(format!(
                    "`kind` must be a string, found {:?}",
                    other
                )))
            }
            None => {
                return Err(serde::de::Error::custom(
                    "a destination needs `kind = \"...\"` (e.g. \"sqs\", \"kafka\", \"file\")",
                ))
            }
        };
        Ok(Self { kind, settings })
    }
}

impl Serialize for DestinationSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut table = self.settings.clone();
        table.insert("kind".into(), Value::from(self.kind.clone()));
        redacted_dict(&table).serialize(s)
    }
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
    /// Longest wait between probes of a destination that is down (they start at `backoff_base`).
    #[serde(with = "humantime_serde")]
    pub destination_backoff_max: Duration,
    /// A claim stops adding events once their payloads reach this many bytes (it always takes one):
    /// the bound of the relay's memory per worker.
    pub max_batch_bytes: u64,
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
            destination_backoff_max: relay.destination_backoff_max,
            max_batch_bytes: store.max_batch_bytes,
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

/// The default `admin.stall_after`.
pub const DEFAULT_STALL_AFTER: Duration = Duration::from_secs(60);
/// The shortest `admin.token` accepted.
pub const MIN_ADMIN_TOKEN_LEN: usize = 16;

/// `[admin]`: the admin listener of `outbox relay` (metrics, health, admin API, web console) and
/// the readiness thresholds. Off unless `listen` is set.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Where to listen, e.g. `127.0.0.1:9187`; none (the default): no listener.
    pub listen: Option<std::net::SocketAddr>,
    /// Accept a `listen` address that is not loopback (the admin API then reaches the network:
    /// set a token and put TLS in front).
    pub allow_remote: bool,
    /// The bearer token that replay and delete require; none: they are refused.
    pub token: Option<AdminToken>,
    /// Not ready when there is a deliverable backlog and nothing was settled for this long, or a
    /// destination has been down this long.
    #[serde(with = "humantime_serde")]
    pub stall_after: Duration,
    /// Not ready when the oldest undelivered event is older than this (off when unset).
    #[serde(with = "humantime_serde")]
    pub max_pending_age: Option<Duration>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: None,
            allow_remote: false,
            token: None,
            stall_after: DEFAULT_STALL_AFTER,
            max_pending_age: None,
        }
    }
}

impl AdminConfig {
    /// Whether the admin listener may bind `addr`: loopback always, anything else only with
    /// `admin.allow_remote = true`. The error says how to allow it.
    pub fn check_listen(&self, addr: std::net::SocketAddr) -> Result<(), String> {
        if addr.ip().is_loopback() || self.allow_remote {
            return Ok(());
        }
        Err(format!(
            "{addr} is not a loopback address: the admin API would be reachable from the network; \
             use 127.0.0.1:PORT, or set admin.allow_remote = true (OUTBOX_ADMIN__ALLOW_REMOTE=true) \
             together with admin.token and a TLS proxy in front"
        ))
    }

    fn problems(&self, p: &mut Problems) {
        if let Some(addr) = self.listen {
            if let Err(problem) = self.check_listen(addr) {
                p.add(
                    "admin.listen",
                    problem,
                    "listen on loopback or allow it explicitly with admin.allow_remote = true",
                );
            }
        }
        if let Some(token) = &self.token {
            if token.expose().trim().len() < MIN_ADMIN_TOKEN_LEN {
                p.add(
                    "admin.token",
                    format!("the token is shorter than {MIN_ADMIN_TOKEN_LEN} characters (it is not shown)"),
                    "use a long random value, e.g. the output of `openssl rand -hex 32`, or unset it to refuse every mutation",
                );
            }
        }
        if self.stall_after.is_zero() {
            p.add(
                "admin.stall_after",
                "0s would report every relay as stalled",
                "use a duration such as \"60s\" (longer than a publish normally takes)",
            );
        }
        if self.max_pending_age.is_some_and(|d| d.is_zero()) {
            p.add(
                "admin.max_pending_age",
                "0s would report not ready whenever any event waits",
                "use a duration such as \"5m\", or leave it unset",
            );
        }
    }
}

/// The default `telemetry.service_name`.
pub const DEFAULT_SERVICE_NAME: &str = "outbox-relay";

/// `[telemetry]`: trace export of `outbox relay` over OTLP/HTTP (the CLI's `otlp` feature). Off
/// unless `otlp_endpoint` is set; a library user installs their own tracer and ignores it.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// The collector's OTLP/HTTP base URL, e.g. `http://127.0.0.1:4318`; spans are sent to
    /// `<otlp_endpoint>/v1/traces` as protobuf. None (the default): no export.
    #[serde(serialize_with = "serialize_redacted_url")]
    pub otlp_endpoint: Option<String>,
    /// The `service.name` resource attribute of the exported spans.
    pub service_name: String,
    /// The share of traces recorded, 0.0 to 1.0 (a span whose parent was sampled is always
    /// recorded).
    pub sample_ratio: f64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            service_name: DEFAULT_SERVICE_NAME.to_owned(),
            sample_ratio: 1.0,
        }
    }
}

impl TelemetryConfig {
    /// The URL the spans are posted to: `<otlp_endpoint>/v1/traces`, when export is on.
    pub fn traces_url(&self) -> Option<String> {
        let endpoint = self.otlp_endpoint.as_deref()?.trim();
        Some(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
    }

    fn problems(&self, p: &mut Problems) {
        if let Some(endpoint) = &self.otlp_endpoint {
            if let Err(problem) = check_http_base_url(endpoint.trim()) {
                p.add(
                    "telemetry.otlp_endpoint",
                    problem,
                    "use the collector's OTLP/HTTP base URL, e.g. \"http://127.0.0.1:4318\" (spans go to <endpoint>/v1/traces), or unset it",
                );
            }
        }
        if self.service_name.trim().is_empty() {
            p.add(
                "telemetry.service_name",
                "an empty name",
                "use a name such as \"outbox-relay\" (the default)",
            );
        }
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            p.add(
                "telemetry.sample_ratio",
                format!("{} is out of range", self.sample_ratio),
                "use 0.0 to 1.0 (1.0, the default, records every trace)",
            );
        }
    }
}

/// An `http://` or `https://` URL with a host, and no query or fragment (a path is appended).
fn check_http_base_url(url: &str) -> Result<(), String> {
    let shown = redact_url(url);
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| format!("{shown:?} is not an http:// or https:// URL"))?;
    let authority = rest.split('/').next().unwrap_or_default();
    let host = authority.rsplit('@').next().unwrap_or_default();
    if host.is_empty() || host.starts_with(':') {
        return Err(format!("{shown:?} has no host"));
    }
    if url.contains(|c: char| c.is_whitespace() || c == '?' || c == '#') {
        return Err(format!(
            "{shown:?} has a space, a query or a fragment (the path /v1/traces is appended to it)"
        ));
    }
    Ok(())
}

fn serialize_redacted_url<S: serde::Serializer>(
    url: &Option<String>,
    s: S,
) -> Result<S::Ok, S::Error> {
    url.as_deref().map(redact_url).serialize(s)
}

/// The admin API's bearer token: never shown (`Debug`, `Display` and serialization print `***`).
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct AdminToken(String);

impl AdminToken {
    /// A token; see [`MIN_ADMIN_TOKEN_LEN`].
    pub fn new(token: impl Into<String>) -> Self {
        Self(token.into())
    }
    /// The token itself: only for comparing with a request's.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl Serialize for AdminToken {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("***")
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

impl fmt::Display for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
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
    /// Each event to one of the named `[destinations]`, chosen by `[[routes]]` and
    /// `default_destination`; the destinations' kinds come from the linked broker crates.
    Destinations,
}

impl std::str::FromStr for PublisherSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stdout" => Ok(Self::Stdout),
            "null" => Ok(Self::Null),
            "destinations" => Ok(Self::Destinations),
            _ => match s.strip_prefix("file:") {
                Some(path) if !path.is_empty() => Ok(Self::File(PathBuf::from(path))),
                _ => Err(format!(
                    "unknown publisher {s:?}: use stdout, file:PATH, null or destinations (the configured [destinations])"
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
            Self::Destinations => f.write_str("destinations"),
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
///
/// Unknown keys are errors: inside the known sections by their types, at the top level by
/// [`Config::problems`] (a key that is not a table) and by
/// [`Registry::problems`](crate::Registry::problems) (a table no linked publisher kind
/// reads).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Config {
    /// The selected profile (not read from the file).
    #[serde(skip)]
    pub profile: Profile,
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
    /// Where events go; when not set: `destinations` if any are configured, else `stdout`.
    #[serde(default = "default_publisher")]
    pub publisher: PublisherSpec,
    /// `[admin]`: the admin listener and the readiness thresholds.
    #[serde(default)]
    pub admin: AdminConfig,
    /// `[telemetry]`: trace export of `outbox relay` (OTLP/HTTP).
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// `[destinations.NAME]`: named destinations, each with a `kind` that a linked publisher
    /// crate builds (see [`crate::registry`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub destinations: BTreeMap<String, DestinationSpec>,
    /// `[[routes]]`: the first route matching an event names its destination.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RouteConfig>,
    /// Where events go that neither name a destination nor match a route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_destination: Option<String>,
    /// Other top-level sections (`[aws]`, `[kafka]`, …), each read by the publisher crate that
    /// owns it ([`Config::section`]).
    #[serde(flatten, serialize_with = "serialize_sections")]
    pub sections: BTreeMap<String, Value>,
}

fn default_publisher() -> PublisherSpec {
    PublisherSpec::Stdout
}

fn serialize_sections<S: serde::Serializer>(
    sections: &BTreeMap<String, Value>,
    s: S,
) -> Result<S::Ok, S::Error> {
    let table: figment::value::Dict = sections
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    redacted_dict(&table).serialize(s)
}

/// Key names whose values are secrets wherever they appear in a publisher's section.
// `authorization`, `cookie` and `api-key`: static HTTP headers of webhook destinations.
const SECRET_KEYS: &[&str] = &[
    "password",
    "secret",
    "token",
    "api_key",
    "sasl_password",
    "authorization",
    "cookie",
    "api-key",
];

/// A copy of a table for display: values of secret-looking keys (see [`SECRET_KEYS`]) and the
/// password of any URL are replaced, at every depth.
pub(crate) fn redacted_dict(table: &figment::value::Dict) -> figment::value::Dict {
    fn redact(key: &str, value: &Value) -> Value {
        let lower = key.to_ascii_lowercase();
        match value {
            Value::Dict(tag, dict) => Value::Dict(
                *tag,
                dict.iter()
                    .map(|(k, v)| (k.clone(), redact(k, v)))
                    .collect(),
            ),
            Value::Array(tag, items) => {
                Value::Array(*tag, items.iter().map(|v| redact(key, v)).collect())
            }
            Value::String(tag, _) if SECRET_KEYS.iter().any(|s| lower.contains(s)) => {
                Value::String(*tag, "<redacted>".into())
            }
            Value::String(tag, text) if text.contains("://") && text.contains('@') => {
                Value::String(*tag, DatabaseUrl::new(text.clone()).redacted())
            }
            other => other.clone(),
        }
    }
    table
        .iter()
        .map(|(k, v)| (k.clone(), redact(k, v)))
        .collect()
}

/// Where to read configuration from; [`ConfigSource::from_env`] is what the CLI uses.
#[derive(Debug, Clone, Default)]
pub struct ConfigSource {
    /// The file; `None` reads `outbox.toml` if it exists.
    pub file: Option<PathBuf>,
    /// The profile; `None` reads `OUTBOX_PROFILE`, then `local`.
    pub profile: Option<String>,
    /// TOML text read instead of a file (same layout: `[default]` and profile sections).
    pub text: Option<String>,
    /// Read environment variables (off in tests that must not see the caller's environment).
    pub use_env: bool,
}

impl ConfigSource {
    /// The file from `OUTBOX_CONFIG`, the profile from `OUTBOX_PROFILE`, environment overrides on.
    pub fn from_env() -> Self {
        Self {
            file: std::env::var_os("OUTBOX_CONFIG").map(PathBuf::from),
            profile: std::env::var("OUTBOX_PROFILE").ok(),
            text: None,
            use_env: true,
        }
    }
}

impl Config {
    /// Loads TOML text (same layout as `outbox.toml`) for `profile`, without the environment:
    /// for tests and for programs that keep their configuration elsewhere.
    pub fn from_toml_str(text: &str, profile: &str) -> Result<Self, ConfigError> {
        Self::load(&ConfigSource {
            text: Some(text.to_owned()),
            profile: Some(profile.to_owned()),
            ..ConfigSource::default()
        })
    }

    /// A top-level section owned by a publisher crate (`[aws]`, `[kafka]`), as its type;
    /// `Ok(None)` when absent. The error names the section and the offending field.
    pub fn section<T: serde::de::DeserializeOwned>(
        &self,
        name: &str,
    ) -> Result<Option<T>, ConfigError> {
        let Some(value) = self.sections.get(name) else {
            return Ok(None);
        };
        value
            .deserialize::<T>()
            .map(Some)
            .map_err(|e| ConfigError::Invalid(format!("[{name}]: {}", figment_message(e))))
    }

    /// Loads and validates the configuration; every problem is reported at once.
    pub fn load(source: &ConfigSource) -> Result<Self, ConfigError> {
        let (config, problems) = Self::load_with_problems(source)?;
        problems.into_result()?;
        Ok(config)
    }

    /// Loads the configuration and validates it without failing on the values: the problems come
    /// back with the configuration, each naming where its value was set, so a tool can add its own
    /// (e.g. the AWS sections) and report them all together. Fails only when the configuration
    /// cannot be read at all (syntax, types, unknown keys).
    pub fn load_with_problems(source: &ConfigSource) -> Result<(Self, Problems), ConfigError> {
        let (figment, profile) = Self::figment(source)?;
        let mut config: Config = figment.extract()?;
        config.profile = profile;
        if figment.find_value("publisher").is_err() && !config.destinations.is_empty() {
            config.publisher = PublisherSpec::Destinations;
        }
        let mut problems = Problems::default();
        for mut problem in config.problems().into_vec() {
            if let ConfigError::Value { key, origin, .. } = &mut problem {
                *origin = value_origin(&figment, key);
            }
            problems.push(problem);
        }
        Ok((config, problems))
    }

    /// The merged providers, for extension crates that read their own sections
    /// (`figment.extract_inner("aws")`), and the selected profile.
    pub fn figment(source: &ConfigSource) -> Result<(Figment, Profile), ConfigError> {
        let profile = Profile::parse(
            source
                .profile
                .as_deref()
                .filter(|p| !p.is_empty())
                .unwrap_or(DEFAULT_PROFILE),
        )?;
        let mut figment = Figment::new();
        let file = match &source.file {
            Some(path) if !path.exists() => {
                return Err(ConfigError::MissingFile(path.display().to_string()))
            }
            Some(path) => Some(path.clone()),
            None => Some(PathBuf::from(DEFAULT_FILE)).filter(|p| p.exists()),
        };
        if let Some(text) = &source.text {
            check_sections(text, "the configuration text")?;
            figment = figment.merge(Toml::string(text).nested());
        } else if let Some(path) = &file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                ConfigError::Invalid(format!("cannot read {}: {e}", path.display()))
            })?;
            check_sections(&text, &path.display().to_string())?;
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
        Ok((
            figment.select(FigmentProfile::new(profile.as_str())),
            profile,
        ))
    }

    /// Checks values that types alone cannot, naming the key and the fix; every problem at once.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.problems().into_result()
    }

    /// Every value that cannot work, each with its key and the fix.
    pub fn problems(&self) -> Problems {
        let mut p = Problems::default();
        for (key, value) in &self.sections {
            if !matches!(value, Value::Dict(..)) {
                p.add(
                    key.clone(),
                    "unknown key",
                    "remove it or fix its name (see `outbox config` for the keys)",
                );
            }
        }
        let r = &self.relay;
        if !(1..=10_000).contains(&r.batch_size) {
            p.add(
                "relay.batch_size",
                format!("{} is out of range", r.batch_size),
                "use 1 to 10000 (100 is a good start)",
            );
        }
        if !(1..=256).contains(&r.workers) {
            p.add(
                "relay.workers",
                format!("{} is out of range", r.workers),
                "use 1 to 256",
            );
        }
        if r.max_attempts == 0 {
            p.add(
                "relay.max_attempts",
                "0 would dead-letter every event untried",
                "use 1 or more (10 is the default)",
            );
        }
        if r.poll_interval < MIN_POLL_INTERVAL {
            p.add(
                "relay.poll_interval",
                format!(
                    "{:?} is below the floor of {MIN_POLL_INTERVAL:?}: an idle relay would query the database that often for nothing",
                    r.poll_interval
                ),
                "use a duration such as \"1s\" (commits wake the relay by NOTIFY; this is only the fallback)",
            );
        }
        if r.publish_timeout.is_zero() {
            p.add(
                "relay.publish_timeout",
                "0s leaves no time to publish",
                "use a duration such as \"10s\"",
            );
        }
        if r.statement_timeout.is_zero() {
            p.add(
                "relay.statement_timeout",
                "0s disables the bound",
                "use a duration such as \"10s\"",
            );
        }
        if r.transaction_timeout <= r.publish_timeout + r.statement_timeout {
            p.add(
                "relay.transaction_timeout",
                format!(
                    "{:?} is not longer than relay.publish_timeout ({:?}) + relay.statement_timeout ({:?})",
                    r.transaction_timeout, r.publish_timeout, r.statement_timeout
                ),
                "raise relay.transaction_timeout or lower relay.publish_timeout",
            );
        }
        if r.backoff_base.is_zero() || r.backoff_max < r.backoff_base {
            p.add(
                "relay.backoff_base",
                format!(
                    "base {:?} and max {:?} do not make a backoff",
                    r.backoff_base, r.backoff_max
                ),
                "use a base above 0 and relay.backoff_max >= relay.backoff_base",
            );
        }
        if r.destination_backoff_max < r.backoff_base {
            p.add(
                "relay.destination_backoff_max",
                format!(
                    "{:?} is below relay.backoff_base ({:?})",
                    r.destination_backoff_max, r.backoff_base
                ),
                "use a duration such as \"10s\" (how long a destination that is down may wait for its next probe)",
            );
        }
        if r.max_batch_bytes < 1024 {
            p.add(
                "relay.max_batch_bytes",
                format!("{} is below 1024", r.max_batch_bytes),
                "use a budget such as 16777216 (16 MiB); a claim always takes at least one event",
            );
        }
        if r.active_poll_interval.is_zero() {
            p.add(
                "relay.active_poll_interval",
                "0s would spin",
                "use a duration such as \"2ms\" (or relay.active_period = \"0s\" to always wait for NOTIFY)",
            );
        }
        if r.purge_batch < 1 {
            p.add(
                "relay.purge_batch",
                format!("{} is below 1", r.purge_batch),
                "use 100 to 10000",
            );
        }
        if r.purge_interval.is_zero() {
            p.add(
                "relay.purge_interval",
                "0s would spin",
                "use a duration such as \"60s\"",
            );
        }
        let db = &self.database;
        // Each worker holds a connection while it publishes; the wake-up listener holds one; the
        // purge task and status queries need one more.
        let needed = u32::try_from(r.workers)
            .unwrap_or(u32::MAX)
            .saturating_add(2);
        if db.max_connections < needed {
            p.add(
                "database.max_connections",
                format!(
                    "{} is too few for {} relay workers",
                    db.max_connections, r.workers
                ),
                "use at least relay.workers + 2",
            );
        }
        if db.connect_timeout.is_zero() {
            p.add(
                "database.connect_timeout",
                "0s gives the server no time to answer",
                "use a duration such as \"5s\"",
            );
        }
        if !db.url.expose().trim().is_empty() {
            if let Err(crate::postgres::ConnectError::BadUrl { reason, .. }) =
                crate::postgres::connect_options(&db.url)
            {
                p.push(ConfigError::database_url(&db.url, reason));
            }
        }
        self.admin.problems(&mut p);
        self.telemetry.problems(&mut p);
        let e = &self.events;
        if e.max_payload_bytes == 0 || e.max_payload_bytes > MAX_PAYLOAD_BYTES_CEILING {
            p.add(
                "events.max_payload_bytes",
                format!("{} is out of range", e.max_payload_bytes),
                "use 1 to 267386880 bytes (255 MiB, the most a jsonb holds); the default 245760 fits every built-in destination",
            );
        }
        if e.max_field_bytes == 0 {
            p.add(
                "events.max_field_bytes",
                "a limit of 0 refuses every event",
                "use a positive number of bytes (1024 is the default)",
            );
        }
        p
    }

    /// Checks that a database URL is set, for commands that need one.
    pub fn require_database_url(&self) -> Result<&DatabaseUrl, ConfigError> {
        if self.database.url.expose().trim().is_empty() {
            return Err(ConfigError::Value {
                key: "database.url".into(),
                problem: "no database URL is configured".into(),
                fix: "set DATABASE_URL (e.g. postgres://postgres@127.0.0.1:5432/app) or database.url in outbox.toml".into(),
                origin: None,
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
            destination_backoff_max: r.destination_backoff_max,
            purge_interval: r.purge_interval,
            active_poll_interval: r.active_poll_interval,
            active_period: r.active_period,
            ..RelayOptions::default()
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
            max_batch_bytes: r.max_batch_bytes,
            max_event_bytes: self.events.max_payload_bytes as u64,
        }
    }
}

/// Where the value of `key` was set: the exact environment variable, or the file; `None` for a
/// built-in default.
fn value_origin(figment: &Figment, key: &str) -> Option<String> {
    let metadata = figment.find_metadata(key)?;
    let path: Vec<String> = key.split('.').map(str::to_owned).collect();
    if let Some(var) = env_variable(Some(metadata), &path) {
        return Some(var);
    }
    match &metadata.source {
        Some(figment::Source::File(file)) => Some(file.display().to_string()),
        _ => None,
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
fn check_sections(text: &str, file: &str) -> Result<(), ConfigError> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        ConfigError::Invalid(format!("{file} is not valid TOML: {}", e.message()))
    })?;
    for section in table.keys() {
        if section != "default" && !PROFILES.contains(&section.as_str()) {
            return Err(ConfigError::UnknownSection {
                section: section.clone(),
                file: file.to_owned(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str, profile: &str) -> Result<Config, ConfigError> {
        Config::from_toml_str(text, profile)
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
        assert_eq!(prod.profile, Profile::Prod);
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
    fn every_problem_is_reported_at_once_naming_its_key() {
        let text = r#"
            [default.database]
            connect_timeout = "0s"
            url = "mysql://app:pw@db/app"
            [default.relay]
            batch_size = 0
            poll_interval = "5ms"
            [default.events]
            max_field_bytes = 0
        "#;
        // From a file, so that the file is named as the source of the values set there.
        let path = std::env::temp_dir().join(format!("outbox-cfg-{}.toml", uuid::Uuid::now_v7()));
        std::fs::write(&path, text).unwrap();
        let err = Config::load(&ConfigSource {
            file: Some(path.clone()),
            profile: Some("local".into()),
            ..ConfigSource::default()
        })
        .unwrap_err();
        std::fs::remove_file(path).unwrap();
        assert_eq!(err.problems().len(), 5, "{err}");
        let text = err.to_string();
        for needle in [
            "5 configuration problems",
            "`database.connect_timeout`",
            "`database.url`",
            "the scheme `mysql` is not PostgreSQL",
            "`relay.batch_size`",
            "`relay.poll_interval`",
            "below the floor of 10ms",
            "`events.max_field_bytes`",
        ] {
            assert!(text.contains(needle), "{needle:?} in:\n{text}");
        }
        assert!(!text.contains("events.max_payload_bytes"), "{text}");
        assert!(!text.contains(":pw@"), "{text}");
        // The file is named as the source of a value set there.
        assert!(
            text.contains("(set by /") && text.contains(".toml)"),
            "{text}"
        );
    }

    #[test]
    fn malformed_connection_strings_are_configuration_errors_without_the_password() {
        for url in [
            "postgres://app:Secr3t-pw@db:99999/app",
            "postgres://app:Secr3t-pw@db/app?passwrd=Secr3t-pw",
            "mysql://app:Secr3t-pw@db/app",
            "host=db password='Secr3t-pw",
            "host=db Secr3t-pw",
            "host=db password=Secr3t-pw connect_timeout=3",
            "host=db passwrd=Secr3t-pw",
            "db.internal:5432/app",
        ] {
            let err = load(
                &format!("[default.database]\nurl = {}\n", toml_string(url)),
                "local",
            )
            .unwrap_err()
            .to_string();
            assert!(err.contains("`database.url`"), "{url}: {err}");
            assert!(!err.contains("Secr3t-pw"), "{url}: {err}");
        }
    }

    #[test]
    fn key_value_connection_strings_are_supported_and_redacted() {
        let url = DatabaseUrl::new(
            "host=db.internal port=6432 user=app password='s3 cr\\'et' dbname=app sslmode=require",
        );
        for shown in [
            format!("{url:?}"),
            url.to_string(),
            url.redacted(),
            serde_json::to_string(&url).unwrap(),
        ] {
            assert!(!shown.contains("s3 cr"), "{shown}");
            assert!(
                shown.contains("password=***") && shown.contains("host=db.internal"),
                "{shown}"
            );
        }
        assert_eq!(url.password().as_deref(), Some("s3 cr'et"));
        let options = crate::postgres::connect_options(&url).unwrap();
        assert_eq!(options.get_host(), "db.internal");
        assert_eq!(options.get_port(), 6432);
        assert_eq!(options.get_username(), "app");
        assert_eq!(options.get_database(), Some("app"));
        assert_eq!(
            keyword_values("a=1  b = 'x y' c=\\ ").unwrap(),
            [
                ("a".into(), "1".into()),
                ("b".into(), "x y".into()),
                ("c".into(), " ".into())
            ]
        );
        assert!(keyword_values("a='open").is_err());
        let config = load(
            "[default.database]\nurl = \"host=db user=app password=s3cr3t-kv\"\n",
            "local",
        )
        .unwrap();
        assert!(!format!("{config:?}").contains("s3cr3t-kv"));
        assert!(!serde_json::to_string(&config)
            .unwrap()
            .contains("s3cr3t-kv"));
    }

    fn toml_string(s: &str) -> String {
        serde_json::to_string(s).unwrap() // a JSON string is a valid TOML basic string here
    }

    #[test]
    fn telemetry_settings_parse_per_profile_and_bad_values_name_their_key() {
        let config = load("", "local").unwrap();
        assert_eq!(config.telemetry.otlp_endpoint, None);
        assert_eq!(config.telemetry.traces_url(), None);
        assert_eq!(config.telemetry.service_name, DEFAULT_SERVICE_NAME);
        assert_eq!(config.telemetry.sample_ratio, 1.0);

        let text =
            "[prod.telemetry]\notlp_endpoint = \"https://collector:4318/\"\nsample_ratio = 0.25\n";
        let config = load(text, "prod").unwrap();
        assert_eq!(
            config.telemetry.traces_url().as_deref(),
            Some("https://collector:4318/v1/traces")
        );
        assert_eq!(config.telemetry.sample_ratio, 0.25);
        assert_eq!(load(text, "dev").unwrap().telemetry.otlp_endpoint, None);

        for (bad, said) in [
            ("ftp://x", "not an http:// or https:// URL"),
            ("127.0.0.1:4318", "not an http:// or https:// URL"),
            ("http://", "has no host"),
            ("http://c:4318/?x=1", "a query"),
        ] {
            let err = load(
                &format!(
                    "[default.telemetry]\notlp_endpoint = {}\n",
                    toml_string(bad)
                ),
                "local",
            )
            .unwrap_err()
            .to_string();
            assert!(
                err.contains("`telemetry.otlp_endpoint`") && err.contains(said),
                "{bad}: {err}"
            );
        }
        let err = load(
            "[default.telemetry]\nsample_ratio = 1.5\nservice_name = \" \"\n",
            "local",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("`telemetry.sample_ratio`") && err.contains("`telemetry.service_name`"),
            "{err}"
        );
        let err = load("[default.telemetry]\nendpoint = \"http://c\"\n", "local").unwrap_err();
        assert!(err.to_string().contains("endpoint"), "{err}");

        // A password in the endpoint is never shown.
        let config = load(
            "[default.telemetry]\notlp_endpoint = \"https://u:s3cret@c:4318\"\n",
            "local",
        )
        .unwrap();
        let shown = serde_json::to_string(&config).unwrap();
        assert!(
            !shown.contains("s3cret") && shown.contains("c:4318"),
            "{shown}"
        );
    }

    #[test]
    fn admin_settings_parse_and_a_remote_listener_needs_allow_remote() {
        let config = load(
            "[default.admin]\nlisten = \"127.0.0.1:9187\"\nmax_pending_age = \"5m\"\n",
            "local",
        )
        .unwrap();
        assert_eq!(config.admin.listen, Some("127.0.0.1:9187".parse().unwrap()));
        assert_eq!(config.admin.max_pending_age, Some(Duration::from_secs(300)));
        assert_eq!(config.admin.stall_after, DEFAULT_STALL_AFTER);
        assert!(config.admin.token.is_none());

        let err = load("[default.admin]\nlisten = \"0.0.0.0:9187\"\n", "local").unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("`admin.listen`") && text.contains("admin.allow_remote = true"),
            "{text}"
        );
        let config = load(
            "[default.admin]\nlisten = \"0.0.0.0:9187\"\nallow_remote = true\n",
            "local",
        )
        .unwrap();
        assert!(config.admin.allow_remote);

        let err = load(
            "[default.admin]\nmax_pending_age = \"0s\"\ntoken = \"Sh0rt\"\n",
            "local",
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("`admin.max_pending_age`") && text.contains("`admin.token`"),
            "{text}"
        );
        assert!(!text.contains("Sh0rt"), "{text}");
        let config = load(
            "[default.admin]\ntoken = \"0123456789abcdef-secret\"\n",
            "local",
        )
        .unwrap();
        for shown in [
            format!("{config:?}"),
            serde_json::to_string(&config).unwrap(),
        ] {
            assert!(!shown.contains("0123456789abcdef-secret"), "{shown}");
        }
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
