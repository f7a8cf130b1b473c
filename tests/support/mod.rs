//! Test support: the broker, unique queue names, scripted HTTP workers, and an in-process
//! sidecar. Every test uses its own queues and deletes them at the end.
#![allow(dead_code)]

pub mod raw;
pub mod tls;

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use amqp_sidecar::{
    Config, Sidecar, SidecarError,
    config::{BackendConfig, QueueType},
};
use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, HeaderName, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use lapin::{
    BasicProperties, Connection, ConnectionProperties,
    message::BasicGetMessage,
    options::{
        BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
        ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions,
    },
    types::{AMQPValue, FieldTable, ShortString},
};
use tokio::{sync::Notify, task::JoinHandle};
use tokio_util::sync::CancellationToken;

/// The broker the tests use: `AMQP_URL`, or the local default.
pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// Connects to the test broker, or fails the test saying how to start one.
pub async fn broker() -> Connection {
    match Connection::connect(&amqp_url(), ConnectionProperties::default()).await {
        Ok(c) => c,
        Err(e) => panic!(
            "cannot reach RabbitMQ at {} ({e}).\nThese tests need a real broker. Start one with\n  \
             rabbitmq-server -detached && rabbitmqctl await_startup\nor `docker compose up -d rabbitmq`, \
             or point AMQP_URL at one.",
            amqp_sidecar::config::redact_url(&amqp_url())
        ),
    }
}

/// A queue name no other test (or test run) uses.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
        % 1_000_000_000;
    format!(
        "test-{prefix}-{}-{}-{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A config for `queue` with the given backends, fast backoff, and an ephemeral admin port.
pub fn config(queue: &str, backends: Vec<BackendConfig>) -> Config {
    let mut c = Config::default();
    c.amqp.url = amqp_url();
    c.amqp.queue = queue.to_owned();
    c.backends = backends;
    c.retry.backoff_initial_ms = 10;
    c.retry.backoff_max_ms = 50;
    c.admin.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    c.shutdown.grace_ms = 5_000;
    c
}

/// A backend for `worker` with `max_in_flight`.
pub fn backend(worker: &Worker, max_in_flight: u32) -> BackendConfig {
    BackendConfig {
        max_in_flight: max_in_flight.into(),
        timeout_ms: 5_000,
        ..BackendConfig::new(worker.url())
    }
}

/// Declares the sidecar's topology for `cfg` (so messages can be published before it starts).
pub async fn declare(conn: &Connection, cfg: &Config) {
    amqp_sidecar::amqp::topology::ensure(conn, cfg)
        .await
        .expect("declare topology");
}

/// Publishes with confirms; `props` gets delivery mode 2 unless set.
pub async fn publish(conn: &Connection, queue: &str, body: &[u8], props: BasicProperties) {
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm_select");
    let props = if props.delivery_mode().is_none() {
        props.with_delivery_mode(2)
    } else {
        props
    };
    let confirm = ch
        .basic_publish(
            ShortString::from(""),
            ShortString::from(queue),
            BasicPublishOptions::default(),
            body,
            props,
        )
        .await
        .expect("publish");
    assert!(matches!(
        confirm.await.expect("confirm"),
        lapin::Confirmation::Ack(None)
    ));
    let _ = ch.close(200, ShortString::from("done")).await;
}

/// Publishes `n` messages with ids `m-0`, `m-1`, ... and bodies `body-<i>`.
pub async fn publish_n(conn: &Connection, queue: &str, n: usize) {
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm_select");
    let mut confirms = Vec::with_capacity(n);
    for i in 0..n {
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(ShortString::from(format!("m-{i}")));
        confirms.push(
            ch.basic_publish(
                ShortString::from(""),
                ShortString::from(queue),
                BasicPublishOptions::default(),
                format!("body-{i}").as_bytes(),
                props,
            )
            .await
            .expect("publish"),
        );
    }
    for c in confirms {
        assert!(matches!(
            c.await.expect("confirm"),
            lapin::Confirmation::Ack(None)
        ));
    }
    let _ = ch.close(200, ShortString::from("done")).await;
}

/// Messages ready in `queue`, read live with a passive declare.
pub async fn ready(conn: &Connection, queue: &str) -> u32 {
    try_ready(conn, queue)
        .await
        .unwrap_or_else(|| panic!("queue {queue} does not exist"))
}

/// [`ready`], or `None` when the queue does not exist.
pub async fn try_ready(conn: &Connection, queue: &str) -> Option<u32> {
    let ch = conn.create_channel().await.expect("channel");
    let q = ch
        .queue_declare(
            ShortString::from(queue),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .ok()?;
    let _ = ch.close(200, ShortString::from("done")).await;
    Some(q.message_count())
}

/// Takes (and acks) every message in `queue`.
pub async fn take_all(conn: &Connection, queue: &str) -> Vec<BasicGetMessage> {
    let ch = conn.create_channel().await.expect("channel");
    let mut out = Vec::new();
    while let Some(m) = ch
        .basic_get(ShortString::from(queue), BasicGetOptions { no_ack: false })
        .await
        .expect("basic_get")
    {
        m.delivery
            .acker
            .ack(BasicAckOptions::default())
            .await
            .expect("ack");
        out.push(m);
    }
    let _ = ch.close(200, ShortString::from("done")).await;
    out
}

/// Deletes the queue, the DLQ, the delay tiers and the DLX of `cfg`.
pub async fn cleanup(conn: &Connection, cfg: &Config) {
    let ch = conn.create_channel().await.expect("channel");
    let q = &cfg.amqp.queue;
    let tiers = amqp_sidecar::amqp::delay::DelayTiers::new(cfg)
        .map(|t| t.tiers().iter().map(|t| t.name.clone()).collect::<Vec<_>>())
        .unwrap_or_default();
    for name in [q.clone(), cfg.dead_letter.queue_for(q)]
        .into_iter()
        .chain(tiers)
    {
        let _ = ch
            .queue_delete(ShortString::from(name), QueueDeleteOptions::default())
            .await;
    }
    let _ = ch
        .exchange_delete(
            ShortString::from(cfg.dead_letter.exchange_for(q)),
            ExchangeDeleteOptions::default(),
        )
        .await;
    let _ = ch.close(200, ShortString::from("done")).await;
}

/// Waits until `check` holds, polling every 20 ms; fails the test with `what` after `timeout`.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A header as text, from an AMQP table.
pub fn header_text(table: &FieldTable, key: &str) -> Option<String> {
    match table.inner().get(&ShortString::from(key))? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        AMQPValue::LongLongInt(n) => Some(n.to_string()),
        AMQPValue::LongInt(n) => Some(n.to_string()),
        other => Some(format!("{other:?}")),
    }
}

/// One request a worker received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub headers: HeaderMap,
    pub body: Bytes,
    pub at: Instant,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// What a worker answers.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: Bytes,
}

