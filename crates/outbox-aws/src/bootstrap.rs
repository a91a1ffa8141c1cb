//! `outbox aws bootstrap`: creates what the `local` profile needs on the emulator: every
//! destination's queue or bus, the `[aws.bootstrap]` queues, rules (with SQS targets) and DynamoDB
//! tables, and the large-payload bucket. Idempotent: what exists is left as it is.
//!
//! It refuses to run for `dev`/`prod`: real infrastructure belongs to the infrastructure tool.

use std::time::Duration;

use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
    TimeToLiveSpecification,
};
use aws_sdk_eventbridge::types::{SqsParameters, Target};
use aws_sdk_s3::types::{BucketLocationConstraint, CreateBucketConfiguration};
use aws_sdk_sqs::types::QueueAttributeName;
use serde::Serialize;

use crate::config::{
    AwsConfig, AwsConfigError, DestinationConfig, RedriveSpec, RuleSpec, TableSpec,
};
use crate::errors::{error_chain, service_code};
use crate::sdk::AwsClients;

/// What bootstrap did, one line per resource (e.g. `sqs queue orders.fifo`).
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct BootstrapReport {
    pub created: Vec<String>,
    pub existing: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("`aws bootstrap` creates infrastructure and runs only with the local profile (this is `{0}`): \
             create queues, buses and buckets for dev/prod with your infrastructure tool")]
    NotLocal(String),
    #[error(transparent)]
    Config(#[from] AwsConfigError),
    #[error("bootstrap could not create {what}: {reason}; is the emulator running (`scripts/aws-emulator.sh start`)?")]
    Aws { what: String, reason: String },
}

