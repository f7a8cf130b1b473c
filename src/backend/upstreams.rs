//! The worker backends as one unit, built from the config: the backends, the pool that
//! measures their load and usability (with its metric hooks), and the HTTP client; and,
//! beside them, the tasks that watch the backends (health checks, the prober).

use std::{net::SocketAddr, sync::Arc};

use super::{
    Backend, Client,
    health::{HealthChecker, Target},
    probe::{Probe, ProbeTarget, Prober},
};
use crate::{
    balance::{self, Concurrency, Hooks, Pool},
    config::{Config, MaxInFlight},
    metrics::BackendMetrics,
};

/// Why the backends could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The HTTP client or a backend could not be built.
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
    /// A backend's health path does not make a URL with the backend's.
    #[error("backend {backend}: health path {path:?} does not make a URL: {reason}")]
    HealthPath {
        /// The backend's label.
        backend: String,
        /// The health path.
        path: String,
        /// Why.
        reason: String,
    },
}

/// The backends, their pool and the client.
pub struct Upstreams {
    /// The backends, in config order (the pool's indices).
    pub backends: Vec<Backend>,
    /// Their in-flight counts and usability.
    pub pool: Arc<Pool>,
    /// The shared HTTP client.
    pub client: Client,
}

/// The tasks that watch the backends, for the supervisor to run.
pub struct Watchers {
    /// Active health checks, if any backend has a health path.
    pub checker: Option<HealthChecker>,
    /// Probes unreachable backends.
    pub prober: Prober,
    /// Backends without a health check, with their address, TCP-probed while paused.
    pub pause_probes: Vec<(usize, Option<SocketAddr>)>,
}

impl Upstreams {
    /// Builds the backends of `config` (which should have passed validation), and the
    /// tasks that watch them.
    ///
    /// # Errors
    /// A [`BuildError`] when the client or a health-check URL cannot be built.
    pub fn new(config: &Config) -> Result<(Arc<Self>, Watchers), BuildError> {
        let backends = config
            .backends
            .iter()
            .map(Backend::new)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| BuildError::Client(e.to_string()))?;
        let limits: Vec<(Concurrency, u32)> = config
            .backends
            .iter()
            .map(|b| {
                let concurrency = match b.max_in_flight {
                    MaxInFlight::Fixed(n) => Concurrency::Fixed(n),
                    MaxInFlight::Auto => Concurrency::Auto {
                        min: b.min_in_flight,
                        max: b.max_in_flight_limit,
                    },
                };
                (concurrency, b.weight)
            })
            .collect();
        let pool = Pool::with_limits(
            &limits,
            balance::strategy(config.balancer),
            config.ejection.clone(),
            metric_hooks(&backends),
        );
        let max_idle = config
            .backends
            .iter()
            .map(|b| match b.max_in_flight {
                MaxInFlight::Fixed(n) => n as usize,
                MaxInFlight::Auto => b.max_in_flight_limit as usize,
            })
            .max()
            .unwrap_or(1);
        let client = Client::new(&config.backend, max_idle).map_err(BuildError::Client)?;
        let mut targets = Vec::new();
        let mut probes = Vec::new();
        let mut pause_probes = Vec::new();
        for (i, b) in backends.iter().enumerate() {
            let health_url = match config.health_check(i) {
                Some(check) => {
                    let url = b
                        .url
                        .join(&check.path)
                        .map_err(|e| BuildError::HealthPath {
                            backend: b.label.clone(),
                            path: check.path.clone(),
                            reason: e.to_string(),
                        })?;
                    targets.push(Target {
                        index: i,
                        label: b.label.clone(),
                        url: url.clone(),
                        check,
                    });
                    Some(url)
                }
                None => {
                    let addr = b
                        .url
                        .socket_addrs(|| None)
                        .ok()
                        .and_then(|a| a.first().copied());
                    pause_probes.push((i, addr));
                    None
                }
            };
            probes.push(ProbeTarget {
                index: i,
                label: b.label.clone(),
                probe: Probe::for_backend(&b.url, health_url),
            });
        }
        let checker = if targets.is_empty() {
            None
        } else {
            let pool = Arc::clone(&pool);
            Some(
                HealthChecker::new(
                    Arc::new(move |i, healthy| pool.set_healthy(i, healthy)),
                    targets,
                    &config.backend,
                )
                .map_err(BuildError::Client)?,
            )
        };
        let prober = Prober::new(Arc::clone(&pool), probes, client.http().clone());
        Ok((
            Arc::new(Self {
                backends,
                pool,
                client,
            }),
            Watchers {
                checker,
                prober,
                pause_probes,
            },
        ))
    }
}

/// The pool's hooks: per-backend gauges and counters, and the log lines for ejection and
/// reachability. Every gauge is published from the start, so dashboards see 0, not nothing.
fn metric_hooks(backends: &[Backend]) -> Hooks {
    let handles: Arc<[BackendMetrics]> = backends.iter().map(|b| b.metrics.clone()).collect();
    let labels: Arc<[String]> = backends.iter().map(|b| b.label.clone()).collect();
    for h in handles.iter() {
        h.in_flight.set(0.0);
        h.healthy.set(1.0);
        h.unreachable.set(0.0);
        h.ejections.increment(0);
    }
    let (in_flight, ejected, reach, limit) = (
        Arc::clone(&handles),
        Arc::clone(&handles),
        Arc::clone(&handles),
        Arc::clone(&handles),
    );
    let reach_labels = Arc::clone(&labels);
    Hooks {
        in_flight: Box::new(move |i, n| in_flight[i].in_flight.set(f64::from(n))),
        ejected: Box::new(move |i, d| {
            ejected[i].ejections.increment(1);
            tracing::warn!(backend = %labels[i], ejected_for_ms = d.as_millis() as u64, "backend ejected after consecutive failures");
        }),
        reachability: Box::new(move |i, healthy, unreachable| {
            let h = &reach[i];
            let up = healthy && unreachable.is_none();
            h.healthy.set(if up { 1.0 } else { 0.0 });
            h.unreachable
                .set(if unreachable.is_some() { 1.0 } else { 0.0 });
            if let Some(reason) = unreachable {
                tracing::warn!(backend = %reach_labels[i], error = %reason, "backend unreachable: a request was not delivered; probing it (not counted as an attempt)");
            }
        }),
        limit: Box::new(move |i, n| limit[i].limit.set(f64::from(n))),
    }
}
