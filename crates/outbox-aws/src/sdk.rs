//! SDK clients with the profile logic: `local` talks to an emulator with dummy credentials,
//! `dev`/`prod` use the default credential chain and region. Reused by consumers (same profiles).
//!
//! Endpoint precedence for `local`, per service: `aws.endpoints.<service>`, then `aws.endpoint`,
//! then `AWS_ENDPOINT_URL_<SERVICE>`, then `AWS_ENDPOINT_URL`, then `http://localhost:4566`.
//! In `dev`/`prod` only the SDK's own sources apply (environment, `~/.aws/config`).

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_sqs::config::Credentials;
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};

use crate::config::{AwsConfigError, AwsSettings, LOCAL_DEFAULT_ENDPOINT, LOCAL_DEFAULT_REGION};

/// The services this crate builds clients for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Sqs,
    Sns,
    EventBridge,
    S3,
    DynamoDb,
}

impl Service {
    /// The `AWS_ENDPOINT_URL_<SERVICE>` suffix the SDKs use (the service id, upper snake case).
    fn env_suffix(self) -> &'static str {
        match self {
            Self::Sqs => "SQS",
            Self::Sns => "SNS",
            Self::EventBridge => "EVENTBRIDGE",
            Self::S3 => "S3",
            Self::DynamoDb => "DYNAMODB",
        }
    }
}

/// The shared SDK configuration for the settings' profile.
pub async fn sdk_config(settings: &AwsSettings) -> Result<SdkConfig, AwsConfigError> {
    // One HTTPS client for all services: hyper 1 + rustls on `ring` (see Cargo.toml for why).
    let http_client = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
        .build_https();
    let mut loader = aws_config::defaults(BehaviorVersion::latest()).http_client(http_client);
    if let Some(region) = &settings.aws.region {
        loader = loader.region(Region::new(region.clone()));
    }
    if settings.profile.is_local() {
        // Emulators accept any credentials; fixed dummy ones keep a developer's real AWS
        // credentials (env or ~/.aws) from ever being used, or sent, locally.
        loader = loader.credentials_provider(Credentials::new(
            "test",
            "test",
            None,
            None,
            "outbox-local-profile",
        ));
        if settings.aws.region.is_none() && env_nonempty("AWS_REGION").is_none() {
            loader = loader.region(Region::new(LOCAL_DEFAULT_REGION));
        }
    }
    let config = loader.load().await;
    if config.region().is_none() {
        return Err(AwsConfigError::NoRegion {
            profile: settings.profile.to_string(),
        });
    }
    Ok(config)
}

/// The endpoint to set in code for `service`, or `None` to leave it to the SDK (env, profile
/// file, or the real AWS endpoint).
pub fn endpoint_override(settings: &AwsSettings, service: Service) -> Option<String> {
    if !settings.profile.is_local() {
        return None;
    }
    let configured = match service {
        Service::Sqs => &settings.aws.endpoints.sqs,
        Service::Sns => &settings.aws.endpoints.sns,
        Service::EventBridge => &settings.aws.endpoints.eventbridge,
        Service::S3 => &settings.aws.endpoints.s3,
        Service::DynamoDb => &settings.aws.endpoints.dynamodb,
    };
    if let Some(url) = configured.as_ref().or(settings.aws.endpoint.as_ref()) {
        return Some(url.clone());
    }
    let from_env = env_nonempty(&format!("AWS_ENDPOINT_URL_{}", service.env_suffix()))
        .or_else(|| env_nonempty("AWS_ENDPOINT_URL"));
    match from_env {
        Some(_) => None, // the SDK reads it itself
        None => Some(LOCAL_DEFAULT_ENDPOINT.to_owned()),
    }
}

/// The endpoint a service's requests go to, for messages (`None`: the SDK's default for AWS).
pub fn effective_endpoint(settings: &AwsSettings, service: Service) -> Option<String> {
    endpoint_override(settings, service).or_else(|| {
        env_nonempty(&format!("AWS_ENDPOINT_URL_{}", service.env_suffix()))
            .or_else(|| env_nonempty("AWS_ENDPOINT_URL"))
    })
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// The four clients, built from one [`SdkConfig`].
#[derive(Debug, Clone)]
pub struct AwsClients {
    pub sqs: aws_sdk_sqs::Client,
    /// SNS topics (`kind = "sns"`).
    pub sns: aws_sdk_sns::Client,
    pub eventbridge: aws_sdk_eventbridge::Client,
    pub s3: aws_sdk_s3::Client,
    pub dynamodb: aws_sdk_dynamodb::Client,
    pub settings: AwsSettings,
}

impl AwsClients {
    pub async fn new(settings: &AwsSettings) -> Result<Self, AwsConfigError> {
        let shared = sdk_config(settings).await?;
        Ok(Self::from_sdk_config(&shared, settings))
    }

    pub fn from_sdk_config(shared: &SdkConfig, settings: &AwsSettings) -> Self {
        Self {
            sqs: sqs_client(shared, settings),
            sns: sns_client(shared, settings),
            eventbridge: eventbridge_client(shared, settings),
            s3: s3_client(shared, settings),
            dynamodb: dynamodb_client(shared, settings),
            settings: settings.clone(),
        }
    }
}

pub fn sqs_client(shared: &SdkConfig, settings: &AwsSettings) -> aws_sdk_sqs::Client {
    let mut builder = aws_sdk_sqs::config::Builder::from(shared);
    if let Some(url) = endpoint_override(settings, Service::Sqs) {
        builder = builder.endpoint_url(url);
    }
    aws_sdk_sqs::Client::from_conf(builder.build())
}

/// An SNS client for the settings' profile.
pub fn sns_client(shared: &SdkConfig, settings: &AwsSettings) -> aws_sdk_sns::Client {
    let mut builder = aws_sdk_sns::config::Builder::from(shared);
    if let Some(url) = endpoint_override(settings, Service::Sns) {
        builder = builder.endpoint_url(url);
    }
    aws_sdk_sns::Client::from_conf(builder.build())
}

pub fn eventbridge_client(
    shared: &SdkConfig,
    settings: &AwsSettings,
) -> aws_sdk_eventbridge::Client {
    let mut builder = aws_sdk_eventbridge::config::Builder::from(shared);
    if let Some(url) = endpoint_override(settings, Service::EventBridge) {
        builder = builder.endpoint_url(url);
    }
    aws_sdk_eventbridge::Client::from_conf(builder.build())
}

pub fn s3_client(shared: &SdkConfig, settings: &AwsSettings) -> aws_sdk_s3::Client {
    let mut builder = aws_sdk_s3::config::Builder::from(shared);
    let custom_endpoint = effective_endpoint(settings, Service::S3).is_some();
    if let Some(url) = endpoint_override(settings, Service::S3) {
        builder = builder.endpoint_url(url);
    }
    // Emulators serve buckets by path (no wildcard DNS for bucket.localhost); real AWS prefers
    // virtual-hosted style, so path style is only for custom endpoints.
    if custom_endpoint {
        builder = builder.force_path_style(true);
    }
    aws_sdk_s3::Client::from_conf(builder.build())
}

pub fn dynamodb_client(shared: &SdkConfig, settings: &AwsSettings) -> aws_sdk_dynamodb::Client {
    let mut builder = aws_sdk_dynamodb::config::Builder::from(shared);
    if let Some(url) = endpoint_override(settings, Service::DynamoDb) {
        builder = builder.endpoint_url(url);
    }
    aws_sdk_dynamodb::Client::from_conf(builder.build())
}
