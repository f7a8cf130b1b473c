//! One delivery's path: count the attempt, pick a backend, POST, classify the outcome, and
//! settle. [`Dispatcher::decide`] is the single `match` from outcome to settlement (ack,
//! requeue, dead-letter or release); nothing else settles a delivery.
//!
//! Settlement follows the AMQP 0-9-1 spec (§1.8.3.13 basic.ack, §1.8.3.14 basic.reject and
//! RabbitMQ's basic.nack extension, <https://www.rabbitmq.com/docs/nack>):
//! - success: `basic.ack`;
//! - retryable failure below the attempt limit: wait the backoff, then
//!   `basic.reject(requeue=true)` (counted by quorum queues on every RabbitMQ version);
//! - non-retryable failure, or the limit reached: publish to the DLX with confirms, then ack;
//!   if that publish fails, requeue;
//! - not attempted (shutdown drain): `basic.nack(requeue=true)`, which RabbitMQ 4.x does not
//!   count toward the delivery limit.
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

/// What happened on this attempt, before deciding how to settle.
#[derive(Debug)]
pub enum Attempted {
    /// The body is over `backend.max_body_bytes`; not sent.
    TooLarge {
        /// Body size in bytes.
        size: usize,
    },
    /// The message already had `max_attempts` attempts (e.g. an earlier dead-letter publish
    /// failed); not sent again.
    AlreadyExhausted,
    /// The backend was asked.
    Response {
        /// Index of the backend.
        backend: usize,
        /// Its answer.
        result: Result<(), BackendError>,
    },
    /// Shutdown or a pause came first: no backend answer to act on.
    Abandoned,
}

/// How to settle a delivery.
#[derive(Debug, Clone)]
pub enum Verdict {
    /// basic.ack.
    Ack,
    /// Wait `delay`, then basic.reject(requeue=true).
    Requeue {
        /// The backoff before requeueing.
        delay: Duration,
    },
    /// Publish to the DLX with confirms, then ack (requeue if the publish fails).
    DeadLetter(Failure),
    /// basic.nack(requeue=true) without counting an attempt.
    Release,
}

/// Shared state of the per-delivery path.
pub struct Dispatcher {
    max_attempts: u32,
    max_body_bytes: usize,
    backoff: Backoff,
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
            max_attempts: cfg.retry.max_attempts,
            max_body_bytes: cfg.backend.max_body_bytes,
            backoff: Backoff::new(&cfg.retry),
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
        let attempted = if held.body.len() > self.max_body_bytes {
            Attempted::TooLarge {
                size: held.body.len(),
            }
        } else if attempt.number > self.max_attempts {
            Attempted::AlreadyExhausted
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
        let verdict = self.decide(attempted, attempt.number);
        self.settle(verdict, held, &attempt).await;
    }

