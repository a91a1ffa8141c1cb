//! The webhook publisher: an HTTP `POST` per event (or per batch), signed the Standard Webhooks
//! way, classified by the answer.
//!
//! - **Order**: the core's wave engine ([`outbox::publisher::batch`]) sends at most one event per
//!   key at a time; a key's next event goes out only after the receiver answered 2xx for the
//!   previous one, and never after it failed.
//! - **Answers**: 2xx = published; 408, 429, 5xx, 3xx (redirects are not followed: a `POST`
//!   would become a `GET`), connection errors and timeouts = the destination's failure
//!   ([`PublishError::Unavailable`]: no attempt is charged, the relay holds the destination's
//!   events and probes it); any other 4xx = this event's permanent failure, with the status and
//!   the start of the answer's body in the reason.
//! - **`Retry-After`** (seconds or an HTTP date) on a 408, 429 or 5xx: the destination is *held*
//!   until then (at most `max_retry_after`): every publish before that answers `Unavailable`
//!   at once without contacting the receiver, so the relay's probes do not hit it early. The
//!   relay's own probe backoff still applies on top (the next probe after the hold ends).
//! - **Headers** (single mode): `webhook-id` = the event id (receivers deduplicate on it),
//!   `webhook-timestamp`, `webhook-signature` (with a `secret`), `outbox-event-id`,
//!   `outbox-event-type`, `outbox-aggregate-type`, `outbox-aggregate-id`, the event's own headers
//!   (`traceparent`, `tracestate`, ...; names the publisher writes itself, or invalid in HTTP, are
//!   dropped), then in binary mode the CloudEvent attributes as `ce-` headers, then the static
//!   `headers` of the destination.

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use base64::Engine as _;
use futures_util::future::join_all;
use outbox::publisher::batch::{publish_in_waves, Prepared, RequestFailure, Sink};
use outbox::publisher::{cloudevent_attributes, BodyFormat, CLOUDEVENTS_DATA_CONTENT_TYPE};
use outbox::{OutboxEvent, PublishError, PublishResult, Publisher};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use reqwest::{StatusCode, Url};
use ring::{digest, hmac};
use tokio::sync::Semaphore;

use crate::config::{reserved_header, Mode, WebhookDestination};
use crate::template::Template;

/// Header: the message id (the event id; in batch mode, see [`batch_id`]).
pub const WEBHOOK_ID: &str = "webhook-id";
/// Header: when the request was signed, in Unix seconds.
pub const WEBHOOK_TIMESTAMP: &str = "webhook-timestamp";
/// Header: `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`.
pub const WEBHOOK_SIGNATURE: &str = "webhook-signature";
/// Header (batch mode): how many events the array holds.
pub const HEADER_BATCH_SIZE: &str = "outbox-batch-size";
/// The prefix of the CloudEvent attribute headers in binary mode (the CloudEvents HTTP binding).
pub const CE_HEADER_PREFIX: &str = "ce-";
/// How much of a refusing answer's body goes into the reason.
pub const REASON_BODY_BYTES: usize = 512;

/// The content type of a structured CloudEvent.
const CLOUDEVENTS_JSON: &str = "application/cloudevents+json";
/// The content type of a CloudEvents JSON batch.
const CLOUDEVENTS_BATCH_JSON: &str = "application/cloudevents-batch+json";

/// The Standard Webhooks signature of a message: `v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>`.
pub fn sign(key: &hmac::Key, id: &str, timestamp: u64, body: &[u8]) -> String {
    let mut context = hmac::Context::with_key(key);
    context.update(id.as_bytes());
    context.update(b".");
    context.update(timestamp.to_string().as_bytes());
    context.update(b".");
    context.update(body);
    let tag = context.sign();
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(tag.as_ref())
    )
}

/// The `webhook-id` of a batch request: `batch_` and the first 128 bits of the SHA-256 of its
/// event ids in order, so the same events in the same order (a request sent again) keep the id,
/// and another composition gets another one. Receivers of batches deduplicate per element too.
pub fn batch_id<'a>(event_ids: impl IntoIterator<Item = &'a str>) -> String {
    let mut context = digest::Context::new(&digest::SHA256);
    for id in event_ids {
        context.update(id.as_bytes());
        context.update(b"\n");
    }
    let hash = context.finish();
    let hex: String = hash.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("batch_{hex}")
}

