//! Choosing a backend: load measurement kept apart from the choice, as in tower's
//! `load` and `balance` modules.
//!
//! - [`Pool`] measures load: it owns each backend's in-flight count (the backend's queue
//!   length) and hands out a [`Lease`] that decrements it when dropped, so a count can never
//!   leak, whatever path a delivery takes. It also owns each backend's usability: passive
//!   ejection (outlier detection) after consecutive retryable failures, the health flag
//!   that active health checks set, and reachability (a request that was not delivered
//!   marks a backend unreachable until a probe reaches it).
//! - [`Balance`] chooses: given a snapshot of every backend's load it returns the index of
//!   one that is usable and has free capacity. Strategies live beside it.
//!
//! When no usable backend has free capacity, [`Pool::acquire`] waits on a
//! [`tokio::sync::Notify`] that each released lease (and each backend coming back) signals:
//! no polling.
//!
//! Passive ejection follows Envoy's outlier detection
//! (<https://www.envoyproxy.io/docs/envoy/latest/intro/arch_overview/upstream/outlier>):
//! `consecutive_failures` retryable failures in a row eject a backend for
//! `base_ms × times ejected`, capped at `max_ms`, and never more than `max_percent` of the
//! backends are ejected at once.

mod clock;
pub mod limit;
mod strategy;

pub use clock::EjectionClock;

use std::{
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use tokio::{
    sync::{Notify, watch},
    time::Instant,
};

pub use strategy::{LeastInFlight, PowerOfTwo, RandomPick, RoundRobin, WeightedRoundRobin};

use crate::config::{BalancerKind, EjectionConfig};

/// One backend's load, as the balancer sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Load {
    /// Requests in flight to the backend now.
    pub in_flight: u32,
    /// Most requests it may have in flight.
    pub max_in_flight: u32,
    /// Relative capacity (≥ 1).
    pub weight: u32,
    /// False while the backend is ejected, unhealthy or unreachable.
    pub usable: bool,
}

impl Load {
    /// A usable backend's load.
    #[must_use]
    pub fn new(in_flight: u32, max_in_flight: u32, weight: u32) -> Self {
        Self {
            in_flight,
            max_in_flight,
            weight,
            usable: true,
        }
    }

    /// True when another request may be sent to it now: usable and below `max_in_flight`.
    #[must_use]
    pub fn has_capacity(&self) -> bool {
        self.usable && self.in_flight < self.max_in_flight
    }
}

/// A strategy that picks a backend.
pub trait Balance: Send {
    /// Returns the index into `loads` of the backend to use, or `None` to wait for a
    /// release (none has capacity, or a strict strategy's turn is on a full backend). Must
    /// only return an index whose [`Load::has_capacity`] is true.
    fn pick(&mut self, loads: &[Load]) -> Option<usize>;
}

/// Builds the strategy named in the config.
#[must_use]
pub fn strategy(kind: BalancerKind) -> Box<dyn Balance> {
    match kind {
        BalancerKind::LeastInFlight => Box::new(LeastInFlight::default()),
        BalancerKind::PowerOfTwo => Box::new(PowerOfTwo::new()),
        BalancerKind::RoundRobin => Box::new(RoundRobin::default()),
        BalancerKind::WeightedRoundRobin => Box::new(WeightedRoundRobin::default()),
        BalancerKind::Random => Box::new(RandomPick::new()),
    }
}

/// A backend's concurrency limit: fixed, or learned by a [`limit::Limiter`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Concurrency {
    /// `max_in_flight: N`.
    Fixed(u32),
    /// `max_in_flight: auto`, within `[min, max]`, starting at `min`.
    Auto {
        /// `min_in_flight`.
        min: u32,
        /// `max_in_flight_limit`.
        max: u32,
    },
}

impl Concurrency {
    fn initial(self) -> u32 {
        match self {
            Self::Fixed(n) => n,
            Self::Auto { min, .. } => min.max(1),
        }
    }
}

