//! Worker outages (issue 11): a backend that is down, restarting or unreachable never costs
//! a message an attempt and never sends it to the dead-letter queue; HTTPS backends work,
//! with a private CA and with a client certificate.

mod support;

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use amqp_sidecar::config::{BackendConfig, QueueType};
use support::*;

/// A loopback address outside the ephemeral range, with nothing listening yet.
fn closed_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

fn backend_at(url: String) -> BackendConfig {
    BackendConfig {
        max_in_flight: 4.into(),
        timeout_ms: 5_000,
        ..BackendConfig::new(url)
    }
}

/// Attempt numbers the worker saw (`X-Amqp-Attempt`).
fn attempts(worker: &Worker) -> Vec<u32> {
    worker
        .requests()
        .iter()
        .map(|r| {
            r.header("x-amqp-attempt")
                .and_then(|a| a.parse().ok())
                .unwrap_or(0)
        })
        .collect()
}

/// The scenario: one worker on a port with nothing listening for 10 s, then
/// started; 50 messages on a classic queue and 50 on a quorum queue, one sidecar binary
/// each (per-process metrics).
#[tokio::test]
async fn a_worker_down_for_10_s_costs_no_attempt_and_nothing_is_dead_lettered() {
    const N: usize = 50;
    const OUTAGE: Duration = Duration::from_secs(10);
    let conn = broker().await;
    let mut runs = Vec::new();
    for kind in [QueueType::Classic, QueueType::Quorum] {
        let addr = closed_port();
        let queue = unique(&format!("outage-{kind:?}").to_lowercase());
        let mut cfg = config(&queue, vec![backend_at(format!("http://{addr}/"))]);
        cfg.amqp.queue_type = kind;
        declare(&conn, &cfg).await;
        publish_n(&conn, &queue, N).await;
        runs.push((kind, addr, cfg));
    }
    let down_at = Instant::now();
    let sidecars: Vec<Process> = runs.iter().map(|(_, _, cfg)| spawn_binary(cfg)).collect();
    for (s, (kind, _, _)) in sidecars.iter().zip(&runs) {
        let readyz = format!("http://{}/readyz", s.admin);
        wait_until(
            &format!("{kind:?}: paused, unready, the backend named unreachable"),
            Duration::from_secs(10),
            || async {
                if s.readyz().await != Some(503) {
                    return false;
                }
                let r = get_text(&readyz).await;
                s.metric("amqp_sidecar_paused", &[]).await == 1.0
                    && s.metric("amqp_sidecar_backend_unreachable", &[]).await == 1.0
                    && s.metric("amqp_sidecar_backend_healthy", &[]).await == 0.0
                    && r.contains("unreachable")
                    && r.contains("Connection refused")
            },
        )
        .await;
    }
    let paused_after = down_at.elapsed();
    // The outage lasts its 10 s (the scenario, not a wait for a condition).
    tokio::time::sleep(OUTAGE.saturating_sub(down_at.elapsed())).await;
    let mut workers = Vec::new();
    for (_, addr, _) in &runs {
        workers.push(Worker::builder().on(*addr).spawn().await);
    }
    let up_at = Instant::now();
    wait_until("everything delivered", Duration::from_secs(60), || async {
        workers.iter().all(|w| w.succeeded().len() >= N)
    })
    .await;
    for ((kind, _, cfg), (worker, mut sidecar)) in
        runs.iter().zip(workers.iter().zip(sidecars.into_iter()))
    {
        let first = worker
            .requests()
            .iter()
            .map(|r| r.at)
            .min()
            .expect("a request");
        let resumed = first.duration_since(up_at);
        let seen = attempts(worker);
        let log = sidecar.log();
        sidecar.signal("TERM");
        assert!(sidecar.wait(Duration::from_secs(30)).await.success());
        let acc = account(&conn, cfg, N, &[worker]).await;
        acc.assert_no_loss(&format!("outage-{kind:?}"));
        println!(
            "[outage] {kind:?}: paused {paused_after:?} after start; first delivery {resumed:?} after the worker listened; attempts seen {:?}",
            {
                let mut s = seen.clone();
                s.sort_unstable();
                s.dedup();
                s
            }
        );
        assert_eq!(acc.dead_lettered, 0, "{kind:?}: nothing dead-lettered");
        assert_eq!(acc.succeeded, N, "{kind:?}: all delivered");
        assert!(
            resumed < Duration::from_millis(1_500),
            "{kind:?}: resumed {resumed:?} after the worker came back\n{log}"
        );
        if *kind == QueueType::Classic {
            assert!(
                seen.iter().all(|&a| a == 1),
                "classic: every message at attempt 1: {seen:?}"
            );
        }
        cleanup(&conn, cfg).await;
    }
}

