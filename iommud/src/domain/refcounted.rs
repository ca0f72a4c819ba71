//! Refcounted entries (the `identity` and `va` strategies): the IOVA is
//! given, so pages are counted, dirty pages come back only with the very
//! entry a stale translation holds, and cleared pages are parked under
//! iommud's own epoch.

use super::*;

impl Domain {
    /// Identity and va maps: the IOVA is given, entries are refcounted per page.
    pub(super) fn map_refcounted(
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
    pub(super) fn unref(
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
    pub(super) fn park_cleared(
        &self,
        i: &mut Inner,
        cleared: Vec<(u64, PageRef)>,
        detached: Vec<u64>,
    ) -> u64 {
        std::sync::atomic::fence(SeqCst);
        // iommud's own epoch, never the published copy (a client cannot
        // hold a tag back and have its IOVA or table freed early).
        let tag = self.epoch();
        // iommud's own unmaps have a record of their own (written under the
        // domain lock, its only writer).
        {
            let _r = self.record_lock.lock().unwrap_or_else(|p| p.into_inner());
            self.server_unmaps.note_unmap(self.page());
        }
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
}
