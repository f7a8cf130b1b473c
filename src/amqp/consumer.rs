//! One consumer channel: basic.qos, basic.consume with manual acks, and a task per delivery.
//!
//! The prefetch bounds the deliveries the broker sends before they are settled, so the tasks
//! spawned per delivery are bounded by consumers × prefetch: the broker's flow control is the
//! backpressure, and no queue of our own can grow.

use std::{future::Future, sync::Arc};

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
    /// The connection failed because a frame from the broker could not be parsed: most
    /// likely a message the client library cannot decode, which the broker redelivers after
    /// the reconnect.
    Unparsable(String),
}

/// What a consumer does with its deliveries; the dispatcher implements it. Keeping it a
/// trait keeps the broker side (`amqp`) from knowing the per-delivery path.
pub trait Handler: Send + Sync + 'static {
    /// Handles one delivery from start to settlement.
    fn handle(&self, delivery: Delivery) -> impl Future<Output = ()> + Send + '_;
    /// Hands back, without attempting it, a delivery that was still buffered when the
    /// consumer was cancelled.
    fn release(&self, delivery: Delivery) -> impl Future<Output = ()> + Send + '_;
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
        let tag = ShortString::from(format!("amqp-sidecar-{}-{index}", std::process::id()));
        let stream = subscribe(&channel, queue, &tag).await?;
        Ok(Self {
            index,
            channel,
            stream,
            tag,
            queue: queue.to_owned(),
            handler,
            tracker,
        })
    }

    /// basic.consume again on the same channel, after a pause.
    ///
    /// # Errors
    /// The lapin error when the channel is gone or the queue is missing.
    pub async fn resubscribe(&mut self) -> Result<(), lapin::Error> {
        self.stream = subscribe(&self.channel, &self.queue, &self.tag).await?;
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
                        let handler = Arc::clone(&self.handler);
                        self.tracker.spawn(async move { handler.handle(delivery).await });
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
        let drain = async {
            while let Some(Ok(delivery)) = self.stream.next().await {
                let handler = Arc::clone(&self.handler);
                self.tracker
                    .spawn(async move { handler.release(delivery).await });
            }
        };
        let _ = tokio::time::timeout(CANCEL_DRAIN, drain).await;
    }

    /// Its index (part of its consumer tag).
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
