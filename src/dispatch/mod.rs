//! One delivery's path: count the attempt, pick a backend, POST, classify the outcome, and
//! settle. [`decide`] is the single `match` from [`Outcome`] to [`Settlement`] (ack,
//! requeue, dead-letter or release), a pure function over plain data; nothing else decides
//! how a delivery is settled.
//!
//! Settlement follows the AMQP 0-9-1 spec (§1.8.3.13 basic.ack, §1.8.3.14 basic.reject and
//! RabbitMQ's basic.nack extension, <https://www.rabbitmq.com/docs/nack>):
//! - success: `basic.ack`;
//! - retryable failure below the attempt limit, `retry.mode: requeue`: wait the backoff,
//!   then `basic.reject(requeue=true)` (counted by quorum queues on every RabbitMQ
//!   version). While it waits, its consumer is retired and another opened in its place
//!   (up to `retry.max_waiting` waiting deliveries, see [`Capacity`]), so the wait does
//!   not block the pod;
//! - the same in `retry.mode: delay_queue`: publish a copy with `x-sidecar-attempts` to a
//!   delay tier ([`crate::amqp::delay`]) with confirms, then ack; if that publish fails,
//!   requeue as above;
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

mod decide;

use std::{future::Future, sync::Arc, time::Duration};

use bytes::Bytes;
use lapin::{
    Acker, BasicProperties,
    message::Delivery,
    options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions},
    types::ShortString,
};
use tokio_util::sync::CancellationToken;

use crate::{
    amqp::{
        consumer::{Handler, Origin},
        delay::{DelayTiers, delay_properties},
        publisher::{Destination, Publisher, Stored},
    },
    backend::{BackendError, request, upstreams::Upstreams},
    balance::Observed,
    capacity::{self, Capacity, Wait},
    config::Config,
    metrics::QueueMetrics,
    retry::{Attempt, AttemptCounter, Backoff, DELIVERY_COUNT_HEADER, DeliveryIdentity},
};

/// How long a delivery waits after a local resource error before it goes back to the
/// waiting room: long enough for descriptors to be freed, short enough not to matter.
const LOCAL_ERROR_WAIT: Duration = Duration::from_millis(200);

pub use decide::{Outcome, Policy, Settlement, decide};

/// Shared state of the per-delivery path.
pub struct Dispatcher {
    policy: Policy,
    counter: AttemptCounter,
    upstreams: Arc<Upstreams>,
    /// Publishes dead-letter and delay copies.
    publisher: Arc<Publisher>,
    /// The delay tiers, in `retry.mode: delay_queue`.
    tiers: Option<DelayTiers>,
    /// The consumer target and the retry waiting room (`retry.max_waiting`).
    capacity: Arc<Capacity>,
    metrics: QueueMetrics,
    /// `tracing.start_traces`.
    start_traces: bool,
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
    /// Attempts used by the message's earlier copies (a copy back from a delay tier).
    carried_attempts: Option<u32>,
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
            carried_attempts: self.carried_attempts,
        }
    }
}

impl Dispatcher {
    /// Builds the dispatcher over the shared backends, publisher and consumer target.
    /// `draining` is cancelled when shutdown starts, `abort` when the drain deadline passes.
    #[must_use]
    pub fn new(
        cfg: &Config,
        upstreams: Arc<Upstreams>,
        publisher: Arc<Publisher>,
        capacity: Arc<Capacity>,
        draining: CancellationToken,
        abort: CancellationToken,
    ) -> Self {
        Self {
            policy: Policy {
                max_attempts: cfg.retry.max_attempts,
                max_body_bytes: cfg.backend.max_body_bytes,
                backoff: Backoff::new(&cfg.retry),
                mode: cfg.retry.mode,
            },
            counter: AttemptCounter::new(cfg.amqp.queue_type, &cfg.retry),
            upstreams,
            publisher,
            tiers: DelayTiers::new(cfg),
            capacity,
            metrics: QueueMetrics::new(&cfg.amqp.queue),
            start_traces: cfg.tracing.start_traces,
            draining,
            abort,
        }
    }