/// Two workers, one refusing connections: every message reaches the live one at attempt
/// 1, nothing is dead-lettered, and the sidecar stays ready with the dead one named.
#[tokio::test]
async fn one_of_two_workers_refuses_and_every_message_reaches_the_other_at_attempt_1() {
    let conn = broker().await;
    let queue = unique("one-refuses");
    let live = Worker::builder()
        .latency(Duration::from_millis(2))
        .spawn()
        .await;
    let dead = closed_port();
    let mut cfg = config(
        &queue,
        vec![backend_at(format!("http://{dead}/")), backend(&live, 4)],
    );
    cfg.amqp.consumers = 4;
    declare(&conn, &cfg).await;
    const N: usize = 100;
    publish_n(&conn, &queue, N).await;
    let sidecar = start(cfg.clone()).await;
    wait_until("all delivered", Duration::from_secs(30), || async {
        live.succeeded().len() >= N && try_ready(&conn, &queue).await == Some(0)
    })
    .await;
    let readiness = sidecar.readiness().await;
    assert_eq!(readiness["ready"], true, "{readiness}");
    let unusable = readiness["unusable_backends"].to_string();
    assert!(
        unusable.contains(&dead.to_string()) && unusable.contains("unreachable"),
        "{unusable}"
    );
    sidecar.stop().await.expect("clean stop");
    let seen = attempts(&live);
    assert!(seen.iter().all(|&a| a == 1), "attempts {seen:?}");
    let acc = account(&conn, &cfg, N, &[&live]).await;
    acc.assert_no_loss("one-refuses");
    assert_eq!(acc.dead_lettered, 0);
    cleanup(&conn, &cfg).await;
}

/// A worker killed and restarted three times during a 2,000-message run: nothing lost,
/// nothing dead-lettered. Requests cut by a kill may have been processed, so they are
/// attempts and may come again (duplicates are reported); refused connections are not.
#[tokio::test]
async fn a_worker_killed_and_restarted_three_times_loses_nothing() {
    const N: usize = 2_000;
    let conn = broker().await;
    let queue = unique("restarts");
    let addr = closed_port();
    let spawn = || {
        Worker::builder()
            .latency(Duration::from_millis(1))
            .on(addr)
            .spawn()
    };
    let mut cfg = config(&queue, vec![backend_at(format!("http://{addr}/"))]);
    cfg.amqp.consumers = 4;
    declare(&conn, &cfg).await;
    publish_n(&conn, &queue, N).await;
    let mut workers = vec![spawn().await];
    let sidecar = start(cfg.clone()).await;
    let done = |ws: &[Worker]| ws.iter().map(|w| w.succeeded().len()).sum::<usize>();
    for k in 1..=3 {
        wait_until(
            &format!("{k}/4 of the run done"),
            Duration::from_secs(60),
            || async { done(&workers) >= N * k / 4 },
        )
        .await;
        workers.last().expect("worker").kill();
        // The restart takes a while, as a container's would (the scenario, not a wait).
        tokio::time::sleep(Duration::from_millis(500)).await;
        workers.push(spawn().await);
    }
    wait_until("everything processed", Duration::from_secs(60), || async {
        done(&workers) >= N && try_ready(&conn, &queue).await == Some(0)
    })
    .await;
    sidecar.stop().await.expect("clean stop");
    let refs: Vec<&Worker> = workers.iter().collect();
    let acc = account(&conn, &cfg, N, &refs).await;
    acc.assert_no_loss("restarts");
    println!(
        "[restarts] 3 kills: duplicates {} (requests cut mid-flight, retried)",
        acc.duplicates
    );
    assert_eq!(acc.dead_lettered, 0, "{acc:?}");
    cleanup(&conn, &cfg).await;
}

/// A TLS worker behind `https://localhost:<port>/`.
async fn tls_worker(
    config: std::sync::Arc<tokio_rustls::rustls::ServerConfig>,
) -> (Worker, String) {
    let w = Worker::builder().tls(config).spawn().await;
    let url = format!("https://localhost:{}/", w.addr.port());
    (w, url)
}

