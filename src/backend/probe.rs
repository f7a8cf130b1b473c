//! Probing unreachable backends until they answer.
//!
//! A backend turns unreachable when a request to it is not delivered (refused, connect
//! timeout, DNS or TLS failure; see [`BackendError::NotDelivered`](super::BackendError)).
//! The [`Prober`] then probes it on a capped exponential backoff, from
//! [`FIRST_PROBE`] (100 ms) up to [`MAX_PROBE_INTERVAL`] (500 ms), and marks it reached on the
//! first success, so a worker that restarts in a few seconds gets deliveries again within
//! half a second of listening. The probe never consumes a message:
//! - with a health path: its health check (GET, 2xx);
//! - an `http://` backend without one: a TCP connect;
//! - an `https://` backend without one: a `HEAD` request, since only a TLS handshake shows
//!   that the sidecar can reach it (any HTTP answer counts).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::net::TcpStream;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::balance::Pool;

/// Delay before the first probe of a backend that just turned unreachable (100 ms).
pub const FIRST_PROBE: Duration = Duration::from_millis(100);

/// Longest delay between two probes of one backend (500 ms); also each probe's timeout.
pub const MAX_PROBE_INTERVAL: Duration = Duration::from_millis(500);

/// How one backend is probed.
#[derive(Debug, Clone)]
pub enum Probe {
    /// GET this health-check URL; 2xx is reached.
    HealthCheck(reqwest::Url),
    /// A TCP connect to the URL's host and port.
    Tcp {
        /// Host name or address.
        host: String,
        /// Port.
        port: u16,
    },
    /// A HEAD request to the backend URL; any HTTP answer is reached.
    Head(reqwest::Url),
}

impl Probe {
    /// The probe for a backend at `url`, with its health-check URL if it has one.
    #[must_use]
    pub fn for_backend(url: &reqwest::Url, health: Option<reqwest::Url>) -> Self {
        match health {
            Some(h) => Self::HealthCheck(h),
            None if url.scheme() == "https" => Self::Head(url.clone()),
            None => Self::Tcp {
                // An IPv6 literal without its brackets, so it is not looked up as a name.
                host: match url.host() {
                    Some(url::Host::Ipv6(a)) => a.to_string(),
                    Some(h) => h.to_string(),
                    None => "localhost".to_owned(),
                },
                port: url.port_or_known_default().unwrap_or(80),
            },
        }
    }

    /// Runs the probe once: `Ok(())` when the backend was reached, else why not.
    async fn run(&self, client: &reqwest::Client) -> Result<(), String> {
        let timed = |r: Result<Result<(), String>, _>| {
            r.unwrap_or_else(|_| {
                Err(format!(
                    "probe timed out after {} ms",
                    MAX_PROBE_INTERVAL.as_millis()
                ))
            })
        };
        match self {
            Self::Tcp { host, port } => timed(
                tokio::time::timeout(MAX_PROBE_INTERVAL, async {
                    TcpStream::connect((host.as_str(), *port))
                        .await
                        .map(drop)
                        .map_err(|e| e.to_string())
                })
                .await,
            ),
            Self::HealthCheck(url) => {
                match client
                    .get(url.clone())
                    .timeout(MAX_PROBE_INTERVAL)
                    .send()
                    .await
                {
                    Ok(r) if r.status().is_success() => Ok(()),
                    Ok(r) => Err(format!("health check answered HTTP {}", r.status())),
                    Err(e) => Err(super::error_chain(&e.without_url())),
                }
            }
            Self::Head(url) => client
                .head(url.clone())
                .timeout(MAX_PROBE_INTERVAL)
                .send()
                .await
                .map(drop)
                .map_err(|e| super::error_chain(&e.without_url())),
        }
    }
}

/// One backend the prober may probe.
#[derive(Debug, Clone)]
pub struct ProbeTarget {
    /// Index of the backend in the pool.
    pub index: usize,
    /// Label, for logs.
    pub label: String,
    /// How to probe it.
    pub probe: Probe,
}

/// The prober task: probes every unreachable backend until it answers.
pub struct Prober {
    pool: Arc<Pool>,
    targets: Vec<ProbeTarget>,
    client: reqwest::Client,
}

