//! `kind = "webhook"` destinations, validated without connecting.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine as _;
use outbox::config::Problems;
use outbox::registry::DestinationRef;
use outbox::Config;
use reqwest::header::{HeaderName, HeaderValue};
use serde::{Deserialize, Serialize, Serializer};

use crate::template::{Template, PLACEHOLDERS};

/// The kind this crate builds.
pub const KIND: &str = "webhook";
/// The default of `max_body_bytes`: 1 MiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;
/// The prefix Standard Webhooks secrets are written with (`whsec_<base64>`).
pub const SECRET_PREFIX: &str = "whsec_";
/// The shortest and longest secret (decoded bytes) the Standard Webhooks specification allows.
pub const SECRET_BYTES: std::ops::RangeInclusive<usize> = 24..=64;

/// What the request body holds: the core's choice, the same for every kind (`payload`,
/// `envelope`, `cloudevents` or `cloudevents-binary`).
pub use outbox::publisher::BodyFormat;

/// One event per request, or several.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// One request per event (`webhook-id` = the event id).
    #[default]
    Single,
    /// A JSON array of envelopes or CloudEvents per request, at most one event per key, bounded
    /// by `max_batch_events` and `max_body_bytes`.
    Batch,
}

/// `[destinations.NAME] kind = "webhook"`.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookDestination {
    /// The endpoint, `https://` (or `http://`): a fixed URL, or a template with
    /// `{aggregate_type}` and `{event_type}` (their values are percent-encoded). A password or
    /// query values in it are redacted whenever it is printed.
    #[serde(serialize_with = "redacted_url")]
    pub url: String,
    /// `payload` (default), `envelope`, `cloudevents` (structured) or `cloudevents-binary`
    /// (`ce-` headers, the payload as the body). Batch mode takes `envelope` or `cloudevents`.
    #[serde(default)]
    pub body: BodyFormat,
    /// `single` (default) or `batch`.
    #[serde(default)]
    pub mode: Mode,
    /// The Standard Webhooks signing secret, `whsec_<base64>` (the prefix is optional), 24 to 64
    /// bytes once decoded. Never printed.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "redacted_secret"
    )]
    pub secret: Option<String>,
    /// Static headers added to every request (e.g. `Authorization`); the values of
    /// authorization, cookie, token, key and secret headers are never printed.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        serialize_with = "redacted_headers"
    )]
    pub headers: BTreeMap<String, String>,
    /// Bounds each request (connecting, sending, the answer); shorter than
    /// `relay.publish_timeout`.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// The largest request body; a larger event is dead-lettered with the reason.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// Batch mode: most events per request.
    #[serde(default = "default_max_batch_events")]
    pub max_batch_events: usize,
    /// Requests in flight at once to this destination.
    #[serde(default = "default_max_concurrency")]
    pub max_concurrency: usize,
    /// The longest `Retry-After` honoured: a longer one is cut to it.
    #[serde(default = "default_max_retry_after", with = "humantime_serde")]
    pub max_retry_after: Duration,
}

impl std::fmt::Debug for WebhookDestination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookDestination")
            .field("url", &outbox::config::redact_url(&self.url))
            .field("body", &self.body)
            .field("mode", &self.mode)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("timeout", &self.timeout)
            .field("max_body_bytes", &self.max_body_bytes)
            .finish_non_exhaustive()
    }
}

impl WebhookDestination {
    /// A destination to `url` with every default.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            body: BodyFormat::default(),
            mode: Mode::default(),
            secret: None,
            headers: BTreeMap::new(),
            timeout: default_timeout(),
            max_body_bytes: default_max_body_bytes(),
            max_batch_events: default_max_batch_events(),
            max_concurrency: default_max_concurrency(),
            max_retry_after: default_max_retry_after(),
        }
    }

    /// The parsed URL template.
    pub fn template(&self) -> Result<Template, String> {
        Template::parse(&self.url)
    }

    /// The signing key, decoded from `secret`.
    pub fn secret_key(&self) -> Result<Option<Vec<u8>>, SecretError> {
        self.secret.as_deref().map(decode_secret).transpose()
    }
}

