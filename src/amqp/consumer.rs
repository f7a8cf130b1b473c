//! One consumer channel: basic.qos, basic.consume with manual acks, and a task per delivery.
//!
//! The prefetch bounds the deliveries the broker sends before they are settled, so the tasks
//! spawned per delivery are bounded by consumers × prefetch: the broker's flow control is the
//! backpressure, and no queue of our own can grow.

use std::{
    future::Future,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Instant,
};

use futures_util::StreamExt;
use lapin::{
    Channel, Connection,
    message::Delivery,
    options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions},
    types::{FieldTable, ShortString},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// How long to wait for the deliveries still buffered after basic.cancel.
const CANCEL_DRAIN: std::time::Duration = std::time::Duration::from_secs(2);

/// Why a consumer stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsumerExit {
    /// We cancelled it (shutdown or pause).
    Stopped,
    /// The broker cancelled it (queue deleted, or basic.cancel from the server).
    CancelledByBroker,
    /// Its channel or connection failed.
    Failed(String),
    /// Retired by the handler of one of its deliveries ([`Origin::retire`]).
    Retired,
    /// The connection failed because a frame from the broker could not be parsed: most
    /// likely a message the client library cannot decode, which the broker redelivers after
    /// the reconnect.
    Unparsable(String),
}

/// What a consumer does with its deliveries; the dispatcher implements it. Keeping it a
/// trait keeps the broker side (`amqp`) from knowing the per-delivery path.
pub trait Handler: Send + Sync + 'static {
    /// Handles one delivery, which came from `origin`, from start to settlement.
    fn handle(&self, delivery: Delivery, origin: Origin) -> impl Future<Output = ()> + Send + '_;
    /// Hands back, without attempting it, a delivery that was still buffered when the
    /// consumer was cancelled.
    fn release(&self, delivery: Delivery) -> impl Future<Output = ()> + Send + '_;
    /// The broker round trip of a consumer: from the settle of its last delivery (when it
    /// then held none) to its next delivery.
    fn round_trip(&self, d: std::time::Duration);
}

/// The consumer a delivery came from, so its handler can retire it.
#[derive(Clone)]
pub struct Origin {
    channel: Channel,
    tag: ShortString,
    retired: Arc<AtomicBool>,
}

impl Origin {
    /// Cancels the consumer (basic.cancel) and waits for the broker's cancel-ok, at most
    /// 2 s. Its channel stays open, so the delivery can still be settled on
    /// it; the supervisor opens another consumer in its place. At prefetch 1 the consumer
    /// holds nothing but this delivery, so nothing is handed back. Errors (the channel is
    /// gone, or the consumer was already cancelled) are ignored: there is nothing to retire.
    pub async fn retire(&self) {
        if self.retired.swap(true, Ordering::SeqCst) {
            return;
        }
        let cancel = self
            .channel
            .basic_cancel(self.tag.clone(), BasicCancelOptions::default());
        match tokio::time::timeout(CANCEL_DRAIN, cancel).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!(error = %crate::amqp::describe(&e), "retiring a consumer: basic.cancel failed");
            }
            Err(_) => tracing::debug!("retiring a consumer: no cancel-ok in time"),
        }
    }
}

/// A consumer channel and its delivery stream.
pub struct Consumer<H> {
    index: usize,
    channel: Channel,
    stream: lapin::Consumer,
    tag: ShortString,
    queue: String,
    handler: Arc<H>,
    /// Tracks the per-delivery tasks, so shutdown can wait for them.
    tracker: TaskTracker,
    /// Set when a handler retires this subscription ([`Origin::retire`]).
    retired: Arc<AtomicBool>,
    /// Deliveries handed to the handler and not finished, and when the last one finished
    /// if none is left: the round trip to the next delivery starts there.
    outstanding: Arc<Mutex<(usize, Option<Instant>)>>,
}

impl<H: Handler> Consumer<H> {
    /// Opens a channel on `conn`, sets basic.qos `prefetch` (per consumer, `global=false`)
    /// and starts a manual-ack consumer on `queue`.
    ///
    /// # Errors
    /// The lapin error of whichever step failed.
    pub async fn open(
        conn: &Connection,
        index: usize,
        queue: &str,
        prefetch: u16,
        handler: Arc<H>,
        tracker: TaskTracker,
    ) -> Result<Self, lapin::Error> {
        let channel = conn.create_channel().await?;
        channel
            .basic_qos(prefetch, BasicQosOptions { global: false })
            .await?;
        let tag = consumer_tag(index);
        let stream = subscribe(&channel, queue, &tag).await?;
        Ok(Self {
            index,
            channel,
            stream,
            tag,
            queue: queue.to_owned(),
            handler,
            tracker,
            retired: Arc::new(AtomicBool::new(false)),
            outstanding: Arc::new(Mutex::new((0, None))),
        })
    }

