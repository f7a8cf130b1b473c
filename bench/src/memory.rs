//! The memory benchmark (issue 19): the sidecar's peak RSS (VmHWM) against the body size
//! (128 B, 64 KiB, 1 MiB, 15 MiB) and the backend slots (1, 8, 16), without and with a
//! memory budget (`memory.limit_bytes`), on bursts that fill every slot: a worker that takes
//! 300 ms per message, and 3 × slots + 8 persistent messages per run, published before the
//! sidecar starts.
//!
//! ```text
//! cargo run --release -p sidecar-bench -- memory [--out docs/bench]
//! ```

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Context;
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::{
    broker::{Broker, QueueType},
    procstat,
};

const MIB: u64 = 1024 * 1024;

/// Body sizes measured, bytes.
pub const BODIES: [usize; 4] = [128, 64 * 1024, MIB as usize, 15 * MIB as usize];
/// Backend slots measured.
pub const SLOTS: [u32; 3] = [1, 8, 16];
/// The budget of the budgeted runs, bytes.
pub const BUDGET: u64 = 64 * MIB;
/// The worker's service time.
const SERVICE: Duration = Duration::from_millis(300);

/// One run's figures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemoryRecord {
    /// Body size, bytes.
    pub body: usize,
    /// Backend slots (max_in_flight, and consumers).
    pub slots: u32,
    /// `memory.limit_bytes`, if set.
    pub budget: Option<u64>,
    /// Messages in the run.
    pub messages: u64,
    /// Peak RSS (VmHWM), bytes.
    pub peak_rss: u64,
    /// Deliveries the sidecar requeued or handed back (must be 0: nothing for memory).
    pub requeued: f64,
    /// Seconds from the sidecar's start to the last ack.
    pub seconds: f64,
}

/// Runs every body size × slots × {no budget, budget}; prints a table, writes
/// `memory-run.json` and `memory_rss.svg` under `out` (if given).
///
/// # Errors
/// A broker, process or file error.
pub async fn run(
    url: &str,
    sidecar_bin: &Path,
    work_dir: &Path,
    out: Option<&Path>,
) -> anyhow::Result<Vec<MemoryRecord>> {
    let worker = spawn_worker().await?;
    let broker = Broker::connect(url).await?;
    let mut records = Vec::new();
    println!(
        "memory: peak RSS of the sidecar, a worker at {} ms per message",
        SERVICE.as_millis()
    );
    println!(
        "{:>10} {:>6} {:>10} {:>9} {:>12} {:>9}",
        "body", "slots", "budget", "messages", "peak RSS MiB", "seconds"
    );
    for body in BODIES {
        for slots in SLOTS {
            for budget in [None, Some(BUDGET)] {
                let r = one(
                    &broker,
                    url,
                    sidecar_bin,
                    work_dir,
                    worker,
                    body,
                    slots,
                    budget,
                )
                .await?;
                println!(
                    "{:>10} {:>6} {:>10} {:>9} {:>12.1} {:>9.1}",
                    human(body as u64),
                    slots,
                    budget.map_or_else(|| "none".to_owned(), human),
                    r.messages,
                    r.peak_rss as f64 / MIB as f64,
                    r.seconds
                );
                anyhow::ensure!(
                    r.requeued == 0.0,
                    "deliveries requeued or handed back: {}",
                    r.requeued
                );
                records.push(r);
            }
        }
    }
    if let Some(dir) = out {
        std::fs::create_dir_all(dir)?;
        std::fs::write(
            dir.join("memory-run.json"),
            serde_json::to_string_pretty(&records)?,
        )?;
        plot(&records, &dir.join("memory_rss.svg"))?;
        println!("wrote {}/memory-run.json and memory_rss.svg", dir.display());
    }
    Ok(records)
}

fn human(bytes: u64) -> String {
    match bytes {
        b if b >= MIB => format!("{} MiB", b / MIB),
        b if b >= 1024 => format!("{} KiB", b / 1024),
        b => format!("{b} B"),
    }
}

