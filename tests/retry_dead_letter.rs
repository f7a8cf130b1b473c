//! Outcomes: retry with backoff, Retry-After, retries exhausted, rejected 4xx, and the
//! dead-letter copy with its x-sidecar-* headers.

mod support;

use std::{
    collections::HashMap,
    time::{Duration, SystemTime},
};

use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable, LongString, ShortString},
};
use support::*;

/// `(messages_ready, messages_unacknowledged)` of every queue, from `rabbitmqctl list_queues`.
fn ready_and_unacked() -> HashMap<String, (u64, u64)> {
    rabbitmqctl(&[
        "-q",
        "list_queues",
        "name",
        "messages_ready",
        "messages_unacknowledged",
    ])
    .lines()
    .filter_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        match f[..] {
            [name, ready, unacked] => Some((
                name.to_owned(),
                (ready.parse().ok()?, unacked.parse().ok()?),
            )),
            _ => None,
        }
    })
    .collect()
}

#[tokio::test]
async fn a_backend_that_fails_then_succeeds_gets_the_message_acked() {
    let conn = broker().await;
    for queue_type in QUEUE_TYPES {
        let queue = unique("fail-then-ok");
        let worker = Worker::builder()
            .respond(|_, i| {
                if i < 2 {
                    Reply::status(503)
                } else {
                    Reply::status(200)
                }
            })
            .spawn()
            .await;
        let mut cfg = config(&queue, vec![backend(&worker, 1)]);
        cfg.amqp.queue_type = queue_type;
        declare(&conn, &cfg).await;
        publish(
            &conn,
            &queue,
            b"retry me",
            BasicProperties::default().with_message_id(ShortString::from("r-1")),
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
        let attempts: Vec<String> = worker
            .requests()
            .iter()
            .map(|r| r.header("x-amqp-attempt").unwrap_or("?").to_owned())
            .collect();
        assert_eq!(
            attempts,
            ["1", "2", "3"],
            "{queue_type:?}: attempts counted 1-based"
        );
        assert_eq!(
            sidecar
                .metric("amqp_sidecar_requeues_total", &[("queue", &queue)])
                .await,
            2.0
        );
        assert_eq!(
            sidecar
                .metric(
                    "amqp_sidecar_backend_requests_total",
                    &[
                        ("outcome", "retryable"),
                        ("backend", &format!("{}", worker.addr))
                    ]
                )
                .await,
            2.0
        );
        assert_eq!(ready(&conn, &cfg.dead_letter.queue_for(&queue)).await, 0);
        assert_eq!(ready(&conn, &queue).await, 0);
        sidecar.stop().await.expect("clean stop");
        cleanup(&conn, &cfg).await;
    }
}

#[tokio::test]
async fn retries_exhausted_gives_exactly_max_attempts_then_one_dead_letter() {
    let conn = broker().await;
    for queue_type in QUEUE_TYPES {
        let queue = unique("exhausted");
        let worker = Worker::builder()
            .respond(|_, _| Reply::status(500))
            .spawn()
            .await;
        let mut cfg = config(&queue, vec![backend(&worker, 1)]);
        cfg.amqp.queue_type = queue_type;
        cfg.retry.max_attempts = 3;
        declare(&conn, &cfg).await;
        let mut headers = FieldTable::default();
        headers.insert(
            ShortString::from("tenant"),
            AMQPValue::LongString(LongString::from("acme")),
        );
        publish(
            &conn,
            &queue,
            b"doomed",
            BasicProperties::default()
                .with_message_id(ShortString::from("d-1"))
                .with_content_type(ShortString::from("text/plain"))
                .with_headers(headers),
        )
        .await;
        let dlq = cfg.dead_letter.queue_for(&queue);
        let sidecar = start(cfg.clone()).await;
        wait_until("dead-lettered", Duration::from_secs(20), || async {
            sidecar
                .metric(
                    "amqp_sidecar_dead_letters_total",
                    &[("queue", &queue), ("reason", "retries_exhausted")],
                )
                .await
                == 1.0
        })
        .await;
        // Settled: the broker holds the original neither ready nor unacknowledged (a passive
        // declare counts only ready messages, so it cannot tell an acked original from one the
        // sidecar still holds), so no redelivery, and no attempt after these, can follow.
        wait_until(
            "original acked (not ready, not unacked) and one copy in the DLQ",
            Duration::from_secs(20),
            || async {
                let counts = ready_and_unacked();
                counts.get(&queue) == Some(&(0, 0)) && counts.get(&dlq) == Some(&(1, 0))
            },
        )
        .await;
        assert_eq!(
            worker.count(),
            3,
            "{queue_type:?}: exactly max_attempts requests"
        );
        assert_eq!(
            sidecar
                .metric("amqp_sidecar_deliveries_total", &[("queue", &queue)])
                .await,
            3.0,
            "{queue_type:?}: one delivery per attempt, no redelivery after the dead-letter"
        );
        let dead = take_all(&conn, &dlq).await;
        assert_eq!(dead.len(), 1, "exactly one copy in the DLQ");
        let m = &dead[0].delivery;
        assert_eq!(&m.data[..], b"doomed");
        assert_eq!(
            m.properties.message_id().as_ref().map(ShortString::as_str),
            Some("d-1")
        );
        assert_eq!(
            m.properties
                .content_type()
                .as_ref()
                .map(ShortString::as_str),
            Some("text/plain")
        );
        let h = m.properties.headers().clone().expect("headers");
        assert_eq!(
            header_text(&h, "tenant").as_deref(),
            Some("acme"),
            "original headers kept"
        );
        assert_dead_letter_headers(&h, "retries_exhausted", 3, 500);
        assert!(
            header_text(&h, "x-sidecar-last-error")
                .expect("last error")
                .contains("500")
        );
        assert_eq!(
            header_text(&h, "x-sidecar-backend"),
            Some(worker.addr.to_string())
        );
        assert_eq!(
            header_text(&h, "x-sidecar-queue").as_deref(),
            Some(queue.as_str())
        );
        let at = header_text(&h, "x-sidecar-failed-at").expect("failed-at");
        let at = humantime::parse_rfc3339(&at).expect("RFC 3339");
        assert!(
            SystemTime::now().duration_since(at).expect("in the past") < Duration::from_secs(60)
        );
        // Stopping waits for every delivery task to end: nothing can attempt it later.
        sidecar.stop().await.expect("clean stop");
        assert_eq!(
            worker.count(),
            3,
            "{queue_type:?}: no attempt after the dead-letter, up to the end of the sidecar"
        );
        cleanup(&conn, &cfg).await;
    }
}

#[tokio::test]
async fn a_4xx_is_dead_lettered_after_one_attempt() {
    let conn = broker().await;
    let queue = unique("rejected");
    let worker = Worker::builder()
        .respond(|_, _| Reply::status(422))
        .spawn()
        .await;
    let cfg = config(&queue, vec![backend(&worker, 1)]);
    declare(&conn, &cfg).await;
    publish(&conn, &queue, b"bad input", BasicProperties::default()).await;
    let dlq = cfg.dead_letter.queue_for(&queue);
    let sidecar = start(cfg.clone()).await;
    wait_until("in the DLQ", Duration::from_secs(20), || async {
        ready(&conn, &dlq).await == 1
    })
    .await;
    wait_until("original gone", Duration::from_secs(10), || async {
        ready(&conn, &queue).await == 0
    })
    .await;
    assert_eq!(worker.count(), 1, "a 4xx is not retried");
    let dead = take_all(&conn, &dlq).await;
    let h = dead[0]
        .delivery
        .properties
        .headers()
        .clone()
        .expect("headers");
    assert_dead_letter_headers(&h, "rejected", 1, 422);
    assert_eq!(
        sidecar
            .metric(
                "amqp_sidecar_dead_letters_total",
                &[("queue", &queue), ("reason", "rejected")]
            )
            .await,
        1.0
    );
    assert_eq!(
        sidecar
            .metric("amqp_sidecar_requeues_total", &[("queue", &queue)])
            .await,
        0.0
    );
    sidecar.stop().await.expect("clean stop");
    cleanup(&conn, &cfg).await;
}

#[tokio::test]
async fn retry_after_on_429_replaces_the_backoff() {
    let conn = broker().await;
    let queue = unique("retry-after");
    let worker = Worker::builder()
        .respond(|_, i| {
            if i == 0 {
                Reply::status(429).with_header("retry-after", "1")
            } else {
                Reply::status(200)
            }
        })
        .spawn()
        .await;
    // The computed backoff after attempt 1 is at most backoff_initial_ms (10 ms), so a ~1 s
    // gap can only come from Retry-After; the cap (5 s) is above it.
    let mut cfg = config(&queue, vec![backend(&worker, 1)]);
    cfg.retry.backoff_max_ms = 5_000;
    declare(&conn, &cfg).await;
    publish(&conn, &queue, b"slow down", BasicProperties::default()).await;
    let sidecar = start(cfg.clone()).await;
    wait_until("acked", Duration::from_secs(20), || async {
        sidecar
            .metric("amqp_sidecar_acks_total", &[("queue", &queue)])
            .await
            == 1.0
    })
    .await;
    let r = worker.requests();
    assert_eq!(r.len(), 2);
    let gap = r[1].at.duration_since(r[0].at);
    assert!(
        gap >= Duration::from_millis(950),
        "Retry-After: 1 honoured, gap was {gap:?}"
    );
    sidecar.stop().await.expect("clean stop");
    cleanup(&conn, &cfg).await;
}
