//! Metric names, kinds, units, labels and help text, in one place ([`METRICS`]). The names
//! are a contract (README.md's metrics table, checked against [`METRICS`] by a test).
//! Also the one Prometheus text parser ([`parse`], [`sample_sum`]) that the demo, the
//! integration tests and the benchmark read `/metrics` with.
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

/// What kind of metric a [`MetricDef`] is: its Prometheus `# TYPE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    /// Only goes up (`_total`).
    Counter,
    /// Goes up and down.
    Gauge,
    /// Bucketed observations (`_bucket`, `_sum`, `_count` series).
    Histogram,
}

impl MetricKind {
    /// The Prometheus type name: `counter`, `gauge` or `histogram`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Counter => "counter",
            Self::Gauge => "gauge",
            Self::Histogram => "histogram",
        }
    }
}

/// One metric of the contract: its name, kind, unit, label names and help text.
#[derive(Debug, Clone, Copy)]
pub struct MetricDef {
    /// The exported name.
    pub name: &'static str,
    /// Counter, gauge or histogram.
    pub kind: MetricKind,
    /// The unit given to the recorder.
    pub unit: Unit,
    /// The label names of every series, in the order they are set (a histogram's
    /// `_bucket` series adds `le`).
    pub labels: &'static [&'static str],
    /// The `# HELP` text, also the README's description of the metric.
    pub help: &'static str,
}

/// Declares each metric once: a `pub const` for its name (documented with its help text)
/// and its row in [`METRICS`].
macro_rules! metric_table {
    ($(
        $id:ident = $name:literal, $kind:ident, $unit:ident, [$($label:literal),*],
        $help:literal;
    )*) => {
        $(
            #[doc = concat!("`", $name, "`: ", $help)]
            pub const $id: &str = $name;
        )*

        /// Every metric the sidecar exports: the single source of their names, kinds,
        /// units, labels and help text. [`install`] describes them from it, and a test
        /// checks README.md's metrics table against it.
        pub const METRICS: &[MetricDef] = &[$(
            MetricDef {
                name: $id,
                kind: MetricKind::$kind,
                unit: Unit::$unit,
                labels: &[$($label),*],
                help: $help,
            },
        )*];
    };
}

