//! Attempt counting and the backoff between attempts.
//!
//! # Attempt counting
//! - Quorum queues: the broker adds `x-delivery-count` to a redelivered message; the attempt
//!   is `x-delivery-count + 1` (<https://www.rabbitmq.com/docs/quorum-queues#poison-message-handling>).
//!   The count lives in the broker, so it survives sidecar restarts and is shared by every pod.
//!   On RabbitMQ 3.x every requeue increments it; from 4.x only `basic.reject(requeue)` and
//!   failed deliveries do, and `basic.nack(requeue)` does not. So the sidecar requeues a failed
//!   attempt with `basic.reject` (counted on both) and hands back an unattempted delivery
//!   (shutdown drain, a pause) with `basic.nack` (not counted on 4.x; counted on 3.x, a documented
//!   over-count).
//! - The header is trusted only where the broker sets it: on a quorum queue's redelivery
//!   (`redelivered = true`). On a first delivery, or on a classic queue, an
//!   `x-delivery-count` came from the publisher (or a shovel or federation link that kept
//!   it) and is ignored: a message that arrives with `x-delivery-count: 99` is attempt 1.
//! - Where the header is absent or not trusted (classic queues), the sidecar counts, keyed by message-id, or
//!   by a hash of the body and identifying properties. The map is bounded in size (LRU) and
//!   age. Its counts are per process: they reset when the sidecar restarts and each pod keeps
//!   its own, so a message may get up to `max_attempts` attempts per pod. A redelivery this
//!   process has not seen starts at 1.
//!
//! # Backoff
//! One type, [`Backoff`], for message retries and broker reconnects. Retries use full
//! jitter (Brooker, "Exponential Backoff And Jitter", AWS Architecture
//! Blog, 2015): `uniform(0, min(cap, initial × multiplier^(attempt−1)))`. Computed here rather
//! than with backon, because backon adds its jitter after applying the cap (so its delays can
//! reach twice the cap). A `Retry-After` header (RFC 9110 §10.2.3, parsed in [`crate::backend`]) on a 429 or 503 replaces the
//! computed delay, capped the same way.

use std::{
    hash::{DefaultHasher, Hash, Hasher},
    num::NonZeroUsize,
    sync::Mutex,
    time::{Duration, Instant},
};

use lapin::types::AMQPValue;
use lru::LruCache;
use rand::Rng;

use crate::config::{JitterKind, QueueType, RetryConfig};

/// Header quorum queues set on redelivered messages.
pub const DELIVERY_COUNT_HEADER: &str = "x-delivery-count";

/// How a delay is drawn below its exponential ceiling (Brooker, "Exponential Backoff And
/// Jitter", AWS Architecture Blog, 2015).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Jitter {
    /// `uniform(0, ceiling)`: spreads retries the most (message retries).
    Full,
    /// `ceiling/2 + uniform(0, ceiling/2)`: never near zero, so a reconnect loop never
    /// spins (broker reconnects).
    Equal,
}

/// Capped exponential backoff with jitter: the one backoff type, for message retries
/// ([`Jitter::Full`]) and broker reconnects ([`Jitter::Equal`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Backoff {
    initial: Duration,
    multiplier: f64,
    max: Duration,
    jitter: Jitter,
}

impl Backoff {
    /// From `retry.backoff_initial_ms`, `retry.backoff_multiplier`, `retry.backoff_max_ms`
    /// and `retry.jitter` (full by default).
    #[must_use]
    pub fn new(cfg: &RetryConfig) -> Self {
        Self {
            initial: Duration::from_millis(cfg.backoff_initial_ms),
            multiplier: cfg.backoff_multiplier,
            max: Duration::from_millis(cfg.backoff_max_ms),
            jitter: match cfg.jitter {
                JitterKind::Full => Jitter::Full,
                JitterKind::Equal => Jitter::Equal,
            },
        }
    }

    /// Doubling from `initial` up to `max`, with `jitter`.
    #[must_use]
    pub fn doubling(initial: Duration, max: Duration, jitter: Jitter) -> Self {
        Self {
            initial,
            multiplier: 2.0,
            max,
            jitter,
        }
    }

