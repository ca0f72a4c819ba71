//! Translation (VT-d 3.x chapter 3): root and context lookup, the
//! second-level walk, the cached translation with the stale-hit oracle, and
//! the device-side DMA accesses built on it.

use super::*;

/// Result of one translation: the 4 KiB physical page and its permissions
/// (R bit 0, W bit 1; 0 = not present).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Leaf {
    page: u64,
    perms: u64,
}

impl Leaf {
    const NONE: Leaf = Leaf { page: 0, perms: 0 };
}

/// A translation error: fault reason and whether the context had FPD set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Fault {
    reason: u8,
    fpd: bool,
}

pub(super) type Xlate = Result<Leaf, Fault>;

/// True when two translation outcomes give the device the same access.
pub(super) fn same_outcome(a: &Xlate, b: &Xlate) -> bool {
    let norm = |x: &Xlate| match x {
        Ok(l) if l.perms != 0 => *l,
        _ => Leaf::NONE,
    };
    norm(a) == norm(b)
}

impl SimMachine {
    // ----- translation -----

    /// Read root and context entries from memory (no caching).
    pub(super) fn read_context(&self, sid: u16) -> Result<ContextEntry, u8> {
        let root = self.hdr().root.load(Relaxed);
        let rt_len = (ENTRIES_PER_TABLE * ROOT_ENTRY_BYTES) as u64;
        if self.check(root, rt_len as usize, 4096).is_err() {
            return Err(fault_reason::ROOT_TABLE_INVALID);
        }
        let ra = root + (root_index(sid) * ROOT_ENTRY_BYTES) as u64;
        let re = match (self.read_u64(ra), self.read_u64(ra + 8)) {
            (Ok(lo), Ok(hi)) => RootEntry::from_qwords(lo, hi),
            _ => return Err(fault_reason::ROOT_TABLE_INVALID),
        };
        if !re.present() {
            return Err(fault_reason::ROOT_NOT_PRESENT);
        }
        let ca = re.ctp() + (context_index(sid) * CONTEXT_ENTRY_BYTES) as u64;
        let ce = match (self.read_u64(ca), self.read_u64(ca + 8)) {
            (Ok(lo), Ok(hi)) => ContextEntry::from_qwords(lo, hi),
            _ => return Err(fault_reason::CONTEXT_TABLE_INVALID),
        };
        if !ce.present() {
            return Err(fault_reason::CONTEXT_NOT_PRESENT);
        }
        Ok(ce)
    }

    /// Context lookup through the context cache. Returns the entry (or
    /// fault reason) and whether the cache answered.
    pub(super) fn context(&self, sid: u16) -> (Result<ContextEntry, u8>, bool) {
        let s = self.ctx_slot(sid);
        match s.state.load(Relaxed) {
            1 => {
                self.bump(Ctr::ctx_hits);
                let ce = ContextEntry::from_qwords(s.lo.load(Relaxed), s.hi.load(Relaxed));
                return (Ok(ce), true);
            }
            2 => {
                self.bump(Ctr::ctx_hits);
                return (Err(s.lo.load(Relaxed) as u8), true);
            }
            _ => {}
        }
        let r = self.read_context(sid);
        match r {
            Ok(ce) => {
                s.lo.store(ce.lo(), Relaxed);
                s.hi.store(ce.hi(), Relaxed);
                s.state.store(1, Relaxed);
            }
            Err(reason) if self.hdr().caching_mode.load(Relaxed) != 0 => {
                s.lo.store(u64::from(reason), Relaxed);
                s.state.store(2, Relaxed);
            }
            Err(_) => {}
        }
        (r, false)
    }

    /// Check a context entry and the iova against it; on success returns
    /// `None` for pass-through or `Some(levels)`.
    pub(super) fn context_mode(&self, ce: ContextEntry, iova: u64) -> Result<Option<u8>, Fault> {
        let fault = |reason| Fault {
            reason,
            fpd: ce.fpd(),
        };
        let aw = ce.aw().ok_or(fault(fault_reason::CONTEXT_INVALID))?;
        if aw.bits() > self.hdr().aw_bits.load(Relaxed) as u8 {
            return Err(fault(fault_reason::CONTEXT_INVALID));
        }
        match ce.tt() {
            TranslationType::PassThrough => Ok(None),
            TranslationType::Translate | TranslationType::TranslateDevTlb => {
                if iova >> aw.bits() != 0 {
                    return Err(fault(fault_reason::ADDR_BEYOND_AW));
                }
                Ok(Some(aw.levels()))
            }
            TranslationType::Reserved => Err(fault(fault_reason::CONTEXT_INVALID)),
        }
    }

