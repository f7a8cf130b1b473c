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

use crate::{balance::Pool, config::HealthCheck};

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
    pool: Arc<Pool>,
    targets: Vec<Target>,
    client: reqwest::Client,
}

impl HealthChecker {
    /// A checker for `targets` on `pool`.
    ///
    /// # Errors
    /// When the HTTP client cannot be built (a TLS file of `limits` that cannot be used).
    pub fn new(
        pool: Arc<Pool>,
        targets: Vec<Target>,
        limits: &crate::config::BackendLimits,
    ) -> Result<Self, String> {
        crate::tls::install_provider();
        let tls = crate::tls::from_files(
            limits.ca_file.as_deref(),
            limits.client_cert_file.as_deref(),
            limits.client_key_file.as_deref(),
        )
        .map_err(|e| e.to_string())?;
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .pool_max_idle_per_host(1)
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self {
            pool,
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
            let (pool, client, stop) = (Arc::clone(&self.pool), self.client.clone(), stop.clone());
            set.spawn(async move { check_loop(target, pool, client, stop).await });
        }
        while set.join_next().await.is_some() {}
    }
}

async fn check_loop(t: Target, pool: Arc<Pool>, client: reqwest::Client, stop: CancellationToken) {
    let mut healthy = true;
    let (mut successes, mut failures) = (0u32, 0u32);
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
        if ok {
            successes += 1;
            failures = 0;
        } else {
            failures += 1;
            successes = 0;
        }
        if healthy && failures >= t.check.unhealthy_threshold {
            healthy = false;
            let why = match result {
                Ok(r) => format!("HTTP {}", r.status()),
                Err(e) => e.without_url().to_string(),
            };
            tracing::warn!(backend = %t.label, failures, error = %why, "backend failed its health checks: unhealthy");
        } else if !healthy && successes >= t.check.healthy_threshold {
            healthy = true;
            tracing::info!(backend = %t.label, successes, "backend passed its health checks: healthy again");
        } else {
            continue;
        }
        // The pool publishes it (the health gauge, readiness, pausing).
        pool.set_healthy(t.index, healthy);
    }
}

/// Tries a TCP connect to `addr` within `timeout`.
pub async fn tcp_probe(addr: SocketAddr, timeout: Duration) -> bool {
    matches!(
        tokio::time::timeout(timeout, TcpStream::connect(addr)).await,
        Ok(Ok(_))
    )
}
