//! A validated magazine domain's rings fed arbitrary memory: the input is a
//! series of records (one selector byte, then words) that write submission
//! entries, the submission tail and the completion head exactly as a hostile
//! client could (the lazy and keep hints included), each followed by passes
//! of iommud's ring service (a held lazy pass released by the later ones).
//! The input's first byte picks the domain: `strict` (lazy passes held) or
//! `percore` (remaps kept). Nothing may panic, and every map iommud completes
//! must point into the client's registered pool (read back from the domain's
//! page table through the unit).
#![no_main]

use iommu_abi::ring::{ring_at, Cqe, MapArgs, SqOp, CQE_WORDS, RING_ENTRIES, SQE_WORDS};
use iommud::domain::Domain;
use iommud::platform::sim::{SimMmio, SimPlatform};
use iommud::policy::Trust;
use iommud::session::State;
use iommud::unit::{Iommu, UnitConfig};
use libdma::proto::{FlushPolicy, Strategy};
use libfuzzer_sys::fuzz_target;
use std::os::fd::AsFd;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::{Arc, Mutex, OnceLock};

struct World {
    dom: Arc<Domain>,
    plat: Arc<SimPlatform>,
    sid: u16,
    rings: libdma::shm::Mapping,
    pool: (u64, u64),
    /// The client's view of the completion ring (what it consumed).
    head: Mutex<u32>,
}

const POOL: u64 = 64 << 10;

fn world(percore: bool) -> &'static World {
    static STRICT: OnceLock<World> = OnceLock::new();
    static PERCORE: OnceLock<World> = OnceLock::new();
    let (w, sid, flush) = if percore {
        (&PERCORE, 0x18, FlushPolicy::PerCore)
    } else {
        (&STRICT, 0x10, FlushPolicy::Strict)
    };
    w.get_or_init(|| {
        iommud::unit::log::set_quiet(true);
        let plat = Arc::new(
            SimPlatform::new(vtd::sim::SimConfig {
                mem_bytes: 64 << 20,
                ..Default::default()
            })
            .expect("sim platform"),
        );
        let mmio = Box::new(SimMmio(plat.machine().clone()));
        let unit = Arc::new(Iommu::init(mmio, plat.clone(), &UnitConfig::default()).expect("unit"));
        let st = State::new(unit.clone(), "sim", true);
        let dom = Domain::new(
            unit,
            sid,
            Strategy::Magazine,
            flush,
            Trust::Validated,
            true,
            st.accounts.of(1000),
        )
        .expect("domain");
        let (region, _, _) = dom.alloc_pool(POOL).expect("pool");
        let rings = dom.setup_rings(1).expect("rings");
        let map = libdma::shm::Mapping::new(rings.share().as_fd(), 0, iommu_abi::ring::RING_BYTES)
            .expect("ring mapping");
        World {
            dom,
            plat,
            sid,
            rings: map,
            pool: (region.phys, region.len),
            head: Mutex::new(0),
        }
    })
}

fn word(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    let n = b.len().min(8);
    a[..n].copy_from_slice(&b[..n]);
    u64::from_le_bytes(a)
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, data)) = data.split_first() else {
        return;
    };
    let w = world(pick & 1 == 1);
    // SAFETY: the mapping covers one ring and lives as long as the world.
    let ring = unsafe { ring_at(w.rings.as_ptr(), 0) };
    let mut rest = data;
    while let Some((&sel, tail)) = rest.split_first() {
        let take = (usize::from(sel & 0x3f) + 1).min(tail.len());
        let (rec, next) = tail.split_at(take);
        rest = next;
        match sel >> 6 {
            // Raw entry words at the tail, then publish one more entry.
            0 => {
                let t = ring.sq_tail.0.load(Relaxed);
                let slot = &ring.sq[(t % RING_ENTRIES) as usize];
                for x in 0..SQE_WORDS {
                    slot[x].store(word(rec.get(8 * x..).unwrap_or(&[])), Relaxed);
                }
                ring.sq_tail.0.store(t.wrapping_add(1), Release);
            }
            // A well-formed map, unmap or remap around the pool, fuzzed
            // offsets (remaps' old IOVAs near the first magazine's, so that
            // some are live and the keep hint has something to keep).
            1 => {
                let t = ring.sq_tail.0.load(Relaxed);
                let v = word(rec);
                let map = MapArgs {
                    region: (v >> 2 & 3) as u32,
                    offset: (v >> 4) % (2 * POOL),
                    len: (v >> 24) % (40 << 12),
                    dir: if v >> 61 & 1 == 1 {
                        libdma::Dir::ToDevice
                    } else {
                        libdma::Dir::Bidirectional
                    },
                    va: 0,
                };
                let op = match v & 3 {
                    0 => SqOp::Map(map),
                    1 => SqOp::Unmap {
                        iova: (1 << 30) + ((v >> 2) % (1 << 24)),
                        len: (v >> 40) % (40 << 12),
                    },
                    _ => SqOp::Remap {
                        old: (1 << 30) + ((v >> 8) % 64) * 4096 + (v >> 14 & 0xfff),
                        old_len: (v >> 40) % (40 << 12),
                        map,
                    },
                };
                // Bit 63: the lazy hint (a strict pass of lazy entries is
                // held); bit 62: the keep hint (a percore remap may keep).
                let hints = (v >> 63) * iommu_abi::ring::SQE_LAZY
                    | (v >> 62 & 1) * iommu_abi::ring::SQE_KEEP;
                let e = iommu_abi::ring::Sqe { op, user: v }.encode_hinted(hints);
                let slot = &ring.sq[(t % RING_ENTRIES) as usize];
                for (x, val) in e.iter().enumerate() {
                    slot[x].store(*val, Relaxed);
                }
                ring.sq_tail.0.store(t.wrapping_add(1), Release);
            }
            // Any value for the tail or the completion head.
            2 => ring.sq_tail.0.store(word(rec) as u32, Release),
            _ => ring.cq_head.0.store(word(rec) as u32, Release),
        }
        // The first pass may hold a lazy pass (no other work yet); the next
        // ones come after "other work", which releases it.
        let hold = std::time::Duration::from_secs(1);
        w.dom.serve_rings(&iommud::domain::Passer::SOLE, None, hold);
        for _ in 0..3 {
            w.dom.serve_rings(
                &iommud::domain::Passer::SOLE,
                Some(std::time::Instant::now()),
                hold,
            );
        }
        // Consume what iommud completed, checking every successful map.
        let mut head = w.head.lock().unwrap_or_else(|p| p.into_inner());
        let tail = ring.cq_tail.0.load(Acquire);
        let mut n = 0;
        while *head != tail && n < RING_ENTRIES {
            let slot = &ring.cq[(*head % RING_ENTRIES) as usize];
            let c: [u64; CQE_WORDS] = std::array::from_fn(|x| slot[x].load(Relaxed));
            // A map said to succeed (an unmap completes with 0): its first
            // page translates into the pool, unless a later entry of the same
            // pass already unmapped it.
            if let Ok(iova) = Cqe::decode(&c).result {
                if iova != 0 {
                    if let Ok(t) = w.plat.machine().translate_uncached(w.sid, iova) {
                        assert!(
                            !(t.read || t.write)
                                || (t.phys >= w.pool.0 && t.phys < w.pool.0 + w.pool.1),
                            "iova {iova:#x} -> {:#x} outside the pool",
                            t.phys
                        );
                    }
                }
            }
            *head = head.wrapping_add(1);
            n += 1;
        }
        ring.cq_head.0.store(*head, Release);
    }
});
