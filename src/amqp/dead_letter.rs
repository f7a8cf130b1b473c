//! The dead-letter copy: why a message goes to the DLX, and the properties of its copy
//! (the original's, less what would lose or refuse it, plus the `x-sidecar-*` headers).
//! [`copy_properties`] is shared with the delay copies of [`crate::amqp::delay`].

use std::time::SystemTime;

use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable, LongString, ShortString},
};

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
#[derive(Debug, Clone, PartialEq, Eq)]
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

/// The original properties with the `x-sidecar-*` headers added (existing headers kept),
/// less `expiration` and `user_id` (see [`copy_properties`]). `priority` is kept: a queue
/// without `x-max-priority` ignores it, and a priority DLQ uses it.
#[must_use]
pub fn with_failure_headers(
    properties: &BasicProperties,
    f: &Failure,
    queue: &str,
) -> BasicProperties {
    copy_properties(properties, |put| {
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
    })
}

/// The properties of a copy the sidecar publishes (a dead-letter or a delay copy): the
/// original's, headers kept and `add`'s headers put over them, less the properties that
/// would lose or refuse the copy:
/// - `expiration`: a per-message TTL would expire the copy in the queue it goes to, as it
///   would have expired the original. RabbitMQ's own dead-lettering removes it for this
///   reason (<https://www.rabbitmq.com/docs/dlx#effects>); the original value goes into
///   `x-sidecar-original-expiration`.
/// - `user_id`: RabbitMQ refuses a publish whose `user_id` is not the publishing
///   connection's user (<https://www.rabbitmq.com/docs/validated-user-id>), so a message
///   published by another user could never be copied; the original value goes into
///   `x-sidecar-original-user-id`.
pub fn copy_properties(
    properties: &BasicProperties,
    add: impl FnOnce(&mut dyn FnMut(&str, AMQPValue)),
) -> BasicProperties {
    let mut headers = properties.headers().clone().unwrap_or_default();
    let mut put = |k: &str, v: AMQPValue| {
        headers.insert(ShortString::from(k), v);
    };
    add(&mut put);
    let s = |v: &str| AMQPValue::LongString(LongString::from(v.to_owned()));
    if let Some(ttl) = properties.expiration() {
        put("x-sidecar-original-expiration", s(ttl.as_str()));
    }
    if let Some(user) = properties.user_id() {
        put("x-sidecar-original-user-id", s(user.as_str()));
    }
    let headers: FieldTable = headers;
    // Field by field, because BasicProperties has no way to unset one.
    let mut copy = BasicProperties::default();
    macro_rules! keep {
        ($($get:ident => $with:ident),* $(,)?) => {$(
            if let Some(v) = properties.$get() {
                copy = copy.$with(Clone::clone(v));
            }
        )*};
    }
    keep!(
        content_type => with_content_type,
        content_encoding => with_content_encoding,
        delivery_mode => with_delivery_mode,
        priority => with_priority,
        correlation_id => with_correlation_id,
        reply_to => with_reply_to,
        message_id => with_message_id,
        timestamp => with_timestamp,
        kind => with_type,
        app_id => with_app_id,
        cluster_id => with_cluster_id,
    );
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
