//! Sizing the lookahead: the consumers beyond the backend slots (see the parent module).

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Capacity, lock};

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

#[cfg(test)]
mod tests {
    use super::*;

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
