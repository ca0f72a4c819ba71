//! Ledgers and adoption: how a magazine or `static` domain outlives the
//! iommud that made it (docs/ARCHITECTURE.md, "Stop, crash and restart").
//!
//! While iommud lives, [`Domain::start_ledger`] gives the domain a ledger
//! (`crate::ledger`) and a reattach token, and every change a restarted
//! iommud would need (IOVAs delegated and returned, allocated maps, live
//! ring mappings, pools, rings, epochs) is written there as it happens. After a crash, the next iommud
//! reads the ledger, keeps the device translating through the old tables
//! while it builds new ones ([`crate::unit::Iommu::init_carrying`]), and
//! [`Domain::adopt`]s the domain: the same domain id, arena (whose leaf
//! tables stay live), pools, IOVAs, rings and, where they outlive iommud,
//! shared pages (so the client's epochs go on). When the owner comes
//! back with its token, [`Domain::resume`] invalidates the domain before the
//! client gets it.

use super::*;
use crate::ledger::{Header, Image, Ledger, PageEntry, LEDGER_BYTES};

/// Everything a domain's adoption starts from: its ledger read back, the
/// ledger's memory, and its regions (index for index with the ledger's
/// records: the arena, then the pools) taken back.
pub struct Adoption {
    /// The ledger as read.
    pub image: Image,
    /// The ledger's memory.
    pub ledger: Region,
    /// The regions, taken back.
    pub regions: Vec<Region>,
}

/// A fresh 128-bit secret (0 when the system has no randomness to give).
fn random_token() -> u128 {
    use std::io::Read;
    let mut b = [0u8; 16];
    match std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)) {
        Ok(()) => u128::from_le_bytes(b),
        Err(_) => 0,
    }
}

impl Domain {
    /// Gives a magazine or `static` domain a ledger and a reattach token
    /// (returned), where the unit keeps ledgers. `None`: no ledger (another
    /// strategy, no translation, no randomness, or memory that dies with
    /// iommud).
    pub fn start_ledger(&self, owner: (u32, u32)) -> Option<u128> {
        if !self.unit.journal() || !self.unit.translating() {
            return None;
        }
        let token = random_token();
        if token == 0 {
            return None;
        }
        let i = self.lock_uncounted();
        // Magazine domains (either trust) and `static` ones can be adopted.
        if !matches!(i.strategy, Strategy::Magazine | Strategy::Static) {
            return None;
        }
        let arena = i.arena.clone();
        if i.strategy == Strategy::Magazine && arena.is_none() {
            return None;
        }
        let mem = self.mem();
        let region = match mem.alloc_ledger(LEDGER_BYTES) {
            Ok(r) => r,
            Err(e) => {
                crate::unit::log::warn(&format!(
                    "{}: no ledger ({e}): this domain will not survive an iommud restart",
                    Bdf(self.sid)
                ));
                return None;
            }
        };
        let h = Header {
            sid: self.sid,
            did: self.did,
            strategy: i.strategy,
            flush: i.flush,
            trust: self.trust,
            owner,
            token,
        };
        let made = Ledger::init(region.clone(), &h, i.pt.root()).and_then(|l| {
            l.set_epoch(self.epoch());
            l.set_shared(
                mem.shared_name(&self.published).as_deref(),
                mem.shared_name(&self.client).as_deref(),
            )?;
            if let Some(a) = &arena {
                l.add_region(a, 0, mem.region_name(a.phys).as_deref())?;
                l.set_has_arena()?;
            }
            let regs = self.regions.read().unwrap_or_else(|p| p.into_inner());
            for (p, reg) in i.pools.iter().zip(regs.iter()) {
                l.add_region(p, reg.iova, mem.region_name(p.phys).as_deref())?;
            }
            Ok(l)
        });
        match made {
            Ok(l) => {
                let _ = self.ledger.set(l);
                Some(token)
            }
            Err(e) => {
                mem.free_region(&region);
                crate::unit::log::warn(&format!("{}: ledger not written: {e}", Bdf(self.sid)));
                None
            }
        }
    }

