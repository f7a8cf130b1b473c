//! Publishing dead-lettered copies to the dead-letter exchange, with publisher confirms.
//!
//! The original delivery is acked only after the broker confirms the copy
//! (<https://www.rabbitmq.com/docs/confirms#publisher-confirms>). The publish is `mandatory`,
//! so a DLX with no bound queue comes back as a return instead of vanishing. Every failure
//! (no connection, DLX missing, unroutable, nack, confirm timeout) is an error, and the
//! caller then requeues the original: nothing is acked that was not stored elsewhere.
//!
//! Publishing uses its own deadpool-lapin connection pool, so a slow or blocked publish
//! never stalls the consuming connection, and keeps one confirm-mode channel, reopened when
//! it dies (a publish to a missing exchange closes it with NOT_FOUND).

use std::time::{Duration, SystemTime};

use deadpool_lapin::{PoolConfig, Runtime, Timeouts};
use lapin::{
    BasicProperties, Channel, Confirmation,
    options::{BasicPublishOptions, ConfirmSelectOptions},
    protocol::{AMQPErrorKind, AMQPSoftError},
    types::{AMQPValue, FieldTable, LongString, ShortString},
};
use tokio::sync::Mutex;

use crate::config::Config;

/// Why a message goes to the DLX; the value of `x-sidecar-reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Every attempt failed with a retryable error.
    RetriesExhausted,
    /// The backend answered with a non-retryable 4xx.
    Rejected,
    /// The body is larger than `backend.max_body_bytes`.
    TooLarge,
}

impl Reason {
    /// The header and metric label value.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RetriesExhausted => "retries_exhausted",
            Self::Rejected => "rejected",
            Self::TooLarge => "too_large",
        }
    }
}

/// What the `x-sidecar-*` headers say about the failure.
#[derive(Debug, Clone)]
pub struct Failure {
    /// `x-sidecar-reason`.
    pub reason: Reason,
    /// `x-sidecar-attempts`.
    pub attempts: u32,
    /// `x-sidecar-last-status`: the HTTP status, 0 when there was no response.
    pub last_status: u16,
    /// `x-sidecar-last-error`.
    pub last_error: String,
    /// `x-sidecar-backend`: the last backend's label ("" when none was tried).
    pub backend: String,
}

/// Why a dead-letter publish failed.
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    /// No publishing connection or channel could be had.
    #[error("no publishing channel to the broker: {0}")]
    Unavailable(String),
    /// The exchange does not exist.
    #[error("dead-letter exchange {0:?} does not exist (declare it, or set amqp.declare: true)")]
    ExchangeMissing(String),
    /// The exchange exists, but no queue is bound for the routing key.
    #[error("dead-letter exchange {exchange:?} has no queue bound for routing key {routing_key:?}")]
    Unroutable {
        /// The exchange.
        exchange: String,
        /// The routing key.
        routing_key: String,
    },
    /// The broker refused to store the message.
    #[error("the broker nacked the dead-letter publish")]
    Nacked,
    /// No confirm within `dead_letter.confirm_timeout_ms`.
    #[error("no publisher confirm within {} ms", .0.as_millis())]
    ConfirmTimeout(Duration),
    /// Any other channel error.
    #[error("dead-letter publish failed: {0}")]
    Channel(String),
}

/// Publishes dead-letter copies.
pub struct DeadLetterPublisher {
    pool: deadpool_lapin::Pool,
    channel: Mutex<Option<Channel>>,
    exchange: String,
    routing_key: String,
    queue: String,
    confirm_timeout: Duration,
}

impl DeadLetterPublisher {
    /// A publisher for `cfg`. Connects lazily, on the first dead-letter.
    ///
    /// # Errors
    /// When the pool cannot be built (a runtime problem, not a broker one).
    pub fn new(cfg: &Config) -> Result<Self, deadpool_lapin::CreatePoolError> {
        let timeout = Some(cfg.dead_letter.confirm_timeout());
        let pool = deadpool_lapin::Config {
            url: Some(cfg.amqp.url.clone()),
            pool: Some(PoolConfig {
                max_size: 1,
                timeouts: Timeouts {
                    wait: timeout,
                    create: timeout,
                    recycle: timeout,
                },
                ..PoolConfig::default()
            }),
        }
        .create_pool(
            || {
                lapin::ConnectionProperties::default()
                    .with_connection_name(LongString::from("amqp-sidecar dead-letter"))
            },
            Runtime::Tokio1,
        )?;
        let queue = cfg.amqp.queue.clone();
        Ok(Self {
            pool,
            channel: Mutex::new(None),
            exchange: cfg.dead_letter.exchange_for(&queue),
            routing_key: cfg.dead_letter.routing_key_for(&queue),
            queue,
            confirm_timeout: cfg.dead_letter.confirm_timeout(),
        })
    }

