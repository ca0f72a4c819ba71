//! Batches end to end (docs/ARCHITECTURE.md, "Batches"): the delegated fast
//! path maps and unmaps a batch under one slot lock, and with `strict` waits
//! for one invalidation per batch; `unmap_batch_submit` leaves that wait to
//! `unmap_batch_complete`, on the fast path and on the rings, and the
//! buffers may be mapped again in between; an IOVA taken again must move
//! the device's bytes to its new buffer (no stale translation survives). Bytes go through the simulated device and are
//! compared; invalidations are counted by iommud.

mod common;

use common::{daemon_with_policy, device_round_trip, kv, Daemon};
use libdma::{Dir, DmaDomain, FlushPolicy, Strategy};

const A: u16 = 0x08;
const N: usize = 16;
/// Invalidations one strict batch may cost: one, or two when the client's
/// blocking `FlushSync` (after 500 µs without the epoch) overtakes the flush
/// its hint asked for, on a loaded machine. Never one per unmap.
const RACE: u64 = 2;

fn invalidations(dom: &DmaDomain, bdf: u16) -> u64 {
    kv(&common::domain_stats(dom, bdf), "invalidations")
}

fn reqs(bufs: &[libdma::DmaBuffer]) -> Vec<(u64, usize, Dir)> {
    bufs.iter()
        .map(|b| (b.phys, 2048, Dir::Bidirectional))
        .collect()
}

/// Every IOVA of `iovas` is blocked for the device.
fn all_blocked(dev: &vtd::sim::SimMachine, bdf: u16, iovas: &[u64], what: &str) {
    let mut b = [0u8; 8];
    for (k, &iova) in iovas.iter().enumerate() {
        assert!(
            dev.dma_read(bdf, iova, &mut b).is_err(),
            "{what}: entry {k} ({iova:#x}) still reachable"
        );
    }
}

/// The IOVAs of `old` that `new` did not take again: those must be blocked.
/// (One taken again was invalidated first; the bytes the device then moves
/// through it, checked against the new buffer, show that no stale
/// translation to the old one survived.)
fn dropped(old: &[u64], new: &[u64]) -> Vec<u64> {
    old.iter().copied().filter(|v| !new.contains(v)).collect()
}

#[test]
fn a_delegated_strict_batch_waits_for_one_invalidation() {
    let d = Daemon::start("batch-strict", &[]);
    let dom = DmaDomain::connect(d.socket(), A, Strategy::Magazine, FlushPolicy::Strict).unwrap();
    assert!(!dom.validated() && !dom.uses_rings(), "delegated fast path");
    let dev = d.machine();
    let bufs: Vec<_> = (0..N).map(|_| dom.alloc(2048).unwrap()).collect();

    let iovas = dom.map_batch(&reqs(&bufs)).unwrap();
    assert_eq!(iovas.len(), N);
    for (k, (&iova, b)) in iovas.iter().zip(&bufs).enumerate() {
        device_round_trip(&dev, A, iova + 100, b, 100, &[k as u8 ^ 0xa5; 200]);
    }
    let before = invalidations(&dom, A);
    let maps: Vec<(u64, usize)> = iovas.iter().map(|&v| (v, 2048)).collect();
    dom.unmap_batch(&maps).unwrap();
    let used = invalidations(&dom, A) - before;
    assert!(
        (1..=RACE).contains(&used),
        "{used} invalidations for a batch of {N}"
    );
    all_blocked(&dev, A, &iovas, "after unmap_batch");

    // The same buffers one at a time: one invalidation per unmap.
    let singles: Vec<u64> = bufs
        .iter()
        .map(|b| dom.map(b.phys, 2048, Dir::Bidirectional).unwrap())
        .collect();
    let before = invalidations(&dom, A);
    for &v in &singles {
        dom.unmap(v, 2048).unwrap();
    }
    let used = invalidations(&dom, A) - before;
    assert!(
        used >= N as u64,
        "{used} invalidations for {N} strict unmaps"
    );
    all_blocked(&dev, A, &singles, "after single unmaps");
    assert_eq!(dev.counters().stale_hits, 0);
}

