//! Publishing the sidecar's own copies of a message with publisher confirms: dead-letter
//! copies to the DLX, and delay copies to the delay tiers of `retry.mode: delay_queue`.
//!
//! The original delivery is acked only after the broker confirms the copy
//! (<https://www.rabbitmq.com/docs/confirms#publisher-confirms>). The publish is `mandatory`,
//! so an exchange with no bound queue (or, through the default exchange, a missing delay
//! queue) comes back as a return instead of vanishing. Every failure (no connection,
//! exchange missing, unroutable, nack, confirm timeout) is an error, and the caller then
//! requeues the original: nothing is acked that was not stored elsewhere.
//!
//! Publishing uses its own deadpool-lapin connection pool, so a slow or blocked publish
//! never stalls the consuming connection, and keeps one confirm-mode channel, reopened when
//! it dies (a publish to a missing exchange closes it with NOT_FOUND) or when a confirm is
//! late. Every wait is bounded by `dead_letter.confirm_timeout_ms`, and a resource alarm
//! that blocks the connection is followed (see [`Publisher`]).

use std::{
    num::NonZeroUsize,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use deadpool_lapin::{PoolConfig, Runtime, Timeouts};
use futures_util::StreamExt;
use lapin::{
    BasicProperties, Channel, Confirmation, Event,
    options::{BasicPublishOptions, ConfirmSelectOptions},
    protocol::{AMQPErrorKind, AMQPSoftError},
    types::{LongString, ShortString},
};
use lru::LruCache;
use tokio::{
    sync::{Mutex, watch},
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use crate::{
    amqp::dead_letter::{Failure, with_failure_headers},
    config::Config,
    metrics,
};

/// Why a copy could not be stored. Every variant means the copy is not known to be stored,
/// so the caller requeues the original.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PublishError {
    /// No publishing connection or channel could be had.
    #[error("no publishing channel to the broker: {0}")]
    Unavailable(String),
    /// The exchange does not exist.
    #[error("exchange {0:?} does not exist (declare it, or set amqp.declare: true)")]
    ExchangeMissing(String),
    /// The exchange exists, but no queue is bound for the routing key (for the default
    /// exchange: no queue has that name).
    #[error("{}", unroutable(.exchange, .routing_key))]
    Unroutable {
        /// The exchange.
        exchange: String,
        /// The routing key.
        routing_key: String,
    },
    /// The broker refused to store the message.
    #[error("the broker nacked the dead-letter publish")]
    Nacked,
    /// No confirm within `dead_letter.confirm_timeout_ms`. The copy may still be stored
    /// later; the publisher keeps track of it (see [`Publisher::publish_copy`]).
    #[error("no publisher confirm within {} ms", .0.as_millis())]
    ConfirmTimeout(Duration),
    /// The broker blocks the publishing connection (a resource alarm,
    /// <https://www.rabbitmq.com/docs/connection-blocked>) and did not unblock it within
    /// `dead_letter.confirm_timeout_ms`; nothing was sent.
    #[error("the broker blocks publishing ({0}); nothing sent")]
    Blocked(String),
    /// An earlier copy of this message was sent but its confirm has not come yet; sending
    /// another could store two.
    #[error("an earlier dead-letter copy of this message is still unconfirmed")]
    Unconfirmed,
    /// Shutdown's drain deadline passed first.
    #[error("abandoned by shutdown")]
    Cancelled,
    /// Any other channel error.
    #[error("dead-letter publish failed: {0}")]
    Channel(String),
}

/// Where a copy goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    /// The exchange ("" for the default exchange, which routes by queue name).
    pub exchange: String,
    /// The routing key.
    pub routing_key: String,
}

impl Destination {
    /// Straight to `queue`, through the default exchange.
    #[must_use]
    pub fn queue(queue: &str) -> Self {
        Self {
            exchange: String::new(),
            routing_key: queue.to_owned(),
        }
    }

    /// Mixes the destination into a content key, so that a late copy to one destination
    /// is never taken for a copy to another.
    fn key(&self, content_key: u64) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::hash::DefaultHasher::new();
        content_key.hash(&mut h);
        self.exchange.hash(&mut h);
        self.routing_key.hash(&mut h);
        h.finish()
    }
}

fn unroutable(exchange: &str, routing_key: &str) -> String {
    if exchange.is_empty() {
        format!(
            "no queue named {routing_key:?} (declare it, or set amqp.declare: true so the sidecar declares it)"
        )
    } else {
        format!("exchange {exchange:?} has no queue bound for routing key {routing_key:?}")
    }
}

