//! The routing publisher: one relay, several destinations of different kinds.
//!
//! Each event goes to its explicit `destination`, else the first matching `[[routes]]` entry, else
//! `aws.default_destination`; with none of those it fails permanently with a reason naming the
//! missing route (so it dead-letters instead of retrying forever).
//!
//! Per-key order across destinations: a key whose events in one batch go to different destinations
//! is sent in rounds. Each round hands every destination, for every key, the leading run of that
//! key's unsent events bound for it; destinations are called concurrently. The next run of a key
//! goes out only after its previous run succeeded, so a failure anywhere stops the key.

use std::collections::BTreeMap;

use async_trait::async_trait;
use futures_util::future::join_all;
use outbox::publisher::skipped_after_failure;
use outbox::{OutboxEvent, PublishError, PublishResult, Publisher};

use crate::claim_check::Offloader;
use crate::config::{AwsConfig, AwsConfigError, DestinationConfig};
use crate::eventbridge::EventBridgePublisher;
use crate::sdk::{effective_endpoint, AwsClients, Service};
use crate::sqs::SqsPublisher;

/// A configured destination.
#[derive(Debug)]
pub enum Destination {
    Sqs(SqsPublisher),
    EventBridge(EventBridgePublisher),
}

#[async_trait]
impl Publisher for Destination {
    async fn publish(&self, batch: &[OutboxEvent]) -> Vec<PublishResult> {
        match self {
            Self::Sqs(p) => p.publish(batch).await,
            Self::EventBridge(p) => p.publish(batch).await,
        }
    }
    async fn check(&self) -> Result<(), PublishError> {
        match self {
            Self::Sqs(p) => p.check().await,
            Self::EventBridge(p) => p.check().await,
        }
    }
}

/// Publishes each event to the destination its route names. See the [module docs](self).
#[derive(Debug)]
pub struct RoutingPublisher {
    config: AwsConfig,
    destinations: BTreeMap<String, Destination>,
    clients: AwsClients,
    offloader: Option<Offloader>,
}

impl RoutingPublisher {
    /// Builds the destinations of a validated configuration over existing clients.
    pub fn new(config: AwsConfig, clients: AwsClients) -> Self {
        let settings = config.settings();
        let offloader = config.aws.large_payloads.clone().map(|lp| Offloader {
            s3: clients.s3.clone(),
            config: lp,
        });
        let destinations = config
            .destinations
            .iter()
            .map(|(name, destination)| {
                let built = match destination {
                    DestinationConfig::Sqs(sqs) => Destination::Sqs(SqsPublisher::new(
                        name,
                        sqs.clone(),
                        clients.sqs.clone(),
                        offloader.clone(),
                        config.profile,
                        effective_endpoint(&settings, Service::Sqs),
                    )),
                    DestinationConfig::Eventbridge(eb) => {
                        Destination::EventBridge(EventBridgePublisher::new(
                            name,
                            eb.clone(),
                            clients.eventbridge.clone(),
                            offloader.clone(),
                            config.profile,
                            effective_endpoint(&settings, Service::EventBridge),
                        ))
                    }
                };
                (name.clone(), built)
            })
            .collect();
        Self {
            config,
            destinations,
            clients,
            offloader,
        }
    }

    /// Reads the configuration and builds the clients for its profile.
    pub async fn from_config(config: &outbox::Config) -> Result<Self, AwsConfigError> {
        let aws = AwsConfig::from_config(config)?;
        let clients = AwsClients::new(&aws.settings()).await?;
        Ok(Self::new(aws, clients))
    }

    pub fn config(&self) -> &AwsConfig {
        &self.config
    }

    pub fn clients(&self) -> &AwsClients {
        &self.clients
    }

    pub fn destination(&self, name: &str) -> Option<&Destination> {
        self.destinations.get(name)
    }

