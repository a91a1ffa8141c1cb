//! The typed `[kafka]` section and `kind = "kafka"` destinations, validated before anything
//! connects: every problem at once, each naming its key and the fix.

use std::collections::BTreeMap;
use std::time::Duration;

use outbox::config::Problems;
use outbox::publisher::template::{Placeholder, Template};
use outbox::registry::DestinationRef;
use outbox::Config;
use rdkafka::ClientConfig;
use serde::{Deserialize, Serialize};

/// Kafka's default `message.max.bytes` (broker) and librdkafka's default for the producer: 1 MiB.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1_000_000;
/// The largest value librdkafka accepts for `message.max.bytes`.
pub const LIBRDKAFKA_MAX_MESSAGE_BYTES: usize = 1_000_000_000;
/// The broker list when `[kafka] brokers` is not set: the loopback broker of `scripts/kafka.sh`.
pub const DEFAULT_BROKERS: &str = "127.0.0.1:19092";

/// Key names whose values are never shown (the core redacts the same in `outbox config`).
const SECRET_MARKERS: &[&str] = &["password", "secret", "token", "key.pem", "api_key"];

/// librdkafka properties the crate sets itself because the outbox's guarantees rest on them.
const RESERVED: &[(&str, &str)] = &[
    (
        "bootstrap.servers",
        "set the brokers with `kafka.brokers` instead",
    ),
    (
        "enable.idempotence",
        "the publisher always enables it: without it a producer retry can duplicate or reorder a key's events",
    ),
    (
        "acks",
        "the publisher always uses acks=all: an event is published only when every in-sync replica has it",
    ),
    (
        "message.max.bytes",
        "set the destination's `max_message_bytes` instead (it becomes the producer's limit)",
    ),
];

/// `[kafka]`: the cluster every `kind = "kafka"` destination of this program publishes to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSection {
    /// `bootstrap.servers`: comma-separated `host:port` list.
    #[serde(default = "default_brokers")]
    pub brokers: String,
    /// Extra librdkafka properties (`[kafka.properties]`), e.g. `"linger.ms" = 5`,
    /// `"security.protocol" = "sasl_plaintext"`, `"sasl.password" = "..."`.
    #[serde(default)]
    pub properties: BTreeMap<String, PropertyValue>,
}

impl Default for KafkaSection {
    fn default() -> Self {
        Self {
            brokers: default_brokers(),
            properties: BTreeMap::new(),
        }
    }
}

fn default_brokers() -> String {
    DEFAULT_BROKERS.to_owned()
}

/// A librdkafka property value as TOML writes it; librdkafka takes every value as text.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum PropertyValue {
    /// `"text"`
    Text(String),
    /// `5`
    Integer(i64),
    /// `true`
    Bool(bool),
    /// `0.5`
    Float(f64),
}

impl std::fmt::Display for PropertyValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Text(t) => f.write_str(t),
            Self::Integer(i) => write!(f, "{i}"),
            Self::Bool(b) => write!(f, "{b}"),
            Self::Float(x) => write!(f, "{x}"),
        }
    }
}

/// What a Kafka record's value contains: the core's choice, the same for every kind
/// (`payload`, `envelope` or `cloudevents`).
pub use outbox::publisher::BodyFormat;

/// `[destinations.NAME] kind = "kafka"`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaDestination {
    /// The topic, or a template with `{aggregate_type}` and `{event_type}`.
    pub topic: String,
    /// The record value: `payload` (default), `envelope` or `cloudevents`.
    #[serde(default)]
    pub body: BodyFormat,
    /// The largest record (value + key + headers) sent; a larger event is dead-lettered at once.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
}

fn default_max_message_bytes() -> usize {
    DEFAULT_MAX_MESSAGE_BYTES
}

impl KafkaDestination {
    /// Reads a destination's settings (unknown keys are errors).
    pub fn read(d: &DestinationRef<'_>) -> Result<Self, outbox::ConfigError> {
        d.settings()
    }

    /// The parsed topic template (a plain topic is a template without placeholders).
    pub fn topic_template(&self) -> Result<Template, String> {
        Template::parse(&self.topic, TOPIC_PLACEHOLDERS)
    }
}

