//! Unit tests of the client without a daemon: a fake iommud behind the
//! [`Transport`] trait answers the protocol in process, with real memfds for
//! the pages it shares, so the tests read what the client wrote where a
//! device and iommud would (hand-encoded entries, tags, requests).

use super::*;
use crate::magazine::MAG_SIZE;
use crate::proto::Op;
use crate::shm::memfd;
use std::os::fd::AsFd;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::{Arc, Mutex};

const ARENA: usize = 2 << 20;
const POOL_PHYS: u64 = 0x4000_0000;

/// What the fake saw and shares.
struct Seen {
    requests: Vec<Request>,
    published: Mapping,
    client: Mapping,
}

struct Fake {
    arena: bool,
    seen: Arc<Mutex<Seen>>,
    published_fd: OwnedFd,
    client_fd: OwnedFd,
    arena_fd: OwnedFd,
    next_iova: u64,
}

fn dup(fd: &OwnedFd) -> Share {
    Share::file(fd.as_fd().try_clone_to_owned().unwrap())
}

impl Fake {
    fn new(strategy: Strategy) -> (Fake, Arc<Mutex<Seen>>) {
        let published_fd = memfd("p", PUBLISHED_LEN).unwrap();
        let client_fd = memfd("c", CLIENT_LEN).unwrap();
        let published = Mapping::new(published_fd.as_fd(), 0, PUBLISHED_LEN).unwrap();
        let client = Mapping::new(client_fd.as_fd(), 0, CLIENT_LEN).unwrap();
        // SAFETY: a fresh page-aligned mapping; EpochPage is atomics only.
        let p: &EpochPage = unsafe { crate::shared::view(published.as_ptr()) };
        p.init();
        p.strategy.store(strategy as u32, SeqCst);
        p.flush.store(FlushPolicy::PerCore as u32, SeqCst);
        let seen = Arc::new(Mutex::new(Seen {
            requests: Vec::new(),
            published,
            client,
        }));
        let fake = Fake {
            arena: strategy == Strategy::Magazine,
            seen: seen.clone(),
            published_fd,
            client_fd,
            arena_fd: memfd("a", ARENA).unwrap(),
            next_iova: MAGAZINE_IOVA_BASE,
        };
        (fake, seen)
    }

    fn answer(&mut self, req: &Request) -> (std::result::Result<[u64; 5], ErrorCode>, Vec<Share>) {
        match req {
            Request::Hello { .. } => (Ok([u64::from(VERSION), 0, 0, 0, 0]), vec![]),
            Request::Attach { .. } => {
                let mut shares = vec![dup(&self.published_fd), dup(&self.client_fd)];
                let arena = self.arena.then(|| {
                    shares.push(dup(&self.arena_fd));
                    (0x10_0000, 0, ARENA as u64)
                });
                let r = AttachReply {
                    did: 1,
                    flags: FLAG_TRANSLATING | FLAG_COHERENT,
                    arena,
                };
                (Ok(r.encode()), shares)
            }
            Request::AllocPool { bytes } => {
                let fd = memfd("pool", *bytes as usize).unwrap();
                let r = PoolReply {
                    phys: POOL_PHYS,
                    fd_offset: 0,
                    len: *bytes,
                    region: 0,
                    iova: 0,
                };
                (Ok(r.encode()), vec![Share::file(fd)])
            }
            Request::Exchange { pages, want, .. } => {
                let seen = self.seen.lock().unwrap();
                for k in 0..*want as usize {
                    seen.client
                        .write_u64(EXCHANGE_OFFSET + 8 * k, self.next_iova)
                        .unwrap();
                    self.next_iova += pages * PAGE;
                }
                (Ok([*want, 0, 0, 0, 0]), vec![])
            }
            Request::Map { phys, .. } => (Ok([phys + 0x1000_0000, 0, 0, 0, 0]), vec![]),
            Request::FlushSync { .. } => (Ok([0; 5]), vec![]),
            _ => (Ok([0; 5]), vec![]),
        }
    }
}

impl Transport for Fake {
    fn call(&mut self, frame: &[u8], reply: &mut [u8]) -> std::io::Result<(usize, Vec<Share>)> {
        let (seq, req) = Request::decode(frame).expect("the client sends valid requests");
        let (result, shares) = self.answer(&req);
        self.seen.lock().unwrap().requests.push(req.clone());
        let bytes = Reply {
            op: req.op(),
            seq,
            result,
            payload: Vec::new(),
        }
        .encode();
        reply[..bytes.len()].copy_from_slice(&bytes);
        Ok((bytes.len(), shares))
    }

    fn recv(&mut self, _reply: &mut [u8]) -> std::io::Result<(usize, Vec<Share>)> {
        Err(std::io::ErrorKind::UnexpectedEof.into())
    }

    fn post(&mut self, frame: &[u8]) -> std::io::Result<()> {
        let (_, req) = Request::decode(frame).expect("valid one-way request");
        self.seen.lock().unwrap().requests.push(req);
        Ok(())
    }
}

fn domain(strategy: Strategy) -> (DmaDomain, Arc<Mutex<Seen>>, Mapping) {
    let (fake, seen) = Fake::new(strategy);
    let arena = Mapping::new(fake.arena_fd.as_fd(), 0, ARENA).unwrap();
    let d = DmaDomain::over(Box::new(fake), 0x08, strategy, FlushPolicy::PerCore).unwrap();
    (d, seen, arena)
}

