//! The ledger: what producers committed, and the checker that compares it with what reached the
//! broker.
//!
//! Producers write each event and its ledger row in the same transaction, so the ledger is exactly
//! the set of committed events even when a commit fails with an unknown outcome (a connection cut
//! during `COMMIT`): whatever happened to the event happened to its ledger row.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use outbox::{NewEvent, Outbox, Schema};
use sqlx::PgPool;
use uuid::Uuid;

/// The ledger table, in the scenario's database (not in the outbox schema, and not granted to the
/// relay's role: the relay never sees it).
pub const LEDGER_DDL: &str = "CREATE TABLE IF NOT EXISTS fault_ledger (
    id        uuid        PRIMARY KEY,
    key       text        NOT NULL,
    n         bigint      NOT NULL,
    seq       bigint      NOT NULL,
    poison    boolean     NOT NULL DEFAULT false,
    committed timestamptz NOT NULL DEFAULT clock_timestamp()
)";

/// One committed event.
#[derive(Debug, Clone)]
pub struct LedgerRow {
    pub id: Uuid,
    pub key: String,
    pub n: i64,
    pub seq: i64,
    /// Expected to be dead-lettered rather than delivered.
    pub poison: bool,
}

pub async fn create_ledger(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::query(LEDGER_DDL).execute(pool).await?;
    Ok(())
}

pub async fn read_ledger(pool: &PgPool) -> anyhow::Result<Vec<LedgerRow>> {
    let rows: Vec<(Uuid, String, i64, i64, bool)> =
        sqlx::query_as("SELECT id, key, n, seq, poison FROM fault_ledger ORDER BY seq")
            .fetch_all(pool)
            .await?;
    Ok(rows
        .into_iter()
        .map(|(id, key, n, seq, poison)| LedgerRow {
            id,
            key,
            n,
            seq,
            poison,
        })
        .collect())
}

/// One event a producer is about to commit.
#[derive(Debug, Clone)]
pub struct Planned {
    pub key: String,
    pub event_type: String,
    pub payload: serde_json::Value,
    pub poison: bool,
}

