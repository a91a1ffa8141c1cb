//! An in-memory publisher with scripted faults, for tests and benchmarks of the engine.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use super::{publish_sequentially, PublishError, PublishResult, Publisher};
use crate::event::OutboxEvent;

/// A scripted failure for [`MemoryPublisher`]: how the next sends of an event fail.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Fail the next `n` attempts of the event with a retryable error.
    Retryable(u32),
    /// Fail every attempt with a permanent error.
    Permanent,
}

/// Keeps published events in memory, with scripted faults and an optional delay: for tests and
/// benchmarks of the engine. Never the only proof of a feature: see the tests against real brokers.
#[derive(Debug, Clone, Default)]
pub struct MemoryPublisher {
    inner: Arc<Mutex<MemoryState>>,
    delay: Option<std::time::Duration>,
    count_only: bool,
}

#[derive(Debug, Default)]
struct MemoryState {
    published: Vec<OutboxEvent>,
    count: u64,
    faults: HashMap<uuid::Uuid, Fault>,
    fault_by_type: HashMap<String, Fault>,
    /// While set, the whole broker is down: every event fails with this destination-level reason.
    outage: Option<String>,
    /// Publish calls made while down (the relay's probes).
    calls_while_down: u64,
}

impl MemoryPublisher {
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts events without keeping them: a null publisher for benchmarks.
    pub fn counting() -> Self {
        Self {
            count_only: true,
            ..Self::default()
        }
    }

    /// Sleeps this long in every `publish` call, to simulate a slow or hung broker.
    pub fn with_delay(mut self, delay: std::time::Duration) -> Self {
        self.delay = Some(delay);
        self
    }

    pub fn fail(&self, id: uuid::Uuid, fault: Fault) {
        self.state().faults.insert(id, fault);
    }

    pub fn fail_event_type(&self, event_type: &str, fault: Fault) {
        self.state()
            .fault_by_type
            .insert(event_type.to_owned(), fault);
    }

    /// Takes the broker down (`Some(reason)`: every event fails with
    /// [`PublishError::Unavailable`]) or brings it back (`None`).
    pub fn set_outage(&self, reason: Option<&str>) {
        self.state().outage = reason.map(str::to_owned);
    }

    /// How many publish calls reached this publisher while it was down.
    pub fn calls_while_down(&self) -> u64 {
        self.state().calls_while_down
    }

    /// Everything published so far, in publish order (duplicates included).
    pub fn published(&self) -> Vec<OutboxEvent> {
        self.state().published.clone()
    }

    pub fn count(&self) -> u64 {
        self.state().count
    }

    fn state(&self) -> std::sync::MutexGuard<'_, MemoryState> {
        // A panic while holding this lock only happens in a failing test; keep going with its data.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn send_one(&self, event: &OutboxEvent) -> PublishResult {
        let mut state = self.state();
        let fault = match state.faults.get_mut(&event.id) {
            Some(f) => Some(f),
            None => state.fault_by_type.get_mut(&event.event_type),
        };
        match fault {
            Some(Fault::Permanent) => {
                return Err(PublishError::permanent(format!(
                    "scripted permanent failure of {}",
                    event.id
                )))
            }
            Some(Fault::Retryable(n)) if *n > 0 => {
                *n -= 1;
                return Err(PublishError::retryable(format!(
                    "scripted retryable failure of {}",
                    event.id
                )));
            }
            _ => {}
        }
        state.count += 1;
        if !self.count_only {
            state.published.push(event.clone());
        }
        Ok(())
    }
}

#[async_trait]
impl Publisher for MemoryPublisher {
    async fn publish(&self, batch: &[OutboxEvent]) -> Vec<PublishResult> {
        if let Some(delay) = self.delay {
            tokio::time::sleep(delay).await;
        }
        {
            let mut state = self.state();
            if let Some(reason) = state.outage.clone() {
                state.calls_while_down += 1;
                return vec![Err(PublishError::unavailable(reason)); batch.len()];
            }
        }
        publish_sequentially(batch, |event| std::future::ready(self.send_one(event))).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::empty_object;

    fn event(seq: i64, key: &str) -> OutboxEvent {
        OutboxEvent {
            id: uuid::Uuid::now_v7(),
            seq,
            aggregate_type: "t".into(),
            aggregate_id: key.into(),
            event_type: "E".into(),
            payload: empty_object(),
            headers: Default::default(),
            destination: None,
            created_at: chrono::Utc::now(),
            attempts: 0,
        }
    }

    #[tokio::test]
    async fn a_failure_stops_only_its_own_key() {
        let batch = vec![event(1, "a"), event(2, "b"), event(3, "a"), event(4, "b")];
        let publisher = MemoryPublisher::new();
        publisher.fail(batch[0].id, Fault::Retryable(1));
        let results = publisher.publish(&batch).await;
        assert!(results[0].as_ref().unwrap_err().is_retryable());
        assert!(results[1].is_ok());
        assert!(results[2]
            .as_ref()
            .unwrap_err()
            .reason()
            .contains("earlier event"));
        assert!(results[3].is_ok());
        let seqs: Vec<i64> = publisher.published().iter().map(|e| e.seq).collect();
        assert_eq!(seqs, vec![2, 4]);
    }
}
