//! The Redox `SchemeSync` handler driven on the host by calling its methods,
//! over iommud's real state on the sim platform.

use std::sync::Arc;

use iommu_abi::proto::{ErrorCode, FlushPolicy, Request, Strategy, VERSION};
use iommud::platform::sim::{SimMmio, SimPlatform};
use iommud::policy::Peer;
use iommud::scheme::SchemeTree;
use iommud::session::State;
use iommud::unit::{Iommu, UnitConfig};
use iommud_scheme::client::{session_path, Channel, Endpoint};
use iommud_scheme::scheme::{IommuScheme, ROOT_ID};
use redox_scheme::scheme::SchemeSync;
use redox_scheme::{CallerCtx, OpenResult, RequestKind};
use syscall::error::{EACCES, EBADF, EINVAL, ENOENT, EPERM};
use syscall::flag::{MapFlags, O_RDONLY, O_RDWR};
use vtd::sim::SimConfig;

include!("../../../iommud/tests/scheme_table.rs");

fn ctx() -> CallerCtx {
    // A default request is a `Call` whose caller is pid 0 (see redox/NOTES.md).
    match redox_scheme::Request::default().kind() {
        RequestKind::Call(c) => c.caller(),
        _ => unreachable!("a zeroed request is a call"),
    }
}

fn state() -> Arc<State> {
    let plat = Arc::new(SimPlatform::new(SimConfig::default()).expect("sim platform"));
    let mmio = Box::new(SimMmio(plat.machine().clone()));
    let unit = Iommu::init(mmio, plat, &UnitConfig::default()).expect("unit init");
    let mut st = State::new(Arc::new(unit), "sim", true);
    // As on Redox: administrators attach (the zeroed test caller is uid 0),
    // and this administrator grants delegated trust (the magazine strategy).
    st.authority = iommud::platform::proof::Authority::Administrators;
    st.policy = iommud::policy::Policy::parse("[default]\ntrust = \"delegated\"\n").unwrap();
    Arc::new(st)
}

type Scheme = IommuScheme<Arc<State>>;

fn open(s: &mut Scheme, path: &str, flags: usize) -> syscall::Result<usize> {
    match s.openat(ROOT_ID, path, flags, 0, &ctx())? {
        OpenResult::ThisScheme { number, .. } => Ok(number),
        other => panic!("unexpected open result {other:?}"),
    }
}

fn read_all(s: &mut Scheme, id: usize) -> syscall::Result<String> {
    let mut out = Vec::new();
    let mut buf = [0u8; 7]; // small, to exercise offsets
    loop {
        let n = s.read(id, &mut buf, out.len() as u64, 0, &ctx())?;
        if n == 0 {
            return Ok(String::from_utf8(out).expect("utf-8"));
        }
        out.extend_from_slice(&buf[..n]);
    }
}

fn read_path(s: &mut Scheme, path: &str) -> syscall::Result<String> {
    let id = open(s, path, O_RDONLY)?;
    let r = read_all(s, id);
    s.on_close(id);
    r
}

/// The scheme adapter itself as the client's endpoint: `Channel` → `call`/`mmap_prep`.
struct Loopback<'a> {
    scheme: &'a mut Scheme,
    id: usize,
}

impl Endpoint for Loopback<'_> {
    fn call(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.scheme
            .call(self.id, buf, &[], &ctx())
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno))
    }
    fn map(&mut self, offset: u64, len: usize) -> std::io::Result<*mut u8> {
        self.scheme
            .mmap_prep(self.id, offset, len, MapFlags::empty(), &ctx())
            .map(|a| a as *mut u8)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno))
    }
}

/// Opens the session for the table's bdf and attaches (magazine, percore);
/// returns the still-open session id.
fn attach(s: &mut Scheme) -> usize {
    let id = open(s, &session_path(TABLE_BDF), O_RDWR).expect("open session");
    let mut ch = Channel::new(Loopback { scheme: s, id });
    let (r, _) = ch
        .request(&Request::Hello {
            version: u64::from(VERSION),
        })
        .expect("hello");
    assert!(r.result.is_ok(), "{r:?}");
    let (r, slots) = ch
        .request(&Request::Attach {
            bdf: TABLE_BDF,
            strategy: Strategy::Magazine,
            flush: FlushPolicy::PerCore,
        })
        .expect("attach");
    assert!(r.result.is_ok(), "{r:?}");
    // Whatever memory the attach offers is mappable through mmap_prep,
    // except that region 0, the published page, is never writable by the
    // client (it is sealed: the mapping is refused).
    for slot in slots {
        let p = ch.map_slot(slot, 0, 4096);
        if slot == 0 {
            assert!(p.is_err(), "the published page was mapped writable");
        } else {
            assert!(!p.expect("map offered region").is_null());
        }
    }
    id
}

/// The keys of `key value` text (values are live counters; reading moves some).
fn without_uptime(t: &str) -> Vec<String> {
    t.lines()
        .map(|l| l.split_whitespace().next().unwrap_or("").to_string())
        .collect()
}