    /// The upper bound of the delay after failed attempt `attempt` (1-based), before jitter.
    #[must_use]
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let exp = i32::try_from(attempt.saturating_sub(1)).unwrap_or(i32::MAX);
        let secs = self.initial.as_secs_f64() * self.multiplier.powi(exp);
        if secs.is_finite() && secs < self.max.as_secs_f64() {
            Duration::from_secs_f64(secs)
        } else {
            self.max
        }
    }

    /// The delay after failed attempt `attempt` (1-based): uniform in `[0, ceiling]` with
    /// full jitter, in `[ceiling/2, ceiling]` with equal jitter.
    pub fn delay<R: Rng + ?Sized>(&self, attempt: u32, rng: &mut R) -> Duration {
        let ceiling = self.ceiling(attempt);
        let fixed = match self.jitter {
            Jitter::Full => Duration::ZERO,
            Jitter::Equal => ceiling / 2,
        };
        let spread = ceiling - fixed;
        if spread.is_zero() {
            return fixed;
        }
        fixed + Duration::from_secs_f64(rng.random_range(0.0..=spread.as_secs_f64()))
    }

    /// The delay to use when the backend sent `Retry-After`: that value, capped at the max.
    #[must_use]
    pub fn capped(&self, retry_after: Duration) -> Duration {
        retry_after.min(self.max)
    }
}

/// What the attempt counter needs to know about a delivery.
#[derive(Debug, Clone, Copy)]
pub struct DeliveryIdentity<'a> {
    /// The `x-delivery-count` header, if present.
    pub delivery_count: Option<&'a AMQPValue>,
    /// The delivery's `redelivered` flag.
    pub redelivered: bool,
    /// The message-id property.
    pub message_id: Option<&'a str>,
    /// Body and identifying properties, hashed when there is no message-id.
    pub body: &'a [u8],
    /// Correlation-id property.
    pub correlation_id: Option<&'a str>,
    /// Timestamp property.
    pub timestamp: Option<u64>,
    /// Routing key of the delivery.
    pub routing_key: &'a str,
    /// Attempts used by earlier copies of the message (`x-sidecar-attempts` on a copy that
    /// came back from a delay tier, see [`crate::amqp::delay`]); counted on from.
    pub carried_attempts: Option<u32>,
}

impl DeliveryIdentity<'_> {
    /// A hash of the message's content: body, message-id, correlation-id, timestamp and
    /// routing key. Unlike the attempt counter's key, it always covers the body, so two
    /// messages that reuse a message-id differ. The dead-letter publisher uses it to find
    /// an earlier copy of the same message.
    #[must_use]
    pub fn content_key(&self) -> u64 {
        let mut h = DefaultHasher::new();
        self.body.hash(&mut h);
        self.message_id.hash(&mut h);
        self.correlation_id.hash(&mut h);
        self.timestamp.hash(&mut h);
        self.routing_key.hash(&mut h);
        h.finish()
    }
}

/// The attempt number of one delivery, and how the sidecar tracks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt {
    /// 1-based attempt number of this delivery.
    pub number: u32,
    /// True when the sidecar counts this message itself (no `x-delivery-count`).
    pub local: bool,
    /// The message's key in the local count, when it was looked up (redeliveries only).
    pub key: Option<u64>,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    attempts: u32,
    seen: Instant,
}

/// Counts attempts per message (see the module docs for how exact each way is).
///
/// The local count is touched only off the success path: a first delivery is attempt 1
/// without a look-up, a failed attempt is stored when its delivery is requeued
/// ([`AttemptCounter::remember`]), and a redelivery looks its count up.
pub struct AttemptCounter {
    queue_type: QueueType,
    ttl: Duration,
    local: Mutex<LruCache<u64, Entry>>,
}

