//! The pool's unit tests (ejection, publication of the usable count, leases).

use super::*;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

fn pool(caps: &[(u32, u32)]) -> Arc<Pool> {
    Pool::new(
        caps,
        Box::new(LeastInFlight::default()),
        EjectionConfig::default(),
        Hooks::none(),
    )
}

fn ejecting(n: usize, threshold: u32, max_percent: u8) -> Arc<Pool> {
    let caps = vec![(1, 1); n];
    let cfg = EjectionConfig {
        consecutive_failures: threshold,
        base_ms: 1_000,
        max_ms: 2_500,
        max_percent,
    };
    Pool::new(
        &caps,
        Box::new(LeastInFlight::default()),
        cfg,
        Hooks::none(),
    )
}

#[test]
fn consecutive_failures_eject_with_growing_duration_then_return() {
    let p = ejecting(2, 2, 50);
    let t0 = Instant::now();
    assert_eq!(p.report_at(0, Observed::Failed, t0), None);
    assert_eq!(
        p.report_at(0, Observed::Failed, t0),
        Some(Duration::from_secs(1))
    );
    assert!(!p.lock().usable_at(0, t0));
    // While ejected, only backend 1 is picked.
    let lease = p.try_acquire_at(t0).expect("backend 1 free");
    assert_eq!(lease.index(), 1);
    assert!(
        matches!(p.try_acquire_at(t0), Err(Some(_))),
        "reports when backend 0 returns"
    );
    drop(lease);
    // Back after 1 s; the second ejection lasts 2 s, the third is capped at 2.5 s.
    let t1 = t0 + Duration::from_millis(1_001);
    assert!(p.try_acquire_at(t1).is_ok());
    p.report_at(0, Observed::Failed, t1);
    assert_eq!(
        p.report_at(0, Observed::Failed, t1),
        Some(Duration::from_secs(2))
    );
    let t2 = t1 + Duration::from_millis(2_001);
    p.report_at(0, Observed::Failed, t2);
    assert_eq!(
        p.report_at(0, Observed::Failed, t2),
        Some(Duration::from_millis(2_500))
    );
}

#[test]
fn a_success_resets_the_failure_streak() {
    let p = ejecting(2, 2, 50);
    let t = Instant::now();
    p.report_at(0, Observed::Failed, t);
    p.report_at(0, Observed::Answered, t);
    assert_eq!(p.report_at(0, Observed::Failed, t), None);
}

#[test]
fn never_ejects_more_than_max_percent() {
    let p = ejecting(4, 1, 50);
    let t = Instant::now();
    assert!(p.report_at(0, Observed::Failed, t).is_some());
    assert!(p.report_at(1, Observed::Failed, t).is_some());
    assert_eq!(
        p.report_at(2, Observed::Failed, t),
        None,
        "2 of 4 is already 50%"
    );
    let single = ejecting(1, 1, 50);
    assert_eq!(
        single.report_at(0, Observed::Failed, t),
        None,
        "a lone backend is never ejected"
    );
    assert_eq!(*p.usable().borrow(), 2);
}

#[test]
fn unhealthy_backends_are_skipped() {
    let p = pool(&[(1, 1), (1, 1)]);
    p.set_healthy(0, false);
    let lease = p.try_acquire().expect("backend 1 is free");
    assert_eq!(lease.index(), 1);
    assert!(
        p.try_acquire().is_none(),
        "backend 0 is unhealthy, backend 1 is full"
    );
    assert_eq!(*p.usable().borrow(), 1);
}

#[test]
fn lease_drop_releases() {
    let p = pool(&[(1, 1)]);
    let lease = p.try_acquire().expect("free");
    assert!(p.try_acquire().is_none());
    drop(lease);
    assert_eq!(p.loads()[0].in_flight, 0);
    assert!(p.try_acquire().is_some());
}

/// Issue 17: an ejection that expires is first seen by the pause-time probe
/// (`is_usable`), then by the expiry refresh. The usable count must still be published,
/// or a paused sidecar waits on the watch forever.
#[tokio::test(start_paused = true)]
async fn an_expiry_seen_first_by_the_probe_is_still_published() {
    let p = ejecting(2, 1, 100);
    let mut usable = p.usable();
    assert!(p.report(0, Observed::Failed).is_some());
    assert!(p.report(1, Observed::Failed).is_some());
    assert_eq!(*usable.borrow_and_update(), 0, "both ejected");
    tokio::time::advance(Duration::from_millis(1_001)).await;
    // The probe looks first...
    assert!(p.is_usable(0));
    assert!(p.is_usable(1));
    // ...then the expiry refresh runs.
    p.refresh();
    assert_eq!(
        *usable.borrow_and_update(),
        2,
        "the expiry must reach the watch whoever saw it first"
    );
}

