//! The three contenders and how they are run.
//!
//! Each contender is a separate process, so that its CPU time and memory can be read from
//! `/proc` the same way for all three:
//! - the **broker limit** and the **minimal forwarder** are this program re-executed as
//!   `sidecar-bench contender --kind bare|forward ...` ([`child_main`]);
//! - **amqp-sidecar** is the release binary, configured by a generated YAML file.
//!
//! A bench child prints `ready` once it consumes and `done <json>` once it has acked the
//! expected number of messages, then idles until it is killed or its stdin closes (so it
//! never outlives the bench). The sidecar's readiness and progress come from its admin
//! server's `/readyz` and `/metrics`.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use amqp_sidecar::metrics;
use anyhow::{Context, bail};
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use lapin::{
    message::Delivery,
    options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions},
    types::{FieldTable, ShortString},
};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, BufReader},
    process::{Child, Command},
    sync::mpsc,
};

use crate::{
    backends::new_histogram,
    broker::{self, QueueType, decode, now_ns},
    procstat,
};

/// Which contender.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Contender {
    /// A bare lapin consumer that acks at once.
    Broker,
    /// A bare lapin consumer that POSTs each delivery (consumer i → backend i mod n), then acks.
    Forwarder,
    /// The amqp-sidecar release binary, with this balancer.
    Sidecar(String),
}

impl Contender {
    /// Short name for tables.
    pub fn label(&self) -> String {
        match self {
            Self::Broker => "broker".into(),
            Self::Forwarder => "forwarder".into(),
            Self::Sidecar(b) => format!("sidecar/{b}"),
        }
    }
}

/// Kind of bench child.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ChildKind {
    /// Ack at once (the broker limit).
    Bare,
    /// POST, then ack (the minimal forwarder).
    Forward,
}

/// Arguments of the internal `contender` subcommand.
#[derive(Debug, Clone, clap::Args)]
pub struct ChildArgs {
    /// bare or forward.
    #[arg(long, value_enum)]
    pub kind: ChildKind,
    /// Broker URL.
    #[arg(long)]
    pub url: String,
    /// Queue to consume.
    #[arg(long)]
    pub queue: String,
    /// Consumer channels.
    #[arg(long)]
    pub consumers: u32,
    /// basic.qos prefetch per channel.
    #[arg(long)]
    pub prefetch: u16,
    /// Acks after which `done` is printed.
    #[arg(long)]
    pub expect: u64,
    /// Messages below this sequence number are left out of the latency histogram.
    #[arg(long, default_value_t = 0)]
    pub warmup: u64,
    /// Backend URLs (forward only), comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub backends: Vec<String>,
}

/// What a bench child reports when done: its own first/last ack times and the latency
/// (publish to delivery) quantiles it saw.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ChildDone {
    /// Messages acked.
    pub acked: u64,
    /// First ack, ns since the epoch.
    pub first_ns: u64,
    /// Last ack, ns since the epoch.
    pub last_ns: u64,
    /// Latency quantiles, see [`quantiles`].
    pub latency: Vec<(f64, u64)>,
}

/// The quantiles kept of a latency histogram (µs): a fine grid for the CDF plot, plus the
/// tail points.
pub fn quantiles(h: &Histogram<u64>) -> Vec<(f64, u64)> {
    if h.is_empty() {
        return Vec::new();
    }
    let mut qs: Vec<f64> = (0..=200).map(|i| f64::from(i) / 200.0).collect();
    qs.extend([0.991, 0.993, 0.995, 0.997, 0.998, 0.999, 0.9995, 0.9999]);
    qs.sort_by(f64::total_cmp);
    qs.into_iter()
        .map(|q| (q, h.value_at_quantile(q)))
        .collect()
}

/// Shared counters of a bench child.
struct ChildState {
    acked: AtomicU64,
    first_ns: AtomicU64,
    last_ns: AtomicU64,
    latency: std::sync::Mutex<Histogram<u64>>,
}

