//! Batches: several maps or unmaps in one go (one invalidation in caching
//! mode on the fast path, one round trip per [`MAX_BATCH`] in validated trust).

use super::*;

impl DmaDomain {
    /// Maps several buffers `(phys, len, dir)`, all or nothing, returning
    /// their IOVAs in order. With the magazine strategy the batch takes the
    /// fast path under one slot lock with one write-back fence, and in
    /// caching mode one invalidation covers the whole batch instead of one
    /// per map; with a validated strategy (global, identity,
    /// va) iommud gets the buffers [`MAX_BATCH`] at a time, one round trip
    /// per batch instead of one per buffer.
    pub fn map_batch(&self, bufs: &[(u64, usize, Dir)]) -> Result<Vec<u64>> {
        let mut out = Vec::with_capacity(bufs.len());
        let undo = |out: &[u64]| {
            for (iova, &(_, len, _)) in out.iter().zip(bufs) {
                let _ = self.unmap(*iova, len);
            }
        };
        match self.strategy() {
            Strategy::NoIommu => return Ok(bufs.iter().map(|b| b.0).collect()),
            Strategy::Static => {
                return bufs
                    .iter()
                    .map(|&(phys, len, _)| self.static_map(phys, len))
                    .collect()
            }
            _ if self.rings.is_some() => return self.ring_map(bufs),
            Strategy::Magazine if self.arena.is_some() => {
                let arena = self.arena.as_ref().ok_or(Error::Dead)?;
                return self.fast_map_batch(arena, bufs);
            }
            strategy => {
                for chunk in bufs.chunks(MAX_BATCH) {
                    let mut entries = Vec::with_capacity(chunk.len());
                    for &(phys, len, dir) in chunk {
                        if len == 0 {
                            undo(&out);
                            return Err(Error::Invalid("zero-length map".into()));
                        }
                        let va = match self.va_hint(strategy, phys) {
                            Ok(va) => va,
                            Err(e) => {
                                undo(&out);
                                return Err(e);
                            }
                        };
                        entries.push(MapEntry {
                            phys,
                            len: len as u64,
                            dir,
                            va,
                        });
                    }
                    self.stats.round_trips.fetch_add(1, Relaxed);
                    let r = self.conn().call(&Request::MapBatch { entries });
                    let (reply, _) = match r {
                        Ok(r) => r,
                        Err(e) => {
                            undo(&out);
                            return Err(e);
                        }
                    };
                    if reply.payload.len() != chunk.len() * 8 {
                        undo(&out);
                        return Err(Error::Invalid(format!(
                            "MapBatch reply carried {} bytes for {} IOVAs",
                            reply.payload.len(),
                            chunk.len()
                        )));
                    }
                    out.extend(reply.payload.chunks(8).map(|b| {
                        let mut a = [0u8; 8];
                        a.copy_from_slice(b);
                        u64::from_le_bytes(a)
                    }));
                }
            }
        }
        Ok(out)
    }

    /// Unmaps several mappings `(iova, len)` made by [`DmaDomain::map`] or
    /// [`DmaDomain::map_batch`], in order; a validated strategy sends them to
    /// iommud [`MAX_BATCH`] at a time, and the delegated magazine strategy
    /// clears them under one slot lock and, with `strict`, waits once for
    /// one invalidation covering the batch.
    pub fn unmap_batch(&self, maps: &[(u64, usize)]) -> Result<()> {
        match self.strategy() {
            Strategy::NoIommu | Strategy::Static => Ok(()),
            _ if self.rings.is_some() => self.ring_unmap(maps),
            Strategy::Magazine if self.arena.is_some() => {
                let arena = self.arena.as_ref().ok_or(Error::Dead)?;
                self.fast_unmap_batch(arena, maps, true).map(|_| ())
            }
            _ => {
                for chunk in maps.chunks(MAX_BATCH) {
                    self.call(&Request::UnmapBatch {
                        entries: chunk.iter().map(|&(i, l)| (i, l as u64)).collect(),
                    })?;
                }
                Ok(())
            }
        }
    }

    /// [`DmaDomain::unmap_batch`] that returns once the unmaps are submitted,
    /// whatever the flush policy (on the rings and the delegated fast path;
    /// elsewhere it is `unmap_batch`): for buffers whose next use is by the same device in the
    /// same direction, such as TX buffers, where a translation that outlives
    /// the unmap could only let the device read what the driver gives it next.
    /// A refused entry is counted in [`ClientCounts::ring_errors`].
    pub fn unmap_batch_nowait(&self, maps: &[(u64, usize)]) -> Result<()> {
        match self.strategy() {
            Strategy::NoIommu | Strategy::Static => Ok(()),
            _ if self.rings.is_some() => self.ring_unmap_nowait(maps),
            Strategy::Magazine if self.arena.is_some() => {
                // The entries are cleared and the batch tagged (no IOVA is
                // reused before its invalidation); `strict`'s flush is
                // requested, not waited for.
                let arena = self.arena.as_ref().ok_or(Error::Dead)?;
                self.fast_unmap_batch(arena, maps, false).map(|_| ())
            }
            _ => self.unmap_batch(maps),
        }
    }
}
