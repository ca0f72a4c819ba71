//! A protection domain: one PCI function's page table, IOVA allocator,
//! magazine depot, invalidation epochs and DMA pools.
//!
//! Everything mutable sits behind one mutex, [`Domain::lock`]: that is the
//! "globally locked allocator" of the research, and every acquisition is
//! counted, so the benchmarks can show how rarely the magazine strategy
//! touches it.
//!
//! **Deferred frees.** An IOVA unmapped by iommud (global strategy), a page
//! whose refcount fell to zero (identity, va) and a page-table page detached
//! by reclamation are parked, tagged with the epoch read after the clear, and
//! freed (or, for a page, forgotten) only once an invalidation that started
//! at or after that epoch has completed (see `iommu_abi::shared` for the epoch
//! protocol, which the client follows for the IOVAs it unmaps itself).
//!
//! **Strategies and trust.** `magazine` runs in *delegated* trust: the
//! client writes leaf entries into the pinned arena tables of the IOVAs it
//! holds. `global`, `identity` and `va` run in *validated* trust: every map
//! is a request iommud checks (the frames must lie in the client's pools)
//! before it writes the entries, so even a compromised driver cannot point
//! its device elsewhere. Identity and va need no allocator, so nothing is
//! gained by delegating IOVA choice; what would remain to delegate is the
//! per-page refcount, which must be trusted to never drop an entry another
//! buffer still uses — that is exactly what validation protects, so both
//! stay server-side (one IPC per map and unmap, which the benchmarks show).
//!
//! **Refcounted pages (identity, va).** The IOVA of a buffer is fixed (its
//! physical address, or the client's virtual address), so two buffers in one
//! page, two directions, or repeated maps of one buffer share one entry. The
//! entry carries the union of the rights asked for since it was created
//! (never narrowed while in use; widening rewrites it and invalidates the
//! page at once) and is cleared when its count falls to zero, then
//! invalidated per the flush policy. A page mapped again before that
//! invalidation completed is *dirty*: it may come back without a flush only
//! if the new entry equals the stale one (same frame, same rights), so no
//! cached translation ever differs from the table; otherwise iommud flushes
//! first. For va, an IOVA page already naming another frame is refused.
//!
//! **Flush policies** (for every strategy). `strict`: every unmap is
//! invalidated before it returns. `percore`: unmaps are batched and tagged
//! with epochs (client batches of `MAG_SIZE` per CPU; server-side batches of
//! [`SERVER_BATCH`]). `deferred`: one queue per domain, flushed when it
//! holds [`FLUSH_QUEUE_LEN`] unmaps or [`FLUSH_TIMEOUT_NS`] after its oldest.
//! The timer (run by [`Domain::tick`]) bounds every policy's stale window:
//! no unmap waits more than 10 ms (+ one tick) for its invalidation.

use crate::hw::{HwError, PhysMem, Region, SharedMem};
use crate::pagetable::{PageTable, PtError, PAGE};
use crate::policy::Trust;
use crate::range_alloc::RangeAllocator;
use crate::stats::{self, DomainStats, Text};
use crate::unit::Iommu;
use iommu_abi::classes::{class_pages, size_class, FLUSH_QUEUE_LEN, MAG_SIZE, SIZE_CLASSES};
use iommu_abi::proto::{Dir, ErrorCode, FlushPolicy, Strategy};
use iommu_abi::shared::{
    oldest_unmap_age, take_unmaps, view, ClientPage, CpuCounters, EpochPage, UnmapTotals,
    CLIENT_LEN, EXCHANGE_OFFSET, EXCHANGE_SLOTS, PUBLISHED_LEN,
};
use iommu_abi::Bdf;
use std::collections::{BTreeMap, HashMap};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard};

/// First IOVA handed out (IOVA 0 is never used, so a zeroed descriptor faults).
pub const IOVA_BASE: u64 = iommu_abi::shared::MAGAZINE_IOVA_BASE;
/// Bytes of a magazine domain's leaf-table arena: 512 leaf tables.
pub const ARENA_BYTES: u64 = 2 << 20;
/// IOVA space of a domain: what the arena's leaf tables cover (1 GiB).
pub const IOVA_SPAN: u64 = (ARENA_BYTES / PAGE) * (2 << 20);
/// Server-side unmaps batched before iommud flushes on its own (percore policy).
pub const SERVER_BATCH: usize = MAG_SIZE;
/// Full magazines the depot keeps per size class before trimming to the allocator.
pub const DEPOT_MAX: usize = 16;
/// The deferred policy flushes this long after the oldest unflushed unmap
/// (Linux's flush queue: 10 ms); the epoch timer applies it to every policy.
pub const FLUSH_TIMEOUT_NS: u64 = iommu_abi::classes::FLUSH_QUEUE_TIMEOUT_NS;
/// User virtual addresses (the va strategy's IOVAs) lie below 2^47.
pub const VA_LIMIT: u64 = 1 << 47;
/// Longest map or unmap, in bytes (a quarter of the IOVA space).
pub const MAX_MAP_LEN: u64 = IOVA_SPAN / 4;
/// Flushes a map may trigger before it gives up: a dirty page needs one,
/// after which the page is clean, so a second can only be needed when
/// another map of the same page raced this one.
const MAP_FLUSH_TRIES: usize = 4;

