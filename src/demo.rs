//! The newcomer's demo: `amqp-sidecar demo`.
//!
//! 1. Starts three in-process HTTP workers of different speeds: `fast` (5 ms, 4 at a time),
//!    `medium` (20 ms, 2 at a time) and `slow-flaky` (60 ms, 2 at a time, answering 503 to
//!    15% of requests).
//! 2. Publishes a batch of persistent messages to a fresh quorum queue on the local broker.
//!    About 1% of them are answered 422 by every worker (dead-lettered as `rejected`) and
//!    about 0.4% get 500 from every worker (dead-lettered as `retries_exhausted`).
//! 3. Runs the sidecar in-process on them. A third of the way through, the `medium` worker
//!    restarts: it stops listening (its connections are cut) for a second, as a container
//!    restart would. Requests it refuses are not attempts, so the restart dead-letters
//!    nothing.
//! 4. Prints what happened: requests per backend, retries, dead-letters by reason (only the
//!    planted ones), the restart, and msg/s. Then deletes the demo queues.

use std::{
    collections::HashSet,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use axum::{Router, body::Bytes, extract::State, http::HeaderMap, http::StatusCode, routing::post};
use lapin::{
    BasicProperties, Connection, ConnectionProperties,
    options::{
        BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
        QueueDeleteOptions,
    },
    types::{AMQPValue, FieldTable, ShortString},
};
use rand::Rng;
use tokio_util::sync::CancellationToken;

use crate::{
    Config, Sidecar,
    config::{BackendConfig, BalancerKind},
};

/// Arguments of `amqp-sidecar demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Messages to publish.
    #[arg(long, default_value_t = 3000)]
    pub messages: u32,
    /// Broker URL. Its value is never shown in --help (it may hold a password).
    #[arg(
        long,
        env = "AMQP_URL",
        hide_env_values = true,
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub url: String,
    /// Balancing strategy: least_in_flight, power_of_two, round_robin,
    /// weighted_round_robin or random.
    #[arg(long, default_value = "least_in_flight", value_parser = str::parse::<BalancerKind>)]
    pub balancer: BalancerKind,
}

/// A scripted demo worker's behaviour and tallies.
struct Worker {
    name: &'static str,
    latency: Duration,
    capacity: u32,
    failure_rate: f64,
    requests: AtomicU64,
    ok: AtomicU64,
    failed: AtomicU64,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    succeeded: Arc<Mutex<HashSet<String>>>,
}

async fn work(State(w): State<Arc<Worker>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    w.requests.fetch_add(1, Ordering::Relaxed);
    let now = w.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    w.max_in_flight.fetch_max(now, Ordering::SeqCst);
    // Decrements when the request ends, also when a restart cuts it mid-sleep.
    struct InFlight<'a>(&'a AtomicUsize);
    impl Drop for InFlight<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }
    let slot = InFlight(&w.in_flight);
    tokio::time::sleep(w.latency).await;
    drop(slot);
    let status = if body.starts_with(b"poison-4xx") {
        StatusCode::UNPROCESSABLE_ENTITY
    } else if body.starts_with(b"poison-5xx") || rand::rng().random_bool(w.failure_rate) {
        if body.starts_with(b"poison-5xx") {
            StatusCode::INTERNAL_SERVER_ERROR
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        }
    } else {
        StatusCode::OK
    };
    if status.is_success() {
        w.ok.fetch_add(1, Ordering::Relaxed);
        if let Some(id) = headers
            .get("x-amqp-message-id")
            .and_then(|v| v.to_str().ok())
        {
            w.succeeded
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(id.to_owned());
        }
    } else {
        w.failed.fetch_add(1, Ordering::Relaxed);
    }
    status
}

/// Serves `worker` on `addr` (port 0 for any). Aborting the returned task stops it the way
/// a killed process stops: the listener closes and every open connection is cut (they are
/// owned by the task, which `axum::serve` would not do).
async fn serve(
    worker: Arc<Worker>,
    addr: SocketAddr,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let app = Router::new().route("/", post(work)).with_state(worker);
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok((stream, _)) = accepted else { continue };
                    let service = hyper_util::service::TowerToHyperService::new(app.clone());
                    conns.spawn(async move {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                            .await;
                    });
                }
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
    });
    Ok((addr, task))
}

