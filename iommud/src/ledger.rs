//! A domain's ledger: what a restarted iommud needs to adopt the domain of a
//! client whose iommud died (docs/ARCHITECTURE.md, "Stop, crash and
//! restart").
//!
//! The ledger is memory iommud alone writes, in a file of the state
//! directory that outlives the process like the tables do. It is kept up to
//! date as the domain changes (a few stores per change, under the domain's
//! lock), so whatever instant iommud dies at, it describes the domain:
//! who owns it and how to prove it (the reattach token), its domain id and
//! page-table root, the files of its arena and pools, and, for each IOVA page
//! of the magazine range, whether an allocation starts there and which:
//! a delegated magazine IOVA of a size class, or an allocated map.
//!
//! Layout (little-endian u64 words from the start):
//!
//! | word | field |
//! |---|---|
//! | 0 | magic `IOMDLEDG` |
//! | 1 | version |
//! | 2 | sid \| did << 16 \| strategy << 32 \| flush << 40 \| trust << 48 |
//! | 3 | owner uid \| gid << 32 |
//! | 4, 5 | reattach token (low, high) |
//! | 6 | epoch: never below any epoch the client was shown |
//! | 7 | reserved (0) |
//! | 8 | page-table root the context entry names |
//! | 9 | 1 while the domain is attached (cleared first at teardown) |
//! | 10 | regions recorded |
//! | 11 | rings (0: none) |
//! | 12 | 1 if region 0 is the arena |
//! | 16..22, 22..28, 28..34 | file names of the published page, the client page, the rings |
//!
//! From byte [`REGIONS_AT`]: one record of [`REGION_WORDS`] words per region
//! (physical address, length, the `static` strategy's IOVA of it or 0, file
//! name in 48 bytes). Record 0 is the arena, if the domain has one.
//! From byte [`PAGES_AT`]: one u32 per IOVA page of the magazine range:
//! 0, or [`KIND_DELEGATED`] | class, or [`KIND_MAPPED`] | pages allocated, or
//! [`KIND_LIVE`] | pages mapped (a validated magazine's ring mapping).
//!
//! iommud writes the ledger through its own mapping of the file: a page entry
//! is one 32-bit store, so the ring path records its maps at no real cost.

use crate::hw::{HwError, Region};
use crate::policy::Trust;
use iommu_abi::proto::{FlushPolicy, Strategy};
use iommu_abi::shm::Mapping;

/// Bytes of a ledger (one 2 MiB hugepage).
pub const LEDGER_BYTES: u64 = 2 << 20;
const MAGIC: u64 = u64::from_le_bytes(*b"IOMDLEDG");
const VERSION: u64 = 1;
const W_IDS: u64 = 2;
const W_OWNER: u64 = 3;
const W_TOKEN: u64 = 4;
const W_ROOT: u64 = 8;
const W_LIVE: u64 = 9;
const W_NREGIONS: u64 = 10;
const W_EPOCH: u64 = 6;
const W_PUBLISHED: u64 = 16;
const W_CLIENT: u64 = 22;
const W_RINGS_NAME: u64 = 28;
const W_RINGS: u64 = 11;
const W_HAS_ARENA: u64 = 12;
/// Where the region records start.
pub const REGIONS_AT: u64 = 4096;
/// Words per region record.
pub const REGION_WORDS: u64 = 9;
const NAME_BYTES: usize = 48;
/// Where the page array starts.
pub const PAGES_AT: u64 = 64 << 10;
/// Region records that fit before the page array.
pub const MAX_REGIONS: u64 = (PAGES_AT - REGIONS_AT) / (REGION_WORDS * 8);
/// A page entry's kind: a delegated magazine IOVA (low bits: size class).
pub const KIND_DELEGATED: u32 = 1 << 28;
/// A page entry's kind: an allocated map (low bits: pages allocated).
pub const KIND_MAPPED: u32 = 2 << 28;
/// A page entry's kind: a live ring mapping of a validated magazine (low
/// bits: its pages).
pub const KIND_LIVE: u32 = 3 << 28;
const KIND_MASK: u32 = 0xf << 28;

/// The identity of a domain, as recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Source id.
    pub sid: u16,
    /// Domain id.
    pub did: u16,
    /// Strategy.
    pub strategy: Strategy,
    /// Flush policy.
    pub flush: FlushPolicy,
    /// Trust.
    pub trust: Trust,
    /// Owner uid and gid.
    pub owner: (u32, u32),
    /// The reattach token.
    pub token: u128,
}