    /// Sends the delivery to a backend, unless shutdown intervenes.
    ///
    /// A local resource error (the sidecar out of descriptors or local ports) is not an
    /// attempt: the delivery waits [`LOCAL_ERROR_WAIT`] and goes back to the waiting room
    /// with the same attempt number, and the backend is not blamed.
    async fn attempt(&self, env: &request::Envelope<'_>, body: Bytes) -> Attempted {
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
                () = self.draining.cancelled() => return Attempted::Abandoned,
                // No usable backend: consumption pauses; hand the delivery back unattempted.
                Ok(_) = usable.wait_for(|n| *n == 0) => return Attempted::Abandoned,
                lease = self.pool.acquire() => lease,
            };
            let index = lease.index();
            let backend = &self.backends[index];
            let result = tokio::select! {
                biased;
                () = self.abort.cancelled() => return Attempted::Abandoned,
                r = self.client.post(
                    backend,
                    headers.take().unwrap_or_else(|| request::headers(env).0),
                    body.clone(),
                ) => r.map(|_| ()),
            };
            drop(lease);
            if let Err(e) = &result
                && e.is_local()
            {
                tracing::warn!(backend = %backend.label, error = %e, "the sidecar is out of a local resource; not counted as an attempt, retrying");
                tokio::select! {
                    () = self.draining.cancelled() => return Attempted::Abandoned,
                    () = tokio::time::sleep(LOCAL_ERROR_WAIT) => continue,
                }
            }
            let health = match &result {
                Err(e) if e.is_retryable() => Health::Failed,
                _ => Health::Answered,
            };
            self.pool.report(index, health);
            return Attempted::Response {
                backend: index,
                result,
            };
        }
    }

    /// The one place an outcome becomes a settlement.
    #[must_use]
    pub fn decide(&self, attempted: Attempted, attempt: u32) -> Verdict {
        let failure = |reason, last_status, last_error: String, backend: String| {
            Verdict::DeadLetter(Failure {
                reason,
                attempts: attempt,
                last_status,
                last_error,
                backend,
            })
        };
        match attempted {
            Attempted::Abandoned => Verdict::Release,
            Attempted::TooLarge { size } => failure(
                Reason::TooLarge,
                0,
                format!(
                    "body of {size} bytes exceeds backend.max_body_bytes ({})",
                    self.max_body_bytes
                ),
                String::new(),
            ),
            Attempted::AlreadyExhausted => failure(
                Reason::RetriesExhausted,
                0,
                format!(
                    "attempt {attempt} exceeds retry.max_attempts ({}); not sent again",
                    self.max_attempts
                ),
                String::new(),
            ),
            Attempted::Response { result: Ok(()), .. } => Verdict::Ack,
            Attempted::Response {
                backend,
                result: Err(e),
            } if !e.is_retryable() => failure(
                Reason::Rejected,
                e.status_code(),
                e.to_string(),
                self.backends[backend].label.clone(),
            ),
            Attempted::Response { result: Err(e), .. } if attempt < self.max_attempts => {
                Verdict::Requeue {
                    delay: match e.retry_after() {
                        Some(after) => self.backoff.capped(after),
                        None => self.backoff.delay(attempt, &mut rand::rng()),
                    },
                }
            }
            Attempted::Response {
                backend,
                result: Err(e),
            } => failure(
                Reason::RetriesExhausted,
                e.status_code(),
                e.to_string(),
                self.backends[backend].label.clone(),
            ),
        }
    }

    async fn settle(&self, verdict: Verdict, held: Held, attempt: &Attempt) {
        match verdict {
            Verdict::Ack => {
                if self.sent("ack", held.acker.ack(BasicAckOptions::default()).await) {
                    self.metrics.acks.increment(1);
                    self.counter.forget(attempt);
                }
            }
            Verdict::Requeue { delay } => {
                tracing::debug!(
                    delay_ms = delay.as_millis() as u64,
                    "retryable failure; requeueing after backoff"
                );
                self.requeue(&held, attempt, delay).await;
            }
            Verdict::Release => {
                // Not remembered: a release does not count as an attempt.
                let options = BasicNackOptions {
                    multiple: false,
                    requeue: true,
                };
                if self.sent("nack(requeue)", held.acker.nack(options).await) {
                    self.metrics.releases.increment(1);
                }
            }
            Verdict::DeadLetter(failure) => {
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
                        // Back off before the requeue so a missing DLX does not become a hot loop.
                        let delay = self.backoff.delay(attempt.number, &mut rand::rng());
                        self.requeue(&held, attempt, delay).await;
                    }
                }
            }
        }
    }

    /// Releases a delivery without attempting it (consumer cancelled with it still buffered).
    pub async fn release(&self, delivery: Delivery) {
        self.metrics.deliveries.increment(1);
        let attempt = Attempt {
            number: 0,
            local: false,
            key: None,
        };
        let held = Held {
            acker: delivery.acker,
            properties: delivery.properties,
            body: Bytes::new(),
            routing_key: delivery.routing_key,
            redelivered: delivery.redelivered,
        };
        self.settle(Verdict::Release, held, &attempt).await;
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
