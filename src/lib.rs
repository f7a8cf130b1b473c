//! amqp-sidecar: a RabbitMQ consumer-side sidecar.
//!
//! It consumes one queue with manual acks and a small prefetch, forwards each delivery over
//! HTTP to the local worker backend with the shortest queue (fewest requests in flight,
//! weighted), and settles the delivery by the outcome: ack on success, requeue with backoff
//! on a retryable failure, dead-letter (with confirms) once the attempts are used up or the
//! message is rejected. No path drops a message.
//!
//! # Layout
//! - [`config`]: serde structs and defaults (`config`), the figment sources, YAML + env
//!   (`config::load`), and `validate()` (`config::validate`).
//! - [`sidecar`]: the supervisor task: connect, topology, consumers, reconnect, drain; its
//!   `consumers` submodule opens and cancels consumers to follow [`capacity`], its `pause`
//!   submodule waits while no backend is usable.
//! - [`amqp`]: the broker side: connection, topology, the consumer task (which hands each
//!   delivery to a [`amqp::consumer::Handler`]), the publisher of dead-letter and delay
//!   copies (publisher confirms, deadpool-lapin, resource alarms), the delay tiers.
//! - [`dispatch`]: one delivery's path; [`dispatch::decide`] is the single `match` from
//!   [`dispatch::Outcome`] to [`dispatch::Settlement`], a pure function.
//! - [`balance`]: the backend pool (in-flight counts behind a [`balance::Lease`] guard,
//!   passive ejection, health flags, unreachable backends, learned concurrency limits from
//!   [`balance::limit`]) and the [`balance::Balance`] trait with its five strategies.
//!   [`balance::EjectionClock`] ends ejections on time.
//! - [`backend`]: the HTTP client, the request/header mapping, outcome classification
//!   (attempted or not delivered), active health checks, the prober of unreachable
//!   backends, and [`backend::upstreams::Upstreams`], which builds them all from config.
//! - [`tls`]: the rustls client configuration for `https://` backends.
//! - [`trace`]: W3C Trace Context, continued from a delivery's `traceparent` into the
//!   request to the worker.
//! - [`memory`]: the memory budget for message bodies (config or cgroup limit).
//! - [`capacity`]: how many consumers are open and why (the backend slots plus the
//!   lookahead, sized by [`capacity::LookaheadController`]), and the retry waiting room; the
//!   supervisor follows its target.
//! - [`retry`]: attempt counting (`x-delivery-count` or a bounded local map) and the one
//!   backoff type (full jitter for retries, equal jitter for reconnects).
//! - [`admin`]: /metrics, /healthz, /readyz and the readiness state.
//! - [`metrics`]: the one table of metric names, kinds, units, labels and help; the
//!   Prometheus text parser the demo, tests and bench share.
//! - [`shutdown`]: signal handling (graceful first signal, forced second).
//! - [`demo`]: the newcomer's demo: in-process workers, a published batch, a worker restart,
//!   a summary.
//!
//! Where to find pausing: the pool publishes how many backends are usable
//! ([`balance::Pool::usable`], changed only through its one update path: health flips,
//! ejections, [`balance::Pool::mark_unreachable`] and [`balance::Pool::reached`]); the
//! supervisor ([`sidecar`]) cancels the consumers when it reaches 0 and resumes when it
//! rises, with a guard that re-reads the pool; [`dispatch`] marks a backend unreachable on a
//! request that was not delivered and hands back deliveries waiting for a backend;
//! [`backend::probe`] probes unreachable backends, [`backend::health`] runs the health
//! checks; [`admin`] shows it on /readyz (`unusable_backends`).

#![warn(missing_docs)]

pub mod admin;
pub mod amqp;
pub mod backend;
pub mod balance;
pub mod capacity;
pub mod config;
pub mod demo;
pub mod dispatch;
pub mod memory;
pub mod metrics;
pub mod retry;
pub mod shutdown;
pub mod sidecar;
pub mod tls;
pub mod trace;

pub use config::Config;
pub use sidecar::{Sidecar, SidecarError};

/// Exit code for a configuration error (EX_CONFIG from sysexits.h).
pub const EXIT_CONFIG: i32 = 78;
