//! Adaptive concurrency and lookahead (issue 13) against the real broker and real HTTP
//! workers: `max_in_flight: auto` learns a worker's hidden capacity from its latency, and
//! `amqp.consumers: 0` adds a lookahead sized from the delivery rate and the broker's round
//! trip, bounded by `amqp.max_lookahead`.

mod support;

use std::time::{Duration, Instant};

use amqp_sidecar::config::{BackendConfig, MaxInFlight, QueueType};
use support::*;

/// A worker with 3 internal slots (10 ms each; requests beyond 3 queue inside it) behind
/// `max_in_flight: auto`: the learned limit settles between 2 and 5, and nothing is lost.
/// The worker gets threads of its own, so the test's polling does not slow it down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_learns_a_worker_with_three_slots() {
    let conn = broker().await;
    let queue = unique("auto-limit");
    let worker = Worker::builder()
        .slots(3)
        .latency(Duration::from_millis(10))
        .spawn()
        .await;
    let mut cfg = config(
        &queue,
        vec![BackendConfig {
            max_in_flight: MaxInFlight::Auto,
            timeout_ms: 5_000,
            name: Some("three-slots".into()),
            ..BackendConfig::new(worker.url())
        }],
    );
    cfg.amqp.queue_type = QueueType::Classic;
    declare(&conn, &cfg).await;
    let n = 1_500;
    publish_n(&conn, &queue, n).await;
    let process = spawn_binary_with_env(
        &cfg,
        &[("RUST_LOG", "amqp_sidecar=info,amqp_sidecar::balance=debug")],
    );
    process.wait_ready().await;
    let limit = [("backend", "three-slots")];
    // Sample the learned limit through the second half of the run.
    let mut samples = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let done = worker.succeeded().len();
        if done >= n {
            break;
        }
        if done >= n / 2 {
            samples.push(process.metric("amqp_sidecar_backend_limit", &limit).await);
        }
        assert!(
            Instant::now() < deadline,
            "all answered within 60 s: {done}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let settled = process.metric("amqp_sidecar_backend_limit", &limit).await;
    let changes = process
        .log()
        .lines()
        .filter(|l| l.contains("concurrency limit changed"))
        .count();
    println!("[auto] {changes} limit changes");
    drop(process);
    println!(
        "[auto] learned limit at the end {settled}, through the second half {samples:?}, worker saw at most {} at once",
        worker.max_in_flight()
    );
    assert!(
        (2.0..=5.0).contains(&settled),
        "the learned limit settles between 2 and 5: {settled}"
    );
    let within = samples.iter().filter(|l| (2.0..=5.0).contains(*l)).count();
    assert!(
        within * 10 >= samples.len() * 9,
        "the limit stays within 2..=5 through the second half: {samples:?}"
    );
    account(&conn, &cfg, n, &[&worker])
        .await
        .assert_no_loss("auto limit");
    cleanup(&conn, &cfg).await;
}

/// Slow workers (1 s each): the lookahead stays at 0 or 1, and the sidecar holds at most
/// the slots plus 1 deliveries unacked.
#[tokio::test]
async fn slow_workers_get_no_more_than_one_lookahead() {
    let conn = broker().await;
    let queue = unique("lookahead-slow");
    let worker = Worker::builder()
        .latency(Duration::from_secs(1))
        .spawn()
        .await;
    let mut cfg = config(&queue, vec![backend(&worker, 2)]);
    cfg.amqp.queue_type = QueueType::Classic;
    declare(&conn, &cfg).await;
    publish_n(&conn, &queue, 12).await;
    let process = spawn_binary(&cfg);
    process.wait_ready().await;
    let (mut most_lookahead, mut most_unacked) = (0.0f64, 0usize);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        most_lookahead = most_lookahead.max(process.metric("amqp_sidecar_lookahead", &[]).await);
        let ready = try_ready(&conn, &queue).await.unwrap_or(0) as usize;
        let answered = worker.succeeded().len();
        // Neither ready nor answered: held by the sidecar (unacked).
        most_unacked = most_unacked.max(12usize.saturating_sub(ready + answered));
        if answered == 12 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "12 answered within 30 s: {answered}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(process);
    println!(
        "[lookahead] slow workers: lookahead at most {most_lookahead}, held at most {most_unacked}"
    );
    assert!(most_lookahead <= 1.0, "lookahead {most_lookahead}");
    assert!(most_unacked <= 3, "held {most_unacked} > 2 slots + 1");
    cleanup(&conn, &cfg).await;
}

/// Fast workers: a lookahead above 0 is opened (the gauge and the consumer count show it),
/// and never more than `amqp.max_lookahead`.
#[tokio::test]
async fn fast_workers_get_a_bounded_lookahead() {
    let conn = broker().await;
    let queue = unique("lookahead-fast");
    let mut workers = Vec::new();
    for _ in 0..4 {
        workers.push(Worker::builder().spawn().await);
    }
    let mut cfg = config(&queue, workers.iter().map(|w| backend(w, 1)).collect());
    cfg.amqp.queue_type = QueueType::Classic;
    cfg.amqp.max_lookahead = Some(2);
    declare(&conn, &cfg).await;
    let n = 5_000;
    publish_n(&conn, &queue, n).await;
    let process = spawn_binary(&cfg);
    process.wait_ready().await;
    let (mut most_lookahead, mut most_consumers) = (0.0f64, 0.0f64);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        most_lookahead = most_lookahead.max(process.metric("amqp_sidecar_lookahead", &[]).await);
        most_consumers = most_consumers.max(process.metric("amqp_sidecar_consumers", &[]).await);
        let answered: usize = workers.iter().map(|w| w.succeeded().len()).sum();
        if answered >= n {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "all answered within 60 s: {answered}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(process);
    println!(
        "[lookahead] fast workers: lookahead at most {most_lookahead}, consumers at most {most_consumers}"
    );
    assert!(most_lookahead >= 1.0, "a lookahead was opened");
    assert!(
        most_lookahead <= 2.0,
        "bounded by max_lookahead: {most_lookahead}"
    );
    assert!(most_consumers <= 6.0, "4 slots + 2: {most_consumers}");
    let refs: Vec<&Worker> = workers.iter().collect();
    account(&conn, &cfg, n, &refs)
        .await
        .assert_no_loss("lookahead");
    cleanup(&conn, &cfg).await;
}
