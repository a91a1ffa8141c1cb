//! The SQS publisher: `SendMessageBatch` to a standard or FIFO queue.
//!
//! - Body: the payload JSON (default) or the outbox envelope (`body = "envelope"`).
//! - Attributes (String): `outbox-event-id`, `outbox-event-type`, `outbox-aggregate-type`,
//!   `outbox-aggregate-id`, then the event's headers (`traceparent` and `tracestate` first, then by
//!   name) while the budget lasts. SQS allows 10 attributes per message; one slot stays reserved
//!   for the claim-check flag so a message carries the same headers whether or not it was
//!   offloaded. Headers are dropped (logged at debug) when over the budget, when their name is not
//!   a valid SQS attribute name (`[A-Za-z0-9_.-]`, no `AWS.`/`Amazon.` prefix, no `..`), when the
//!   name is one of ours (`outbox-…`), or when the value is empty or has characters SQS refuses.
//!   With `body = "envelope"` every header is in the body anyway.
//! - FIFO: `MessageGroupId` = the ordering key `aggregate_type/aggregate_id` (hashed when it is too
//!   long or has characters SQS refuses), `MessageDeduplicationId` = the event id.
//! - Per-entry failures: a sender fault is permanent (dead letter), anything else retryable; a
//!   throttling code is always retryable.

use std::collections::HashMap;

use async_trait::async_trait;
use aws_sdk_sqs::types::{MessageAttributeValue, QueueAttributeName, SendMessageBatchRequestEntry};
use outbox::{OutboxEvent, PublishError, PublishResult, Publisher};
use tokio::sync::OnceCell;

use crate::claim_check::{check_with_bucket, Offloader, CLAIM_CHECK_ATTRIBUTE};
use crate::config::{Profile, SqsDestination};
use crate::errors::{classify, is_throttling_code, is_transient_code, service_code};
use outbox::publisher::batch::{publish_in_waves, Prepared, RequestFailure, Sink};
use outbox::publisher::headers as outbox_headers;

/// Attributes every message carries, plus the reserved claim-check slot.
pub(crate) const FIXED_ATTRIBUTES: usize = 5;
/// What the claim-check flag attribute adds to a message's size.
pub(crate) const FLAG_SIZE: usize = CLAIM_CHECK_ATTRIBUTE.len() + "String".len() + "s3".len();
/// Largest `MessageGroupId` SQS accepts.
const MAX_GROUP_ID: usize = 128;

/// One message before it gets its per-request id.
#[derive(Debug, Clone)]
pub struct SqsEntry {
    body: String,
    attributes: HashMap<String, MessageAttributeValue>,
    group_id: Option<String>,
    dedup_id: Option<String>,
}

/// Publishes to one SQS queue.
#[derive(Debug)]
pub struct SqsPublisher {
    name: String,
    config: SqsDestination,
    client: aws_sdk_sqs::Client,
    offloader: Option<Offloader>,
    profile: Profile,
    endpoint: Option<String>,
    queue_url: OnceCell<String>,
}

impl SqsPublisher {
    pub(crate) fn new(
        name: &str,
        config: SqsDestination,
        client: aws_sdk_sqs::Client,
        offloader: Option<Offloader>,
        profile: Profile,
        endpoint: Option<String>,
    ) -> Self {
        Self {
            name: name.to_owned(),
            config,
            client,
            offloader,
            profile,
            endpoint,
            queue_url: OnceCell::new(),
        }
    }

    /// The queue URL: configured, or looked up once by name.
    pub(crate) async fn queue_url(&self) -> Result<&str, RequestFailure> {
        self.queue_url
            .get_or_try_init(|| async {
                if self.config.is_url() {
                    return Ok(self.config.queue.clone());
                }
                let out = self
                    .client
                    .get_queue_url()
                    .queue_name(&self.config.queue)
                    .send()
                    .await
                    .map_err(|e| {
                        // A missing queue is retryable while relaying (it may be created), but
                        // `check` turns it into a start-up error.
                        RequestFailure::Transient(match classify(&e, "SQS GetQueueUrl") {
                            RequestFailure::Transient(t) | RequestFailure::Content(t) => t,
                        })
                    })?;
                out.queue_url().map(str::to_owned).ok_or_else(|| {
                    RequestFailure::Transient("SQS GetQueueUrl returned no URL".into())
                })
            })
            .await
            .map(String::as_str)
    }

    fn is_fifo(&self) -> bool {
        self.config.is_fifo()
    }

    fn body(&self, event: &OutboxEvent) -> String {
        self.config.body.render(event)
    }

