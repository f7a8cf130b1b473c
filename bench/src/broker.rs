//! The bench's own broker work: declaring each run's queue the way the sidecar does,
//! publishing (prepublished backlogs, paced streams and a windowed soak stream), checking
//! what is left, and deleting it all afterwards.

use std::{
    collections::VecDeque,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Context;
use lapin::{
    BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind, PublisherConfirm,
    options::{
        BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
        QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
    },
    types::{AMQPValue, FieldTable, LongString, ShortString},
};

/// Unconfirmed publishes allowed before the publisher waits for the oldest confirm.
const CONFIRM_WINDOW: usize = 2000;

/// Nanoseconds since the Unix epoch.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// A message body of `size` bytes (at least 16): the sequence number and the publish time
/// in ns since the epoch, both little-endian, then filler.
pub fn encode(seq: u64, size: usize) -> Vec<u8> {
    let mut body = vec![b'x'; size.max(16)];
    body[..8].copy_from_slice(&seq.to_le_bytes());
    body[8..16].copy_from_slice(&now_ns().to_le_bytes());
    body
}

/// The sequence number and publish time of a body made by [`encode`].
pub fn decode(body: &[u8]) -> Option<(u64, u64)> {
    let seq = u64::from_le_bytes(body.get(..8)?.try_into().ok()?);
    let ts = u64::from_le_bytes(body.get(8..16)?.try_into().ok()?);
    Some((seq, ts))
}

/// The queue type of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// Classic queue.
    Classic,
    /// Quorum queue.
    Quorum,
}

impl QueueType {
    /// The name used in the sidecar's config and in tables.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Classic => "classic",
            Self::Quorum => "quorum",
        }
    }
}

impl std::str::FromStr for QueueType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "classic" => Ok(Self::Classic),
            "quorum" => Ok(Self::Quorum),
            other => Err(format!(
                "unknown queue type {other:?}: use classic or quorum"
            )),
        }
    }
}

/// Opens a connection.
///
/// # Errors
/// The lapin error.
pub async fn connect(url: &str, name: &str) -> anyhow::Result<Connection> {
    let props =
        ConnectionProperties::default().with_connection_name(LongString::from(name.to_owned()));
    Connection::connect(url, props)
        .await
        .with_context(|| format!("connecting to {url}"))
}

/// The bench's connection to the broker: declares, publishes, inspects and deletes.
pub struct Broker {
    conn: Connection,
}

fn quorum_args(qt: QueueType) -> FieldTable {
    let mut args = FieldTable::default();
    if qt == QueueType::Quorum {
        args.insert(
            ShortString::from("x-queue-type"),
            AMQPValue::LongString(LongString::from("quorum")),
        );
    }
    args
}