impl Reply {
    pub fn status(status: u16) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: Bytes::from_static(b"worker says hi"),
        }
    }
    pub fn with_body(mut self, body: Bytes) -> Self {
        self.body = body;
        self
    }
    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }
}

type Script = Arc<dyn Fn(&Recorded, usize) -> Reply + Send + Sync>;

#[derive(Default)]
struct WorkerState {
    requests: Mutex<Vec<Recorded>>,
    /// Message ids of requests answered 2xx, in order (duplicates included).
    succeeded: Mutex<Vec<String>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

/// Builds a scripted worker.
pub struct WorkerBuilder {
    latency: Duration,
    script: Script,
    gate: Option<Arc<Gate>>,
    health: Arc<std::sync::atomic::AtomicU16>,
    addr: Option<SocketAddr>,
    tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    slots: Option<Arc<tokio::sync::Semaphore>>,
}

/// Holds requests until opened.
#[derive(Default)]
pub struct Gate {
    open: std::sync::atomic::AtomicBool,
    notify: Notify,
}

impl Gate {
    pub fn open(&self) {
        self.open.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }
    async fn pass(&self) {
        loop {
            let n = self.notify.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            if self.open.load(Ordering::SeqCst) {
                return;
            }
            n.await;
        }
    }
}

impl WorkerBuilder {
    /// Sleep this long before answering.
    pub fn latency(mut self, d: Duration) -> Self {
        self.latency = d;
        self
    }
    /// Answer with `f(request, index)`; index is 0-based over all requests.
    pub fn respond(
        mut self,
        f: impl Fn(&Recorded, usize) -> Reply + Send + Sync + 'static,
    ) -> Self {
        self.script = Arc::new(f);
        self
    }
    /// Hold every request until the gate opens.
    pub fn gate(mut self, gate: Arc<Gate>) -> Self {
        self.gate = Some(gate);
        self
    }
    /// Listen on `addr` (e.g. to bring a killed worker back on its port).
    pub fn on(mut self, addr: SocketAddr) -> Self {
        self.addr = Some(addr);
        self
    }
    /// Serve at most `n` requests at once; the others queue inside the worker (a worker
    /// with `n` internal slots, whose capacity the sidecar cannot see).
    pub fn slots(mut self, n: usize) -> Self {
        self.slots = Some(Arc::new(tokio::sync::Semaphore::new(n)));
        self
    }
    /// Serve HTTPS with `config` (see [`tls`]).
    pub fn tls(mut self, config: Arc<tokio_rustls::rustls::ServerConfig>) -> Self {
        self.tls = Some(config);
        self
    }
    /// Starts the worker on 127.0.0.1:0. Its connections are owned by the server task, so
    /// [`Worker::kill`] resets requests in flight, as a crashed process would.
    pub async fn spawn(self) -> Worker {
        let bind = self
            .addr
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
        let listener = tokio::net::TcpListener::bind(bind)
            .await
            .expect("bind worker");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(WorkerState::default());
        let app_state = (
            Arc::clone(&state),
            self.script,
            self.latency,
            self.gate,
            self.slots,
        );
        let health = Arc::clone(&self.health);
        let app = Router::new()
            .route("/", post(handle))
            .route(
                "/healthz",
                get(move || async move {
                    StatusCode::from_u16(health.load(Ordering::SeqCst)).unwrap_or(StatusCode::OK)
                }),
            )
            .with_state(app_state)
            // Large bodies are this worker's business (axum's default limit is 2 MB).
            .layer(axum::extract::DefaultBodyLimit::disable());
        let acceptor = self.tls.map(tokio_rustls::TlsAcceptor::from);
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        let service = hyper_util::service::TowerToHyperService::new(app.clone());
                        let acceptor = acceptor.clone();
                        conns.spawn(async move {
                            let http = hyper::server::conn::http1::Builder::new();
                            match acceptor {
                                // A failed handshake just drops the connection.
                                Some(acceptor) => {
                                    if let Ok(tls) = acceptor.accept(stream).await {
                                        let _ = http
                                            .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                                            .await;
                                    }
                                }
                                None => {
                                    let _ = http
                                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                                        .await;
                                }
                            }
                        });
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        Worker {
            addr,
            state,
            task,
            health: self.health,
        }
    }
}

type AppState = (
    Arc<WorkerState>,
    Script,
    Duration,
    Option<Arc<Gate>>,
    Option<Arc<tokio::sync::Semaphore>>,
);

async fn handle(
    State((state, script, latency, gate, slots)): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    state.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let rec = Recorded {
        headers,
        body,
        at: Instant::now(),
    };
    let index = {
        let mut r = state.requests.lock().expect("lock");
        r.push(rec.clone());
        r.len() - 1
    };
    // Decrement even if the sidecar gives up on the request and the future is dropped.
    struct Done(Arc<WorkerState>);
    impl Drop for Done {
        fn drop(&mut self) {
            self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
        }
    }
    let _done = Done(Arc::clone(&state));
    if let Some(g) = gate {
        g.pass().await;
    }
    let _slot = match &slots {
        Some(s) => Some(s.acquire().await.expect("worker slots")),
        None => None,
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let reply = script(&rec, index);
    if (200..300).contains(&reply.status) {
        state
            .succeeded
            .lock()
            .expect("lock")
            .push(rec.header("x-amqp-message-id").unwrap_or("").to_owned());
    }
    let mut resp = (
        StatusCode::from_u16(reply.status).expect("status"),
        reply.body,
    )
        .into_response();
    for (k, v) in reply.headers {
        resp.headers_mut().insert(
            HeaderName::from_static(k),
            HeaderValue::from_str(&v).expect("value"),
        );
    }
    resp
}

/// Workers answering 200 after the given latencies (ms), one each.
pub async fn workers_with_latency(ms: &[u64]) -> Vec<Worker> {
    let mut out = Vec::with_capacity(ms.len());
    for &m in ms {
        out.push(
            Worker::builder()
                .latency(Duration::from_millis(m))
                .spawn()
                .await,
        );
    }
    out
}

/// A running scripted worker.
pub struct Worker {
    pub addr: SocketAddr,
    state: Arc<WorkerState>,
    task: JoinHandle<()>,
    health: Arc<std::sync::atomic::AtomicU16>,
}

impl Worker {
    pub fn builder() -> WorkerBuilder {
        WorkerBuilder {
            latency: Duration::ZERO,
            script: Arc::new(|_, _| Reply::status(200)),
            gate: None,
            health: Arc::new(std::sync::atomic::AtomicU16::new(200)),
            addr: None,
            tls: None,
            slots: None,
        }
    }
    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }
    pub fn count(&self) -> usize {
        self.state.requests.lock().expect("lock").len()
    }
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.requests.lock().expect("lock").clone()
    }
    pub fn in_flight(&self) -> usize {
        self.state.in_flight.load(Ordering::SeqCst)
    }
    pub fn max_in_flight(&self) -> usize {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }
    /// Sets the status its GET /healthz answers.
    pub fn set_health(&self, status: u16) {
        self.health.store(status, Ordering::SeqCst);
    }
    /// Message ids answered 2xx, duplicates included.
    pub fn succeeded(&self) -> Vec<String> {
        self.state.succeeded.lock().expect("lock").clone()
    }
    /// Kills the worker: requests in flight get their connection reset, and the port then
    /// refuses connections.
    pub fn kill(&self) {
        self.task.abort();
    }
}

