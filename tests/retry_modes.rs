//! Retries that never stall the pod (issue 16): `retry.mode: requeue` opens a consumer for
//! each delivery waiting out its backoff (bounded by `retry.max_waiting`), and
//! `retry.mode: delay_queue` lets the broker wait, in delay tiers, with the attempt count in
//! `x-sidecar-attempts`.

mod support;

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use amqp_sidecar::{
    amqp::delay::DelayTiers,
    config::{JitterKind, QueueType, RetryMode},
};
use lapin::{BasicProperties, options::QueueDeleteOptions, types::ShortString};
use support::*;

/// Publishes a message with `id` as its message-id and body.
async fn publish_id(conn: &lapin::Connection, queue: &str, id: &str) {
    publish(
        conn,
        queue,
        id.as_bytes(),
        BasicProperties::default().with_message_id(ShortString::from(id)),
    )
    .await;
}

/// The message-id of a recorded request (the sidecar forwards it as `X-Amqp-Message-Id`).
fn id_of(r: &Recorded) -> String {
    r.header("x-amqp-message-id").unwrap_or_default().to_owned()
}

/// Per message-id, the times its requests arrived, in order.
fn arrivals(worker: &Worker) -> HashMap<String, Vec<Instant>> {
    let mut by_id: HashMap<String, Vec<Instant>> = HashMap::new();
    for r in worker.requests() {
        by_id.entry(id_of(&r)).or_default().push(r.at);
    }
    by_id
}

/// The scenario: one worker slot, 50 good messages and 5 that always fail (503),
/// spread among them, default retry settings. The good ones must finish within 3× their
/// time alone (measured first, in the same test), and the failing ones must be
/// dead-lettered after exactly `max_attempts` attempts. Before the fix, each failing
/// message held the only prefetch slot for its whole backoff: 37.9–39.8 s against 0.3 s.
#[tokio::test]
async fn a_backoff_does_not_block_the_pod() {
    let conn = broker().await;
    let queue = unique("no-hol");
    let worker = Worker::builder()
        .latency(Duration::from_millis(20))
        .respond(|r, _| {
            if id_of(r).starts_with("bad-") {
                Reply::status(503)
            } else {
                Reply::status(200)
            }
        })
        .spawn()
        .await;
    let mut cfg = config(&queue, vec![backend(&worker, 1)]);
    cfg.amqp.queue_type = QueueType::Classic;
    // The default retry settings: 5 attempts, 1 s → 2 s → 4 s → 8 s, full jitter.
    cfg.retry = amqp_sidecar::config::RetryConfig::default();
    declare(&conn, &cfg).await;
    let sidecar = start(cfg.clone()).await;

    // Alone: 50 good messages.
    let started = Instant::now();
    for i in 0..50 {
        publish_id(&conn, &queue, &format!("alone-{i}")).await;
    }
    wait_until(
        "50 good messages alone",
        Duration::from_secs(30),
        || async { worker.succeeded().len() == 50 },
    )
    .await;
    let alone = started.elapsed();

    // Mixed: the same 50 with 5 failing ones spread among them.
    let started = Instant::now();
    for i in 0..55 {
        let id = if i % 11 == 5 {
            format!("bad-{i}")
        } else {
            format!("good-{i}")
        };
        publish_id(&conn, &queue, &id).await;
    }
    wait_until(
        "50 good messages among failing ones",
        Duration::from_secs(60),
        || async {
            worker
                .succeeded()
                .iter()
                .filter(|id| id.starts_with("good-"))
                .count()
                == 50
        },
    )
    .await;
    let mixed = started.elapsed();
    println!(
        "[no-hol] 50 good messages: alone {alone:?}, with 5 failing {mixed:?} ({:.2}x)",
        mixed.as_secs_f64() / alone.as_secs_f64()
    );
    assert!(
        mixed <= alone * 3,
        "the good messages took {mixed:?} among failing ones, against {alone:?} alone: more than 3x"
    );

    let dlq = cfg.dead_letter.queue_for(&queue);
    wait_until("5 dead-lettered", Duration::from_secs(60), || async {
        try_ready(&conn, &dlq).await == Some(5)
    })
    .await;
    sidecar.stop().await.expect("clean stop");
    for m in take_all(&conn, &dlq).await {
        assert_dead_letter_headers(&dead_letter_headers(&m), "retries_exhausted", 5, 503);
    }
    for (id, times) in arrivals(&worker) {
        if id.starts_with("bad-") {
            assert_eq!(times.len(), 5, "{id}: exactly max_attempts attempts");
        }
    }
    assert_eq!(ready(&conn, &queue).await, 0);
    cleanup(&conn, &cfg).await;
}