#[allow(clippy::too_many_arguments)]
async fn one(
    broker: &Broker,
    url: &str,
    sidecar_bin: &Path,
    work_dir: &Path,
    worker: SocketAddr,
    body: usize,
    slots: u32,
    budget: Option<u64>,
) -> anyhow::Result<MemoryRecord> {
    let queue = format!(
        "bench-memory-{}-{body}-{slots}-{}",
        std::process::id(),
        budget.is_some()
    );
    broker.declare(&queue, QueueType::Classic).await?;
    let messages = u64::from(3 * slots + 8);
    let mut publisher = broker.publisher(&queue, body, true).await?;
    publisher.backlog(messages).await?;
    publisher.close().await;
    let admin = free_port()?;
    let config = work_dir.join(format!("{queue}.yaml"));
    let mut yaml = format!(
        "amqp:\n  url: \"{url}\"\n  queue: \"{queue}\"\n  queue_type: classic\n  consumers: {slots}\n\
         backends:\n  - url: \"http://{worker}/\"\n    name: w\n    max_in_flight: {slots}\n    timeout_ms: 60000\n\
         admin:\n  listen: \"127.0.0.1:{admin}\"\nlog:\n  level: warn\n"
    );
    if let Some(b) = budget {
        yaml.push_str(&format!("memory:\n  limit_bytes: {b}\n"));
    }
    std::fs::write(&config, yaml)?;
    let log = std::fs::File::create(work_dir.join(format!("{queue}.log")))?;
    let started = Instant::now();
    let mut child = tokio::process::Command::new(sidecar_bin)
        .arg("--config")
        .arg(&config)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .context("starting the sidecar")?;
    let pid = child.id().context("sidecar pid")?;
    let http = reqwest::Client::new();
    let metrics_url = format!("http://127.0.0.1:{admin}/metrics");
    let deadline = Instant::now() + Duration::from_secs(300);
    let (acked, requeued) = loop {
        let text = match http.get(&metrics_url).send().await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        let sum = |name: &str| amqp_sidecar::metrics::sample_sum(&text, name, &[("queue", &queue)]);
        let acked = sum(amqp_sidecar::metrics::ACKS);
        if acked as u64 >= messages {
            break (
                acked,
                sum(amqp_sidecar::metrics::REQUEUES) + sum(amqp_sidecar::metrics::RELEASES),
            );
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{queue}: {acked} of {messages} acked in 300 s"
        );
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("{queue}: the sidecar exited with {status}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let seconds = started.elapsed().as_secs_f64();
    let peak_rss = procstat::memory(pid)?.hwm_kib * 1024;
    procstat::signal(pid, libc::SIGTERM);
    let _ = tokio::time::timeout(Duration::from_secs(20), child.wait()).await;
    broker.delete(&queue).await;
    let _ = acked;
    Ok(MemoryRecord {
        body,
        slots,
        budget,
        messages,
        peak_rss,
        requeued,
        seconds,
    })
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// A worker that reads the whole body and answers 200 after [`SERVICE`], on its own
/// runtime thread so the measuring loop cannot slow it.
async fn spawn_worker() -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("worker runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            let app = axum::Router::new()
                .route(
                    "/",
                    axum::routing::post(|_body: axum::body::Bytes| async {
                        tokio::time::sleep(SERVICE).await;
                        "ok"
                    }),
                )
                .layer(axum::extract::DefaultBodyLimit::disable());
            let _ = axum::serve(listener, app).await;
        });
    });
    Ok(addr)
}

/// Peak RSS against body size, one line per slots × budget.
fn plot(records: &[MemoryRecord], path: &PathBuf) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let max_rss = records.iter().map(|r| r.peak_rss).max().unwrap_or(1) as f64 / MIB as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "amqp-sidecar peak RSS by body size (worker 300 ms/msg, bursts fill every slot)",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0usize..BODIES.len() - 1, 0f64..max_rss * 1.1)?;
    chart
        .configure_mesh()
        .x_labels(BODIES.len())
        .x_label_formatter(&|i| {
            BODIES
                .get(*i)
                .map_or_else(String::new, |b| human(*b as u64))
        })
        .x_desc("body size")
        .y_desc("peak RSS (MiB)")
        .draw()?;
    let colors = [RED, BLUE, GREEN];
    for (si, slots) in SLOTS.iter().enumerate() {
        for budget in [None, Some(BUDGET)] {
            let points: Vec<(usize, f64)> = BODIES
                .iter()
                .enumerate()
                .filter_map(|(i, b)| {
                    records
                        .iter()
                        .find(|r| r.body == *b && r.slots == *slots && r.budget == budget)
                        .map(|r| (i, r.peak_rss as f64 / MIB as f64))
                })
                .collect();
            let color = colors[si % colors.len()];
            let style = if budget.is_some() {
                color.stroke_width(2)
            } else {
                color.mix(0.5).stroke_width(2)
            };
            let label = format!(
                "{slots} slots, {}",
                budget.map_or_else(
                    || "no budget".to_owned(),
                    |b| format!("budget {}", human(b))
                )
            );
            let series = if budget.is_some() {
                chart.draw_series(LineSeries::new(points, style))?
            } else {
                chart.draw_series(DashedLineSeries::new(points, 6, 4, style))?
            };
            series
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(human(128), "128 B");
        assert_eq!(human(64 * 1024), "64 KiB");
        assert_eq!(human(15 * MIB), "15 MiB");
    }
}