/// A sidecar running in this process.
pub struct Running {
    pub admin: SocketAddr,
    stop: CancellationToken,
    handle: JoinHandle<Result<(), SidecarError>>,
}

/// Starts a sidecar for `cfg` and waits until /readyz says it is ready.
pub async fn start(cfg: Config) -> Running {
    let running = start_unready(cfg).await;
    let url = format!("http://{}/readyz", running.admin);
    wait_until("sidecar ready", Duration::from_secs(20), || async {
        http()
            .get(&url)
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    running
}

/// Starts a sidecar for `cfg` without waiting for readiness.
pub async fn start_unready(cfg: Config) -> Running {
    let cfg = cfg.validate().expect("valid test config");
    let sidecar = Sidecar::bind(cfg).await.expect("bind sidecar");
    let admin = sidecar.admin_addr();
    let stop = CancellationToken::new();
    let handle = tokio::spawn(sidecar.run(stop.clone()));
    Running {
        admin,
        stop,
        handle,
    }
}

impl Running {
    /// Graceful shutdown; returns the sidecar's result.
    pub async fn stop(self) -> Result<(), SidecarError> {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.handle)
            .await
            .expect("sidecar stops within 30 s")
            .expect("sidecar task")
    }
    /// The /metrics text.
    pub async fn metrics(&self) -> String {
        http()
            .get(format!("http://{}/metrics", self.admin))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("body")
    }
    /// The sum of the samples of `name` whose label set contains every `labels` pair.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_value(&self.metrics().await, name, labels)
    }
    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }
}

