//! The admin HTTP server: `GET /metrics`, `GET /healthz`, `GET /readyz`.
//!
//! Served with axum's router on hyper's HTTP/1 connection builder, bound before the sidecar
//! connects, so Kubernetes probes get answers while the broker is still unreachable:
//! /healthz 200 (the process runs), /readyz 503 with a JSON body saying why.
//!
//! The admin port may be reachable from the whole pod network, so it must not be able to
//! starve the sidecar of file descriptors: at most [`MAX_CONNECTIONS`] connections are open
//! at once (further ones wait in the kernel's accept queue), and a connection that has not
//! sent a request's headers within [`HEADER_READ_TIMEOUT`] (a slow drip, or an idle
//! keep-alive) is closed. `axum::serve` has neither knob, hence the accept loop here.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{
    Json, Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::capacity::{Capacity, MemoryState, Target};

/// Most admin connections open at once. Prometheus and the kubelet need a handful; 64 leaves
/// room for several scrapers and probes, and bounds the descriptors an attacker can hold.
pub const MAX_CONNECTIONS: usize = 64;

/// Longest time a connection may take to send a request's headers, idle keep-alive time
/// included (5 s; a kubelet probe's default timeout is 1 s).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The sidecar's readiness inputs, shared between the supervisor and the admin server.
#[derive(Debug, Default)]
pub struct ReadinessState {
    connected: AtomicBool,
    consumers: AtomicUsize,
    consumer_target: Mutex<Target>,
    capacity: Mutex<Option<Arc<Capacity>>>,
    usable_backends: AtomicUsize,
    draining: AtomicBool,
    paused: AtomicBool,
    last_error: Mutex<Option<String>>,
    dead_letter_blocked: Mutex<Option<String>>,
    unusable: Mutex<Vec<UnusableBackend>>,
}

/// A backend that takes no requests now, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UnusableBackend {
    /// The backend's label.
    pub backend: String,
    /// `unreachable: <the error>`, `unhealthy` or `ejected`.
    pub reason: String,
}

/// The /readyz answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Readiness {
    /// True when connected, consuming, not draining, with at least one usable backend.
    pub ready: bool,
    /// Connected to the broker.
    pub connected: bool,
    /// Consumers subscribed now.
    pub consumers: usize,
    /// Consumers the sidecar wants: `consumer_target`'s total.
    pub expected_consumers: usize,
    /// Why it wants that many: consumers for the backend slots, and consumers opened in
    /// place of deliveries waiting out a backoff (see [`crate::capacity`]).
    pub consumer_target: Target,
    /// With a memory budget: the bytes of message bodies held, the budget, and whether it
    /// holds consumers back (it never makes the sidecar unready).
    pub memory: Option<MemoryState>,
    /// Backends that can take requests.
    pub usable_backends: usize,
    /// Shutdown has started.
    pub draining: bool,
    /// Consumption is paused: no backend is usable.
    pub paused: bool,
    /// The backends that take no requests now, and why.
    pub unusable_backends: Vec<UnusableBackend>,
    /// Why not ready (empty when ready).
    pub reasons: Vec<String>,
    /// Problems that do not make the sidecar unready, because good messages still flow:
    /// the broker blocking the dead-letter connection (a resource alarm). A broker-wide
    /// alarm must not turn every pod unready and stall rollouts.
    pub warnings: Vec<String>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl ReadinessState {
    /// Records whether the broker connection is up.
    pub fn set_connected(&self, up: bool) {
        self.connected.store(up, Ordering::SeqCst);
        crate::metrics::set_connected(up);
        if up {
            *lock(&self.last_error) = None;
        }
    }

    /// Records the number of subscribed consumers.
    pub fn set_consumers(&self, n: usize) {
        self.consumers.store(n, Ordering::SeqCst);
        crate::metrics::set_consumers(n);
    }

    /// Gives /readyz the memory state of `capacity`.
    pub fn set_capacity(&self, capacity: Arc<Capacity>) {
        *lock(&self.capacity) = Some(capacity);
    }

    /// Records how many consumers the sidecar wants, and why.
    pub fn set_consumer_target(&self, target: Target) {
        *lock(&self.consumer_target) = target;
    }

    /// Records how many backends can take requests.
    pub fn set_usable_backends(&self, n: usize) {
        self.usable_backends.store(n, Ordering::SeqCst);
    }

    /// Records whether consumption is paused for lack of a usable backend.
    pub fn set_paused(&self, paused: bool) {
        // The gauge first, so whoever sees the readiness flag also sees the metric.
        crate::metrics::set_paused(paused);
        self.paused.store(paused, Ordering::SeqCst);
    }

    /// Marks shutdown as started (readiness turns false for good).
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Records which backends take no requests now, and why.
    pub fn set_unusable(&self, unusable: Vec<UnusableBackend>) {
        *lock(&self.unusable) = unusable;
    }

    /// Records whether the broker blocks the dead-letter connection, and why (shown on
    /// /readyz as a warning).
    pub fn set_dead_letter_blocked(&self, reason: Option<String>) {
        *lock(&self.dead_letter_blocked) = reason;
    }

    /// Records the latest problem, shown on /readyz until the connection is back.
    pub fn set_error(&self, e: impl Into<String>) {
        *lock(&self.last_error) = Some(e.into());
    }

    /// The current readiness and its reasons.
    #[must_use]
    pub fn readiness(&self) -> Readiness {
        let connected = self.connected.load(Ordering::SeqCst);
        let consumers = self.consumers.load(Ordering::SeqCst);
        let consumer_target = *lock(&self.consumer_target);
        let memory = lock(&self.capacity).as_ref().and_then(|c| c.memory());
        let usable_backends = self.usable_backends.load(Ordering::SeqCst);
        let draining = self.draining.load(Ordering::SeqCst);
        let paused = self.paused.load(Ordering::SeqCst);
        let unusable_backends = lock(&self.unusable).clone();
        let mut reasons = Vec::new();
        if paused {
            let why: Vec<String> = unusable_backends
                .iter()
                .map(|u| format!("{} {}", u.backend, u.reason))
                .collect();
            reasons.push(format!(
                "consumption paused: no usable backend ({})",
                if why.is_empty() {
                    "all unhealthy, ejected or unreachable".to_owned()
                } else {
                    why.join("; ")
                }
            ));
        }
        if draining {
            reasons.push("shutting down: draining in-flight deliveries".to_owned());
        }
        if !connected {
            reasons.push("not connected to the broker".to_owned());
        }
        if let Some(e) = lock(&self.last_error).as_ref() {
            reasons.push(e.clone());
        }
        if connected && consumers == 0 && !paused {
            reasons.push("no consumer subscribed".to_owned());
        }
        if usable_backends == 0 {
            reasons.push("no usable backend".to_owned());
        }
        let warnings = lock(&self.dead_letter_blocked)
            .as_ref()
            .map(|reason| {
                format!("the broker blocks the dead-letter connection ({reason}); dead-letters wait and their originals are requeued")
            })
            .into_iter()
            .collect();
        Readiness {
            ready: reasons.is_empty(),
            warnings,
            connected,
            consumers,
            expected_consumers: consumer_target.total() as usize,
            consumer_target,
            memory,
            usable_backends,
            draining,
            paused,
            unusable_backends,
            reasons,
        }
    }
}

