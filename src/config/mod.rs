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
//!
//! The module is split in three: this file holds the serde structs, their defaults and
//! small accessors; `load` the figment stack, the sources of values and the redaction
//! helpers; `validate` the checks of values that parse but make no sense.

mod backend;
mod load;
mod validate;

use std::{fmt, net::SocketAddr, time::Duration};

use serde::{Deserialize, Serialize};

pub use backend::{
    BackendConfig, BackendLimits, BalancerKind, HealthCheck, HealthConfig, HealthOverride,
    MaxInFlight,
};
pub use load::redact_url;
use load::{opt_string_like, string_like};

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
    /// Trace context (W3C `traceparent`).
    pub tracing: TracingConfig,
    /// The memory budget for message bodies held at once.
    pub memory: MemoryConfig,
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
            tracing: TracingConfig::default(),
            memory: MemoryConfig::default(),
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
    /// Number of consumer channels. Default 0: the sum of the backends' concurrency limits
    /// (`max_in_flight`, or the learned limits with `auto`) plus an adaptive lookahead. A
    /// number turns the adaptation off.
    pub consumers: u32,
    /// With `consumers: 0`: most consumers beyond the backend slots, opened so a delivery is
    /// at hand when a slot frees. Default: the sum of the backend slots; 0 turns the
    /// lookahead off.
    pub max_lookahead: Option<u32>,
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
            .field("max_lookahead", &self.max_lookahead)
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
            max_lookahead: None,
            declare: true,
            reconnect_initial_ms: 500,
            reconnect_max_ms: 30_000,
            delivery_deadline_ms: 900_000,
        }
    }
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
    /// Where a failed delivery waits out its backoff: `requeue` (default) or `delay_queue`.
    pub mode: RetryMode,
    /// `requeue` mode: most deliveries that wait out a backoff with a consumer opened in
    /// their place, so the wait takes no capacity from the backends. Beyond it, a failing
    /// delivery is requeued at once, without its backoff (and waits in place, holding its
    /// prefetch slot, if it failed that way last time too). Default: the sum of the
    /// backends' `max_in_flight`, and at least 16.
    pub max_waiting: Option<u32>,
    /// How a backoff is drawn below its ceiling: `full` (default, `uniform(0, ceiling)`) or
    /// `equal` (`ceiling/2 + uniform(0, ceiling/2)`, never near zero).
    pub jitter: JitterKind,
}

/// Where a failed delivery waits out its backoff (`retry.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RetryMode {
    /// In the sidecar: the delivery stays unacked while it waits, with a consumer opened in
    /// its place (up to `retry.max_waiting`), then `basic.reject(requeue=true)`. The
    /// mission's nack-with-requeue; no extra queues.
    Requeue,
    /// In the broker: a copy with `x-sidecar-attempts` goes to a delay queue
    /// `<queue>.retry.<ms>` (publisher confirms), and the original is acked. Holds no
    /// prefetch slot, and the attempt count survives restarts and is shared by every pod.
    DelayQueue,
}

/// How a backoff is drawn below its exponential ceiling (`retry.jitter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JitterKind {
    /// `uniform(0, ceiling)`.
    Full,
    /// `ceiling/2 + uniform(0, ceiling/2)`.
    Equal,
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
            mode: RetryMode::Requeue,
            max_waiting: None,
            jitter: JitterKind::Full,
        }
    }
}

/// Least default `retry.max_waiting`: a one-slot pod with a few failing messages in a burst
/// should not stall on them.
pub const MIN_DEFAULT_MAX_WAITING: u32 = 16;

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

/// The memory budget (`memory:`), see `memory` and `capacity`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MemoryConfig {
    /// Bytes of message bodies the sidecar may hold at once (received, not yet settled,
    /// backoffs included). Default: the container's cgroup memory limit less 48 MiB for
    /// the sidecar's own baseline; no budget without a cgroup limit.
    pub limit_bytes: Option<u64>,
}

/// Trace context (`tracing:`): a delivery's W3C `traceparent` is always continued into the
/// request to the worker (see `trace`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TracingConfig {
    /// Start a new trace (a random trace-id, sampled) for a delivery that has no
    /// `traceparent`. Default false: such a request carries none.
    pub start_traces: bool,
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

impl Config {
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
            self.backend_slots()
        }
    }

    /// The sum of the backends' `max_in_flight` at start (an `auto` backend starts at its
    /// `min_in_flight`), at least 1.
    #[must_use]
    pub fn backend_slots(&self) -> u32 {
        self.backends
            .iter()
            .map(BackendConfig::initial_limit)
            .fold(0u32, u32::saturating_add)
            .max(1)
    }

    /// The effective memory budget: `memory.limit_bytes`, or from the cgroup limit (see
    /// `memory::budget`); `None` for no budget.
    #[must_use]
    pub fn memory_budget(&self) -> Option<crate::memory::Budget> {
        crate::memory::budget(
            self.memory.limit_bytes,
            std::path::Path::new(crate::memory::CGROUP_ROOT),
        )
    }

    /// `retry.max_waiting`, or its default: the backend slots, at least
    /// [`MIN_DEFAULT_MAX_WAITING`]. In `delay_queue` mode only a delivery whose delay copy
    /// could not be stored waits here.
    #[must_use]
    pub fn max_waiting(&self) -> u32 {
        self.retry
            .max_waiting
            .unwrap_or_else(|| self.backend_slots().max(MIN_DEFAULT_MAX_WAITING))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A valid configuration: the defaults with a queue and one backend.
    pub(super) fn valid() -> Config {
        let mut c = Config::default();
        c.amqp.queue = "q".into();
        c.backends = vec![BackendConfig::new("http://127.0.0.1:8080/")];
        c
    }

    /// Writes `yaml` to a new file in a fresh temporary directory and returns its path.
    pub(super) fn temp_yaml(yaml: &str) -> std::path::PathBuf {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("amqp-sidecar-config-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("sidecar.yaml");
        std::fs::write(&file, yaml).expect("write");
        file
    }

    #[test]
    fn consumers_default_to_total_capacity() {
        let mut c = valid();
        c.backends[0].max_in_flight = 3.into();
        c.backends.push(BackendConfig {
            max_in_flight: 2.into(),
            ..BackendConfig::new("http://127.0.0.1:8081/")
        });
        assert_eq!(c.consumer_count(), 5);
        c.amqp.consumers = 2;
        assert_eq!(c.consumer_count(), 2);
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
