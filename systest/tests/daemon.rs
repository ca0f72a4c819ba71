//! The daemon on the sim platform, seen from outside: the model is faithful
//! (a skipped invalidation is a stale hit, a done one a fault that iommud
//! reports), empty page-table pages are reclaimed (or not, when told), and
//! hostile requests get errors while iommud keeps serving everyone else.

mod common;

use common::{kv, pin_to_cpu, Daemon};
use libdma::proto::{ErrorCode, Reply, Request};
use libdma::{Dir, DmaDomain, FlushPolicy, Strategy};
use std::time::{Duration, Instant};

const A: u16 = 0x0008; // 00:01.0
const B: u16 = 0x0010; // 00:02.0

fn wait_for_fault(d: &Daemon, needle: &str) -> String {
    let t = Instant::now();
    loop {
        let f = d.ctl().read("/scheme/iommu/faults").unwrap();
        if f.contains(needle) {
            return f;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "no fault {needle:?} in:\n{f}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn skipped_invalidation_is_a_stale_hit_and_a_done_one_a_reported_fault() {
    let d = Daemon::start("stale", &[]);
    let dev = d.machine();
    let dom = DmaDomain::connect(d.socket(), A, Strategy::Magazine, FlushPolicy::PerCore).unwrap();
    let buf = dom.alloc(4096).unwrap();
    let iova = dom.map(buf.phys, 4096, Dir::Bidirectional).unwrap();
    dev.dma_write(A, iova, b"through the iommu").unwrap();
    let mut got = [0u8; 17];
    buf.read(0, &mut got).unwrap();
    assert_eq!(&got, b"through the iommu");

    // Unmap clears the leaf entry, but the percore policy batches the
    // invalidation: the IOTLB still holds the translation.
    let stale_before = dev.counters().stale_hits;
    dom.unmap(iova, 4096).unwrap();
    dev.dma_write(A, iova, b"stale")
        .expect("a stale IOTLB hit still reaches the page");
    assert_eq!(dev.counters().stale_hits, stale_before + 1);

    // Drain waits for the invalidation: now the device faults, and iommud reports it.
    dom.drain().unwrap();
    let err = dev.dma_write(A, iova, b"blocked").unwrap_err();
    assert!(
        matches!(err, vtd::sim::DmaFault::Translation { .. }),
        "{err:?}"
    );
    let faults = wait_for_fault(&d, &format!("iova={iova:#x}"));
    let line = faults
        .lines()
        .find(|l| l.contains(&format!("iova={iova:#x}")))
        .unwrap();
    assert!(line.contains("bdf=00:01.0"), "{line}");
    assert!(line.contains("access=write"), "{line}");
    assert!(
        line.contains("reason=0x5"),
        "write to a non-present page is reason 5: {line}"
    );
    let s = dom.read_path("domains/00:01.0/stats").unwrap();
    assert_eq!(kv(&s, "faults"), 1);

    // A read of an IOVA that was never mapped.
    let mut b = [0u8; 8];
    assert!(dev.dma_read(A, 0x900000, &mut b).is_err());
    let faults = wait_for_fault(&d, "iova=0x900000");
    assert!(
        faults.contains("iova=0x900000 access=read reason=0x6"),
        "{faults}"
    );
}

fn table_pages_after_map_unmap(extra: &[&str]) -> (u64, u64, u64, u64) {
    let d = Daemon::start(&format!("reclaim{}", extra.len()), extra);
    let dom = DmaDomain::connect(d.socket(), A, Strategy::Global, FlushPolicy::Strict).unwrap();
    let s0 = dom.read_path("domains/00:01.0/stats").unwrap();
    let base = kv(&s0, "pt_pages_live");
    let bufs: Vec<_> = (0..3).map(|_| dom.alloc(8192).unwrap()).collect();
    let iovas: Vec<_> = bufs
        .iter()
        .map(|b| dom.map(b.phys, 8192, Dir::ToDevice).unwrap())
        .collect();
    let peak = kv(
        &dom.read_path("domains/00:01.0/stats").unwrap(),
        "pt_pages_live",
    );
    for i in iovas {
        dom.unmap(i, 8192).unwrap();
    }
    let s = dom.read_path("domains/00:01.0/stats").unwrap();
    (
        base,
        peak,
        kv(&s, "pt_pages_live"),
        kv(&s, "pt_pages_freed"),
    )
}

#[test]
fn empty_page_table_pages_are_reclaimed_after_their_invalidation() {
    // 4-level tables: a first mapping needs a level-3, a level-2 and a leaf table.
    let (base, peak, after, freed) = table_pages_after_map_unmap(&[]);
    assert_eq!(base, 1, "just the root");
    assert_eq!(peak, 4);
    assert_eq!(after, base, "back to the root's baseline");
    assert_eq!(
        freed, 3,
        "freed only after the strict invalidation completed"
    );

    let (base, peak, after, freed) = table_pages_after_map_unmap(&["--no-reclaim"]);
    assert_eq!((base, peak), (1, 4));
    assert_eq!(after, peak, "reclamation off keeps the empty tables");
    assert_eq!(freed, 0);
}

#[test]
fn hostile_requests_get_errors_and_iommud_keeps_serving() {
    let d = Daemon::start("hostile", &[]);
    // A well-behaved client on another device keeps working throughout.
    let good = DmaDomain::connect(d.socket(), B, Strategy::Magazine, FlushPolicy::PerCore).unwrap();
    let gbuf = good.alloc(4096).unwrap();
    let dev = d.machine();
    let check_good = || {
        let iova = good.map(gbuf.phys, 64, Dir::FromDevice).unwrap();
        dev.dma_write(B, iova, &[7u8; 64]).unwrap();
        good.unmap(iova, 64).unwrap();
    };
    check_good();

    let ctl = d.ctl();
    let reply_code = |bytes: &[u8]| -> Result<[u64; 5], ErrorCode> {
        Reply::decode(&ctl.raw(bytes).unwrap()).unwrap().result
    };
    // Garbage, truncation, a bad version, an unknown op, a lying payload length.
    assert_eq!(
        reply_code(b"not a message at all"),
        Err(ErrorCode::Malformed)
    );
    let mut m = Request::FlushSync { upto: 0 }.encode(9);
    m[4] = 99;
    assert_eq!(reply_code(&m), Err(ErrorCode::Malformed));
    let mut m = Request::FlushSync { upto: 0 }.encode(9);
    m[6] = 0x55;
    assert_eq!(reply_code(&m), Err(ErrorCode::Malformed));
    let mut m = Request::Detach.encode(3);
    m[56] = 200;
    assert_eq!(reply_code(&m), Err(ErrorCode::Malformed));
    let mut rng = 0x1234_5678_9abc_def0u64;
    // (An empty datagram reads as end-of-stream: it closes the sender's own
    // connection, which is all the harm it can do; so lengths start at 1.)
    for len in 1..300 {
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng as u8
            })
            .collect();
        assert!(reply_code(&bytes).is_err());
    }
    check_good();

    // Requests that decode but are wrong for this client.
    let bad = DmaDomain::connect(d.socket(), A, Strategy::Global, FlushPolicy::Strict).unwrap();
    let not_mine = gbuf.phys; // the other client's memory
    match bad.map(not_mine, 4096, Dir::ToDevice) {
        Err(libdma::Error::Server { code, .. }) => assert_eq!(code, ErrorCode::NotOwner),
        other => panic!("mapping another client's frames: {other:?}"),
    }
    match bad.unmap(0x4000_0000, 4096) {
        Err(libdma::Error::Server { code, .. }) => assert_eq!(code, ErrorCode::NotOwner),
        other => panic!("unmapping an IOVA never mapped: {other:?}"),
    }
    match bad.map(0, 0, Dir::ToDevice) {
        Err(libdma::Error::Invalid(_)) => {}
        other => panic!("zero length: {other:?}"),
    }
    match DmaDomain::connect(d.socket(), B, Strategy::Magazine, FlushPolicy::PerCore) {
        Err(libdma::Error::Server { code, .. }) => assert_eq!(code, ErrorCode::Busy),
        Err(e) => panic!("attaching a taken device: {e}"),
        Ok(_) => panic!("attaching a taken device succeeded"),
    }
    match ctl.read("/scheme/iommu/domains/00:01.0/nonesuch") {
        Err(libdma::Error::Server { code, .. }) => assert_eq!(code, ErrorCode::NotFound),
        other => panic!("bad path: {other:?}"),
    }
    check_good();
    let s = d.ctl().read("domains/00:01.0/stats").unwrap();
    assert!(kv(&s, "errors") >= 2, "{s}");
}

