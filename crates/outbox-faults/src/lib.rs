//! # outbox-faults: evidence that the relay loses nothing and keeps per-key order under faults
//!
//! The suite runs real processes (the `outbox` CLI, or `outbox-fault-relay` where a fault must be
//! injected inside the relay), a real PostgreSQL (a fresh database per scenario) and a moto
//! emulator of each scenario's own, and checks every run against a ledger.
//!
//! ## Map of the crate
//! - [`ledger`]: the ledger table written in the producers' transactions, background
//!   [`ledger::Producers`], and the checker ([`ledger::check`]) that reports lost, duplicated and
//!   out-of-order events per key.
//! - [`proxy`]: a loopback TCP proxy the test steers (delay, black hole, cut, refuse).
//! - [`procs`]: relay and consumer child processes, signals, the scenario's own emulator.
//! - [`sqs`]: FIFO queues and a collector that records what reached the broker.
//! - [`scenario`]: quick/long mode, relay configuration files, waiting for a drained backlog, and
//!   the result row each scenario prints (and appends to `OUTBOX_FAULTS_REPORT`).
//!
//! The scenarios themselves are the integration tests in `tests/faults.rs`; bad input and
//! security tests are in `tests/bad_input.rs` and `tests/security.rs`, properties in
//! `tests/properties.rs`.

pub mod ledger;
pub mod procs;
pub mod proxy;
pub mod scenario;
pub mod sqs;
