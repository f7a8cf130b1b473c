//! Faults that touch only this test's own queues, processes and workers (so these run in
//! parallel): SIGTERM drain, drain deadline, SIGKILL, a backend killed mid-request, a
//! missing DLX, a deleted queue, poison input. Each ends with the accounting: published =
//! succeeded + dead-lettered + remaining, nothing lost, duplicates reported.

mod support;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use amqp_sidecar::config::QueueType;
use lapin::{
    BasicProperties, ExchangeKind,
    options::{
        ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeleteOptions,
    },
    types::{AMQPValue, FieldTable, ShortString},
};
use support::*;

fn metrics_now() -> String {
    amqp_sidecar::metrics::install().render()
}

#[tokio::test]
async fn sigterm_drains_in_flight_requests_then_a_second_sidecar_finishes_the_queue() {
    let conn = broker().await;
    let queue = unique("sigterm");
    let worker = Worker::builder()
        .latency(Duration::from_millis(1500))
        .spawn()
        .await;
    let mut cfg = config(&queue, vec![backend(&worker, 30)]);
    cfg.amqp.consumers = 25;
    cfg.shutdown.grace_ms = 10_000;
    declare(&conn, &cfg).await;
    const N: usize = 100;
    publish_n(&conn, &queue, N).await;
    let mut sidecar = spawn_binary(&cfg);
    wait_until(
        "20+ requests in flight",
        Duration::from_secs(30),
        || async { worker.in_flight() >= 20 },
    )
    .await;
    let in_flight = worker.in_flight();
    let started = Instant::now();
    sidecar.signal("TERM");
    wait_until("/readyz turns 503", Duration::from_secs(2), || async {
        matches!(sidecar.readyz().await, Some(503) | None)
    })
    .await;
    let status = sidecar.wait(Duration::from_secs(20)).await;
    let drain = started.elapsed();
    assert_eq!(status.code(), Some(0), "exit 0 after a graceful shutdown");
    let done = worker.succeeded().len();
    assert!(
        done >= in_flight,
        "the {in_flight} in-flight requests finished ({done} succeeded)"
    );
    // Everything that succeeded was acked, and nothing else left the queue.
    // (Quorum queues apply settlements asynchronously: wait for the count to settle.)
    wait_until(
        "in-flight deliveries acked, the rest still ready",
        Duration::from_secs(10),
        || async { ready(&conn, &queue).await as usize == N - done },
    )
    .await;
    println!("[sigterm] {in_flight} in flight at SIGTERM, drained in {drain:?}, {done} acked");

    let second = start(cfg.clone()).await;
    wait_until(
        "second sidecar finishes the queue",
        Duration::from_secs(60),
        || async { ready(&conn, &queue).await == 0 && worker.in_flight() == 0 },
    )
    .await;
    second.stop().await.expect("clean stop");
    let acc = account(&conn, &cfg, N, &[&worker]).await;
    acc.assert_no_loss("sigterm");
    assert_eq!(
        acc.duplicates, 0,
        "a graceful shutdown causes no duplicates"
    );
    cleanup(&conn, &cfg).await;
}

