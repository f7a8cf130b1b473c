//! How many consumers are open, and why: the one place that decides it.
//!
//! Each consumer channel has basic.qos `prefetch` (1 by default), so the number of
//! consumers bounds the deliveries the pod holds unacked. The target is the sum of:
//! - **slots**: `amqp.consumers`, or the sum of the backends' `max_in_flight` when that is 0;
//! - **retry waiting**: one consumer for each delivery that waits out a backoff in the
//!   sidecar (`retry.mode: requeue`), so the wait takes no capacity from the backends. A
//!   delivery in backoff holds its own consumer's prefetch slot until it is requeued; the
//!   extra consumer lets another delivery in meanwhile, and is cancelled when the backoff
//!   ends. Bounded by `retry.max_waiting`.
//!
//! The supervisor ([`crate::sidecar`]) follows [`Capacity::target`]: it opens a consumer (or
//! resubscribes an idle channel) when the target rises and cancels the newest one when it
//! falls. A cancelled consumer's channel stays open, so deliveries still in flight on it
//! can be settled.
//!
//! # Beyond `retry.max_waiting`
//! A failing delivery that finds the bound reached is requeued at once, without its backoff
//! ([`Wait::Skip`]), counted in `amqp_sidecar_retry_backoff_skipped_total` and logged at
//! most once a minute. It is remembered (by content, a bounded LRU), so that if it fails
//! again while the bound is still reached it waits out its backoff in place, holding its
//! prefetch slot ([`Wait::InPlace`]): no delivery is requeued twice in a row without a
//! backoff, so nothing loops hot, and the consumer count never passes slots +
//! `max_waiting`.

use std::{
    num::NonZeroUsize,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
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
    /// Consumers opened in place of deliveries that wait out a backoff.
    pub retry_waiting: u32,
}

impl Target {
    /// The number of consumers wanted.
    #[must_use]
    pub fn total(&self) -> u32 {
        self.slots.saturating_add(self.retry_waiting)
    }
}

/// Most deliveries remembered as requeued without their backoff.
const SKIPPED_CAPACITY: usize = 10_000;

/// How often the "backoff skipped" warning may be logged.
const SKIP_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// The consumer target and the retry waiting room.
pub struct Capacity {
    target: watch::Sender<Target>,
    max_waiting: u32,
    /// Deliveries waiting in place (no consumer opened for them).
    in_place: AtomicU32,
    /// Content keys of deliveries requeued without their backoff.
    skipped: Mutex<LruCache<u64, ()>>,
    /// When the skip warning was last logged.
    last_skip_log: Mutex<Option<Instant>>,
}

/// Where a failing delivery waits out its backoff.
#[derive(Debug)]
pub enum Wait {
    /// With a consumer opened in its place; released when dropped.
    Beside(WaitPermit),
    /// Holding its own prefetch slot (it was requeued without a backoff last time, and the
    /// bound is still reached); released when dropped.
    InPlace(WaitPermit),
    /// Not at all: requeue it now, without its backoff.
    Skip,
}

/// A delivery waiting out its backoff. Dropping it ends the wait: the consumer opened for
/// it is cancelled, and the `amqp_sidecar_retry_waiting` gauge goes down.
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
        if self.beside {
            self.capacity
                .target
                .send_modify(|t| t.retry_waiting = t.retry_waiting.saturating_sub(1));
        } else {
            self.capacity.in_place.fetch_sub(1, Ordering::SeqCst);
        }
        self.capacity.publish_gauge();
    }
}

impl Capacity {
    /// The target for `cfg`: [`Config::consumer_count`] slots, and up to
    /// [`Config::max_waiting`] consumers for deliveries in backoff.
    #[must_use]
    pub fn new(cfg: &Config) -> Arc<Self> {
        Self::with(cfg.consumer_count(), cfg.max_waiting())
    }

    /// A target of `slots` consumers, plus up to `max_waiting` for deliveries in backoff.
    #[must_use]
    pub fn with(slots: u32, max_waiting: u32) -> Arc<Self> {
        let capacity = Arc::new(Self {
            target: watch::Sender::new(Target {
                slots,
                retry_waiting: 0,
            }),
            max_waiting,
            in_place: AtomicU32::new(0),
            skipped: Mutex::new(LruCache::new(
                NonZeroUsize::new(SKIPPED_CAPACITY).unwrap_or(NonZeroUsize::MIN),
            )),
            last_skip_log: Mutex::new(None),
        });
        capacity.publish_gauge();
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

    /// Deliveries waiting out a backoff now (beside or in place).
    #[must_use]
    pub fn waiting(&self) -> u32 {
        self.current()
            .retry_waiting
            .saturating_add(self.in_place.load(Ordering::SeqCst))
    }

    /// Where the failing delivery with content key `key` waits out its backoff (see the
    /// module docs).
    pub fn wait(self: &Arc<Self>, key: u64) -> Wait {
        let mut beside = false;
        self.target.send_if_modified(|t| {
            if t.retry_waiting < self.max_waiting {
                t.retry_waiting += 1;
                beside = true;
            }
            beside
        });
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_waiting_delivery_adds_a_consumer_up_to_the_bound() {
        let c = Capacity::with(2, 2);
        assert_eq!(c.current().total(), 2);
        let a = c.wait(1);
        assert!(matches!(a, Wait::Beside(_)));
        let b = c.wait(2);
        assert!(matches!(b, Wait::Beside(_)));
        assert_eq!(c.current().total(), 4);
        assert_eq!(c.waiting(), 2);
        drop(a);
        assert_eq!(c.current().total(), 3);
        drop(b);
        assert_eq!(
            c.current(),
            Target {
                slots: 2,
                retry_waiting: 0
            }
        );
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
        assert_eq!(c.current().total(), 2, "no consumer for an in-place wait");
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
    fn a_zero_bound_never_opens_a_consumer() {
        let c = Capacity::with(3, 0);
        assert!(matches!(c.wait(9), Wait::Skip));
        let w = c.wait(9);
        assert!(matches!(w, Wait::InPlace(_)));
        assert_eq!(c.current().total(), 3);
    }
}