/// `(index, healthy, unreachable reason)`: see [`Hooks::reachability`].
pub type ReachabilityHook = Box<dyn Fn(usize, bool, Option<&str>) + Send + Sync>;

/// Callbacks through which the pool publishes its state (metrics); they run under the pool
/// lock, so they must be quick.
pub struct Hooks {
    /// `(index, in_flight)` on every change of a backend's in-flight count.
    pub in_flight: Box<dyn Fn(usize, u32) + Send + Sync>,
    /// `(index, for)` when a backend is ejected.
    pub ejected: Box<dyn Fn(usize, Duration) + Send + Sync>,
    /// `(index, healthy, unreachable)` when a backend's health flag or reachability
    /// changes: the health gauge shows `healthy && unreachable.is_none()`.
    pub reachability: ReachabilityHook,
    /// `(index, limit)` when a backend's concurrency limit is set or learned.
    pub limit: Box<dyn Fn(usize, u32) + Send + Sync>,
}

impl Hooks {
    /// Hooks that do nothing.
    #[must_use]
    pub fn none() -> Self {
        Self {
            in_flight: Box::new(|_, _| {}),
            ejected: Box::new(|_, _| {}),
            reachability: Box::new(|_, _, _| {}),
            limit: Box::new(|_, _| {}),
        }
    }
}

/// Why a backend takes no requests now, for /readyz.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unusable {
    /// A request to it was not delivered (the reason); it waits for a probe.
    Unreachable(String),
    /// It failed its active health checks.
    Unhealthy,
    /// Passively ejected after consecutive failures.
    Ejected,
}

/// What one request's outcome says about its backend (the input of passive ejection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observed {
    /// The backend answered (2xx, or a 4xx that is the message's fault).
    Answered,
    /// A retryable failure after the request reached the worker (or may have): 5xx, 408,
    /// 429, timeout, a reset after sending. A request that was not delivered is reported
    /// with [`Pool::mark_unreachable`] instead.
    Failed,
}

#[derive(Debug, Clone, Copy, Default)]
struct Ejection {
    consecutive_failures: u32,
    times_ejected: u32,
    until: Option<Instant>,
}

struct State {
    loads: Vec<Load>,
    healthy: Vec<bool>,
    /// `Some(reason)` while a backend is unreachable (a request to it was not delivered),
    /// until a probe reaches it.
    unreachable: Vec<Option<String>>,
    ejections: Vec<Ejection>,
    balancer: Box<dyn Balance>,
    /// The learned limits of `max_in_flight: auto` backends (`None`: fixed).
    limiters: Vec<Option<limit::Limiter>>,
    /// The configured weights; with learned limits, [`Load::weight`] is weight × limit.
    weights: Vec<u32>,
}

impl State {
    /// Whether backend `i` may take requests at `now`. Pure: an ejection whose time is up
    /// counts as over even before [`State::expire`] clears it.
    fn usable_at(&self, i: usize, now: Instant) -> bool {
        self.healthy[i]
            && self.unreachable[i].is_none()
            && self.ejections[i].until.is_none_or(|until| until <= now)
    }

    fn usable_count_at(&self, now: Instant) -> usize {
        (0..self.loads.len())
            .filter(|&i| self.usable_at(i, now))
            .count()
    }

    /// Clears ejections whose time is up and brings every `Load::usable` up to date. Only
    /// [`Pool::update`] calls it, so the usable count is published right after.
    fn expire(&mut self, now: Instant) {
        for i in 0..self.loads.len() {
            if let Some(until) = self.ejections[i].until
                && until <= now
            {
                self.ejections[i].until = None;
                self.ejections[i].consecutive_failures = 0;
            }
            self.loads[i].usable = self.usable_at(i, now);
        }
    }

    fn next_return(&self) -> Option<Instant> {
        self.ejections.iter().filter_map(|e| e.until).min()
    }
}

