//! `[telemetry]`: `outbox relay` exports its spans (`claim`, `publish`, `settle`, and the
//! publishers' own) to an OpenTelemetry collector over OTLP/HTTP (protobuf), behind the `otlp`
//! feature. The `publish` span links to the trace of each event it publishes (`outbox::trace`).
//!
//! The exporter is a layer of the process's subscriber, installed with the log lines once the
//! configuration is read (see `main`); its own filter records the outbox crates' spans at debug
//! level and above, whatever `OUTBOX_LOG` says. Spans are exported in batches from a thread of
//! their own; a collector that is down costs the spans, never the relay (one warning a minute at
//! most). On a graceful stop the spans still buffered are exported before the process exits.

use outbox::config::{Config, ConfigError};

/// The problems of `[telemetry]` that depend on how this binary was built.
pub(crate) fn problems(config: &Config) -> Vec<ConfigError> {
    let mut problems = Vec::new();
    if cfg!(not(feature = "otlp")) && config.telemetry.otlp_endpoint.is_some() {
        problems.push(ConfigError::Value {
            key: "telemetry.otlp_endpoint".into(),
            problem:
                "this outbox binary was built without the `otlp` feature: it cannot export traces"
                    .into(),
            fix:
                "use a build with the `otlp` feature (a default feature of outbox-cli), or unset it"
                    .into(),
            origin: None,
        });
    }
    problems
}

#[cfg(feature = "otlp")]
pub(crate) use otlp::Telemetry;

/// Without the `otlp` feature there is never an exporter ([`problems`] refuses an endpoint).
#[cfg(not(feature = "otlp"))]
pub(crate) enum Telemetry {}

#[cfg(not(feature = "otlp"))]
impl Telemetry {
    pub(crate) fn from_config(_: &Config) -> anyhow::Result<Option<Self>> {
        Ok(None)
    }
    pub(crate) fn layer(&self) -> outbox::logging::ExtraLayer {
        match *self {}
    }
    pub(crate) fn shutdown(self) {
        match self {}
    }
}