    async fn check_bucket(&self) -> Result<(), String> {
        let Some(offloader) = &self.offloader else {
            return Ok(());
        };
        let bucket = &offloader.config.bucket;
        match offloader.s3.head_bucket().bucket(bucket).send().await {
            Ok(_) => Ok(()),
            Err(e) => Err(format!(
                "large-payload bucket `{bucket}` (aws.large_payloads.bucket) is not usable: {}; {}",
                crate::errors::error_chain(&e),
                if self.config.profile.is_local() {
                    "run `outbox aws bootstrap` to create it on the emulator"
                } else {
                    "create the bucket and grant the relay s3:PutObject on it, or fix the name"
                }
            )),
        }
    }
}

#[async_trait]
impl Publisher for RoutingPublisher {
    async fn publish(&self, batch: &[OutboxEvent]) -> Vec<PublishResult> {
        let routes: Vec<Result<&str, String>> =
            batch.iter().map(|e| self.config.route(e)).collect();

        // The common case: one destination for the whole batch, no copies.
        if let Some(Ok(first)) = routes.first() {
            if routes.iter().all(|r| r.as_ref().ok() == Some(first)) {
                if let Some(destination) = self.destinations.get(*first) {
                    return destination.publish(batch).await;
                }
            }
        }

        let mut results: Vec<Option<PublishResult>> = vec![None; batch.len()];
        let mut queues = crate::batch::key_queues(batch);

        loop {
            // This round: per destination, the event indices to send (in seq order), and per key
            // the run it sends.
            let mut round: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
            let mut runs: Vec<(usize, Vec<usize>)> = Vec::new();
            for (q, queue) in queues.iter_mut().enumerate() {
                let Some(&head) = queue.front() else { continue };
                match &routes[head] {
                    Err(reason) => {
                        queue.pop_front();
                        results[head] = Some(Err(PublishError::permanent(reason.clone())));
                        for later in queue.drain(..) {
                            results[later] = Some(Err(skipped_after_failure(&batch[head])));
                        }
                    }
                    Ok(destination) => {
                        let mut run = Vec::new();
                        while let Some(&i) = queue.front() {
                            if routes[i].as_ref().ok() != Some(destination) {
                                break;
                            }
                            run.push(i);
                            queue.pop_front();
                        }
                        round.entry(*destination).or_default().extend(&run);
                        runs.push((q, run));
                    }
                }
            }
            if round.is_empty() {
                break;
            }

            let calls = round.into_iter().map(|(name, mut indices)| {
                indices.sort_unstable(); // seq order, as the batch is
                let events: Vec<OutboxEvent> = indices.iter().map(|&i| batch[i].clone()).collect();
                async move {
                    let out = match self.destinations.get(name) {
                        Some(destination) => destination.publish(&events).await,
                        // Routes are validated against the destinations; keep the contract anyway.
                        None => vec![
                            Err(PublishError::permanent(format!(
                                "destination `{name}` is not configured"
                            )));
                            events.len()
                        ],
                    };
                    (indices, out)
                }
            });
            for (indices, out) in join_all(calls).await {
                for (i, result) in indices.into_iter().zip(out) {
                    results[i] = Some(result);
                }
            }

            for (q, run) in runs {
                if let Some(&failed) = run.iter().find(|&&i| matches!(results[i], Some(Err(_)))) {
                    for later in queues[q].drain(..) {
                        results[later] = Some(Err(skipped_after_failure(&batch[failed])));
                    }
                }
            }
        }

        results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    Err(PublishError::retryable("internal: event was not scheduled"))
                })
            })
            .collect()
    }

    /// The route's destination name, so that the relay holds back only the events of a
    /// destination that is down.
    fn destination_of(&self, event: &OutboxEvent) -> String {
        match self.config.route(event) {
            Ok(name) => name.to_owned(),
            Err(_) => "(no route)".to_owned(),
        }
    }

    /// Verifies every destination (and the large-payload bucket) exists; all problems at once.
    async fn check(&self) -> Result<(), PublishError> {
        let mut problems = Vec::new();
        for destination in self.destinations.values() {
            if let Err(e) = destination.check().await {
                problems.push(e.reason().to_owned());
            }
        }
        if let Err(problem) = self.check_bucket().await {
            problems.push(problem);
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(PublishError::permanent(problems.join("; ")))
        }
    }
}
