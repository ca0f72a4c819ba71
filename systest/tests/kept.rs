//! Kept remaps (docs/ARCHITECTURE.md, "Kept remaps"): a remap that asks to
//! keep (`RemapHints::keep`, `SQE_KEEP` on the rings) gets its old IOVA back,
//! no entry changed, only under `percore` or `deferred`, and only when the
//! new buffer is exactly the memory and direction of the old mapping.
//! Everything else is unmapped and mapped as without the hint; under
//! `strict` the old IOVA is dead once the remap completes.

mod common;

use common::{daemon_with_policy, kv, Daemon};
use libdma::{Control, Dir, DmaDomain, FlushPolicy, RemapHints, Strategy};
use std::os::fd::AsFd;

const VALIDATED: &str = "[default]\ntrust = \"validated\"\n\
strategies = [\"magazine\", \"global\", \"identity\", \"va\", \"static\"]\n";

const KEEP: RemapHints = RemapHints {
    lazy: false,
    keep: true,
};

fn machine(socket: &std::path::Path) -> vtd::sim::SimMachine {
    let (m, s, _) = Control::connect(socket).unwrap().sim_info().unwrap();
    vtd::sim::SimMachine::open(m.as_fd(), s.as_fd()).unwrap()
}

/// `n` fresh buffers, each mapped for its first 2048 bytes, both ways.
fn mapped(dom: &DmaDomain, n: usize) -> (Vec<libdma::DmaBuffer>, Vec<u64>) {
    let bufs: Vec<_> = (0..n).map(|_| dom.alloc(4096).unwrap()).collect();
    let req: Vec<(u64, usize, Dir)> = bufs
        .iter()
        .map(|b| (b.phys, 2048, Dir::Bidirectional))
        .collect();
    let old = dom.map_batch(&req).unwrap();
    (bufs, old)
}

/// Four remaps of four mappings, one batch with the keep hint:
/// 0: the same buffer, same direction (keepable);
/// 1: the same buffer, another direction;
/// 2: the second half of buffer 2's page (another in-page offset);
/// 3: buffer 3's mapping remapped onto buffer 0's memory.
/// Returns the old and the new IOVAs, and the buffers.
fn remap_four(dom: &DmaDomain) -> (Vec<u64>, Vec<u64>, Vec<libdma::DmaBuffer>) {
    let (bufs, old) = mapped(dom, 4);
    let olds: Vec<(u64, usize)> = old.iter().map(|&v| (v, 2048)).collect();
    let again = vec![
        (bufs[0].phys, 2048, Dir::Bidirectional),
        (bufs[1].phys, 2048, Dir::ToDevice),
        (bufs[2].phys + 2048, 2048, Dir::Bidirectional),
        (bufs[0].phys, 2048, Dir::Bidirectional),
    ];
    let (u, t) = dom.remap_batch_submit_hinted(&olds, &again, KEEP).unwrap();
    dom.unmap_batch_complete(u).unwrap();
    let new = dom.map_batch_complete(t).unwrap();
    (old, new, bufs)
}

/// What the four remaps of [`remap_four`] must give under a policy that
/// keeps: only pair 0 kept, and the device reaches each buffer at its new
/// IOVA with its new permissions.
fn check_kept(
    dev: &vtd::sim::SimMachine,
    bdf: u16,
    old: &[u64],
    new: &[u64],
    bufs: &[libdma::DmaBuffer],
) {
    assert_eq!(
        new[0], old[0],
        "the same memory and direction keeps its IOVA"
    );
    for k in 1..4 {
        assert_ne!(
            new[k], old[k],
            "pair {k} is not the same mapping: a new IOVA"
        );
    }
    assert_eq!(new[2] % 4096, 2048, "the new in-page offset");
    common::device_round_trip(dev, bdf, new[0], &bufs[0], 0, &[0x5a; 32]);
    common::device_round_trip(dev, bdf, new[2], &bufs[2], 2048, &[0xa5; 32]);
    common::device_round_trip(dev, bdf, new[3], &bufs[0], 0, &[0x3c; 32]);
    // Pair 1 is ToDevice now: the device reads it, and may not write it.
    let mut byte = [0u8; 1];
    dev.dma_read(bdf, new[1], &mut byte).unwrap();
    assert!(
        dev.dma_write(bdf, new[1], &[1]).is_err(),
        "write through a read-only mapping"
    );
}

