//! The delay queues of `retry.mode: delay_queue`: the broker waits out the backoff.
//!
//! On a retryable failure the dispatcher publishes a copy of the message (body, properties
//! and headers, plus `x-sidecar-attempts`) with publisher confirms to a delay tier, then acks
//! the original. A tier is a queue `<queue>.retry.<ms>` with a fixed `x-message-ttl` of
//! `<ms>` that dead-letters expired messages back to `<queue>` through the default
//! exchange (<https://www.rabbitmq.com/docs/ttl>, <https://www.rabbitmq.com/docs/dlx>).
//!
//! # Tiers, not one delay queue
//! RabbitMQ expires messages only at the head of a queue, so one delay queue with
//! per-message TTLs would hold a 1 s retry behind a 60 s one. Each tier has one TTL, so its
//! head is always the first to expire. There is one tier per backoff step the attempt limit
//! can reach: the ceilings `min(backoff_max_ms, backoff_initial_ms × multiplier^(n−1))` for
//! n = 1 … `max_attempts − 1`, without duplicates (the defaults give 1 s, 2 s, 4 s, 8 s).
//!
//! # Jitter
//! The delay is drawn as in `requeue` mode (`retry.jitter`, full by default), then rounded
//! up to the nearest tier: attempt 3 with a 4 s ceiling goes to the 1 s, 2 s or 4 s tier.
//! A burst that failed together is spread over the tiers up to its ceiling; within a tier
//! there is no jitter. A `Retry-After` above the largest tier waits the largest tier.
//!
//! # Durability
//! Tiers are quorum queues with at-least-once dead-lettering
//! (`x-dead-letter-strategy: at-least-once`, which needs `x-overflow: reject-publish`;
//! RabbitMQ 3.10+, <https://www.rabbitmq.com/docs/quorum-queues#dead-lettering>), whatever
//! the consumed queue's type: the move from a tier back to the queue is then confirmed
//! inside the broker. A classic queue's dead-lettering is at-most-once.
//!
//! # Attempt count
//! `x-sidecar-attempts` on a delivery is the number of attempts its earlier copies used. It
//! is trusted only when the message went through one of this queue's tiers (an `x-death`
//! entry naming it), so a publisher cannot set a message's attempt count.

use std::time::Duration;

use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable, LongString, ShortString},
};

use crate::{
    config::{Config, RetryMode},
    retry::Backoff,
};

/// The header that carries the attempts used so far.
pub const ATTEMPTS_HEADER: &str = "x-sidecar-attempts";

/// One delay queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tier {
    /// Its `x-message-ttl`.
    pub ttl: Duration,
    /// `<queue>.retry.<ms>`.
    pub name: String,
}

/// The delay tiers of one queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DelayTiers {
    queue: String,
    /// Ascending by TTL; never empty.
    tiers: Vec<Tier>,
}