metric_table! {
    DELIVERIES = "amqp_sidecar_deliveries_total", Counter, Count, ["queue"],
        "Deliveries received from the broker.";
    ACKS = "amqp_sidecar_acks_total", Counter, Count, ["queue"],
        "Deliveries acked after a successful backend response.";
    REQUEUES = "amqp_sidecar_requeues_total", Counter, Count, ["queue"],
        "Deliveries requeued (basic.reject requeue=true) for another attempt, after a retryable failure or a failed dead-letter publish.";
    RELEASES = "amqp_sidecar_releases_total", Counter, Count, ["queue"],
        "Deliveries handed back to the broker without counting an attempt: on shutdown, or when consumption pauses because no backend is usable.";
    DEAD_LETTERS = "amqp_sidecar_dead_letters_total", Counter, Count, ["queue", "reason"],
        "Messages published to the dead-letter exchange and confirmed, by reason (rejected, retries_exhausted, too_large).";
    DEAD_LETTER_FAILURES = "amqp_sidecar_dead_letter_failures_total", Counter, Count, ["queue"],
        "Dead-letter publishes that failed; the original was requeued.";
    DEAD_LETTER_BLOCKED = "amqp_sidecar_dead_letter_blocked", Gauge, Count, [],
        "1 while the broker blocks the publishing connection of dead-letter and delay copies (a resource alarm), else 0; copies wait, then their originals are requeued.";
    DEAD_LETTER_UNCONFIRMED = "amqp_sidecar_dead_letter_unconfirmed", Gauge, Count, [],
        "Dead-letter copies sent but still unconfirmed after their wait timed out (the originals were requeued; each is acked without a second copy once its copy is confirmed).";
    DELAYED = "amqp_sidecar_delayed_total", Counter, Count, ["queue"],
        "retry.mode delay_queue: failed deliveries whose copy (with x-sidecar-attempts) was stored in a delay queue and whose original was acked.";
    DELAY_FAILURES = "amqp_sidecar_delay_failures_total", Counter, Count, ["queue"],
        "retry.mode delay_queue: delay-queue publishes that failed; the original was requeued with its backoff instead.";
    RETRY_WAITING = "amqp_sidecar_retry_waiting", Gauge, Count, [],
        "Deliveries waiting out a backoff in the sidecar now (retry.mode requeue), each with another consumer opened in its place, up to retry.max_waiting.";
    RETRY_BACKOFF_SKIPPED = "amqp_sidecar_retry_backoff_skipped_total", Counter, Count, [],
        "Failed deliveries requeued without their backoff because retry.max_waiting deliveries were already waiting.";
    SETTLE_FAILURES = "amqp_sidecar_settle_failures_total", Counter, Count, ["queue"],
        "Settlements (ack, nack, reject) not sent because the delivery's channel had closed; the broker redelivers those messages.";
    BACKEND_REQUESTS = "amqp_sidecar_backend_requests_total", Counter, Count, ["backend", "outcome"],
        "Backend requests by outcome (success, retryable, rejected, timeout, connect_error, local_error).";
    BACKEND_DURATION = "amqp_sidecar_backend_request_duration_seconds", Histogram, Seconds, ["backend"],
        "Backend request duration, from sending the request to reading the response body.";
    BACKEND_IN_FLIGHT = "amqp_sidecar_backend_in_flight", Gauge, Count, ["backend"],
        "Requests in flight to the backend: its queue length as the balancer sees it.";
    BACKEND_LIMIT = "amqp_sidecar_backend_limit", Gauge, Count, ["backend"],
        "The backend's concurrency limit: its max_in_flight, or the limit learned from its latency with max_in_flight auto.";
    BACKEND_HEALTHY = "amqp_sidecar_backend_healthy", Gauge, Count, ["backend"],
        "1 while the backend passes its active health checks (always 1 without checks), else 0.";
    BACKEND_UNREACHABLE = "amqp_sidecar_backend_unreachable", Gauge, Count, ["backend"],
        "1 while the backend is unreachable (a request to it was never delivered: refused, connect timeout, DNS or TLS failure) until a probe reaches it, else 0.";
    BACKEND_EJECTIONS = "amqp_sidecar_backend_ejections_total", Counter, Count, ["backend"],
        "Passive ejections of the backend after consecutive retryable failures.";
    PAUSED = "amqp_sidecar_paused", Gauge, Count, [],
        "1 while consumption is paused because no backend is usable, else 0.";
    PAUSE_SELF_CORRECTIONS = "amqp_sidecar_pause_self_corrections_total", Counter, Count, [],
        "Pauses ended by the pause guard because the pool had a usable backend that the published usable count missed; anything but 0 is a bug.";
    UNPARSABLE_FRAMES = "amqp_sidecar_unparsable_frames_total", Counter, Count, [],
        "Connections lost because a frame from the broker could not be parsed (a message the AMQP client cannot decode; a poison message if it repeats). Should read 0.";
    CONNECTED = "amqp_sidecar_connected", Gauge, Count, [],
        "1 while connected to the broker, else 0.";
    CONSUMERS = "amqp_sidecar_consumers", Gauge, Count, [],
        "Consumers currently subscribed to the queue.";
    HELD_BYTES = "amqp_sidecar_held_bytes", Gauge, Bytes, [],
        "Bytes of message bodies the sidecar holds now (received, not yet settled, backoffs included).";
    MEMORY_BUDGET = "amqp_sidecar_memory_budget_bytes", Gauge, Bytes, [],
        "The memory budget for held message bodies (memory.limit_bytes, or the cgroup limit less 48 MiB); 0 without a budget.";
    LOOKAHEAD = "amqp_sidecar_lookahead", Gauge, Count, [],
        "Consumers opened beyond the backend slots so that a delivery is at hand when a slot frees (amqp.consumers 0): the delivery rate times the broker's ack-to-next-delivery round trip, at most amqp.max_lookahead.";
    CONNECTION_RECOVERIES = "amqp_sidecar_connection_recoveries_total", Counter, Count, [],
        "Successful reconnections to the broker after a lost connection.";
}

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

