//! How many consumers are open, and why: the one place that decides it.
//!
//! Each consumer channel has basic.qos `prefetch` (1 by default), so the number of
//! consumers bounds the deliveries the pod holds. The target ([`Target`]) is the sum of:
//! - **slots**: `amqp.consumers`, or, when that is 0 (the default), the sum of the backends'
//!   concurrency limits: `max_in_flight`, or the limit learned with `max_in_flight: auto`
//!   (it follows the learned limits);
//! - **lookahead** (`amqp.consumers: 0` only): a few more, so that when a worker frees a
//!   slot a delivery is already at hand, instead of one broker round trip after the ack.
//!   Sized by [`LookaheadController`] from what it measures.
//!
//! The supervisor ([`crate::sidecar`]) follows [`Capacity::target`]: it opens a consumer (or
//! resubscribes an idle channel) when the target rises and cancels the newest one when it
//! falls. A cancelled consumer's channel stays open, so deliveries still in flight on it
//! can be settled.
//!
//! # Deliveries waiting out a backoff (`retry.mode: requeue`)
//! A delivery in backoff keeps its prefetch slot until it is requeued. So that it does not
//! take capacity from the backends meanwhile, it takes its consumer with it
//! ([`Wait::Beside`]): the dispatcher retires that consumer (basic.cancel; at prefetch 1 it
//! holds nothing else), and the supervisor opens another in its place. The consumer count
//! stays at the target; the pod holds one more unacked delivery per waiting one, at most
//! `retry.max_waiting` more. Retiring the delivery's own consumer, rather than opening an
//! extra one and cancelling some consumer later, means a cancel never races a delivery:
//! nothing is handed back, so nothing is counted as a delivery by RabbitMQ 3.x quorum queues.
//!
//! A failing delivery that finds `retry.max_waiting` reached is requeued at once, without
//! its backoff ([`Wait::Skip`]), counted in `amqp_sidecar_retry_backoff_skipped_total` and
//! logged at most once a minute. It is remembered (by content, a bounded LRU), so that if
//! it fails again while the bound is still reached it waits out its backoff in place,
//! holding its consumer ([`Wait::InPlace`]): no delivery is requeued twice in a row without
//! a backoff, so nothing loops hot, and the pod never holds more than the target plus
//! `retry.max_waiting` deliveries (times the prefetch).

use std::{
    collections::VecDeque,
    num::NonZeroUsize,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::Duration,
};

use lru::LruCache;
use serde::Serialize;
use tokio::{sync::watch, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::{config::Config, metrics};

/// How many consumers the sidecar wants, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Target {
    /// Consumers for the backend slots.
    pub slots: u32,
    /// Consumers beyond the slots, so a delivery is at hand when a slot frees.
    pub lookahead: u32,
}

impl Target {
    /// The number of consumers wanted.
    #[must_use]
    pub fn total(&self) -> u32 {
        self.slots.saturating_add(self.lookahead)
    }
}

/// Most deliveries remembered as requeued without their backoff.
const SKIPPED_CAPACITY: usize = 10_000;

/// How often the "backoff skipped" warning may be logged.
const SKIP_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// Round-trip samples kept for the lookahead.
const ROUND_TRIP_SAMPLES: usize = 64;

/// The consumer target, the retry waiting room, and what the lookahead is sized from.
pub struct Capacity {
    target: watch::Sender<Target>,
    max_waiting: u32,
    /// Deliveries waiting beside (their consumer retired and replaced).
    beside: AtomicU32,
    /// Deliveries waiting in place (holding their consumer).
    in_place: AtomicU32,
    /// Content keys of deliveries requeued without their backoff.
    skipped: Mutex<LruCache<u64, ()>>,
    /// When the skip warning was last logged.
    last_skip_log: Mutex<Option<Instant>>,
    /// Deliveries received, for the delivery rate.
    deliveries: AtomicU64,
    /// Recent ack-to-next-delivery round trips.
    round_trips: Mutex<VecDeque<Duration>>,
}

/// Where a failing delivery waits out its backoff.
#[derive(Debug)]
pub enum Wait {
    /// With its consumer retired and replaced; released when dropped.
    Beside(WaitPermit),
    /// Holding its own consumer (it was requeued without a backoff last time, and the
    /// bound is still reached); released when dropped.
    InPlace(WaitPermit),
    /// Not at all: requeue it now, without its backoff.
    Skip,
}