impl DelayTiers {
    /// The tiers for `cfg`, or `None` unless `retry.mode` is `delay_queue`.
    #[must_use]
    pub fn new(cfg: &Config) -> Option<Self> {
        if cfg.retry.mode != RetryMode::DelayQueue {
            return None;
        }
        let backoff = Backoff::new(&cfg.retry);
        let queue = cfg.amqp.queue.clone();
        let mut ttls: Vec<Duration> = (1..cfg.retry.max_attempts.max(2))
            .map(|n| backoff.ceiling(n))
            .map(|d| Duration::from_millis(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)))
            .map(|d| d.max(Duration::from_millis(1)))
            .collect();
        ttls.sort();
        ttls.dedup();
        let tiers = ttls
            .into_iter()
            .map(|ttl| Tier {
                name: tier_name(&queue, ttl),
                ttl,
            })
            .collect();
        Some(Self { queue, tiers })
    }

    /// Every tier, shortest TTL first.
    #[must_use]
    pub fn tiers(&self) -> &[Tier] {
        &self.tiers
    }

    /// The tier for a backoff of `delay`: the shortest whose TTL is at least `delay`, or
    /// the longest.
    #[must_use]
    pub fn for_delay(&self, delay: Duration) -> &Tier {
        self.tiers
            .iter()
            .find(|t| t.ttl >= delay)
            .or_else(|| self.tiers.last())
            .expect("tiers are never empty")
    }

    /// A tier's declare arguments: its TTL, dead-lettering back to the queue through the
    /// default exchange, at least once (see the module docs).
    #[must_use]
    pub fn arguments(&self, tier: &Tier) -> FieldTable {
        let mut args = FieldTable::default();
        let s = |v: &str| AMQPValue::LongString(LongString::from(v.to_owned()));
        let mut put = |k: &str, v: AMQPValue| {
            args.insert(ShortString::from(k), v);
        };
        put("x-queue-type", s("quorum"));
        put(
            "x-message-ttl",
            AMQPValue::LongLongInt(i64::try_from(tier.ttl.as_millis()).unwrap_or(i64::MAX)),
        );
        put("x-dead-letter-exchange", s(""));
        put("x-dead-letter-routing-key", s(&self.queue));
        put("x-dead-letter-strategy", s("at-least-once"));
        put("x-overflow", s("reject-publish"));
        args
    }

    /// The attempts a delivery's earlier copies used: its `x-sidecar-attempts`, if it came
    /// back from one of these tiers (an `x-death` entry names one); otherwise `None`.
    #[must_use]
    pub fn carried_attempts(&self, headers: Option<&FieldTable>) -> Option<u32> {
        let headers = headers?.inner();
        let through_a_tier = match headers.get(&ShortString::from("x-death"))? {
            AMQPValue::FieldArray(deaths) => deaths.as_slice().iter().any(|d| match d {
                AMQPValue::FieldTable(t) => t
                    .inner()
                    .get(&ShortString::from("queue"))
                    .and_then(as_text)
                    .is_some_and(|q| self.tiers.iter().any(|tier| tier.name == q)),
                _ => false,
            }),
            _ => false,
        };
        if !through_a_tier {
            return None;
        }
        crate::retry::as_count(headers.get(&ShortString::from(ATTEMPTS_HEADER))?)
    }
}

/// `<queue>.retry.<ms>`.
#[must_use]
pub fn tier_name(queue: &str, ttl: Duration) -> String {
    format!("{queue}.retry.{}", ttl.as_millis())
}

