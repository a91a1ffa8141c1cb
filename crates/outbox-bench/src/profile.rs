//! `--only profile`: where a relay cycle spends its time (claim vs settle round trips), for the
//! drain analysis in BENCHMARKS.md. Not part of the default scenarios.

use std::time::{Duration, Instant};

use outbox::{Claim, Outcome, Store};

use crate::db::BenchDb;
use crate::report::{Report, Table};

pub(crate) async fn run(db: &BenchDb, events: i64, report: &mut Report) -> anyhow::Result<()> {
    db.preload(events, 10_000).await?;
    let store = db.drain_store().await?;
    let (mut claim_t, mut settle_t, mut batches) = (Duration::ZERO, Duration::ZERO, 0u32);
    let start = Instant::now();
    loop {
        let t = Instant::now();
        let claim = store.claim(100).await?;
        claim_t += t.elapsed();
        let n = claim.events().len();
        if n == 0 {
            claim.release().await?;
            break;
        }
        let t = Instant::now();
        claim.settle(&vec![Outcome::Published; n]).await?;
        settle_t += t.elapsed();
        batches += 1;
    }
    let total = start.elapsed();
    let per = |d: Duration| {
        format!(
            "{:.3}",
            d.as_secs_f64() * 1000.0 / f64::from(batches.max(1))
        )
    };
    let mut t = Table::new(
        format!("profile: one worker, {events} events, batch 100, ms per batch"),
        &[
            "claim (begin + claim query)",
            "settle (settle + commit)",
            "total",
        ],
    );
    t.row(vec![per(claim_t), per(settle_t), per(total)]);
    report.table(&t);
    Ok(())
}