/// `value` percent-encoded as the CloudEvents HTTP binding asks of `ce-` header values: every
/// byte outside printable ASCII, and space, `"` and `%`.
pub fn ce_header_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if (0x21..=0x7e).contains(&byte) && byte != b'"' && byte != b'%' {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// A header value as is when HTTP can carry it, else percent-encoded like a `ce-` value.
fn header_value(value: &str) -> HeaderValue {
    HeaderValue::from_str(value).unwrap_or_else(|_| {
        // Percent-encoded text is printable ASCII: always a valid value.
        HeaderValue::from_str(&ce_header_value(value)).unwrap_or(HeaderValue::from_static(""))
    })
}

/// The headers of `event` in single mode (before the signature and the static headers), and the
/// names of the event's own headers left out.
pub fn event_headers(event: &OutboxEvent, body: BodyFormat) -> (HeaderMap, Vec<String>) {
    let mut headers = HeaderMap::new();
    let id = event.id.to_string();
    let content_type = match body {
        BodyFormat::Cloudevents => CLOUDEVENTS_JSON,
        BodyFormat::CloudeventsBinary => CLOUDEVENTS_DATA_CONTENT_TYPE,
        _ => "application/json",
    };
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(WEBHOOK_ID, header_value(&id));
    for (name, value) in outbox::publisher::headers::identity(event) {
        headers.insert(name, header_value(&value));
    }
    let mut dropped = Vec::new();
    for (name, value) in &event.headers {
        match (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            (Ok(n), Ok(v)) if !reserved_header(name) => {
                headers.insert(n, v);
            }
            _ => dropped.push(name.clone()),
        }
    }
    if body.is_binary() {
        for (attribute, value) in cloudevent_attributes(event) {
            if let Ok(name) =
                HeaderName::from_bytes(format!("{CE_HEADER_PREFIX}{attribute}").as_bytes())
            {
                headers.insert(name, header_value(&ce_header_value(&value)));
            }
        }
    }
    (headers, dropped)
}

/// Until when the receiver asked not to be contacted (`Retry-After`).
#[derive(Debug, Clone)]
struct Hold {
    until: Instant,
    reason: String,
}

/// Publishes to one `kind = "webhook"` destination.
pub struct WebhookPublisher {
    name: String,
    config: WebhookDestination,
    url: Template,
    client: reqwest::Client,
    key: Option<hmac::Key>,
    static_headers: HeaderMap,
    in_flight: Semaphore,
    hold: Mutex<Option<Hold>>,
}

impl std::fmt::Debug for WebhookPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookPublisher")
            .field("name", &self.name)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Why a webhook publisher could not be built.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// The destination's settings are invalid (validation reports them first).
    #[error("invalid destination: {0}")]
    Config(String),
    /// The HTTP client could not be set up (its TLS configuration).
    #[error("the HTTP client could not be built: {0}")]
    Client(String),
}

/// What one request came to.
enum Answer {
    Published,
    /// The destination's failure (with the reason).
    Unavailable(String),
    /// The receiver refused the content (another 4xx).
    Refused(String),
}

impl WebhookPublisher {
    /// A publisher for the destination `name` (validated).
    pub fn new(name: &str, config: WebhookDestination) -> Result<Self, WebhookError> {
        let url = config.template().map_err(WebhookError::Config)?;
        // Checked once here for a literal URL (each event's URL is checked only for a template).
        if url.is_literal() && Url::parse(&url.fill("")).is_err() {
            return Err(WebhookError::Config(format!(
                "destinations.{name}.url is not a valid URL"
            )));
        }
        let key = config
            .secret_key()
            .map_err(|e| WebhookError::Config(format!("destinations.{name}.secret: {e}")))?
            .map(|k| hmac::Key::new(hmac::HMAC_SHA256, &k));
        let mut static_headers = HeaderMap::new();
        for (n, v) in &config.headers {
            let name_ok = HeaderName::from_bytes(n.as_bytes());
            let value_ok = HeaderValue::from_str(v);
            match (name_ok, value_ok) {
                (Ok(n), Ok(v)) if !reserved_header(n.as_str()) => {
                    static_headers.insert(n, v);
                }
                _ => {
                    return Err(WebhookError::Config(format!(
                        "destinations.{name}.headers.\"{n}\" is not a header the publisher can send"
                    )))
                }
            }
        }
        let client = client_builder()?
            .timeout(config.timeout)
            .connect_timeout(config.timeout)
            .build()
            .map_err(|e| WebhookError::Client(e.to_string()))?;
        Ok(Self {
            name: name.to_owned(),
            in_flight: Semaphore::new(config.max_concurrency.max(1)),
            url,
            client,
            key,
            static_headers,
            config,
            hold: Mutex::new(None),
        })
    }