/// Commits `events` in one transaction with their ledger rows; the aggregate type is `fault` and
/// the aggregate id is the key. `hold` keeps the transaction open that long before committing
/// (a long-running producer).
pub async fn commit_events(
    pool: &PgPool,
    outbox: &Outbox,
    events: &[Planned],
    next_n: &mut HashMap<String, i64>,
    hold: Duration,
) -> anyhow::Result<Vec<Uuid>> {
    let mut tx = pool.begin().await?;
    let mut ids = Vec::with_capacity(events.len());
    let mut ns = Vec::with_capacity(events.len());
    let mut local = next_n.clone();
    for p in events {
        let n = local.entry(p.key.clone()).or_insert(0);
        *n += 1;
        ns.push(*n);
        let mut payload = p.payload.clone();
        if let Some(obj) = payload.as_object_mut() {
            obj.insert("n".into(), (*n).into());
        }
        let event =
            NewEvent::new("fault", p.key.clone(), p.event_type.clone()).payload(&payload)?;
        ids.push(outbox.enqueue(&mut tx, event).await?);
    }
    let seqs: Vec<(Uuid, i64)> = sqlx::query_as(&format!(
        "SELECT id, seq FROM {} WHERE id = ANY($1)",
        outbox.schema().qualify("outbox_event")
    ))
    .bind(&ids)
    .fetch_all(&mut *tx)
    .await?;
    let seq_of: HashMap<Uuid, i64> = seqs.into_iter().collect();
    for ((p, id), n) in events.iter().zip(&ids).zip(&ns) {
        sqlx::query(
            "INSERT INTO fault_ledger (id, key, n, seq, poison) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(id)
        .bind(&p.key)
        .bind(n)
        .bind(seq_of.get(id).copied().unwrap_or(-1))
        .bind(p.poison)
        .execute(&mut *tx)
        .await?;
    }
    if !hold.is_zero() {
        tokio::time::sleep(hold).await;
    }
    tx.commit().await?;
    *next_n = local;
    Ok(ids)
}

/// Background producers: each owns its keys (one writer per key, so commit order is seq order per
/// key) and commits small transactions until stopped or `limit` events were attempted.
pub struct Producers {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    pub committed: Arc<AtomicU64>,
    pub failed: Arc<AtomicU64>,
}

/// How producers behave.
#[derive(Debug, Clone)]
pub struct ProducerPlan {
    pub producers: usize,
    pub keys_per_producer: usize,
    pub events_per_tx: usize,
    /// Stop after this many committed events in total.
    pub limit: u64,
    /// Pause between transactions of one producer.
    pub pause: Duration,
    pub schema: Schema,
    /// Event type of ordinary events.
    pub event_type: String,
    /// Payload bytes of filler per event.
    pub filler: usize,
}

impl Default for ProducerPlan {
    fn default() -> Self {
        Self {
            producers: 2,
            keys_per_producer: 20,
            events_per_tx: 5,
            limit: 2000,
            pause: Duration::from_millis(2),
            schema: Schema::default(),
            event_type: "Good".into(),
            filler: 32,
        }
    }
}

impl Producers {
    pub fn start(pool: PgPool, plan: ProducerPlan) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let committed = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for p in 0..plan.producers {
            let (pool, plan, stop, committed, failed) = (
                pool.clone(),
                plan.clone(),
                stop.clone(),
                committed.clone(),
                failed.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let outbox = Outbox::new(plan.schema.clone());
                let keys: Vec<String> = (0..plan.keys_per_producer)
                    .map(|k| format!("p{p}-k{k}"))
                    .collect();
                let filler = "x".repeat(plan.filler);
                let mut next_n = HashMap::new();
                while !stop.load(Ordering::Relaxed)
                    && committed.load(Ordering::Relaxed) < plan.limit
                {
                    let events: Vec<Planned> = (0..plan.events_per_tx)
                        .map(|_| Planned {
                            key: keys[fastrand::usize(..keys.len())].clone(),
                            event_type: plan.event_type.clone(),
                            payload: serde_json::json!({ "filler": filler }),
                            poison: false,
                        })
                        .collect();
                    match commit_events(&pool, &outbox, &events, &mut next_n, Duration::ZERO).await
                    {
                        Ok(ids) => {
                            committed.fetch_add(ids.len() as u64, Ordering::Relaxed);
                        }
                        Err(_) => {
                            // A cut connection or a restarted server: the ledger (same transaction)
                            // says whether it committed; try again shortly.
                            failed.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                    if !plan.pause.is_zero() {
                        tokio::time::sleep(plan.pause).await;
                    }
                }
            }));
        }
        Self {
            stop,
            tasks,
            committed,
            failed,
        }
    }

    pub fn committed(&self) -> u64 {
        self.committed.load(Ordering::Relaxed)
    }

    pub fn is_done(&self) -> bool {
        self.tasks.iter().all(|t| t.is_finished())
    }

    /// Stops and waits for every producer.
    pub async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
    }

    /// Waits until the limit is reached.
    pub async fn finish(self) {
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// What the checker found for one scenario.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tally {
    /// Events committed (ledger rows).
    pub committed: usize,
    /// Committed events expected to be dead-lettered (poison).
    pub poison: usize,
    /// Deliveries seen at the broker, duplicates included.
    pub deliveries: usize,
    /// Committed, not poison, never delivered.
    pub lost: usize,
    /// Extra copies of delivered events.
    pub duplicated: usize,
    /// First copies that arrived after a later (`seq`) event of the same key.
    pub out_of_order: usize,
    /// Deliveries of ids the ledger does not know (must be 0: the ledger commits with the event).
    pub unknown: usize,
    /// Poison events that were delivered (should have been dead-lettered).
    pub poison_delivered: usize,
    /// A few examples of each problem, for the failure message.
    pub examples: Vec<String>,
}

