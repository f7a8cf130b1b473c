//! Configuration: serde structs with defaults, the figment sources, and `validate()`.
//!
//! Sources, each overriding the one before (the same order as the README):
//! 1. built-in defaults ([`Config::default`]);
//! 2. a YAML file, from `--config PATH` or `AMQP_SIDECAR_CONFIG`;
//! 3. environment variables `AMQP_SIDECAR_<SECTION>__<KEY>`, e.g. `AMQP_SIDECAR_AMQP__URL`;
//! 4. the shorthand `AMQP_SIDECAR_BACKENDS=http://a:8080/,http://b:8080/`, a comma-separated
//!    list of backend URLs that replaces `backends` (each backend gets the defaults).
//!
//! Every problem found while loading or validating is reported together, each one naming
//! the key and the source it came from, the way linkerd2-proxy's `env.rs` collects them.

use std::{collections::HashSet, fmt, net::SocketAddr, path::Path, time::Duration};

use figment::{
    Figment, Metadata, Profile, Provider,
    providers::{Env, Format, Serialized, Yaml},
    value::{Dict, Map, Value},
};
use serde::{Deserialize, Deserializer, Serialize};

/// Prefix of every environment variable the sidecar reads.
pub const ENV_PREFIX: &str = "AMQP_SIDECAR_";
/// Environment variable naming the YAML config file (same as `--config`).
pub const ENV_CONFIG_FILE: &str = "AMQP_SIDECAR_CONFIG";
/// Environment variable holding the comma-separated backend URL shorthand.
pub const ENV_BACKENDS: &str = "AMQP_SIDECAR_BACKENDS";

/// The whole configuration of one sidecar.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Broker connection, queue and consumer settings.
    pub amqp: AmqpConfig,
    /// The local worker backends deliveries are forwarded to. Required: at least one.
    pub backends: Vec<BackendConfig>,
    /// The strategy that picks a backend for each delivery. Default `least_in_flight`.
    pub balancer: BalancerKind,
    /// Limits that apply to every backend request.
    pub backend: BackendLimits,
    /// Passive ejection of backends that keep failing (outlier detection).
    pub ejection: EjectionConfig,
    /// Active health checks for every backend (each may override them).
    pub health: HealthConfig,
    /// Attempt limit and backoff between attempts.
    pub retry: RetryConfig,
    /// Where messages go once they cannot be processed.
    pub dead_letter: DeadLetterConfig,
    /// The admin HTTP server (/metrics, /healthz, /readyz).
    pub admin: AdminConfig,
    /// Log output.
    pub log: LogConfig,
    /// Graceful shutdown.
    pub shutdown: ShutdownConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            amqp: AmqpConfig::default(),
            backends: Vec::new(),
            balancer: BalancerKind::LeastInFlight,
            backend: BackendLimits::default(),
            ejection: EjectionConfig::default(),
            health: HealthConfig::default(),
            retry: RetryConfig::default(),
            dead_letter: DeadLetterConfig::default(),
            admin: AdminConfig::default(),
            log: LogConfig::default(),
            shutdown: ShutdownConfig::default(),
        }
    }
}

/// The queue type the sidecar declares, and how it counts attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// A replicated quorum queue. The broker counts deliveries in the `x-delivery-count`
    /// header, and the sidecar uses it as the attempt count.
    /// <https://www.rabbitmq.com/docs/quorum-queues#poison-message-handling>
    Quorum,
    /// A classic queue. The sidecar counts attempts itself (see `retry::AttemptCounter`).
    Classic,
}

/// Broker connection, queue and consumer settings (`amqp:`).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AmqpConfig {
    /// AMQP URI, `amqp://` or `amqps://`. Default `amqp://guest:guest@127.0.0.1:5672/%2f`.
    /// Heartbeat and connect timeout can be set in the query, e.g. `?heartbeat=30`.
    /// The password is never logged nor printed by `check-config`.
    #[serde(deserialize_with = "string_like")]
    pub url: String,
    /// The queue to consume from. Required.
    #[serde(deserialize_with = "string_like")]
    pub queue: String,
    /// `quorum` (default) or `classic`.
    pub queue_type: QueueType,
    /// basic.qos prefetch count per consumer channel. Default 1.
    pub prefetch: u16,
    /// Number of consumer channels. Default 0, meaning the sum of the backends' `max_in_flight`.
    pub consumers: u32,
    /// Declare the queue, the dead-letter exchange and the dead-letter queue (default true).
    /// When false they are only checked with passive declares.
    pub declare: bool,
    /// First delay between reconnect attempts, in ms. Default 500.
    pub reconnect_initial_ms: u64,
    /// Cap on the delay between reconnect attempts, in ms. Default 30000.
    pub reconnect_max_ms: u64,
    /// The longest a delivery may stay unacked: the backend timeout plus the longest backoff
    /// must stay below it, so that the broker's `consumer_timeout` (30 min by default) never
    /// closes the channel under a delivery. In ms. Default 900000 (15 min).
    pub delivery_deadline_ms: u64,
}

impl fmt::Debug for AmqpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpConfig")
            .field("url", &redact_url(&self.url))
            .field("queue", &self.queue)
            .field("queue_type", &self.queue_type)
            .field("prefetch", &self.prefetch)
            .field("consumers", &self.consumers)
            .field("declare", &self.declare)
            .finish_non_exhaustive()
    }
}

