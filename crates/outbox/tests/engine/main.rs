//! The engine's tests against a real PostgreSQL, in one test binary (linking is most of the
//! suite's build time): `enqueue` for the producer side and migrations, `relay` for delivery.
//! Run one part with `cargo test --workspace --test engine enqueue::`.

mod enqueue;
mod relay;
