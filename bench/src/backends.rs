//! The in-process HTTP backends: fast no-op servers and scripted one-at-a-time workers.
//!
//! Every request body starts with the message's sequence number and its publish time (see
//! [`crate::broker::encode`]). A backend records, in the run's shared [`Recorder`], which
//! sequence numbers arrived (to find lost and duplicated messages), the end-to-end latency
//! (publish to receipt) in an HDR histogram, and the first and last receipt times.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::{Router, body::Bytes, extract::State, http::StatusCode, routing::post};
use hdrhistogram::Histogram;
use tokio::task::JoinHandle;

use crate::broker::{decode, now_ns};

/// Highest latency the histograms track: one hour, in µs.
const MAX_LATENCY_US: u64 = 3_600_000_000;

/// A new latency histogram (µs, 3 significant figures).
///
/// # Errors
/// Never in practice: the bounds are constants.
pub fn new_histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)?)
}

/// What one run's backends saw, shared by all of them.
pub struct Recorder {
    /// One bit per expected sequence number.
    seen: Vec<AtomicU64>,
    /// Requests received (including duplicates).
    pub received: AtomicU64,
    /// Requests whose sequence number had been seen before (redeliveries).
    pub duplicates: AtomicU64,
    /// Requests whose body could not be decoded or whose sequence number was out of range.
    pub malformed: AtomicU64,
    /// Earliest receipt, ns since the epoch (`u64::MAX` until the first one).
    pub first_ns: AtomicU64,
    /// Latest receipt, ns since the epoch.
    pub last_ns: AtomicU64,
    /// Latest completed response, ns since the epoch (the makespan's end).
    pub last_done_ns: AtomicU64,
    /// Publish-to-receipt latency, µs, of the messages from sequence number `warmup` on.
    pub latency: Mutex<Histogram<u64>>,
    /// Messages below this sequence number are left out of the latency histogram.
    warmup: u64,
}

impl Recorder {
    /// A recorder for sequence numbers `0..expected`, whose latency histogram leaves out
    /// the first `warmup` ones.
    ///
    /// # Errors
    /// See [`new_histogram`].
    pub fn new(expected: u64, warmup: u64) -> anyhow::Result<Arc<Self>> {
        let words = usize::try_from(expected.div_ceil(64))?;
        Ok(Arc::new(Self {
            seen: (0..words).map(|_| AtomicU64::new(0)).collect(),
            received: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            malformed: AtomicU64::new(0),
            first_ns: AtomicU64::new(u64::MAX),
            last_ns: AtomicU64::new(0),
            last_done_ns: AtomicU64::new(0),
            latency: Mutex::new(new_histogram()?),
            warmup,
        }))
    }

    /// Records one request body; returns false when it is malformed.
    fn record(&self, body: &[u8]) -> bool {
        let now = now_ns();
        self.received.fetch_add(1, Ordering::Relaxed);
        self.first_ns.fetch_min(now, Ordering::Relaxed);
        self.last_ns.fetch_max(now, Ordering::Relaxed);
        let Some((seq, ts)) = decode(body) else {
            self.malformed.fetch_add(1, Ordering::Relaxed);
            return false;
        };
        let Some(word) = usize::try_from(seq / 64)
            .ok()
            .and_then(|w| self.seen.get(w))
        else {
            self.malformed.fetch_add(1, Ordering::Relaxed);
            return false;
        };
        let bit = 1u64 << (seq % 64);
        if word.fetch_or(bit, Ordering::Relaxed) & bit != 0 {
            self.duplicates.fetch_add(1, Ordering::Relaxed);
        }
        if seq < self.warmup {
            return true;
        }
        let us = now.saturating_sub(ts) / 1000;
        self.latency
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .saturating_record(us.max(1));
        true
    }

    /// Distinct sequence numbers received.
    pub fn distinct(&self) -> u64 {
        self.seen
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum()
    }