/// Whether a key holds a secret whose value must never be shown.
pub fn is_secret(key: &str) -> bool {
    let lower = key.to_ascii_lowercase();
    SECRET_MARKERS.iter().any(|m| lower.contains(m))
}

/// The placeholders a topic template may use.
pub const TOPIC_PLACEHOLDERS: &[Placeholder] =
    &[Placeholder::AggregateType, Placeholder::EventType];

/// Why a topic (template) is not usable, if it is not.
pub fn topic_problem(template: &str) -> Option<String> {
    if template.is_empty() {
        return Some("the topic is empty".into());
    }
    // The text around the placeholders must itself be valid in a topic name.
    let literal = match Template::parse(template, TOPIC_PLACEHOLDERS) {
        Ok(parsed) => parsed.fill(""),
        Err(problem) => return Some(problem),
    };
    if let Some(bad) = literal.chars().find(|c| !is_topic_char(*c)) {
        return Some(format!(
            "{template:?} has {bad:?}, which Kafka refuses in a topic name"
        ));
    }
    if literal.len() > MAX_TOPIC_LEN {
        return Some(format!(
            "{template:?} is longer than {MAX_TOPIC_LEN} characters"
        ));
    }
    if template == "." || template == ".." {
        return Some(format!("{template:?} is not a topic name"));
    }
    None
}

/// Kafka's limit on a topic name's length.
pub const MAX_TOPIC_LEN: usize = 249;

/// Characters Kafka allows in a topic name.
pub fn is_topic_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// The whole Kafka side of a configuration, validated.
#[derive(Debug, Clone)]
pub struct KafkaConfig {
    /// `[kafka]`.
    pub section: KafkaSection,
    /// The `kind = "kafka"` destinations, by name.
    pub destinations: BTreeMap<String, KafkaDestination>,
    /// The relay's publish timeout: every Kafka timeout is set below it.
    pub publish_timeout: Duration,
}

