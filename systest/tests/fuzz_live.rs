//! A million fuzzed messages against a live daemon (this test builds it in
//! debug, so arithmetic overflow panics): random bytes, valid headers with
//! random operations and arguments, and well-formed requests with hostile
//! fields, from client processes running as an unprivileged user that owns
//! one device, while they also scribble over their client page. Afterwards
//! no thread of iommud panicked (its stderr and its `internal_errors`
//! counter), it still serves, and a healthy client still moves verified
//! bytes. Needs root (to run the fuzzers as `nobody`); CI runs as root.

mod common;

use common::{device_round_trip, kv, Daemon};
use libdma::proto::{
    Dir, FlushPolicy, MapEntry, Request, Strategy, HEADER_LEN, MAGIC, MAX_BATCH, MAX_MESSAGE,
    VERSION,
};
use libdma::DmaDomain;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

/// Messages in all (split over the fuzzing processes).
const TOTAL: u64 = 1_000_000;
/// Fuzzing processes (each with its own connections).
const PROCESSES: u64 = 2;
/// The fuzzers' device (their uid owns its device file).
const A: u16 = 0x08;
/// The healthy client's device.
const B: u16 = 0x10;
const NOBODY: u32 = 65534;
const ENV: &str = "IOMMUD_FUZZ_CLIENT";

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    /// A value biased toward the edges where arithmetic breaks.
    fn hostile(&mut self, near: u64) -> u64 {
        match self.below(10) {
            0 => 0,
            1 => u64::MAX,
            2 => u64::MAX - self.below(4096),
            3 => 1 << self.below(64),
            4 => near.wrapping_add(self.below(1 << 16)),
            5 => near.wrapping_sub(self.below(4096)),
            6 => self.below(1 << 21),
            _ => self.next(),
        }
    }
}

fn strategy(r: &mut Rng) -> Strategy {
    Strategy::ALL[r.below(Strategy::ALL.len() as u64) as usize]
}

fn flush(r: &mut Rng) -> FlushPolicy {
    FlushPolicy::ALL[r.below(FlushPolicy::ALL.len() as u64) as usize]
}

fn dir(r: &mut Rng) -> Dir {
    [Dir::ToDevice, Dir::FromDevice, Dir::Bidirectional][r.below(3) as usize]
}

const PATHS: [&str; 9] = [
    "stats",
    "domains",
    "faults",
    "reclaim",
    "domains/00:01.0/stats",
    "domains/00:01.0/mappings",
    "domains/00:02.0/strategy",
    "domains/00:01.0/flush",
    "/scheme/iommu/domains/ff:1f.7/x",
];

