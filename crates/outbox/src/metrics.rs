//! The relay's metrics: their names (fixed, so that dashboards and alerts can rely on them), their
//! help texts, and the histogram buckets an exporter should use.
//!
//! The engine records through the [`metrics`](https://docs.rs/metrics) facade, so an application
//! reads them with any exporter it installs; without one, recording costs next to nothing.
//! `outbox-admin` installs a Prometheus exporter and serves `GET /metrics`. Every name is also
//! listed in the README's metrics table and checked against `ops/` (alerts, dashboard) by a test.

/// Counter `{destination}`: events the broker acknowledged.
pub const EVENTS_PUBLISHED_TOTAL: &str = "outbox_events_published_total";
/// Counter `{destination, scope}`: events whose publish failed; `scope` is `event` (the event's
/// own failure: an attempt is charged) or `destination` (the destination was unavailable: none is).
pub const EVENTS_FAILED_TOTAL: &str = "outbox_events_failed_total";
/// Counter `{destination}`: events this relay dead-lettered.
pub const EVENTS_DEAD_TOTAL: &str = "outbox_events_dead_total";
/// Gauge: undelivered events (pending, retrying, held, blocked), from a periodic query.
pub const BACKLOG_EVENTS: &str = "outbox_backlog_events";
/// Gauge: of those, the events a claim could take now (not retrying, held or blocked); with a
/// relay running, this staying above 0 while nothing is published is a stall.
pub const BACKLOG_DELIVERABLE_EVENTS: &str = "outbox_backlog_deliverable_events";
/// Gauge: age in seconds of the oldest undelivered event (0 when there is none).
pub const BACKLOG_OLDEST_AGE_SECONDS: &str = "outbox_backlog_oldest_age_seconds";
/// Gauge: dead-lettered events waiting for an operator.
pub const DEAD_EVENTS: &str = "outbox_dead_events";
/// Gauge: keys whose later events wait behind an earlier event (dead, retrying or held).
pub const KEYS_BLOCKED: &str = "outbox_keys_blocked";
/// Histogram `{destination}`: seconds of the publish call that carried the destination's events.
pub const PUBLISH_DURATION_SECONDS: &str = "outbox_publish_duration_seconds";
/// Histogram: seconds from an event's `created_at` to the broker's acknowledgement.
pub const COMMIT_TO_PUBLISH_SECONDS: &str = "outbox_commit_to_publish_seconds";
/// Histogram: seconds one claim statement took (empty claims included).
pub const CLAIM_DURATION_SECONDS: &str = "outbox_claim_duration_seconds";
/// Histogram: events per non-empty claim.
pub const BATCH_EVENTS: &str = "outbox_batch_events";
/// Gauge `{destination}`: 1 while the destination takes events, 0 while it is down.
pub const DESTINATION_UP: &str = "outbox_destination_up";
/// Gauge `{version, profile, schema}`: always 1; identifies the running relay.
pub const RELAY_INFO: &str = "outbox_relay_info";

/// Every metric name with its kind and help text, in the order of the README's table.
pub const ALL: &[(&str, Kind, &str)] = &[
    (EVENTS_PUBLISHED_TOTAL, Kind::Counter, "Events the broker acknowledged, per destination."),
    (EVENTS_FAILED_TOTAL, Kind::Counter, "Failed publishes per destination; scope=event charges an attempt, scope=destination (unavailable) does not."),
    (EVENTS_DEAD_TOTAL, Kind::Counter, "Events dead-lettered by this relay, per destination."),
    (BACKLOG_EVENTS, Kind::Gauge, "Undelivered events (pending, retrying, held, blocked)."),
    (BACKLOG_DELIVERABLE_EVENTS, Kind::Gauge, "Undelivered events a claim could take now."),
    (BACKLOG_OLDEST_AGE_SECONDS, Kind::Gauge, "Age of the oldest undelivered event in seconds."),
    (DEAD_EVENTS, Kind::Gauge, "Dead-lettered events waiting for an operator."),
    (KEYS_BLOCKED, Kind::Gauge, "Keys whose later events wait behind an earlier event."),
    (PUBLISH_DURATION_SECONDS, Kind::Histogram, "Duration of publish calls, per destination."),
    (COMMIT_TO_PUBLISH_SECONDS, Kind::Histogram, "Time from an event's created_at to the broker's acknowledgement."),
    (CLAIM_DURATION_SECONDS, Kind::Histogram, "Duration of claim statements."),
    (BATCH_EVENTS, Kind::Histogram, "Events per non-empty claim."),
    (DESTINATION_UP, Kind::Gauge, "1 while a destination takes events, 0 while it is down."),
    (RELAY_INFO, Kind::Gauge, "Always 1: the relay's version, profile and schema as labels."),
];

/// The kind of a metric, for exporters and documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up.
    Counter,
    /// Set to the current value.
    Gauge,
    /// A distribution (Prometheus histogram with [`buckets`]).
    Histogram,
}

/// Buckets for the histogram `name`: seconds for durations, event counts for batches.
pub fn buckets(name: &str) -> &'static [f64] {
    match name {
        BATCH_EVENTS => &[1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0],
        COMMIT_TO_PUBLISH_SECONDS => &[
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
            1800.0,
        ],
        _ => &[
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ],
    }
}

/// Registers the help text of every metric with the installed recorder. Call it after installing
/// an exporter (a recorder installed later does not see descriptions given before).
pub fn describe() {
    for (name, kind, help) in ALL {
        match kind {
            Kind::Counter => ::metrics::describe_counter!(*name, *help),
            Kind::Gauge => ::metrics::describe_gauge!(*name, *help),
            Kind::Histogram => ::metrics::describe_histogram!(*name, *help),
        }
    }
}

/// Sets [`RELAY_INFO`] for this relay: the crate version, the profile and the schema.
pub fn relay_info(profile: &str, schema: &str) {
    ::metrics::gauge!(
        RELAY_INFO,
        "version" => env!("CARGO_PKG_VERSION"),
        "profile" => profile.to_owned(),
        "schema" => schema.to_owned()
    )
    .set(1.0);
}

/// Sets the backlog gauges from one reading of the store.
pub(crate) fn backlog(b: &crate::store::Backlog) {
    ::metrics::gauge!(BACKLOG_EVENTS).set(b.pending as f64);
    ::metrics::gauge!(BACKLOG_DELIVERABLE_EVENTS).set(b.deliverable as f64);
    ::metrics::gauge!(BACKLOG_OLDEST_AGE_SECONDS).set(b.oldest_pending_age_seconds);
    ::metrics::gauge!(DEAD_EVENTS).set(b.dead as f64);
    ::metrics::gauge!(KEYS_BLOCKED).set(b.keys_blocked as f64);
}
