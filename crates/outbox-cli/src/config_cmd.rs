//! `outbox config`: validates the whole configuration as the relay would (the sections and
//! destinations of every publisher kind this build links too), reports every problem at once
//! (exit 2), and prints the resolved configuration: secrets redacted, defaults filled in.

use std::io::Write;

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use outbox::config::{Config, ConfigSource, PublisherSpec};

use crate::UsageError;

pub(crate) fn run(source: &ConfigSource, database_url: Option<&str>) -> Result<()> {
    let (config, problems) =
        crate::load_with_problems(source, database_url).map_err(|e| UsageError(e.into()))?;
    let registry = crate::registry();
    let mut problems: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
    problems.extend(
        registry
            .problems(&config)
            .into_vec()
            .iter()
            .map(|p| p.to_string()),
    );
    problems.extend(
        crate::telemetry::problems(&config)
            .iter()
            .map(|p| p.to_string()),
    );
    let aws = aws::resolve(&config, &mut problems);
    if !problems.is_empty() {
        let count = match problems.len() {
            1 => "1 configuration problem".to_owned(),
            n => format!("{n} configuration problems"),
        };
        return Err(
            UsageError(anyhow::anyhow!("{count}:\n  - {}", problems.join("\n  - "))).into(),
        );
    }
    if let Some(warning) = registry.payload_limit_warning(&config) {
        tracing::warn!("{warning}");
    }
    // Destinations as their kinds resolve them (defaults filled in); the rest keeps the order of
    // the file. The `[aws]` section is shown resolved (region, endpoints) when it applies.
    let mut shown = config.clone();
    let destinations = registry.describe(&config);
    shown.destinations.clear();
    if aws.is_some() {
        shown.sections.remove("aws");
    }
    let text = serde_json::to_string_pretty(&Rendered {
        config: &shown,
        destinations: (!destinations.is_empty()).then_some(destinations),
        max_event_bytes: (config.publisher == PublisherSpec::Destinations)
            .then(|| registry.max_payload_bytes(&config)),
        aws,
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
    #[serde(skip_serializing_if = "Option::is_none")]
    destinations: Option<BTreeMap<String, serde_json::Value>>,
    /// The largest payload any destination takes; null when one takes any size (a claim check).
    #[serde(skip_serializing_if = "Option::is_none")]
    max_event_bytes: Option<Option<usize>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aws: Option<aws::Resolved>,
}

/// Writes to standard output; a reader that went away (`outbox config | head`) is not an error.
pub(crate) fn write_stdout(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("writing to standard output"),
    }
}

#[cfg(feature = "aws")]
mod aws {
    use std::collections::BTreeMap;

    use outbox::config::Config;
    use outbox_aws::config::{
        AwsSection, BootstrapSection, LargePayloads, Profile, KINDS, LOCAL_DEFAULT_REGION,
    };
    use outbox_aws::sdk::{endpoint_override, Service};
    use outbox_aws::AwsSettings;
    use serde::Serialize;

    /// `[aws]` as the clients will use it: region and endpoints resolved.
    #[derive(Serialize)]
    pub(super) struct Resolved {
        profile: Profile,
        region: String,
        endpoints: BTreeMap<&'static str, String>,
        large_payloads: Option<LargePayloads>,
        bootstrap: BootstrapSection,
    }

    /// `[aws]` resolved, when the configuration has it or an AWS destination; its problems are
    /// added to `problems`.
    pub(super) fn resolve(config: &Config, problems: &mut Vec<String>) -> Option<Resolved> {
        let uses_aws = config.sections.contains_key("aws")
            || config
                .destinations
                .values()
                .any(|d| KINDS.contains(&d.kind.as_str()));
        if !uses_aws {
            return None;
        }
        match AwsSettings::from_config(config) {
            Ok(settings) => Some(view(&settings)),
            Err(e) => {
                problems.extend(e.problems().iter().map(|p| p.to_string()));
                None
            }
        }
    }

    fn view(settings: &AwsSettings) -> Resolved {
        let AwsSection {
            region,
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
            ("sns", Service::Sns),
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
        Resolved {
            profile: settings.profile,
            region,
            endpoints,
            large_payloads,
            bootstrap,
        }
    }
}

#[cfg(not(feature = "aws"))]
mod aws {
    use outbox::config::Config;

    /// Without the `aws` feature there is nothing to resolve.
    #[derive(serde::Serialize)]
    pub(crate) struct Resolved {}

    pub(crate) fn resolve(_config: &Config, _problems: &mut [String]) -> Option<Resolved> {
        None
    }
}
