//! The attacker is a driver process (docs/SECURITY.md): it sends any bytes
//! and descriptors, writes any value into any shared memory it has mapped,
//! connects many times and dies at any moment. One test per class of attack;
//! each asserts that the attack fails, and that a healthy client on another
//! device keeps moving verified bytes through the IOMMU meanwhile.
//!
//! The identity tests need root (to run a client as `nobody`); CI runs as root.

mod common;

use common::{device_round_trip, kv, proof, Daemon, RawClient};
use libdma::proto::{ErrorCode, MapEntry, Request};
use libdma::{Dir, DmaDomain, FlushPolicy, Strategy};
use std::os::fd::AsFd;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The hostile client's device, validated trust.
const A: u16 = 0x08;
/// The healthy client's device, delegated trust (magazine).
const B: u16 = 0x10;

const POLICY: &str = r#"
[default]
trust = "validated"
[[device]]
match = "00:02.0"
trust = "delegated"
"#;

const NOBODY: u32 = 65534;

/// A healthy magazine client on B, doing verified device round trips on a
/// thread until dropped; `done` counts them.
struct Healthy {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Healthy {
    fn start(d: &Daemon) -> Healthy {
        let dom = DmaDomain::connect(d.socket(), B, Strategy::Magazine, FlushPolicy::PerCore)
            .expect("healthy client attaches");
        let dev = d.machine();
        let (stop, done) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
        );
        let (s, n) = (stop.clone(), done.clone());
        let thread = std::thread::spawn(move || {
            let buf = dom.alloc(4096).unwrap();
            let mut k = 0u8;
            while !s.load(SeqCst) {
                let iova = dom.map(buf.phys, 4096, Dir::Bidirectional).unwrap();
                k = k.wrapping_add(1);
                device_round_trip(&dev, B, iova, &buf, 0, &[k; 64]);
                dom.unmap(iova, 4096).unwrap();
                n.fetch_add(1, SeqCst);
            }
            dom.shutdown().unwrap();
        });
        let h = Healthy {
            stop,
            done,
            thread: Some(thread),
        };
        h.wait_progress();
        h
    }