fn default_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_max_body_bytes() -> usize {
    DEFAULT_MAX_BODY_BYTES
}
fn default_max_batch_events() -> usize {
    100
}
fn default_max_concurrency() -> usize {
    32
}
fn default_max_retry_after() -> Duration {
    Duration::from_secs(300)
}

fn redacted_url<S: Serializer>(url: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&outbox::config::redact_url(url))
}

fn redacted_secret<S: Serializer>(secret: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match secret {
        Some(_) => s.serialize_str("<redacted>"),
        None => s.serialize_none(),
    }
}

fn redacted_headers<S: Serializer>(
    headers: &BTreeMap<String, String>,
    s: S,
) -> Result<S::Ok, S::Error> {
    let shown: BTreeMap<&str, &str> = headers
        .iter()
        .map(|(name, value)| {
            let value = if is_secret_header(name) {
                "<redacted>"
            } else {
                value.as_str()
            };
            (name.as_str(), value)
        })
        .collect();
    shown.serialize(s)
}

/// Whether a header's value is a credential that must never be printed.
pub fn is_secret_header(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    [
        "authorization",
        "cookie",
        "token",
        "key",
        "secret",
        "password",
        "signature",
    ]
    .iter()
    .any(|marker| lower.contains(marker))
}

/// Why a signing secret is unusable (its value is never part of the message).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    /// Not base64.
    #[error("it is not base64 after the optional `whsec_` prefix")]
    NotBase64,
    /// Too short or too long once decoded.
    #[error("it decodes to {0} bytes; Standard Webhooks secrets are 24 to 64 bytes")]
    Length(usize),
}

/// Decodes a Standard Webhooks secret: `whsec_` (optional) then base64.
pub fn decode_secret(secret: &str) -> Result<Vec<u8>, SecretError> {
    let encoded = secret.strip_prefix(SECRET_PREFIX).unwrap_or(secret);
    let key = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|_| SecretError::NotBase64)?;
    if SECRET_BYTES.contains(&key.len()) {
        Ok(key)
    } else {
        Err(SecretError::Length(key.len()))
    }
}

/// Headers the publisher writes itself, or that belong to the connection: not settable in
/// `headers`, and not copied from an event's headers.
pub fn reserved_header(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    matches!(
        lower.as_str(),
        "host"
            | "content-length"
            | "content-type"
            | "transfer-encoding"
            | "connection"
            | "keep-alive"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "upgrade"
            | "expect"
            | "webhook-id"
            | "webhook-timestamp"
            | "webhook-signature"
    ) || lower.starts_with("outbox-")
        || lower.starts_with("ce-")
}

/// All `kind = "webhook"` destinations, validated.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// `(name, destination)` in name order.
    pub destinations: Vec<(String, WebhookDestination)>,
}

