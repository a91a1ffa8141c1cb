//! One logging set-up for the binaries built on this crate (the `outbox` CLI, the demo, the Lambda
//! function), so they read the same variables the same way. Behind the `logging` feature: a library
//! user keeps their own subscriber and never compiles `tracing-subscriber` through this crate.
//!
//! - `OUTBOX_LOG` (else `RUST_LOG`, else the binary's default) filters, e.g. `info,sqlx=warn`. A
//!   filter that does not parse, or a bare word that is not a level (`infoo`), is an error naming the
//!   variable: a typo must not silently turn logging off.
//! - `OUTBOX_LOG_FORMAT`: `text` (default) or `json` (one JSON object per line, the event's fields
//!   at the top level, for log shippers).
//! - ANSI colours only when standard error is a terminal and `NO_COLOR` is unset or empty
//!   (<https://no-color.org>); never in JSON.
//!
//! Logs go to standard error: standard output belongs to command results and the `stdout`
//! publisher.

use std::io::IsTerminal;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

/// The variable that filters the logs (takes precedence over `RUST_LOG`).
pub const FILTER_VAR: &str = "OUTBOX_LOG";
/// The variable that selects the log format.
pub const FORMAT_VAR: &str = "OUTBOX_LOG_FORMAT";

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Why logging could not be set up: a bad variable, named with its fix.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LogError {
    #[error("invalid {var} filter {value:?}: {reason}; use a level (error, warn, info, debug, trace, off) or directives like `info,sqlx=warn` (TARGET=LEVEL)")]
    Filter {
        var: &'static str,
        value: String,
        reason: String,
    },
    #[error("invalid {FORMAT_VAR} {value:?}: use `text` (the default) or `json`")]
    Format { value: String },
    #[error("logging was already set up in this process")]
    AlreadySet,
}

/// What a binary wants beyond the shared variables.
#[derive(Debug, Clone, Copy)]
pub struct LogOptions {
    /// The filter when neither `OUTBOX_LOG` nor `RUST_LOG` is set.
    pub default_filter: &'static str,
    /// Timestamp every line (off where the platform stamps lines, e.g. CloudWatch for Lambda).
    pub timestamps: bool,
}

/// The settings read from the environment, before anything is installed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSettings {
    /// The filter directives in effect.
    pub filter: String,
    pub format: LogFormat,
    /// Colour the text format.
    pub ansi: bool,
}

impl LogSettings {
    /// Reads `OUTBOX_LOG`, `RUST_LOG`, `OUTBOX_LOG_FORMAT` and `NO_COLOR`, and whether standard
    /// error is a terminal.
    pub fn from_env(default_filter: &str) -> Result<Self, LogError> {
        Self::from_vars(
            |name| std::env::var(name).ok(),
            std::io::stderr().is_terminal(),
            default_filter,
        )
    }

    /// [`LogSettings::from_env`] over any source of variables (for tests).
    pub fn from_vars(
        var: impl Fn(&str) -> Option<String>,
        stderr_is_terminal: bool,
        default_filter: &str,
    ) -> Result<Self, LogError> {
        // An empty variable counts as unset, as shells make it easy to export one by accident.
        let set = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        let (filter, source) = match (set(FILTER_VAR), set("RUST_LOG")) {
            (Some(f), _) => (f, Some(FILTER_VAR)),
            (None, Some(f)) => (f, Some("RUST_LOG")),
            (None, None) => (default_filter.to_owned(), None),
        };
        if let Some(var) = source {
            check_filter(&filter).map_err(|reason| LogError::Filter {
                var,
                value: filter.clone(),
                reason,
            })?;
        }
        let format = match set(FORMAT_VAR) {
            None => LogFormat::Text,
            Some(v) => match v.trim().to_ascii_lowercase().as_str() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                _ => return Err(LogError::Format { value: v }),
            },
        };
        let no_color = set("NO_COLOR").is_some();
        Ok(Self {
            filter,
            format,
            ansi: format == LogFormat::Text && stderr_is_terminal && !no_color,
        })
    }
}

/// Checks a filter the way [`EnvFilter`] parses it, and refuses a bare word that is not a level:
/// `EnvFilter` reads `infoo` as "everything of the target `infoo`", which logs nothing.
fn check_filter(filter: &str) -> Result<(), String> {
    const LEVELS: &[&str] = &["off", "error", "warn", "info", "debug", "trace"];
    for directive in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let bare = !directive.contains(['=', '[']);
        if bare && !LEVELS.contains(&directive.to_ascii_lowercase().as_str()) {
            return Err(format!(
                "`{directive}` is not a level (to set a target's level write `{directive}=debug`)"
            ));
        }
    }
    EnvFilter::builder()
        .parse(filter)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Installs the process-wide subscriber from the environment and returns the format in use.
pub fn init(options: LogOptions) -> Result<LogFormat, LogError> {
    let settings = LogSettings::from_env(options.default_filter)?;
    install(&settings, options.timestamps, None)?;
    Ok(settings.format)
}

