//! The broker side: connecting, topology, consuming, and publishing copies.
//!
//! - [`topology`]: declare (or passively check) the queue, the DLX, the DLQ and the delay
//!   tiers, with errors that say how to fix a mismatch.
//! - [`consumer`]: one consumer channel as a task struct with `run()`.
//! - [`publisher`]: publishes the sidecar's copies of a message with publisher confirms,
//!   through a deadpool-lapin connection pool separate from the consuming connection.
//! - [`dead_letter`]: what a dead-letter copy says (`x-sidecar-*` headers).
//! - [`delay`]: the delay tiers of `retry.mode: delay_queue`, and the attempt count their
//!   copies carry.

pub mod consumer;
pub mod dead_letter;
pub mod delay;
pub mod publisher;
pub mod topology;

use lapin::{Connection, ConnectionProperties, types::LongString};

use crate::config::redact_url;

/// Opens the consuming connection.
///
/// # Errors
/// The lapin error (refused, TLS, authentication, ...). Its text never holds the password;
/// callers log the URL through [`redact_url`].
pub async fn connect(url: &str, name: &str) -> Result<Connection, lapin::Error> {
    let props =
        ConnectionProperties::default().with_connection_name(LongString::from(name.to_owned()));
    let conn = Connection::connect(url, props).await?;
    tracing::info!(url = %redact_url(url), "connected to the broker");
    Ok(conn)
}

/// Describes a lapin error for a log line or an HTTP body.
#[must_use]
pub fn describe(e: &lapin::Error) -> String {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => {
            format!("{} {}", amqp.get_id(), amqp.get_message())
        }
        _ => e.to_string(),
    }
}
