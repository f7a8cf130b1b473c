//! The backend pool: every strategy's spread and bound, the mixed-speed makespan, a slow
//! backend's share, `max_in_flight` reached but never exceeded, active health checks,
//! passive ejection, and pausing consumption when no backend can work.

mod support;

use std::time::{Duration, Instant};

use amqp_sidecar::config::{BalancerKind, QueueType};
use support::*;

/// Health checks every 50 ms on /healthz, flipping after 2 results in a row.
fn fast_health_checks(cfg: &mut amqp_sidecar::Config) {
    cfg.health.path = Some("/healthz".into());
    cfg.health.interval_ms = 50;
    cfg.health.timeout_ms = 50;
    cfg.health.unhealthy_threshold = 2;
    cfg.health.healthy_threshold = 2;
}

/// Runs `n` messages over workers with the given `(latency ms, max_in_flight, weight)`;
/// returns per-worker counts, per-worker peak concurrency, and the makespan.
async fn run(
    balancer: BalancerKind,
    spec: &[(u64, u32, u32)],
    consumers: u32,
    n: usize,
) -> (Vec<usize>, Vec<usize>, Duration) {
    let conn = broker().await;
    let queue = unique(balancer.name());
    let latencies: Vec<u64> = spec.iter().map(|&(ms, _, _)| ms).collect();
    let workers = workers_with_latency(&latencies).await;
    let backends = workers
        .iter()
        .zip(spec)
        .map(
            |(w, &(_, max, weight))| amqp_sidecar::config::BackendConfig {
                weight,
                ..backend(w, max)
            },
        )
        .collect();
    let mut cfg = config(&queue, backends);
    cfg.amqp.consumers = consumers;
    cfg.balancer = balancer;
    declare(&conn, &cfg).await;
    publish_n(&conn, &queue, n).await;
    let sidecar = start(cfg.clone()).await;
    wait_until("all acked", Duration::from_secs(120), || async {
        workers.iter().map(Worker::count).sum::<usize>() >= n
            && sidecar
                .metric("amqp_sidecar_acks_total", &[("queue", &queue)])
                .await
                == n as f64
    })
    .await;
    // From the first request any backend received to the last acked (within the 20 ms poll).
    let first = workers
        .iter()
        .filter_map(|w| w.requests().first().map(|r| r.at))
        .min()
        .expect("requests");
    let makespan = first.elapsed();
    sidecar.stop().await.expect("clean stop");
    cleanup(&conn, &cfg).await;
    (
        workers.iter().map(Worker::count).collect(),
        workers.iter().map(Worker::max_in_flight).collect(),
        makespan,
    )
}

#[tokio::test]
async fn each_strategy_spreads_1000_messages_as_it_should() {
    // Weights 1, 1, 2, 4; every backend may take 8 at once; 8 consumers; 1 ms service time.
    let spec = [(1, 8, 1), (1, 8, 1), (1, 8, 2), (1, 8, 4)];
    const N: usize = 1000;
    for balancer in BalancerKind::ALL {
        let (counts, peaks, took) = run(balancer, &spec, 8, N).await;
        println!(
            "{:<21} counts {counts:?} peaks {peaks:?} in {took:?}",
            balancer.name()
        );
        assert_eq!(
            counts.iter().sum::<usize>(),
            N,
            "{balancer:?}: every message once"
        );
        for (i, (&peak, &(_, max, _))) in peaks.iter().zip(&spec).enumerate() {
            assert!(
                peak <= max as usize,
                "{balancer:?}: backend {i} peaked at {peak} > {max}"
            );
        }
        match balancer {
            // Strict round robin ignores weights: exactly a quarter each.
            BalancerKind::RoundRobin => assert_eq!(counts, [250, 250, 250, 250]),
            // Smooth WRR: exactly proportional to 1:1:2:4.
            BalancerKind::WeightedRoundRobin => assert_eq!(counts, [125, 125, 250, 500]),
            // Uniform: 250 ± 6σ (σ ≈ 13.7).
            BalancerKind::Random => {
                assert!(counts.iter().all(|c| (170..=330).contains(c)), "{counts:?}")
            }
            // Load-aware and weight-normalised: every backend works, and the weight-4
            // backend takes more than either weight-1 backend.
            BalancerKind::LeastInFlight | BalancerKind::PowerOfTwo => {
                assert!(counts.iter().all(|&c| c >= 50), "{balancer:?}: {counts:?}");
                assert!(
                    counts[3] > counts[0] && counts[3] > counts[1],
                    "{balancer:?}: {counts:?}"
                );
            }
        }
    }
}

