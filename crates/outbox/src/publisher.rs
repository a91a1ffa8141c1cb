//! The broker side of the relay: the [`Publisher`] contract and the built-in publishers
//! (`stdout`, `file:PATH`, in-memory).
//!
//! # The contract
//! [`Publisher::publish`] receives a batch sorted by `seq` and returns exactly one
//! [`PublishResult`] per event, in the same order. A publisher must:
//! - send the events of one ordering key in the order given;
//! - after an event of a key fails, not send the later events of that key in the same batch, and
//!   return [`PublishError::retryable`] for them ([`skipped_after_failure`] builds that error);
//!   events of other keys are unaffected;
//! - classify every error by what it belongs to:
//!   - [`PublishError::Unavailable`]: the **destination** cannot take anything right now (connection
//!     refused, DNS, TLS, timeouts, 5xx, throttling, the queue or topic is missing, credentials
//!     expired). The relay pauses that destination, probes it with backoff, and charges **no
//!     attempt** to any event: an outage never dead-letters or reorders anything.
//!   - [`PublishError::Retryable`]: this **event** failed and trying again later can succeed; the
//!     relay backs off and counts an attempt toward `relay.max_attempts`.
//!   - [`PublishError::Permanent`]: this **event** will never be accepted (too large, rejected for
//!     its content, no route). The relay dead-letters it at once.
//!   - [`PublishError::Fatal`]: the publisher can never work again in this process (its output
//!     was closed, e.g. `outbox relay | head`). The relay gives the batch back and stops.
//! - say which destination an event goes to ([`Publisher::destination_of`]) when it has several,
//!   so that one destination's outage does not hold back the others.
//!
//! The relay bounds every call with its publish timeout; a publisher need not add its own.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::io::AsyncWriteExt;

use crate::event::{OrderingKey, OutboxEvent};

/// One event's delivery outcome.
pub type PublishResult = Result<(), PublishError>;

/// Why an event was not published, classified by scope for the relay's decision (see the
/// [module documentation](self)).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// The destination cannot take anything now: pause it and probe; no attempt is charged.
    #[error("destination unavailable: {0}")]
    Unavailable(String),
    /// This event failed and may succeed later: back off and count an attempt.
    #[error("retryable: {0}")]
    Retryable(String),
    /// This event will never be accepted: dead-letter it at once.
    #[error("permanent: {0}")]
    Permanent(String),
    /// The publisher can never work again in this process: give the batch back and stop the relay.
    #[error("fatal: {0}")]
    Fatal(String),
}

impl PublishError {
    /// A failure of the destination (see [`PublishError::Unavailable`]).
    pub fn unavailable(reason: impl Into<String>) -> Self {
        Self::Unavailable(reason.into())
    }
    /// A failure of this event that may pass (see [`PublishError::Retryable`]).
    pub fn retryable(reason: impl Into<String>) -> Self {
        Self::Retryable(reason.into())
    }
    /// A failure of this event that will not pass (see [`PublishError::Permanent`]).
    pub fn permanent(reason: impl Into<String>) -> Self {
        Self::Permanent(reason.into())
    }
    /// A failure that ends the relay (see [`PublishError::Fatal`]).
    pub fn fatal(reason: impl Into<String>) -> Self {
        Self::Fatal(reason.into())
    }
    /// Whether trying again later can succeed (the event is not dead-lettered for this error).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Retryable(_) | Self::Unavailable(_))
    }
    /// Whether the destination, not the event, failed.
    pub fn is_destination_failure(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
    pub fn reason(&self) -> &str {
        match self {
            Self::Unavailable(r) | Self::Retryable(r) | Self::Permanent(r) | Self::Fatal(r) => r,
        }
    }
}

/// The error a publisher returns for an event it did not send because an earlier event of the same
/// key failed in this batch.
pub fn skipped_after_failure(failed: &OutboxEvent) -> PublishError {
    PublishError::retryable(format!(
        "not sent: earlier event {} (seq {}) of the same key failed in this batch",
        failed.id, failed.seq
    ))
}

/// Sends events to a broker. See the [module documentation](self) for the contract.
#[async_trait]
pub trait Publisher: Send + Sync + 'static {
    /// Publishes a batch sorted by `seq`; returns one result per event, in the same order.
    async fn publish(&self, batch: &[OutboxEvent]) -> Vec<PublishResult>;

    /// Checks at start-up that the destinations exist and are reachable, so a misconfiguration fails
    /// before anything is claimed. The default accepts everything.
    async fn check(&self) -> Result<(), PublishError> {
        Ok(())
    }

    /// The name of the destination `event` goes to. The relay keeps the health of each destination
    /// apart, so an outage of one holds back only the events routed to it. Publishers with one
    /// destination keep the default.
    fn destination_of(&self, event: &OutboxEvent) -> String {
        let _ = event;
        "default".to_owned()
    }
}

