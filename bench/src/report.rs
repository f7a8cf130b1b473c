//! Tables (Markdown, printed and written to results.md) and the target checks.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::{
    contender::Contender,
    run::{Outcome, Phase, Spec, Workload},
};

/// One run: its parameters, and what it measured or why it failed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    /// Parameters.
    pub spec: Spec,
    /// Measurements, when it succeeded.
    pub outcome: Option<Outcome>,
    /// The error, when it failed or was skipped.
    pub error: Option<String>,
}

impl Record {
    /// The first line of the error, or "" for a run that succeeded.
    fn error_line(&self) -> &str {
        self.error
            .as_deref()
            .and_then(|e| e.lines().next())
            .unwrap_or("")
    }
}

/// Human name of a body size.
fn size(body: usize) -> String {
    if body >= 1024 && body.is_multiple_of(1024) {
        format!("{} KiB", body / 1024)
    } else {
        format!("{body} B")
    }
}

/// One-line description of a spec.
pub fn describe(spec: &Spec) -> String {
    let phase = match spec.phase {
        Phase::Backlog => "backlog".to_owned(),
        Phase::Paced { rate, .. } => format!("paced {rate:.0}/s"),
        Phase::Live { .. } => "live".to_owned(),
        Phase::Soak { .. } => "soak".to_owned(),
    };
    let workload = if spec.workload == Workload::Mixed {
        " mixed"
    } else {
        ""
    };
    let transient = if spec.transient { " transient" } else { "" };
    let rep = if spec.rep > 0 {
        format!(" rep {}", spec.rep + 1)
    } else {
        String::new()
    };
    format!(
        "{:<28} {:<7} {:>6} c={:<2} n={:<7} {phase}{workload}{transient}{rep}",
        spec.contender.label(),
        spec.queue_type.as_str(),
        size(spec.body),
        spec.consumers,
        spec.messages
    )
}

fn us(v: Option<u64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{:.2}", v as f64 / 1000.0))
}

/// The progress line printed after each run.
pub fn one_line(spec: &Spec, o: &Outcome) -> String {
    format!(
        "{}: {:>8.0} msg/s  p50 {} p99 {} p999 {} ms  cpu {:.2} s/10k  rss {:.1} MB  ({:.1} s)",
        describe(spec),
        o.msgs_per_s,
        us(o.latency_at(0.5)),
        us(o.latency_at(0.99)),
        us(o.latency_at(0.999)),
        o.cpu_per_10k(spec.messages),
        mb(o.peak_rss_kib),
        o.wall_s
    )
}

fn mb(kib: u64) -> f64 {
    kib as f64 * 1024.0 / 1e6
}

fn same_point(a: &Spec, b: &Spec) -> bool {
    a.queue_type == b.queue_type
        && a.body == b.body
        && a.consumers == b.consumers
        && a.workload == b.workload
}

/// The backlog (throughput) outcomes of `contender` at `base`'s grid point, by repetition.
fn find<'a>(records: &'a [Record], base: &Spec, contender: &Contender) -> Reps<'a> {
    find_phase(records, base, contender, false)
}

/// The live (publishing while consuming) outcome of the forwarder at `base`'s grid point.
pub fn find_live<'a>(records: &'a [Record], base: &Spec) -> Option<&'a Outcome> {
    records
        .iter()
        .filter(|r| {
            same_point(&r.spec, base)
                && r.spec.contender == Contender::Forwarder
                && matches!(r.spec.phase, Phase::Live { .. })
        })
        .find_map(|r| r.outcome.as_ref())
}

/// The successful runs of one contender at one grid point and phase, as (repetition,
/// outcome), in run order.
struct Reps<'a>(Vec<(u32, &'a Outcome)>);

impl<'a> Reps<'a> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The median over the repetitions of `f`.
    fn median(&self, f: impl Fn(&Outcome) -> Option<f64>) -> Option<f64> {
        median(&self.0.iter().filter_map(|(_, o)| f(o)).collect::<Vec<_>>())
    }

    /// The largest `f` over the repetitions.
    fn max(&self, f: impl Fn(&Outcome) -> f64) -> Option<f64> {
        self.0.iter().map(|(_, o)| f(o)).reduce(f64::max)
    }

    /// `f(mine, theirs)` for every repetition both have: paired figures.
    fn paired(&self, other: &Reps<'a>, f: impl Fn(&Outcome, &Outcome) -> Option<f64>) -> Vec<f64> {
        self.0
            .iter()
            .filter_map(|(rep, a)| {
                let (_, b) = other.0.iter().find(|(r, _)| r == rep)?;
                f(a, b)
            })
            .collect()
    }
}

