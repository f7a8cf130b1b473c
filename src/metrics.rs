//! Metric names, units and help text, in one place. The names are a contract (see README).
//!
//! The Prometheus recorder is process-global (the `metrics` facade allows one), so
//! [`install`] installs it once and hands every caller the same [`PrometheusHandle`].
//! Labels have bounded cardinality: queue names, backend names, reasons and outcomes only.
//! Handles for the hot path are resolved once per queue or backend ([`QueueMetrics`],
//! [`BackendMetrics`]) so a delivery does not pay for label lookups.

use std::{sync::OnceLock, time::Duration};

use metrics::{
    Counter, Gauge, Histogram, Unit, counter, describe_counter, describe_gauge, describe_histogram,
    gauge, histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Counter: deliveries received from the broker, by `queue`.
pub const DELIVERIES: &str = "amqp_sidecar_deliveries_total";
/// Counter: basic.ack sent after a successful backend response, by `queue`.
pub const ACKS: &str = "amqp_sidecar_acks_total";
/// Counter: deliveries requeued for another attempt (basic.reject requeue=true), by `queue`.
pub const REQUEUES: &str = "amqp_sidecar_requeues_total";
/// Counter: deliveries handed back without counting an attempt (shutdown, no backend), by `queue`.
pub const RELEASES: &str = "amqp_sidecar_releases_total";
/// Counter: messages dead-lettered (published to the DLX and confirmed), by `queue`, `reason`.
pub const DEAD_LETTERS: &str = "amqp_sidecar_dead_letters_total";
/// Counter: dead-letter publishes that failed (the original was requeued), by `queue`.
pub const DEAD_LETTER_FAILURES: &str = "amqp_sidecar_dead_letter_failures_total";
/// Gauge: 1 while the broker blocks the dead-letter connection (a resource alarm,
/// <https://www.rabbitmq.com/docs/connection-blocked>); dead-letters wait, then requeue.
pub const DEAD_LETTER_BLOCKED: &str = "amqp_sidecar_dead_letter_blocked";
/// Gauge: dead-letter copies sent whose confirm came after its caller gave up, still
/// unconfirmed. The originals were requeued; each is acked without a second copy once its
/// copy is confirmed.
pub const DEAD_LETTER_UNCONFIRMED: &str = "amqp_sidecar_dead_letter_unconfirmed";
/// Counter: settlements (ack/nack/reject) that could not be sent because the delivery's
/// channel had closed; the broker redelivers those messages. By `queue`.
pub const SETTLE_FAILURES: &str = "amqp_sidecar_settle_failures_total";
/// Counter: backend requests, by `backend` and `outcome`.
pub const BACKEND_REQUESTS: &str = "amqp_sidecar_backend_requests_total";
/// Histogram: backend request duration in seconds, by `backend`.
pub const BACKEND_DURATION: &str = "amqp_sidecar_backend_request_duration_seconds";
/// Gauge: requests in flight to a backend (its queue length), by `backend`.
pub const BACKEND_IN_FLIGHT: &str = "amqp_sidecar_backend_in_flight";
/// Gauge: 1 while the backend passes its active health checks (always 1 without checks), by `backend`.
pub const BACKEND_HEALTHY: &str = "amqp_sidecar_backend_healthy";
/// Gauge: 1 while the backend is unreachable (a request to it was never delivered: refused,
/// connect timeout, DNS or TLS failure) until a probe reaches it, by `backend`.
pub const BACKEND_UNREACHABLE: &str = "amqp_sidecar_backend_unreachable";
/// Counter: passive ejections of a backend, by `backend`.
pub const BACKEND_EJECTIONS: &str = "amqp_sidecar_backend_ejections_total";
/// Gauge: 1 while consumption is paused because no backend is usable.
pub const PAUSED: &str = "amqp_sidecar_paused";
/// Counter: pauses ended by the pause guard because the pool had a usable backend that the
/// published usable count did not show. Should always read 0; anything else is a bug.
pub const PAUSE_SELF_CORRECTIONS: &str = "amqp_sidecar_pause_self_corrections_total";
/// Counter: connections lost because a frame from the broker could not be parsed (a
/// message the AMQP client cannot decode). Should read 0.
pub const UNPARSABLE_FRAMES: &str = "amqp_sidecar_unparsable_frames_total";
/// Gauge: 1 while connected to the broker.
pub const CONNECTED: &str = "amqp_sidecar_connected";
/// Gauge: consumers currently subscribed.
pub const CONSUMERS: &str = "amqp_sidecar_consumers";
/// Counter: successful reconnections after a lost connection.
pub const CONNECTION_RECOVERIES: &str = "amqp_sidecar_connection_recoveries_total";

/// Outcome label values of [`BACKEND_REQUESTS`].
pub const OUTCOMES: [&str; 6] = [
    "success",
    "retryable",
    "rejected",
    "timeout",
    "connect_error",
    "local_error",
];

/// Histogram buckets for backend request durations, in seconds: 1 ms to 60 s.
const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the global Prometheus recorder (once per process) and describes every metric.
///
/// Also spawns the upkeep task (histogram draining) on first call, so it must run inside
/// a tokio runtime. Later calls return the same handle.
#[must_use]
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full(BACKEND_DURATION.to_owned()),
                    DURATION_BUCKETS,
                )
                .map(|b| b.build_recorder());
            let recorder = match recorder {
                Ok(r) => r,
                // Only fails on an empty bucket list, which is a constant here.
                Err(e) => unreachable!("bad histogram buckets: {e}"),
            };
            let handle = recorder.handle();
            // Another recorder may already be installed (an embedding program's); then our
            // handle renders nothing, which is visible on /metrics rather than a crash.
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
            }
            describe();
            let upkeep = handle.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(5));
                loop {
                    tick.tick().await;
                    upkeep.run_upkeep();
                }
            });
            handle
        })
        .clone()
}

