//! Maps and unmaps with allocated IOVAs (the `global` strategy, and
//! `magazine` maps too large for a magazine): the locked range allocator,
//! the leaf tables of the magazine arena, and the unmap entry point.

use super::*;

impl Domain {
    /// Makes sure the arena leaf tables for `[iova, iova+bytes)` are installed
    /// (magazine domains only; others allocate their own leaf tables).
    pub(super) fn ensure_leaves(
        &self,
        i: &mut Inner,
        iova: u64,
        bytes: u64,
    ) -> Result<(), DomainError> {
        let Some(arena) = i.arena.clone().filter(|_| i.strategy == Strategy::Magazine) else {
            return Ok(());
        };
        self.install_leaves(i, &arena, iova, bytes, true)
    }

    /// Installs the arena leaf tables covering `[iova, iova+bytes)` that are
    /// not installed yet. `fresh`: each is zeroed first (the client could
    /// write the arena while it was not installed); an adoption keeps them
    /// as they are (their entries are the device's live mappings).
    pub(super) fn install_leaves(
        &self,
        i: &mut Inner,
        arena: &Region,
        iova: u64,
        bytes: u64,
        fresh: bool,
    ) -> Result<(), DomainError> {
        let first = (iova - IOVA_BASE) >> 21;
        let last = (iova + bytes - 1 - IOVA_BASE) >> 21;
        for c in first..=last {
            let slot = i
                .leaf_installed
                .get_mut(c as usize)
                .ok_or_else(|| reply(ErrorCode::NoSpace, "iova beyond the arena"))?;
            if !*slot {
                let leaf = arena.phys + c * PAGE;
                if fresh {
                    for k in 0..PAGE / 8 {
                        self.mem().write_u64(leaf + 8 * k, 0)?;
                    }
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
        if self.strategy_now() == Strategy::Static {
            return self.static_iova(phys, len);
        }
        // A domain's strategy is `noiommu` exactly when the unit does not
        // translate (set_policy keeps it so), so no lock is needed to know.
        let translating = self.unit.translating();
        if translating {
            self.check_tables()?;
            self.charge(Quota::Mappings, 1)?;
        }
        let r = self.map_charged(phys, len, dir, va);
        if translating {
            if r.is_err() {
                self.uncharge(Quota::Mappings, 1);
            }
            self.sync_tables(self.lock_uncounted().pt.counts().live);
        }
        r
    }

    /// [`Domain::map`] once the owner's quotas allowed it.
    fn map_charged(&self, phys: u64, len: u64, dir: Dir, va: u64) -> Result<u64, DomainError> {
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
    pub(super) fn map_allocated(
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
        self.note(
            iova,
            Some(crate::ledger::PageEntry::Mapped(alloc_bytes / PAGE)),
        );
        Ok(MapPlan::Done {
            iova: iova + off,
            base: iova,
            pages,
            widened: false,
        })
    }

    /// Unmaps a mapping made by [`Domain::map`].
    pub fn unmap(&self, iova: u64, len: u64) -> Result<(), DomainError> {
        if len == 0 || len > MAX_MAP_LEN || iova.checked_add(len).is_none() {
            return Err(reply(
                ErrorCode::Invalid,
                format!("iova {iova:#x} length {len:#x}"),
            ));
        }
        if self.strategy_now() == Strategy::Static {
            return self.static_unmap(iova, len);
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
                self.uncharge(Quota::Mappings, 1);
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
                self.note(base, None);
                self.uncharge(Quota::Mappings, 1);
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
}

impl Domain {
    /// The strategy as iommud last published it (its own write; no lock).
    pub(super) fn strategy_now(&self) -> Strategy {
        Strategy::from_u64(u64::from(self.page().strategy.load(SeqCst))).unwrap_or(Strategy::Global)
    }

    /// The static strategy's map: the pool holding `[phys, phys+len)` is
    /// mapped whole, so its IOVA plus the offset is the answer.
    pub(super) fn static_iova(&self, phys: u64, len: u64) -> Result<u64, DomainError> {
        let regs = self.regions.read().unwrap_or_else(|p| p.into_inner());
        let r = regs
            .iter()
            .find(|r| phys >= r.phys && phys.checked_add(len).is_some_and(|e| e <= r.phys + r.len))
            .ok_or_else(|| {
                reply(
                    ErrorCode::NotOwner,
                    format!("{phys:#x}+{len:#x} is not in this client's DMA memory"),
                )
            })?;
        stats::add(&self.stats.maps, 1);
        Ok(if r.iova == 0 {
            phys
        } else {
            r.iova + (phys - r.phys)
        })
    }

    /// The static strategy's unmap: nothing changes, but the range must be
    /// one a map could have returned.
    pub(super) fn static_unmap(&self, iova: u64, len: u64) -> Result<(), DomainError> {
        let regs = self.regions.read().unwrap_or_else(|p| p.into_inner());
        let ok = regs.iter().any(|r| {
            let base = if r.iova == 0 { r.phys } else { r.iova };
            iova >= base && iova.checked_add(len).is_some_and(|e| e <= base + r.len)
        });
        if !ok {
            return Err(reply(
                ErrorCode::NotOwner,
                format!("iova {iova:#x} length {len:#x} is not in a mapped pool"),
            ));
        }
        stats::add(&self.stats.unmaps, 1);
        Ok(())
    }
}