    /// The destination's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn redacted(url: &str) -> String {
        outbox::config::redact_url(url)
    }

    /// The reason to report while the receiver's `Retry-After` runs, if it does.
    fn held(&self) -> Option<String> {
        let mut hold = self.hold.lock().unwrap_or_else(|e| e.into_inner());
        match hold.as_ref() {
            Some(h) if Instant::now() < h.until => Some(format!(
                "{} (holding for another {:?} as the receiver asked with Retry-After; not sent)",
                h.reason,
                h.until.saturating_duration_since(Instant::now())
            )),
            Some(_) => {
                *hold = None;
                None
            }
            None => None,
        }
    }

    fn hold_for(&self, delay: Duration, reason: &str) {
        let delay = delay.min(self.config.max_retry_after);
        if delay.is_zero() {
            return;
        }
        let until = Instant::now() + delay;
        let mut hold = self.hold.lock().unwrap_or_else(|e| e.into_inner());
        if hold.as_ref().is_none_or(|h| h.until < until) {
            *hold = Some(Hold {
                until,
                reason: reason.to_owned(),
            });
        }
    }

    /// Sends one request and classifies the answer.
    async fn post(&self, url: &str, id: &str, body: &[u8], mut headers: HeaderMap) -> Answer {
        if let Some(reason) = self.held() {
            return Answer::Unavailable(reason);
        }
        let Ok(_permit) = self.in_flight.acquire().await else {
            return Answer::Unavailable("the publisher is closing".into());
        };
        // Another request may have met a Retry-After while this one waited for its turn.
        if let Some(reason) = self.held() {
            return Answer::Unavailable(reason);
        }
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        headers.insert(WEBHOOK_ID, header_value(id));
        headers.insert(WEBHOOK_TIMESTAMP, HeaderValue::from(timestamp));
        if let Some(key) = &self.key {
            headers.insert(
                WEBHOOK_SIGNATURE,
                header_value(&sign(key, id, timestamp, body)),
            );
        }
        for (name, value) in &self.static_headers {
            headers.insert(name.clone(), value.clone());
        }
        let sent = self
            .client
            .post(url)
            .headers(headers)
            .body(body.to_vec())
            .send()
            .await;
        let response = match sent {
            Ok(r) => r,
            Err(e) => {
                let why = if e.is_timeout() {
                    format!("did not answer within {:?}", self.config.timeout)
                } else if e.is_connect() {
                    format!("cannot be reached ({})", error_chain(&e))
                } else {
                    format!("failed ({})", error_chain(&e))
                };
                return Answer::Unavailable(format!(
                    "webhook {} {why}: is the receiver up, and destinations.{}.url right?",
                    Self::redacted(url),
                    self.name
                ));
            }
        };
        let status = response.status();
        if status.is_success() {
            return Answer::Published;
        }
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let location = response
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(Self::redacted);
        let snippet = body_snippet(response).await;
        // Only for answers that are not 2xx: redacting parses the URL.
        let answered = format!(
            "webhook {} answered {}{snippet}",
            Self::redacted(url),
            status_text(status)
        );
        if status == StatusCode::REQUEST_TIMEOUT
            || status == StatusCode::TOO_MANY_REQUESTS
            || status.is_server_error()
        {
            if let Some(delay) = retry_after {
                self.hold_for(delay, &answered);
                return Answer::Unavailable(format!(
                    "{answered} (Retry-After: {}s)",
                    delay.min(self.config.max_retry_after).as_secs()
                ));
            }
            return Answer::Unavailable(answered);
        }
        if status.is_redirection() {
            return Answer::Unavailable(format!(
                "{answered}: redirects are not followed (a redirected POST may lose its body); set destinations.{}.url to {}",
                self.name,
                location.unwrap_or_else(|| "the new location".into())
            ));
        }
        if status.is_client_error() {
            return Answer::Refused(answered);
        }
        Answer::Unavailable(answered)
    }

    /// The URL `check()` contacts: the destination's URL, or its origin for a template.
    fn check_url(&self) -> Result<(String, bool), PublishError> {
        if self.url.is_literal() {
            return Ok((self.url.fill(""), true));
        }
        let url = Url::parse(&self.url.fill("x")).map_err(|e| {
            PublishError::permanent(format!("destinations.{}.url is not a URL: {e}", self.name))
        })?;
        Ok((format!("{}/", url.origin().ascii_serialization()), false))
    }
}

