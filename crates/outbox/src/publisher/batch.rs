//! The per-key batching engine, for publishers whose broker takes several messages per request
//! (SQS, EventBridge, SNS, Kafka, ...): implement [`Sink`] and call [`publish_in_waves`].
//!
//! A batch is sent in *waves*: each wave takes the next unsent event of every key, so a request
//! never holds two events of one key. Within a wave the events are independent: they are packed
//! into requests (entry count and byte limits) sent concurrently. Only when a wave is settled does
//! the next event of a key go out, and a key whose event failed sends nothing more in this batch.
//!
//! Why not several events of one key per request? If entry k of a key fails, the broker may still
//! accept entry k+1 (SQS FIFO and EventBridge both report per entry), which would publish the key
//! out of order. Correctness first: a hot key costs one request per event per batch.

use std::collections::{HashMap, VecDeque};

use async_trait::async_trait;
use futures_util::future::join_all;

use super::{skipped_after_failure, PublishError, PublishResult};
use crate::event::{OrderingKey, OutboxEvent};

/// How a whole request failed, when the broker answered nothing per entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestFailure {
    /// Transport, throttling, server side, credentials or a missing destination: not the
    /// entries' fault. Every entry gets [`PublishError::Unavailable`] (no attempt is charged).
    Transient(String),
    /// The request's content was refused (validation). With several entries one of them may be the
    /// cause, so they are retried one per request to find it; alone, the entry is permanent.
    Content(String),
}

/// An entry ready to send, with the size the broker counts against its limits.
#[derive(Debug, Clone)]
pub struct Prepared<E> {
    /// What the sink sends.
    pub entry: E,
    /// Its size as the broker counts it against [`Sink::max_request_bytes`].
    pub size: usize,
}

/// One destination's request API, as the wave engine uses it.
#[async_trait]
pub trait Sink: Send + Sync {
    /// One message as the broker's batch request takes it.
    type Entry: Clone + Send + Sync;

    /// Most entries per request.
    fn max_entries(&self) -> usize;
    /// Most bytes per request (the sum of the entries' [`Prepared::size`]).
    fn max_request_bytes(&self) -> usize;

    /// Builds the entry of an event, offloading its payload first if it is too large; an error
    /// is the event's result (it is not sent).
    async fn prepare(&self, event: &OutboxEvent) -> Result<Prepared<Self::Entry>, PublishError>;

    /// Sends entries (ids unique within the request) in one request; `Ok` holds one result per
    /// entry, in order.
    async fn send(
        &self,
        entries: &[(String, Self::Entry)],
    ) -> Result<Vec<PublishResult>, RequestFailure>;
}

/// Publishes a batch through `sink` honouring the [`Publisher`](super::Publisher) contract.
pub async fn publish_in_waves<S: Sink>(sink: &S, batch: &[OutboxEvent]) -> Vec<PublishResult> {
    let mut results: Vec<Option<PublishResult>> = vec![None; batch.len()];
    let mut queues = key_queues(batch);

    loop {
        let wave: Vec<(usize, usize)> = queues
            .iter_mut()
            .enumerate()
            .filter_map(|(q, queue)| queue.pop_front().map(|i| (q, i)))
            .collect();
        if wave.is_empty() {
            break;
        }

        let prepared = join_all(wave.iter().map(|&(_, i)| sink.prepare(&batch[i]))).await;
        let mut ready = Vec::with_capacity(wave.len());
        for (&(_, i), outcome) in wave.iter().zip(prepared) {
            match outcome {
                Ok(p) => ready.push((i, p)),
                Err(e) => results[i] = Some(Err(e)),
            }
        }

        let chunks = pack(ready, sink.max_entries(), sink.max_request_bytes());
        let sent = join_all(chunks.iter().map(|chunk| send_chunk(sink, chunk))).await;
        for (chunk, chunk_results) in chunks.iter().zip(sent) {
            for ((i, _), result) in chunk.iter().zip(chunk_results) {
                results[*i] = Some(result);
            }
        }

        for &(q, i) in &wave {
            if matches!(results[i], Some(Err(_))) {
                for later in queues[q].drain(..) {
                    results[later] = Some(Err(skipped_after_failure(&batch[i])));
                }
            }
        }
    }

    results
        .into_iter()
        .map(|r| {
            // Every index is in exactly one key queue and is settled by its wave or by a skip.
            r.unwrap_or_else(|| Err(PublishError::retryable("internal: event was not scheduled")))
        })
        .collect()
}

