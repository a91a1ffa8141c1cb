//! [`PgStore`]: the [`Store`] contract on PostgreSQL.
//!
//! A claim is a short transaction that holds row locks (`FOR UPDATE SKIP LOCKED`) on the claimed
//! events while they are published, then deletes or marks them and commits: one write per event.
//! The transaction is bounded by `idle_in_transaction_session_timeout` and `statement_timeout`,
//! so a relay that hangs or dies loses its locks after at most the configured bound and another
//! relay takes the events; the lost relay's settle then fails (its session is gone), which is the
//! fencing. See `docs/ARCHITECTURE.md` for why this beats a lease here.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::postgres::{PgListener, PgPool, PgRow};
use sqlx::types::Json;
use sqlx::{Postgres, Row, Transaction};
use tokio::sync::watch;

use super::schema::Schema;
use crate::event::{Headers, OrderingKey, OutboxEvent};
use crate::store::{Claim, Maintenance, Outcome, SettleReport, Store, StoreError, WakeMark};

/// What a dead-lettered event does to the later events of its key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeadLetterPolicy {
    /// Later events of the key keep flowing: the key's order is broken (the dead event arrives
    /// after them if it is replayed). An explicit choice for keys where order does not matter.
    Continue,
    /// Later events of the key wait until an operator replays or removes the dead one, so per-key
    /// order holds whatever happens (the default).
    #[default]
    BlockKey,
}

/// How [`PgStore`] claims and keeps events.
#[derive(Debug, Clone)]
pub struct PgStoreOptions {
    pub schema: Schema,
    /// Upper bound of a claim's transaction; the server ends a session idle in a transaction longer.
    pub transaction_timeout: Duration,
    /// Upper bound of one claim or settle statement.
    pub statement_timeout: Duration,
    /// Keep published events this long; zero deletes them on publish.
    pub retention: Duration,
    /// Rows removed per retention statement: small, so producers are never blocked for long.
    pub purge_batch: i64,
    pub dead_letter: DeadLetterPolicy,
    /// Ask producers to NOTIFY while a relay waits (see the wake-up trigger).
    pub notify: bool,
    /// How long a relay's request for notifications lasts; refreshed at half of it.
    pub notify_window: Duration,
    /// A claim stops adding events once their payloads reach this many bytes (it always takes at
    /// least one): the bound of the relay's memory per batch.
    pub max_batch_bytes: u64,
    /// Events whose payload is larger are never loaded: the claim dead-letters them with the reason.
    pub max_event_bytes: u64,
}

impl Default for PgStoreOptions {
    fn default() -> Self {
        Self {
            schema: Schema::default(),
            transaction_timeout: Duration::from_secs(30),
            statement_timeout: Duration::from_secs(10),
            retention: Duration::ZERO,
            purge_batch: 1000,
            dead_letter: DeadLetterPolicy::BlockKey,
            notify: true,
            notify_window: Duration::from_secs(2),
            max_batch_bytes: 16 * 1024 * 1024,
            max_event_bytes: crate::event::EventLimits::default().max_payload_bytes as u64,
        }
    }
}

/// How many rows one maintenance statement moves at most, so that it never holds many locks long.
const MAINTENANCE_BATCH: i64 = 5_000;

struct Statements {
    begin: String,
    claim: String,
    refuse: String,
    settle: String,
    want_notify: String,
    purge: String,
    due: String,
    park: String,
    unblock: String,
    release_held: String,
    held_destinations: String,
}