/// The median of the finite values in `v` (the mean of the middle two for an even count);
/// `None` when there are none. The tables and the throughput plot both use it.
pub fn median(v: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[mid]
    } else {
        f64::midpoint(v[mid - 1], v[mid])
    })
}

/// "median" for one value, "median (min–max)" for several; `-` for none. `signed` prints a
/// sign (differences).
fn spread(v: &[f64], decimals: usize, signed: bool) -> String {
    let Some(m) = median(v) else {
        return "-".into();
    };
    let f = |x: f64| {
        if signed {
            format!("{x:+.decimals$}")
        } else {
            format!("{x:.decimals$}")
        }
    };
    if v.len() < 2 {
        return f(m);
    }
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{} ({} … {})", f(m), f(lo), f(hi))
}

fn find_phase<'a>(
    records: &'a [Record],
    base: &Spec,
    contender: &Contender,
    paced: bool,
) -> Reps<'a> {
    Reps(
        records
            .iter()
            .filter(|r| {
                same_point(&r.spec, base)
                    && r.spec.contender == *contender
                    && match r.spec.phase {
                        Phase::Backlog => !paced,
                        Phase::Paced { .. } => paced,
                        Phase::Soak { .. } | Phase::Live { .. } => false,
                    }
            })
            .filter_map(|r| r.outcome.as_ref().map(|o| (r.spec.rep, o)))
            .collect(),
    )
}

/// The first sidecar contender among the records' throughput runs.
fn grid_sidecar(records: &[Record]) -> Option<Contender> {
    records
        .iter()
        .filter(|r| r.spec.workload == Workload::Fast && matches!(r.spec.phase, Phase::Backlog))
        .map(|r| r.spec.contender.clone())
        .find(|c| matches!(c, Contender::Sidecar(_)))
}

/// The distinct grid points (broker-limit backlog runs of the first repetition), in run
/// order.
pub fn grid_points(records: &[Record]) -> Vec<&Spec> {
    records
        .iter()
        .filter(|r| {
            r.spec.contender == Contender::Broker
                && r.spec.workload == Workload::Fast
                && r.spec.rep == 0
                && matches!(r.spec.phase, Phase::Backlog)
        })
        .map(|r| &r.spec)
        .collect()
}

/// Repetitions per grid point in these records (1 without `--repeat`).
fn repetitions(records: &[Record]) -> u32 {
    records.iter().map(|r| r.spec.rep + 1).max().unwrap_or(1)
}

/// Figures the targets are judged on.
#[derive(Debug, Default)]
struct Worst {
    throughput_ratio: Option<(f64, String)>,
    added_p99_ms: Option<(f64, String)>,
    cpu_ratio: Option<(f64, String)>,
    rss_64_mb: Option<(f64, String)>,
}

fn keep_min(slot: &mut Option<(f64, String)>, v: f64, at: String) {
    if slot.as_ref().is_none_or(|(w, _)| v < *w) {
        *slot = Some((v, at));
    }
}

fn keep_max(slot: &mut Option<(f64, String)>, v: f64, at: String) {
    if slot.as_ref().is_none_or(|(w, _)| v > *w) {
        *slot = Some((v, at));
    }
}

