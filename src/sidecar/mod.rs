//! The supervisor: connect (retrying forever), ensure the topology, run the consumers,
//! reconnect when the connection or a consumer is lost, and drain on shutdown.
//!
//! Recovery is our own loop rather than lapin's `enable_auto_recover`: a lost connection
//! ends the session, every consumer channel with it, and the next session starts from a new
//! connection, redeclaring the topology. Deliveries in flight on the old channels are
//! redelivered by the broker; their late settles return `Ok(false)` and are not counted.
//! One path handles every kind of loss (closed connection, broker restart, consumer
//! cancelled by the broker, a channel-level error), which lapin's recovery does not cover
//! (it does not recover channels closed by soft errors) and which is simple to test.
//!
//! Shutdown, after linkerd2-proxy and mini-redis: cancel (stop taking deliveries: basic.cancel
//! every consumer, release deliveries still waiting for a backend), drain (let requests in
//! flight finish and settle, within `shutdown.grace_ms`), then settle what is left
//! (abandon the requests and nack-requeue their deliveries) and close.

mod consumers;
mod pause;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use lapin::{Channel, Connection, types::ShortString};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    admin::{AdminServer, ReadinessState, UnusableBackend},
    amqp::{
        self,
        consumer::ConsumerExit,
        publisher::Publisher,
        topology::{self, TopologyError},
    },
    backend::{
        health::HealthChecker,
        probe::Prober,
        upstreams::{BuildError, Upstreams},
    },
    balance::{EjectionClock, Unusable},
    capacity::{Capacity, LookaheadController},
    config::{Config, redact_url},
    dispatch::Dispatcher,
    retry::{Backoff, Jitter},
};

/// A session that lasted this long resets the reconnect backoff.
const STABLE_SESSION: Duration = Duration::from_secs(10);

/// Longest wait for a channel or connection close.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// How often a paused sidecar probes backends that have no health check.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// How long after the drain deadline abandoned deliveries get to be nack-requeued.
const SETTLE_AFTER_ABORT: Duration = Duration::from_secs(5);