#[test]
fn submitted_unmaps_complete_with_one_invalidation_and_no_stale_reuse() {
    let d = Daemon::start("batch-submit", &[]);
    let dom = DmaDomain::connect(d.socket(), A, Strategy::Magazine, FlushPolicy::Strict).unwrap();
    let dev = d.machine();
    let bufs: Vec<_> = (0..N).map(|_| dom.alloc(2048).unwrap()).collect();
    let mut old = dom.map_batch(&reqs(&bufs)).unwrap();
    for round in 0..20u8 {
        let before = invalidations(&dom, A);
        let maps: Vec<(u64, usize)> = old.iter().map(|&v| (v, 2048)).collect();
        // What a NIC driver's RX path does: unmap the finished buffers, map
        // them again for their next frames, read the frames, then wait.
        let t = dom.unmap_batch_submit(&maps).unwrap();
        let new = dom.map_batch(&reqs(&bufs)).unwrap();
        dom.unmap_batch_complete(t).unwrap();
        let used = invalidations(&dom, A) - before;
        assert!(
            (1..=RACE).contains(&used),
            "round {round}: {used} invalidations for the batch"
        );
        all_blocked(&dev, A, &dropped(&old, &new), "after unmap_batch_complete");
        for (k, (&iova, b)) in new.iter().zip(&bufs).enumerate() {
            device_round_trip(&dev, A, iova, b, 0, &[round ^ k as u8; 64]);
        }
        old = new;
    }
    let maps: Vec<(u64, usize)> = old.iter().map(|&v| (v, 2048)).collect();
    dom.unmap_batch(&maps).unwrap();
    assert_eq!(dev.counters().stale_hits, 0);
}

#[test]
fn submitted_unmaps_on_the_rings_complete_after_their_invalidation() {
    let policy = "[default]\ntrust = \"validated\"\nstrategies = [\"magazine\"]\n";
    let d = daemon_with_policy("batch-rings", policy, &[]);
    let bdf = 0x30;
    let dom = DmaDomain::connect(d.socket(), bdf, Strategy::Magazine, FlushPolicy::Strict).unwrap();
    assert!(dom.validated() && dom.uses_rings());
    let dev = d.machine();
    let bufs: Vec<_> = (0..N).map(|_| dom.alloc(2048).unwrap()).collect();
    let mut old = dom.map_batch(&reqs(&bufs)).unwrap();
    let stat = |key: &str| kv(&common::domain_stats(&dom, bdf), key);
    for round in 0..20u8 {
        let (unmaps, invals) = (
            stat("ring_strict_unmaps"),
            stat("ring_strict_invalidations"),
        );
        let maps: Vec<(u64, usize)> = old.iter().map(|&v| (v, 2048)).collect();
        let t = dom.unmap_batch_submit(&maps).unwrap();
        let next = dom.map_batch_submit(&reqs(&bufs)).unwrap();
        dom.unmap_batch_complete(t).unwrap();
        let new = dom.map_batch_complete(next).unwrap();
        all_blocked(
            &dev,
            bdf,
            &dropped(&old, &new),
            "after unmap_batch_complete",
        );
        assert_eq!(stat("ring_strict_unmaps"), unmaps + N as u64);
        let used = stat("ring_strict_invalidations") - invals;
        assert!(
            (1..=2).contains(&used),
            "round {round}: {used} invalidations for a batch of {N}"
        );
        for (k, (&iova, b)) in new.iter().zip(&bufs).enumerate() {
            device_round_trip(&dev, bdf, iova, b, 0, &[round ^ k as u8 ^ 0x77; 64]);
        }
        old = new;
    }
    // A refused entry is reported by the completion, not lost.
    let t = dom.unmap_batch_submit(&[(0x7000_0000, 4096)]).unwrap();
    assert!(
        matches!(
            dom.unmap_batch_complete(t),
            Err(libdma::Error::Server { .. })
        ),
        "an unmap of nothing mapped is refused"
    );
    let maps: Vec<(u64, usize)> = old.iter().map(|&v| (v, 2048)).collect();
    dom.unmap_batch(&maps).unwrap();
    dom.drain().unwrap();
    assert_eq!(dev.counters().stale_hits, 0);
}