/// A delivery waiting out its backoff. Dropping it ends the wait, and the
/// `amqp_sidecar_retry_waiting` gauge goes down.
pub struct WaitPermit {
    capacity: Arc<Capacity>,
    beside: bool,
}

impl std::fmt::Debug for WaitPermit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WaitPermit")
            .field("beside", &self.beside)
            .finish_non_exhaustive()
    }
}

impl Drop for WaitPermit {
    fn drop(&mut self) {
        let count = if self.beside {
            &self.capacity.beside
        } else {
            &self.capacity.in_place
        };
        count.fetch_sub(1, Ordering::SeqCst);
        self.capacity.publish_gauge();
    }
}

impl Capacity {
    /// The target for `cfg`: [`Config::consumer_count`] slots and no lookahead yet, with up
    /// to [`Config::max_waiting`] deliveries waiting beside.
    #[must_use]
    pub fn new(cfg: &Config) -> Arc<Self> {
        Self::with(cfg.consumer_count(), cfg.max_waiting())
    }

    /// A target of `slots` consumers, with up to `max_waiting` deliveries waiting beside.
    #[must_use]
    pub fn with(slots: u32, max_waiting: u32) -> Arc<Self> {
        let capacity = Arc::new(Self {
            target: watch::Sender::new(Target {
                slots,
                lookahead: 0,
            }),
            max_waiting,
            beside: AtomicU32::new(0),
            in_place: AtomicU32::new(0),
            skipped: Mutex::new(LruCache::new(
                NonZeroUsize::new(SKIPPED_CAPACITY).unwrap_or(NonZeroUsize::MIN),
            )),
            last_skip_log: Mutex::new(None),
            deliveries: AtomicU64::new(0),
            round_trips: Mutex::new(VecDeque::with_capacity(ROUND_TRIP_SAMPLES)),
        });
        capacity.publish_gauge();
        metrics::set_lookahead(0);
        capacity
    }

    /// The target, updated on every change.
    #[must_use]
    pub fn target(&self) -> watch::Receiver<Target> {
        self.target.subscribe()
    }

    /// The target now.
    #[must_use]
    pub fn current(&self) -> Target {
        *self.target.borrow()
    }

    /// Sets the slots (the sum of the backends' limits changed).
    pub fn set_slots(&self, slots: u32) {
        self.target.send_if_modified(|t| {
            let changed = t.slots != slots;
            t.slots = slots;
            changed
        });
    }

    /// Sets the lookahead.
    pub fn set_lookahead(&self, lookahead: u32) {
        metrics::set_lookahead(lookahead);
        self.target.send_if_modified(|t| {
            let changed = t.lookahead != lookahead;
            t.lookahead = lookahead;
            changed
        });
    }

    /// Deliveries waiting out a backoff now (beside or in place).
    #[must_use]
    pub fn waiting(&self) -> u32 {
        self.beside
            .load(Ordering::SeqCst)
            .saturating_add(self.in_place.load(Ordering::SeqCst))
    }

    /// Counts a delivery, for the delivery rate.
    pub fn delivered(&self) {
        self.deliveries.fetch_add(1, Ordering::Relaxed);
    }

    /// Records a round trip: from a consumer's last settle to its next delivery.
    pub fn round_trip(&self, d: Duration) {
        let mut samples = lock(&self.round_trips);
        if samples.len() == ROUND_TRIP_SAMPLES {
            samples.pop_front();
        }
        samples.push_back(d);
    }

