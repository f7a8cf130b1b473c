//! Broker-level faults: every connection closed, the broker application stopped and
//! started, the broker down at start. These disturb every client of the broker, so they
//! run one at a time (`FAULTS`), in their own test binary; `cargo test` runs test binaries
//! one after another, so no other test sees these faults. Each ends with the accounting.

mod support;

use std::time::{Duration, Instant};

use support::*;

/// Serialises the tests in this binary.
static FAULTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Restarts the broker application if a test stopped it and then failed.
struct RestoreBroker;

impl Drop for RestoreBroker {
    fn drop(&mut self) {
        let _ = std::process::Command::new(
            std::env::var("RABBITMQCTL").unwrap_or_else(|_| "rabbitmqctl".into()),
        )
        .arg("start_app")
        .status();
    }
}

fn recoveries() -> f64 {
    metric_value(
        &amqp_sidecar::metrics::install().render(),
        "amqp_sidecar_connection_recoveries_total",
        &[],
    )
}

async fn wait_broker_up() {
    rabbitmqctl(&["await_startup"]);
    wait_until(
        "broker accepts connections",
        Duration::from_secs(60),
        || async {
            lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
                .await
                .is_ok()
        },
    )
    .await;
}

/// Runs a steady stream of `n` messages through a sidecar, applies `fault` once a third is
/// done, and accounts for everything afterwards. Returns (recovery time, accounting).
async fn stream_through_fault(name: &str, fault: impl AsyncFnOnce()) -> (Duration, Accounting) {
    let conn = broker().await;
    let queue = unique(name);
    let worker = Worker::builder()
        .latency(Duration::from_millis(5))
        .spawn()
        .await;
    let mut cfg = config(&queue, vec![backend(&worker, 4)]);
    cfg.amqp.consumers = 4;
    cfg.amqp.reconnect_initial_ms = 100;
    cfg.amqp.reconnect_max_ms = 1_000;
    declare(&conn, &cfg).await;
    const N: usize = 600;
    publish_n(&conn, &queue, N).await;
    drop(conn);
    let before = recoveries();
    let sidecar = start(cfg.clone()).await;
    wait_until("a third processed", Duration::from_secs(60), || async {
        worker.succeeded().len() >= N / 3
    })
    .await;
    let readyz = format!("http://{}/readyz", sidecar.admin);
    let fault_at = Instant::now();
    fault().await;
    wait_until("recovered", Duration::from_secs(90), || async {
        recoveries() > before
    })
    .await;
    let recovery = fault_at.elapsed();
    let conn = broker().await;
    wait_until("everything processed", Duration::from_secs(90), || async {
        worker.succeeded().len() >= N
            && try_ready(&conn, &queue).await == Some(0)
            && worker.in_flight() == 0
            && http()
                .get(&readyz)
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
    })
    .await;
    sidecar.stop().await.expect("clean stop");
    let acc = account(&conn, &cfg, N, &[&worker]).await;
    acc.assert_no_loss(name);
    println!(
        "[{name}] recovery {recovery:?}, duplicates {}",
        acc.duplicates
    );
    // Only deliveries in flight at the fault (consumers × prefetch = 4) may come again.
    assert!(acc.duplicates <= 4, "{name}: {} duplicates", acc.duplicates);
    cleanup(&conn, &cfg).await;
    (recovery, acc)
}

#[tokio::test]
async fn close_all_connections_during_a_steady_stream() {
    let _serial = FAULTS.lock().await;
    stream_through_fault("close-all", async || {
        rabbitmqctl(&["close_all_connections", "amqp-sidecar fault test"]);
    })
    .await;
}

#[tokio::test]
async fn broker_stop_app_start_app_during_a_stream() {
    let _serial = FAULTS.lock().await;
    let _restore = RestoreBroker;
    stream_through_fault("restart", async || {
        rabbitmqctl(&["stop_app"]);
        tokio::time::sleep(Duration::from_secs(2)).await; // the broker stays down a while
        rabbitmqctl(&["start_app"]);
        wait_broker_up().await;
    })
    .await;
}

