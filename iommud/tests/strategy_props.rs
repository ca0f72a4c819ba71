//! Property tests of every strategy × flush policy at the `Domain` level, in
//! process over the sim platform: random map / unmap / flush / tick
//! sequences, with the simulated device doing DMA through every live mapping
//! after every step. They check that
//!
//! * a refcounted entry is never removed while a mapping still uses it
//!   (device DMA to every live buffer succeeds, with the right bytes);
//! * no IOVA is reused and no table page is freed before the invalidation
//!   covering it completed: the model's oracle (`stale_hits`, a cached
//!   translation that differs from the tables) stays 0, and table pages are
//!   freed only by steps that completed an invalidation.

use iommu_abi::proto::{Dir, FlushPolicy, Strategy};
use iommud::domain::Domain;
use iommud::hw::{PhysMem, Region};
use iommud::platform::sim::{SimMmio, SimPlatform};
use iommud::unit::{Iommu, UnitConfig};
use proptest::prelude::*;
use proptest::strategy::Strategy as _;
use std::sync::Arc;
use vtd::sim::{SimConfig, SimMachine};

const SID: u16 = 0x08;
const POOL: u64 = 6 * 4096;
/// Where the test, acting as the client, "has" its pool mapped (va strategy).
const VA_BASE: u64 = 0x7f12_3400_0000;

struct Rig {
    machine: Arc<SimMachine>,
    dom: Arc<Domain>,
    pool: Region,
}

fn rig(strategy: Strategy, flush: FlushPolicy, reclaim: bool) -> Rig {
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
        iommud::policy::Trust::Delegated
    } else {
        iommud::policy::Trust::Validated
    };
    let dom = Domain::new(
        unit,
        SID,
        strategy,
        flush,
        trust,
        reclaim,
        iommud::quota::Accounts::default().of(0),
    )
    .unwrap();
    let pool = dom.alloc_pool(POOL).unwrap().0;
    Rig { machine, dom, pool }
}

#[derive(Debug, Clone)]
enum Step {
    /// Map `len` bytes at pool offset `off`.
    Map { off: u64, len: u64, dir: u8 },
    /// Unmap the k-th live mapping (modulo).
    Unmap(usize),
    /// A domain flush.
    Flush,
    /// The epoch timer.
    Tick,
}

fn step() -> impl proptest::strategy::Strategy<Value = Step> {
    prop_oneof![
        5 => (0u64..POOL / 256, 1u64..3 * 4096, 1u8..4).prop_map(|(o, len, dir)| Step::Map {
            off: o * 256,
            len,
            dir
        }),
        4 => any::<usize>().prop_map(Step::Unmap),
        1 => Just(Step::Flush),
        1 => Just(Step::Tick),
    ]
}

struct Live {
    iova: u64,
    phys: u64,
    len: u64,
    dir: Dir,
}

/// The device touches every live mapping: reads what the CPU wrote, or
/// writes and the CPU checks (a page shared by several mappings carries the
/// union of their rights, so only each mapping's own direction is used).
fn dma_all(r: &Rig, live: &[Live], round: u8) -> Result<(), TestCaseError> {
    for (n, m) in live.iter().enumerate() {
        let len = m.len.min(512) as usize;
        let pattern: Vec<u8> = (0..len)
            .map(|k| (k as u8) ^ round.wrapping_mul(17) ^ n as u8)
            .collect();
        if m.dir.write() {
            r.machine
                .dma_write(SID, m.iova, &pattern)
                .map_err(|e| TestCaseError::fail(format!("live mapping faulted: {e}")))?;
            let mut back = vec![0u8; len];
            r.machine.read_bytes(m.phys, &mut back).unwrap();
            prop_assert_eq!(&back, &pattern, "device wrote through iova {:#x}", m.iova);
        } else {
            r.machine.write_bytes(m.phys, &pattern).unwrap();
            let mut back = vec![0u8; len];
            r.machine
                .dma_read(SID, m.iova, &mut back)
                .map_err(|e| TestCaseError::fail(format!("live mapping faulted: {e}")))?;
            prop_assert_eq!(&back, &pattern, "device read through iova {:#x}", m.iova);
        }
    }
    Ok(())
}