/// The backends' in-flight counts and usability, and the waiting room for deliveries when
/// no usable backend has room.
///
/// Every change of usability goes through one method, `update`, which clears expired
/// ejections, applies the change and publishes the usable count under the same lock, so a
/// change and its publication cannot come apart. Readers ([`Pool::is_usable`],
/// [`Pool::usable_now`], [`Pool::loads`]) never mutate.
pub struct Pool {
    state: Mutex<State>,
    /// Signalled when a lease is released or a backend becomes usable.
    released: Notify,
    /// Signalled when an ejection starts, so the [`EjectionClock`] re-arms its timer.
    ejected: Notify,
    /// Signalled when a backend turns unreachable, so the prober starts probing it.
    unreachable: Notify,
    /// The number of usable backends, for readiness and pausing.
    usable: watch::Sender<usize>,
    /// The sum of the backends' limits (the consumer target's slots).
    slots: watch::Sender<u32>,
    ejection: EjectionConfig,
    hooks: Hooks,
}

impl Pool {
    /// A pool over backends with the given fixed `(max_in_flight, weight)`, using
    /// `balancer`.
    #[must_use]
    pub fn new(
        capacities: &[(u32, u32)],
        balancer: Box<dyn Balance>,
        ejection: EjectionConfig,
        hooks: Hooks,
    ) -> Arc<Self> {
        let limits: Vec<(Concurrency, u32)> = capacities
            .iter()
            .map(|&(max, weight)| (Concurrency::Fixed(max), weight))
            .collect();
        Self::with_limits(&limits, balancer, ejection, hooks)
    }

    /// A pool over backends with the given `(concurrency, weight)`, using `balancer`. With
    /// any learned limit, the balancer weighs each backend by weight × its limit, so one
    /// that has shown more capacity gets proportionally more work.
    #[must_use]
    pub fn with_limits(
        limits: &[(Concurrency, u32)],
        balancer: Box<dyn Balance>,
        ejection: EjectionConfig,
        hooks: Hooks,
    ) -> Arc<Self> {
        let weigh_by_limit = limits
            .iter()
            .any(|(c, _)| matches!(c, Concurrency::Auto { .. }));
        let weights: Vec<u32> = limits.iter().map(|&(_, w)| w.max(1)).collect();
        let loads: Vec<Load> = limits
            .iter()
            .zip(&weights)
            .map(|(&(c, _), &w)| {
                let limit = c.initial();
                Load::new(0, limit, if weigh_by_limit { w * limit } else { w })
            })
            .collect();
        let limiters = limits
            .iter()
            .map(|&(c, _)| match c {
                Concurrency::Fixed(_) => None,
                Concurrency::Auto { min, max } => Some(limit::Limiter::new(min, max)),
            })
            .collect();
        for (i, l) in loads.iter().enumerate() {
            (hooks.limit)(i, l.max_in_flight);
        }
        let slots = loads.iter().map(|l| l.max_in_flight).sum();
        let n = loads.len();
        Arc::new(Self {
            state: Mutex::new(State {
                loads,
                healthy: vec![true; n],
                unreachable: vec![None; n],
                ejections: vec![Ejection::default(); n],
                balancer,
                limiters,
                weights,
            }),
            released: Notify::new(),
            ejected: Notify::new(),
            unreachable: Notify::new(),
            usable: watch::Sender::new(n),
            slots: watch::Sender::new(slots),
            ejection,
            hooks,
        })
    }

