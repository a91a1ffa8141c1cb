//! The SQS consumer loop.
//!
//! - **Long polling**: `ReceiveMessage` waits up to `wait_time` for messages.
//! - **Bounded concurrency**: at most `max_in_flight` messages are received and not yet finished;
//!   the loop only asks SQS for as many as it has room for, so nothing sits received but unstarted
//!   while its visibility timeout runs out.
//! - **Order**: messages of one FIFO message group (the relay's ordering key) are handled one after
//!   the other, in the order received; groups run in parallel. When one fails, the later ones of
//!   its group in the same batch are not attempted: they come back after it.
//! - **Slow handlers**: every `extend_every` the visibility of the group's unfinished messages is
//!   pushed back to `visibility_timeout`, so a slow handler does not cause a second delivery.
//! - **Batch deletes**: finished messages are deleted with `DeleteMessageBatch` (up to 10,
//!   collected for at most `delete_delay`).
//! - **Graceful shutdown**: when the injected `shutdown` future completes, no new receive starts.
//!   A long poll already waiting is *not* dropped: dropping the request does not cancel it at the
//!   queue (SQS, and the emulator, still complete the poll and mark whatever arrives as received,
//!   for nobody: those messages would stay invisible for the whole visibility timeout, and on a
//!   FIFO queue a later message of their group could overtake them). The poll is let finish (it
//!   is bounded by `wait_time`; the wait for it by `wait_time` + [`RECEIVE_GRACE`]) and the
//!   messages it returns are handled like any other in-flight message. Then in-flight handlers
//!   finish and pending deletes are flushed. So a stop takes up to `wait_time` plus the handlers'
//!   time; nothing received is abandoned.
//!
//! A failing handler is never deleted: SQS redelivers it after the visibility timeout (or after
//! `retry_visibility`, when set), and its redrive policy moves a poison message to the
//! dead-letter queue.

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry, Message,
    MessageSystemAttributeName,
};
use futures_util::FutureExt;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::delivery::Delivery;
use crate::handler::{Handled, Handler};

/// How much longer than `wait_time` a shutdown waits for a receive in progress to answer (the
/// round trip on top of the long poll). Past it the request is dropped, with a warning: whatever
/// it took comes back after the visibility timeout.
pub const RECEIVE_GRACE: Duration = Duration::from_secs(5);

/// How the consumer polls, bounds and extends; see the module docs.
#[derive(Debug, Clone)]
pub struct ConsumerOptions {
    /// Queue URL (see [`Consumer::queue_url`] to look one up by name).
    pub queue_url: String,
    /// Messages received and not yet finished, at most.
    pub max_in_flight: usize,
    /// Long-poll wait of one `ReceiveMessage` (0 to 20 s).
    pub wait_time: Duration,
    /// Visibility timeout asked for on receive and renewed while a handler runs (whole seconds).
    pub visibility_timeout: Duration,
    /// How often unfinished messages get their visibility renewed (below `visibility_timeout`).
    pub extend_every: Duration,
    /// Longest wait to fill a `DeleteMessageBatch`.
    pub delete_delay: Duration,
    /// After a failure, make the message visible again this soon instead of waiting out the
    /// visibility timeout (`None`: wait it out).
    pub retry_visibility: Option<Duration>,
}

impl ConsumerOptions {
    pub fn new(queue_url: impl Into<String>) -> Self {
        Self {
            queue_url: queue_url.into(),
            max_in_flight: 10,
            wait_time: Duration::from_secs(20),
            visibility_timeout: Duration::from_secs(30),
            extend_every: Duration::from_secs(10),
            delete_delay: Duration::from_millis(50),
            retry_visibility: None,
        }
    }
}

/// Why the consumer could not run.
#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error("invalid consumer option `{option}`: {problem}")]
    Option {
        option: &'static str,
        problem: String,
    },
    #[error("queue {queue} not found: {reason}; create it (`outbox aws bootstrap` locally) or fix the name")]
    QueueNotFound { queue: String, reason: String },
    #[error("consumer task failed: {0}")]
    Task(String),
}