/// The sum of the samples of `name` whose label set contains every `labels` pair
/// (the library's Prometheus text parser, [`amqp_sidecar::metrics::sample_sum`]).
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    amqp_sidecar::metrics::sample_sum(text, name, labels)
}

/// GETs `url` and returns the body (e.g. a sidecar binary's /metrics).
pub async fn get_text(url: &str) -> String {
    http()
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .text()
        .await
        .expect("body")
}

/// The headers of a dead-lettered message.
pub fn dead_letter_headers(m: &BasicGetMessage) -> FieldTable {
    m.delivery
        .properties
        .headers()
        .clone()
        .expect("a dead-lettered message has headers")
}

/// An HTTP client that never uses a proxy.
pub fn http() -> reqwest::Client {
    amqp_sidecar::tls::install_provider();
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client")
}

/// Shorthand for both queue types.
pub const QUEUE_TYPES: [QueueType; 2] = [QueueType::Quorum, QueueType::Classic];

impl Running {
    /// Waits (up to 20 s) for the sidecar to stop on its own and returns its result.
    pub async fn stop_result_soon(self) -> Result<(), SidecarError> {
        match tokio::time::timeout(std::time::Duration::from_secs(20), self.handle).await {
            Ok(r) => r.expect("sidecar task"),
            Err(_) => {
                self.stop.cancel();
                panic!("the sidecar did not stop on its own");
            }
        }
    }
}

