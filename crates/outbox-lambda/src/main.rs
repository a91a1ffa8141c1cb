//! The Lambda binary: set up the relay once per execution environment, drain once per invocation.
//! The invocation's payload is ignored (an EventBridge scheduled event, or `{}` from a manual
//! invoke); the response is the [`outbox_lambda::DrainReport`].

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lambda_runtime::{service_fn, Error, LambdaEvent};
use outbox_lambda::{DrainReport, LambdaRelay};

/// Time kept free before the Lambda timeout: one batch may still be publishing at the deadline.
const SAFETY_MARGIN: Duration = Duration::from_secs(3);

#[tokio::main]
async fn main() -> Result<(), Error> {
    // The CLI's variables (OUTBOX_LOG, OUTBOX_LOG_FORMAT=json for CloudWatch Logs Insights,
    // NO_COLOR); a bad value fails the cold start with a message naming it.
    outbox::logging::init(outbox::logging::LogOptions {
        default_filter: "info,sqlx=warn",
        timestamps: false, // CloudWatch stamps every line
    })?;
    let config = outbox_lambda::load_config()?;
    let relay = Arc::new(LambdaRelay::from_config(&config).await?);
    lambda_runtime::run(service_fn(move |event: LambdaEvent<serde_json::Value>| {
        let relay = relay.clone();
        async move { invoke(&relay, event.context.deadline).await }
    }))
    .await
}

async fn invoke(relay: &LambdaRelay, deadline_ms: u64) -> Result<DrainReport, Error> {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let remaining = Duration::from_millis(deadline_ms.saturating_sub(now_ms));
    let deadline = Instant::now() + remaining.saturating_sub(SAFETY_MARGIN);
    let report = relay.drain_until(Some(deadline)).await?;
    tracing::info!(
        published = report.published,
        retried = report.retried,
        dead = report.dead,
        batches = report.batches,
        backlog = report.backlog,
        budget_exhausted = report.budget_exhausted,
        elapsed_ms = report.elapsed_ms,
        "drained"
    );
    Ok(report)
}
