//! One relay, several named destinations of any kinds.
//!
//! Each event goes to its explicit `destination` column, else the first matching `[[routes]]`
//! entry, else `default_destination`; with none of those it fails permanently with a reason naming
//! the missing route, so it dead-letters instead of retrying forever.
//!
//! Per-key order across destinations: a key whose events in one batch go to different destinations
//! is sent in rounds. Each round hands every destination, for every key, the leading run of that
//! key's unsent events bound for it; destinations are called concurrently. The next run of a key
//! goes out only after its previous run succeeded, so a failure anywhere stops the key.

use std::collections::BTreeMap;
use std::fmt;

use async_trait::async_trait;
use futures_util::future::join_all;
use serde::{Deserialize, Serialize};

use super::batch::key_queues;
use super::{skipped_after_failure, PublishError, PublishResult, Publisher};
use crate::event::OutboxEvent;

/// The name [`Router::destination_of`] gives events that have no route.
pub const NO_ROUTE: &str = "(no route)";

/// `[[routes]]`: the first route whose conditions all match an event names its destination.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Matches events of this type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_type: Option<String>,
    /// Matches events of this aggregate type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggregate_type: Option<String>,
    /// The destination (a key of `[destinations]`) of the events it matches.
    pub destination: String,
}

impl RouteConfig {
    /// Whether every condition of the route holds for `event`.
    pub fn matches(&self, event: &OutboxEvent) -> bool {
        self.event_type
            .as_deref()
            .is_none_or(|t| t == event.event_type)
            && self
                .aggregate_type
                .as_deref()
                .is_none_or(|t| t == event.aggregate_type)
    }
}

impl fmt::Display for RouteConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(t) = &self.event_type {
            parts.push(format!("event_type = {t:?}"));
        }
        if let Some(t) = &self.aggregate_type {
            parts.push(format!("aggregate_type = {t:?}"));
        }
        write!(f, "{{ {} }} -> {}", parts.join(", "), self.destination)
    }
}

/// Which destination each event goes to: the routing rules over a set of destination names.
#[derive(Debug, Clone, Default)]
pub struct Routes {
    names: Vec<String>,
    routes: Vec<RouteConfig>,
    default: Option<String>,
}

impl Routes {
    /// Rules over the destinations `names`.
    pub fn new(
        names: impl IntoIterator<Item = String>,
        routes: Vec<RouteConfig>,
        default: Option<String>,
    ) -> Self {
        let mut names: Vec<String> = names.into_iter().collect();
        names.sort();
        names.dedup();
        Self {
            names,
            routes,
            default,
        }
    }

    /// The destination names the rules are over, sorted.
    pub fn destinations(&self) -> &[String] {
        &self.names
    }

    /// The `[[routes]]`, in order.
    pub fn rules(&self) -> &[RouteConfig] {
        &self.routes
    }

    /// `default_destination`, if set.
    pub fn default_destination(&self) -> Option<&str> {
        self.default.as_deref()
    }

    /// Whether `name` is one of the destinations.
    pub fn is_known(&self, name: &str) -> bool {
        self.names.iter().any(|n| n == name)
    }

    /// The destination of an event: its explicit `destination`, else the first matching route,
    /// else the default. The error is the reason the event dead-letters with.
    pub fn route<'a>(&'a self, event: &OutboxEvent) -> Result<&'a str, String> {
        if let Some(explicit) = &event.destination {
            return match self.names.iter().find(|n| *n == explicit) {
                Some(name) => Ok(name.as_str()),
                None => Err(format!(
                    "event names destination `{explicit}`, which is not configured: add \
                     [destinations.{explicit}] or fix the producer (configured: {})",
                    self.names.join(", ")
                )),
            };
        }
        if let Some(route) = self.routes.iter().find(|r| r.matches(event)) {
            return Ok(route.destination.as_str());
        }
        if let Some(default) = &self.default {
            return Ok(default.as_str());
        }
        Err(format!(
            "no route for event_type `{}` / aggregate_type `{}`: add a [[routes]] entry with \
             event_type = {:?} or aggregate_type = {:?}, or set default_destination",
            event.event_type, event.aggregate_type, event.event_type, event.aggregate_type
        ))
    }
}

/// Publishes each event to the destination its route names. See the [module docs](self).
pub struct Router {
    routes: Routes,
    destinations: BTreeMap<String, Box<dyn Publisher>>,
}