/// Counters since the consumer started (live: read them while it runs).
#[derive(Debug, Default)]
pub struct ConsumerStats {
    pub received: AtomicU64,
    pub processed: AtomicU64,
    pub duplicates: AtomicU64,
    pub failed: AtomicU64,
    pub deleted: AtomicU64,
    pub delete_failures: AtomicU64,
    pub visibility_extensions: AtomicU64,
    pub receive_errors: AtomicU64,
}

/// A copy of [`ConsumerStats`] at one moment.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ConsumerReport {
    pub received: u64,
    pub processed: u64,
    pub duplicates: u64,
    pub failed: u64,
    pub deleted: u64,
    pub delete_failures: u64,
    pub visibility_extensions: u64,
    pub receive_errors: u64,
}

impl ConsumerStats {
    pub fn snapshot(&self) -> ConsumerReport {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ConsumerReport {
            received: get(&self.received),
            processed: get(&self.processed),
            duplicates: get(&self.duplicates),
            failed: get(&self.failed),
            deleted: get(&self.deleted),
            delete_failures: get(&self.delete_failures),
            visibility_extensions: get(&self.visibility_extensions),
            receive_errors: get(&self.receive_errors),
        }
    }
}

fn bump(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// An SQS consumer; cheap to clone.
#[derive(Clone)]
pub struct Consumer {
    sqs: aws_sdk_sqs::Client,
    s3: aws_sdk_s3::Client,
    options: ConsumerOptions,
    stats: Arc<ConsumerStats>,
}

impl Consumer {
    /// A consumer with SQS and S3 clients (S3 resolves claim checks), e.g. from
    /// [`outbox_aws::AwsClients`].
    pub fn new(
        sqs: aws_sdk_sqs::Client,
        s3: aws_sdk_s3::Client,
        options: ConsumerOptions,
    ) -> Result<Self, ConsumerError> {
        let bad = |option, problem: String| Err(ConsumerError::Option { option, problem });
        if options.max_in_flight == 0 {
            return bad("max_in_flight", "0 would never receive".into());
        }
        if options.wait_time > Duration::from_secs(20) {
            return bad(
                "wait_time",
                format!("{:?} is over the SQS maximum of 20 s", options.wait_time),
            );
        }
        if options.visibility_timeout < Duration::from_secs(1)
            || options.visibility_timeout > Duration::from_secs(12 * 3600)
        {
            return bad(
                "visibility_timeout",
                format!(
                    "{:?} is not between 1 s and 12 h",
                    options.visibility_timeout
                ),
            );
        }
        if options.extend_every.is_zero() || options.extend_every >= options.visibility_timeout {
            return bad(
                "extend_every",
                format!(
                    "{:?} must be above 0 and below visibility_timeout ({:?})",
                    options.extend_every, options.visibility_timeout
                ),
            );
        }
        Ok(Self {
            sqs,
            s3,
            options,
            stats: Arc::default(),
        })
    }

    /// Looks up a queue's URL by name (a URL is returned as it is).
    pub async fn queue_url(
        sqs: &aws_sdk_sqs::Client,
        name_or_url: &str,
    ) -> Result<String, ConsumerError> {
        if name_or_url.starts_with("http://") || name_or_url.starts_with("https://") {
            return Ok(name_or_url.to_owned());
        }
        let out = sqs
            .get_queue_url()
            .queue_name(name_or_url)
            .send()
            .await
            .map_err(|e| ConsumerError::QueueNotFound {
                queue: name_or_url.to_owned(),
                reason: error_chain(&e),
            })?;
        out.queue_url()
            .map(str::to_owned)
            .ok_or_else(|| ConsumerError::QueueNotFound {
                queue: name_or_url.to_owned(),
                reason: "GetQueueUrl returned no URL".into(),
            })
    }

    pub fn stats(&self) -> Arc<ConsumerStats> {
        self.stats.clone()
    }

    pub fn options(&self) -> &ConsumerOptions {
        &self.options
    }

    /// Consumes until `shutdown` completes, then finishes in-flight messages, flushes deletes and
    /// returns the counters.
    pub async fn run<H: Handler>(
        &self,
        handler: H,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<ConsumerReport, ConsumerError> {
        let handler = Arc::new(handler);
        let options = &self.options;
        let permits = Arc::new(Semaphore::new(options.max_in_flight));
        let (delete_tx, delete_rx) = mpsc::unbounded_channel::<String>();
        let deleter = tokio::spawn(delete_loop(
            self.sqs.clone(),
            options.queue_url.clone(),
            options.delete_delay,
            delete_rx,
            self.stats.clone(),
        ));
        let mut groups = JoinSet::new();
        let mut receive_failures = 0u32;
        tokio::pin!(shutdown);
        tracing::info!(queue = %options.queue_url, max_in_flight = options.max_in_flight, "consumer started");
        loop {
            while let Some(joined) = groups.try_join_next() {
                if let Err(e) = joined {
                    tracing::error!(error = %e, "a message group task failed");
                }
            }
            // Wait for room for one message, then take whatever more is free (up to 10).
            let first = tokio::select! {
                _ = &mut shutdown => break,
                permit = permits.clone().acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let mut held = vec![first];
            while held.len() < 10 {
                match permits.clone().try_acquire_owned() {
                    Ok(p) => held.push(p),
                    Err(_) => break,
                }
            }
            let receive = self
                .sqs
                .receive_message()
                .queue_url(&options.queue_url)
                .max_number_of_messages(held.len() as i32)
                .wait_time_seconds(options.wait_time.as_secs() as i32)
                .visibility_timeout(seconds(options.visibility_timeout))
                .message_attribute_names("All")
                .message_system_attribute_names(MessageSystemAttributeName::All)
                .send();
            tokio::pin!(receive);
            let mut stopping = false;
            let out = tokio::select! {
                out = &mut receive => out,
                _ = &mut shutdown => {
                    // Do not drop the poll: the queue completes it anyway and what it takes would
                    // be abandoned (see the module docs). Let it answer, bounded.
                    stopping = true;
                    tracing::info!(wait_time = ?options.wait_time, "consumer stopping: waiting for the receive in progress to answer");
                    let bound = options.wait_time + RECEIVE_GRACE;
                    match tokio::time::timeout(bound, &mut receive).await {
                        Ok(out) => out,
                        Err(_) => {
                            tracing::warn!(?bound, "the receive in progress did not answer in time; dropping it (anything it took comes back after the visibility timeout)");
                            break;
                        }
                    }
                }
            };
            let messages = match out {
                Ok(out) => {
                    receive_failures = 0;
                    out.messages.unwrap_or_default()
                }
                Err(e) if stopping => {
                    bump(&self.stats.receive_errors, 1);
                    tracing::warn!(error = %error_chain(&e), "the last receive failed while stopping");
                    break;
                }
                Err(e) => {
                    bump(&self.stats.receive_errors, 1);
                    receive_failures += 1;
                    let pause = Duration::from_millis(200 * 2u64.pow(receive_failures.min(5)));
                    tracing::warn!(error = %error_chain(&e), ?pause, "receive failed; retrying");
                    drop(held);
                    tokio::select! {
                        _ = &mut shutdown => break,
                        _ = tokio::time::sleep(pause) => continue,
                    }
                }
            };
            bump(&self.stats.received, messages.len() as u64);
            for batch in group_in_order(messages) {
                let take = held.split_off(held.len().saturating_sub(batch.len()));
                let ctx = GroupContext {
                    consumer: self.clone(),
                    handler: handler.clone(),
                    deletes: delete_tx.clone(),
                };
                groups.spawn(ctx.process(batch, take));
            }
            if stopping {
                // `shutdown` has completed: it must not be polled again, and nothing more is
                // received. What the last poll returned is now in flight and finishes below.
                break;
            }
        }
        tracing::info!("consumer stopping: finishing in-flight messages");
        let mut failure = None;
        while let Some(joined) = groups.join_next().await {
            if let Err(e) = joined {
                failure = Some(ConsumerError::Task(e.to_string()));
            }
        }
        drop(delete_tx);
        if let Err(e) = deleter.await {
            failure = Some(ConsumerError::Task(e.to_string()));
        }
        let report = self.stats.snapshot();
        tracing::info!(?report, "consumer stopped");
        failure.map_or(Ok(report), Err)
    }
}

/// Splits a receive batch into FIFO groups (messages without a group stand alone), each in the
/// order received, groups in order of first appearance.
fn group_in_order(messages: Vec<Message>) -> Vec<Vec<Message>> {
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut groups: Vec<Vec<Message>> = Vec::new();
    for message in messages {
        let group = message
            .attributes()
            .and_then(|a| a.get(&MessageSystemAttributeName::MessageGroupId))
            .cloned();
        match group.and_then(|g| index.get(&g).copied().map(|i| (g, i))) {
            Some((_, i)) => groups[i].push(message),
            None => {
                if let Some(g) = message
                    .attributes()
                    .and_then(|a| a.get(&MessageSystemAttributeName::MessageGroupId))
                {
                    index.insert(g.clone(), groups.len());
                }
                groups.push(vec![message]);
            }
        }
    }
    groups
}

struct GroupContext<H> {
    consumer: Consumer,
    handler: Arc<H>,
    deletes: mpsc::UnboundedSender<String>,
}

impl<H: Handler> GroupContext<H> {
    /// Handles one group's messages in order, renewing the visibility of the unfinished ones.
    async fn process(self, messages: Vec<Message>, mut permits: Vec<OwnedSemaphorePermit>) {
        let handles: Vec<String> = messages
            .iter()
            .map(|m| m.receipt_handle().unwrap_or_default().to_owned())
            .collect();
        // Receipt handles still owned by this task: renewed by the heartbeat.
        let unfinished = Mutex::new(handles.clone());
        let work = async {
            for (i, message) in messages.iter().enumerate() {
                let ok = self.process_one(message).await;
                let handle = &handles[i];
                lock(&unfinished).retain(|h| h != handle);
                permits.pop();
                if !ok {
                    // Later messages of the group wait behind the failed one (order).
                    let rest: Vec<String> = handles[i..].to_vec();
                    lock(&unfinished).clear();
                    if let Some(delay) = self.consumer.options.retry_visibility {
                        self.change_visibility(&rest, delay).await;
                    }
                    return;
                }
            }
        };
        tokio::pin!(work);
        let every = self.consumer_options().extend_every;
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        loop {
            tokio::select! {
                _ = &mut work => break,
                _ = tick.tick() => {
                    let pending = lock(&unfinished).clone();
                    if !pending.is_empty() {
                        let timeout = self.consumer_options().visibility_timeout;
                        self.change_visibility(&pending, timeout).await;
                        bump(&self.consumer.stats.visibility_extensions, pending.len() as u64);
                    }
                }
            }
        }
    }

    fn consumer_options(&self) -> &ConsumerOptions {
        &self.consumer.options
    }

    /// Handles one message; true when it is done (and queued for deletion).
    async fn process_one(&self, message: &Message) -> bool {
        let stats = &self.consumer.stats;
        let delivery = match Delivery::from_message(&self.consumer.s3, message).await {
            Ok(d) => d,
            Err(e) => {
                bump(&stats.failed, 1);
                tracing::warn!(error = %e, "message cannot be handled; leaving it for redelivery / the dead-letter queue");
                return false;
            }
        };
        // The OpenTelemetry messaging conventions for handling one message: a consumer span that
        // continues the trace the producer's span started (its `traceparent` travelled along).
        let span = tracing::info_span!(
            "process",
            otel.name = "process",
            otel.kind = "consumer",
            messaging.system = "aws_sqs",
            messaging.operation.type = "process",
            messaging.message.id = %delivery.message_id,
            outbox.event_id = %delivery.event_id,
        );
        outbox::trace::continue_trace(&span, |name| delivery.header(name));
        let call = AssertUnwindSafe(self.handler.handle(&delivery).instrument(span)).catch_unwind();
        let outcome = match call.await {
            Ok(result) => result,
            Err(_) => Err("handler panicked".into()),
        };
        match outcome {
            Ok(handled) => {
                match handled {
                    Handled::Processed => bump(&stats.processed, 1),
                    Handled::Duplicate => {
                        bump(&stats.duplicates, 1);
                        tracing::debug!(event_id = %delivery.event_id, "duplicate delivery acknowledged");
                    }
                }
                if let Some(handle) = message.receipt_handle() {
                    let _ = self.deletes.send(handle.to_owned());
                }
                true
            }
            Err(e) => {
                bump(&stats.failed, 1);
                tracing::warn!(
                    event_id = %delivery.event_id,
                    event_type = delivery.event_type.as_deref().unwrap_or("?"),
                    receive_count = delivery.receive_count,
                    error = %e,
                    "handler failed; the message will be redelivered"
                );
                false
            }
        }
    }

    async fn change_visibility(&self, handles: &[String], timeout: Duration) {
        for (chunk_no, chunk) in handles.chunks(10).enumerate() {
            let entries: Vec<_> = chunk
                .iter()
                .enumerate()
                .filter_map(|(i, h)| {
                    ChangeMessageVisibilityBatchRequestEntry::builder()
                        .id(format!("m{}", chunk_no * 10 + i))
                        .receipt_handle(h)
                        .visibility_timeout(seconds(timeout))
                        .build()
                        .ok()
                })
                .collect();
            let result = self
                .consumer
                .sqs
                .change_message_visibility_batch()
                .queue_url(&self.consumer.options.queue_url)
                .set_entries(Some(entries))
                .send()
                .await;
            if let Err(e) = result {
                tracing::warn!(error = %error_chain(&e), "could not change message visibility");
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn seconds(d: Duration) -> i32 {
    i32::try_from(d.as_secs()).unwrap_or(i32::MAX)
}

/// Deletes finished messages in batches of up to 10, flushing after `delay` or when the channel
/// closes (shutdown).
async fn delete_loop(
    sqs: aws_sdk_sqs::Client,
    queue_url: String,
    delay: Duration,
    mut rx: mpsc::UnboundedReceiver<String>,
    stats: Arc<ConsumerStats>,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + delay;
        while batch.len() < 10 {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(handle)) => batch.push(handle),
                Ok(None) | Err(_) => break,
            }
        }
        let entries: Vec<_> = batch
            .iter()
            .enumerate()
            .filter_map(|(i, h)| {
                DeleteMessageBatchRequestEntry::builder()
                    .id(format!("d{i}"))
                    .receipt_handle(h)
                    .build()
                    .ok()
            })
            .collect();
        let result = sqs
            .delete_message_batch()
            .queue_url(&queue_url)
            .set_entries(Some(entries))
            .send()
            .await;
        match result {
            Ok(out) => {
                bump(&stats.deleted, out.successful().len() as u64);
                if !out.failed().is_empty() {
                    bump(&stats.delete_failures, out.failed().len() as u64);
                    // The message comes back and the idempotency store recognises it.
                    tracing::warn!(failed = out.failed().len(), "some deletes failed; those messages will be redelivered and recognised as duplicates");
                }
            }
            Err(e) => {
                bump(&stats.delete_failures, batch.len() as u64);
                tracing::warn!(error = %error_chain(&e), "delete batch failed; those messages will be redelivered and recognised as duplicates");
            }
        }
    }
}

/// An error with its sources, for logs (SDK errors hide the useful part in the chain).
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
