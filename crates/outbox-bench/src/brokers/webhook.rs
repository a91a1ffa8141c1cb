//! HTTP webhooks: `outbox_http` (`mode = "single"`, signed) against a plain reqwest loop posting
//! the same signed requests (Standard Webhooks headers, the identity headers) with the same
//! concurrency limit (32), to a receiver in this process on 127.0.0.1 that answers 204.

use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use futures_util::future::join_all;
use outbox::publisher::headers;
use outbox::OutboxEvent;
use tokio::sync::oneshot;

use super::{Plain, Target};

/// The publisher's default `max_concurrency`.
const CONCURRENCY: usize = 32;
/// `whsec_` + base64 of 32 bytes: the key both sides sign with.
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw3Nj0v4yRhK4=";

pub(crate) async fn target() -> anyhow::Result<Target> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(|_body: axum::body::Bytes| async {
            axum::http::StatusCode::NO_CONTENT
        }),
    );
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await;
    });
    let key = outbox_http::config::decode_secret(SECRET)
        .map_err(|e| anyhow::anyhow!("the benchmark's secret: {e}"))?;
    let toml = format!(
        "[local]\ndefault_destination = \"bench\"\n[local.destinations.bench]\nkind = \"webhook\"\nurl = \"{url}\"\nsecret = \"{SECRET}\"\n"
    );
    Ok(Target {
        name: "webhook",
        title: format!("POST to an axum receiver at {url} (204), one event per request, signed, {CONCURRENCY} in flight"),
        toml,
        plain: Box::new(PlainWebhook {
            // The publisher's default timeouts: a loop written for production would set them too.
            client: outbox_http::publisher::client_builder()?
                .timeout(std::time::Duration::from_secs(5))
                .connect_timeout(std::time::Duration::from_secs(5))
                .build()?,
            url,
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key),
            in_flight: tokio::sync::Semaphore::new(CONCURRENCY),
            stop: std::sync::Mutex::new(Some(stop)),
        }),
    })
}

struct PlainWebhook {
    client: reqwest::Client,
    url: String,
    key: ring::hmac::Key,
    in_flight: tokio::sync::Semaphore,
    stop: std::sync::Mutex<Option<oneshot::Sender<()>>>,
}

impl PlainWebhook {
    async fn post(&self, event: &OutboxEvent) -> anyhow::Result<()> {
        let id = event.id.to_string();
        let timestamp = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
        let body = event.payload.get();
        let signature = outbox_http::publisher::sign(&self.key, &id, timestamp, body.as_bytes());
        // The publisher's limit holds across batches in flight; so does this one.
        let _permit = self.in_flight.acquire().await?;
        let mut request = self
            .client
            .post(&self.url)
            .header("content-type", "application/json")
            .header("webhook-id", &id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature);
        for (name, value) in headers::identity(event) {
            request = request.header(name, value);
        }
        let status = request.body(body.to_owned()).send().await?.status();
        anyhow::ensure!(status.is_success(), "the receiver answered {status}");
        Ok(())
    }
}

#[async_trait]
impl Plain for PlainWebhook {
    async fn send(&self, batch: &[OutboxEvent]) -> anyhow::Result<()> {
        // All at once; `post` holds to the concurrency limit.
        join_all(batch.iter().map(|event| self.post(event)))
            .await
            .into_iter()
            .collect()
    }

    async fn teardown(&self) {
        if let Some(stop) = self.stop.lock().ok().and_then(|mut s| s.take()) {
            let _ = stop.send(());
        }
    }
}