/// `retry.max_waiting` reached: a failing delivery is requeued without its backoff once,
/// counted in the metric, but never twice in a row (it then waits in place), so nothing
/// loops hot; and the consumers never exceed the slots plus `max_waiting`.
#[tokio::test]
async fn beyond_max_waiting_nothing_loops_hot() {
    let conn = broker().await;
    let queue = unique("max-waiting");
    let worker = Worker::builder()
        .latency(Duration::from_millis(5))
        .respond(|_, _| Reply::status(503))
        .spawn()
        .await;
    let mut cfg = config(&queue, vec![backend(&worker, 1)]);
    cfg.amqp.queue_type = QueueType::Classic;
    cfg.retry.max_attempts = 4;
    cfg.retry.backoff_initial_ms = 300;
    cfg.retry.backoff_max_ms = 600;
    // Equal jitter: every backoff is at least 150 ms, so a gap under 50 ms is a skip.
    cfg.retry.jitter = JitterKind::Equal;
    cfg.retry.max_waiting = Some(1);
    declare(&conn, &cfg).await;
    for i in 0..4 {
        publish_id(&conn, &queue, &format!("m-{i}")).await;
    }
    let process = spawn_binary(&cfg);
    process.wait_ready().await;
    let dlq = cfg.dead_letter.queue_for(&queue);
    let mut most_consumers = 0.0f64;
    let deadline = Instant::now() + Duration::from_secs(60);
    while try_ready(&conn, &dlq).await != Some(4) {
        assert!(Instant::now() < deadline, "4 dead-letters within 60 s");
        most_consumers = most_consumers.max(process.metric("amqp_sidecar_consumers", &[]).await);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let skipped = process
        .metric("amqp_sidecar_retry_backoff_skipped_total", &[])
        .await;
    drop(process);
    assert!(skipped >= 1.0, "the bound was reached: {skipped} skips");
    assert!(
        most_consumers <= 2.0,
        "consumers never exceed 1 slot + max_waiting 1: saw {most_consumers}"
    );
    let quick = Duration::from_millis(50);
    for (id, times) in arrivals(&worker) {
        assert_eq!(times.len(), 4, "{id}: max_attempts attempts");
        let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
        for pair in gaps.windows(2) {
            assert!(
                !(pair[0] < quick && pair[1] < quick),
                "{id} was requeued without a backoff twice in a row: gaps {gaps:?}"
            );
        }
        // No hot loop: at most 2 attempts within any 100 ms.
        for w in times.windows(3) {
            assert!(
                w[2] - w[0] >= Duration::from_millis(100),
                "{id}: 3 attempts within 100 ms: gaps {gaps:?}"
            );
        }
    }
    cleanup(&conn, &cfg).await;
}

/// A config in `delay_queue` mode on a classic queue.
fn delay_config(
    queue: &str,
    worker: &Worker,
    max_attempts: u32,
    initial_ms: u64,
) -> amqp_sidecar::Config {
    let mut cfg = config(queue, vec![backend(worker, 2)]);
    cfg.amqp.queue_type = QueueType::Classic;
    cfg.retry.mode = RetryMode::DelayQueue;
    cfg.retry.max_attempts = max_attempts;
    cfg.retry.backoff_initial_ms = initial_ms;
    cfg.retry.backoff_max_ms = initial_ms * 4;
    cfg
}

/// The attempt numbers the worker saw, per message-id, in order.
fn attempts_seen(worker: &Worker) -> HashMap<String, Vec<String>> {
    let mut by_id: HashMap<String, Vec<String>> = HashMap::new();
    for r in worker.requests() {
        by_id
            .entry(id_of(&r))
            .or_default()
            .push(r.header("x-amqp-attempt").unwrap_or_default().to_owned());
    }
    by_id
}

/// `delay_queue` on a classic queue: a message fails twice and succeeds on attempt 3, while
/// the sidecar is restarted between attempts 1 and 2 and a second sidecar process (another
/// pod) consumes the same queue. The count travels with the message, so the worker sees
/// attempts 1, 2, 3 exactly (a classic queue's local count would restart at 1).
#[tokio::test]
async fn delay_queue_counts_exactly_across_restarts_and_pods() {
    let conn = broker().await;
    let queue = unique("delay-exact");
    let worker = Worker::builder()
        .respond(|r, _| match r.header("x-amqp-attempt") {
            Some("1" | "2") => Reply::status(503),
            _ => Reply::status(200),
        })
        .spawn()
        .await;
    // Attempt 1's copy waits 1.5 s in the first tier: time to restart.
    let cfg = delay_config(&queue, &worker, 5, 1_500);
    declare(&conn, &cfg).await;
    let mut first = spawn_binary(&cfg);
    first.wait_ready().await;
    publish_id(&conn, &queue, "m-0").await;
    wait_until("attempt 1", Duration::from_secs(20), || async {
        worker.count() == 1
    })
    .await;
    let tiers = DelayTiers::new(&cfg).expect("delay mode");
    let first_tier = tiers.tiers()[0].name.clone();
    wait_until(
        "the copy in the first tier",
        Duration::from_secs(5),
        || async { try_ready(&conn, &first_tier).await == Some(1) },
    )
    .await;
    assert_eq!(ready(&conn, &queue).await, 0, "the original was acked");
    // Restart: stop the first process, start it again and a second one beside it.
    first.signal("TERM");
    assert!(first.wait(Duration::from_secs(20)).await.success());
    let again = spawn_binary(&cfg);
    let other = spawn_binary(&cfg);
    again.wait_ready().await;
    other.wait_ready().await;
    wait_until("attempt 3 succeeds", Duration::from_secs(30), || async {
        worker.succeeded().len() == 1
    })
    .await;
    drop(again);
    drop(other);
    assert_eq!(
        attempts_seen(&worker)
            .get("m-0")
            .cloned()
            .unwrap_or_default(),
        ["1", "2", "3"],
        "the worker sees X-Amqp-Attempt 1, 2, 3"
    );
    let dlq = cfg.dead_letter.queue_for(&queue);
    assert_eq!(ready(&conn, &dlq).await, 0, "nothing dead-lettered");
    assert_eq!(ready(&conn, &queue).await, 0);
    for t in tiers.tiers() {
        assert_eq!(ready(&conn, &t.name).await, 0, "{} empty", t.name);
    }
    cleanup(&conn, &cfg).await;
}

/// `delay_queue`, every attempt failing: dead-lettered with `x-sidecar-attempts` =
/// `max_attempts`, after exactly that many attempts.
#[tokio::test]
async fn delay_queue_exhausted_dead_letters_with_the_full_count() {
    let conn = broker().await;
    let queue = unique("delay-exhausted");
    let worker = Worker::builder()
        .respond(|_, _| Reply::status(503))
        .spawn()
        .await;
    let cfg = delay_config(&queue, &worker, 3, 50);
    declare(&conn, &cfg).await;
    let sidecar = start(cfg.clone()).await;
    publish_id(&conn, &queue, "m-0").await;
    let dlq = cfg.dead_letter.queue_for(&queue);
    wait_until("dead-lettered", Duration::from_secs(30), || async {
        try_ready(&conn, &dlq).await == Some(1)
    })
    .await;
    sidecar.stop().await.expect("clean stop");
    let dead = take_all(&conn, &dlq).await;
    assert_dead_letter_headers(&dead_letter_headers(&dead[0]), "retries_exhausted", 3, 503);
    assert_eq!(
        attempts_seen(&worker)
            .get("m-0")
            .cloned()
            .unwrap_or_default(),
        ["1", "2", "3"]
    );
    cleanup(&conn, &cfg).await;
}

/// `delay_queue` with its tier deleted under it: the delay publish comes back unroutable,
/// and the original is requeued (with the sidecar's backoff), never acked without a
/// confirmed copy. With `max_attempts: 2` there is one tier, so every retry needs it; the
/// message ends in the DLQ after its 2 attempts, not lost.
#[tokio::test]
async fn delay_queue_with_a_missing_tier_never_acks_without_a_copy() {
    let conn = broker().await;
    let queue = unique("delay-missing");
    let worker = Worker::builder()
        .respond(|_, _| Reply::status(503))
        .spawn()
        .await;
    let cfg = delay_config(&queue, &worker, 2, 100);
    declare(&conn, &cfg).await;
    let tiers = DelayTiers::new(&cfg).expect("delay mode");
    assert_eq!(tiers.tiers().len(), 1);
    let process = spawn_binary(&cfg);
    process.wait_ready().await;
    // The sidecar declared its tier at connect; delete it now.
    let ch = conn.create_channel().await.expect("channel");
    ch.queue_delete(
        ShortString::from(tiers.tiers()[0].name.as_str()),
        QueueDeleteOptions::default(),
    )
    .await
    .expect("delete tier");
    publish_id(&conn, &queue, "m-0").await;
    let dlq = cfg.dead_letter.queue_for(&queue);
    wait_until(
        "dead-lettered after 2 attempts",
        Duration::from_secs(30),
        || async { try_ready(&conn, &dlq).await == Some(1) },
    )
    .await;
    let failures = process
        .metric("amqp_sidecar_delay_failures_total", &[("queue", &queue)])
        .await;
    let delayed = process
        .metric("amqp_sidecar_delayed_total", &[("queue", &queue)])
        .await;
    let log = process.log();
    drop(process);
    assert_eq!(failures, 1.0, "attempt 1's copy could not be stored");
    assert_eq!(delayed, 0.0, "nothing acked as delayed");
    assert!(
        log.contains("no queue named"),
        "the log names the missing tier:\n{log}"
    );
    let dead = take_all(&conn, &dlq).await;
    assert_dead_letter_headers(&dead_letter_headers(&dead[0]), "retries_exhausted", 2, 503);
    assert_eq!(worker.count(), 2);
    cleanup(&conn, &cfg).await;
}

/// `delay_queue` under `kill -9`: a sidecar killed while failing messages go through the
/// delay tiers (some between publishing a copy and acking its original) loses nothing; at
/// most a message is processed twice.
#[tokio::test]
async fn delay_queue_survives_kill_9() {
    let conn = broker().await;
    let queue = unique("delay-kill");
    // Every third message fails its first attempt.
    let worker = Worker::builder()
        .latency(Duration::from_millis(2))
        .respond(|r, _| {
            let n: usize = id_of(r)
                .trim_start_matches("m-")
                .parse()
                .unwrap_or_default();
            if n % 3 == 0 && r.header("x-amqp-attempt") == Some("1") {
                Reply::status(503)
            } else {
                Reply::status(200)
            }
        })
        .spawn()
        .await;
    let cfg = delay_config(&queue, &worker, 5, 100);
    declare(&conn, &cfg).await;
    let n = 600;
    publish_n(&conn, &queue, n).await;
    let process = spawn_binary(&cfg);
    process.wait_ready().await;
    wait_until("a third of the run", Duration::from_secs(30), || async {
        worker.count() >= n / 3
    })
    .await;
    process.signal("KILL");
    drop(process);
    let again = spawn_binary(&cfg);
    again.wait_ready().await;
    wait_until(
        "every message answered 2xx",
        Duration::from_secs(60),
        || async {
            let ids: HashSet<String> = worker.succeeded().into_iter().collect();
            ids.len() == n
        },
    )
    .await;
    drop(again);
    let accounting = account(&conn, &cfg, n, &[&worker]).await;
    accounting.assert_no_loss("delay_queue kill -9");
    assert_eq!(accounting.dead_lettered, 0);
    cleanup(&conn, &cfg).await;
}

/// A delay tier declared with other arguments is a topology error that names the argument
/// and the fix.
#[tokio::test]
async fn a_mismatched_tier_names_the_argument_and_the_fix() {
    let conn = broker().await;
    let queue = unique("delay-mismatch");
    let worker = Worker::builder().spawn().await;
    let cfg = delay_config(&queue, &worker, 3, 100);
    let tiers = DelayTiers::new(&cfg).expect("delay mode");
    let ch = conn.create_channel().await.expect("channel");
    // The first tier exists as a plain classic queue.
    ch.queue_declare(
        ShortString::from(tiers.tiers()[0].name.as_str()),
        lapin::options::QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        lapin::types::FieldTable::default(),
    )
    .await
    .expect("declare");
    let err = amqp_sidecar::amqp::topology::ensure(&conn, &cfg)
        .await
        .expect_err("mismatch");
    let text = err.to_string();
    assert!(err.is_permanent());
    assert!(text.contains("delay queue"), "{text}");
    assert!(text.contains(&tiers.tiers()[0].name), "{text}");
    assert!(text.contains("x-"), "names the argument: {text}");
    assert!(text.contains("Fix: delete it"), "{text}");
    // declare: false checks the tiers passively: a missing tier is named.
    let mut passive = cfg.clone();
    passive.amqp.declare = false;
    let ch = conn.create_channel().await.expect("channel");
    ch.queue_delete(
        ShortString::from(tiers.tiers()[0].name.as_str()),
        QueueDeleteOptions::default(),
    )
    .await
    .expect("delete");
    declare_without_tiers(&conn, &cfg).await;
    let err = amqp_sidecar::amqp::topology::ensure(&conn, &passive)
        .await
        .expect_err("missing tier");
    let text = err.to_string();
    assert!(text.contains(&tiers.tiers()[0].name), "{text}");
    assert!(text.contains("does not exist"), "{text}");
    cleanup(&conn, &cfg).await;
}

/// Declares the queue, DLX and DLQ of `cfg`, but no delay tiers.
async fn declare_without_tiers(conn: &lapin::Connection, cfg: &amqp_sidecar::Config) {
    let mut requeue = cfg.clone();
    requeue.retry.mode = RetryMode::Requeue;
    declare(conn, &requeue).await;
}
