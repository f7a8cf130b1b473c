//! The broker side: connecting, topology, consuming, and the dead-letter publisher.
//!
//! - [`topology`]: declare (or passively check) the queue, the DLX and the DLQ, with errors
//!   that say how to fix a mismatch.
//! - [`consumer`]: one consumer channel as a task struct with `run()`.
//! - [`dead_letter`]: publishes dead-lettered copies with publisher confirms, through a
//!   deadpool-lapin connection pool separate from the consuming connection.

pub mod consumer;
pub mod dead_letter;
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