impl Default for AmqpConfig {
    fn default() -> Self {
        Self {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned(),
            queue: String::new(),
            queue_type: QueueType::Quorum,
            prefetch: 1,
            consumers: 0,
            declare: true,
            reconnect_initial_ms: 500,
            reconnect_max_ms: 30_000,
            delivery_deadline_ms: 900_000,
        }
    }
}

/// One worker backend (`backends: [...]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackendConfig {
    /// The http(s) URL each delivery is POSTed to. Required.
    #[serde(deserialize_with = "string_like")]
    pub url: String,
    /// Label used in metrics and logs. Default: the URL's `host:port`.
    #[serde(deserialize_with = "opt_string_like")]
    pub name: Option<String>,
    /// Most requests the sidecar keeps in flight to this backend. Default 1.
    pub max_in_flight: u32,
    /// Relative capacity: the balancer compares `in_flight / weight`. Default 1.
    pub weight: u32,
    /// Per-request timeout, in ms, covering connect, headers and body. Default 30000.
    pub timeout_ms: u64,
    /// Overrides of the top-level `health:` settings for this backend. Default none.
    pub health: Option<HealthOverride>,
}

impl Default for BackendConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            name: None,
            max_in_flight: 1,
            weight: 1,
            timeout_ms: 30_000,
            health: None,
        }
    }
}

impl BackendConfig {
    /// A backend with default settings for `url`.
    #[must_use]
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            ..Self::default()
        }
    }

    /// The metric label: `name`, or the URL's `host:port`.
    #[must_use]
    pub fn label(&self) -> String {
        if let Some(name) = &self.name {
            return name.clone();
        }
        match url::Url::parse(&self.url) {
            Ok(u) => match (u.host_str(), u.port_or_known_default()) {
                (Some(h), Some(p)) => format!("{h}:{p}"),
                (Some(h), None) => h.to_owned(),
                _ => self.url.clone(),
            },
            Err(_) => self.url.clone(),
        }
    }
}

/// The balancing strategy (`balancer:`). See `balance` for each algorithm's source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BalancerKind {
    /// Join-the-shortest-queue: the lowest `in_flight / weight`, ties rotated. The default.
    LeastInFlight,
    /// Power of two choices: two distinct random backends, the less loaded one.
    PowerOfTwo,
    /// Strictly in turn; a delivery waits for the backend whose turn it is.
    RoundRobin,
    /// Smooth weighted round robin (nginx), strictly in turn by weight.
    WeightedRoundRobin,
    /// Uniformly random among backends with a free slot.
    Random,
}

impl BalancerKind {
    /// Every strategy, in documentation order.
    pub const ALL: [BalancerKind; 5] = [
        Self::LeastInFlight,
        Self::PowerOfTwo,
        Self::RoundRobin,
        Self::WeightedRoundRobin,
        Self::Random,
    ];

    /// The config name, e.g. `least_in_flight`.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::LeastInFlight => "least_in_flight",
            Self::PowerOfTwo => "power_of_two",
            Self::RoundRobin => "round_robin",
            Self::WeightedRoundRobin => "weighted_round_robin",
            Self::Random => "random",
        }
    }
}

impl std::str::FromStr for BalancerKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|k| k.name()).collect();
                format!("unknown balancer {s:?}; one of {}", names.join(", "))
            })
    }
}

/// Limits on every backend request (`backend:`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackendLimits {
    /// Largest message body forwarded, in bytes. Larger ones are dead-lettered with reason
    /// `too_large`. Default 16777216 (16 MiB).
    pub max_body_bytes: usize,
    /// How much of a response body is read (then discarded), in bytes. Default 65536.
    /// Reading it lets the connection be reused; a longer body closes the connection.
    pub max_response_bytes: usize,
    /// TCP connect timeout, in ms. Default 2000.
    pub connect_timeout_ms: u64,
    /// A PEM bundle of CA certificates trusted for `https://` backends, added to the
    /// system's roots (for workers with a private CA). Default unset.
    pub ca_file: Option<std::path::PathBuf>,
    /// A PEM certificate chain the sidecar presents to `https://` backends that ask for one
    /// (mTLS). Set together with `client_key_file`. Default unset.
    pub client_cert_file: Option<std::path::PathBuf>,
    /// The PEM private key of `client_cert_file`. Default unset.
    pub client_key_file: Option<std::path::PathBuf>,
}

impl Default for BackendLimits {
    fn default() -> Self {
        Self {
            max_body_bytes: 16 * 1024 * 1024,
            max_response_bytes: 64 * 1024,
            connect_timeout_ms: 2_000,
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
        }
    }
}

/// Active health checks (`health:`). Off unless `path` is set (here or per backend).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthConfig {
    /// Path GETted on each backend's host, e.g. `/healthz`; 2xx is healthy. Default unset (off).
    #[serde(deserialize_with = "opt_string_like")]
    pub path: Option<String>,
    /// Time between checks, in ms. Default 5000.
    pub interval_ms: u64,
    /// Timeout of one check, in ms. Default 1000.
    pub timeout_ms: u64,
    /// Failed checks in a row that make a healthy backend unhealthy. Default 3.
    pub unhealthy_threshold: u32,
    /// Passed checks in a row that make an unhealthy backend healthy. Default 2.
    pub healthy_threshold: u32,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            path: None,
            interval_ms: 5_000,
            timeout_ms: 1_000,
            unhealthy_threshold: 3,
            healthy_threshold: 2,
        }
    }
}

