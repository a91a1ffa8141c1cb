//! Standard output of command results, and what happens when its reader goes away.
//!
//! Rust ignores SIGPIPE, so a write to a closed pipe (`outbox dead list | head -1`) fails with
//! EPIPE, which `println!` turns into a panic and a backtrace hint. Commands write through [`out`]
//! instead: a broken pipe becomes [`BrokenPipe`], which `main` ends quietly with exit code 0 (the
//! reader has all it wanted). [`quiet_broken_pipe_panics`] is the net for any `println!` left.

use std::fmt::Display;
use std::io::Write;

/// The reader of standard output went away: end the command quietly.
#[derive(Debug, thiserror::Error)]
#[error("standard output was closed by its reader")]
pub(crate) struct BrokenPipe;

/// Writes one line of a command's result to standard output.
pub(crate) fn out(line: impl Display) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}")
        .and_then(|()| stdout.flush())
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                anyhow::Error::new(BrokenPipe)
            } else {
                anyhow::Error::new(e).context("writing to standard output")
            }
        })
}

/// A `print!` whose output is gone (closed pipe) exits quietly with 0 instead of panicking.
pub(crate) fn quiet_broken_pipe_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        // std's own message for a failed print: "failed printing to stdout: Broken pipe (os error 32)".
        if message.starts_with("failed printing to std") && message.contains("os error 32") {
            std::process::exit(0);
        }
        default(info);
    }));
}