#[test]
fn a_client_that_dies_loses_its_domain() {
    let d = Daemon::start("death", &[]);
    let dev = d.machine();
    let dom = DmaDomain::connect(d.socket(), A, Strategy::Magazine, FlushPolicy::PerCore).unwrap();
    let buf = dom.alloc(4096).unwrap();
    let iova = dom.map(buf.phys, 4096, Dir::ToDevice).unwrap();
    let mut b = [0u8; 4];
    dev.dma_read(A, iova, &mut b).unwrap();
    // Dropping without shutdown is what a crash looks like to iommud: the socket closes.
    let _ = buf;
    drop(dom);
    let t = Instant::now();
    while d.ctl().read("domains").unwrap().contains("00:01.0") {
        assert!(t.elapsed() < Duration::from_secs(5), "domain not torn down");
        std::thread::sleep(Duration::from_millis(10));
    }
    // The context entry is gone and invalidated: the device is blocked.
    assert!(dev.dma_read(A, iova, &mut b).is_err());
    assert_eq!(dev.counters().stale_hits, 0);
}

#[test]
fn iommuctl_reads_and_writes_the_tree() {
    let d = Daemon::start("ctl", &[]);
    let run = |args: &[&str]| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_systest-iommuctl"))
            .arg("--socket")
            .arg(d.socket())
            .args(args)
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (ok, out, _) = run(&["cat", "/scheme/iommu/stats"]);
    assert!(ok);
    assert!(out.contains("platform sim\n"), "{out}");
    assert!(out.contains("translation on\n"), "{out}");
    let (ok, _, _) = run(&["write", "/scheme/iommu/reclaim", "off"]);
    assert!(ok);
    assert_eq!(run(&["cat", "reclaim"]).1, "off\n");
    let (ok, _, err) = run(&["cat", "/scheme/iommu/nope"]);
    assert!(!ok);
    assert!(err.contains("no such path"), "{err}");
}

