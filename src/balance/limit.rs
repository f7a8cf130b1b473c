//! Learning a backend's concurrency limit from its latency (`max_in_flight: auto`).
//!
//! A worker does not say how many requests it can serve at once. Past that number,
//! requests queue inside it, where the balancer cannot see them, and their latency grows
//! while throughput does not. [`Limiter`] finds the number from latency alone, in the spirit
//! of TCP Vegas (Brakmo and Peterson, "TCP Vegas: End to End Congestion Avoidance on a
//! Global Internet", IEEE JSAC 1995) and of Netflix's concurrency-limits (`VegasLimit`,
//! `AIMDLimit`, <https://github.com/Netflix/concurrency-limits>): the latency the backend
//! shows when nothing queues in it is the baseline, and latency well above the baseline
//! means the limit is past the worker's capacity.
//!
//! # The rule
//! Requests are grouped into windows of `max(3 × limit, 15)` completed requests; the window
//! after a change is not judged (its requests were partly sent under the old limit), only
//! a drop in it counts. At the end of a judged window, with `m` its median latency and the baseline the lowest window median of the
//! last [`BASELINE_WINDOWS`] windows:
//! - a dropped request in the window (a timeout, 429 or 503: the worker says it is
//!   overloaded), or `m > baseline × TOLERANCE` in two windows in a row (one can be a busy
//!   machine's noise): **decrease** to `⌊limit × 0.9⌋`, at least by one (multiplicative
//!   decrease), and probe back up at the normal pace;
//! - otherwise, if the limit was reached during the window (demand was there to use more),
//!   and the last `probe_after` windows were good: **increase** by one (additive increase).
//!   A window below the limit says nothing about more concurrency, so it changes nothing.
//! - The increase (a probe) holds only if the next judged window shows more throughput
//!   (`in flight / mean latency`, Little's law) by at least half of what one more request
//!   would add if it did not queue; otherwise it is undone. This, not the baseline, stops
//!   the limit creeping up past the worker's capacity: a limit that queues a little, within
//!   the tolerance, never raised the throughput to get there.
//!
//! - Latency above the tolerance that two decreases in a row did not bring down (each
//!   lowered the throughput by more than 15%), or that shows at the minimum limit, was not
//!   caused by queueing in the worker (it got slower, or the machine busier): it becomes
//!   the new baseline, and the limit stays.
//!
//! `probe_after` starts at 1, doubles (up to [`MAX_PROBE_AFTER`]) each time an increase is
//! undone (its own window is over the tolerance, or shows no throughput gain), and returns to
//! 1 when an increase holds or a decrease starts a new regime. So a limit that has
//! found the worker's capacity probes above it rarely (under 1% of windows once settled),
//! which keeps the queueing a probe causes out of the latency percentiles, while a worker
//! that gains capacity is followed within a few probe intervals.
//!
//! Why not a crate: the adaptive limiters on crates.io (`tower-resilience-adaptive`,
//! `rate_limiter_aimd`) are `tower`/reqwest layers that own the semaphore. Here the pool
//! owns the in-flight counts, and the balancer must see each backend's limit to weigh the
//! backends by it, so only the estimator is needed.

use std::{collections::VecDeque, time::Duration};

/// Latency above the baseline by more than this factor means requests queue in the worker.
pub const TOLERANCE: f64 = 1.25;

/// Window means the baseline is the minimum of: long enough to remember an unqueued
/// window across a probe cycle, short enough to follow a worker that became slower for good.
pub const BASELINE_WINDOWS: usize = 64;

/// Most good windows between two probes above a limit that keeps being undone.
pub const MAX_PROBE_AFTER: u32 = 128;

/// Fewest requests in a window.
const MIN_WINDOW: usize = 15;

/// The multiplicative decrease.
const DECREASE: f64 = 0.9;

/// One backend's learned concurrency limit. Not thread-safe: the pool calls it under its
/// lock.
#[derive(Debug, Clone)]
pub struct Limiter {
    min: u32,
    max: u32,
    limit: u32,
    /// Latencies of the current window.
    window: Vec<Duration>,
    /// The limit was reached while the current window's requests were sent.
    limited: bool,
    /// A request in the current window was dropped.
    dropped: bool,
    means: VecDeque<Duration>,
    good_windows: u32,
    probe_after: u32,
    /// The last judged window ended with an increase: the limit before it, and that
    /// window's mean latency.
    probe: Option<(u32, Duration)>,
    /// The limit changed at the end of the last window: the next one is not judged, since
    /// its requests were partly sent under the old limit.
    settling: bool,
    /// The last judged window ended with a decrease for latency: the limit and mean then.
    decreased_from: Option<(u32, Duration)>,
    /// Decreases in a row that did not keep the throughput: latency that fewer requests
    /// in flight do not bring down is not queueing.
    futile: u32,
    /// Judged windows in a row above the tolerance (outside a probe).
    queued_streak: u32,
    /// The mean latency at the current limit, smoothed over its judged windows (an EWMA,
    /// weight 0.3): what a probe is compared with.
    level: Option<Duration>,
}

