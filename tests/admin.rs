//! The admin server: /metrics counters match what happened, /healthz and /readyz.

mod support;

use std::{net::SocketAddr, time::Duration};

use lapin::BasicProperties;
use support::*;

#[tokio::test]
async fn metrics_match_what_happened() {
    let conn = broker().await;
    let queue = unique("metrics");
    let worker = Worker::builder()
        .respond(|r, _| {
            if &r.body[..] == b"bad" {
                Reply::status(400)
            } else {
                Reply::status(200)
            }
        })
        .spawn()
        .await;
    let mut cfg = config(&queue, vec![backend(&worker, 2)]);
    cfg.backends[0].name = Some(format!("{queue}-worker"));
    declare(&conn, &cfg).await;
    for i in 0..10 {
        publish(
            &conn,
            &queue,
            format!("ok-{i}").as_bytes(),
            BasicProperties::default(),
        )
        .await;
    }
    for _ in 0..2 {
        publish(&conn, &queue, b"bad", BasicProperties::default()).await;
    }
    let sidecar = start(cfg.clone()).await;
    let q = [("queue", queue.as_str())];
    wait_until("all settled", Duration::from_secs(20), || async {
        let text = sidecar.metrics().await;
        metric_value(&text, "amqp_sidecar_acks_total", &q) == 10.0
            && metric_value(&text, "amqp_sidecar_dead_letters_total", &q) == 2.0
    })
    .await;
    let text = sidecar.metrics().await;
    let b = format!("{queue}-worker");
    assert_eq!(
        metric_value(&text, "amqp_sidecar_deliveries_total", &q),
        12.0
    );
    assert_eq!(metric_value(&text, "amqp_sidecar_acks_total", &q), 10.0);
    assert_eq!(metric_value(&text, "amqp_sidecar_requeues_total", &q), 0.0);
    assert_eq!(
        metric_value(
            &text,
            "amqp_sidecar_dead_letters_total",
            &[("queue", &queue), ("reason", "rejected")]
        ),
        2.0
    );
    let by_outcome = |o: &str| {
        metric_value(
            &text,
            "amqp_sidecar_backend_requests_total",
            &[("backend", &b), ("outcome", o)],
        )
    };
    assert_eq!(by_outcome("success"), 10.0);
    assert_eq!(by_outcome("rejected"), 2.0);
    assert_eq!(
        by_outcome("retryable") + by_outcome("timeout") + by_outcome("connect_error"),
        0.0
    );
    assert_eq!(
        metric_value(
            &text,
            "amqp_sidecar_backend_request_duration_seconds_count",
            &[("backend", &b)]
        ),
        12.0
    );
    assert_eq!(
        metric_value(&text, "amqp_sidecar_backend_in_flight", &[("backend", &b)]),
        0.0
    );
    assert!(
        text.contains("# TYPE amqp_sidecar_backend_request_duration_seconds histogram"),
        "{text}"
    );
    assert!(text.contains("# HELP amqp_sidecar_acks_total"), "{text}");
    // amqp_sidecar_consumers and amqp_sidecar_connected are process-wide gauges, shared by
    // every sidecar in this test binary; the binary tests and tests/broker_faults.rs (serial)
    // cover them. Here: they are exported, with HELP text.
    assert!(text.contains("# HELP amqp_sidecar_connected"), "{text}");
    assert!(text.contains("# HELP amqp_sidecar_consumers"), "{text}");
    let health = http()
        .get(format!("http://{}/healthz", sidecar.admin))
        .send()
        .await
        .expect("healthz");
    assert_eq!(health.status(), 200);
    let ready = http()
        .get(format!("http://{}/readyz", sidecar.admin))
        .send()
        .await
        .expect("readyz")
        .text()
        .await
        .expect("body");
    let ready: serde_json::Value = serde_json::from_str(&ready).expect("json");
    assert_eq!(ready["ready"], true);
    // Two backend slots, plus the lookahead the delivery rate called for.
    assert_eq!(ready["consumer_target"]["slots"], 2);
    let lookahead = ready["consumer_target"]["lookahead"]
        .as_u64()
        .expect("lookahead");
    assert!(lookahead <= 2, "bounded by the slots: {ready}");
    assert_eq!(ready["expected_consumers"].as_u64(), Some(2 + lookahead));
    sidecar.stop().await.expect("clean stop");
    cleanup(&conn, &cfg).await;
}

