//! The AWS destinations against the emulator (moto, `scripts/aws-emulator.sh start`), in one test
//! binary: linking is most of a test run's time. `tests/outage.rs`, which stops and restarts an
//! emulator, is a binary of its own.

mod common;
mod eventbridge;
mod prod_profile;
mod sqs;
