//! The `[nats]` section and `kind = "nats"` destinations, validated without connecting.

use std::time::Duration;

use outbox::config::Problems;
use outbox::registry::DestinationRef;
use outbox::Config;
use serde::{Deserialize, Serialize};

use outbox::publisher::template::{Placeholder, Template};

use crate::template::{parse_subject, SUBJECT_PLACEHOLDERS};

/// The kind this crate builds.
pub const KIND: &str = "nats";
/// The top-level section this crate reads.
pub const SECTION: &str = "nats";
/// The NATS server's default `max_payload` (1 MiB): the largest message (body and headers) a
/// default server accepts.
pub const DEFAULT_SERVER_MAX_PAYLOAD: usize = 1024 * 1024;

/// `[nats]`: the connection every `kind = "nats"` destination shares.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NatsSection {
    /// `nats://host:4222` (`tls://` for TLS); user and password may be in the URL (redacted
    /// whenever it is printed). Several servers of a cluster: comma-separated.
    pub url: String,
    /// An authentication token, when the server uses token auth (never printed).
    #[serde(default, skip_serializing)]
    pub token: Option<String>,
    /// Bounds connecting, each JetStream acknowledgement and each management request; must be
    /// shorter than `relay.publish_timeout`.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

fn default_timeout() -> Duration {
    Duration::from_secs(5)
}

/// What the message body holds: the core's choice, the same for every kind (`payload`,
/// `envelope` or `cloudevents`).
pub use outbox::publisher::BodyFormat;

/// `[destinations.NAME] kind = "nats"`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NatsDestination {
    /// The subject, a template: `{aggregate_type}` and `{event_type}` are replaced per event.
    pub subject: String,
    /// The JetStream stream that must capture the subjects: `check()` verifies it exists and
    /// `bootstrap` creates it. When absent, `check()` looks for any stream capturing the subjects
    /// and `bootstrap` names the stream `OUTBOX_<DESTINATION NAME>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<String>,
    /// `payload` (default) or `envelope`.
    #[serde(default)]
    pub body: BodyFormat,
    /// The largest message (body + headers) to send, in bytes; larger events are dead-lettered.
    /// The server's own `max_payload` applies too (whichever is lower).
    #[serde(default = "default_max_payload")]
    pub max_payload_bytes: usize,
}

fn default_max_payload() -> usize {
    DEFAULT_SERVER_MAX_PAYLOAD
}

impl NatsDestination {
    /// The parsed subject template (valid once the configuration passed validation).
    pub fn template(&self) -> Result<Template, String> {
        parse_subject(&self.subject)
    }

    /// The stream `bootstrap` creates for the destination `name`.
    pub fn stream_name(&self, name: &str) -> String {
        self.stream.clone().unwrap_or_else(|| {
            let cleaned: String = name
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                        c.to_ascii_uppercase()
                    } else {
                        '_'
                    }
                })
                .collect();
            format!("OUTBOX_{cleaned}")
        })
    }
}

/// The validated `[nats]` section and every `kind = "nats"` destination.
#[derive(Debug, Clone)]
pub struct NatsConfig {
    /// `[nats]`.
    pub section: NatsSection,
    /// `(name, destination)` in name order.
    pub destinations: Vec<(String, NatsDestination)>,
}

