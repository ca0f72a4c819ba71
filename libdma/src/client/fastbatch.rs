//! Batches on the delegated fast path: one slot lock, one cache write-back
//! fence and (with `strict`) one wait for one invalidation per batch, where
//! [`DmaDomain::map`] and [`DmaDomain::unmap`] pay each of them per buffer
//! (docs/ARCHITECTURE.md, "Batches").

use super::*;

/// One buffer of a batch, in pages: its page-aligned start, its size class.
#[derive(Clone, Copy)]
struct Span {
    base: u64,
    off: u64,
    pages: u64,
    class: usize,
}

/// The spans of `(addr, len)` pairs, or `None` if one has no size class (a
/// buffer over the largest class is iommud's to map: the per-buffer path).
fn spans(bufs: impl Iterator<Item = (u64, usize)>) -> Result<Option<Vec<Span>>> {
    let mut out = Vec::with_capacity(bufs.size_hint().0);
    for (addr, len) in bufs {
        if len == 0 {
            return Err(Error::Invalid("zero-length map or unmap".into()));
        }
        let off = addr % PAGE;
        let Some(pages) = off.checked_add(len as u64).map(|e| e.div_ceil(PAGE)) else {
            return Err(Error::Invalid(format!("{addr:#x}+{len:#x} overflows")));
        };
        let Some(class) = size_class(pages) else {
            return Ok(None);
        };
        out.push(Span {
            base: addr - off,
            off,
            pages,
            class,
        });
    }
    Ok(Some(out))
}

/// What [`DmaDomain::unmap_batch_submit`] leaves to wait for.
#[derive(Debug)]
pub(super) enum UnmapWait {
    /// Nothing: done, or not waited for under this flush policy.
    Done,
    /// The fast path's `strict`: the invalidation of this epoch.
    Epoch(u64),
    /// On ring `ring`: `n` completions from sequence `first`.
    Ring { ring: usize, first: u32, n: u32 },
}

/// Unmaps submitted with [`DmaDomain::unmap_batch_submit`], to be completed
/// with [`DmaDomain::unmap_batch_complete`].
#[derive(Debug)]
#[must_use = "complete the unmaps with unmap_batch_complete"]
pub struct UnmapTicket {
    pub(super) wait: UnmapWait,
}

impl DmaDomain {
    /// [`DmaDomain::map_batch`] of the delegated magazine strategy: the
    /// IOVAs are taken under one slot lock, the entries written with one
    /// fence for their write-backs and, in caching mode, one invalidation.
    pub(super) fn fast_map_batch(
        &self,
        arena: &Mapping,
        bufs: &[(u64, usize, Dir)],
    ) -> Result<Vec<u64>> {
        let Some(spans) = spans(bufs.iter().map(|&(p, l, _)| (p, l)))? else {
            return self.map_each(bufs);
        };
        if self.page().dead.load(Relaxed) != 0 {
            self.reattach_if_adopted()?;
        }
        let slot = self.slot();
        let mut iovas = Vec::with_capacity(spans.len());
        {
            let mut c = self.cpus[slot].lock();
            let (mut hits, mut recycled, mut missed) = (0, 0, false);
            for s in &spans {
                match c.alloc(s.class, &Remote(self)) {
                    Ok((iova, ev)) => {
                        iovas.push(iova);
                        hits += u64::from(ev.hit);
                        recycled += u64::from(ev.recycled);
                        missed |= !ev.hit;
                    }
                    Err(_) => {
                        // Dry (or worse): give back what this batch took
                        // (never written: the current epoch covers it) and
                        // let the per-buffer path drain the caches and retry,
                        // or report the error.
                        let tag = self.page().epoch.load(SeqCst);
                        for (s, &iova) in spans.iter().zip(&iovas) {
                            c.free(s.class, iova, tag, &Remote(self));
                        }
                        drop(c);
                        return self.map_each(bufs);
                    }
                }
            }
            if missed {
                c.enforce_age(&Remote(self));
            }
            let k = &self.client().cpu[slot];
            bump_by(&k.maps, spans.len() as u64);
            bump_by(&k.mag_hits, hits);
            bump_by(&k.batches_recycled, recycled);
        }
        let mut written = 0;
        let mut failed = None;
        for ((s, &iova), &(_, _, dir)) in spans.iter().zip(&iovas).zip(bufs) {
            if let Err(e) = self.write_ptes_unfenced(arena, iova, s.base, s.pages, Some(dir)) {
                failed = Some(e);
                break;
            }
            written += 1;
        }
        if let Some(e) = failed {
            // Cannot happen with IOVAs from this domain's magazines (they are
            // all inside the arena); clear what was written and give it all back.
            for (s, &iova) in spans.iter().zip(&iovas).take(written) {
                let _ = self.write_ptes_unfenced(arena, iova, 0, s.pages, None);
            }
            self.complete_write_backs();
            let tag = Remote(self).seal();
            let mut c = self.cpus[slot].lock();
            for (s, &iova) in spans.iter().zip(&iovas) {
                c.free(s.class, iova, tag, &Remote(self));
            }
            return Err(e);
        }
        self.complete_write_backs();
        let out: Vec<u64> = spans.iter().zip(&iovas).map(|(s, &i)| i + s.off).collect();
        if self.caching_mode() && !out.is_empty() {
            // CAP.CM: one invalidation makes the whole batch's new entries usable.
            if let Err(e) = self.call(&Request::FlushSync { upto: 0 }) {
                let maps: Vec<(u64, usize)> =
                    out.iter().zip(bufs).map(|(&i, b)| (i, b.1)).collect();
                let _ = self.fast_unmap_batch(arena, &maps, true);
                return Err(e);
            }
        }
        Ok(out)
    }

