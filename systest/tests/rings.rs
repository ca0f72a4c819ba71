//! The ring path of validated trust (docs/ARCHITECTURE.md, "Rings and
//! service threads"): validated magazines, `static`, and the other validated
//! strategies over submission/completion rings, with bytes moved through
//! the IOMMU and checked; strict batches invalidated once per batch; and a
//! hostile client writing anything into its rings.

mod common;

use common::{daemon_with_policy, kv, RawClient};
use iommu_abi::ring::{ring_at, Cqe, MapArgs, SqOp, Sqe, CQE_WORDS, RING_BYTES, RING_ENTRIES};
use iommu_abi::Bdf;
use libdma::proto::{ErrorCode, Request};
use libdma::{Control, Dir, DmaDomain, FlushPolicy, Strategy};
use std::os::fd::AsFd;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::Arc;
use std::time::{Duration, Instant};

const VALIDATED: &str = "[default]\ntrust = \"validated\"\n\
strategies = [\"magazine\", \"global\", \"identity\", \"va\", \"static\"]\n";
const BATCH: usize = 32;
const ROUNDS: usize = 200;

fn machine(socket: &std::path::Path) -> vtd::sim::SimMachine {
    let (m, s, _) = Control::connect(socket).unwrap().sim_info().unwrap();
    vtd::sim::SimMachine::open(m.as_fd(), s.as_fd()).unwrap()
}

