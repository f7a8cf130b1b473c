//! Hostile and unusual input (issue 18): messages that are legal on the wire but odd, and
//! properties that would lose or misclassify a message. Each test failed before its fix.

mod support;

use std::time::Duration;

use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable, LongString, ShortString},
};
use support::*;

/// A poison message whose message-id, type and a header key are not UTF-8, then 5 good
/// ones. Before the fix the client library failed to parse the content header, dropped the
/// connection, and the broker redelivered the poison message forever: the 5 never came. Now
/// the poison message is forwarded with the bad fields left out (and logged), and the 5
/// follow, with no reconnect.
#[tokio::test]
async fn a_message_with_non_utf8_short_strings_is_forwarded_and_does_not_stall_the_queue() {
    for queue_type in QUEUE_TYPES {
        let conn = broker().await;
        let worker = Worker::builder().spawn().await;
        let mut cfg = config(&unique("poison"), vec![backend(&worker, 1)]);
        cfg.amqp.queue_type = queue_type;
        declare(&conn, &cfg).await;
        let poison = raw::RawProperties {
            message_id: Some(b"\xff\xfe".to_vec()),
            kind: Some(b"t\xff".to_vec()),
            headers: vec![
                (b"x-\xff\xfe".to_vec(), b"value".to_vec()),
                (b"tenant".to_vec(), b"acme".to_vec()),
            ],
        };
        raw::publish(&amqp_url(), &cfg.amqp.queue, b"poison", &poison).await;
        publish_n(&conn, &cfg.amqp.queue, 5).await;
        let mut sidecar = spawn_binary(&cfg);
        wait_until(
            &format!("{queue_type:?}: all 6 reach the worker"),
            Duration::from_secs(20),
            || async { worker.succeeded().len() == 6 },
        )
        .await;
        let requests = worker.requests();
        let first = &requests[0];
        assert_eq!(&first.body[..], b"poison", "{queue_type:?}: in order");
        assert_eq!(
            first.header("x-amqp-message-id"),
            None,
            "the bad message-id is left out"
        );
        assert_eq!(
            first.header("x-amqp-type"),
            None,
            "the bad type is left out"
        );
        assert_eq!(
            first.header("x-amqp-header-tenant"),
            Some("acme"),
            "good headers still go"
        );
        let good: Vec<_> = requests[1..]
            .iter()
            .filter_map(|r| r.header("x-amqp-message-id"))
            .collect();
        assert_eq!(good, ["m-0", "m-1", "m-2", "m-3", "m-4"]);
        wait_until("queue empty", Duration::from_secs(10), || async {
            ready(&conn, &cfg.amqp.queue).await == 0
        })
        .await;
        let metrics = get_text(&format!("http://{}/metrics", sidecar.admin)).await;
        assert_eq!(
            metric_value(&metrics, "amqp_sidecar_connection_recoveries_total", &[]),
            0.0,
            "{queue_type:?}: no reconnect"
        );
        assert_eq!(
            metric_value(&metrics, "amqp_sidecar_acks_total", &[]),
            6.0,
            "{queue_type:?}: all 6 acked"
        );
        sidecar.signal("TERM");
        assert_eq!(sidecar.wait(Duration::from_secs(15)).await.code(), Some(0));
        let log = sidecar.log();
        assert!(
            log.contains("not valid UTF-8"),
            "the left-out fields are logged:\n{log}"
        );
        cleanup(&conn, &cfg).await;
    }
}

