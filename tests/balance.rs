//! Dispatch by shortest queue: least_in_flight against round_robin on backends of unequal
//! speed, and the max_in_flight bound.

mod support;

use std::time::{Duration, Instant};

use amqp_sidecar::config::BalancerKind;
use support::*;

/// Runs `n` messages over a fast (2 ms) and a slow (60 ms) backend, each allowed 4 requests
/// in flight, with 4 consumers: the sidecar can have 4 deliveries in flight, so every
/// delivery has a choice. Returns (fast count, slow count, elapsed).
async fn run_mixed(balancer: BalancerKind, n: usize) -> (usize, usize, Duration) {
    let conn = broker().await;
    let queue = unique("mixed");
    let fast = Worker::builder()
        .latency(Duration::from_millis(2))
        .spawn()
        .await;
    let slow = Worker::builder()
        .latency(Duration::from_millis(60))
        .spawn()
        .await;
    let mut cfg = config(&queue, vec![backend(&fast, 4), backend(&slow, 4)]);
    cfg.amqp.consumers = 4;
    cfg.balancer = balancer;
    declare(&conn, &cfg).await;
    publish_n(&conn, &queue, n).await;
    let started = Instant::now();
    let sidecar = start(cfg.clone()).await;
    wait_until("all acked", Duration::from_secs(60), || async {
        fast.count() + slow.count() >= n
            && sidecar
                .metric("amqp_sidecar_acks_total", &[("queue", &queue)])
                .await
                == n as f64
    })
    .await;
    let elapsed = started.elapsed();
    sidecar.stop().await.expect("clean stop");
    cleanup(&conn, &cfg).await;
    (fast.count(), slow.count(), elapsed)
}

#[tokio::test]
async fn shortest_queue_beats_round_robin_on_unequal_backends() {
    const N: usize = 200;
    let (jsq_fast, jsq_slow, jsq_time) = run_mixed(BalancerKind::LeastInFlight, N).await;
    let (rr_fast, rr_slow, rr_time) = run_mixed(BalancerKind::RoundRobin, N).await;
    println!("least_in_flight: fast {jsq_fast}, slow {jsq_slow}, {jsq_time:?}");
    println!("round_robin:     fast {rr_fast}, slow {rr_slow}, {rr_time:?}");
    // Round robin sends the slow backend about half; shortest-queue sends it little, since
    // the fast backend's queue empties 30× sooner.
    assert!(
        rr_slow * 10 >= N * 4,
        "round robin gives the slow backend ~half ({rr_slow}/{N})"
    );
    assert!(
        jsq_slow * 5 <= N,
        "least_in_flight gives the slow backend at most 20% ({jsq_slow}/{N})"
    );
    assert!(
        jsq_slow * 2 < rr_slow,
        "least_in_flight sends the slow backend far fewer"
    );
    assert!(
        jsq_time < rr_time,
        "least_in_flight finishes sooner ({jsq_time:?} vs {rr_time:?})"
    );
}

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