    /// [`DmaDomain::map_batch`] one buffer at a time (a buffer too large for
    /// the magazines, or a dry cache: [`DmaDomain::map`] handles both).
    fn map_each(&self, bufs: &[(u64, usize, Dir)]) -> Result<Vec<u64>> {
        let mut out = Vec::with_capacity(bufs.len());
        let undo = |out: &[u64]| {
            for (iova, &(_, len, _)) in out.iter().zip(bufs) {
                let _ = self.unmap(*iova, len);
            }
        };
        for &(phys, len, dir) in bufs {
            match self.map_one(phys, len, dir, false) {
                Ok(iova) => out.push(iova),
                Err(e) => {
                    undo(&out);
                    return Err(e);
                }
            }
        }
        if self.caching_mode() && !out.is_empty() {
            if let Err(e) = self.call(&Request::FlushSync { upto: 0 }) {
                undo(&out);
                return Err(e);
            }
        }
        Ok(out)
    }

    /// [`DmaDomain::unmap_batch`] of the delegated magazine strategy: the
    /// entries cleared under one slot lock, one write-back fence, one epoch
    /// tag for the batch and, with `strict`, one wait for the invalidation
    /// covering all of it (none if `wait` is false: the tag is returned, and
    /// its flush requested, for [`DmaDomain::unmap_batch_complete`]).
    /// Stops at the first mapping that is not there (the earlier ones stay
    /// unmapped), like a loop of [`DmaDomain::unmap`].
    pub(super) fn fast_unmap_batch(
        &self,
        arena: &Mapping,
        maps: &[(u64, usize)],
        wait: bool,
    ) -> Result<Option<u64>> {
        let spans = match spans(maps.iter().copied())? {
            Some(s) if s.iter().all(|s| s.base >= MAGAZINE_IOVA_BASE) => s,
            _ => {
                maps.iter().try_for_each(|&(i, l)| self.unmap(i, l))?;
                return Ok(None);
            }
        };
        if spans.is_empty() {
            return Ok(None);
        }
        let slot = self.slot();
        let flush = self.flush_policy();
        let mut cleared = 0;
        let mut failed = None;
        let (first, tag) = {
            let mut c = self.cpus[slot].lock();
            let k = &self.client().cpu[slot];
            // On record before the clears (see `DmaDomain::unmap`).
            let first = k.note_unmap_start(self.page());
            for s in &spans {
                if let Err(e) = self.write_ptes_unfenced(arena, s.base, 0, s.pages, None) {
                    failed = Some(e);
                    break;
                }
                cleared += 1;
            }
            self.complete_write_backs();
            // One tag for the batch, read after all its clears (percore tags
            // the magazine batch when it seals it, as `unmap` does).
            let tag = if flush == FlushPolicy::PerCore {
                0
            } else {
                Remote(self).seal()
            };
            for _ in 0..cleared {
                k.note_unmap(self.page());
            }
            bump_by(&k.unmaps, cleared as u64);
            if flush != FlushPolicy::Deferred {
                for s in &spans[..cleared] {
                    c.free(s.class, s.base, tag, &Remote(self));
                }
            }
            c.enforce_age_at(&Remote(self), k.unmap_last.load(Relaxed));
            (first, tag)
        };
        if first && {
            std::sync::atomic::fence(SeqCst);
            self.page().timer_idle.load(Relaxed) != 0
        } {
            Remote(self).wake_timer();
        }
        if flush == FlushPolicy::Deferred {
            for s in &spans[..cleared] {
                self.defer(slot, s.class, s.base, tag);
            }
        }
        let mut pending = None;
        if flush == FlushPolicy::Strict && cleared > 0 {
            if wait {
                Remote(self).wait_completed(tag)?;
            } else {
                Remote(self).request_flush(tag);
                pending = Some(tag);
            }
        }
        match failed {
            Some(e) => {
                if let Some(t) = pending {
                    Remote(self).wait_completed(t)?;
                }
                Err(e)
            }
            None => Ok(pending),
        }
    }