fn kv(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {text}"))
}

fn run(
    strategy: Strategy,
    flush: FlushPolicy,
    reclaim: bool,
    steps: Vec<Step>,
) -> Result<(), TestCaseError> {
    let r = rig(strategy, flush, reclaim);
    let mut live: Vec<Live> = Vec::new();
    for (round, s) in steps.into_iter().enumerate() {
        let completed = r.dom.completed();
        let freed = kv(&r.dom.render_stats(), "pt_pages_freed");
        match s {
            Step::Map { off, len, dir } => {
                let len = len.min(POOL - off);
                let dir = Dir::from_u64(u64::from(dir)).unwrap();
                let phys = r.pool.phys + off;
                let iova = r.dom.map(phys, len, dir, VA_BASE + off).unwrap();
                match strategy {
                    Strategy::Identity => prop_assert_eq!(iova, phys),
                    Strategy::Va => prop_assert_eq!(iova, VA_BASE + off),
                    _ => prop_assert_eq!(iova % 4096, phys % 4096),
                }
                live.push(Live {
                    iova,
                    phys,
                    len,
                    dir,
                });
            }
            Step::Unmap(k) => {
                if live.is_empty() {
                    continue;
                }
                let m = live.swap_remove(k % live.len());
                r.dom.unmap(m.iova, m.len).unwrap();
            }
            Step::Flush => r.dom.flush().unwrap(),
            Step::Tick => {
                r.dom.tick().unwrap();
            }
        }
        if r.dom.completed() == completed {
            prop_assert_eq!(
                kv(&r.dom.render_stats(), "pt_pages_freed"),
                freed,
                "a table page was freed with no completed invalidation"
            );
        }
        dma_all(&r, &live, round as u8)?;
        prop_assert_eq!(r.machine.counters().stale_hits, 0, "stale translation used");
    }
    for m in live.drain(..) {
        r.dom.unmap(m.iova, m.len).unwrap();
    }
    r.dom.flush().unwrap();
    let s = r.dom.render_stats();
    prop_assert_eq!(kv(&s, "refcounted_pages"), 0);
    prop_assert_eq!(kv(&s, "dirty_pages"), 0, "{}", s);
    prop_assert_eq!(kv(&s, "mapped"), 0);
    if reclaim && strategy != Strategy::Magazine {
        // (Magazine domains keep their pinned arena leaves and their parents.)
        prop_assert_eq!(kv(&s, "pt_pages_live"), 1, "only the root is left: {}", s);
    }
    prop_assert_eq!(r.machine.counters().stale_hits, 0);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn identity_refcounts_and_invalidations_hold(
        steps in proptest::collection::vec(step(), 1..60),
        f in 0usize..3,
        reclaim in any::<bool>(),
    ) {
        run(Strategy::Identity, FlushPolicy::ALL[f], reclaim, steps)?;
    }

    #[test]
    fn va_refcounts_and_invalidations_hold(
        steps in proptest::collection::vec(step(), 1..60),
        f in 0usize..3,
        reclaim in any::<bool>(),
    ) {
        run(Strategy::Va, FlushPolicy::ALL[f], reclaim, steps)?;
    }

    #[test]
    fn global_never_reuses_an_iova_early(
        steps in proptest::collection::vec(step(), 1..60),
        f in 0usize..3,
        reclaim in any::<bool>(),
    ) {
        run(Strategy::Global, FlushPolicy::ALL[f], reclaim, steps)?;
    }

    #[test]
    fn magazine_server_maps_never_reuse_an_iova_early(
        steps in proptest::collection::vec(step(), 1..60),
        f in 0usize..3,
    ) {
        run(Strategy::Magazine, FlushPolicy::ALL[f], true, steps)?;
    }
}