    /// §3.7 second-level walk from `ce`'s SLPTPTR. With `cache`, starts
    /// from (and fills) the paging-structure cache; returns whether it
    /// started from a cached entry.
    pub(super) fn walk(
        &self,
        ce: ContextEntry,
        levels: u8,
        iova: u64,
        cache: bool,
    ) -> (Xlate, bool) {
        let fault = |reason| Fault {
            reason,
            fpd: ce.fpd(),
        };
        let did = ce.did();
        let ps_key = cache_key(did, iova >> 21);
        let read_pte = |table: u64, level: u8| {
            self.read_u64(table + (level_index(iova, level) * PTE_BYTES) as u64)
                .map(SlPte)
                .map_err(|_| fault(fault_reason::NEXT_TABLE_INVALID))
        };
        let rw = SlPte::R | SlPte::W;
        if cache {
            if let Some(leaf_table) = self.ps_cache().lookup(ps_key) {
                self.bump(Ctr::ps_hits);
                let r = read_pte(leaf_table, 1).map(|p| Leaf {
                    page: p.addr(),
                    perms: p.0 & rw,
                });
                return (r, true);
            }
        }
        let sllps = regs::Cap(self.reg(regs::CAP)).sllps();
        let mut perms = rw;
        let mut table = ce.slptptr();
        for level in (1..=levels).rev() {
            let pte = match read_pte(table, level) {
                Ok(p) => p,
                Err(f) => return (Err(f), false),
            };
            if !pte.present() {
                return (Ok(Leaf::NONE), false);
            }
            // §3.7.1: permissions are the AND of all levels.
            perms &= pte.0 & rw;
            if level == 1 {
                return (
                    Ok(Leaf {
                        page: pte.addr(),
                        perms,
                    }),
                    false,
                );
            }
            if pte.sp() {
                // §9.8: SP is valid at level 2 (2 MiB, SLLPS bit 0) and
                // level 3 (1 GiB, SLLPS bit 1); elsewhere it is reserved.
                let ok = (level == 2 && sllps & 1 != 0) || (level == 3 && sllps & 2 != 0);
                if !ok {
                    return (Err(fault(0xC)), false);
                }
                let size = level_size(level);
                let page = (pte.addr() & !(size - 1)) | (iova & (size - 1) & !0xFFF);
                return (Ok(Leaf { page, perms }), false);
            }
            if level == 2 && cache && self.ps_cache().insert(ps_key, pte.addr()) {
                self.bump(Ctr::iotlb_wipes);
            }
            table = pte.addr();
        }
        (Ok(Leaf::NONE), false)
    }

    /// Translate one page with no cache use at all (the truth in memory).
    pub(super) fn translate_real(&self, sid: u16, iova: u64) -> Xlate {
        if !self.gsts().contains(Gsts::TES) {
            return Ok(Leaf {
                page: iova & !0xFFF,
                perms: SlPte::R | SlPte::W,
            });
        }
        let ce = self
            .read_context(sid)
            .map_err(|reason| Fault { reason, fpd: false })?;
        match self.context_mode(ce, iova)? {
            None => Ok(Leaf {
                page: iova & !0xFFF,
                perms: SlPte::R | SlPte::W,
            }),
            Some(levels) => self.walk(ce, levels, iova, false).0,
        }
    }

