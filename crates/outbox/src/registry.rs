//! How a publisher kind plugs into the relay, and how a program builds the configured publisher.
//!
//! A crate that publishes to a broker implements [`PublisherFactory`] for its kinds (the values of
//! `kind = "..."` in `[destinations.NAME]`) and the top-level sections it owns (e.g. `[aws]`).
//! A program links the kinds it wants into a [`Registry`] and builds the publisher in one call:
//!
//! ```no_run
//! # async fn example(config: &outbox::Config) -> Result<(), outbox::registry::BuildError> {
//! let registry = outbox::Registry::new(); // + .with(outbox_aws::Aws), ...
//! let publisher = registry.build(config).await?;
//! # let _ = publisher; Ok(()) }
//! ```
//!
//! The core knows no broker: routing (`[[routes]]`, `default_destination`), the per-key batching
//! engine and the validation of unknown kinds and sections are here, once, for every kind.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use figment::value::Value;
use serde::de::DeserializeOwned;
use serde::Deserialize;

pub use crate::config::DestinationSpec;
use crate::config::{Config, ConfigError, Problems, PublisherSpec};
use crate::publisher::routing::{Router, Routes};
use crate::publisher::{FilePublisher, MemoryPublisher, Publisher, StdoutPublisher};

/// One configured destination, as its kind's factory reads it.
#[derive(Debug, Clone, Copy)]
pub struct DestinationRef<'a> {
    /// The key of `[destinations.NAME]`: the name routes use, and the `destination` label.
    pub name: &'a str,
    /// `kind = "..."`.
    pub kind: &'a str,
    spec: &'a DestinationSpec,
}

impl DestinationRef<'_> {
    /// The full key of a field of this destination, for problems: `destinations.NAME.FIELD`.
    pub fn key(&self, field: &str) -> String {
        format!("destinations.{}.{field}", self.name)
    }

    /// The destination's settings (the table without `kind`) as the kind's type; the error names
    /// the destination and the offending field.
    pub fn settings<T: DeserializeOwned>(&self) -> Result<T, ConfigError> {
        Value::from(self.spec.settings.clone())
            .deserialize::<T>()
            .map_err(|e| {
                ConfigError::Invalid(format!(
                    "[destinations.{}] (kind = \"{}\"): {}",
                    self.name,
                    self.kind,
                    crate::config::figment_message(e)
                ))
            })
    }
}

impl Config {
    /// Every configured destination, in name order, as its kind's factory reads it.
    pub fn destination_refs(&self) -> impl Iterator<Item = DestinationRef<'_>> {
        self.destinations.iter().map(|(name, spec)| DestinationRef {
            name,
            kind: &spec.kind,
            spec,
        })
    }
}

/// Why the configured publisher could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The configuration is wrong (every problem is listed).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A destination could not be set up (e.g. a file that cannot be opened, no AWS region).
    #[error("destination `{name}` (kind = \"{kind}\"): {reason}")]
    Destination {
        /// The destination's name.
        name: String,
        /// Its kind.
        kind: String,
        /// What failed, with the fix.
        reason: String,
    },
}

impl BuildError {
    /// A destination that could not be set up.
    pub fn destination(d: &DestinationRef<'_>, reason: impl Into<String>) -> Self {
        Self::Destination {
            name: d.name.to_owned(),
            kind: d.kind.to_owned(),
            reason: reason.into(),
        }
    }
}

