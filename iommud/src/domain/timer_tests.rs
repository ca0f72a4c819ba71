//! The epoch timer's per-domain half and the flush budget, over the sim
//! platform, in process.

use super::tests::rig;
use super::*;
use crate::timer::{EpochTimer, REVISIT};
use std::time::{Duration, Instant};

fn parked(d: &Domain) -> usize {
    d.lock_uncounted().parked.len()
}

/// A second domain on `a`'s unit, with a mapping unmapped (parked, waiting
/// for the flush iommud's own percore unmaps ask for).
fn with_unmap(a: &Arc<Domain>, sid: Option<u16>) -> Arc<Domain> {
    let d = match sid {
        Some(sid) => Domain::new(
            a.unit.clone(),
            sid,
            Strategy::Global,
            FlushPolicy::PerCore,
            Trust::Validated,
            true,
            crate::quota::Accounts::default().of(0),
        )
        .unwrap(),
        None => a.clone(),
    };
    let pool = d.alloc_pool(PAGE).unwrap().0;
    let iova = d.map(pool.phys, PAGE, Dir::ToDevice, 0).unwrap();
    d.unmap(iova, PAGE).unwrap();
    d
}

#[test]
fn a_busy_domain_does_not_delay_another_domains_timed_flush() {
    let (_m, a, _) = rig(Strategy::Global, FlushPolicy::PerCore);
    let a = with_unmap(&a, None);
    let b = with_unmap(&a, Some(0x10));
    assert!(a.wants_flush() && b.wants_flush());
    assert!(parked(&a) > 0 && parked(&b) > 0);
    let (ca, cb) = (a.completed(), b.completed());
    // A request holds A's allocator lock for as long as it likes.
    let held = a.hold_lock();
    let (tx, rx) = std::sync::mpsc::channel();
    let doms = vec![a.clone(), b.clone()];
    let pass = std::thread::spawn(move || {
        let mut t = EpochTimer::default();
        let now = Instant::now();
        let next = t.pass(&doms, now);
        tx.send(next.map(|n| n.saturating_duration_since(now)))
            .unwrap();
        t
    });
    let next = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the timer pass waited for a busy domain's lock");
    // Both flushed; B released at once, A's release owed and revisited soon.
    assert!(b.completed() > cb && a.completed() > ca);
    assert_eq!(parked(&b), 0);
    assert_ne!(a.release_owed(), 0);
    assert_eq!(stats::get(&a.stats.timer_lock_busy), 1);
    assert_eq!(stats::get(&b.stats.timer_lock_busy), 0);
    assert!(next.is_some_and(|n| n <= REVISIT), "next pass in {next:?}");
    drop(held);
    let mut t = pass.join().unwrap();
    assert!(parked(&a) > 0, "nothing released while the lock was held");
    t.pass(&[a.clone(), b.clone()], Instant::now());
    assert_eq!(a.release_owed(), 0);
    assert_eq!(parked(&a), 0, "the owed release is done on the next pass");
}

#[test]
fn the_timer_sleeps_while_nothing_waits_and_never_flushes_one_domain_twice_a_tick() {
    let (_m, d, _) = rig(Strategy::Magazine, FlushPolicy::PerCore);
    let now = Instant::now();
    let mut t = EpochTimer::default();
    assert_eq!(d.timer_due(now, None), None, "idle: no deadline");
    assert_eq!(
        t.pass(std::slice::from_ref(&d), now),
        None,
        "idle: the timer sleeps"
    );
    // A hostile client wants every epoch there will ever be.
    d.client().wanted.store(u64::MAX, SeqCst);
    assert_eq!(d.timer_due(now, None), Some(now));
    let before = d.completed();
    t.pass(std::slice::from_ref(&d), now);
    assert_eq!(d.completed(), before + 1);
    // Still "wanted" (it always will be), but not before the minimum gap.
    let later = now + Duration::from_micros(100);
    assert_eq!(d.timer_due(later, Some(now)), Some(now + TIMER_MIN_GAP));
    t.pass(std::slice::from_ref(&d), later);
    assert_eq!(d.completed(), before + 1, "no second flush within the gap");
    t.pass(std::slice::from_ref(&d), now + TIMER_MIN_GAP);
    assert_eq!(d.completed(), before + 2);
    assert_eq!(stats::get(&d.stats.timer_flushes), 2);
}

#[test]
fn an_unmap_is_due_ten_ms_after_it_happened() {
    let (_m, d, pool) = rig(Strategy::Global, FlushPolicy::Deferred);
    let iova = d.map(pool.phys, PAGE, Dir::ToDevice, 0).unwrap();
    let t0 = Instant::now();
    d.unmap(iova, PAGE).unwrap();
    let took = t0.elapsed();
    assert!(!d.wants_flush(), "deferred: nobody asks");
    let due = d.timer_due(Instant::now(), None).expect("an unmap waits");
    let after = due.saturating_duration_since(t0);
    assert!(
        after <= Duration::from_nanos(FLUSH_TIMEOUT_NS) + took && after >= Duration::from_millis(9),
        "due {after:?} after the unmap"
    );
}

#[test]
fn the_budget_allows_a_burst_then_one_flush_per_token() {
    let b = Budget::default();
    let t0 = Instant::now();
    for k in 0..FLUSH_BUDGET_BURST {
        assert!(b.take(t0), "burst flush {k}");
    }
    assert!(b.take_backoff().is_none());
    assert!(!b.take(t0), "over the burst");
    let pause = b.take_backoff().expect("the connection pauses");
    let token = Duration::from_nanos(1_000_000 / FLUSH_BUDGET_PER_MS);
    assert_eq!(pause, token);
    assert!(b.take_backoff().is_none(), "a pause is taken once");
    assert!(!b.take(t0 + token / 2));
    assert!(b.take(t0 + token));
    assert!(!b.take(t0 + token));
}

#[test]
fn the_timer_never_waits_for_the_domain_list() {
    // An attach holds the list while it builds its domain, in a connection
    // thread the load may preempt for tens of milliseconds: the real-time
    // timer goes on flushing the domains it already knows.
    let (_m, a, _) = rig(Strategy::Global, FlushPolicy::PerCore);
    let st = Arc::new(crate::session::State::new(a.unit.clone(), "sim", true));
    st.domains.lock().unwrap().insert(a.sid, a.clone());
    let ticker = {
        let st = st.clone();
        std::thread::spawn(move || crate::timer::ticker(&st))
    };
    let wait_for = |what: &str, done: &dyn Fn() -> bool| {
        let end = Instant::now() + Duration::from_secs(5);
        while !done() {
            assert!(Instant::now() < end, "{what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    // The timer knows the domain once it made a timed flush of it.
    let before = a.completed();
    with_unmap(&a, None);
    wait_for("no timed flush", &|| a.completed() > before);
    let held = st.domains.lock().unwrap();
    let before = a.completed();
    with_unmap(&a, None);
    wait_for("no timed flush while the domain list was held", &|| {
        a.completed() > before
    });
    assert_eq!(parked(&a), 0, "released by the timed flush");
    drop(held);
    st.stop.store(true, SeqCst);
    st.timer.kick();
    ticker.join().unwrap();
}