#[async_trait]
impl<P: Publisher + ?Sized> Publisher for Arc<P> {
    async fn publish(&self, batch: &[OutboxEvent]) -> Vec<PublishResult> {
        (**self).publish(batch).await
    }
    async fn check(&self) -> Result<(), PublishError> {
        (**self).check().await
    }
    fn destination_of(&self, event: &OutboxEvent) -> String {
        (**self).destination_of(event)
    }
}

#[async_trait]
impl<P: Publisher + ?Sized> Publisher for Box<P> {
    async fn publish(&self, batch: &[OutboxEvent]) -> Vec<PublishResult> {
        (**self).publish(batch).await
    }
    async fn check(&self) -> Result<(), PublishError> {
        (**self).check().await
    }
    fn destination_of(&self, event: &OutboxEvent) -> String {
        (**self).destination_of(event)
    }
}

/// Publishes a batch one event at a time with `send`, honouring the contract: per-key order, and a
/// failed event stops the rest of its key. For publishers without a native batch call.
pub async fn publish_sequentially<F, Fut>(batch: &[OutboxEvent], mut send: F) -> Vec<PublishResult>
where
    F: FnMut(&OutboxEvent) -> Fut,
    Fut: std::future::Future<Output = PublishResult>,
{
    let mut failed_keys: HashMap<OrderingKey<'_>, &OutboxEvent> = HashMap::new();
    let mut results = Vec::with_capacity(batch.len());
    for event in batch {
        if let Some(failed) = failed_keys.get(&event.ordering_key()) {
            results.push(Err(skipped_after_failure(failed)));
            continue;
        }
        let result = send(event).await;
        if result.is_err() {
            failed_keys.insert(event.ordering_key(), event);
        }
        results.push(result);
    }
    results
}

/// Builds a built-in publisher (`stdout`, `file:PATH`, `null`). Returns `Ok(None)` for specs
/// served by other crates (`aws`), so the caller can build those.
pub async fn builtin(
    spec: &crate::PublisherSpec,
) -> Result<Option<Box<dyn Publisher>>, PublishError> {
    Ok(match spec {
        crate::PublisherSpec::Stdout => Some(Box::new(StdoutPublisher::new())),
        crate::PublisherSpec::File(path) => Some(Box::new(FilePublisher::open(path).await?)),
        crate::PublisherSpec::Null => Some(Box::new(MemoryPublisher::counting())),
        crate::PublisherSpec::Aws => None,
    })
}

/// Renders the documented JSON envelope of an event, one line, no trailing newline.
pub fn envelope_json(event: &OutboxEvent) -> String {
    serde_json::to_string(event).expect("an OutboxEvent always serializes")
}

/// Writes each event as one JSON line to standard output (logs go to standard error).
///
/// When the reader of standard output goes away (`outbox relay | head -2`), the write fails with a
/// broken pipe: that is [`PublishError::Fatal`], so the relay gives the batch back and stops instead
/// of retrying it into the dead letters. Other write errors are the destination's
/// ([`PublishError::Unavailable`]).
#[derive(Debug, Default)]
pub struct StdoutPublisher {
    lock: tokio::sync::Mutex<()>,
}

impl StdoutPublisher {
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl Publisher for StdoutPublisher {
    async fn publish(&self, batch: &[OutboxEvent]) -> Vec<PublishResult> {
        let buf = lines(batch);
        // One write per batch keeps the lines of concurrent workers whole and in publish order.
        let _guard = self.lock.lock().await;
        let mut out = tokio::io::stdout();
        let written = async {
            out.write_all(&buf).await?;
            out.flush().await
        }
        .await;
        uniform(
            batch.len(),
            written.map_err(|e| io_error("standard output", e)),
        )
    }
}

/// Appends each event as one JSON line to a file (JSON Lines).
///
/// The file is opened with `O_APPEND` and each batch is written with a single `write`, so several
/// relays (processes) may share one file: lines stay whole and the file's order is publish order.
/// A regular file is synced (`fdatasync`) after every batch, so a published event survives a
/// crash of the machine. A FIFO, a terminal or `/dev/stdout` cannot be synced and is written
/// without it (opening a FIFO waits for its reader, as a shell redirection does); when its reader
/// goes away the relay stops ([`PublishError::Fatal`], as for [`StdoutPublisher`]).
#[derive(Debug)]
pub struct FilePublisher {
    path: PathBuf,
    file: tokio::sync::Mutex<tokio::fs::File>,
    /// Whether `fdatasync` applies: only regular files can be synced (a FIFO fails with EINVAL,
    /// after its lines were written, which would retry and duplicate every batch).
    sync: bool,
}

impl FilePublisher {
    /// Opens (creating if needed) the file for appending.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self, PublishError> {
        let path = path.as_ref().to_path_buf();
        let cannot_open = |e: std::io::Error| {
            PublishError::permanent(format!(
                "cannot open publisher file {}: {e}; check the directory exists and is writable",
                path.display()
            ))
        };
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .await
            .map_err(cannot_open)?;
        let sync = file.metadata().await.map_err(cannot_open)?.is_file();
        if !sync {
            tracing::debug!(path = %path.display(), "publisher file is not a regular file: lines are written without fsync");
        }
        Ok(Self {
            path,
            file: tokio::sync::Mutex::new(file),
            sync,
        })
    }
}