/// A region as recorded: physical address, length, file name (if any).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionRecord {
    /// Physical address.
    pub phys: u64,
    /// Bytes.
    pub len: u64,
    /// Where the `static` strategy mapped it whole (0: not mapped).
    pub iova: u64,
    /// File name in the state directory.
    pub name: Option<String>,
}

/// What an allocation starting at an IOVA page is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageEntry {
    /// A magazine IOVA delegated to the client, of a size class.
    Delegated(usize),
    /// A map iommud made, with this many pages allocated.
    Mapped(u64),
    /// A live ring mapping of this many pages (validated magazine).
    Live(u64),
}

/// A whole ledger read back (by the next iommud).
#[derive(Clone, Debug)]
pub struct Image {
    /// Who and what.
    pub header: Header,
    /// The page-table root the unit's context entry names.
    pub root: u64,
    /// The highest epoch recorded.
    pub epoch: u64,
    /// The shared pages' file names (published, client).
    pub shared: (Option<String>, Option<String>),
    /// The rings' file name and count, if the client set rings up.
    pub rings: Option<(String, u64)>,
    /// Region 0 is the arena if `has_arena`; then the pools in allocation order.
    pub regions: Vec<RegionRecord>,
    /// Whether the domain has an arena (region 0).
    pub has_arena: bool,
    /// Allocations by IOVA (of the magazine range starting at `base`).
    pub pages: Vec<(u64, PageEntry)>,
}

/// A live ledger.
#[derive(Debug)]
pub struct Ledger {
    /// Its memory.
    pub region: Region,
    map: Mapping,
}

fn ids(h: &Header) -> u64 {
    u64::from(h.sid)
        | u64::from(h.did) << 16
        | (h.strategy as u64) << 32
        | (h.flush as u64) << 40
        | (h.trust as u64) << 48
}

fn map(region: &Region) -> Result<Mapping, HwError> {
    use std::os::fd::AsFd;
    let len = usize::try_from(region.len).map_err(|_| HwError::NoMemory("ledger size"))?;
    Mapping::new(region.fd.as_fd(), region.fd_offset, len).map_err(|err| HwError::Os {
        what: "mapping a ledger",
        err,
    })
}

impl Ledger {
    fn w(&self, word: u64) -> Option<u64> {
        self.map.read_u64(usize::try_from(word * 8).ok()?)
    }

    fn set(&self, word: u64, v: u64) -> Result<(), HwError> {
        usize::try_from(word * 8)
            .ok()
            .and_then(|o| self.map.write_u64(o, v))
            .ok_or(HwError::NoMemory("ledger word out of range"))
    }

    /// Maps a ledger's memory (fresh or a previous iommud's).
    pub fn open(region: Region) -> Result<Ledger, HwError> {
        let map = map(&region)?;
        Ok(Ledger { region, map })
    }

    /// Writes a fresh ledger's header (the page array of new memory is zero).
    pub fn init(region: Region, h: &Header, root: u64) -> Result<Ledger, HwError> {
        let l = Ledger::open(region)?;
        l.write_header(h, root)?;
        Ok(l)
    }

    /// (Re)writes the header: identity, root, live. Magic last, so a
    /// half-written header is never taken for a ledger.
    pub fn write_header(&self, h: &Header, root: u64) -> Result<(), HwError> {
        self.set(1, VERSION)?;
        self.set(W_IDS, ids(h))?;
        self.set(W_OWNER, u64::from(h.owner.0) | u64::from(h.owner.1) << 32)?;
        self.set(W_TOKEN, h.token as u64)?;
        self.set(W_TOKEN + 1, (h.token >> 64) as u64)?;
        self.set(W_ROOT, root)?;
        self.set(W_LIVE, 1)?;
        self.set(0, MAGIC)
    }

    /// Records the strategy and flush policy (a switch of an idle domain).
    pub fn set_policy(&self, strategy: Strategy, flush: FlushPolicy) {
        if let Some(w) = self.w(W_IDS) {
            let w = (w & !(0xffff << 32)) | (strategy as u64) << 32 | (flush as u64) << 40;
            let _ = self.set(W_IDS, w);
        }
    }

    /// Records an epoch before the client may see it.
    pub fn set_epoch(&self, epoch: u64) {
        let _ = self.set(W_EPOCH, epoch);
    }

