//! The typed `[aws]` section and the AWS kinds of `[destinations]` (`sqs`, `eventbridge`), read
//! from [`outbox::Config`] and validated before anything connects. Every error names the key and
//! the fix. Routing (`[[routes]]`, `default_destination`) is the core's, for every kind.

use std::collections::BTreeMap;

use outbox::publisher::template::{Placeholder, Template};
use outbox::registry::DestinationRef;
use serde::{Deserialize, Serialize};

/// The endpoint the `local` profile uses when neither the configuration nor `AWS_ENDPOINT_URL*`
/// names one: the port LocalStack and `scripts/aws-emulator.sh` listen on.
pub const LOCAL_DEFAULT_ENDPOINT: &str = "http://localhost:4566";
/// The region the `local` profile uses when neither `aws.region` nor `AWS_REGION` sets one.
pub const LOCAL_DEFAULT_REGION: &str = "us-east-1";

/// Current AWS limits, used as configuration defaults (not enforced anywhere else in the code).
pub mod limits {
    /// SQS: largest message (body + attributes), 1 MiB since August 2025.
    pub const SQS_MAX_MESSAGE_BYTES: usize = 1_048_576;
    /// SQS: largest `SendMessageBatch` request (sum of its messages).
    pub const SQS_MAX_REQUEST_BYTES: usize = 1_048_576;
    /// SQS: entries per `SendMessageBatch`.
    pub const SQS_MAX_ENTRIES: usize = 10;
    /// SQS: message attributes per message.
    pub const SQS_MAX_ATTRIBUTES: usize = 10;
    /// SNS: largest message (body + attributes), and the largest `PublishBatch` (256 KiB).
    pub const SNS_MAX_MESSAGE_BYTES: usize = 262_144;
    /// EventBridge: largest `PutEvents` entry, and the largest request (sum of its entries): 256 KiB.
    pub const EVENTBRIDGE_MAX_ENTRY_BYTES: usize = 262_144;
    pub const EVENTBRIDGE_MAX_REQUEST_BYTES: usize = 262_144;
    /// EventBridge: entries per `PutEvents`.
    pub const EVENTBRIDGE_MAX_ENTRIES: usize = 10;
}

/// A configuration problem of the AWS sections, found before anything connects.
#[derive(Debug, thiserror::Error)]
pub enum AwsConfigError {
    #[error("invalid [{section}] section: {message}")]
    Section {
        section: &'static str,
        message: String,
    },
    #[error("invalid value for `{key}`: {problem}; {fix}")]
    Value {
        key: String,
        problem: String,
        fix: String,
    },
    #[error("no AWS region for profile `{profile}`: set AWS_REGION (or a region in your AWS_PROFILE), or aws.region in outbox.toml")]
    NoRegion { profile: String },
    /// Every problem found, when there is more than one.
    #[error("{} problems in the AWS configuration:\n  - {}", .0.len(), .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n  - "))]
    Several(Vec<AwsConfigError>),
}

impl AwsConfigError {
    /// The individual problems (one, or those of [`AwsConfigError::Several`]).
    pub fn problems(&self) -> Vec<&AwsConfigError> {
        match self {
            Self::Several(all) => all.iter().collect(),
            other => vec![other],
        }
    }

    /// `Ok` without problems, the problem itself for one, [`AwsConfigError::Several`] for more.
    fn from_problems(mut problems: Vec<AwsConfigError>) -> Result<(), AwsConfigError> {
        match problems.len() {
            0 => Ok(()),
            1 => Err(problems.remove(0)),
            _ => Err(Self::Several(problems)),
        }
    }

    fn value(key: impl Into<String>, problem: impl Into<String>, fix: impl Into<String>) -> Self {
        Self::Value {
            key: key.into(),
            problem: problem.into(),
            fix: fix.into(),
        }
    }
}

/// Which world the AWS clients talk to: the configuration's profile. `local` is an emulator on
/// loopback (dummy credentials, may create infrastructure); `dev` and `prod` are real AWS with the
/// default credential chain and never create infrastructure.
pub use outbox::config::Profile;

/// `[aws]`: clients, the default destination, large payloads and the local bootstrap.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AwsSection {
    /// Region; otherwise `AWS_REGION` / the AWS profile (dev, prod) or `us-east-1` (local).
    pub region: Option<String>,
    /// `local` only: one endpoint for every service (default `http://localhost:4566`).
    pub endpoint: Option<String>,
    /// `local` only: per-service endpoints, winning over `endpoint`.
    pub endpoints: ServiceEndpoints,
    /// S3 offloading of payloads over a destination's size limit (claim check).
    pub large_payloads: Option<LargePayloads>,
    /// What `bootstrap` creates besides the destinations (local profile only).
    pub bootstrap: BootstrapSection,
}