#[tokio::test]
async fn broker_down_at_start_then_up() {
    let _serial = FAULTS.lock().await;
    let _restore = RestoreBroker;
    let queue = unique("down-at-start");
    let worker = Worker::builder().spawn().await;
    let mut cfg = config(&queue, vec![backend(&worker, 2)]);
    cfg.amqp.reconnect_initial_ms = 100;
    cfg.amqp.reconnect_max_ms = 1_000;
    rabbitmqctl(&["stop_app"]);
    let sidecar = start_unready(cfg.clone()).await;
    let base = format!("http://{}", sidecar.admin);
    wait_until(
        "/readyz 503 while the broker is down",
        Duration::from_secs(10),
        || async {
            let r = http().get(format!("{base}/readyz")).send().await;
            match r {
                Ok(r) if r.status() == 503 => r
                    .text()
                    .await
                    .unwrap_or_default()
                    .contains("cannot connect"),
                _ => false,
            }
        },
    )
    .await;
    assert_eq!(
        http()
            .get(format!("{base}/healthz"))
            .send()
            .await
            .expect("healthz")
            .status(),
        200
    );
    assert_eq!(
        metric_value(
            &amqp_sidecar::metrics::install().render(),
            "amqp_sidecar_connected",
            &[]
        ),
        0.0
    );
    assert!(!sidecar.is_finished(), "keeps retrying, does not exit");
    let up_at = Instant::now();
    rabbitmqctl(&["start_app"]);
    wait_broker_up().await;
    wait_until(
        "ready once the broker is up",
        Duration::from_secs(30),
        || async {
            http()
                .get(format!("{base}/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        },
    )
    .await;
    println!(
        "[down-at-start] ready {:?} after start_app",
        up_at.elapsed()
    );
    let conn = broker().await;
    publish_n(&conn, &queue, 50).await;
    wait_until("consumed", Duration::from_secs(30), || async {
        worker.succeeded().len() == 50
    })
    .await;
    sidecar.stop().await.expect("clean stop");
    let acc = account(&conn, &cfg, 50, &[&worker]).await;
    acc.assert_no_loss("down-at-start");
    cleanup(&conn, &cfg).await;
}

/// A memory alarm on the default broker, raised by setting the watermark near zero. It
/// blocks every publishing connection on the broker, so only tests holding `FAULTS` may
/// raise one. Dropping it restores the watermark, whatever happened.
struct MemoryAlarm {
    watermark: String,
}

fn alarms() -> String {
    rabbitmqctl(&["eval", "rabbit_alarm:get_alarms()."])
}

impl MemoryAlarm {
    async fn raise() -> Self {
        let watermark = rabbitmqctl(&["eval", "vm_memory_monitor:get_vm_memory_high_watermark()."])
            .trim()
            .to_owned();
        assert!(
            watermark.parse::<f64>().is_ok(),
            "a relative watermark is expected, found {watermark}"
        );
        let alarm = Self { watermark };
        rabbitmqctl(&["set_vm_memory_high_watermark", "0.000001"]);
        wait_until("memory alarm raised", Duration::from_secs(30), || async {
            alarms().contains("memory")
        })
        .await;
        alarm
    }

    async fn lift(self) {
        drop(self);
        wait_until("memory alarm cleared", Duration::from_secs(30), || async {
            !alarms().contains("memory")
        })
        .await;
    }
}

impl Drop for MemoryAlarm {
    fn drop(&mut self) {
        let _ = std::process::Command::new(
            std::env::var("RABBITMQCTL").unwrap_or_else(|_| "rabbitmqctl".into()),
        )
        .args(["set_vm_memory_high_watermark", &self.watermark])
        .status();
    }
}

/// A worker that rejects (422) the messages whose id is in `reject`, and takes the rest.
async fn rejecting_worker(reject: &'static [&'static str]) -> Worker {
    Worker::builder()
        .respond(move |r, _| {
            if reject.contains(&r.header("x-amqp-message-id").unwrap_or("")) {
                Reply::status(422)
            } else {
                Reply::status(200)
            }
        })
        .spawn()
        .await
}

fn alarm_config(queue: &str, worker: &Worker) -> amqp_sidecar::config::Config {
    let mut cfg = config(queue, vec![backend(worker, 4)]);
    cfg.amqp.consumers = 4;
    cfg.dead_letter.confirm_timeout_ms = 2_000;
    cfg.shutdown.grace_ms = 3_000;
    cfg.retry.backoff_initial_ms = 100;
    cfg.retry.backoff_max_ms = 500;
    cfg
}

/// Issue 18, defect 4: under a memory alarm the dead-letter connection is blocked. Good
/// messages keep flowing, the block is reported, and once the alarm clears each rejected
/// message is in the DLQ exactly once, even those whose first copy was sent into the
/// alarm and confirmed only after it.
#[tokio::test]
async fn a_memory_alarm_blocks_dead_letters_but_not_good_messages_and_no_copy_is_doubled() {
    let _serial = FAULTS.lock().await;
    let conn = broker().await;
    let queue = unique("alarm");
    let worker = rejecting_worker(&["m-0", "m-1", "m-2"]).await;
    let cfg = alarm_config(&queue, &worker);
    let dlq = cfg.dead_letter.queue_for(&queue);
    declare(&conn, &cfg).await;
    const N: usize = 33;
    publish_n(&conn, &queue, N).await;
    let alarm = MemoryAlarm::raise().await;
    let mut sidecar = spawn_binary(&cfg);
    sidecar.wait_ready().await;
    let readyz = format!("http://{}/readyz", sidecar.admin);
    wait_until(
        "the 30 good messages flow under the alarm",
        Duration::from_secs(60),
        || async { worker.succeeded().len() >= N - 3 },
    )
    .await;
    wait_until(
        "the blocked dead-letter connection is reported",
        Duration::from_secs(30),
        || async {
            sidecar
                .metric("amqp_sidecar_dead_letter_blocked", &[])
                .await
                == 1.0
                && get_text(&readyz)
                    .await
                    .contains("blocks the dead-letter connection")
        },
    )
    .await;
    assert_eq!(
        sidecar.readyz().await,
        Some(200),
        "a broker alarm does not make the pod unready"
    );
    assert_eq!(
        ready(&conn, &dlq).await,
        0,
        "nothing stored during the alarm"
    );
    // Each waiting dead-letter gives up after the confirm timeout and requeues; the second
    // round finds its first copy still unconfirmed and sends nothing.
    wait_until(
        "the waiting dead-letters give up and requeue",
        Duration::from_secs(30),
        || async {
            sidecar
                .metric("amqp_sidecar_dead_letter_failures_total", &[])
                .await
                >= 6.0
        },
    )
    .await;
    let failures = sidecar
        .metric("amqp_sidecar_dead_letter_failures_total", &[])
        .await;
    alarm.lift().await;
    wait_until(
        "the 3 rejected messages dead-lettered after the alarm, no copy unconfirmed",
        Duration::from_secs(60),
        || async {
            sidecar
                .metric("amqp_sidecar_dead_letters_total", &[("queue", &queue)])
                .await
                == 3.0
                && sidecar
                    .metric("amqp_sidecar_dead_letter_unconfirmed", &[])
                    .await
                    == 0.0
                && sidecar
                    .metric("amqp_sidecar_dead_letter_blocked", &[])
                    .await
                    == 0.0
                && try_ready(&conn, &queue).await == Some(0)
        },
    )
    .await;
    let log = sidecar.log();
    for l in log
        .lines()
        .filter(|l| l.contains("dead-") || l.contains("blocks"))
    {
        println!("[alarm] log: {l}");
    }
    sidecar.signal("TERM");
    assert!(sidecar.wait(Duration::from_secs(10)).await.success());
    let acc = account(&conn, &cfg, N, &[&worker]).await;
    acc.assert_no_loss("alarm");
    let reused = log.matches("earlier_copy=true").count();
    println!(
        "[alarm] dead-letter failures during the alarm: {failures}; earlier copies reused: {reused}"
    );
    // The broker blocks a connection only once it publishes, so the first copy always goes
    // out into the alarm, unconfirmed; its late confirm is what lets the original be acked.
    assert!(reused >= 1, "no copy was sent into the alarm:\n{log}");
    assert_eq!(acc.dead_lettered, 3, "{acc:?}");
    assert_eq!(
        acc.duplicates, 0,
        "each rejected message stored once: {acc:?}"
    );
    cleanup(&conn, &cfg).await;
}

/// Issue 18, defect 4: SIGTERM while a dead-letter waits on a blocked connection exits
/// within `shutdown.grace_ms` + 5 s, and the message is not lost.
#[tokio::test]
async fn sigterm_during_a_memory_alarm_exits_within_the_grace_period() {
    let _serial = FAULTS.lock().await;
    let conn = broker().await;
    let queue = unique("alarm-term");
    let worker = rejecting_worker(&["m-0"]).await;
    let cfg = alarm_config(&queue, &worker);
    declare(&conn, &cfg).await;
    publish_n(&conn, &queue, 1).await;
    let alarm = MemoryAlarm::raise().await;
    let mut sidecar = spawn_binary(&cfg);
    // The worker has rejected it twice: its first copy went out into the alarm and timed
    // out, and the redelivery is in the dead-letter path again, on a blocked connection.
    wait_until(
        "the message rejected twice",
        Duration::from_secs(30),
        || async { worker.count() >= 2 },
    )
    .await;
    let term_at = Instant::now();
    sidecar.signal("TERM");
    let grace = Duration::from_millis(cfg.shutdown.grace_ms);
    let status = sidecar.wait(grace + Duration::from_secs(5)).await;
    let took = term_at.elapsed();
    println!("[alarm-term] exited {took:?} after SIGTERM (grace {grace:?})");
    assert!(status.success(), "{status:?}\n{}", sidecar.log());
    alarm.lift().await;
    // The copy sent into the alarm may be stored when it clears (at-least-once); the
    // original was never acked, so it is back in the queue either way.
    wait_until("the original is back", Duration::from_secs(30), || async {
        try_ready(&conn, &queue).await == Some(1)
    })
    .await;
    let acc = account(&conn, &cfg, 1, &[&worker]).await;
    acc.assert_no_loss("alarm-term");
    cleanup(&conn, &cfg).await;
}
