//! Unit tests of a domain over the sim platform, in process: entries checked
//! through the model's own table walk, invalidations counted.

use super::*;
use crate::platform::sim::{SimMmio, SimPlatform};
use crate::unit::UnitConfig;
use std::sync::atomic::Ordering::SeqCst;
use vtd::sim::{SimConfig, SimMachine};

const SID: u16 = 0x08;

/// An account with the default quotas.
fn test_account() -> Arc<Account> {
    crate::quota::Accounts::default().of(0)
}

pub(super) fn rig(
    strategy: Strategy,
    flush: FlushPolicy,
) -> (Arc<SimMachine>, Arc<Domain>, Region) {
    let p = Arc::new(
        SimPlatform::new(SimConfig {
            mem_bytes: 16 << 20,
            ..Default::default()
        })
        .unwrap(),
    );
    let machine = p.machine().clone();
    let mem: Arc<dyn PhysMem> = p;
    let unit = Arc::new(
        Iommu::init(
            Box::new(SimMmio(machine.clone())),
            mem,
            &UnitConfig::default(),
        )
        .unwrap(),
    );
    let trust = if strategy == Strategy::Magazine {
        Trust::Delegated
    } else {
        Trust::Validated
    };
    let dom = Domain::new(unit, SID, strategy, flush, trust, true, test_account()).unwrap();
    let pool = dom.alloc_pool(8 * PAGE).unwrap().0;
    (machine, dom, pool)
}

/// The model's walk finds no readable or writable entry (a not-present leaf
/// or a missing table).
fn not_present(m: &SimMachine, iova: u64) -> bool {
    m.translate_uncached(SID, iova)
        .map_or(true, |t| !t.read && !t.write)
}

fn invalidations(d: &Domain) -> u64 {
    stats::get(&d.stats.inval_domain) + stats::get(&d.stats.inval_page)
}

#[test]
fn a_global_map_writes_the_asked_rights_and_a_strict_unmap_invalidates_once() {
    let (m, d, pool) = rig(Strategy::Global, FlushPolicy::Strict);
    let iova = d.map(pool.phys + 0x10, 100, Dir::ToDevice, 0).unwrap();
    assert_eq!(iova % PAGE, 0x10, "the offset in the page is kept");
    assert!((IOVA_BASE..IOVA_BASE + IOVA_SPAN).contains(&iova));
    let t = m.translate_uncached(SID, iova).unwrap();
    assert_eq!(t.phys, pool.phys + 0x10);
    assert!(t.read && !t.write, "ToDevice: read only");
    let before = invalidations(&d);
    d.unmap(iova, 100).unwrap();
    assert_eq!(invalidations(&d), before + 1, "strict: one invalidation");
    assert_eq!(
        d.completed(),
        d.epoch() - 1,
        "the epoch it started completed"
    );
    assert!(not_present(&m, iova), "entry cleared");
}

#[test]
fn a_percore_unmap_keeps_its_iova_until_the_flush_that_covers_it() {
    let (_m, d, pool) = rig(Strategy::Global, FlushPolicy::PerCore);
    let a = d.map(pool.phys, PAGE, Dir::FromDevice, 0).unwrap();
    d.unmap(a, PAGE).unwrap();
    // Parked, not free: the next map gets another IOVA.
    let b = d.map(pool.phys + PAGE, PAGE, Dir::FromDevice, 0).unwrap();
    assert_ne!(a, b);
    // iommud asked for the flush itself (its own wish, not the client's).
    assert!(d.server_wanted.load(SeqCst) > d.completed());
    assert!(d.flush_if_wanted().unwrap());
    assert!(!d.flush_if_wanted().unwrap(), "nothing more is wanted");
    assert_eq!(d.lock_uncounted().parked.len(), 0, "released by the flush");
    d.unmap(b, PAGE).unwrap();
}