#[tokio::test]
async fn load_aware_strategies_beat_round_robin_on_a_mixed_speed_workload() {
    // Service times 2, 2, 10 and 30 ms, one request at a time each.
    let spec = [(2, 1, 1), (2, 1, 1), (10, 1, 1), (30, 1, 1)];
    const N: usize = 300;
    let fluid = Duration::from_secs_f64(
        N as f64 / (1.0 / 2.0 + 1.0 / 2.0 + 1.0 / 10.0 + 1.0 / 30.0) / 1000.0,
    );
    let mut results = Vec::new();
    for balancer in [
        BalancerKind::LeastInFlight,
        BalancerKind::PowerOfTwo,
        BalancerKind::RoundRobin,
    ] {
        let (counts, _, took) = run(balancer, &spec, 4, N).await;
        println!(
            "{:<16} makespan {took:>10.2?} ({:.2}× the fluid bound {fluid:.2?}), counts {counts:?}",
            balancer.name(),
            took.as_secs_f64() / fluid.as_secs_f64()
        );
        results.push(took);
    }
    let (lif, p2c, rr) = (results[0], results[1], results[2]);
    // Round robin gives the 30 ms backend a quarter of the work: at least N/4 × 30 ms.
    assert!(
        rr >= Duration::from_millis(N as u64 / 4 * 30),
        "round robin {rr:?}"
    );
    assert!(
        lif.as_secs_f64() < 0.6 * rr.as_secs_f64(),
        "least_in_flight {lif:?} vs round_robin {rr:?}"
    );
    assert!(
        p2c.as_secs_f64() < 0.6 * rr.as_secs_f64(),
        "power_of_two {p2c:?} vs round_robin {rr:?}"
    );
}

/// A fast (2 ms) and a slow (60 ms) backend, 4 slots each, 4 consumers, so every delivery
/// has a choice: round robin gives the slow backend about half, shortest queue little.
#[tokio::test]
async fn shortest_queue_sends_a_slow_backend_far_less_than_round_robin() {
    const N: usize = 200;
    let spec = [(2, 4, 1), (60, 4, 1)];
    let (jsq, _, jsq_time) = run(BalancerKind::LeastInFlight, &spec, 4, N).await;
    let (rr, _, rr_time) = run(BalancerKind::RoundRobin, &spec, 4, N).await;
    println!("least_in_flight: {jsq:?} in {jsq_time:?}; round_robin: {rr:?} in {rr_time:?}");
    // The fast backend's queue empties 30× sooner.
    assert!(
        rr[1] * 10 >= N * 4,
        "round robin gives the slow backend ~half ({}/{N})",
        rr[1]
    );
    assert!(
        jsq[1] * 5 <= N,
        "least_in_flight gives the slow backend at most 20% ({}/{N})",
        jsq[1]
    );
    assert!(
        jsq[1] * 2 < rr[1],
        "least_in_flight sends the slow backend far fewer ({} vs {})",
        jsq[1],
        rr[1]
    );
    assert!(
        jsq_time < rr_time,
        "least_in_flight finishes sooner ({jsq_time:?} vs {rr_time:?})"
    );
}

/// With more consumers than slots, every backend reaches its own `max_in_flight` and never
/// goes past it, and its in-flight gauge is back to 0 once all is acked.
#[tokio::test]
async fn no_backend_ever_exceeds_max_in_flight() {
    let conn = broker().await;
    let queue = unique("max-in-flight");
    let workers = workers_with_latency(&[15, 15, 15]).await;
    let limits = [1u32, 2, 3];
    let backends = workers
        .iter()
        .zip(limits)
        .map(|(w, l)| backend(w, l))
        .collect();
    let mut cfg = config(&queue, backends);
    // More consumers than total capacity (6): deliveries must wait for a free slot.
    cfg.amqp.consumers = 10;
    cfg.amqp.prefetch = 2;
    declare(&conn, &cfg).await;
    const N: usize = 240;
    publish_n(&conn, &queue, N).await;
    let sidecar = start(cfg.clone()).await;
    wait_until("all acked", Duration::from_secs(60), || async {
        sidecar
            .metric("amqp_sidecar_acks_total", &[("queue", &queue)])
            .await
            == N as f64
    })
    .await;
    for (w, limit) in workers.iter().zip(limits) {
        assert!(
            w.max_in_flight() <= limit as usize,
            "backend with max_in_flight {limit} saw {} concurrent requests",
            w.max_in_flight()
        );
        assert_eq!(
            w.max_in_flight(),
            limit as usize,
            "the limit was reached, so the bound was exercised"
        );
    }
    let in_flight = sidecar.metric("amqp_sidecar_backend_in_flight", &[]).await;
    let text = sidecar.metrics().await;
    for w in &workers {
        assert_eq!(
            metric_value(
                &text,
                "amqp_sidecar_backend_in_flight",
                &[("backend", &w.addr.to_string())]
            ),
            0.0,
            "in-flight gauge back to 0 (all gauges: {in_flight})"
        );
    }
    sidecar.stop().await.expect("clean stop");
    cleanup(&conn, &cfg).await;
}