/// A backend's `health:` block: any field set replaces the top-level one.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthOverride {
    /// See [`HealthConfig::path`].
    #[serde(deserialize_with = "opt_string_like")]
    pub path: Option<String>,
    /// See [`HealthConfig::interval_ms`].
    pub interval_ms: Option<u64>,
    /// See [`HealthConfig::timeout_ms`].
    pub timeout_ms: Option<u64>,
    /// See [`HealthConfig::unhealthy_threshold`].
    pub unhealthy_threshold: Option<u32>,
    /// See [`HealthConfig::healthy_threshold`].
    pub healthy_threshold: Option<u32>,
}

/// The effective health check of one backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// Path to GET.
    pub path: String,
    /// ms between checks.
    pub interval_ms: u64,
    /// ms per check.
    pub timeout_ms: u64,
    /// Failures in a row to turn unhealthy.
    pub unhealthy_threshold: u32,
    /// Successes in a row to turn healthy.
    pub healthy_threshold: u32,
}

/// Passive ejection, or outlier detection (`ejection:`): a backend that fails
/// `consecutive_failures` times in a row (retryable failures: 5xx, 408, 429, timeouts,
/// refused or reset connections) takes no requests for `base_ms × times ejected`, capped at
/// `max_ms`. After Envoy's outlier detection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EjectionConfig {
    /// Retryable failures in a row that eject a backend; 0 turns ejection off. Default 5.
    pub consecutive_failures: u32,
    /// Ejection time per ejection so far, in ms. Default 10000.
    pub base_ms: u64,
    /// Cap on the ejection time, in ms. Default 300000.
    pub max_ms: u64,
    /// Most backends ejected at once, as a percentage of all (rounded down), so a lone
    /// backend is never ejected. Default 50.
    pub max_percent: u8,
}

impl Default for EjectionConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            base_ms: 10_000,
            max_ms: 300_000,
            max_percent: 50,
        }
    }
}

/// Attempt limit and backoff (`retry:`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    /// Attempts (backend requests) per message before it is dead-lettered. Default 5.
    pub max_attempts: u32,
    /// Backoff before the first requeue, in ms. Default 1000.
    pub backoff_initial_ms: u64,
    /// Growth factor of the backoff per attempt. Default 2.
    pub backoff_multiplier: f64,
    /// Cap on the backoff (and on a `Retry-After`), in ms. Default 60000.
    pub backoff_max_ms: u64,
    /// Entries kept by the in-memory attempt counter (classic queues). Default 100000.
    pub attempt_cache_size: usize,
    /// Age after which an in-memory attempt count is forgotten, in ms. Default 3600000 (1 h).
    pub attempt_cache_ttl_ms: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            backoff_initial_ms: 1_000,
            backoff_multiplier: 2.0,
            backoff_max_ms: 60_000,
            attempt_cache_size: 100_000,
            attempt_cache_ttl_ms: 3_600_000,
        }
    }
}

/// Dead-lettering (`dead_letter:`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeadLetterConfig {
    /// Exchange dead-lettered messages are published to. Default `<queue>.dlx`.
    #[serde(deserialize_with = "opt_string_like")]
    pub exchange: Option<String>,
    /// Routing key of the dead-letter publish. Default `<queue>`.
    #[serde(deserialize_with = "opt_string_like")]
    pub routing_key: Option<String>,
    /// Queue declared and bound to the exchange when declaring. Default `<queue>.dlq`.
    #[serde(deserialize_with = "opt_string_like")]
    pub queue: Option<String>,
    /// How long to wait for the broker's publisher confirm, in ms. Default 5000.
    pub confirm_timeout_ms: u64,
}

impl Default for DeadLetterConfig {
    fn default() -> Self {
        Self {
            exchange: None,
            routing_key: None,
            queue: None,
            confirm_timeout_ms: 5_000,
        }
    }
}

impl DeadLetterConfig {
    /// The exchange name, resolved against the consumed queue's name.
    #[must_use]
    pub fn exchange_for(&self, queue: &str) -> String {
        self.exchange
            .clone()
            .unwrap_or_else(|| format!("{queue}.dlx"))
    }
    /// The routing key, resolved against the consumed queue's name.
    #[must_use]
    pub fn routing_key_for(&self, queue: &str) -> String {
        self.routing_key.clone().unwrap_or_else(|| queue.to_owned())
    }
    /// The dead-letter queue name, resolved against the consumed queue's name.
    #[must_use]
    pub fn queue_for(&self, queue: &str) -> String {
        self.queue.clone().unwrap_or_else(|| format!("{queue}.dlq"))
    }
    /// The publisher-confirm timeout (default 5 s).
    #[must_use]
    pub fn confirm_timeout(&self) -> Duration {
        Duration::from_millis(self.confirm_timeout_ms)
    }
}

/// The admin HTTP server (`admin:`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Listen address of /metrics, /healthz and /readyz. Default `0.0.0.0:9090`.
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 9090)),
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines (default).
    Text,
    /// One JSON object per line.
    Json,
}

