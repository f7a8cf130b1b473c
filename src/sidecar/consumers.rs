//! The consumers of one connection, grown and shrunk to follow [`Capacity::target`]
//! (`crate::capacity` says how many and why; this module only carries it out).
//!
//! Growing resubscribes an idle channel (one basic.consume) before it opens a new one
//! (channel.open, basic.qos, basic.consume). Shrinking cancels the newest consumer
//! (basic.cancel) and keeps its channel open: deliveries still in flight on it are settled
//! there, since a delivery tag belongs to its channel. A consumer retired by a handler
//! ([`crate::amqp::consumer::Origin::retire`]) is replaced the same way.

use std::{collections::HashMap, sync::Arc};

use lapin::{Channel, Connection};
use tokio::task::JoinSet;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    amqp::{
        self,
        consumer::{Consumer, ConsumerExit},
    },
    capacity::Target,
    dispatch::Dispatcher,
};

/// What a consumer task hands back: its index, the consumer, and why it stopped.
type Stopped = (usize, Consumer<Dispatcher>, ConsumerExit);

/// The consumers of one connection: running ones (each with its own stop token) and idle
/// ones (cancelled, channel kept).
pub(super) struct ConsumerSet<'a> {
    conn: &'a Connection,
    queue: &'a str,
    prefetch: u16,
    dispatcher: &'a Arc<Dispatcher>,
    tracker: &'a TaskTracker,
    running: JoinSet<Stopped>,
    /// Stop tokens of the running consumers, by index; the newest has the highest index.
    stops: HashMap<usize, CancellationToken>,
    idle: Vec<Consumer<Dispatcher>>,
    /// Every channel opened, for the drain.
    channels: Vec<Channel>,
    next_index: usize,
}

impl<'a> ConsumerSet<'a> {
    pub(super) fn new(
        conn: &'a Connection,
        queue: &'a str,
        prefetch: u16,
        dispatcher: &'a Arc<Dispatcher>,
        tracker: &'a TaskTracker,
    ) -> Self {
        Self {
            conn,
            queue,
            prefetch,
            dispatcher,
            tracker,
            running: JoinSet::new(),
            stops: HashMap::new(),
            idle: Vec::new(),
            channels: Vec::new(),
            next_index: 0,
        }
    }

    /// Consumers subscribed now.
    pub(super) fn running(&self) -> usize {
        self.stops.len()
    }

    /// Every channel opened on this connection.
    pub(super) fn channels(&self) -> Vec<Channel> {
        self.channels.clone()
    }

    /// Opens consumers up to what `target` admits ([`Target::admitted`]), and cancels the
    /// newest ones beyond its total. The memory cap never cancels a consumer: one that
    /// is idle could be racing a delivery, which would then be handed back; consumers past
    /// the budget are retired by their own deliveries instead (see `crate::capacity`).
    ///
    /// # Errors
    /// Why a consumer could not be opened or resubscribed (the session is lost).
    pub(super) async fn resize(
        &mut self,
        target: &Target,
        shutdown: &CancellationToken,
    ) -> Result<(), String> {
        let (grow_to, shrink_to) = (target.admitted() as usize, target.total() as usize);
        while self.running() < grow_to {
            let consumer = match self.idle.pop() {
                Some(mut c) => {
                    c.resubscribe().await.map_err(|e| {
                        format!(
                            "resubscribing consumer {}: {}",
                            c.index(),
                            amqp::describe(&e)
                        )
                    })?;
                    c
                }
                None => {
                    let index = self.next_index;
                    self.next_index += 1;
                    let c = Consumer::open(
                        self.conn,
                        index,
                        self.queue,
                        self.prefetch,
                        Arc::clone(self.dispatcher),
                        self.tracker.clone(),
                    )
                    .await
                    .map_err(|e| format!("opening consumer {index}: {}", amqp::describe(&e)))?;
                    self.channels.push(c.channel());
                    c
                }
            };
            let stop = shutdown.child_token();
            self.stops.insert(consumer.index(), stop.clone());
            self.running.spawn(async move {
                let (c, exit) = consumer.run(stop).await;
                (c.index(), c, exit)
            });
        }
        while self.running() > shrink_to {
            let Some(newest) = self.stops.keys().max().copied() else {
                break;
            };
            if let Some(stop) = self.stops.remove(&newest) {
                stop.cancel();
            }
        }
        Ok(())
    }

    /// Cancels every consumer and waits until all are idle.
    pub(super) async fn stop_all(&mut self) {
        for (_, stop) in self.stops.drain() {
            stop.cancel();
        }
        while let Some(joined) = self.running.join_next().await {
            if let Ok((_, c, _)) = joined {
                self.idle.push(c);
            }
        }
    }

    /// Waits for the next consumer task to end. Pending forever when none is running, so
    /// it can sit in a `select!`.
    pub(super) async fn next_exit(&mut self) -> Joined {
        let Some(joined) = self.running.join_next().await else {
            return std::future::pending().await;
        };
        match joined {
            Ok((index, c, exit)) => {
                // Its stop token was removed when it was cancelled on purpose.
                let shrunk = self.stops.remove(&index).is_none();
                self.idle.push(c);
                match exit {
                    ConsumerExit::Retired => Joined::Retired,
                    ConsumerExit::Stopped if shrunk => Joined::Retired,
                    exit => Joined::Exit(exit),
                }
            }
            Err(e) => Joined::Exit(ConsumerExit::Failed(format!("consumer task failed: {e}"))),
        }
    }
}

/// How a consumer task ended.
pub(super) enum Joined {
    /// Cancelled on purpose: the target fell, or a handler retired it (a delivery that
    /// waits out a backoff takes its consumer with it). Its channel is idle; the set may be
    /// below the target now.
    Retired,
    /// Stopped on its own, or by shutdown.
    Exit(ConsumerExit),
}
