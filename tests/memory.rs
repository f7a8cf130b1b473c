//! The memory budget (issue 19): a burst of large messages is held within
//! `memory.limit_bytes`, every message is processed, and none is requeued for memory.

mod support;

use std::time::{Duration, Instant};

use amqp_sidecar::config::QueueType;
use lapin::{BasicProperties, types::ShortString};
use support::*;

const MIB: u64 = 1024 * 1024;

/// The peak resident set (VmHWM) of a process, in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmHWM")
        * 1024
}

/// Runs `n` messages of `body` bytes through a sidecar with 8 slots and an optional
/// budget, in front of a worker that takes 2 s per message (so the 8 slots fill up even
/// at a debug build's delivery rate); returns its peak RSS and its requeue and release counts.
async fn burst(budget: Option<u64>, n: usize, body: usize) -> (u64, f64, f64) {
    let conn = broker().await;
    let queue = unique("memory");
    let worker = Worker::builder()
        .latency(Duration::from_secs(2))
        .spawn()
        .await;
    let mut cfg = config(&queue, vec![backend(&worker, 8)]);
    cfg.amqp.queue_type = QueueType::Classic;
    cfg.memory.limit_bytes = budget;
    declare(&conn, &cfg).await;
    let payload = vec![b'x'; body];
    for i in 0..n {
        publish(
            &conn,
            &queue,
            &payload,
            BasicProperties::default().with_message_id(ShortString::from(format!("m-{i}"))),
        )
        .await;
    }
    let process = spawn_binary(&cfg);
    process.wait_ready().await;
    let deadline = Instant::now() + Duration::from_secs(120);
    while worker.succeeded().len() < n {
        assert!(Instant::now() < deadline, "all processed within 120 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rss = peak_rss(process.pid());
    let requeues = process
        .metric("amqp_sidecar_requeues_total", &[("queue", &queue)])
        .await;
    let releases = process
        .metric("amqp_sidecar_releases_total", &[("queue", &queue)])
        .await;
    drop(process);
    account(&conn, &cfg, n, &[&worker])
        .await
        .assert_no_loss("memory burst");
    cleanup(&conn, &cfg).await;
    (rss, requeues, releases)
}

/// 8 slots, a 64 MiB budget, 16 messages of 15 MiB: the peak RSS stays near the budget
/// (bodies within it, plus the sidecar's baseline), far below the unbudgeted run's, and
/// nothing is lost or requeued for memory.
#[tokio::test]
async fn a_burst_of_large_messages_stays_within_the_budget() {
    let (unbudgeted, _, _) = burst(None, 16, 15 * MIB as usize).await;
    let (budgeted, requeues, releases) = burst(Some(64 * MIB), 16, 15 * MIB as usize).await;
    println!(
        "[memory] 16 x 15 MiB on 8 slots: peak RSS {} MiB without a budget, {} MiB with 64 MiB",
        unbudgeted / MIB,
        budgeted / MIB
    );
    assert_eq!(requeues, 0.0, "nothing requeued for memory");
    assert_eq!(releases, 0.0, "nothing handed back for memory");
    // The bodies within 64 MiB, plus the baseline (a debug build's, under a parallel test
    // run) and the body in transfer: the AMQP client appends a body's frames to a growing
    // buffer, so a body being received briefly takes up to about 1.5x its size.
    assert!(
        budgeted <= 64 * MIB + 64 * MIB,
        "peak RSS {} MiB",
        budgeted / MIB
    );
    assert!(
        budgeted + 32 * MIB < unbudgeted,
        "the budget makes a difference: {} against {} MiB",
        budgeted / MIB,
        unbudgeted / MIB
    );
}
