//! `/health/live` and `/health/ready`: liveness is the relay's loops running; readiness also
//! catches the relay that runs but no longer delivers (the silent stall).

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use outbox::{Backlog, RelayHealth};
use serde::Serialize;

use crate::{AdminSettings, AdminState};

/// How long the readiness check waits for the database.
const DB_TIMEOUT: Duration = Duration::from_secs(5);

/// The verdict of `/health/ready`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Readiness {
    /// Whether every check passed.
    pub ready: bool,
    /// Why not, one sentence per failed check (empty when ready).
    pub reasons: Vec<String>,
    /// The backlog the verdict was made on, when the database answered.
    pub backlog: Option<Backlog>,
}

/// Judges readiness from the relay's health (`None` when the relay runs in another process) and
/// a fresh backlog reading (`Err` with the reason when the database did not answer):
/// - the database answers;
/// - the relay runs (it passed its destinations' start-up check and did not stop);
/// - no destination has been down for `stall_after` or longer;
/// - no stall: when events are deliverable, something was settled within `stall_after` (for a
///   relay younger than that, its start counts as progress);
/// - the oldest undelivered event is younger than `max_pending_age`, when that is set.
pub fn readiness(
    relay: Option<&RelayHealth>,
    backlog: Result<Backlog, String>,
    settings: &AdminSettings,
) -> Readiness {
    let mut reasons = Vec::new();
    let stall = settings.stall_after.as_secs_f64();
    if let Err(e) = &backlog {
        reasons.push(format!("the database does not answer: {e}"));
    }
    if let Some(relay) = relay {
        if !relay.running {
            reasons.push(match &relay.fatal {
                Some(reason) => format!("the relay stopped: {reason}"),
                None => {
                    "the relay is not running (starting, checking its destinations, or stopped)"
                        .to_owned()
                }
            });
        }
        for d in &relay.destinations {
            if let Some(down) = d.down_for_seconds.filter(|s| *s >= stall) {
                reasons.push(format!(
                    "destination `{}` has been down for {down:.0}s (admin.stall_after = {stall:.0}s): {}",
                    d.name,
                    d.last_error.as_deref().unwrap_or("unavailable")
                ));
            }
        }
        if let Ok(b) = &backlog {
            let quiet_for = relay
                .last_settle_age_seconds
                .unwrap_or(relay.uptime_seconds);
            if relay.running && b.deliverable > 0 && quiet_for >= stall {
                reasons.push(format!(
                    "the relay is stalled: {} events are deliverable and nothing was settled for {quiet_for:.0}s (admin.stall_after = {stall:.0}s)",
                    b.deliverable
                ));
            }
        }
    }
    if let (Ok(b), Some(max)) = (&backlog, settings.max_pending_age) {
        if b.oldest_pending_age_seconds > max.as_secs_f64() {
            reasons.push(format!(
                "the oldest undelivered event is {:.0}s old (admin.max_pending_age = {:.0}s)",
                b.oldest_pending_age_seconds,
                max.as_secs_f64()
            ));
        }
    }
    Readiness {
        ready: reasons.is_empty(),
        reasons,
        backlog: backlog.ok(),
    }
}

/// A fresh backlog reading, bounded in time; the error says why there is none.
pub(crate) async fn read_backlog(state: &AdminState) -> Result<Backlog, String> {
    let s = &state.inner;
    match tokio::time::timeout(DB_TIMEOUT, outbox::postgres::backlog(&s.pool, &s.schema)).await {
        Ok(Ok(b)) => Ok(b),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {DB_TIMEOUT:?}")),
    }
}

pub(crate) async fn live(State(state): State<AdminState>) -> Response {
    match state.inner.relay.as_ref().map(|r| r.health()) {
        Some(h) if !h.running => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({
                "live": false,
                "reason": h.fatal.unwrap_or_else(|| "the relay is not running".to_owned()),
            })),
        )
            .into_response(),
        _ => Json(serde_json::json!({ "live": true })).into_response(),
    }
}

pub(crate) async fn ready(State(state): State<AdminState>) -> Response {
    let health = state.inner.relay.as_ref().map(|r| r.health());
    let backlog = read_backlog(&state).await;
    let verdict = readiness(health.as_ref(), backlog, &state.inner.settings);
    let code = if verdict.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(verdict)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use outbox::{DestinationStatus, RelaySnapshot};

    fn relay(settled_ago: Option<f64>) -> RelayHealth {
        RelayHealth {
            running: true,
            uptime_seconds: 100.0,
            last_settle_age_seconds: settled_ago,
            last_claim_age_seconds: Some(0.0),
            fatal: None,
            counters: RelaySnapshot::default(),
            destinations: Vec::new(),
            backlog: None,
            backlog_reading_age_seconds: None,
        }
    }

    fn backlog(deliverable: i64, oldest: f64) -> Backlog {
        Backlog {
            pending: deliverable,
            deliverable,
            dead: 0,
            keys_blocked: 0,
            oldest_pending_age_seconds: oldest,
        }
    }

    #[test]
    fn each_check_fails_readiness_with_its_reason() {
        let settings = AdminSettings {
            token: None,
            stall_after: Duration::from_secs(60),
            max_pending_age: Some(Duration::from_secs(300)),
        };
        let ok = readiness(Some(&relay(Some(1.0))), Ok(backlog(5, 2.0)), &settings);
        assert!(ok.ready, "{ok:?}");
        // An idle relay with nothing to do is not stalled, however long ago it settled.
        assert!(readiness(Some(&relay(Some(1e6))), Ok(backlog(0, 0.0)), &settings).ready);
        let stalled = readiness(Some(&relay(Some(61.0))), Ok(backlog(5, 2.0)), &settings);
        assert!(
            !stalled.ready && stalled.reasons[0].contains("stalled"),
            "{stalled:?}"
        );
        let never = readiness(Some(&relay(None)), Ok(backlog(5, 2.0)), &settings);
        assert!(!never.ready, "{never:?}");
        let db = readiness(Some(&relay(Some(1.0))), Err("refused".into()), &settings);
        assert!(!db.ready && db.reasons[0].contains("database"), "{db:?}");
        let old = readiness(None, Ok(backlog(0, 301.0)), &settings);
        assert!(
            !old.ready && old.reasons[0].contains("max_pending_age"),
            "{old:?}"
        );
        let mut down = relay(Some(1.0));
        down.destinations.push(DestinationStatus {
            name: "orders".into(),
            up: false,
            down_for_seconds: Some(60.0),
            last_error: Some("connection refused".into()),
            published: 0,
            failed_event: 0,
            failed_destination: 3,
            dead: 0,
        });
        let verdict = readiness(Some(&down), Ok(backlog(0, 0.0)), &settings);
        assert!(
            !verdict.ready && verdict.reasons[0].contains("`orders`"),
            "{verdict:?}"
        );
        let mut stopped = relay(Some(1.0));
        stopped.running = false;
        assert!(!readiness(Some(&stopped), Ok(backlog(0, 0.0)), &settings).ready);
    }
}