    /// Translate one page as the hardware would, through the caches.
    pub(super) fn translate_cached(&self, sid: u16, iova: u64) -> Xlate {
        if !self.gsts().contains(Gsts::TES) {
            return self.translate_real(sid, iova);
        }
        let (ctx, mut used_cache) = self.context(sid);
        let result = (|| {
            let ce = ctx.map_err(|reason| Fault { reason, fpd: false })?;
            let Some(levels) = self.context_mode(ce, iova)? else {
                return Ok(Leaf {
                    page: iova & !0xFFF,
                    perms: SlPte::R | SlPte::W,
                });
            };
            let key = cache_key(ce.did(), iova >> 12);
            let iotlb = self.iotlb();
            if let Some(v) = iotlb.lookup(key) {
                self.bump(Ctr::iotlb_hits);
                used_cache = true;
                return Ok(Leaf {
                    page: v & !0xFFF,
                    perms: v & (SlPte::R | SlPte::W),
                });
            }
            self.bump(Ctr::iotlb_misses);
            self.bump(Ctr::walks);
            let (r, from_ps) = self.walk(ce, levels, iova, true);
            used_cache |= from_ps;
            if let Ok(leaf) = r {
                let cm = self.hdr().caching_mode.load(Relaxed) != 0;
                if (leaf.perms != 0 || cm) && iotlb.insert(key, leaf.page | leaf.perms) {
                    self.bump(Ctr::iotlb_wipes);
                }
            }
            r
        })();
        if used_cache && !same_outcome(&result, &self.translate_real(sid, iova)) {
            self.bump(Ctr::stale_hits);
        }
        result
    }

    /// Translate one page for a device access; records a fault on failure.
    pub(super) fn translate_for_dma(
        &self,
        sid: u16,
        iova: u64,
        write: bool,
    ) -> Result<u64, DmaFault> {
        let _g = SpinLock::lock(&self.hdr().lock);
        let r = self.translate_cached(sid, iova);
        let need = if write { SlPte::W } else { SlPte::R };
        let reason = match r {
            Ok(leaf) if leaf.perms & need != 0 => return Ok(leaf.page | (iova & 0xFFF)),
            // §7.1.3 / Appendix A: an entry lacking the needed permission
            // (including a not-present one) gives reason 5 (write) / 6 (read).
            // §7.2.1: FPD in the context entry suppresses the recording of
            // every fault of requests translated through it, leaf-level ones
            // included. (The model reads FPD from the context entry in
            // memory; after the invalidation iommud always issues, the
            // cached entry and the table agree.)
            Ok(_) => Fault {
                reason: if write {
                    fault_reason::WRITE
                } else {
                    fault_reason::READ
                },
                fpd: self.read_context(sid).is_ok_and(|ce| ce.fpd()),
            },
            Err(f) => f,
        };
        if !reason.fpd {
            self.record_fault(sid, iova & !0xFFF, reason.reason, write);
        }
        Err(DmaFault::Translation {
            sid,
            iova,
            reason: reason.reason,
            write,
        })
    }

    pub(super) fn dma(
        &self,
        sid: u16,
        iova: u64,
        len: usize,
        write: bool,
        mut copy: impl FnMut(u64, std::ops::Range<usize>) -> Result<(), MemError>,
    ) -> Result<(), DmaFault> {
        let mut done = 0usize;
        while done < len {
            let a = iova.wrapping_add(done as u64);
            let chunk = (4096 - (a & 0xFFF) as usize).min(len - done);
            let phys = self.translate_for_dma(sid, a, write)?;
            copy(phys, done..done + chunk).map_err(|_| DmaFault::Bus { phys })?;
            done += chunk;
        }
        Ok(())
    }

    /// Device-side read of `buf.len()` bytes at `iova` by requester `sid`.
    /// Each page is translated separately; a fault aborts the access (bytes
    /// of earlier pages are already copied).
    pub fn dma_read(&self, sid: u16, iova: u64, buf: &mut [u8]) -> Result<(), DmaFault> {
        let len = buf.len();
        self.dma(sid, iova, len, false, |phys, r| {
            self.read_bytes(phys, &mut buf[r])
        })
    }

    /// Device-side write of `data` at `iova` by requester `sid`.
    pub fn dma_write(&self, sid: u16, iova: u64, data: &[u8]) -> Result<(), DmaFault> {
        self.dma(sid, iova, data.len(), true, |phys, r| {
            self.write_bytes(phys, &data[r])
        })
    }

    /// Translate `iova` for `sid` from the tables in memory, ignoring and
    /// not filling any cache. `Err` holds a root/context-level fault reason;
    /// a not-present leaf gives `Ok` with neither permission.
    pub fn translate_uncached(&self, sid: u16, iova: u64) -> Result<Translation, u8> {
        let _g = SpinLock::lock(&self.hdr().lock);
        let leaf = self.translate_real(sid, iova).map_err(|f| f.reason)?;
        Ok(Translation {
            phys: leaf.page | (iova & 0xFFF),
            read: leaf.perms & SlPte::R != 0,
            write: leaf.perms & SlPte::W != 0,
        })
    }
}