impl Limiter {
    /// A limiter that starts at `min` and stays within `[min, max]`.
    #[must_use]
    pub fn new(min: u32, max: u32) -> Self {
        let min = min.max(1);
        Self {
            min,
            max: max.max(min),
            limit: min,
            window: Vec::with_capacity(MIN_WINDOW),
            limited: false,
            dropped: false,
            means: VecDeque::with_capacity(BASELINE_WINDOWS),
            good_windows: 0,
            probe_after: 1,
            probe: None,
            settling: false,
            decreased_from: None,
            futile: 0,
            queued_streak: 0,
            level: None,
        }
    }

    /// The current limit.
    #[must_use]
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// The mean latency of the last window, once a window has ended.
    #[must_use]
    pub fn last_mean(&self) -> Option<Duration> {
        self.means.back().copied()
    }

    /// The baseline latency (the lowest recent window mean), once a window has ended.
    #[must_use]
    pub fn baseline(&self) -> Option<Duration> {
        self.means.iter().min().copied()
    }

    /// Records one answered request: its latency, the requests in flight to the backend
    /// when it was sent (itself included), and whether the worker shed it (a timeout, 429
    /// or 503). Returns the new limit when it changed.
    pub fn on_sample(&mut self, latency: Duration, in_flight: u32, dropped: bool) -> Option<u32> {
        self.window.push(latency);
        self.limited |= in_flight >= self.limit;
        self.dropped |= dropped;
        if self.window.len() < (3 * self.limit as usize).max(MIN_WINDOW) {
            return None;
        }
        let before = self.limit;
        self.end_window();
        (self.limit != before).then_some(self.limit)
    }

    fn end_window(&mut self) {
        // The mean, not the median: with one request more than the worker's slots, only
        // some requests queue (a third, at 4 on 3 slots), and the median would not see it.
        // By Little's law the mean grows with the requests queued in the worker.
        let mean = self.window.iter().sum::<Duration>() / self.window.len() as u32;
        self.window.clear();
        if std::mem::take(&mut self.settling) {
            self.limited = false;
            // A drop still counts: the worker said it is overloaded.
            if !std::mem::take(&mut self.dropped) {
                return;
            }
        }
        if self.means.len() == BASELINE_WINDOWS {
            self.means.pop_front();
        }
        self.means.push_back(mean);
        let baseline = self.baseline().unwrap_or(mean);
        let queued = mean.as_secs_f64() > baseline.as_secs_f64() * TOLERANCE;
        let (limited, dropped) = (self.limited, self.dropped);
        self.limited = false;
        self.dropped = false;
        let probe = self.probe.take();
        let decreased_from = self.decreased_from.take();
        // A decrease that lowered the throughput (`in flight / latency`) did not remove
        // queueing: the latency did not come down with the requests in flight.
        self.futile = match decreased_from {
            Some((before, before_mean)) if queued => {
                let kept = throughput(self.limit, mean) >= throughput(before, before_mean) * 0.85;
                if kept { 0 } else { self.futile + 1 }
            }
            _ => 0,
        };
        // Latency above the baseline that decreases do not bring down, or that shows at the
        // minimum, is not queueing we caused: the worker got slower (or the machine
        // busier). It becomes the new baseline, instead of pressing the limit down for good.
        if queued && !dropped && (self.limit == self.min || self.futile >= 2) {
            self.futile = 0;
            self.means.clear();
            self.means.push_back(mean);
            return;
        }
        self.queued_streak = if queued { self.queued_streak + 1 } else { 0 };
        // One window over the tolerance can be noise (a busy machine); two in a row, a drop,
        // or a probe's own window cannot.
        if dropped || (queued && (self.queued_streak >= 2 || probe.is_some())) {
            self.good_windows = 0;
            self.queued_streak = 0;
            if probe.is_some() {
                // The probe is undone; probe less often.
                self.probe_after = (self.probe_after * 2).min(MAX_PROBE_AFTER);
                self.set(self.limit - 1);
                return;
            }
            if queued && !dropped {
                self.decreased_from = Some((self.limit, mean));
            }
            // A new regime below the limits that held: probe back up at the normal pace.
            self.probe_after = 1;
            let decreased = (f64::from(self.limit) * DECREASE).floor() as u32;
            self.set(decreased.min(self.limit.saturating_sub(1)));
            return;
        }
        if queued {
            return;
        }
        if let Some((before, before_mean)) = probe {
            if gained(before, before_mean, self.limit, mean) {
                self.probe_after = 1;
            } else {
                // More requests in flight, no more throughput: they only queued.
                self.probe_after = (self.probe_after * 2).min(MAX_PROBE_AFTER);
                self.good_windows = 0;
                self.set(before);
                return;
            }
        }
        self.level = Some(match self.level {
            Some(level) => level.mul_f64(0.7) + mean.mul_f64(0.3),
            None => mean,
        });
        if !limited {
            return;
        }
        self.good_windows += 1;
        if self.good_windows >= self.probe_after && self.limit < self.max {
            self.good_windows = 0;
            self.probe = Some((self.limit, self.level.unwrap_or(mean)));
            self.set(self.limit + 1);
        }
    }