#[derive(Clone)]
struct AdminState {
    metrics: PrometheusHandle,
    health: Arc<ReadinessState>,
}

/// The bound admin server.
pub struct AdminServer {
    listener: TcpListener,
    router: Router,
}

impl AdminServer {
    /// Binds `addr` (use port 0 for an ephemeral port).
    ///
    /// # Errors
    /// When the address cannot be bound (in use, permission).
    pub async fn bind(
        addr: SocketAddr,
        metrics: PrometheusHandle,
        health: Arc<ReadinessState>,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let router = Router::new()
            .route("/metrics", get(metrics_handler))
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(readyz_handler))
            .with_state(AdminState { metrics, health });
        Ok(Self { listener, router })
    }

    /// The bound address.
    ///
    /// # Errors
    /// Only if the socket is in a bad state.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `stop` is cancelled, then lets open requests finish (up to 1 s).
    pub async fn run(self, stop: CancellationToken) {
        let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let connections = TaskTracker::new();
        loop {
            let permit = tokio::select! {
                () = stop.cancelled() => break,
                p = Arc::clone(&limit).acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let stream = tokio::select! {
                () = stop.cancelled() => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // EMFILE and friends: wait instead of spinning on the error.
                        tracing::warn!(error = %e, "admin server cannot accept a connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let service = TowerToHyperService::new(self.router.clone());
            let stop = stop.clone();
            connections.spawn(async move {
                let mut builder = hyper::server::conn::http1::Builder::new();
                builder
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT);
                let conn = builder.serve_connection(TokioIo::new(stream), service);
                tokio::pin!(conn);
                tokio::select! {
                    _ = conn.as_mut() => {}
                    () = stop.cancelled() => {
                        conn.as_mut().graceful_shutdown();
                        let _ = tokio::time::timeout(Duration::from_secs(1), conn).await;
                    }
                }
                drop(permit);
            });
        }
        connections.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), connections.wait()).await;
    }
}

async fn metrics_handler(State(s): State<AdminState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
}

async fn readyz_handler(State(s): State<AdminState>) -> impl IntoResponse {
    let r = s.health.readiness();
    let code = if r.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(r))
}
