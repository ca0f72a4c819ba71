//! The fast path: map and unmap on the current CPU's magazines, writing
//! and clearing leaf entries in the arena (delegated trust), or one request
//! per map and unmap (validated trust); deferred unmaps and their epochs.

use super::*;

/// The CPU the calling thread runs on (`None` where the platform cannot
/// say).
pub(super) fn current_cpu() -> Option<usize> {
    // SAFETY: sched_getcpu has no preconditions.
    #[cfg(not(target_os = "redox"))]
    let cpu = unsafe { libc::sched_getcpu() };
    #[cfg(target_os = "redox")]
    let cpu = -1;
    usize::try_from(cpu).ok()
}

impl DmaDomain {
    pub(super) fn slot(&self) -> usize {
        // relibc has no sched_getcpu (libc 0.2.191's redox module): every
        // thread uses slot 0, so threads on several CPUs share its lock.
        current_cpu().unwrap_or(0) % self.cpus.len()
    }

    pub(super) fn pte_offset(&self, iova: u64) -> Result<usize> {
        let rel = iova
            .checked_sub(MAGAZINE_IOVA_BASE)
            .ok_or_else(|| Error::Invalid(format!("iova {iova:#x} below the magazine range")))?;
        Ok(((rel >> 12) * 8) as usize)
    }

    pub(super) fn write_ptes(
        &self,
        arena: &Mapping,
        iova: u64,
        phys: u64,
        pages: u64,
        dir: Option<Dir>,
    ) -> Result<()> {
        self.write_ptes_unfenced(arena, iova, phys, pages, dir)?;
        self.complete_write_backs();
        Ok(())
    }

    /// Completes the entry write-backs issued so far (one fence), on a
    /// unit whose table walks do not snoop the caches (ECAP.C = 0).
    pub(super) fn complete_write_backs(&self) {
        if self.flags & FLAG_COHERENT == 0 {
            write_back_fence();
        }
    }

    /// [`DmaDomain::write_ptes`] without the fence that completes the
    /// write-backs: a batch writes all its entries, then fences once.
    pub(super) fn write_ptes_unfenced(
        &self,
        arena: &Mapping,
        iova: u64,
        phys: u64,
        pages: u64,
        dir: Option<Dir>,
    ) -> Result<()> {
        let first = self.pte_offset(iova)?;
        for p in 0..pages as usize {
            let at = first + 8 * p;
            let v = match dir {
                // VT-d 3.x §9.8: second-level leaf: address 51:12, W bit 1, R bit 0.
                Some(d) => vtd::entry::SlPte::new(phys + p as u64 * PAGE, d.read(), d.write()).0,
                None => {
                    let old = arena.read_u64(at).ok_or_else(|| {
                        Error::Invalid(format!("iova {iova:#x} outside the arena"))
                    })?;
                    if !vtd::entry::SlPte(old).present() {
                        return Err(Error::Invalid(format!(
                            "iova {:#x} is not mapped",
                            iova + p as u64 * PAGE
                        )));
                    }
                    0
                }
            };
            arena
                .write_u64(at, v)
                .ok_or_else(|| Error::Invalid(format!("iova {iova:#x} outside the arena")))?;
        }
        if self.flags & FLAG_COHERENT == 0 {
            // SAFETY: `first` and the entries after it are inside the arena (written above).
            write_back_lines(unsafe { arena.as_ptr().add(first) }, pages as usize * 8);
        }
        Ok(())
    }

    /// Maps `len` bytes at physical `phys` for the device; returns the IOVA of
    /// `phys`. With the magazine strategy this makes no IPC (except a rare
    /// depot exchange, or one round trip per map in caching mode).
    pub fn map(&self, phys: u64, len: usize, dir: Dir) -> Result<u64> {
        self.map_one(phys, len, dir, true)
    }

    /// [`DmaDomain::map`]; `sync` = false leaves the caching-mode
    /// invalidation to the caller (a batch needs only one).
    pub(super) fn map_one(&self, phys: u64, len: usize, dir: Dir, sync: bool) -> Result<u64> {
        if len == 0 {
            return Err(Error::Invalid("zero-length map".into()));
        }
        // iommud detached the domain (a stop, or it blocked the device): the
        // entries would reach no device; say so instead of mapping.
        if self.page().dead.load(Relaxed) != 0 {
            // A restarted iommud holds the domain: reattach, then go on.
            self.reattach_if_adopted()?;
        }
        match self.strategy() {
            Strategy::NoIommu => return Ok(phys),
            Strategy::Static => return self.static_map(phys, len),
            _ if self.rings.is_some() => {
                return self.ring_map(&[(phys, len, dir)])?.pop().ok_or(Error::Dead);
            }
            _ => {}
        }
        let off = phys % PAGE;
        let pages = (off + len as u64).div_ceil(PAGE);
        match (self.strategy(), size_class(pages), &self.arena) {
            (Strategy::NoIommu, _, _) => Ok(phys),
            (Strategy::Magazine, Some(class), Some(arena)) => {
                let slot = self.slot();
                let iova = {
                    let mut c = self.cpus[slot].lock();
                    let (iova, ev) = match c.alloc(class, &Remote(self)) {
                        Err(Error::Server {
                            code: ErrorCode::NoSpace,
                            ..
                        }) => {
                            // The depot is dry and this CPU holds nothing it
                            // could recycle: the IOVAs are in other CPUs'
                            // caches or the deferred queue. As Linux does when
                            // its IOVA caches run dry, give every cache back to
                            // the depot (after their invalidations) and retry once.
                            drop(c);
                            self.drain()?;
                            c = self.cpus[slot].lock();
                            c.alloc(class, &Remote(self))?
                        }
                        r => r?,
                    };
                    // The client-side bound on the stale window (magazine.rs):
                    // on every unmap, and on a map that left the fast path
                    // (a clock read per operation costs a quarter of a
                    // map/unmap pair here).
                    if !ev.hit {
                        c.enforce_age(&Remote(self));
                    }
                    // Counted under the slot lock, the slot's only writer.
                    let k = &self.client().cpu[slot];
                    bump(&k.maps);
                    if ev.hit {
                        bump(&k.mag_hits); // misses = maps - hits
                    }
                    if ev.recycled {
                        bump(&k.batches_recycled);
                    }
                    iova
                };
                if let Err(e) = self.write_ptes(arena, iova, phys - off, pages, Some(dir)) {
                    let tag = self.page().epoch.load(SeqCst);
                    self.cpus[slot].lock().free(class, iova, tag, &Remote(self));
                    return Err(e);
                }
                if sync && self.caching_mode() {
                    // CAP.CM: a non-present → present change must be invalidated
                    // before the device may use it.
                    self.call(&Request::FlushSync { upto: 0 })?;
                }
                Ok(iova + off)
            }
            // Validated trust: iommud checks the frames and writes the entries
            // (global, identity, va, and magazine mappings over 32 pages).
            (strategy, _, _) => {
                let va = self.va_hint(strategy, phys)?;
                let a = self.call(&Request::Map {
                    phys,
                    len: len as u64,
                    dir,
                    va,
                })?;
                Ok(a[0])
            }
        }
    }

