//! Quotas per client identity and the connection cap: each limit refuses
//! with `QuotaExceeded` (or `Busy` at the cap) naming what ran out, another
//! identity is unaffected meanwhile, and everything comes back when the
//! client goes. The other identity runs as `nobody` (needs root; CI is root).

mod common;

use common::{kv, proof, RawClient};
use iommu_abi::proto::{ErrorCode, Request};
use libdma::{Dir, DmaDomain, FlushPolicy, Strategy};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

const POLICY: &str = r#"
max_connections = 12
[default]
trust = "delegated"
[quota]
pool_bytes = 4194304
pt_pages = 24
mappings = 40
domains = 2
connections = 5
[[quota.user]]
uid = 65534
domains = 1
"#;

const NOBODY: u32 = 65534;
const ENV: &str = "IOMMUD_QUOTA_OTHER";

fn code(r: &common::RawResult) -> Option<ErrorCode> {
    r.as_ref().err().map(|(c, _)| *c)
}

/// Root's account in `quotas`.
fn used(d: &common::Daemon, quota: &str) -> u64 {
    let text = d.ctl().read("quotas").unwrap();
    let line = text.lines().find(|l| l.starts_with("uid 0 ")).unwrap_or("");
    let mut it = line.split_whitespace();
    while let Some(w) = it.next() {
        if w == quota {
            let v = it.next().unwrap_or("0/0");
            return v.split('/').next().unwrap().parse().unwrap();
        }
    }
    panic!("no {quota} in {text}")
}

/// Another identity, at the same time: attaches, gets a pool, maps and
/// moves bytes, all within its own quotas.
fn other_identity_works(socket: &std::path::Path) {
    let dom = DmaDomain::connect(socket, 0x18, Strategy::Global, FlushPolicy::Strict)
        .expect("nobody attaches its own device");
    let b = dom.alloc(8192).unwrap();
    for _ in 0..10 {
        let iova = dom.map(b.phys, 8192, Dir::ToDevice).unwrap();
        dom.unmap(iova, 8192).unwrap();
    }
    // Its own quotas are its to read; root's are not.
    let q = dom.read_path("quotas").unwrap();
    assert!(q.lines().any(|l| l.starts_with("uid 65534 ")), "{q}");
    assert!(
        !q.contains("uid 0 "),
        "another identity's quotas shown: {q}"
    );
    dom.shutdown().unwrap();
}