/// Runs `rabbitmqctl` (or `$RABBITMQCTL`, e.g. `docker compose exec -T rabbitmq rabbitmqctl`)
/// and returns its stdout; fails the test if it fails.
pub fn rabbitmqctl(args: &[&str]) -> String {
    let cmd = std::env::var("RABBITMQCTL").unwrap_or_else(|_| "rabbitmqctl".to_owned());
    let mut parts = cmd.split_whitespace();
    let program = parts.next().expect("RABBITMQCTL is empty");
    let out = std::process::Command::new(program)
        .args(parts)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {cmd}: {e} (set RABBITMQCTL to point at rabbitmqctl)")
        });
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The end-of-test accounting: every published message must be found among those a
/// worker answered 2xx, those in the DLQ, and those still in the queue.
#[derive(Debug)]
pub struct Accounting {
    pub published: usize,
    /// Distinct messages a worker answered 2xx.
    pub succeeded: usize,
    pub dead_lettered: usize,
    pub remaining: usize,
    /// Published ids found nowhere.
    pub lost: Vec<String>,
    /// Extra sightings beyond one per message (at-least-once duplicates).
    pub duplicates: usize,
    /// Messages found in more than one of the three sets (a duplicate that went two ways).
    pub overlap: usize,
}

impl Accounting {
    /// Fails the test on any loss, and prints the figures.
    pub fn assert_no_loss(&self, test: &str) {
        println!(
            "[accounting] {test}: published {} = succeeded {} + dead-lettered {} + remaining {} (duplicates {}), lost {}",
            self.published,
            self.succeeded,
            self.dead_lettered,
            self.remaining,
            self.duplicates,
            self.lost.len()
        );
        assert!(
            self.lost.is_empty(),
            "{test}: lost messages {:?}",
            self.lost
        );
        assert_eq!(
            self.succeeded + self.dead_lettered + self.remaining - self.overlap,
            self.published,
            "{test}: published = succeeded + dead-lettered + remaining"
        );
    }
}

/// Accounts for `m-0`..`m-{n-1}` (as published by [`publish_n`]): takes what is left in the
/// queue and the DLQ (the sidecar must be stopped) and compares with the workers' 2xx.
pub async fn account(conn: &Connection, cfg: &Config, n: usize, workers: &[&Worker]) -> Accounting {
    use std::collections::HashSet;
    let ids = |msgs: &[BasicGetMessage]| -> Vec<String> {
        msgs.iter()
            .map(|m| {
                m.delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|s| s.to_string())
                    .unwrap_or_default()
            })
            .collect()
    };
    let remaining = ids(&take_all(conn, &cfg.amqp.queue).await);
    let dead = ids(&take_all(conn, &cfg.dead_letter.queue_for(&cfg.amqp.queue)).await);
    let successes: Vec<String> = workers.iter().flat_map(|w| w.succeeded()).collect();
    let s: HashSet<&String> = successes.iter().collect();
    let d: HashSet<&String> = dead.iter().collect();
    let r: HashSet<&String> = remaining.iter().collect();
    let lost: Vec<String> = (0..n)
        .map(|i| format!("m-{i}"))
        .filter(|id| !s.contains(id) && !d.contains(id) && !r.contains(id))
        .collect();
    let sightings = successes.len() + dead.len() + remaining.len();
    let found = n - lost.len();
    let overlap =
        s.intersection(&d).count() + s.intersection(&r).count() + d.intersection(&r).count();
    Accounting {
        published: n,
        succeeded: s.len(),
        dead_lettered: d.len(),
        remaining: r.len(),
        duplicates: sightings - found,
        overlap,
        lost,
    }
}

/// The sidecar binary running as a child process.
pub struct Process {
    pub child: tokio::process::Child,
    pub admin: SocketAddr,
    _dir: TempDir,
}