/// Entry point of `sidecar-bench contender`: consume, (forward,) ack, report.
///
/// # Errors
/// When the broker cannot be reached or a consumer fails; the parent sees the exit.
pub async fn child_main(args: ChildArgs) -> anyhow::Result<()> {
    let conn = broker::connect(&args.url, "sidecar-bench-contender").await?;
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(usize::try_from(args.consumers)?)
        .build()?;
    let state = Arc::new(ChildState {
        acked: AtomicU64::new(0),
        first_ns: AtomicU64::new(u64::MAX),
        last_ns: AtomicU64::new(0),
        latency: std::sync::Mutex::new(new_histogram()?),
    });
    if args.kind == ChildKind::Forward && args.backends.is_empty() {
        bail!("--kind forward needs --backends");
    }
    let (fail_tx, mut fail_rx) = mpsc::channel::<String>(4);
    for i in 0..args.consumers {
        let ch = conn.create_channel().await?;
        ch.basic_qos(args.prefetch, BasicQosOptions { global: false })
            .await?;
        let consumer = ch
            .basic_consume(
                ShortString::from(args.queue.as_str()),
                ShortString::from(format!("bench-{}-{i}", std::process::id())),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let target = match args.kind {
            ChildKind::Bare => None,
            ChildKind::Forward => Some(args.backends[i as usize % args.backends.len()].clone()),
        };
        let (state, client, fail) = (Arc::clone(&state), client.clone(), fail_tx.clone());
        let warmup = args.warmup;
        tokio::spawn(async move {
            let reason = consume(consumer, target, client, state, warmup).await;
            let _ = fail.send(reason).await;
        });
    }
    println!("ready");
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 64];
    let mut reported = false;
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if !reported && state.acked.load(Ordering::Relaxed) >= args.expect {
                    reported = true;
                    let latency = quantiles(&state.latency.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
                    let done = ChildDone {
                        acked: state.acked.load(Ordering::Relaxed),
                        first_ns: state.first_ns.load(Ordering::Relaxed),
                        last_ns: state.last_ns.load(Ordering::Relaxed),
                        latency,
                    };
                    println!("done {}", serde_json::to_string(&done)?);
                }
            }
            reason = fail_rx.recv() => bail!("consumer stopped: {}", reason.unwrap_or_default()),
            n = stdin.read(&mut buf) => {
                if matches!(n, Ok(0) | Err(_)) {
                    return Ok(());
                }
            }
        }
    }
}

/// One consumer channel of a bench child; returns why it stopped.
async fn consume(
    mut consumer: lapin::Consumer,
    target: Option<String>,
    client: reqwest::Client,
    state: Arc<ChildState>,
    warmup: u64,
) -> String {
    while let Some(next) = consumer.next().await {
        let Delivery { data, acker, .. } = match next {
            Ok(d) => d,
            Err(e) => return format!("consumer error: {e}"),
        };
        if let Some((_, ts)) = decode(&data).filter(|&(seq, _)| seq >= warmup) {
            let us = now_ns().saturating_sub(ts) / 1000;
            state
                .latency
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .saturating_record(us.max(1));
        }
        if let Some(url) = &target {
            let ok = match client
                .post(url)
                .header("content-type", "application/octet-stream")
                .body(data)
                .send()
                .await
            {
                Ok(resp) => {
                    let good = resp.status().is_success();
                    // Read the body so the connection goes back to the pool.
                    let _ = resp.bytes().await;
                    good
                }
                Err(_) => false,
            };
            if !ok {
                let opts = BasicNackOptions {
                    multiple: false,
                    requeue: true,
                };
                if acker.nack(opts).await.is_err() {
                    return "nack failed".into();
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        }
        match acker.ack(BasicAckOptions::default()).await {
            Ok(true) => {
                let now = now_ns();
                state.first_ns.fetch_min(now, Ordering::Relaxed);
                state.last_ns.fetch_max(now, Ordering::Relaxed);
                state.acked.fetch_add(1, Ordering::Relaxed);
            }
            Ok(false) => return "ack not sent: channel closed".into(),
            Err(e) => return format!("ack failed: {e}"),
        }
    }
    "consumer cancelled".into()
}

/// Everything needed to start a contender for one run.
pub struct Launch<'a> {
    /// The contender.
    pub contender: &'a Contender,
    /// Broker URL.
    pub url: &'a str,
    /// Queue.
    pub queue: &'a str,
    /// Queue type (the sidecar declares it).
    pub queue_type: QueueType,
    /// Consumer channels.
    pub consumers: u32,
    /// Prefetch per channel.
    pub prefetch: u16,
    /// Messages the run expects to be acked.
    pub expect: u64,
    /// Messages left out of the latency histogram.
    pub warmup: u64,
    /// Backend URLs.
    pub backends: &'a [String],
    /// The sidecar's `max_in_flight` for each backend.
    pub max_in_flight: u32,
    /// Path of the amqp-sidecar binary.
    pub sidecar_bin: &'a Path,
    /// Directory for generated configs and logs.
    pub work_dir: &'a Path,
    /// Unique name of the run (file names).
    pub run_name: &'a str,
}

/// The sidecar refused its configuration (exit 78), e.g. an unknown balancer name.
#[derive(Debug)]
pub struct ConfigRejected(pub String);

impl std::fmt::Display for ConfigRejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the sidecar rejected its config: {}", self.0)
    }
}

