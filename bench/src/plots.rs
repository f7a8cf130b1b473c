//! SVG plots (plotters, SVG backend, no font dependencies).

use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::{
    contender::Contender,
    report::{Record, grid_points, median},
    run::{Outcome, Phase, Workload},
};

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

fn color(i: usize) -> RGBColor {
    COLORS[i % COLORS.len()]
}

/// Writes every plot the records allow; returns the files written.
///
/// # Errors
/// When a file cannot be written.
pub fn all(records: &[Record], dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    let mut put = |name: &str, ok: bool| {
        if ok {
            written.push(dir.join(name));
        }
    };
    put(
        "throughput.svg",
        throughput(records, &dir.join("throughput.svg"))?,
    );
    put(
        "latency_cdf.svg",
        latency_cdf(records, &dir.join("latency_cdf.svg"))?,
    );
    put(
        "backend_queues.svg",
        backend_queues(records, &dir.join("backend_queues.svg"))?,
    );
    put(
        "soak_rss.svg",
        soak_rss(records, &dir.join("soak_rss.svg"))?,
    );
    Ok(written)
}

fn backlog(records: &[Record]) -> impl Iterator<Item = (&Record, &Outcome)> {
    records.iter().filter_map(|r| {
        (r.spec.workload == Workload::Fast && matches!(r.spec.phase, Phase::Backlog))
            .then_some(())
            .and(r.outcome.as_ref().map(|o| (r, o)))
    })
}

