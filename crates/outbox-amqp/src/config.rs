//! The `[rabbitmq]` section and `kind = "rabbitmq"` destinations, validated without connecting.

use std::time::Duration;

use outbox::config::Problems;
use outbox::registry::DestinationRef;
use outbox::Config;
use serde::{Deserialize, Serialize};

use outbox::publisher::template::{Placeholder, Template};

/// The kind this crate builds.
pub const KIND: &str = "rabbitmq";
/// The top-level section this crate reads.
pub const SECTION: &str = "rabbitmq";

/// `[rabbitmq]`: the connection every `kind = "rabbitmq"` destination shares.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RabbitSection {
    /// `amqp://user:password@host:5672/vhost` (the password is redacted whenever it is printed;
    /// the default vhost `/` is written `%2f`).
    pub url: String,
    /// Bounds connecting, each publisher confirm and each management call; must be shorter than
    /// `relay.publish_timeout`.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

fn default_timeout() -> Duration {
    Duration::from_secs(5)
}

/// What the message body holds: the core's choice, the same for every kind (`payload`,
/// `envelope` or `cloudevents`).
pub use outbox::publisher::BodyFormat;

/// `[destinations.NAME] kind = "rabbitmq"`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RabbitDestination {
    /// The exchange, a template (`{aggregate_type}`, `{event_type}`, `{aggregate_id}`); `""` is
    /// the default exchange (the routing key is then a queue name).
    pub exchange: String,
    /// The routing key, a template.
    pub routing_key: String,
    /// `payload` (default) or `envelope`.
    #[serde(default)]
    pub body: BodyFormat,
    /// The largest body to send, in bytes; larger events are dead-lettered. Keep it at most the
    /// broker's `max_message_size` (128 MiB by default).
    #[serde(default = "default_max_payload")]
    pub max_payload_bytes: usize,
}

fn default_max_payload() -> usize {
    16 * 1024 * 1024
}

/// The validated `[rabbitmq]` section and every `kind = "rabbitmq"` destination.
#[derive(Debug, Clone)]
pub struct RabbitConfig {
    /// `[rabbitmq]`.
    pub section: RabbitSection,
    /// `(name, destination)` in name order.
    pub destinations: Vec<(String, RabbitDestination)>,
}

impl RabbitConfig {
    /// Reads and validates; every problem at once, each naming its key and the fix.
    pub fn read(config: &Config, destinations: &[DestinationRef<'_>]) -> Result<Self, Problems> {
        let mut p = Problems::default();
        let section = match config.section::<RabbitSection>(SECTION) {
            Ok(Some(s)) => {
                validate_section(&s, config, &mut p);
                Some(s)
            }
            Ok(None) if destinations.is_empty() => None,
            Ok(None) => {
                p.add(
                    "rabbitmq.url",
                    "missing: destinations of kind \"rabbitmq\" need a broker",
                    "add a [rabbitmq] section with url = \"amqp://USER:PASSWORD@HOST:5672/%2f\"",
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
            match d.settings::<RabbitDestination>() {
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

fn validate_section(s: &RabbitSection, config: &Config, p: &mut Problems) {
    if !s.url.starts_with("amqp://") {
        p.add(
            "rabbitmq.url",
            format!(
                "{:?} is not a supported AMQP URL",
                outbox::config::redact_url(&s.url)
            ),
            "use amqp://USER:PASSWORD@HOST:5672/VHOST (amqps:// needs a build with TLS, which this one is not)",
        );
    }
    if s.timeout.is_zero() || s.timeout >= config.relay.publish_timeout {
        p.add(
            "rabbitmq.timeout",
            format!(
                "{:?} is not between 0 and relay.publish_timeout ({:?})",
                s.timeout, config.relay.publish_timeout
            ),
            "use a duration shorter than relay.publish_timeout, e.g. \"5s\"",
        );
    }
}

/// Why `name` cannot be an AMQP short string (exchange name, routing key, header name).
pub(crate) fn short_string_problem(name: &str) -> Option<&'static str> {
    if name.len() > 255 {
        Some("it is longer than 255 bytes")
    } else {
        None
    }
}

fn validate_destination(d: &DestinationRef<'_>, dest: &RabbitDestination, p: &mut Problems) {
    for (key, text) in [
        ("exchange", &dest.exchange),
        ("routing_key", &dest.routing_key),
    ] {
        match Template::parse(text, Placeholder::ALL) {
            Err(problem) => p.add(
                d.key(key),
                problem,
                format!(
                    "use the placeholders {}, e.g. routing_key = \"{{aggregate_type}}.{{event_type}}\"",
                    Placeholder::list(Placeholder::ALL)
                ),
            ),
            Ok(t) => {
                if let Some(problem) = short_string_problem(&t.fill("")) {
                    p.add(d.key(key), format!("{text:?}: {problem}"), "shorten it");
                }
                if key == "exchange" && t.fill("").starts_with("amq.") && !is_predeclared(&t.fill("")) {
                    p.add(
                        d.key(key),
                        format!("{text:?} starts with the reserved prefix `amq.`"),
                        "use another name (only the broker declares amq.* exchanges)",
                    );
                }
            }
        }
    }
    if dest.max_payload_bytes == 0 {
        p.add(
            d.key("max_payload_bytes"),
            "0 would refuse every event",
            "remove it (the default is 16777216) or give the largest body to send",
        );
    }
}

fn is_predeclared(name: &str) -> bool {
    matches!(
        name,
        "amq.direct" | "amq.fanout" | "amq.topic" | "amq.headers" | "amq.match"
    )
}