    /// Records the shared pages' file names.
    pub fn set_shared(&self, published: Option<&str>, client: Option<&str>) -> Result<(), HwError> {
        self.write_name(W_PUBLISHED, published)?;
        self.write_name(W_CLIENT, client)
    }

    /// Records the rings' file and count.
    pub fn set_rings(&self, name: Option<&str>, count: u64) -> Result<(), HwError> {
        self.write_name(W_RINGS_NAME, name)?;
        self.set(W_RINGS, count)
    }

    fn write_name(&self, word: u64, name: Option<&str>) -> Result<(), HwError> {
        let mut bytes = [0u8; NAME_BYTES];
        if let Some(s) = name {
            let b = s.as_bytes();
            if b.len() >= NAME_BYTES {
                return Err(HwError::NoMemory("ledger: file name too long"));
            }
            bytes[..b.len()].copy_from_slice(b);
        }
        for (k, c) in bytes.chunks(8).enumerate() {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.set(word + k as u64, u64::from_le_bytes(w))?;
        }
        Ok(())
    }

    fn read_name(&self, word: u64) -> Option<Option<String>> {
        let mut name = Vec::new();
        for j in 0..(NAME_BYTES / 8) as u64 {
            name.extend_from_slice(&self.w(word + j)?.to_le_bytes());
        }
        let end = name.iter().position(|&c| c == 0).unwrap_or(name.len());
        Some(match end {
            0 => None,
            _ => Some(String::from_utf8(name[..end].to_vec()).ok()?),
        })
    }

    /// Says that region 0 is the arena.
    pub fn set_has_arena(&self) -> Result<(), HwError> {
        self.set(W_HAS_ARENA, 1)
    }

    /// Marks the domain gone (first thing at teardown): never adopted again.
    pub fn retire(&self) {
        let _ = self.set(W_LIVE, 0);
    }

    /// Records a region: the arena first (then [`Ledger::set_has_arena`]),
    /// then each pool with its `static` IOVA (0: none).
    pub fn add_region(&self, r: &Region, iova: u64, name: Option<&str>) -> Result<(), HwError> {
        let n = self.w(W_NREGIONS).ok_or(HwError::NoMemory("ledger"))?;
        if n >= MAX_REGIONS {
            return Err(HwError::NoMemory("ledger: too many regions"));
        }
        let rec = REGIONS_AT / 8 + n * REGION_WORDS;
        self.set(rec, r.phys)?;
        self.set(rec + 1, r.len)?;
        self.set(rec + 2, iova)?;
        self.write_name(rec + 3, name)?;
        self.set(W_NREGIONS, n + 1)
    }

    /// Sets the page entry of the allocation starting at IOVA page `page`
    /// (an index into the magazine range); `None` clears it. One 32-bit
    /// store: writers of different pages never disturb each other.
    pub fn set_page(&self, page: u64, e: Option<PageEntry>) {
        let v = match e {
            None => 0,
            Some(PageEntry::Delegated(c)) => KIND_DELEGATED | (c as u32 & !KIND_MASK),
            Some(PageEntry::Mapped(p)) => KIND_MAPPED | (p.min(u64::from(!KIND_MASK)) as u32),
            Some(PageEntry::Live(p)) => KIND_LIVE | (p.min(u64::from(!KIND_MASK)) as u32),
        };
        if let Some(off) = page
            .checked_mul(4)
            .and_then(|b| b.checked_add(PAGES_AT))
            .and_then(|b| usize::try_from(b).ok())
        {
            let _ = self.map.write_u32(off, v);
        }
    }