/// HTTPS with a private CA: trusted through `backend.ca_file`, every message delivered;
/// without it, the certificate is not trusted, the backend is unreachable, consumption
/// pauses, /readyz names the certificate problem, and nothing is dead-lettered.
#[tokio::test]
async fn https_backends_with_a_private_ca() {
    let pki = tls::Pki::new();
    let conn = broker().await;
    let (worker, url) = tls_worker(pki.server()).await;

    let queue = unique("https");
    let mut cfg = config(&queue, vec![backend_at(url.clone())]);
    cfg.backend.ca_file = Some(pki.ca_file.clone());
    declare(&conn, &cfg).await;
    publish_n(&conn, &queue, 20).await;
    let sidecar = start(cfg.clone()).await;
    wait_until("delivered over https", Duration::from_secs(30), || async {
        worker.succeeded().len() >= 20
    })
    .await;
    sidecar.stop().await.expect("clean stop");
    let acc = account(&conn, &cfg, 20, &[&worker]).await;
    acc.assert_no_loss("https");
    assert_eq!(acc.succeeded, 20);
    cleanup(&conn, &cfg).await;

    let queue = unique("https-untrusted");
    let cfg = config(&queue, vec![backend_at(url)]);
    declare(&conn, &cfg).await;
    publish_n(&conn, &queue, 5).await;
    let sidecar = start_unready(cfg.clone()).await;
    wait_until(
        "paused, the certificate named",
        Duration::from_secs(20),
        || async {
            let r = sidecar.readiness().await;
            let text = r.to_string();
            r["paused"] == true && text.contains("unreachable") && text.contains("certificate")
        },
    )
    .await;
    let reasons = sidecar.readiness().await["reasons"].to_string();
    println!("[https-untrusted] /readyz reasons: {reasons}");
    sidecar.stop().await.expect("clean stop");
    let acc = account(&conn, &cfg, 5, &[]).await;
    acc.assert_no_loss("https-untrusted");
    assert_eq!(acc.dead_lettered, 0, "{acc:?}");
    assert_eq!(acc.remaining, 5, "{acc:?}");
    cleanup(&conn, &cfg).await;
}

/// mTLS: a worker that requires a client certificate gets the sidecar's
/// (`backend.client_cert_file` / `client_key_file`); without one, its handshake fails and
/// nothing is dead-lettered.
#[tokio::test]
async fn mtls_backends_get_the_client_certificate() {
    let pki = tls::Pki::new();
    let conn = broker().await;
    let (worker, url) = tls_worker(pki.server_requiring_client_cert()).await;

    let queue = unique("mtls");
    let mut cfg = config(&queue, vec![backend_at(url.clone())]);
    cfg.backend.ca_file = Some(pki.ca_file.clone());
    cfg.backend.client_cert_file = Some(pki.client_cert_file.clone());
    cfg.backend.client_key_file = Some(pki.client_key_file.clone());
    declare(&conn, &cfg).await;
    publish_n(&conn, &queue, 10).await;
    let sidecar = start(cfg.clone()).await;
    wait_until("delivered over mTLS", Duration::from_secs(30), || async {
        worker.succeeded().len() >= 10
    })
    .await;
    sidecar.stop().await.expect("clean stop");
    let acc = account(&conn, &cfg, 10, &[&worker]).await;
    acc.assert_no_loss("mtls");
    cleanup(&conn, &cfg).await;

    let queue = unique("mtls-no-cert");
    let mut cfg = config(&queue, vec![backend_at(url)]);
    cfg.backend.ca_file = Some(pki.ca_file.clone());
    declare(&conn, &cfg).await;
    publish_n(&conn, &queue, 3).await;
    let before = worker.count();
    let sidecar = start_unready(cfg.clone()).await;
    wait_until(
        "paused without a client certificate",
        Duration::from_secs(20),
        || async { sidecar.readiness().await["paused"] == true },
    )
    .await;
    sidecar.stop().await.expect("clean stop");
    assert_eq!(
        worker.count(),
        before,
        "no request got through without a certificate"
    );
    let acc = account(&conn, &cfg, 3, &[]).await;
    acc.assert_no_loss("mtls-no-cert");
    assert_eq!(acc.dead_lettered, 0, "{acc:?}");
    cleanup(&conn, &cfg).await;
}