impl KafkaConfig {
    /// Reads `[kafka]` and `destinations`, collecting every problem into `problems`; `None` when
    /// something could not be read.
    pub fn read(
        config: &Config,
        destinations: &[DestinationRef<'_>],
        problems: &mut Problems,
    ) -> Option<Self> {
        let section = match config.section::<KafkaSection>("kafka") {
            Ok(s) => s.unwrap_or_default(),
            Err(e) => {
                problems.push(e);
                return None;
            }
        };
        let mut read = BTreeMap::new();
        let mut unreadable = false;
        for d in destinations {
            match KafkaDestination::read(d) {
                Ok(k) => {
                    if let Some(problem) = topic_problem(&k.topic) {
                        problems.add(
                            d.key("topic"),
                            problem,
                            "use a topic name (letters, digits, `.`, `_`, `-`, up to 249) or a template with {aggregate_type} and {event_type}",
                        );
                    }
                    if k.max_message_bytes == 0
                        || k.max_message_bytes > LIBRDKAFKA_MAX_MESSAGE_BYTES
                    {
                        problems.add(
                            d.key("max_message_bytes"),
                            format!("{} is out of range", k.max_message_bytes),
                            format!("use 1 to {LIBRDKAFKA_MAX_MESSAGE_BYTES} (and at most the topic's max.message.bytes; omit it for Kafka's default of {DEFAULT_MAX_MESSAGE_BYTES})"),
                        );
                    }
                    read.insert(d.name.to_owned(), k);
                }
                Err(e) => {
                    problems.push(e);
                    unreadable = true;
                }
            }
        }
        let explicit_brokers = config
            .sections
            .get("kafka")
            .and_then(|v| v.as_dict())
            .is_some_and(|d| d.contains_key("brokers"));
        if !explicit_brokers && !config.profile.is_local() && !destinations.is_empty() {
            // The loopback default is for the local broker; a deployment must name its cluster.
            problems.add(
                "kafka.brokers",
                format!("not set for the `{}` profile", config.profile),
                format!("name the cluster in [{}.kafka] brokers = \"host:port,...\" (the default {DEFAULT_BROKERS} is for the local profile)", config.profile),
            );
        }
        let kafka = Self {
            section,
            destinations: read,
            publish_timeout: config.relay.publish_timeout,
        };
        kafka.section_problems(problems);
        (!unreadable).then_some(kafka)
    }

    fn section_problems(&self, problems: &mut Problems) {
        let brokers: Vec<&str> = self
            .section
            .brokers
            .split(',')
            .map(str::trim)
            .filter(|b| !b.is_empty())
            .collect();
        if brokers.is_empty() {
            problems.add(
                "kafka.brokers",
                "no broker is named",
                format!("list at least one as \"host:port\" (e.g. \"{DEFAULT_BROKERS}\", comma-separated for several)"),
            );
        }
        for broker in &brokers {
            let port_ok = broker
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !port_ok {
                problems.add(
                    "kafka.brokers",
                    format!("{broker:?} is not host:port"),
                    "write each broker as host:port, e.g. \"kafka-1:9092\"",
                );
            }
        }
        for (key, value) in &self.section.properties {
            if let Some((_, why)) = RESERVED.iter().find(|(k, _)| k == key) {
                // `acks = "all"` and `enable.idempotence = true` are what the crate sets anyway.
                let harmless = match key.as_str() {
                    "acks" => matches!(value.to_string().as_str(), "all" | "-1"),
                    "enable.idempotence" => value.to_string() == "true",
                    _ => false,
                };
                if !harmless {
                    problems.add(
                        format!("kafka.properties.\"{key}\""),
                        "the publisher sets this property itself".to_string(),
                        format!("remove it: {why}"),
                    );
                }
            }
        }
        let timeout_ms = self.publish_timeout.as_millis();
        for key in ["message.timeout.ms", "delivery.timeout.ms"] {
            let Some(value) = self.section.properties.get(key) else {
                continue;
            };
            match value.to_string().parse::<u128>() {
                Ok(ms) if ms > 0 && ms < timeout_ms => {}
                _ => problems.add(
                    format!("kafka.properties.\"{key}\""),
                    format!("{value} is not below relay.publish_timeout ({timeout_ms} ms)"),
                    "lower it (or raise relay.publish_timeout): a delivery still pending when the relay gives up would be reported by nobody",
                ),
            }
        }
        // librdkafka itself knows every property and its values: ask it, without connecting.
        // Reserved keys are left out (reported above), and so is `message.max.bytes`.
        let mut client = ClientConfig::new();
        for (key, value) in &self.section.properties {
            if !RESERVED.iter().any(|(k, _)| k == key) {
                client.set(key, value.to_string());
            }
        }
        if let Err(e) = client.create_native_config() {
            let (key, text) = match &e {
                rdkafka::error::KafkaError::ClientConfig(_, description, key, _value) => {
                    (key.clone(), description.clone())
                }
                other => (String::new(), other.to_string()),
            };
            // A secret's value is never echoed (librdkafka quotes the value it refuses).
            let text = match self.section.properties.get(&key) {
                Some(v) if is_secret(&key) && !v.to_string().is_empty() => {
                    text.replace(&v.to_string(), "<redacted>")
                }
                _ => text,
            };
            problems.add(
                format!("kafka.properties.\"{key}\""),
                format!("librdkafka refuses it: {text}"),
                "fix the name or value (see librdkafka's CONFIGURATION.md), or remove it",
            );
        }
    }

    /// The producer's configuration for `destination` (secrets included: never print it).
    pub fn producer_config(&self, destination: &KafkaDestination) -> ClientConfig {
        let mut client = ClientConfig::new();
        // Defaults first, so that `[kafka.properties]` can override them.
        let timeout = self.delivery_timeout();
        client
            .set("message.timeout.ms", timeout.as_millis().to_string())
            .set(
                "socket.timeout.ms",
                timeout.as_millis().clamp(10, 60_000).to_string(),
            )
            // A typo in a topic must not create a topic: the delivery fails as the destination's.
            .set("allow.auto.create.topics", "false")
            // Each wave of the engine waits for its deliveries: a long linger would add to every
            // wave, and librdkafka batches what accumulates while a request is in flight anyway.
            .set("linger.ms", "1");
        for (key, value) in &self.section.properties {
            client.set(key, value.to_string());
        }
        client
            .set("bootstrap.servers", &self.section.brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set(
                "message.max.bytes",
                // librdkafka counts the protocol overhead too; the crate checks the record first.
                (destination.max_message_bytes.saturating_add(64 * 1024))
                    .min(LIBRDKAFKA_MAX_MESSAGE_BYTES)
                    .to_string(),
            );
        client
    }

    /// How long librdkafka may try to deliver a message: below the relay's publish timeout, so
    /// that every delivery is reported before the relay stops waiting. librdkafka looks for
    /// timed-out messages about once a second, so a report can come up to ~1 s after this
    /// timeout: the default keeps ¾ of the publish timeout and at least 1.5 s below it.
    pub fn delivery_timeout(&self) -> Duration {
        let configured = self
            .section
            .properties
            .get("message.timeout.ms")
            .or_else(|| self.section.properties.get("delivery.timeout.ms"))
            .and_then(|v| v.to_string().parse::<u64>().ok())
            .map(Duration::from_millis);
        configured.unwrap_or_else(|| {
            (self.publish_timeout * 3 / 4)
                .min(
                    self.publish_timeout
                        .saturating_sub(Duration::from_millis(1500)),
                )
                .max(Duration::from_millis(500))
        })
    }

    /// `[kafka]` for display: the brokers, and properties with secrets redacted.
    pub fn describe_section(&self) -> serde_json::Value {
        let properties: serde_json::Map<String, serde_json::Value> = self
            .section
            .properties
            .iter()
            .map(|(k, v)| {
                let shown = if is_secret(k) {
                    "<redacted>".to_owned()
                } else {
                    v.to_string()
                };
                (k.clone(), serde_json::Value::String(shown))
            })
            .collect();
        serde_json::json!({ "brokers": self.section.brokers, "properties": properties })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_templates_are_checked() {
        assert_eq!(topic_problem("orders"), None);
        assert_eq!(topic_problem("outbox.{aggregate_type}.{event_type}"), None);
        assert!(topic_problem("").is_some());
        assert!(topic_problem("a b").unwrap().contains("' '"));
        assert!(topic_problem("x.{aggregate}")
            .unwrap()
            .contains("{aggregate}"));
        assert!(topic_problem("x.{event_type").unwrap().contains("without"));
        assert!(topic_problem(&"a".repeat(250)).is_some());
    }

    fn section_problems(properties: &[(&str, PropertyValue)]) -> String {
        let kafka = KafkaConfig {
            section: KafkaSection {
                brokers: DEFAULT_BROKERS.into(),
                properties: properties
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), v.clone()))
                    .collect(),
            },
            destinations: BTreeMap::new(),
            publish_timeout: Duration::from_secs(10),
        };
        let mut p = Problems::default();
        kafka.section_problems(&mut p);
        p.into_result()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn librdkafka_validates_properties_without_connecting() {
        let text = |s: &str| PropertyValue::Text(s.into());
        assert_eq!(
            section_problems(&[("linger.ms", PropertyValue::Integer(5))]),
            ""
        );
        assert_eq!(section_problems(&[("acks", text("all"))]), "");
        // No OpenSSL is linked (deny.toml bans openssl-sys): TLS is refused before anything runs.
        let tls = section_problems(&[("security.protocol", text("sasl_ssl"))]);
        assert!(tls.contains("security.protocol"), "{tls}");
        let timeout = section_problems(&[("message.timeout.ms", PropertyValue::Integer(10_000))]);
        assert!(timeout.contains("relay.publish_timeout"), "{timeout}");
    }

    #[test]
    fn secrets_are_recognised() {
        assert!(is_secret("sasl.password"));
        assert!(is_secret("sasl.oauthbearer.client.secret"));
        assert!(is_secret("ssl.key.pem"));
        assert!(!is_secret("sasl.username"));
    }
}
