//! The fault, hostile-input, property and security suites, in one test binary: linking is most of
//! a test run's time.

mod bad_input;
mod faults;
mod properties;
mod security;