/// Why a domain operation failed, for the reply and the log.
#[derive(Debug, thiserror::Error)]
pub enum DomainError {
    /// Reply code with a human explanation.
    #[error("{1}")]
    Reply(ErrorCode, String),
    /// The hardware failed.
    #[error(transparent)]
    Hw(#[from] HwError),
}

impl DomainError {
    /// The wire error code.
    pub fn code(&self) -> ErrorCode {
        match self {
            DomainError::Reply(c, _) => *c,
            DomainError::Hw(HwError::Timeout { .. }) => ErrorCode::Timeout,
            DomainError::Hw(HwError::NoMemory(_)) => ErrorCode::NoMemory,
            DomainError::Hw(_) => ErrorCode::Hardware,
        }
    }
}

fn reply(c: ErrorCode, msg: impl Into<String>) -> DomainError {
    DomainError::Reply(c, msg.into())
}

impl From<PtError> for DomainError {
    fn from(e: PtError) -> Self {
        match e {
            PtError::Hw(h) => DomainError::Hw(h),
            other => reply(ErrorCode::Invalid, other.to_string()),
        }
    }
}

#[derive(Debug)]
enum Parked {
    Iova {
        iova: u64,
        bytes: u64,
    },
    Table(u64),
    /// A refcounted page (identity, va) whose entry was cleared.
    Page(u64),
}

/// A live page of an identity or va domain.
#[derive(Debug, Clone, Copy)]
struct PageRef {
    phys: u64,
    refs: u64,
    read: bool,
    write: bool,
}

/// A page whose entry was cleared and whose invalidation has not completed.
#[derive(Debug, Clone, Copy)]
struct DirtyPage {
    phys: u64,
    read: bool,
    write: bool,
    tag: u64,
}

/// What a map under the lock decided.
enum MapPlan {
    /// Mapped: the IOVA to return, the page range written, and whether a
    /// present entry's rights were widened (needs an invalidation now).
    Done {
        iova: u64,
        base: u64,
        pages: u64,
        widened: bool,
    },
    /// A stale translation could differ from the new entry: flush, retry.
    FlushFirst,
}

#[derive(Debug, Clone, Copy)]
struct Mapped {
    pages: u64,
    alloc_bytes: u64,
    phys: u64,
}

struct Inner {
    strategy: Strategy,
    flush: FlushPolicy,
    pt: PageTable,
    iova: RangeAllocator,
    depot: [Vec<Vec<u64>>; SIZE_CLASSES],
    arena: Option<Region>,
    leaf_installed: Vec<bool>,
    delegated: HashMap<u64, usize>,
    mapped: BTreeMap<u64, Mapped>,
    pools: Vec<Region>,
    parked: Vec<(u64, Parked)>,
    /// Identity/va: live pages by IOVA page.
    refs: HashMap<u64, PageRef>,
    /// Identity/va: live maps by (IOVA, length) → how many.
    ref_maps: HashMap<(u64, u64), u64>,
    /// Identity/va: cleared pages awaiting their invalidation.
    dirty: HashMap<u64, DirtyPage>,
    /// Server-side unmaps since the last flush (the deferred trigger).
    queued: usize,
    /// Parked table → tag of its latest detach (a revived table can be
    /// detached again; only the latest park may free it).
    table_tag: HashMap<u64, u64>,
}

/// A protection domain.
pub struct Domain {
    /// Source id (bus << 8 | devfn) of the device.
    pub sid: u16,
    /// Domain id in the context entry and invalidations.
    pub did: u16,
    /// How far the driver is trusted (the administrator's policy).
    pub trust: Trust,
    unit: Arc<Iommu>,
    inner: Mutex<Inner>,
    /// The published page (client read-only): copies of `epoch`, `completed`,
    /// the policy and the clock.
    published: SharedMem,
    /// The client page and exchange area (client-writable: hostile input).
    client: SharedMem,
    /// The authoritative epoch (see `iommu_abi::shared`): iommud decides with
    /// these, never with the published copies.
    epoch: AtomicU64,
    /// The authoritative completed epoch.
    completed: AtomicU64,
    /// The highest tag iommud's own unmaps wait for (percore policy).
    server_wanted: AtomicU64,
    /// The unmap record of iommud's own unmaps (stale windows).
    server_unmaps: CpuCounters,
    /// iommud's snapshot of the slots' running unmap totals (stale windows).
    unmaps_seen: Mutex<UnmapTotals>,
    /// Server-side counters.
    pub stats: DomainStats,
    dead: AtomicBool,
}

impl Domain {
    /// Creates the domain of `sid`: page table, context entry, shared page
    /// and (for the magazine strategy) the client-writable leaf-table arena.
    pub fn new(
        unit: Arc<Iommu>,
        sid: u16,
        strategy: Strategy,
        flush: FlushPolicy,
        trust: Trust,
        reclaim: bool,
    ) -> Result<Arc<Domain>, DomainError> {
        let mem = unit.mem().clone();
        let did = unit
            .alloc_did()
            .ok_or_else(|| reply(ErrorCode::NoMemory, "no free domain id"))?;
        let build = || -> Result<(PageTable, Option<Region>, SharedMem, SharedMem), DomainError> {
            let pt = PageTable::new(&*mem, unit.levels, reclaim, unit.coherent())?;
            // Every delegated translating domain gets an arena, so it can
            // switch to the magazine strategy while its client stays attached;
            // a validated domain never has client-writable tables.
            let arena =
                if trust == Trust::Delegated && strategy != Strategy::NoIommu && unit.translating()
                {
                    Some(mem.alloc_region(ARENA_BYTES, ARENA_BYTES)?)
                } else {
                    None
                };
            let published = mem.alloc_shared(PUBLISHED_LEN, false)?;
            let client = mem.alloc_shared(CLIENT_LEN, true)?;
            Ok((pt, arena, published, client))
        };
        let (pt, arena, published, client) = match build() {
            Ok(v) => v,
            Err(e) => {
                unit.free_did(did);
                return Err(e);
            }
        };
        let d = Domain {
            sid,
            did,
            trust,
            unit: unit.clone(),
            inner: Mutex::new(Inner {
                strategy,
                flush,
                pt,
                iova: RangeAllocator::new(IOVA_BASE, IOVA_SPAN),
                depot: Default::default(),
                arena,
                leaf_installed: vec![false; (ARENA_BYTES / PAGE) as usize],
                delegated: HashMap::new(),
                mapped: BTreeMap::new(),
                pools: Vec::new(),
                parked: Vec::new(),
                refs: HashMap::new(),
                ref_maps: HashMap::new(),
                dirty: HashMap::new(),
                queued: 0,
                table_tag: HashMap::new(),
            }),
            published,
            client,
            epoch: AtomicU64::new(1),
            completed: AtomicU64::new(0),
            server_wanted: AtomicU64::new(0),
            server_unmaps: CpuCounters::default(),
            unmaps_seen: Mutex::default(),
            stats: DomainStats::default(),
            dead: AtomicBool::new(false),
        };
        d.page().init();
        d.publish(strategy, flush);
        if strategy != Strategy::NoIommu && unit.translating() {
            let root = d
                .inner
                .lock()
                .map_err(|_| reply(ErrorCode::Hardware, "poisoned"))?
                .pt
                .root();
            if let Err(e) = unit.set_context(sid, did, root) {
                d.teardown();
                return Err(e.into());
            }
        }
        Ok(Arc::new(d))
    }

