//! One benchmark run: declare a fresh queue, start the backends, publish, run a contender
//! until every message is acked (or a deadline passes), measure, verify, clean up.

use std::{
    path::PathBuf,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::{
    backends::{Backends, Behaviour, Recorder},
    broker::{Broker, QueueType},
    contender::{self, Contender, Launch, Progress, quantiles},
};

/// How messages reach the queue.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub enum Phase {
    /// All messages prepublished before the contender starts: measures the maximum rate.
    Backlog,
    /// Published at a fixed rate while the contender runs: measures latency.
    Paced {
        /// Messages per second.
        rate: f64,
        /// The first messages, left out of the latency figures (connections warming up).
        warmup: u64,
    },
    /// Published while the contender runs, as fast as possible with at most `window`
    /// outstanding: the maximum sustainable rate when publishing shares the machine.
    Live {
        /// Most messages published but not yet received by a backend.
        window: u64,
    },
    /// Like `Live`, for a long run with RSS sampled every second: the soak.
    Soak {
        /// Most messages published but not yet received by a backend.
        window: u64,
    },
}

/// Which backends a run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Workload {
    /// Four fast no-op backends.
    Fast,
    /// Four one-at-a-time workers with service times of 2, 2, 10 and 30 ms.
    Mixed,
}

/// Service times of the mixed-speed workers, ms.
pub const MIXED_SERVICE_MS: [u64; 4] = [2, 2, 10, 30];
/// Number of fast backends.
pub const FAST_BACKENDS: usize = 4;

impl Workload {
    fn behaviours(self) -> Vec<Behaviour> {
        match self {
            Self::Fast => vec![Behaviour::Fast; FAST_BACKENDS],
            Self::Mixed => MIXED_SERVICE_MS
                .iter()
                .map(|&ms| Behaviour::Worker {
                    service: Duration::from_millis(ms),
                })
                .collect(),
        }
    }

    /// The fluid bound of `n` messages with the scripted service times: total work divided
    /// by total capacity, in seconds.
    pub fn fluid_bound(n: u64) -> f64 {
        let ms: Vec<f64> = MIXED_SERVICE_MS.iter().map(|&ms| ms as f64).collect();
        Self::fluid_bound_for(n, &ms)
    }

    /// The fluid bound of `n` messages for workers with these mean service times (ms).
    pub fn fluid_bound_for(n: u64, service_ms: &[f64]) -> f64 {
        let capacity: f64 = service_ms
            .iter()
            .filter(|&&ms| ms > 0.0)
            .map(|&ms| 1000.0 / ms)
            .sum();
        if capacity > 0.0 {
            n as f64 / capacity
        } else {
            0.0
        }
    }
}

/// One run's parameters.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Spec {
    /// The contender.
    pub contender: Contender,
    /// Queue type.
    pub queue_type: QueueType,
    /// Consumer channels.
    pub consumers: u32,
    /// Prefetch per channel.
    pub prefetch: u16,
    /// Body size, bytes.
    pub body: usize,
    /// Messages.
    pub messages: u64,
    /// How they are published.
    pub phase: Phase,
    /// Which backends.
    pub workload: Workload,
    /// The sidecar's `max_in_flight` per backend.
    pub max_in_flight: u32,
    /// Which repetition of its grid point this run is (0-based; `--repeat`). Results saved
    /// before repetitions existed read as 0.
    #[serde(default)]
    pub rep: u32,
    /// Transient messages (delivery_mode 1) instead of persistent ones: a diagnostic that
    /// takes the broker's disk writes out of the latency (`--transient`).
    #[serde(default)]
    pub transient: bool,
}

/// What one run measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Outcome {
    /// Messages per second between the first and the last one processed.
    pub msgs_per_s: f64,
    /// Latency quantiles (q, µs): publish to backend receipt (to delivery for the broker limit).
    pub latency: Vec<(f64, u64)>,
    /// CPU seconds the contender process used.
    pub cpu_s: f64,
    /// Its peak RSS (VmHWM), KiB.
    pub peak_rss_kib: u64,
    /// Its RSS sampled every second: (seconds since start, KiB).
    pub rss: Vec<(f64, u64)>,
    /// Requests per backend.
    pub per_backend: Vec<u64>,
    /// Mean actual service time per worker, ms (mixed workload).
    #[serde(default)]
    pub service_ms: Vec<f64>,
    /// First receipt to last response, seconds (backend contenders).
    pub makespan_s: f64,
    /// Backend queue lengths over time: (seconds since the first sample, per backend).
    pub in_flight: Vec<(f64, Vec<i64>)>,
    /// Redelivered duplicates seen by the backends.
    pub duplicates: u64,
    /// Requeues and dead-letters reported by the sidecar.
    pub failures: u64,
    /// Wall time of the run including setup, seconds.
    pub wall_s: f64,
}

impl Outcome {
    /// The latency at quantile `q`, µs (the first kept quantile at or above `q`).
    pub fn latency_at(&self, q: f64) -> Option<u64> {
        self.latency
            .iter()
            .find(|(k, _)| *k >= q - 1e-9)
            .map(|&(_, v)| v)
    }