/// `[aws.endpoints]`
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceEndpoints {
    pub sqs: Option<String>,
    pub sns: Option<String>,
    pub eventbridge: Option<String>,
    pub s3: Option<String>,
    pub dynamodb: Option<String>,
}

/// `[aws.large_payloads]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LargePayloads {
    pub bucket: String,
    /// Object keys are `<prefix><event id>.json`.
    #[serde(default = "default_prefix")]
    pub prefix: String,
}

fn default_prefix() -> String {
    "outbox/".to_owned()
}

/// `[aws.bootstrap]`: extra infrastructure for the local profile.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BootstrapSection {
    /// Queues that are not destinations, e.g. the targets of EventBridge rules (`.fifo` = FIFO).
    pub queues: Vec<String>,
    /// EventBridge rules with an SQS target.
    pub rules: Vec<RuleSpec>,
    /// DynamoDB tables (e.g. a consumer's idempotency table).
    pub tables: Vec<TableSpec>,
    /// Dead-letter queues with a redrive policy on their source queue.
    pub redrive: Vec<RedriveSpec>,
}

/// `[[aws.bootstrap.redrive]]`: SQS moves a message of `queue` to `dead_letter_queue` once it has
/// been received `max_receive_count` times without being deleted (a poison message).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RedriveSpec {
    /// The source queue (created if missing).
    pub queue: String,
    /// The dead-letter queue (created if missing); FIFO exactly when `queue` is.
    pub dead_letter_queue: String,
    #[serde(default = "default_max_receive_count")]
    pub max_receive_count: u32,
    /// The source queue's visibility timeout, when it should differ from the SQS default (30 s).
    pub visibility_timeout_seconds: Option<u32>,
}

fn default_max_receive_count() -> u32 {
    5
}

/// `[[aws.bootstrap.rules]]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    pub name: String,
    /// Bus name; `default` is the account's default bus.
    #[serde(default = "default_bus")]
    pub bus: String,
    /// An EventBridge event pattern, as JSON text.
    pub event_pattern: String,
    /// The queue (name) the rule delivers to; created if missing.
    pub target_queue: String,
    /// For a FIFO target: the (static) message group of every delivered event.
    pub message_group_id: Option<String>,
}

/// `[[aws.bootstrap.tables]]`: a pay-per-request table with string keys.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TableSpec {
    pub name: String,
    #[serde(default = "default_partition_key")]
    pub partition_key: String,
    pub sort_key: Option<String>,
    /// Attribute holding an epoch-seconds expiry; enables DynamoDB TTL on it.
    pub ttl_attribute: Option<String>,
}

fn default_partition_key() -> String {
    "pk".to_owned()
}

fn default_bus() -> String {
    "default".to_owned()
}

/// What a message body (SQS) or an event's detail (EventBridge) contains: the core's choice,
/// the same for every kind.
pub use outbox::publisher::BodyFormat;

/// The AWS kinds of destination.
pub const KINDS: &[&str] = &["sqs", "sns", "eventbridge"];

/// `[destinations.NAME]` of an AWS kind.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DestinationConfig {
    /// An SQS queue; a name ending in `.fifo` is a FIFO queue.
    Sqs(SqsDestination),
    /// An SNS topic; a name ending in `.fifo` is a FIFO topic.
    Sns(SnsDestination),
    /// An EventBridge event bus.
    Eventbridge(EventBridgeDestination),
}

impl DestinationConfig {
    /// The `kind` value.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Sqs(_) => "sqs",
            Self::Sns(_) => "sns",
            Self::Eventbridge(_) => "eventbridge",
        }
    }

    /// Reads a destination of an AWS kind; `Ok(None)` for other kinds.
    pub fn read(d: &DestinationRef<'_>) -> Result<Option<Self>, outbox::ConfigError> {
        Ok(match d.kind {
            "sqs" => Some(Self::Sqs(d.settings()?)),
            "sns" => Some(Self::Sns(d.settings()?)),
            "eventbridge" => Some(Self::Eventbridge(d.settings()?)),
            _ => None,
        })
    }

    /// The largest payload this destination carries without a claim check.
    pub fn max_payload_bytes(&self) -> usize {
        match self {
            Self::Sqs(sqs) => sqs.max_message_bytes,
            Self::Sns(sns) => sns.max_message_bytes,
            Self::Eventbridge(eb) => eb.max_entry_bytes,
        }
    }
}

