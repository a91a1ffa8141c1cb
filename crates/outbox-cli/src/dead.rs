//! `outbox dead list | show | replay | delete`: the operator's side of the dead letters, over the
//! library functions in `outbox::postgres` (so a later admin API does the same thing).

use std::io::{BufRead, IsTerminal, Write};
use std::ops::ControlFlow;
use std::sync::{Arc, OnceLock};

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use outbox::postgres::{
    self, AdminError, DeadChange, DeadEvent, DeadFilter, DeadSelection, MAX_DEAD_LIST_LIMIT,
};
use outbox::Config;
use uuid::Uuid;

use crate::out::out;
use crate::UsageError;

#[derive(Subcommand, Debug)]
pub(crate) enum DeadAction {
    /// List dead events, oldest first.
    List {
        #[command(flatten)]
        filter: FilterArgs,
        /// At most this many (1 to 10000).
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(i64).range(1..=MAX_DEAD_LIST_LIMIT))]
        limit: i64,
        /// One JSON array instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// Show one dead event: payload, headers, destination, attempts and last error.
    Show {
        id: Uuid,
        /// One JSON object instead of the readable form.
        #[arg(long)]
        json: bool,
    },
    /// Make dead events pending again with a fresh attempt budget, and let the later events of
    /// their keys flow again. Exits 1 when an id is not a dead event.
    Replay {
        #[command(flatten)]
        targets: Targets,
        /// The result as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Delete dead events for good (after a confirmation), and let the later events of their keys
    /// flow again. Exits 1 when an id is not a dead event.
    Delete {
        #[command(flatten)]
        targets: Targets,
        /// Show what would be deleted; delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// Do not ask for confirmation (needed when standard input is not a terminal).
        #[arg(long, short = 'y')]
        yes: bool,
        /// The result as one JSON object.
        #[arg(long)]
        json: bool,
    },
}

/// Conditions on dead events; all given must hold.
#[derive(Args, Debug, Default, Clone)]
pub(crate) struct FilterArgs {
    /// Only events of this event type.
    #[arg(long = "type", value_name = "EVENT_TYPE")]
    event_type: Option<String>,
    /// Only events of this key: TYPE/ID (split at the first `/`), or TYPE for every id of a type.
    #[arg(long, value_name = "TYPE[/ID]", value_parser = parse_key)]
    key: Option<KeyFilter>,
    /// Only events created at or after WHEN: a time (2026-05-01T12:00:00Z or 2026-05-01, UTC) or a
    /// duration ago (90m, 2h, 7d).
    #[arg(long, value_name = "WHEN", value_parser = parse_since)]
    since: Option<DateTime<Utc>>,
    /// Only events whose last error contains TEXT (ignoring case).
    #[arg(long = "error", value_name = "TEXT")]
    error: Option<String>,
}

#[derive(Debug, Clone)]
pub(crate) struct KeyFilter {
    aggregate_type: String,
    aggregate_id: Option<String>,
}

impl FilterArgs {
    fn to_filter(&self) -> DeadFilter {
        DeadFilter {
            event_type: self.event_type.clone(),
            aggregate_type: self.key.as_ref().map(|k| k.aggregate_type.clone()),
            aggregate_id: self.key.as_ref().and_then(|k| k.aggregate_id.clone()),
            since: self.since,
            error_contains: self.error.clone(),
        }
    }
}

/// Which dead events a replay or delete changes: ids, a filter, or `--all`.
#[derive(Args, Debug)]
pub(crate) struct Targets {
    /// Dead event ids.
    #[arg(value_name = "ID")]
    ids: Vec<Uuid>,
    /// A dead event id (repeatable; the same as giving it as an argument).
    #[arg(long = "id", value_name = "ID")]
    id_flags: Vec<Uuid>,
    /// Every dead event.
    #[arg(long)]
    all: bool,
    #[command(flatten)]
    filter: FilterArgs,
}

impl Targets {
    fn selection(&self) -> Result<DeadSelection> {
        let ids: Vec<Uuid> = self.ids.iter().chain(&self.id_flags).copied().collect();
        let filter = self.filter.to_filter();
        let usage = |msg: &str| Err(UsageError(anyhow::anyhow!("{msg}")).into());
        match (ids.is_empty(), filter.is_empty(), self.all) {
            (false, true, false) => Ok(DeadSelection::Ids(ids)),
            (true, false, false) => Ok(DeadSelection::Matching(filter)),
            (true, true, true) => Ok(DeadSelection::Matching(DeadFilter::default())),
            (true, true, false) => usage(
                "name the dead events: their ids, a filter (--type, --key, --since, --error) or --all",
            ),
            _ => usage("give ids, filters or --all, not several of them"),
        }
    }
}