#[tokio::test]
async fn a_backend_failing_health_checks_gets_no_traffic_until_it_passes() {
    let conn = broker().await;
    let queue = unique("health");
    let workers = workers_with_latency(&[5, 5]).await;
    let (a, b) = (&workers[0], &workers[1]);
    let mut cfg = config(&queue, vec![backend(a, 2), backend(b, 2)]);
    fast_health_checks(&mut cfg);
    declare(&conn, &cfg).await;
    let sidecar = start(cfg.clone()).await;
    let healthy = |w: &Worker| {
        let label = w.addr.to_string();
        let admin = sidecar.admin;
        async move {
            let text = http()
                .get(format!("http://{admin}/metrics"))
                .send()
                .await
                .expect("metrics")
                .text()
                .await
                .expect("body");
            metric_value(
                &text,
                "amqp_sidecar_backend_healthy",
                &[("backend", &label)],
            )
        }
    };
    a.set_health(503);
    wait_until("a marked unhealthy", Duration::from_secs(10), || async {
        healthy(a).await == 0.0
    })
    .await;
    publish_n(&conn, &queue, 40).await;
    wait_until("40 processed", Duration::from_secs(20), || async {
        b.succeeded().len() == 40
    })
    .await;
    assert_eq!(a.count(), 0, "an unhealthy backend gets no traffic");
    a.set_health(200);
    wait_until("a healthy again", Duration::from_secs(10), || async {
        healthy(a).await == 1.0
    })
    .await;
    publish_n(&conn, &queue, 40).await;
    wait_until("40 more processed", Duration::from_secs(20), || async {
        a.count() + b.count() == 80
    })
    .await;
    assert!(a.count() > 0, "traffic returns once it passes");
    sidecar.stop().await.expect("clean stop");
    cleanup(&conn, &cfg).await;
}

#[tokio::test]
async fn a_failing_backend_is_ejected_and_then_returns() {
    let conn = broker().await;
    let queue = unique("ejection");
    let failing = Worker::builder()
        .respond(|_, _| Reply::status(500))
        .spawn()
        .await;
    let steady = Worker::builder()
        .latency(Duration::from_millis(10))
        .spawn()
        .await;
    let mut cfg = config(&queue, vec![backend(&failing, 1), backend(&steady, 1)]);
    cfg.ejection.consecutive_failures = 3;
    cfg.ejection.base_ms = 600;
    cfg.ejection.max_ms = 600;
    cfg.retry.max_attempts = 20;
    declare(&conn, &cfg).await;
    const N: usize = 200;
    publish_n(&conn, &queue, N).await;
    let sidecar = start(cfg.clone()).await;
    let label = failing.addr.to_string();
    wait_until("ejected twice", Duration::from_secs(30), || async {
        sidecar
            .metric(
                "amqp_sidecar_backend_ejections_total",
                &[("backend", &label)],
            )
            .await
            >= 2.0
    })
    .await;
    wait_until("all processed", Duration::from_secs(60), || async {
        steady.succeeded().len() >= N
    })
    .await;
    // Between ejections the failing backend gets traffic again; during one it gets none:
    // some gap between its requests is at least the ejection time.
    let times: Vec<Instant> = failing.requests().iter().map(|r| r.at).collect();
    let longest = times
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    assert!(
        times.len() >= 6,
        "it came back after its first ejection ({} requests)",
        times.len()
    );
    assert!(
        longest >= Duration::from_millis(550),
        "an ejection kept it idle (longest gap {longest:?})"
    );
    sidecar.stop().await.expect("clean stop");
    let acc = account(&conn, &cfg, N, &[&failing, &steady]).await;
    acc.assert_no_loss("ejection");
    cleanup(&conn, &cfg).await;
}