/// Maps batches of 32 buffers, has the device write and read each through
/// the IOMMU, unmaps the batch; returns the domain's stats.
fn exercise(d: &common::Daemon, bdf: u16, s: Strategy, f: FlushPolicy, threads: usize) -> String {
    let dom = Arc::new(DmaDomain::connect(d.socket(), bdf, s, f).unwrap());
    assert!(dom.validated(), "validated policy");
    assert!(dom.uses_rings(), "{}: rings", s.name());
    let dev = Arc::new(machine(d.socket()));
    let hs: Vec<_> = (0..threads)
        .map(|t| {
            let (dom, dev) = (dom.clone(), dev.clone());
            std::thread::spawn(move || {
                let bufs: Vec<_> = (0..BATCH).map(|_| dom.alloc(2048).unwrap()).collect();
                let mut back = [0u8; 64];
                for round in 0..ROUNDS {
                    let req: Vec<(u64, usize, Dir)> = bufs
                        .iter()
                        .map(|b| (b.phys, 2048, Dir::Bidirectional))
                        .collect();
                    let iovas = dom.map_batch(&req).unwrap();
                    assert_eq!(iovas.len(), BATCH);
                    for (k, (&iova, b)) in iovas.iter().zip(&bufs).enumerate() {
                        let pattern: Vec<u8> = (0..64)
                            .map(|x| {
                                (x as u8)
                                    ^ (k as u8)
                                    ^ (round as u8).wrapping_mul(7)
                                    ^ (t as u8) << 7
                            })
                            .collect();
                        common::device_round_trip(&dev, bdf, iova + 64, b, 64, &pattern);
                        dev.dma_read(bdf, iova, &mut back).unwrap();
                    }
                    let maps: Vec<(u64, usize)> = iovas.iter().map(|&v| (v, 2048)).collect();
                    dom.unmap_batch(&maps).unwrap();
                    if s != Strategy::Static && f == FlushPolicy::Strict {
                        // Strict: the unmap returned, so no device access may pass.
                        assert!(
                            dev.dma_read(bdf, iovas[0], &mut back).is_err(),
                            "{}: read through an unmapped IOVA",
                            s.name()
                        );
                    }
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    // Every entry submitted has completed (unmaps nobody waited for too).
    dom.drain().unwrap();
    let c = dom.counts();
    let stats = common::domain_stats(&dom, bdf);
    // Setup only: hello, attach, rings, pools, and this read.
    assert!(
        c.round_trips <= 10,
        "{}: {} blocking round trips",
        s.name(),
        c.round_trips
    );
    assert_eq!(c.ring_errors, 0);
    Arc::try_unwrap(dom).ok().unwrap().shutdown().unwrap();
    stats
}

#[test]
fn validated_strategies_move_verified_bytes_through_the_rings() {
    let d = daemon_with_policy("rings", VALIDATED, &[]);
    let mut bdf = 8u16;
    for (s, f) in [
        (Strategy::Magazine, FlushPolicy::Strict),
        (Strategy::Magazine, FlushPolicy::PerCore),
        (Strategy::Magazine, FlushPolicy::Deferred),
        (Strategy::Static, FlushPolicy::Strict),
        (Strategy::Global, FlushPolicy::PerCore),
        (Strategy::Identity, FlushPolicy::Strict),
    ] {
        bdf += 8;
        let stats = exercise(&d, bdf, s, f, 2);
        let entries = kv(&stats, "ring_entries");
        println!(
            "{} {}: ring_entries={entries} strict_unmaps={} strict_invalidations={} doorbells={} ipc_round_trips={}",
            s.name(),
            f.name(),
            kv(&stats, "ring_strict_unmaps"),
            kv(&stats, "ring_strict_invalidations"),
            kv(&stats, "ring_doorbells"),
            kv(&stats, "ipc_round_trips"),
        );
        if s == Strategy::Static {
            // Static maps never reach iommud after the pools.
            assert_eq!(entries, 0, "{stats}");
        } else {
            assert_eq!(entries, (2 * ROUNDS * BATCH * 2) as u64, "{stats}");
        }
        if s == Strategy::Magazine && f == FlushPolicy::Strict {
            let unmaps = kv(&stats, "ring_strict_unmaps");
            let invals = kv(&stats, "ring_strict_invalidations");
            assert_eq!(unmaps, (2 * ROUNDS * BATCH) as u64);
            // One pass covers a batch of 32 with one or two masked runs.
            assert!(
                invals * 8 <= unmaps,
                "{invals} invalidations for {unmaps} unmaps"
            );
        }
    }
    assert_eq!(d.machine().counters().stale_hits, 0);
}

#[test]
fn validated_strategies_work_in_caching_mode() {
    let d = daemon_with_policy("rings-cm", VALIDATED, &["--caching-mode"]);
    for (k, f) in [FlushPolicy::Strict, FlushPolicy::PerCore]
        .into_iter()
        .enumerate()
    {
        exercise(&d, 0x40 + k as u16 * 8, Strategy::Magazine, f, 1);
    }
    exercise(&d, 0x58, Strategy::Static, FlushPolicy::Strict, 1);
    assert_eq!(d.machine().counters().stale_hits, 0);
}

#[test]
fn static_confines_the_device_to_its_pools() {
    let d = daemon_with_policy("static", VALIDATED, &[]);
    let bdf = 0x20;
    let dom = DmaDomain::connect(d.socket(), bdf, Strategy::Static, FlushPolicy::Strict).unwrap();
    let dev = machine(d.socket());
    let b = dom.alloc(4096).unwrap();
    let iova = dom.map(b.phys, 4096, Dir::ToDevice).unwrap();
    let iova2 = dom.map(b.phys + 100, 10, Dir::ToDevice).unwrap();
    assert_eq!(iova2, iova + 100, "the pool's IOVA plus the offset");
    dom.unmap(iova, 4096).unwrap();
    // No per-buffer protection: the pool stays mapped after the unmap ...
    b.write(0, &[0x5a; 8]).unwrap();
    let mut back = [0u8; 8];
    dev.dma_read(bdf, iova, &mut back).unwrap();
    assert_eq!(back, [0x5a; 8]);
    // ... but nothing outside the client's pools is reachable.
    let pool_end = iova - (b.phys % (2 << 20)) + (2 << 20);
    assert!(dev.dma_read(bdf, pool_end + (4 << 20), &mut back).is_err());
    assert!(dev.dma_read(bdf, 0x1000, &mut back).is_err());
}

/// A client speaking the ring protocol by hand.
struct RawRings {
    map: libdma::shm::Mapping,
    tail: u32,
    head: u32,
}

impl RawRings {
    fn setup(c: &mut RawClient, n: u64) -> RawRings {
        let (r, fds) = c.call_fds(&Request::SetupRings { rings: n }, &[]);
        let (a, _) = r.unwrap();
        assert_eq!(a[1], RING_BYTES as u64);
        assert_eq!(fds.len(), 2, "ring memfd and doorbell");
        let map = libdma::shm::Mapping::new(fds[0].as_fd(), 0, n as usize * RING_BYTES).unwrap();
        RawRings {
            map,
            tail: 0,
            head: 0,
        }
    }

    fn ring(&self) -> &iommu_abi::ring::RingShm {
        // SAFETY: the mapping covers at least one ring and outlives the borrow.
        unsafe { ring_at(self.map.as_ptr(), 0) }
    }

    fn put_words(&mut self, w: [u64; 8]) {
        let slot = &self.ring().sq[(self.tail % RING_ENTRIES) as usize];
        for (x, v) in w.iter().enumerate() {
            slot[x].store(*v, Relaxed);
        }
        self.tail = self.tail.wrapping_add(1);
        self.ring().sq_tail.0.store(self.tail, Release);
    }

    fn put(&mut self, op: SqOp, user: u64) {
        self.put_words(Sqe { op, user }.encode());
    }

    /// Waits for the next completion (the service thread is polled; the
    /// doorbell is not needed while it spins, and its 1 s sleep bound
    /// catches the rest).
    fn next(&mut self) -> Cqe {
        let t = Instant::now();
        while self.ring().cq_tail.0.load(Acquire) == self.head {
            assert!(t.elapsed() < Duration::from_secs(5), "no completion");
            std::thread::yield_now();
        }
        let slot = &self.ring().cq[(self.head % RING_ENTRIES) as usize];
        let w: [u64; CQE_WORDS] = std::array::from_fn(|x| slot[x].load(Relaxed));
        self.head = self.head.wrapping_add(1);
        self.ring().cq_head.0.store(self.head, Release);
        Cqe::decode(&w)
    }
}

#[test]
fn hostile_ring_entries_are_refused_and_iommud_survives() {
    let d = daemon_with_policy("rings-hostile", VALIDATED, &[]);
    let bdf = 0x28;
    let mut c = RawClient::connect(d.socket());
    let proof = common::proof(&d, bdf);
    c.attach(
        bdf,
        Strategy::Magazine,
        FlushPolicy::PerCore,
        Some(proof.as_fd()),
    )
    .unwrap();
    // Validated trust: no arena, so no page-table entry is client-writable.
    assert_eq!(c.attach_fds, 2, "published page and client page only");
    let (phys, _cpu) = c.pool(1 << 20);
    let _ = phys;
    // Ring counts outside 1..=MAX_RINGS are refused.
    for n in [0, 9, u64::MAX] {
        let e = c.call(&Request::SetupRings { rings: n }).unwrap_err();
        assert_eq!(e.0, ErrorCode::Invalid, "{n} rings: {}", e.1);
    }
    let mut r = RawRings::setup(&mut c, 1);
    // The header's advice word is the client's to scribble: iommud never
    // reads it (the entries below are served as if it were 0).
    r.ring().server_cpu.0.store(u32::MAX, Release);
    // A domain gets its rings once.
    let e = c.call(&Request::SetupRings { rings: 1 }).unwrap_err();
    assert_eq!(e.0, ErrorCode::Busy, "{}", e.1);
    let map = |offset, len| {
        SqOp::Map(MapArgs {
            region: 0,
            offset,
            len,
            dir: Dir::FromDevice,
            va: 0,
        })
    };
    r.put(map(0, 4096), 1);
    let good = r.next();
    assert_eq!(good.user, 1);
    let iova = good.result.unwrap();
    assert!(iova >= libdma::shared::MAGAZINE_IOVA_BASE);
    let cases: Vec<(SqOp, ErrorCode)> = vec![
        // Beyond the region, a region that does not exist, offset overflow.
        (map((1 << 20) - 4096, 8192), ErrorCode::NotOwner),
        (
            SqOp::Map(MapArgs {
                region: 7,
                offset: 0,
                len: 64,
                dir: Dir::ToDevice,
                va: 0,
            }),
            ErrorCode::NotOwner,
        ),
        (map(u64::MAX - 10, 64), ErrorCode::NotOwner),
        (map(0, 0), ErrorCode::NotOwner),
        // Never mapped, wrong length, then the real unmap, then a second one.
        (
            SqOp::Unmap {
                iova: iova + (64 << 12),
                len: 4096,
            },
            ErrorCode::NotOwner,
        ),
        (
            SqOp::Unmap {
                iova,
                len: 3 * 4096,
            },
            ErrorCode::NotOwner,
        ),
    ];
    for (k, (op, want)) in cases.iter().enumerate() {
        r.put(*op, 100 + k as u64);
        let got = r.next();
        assert_eq!(got.user, 100 + k as u64);
        assert_eq!(got.result, Err(*want), "case {k}: {op:?}");
    }
    // A region registered after the passes above (iommud keeps a copy of
    // the regions between passes): its first entry is served, at its own
    // offset, and a region beyond it is still refused.
    let (_phys2, _m2) = c.pool(1 << 16);
    let map2 = |region, offset| {
        SqOp::Map(MapArgs {
            region,
            offset,
            len: 64,
            dir: Dir::ToDevice,
            va: 0,
        })
    };
    r.put(map2(1, 0x1010), 150);
    let second = r.next();
    assert_eq!(second.user, 150);
    let iova2 = second.result.expect("the new region maps");
    assert_eq!(iova2 % 4096, 0x10, "iova {iova2:#x} keeps the offset");
    r.put(map2(2, 0), 151);
    assert_eq!(r.next().result, Err(ErrorCode::NotOwner), "region 2");
    r.put(
        SqOp::Unmap {
            iova: iova2,
            len: 64,
        },
        152,
    );
    assert_eq!(r.next().result, Ok(0), "the new region's map was live");
    r.put(SqOp::Unmap { iova, len: 4096 }, 200);
    assert_eq!(r.next().result, Ok(0));
    r.put(SqOp::Unmap { iova, len: 4096 }, 201);
    assert_eq!(r.next().result, Err(ErrorCode::NotOwner), "double unmap");
    // Remaps (unmap and map in one entry): bounds first, then the unmap.
    let maps_done = |c: &Control| {
        kv(
            &c.read(&format!("domains/{}/stats", iommu_abi::Bdf(bdf)))
                .unwrap(),
            "maps",
        )
    };
    let ctl = Control::connect(d.socket()).unwrap();
    r.put(map(0, 4096), 400);
    let m1 = r.next().result.expect("a map");
    let remap = |old, offset, len| SqOp::Remap {
        old,
        old_len: 4096,
        map: MapArgs {
            region: 0,
            offset,
            len,
            dir: Dir::FromDevice,
            va: 0,
        },
    };
    // Out of the region's bounds: refused, and `m1` is still mapped.
    r.put(remap(m1, (1 << 20) - 4096, 8192), 401);
    assert_eq!(
        r.next().result,
        Err(ErrorCode::NotOwner),
        "remap out of bounds"
    );
    let before = maps_done(&ctl);
    // An old IOVA that is not mapped: refused, and nothing is mapped.
    r.put(remap(m1 + (64 << 12), 0x2000, 4096), 402);
    assert_eq!(
        r.next().result,
        Err(ErrorCode::NotOwner),
        "remap of nothing"
    );
    assert_eq!(maps_done(&ctl), before, "a refused remap mapped nothing");
    // The real one: `m1` goes, a new IOVA comes with the offset's page.
    r.put(remap(m1, 0x2000, 4096), 403);
    let m2 = r.next().result.expect("a remap");
    assert_ne!(m2, m1);
    assert_eq!(maps_done(&ctl), before + 1);
    // Twice: `m1` is gone; so is an unmap of it.
    r.put(remap(m1, 0x3000, 4096), 404);
    assert_eq!(r.next().result, Err(ErrorCode::NotOwner), "remap twice");
    r.put(
        SqOp::Unmap {
            iova: m1,
            len: 4096,
        },
        405,
    );
    assert_eq!(r.next().result, Err(ErrorCode::NotOwner), "m1 was unmapped");
    r.put(
        SqOp::Unmap {
            iova: m2,
            len: 4096,
        },
        406,
    );
    assert_eq!(r.next().result, Ok(0), "m2 was live");
    // Garbage words: unknown op and direction.
    r.put_words([0xee, 0, 0, 0, 300, 0, 0, 0]);
    assert_eq!(r.next().result, Err(ErrorCode::Invalid));
    r.put_words([1 | 9 << 8, 0, 64, 0, 301, 0, 0, 0]);
    assert_eq!(r.next().result, Err(ErrorCode::Invalid));
    r.put_words([3 | 9 << 8, 0, 64, 0, 302, m2, 4096, 0]);
    assert_eq!(
        r.next().result,
        Err(ErrorCode::Invalid),
        "remap, bad direction"
    );
    // A tail far ahead: iommud takes at most one ring's worth, answers
    // each (the entries are leftovers and zeros: refused or mapped), and
    // never writes a completion the client has not freed.
    r.ring()
        .sq_tail
        .0
        .store(r.tail.wrapping_add(1_000_000), Release);
    std::thread::sleep(Duration::from_millis(300));
    let written = r.ring().cq_tail.0.load(Acquire).wrapping_sub(r.head);
    assert!(written <= RING_ENTRIES, "{written} completions");
    // A nonsense cq_head stalls only this ring, with entries waiting: the
    // service thread still goes to sleep (it does not spin on a ring it
    // cannot serve).
    r.ring()
        .cq_head
        .0
        .store(r.head.wrapping_add(5_000_000), Release);
    r.ring()
        .sq_tail
        .0
        .store(r.tail.wrapping_add(2_000_000), Release);
    std::thread::sleep(Duration::from_millis(50));
    let t0 = d.cpu_ticks();
    std::thread::sleep(Duration::from_millis(500));
    let used = d.cpu_ticks() - t0;
    // A thread spinning for the half second would use ~50 ticks (100 Hz).
    assert!(
        used < 15,
        "iommud used {used} ticks in 0.5 s beside a stalled ring"
    );
    let stats = Control::connect(d.socket())
        .unwrap()
        .read("/scheme/iommu/stats")
        .unwrap();
    assert_eq!(kv(&stats, "domains"), 1);
    // Another client is served normally.
    let other = exercise(&d, 0x30, Strategy::Magazine, FlushPolicy::Strict, 1);
    assert_eq!(kv(&other, "ring_entries"), (2 * ROUNDS * BATCH) as u64);
    // The hostile domain's rejects were counted.
    let mine = c
        .call(&Request::ReadPath {
            path: format!("domains/{}/stats", Bdf(bdf)),
        })
        .unwrap();
    let text = String::from_utf8_lossy(&mine.1).into_owned();
    assert!(kv(&text, "rejected") >= 2, "{text}");
    // The exchange of delegated magazines is refused in validated trust.
    assert_eq!(
        c.call(&Request::Exchange {
            pages: 1,
            returned: 0,
            want: 8
        })
        .unwrap_err()
        .0,
        ErrorCode::PermissionDenied
    );
}

#[test]
fn a_sleeping_service_thread_is_woken_by_the_doorbell() {
    let d = daemon_with_policy("rings-doorbell", VALIDATED, &[]);
    let bdf = 0x38;
    let dom = DmaDomain::connect(d.socket(), bdf, Strategy::Magazine, FlushPolicy::Strict).unwrap();
    let b = dom.alloc(4096).unwrap();
    let mut worst = Duration::ZERO;
    for _ in 0..50 {
        // Long enough for the service thread to give up spinning (2 ms) and sleep.
        std::thread::sleep(Duration::from_millis(10));
        let t = Instant::now();
        let iova = dom.map(b.phys, 4096, Dir::ToDevice).unwrap();
        dom.unmap(iova, 4096).unwrap();
        worst = worst.max(t.elapsed());
    }
    let stats = common::domain_stats(&dom, bdf);
    println!(
        "worst map+unmap after a sleep: {worst:?}; doorbells {} sleeps {}",
        kv(&stats, "ring_doorbells"),
        kv(&stats, "ring_sleeps")
    );
    // Most rounds found it asleep (on a loaded host a round may find it
    // still spinning): the doorbell path ran, and every round completed.
    assert!(kv(&stats, "ring_doorbells") >= 25, "{stats}");
    // A lost wake-up would leave the entry until the thread's 1 s poll timeout.
    assert!(worst < Duration::from_millis(900), "worst {worst:?}");
}

#[test]
fn submitted_maps_are_collected_in_any_order() {
    let d = daemon_with_policy("rings-tickets", VALIDATED, &[]);
    let bdf = 0x40;
    let dom =
        DmaDomain::connect(d.socket(), bdf, Strategy::Magazine, FlushPolicy::PerCore).unwrap();
    let dev = machine(d.socket());
    let bufs: Vec<_> = (0..8).map(|_| dom.alloc(4096).unwrap()).collect();
    let req = |r: std::ops::Range<usize>| -> Vec<(u64, usize, Dir)> {
        bufs[r]
            .iter()
            .map(|b| (b.phys, 4096, Dir::Bidirectional))
            .collect()
    };
    let t1 = dom.map_batch_submit(&req(0..4)).unwrap();
    let t2 = dom.map_batch_submit(&req(4..6)).unwrap();
    // A synchronous map in between consumes both tickets' completions (they
    // come first on the ring): they are kept for their collectors.
    let mid = dom.map(bufs[6].phys, 4096, Dir::ToDevice).unwrap();
    let v2 = dom.map_batch_complete(t2).unwrap();
    let v1 = dom.map_batch_complete(t1).unwrap();
    assert_eq!((v1.len(), v2.len()), (4, 2));
    let all: Vec<u64> = v1.iter().chain(&v2).copied().collect();
    let mut distinct = all.clone();
    distinct.push(mid);
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        7,
        "seven different IOVAs: {all:x?} {mid:#x}"
    );
    for (k, (&iova, b)) in all.iter().zip(&bufs).enumerate() {
        common::device_round_trip(&dev, bdf, iova, b, 0, &[k as u8 ^ 0x3c; 32]);
    }
    let maps: Vec<(u64, usize)> = all.iter().map(|&v| (v, 4096)).collect();
    dom.unmap_batch(&maps).unwrap();
    dom.unmap(mid, 4096).unwrap();
    // A refused entry fails the whole ticket and leaves nothing mapped.
    let mut bad = req(0..2);
    bad.push((0x1000, 4096, Dir::ToDevice));
    assert!(
        dom.map_batch_submit(&bad).is_err(),
        "a frame outside the pools"
    );
    dom.drain().unwrap();
    assert_eq!(dom.counts().ring_errors, 0);
}

#[test]
fn two_service_threads_share_a_domains_rings() {
    let d = daemon_with_policy("rings-two", VALIDATED, &["--service-threads", "2"]);
    for (k, f) in [FlushPolicy::Strict, FlushPolicy::PerCore]
        .into_iter()
        .enumerate()
    {
        let stats = exercise(&d, 0x60 + 8 * k as u16, Strategy::Magazine, f, 2);
        assert_eq!(kv(&stats, "ring_entries"), (2 * ROUNDS * BATCH * 2) as u64);
    }
    // Idle again: every service thread sleeps (a client now rings).
    std::thread::sleep(Duration::from_millis(50));
    let t0 = d.cpu_ticks();
    std::thread::sleep(Duration::from_millis(500));
    let used = d.cpu_ticks() - t0;
    assert!(
        used < 15,
        "iommud used {used} ticks in 0.5 s with no traffic"
    );
    assert_eq!(d.machine().counters().stale_hits, 0);
}

/// Each ring has a home service thread (with `--service-cpus`, the one on
/// its clients' CPU). Ring 1's home sleeps while a client on CPU 0 keeps the
/// other thread busy; a batch on CPU 1 then rings no doorbell (a thread is
/// awake), so the awake thread must serve it and wake the home, which
/// serves the ring's next batches itself.
#[test]
fn a_ring_whose_home_thread_sleeps_is_served_by_an_awake_thread_which_wakes_it() {
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        return; // two rings need two CPU slots
    }
    let d = daemon_with_policy(
        "rings-homes",
        VALIDATED,
        &[
            "--service-threads",
            "2",
            "--service-cpus",
            "0,1",
            "--ring-spin-us",
            "50000",
        ],
    );
    let bdf = 0x70;
    let dom = Arc::new(
        DmaDomain::connect(d.socket(), bdf, Strategy::Magazine, FlushPolicy::PerCore).unwrap(),
    );
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let busy = {
        let (dom, stop) = (dom.clone(), stop.clone());
        std::thread::spawn(move || {
            common::pin_to_cpu(0);
            let b = dom.alloc(4096).unwrap();
            let mut batches = 0u64;
            while !stop.load(Relaxed) {
                let iovas = dom.map_batch(&[(b.phys, 4096, Dir::ToDevice); 8]).unwrap();
                let maps: Vec<(u64, usize)> = iovas.iter().map(|&v| (v, 4096)).collect();
                dom.unmap_batch(&maps).unwrap();
                batches += 1;
            }
            batches
        })
    };
    common::pin_to_cpu(1);
    let dev = machine(d.socket());
    let bufs: Vec<_> = (0..8).map(|_| dom.alloc(4096).unwrap()).collect();
    let req: Vec<(u64, usize, Dir)> = bufs
        .iter()
        .map(|b| (b.phys, 4096, Dir::Bidirectional))
        .collect();
    // Ring 1 idle for ten times the service threads' spin: its home sleeps.
    std::thread::sleep(Duration::from_millis(500));
    let before = common::domain_stats(&dom, bdf);
    let t = Instant::now();
    let first = dom.map_batch(&req).unwrap();
    let took = t.elapsed();
    let after_first = common::domain_stats(&dom, bdf);
    for (k, (&iova, b)) in first.iter().zip(&bufs).enumerate() {
        common::device_round_trip(&dev, bdf, iova, b, 0, &[k as u8 ^ 0x5a; 64]);
    }
    let maps: Vec<(u64, usize)> = first.iter().map(|&v| (v, 4096)).collect();
    dom.unmap_batch(&maps).unwrap();
    // Twenty more batches right after: the home is awake again.
    for _ in 0..20 {
        let iovas = dom.map_batch(&req).unwrap();
        let maps: Vec<(u64, usize)> = iovas.iter().map(|&v| (v, 4096)).collect();
        dom.unmap_batch(&maps).unwrap();
    }
    let end = common::domain_stats(&dom, bdf);
    stop.store(true, Relaxed);
    let batches = busy.join().unwrap();
    let delta = |a: &str, b: &str, key: &str| kv(b, key) - kv(a, key);
    println!(
        "first batch on CPU 1 in {took:?}; helped {} then {}, doorbells {}; {batches} batches on CPU 0",
        delta(&before, &after_first, "ring_helped"),
        delta(&after_first, &end, "ring_helped"),
        delta(&before, &end, "ring_doorbells"),
    );
    // Served by the awake thread (or, should the busy thread's thread have
    // slept too on a loaded host, through the doorbell), not by the
    // client's 10 s give-up.
    assert!(
        delta(&before, &after_first, "ring_helped")
            + delta(&before, &after_first, "ring_doorbells")
            >= 1,
        "{before}\n{after_first}"
    );
    // Not at the sleeping home's 1 s poll timeout either.
    assert!(
        took < Duration::from_millis(300),
        "first batch took {took:?}"
    );
    // Woken, the home serves its ring again: a thread that kept helping
    // would count about one pass per batch.
    assert!(
        delta(&after_first, &end, "ring_helped") <= 2,
        "{after_first}\n{end}"
    );
    dom.drain().unwrap();
    assert_eq!(dom.counts().ring_errors, 0);
    assert!(batches > 0);
    assert_eq!(dev.counters().stale_hits, 0);
}

#[test]
fn only_passes_that_leave_unmaps_to_the_timer_wake_it() {
    // The epoch timer outranks the service thread on its CPU: a pass that
    // leaves it nothing (strict unmaps, invalidated in the pass; maps) must
    // not wake it, and one that leaves it percore unmaps must, or their
    // IOVAs would wait for its idle scan.
    let d = daemon_with_policy("rings-kicks", VALIDATED, &[]);
    let kicks = |dom: &DmaDomain| kv(&dom.read_path("stats").unwrap(), "timer_kicks");
    let burst = |dom: &DmaDomain, b: &libdma::DmaBuffer| {
        let bufs: Vec<(u64, usize, Dir)> = (0..8)
            .map(|k| (b.phys + k * 512, 512, Dir::FromDevice))
            .collect();
        let iovas = dom.map_batch(&bufs).unwrap();
        let maps: Vec<(u64, usize)> = iovas.iter().map(|&v| (v, 512)).collect();
        dom.unmap_batch(&maps).unwrap();
    };
    let strict =
        DmaDomain::connect(d.socket(), 0x48, Strategy::Magazine, FlushPolicy::Strict).unwrap();
    assert!(strict.uses_rings());
    let b = strict.alloc(4096).unwrap();
    burst(&strict, &b);
    // Let any kick from setting the domain up pass.
    std::thread::sleep(Duration::from_millis(100));
    let k0 = kicks(&strict);
    for _ in 0..50 {
        burst(&strict, &b);
    }
    let strict_kicks = kicks(&strict) - k0;
    assert_eq!(strict_kicks, 0, "strict passes woke the epoch timer");
    let percore =
        DmaDomain::connect(d.socket(), 0x50, Strategy::Magazine, FlushPolicy::PerCore).unwrap();
    let pb = percore.alloc(4096).unwrap();
    // A first burst, then time for the timer to flush it and find the new
    // domain idle (it publishes that at its next look, 20 ms at most): only
    // an idle timer is woken.
    burst(&percore, &pb);
    std::thread::sleep(Duration::from_millis(200));
    let k1 = kicks(&percore);
    burst(&percore, &pb);
    // Its unmaps are served without a wait (percore): give the pass time.
    let deadline = Instant::now() + Duration::from_secs(5);
    while kicks(&percore) == k1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        kicks(&percore) > k1,
        "percore ring unmaps did not wake the idle timer: {}",
        common::domain_stats(&percore, 0x50)
    );
}

#[test]
fn a_percore_ring_flushes_its_own_sealed_batch_without_the_timer() {
    // A magazine's worth of unmaps (128 one-page buffers) seals a batch: the
    // service thread flushes the domain itself once the pass's completions
    // are out. The epoch timer (which would preempt it on its CPU) has then
    // nothing left to flush.
    let d = daemon_with_policy("rings-sealed", VALIDATED, &[]);
    let bdf = 0x58;
    let dom =
        DmaDomain::connect(d.socket(), bdf, Strategy::Magazine, FlushPolicy::PerCore).unwrap();
    assert!(dom.uses_rings());
    let stat = |key: &str| kv(&common::domain_stats(&dom, bdf), key);
    let n = iommu_abi::classes::MAG_SIZE;
    let pool = dom.alloc(n * 4096).unwrap();
    let bufs: Vec<(u64, usize, Dir)> = (0..n as u64)
        .map(|k| (pool.phys + k * 4096, 4096, Dir::ToDevice))
        .collect();
    let iovas = dom.map_batch(&bufs).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let (inv0, timed0) = (stat("invalidations"), stat("timer_flushes"));
    let maps: Vec<(u64, usize)> = iovas.iter().map(|&v| (v, 4096)).collect();
    dom.unmap_batch(&maps).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while stat("invalidations") == inv0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    // Past the timer's 10 ms deadline for the noted unmaps.
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        stat("invalidations"),
        inv0 + 1,
        "one flush for the sealed batch"
    );
    assert_eq!(
        stat("timer_flushes"),
        timed0,
        "the service thread flushed, not the timer"
    );
    assert_eq!(
        stat("epoch_completed") + 1,
        stat("epoch"),
        "{}",
        stat("epoch")
    );
}

#[test]
fn a_map_ticket_is_ready_exactly_when_its_completions_are_posted() {
    // A driver polls `map_batch_ready` to hand buffers to its device only
    // once their IOVAs are there. With iommud stopped (SIGSTOP) nothing is
    // served: the ticket stays not ready; once iommud runs again it turns
    // ready, and collecting it then does not wait.
    let d = daemon_with_policy("rings-ready", VALIDATED, &[]);
    let bdf = 0x68;
    let dom = DmaDomain::connect(d.socket(), bdf, Strategy::Magazine, FlushPolicy::Strict).unwrap();
    assert!(dom.uses_rings());
    let bufs: Vec<(u64, usize, Dir)> = (0..4)
        .map(|_| (dom.alloc(4096).unwrap().phys, 4096, Dir::ToDevice))
        .collect();
    // Warm: the service thread has served this ring once.
    let v = dom.map_batch(&bufs).unwrap();
    let maps: Vec<(u64, usize)> = v.iter().map(|&i| (i, 4096)).collect();
    dom.unmap_batch(&maps).unwrap();
    let pid = d.child.id() as libc::pid_t;
    // SAFETY: signals to our own child process.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    // Stopped once every thread is (state T in /proc/<pid>/task/*/stat).
    let all_stopped = || {
        std::fs::read_dir(format!("/proc/{pid}/task")).is_ok_and(|d| {
            d.flatten().all(|t| {
                std::fs::read_to_string(t.path().join("stat"))
                    .is_ok_and(|s| s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('T')))
            })
        })
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while !all_stopped() {
        assert!(Instant::now() < deadline, "iommud did not stop");
        std::thread::sleep(Duration::from_millis(1));
    }
    let t = dom.map_batch_submit(&bufs).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let stopped = dom.map_batch_ready(&t);
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    assert!(!stopped, "ready although iommud was stopped");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !dom.map_batch_ready(&t) {
        assert!(Instant::now() < deadline, "never ready");
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut iovas = dom.map_batch_complete(t).unwrap();
    iovas.sort_unstable();
    iovas.dedup();
    assert_eq!(iovas.len(), 4, "four distinct IOVAs");
    let maps: Vec<(u64, usize)> = iovas.iter().map(|&i| (i, 4096)).collect();
    dom.unmap_batch(&maps).unwrap();
}

#[test]
fn a_lazy_strict_refill_is_held_until_other_work_and_its_iovas_wait_for_it() {
    // RX refills marked lazy (`remap_batch_submit_lazy`): with `strict`,
    // iommud writes their entries at once but holds the pass's
    // invalidation and completions until it has served other work, at most
    // `--lazy-hold-us` (10 s here, so only the other work can end it).
    let d = daemon_with_policy("rings-lazy", VALIDATED, &["--lazy-hold-us", "10000000"]);
    let (a_bdf, b_bdf) = (0x70, 0x78);
    let a = DmaDomain::connect(d.socket(), a_bdf, Strategy::Magazine, FlushPolicy::Strict).unwrap();
    let b = DmaDomain::connect(d.socket(), b_bdf, Strategy::Magazine, FlushPolicy::Strict).unwrap();
    assert!(a.uses_rings() && b.uses_rings());
    let dev = machine(d.socket());
    let stat = |dom: &DmaDomain, bdf, key: &str| kv(&common::domain_stats(dom, bdf), key);
    let bufs: Vec<_> = (0..4).map(|_| a.alloc(4096).unwrap()).collect();
    let req: Vec<(u64, usize, Dir)> = bufs
        .iter()
        .map(|b| (b.phys, 4096, Dir::Bidirectional))
        .collect();
    let old = a.map_batch(&req).unwrap();
    let olds: Vec<(u64, usize)> = old.iter().map(|&v| (v, 4096)).collect();
    let (held0, inv0) = (
        stat(&a, a_bdf, "ring_held"),
        stat(&a, a_bdf, "ring_strict_invalidations"),
    );
    let (u, t) = a.remap_batch_submit_lazy(&olds, &req).unwrap();
    // Held: its entries are cleared (the device is refused at the old
    // IOVAs), but neither invalidated nor completed.
    let deadline = Instant::now() + Duration::from_secs(5);
    while stat(&a, a_bdf, "ring_held") == held0 {
        assert!(Instant::now() < deadline, "never held");
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(200));
    assert!(!a.map_batch_ready(&t), "completed while held");
    assert_eq!(stat(&a, a_bdf, "ring_strict_invalidations"), inv0);
    let mut byte = [0u8; 1];
    assert!(dev.dma_read(a_bdf, old[0], &mut byte).is_err());
    // Other work (another domain's map) lets it go.
    let other = b.alloc(4096).unwrap();
    let v = b.map(other.phys, 4096, Dir::ToDevice).unwrap();
    // Well within the 10 s bound.
    let deadline = Instant::now() + Duration::from_secs(3);
    while !a.map_batch_ready(&t) {
        assert!(Instant::now() < deadline, "still held after other work");
        std::thread::sleep(Duration::from_millis(1));
    }
    a.unmap_batch_complete(u).unwrap();
    let new = a.map_batch_complete(t).unwrap();
    assert_eq!(stat(&a, a_bdf, "ring_strict_invalidations"), inv0 + 1);
    for (k, (&iova, buf)) in new.iter().zip(&bufs).enumerate() {
        common::device_round_trip(&dev, a_bdf, iova, buf, 0, &[k as u8 ^ 0x5a; 16]);
    }
    let maps: Vec<(u64, usize)> = new.iter().map(|&v| (v, 4096)).collect();
    a.unmap_batch(&maps).unwrap();
    b.unmap(v, 4096).unwrap();
}
