//! The SNS publisher: `PublishBatch` to a standard or FIFO topic.
//!
//! The message is what the SQS publisher sends (see [`crate::sqs`]): the same body choices, the
//! same `outbox-*` attributes and headers (the same budget of 10, one slot kept for the claim-check
//! flag), and on a FIFO topic the ordering key as `MessageGroupId` and the event id as
//! `MessageDeduplicationId`. Subscribers with raw message delivery receive the body and the
//! attributes as published. Batching goes through the core's wave engine (one event per key per
//! request). The topic is given by name (its ARN is looked up once with `ListTopics`) or by ARN.

use std::collections::HashMap;

use async_trait::async_trait;
use aws_sdk_sns::types::{MessageAttributeValue, PublishBatchRequestEntry};
use outbox::publisher::batch::{publish_in_waves, Prepared, RequestFailure, Sink};
use outbox::{OutboxEvent, PublishError, PublishResult, Publisher};
use tokio::sync::OnceCell;

use crate::claim_check::{check_with_bucket, Offloader, CLAIM_CHECK_ATTRIBUTE};
use crate::config::{Profile, SnsDestination};
use crate::errors::{classify, error_chain, service_code};
use crate::sqs::{attribute_pairs, classify_entry, group_id_for, pairs_size, FLAG_SIZE};

/// One SNS message before it gets its per-request id.
#[derive(Debug, Clone)]
pub struct SnsEntry {
    body: String,
    attributes: Vec<(String, String)>,
    group_id: Option<String>,
    dedup_id: Option<String>,
}

/// Publishes to one SNS topic.
#[derive(Debug)]
pub struct SnsPublisher {
    name: String,
    config: SnsDestination,
    client: aws_sdk_sns::Client,
    offloader: Option<Offloader>,
    profile: Profile,
    endpoint: Option<String>,
    topic_arn: OnceCell<String>,
}

/// The ARN of the topic called `name`, if it exists (ListTopics, every page).
pub(crate) async fn find_topic_arn(
    client: &aws_sdk_sns::Client,
    name: &str,
) -> Result<Option<String>, String> {
    let suffix = format!(":{name}");
    let mut next: Option<String> = None;
    loop {
        let page = client
            .list_topics()
            .set_next_token(next.take())
            .send()
            .await
            .map_err(|e| format!("SNS ListTopics failed: {}", error_chain(&e)))?;
        if let Some(arn) = page
            .topics()
            .iter()
            .filter_map(|t| t.topic_arn())
            .find(|arn| arn.ends_with(&suffix))
        {
            return Ok(Some(arn.to_owned()));
        }
        match page.next_token() {
            Some(token) if !token.is_empty() => next = Some(token.to_owned()),
            _ => return Ok(None),
        }
    }
}

impl SnsPublisher {
    pub(crate) fn new(
        name: &str,
        config: SnsDestination,
        client: aws_sdk_sns::Client,
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
            topic_arn: OnceCell::new(),
        }
    }

    /// The topic ARN: configured, or looked up once by name. A missing topic is the destination's
    /// failure while relaying (it may be created); `check` makes it a start-up error.
    async fn topic_arn(&self) -> Result<&str, RequestFailure> {
        self.topic_arn
            .get_or_try_init(|| async {
                if self.config.is_arn() {
                    return Ok(self.config.topic.clone());
                }
                match find_topic_arn(&self.client, self.config.topic_name()).await {
                    Ok(Some(arn)) => Ok(arn),
                    Ok(None) => Err(RequestFailure::Transient(format!(
                        "SNS topic `{}` does not exist",
                        self.config.topic_name()
                    ))),
                    Err(reason) => Err(RequestFailure::Transient(reason)),
                }
            })
            .await
            .map(String::as_str)
    }

    fn too_large(&self, event: &OutboxEvent, size: usize) -> PublishError {
        PublishError::permanent(format!(
            "event {} makes an SNS message of {size} bytes (body + attributes), over the limit of {} bytes \
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
                "create the topic (e.g. with your infrastructure tool) in this account and region, or fix destinations.{}.topic",
                self.name
            ),
        }
    }
}

fn attribute(value: &str) -> MessageAttributeValue {
    MessageAttributeValue::builder()
        .data_type("String")
        .string_value(value)
        .build()
        .unwrap_or_else(|_| unreachable!("data_type is set"))
}

#[async_trait]
impl Sink for SnsPublisher {
    type Entry = SnsEntry;

    fn max_entries(&self) -> usize {
        self.config.max_entries
    }
    fn max_request_bytes(&self) -> usize {
        self.config.max_request_bytes
    }