/// `kind = "sqs"`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SqsDestination {
    /// Queue name (resolved with GetQueueUrl) or full queue URL.
    pub queue: String,
    #[serde(default)]
    pub body: BodyFormat,
    #[serde(default = "sqs_max_message_bytes")]
    pub max_message_bytes: usize,
    #[serde(default = "sqs_max_request_bytes")]
    pub max_request_bytes: usize,
    #[serde(default = "sqs_max_entries")]
    pub max_entries: usize,
    #[serde(default = "sqs_max_attributes")]
    pub max_attributes: usize,
}

impl SqsDestination {
    /// FIFO queues are the ones whose name ends in `.fifo` (an AWS rule, not a convention).
    pub fn is_fifo(&self) -> bool {
        self.queue_name().ends_with(".fifo")
    }
    /// The queue's name, also when `queue` is a URL.
    pub fn queue_name(&self) -> &str {
        queue_name_of(&self.queue)
    }
    pub fn is_url(&self) -> bool {
        self.queue.starts_with("http://") || self.queue.starts_with("https://")
    }
}

/// The last path segment of a queue URL, or the name itself.
pub fn queue_name_of(queue: &str) -> &str {
    queue
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or(queue)
}

fn sqs_max_message_bytes() -> usize {
    limits::SQS_MAX_MESSAGE_BYTES
}
fn sqs_max_request_bytes() -> usize {
    limits::SQS_MAX_REQUEST_BYTES
}
fn sqs_max_entries() -> usize {
    limits::SQS_MAX_ENTRIES
}
fn sqs_max_attributes() -> usize {
    limits::SQS_MAX_ATTRIBUTES
}

/// `kind = "sns"`: an SNS topic, published with `PublishBatch`; the same attributes and body
/// choices as SQS, FIFO topics with the ordering key as message group and the event id as
/// deduplication id.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SnsDestination {
    /// Topic name (looked up once with ListTopics) or topic ARN.
    pub topic: String,
    #[serde(default)]
    pub body: BodyFormat,
    #[serde(default = "sns_max_message_bytes")]
    pub max_message_bytes: usize,
    #[serde(default = "sns_max_message_bytes")]
    pub max_request_bytes: usize,
    #[serde(default = "sqs_max_entries")]
    pub max_entries: usize,
    #[serde(default = "sqs_max_attributes")]
    pub max_attributes: usize,
}

impl SnsDestination {
    /// FIFO topics are the ones whose name ends in `.fifo`.
    pub fn is_fifo(&self) -> bool {
        self.topic_name().ends_with(".fifo")
    }
    /// The topic's name, also when `topic` is an ARN (`arn:aws:sns:region:account:name`).
    pub fn topic_name(&self) -> &str {
        self.topic.rsplit(':').next().unwrap_or(&self.topic)
    }
    /// Whether `topic` is an ARN.
    pub fn is_arn(&self) -> bool {
        self.topic.starts_with("arn:")
    }
}

fn sns_max_message_bytes() -> usize {
    limits::SNS_MAX_MESSAGE_BYTES
}

/// `kind = "eventbridge"`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EventBridgeDestination {
    /// Bus name or ARN; `default` is the account's default bus.
    #[serde(default = "default_bus")]
    pub bus: String,
    /// `Source` template; `{aggregate_type}` and `{event_type}` are replaced.
    #[serde(default = "default_source")]
    pub source: String,
    /// `DetailType` template; same placeholders.
    #[serde(default = "default_detail_type")]
    pub detail_type: String,
    #[serde(default)]
    pub detail: BodyFormat,
    #[serde(default = "eb_max_entry_bytes")]
    pub max_entry_bytes: usize,
    #[serde(default = "eb_max_request_bytes")]
    pub max_request_bytes: usize,
    #[serde(default = "eb_max_entries")]
    pub max_entries: usize,
}

fn default_source() -> String {
    "outbox.{aggregate_type}".to_owned()
}
fn default_detail_type() -> String {
    "{event_type}".to_owned()
}
fn eb_max_entry_bytes() -> usize {
    limits::EVENTBRIDGE_MAX_ENTRY_BYTES
}
fn eb_max_request_bytes() -> usize {
    limits::EVENTBRIDGE_MAX_REQUEST_BYTES
}
fn eb_max_entries() -> usize {
    limits::EVENTBRIDGE_MAX_ENTRIES
}