/// One fuzzed message.
fn message(r: &mut Rng, seq: u32, pool: u64, iova: u64) -> Vec<u8> {
    match r.below(10) {
        // Random bytes (never empty: an empty datagram closes the connection).
        0 => (0..1 + r.below(200)).map(|_| r.next() as u8).collect(),
        // A valid header with random op, flags, args and payload length.
        1 | 2 => {
            let mut m = vec![0u8; HEADER_LEN];
            m[0..4].copy_from_slice(&MAGIC.to_le_bytes());
            m[4..6].copy_from_slice(&VERSION.to_le_bytes());
            let op = if r.below(4) == 0 {
                r.next() as u16
            } else {
                r.below(20) as u16
            };
            m[6..8].copy_from_slice(&op.to_le_bytes());
            m[8..12].copy_from_slice(&seq.to_le_bytes());
            for k in 0..5 {
                let v = r.hostile(pool);
                m[16 + 8 * k..24 + 8 * k].copy_from_slice(&v.to_le_bytes());
            }
            let extra = r.below(300) as usize;
            let claimed = if r.below(3) == 0 {
                r.next() as u32
            } else {
                extra as u32
            };
            m[56..60].copy_from_slice(&claimed.to_le_bytes());
            if r.below(8) == 0 {
                m[60] = 1;
            }
            m.extend((0..extra).map(|_| r.next() as u8));
            m
        }
        // Well-formed requests with hostile fields.
        _ => {
            let req = match r.below(14) {
                0 => Request::Hello {
                    version: r.hostile(1),
                },
                1 => Request::Attach {
                    bdf: if r.below(2) == 0 { A } else { r.next() as u16 },
                    strategy: strategy(r),
                    flush: flush(r),
                },
                2 => Request::AllocPool {
                    bytes: r.hostile(4096),
                },
                3 | 4 => Request::Map {
                    phys: r.hostile(pool),
                    len: r.hostile(4096),
                    dir: dir(r),
                    va: r.hostile(0x7f00_0000_0000),
                },
                5 => Request::Unmap {
                    iova: r.hostile(iova),
                    len: r.hostile(4096),
                },
                6 => Request::Exchange {
                    pages: r.hostile(1),
                    returned: r.hostile(1),
                    want: r.hostile(1),
                },
                7 => Request::FlushHint,
                8 => Request::FlushSync { upto: r.hostile(1) },
                9 => Request::Detach,
                10 => Request::ReadPath {
                    path: PATHS[r.below(PATHS.len() as u64) as usize].into(),
                },
                11 => Request::WritePath {
                    path: PATHS[r.below(PATHS.len() as u64) as usize].into(),
                    value: ["on", "off", "magazine", "strict", "x"][r.below(5) as usize].into(),
                },
                12 => Request::MapBatch {
                    entries: (0..1 + r.below(MAX_BATCH as u64))
                        .map(|_| MapEntry {
                            phys: r.hostile(pool),
                            len: r.hostile(4096),
                            dir: dir(r),
                            va: r.hostile(0),
                        })
                        .collect(),
                },
                _ => Request::UnmapBatch {
                    entries: (0..1 + r.below(MAX_BATCH as u64))
                        .map(|_| (r.hostile(iova), r.hostile(4096)))
                        .collect(),
                },
            };
            req.encode(seq)
        }
    }
}

/// A fuzzing process: `count` messages over a few connections.
fn fuzz_client(socket: &std::path::Path, seed: u64, count: u64) {
    let mut r = Rng(seed | 1);
    let mut sent = 0u64;
    let mut buf = vec![0u8; MAX_MESSAGE];
    while sent < count {
        let sock = libdma::transport::SeqPacket::connect(socket).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        // Sometimes attach properly first (with the proof this uid may
        // open), so the domain paths and the client page are exercised.
        let mut client_page = None;
        let proof = libdma::proof::open(A, Some(socket)).ok();
        let (mut pool, mut iova) = (0u64, 1u64 << 30);
        let per_conn = 1000 + r.below(20_000);
        for k in 0..per_conn.min(count - sent) {
            let seq = k as u32;
            let m = message(&mut r, seq, pool, iova);
            let attach = matches!(Request::decode(&m), Ok((_, Request::Attach { .. })));
            let fds: Vec<_> = if attach && r.below(2) == 0 {
                proof.iter().map(|f| f.as_fd()).collect()
            } else {
                Vec::new()
            };
            sock.send(&m, &fds).unwrap();
            sent += 1;
            // Every message gets exactly one reply, except a decodable FlushHint.
            let one_way = matches!(Request::decode(&m), Ok((_, Request::FlushHint)));
            if one_way {
                continue;
            }
            let (n, got) = sock.recv(&mut buf).expect("iommud answers every request");
            assert!(n >= HEADER_LEN, "reply of {n} bytes");
            let reply = libdma::proto::Reply::decode(&buf[..n]).expect("a reply decodes");
            if let (Ok(a), true) = (&reply.result, attach && got.len() >= 2) {
                let _ = a;
                client_page =
                    libdma::shm::Mapping::new(got[1].as_fd(), 0, libdma::shared::CLIENT_LEN).ok();
            }
            if let (Ok(a), Ok((_, Request::AllocPool { .. }))) =
                (&reply.result, Request::decode(&m))
            {
                pool = a[0];
            }
            if let (Ok(a), Ok((_, Request::Map { .. }))) = (&reply.result, Request::decode(&m)) {
                iova = a[0];
            }
            // Scribble over the client page now and then.
            if let Some(c) = &client_page {
                if r.below(16) == 0 {
                    for _ in 0..8 {
                        let w = r.below((libdma::shared::CLIENT_LEN / 8) as u64) as usize;
                        let v = r.hostile(0);
                        c.write_u64(w * 8, v).unwrap();
                    }
                }
            }
        }
    }
}