/// The indices of a batch's events grouped by ordering key, each group in `seq` order, groups in
/// order of their first event.
pub fn key_queues(batch: &[OutboxEvent]) -> Vec<VecDeque<usize>> {
    let mut key_index: HashMap<OrderingKey<'_>, usize> = HashMap::new();
    let mut queues: Vec<VecDeque<usize>> = Vec::new();
    for (i, event) in batch.iter().enumerate() {
        let q = *key_index.entry(event.ordering_key()).or_insert_with(|| {
            queues.push(VecDeque::new());
            queues.len() - 1
        });
        queues[q].push_back(i);
    }
    queues
}

/// Greedy packing in wave order: a new request when the entry count or the byte budget is full.
fn pack<E>(
    ready: Vec<(usize, Prepared<E>)>,
    max_entries: usize,
    max_bytes: usize,
) -> Vec<Vec<(usize, Prepared<E>)>> {
    let mut chunks: Vec<Vec<(usize, Prepared<E>)>> = Vec::new();
    let mut bytes = 0usize;
    for item in ready {
        let start_new = match chunks.last() {
            None => true,
            Some(last) => last.len() >= max_entries || bytes + item.1.size > max_bytes,
        };
        if start_new {
            chunks.push(Vec::new());
            bytes = 0;
        }
        bytes += item.1.size;
        if let Some(last) = chunks.last_mut() {
            last.push(item);
        }
    }
    chunks
}