impl std::error::Error for ConfigRejected {}

/// A started contender process.
pub struct Running {
    child: Child,
    /// Its pid.
    pub pid: u32,
    lines: mpsc::Receiver<String>,
    admin: Option<String>,
    http: reqwest::Client,
    log: PathBuf,
    is_sidecar: bool,
}

/// Progress of a running contender.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    /// Acks so far.
    pub acked: u64,
    /// Dead-letters and requeues so far (sidecar only).
    pub failures: u64,
    /// Broker connection recoveries (sidecar only): the run was disturbed.
    pub recoveries: u64,
    /// The child's own report, once done (bench children only).
    pub child_done: Option<ChildDone>,
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// The sidecar's YAML config for a run.
fn sidecar_yaml(l: &Launch<'_>, balancer: &str, admin_port: u16) -> String {
    let mut y = String::new();
    let _ = writeln!(y, "amqp:\n  url: \"{}\"\n  queue: \"{}\"", l.url, l.queue);
    let _ = writeln!(
        y,
        "  queue_type: {}\n  prefetch: {}\n  consumers: {}",
        l.queue_type.as_str(),
        l.prefetch,
        l.consumers
    );
    y.push_str("backends:\n");
    for (i, url) in l.backends.iter().enumerate() {
        let _ = writeln!(
            y,
            "  - url: \"{url}\"\n    name: b{i}\n    max_in_flight: {}",
            l.max_in_flight
        );
    }
    let _ = writeln!(y, "balancer: {balancer}");
    let _ = writeln!(y, "admin:\n  listen: \"127.0.0.1:{admin_port}\"");
    y.push_str("log:\n  level: warn\n");
    y
}

/// Starts the contender.
///
/// # Errors
/// When the process cannot be spawned.
pub fn start(l: &Launch<'_>) -> anyhow::Result<Running> {
    let log = l.work_dir.join(format!("{}.log", l.run_name));
    let stderr = std::fs::File::create(&log)?;
    let (mut cmd, admin) = match l.contender {
        Contender::Sidecar(balancer) => {
            let port = free_port()?;
            let cfg = l.work_dir.join(format!("{}.yaml", l.run_name));
            std::fs::write(&cfg, sidecar_yaml(l, balancer, port))?;
            let mut cmd = Command::new(l.sidecar_bin);
            cmd.arg("--config").arg(&cfg);
            // Only the generated file configures it.
            for (k, _) in std::env::vars() {
                if k.starts_with("AMQP_SIDECAR_") {
                    cmd.env_remove(k);
                }
            }
            (cmd, Some(format!("http://127.0.0.1:{port}")))
        }
        Contender::Broker | Contender::Forwarder => {
            let mut cmd = Command::new(std::env::current_exe()?);
            let kind = if *l.contender == Contender::Broker {
                "bare"
            } else {
                "forward"
            };
            cmd.args([
                "contender",
                "--kind",
                kind,
                "--url",
                l.url,
                "--queue",
                l.queue,
            ])
            .args(["--consumers", &l.consumers.to_string()])
            .args(["--prefetch", &l.prefetch.to_string()])
            .args(["--expect", &l.expect.to_string()])
            .args(["--warmup", &l.warmup.to_string()]);
            if !l.backends.is_empty() {
                cmd.args(["--backends", &l.backends.join(",")]);
            }
            (cmd, None)
        }
    };
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(stderr))
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", l.contender.label()))?;
    let pid = child.id().context("child has no pid")?;
    let (tx, lines) = mpsc::channel(16);
    if let Some(out) = child.stdout.take() {
        tokio::spawn(async move {
            let mut reader = BufReader::new(out).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if tx.send(line).await.is_err() {
                    break;
                }
            }
        });
    }
    Ok(Running {
        child,
        pid,
        lines,
        admin,
        http: reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(2))
            .build()?,
        log,
        is_sidecar: matches!(l.contender, Contender::Sidecar(_)),
    })
}