    /// The DLX name.
    #[must_use]
    pub fn exchange(&self) -> &str {
        &self.exchange
    }

    async fn channel(&self) -> Result<Channel, DeadLetterError> {
        let mut cached = self.channel.lock().await;
        if let Some(ch) = cached.as_ref().filter(|c| c.status().connected()) {
            return Ok(ch.clone());
        }
        *cached = None;
        let conn = self
            .pool
            .get()
            .await
            .map_err(|e| DeadLetterError::Unavailable(e.to_string()))?;
        let ch = conn
            .create_channel()
            .await
            .map_err(|e| DeadLetterError::Unavailable(super::describe(&e)))?;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| DeadLetterError::Unavailable(super::describe(&e)))?;
        *cached = Some(ch.clone());
        Ok(ch)
    }

    async fn forget_channel(&self) {
        *self.channel.lock().await = None;
    }

    /// Publishes a copy of the message (`body`, `properties`) with the `x-sidecar-*` headers
    /// added, and waits for the broker's confirm.
    ///
    /// # Errors
    /// A [`DeadLetterError`]; the caller must then requeue the original.
    pub async fn publish(
        &self,
        body: &[u8],
        properties: &BasicProperties,
        failure: &Failure,
    ) -> Result<(), DeadLetterError> {
        let props = with_failure_headers(properties, failure, &self.queue);
        let result = self.publish_once(body, props).await;
        if result.is_err() {
            self.forget_channel().await;
        }
        result
    }

    async fn publish_once(
        &self,
        body: &[u8],
        props: BasicProperties,
    ) -> Result<(), DeadLetterError> {
        let ch = self.channel().await?;
        let exchange = self.exchange.clone();
        let work = async {
            let confirm = ch
                .basic_publish(
                    ShortString::from(self.exchange.as_str()),
                    ShortString::from(self.routing_key.as_str()),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    body,
                    props,
                )
                .await
                .map_err(|e| self.classify(&e))?;
            // lapin #409: a publish can hang when the server closes the connection, so the
            // whole exchange runs under the confirm timeout.
            match confirm.await.map_err(|e| self.classify(&e))? {
                Confirmation::Ack(None) => Ok(()),
                Confirmation::Ack(Some(_)) => Err(DeadLetterError::Unroutable {
                    exchange: exchange.clone(),
                    routing_key: self.routing_key.clone(),
                }),
                Confirmation::Nack(_) => Err(DeadLetterError::Nacked),
                Confirmation::NotRequested => Err(DeadLetterError::Channel(
                    "publisher confirms are not enabled".into(),
                )),
            }
        };
        match tokio::time::timeout(self.confirm_timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(DeadLetterError::ConfirmTimeout(self.confirm_timeout)),
        }
    }

    fn classify(&self, e: &lapin::Error) -> DeadLetterError {
        if let lapin::ErrorKind::ProtocolError(amqp) = e.kind()
            && matches!(amqp.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND))
        {
            return DeadLetterError::ExchangeMissing(self.exchange.clone());
        }
        DeadLetterError::Channel(super::describe(e))
    }

    /// Closes the publishing channel and pool.
    pub async fn close(&self) {
        if let Some(ch) = self.channel.lock().await.take() {
            let _ = ch.close(200, ShortString::from("shutdown")).await;
        }
        self.pool.close();
    }
}

