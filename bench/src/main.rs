//! sidecar-bench: measures amqp-sidecar against the broker limit and a minimal forwarder,
//! in one run, on the same prepublished persistent messages, and writes tables and plots.
//!
//! ```text
//! cargo run --release -p sidecar-bench -- --smoke           # ~10 s, CI
//! cargo run --release -p sidecar-bench                      # the full grid -> docs/bench/
//! cargo run --release -p sidecar-bench -- --soak-only       # the 1,000,000-message soak
//! ```
//!
//! See BENCHMARKS.md for what is measured and how.

mod backends;
mod broker;
mod contender;
mod memory;
mod plots;
mod procstat;
mod report;
mod run;

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::Instant,
};

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::{
    broker::QueueType,
    contender::{ChildArgs, ConfigRejected, Contender},
    report::Record,
    run::{Ctx, Phase, Spec, Workload},
};

/// Benchmark harness: broker limit vs minimal forwarder vs amqp-sidecar.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// Tiny grid (~10 s): one scenario per contender. Exits non-zero only on real errors.
    #[arg(long)]
    smoke: bool,
    /// After the grid, run the soak too.
    #[arg(long)]
    soak: bool,
    /// Skip the throughput/latency grid (run the mixed-speed workload, and the soak if asked).
    #[arg(long)]
    skip_grid: bool,
    /// Run only the soak.
    #[arg(long, conflicts_with = "smoke")]
    soak_only: bool,
    /// Messages in the soak.
    #[arg(long, default_value_t = 1_000_000)]
    soak_messages: u64,
    /// Consumers in the soak.
    #[arg(long, default_value_t = 64)]
    soak_consumers: u32,
    /// Broker URL.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    url: String,
    /// The amqp-sidecar binary. Default: build it with `cargo build --release --bin
    /// amqp-sidecar` in the workspace and use that. Either way a private copy is run, so a
    /// rebuild during the bench cannot swap it.
    #[arg(long)]
    sidecar_bin: Option<PathBuf>,
    /// Messages per throughput run with small bodies.
    #[arg(long, default_value_t = 10_000)]
    messages: u64,
    /// Messages per throughput run with bodies over 1 KiB.
    #[arg(long, default_value_t = 2_000)]
    large_messages: u64,
    /// Consumer counts of the grid.
    #[arg(long, value_delimiter = ',', default_values_t = [1u32, 4, 16, 64])]
    consumers: Vec<u32>,
    /// Queue types of the grid.
    #[arg(long, value_delimiter = ',', default_values_t = [QueueType::Classic, QueueType::Quorum])]
    queue_types: Vec<QueueType>,
    /// Body sizes of the grid, bytes.
    #[arg(long, value_delimiter = ',', default_values_t = [128usize, 65_536])]
    bodies: Vec<usize>,
    /// Prefetch per consumer.
    #[arg(long, default_value_t = 1)]
    prefetch: u16,
    /// Balancers for the mixed-speed workload, passed to the sidecar as they are. The first
    /// one is also used for the throughput grid.
    #[arg(long, value_delimiter = ',', default_values_t = ["least_in_flight".to_owned(), "round_robin".to_owned()])]
    balancers: Vec<String>,
    /// Messages in each mixed-speed run.
    #[arg(long, default_value_t = 3_000)]
    mixed_messages: u64,
    /// Consumers in the mixed-speed runs (the sidecar gets max_in_flight consumers/4 per worker).
    #[arg(long, default_value_t = 16)]
    mixed_consumers: u32,
    /// Repetitions of each grid point (throughput and paced latency runs). Within a
    /// repetition the contenders run one after another, in an order rotated by one per
    /// repetition, so a slow drift of the machine does not always favour the same one; the
    /// tables show medians, and ratios and differences are paired within a repetition.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=50))]
    repeat: u32,
    /// Publish transient messages (delivery_mode 1) instead of persistent ones. A diagnostic:
    /// it takes the broker's disk writes out of the latency figures; the report says so.
    #[arg(long)]
    transient: bool,
    /// Before each measured run, wait for a quiet machine (under 10% CPU over 0.5 s, at most
    /// 20 s), so that the broker's clean-up after the previous run (queue deletion, message
    /// store compaction) does not land in it. Off by default: the live maximum rate then
    /// rises, and the 50% rate with it (see BENCHMARKS.md). Never in the smoke run.
    #[arg(long)]
    quiesce: bool,
    /// Seconds of each paced (50% load) latency run; 0 skips them.
    #[arg(long, default_value_t = 3.0)]
    latency_secs: f64,
    /// Where to write results.json, results.md and the SVG plots. Default docs/bench for a
    /// full run, nowhere for --smoke.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Do not run anything: read these results.json files (comma-separated, e.g. the grid's
    /// and the soak's), and write the combined tables and plots to --out (default docs/bench).
    #[arg(long, value_delimiter = ',')]
    replot: Vec<PathBuf>,
}

