//! Choosing a backend: load measurement kept apart from the choice, as in tower's
//! `load` and `balance` modules.
//!
//! - [`Pool`] measures load: it owns each backend's in-flight count (the backend's queue
//!   length) and hands out a [`Lease`] that decrements it when dropped, so a count can never
//!   leak, whatever path a delivery takes.
//! - [`Balance`] chooses: given a snapshot of every backend's load it returns the index of
//!   one with free capacity. Strategies live beside it ([`LeastInFlight`], [`RoundRobin`]).
//!
//! When every backend is full, [`Pool::acquire`] waits on a [`tokio::sync::Notify`] that each
//! released lease signals: no polling.

mod strategy;

use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

pub use strategy::{LeastInFlight, RoundRobin};

use crate::config::BalancerKind;

/// One backend's load, as the balancer sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Load {
    /// Requests in flight to the backend now.
    pub in_flight: u32,
    /// Most requests it may have in flight.
    pub max_in_flight: u32,
    /// Relative capacity (≥ 1).
    pub weight: u32,
}

impl Load {
    /// True when another request may be sent now.
    #[must_use]
    pub fn has_capacity(&self) -> bool {
        self.in_flight < self.max_in_flight
    }
}

/// A strategy that picks a backend.
pub trait Balance: Send {
    /// Returns the index into `loads` of the backend to use, or `None` when no backend has
    /// free capacity. Must never return a backend whose `in_flight >= max_in_flight`.
    fn pick(&mut self, loads: &[Load]) -> Option<usize>;
}

/// Builds the strategy named in the config.
#[must_use]
pub fn strategy(kind: BalancerKind) -> Box<dyn Balance> {
    match kind {
        BalancerKind::LeastInFlight => Box::new(LeastInFlight::default()),
        BalancerKind::RoundRobin => Box::new(RoundRobin::default()),
    }
}

/// Called when a backend's in-flight count changes (to publish it as a gauge).
pub type OnChange = Box<dyn Fn(usize, u32) + Send + Sync>;

struct State {
    loads: Vec<Load>,
    balancer: Box<dyn Balance>,
}

/// The backends' in-flight counts, and the waiting room for deliveries when all are full.
pub struct Pool {
    state: Mutex<State>,
    /// Signalled whenever a lease is released, waking one waiting [`Pool::acquire`].
    released: Notify,
    on_change: OnChange,
}

impl Pool {
    /// A pool over backends with the given `(max_in_flight, weight)`, using `balancer`.
    /// `on_change(index, in_flight)` runs (under the pool lock) on every change.
    #[must_use]
    pub fn new(
        capacities: &[(u32, u32)],
        balancer: Box<dyn Balance>,
        on_change: OnChange,
    ) -> Arc<Self> {
        let loads = capacities
            .iter()
            .map(|&(max_in_flight, weight)| Load {
                in_flight: 0,
                max_in_flight,
                weight: weight.max(1),
            })
            .collect();
        Arc::new(Self {
            state: Mutex::new(State { loads, balancer }),
            released: Notify::new(),
            on_change,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves the counts consistent (every mutation is a
        // single field write), so a poisoned lock is safe to keep using.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes a slot on a backend chosen by the balancer, if one has free capacity.
    #[must_use]
    pub fn try_acquire(self: &Arc<Self>) -> Option<Lease> {
        let mut state = self.lock();
        let State { loads, balancer } = &mut *state;
        let index = balancer.pick(loads)?;
        let load = &mut loads[index];
        debug_assert!(load.has_capacity(), "balancer picked a full backend");
        if !load.has_capacity() {
            return None;
        }
        load.in_flight += 1;
        (self.on_change)(index, load.in_flight);
        Some(Lease {
            pool: Arc::clone(self),
            index,
        })
    }

    /// Waits until a backend has free capacity and takes a slot on it.
    ///
    /// Cancel-safe: dropping the future gives up the wait without holding anything.
    pub async fn acquire(self: &Arc<Self>) -> Lease {
        loop {
            let notified = self.released.notified();
            tokio::pin!(notified);
            // Register interest before checking, so a release between the check and the
            // await is not missed.
            notified.as_mut().enable();
            if let Some(lease) = self.try_acquire() {
                return lease;
            }
            notified.await;
        }
    }

    /// A snapshot of every backend's load.
    #[must_use]
    pub fn loads(&self) -> Vec<Load> {
        self.lock().loads.clone()
    }

    fn release(&self, index: usize) {
        {
            let mut state = self.lock();
            let load = &mut state.loads[index];
            load.in_flight = load.in_flight.saturating_sub(1);
            (self.on_change)(index, load.in_flight);
        }
        self.released.notify_one();
    }
}

/// A slot on one backend. Dropping it releases the slot and wakes a waiting delivery.
pub struct Lease {
    pool: Arc<Pool>,
    index: usize,
}

impl Lease {
    /// Index of the backend this lease is on.
    #[must_use]
    pub fn index(&self) -> usize {
        self.index
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.pool.release(self.index);
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").field("index", &self.index).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn pool(caps: &[(u32, u32)]) -> Arc<Pool> {
        Pool::new(
            caps,
            Box::new(LeastInFlight::default()),
            Box::new(|_, _| {}),
        )
    }

    #[test]
    fn lease_drop_releases() {
        let p = pool(&[(1, 1)]);
        let lease = p.try_acquire().expect("free");
        assert!(p.try_acquire().is_none());
        drop(lease);
        assert_eq!(p.loads()[0].in_flight, 0);
        assert!(p.try_acquire().is_some());
    }

    #[tokio::test]
    async fn acquire_waits_for_release() {
        let p = pool(&[(1, 1)]);
        let lease = p.try_acquire().expect("free");
        let p2 = Arc::clone(&p);
        let waiter = tokio::spawn(async move { p2.acquire().await.index() });
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        assert!(!waiter.is_finished(), "must wait while full");
        drop(lease);
        let got = tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("woken by the release")
            .expect("task");
        assert_eq!(got, 0);
    }

    #[tokio::test]
    async fn cancelled_waiter_passes_the_wakeup_on() {
        let p = pool(&[(1, 1)]);
        let lease = p.try_acquire().expect("free");
        let p1 = Arc::clone(&p);
        let first = tokio::spawn(async move { p1.acquire().await });
        let p2 = Arc::clone(&p);
        let second = tokio::spawn(async move { p2.acquire().await.index() });
        tokio::task::yield_now().await;
        first.abort();
        drop(lease);
        let got = tokio::time::timeout(Duration::from_secs(1), second).await;
        assert!(matches!(got, Ok(Ok(0))), "second waiter must get the slot");
    }
}