    /// Where the failing delivery with content key `key` waits out its backoff (see the
    /// module docs).
    pub fn wait(self: &Arc<Self>, key: u64) -> Wait {
        let beside = self
            .beside
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < self.max_waiting).then_some(n + 1)
            })
            .is_ok();
        let skipped_before = lock(&self.skipped).pop(&key).is_some();
        let wait = if beside {
            Wait::Beside(WaitPermit {
                capacity: Arc::clone(self),
                beside: true,
            })
        } else if skipped_before {
            self.in_place.fetch_add(1, Ordering::SeqCst);
            Wait::InPlace(WaitPermit {
                capacity: Arc::clone(self),
                beside: false,
            })
        } else {
            lock(&self.skipped).put(key, ());
            metrics::retry_backoff_skipped();
            self.log_skip();
            Wait::Skip
        };
        self.publish_gauge();
        wait
    }

    fn log_skip(&self) {
        let now = Instant::now();
        let mut last = lock(&self.last_skip_log);
        if last.is_none_or(|t| now.duration_since(t) >= SKIP_LOG_INTERVAL) {
            *last = Some(now);
            tracing::warn!(
                max_waiting = self.max_waiting,
                "retry.max_waiting deliveries already wait out a backoff: a failing delivery is requeued without its backoff \
                 (it waits in place if it fails again); see amqp_sidecar_retry_backoff_skipped_total. Logged at most once a minute"
            );
        }
    }

    fn publish_gauge(&self) {
        metrics::set_retry_waiting(self.waiting());
    }
}

/// How often the lookahead is re-sized.
const LOOKAHEAD_TICK: Duration = Duration::from_millis(200);

/// Ticks in a row a smaller lookahead must be wanted before the lookahead shrinks, so it
/// does not flap (cancelling a consumer can hand a delivery back).
const SHRINK_AFTER_TICKS: u32 = 5;

/// Headroom over the mean: deliveries are not evenly spaced, and a slot freed while the
/// lookahead is used up waits a whole round trip.
const HEADROOM: f64 = 2.0;

/// Below this many deliveries in transit per round trip, no lookahead: a slot then
/// rarely waits for one.
const NEGLIGIBLE: f64 = 0.1;

/// The lookahead for a delivery rate (per second) and a round trip: by Little's law the
/// deliveries in transit during one round trip are `rate × round trip`; the sidecar keeps
/// twice that as headroom, rounded up (ignoring the last tenth), at most `max`. 0 when next
/// to nothing is delivered.
#[must_use]
pub fn lookahead_for(rate_per_s: f64, round_trip: Duration, max: u32) -> u32 {
    let want = (rate_per_s * round_trip.as_secs_f64() * HEADROOM - NEGLIGIBLE).ceil();
    if want.is_finite() && want > 0.0 {
        (want as u32).min(max)
    } else {
        0
    }
}

/// Sizes the lookahead (`amqp.consumers: 0`): every 200 ms, from the delivery
/// rate and the round trip a consumer waits between its settle and its next delivery
/// (the 25th percentile of the recent samples, so that gaps while the queue was empty do
/// not count), at most `amqp.max_lookahead` (default: the slots). It grows at once and
/// shrinks only after 5 ticks (1 s) in a row.
pub struct LookaheadController {
    capacity: Arc<Capacity>,
    /// `amqp.max_lookahead`; `None`: the slots.
    max: Option<u32>,
}

impl LookaheadController {
    /// A controller for `capacity`, bounded by `max` (`None`: the slots).
    #[must_use]
    pub fn new(capacity: Arc<Capacity>, max: Option<u32>) -> Self {
        Self { capacity, max }
    }