/// Describes every metric of [`METRICS`] to the recorder (help text and unit).
fn describe() {
    for m in METRICS {
        match m.kind {
            MetricKind::Counter => describe_counter!(m.name, m.unit, m.help),
            MetricKind::Gauge => describe_gauge!(m.name, m.unit, m.help),
            MetricKind::Histogram => describe_histogram!(m.name, m.unit, m.help),
        }
    }
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
    /// [`DELAYED`].
    pub delayed: Counter,
    /// [`DELAY_FAILURES`].
    pub delay_failures: Counter,
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
            delayed: counter!(DELAYED, "queue" => q.clone()),
            delay_failures: counter!(DELAY_FAILURES, "queue" => q.clone()),
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
    /// [`BACKEND_LIMIT`].
    pub limit: Gauge,
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
            limit: gauge!(BACKEND_LIMIT, "backend" => b.clone()),
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

/// Sets [`RETRY_WAITING`].
pub fn set_retry_waiting(n: u32) {
    gauge!(RETRY_WAITING).set(f64::from(n));
}

/// The [`HELD_BYTES`] gauge (resolved once: it moves with every delivery).
pub fn held_bytes() -> Gauge {
    gauge!(HELD_BYTES)
}

/// Sets [`MEMORY_BUDGET`].
pub fn set_memory_budget(budget: u64) {
    gauge!(MEMORY_BUDGET).set(budget as f64);
}

/// Sets [`LOOKAHEAD`].
pub fn set_lookahead(n: u32) {
    gauge!(LOOKAHEAD).set(f64::from(n));
}

/// Increments [`RETRY_BACKOFF_SKIPPED`].
pub fn retry_backoff_skipped() {
    counter!(RETRY_BACKOFF_SKIPPED).increment(1);
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
    counter!(RETRY_BACKOFF_SKIPPED).increment(0);
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

/// One sample line of a Prometheus text exposition.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample<'a> {
    /// The series name; a histogram's series end in `_bucket`, `_sum` and `_count`.
    pub name: &'a str,
    /// The label pairs in the order written, values unescaped.
    pub labels: Vec<(&'a str, String)>,
    /// The value (`+Inf`, `-Inf` and `NaN` included).
    pub value: f64,
}

impl Sample<'_> {
    /// The value of label `name`, if the sample has it.
    #[must_use]
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The samples of a Prometheus text exposition (format 0.0.4, as `/metrics` serves it).
///
/// Comment (`# HELP`, `# TYPE`) and blank lines are skipped, and so are malformed lines.
/// Label values are unescaped (`\\`, `\"`, `\n`); a trailing timestamp is ignored.
pub fn parse(text: &str) -> impl Iterator<Item = Sample<'_>> {
    text.lines().filter_map(parse_line)
}

/// The sum of the samples named exactly `name` whose labels include every `labels` pair
/// (0 when there are none): e.g. `(ACKS, &[("queue", "q")])`, or every outcome of one
/// backend's requests with `(BACKEND_REQUESTS, &[("backend", "b")])`.
#[must_use]
pub fn sample_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    parse(text)
        .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.label(k) == Some(*v)))
        .map(|s| s.value)
        .sum()
}