/// Issue 17, property style: random sequences of failures, successes, health flips,
/// probes (read, then readmit), refreshes, leases and clock advances, with the
/// [`EjectionClock`] running. After every step the published usable count equals the
/// pool's recorded state and agrees with the pure readers; after a clock advance it
/// also counts every ejection whose time is up as over (no probe or refresh needed).
#[tokio::test(start_paused = true)]
async fn the_published_usable_count_always_matches_the_pool() {
    use rand::{Rng, SeedableRng, rngs::StdRng};
    for seed in 0..200u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let n = rng.random_range(1..=4usize);
        let cfg = EjectionConfig {
            consecutive_failures: rng.random_range(1..=3),
            base_ms: rng.random_range(50..=1_000),
            max_ms: 2_000,
            max_percent: [50, 100][rng.random_range(0..2)],
        };
        let p = Pool::new(
            &vec![(2, 1); n],
            Box::new(LeastInFlight::default()),
            cfg,
            Hooks::none(),
        );
        let stop = CancellationToken::new();
        let clock = tokio::spawn(EjectionClock::new(Arc::clone(&p)).run(stop.clone()));
        let usable = p.usable();
        let mut leases = Vec::new();
        for step in 0..150 {
            let i = rng.random_range(0..n);
            let op = rng.random_range(0..8);
            match op {
                0 | 1 => drop(p.report(i, Observed::Failed)),
                2 => drop(p.report(i, Observed::Answered)),
                3 => p.set_healthy(i, rng.random_bool(0.7)),
                4 => {
                    // The pause-time probe: a read, then a readmit if unusable.
                    if !p.is_usable(i) && rng.random_bool(0.5) {
                        p.readmit(i);
                    }
                }
                5 => p.refresh(),
                6 => {
                    if let Some(lease) = p.try_acquire() {
                        leases.push(lease);
                    } else if !leases.is_empty() {
                        leases.swap_remove(0);
                    }
                }
                _ => {
                    let ms = rng.random_range(0..1_500);
                    tokio::time::advance(Duration::from_millis(ms)).await;
                }
            }
            // Let the clock task run (paused time: it fires as soon as it is polled).
            for _ in 0..4 {
                tokio::task::yield_now().await;
            }
            let published = *usable.borrow();
            let ctx = format!("seed {seed} step {step} op {op}");
            assert_eq!(published, p.usable_recorded(), "{ctx}: recorded state");
            assert_eq!(published, p.usable_now(), "{ctx}: expiries published");
            let by_reader = (0..n).filter(|&b| p.is_usable(b)).count();
            assert_eq!(published, by_reader, "{ctx}: readers agree");
            let by_loads = p.loads().iter().filter(|l| l.usable).count();
            assert_eq!(published, by_loads, "{ctx}: load snapshot agrees");
        }
        stop.cancel();
        clock.await.expect("clock task");
    }
}

#[tokio::test]
async fn acquire_waits_for_release() {
    let p = pool(&[(1, 1)]);
    let lease = p.try_acquire().expect("free");
    let p2 = Arc::clone(&p);
    let waiter = tokio::spawn(async move { p2.acquire().await.index() });
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    assert!(!waiter.is_finished(), "must wait while full");
    drop(lease);
    let got = tokio::time::timeout(Duration::from_secs(1), waiter)
        .await
        .expect("woken by the release")
        .expect("task");
    assert_eq!(got, 0);
}

#[tokio::test]
async fn cancelled_waiter_passes_the_wakeup_on() {
    let p = pool(&[(1, 1)]);
    let lease = p.try_acquire().expect("free");
    let p1 = Arc::clone(&p);
    let first = tokio::spawn(async move { p1.acquire().await });
    let p2 = Arc::clone(&p);
    let second = tokio::spawn(async move { p2.acquire().await.index() });
    tokio::task::yield_now().await;
    first.abort();
    drop(lease);
    let got = tokio::time::timeout(Duration::from_secs(1), second).await;
    assert!(matches!(got, Ok(Ok(0))), "second waiter must get the slot");
}
