//! `/metrics`, `/api/...` and the console page. The dead-letter endpoints call the same library
//! functions as `outbox dead ...` (`outbox::postgres::{dead_events, dead_event, replay_dead,
//! delete_dead}`), so both behave alike: short transactions of `DEAD_CHANGE_BATCH` events, the keys' later
//! events released, the relays woken.

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use outbox::postgres::{self, AdminError, DeadFilter, DeadSelection, MAX_DEAD_LIST_LIMIT};
use serde::Deserialize;
use uuid::Uuid;

use crate::health::{read_backlog, readiness};
use crate::AdminState;

/// The web console: one static page, no build step (it polls `/api/status` and `/metrics`).
const CONSOLE: &str = include_str!("../assets/console.html");

/// A JSON error: `{"error": "..."}` with `code`.
fn error(code: StatusCode, message: impl Into<String>) -> Response {
    (code, Json(serde_json::json!({ "error": message.into() }))).into_response()
}

fn admin_error(e: AdminError) -> Response {
    match e {
        AdminError::Database(e) => {
            tracing::warn!(error = %e, "admin API: database error");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("database error: {e}"),
            )
        }
        e => error(StatusCode::BAD_REQUEST, e.to_string()),
    }
}

pub(crate) async fn console() -> Html<&'static str> {
    Html(CONSOLE)
}

pub(crate) async fn metrics(State(state): State<AdminState>) -> Response {
    match &state.inner.metrics {
        Some(handle) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            handle.render(),
        )
            .into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            "no Prometheus recorder in this process: the application exports the metrics itself",
        ),
    }
}

/// `/api/status`: the backlog as `outbox status` shows it, the relay's counters and
/// destinations, and the readiness verdict.
pub(crate) async fn status(State(state): State<AdminState>) -> Response {
    let s = &state.inner;
    let health = s.relay.as_ref().map(|r| r.health());
    let backlog = read_backlog(&state).await;
    let verdict = readiness(health.as_ref(), backlog, &s.settings);
    let status = match postgres::status(&s.pool, &s.schema).await {
        Ok(status) => status,
        Err(e) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("database error: {e}"),
            )
        }
    };
    Json(serde_json::json!({
        "backlog": status,
        "relay": health,
        "readiness": verdict,
        "mutations_enabled": s.settings.token.is_some(),
        "stall_after_seconds": s.settings.stall_after.as_secs_f64(),
    }))
    .into_response()
}

/// The dead-letter filters as query parameters: `type`, `key` (`TYPE` or `TYPE/ID`), `since`
/// (RFC 3339), `error` (substring of the last error, ignoring case), and `limit` for listings.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FilterParams {
    #[serde(rename = "type")]
    event_type: Option<String>,
    key: Option<String>,
    since: Option<DateTime<Utc>>,
    error: Option<String>,
    limit: Option<i64>,
}

impl FilterParams {
    fn filter(&self) -> Result<DeadFilter, String> {
        let nonempty = |s: &Option<String>| s.clone().filter(|s| !s.is_empty());
        let (aggregate_type, aggregate_id) = match nonempty(&self.key) {
            None => (None, None),
            Some(key) => match key.split_once('/') {
                Some((ty, id)) if !ty.is_empty() && !id.is_empty() => {
                    (Some(ty.to_owned()), Some(id.to_owned()))
                }
                None => (Some(key), None),
                Some(_) => return Err(format!("{key:?} is not a key: use TYPE/ID or TYPE")),
            },
        };
        Ok(DeadFilter {
            event_type: nonempty(&self.event_type),
            aggregate_type,
            aggregate_id,
            since: self.since,
            error_contains: nonempty(&self.error),
        })
    }
}

pub(crate) async fn dead_list(
    State(state): State<AdminState>,
    params: Result<Query<FilterParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Query(params) = match params {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let filter = match params.filter() {
        Ok(f) => f,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let limit = params.limit.unwrap_or(50);
    if !(1..=MAX_DEAD_LIST_LIMIT).contains(&limit) {
        return error(
            StatusCode::BAD_REQUEST,
            format!("limit {limit} is out of range: use 1 to {MAX_DEAD_LIST_LIMIT}"),
        );
    }
    let s = &state.inner;
    match postgres::dead_events(&s.pool, &s.schema, &filter, limit).await {
        Ok(events) => Json(events).into_response(),
        Err(e) => admin_error(e),
    }
}

pub(crate) async fn dead_show(State(state): State<AdminState>, Path(id): Path<String>) -> Response {
    let Ok(id) = id.parse::<Uuid>() else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("{id:?} is not an event id (a UUID)"),
        );
    };
    let s = &state.inner;
    match postgres::dead_event(&s.pool, &s.schema, id).await {
        Ok(Some(event)) => Json(event).into_response(),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            format!("{id} is not a dead event (never existed, or already replayed, deleted or published)"),
        ),
        Err(e) => admin_error(e),
    }
}

/// The body of a replay or delete: exactly one of `ids`, `filter` or `all: true`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct MutationBody {
    #[serde(default)]
    ids: Vec<Uuid>,
    filter: Option<FilterParams>,
    #[serde(default)]
    all: bool,
}