impl AttemptCounter {
    /// A counter for a queue of `queue_type`, sized by `retry.attempt_cache_size` and aged by
    /// `retry.attempt_cache_ttl_ms`.
    #[must_use]
    pub fn new(queue_type: QueueType, cfg: &RetryConfig) -> Self {
        let size = NonZeroUsize::new(cfg.attempt_cache_size).unwrap_or(NonZeroUsize::MIN);
        Self {
            queue_type,
            ttl: Duration::from_millis(cfg.attempt_cache_ttl_ms),
            local: Mutex::new(LruCache::new(size)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LruCache<u64, Entry>> {
        self.local
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The attempt this delivery is.
    pub fn attempt(&self, d: &DeliveryIdentity<'_>) -> Attempt {
        // `x-delivery-count` is trusted only where the broker sets it: a quorum queue's
        // redelivery. On a first delivery, or on a classic queue, it came from the publisher
        // (or a shovel or federation link that kept it) and says nothing about attempts here.
        let broker_count = if self.queue_type == QueueType::Quorum && d.redelivered {
            d.delivery_count.and_then(as_count)
        } else {
            None
        };
        // A copy from a delay tier counts on from its earlier copies' attempts.
        let carried = d.carried_attempts.unwrap_or(0);
        if let Some(count) = broker_count {
            return Attempt {
                number: carried.saturating_add(count).saturating_add(1),
                local: false,
                key: None,
            };
        }
        let local = self.queue_type == QueueType::Classic || d.redelivered;
        if !d.redelivered {
            // A first delivery, even of a reused message-id, starts over.
            return Attempt {
                number: carried.saturating_add(1),
                local,
                key: None,
            };
        }
        // A redelivery this process has not seen (another pod, an earlier process, or a
        // release on shutdown) starts at 1: this process cannot know, and the worker still
        // sees X-Amqp-Redelivered.
        let key = identity_key(d);
        let now = Instant::now();
        // The map holds totals (carried attempts included).
        let previous = match self.lock().get(&key) {
            Some(e) if now.duration_since(e.seen) < self.ttl => e.attempts,
            _ => carried,
        };
        Attempt {
            number: previous.saturating_add(1),
            local,
            key: Some(key),
        }
    }

    /// Stores a failed attempt of a delivery that is being requeued, so its redelivery
    /// counts on from it. A no-op when the broker counts.
    pub fn remember(&self, attempt: &Attempt, d: &DeliveryIdentity<'_>) {
        if !attempt.local {
            return;
        }
        let key = attempt.key.unwrap_or_else(|| identity_key(d));
        self.lock().put(
            key,
            Entry {
                attempts: attempt.number,
                seen: Instant::now(),
            },
        );
    }

    /// Forgets a message once it is settled for good (acked or dead-lettered).
    pub fn forget(&self, attempt: &Attempt) {
        if let Some(key) = attempt.key {
            self.lock().pop(&key);
        }
    }

    /// Entries held by the local counter.
    #[must_use]
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True when the local counter holds nothing.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An AMQP integer as a count (negative values are 0); `None` for anything else.
pub(crate) fn as_count(v: &AMQPValue) -> Option<u32> {
    let n: i128 = match v {
        AMQPValue::ShortShortInt(n) => (*n).into(),
        AMQPValue::ShortShortUInt(n) => (*n).into(),
        AMQPValue::ShortInt(n) => (*n).into(),
        AMQPValue::ShortUInt(n) => (*n).into(),
        AMQPValue::LongInt(n) => (*n).into(),
        AMQPValue::LongUInt(n) => (*n).into(),
        AMQPValue::LongLongInt(n) => (*n).into(),
        _ => return None,
    };
    u32::try_from(n.max(0)).ok()
}

fn identity_key(d: &DeliveryIdentity<'_>) -> u64 {
    // DefaultHasher::new() uses fixed keys, so equal messages hash equally within and
    // across processes of the same build; only this process's map uses the value.
    let mut h = DefaultHasher::new();
    if let Some(id) = d.message_id {
        0u8.hash(&mut h);
        id.hash(&mut h);
    } else {
        1u8.hash(&mut h);
        d.body.hash(&mut h);
        d.correlation_id.hash(&mut h);
        d.timestamp.hash(&mut h);
        d.routing_key.hash(&mut h);
    }
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{SeedableRng, rngs::StdRng};

    fn cfg() -> RetryConfig {
        RetryConfig {
            backoff_initial_ms: 100,
            backoff_multiplier: 2.0,
            backoff_max_ms: 1_000,
            ..RetryConfig::default()
        }
    }

    #[test]
    fn equal_jitter_stays_in_the_upper_half() {
        let b = Backoff::doubling(
            Duration::from_millis(100),
            Duration::from_millis(1_000),
            Jitter::Equal,
        );
        let mut rng = StdRng::seed_from_u64(3);
        for attempt in 1..=8 {
            let ceiling = b.ceiling(attempt);
            for _ in 0..50 {
                let d = b.delay(attempt, &mut rng);
                assert!(
                    d >= ceiling / 2 && d <= ceiling,
                    "{attempt}: {d:?} vs {ceiling:?}"
                );
            }
        }
        // Doubling, capped: 100, 200, 400, 800, 1000 ms.
        let ms: Vec<u128> = (1..=5).map(|a| b.ceiling(a).as_millis()).collect();
        assert_eq!(ms, [100, 200, 400, 800, 1000]);
    }

    #[test]
    fn ceiling_grows_then_caps() {
        let b = Backoff::new(&cfg());
        let ms: Vec<u128> = (1..=6).map(|a| b.ceiling(a).as_millis()).collect();
        assert_eq!(ms, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(b.ceiling(u32::MAX), Duration::from_millis(1000));
    }

    #[test]
    fn full_jitter_stays_within_bounds_and_spreads() {
        let b = Backoff::new(&cfg());
        let mut rng = StdRng::seed_from_u64(7);
        let delays: Vec<Duration> = (0..1000).map(|_| b.delay(3, &mut rng)).collect();
        assert!(delays.iter().all(|d| *d <= Duration::from_millis(400)));
        assert!(delays.iter().any(|d| *d < Duration::from_millis(100)));
        assert!(delays.iter().any(|d| *d > Duration::from_millis(300)));
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        let now = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        use crate::backend::parse_retry_after;
        assert_eq!(parse_retry_after("5", now), Some(Duration::from_secs(5)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(
            Backoff::new(&cfg()).capped(Duration::from_secs(90)),
            Duration::from_secs(1)
        );
    }

    fn ident<'a>(
        redelivered: bool,
        count: Option<&'a AMQPValue>,
        id: Option<&'a str>,
    ) -> DeliveryIdentity<'a> {
        DeliveryIdentity {
            delivery_count: count,
            redelivered,
            message_id: id,
            body: b"body",
            correlation_id: None,
            timestamp: None,
            routing_key: "rk",
            carried_attempts: None,
        }
    }

    #[test]
    fn broker_count_wins_on_a_quorum_redelivery_only() {
        let v = AMQPValue::LongLongInt(3);
        let q = AttemptCounter::new(QueueType::Quorum, &RetryConfig::default());
        let a = q.attempt(&ident(true, Some(&v), None));
        assert_eq!((a.number, a.local), (4, false));
        // A publisher-set count is ignored: first delivery (quorum), any classic delivery.
        let spoofed = AMQPValue::LongLongInt(99);
        let first = q.attempt(&ident(false, Some(&spoofed), Some("s")));
        assert_eq!(first.number, 1, "first delivery on a quorum queue");
        let c = AttemptCounter::new(QueueType::Classic, &RetryConfig::default());
        assert_eq!(
            c.attempt(&ident(false, Some(&spoofed), Some("s"))).number,
            1
        );
        let re = c.attempt(&ident(true, Some(&spoofed), Some("s")));
        assert_eq!((re.number, re.local), (1, true), "classic counts locally");
        let first = q.attempt(&ident(false, None, Some("m")));
        assert_eq!((first.number, first.local), (1, false));
        q.remember(&first, &ident(false, None, Some("m")));
        assert!(q.is_empty(), "nothing stored when the broker counts");
    }

    /// Simulates the sidecar: each failed attempt is requeued and remembered.
    fn fail(c: &AttemptCounter, d: &DeliveryIdentity<'_>) -> Attempt {
        let a = c.attempt(d);
        c.remember(&a, d);
        a
    }

    #[test]
    fn local_count_follows_redeliveries_and_resets_on_fresh_delivery() {
        let c = AttemptCounter::new(QueueType::Classic, &RetryConfig::default());
        let ok = c.attempt(&ident(false, None, Some("m")));
        assert_eq!(ok.number, 1);
        assert!(c.is_empty(), "the success path stores nothing");
        assert_eq!(fail(&c, &ident(false, None, Some("m"))).number, 1);
        assert_eq!(fail(&c, &ident(true, None, Some("m"))).number, 2);
        let third = c.attempt(&ident(true, None, Some("m")));
        assert_eq!(third.number, 3);
        // A fresh publish with the same id starts over.
        assert_eq!(c.attempt(&ident(false, None, Some("m"))).number, 1);
        c.forget(&third);
        assert!(c.is_empty());
        // Redelivered but never seen here: this process starts at 1.
        assert_eq!(c.attempt(&ident(true, None, None)).number, 1);
        // A release (not remembered) does not count: the redelivery gets the same number.
        fail(&c, &ident(false, None, Some("r")));
        let released = c.attempt(&ident(true, None, Some("r")));
        assert_eq!(released.number, 2);
        assert_eq!(c.attempt(&ident(true, None, Some("r"))).number, 2);
    }

    #[test]
    fn local_count_is_bounded() {
        let c = AttemptCounter::new(
            QueueType::Classic,
            &RetryConfig {
                attempt_cache_size: 10,
                ..RetryConfig::default()
            },
        );
        for i in 0..100 {
            let id = i.to_string();
            fail(&c, &ident(false, None, Some(&id)));
        }
        assert_eq!(c.len(), 10);
    }
}
