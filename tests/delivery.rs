//! Consuming and forwarding: every message delivered once and acked, the request mapping,
//! and the prefetch bound on unacked deliveries.

mod support;

use std::{collections::HashMap, sync::Arc, time::Duration};

use amqp_sidecar::config::QueueType;
use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable, LongString, ShortString},
};
use support::*;

#[tokio::test]
async fn every_message_is_delivered_once_and_acked() {
    let conn = broker().await;
    let queue = unique("once");
    let workers = workers_with_latency(&[1, 3, 5]).await;
    let cfg = config(&queue, workers.iter().map(|w| backend(w, 2)).collect());
    declare(&conn, &cfg).await;
    const N: usize = 300;
    publish_n(&conn, &queue, N).await;
    let sidecar = start(cfg.clone()).await;
    wait_until("all acked", Duration::from_secs(60), || async {
        sidecar
            .metric("amqp_sidecar_acks_total", &[("queue", &queue)])
            .await
            >= N as f64
    })
    .await;

    let mut seen: HashMap<String, usize> = HashMap::new();
    for w in &workers {
        for r in w.requests() {
            *seen
                .entry(
                    r.header("x-amqp-message-id")
                        .expect("message id")
                        .to_owned(),
                )
                .or_default() += 1;
            assert_eq!(r.header("x-amqp-attempt"), Some("1"));
            assert_eq!(r.header("content-type"), Some("application/octet-stream"));
            assert_eq!(r.header("x-amqp-routing-key"), Some(queue.as_str()));
        }
    }
    assert_eq!(seen.len(), N, "every message reached a backend");
    assert!(
        seen.values().all(|&n| n == 1),
        "no message was delivered twice"
    );
    for w in &workers {
        assert!(w.count() > 0, "every backend got work");
    }
    assert_eq!(ready(&conn, &queue).await, 0);
    assert_eq!(ready(&conn, &cfg.dead_letter.queue_for(&queue)).await, 0);
    assert_eq!(
        sidecar
            .metric("amqp_sidecar_acks_total", &[("queue", &queue)])
            .await,
        N as f64
    );
    sidecar.stop().await.expect("clean stop");
    cleanup(&conn, &cfg).await;
}