    /// The published page (iommud writes; the client maps it read-only).
    pub fn page(&self) -> &EpochPage {
        // SAFETY: `published` maps PUBLISHED_LEN (≥ an EpochPage) bytes,
        // page-aligned, alive as long as `self`; every field is atomic.
        unsafe { view(self.published.map.as_ptr()) }
    }

    /// The client page: hostile input, read field by field, once per decision.
    pub fn client(&self) -> &ClientPage {
        // SAFETY: `client` maps CLIENT_LEN (≥ a ClientPage) bytes,
        // page-aligned, alive as long as `self`; every field is atomic, so
        // whatever the client writes is a valid value of it.
        unsafe { view(self.client.map.as_ptr()) }
    }

    fn publish(&self, strategy: Strategy, flush: FlushPolicy) {
        self.page().strategy.store(strategy as u32, SeqCst);
        self.page().flush.store(flush as u32, SeqCst);
    }

    /// The current epoch (iommud's own copy).
    pub fn epoch(&self) -> u64 {
        self.epoch.load(SeqCst)
    }

    /// The completed epoch (iommud's own copy).
    pub fn completed(&self) -> u64 {
        self.completed.load(SeqCst)
    }

    /// What to hand the client at attach: the published page's fd (it can
    /// only map it read-only) and the client page's fd.
    pub fn shares(&self) -> (Arc<OwnedFd>, Arc<OwnedFd>) {
        (self.published.fd.clone(), self.client.fd.clone())
    }

    /// Age of the oldest unmap not yet covered by a flush: the client's
    /// records (hostile: they can only make iommud flush this domain
    /// sooner) and iommud's own.
    fn oldest_unmap_age(&self) -> Option<u64> {
        oldest_unmap_age(
            self.client()
                .cpu
                .iter()
                .chain(std::iter::once(&self.server_unmaps)),
            self.page().now(),
        )
    }

    /// The leaf-table arena the client writes entries into (magazine strategy).
    pub fn arena(&self) -> Option<Region> {
        self.lock().arena.clone()
    }

    /// The domain's allocator lock (counted).
    fn lock(&self) -> MutexGuard<'_, Inner> {
        stats::add(&self.stats.lock_acquisitions, 1);
        self.lock_uncounted()
    }