    /// Reads a ledger back; `None` if it is not one, or not a live domain.
    pub fn read(&self, span_pages: u64) -> Option<Image> {
        if self.w(0)? != MAGIC || self.w(1)? != VERSION || self.w(W_LIVE)? != 1 {
            return None;
        }
        let i = self.w(W_IDS)?;
        let owner = self.w(W_OWNER)?;
        let header = Header {
            sid: i as u16,
            did: (i >> 16) as u16,
            strategy: Strategy::from_u64((i >> 32) & 0xff)?,
            flush: FlushPolicy::from_u64((i >> 40) & 0xff)?,
            trust: Trust::from_u64((i >> 48) & 0xff)?,
            owner: (owner as u32, (owner >> 32) as u32),
            token: u128::from(self.w(W_TOKEN)?) | u128::from(self.w(W_TOKEN + 1)?) << 64,
        };
        let n = self.w(W_NREGIONS)?;
        if n > MAX_REGIONS {
            return None;
        }
        let mut regions = Vec::new();
        for k in 0..n {
            let rec = REGIONS_AT / 8 + k * REGION_WORDS;
            regions.push(RegionRecord {
                phys: self.w(rec)?,
                len: self.w(rec + 1)?,
                iova: self.w(rec + 2)?,
                name: self.read_name(rec + 3)?,
            });
        }
        let mut pages = Vec::new();
        let entries = span_pages.min(self.region.len.saturating_sub(PAGES_AT) / 4);
        for page in 0..entries {
            let e = self
                .map
                .read_u32(usize::try_from(PAGES_AT + 4 * page).ok()?)?;
            let entry = match e & KIND_MASK {
                0 => continue,
                KIND_DELEGATED => PageEntry::Delegated((e & !KIND_MASK) as usize),
                KIND_MAPPED => PageEntry::Mapped(u64::from(e & !KIND_MASK)),
                KIND_LIVE => PageEntry::Live(u64::from(e & !KIND_MASK)),
                _ => return None,
            };
            pages.push((page, entry));
        }
        let rings = match (self.read_name(W_RINGS_NAME)?, self.w(W_RINGS)?) {
            (Some(name), n) if n > 0 => Some((name, n)),
            _ => None,
        };
        Some(Image {
            header,
            root: self.w(W_ROOT)?,
            epoch: self.w(W_EPOCH)?,
            shared: (self.read_name(W_PUBLISHED)?, self.read_name(W_CLIENT)?),
            rings,
            regions,
            has_arena: self.w(W_HAS_ARENA)? == 1,
            pages,
        })
    }
}

#[cfg(all(test, feature = "sim"))]
mod tests {
    use super::*;
    use crate::hw::PhysMem;
    use crate::platform::sim::SimPlatform;
    use vtd::sim::SimConfig;

    #[test]
    fn a_ledger_reads_back_what_was_written_and_neighbouring_pages_stay_apart() {
        let p = SimPlatform::new(SimConfig {
            mem_bytes: 16 << 20,
            ..Default::default()
        })
        .unwrap();
        let r = p.alloc_ledger(LEDGER_BYTES).unwrap();
        let h = Header {
            sid: 0x0110,
            did: 7,
            strategy: Strategy::Magazine,
            flush: FlushPolicy::Deferred,
            trust: Trust::Delegated,
            owner: (1000, 100),
            token: 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210,
        };
        let l = Ledger::init(r.clone(), &h, 0x5000).unwrap();
        l.set_epoch(42);
        l.set_shared(Some("iommud-9-1-published"), Some("iommud-9-2-client"))
            .unwrap();
        let pool = p.alloc_region(8192, 4096).unwrap();
        l.add_region(&pool, 0x4000_0000, Some("iommud-9-3-region"))
            .unwrap();
        // Pages 4 and 5 share a word: each half keeps its own entry.
        l.set_page(4, Some(PageEntry::Delegated(3)));
        l.set_page(5, Some(PageEntry::Mapped(64)));
        l.set_page(9, Some(PageEntry::Delegated(0)));
        l.set_page(9, None);
        let i = Ledger::open((r).clone()).unwrap().read(1 << 18).unwrap();
        assert_eq!(i.header, h);
        assert_eq!((i.root, i.epoch), (0x5000, 42));
        assert_eq!(
            i.shared,
            (
                Some("iommud-9-1-published".into()),
                Some("iommud-9-2-client".into())
            )
        );
        assert_eq!(
            i.regions,
            vec![RegionRecord {
                phys: pool.phys,
                len: pool.len,
                iova: 0x4000_0000,
                name: Some("iommud-9-3-region".into())
            }]
        );
        assert_eq!(
            i.pages,
            vec![(4, PageEntry::Delegated(3)), (5, PageEntry::Mapped(64))]
        );
        // The raw word holds both halves as documented (page 4 low, page 5 high).
        let w = p.read_u64(r.phys + PAGES_AT + 16).unwrap();
        assert_eq!(
            w,
            u64::from(KIND_DELEGATED | 3) | u64::from(KIND_MAPPED | 64) << 32
        );
        // A name that does not fit is refused; a retired ledger reads as none.
        assert!(l.set_shared(Some(&"x".repeat(48)), None).is_err());
        l.retire();
        assert!(Ledger::open((r).clone()).unwrap().read(1 << 18).is_none());
    }
}
