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
//! # Memory budget
//! With a budget ([`crate::memory`]), every consumer that is subscribed and idle could get
//! a body of up to `backend.max_body_bytes` at any moment (prefetch 1). So the sidecar keeps
//! `held + idle consumers × max_body_bytes ≤ budget`, where `held` is the bytes of the bodies
//! it holds (received, not settled, backoffs included):
//! - a consumer is opened only while that stays true ([`Target::memory_cap`]);
//! - a delivery whose settle would leave its consumer idle past the budget retires the
//!   consumer first (basic.cancel, then the ack), so nothing more arrives on it. A cancel
//!   of a busy prefetch-1 consumer hands nothing back: nothing is requeued for memory.
//!
//! The last consumer is never retired, so one message up to `max_body_bytes` always gets
//! through. A body above `max_body_bytes` is held briefly too (it arrives before it can be
//! measured), then dead-lettered as `too_large`.
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

use crate::{config::Config, metrics};

/// How many consumers the sidecar wants, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Target {
    /// Consumers for the backend slots.
    pub slots: u32,
    /// Consumers beyond the slots, so a delivery is at hand when a slot frees.
    pub lookahead: u32,
    /// With a memory budget: most consumers that may be subscribed now, so that every
    /// idle one could take a `max_body_bytes` delivery within the budget (see the module
    /// docs). It only holds back new consumers; `None` without a budget.
    pub memory_cap: Option<u32>,
}

impl Target {
    /// The number of consumers wanted.
    #[must_use]
    pub fn total(&self) -> u32 {
        self.slots.saturating_add(self.lookahead)
    }

    /// The number of consumers that may be opened now: [`Target::total`], held back by
    /// the memory cap.
    #[must_use]
    pub fn admitted(&self) -> u32 {
        self.memory_cap
            .map_or(self.total(), |cap| self.total().min(cap.max(1)))
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
    /// The memory budget, if any.
    admission: Option<Admission>,
    /// Bytes of bodies held now.
    held: AtomicU64,
    /// The `amqp_sidecar_held_bytes` gauge.
    held_gauge: ::metrics::Gauge,
    /// Deliveries held on consumers that are still subscribed (in this generation).
    busy: AtomicU32,
    /// Consumers subscribed now (the supervisor says).
    subscribed: AtomicU32,
    /// Bumped when every consumer is gone (a pause, a lost connection): deliveries held
    /// from before no longer sit on a subscribed consumer.
    generation: AtomicU64,
}

/// The memory budget, and the largest body a delivery may have.
#[derive(Debug, Clone, Copy)]
struct Admission {
    budget: u64,
    max_body: u64,
}

/// The memory state, for /readyz.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MemoryState {
    /// Bytes of message bodies held now.
    pub held_bytes: u64,
    /// The budget, in bytes.
    pub budget_bytes: u64,
    /// True while the budget holds consumers back (fewer consumers than wanted).
    pub limiting: bool,
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

/// A delivery's body, held until its settle. Dropping it releases the bytes.
pub struct Held {
    capacity: Arc<Capacity>,
    size: u64,
    generation: u64,
    /// Still counted as busy on a subscribed consumer.
    on_consumer: bool,
}

impl Held {
    /// Its consumer was retired (it waits out a backoff beside): no longer busy on a
    /// subscribed consumer.
    pub fn left_consumer(&mut self) {
        if std::mem::take(&mut self.on_consumer) {
            self.capacity.unbusy(self.generation);
            self.capacity.publish_cap();
        }
    }

    /// True when settling this delivery would leave its consumer idle past the memory
    /// budget (`held − size + (idle + 1) × max_body > budget`): retire the consumer first.
    /// Never for the last subscribed consumer, and never without a budget.
    #[must_use]
    pub fn retire_before_settle(&self) -> bool {
        let c = &self.capacity;
        let Some(a) = c.admission else {
            return false;
        };
        if !self.on_consumer || self.generation != c.generation.load(Ordering::SeqCst) {
            return false;
        }
        let subscribed = u64::from(c.subscribed.load(Ordering::SeqCst));
        if subscribed <= 1 {
            return false;
        }
        let busy = u64::from(c.busy.load(Ordering::SeqCst));
        let idle_after = subscribed.saturating_sub(busy) + 1;
        let held_after = c.held.load(Ordering::SeqCst).saturating_sub(self.size);
        held_after.saturating_add(idle_after.saturating_mul(a.max_body)) > a.budget
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let c = &self.capacity;
        c.held.fetch_sub(self.size, Ordering::SeqCst);
        if self.on_consumer {
            c.unbusy(self.generation);
        }
        c.publish_cap();
    }
}

impl std::fmt::Debug for Capacity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Capacity")
            .field("target", &self.current())
            .field("waiting", &self.waiting())
            .field("held", &self.held.load(Ordering::SeqCst))
            .finish_non_exhaustive()
    }
}