    /// The same lock, not counted: for reading stats, so that observing the
    /// domain does not change the figures observed.
    fn lock_uncounted(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Current strategy and flush policy.
    pub fn policy(&self) -> (Strategy, FlushPolicy) {
        let i = self.lock_uncounted();
        (i.strategy, i.flush)
    }

    fn mem(&self) -> &dyn PhysMem {
        &**self.unit.mem()
    }

    /// Allocates DMA memory for the client (≤ one region; call again for more).
    pub fn alloc_pool(&self, bytes: u64) -> Result<Region, DomainError> {
        if bytes == 0 || bytes > 64 << 20 {
            return Err(reply(
                ErrorCode::Invalid,
                format!("pool size {bytes} not in 1..=64 MiB"),
            ));
        }
        let r = self
            .mem()
            .alloc_region(bytes.next_multiple_of(PAGE), PAGE)?;
        self.lock().pools.push(r.clone());
        Ok(r)
    }

    fn owns_frames(i: &Inner, phys: u64, len: u64) -> bool {
        i.pools.iter().any(|r| r.contains(phys, len))
    }

    /// Makes sure the arena leaf tables for `[iova, iova+bytes)` are installed
    /// (magazine domains only; others allocate their own leaf tables).
    fn ensure_leaves(&self, i: &mut Inner, iova: u64, bytes: u64) -> Result<(), DomainError> {
        let Some(arena) = i.arena.clone().filter(|_| i.strategy == Strategy::Magazine) else {
            return Ok(());
        };
        let first = (iova - IOVA_BASE) >> 21;
        let last = (iova + bytes - 1 - IOVA_BASE) >> 21;
        for c in first..=last {
            let slot = i
                .leaf_installed
                .get_mut(c as usize)
                .ok_or_else(|| reply(ErrorCode::NoSpace, "iova beyond the arena"))?;
            if !*slot {
                let leaf = arena.phys + c * PAGE;
                // The client could write the arena while it was not installed.
                for k in 0..PAGE / 8 {
                    self.mem().write_u64(leaf + 8 * k, 0)?;
                }
                i.pt.install_leaf(self.mem(), IOVA_BASE + (c << 21), leaf)?;
                *slot = true;
            }
        }
        Ok(())
    }

    /// Maps `len` bytes at `phys` (which must lie in one of the domain's
    /// pools: validated trust), returning the IOVA of `phys`. `va` is the
    /// client's virtual address of `phys` (the va strategy's IOVA).
    pub fn map(&self, phys: u64, len: u64, dir: Dir, va: u64) -> Result<u64, DomainError> {
        if len == 0 || len > MAX_MAP_LEN {
            return Err(reply(
                ErrorCode::Invalid,
                format!("length {len:#x} not in 1..={MAX_MAP_LEN:#x}"),
            ));
        }
        for _ in 0..MAP_FLUSH_TRIES {
            let mut i = self.lock();
            if !Self::owns_frames(&i, phys, len) {
                return Err(reply(
                    ErrorCode::NotOwner,
                    format!("{phys:#x}+{len:#x} is not in this client's DMA memory"),
                ));
            }
            if i.strategy == Strategy::NoIommu || !self.unit.translating() {
                stats::add(&self.stats.maps, 1);
                return Ok(phys);
            }
            let plan = match i.strategy {
                Strategy::Identity | Strategy::Va => {
                    self.map_refcounted(&mut i, phys, len, dir, va)?
                }
                _ => self.map_allocated(&mut i, phys, len, dir)?,
            };
            drop(i);
            let MapPlan::Done {
                iova,
                base,
                pages,
                widened,
            } = plan
            else {
                self.flush()?;
                continue;
            };
            if widened {
                // A present entry changed: invalidate before the device relies on it.
                self.flush()?;
            } else if self.unit.caching_mode() {
                // §6.1: with CAP.CM, non-present → present changes must be invalidated too.
                self.unit
                    .invalidate(&[self.unit.iotlb_range(self.did, base, pages, true)])?;
                stats::add(&self.stats.inval_page, 1);
            }
            stats::add(&self.stats.maps, 1);
            return Ok(iova);
        }
        Err(reply(
            ErrorCode::Busy,
            format!(
                "{phys:#x}+{len:#x}: its pages kept changing under {MAP_FLUSH_TRIES} flushes; retry"
            ),
        ))
    }

    /// Global and (large) magazine maps: an IOVA range from the allocator.
    fn map_allocated(
        &self,
        i: &mut Inner,
        phys: u64,
        len: u64,
        dir: Dir,
    ) -> Result<MapPlan, DomainError> {
        let off = phys % PAGE;
        let pages = (off + len).div_ceil(PAGE);
        let alloc_bytes = pages.next_power_of_two() * PAGE;
        let iova = i
            .iova
            .alloc(alloc_bytes, alloc_bytes.min(32 * PAGE))
            .ok_or_else(|| reply(ErrorCode::NoSpace, "IOVA space exhausted"))?;
        let r = self.ensure_leaves(i, iova, alloc_bytes).and_then(|_| {
            Ok(i.pt.map(self.mem(), iova, phys - off, pages, dir.read(), dir.write())?)
        });
        if let Err(e) = r {
            i.iova.free(iova, alloc_bytes);
            return Err(e);
        }
        i.mapped.insert(
            iova,
            Mapped {
                pages,
                alloc_bytes,
                phys: phys - off,
            },
        );
        Ok(MapPlan::Done {
            iova: iova + off,
            base: iova,
            pages,
            widened: false,
        })
    }

    /// Identity and va maps: the IOVA is given, entries are refcounted per page.
    fn map_refcounted(
        &self,
        i: &mut Inner,
        phys: u64,
        len: u64,
        dir: Dir,
        va: u64,
    ) -> Result<MapPlan, DomainError> {
        let off = phys % PAGE;
        let iova = match i.strategy {
            Strategy::Va => {
                if va == 0 || va % PAGE != off || va.saturating_add(len) > VA_LIMIT {
                    return Err(reply(
                        ErrorCode::Invalid,
                        format!(
                            "va {va:#x} is not a user address of {phys:#x} (same page offset, below 2^47)"
                        ),
                    ));
                }
                va
            }
            _ => phys,
        };
        let (base, pbase) = (iova - off, phys - off);
        let pages = (off + len).div_ceil(PAGE);
        if base.saturating_add(pages * PAGE) > i.pt.limit() {
            return Err(reply(
                ErrorCode::Invalid,
                format!(
                    "iova {iova:#x} is beyond the {}-level tables' reach",
                    i.pt.levels()
                ),
            ));
        }
        let (r, w) = (dir.read(), dir.write());
        // Decide before changing anything.
        let mut flush_first = false;
        for k in 0..pages {
            let (v, p) = (base + k * PAGE, pbase + k * PAGE);
            if let Some(e) = i.refs.get(&v) {
                if e.phys != p {
                    return Err(reply(
                        ErrorCode::Invalid,
                        format!("iova {v:#x} already maps frame {:#x}, not {p:#x}", e.phys),
                    ));
                }
            } else if let Some(d) = i.dirty.get(&v) {
                flush_first |= d.phys != p || d.read != r || d.write != w;
            }
        }
        if flush_first {
            return Ok(MapPlan::FlushFirst);
        }
        let mut widened = false;
        for k in 0..pages {
            let (v, p) = (base + k * PAGE, pbase + k * PAGE);
            let r2 = match i.refs.get_mut(&v) {
                Some(e) => {
                    e.refs += 1;
                    if (r && !e.read) || (w && !e.write) {
                        e.read |= r;
                        e.write |= w;
                        widened = true;
                        let (er, ew) = (e.read, e.write);
                        i.pt.protect(self.mem(), v, er, ew)
                    } else {
                        Ok(())
                    }
                }
                None => {
                    // A dirty page comes back with the very entry the stale
                    // translation holds (checked above).
                    i.dirty.remove(&v);
                    let m = i.pt.map(self.mem(), v, p, 1, r, w);
                    if m.is_ok() {
                        i.refs.insert(
                            v,
                            PageRef {
                                phys: p,
                                refs: 1,
                                read: r,
                                write: w,
                            },
                        );
                    }
                    m
                }
            };
            if let Err(e) = r2 {
                // Undo this call's references (cleared pages are parked as usual).
                let (cleared, detached) = self.unref(i, base, k)?;
                self.park_cleared(i, cleared, detached);
                return Err(e.into());
            }
        }
        *i.ref_maps.entry((iova, len)).or_insert(0) += 1;
        Ok(MapPlan::Done {
            iova,
            base,
            pages,
            widened,
        })
    }

    /// Drops one reference to each of `pages` pages from `base`; returns the
    /// pages whose entries were cleared and the tables detached.
    #[allow(clippy::type_complexity)]
    fn unref(
        &self,
        i: &mut Inner,
        base: u64,
        pages: u64,
    ) -> Result<(Vec<(u64, PageRef)>, Vec<u64>), DomainError> {
        let mut cleared = Vec::new();
        let mut detached = Vec::new();
        for k in 0..pages {
            let v = base + k * PAGE;
            let Some(e) = i.refs.get_mut(&v) else {
                continue;
            };
            e.refs -= 1;
            if e.refs == 0 {
                let e = *e;
                i.refs.remove(&v);
                detached.extend(i.pt.unmap(self.mem(), v, 1)?);
                cleared.push((v, e));
            }
        }
        Ok((cleared, detached))
    }

    /// Parks cleared refcounted pages and detached tables under the epoch
    /// read after the clears; returns that tag.
    fn park_cleared(&self, i: &mut Inner, cleared: Vec<(u64, PageRef)>, detached: Vec<u64>) -> u64 {
        std::sync::atomic::fence(SeqCst);
        // iommud's own epoch, never the published copy (a client cannot
        // hold a tag back and have its IOVA or table freed early).
        let tag = self.epoch();
        // iommud's own unmaps have a record of their own (written under the
        // domain lock, its only writer).
        self.server_unmaps.note_unmap(self.page());
        for (v, e) in cleared {
            i.dirty.insert(
                v,
                DirtyPage {
                    phys: e.phys,
                    read: e.read,
                    write: e.write,
                    tag,
                },
            );
            i.parked.push((tag, Parked::Page(v)));
        }
        for t in detached {
            i.table_tag.insert(t, tag);
            i.parked.push((tag, Parked::Table(t)));
        }
        tag
    }

    /// Unmaps a mapping made by [`Domain::map`].
    pub fn unmap(&self, iova: u64, len: u64) -> Result<(), DomainError> {
        if len == 0 || len > MAX_MAP_LEN || iova.checked_add(len).is_none() {
            return Err(reply(
                ErrorCode::Invalid,
                format!("iova {iova:#x} length {len:#x}"),
            ));
        }
        let mut i = self.lock();
        if i.strategy == Strategy::NoIommu || !self.unit.translating() {
            stats::add(&self.stats.unmaps, 1);
            return Ok(());
        }
        let base = iova & !(PAGE - 1);
        let pages = (iova % PAGE + len).div_ceil(PAGE);
        let tag = match i.strategy {
            Strategy::Identity | Strategy::Va => {
                let n = i.ref_maps.get_mut(&(iova, len)).ok_or_else(|| {
                    reply(
                        ErrorCode::NotOwner,
                        format!("iova {iova:#x} length {len:#x} is not mapped"),
                    )
                })?;
                *n -= 1;
                if *n == 0 {
                    i.ref_maps.remove(&(iova, len));
                }
                let (cleared, detached) = self.unref(&mut i, base, pages)?;
                if cleared.is_empty() {
                    // Every page is still used by another mapping: nothing to invalidate.
                    stats::add(&self.stats.unmaps, 1);
                    return Ok(());
                }
                self.park_cleared(&mut i, cleared, detached)
            }
            _ => {
                let m = *i.mapped.get(&base).ok_or_else(|| {
                    reply(ErrorCode::NotOwner, format!("iova {iova:#x} is not mapped"))
                })?;
                if pages != m.pages {
                    return Err(reply(
                        ErrorCode::Invalid,
                        format!("length {len:#x} does not match the mapping at {iova:#x}"),
                    ));
                }
                i.mapped.remove(&base);
                let detached = i.pt.unmap(self.mem(), base, m.pages)?;
                let tag = self.park_cleared(&mut i, Vec::new(), detached);
                i.parked.push((
                    tag,
                    Parked::Iova {
                        iova: base,
                        bytes: m.alloc_bytes,
                    },
                ));
                tag
            }
        };
        i.queued += 1;
        let (flush, queued, parked) = (i.flush, i.queued, i.parked.len());
        drop(i);
        stats::add(&self.stats.unmaps, 1);
        match flush {
            FlushPolicy::Strict => self.flush()?,
            FlushPolicy::PerCore if parked >= SERVER_BATCH => self.flush()?,
            FlushPolicy::PerCore => {
                self.server_wanted.fetch_max(tag, SeqCst);
            }
            // The epoch timer ([`Domain::tick`]) flushes 10 ms after the
            // oldest if no unmap comes along to do it.
            FlushPolicy::Deferred
                if queued >= FLUSH_QUEUE_LEN
                    || self
                        .oldest_unmap_age()
                        .is_some_and(|age| age >= FLUSH_TIMEOUT_NS) =>
            {
                self.flush()?
            }
            FlushPolicy::Deferred => {}
        }
        Ok(())
    }

    /// A domain-selective invalidation that completes the current epoch.
    ///
    /// Every invalidation that completes an epoch is domain-selective, strict
    /// unmaps included: completing epoch `e` releases *everything* parked
    /// under tags ≤ `e` (other unmaps' IOVAs, pages and tables too), so the
    /// invalidation must cover all of them, which a page-selective one of
    /// the unmapped range does not.
    pub fn flush(&self) -> Result<(), DomainError> {
        self.flush_with(self.unit.iotlb_domain(self.did))
    }

    /// Flushes if a client asked for an epoch not yet completed (after a
    /// one-way hint, or from the epoch timer).
    ///
    /// The client's `wanted` is a wish, read once and never trusted beyond
    /// iommud's own epoch: a client that writes a huge value, or moves it
    /// around, gets at most the one flush that completes the current epoch
    /// per hint or tick — the same as a client that really unmaps that fast.
    pub fn flush_if_wanted(&self) -> Result<bool, DomainError> {
        let c = self.client();
        // Clear the hint flag *before* reading `wanted` (see iommu_abi::shared).
        c.hint_pending.store(0, SeqCst);
        let epoch = self.epoch();
        let wanted = c
            .wanted
            .load(SeqCst)
            .min(epoch)
            .max(self.server_wanted.load(SeqCst));
        if self.completed() < wanted {
            self.flush()?;
            return Ok(true);
        }
        Ok(false)
    }

    /// The epoch timer, run every tick: flushes what a client asked for, and
    /// any domain whose oldest unflushed unmap is [`FLUSH_TIMEOUT_NS`] old.
    pub fn tick(&self) -> Result<bool, DomainError> {
        if self.flush_if_wanted()? {
            return Ok(true);
        }
        if self
            .oldest_unmap_age()
            .is_some_and(|age| age >= FLUSH_TIMEOUT_NS)
        {
            self.flush()?;
            return Ok(true);
        }
        Ok(false)
    }

    fn flush_with(&self, desc: vtd::desc::Descriptor) -> Result<(), DomainError> {
        let p = self.page();
        // Take the unmap records before advancing the epoch (iommu_abi::shared).
        let unmaps = take_unmaps(
            self.client()
                .cpu
                .iter()
                .chain(std::iter::once(&self.server_unmaps)),
            &mut self.unmaps_seen.lock().unwrap_or_else(|p| p.into_inner()),
        );
        let e = self.epoch.fetch_add(1, SeqCst);
        p.epoch.fetch_max(e + 1, SeqCst);
        match desc.decode() {
            vtd::desc::Decoded::Iotlb {
                g: vtd::regs::Granularity::Selective,
                ..
            } => stats::add(&self.stats.inval_page, 1),
            _ => stats::add(&self.stats.inval_domain, 1),
        }
        self.unit.invalidate(&[desc])?;
        self.completed.fetch_max(e, SeqCst);
        p.completed.fetch_max(e, SeqCst);
        if let Some((oldest, sum, count)) = unmaps {
            // Stale window: from each unmap to this completion.
            let now = p.now();
            if oldest != 0 {
                stats::max(&self.stats.stale_ns_max, now.saturating_sub(oldest));
            }
            stats::add(
                &self.stats.stale_ns_sum,
                count.saturating_mul(now).saturating_sub(sum),
            );
            stats::add(&self.stats.stale_count, count);
        }
        self.release_parked(e);
        Ok(())
    }

    fn release_parked(&self, completed: u64) {
        let mut i = self.lock();
        i.queued = 0;
        if i.parked.is_empty() {
            return;
        }
        let (done, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut i.parked)
            .into_iter()
            .partition(|(t, _)| *t <= completed);
        i.parked = keep;
        for (tag, what) in done {
            match what {
                Parked::Iova { iova, bytes } => {
                    i.iova.free(iova, bytes);
                }
                Parked::Table(t) => {
                    if i.table_tag.get(&t) == Some(&tag) {
                        i.table_tag.remove(&t);
                        // Not if a map revived it meanwhile (it is live again).
                        if i.pt.release_detached(t) {
                            self.mem().free_frame(t);
                            stats::add(&self.stats.pt_freed, 1);
                        }
                    }
                }
                Parked::Page(v) => {
                    // Only if not cleared again since (a newer tag) or revived.
                    if i.dirty.get(&v).is_some_and(|d| d.tag <= completed) {
                        i.dirty.remove(&v);
                    }
                }
            }
        }
    }

    /// A magazine exchange: take back `returned` clean IOVAs of `class` from
    /// the exchange area, then write up to `want` clean IOVAs there.
    pub fn exchange(&self, pages: u64, returned: u64, want: u64) -> Result<u64, DomainError> {
        let class = size_class(pages)
            .filter(|c| class_pages(*c) == pages)
            .ok_or_else(|| reply(ErrorCode::Invalid, format!("size class {pages} pages")))?;
        if returned as usize > EXCHANGE_SLOTS || want as usize > MAG_SIZE {
            return Err(reply(
                ErrorCode::Invalid,
                format!("returned {returned} (max {EXCHANGE_SLOTS}) want {want} (max {MAG_SIZE})"),
            ));
        }
        let mut i = self.lock();
        if i.strategy != Strategy::Magazine {
            return Err(reply(
                ErrorCode::Unsupported,
                "exchange needs the magazine strategy",
            ));
        }
        let Some(arena) = i.arena.clone() else {
            return Err(reply(ErrorCode::Unsupported, "no arena"));
        };
        // Copy the client's list once (it may keep writing the page), then
        // validate everything before changing anything.
        let given = (0..returned as usize)
            .map(|k| self.exchange_slot(k))
            .collect::<Result<Vec<u64>, _>>()?;
        let mut back = Vec::with_capacity(given.len());
        let mut seen = std::collections::HashSet::with_capacity(given.len());
        for iova in given {
            if i.delegated.get(&iova) != Some(&class) || !seen.insert(iova) {
                stats::add(&self.stats.rejected, 1);
                return Err(reply(
                    ErrorCode::NotOwner,
                    format!(
                        "iova {iova:#x} was not delegated to this client in class {pages} \
                         (or is returned twice)"
                    ),
                ));
            }
            for p in 0..pages {
                let va = iova + p * PAGE;
                let pte_at = arena.phys + ((va - IOVA_BASE) >> 12) * 8;
                if vtd::entry::SlPte(self.mem().read_u64(pte_at)?).present() {
                    return Err(reply(
                        ErrorCode::Invalid,
                        format!("iova {va:#x} is still mapped; unmap before returning it"),
                    ));
                }
            }
            back.push(iova);
        }
        for iova in &back {
            i.delegated.remove(iova);
        }
        if !back.is_empty() {
            if i.depot[class].len() < DEPOT_MAX {
                i.depot[class].push(back);
            } else {
                for iova in back {
                    i.iova.free(iova, pages * PAGE);
                }
            }
        }
        let mut out = Vec::new();
        if want > 0 {
            if let Some(m) = i.depot[class].last_mut() {
                // A magazine given back whole (or a larger batch from a
                // client's drain, split here): hand out up to `want` of it.
                let keep = m.len().saturating_sub(want as usize);
                out = m.split_off(keep);
                if m.is_empty() {
                    i.depot[class].pop();
                }
                stats::add(&self.stats.depot_hits, 1);
            } else {
                for _ in 0..want {
                    let Some(iova) = i.iova.alloc(pages * PAGE, pages * PAGE) else {
                        break;
                    };
                    if let Err(e) = self.ensure_leaves(&mut i, iova, pages * PAGE) {
                        i.iova.free(iova, pages * PAGE);
                        for v in out {
                            i.iova.free(v, pages * PAGE);
                        }
                        return Err(e);
                    }
                    out.push(iova);
                }
            }
        }
        for (k, &iova) in out.iter().enumerate() {
            i.delegated.insert(iova, class);
            self.client
                .map
                .write_u64(EXCHANGE_OFFSET + 8 * k, iova)
                .ok_or_else(|| reply(ErrorCode::Invalid, "exchange slot"))?;
        }
        stats::add(&self.stats.depot_exchanges, 1);
        Ok(out.len() as u64)
    }

    fn exchange_slot(&self, k: usize) -> Result<u64, DomainError> {
        self.client
            .map
            .read_u64(EXCHANGE_OFFSET + 8 * k)
            .ok_or_else(|| reply(ErrorCode::Invalid, "exchange slot out of range"))
    }

    /// True when the client holds nothing of this domain: no mapping (made
    /// by iommud or refcounted) and no delegated IOVA (magazines drained).
    fn idle(i: &Inner) -> bool {
        i.mapped.is_empty() && i.delegated.is_empty() && i.refs.is_empty()
    }

    /// Switches strategy and/or flush policy. Only an idle domain switches
    /// (`Busy` otherwise: unmap everything and `drain()` first); the client
    /// sees the new policy in the shared page. Parked work is flushed first,
    /// and leaving `magazine` unlinks the arena's leaf tables, so a client
    /// that keeps writing its arena cannot reach the device any more.
    pub fn set_policy(
        &self,
        strategy: Option<Strategy>,
        flush: Option<FlushPolicy>,
    ) -> Result<(), DomainError> {
        if self.unit.translating() {
            self.flush()?;
        }
        let mut i = self.lock();
        let (s, f) = (strategy.unwrap_or(i.strategy), flush.unwrap_or(i.flush));
        if (s, f) == (i.strategy, i.flush) {
            return Ok(());
        }
        if !Self::idle(&i) {
            return Err(reply(
                ErrorCode::Busy,
                format!(
                    "domain is busy ({} mapped, {} pages referenced, {} IOVAs delegated): \
                     unmap everything and drain the client before switching",
                    i.mapped.len(),
                    i.refs.len(),
                    i.delegated.len()
                ),
            ));
        }
        if (s == Strategy::NoIommu) != (i.strategy == Strategy::NoIommu) {
            return Err(reply(
                ErrorCode::Unsupported,
                "noiommu is translation off for the whole unit (iommud --no-translation)",
            ));
        }
        if s == Strategy::Magazine && i.arena.is_none() {
            return Err(reply(ErrorCode::Unsupported, "this domain has no arena"));
        }
        let mut unlinked = false;
        if i.strategy == Strategy::Magazine && s != Strategy::Magazine {
            for c in 0..i.leaf_installed.len() {
                if std::mem::take(&mut i.leaf_installed[c]) {
                    i.pt.uninstall_leaf(self.mem(), IOVA_BASE + ((c as u64) << 21))?;
                    unlinked = true;
                }
            }
            for class in 0..SIZE_CLASSES {
                for mag in std::mem::take(&mut i.depot[class]) {
                    for iova in mag {
                        i.iova.free(iova, class_pages(class) * PAGE);
                    }
                }
            }
        }
        i.strategy = s;
        i.flush = f;
        self.publish(s, f);
        drop(i);
        if unlinked {
            self.flush()?;
        }
        Ok(())
    }

    /// True once torn down.
    pub fn is_dead(&self) -> bool {
        self.dead.load(SeqCst)
    }

    /// Gives everything back: blocks the device (context entry cleared and
    /// invalidated), then frees tables, arena, pools and the domain id. Safe
    /// to call more than once.
    pub fn teardown(&self) {
        if self.dead.swap(true, SeqCst) {
            return;
        }
        self.page().dead.store(1, SeqCst);
        if self.unit.translating() {
            if let Err(e) = self.unit.clear_context(self.sid, self.did) {
                crate::unit::log::warn(&format!(
                    "{}: clearing context failed: {e}; leaking its tables",
                    Bdf(self.sid)
                ));
                return;
            }
        }
        let mut i = self.lock();
        let mem = self.unit.mem().clone();
        let arena = i.arena.take();
        let pt = std::mem::replace(
            &mut i.pt,
            // A placeholder that owns nothing: the root of a table needs a frame, so
            // reuse a 0-level view; it is never used again (dead is set).
            PageTable::placeholder(),
        );
        let owned = |p: u64| arena.as_ref().is_some_and(|a| a.contains(p, PAGE));
        for t in pt.teardown(owned) {
            mem.free_frame(t);
        }
        // Detached tables are among what the table gives back (it owns them
        // until released); the parked list only refers to them.
        i.parked.clear();
        i.table_tag.clear();
        if let Some(a) = arena {
            mem.free_region(&a);
        }
        for r in i.pools.drain(..) {
            mem.free_region(&r);
        }
        i.mapped.clear();
        i.delegated.clear();
        i.refs.clear();
        i.ref_maps.clear();
        i.dirty.clear();
        drop(i);
        self.unit.free_did(self.did);
    }

    /// Table-page counters: (allocated, freed, live).
    pub fn table_pages(&self) -> (u64, u64, u64) {
        let i = self.lock_uncounted();
        let c = i.pt.counts();
        (c.allocated, stats::get(&self.stats.pt_freed), c.live)
    }

    /// Renders `domains/<bdf>/stats`.
    pub fn render_stats(&self) -> String {
        let p = self.client();
        let s = &self.stats;
        let (strategy, flush, mapped, delegated, parked, pools, depot, c, refs, dirty) = {
            let i = self.lock_uncounted();
            (
                i.strategy,
                i.flush,
                (i.mapped.len() as u64)
                    .saturating_add(i.ref_maps.values().fold(0u64, |a, n| a.saturating_add(*n))),
                i.delegated.len(),
                i.parked.len(),
                i.pools.iter().map(|r| r.len).sum::<u64>(),
                i.depot.iter().map(|d| d.len()).sum::<usize>(),
                i.pt.counts(),
                i.refs.len(),
                i.dirty.len(),
            )
        };
        let client_maps = p.sum(|c| &c.maps);
        let client_unmaps = p.sum(|c| &c.unmaps);
        let stale_sum = stats::get(&s.stale_ns_sum);
        let stale_n = stats::get(&s.stale_count);
        let mut t = Text::default();
        t.kv("bdf", Bdf(self.sid))
            .kv("domain_id", self.did)
            .kv("strategy", strategy.name())
            .kv("flush", flush.name())
            .kv("trust", self.trust.name())
            .kv("maps", client_maps.saturating_add(stats::get(&s.maps)))
            .kv(
                "unmaps",
                client_unmaps.saturating_add(stats::get(&s.unmaps)),
            )
            .kv("magazine_hits", p.sum(|c| &c.mag_hits))
            .kv(
                "magazine_misses",
                p.sum(|c| &c.maps).saturating_sub(p.sum(|c| &c.mag_hits)),
            )
            .kv("batches_recycled", p.sum(|c| &c.batches_recycled))
            .kv("depot_exchanges", stats::get(&s.depot_exchanges))
            .kv("depot_hits", stats::get(&s.depot_hits))
            .kv("depot_magazines", depot)
            .kv("ipc_round_trips", stats::get(&s.ipc_round_trips))
            .kv("ipc_wakeups", stats::get(&s.wakeups))
            .kv("lock_acquisitions", stats::get(&s.lock_acquisitions))
            .kv("invalidations_domain", stats::get(&s.inval_domain))
            .kv("invalidations_page", stats::get(&s.inval_page))
            .kv(
                "invalidations",
                stats::get(&s.inval_domain) + stats::get(&s.inval_page),
            )
            .kv("epoch", self.epoch())
            .kv("epoch_completed", self.completed())
            .kv("stale_window_max_ns", stats::get(&s.stale_ns_max))
            .kv(
                "stale_window_mean_ns",
                stale_sum.checked_div(stale_n).unwrap_or(0),
            )
            .kv("stale_window_unmaps", stale_n)
            .kv("pt_pages_allocated", c.allocated)
            .kv("pt_pages_freed", stats::get(&s.pt_freed))
            .kv("pt_pages_live", c.live)
            .kv("mapped", mapped)
            .kv("delegated_iovas", delegated)
            .kv("refcounted_pages", refs)
            .kv("dirty_pages", dirty)
            .kv("parked", parked)
            .kv("pool_bytes", pools)
            .kv("faults", stats::get(&s.faults))
            .kv("errors", stats::get(&s.errors))
            .kv("rejected", stats::get(&s.rejected));
        t.0
    }

    /// Renders `domains/<bdf>/mappings`: iommud-made mappings, one per line.
    pub fn render_mappings(&self) -> String {
        let i = self.lock_uncounted();
        let mut t = Text::default();
        for (iova, m) in &i.mapped {
            t.kv(
                &format!("{iova:#x}"),
                format!("phys {:#x} pages {}", m.phys, m.pages),
            );
        }
        for ((iova, len), n) in &i.ref_maps {
            t.kv(&format!("{iova:#x}"), format!("len {len:#x} maps {n}"));
        }
        t.kv("delegated_iovas", i.delegated.len());
        t.kv("refcounted_pages", i.refs.len());
        t.0
    }
}