impl MutationBody {
    fn selection(&self) -> Result<DeadSelection, String> {
        let filter = match &self.filter {
            Some(f) => Some(f.filter()?).filter(|f| !f.is_empty()),
            None => None,
        };
        match (self.ids.is_empty(), filter, self.all) {
            (false, None, false) => Ok(DeadSelection::Ids(self.ids.clone())),
            (true, Some(f), false) => Ok(DeadSelection::Matching(f)),
            (true, None, true) => Ok(DeadSelection::Matching(DeadFilter::default())),
            (true, None, false) => Err(
                "name the dead events: {\"ids\": [...]}, {\"filter\": {...}} or {\"all\": true}"
                    .to_owned(),
            ),
            _ => Err("give ids, a filter or all, not several of them".to_owned()),
        }
    }
}

/// Why a mutation was refused before it ran.
enum Refusal {
    NoTokenConfigured,
    Missing,
    Wrong,
}

/// Checks `Authorization: Bearer <token>` against the configured token, in time independent of
/// where the two differ.
fn authorize(state: &AdminState, headers: &HeaderMap) -> Result<(), Refusal> {
    let Some(expected) = &state.inner.settings.token else {
        return Err(Refusal::NoTokenConfigured);
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or(Refusal::Missing)?;
    if constant_time_eq(given.trim().as_bytes(), expected.expose().as_bytes()) {
        Ok(())
    } else {
        Err(Refusal::Wrong)
    }
}

/// Compares without an early exit, so the time taken does not tell how much of a guess was right.
/// (The length may leak; the token's length is no secret worth protecting.)
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn refused(action: &str, refusal: Refusal) -> Response {
    let (code, message) = match refusal {
        Refusal::NoTokenConfigured => (
            StatusCode::FORBIDDEN,
            "mutations are disabled: no admin.token is configured (set admin.token or OUTBOX_ADMIN__TOKEN to enable replay and delete)",
        ),
        Refusal::Missing => (
            StatusCode::UNAUTHORIZED,
            "this needs the admin token: send Authorization: Bearer <admin.token>",
        ),
        Refusal::Wrong => (StatusCode::UNAUTHORIZED, "the admin token is wrong"),
    };
    tracing::warn!(action, reason = message, "admin API: mutation refused");
    let mut response = error(code, message);
    if code == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
    }
    response
}

#[derive(Clone, Copy)]
enum Mutation {
    Replay,
    Delete,
}

async fn mutate(
    state: AdminState,
    headers: HeaderMap,
    body: Result<Json<MutationBody>, axum::extract::rejection::JsonRejection>,
    mutation: Mutation,
) -> Response {
    let action = match mutation {
        Mutation::Replay => "replay",
        Mutation::Delete => "delete",
    };
    // The token is checked before the body is looked at: a caller without it learns nothing.
    if let Err(refusal) = authorize(&state, &headers) {
        return refused(action, refusal);
    }
    let selection = match body
        .map_err(|e| e.body_text())
        .and_then(|Json(b)| b.selection())
    {
        Ok(selection) => selection,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let s = &state.inner;
    let result = match mutation {
        Mutation::Replay => postgres::replay_dead(&s.pool, &s.schema, &selection).await,
        Mutation::Delete => postgres::delete_dead(&s.pool, &s.schema, &selection).await,
    };
    match result {
        Ok(change) => {
            tracing::info!(
                action,
                selection = ?selection,
                changed = change.changed.len(),
                ids = ?change.changed,
                not_found = ?change.not_found,
                released = change.released,
                "admin API: dead events changed"
            );
            Json(serde_json::json!({
                "action": action,
                "changed": change.changed,
                "not_found": change.not_found,
                "released": change.released,
            }))
            .into_response()
        }
        Err(e) => admin_error(e),
    }
}

pub(crate) async fn dead_replay(
    State(state): State<AdminState>,
    headers: HeaderMap,
    body: Result<Json<MutationBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    mutate(state, headers, body, Mutation::Replay).await
}

pub(crate) async fn dead_delete(
    State(state): State<AdminState>,
    headers: HeaderMap,
    body: Result<Json<MutationBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    mutate(state, headers, body, Mutation::Delete).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_equal_only_when_equal() {
        assert!(constant_time_eq(b"abcdef", b"abcdef"));
        assert!(!constant_time_eq(b"abcdef", b"abcdeg"));
        assert!(!constant_time_eq(b"abcdef", b"abcde"));
        assert!(!constant_time_eq(b"", b"a"));
    }

    #[test]
    fn a_mutation_names_exactly_one_selection() {
        let body: MutationBody = serde_json::from_str(r#"{"all": true}"#).unwrap();
        assert_eq!(
            body.selection(),
            Ok(DeadSelection::Matching(DeadFilter::default()))
        );
        let body: MutationBody = serde_json::from_str(r#"{}"#).unwrap();
        assert!(body.selection().is_err());
        let body: MutationBody =
            serde_json::from_str(r#"{"all": true, "filter": {"type": "E"}}"#).unwrap();
        assert!(body.selection().is_err());
        let body: MutationBody =
            serde_json::from_str(r#"{"filter": {"key": "order/o-1"}}"#).unwrap();
        let Ok(DeadSelection::Matching(f)) = body.selection() else {
            panic!("a filter selection")
        };
        assert_eq!(f.aggregate_id.as_deref(), Some("o-1"));
    }
}