fn parse_key(s: &str) -> Result<KeyFilter, String> {
    let (ty, id) = match s.split_once('/') {
        Some((ty, id)) => (ty, Some(id)),
        None => (s, None),
    };
    if ty.is_empty() || id.is_some_and(str::is_empty) {
        return Err(format!(
            "{s:?} is not a key: use TYPE/ID (e.g. order/o-42) or TYPE (e.g. order)"
        ));
    }
    Ok(KeyFilter {
        aggregate_type: ty.to_owned(),
        aggregate_id: id.map(str::to_owned),
    })
}

fn parse_since(s: &str) -> Result<DateTime<Utc>, String> {
    let s = s.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    if let Some(midnight) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
    {
        return Ok(midnight.and_utc());
    }
    let ago = humantime::parse_duration(s).map_err(|_| {
        format!("{s:?} is neither a time (2026-05-01T12:00:00Z, 2026-05-01) nor a duration ago (90m, 2h, 7d)")
    })?;
    chrono::Duration::from_std(ago)
        .ok()
        .and_then(|ago| Utc::now().checked_sub_signed(ago))
        .ok_or_else(|| format!("{s:?} reaches too far back"))
}

fn admin_error(e: AdminError) -> anyhow::Error {
    match e {
        AdminError::Database(_) => anyhow::Error::new(e),
        e => UsageError(e.into()).into(),
    }
}

/// Ids that were asked for but are not dead events: exit 1, naming them.
#[derive(Debug, thiserror::Error)]
#[error("not found among the dead events: {} (never existed, or already replayed, deleted or published)", join(.0))]
pub(crate) struct NotFound(Vec<Uuid>);

fn join(ids: &[Uuid]) -> String {
    ids.iter()
        .map(Uuid::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn line(e: &DeadEvent) -> String {
    format!(
        "{} seq={} {}/{} {} destination={} attempts={} created={} error={}",
        e.id,
        e.seq,
        e.aggregate_type,
        e.aggregate_id,
        e.event_type,
        e.destination.as_deref().unwrap_or("-"),
        e.attempts,
        e.created_at
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        e.last_error.as_deref().unwrap_or("-")
    )
}

pub(crate) async fn run(config: &Config, action: DeadAction) -> Result<()> {
    let pool = crate::connect(config, "outbox-dead").await?;
    postgres::check_schema(&pool, &config.schema)
        .await
        .map_err(|e| UsageError(e.into()))?;
    let schema = &config.schema;
    match action {
        DeadAction::List {
            filter,
            limit,
            json,
        } => {
            let events = postgres::dead_events(&pool, schema, &filter.to_filter(), limit)
                .await
                .map_err(admin_error)?;
            if json {
                out(serde_json::to_string(&events)?)?;
            } else if events.is_empty() {
                out("no dead events")?;
            } else {
                for e in &events {
                    out(line(e))?;
                }
            }
            if i64::try_from(events.len()) == Ok(limit) {
                eprintln!(
                    "(the first {limit}; there may be more: narrow with filters or raise --limit)"
                );
            }
            Ok(())
        }
        DeadAction::Show { id, json } => {
            let Some(event) = postgres::dead_event(&pool, schema, id)
                .await
                .map_err(admin_error)?
            else {
                return Err(NotFound(vec![id]).into());
            };
            if json {
                return out(serde_json::to_string(&event)?);
            }
            let e = &event.event;
            out(format!("id           {}", e.id))?;
            out(format!("seq          {}", e.seq))?;
            out(format!(
                "key          {}/{}",
                e.aggregate_type, e.aggregate_id
            ))?;
            out(format!("event type   {}", e.event_type))?;
            out(format!(
                "destination  {}",
                e.destination.as_deref().unwrap_or("- (routed by type)")
            ))?;
            out(format!(
                "created at   {}",
                e.created_at
                    .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
            ))?;
            out(format!("attempts     {}", e.attempts))?;
            out(format!(
                "last error   {}",
                e.last_error.as_deref().unwrap_or("-")
            ))?;
            out(format!(
                "headers      {}",
                serde_json::to_string(&event.headers)?
            ))?;
            out("payload")?;
            out(serde_json::to_string_pretty(&event.payload)?)
        }
        DeadAction::Replay { targets, json } => {
            let selection = targets.selection()?;
            let stop = StopOnSignal::install()?;
            let change = postgres::replay_dead_with_progress(&pool, schema, &selection, |so_far| {
                stop.progress("replayed", so_far)
            })
            .await
            .map_err(admin_error)?;
            report(&change, "replayed", json)?;
            stop.finish(&change, "replay")
        }
        DeadAction::Delete {
            targets,
            dry_run,
            yes,
            json,
        } => {
            let selection = targets.selection()?;
            if dry_run {
                let (events, not_found) = postgres::select_dead(&pool, schema, &selection)
                    .await
                    .map_err(admin_error)?;
                if json {
                    out(serde_json::json!({ "would_delete": events, "not_found": not_found }))?;
                } else {
                    out(format!(
                        "would delete {} dead events (dry run: nothing deleted)",
                        events.len()
                    ))?;
                    for e in &events {
                        out(line(e))?;
                    }
                }
                return if not_found.is_empty() {
                    Ok(())
                } else {
                    Err(NotFound(not_found).into())
                };
            }
            let selection = if yes {
                selection
            } else {
                match confirm(&pool, config, &selection).await? {
                    Some(confirmed) => confirmed,
                    None => return Ok(()),
                }
            };
            let stop = StopOnSignal::install()?;
            let change = postgres::delete_dead_with_progress(&pool, schema, &selection, |so_far| {
                stop.progress("deleted", so_far)
            })
            .await
            .map_err(admin_error)?;
            report(&change, "deleted", json)?;
            stop.finish(&change, "delete")
        }
    }
}

/// Asks on the terminal before deleting. Returns the ids the operator saw and confirmed (so that a
/// filter cannot delete more than was shown), or `None` when they declined or nothing matched.
async fn confirm(
    pool: &sqlx::PgPool,
    config: &Config,
    selection: &DeadSelection,
) -> Result<Option<DeadSelection>> {
    if !std::io::stdin().is_terminal() {
        return Err(UsageError(anyhow::anyhow!(
            "refusing to delete dead events without confirmation: standard input is not a terminal; \
             pass --yes to delete without asking (or --dry-run to see what would be deleted)"
        ))
        .into());
    }
    let (events, not_found) = postgres::select_dead(pool, &config.schema, selection)
        .await
        .map_err(admin_error)?;
    if events.is_empty() {
        eprintln!("no dead event matches: nothing to delete");
        return if not_found.is_empty() {
            Ok(None)
        } else {
            Err(NotFound(not_found).into())
        };
    }
    const SHOWN: usize = 20;
    for e in events.iter().take(SHOWN) {
        eprintln!("{}", line(e));
    }
    if events.len() > SHOWN {
        eprintln!("... and {} more", events.len() - SHOWN);
    }
    eprint!("delete these {} dead events for good? [y/N] ", events.len());
    std::io::stderr().flush().ok();
    let mut answer = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut answer)
        .context("reading the confirmation")?;
    if !matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes") {
        eprintln!("nothing deleted");
        return Ok(None);
    }
    let mut ids: Vec<Uuid> = events.iter().map(|e| e.id).collect();
    // The ids the operator named but that are not dead are still reported after the delete.
    ids.extend(not_found);
    Ok(Some(DeadSelection::Ids(ids)))
}