mod table {
    include!("../../iommud/tests/scheme_table.rs");
}

/// The same scheme-path requests the Redox handler answers (see
/// `redox/iommud-scheme/tests/scheme.rs`), answered by the socket server.
#[test]
fn socket_server_answers_the_shared_scheme_table() {
    let d = Daemon::start("table", &[]);
    let _client = DmaDomain::connect(
        d.socket(),
        table::TABLE_BDF,
        Strategy::Magazine,
        FlushPolicy::PerCore,
    )
    .unwrap();
    let ctl = d.ctl();
    for (path, want) in table::SCHEME_TABLE {
        match (ctl.read(path), want) {
            (Ok(text), Ok(prefix)) => assert!(text.starts_with(prefix), "{path}: {text:?}"),
            (Err(libdma::Error::Server { code, .. }), Err(w)) => assert_eq!(code, *w, "{path}"),
            (got, _) => panic!("{path}: got {got:?}, want {want:?}"),
        }
    }
}

/// One CPU's magazines hold IOVAs it unmapped; another CPU then needs almost
/// the whole IOVA space at once. The allocator runs dry, and the client must
/// take the IOVAs back from the first CPU's caches (after their
/// invalidation) instead of failing.
#[test]
fn a_cpu_short_of_iovas_reclaims_those_cached_on_other_cpus() {
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        return; // needs two CPUs to put caches on two slots
    }
    let d = Daemon::start("hoard", &[]);
    let dom = std::sync::Arc::new(
        DmaDomain::connect(d.socket(), A, Strategy::Magazine, FlushPolicy::PerCore).unwrap(),
    );
    let buf = dom.alloc(32 * 4096).unwrap();
    let len = 32 * 4096;
    // CPU 0: map and unmap 32-page IOVAs, leaving its caches full.
    let d0 = dom.clone();
    std::thread::spawn(move || {
        pin_to_cpu(0);
        for _ in 0..1000 {
            let iova = d0.map(buf.phys, len, Dir::ToDevice).unwrap();
            d0.unmap(iova, len).unwrap();
        }
    })
    .join()
    .unwrap();
    // CPU 1: hold all but a few of the domain's 32-page IOVAs at once
    // (1 GiB of IOVA space = 8192 of them).
    let d1 = dom.clone();
    let held = std::thread::spawn(move || {
        pin_to_cpu(1);
        let mut held = Vec::new();
        for i in 0..8000 {
            match d1.map(buf.phys, len, Dir::ToDevice) {
                Ok(iova) => held.push(iova),
                Err(e) => panic!("map {i} failed with {} IOVAs held: {e}", held.len()),
            }
        }
        for &iova in &held {
            d1.unmap(iova, len).unwrap();
        }
        held.len()
    })
    .join()
    .unwrap();
    assert_eq!(held, 8000);
    let dev = d.machine();
    assert_eq!(dev.counters().stale_hits, 0);
}