/// Log output (`log:`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `text` (default) or `json`.
    pub format: LogFormat,
    /// A tracing filter such as `info` or `amqp_sidecar=debug`. `RUST_LOG` wins when set.
    /// Default `info`.
    #[serde(deserialize_with = "string_like")]
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".to_owned(),
        }
    }
}

/// Graceful shutdown (`shutdown:`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownConfig {
    /// How long in-flight deliveries may take to finish after SIGTERM, in ms. Default 30000.
    pub grace_ms: u64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self { grace_ms: 30_000 }
    }
}

/// One problem with the configuration: which key, where its value came from, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    /// Dotted key path, e.g. `amqp.prefetch` or `backends[1].url`.
    pub key: String,
    /// Where the value came from: `default`, `file config.yaml`, `env AMQP_SIDECAR_AMQP__URL`.
    pub source: String,
    /// What is wrong, and how to fix it where that is not obvious.
    pub message: String,
}

impl fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (from {}): {}", self.key, self.source, self.message)
    }
}

/// Every problem found in a configuration. The binary exits with code 78 (EX_CONFIG) on it.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigError {
    /// The problems, in the order they were found.
    pub issues: Vec<ConfigIssue>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "invalid configuration ({} problem(s)):",
            self.issues.len()
        )?;
        for issue in &self.issues {
            writeln!(f, "  - {issue}")?;
        }
        Ok(())
    }
}

/// A figment provider for the `AMQP_SIDECAR_BACKENDS=url,url` shorthand.
///
/// Written by hand because figment's `Env` parses `a,b` as a map, not a list.
struct BackendsShorthand(String);

impl Provider for BackendsShorthand {
    fn metadata(&self) -> Metadata {
        Metadata::named(format!("env {ENV_BACKENDS}"))
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let list: Vec<Value> = self
            .0
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|url| {
                let mut d = Dict::new();
                d.insert("url".into(), Value::from(url.to_owned()));
                Value::from(d)
            })
            .collect();
        let mut dict = Dict::new();
        dict.insert("backends".into(), Value::from(list));
        Ok(Profile::Default.collect(dict))
    }
}

/// The figment stack: defaults, then the YAML file (if any), then the environment.
fn figment(file: Option<&Path>, env: &dyn Fn(&str) -> Option<String>) -> Figment {
    let mut fig = Figment::from(Serialized::defaults(Config::default()));
    if let Some(path) = file {
        fig = fig.merge(Yaml::file_exact(path));
    }
    fig = fig.merge(
        Env::prefixed(ENV_PREFIX)
            .split("__")
            .ignore(&["CONFIG", "BACKENDS"]),
    );
    if let Some(list) = env(ENV_BACKENDS) {
        fig = fig.merge(BackendsShorthand(list));
    }
    fig
}

/// Human-readable source of a value, from figment's metadata.
fn describe_source(md: Option<&Metadata>, path: &[String]) -> String {
    let Some(md) = md else {
        return "unknown source".to_owned();
    };
    if let Some(file) = md.source.as_ref().and_then(|s| s.file_path()) {
        return format!("file {}", file.display());
    }
    if md.name.contains(ENV_BACKENDS) {
        return format!("env {ENV_BACKENDS}");
    }
    if md.name.contains("environment") {
        let var: Vec<String> = path.iter().map(|p| p.to_ascii_uppercase()).collect();
        return format!("env {ENV_PREFIX}{}", var.join("__"));
    }
    if md.name.contains("Serialized")
        || md
            .source
            .as_ref()
            .is_some_and(|s| s.code_location().is_some())
    {
        return "default".to_owned();
    }
    md.name.to_string()
}