/// A directory removed on drop.
pub struct TempDir(pub std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A free loopback port (bound, then released) below Linux's ephemeral range
/// (32768–60999), so an outgoing connection can never take it as its local port between
/// the release and a later bind (a worker brought back on its port, a spawned binary's
/// admin port). Each call in a process returns a different port.
pub fn free_port() -> u16 {
    use std::sync::atomic::AtomicU32;
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id() % SPAN;
    for _ in 0..SPAN {
        // 7919 is prime to SPAN, so successive calls walk every port once.
        let step = NEXT.fetch_add(1, Ordering::Relaxed) % SPAN;
        let port = u16::try_from(LOW + (start + step * 7919) % SPAN).expect("port");
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {LOW}..{}", LOW + SPAN)
}

/// Starts the sidecar binary with `cfg` (written as a config file; JSON is valid YAML).
pub fn spawn_binary(cfg: &Config) -> Process {
    spawn_binary_with_env(cfg, &[])
}

/// [`spawn_binary`] with extra environment variables (e.g. `RUST_LOG`).
pub fn spawn_binary_with_env(cfg: &Config, env: &[(&str, &str)]) -> Process {
    let mut cfg = cfg.clone();
    cfg.admin.listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let dir = std::env::temp_dir().join(unique("sidecar-bin"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("config.yaml");
    std::fs::write(
        &file,
        serde_json::to_string_pretty(&cfg).expect("serialize"),
    )
    .expect("write config");
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_amqp-sidecar"));
    for (k, _) in std::env::vars() {
        if k.starts_with("AMQP_SIDECAR_") {
            cmd.env_remove(k);
        }
    }
    let log = std::fs::File::create(dir.join("sidecar.log")).expect("log file");
    let child = cmd
        .arg("--config")
        .arg(&file)
        .env("RUST_LOG", "amqp_sidecar=info")
        .envs(env.iter().copied())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("spawn amqp-sidecar");
    Process {
        child,
        admin: cfg.admin.listen,
        _dir: TempDir(dir),
    }
}

impl Process {
    /// The sum of the samples of `name` (from this binary's /metrics) whose label set
    /// contains every `labels` pair; 0 while the admin server does not answer yet.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        match http()
            .get(format!("http://{}/metrics", self.admin))
            .send()
            .await
        {
            Ok(r) => metric_value(&r.text().await.unwrap_or_default(), name, labels),
            Err(_) => 0.0,
        }
    }
    /// What the binary logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.0.join("sidecar.log")).unwrap_or_default()
    }
    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }
    /// Sends `signal` (e.g. "TERM", "KILL") with kill(1).
    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{signal} failed");
    }
    /// Waits for the process to exit.
    pub async fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .expect("sidecar exits in time")
            .expect("wait")
    }
    /// /readyz status code, or None if the admin server is not answering.
    pub async fn readyz(&self) -> Option<u16> {
        http()
            .get(format!("http://{}/readyz", self.admin))
            .send()
            .await
            .ok()
            .map(|r| r.status().as_u16())
    }
    pub async fn wait_ready(&self) {
        wait_until("binary ready", Duration::from_secs(30), || async {
            self.readyz().await == Some(200)
        })
        .await;
    }
}

/// Takes (and acks) up to `n` messages from `queue` as a second consumer would.
pub async fn take_n(conn: &Connection, queue: &str, n: usize) -> usize {
    let ch = conn.create_channel().await.expect("channel");
    let mut got = 0;
    while got < n {
        match ch
            .basic_get(ShortString::from(queue), BasicGetOptions { no_ack: false })
            .await
            .expect("basic_get")
        {
            Some(m) => {
                m.delivery
                    .acker
                    .ack(BasicAckOptions::default())
                    .await
                    .expect("ack");
                got += 1;
            }
            None => break,
        }
    }
    let _ = ch.close(200, ShortString::from("done")).await;
    got
}

impl Running {
    /// This sidecar's /readyz JSON (per sidecar, unlike the process-wide gauges such as
    /// `amqp_sidecar_paused`, which every sidecar in a test binary shares).
    pub async fn readiness(&self) -> serde_json::Value {
        let body = http()
            .get(format!("http://{}/readyz", self.admin))
            .send()
            .await
            .expect("GET /readyz")
            .text()
            .await
            .expect("body");
        serde_json::from_str(&body).expect("readyz JSON")
    }
}

/// Asserts the `x-sidecar-*` headers that say why a message was dead-lettered.
pub fn assert_dead_letter_headers(h: &FieldTable, reason: &str, attempts: u32, last_status: u16) {
    assert_eq!(header_text(h, "x-sidecar-reason").as_deref(), Some(reason));
    assert_eq!(
        header_text(h, "x-sidecar-attempts"),
        Some(attempts.to_string())
    );
    assert_eq!(
        header_text(h, "x-sidecar-last-status"),
        Some(last_status.to_string())
    );
}