    /// Records in the ledger (if any) what starts at `iova` now.
    pub(super) fn note(&self, iova: u64, e: Option<PageEntry>) {
        if let Some(l) = self.ledger.get() {
            if (IOVA_BASE..IOVA_BASE + IOVA_SPAN).contains(&iova) {
                l.set_page((iova - IOVA_BASE) / PAGE, e);
            }
        }
    }

    /// Records an epoch before the client can see it (see `flush_epoch`).
    pub(super) fn note_epoch(&self, epoch: u64) {
        if let Some(l) = self.ledger.get() {
            l.set_epoch(epoch);
        }
    }

    /// Records a new pool (and where `static` mapped it) in the ledger (if any).
    pub(super) fn note_pool(&self, r: &Region, iova: u64) {
        if let Some(l) = self.ledger.get() {
            let mem = self.mem();
            if let Err(e) = l.add_region(r, iova, mem.region_name(r.phys).as_deref()) {
                crate::unit::log::warn(&format!(
                    "{}: ledger: {e}; this domain will not survive an iommud restart",
                    Bdf(self.sid)
                ));
                l.retire();
            }
        }
    }

    /// Records the policy in the ledger (if any); a strategy other than
    /// magazine or `static` cannot be adopted, so its ledger says so by being
    /// retired.
    pub(super) fn note_policy(&self, strategy: Strategy, flush: FlushPolicy) {
        if let Some(l) = self.ledger.get() {
            if matches!(strategy, Strategy::Magazine | Strategy::Static) {
                l.set_policy(strategy, flush);
            } else {
                l.retire();
            }
        }
    }

    /// The domain is going (or blocked for good): never adopt it.
    pub(super) fn retire_ledger(&self) {
        if let Some(l) = self.ledger.get() {
            l.retire();
        }
    }

    /// Frees the ledger's memory (teardown, after the device is blocked).
    pub(super) fn free_ledger(&self) {
        if let Some(l) = self.ledger.get() {
            self.mem().free_region(&l.region);
        }
    }

    /// True if the domain keeps a ledger (a restarted iommud can adopt it).
    pub fn has_ledger(&self) -> bool {
        self.ledger.get().is_some()
    }