/// Validated maps travel in batches: one round trip for many buffers, each
/// reachable by the device at its IOVA; a batch with a bad entry leaves
/// nothing mapped; in caching mode a magazine batch needs one invalidation.
#[test]
fn batches_map_in_one_round_trip_and_all_or_nothing() {
    let d = Daemon::start("batch", &[]);
    let dev = d.machine();
    for (strategy, sid) in [
        (Strategy::Global, A),
        (Strategy::Identity, B),
        (Strategy::Va, 0x0018),
    ] {
        let dom = DmaDomain::connect(d.socket(), sid, strategy, FlushPolicy::Strict).unwrap();
        let bufs: Vec<_> = (0..20).map(|_| dom.alloc(4096).unwrap()).collect();
        let req: Vec<_> = bufs
            .iter()
            .map(|b| (b.phys + 64, 512, Dir::Bidirectional))
            .collect();
        let rt = dom.counts().round_trips;
        let iovas = dom.map_batch(&req).unwrap();
        assert_eq!(
            dom.counts().round_trips,
            rt + 1,
            "{strategy:?}: one round trip for 20 maps"
        );
        for (k, (b, &iova)) in bufs.iter().zip(&iovas).enumerate() {
            let pattern = [k as u8 ^ 0x5a; 512];
            dev.dma_write(sid, iova, &pattern).unwrap();
            let mut back = [0u8; 512];
            b.read(64, &mut back).unwrap();
            assert_eq!(back, pattern, "{strategy:?} entry {k}");
        }
        let maps: Vec<_> = iovas.iter().map(|&i| (i, 512)).collect();
        dom.unmap_batch(&maps).unwrap();
        assert_eq!(dom.counts().round_trips, rt + 2);
        assert!(
            dev.dma_write(sid, iovas[0], &[0; 8]).is_err(),
            "{strategy:?}: unmapped"
        );

        // Entry 3 is not this client's memory: nothing of the batch stays mapped.
        let mut bad = req[..3].to_vec();
        bad.push((0x1000, 64, Dir::ToDevice));
        match dom.map_batch(&bad) {
            Err(libdma::Error::Server { code, msg }) => {
                assert_eq!(code, ErrorCode::NotOwner);
                assert!(msg.starts_with("entry 3:"), "{msg}");
            }
            // va: the client has no address for memory outside its pools and
            // refuses the batch before sending it.
            Err(libdma::Error::Invalid(_)) if strategy == Strategy::Va => {}
            other => panic!("{strategy:?}: bad batch gave {other:?}"),
        }
        let s = common::domain_stats(&dom, sid);
        assert_eq!(kv(&s, "mapped"), 0, "{strategy:?}: {s}");
        assert_eq!(kv(&s, "refcounted_pages"), 0, "{strategy:?}: {s}");
    }
    assert_eq!(dev.counters().stale_hits, 0);
}

#[test]
fn a_magazine_batch_in_caching_mode_is_invalidated_once() {
    let d = Daemon::start("batchcm", &["--caching-mode"]);
    let dom = DmaDomain::connect(d.socket(), A, Strategy::Magazine, FlushPolicy::PerCore).unwrap();
    assert!(dom.caching_mode());
    let buf = dom.alloc(4096).unwrap();
    // Warm the magazines so the counts below are the maps' own.
    let i = dom.map(buf.phys, 64, Dir::ToDevice).unwrap();
    dom.unmap(i, 64).unwrap();
    // Nothing waiting for an invalidation, so iommud's timer has nothing to flush.
    dom.drain().unwrap();
    // Count invalidations, not round trips: a thread that changes CPU may
    // also make a depot exchange, which invalidates nothing.
    let inval = || {
        kv(
            &dom.read_path("domains/00:01.0/stats").unwrap(),
            "invalidations",
        )
    };
    let before = inval();
    let one_by_one: Vec<_> = (0..16)
        .map(|_| dom.map(buf.phys, 64, Dir::ToDevice).unwrap())
        .collect();
    assert_eq!(inval(), before + 16, "an invalidation per map");
    let before = inval();
    let batch = dom.map_batch(&[(buf.phys, 64, Dir::ToDevice); 16]).unwrap();
    assert_eq!(inval(), before + 1, "one invalidation for the batch");
    let dev = d.machine();
    let mut b = [0u8; 8];
    for &iova in one_by_one.iter().chain(&batch) {
        dev.dma_read(A, iova, &mut b).unwrap();
    }
}