#[test]
fn a_validated_percore_remap_keeps_only_the_same_mapping() {
    let d = daemon_with_policy("kept-val", VALIDATED, &[]);
    let bdf = 0x80;
    let dom =
        DmaDomain::connect(d.socket(), bdf, Strategy::Magazine, FlushPolicy::PerCore).unwrap();
    assert!(dom.uses_rings());
    let dev = machine(d.socket());
    let stat = |key: &str| kv(&common::domain_stats(&dom, bdf), key);
    let (kept0, maps0, unmaps0) = (stat("ring_kept"), stat("maps"), stat("unmaps"));
    let (old, new, bufs) = remap_four(&dom);
    check_kept(&dev, bdf, &old, &new, &bufs);
    assert_eq!(stat("ring_kept"), kept0 + 1, "one remap kept");
    // The four first maps, then three remaps unmapped and mapped; the kept
    // one wrote no entry.
    assert_eq!(stat("maps"), maps0 + 4 + 3);
    assert_eq!(stat("unmaps"), unmaps0 + 3);
    // Kept again, and again: the IOVA is stable while the buffer recycles.
    for round in 0..3u8 {
        let (u, t) = dom
            .remap_batch_submit_hinted(
                &[(new[0], 2048)],
                &[(bufs[0].phys, 2048, Dir::Bidirectional)],
                KEEP,
            )
            .unwrap();
        dom.unmap_batch_complete(u).unwrap();
        assert_eq!(dom.map_batch_complete(t).unwrap(), vec![new[0]]);
        common::device_round_trip(&dev, bdf, new[0], &bufs[0], 0, &[round; 16]);
    }
    assert_eq!(stat("ring_kept"), kept0 + 4);
    // A kept IOVA is an ordinary mapping: its unmap ends it.
    let maps: Vec<(u64, usize)> = new.iter().map(|&v| (v, 2048)).collect();
    dom.unmap_batch(&maps).unwrap();
    dom.drain().unwrap();
    // Within the stale window (10 ms, and the epoch timer's tick) nothing
    // is reachable any more.
    let mut byte = [0u8; 1];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    for &v in &new {
        while dev.dma_read(bdf, v, &mut byte).is_ok() {
            assert!(
                std::time::Instant::now() < deadline,
                "{v:#x} still reachable"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
    assert_eq!(dom.counts().ring_errors, 0);
}

#[test]
fn a_validated_strict_remap_never_keeps() {
    let d = daemon_with_policy("kept-strict", VALIDATED, &[]);
    let bdf = 0x88;
    let dom = DmaDomain::connect(d.socket(), bdf, Strategy::Magazine, FlushPolicy::Strict).unwrap();
    assert!(dom.uses_rings());
    let dev = machine(d.socket());
    let (old, new, bufs) = remap_four(&dom);
    assert_eq!(kv(&common::domain_stats(&dom, bdf), "ring_kept"), 0);
    let mut byte = [0u8; 1];
    for k in 0..4 {
        assert_ne!(new[k], old[k], "strict: pair {k} got a new IOVA");
        // Strict: the remap completed, so the old IOVA is dead.
        assert!(
            dev.dma_read(bdf, old[k], &mut byte).is_err(),
            "old IOVA {k} reachable"
        );
    }
    common::device_round_trip(&dev, bdf, new[0], &bufs[0], 0, &[0x77; 16]);
}

#[test]
fn a_keep_hint_on_a_dead_or_foreign_iova_keeps_nothing() {
    // The hint never revives an IOVA: an old IOVA that is no longer mapped
    // (or never was) makes the remap fail as it would without the hint.
    let d = daemon_with_policy("kept-dead", VALIDATED, &[]);
    let bdf = 0x90;
    let dom =
        DmaDomain::connect(d.socket(), bdf, Strategy::Magazine, FlushPolicy::PerCore).unwrap();
    let dev = machine(d.socket());
    let buf = dom.alloc(4096).unwrap();
    let r = (buf.phys, 4096, Dir::Bidirectional);
    let old = dom.map(buf.phys, 4096, Dir::Bidirectional).unwrap();
    dom.unmap(old, 4096).unwrap();
    let (u, t) = dom
        .remap_batch_submit_hinted(&[(old, 4096)], &[r], KEEP)
        .unwrap();
    let _ = dom.unmap_batch_complete(u);
    assert!(
        dom.map_batch_complete(t).is_err(),
        "a remap of an unmapped IOVA"
    );
    let (u, t) = dom
        .remap_batch_submit_hinted(&[(0x4000_0000 + (7 << 20), 4096)], &[r], KEEP)
        .unwrap();
    let _ = dom.unmap_batch_complete(u);
    assert!(
        dom.map_batch_complete(t).is_err(),
        "a remap of an IOVA never mapped"
    );
    assert_eq!(kv(&common::domain_stats(&dom, bdf), "ring_kept"), 0);
    dom.drain().unwrap();
    let mut byte = [0u8; 1];
    assert!(dev.dma_read(bdf, old, &mut byte).is_err());
}

#[test]
fn a_delegated_percore_remap_keeps_locally_and_strict_does_not() {
    let d = Daemon::start("kept-delegated", &[]);
    let dev = machine(d.socket());
    for (bdf, flush) in [(0x98, FlushPolicy::PerCore), (0xa0, FlushPolicy::Strict)] {
        let dom = DmaDomain::connect(d.socket(), bdf, Strategy::Magazine, flush).unwrap();
        assert!(!dom.uses_rings(), "delegated trust: the fast path");
        let maps0 = kv(&common::domain_stats(&dom, bdf), "maps");
        let (old, new, bufs) = remap_four(&dom);
        let kept = dom.counts().kept;
        if flush == FlushPolicy::Strict {
            assert_eq!(kept, 0);
            for k in 0..4 {
                assert_ne!(new[k], old[k], "strict: pair {k} got a new IOVA");
            }
            let mut byte = [0u8; 1];
            assert!(
                dev.dma_read(bdf, old[0], &mut byte).is_err(),
                "strict: old IOVA reachable"
            );
            common::device_round_trip(&dev, bdf, new[0], &bufs[0], 0, &[0x11; 16]);
        } else {
            check_kept(&dev, bdf, &old, &new, &bufs);
            assert_eq!(kept, 1, "one pair kept by libdma");
            assert_eq!(kv(&common::domain_stats(&dom, bdf), "maps"), maps0 + 4 + 3);
            // A batch whose every pair is its mapping again (a steady refill)
            // keeps them all, in order, and maps nothing.
            let (u, t) = dom
                .remap_batch_submit_hinted(
                    &[(new[2], 2048), (new[0], 2048)],
                    &[
                        (bufs[2].phys + 2048, 2048, Dir::Bidirectional),
                        (bufs[0].phys, 2048, Dir::Bidirectional),
                    ],
                    KEEP,
                )
                .unwrap();
            dom.unmap_batch_complete(u).unwrap();
            assert_eq!(dom.map_batch_complete(t).unwrap(), vec![new[2], new[0]]);
            assert_eq!(dom.counts().kept, 3);
            assert_eq!(kv(&common::domain_stats(&dom, bdf), "maps"), maps0 + 4 + 3);
            common::device_round_trip(&dev, bdf, new[2], &bufs[2], 2048, &[0x77; 32]);
            common::device_round_trip(&dev, bdf, new[0], &bufs[0], 0, &[0x78; 32]);
        }
        let maps: Vec<(u64, usize)> = new.iter().map(|&v| (v, 2048)).collect();
        dom.unmap_batch(&maps).unwrap();
    }
}

/// A delegated batch whose other pair cannot be mapped fails as a whole:
/// the pair that would have been kept is unmapped too, and nothing is
/// counted as kept.
#[test]
fn a_failed_delegated_batch_counts_no_kept_remap() {
    let d = Daemon::start("kept-failed", &[]);
    let bdf = 0xa8;
    let dom =
        DmaDomain::connect(d.socket(), bdf, Strategy::Magazine, FlushPolicy::PerCore).unwrap();
    let (bufs, old) = mapped(&dom, 2);
    let olds: Vec<(u64, usize)> = old.iter().map(|&v| (v, 2048)).collect();
    // Pair 0 is the same mapping again; pair 1 asks for zero bytes.
    let again = [
        (bufs[0].phys, 2048, Dir::Bidirectional),
        (bufs[1].phys, 0, Dir::Bidirectional),
    ];
    assert!(dom.remap_batch_submit_hinted(&olds, &again, KEEP).is_err());
    assert_eq!(dom.counts().kept, 0, "a failed batch keeps nothing");
    // Pair 0's old IOVA went with the batch: unmapping it again is refused.
    assert!(dom.unmap(old[0], 2048).is_err(), "old IOVA still mapped");
}
