//! Balancing strategies.
//!
//! - [`LeastInFlight`]: join-the-shortest-queue (JSQ), the queue length being the number of
//!   requests in flight, normalised by weight. JSQ is delay-optimal for identical servers
//!   (Winston, "Optimality of the shortest line discipline", J. Appl. Prob. 14(1), 1977), and
//!   it is what Envoy and Linkerd call least-request / least-loaded balancing.
//! - [`RoundRobin`]: each backend in turn; the baseline JSQ is compared against.

use super::{Balance, Load};

/// Join-the-shortest-queue: the backend with the lowest `in_flight / weight` among those
/// with free capacity. Among equals, the scan starts after the last one chosen, so equal
/// backends share the work instead of the first one taking it all.
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
            let l = &loads[i];
            if !l.has_capacity() {
                continue;
            }
            let better = match best {
                None => true,
                // in_flight_i / weight_i < in_flight_b / weight_b, without division.
                Some(b) => {
                    u64::from(l.in_flight) * u64::from(loads[b].weight)
                        < u64::from(loads[b].in_flight) * u64::from(l.weight)
                }
            };
            if better {
                best = Some(i);
            }
        }
        if let Some(i) = best {
            self.cursor = (i + 1) % n;
        }
        best
    }
}

/// Round robin: backends in turn, skipping any without free capacity.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: usize,
}

impl Balance for RoundRobin {
    fn pick(&mut self, loads: &[Load]) -> Option<usize> {
        let n = loads.len();
        let i = (0..n)
            .map(|step| (self.next + step) % n)
            .find(|&i| loads[i].has_capacity())?;
        self.next = (i + 1) % n;
        Some(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(in_flight: u32, max_in_flight: u32, weight: u32) -> Load {
        Load::new(in_flight, max_in_flight, weight)
    }

    #[test]
    fn least_in_flight_picks_shortest_queue() {
        let mut b = LeastInFlight::default();
        let loads = [load(3, 10, 1), load(1, 10, 1), load(2, 10, 1)];
        assert_eq!(b.pick(&loads), Some(1));
    }

    #[test]
    fn least_in_flight_normalises_by_weight() {
        let mut b = LeastInFlight::default();
        // 2/1 = 2 versus 3/3 = 1: the heavier backend is less loaded.
        assert_eq!(b.pick(&[load(2, 10, 1), load(3, 10, 3)]), Some(1));
    }

    #[test]
    fn least_in_flight_skips_full_backends() {
        let mut b = LeastInFlight::default();
        assert_eq!(b.pick(&[load(1, 1, 1), load(5, 6, 1)]), Some(1));
        assert_eq!(b.pick(&[load(1, 1, 1), load(6, 6, 1)]), None);
    }

    #[test]
    fn least_in_flight_rotates_ties() {
        let mut b = LeastInFlight::default();
        let idle = [load(0, 1, 1), load(0, 1, 1), load(0, 1, 1)];
        let picks: Vec<_> = (0..6).map(|_| b.pick(&idle).expect("free")).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn round_robin_cycles_and_skips_full() {
        let mut b = RoundRobin::default();
        let loads = [load(0, 1, 1), load(1, 1, 1), load(0, 1, 1)];
        let picks: Vec<_> = (0..4).map(|_| b.pick(&loads).expect("free")).collect();
        assert_eq!(picks, [0, 2, 0, 2]);
        assert_eq!(b.pick(&[load(1, 1, 1)]), None);
    }
}