    /// Runs until `stop` is cancelled.
    pub async fn run(self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(LOOKAHEAD_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = (
            Instant::now(),
            self.capacity.deliveries.load(Ordering::Relaxed),
        );
        let mut rate = 0.0f64;
        let mut lower_for = 0u32;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let now = Instant::now();
            let count = self.capacity.deliveries.load(Ordering::Relaxed);
            let elapsed = now.duration_since(last.0).as_secs_f64();
            if elapsed > 0.0 {
                let sample = (count - last.1) as f64 / elapsed;
                rate = if rate == 0.0 {
                    sample
                } else {
                    0.5 * rate + 0.5 * sample
                };
            }
            last = (now, count);
            let round_trip = {
                let samples = lock(&self.capacity.round_trips);
                let mut sorted: Vec<Duration> = samples.iter().copied().collect();
                sorted.sort_unstable();
                sorted.get(sorted.len() / 4).copied()
            };
            let current = self.capacity.current();
            let max = self.max.unwrap_or(current.slots);
            let want = round_trip.map_or(0, |rt| lookahead_for(rate, rt, max));
            tracing::trace!(
                rate_per_s = rate as u64,
                round_trip_us = round_trip.map_or(0, |d| d.as_micros() as u64),
                want,
                "lookahead"
            );
            if want >= current.lookahead {
                lower_for = 0;
                self.capacity.set_lookahead(want);
            } else {
                lower_for += 1;
                if lower_for >= SHRINK_AFTER_TICKS {
                    lower_for = 0;
                    self.capacity.set_lookahead(want);
                }
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiting_deliveries_are_bounded_and_counted() {
        let c = Capacity::with(2, 2);
        let a = c.wait(1);
        assert!(matches!(a, Wait::Beside(_)));
        let b = c.wait(2);
        assert!(matches!(b, Wait::Beside(_)));
        assert_eq!(c.waiting(), 2);
        assert_eq!(
            c.current().total(),
            2,
            "the consumer count stays at the target"
        );
        drop(a);
        drop(b);
        assert_eq!(c.waiting(), 0);
    }

    #[test]
    fn beyond_the_bound_a_delivery_skips_once_then_waits_in_place() {
        let c = Capacity::with(1, 1);
        let held = c.wait(1);
        assert!(matches!(held, Wait::Beside(_)));
        // Bound reached: message 2 is requeued without a backoff ...
        assert!(matches!(c.wait(2), Wait::Skip));
        // ... and when it fails again with the bound still reached, it waits in place.
        let in_place = c.wait(2);
        assert!(matches!(in_place, Wait::InPlace(_)));
        assert_eq!(c.waiting(), 2);
        drop(in_place);
        // Its skip was forgotten with the in-place wait: next time it skips again.
        assert!(matches!(c.wait(2), Wait::Skip));
        drop(held);
        // Below the bound, a skipped delivery waits beside, and its skip is forgotten.
        let beside = c.wait(2);
        assert!(matches!(beside, Wait::Beside(_)));
        assert!(matches!(c.wait(3), Wait::Skip));
    }

    #[test]
    fn a_zero_bound_never_waits_beside() {
        let c = Capacity::with(3, 0);
        assert!(matches!(c.wait(9), Wait::Skip));
        let w = c.wait(9);
        assert!(matches!(w, Wait::InPlace(_)));
    }

    /// Little's law sizing, against simulated rates and round trips.
    #[test]
    fn lookahead_follows_the_rate_times_the_round_trip() {
        let ms = Duration::from_millis;
        // The mixed workers (2, 2, 10, 30 ms, one slot each): ~770 deliveries/s;
        // a 1 ms round trip wants about 1.5 in transit, 2 with the headroom.
        assert_eq!(lookahead_for(770.0, ms(1), 4), 2);
        // A faster broker round trip needs less.
        assert_eq!(lookahead_for(770.0, Duration::from_micros(300), 4), 1);
        // Bounded by max_lookahead ...
        assert_eq!(lookahead_for(20_000.0, ms(1), 4), 4);
        // ... and 0 turns it off.
        assert_eq!(lookahead_for(20_000.0, ms(1), 0), 0);
        // Slow workers (1 s each, 4 slots: 4 deliveries/s) against a 1 ms round trip: 0.
        assert_eq!(lookahead_for(4.0, ms(1), 4), 0);
        // The same with a slow broker (50 ms round trip): 1.
        assert_eq!(lookahead_for(4.0, ms(50), 4), 1);
        // Nothing delivered: none.
        assert_eq!(lookahead_for(0.0, ms(1), 4), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_controller_grows_at_once_and_shrinks_slowly() {
        let c = Capacity::with(4, 0);
        let stop = CancellationToken::new();
        let task = tokio::spawn(LookaheadController::new(Arc::clone(&c), None).run(stop.clone()));
        // 1,000 deliveries/s with a 1 ms round trip: 2.
        for _ in 0..10 {
            for _ in 0..200 {
                c.delivered();
            }
            c.round_trip(Duration::from_millis(1));
            tokio::time::sleep(LOOKAHEAD_TICK).await;
        }
        assert_eq!(c.current().lookahead, 2);
        // The rate drops to nothing: the lookahead holds a while, then goes.
        tokio::time::sleep(LOOKAHEAD_TICK * 2).await;
        assert_eq!(c.current().lookahead, 2, "not at once");
        tokio::time::sleep(LOOKAHEAD_TICK * (SHRINK_AFTER_TICKS + 2)).await;
        assert_eq!(c.current().lookahead, 0);
        stop.cancel();
        task.await.expect("controller");
    }
}