/// Builds the destinations of some kinds: what a broker crate implements to plug in.
///
/// The contract: [`problems`](Self::problems) validates without connecting and reports every
/// problem at once, naming the key (`destinations.NAME.FIELD`, `aws.region`) and the fix;
/// [`build`](Self::build) is called only when there were none, and does not contact the broker
/// either (the relay calls each destination's [`Publisher::check`] at start-up for that). Each
/// destination built must honour the [`Publisher`] contract; [`crate::publisher::batch`] does the per-key
/// batching for brokers with a batch call.
#[async_trait]
pub trait PublisherFactory: Send + Sync + 'static {
    /// The `kind = "..."` values this factory builds.
    fn kinds(&self) -> &'static [&'static str];

    /// The top-level configuration sections this factory reads (e.g. `["aws"]`), so that they are
    /// not reported as unknown.
    fn sections(&self) -> &'static [&'static str] {
        &[]
    }

    /// Every problem of this factory's sections and of `destinations` (all of its kinds).
    fn problems(&self, config: &Config, destinations: &[DestinationRef<'_>]) -> Problems;

    /// Builds `destinations` (all of this factory's kinds at once, so they may share a client).
    async fn build(
        &self,
        config: &Config,
        destinations: &[DestinationRef<'_>],
    ) -> Result<Vec<(String, Box<dyn Publisher>)>, BuildError>;

    /// `destination`'s settings with every default filled in, for `outbox config`; `None` shows
    /// them as written.
    fn describe(
        &self,
        config: &Config,
        destination: &DestinationRef<'_>,
    ) -> Option<serde_json::Value> {
        let _ = (config, destination);
        None
    }

    /// The largest payload `destination` can carry, in bytes, when it has a limit (the relay warns
    /// when `events.max_payload_bytes` lets producers enqueue more than any destination takes).
    fn max_payload_bytes(
        &self,
        config: &Config,
        destination: &DestinationRef<'_>,
    ) -> Option<usize> {
        let _ = (config, destination);
        None
    }
}

/// The publisher kinds a program links, and the one call that builds the configured publisher.
#[derive(Clone)]
pub struct Registry {
    factories: Vec<Arc<dyn PublisherFactory>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("kinds", &self.kinds())
            .finish()
    }
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl Registry {
    /// The built-in kinds: `stdout`, `file`, `null`.
    pub fn new() -> Self {
        Self {
            factories: vec![Arc::new(Builtin)],
        }
    }

    /// Adds a factory; a kind it shares with an earlier one is built by this one.
    pub fn with(mut self, factory: impl PublisherFactory) -> Self {
        self.factories.insert(0, Arc::new(factory));
        self
    }

    /// Every kind that can be configured, sorted.
    pub fn kinds(&self) -> Vec<&'static str> {
        let mut kinds: Vec<&'static str> = self
            .factories
            .iter()
            .flat_map(|f| f.kinds().iter().copied())
            .collect();
        kinds.sort_unstable();
        kinds.dedup();
        kinds
    }

    /// Every top-level section the linked kinds read, sorted.
    pub fn sections(&self) -> Vec<&'static str> {
        let mut sections: Vec<&'static str> = self
            .factories
            .iter()
            .flat_map(|f| f.sections().iter().copied())
            .collect();
        sections.sort_unstable();
        sections.dedup();
        sections
    }

    fn factory_index(&self, kind: &str) -> Option<usize> {
        self.factories
            .iter()
            .position(|f| f.kinds().contains(&kind))
    }

    /// The configured destinations grouped by the factory that builds them (in factory order),
    /// and those of unknown kinds.
    fn grouped<'c>(
        &self,
        config: &'c Config,
    ) -> (Vec<Vec<DestinationRef<'c>>>, Vec<DestinationRef<'c>>) {
        let mut groups: Vec<Vec<DestinationRef<'c>>> = vec![Vec::new(); self.factories.len()];
        let mut unknown = Vec::new();
        for d in config.destination_refs() {
            match self.factory_index(d.kind) {
                Some(i) => groups[i].push(d),
                None => unknown.push(d),
            }
        }
        (groups, unknown)
    }

    /// Every problem of the publisher configuration: unknown sections and kinds, the routes, and
    /// each kind's own settings; all at once. Destinations are checked only when
    /// `publisher = "destinations"`.
    pub fn problems(&self, config: &Config) -> Problems {
        let mut p = Problems::default();
        let sections = self.sections();
        for name in config.sections.keys() {
            if !sections.contains(&name.as_str()) {
                p.add(
                    name.clone(),
                    "unknown key or section",
                    if sections.is_empty() {
                        "remove it: no publisher kind in this program reads it (was it built without a broker feature?)".to_owned()
                    } else {
                        format!(
                            "remove it or fix its name: the sections publisher kinds read here are {} (a broker this program was built without reads none)",
                            sections.join(", ")
                        )
                    },
                );
            }
        }
        if config.publisher != PublisherSpec::Destinations {
            return p;
        }
        let routes = self.routes(config);
        for problem in route_problems(&routes).into_vec() {
            p.push(problem);
        }
        let (groups, unknown) = self.grouped(config);
        for d in unknown {
            p.add(
                d.key("kind"),
                format!("unknown kind {:?}", d.kind),
                format!(
                    "use one of: {} (a broker crate adds its kinds when the program is built with it)",
                    self.kinds().join(", ")
                ),
            );
        }
        for (factory, destinations) in self.factories.iter().zip(&groups) {
            if destinations.is_empty()
                && factory
                    .sections()
                    .iter()
                    .all(|s| !config.sections.contains_key(*s))
            {
                continue;
            }
            for problem in factory.problems(config, destinations).into_vec() {
                p.push(problem);
            }
        }
        p
    }

    /// Every destination's settings as its kind resolves them (defaults filled in, secrets
    /// redacted by the kind), for display; a destination of an unknown kind is left out.
    pub fn describe(&self, config: &Config) -> BTreeMap<String, serde_json::Value> {
        let (groups, _) = self.grouped(config);
        let mut described = BTreeMap::new();
        for (factory, destinations) in self.factories.iter().zip(&groups) {
            for d in destinations {
                let value = factory.describe(config, d).unwrap_or_else(|| {
                    serde_json::to_value(d.spec).unwrap_or(serde_json::Value::Null)
                });
                described.insert(d.name.to_owned(), value);
            }
        }
        described
    }

    fn routes(&self, config: &Config) -> Routes {
        Routes::new(
            config.destinations.keys().cloned(),
            config.routes.clone(),
            config.default_destination.clone(),
        )
    }

    /// The largest payload any configured destination can carry, when every destination has a
    /// limit (`None`: some destination takes any size, or the publisher is built in).
    pub fn max_payload_bytes(&self, config: &Config) -> Option<usize> {
        if config.publisher != PublisherSpec::Destinations {
            return None;
        }
        let (groups, _) = self.grouped(config);
        let mut max = None;
        for (factory, destinations) in self.factories.iter().zip(&groups) {
            for d in destinations {
                let limit = factory.max_payload_bytes(config, d)?;
                max = Some(max.map_or(limit, |m: usize| m.max(limit)));
            }
        }
        max
    }

    /// Why `events.max_payload_bytes` lets producers enqueue events no destination can take, if
    /// it does: such an event would be dead-lettered as too large.
    pub fn payload_limit_warning(&self, config: &Config) -> Option<String> {
        let max = self.max_payload_bytes(config)?;
        (config.events.max_payload_bytes > max).then(|| {
            format!(
                "events.max_payload_bytes ({}) is above the largest message any configured destination accepts \
                 ({max} bytes): producers can enqueue events that will be dead-lettered as too large; lower \
                 events.max_payload_bytes to at most {max} (less the envelope and headers), or give the \
                 destination a way to carry large payloads (e.g. [aws.large_payloads], an S3 claim check)",
                config.events.max_payload_bytes
            )
        })
    }

    /// Validates the configuration and builds its publisher: a built-in one for
    /// `publisher = "stdout" | "file:PATH" | "null"`, else a [`Router`] over every configured
    /// destination. Contacts no broker; the relay runs [`Publisher::check`] at start-up.
    pub async fn build(&self, config: &Config) -> Result<Box<dyn Publisher>, BuildError> {
        self.problems(config).into_result()?;
        match &config.publisher {
            PublisherSpec::Stdout => Ok(Box::new(StdoutPublisher::new())),
            PublisherSpec::Null => Ok(Box::new(MemoryPublisher::counting())),
            PublisherSpec::File(path) => FilePublisher::open(path)
                .await
                .map(|p| Box::new(p) as Box<dyn Publisher>)
                .map_err(|e| BuildError::Destination {
                    name: "default".into(),
                    kind: "file".into(),
                    reason: e.reason().to_owned(),
                }),
            PublisherSpec::Destinations => {
                if let Some(warning) = self.payload_limit_warning(config) {
                    tracing::warn!("{warning}");
                }
                let (groups, _) = self.grouped(config);
                let mut destinations: BTreeMap<String, Box<dyn Publisher>> = BTreeMap::new();
                for (factory, group) in self.factories.iter().zip(&groups) {
                    if group.is_empty() {
                        continue;
                    }
                    for (name, publisher) in factory.build(config, group).await? {
                        destinations.insert(name, publisher);
                    }
                }
                Ok(Box::new(Router::new(self.routes(config), destinations)))
            }
        }
    }
}

