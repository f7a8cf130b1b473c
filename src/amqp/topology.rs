//! Declaring, or passively checking, the sidecar's topology:
//! the consumed queue, the dead-letter exchange (DLX), the dead-letter queue (DLQ) and, in
//! `retry.mode: delay_queue`, the delay tiers ([`crate::amqp::delay`]).
//!
//! The consumed queue is declared durable with `x-queue-type` (quorum or classic), and with
//! `x-dead-letter-exchange` / `x-dead-letter-routing-key` pointing at the DLX. The sidecar
//! dead-letters by publishing itself (with its `x-sidecar-*` headers); the queue arguments
//! are the safety net for what the broker dead-letters on its own, such as quorum queues'
//! delivery limit (20 by default since RabbitMQ 4.0), so that nothing is dropped there either.
//! <https://www.rabbitmq.com/docs/dlx>, <https://www.rabbitmq.com/docs/quorum-queues#poison-message-handling>

use lapin::{
    Channel, Connection, ExchangeKind,
    options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    protocol::{AMQPErrorKind, AMQPSoftError},
    types::{AMQPValue, FieldTable, LongString, ShortString},
};

use crate::{
    amqp::delay::DelayTiers,
    config::{Config, QueueType},
};

/// What went wrong while declaring or checking the topology.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// An object exists with other arguments than the ones the sidecar declares.
    #[error(
        "{what} {name:?} already exists with a different {argument}: {detail}. Fix: {}",
        mismatch_fix(what)
    )]
    Mismatch {
        /// `queue`, `exchange` or `delay queue`.
        what: &'static str,
        /// Its name.
        name: String,
        /// The argument that differs, e.g. `x-queue-type`.
        argument: String,
        /// The broker's message.
        detail: String,
    },
    /// A passive declare found nothing (`amqp.declare: false`).
    #[error(
        "{what} {name:?} does not exist and amqp.declare is false. Fix: create it, or set amqp.declare: true \
         so the sidecar declares it"
    )]
    Missing {
        /// `queue` or `exchange`.
        what: &'static str,
        /// Its name.
        name: String,
    },
    /// The broker refused for lack of permissions.
    #[error(
        "access refused to {what} {name:?}: {detail}. Fix: grant the user configure/read/write on it"
    )]
    AccessRefused {
        /// `queue` or `exchange`.
        what: &'static str,
        /// Its name.
        name: String,
        /// The broker's message.
        detail: String,
    },
    /// Anything else (connection lost, ...): worth retrying.
    #[error("declaring {what} {name:?} failed: {source}")]
    Other {
        /// `queue` or `exchange`.
        what: &'static str,
        /// Its name.
        name: String,
        /// The lapin error.
        #[source]
        source: lapin::Error,
    },
}

impl TopologyError {
    /// True when retrying cannot help until someone changes the config or the broker.
    #[must_use]
    pub fn is_permanent(&self) -> bool {
        !matches!(self, Self::Other { .. })
    }

    fn classify(what: &'static str, name: &str, err: lapin::Error) -> Self {
        if let lapin::ErrorKind::ProtocolError(amqp) = err.kind() {
            let detail = amqp.get_message().to_string();
            match amqp.kind() {
                AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED) => {
                    return Self::Mismatch {
                        what,
                        name: name.to_owned(),
                        argument: inequivalent_arg(&detail)
                            .unwrap_or_else(|| "argument".to_owned()),
                        detail,
                    };
                }
                AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND) => {
                    return Self::Missing {
                        what,
                        name: name.to_owned(),
                    };
                }
                AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) => {
                    return Self::AccessRefused {
                        what,
                        name: name.to_owned(),
                        detail,
                    };
                }
                _ => {}
            }
        }
        Self::Other {
            what,
            name: name.to_owned(),
            source: err,
        }
    }
}

fn mismatch_fix(what: &str) -> &'static str {
    if what == DELAY_QUEUE {
        "delete it (the sidecar declares it again, with a fixed x-message-ttl, dead-lettering back to the queue), \
         or set amqp.declare: false to use it as it is. The tiers follow retry.backoff_initial_ms, \
         retry.backoff_multiplier, retry.backoff_max_ms and retry.max_attempts"
    } else {
        "make the config match the existing object (amqp.queue_type, dead_letter.*), delete and recreate it, \
         or set amqp.declare: false to use it as it is"
    }
}

/// What a delay tier is called in errors.
const DELAY_QUEUE: &str = "delay queue";

/// Pulls `x-queue-type` out of "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for ...".
fn inequivalent_arg(detail: &str) -> Option<String> {
    let rest = detail.split("inequivalent arg '").nth(1)?;
    Some(rest.split('\'').next()?.to_owned())
}

