//! SIGINT and SIGTERM for `outbox relay` (with or without `--drain`): the first one stops the relay
//! after the batch in flight is published and settled; a second one exits at once.

use std::sync::{Arc, OnceLock};

use anyhow::{Context, Result};
use outbox::logging::{error_line, LogFormat};
use tokio::signal::unix::{signal, Signal, SignalKind};

/// The signal streams, installed when the relay starts. From then on the default action of both
/// signals (terminate) is replaced, so a second signal is also ours to handle.
pub(crate) struct Signals {
    interrupt: Signal,
    terminate: Signal,
}

impl Signals {
    pub(crate) fn install() -> Result<Self> {
        Ok(Self {
            interrupt: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            terminate: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
        })
    }

    /// The next SIGINT or SIGTERM: its name and number.
    async fn recv(&mut self) -> (&'static str, i32) {
        tokio::select! {
            _ = self.interrupt.recv() => ("SIGINT", 2),
            _ = self.terminate.recv() => ("SIGTERM", 15),
        }
    }

    /// Completes on the first signal, recording its name in `received`. From then on a second
    /// signal exits the process at once with 128 + its number (130, 143), without waiting for the
    /// batch in flight: its claim's transaction ends with the connection and its events are
    /// claimed again (at-least-once).
    pub(crate) async fn first(mut self, received: Arc<OnceLock<&'static str>>, format: LogFormat) {
        let (name, _) = self.recv().await;
        let _ = received.set(name);
        tracing::info!(
            signal = name,
            "stopping after the batch in flight; send the signal again to exit at once"
        );
        tokio::spawn(async move {
            let (name, number) = self.recv().await;
            eprintln!(
                "{}",
                error_line(
                    format,
                    &format!("second {name}: exiting at once; the batch in flight will be published again")
                )
            );
            std::process::exit(128 + number);
        });
    }
}