#[cfg(feature = "otlp")]
mod otlp {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    use anyhow::{Context, Result};
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry::KeyValue;
    use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
    use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
    use opentelemetry_sdk::error::OTelSdkResult;
    use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider, SpanData, SpanExporter};
    use opentelemetry_sdk::Resource;
    use outbox::config::{redact_url, Config};
    use outbox::logging::ExtraLayer;
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::Layer;

    use crate::UsageError;

    /// The bound of one export request (connecting included).
    const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
    /// How long a graceful stop waits for the buffered spans to be exported.
    const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);
    /// At most one warning about failed exports this often.
    const WARN_EVERY: Duration = Duration::from_secs(60);

    /// The trace exporter of `outbox relay`: a tracer provider with a batch span processor.
    pub(crate) struct Telemetry {
        provider: SdkTracerProvider,
    }

    impl Telemetry {
        /// The exporter `[telemetry]` configures; `None` without `otlp_endpoint`. Builds an
        /// HTTP client with its own runtime thread: call it outside the async runtime.
        pub(crate) fn from_config(config: &Config) -> Result<Option<Self>> {
            let telemetry = &config.telemetry;
            let Some(url) = telemetry.traces_url() else {
                return Ok(None);
            };
            let client = reqwest::blocking::Client::builder()
                .user_agent(concat!("outbox-relay/", env!("CARGO_PKG_VERSION")))
                .timeout(EXPORT_TIMEOUT)
                .connect_timeout(EXPORT_TIMEOUT)
                .redirect(reqwest::redirect::Policy::none())
                .use_preconfigured_tls(tls_config()?)
                .build()
                .context("building the OTLP exporter's HTTP client")?;
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(Protocol::HttpBinary)
                .with_endpoint(url.clone())
                .with_timeout(EXPORT_TIMEOUT)
                .with_http_client(BlockingClient(client))
                .build()
                .map_err(|e| {
                    UsageError(anyhow::anyhow!(
                        "invalid value for `telemetry.otlp_endpoint`: {e}; use the collector's OTLP/HTTP base URL, e.g. \"http://127.0.0.1:4318\""
                    ))
                })?;
            let resource = Resource::builder()
                .with_service_name(telemetry.service_name.clone())
                .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
                .build();
            let provider = SdkTracerProvider::builder()
                .with_batch_exporter(WarnOnFailure::new(exporter, redact_url(&url)))
                .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                    telemetry.sample_ratio,
                ))))
                .with_resource(resource)
                .build();
            Ok(Some(Self { provider }))
        }

        /// The layer that records the outbox crates' spans (debug level and above) for export.
        pub(crate) fn layer(&self) -> ExtraLayer {
            tracing_opentelemetry::layer()
                .with_tracer(self.provider.tracer("outbox"))
                .with_filter(Targets::new().with_target("outbox", tracing::Level::DEBUG))
                .boxed()
        }

        /// Exports the spans still buffered and stops the exporter; waits at most
        /// [`SHUTDOWN_TIMEOUT`]. Blocks: call it once the async runtime is gone.
        pub(crate) fn shutdown(self) {
            if let Err(e) = self.provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT) {
                tracing::warn!(error = %e, "traces: the last spans may not have been exported");
            }
        }
    }

    /// The exporter, logging its failures: at most one warning per [`WARN_EVERY`], with how many
    /// spans were lost since the last one.
    #[derive(Debug)]
    struct WarnOnFailure<E> {
        inner: E,
        url: String,
        lost: AtomicU64,
        last_warning: Mutex<Option<Instant>>,
    }

    impl<E> WarnOnFailure<E> {
        fn new(inner: E, url: String) -> Self {
            Self {
                inner,
                url,
                lost: AtomicU64::new(0),
                last_warning: Mutex::new(None),
            }
        }

        fn failed(&self, spans: usize, error: &dyn std::fmt::Display) {
            self.lost.fetch_add(spans as u64, Ordering::Relaxed);
            let mut last = self.last_warning.lock().unwrap_or_else(|e| e.into_inner());
            if last.is_some_and(|at| at.elapsed() < WARN_EVERY) {
                return;
            }
            *last = Some(Instant::now());
            tracing::warn!(
                error = %error,
                endpoint = %self.url,
                spans_lost = self.lost.swap(0, Ordering::Relaxed),
                "traces: the OTLP export failed; the relay goes on (at most one such warning a minute)"
            );
        }
    }

    impl<E: SpanExporter> SpanExporter for WarnOnFailure<E> {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            let spans = batch.len();
            let result = self.inner.export(batch).await;
            if let Err(e) = &result {
                self.failed(spans, e);
            }
            result
        }

        fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
            self.inner.shutdown_with_timeout(timeout)
        }

        fn force_flush(&self) -> OTelSdkResult {
            self.inner.force_flush()
        }

        fn set_resource(&mut self, resource: &Resource) {
            self.inner.set_resource(resource);
        }
    }

    /// reqwest's blocking client as the exporter's: the batch processor exports from a thread of
    /// its own, outside the async runtime.
    #[derive(Debug)]
    struct BlockingClient(reqwest::blocking::Client);

    /// The most of a collector's answer that is read (it is a small protobuf message).
    const MAX_RESPONSE_BYTES: u64 = 1024 * 1024;

    #[async_trait::async_trait]
    impl HttpClient for BlockingClient {
        async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
            use std::io::Read;
            let mut answer = self.0.execute(request.try_into()?)?;
            let mut body = Vec::new();
            let status = answer.status();
            let headers = std::mem::take(answer.headers_mut());
            answer.take(MAX_RESPONSE_BYTES).read_to_end(&mut body)?;
            let mut response = Response::new(Bytes::from(body));
            *response.status_mut() = status;
            *response.headers_mut() = headers;
            Ok(response)
        }
    }

    /// TLS for `https://` collectors: certificates verified against Mozilla's roots
    /// (webpki-roots), on the `ring` provider the rest of the tree uses.
    fn tls_config() -> Result<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        Ok(rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("setting up TLS for the OTLP exporter")?
            .with_root_certificates(roots)
            .with_no_client_auth())
    }
}