/// The publisher's HTTP client set-up, before its timeouts: its user agent, no redirects (a
/// redirected POST may become a GET without a body: a redirect is an answer to fix), and TLS
/// with certificate verification against Mozilla's roots on `ring`. reqwest is built without a
/// default crypto provider, so a program that posts to the same receivers (a test, the
/// benchmark) starts from this.
pub fn client_builder() -> Result<reqwest::ClientBuilder, WebhookError> {
    Ok(reqwest::Client::builder()
        .user_agent(concat!("outbox-relay/", env!("CARGO_PKG_VERSION")))
        .redirect(reqwest::redirect::Policy::none())
        .use_preconfigured_tls(tls_config()?))
}

/// TLS with certificate verification against Mozilla's roots (webpki-roots), on the `ring`
/// provider; HTTP/1.1.
fn tls_config() -> Result<rustls::ClientConfig, WebhookError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| WebhookError::Client(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// An error with its sources (reqwest's own message is terse: "error sending request").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn status_text(status: StatusCode) -> String {
    match status.canonical_reason() {
        Some(reason) => format!("HTTP {} {reason}", status.as_u16()),
        None => format!("HTTP {}", status.as_u16()),
    }
}

/// `: "<the start of the body>"`, or nothing for an empty body.
async fn body_snippet(mut response: reqwest::Response) -> String {
    let mut bytes = Vec::new();
    while bytes.len() <= REASON_BODY_BYTES {
        match response.chunk().await {
            Ok(Some(chunk)) => bytes.extend_from_slice(&chunk),
            Ok(None) | Err(_) => break,
        }
    }
    if bytes.is_empty() {
        return String::new();
    }
    let cut = bytes.len() > REASON_BODY_BYTES;
    bytes.truncate(REASON_BODY_BYTES);
    let text = String::from_utf8_lossy(&bytes);
    let text: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    format!(
        ": {:?}{}",
        text.trim(),
        if cut { " (truncated)" } else { "" }
    )
}

/// `Retry-After`: a number of seconds, or an HTTP date (a date in the past is no delay).
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let date = httpdate::parse_http_date(value).ok()?;
    Some(date.duration_since(SystemTime::now()).unwrap_or_default())
}

/// One event ready to send.
#[derive(Debug, Clone)]
pub struct WebhookEntry {
    id: String,
    url: String,
    body: std::sync::Arc<[u8]>,
    headers: HeaderMap,
}

struct Wave<'a> {
    publisher: &'a WebhookPublisher,
}