impl Broker {
    /// Connects.
    ///
    /// # Errors
    /// When the broker cannot be reached.
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        Ok(Self {
            conn: connect(url, "sidecar-bench").await?,
        })
    }

    /// True while the connection is up.
    pub fn is_connected(&self) -> bool {
        self.conn.status().connected()
    }

    async fn channel(&self) -> anyhow::Result<Channel> {
        Ok(self.conn.create_channel().await?)
    }

    /// Declares `queue` with the sidecar's arguments (`x-queue-type`, and the dead-letter
    /// exchange `<queue>.dlx` with routing key `<queue>`), and that DLX and `<queue>.dlq`,
    /// exactly as `amqp_sidecar::amqp::topology::ensure` does, so its redeclare matches.
    ///
    /// # Errors
    /// The broker's refusal.
    pub async fn declare(&self, queue: &str, qt: QueueType) -> anyhow::Result<()> {
        let ch = self.channel().await?;
        let dlx = format!("{queue}.dlx");
        let dlq = format!("{queue}.dlq");
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        let mut args = quorum_args(qt);
        args.insert(
            ShortString::from("x-dead-letter-exchange"),
            AMQPValue::LongString(LongString::from(dlx.as_str())),
        );
        args.insert(
            ShortString::from("x-dead-letter-routing-key"),
            AMQPValue::LongString(LongString::from(queue)),
        );
        ch.queue_declare(ShortString::from(queue), durable, args)
            .await
            .with_context(|| format!("declaring {queue}"))?;
        ch.exchange_declare(
            ShortString::from(dlx.as_str()),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
        ch.queue_declare(ShortString::from(dlq.as_str()), durable, quorum_args(qt))
            .await?;
        ch.queue_bind(
            ShortString::from(dlq.as_str()),
            ShortString::from(dlx.as_str()),
            ShortString::from(queue),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        let _ = ch.close(200, ShortString::from("declared")).await;
        Ok(())
    }

    /// Messages ready in `queue` now (a passive declare; unacked ones are not counted).
    ///
    /// # Errors
    /// When the queue does not exist or the broker is gone.
    pub async fn ready(&self, queue: &str) -> anyhow::Result<u32> {
        let ch = self.channel().await?;
        let q = ch
            .queue_declare(
                ShortString::from(queue),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        let _ = ch.close(200, ShortString::from("checked")).await;
        Ok(q.message_count())
    }

    /// Deletes `queue`, `<queue>.dlq` and `<queue>.dlx`; errors are ignored (best effort).
    pub async fn delete(&self, queue: &str) {
        let Ok(ch) = self.channel().await else {
            return;
        };
        for q in [queue.to_owned(), format!("{queue}.dlq")] {
            let _ = ch
                .queue_delete(ShortString::from(q.as_str()), QueueDeleteOptions::default())
                .await;
        }
        let _ = ch
            .exchange_delete(
                ShortString::from(format!("{queue}.dlx").as_str()),
                ExchangeDeleteOptions::default(),
            )
            .await;
        let _ = ch.close(200, ShortString::from("deleted")).await;
    }

    /// A publisher with confirms on its own channel.
    ///
    /// # Errors
    /// When the channel cannot be opened.
    pub async fn publisher(
        &self,
        queue: &str,
        body_size: usize,
        persistent: bool,
    ) -> anyhow::Result<Publisher> {
        let ch = self.channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        Ok(Publisher {
            ch,
            queue: ShortString::from(queue),
            body_size,
            persistent,
            pending: VecDeque::new(),
        })
    }
}

/// Publishes messages (persistent unless `--transient`) to one queue, with publisher
/// confirms.
pub struct Publisher {
    ch: Channel,
    queue: ShortString,
    body_size: usize,
    /// delivery_mode 2 (persistent) or 1 (transient).
    persistent: bool,
    pending: VecDeque<PublisherConfirm>,
}

impl Publisher {
    /// Publishes message `seq` (body from [`encode`], persistent, with a message id).
    ///
    /// # Errors
    /// When the channel is gone or the broker nacks an earlier message.
    pub async fn publish(&mut self, seq: u64) -> anyhow::Result<()> {
        let props = BasicProperties::default()
            .with_delivery_mode(if self.persistent { 2 } else { 1 })
            .with_content_type(ShortString::from("application/octet-stream"))
            .with_message_id(ShortString::from(seq.to_string()));
        let confirm = self
            .ch
            .basic_publish(
                ShortString::from(""),
                self.queue.clone(),
                BasicPublishOptions::default(),
                &encode(seq, self.body_size),
                props,
            )
            .await?;
        self.pending.push_back(confirm);
        while self.pending.len() > CONFIRM_WINDOW {
            self.wait_oldest().await?;
        }
        Ok(())
    }

    async fn wait_oldest(&mut self) -> anyhow::Result<()> {
        if let Some(c) = self.pending.pop_front() {
            let confirmation = c.await?;
            anyhow::ensure!(
                confirmation.is_ack(),
                "the broker nacked a published message"
            );
        }
        Ok(())
    }

    /// Waits for every outstanding confirm.
    ///
    /// # Errors
    /// When the broker nacks a message or the channel is gone.
    pub async fn flush(&mut self) -> anyhow::Result<()> {
        while !self.pending.is_empty() {
            self.wait_oldest().await?;
        }
        Ok(())
    }

    /// Publishes `0..n` as fast as confirms allow.
    ///
    /// # Errors
    /// See [`Publisher::publish`].
    pub async fn backlog(&mut self, n: u64) -> anyhow::Result<()> {
        for seq in 0..n {
            self.publish(seq).await?;
        }
        self.flush().await
    }

    /// Publishes `0..n` at `rate` messages per second, each stamped when it is sent.
    ///
    /// # Errors
    /// See [`Publisher::publish`].
    pub async fn paced(&mut self, n: u64, rate: f64) -> anyhow::Result<()> {
        let start = Instant::now();
        for seq in 0..n {
            let due = start + Duration::from_secs_f64(seq as f64 / rate.max(1.0));
            if due > Instant::now() {
                tokio::time::sleep_until(due.into()).await;
            }
            self.publish(seq).await?;
        }
        self.flush().await
    }

    /// Publishes `0..n` as fast as possible while keeping at most `window` messages
    /// published but not yet `consumed` (a bounded backlog for the soak).
    ///
    /// # Errors
    /// See [`Publisher::publish`]; also when nothing is consumed for `stall`.
    pub async fn windowed(
        &mut self,
        n: u64,
        window: u64,
        consumed: &AtomicU64,
        stall: Duration,
    ) -> anyhow::Result<()> {
        let mut seq = 0;
        let mut last_progress = (Instant::now(), consumed.load(Ordering::Relaxed));
        while seq < n {
            let done = consumed.load(Ordering::Relaxed);
            if done != last_progress.1 {
                last_progress = (Instant::now(), done);
            }
            anyhow::ensure!(
                last_progress.0.elapsed() < stall,
                "no message consumed for {stall:?}"
            );
            if seq.saturating_sub(done) >= window {
                tokio::time::sleep(Duration::from_millis(2)).await;
                continue;
            }
            let batch = (window - seq.saturating_sub(done)).min(500).min(n - seq);
            for _ in 0..batch {
                self.publish(seq).await?;
                seq += 1;
            }
        }
        self.flush().await
    }

    /// Closes the channel.
    pub async fn close(self) {
        let _ = self.ch.close(200, ShortString::from("published")).await;
    }
}