impl Prober {
    /// A prober for `targets` on `pool`; `client` makes the HTTP probes (it must have the
    /// backends' TLS settings).
    #[must_use]
    pub fn new(pool: Arc<Pool>, targets: Vec<ProbeTarget>, client: reqwest::Client) -> Self {
        Self {
            pool,
            targets,
            client,
        }
    }

    /// Probes unreachable backends until `stop` is cancelled: one task per unreachable
    /// backend, which ends when the backend is reached.
    pub async fn run(self, stop: CancellationToken) {
        let probing: Arc<Vec<AtomicBool>> = Arc::new(
            self.targets
                .iter()
                .map(|_| AtomicBool::new(false))
                .collect(),
        );
        let tasks = TaskTracker::new();
        loop {
            for (i, _) in self.pool.unreachable_now() {
                let Some(slot) = self.targets.iter().position(|t| t.index == i) else {
                    continue;
                };
                if probing[slot].swap(true, Ordering::SeqCst) {
                    continue;
                }
                let (pool, target, client, stop, probing) = (
                    Arc::clone(&self.pool),
                    self.targets[slot].clone(),
                    self.client.clone(),
                    stop.clone(),
                    Arc::clone(&probing),
                );
                tasks.spawn(async move {
                    probe_until_reached(&pool, &target, &client, &stop, &probing[slot]).await;
                });
            }
            tokio::select! {
                () = stop.cancelled() => break,
                () = self.pool.turned_unreachable() => {}
            }
        }
        tasks.close();
        tasks.wait().await;
    }
}

/// Probes `target` until it is reached, is no longer unreachable, or `stop`. Clears
/// `probing` before it marks the backend reached, so a refusal right after (a request that
/// started before the return) finds no probe running and starts a new one.
async fn probe_until_reached(
    pool: &Pool,
    target: &ProbeTarget,
    client: &reqwest::Client,
    stop: &CancellationToken,
    probing: &AtomicBool,
) {
    let done = || probing.store(false, Ordering::SeqCst);
    let mut delay = FIRST_PROBE;
    let mut last_error = String::new();
    loop {
        tokio::select! {
            () = stop.cancelled() => return done(),
            () = tokio::time::sleep(delay) => {}
        }
        if !pool.is_unreachable(target.index) {
            return done();
        }
        match target.probe.run(client).await {
            Ok(()) => {
                tracing::info!(backend = %target.label, "probe reached the backend: it takes deliveries again");
                done();
                pool.reached(target.index);
                return;
            }
            Err(e) => {
                if e != last_error {
                    tracing::debug!(backend = %target.label, error = %e, "backend still unreachable");
                    last_error = e;
                }
            }
        }
        delay = (delay * 2).min(MAX_PROBE_INTERVAL);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::{balance, config::EjectionConfig};

    async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A backend re-marked unreachable right after a probe reached it is probed again: the
    /// probe task lets go of the backend before it marks it reached, so the new mark finds
    /// no probe running and starts one. Also: an IPv6 literal is probed as an address.
    #[tokio::test]
    async fn a_backend_marked_again_after_it_was_reached_is_probed_again() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move { while listener.accept().await.is_ok() {} });
        let pool = Pool::new(
            &[(1, 1)],
            balance::strategy(crate::config::BalancerKind::LeastInFlight),
            EjectionConfig::default(),
            balance::Hooks::none(),
        );
        let url = reqwest::Url::parse(&format!("http://127.0.0.1:{port}/")).expect("url");
        let target = ProbeTarget {
            index: 0,
            label: "b".into(),
            probe: Probe::for_backend(&url, None),
        };
        let stop = CancellationToken::new();
        crate::tls::install_provider();
        let prober = tokio::spawn(
            Prober::new(Arc::clone(&pool), vec![target], reqwest::Client::new()).run(stop.clone()),
        );
        for round in 0..20 {
            pool.mark_unreachable(0, "refused");
            wait_for(&format!("reached, round {round}"), || {
                pool.unreachable_now().is_empty()
            })
            .await;
        }
        stop.cancel();
        prober.await.expect("prober");

        let v6 = reqwest::Url::parse("http://[::1]:8080/").expect("url");
        match Probe::for_backend(&v6, None) {
            Probe::Tcp { host, port } => assert_eq!((host.as_str(), port), ("::1", 8080)),
            other => panic!("{other:?}"),
        }
    }
}