fn parse_line(line: &str) -> Option<Sample<'_>> {
    let line = line.trim_start();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let name = &line[..end];
    let valid = |c: char, first: bool| {
        c.is_ascii_alphabetic() || c == '_' || c == ':' || (!first && c.is_ascii_digit())
    };
    let mut chars = name.chars();
    if !chars.next().is_some_and(|c| valid(c, true)) || !chars.all(|c| valid(c, false)) {
        return None;
    }
    let mut rest = line[end..].trim_start();
    let mut labels = Vec::new();
    if let Some(r) = rest.strip_prefix('{') {
        rest = r.trim_start();
        while let Some(eq) = rest.find('=').filter(|_| !rest.starts_with('}')) {
            let key = rest[..eq].trim();
            let body = rest[eq + 1..].trim_start().strip_prefix('"')?;
            let mut value = String::new();
            let mut it = body.char_indices();
            let close = loop {
                match it.next()? {
                    (i, '"') => break i,
                    (_, '\\') => match it.next()?.1 {
                        'n' => value.push('\n'),
                        c => value.push(c),
                    },
                    (_, c) => value.push(c),
                }
            };
            labels.push((key, value));
            rest = body[close + 1..].trim_start();
            match rest.strip_prefix(',') {
                Some(r) => rest = r.trim_start(),
                None if rest.starts_with('}') => break,
                None => return None,
            }
        }
        rest = rest.strip_prefix('}')?;
    }
    let mut fields = rest.split_whitespace();
    let value = match fields.next()? {
        "+Inf" | "Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().ok()?,
    };
    // At most a timestamp after the value.
    if fields.nth(1).is_some() {
        return None;
    }
    Some(Sample {
        name,
        labels,
        value,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn parses_names_labels_values_and_escapes() {
        let text = "# HELP a_total Things.\n# TYPE a_total counter\n\
            a_total{queue=\"q\",backend=\"127.0.0.1:80\"} 3\n\
            a_total{queue=\"q,}=x\",backend=\"b\"} 4 1700000000000\n\
            a_total{queue=\"q\\\"\\\\\\n\"} 5\n\
            b 1.5e3\n\
            h_bucket{backend=\"b\",le=\"+Inf\"} +Inf\n\
            \n   \n\
            c{x=\"unterminated} 1\n\
            d{x=\"1\" y=\"2\"} 1\n\
            e 1 2 3\n\
            f{} NaN\n\
            9bad 1\n";
        let s: Vec<Sample<'_>> = parse(text).collect();
        assert_eq!(s.len(), 6, "{s:?}");
        assert_eq!(s[0].name, "a_total");
        assert_eq!(
            s[0].labels,
            [
                ("queue", "q".to_owned()),
                ("backend", "127.0.0.1:80".to_owned())
            ]
        );
        assert_eq!(s[0].value, 3.0);
        assert_eq!(s[1].label("queue"), Some("q,}=x"));
        assert_eq!(s[1].value, 4.0, "a timestamp is not the value");
        assert_eq!(s[2].label("queue"), Some("q\"\\\n"));
        assert_eq!((s[3].name, s[3].value), ("b", 1500.0));
        assert!(s[3].labels.is_empty());
        assert_eq!(s[4].label("le"), Some("+Inf"));
        assert_eq!(s[4].value, f64::INFINITY);
        assert!(s[5].name == "f" && s[5].value.is_nan() && s[5].labels.is_empty());
    }

    #[test]
    fn sample_sum_matches_the_exact_name_and_every_label_pair() {
        let text = "x_total{queue=\"a\",outcome=\"ok\"} 1\n\
            x_total{queue=\"a\",outcome=\"err\"} 2\n\
            x_total{queue=\"ab\",outcome=\"ok\"} 4\n\
            x_total_other{queue=\"a\"} 8\n\
            x_totals 16\n\
            y{queue=\"a\"} 32\n";
        assert_eq!(sample_sum(text, "x_total", &[]), 7.0);
        assert_eq!(sample_sum(text, "x_total", &[("queue", "a")]), 3.0);
        assert_eq!(
            sample_sum(text, "x_total", &[("queue", "a"), ("outcome", "ok")]),
            1.0
        );
        assert_eq!(sample_sum(text, "x_total", &[("queue", "b")]), 0.0);
        assert_eq!(sample_sum(text, "x_total", &[("missing", "a")]), 0.0);
        assert_eq!(sample_sum(text, "nothing", &[]), 0.0);
    }

    /// The rows of README.md's metrics table: (name, type, label names, description).
    fn readme_rows() -> Vec<(String, String, Vec<String>, String)> {
        let readme = include_str!("../README.md");
        let header = "| metric | type | labels | description |";
        let start = readme
            .find(header)
            .expect("README.md has the metrics table");
        readme[start..]
            .lines()
            .skip(2) // the header and the |---| line
            .take_while(|l| l.starts_with('|'))
            .map(|l| {
                let cells: Vec<&str> = l.trim_matches('|').split('|').map(str::trim).collect();
                assert_eq!(cells.len(), 4, "README metrics row {l:?}: four cells");
                let labels = cells[2]
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect();
                (
                    cells[0].trim_matches('`').to_owned(),
                    cells[1].to_owned(),
                    labels,
                    cells[3].to_owned(),
                )
            })
            .collect()
    }

    #[test]
    fn the_readme_metrics_table_matches_the_metric_table() {
        let expected: Vec<(String, String, Vec<String>, String)> = METRICS
            .iter()
            .map(|m| {
                (
                    m.name.to_owned(),
                    m.kind.as_str().to_owned(),
                    m.labels.iter().map(|l| (*l).to_owned()).collect(),
                    m.help.to_owned(),
                )
            })
            .collect();
        let readme = readme_rows();
        for (i, (want, got)) in expected.iter().zip(&readme).enumerate() {
            assert_eq!(
                got,
                want,
                "README.md metrics table row {} differs from metrics::METRICS (README, table)",
                i + 1
            );
        }
        assert_eq!(
            readme.len(),
            expected.len(),
            "README.md lists {} metrics, metrics::METRICS {}",
            readme.len(),
            expected.len()
        );
    }

    #[test]
    fn metric_names_are_unique_and_well_formed() {
        let mut seen = HashSet::new();
        for m in METRICS {
            assert!(seen.insert(m.name), "{} twice", m.name);
            assert!(m.name.starts_with("amqp_sidecar_"), "{}", m.name);
            assert_eq!(
                m.name.ends_with("_total"),
                m.kind == MetricKind::Counter,
                "{}: counters, and only counters, end in _total",
                m.name
            );
            assert!(
                !m.help.contains('|'),
                "{}: help breaks the README table",
                m.name
            );
        }
    }

    /// What the recorder exports agrees with [`METRICS`]: every metric appears with its
    /// `# TYPE`, its `# HELP` and exactly its label names, and nothing else is exported.
    #[tokio::test]
    async fn the_exported_metrics_match_the_metric_table() {
        let handle = install();
        let q = QueueMetrics::new("table-q");
        for c in [
            &q.deliveries,
            &q.acks,
            &q.requeues,
            &q.releases,
            &q.dead_letter_failures,
            &q.delayed,
            &q.delay_failures,
            &q.settle_failures,
        ] {
            c.increment(1);
        }
        q.dead_letters("rejected").increment(1);
        let b = BackendMetrics::new("table-b");
        for o in OUTCOMES {
            b.requests(o).increment(1);
        }
        b.duration.record(0.01);
        b.in_flight.set(0.0);
        b.healthy.set(1.0);
        b.unreachable.set(0.0);
        b.limit.set(1.0);
        b.ejections.increment(1);
        set_connected(true);
        set_consumers(1);
        set_dead_letter_blocked(false);
        set_paused(false);
        set_retry_waiting(0);
        set_lookahead(0);
        held_bytes().set(0.0);
        set_memory_budget(0);
        init_bug_counters();
        connection_recovered();
        let text = handle.render();
        for m in METRICS {
            let kind = m.kind.as_str();
            assert!(
                text.contains(&format!("# TYPE {} {kind}\n", m.name)),
                "{}: not exported as a {kind}:\n{text}",
                m.name
            );
            assert!(
                text.contains(&format!("# HELP {} {}\n", m.name, m.help)),
                "{}: no HELP or not the table's:\n{text}",
                m.name
            );
        }
        let mut series = 0;
        for s in parse(&text) {
            let (def, extra) = METRICS
                .iter()
                .find_map(|m| match s.name.strip_prefix(m.name) {
                    Some("") => Some((m, None)),
                    Some("_bucket") if m.kind == MetricKind::Histogram => Some((m, Some("le"))),
                    Some("_sum" | "_count") if m.kind == MetricKind::Histogram => Some((m, None)),
                    _ => None,
                })
                .unwrap_or_else(|| panic!("{} is exported but not in METRICS", s.name));
            let got: HashSet<&str> = s.labels.iter().map(|(k, _)| *k).collect();
            let want: HashSet<&str> = def.labels.iter().copied().chain(extra).collect();
            assert_eq!(got, want, "{}: label names", s.name);
            series += 1;
        }
        assert!(series >= METRICS.len(), "{series} series");
    }
}