#[async_trait]
impl Sink for Wave<'_> {
    type Entry = WebhookEntry;

    fn max_entries(&self) -> usize {
        match self.publisher.config.mode {
            Mode::Single => 1,
            Mode::Batch => self.publisher.config.max_batch_events,
        }
    }

    fn max_request_bytes(&self) -> usize {
        // Batch: `[` + entries each followed by `,` (the last one's is the `]`).
        self.publisher.config.max_body_bytes.saturating_sub(1)
    }

    async fn prepare(&self, event: &OutboxEvent) -> Result<Prepared<WebhookEntry>, PublishError> {
        let p = self.publisher;
        let url = p.url.render(event);
        // A literal URL was checked with the configuration; a template's result is checked here.
        if !p.url.is_literal() && Url::parse(&url).is_err() {
            return Err(PublishError::permanent(format!(
                "event {} gives the URL {:?} (destinations.{}.url), which is not a valid URL; change the template",
                event.id,
                WebhookPublisher::redacted(&url),
                p.name
            )));
        }
        let body = p.config.body.render(event);
        let batch = p.config.mode == Mode::Batch;
        let request_bytes = if batch { body.len() + 2 } else { body.len() };
        if request_bytes > p.config.max_body_bytes {
            return Err(PublishError::permanent(format!(
                "event {} makes a request body of {request_bytes} bytes, over the limit of {} bytes of destination `{}` \
                 (destinations.{}.max_body_bytes): make the event smaller, or raise the limit if the receiver accepts more",
                event.id, p.config.max_body_bytes, p.name, p.name
            )));
        }
        let headers = if batch {
            HeaderMap::new()
        } else {
            let (headers, dropped) = event_headers(event, p.config.body);
            if !dropped.is_empty() {
                tracing::debug!(id = %event.id, ?dropped, "headers not carried as HTTP headers");
            }
            headers
        };
        let size = body.len() + 1;
        Ok(Prepared {
            entry: WebhookEntry {
                id: event.id.to_string(),
                url,
                body: std::sync::Arc::from(body.into_bytes()),
                headers,
            },
            size,
        })
    }

    async fn send(
        &self,
        entries: &[(String, WebhookEntry)],
    ) -> Result<Vec<PublishResult>, RequestFailure> {
        let p = self.publisher;
        if p.config.mode == Mode::Single {
            let sends = entries.iter().map(|(_, e)| async move {
                match p.post(&e.url, &e.id, &e.body, e.headers.clone()).await {
                    Answer::Published => Ok(()),
                    Answer::Unavailable(reason) => Err(PublishError::unavailable(reason)),
                    Answer::Refused(reason) => Err(PublishError::permanent(format!(
                        "the receiver refused event {}: {reason}",
                        e.id
                    ))),
                }
            });
            return Ok(join_all(sends).await);
        }
        // Batch: one request per URL (a template may name several), in wave order.
        let mut groups: Vec<(&str, Vec<usize>)> = Vec::new();
        for (i, (_, e)) in entries.iter().enumerate() {
            match groups.iter_mut().find(|(url, _)| *url == e.url) {
                Some((_, members)) => members.push(i),
                None => groups.push((&e.url, vec![i])),
            }
        }
        let mut results: Vec<PublishResult> = vec![Ok(()); entries.len()];
        let sent = join_all(groups.iter().map(|(_, members)| {
            let group: Vec<&WebhookEntry> = members.iter().map(|&i| &entries[i].1).collect();
            p.post_batch(group)
        }))
        .await;
        for ((_, members), outcome) in groups.iter().zip(sent) {
            for (&i, result) in members.iter().zip(outcome) {
                results[i] = result;
            }
        }
        Ok(results)
    }
}

impl WebhookPublisher {
    /// Sends `entries` (one URL, distinct keys) as one JSON array; when the receiver refuses the
    /// array, each entry alone, to find the refused one(s) and deliver the others.
    fn post_batch<'a>(
        &'a self,
        entries: Vec<&'a WebhookEntry>,
    ) -> futures_util::future::BoxFuture<'a, Vec<PublishResult>> {
        Box::pin(async move {
            let Some(first) = entries.first() else {
                return Vec::new();
            };
            let mut body =
                Vec::with_capacity(entries.iter().map(|e| e.body.len() + 1).sum::<usize>() + 1);
            body.push(b'[');
            for (i, e) in entries.iter().enumerate() {
                if i > 0 {
                    body.push(b',');
                }
                body.extend_from_slice(&e.body);
            }
            body.push(b']');
            let id = batch_id(entries.iter().map(|e| e.id.as_str()));
            let mut headers = HeaderMap::new();
            let content_type = match self.config.body {
                BodyFormat::Cloudevents => CLOUDEVENTS_BATCH_JSON,
                _ => "application/json",
            };
            headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
            headers.insert(HEADER_BATCH_SIZE, HeaderValue::from(entries.len()));
            match self.post(&first.url, &id, &body, headers).await {
                Answer::Published => vec![Ok(()); entries.len()],
                Answer::Unavailable(reason) => {
                    vec![Err(PublishError::unavailable(reason)); entries.len()]
                }
                Answer::Refused(reason) if entries.len() == 1 => {
                    vec![Err(PublishError::permanent(format!(
                        "the receiver refused event {} (sent alone in a batch): {reason}",
                        first.id
                    )))]
                }
                Answer::Refused(reason) => {
                    tracing::warn!(destination = %self.name, entries = entries.len(), %reason,
                        "the receiver refused a batch; sending its events one per request to find the refused one");
                    join_all(entries.into_iter().map(|e| self.post_batch(vec![e])))
                        .await
                        .into_iter()
                        .flatten()
                        .collect()
                }
            }
        })
    }
}