#[test]
fn a_flush_another_one_covered_meanwhile_makes_no_second_invalidation() {
    // A hint's flush, the timer's and a `FlushSync` that race for one unmap:
    // the one behind finds the epoch it read completed and skips.
    let (m, d, pool) = rig(Strategy::Global, FlushPolicy::PerCore);
    let a = d.map(pool.phys, PAGE, Dir::FromDevice, 0).unwrap();
    d.unmap(a, PAGE).unwrap();
    let since = d.epoch(); // read by a flusher after the unmap...
    let model = m.counters().iotlb_domain;
    d.flush().unwrap(); // ...before another flush got the lock
    assert_eq!(m.counters().iotlb_domain, model + 1);
    let desc = d.unit.iotlb_domain(d.did);
    assert_eq!(d.flush_since(since, desc).unwrap(), since);
    assert_eq!(m.counters().iotlb_domain, model + 1, "covered: none more");
    assert_eq!(d.lock_uncounted().parked.len(), 0, "released by that flush");
    // A change after that flush needs one of its own.
    let b = d.map(pool.phys, PAGE, Dir::FromDevice, 0).unwrap();
    d.unmap(b, PAGE).unwrap();
    assert_eq!(d.flush_since(d.epoch(), desc).unwrap(), since + 1);
    assert_eq!(m.counters().iotlb_domain, model + 2);
    // And behind the flush the hint asked for, the timer makes none.
    let c = d.map(pool.phys, PAGE, Dir::FromDevice, 0).unwrap();
    d.unmap(c, PAGE).unwrap();
    assert!(d.flush_if_wanted().unwrap());
    assert_eq!(d.timer_flush().unwrap(), TimerFlush::Done);
    assert_eq!(m.counters().iotlb_domain, model + 3);
    assert_eq!(stats::get(&d.stats.timer_flushes), 0);
    // A `FlushSync` for a tag that flush completed makes none; for the
    // current epoch, or with 0 (now), one each.
    let tag = d.completed();
    d.flush_to(tag).unwrap();
    assert_eq!(
        m.counters().iotlb_domain,
        model + 3,
        "tag already completed"
    );
    d.flush_to(u64::MAX).unwrap(); // bounded by iommud's epoch
    assert_eq!(m.counters().iotlb_domain, model + 4);
    assert_eq!(d.completed(), tag + 1);
    d.flush_to(0).unwrap();
    assert_eq!(m.counters().iotlb_domain, model + 5);
    // The timer never waits behind another flush (a preempted connection
    // thread's): with the lock held it flushes beside it.
    let e = d.map(pool.phys, PAGE, Dir::FromDevice, 0).unwrap();
    d.unmap(e, PAGE).unwrap();
    let held = d.flush_lock.lock().unwrap();
    assert!(d.wants_flush());
    assert_eq!(d.timer_flush().unwrap(), TimerFlush::Done);
    drop(held);
    assert_eq!(m.counters().iotlb_domain, model + 6);
    assert_eq!(stats::get(&d.stats.timer_flushes), 1);
    assert!(!d.wants_flush());
}

#[test]
fn refcounted_pages_share_one_entry_widen_it_and_clear_it_with_the_last_unmap() {
    let (m, d, pool) = rig(Strategy::Identity, FlushPolicy::Strict);
    let p = pool.phys;
    let a = d.map(p, 64, Dir::ToDevice, 0).unwrap();
    assert_eq!(a, p, "identity: IOVA = physical");
    let before = invalidations(&d);
    let b = d.map(p + 128, 64, Dir::FromDevice, 0).unwrap();
    assert_eq!(b, p + 128);
    assert_eq!(
        invalidations(&d),
        before + 1,
        "widening R to RW invalidates at once"
    );
    let t = m.translate_uncached(SID, p).unwrap();
    assert!(t.read && t.write);
    d.unmap(a, 64).unwrap();
    assert!(
        m.translate_uncached(SID, p).is_ok(),
        "still used by the second map"
    );
    d.unmap(b, 64).unwrap();
    assert!(not_present(&m, p), "cleared with the last");
    // Unmapping again, or with another length, is refused.
    assert_eq!(d.unmap(b, 64).unwrap_err().code(), ErrorCode::NotOwner);
    assert_eq!(d.unmap(p, 0).unwrap_err().code(), ErrorCode::Invalid);
    assert_eq!(d.unmap(u64::MAX, 2).unwrap_err().code(), ErrorCode::Invalid);
}

