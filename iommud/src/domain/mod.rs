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
use crate::quota::{Account, Quota};
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

mod adopt;
#[cfg(all(test, feature = "sim"))]
mod adopt_tests;
mod allocated;
mod depot;
mod epochs;
mod refcounted;
mod report;
mod rings;
#[cfg(all(test, feature = "sim"))]
mod tests;
mod timer;
#[cfg(all(test, feature = "sim"))]
mod timer_tests;
pub use timer::{Budget, TimerFlush, FLUSH_BUDGET_BURST, FLUSH_BUDGET_PER_MS, TIMER_MIN_GAP};

pub use adopt::Adoption;
pub use rings::{Passer, Rings, Served};

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
    /// Serialises this domain's epoch flushes, so one that finds its need
    /// covered by the flush it waited behind skips (`Domain::flush_since`).
    /// Taken after the allocator lock, never before it; the epoch timer only
    /// tries it (`Domain::timer_flush`).
    flush_lock: Mutex<()>,
    /// The highest tag iommud's own unmaps wait for (percore policy).
    server_wanted: AtomicU64,
    /// The unmap record of iommud's own unmaps (stale windows).
    server_unmaps: CpuCounters,
    /// iommud's snapshot of the slots' running unmap totals (stale windows).
    unmaps_seen: Mutex<UnmapTotals>,
    /// Server-side counters.
    pub stats: DomainStats,
    dead: AtomicBool,
    /// Blocked for faulting too fast (context entry cleared).
    blocked: AtomicBool,
    /// The owner's account (quotas), and what this domain charged to it.
    account: Arc<Account>,
    charged: [AtomicU64; 3],
    /// Registered regions (the pools, in allocation order): what ring map
    /// entries name, readable without the allocator lock.
    regions: std::sync::RwLock<Vec<Registered>>,
    /// The client's rings, once set up.
    rings: std::sync::OnceLock<Rings>,
    /// Serialises writers of `server_unmaps` (the allocator lock's holder
    /// and ring passes).
    record_lock: Mutex<()>,
    /// Storm control: flushes that hints and `FlushSync` may trigger unbacked.
    pub budget: Budget,
    /// An epoch the timer completed whose release waits for the lock (0: none).
    release_owed: AtomicU64,
    /// Domain-clock time of the latest take of the unmap records.
    last_take: AtomicU64,
    /// What a restarted iommud needs to adopt this domain (delegated
    /// domains where memory outlives the process; `crate::ledger`).
    ledger: std::sync::OnceLock<crate::ledger::Ledger>,
}