#[async_trait]
impl Publisher for FilePublisher {
    async fn publish(&self, batch: &[OutboxEvent]) -> Vec<PublishResult> {
        let buf = lines(batch);
        let mut file = self.file.lock().await;
        let written = async {
            file.write_all(&buf).await?;
            file.flush().await?;
            if self.sync {
                file.sync_data().await?;
            }
            Ok(())
        }
        .await;
        let what = self.path.display().to_string();
        uniform(batch.len(), written.map_err(|e| io_error(&what, e)))
    }
}

fn lines(batch: &[OutboxEvent]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(batch.len() * 256);
    for event in batch {
        serde_json::to_writer(&mut buf, event).expect("an OutboxEvent always serializes");
        buf.push(b'\n');
    }
    buf
}

fn uniform(n: usize, result: PublishResult) -> Vec<PublishResult> {
    vec![result; n]
}

/// A failed write of a whole batch: the output's fault, not any event's. A broken pipe means the
/// reader is gone for good, which no retry can fix.
fn io_error(what: &str, e: std::io::Error) -> PublishError {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        PublishError::fatal(format!(
            "{what} was closed by its reader (broken pipe): nothing more can be published there; \
             the events not written stay pending"
        ))
    } else {
        PublishError::unavailable(format!("writing to {what} failed: {e}"))
    }
}

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

    #[tokio::test]
    async fn file_publisher_appends_whole_json_lines() {
        let dir = std::env::temp_dir().join(format!("outbox-file-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("events.jsonl");
        let publisher = FilePublisher::open(&path).await.unwrap();
        let batch = vec![event(1, "a"), event(2, "a")];
        assert!(publisher.publish(&batch).await.iter().all(|r| r.is_ok()));
        let again = FilePublisher::open(&path).await.unwrap();
        assert!(again.publish(&batch[..1]).await[0].is_ok());
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[1]["seq"], 2);
        for key in [
            "id",
            "aggregate_type",
            "aggregate_id",
            "event_type",
            "payload",
            "headers",
        ] {
            assert!(lines[0].get(key).is_some(), "missing {key}");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A FIFO cannot be fsynced: the batch that was written must still count as published, and a
    /// reader that went away stops the relay (fatal) instead of dead-lettering events.
    #[tokio::test]
    async fn file_publisher_writes_to_a_fifo_and_a_gone_reader_is_fatal() {
        use std::io::BufRead;
        let dir = std::env::temp_dir().join(format!("outbox-fifo-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("events.fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let reader_path = fifo.clone();
        // Reads two lines, then closes its end.
        let reader = std::thread::spawn(move || {
            let file = std::fs::File::open(reader_path).unwrap();
            std::io::BufReader::new(file)
                .lines()
                .take(2)
                .map(|l| l.unwrap())
                .collect::<Vec<_>>()
        });
        let publisher = FilePublisher::open(&fifo).await.unwrap();
        let batch = vec![event(1, "a"), event(2, "a")];
        let results = publisher.publish(&batch).await;
        assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
        let read = reader.join().unwrap();
        assert_eq!(read.len(), 2);
        let v: serde_json::Value = serde_json::from_str(&read[1]).unwrap();
        assert_eq!(v["seq"], 2);

        let results = publisher.publish(&[event(3, "a")]).await;
        match &results[0] {
            Err(PublishError::Fatal(reason)) => assert!(reason.contains("broken pipe"), "{reason}"),
            other => panic!("expected a fatal error, got {other:?}"),
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn file_publisher_reports_an_unwritable_path_with_the_fix() {
        let err = FilePublisher::open("/nonexistent-dir/x/events.jsonl")
            .await
            .unwrap_err();
        assert!(!err.is_retryable());
        assert!(err.reason().contains("directory exists"));
    }
}
