//! One delivery's path: count the attempt, pick a backend, POST, classify the outcome, and
//! settle. [`decide`] is the single `match` from [`Outcome`] to [`Settlement`] (ack,
//! requeue, dead-letter or release), a pure function over plain data; nothing else decides
//! how a delivery is settled.
//!
//! Settlement follows the AMQP 0-9-1 spec (§1.8.3.13 basic.ack, §1.8.3.14 basic.reject and
//! RabbitMQ's basic.nack extension, <https://www.rabbitmq.com/docs/nack>):
//! - success: `basic.ack`;
//! - retryable failure below the attempt limit: wait the backoff, then
//!   `basic.reject(requeue=true)` (counted by quorum queues on every RabbitMQ version);
//! - non-retryable failure, or the limit reached: publish to the DLX with confirms, then ack;
//!   if that publish fails, requeue;
//! - not attempted (shutdown drain, no usable backend): `basic.nack(requeue=true)`, which
//!   RabbitMQ 4.x does not count toward the delivery limit.
//! - not delivered to the worker (refused, connect timeout, DNS or TLS failure): not an
//!   attempt. The backend is marked unreachable and the delivery goes back to the waiting
//!   room with the same attempt number, to another usable backend or, if none is left,
//!   handed back unattempted as above.
//!
//! A settle whose channel has died returns `Ok(false)` from lapin. It is logged and counted
//! in `amqp_sidecar_settle_failures_total`, never as a settle: delivery tags belong to their
//! channel, and the broker redelivers those messages.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use lapin::{
    Acker, BasicProperties,
    message::Delivery,
    options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions},
    types::ShortString,
};
use tokio_util::sync::CancellationToken;

use crate::{
    amqp::dead_letter::{DeadLetterPublisher, Failure, Reason, Stored},
    backend::{Backend, BackendError, Client, request},
    balance::{Health, Pool},
    config::Config,
    metrics::QueueMetrics,
    retry::{Attempt, AttemptCounter, Backoff, DELIVERY_COUNT_HEADER, DeliveryIdentity},
};

/// How long a delivery waits after a local resource error before it goes back to the
/// waiting room: long enough for descriptors to be freed, short enough not to matter.
const LOCAL_ERROR_WAIT: Duration = Duration::from_millis(200);

/// What happened to a delivery, before deciding how to settle it.
#[derive(Debug)]
pub enum Outcome<'a> {
    /// The body is over `backend.max_body_bytes`; not sent.
    TooLarge {
        /// Body size in bytes.
        size: usize,
    },
    /// The message already had `max_attempts` attempts (e.g. an earlier dead-letter publish
    /// failed); not sent again.
    AlreadyExhausted,
    /// The backend was asked.
    Answered {
        /// The backend's label (for `x-sidecar-backend`).
        backend: &'a str,
        /// Its answer.
        result: Result<(), BackendError>,
    },
    /// Shutdown or a pause came first: no backend answer to act on.
    Abandoned,
    /// The message was to be dead-lettered, but the publish failed (no confirm, DLX
    /// missing, broker blocked): the original must not be acked.
    DeadLetterFailed,
}

/// How to settle a delivery.
#[derive(Debug, Clone, PartialEq)]
pub enum Settlement {
    /// basic.ack.
    Ack,
    /// Wait `delay`, then basic.reject(requeue=true).
    Requeue {
        /// The backoff before requeueing.
        delay: Duration,
    },
    /// Publish to the DLX with confirms, then ack (on failure: [`Outcome::DeadLetterFailed`]).
    DeadLetter(Failure),
    /// basic.nack(requeue=true) without counting an attempt.
    Release,
}

/// The settings [`decide`] follows.
#[derive(Debug, Clone)]
pub struct Policy {
    /// `retry.max_attempts`.
    pub max_attempts: u32,
    /// `backend.max_body_bytes`, in bytes (for the dead-letter reason).
    pub max_body_bytes: usize,
    /// The backoff before a requeue.
    pub backoff: Backoff,
}

