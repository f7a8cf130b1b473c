//! The settlement policy: [`decide`] turns an [`Outcome`] into a [`Settlement`]. A pure
//! function over plain data, table-tested against the rules of the dispatch module docs.

use std::time::Duration;

use crate::{
    amqp::dead_letter::{Failure, Reason},
    backend::BackendError,
    config::RetryMode,
    retry::Backoff,
};

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
    /// The delay copy (`retry.mode: delay_queue`) could not be stored: the original must
    /// not be acked.
    DelayFailed,
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
    /// Publish a copy with `x-sidecar-attempts` to the delay tier for `delay`, with
    /// confirms, then ack (on failure: [`Outcome::DelayFailed`]).
    Delay {
        /// The backoff, rounded up to a tier by [`crate::amqp::delay::DelayTiers::for_delay`].
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
    /// `retry.mode`: where a retryable failure waits out its backoff.
    pub mode: RetryMode,
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
            let delay = match e.retry_after() {
                Some(after) => policy.backoff.capped(after),
                None => policy.backoff.delay(attempt, rng),
            };
            match policy.mode {
                RetryMode::Requeue => Settlement::Requeue { delay },
                RetryMode::DelayQueue => Settlement::Delay { delay },
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
        // Back off before the requeue so a missing DLX or delay tier does not become a hot
        // loop. The sidecar's own backoff: the broker's could not be had.
        Outcome::DeadLetterFailed | Outcome::DelayFailed => Settlement::Requeue {
            delay: policy.backoff.delay(attempt, rng),
        },
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
            mode: RetryMode::Requeue,
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
        /// A delay-queue copy with a delay of at most this.
        DelayWithin(Duration),
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
        check(&p, rows);
    }

    /// `retry.mode: delay_queue`: the same table, but a retryable failure below the limit
    /// goes to a delay tier; a failed delay publish is requeued with the sidecar's backoff.
    #[test]
    fn the_delay_queue_mode_rows() {
        let p = Policy {
            mode: RetryMode::DelayQueue,
            ..policy()
        };
        let max = p.max_attempts;
        let rows: Vec<(&str, Outcome<'static>, u32, Want)> = vec![
            (
                "5xx below the limit goes to a delay tier",
                answered(Err(status(503, None))),
                2,
                Want::DelayWithin(Duration::from_millis(200)),
            ),
            (
                "5xx at the limit still dead-letters",
                answered(Err(status(503, None))),
                max,
                Want::DeadLetter {
                    reason: Reason::RetriesExhausted,
                    last_status: 503,
                    backend: "worker-a",
                },
            ),
            (
                "a failed delay publish requeues after a backoff",
                Outcome::DelayFailed,
                1,
                Want::RequeueWithin(Duration::from_millis(100)),
            ),
            ("2xx acks", answered(Ok(())), 1, Want::Ack),
        ];
        check(&p, rows);
    }

    fn check(p: &Policy, rows: Vec<(&str, Outcome<'static>, u32, Want)>) {
        let mut rng = StdRng::seed_from_u64(7);
        for (name, outcome, attempt, want) in rows {
            let got = decide(p, outcome, attempt, &mut rng);
            match (want, &got) {
                (Want::Ack, Settlement::Ack) | (Want::Release, Settlement::Release) => {}
                (Want::RequeueWithin(max), Settlement::Requeue { delay }) => {
                    assert!(*delay <= max, "{name}: {delay:?} > {max:?}");
                }
                (Want::RequeueAfter(d), Settlement::Requeue { delay }) => {
                    assert_eq!(*delay, d, "{name}");
                }
                (Want::DelayWithin(max), Settlement::Delay { delay }) => {
                    assert!(*delay <= max, "{name}: {delay:?} > {max:?}");
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