/// `amqp_sidecar_paused` is one gauge for the whole process: the two tests that pause a
/// sidecar take turns, so each can read it.
static PAUSING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn paused_gauge() -> f64 {
    metric_value(
        &amqp_sidecar::metrics::install().render(),
        "amqp_sidecar_paused",
        &[],
    )
}

#[tokio::test]
async fn with_all_backends_down_the_sidecar_pauses_then_resumes() {
    let _turn = PAUSING.lock().await;
    let conn = broker().await;
    let queue = unique("pause");
    let workers = workers_with_latency(&[5, 5]).await;
    let (a, b) = (&workers[0], &workers[1]);
    let mut cfg = config(&queue, vec![backend(a, 2), backend(b, 2)]);
    fast_health_checks(&mut cfg);
    cfg.amqp.queue_type = QueueType::Classic;
    declare(&conn, &cfg).await;
    let sidecar = start(cfg.clone()).await;
    a.set_health(503);
    b.set_health(503);
    let down_at = Instant::now();
    wait_until("paused", Duration::from_secs(10), || async {
        sidecar.readiness().await["paused"] == true
    })
    .await;
    assert_eq!(paused_gauge(), 1.0, "amqp_sidecar_paused shows it");
    publish_n(&conn, &queue, 30).await;
    // Within 2 s of the backends going down: no consumer, nothing unacked.
    wait_until(
        "no consumer and nothing unacked",
        Duration::from_secs(2),
        || async {
            let out = rabbitmqctl(&[
                "-q",
                "list_queues",
                "name",
                "consumers",
                "messages_unacknowledged",
                "messages_ready",
            ]);
            out.lines().any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() == 4 && f[0] == queue && f[1] == "0" && f[2] == "0" && f[3] == "30"
            })
        },
    )
    .await;
    println!(
        "[pause] paused and empty-handed {:?} after the backends went down",
        down_at.elapsed()
    );
    let readyz = http()
        .get(format!("http://{}/readyz", sidecar.admin))
        .send()
        .await
        .expect("readyz");
    assert_eq!(readyz.status(), 503);
    assert!(readyz.text().await.expect("body").contains("paused"));
    // Another consumer on the same queue gets the messages meanwhile.
    let taken = take_n(&conn, &queue, 10).await;
    assert_eq!(
        taken, 10,
        "a second consumer gets the messages while the sidecar is paused"
    );
    assert_eq!(
        a.count() + b.count(),
        0,
        "no attempt was burned while paused"
    );
    a.set_health(200);
    wait_until("resumed and drained", Duration::from_secs(20), || async {
        a.succeeded().len() == 20 && ready(&conn, &queue).await == 0
    })
    .await;
    assert_eq!(sidecar.readiness().await["paused"], false);
    assert_eq!(paused_gauge(), 0.0, "amqp_sidecar_paused back to 0");
    sidecar.stop().await.expect("clean stop");
    cleanup(&conn, &cfg).await;
}

#[tokio::test]
async fn without_health_checks_a_paused_sidecar_probes_by_tcp_and_resumes() {
    let _turn = PAUSING.lock().await;
    let conn = broker().await;
    let queue = unique("probe");
    // On a port outside the ephemeral range, so it is still free when the worker comes back.
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let a = Worker::builder().on(addr).spawn().await;
    let mut cfg = config(&queue, vec![backend(&a, 2)]);
    cfg.ejection.consecutive_failures = 1;
    cfg.ejection.max_percent = 100;
    cfg.ejection.base_ms = 300_000;
    cfg.ejection.max_ms = 300_000;
    cfg.retry.max_attempts = 50;
    declare(&conn, &cfg).await;
    let sidecar = start(cfg.clone()).await;
    a.kill();
    publish_n(&conn, &queue, 5).await;
    wait_until(
        "paused after the backend was ejected",
        Duration::from_secs(10),
        || async { sidecar.readiness().await["paused"] == true },
    )
    .await;
    // The backend comes back on its port; the TCP probe readmits it long before the
    // 300 s ejection would end.
    let back = Worker::builder().on(addr).spawn().await;
    wait_until("resumed and drained", Duration::from_secs(20), || async {
        back.succeeded().len() == 5 && ready(&conn, &queue).await == 0
    })
    .await;
    sidecar.stop().await.expect("clean stop");
    let acc = account(&conn, &cfg, 5, &[&a, &back]).await;
    acc.assert_no_loss("probe");
    cleanup(&conn, &cfg).await;
}

