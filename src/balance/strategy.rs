//! Balancing strategies. Each respects `max_in_flight` and skips backends that are ejected
//! or unhealthy (a [`Load`] whose `usable` is false).
//!
//! - [`LeastInFlight`] (default): join-the-shortest-queue (JSQ), the queue length being the
//!   number of requests in flight, normalised by weight; ties rotate. JSQ is delay-optimal
//!   for identical servers (Winston, "Optimality of the shortest line discipline", J. Appl.
//!   Prob. 14(1), 1977); Envoy and Linkerd call it least-request / least-loaded.
//! - [`PowerOfTwo`]: two distinct random candidates, keep the less loaded (Mitzenmacher,
//!   "The Power of Two Choices in Randomized Load Balancing", IEEE TPDS 12(10), 2001; tower's
//!   `balance::p2c`). Near-JSQ quality without scanning every backend.
//! - [`RoundRobin`]: strictly in turn. When the backend whose turn it is has no free slot,
//!   the delivery waits for it: the baseline that ignores load, as a plain round-robin proxy
//!   does.
//! - [`WeightedRoundRobin`]: smooth weighted round robin, as in nginx
//!   (`ngx_http_upstream_get_peer`, nginx commit 52327e0627f4, 2012): each pick adds every
//!   backend's weight to its current weight, takes the largest, and subtracts the total from
//!   it, so a 5:1:1 split goes `a a b a c a a`, not `a a a a a b c`. Strict like round robin.
//! - [`RandomPick`]: uniformly among backends with a free slot.
//!
//! Randomised strategies take an injected random generator so tests can seed it.

use rand::{Rng, SeedableRng, rngs::StdRng};

use super::{Balance, Load};

/// `a` is less loaded than `b`: `a.in_flight / a.weight < b.in_flight / b.weight`.
fn less_loaded(a: &Load, b: &Load) -> bool {
    u64::from(a.in_flight) * u64::from(b.weight) < u64::from(b.in_flight) * u64::from(a.weight)
}

/// Join-the-shortest-queue by `in_flight / weight`; the scan starts after the last pick, so
/// equal backends share the work.
#[derive(Debug, Default)]
pub struct LeastInFlight {
    /// Where the next scan starts: one past the last pick.
    cursor: usize,
}

impl Balance for LeastInFlight {
    fn pick(&mut self, loads: &[Load]) -> Option<usize> {
        let n = loads.len();
        let mut best: Option<usize> = None;
        for step in 0..n {
            let i = (self.cursor + step) % n;
            if loads[i].has_capacity() && best.is_none_or(|b| less_loaded(&loads[i], &loads[b])) {
                best = Some(i);
            }
        }
        if let Some(i) = best {
            self.cursor = (i + 1) % n;
        }
        best
    }
}