#[tokio::test]
async fn the_drain_deadline_requeues_unfinished_deliveries_without_counting_an_attempt() {
    let conn = broker().await;
    let queue = unique("deadline");
    let gate = Arc::new(Gate::default());
    let stuck = Worker::builder().gate(Arc::clone(&gate)).spawn().await;
    let mut cfg = config(&queue, vec![backend(&stuck, 5)]);
    cfg.amqp.queue_type = QueueType::Classic;
    cfg.amqp.consumers = 5;
    cfg.backends[0].timeout_ms = 60_000;
    cfg.shutdown.grace_ms = 300;
    declare(&conn, &cfg).await;
    publish_n(&conn, &queue, 5).await;
    let sidecar = start(cfg.clone()).await;
    wait_until("5 requests held", Duration::from_secs(20), || async {
        stuck.in_flight() == 5
    })
    .await;
    let started = Instant::now();
    sidecar.stop().await.expect("clean stop");
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(8),
        "stopped soon after the 300 ms grace ({took:?})"
    );
    let q = [("queue", queue.as_str())];
    let text = metrics_now();
    assert_eq!(
        metric_value(&text, "amqp_sidecar_releases_total", &q),
        5.0,
        "nack-requeued"
    );
    assert_eq!(
        metric_value(&text, "amqp_sidecar_requeues_total", &q),
        0.0,
        "not counted as retries"
    );
    assert_eq!(metric_value(&text, "amqp_sidecar_acks_total", &q), 0.0);
    wait_until(
        "all five back in the queue",
        Duration::from_secs(10),
        || async { ready(&conn, &queue).await == 5 },
    )
    .await;
    gate.open();

    let worker = Worker::builder().spawn().await;
    let mut cfg2 = cfg.clone();
    cfg2.backends = vec![backend(&worker, 5)];
    let second = start(cfg2).await;
    wait_until("all acked", Duration::from_secs(20), || async {
        worker.succeeded().len() == 5
    })
    .await;
    for r in worker.requests() {
        assert_eq!(
            r.header("x-amqp-attempt"),
            Some("1"),
            "the release did not count as an attempt"
        );
        assert_eq!(r.header("x-amqp-redelivered"), Some("true"));
    }
    second.stop().await.expect("clean stop");
    let acc = account(&conn, &cfg, 5, &[&worker]).await;
    acc.assert_no_loss("deadline");
    cleanup(&conn, &cfg).await;
}

#[tokio::test]
async fn sigkill_mid_stream_then_a_restart_loses_nothing() {
    let conn = broker().await;
    let queue = unique("sigkill");
    let worker = Worker::builder()
        .latency(Duration::from_millis(20))
        .spawn()
        .await;
    let mut cfg = config(&queue, vec![backend(&worker, 4)]);
    cfg.amqp.consumers = 4;
    declare(&conn, &cfg).await;
    const N: usize = 300;
    publish_n(&conn, &queue, N).await;
    let mut first = spawn_binary(&cfg);
    wait_until("a third processed", Duration::from_secs(60), || async {
        worker.succeeded().len() >= N / 3
    })
    .await;
    first.signal("KILL");
    let status = first.wait(Duration::from_secs(10)).await;
    assert_eq!(status.code(), None, "killed by a signal");
    let at_kill = worker.succeeded().len();
    let mut second = spawn_binary(&cfg);
    let restarted = Instant::now();
    second.wait_ready().await;
    wait_until(
        "queue drained after restart",
        Duration::from_secs(60),
        || async {
            ready(&conn, &queue).await == 0
                && worker.in_flight() == 0
                && worker.succeeded().len() >= N
        },
    )
    .await;
    println!(
        "[sigkill] killed after {at_kill} successes; restart ready in {:?}",
        restarted.elapsed()
    );
    second.signal("TERM");
    assert_eq!(second.wait(Duration::from_secs(20)).await.code(), Some(0));
    let acc = account(&conn, &cfg, N, &[&worker]).await;
    acc.assert_no_loss("sigkill");
    assert!(
        acc.duplicates <= 4,
        "only deliveries in flight at the kill (consumers × prefetch = 4) may be duplicated, saw {}",
        acc.duplicates
    );
    cleanup(&conn, &cfg).await;
}