#[test]
fn a_delegated_batch_stops_at_a_mapping_that_is_not_there() {
    let d = Daemon::start("batch-bad", &[]);
    let dom = DmaDomain::connect(d.socket(), A, Strategy::Magazine, FlushPolicy::PerCore).unwrap();
    let dev = d.machine();
    let bufs: Vec<_> = (0..4).map(|_| dom.alloc(2048).unwrap()).collect();
    let iovas = dom.map_batch(&reqs(&bufs)).unwrap();
    // Entry 2 was never mapped: entries 0 and 1 are unmapped, 2 refused, 3 left.
    let never = iovas.iter().max().unwrap() + 0x10_0000;
    let maps = [
        (iovas[0], 2048),
        (iovas[1], 2048),
        (never, 2048),
        (iovas[2], 2048),
    ];
    match dom.unmap_batch(&maps) {
        Err(libdma::Error::Invalid(msg)) => assert!(msg.contains("not mapped"), "{msg}"),
        other => panic!("unmap of an unmapped IOVA gave {other:?}"),
    }
    dom.drain().unwrap();
    all_blocked(&dev, A, &iovas[..2], "the entries before the bad one");
    device_round_trip(&dev, A, iovas[2], &bufs[2], 0, &[0x42; 32]);
    // A zero-length buffer refuses the whole batch before anything is mapped.
    let mut bad = reqs(&bufs[..2]);
    bad.push((bufs[3].phys, 0, Dir::ToDevice));
    assert!(matches!(
        dom.map_batch(&bad),
        Err(libdma::Error::Invalid(_))
    ));
    let s = common::domain_stats(&dom, A);
    assert_eq!(kv(&s, "maps"), 4, "the refused batch mapped nothing: {s}");
    dom.unmap_batch(&[(iovas[2], 2048), (iovas[3], 2048)])
        .unwrap();
    assert_eq!(dev.counters().stale_hits, 0);
}

