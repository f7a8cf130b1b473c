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
    assert_eq!(ready["consumers"], 2);
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