async fn send_chunk<S: Sink>(
    sink: &S,
    chunk: &[(usize, Prepared<S::Entry>)],
) -> Vec<PublishResult> {
    let entries: Vec<(String, S::Entry)> = chunk
        .iter()
        .map(|(i, p)| (format!("e{i}"), p.entry.clone()))
        .collect();
    match sink.send(&entries).await {
        Ok(results) if results.len() == entries.len() => results,
        Ok(results) => vec![
            Err(PublishError::retryable(format!(
                "broker answered {} results for {} entries",
                results.len(),
                entries.len()
            )));
            entries.len()
        ],
        // The whole request failed for the broker's reasons (down, slow, throttling, missing,
        // credentials): the destination's failure, which costs the events no attempt.
        Err(RequestFailure::Transient(reason)) => {
            vec![Err(PublishError::unavailable(reason)); entries.len()]
        }
        Err(RequestFailure::Content(reason)) if entries.len() == 1 => {
            vec![Err(PublishError::permanent(reason))]
        }
        Err(RequestFailure::Content(reason)) => {
            // One entry poisoned the whole request (nothing was sent). The entries are of distinct
            // keys, so each can go alone: the bad one is found, the others are sent once.
            tracing::warn!(entries = entries.len(), %reason, "request refused; sending its entries one by one");
            join_all(entries.iter().map(|entry| async move {
                match sink.send(std::slice::from_ref(entry)).await {
                    Ok(mut r) if r.len() == 1 => r.remove(0),
                    Ok(_) => Err(PublishError::retryable(
                        "broker answered a wrong number of results",
                    )),
                    Err(RequestFailure::Transient(reason)) => {
                        Err(PublishError::unavailable(reason))
                    }
                    Err(RequestFailure::Content(reason)) => Err(PublishError::permanent(reason)),
                }
            }))
            .await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A sink over memory, to check the wave logic alone (the brokers are tested for real in
    /// tests/): refuses entries whose event type is "Bad", per entry or for the whole request.
    struct Recorder {
        requests: Mutex<Vec<Vec<String>>>,
        whole_request_fails: bool,
        max_entries: usize,
    }

    #[async_trait]
    impl Sink for Recorder {
        type Entry = OutboxEvent;
        fn max_entries(&self) -> usize {
            self.max_entries
        }
        fn max_request_bytes(&self) -> usize {
            1000
        }
        async fn prepare(
            &self,
            event: &OutboxEvent,
        ) -> Result<Prepared<OutboxEvent>, PublishError> {
            Ok(Prepared {
                entry: event.clone(),
                size: 10,
            })
        }
        async fn send(
            &self,
            entries: &[(String, OutboxEvent)],
        ) -> Result<Vec<PublishResult>, RequestFailure> {
            let bad = entries.iter().any(|(_, e)| e.event_type == "Bad");
            if self.whole_request_fails && bad {
                return Err(RequestFailure::Content("refused".into()));
            }
            self.requests.lock().unwrap().push(
                entries
                    .iter()
                    .map(|(_, e)| format!("{}{}", e.aggregate_id, e.seq))
                    .collect(),
            );
            Ok(entries
                .iter()
                .map(|(_, e)| {
                    if e.event_type == "Bad" {
                        Err(PublishError::permanent("bad"))
                    } else {
                        Ok(())
                    }
                })
                .collect())
        }
    }

    fn event(seq: i64, key: &str, event_type: &str) -> OutboxEvent {
        serde_json::from_value(serde_json::json!({
            "id": uuid::Uuid::now_v7(), "seq": seq, "aggregate_type": "t",
            "aggregate_id": key, "event_type": event_type, "payload": {},
            "created_at": "2026-01-01T00:00:00Z"
        }))
        .unwrap()
    }

    fn recorder(whole_request_fails: bool, max_entries: usize) -> Recorder {
        Recorder {
            requests: Mutex::default(),
            whole_request_fails,
            max_entries,
        }
    }

    #[tokio::test]
    async fn one_event_per_key_per_request_and_a_failure_stops_its_key() {
        let batch = vec![
            event(1, "a", "E"),
            event(2, "b", "Bad"),
            event(3, "a", "E"),
            event(4, "b", "E"),
            event(5, "c", "E"),
        ];
        let sink = recorder(false, 10);
        let results = publish_in_waves(&sink, &batch).await;
        assert!(results[0].is_ok() && results[2].is_ok() && results[4].is_ok());
        assert!(!results[1].as_ref().unwrap_err().is_retryable());
        assert!(results[3]
            .as_ref()
            .unwrap_err()
            .reason()
            .contains("earlier event"));
        let requests = sink.requests.lock().unwrap().clone();
        assert_eq!(requests, vec![vec!["a1", "b2", "c5"], vec!["a3"]]);
    }

    #[tokio::test]
    async fn a_refused_request_is_split_to_find_the_bad_entry() {
        let batch = vec![event(1, "a", "E"), event(2, "b", "Bad"), event(3, "c", "E")];
        let sink = recorder(true, 10);
        let results = publish_in_waves(&sink, &batch).await;
        assert!(results[0].is_ok() && results[2].is_ok());
        assert!(!results[1].as_ref().unwrap_err().is_retryable());
        let mut sent: Vec<String> = sink.requests.lock().unwrap().concat();
        sent.sort();
        assert_eq!(sent, vec!["a1", "c3"], "good entries sent exactly once");
    }

    #[tokio::test]
    async fn requests_respect_the_entry_limit() {
        let batch: Vec<OutboxEvent> = (0..7).map(|i| event(i, &format!("k{i}"), "E")).collect();
        let sink = recorder(false, 3);
        assert!(publish_in_waves(&sink, &batch)
            .await
            .iter()
            .all(|r| r.is_ok()));
        let sizes: Vec<usize> = sink.requests.lock().unwrap().iter().map(Vec::len).collect();
        let mut sorted = sizes.clone();
        sorted.sort();
        assert_eq!(sorted, vec![1, 3, 3]);
    }
}
