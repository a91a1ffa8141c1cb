//! The JetStream publisher: one message per event, published with acknowledgement.
//!
//! - Subject: the destination's template with the event's `aggregate_type` / `event_type`.
//! - Headers: `Nats-Msg-Id` = the event id (the stream drops a redelivery within its
//!   `duplicate_window`; the duplicate's ack counts as published), `outbox-event-id`,
//!   `outbox-event-type`, `outbox-aggregate-type`, `outbox-aggregate-id`, then the event's own
//!   headers (`traceparent` included). A header whose name NATS cannot carry (`:`, whitespace,
//!   control characters), that is one of ours (`outbox-…`) or a server directive (`Nats-…`, which
//!   would change how the stream stores the message), or whose value has a line break, is dropped
//!   (logged at debug); with `body = "envelope"` every header is in the body anyway.
//! - Order: the core's wave engine sends one event per key at a time, so a key's next event goes
//!   out only after the previous one was acknowledged, and never after it failed.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::context::{PublishError as JsPublishError, PublishErrorKind};
use async_nats::jetstream::{self, ErrorCode};
use async_nats::{ConnectOptions, HeaderMap};
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::future::join_all;
use outbox::publisher::batch::{publish_in_waves, Prepared, RequestFailure, Sink};
use outbox::{OutboxEvent, PublishError, PublishResult, Publisher};
use tokio::sync::OnceCell;

use outbox::publisher::headers as outbox_headers;

use crate::config::{subject_problem, NatsDestination, NatsSection};
use outbox::publisher::template::Template;

use crate::template::stream_subject;

/// The header JetStream deduplicates on.
pub const NATS_MSG_ID: &str = "Nats-Msg-Id";

/// Events of one wave in flight at once (their acknowledgements are awaited together).
const MAX_IN_FLIGHT: usize = 256;

/// The connection shared by every destination of one build: opened on first use, so that
/// building contacts no server; a failed attempt is retried on the next call.
pub struct Connection {
    section: NatsSection,
    client: OnceCell<(async_nats::Client, jetstream::Context)>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("url", &self.redacted_url())
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// A connection to the server of `section`, not opened yet.
    pub fn new(section: NatsSection) -> Self {
        Self {
            section,
            client: OnceCell::new(),
        }
    }

    /// The server URL without its password, for messages.
    pub fn redacted_url(&self) -> String {
        outbox::config::redact_url(&self.section.url)
    }

    /// The timeout of every call to the server.
    pub fn timeout(&self) -> Duration {
        self.section.timeout
    }

    /// The client and its JetStream context, connecting first if needed. A failure is the
    /// destination's ([`PublishError::Unavailable`]) and names the server and the fix.
    pub async fn get(&self) -> Result<&(async_nats::Client, jetstream::Context), PublishError> {
        self.client
            .get_or_try_init(|| async {
                let timeout = self.section.timeout;
                let mut options = ConnectOptions::new()
                    .name("outbox-relay")
                    .connection_timeout(timeout)
                    .request_timeout(Some(timeout));
                if let Some(token) = &self.section.token {
                    options = options.token(token.clone());
                }
                let unavailable = |why: String| {
                    PublishError::unavailable(format!(
                        "NATS server at {} {why}: is nats-server running (with JetStream, `-js`) and nats.url right?",
                        self.redacted_url()
                    ))
                };
                let urls: Vec<String> = self
                    .section
                    .url
                    .split(',')
                    .map(|u| u.trim().to_owned())
                    .collect();
                let client = match tokio::time::timeout(
                    timeout,
                    options.connect(urls.as_slice()),
                )
                .await
                {
                    Err(_) => return Err(unavailable(format!("did not answer within {timeout:?}"))),
                    // The error text is the client's (connection refused, auth); it does not
                    // echo the URL's password.
                    Ok(Err(e)) => return Err(unavailable(format!("cannot be reached ({e})"))),
                    Ok(Ok(client)) => client,
                };
                let mut js = jetstream::new(client.clone());
                js.set_timeout(timeout);
                Ok((client, js))
            })
            .await
    }
}