#[test]
fn each_quota_is_enforced_per_identity_and_given_back() {
    if let Ok(socket) = std::env::var(ENV) {
        other_identity_works(std::path::Path::new(&socket));
        return;
    }
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "runs a client as nobody: run as root"
    );
    let d = common::daemon_with_policy("quotas", POLICY, &[]);
    std::os::unix::fs::chown(
        libdma::proof::path(0x18, Some(d.socket())),
        Some(NOBODY),
        Some(NOBODY),
    )
    .unwrap();

    // Two domains (the quota), then pool bytes: 4 MiB in all.
    let mut a = RawClient::connect(d.socket());
    a.attach(
        0x08,
        Strategy::Global,
        FlushPolicy::Strict,
        Some(proof(&d, 0x08).as_fd()),
    )
    .unwrap();
    let mut b = RawClient::connect(d.socket());
    b.attach(
        0x10,
        Strategy::Va,
        FlushPolicy::Strict,
        Some(proof(&d, 0x10).as_fd()),
    )
    .unwrap();
    let (vbase, _vm) = b.pool(4096);
    let (base, _m1) = a.pool(2 << 20);
    let r = a.call(&Request::AllocPool { bytes: 2 << 20 });
    assert_eq!(code(&r), Some(ErrorCode::QuotaExceeded), "{r:?}");
    assert!(r.unwrap_err().1.contains("quota pool_bytes exceeded"));
    assert_eq!(used(&d, "pool_bytes"), (2 << 20) + 4096);

    // Mappings: 40 live maps, the 41st refused.
    let mut iovas = Vec::new();
    for k in 0..40u64 {
        iovas.push(a.map(base + k * 4096, 4096, Dir::ToDevice).unwrap().0[0]);
    }
    let r = a.map(base + 40 * 4096, 4096, Dir::ToDevice);
    assert_eq!(code(&r), Some(ErrorCode::QuotaExceeded), "{r:?}");
    assert!(r.unwrap_err().1.contains("quota mappings exceeded"));
    assert_eq!(used(&d, "mappings"), 40);
    for v in iovas {
        a.unmap(v, 4096).unwrap();
    }
    assert_eq!(used(&d, "mappings"), 0, "unmaps give them back");

    // Domains: a third one is refused.
    let mut c = RawClient::connect(d.socket());
    let r = c.attach(
        0x20,
        Strategy::Global,
        FlushPolicy::Strict,
        Some(proof(&d, 0x20).as_fd()),
    );
    assert_eq!(code(&r), Some(ErrorCode::QuotaExceeded), "{r:?}");
    assert!(r.unwrap_err().1.contains("quota domains exceeded"));

    // Table pages: va maps 1 GiB apart each need new tables, until 24 pages.
    let mut refused = None;
    for k in 0..20u64 {
        let r = b.call(&Request::Map {
            phys: vbase,
            len: 64,
            dir: Dir::ToDevice,
            va: (k + 1) << 30,
        });
        if code(&r) == Some(ErrorCode::QuotaExceeded) {
            refused = Some((k, r.unwrap_err().1));
            break;
        }
        r.unwrap();
    }
    let (k, msg) = refused.expect("the table-page quota refused a map");
    assert!(msg.contains("quota pt_pages exceeded"), "{msg}");
    assert!(k >= 6, "refused only at the limit (after {k} maps)");
    assert!(used(&d, "pt_pages") >= 24);

    // Connections: root has a, b, c and the control connections `used`
    // opened and closed, which iommud counts until it has seen them close
    // (later on a loaded machine). One held control connection waits for
    // that: a, b, c and itself are 4. One more reaches 5, the next is
    // refused with a reason.
    let t = Instant::now();
    let held = loop {
        // Refused while the closed ones still count: try again.
        match libdma::Control::connect(d.socket()) {
            Ok(c) => break c,
            Err(e) => assert!(t.elapsed() < Duration::from_secs(5), "{e}"),
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    loop {
        let text = held.read("quotas").unwrap();
        let line = text.lines().find(|l| l.starts_with("uid 0 ")).unwrap_or("");
        if line.contains(" connections 4/") {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "{text}");
        std::thread::sleep(Duration::from_millis(10));
    }
    let e1 = RawClient::connect(d.socket());
    let refused = libdma::Control::connect(d.socket())
        .map(|_| ())
        .unwrap_err();
    assert!(
        refused.to_string().contains("quota connections exceeded"),
        "{refused}"
    );
    drop((e1, held));

    // Meanwhile another identity is not affected at all.
    let st = {
        use std::os::unix::process::CommandExt;
        std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "each_quota_is_enforced_per_identity_and_given_back",
            ])
            .env(ENV, d.socket())
            .uid(NOBODY)
            .gid(NOBODY)
            .status()
            .unwrap()
    };
    assert!(st.success(), "the other identity failed: {st}");

    // The client goes: every charge comes back.
    drop((a, b, c));
    let t = Instant::now();
    while used(&d, "pool_bytes") != 0 || used(&d, "pt_pages") != 0 || used(&d, "domains") != 0 {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{}",
            d.ctl().read("quotas").unwrap()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let s = d.ctl().read("stats").unwrap();
    assert!(kv(&s, "refused_quota") >= 5, "{s}");
}

#[test]
fn the_connection_cap_refuses_with_a_reason_and_recovers() {
    let d = common::daemon_with_policy(
        "conncap",
        "max_connections = 6\n[quota]\nconnections = 100\n",
        &[],
    );
    let held: Vec<RawClient> = (0..6).map(|_| RawClient::connect(d.socket())).collect();
    let e = libdma::Control::connect(d.socket())
        .map(|_| ())
        .unwrap_err();
    assert!(e.to_string().contains("at most 6 connections"), "{e}");
    drop(held);
    let t = Instant::now();
    let ctl = loop {
        match libdma::Control::connect(d.socket()) {
            Ok(c) => break c,
            Err(e) => {
                assert!(t.elapsed() < Duration::from_secs(5), "{e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    };
    let s = ctl.read("stats").unwrap();
    // The one above, and any retry that came while the six were closing.
    assert!(kv(&s, "refused_connections") >= 1, "{s}");
}