impl Capacity {
    fn unbusy(&self, generation: u64) {
        if generation == self.generation.load(Ordering::SeqCst) {
            let _ = self
                .busy
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        }
    }
}

impl Capacity {
    /// The target for `cfg`: [`Config::consumer_count`] slots and no lookahead yet, with up
    /// to [`Config::max_waiting`] deliveries waiting beside, within the memory budget
    /// ([`Config::memory_budget`]).
    #[must_use]
    pub fn new(cfg: &Config) -> Arc<Self> {
        Self::build(
            cfg.consumer_count(),
            cfg.max_waiting(),
            cfg.memory_budget().map(|b| Admission {
                budget: b.bytes,
                max_body: cfg.backend.max_body_bytes as u64,
            }),
        )
    }

    /// A target of `slots` consumers, with up to `max_waiting` deliveries waiting beside,
    /// and no memory budget.
    #[must_use]
    pub fn with(slots: u32, max_waiting: u32) -> Arc<Self> {
        Self::build(slots, max_waiting, None)
    }

    /// [`Capacity::with`] and a budget of `budget` bytes for bodies of up to `max_body`.
    #[must_use]
    pub fn with_budget(slots: u32, max_waiting: u32, budget: u64, max_body: u64) -> Arc<Self> {
        Self::build(
            slots,
            max_waiting,
            Some(Admission {
                budget,
                max_body: max_body.max(1),
            }),
        )
    }

    fn build(slots: u32, max_waiting: u32, admission: Option<Admission>) -> Arc<Self> {
        let capacity = Arc::new(Self {
            target: watch::Sender::new(Target {
                slots,
                lookahead: 0,
                memory_cap: None,
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
            admission,
            held: AtomicU64::new(0),
            held_gauge: metrics::held_bytes(),
            busy: AtomicU32::new(0),
            subscribed: AtomicU32::new(0),
            generation: AtomicU64::new(0),
        });
        capacity.publish_gauge();
        metrics::set_lookahead(0);
        metrics::set_memory_budget(admission.map_or(0, |a| a.budget));
        capacity.publish_cap();
        capacity
    }

    /// Holds a delivery's body of `size` bytes until the returned guard drops (its settle).
    /// The delivery sits on a subscribed consumer until [`Held::left_consumer`].
    pub fn hold(self: &Arc<Self>, size: u64) -> Held {
        self.held.fetch_add(size, Ordering::SeqCst);
        self.busy.fetch_add(1, Ordering::SeqCst);
        let held = Held {
            capacity: Arc::clone(self),
            size,
            generation: self.generation.load(Ordering::SeqCst),
            on_consumer: true,
        };
        self.publish_cap();
        held
    }

    /// The supervisor's count of subscribed consumers.
    pub fn set_subscribed(&self, n: usize) {
        self.subscribed
            .store(u32::try_from(n).unwrap_or(u32::MAX), Ordering::SeqCst);
    }

    /// Every consumer is gone (a pause, a lost connection, shutdown): deliveries still held
    /// no longer sit on a subscribed consumer.
    pub fn consumers_gone(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.busy.store(0, Ordering::SeqCst);
        self.subscribed.store(0, Ordering::SeqCst);
        self.publish_cap();
    }

    /// The memory state, when there is a budget.
    #[must_use]
    pub fn memory(&self) -> Option<MemoryState> {
        let a = self.admission?;
        let t = self.current();
        Some(MemoryState {
            held_bytes: self.held.load(Ordering::SeqCst),
            budget_bytes: a.budget,
            limiting: t.admitted() < t.total(),
        })
    }

    /// Republishes the memory cap: the busy consumers plus as many idle ones as the room
    /// left takes `max_body` bodies, at least 1; capped just above the wanted total, so
    /// that with room to spare it does not change with every delivery.
    fn publish_cap(&self) {
        let held = self.held.load(Ordering::SeqCst);
        self.held_gauge.set(held as f64);
        if let Some(a) = self.admission {
            let busy = u64::from(self.busy.load(Ordering::SeqCst));
            let room = a.budget.saturating_sub(held) / a.max_body;
            let cap = busy.saturating_add(room).max(1);
            self.target.send_if_modified(|t| {
                let cap = u32::try_from(cap.min(u64::from(t.total()) + 1)).unwrap_or(u32::MAX);
                let changed = t.memory_cap != Some(cap);
                t.memory_cap = Some(cap);
                changed
            });
        }
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

mod lookahead;

pub use lookahead::{LookaheadController, lookahead_for};

#[cfg(test)]
mod tests;