impl Statements {
    fn new(o: &PgStoreOptions) -> Self {
        let t = o.schema.qualify("outbox_event");
        // Which earlier rows hold a key back. Parked rows are undelivered like pending ones; a
        // dead row holds its key only under block_key; a scheduled row (a delayed event that
        // lets its key pass, migration 5) holds it back only once it is due and pending.
        let undelivered = |alias: &str| match o.dead_letter {
            DeadLetterPolicy::Continue => format!("{alias}.status IN ('pending', 'parked')"),
            DeadLetterPolicy::BlockKey => {
                format!("{alias}.status NOT IN ('published', 'scheduled')")
            }
        };
        // A key's head that cannot move now: waiting out a backoff or a destination, or dead
        // under block_key.
        let blocking = |alias: &str| {
            match o.dead_letter {
            DeadLetterPolicy::Continue => {
                format!("({alias}.status = 'parked' AND {alias}.available_at < 'infinity')")
            }
            DeadLetterPolicy::BlockKey => format!(
                "(({alias}.status = 'parked' AND {alias}.available_at < 'infinity') OR {alias}.status = 'dead')"
            ),
        }
        };
        let (undelivered_p, undelivered_f, undelivered_h) =
            (undelivered("p"), undelivered("f"), undelivered("h"));
        let (blocking_h, blocking_b) = (blocking("h"), blocking("b"));

        // The claim, in one statement (READ COMMITTED):
        // 1. heads: the oldest due events that are the first undelivered event of their key,
        //    locked with SKIP LOCKED. A row whose key's head another claim holds is not a head,
        //    so it never takes a place in the batch (the head-of-line flaw of a claim that locks
        //    a prefix of all rows and filters afterwards).
        // 2. followers: the next undelivered events of those keys, oldest first, up to the rest
        //    of the batch; locked, and kept only while each key's chain is unbroken (a row that
        //    is not due, dead under block_key, or locked elsewhere ends its key's share).
        // 3. the byte budget: payload sizes are summed in seq order and the batch ends with the
        //    event that reaches max_batch_bytes (so at least one event); an event over
        //    max_event_bytes is returned without its payload and dead-lettered by the store,
        //    and the rest of its key waits for the next claim. The locks on events past the
        //    budget are held until the claim ends: those keys are only delayed by one batch.
        let claim = format!(
            "WITH heads AS MATERIALIZED (
                 SELECT e.seq, e.aggregate_type, e.aggregate_id
                 FROM {t} e
                 WHERE e.status = 'pending' AND e.available_at <= now()
                   AND NOT EXISTS (
                       SELECT 1 FROM {t} p
                       WHERE p.aggregate_type = e.aggregate_type AND p.aggregate_id = e.aggregate_id
                         AND p.seq < e.seq AND {undelivered_p})
                 ORDER BY e.seq
                 LIMIT $1
                 FOR UPDATE OF e SKIP LOCKED
             ), followers AS MATERIALIZED (
                 SELECT f.seq, f.aggregate_type, f.aggregate_id, f.eligible
                 FROM heads h
                 CROSS JOIN LATERAL (
                     SELECT f.seq, f.aggregate_type, f.aggregate_id,
                            (f.status IN ('pending', 'parked')
                             AND (f.available_at <= now() OR f.available_at = 'infinity')) AS eligible
                     FROM {t} f
                     WHERE f.aggregate_type = h.aggregate_type AND f.aggregate_id = h.aggregate_id
                       AND f.seq > h.seq AND {undelivered_f}
                     ORDER BY f.seq
                     LIMIT $1
                 ) f
                 ORDER BY f.seq
                 LIMIT GREATEST($1 - (SELECT count(*) FROM heads), 0)
             ), locked AS MATERIALIZED (
                 SELECT e.seq FROM {t} e
                 WHERE e.seq IN (SELECT seq FROM followers WHERE eligible)
                   AND e.status IN ('pending', 'parked')
                 FOR UPDATE OF e SKIP LOCKED
             ), chain AS (
                 SELECT c.seq FROM (
                     SELECT f.seq, bool_and(l.seq IS NOT NULL) OVER (
                                PARTITION BY f.aggregate_type, f.aggregate_id ORDER BY f.seq) AS unbroken
                     FROM followers f LEFT JOIN locked l ON l.seq = f.seq
                 ) c
                 WHERE c.unbroken
             ), sized AS MATERIALIZED (
                 -- Small values stored inline and uncompressed count their stored size (close to
                 -- their text size); larger ones are measured exactly, but only while the batch
                 -- is under its budget (see `walk`), so a backlog of huge events is not
                 -- converted to text whole on every claim.
                 SELECT e.seq, e.aggregate_type, e.aggregate_id,
                        pg_column_size(e.payload)::bigint AS stored,
                        (pg_column_size(e.payload) > 2000
                         OR pg_column_compression(e.payload) IS NOT NULL) AS large,
                        row_number() OVER (ORDER BY e.seq) AS n
                 FROM {t} e
                 WHERE e.seq IN (SELECT seq FROM heads UNION ALL SELECT seq FROM chain)
             ), walk AS (
                 WITH RECURSIVE w(n, seq, aggregate_type, aggregate_id, bytes, running) AS (
                     SELECT s.n, s.seq, s.aggregate_type, s.aggregate_id, m.bytes,
                            CASE WHEN m.bytes > $3 THEN 0 ELSE m.bytes END
                     FROM sized s
                     CROSS JOIN LATERAL (
                         SELECT CASE WHEN s.large
                                     THEN (SELECT octet_length(x.payload::text)::bigint FROM {t} x WHERE x.seq = s.seq)
                                     ELSE s.stored END AS bytes) m
                     WHERE s.n = 1
                     UNION ALL
                     SELECT s.n, s.seq, s.aggregate_type, s.aggregate_id, m.bytes,
                            w.running + CASE WHEN m.bytes > $3 THEN 0 ELSE m.bytes END
                     FROM w
                     JOIN sized s ON s.n = w.n + 1
                     CROSS JOIN LATERAL (
                         SELECT CASE WHEN s.large
                                     THEN (SELECT octet_length(x.payload::text)::bigint FROM {t} x WHERE x.seq = s.seq)
                                     ELSE s.stored END AS bytes) m
                     WHERE w.running < $2
                 )
                 SELECT w.seq, w.bytes, w.bytes > $3 AS oversized,
                        bool_or(w.bytes > $3) OVER (
                            PARTITION BY w.aggregate_type, w.aggregate_id ORDER BY w.seq) AS behind_oversized
                 FROM w
             )
             SELECT e.seq, e.id, e.aggregate_type, e.aggregate_id, e.event_type,
                    CASE WHEN b.oversized THEN NULL ELSE e.payload::text END AS payload,
                    e.headers, e.destination, e.created_at, e.attempts,
                    (e.last_error IS NOT NULL OR e.available_at > e.created_at) AS was_blocked,
                    b.bytes, b.oversized
             FROM walk b JOIN {t} e ON e.seq = b.seq
             WHERE b.oversized OR NOT b.behind_oversized
             ORDER BY e.seq"
        );
        let refuse = format!(
            "UPDATE {t} SET status = 'dead', attempts = attempts + 1, held_for = NULL,
                    last_error = 'payload of ' || s.bytes || ' bytes is over the relay''s limit of '
                                 || $3 || ' bytes (events.max_payload_bytes); it was not loaded'
             FROM unnest($1::bigint[], $2::bigint[]) AS s(seq, bytes)
             WHERE {t}.seq = s.seq"
        );
        let on_published = if o.retention.is_zero() {
            format!("DELETE FROM {t} t USING o WHERE t.seq = o.seq AND o.outcome = 'published' RETURNING 1")
        } else {
            format!(
                "UPDATE {t} t SET status = 'published', published_at = now(), last_error = NULL, held_for = NULL
                 FROM o WHERE t.seq = o.seq AND o.outcome = 'published' RETURNING 1"
            )
        };
        // Settle, one statement: published rows go, failed ones are counted (retry, dead) or
        // deferred for their destination without an attempt; a key whose head now waits (retry,
        // deferred, dead under block_key) has its later pending events parked, and a key that
        // moved again (its waiting head published, or dead under continue) has them unparked.
        // The claim holds every head this touches, so no other statement parks or unparks these
        // keys meanwhile (see `park`).
        let settle = format!(
            "WITH o AS (
                 SELECT * FROM unnest($1::bigint[], $2::text[], $3::timestamptz[], $4::text[], $5::text[])
                     AS o(seq, outcome, not_before, error, destination)
             ), done AS (
                 {on_published}
             ), failed AS (
                 UPDATE {t} t
                 SET attempts = t.attempts + CASE WHEN o.outcome = 'deferred' THEN 0 ELSE 1 END,
                     last_error = o.error,
                     status = CASE WHEN o.outcome = 'dead' THEN 'dead' ELSE 'parked' END,
                     available_at = COALESCE(o.not_before, t.available_at),
                     held_for = o.destination
                 FROM o WHERE t.seq = o.seq AND o.outcome <> 'published'
                 RETURNING o.outcome
             ), park AS (
                 UPDATE {t} f SET status = 'parked', available_at = 'infinity'
                 FROM unnest($6::text[], $7::text[], $8::bigint[]) AS k(aggregate_type, aggregate_id, seq)
                 WHERE f.aggregate_type = k.aggregate_type AND f.aggregate_id = k.aggregate_id
                   AND f.seq > k.seq AND f.status = 'pending' AND f.seq <> ALL($1)
                 RETURNING 1
             ), unpark AS (
                 UPDATE {t} f SET status = 'pending', available_at = now()
                 FROM unnest($9::text[], $10::text[]) AS k(aggregate_type, aggregate_id)
                 WHERE f.aggregate_type = k.aggregate_type AND f.aggregate_id = k.aggregate_id
                   AND f.status = 'parked' AND f.available_at = 'infinity' AND f.seq <> ALL($1)
                 RETURNING 1
             )
             SELECT (SELECT count(*) FROM done),
                    (SELECT count(*) FROM failed WHERE outcome = 'retry'),
                    (SELECT count(*) FROM failed WHERE outcome = 'deferred'),
                    (SELECT count(*) FROM failed WHERE outcome = 'dead'),
                    (SELECT count(*) FROM park) + (SELECT count(*) FROM unpark)"
        );
        let wanted = o.schema.qualify("outbox_wakeup_wanted_ms");
        // A sequence, so producers in any isolation level see it (see migration 2). Written only
        // when the current request runs out within half a window; returns whether it wrote.
        let want_notify = format!(
            "SELECT CASE WHEN last_value < (extract(epoch FROM clock_timestamp()) * 1000)::bigint + $1 / 2
                         THEN setval('{wanted}', (extract(epoch FROM clock_timestamp()) * 1000)::bigint + $1) IS NOT NULL
                         ELSE false END
             FROM {wanted}"
        );
        let purge = format!(
            "DELETE FROM {t} WHERE seq IN (
                 SELECT seq FROM {t}
                 WHERE status = 'published' AND published_at < now() - $1::interval
                 ORDER BY published_at LIMIT $2
                 FOR UPDATE SKIP LOCKED)"
        );
        // Heads whose backoff, destination hold or delay ran out take part in claims again; their
        // later events stay parked until the head is published (then settle unparks them).
        // Scheduled events (delayed, letting their key pass) that are due join their key's order.
        // One arm per partial index, so neither scans the table.
        let due = format!(
            "WITH parked AS (
                 SELECT seq FROM {t}
                 WHERE status = 'parked' AND available_at <= now()
                 ORDER BY available_at LIMIT {MAINTENANCE_BATCH}
                 FOR UPDATE SKIP LOCKED
             ), scheduled AS (
                 SELECT seq FROM {t}
                 WHERE status = 'scheduled' AND available_at <= now()
                 ORDER BY available_at LIMIT {MAINTENANCE_BATCH}
                 FOR UPDATE SKIP LOCKED
             )
             UPDATE {t} SET status = 'pending', held_for = NULL
             WHERE seq IN (SELECT seq FROM parked UNION ALL SELECT seq FROM scheduled)"
        );
        // Events committed since the last round ($1 = the highest seq looked at then) behind a
        // key whose head cannot move are parked. The head is locked FOR SHARE: whatever unblocks
        // a key (a claim that publishes its head, a replay, a delete) must lock the head first and
        // unparks in a later statement, so it sees what this parked.
        let any_blocking = match o.dead_letter {
            DeadLetterPolicy::Continue => format!(
                "EXISTS (SELECT 1 FROM {t} b WHERE b.status = 'parked' AND b.available_at < 'infinity')"
            ),
            DeadLetterPolicy::BlockKey => format!(
                "(EXISTS (SELECT 1 FROM {t} b WHERE b.status = 'parked' AND b.available_at < 'infinity')
                  OR EXISTS (SELECT 1 FROM {t} b WHERE b.status = 'dead'))"
            ),
        };
        // Events committed since the last round ($1 = the highest seq looked at then) behind a
        // key whose head cannot move are parked. The head is locked FOR SHARE: whatever unblocks
        // a key (a claim that publishes its head, a replay, a delete) must lock the head first and
        // unparks in a later statement, so it sees what this parked. When no key is blocked at
        // all, nothing is looked at and the mark moves to the newest event.
        let park = format!(
            "WITH blocked AS MATERIALIZED (
                 SELECT {any_blocking} AS found
             ), fresh AS MATERIALIZED (
                 SELECT f.seq, f.aggregate_type, f.aggregate_id FROM {t} f
                 WHERE f.status = 'pending' AND f.seq > $1 AND (SELECT found FROM blocked)
                 ORDER BY f.seq LIMIT {MAINTENANCE_BATCH}
             ), heads AS (
                 SELECT h.seq FROM (SELECT DISTINCT aggregate_type, aggregate_id FROM fresh) k
                 CROSS JOIN LATERAL (
                     SELECT h.seq, h.status, h.available_at FROM {t} h
                     WHERE h.aggregate_type = k.aggregate_type AND h.aggregate_id = k.aggregate_id
                       AND {undelivered_h}
                     ORDER BY h.seq LIMIT 1
                 ) h
                 WHERE {blocking_h}
             ), held AS (
                 SELECT h.seq, h.aggregate_type, h.aggregate_id FROM {t} h
                 WHERE h.seq IN (SELECT seq FROM heads) AND {blocking_h}
                 FOR SHARE OF h SKIP LOCKED
             ), targets AS (
                 SELECT f.seq FROM {t} f
                 WHERE f.seq IN (SELECT fr.seq FROM fresh fr JOIN held h
                                   ON h.aggregate_type = fr.aggregate_type
                                  AND h.aggregate_id = fr.aggregate_id AND fr.seq > h.seq)
                   AND f.status = 'pending'
                 FOR UPDATE OF f SKIP LOCKED
             ), parked AS (
                 UPDATE {t} SET status = 'parked', available_at = 'infinity'
                 WHERE seq IN (SELECT seq FROM targets)
                 RETURNING 1
             )
             SELECT (SELECT count(*) FROM parked),
                    CASE WHEN (SELECT found FROM blocked) THEN (SELECT max(seq) FROM fresh)
                         ELSE (SELECT max(seq) FROM {t}) END"
        );
        // The safety net: parked events whose key has no head that holds it back any more (its
        // dead event was deleted by hand, or a round of `park` raced with one that unblocked it)
        // take part in claims again. Unparking is always safe: claims check the order themselves.
        let unblock = format!(
            "UPDATE {t} SET status = 'pending', available_at = now()
             WHERE seq IN (
                 SELECT f.seq FROM {t} f
                 WHERE f.status = 'parked' AND f.available_at = 'infinity'
                   AND NOT EXISTS (
                       SELECT 1 FROM {t} b
                       WHERE b.aggregate_type = f.aggregate_type AND b.aggregate_id = f.aggregate_id
                         AND b.seq < f.seq AND {blocking_b})
                 ORDER BY f.seq LIMIT {MAINTENANCE_BATCH}
                 FOR UPDATE OF f SKIP LOCKED)"
        );
        let release_held = format!(
            "UPDATE {t} SET status = 'pending', available_at = now(), held_for = NULL
             WHERE seq IN (
                 SELECT seq FROM {t}
                 WHERE status = 'parked' AND held_for = $1
                 ORDER BY seq LIMIT $2
                 FOR UPDATE SKIP LOCKED)"
        );
        // Distinct destinations by skipping through the index, so the cost is one probe per
        // destination, not one per held event.
        let held_destinations = format!(
            "WITH RECURSIVE d(name) AS (
                 (SELECT held_for FROM {t} WHERE status = 'parked' AND held_for IS NOT NULL
                  ORDER BY held_for LIMIT 1)
                 UNION ALL
                 SELECT (SELECT held_for FROM {t} WHERE status = 'parked' AND held_for > d.name
                         ORDER BY held_for LIMIT 1)
                 FROM d WHERE d.name IS NOT NULL
             )
             SELECT name FROM d WHERE name IS NOT NULL"
        );
        let begin = format!(
            "BEGIN; SET LOCAL idle_in_transaction_session_timeout = {}; SET LOCAL statement_timeout = {};",
            o.transaction_timeout.as_millis().max(1),
            o.statement_timeout.as_millis().max(1),
        );
        Self {
            begin,
            claim,
            refuse,
            settle,
            want_notify,
            purge,
            due,
            park,
            unblock,
            release_held,
            held_destinations,
        }
    }
}