#[test]
fn frames_outside_the_clients_pools_and_hostile_lengths_are_refused() {
    let (_m, d, pool) = rig(Strategy::Global, FlushPolicy::Strict);
    for (phys, len) in [
        (pool.phys + pool.len, 1),
        (pool.phys.wrapping_sub(PAGE), PAGE),
        (pool.phys, pool.len + 1),
        (u64::MAX, 2),
    ] {
        let e = d.map(phys, len, Dir::ToDevice, 0).unwrap_err();
        assert_eq!(e.code(), ErrorCode::NotOwner, "{phys:#x}+{len:#x}");
    }
    assert_eq!(
        d.map(pool.phys, 0, Dir::ToDevice, 0).unwrap_err().code(),
        ErrorCode::Invalid
    );
    assert_eq!(
        d.map(pool.phys, MAX_MAP_LEN + 1, Dir::ToDevice, 0)
            .unwrap_err()
            .code(),
        ErrorCode::Invalid
    );
}

#[test]
fn the_clients_flush_wish_is_bounded_by_iommuds_own_epoch() {
    let (_m, d, _pool) = rig(Strategy::Global, FlushPolicy::PerCore);
    let c = d.client();
    c.wanted.store(u64::MAX, SeqCst);
    // Each call is at most one flush of the current epoch, never a loop.
    for k in 1..=3u64 {
        let before = (d.epoch(), invalidations(&d));
        assert!(d.flush_if_wanted().unwrap());
        assert_eq!(d.epoch(), before.0 + 1, "call {k}: one epoch");
        assert_eq!(
            invalidations(&d),
            before.1 + 1,
            "call {k}: one invalidation"
        );
    }
    // A wish at or below what completed asks nothing.
    c.wanted.store(0, SeqCst);
    assert!(!d.flush_if_wanted().unwrap());
    // The published copies follow the private values; writing them is impossible
    // for the client, and iommud never reads them back.
    assert_eq!(d.page().epoch.load(SeqCst), d.epoch());
    assert_eq!(d.page().completed.load(SeqCst), d.completed());
}

#[test]
fn an_exchange_takes_back_only_what_was_delegated_once() {
    let (_m, d, _pool) = rig(Strategy::Magazine, FlushPolicy::PerCore);
    let n = d.exchange(1, 0, 4).unwrap();
    assert_eq!(n, 4);
    let given: Vec<u64> = (0..4).map(|k| d.exchange_slot(k).unwrap()).collect();
    // Returned twice: refused, nothing changes, counted.
    for (k, v) in [given[0], given[0]].iter().enumerate() {
        d.client.map.write_u64(EXCHANGE_OFFSET + 8 * k, *v).unwrap();
    }
    assert_eq!(d.exchange(1, 2, 0).unwrap_err().code(), ErrorCode::NotOwner);
    // Never delegated (another class, or made up): refused.
    d.client
        .map
        .write_u64(EXCHANGE_OFFSET, given[1] + 64 * PAGE * 1024)
        .unwrap();
    assert_eq!(d.exchange(1, 1, 0).unwrap_err().code(), ErrorCode::NotOwner);
    assert_eq!(
        d.exchange(2, 0, 1).unwrap(),
        1,
        "one IOVA of class 2 handed out"
    );
    assert_eq!(stats::get(&d.stats.rejected), 2);
    // Given back properly, once each: accepted.
    for (k, v) in given.iter().enumerate() {
        d.client.map.write_u64(EXCHANGE_OFFSET + 8 * k, *v).unwrap();
    }
    assert_eq!(d.exchange(1, 4, 0).unwrap(), 0);
    assert_eq!(
        d.lock_uncounted().delegated.len(),
        1,
        "one of class 2 is out"
    );
}

#[test]
fn a_busy_domain_does_not_switch_and_an_idle_one_does() {
    let (_m, d, pool) = rig(Strategy::Global, FlushPolicy::Strict);
    let iova = d.map(pool.phys, PAGE, Dir::ToDevice, 0).unwrap();
    let e = d.set_policy(Some(Strategy::Identity), None).unwrap_err();
    assert_eq!(e.code(), ErrorCode::Busy);
    d.unmap(iova, PAGE).unwrap();
    d.set_policy(Some(Strategy::Identity), Some(FlushPolicy::PerCore))
        .unwrap();
    assert_eq!(d.policy(), (Strategy::Identity, FlushPolicy::PerCore));
    assert_eq!(
        d.page().strategy.load(SeqCst),
        Strategy::Identity as u32,
        "published"
    );
}