#[async_trait]
impl Publisher for WebhookPublisher {
    async fn publish(&self, batch: &[OutboxEvent]) -> Vec<PublishResult> {
        if let Some(reason) = self.held() {
            return vec![Err(PublishError::unavailable(reason)); batch.len()];
        }
        publish_in_waves(&Wave { publisher: self }, batch).await
    }

    /// Sends a `HEAD` to the destination's URL (its origin, for a URL template) with the static
    /// headers and no event: proves that the name resolves, the port accepts a connection, TLS
    /// verifies, and an HTTP server answers; a 404 or 410 for a fixed URL means the endpoint does
    /// not exist. Does not prove that the receiver accepts events (no event is sent, nothing is
    /// signed): any other status, 401/403/405 included, passes.
    async fn check(&self) -> Result<(), PublishError> {
        let (url, exact) = self.check_url()?;
        let shown = Self::redacted(&url);
        let answer = self
            .client
            .head(&url)
            .headers(self.static_headers.clone())
            .send()
            .await;
        match answer {
            Err(e) => Err(PublishError::unavailable(format!(
                "webhook {shown} (destination `{}`) {}: is the receiver up, and destinations.{}.url right?",
                self.name,
                if e.is_timeout() {
                    format!("did not answer within {:?}", self.config.timeout)
                } else {
                    format!("cannot be reached ({})", error_chain(&e))
                },
                self.name
            ))),
            Ok(r) if exact && matches!(r.status(), StatusCode::NOT_FOUND | StatusCode::GONE) => {
                Err(PublishError::permanent(format!(
                    "webhook {shown} (destination `{}`) answered {} to a HEAD: the endpoint does not exist; \
                     fix destinations.{}.url or deploy the receiver",
                    self.name,
                    status_text(r.status()),
                    self.name
                )))
            }
            Ok(r) => {
                tracing::debug!(destination = %self.name, url = %shown, status = %r.status(), "webhook endpoint answered");
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_literal_url_that_does_not_parse_is_refused_when_the_publisher_is_built() {
        // Events are not checked one by one against a literal URL: the check is here, once.
        let refused = WebhookPublisher::new("hooks", WebhookDestination::new("http://exa mple/in"));
        match refused {
            Err(WebhookError::Config(reason)) => {
                assert!(reason.contains("destinations.hooks.url"), "{reason}")
            }
            other => panic!(
                "expected a configuration error, got {:?}",
                other.map(|_| ())
            ),
        }
        assert!(
            WebhookPublisher::new("hooks", WebhookDestination::new("http://127.0.0.1:9/in"))
                .is_ok()
        );
    }

    #[test]
    fn retry_after_takes_seconds_and_dates() {
        assert_eq!(parse_retry_after(" 7 "), Some(Duration::from_secs(7)));
        let later = SystemTime::now() + Duration::from_secs(100);
        let d = parse_retry_after(&httpdate::fmt_http_date(later)).unwrap();
        assert!(
            d > Duration::from_secs(90) && d <= Duration::from_secs(100),
            "{d:?}"
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn ce_values_are_percent_encoded_as_the_binding_asks() {
        assert_eq!(ce_header_value("a b\"%é"), "a%20b%22%25%C3%A9");
        assert_eq!(ce_header_value("/outbox/order"), "/outbox/order");
    }

    #[test]
    fn batch_ids_follow_the_composition() {
        assert_eq!(batch_id(["a", "b"]), batch_id(["a", "b"]));
        assert_ne!(batch_id(["a", "b"]), batch_id(["b", "a"]));
        assert_ne!(batch_id(["a", "b"]), batch_id(["a"]));
        assert!(batch_id(["a"]).starts_with("batch_"));
    }
}
