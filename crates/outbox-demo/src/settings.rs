//! The demo's configuration: the same `outbox.toml` profiles the relay uses, plus where the
//! shipping consumer reads from.

use std::path::PathBuf;

use outbox::{Config, ConfigSource};
use outbox_aws::config::DestinationConfig;
use outbox_aws::AwsConfig;

/// The destination (in `[destinations]`) whose queue shipping consumes.
pub const ORDERS_DESTINATION: &str = "orders";

/// Loads the configuration like the `outbox` CLI does: `--config` / `OUTBOX_CONFIG`, else the
/// demo's own `outbox.toml`; profile from `OUTBOX_PROFILE`; `OUTBOX_*` / `DATABASE_URL` overrides.
pub fn load(file: Option<PathBuf>) -> anyhow::Result<Config> {
    let mut source = ConfigSource::from_env();
    if file.is_some() {
        source.file = file;
    }
    if source.file.is_none() && !PathBuf::from(outbox::config::DEFAULT_FILE).exists() {
        source.file = Some(PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/outbox.toml"
        )));
    }
    Ok(Config::load(&source)?)
}

/// The queue (name or URL) of the `orders` destination: what the relay publishes to is what
/// shipping reads, in every profile.
pub fn orders_queue(config: &Config) -> anyhow::Result<String> {
    let aws = AwsConfig::from_config(config)?;
    match aws.destinations.get(ORDERS_DESTINATION) {
        Some(DestinationConfig::Sqs(sqs)) => Ok(sqs.queue.clone()),
        Some(other) => anyhow::bail!(
            "destinations.{ORDERS_DESTINATION} is of kind {}, but shipping consumes an SQS queue",
            other.kind()
        ),
        None => anyhow::bail!(
            "no [destinations.{ORDERS_DESTINATION}] in the configuration: shipping consumes its queue"
        ),
    }
}