#[test]
fn concurrent_depot_exchanges_never_hand_one_iova_to_two_threads() {
    // Threads of one client exchange magazines with the depot through one
    // shared area; each holds more IOVAs than its CPU's caches, so the
    // exchanges are many and overlap. No IOVA may be live in two threads.
    let d = Daemon::start("batch-exchange", &[]);
    let dom = std::sync::Arc::new(
        DmaDomain::connect(d.socket(), A, Strategy::Magazine, FlushPolicy::PerCore).unwrap(),
    );
    let live = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
    let hs: Vec<_> = (0..4)
        .map(|t| {
            let (dom, live) = (dom.clone(), live.clone());
            std::thread::spawn(move || {
                let buf = dom.alloc(4096).unwrap();
                for round in 0..40 {
                    let n = 200 + 37 * t;
                    let iovas = dom
                        .map_batch(&vec![(buf.phys, 64, Dir::ToDevice); n])
                        .unwrap();
                    {
                        let mut l = live.lock().unwrap();
                        for &v in &iovas {
                            assert!(
                                l.insert(v),
                                "thread {t} round {round}: IOVA {v:#x} is live in another thread"
                            );
                        }
                    }
                    {
                        let mut l = live.lock().unwrap();
                        for v in &iovas {
                            l.remove(v);
                        }
                    }
                    let maps: Vec<(u64, usize)> = iovas.iter().map(|&v| (v, 64)).collect();
                    dom.unmap_batch(&maps).unwrap();
                    // Everything back to the depot: the next round takes
                    // its IOVAs by exchanges again.
                    dom.drain().unwrap();
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    let s = common::domain_stats(&dom, A);
    assert!(kv(&s, "depot_exchanges") > 100, "exchanges were few: {s}");
}

/// The two ways a magazine domain runs: the delegated fast path (device
/// `A`) and validated trust through the rings (device 0x30), each on a
/// daemon of its own started with `extra`.
fn both_paths(name: &str, extra: &[&str]) -> [(Daemon, u16); 2] {
    let policy = "[default]\ntrust = \"validated\"\nstrategies = [\"magazine\"]\n";
    [
        (Daemon::start(&format!("{name}-fast"), extra), A),
        (
            daemon_with_policy(&format!("{name}-rings"), policy, extra),
            0x30,
        ),
    ]
}

/// A `strict` magazine domain of `bdf` on `d`, and the path it takes.
fn strict_domain(d: &Daemon, bdf: u16) -> (DmaDomain, &'static str) {
    let dom = DmaDomain::connect(d.socket(), bdf, Strategy::Magazine, FlushPolicy::Strict).unwrap();
    let path = if dom.uses_rings() {
        "rings"
    } else {
        "fast path"
    };
    (dom, path)
}

/// Polls `ready` until it says true (or fails after 5 s).
fn until_ready(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !ready() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: never ready without unmap_batch_complete"
        );
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
}

#[test]
fn a_ready_unmap_ticket_means_the_old_iovas_are_blocked() {
    // What e1000d's RX path relies on when it leaves a strict unmap batch
    // outstanding after its buffers went back to the device: the ticket
    // becomes ready by itself (submit asked for the flush), and once it says
    // ready the dropped IOVAs are unreachable, before any complete call.
    // Invalidations take 20 ms on the simulated unit: a ticket that said ready
    // before its invalidation completed would leave the device its old IOVAs
    // (cached in the unit's IOTLB by the previous round's traffic).
    let slow = ["--sim-inval-latency-ns", "20000000"];
    for (d, bdf) in both_paths("batch-ready", &slow) {
        let (dom, path) = strict_domain(&d, bdf);
        let dev = d.machine();
        let bufs: Vec<_> = (0..N).map(|_| dom.alloc(2048).unwrap()).collect();
        let mut old = dom.map_batch(&reqs(&bufs)).unwrap();
        let mut waited = 0u32;
        for round in 0..10u8 {
            let maps: Vec<(u64, usize)> = old.iter().map(|&v| (v, 2048)).collect();
            let t = dom.unmap_batch_submit(&maps).unwrap();
            // The fast path's submit only asked for the 20 ms flush (a flush
            // already under way may cover it sooner, rightly: it began after
            // the clears).
            waited += u32::from(!dom.unmap_batch_ready(&t));
            let new = dom.map_batch(&reqs(&bufs)).unwrap();
            until_ready(&format!("{path} round {round}"), || {
                dom.unmap_batch_ready(&t)
            });
            all_blocked(
                &dev,
                bdf,
                &dropped(&old, &new),
                &format!("{path}: ready, before unmap_batch_complete"),
            );
            dom.unmap_batch_complete(t).unwrap();
            for (k, (&iova, b)) in new.iter().zip(&bufs).enumerate() {
                device_round_trip(&dev, bdf, iova, b, 0, &[round ^ k as u8 ^ 0x3c; 64]);
            }
            old = new;
        }
        if !dom.uses_rings() {
            // The test exercised the wait (a few rounds may be covered early).
            assert!(
                waited >= 3,
                "{path}: only {waited} of 10 tickets were pending"
            );
        } else {
            // The service thread's time counters: every strict batch's
            // invalidation took the unit's 20 ms, inside the passes' time.
            let stats = common::domain_stats(&dom, bdf);
            let (busy, write, inval) = (
                kv(&stats, "ring_busy_ns"),
                kv(&stats, "ring_write_ns"),
                kv(&stats, "ring_inval_ns"),
            );
            let invals = kv(&stats, "ring_strict_invalidations");
            assert!(invals >= 10, "{stats}");
            assert!(inval >= invals * 20_000_000, "{stats}");
            assert!(busy >= write + inval && write > 0, "{stats}");
        }
        let maps: Vec<(u64, usize)> = old.iter().map(|&v| (v, 2048)).collect();
        dom.unmap_batch(&maps).unwrap();
        assert_eq!(dev.counters().stale_hits, 0, "{path}");
    }
    // With `percore` nothing is waited for: a submitted batch is ready at once.
    let d = Daemon::start("batch-ready-percore", &[]);
    let dom = DmaDomain::connect(d.socket(), A, Strategy::Magazine, FlushPolicy::PerCore).unwrap();
    let b = dom.alloc(2048).unwrap();
    let iova = dom.map(b.phys, 2048, Dir::FromDevice).unwrap();
    let t = dom.unmap_batch_submit(&[(iova, 2048)]).unwrap();
    assert!(dom.unmap_batch_ready(&t), "percore: nothing to wait for");
    dom.unmap_batch_complete(t).unwrap();
}

#[test]
fn remaps_take_one_ring_entry_per_buffer_and_leave_no_stale_iova() {
    // An RX refill as e1000d does it: the filled buffers unmapped and mapped
    // again at new IOVAs, one ring entry each (half of unmap + map), with
    // `strict`'s one invalidation per burst; off the rings (delegated fast
    // path) the same call is an unmap burst and a map burst.
    for (d, bdf) in both_paths("batch-remap", &[]) {
        let (dom, path) = strict_domain(&d, bdf);
        let dev = d.machine();
        let stat = |key: &str| kv(&common::domain_stats(&dom, bdf), key);
        let bufs: Vec<_> = (0..N).map(|_| dom.alloc(2048).unwrap()).collect();
        let mut old = dom.map_batch(&reqs(&bufs)).unwrap();
        for round in 0..20u8 {
            let (entries, invals) = (stat("ring_entries"), stat("invalidations"));
            let maps: Vec<(u64, usize)> = old.iter().map(|&v| (v, 2048)).collect();
            let (u, m) = dom.remap_batch_submit(&maps, &reqs(&bufs)).unwrap();
            let new = dom.map_batch_complete(m).unwrap();
            dom.unmap_batch_complete(u).unwrap();
            assert_eq!(new.len(), N);
            if dom.uses_rings() {
                assert_eq!(
                    stat("ring_entries") - entries,
                    N as u64,
                    "round {round}: one entry per buffer"
                );
            }
            let used = stat("invalidations") - invals;
            assert!(
                (1..=RACE).contains(&used),
                "{path} round {round}: {used} invalidations for a burst of {N}"
            );
            all_blocked(
                &dev,
                bdf,
                &dropped(&old, &new),
                &format!("{path}: after remap"),
            );
            for (k, (&iova, b)) in new.iter().zip(&bufs).enumerate() {
                device_round_trip(&dev, bdf, iova, b, 0, &[round ^ k as u8 ^ 0x5a; 64]);
            }
            old = new;
        }
        // A remap whose old IOVA is not mapped fails, and maps nothing.
        let maps_before = stat("maps");
        let bad = [(old[0] + 0x100_0000, 2048)];
        let r = dom
            .remap_batch_submit(&bad, &reqs(&bufs[..1]))
            .and_then(|(u, m)| {
                let m = dom.map_batch_complete(m);
                dom.unmap_batch_complete(u).and(m)
            });
        assert!(r.is_err(), "{path}: remap of nothing gave {r:?}");
        if dom.uses_rings() {
            assert_eq!(stat("maps"), maps_before, "{path}: nothing mapped");
        }
        // Unequal halves are refused before anything happens.
        assert!(matches!(
            dom.remap_batch_submit(&bad, &reqs(&bufs[..2])),
            Err(libdma::Error::Invalid(_))
        ));
        let maps: Vec<(u64, usize)> = old.iter().map(|&v| (v, 2048)).collect();
        dom.unmap_batch(&maps).unwrap();
        assert_eq!(dev.counters().stale_hits, 0, "{path}");
    }
}