/// A replay or delete of many events runs in transactions of `DEAD_CHANGE_BATCH` events: between
/// two it prints how far it got, and the first SIGINT or SIGTERM stops it there (what is done stays
/// done, the rest untouched; the same command continues). A second signal exits at once, rolling
/// back only the transaction in flight.
struct StopOnSignal {
    received: Arc<OnceLock<&'static str>>,
}

impl StopOnSignal {
    fn install() -> Result<Self> {
        let signals = crate::signals::Signals::install()?;
        let received = Arc::new(OnceLock::new());
        let format = crate::LOG_FORMAT.get().copied().unwrap_or_default();
        tokio::spawn(signals.first(received.clone(), format));
        Ok(Self { received })
    }

    fn progress(&self, verb: &str, so_far: &DeadChange) -> ControlFlow<()> {
        match self.received.get() {
            Some(_) => ControlFlow::Break(()),
            None => {
                eprintln!(
                    "{verb} {} dead events so far ({} later events released); Ctrl-C stops after \
                     the next {} at most",
                    so_far.changed.len(),
                    so_far.released,
                    postgres::DEAD_CHANGE_BATCH
                );
                ControlFlow::Continue(())
            }
        }
    }

    fn finish(&self, change: &DeadChange, what: &str) -> Result<()> {
        if change.interrupted {
            return Err(Interrupted {
                signal: self.received.get().copied().unwrap_or("a signal"),
                what: what.to_owned(),
                done: change.changed.len(),
            }
            .into());
        }
        Ok(())
    }
}

/// A long replay or delete stopped by a signal between two transactions: exit 1.
#[derive(Debug, thiserror::Error)]
#[error("{what} interrupted by {signal} after {done} events (each one complete, the rest untouched): run the same command again to continue")]
pub(crate) struct Interrupted {
    signal: &'static str,
    what: String,
    done: usize,
}

fn report(change: &DeadChange, verb: &str, json: bool) -> Result<()> {
    if json {
        out(serde_json::json!({
            verb: change.changed,
            "not_found": change.not_found,
            "released": change.released,
            "interrupted": change.interrupted,
        }))?;
    } else {
        out(format!(
            "{verb} {} dead events; {} later events of their keys released",
            change.changed.len(),
            change.released
        ))?;
        for id in &change.changed {
            out(format!("{verb} {id}"))?;
        }
    }
    if change.not_found.is_empty() {
        Ok(())
    } else {
        Err(NotFound(change.not_found.clone()).into())
    }
}