impl fmt::Debug for Router {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Router")
            .field("routes", &self.routes)
            .field(
                "destinations",
                &self.destinations.keys().collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Router {
    /// A router over built destinations; `routes` must name only these destinations
    /// (the registry found no problem with the routes).
    pub fn new(routes: Routes, destinations: BTreeMap<String, Box<dyn Publisher>>) -> Self {
        Self {
            routes,
            destinations,
        }
    }

    /// The routing rules.
    pub fn routes(&self) -> &Routes {
        &self.routes
    }

    /// A destination by name.
    pub fn destination(&self, name: &str) -> Option<&dyn Publisher> {
        self.destinations.get(name).map(|p| p.as_ref())
    }

    /// The destinations' names.
    pub fn destination_names(&self) -> impl Iterator<Item = &str> {
        self.destinations.keys().map(String::as_str)
    }

    async fn publish_to(&self, name: &str, events: &[OutboxEvent]) -> Vec<PublishResult> {
        match self.destinations.get(name) {
            Some(destination) => destination.publish(events).await,
            // Routes are validated against the destinations; keep the contract anyway.
            None => vec![
                Err(PublishError::permanent(format!(
                    "destination `{name}` is not configured"
                )));
                events.len()
            ],
        }
    }
}

#[async_trait]
impl Publisher for Router {
    async fn publish(&self, batch: &[OutboxEvent]) -> Vec<PublishResult> {
        let routes: Vec<Result<&str, String>> =
            batch.iter().map(|e| self.routes.route(e)).collect();

        // The common case: one destination for the whole batch, no copies.
        if let Some(Ok(first)) = routes.first() {
            if routes.iter().all(|r| r.as_ref().ok() == Some(first)) {
                return self.publish_to(first, batch).await;
            }
        }

        let mut results: Vec<Option<PublishResult>> = vec![None; batch.len()];
        let mut queues = key_queues(batch);

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
                    let out = self.publish_to(name, &events).await;
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
        match self.routes.route(event) {
            Ok(name) => name.to_owned(),
            Err(_) => NO_ROUTE.to_owned(),
        }
    }

    /// Checks every destination; all problems at once, each with its destination's name.
    async fn check(&self) -> Result<(), PublishError> {
        let checks = self.destinations.iter().map(|(name, d)| async move {
            d.check()
                .await
                .map_err(|e| format!("destination `{name}`: {}", e.reason()))
        });
        let problems: Vec<String> = join_all(checks)
            .await
            .into_iter()
            .filter_map(Result::err)
            .collect();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(PublishError::permanent(problems.join("; ")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publisher::{Fault, MemoryPublisher};

    fn event(seq: i64, key: &str, event_type: &str) -> OutboxEvent {
        serde_json::from_value(serde_json::json!({
            "id": uuid::Uuid::now_v7(), "seq": seq, "aggregate_type": "order",
            "aggregate_id": key, "event_type": event_type, "payload": {},
            "created_at": "2026-01-01T00:00:00Z"
        }))
        .unwrap()
    }

    fn router(a: &MemoryPublisher, b: &MemoryPublisher, default: Option<&str>) -> Router {
        let routes = Routes::new(
            ["a".to_owned(), "b".to_owned()],
            vec![RouteConfig {
                event_type: Some("ToB".into()),
                aggregate_type: None,
                destination: "b".into(),
            }],
            default.map(str::to_owned),
        );
        let mut destinations: BTreeMap<String, Box<dyn Publisher>> = BTreeMap::new();
        destinations.insert("a".into(), Box::new(a.clone()));
        destinations.insert("b".into(), Box::new(b.clone()));
        Router::new(routes, destinations)
    }

    #[tokio::test]
    async fn a_key_across_destinations_keeps_its_order_and_stops_at_a_failure() {
        let (a, b) = (MemoryPublisher::new(), MemoryPublisher::new());
        let r = router(&a, &b, Some("a"));
        let batch = vec![
            event(1, "k", "E"),
            event(2, "k", "ToB"),
            event(3, "k", "E"),
            event(4, "j", "ToB"),
        ];
        b.fail(batch[1].id, Fault::Retryable(1));
        let results = r.publish(&batch).await;
        assert!(results[0].is_ok());
        assert!(results[1].as_ref().unwrap_err().is_retryable());
        assert!(results[2]
            .as_ref()
            .unwrap_err()
            .reason()
            .contains("earlier event"));
        assert!(results[3].is_ok());
        assert_eq!(a.published().len(), 1);
        assert_eq!(b.published().len(), 1);
        assert_eq!(r.destination_of(&batch[1]), "b");
    }

    #[tokio::test]
    async fn an_event_without_a_route_is_permanent_with_the_fix() {
        let (a, b) = (MemoryPublisher::new(), MemoryPublisher::new());
        let r = router(&a, &b, None);
        let results = r.publish(&[event(1, "k", "E")]).await;
        let err = results[0].as_ref().unwrap_err();
        assert!(!err.is_retryable());
        assert!(err.reason().contains("[[routes]]"), "{err}");
        assert_eq!(r.destination_of(&event(2, "k", "E")), NO_ROUTE);
    }
}
