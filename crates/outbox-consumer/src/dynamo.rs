//! DynamoDB idempotency, for consumers without Postgres (the pattern of the Lambda Powertools
//! idempotency utility).
//!
//! Per delivery: a conditional `PutItem` of `{pk: "<consumer>#<event id>", status: IN_PROGRESS,
//! in_progress_until, expires_at}` that succeeds only if no record exists, or an IN_PROGRESS one
//! whose holder is presumed dead (`in_progress_until` passed). Then:
//! - the put failed and the record is COMPLETED: a duplicate, acknowledged without running the
//!   handler;
//! - the put failed and the record is IN_PROGRESS: another copy is being handled right now; this
//!   one fails (not deleted) and SQS redelivers it later, when it will find COMPLETED;
//! - the put succeeded: the inner handler runs; success marks the record COMPLETED with the TTL,
//!   failure deletes the record, so the redelivery runs the handler again.
//!
//! Unlike the inbox, the handler's effects and the mark are not one transaction: a crash between
//! the two leaves an IN_PROGRESS record that blocks redeliveries until `in_progress_timeout`, after
//! which the event is handled again. Handlers should therefore be safe to re-run for that window.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use aws_sdk_dynamodb::types::AttributeValue;

use crate::delivery::Delivery;
use crate::handler::{Handled, Handler, HandlerError};

const IN_PROGRESS: &str = "IN_PROGRESS";
const COMPLETED: &str = "COMPLETED";

/// Table layout and timing of [`DynamoIdempotency`].
#[derive(Debug, Clone)]
pub struct DynamoOptions {
    pub table: String,
    /// Partition key attribute (string) of the table.
    pub partition_key: String,
    /// TTL attribute (epoch seconds) the table's TTL is enabled on.
    pub ttl_attribute: String,
    /// Namespace of the keys, so consumers can share a table.
    pub consumer: String,
    /// How long a COMPLETED record is kept (how late a duplicate is still recognised).
    pub ttl: Duration,
    /// How long an IN_PROGRESS record blocks other copies (longer than the handler may take).
    pub in_progress_timeout: Duration,
}

impl DynamoOptions {
    /// The layout `outbox aws bootstrap` creates for `[[aws.bootstrap.tables]]` with the defaults
    /// `partition_key = "pk"` and `ttl_attribute = "expires_at"`.
    pub fn new(table: impl Into<String>, consumer: impl Into<String>) -> Self {
        Self {
            table: table.into(),
            partition_key: "pk".to_owned(),
            ttl_attribute: "expires_at".to_owned(),
            consumer: consumer.into(),
            ttl: Duration::from_secs(24 * 3600),
            in_progress_timeout: Duration::from_secs(300),
        }
    }
}

/// A [`Handler`] that runs `inner` at most once per event id (within the TTL).
pub struct DynamoIdempotency<H> {
    client: aws_sdk_dynamodb::Client,
    options: DynamoOptions,
    inner: H,
}

/// Why the idempotency record could not be read or written.
#[derive(Debug, thiserror::Error)]
enum DynamoError {
    #[error("DynamoDB {operation} on table {table} failed: {reason}")]
    Request {
        operation: &'static str,
        table: String,
        reason: String,
    },
    #[error("event {0} is being handled by another delivery; this copy will be retried")]
    InProgress(uuid::Uuid),
}

impl<H: Handler> DynamoIdempotency<H> {
    pub fn new(client: aws_sdk_dynamodb::Client, options: DynamoOptions, inner: H) -> Self {
        Self {
            client,
            options,
            inner,
        }
    }

    fn key(&self, delivery: &Delivery) -> String {
        format!("{}#{}", self.options.consumer, delivery.event_id)
    }

    fn request_error(
        &self,
        operation: &'static str,
        e: &(dyn std::error::Error + 'static),
    ) -> DynamoError {
        DynamoError::Request {
            operation,
            table: self.options.table.clone(),
            reason: crate::consumer::error_chain(e),
        }
    }

    /// The status of an event's record (`None`: no record).
    pub async fn status(&self, delivery: &Delivery) -> Result<Option<String>, HandlerError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.options.table)
            .key(
                &self.options.partition_key,
                AttributeValue::S(self.key(delivery)),
            )
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| self.request_error("GetItem", &e))?;
        Ok(out
            .item()
            .and_then(|i| i.get("status"))
            .and_then(|v| v.as_s().ok())
            .cloned())
    }
}

fn epoch(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[async_trait]
impl<H: Handler> Handler for DynamoIdempotency<H> {
    async fn handle(&self, delivery: &Delivery) -> Result<Handled, HandlerError> {
        let o = &self.options;
        let now = SystemTime::now();
        let key = AttributeValue::S(self.key(delivery));
        let item = HashMap::from([
            (o.partition_key.clone(), key.clone()),
            ("status".to_owned(), AttributeValue::S(IN_PROGRESS.into())),
            (
                "in_progress_until".to_owned(),
                AttributeValue::N(epoch(now + o.in_progress_timeout).to_string()),
            ),
            (
                o.ttl_attribute.clone(),
                AttributeValue::N(epoch(now + o.ttl).to_string()),
            ),
        ]);
        let put = self
            .client
            .put_item()
            .table_name(&o.table)
            .set_item(Some(item))
            .condition_expression(
                "attribute_not_exists(#pk) OR (#status = :in_progress AND #until < :now)",
            )
            .expression_attribute_names("#pk", &o.partition_key)
            .expression_attribute_names("#status", "status")
            .expression_attribute_names("#until", "in_progress_until")
            .expression_attribute_values(":in_progress", AttributeValue::S(IN_PROGRESS.into()))
            .expression_attribute_values(":now", AttributeValue::N(epoch(now).to_string()))
            .send()
            .await;
        if let Err(e) = put {
            let conditional = e
                .as_service_error()
                .is_some_and(|s| s.is_conditional_check_failed_exception());
            if !conditional {
                return Err(self.request_error("PutItem", &e).into());
            }
            return match self.status(delivery).await?.as_deref() {
                Some(COMPLETED) => Ok(Handled::Duplicate),
                _ => Err(DynamoError::InProgress(delivery.event_id).into()),
            };
        }
        match self.inner.handle(delivery).await {
            Ok(_) => {
                let done = self
                    .client
                    .update_item()
                    .table_name(&o.table)
                    .key(&o.partition_key, key)
                    .update_expression("SET #status = :completed, #ttl = :ttl")
                    .expression_attribute_names("#status", "status")
                    .expression_attribute_names("#ttl", &o.ttl_attribute)
                    .expression_attribute_values(":completed", AttributeValue::S(COMPLETED.into()))
                    .expression_attribute_values(
                        ":ttl",
                        AttributeValue::N(epoch(SystemTime::now() + o.ttl).to_string()),
                    )
                    .send()
                    .await;
                if let Err(e) = done {
                    // The effects happened: acknowledging avoids a sure re-run; the record stays
                    // IN_PROGRESS and expires, so only a late duplicate could run again.
                    tracing::warn!(event_id = %delivery.event_id, error = %self.request_error("UpdateItem", &e), "could not mark the event completed");
                }
                Ok(Handled::Processed)
            }
            Err(e) => {
                let released = self
                    .client
                    .delete_item()
                    .table_name(&o.table)
                    .key(&o.partition_key, key)
                    .send()
                    .await;
                if let Err(d) = released {
                    tracing::warn!(event_id = %delivery.event_id, error = %self.request_error("DeleteItem", &d), "could not release the in-progress record; redeliveries wait for in_progress_timeout");
                }
                Err(e)
            }
        }
    }
}