impl Tally {
    pub fn is_clean(&self) -> bool {
        self.lost == 0 && self.out_of_order == 0 && self.unknown == 0 && self.poison_delivered == 0
    }
}

/// Compares deliveries (event ids in arrival order, duplicates included) with the ledger.
pub fn check(ledger: &[LedgerRow], deliveries: &[Uuid]) -> Tally {
    let by_id: HashMap<Uuid, &LedgerRow> = ledger.iter().map(|r| (r.id, r)).collect();
    let mut tally = Tally {
        committed: ledger.len(),
        poison: ledger.iter().filter(|r| r.poison).count(),
        deliveries: deliveries.len(),
        ..Tally::default()
    };
    let mut seen: HashSet<Uuid> = HashSet::new();
    let mut last_seq: HashMap<&str, i64> = HashMap::new();
    for id in deliveries {
        let Some(row) = by_id.get(id) else {
            tally.unknown += 1;
            push_example(&mut tally.examples, format!("unknown id {id}"));
            continue;
        };
        if !seen.insert(*id) {
            tally.duplicated += 1;
            continue;
        }
        if row.poison {
            tally.poison_delivered += 1;
            push_example(&mut tally.examples, format!("poison {id} delivered"));
        }
        let last = last_seq.entry(row.key.as_str()).or_insert(i64::MIN);
        if row.seq < *last {
            tally.out_of_order += 1;
            push_example(
                &mut tally.examples,
                format!("key {}: seq {} after seq {}", row.key, row.seq, last),
            );
        } else {
            *last = row.seq;
        }
    }
    for row in ledger {
        if !row.poison && !seen.contains(&row.id) {
            tally.lost += 1;
            push_example(
                &mut tally.examples,
                format!("lost {} (key {}, seq {})", row.id, row.key, row.seq),
            );
        }
    }
    tally
}

fn push_example(examples: &mut Vec<String>, e: String) {
    if examples.len() < 10 {
        examples.push(e);
    }
}

/// Reads the event ids of a `file:PATH` publisher's JSON Lines, in file order. Returns the ids and
/// the number of lines that did not parse (a write torn by a kill would show here).
pub fn read_jsonl(path: &std::path::Path) -> anyhow::Result<(Vec<Uuid>, usize)> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e.into()),
    };
    let mut ids = Vec::new();
    let mut torn = 0;
    for line in text.lines() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .and_then(|v| v.get("id")?.as_str()?.parse::<Uuid>().ok())
        {
            Some(id) => ids.push(id),
            None => torn += 1,
        }
    }
    Ok((ids, torn))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(key: &str, seq: i64) -> LedgerRow {
        LedgerRow {
            id: Uuid::new_v4(),
            key: key.into(),
            n: seq,
            seq,
            poison: false,
        }
    }

    #[test]
    fn the_checker_finds_each_kind_of_problem() {
        let a1 = row("a", 1);
        let a2 = row("a", 2);
        let b3 = row("b", 3);
        let mut poison = row("b", 4);
        poison.poison = true;
        let lost = row("c", 5);
        let ledger = vec![a1.clone(), a2.clone(), b3.clone(), poison.clone(), lost];
        let stranger = Uuid::new_v4();
        let deliveries = vec![a2.id, a1.id, a2.id, b3.id, poison.id, stranger];
        let t = check(&ledger, &deliveries);
        assert_eq!(t.out_of_order, 1, "{t:?}");
        assert_eq!(t.duplicated, 1);
        assert_eq!(t.lost, 1);
        assert_eq!(t.unknown, 1);
        assert_eq!(t.poison_delivered, 1);
        assert!(!t.is_clean());

        let clean = check(&ledger[..3], &[a1.id, b3.id, a2.id, a1.id]);
        assert!(clean.is_clean(), "{clean:?}");
        assert_eq!(clean.duplicated, 1);
    }
}