/// The whole AWS side of the configuration, validated.
#[derive(Debug, Clone)]
pub struct AwsConfig {
    /// Which world the clients talk to.
    pub profile: Profile,
    /// `[aws]`.
    pub aws: AwsSection,
    /// The destinations of AWS kinds, by name.
    pub destinations: BTreeMap<String, DestinationConfig>,
}

/// What the SDK clients need: the profile and the `[aws]` section (for consumers that have no
/// destinations, e.g. a queue consumer reusing the same profile logic).
#[derive(Debug, Clone)]
pub struct AwsSettings {
    pub profile: Profile,
    pub aws: AwsSection,
}

impl AwsSettings {
    /// Reads and validates `[aws]` of an [`outbox::Config`].
    pub fn from_config(config: &outbox::Config) -> Result<Self, AwsConfigError> {
        let profile = config.profile;
        let aws: AwsSection = config
            .section("aws")
            .map_err(|e| AwsConfigError::Section {
                section: "aws",
                message: e.to_string(),
            })?
            .unwrap_or_default();
        let settings = Self { profile, aws };
        let mut problems = Vec::new();
        settings.validate(&mut problems);
        AwsConfigError::from_problems(problems)?;
        Ok(settings)
    }

    /// Settings for `profile` with an empty `[aws]` section.
    pub fn new(profile: Profile) -> Self {
        Self {
            profile,
            aws: AwsSection::default(),
        }
    }

    /// Adds every problem of `[aws]` to `problems`.
    fn validate(&self, problems: &mut Vec<AwsConfigError>) {
        let aws = &self.aws;
        let endpoints = [
            ("aws.endpoint", &aws.endpoint),
            ("aws.endpoints.sqs", &aws.endpoints.sqs),
            ("aws.endpoints.sns", &aws.endpoints.sns),
            ("aws.endpoints.eventbridge", &aws.endpoints.eventbridge),
            ("aws.endpoints.s3", &aws.endpoints.s3),
            ("aws.endpoints.dynamodb", &aws.endpoints.dynamodb),
        ];
        for (key, value) in endpoints {
            let Some(url) = value else { continue };
            if !self.profile.is_local() {
                // A `[default.aws] endpoint` meant for the emulator must never silently follow a
                // deployment to real AWS.
                problems.push(AwsConfigError::value(
                    key,
                    format!("an endpoint is set for the `{}` profile", self.profile),
                    "endpoints in outbox.toml are for the local profile only: move it to [local.aws]; \
                     to reach AWS through another endpoint in dev/prod use AWS_ENDPOINT_URL or AWS_ENDPOINT_URL_<SERVICE>",
                ));
                continue;
            }
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                problems.push(AwsConfigError::value(
                    key,
                    format!("{url:?} is not an http(s) URL"),
                    "use a URL such as \"http://localhost:4566\"",
                ));
            }
        }
        if let Some(region) = &aws.region {
            if region.is_empty()
                || !region
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-')
            {
                problems.push(AwsConfigError::value(
                    "aws.region",
                    format!("{region:?} is not a region name"),
                    "use a region such as \"eu-west-1\"",
                ));
            }
        }
        if let Some(large) = &aws.large_payloads {
            if large.bucket.is_empty() {
                problems.push(AwsConfigError::value(
                    "aws.large_payloads.bucket",
                    "the bucket name is empty",
                    "name an S3 bucket, or remove [aws.large_payloads] to dead-letter oversized events",
                ));
            }
        }
        for (i, rule) in aws.bootstrap.rules.iter().enumerate() {
            if serde_json::from_str::<serde_json::Value>(&rule.event_pattern)
                .map(|v| !v.is_object())
                .unwrap_or(true)
            {
                problems.push(AwsConfigError::value(
                    format!("aws.bootstrap.rules[{i}].event_pattern"),
                    format!(
                        "rule `{}` has a pattern that is not a JSON object",
                        rule.name
                    ),
                    "write the pattern as JSON text, e.g. '{\"detail-type\": [\"OrderPlaced\"]}'",
                ));
            }
        }
        for (i, r) in aws.bootstrap.redrive.iter().enumerate() {
            if r.queue.ends_with(".fifo") != r.dead_letter_queue.ends_with(".fifo") {
                problems.push(AwsConfigError::value(
                    format!("aws.bootstrap.redrive[{i}].dead_letter_queue"),
                    format!("`{}` and `{}` are not both FIFO or both standard", r.queue, r.dead_letter_queue),
                    "SQS requires the dead-letter queue of a FIFO queue to be FIFO (name ending in .fifo), and of a standard queue to be standard",
                ));
            }
            if !(1..=1000).contains(&r.max_receive_count) {
                problems.push(AwsConfigError::value(
                    format!("aws.bootstrap.redrive[{i}].max_receive_count"),
                    format!("{} is out of range", r.max_receive_count),
                    "use 1 to 1000",
                ));
            }
        }
    }
}