/// One run of issue 17's scenario: two backends down at the start, no health checks,
/// ejection `{2, 1000 ms, 2000 ms, 100%}`, a classic queue, 200 messages; the workers start
/// `outage` later. Returns how long after the workers listened the first request reached
/// one of them.
async fn down_then_up(run: usize, outage: Duration) -> Duration {
    const N: usize = 200;
    let conn = broker().await;
    let queue = unique(&format!("down-up-{run}"));
    let addrs: Vec<std::net::SocketAddr> = (0..2)
        .map(|_| std::net::SocketAddr::from(([127, 0, 0, 1], free_port())))
        .collect();
    let backends = addrs
        .iter()
        .map(|a| amqp_sidecar::config::BackendConfig {
            max_in_flight: 1.into(),
            timeout_ms: 5_000,
            ..amqp_sidecar::config::BackendConfig::new(format!("http://{a}/"))
        })
        .collect();
    let mut cfg = config(&queue, backends);
    cfg.amqp.queue_type = QueueType::Classic;
    cfg.retry.max_attempts = 3;
    cfg.ejection = amqp_sidecar::config::EjectionConfig {
        consecutive_failures: 2,
        base_ms: 1_000,
        max_ms: 2_000,
        max_percent: 100,
    };
    declare(&conn, &cfg).await;
    publish_n(&conn, &queue, N).await;
    let sidecar = start_unready(cfg.clone()).await;
    wait_until("paused", Duration::from_secs(10), || async {
        sidecar.readiness().await["paused"] == true
    })
    .await;
    tokio::time::sleep(outage).await;
    let mut workers = Vec::new();
    for a in &addrs {
        workers.push(
            Worker::builder()
                .latency(Duration::from_millis(1))
                .on(*a)
                .spawn()
                .await,
        );
    }
    let listening = Instant::now();
    let all: Vec<&Worker> = workers.iter().collect();
    wait_until(
        &format!("run {run}: consumption resumed"),
        Duration::from_secs(10),
        || async { all.iter().any(|w| w.count() > 0) },
    )
    .await;
    let first = all
        .iter()
        .filter_map(|w| w.requests().first().map(|r| r.at))
        .min()
        .expect("a request");
    let resumed_after = first.saturating_duration_since(listening);
    wait_until(
        &format!("run {run}: queue drained"),
        Duration::from_secs(30),
        || async { ready(&conn, &queue).await == 0 && sidecar.readiness().await["ready"] == true },
    )
    .await;
    sidecar.stop().await.expect("clean stop");
    let acc = account(&conn, &cfg, N, &all).await;
    acc.assert_no_loss(&format!("down-then-up run {run}"));
    assert_eq!(acc.remaining, 0, "run {run}: everything was settled");
    cleanup(&conn, &cfg).await;
    resumed_after
}

/// Issue 17: a paused sidecar whose backends come back must resume, every time. 20 runs,
/// four at a time; each must resume within 2 s of its workers listening.
#[tokio::test]
async fn a_paused_sidecar_resumes_when_its_workers_come_back_20_runs() {
    let _turn = PAUSING.lock().await;
    let mut resumes = Vec::new();
    for round in 0..5 {
        let runs = (0..4).map(|k| {
            let run = round * 4 + k;
            // Workers come back at different points of the eject / expire / probe cycle.
            down_then_up(run, Duration::from_millis(2_000 + 400 * k as u64))
        });
        resumes.extend(futures_util::future::join_all(runs).await);
    }
    let ms: Vec<u128> = resumes.iter().map(Duration::as_millis).collect();
    println!("[down-then-up] resumed after the workers listened, ms: {ms:?}");
    assert_eq!(resumes.len(), 20);
    for (run, r) in resumes.iter().enumerate() {
        assert!(
            *r < Duration::from_secs(2),
            "run {run}: resumed {r:?} after the workers listened (want < 2 s)"
        );
    }
    assert_eq!(
        metric_value(
            &amqp_sidecar::metrics::install().render(),
            "amqp_sidecar_pause_self_corrections_total",
            &[],
        ),
        0.0,
        "the pause guard never had to step in"
    );
}