/// The last lines of a log file.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(8)..].join("\n")
}

/// Sum of every sample of `name` in a Prometheus text page (the sidecar's own parser).
fn metric_sum(page: &str, name: &str) -> u64 {
    metrics::sample_sum(page, name, &[]) as u64
}

impl Running {
    /// Fails if the process has exited.
    ///
    /// # Errors
    /// [`ConfigRejected`] on exit code 78, otherwise an error with the log's tail.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            let tail = tail(&self.log);
            if status.code() == Some(78) {
                return Err(ConfigRejected(tail).into());
            }
            bail!("contender exited unexpectedly ({status}); log tail:\n{tail}");
        }
        Ok(())
    }

    /// Waits until it consumes.
    ///
    /// # Errors
    /// When it exits first or `timeout` passes.
    pub async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            self.check_alive()?;
            if let Some(admin) = &self.admin {
                if let Ok(r) = self.http.get(format!("{admin}/readyz")).send().await
                    && r.status().is_success()
                {
                    return Ok(());
                }
            } else {
                while let Ok(line) = self.lines.try_recv() {
                    if line == "ready" {
                        return Ok(());
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        bail!(
            "contender not ready after {timeout:?}; log tail:\n{}",
            tail(&self.log)
        )
    }

    /// Reads its progress (without blocking on a bench child).
    ///
    /// # Errors
    /// When the process has exited, or a bench child reports garbage.
    pub async fn progress(&mut self, last: &Progress) -> anyhow::Result<Progress> {
        self.check_alive()?;
        if let Some(admin) = &self.admin {
            let Ok(resp) = self.http.get(format!("{admin}/metrics")).send().await else {
                return Ok(last.clone());
            };
            let Ok(page) = resp.text().await else {
                return Ok(last.clone());
            };
            return Ok(Progress {
                acked: metric_sum(&page, metrics::ACKS),
                failures: metric_sum(&page, metrics::DEAD_LETTERS)
                    + metric_sum(&page, metrics::REQUEUES),
                recoveries: metric_sum(&page, metrics::CONNECTION_RECOVERIES),
                child_done: None,
            });
        }
        let mut p = last.clone();
        while let Ok(line) = self.lines.try_recv() {
            if let Some(json) = line.strip_prefix("done ") {
                let done: ChildDone =
                    serde_json::from_str(json).context("parsing the child's done line")?;
                p.acked = done.acked;
                p.child_done = Some(done);
            }
        }
        Ok(p)
    }

    /// CPU seconds used so far.
    ///
    /// # Errors
    /// When `/proc` cannot be read.
    pub fn cpu_seconds(&self) -> anyhow::Result<f64> {
        procstat::cpu_seconds(self.pid)
    }

    /// Current and peak RSS.
    ///
    /// # Errors
    /// When `/proc` cannot be read.
    pub fn memory(&self) -> anyhow::Result<procstat::Memory> {
        procstat::memory(self.pid)
    }

    /// Stops it: SIGTERM, then SIGKILL after `grace`. Returns the exit status.
    ///
    /// # Errors
    /// When the sidecar does not exit cleanly (status other than 0) after SIGTERM.
    pub async fn stop(mut self, grace: Duration) -> anyhow::Result<ExitStatus> {
        drop(self.child.stdin.take());
        procstat::signal(self.pid, libc::SIGTERM);
        let status = match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(s) => s?,
            Err(_) => {
                self.child.start_kill()?;
                let s = self.child.wait().await?;
                if self.is_sidecar {
                    bail!("the sidecar did not stop within {grace:?} of SIGTERM");
                }
                s
            }
        };
        if self.is_sidecar && !status.success() {
            bail!(
                "the sidecar exited with {status} after SIGTERM; log tail:\n{}",
                tail(&self.log)
            );
        }
        Ok(status)
    }
}