/// The one place an outcome becomes a settlement (see the module docs for the rules and
/// their sources). `attempt` is the delivery's 1-based attempt number; `rng` draws the
/// backoff's jitter.
pub fn decide<R: rand::Rng + ?Sized>(
    policy: &Policy,
    outcome: Outcome<'_>,
    attempt: u32,
    rng: &mut R,
) -> Settlement {
    let dead_letter = |reason, last_status, last_error: String, backend: &str| {
        Settlement::DeadLetter(Failure {
            reason,
            attempts: attempt,
            last_status,
            last_error,
            backend: backend.to_owned(),
        })
    };
    match outcome {
        Outcome::Abandoned => Settlement::Release,
        Outcome::TooLarge { size } => dead_letter(
            Reason::TooLarge,
            0,
            format!(
                "body of {size} bytes exceeds backend.max_body_bytes ({})",
                policy.max_body_bytes
            ),
            "",
        ),
        Outcome::AlreadyExhausted => dead_letter(
            Reason::RetriesExhausted,
            0,
            format!(
                "attempt {attempt} exceeds retry.max_attempts ({}); not sent again",
                policy.max_attempts
            ),
            "",
        ),
        Outcome::Answered { result: Ok(()), .. } => Settlement::Ack,
        // Never reached the worker, or the sidecar's own fault: not an attempt.
        Outcome::Answered { result: Err(e), .. } if e.is_not_delivered() || e.is_local() => {
            Settlement::Release
        }
        Outcome::Answered {
            backend,
            result: Err(e),
        } if !e.is_retryable() => {
            dead_letter(Reason::Rejected, e.status_code(), e.to_string(), backend)
        }
        Outcome::Answered { result: Err(e), .. } if attempt < policy.max_attempts => {
            Settlement::Requeue {
                delay: match e.retry_after() {
                    Some(after) => policy.backoff.capped(after),
                    None => policy.backoff.delay(attempt, rng),
                },
            }
        }
        Outcome::Answered {
            backend,
            result: Err(e),
        } => dead_letter(
            Reason::RetriesExhausted,
            e.status_code(),
            e.to_string(),
            backend,
        ),
        // Back off before the requeue so a missing DLX does not become a hot loop.
        Outcome::DeadLetterFailed => Settlement::Requeue {
            delay: policy.backoff.delay(attempt, rng),
        },
    }
}

/// Shared state of the per-delivery path.
pub struct Dispatcher {
    policy: Policy,
    counter: AttemptCounter,
    pool: Arc<Pool>,
    backends: Vec<Backend>,
    client: Client,
    dead_letter: DeadLetterPublisher,
    metrics: QueueMetrics,
    /// Cancelled when shutdown starts: deliveries still waiting for a backend are released,
    /// and backoffs end early (their deliveries are requeued at once).
    draining: CancellationToken,
    /// Cancelled when the drain deadline passes: requests and backoffs are abandoned and their
    /// deliveries requeued.
    abort: CancellationToken,
}

/// Parts of a delivery kept for settling it.
struct Held {
    acker: Acker,
    properties: BasicProperties,
    body: Bytes,
    routing_key: ShortString,
    redelivered: bool,
}

impl Held {
    /// What the attempt counter knows the message by.
    fn identity(&self) -> DeliveryIdentity<'_> {
        let p = &self.properties;
        DeliveryIdentity {
            delivery_count: p
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get(&ShortString::from(DELIVERY_COUNT_HEADER))),
            redelivered: self.redelivered,
            message_id: p.message_id().as_ref().map(ShortString::as_str),
            body: &self.body,
            correlation_id: p.correlation_id().as_ref().map(ShortString::as_str),
            timestamp: *p.timestamp(),
            routing_key: self.routing_key.as_str(),
        }
    }
}