    /// Feeds one answered request to backend `index`'s limiter, if its limit is learned:
    /// its latency, the requests in flight to it when it was sent ([`Lease::in_flight`]),
    /// and whether the worker shed it (a timeout, 429 or 503). A changed limit is applied
    /// at once (a raised one wakes a waiting delivery) and published.
    pub fn observe_latency(&self, index: usize, latency: Duration, in_flight: u32, dropped: bool) {
        let mut state = self.lock();
        let Some(limiter) = state.limiters[index].as_mut() else {
            return;
        };
        let Some(limit) = limiter.on_sample(latency, in_flight, dropped) else {
            return;
        };
        tracing::debug!(
            backend = index,
            limit,
            window_mean_us = limiter.last_mean().map_or(0, |d| d.as_micros() as u64),
            baseline_us = limiter.baseline().map_or(0, |d| d.as_micros() as u64),
            dropped,
            "concurrency limit changed"
        );
        let weight = state.weights[index];
        let load = &mut state.loads[index];
        let raised = limit > load.max_in_flight;
        load.max_in_flight = limit;
        load.weight = weight * limit;
        (self.hooks.limit)(index, limit);
        let slots = state.loads.iter().map(|l| l.max_in_flight).sum();
        drop(state);
        self.slots.send_replace(slots);
        if raised {
            self.released.notify_one();
        }
    }

    /// Each backend's concurrency limit now (fixed or learned).
    #[must_use]
    pub fn limits(&self) -> Vec<u32> {
        self.lock().loads.iter().map(|l| l.max_in_flight).collect()
    }