/// Formats a key path such as `["backends", "1", "url"]` as `backends[1].url`.
fn format_key(path: &[String]) -> String {
    let mut out = String::new();
    for part in path {
        if part.chars().all(|c| c.is_ascii_digit()) && !out.is_empty() {
            out.push_str(&format!("[{part}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(part);
        }
    }
    if out.is_empty() {
        "(root)".to_owned()
    } else {
        out
    }
}

/// Most type errors reported from one configuration; a guard against a loop, far above
/// what a real file has.
const MAX_TYPE_ERRORS: usize = 64;

/// The source of `path`'s value: figment finds no metadata for list elements
/// (`backends.1.url`), so the nearest parent that has some is used.
fn source_of(fig: &Figment, path: &[String]) -> String {
    let md = (1..=path.len())
        .rev()
        .find_map(|n| fig.find_metadata(&path[..n].join(".")));
    describe_source(md, path)
}

/// Extracts the configuration, reporting every wrong type and unknown key, not only the
/// first. serde stops at the first error, so after each one the offending key is removed
/// from the merged values (it falls back to its default) and extraction runs again; each
/// error's source comes from the original figment's metadata.
fn extract_all(fig: &Figment) -> Result<Config, ConfigError> {
    let first = match fig.extract::<Config>() {
        Ok(config) => return Ok(config),
        Err(e) => e,
    };
    let issue = |e: &figment::error::Error, path: &[String]| {
        let message = match &e.kind {
            figment::error::Kind::Message(m)
                if m.contains("No such file") || m.contains("os error") =>
            {
                format!("cannot read config file: {m}")
            }
            kind => kind.to_string(),
        };
        ConfigIssue {
            key: format_key(path),
            source: source_of(fig, path),
            message,
        }
    };
    let mut issues = Vec::new();
    // A file that cannot be read or parsed gives no values to go on with.
    let Ok(mut values) = fig.extract::<Value>() else {
        issues.extend(first.into_iter().map(|e| issue(&e, &e.path)));
        return Err(ConfigError { issues });
    };
    let mut errors = first;
    for _ in 0..MAX_TYPE_ERRORS {
        let mut removed = false;
        for e in errors {
            // figment's path names the key itself, unknown keys included.
            issues.push(issue(&e, &e.path));
            removed |= remove_path(&mut values, &e.path);
        }
        if !removed {
            break;
        }
        match values.deserialize::<Config>() {
            Ok(_) => break,
            Err(e) => errors = e,
        }
    }
    Err(ConfigError { issues })
}

/// Removes the value at `path` (dict keys and list indices); true if there was one.
fn remove_path(value: &mut Value, path: &[String]) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    let mut at = value;
    for part in parents {
        at = match at {
            Value::Dict(_, dict) => match dict.get_mut(part) {
                Some(v) => v,
                None => return false,
            },
            Value::Array(_, list) => match part.parse::<usize>().ok().and_then(|i| list.get_mut(i))
            {
                Some(v) => v,
                None => return false,
            },
            _ => return false,
        };
    }
    match at {
        Value::Dict(_, dict) => dict.remove(last).is_some(),
        Value::Array(_, list) => match last.parse::<usize>() {
            // Replaced, not removed, so the later indices keep their meaning.
            Ok(i) if i < list.len() => {
                list[i] = Value::from(Dict::new());
                true
            }
            _ => false,
        },
        _ => false,
    }
}

impl Config {
    /// Loads the configuration from its sources and validates it.
    ///
    /// `file` is the YAML file (from `--config`); when `None`, `AMQP_SIDECAR_CONFIG` is used
    /// if set. The environment is read from the process.
    ///
    /// # Errors
    /// A [`ConfigError`] listing every problem: unreadable file, bad YAML, unknown keys,
    /// wrong types, and everything [`Config::validate`] rejects.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_with(file, &|k| std::env::var(k).ok())
    }

    /// [`Config::load`] with an injected environment lookup (for `AMQP_SIDECAR_CONFIG` and
    /// `AMQP_SIDECAR_BACKENDS`). The `AMQP_SIDECAR_<SECTION>__<KEY>` variables are still
    /// read from the process by figment.
    ///
    /// # Errors
    /// As [`Config::load`].
    pub fn load_with(
        file: Option<&Path>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let env_file = env(ENV_CONFIG_FILE).filter(|s| !s.is_empty());
        let (file, named_by) = match (file, env_file) {
            (Some(f), _) => (Some(f.to_path_buf()), "--config"),
            (None, Some(f)) => (Some(f.into()), ENV_CONFIG_FILE),
            (None, None) => (None, ""),
        };
        if let Some(path) = &file
            && !path.is_file()
        {
            return Err(ConfigError {
                issues: vec![ConfigIssue {
                    key: named_by.to_owned(),
                    source: if named_by == "--config" {
                        "command line".into()
                    } else {
                        format!("env {ENV_CONFIG_FILE}")
                    },
                    message: format!(
                        "config file {} does not exist or is not a file",
                        path.display()
                    ),
                }],
            });
        }
        let fig = figment(file.as_deref(), env);
        let config = extract_all(&fig)?;
        config.validate_with(&|key: &str| {
            let path: Vec<String> = key.split('.').map(str::to_owned).collect();
            source_of(&fig, &path)
        })
    }

    /// Checks values that parse but make no sense, and reports all of them at once.
    ///
    /// # Errors
    /// A [`ConfigError`] naming each bad key (the source is given as `config`).
    pub fn validate(self) -> Result<Config, ConfigError> {
        self.validate_with(&|_| "config".to_owned())
    }

    fn validate_with(self, source_of: &dyn Fn(&str) -> String) -> Result<Config, ConfigError> {
        let mut issues = Vec::new();
        let mut bad = |key: String, lookup: &str, message: String| {
            issues.push(ConfigIssue {
                key,
                source: source_of(lookup),
                message,
            });
        };
        let a = &self.amqp;
        match url::Url::parse(&a.url) {
            Ok(u) if u.scheme() == "amqp" || u.scheme() == "amqps" => {
                if u.host_str().is_none_or(str::is_empty) {
                    bad("amqp.url".into(), "amqp.url", "the URL has no host".into());
                }
            }
            Ok(u) => bad(
                "amqp.url".into(),
                "amqp.url",
                format!("scheme must be amqp or amqps, not {:?}", u.scheme()),
            ),
            Err(e) => bad(
                "amqp.url".into(),
                "amqp.url",
                format!("not a valid URL ({e}): {}", redact_url(&a.url)),
            ),
        }
        if a.queue.trim().is_empty() {
            bad(
                "amqp.queue".into(),
                "amqp.queue",
                "is required: the queue to consume from (env AMQP_SIDECAR_AMQP__QUEUE)".into(),
            );
        }
        if a.prefetch == 0 {
            bad(
                "amqp.prefetch".into(),
                "amqp.prefetch",
                "must be at least 1 (0 would mean unlimited, and the sidecar would hoard the queue)"
                    .into(),
            );
        }
        if a.reconnect_initial_ms == 0 || a.reconnect_initial_ms > a.reconnect_max_ms {
            bad(
                "amqp.reconnect_initial_ms".into(),
                "amqp.reconnect_initial_ms",
                format!(
                    "must be between 1 and amqp.reconnect_max_ms ({})",
                    a.reconnect_max_ms
                ),
            );
        }
        if self.backends.is_empty() {
            bad(
                "backends".into(),
                "backends",
                "at least one backend is required (or set AMQP_SIDECAR_BACKENDS=http://host:port/path,...)"
                    .into(),
            );
        }
        let mut labels = HashSet::new();
        for (i, b) in self.backends.iter().enumerate() {
            let key = |field: &str| format!("backends[{i}].{field}");
            let lookup = |field: &str| format!("backends.{i}.{field}");
            match url::Url::parse(&b.url) {
                Ok(u)
                    if (u.scheme() == "http" || u.scheme() == "https")
                        && u.host_str().is_some() => {}
                Ok(u) => bad(
                    key("url"),
                    &lookup("url"),
                    format!(
                        "must be an http:// or https:// URL with a host, got scheme {:?}",
                        u.scheme()
                    ),
                ),
                Err(e) => bad(
                    key("url"),
                    &lookup("url"),
                    format!("{:?} is not a valid URL: {e}", b.url),
                ),
            }
            if b.max_in_flight == 0 {
                bad(
                    key("max_in_flight"),
                    &lookup("max_in_flight"),
                    "must be at least 1".into(),
                );
            }
            if b.weight == 0 {
                bad(
                    key("weight"),
                    &lookup("weight"),
                    "must be at least 1".into(),
                );
            }
            if b.timeout_ms == 0 {
                bad(
                    key("timeout_ms"),
                    &lookup("timeout_ms"),
                    "must be at least 1 ms".into(),
                );
            }
            if !labels.insert(b.label()) {
                bad(
                    key("name"),
                    &lookup("url"),
                    format!(
                        "two backends share the label {:?}; give them distinct `name`s",
                        b.label()
                    ),
                );
            }
        }
        let r = &self.retry;
        if r.max_attempts == 0 {
            bad(
                "retry.max_attempts".into(),
                "retry.max_attempts",
                "must be at least 1".into(),
            );
        }
        if !(r.backoff_multiplier.is_finite() && r.backoff_multiplier >= 1.0) {
            bad(
                "retry.backoff_multiplier".into(),
                "retry.backoff_multiplier",
                "must be a number ≥ 1".into(),
            );
        }
        if r.backoff_initial_ms > r.backoff_max_ms {
            bad(
                "retry.backoff_initial_ms".into(),
                "retry.backoff_initial_ms",
                format!(
                    "must not exceed retry.backoff_max_ms ({})",
                    r.backoff_max_ms
                ),
            );
        }
        if r.attempt_cache_size == 0 {
            bad(
                "retry.attempt_cache_size".into(),
                "retry.attempt_cache_size",
                "must be at least 1".into(),
            );
        }
        let longest_timeout = self
            .backends
            .iter()
            .map(|b| b.timeout_ms)
            .max()
            .unwrap_or(0);
        let worst = longest_timeout.saturating_add(r.backoff_max_ms);
        if worst >= a.delivery_deadline_ms {
            bad(
                "amqp.delivery_deadline_ms".into(),
                "amqp.delivery_deadline_ms",
                format!(
                    "the longest backend timeout_ms ({longest_timeout}) plus retry.backoff_max_ms ({}) is {worst} ms, \
                     which must stay below amqp.delivery_deadline_ms ({}); otherwise the broker's consumer_timeout \
                     may close the channel under a delivery. Lower them, or raise the deadline (and the broker's consumer_timeout)",
                    r.backoff_max_ms, a.delivery_deadline_ms
                ),
            );
        }
        if self.dead_letter.confirm_timeout_ms == 0 {
            bad(
                "dead_letter.confirm_timeout_ms".into(),
                "dead_letter.confirm_timeout_ms",
                "must be at least 1 ms".into(),
            );
        }
        for i in 0..self.backends.len() {
            let Some(h) = self.health_check(i) else {
                continue;
            };
            let prefix = if self.backends[i].health.is_some() {
                format!("backends[{i}].health")
            } else {
                "health".to_owned()
            };
            if !h.path.starts_with('/') {
                bad(
                    format!("{prefix}.path"),
                    "health.path",
                    format!("must start with '/', got {:?}", h.path),
                );
            }
            if h.interval_ms == 0 || h.timeout_ms == 0 || h.timeout_ms > h.interval_ms {
                bad(
                    format!("{prefix}.timeout_ms"),
                    "health.timeout_ms",
                    format!(
                        "interval_ms ({}) and timeout_ms ({}) must be ≥ 1, with timeout_ms ≤ interval_ms",
                        h.interval_ms, h.timeout_ms
                    ),
                );
            }
            if h.unhealthy_threshold == 0 || h.healthy_threshold == 0 {
                bad(
                    format!("{prefix}.unhealthy_threshold"),
                    "health.unhealthy_threshold",
                    "unhealthy_threshold and healthy_threshold must be ≥ 1".into(),
                );
            }
        }
        if self.ejection.max_percent > 100 {
            bad(
                "ejection.max_percent".into(),
                "ejection.max_percent",
                "must be between 0 and 100".into(),
            );
        }
        if self.ejection.base_ms > self.ejection.max_ms {
            bad(
                "ejection.base_ms".into(),
                "ejection.base_ms",
                format!("must not exceed ejection.max_ms ({})", self.ejection.max_ms),
            );
        }
        if self.backend.max_body_bytes == 0 {
            bad(
                "backend.max_body_bytes".into(),
                "backend.max_body_bytes",
                "must be at least 1".into(),
            );
        }
        if let Some(path) = &self.backend.ca_file
            && let Err(e) = crate::tls::load_roots(path)
        {
            bad("backend.ca_file".into(), "backend.ca_file", e.to_string());
        }
        match (
            &self.backend.client_cert_file,
            &self.backend.client_key_file,
        ) {
            (Some(cert), Some(key)) => {
                if let Err(e) = crate::tls::load_identity(cert, key) {
                    let key_name = if matches!(e, crate::tls::TlsFileError::Key { .. }) {
                        "backend.client_key_file"
                    } else {
                        "backend.client_cert_file"
                    };
                    bad(key_name.into(), key_name, e.to_string());
                }
            }
            (Some(_), None) => bad(
                "backend.client_key_file".into(),
                "backend.client_key_file",
                "must be set when backend.client_cert_file is".into(),
            ),
            (None, Some(_)) => bad(
                "backend.client_cert_file".into(),
                "backend.client_cert_file",
                "must be set when backend.client_key_file is".into(),
            ),
            (None, None) => {}
        }
        if let Err(e) = self.log.level.parse::<tracing_subscriber::EnvFilter>() {
            bad(
                "log.level".into(),
                "log.level",
                format!("not a valid filter: {e}"),
            );
        }
        if issues.is_empty() {
            Ok(self)
        } else {
            Err(ConfigError { issues })
        }
    }

    /// The effective health check of backend `index`: the top-level `health:` with the
    /// backend's overrides applied; `None` when no path is set.
    #[must_use]
    pub fn health_check(&self, index: usize) -> Option<HealthCheck> {
        let g = &self.health;
        let o = self.backends.get(index)?.health.clone().unwrap_or_default();
        Some(HealthCheck {
            path: o.path.or_else(|| g.path.clone())?,
            interval_ms: o.interval_ms.unwrap_or(g.interval_ms),
            timeout_ms: o.timeout_ms.unwrap_or(g.timeout_ms),
            unhealthy_threshold: o.unhealthy_threshold.unwrap_or(g.unhealthy_threshold),
            healthy_threshold: o.healthy_threshold.unwrap_or(g.healthy_threshold),
        })
    }

    /// Number of consumer channels: `amqp.consumers`, or the sum of `max_in_flight` when 0.
    #[must_use]
    pub fn consumer_count(&self) -> u32 {
        if self.amqp.consumers > 0 {
            self.amqp.consumers
        } else {
            self.backends
                .iter()
                .map(|b| b.max_in_flight)
                .sum::<u32>()
                .max(1)
        }
    }

    /// The effective configuration as JSON, with the broker password and every backend
    /// URL's password replaced by `***`.
    #[must_use]
    pub fn redacted_json(&self) -> String {
        let mut copy = self.clone();
        copy.amqp.url = redact_url(&copy.amqp.url);
        for b in &mut copy.backends {
            b.url = redact_url(&b.url);
        }
        serde_json::to_string_pretty(&copy).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }
}