    /// A copy of the latency histogram.
    pub fn latency(&self) -> Histogram<u64> {
        self.latency
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// How a backend answers.
#[derive(Debug, Clone, Copy)]
pub enum Behaviour {
    /// 200 at once.
    Fast,
    /// One request at a time (others wait their turn), each taking `service`.
    Worker {
        /// Service time of one request.
        service: Duration,
    },
}

/// One backend's state.
pub struct Backend {
    behaviour: Behaviour,
    /// One request at a time, for [`Behaviour::Worker`].
    slot: tokio::sync::Mutex<()>,
    recorder: Arc<Recorder>,
    /// Requests at this backend now, being served or waiting: its queue length.
    pub in_flight: AtomicI64,
    /// Requests received.
    pub count: AtomicU64,
    /// Time spent serving (workers only), ns: the actual service times, which are longer
    /// than the scripted ones by the timer's granularity.
    pub busy_ns: AtomicU64,
}

async fn handle(State(b): State<Arc<Backend>>, body: Bytes) -> StatusCode {
    b.count.fetch_add(1, Ordering::Relaxed);
    if !b.recorder.record(&body) {
        return StatusCode::BAD_REQUEST;
    }
    if let Behaviour::Worker { service } = b.behaviour {
        b.in_flight.fetch_add(1, Ordering::Relaxed);
        {
            let _turn = b.slot.lock().await;
            let start = std::time::Instant::now();
            tokio::time::sleep(service).await;
            let took = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
            b.busy_ns.fetch_add(took, Ordering::Relaxed);
        }
        b.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
    b.recorder
        .last_done_ns
        .fetch_max(now_ns(), Ordering::Relaxed);
    StatusCode::OK
}

/// A set of running backends; dropping it stops their servers.
pub struct Backends {
    /// The backends, in order.
    pub list: Vec<Arc<Backend>>,
    /// Their `http://127.0.0.1:PORT/` URLs.
    pub urls: Vec<String>,
    tasks: Vec<JoinHandle<()>>,
}

impl Backends {
    /// Starts one server per behaviour, all recording into `recorder`.
    ///
    /// # Errors
    /// When a listener cannot be bound.
    pub async fn start(behaviours: &[Behaviour], recorder: &Arc<Recorder>) -> anyhow::Result<Self> {
        let mut list = Vec::new();
        let mut urls = Vec::new();
        let mut tasks = Vec::new();
        for &behaviour in behaviours {
            let backend = Arc::new(Backend {
                behaviour,
                slot: tokio::sync::Mutex::new(()),
                recorder: Arc::clone(recorder),
                in_flight: AtomicI64::new(0),
                count: AtomicU64::new(0),
                busy_ns: AtomicU64::new(0),
            });
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let addr: SocketAddr = listener.local_addr()?;
            let app = Router::new()
                .route("/", post(handle))
                .with_state(Arc::clone(&backend));
            tasks.push(tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, app).await {
                    eprintln!("backend {addr}: {e}");
                }
            }));
            urls.push(format!("http://{addr}/"));
            list.push(backend);
        }
        Ok(Self { list, urls, tasks })
    }

    /// Requests received by each backend.
    pub fn counts(&self) -> Vec<u64> {
        self.list
            .iter()
            .map(|b| b.count.load(Ordering::Relaxed))
            .collect()
    }

    /// Each worker's mean actual service time, ms (0 for fast backends).
    pub fn mean_service_ms(&self) -> Vec<f64> {
        self.list
            .iter()
            .map(|b| {
                let n = b.count.load(Ordering::Relaxed).max(1);
                b.busy_ns.load(Ordering::Relaxed) as f64 / n as f64 / 1e6
            })
            .collect()
    }

    /// Each backend's current queue length.
    pub fn in_flight(&self) -> Vec<i64> {
        self.list
            .iter()
            .map(|b| b.in_flight.load(Ordering::Relaxed))
            .collect()
    }
}

impl Drop for Backends {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}