#[test]
fn a_magazine_map_writes_the_hand_encoded_leaf_and_unmap_clears_it() {
    let (d, seen, arena) = domain(Strategy::Magazine);
    let b = d.alloc(4096).unwrap();
    assert_eq!(b.phys, POOL_PHYS);
    let iova = d.map(b.phys + 0x20, 64, Dir::FromDevice).unwrap();
    assert_eq!(iova % PAGE, 0x20);
    let base = iova & !(PAGE - 1);
    let at = ((base - MAGAZINE_IOVA_BASE) >> 12) as usize * 8;
    // VT-d §9.8 by hand: address 0x4000_0000, W (bit 1) only for FromDevice.
    assert_eq!(arena.read_u64(at), Some(0x4000_0000 | 0b10));
    // The exchange that filled the magazine is the only request after attach
    // and the pool: no IPC per map.
    let ops: Vec<Op> = seen
        .lock()
        .unwrap()
        .requests
        .iter()
        .map(Request::op)
        .collect();
    assert_eq!(
        ops,
        [Op::Hello, Op::Attach, Op::AllocPool, Op::Exchange],
        "requests so far"
    );
    d.unmap(iova, 64).unwrap();
    assert_eq!(arena.read_u64(at), Some(0), "cleared");
    assert_eq!(d.client().sum(|c| &c.maps), 1);
    assert_eq!(d.client().sum(|c| &c.unmaps), 1);
    assert_eq!(seen.lock().unwrap().requests.len(), 4, "still no IPC");
}

#[test]
fn an_unmapped_iova_is_not_reused_before_its_epoch_completes() {
    let (d, seen, _arena) = domain(Strategy::Magazine);
    let b = d.alloc(4096).unwrap();
    let mut first = Vec::new();
    // A whole magazine and more: the unmapped IOVAs seal into a dirty batch.
    for _ in 0..(MAG_SIZE + 1) {
        let iova = d.map(b.phys, 64, Dir::ToDevice).unwrap();
        d.unmap(iova, 64).unwrap();
        first.push(iova);
    }
    // Nothing completed yet (completed = 0, tags are 1): every later map must
    // be a fresh IOVA, never one of the dirty ones.
    let later: Vec<u64> = (0..MAG_SIZE)
        .map(|_| d.map(b.phys, 64, Dir::ToDevice).unwrap())
        .collect();
    let dirty: std::collections::BTreeSet<u64> = first[..MAG_SIZE].iter().copied().collect();
    assert!(
        later.iter().all(|v| !dirty.contains(v)),
        "reused before completion"
    );
    // The client asked for the flush in its client page.
    assert!(d.client().wanted.load(SeqCst) >= 1);
    // iommud completes epoch 1 (published): the batch may come back now,
    // without any request.
    {
        let s = seen.lock().unwrap();
        // SAFETY: the fake's own writable mapping of the published page.
        let p: &EpochPage = unsafe { crate::shared::view(s.published.as_ptr()) };
        p.epoch.store(2, SeqCst);
        p.completed.store(1, SeqCst);
    }
    for v in later {
        d.unmap(v, 64).unwrap();
    }
    let again: Vec<u64> = (0..2 * MAG_SIZE)
        .map(|_| d.map(b.phys, 64, Dir::ToDevice).unwrap())
        .collect();
    assert!(
        again.iter().any(|v| dirty.contains(v)),
        "a completed batch is recycled"
    );
}

#[test]
fn validated_maps_are_requests_and_a_dead_domain_refuses_to_map() {
    let (d, seen, _arena) = domain(Strategy::Global);
    let b = d.alloc(8192).unwrap();
    let iova = d.map(b.phys + 4096, 100, Dir::Bidirectional).unwrap();
    assert_eq!(
        iova,
        b.phys + 4096 + 0x1000_0000,
        "the IOVA iommud answered"
    );
    let last = seen.lock().unwrap().requests.last().cloned();
    assert_eq!(
        last,
        Some(Request::Map {
            phys: b.phys + 4096,
            len: 100,
            dir: Dir::Bidirectional,
            va: 0
        })
    );
    // iommud marks the domain dead in the published page: no more maps.
    let s = seen.lock().unwrap();
    // SAFETY: the fake's own writable mapping of the published page.
    let p: &EpochPage = unsafe { crate::shared::view(s.published.as_ptr()) };
    p.dead.store(1, SeqCst);
    drop(s);
    assert!(matches!(d.map(b.phys, 64, Dir::ToDevice), Err(Error::Dead)));
}

#[test]
fn attach_replies_that_do_not_fit_are_refused() {
    struct Bad(Fake, bool);
    impl Transport for Bad {
        fn call(&mut self, frame: &[u8], reply: &mut [u8]) -> std::io::Result<(usize, Vec<Share>)> {
            let (n, mut shares) = self.0.call(frame, reply)?;
            if matches!(Request::decode(frame), Ok((_, Request::Attach { .. }))) {
                if self.1 {
                    shares.clear(); // no shared pages at all
                } else {
                    shares.truncate(2); // an arena announced but not sent
                }
            }
            Ok((n, shares))
        }
        fn recv(&mut self, r: &mut [u8]) -> std::io::Result<(usize, Vec<Share>)> {
            self.0.recv(r)
        }
        fn post(&mut self, f: &[u8]) -> std::io::Result<()> {
            self.0.post(f)
        }
    }
    for no_pages in [true, false] {
        let (fake, _) = Fake::new(Strategy::Magazine);
        let r = DmaDomain::over(
            Box::new(Bad(fake, no_pages)),
            0x08,
            Strategy::Magazine,
            FlushPolicy::PerCore,
        );
        assert!(matches!(r, Err(Error::Invalid(_))), "no_pages={no_pages}");
    }
}