fn aws_error(what: impl Into<String>, e: &(dyn std::error::Error + 'static)) -> BootstrapError {
    BootstrapError::Aws {
        what: what.into(),
        reason: error_chain(e),
    }
}

/// Reads the configuration and bootstraps its profile (local only).
pub async fn bootstrap(config: &outbox::Config) -> Result<BootstrapReport, BootstrapError> {
    let aws = AwsConfig::from_config(config)?;
    if !aws.profile.is_local() {
        return Err(BootstrapError::NotLocal(aws.profile.to_string()));
    }
    let clients = AwsClients::new(&aws.settings()).await?;
    bootstrap_with(&aws, &clients).await
}

/// Bootstraps with existing clients (local profile only).
pub async fn bootstrap_with(
    aws: &AwsConfig,
    clients: &AwsClients,
) -> Result<BootstrapReport, BootstrapError> {
    if !aws.profile.is_local() {
        return Err(BootstrapError::NotLocal(aws.profile.to_string()));
    }
    let mut report = BootstrapReport::default();
    for destination in aws.destinations.values() {
        match destination {
            DestinationConfig::Sqs(sqs) => {
                ensure_queue(clients, sqs.queue_name(), &mut report).await?;
            }
            DestinationConfig::Sns(sns) => {
                ensure_topic(clients, sns.topic_name(), &mut report).await?;
            }
            DestinationConfig::Eventbridge(eb) => ensure_bus(clients, &eb.bus, &mut report).await?,
        }
    }
    for queue in &aws.aws.bootstrap.queues {
        ensure_queue(clients, queue, &mut report).await?;
    }
    for rule in &aws.aws.bootstrap.rules {
        ensure_bus(clients, &rule.bus, &mut report).await?;
        ensure_rule(clients, rule, &mut report).await?;
    }
    if let Some(large) = &aws.aws.large_payloads {
        ensure_bucket(clients, &large.bucket, &mut report).await?;
    }
    for table in &aws.aws.bootstrap.tables {
        ensure_table(clients, table, &mut report).await?;
    }
    for redrive in &aws.aws.bootstrap.redrive {
        ensure_redrive(clients, redrive, &mut report).await?;
    }
    Ok(report)
}

/// Creates the dead-letter queue and sets the source queue's redrive policy (and visibility
/// timeout). SetQueueAttributes is an upsert: a re-run converges to the configuration.
async fn ensure_redrive(
    clients: &AwsClients,
    redrive: &RedriveSpec,
    report: &mut BootstrapReport,
) -> Result<(), BootstrapError> {
    let dlq_url = ensure_queue(clients, &redrive.dead_letter_queue, report).await?;
    let what = format!("the ARN of queue {}", redrive.dead_letter_queue);
    let dlq_arn = clients
        .sqs
        .get_queue_attributes()
        .queue_url(&dlq_url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .map_err(|e| aws_error(&what, &e))?
        .attributes()
        .and_then(|a| a.get(&QueueAttributeName::QueueArn))
        .cloned()
        .ok_or_else(|| BootstrapError::Aws {
            what,
            reason: "GetQueueAttributes returned no QueueArn".into(),
        })?;
    let url = ensure_queue(clients, &redrive.queue, report).await?;
    let policy = serde_json::json!({
        "deadLetterTargetArn": dlq_arn,
        "maxReceiveCount": redrive.max_receive_count.to_string(),
    });
    let mut set = clients
        .sqs
        .set_queue_attributes()
        .queue_url(&url)
        .attributes(QueueAttributeName::RedrivePolicy, policy.to_string());
    if let Some(seconds) = redrive.visibility_timeout_seconds {
        set = set.attributes(QueueAttributeName::VisibilityTimeout, seconds.to_string());
    }
    let what = format!(
        "redrive policy sqs queue {} -> {} after {} receives",
        redrive.queue, redrive.dead_letter_queue, redrive.max_receive_count
    );
    set.send().await.map_err(|e| aws_error(&what, &e))?;
    report.created.push(what);
    Ok(())
}

/// Creates the queue if missing (FIFO for a `.fifo` name); returns its URL.
pub async fn ensure_queue(
    clients: &AwsClients,
    name: &str,
    report: &mut BootstrapReport,
) -> Result<String, BootstrapError> {
    let what = format!("sqs queue {name}");
    if let Ok(out) = clients.sqs.get_queue_url().queue_name(name).send().await {
        if let Some(url) = out.queue_url() {
            report.existing.push(what);
            return Ok(url.to_owned());
        }
    }
    let mut create = clients.sqs.create_queue().queue_name(name);
    if name.ends_with(".fifo") {
        // Deduplication by MessageDeduplicationId (the event id), not by content: two events with
        // equal payloads are still two events.
        create = create
            .attributes(QueueAttributeName::FifoQueue, "true")
            .attributes(QueueAttributeName::ContentBasedDeduplication, "false");
    }
    let out = create.send().await.map_err(|e| aws_error(&what, &e))?;
    report.created.push(what.clone());
    out.queue_url()
        .map(str::to_owned)
        .ok_or(BootstrapError::Aws {
            what,
            reason: "CreateQueue returned no URL".into(),
        })
}

/// The bus name of a name or ARN (`arn:aws:events:…:event-bus/NAME`).
fn bus_name(bus: &str) -> &str {
    bus.rsplit_once("event-bus/").map_or(bus, |(_, name)| name)
}

/// Creates an SNS topic (FIFO when its name ends in `.fifo`); CreateTopic is idempotent and returns
/// the topic's ARN.
pub(crate) async fn ensure_topic(
    clients: &AwsClients,
    name: &str,
    report: &mut BootstrapReport,
) -> Result<String, BootstrapError> {
    let what = format!("sns topic {name}");
    let existing = crate::sns::find_topic_arn(&clients.sns, name)
        .await
        .map_err(|reason| BootstrapError::Aws {
            what: what.clone(),
            reason,
        })?;
    if let Some(arn) = existing {
        report.existing.push(what);
        return Ok(arn);
    }
    let mut request = clients.sns.create_topic().name(name);
    if name.ends_with(".fifo") {
        request = request.attributes("FifoTopic", "true");
    }
    let arn = request
        .send()
        .await
        .map_err(|e| aws_error(what.clone(), &e))?
        .topic_arn()
        .map(str::to_owned)
        .ok_or_else(|| BootstrapError::Aws {
            what: what.clone(),
            reason: "CreateTopic returned no ARN".into(),
        })?;
    report.created.push(what);
    Ok(arn)
}

async fn ensure_bus(
    clients: &AwsClients,
    bus: &str,
    report: &mut BootstrapReport,
) -> Result<(), BootstrapError> {
    let name = bus_name(bus);
    if name == "default" {
        return Ok(()); // every account has it
    }
    let what = format!("eventbridge bus {name}");
    if clients
        .eventbridge
        .describe_event_bus()
        .name(name)
        .send()
        .await
        .is_ok()
    {
        report.existing.push(what);
        return Ok(());
    }
    match clients
        .eventbridge
        .create_event_bus()
        .name(name)
        .send()
        .await
    {
        Ok(_) => report.created.push(what),
        Err(e) if service_code(&e).as_deref() == Some("ResourceAlreadyExistsException") => {
            report.existing.push(what)
        }
        Err(e) => return Err(aws_error(what, &e)),
    }
    Ok(())
}

async fn ensure_rule(
    clients: &AwsClients,
    rule: &RuleSpec,
    report: &mut BootstrapReport,
) -> Result<(), BootstrapError> {
    let what = format!(
        "eventbridge rule {} on bus {}",
        rule.name,
        bus_name(&rule.bus)
    );
    let url = ensure_queue(clients, &rule.target_queue, report).await?;
    let attrs = clients
        .sqs
        .get_queue_attributes()
        .queue_url(&url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .map_err(|e| aws_error(format!("the ARN of queue {}", rule.target_queue), &e))?;
    let arn = attrs
        .attributes()
        .and_then(|a| a.get(&QueueAttributeName::QueueArn))
        .cloned()
        .ok_or_else(|| BootstrapError::Aws {
            what: format!("the ARN of queue {}", rule.target_queue),
            reason: "GetQueueAttributes returned no QueueArn".into(),
        })?;
    // PutRule and PutTargets are upserts: running bootstrap again converges to the configuration.
    clients
        .eventbridge
        .put_rule()
        .name(&rule.name)
        .event_bus_name(bus_name(&rule.bus))
        .event_pattern(&rule.event_pattern)
        .send()
        .await
        .map_err(|e| aws_error(&what, &e))?;
    let mut target = Target::builder().id(target_id(&rule.target_queue)).arn(arn);
    if rule.target_queue.ends_with(".fifo") {
        let group = rule
            .message_group_id
            .clone()
            .unwrap_or_else(|| "outbox".to_owned());
        target = target.sqs_parameters(SqsParameters::builder().message_group_id(group).build());
    }
    let target = target
        .build()
        .map_err(|e| aws_error(format!("the target of {what}"), &e))?;
    let out = clients
        .eventbridge
        .put_targets()
        .rule(&rule.name)
        .event_bus_name(bus_name(&rule.bus))
        .targets(target)
        .send()
        .await
        .map_err(|e| aws_error(format!("the target of {what}"), &e))?;
    if out.failed_entry_count() > 0 {
        let reasons: Vec<String> = out
            .failed_entries()
            .iter()
            .map(|f| {
                format!(
                    "{}: {}",
                    f.error_code().unwrap_or("?"),
                    f.error_message().unwrap_or("?")
                )
            })
            .collect();
        return Err(BootstrapError::Aws {
            what: format!("the target of {what}"),
            reason: reasons.join("; "),
        });
    }
    report
        .created
        .push(format!("{what} -> sqs queue {}", rule.target_queue));
    Ok(())
}

/// Target ids: up to 64 of `[A-Za-z0-9._-]`.
fn target_id(queue: &str) -> String {
    let id: String = queue
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    id
}

async fn ensure_bucket(
    clients: &AwsClients,
    bucket: &str,
    report: &mut BootstrapReport,
) -> Result<(), BootstrapError> {
    let what = format!("s3 bucket {bucket}");
    if clients.s3.head_bucket().bucket(bucket).send().await.is_ok() {
        report.existing.push(what);
        return Ok(());
    }
    let mut create = clients.s3.create_bucket().bucket(bucket);
    // us-east-1 is the one region that refuses an explicit location constraint.
    if let Some(region) = clients.s3.config().region().map(|r| r.as_ref().to_owned()) {
        if region != "us-east-1" {
            create = create.create_bucket_configuration(
                CreateBucketConfiguration::builder()
                    .location_constraint(BucketLocationConstraint::from(region.as_str()))
                    .build(),
            );
        }
    }
    match create.send().await {
        Ok(_) => report.created.push(what),
        Err(e)
            if matches!(
                service_code(&e).as_deref(),
                Some("BucketAlreadyOwnedByYou" | "BucketAlreadyExists")
            ) =>
        {
            report.existing.push(what)
        }
        Err(e) => return Err(aws_error(what, &e)),
    }
    Ok(())
}

async fn ensure_table(
    clients: &AwsClients,
    table: &TableSpec,
    report: &mut BootstrapReport,
) -> Result<(), BootstrapError> {
    let what = format!("dynamodb table {}", table.name);
    let db = &clients.dynamodb;
    if db
        .describe_table()
        .table_name(&table.name)
        .send()
        .await
        .is_ok()
    {
        report.existing.push(what);
        return Ok(());
    }
    let attribute = |name: &str| {
        AttributeDefinition::builder()
            .attribute_name(name)
            .attribute_type(ScalarAttributeType::S)
            .build()
    };
    let key = |name: &str, kind: KeyType| {
        KeySchemaElement::builder()
            .attribute_name(name)
            .key_type(kind)
            .build()
    };
    let mut create = db
        .create_table()
        .table_name(&table.name)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(attribute(&table.partition_key).map_err(|e| aws_error(&what, &e))?)
        .key_schema(key(&table.partition_key, KeyType::Hash).map_err(|e| aws_error(&what, &e))?);
    if let Some(sort) = &table.sort_key {
        create = create
            .attribute_definitions(attribute(sort).map_err(|e| aws_error(&what, &e))?)
            .key_schema(key(sort, KeyType::Range).map_err(|e| aws_error(&what, &e))?);
    }
    match create.send().await {
        Ok(_) => report.created.push(what.clone()),
        Err(e) if service_code(&e).as_deref() == Some("ResourceInUseException") => {
            report.existing.push(what);
            return Ok(());
        }
        Err(e) => return Err(aws_error(what, &e)),
    }
    // Tables are usable when ACTIVE (emulators: at once; bounded wait for anything slower).
    for _ in 0..50 {
        let active = db
            .describe_table()
            .table_name(&table.name)
            .send()
            .await
            .ok()
            .and_then(|d| d.table().and_then(|t| t.table_status().cloned()))
            .is_some_and(|s| s == aws_sdk_dynamodb::types::TableStatus::Active);
        if active {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if let Some(ttl) = &table.ttl_attribute {
        let spec = TimeToLiveSpecification::builder()
            .attribute_name(ttl)
            .enabled(true)
            .build()
            .map_err(|e| aws_error(format!("TTL of {what}"), &e))?;
        db.update_time_to_live()
            .table_name(&table.name)
            .time_to_live_specification(spec)
            .send()
            .await
            .map_err(|e| aws_error(format!("TTL of {what}"), &e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bus_names_and_target_ids() {
        assert_eq!(
            bus_name("arn:aws:events:us-east-1:123:event-bus/app"),
            "app"
        );
        assert_eq!(bus_name("app"), "app");
        assert_eq!(target_id("billing.fifo"), "billing.fifo");
        assert_eq!(target_id(&"q".repeat(80)).len(), 64);
    }
}