    /// Subscribes to the sum of the backends' limits.
    #[must_use]
    pub fn slots(&self) -> watch::Receiver<u32> {
        self.slots.subscribe()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every mutation under this lock is a plain field write, so the state stays
        // consistent even if a holder panicked.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The one way to change the state: clears expired ejections, runs `change`, and
    /// publishes the usable count if it differs from the published one, all under the lock.
    /// Waiters are woken when backends became usable.
    fn update<R>(&self, now: Instant, change: impl FnOnce(&mut State) -> R) -> R {
        let mut state = self.lock();
        // Before: `change` (a balancer pick) sees ejections that are over as over.
        state.expire(now);
        let result = change(&mut state);
        // After: `Load::usable` follows what `change` did (an ejection, a health flip).
        state.expire(now);
        let count = state.usable_count_at(now);
        let mut grew = false;
        self.usable.send_if_modified(|published| {
            if *published == count {
                return false;
            }
            grew = count > *published;
            *published = count;
            true
        });
        drop(state);
        if grew {
            self.released.notify_waiters();
        }
        result
    }

    /// Takes a slot on a backend chosen by the balancer, if a usable one has room.
    #[must_use]
    pub fn try_acquire(self: &Arc<Self>) -> Option<Lease> {
        self.try_acquire_at(Instant::now()).ok()
    }

    /// [`Pool::try_acquire`] at `now`; on failure returns when the next ejected backend
    /// comes back, if any is ejected.
    fn try_acquire_at(self: &Arc<Self>, now: Instant) -> Result<Lease, Option<Instant>> {
        let index = self.update(now, |state| {
            let State {
                loads, balancer, ..
            } = state;
            let Some(index) = balancer.pick(loads).filter(|&i| loads[i].has_capacity()) else {
                return Err(state.next_return());
            };
            let load = &mut state.loads[index];
            load.in_flight += 1;
            (self.hooks.in_flight)(index, load.in_flight);
            Ok((index, load.in_flight))
        })?;
        Ok(Lease {
            pool: Arc::clone(self),
            index: index.0,
            in_flight: index.1,
        })
    }

    /// Waits until a usable backend has room and takes a slot on it.
    ///
    /// Cancel-safe: dropping the future gives up the wait without holding anything.
    pub async fn acquire(self: &Arc<Self>) -> Lease {
        loop {
            let notified = self.released.notified();
            tokio::pin!(notified);
            // Register before checking, so a release in between is not missed.
            notified.as_mut().enable();
            match self.try_acquire_at(Instant::now()) {
                Ok(lease) => {
                    // Pass the wake-up on: another waiter may fit too (a strict strategy's
                    // next turn can be on a backend that was already free).
                    self.released.notify_one();
                    return lease;
                }
                Err(Some(back_at)) => {
                    tokio::select! {
                        () = notified => {}
                        () = tokio::time::sleep_until(back_at) => {}
                    }
                }
                Err(None) => notified.await,
            }
        }
    }

    /// Records what a request's outcome says about backend `index`, ejecting it after
    /// `ejection.consecutive_failures` failures in a row. Returns the ejection time if it
    /// was ejected.
    pub fn report(&self, index: usize, observed: Observed) -> Option<Duration> {
        self.report_at(index, observed, Instant::now())
    }

    fn report_at(&self, index: usize, observed: Observed, now: Instant) -> Option<Duration> {
        let ejected = self.update(now, |state| self.record(state, index, observed, now));
        if let Some(duration) = ejected {
            (self.hooks.ejected)(index, duration);
            self.ejected.notify_one();
        }
        ejected
    }

    /// The ejection rule (see the module docs) applied to one outcome.
    fn record(
        &self,
        state: &mut State,
        index: usize,
        observed: Observed,
        now: Instant,
    ) -> Option<Duration> {
        let threshold = self.ejection.consecutive_failures;
        let e = &mut state.ejections[index];
        match observed {
            Observed::Answered => {
                e.consecutive_failures = 0;
                return None;
            }
            Observed::Failed => e.consecutive_failures = e.consecutive_failures.saturating_add(1),
        }
        if threshold == 0 || e.consecutive_failures < threshold || e.until.is_some() {
            return None;
        }
        let n = state.loads.len();
        let ejected = state.ejections.iter().filter(|e| e.until.is_some()).count();
        // Never eject more than max_percent of the backends (rounded down).
        let allowed = n * usize::from(self.ejection.max_percent.min(100)) / 100;
        if ejected + 1 > allowed {
            return None;
        }
        let e = &mut state.ejections[index];
        e.times_ejected = e.times_ejected.saturating_add(1);
        e.consecutive_failures = 0;
        let base = Duration::from_millis(self.ejection.base_ms);
        let duration = base
            .saturating_mul(e.times_ejected)
            .min(Duration::from_millis(self.ejection.max_ms));
        e.until = Some(now + duration);
        Some(duration)
    }

    /// Sets the health flag of backend `index` (from active health checks).
    pub fn set_healthy(&self, index: usize, healthy: bool) {
        self.update(Instant::now(), |state| {
            if state.healthy[index] != healthy {
                state.healthy[index] = healthy;
                (self.hooks.reachability)(index, healthy, state.unreachable[index].as_deref());
            }
        });
    }

    /// Marks backend `index` unreachable: a request to it was not delivered (`reason`). A
    /// fact, not a judgement, so `ejection.max_percent` does not apply: a lone backend can
    /// be unreachable. It takes no requests until [`Pool::reached`].
    pub fn mark_unreachable(&self, index: usize, reason: &str) {
        let newly = self.update(Instant::now(), |state| {
            let newly = state.unreachable[index].is_none();
            state.unreachable[index] = Some(reason.to_owned());
            if newly {
                (self.hooks.reachability)(index, state.healthy[index], Some(reason));
            }
            newly
        });
        if newly {
            self.unreachable.notify_one();
        }
    }

    /// A probe reached backend `index`: it takes requests again (unless unhealthy or
    /// ejected).
    pub fn reached(&self, index: usize) {
        self.update(Instant::now(), |state| {
            if state.unreachable[index].take().is_some() {
                (self.hooks.reachability)(index, state.healthy[index], None);
            }
        });
    }

    /// True while backend `index` is unreachable. Reads only.
    #[must_use]
    pub fn is_unreachable(&self, index: usize) -> bool {
        self.lock().unreachable[index].is_some()
    }

    /// The backends that are unreachable now, with the reason.
    #[must_use]
    pub fn unreachable_now(&self) -> Vec<(usize, String)> {
        let state = self.lock();
        state
            .unreachable
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r.clone().map(|r| (i, r)))
            .collect()
    }