    /// Adopts a domain a previous iommud left (see the module doc): new
    /// upper page tables over the same arena leaf tables, the same domain id,
    /// pools and IOVAs, and the device's context entry moved from the old
    /// tables to the new ones (one context-cache and IOTLB invalidation).
    /// The ledger goes on recording. On an error nothing is left allocated
    /// but the regions, which the caller frees after blocking the device.
    pub fn adopt(
        unit: Arc<Iommu>,
        a: &Adoption,
        reclaim: bool,
        account: Arc<Account>,
    ) -> Result<Arc<Domain>, DomainError> {
        let h = a.image.header;
        let bad = |m: String| reply(ErrorCode::Invalid, format!("{}: {m}", Bdf(h.sid)));
        if !matches!(h.strategy, Strategy::Magazine | Strategy::Static) {
            return Err(bad(format!(
                "{} strategy: only magazine and static domains are adopted",
                h.strategy.name()
            )));
        }
        let arena = if a.image.has_arena {
            a.regions.first().cloned()
        } else {
            None
        };
        if a.regions.len() != a.image.regions.len()
            || arena.as_ref().is_some_and(|r| r.len != ARENA_BYTES)
            || (h.strategy == Strategy::Magazine && arena.is_none())
        {
            return Err(bad("the ledger's regions do not match".into()));
        }
        account
            .charge(Quota::Domains, 1)
            .map_err(|m| reply(ErrorCode::QuotaExceeded, m))?;
        let mem = unit.mem().clone();
        // The shared pages are the ones the client still maps, where they
        // outlive iommud (its epochs go on where they were); else new ones.
        let kept = matches!(a.image.shared, (Some(_), Some(_)));
        let build = || -> Result<(PageTable, SharedMem, SharedMem), DomainError> {
            let pt = PageTable::new(&*mem, unit.levels, reclaim, unit.coherent())?;
            let (published, client) = match &a.image.shared {
                (Some(p), Some(c)) => (
                    mem.adopt_shared(p, PUBLISHED_LEN, false)?,
                    mem.adopt_shared(c, CLIENT_LEN, true)?,
                ),
                _ => (
                    mem.alloc_shared(PUBLISHED_LEN, false)?,
                    mem.alloc_shared(CLIENT_LEN, true)?,
                ),
            };
            Ok((pt, published, client))
        };
        let (pt, published, client) = match build() {
            Ok(v) => v,
            Err(e) => {
                account.release(Quota::Domains, 1);
                return Err(e);
            }
        };
        let d = Domain::assemble(
            &unit,
            h.sid,
            h.did,
            h.strategy,
            h.flush,
            h.trust,
            pt,
            arena.clone(),
            published,
            client,
            account,
        );
        if !kept {
            d.page().init();
        }
        // The client (still mapping this page) reattaches on its next
        // operation, even one that needs no round trip.
        d.page().dead.store(iommu_abi::shared::DEAD_ADOPTED, SeqCst);
        d.publish(h.strategy, h.flush);
        // Epochs go on above every one the client was shown (the ledger's
        // is never below the page's), so its tags keep their meaning; the
        // page's `completed` stays until a flush of this iommud raises it.
        // The unmap records restart from what the client page holds now.
        let next = a.image.epoch.saturating_add(1);
        d.epoch.store(next, SeqCst);
        d.page().epoch.fetch_max(next, SeqCst);
        {
            let mut seen = d.unmaps_seen.lock().unwrap_or_else(|p| p.into_inner());
            let _ = take_unmaps(d.client().cpu.iter(), &mut seen);
        }
        match Ledger::open(a.ledger.clone()) {
            Ok(l) => {
                let _ = d.ledger.set(l);
            }
            Err(e) => {
                d.abandon_adoption();
                return Err(e.into());
            }
        }
        let live = match d.rebuild(a) {
            Ok(live) => live,
            Err(e) => {
                d.abandon_adoption();
                return Err(e);
            }
        };
        // A validated magazine's rings: the same memory, served on.
        if let Some((name, n)) = &a.image.rings {
            let adopted = usize::try_from(*n)
                .map_err(|_| reply(ErrorCode::Invalid, "ring count"))
                .and_then(|n| {
                    let shm = mem.adopt_shared(name, n * iommu_abi::ring::RING_BYTES, true)?;
                    d.adopt_rings(shm, n, &live).map(|_| ())
                });
            if let Err(e) = adopted {
                d.abandon_adoption();
                return Err(e);
            }
        }
        let root = d.lock_uncounted().pt.root();
        let rewritten = d.ledger.get().map(|l| l.write_header(&h, root));
        if let Some(Err(e)) = rewritten {
            d.abandon_adoption();
            return Err(e.into());
        }
        if let Err(e) = unit.set_context(h.sid, h.did, root) {
            d.abandon_adoption();
            return Err(e.into());
        }
        d.sync_tables(d.lock_uncounted().pt.counts().live);
        Ok(Arc::new(d))
    }