impl WebhookConfig {
    /// Reads and validates; every problem at once, each naming its key and the fix.
    pub fn read(config: &Config, destinations: &[DestinationRef<'_>]) -> Result<Self, Problems> {
        let mut p = Problems::default();
        let mut read = Vec::new();
        for d in destinations {
            match d.settings::<WebhookDestination>() {
                Err(e) => p.push(e),
                Ok(dest) => {
                    validate(d, &dest, config, &mut p);
                    read.push((d.name.to_owned(), dest));
                }
            }
        }
        if p.is_empty() {
            Ok(Self { destinations: read })
        } else {
            Err(p)
        }
    }
}

fn validate(d: &DestinationRef<'_>, dest: &WebhookDestination, config: &Config, p: &mut Problems) {
    match dest.template() {
        Err(problem) => p.add(
            d.key("url"),
            problem,
            format!("write the URL with the placeholders {PLACEHOLDERS}, e.g. \"https://hooks.example.com/outbox/{{event_type}}\""),
        ),
        Ok(t) => match reqwest::Url::parse(&t.fill("x")) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.host_str().is_some() => {
                if url.fragment().is_some() {
                    p.add(
                        d.key("url"),
                        "it has a `#fragment`, which is never sent",
                        "remove the `#...` part",
                    );
                }
            }
            Ok(_) | Err(_) => p.add(
                d.key("url"),
                format!("{:?} is not an http(s) URL", outbox::config::redact_url(&dest.url)),
                "use https://HOST[:PORT]/PATH (http:// only for a receiver on a trusted network)",
            ),
        },
    }
    match (dest.mode, dest.body) {
        (Mode::Batch, BodyFormat::Payload) => p.add(
            d.key("body"),
            "batch mode with body = \"payload\" would send bare payloads, which a receiver cannot tell apart or deduplicate",
            "use body = \"envelope\" (an array of envelopes) or \"cloudevents\" (a CloudEvents JSON batch)",
        ),
        (Mode::Batch, BodyFormat::CloudeventsBinary) => p.add(
            d.key("body"),
            "binary mode carries one event's attributes in the request headers: it cannot batch",
            "use body = \"cloudevents\" with mode = \"batch\" (a CloudEvents JSON batch), or mode = \"single\"",
        ),
        _ => {}
    }
    if let Err(e) = dest.secret_key() {
        p.add(
            d.key("secret"),
            format!("the signing secret is unusable: {e}"),
            "use a Standard Webhooks secret: whsec_ then 24 to 64 random bytes in base64, e.g. `echo whsec_$(openssl rand -base64 32)`",
        );
    }
    for (name, value) in &dest.headers {
        let key = d.key(&format!("headers.\"{name}\""));
        if HeaderName::from_bytes(name.as_bytes()).is_err() {
            p.add(
                key,
                "not a valid HTTP header name",
                "use letters, digits and `-` (RFC 9110 token characters)",
            );
        } else if reserved_header(name) {
            p.add(
                key,
                "the publisher sets this header itself (or it belongs to the connection)",
                "remove it: content-type, webhook-*, ce-* and outbox-* headers are written per request",
            );
        } else if HeaderValue::from_str(value).is_err() {
            p.add(
                key,
                "the value has a line break or another control character",
                "use printable ASCII",
            );
        }
    }
    if dest.timeout.is_zero() || dest.timeout >= config.relay.publish_timeout {
        p.add(
            d.key("timeout"),
            format!(
                "{:?} is not between 0 and relay.publish_timeout ({:?})",
                dest.timeout, config.relay.publish_timeout
            ),
            "use a duration shorter than relay.publish_timeout, e.g. \"5s\", so that a slow receiver is reported as such rather than cut off",
        );
    }
    if dest.max_body_bytes < 2 {
        p.add(
            d.key("max_body_bytes"),
            format!("{} would refuse every event", dest.max_body_bytes),
            format!("remove it (the default is {DEFAULT_MAX_BODY_BYTES}) or give the largest body the receiver accepts"),
        );
    }
    if !(1..=10_000).contains(&dest.max_batch_events) {
        p.add(
            d.key("max_batch_events"),
            format!("{} is out of range", dest.max_batch_events),
            "use 1 to 10000 (omit it for 100)",
        );
    }
    if !(1..=1024).contains(&dest.max_concurrency) {
        p.add(
            d.key("max_concurrency"),
            format!("{} is out of range", dest.max_concurrency),
            "use 1 to 1024 (omit it for 32)",
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_decode_with_or_without_the_prefix() {
        let key = [7u8; 32];
        let b64 = base64::engine::general_purpose::STANDARD.encode(key);
        assert_eq!(decode_secret(&format!("whsec_{b64}")).unwrap(), key);
        assert_eq!(decode_secret(&b64).unwrap(), key);
        assert_eq!(decode_secret("whsec_%%%"), Err(SecretError::NotBase64));
        assert_eq!(decode_secret("whsec_AAAA"), Err(SecretError::Length(3)));
    }

    #[test]
    fn secret_headers_and_reserved_headers() {
        assert!(is_secret_header("Authorization") && is_secret_header("X-Api-Key"));
        assert!(!is_secret_header("X-Tenant"));
        assert!(reserved_header("Webhook-Signature") && reserved_header("ce-id"));
        assert!(!reserved_header("traceparent") && !reserved_header("x-tenant"));
    }
}