impl AwsConfig {
    /// Reads and validates `[aws]` and the destinations of AWS kinds of an [`outbox::Config`],
    /// reporting every problem at once.
    pub fn from_config(config: &outbox::Config) -> Result<Self, AwsConfigError> {
        let destinations: Vec<DestinationRef<'_>> = config
            .destination_refs()
            .filter(|d| KINDS.contains(&d.kind))
            .collect();
        Self::from_destinations(config, &destinations)
    }

    /// Reads and validates `[aws]` and `destinations` (of AWS kinds), every problem at once.
    pub fn from_destinations(
        config: &outbox::Config,
        destinations: &[DestinationRef<'_>],
    ) -> Result<Self, AwsConfigError> {
        let profile = config.profile;
        let mut problems = Vec::new();
        let aws: Option<AwsSection> = match config.section("aws") {
            Ok(aws) => aws,
            Err(e) => {
                problems.push(AwsConfigError::Section {
                    section: "aws",
                    message: e.to_string(),
                });
                None
            }
        };
        let mut read = BTreeMap::new();
        for d in destinations {
            match DestinationConfig::read(d) {
                Ok(Some(destination)) => {
                    read.insert(d.name.to_owned(), destination);
                }
                Ok(None) => {}
                Err(e) => problems.push(AwsConfigError::Section {
                    section: "destinations",
                    message: e.to_string(),
                }),
            }
        }
        let settings = AwsSettings {
            profile,
            aws: aws.unwrap_or_default(),
        };
        settings.validate(&mut problems);
        for (name, destination) in &read {
            validate_destination(name, destination, &mut problems);
        }
        AwsConfigError::from_problems(problems)?;
        Ok(Self {
            profile,
            aws: settings.aws,
            destinations: read,
        })
    }

    /// The largest payload any configured destination can take, in bytes (a payload must also
    /// leave room for the envelope or attributes); `None` when an S3 claim check is configured,
    /// which takes payloads of any size. A payload above it can never be delivered.
    pub fn max_event_bytes(&self) -> Option<usize> {
        if self.aws.large_payloads.is_some() {
            return None;
        }
        self.destinations
            .values()
            .map(DestinationConfig::max_payload_bytes)
            .max()
    }

    /// The settings the SDK clients need.
    pub fn settings(&self) -> AwsSettings {
        AwsSettings {
            profile: self.profile,
            aws: self.aws.clone(),
        }
    }
}

/// Adds every problem of `[destinations.NAME]` to `problems`.
fn validate_destination(
    name: &str,
    destination: &DestinationConfig,
    problems: &mut Vec<AwsConfigError>,
) {
    let key = |field: &str| format!("destinations.{name}.{field}");
    let positive = |field: &str, value: usize, max: usize| {
        if value == 0 || value > max {
            Err(AwsConfigError::value(
                key(field),
                format!("{value} is out of range"),
                format!("use 1 to {max} (the AWS limit; omit it for the default)"),
            ))
        } else {
            Ok(())
        }
    };
    // SQS, SNS and EventBridge carry no protocol headers a CloudEvents binding maps attributes to.
    let (body_key, body) = match destination {
        DestinationConfig::Sqs(sqs) => ("body", sqs.body),
        DestinationConfig::Sns(sns) => ("body", sns.body),
        DestinationConfig::Eventbridge(eb) => ("detail", eb.detail),
    };
    if let Some((problem, fix)) = body.binary_unsupported(destination.kind()) {
        problems.push(AwsConfigError::value(key(body_key), problem, fix));
    }
    match destination {
        DestinationConfig::Sqs(sqs) => {
            let queue = sqs.queue_name();
            if queue.is_empty()
                || queue.len() > 80
                || !queue
                    .trim_end_matches(".fifo")
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                problems.push(AwsConfigError::value(
                    key("queue"),
                    format!("{:?} is not a queue name or URL", sqs.queue),
                    "use a queue name (letters, digits, - and _, up to 80, `.fifo` suffix for FIFO) or its full URL",
                ));
            }
            // Counts are capped at the AWS limits (more would only fail at the broker); byte
            // limits allow generous multiples, so a future AWS increase needs no code change.
            problems
                .extend(positive("max_entries", sqs.max_entries, limits::SQS_MAX_ENTRIES).err());
            if !(crate::sqs::FIXED_ATTRIBUTES..=limits::SQS_MAX_ATTRIBUTES)
                .contains(&sqs.max_attributes)
            {
                problems.push(AwsConfigError::value(
                    key("max_attributes"),
                    format!("{} is out of range", sqs.max_attributes),
                    format!(
                        "use {} to {} (four outbox attributes and the claim-check flag are always reserved)",
                        crate::sqs::FIXED_ATTRIBUTES,
                        limits::SQS_MAX_ATTRIBUTES
                    ),
                ));
            }
            problems.extend(
                positive(
                    "max_message_bytes",
                    sqs.max_message_bytes,
                    64 * limits::SQS_MAX_MESSAGE_BYTES,
                )
                .err(),
            );
            problems.extend(
                positive(
                    "max_request_bytes",
                    sqs.max_request_bytes,
                    64 * limits::SQS_MAX_REQUEST_BYTES,
                )
                .err(),
            );
            if sqs.max_message_bytes > sqs.max_request_bytes {
                problems.push(AwsConfigError::value(
                    key("max_message_bytes"),
                    format!(
                        "{} is over max_request_bytes ({})",
                        sqs.max_message_bytes, sqs.max_request_bytes
                    ),
                    "a message must fit in a request: lower max_message_bytes",
                ));
            }
        }
        DestinationConfig::Sns(sns) => {
            let topic = sns.topic_name();
            if topic.is_empty()
                || topic.len() > 256
                || !topic
                    .trim_end_matches(".fifo")
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                problems.push(AwsConfigError::value(
                    key("topic"),
                    format!("{:?} is not a topic name or ARN", sns.topic),
                    "use a topic name (letters, digits, - and _, up to 256, `.fifo` suffix for FIFO) or its ARN",
                ));
            }
            problems
                .extend(positive("max_entries", sns.max_entries, limits::SQS_MAX_ENTRIES).err());
            if !(crate::sqs::FIXED_ATTRIBUTES..=limits::SQS_MAX_ATTRIBUTES)
                .contains(&sns.max_attributes)
            {
                problems.push(AwsConfigError::value(
                    key("max_attributes"),
                    format!("{} is out of range", sns.max_attributes),
                    format!(
                        "use {} to {}",
                        crate::sqs::FIXED_ATTRIBUTES,
                        limits::SQS_MAX_ATTRIBUTES
                    ),
                ));
            }
            for (field, value) in [
                ("max_message_bytes", sns.max_message_bytes),
                ("max_request_bytes", sns.max_request_bytes),
            ] {
                problems.extend(positive(field, value, 64 * limits::SNS_MAX_MESSAGE_BYTES).err());
            }
            if sns.max_message_bytes > sns.max_request_bytes {
                problems.push(AwsConfigError::value(
                    key("max_message_bytes"),
                    format!(
                        "{} is over max_request_bytes ({})",
                        sns.max_message_bytes, sns.max_request_bytes
                    ),
                    "a message must fit in a request: lower max_message_bytes",
                ));
            }
        }
        DestinationConfig::Eventbridge(eb) => {
            if eb.bus.is_empty() {
                problems.push(AwsConfigError::value(
                    key("bus"),
                    "the bus name is empty",
                    "name a bus, or omit `bus` for the default bus",
                ));
            }
            for (field, template) in [("source", &eb.source), ("detail_type", &eb.detail_type)] {
                if let Err(problem) = parse_template(template) {
                    problems.push(AwsConfigError::value(
                        key(field),
                        problem,
                        "use text with the placeholders {aggregate_type} and {event_type}",
                    ));
                }
            }
            if eb.source.to_ascii_lowercase().starts_with("aws.") {
                problems.push(AwsConfigError::value(
                    key("source"),
                    format!("{:?} starts with `aws.`, which AWS reserves", eb.source),
                    "use your own prefix, e.g. \"outbox.{aggregate_type}\"",
                ));
            }
            problems.extend(
                positive(
                    "max_entries",
                    eb.max_entries,
                    limits::EVENTBRIDGE_MAX_ENTRIES,
                )
                .err(),
            );
            problems.extend(
                positive(
                    "max_entry_bytes",
                    eb.max_entry_bytes,
                    64 * limits::EVENTBRIDGE_MAX_ENTRY_BYTES,
                )
                .err(),
            );
            problems.extend(
                positive(
                    "max_request_bytes",
                    eb.max_request_bytes,
                    64 * limits::EVENTBRIDGE_MAX_REQUEST_BYTES,
                )
                .err(),
            );
            if eb.max_entry_bytes > eb.max_request_bytes {
                problems.push(AwsConfigError::value(
                    key("max_entry_bytes"),
                    format!(
                        "{} is over max_request_bytes ({})",
                        eb.max_entry_bytes, eb.max_request_bytes
                    ),
                    "an entry must fit in a request: lower max_entry_bytes",
                ));
            }
        }
    }
}