/// How a copy came to be stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// Published now and confirmed.
    Now,
    /// An earlier copy of the same message, whose confirm came after its caller gave up,
    /// was confirmed; nothing was published again.
    Earlier,
}

/// Where one copy is. The caller and the task that publishes it share it through a watch;
/// the step from `NotSent` is taken under the watch's lock, so the caller's "give up" and
/// the task's "send" cannot both happen.
#[derive(Debug, Clone)]
enum CopyState {
    /// Not handed to the AMQP client yet.
    NotSent,
    /// The caller gave up before it was sent; it never will be.
    Abandoned,
    /// Handed to the AMQP client (on the wire, or queued behind a blocked connection).
    Sent,
    /// Confirmed by the broker.
    Stored,
    /// Not stored.
    Failed(PublishError),
}

/// One copy in flight.
struct Copy {
    state: watch::Sender<CopyState>,
    /// True while its caller has given up and the confirm is still outstanding: counted
    /// in the [`metrics::DEAD_LETTER_UNCONFIRMED`] gauge. Changed only under the state's
    /// watch lock.
    late: AtomicBool,
}

impl Copy {
    /// No longer waited for as late: uncounts it from the unconfirmed gauge if it was
    /// counted. Every decrement goes through here, so the gauge cannot go below 0.
    fn unmark_late(&self) {
        if self.late.swap(false, Ordering::SeqCst) {
            metrics::dead_letter_unconfirmed(-1.0);
        }
    }
}

/// Most copies remembered as sent-but-unconfirmed; the oldest are forgotten beyond this.
const LATE_CAPACITY: usize = 10_000;

/// How long a late copy is remembered (1 h): its original comes back within a backoff, or
/// within the alarm that delayed the confirm.
const LATE_TTL: Duration = Duration::from_secs(3_600);

/// A copy remembered as late, and when.
struct Late {
    copy: Arc<Copy>,
    at: Instant,
}

impl Late {
    fn new(copy: Arc<Copy>) -> Self {
        Self {
            copy,
            at: Instant::now(),
        }
    }
}

/// How long closing the publishing channel may take at shutdown (the connection may be
/// blocked, and then nothing can be written).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// What the publishing tasks share.
struct Inner {
    pool: deadpool_lapin::Pool,
    channel: Mutex<Option<(Channel, u64)>>,
    /// The pool connection whose events are watched.
    watched: std::sync::Mutex<Option<deadpool_lapin::ObjectId>>,
    /// `Some(reason)` while the broker blocks the publishing connection.
    blocked: watch::Sender<Option<String>>,
    /// Copies sent whose caller stopped waiting, by [`content_key`](crate::retry::DeliveryIdentity::content_key).
    late: std::sync::Mutex<LruCache<u64, Late>>,
    /// The cached channel is used only while this matches the epoch it was opened in; a
    /// late confirm or a channel error moves it on.
    channel_epoch: AtomicU64,
    /// Bumped with each new pool connection, so an old connection's event listener cannot
    /// overwrite the new one's blocked state.
    connection_generation: Arc<AtomicU64>,
    /// Where dead-letter copies go.
    dead_letters: Destination,
    queue: String,
    confirm_timeout: Duration,
}

/// Publishes copies with confirms: dead-letters ([`Publisher::dead_letter`]) and delay
/// copies ([`Publisher::publish_copy`]).
///
/// # Bounded, and never two copies from one pod
/// Every broker operation on the way (connection, channel open, publish, confirm) runs in a
/// task of its own; the caller waits for it at most `dead_letter.confirm_timeout_ms`, or
/// until shutdown's drain deadline. A resource alarm blocks the connection
/// (<https://www.rabbitmq.com/docs/connection-blocked>): the AMQP client then writes
/// nothing, so a channel open or a publish would wait for the alarm to clear.
/// - While the connection is known to be blocked, nothing is sent: the caller waits for
///   `connection.unblocked` within its timeout, then gives up ([`PublishError::Blocked`]).
/// - A copy that was sent but not confirmed in time is not forgotten. Its task keeps
///   waiting for the confirm, and the copy is remembered by the message's content. When the
///   requeued original comes back to be dead-lettered again, the outcome of that copy
///   decides: confirmed → the original is acked without a second publish ([`Stored::Earlier`]);
///   still unconfirmed → requeued again ([`PublishError::Unconfirmed`]); failed → a new
///   copy is published.
///
/// Closing the timed-out channel, as one might think, does not prevent the copy: the
/// publish frames are ahead of `channel.close` in the same connection, and the broker
/// processes them in order once it unblocks. If the original is redelivered to another pod,
/// or the sidecar exits while the copy is unconfirmed, a second copy can still be stored:
/// dead-lettering is at-least-once.
pub struct Publisher {
    inner: Arc<Inner>,
}