#[tokio::test]
async fn a_backend_killed_mid_request_is_retried_on_another_backend() {
    let conn = broker().await;
    let queue = unique("backend-killed");
    let doomed = Worker::builder()
        .latency(Duration::from_secs(3))
        .spawn()
        .await;
    let healthy = Worker::builder()
        .latency(Duration::from_millis(5))
        .spawn()
        .await;
    let mut cfg = config(&queue, vec![backend(&doomed, 2), backend(&healthy, 2)]);
    cfg.amqp.consumers = 4;
    cfg.ejection.consecutive_failures = 1;
    cfg.ejection.base_ms = 60_000;
    cfg.ejection.max_ms = 60_000;
    declare(&conn, &cfg).await;
    const N: usize = 40;
    publish_n(&conn, &queue, N).await;
    let sidecar = start(cfg.clone()).await;
    wait_until(
        "requests in flight at the doomed backend",
        Duration::from_secs(20),
        || async { doomed.in_flight() >= 1 },
    )
    .await;
    let cut = doomed.in_flight();
    doomed.kill();
    wait_until("everything processed", Duration::from_secs(30), || async {
        healthy.succeeded().len() >= N && ready(&conn, &queue).await == 0
    })
    .await;
    let text = sidecar.metrics().await;
    let d = doomed.addr.to_string();
    let failures = metric_value(
        &text,
        "amqp_sidecar_backend_requests_total",
        &[("backend", &d), ("outcome", "retryable")],
    ) + metric_value(
        &text,
        "amqp_sidecar_backend_requests_total",
        &[("backend", &d), ("outcome", "connect_error")],
    );
    assert!(
        failures >= 1.0,
        "the reset requests were retryable failures"
    );
    assert_eq!(
        metric_value(
            &text,
            "amqp_sidecar_backend_ejections_total",
            &[("backend", &d)]
        ),
        1.0
    );
    assert_eq!(
        metric_value(
            &text,
            "amqp_sidecar_dead_letters_total",
            &[("queue", &queue)]
        ),
        0.0,
        "none dead-lettered"
    );
    println!(
        "[backend-killed] {cut} requests cut; {failures} failed attempts; all retried on the other backend"
    );
    sidecar.stop().await.expect("clean stop");
    let acc = account(&conn, &cfg, N, &[&doomed, &healthy]).await;
    acc.assert_no_loss("backend-killed");
    assert_eq!(acc.succeeded, N);
    cleanup(&conn, &cfg).await;
}