impl NatsConfig {
    /// Reads and validates; every problem at once, each naming its key and the fix.
    pub fn read(config: &Config, destinations: &[DestinationRef<'_>]) -> Result<Self, Problems> {
        let mut p = Problems::default();
        let section = match config.section::<NatsSection>(SECTION) {
            Ok(Some(s)) => {
                validate_section(&s, config, &mut p);
                Some(s)
            }
            Ok(None) if destinations.is_empty() => None,
            Ok(None) => {
                p.add(
                    "nats.url",
                    "missing: destinations of kind \"nats\" need a server",
                    "add a [nats] section with url = \"nats://127.0.0.1:4222\" (the server's address)",
                );
                None
            }
            Err(e) => {
                p.push(e);
                None
            }
        };
        let mut read = Vec::new();
        for d in destinations {
            match d.settings::<NatsDestination>() {
                Err(e) => p.push(e),
                Ok(dest) => {
                    validate_destination(d, &dest, &mut p);
                    read.push((d.name.to_owned(), dest));
                }
            }
        }
        match section {
            Some(section) if p.is_empty() => Ok(Self {
                section,
                destinations: read,
            }),
            _ => Err(p),
        }
    }
}

fn validate_section(s: &NatsSection, config: &Config, p: &mut Problems) {
    for server in s.url.split(',').map(str::trim) {
        let scheme_ok = ["nats://", "tls://", "ws://", "wss://"]
            .iter()
            .any(|scheme| server.starts_with(scheme));
        if !scheme_ok || server.len() < "nats://x".len() {
            p.add(
                "nats.url",
                format!(
                    "{:?} is not a NATS server URL",
                    outbox::config::redact_url(server)
                ),
                "use nats://HOST:PORT (tls://HOST:PORT for TLS), several separated by commas",
            );
        }
    }
    if s.timeout.is_zero() || s.timeout >= config.relay.publish_timeout {
        p.add(
            "nats.timeout",
            format!(
                "{:?} is not between 0 and relay.publish_timeout ({:?})",
                s.timeout, config.relay.publish_timeout
            ),
            "use a duration shorter than relay.publish_timeout, e.g. \"5s\", so that a slow server is reported as such rather than cut off",
        );
    }
}

/// Whether `token` can be part of a subject (no whitespace, no wildcard).
pub(crate) fn subject_problem(subject: &str) -> Option<&'static str> {
    if subject.is_empty() {
        Some("it is empty")
    } else if subject.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Some("it contains whitespace")
    } else if subject.split('.').any(|t| t == "*" || t == ">") {
        Some("it contains a wildcard (`*` or `>`), which cannot be published to")
    } else if subject.split('.').any(str::is_empty) {
        Some("it has an empty token (a leading, trailing or doubled `.`)")
    } else {
        None
    }
}

fn validate_destination(d: &DestinationRef<'_>, dest: &NatsDestination, p: &mut Problems) {
    match dest.template() {
        Err(problem) => p.add(
            d.key("subject"),
            problem,
            format!(
                "write the subject with the placeholders {}, e.g. \"outbox.{{aggregate_type}}.{{event_type}}\"",
                Placeholder::list(SUBJECT_PLACEHOLDERS)
            ),
        ),
        Ok(t) => {
            if let Some(problem) = subject_problem(&t.fill("x")) {
                p.add(
                    d.key("subject"),
                    format!("{:?} is not a valid subject: {problem}", dest.subject),
                    "use dot-separated tokens of letters, digits, `-` and `_`, e.g. \"outbox.{aggregate_type}.{event_type}\"",
                );
            }
        }
    }
    if let Some(stream) = &dest.stream {
        let bad = stream.is_empty()
            || stream.chars().any(|c| {
                c.is_whitespace() || c.is_control() || matches!(c, '.' | '*' | '>' | '/' | '\\')
            });
        if bad {
            p.add(
                d.key("stream"),
                format!("{stream:?} is not a valid JetStream stream name"),
                "use letters, digits, `-` and `_` (no `.`, `*`, `>`, `/` or spaces), e.g. \"OUTBOX\"",
            );
        }
    }
    if dest.body.is_binary() {
        p.add(
            d.key("body"),
            "\"cloudevents-binary\" is not supported by kind \"nats\" (the CloudEvents attributes are not mapped to NATS headers)",
            "use body = \"cloudevents\" (structured mode: the attributes and the data in one JSON body)",
        );
    }
    if dest.max_payload_bytes == 0 {
        p.add(
            d.key("max_payload_bytes"),
            "0 would refuse every event",
            "remove it (the default is the server's default max_payload, 1048576) or set the server's max_payload",
        );
    }
}