impl Publisher {
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
        metrics::set_dead_letter_blocked(false);
        Ok(Self {
            inner: Arc::new(Inner {
                pool,
                channel: Mutex::new(None),
                channel_epoch: AtomicU64::new(0),
                connection_generation: Arc::new(AtomicU64::new(0)),
                watched: std::sync::Mutex::new(None),
                blocked: watch::Sender::new(None),
                late: std::sync::Mutex::new(LruCache::new(
                    NonZeroUsize::new(LATE_CAPACITY).unwrap_or(NonZeroUsize::MIN),
                )),
                dead_letters: Destination {
                    exchange: cfg.dead_letter.exchange_for(&queue),
                    routing_key: cfg.dead_letter.routing_key_for(&queue),
                },
                queue,
                confirm_timeout: cfg.dead_letter.confirm_timeout(),
            }),
        })
    }

    /// The DLX name.
    #[must_use]
    pub fn exchange(&self) -> &str {
        &self.inner.dead_letters.exchange
    }

    /// `Some(reason)` while the broker blocks the publishing connection (a resource alarm).
    #[must_use]
    pub fn blocked(&self) -> watch::Receiver<Option<String>> {
        self.inner.blocked.subscribe()
    }

    /// Stores a dead-letter copy of the message (`body`, `properties`) with the
    /// `x-sidecar-*` headers added, in the DLX; see [`Publisher::publish_copy`].
    ///
    /// # Errors
    /// A [`PublishError`]; the caller must then requeue the original.
    pub async fn dead_letter(
        &self,
        key: u64,
        redelivered: bool,
        body: Bytes,
        properties: &BasicProperties,
        failure: &Failure,
        cancel: &CancellationToken,
    ) -> Result<Stored, PublishError> {
        let props = with_failure_headers(properties, failure, &self.inner.queue);
        let to = self.inner.dead_letters.clone();
        self.publish_copy(&to, key, redelivered, body, props, cancel)
            .await
    }

    /// Stores a copy (`body`, `props`) at `to` and waits for the broker's confirm, at most
    /// `dead_letter.confirm_timeout_ms`. `key` identifies the message's content
    /// ([`DeliveryIdentity::content_key`](crate::retry::DeliveryIdentity::content_key)). On a
    /// redelivery (`redelivered`), an earlier copy of the same content to the same
    /// destination, sent within the last hour and confirmed late, counts as stored (see the
    /// type's docs); a first delivery never reuses one, so a new message that happens to
    /// have the same content gets its own copy. `cancel` (shutdown's drain deadline) ends
    /// the wait early.
    ///
    /// # Errors
    /// A [`PublishError`]; the caller must then requeue the original.
    pub async fn publish_copy(
        &self,
        to: &Destination,
        key: u64,
        redelivered: bool,
        body: Bytes,
        props: BasicProperties,
        cancel: &CancellationToken,
    ) -> Result<Stored, PublishError> {
        let key = to.key(key);
        let inner = &self.inner;
        let deadline = Instant::now() + inner.confirm_timeout;
        if let Some(earlier) = inner.late_copy(key).filter(|_| redelivered) {
            let mut state = earlier.state.subscribe();
            let settled = tokio::select! {
                () = cancel.cancelled() => return Err(PublishError::Cancelled),
                r = tokio::time::timeout_at(deadline, state.wait_for(|s| !matches!(s, CopyState::Sent))) => r.is_ok(),
            };
            if !settled {
                return Err(PublishError::Unconfirmed);
            }
            inner.forget_late(key, &earlier);
            if matches!(*earlier.state.borrow(), CopyState::Stored) {
                return Ok(Stored::Earlier);
            }
        }
        // While blocked, send nothing: it would only queue up behind the alarm.
        let mut blocked = inner.blocked.subscribe();
        let unblocked = tokio::select! {
            () = cancel.cancelled() => return Err(PublishError::Cancelled),
            r = tokio::time::timeout_at(deadline, blocked.wait_for(Option::is_none)) => r.is_ok(),
        };
        if !unblocked {
            let reason = blocked.borrow().clone().unwrap_or_default();
            return Err(PublishError::Blocked(reason));
        }
        let copy = Arc::new(Copy {
            state: watch::Sender::new(CopyState::NotSent),
            late: AtomicBool::new(false),
        });
        tokio::spawn(Arc::clone(inner).store(key, Arc::clone(&copy), to.clone(), body, props));
        let mut state = copy.state.subscribe();
        let finished = tokio::select! {
            () = cancel.cancelled() => None,
            r = tokio::time::timeout_at(deadline, state.wait_for(|s| matches!(s, CopyState::Stored | CopyState::Failed(_)))) => r.ok().and_then(|s| s.ok().map(|s| s.clone())),
        };
        match finished {
            Some(CopyState::Stored) => Ok(Stored::Now),
            Some(CopyState::Failed(e)) => Err(e),
            _ => inner.give_up(key, &copy, cancel.is_cancelled()),
        }
    }

    /// Closes the publishing channel and pool. Copies still unconfirmed then fail.
    pub async fn close(&self) {
        let channel = self.inner.channel.lock().await.take();
        if let Some((ch, _)) = channel {
            let _ =
                tokio::time::timeout(CLOSE_TIMEOUT, ch.close(200, ShortString::from("shutdown")))
                    .await;
        }
        self.inner.pool.close();
    }
}