    /// basic.consume again on the same channel, after a pause.
    ///
    /// # Errors
    /// The lapin error when the channel is gone or the queue is missing.
    pub async fn resubscribe(&mut self) -> Result<(), lapin::Error> {
        // A tag of its own: an `Origin` of the old subscription (a delivery still being
        // handled) can then never cancel this one.
        let tag = consumer_tag(self.index);
        self.stream = subscribe(&self.channel, &self.queue, &tag).await?;
        self.tag = tag;
        // A new subscription: a handler of the old one can no longer retire it, and the
        // old one's deliveries say nothing of this one's round trips.
        self.retired = Arc::new(AtomicBool::new(false));
        self.outstanding = Arc::new(Mutex::new((0, None)));
        Ok(())
    }

    /// Consumes until `stop` is cancelled (then basic.cancel), the broker cancels the
    /// consumer, or the channel fails. Returns itself, so a paused consumer can resubscribe.
    pub async fn run(mut self, stop: CancellationToken) -> (Self, ConsumerExit) {
        let exit = self.consume(&stop).await;
        (self, exit)
    }

    async fn consume(&mut self, stop: &CancellationToken) -> ConsumerExit {
        loop {
            tokio::select! {
                biased;
                () = stop.cancelled() => {
                    self.cancel().await;
                    return ConsumerExit::Stopped;
                }
                next = self.stream.next() => match next {
                    Some(Ok(delivery)) => {
                        let idle_since = {
                            let mut o = lock(&self.outstanding);
                            o.0 += 1;
                            o.1.take()
                        };
                        if let Some(since) = idle_since {
                            self.handler.round_trip(since.elapsed());
                        }
                        let handler = Arc::clone(&self.handler);
                        let origin = Origin {
                            channel: self.channel.clone(),
                            tag: self.tag.clone(),
                            retired: Arc::clone(&self.retired),
                        };
                        let outstanding = Arc::clone(&self.outstanding);
                        self.tracker.spawn(async move {
                            handler.handle(delivery, origin).await;
                            let mut o = lock(&outstanding);
                            o.0 = o.0.saturating_sub(1);
                            if o.0 == 0 {
                                o.1 = Some(Instant::now());
                            }
                        });
                    }
                    Some(Err(e)) => {
                        let reason = crate::amqp::describe(&e);
                        tracing::warn!(consumer = self.index, error = %reason, "consumer channel failed");
                        if matches!(e.kind(), lapin::ErrorKind::ParsingError(_)) {
                            return ConsumerExit::Unparsable(reason);
                        }
                        return ConsumerExit::Failed(reason);
                    }
                    None => {
                        if self.retired.load(Ordering::SeqCst) {
                            return ConsumerExit::Retired;
                        }
                        if stop.is_cancelled() {
                            return ConsumerExit::Stopped;
                        }
                        tracing::warn!(consumer = self.index, "consumer cancelled by the broker (queue deleted?)");
                        return ConsumerExit::CancelledByBroker;
                    }
                }
            }
        }
    }

    /// basic.cancel, then hands back anything still buffered without attempting it.
    async fn cancel(&mut self) {
        if let Err(e) = self
            .channel
            .basic_cancel(self.tag.clone(), BasicCancelOptions::default())
            .await
        {
            tracing::debug!(consumer = self.index, error = %crate::amqp::describe(&e), "basic.cancel failed");
            return;
        }
        self.hand_back_buffered().await;
    }

    /// After basic.cancel: hands back the deliveries still buffered, unattempted.
    async fn hand_back_buffered(&mut self) {
        let drain = async {
            while let Some(Ok(delivery)) = self.stream.next().await {
                let handler = Arc::clone(&self.handler);
                self.tracker
                    .spawn(async move { handler.release(delivery).await });
            }
        };
        let _ = tokio::time::timeout(CANCEL_DRAIN, drain).await;
    }

    /// Its index (part of its consumer tags).
    #[must_use]
    pub fn index(&self) -> usize {
        self.index
    }

    /// The consumer's channel (to close it once its deliveries are settled).
    #[must_use]
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }
}

/// A consumer tag unique in the process: `amqp-sidecar-<pid>-<index>-<subscription>`.
fn consumer_tag(index: usize) -> ShortString {
    static SUBSCRIPTIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SUBSCRIPTIONS.fetch_add(1, Ordering::Relaxed);
    ShortString::from(format!("amqp-sidecar-{}-{index}-{n}", std::process::id()))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn subscribe(
    channel: &Channel,
    queue: &str,
    tag: &ShortString,
) -> Result<lapin::Consumer, lapin::Error> {
    channel
        .basic_consume(
            ShortString::from(queue),
            tag.clone(),
            BasicConsumeOptions {
                no_ack: false,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
}
