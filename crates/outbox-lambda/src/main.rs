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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn")),
        )
        .with_ansi(false)
        .without_time() // CloudWatch stamps every line
        .init();
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
    tracing::info!(?report, "drained");
    Ok(report)
}