fn describe() {
    describe_counter!(
        DELIVERIES,
        Unit::Count,
        "Deliveries received from the broker."
    );
    describe_counter!(
        ACKS,
        Unit::Count,
        "Deliveries acked after a successful backend response."
    );
    describe_counter!(
        REQUEUES,
        Unit::Count,
        "Deliveries requeued for another attempt after a retryable failure."
    );
    describe_counter!(
        RELEASES,
        Unit::Count,
        "Deliveries handed back to the broker without counting an attempt (shutdown drain)."
    );
    describe_counter!(
        DEAD_LETTERS,
        Unit::Count,
        "Messages published to the dead-letter exchange (confirmed), by reason."
    );
    describe_counter!(
        DEAD_LETTER_FAILURES,
        Unit::Count,
        "Dead-letter publishes that failed; the original was requeued."
    );
    describe_gauge!(
        DEAD_LETTER_BLOCKED,
        Unit::Count,
        "1 while the broker blocks the dead-letter connection (resource alarm), else 0."
    );
    describe_gauge!(
        DEAD_LETTER_UNCONFIRMED,
        Unit::Count,
        "Dead-letter copies sent but not yet confirmed after their wait timed out (originals requeued)."
    );
    describe_counter!(
        SETTLE_FAILURES,
        Unit::Count,
        "Settlements not sent because the delivery's channel had closed; the broker redelivers."
    );
    describe_counter!(
        BACKEND_REQUESTS,
        Unit::Count,
        "Backend requests by outcome (success, retryable, rejected, timeout, connect_error, local_error)."
    );
    describe_histogram!(
        BACKEND_DURATION,
        Unit::Seconds,
        "Backend request duration, from sending the request to reading the response body."
    );
    describe_gauge!(
        BACKEND_IN_FLIGHT,
        Unit::Count,
        "Requests in flight to the backend: its queue length as the balancer sees it."
    );
    describe_gauge!(
        BACKEND_HEALTHY,
        Unit::Count,
        "1 while the backend passes its active health checks (always 1 without checks), else 0."
    );
    describe_gauge!(
        BACKEND_UNREACHABLE,
        Unit::Count,
        "1 while the backend is unreachable (refused, connect timeout, DNS or TLS failure) until a probe reaches it, else 0."
    );
    describe_counter!(
        BACKEND_EJECTIONS,
        Unit::Count,
        "Passive ejections of the backend after consecutive retryable failures."
    );
    describe_gauge!(
        PAUSED,
        Unit::Count,
        "1 while consumption is paused because no backend is usable, else 0."
    );
    describe_counter!(
        PAUSE_SELF_CORRECTIONS,
        Unit::Count,
        "Pauses ended because the pool had a usable backend the published count missed (a bug if not 0)."
    );
    describe_counter!(
        UNPARSABLE_FRAMES,
        Unit::Count,
        "Connections lost because a frame from the broker could not be parsed (a poison message if it repeats)."
    );
    describe_gauge!(
        CONNECTED,
        Unit::Count,
        "1 while connected to the broker, else 0."
    );
    describe_gauge!(
        CONSUMERS,
        Unit::Count,
        "Consumers currently subscribed to the queue."
    );
    describe_counter!(
        CONNECTION_RECOVERIES,
        Unit::Count,
        "Reconnections to the broker after a lost connection."
    );
}

/// Pre-resolved per-queue counters.
#[derive(Clone)]
pub struct QueueMetrics {
    /// [`DELIVERIES`].
    pub deliveries: Counter,
    /// [`ACKS`].
    pub acks: Counter,
    /// [`REQUEUES`].
    pub requeues: Counter,
    /// [`RELEASES`].
    pub releases: Counter,
    /// [`DEAD_LETTER_FAILURES`].
    pub dead_letter_failures: Counter,
    /// [`SETTLE_FAILURES`].
    pub settle_failures: Counter,
    queue: String,
}

