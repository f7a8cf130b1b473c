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

/// The original properties with the `x-sidecar-*` headers added (existing headers kept).
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
    let headers: FieldTable = headers;
    properties.clone().with_headers(headers)
}