#[test]
fn a_million_fuzzed_messages_leave_no_panic() {
    if let Ok(spec) = std::env::var(ENV) {
        // This process is one of the fuzzers.
        let f: Vec<&str> = spec.split(',').collect();
        fuzz_client(
            std::path::Path::new(f[0]),
            f[1].parse().unwrap(),
            f[2].parse().unwrap(),
        );
        return;
    }
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "runs the fuzzers as nobody: run as root (CI does)"
    );
    let d = Daemon::start_logged("fuzz-live", &[]);
    // The administrator hands 00:01.0 to nobody.
    let file = libdma::proof::path(A, Some(d.socket()));
    std::os::unix::fs::chown(&file, Some(NOBODY), Some(NOBODY)).unwrap();
    let healthy = DmaDomain::connect(d.socket(), B, Strategy::Magazine, FlushPolicy::PerCore)
        .expect("healthy client attaches");
    let dev = d.machine();
    let buf = healthy.alloc(4096).unwrap();
    let t0 = Instant::now();
    let children: Vec<_> = (0..PROCESSES)
        .map(|k| {
            use std::os::unix::process::CommandExt;
            std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "a_million_fuzzed_messages_leave_no_panic",
                    "--nocapture",
                ])
                .env(
                    ENV,
                    format!(
                        "{},{},{}",
                        d.socket().display(),
                        0x5eed_0000 + k,
                        TOTAL / PROCESSES
                    ),
                )
                .uid(NOBODY)
                .gid(NOBODY)
                .spawn()
                .unwrap()
        })
        .collect();
    // The healthy client keeps moving verified bytes during the storm.
    let mut rounds = 0u64;
    let mut children = children;
    while !children.is_empty() {
        let iova = healthy.map(buf.phys, 4096, Dir::Bidirectional).unwrap();
        device_round_trip(&dev, B, iova, &buf, 0, &[rounds as u8; 32]);
        healthy.unmap(iova, 4096).unwrap();
        rounds += 1;
        children.retain_mut(|c| match c.try_wait().unwrap() {
            Some(st) => {
                assert!(st.success(), "a fuzzing process failed: {st}");
                false
            }
            None => true,
        });
        std::thread::sleep(Duration::from_millis(2));
    }
    let secs = t0.elapsed().as_secs_f64();
    let stats = d.ctl().read("stats").expect("iommud still serves");
    println!(
        "{TOTAL} fuzzed messages in {secs:.1} s ({:.0}/s); healthy round trips meanwhile: {rounds}",
        TOTAL as f64 / secs
    );
    println!("{stats}");
    assert!(rounds > 0);
    assert_eq!(kv(&stats, "internal_errors"), 0, "{stats}");
    assert!(kv(&stats, "malformed") > 1000, "{stats}");
    let log = d.log();
    assert!(
        !log.contains("panicked"),
        "a thread of iommud panicked:\n{log}"
    );
    // Still fully working.
    let iova = healthy.map(buf.phys, 4096, Dir::Bidirectional).unwrap();
    device_round_trip(&dev, B, iova, &buf, 0, &[0xa5; 32]);
    healthy.unmap(iova, 4096).unwrap();
}
