//! Active health checks and the pause-time probe.
//!
//! A [`HealthChecker`] GETs each backend's health path every `interval_ms` and flips the
//! backend's state only after `unhealthy_threshold` failures or `healthy_threshold`
//! successes in a row (as pingora's `health_check` and Envoy's active health checking do),
//! so one slow answer does not take a backend out. Backends start healthy.
//!
//! [`tcp_probe`] is the probe for backends without a health path while consumption is
//! paused: a TCP connect to the backend's address.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{net::TcpStream, task::JoinSet};
use tokio_util::sync::CancellationToken;

use crate::config::HealthCheck;

/// Where a checker reports a backend's health flips: `(index, healthy)`. The supervisor
/// points it at the pool, as pingora's `HealthObserve` callback does, so the checker does
/// not know the pool.
pub type Observe = Arc<dyn Fn(usize, bool) + Send + Sync>;

/// The hysteresis of active health checks (pingora's `health_check`, Envoy's active
/// health checking): the state flips to unhealthy after `unhealthy_threshold` failures in a
/// row and back after `healthy_threshold` successes in a row. Starts healthy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hysteresis {
    healthy: bool,
    successes: u32,
    failures: u32,
    healthy_threshold: u32,
    unhealthy_threshold: u32,
}

impl Hysteresis {
    /// Healthy, with the given thresholds (each ≥ 1, as validation guarantees).
    #[must_use]
    pub fn new(healthy_threshold: u32, unhealthy_threshold: u32) -> Self {
        Self {
            healthy: true,
            successes: 0,
            failures: 0,
            healthy_threshold,
            unhealthy_threshold,
        }
    }

    /// Records one check; returns the new state when it flips.
    pub fn observe(&mut self, ok: bool) -> Option<bool> {
        if ok {
            self.successes = self.successes.saturating_add(1);
            self.failures = 0;
        } else {
            self.failures = self.failures.saturating_add(1);
            self.successes = 0;
        }
        let flip = if self.healthy {
            self.failures >= self.unhealthy_threshold
        } else {
            self.successes >= self.healthy_threshold
        };
        if flip {
            self.healthy = !self.healthy;
            Some(self.healthy)
        } else {
            None
        }
    }
}

/// One backend's health-check target.
pub struct Target {
    /// Index of the backend in the pool.
    pub index: usize,
    /// Label, for logs.
    pub label: String,
    /// The URL to GET (backend URL joined with the health path).
    pub url: reqwest::Url,
    /// Its settings.
    pub check: HealthCheck,
}

/// The health-check task.
pub struct HealthChecker {
    observe: Observe,
    targets: Vec<Target>,
    client: reqwest::Client,
}

impl HealthChecker {
    /// A checker for `targets` that reports flips to `observe`.
    ///
    /// # Errors
    /// When the HTTP client cannot be built (a TLS file of `limits` that cannot be used).
    pub fn new(
        observe: Observe,
        targets: Vec<Target>,
        limits: &crate::config::BackendLimits,
    ) -> Result<Self, String> {
        let client = super::client_builder(limits)?
            .pool_max_idle_per_host(1)
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self {
            observe,
            targets,
            client,
        })
    }

    /// True when no backend has a health path.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    /// Checks every target until `stop` is cancelled.
    pub async fn run(self, stop: CancellationToken) {
        let mut set = JoinSet::new();
        for target in self.targets {
            let (observe, client, stop) =
                (Arc::clone(&self.observe), self.client.clone(), stop.clone());
            set.spawn(async move { check_loop(target, observe, client, stop).await });
        }
        while set.join_next().await.is_some() {}
    }
}

async fn check_loop(t: Target, observe: Observe, client: reqwest::Client, stop: CancellationToken) {
    let mut state = Hysteresis::new(t.check.healthy_threshold, t.check.unhealthy_threshold);
    let mut tick = tokio::time::interval(Duration::from_millis(t.check.interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let result = client
            .get(t.url.clone())
            .timeout(Duration::from_millis(t.check.timeout_ms))
            .send()
            .await;
        let ok = matches!(&result, Ok(r) if r.status().is_success());
        match state.observe(ok) {
            Some(false) => {
                let why = match result {
                    Ok(r) => format!("HTTP {}", r.status()),
                    Err(e) => e.without_url().to_string(),
                };
                tracing::warn!(backend = %t.label, failures = t.check.unhealthy_threshold, error = %why, "backend failed its health checks: unhealthy");
            }
            Some(true) => {
                tracing::info!(backend = %t.label, successes = t.check.healthy_threshold, "backend passed its health checks: healthy again");
            }
            None => continue,
        }
        // The pool publishes it (the health gauge, readiness, pausing).
        observe(t.index, ok);
    }
}

/// Tries a TCP connect to `addr` within `timeout`.
pub async fn tcp_probe(addr: SocketAddr, timeout: Duration) -> bool {
    matches!(
        tokio::time::timeout(timeout, TcpStream::connect(addr)).await,
        Ok(Ok(_))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hysteresis_flips_only_after_the_thresholds_in_a_row() {
        let mut h = Hysteresis::new(2, 3);
        // Two failures, a success in between: still healthy.
        assert_eq!(h.observe(false), None);
        assert_eq!(h.observe(false), None);
        assert_eq!(h.observe(true), None);
        assert_eq!(h.observe(false), None);
        assert_eq!(h.observe(false), None);
        assert_eq!(h.observe(false), Some(false), "third failure in a row");
        assert_eq!(h.observe(false), None, "already unhealthy");
        assert_eq!(h.observe(true), None);
        assert_eq!(h.observe(false), None, "a failure resets the successes");
        assert_eq!(h.observe(true), None);
        assert_eq!(h.observe(true), Some(true), "second success in a row");
        assert_eq!(h.observe(true), None, "already healthy");
    }
}