/// Two buffers in one page, two directions and a repeated map share one
/// identity entry; it goes only when the last of them is unmapped.
#[test]
fn identity_entry_lives_until_its_last_reference() {
    let r = rig(Strategy::Identity, FlushPolicy::Strict, true);
    let a = r.pool.phys + 0x100;
    let b = r.pool.phys + 0x900;
    assert_eq!(r.dom.map(a, 64, Dir::ToDevice, 0).unwrap(), a);
    assert_eq!(r.dom.map(b, 64, Dir::FromDevice, 0).unwrap(), b);
    assert_eq!(r.dom.map(a, 64, Dir::ToDevice, 0).unwrap(), a);
    let s = r.dom.render_stats();
    assert_eq!(kv(&s, "refcounted_pages"), 1);
    assert_eq!(kv(&s, "mapped"), 3);
    // Widened to R|W at once (b's map invalidated the page).
    r.machine.dma_write(SID, b, &[7; 64]).unwrap();
    r.dom.unmap(a, 64).unwrap();
    r.dom.unmap(b, 64).unwrap();
    let mut x = [0u8; 64];
    r.machine.dma_read(SID, a, &mut x).unwrap();
    r.dom.unmap(a, 64).unwrap();
    assert!(
        r.machine.dma_read(SID, a, &mut x).is_err(),
        "gone after the last unmap"
    );
    assert!(r.dom.unmap(a, 64).is_err(), "an unmap too many is refused");
    assert_eq!(r.machine.counters().stale_hits, 0);
}

/// A va page already naming another frame is refused.
#[test]
fn va_refuses_one_address_for_two_frames() {
    let r = rig(Strategy::Va, FlushPolicy::Deferred, true);
    let p = r.pool.phys;
    r.dom.map(p, 64, Dir::ToDevice, VA_BASE).unwrap();
    assert!(r
        .dom
        .map(p + 4096, 64, Dir::ToDevice, VA_BASE + 64)
        .is_err());
    assert!(
        r.dom.map(p, 64, Dir::ToDevice, 0).is_err(),
        "va needs an address"
    );
    assert!(
        r.dom.map(p, 64, Dir::ToDevice, 1 << 47).is_err(),
        "beyond user space"
    );
}

/// Stale windows per policy: strict about 0, percore a tick, deferred the
/// 10 ms timer; the 256th deferred unmap flushes without the timer.
#[test]
fn stale_window_follows_the_flush_policy() {
    let window = |flush: FlushPolicy| {
        let r = rig(Strategy::Identity, flush, true);
        let p = r.pool.phys;
        r.dom.map(p, 64, Dir::ToDevice, 0).unwrap();
        r.dom.unmap(p, 64).unwrap();
        let t = std::time::Instant::now();
        while r.dom.render_stats().contains("\nstale_window_unmaps 0\n") {
            r.dom.tick().unwrap();
            std::thread::sleep(std::time::Duration::from_millis(2));
            assert!(t.elapsed().as_secs() < 2, "never flushed");
        }
        kv(&r.dom.render_stats(), "stale_window_max_ns")
    };
    let strict = window(FlushPolicy::Strict);
    let percore = window(FlushPolicy::PerCore);
    let deferred = window(FlushPolicy::Deferred);
    assert!(strict < 5_000_000, "strict {strict} ns");
    assert!(percore < 10_000_000, "percore {percore} ns");
    assert!(
        (10_000_000..40_000_000).contains(&deferred),
        "deferred {deferred} ns"
    );

    let r = rig(Strategy::Identity, FlushPolicy::Deferred, true);
    let base = kv(&r.dom.render_stats(), "invalidations");
    for k in 0..256u64 {
        let p = r.pool.phys + (k % 6) * 4096;
        r.dom.map(p, 64, Dir::FromDevice, 0).unwrap();
        r.dom.unmap(p, 64).unwrap();
    }
    let s = r.dom.render_stats();
    assert_eq!(kv(&s, "invalidations") - base, 1, "{s}");
}