/// A message with a per-message TTL that is dead-lettered must not expire in the DLQ: the
/// copy carries no `expiration`, and the original TTL is kept in a header. Before the fix
/// the copy kept `expiration` and vanished from the DLQ when it ran out.
#[tokio::test]
async fn dead_letter_copies_do_not_expire() {
    for queue_type in QUEUE_TYPES {
        let conn = broker().await;
        let worker = Worker::builder()
            .respond(|_, _| Reply::status(422))
            .spawn()
            .await;
        let mut cfg = config(&unique("dlx-ttl"), vec![backend(&worker, 1)]);
        cfg.amqp.queue_type = queue_type;
        declare(&conn, &cfg).await;
        let props = BasicProperties::default()
            .with_message_id(ShortString::from("ttl-1"))
            .with_expiration(ShortString::from("60000"));
        publish(&conn, &cfg.amqp.queue, b"short-lived", props).await;
        let sidecar = start(cfg.clone()).await;
        let dlq = cfg.dead_letter.queue_for(&cfg.amqp.queue);
        wait_until("dead-lettered", Duration::from_secs(10), || async {
            ready(&conn, &dlq).await == 1
        })
        .await;
        sidecar.stop().await.expect("clean stop");
        let dead = take_all(&conn, &dlq).await;
        assert_eq!(dead.len(), 1);
        let p = &dead[0].delivery.properties;
        assert_eq!(
            p.expiration(),
            &None,
            "{queue_type:?}: the copy must not expire"
        );
        let h = p.headers().clone().expect("headers");
        assert_eq!(
            header_text(&h, "x-sidecar-original-expiration").as_deref(),
            Some("60000")
        );
        assert_dead_letter_headers(&h, "rejected", 1, 422);
        cleanup(&conn, &cfg).await;
    }
}

/// `x-delivery-count` set by a publisher (or kept by a shovel) is not an attempt count: the
/// message is attempt 1 and is delivered. Before the fix, 99 sent it to the DLQ untried and
/// 4 gave it one attempt, labelled 5.
#[tokio::test]
async fn a_publisher_set_delivery_count_is_not_trusted() {
    for queue_type in QUEUE_TYPES {
        let conn = broker().await;
        let worker = Worker::builder().spawn().await;
        let mut cfg = config(&unique("spoof"), vec![backend(&worker, 1)]);
        cfg.amqp.queue_type = queue_type;
        declare(&conn, &cfg).await;
        for (id, count) in [("spoof-99", 99), ("spoof-4", 4)] {
            let mut h = FieldTable::default();
            h.insert("x-delivery-count".into(), AMQPValue::LongLongInt(count));
            h.insert(
                "note".into(),
                AMQPValue::LongString(LongString::from("from a shovel")),
            );
            let props = BasicProperties::default()
                .with_message_id(ShortString::from(id))
                .with_headers(h);
            publish(&conn, &cfg.amqp.queue, b"body", props).await;
        }
        let sidecar = start(cfg.clone()).await;
        wait_until("both delivered", Duration::from_secs(10), || async {
            worker.succeeded().len() == 2
        })
        .await;
        sidecar.stop().await.expect("clean stop");
        for r in worker.requests() {
            assert_eq!(
                r.header("x-amqp-attempt"),
                Some("1"),
                "{queue_type:?} {:?}: a first delivery is attempt 1",
                r.header("x-amqp-message-id")
            );
        }
        let dlq = cfg.dead_letter.queue_for(&cfg.amqp.queue);
        assert_eq!(
            ready(&conn, &dlq).await,
            0,
            "{queue_type:?}: nothing dead-lettered"
        );
        cleanup(&conn, &cfg).await;
    }
}

/// A worker that answers 422 but cuts its body short: the status line and headers are the
/// answer, so the message is dead-lettered as `rejected` with `last_status` 422 on its first
/// attempt. Before the fix it was a retryable transport error with `last_status` 0.
#[tokio::test]
async fn a_status_with_a_body_cut_short_is_classified_by_its_status() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(
                        b"HTTP/1.1 422 Unprocessable Content\r\ncontent-length: 100\r\n\r\nbad field",
                    )
                    .await;
                // Close with 91 bytes of the body still owed.
            });
        }
    });
    let conn = broker().await;
    let mut cfg = config(
        &unique("cut-422"),
        vec![amqp_sidecar::config::BackendConfig::new(format!(
            "http://{addr}/"
        ))],
    );
    cfg.amqp.queue_type = amqp_sidecar::config::QueueType::Classic;
    declare(&conn, &cfg).await;
    publish_n(&conn, &cfg.amqp.queue, 1).await;
    let sidecar = start(cfg.clone()).await;
    let dlq = cfg.dead_letter.queue_for(&cfg.amqp.queue);
    wait_until("dead-lettered", Duration::from_secs(15), || async {
        ready(&conn, &dlq).await == 1
    })
    .await;
    sidecar.stop().await.expect("clean stop");
    server.abort();
    let dead = take_all(&conn, &dlq).await;
    assert_dead_letter_headers(&dead_letter_headers(&dead[0]), "rejected", 1, 422);
    cleanup(&conn, &cfg).await;
}
