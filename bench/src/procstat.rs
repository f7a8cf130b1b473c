//! CPU time and memory of a process, read from `/proc/<pid>/stat` and `/proc/<pid>/status`,
//! and the machine's CPU use from `/proc/stat` (to start each run on a quiet machine).

use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// CPU seconds (user + system, all threads) the process has used so far.
///
/// # Errors
/// When `/proc/<pid>/stat` cannot be read or parsed (e.g. the process is gone).
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name (field 2) is in parentheses and may hold spaces: split after the last ')'.
    let Some(close) = text.rfind(')') else {
        bail!("malformed /proc/{pid}/stat");
    };
    let fields: Vec<&str> = text[close + 1..].split_whitespace().collect();
    // fields[0] is field 3 (state); utime is field 14 and stime field 15.
    let (Some(utime), Some(stime)) = (fields.get(11), fields.get(12)) else {
        bail!("short /proc/{pid}/stat");
    };
    let ticks: u64 = utime.parse::<u64>()? + stime.parse::<u64>()?;
    Ok(ticks as f64 / clock_ticks_per_second())
}

/// `sysconf(_SC_CLK_TCK)`, the unit of the times in `/proc/<pid>/stat`.
fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions; it only reads a system constant.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// Memory figures of a process, in KiB.
#[derive(Debug, Clone, Copy, Default)]
pub struct Memory {
    /// Current resident set size (`VmRSS`).
    pub rss_kib: u64,
    /// Peak resident set size (`VmHWM`).
    pub hwm_kib: u64,
}

/// Reads `VmRSS` and `VmHWM` from `/proc/<pid>/status`.
///
/// # Errors
/// When the file cannot be read (e.g. the process is gone).
pub fn memory(pid: u32) -> anyhow::Result<Memory> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let field = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok(Memory {
        rss_kib: field("VmRSS:"),
        hwm_kib: field("VmHWM:"),
    })
}

/// Sends `signal` to `pid`.
pub fn signal(pid: u32, signal: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) has no memory-safety preconditions; a stale pid only yields ESRCH.
    unsafe {
        libc::kill(pid, signal);
    }
}

/// Machine-wide CPU time from the first line of `/proc/stat`, in clock ticks: (busy, total).
/// Idle and iowait count as not busy; guest time is already inside user time.
fn machine_ticks() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .take(8)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let [user, nice, system, idle, iowait, irq, softirq, steal] = v[..] else {
        return None;
    };
    let busy = user + nice + system + irq + softirq + steal;
    Some((busy, busy + idle + iowait))
}

/// How a wait for a quiet machine ended.
#[derive(Debug, Clone, Copy)]
pub struct Quiesced {
    /// How long it waited.
    pub waited: Duration,
    /// Whether the machine was quiet in the end (false: the deadline passed first).
    pub quiet: bool,
}

/// Waits until the whole machine used less than `max_busy` (0..1) of its CPUs over one
/// `window`, or until `deadline` passes.
///
/// The broker keeps working after a run: it deletes the run's queue and its messages,
/// compacts its message store and collects garbage, and that work can land in the next run
/// (in the main report the first paced run after each live run often had p99 spikes for
/// every contender, the bare broker consumer included). Waiting on the condition (not a
/// fixed pause) keeps quiet runs fast. It did not make the p99 steadier, see BENCHMARKS.md
/// ("Tail latency"). Where `/proc/stat` cannot be read it returns at once.
pub async fn quiesce(max_busy: f64, window: Duration, deadline: Duration) -> Quiesced {
    let started = Instant::now();
    let Some(mut last) = machine_ticks() else {
        return Quiesced {
            waited: Duration::ZERO,
            quiet: true,
        };
    };
    loop {
        tokio::time::sleep(window).await;
        let Some(now) = machine_ticks() else {
            break;
        };
        let (busy, total) = (now.0.saturating_sub(last.0), now.1.saturating_sub(last.1));
        last = now;
        if total > 0 && (busy as f64) < max_busy * total as f64 {
            return Quiesced {
                waited: started.elapsed(),
                quiet: true,
            };
        }
        if started.elapsed() >= deadline {
            break;
        }
    }
    Quiesced {
        waited: started.elapsed(),
        quiet: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_ticks_advance_and_busy_is_part_of_total() {
        let (busy0, total0) = machine_ticks().expect("/proc/stat readable on Linux");
        assert!(busy0 <= total0);
        // Spin until the kernel has counted at least one more tick somewhere.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut now = (busy0, total0);
        while now.1 == total0 && Instant::now() < deadline {
            now = machine_ticks().expect("/proc/stat readable on Linux");
        }
        assert!(now.1 > total0, "no CPU time counted in 5 s");
        assert!(now.0 >= busy0 && now.0 - busy0 <= now.1 - total0);
    }

    #[tokio::test]
    async fn quiesce_gives_up_at_its_deadline_when_nothing_counts_as_quiet() {
        // Less than 0% busy is never true.
        let q = quiesce(0.0, Duration::from_millis(50), Duration::from_millis(200)).await;
        assert!(!q.quiet);
        assert!(q.waited >= Duration::from_millis(200));
        // Less than 101% busy is always true after one window.
        let q = quiesce(1.01, Duration::from_millis(50), Duration::from_secs(5)).await;
        assert!(q.quiet);
        assert!(q.waited < Duration::from_secs(5));
    }
}