/// All tables and the target checks, as Markdown.
pub fn markdown(records: &[Record]) -> String {
    let mut md = String::new();
    let mut worst = Worst::default();
    let sidecar = grid_sidecar(records);
    let points = grid_points(records);
    let reps = repetitions(records);
    let transient = if records.iter().any(|r| r.spec.transient) {
        ", **transient messages** (diagnostic)"
    } else {
        ""
    };
    if let (Some(sc), false) = (&sidecar, points.is_empty()) {
        let _ = writeln!(
            md,
            "### Throughput (prepublished backlog, prefetch 1, 4 fast backends{transient})\n"
        );
        if reps > 1 {
            let _ = writeln!(
                md,
                "{reps} repetitions per point, contenders in rotated order. msg/s and CPU s/10k are medians; ratios are the median (min … max) of the ratios paired within each repetition; peak RSS is the largest.\n"
            );
        }
        md.push_str("| queue | body | consumers | broker msg/s | forwarder msg/s | sidecar msg/s | sidecar / forwarder | sidecar / broker | forwarder CPU s/10k | sidecar CPU s/10k | CPU ratio | forwarder peak RSS MB | sidecar peak RSS MB |\n");
        md.push_str("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        for p in &points {
            let b = find(records, p, &Contender::Broker);
            let f = find(records, p, &Contender::Forwarder);
            let s = find(records, p, sc);
            let at = format!(
                "{} {} c={}",
                p.queue_type.as_str(),
                size(p.body),
                p.consumers
            );
            let fmt =
                |r: Option<f64>, d: usize| r.map_or_else(|| "-".into(), |r| format!("{r:.d$}"));
            let ratio = |a: f64, b: f64| (b > 0.0).then(|| a / b);
            let rate = |o: &Outcome| Some(o.msgs_per_s);
            let cpu = |o: &Outcome| Some(o.cpu_per_10k(p.messages));
            let sf = s.paired(&f, |a, b| ratio(a.msgs_per_s, b.msgs_per_s));
            let sb = s.paired(&b, |a, b| ratio(a.msgs_per_s, b.msgs_per_s));
            let cr = s.paired(&f, |a, b| {
                ratio(a.cpu_per_10k(p.messages), b.cpu_per_10k(p.messages))
            });
            if let Some(v) = median(&sf) {
                keep_min(&mut worst.throughput_ratio, v, at.clone());
            }
            if let Some(v) = median(&cr) {
                keep_max(&mut worst.cpu_ratio, v, at.clone());
            }
            if let (Some(v), 64) = (s.max(|o| mb(o.peak_rss_kib)), p.consumers) {
                keep_max(&mut worst.rss_64_mb, v, at.clone());
            }
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                p.queue_type.as_str(),
                size(p.body),
                p.consumers,
                fmt(b.median(rate), 0),
                fmt(f.median(rate), 0),
                fmt(s.median(rate), 0),
                spread(&sf, 2, false),
                spread(&sb, 2, false),
                fmt(f.median(cpu), 3),
                fmt(s.median(cpu), 3),
                spread(&cr, 2, false),
                fmt(f.max(|o| mb(o.peak_rss_kib)), 1),
                fmt(s.max(|o| mb(o.peak_rss_kib)), 1),
            );
        }
        md.push('\n');

        let has_paced = records
            .iter()
            .any(|r| matches!(r.spec.phase, Phase::Paced { .. }) && r.outcome.is_some());
        if has_paced {
            let _ = writeln!(
                md,
                "### End-to-end latency at 50% of the forwarder's maximum live rate (publish → backend receipt; broker: → delivery){transient}, ms\n"
            );
            if reps > 1 {
                let _ = writeln!(
                    md,
                    "{reps} repetitions per point at the same paced rate. Quantiles are medians over the repetitions; the differences are the median (min … max) of the differences paired within each repetition.\n"
                );
            }
            md.push_str("| queue | body | consumers | forwarder live max msg/s | paced rate msg/s | broker p50 / p99 / p999 | forwarder p50 / p99 / p999 | sidecar p50 / p99 / p999 | sidecar − forwarder p50 | sidecar − forwarder p99 |\n");
            md.push_str("|---|---|---:|---:|---:|---|---|---|---:|---:|\n");
            for p in &points {
                let rate = records
                    .iter()
                    .filter(|r| same_point(&r.spec, p))
                    .find_map(|r| match r.spec.phase {
                        Phase::Paced { rate, .. } => Some(rate),
                        _ => None,
                    });
                let Some(rate) = rate else { continue };
                let ms = |o: &Outcome, q: f64| o.latency_at(q).map(|v| v as f64 / 1000.0);
                let triple = |r: &Reps<'_>| {
                    if r.is_empty() {
                        return "-".to_owned();
                    }
                    let m = |q: f64| {
                        r.median(|o| ms(o, q))
                            .map_or_else(|| "-".into(), |v| format!("{v:.2}"))
                    };
                    format!("{} / {} / {}", m(0.5), m(0.99), m(0.999))
                };
                let b = find_phase(records, p, &Contender::Broker, true);
                let f = find_phase(records, p, &Contender::Forwarder, true);
                let s = find_phase(records, p, sc, true);
                let diff = |q: f64| s.paired(&f, |a, b| Some(ms(a, q)? - ms(b, q)?));
                let d99 = diff(0.99);
                if let Some(v) = median(&d99) {
                    keep_max(
                        &mut worst.added_p99_ms,
                        v,
                        format!(
                            "{} {} c={}",
                            p.queue_type.as_str(),
                            size(p.body),
                            p.consumers
                        ),
                    );
                }
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {rate:.0} | {} | {} | {} | {} | {} |",
                    p.queue_type.as_str(),
                    size(p.body),
                    p.consumers,
                    find_live(records, p)
                        .map_or_else(|| "-".into(), |o| format!("{:.0}", o.msgs_per_s)),
                    triple(&b),
                    triple(&f),
                    triple(&s),
                    spread(&diff(0.5), 2, true),
                    spread(&d99, 2, true),
                );
            }
            md.push('\n');
        }
    }

    let mixed: Vec<&Record> = records
        .iter()
        .filter(|r| r.spec.workload == Workload::Mixed)
        .collect();
    let mut lif_makespan: Option<f64> = None;
    if !mixed.is_empty() {
        let n = mixed[0].spec.messages;
        let bound = crate::run::Workload::fluid_bound(n);
        let _ = writeln!(
            md,
            "### Mixed-speed workers (scripted service 2, 2, 10, 30 ms, one request at a time; {n} messages, {} consumers, classic)\n\nFluid bound (total work / total capacity) with the scripted service times: {bound:.3} s. The workers sleep with tokio's 1 ms timer, so their actual service times are longer; the measured bound uses each run's actual mean service times.\n",
            mixed[0].spec.consumers
        );
        md.push_str("| contender | makespan s | / scripted bound | actual service ms | measured bound s | makespan / measured bound | p50 ms | p99 ms | p999 ms | requests per backend (2 / 2 / 10 / 30 ms) |\n");
        md.push_str("|---|---:|---:|---|---:|---:|---:|---:|---:|---|\n");
        for r in &mixed {
            match &r.outcome {
                Some(o) => {
                    let actual = crate::run::Workload::fluid_bound_for(n, &o.service_ms);
                    let measured = if actual > 0.0 { actual } else { bound };
                    if r.spec.contender == Contender::Sidecar("least_in_flight".into()) {
                        lif_makespan = Some(o.makespan_s / measured);
                    }
                    let counts: Vec<String> = o.per_backend.iter().map(u64::to_string).collect();
                    let service: Vec<String> =
                        o.service_ms.iter().map(|v| format!("{v:.2}")).collect();
                    let _ = writeln!(
                        md,
                        "| {} | {:.3} | {:.3} | {} | {measured:.3} | {:.3} | {} | {} | {} | {} |",
                        r.spec.contender.label(),
                        o.makespan_s,
                        o.makespan_s / bound,
                        service.join(" / "),
                        o.makespan_s / measured,
                        us(o.latency_at(0.5)),
                        us(o.latency_at(0.99)),
                        us(o.latency_at(0.999)),
                        counts.join(" / ")
                    );
                }
                None => {
                    let _ = writeln!(
                        md,
                        "| {} | - | - | - | - | - | - | - | - | {} |",
                        r.spec.contender.label(),
                        r.error_line()
                    );
                }
            }
        }
        md.push('\n');
    }

    let mut soak_flat: Option<f64> = None;
    for r in records
        .iter()
        .filter(|r| matches!(r.spec.phase, Phase::Soak { .. }))
    {
        let Some(o) = &r.outcome else { continue };
        let flat = rss_flatness(&o.rss);
        soak_flat = flat.map(|f| f.2);
        let _ = writeln!(
            md,
            "### Soak ({} messages, {} consumers, {}, {})\n",
            r.spec.messages,
            r.spec.consumers,
            r.spec.queue_type.as_str(),
            r.spec.contender.label()
        );
        md.push_str("| msg/s | duration s | CPU s/10k | peak RSS MB | RSS after warm-up min / max MB | spread |\n|---:|---:|---:|---:|---|---:|\n");
        let _ = writeln!(
            md,
            "| {:.0} | {:.0} | {:.3} | {:.1} | {} | {} |\n",
            o.msgs_per_s,
            o.wall_s,
            o.cpu_per_10k(r.spec.messages),
            mb(o.peak_rss_kib),
            flat.map_or_else(|| "-".into(), |(lo, hi, _)| format!("{lo:.1} / {hi:.1}")),
            flat.map_or_else(|| "-".into(), |(_, _, s)| format!("±{:.1}%", s * 100.0)),
        );
        if let Some(mx) = o.rss.iter().map(|&(_, k)| k).max() {
            keep_max(
                &mut worst.rss_64_mb,
                mb(mx),
                format!("soak c={}", r.spec.consumers),
            );
        }
    }

    let errors: Vec<&Record> = records.iter().filter(|r| r.error.is_some()).collect();
    if !errors.is_empty() {
        md.push_str("### Failed or skipped runs\n\n");
        for r in errors {
            let _ = writeln!(
                md,
                "- {}: {}",
                describe(&r.spec)
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" "),
                r.error_line()
            );
        }
        md.push('\n');
    }

    md.push_str("### Targets\n\n| target | measured (worst grid point; medians over repetitions) | met |\n|---|---|---|\n");
    let verdict = |ok: bool| if ok { "yes" } else { "**no**" };
    let mut target =
        |name: &str, v: &Option<(f64, String)>, unit: &str, ok: &dyn Fn(f64) -> bool| {
            let _ = match v {
                Some((x, at)) => writeln!(
                    md,
                    "| {name} | {x:.2}{unit} at {at} | {} |",
                    verdict(ok(*x))
                ),
                None => writeln!(md, "| {name} | not measured | - |"),
            };
        };
    target(
        "sidecar ≥ 0.9 × forwarder throughput",
        &worst.throughput_ratio,
        "×",
        &|x| x >= 0.9,
    );
    target(
        "added p99 < 1 ms at 50% load",
        &worst.added_p99_ms,
        " ms",
        &|x| x < 1.0,
    );
    target(
        "sidecar CPU/msg ≤ 1.2 × forwarder",
        &worst.cpu_ratio,
        "×",
        &|x| x <= 1.2,
    );
    target(
        "RSS < 40 MB at 64 consumers",
        &worst.rss_64_mb,
        " MB",
        &|x| x < 40.0,
    );
    let flat = soak_flat.map(|s| (s * 100.0, "soak".to_owned()));
    target("RSS flat (±5%) over the soak", &flat, "%", &|x| x <= 5.0);
    let lif = lif_makespan.map(|x| (x, "mixed workload".to_owned()));
    target(
        "least_in_flight makespan ≤ 1.15 × fluid bound (actual service times)",
        &lif,
        "×",
        &|x| x <= 1.15,
    );
    md
}