    /// Resolves when a backend turns unreachable (for the prober). A backend that turned
    /// unreachable while nobody waited leaves a permit (`Notify::notify_one`), so a prober
    /// that scans [`Pool::unreachable_now`] and then waits misses nothing.
    pub async fn turned_unreachable(&self) {
        self.unreachable.notified().await;
    }

    /// Why each backend that takes no requests now is out, for /readyz. Reads only.
    #[must_use]
    pub fn unusable_now(&self) -> Vec<(usize, Unusable)> {
        let now = Instant::now();
        let state = self.lock();
        (0..state.loads.len())
            .filter_map(|i| {
                if let Some(r) = &state.unreachable[i] {
                    Some((i, Unusable::Unreachable(r.clone())))
                } else if !state.healthy[i] {
                    Some((i, Unusable::Unhealthy))
                } else if !state.usable_at(i, now) {
                    Some((i, Unusable::Ejected))
                } else {
                    None
                }
            })
            .collect()
    }

    /// Ends backend `index`'s ejection early (a probe found it answering while paused).
    pub fn readmit(&self, index: usize) {
        self.update(Instant::now(), |state| {
            state.ejections[index].until = None;
            state.ejections[index].consecutive_failures = 0;
        });
    }

    /// Re-evaluates ejections whose time is up, and publishes the usable count.
    pub fn refresh(&self) {
        self.update(Instant::now(), |_| ());
    }

    /// True when backend `index` may take requests now (healthy, reachable and not
    /// ejected). Reads only.
    #[must_use]
    pub fn is_usable(&self, index: usize) -> bool {
        self.lock().usable_at(index, Instant::now())
    }

    /// How many backends may take requests now, from the pool's own state (not the
    /// published count). Reads only.
    #[must_use]
    pub fn usable_now(&self) -> usize {
        self.lock().usable_count_at(Instant::now())
    }

    /// How many backends the recorded state has usable: healthy, reachable and not ejected, counting
    /// an ejection as running until an update clears it. Every update publishes this count,
    /// so it always equals the value on [`Pool::usable`]; the pause guard checks that.
    #[must_use]
    pub fn usable_recorded(&self) -> usize {
        let state = self.lock();
        (0..state.loads.len())
            .filter(|&i| {
                state.healthy[i]
                    && state.unreachable[i].is_none()
                    && state.ejections[i].until.is_none()
            })
            .count()
    }

    /// Subscribes to the number of usable backends.
    #[must_use]
    pub fn usable(&self) -> watch::Receiver<usize> {
        self.usable.subscribe()
    }

    /// When the next ejected backend comes back, if any is ejected.
    #[must_use]
    pub fn next_return(&self) -> Option<Instant> {
        self.lock().next_return()
    }

    /// A snapshot of every backend's load, usability as of now.
    #[must_use]
    pub fn loads(&self) -> Vec<Load> {
        let now = Instant::now();
        let state = self.lock();
        let mut loads = state.loads.clone();
        for (i, load) in loads.iter_mut().enumerate() {
            load.usable = state.usable_at(i, now);
        }
        loads
    }

    fn release(&self, index: usize) {
        {
            let mut state = self.lock();
            let load = &mut state.loads[index];
            load.in_flight = load.in_flight.saturating_sub(1);
            (self.hooks.in_flight)(index, load.in_flight);
        }
        self.released.notify_one();
    }
}

/// A slot on one backend. Dropping it releases the slot and wakes a waiting delivery.
pub struct Lease {
    pool: Arc<Pool>,
    index: usize,
    in_flight: u32,
}

impl Lease {
    /// Index of the backend this lease is on.
    #[must_use]
    pub fn index(&self) -> usize {
        self.index
    }

    /// The requests in flight to the backend when this lease was taken, itself included.
    #[must_use]
    pub fn in_flight(&self) -> u32 {
        self.in_flight
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
mod tests;