/// Throughput against consumers, one panel per (queue type, body size).
fn throughput(records: &[Record], path: &Path) -> anyhow::Result<bool> {
    let mut panels: Vec<(crate::broker::QueueType, usize)> = Vec::new();
    for p in grid_points(records) {
        if !panels.contains(&(p.queue_type, p.body)) {
            panels.push((p.queue_type, p.body));
        }
    }
    if panels.is_empty() {
        return Ok(false);
    }
    let cols = panels.len().min(2);
    let rows = panels.len().div_ceil(cols);
    let root = SVGBackend::new(path, (560 * cols as u32, 400 * rows as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let areas = root.split_evenly((rows, cols));
    for (area, &(qt, body)) in areas.iter().zip(&panels) {
        let runs: Vec<(&Record, &Outcome)> = backlog(records)
            .filter(|(r, _)| r.spec.queue_type == qt && r.spec.body == body)
            .collect();
        let ymax = runs.iter().map(|(_, o)| o.msgs_per_s).fold(1.0, f64::max) * 1.15;
        let xmax = runs
            .iter()
            .map(|(r, _)| f64::from(r.spec.consumers))
            .fold(1.0, f64::max);
        let mut chart = ChartBuilder::on(area)
            .caption(
                format!("{} queue, {} B bodies, prefetch 1", qt.as_str(), body),
                ("sans-serif", 16),
            )
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(64)
            .build_cartesian_2d((0.8f64..xmax * 1.25).log_scale(), 0f64..ymax)?;
        chart
            .configure_mesh()
            .x_desc("consumers")
            .y_desc("msg/s")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .draw()?;
        let mut contenders: Vec<Contender> = Vec::new();
        for (r, _) in &runs {
            if !contenders.contains(&r.spec.contender) {
                contenders.push(r.spec.contender.clone());
            }
        }
        for (i, c) in contenders.iter().enumerate() {
            // One point per consumer count: the median over the repetitions.
            let mut by_consumers: Vec<(u32, Vec<f64>)> = Vec::new();
            for (r, o) in runs.iter().filter(|(r, _)| r.spec.contender == *c) {
                match by_consumers
                    .iter_mut()
                    .find(|(n, _)| *n == r.spec.consumers)
                {
                    Some((_, v)) => v.push(o.msgs_per_s),
                    None => by_consumers.push((r.spec.consumers, vec![o.msgs_per_s])),
                }
            }
            let mut pts: Vec<(f64, f64)> = by_consumers
                .into_iter()
                .filter_map(|(n, v)| Some((f64::from(n), median(&v)?)))
                .collect();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            let col = color(i);
            chart
                .draw_series(LineSeries::new(pts, col.stroke_width(2)).point_size(3))?
                .label(c.label())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], col.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(true)
}

/// Latency CDFs of the paced runs at one grid point per queue type (small bodies, the
/// consumer count closest to 16; the first repetition).
fn latency_cdf(records: &[Record], path: &Path) -> anyhow::Result<bool> {
    let paced: Vec<(&Record, &Outcome)> = records
        .iter()
        .filter(|r| matches!(r.spec.phase, Phase::Paced { .. }) && r.spec.rep == 0)
        .filter_map(|r| r.outcome.as_ref().map(|o| (r, o)))
        .filter(|(_, o)| !o.latency.is_empty())
        .collect();
    let Some(body) = paced.iter().map(|(r, _)| r.spec.body).min() else {
        return Ok(false);
    };
    let Some(consumers) = paced
        .iter()
        .filter(|(r, _)| r.spec.body == body)
        .map(|(r, _)| r.spec.consumers)
        .min_by_key(|c| c.abs_diff(16))
    else {
        return Ok(false);
    };
    let lines: Vec<(&Record, &Outcome)> = paced
        .into_iter()
        .filter(|(r, _)| r.spec.body == body && r.spec.consumers == consumers)
        .collect();
    let max_ms = lines
        .iter()
        .flat_map(|(_, o)| o.latency.iter().map(|&(_, v)| v as f64 / 1000.0))
        .fold(0.1, f64::max);
    let min_ms = lines
        .iter()
        .flat_map(|(_, o)| o.latency.iter().map(|&(_, v)| v as f64 / 1000.0))
        .fold(f64::INFINITY, f64::min)
        .max(0.01);
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "End-to-end latency CDF at 50% of the forwarder's max rate ({body} B, {consumers} consumers)"
            ),
            ("sans-serif", 16),
        )
        .margin(14)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d((min_ms * 0.8..max_ms * 1.2).log_scale(), 0f64..1.0)?;
    chart
        .configure_mesh()
        .x_desc("latency, ms (log scale): publish → backend receipt")
        .y_desc("fraction of messages")
        .draw()?;
    for (i, (r, o)) in lines.iter().enumerate() {
        let col = color(i);
        let pts: Vec<(f64, f64)> = o
            .latency
            .iter()
            .map(|&(q, v)| ((v as f64 / 1000.0).max(min_ms), q))
            .collect();
        chart
            .draw_series(LineSeries::new(pts, col.stroke_width(2)))?
            .label(format!(
                "{} ({})",
                r.spec.contender.label(),
                r.spec.queue_type.as_str()
            ))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], col.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(true)
}

/// Per-backend queue length over time in the mixed-speed runs, one panel per contender.
fn backend_queues(records: &[Record], path: &Path) -> anyhow::Result<bool> {
    let runs: Vec<(&Record, &Outcome)> = records
        .iter()
        .filter(|r| r.spec.workload == Workload::Mixed)
        .filter_map(|r| r.outcome.as_ref().map(|o| (r, o)))
        .filter(|(_, o)| !o.in_flight.is_empty())
        .collect();
    if runs.is_empty() {
        return Ok(false);
    }
    let root = SVGBackend::new(path, (1000, 300 * runs.len() as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let areas = root.split_evenly((runs.len(), 1));
    let tmax = runs
        .iter()
        .filter_map(|(_, o)| o.in_flight.last().map(|s| s.0))
        .fold(0.1, f64::max);
    let qmax = runs
        .iter()
        .flat_map(|(_, o)| o.in_flight.iter().flat_map(|(_, v)| v.iter().copied()))
        .max()
        .unwrap_or(1)
        .max(1);
    let names = crate::run::MIXED_SERVICE_MS;
    for (area, (r, o)) in areas.iter().zip(&runs) {
        let mut chart = ChartBuilder::on(area)
            .caption(
                format!(
                    "{}: requests at each worker (served + waiting), {} consumers",
                    r.spec.contender.label(),
                    r.spec.consumers
                ),
                ("sans-serif", 15),
            )
            .margin(10)
            .x_label_area_size(32)
            .y_label_area_size(44)
            .build_cartesian_2d(0f64..tmax, 0f64..(qmax as f64 + 0.5))?;
        chart
            .configure_mesh()
            .x_desc("seconds")
            .y_desc("queue length")
            .draw()?;
        for (b, ms) in names.iter().enumerate() {
            let col = color(b);
            let pts: Vec<(f64, f64)> = o
                .in_flight
                .iter()
                .map(|(t, v)| (*t, v.get(b).copied().unwrap_or(0) as f64))
                .collect();
            chart
                .draw_series(LineSeries::new(pts, col.stroke_width(1)))?
                .label(format!("worker {b} ({ms} ms)"))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], col.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(true)
}

/// The sidecar's RSS over the soak.
fn soak_rss(records: &[Record], path: &Path) -> anyhow::Result<bool> {
    let Some((r, o)) = records
        .iter()
        .filter(|r| matches!(r.spec.phase, Phase::Soak { .. }))
        .find_map(|r| r.outcome.as_ref().map(|o| (r, o)))
    else {
        return Ok(false);
    };
    let pts: Vec<(f64, f64)> = o
        .rss
        .iter()
        .map(|&(t, k)| (t, k as f64 * 1024.0 / 1e6))
        .collect();
    let tmax = pts.last().map_or(1.0, |p| p.0.max(1.0));
    let ymax = pts.iter().map(|p| p.1).fold(1.0, f64::max) * 1.25;
    let root = SVGBackend::new(path, (900, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "{} RSS over a {}-message soak ({} consumers)",
                r.spec.contender.label(),
                r.spec.messages,
                r.spec.consumers
            ),
            ("sans-serif", 16),
        )
        .margin(14)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..tmax, 0f64..ymax)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("RSS, MB")
        .draw()?;
    chart.draw_series(LineSeries::new(pts, color(0).stroke_width(2)))?;
    root.present()?;
    Ok(true)
}