    async fn prepare(&self, event: &OutboxEvent) -> Result<Prepared<SnsEntry>, PublishError> {
        let (mut attributes, dropped) = attribute_pairs(event, self.config.max_attributes);
        if !dropped.is_empty() {
            tracing::debug!(id = %event.id, ?dropped, "headers not carried as SNS attributes");
        }
        let fixed = pairs_size(&attributes);
        let (body, offloaded) = Offloader::fit(
            self.offloader.as_ref(),
            event.id,
            self.config.body.render(event),
            self.config.max_message_bytes,
            |body, flagged| body.len() + fixed + if flagged { FLAG_SIZE } else { 0 },
            |size| self.too_large(event, size),
        )
        .await?;
        if offloaded {
            attributes.push((CLAIM_CHECK_ATTRIBUTE.to_owned(), "s3".to_owned()));
        }
        let size = body.len() + pairs_size(&attributes);
        let (group_id, dedup_id) = if self.config.is_fifo() {
            (Some(group_id_for(event)), Some(event.id.to_string()))
        } else {
            (None, None)
        };
        Ok(Prepared {
            entry: SnsEntry {
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
        entries: &[(String, SnsEntry)],
    ) -> Result<Vec<PublishResult>, RequestFailure> {
        let arn = self.topic_arn().await?;
        let mut request = Vec::with_capacity(entries.len());
        for (id, entry) in entries {
            let attributes: HashMap<String, MessageAttributeValue> = entry
                .attributes
                .iter()
                .map(|(k, v)| (k.clone(), attribute(v)))
                .collect();
            let built = PublishBatchRequestEntry::builder()
                .id(id)
                .message(&entry.body)
                .set_message_attributes(Some(attributes))
                .set_message_group_id(entry.group_id.clone())
                .set_message_deduplication_id(entry.dedup_id.clone())
                .build()
                .map_err(|e| {
                    RequestFailure::Content(format!("building the SNS entry failed: {e}"))
                })?;
            request.push(built);
        }
        let what = format!("SNS PublishBatch to topic `{}`", self.config.topic_name());
        let output = self
            .client
            .publish_batch()
            .topic_arn(arn)
            .set_publish_batch_request_entries(Some(request))
            .send()
            .await
            .map_err(|e| classify(&e, &what))?;
        let mut by_id: HashMap<&str, PublishResult> = HashMap::new();
        for ok in output.successful() {
            if let Some(id) = ok.id() {
                by_id.insert(id, Ok(()));
            }
        }
        for failed in output.failed() {
            let reason = format!(
                "SNS refused the message for topic `{}`: {}{}: {}",
                self.config.topic_name(),
                failed.code(),
                if failed.sender_fault() {
                    " (sender fault)"
                } else {
                    ""
                },
                failed.message().unwrap_or("no message")
            );
            by_id.insert(
                failed.id(),
                Err(classify_entry(reason, failed.sender_fault(), failed.code())),
            );
        }
        Ok(entries
            .iter()
            .map(|(id, _)| {
                by_id.remove(id.as_str()).unwrap_or_else(|| {
                    Err(PublishError::retryable(format!(
                        "SNS did not report entry {id}"
                    )))
                })
            })
            .collect())
    }
}

#[async_trait]
impl Publisher for SnsPublisher {
    async fn publish(&self, batch: &[OutboxEvent]) -> Vec<PublishResult> {
        publish_in_waves(self, batch).await
    }

    /// Checks that the topic exists (and the large-payload bucket, when configured).
    async fn check(&self) -> Result<(), PublishError> {
        let topic = self.config.topic_name();
        let where_ = self
            .endpoint
            .as_deref()
            .map(|e| format!(" at {e}"))
            .unwrap_or_default();
        let destination = if self.config.is_arn() {
            match self
                .client
                .get_topic_attributes()
                .topic_arn(&self.config.topic)
                .send()
                .await
            {
                Ok(_) => Ok(()),
                Err(e) if service_code(&e).as_deref() == Some("NotFound") => Err(format!(
                    "destination `{}`: SNS topic `{topic}` does not exist{where_} (profile {}): {}",
                    self.name,
                    self.profile,
                    self.fix_hint()
                )),
                Err(e) => Err(format!(
                    "destination `{}`: cannot verify SNS topic `{topic}`{where_} (profile {}): {}; {}",
                    self.name,
                    self.profile,
                    error_chain(&e),
                    self.fix_hint()
                )),
            }
        } else {
            match find_topic_arn(&self.client, topic).await {
                Ok(Some(arn)) => {
                    let _ = self.topic_arn.set(arn);
                    Ok(())
                }
                Ok(None) => Err(format!(
                    "destination `{}`: SNS topic `{topic}` does not exist{where_} (profile {}): {}",
                    self.name,
                    self.profile,
                    self.fix_hint()
                )),
                Err(reason) => Err(format!(
                    "destination `{}`: cannot verify SNS topic `{topic}`{where_} (profile {}): {reason}; {}",
                    self.name,
                    self.profile,
                    self.fix_hint()
                )),
            }
        };
        check_with_bucket(destination, self.offloader.as_ref(), self.profile).await
    }
}