/// The consumed queue's declare arguments.
#[must_use]
pub fn queue_arguments(cfg: &Config) -> FieldTable {
    let queue = &cfg.amqp.queue;
    let mut args = FieldTable::default();
    if cfg.amqp.queue_type == QueueType::Quorum {
        args.insert(
            ShortString::from("x-queue-type"),
            AMQPValue::LongString(LongString::from("quorum")),
        );
    }
    args.insert(
        ShortString::from("x-dead-letter-exchange"),
        AMQPValue::LongString(LongString::from(cfg.dead_letter.exchange_for(queue))),
    );
    args.insert(
        ShortString::from("x-dead-letter-routing-key"),
        AMQPValue::LongString(LongString::from(cfg.dead_letter.routing_key_for(queue))),
    );
    args
}

/// Declares (or, with `amqp.declare: false`, checks) the queue, the DLX and the DLQ.
///
/// Each step runs on a fresh channel, because a failed declare closes its channel.
///
/// # Errors
/// A [`TopologyError`] that names the object and, for a mismatch, the argument and the fix.
pub async fn ensure(conn: &Connection, cfg: &Config) -> Result<(), TopologyError> {
    let queue = cfg.amqp.queue.as_str();
    let dlx = cfg.dead_letter.exchange_for(queue);
    let dlq = cfg.dead_letter.queue_for(queue);
    let rk = cfg.dead_letter.routing_key_for(queue);
    let passive = !cfg.amqp.declare;

    let ch = channel(conn, "queue", queue).await?;
    let opts = QueueDeclareOptions {
        passive,
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let args = if passive {
        FieldTable::default()
    } else {
        queue_arguments(cfg)
    };
    ch.queue_declare(ShortString::from(queue), opts, args)
        .await
        .map_err(|e| TopologyError::classify("queue", queue, e))?;

    let ch = reuse_or_open(conn, ch, "exchange", &dlx).await?;
    ch.exchange_declare(
        ShortString::from(dlx.as_str()),
        ExchangeKind::Direct,
        ExchangeDeclareOptions {
            passive,
            durable: true,
            ..ExchangeDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .map_err(|e| TopologyError::classify("exchange", &dlx, e))?;

    let ch = reuse_or_open(conn, ch, "queue", &dlq).await?;
    let mut dlq_args = FieldTable::default();
    if cfg.amqp.queue_type == QueueType::Quorum && !passive {
        dlq_args.insert(
            ShortString::from("x-queue-type"),
            AMQPValue::LongString(LongString::from("quorum")),
        );
    }
    ch.queue_declare(
        ShortString::from(dlq.as_str()),
        QueueDeclareOptions {
            passive,
            durable: true,
            ..QueueDeclareOptions::default()
        },
        dlq_args,
    )
    .await
    .map_err(|e| TopologyError::classify("queue", &dlq, e))?;
    if !passive {
        ch.queue_bind(
            ShortString::from(dlq.as_str()),
            ShortString::from(dlx.as_str()),
            ShortString::from(rk.as_str()),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| TopologyError::classify("queue", &dlq, e))?;
    }
    let mut ch = ch;
    if let Some(tiers) = DelayTiers::new(cfg) {
        for tier in tiers.tiers() {
            ch = reuse_or_open(conn, ch, DELAY_QUEUE, &tier.name).await?;
            let args = if passive {
                FieldTable::default()
            } else {
                tiers.arguments(tier)
            };
            ch.queue_declare(
                ShortString::from(tier.name.as_str()),
                QueueDeclareOptions {
                    passive,
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                args,
            )
            .await
            .map_err(|e| TopologyError::classify(DELAY_QUEUE, &tier.name, e))?;
        }
    }
    let _ = ch.close(200, ShortString::from("topology done")).await;
    Ok(())
}

async fn channel(
    conn: &Connection,
    what: &'static str,
    name: &str,
) -> Result<Channel, TopologyError> {
    conn.create_channel()
        .await
        .map_err(|e| TopologyError::classify(what, name, e))
}

async fn reuse_or_open(
    conn: &Connection,
    ch: Channel,
    what: &'static str,
    name: &str,
) -> Result<Channel, TopologyError> {
    if ch.status().connected() {
        Ok(ch)
    } else {
        channel(conn, what, name).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_argument_name() {
        let msg = "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'q' in vhost '/': received 'quorum' but current is 'classic'";
        assert_eq!(inequivalent_arg(msg).as_deref(), Some("x-queue-type"));
        assert_eq!(inequivalent_arg("something else"), None);
    }
}