    /// Handles one delivery, from `origin`, from start to settlement.
    pub async fn dispatch(&self, delivery: Delivery, origin: Origin) {
        self.metrics.deliveries.increment(1);
        self.capacity.delivered();
        let Delivery {
            delivery_tag,
            exchange,
            routing_key,
            redelivered,
            properties,
            data,
            acker,
        } = delivery;
        // Held from here to the settle: the memory budget counts it.
        let mut body_held = self.capacity.hold(data.len() as u64);
        let carried_attempts = self
            .tiers
            .as_ref()
            .and_then(|t| t.carried_attempts(properties.headers().as_ref()));
        let held = Held {
            acker,
            properties,
            body: Bytes::from(data),
            routing_key,
            redelivered,
            carried_attempts,
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
                start_traces: self.start_traces,
            };
            self.attempt(&env, held.body.clone()).await
        };
        let settlement = decide(&self.policy, outcome, attempt.number, &mut rand::rng());
        // Past the memory budget, the consumer must not turn idle: retire it before the
        // settle frees its prefetch slot (see `capacity`).
        if body_held.retire_before_settle() {
            origin.retire().await;
            body_held.left_consumer();
        }
        self.settle(settlement, held, &attempt, &origin, &mut body_held)
            .await;
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
        let mut usable = self.upstreams.pool.usable();
        loop {
            let lease = tokio::select! {
                biased;
                () = self.draining.cancelled() => return Outcome::Abandoned,
                // No usable backend: consumption pauses; hand the delivery back unattempted.
                Ok(_) = usable.wait_for(|n| *n == 0) => return Outcome::Abandoned,
                lease = self.upstreams.pool.acquire() => lease,
            };
            let index = lease.index();
            let backend = &self.upstreams.backends[index];
            let sent_at = tokio::time::Instant::now();
            let result = tokio::select! {
                biased;
                () = self.abort.cancelled() => return Outcome::Abandoned,
                r = self.upstreams.client.post(
                    backend,
                    headers.take().unwrap_or_else(|| request::headers(env).0),
                    body.clone(),
                ) => r.map(|_| ()),
            };
            if let Err(e) = &result
                && e.is_not_delivered()
            {
                // Marked before the slot is released, so the delivery the release wakes
                // does not pick the same backend.
                self.upstreams.pool.mark_unreachable(index, &e.to_string());
                drop(lease);
                tracing::debug!(backend = %backend.label, error = %e, "not delivered; not counted as an attempt, trying another backend");
                continue;
            }
            // An answer (or a timeout) tells the limiter of a learned `max_in_flight` how
            // the backend copes with this many requests in flight.
            if result.as_ref().err().is_none_or(|e| !e.is_local()) {
                let overloaded = result.as_ref().err().is_some_and(BackendError::is_overload);
                self.upstreams.pool.observe_latency(
                    index,
                    sent_at.elapsed(),
                    lease.in_flight(),
                    overloaded,
                );
            }
            drop(lease);
            if let Err(e) = &result
                && e.is_local()
            {
                tracing::warn!(backend = %backend.label, error = %e, "the sidecar is out of a local resource; not counted as an attempt, retrying");
                tokio::select! {
                    () = self.draining.cancelled() => return Outcome::Abandoned,
                    () = tokio::time::sleep(LOCAL_ERROR_WAIT) => continue,
                }
            }
            let observed = match &result {
                Err(e) if e.is_retryable() => Observed::Failed,
                _ => Observed::Answered,
            };
            self.upstreams.pool.report(index, observed);
            return Outcome::Answered {
                backend: &backend.label,
                result,
            };
        }
    }

    /// Carries out a settlement. A failed dead-letter publish is decided again, as
    /// [`Outcome::DeadLetterFailed`].
    async fn settle(
        &self,
        settlement: Settlement,
        held: Held,
        attempt: &Attempt,
        origin: &Origin,
        body_held: &mut capacity::Held,
    ) {
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
                    self.requeue(&held, attempt, delay, origin, body_held).await;
                }
                // Not remembered: a release does not count as an attempt.
                Settlement::Release => self.release_held(&held).await,
                Settlement::Delay { delay } => {
                    if !self.delay(&held, attempt, delay).await {
                        next = Some(decide(
                            &self.policy,
                            Outcome::DelayFailed,
                            attempt.number,
                            &mut rand::rng(),
                        ));
                    }
                }
                Settlement::DeadLetter(failure) => {
                    let stored = self
                        .publisher
                        .dead_letter(
                            held.identity().content_key(),
                            held.redelivered,
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
                                exchange = self.publisher.exchange(),
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
    pub async fn release_unattempted(&self, delivery: Delivery) {
        self.metrics.deliveries.increment(1);
        let held = Held {
            acker: delivery.acker,
            properties: delivery.properties,
            body: Bytes::new(),
            routing_key: delivery.routing_key,
            redelivered: delivery.redelivered,
            carried_attempts: None,
        };
        self.release_held(&held).await;
    }

    /// Stores the failed attempt (when the sidecar counts), waits out `delay`, then
    /// basic.reject(requeue=true), which every RabbitMQ version counts as a delivery attempt.
    ///
    /// The wait takes a place in [`Capacity`]: the delivery retires its consumer, and the
    /// supervisor opens another in its place, so the backends get another delivery
    /// meanwhile. With `retry.max_waiting` reached, the delivery is requeued at once
    /// ([`Wait::Skip`]), or, if it was skipped last time too, waits in place holding its
    /// consumer ([`Wait::InPlace`]).
    async fn requeue(
        &self,
        held: &Held,
        attempt: &Attempt,
        delay: Duration,
        origin: &Origin,
        body_held: &mut capacity::Held,
    ) {
        let identity = held.identity();
        self.counter.remember(attempt, &identity);
        let wait = self.capacity.wait(identity.content_key());
        match &wait {
            Wait::Beside(_) => {
                origin.retire().await;
                body_held.left_consumer();
                self.backoff_sleep(delay).await;
            }
            Wait::InPlace(_) => self.backoff_sleep(delay).await,
            Wait::Skip => {}
        }
        let rejected = held
            .acker
            .reject(BasicRejectOptions { requeue: true })
            .await;
        if self.sent("reject(requeue)", rejected) {
            self.metrics.requeues.increment(1);
        }
        drop(wait);
    }

    /// `retry.mode: delay_queue`: stores a copy with `x-sidecar-attempts` in the delay tier
    /// for `delay`, then acks the original. False when the copy could not be stored (the
    /// caller then requeues the original); nothing is acked without a confirmed copy.
    async fn delay(&self, held: &Held, attempt: &Attempt, delay: Duration) -> bool {
        let Some(tiers) = &self.tiers else {
            return false;
        };
        let tier = tiers.for_delay(delay);
        let to = Destination::queue(&tier.name);
        let stored = self
            .publisher
            .publish_copy(
                &to,
                held.identity().content_key(),
                held.redelivered,
                held.body.clone(),
                delay_properties(&held.properties, attempt.number),
                &self.abort,
            )
            .await;
        match stored {
            Ok(_) => {
                tracing::debug!(
                    attempt = attempt.number,
                    tier = %tier.name,
                    "retryable failure; copy stored in a delay queue"
                );
                if self.sent("ack", held.acker.ack(BasicAckOptions::default()).await) {
                    self.metrics.delayed.increment(1);
                    self.counter.forget(attempt);
                }
                true
            }
            Err(e) => {
                tracing::error!(
                    error = %e,
                    tier = %tier.name,
                    "delay-queue publish failed; requeueing the original with the sidecar's backoff, not acking it"
                );
                self.metrics.delay_failures.increment(1);
                false
            }
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

impl Handler for Dispatcher {
    fn handle(&self, delivery: Delivery, origin: Origin) -> impl Future<Output = ()> + Send + '_ {
        self.dispatch(delivery, origin)
    }

    fn round_trip(&self, d: Duration) {
        self.capacity.round_trip(d);
    }

    fn release(&self, delivery: Delivery) -> impl Future<Output = ()> + Send + '_ {
        self.release_unattempted(delivery)
    }
}