    /// CPU seconds per 10,000 messages.
    pub fn cpu_per_10k(&self, messages: u64) -> f64 {
        self.cpu_s / messages.max(1) as f64 * 10_000.0
    }
}

/// Shared settings of every run.
pub struct Ctx {
    /// Broker URL.
    pub url: String,
    /// The bench's broker connection, reopened when it is lost (other users of a shared
    /// broker may close connections or restart it).
    pub broker: tokio::sync::Mutex<Option<Arc<Broker>>>,
    /// amqp-sidecar binary.
    pub sidecar_bin: PathBuf,
    /// Scratch directory (configs, logs).
    pub work_dir: PathBuf,
    /// Unique id of this bench invocation.
    pub run_id: String,
    /// Runs started so far.
    pub counter: std::sync::atomic::AtomicU32,
    /// Print progress lines.
    pub verbose: bool,
    /// Wait for a quiet machine before each measured run.
    pub quiesce: bool,
}

/// A machine counts as quiet below this share of its CPUs in use (all processes).
pub const QUIESCE_MAX_BUSY: f64 = 0.10;
/// Over this window.
pub const QUIESCE_WINDOW: Duration = Duration::from_millis(500);
/// The longest wait for a quiet machine before a run goes ahead anyway.
pub const QUIESCE_DEADLINE: Duration = Duration::from_secs(20);

impl Ctx {
    /// Waits (at most [`QUIESCE_DEADLINE`]) until the machine is quiet before a run is
    /// measured; see [`crate::procstat::quiesce`]. Only with `--quiesce`.
    pub async fn quiesce(&self) {
        if !self.quiesce {
            return;
        }
        let q = crate::procstat::quiesce(QUIESCE_MAX_BUSY, QUIESCE_WINDOW, QUIESCE_DEADLINE).await;
        if !q.quiet && self.verbose {
            println!(
                "  (the machine stayed above {:.0}% CPU for {:.0} s; measuring anyway)",
                QUIESCE_MAX_BUSY * 100.0,
                q.waited.as_secs_f64()
            );
        }
    }

    /// The broker connection, reconnecting (for up to two minutes) if it was lost.
    ///
    /// # Errors
    /// When the broker stays unreachable.
    pub async fn broker(&self) -> anyhow::Result<Arc<Broker>> {
        let mut slot = self.broker.lock().await;
        if let Some(b) = slot.as_ref().filter(|b| b.is_connected()) {
            return Ok(Arc::clone(b));
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            match Broker::connect(&self.url).await {
                Ok(b) => {
                    let b = Arc::new(b);
                    *slot = Some(Arc::clone(&b));
                    return Ok(b);
                }
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
            }
        }
    }
}

/// Runs one spec, always deleting its queue afterwards.
///
/// # Errors
/// A real failure: lost messages, a contender crash, a deadline passed.
pub async fn run(ctx: &Ctx, spec: &Spec) -> anyhow::Result<Outcome> {
    let n = ctx.counter.fetch_add(1, Ordering::Relaxed);
    let name = format!("bench-{}-{n}", ctx.run_id);
    ctx.broker().await?.declare(&name, spec.queue_type).await?;
    let result = run_on(ctx, spec, &name).await;
    if let Ok(b) = ctx.broker().await {
        b.delete(&name).await;
    }
    result.with_context(|| {
        format!(
            "{} {} c={} body={} {:?}",
            spec.contender.label(),
            spec.queue_type.as_str(),
            spec.consumers,
            spec.body,
            spec.phase
        )
    })
}

