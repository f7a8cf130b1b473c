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
