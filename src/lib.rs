//! amqp-sidecar: a RabbitMQ consumer-side sidecar.
//!
//! It consumes one queue with manual acks and a small prefetch, forwards each delivery over
//! HTTP to the local worker backend with the shortest queue (fewest requests in flight,
//! weighted), and settles the delivery by the outcome: ack on success, requeue with backoff
//! on a retryable failure, dead-letter (with confirms) once the attempts are used up or the
//! message is rejected. No path drops a message.
//!
//! # Layout
//! - [`config`]: serde structs, defaults, the figment sources (YAML + env) and `validate()`.
//! - [`sidecar`]: the supervisor task: connect, topology, consumers, reconnect, pause and
//!   resume when no backend is usable, drain.
//! - [`amqp`]: the broker side: connection, topology, the consumer task, the dead-letter
//!   publisher (publisher confirms, deadpool-lapin).
//! - [`dispatch`]: one delivery's path, and the single `match` from outcome to settlement.
//! - [`balance`]: the backend pool (in-flight counts behind a [`balance::Lease`] guard,
//!   passive ejection, health flags) and the [`balance::Balance`] trait with its five
//!   strategies.
//!   [`balance::EjectionClock`] ends ejections on time.
//! - [`backend`]: the HTTP client, the request/header mapping, outcome classification, and
//!   active health checks.
//! - [`tls`]: the rustls client configuration for `https://` backends.
//! - [`retry`]: attempt counting (`x-delivery-count` or a bounded local map) and backoff.
//! - [`admin`]: /metrics, /healthz, /readyz and the readiness state.
//! - [`metrics`]: metric names, units and help text, in one place.
//! - [`shutdown`]: signal handling (graceful first signal, forced second).
//! - [`demo`]: the newcomer's demo: in-process workers, a published batch, a summary.
//!
//! Where to find pausing: the pool publishes how many backends are usable
//! ([`balance::Pool::usable`], changed only through its one update path); the supervisor
//! ([`sidecar`]) cancels the consumers when it reaches 0, probes by TCP, and resumes, with a
//! guard that re-reads the pool; [`dispatch`] hands back deliveries waiting for a backend;
//! [`backend::health`] flips health flags; [`admin`] shows it on /readyz.

#![warn(missing_docs)]

pub mod admin;
pub mod amqp;
pub mod backend;
pub mod balance;
pub mod config;
pub mod demo;
pub mod dispatch;
pub mod metrics;
pub mod retry;
pub mod shutdown;
pub mod sidecar;
pub mod tls;

pub use config::Config;
pub use sidecar::{Sidecar, SidecarError};

/// Exit code for a configuration error (EX_CONFIG from sysexits.h).
pub const EXIT_CONFIG: i32 = 78;