#[tokio::test]
async fn request_carries_amqp_properties_and_never_injects_crlf() {
    let conn = broker().await;
    let queue = unique("headers");
    let worker = Worker::builder().spawn().await;
    let cfg = config(&queue, vec![backend(&worker, 1)]);
    declare(&conn, &cfg).await;
    let mut headers = FieldTable::default();
    headers.insert(
        ShortString::from("tenant"),
        AMQPValue::LongString(LongString::from("acme")),
    );
    headers.insert(
        ShortString::from("priority-score"),
        AMQPValue::LongLongInt(42),
    );
    headers.insert(ShortString::from("urgent"), AMQPValue::Boolean(true));
    headers.insert(
        ShortString::from("evil"),
        AMQPValue::LongString(LongString::from("x\r\nX-Injected: yes")),
    );
    headers.insert(
        ShortString::from("nested"),
        AMQPValue::FieldTable(FieldTable::default()),
    );
    let props = BasicProperties::default()
        .with_content_type(ShortString::from("application/json"))
        .with_content_encoding(ShortString::from("gzip"))
        .with_message_id(ShortString::from("id-1"))
        .with_correlation_id(ShortString::from("corr-1"))
        .with_type(ShortString::from("order.created"))
        .with_reply_to(ShortString::from("replies"))
        .with_app_id(ShortString::from("shop"))
        .with_timestamp(1_700_000_000)
        .with_headers(headers);
    publish(&conn, &queue, br#"{"order":1}"#, props).await;
    let sidecar = start(cfg.clone()).await;
    wait_until("request received", Duration::from_secs(20), || async {
        worker.count() == 1
    })
    .await;
    wait_until("acked", Duration::from_secs(20), || async {
        sidecar
            .metric("amqp_sidecar_acks_total", &[("queue", &queue)])
            .await
            == 1.0
    })
    .await;
    let r = &worker.requests()[0];
    assert_eq!(&r.body[..], br#"{"order":1}"#);
    for (name, value) in [
        ("content-type", "application/json"),
        ("content-encoding", "gzip"),
        ("x-amqp-message-id", "id-1"),
        ("x-amqp-correlation-id", "corr-1"),
        ("x-amqp-type", "order.created"),
        ("x-amqp-reply-to", "replies"),
        ("x-amqp-app-id", "shop"),
        ("x-amqp-timestamp", "1700000000"),
        ("x-amqp-routing-key", queue.as_str()),
        ("x-amqp-exchange", ""),
        ("x-amqp-redelivered", "false"),
        ("x-amqp-attempt", "1"),
        ("x-amqp-header-tenant", "acme"),
        ("x-amqp-header-priority-score", "42"),
        ("x-amqp-header-urgent", "true"),
    ] {
        assert_eq!(r.header(name), Some(value), "header {name}");
    }
    assert!(
        r.headers.get("x-injected").is_none(),
        "CR/LF must never inject a header"
    );
    assert!(
        r.headers.get("x-amqp-header-evil").is_none(),
        "an illegal value is left out"
    );
    assert!(
        r.headers.get("x-amqp-header-nested").is_none(),
        "a table value is left out"
    );
    sidecar.stop().await.expect("clean stop");
    cleanup(&conn, &cfg).await;
}

#[tokio::test]
async fn unacked_deliveries_never_exceed_consumers_times_prefetch() {
    let conn = broker().await;
    let queue = unique("prefetch");
    let gate = Arc::new(Gate::default());
    let worker = Worker::builder().gate(Arc::clone(&gate)).spawn().await;
    let mut cfg = config(&queue, vec![backend(&worker, 10)]);
    cfg.amqp.queue_type = QueueType::Classic;
    cfg.amqp.consumers = 2;
    cfg.amqp.prefetch = 1;
    declare(&conn, &cfg).await;
    publish_n(&conn, &queue, 20).await;
    let sidecar = start(cfg.clone()).await;
    wait_until(
        "2 requests held at the worker",
        Duration::from_secs(20),
        || async { worker.in_flight() == 2 },
    )
    .await;
    // The sidecar holds exactly consumers × prefetch = 2 deliveries; the other 18 stay ready
    // in the broker (a passive declare on a classic queue reports the live ready count).
    assert_eq!(ready(&conn, &queue).await, 18);
    assert_eq!(worker.in_flight(), 2);
    gate.open();
    wait_until("all acked", Duration::from_secs(30), || async {
        sidecar
            .metric("amqp_sidecar_acks_total", &[("queue", &queue)])
            .await
            == 20.0
    })
    .await;
    assert_eq!(
        worker.max_in_flight(),
        2,
        "never more than consumers × prefetch in flight"
    );
    assert_eq!(worker.count(), 20);
    sidecar.stop().await.expect("clean stop");
    cleanup(&conn, &cfg).await;
}

/// W3C Trace Context end to end: a delivery's `traceparent` reaches the worker as a real
/// `traceparent` header with the publisher's trace-id and the sidecar's own span-id, with
/// its `tracestate`; a rejected message's dead-letter copy keeps the `traceparent` it came
/// with.
#[tokio::test]
async fn the_trace_context_reaches_the_worker_and_the_dead_letter_copy() {
    let conn = broker().await;
    let queue = unique("traceparent");
    let worker = Worker::builder()
        .respond(|r, _| {
            if r.header("x-amqp-message-id") == Some("reject-me") {
                Reply::status(422)
            } else {
                Reply::status(200)
            }
        })
        .spawn()
        .await;
    let cfg = config(&queue, vec![backend(&worker, 1)]);
    declare(&conn, &cfg).await;
    let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    for id in ["traced", "reject-me"] {
        let mut h = FieldTable::default();
        h.insert(
            ShortString::from("traceparent"),
            AMQPValue::LongString(incoming.into()),
        );
        h.insert(
            ShortString::from("tracestate"),
            AMQPValue::LongString("congo=t61rcWkgMzE".into()),
        );
        publish(
            &conn,
            &queue,
            b"{}",
            BasicProperties::default()
                .with_message_id(ShortString::from(id))
                .with_headers(h),
        )
        .await;
    }
    let sidecar = start(cfg.clone()).await;
    let dlq = cfg.dead_letter.queue_for(&queue);
    wait_until(
        "one acked, one dead-lettered",
        Duration::from_secs(20),
        || async { worker.succeeded().len() == 1 && try_ready(&conn, &dlq).await == Some(1) },
    )
    .await;
    sidecar.stop().await.expect("clean stop");
    let traced = worker
        .requests()
        .into_iter()
        .find(|r| r.header("x-amqp-message-id") == Some("traced"))
        .expect("request");
    let out = traced.header("traceparent").expect("a traceparent header");
    let parts: Vec<&str> = out.split('-').collect();
    assert_eq!(parts.len(), 4, "{out}");
    assert_eq!(
        parts[1], "4bf92f3577b34da6a3ce929d0e0e4736",
        "the publisher's trace-id"
    );
    assert_ne!(
        parts[2], "00f067aa0ba902b7",
        "the sidecar's span-id as parent"
    );
    assert_eq!(traced.header("tracestate"), Some("congo=t61rcWkgMzE"));
    assert_eq!(traced.header("x-amqp-header-traceparent"), Some(incoming));
    let dead = take_all(&conn, &dlq).await;
    assert_eq!(
        header_text(&dead_letter_headers(&dead[0]), "traceparent").as_deref(),
        Some(incoming),
        "the dead-letter copy keeps its traceparent"
    );
    cleanup(&conn, &cfg).await;
}