/// The factory of the built-in kinds: `stdout`, `file` (`path = "..."`) and `null`.
#[derive(Debug, Default, Clone, Copy)]
pub struct Builtin;

/// `[destinations.NAME] kind = "file"`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSettings {
    path: PathBuf,
}

#[async_trait]
impl PublisherFactory for Builtin {
    fn kinds(&self) -> &'static [&'static str] {
        &["stdout", "file", "null"]
    }

    fn problems(&self, _config: &Config, destinations: &[DestinationRef<'_>]) -> Problems {
        let mut p = Problems::default();
        for d in destinations {
            match d.kind {
                "file" => match d.settings::<FileSettings>() {
                    Ok(s) if s.path.as_os_str().is_empty() => p.add(
                        d.key("path"),
                        "the path is empty",
                        "name the JSON Lines file to append to",
                    ),
                    Ok(_) => {}
                    Err(e) => p.push(e),
                },
                _ => {
                    if let Err(e) = d.settings::<NoSettings>() {
                        p.push(e);
                    }
                }
            }
        }
        p
    }

    async fn build(
        &self,
        _config: &Config,
        destinations: &[DestinationRef<'_>],
    ) -> Result<Vec<(String, Box<dyn Publisher>)>, BuildError> {
        let mut built: Vec<(String, Box<dyn Publisher>)> = Vec::new();
        for d in destinations {
            let publisher: Box<dyn Publisher> = match d.kind {
                "file" => {
                    let settings = d.settings::<FileSettings>()?;
                    Box::new(
                        FilePublisher::open(settings.path)
                            .await
                            .map_err(|e| BuildError::destination(d, e.reason()))?,
                    )
                }
                "stdout" => Box::new(StdoutPublisher::new()),
                _ => Box::new(MemoryPublisher::counting()),
            };
            built.push((d.name.to_owned(), publisher));
        }
        Ok(built)
    }
}

/// The settings of a kind that takes none: only `kind` itself.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NoSettings {}

/// Every rule that names no destination, or has no condition; all at once.
fn route_problems(routes: &Routes) -> Problems {
    let mut p = Problems::default();
    if routes.destinations().is_empty() {
        p.add(
            "destinations",
            "no destination is configured",
            "add one, e.g. [default.destinations.orders] kind = \"sqs\" queue = \"orders\" \
             (or kind = \"file\" path = \"events.jsonl\"), or set publisher = \"stdout\"",
        );
        // Every route would name an unknown destination: that is this one problem.
        return p;
    }
    let known = routes.destinations().join(", ");
    if let Some(default) = routes.default_destination() {
        if !routes.is_known(default) {
            p.add(
                "default_destination",
                format!("`{default}` is not a configured destination"),
                format!("use one of: {known}"),
            );
        }
    }
    for (i, route) in routes.rules().iter().enumerate() {
        if route.event_type.is_none() && route.aggregate_type.is_none() {
            p.add(
                format!("routes[{i}]"),
                format!("route to `{}` has no condition", route.destination),
                "give it event_type and/or aggregate_type, or use default_destination for a catch-all",
            );
        }
        if !routes.is_known(&route.destination) {
            p.add(
                format!("routes[{i}].destination"),
                format!("`{}` is not a configured destination", route.destination),
                format!("use one of: {known}"),
            );
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publisher::RouteConfig;

    fn config(text: &str) -> Config {
        Config::from_toml_str(text, "local").unwrap()
    }

    #[tokio::test]
    async fn unknown_kinds_sections_and_routes_are_reported_together() {
        let c = config(
            r#"
            [default]
            publisher = "destinations"
            default_destination = "nowhere"
            [default.kafak]
            brokers = "x"
            [default.destinations.orders]
            kind = "carrier-pigeon"
            [default.destinations.audit]
            kind = "file"
            "#,
        );
        let text = Registry::new()
            .problems(&c)
            .into_result()
            .unwrap_err()
            .to_string();
        assert!(text.contains("`kafak`"), "{text}");
        assert!(text.contains("destinations.orders.kind"), "{text}");
        assert!(
            text.contains("carrier-pigeon") && text.contains("file, null, stdout"),
            "{text}"
        );
        assert!(text.contains("default_destination"), "{text}");
        assert!(
            text.contains("[destinations.audit]") && text.contains("path"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn built_in_kinds_are_destinations_too() {
        let dir = std::env::temp_dir().join(format!("outbox-reg-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("audit.jsonl");
        let c = config(&format!(
            r#"
            [default]
            default_destination = "audit"
            [default.destinations.audit]
            kind = "file"
            path = "{}"
            [default.destinations.nothing]
            kind = "null"
            [[default.routes]]
            event_type = "Dropped"
            destination = "nothing"
            "#,
            path.display()
        ));
        // `publisher` defaults to the destinations when there are some.
        assert_eq!(c.publisher, PublisherSpec::Destinations);
        let publisher = Registry::new().build(&c).await.unwrap();
        publisher.check().await.unwrap();
        let event = |t: &str| -> crate::OutboxEvent {
            serde_json::from_value(serde_json::json!({
                "id": uuid::Uuid::now_v7(), "seq": 1, "aggregate_type": "a",
                "aggregate_id": "1", "event_type": t, "payload": {},
                "created_at": "2026-01-01T00:00:00Z"
            }))
            .unwrap()
        };
        let results = publisher.publish(&[event("Kept"), event("Dropped")]).await;
        assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
        assert_eq!(publisher.destination_of(&event("Dropped")), "nothing");
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn rules_naming_unknown_destinations_are_all_reported() {
        let routes = Routes::new(
            ["a".to_owned()],
            vec![
                RouteConfig {
                    event_type: None,
                    aggregate_type: None,
                    destination: "zz".into(),
                },
                RouteConfig {
                    event_type: Some("E".into()),
                    aggregate_type: None,
                    destination: "a".into(),
                },
            ],
            Some("nope".into()),
        );
        let text = route_problems(&routes)
            .into_result()
            .unwrap_err()
            .to_string();
        assert!(text.contains("3 configuration problems"), "{text}");
        assert!(text.contains("default_destination") && text.contains("routes[0].destination"));
    }
}
