//! Large payloads: the claim-check pattern over S3.
//!
//! When a message would exceed its destination's size limit and `[aws.large_payloads]` is set, the
//! body that would have been sent (payload or envelope) is stored in S3 at
//! `<prefix><event id>.json`, and the message carries a small JSON object instead:
//!
//! ```json
//! {"outbox_claim_check": {"bucket": "my-bucket", "key": "outbox/0190….json", "size": 1048577}}
//! ```
//!
//! SQS messages also get the attribute `outbox-claim-check` = `s3`. The key derives from the event
//! id, so a retried upload overwrites the same object (no orphans per attempt).
//! Consumers call [`resolve_payload`], which returns the original body whether or not it was
//! offloaded. Objects are not deleted by the relay: use an S3 lifecycle rule on the prefix.

use std::collections::HashMap;

use aws_sdk_s3::primitives::ByteStream;
use serde::{Deserialize, Serialize};

use crate::config::LargePayloads;
use crate::errors::{classify, error_chain};
use outbox::publisher::batch::RequestFailure;

/// The SQS message attribute that flags a claim-check body.
pub const CLAIM_CHECK_ATTRIBUTE: &str = "outbox-claim-check";
/// The top-level key of a claim-check body.
pub const CLAIM_CHECK_KEY: &str = "outbox_claim_check";

/// Where an offloaded body lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimCheck {
    pub bucket: String,
    pub key: String,
    /// Size of the stored body in bytes.
    pub size: usize,
}

#[derive(Serialize, Deserialize)]
struct Wrapper {
    outbox_claim_check: ClaimCheck,
}

impl ClaimCheck {
    /// The message body that replaces the offloaded one.
    pub fn to_body(&self) -> String {
        serde_json::to_string(&Wrapper {
            outbox_claim_check: self.clone(),
        })
        .unwrap_or_default()
    }

    /// Parses a claim-check body; `None` for any other body.
    pub fn from_body(body: &str) -> Option<Self> {
        // Cheap pre-check: ordinary payloads are not parsed twice.
        if !body.contains(CLAIM_CHECK_KEY) {
            return None;
        }
        serde_json::from_str::<Wrapper>(body)
            .ok()
            .map(|w| w.outbox_claim_check)
    }
}

/// Stores bodies in S3 for the publishers.
#[derive(Debug, Clone)]
pub(crate) struct Offloader {
    pub s3: aws_sdk_s3::Client,
    pub config: LargePayloads,
}

impl Offloader {
    pub(crate) async fn store(
        &self,
        event_id: uuid::Uuid,
        body: String,
    ) -> Result<ClaimCheck, RequestFailure> {
        let key = format!("{}{}.json", self.config.prefix, event_id);
        let size = body.len();
        self.s3
            .put_object()
            .bucket(&self.config.bucket)
            .key(&key)
            .content_type("application/json")
            .body(ByteStream::from(body.into_bytes()))
            .send()
            .await
            .map_err(|e| {
                classify(
                    &e,
                    &format!(
                        "S3 PutObject of the large payload to s3://{}/{key}",
                        self.config.bucket
                    ),
                )
            })?;
        Ok(ClaimCheck {
            bucket: self.config.bucket.clone(),
            key,
            size,
        })
    }

    /// The body to send for an event: `body` itself when `size(&body)` is within `max`, else the
    /// claim check of the body stored in S3 (`true`: offloaded), when that fits. Without an
    /// offloader, or when even the claim check is too large, `too_large(size)` is the event's
    /// error. Shared by every AWS kind: each passes how its broker counts a message's size.
    pub(crate) async fn fit(
        offloader: Option<&Offloader>,
        event_id: uuid::Uuid,
        body: String,
        max: usize,
        size: impl Fn(&str, bool) -> usize,
        too_large: impl Fn(usize) -> outbox::PublishError,
    ) -> Result<(String, bool), outbox::PublishError> {
        let plain = size(&body, false);
        if plain <= max {
            return Ok((body, false));
        }
        let Some(offloader) = offloader else {
            return Err(too_large(plain));
        };
        let check = offloader.store(event_id, body).await.map_err(|f| match f {
            RequestFailure::Transient(r) => outbox::PublishError::unavailable(r),
            RequestFailure::Content(r) => outbox::PublishError::permanent(r),
        })?;
        let body = check.to_body();
        let offloaded = size(&body, true);
        if offloaded > max {
            // Only with absurdly low limits or huge headers: the claim check itself is too big.
            return Err(too_large(offloaded));
        }
        Ok((body, true))
    }