    /// Waits until the healthy client completes more round trips.
    fn wait_progress(&self) {
        let (n0, t) = (self.done.load(SeqCst), Instant::now());
        while self.done.load(SeqCst) < n0 + 50 {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "the healthy client stopped moving bytes"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Healthy {
    fn drop(&mut self) {
        self.stop.store(true, SeqCst);
        if let Some(t) = self.thread.take() {
            let r = t.join();
            if !std::thread::panicking() {
                r.expect("healthy client failed");
            }
        }
    }
}

fn unit_stat(d: &Daemon, key: &str) -> u64 {
    kv(&d.ctl().read("stats").unwrap(), key)
}

fn denied(r: common::RawResult) -> String {
    match r {
        Err((ErrorCode::PermissionDenied, msg)) => msg,
        other => panic!("expected PermissionDenied, got {other:?}"),
    }
}

#[test]
fn opting_out_of_validated_trust_is_refused() {
    let d = common::daemon_with_policy("optout", POLICY, &[]);
    let healthy = Healthy::start(&d);
    let p = proof(&d, A);
    let mut c = RawClient::connect(d.socket());
    // The driver asks for the magazine strategy on a validated device: it
    // gets a validated magazine (iommud keeps the magazines and writes every
    // entry), with no client-writable table and no delegated IOVAs.
    c.attach(A, Strategy::Magazine, FlushPolicy::PerCore, Some(p.as_fd()))
        .unwrap();
    assert_eq!(c.attach_fds, 2, "published page and client page, no arena");
    let stats = d.ctl().read("domains/00:01.0/stats").unwrap();
    assert!(stats.contains("trust validated"), "{stats}");
    assert!(stats.contains("strategy magazine"), "{stats}");
    let e = c
        .call(&Request::Exchange {
            pages: 1,
            returned: 0,
            want: 16,
        })
        .unwrap_err();
    assert_eq!(e.0, ErrorCode::PermissionDenied, "{}", e.1);
    c.call(&Request::Detach).unwrap();
    // What the policy allows works, and brings no client-writable table.
    c.attach(A, Strategy::Global, FlushPolicy::Strict, Some(p.as_fd()))
        .unwrap();
    assert_eq!(c.attach_fds, 2, "published page and client page, no arena");
    // Not even the administrator can give a validated domain an arena by
    // switching it to magazine.
    let e = d
        .ctl()
        .write("domains/00:01.0/strategy", "magazine")
        .unwrap_err();
    assert!(e.to_string().contains("unsupported"), "{e}");
    // A strategy outside the rule is refused, saying why.
    let d1 = common::daemon_with_policy(
        "optout-strategy",
        "[default]\nstrategies = [\"global\"]\n",
        &[],
    );
    let mut c1 = RawClient::connect(d1.socket());
    let msg = denied(c1.attach(
        A,
        Strategy::Magazine,
        FlushPolicy::PerCore,
        Some(proof(&d1, A).as_fd()),
    ));
    assert!(msg.contains("strategy magazine is not allowed"), "{msg}");
    assert_eq!(unit_stat(&d1, "refused_policy"), 1);
    // `static` (no per-buffer protection) only when the configuration lists it.
    let msg = denied(c1.attach(
        A,
        Strategy::Static,
        FlushPolicy::PerCore,
        Some(proof(&d1, A).as_fd()),
    ));
    assert!(msg.contains("strategy static is not allowed"), "{msg}");
    // A flush policy outside the rule is refused too.
    let d2 = common::daemon_with_policy("optout-flush", "[default]\nflush = [\"strict\"]\n", &[]);
    let mut c2 = RawClient::connect(d2.socket());
    let msg = denied(c2.attach(
        A,
        Strategy::Global,
        FlushPolicy::PerCore,
        Some(proof(&d2, A).as_fd()),
    ));
    assert!(msg.contains("flush policy percore is not allowed"), "{msg}");
    healthy.wait_progress();
}

#[test]
fn other_domains_frames_and_iommuds_tables_are_unreachable() {
    let d = common::daemon_with_policy("reach", POLICY, &[]);
    let healthy = Healthy::start(&d);
    let dev = d.machine();
    let p = proof(&d, A);
    let mut c = RawClient::connect(d.socket());
    c.attach(A, Strategy::Global, FlushPolicy::Strict, Some(p.as_fd()))
        .unwrap();
    let (own, _m) = c.pool(1 << 20);
    // Another client's DMA memory, on 00:04.0.
    let v = DmaDomain::connect(d.socket(), 0x20, Strategy::Identity, FlushPolicy::Strict).unwrap();
    let vbuf = v.alloc(4096).unwrap();
    vbuf.write(0, &[0x5a; 64]).unwrap();
    // iommud's own root table, read from the unit's RTADDR register (0x20).
    let root = dev.read64(0x20) & !0xfff;
    assert_ne!(root, 0);
    for (phys, what) in [
        (vbuf.phys, "another client's buffer"),
        (root, "iommud's root table"),
        (0, "physical page 0"),
        (u64::MAX - 4095, "the top of the address space"),
    ] {
        let r = c.map(phys, 4096, Dir::Bidirectional);
        assert!(
            matches!(
                r,
                Err((ErrorCode::NotOwner, _)) | Err((ErrorCode::Invalid, _))
            ),
            "{what}: {r:?}"
        );
    }
    // A batch with one bad entry maps nothing at all.
    let before = kv(&d.ctl().read("domains/00:01.0/stats").unwrap(), "mapped");
    let r = c.call(&Request::MapBatch {
        entries: vec![
            MapEntry {
                phys: own,
                len: 4096,
                dir: Dir::ToDevice,
                va: 0,
            },
            MapEntry {
                phys: root,
                len: 4096,
                dir: Dir::ToDevice,
                va: 0,
            },
        ],
    });
    assert!(matches!(r, Err((ErrorCode::NotOwner, _))), "{r:?}");
    let after = kv(&d.ctl().read("domains/00:01.0/stats").unwrap(), "mapped");
    assert_eq!(before, after, "the batch was all or nothing");
    // Unmapping what is not yours, with hostile lengths.
    for (iova, len) in [
        (0x4000_0000, 4096),
        (0, u64::MAX),
        (u64::MAX, 1),
        (1 << 30, 0),
    ] {
        let r = c.unmap(iova, len);
        assert!(r.is_err(), "unmap {iova:#x}+{len:#x}: {r:?}");
    }
    // The device of A reaching B's buffer by its physical address: blocked.
    let mut got = [0u8; 64];
    assert!(dev.dma_read(A, vbuf.phys, &mut got).is_err());
    assert!(dev.dma_read(A, root, &mut got).is_err());
    // Its own mapping works.
    let iova = c.map(own, 4096, Dir::Bidirectional).unwrap().0[0];
    dev.dma_write(A, iova, &[7; 16]).unwrap();
    healthy.wait_progress();
    drop(v);
}

/// Runs `iommuctl` as `uid` against `d`; returns (success, stderr).
fn ctl_as(d: &Daemon, uid: u32, args: &[&str]) -> (bool, String) {
    use std::os::unix::process::CommandExt;
    let out = Command::new(env!("CARGO_BIN_EXE_systest-iommuctl"))
        .arg("--socket")
        .arg(d.socket())
        .args(args)
        .uid(uid)
        .gid(uid)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn need_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the identity tests run clients as nobody: run them as root (CI does)"
    );
}

#[test]
fn control_and_attach_need_identity_and_proof() {
    need_root();
    let d = common::daemon_with_policy("identity", POLICY, &[]);
    let healthy = Healthy::start(&d);
    // nobody can read the unit-wide stats, but not stop, switch, tune or
    // look at another client's physical addresses, nor attach a device.
    assert!(ctl_as(&d, NOBODY, &["cat", "/scheme/iommu/stats"]).0);
    for args in [
        vec!["stop"],
        vec!["write", "/scheme/iommu/domains/00:02.0/flush", "strict"],
        vec!["write", "/scheme/iommu/reclaim", "off"],
        vec!["cat", "/scheme/iommu/domains/00:02.0/mappings"],
        vec!["attach", "00:01.0", "global", "strict"],
    ] {
        let (ok, out) = ctl_as(&d, NOBODY, &args);
        assert!(!ok, "{args:?} succeeded as nobody: {out}");
        assert!(
            out.contains("permission denied") || out.contains("Permission denied"),
            "{args:?}: {out}"
        );
    }
    assert!(unit_stat(&d, "refused_admin") >= 3);
    assert_eq!(unit_stat(&d, "refused_read"), 1);
    // Root: hostile proofs. No descriptor, the wrong function's file, a
    // read-only descriptor, /dev/null, the socket directory.
    let mut c = RawClient::connect(d.socket());
    let g = (Strategy::Global, FlushPolicy::Strict);
    let msg = denied(c.attach(A, g.0, g.1, None));
    assert!(msg.contains("pass a read-write descriptor"), "{msg}");
    let msg = denied(c.attach(A, g.0, g.1, Some(proof(&d, B).as_fd())));
    assert!(msg.contains("is not"), "{msg}");
    let ro = std::fs::File::open(libdma::proof::path(A, Some(d.socket()))).unwrap();
    let msg = denied(c.attach(A, g.0, g.1, Some(ro.as_fd())));
    assert!(msg.contains("not open for reading and writing"), "{msg}");
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .unwrap();
    assert!(c.attach(A, g.0, g.1, Some(null.as_fd())).is_err());
    let dir = std::fs::File::open(d.dir()).unwrap();
    assert!(c.attach(A, g.0, g.1, Some(dir.as_fd())).is_err());
    assert_eq!(unit_stat(&d, "refused_proof"), 6);
    // The connection stays usable after the refusals.
    c.attach(A, g.0, g.1, Some(proof(&d, A).as_fd())).unwrap();
    drop(c);
    // The real driver: the administrator hands 00:01.0 to uid nobody (as
    // pcid hands a device to its driver); it attaches, and still cannot
    // administer.
    let file = libdma::proof::path(A, Some(d.socket()));
    std::os::unix::fs::chown(&file, Some(NOBODY), Some(NOBODY)).unwrap();
    let t = Instant::now();
    loop {
        let (ok, out) = ctl_as(&d, NOBODY, &["attach", "00:01.0", "global", "strict"]);
        if ok {
            assert!(out.contains("attached 00:01.0 strategy=global"), "{out}");
            break;
        }
        // The root connection's detach may still be in flight.
        assert!(t.elapsed() < Duration::from_secs(5), "{out}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (ok, out) = ctl_as(&d, NOBODY, &["stop"]);
    assert!(!ok, "{out}");
    healthy.wait_progress();
    assert!(d.ctl().read("stats").is_ok(), "iommud still serves");
}

/// xorshift64*: the tests' deterministic randomness.
fn rng(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

/// The published page cannot be written by any means the client has.
fn assert_published_is_read_only(c: &RawClient) {
    let fd = c.published_fd.as_ref().unwrap();
    assert!(
        libdma::shm::Mapping::new(fd.as_fd(), 0, 4096).is_err(),
        "writable mapping of the published page"
    );
    use std::os::fd::AsRawFd;
    let reopened = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .unwrap();
    use std::io::Write;
    assert!((&reopened).write_all(&[0xff; 8]).is_err());
    assert!(libdma::shm::Mapping::new(reopened.as_fd(), 0, 4096).is_err());
    let ro = c.published.as_ref().unwrap();
    // SAFETY: asks the kernel to make our read-only mapping writable; it refuses.
    let r = unsafe { libc::mprotect(ro.as_ptr().cast(), 4096, libc::PROT_READ | libc::PROT_WRITE) };
    assert_ne!(r, 0, "mprotect made the published page writable");
}

/// One hostile validated client: a thread writes random and extreme values
/// into every word of its client page and exchange area (and sends flush
/// hints) while the main thread maps, has the device write through each
/// IOVA, checks the bytes landed in the buffer mapped (not in an earlier
/// one: a reused IOVA whose invalidation had not completed would write the
/// old frame), and unmaps. Buffers rotate so IOVAs and table pages are
/// reused; `spread` maps them 2 MiB apart so leaf tables come and go.
fn scribble(name: &str, strategy: Strategy, flush: FlushPolicy, extra: &[&str], spread: bool) {
    let d = common::daemon_with_policy(name, POLICY, extra);
    let healthy = Healthy::start(&d);
    let dev = d.machine();
    let p = proof(&d, A);
    let mut c = RawClient::connect(d.socket());
    c.attach(A, strategy, flush, Some(p.as_fd())).unwrap();
    assert_published_is_read_only(&c);
    let (base, pool) = c.pool(if spread { 32 << 20 } else { 1 << 20 });
    let client = c.client.take().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let scribbler = {
        let (stop, writes) = (stop.clone(), writes.clone());
        let published = c.published.take().unwrap();
        std::thread::spawn(move || {
            let mut s = 0x9e37_79b9_7f4a_7c15u64;
            let words = libdma::shared::CLIENT_LEN / 8;
            while !stop.load(SeqCst) {
                let epoch = published.read_u64(0).unwrap_or(0);
                for w in 0..words {
                    let r = rng(&mut s);
                    let v = match r % 8 {
                        0 => 0,
                        1 => u64::MAX,
                        2 => epoch.wrapping_add(r % 3).wrapping_sub(1),
                        3 => 1 << 63,
                        _ => rng(&mut s),
                    };
                    client.write_u64(w * 8, v).unwrap();
                }
                writes.fetch_add(1, SeqCst);
            }
        })
    };
    let stride = if spread { 2 << 20 } else { 4096 };
    let slots = if spread { 16 } else { 64 };
    let mut s = 7u64;
    let t0 = Instant::now();
    let mut cycles = 0u64;
    while cycles < 1500 || writes.load(SeqCst) < 20 {
        let k = (cycles % slots) as usize;
        let off = k * stride;
        let phys = base + off as u64;
        let iova = c.map(phys, 4096, Dir::Bidirectional).unwrap().0[0];
        let pat = rng(&mut s).to_le_bytes();
        dev.dma_write(A, iova, &pat)
            .unwrap_or_else(|e| panic!("cycle {cycles}: device write to {iova:#x}: {e:?}"));
        let mut got = [0u8; 8];
        pool.read_bytes(off, &mut got).unwrap();
        assert_eq!(got, pat, "cycle {cycles}: the write landed elsewhere");
        c.unmap(iova, 4096).unwrap();
        if cycles.is_multiple_of(16) {
            c.post(&Request::FlushHint);
        }
        cycles += 1;
        assert!(t0.elapsed() < Duration::from_secs(120), "too slow");
    }
    stop.store(true, SeqCst);
    scribbler.join().unwrap();
    let secs = t0.elapsed().as_secs_f64();
    assert_eq!(
        dev.counters().stale_hits,
        0,
        "a stale IOTLB translation was used"
    );
    let st = d.ctl().read("domains/00:01.0/stats").unwrap();
    // Invalidations stay bounded by the work and the timer, whatever the
    // client page says: at most one per unmap (strict) plus one per hint and
    // per 2 ms tick.
    let inval = kv(&st, "invalidations");
    let bound = cycles + cycles / 16 + (secs * 500.0) as u64 + 10;
    assert!(inval <= bound, "{inval} invalidations > {bound}:\n{st}");
    healthy.wait_progress();
    // The hostile client dies: its domain is gone at once.
    drop(c);
    let t = Instant::now();
    while d.ctl().read("domains").unwrap().contains("00:01.0") {
        assert!(t.elapsed() < Duration::from_secs(5), "domain not torn down");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(unit_stat(&d, "maps") >= cycles, "stats survive the client");
}

#[test]
fn scribbling_the_client_page_during_traffic_global_percore() {
    scribble(
        "scribble-gp",
        Strategy::Global,
        FlushPolicy::PerCore,
        &[],
        false,
    );
}

#[test]
fn scribbling_the_client_page_during_traffic_identity_deferred() {
    scribble(
        "scribble-id",
        Strategy::Identity,
        FlushPolicy::Deferred,
        &[],
        false,
    );
}

/// The epoch race of the landed code, as a regression test: a client that
/// held the published epoch back while a flush raced its unmap got its IOVA
/// (and a detached table page) reused before the invalidation completed.
/// Now the epoch lives in iommud's memory and the page is read-only; the
/// same traffic with table pages coming and going (reclamation on, buffers
/// 2 MiB apart) and caching mode on never uses a stale translation.
#[test]
fn epoch_race_regression_iovas_and_table_frames() {
    scribble(
        "race",
        Strategy::Global,
        FlushPolicy::PerCore,
        &["--caching-mode"],
        true,
    );
}

#[test]
fn unit_stats_are_cumulative_over_clients() {
    let d = common::daemon_with_policy("cumulative", POLICY, &[]);
    for round in 1..=3u64 {
        let dom = DmaDomain::connect(d.socket(), A, Strategy::Global, FlushPolicy::Strict).unwrap();
        let b = dom.alloc(4096).unwrap();
        for _ in 0..10 {
            let iova = dom.map(b.phys, 4096, Dir::ToDevice).unwrap();
            dom.unmap(iova, 4096).unwrap();
        }
        dom.shutdown().unwrap();
        let t = Instant::now();
        while d.ctl().read("domains").unwrap().contains("00:01.0") {
            assert!(t.elapsed() < Duration::from_secs(5));
            std::thread::sleep(Duration::from_millis(10));
        }
        let s = d.ctl().read("stats").unwrap();
        assert_eq!(kv(&s, "maps"), 10 * round, "{s}");
        assert_eq!(kv(&s, "unmaps"), 10 * round, "{s}");
        assert!(kv(&s, "domain_invalidations") >= 10 * round, "{s}");
        // Per domain: the root, then three tables per map, each freed again
        // after its strict unmap's invalidation (reclamation): still counted
        // after the domain is gone.
        assert_eq!(kv(&s, "pt_pages_allocated"), 31 * round, "{s}");
        assert!(kv(&s, "pt_pages_freed") >= 30 * round, "{s}");
    }
}

/// `stop` (here by the administrator) blocks every device before iommud
/// exits: a mapping that worked a moment before faults afterwards, and the
/// clients see their domain dead.
#[test]
fn stop_blocks_every_device_before_exit() {
    let mut d = common::daemon_with_policy("stop", POLICY, &[]);
    let dev = d.machine();
    let dom = DmaDomain::connect(d.socket(), B, Strategy::Magazine, FlushPolicy::PerCore).unwrap();
    let buf = dom.alloc(4096).unwrap();
    let iova = dom.map(buf.phys, 4096, Dir::Bidirectional).unwrap();
    device_round_trip(&dev, B, iova, &buf, 0, &[0x3c; 32]);
    d.ctl().shutdown().unwrap();
    let t = Instant::now();
    while d.child.try_wait().unwrap().is_none() {
        assert!(t.elapsed() < Duration::from_secs(10), "iommud did not stop");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut got = [0u8; 32];
    assert!(
        dev.dma_read(B, iova, &mut got).is_err(),
        "the device still reaches its buffer after stop"
    );
    assert!(
        dom.map(buf.phys, 4096, Dir::ToDevice).is_err(),
        "the domain is dead"
    );
}