    fn too_large(&self, event: &OutboxEvent, size: usize) -> PublishError {
        PublishError::permanent(format!(
            "event {} makes an SQS message of {size} bytes (body + attributes), over the limit of {} bytes \
             of destination `{}` (destinations.{}.max_message_bytes): configure [aws.large_payloads] bucket \
             to offload large payloads to S3, or make the event smaller",
            event.id, self.config.max_message_bytes, self.name, self.name
        ))
    }

    fn fix_hint(&self) -> String {
        match self.profile {
            Profile::Local => format!(
                "run `outbox aws bootstrap` to create it on the emulator (is it running at {}? `scripts/aws-emulator.sh start`)",
                self.endpoint.as_deref().unwrap_or("the local endpoint")
            ),
            Profile::Dev | Profile::Prod => format!(
                "create the queue (e.g. with your infrastructure tool) in this account and region, or fix destinations.{}.queue",
                self.name
            ),
        }
    }
}

#[async_trait]
impl Sink for SqsPublisher {
    type Entry = SqsEntry;

    fn max_entries(&self) -> usize {
        self.config.max_entries
    }
    fn max_request_bytes(&self) -> usize {
        self.config.max_request_bytes
    }

    async fn prepare(&self, event: &OutboxEvent) -> Result<Prepared<SqsEntry>, PublishError> {
        let (mut attributes, dropped) = attributes_for(event, self.config.max_attributes);
        if !dropped.is_empty() {
            tracing::debug!(id = %event.id, ?dropped, "headers not carried as SQS attributes");
        }
        let fixed = attributes_size(&attributes);
        let (body, offloaded) = Offloader::fit(
            self.offloader.as_ref(),
            event.id,
            self.body(event),
            self.config.max_message_bytes,
            |body, flagged| body.len() + fixed + if flagged { FLAG_SIZE } else { 0 },
            |size| self.too_large(event, size),
        )
        .await?;
        if offloaded {
            attributes.insert(CLAIM_CHECK_ATTRIBUTE.to_owned(), string_attribute("s3"));
        }
        let size = body.len() + attributes_size(&attributes);
        let (group_id, dedup_id) = if self.is_fifo() {
            (Some(group_id_for(event)), Some(event.id.to_string()))
        } else {
            (None, None)
        };
        Ok(Prepared {
            entry: SqsEntry {
                body,
                attributes,
                group_id,
                dedup_id,
            },
            size,
        })
    }

    async fn send(
        &self,
        entries: &[(String, SqsEntry)],
    ) -> Result<Vec<PublishResult>, RequestFailure> {
        let url = self.queue_url().await?;
        let mut request = Vec::with_capacity(entries.len());
        for (id, entry) in entries {
            let built = SendMessageBatchRequestEntry::builder()
                .id(id)
                .message_body(&entry.body)
                .set_message_attributes(Some(entry.attributes.clone()))
                .set_message_group_id(entry.group_id.clone())
                .set_message_deduplication_id(entry.dedup_id.clone())
                .build()
                .map_err(|e| {
                    RequestFailure::Content(format!("building the SQS entry failed: {e}"))
                })?;
            request.push(built);
        }
        let what = format!(
            "SQS SendMessageBatch to queue `{}`",
            self.config.queue_name()
        );
        let output = self
            .client
            .send_message_batch()
            .queue_url(url)
            .set_entries(Some(request))
            .send()
            .await
            .map_err(|e| classify(&e, &what))?;
        let mut by_id: HashMap<&str, PublishResult> = HashMap::new();
        for ok in output.successful() {
            by_id.insert(ok.id(), Ok(()));
        }
        for failed in output.failed() {
            let error = entry_error(
                self.config.queue_name(),
                failed.sender_fault(),
                failed.code(),
                failed.message(),
            );
            by_id.insert(failed.id(), Err(error));
        }
        Ok(entries
            .iter()
            .map(|(id, _)| {
                by_id.remove(id.as_str()).unwrap_or_else(|| {
                    Err(PublishError::retryable(format!(
                        "SQS did not report entry {id}"
                    )))
                })
            })
            .collect())
    }
}

#[async_trait]
impl Publisher for SqsPublisher {
    async fn publish(&self, batch: &[OutboxEvent]) -> Vec<PublishResult> {
        publish_in_waves(self, batch).await
    }

    async fn check(&self) -> Result<(), PublishError> {
        let destination = self
            .check_destination()
            .await
            .map_err(|e| e.reason().to_owned());
        check_with_bucket(destination, self.offloader.as_ref(), self.profile).await
    }
}