impl Inner {
    /// The late copy of this content, if one was sent within [`LATE_TTL`].
    fn late_copy(&self, key: u64) -> Option<Arc<Copy>> {
        let mut late = lock(&self.late);
        match late.get(&key) {
            Some(l) if l.at.elapsed() < LATE_TTL => Some(Arc::clone(&l.copy)),
            Some(_) => {
                if let Some(old) = late.pop(&key) {
                    old.copy.unmark_late();
                }
                None
            }
            None => None,
        }
    }

    /// Removes `copy` from the late copies, if it is still the one under `key`.
    fn forget_late(&self, key: u64, copy: &Arc<Copy>) {
        let mut late = lock(&self.late);
        if late.peek(&key).is_some_and(|l| Arc::ptr_eq(&l.copy, copy)) {
            late.pop(&key);
            copy.unmark_late();
        }
    }

    /// The caller stops waiting for `copy`. Not sent yet: it never will be. Sent: it is
    /// remembered as late, and the channel is retired so later copies go on a fresh one.
    /// Stored or failed just now: that is the answer. Every step reads and writes the copy's
    /// state under its watch lock, so it cannot interleave with [`Inner::store`].
    fn give_up(&self, key: u64, copy: &Arc<Copy>, cancelled: bool) -> Result<Stored, PublishError> {
        let mut seen = None;
        copy.state.send_if_modified(|s| {
            seen = Some(match s {
                CopyState::NotSent => {
                    *s = CopyState::Abandoned;
                    return true;
                }
                CopyState::Sent => {
                    // Counted under the lock; `store` uncounts under it too.
                    if !copy.late.swap(true, Ordering::SeqCst) {
                        metrics::dead_letter_unconfirmed(1.0);
                    }
                    Ok(false)
                }
                CopyState::Stored => Ok(true),
                CopyState::Failed(e) => Err(e.clone()),
                CopyState::Abandoned => Ok(false),
            });
            false
        });
        let sent = match seen {
            Some(Ok(true)) => return Ok(Stored::Now),
            Some(Err(e)) => return Err(e),
            Some(Ok(false)) => copy.late.load(Ordering::SeqCst),
            None => false,
        };
        if sent {
            let mut late = lock(&self.late);
            if let Some((_, evicted)) = late.push(key, Late::new(Arc::clone(copy)))
                && !Arc::ptr_eq(&evicted.copy, copy)
            {
                evicted.copy.unmark_late();
            }
            drop(late);
            self.retire_channel();
        }
        Err(match self.blocked.borrow().clone() {
            _ if cancelled => PublishError::Cancelled,
            Some(reason) if !sent => PublishError::Blocked(reason),
            _ => PublishError::ConfirmTimeout(self.confirm_timeout),
        })
    }

    /// Later copies use a fresh channel; the retired one closes when its last pending
    /// confirm is in (lapin closes a channel when its last handle drops).
    fn retire_channel(&self) {
        self.channel_epoch.fetch_add(1, Ordering::SeqCst);
    }

    /// The task behind one copy: get a channel, send unless the caller gave up, await the
    /// confirm however long it takes (the connection's life bounds it).
    async fn store(
        self: Arc<Self>,
        key: u64,
        copy: Arc<Copy>,
        to: Destination,
        body: Bytes,
        props: BasicProperties,
    ) {
        let result = self.send_and_confirm(&copy, &to, &body, props).await;
        // A copy abandoned before it was sent failed on purpose; the channel is fine.
        let channel_failed = matches!(&result, Err(e) if !matches!(e, PublishError::Cancelled));
        let failed = result.is_err();
        copy.state.send_modify(|s| {
            if !matches!(s, CopyState::Abandoned) {
                *s = match result {
                    Ok(()) => CopyState::Stored,
                    Err(e) => CopyState::Failed(e),
                };
            }
            // Under the same lock as `give_up`'s count: no longer unconfirmed. A confirmed
            // copy stays in `late`, so the original's next delivery finds it.
            copy.unmark_late();
        });
        if channel_failed {
            self.retire_channel();
        }
        if failed {
            // A failed late copy is nothing to remember: the next attempt publishes anew.
            self.forget_late(key, &copy);
        }
    }