    /// Checks at start-up that the bucket exists and is reachable; the error gives the fix.
    pub(crate) async fn check(&self, profile: crate::config::Profile) -> Result<(), String> {
        let bucket = &self.config.bucket;
        match self.s3.head_bucket().bucket(bucket).send().await {
            Ok(_) => Ok(()),
            Err(e) => Err(format!(
                "large-payload bucket `{bucket}` (aws.large_payloads.bucket) is not usable: {}; {}",
                error_chain(&e),
                if profile.is_local() {
                    "run `outbox aws bootstrap` to create it on the emulator"
                } else {
                    "create the bucket and grant the relay s3:PutObject on it, or fix the name"
                }
            )),
        }
    }
}

/// The start-up check of a destination with an optional claim-check bucket: every problem of both.
pub(crate) async fn check_with_bucket(
    destination: Result<(), String>,
    offloader: Option<&Offloader>,
    profile: crate::config::Profile,
) -> Result<(), outbox::PublishError> {
    let bucket = match offloader {
        Some(offloader) => offloader.check(profile).await,
        None => Ok(()),
    };
    let problems: Vec<String> = [destination, bucket]
        .into_iter()
        .filter_map(Result::err)
        .collect();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(outbox::PublishError::permanent(problems.join("; ")))
    }
}

/// Why a claim-check body could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("fetching claim-checked payload s3://{bucket}/{key} failed: {reason}")]
    Fetch {
        bucket: String,
        key: String,
        reason: String,
    },
    #[error("the message is flagged as a claim check ({CLAIM_CHECK_ATTRIBUTE}) but its body is not one: {0}")]
    Malformed(String),
    #[error("claim-checked payload s3://{bucket}/{key} is not UTF-8 text")]
    NotText { bucket: String, key: String },
}

/// Returns the original body of a received message: the body itself, or, for a claim check, the
/// body stored in S3.
///
/// `attributes` are the SQS message attributes (receive them with `message_attribute_names("All")`);
/// pass `None` for bodies without attributes, e.g. an EventBridge event's `detail`, where the
/// claim check is recognised by its shape alone.
pub async fn resolve_payload(
    s3: &aws_sdk_s3::Client,
    body: &str,
    attributes: Option<&HashMap<String, aws_sdk_sqs::types::MessageAttributeValue>>,
) -> Result<String, ResolveError> {
    let flagged = attributes
        .and_then(|a| a.get(CLAIM_CHECK_ATTRIBUTE))
        .and_then(|v| v.string_value())
        == Some("s3");
    let check = match ClaimCheck::from_body(body) {
        Some(check) => check,
        None if flagged => return Err(ResolveError::Malformed(truncate(body, 200))),
        None => return Ok(body.to_owned()),
    };
    let fetched = s3
        .get_object()
        .bucket(&check.bucket)
        .key(&check.key)
        .send()
        .await
        .map_err(|e| ResolveError::Fetch {
            bucket: check.bucket.clone(),
            key: check.key.clone(),
            reason: error_chain(&e),
        })?;
    let bytes = fetched
        .body
        .collect()
        .await
        .map_err(|e| ResolveError::Fetch {
            bucket: check.bucket.clone(),
            key: check.key.clone(),
            reason: error_chain(&e),
        })?
        .into_bytes();
    String::from_utf8(bytes.to_vec()).map_err(|_| ResolveError::NotText {
        bucket: check.bucket,
        key: check.key,
    })
}

fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claim_check_bodies_round_trip_and_others_are_not_mistaken() {
        let check = ClaimCheck {
            bucket: "b".into(),
            key: "outbox/1.json".into(),
            size: 5,
        };
        assert_eq!(ClaimCheck::from_body(&check.to_body()), Some(check));
        assert_eq!(ClaimCheck::from_body(r#"{"order": 1}"#), None);
        assert_eq!(ClaimCheck::from_body(r#"{"outbox_claim_check": 1}"#), None);
    }
}