/// Publishes to the subjects of one `kind = "nats"` destination.
#[derive(Debug)]
pub struct NatsPublisher {
    name: String,
    config: NatsDestination,
    subject: Template,
    connection: Arc<Connection>,
}

impl NatsPublisher {
    /// A publisher for the destination `name` over `connection` (shared with the other NATS
    /// destinations of the relay).
    pub fn new(
        name: &str,
        config: NatsDestination,
        connection: Arc<Connection>,
    ) -> Result<Self, String> {
        let subject = config.template()?;
        Ok(Self {
            name: name.to_owned(),
            config,
            subject,
            connection,
        })
    }

    /// The subjects the destination publishes to, as a filter (`*` for each placeholder).
    pub fn subject_filter(&self) -> String {
        self.subject.fill("*")
    }

    fn body(&self, event: &OutboxEvent) -> String {
        self.config.body.render(event)
    }
}

/// A header name NATS can carry: printable ASCII without `:` or spaces.
fn valid_header_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic() && b != b':')
}

/// The headers of `event` and their size on the wire (approximately `NATS/1.0` + lines).
pub fn headers_for(event: &OutboxEvent) -> (HeaderMap, usize, Vec<String>) {
    let mut headers = HeaderMap::new();
    let id = event.id.to_string();
    let mut size = "NATS/1.0\r\n\r\n".len();
    let mut put = |headers: &mut HeaderMap, name: &str, value: &str| {
        size += name.len() + value.len() + 4;
        headers.insert(name, value);
    };
    put(&mut headers, NATS_MSG_ID, &id);
    for (name, value) in outbox_headers::identity(event) {
        put(&mut headers, name, &value);
    }
    let mut dropped = Vec::new();
    for (name, value) in &event.headers {
        let lower = name.to_ascii_lowercase();
        let ours = outbox_headers::is_reserved(name) || lower.starts_with("nats-");
        if ours
            || !valid_header_name(name)
            || value.contains(['\r', '\n'])
            || value.chars().any(|c| c.is_control() && c != '\t')
        {
            dropped.push(name.clone());
            continue;
        }
        put(&mut headers, name, value);
    }
    (headers, size, dropped)
}

/// One message ready to publish.
#[derive(Debug, Clone)]
pub struct NatsEntry {
    subject: String,
    headers: HeaderMap,
    body: Bytes,
}

/// The wave engine's view of one destination over a connected client.
struct Wave<'a> {
    publisher: &'a NatsPublisher,
    js: &'a jetstream::Context,
    max_payload: usize,
}