fn as_text(v: &AMQPValue) -> Option<String> {
    match v {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// The copy that goes to a delay tier: the original's properties and headers (as for a
/// dead-letter copy, less `expiration` and `user_id`, which would expire or refuse it; see
/// [`crate::amqp::dead_letter::copy_properties`]), with `x-sidecar-attempts: attempts`.
#[must_use]
pub fn delay_properties(properties: &BasicProperties, attempts: u32) -> BasicProperties {
    crate::amqp::dead_letter::copy_properties(properties, |put| {
        put(ATTEMPTS_HEADER, AMQPValue::LongLongInt(i64::from(attempts)));
    })
}

#[cfg(test)]
mod tests {
    use lapin::types::FieldArray;

    use super::*;

    fn cfg(max_attempts: u32, initial: u64, max: u64) -> Config {
        let mut c = Config::default();
        c.amqp.queue = "orders".into();
        c.retry.mode = RetryMode::DelayQueue;
        c.retry.max_attempts = max_attempts;
        c.retry.backoff_initial_ms = initial;
        c.retry.backoff_max_ms = max;
        c
    }

    #[test]
    fn one_tier_per_reachable_backoff_step() {
        let t = DelayTiers::new(&cfg(5, 1_000, 60_000)).expect("delay mode");
        let names: Vec<&str> = t.tiers().iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "orders.retry.1000",
                "orders.retry.2000",
                "orders.retry.4000",
                "orders.retry.8000"
            ]
        );
        // Capped steps collapse into one tier.
        let t = DelayTiers::new(&cfg(10, 1_000, 3_000)).expect("delay mode");
        let ttls: Vec<u128> = t.tiers().iter().map(|t| t.ttl.as_millis()).collect();
        assert_eq!(ttls, [1_000, 2_000, 3_000]);
        // One attempt still has a tier (for a Retry-After answer, none is reached).
        assert_eq!(
            DelayTiers::new(&cfg(1, 500, 500)).expect("").tiers().len(),
            1
        );
        let mut requeue = cfg(5, 1_000, 60_000);
        requeue.retry.mode = RetryMode::Requeue;
        assert_eq!(DelayTiers::new(&requeue), None);
    }

    #[test]
    fn a_delay_rounds_up_to_the_next_tier() {
        let t = DelayTiers::new(&cfg(5, 1_000, 60_000)).expect("delay mode");
        let tier = |ms| t.for_delay(Duration::from_millis(ms)).ttl.as_millis();
        assert_eq!(tier(0), 1_000);
        assert_eq!(tier(1_000), 1_000);
        assert_eq!(tier(1_001), 2_000);
        assert_eq!(tier(3_999), 4_000);
        assert_eq!(tier(30_000), 8_000, "beyond the largest: the largest");
    }

    fn death(queue: &str) -> AMQPValue {
        let mut t = FieldTable::default();
        t.insert(
            ShortString::from("queue"),
            AMQPValue::LongString(LongString::from(queue.to_owned())),
        );
        t.insert(
            ShortString::from("reason"),
            AMQPValue::LongString(LongString::from("expired".to_owned())),
        );
        AMQPValue::FieldTable(t)
    }

    #[test]
    fn carried_attempts_only_from_a_tier() {
        let t = DelayTiers::new(&cfg(5, 1_000, 60_000)).expect("delay mode");
        let headers = |deaths: Vec<AMQPValue>, attempts: AMQPValue| {
            let mut h = FieldTable::default();
            h.insert(
                ShortString::from("x-death"),
                AMQPValue::FieldArray(FieldArray::from(deaths)),
            );
            h.insert(ShortString::from(ATTEMPTS_HEADER), attempts);
            h
        };
        let ok = headers(vec![death("orders.retry.2000")], AMQPValue::LongLongInt(2));
        assert_eq!(t.carried_attempts(Some(&ok)), Some(2));
        let elsewhere = headers(vec![death("other.retry.2000")], AMQPValue::LongLongInt(2));
        assert_eq!(t.carried_attempts(Some(&elsewhere)), None, "not our tier");
        let mut forged = FieldTable::default();
        forged.insert(
            ShortString::from(ATTEMPTS_HEADER),
            AMQPValue::LongLongInt(99),
        );
        assert_eq!(t.carried_attempts(Some(&forged)), None, "no x-death");
        let junk = headers(
            vec![death("orders.retry.1000")],
            AMQPValue::LongString(LongString::from("three".to_owned())),
        );
        assert_eq!(t.carried_attempts(Some(&junk)), None, "not a number");
        assert_eq!(t.carried_attempts(None), None);
    }

    #[test]
    fn the_copy_carries_the_attempts_and_keeps_the_rest() {
        let mut h = FieldTable::default();
        h.insert(
            ShortString::from("tenant"),
            AMQPValue::LongString(LongString::from("t1".to_owned())),
        );
        let original = BasicProperties::default()
            .with_message_id("m-1".into())
            .with_delivery_mode(2)
            .with_headers(h);
        let copy = delay_properties(&original, 3);
        let headers = copy.headers().clone().expect("headers");
        assert_eq!(
            headers.inner().get(&ShortString::from(ATTEMPTS_HEADER)),
            Some(&AMQPValue::LongLongInt(3))
        );
        assert!(headers.inner().contains_key(&ShortString::from("tenant")));
        assert_eq!(copy.message_id(), original.message_id());
        assert_eq!(copy.delivery_mode(), &Some(2));
    }
}