/// A layer installed next to the log lines, e.g. a trace exporter; it filters for itself (the log
/// filter applies to the log lines only).
pub type ExtraLayer = Box<dyn Layer<Registry> + Send + Sync>;

/// Installs the process-wide subscriber with `settings`, and `extra` next to the log lines. For a
/// binary that reads its settings early (to fail fast on a bad variable) and installs once it
/// knows what else to record, e.g. a trace exporter named in its configuration file.
pub fn install(
    settings: &LogSettings,
    timestamps: bool,
    extra: Option<ExtraLayer>,
) -> Result<(), LogError> {
    let filter = EnvFilter::builder()
        .parse(&settings.filter)
        .map_err(|e| LogError::Filter {
            var: FILTER_VAR,
            value: settings.filter.clone(),
            reason: e.to_string(),
        })?;
    let lines = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(settings.ansi);
    // The filter is the log lines' own, so that `extra` may record what they leave out.
    let lines: ExtraLayer = match (settings.format, timestamps) {
        (LogFormat::Text, true) => lines.with_filter(filter).boxed(),
        (LogFormat::Text, false) => lines.without_time().with_filter(filter).boxed(),
        (LogFormat::Json, true) => lines.json().flatten_event(true).with_filter(filter).boxed(),
        (LogFormat::Json, false) => lines
            .json()
            .flatten_event(true)
            .without_time()
            .with_filter(filter)
            .boxed(),
    };
    let layers: Vec<ExtraLayer> = std::iter::once(lines).chain(extra).collect();
    tracing_subscriber::registry()
        .with(layers)
        .try_init()
        .map_err(|_| LogError::AlreadySet)
}

/// A message that must reach the user whatever the filter (a command's final error), in the log
/// format: `error: ...` as text, or a JSON object with `level` `ERROR` so that a log shipper parsing
/// every line of standard error as JSON keeps working.
pub fn error_line(format: LogFormat, message: &str) -> String {
    match format {
        LogFormat::Text => format!("error: {message}"),
        LogFormat::Json => serde_json::json!({
            "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            "level": "ERROR",
            "message": message,
            "target": "outbox",
        })
        .to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(vars: &[(&str, &str)], terminal: bool) -> Result<LogSettings, LogError> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        LogSettings::from_vars(
            |name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()),
            terminal,
            "info",
        )
    }

    #[test]
    fn outbox_log_wins_over_rust_log_and_the_default() {
        let s = settings(&[("OUTBOX_LOG", "debug"), ("RUST_LOG", "trace")], false).unwrap();
        assert_eq!(s.filter, "debug");
        assert_eq!(
            settings(&[("RUST_LOG", "warn")], false).unwrap().filter,
            "warn"
        );
        assert_eq!(
            settings(&[("OUTBOX_LOG", " ")], false).unwrap().filter,
            "info"
        );
    }

    #[test]
    fn a_bad_filter_names_its_variable() {
        for bad in ["infoo", "info,sqlx=lots", "outbox[", "warn,verbose"] {
            let err = settings(&[("OUTBOX_LOG", bad)], false).unwrap_err();
            assert!(
                matches!(
                    err,
                    LogError::Filter {
                        var: "OUTBOX_LOG",
                        ..
                    }
                ),
                "{bad}: {err}"
            );
            assert!(err.to_string().contains("OUTBOX_LOG"), "{err}");
        }
        let err = settings(&[("RUST_LOG", "lots")], false).unwrap_err();
        assert!(err.to_string().contains("RUST_LOG"), "{err}");
        for good in [
            "info",
            "WARN,sqlx=debug",
            "outbox_aws=trace",
            "off",
            "info,outbox[claim]=debug",
        ] {
            assert!(settings(&[("OUTBOX_LOG", good)], false).is_ok(), "{good}");
        }
    }

    #[test]
    fn colours_only_on_a_terminal_without_no_color_and_never_in_json() {
        assert!(settings(&[], true).unwrap().ansi);
        assert!(!settings(&[], false).unwrap().ansi);
        assert!(!settings(&[("NO_COLOR", "1")], true).unwrap().ansi);
        assert!(settings(&[("NO_COLOR", "")], true).unwrap().ansi);
        let json = settings(&[("OUTBOX_LOG_FORMAT", "JSON")], true).unwrap();
        assert_eq!(json.format, LogFormat::Json);
        assert!(!json.ansi);
        let err = settings(&[("OUTBOX_LOG_FORMAT", "yaml")], false).unwrap_err();
        assert!(err.to_string().contains("OUTBOX_LOG_FORMAT"), "{err}");
    }

    #[test]
    fn the_json_error_line_is_one_json_object() {
        let line = error_line(LogFormat::Json, "bad \"thing\"\nhappened");
        assert!(!line.contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["level"], "ERROR");
        assert_eq!(v["message"], "bad \"thing\"\nhappened");
        assert_eq!(error_line(LogFormat::Text, "x"), "error: x");
    }
}