impl SqsPublisher {
    /// Checks that the queue or bus exists; the error names it and gives the fix.
    async fn check_destination(&self) -> Result<(), PublishError> {
        let queue = self.config.queue_name();
        let problem = if self.config.is_url() {
            match self
                .client
                .get_queue_attributes()
                .queue_url(&self.config.queue)
                .attribute_names(QueueAttributeName::QueueArn)
                .send()
                .await
            {
                Ok(_) => return Ok(()),
                Err(e) => (service_code(&e), classify(&e, "SQS GetQueueAttributes")),
            }
        } else {
            match self.client.get_queue_url().queue_name(queue).send().await {
                Ok(out) => {
                    if let Some(url) = out.queue_url() {
                        let _ = self.queue_url.set(url.to_owned());
                    }
                    return Ok(());
                }
                Err(e) => (service_code(&e), classify(&e, "SQS GetQueueUrl")),
            }
        };
        let (code, failure) = problem;
        let detail = match failure {
            RequestFailure::Transient(t) | RequestFailure::Content(t) => t,
        };
        let missing = matches!(
            code.as_deref(),
            Some("QueueDoesNotExist" | "AWS.SimpleQueueService.NonExistentQueue")
        );
        let where_ = self
            .endpoint
            .as_deref()
            .map(|e| format!(" at {e}"))
            .unwrap_or_default();
        Err(PublishError::permanent(if missing {
            format!(
                "destination `{}`: SQS queue `{queue}` does not exist{where_} (profile {}): {}",
                self.name,
                self.profile,
                self.fix_hint()
            )
        } else {
            format!(
                "destination `{}`: cannot verify SQS queue `{queue}`{where_} (profile {}): {detail}; {}",
                self.name,
                self.profile,
                self.fix_hint()
            )
        }))
    }
}

/// A per-entry failure of `SendMessageBatch`: throttling is the destination's (no attempt
/// counted); otherwise the sender's fault is permanent unless the code says an internal failure,
/// and the service's fault is retryable.
pub(crate) fn entry_error(
    queue: &str,
    sender_fault: bool,
    code: &str,
    message: Option<&str>,
) -> PublishError {
    let reason = format!(
        "SQS refused the message for queue `{queue}`: {code}{}: {}",
        if sender_fault { " (sender fault)" } else { "" },
        message.unwrap_or("no message")
    );
    classify_entry(reason, sender_fault, code)
}

/// The scope of a per-entry failure of a batch call (SQS, SNS): throttling is the destination's;
/// a sender fault is the event's for good unless its code is transient; the rest may pass later.
pub(crate) fn classify_entry(reason: String, sender_fault: bool, code: &str) -> PublishError {
    if is_throttling_code(code) {
        PublishError::unavailable(reason)
    } else if sender_fault && !is_transient_code(code) {
        PublishError::permanent(reason)
    } else {
        PublishError::retryable(reason)
    }
}

/// The attributes of an event's message and the names of the headers left out.
pub(crate) fn attributes_for(
    event: &OutboxEvent,
    max_attributes: usize,
) -> (HashMap<String, MessageAttributeValue>, Vec<String>) {
    let (pairs, dropped) = attribute_pairs(event, max_attributes);
    let attributes = pairs
        .into_iter()
        .map(|(name, value)| (name, string_attribute(&value)))
        .collect();
    (attributes, dropped)
}

/// The string attributes of an event's message (SQS and SNS share the rules) and the names of the
/// headers left out.
pub(crate) fn attribute_pairs(
    event: &OutboxEvent,
    max_attributes: usize,
) -> (Vec<(String, String)>, Vec<String>) {
    let mut attributes = Vec::with_capacity(max_attributes);
    for (name, value) in outbox_headers::identity(event) {
        attributes.push((name.to_owned(), value));
    }
    let mut budget = max_attributes.saturating_sub(FIXED_ATTRIBUTES);
    let mut dropped = Vec::new();
    let priority = |name: &str| match name {
        "traceparent" => 0,
        "tracestate" => 1,
        _ => 2,
    };
    let mut headers: Vec<(&String, &String)> = event.headers.iter().collect();
    headers.sort_by_key(|(name, _)| priority(name)); // stable: by name within a priority
    for (name, value) in headers {
        let usable = valid_attribute_name(name)
            && !outbox_headers::is_reserved(name)
            && !value.is_empty()
            && value.chars().all(valid_sqs_char);
        if usable && budget > 0 {
            attributes.push((name.clone(), value.clone()));
            budget -= 1;
        } else {
            dropped.push(name.clone());
        }
    }
    (attributes, dropped)
}

fn string_attribute(value: &str) -> MessageAttributeValue {
    MessageAttributeValue::builder()
        .data_type("String")
        .string_value(value)
        .build()
        .unwrap_or_else(|_| unreachable!("data_type is set"))
}

/// What SQS and SNS count for string attributes: name, data type ("String") and value of each.
pub(crate) fn pairs_size(attributes: &[(String, String)]) -> usize {
    attributes
        .iter()
        .map(|(name, value)| name.len() + "String".len() + value.len())
        .sum()
}