#[async_trait]
impl Sink for Wave<'_> {
    type Entry = NatsEntry;

    fn max_entries(&self) -> usize {
        MAX_IN_FLIGHT
    }

    fn max_request_bytes(&self) -> usize {
        // Each entry is its own message; this only bounds the bytes of one wave in flight.
        64 * 1024 * 1024
    }

    async fn prepare(&self, event: &OutboxEvent) -> Result<Prepared<NatsEntry>, PublishError> {
        let p = self.publisher;
        let subject = p.subject.render(event);
        if let Some(problem) = subject_problem(&subject) {
            return Err(PublishError::permanent(format!(
                "event {} gives the subject {subject:?} (destinations.{}.subject = {:?}), which NATS refuses: {problem}; \
                 change the event's aggregate or event type, or the subject template",
                event.id, p.name, p.config.subject
            )));
        }
        let body = p.body(event);
        let (headers, header_size, dropped) = headers_for(event);
        if !dropped.is_empty() {
            tracing::debug!(id = %event.id, ?dropped, "headers not carried as NATS headers");
        }
        let size = body.len() + header_size;
        if size > self.max_payload {
            return Err(PublishError::permanent(format!(
                "event {} makes a NATS message of {size} bytes (body + headers), over the limit of {} bytes of \
                 destination `{}` (the server's max_payload and destinations.{}.max_payload_bytes): make the event \
                 smaller, or raise max_payload on the server and max_payload_bytes here",
                event.id, self.max_payload, p.name, p.name
            )));
        }
        Ok(Prepared {
            entry: NatsEntry {
                subject,
                headers,
                body: Bytes::from(body),
            },
            size,
        })
    }

    async fn send(
        &self,
        entries: &[(String, NatsEntry)],
    ) -> Result<Vec<PublishResult>, RequestFailure> {
        // Every entry is of a different key: publish them all, then await the acknowledgements
        // together (one round trip for the wave, not one per event).
        let mut pending = Vec::with_capacity(entries.len());
        let mut stuck = false;
        for (_, entry) in entries {
            if stuck {
                // The client did not take the previous message within the timeout: do not wait
                // that long again for each of the others.
                pending.push(Err(JsPublishError::new(PublishErrorKind::TimedOut)));
                continue;
            }
            let message = jetstream::message::PublishMessage::build()
                .payload(entry.body.clone())
                .headers(entry.headers.clone());
            let sent = self.js.send_publish(entry.subject.clone(), message).await;
            stuck = matches!(&sent, Err(e) if e.kind() == PublishErrorKind::TimedOut);
            pending.push(sent);
        }
        let acks = pending.into_iter().zip(entries).map(|(sent, (_, entry))| async move {
            let ack = match sent {
                Ok(future) => future.await,
                Err(e) => Err(e),
            };
            match ack {
                // A duplicate: the stream already holds this event id (an earlier attempt was
                // stored but its ack was lost). Published, exactly once.
                Ok(ack) => {
                    if ack.duplicate {
                        tracing::debug!(subject = %entry.subject, stream = %ack.stream, seq = ack.sequence, "duplicate event id, already in the stream");
                    }
                    Ok(())
                }
                Err(e) => Err(classify(&e, &entry.subject, self.publisher)),
            }
        });
        // Awaited together, so that each acknowledgement's timeout runs at the same time.
        Ok(join_all(acks).await)
    }
}

/// The JetStream error of a publish, if the server answered with one.
fn jetstream_error(e: &JsPublishError) -> Option<&jetstream::Error> {
    std::error::Error::source(e).and_then(|s| s.downcast_ref::<jetstream::Error>())
}

/// Classifies a failed publish by scope (see the `Publisher` contract).
fn classify(e: &JsPublishError, subject: &str, p: &NatsPublisher) -> PublishError {
    match e.kind() {
        PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe | PublishErrorKind::MaxAckPending => {
            PublishError::unavailable(format!(
                "NATS server at {} did not acknowledge a publish to {subject:?} within {:?} ({e})",
                p.connection.redacted_url(),
                p.connection.timeout()
            ))
        }
        // No stream captures the subject: the destination is missing (it may be created).
        PublishErrorKind::StreamNotFound => PublishError::unavailable(format!(
            "no JetStream stream captures the subject {subject:?} of destination `{}`: create one \
             (outbox_nats::bootstrap for the local profile, or `nats stream add`)",
            p.name
        )),
        _ => match jetstream_error(e).map(|j| j.error_code()) {
            Some(ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM)
            | Some(ErrorCode::STREAM_HEADER_EXCEEDS_MAXIMUM) => PublishError::permanent(format!(
                "the stream refused the message to {subject:?} as too large ({e}): make the event smaller or raise the stream's max_msg_size"
            )),
            Some(
                ErrorCode::STORAGE_RESOURCES_EXCEEDED
                | ErrorCode::MEMORY_RESOURCES_EXCEEDED
                | ErrorCode::INSUFFICIENT_RESOURCES
                | ErrorCode::ACCOUNT_RESOURCES_EXCEEDED
                | ErrorCode::STREAM_STORE_FAILED
                | ErrorCode::STREAM_MAX_STREAM_BYTES_EXCEEDED
                | ErrorCode::JETSTREAM_NOT_ENABLED
                | ErrorCode::JETSTREAM_NOT_ENABLED_FOR_ACCOUNT,
            ) => PublishError::unavailable(format!(
                "the JetStream stream of {subject:?} cannot store messages now ({e})"
            )),
            // The stream answered something else for this message (e.g. an expectation header):
            // this event's failure, worth another attempt.
            Some(_) => PublishError::retryable(format!("JetStream refused the message to {subject:?}: {e}")),
            // No answer from JetStream at all (the connection is closing, the request could not
            // be written): the server's trouble.
            None => PublishError::unavailable(format!(
                "publishing to {subject:?} on the NATS server at {} failed: {e}",
                p.connection.redacted_url()
            )),
        },
    }
}