    /// The adoption's bookkeeping from the ledger: pools, delegated IOVAs,
    /// allocated maps, and the arena leaf tables they need installed.
    fn rebuild(&self, a: &Adoption) -> Result<Vec<(u64, u64)>, DomainError> {
        let bad = |m: String| reply(ErrorCode::Invalid, format!("{}: {m}", Bdf(self.sid)));
        let mut i = self.lock_uncounted();
        let first = usize::from(a.image.has_arena);
        let arena = i.arena.clone();
        let pools = a.regions.get(first..).unwrap_or_default();
        let records = a.image.regions.get(first..).unwrap_or_default();
        let pool_bytes: u64 = pools.iter().map(|r| r.len).sum();
        self.charge(Quota::PoolBytes, pool_bytes)?;
        let mut n = 0;
        {
            let mut regs = self.regions.write().unwrap_or_else(|p| p.into_inner());
            for (r, rec) in pools.iter().zip(records) {
                // A `static` pool is mapped whole again at the same IOVA.
                if rec.iova != 0 {
                    let pages = r.len.div_ceil(PAGE);
                    if i.strategy != Strategy::Static || !i.iova.reserve(rec.iova, pages * PAGE) {
                        return Err(bad(format!("static pool at {:#x}", rec.iova)));
                    }
                    i.pt.map(self.mem(), rec.iova, r.phys, pages, true, true)?;
                    n += 1;
                }
                i.pools.push(r.clone());
                regs.push(Registered {
                    phys: r.phys,
                    len: r.len,
                    iova: rec.iova,
                });
            }
        }
        let mut live = Vec::new();
        for &(page, e) in &a.image.pages {
            let iova = IOVA_BASE + page * PAGE;
            let bytes = match e {
                PageEntry::Delegated(c) if c < SIZE_CLASSES => class_pages(c) * PAGE,
                PageEntry::Live(p) if size_class(p).is_some() => {
                    size_class(p).map_or(0, class_pages) * PAGE
                }
                PageEntry::Mapped(p) if p > 0 && p * PAGE <= MAX_MAP_LEN.next_power_of_two() => {
                    p * PAGE
                }
                _ => return Err(bad(format!("ledger entry {e:?} at {iova:#x}"))),
            };
            if !i.iova.reserve(iova, bytes) {
                return Err(bad(format!("ledger allocations overlap at {iova:#x}")));
            }
            let Some(arena) = &arena else {
                return Err(bad(format!("an allocation at {iova:#x} without an arena")));
            };
            self.install_leaves(&mut i, arena, iova, bytes, false)?;
            match e {
                PageEntry::Delegated(c) => {
                    i.delegated.insert(iova, c);
                }
                PageEntry::Live(p) => {
                    // Held by the ring path (as its magazines' IOVAs are).
                    i.delegated.insert(iova, size_class(p).unwrap_or(0));
                    live.push((iova, p));
                }
                PageEntry::Mapped(alloc_pages) => {
                    // The map's pages are the present entries from its start.
                    let mut pages = 0;
                    let mut phys = 0;
                    while pages < alloc_pages {
                        let pte = vtd::entry::SlPte(
                            self.mem().read_u64(pte_of(arena, iova + pages * PAGE))?,
                        );
                        if !pte.present() {
                            break;
                        }
                        if pages == 0 {
                            phys = pte.addr();
                        }
                        pages += 1;
                    }
                    if pages == 0 {
                        return Err(bad(format!("allocated map at {iova:#x} has no entry")));
                    }
                    i.mapped.insert(
                        iova,
                        Mapped {
                            pages,
                            alloc_bytes: bytes,
                            phys,
                        },
                    );
                }
            }
            n += 1;
        }
        self.charge(Quota::Mappings, n)?;
        Ok(live)
    }

    /// A failed adoption: the new tables go; the regions stay (the device
    /// may still reach them through the old tables until the caller blocks
    /// it).
    fn abandon_adoption(&self) {
        self.dead.store(true, SeqCst);
        let mut i = self.lock_uncounted();
        let arena = i.arena.take();
        i.pools.clear();
        let pt = std::mem::replace(&mut i.pt, PageTable::placeholder());
        let owned = |p: u64| arena.as_ref().is_some_and(|a| a.contains(p, PAGE));
        let mem = self.unit.mem().clone();
        for t in pt.teardown(owned) {
            mem.free_frame(t);
        }
        drop(i);
        for q in [Quota::PoolBytes, Quota::PtPages, Quota::Mappings] {
            self.account
                .release(q, self.charged[q as usize].swap(0, SeqCst));
        }
        self.account.release(Quota::Domains, 1);
    }

    /// The owner is back (its token checked): one invalidation of the whole
    /// domain before it goes on, so every entry its driver cleared while no
    /// iommud ran (tagged with an epoch this iommud's flush now completes)
    /// is gone from the IOTLB. Its magazines stay its own (the ledger says
    /// which IOVAs it holds). Returns the domain's delegated IOVAs.
    pub fn resume(&self) -> Result<usize, DomainError> {
        self.flush()?;
        self.page().dead.store(0, SeqCst);
        Ok(self.lock_uncounted().delegated.len())
    }
}

/// The arena entry of `iova` (in the magazine range).
fn pte_of(arena: &Region, iova: u64) -> u64 {
    arena.phys + ((iova - IOVA_BASE) >> 12) * 8
}