#[tokio::test]
async fn a_missing_dlx_requeues_the_original_until_it_is_back() {
    let conn = broker().await;
    let queue = unique("no-dlx");
    let worker = Worker::builder()
        .respond(|_, _| Reply::status(400))
        .spawn()
        .await;
    let cfg = config(&queue, vec![backend(&worker, 1)]);
    let dlx = cfg.dead_letter.exchange_for(&queue);
    // The sidecar declares the DLX when it starts; delete it once it runs, and only then
    // publish, so the dead-letter publish finds it missing.
    let sidecar = start(cfg.clone()).await;
    let ch = conn.create_channel().await.expect("channel");
    ch.exchange_delete(
        ShortString::from(dlx.as_str()),
        ExchangeDeleteOptions::default(),
    )
    .await
    .expect("delete DLX");
    publish_n(&conn, &queue, 1).await;
    let q = [("queue", queue.as_str())];
    wait_until(
        "dead-letter failures counted",
        Duration::from_secs(20),
        || async {
            sidecar
                .metric("amqp_sidecar_dead_letter_failures_total", &q)
                .await
                >= 2.0
        },
    )
    .await;
    assert_eq!(
        sidecar.metric("amqp_sidecar_acks_total", &q).await,
        0.0,
        "the original is never acked"
    );
    assert_eq!(
        sidecar.metric("amqp_sidecar_dead_letters_total", &q).await,
        0.0
    );
    // Restore the DLX and its binding: the next try succeeds.
    ch.exchange_declare(
        ShortString::from(dlx.as_str()),
        ExchangeKind::Direct,
        ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare DLX");
    ch.queue_bind(
        ShortString::from(cfg.dead_letter.queue_for(&queue)),
        ShortString::from(dlx.as_str()),
        ShortString::from(cfg.dead_letter.routing_key_for(&queue)),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("bind DLQ");
    wait_until(
        "dead-lettered once the DLX is back",
        Duration::from_secs(30),
        || async { sidecar.metric("amqp_sidecar_dead_letters_total", &q).await == 1.0 },
    )
    .await;
    sidecar.stop().await.expect("clean stop");
    let acc = account(&conn, &cfg, 1, &[&worker]).await;
    acc.assert_no_loss("missing-dlx");
    assert_eq!(acc.dead_lettered, 1);
    cleanup(&conn, &cfg).await;
}

#[tokio::test]
async fn a_deleted_queue_is_redeclared_and_consumption_resumes() {
    let conn = broker().await;
    let queue = unique("deleted");
    let worker = Worker::builder().spawn().await;
    let mut cfg = config(&queue, vec![backend(&worker, 2)]);
    cfg.amqp.reconnect_initial_ms = 100;
    cfg.amqp.reconnect_max_ms = 500;
    declare(&conn, &cfg).await;
    let sidecar = start(cfg.clone()).await;
    let ch = conn.create_channel().await.expect("channel");
    ch.queue_delete(
        ShortString::from(queue.as_str()),
        QueueDeleteOptions::default(),
    )
    .await
    .expect("delete queue");
    let url = format!("http://{}/readyz", sidecar.admin);
    let cancelled_at = Instant::now();
    wait_until(
        "ready again after re-subscribing",
        Duration::from_secs(20),
        || async {
            http()
                .get(&url)
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
                && sidecar.readiness().await["consumers"].as_u64() >= Some(1)
                && try_ready(&conn, &queue).await == Some(0)
        },
    )
    .await;
    publish_n(&conn, &queue, 10).await;
    wait_until(
        "consumed after re-subscribe",
        Duration::from_secs(20),
        || async { worker.succeeded().len() == 10 },
    )
    .await;
    println!(
        "[deleted-queue] re-subscribed within {:?}",
        cancelled_at.elapsed()
    );
    sidecar.stop().await.expect("clean stop");
    let acc = account(&conn, &cfg, 10, &[&worker]).await;
    acc.assert_no_loss("deleted-queue");
    cleanup(&conn, &cfg).await;
}

#[tokio::test]
async fn poison_input_is_settled_on_purpose() {
    let conn = broker().await;
    let queue = unique("poison");
    let hang = Arc::new(Gate::default());
    let hanging = Worker::builder().gate(Arc::clone(&hang)).spawn().await;
    // One backend that never answers (cut off by its 300 ms timeout), max_body_bytes 1 KiB.
    let mut cfg = config(&queue, vec![backend(&hanging, 2)]);
    cfg.backends[0].timeout_ms = 300;
    cfg.backend.max_body_bytes = 1024;
    cfg.retry.max_attempts = 2;
    declare(&conn, &cfg).await;
    publish(
        &conn,
        &queue,
        &vec![b'a'; 2048],
        BasicProperties::default().with_message_id(ShortString::from("m-0")),
    )
    .await;
    publish(
        &conn,
        &queue,
        b"hangs",
        BasicProperties::default().with_message_id(ShortString::from("m-1")),
    )
    .await;
    let sidecar = start(cfg.clone()).await;
    let dlq = cfg.dead_letter.queue_for(&queue);
    wait_until("both dead-lettered", Duration::from_secs(20), || async {
        ready(&conn, &dlq).await == 2
    })
    .await;
    let dead = take_all(&conn, &dlq).await;
    let reason = |id: &str| {
        let m = dead
            .iter()
            .find(|m| {
                m.delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .map(ShortString::as_str)
                    == Some(id)
            })
            .expect("in DLQ");
        let h = m.delivery.properties.headers().clone().expect("headers");
        (
            header_text(&h, "x-sidecar-reason"),
            header_text(&h, "x-sidecar-last-error"),
        )
    };
    let (too_large, why) = reason("m-0");
    assert_eq!(too_large.as_deref(), Some("too_large"));
    assert!(why.expect("error").contains("max_body_bytes"));
    let (timed_out, why) = reason("m-1");
    assert_eq!(timed_out.as_deref(), Some("retries_exhausted"));
    assert!(
        why.expect("error").contains("timed out"),
        "cut off by the timeout"
    );
    assert_eq!(
        hanging.count(),
        2,
        "the oversized message never reached a backend; the hanging one got 2 attempts"
    );
    let text = sidecar.metrics().await;
    assert_eq!(
        metric_value(
            &text,
            "amqp_sidecar_backend_requests_total",
            &[
                ("backend", &hanging.addr.to_string()),
                ("outcome", "timeout")
            ]
        ),
        2.0
    );
    sidecar.stop().await.expect("clean stop");
    hang.open();
    cleanup(&conn, &cfg).await;
}

#[tokio::test]
async fn odd_headers_and_huge_responses_do_not_stop_delivery() {
    let conn = broker().await;
    let queue = unique("odd");
    // An 8 MiB response body: read up to backend.max_response_bytes, then dropped.
    let huge = axum::body::Bytes::from(vec![b'y'; 8 * 1024 * 1024]);
    let worker = Worker::builder()
        .respond(move |_, _| Reply::status(200).with_body(huge.clone()))
        .spawn()
        .await;
    let cfg = config(&queue, vec![backend(&worker, 1)]);
    declare(&conn, &cfg).await;
    let mut headers = FieldTable::default();
    headers.insert(
        ShortString::from("array"),
        AMQPValue::FieldArray(vec![AMQPValue::Boolean(true)].into()),
    );
    headers.insert(
        ShortString::from("bytes"),
        AMQPValue::ByteArray(vec![0u8, 1, 2].into()),
    );
    headers.insert(ShortString::from("void"), AMQPValue::Void);
    headers.insert(
        ShortString::from("binary-string"),
        AMQPValue::LongString(vec![0xffu8, 0xfe, 0x00].into()),
    );
    headers.insert(
        ShortString::from("ok"),
        AMQPValue::LongString("fine".into()),
    );
    publish(
        &conn,
        &queue,
        b"odd",
        BasicProperties::default()
            .with_message_id(ShortString::from("m-0"))
            .with_headers(headers),
    )
    .await;
    let sidecar = start(cfg.clone()).await;
    wait_until("acked", Duration::from_secs(20), || async {
        sidecar
            .metric("amqp_sidecar_acks_total", &[("queue", &queue)])
            .await
            == 1.0
    })
    .await;
    let r = &worker.requests()[0];
    assert_eq!(r.header("x-amqp-header-ok"), Some("fine"));
    for h in ["array", "bytes", "void", "binary-string"] {
        assert!(
            r.headers.get(format!("x-amqp-header-{h}")).is_none(),
            "{h} left out"
        );
    }
    sidecar.stop().await.expect("clean stop");
    let acc = account(&conn, &cfg, 1, &[&worker]).await;
    acc.assert_no_loss("odd-headers");
    cleanup(&conn, &cfg).await;
}

#[tokio::test]
async fn a_delivery_waiting_out_its_backoff_is_requeued_at_once_on_shutdown() {
    let conn = broker().await;
    let queue = unique("backoff-shutdown");
    let worker = Worker::builder()
        .respond(|_, _| Reply::status(503).with_header("retry-after", "60"))
        .spawn()
        .await;
    let mut cfg = config(&queue, vec![backend(&worker, 1)]);
    cfg.retry.backoff_max_ms = 60_000;
    cfg.shutdown.grace_ms = 30_000;
    declare(&conn, &cfg).await;
    publish_n(&conn, &queue, 1).await;
    let sidecar = start(cfg.clone()).await;
    wait_until("first attempt failed", Duration::from_secs(20), || async {
        worker.count() == 1
    })
    .await;
    let started = Instant::now();
    sidecar.stop().await.expect("clean stop");
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "shutdown did not wait out the 60 s backoff ({took:?})"
    );
    let q = [("queue", queue.as_str())];
    assert_eq!(
        metric_value(&metrics_now(), "amqp_sidecar_requeues_total", &q),
        1.0
    );
    wait_until("requeued, not lost", Duration::from_secs(10), || async {
        ready(&conn, &queue).await == 1
    })
    .await;
    assert_eq!(worker.count(), 1);
    cleanup(&conn, &cfg).await;
}

#[tokio::test]
async fn a_second_signal_exits_at_once_and_the_broker_requeues() {
    let conn = broker().await;
    let queue = unique("second-signal");
    let gate = Arc::new(Gate::default());
    let stuck = Worker::builder().gate(Arc::clone(&gate)).spawn().await;
    let mut cfg = config(&queue, vec![backend(&stuck, 3)]);
    cfg.backends[0].timeout_ms = 60_000;
    cfg.shutdown.grace_ms = 60_000;
    declare(&conn, &cfg).await;
    publish_n(&conn, &queue, 3).await;
    let mut sidecar = spawn_binary(&cfg);
    wait_until("3 requests held", Duration::from_secs(20), || async {
        stuck.in_flight() == 3
    })
    .await;
    sidecar.signal("TERM");
    wait_until("draining", Duration::from_secs(5), || async {
        sidecar.log().contains("draining")
    })
    .await;
    let started = Instant::now();
    sidecar.signal("TERM");
    let status = sidecar.wait(Duration::from_secs(5)).await;
    assert_eq!(status.code(), Some(130), "forced exit");
    assert!(started.elapsed() < Duration::from_secs(3));
    wait_until(
        "the broker requeued the unacked deliveries",
        Duration::from_secs(10),
        || async { ready(&conn, &queue).await == 3 },
    )
    .await;
    gate.open();
    cleanup(&conn, &cfg).await;
}