/// RSS after warm-up (the first 10% of the samples, at least 5 s, dropped): (min MB, max MB,
/// half the spread relative to the mean).
pub fn rss_flatness(samples: &[(f64, u64)]) -> Option<(f64, f64, f64)> {
    let skip = (samples.len() / 10).max(5);
    let rest: Vec<f64> = samples.iter().skip(skip).map(|&(_, k)| mb(k)).collect();
    if rest.len() < 3 {
        return None;
    }
    let lo = rest.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = rest.iter().copied().fold(0.0, f64::max);
    let mean = rest.iter().sum::<f64>() / rest.len() as f64;
    Some((lo, hi, (hi - lo) / 2.0 / mean))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[f64::NAN, 5.0]), Some(5.0));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn spread_shows_the_range_only_for_several_values() {
        assert_eq!(spread(&[1.234], 2, false), "1.23");
        assert_eq!(spread(&[0.9, 1.1, 1.0], 2, false), "1.00 (0.90 … 1.10)");
        assert_eq!(spread(&[-0.5, 0.25], 2, true), "-0.12 (-0.50 … +0.25)");
        assert_eq!(spread(&[], 2, false), "-");
    }

    #[test]
    fn paired_figures_match_repetitions() {
        let o = |rate: f64| Outcome {
            msgs_per_s: rate,
            ..Outcome::default()
        };
        let (a0, a2, b0, b1) = (o(90.0), o(120.0), o(100.0), o(50.0));
        let a = Reps(vec![(0, &a0), (2, &a2)]);
        let b = Reps(vec![(0, &b0), (1, &b1)]);
        // Only repetition 0 is in both.
        assert_eq!(
            a.paired(&b, |x, y| Some(x.msgs_per_s / y.msgs_per_s)),
            vec![0.9]
        );
        assert_eq!(a.median(|x| Some(x.msgs_per_s)), Some(105.0));
        assert_eq!(b.max(|x| x.msgs_per_s), Some(100.0));
    }
}