    /// The IOVA the `va` strategy wants for `phys` (its address here), 0 for the others.
    pub(super) fn va_hint(&self, strategy: Strategy, phys: u64) -> Result<u64> {
        match strategy {
            Strategy::Va => self.va_of(phys).ok_or_else(|| {
                Error::Invalid(format!(
                    "{phys:#x} is not in this domain's pools (the va strategy needs its address)"
                ))
            }),
            _ => Ok(0),
        }
    }

    /// Unmaps what [`DmaDomain::map`] returned (same `len`).
    pub fn unmap(&self, iova: u64, len: usize) -> Result<()> {
        if len == 0 {
            return Err(Error::Invalid("zero-length unmap".into()));
        }
        match self.strategy() {
            Strategy::NoIommu | Strategy::Static => return Ok(()),
            _ if self.rings.is_some() => return self.ring_unmap(&[(iova, len)]),
            _ => {}
        }
        let off = iova % PAGE;
        let pages = (off + len as u64).div_ceil(PAGE);
        let base = iova - off;
        let in_arena = base >= MAGAZINE_IOVA_BASE;
        match (self.strategy(), size_class(pages), &self.arena) {
            (Strategy::NoIommu, _, _) => Ok(()),
            (Strategy::Magazine, Some(class), Some(arena)) if in_arena => {
                let slot = self.slot();
                // Recorded under the slot lock, the slot's only writer.
                let mut c = self.cpus[slot].lock();
                let k = &self.client().cpu[slot];
                // On record before the clear, so that iommud's timer bounds
                // the window even if this thread is preempted before
                // `note_unmap` (iommu_abi::shared).
                let first = k.note_unmap_start(self.page());
                self.write_ptes(arena, base, 0, pages, None)?;
                let flush = self.flush_policy();
                // The tag is the epoch read after the clear (crate::shared),
                // so the clear must be ordered before that read. With percore
                // the batch is tagged once when it is sealed (one fence for
                // MAG_SIZE unmaps, see `Backend::seal`); the others tag each unmap.
                let tag = if flush == FlushPolicy::PerCore {
                    0
                } else {
                    std::sync::atomic::fence(SeqCst);
                    self.page().epoch.load(SeqCst)
                };
                k.note_unmap(self.page());
                bump(&k.unmaps);
                if flush != FlushPolicy::Deferred {
                    c.free(class, base, tag, &Remote(self));
                }
                c.enforce_age_at(&Remote(self), k.unmap_last.load(Relaxed));
                drop(c);
                // The record is stored before the flag is read; iommud stores
                // the flag before it reads the records (both fenced), so one
                // of the two sees the other (iommud::timer).
                if first && {
                    std::sync::atomic::fence(SeqCst);
                    self.page().timer_idle.load(Relaxed) != 0
                } {
                    // iommud's timer looks only every 20 ms: tell it (one-way).
                    Remote(self).wake_timer();
                }
                if flush == FlushPolicy::Deferred {
                    self.defer(slot, class, base, tag);
                }
                if flush == FlushPolicy::Strict {
                    Remote(self).wait_completed(tag)?;
                }
                Ok(())
            }
            _ => {
                self.call(&Request::Unmap {
                    iova,
                    len: len as u64,
                })?;
                Ok(())
            }
        }
    }

    /// Deferred policy: queue the IOVA in the domain-wide flush queue. A
    /// queue that an invalidation already covers, or one that is full or
    /// 10 ms old, is closed into this CPU's pending batches; a full or old
    /// one also asks iommud (one-way) to flush now.
    pub(super) fn defer(&self, slot: usize, class: usize, iova: u64, tag: u64) {
        let completed = self.page().completed.load(SeqCst);
        let now = self.page().now();
        let mut closed = Vec::new();
        let mut want = None;
        {
            let mut q = self.flush_queue.lock().unwrap_or_else(|p| p.into_inner());
            if !q.is_empty() && completed >= q.tag() {
                closed = q.close();
            }
            if q.push(class, iova, tag, now) {
                want = Some(q.tag());
                closed.extend(q.close());
            }
        }
        if let Some(t) = want {
            Remote(self).request_flush(t);
        }
        if !closed.is_empty() {
            let mut c = self.cpus[slot].lock();
            for (class, d) in closed {
                c.adopt(class, d);
            }
        }
    }
}
