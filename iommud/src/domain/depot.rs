//! The magazine depot: exchanges of whole magazines of delegated IOVAs
//! through the client's exchange area (hostile input: copied once,
//! validated before anything changes).

use super::*;

impl Domain {
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
        if self.trust != Trust::Delegated {
            stats::add(&self.stats.rejected, 1);
            return Err(reply(
                ErrorCode::PermissionDenied,
                "validated trust: iommud keeps this domain's magazines (use the rings)",
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
        // The IOVAs handed out count against the owner's mappings quota:
        // ask for all of `want` before anything changes, give back the rest.
        if want > 0 {
            self.charge(Quota::Mappings, want)?;
        }
        for iova in &back {
            i.delegated.remove(iova);
            self.note(*iova, None);
        }
        self.uncharge(Quota::Mappings, back.len() as u64);
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
                match self.fresh_iovas(&mut i, class, want as usize) {
                    Ok(v) => out = v,
                    Err(e) => {
                        self.uncharge(Quota::Mappings, want);
                        return Err(e);
                    }
                }
            }
        }
        for (k, &iova) in out.iter().enumerate() {
            i.delegated.insert(iova, class);
            self.note(iova, Some(crate::ledger::PageEntry::Delegated(class)));
            self.client
                .map
                .write_u64(EXCHANGE_OFFSET + 8 * k, iova)
                .ok_or_else(|| reply(ErrorCode::Invalid, "exchange slot"))?;
        }
        self.uncharge(Quota::Mappings, want - out.len() as u64);
        stats::add(&self.stats.depot_exchanges, 1);
        Ok(out.len() as u64)
    }

    /// Up to `n` IOVAs of `class` straight from the allocator, their arena
    /// leaf tables installed (fewer when the space runs out); on an error
    /// none stays allocated.
    pub(super) fn fresh_iovas(
        &self,
        i: &mut Inner,
        class: usize,
        n: usize,
    ) -> Result<Vec<u64>, DomainError> {
        let bytes = class_pages(class) * PAGE;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let Some(iova) = i.iova.alloc(bytes, bytes) else {
                break;
            };
            if let Err(e) = self.ensure_leaves(i, iova, bytes) {
                i.iova.free(iova, bytes);
                for v in out {
                    i.iova.free(v, bytes);
                }
                return Err(e);
            }
            out.push(iova);
        }
        Ok(out)
    }

    pub(super) fn exchange_slot(&self, k: usize) -> Result<u64, DomainError> {
        self.client
            .map
            .read_u64(EXCHANGE_OFFSET + 8 * k)
            .ok_or_else(|| reply(ErrorCode::Invalid, "exchange slot out of range"))
    }
}
