//! The publishers every build has: `stdout`, `file` and `null`, as destinations of those kinds or
//! as the whole `publisher = "stdout" | "file:PATH" | "null"`.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use tokio::io::AsyncWriteExt;

use super::{PublishError, PublishResult, Publisher};
use crate::event::OutboxEvent;

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