/// A strategy that draws from a random generator: the struct, `new()` (seeded from the OS),
/// `Default`, and `with_rng()` (tests seed it).
macro_rules! randomized_strategy {
    ($(#[$doc:meta])* $t:ident) => {
        $(#[$doc])*
        #[derive(Debug)]
        pub struct $t<R = StdRng> {
            rng: R,
        }

        impl $t<StdRng> {
            /// Seeded from the OS.
            #[must_use]
            pub fn new() -> Self {
                Self::with_rng(StdRng::from_os_rng())
            }
        }

        impl Default for $t<StdRng> {
            fn default() -> Self {
                Self::new()
            }
        }

        impl<R: Rng> $t<R> {
            /// With an injected generator (tests seed it).
            pub fn with_rng(rng: R) -> Self {
                Self { rng }
            }
        }
    };
}

randomized_strategy!(
    /// Power of two choices over the backends with a free slot.
    PowerOfTwo
);

/// The backends with a free slot.
fn with_capacity(loads: &[Load]) -> Vec<usize> {
    (0..loads.len())
        .filter(|&i| loads[i].has_capacity())
        .collect()
}

impl<R: Rng + Send> Balance for PowerOfTwo<R> {
    fn pick(&mut self, loads: &[Load]) -> Option<usize> {
        let free = with_capacity(loads);
        match free.len() {
            0 => None,
            1 => Some(free[0]),
            n => {
                let a = self.rng.random_range(0..n);
                // A second, distinct candidate.
                let b = (a + self.rng.random_range(1..n)) % n;
                let (a, b) = (free[a], free[b]);
                Some(if less_loaded(&loads[b], &loads[a]) {
                    b
                } else {
                    a
                })
            }
        }
    }
}

/// Strict round robin over the usable backends.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: usize,
}

impl Balance for RoundRobin {
    fn pick(&mut self, loads: &[Load]) -> Option<usize> {
        let n = loads.len();
        // Whose turn it is: the next usable backend from the cursor.
        let i = (0..n)
            .map(|step| (self.next + step) % n)
            .find(|&i| loads[i].usable)?;
        if !loads[i].has_capacity() {
            return None; // its turn, but full: wait for it
        }
        self.next = (i + 1) % n;
        Some(i)
    }
}

/// Smooth weighted round robin (nginx) over the usable backends.
#[derive(Debug, Default)]
pub struct WeightedRoundRobin {
    current: Vec<i64>,
}

impl Balance for WeightedRoundRobin {
    fn pick(&mut self, loads: &[Load]) -> Option<usize> {
        if self.current.len() != loads.len() {
            self.current = vec![0; loads.len()];
        }
        let mut next = self.current.clone();
        let mut total = 0i64;
        let mut best: Option<usize> = None;
        for (i, l) in loads.iter().enumerate() {
            if !l.usable {
                continue;
            }
            let w = i64::from(l.weight.max(1));
            next[i] += w;
            total += w;
            if best.is_none_or(|b| next[i] > next[b]) {
                best = Some(i);
            }
        }
        let i = best?;
        if !loads[i].has_capacity() {
            return None; // its turn, but full: wait without advancing the sequence
        }
        next[i] -= total;
        self.current = next;
        Some(i)
    }
}

randomized_strategy!(
    /// Uniformly random among the backends with a free slot.
    RandomPick
);

impl<R: Rng + Send> Balance for RandomPick<R> {
    fn pick(&mut self, loads: &[Load]) -> Option<usize> {
        let free = with_capacity(loads);
        if free.is_empty() {
            None
        } else {
            Some(free[self.rng.random_range(0..free.len())])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(in_flight: u32, max_in_flight: u32, weight: u32) -> Load {
        Load::new(in_flight, max_in_flight, weight)
    }

    fn unusable(mut l: Load) -> Load {
        l.usable = false;
        l
    }

    fn seeded() -> StdRng {
        StdRng::seed_from_u64(42)
    }

    /// Every strategy: never a full or unusable backend, None when nothing is free, and the
    /// backend with room when it is the only one. The load-aware strategies take it on every
    /// pick; the strict ones take it on their first pick (its turn, weight 5 of 8 in the
    /// weighted sequence), then wait for full backend 1 or 3 whose turn comes next.
    #[test]
    fn all_strategies_respect_capacity_and_usability() {
        let strategies: Vec<(&str, Box<dyn Balance>, bool)> = vec![
            ("least_in_flight", Box::new(LeastInFlight::default()), false),
            (
                "power_of_two",
                Box::new(PowerOfTwo::with_rng(seeded())),
                false,
            ),
            ("round_robin", Box::new(RoundRobin::default()), true),
            (
                "weighted_round_robin",
                Box::new(WeightedRoundRobin::default()),
                true,
            ),
            ("random", Box::new(RandomPick::with_rng(seeded())), false),
        ];
        let loads = [
            load(0, 3, 5),
            load(2, 2, 1),
            unusable(load(0, 5, 1)),
            load(3, 3, 2),
        ];
        for (name, mut s, strict) in strategies {
            let picks: Vec<Option<usize>> = (0..200).map(|_| s.pick(&loads)).collect();
            assert_eq!(
                picks[0],
                Some(0),
                "{name}: backend 0, the only one usable with room, on the first pick"
            );
            if strict {
                assert!(
                    picks[1..].iter().all(Option::is_none),
                    "{name}: waits for the full backend whose turn it is: {picks:?}"
                );
            } else {
                assert!(
                    picks.iter().all(|p| *p == Some(0)),
                    "{name}: only backend 0 is usable with room: {picks:?}"
                );
            }
            let none = [load(1, 1, 1), unusable(load(0, 1, 1))];
            assert_eq!(s.pick(&none), None, "{name}: nothing is free");
        }
    }

    #[test]
    fn least_in_flight_picks_shortest_queue_by_weight() {
        let mut b = LeastInFlight::default();
        assert_eq!(
            b.pick(&[load(3, 10, 1), load(1, 10, 1), load(2, 10, 1)]),
            Some(1)
        );
        // 2/1 = 2 versus 3/3 = 1: the heavier backend is less loaded.
        assert_eq!(b.pick(&[load(2, 10, 1), load(3, 10, 3)]), Some(1));
        assert_eq!(b.pick(&[load(1, 1, 1), load(5, 6, 1)]), Some(1));
    }

    #[test]
    fn least_in_flight_rotates_ties() {
        let mut b = LeastInFlight::default();
        let idle = [load(0, 1, 1), load(0, 1, 1), load(0, 1, 1)];
        let picks: Vec<_> = (0..6).map(|_| b.pick(&idle).expect("free")).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn power_of_two_keeps_the_less_loaded_of_two_distinct_candidates() {
        let mut b = PowerOfTwo::with_rng(seeded());
        // Backend 0 is the most loaded: it could only be kept if both candidates were backend
        // 0, which never happens, since the candidates are distinct and every other backend
        // is less loaded.
        let loads = [
            load(9, 10, 1),
            load(1, 10, 1),
            load(2, 10, 1),
            load(3, 10, 1),
        ];
        let mut counts = [0usize; 4];
        for _ in 0..3000 {
            counts[b.pick(&loads).expect("free")] += 1;
        }
        assert_eq!(counts[0], 0, "the most loaded is never kept");
        // Backend 1 wins every pair it is in: 3 of the 6 pairs.
        assert!((1300..1700).contains(&counts[1]), "{counts:?}");
        assert!(counts[1] > counts[2] && counts[2] > counts[3], "{counts:?}");
    }

    #[test]
    fn round_robin_is_strict() {
        let mut b = RoundRobin::default();
        let idle = [load(0, 9, 1), load(0, 9, 1), load(0, 9, 1)];
        let picks: Vec<_> = (0..6).map(|_| b.pick(&idle).expect("free")).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        // Backend 0's turn, but it is full: wait rather than jump the queue.
        assert_eq!(b.pick(&[load(9, 9, 1), load(0, 9, 1), load(0, 9, 1)]), None);
        // Unusable backends lose their turn.
        assert_eq!(
            b.pick(&[unusable(load(0, 9, 1)), load(0, 9, 1), load(0, 9, 1)]),
            Some(1)
        );
    }

    #[test]
    fn weighted_round_robin_is_smooth_and_proportional() {
        let mut b = WeightedRoundRobin::default();
        let loads = [load(0, 99, 5), load(0, 99, 1), load(0, 99, 1)];
        let picks: Vec<_> = (0..7).map(|_| b.pick(&loads).expect("free")).collect();
        assert_eq!(
            picks,
            [0, 0, 1, 0, 2, 0, 0],
            "nginx's smooth 5:1:1 sequence"
        );
        let mut counts = [0usize; 3];
        for _ in 0..700 {
            counts[b.pick(&loads).expect("free")] += 1;
        }
        assert_eq!(counts, [500, 100, 100]);
    }

    #[test]
    fn random_spreads_uniformly_over_free_backends() {
        let mut b = RandomPick::with_rng(seeded());
        let loads = [load(0, 9, 1), load(0, 9, 7), load(0, 9, 1), load(9, 9, 1)];
        let mut counts = [0usize; 4];
        for _ in 0..3000 {
            counts[b.pick(&loads).expect("free")] += 1;
        }
        assert_eq!(counts[3], 0);
        for c in &counts[..3] {
            assert!((850..1150).contains(c), "{counts:?}");
        }
    }
}
