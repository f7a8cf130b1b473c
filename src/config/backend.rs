//! The backend settings: each worker backend (`backends:`), the limits shared by all
//! (`backend:`), the balancing strategy (`balancer:`) and the health checks (`health:`).

use std::fmt;

use serde::{Deserialize, Serialize};

use super::load::{opt_string_like, string_like};

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
    /// Most requests the sidecar keeps in flight to this backend: a number, or `auto`
    /// (default) to learn it from the backend's latency (see `balance::limit`), between
    /// `min_in_flight` and `max_in_flight_limit`.
    pub max_in_flight: MaxInFlight,
    /// `max_in_flight: auto`: the limit it starts from and never goes below. Default 1.
    pub min_in_flight: u32,
    /// `max_in_flight: auto`: the limit it never exceeds. Default 64.
    pub max_in_flight_limit: u32,
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
            max_in_flight: MaxInFlight::Auto,
            min_in_flight: 1,
            max_in_flight_limit: 64,
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

    /// The concurrency limit it starts with: `max_in_flight`, or `min_in_flight` when auto.
    #[must_use]
    pub fn initial_limit(&self) -> u32 {
        match self.max_in_flight {
            MaxInFlight::Fixed(n) => n,
            MaxInFlight::Auto => self.min_in_flight,
        }
    }

    /// True when the limit is learned (`max_in_flight: auto`).
    #[must_use]
    pub fn is_auto(&self) -> bool {
        self.max_in_flight == MaxInFlight::Auto
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

/// A backend's `max_in_flight`: fixed, or learned (`auto`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaxInFlight {
    /// Learned from latency, between `min_in_flight` and `max_in_flight_limit`.
    Auto,
    /// This many, always.
    Fixed(u32),
}

impl From<u32> for MaxInFlight {
    fn from(n: u32) -> Self {
        Self::Fixed(n)
    }
}

impl Serialize for MaxInFlight {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Auto => s.serialize_str("auto"),
            Self::Fixed(n) => s.serialize_u32(*n),
        }
    }
}

impl<'de> Deserialize<'de> for MaxInFlight {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = MaxInFlight;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a whole number or \"auto\"")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<MaxInFlight, E> {
                u32::try_from(v)
                    .map(MaxInFlight::Fixed)
                    .map_err(|_| E::custom(format!("{v} is too large")))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<MaxInFlight, E> {
                u64::try_from(v)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(v), &self))
                    .and_then(|v| self.visit_u64(v))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<MaxInFlight, E> {
                match v.trim() {
                    "auto" => Ok(MaxInFlight::Auto),
                    n => n
                        .parse::<u32>()
                        .map(MaxInFlight::Fixed)
                        .map_err(|_| E::invalid_value(serde::de::Unexpected::Str(v), &self)),
                }
            }
        }
        d.deserialize_any(V)
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
