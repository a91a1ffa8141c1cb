//! The EventBridge publisher: `PutEvents` to one event bus.
//!
//! Each event becomes an entry with `Source` and `DetailType` from the destination's templates
//! (defaults `outbox.{aggregate_type}` and `{event_type}`), `Detail` = the payload (default) or the
//! outbox envelope (`detail = "envelope"`, which also carries the event id and headers: EventBridge
//! entries have no attributes), `Time` = the event's `created_at`, and `EventBusName`.
//! Per-entry failures (`FailedEntryCount`) are classified individually: throttling and internal
//! failures are retryable, anything else (malformed detail, invalid argument) is permanent.

use async_trait::async_trait;
use aws_sdk_eventbridge::primitives::DateTime;
use aws_sdk_eventbridge::types::PutEventsRequestEntry;
use outbox::{OutboxEvent, PublishError, PublishResult, Publisher};

use crate::claim_check::{check_with_bucket, Offloader};
use outbox::publisher::template::Template;

use crate::config::{parse_template, EventBridgeDestination, Profile};
use crate::errors::{classify, is_throttling_code, is_transient_code, service_code};
use outbox::publisher::batch::{publish_in_waves, Prepared, RequestFailure, Sink};

/// What EventBridge counts for `Time` in an entry's size.
const TIME_BYTES: usize = 14;

/// Publishes to one EventBridge bus.
#[derive(Debug)]
pub struct EventBridgePublisher {
    name: String,
    config: EventBridgeDestination,
    source: Template,
    detail_type: Template,
    client: aws_sdk_eventbridge::Client,
    offloader: Option<Offloader>,
    profile: Profile,
    endpoint: Option<String>,
}

impl EventBridgePublisher {
    pub(crate) fn new(
        name: &str,
        config: EventBridgeDestination,
        client: aws_sdk_eventbridge::Client,
        offloader: Option<Offloader>,
        profile: Profile,
        endpoint: Option<String>,
    ) -> Self {
        // Validated with the configuration; the literal is only what an unvalidated text becomes.
        let template =
            |text: &str| parse_template(text).unwrap_or_else(|_| Template::literal(text));
        Self {
            name: name.to_owned(),
            source: template(&config.source),
            detail_type: template(&config.detail_type),
            config,
            client,
            offloader,
            profile,
            endpoint,
        }
    }

    fn detail(&self, event: &OutboxEvent) -> String {
        self.config.detail.render(event)
    }
}

/// The size EventBridge counts for an entry (its documented formula).
fn entry_size(source: &str, detail_type: &str, detail: &str) -> usize {
    TIME_BYTES + source.len() + detail_type.len() + detail.len()
}

#[async_trait]
impl Sink for EventBridgePublisher {
    type Entry = PutEventsRequestEntry;

    fn max_entries(&self) -> usize {
        self.config.max_entries
    }
    fn max_request_bytes(&self) -> usize {
        self.config.max_request_bytes
    }

    async fn prepare(
        &self,
        event: &OutboxEvent,
    ) -> Result<Prepared<PutEventsRequestEntry>, PublishError> {
        let source = self.source.render(event);
        let detail_type = self.detail_type.render(event);
        let too_large = |size: usize| {
            PublishError::permanent(format!(
                "event {} makes an EventBridge entry of {size} bytes, over the limit of {} bytes of \
                 destination `{}` (destinations.{}.max_entry_bytes): configure [aws.large_payloads] \
                 bucket to offload large payloads to S3, or make the event smaller",
                event.id, self.config.max_entry_bytes, self.name, self.name
            ))
        };
        let (detail, _offloaded) = Offloader::fit(
            self.offloader.as_ref(),
            event.id,
            self.detail(event),
            self.config.max_entry_bytes,
            |detail, _| entry_size(&source, &detail_type, detail),
            too_large,
        )
        .await?;
        let size = entry_size(&source, &detail_type, &detail);
        let entry = PutEventsRequestEntry::builder()
            .source(source)
            .detail_type(detail_type)
            .detail(detail)
            .event_bus_name(&self.config.bus)
            .time(DateTime::from_millis(event.created_at.timestamp_millis()))
            .build();
        Ok(Prepared { entry, size })
    }

    async fn send(
        &self,
        entries: &[(String, PutEventsRequestEntry)],
    ) -> Result<Vec<PublishResult>, RequestFailure> {
        let what = format!("EventBridge PutEvents to bus `{}`", self.config.bus);
        let output = self
            .client
            .put_events()
            .set_entries(Some(entries.iter().map(|(_, e)| e.clone()).collect()))
            .send()
            .await
            .map_err(|e| classify(&e, &what))?;
        let results = output.entries();
        if results.len() != entries.len() {
            return Err(RequestFailure::Transient(format!(
                "{what}: {} results for {} entries",
                results.len(),
                entries.len()
            )));
        }
        Ok(results
            .iter()
            .map(|r| match r.error_code() {
                None => Ok(()),
                Some(code) => {
                    let reason = format!(
                        "EventBridge refused the entry for bus `{}`: {code}: {}",
                        self.config.bus,
                        r.error_message().unwrap_or("no message")
                    );
                    if is_throttling_code(code) {
                        Err(PublishError::unavailable(reason))
                    } else if is_transient_code(code) {
                        Err(PublishError::retryable(reason))
                    } else {
                        Err(PublishError::permanent(reason))
                    }
                }
            })
            .collect())
    }
}

#[async_trait]
impl Publisher for EventBridgePublisher {
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

impl EventBridgePublisher {
    /// Checks that the queue or bus exists; the error names it and gives the fix.
    async fn check_destination(&self) -> Result<(), PublishError> {
        let bus = &self.config.bus;
        let error = match self.client.describe_event_bus().name(bus).send().await {
            Ok(_) => return Ok(()),
            Err(e) => e,
        };
        let missing = service_code(&error).as_deref() == Some("ResourceNotFoundException");
        let detail = match classify(&error, "EventBridge DescribeEventBus") {
            RequestFailure::Transient(t) | RequestFailure::Content(t) => t,
        };
        let where_ = self
            .endpoint
            .as_deref()
            .map(|e| format!(" at {e}"))
            .unwrap_or_default();
        let fix = match self.profile {
            Profile::Local => "run `outbox aws bootstrap` to create it on the emulator".to_owned(),
            Profile::Dev | Profile::Prod => format!(
                "create the bus (e.g. with your infrastructure tool) in this account and region, or fix destinations.{}.bus",
                self.name
            ),
        };
        Err(PublishError::permanent(if missing {
            format!(
                "destination `{}`: EventBridge bus `{bus}` does not exist{where_} (profile {}): {fix}",
                self.name, self.profile
            )
        } else {
            format!(
                "destination `{}`: cannot verify EventBridge bus `{bus}`{where_} (profile {}): {detail}; {fix}",
                self.name, self.profile
            )
        }))
    }
}