#[tokio::test]
async fn readyz_is_503_with_reasons_while_the_broker_is_unreachable() {
    // A port nothing listens on: bind, take the port, drop the listener.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let worker = Worker::builder().spawn().await;
    let mut cfg = config(&unique("unreachable"), vec![backend(&worker, 1)]);
    cfg.amqp.url = format!("amqp://guest:sup3r-secret@127.0.0.1:{port}/%2f");
    cfg.amqp.reconnect_initial_ms = 50;
    cfg.amqp.reconnect_max_ms = 200;
    let sidecar = start_unready(cfg).await;
    let addr: SocketAddr = sidecar.admin;
    wait_until(
        "readyz explains the connect failure",
        Duration::from_secs(10),
        || async {
            let r = http()
                .get(format!("http://{addr}/readyz"))
                .send()
                .await
                .expect("readyz");
            r.status() == 503
                && r.text()
                    .await
                    .unwrap_or_default()
                    .contains("cannot connect")
        },
    )
    .await;
    let body = http()
        .get(format!("http://{addr}/readyz"))
        .send()
        .await
        .expect("readyz")
        .text()
        .await
        .expect("body");
    assert!(
        !body.contains("sup3r-secret"),
        "password leaked on /readyz: {body}"
    );
    assert!(body.contains("***"), "{body}");
    assert_eq!(
        http()
            .get(format!("http://{addr}/healthz"))
            .send()
            .await
            .expect("healthz")
            .status(),
        200
    );
    assert!(!sidecar.is_finished(), "keeps retrying, does not exit");
    sidecar.stop().await.expect("clean stop while disconnected");
}

/// Issue 18: the admin port must not let a client hold descriptors forever. 150 slow-drip
/// connections (a request line, then nothing) leave the sidecar with at most
/// `MAX_CONNECTIONS` admin sockets open, and each is closed after the header-read timeout.
/// Before the fix every one stayed open, with no limit.
#[tokio::test]
async fn slow_drip_admin_connections_are_bounded_and_timed_out() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let worker = Worker::builder().spawn().await;
    let cfg = config(&unique("admin-drip"), vec![backend(&worker, 1)]);
    let mut sidecar = spawn_binary(&cfg);
    sidecar.wait_ready().await;
    let fds = |pid: u32| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    let baseline = fds(sidecar.pid());
    let mut held = Vec::new();
    for _ in 0..150 {
        let mut s = tokio::net::TcpStream::connect(sidecar.admin)
            .await
            .expect("connect (the kernel's accept queue takes it)");
        s.write_all(b"GET /readyz HTTP/1.1\r\n")
            .await
            .expect("request line");
        held.push(s);
    }
    // Give the sidecar time to accept what it will.
    let mut peak = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while std::time::Instant::now() < deadline {
        peak = peak.max(fds(sidecar.pid()));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let max = amqp_sidecar::admin::MAX_CONNECTIONS;
    println!("[admin] descriptors: baseline {baseline}, peak {peak} with 150 slow clients");
    assert!(
        peak <= baseline + max + 4,
        "descriptors grew from {baseline} to {peak} (limit {max} admin connections)"
    );
    // The first connection is closed by the server once the header-read timeout passes.
    let mut first = held.remove(0);
    let mut buf = [0u8; 256];
    let closed = tokio::time::timeout(
        amqp_sidecar::admin::HEADER_READ_TIMEOUT + Duration::from_secs(5),
        async {
            loop {
                match first.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {} // a 408 response, then the close
                }
            }
        },
    )
    .await;
    assert!(closed.is_ok(), "a slow-drip connection was never closed");
    drop(held);
    // Probes work again once the drip is gone.
    wait_until("readyz answers", Duration::from_secs(15), || async {
        sidecar.readyz().await == Some(200)
    })
    .await;
    sidecar.signal("TERM");
    assert_eq!(sidecar.wait(Duration::from_secs(15)).await.code(), Some(0));
    let conn = broker().await;
    cleanup(&conn, &cfg).await;
}