/// A registered region: a pool, and where the `static` strategy mapped it.
#[derive(Debug, Clone, Copy)]
pub struct Registered {
    /// Physical address of the first byte.
    pub phys: u64,
    /// Bytes.
    pub len: u64,
    /// The static strategy's IOVA of the first byte (0: not mapped whole).
    pub iova: u64,
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
        account: Arc<Account>,
    ) -> Result<Arc<Domain>, DomainError> {
        // One domain of the owner's quota, given back at teardown.
        account
            .charge(Quota::Domains, 1)
            .map_err(|m| reply(ErrorCode::QuotaExceeded, m))?;
        let mem = unit.mem().clone();
        let Some(did) = unit.alloc_did() else {
            account.release(Quota::Domains, 1);
            return Err(reply(ErrorCode::NoMemory, "no free domain id"));
        };
        let build = || -> Result<(PageTable, Option<Region>, SharedMem, SharedMem), DomainError> {
            let pt = PageTable::new(&*mem, unit.levels, reclaim, unit.coherent())?;
            // Every delegated translating domain gets an arena, so it can
            // switch to the magazine strategy while its client stays attached;
            // a validated domain never has client-writable tables.
            // A validated magazine domain has one too, written by iommud only
            // (never shared).
            let arena = if (trust == Trust::Delegated || strategy == Strategy::Magazine)
                && strategy != Strategy::NoIommu
                && unit.translating()
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
                account.release(Quota::Domains, 1);
                return Err(e);
            }
        };
        let d = Domain::assemble(
            &unit, sid, did, strategy, flush, trust, pt, arena, published, client, account,
        );
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

    /// The domain's state around its tables and shared pages (new or adopted).
    #[allow(clippy::too_many_arguments)]
    fn assemble(
        unit: &Arc<Iommu>,
        sid: u16,
        did: u16,
        strategy: Strategy,
        flush: FlushPolicy,
        trust: Trust,
        pt: PageTable,
        arena: Option<Region>,
        published: SharedMem,
        client: SharedMem,
        account: Arc<Account>,
    ) -> Domain {
        Domain {
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
            flush_lock: Mutex::new(()),
            server_wanted: AtomicU64::new(0),
            server_unmaps: CpuCounters::default(),
            unmaps_seen: Mutex::default(),
            stats: DomainStats::default(),
            dead: AtomicBool::new(false),
            blocked: AtomicBool::new(false),
            account,
            charged: Default::default(),
            regions: Default::default(),
            rings: Default::default(),
            record_lock: Mutex::new(()),
            budget: Budget::default(),
            release_owed: AtomicU64::new(0),
            last_take: AtomicU64::new(0),
            ledger: Default::default(),
        }
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

    /// Allocates DMA memory for the client (≤ one region; call again for
    /// more) and registers it: ring map entries name it by its index. With
    /// the `static` strategy the whole pool is mapped now (validated: it is
    /// the client's own memory), and its IOVA is returned with it.
    pub fn alloc_pool(&self, bytes: u64) -> Result<(Region, u32, Registered), DomainError> {
        if bytes == 0 || bytes > 64 << 20 {
            return Err(reply(
                ErrorCode::Invalid,
                format!("pool size {bytes} not in 1..=64 MiB"),
            ));
        }
        let rounded = bytes.next_multiple_of(PAGE);
        self.charge(Quota::PoolBytes, rounded)?;
        let r = match self.mem().alloc_region(rounded, PAGE) {
            Ok(r) => r,
            Err(e) => {
                self.uncharge(Quota::PoolBytes, rounded);
                return Err(e.into());
            }
        };
        let mut i = self.lock();
        let iova = if i.strategy == Strategy::Static && self.unit.translating() {
            match self.map_static(&mut i, &r) {
                Ok(v) => v,
                Err(e) => {
                    drop(i);
                    self.mem().free_region(&r);
                    self.uncharge(Quota::PoolBytes, rounded);
                    return Err(e);
                }
            }
        } else {
            0
        };
        i.pools.push(r.clone());
        self.note_pool(&r, iova);
        let reg = Registered {
            phys: r.phys,
            len: r.len,
            iova,
        };
        // Registered under the allocator lock, so regions and pools agree.
        let mut regs = self.regions.write().unwrap_or_else(|p| p.into_inner());
        regs.push(reg);
        let index = u32::try_from(regs.len() - 1)
            .map_err(|_| reply(ErrorCode::NoSpace, "too many regions"))?;
        drop(regs);
        drop(i);
        if iova != 0 {
            self.sync_tables(self.lock_uncounted().pt.counts().live);
            if self.unit.caching_mode() {
                // §6.1: with CAP.CM, non-present → present changes are invalidated too.
                self.flush()?;
            }
        }
        Ok((r, index, reg))
    }

    /// The static strategy: maps a whole pool once at an allocated IOVA range.
    fn map_static(&self, i: &mut Inner, r: &Region) -> Result<u64, DomainError> {
        self.check_tables()?;
        self.charge(Quota::Mappings, 1)?;
        let pages = r.len.div_ceil(PAGE);
        let bytes = pages * PAGE;
        let Some(iova) = i.iova.alloc(bytes, bytes.next_power_of_two().min(2 << 20)) else {
            self.uncharge(Quota::Mappings, 1);
            return Err(reply(ErrorCode::NoSpace, "IOVA space exhausted"));
        };
        if let Err(e) = i.pt.map(self.mem(), iova, r.phys, pages, true, true) {
            i.iova.free(iova, bytes);
            self.uncharge(Quota::Mappings, 1);
            return Err(e.into());
        }
        stats::add(&self.stats.maps, 1);
        Ok(iova)
    }

    /// Charges `n` of `q` to the owner's account (pool bytes, mappings),
    /// or refuses with `QuotaExceeded` naming the quota.
    pub(super) fn charge(&self, q: Quota, n: u64) -> Result<(), DomainError> {
        self.account.charge(q, n).map_err(|m| {
            stats::add(&self.stats.quota_refusals, 1);
            reply(ErrorCode::QuotaExceeded, m)
        })?;
        self.charged[q as usize].fetch_add(n, SeqCst);
        Ok(())
    }

    /// Gives `n` of `q` back to the owner's account.
    pub(super) fn uncharge(&self, q: Quota, n: u64) {
        let _ =
            self.charged[q as usize].fetch_update(SeqCst, SeqCst, |c| Some(c.saturating_sub(n)));
        self.account.release(q, n);
    }

    /// Refuses a map while the owner's table pages are at their limit.
    pub(super) fn check_tables(&self) -> Result<(), DomainError> {
        self.account.check(Quota::PtPages).map_err(|m| {
            stats::add(&self.stats.quota_refusals, 1);
            reply(ErrorCode::QuotaExceeded, m)
        })
    }

    /// Brings the owner's table-page charge in line with `live` pages.
    pub(super) fn sync_tables(&self, live: u64) {
        let old = self.charged[Quota::PtPages as usize].swap(live, SeqCst);
        if live > old {
            self.account.add(Quota::PtPages, live - old);
        } else {
            self.account.release(Quota::PtPages, old - live);
        }
    }

    fn owns_frames(i: &Inner, phys: u64, len: u64) -> bool {
        i.pools.iter().any(|r| r.contains(phys, len))
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
        if (s == Strategy::Static) != (i.strategy == Strategy::Static) {
            return Err(reply(
                ErrorCode::Unsupported,
                "static maps each pool whole when it is allocated: choose it at attach",
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
        self.note_policy(s, f);
        drop(i);
        if unlinked {
            self.flush()?;
        }
        Ok(())
    }

    /// Blocks the device (it faulted faster than the administrator allows):
    /// its context entry is quarantined (an empty table, faults not
    /// recorded) and invalidated, so none of its DMA reaches memory and its
    /// faults no longer crowd out other devices'; the domain stays attached,
    /// its tables intact, until its client detaches.
    pub fn block(&self) -> Result<(), DomainError> {
        if self.is_blocked() || self.is_dead() || !self.unit.translating() {
            return Ok(());
        }
        // Blocked for good: a restarted iommud must not unblock it.
        self.retire_ledger();
        self.unit.quarantine_context(self.sid, self.did)?;
        // Set once the quarantine is in place (and invalidated).
        self.blocked.store(true, SeqCst);
        Ok(())
    }

    /// True once blocked for faulting too fast.
    pub fn is_blocked(&self) -> bool {
        self.blocked.load(SeqCst)
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
        self.page()
            .dead
            .store(iommu_abi::shared::DEAD_DETACHED, SeqCst);
        // A restarted iommud must never adopt a domain half torn down.
        self.retire_ledger();
        // No ring pass writes an entry from here on.
        self.quiesce_rings();
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
        self.free_ledger();
        mem.free_shared(&self.published);
        mem.free_shared(&self.client);
        i.mapped.clear();
        i.delegated.clear();
        i.refs.clear();
        i.ref_maps.clear();
        i.dirty.clear();
        drop(i);
        self.unit.free_did(self.did);
        // Everything this domain held goes back to its owner's account.
        for q in [Quota::PoolBytes, Quota::PtPages, Quota::Mappings] {
            self.account
                .release(q, self.charged[q as usize].swap(0, SeqCst));
        }
        self.account.release(Quota::Domains, 1);
    }
}
