//! Invalidation epochs: flushes that start by advancing iommud's private
//! epoch and complete it when the wait descriptor lands, the timer and the
//! client's flush wishes, and the release of what waited for them.

use super::*;

impl Domain {
    /// Age of the oldest unmap not yet covered by a flush: the client's
    /// records (hostile: they can only make iommud flush this domain
    /// sooner) and iommud's own.
    pub(super) fn oldest_unmap_age(&self) -> Option<u64> {
        oldest_unmap_age(
            self.client()
                .cpu
                .iter()
                .chain(std::iter::once(&self.server_unmaps)),
            self.page().now(),
        )
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

    /// A client's `FlushSync`: a flush that completes epoch `upto` (the tag
    /// its unmaps wait for), or with 0 one that starts after this call.
    /// `upto` is hostile: bounded by iommud's own epoch, a lie can at most
    /// spare the flush the client itself waits for (it asks again) or ask
    /// for the one any `FlushSync` gets; nothing iommud releases waits on it.
    pub fn flush_to(&self, upto: u64) -> Result<(), DomainError> {
        let now = self.epoch();
        let since = if upto == 0 { now } else { upto.min(now) };
        let e = self.flush_since(since, self.unit.iotlb_domain(self.did))?;
        self.release_parked(e);
        Ok(())
    }

    /// Flushes if a client asked for an epoch not yet completed (after a
    /// one-way hint, or from the epoch timer).
    ///
    /// The client's `wanted` is a wish, read once and never trusted beyond
    /// iommud's own epoch: a client that writes a huge value, or moves it
    /// around, gets at most the one flush that completes the current epoch
    /// per hint or tick — the same as a client that really unmaps that fast.
    /// Read behind any flush in progress, so a hint and the timer that race
    /// for one wish make one invalidation, not two.
    pub fn flush_if_wanted(&self) -> Result<bool, DomainError> {
        let c = self.client();
        // Clear the hint flag *before* reading `wanted` (see iommu_abi::shared).
        c.hint_pending.store(0, SeqCst);
        let e = {
            let _g = self.flush_lock.lock().unwrap_or_else(|p| p.into_inner());
            let wanted = c
                .wanted
                .load(SeqCst)
                .min(self.epoch())
                .max(self.server_wanted.load(SeqCst));
            if self.completed() >= wanted {
                return Ok(false);
            }
            self.flush_epoch(self.unit.iotlb_domain(self.did))?
        };
        self.release_parked(e);
        Ok(true)
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

    pub(super) fn flush_with(&self, desc: vtd::desc::Descriptor) -> Result<(), DomainError> {
        // Read after the caller's changes: a flush that completes this
        // epoch advanced it later, so its invalidation covers them.
        let e = self.flush_since(self.epoch(), desc)?;
        self.release_parked(e);
        Ok(())
    }

    /// Runs `desc` as the invalidation that completes the current epoch,
    /// unless epoch `since` completed while this call waited behind another
    /// flush: that flush advanced the epoch past `since`, so after whatever
    /// the caller changed before reading `since`, and its invalidation
    /// covers those changes. Returns the completed epoch. Decided from
    /// iommud's own epochs only.
    pub(super) fn flush_since(
        &self,
        since: u64,
        desc: vtd::desc::Descriptor,
    ) -> Result<u64, DomainError> {
        let _g = self.flush_lock.lock().unwrap_or_else(|p| p.into_inner());
        let done = self.completed();
        if done >= since {
            return Ok(done);
        }
        self.flush_epoch(desc)
    }

    /// Runs `desc` as the invalidation that completes the current epoch
    /// (unmap records taken, stale windows measured); returns the epoch
    /// completed, whose parked work the caller releases. The caller holds
    /// `flush_lock`, or is the epoch timer finding it held (safe to run
    /// beside another flush: the records are taken under their own lock and
    /// the epochs are atomics; see `Domain::timer_flush`).
    pub(super) fn flush_epoch(&self, desc: vtd::desc::Descriptor) -> Result<u64, DomainError> {
        let p = self.page();
        // Take the unmap records before advancing the epoch (iommu_abi::shared).
        let (unmaps, prev_take) = {
            let mut seen = self.unmaps_seen.lock().unwrap_or_else(|p| p.into_inner());
            let at = p.now();
            let u = take_unmaps(
                self.client()
                    .cpu
                    .iter()
                    .chain(std::iter::once(&self.server_unmaps)),
                &mut seen,
            );
            (u, self.last_take.swap(at, SeqCst))
        };
        let e = self.epoch.fetch_add(1, SeqCst);
        // On record before the client can read it (a restarted iommud goes
        // on from there).
        self.note_epoch(e + 1);
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
                // A recorded time before the previous take belongs to an
                // unmap that flush already covered (its clear preceded the
                // take): the writer was preempted between reading the clock
                // and storing it. An unmap that flush did not cover reads
                // the clock after the epoch advance, so after that take;
                // clamping to it never shortens a real window.
                let oldest = oldest.max(prev_take);
                stats::max(&self.stats.stale_ns_max, now.saturating_sub(oldest));
            }
            stats::add(
                &self.stats.stale_ns_sum,
                count.saturating_mul(now).saturating_sub(sum),
            );
            stats::add(&self.stats.stale_count, count);
        }
        Ok(e)
    }

    pub(super) fn release_parked(&self, completed: u64) {
        let i = self.lock();
        self.release_locked(i, completed);
    }

    /// Releases what waited for `completed`, under the allocator lock `i`
    /// (and any release the timer owed, which `completed` covers).
    pub(super) fn release_locked(&self, mut i: MutexGuard<'_, Inner>, completed: u64) {
        let _ = self
            .release_owed
            .fetch_update(SeqCst, SeqCst, |o| (o <= completed).then_some(0));
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
        let live = i.pt.counts().live;
        self.sync_tables(live);
    }
}