#[async_trait]
impl Publisher for NatsPublisher {
    async fn publish(&self, batch: &[OutboxEvent]) -> Vec<PublishResult> {
        let (client, js) = match self.connection.get().await {
            Ok(c) => c,
            Err(e) => return vec![Err(e); batch.len()],
        };
        let server_max = client.server_info().max_payload;
        let max_payload = if server_max == 0 {
            self.config.max_payload_bytes
        } else {
            self.config.max_payload_bytes.min(server_max)
        };
        let wave = Wave {
            publisher: self,
            js,
            max_payload,
        };
        publish_in_waves(&wave, batch).await
    }

    async fn check(&self) -> Result<(), PublishError> {
        let (_, js) = self.connection.get().await?;
        let timeout = self.connection.timeout();
        let within = |what: String| {
            PublishError::unavailable(format!(
                "NATS server at {} did not answer {what} within {timeout:?}",
                self.connection.redacted_url()
            ))
        };
        if let Some(stream) = &self.config.stream {
            match tokio::time::timeout(timeout, js.get_stream(stream)).await {
                Err(_) => return Err(within(format!("about stream `{stream}`"))),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    use async_nats::jetstream::context::GetStreamErrorKind;
                    return Err(match e.kind() {
                        GetStreamErrorKind::JetStream(j) if j.error_code() == ErrorCode::STREAM_NOT_FOUND => {
                            PublishError::permanent(format!(
                                "JetStream stream `{stream}` (destinations.{}.stream) does not exist: create it \
                                 (outbox_nats::bootstrap for the local profile, or `nats stream add {stream} --subjects '{}'`)",
                                self.name,
                                stream_subject(&self.subject)
                            ))
                        }
                        _ => PublishError::unavailable(format!(
                            "looking up JetStream stream `{stream}` failed: {e} (is JetStream enabled, `nats-server -js`?)"
                        )),
                    });
                }
            }
        }
        let filter = self.subject_filter();
        match tokio::time::timeout(timeout, js.stream_by_subject(filter.clone())).await {
            Err(_) => Err(within(format!("which stream captures {filter:?}"))),
            Ok(Ok(found)) => match &self.config.stream {
                Some(stream) if *stream != found => Err(PublishError::permanent(format!(
                    "the subjects {filter:?} of destination `{}` are captured by stream `{found}`, not by \
                     destinations.{}.stream = `{stream}`: fix one of them",
                    self.name, self.name
                ))),
                _ => Ok(()),
            },
            Ok(Err(e)) => {
                use async_nats::jetstream::context::GetStreamByNameErrorKind;
                Err(match e.kind() {
                    GetStreamByNameErrorKind::NotFound => PublishError::permanent(format!(
                        "no JetStream stream captures the subjects {filter:?} of destination `{}` \
                         (destinations.{}.subject = {:?}): create one (outbox_nats::bootstrap for the local profile, \
                         or `nats stream add NAME --subjects '{}'`)",
                        self.name,
                        self.name,
                        self.config.subject,
                        stream_subject(&self.subject)
                    )),
                    _ => PublishError::unavailable(format!(
                        "looking up the stream of {filter:?} failed: {e} (is JetStream enabled, `nats-server -js`?)"
                    )),
                })
            }
        }
    }
}