/// How long the `medium` worker stays down when it restarts.
const RESTART_DOWNTIME: Duration = Duration::from_secs(1);

/// Runs the demo.
///
/// # Errors
/// When the broker is unreachable (the message says how to start one) or a step fails.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let queue = format!("amqp-sidecar-demo-{}", std::process::id());
    let conn = Connection::connect(&args.url, ConnectionProperties::default())
        .await
        .with_context(|| {
            format!(
                "cannot reach RabbitMQ at {} (start it with `rabbitmq-server -detached && rabbitmqctl await_startup`, \
                 or `docker compose up -d rabbitmq`)",
                crate::config::redact_url(&args.url)
            )
        })?;
    let succeeded = Arc::new(Mutex::new(HashSet::new()));
    let spec = [
        ("fast", 5, 4, 0.0),
        ("medium", 20, 2, 0.0),
        ("slow-flaky", 60, 2, 0.15),
    ];
    let mut workers = Vec::new();
    let mut backends = Vec::new();
    let mut servers = Vec::new();
    for (name, ms, capacity, failure_rate) in spec {
        let w = Arc::new(Worker {
            name,
            latency: Duration::from_millis(ms),
            capacity,
            failure_rate,
            requests: AtomicU64::new(0),
            ok: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            succeeded: Arc::clone(&succeeded),
        });
        let (addr, server) = serve(Arc::clone(&w), SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        servers.push((addr, server));
        backends.push(BackendConfig {
            name: Some(name.to_owned()),
            max_in_flight: capacity.into(),
            timeout_ms: 5_000,
            ..BackendConfig::new(format!("http://{addr}/"))
        });
        workers.push(w);
    }

    let mut cfg = Config::default();
    cfg.amqp.url = args.url.clone();
    cfg.amqp.queue = queue.clone();
    cfg.backends = backends;
    cfg.balancer = args.balancer;
    cfg.retry.max_attempts = 4;
    cfg.retry.backoff_initial_ms = 20;
    cfg.retry.backoff_max_ms = 200;
    cfg.admin.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    cfg.shutdown.grace_ms = 5_000;
    let cfg = cfg.validate().map_err(|e| anyhow::anyhow!("{e}"))?;

    crate::amqp::topology::ensure(&conn, &cfg).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let (mut rejected, mut exhausted) = (0u32, 0u32);
    println!(
        "publishing {} messages to quorum queue {queue} ...",
        args.messages
    );
    let mut confirms = Vec::with_capacity(args.messages as usize);
    for i in 0..args.messages {
        let body = if i % 100 == 37 {
            rejected += 1;
            format!("poison-4xx-{i}")
        } else if i % 250 == 111 {
            exhausted += 1;
            format!("poison-5xx-{i}")
        } else {
            format!("job-{i}")
        };
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(ShortString::from(format!("demo-{i}")))
            .with_content_type(ShortString::from("text/plain"));
        confirms.push(
            ch.basic_publish(
                ShortString::from(""),
                ShortString::from(queue.as_str()),
                BasicPublishOptions::default(),
                body.as_bytes(),
                props,
            )
            .await?,
        );
    }
    for c in confirms {
        c.await?;
    }

    let sidecar = Sidecar::bind(cfg.clone()).await?;
    let admin = sidecar.admin_addr();
    let stop = CancellationToken::new();
    let started = Instant::now();
    let running = tokio::spawn(sidecar.run(stop.clone()));
    println!("sidecar running (admin http://{admin}/metrics); consuming ...");

    let dlq = cfg.dead_letter.queue_for(&queue);
    let total = u64::from(args.messages);
    let deadline = Instant::now() + Duration::from_secs(300);
    let (mut done_ok, mut dead) = (0u64, 0u64);
    let mut restart: Option<tokio::task::JoinHandle<anyhow::Result<()>>> = None;
    while Instant::now() < deadline {
        done_ok = succeeded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len() as u64;
        dead = u64::from(
            ch.queue_declare(
                ShortString::from(dlq.as_str()),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?
            .message_count(),
        );
        if done_ok + dead >= total {
            break;
        }
        if restart.is_none() && done_ok >= total / 3 {
            // The `medium` worker restarts: down for a second, then back on its port.
            let (addr, server) = &servers[1];
            let (addr, medium) = (*addr, Arc::clone(&workers[1]));
            server.abort();
            println!(
                "restarting worker {} ({} of {total} done): down for {} s ...",
                medium.name,
                done_ok,
                RESTART_DOWNTIME.as_secs_f64()
            );
            restart = Some(tokio::spawn(async move {
                tokio::time::sleep(RESTART_DOWNTIME).await;
                let (_, server) = serve(medium, addr).await?;
                // Runs until the process exits, like the other workers.
                drop(server);
                Ok(())
            }));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if let Some(restart) = restart {
        restart.await??;
    }
    let elapsed = started.elapsed();
    stop.cancel();
    running.await??;

    let text = crate::metrics::install().render();
    let metric = |name: &str, reason: Option<&str>| {
        let mut labels = vec![("queue", queue.as_str())];
        labels.extend(reason.map(|r| ("reason", r)));
        crate::metrics::sample_sum(&text, name, &labels) as u64
    };
    println!();
    println!(
        "== amqp-sidecar demo: {} messages, balancer {} ==",
        args.messages,
        args.balancer.name()
    );
    println!(
        "{:<11} {:>8} {:>9} {:>7} {:>8} {:>9} {:>13}",
        "backend", "latency", "capacity", "share", "requests", "failures", "max in-flight"
    );
    let all: u64 = workers
        .iter()
        .map(|w| w.requests.load(Ordering::Relaxed))
        .sum();
    for w in &workers {
        let r = w.requests.load(Ordering::Relaxed);
        println!(
            "{:<11} {:>6}ms {:>9} {:>6.1}% {:>8} {:>9} {:>13}",
            w.name,
            w.latency.as_millis(),
            w.capacity,
            100.0 * r as f64 / all.max(1) as f64,
            r,
            w.failed.load(Ordering::Relaxed),
            w.max_in_flight.load(Ordering::SeqCst),
        );
    }
    println!();
    println!(
        "deliveries      {:>8}",
        metric(crate::metrics::DELIVERIES, None)
    );
    println!(
        "acked           {:>8}  (distinct messages processed: {done_ok})",
        metric(crate::metrics::ACKS, None)
    );
    println!(
        "retries         {:>8}  (requeued after a retryable failure, with backoff)",
        metric(crate::metrics::REQUEUES, None)
    );
    println!(
        "dead-lettered   {:>8}  (rejected: {}, expected {rejected}; retries_exhausted: {}, expected {exhausted}) -> {dlq}",
        dead,
        metric(crate::metrics::DEAD_LETTERS, Some("rejected")),
        metric(crate::metrics::DEAD_LETTERS, Some("retries_exhausted")),
    );
    println!(
        "lost            {:>8}",
        total.saturating_sub(done_ok + dead)
    );
    let planted = u64::from(rejected + exhausted);
    println!(
        "worker restart  {:>8}  requests to medium not delivered (refused while it restarted; not attempts); dead-lettered by the restart: {}",
        crate::metrics::sample_sum(
            &text,
            "amqp_sidecar_backend_requests_total",
            &[("backend", "medium"), ("outcome", "connect_error")]
        ),
        dead.saturating_sub(planted)
    );
    println!(
        "elapsed         {:>7.2}s  ({:.0} msg/s)",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64()
    );
    if let Some(msg) = ch
        .basic_get(
            ShortString::from(dlq.as_str()),
            BasicGetOptions { no_ack: true },
        )
        .await?
    {
        println!();
        println!("a dead-lettered message carries:");
        if let Some(h) = msg.delivery.properties.headers() {
            for (k, v) in h.inner() {
                if k.as_str().starts_with("x-sidecar-") {
                    println!("  {k}: {}", show(v));
                }
            }
        }
    }
    for q in [queue.as_str(), dlq.as_str()] {
        let _ = ch
            .queue_delete(ShortString::from(q), QueueDeleteOptions::default())
            .await;
    }
    let _ = ch
        .exchange_delete(
            ShortString::from(cfg.dead_letter.exchange_for(&queue)),
            lapin::options::ExchangeDeleteOptions::default(),
        )
        .await;
    let _ = conn.close(200, ShortString::from("demo done")).await;
    Ok(())
}

fn show(v: &AMQPValue) -> String {
    match v {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        other => format!("{other:?}"),
    }
}