/// The PostgreSQL [`Store`]: claims with row locks in a bounded transaction, wakes on NOTIFY.
#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    options: Arc<PgStoreOptions>,
    sql: Arc<Statements>,
    wakeups: watch::Receiver<u64>,
    wake_sender: Arc<watch::Sender<u64>>,
    maintenance: Arc<MaintenanceState>,
}

/// Where `maintain` left off: the highest `seq` it looked at for parking, and its round count.
#[derive(Default)]
struct MaintenanceState {
    parked_through: AtomicI64,
    rounds: AtomicU64,
}

/// `maintain` runs the (larger) safety-net statement once per this many rounds.
const UNBLOCK_EVERY: u64 = 30;

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl PgStore {
    /// A store on `pool`. With `options.notify`, starts a background listener on its own
    /// connection; it reconnects by itself and wakes the relay after every reconnect.
    pub async fn new(pool: PgPool, options: PgStoreOptions) -> Result<Self, StoreError> {
        let (wake_sender, wakeups) = watch::channel(0u64);
        let wake_sender = Arc::new(wake_sender);
        if options.notify {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(&options.schema.channel()).await?;
            tokio::spawn(listen(listener, Arc::downgrade(&wake_sender)));
        }
        Ok(Self {
            sql: Arc::new(Statements::new(&options)),
            options: Arc::new(options),
            pool,
            wakeups,
            wake_sender,
            maintenance: Arc::default(),
        })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub fn options(&self) -> &PgStoreOptions {
        &self.options
    }

    /// Wakes waiting relay workers of this process now, e.g. right after the embedding
    /// application committed events: the in-process counterpart of NOTIFY.
    pub fn wake(&self) {
        self.wake_sender.send_modify(|g| *g = g.wrapping_add(1));
    }

    /// A waker that can be handed to producers without giving them the store.
    pub fn waker(&self) -> Waker {
        Waker(Arc::downgrade(&self.wake_sender))
    }

    /// Runs one claim under `EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON)` in a transaction that is
    /// rolled back (so it claims nothing): what a claim costs now — buffers, rows, time — for an
    /// operator who wonders why claims are slow, and for the tests that keep the cost bounded.
    pub async fn explain_claim(&self, limit: usize) -> Result<serde_json::Value, StoreError> {
        let mut tx = self.pool.begin_with(self.sql.begin.clone()).await?;
        let to_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let plan: Json<serde_json::Value> = sqlx::query_scalar(&format!(
            "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {}",
            self.sql.claim
        ))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .bind(to_i64(self.options.max_batch_bytes))
        .bind(to_i64(self.options.max_event_bytes))
        .fetch_one(&mut *tx)
        .await?;
        tx.rollback().await?;
        Ok(plan.0)
    }

    /// Tells the relays of other processes to look again (after maintenance released events).
    async fn notify_others(&self) {
        if !self.options.notify {
            return;
        }
        if let Err(e) = sqlx::query("SELECT pg_notify($1, '')")
            .bind(self.options.schema.channel())
            .execute(&self.pool)
            .await
        {
            tracing::debug!(error = %e, "could not notify other relays");
        }
    }

    fn is_fenced(e: &sqlx::Error) -> bool {
        match e {
            sqlx::Error::Io(_) | sqlx::Error::Protocol(_) => true,
            sqlx::Error::Database(db) => {
                // 25P03 idle_in_transaction_session_timeout, 57P01 admin shutdown / terminated,
                // 57014 statement timeout cancelled the settle, 25P02 transaction aborted.
                matches!(
                    db.code().as_deref(),
                    Some("25P03" | "57P01" | "57P02" | "57P03" | "57014" | "25P02")
                )
            }
            _ => false,
        }
    }
}

/// Wakes the relay workers of one [`PgStore`]; does nothing once the store is gone.
#[derive(Debug, Clone)]
pub struct Waker(std::sync::Weak<watch::Sender<u64>>);

impl Waker {
    pub fn wake(&self) {
        if let Some(sender) = self.0.upgrade() {
            sender.send_modify(|g| *g = g.wrapping_add(1));
        }
    }
}

async fn listen(mut listener: PgListener, wake: std::sync::Weak<watch::Sender<u64>>) {
    let bump = |wake: &std::sync::Weak<watch::Sender<u64>>| match wake.upgrade() {
        Some(s) => {
            s.send_modify(|g| *g = g.wrapping_add(1));
            true
        }
        None => false,
    };
    loop {
        match listener.try_recv().await {
            Ok(Some(_)) => {}
            // The connection was lost and will be re-established on the next call; notifications
            // sent meanwhile are gone, so wake the workers to look for themselves.
            Ok(None) => {}
            // The application closed the pool: stop listening and give the connection back.
            Err(sqlx::Error::PoolClosed) => return,
            Err(e) => {
                tracing::warn!(error = %e, "wake-up listener failed; retrying in 1s (polling continues)");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        if !bump(&wake) {
            return;
        }
    }
}

/// Events held by a [`PgStore`] claim: the open transaction that locks them.
pub struct PgClaim {
    tx: Option<Transaction<'static, Postgres>>,
    events: Vec<OutboxEvent>,
    /// Per event: it had waited before (backoff, destination, replay, a delay), so its key's later
    /// events may be parked and must be unparked once it is published.
    was_blocked: Vec<bool>,
    /// The claim dead-lettered oversized events in its transaction: giving the claim back must
    /// keep that (commit, changing nothing else) rather than roll it back.
    refused: bool,
    sql: Arc<Statements>,
    dead_letter: DeadLetterPolicy,
}

#[async_trait]
impl Store for PgStore {
    type Claim = PgClaim;

    async fn claim(&self, limit: usize) -> Result<PgClaim, StoreError> {
        let mut tx = self.pool.begin_with(self.sql.begin.clone()).await?;
        let to_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let rows = sqlx::query(&self.sql.claim)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .bind(to_i64(self.options.max_batch_bytes))
            .bind(to_i64(self.options.max_event_bytes))
            .fetch_all(&mut *tx)
            .await?;
        let mut events = Vec::with_capacity(rows.len());
        let mut was_blocked = Vec::with_capacity(rows.len());
        let mut refused: Vec<(i64, i64)> = Vec::new();
        for row in &rows {
            if row.try_get::<bool, _>("oversized")? {
                let seq: i64 = row.try_get("seq")?;
                let bytes: i64 = row.try_get("bytes")?;
                let id: uuid::Uuid = row.try_get("id")?;
                tracing::warn!(
                    %id, seq, bytes, limit = self.options.max_event_bytes,
                    "event is larger than events.max_payload_bytes: dead-lettered without loading it"
                );
                refused.push((seq, bytes));
                continue;
            }
            events.push(decode_event(row)?);
            was_blocked.push(row.try_get("was_blocked")?);
        }
        drop(rows);
        if !refused.is_empty() {
            let (seqs, sizes): (Vec<i64>, Vec<i64>) = refused.into_iter().unzip();
            sqlx::query(&self.sql.refuse)
                .bind(&seqs)
                .bind(&sizes)
                .bind(to_i64(self.options.max_event_bytes))
                .execute(&mut *tx)
                .await?;
            if events.is_empty() {
                // Nothing else held: record the refusals now.
                tx.commit().await?;
                return Ok(self.claim_of(None, events, was_blocked, false));
            }
            return Ok(self.claim_of(Some(tx), events, was_blocked, true));
        }
        if events.is_empty() {
            // Nothing held: end the transaction now rather than at drop.
            tx.commit().await?;
            return Ok(self.claim_of(None, events, was_blocked, false));
        }
        Ok(self.claim_of(Some(tx), events, was_blocked, false))
    }

    fn wake_mark(&self) -> WakeMark {
        WakeMark(*self.wakeups.borrow())
    }

    fn wake(&self) {
        PgStore::wake(self);
    }

    fn dead_letter_holds_key(&self) -> bool {
        self.options.dead_letter == DeadLetterPolicy::BlockKey
    }

    async fn wait_for_events(&self, since: WakeMark, timeout: Duration) {
        let mut wakeups = self.wakeups.clone();
        if self.options.notify {
            match sqlx::query_scalar::<_, bool>(&self.sql.want_notify)
                .bind(i64::try_from(self.options.notify_window.as_millis()).unwrap_or(i64::MAX))
                .fetch_one(&self.pool)
                .await
            {
                // The request had lapsed (the relay was busy): producers that committed since the
                // last claim did not notify, so return and let the relay look once more before
                // it really waits.
                Ok(true) => return,
                Ok(false) => {}
                Err(e) => tracing::debug!(error = %e, "could not request wake-up notifications"),
            }
        }
        // Any wake-up since the mark (taken before the claim that came back empty) ends the wait
        // at once: one that arrived during that claim is not lost.
        let _ = tokio::time::timeout(timeout, wakeups.wait_for(|g| *g != since.0)).await;
    }

    async fn purge_published(&self) -> Result<u64, StoreError> {
        if self.options.retention.is_zero() {
            return Ok(0);
        }
        let mut removed = 0;
        loop {
            let n = sqlx::query(&self.sql.purge)
                .bind(self.options.retention)
                .bind(self.options.purge_batch)
                .execute(&self.pool)
                .await?
                .rows_affected();
            removed += n;
            if n < self.options.purge_batch as u64 {
                return Ok(removed);
            }
            // Let producers and claims in between batches.
            tokio::task::yield_now().await;
        }
    }

    async fn maintain(&self) -> Result<Maintenance, StoreError> {
        let state = &self.maintenance;
        let mut report = Maintenance {
            due: sqlx::query(&self.sql.due)
                .execute(&self.pool)
                .await?
                .rows_affected(),
            ..Maintenance::default()
        };
        if report.due > 0 {
            self.wake();
        }
        let from = state.parked_through.load(Ordering::Relaxed);
        let row = sqlx::query(&self.sql.park)
            .bind(from)
            .fetch_one(&self.pool)
            .await?;
        report.parked = u64::try_from(row.try_get::<i64, _>(0)?).unwrap_or(0);
        if let Some(last) = row.try_get::<Option<i64>, _>(1)? {
            state.parked_through.fetch_max(last, Ordering::Relaxed);
        }
        if state.rounds.fetch_add(1, Ordering::Relaxed) % UNBLOCK_EVERY == UNBLOCK_EVERY - 1 {
            report.unblocked = sqlx::query(&self.sql.unblock)
                .execute(&self.pool)
                .await?
                .rows_affected();
        }
        if report.unblocked > 0 {
            self.wake();
        }
        if report.due > 0 || report.unblocked > 0 {
            self.notify_others().await;
        }
        Ok(report)
    }

    async fn release_held(
        &self,
        destination: &str,
        limit: Option<usize>,
    ) -> Result<u64, StoreError> {
        let batch = limit.map_or(MAINTENANCE_BATCH, |l| {
            i64::try_from(l).unwrap_or(MAINTENANCE_BATCH)
        });
        let mut released = 0;
        loop {
            let n = sqlx::query(&self.sql.release_held)
                .bind(destination)
                .bind(batch)
                .execute(&self.pool)
                .await?
                .rows_affected();
            released += n;
            if limit.is_some() || n < batch as u64 {
                break;
            }
        }
        if released > 0 {
            self.wake();
            self.notify_others().await;
        }
        Ok(released)
    }

    async fn held_destinations(&self) -> Result<Vec<String>, StoreError> {
        Ok(sqlx::query_scalar(&self.sql.held_destinations)
            .fetch_all(&self.pool)
            .await?)
    }

    async fn backlog(&self) -> Result<Option<crate::store::Backlog>, StoreError> {
        Ok(Some(
            super::admin::backlog(&self.pool, &self.options.schema).await?,
        ))
    }
}

impl PgStore {
    fn claim_of(
        &self,
        tx: Option<Transaction<'static, Postgres>>,
        events: Vec<OutboxEvent>,
        was_blocked: Vec<bool>,
        refused: bool,
    ) -> PgClaim {
        PgClaim {
            tx,
            events,
            was_blocked,
            refused,
            sql: self.sql.clone(),
            dead_letter: self.options.dead_letter,
        }
    }
}

/// The settle statement's parameters, one entry per settled event or per key.
#[derive(Default)]
struct SettleParams<'a> {
    seqs: Vec<i64>,
    outcomes: Vec<&'static str>,
    not_before: Vec<Option<DateTime<Utc>>>,
    errors: Vec<Option<&'a str>>,
    destinations: Vec<Option<&'a str>>,
    park: (Vec<&'a str>, Vec<&'a str>, Vec<i64>),
    unpark: (Vec<&'a str>, Vec<&'a str>),
}

impl PgClaim {
    fn settle_params<'a>(&'a self, outcomes: &'a [Outcome]) -> SettleParams<'a> {
        // Per key, what its last attempted event says about the key: it waits (park the rest),
        // or it moved on after waiting (unpark the rest).
        enum KeyState {
            Waits(i64),
            Moved,
        }
        let mut keys: HashMap<OrderingKey<'a>, KeyState> = HashMap::new();
        let mut p = SettleParams::default();
        for ((event, outcome), was_blocked) in
            self.events.iter().zip(outcomes).zip(&self.was_blocked)
        {
            let key = event.ordering_key();
            let (kind, at, error, destination) = match outcome {
                Outcome::Untouched => continue,
                Outcome::Published => {
                    if *was_blocked {
                        keys.entry(key).or_insert(KeyState::Moved);
                    }
                    ("published", None, None, None)
                }
                Outcome::Retry { error, not_before } => {
                    keys.insert(key, KeyState::Waits(event.seq));
                    ("retry", Some(*not_before), Some(error.as_str()), None)
                }
                Outcome::Deferred {
                    error,
                    destination,
                    not_before,
                } => {
                    keys.insert(key, KeyState::Waits(event.seq));
                    (
                        "deferred",
                        Some(*not_before),
                        Some(error.as_str()),
                        Some(destination.as_str()),
                    )
                }
                Outcome::Dead { error } => {
                    match self.dead_letter {
                        DeadLetterPolicy::BlockKey => {
                            keys.insert(key, KeyState::Waits(event.seq));
                        }
                        DeadLetterPolicy::Continue => {
                            keys.entry(key).or_insert(KeyState::Moved);
                        }
                    }
                    ("dead", None, Some(error.as_str()), None)
                }
            };
            p.seqs.push(event.seq);
            p.outcomes.push(kind);
            p.not_before.push(at);
            p.errors.push(error);
            p.destinations.push(destination);
        }
        for (key, state) in keys {
            match state {
                KeyState::Waits(seq) => {
                    p.park.0.push(key.aggregate_type);
                    p.park.1.push(key.aggregate_id);
                    p.park.2.push(seq);
                }
                KeyState::Moved => {
                    p.unpark.0.push(key.aggregate_type);
                    p.unpark.1.push(key.aggregate_id);
                }
            }
        }
        p
    }
}

#[async_trait]
impl Claim for PgClaim {
    fn events(&self) -> &[OutboxEvent] {
        &self.events
    }

    async fn settle(mut self, outcomes: &[Outcome]) -> Result<SettleReport, StoreError> {
        let Some(mut tx) = self.tx.take() else {
            return Ok(SettleReport::default());
        };
        if outcomes.len() != self.events.len() {
            return Err(StoreError::Invalid(format!(
                "{} outcomes for {} claimed events",
                outcomes.len(),
                self.events.len()
            )));
        }
        let fenced = |e: sqlx::Error| {
            if PgStore::is_fenced(&e) {
                StoreError::ClaimLost
            } else {
                StoreError::Database(e)
            }
        };
        let row = {
            let p = self.settle_params(outcomes);
            sqlx::query(&self.sql.settle)
                .bind(&p.seqs)
                .bind(&p.outcomes)
                .bind(&p.not_before)
                .bind(&p.errors)
                .bind(&p.destinations)
                .bind(&p.park.0)
                .bind(&p.park.1)
                .bind(&p.park.2)
                .bind(&p.unpark.0)
                .bind(&p.unpark.1)
                .fetch_one(&mut *tx)
                .await
                .map_err(fenced)?
        };
        tx.commit().await.map_err(fenced)?;
        let count = |i: usize| row.try_get::<i64, _>(i).map(|v| v as u64);
        Ok(SettleReport {
            published: count(0)?,
            retried: count(1)?,
            deferred: count(2)?,
            dead: count(3)?,
        })
    }

    async fn release(mut self) -> Result<(), StoreError> {
        if let Some(tx) = self.tx.take() {
            if self.refused {
                tx.commit().await?;
            } else {
                tx.rollback().await?;
            }
        }
        Ok(())
    }
}

fn decode_event(row: &PgRow) -> Result<OutboxEvent, StoreError> {
    let payload: String = row.try_get("payload")?;
    let payload = serde_json::value::RawValue::from_string(payload)
        .map_err(|e| StoreError::Invalid(format!("stored payload is not JSON: {e}")))?;
    let headers: Json<Headers> = row.try_get("headers")?;
    Ok(OutboxEvent {
        id: row.try_get("id")?,
        seq: row.try_get("seq")?,
        aggregate_type: row.try_get("aggregate_type")?,
        aggregate_id: row.try_get("aggregate_id")?,
        event_type: row.try_get("event_type")?,
        payload,
        headers: headers.0,
        destination: row.try_get("destination")?,
        created_at: row.try_get("created_at")?,
        attempts: row.try_get("attempts")?,
    })
}