/// What SQS counts for attributes: name, data type and value of each.
fn attributes_size(attributes: &HashMap<String, MessageAttributeValue>) -> usize {
    attributes
        .iter()
        .map(|(name, v)| name.len() + v.data_type().len() + v.string_value().map_or(0, str::len))
        .sum()
}

/// SQS attribute names: up to 256 of `[A-Za-z0-9_.-]`, no leading/trailing `.`, no `..`, not
/// starting with `AWS.` or `Amazon.` (any case).
pub(crate) fn valid_attribute_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    !name.is_empty()
        && name.len() <= 256
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        && !name.starts_with('.')
        && !name.ends_with('.')
        && !name.contains("..")
        && !lower.starts_with("aws.")
        && !lower.starts_with("amazon.")
}

/// The characters SQS accepts in bodies and string attributes.
fn valid_sqs_char(c: char) -> bool {
    matches!(c, '\u{9}' | '\u{A}' | '\u{D}' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..='\u{10FFFF}')
}

/// The FIFO message group of an event: its ordering key when SQS accepts it as a group id
/// (up to 128 printable ASCII characters), else a stable 128-bit hash of it, so every event of a
/// key lands in the same group (two keys sharing a hash only share a group: order still holds).
pub(crate) fn group_id_for(event: &OutboxEvent) -> String {
    let key = event.ordering_key().to_string();
    if key.len() <= MAX_GROUP_ID && key.chars().all(|c| c.is_ascii_graphic()) {
        key
    } else {
        format!("h-{:032x}", fnv1a_128(key.as_bytes()))
    }
}

/// FNV-1a, 128-bit: stable across releases and platforms (unlike `std`'s hasher).
fn fnv1a_128(bytes: &[u8]) -> u128 {
    const OFFSET: u128 = 0x6c62272e07bb014262b821756295c58d;
    const PRIME: u128 = 0x0000000001000000000000000000013B;
    bytes.iter().fold(OFFSET, |hash, &b| {
        (hash ^ u128::from(b)).wrapping_mul(PRIME)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(headers: &[(&str, &str)]) -> OutboxEvent {
        let headers: serde_json::Map<String, serde_json::Value> = headers
            .iter()
            .map(|(k, v)| ((*k).to_owned(), serde_json::Value::from(*v)))
            .collect();
        serde_json::from_value(serde_json::json!({
            "id": uuid::Uuid::now_v7(), "seq": 1, "aggregate_type": "order",
            "aggregate_id": "o-1", "event_type": "OrderPlaced", "payload": {},
            "headers": headers, "created_at": "2026-01-01T00:00:00Z"
        }))
        .unwrap()
    }

    #[test]
    fn attributes_keep_trace_context_first_and_respect_the_limit() {
        let e = event(&[
            ("a1", "x"),
            ("a2", "x"),
            ("a3", "x"),
            ("a4", "x"),
            ("tracestate", "v=1"),
            ("traceparent", "00-abc-def-01"),
            ("AWS.reserved", "x"),
            ("empty", ""),
            ("bad name", "x"),
            ("outbox-event-id", "spoof"),
        ]);
        let (attrs, dropped) = attributes_for(&e, 10);
        assert_eq!(attrs.len(), 9, "10 minus the reserved claim-check slot");
        assert_eq!(attrs["traceparent"].string_value(), Some("00-abc-def-01"));
        assert!(attrs.contains_key("tracestate") && attrs.contains_key("a3"));
        assert!(!attrs.contains_key("a4"));
        assert_eq!(
            attrs[outbox_headers::EVENT_ID].string_value(),
            Some(e.id.to_string().as_str())
        );
        for name in ["a4", "AWS.reserved", "empty", "bad name", "outbox-event-id"] {
            assert!(
                dropped.contains(&name.to_owned()),
                "{name} should be dropped"
            );
        }
    }

    #[test]
    fn entry_failures_are_classified_by_fault_and_code() {
        let e = entry_error("q", true, "InvalidParameterValue", Some("bad"));
        assert!(!e.is_retryable() && e.reason().contains("InvalidParameterValue"));
        assert!(entry_error("q", false, "InternalError", None).is_retryable());
        assert!(entry_error("q", true, "KMS.ThrottlingException", None).is_retryable());
    }

    #[test]
    fn group_ids_are_the_key_or_a_stable_hash() {
        let mut e = event(&[]);
        assert_eq!(group_id_for(&e), "order/o-1");
        e.aggregate_id = "x".repeat(200);
        let hashed = group_id_for(&e);
        assert!(hashed.starts_with("h-") && hashed.len() <= MAX_GROUP_ID);
        assert_eq!(hashed, group_id_for(&e));
        e.aggregate_id = "ünïcode".into();
        assert!(group_id_for(&e).starts_with("h-"));
    }
}