impl std::fmt::Display for QueueType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// The memory benchmark: peak RSS by body size and slots, with and without a budget.
    Memory {
        /// Where to write memory-run.json and memory_rss.svg.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Internal: a broker-limit or minimal-forwarder process (started by the bench).
    #[command(hide = true)]
    Contender(ChildArgs),
}

fn main() -> ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sidecar-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match cli.cmd {
            Some(Cmd::Contender(args)) => contender::child_main(args).await.map(|()| true),
            Some(Cmd::Memory { ref out }) => {
                let work_dir = std::env::temp_dir()
                    .join(format!("sidecar-bench-memory-{}", std::process::id()));
                std::fs::create_dir_all(&work_dir)?;
                let bin = sidecar_binary(cli.sidecar_bin.as_deref(), &work_dir)?;
                let result = memory::run(&cli.url, &bin, &work_dir, out.as_deref()).await;
                let _ = std::fs::remove_dir_all(&work_dir);
                result.map(|_| true)
            }
            None if !cli.replot.is_empty() => replot(&cli).map(|()| true),
            None => {
                // On Ctrl-C or SIGTERM the bench future is dropped, which kills the running
                // contender (kill_on_drop); its bench-* queue is left behind.
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
                tokio::select! {
                    r = bench(cli) => r,
                    _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted"),
                    _ = term.recv() => anyhow::bail!("terminated"),
                }
            }
        }
    });
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("sidecar-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root (the bench crate's parent directory).
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// Builds the sidecar (unless given) and copies it into `work_dir`.
fn sidecar_binary(given: Option<&Path>, work_dir: &Path) -> anyhow::Result<PathBuf> {
    let source = if let Some(p) = given {
        p.to_path_buf()
    } else {
        let root = workspace_root();
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        println!("building the sidecar: cargo build --release --bin amqp-sidecar");
        let mut cmd = std::process::Command::new(cargo);
        cmd.args(["build", "--release", "--bin", "amqp-sidecar"])
            .current_dir(&root);
        // `cargo run` sets CARGO_PKG_* and friends for this process; passing them on would
        // change build-script fingerprints and rebuild the sidecar's dependencies.
        for (k, _) in std::env::vars_os() {
            let name = k.to_string_lossy();
            if name.starts_with("CARGO_")
                && !matches!(name.as_ref(), "CARGO_HOME" | "CARGO_TARGET_DIR")
                && !name.starts_with("CARGO_BUILD_")
            {
                cmd.env_remove(&k);
            }
        }
        let status = cmd.status().context("running cargo build")?;
        anyhow::ensure!(status.success(), "cargo build of amqp-sidecar failed");
        let target =
            std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
        target.join("release").join("amqp-sidecar")
    };
    let copy = work_dir.join("amqp-sidecar");
    std::fs::copy(&source, &copy).with_context(|| format!("copying {}", source.display()))?;
    Ok(copy)
}

/// `--replot`: tables and plots from saved results.
fn replot(cli: &Cli) -> anyhow::Result<()> {
    let mut records: Vec<Record> = Vec::new();
    for path in &cli.replot {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut more: Vec<Record> =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        records.append(&mut more);
    }
    let dir = cli
        .out
        .clone()
        .unwrap_or_else(|| workspace_root().join("docs").join("bench"));
    std::fs::create_dir_all(&dir)?;
    let tables = report::markdown(&records);
    println!("{tables}");
    std::fs::write(dir.join("results.md"), &tables)?;
    for written in plots::all(&records, &dir)? {
        println!("wrote {}", written.display());
    }
    Ok(())
}

/// The grid to run.
struct Plan {
    queue_types: Vec<QueueType>,
    bodies: Vec<usize>,
    consumers: Vec<u32>,
    messages: u64,
    large_messages: u64,
    latency_secs: f64,
    repeat: u32,
    mixed_messages: u64,
    mixed_balancers: Vec<String>,
    grid: bool,
    mixed: bool,
    soak: bool,
}

fn plan(cli: &Cli) -> Plan {
    if cli.smoke {
        return Plan {
            queue_types: vec![QueueType::Classic],
            bodies: vec![128],
            consumers: vec![4],
            messages: 2_000,
            large_messages: 0,
            latency_secs: 1.0,
            repeat: 1,
            mixed_messages: 300,
            mixed_balancers: cli.balancers.iter().take(1).cloned().collect(),
            grid: true,
            mixed: true,
            soak: false,
        };
    }
    Plan {
        queue_types: cli.queue_types.clone(),
        bodies: cli.bodies.clone(),
        consumers: cli.consumers.clone(),
        messages: cli.messages,
        large_messages: cli.large_messages,
        latency_secs: cli.latency_secs,
        repeat: cli.repeat,
        mixed_messages: cli.mixed_messages,
        mixed_balancers: cli.balancers.clone(),
        grid: !cli.soak_only && !cli.skip_grid,
        mixed: !cli.soak_only,
        soak: cli.soak || cli.soak_only,
    }
}

/// The contenders in the order repetition `rep` runs them: rotated left by `rep`.
fn rotated(contenders: &[Contender], rep: u32) -> Vec<&Contender> {
    let n = contenders.len().max(1);
    let k = rep as usize % n;
    contenders[k..].iter().chain(&contenders[..k]).collect()
}

/// Runs one spec and records it; returns false on a real error.
async fn record(ctx: &Ctx, records: &mut Vec<Record>, spec: Spec) -> bool {
    let label = report::describe(&spec);
    let mut result = run::run(ctx, &spec).await;
    // The broker may be shared with tests that close connections or restart it: a run that
    // failed for another reason than lost messages or a rejected config is retried.
    for _ in 0..2 {
        match &result {
            Err(e)
                if e.downcast_ref::<ConfigRejected>().is_none()
                    && !format!("{e:#}").contains("LOST MESSAGES") =>
            {
                println!("{label}: retrying after: {e:#}");
                tokio::time::sleep(std::time::Duration::from_secs(3)).await;
                result = run::run(ctx, &spec).await;
            }
            _ => break,
        }
    }
    let ok = match &result {
        Ok(o) => {
            println!("{}", report::one_line(&spec, o));
            true
        }
        Err(e) if e.downcast_ref::<ConfigRejected>().is_some() => {
            println!("{label}: SKIPPED ({e:#})");
            true
        }
        Err(e) => {
            println!("{label}: ERROR {e:#}");
            false
        }
    };
    records.push(Record {
        spec,
        outcome: result.as_ref().ok().cloned(),
        error: result.err().map(|e| format!("{e:#}")),
    });
    ok
}

async fn bench(cli: Cli) -> anyhow::Result<bool> {
    let started = Instant::now();
    let plan = plan(&cli);
    let run_id = format!(
        "{}-{}",
        std::process::id(),
        broker::now_ns() / 1_000_000 % 1_000_000
    );
    let work_dir = std::env::temp_dir().join(format!("sidecar-bench-{run_id}"));
    std::fs::create_dir_all(&work_dir)?;
    let sidecar_bin = sidecar_binary(cli.sidecar_bin.as_deref(), &work_dir)?;
    let ctx = Ctx {
        broker: tokio::sync::Mutex::new(Some(std::sync::Arc::new(
            broker::Broker::connect(&cli.url).await?,
        ))),
        url: cli.url.clone(),
        sidecar_bin,
        work_dir: work_dir.clone(),
        run_id,
        counter: std::sync::atomic::AtomicU32::new(0),
        verbose: !cli.smoke,
        quiesce: cli.quiesce && !cli.smoke,
    };
    let sidecar = Contender::Sidecar(
        cli.balancers
            .first()
            .cloned()
            .unwrap_or_else(|| "least_in_flight".into()),
    );
    let contenders = [Contender::Broker, Contender::Forwarder, sidecar.clone()];
    let mut records = Vec::new();
    let mut ok = true;
    if plan.grid {
        for &qt in &plan.queue_types {
            for &body in &plan.bodies {
                let messages = if body > 1024 {
                    plan.large_messages
                } else {
                    plan.messages
                };
                for &consumers in &plan.consumers {
                    let base = Spec {
                        contender: Contender::Broker,
                        queue_type: qt,
                        consumers,
                        prefetch: cli.prefetch,
                        body,
                        messages,
                        phase: Phase::Backlog,
                        workload: Workload::Fast,
                        max_in_flight: consumers.div_ceil(run::FAST_BACKENDS as u32).max(1),
                        rep: 0,
                        transient: cli.transient,
                    };
                    for rep in 0..plan.repeat {
                        for c in rotated(&contenders, rep) {
                            let spec = Spec {
                                contender: c.clone(),
                                rep,
                                ..base.clone()
                            };
                            ok &= record(&ctx, &mut records, spec).await;
                        }
                    }
                    if plan.latency_secs <= 0.0 {
                        continue;
                    }
                    // The maximum rate with the publisher sharing the machine: the forwarder
                    // consuming while messages are published, with a bounded backlog.
                    let live = Spec {
                        contender: Contender::Forwarder,
                        phase: Phase::Live {
                            window: (messages / 5).clamp(100, 2_000),
                        },
                        ..base.clone()
                    };
                    ok &= record(&ctx, &mut records, live).await;
                    let Some(max) = report::find_live(&records, &base).map(|o| o.msgs_per_s) else {
                        continue;
                    };
                    let rate = (max * 0.5).max(10.0);
                    // Half a second of warm-up, left out of the latency figures.
                    let warmup = (rate * 0.5) as u64;
                    let n = ((rate * plan.latency_secs) as u64).max(200) + warmup;
                    for rep in 0..plan.repeat {
                        for c in rotated(&contenders, rep) {
                            let spec = Spec {
                                contender: c.clone(),
                                messages: n,
                                phase: Phase::Paced { rate, warmup },
                                rep,
                                ..base.clone()
                            };
                            ok &= record(&ctx, &mut records, spec).await;
                        }
                    }
                }
            }
        }
    }
    if plan.mixed {
        let mixed = Spec {
            contender: Contender::Forwarder,
            queue_type: QueueType::Classic,
            consumers: cli.mixed_consumers,
            prefetch: cli.prefetch,
            body: 128,
            messages: plan.mixed_messages,
            phase: Phase::Backlog,
            workload: Workload::Mixed,
            max_in_flight: cli.mixed_consumers.div_ceil(4).max(1),
            rep: 0,
            transient: cli.transient,
        };
        let mut mixed_contenders = vec![Contender::Forwarder];
        mixed_contenders.extend(plan.mixed_balancers.iter().cloned().map(Contender::Sidecar));
        for c in mixed_contenders {
            let spec = Spec {
                contender: c,
                ..mixed.clone()
            };
            ok &= record(&ctx, &mut records, spec).await;
        }
    }
    if plan.soak {
        let spec = Spec {
            contender: sidecar,
            queue_type: QueueType::Classic,
            consumers: cli.soak_consumers,
            prefetch: cli.prefetch,
            body: 128,
            messages: cli.soak_messages,
            phase: Phase::Soak { window: 20_000 },
            workload: Workload::Fast,
            max_in_flight: cli
                .soak_consumers
                .div_ceil(run::FAST_BACKENDS as u32)
                .max(1),
            rep: 0,
            transient: cli.transient,
        };
        println!("soak: {} messages, RSS sampled every second", spec.messages);
        ok &= record(&ctx, &mut records, spec).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let tables = report::markdown(&records);
    println!("\n{tables}");
    println!("total bench time: {elapsed:.0} s");
    let out = cli
        .out
        .clone()
        .or_else(|| (!cli.smoke).then(|| workspace_root().join("docs").join("bench")));
    if let Some(dir) = out {
        std::fs::create_dir_all(&dir)?;
        let prefix = if plan.grid || plan.mixed {
            "results"
        } else {
            "soak"
        };
        std::fs::write(
            dir.join(format!("{prefix}.json")),
            serde_json::to_string(&records)?,
        )?;
        std::fs::write(dir.join(format!("{prefix}.md")), &tables)?;
        for written in plots::all(&records, &dir)? {
            println!("wrote {}", written.display());
        }
    }
    if ok {
        let _ = std::fs::remove_dir_all(&work_dir);
    } else {
        println!(
            "FAILED: see the ERROR lines above; configs and logs are in {}",
            work_dir.display()
        );
    }
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_repetition_rotates_the_contender_order() {
        let all = [
            Contender::Broker,
            Contender::Forwarder,
            Contender::Sidecar("least_in_flight".into()),
        ];
        let order = |rep| rotated(&all, rep).into_iter().cloned().collect::<Vec<_>>();
        assert_eq!(order(0), all.to_vec());
        assert_eq!(
            order(1),
            vec![all[1].clone(), all[2].clone(), all[0].clone()]
        );
        assert_eq!(
            order(2),
            vec![all[2].clone(), all[0].clone(), all[1].clone()]
        );
        assert_eq!(order(3), all.to_vec());
    }
}