#[test]
fn shared_table_gives_the_same_answers_as_the_tree() {
    let st = state();
    let mut s = IommuScheme::new(st.clone());
    let _session = attach(&mut s);
    for (path, want) in SCHEME_TABLE {
        let got = read_path(&mut s, path);
        match want {
            Ok(prefix) => {
                let text = got.unwrap_or_else(|e| panic!("{path:?}: {e}"));
                assert!(
                    text.starts_with(prefix),
                    "{path:?}: {text:?} lacks {prefix:?}"
                );
                let tree = SchemeTree::read(&*st, &Peer::ROOT, path).expect("tree read");
                assert_eq!(without_uptime(&text), without_uptime(&tree), "{path:?}");
            }
            Err(code) => {
                let e = got.expect_err(path);
                assert_eq!(e.errno, iommud_scheme::errno::errno(*code), "{path:?}");
                assert_eq!(
                    SchemeTree::read(&*st, &Peer::ROOT, path),
                    Err(*code),
                    "{path:?}"
                );
            }
        }
    }
}

#[test]
fn stats_reads_like_the_tree_and_bad_paths_are_enoent() {
    let st = state();
    let mut s = IommuScheme::new(st.clone());
    let text = read_path(&mut s, "stats").unwrap();
    assert_eq!(
        without_uptime(&text),
        without_uptime(&SchemeTree::read(&*st, &Peer::ROOT, "stats").unwrap())
    );
    for p in [
        "nonesuch",
        "domains/zz/stats",
        "domains/00:01.0/x",
        "domains/00:01.0/session/x",
    ] {
        assert_eq!(open(&mut s, p, O_RDONLY).unwrap_err().errno, ENOENT, "{p}");
    }
    assert_eq!(s.open_handles(), 0);
}

#[test]
fn writing_strategy_switches_an_idle_domain_and_read_only_nodes_refuse() {
    let st = state();
    let mut s = IommuScheme::new(st.clone());
    let _session = attach(&mut s);
    let id = open(&mut s, "domains/00:01.0/strategy", O_RDWR).unwrap();
    // Same answer as the tree gives (an attached domain may refuse with Busy).
    let via_scheme = s.write(id, b"global\n", 0, 0, &ctx()).map_err(|e| e.errno);
    let via_tree = SchemeTree::write(&*st, &Peer::ROOT, "domains/00:01.0/strategy", "global")
        .map(|()| 7)
        .map_err(iommud_scheme::errno::errno);
    assert_eq!(via_scheme, via_tree);
    let want = SchemeTree::read(&*st, &Peer::ROOT, "domains/00:01.0/strategy").unwrap();
    assert_eq!(read_all(&mut s, id).unwrap(), want);
    assert_eq!(
        s.write(id, b"nonsense", 0, 0, &ctx()).unwrap_err().errno,
        EINVAL
    );
    let r = open(&mut s, "reclaim", O_RDWR).unwrap();
    assert_eq!(s.write(r, b"off\n", 0, 0, &ctx()), Ok(4));
    assert_eq!(read_all(&mut s, r).unwrap(), "off\n");
    let stats = open(&mut s, "stats", O_RDWR).unwrap();
    assert_eq!(
        s.write(stats, b"x", 0, 0, &ctx()).unwrap_err().errno,
        EACCES
    );
}

#[test]
fn malformed_frames_are_einval_and_calls_need_a_session() {
    let st = state();
    let mut s = IommuScheme::new(st);
    let id = open(&mut s, &session_path(TABLE_BDF), O_RDWR).unwrap();
    for mut bad in [vec![], vec![0u8; 10], vec![0xffu8; 64], {
        let mut b = Request::FlushSync { upto: 0 }.encode(1);
        b[0] ^= 1; // magic
        b
    }] {
        bad.resize(bad.len().max(64), 0);
        assert_eq!(s.call(id, &mut bad, &[], &ctx()).unwrap_err().errno, EINVAL);
    }
    let stats = open(&mut s, "stats", O_RDONLY).unwrap();
    let mut frame = Request::FlushSync { upto: 0 }.encode(1);
    assert_eq!(
        s.call(stats, &mut frame, &[], &ctx()).unwrap_err().errno,
        EBADF
    );
    // Offsets naming no offered region.
    let e = s
        .mmap_prep(id, 0, 4096, MapFlags::empty(), &ctx())
        .unwrap_err();
    assert_eq!(e.errno, EINVAL);
}

#[test]
fn a_session_attaches_only_its_own_device_and_closing_detaches() {
    let st = state();
    let mut s = IommuScheme::new(st.clone());
    let id = open(&mut s, "/scheme/iommu/domains/00:02.0/session", O_RDWR).unwrap();
    let mut ch = Channel::new(Loopback { scheme: &mut s, id });
    let (r, _) = ch
        .request(&Request::Attach {
            bdf: TABLE_BDF,
            strategy: Strategy::Magazine,
            flush: FlushPolicy::PerCore,
        })
        .unwrap();
    assert_eq!(r.result, Err(ErrorCode::NotOwner));
    assert_eq!(iommud_scheme::errno::errno(ErrorCode::NotOwner), EPERM);
    s.on_close(id);

    let id = attach(&mut s);
    assert_eq!(read_path(&mut s, "domains").unwrap(), "00:01.0\n");
    s.on_close(id);
    assert_eq!(read_path(&mut s, "domains").unwrap(), "");
    assert_eq!(s.open_handles(), 0);
}