/// The placeholders EventBridge's `source` and `detail_type` templates may use.
const TEMPLATE_PLACEHOLDERS: &[Placeholder] = &[Placeholder::AggregateType, Placeholder::EventType];

/// Parses an EventBridge `source` or `detail_type` template (never empty: EventBridge requires
/// both fields).
pub(crate) fn parse_template(template: &str) -> Result<Template, String> {
    if template.is_empty() {
        return Err("the template is empty".into());
    }
    Template::parse(template, TEMPLATE_PLACEHOLDERS)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The configuration as the relay sees it: the core's checks, the registry's (routes, kinds,
    /// sections) and this crate's.
    fn load(text: &str, profile: &str) -> Result<AwsConfig, String> {
        let config = outbox::Config::from_toml_str(text, profile).map_err(|e| e.to_string())?;
        let registry = outbox::Registry::new().with(crate::Aws);
        registry
            .problems(&config)
            .into_result()
            .map_err(|e| e.to_string())?;
        AwsConfig::from_config(&config).map_err(|e| e.to_string())
    }

    const BASE: &str = r#"
        [default]
        default_destination = "bus"
        [default.destinations.orders]
        kind = "sqs"
        queue = "orders-events.fifo"
        [default.destinations.bus]
        kind = "eventbridge"
        bus = "app-bus"
        [[default.routes]]
        event_type = "OrderPlaced"
        aggregate_type = "order"
        destination = "orders"
        [default.aws]
    "#;

    #[test]
    fn parses_destinations_and_defaults() {
        let config = load(BASE, "local").unwrap();
        let DestinationConfig::Sqs(orders) = &config.destinations["orders"] else {
            panic!("orders is sqs")
        };
        assert!(orders.is_fifo());
        assert_eq!(orders.max_message_bytes, limits::SQS_MAX_MESSAGE_BYTES);
        let DestinationConfig::Eventbridge(bus) = &config.destinations["bus"] else {
            panic!("bus is eventbridge")
        };
        assert_eq!(bus.source, "outbox.{aggregate_type}");
    }

    #[test]
    fn errors_name_the_key_and_the_fix() {
        let err = load(&BASE.replace("queue = ", "queu = "), "local").unwrap_err();
        assert!(err.contains("queu"), "{err}");
        let err = load(&BASE.replace("kind = \"sqs\"", "kind = \"kafak\""), "local").unwrap_err();
        assert!(err.contains("kafak") && err.contains("sqs"), "{err}");
        let err = load(
            &BASE.replace("destination = \"orders\"", "destination = \"ordres\""),
            "local",
        )
        .unwrap_err();
        assert!(
            err.contains("routes[0].destination") && err.contains("orders"),
            "{err}"
        );
        let err = load(
            &format!("{BASE}\nendpoint = \"http://localhost:4566\"\n"),
            "prod",
        )
        .unwrap_err();
        assert!(
            err.contains("aws.endpoint") && err.contains("[local.aws]"),
            "{err}"
        );
        assert!(load(
            &format!("{BASE}\nendpoint = \"http://localhost:4566\"\n"),
            "local"
        )
        .is_ok());
        let err = load(
            &BASE.replace(
                "bus = \"app-bus\"",
                "bus = \"app-bus\"\nsource = \"{aggregate}\"",
            ),
            "local",
        )
        .unwrap_err();
        assert!(
            err.contains("destinations.bus.source") && err.contains("{aggregate}"),
            "{err}"
        );
        let err = load(
            &BASE.replace(
                "queue = \"orders-events.fifo\"",
                "queue = \"o.fifo\"\nmax_entries = 11",
            ),
            "local",
        )
        .unwrap_err();
        assert!(err.contains("destinations.orders.max_entries"), "{err}");
        let err = load(
            &format!(
                "{BASE}\n[default.destinations.topic]\nkind = \"sns\"\ntopic = \"bad topic\"\nmax_message_bytes = 300000\nmax_request_bytes = 262144\n"
            ),
            "local",
        )
        .unwrap_err();
        assert!(
            err.contains("destinations.topic.topic")
                && err.contains("destinations.topic.max_message_bytes"),
            "{err}"
        );
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = r#"
            [default]
            default_destination = "nowhere"
            [default.destinations.orders]
            kind = "sqs"
            queue = "bad queue name"
            max_entries = 11
            [default.destinations.bus]
            kind = "eventbridge"
            source = "aws.mine"
            [[default.routes]]
            event_type = "OrderPlaced"
            destination = "ordres"
            [default.aws]
            endpoint = "http://localhost:4566"
        "#;
        let err = load(text, "prod").unwrap_err();
        for key in [
            "destinations.orders.queue",
            "destinations.orders.max_entries",
            "destinations.bus.source",
            "routes[0].destination",
            "default_destination",
            "aws.endpoint",
        ] {
            assert!(err.contains(key), "{key} missing in:\n{err}");
        }
        assert!(err.starts_with("6 configuration problems"), "{err}");
    }

    #[test]
    fn cloudevents_binary_mode_is_refused_where_there_are_no_headers() {
        let text = r#"
            [default]
            default_destination = "orders"
            [default.destinations.orders]
            kind = "sqs"
            queue = "orders"
            body = "cloudevents-binary"
            [default.destinations.topic]
            kind = "sns"
            topic = "orders"
            body = "cloudevents-binary"
            [default.destinations.bus]
            kind = "eventbridge"
            detail = "cloudevents-binary"
        "#;
        let err = load(text, "local").unwrap_err();
        for key in [
            "destinations.orders.body",
            "destinations.topic.body",
            "destinations.bus.detail",
        ] {
            assert!(err.contains(key), "{key} missing in:\n{err}");
        }
        assert!(err.contains("body = \"cloudevents\""), "{err}");
    }

    #[test]
    fn the_largest_event_is_what_the_largest_destination_takes() {
        let registry = outbox::Registry::new().with(crate::Aws);
        let config = outbox::Config::from_toml_str(BASE, "local").unwrap();
        assert_eq!(
            registry.max_payload_bytes(&config),
            Some(limits::SQS_MAX_MESSAGE_BYTES)
        );
        assert_eq!(registry.payload_limit_warning(&config), None);
        let only_bus = BASE.replace(
            "kind = \"sqs\"\n        queue = \"orders-events.fifo\"",
            "kind = \"eventbridge\"",
        );
        let config = outbox::Config::from_toml_str(&only_bus, "local").unwrap();
        assert_eq!(
            registry.max_payload_bytes(&config),
            Some(limits::EVENTBRIDGE_MAX_ENTRY_BYTES)
        );
        // The default payload limit fits every built-in destination.
        const { assert!(outbox::event::DEFAULT_MAX_PAYLOAD_BYTES < limits::EVENTBRIDGE_MAX_ENTRY_BYTES) };
        let big = format!("{only_bus}\n[default.events]\nmax_payload_bytes = 4194304\n");
        let config = outbox::Config::from_toml_str(&big, "local").unwrap();
        let warning = registry.payload_limit_warning(&config).unwrap();
        assert!(
            warning.contains("events.max_payload_bytes (4194304)") && warning.contains("262144"),
            "{warning}"
        );
        let claim_check = format!("{big}\n[default.aws.large_payloads]\nbucket = \"b\"\n");
        let config = outbox::Config::from_toml_str(&claim_check, "local").unwrap();
        assert_eq!(registry.max_payload_bytes(&config), None);
        assert_eq!(registry.payload_limit_warning(&config), None);
    }

    #[test]
    fn queue_names_come_from_urls_too() {
        assert_eq!(
            queue_name_of("http://127.0.0.1:4566/123456789012/a.fifo"),
            "a.fifo"
        );
        assert_eq!(queue_name_of("plain"), "plain");
    }
}