impl QueueMetrics {
    /// Resolves the handles for `queue`.
    #[must_use]
    pub fn new(queue: &str) -> Self {
        let q = queue.to_owned();
        Self {
            deliveries: counter!(DELIVERIES, "queue" => q.clone()),
            acks: counter!(ACKS, "queue" => q.clone()),
            requeues: counter!(REQUEUES, "queue" => q.clone()),
            releases: counter!(RELEASES, "queue" => q.clone()),
            dead_letter_failures: counter!(DEAD_LETTER_FAILURES, "queue" => q.clone()),
            settle_failures: counter!(SETTLE_FAILURES, "queue" => q.clone()),
            queue: q,
        }
    }

    /// The dead-letter counter for `reason` (rare, so resolved on use).
    pub fn dead_letters(&self, reason: &'static str) -> Counter {
        counter!(DEAD_LETTERS, "queue" => self.queue.clone(), "reason" => reason)
    }
}

/// Pre-resolved per-backend handles.
#[derive(Clone)]
pub struct BackendMetrics {
    requests: [Counter; 6],
    /// [`BACKEND_DURATION`].
    pub duration: Histogram,
    /// [`BACKEND_IN_FLIGHT`].
    pub in_flight: Gauge,
    /// [`BACKEND_HEALTHY`].
    pub healthy: Gauge,
    /// [`BACKEND_EJECTIONS`].
    pub ejections: Counter,
    /// [`BACKEND_UNREACHABLE`].
    pub unreachable: Gauge,
}

impl BackendMetrics {
    /// Resolves the handles for the backend labelled `backend`.
    #[must_use]
    pub fn new(backend: &str) -> Self {
        let b = backend.to_owned();
        Self {
            requests: OUTCOMES
                .map(|o| counter!(BACKEND_REQUESTS, "backend" => b.clone(), "outcome" => o)),
            duration: histogram!(BACKEND_DURATION, "backend" => b.clone()),
            in_flight: gauge!(BACKEND_IN_FLIGHT, "backend" => b.clone()),
            healthy: gauge!(BACKEND_HEALTHY, "backend" => b.clone()),
            unreachable: gauge!(BACKEND_UNREACHABLE, "backend" => b.clone()),
            ejections: counter!(BACKEND_EJECTIONS, "backend" => b),
        }
    }

    /// The request counter for `outcome`, one of [`OUTCOMES`].
    pub fn requests(&self, outcome: &str) -> &Counter {
        let i = OUTCOMES.iter().position(|o| *o == outcome).unwrap_or(1);
        &self.requests[i]
    }
}

/// Sets [`CONNECTED`].
pub fn set_connected(up: bool) {
    gauge!(CONNECTED).set(if up { 1.0 } else { 0.0 });
}

/// Sets [`CONSUMERS`].
pub fn set_consumers(n: usize) {
    gauge!(CONSUMERS).set(n as f64);
}

/// Sets [`DEAD_LETTER_BLOCKED`].
pub fn set_dead_letter_blocked(blocked: bool) {
    gauge!(DEAD_LETTER_BLOCKED).set(if blocked { 1.0 } else { 0.0 });
}

/// Moves [`DEAD_LETTER_UNCONFIRMED`] by `delta`.
pub fn dead_letter_unconfirmed(delta: f64) {
    gauge!(DEAD_LETTER_UNCONFIRMED).increment(delta);
}

/// Sets [`PAUSED`].
pub fn set_paused(paused: bool) {
    gauge!(PAUSED).set(if paused { 1.0 } else { 0.0 });
}

/// Publishes [`PAUSE_SELF_CORRECTIONS`] and [`UNPARSABLE_FRAMES`] at 0, so alerts see the series from the start.
pub fn init_bug_counters() {
    counter!(PAUSE_SELF_CORRECTIONS).increment(0);
    gauge!(DEAD_LETTER_UNCONFIRMED).increment(0.0);
    counter!(UNPARSABLE_FRAMES).increment(0);
}

/// Increments [`UNPARSABLE_FRAMES`].
pub fn unparsable_frame() {
    counter!(UNPARSABLE_FRAMES).increment(1);
}

/// Increments [`PAUSE_SELF_CORRECTIONS`].
pub fn pause_self_corrected() {
    counter!(PAUSE_SELF_CORRECTIONS).increment(1);
}

/// Increments [`CONNECTION_RECOVERIES`].
pub fn connection_recovered() {
    counter!(CONNECTION_RECOVERIES).increment(1);
}