    /// Moves the limit (within bounds); the next window settles.
    fn set(&mut self, limit: u32) {
        let limit = limit.clamp(self.min, self.max);
        if limit != self.limit {
            self.settling = true;
            self.level = None;
        }
        self.limit = limit;
    }
}

/// Requests per second with `in_flight` requests in flight at `latency` (Little's law).
fn throughput(in_flight: u32, latency: Duration) -> f64 {
    f64::from(in_flight) / latency.as_secs_f64().max(f64::EPSILON)
}

/// Whether going from `before` requests in flight (mean latency `before_mean`) to `after`
/// (`after_mean`) raised the throughput, `in flight / latency` by Little's law, by at least
/// half of what the extra requests would add if none of them queued.
fn gained(before: u32, before_mean: Duration, after: u32, after_mean: Duration) -> bool {
    let ideal = f64::from(after) / f64::from(before.max(1));
    throughput(after, after_mean) >= throughput(before, before_mean) * (1.0 + (ideal - 1.0) / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A worker with `slots` internal slots and a fixed service time: requests beyond the
    /// slots queue inside it (FIFO). Simulated in discrete time, with demand always waiting,
    /// so the sidecar keeps `limit` requests in flight.
    struct SimWorker {
        slots: usize,
        service: Duration,
        /// When each internal slot is next free.
        free_at: Vec<Duration>,
    }

    impl SimWorker {
        fn new(slots: usize, service: Duration) -> Self {
            Self {
                slots,
                service,
                free_at: vec![Duration::ZERO; slots],
            }
        }
        fn resize(&mut self, slots: usize) {
            self.slots = slots;
            self.free_at.resize(slots, Duration::ZERO);
        }
        /// A request arriving at `now`: when it completes.
        fn serve(&mut self, now: Duration) -> Duration {
            let (i, at) = self
                .free_at
                .iter()
                .copied()
                .enumerate()
                .min_by_key(|&(_, t)| t)
                .expect("slots");
            let done = at.max(now) + self.service;
            self.free_at[i] = done;
            done
        }
    }

    /// Runs `requests` requests through `limiter` against `worker`, keeping `limit` in
    /// flight; calls `each(i, &mut worker)` before each send. Returns the limit after each
    /// request and the latencies.
    fn run(
        limiter: &mut Limiter,
        worker: &mut SimWorker,
        requests: usize,
        mut each: impl FnMut(usize, &mut SimWorker),
    ) -> (Vec<u32>, Vec<Duration>) {
        // (completion time, send time, in flight at send)
        let mut in_flight: Vec<(Duration, Duration, u32)> = Vec::new();
        let mut now = Duration::ZERO;
        let (mut limits, mut latencies) = (Vec::new(), Vec::new());
        let mut sent = 0;
        while sent < requests || !in_flight.is_empty() {
            while sent < requests && in_flight.len() < limiter.limit() as usize {
                each(sent, worker);
                let done = worker.serve(now);
                in_flight.push((done, now, in_flight.len() as u32 + 1));
                sent += 1;
            }
            in_flight.sort_by_key(|r| r.0);
            let (done, at, n) = in_flight.remove(0);
            now = done;
            // A little jitter, as a real machine has: ±2%.
            let jitter = 1.0 + 0.02 * ((sent as f64 * 0.37).sin());
            let latency = (done - at).mul_f64(jitter);
            latencies.push(latency);
            limiter.on_sample(latency, n, false);
            limits.push(limiter.limit());
        }
        (limits, latencies)
    }

    fn share_within(limits: &[u32], lo: u32, hi: u32) -> f64 {
        limits.iter().filter(|&&l| (lo..=hi).contains(&l)).count() as f64 / limits.len() as f64
    }

    #[test]
    fn converges_on_a_worker_with_a_fixed_capacity() {
        for slots in [1u32, 3, 8] {
            let mut limiter = Limiter::new(1, 64);
            let mut worker = SimWorker::new(slots as usize, Duration::from_millis(10));
            let (limits, _) = run(&mut limiter, &mut worker, 6_000, |_, _| {});
            let settled = &limits[limits.len() / 2..];
            // Settled at the capacity, probing one above now and then.
            let hi = slots;
            let share = share_within(settled, slots, hi);
            assert!(
                share > 0.9,
                "{slots} slots: within {slots}..={hi} only {:.0}% of the time after settling (limits {:?})",
                share * 100.0,
                &settled[..40]
            );
            assert!(
                settled.iter().all(|&l| l <= hi + 1),
                "{slots} slots: never more than one probe above"
            );
        }
    }

    #[test]
    fn backs_off_on_a_latency_step_and_follows_a_capacity_change() {
        let mut limiter = Limiter::new(1, 64);
        let mut worker = SimWorker::new(3, Duration::from_millis(10));
        // 3 slots, then 8, then 3 again.
        let (limits, _) = run(&mut limiter, &mut worker, 12_000, |i, w| match i {
            4_000 => w.resize(8),
            8_000 => w.resize(3),
            _ => {}
        });
        let at = |i: usize| limits[i];
        assert!((3..=4).contains(&at(3_900)), "before: {}", at(3_900));
        assert!(
            (8..=9).contains(&at(7_900)),
            "followed 3 -> 8: {}",
            at(7_900)
        );
        // The step back: latency jumps, and the limit comes down within a few windows.
        let back = (8_000..limits.len())
            .find(|&i| limits[i] <= 4)
            .expect("came back down");
        assert!(back - 8_000 < 400, "8 -> 3 took {} requests", back - 8_000);
        assert!((3..=4).contains(&at(11_900)), "after: {}", at(11_900));
    }

    #[test]
    fn stays_within_its_bounds() {
        // An infinitely parallel worker never pushes the limit past the maximum...
        let mut limiter = Limiter::new(2, 10);
        for _ in 0..10_000 {
            limiter.on_sample(Duration::from_millis(5), limiter.limit(), false);
        }
        assert_eq!(limiter.limit(), 10);
        // ... and drops never push it below the minimum.
        for _ in 0..10_000 {
            limiter.on_sample(Duration::from_millis(5), limiter.limit(), true);
        }
        assert_eq!(limiter.limit(), 2);
        assert_eq!(Limiter::new(0, 0).limit(), 1, "at least 1");
    }

    #[test]
    fn a_slower_worker_is_a_new_baseline_not_a_lower_limit() {
        let mut limiter = Limiter::new(1, 64);
        let mut worker = SimWorker::new(3, Duration::from_millis(10));
        // Every request takes twice as long from request 3,000 on (a busier machine).
        let (limits, _) = run(&mut limiter, &mut worker, 8_000, |i, w| {
            if i == 3_000 {
                w.service = Duration::from_millis(20);
            }
        });
        assert!(
            (3..=4).contains(&limits[2_900]),
            "before: {}",
            limits[2_900]
        );
        let after = &limits[5_000..];
        let share = share_within(after, 3, 3);
        assert!(
            share > 0.9,
            "back at the capacity after the slow-down {:.0}% of the time: {:?}",
            share * 100.0,
            &after[..40]
        );
    }

    #[test]
    fn demand_below_the_limit_does_not_raise_it() {
        let mut limiter = Limiter::new(1, 64);
        for _ in 0..1_000 {
            limiter.on_sample(Duration::from_millis(5), 1, false);
        }
        let raised = limiter.limit();
        for _ in 0..1_000 {
            // Only one request at a time, below the limit: says nothing about more.
            limiter.on_sample(Duration::from_millis(5), 1, false);
        }
        assert_eq!(limiter.limit(), raised);
    }
}