    /// Starts [`DmaDomain::unmap_batch`] without waiting for what `strict`
    /// waits for (the invalidation covering the batch); the entries are
    /// cleared (delegated trust) or submitted (rings) before it returns.
    /// [`DmaDomain::unmap_batch_complete`] waits. Meanwhile the driver may
    /// read what it copies out of the buffers, but must not hand their
    /// memory to anything else (it may map it again for the same device).
    pub fn unmap_batch_submit(&self, maps: &[(u64, usize)]) -> Result<UnmapTicket> {
        let strict = self.flush_policy() == FlushPolicy::Strict;
        let wait = match self.strategy() {
            Strategy::NoIommu | Strategy::Static => UnmapWait::Done,
            _ if maps.is_empty() => UnmapWait::Done,
            _ if self.rings.is_some() => self.ring_unmap_submit(maps, strict)?,
            Strategy::Magazine if self.arena.is_some() => {
                let arena = self.arena.as_ref().ok_or(Error::Dead)?;
                match self.fast_unmap_batch(arena, maps, false)? {
                    Some(tag) => UnmapWait::Epoch(tag),
                    None => UnmapWait::Done,
                }
            }
            _ => {
                self.unmap_batch(maps)?;
                UnmapWait::Done
            }
        };
        Ok(UnmapTicket { wait })
    }

    /// True if [`DmaDomain::unmap_batch_complete`] would return `t` without
    /// waiting: nothing to wait for, the invalidation covering the batch
    /// has completed, or the ring's completions are posted. Never blocks: a
    /// driver that hands the buffers back to the same device only can
    /// poll this and complete the ticket when it is ready.
    pub fn unmap_batch_ready(&self, t: &UnmapTicket) -> bool {
        match t.wait {
            UnmapWait::Done => true,
            UnmapWait::Epoch(tag) => self.page().completed.load(SeqCst) >= tag,
            UnmapWait::Ring { ring, first, n } => self.ring_posted(ring, first, n),
        }
    }

    /// Waits for an [`DmaDomain::unmap_batch_submit`]: with `strict`, until
    /// the invalidation covering the batch has completed; on the rings, for
    /// every entry's completion (the first refusal is the error).
    pub fn unmap_batch_complete(&self, t: UnmapTicket) -> Result<()> {
        match t.wait {
            UnmapWait::Done => Ok(()),
            UnmapWait::Epoch(tag) => Remote(self).wait_completed(tag),
            UnmapWait::Ring { ring, first, n } => {
                let results = self.ring_collect(ring, first, n)?;
                match results.iter().enumerate().find(|(_, r)| r.is_err()) {
                    Some((k, Err(code))) => Err(Error::Server {
                        code: *code,
                        msg: format!("ring unmap entry {k} refused"),
                    }),
                    _ => Ok(()),
                }
            }
        }
    }
}