    async fn send_and_confirm(
        &self,
        copy: &Copy,
        to: &Destination,
        body: &[u8],
        props: BasicProperties,
    ) -> Result<(), PublishError> {
        let ch = tokio::time::timeout(self.confirm_timeout, self.channel())
            .await
            .map_err(|_| {
                PublishError::Unavailable(format!(
                    "no channel within {} ms",
                    self.confirm_timeout.as_millis()
                ))
            })??;
        let sent = copy.state.send_if_modified(|s| {
            if matches!(s, CopyState::NotSent) {
                *s = CopyState::Sent;
                true
            } else {
                false
            }
        });
        if !sent {
            return Err(PublishError::Cancelled);
        }
        let confirm = ch
            .basic_publish(
                ShortString::from(to.exchange.as_str()),
                ShortString::from(to.routing_key.as_str()),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body,
                props,
            )
            .await
            .map_err(|e| classify(to, &e))?;
        match confirm.await.map_err(|e| classify(to, &e))? {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(_)) => Err(PublishError::Unroutable {
                exchange: to.exchange.clone(),
                routing_key: to.routing_key.clone(),
            }),
            Confirmation::Nack(_) => Err(PublishError::Nacked),
            Confirmation::NotRequested => Err(PublishError::Channel(
                "publisher confirms are not enabled".into(),
            )),
        }
    }

    async fn channel(&self) -> Result<Channel, PublishError> {
        let mut cached = self.channel.lock().await;
        let epoch = self.channel_epoch.load(Ordering::SeqCst);
        if let Some((ch, _)) = cached
            .as_ref()
            .filter(|(c, e)| *e == epoch && c.status().connected())
        {
            return Ok(ch.clone());
        }
        *cached = None;
        let conn = self
            .pool
            .get()
            .await
            .map_err(|e| PublishError::Unavailable(e.to_string()))?;
        self.watch_blocking(&conn);
        let ch = conn
            .create_channel()
            .await
            .map_err(|e| PublishError::Unavailable(super::describe(&e)))?;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| PublishError::Unavailable(super::describe(&e)))?;
        *cached = Some((ch.clone(), epoch));
        Ok(ch)
    }

    /// Follows `connection.blocked` / `connection.unblocked` on a new pool connection
    /// (lapin advertises the capability; RabbitMQ sends them around resource alarms).
    fn watch_blocking(&self, conn: &deadpool_lapin::Object) {
        let id = deadpool_lapin::Object::id(conn);
        {
            let mut watched = lock(&self.watched);
            if *watched == Some(id) {
                return;
            }
            *watched = Some(id);
        }
        let generation = self.connection_generation.fetch_add(1, Ordering::SeqCst) + 1;
        let current = Arc::clone(&self.connection_generation);
        let blocked = self.blocked.clone();
        // Only the newest connection's listener speaks for the blocked state.
        let set = move |reason: Option<String>| {
            if current.load(Ordering::SeqCst) == generation {
                metrics::set_dead_letter_blocked(reason.is_some());
                blocked.send_replace(reason);
            }
        };
        set(conn.status().blocked().then(String::new));
        let mut events = Box::pin(conn.events_listener());
        tokio::spawn(async move {
            while let Some(event) = events.next().await {
                match event {
                    Event::ConnectionBlocked(reason) => {
                        tracing::warn!(%reason, "the broker blocks the dead-letter connection (resource alarm); dead-letters wait");
                        set(Some(reason));
                    }
                    Event::ConnectionUnblocked => {
                        tracing::info!("the broker unblocked the dead-letter connection");
                        set(None);
                    }
                    // A failed connection is blocked no more: its successor starts
                    // unblocked, and a dead-letter must get to open it.
                    Event::Error(_) | Event::Connected => set(None),
                    _ => {}
                }
            }
            set(None);
        });
    }
}

fn classify(to: &Destination, e: &lapin::Error) -> PublishError {
    if let lapin::ErrorKind::ProtocolError(amqp) = e.kind()
        && matches!(amqp.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND))
    {
        return PublishError::ExchangeMissing(to.exchange.clone());
    }
    PublishError::Channel(super::describe(e))
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