/// Returns `url` with its password (if any) replaced by `***`. Never fails: a string that
/// does not parse as a URL is replaced entirely, since it could hold anything.
///
/// ```
/// use amqp_sidecar::config::redact_url;
/// assert_eq!(redact_url("amqp://app:s3cret@rabbit:5672/%2f"), "amqp://app:***@rabbit:5672/%2f");
/// assert_eq!(redact_url("amqp://rabbit/%2f"), "amqp://rabbit/%2f");
/// assert_eq!(redact_url("not a url"), "<unparseable URL, redacted>");
/// ```
#[must_use]
pub fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        Err(_) => "<unparseable URL, redacted>".to_owned(),
    }
}

/// Accepts a string, or a number or boolean (figment parses env values such as `12345` as
/// numbers), for a `String` field.
fn string_like<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    struct V;
    impl serde::de::Visitor<'_> for V {
        type Value = String;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<String, E> {
            Ok(v.to_owned())
        }
        fn visit_string<E: serde::de::Error>(self, v: String) -> Result<String, E> {
            Ok(v)
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_char<E: serde::de::Error>(self, v: char) -> Result<String, E> {
            Ok(v.to_string())
        }
    }
    d.deserialize_any(V)
}

/// [`string_like`] for an optional field.
fn opt_string_like<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    struct Wrap(#[serde(deserialize_with = "string_like")] String);
    Ok(Option::<Wrap>::deserialize(d)?.map(|w| w.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> Config {
        let mut c = Config::default();
        c.amqp.queue = "q".into();
        c.backends = vec![BackendConfig::new("http://127.0.0.1:8080/")];
        c
    }

    fn keys(c: Config) -> Vec<String> {
        c.validate()
            .expect_err("should be rejected")
            .issues
            .into_iter()
            .map(|i| i.key)
            .collect()
    }

    #[test]
    fn default_with_queue_and_backend_is_valid() {
        assert!(valid().validate().is_ok());
    }

    #[test]
    fn rejects_each_bad_value() {
        let mut c = valid();
        c.amqp.queue = String::new();
        assert_eq!(keys(c), ["amqp.queue"]);
        let mut c = valid();
        c.amqp.prefetch = 0;
        assert_eq!(keys(c), ["amqp.prefetch"]);
        let mut c = valid();
        c.amqp.url = "http://x".into();
        assert_eq!(keys(c), ["amqp.url"]);
        let mut c = valid();
        c.backends.clear();
        assert_eq!(keys(c), ["backends"]);
        let mut c = valid();
        c.backends[0].max_in_flight = 0;
        assert_eq!(keys(c), ["backends[0].max_in_flight"]);
        let mut c = valid();
        c.backends[0].url = "ftp://x/".into();
        assert_eq!(keys(c), ["backends[0].url"]);
        let mut c = valid();
        c.backends[0].weight = 0;
        assert_eq!(keys(c), ["backends[0].weight"]);
        let mut c = valid();
        c.retry.max_attempts = 0;
        assert_eq!(keys(c), ["retry.max_attempts"]);
        let mut c = valid();
        c.retry.backoff_multiplier = 0.5;
        assert_eq!(keys(c), ["retry.backoff_multiplier"]);
        let mut c = valid();
        c.retry.backoff_initial_ms = 100_000;
        assert_eq!(keys(c), ["retry.backoff_initial_ms"]);
        let mut c = valid();
        c.backends[0].timeout_ms = 900_000;
        assert_eq!(keys(c), ["amqp.delivery_deadline_ms"]);
        let mut c = valid();
        c.ejection.max_percent = 101;
        assert_eq!(keys(c), ["ejection.max_percent"]);
        let mut c = valid();
        c.ejection.base_ms = c.ejection.max_ms + 1;
        assert_eq!(keys(c), ["ejection.base_ms"]);
        let mut c = valid();
        c.dead_letter.confirm_timeout_ms = 0;
        assert_eq!(keys(c), ["dead_letter.confirm_timeout_ms"]);
        let mut c = valid();
        c.backend.max_body_bytes = 0;
        assert_eq!(keys(c), ["backend.max_body_bytes"]);
        let mut c = valid();
        c.log.level = "amqp_sidecar=loud".into();
        assert_eq!(keys(c), ["log.level"]);
        let mut c = valid();
        c.amqp.reconnect_initial_ms = 0;
        assert_eq!(keys(c), ["amqp.reconnect_initial_ms"]);
        let mut c = valid();
        c.backends
            .push(BackendConfig::new("http://127.0.0.1:8080/other"));
        assert_eq!(keys(c), ["backends[1].name"]);
    }

    #[test]
    fn redacts_password() {
        let r = redact_url("amqp://user:s3cret@host:5672/%2f");
        assert!(!r.contains("s3cret"), "{r}");
        assert!(r.contains("***"), "{r}");
        let mut c = valid();
        c.amqp.url = "amqps://u:topsecret@h/%2f".into();
        assert!(!c.redacted_json().contains("topsecret"));
        assert!(!format!("{c:?}").contains("topsecret"));
    }

    #[test]
    fn consumers_default_to_total_capacity() {
        let mut c = valid();
        c.backends[0].max_in_flight = 3;
        c.backends.push(BackendConfig {
            max_in_flight: 2,
            ..BackendConfig::new("http://127.0.0.1:8081/")
        });
        assert_eq!(c.consumer_count(), 5);
        c.amqp.consumers = 2;
        assert_eq!(c.consumer_count(), 2);
    }

    #[test]
    fn health_checks_merge_per_backend_overrides() {
        let mut c = valid();
        assert_eq!(c.health_check(0), None, "off without a path");
        c.health.path = Some("/healthz".into());
        c.backends.push(BackendConfig {
            health: Some(HealthOverride {
                path: Some("/ready".into()),
                interval_ms: Some(500),
                timeout_ms: Some(200),
                ..HealthOverride::default()
            }),
            ..BackendConfig::new("http://127.0.0.1:8081/")
        });
        let h0 = c.health_check(0).expect("on");
        assert_eq!(
            (h0.path.as_str(), h0.interval_ms, h0.unhealthy_threshold),
            ("/healthz", 5_000, 3)
        );
        let h1 = c.health_check(1).expect("on");
        assert_eq!(
            (h1.path.as_str(), h1.interval_ms, h1.timeout_ms),
            ("/ready", 500, 200)
        );
        assert_eq!(
            h1.healthy_threshold, 2,
            "unset fields come from the top level"
        );
        c.health.path = Some("healthz".into());
        assert_eq!(keys(c), ["health.path"]);
    }

    #[test]
    fn label_defaults_to_host_port() {
        assert_eq!(
            BackendConfig::new("http://127.0.0.1:8080/x").label(),
            "127.0.0.1:8080"
        );
        assert_eq!(BackendConfig::new("http://w/").label(), "w:80");
    }
}