/// The original properties with the `x-sidecar-*` headers added (existing headers kept),
/// less the properties that would lose or refuse the copy:
/// - `expiration`: a per-message TTL would expire the copy in the dead-letter queue, as it
///   would have expired the original. RabbitMQ's own dead-lettering removes it for this
///   reason (<https://www.rabbitmq.com/docs/dlx#effects>); the original value goes into
///   `x-sidecar-original-expiration`.
/// - `user_id`: RabbitMQ refuses a publish whose `user_id` is not the publishing
///   connection's user (<https://www.rabbitmq.com/docs/validated-user-id>), so a message
///   published by another user could never be dead-lettered; the original value goes into
///   `x-sidecar-original-user-id`.
///
/// `priority` is kept: a queue without `x-max-priority` ignores it, and a priority DLQ
/// uses it.
#[must_use]
pub fn with_failure_headers(
    properties: &BasicProperties,
    f: &Failure,
    queue: &str,
) -> BasicProperties {
    let mut headers = properties.headers().clone().unwrap_or_default();
    let mut put = |k: &str, v: AMQPValue| {
        headers.insert(ShortString::from(k), v);
    };
    let s = |v: &str| AMQPValue::LongString(LongString::from(v.to_owned()));
    put("x-sidecar-reason", s(f.reason.as_str()));
    put(
        "x-sidecar-attempts",
        AMQPValue::LongLongInt(i64::from(f.attempts)),
    );
    put(
        "x-sidecar-last-status",
        AMQPValue::LongLongInt(i64::from(f.last_status)),
    );
    put("x-sidecar-last-error", s(&f.last_error));
    put("x-sidecar-backend", s(&f.backend));
    put("x-sidecar-queue", s(queue));
    put(
        "x-sidecar-failed-at",
        s(&humantime::format_rfc3339_millis(SystemTime::now()).to_string()),
    );
    if let Some(ttl) = properties.expiration() {
        put("x-sidecar-original-expiration", s(ttl.as_str()));
    }
    if let Some(user) = properties.user_id() {
        put("x-sidecar-original-user-id", s(user.as_str()));
    }
    let headers: FieldTable = headers;
    let mut copy = BasicProperties::default();
    if let Some(v) = properties.content_type() {
        copy = copy.with_content_type(v.clone());
    }
    if let Some(v) = properties.content_encoding() {
        copy = copy.with_content_encoding(v.clone());
    }
    if let Some(v) = properties.delivery_mode() {
        copy = copy.with_delivery_mode(*v);
    }
    if let Some(v) = properties.priority() {
        copy = copy.with_priority(*v);
    }
    if let Some(v) = properties.correlation_id() {
        copy = copy.with_correlation_id(v.clone());
    }
    if let Some(v) = properties.reply_to() {
        copy = copy.with_reply_to(v.clone());
    }
    if let Some(v) = properties.message_id() {
        copy = copy.with_message_id(v.clone());
    }
    if let Some(v) = properties.timestamp() {
        copy = copy.with_timestamp(*v);
    }
    if let Some(v) = properties.kind() {
        copy = copy.with_type(v.clone());
    }
    if let Some(v) = properties.app_id() {
        copy = copy.with_app_id(v.clone());
    }
    if let Some(v) = properties.cluster_id() {
        copy = copy.with_cluster_id(v.clone());
    }
    copy.with_headers(headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_copy_keeps_everything_but_expiration_and_user_id() {
        let original = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_content_encoding("gzip".into())
            .with_delivery_mode(2)
            .with_priority(7)
            .with_correlation_id("c-1".into())
            .with_reply_to("replies".into())
            .with_expiration("4000".into())
            .with_message_id("m-1".into())
            .with_timestamp(1_700_000_000)
            .with_type("order.created".into())
            .with_user_id("publisher".into())
            .with_app_id("shop".into())
            .with_cluster_id("c".into());
        let failure = Failure {
            reason: Reason::Rejected,
            attempts: 1,
            last_status: 422,
            last_error: "HTTP 422".into(),
            backend: "b".into(),
        };
        let copy = with_failure_headers(&original, &failure, "orders");
        assert_eq!(
            copy.expiration(),
            &None,
            "the copy must not expire in the DLQ"
        );
        assert_eq!(copy.user_id(), &None, "the DLX publish must not be refused");
        let h = copy.headers().clone().expect("headers");
        let text = |k: &str| match h.inner().get(&ShortString::from(k)) {
            Some(AMQPValue::LongString(s)) => s.to_string(),
            other => panic!("{k}: {other:?}"),
        };
        assert_eq!(text("x-sidecar-original-expiration"), "4000");
        assert_eq!(text("x-sidecar-original-user-id"), "publisher");
        assert_eq!(text("x-sidecar-reason"), "rejected");
        // Everything else is the original's.
        let restored = copy
            .clone()
            .with_expiration("4000".into())
            .with_user_id("publisher".into())
            .with_headers(original.headers().clone().unwrap_or_default());
        assert_eq!(
            format!("{restored:?}"),
            format!("{:?}", original.with_headers(FieldTable::default()))
        );
    }
}
