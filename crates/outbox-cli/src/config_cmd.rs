//! `outbox config`: validates the whole configuration as the relay would (with the `aws` feature,
//! the `[aws]`, `[destinations]` and `[[routes]]` sections too), reports every problem at once
//! (exit 2), and prints the resolved configuration: secrets redacted, AWS defaults filled in.

use std::io::Write;

use anyhow::{Context, Result};
use outbox::config::{Config, ConfigSource};

use crate::UsageError;

pub fn run(source: &ConfigSource, database_url: Option<&str>) -> Result<()> {
    let (config, problems) =
        crate::load_with_problems(source, database_url).map_err(|e| UsageError(e.into()))?;
    let mut problems: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
    let resolved = aws::resolve(&config, &mut problems);
    if !problems.is_empty() {
        let count = match problems.len() {
            1 => "1 configuration problem".to_owned(),
            n => format!("{n} configuration problems"),
        };
        return Err(
            UsageError(anyhow::anyhow!("{count}:\n  - {}", problems.join("\n  - "))).into(),
        );
    }
    // The resolved AWS sections replace the raw ones; the rest keeps the order of the file.
    let mut shown = config.clone();
    if resolved.is_some() {
        (shown.aws, shown.destinations, shown.routes) = (None, None, None);
    }
    let text = serde_json::to_string_pretty(&Rendered {
        config: &shown,
        aws: resolved,
    })
    .context("rendering the configuration")?;
    write_stdout(&format!("{text}\n"))?;
    eprintln!("configuration is valid (profile {})", config.profile);
    Ok(())
}

#[derive(serde::Serialize)]
struct Rendered<'a> {
    #[serde(flatten)]
    config: &'a Config,
    #[serde(flatten)]
    aws: Option<aws::Resolved>,
}

/// Writes to standard output; a reader that went away (`outbox config | head`) is not an error.
pub fn write_stdout(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("writing to standard output"),
    }
}

#[cfg(feature = "aws")]
mod aws {
    use std::collections::BTreeMap;

    use outbox::config::{Config, PublisherSpec};
    use outbox_aws::config::{
        AwsSection, BootstrapSection, DestinationConfig, LargePayloads, Profile, RouteConfig,
        LOCAL_DEFAULT_REGION,
    };
    use outbox_aws::sdk::{endpoint_override, Service};
    use outbox_aws::{AwsConfig, AwsConfigError, AwsSettings};
    use serde::Serialize;

    /// The AWS sections as the relay will use them, defaults filled in.
    #[derive(Serialize)]
    pub struct Resolved {
        aws: SettingsView,
        #[serde(skip_serializing_if = "Option::is_none")]
        destinations: Option<BTreeMap<String, DestinationConfig>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        routes: Option<Vec<RouteConfig>>,
        /// The largest payload a destination takes; null with an S3 claim check (any size).
        #[serde(skip_serializing_if = "Option::is_none")]
        max_event_bytes: Option<Option<usize>>,
    }

    #[derive(Serialize)]
    struct SettingsView {
        profile: Profile,
        region: String,
        endpoints: BTreeMap<&'static str, String>,
        default_destination: Option<String>,
        large_payloads: Option<LargePayloads>,
        bootstrap: BootstrapSection,
    }

    /// Validates the AWS sections the relay would read, adding their problems to `problems`;
    /// their resolved form when they are valid.
    pub fn resolve(config: &Config, problems: &mut Vec<String>) -> Option<Resolved> {
        let mut add = |e: AwsConfigError| {
            problems.extend(e.problems().iter().map(|p| p.to_string()));
            None
        };
        // The relay reads destinations and routes for `publisher = "aws"`; sections that are
        // present are checked too, so a mistake surfaces before someone switches to them.
        if config.publisher == PublisherSpec::Aws
            || config.destinations.is_some()
            || config.routes.is_some()
        {
            match AwsConfig::from_config(config) {
                Ok(aws) => Some(Resolved {
                    aws: settings_view(&aws.settings()),
                    max_event_bytes: Some(aws.max_event_bytes()),
                    destinations: Some(aws.destinations),
                    routes: Some(aws.routes),
                }),
                Err(e) => add(e),
            }
        } else if config.aws.is_some() {
            match AwsSettings::from_config(config) {
                Ok(settings) => Some(Resolved {
                    aws: settings_view(&settings),
                    destinations: None,
                    routes: None,
                    max_event_bytes: None,
                }),
                Err(e) => add(e),
            }
        } else {
            None
        }
    }

    fn settings_view(settings: &AwsSettings) -> SettingsView {
        let AwsSection {
            region,
            default_destination,
            large_payloads,
            bootstrap,
            ..
        } = settings.aws.clone();
        let from_env = std::env::var("AWS_REGION").ok().filter(|r| !r.is_empty());
        let region = match (region, from_env) {
            (Some(region), _) => region,
            (None, Some(region)) => format!("{region} (AWS_REGION)"),
            (None, None) if settings.profile.is_local() => LOCAL_DEFAULT_REGION.to_owned(),
            (None, None) => "from the AWS profile (AWS_PROFILE, ~/.aws/config)".to_owned(),
        };
        let endpoints = [
            ("sqs", Service::Sqs),
            ("eventbridge", Service::EventBridge),
            ("s3", Service::S3),
            ("dynamodb", Service::DynamoDb),
        ]
        .into_iter()
        .map(|(name, service)| {
            let endpoint = endpoint_override(settings, service).unwrap_or_else(|| {
                "AWS (the regional endpoint, or AWS_ENDPOINT_URL[_<SERVICE>])".to_owned()
            });
            (name, endpoint)
        })
        .collect();
        SettingsView {
            profile: settings.profile,
            region,
            endpoints,
            default_destination,
            large_payloads,
            bootstrap,
        }
    }
}

#[cfg(not(feature = "aws"))]
mod aws {
    use outbox::config::{Config, PublisherSpec};

    /// Without the `aws` feature there is nothing to resolve.
    #[derive(serde::Serialize)]
    pub struct Resolved {}

    pub fn resolve(config: &Config, problems: &mut Vec<String>) -> Option<Resolved> {
        if config.publisher == PublisherSpec::Aws {
            problems.push(
                "publisher `aws` needs the `aws` feature: rebuild with `cargo build -p outbox-cli --features aws`"
                    .to_owned(),
            );
        }
        None
    }
}