impl Dispatcher {
    /// Builds the dispatcher.
    #[must_use]
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: &Config,
        pool: Arc<Pool>,
        backends: Vec<Backend>,
        client: Client,
        dead_letter: DeadLetterPublisher,
        draining: CancellationToken,
        abort: CancellationToken,
    ) -> Self {
        Self {
            policy: Policy {
                max_attempts: cfg.retry.max_attempts,
                max_body_bytes: cfg.backend.max_body_bytes,
                backoff: Backoff::new(&cfg.retry),
            },
            counter: AttemptCounter::new(cfg.amqp.queue_type, &cfg.retry),
            pool,
            backends,
            client,
            dead_letter,
            metrics: QueueMetrics::new(&cfg.amqp.queue),
            draining,
            abort,
        }
    }

    /// The backends, in config order.
    #[must_use]
    pub fn backends(&self) -> &[Backend] {
        &self.backends
    }

    /// The backend pool.
    #[must_use]
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// The dead-letter publisher.
    #[must_use]
    pub fn dead_letter(&self) -> &DeadLetterPublisher {
        &self.dead_letter
    }

    /// Handles one delivery from start to settlement.
    pub async fn handle(&self, delivery: Delivery) {
        self.metrics.deliveries.increment(1);
        let Delivery {
            delivery_tag,
            exchange,
            routing_key,
            redelivered,
            properties,
            data,
            acker,
        } = delivery;
        let held = Held {
            acker,
            properties,
            body: Bytes::from(data),
            routing_key,
            redelivered,
        };
        let attempt = self.counter.attempt(&held.identity());
        tracing::trace!(tag = delivery_tag, attempt = attempt.number, "delivery");
        let outcome = if held.body.len() > self.policy.max_body_bytes {
            Outcome::TooLarge {
                size: held.body.len(),
            }
        } else if attempt.number > self.policy.max_attempts {
            Outcome::AlreadyExhausted
        } else {
            let env = request::Envelope {
                exchange: exchange.as_str(),
                routing_key: held.routing_key.as_str(),
                redelivered,
                properties: &held.properties,
                attempt: attempt.number,
            };
            self.attempt(&env, held.body.clone()).await
        };
        let settlement = decide(&self.policy, outcome, attempt.number, &mut rand::rng());
        self.settle(settlement, held, &attempt).await;
    }

    /// Sends the delivery to a backend, unless shutdown intervenes.
    ///
    /// Two failures are not attempts; the delivery goes back to the waiting room with the
    /// same attempt number:
    /// - not delivered (refused, connect timeout, DNS or TLS failure): the backend is marked
    ///   unreachable, and the delivery goes to another usable backend at once, or, when none
    ///   is left, is handed back unattempted (consumption pauses);
    /// - a local resource error (the sidecar out of descriptors or local ports): the
    ///   delivery waits [`LOCAL_ERROR_WAIT`], and the backend is not blamed.
    async fn attempt(&self, env: &request::Envelope<'_>, body: Bytes) -> Outcome<'_> {
        let (headers, skipped) = request::headers(env);
        for s in &skipped {
            tracing::warn!(header = %s.name, reason = s.reason, "AMQP header left out of the HTTP request");
        }
        // Moved into the first request; rebuilt only after a local resource error (rare), so
        // the per-delivery path does not clone the header map.
        let mut headers = Some(headers);
        let mut usable = self.pool.usable();
        loop {
            let lease = tokio::select! {
                biased;
                () = self.draining.cancelled() => return Outcome::Abandoned,
                // No usable backend: consumption pauses; hand the delivery back unattempted.
                Ok(_) = usable.wait_for(|n| *n == 0) => return Outcome::Abandoned,
                lease = self.pool.acquire() => lease,
            };
            let index = lease.index();
            let backend = &self.backends[index];
            let result = tokio::select! {
                biased;
                () = self.abort.cancelled() => return Outcome::Abandoned,
                r = self.client.post(
                    backend,
                    headers.take().unwrap_or_else(|| request::headers(env).0),
                    body.clone(),
                ) => r.map(|_| ()),
            };
            drop(lease);
            if let Err(e) = &result
                && e.is_not_delivered()
            {
                self.pool.mark_unreachable(index, &e.to_string());
                tracing::debug!(backend = %backend.label, error = %e, "not delivered; not counted as an attempt, trying another backend");
                continue;
            }
            if let Err(e) = &result
                && e.is_local()
            {
                tracing::warn!(backend = %backend.label, error = %e, "the sidecar is out of a local resource; not counted as an attempt, retrying");
                tokio::select! {
                    () = self.draining.cancelled() => return Outcome::Abandoned,
                    () = tokio::time::sleep(LOCAL_ERROR_WAIT) => continue,
                }
            }
            let health = match &result {
                Err(e) if e.is_retryable() => Health::Failed,
                _ => Health::Answered,
            };
            self.pool.report(index, health);
            return Outcome::Answered {
                backend: &backend.label,
                result,
            };
        }
    }

    /// Carries out a settlement. A failed dead-letter publish is decided again, as
    /// [`Outcome::DeadLetterFailed`].
    async fn settle(&self, settlement: Settlement, held: Held, attempt: &Attempt) {
        let mut next = Some(settlement);
        while let Some(settlement) = next.take() {
            match settlement {
                Settlement::Ack => {
                    if self.sent("ack", held.acker.ack(BasicAckOptions::default()).await) {
                        self.metrics.acks.increment(1);
                        self.counter.forget(attempt);
                    }
                }
                Settlement::Requeue { delay } => {
                    tracing::debug!(
                        delay_ms = delay.as_millis() as u64,
                        "retryable failure; requeueing after backoff"
                    );
                    self.requeue(&held, attempt, delay).await;
                }
                // Not remembered: a release does not count as an attempt.
                Settlement::Release => self.release_held(&held).await,
                Settlement::DeadLetter(failure) => {
                    let stored = self
                        .dead_letter
                        .publish(
                            held.identity().content_key(),
                            held.body.clone(),
                            &held.properties,
                            &failure,
                            &self.abort,
                        )
                        .await;
                    match stored {
                        Ok(stored) => {
                            tracing::warn!(
                                reason = failure.reason.as_str(),
                                attempts = failure.attempts,
                                last_status = failure.last_status,
                                last_error = %failure.last_error,
                                exchange = self.dead_letter.exchange(),
                                earlier_copy = stored == Stored::Earlier,
                                "message dead-lettered"
                            );
                            self.metrics
                                .dead_letters(failure.reason.as_str())
                                .increment(1);
                            if self.sent("ack", held.acker.ack(BasicAckOptions::default()).await) {
                                self.counter.forget(attempt);
                            }
                        }
                        Err(e) => {
                            tracing::error!(
                                error = %e,
                                reason = failure.reason.as_str(),
                                "dead-letter publish failed; requeueing the original, not acking it"
                            );
                            self.metrics.dead_letter_failures.increment(1);
                            next = Some(decide(
                                &self.policy,
                                Outcome::DeadLetterFailed,
                                attempt.number,
                                &mut rand::rng(),
                            ));
                        }
                    }
                }
            }
        }
    }

    /// basic.nack(requeue=true): hands a delivery back without counting an attempt.
    async fn release_held(&self, held: &Held) {
        let options = BasicNackOptions {
            multiple: false,
            requeue: true,
        };
        if self.sent("nack(requeue)", held.acker.nack(options).await) {
            self.metrics.releases.increment(1);
        }
    }

    /// Releases a delivery without attempting it (consumer cancelled with it still buffered).
    pub async fn release(&self, delivery: Delivery) {
        self.metrics.deliveries.increment(1);
        let held = Held {
            acker: delivery.acker,
            properties: delivery.properties,
            body: Bytes::new(),
            routing_key: delivery.routing_key,
            redelivered: delivery.redelivered,
        };
        self.release_held(&held).await;
    }

    /// Stores the failed attempt (when the sidecar counts), waits out `delay`, then
    /// basic.reject(requeue=true), which every RabbitMQ version counts as a delivery attempt.
    async fn requeue(&self, held: &Held, attempt: &Attempt, delay: Duration) {
        self.counter.remember(attempt, &held.identity());
        self.backoff_sleep(delay).await;
        let rejected = held
            .acker
            .reject(BasicRejectOptions { requeue: true })
            .await;
        if self.sent("reject(requeue)", rejected) {
            self.metrics.requeues.increment(1);
        }
    }

    /// Waits out a backoff before a requeue, but not past the start of shutdown: the
    /// message is going back to the queue anyway, and the drain should not wait for it.
    async fn backoff_sleep(&self, delay: Duration) {
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = self.draining.cancelled() => {}
        }
    }

    /// True when the settle went out. `Ok(false)` and errors mean the delivery's channel is
    /// gone: the broker redelivers the message, so it is not counted as settled.
    fn sent(&self, what: &'static str, result: Result<bool, lapin::Error>) -> bool {
        match result {
            Ok(true) => true,
            Ok(false) => {
                self.metrics.settle_failures.increment(1);
                tracing::warn!(
                    settle = what,
                    "not settled: the delivery's channel closed; the broker will redeliver it"
                );
                false
            }
            Err(e) => {
                self.metrics.settle_failures.increment(1);
                tracing::warn!(settle = what, error = %crate::amqp::describe(&e), "settle failed; the broker will redeliver the message");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::{SeedableRng, rngs::StdRng};
    use reqwest::StatusCode;

    use super::*;

    fn policy() -> Policy {
        Policy {
            max_attempts: 3,
            max_body_bytes: 1_000,
            backoff: Backoff::new(&crate::config::RetryConfig {
                backoff_initial_ms: 100,
                backoff_multiplier: 2.0,
                backoff_max_ms: 1_000,
                ..crate::config::RetryConfig::default()
            }),
        }
    }

    fn status(code: u16, retry_after: Option<Duration>) -> BackendError {
        BackendError::Status {
            status: StatusCode::from_u16(code).expect("status"),
            retry_after,
            body: String::new(),
        }
    }

    fn answered(result: Result<(), BackendError>) -> Outcome<'static> {
        Outcome::Answered {
            backend: "worker-a",
            result,
        }
    }

    /// What a settlement must look like.
    enum Want {
        Ack,
        Release,
        /// A requeue with a delay of at most this.
        RequeueWithin(Duration),
        /// A requeue after exactly this (`Retry-After`).
        RequeueAfter(Duration),
        DeadLetter {
            reason: Reason,
            last_status: u16,
            backend: &'static str,
        },
    }

    /// One row per rule of the module docs, with its source.
    #[test]
    fn every_rule_of_the_settlement_table() {
        let p = policy();
        let max = p.max_attempts;
        let rows: Vec<(&str, Outcome<'static>, u32, Want)> = vec![
            // AMQP 0-9-1 §1.8.3.13 basic.ack: a 2xx is done.
            ("2xx acks", answered(Ok(())), 1, Want::Ack),
            // §1.8.3.14 basic.reject(requeue): a retryable failure below the limit is
            // requeued after a full-jitter backoff (Brooker 2015): ceiling(1) = 100 ms.
            (
                "5xx below the limit requeues",
                answered(Err(status(503, None))),
                1,
                Want::RequeueWithin(Duration::from_millis(100)),
            ),
            (
                "timeout below the limit requeues",
                answered(Err(BackendError::Timeout(Duration::from_secs(1)))),
                2,
                Want::RequeueWithin(Duration::from_millis(200)),
            ),
            (
                "a reset after sending (maybe processed) requeues",
                answered(Err(BackendError::Transport("reset".into()))),
                1,
                Want::RequeueWithin(Duration::from_millis(100)),
            ),
            // RFC 9110 §10.2.3: Retry-After replaces the backoff, capped at the max.
            (
                "429 with Retry-After waits that long",
                answered(Err(status(429, Some(Duration::from_millis(700))))),
                1,
                Want::RequeueAfter(Duration::from_millis(700)),
            ),
            (
                "Retry-After is capped at backoff_max_ms",
                answered(Err(status(503, Some(Duration::from_secs(60))))),
                1,
                Want::RequeueAfter(Duration::from_secs(1)),
            ),
            // A non-retryable 4xx is the message's fault: dead-lettered at once
            // (https://www.rabbitmq.com/docs/dlx, published by the sidecar with confirms).
            (
                "422 dead-letters as rejected",
                answered(Err(status(422, None))),
                1,
                Want::DeadLetter {
                    reason: Reason::Rejected,
                    last_status: 422,
                    backend: "worker-a",
                },
            ),
            (
                "5xx at the limit dead-letters as retries_exhausted",
                answered(Err(status(500, None))),
                max,
                Want::DeadLetter {
                    reason: Reason::RetriesExhausted,
                    last_status: 500,
                    backend: "worker-a",
                },
            ),
            (
                "a timeout at the limit dead-letters with status 0",
                answered(Err(BackendError::Timeout(Duration::from_secs(1)))),
                max,
                Want::DeadLetter {
                    reason: Reason::RetriesExhausted,
                    last_status: 0,
                    backend: "worker-a",
                },
            ),
            (
                "too large dead-letters unsent",
                Outcome::TooLarge { size: 5_000 },
                1,
                Want::DeadLetter {
                    reason: Reason::TooLarge,
                    last_status: 0,
                    backend: "",
                },
            ),
            (
                "past the limit dead-letters unsent",
                Outcome::AlreadyExhausted,
                max + 1,
                Want::DeadLetter {
                    reason: Reason::RetriesExhausted,
                    last_status: 0,
                    backend: "",
                },
            ),
            // https://www.rabbitmq.com/docs/nack: basic.nack(requeue) hands back unattempted.
            ("abandoned releases", Outcome::Abandoned, 1, Want::Release),
            // Not delivered to the worker (Envoy's connect-failure rule): not an attempt,
            // even at the limit.
            (
                "refused at the limit releases, never dead-letters",
                answered(Err(BackendError::NotDelivered("refused".into()))),
                max,
                Want::Release,
            ),
            (
                "a local resource error releases",
                answered(Err(BackendError::Local("EMFILE".into()))),
                max,
                Want::Release,
            ),
            // The dead-letter publish failed: requeue after a backoff, never ack.
            (
                "a failed dead-letter publish requeues after a backoff",
                Outcome::DeadLetterFailed,
                2,
                Want::RequeueWithin(Duration::from_millis(200)),
            ),
        ];
        let mut rng = StdRng::seed_from_u64(7);
        for (name, outcome, attempt, want) in rows {
            let got = decide(&p, outcome, attempt, &mut rng);
            match (want, &got) {
                (Want::Ack, Settlement::Ack) | (Want::Release, Settlement::Release) => {}
                (Want::RequeueWithin(max), Settlement::Requeue { delay }) => {
                    assert!(*delay <= max, "{name}: {delay:?} > {max:?}");
                }
                (Want::RequeueAfter(d), Settlement::Requeue { delay }) => {
                    assert_eq!(*delay, d, "{name}");
                }
                (
                    Want::DeadLetter {
                        reason,
                        last_status,
                        backend,
                    },
                    Settlement::DeadLetter(f),
                ) => {
                    assert_eq!(f.reason, reason, "{name}");
                    assert_eq!(f.last_status, last_status, "{name}");
                    assert_eq!(f.backend, backend, "{name}");
                    assert_eq!(f.attempts, attempt, "{name}");
                }
                (_, got) => panic!("{name}: unexpected {got:?}"),
            }
        }
    }

    #[test]
    fn the_jitter_covers_the_whole_range() {
        // Full jitter: over many draws the delays spread across [0, ceiling].
        let p = policy();
        let mut rng = StdRng::seed_from_u64(1);
        let delays: Vec<Duration> = (0..200)
            .map(
                |_| match decide(&p, answered(Err(status(503, None))), 1, &mut rng) {
                    Settlement::Requeue { delay } => delay,
                    other => panic!("{other:?}"),
                },
            )
            .collect();
        let (lo, hi) = (
            delays.iter().min().expect("some"),
            delays.iter().max().expect("some"),
        );
        assert!(*lo < Duration::from_millis(20), "{lo:?}");
        assert!(*hi > Duration::from_millis(80), "{hi:?}");
    }
}