/// Why the sidecar could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    /// The topology is wrong in a way retrying cannot fix.
    #[error(transparent)]
    Topology(#[from] TopologyError),
    /// The admin server could not bind.
    #[error("cannot bind the admin server on {addr}: {source}")]
    AdminBind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The backends could not be built.
    #[error(transparent)]
    Backends(#[from] BuildError),
    /// The publisher of dead-letter and delay copies could not be built.
    #[error("cannot build the dead-letter publisher: {0}")]
    DeadLetter(String),
}

/// The broker reconnect delay: [`Backoff`] with equal jitter, counting failures since the
/// last stable session.
struct ReconnectDelay {
    backoff: Backoff,
    failures: u32,
}

impl ReconnectDelay {
    fn next(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        self.backoff.delay(self.failures, &mut rand::rng())
    }
    fn reset(&mut self) {
        self.failures = 0;
    }

    /// Logs `what` with the delay, then waits it out; false if shutdown came first.
    async fn wait(&mut self, what: &str, error: &str, shutdown: &CancellationToken) -> bool {
        let wait = self.next();
        tracing::warn!(error = %error, retry_in_ms = wait.as_millis() as u64, "{what}");
        tokio::select! {
            () = tokio::time::sleep(wait) => true,
            () = shutdown.cancelled() => false,
        }
    }
}

/// What ended one connection's session.
enum SessionEnd {
    /// Shutdown: the connection and consumer channels stay open for the drain.
    Shutdown(Vec<Channel>),
    /// Lost the connection or a consumer; reconnect.
    Lost(String),
    /// Lost the connection to a frame the client could not parse; reconnect, and watch for
    /// the same message doing it again.
    Unparsable(String),
}

/// Connections lost in a row to an unparsable frame before the sidecar reports a poison
/// message: one can be chance, two in a row with nothing in between is the same delivery.
const UNPARSABLE_STREAK: u32 = 2;

/// A configured sidecar with its admin server bound. [`Sidecar::run`] does the work.
pub struct Sidecar {
    config: Config,
    health: Arc<ReadinessState>,
    /// Taken by `run()`.
    admin: Option<AdminServer>,
    admin_addr: SocketAddr,
    dispatcher: Arc<Dispatcher>,
    /// The backends, their pool and client (shared with the dispatcher).
    upstreams: Arc<Upstreams>,
    /// The publisher of dead-letter and delay copies (shared with the dispatcher): its
    /// blocked state, and closing it.
    publisher: Arc<Publisher>,
    /// How many consumers to keep open, and why.
    capacity: Arc<Capacity>,
    /// Per-delivery tasks, across reconnects, so the drain waits for all of them.
    tracker: TaskTracker,
    draining: CancellationToken,
    abort: CancellationToken,
    /// Active health checks (taken by `run()`), if any backend has a health path.
    checker: Option<HealthChecker>,
    /// Backends without a health check, with their address, probed by TCP while paused.
    probe_targets: Vec<(usize, Option<SocketAddr>)>,
    /// Probes unreachable backends (taken by `run()`).
    prober: Option<Prober>,
}

impl Sidecar {
    /// Installs metrics, binds the admin server and builds the backend pool. Does not
    /// connect to the broker: [`Sidecar::run`] does, and keeps retrying.
    ///
    /// `config` should have passed [`Config::validate`].
    ///
    /// # Errors
    /// [`SidecarError::AdminBind`] when `admin.listen` cannot be bound, and build errors.
    pub async fn bind(config: Config) -> Result<Self, SidecarError> {
        let handle = crate::metrics::install();
        let health = Arc::new(ReadinessState::default());
        // Publish every gauge from the start, so dashboards and alerts see 0, not nothing.
        health.set_connected(false);
        health.set_consumers(0);
        health.set_paused(false);
        crate::metrics::init_bug_counters();
        let admin = AdminServer::bind(config.admin.listen, handle, Arc::clone(&health))
            .await
            .map_err(|source| SidecarError::AdminBind {
                addr: config.admin.listen,
                source,
            })?;
        let admin_addr = admin
            .local_addr()
            .map_err(|source| SidecarError::AdminBind {
                addr: config.admin.listen,
                source,
            })?;
        let (upstreams, watchers) = Upstreams::new(&config)?;
        let publisher =
            Arc::new(Publisher::new(&config).map_err(|e| SidecarError::DeadLetter(e.to_string()))?);
        let capacity = Capacity::new(&config);
        let draining = CancellationToken::new();
        let abort = CancellationToken::new();
        let dispatcher = Arc::new(Dispatcher::new(
            &config,
            Arc::clone(&upstreams),
            Arc::clone(&publisher),
            Arc::clone(&capacity),
            draining.clone(),
            abort.clone(),
        ));
        health.set_consumer_target(capacity.current());
        health.set_capacity(Arc::clone(&capacity));
        if let Some(budget) = config.memory_budget() {
            let max_body = config.backend.max_body_bytes as u64;
            let slots = u64::from(config.consumer_count());
            tracing::info!(
                budget_bytes = budget.bytes,
                source = ?budget.source,
                max_body_bytes = max_body,
                "memory budget for message bodies"
            );
            if slots.saturating_mul(max_body) > budget.bytes {
                tracing::warn!(
                    budget_bytes = budget.bytes,
                    consumers = slots,
                    max_body_bytes = max_body,
                    "the memory budget is smaller than consumers x backend.max_body_bytes: while large bodies are held, fewer consumers are open (see amqp_sidecar_held_bytes)"
                );
            }
        }
        Ok(Self {
            config,
            health,
            admin: Some(admin),
            admin_addr,
            dispatcher,
            upstreams,
            publisher,
            capacity,
            tracker: TaskTracker::new(),
            draining,
            abort,
            checker: watchers.checker,
            probe_targets: watchers.pause_probes,
            prober: Some(watchers.prober),
        })
    }

    /// The admin server's bound address.
    #[must_use]
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The readiness state.
    #[must_use]
    pub fn health(&self) -> Arc<ReadinessState> {
        Arc::clone(&self.health)
    }

    /// Runs until `shutdown` is cancelled, then drains and closes.
    ///
    /// # Errors
    /// [`SidecarError::Topology`] when the first topology check fails permanently (a queue
    /// with other arguments, or a missing queue with `amqp.declare: false`). Later failures,
    /// and every connection failure, are retried forever.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), SidecarError> {
        let admin_stop = CancellationToken::new();
        let admin = self
            .admin
            .take()
            .map(|a| tokio::spawn(a.run(admin_stop.clone())));
        let checker = self
            .checker
            .take()
            .map(|c| tokio::spawn(c.run(admin_stop.clone())));
        let clock = tokio::spawn(
            EjectionClock::new(Arc::clone(&self.upstreams.pool)).run(admin_stop.clone()),
        );
        let prober = self
            .prober
            .take()
            .map(|p| tokio::spawn(p.run(admin_stop.clone())));
        // Readiness follows the number of usable backends, and says which are out and why.
        let mirror = {
            let (health, mut usable) = (Arc::clone(&self.health), self.upstreams.pool.usable());
            let upstreams = Arc::clone(&self.upstreams);
            tokio::spawn(async move {
                loop {
                    health.set_usable_backends(*usable.borrow_and_update());
                    let labels = &upstreams.backends;
                    health.set_unusable(
                        upstreams
                            .pool
                            .unusable_now()
                            .into_iter()
                            .map(|(i, why)| UnusableBackend {
                                backend: labels[i].label.clone(),
                                reason: match why {
                                    Unusable::Unreachable(e) => format!("unreachable: {e}"),
                                    Unusable::Unhealthy => "unhealthy".to_owned(),
                                    Unusable::Ejected => "ejected".to_owned(),
                                },
                            })
                            .collect(),
                    );
                    if usable.changed().await.is_err() {
                        return;
                    }
                }
            })
        };
        // With `amqp.consumers: 0`, the consumer target follows the backends' limits (learned
        // ones change) and a lookahead sized from what is measured.
        let adaptive = self.config.amqp.consumers == 0;
        let slots = adaptive.then(|| {
            let (capacity, mut slots) = (Arc::clone(&self.capacity), self.upstreams.pool.slots());
            tokio::spawn(async move {
                loop {
                    capacity.set_slots((*slots.borrow_and_update()).max(1));
                    if slots.changed().await.is_err() {
                        return;
                    }
                }
            })
        });
        let lookahead = (adaptive && self.config.amqp.max_lookahead != Some(0)).then(|| {
            tokio::spawn(
                LookaheadController::new(
                    Arc::clone(&self.capacity),
                    self.config.amqp.max_lookahead,
                )
                .run(admin_stop.clone()),
            )
        });
        // Readiness warns while the broker blocks the dead-letter connection.
        let blocked = {
            let (health, mut blocked) = (Arc::clone(&self.health), self.publisher.blocked());
            tokio::spawn(async move {
                loop {
                    health.set_dead_letter_blocked(blocked.borrow_and_update().clone());
                    if blocked.changed().await.is_err() {
                        return;
                    }
                }
            })
        };
        // Shutdown starts: readiness goes, and deliveries waiting for a backend are released.
        let watcher = {
            let (health, draining, shutdown) = (
                Arc::clone(&self.health),
                self.draining.clone(),
                shutdown.clone(),
            );
            tokio::spawn(async move {
                shutdown.cancelled().await;
                health.set_draining();
                draining.cancel();
            })
        };
        let result = self.supervise(&shutdown).await;
        let outcome = match result {
            Ok(Some((conn, channels))) => {
                self.drain().await;
                for ch in channels {
                    let _ = tokio::time::timeout(
                        CLOSE_TIMEOUT,
                        ch.close(200, ShortString::from("shutdown")),
                    )
                    .await;
                }
                close_quietly(&conn, "shutdown").await;
                Ok(())
            }
            Ok(None) => {
                self.drain().await;
                Ok(())
            }
            Err(e) => Err(e),
        };
        self.publisher.close().await;
        self.health.set_connected(false);
        self.health.set_consumers(0);
        watcher.abort();
        mirror.abort();
        if let Some(slots) = slots {
            slots.abort();
        }
        blocked.abort();
        admin_stop.cancel();
        if let Some(checker) = checker {
            let _ = checker.await;
        }
        let _ = clock.await;
        if let Some(lookahead) = lookahead {
            let _ = lookahead.await;
        }
        if let Some(prober) = prober {
            let _ = prober.await;
        }
        if let Some(admin) = admin {
            let _ = admin.await;
        }
        tracing::info!("stopped");
        outcome
    }

    /// Waits for in-flight deliveries within the grace period, then abandons the rest.
    async fn drain(&self) {
        self.tracker.close();
        let grace = Duration::from_millis(self.config.shutdown.grace_ms);
        let pending = self.tracker.len();
        if pending > 0 {
            tracing::info!(
                in_flight = pending,
                grace_ms = self.config.shutdown.grace_ms,
                "draining in-flight deliveries"
            );
        }
        let settled_within =
            |d: Duration| async move { tokio::time::timeout(d, self.tracker.wait()).await.is_ok() };
        if !settled_within(grace).await {
            tracing::warn!(
                unfinished = self.tracker.len(),
                "shutdown grace period expired; requeueing unfinished deliveries without counting an attempt"
            );
            self.abort.cancel();
            if !settled_within(SETTLE_AFTER_ABORT).await {
                tracing::error!(
                    unfinished = self.tracker.len(),
                    "deliveries still unsettled; the broker requeues them when the connection closes"
                );
            }
        }
    }

    /// Connects and consumes, reconnecting on loss, until shutdown. Returns the open
    /// connection and consumer channels (for the drain), or `None` if shutdown came while
    /// disconnected.
    async fn supervise(
        &self,
        shutdown: &CancellationToken,
    ) -> Result<Option<(Connection, Vec<Channel>)>, SidecarError> {
        let cfg = &self.config;
        let url = redact_url(&cfg.amqp.url);
        let mut delay = ReconnectDelay {
            backoff: Backoff::doubling(
                Duration::from_millis(cfg.amqp.reconnect_initial_ms),
                Duration::from_millis(cfg.amqp.reconnect_max_ms),
                Jitter::Equal,
            ),
            failures: 0,
        };
        let mut sessions = 0u64;
        let mut attempt = 0u64;
        // Sessions in a row that ended on an unparsable frame.
        let mut unparsable = 0u32;
        loop {
            if shutdown.is_cancelled() {
                return Ok(None);
            }
            attempt += 1;
            let connected = tokio::select! {
                () = shutdown.cancelled() => return Ok(None),
                c = amqp::connect(&cfg.amqp.url, "amqp-sidecar") => c,
            };
            let conn = match connected {
                Ok(c) => c,
                Err(e) => {
                    let reason = amqp::describe(&e);
                    self.health
                        .set_error(format!("cannot connect to {url}: {reason}"));
                    let what = format!("cannot connect to the broker at {url} (attempt {attempt})");
                    if !delay.wait(&what, &reason, shutdown).await {
                        return Ok(None);
                    }
                    continue;
                }
            };
            if let Err(e) = topology::ensure(&conn, cfg).await {
                close_quietly(&conn, "topology error").await;
                if e.is_permanent() && sessions == 0 {
                    return Err(e.into());
                }
                self.health.set_error(e.to_string());
                if !delay
                    .wait("topology check failed", &e.to_string(), shutdown)
                    .await
                {
                    return Ok(None);
                }
                continue;
            }
            self.health.set_connected(true);
            if sessions > 0 {
                crate::metrics::connection_recovered();
                tracing::info!(%url, "connection recovered; consuming again");
            }
            sessions += 1;
            attempt = 0;
            let session_started = std::time::Instant::now();
            let end = self.consume(&conn, shutdown).await;
            match &end {
                SessionEnd::Unparsable(reason) => {
                    unparsable += 1;
                    crate::metrics::unparsable_frame();
                    if unparsable >= UNPARSABLE_STREAK {
                        tracing::error!(
                            times_in_a_row = unparsable,
                            error = %reason,
                            queue = %cfg.amqp.queue,
                            "the same delivery keeps breaking the connection: a message the AMQP client cannot parse (a poison message) is redelivered after every reconnect; move it off the queue (e.g. a shovel, or a management-UI get with reject, requeue false)"
                        );
                    }
                }
                _ => unparsable = 0,
            }
            match end {
                SessionEnd::Shutdown(channels) => return Ok(Some((conn, channels))),
                SessionEnd::Lost(reason) | SessionEnd::Unparsable(reason) => {
                    self.health.set_connected(false);
                    self.health.set_error(format!("reconnecting: {reason}"));
                    close_quietly(&conn, "reconnecting").await;
                    // A session that ran a while was healthy: start the backoff over. One that
                    // failed at once (a queue deleted again and again) keeps backing off.
                    if session_started.elapsed() >= STABLE_SESSION {
                        delay.reset();
                    }
                    let what = "lost the broker connection or a consumer; reconnecting";
                    if !delay.wait(what, &reason, shutdown).await {
                        return Ok(None);
                    }
                }
            }
        }
    }

    /// Runs the consumers of one connection until shutdown or the first loss: as many as
    /// [`Capacity::target`] says, following it, and none while no backend is usable.
    async fn consume(&self, conn: &Connection, shutdown: &CancellationToken) -> SessionEnd {
        let cfg = &self.config;
        let mut set = consumers::ConsumerSet::new(
            conn,
            &cfg.amqp.queue,
            cfg.amqp.prefetch,
            &self.dispatcher,
            &self.tracker,
        );
        let mut target = self.capacity.target();
        let mut usable = self.upstreams.pool.usable();
        loop {
            // Consuming.
            let want = *target.borrow_and_update();
            if let Err(reason) = set.resize(&want, shutdown).await {
                set.stop_all().await;
                self.capacity.consumers_gone();
                return SessionEnd::Lost(reason);
            }
            self.health.set_consumer_target(want);
            self.set_consumers(set.running());
            tracing::info!(consumers = set.running(), prefetch = cfg.amqp.prefetch, queue = %cfg.amqp.queue, "consuming");
            enum Why {
                Shutdown,
                Pause,
                Lost(String),
                Exit(ConsumerExit),
            }
            let why = loop {
                tokio::select! {
                    biased;
                    () = shutdown.cancelled() => break Why::Shutdown,
                    // The guard `wait_for` returns is not Send: drop it in the branch.
                    true = async { usable.wait_for(|u| *u == 0).await.is_ok() } => break Why::Pause,
                    Ok(()) = target.changed() => {
                        let want = *target.borrow_and_update();
                        if let Err(reason) = set.resize(&want, shutdown).await {
                            break Why::Lost(reason);
                        }
                        self.health.set_consumer_target(want);
                        self.set_consumers(set.running());
                        tracing::debug!(consumers = set.running(), slots = want.slots, lookahead = want.lookahead, "consumer target changed");
                    }
                    joined = set.next_exit() => match joined {
                        // Replace it (a delivery waiting out a backoff took it along).
                        consumers::Joined::Retired => {
                            let want = *target.borrow();
                            if let Err(reason) = set.resize(&want, shutdown).await {
                                break Why::Lost(reason);
                            }
                            self.set_consumers(set.running());
                        }
                        consumers::Joined::Exit(exit) => break Why::Exit(exit),
                    },
                }
            };
            set.stop_all().await;
            self.set_consumers(0);
            self.capacity.consumers_gone();
            let channels = set.channels();
            match why {
                Why::Shutdown => return SessionEnd::Shutdown(channels),
                Why::Exit(ConsumerExit::Stopped) if shutdown.is_cancelled() => {
                    return SessionEnd::Shutdown(channels);
                }
                Why::Exit(ConsumerExit::CancelledByBroker) => {
                    return SessionEnd::Lost("consumer cancelled by the broker".into());
                }
                Why::Lost(reason) | Why::Exit(ConsumerExit::Failed(reason)) => {
                    return SessionEnd::Lost(reason);
                }
                Why::Exit(ConsumerExit::Unparsable(reason)) => {
                    return SessionEnd::Unparsable(reason);
                }
                Why::Exit(ConsumerExit::Stopped | ConsumerExit::Retired) => {
                    return SessionEnd::Lost("consumer stopped".into());
                }
                Why::Pause => {}
            }

            // Paused: no backend is usable. Every consumer is cancelled, so the messages go to
            // other pods instead of burning attempts here; probe until a backend answers.
            tracing::warn!(
                "no usable backend (all unhealthy, ejected or unreachable): consumption paused"
            );
            self.health.set_paused(true);
            let probe_stop = CancellationToken::new();
            let probe = tokio::spawn(pause::probe_unusable(
                Arc::clone(&self.upstreams.pool),
                self.probe_targets.clone(),
                probe_stop.clone(),
            ));
            let resumed = self.wait_for_backend(&mut usable, conn, shutdown).await;
            probe_stop.cancel();
            let _ = probe.await;
            self.health.set_paused(false);
            match resumed {
                None => return SessionEnd::Shutdown(set.channels()),
                Some(Err(reason)) => return SessionEnd::Lost(reason),
                Some(Ok(())) => {}
            }
            tracing::info!("a backend is usable again: consumption resumed");
        }
    }
}

impl Sidecar {
    /// Records the subscribed consumers, for readiness, the gauge and the memory budget.
    fn set_consumers(&self, n: usize) {
        self.health.set_consumers(n);
        self.capacity.set_subscribed(n);
    }
}

/// Closes a connection, giving up after [`CLOSE_TIMEOUT`]: a close on a half-dead
/// connection can hang (lapin #409), and the broker cleans up after a dropped socket anyway.
async fn close_quietly(conn: &Connection, why: &str) {
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, conn.close(200, ShortString::from(why))).await;
}
