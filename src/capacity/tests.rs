//! Unit tests of the consumer target, the retry waiting room and the memory admission.

use super::*;

#[test]
fn waiting_deliveries_are_bounded_and_counted() {
    let c = Capacity::with(2, 2);
    let a = c.wait(1);
    assert!(matches!(a, Wait::Beside(_)));
    let b = c.wait(2);
    assert!(matches!(b, Wait::Beside(_)));
    assert_eq!(c.waiting(), 2);
    assert_eq!(
        c.current().total(),
        2,
        "the consumer count stays at the target"
    );
    drop(a);
    drop(b);
    assert_eq!(c.waiting(), 0);
}

#[test]
fn beyond_the_bound_a_delivery_skips_once_then_waits_in_place() {
    let c = Capacity::with(1, 1);
    let held = c.wait(1);
    assert!(matches!(held, Wait::Beside(_)));
    // Bound reached: message 2 is requeued without a backoff ...
    assert!(matches!(c.wait(2), Wait::Skip));
    // ... and when it fails again with the bound still reached, it waits in place.
    let in_place = c.wait(2);
    assert!(matches!(in_place, Wait::InPlace(_)));
    assert_eq!(c.waiting(), 2);
    drop(in_place);
    // Its skip was forgotten with the in-place wait: next time it skips again.
    assert!(matches!(c.wait(2), Wait::Skip));
    drop(held);
    // Below the bound, a skipped delivery waits beside, and its skip is forgotten.
    let beside = c.wait(2);
    assert!(matches!(beside, Wait::Beside(_)));
    assert!(matches!(c.wait(3), Wait::Skip));
}

#[test]
fn a_zero_bound_never_waits_beside() {
    let c = Capacity::with(3, 0);
    assert!(matches!(c.wait(9), Wait::Skip));
    let w = c.wait(9);
    assert!(matches!(w, Wait::InPlace(_)));
}

const MIB: u64 = 1024 * 1024;

#[test]
fn the_memory_cap_admits_what_the_budget_takes() {
    // 8 slots, 64 MiB for bodies of up to 16 MiB: 4 idle consumers fit.
    let c = Capacity::with_budget(8, 0, 64 * MIB, 16 * MIB);
    assert_eq!(c.current().admitted(), 4);
    c.set_subscribed(4);
    // Four 15 MiB bodies arrive: all four consumers are busy, 4 MiB left: still 4.
    let held: Vec<Held> = (0..4).map(|_| c.hold(15 * MIB)).collect();
    assert_eq!(c.current().admitted(), 4);
    let memory = c.memory().expect("a budget");
    assert_eq!(memory.held_bytes, 60 * MIB);
    assert!(memory.limiting, "4 of the 8 wanted");
    // Settling one leaves its consumer idle with 45 MiB held: 45 + 16 fits.
    assert!(!held[0].retire_before_settle());
    drop(held);
    assert_eq!(c.memory().expect("budget").held_bytes, 0);
    // Small bodies leave room for more consumers than the slots: all 8.
    let small: Vec<Held> = (0..8).map(|_| c.hold(1_000)).collect();
    assert_eq!(c.current().admitted(), 8);
    drop(small);
}

#[test]
fn a_settle_past_the_budget_retires_its_consumer_first() {
    let c = Capacity::with_budget(4, 0, 50 * MIB, 16 * MIB);
    c.set_subscribed(4);
    let a = c.hold(15 * MIB);
    let b = c.hold(15 * MIB);
    // Two busy, two idle: settling one would leave 15 MiB held and 3 idle consumers
    // that could take 16 MiB each: 63 MiB > 50.
    assert!(a.retire_before_settle());
    c.set_subscribed(3);
    // One fewer subscribed: 15 + 2 x 16 = 47 fits.
    assert!(!b.retire_before_settle());
    // The last consumer is never retired.
    c.set_subscribed(1);
    let tiny = Capacity::with_budget(1, 0, 16 * MIB, 16 * MIB);
    tiny.set_subscribed(1);
    assert!(!tiny.hold(15 * MIB).retire_before_settle());
    drop((a, b));
}

#[test]
fn deliveries_of_gone_consumers_are_not_busy() {
    let c = Capacity::with_budget(4, 0, 64 * MIB, 16 * MIB);
    c.set_subscribed(4);
    let old = c.hold(15 * MIB);
    c.consumers_gone();
    // After a pause: the old delivery's bytes are still held, but it sits on no
    // consumer, so it admits only what the room left takes: 49 / 16 = 3.
    assert_eq!(c.current().admitted(), 3);
    assert!(!old.retire_before_settle(), "its consumer is gone already");
    drop(old);
    assert_eq!(c.current().admitted(), 4);
}

#[test]
fn without_a_budget_nothing_is_held_back() {
    let c = Capacity::with(4, 0);
    c.set_subscribed(4);
    let h = c.hold(500 * MIB);
    assert_eq!(c.current().admitted(), 4);
    assert!(!h.retire_before_settle());
    assert_eq!(c.memory(), None);
}