async fn run_on(ctx: &Ctx, spec: &Spec, queue: &str) -> anyhow::Result<Outcome> {
    let started = Instant::now();
    let warmup = match spec.phase {
        Phase::Paced { warmup, .. } => warmup,
        _ => 0,
    };
    let recorder = Recorder::new(spec.messages, warmup)?;
    let backends = Backends::start(&spec.workload.behaviours(), &recorder).await?;
    let broker = ctx.broker().await?;
    let mut publisher = broker.publisher(queue, spec.body, !spec.transient).await?;
    if let Phase::Backlog = spec.phase {
        publisher.backlog(spec.messages).await?;
    }
    let launch = Launch {
        contender: &spec.contender,
        url: &ctx.url,
        queue,
        queue_type: spec.queue_type,
        consumers: spec.consumers,
        prefetch: spec.prefetch,
        expect: spec.messages,
        warmup,
        backends: if spec.contender == Contender::Broker {
            &[]
        } else {
            &backends.urls
        },
        max_in_flight: spec.max_in_flight,
        sidecar_bin: &ctx.sidecar_bin,
        work_dir: &ctx.work_dir,
        run_name: queue,
    };
    // A backlog run consumes as soon as the contender is up: let the broker finish writing
    // the backlog (and the previous run's clean-up) first. The other phases publish after
    // the contender is ready, so they wait then.
    if matches!(spec.phase, Phase::Backlog) {
        ctx.quiesce().await;
    }
    let mut proc = contender::start(&launch)?;
    proc.wait_ready(Duration::from_secs(30)).await?;
    if !matches!(spec.phase, Phase::Backlog) {
        ctx.quiesce().await;
    }
    let publishing = {
        let n = spec.messages;
        let rec = Arc::clone(&recorder);
        let broker_contender = spec.contender == Contender::Broker;
        match spec.phase {
            Phase::Backlog => None,
            Phase::Paced { rate, .. } => Some(tokio::spawn(async move {
                let r = publisher.paced(n, rate).await;
                publisher.close().await;
                r
            })),
            Phase::Soak { window } | Phase::Live { window } => {
                if broker_contender {
                    bail!("windowed publishing needs a forwarding contender");
                }
                Some(tokio::spawn(async move {
                    let r = publisher
                        .windowed(n, window, &rec.received, Duration::from_secs(60))
                        .await;
                    publisher.close().await;
                    r
                }))
            }
        }
    };
    // Generous deadline: even the slowest grid point runs well above 100 msg/s.
    let deadline =
        Instant::now() + Duration::from_secs(60) + Duration::from_millis(spec.messages * 10);
    let sample_every = if spec.workload == Workload::Mixed {
        Duration::from_millis(20)
    } else {
        Duration::from_millis(50)
    };
    let t0 = Instant::now();
    let mut out = Outcome::default();
    let mut progress = Progress::default();
    let mut next_progress = Instant::now();
    let mut next_rss = Instant::now();
    let mut next_print = Instant::now() + Duration::from_secs(10);
    let mut publishing = publishing;
    loop {
        let now = Instant::now();
        if spec.workload == Workload::Mixed {
            out.in_flight
                .push((t0.elapsed().as_secs_f64(), backends.in_flight()));
        }
        if now >= next_rss {
            next_rss += Duration::from_secs(1);
            if let Ok(m) = proc.memory() {
                out.rss.push((t0.elapsed().as_secs_f64(), m.rss_kib));
            }
        }
        if now >= next_progress {
            next_progress = now + Duration::from_millis(100);
            progress = proc.progress(&progress).await?;
            if progress.recoveries > 0 {
                bail!("disturbed: the sidecar lost its broker connection during the run");
            }
            if progress.acked >= spec.messages {
                break;
            }
        }
        if ctx.verbose && now >= next_print {
            next_print += Duration::from_secs(10);
            println!(
                "  .. {} acked {}/{} after {:.0} s",
                spec.contender.label(),
                progress.acked,
                spec.messages,
                t0.elapsed().as_secs_f64()
            );
        }
        if publishing
            .as_ref()
            .is_some_and(tokio::task::JoinHandle::is_finished)
            && let Some(task) = publishing.take()
        {
            task.await??;
        }
        if now > deadline {
            bail!(
                "deadline passed with {} of {} messages acked",
                progress.acked,
                spec.messages
            );
        }
        tokio::time::sleep(sample_every).await;
    }
    out.cpu_s = proc.cpu_seconds()?;
    let mem = proc.memory()?;
    out.peak_rss_kib = mem.hwm_kib;
    out.rss.push((t0.elapsed().as_secs_f64(), mem.rss_kib));
    out.failures = progress.failures;
    proc.stop(Duration::from_secs(15)).await?;
    if let Some(task) = publishing {
        task.await??;
    }
    out.per_backend = backends.counts();
    out.service_ms = backends.mean_service_ms();
    out.duplicates = recorder.duplicates.load(Ordering::Relaxed);
    if spec.contender == Contender::Broker {
        let done = progress
            .child_done
            .context("the broker-limit child did not report")?;
        out.msgs_per_s = rate(done.acked, done.first_ns, done.last_ns);
        out.latency = done.latency;
    } else {
        let distinct = recorder.distinct();
        let malformed = recorder.malformed.load(Ordering::Relaxed);
        if distinct != spec.messages || malformed > 0 {
            bail!(
                "LOST MESSAGES: backends saw {distinct} distinct of {} ({malformed} malformed)",
                spec.messages
            );
        }
        let first = recorder.first_ns.load(Ordering::Relaxed);
        let last = recorder.last_ns.load(Ordering::Relaxed);
        out.msgs_per_s = rate(distinct, first, last);
        out.makespan_s = recorder
            .last_done_ns
            .load(Ordering::Relaxed)
            .saturating_sub(first) as f64
            / 1e9;
        out.latency = quantiles(&recorder.latency());
    }
    let left = broker.ready(queue).await?;
    let dead = broker.ready(&format!("{queue}.dlq")).await?;
    if left > 0 || dead > 0 {
        bail!("LOST MESSAGES: {left} left in the queue and {dead} dead-lettered after the run");
    }
    out.wall_s = started.elapsed().as_secs_f64();
    Ok(out)
}

/// Messages per second for `n` messages processed between `first` and `last` (ns).
fn rate(n: u64, first: u64, last: u64) -> f64 {
    let secs = last.saturating_sub(first) as f64 / 1e9;
    if secs <= 0.0 || n < 2 {
        0.0
    } else {
        (n - 1) as f64 / secs
    }
}
