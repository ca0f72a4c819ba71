//! The driver's view of DMA: memory the device can reach, and per-buffer mappings.
//!
//! The driver core only sees [`DmaMapper`]: where IOVAs come from (identity, an IOMMU
//! domain through libdma, ...) is the mapper's business. Rings are mapped once at open;
//! packet buffers are mapped before each descriptor is handed to the NIC and unmapped
//! when the NIC is done with it.

use std::ptr::NonNull;
#[cfg(target_os = "linux")]
use std::sync::Mutex;

#[cfg(target_os = "linux")]
use linuxhw::hugemem::HugeRegion;

use crate::{Error, Result};

/// Direction of a DMA transfer, as seen from the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// The device reads the buffer (TX).
    ToDevice,
    /// The device writes the buffer (RX).
    FromDevice,
    /// Both (descriptor rings: the device reads descriptors and writes status back).
    Bidirectional,
}

/// A piece of DMA-capable memory: CPU virtual address, physical address, length.
///
/// Physically contiguous over `len`. The memory belongs to the mapper that allocated it
/// and stays valid while that mapper lives. Access it only through raw pointers (volatile
/// where the device writes it): never form a Rust reference into it.
#[derive(Debug, Clone, Copy)]
pub struct DmaBuf {
    virt: NonNull<u8>,
    phys: u64,
    len: usize,
}

impl DmaBuf {
    /// Describes memory at `virt` (physical `phys`, `len` bytes, physically contiguous).
    ///
    /// # Safety
    /// `virt` must be valid for reads and writes of `len` bytes for as long as the value
    /// (and its copies) is used, and `phys` must be its physical address.
    pub unsafe fn new(virt: NonNull<u8>, phys: u64, len: usize) -> Self {
        DmaBuf { virt, phys, len }
    }

    /// CPU pointer to the first byte.
    pub fn as_ptr(&self) -> *mut u8 {
        self.virt.as_ptr()
    }

    /// Physical address of the first byte.
    pub fn phys(&self) -> u64 {
        self.phys
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Checks that `offset..offset + len` lies inside the buffer.
    pub fn check_range(&self, offset: usize, len: usize) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if len > 0 && end <= self.len => Ok(()),
            _ => Err(Error::Dma {
                op: "map",
                msg: format!(
                    "range {offset:#x}+{len:#x} outside a {:#x}-byte buffer",
                    self.len
                ),
            }),
        }
    }
}

/// Maps submitted with [`DmaMapper::map_batch_submit`] and not collected yet.
#[derive(Debug)]
#[must_use = "collect the IOVAs with map_batch_complete"]
pub enum PendingMaps {
    /// Already mapped (a mapper that cannot submit ahead): the IOVAs.
    Ready(Vec<u64>),
    /// On libdma's rings.
    Libdma(libdma::MapTicket),
}

/// Unmaps submitted with [`DmaMapper::unmap_batch_submit`] and not completed yet.
#[derive(Debug)]
#[must_use = "complete the unmaps with unmap_batch_complete"]
pub enum PendingUnmaps {
    /// Already done (a mapper that cannot submit ahead).
    Done,
    /// On libdma: an invalidation or ring completions still to wait for.
    Libdma(libdma::UnmapTicket),
}

/// When a driver collects the maps of an RX refill
/// ([`DmaMapper::remap_batch_submit`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Collect {
    /// At a later receive call: the mapper may let the refill wait while it
    /// serves other work first (iommud's lazy ring entries).
    Later,
    /// Within the same receive call: the mapper serves it at once.
    Now,
}

/// An RX refill's first step: takes the IOVAs of ring `slots` out of `iovas`,
/// returning their unmaps (`len` bytes each) and, per slot, whether it had one (a
/// slot a failed refill left without a buffer has none, and only needs its map).
pub fn take_refill(
    iovas: &mut [Option<u64>],
    slots: &[u16],
    len: usize,
) -> (Vec<(u64, usize)>, Vec<bool>) {
    let mut unmaps = Vec::with_capacity(slots.len());
    let mut had = Vec::with_capacity(slots.len());
    for &s in slots {
        let iova = iovas.get_mut(usize::from(s)).and_then(Option::take);
        had.push(iova.is_some());
        if let Some(iova) = iova {
            unmaps.push((iova, len));
        }
    }
    (unmaps, had)
}

/// Collects the map tickets of one batch of `n` buffers, each ticket with the
/// indices (into the batch) of the buffers it maps: returns `(iovas, mapped,
/// failed)`, where `mapped` is every `(iova, len_of(index))` a ticket gave (to
/// unmap, each with its own buffer's length, if the batch does not go out) and
/// `failed` the last error. Every ticket is collected, so none is left
/// outstanding.
pub fn collect_maps<M: DmaMapper + ?Sized>(
    mapper: &M,
    pending: Vec<(PendingMaps, std::ops::Range<usize>)>,
    n: usize,
    len_of: impl Fn(usize) -> usize,
) -> (Vec<u64>, Vec<(u64, usize)>, Option<Error>) {
    let mut iovas = vec![0u64; n];
    let mut mapped = Vec::with_capacity(n);
    let mut failed = None;
    for (ticket, range) in pending {
        match mapper.map_batch_complete(ticket) {
            Ok(v) => {
                if v.len() != range.len() {
                    failed = Some(Error::Device(format!(
                        "{} IOVAs for {} buffers",
                        v.len(),
                        range.len()
                    )));
                }
                for (iova, j) in v.into_iter().zip(range) {
                    match iovas.get_mut(j) {
                        Some(slot) => *slot = iova,
                        None => {
                            failed = Some(Error::Device(format!(
                                "a map ticket for buffer {j} of a batch of {n}"
                            )))
                        }
                    }
                    mapped.push((iova, len_of(j)));
                }
            }
            Err(e) => failed = Some(e),
        }
    }
    (iovas, mapped, failed)
}

/// How the driver obtains DMA memory and device addresses (IOVAs) for it.
pub trait DmaMapper {
    /// Allocates `len` bytes of zeroed, physically contiguous DMA-capable memory.
    fn alloc(&self, len: usize) -> Result<DmaBuf>;
    /// Makes `buf[offset..offset + len]` reachable by the device; returns its IOVA.
    fn map(&self, buf: &DmaBuf, offset: usize, len: usize, dir: Dir) -> Result<u64>;
    /// Ends a mapping made by [`map`](Self::map) with the same `iova` and `len`.
    fn unmap(&self, iova: u64, len: usize, dir: Dir) -> Result<()>;
    /// Maps several buffer ranges `(buf, offset, len, dir)`, all or nothing;
    /// returns their IOVAs in order. A mapper that can do better than one
    /// call per buffer (one round trip for the lot) overrides it.
    fn map_batch(&self, reqs: &[(&DmaBuf, usize, usize, Dir)]) -> Result<Vec<u64>> {
        let mut out: Vec<u64> = Vec::with_capacity(reqs.len());
        for &(buf, offset, len, dir) in reqs {
            match self.map(buf, offset, len, dir) {
                Ok(iova) => out.push(iova),
                Err(e) => {
                    for (&iova, &(_, _, len, dir)) in out.iter().zip(reqs) {
                        let _ = self.unmap(iova, len, dir);
                    }
                    return Err(e);
                }
            }
        }
        Ok(out)
    }
    /// Ends several mappings `(iova, len)` of direction `dir`, in order.
    fn unmap_batch(&self, maps: &[(u64, usize)], dir: Dir) -> Result<()> {
        maps.iter()
            .try_for_each(|&(iova, len)| self.unmap(iova, len, dir))
    }
    /// Starts [`map_batch`](Self::map_batch) without waiting for its IOVAs
    /// (which [`map_batch_complete`](Self::map_batch_complete) collects): the
    /// driver does other work while the maps are served. The default maps now.
    fn map_batch_submit(&self, reqs: &[(&DmaBuf, usize, usize, Dir)]) -> Result<PendingMaps> {
        self.map_batch(reqs).map(PendingMaps::Ready)
    }
    /// The IOVAs of a [`map_batch_submit`](Self::map_batch_submit), all or nothing.
    fn map_batch_complete(&self, p: PendingMaps) -> Result<Vec<u64>> {
        match p {
            PendingMaps::Ready(v) => Ok(v),
            PendingMaps::Libdma(_) => Err(crate::Error::Device(
                "a libdma ticket handed to another mapper".into(),
            )),
        }
    }
    /// True if [`map_batch_complete`](Self::map_batch_complete) of `p` would
    /// not wait. Never blocks.
    fn map_batch_ready(&self, p: &PendingMaps) -> bool {
        matches!(p, PendingMaps::Ready(_))
    }
    /// [`unmap_batch`](Self::unmap_batch) for buffers whose next use is by the
    /// same device in the same direction (TX buffers): the mapper may return
    /// before the unmaps are invalidated, since a stale translation could only
    /// let the device read what the driver is about to hand it anyway.
    fn unmap_batch_nowait(&self, maps: &[(u64, usize)], dir: Dir) -> Result<()> {
        self.unmap_batch(maps, dir)
    }
    /// [`unmap_batch_nowait`](Self::unmap_batch_nowait) of `unmaps`, then
    /// [`map_batch_submit`](Self::map_batch_submit) of `reqs` (as many), whose
    /// ticket it returns: a TX sweep and the next burst's maps. A mapper that can
    /// unmap and map in one request per pair (iommud's rings) does; the unmaps
    /// then complete with the maps.
    fn remap_batch_nowait(
        &self,
        unmaps: &[(u64, usize)],
        reqs: &[(&DmaBuf, usize, usize, Dir)],
        dir: Dir,
    ) -> Result<PendingMaps> {
        self.unmap_batch_nowait(unmaps, dir)?;
        self.map_batch_submit(reqs)
    }
    /// Starts [`unmap_batch`](Self::unmap_batch): the mappings end before it
    /// returns, but what `strict` waits for (their invalidation) is left to
    /// [`unmap_batch_complete`](Self::unmap_batch_complete). In between the
    /// driver may copy frames out of the buffers and map them again for the
    /// same device, nothing else. The default unmaps and waits now.
    fn unmap_batch_submit(&self, maps: &[(u64, usize)], dir: Dir) -> Result<PendingUnmaps> {
        self.unmap_batch(maps, dir).map(|()| PendingUnmaps::Done)
    }
    /// Waits for an [`unmap_batch_submit`](Self::unmap_batch_submit).
    fn unmap_batch_complete(&self, p: PendingUnmaps) -> Result<()> {
        match p {
            PendingUnmaps::Done => Ok(()),
            PendingUnmaps::Libdma(_) => Err(crate::Error::Device(
                "a libdma ticket handed to another mapper".into(),
            )),
        }
    }
    /// True if [`unmap_batch_complete`](Self::unmap_batch_complete) of `p` would
    /// not wait. Never blocks.
    fn unmap_batch_ready(&self, p: &PendingUnmaps) -> bool {
        matches!(p, PendingUnmaps::Done)
    }
    /// An RX refill: [`unmap_batch_submit`](Self::unmap_batch_submit) of `unmaps`,
    /// then [`map_batch_submit`](Self::map_batch_submit) of `reqs` (the same
    /// buffers, one each), whose result is the second value. A mapper that can
    /// do both in one request per buffer (iommud's rings) does. `collect` says
    /// when the driver will ask for the maps.
    fn remap_batch_submit(
        &self,
        unmaps: &[(u64, usize)],
        reqs: &[(&DmaBuf, usize, usize, Dir)],
        dir: Dir,
        _collect: Collect,
    ) -> Result<(PendingUnmaps, Result<PendingMaps>)> {
        let u = self.unmap_batch_submit(unmaps, dir)?;
        Ok((u, self.map_batch_submit(reqs)))
    }
}

impl<T: DmaMapper + ?Sized> DmaMapper for Box<T> {
    fn alloc(&self, len: usize) -> Result<DmaBuf> {
        (**self).alloc(len)
    }
    fn map(&self, buf: &DmaBuf, offset: usize, len: usize, dir: Dir) -> Result<u64> {
        (**self).map(buf, offset, len, dir)
    }
    fn unmap(&self, iova: u64, len: usize, dir: Dir) -> Result<()> {
        (**self).unmap(iova, len, dir)
    }
    fn map_batch(&self, reqs: &[(&DmaBuf, usize, usize, Dir)]) -> Result<Vec<u64>> {
        (**self).map_batch(reqs)
    }
    fn unmap_batch(&self, maps: &[(u64, usize)], dir: Dir) -> Result<()> {
        (**self).unmap_batch(maps, dir)
    }
    fn unmap_batch_nowait(&self, maps: &[(u64, usize)], dir: Dir) -> Result<()> {
        (**self).unmap_batch_nowait(maps, dir)
    }
    fn map_batch_submit(&self, reqs: &[(&DmaBuf, usize, usize, Dir)]) -> Result<PendingMaps> {
        (**self).map_batch_submit(reqs)
    }
    fn map_batch_complete(&self, p: PendingMaps) -> Result<Vec<u64>> {
        (**self).map_batch_complete(p)
    }
    fn unmap_batch_submit(&self, maps: &[(u64, usize)], dir: Dir) -> Result<PendingUnmaps> {
        (**self).unmap_batch_submit(maps, dir)
    }
    fn unmap_batch_complete(&self, p: PendingUnmaps) -> Result<()> {
        (**self).unmap_batch_complete(p)
    }
    fn unmap_batch_ready(&self, p: &PendingUnmaps) -> bool {
        (**self).unmap_batch_ready(p)
    }
    fn map_batch_ready(&self, p: &PendingMaps) -> bool {
        (**self).map_batch_ready(p)
    }
    fn remap_batch_nowait(
        &self,
        unmaps: &[(u64, usize)],
        reqs: &[(&DmaBuf, usize, usize, Dir)],
        dir: Dir,
    ) -> Result<PendingMaps> {
        (**self).remap_batch_nowait(unmaps, reqs, dir)
    }
    fn remap_batch_submit(
        &self,
        unmaps: &[(u64, usize)],
        reqs: &[(&DmaBuf, usize, usize, Dir)],
        dir: Dir,
        collect: Collect,
    ) -> Result<(PendingUnmaps, Result<PendingMaps>)> {
        (**self).remap_batch_submit(unmaps, reqs, dir, collect)
    }
}

/// Where the next allocation goes inside a region whose physical contiguity ends at
/// every `page` boundary: returns the aligned offset, or `None` if `len` does not fit.
///
/// Allocations are aligned to 128 bytes (ring base addresses need 16, 128 keeps rings and
/// buffers on cache lines), never cross a `page` boundary, and never exceed `region_len`.
pub fn bump_place(used: usize, len: usize, page: usize, region_len: usize) -> Option<usize> {
    const ALIGN: usize = 128;
    if len == 0 || len > page {
        return None;
    }
    let mut off = used.checked_next_multiple_of(ALIGN)?;
    if off / page != (off + len - 1) / page {
        off = off.checked_next_multiple_of(page)?;
    }
    (off.checked_add(len)? <= region_len).then_some(off)
}

#[cfg(target_os = "linux")]
struct Arena {
    region: HugeRegion,
    used: usize,
}

/// No IOMMU: IOVA = physical address. Memory comes from locked hugepages (or 4 KiB pages
/// when the system has none), carved by a bump allocator and freed with the mapper.
/// Linux only (hugepages and `/proc/self/pagemap` through `linuxhw`).
#[cfg(target_os = "linux")]
pub struct PhysMapper {
    arenas: Mutex<Vec<Arena>>,
    counts: Mutex<(u64, u64)>,
}

/// Bytes requested from linuxhw at a time.
#[cfg(target_os = "linux")]
const ARENA_LEN: usize = 2 << 20;

#[cfg(target_os = "linux")]
impl PhysMapper {
    /// A mapper with no memory yet.
    pub fn new() -> Self {
        PhysMapper {
            arenas: Mutex::new(Vec::new()),
            counts: Mutex::new((0, 0)),
        }
    }

    /// Maps and unmaps done so far.
    pub fn counts(&self) -> (u64, u64) {
        *self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(target_os = "linux")]
impl Default for PhysMapper {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(target_os = "linux")]
impl DmaMapper for PhysMapper {
    fn alloc(&self, len: usize) -> Result<DmaBuf> {
        let mut arenas = self.arenas.lock().unwrap_or_else(|e| e.into_inner());
        let fits = |a: &Arena| bump_place(a.used, len, a.region.page_size(), a.region.len());
        if arenas.last().and_then(fits).is_none() {
            let region =
                HugeRegion::alloc(ARENA_LEN).or_else(|_| HugeRegion::alloc_small(ARENA_LEN))?;
            arenas.push(Arena { region, used: 0 });
        }
        let arena = arenas.last_mut().ok_or(Error::Dma {
            op: "alloc",
            msg: "no arena".into(),
        })?;
        let off = fits(arena).ok_or_else(|| Error::Dma {
            op: "alloc",
            msg: format!(
                "{len:#x} bytes do not fit one physically contiguous {:#x}-byte page",
                arena.region.page_size()
            ),
        })?;
        arena.used = off + len;
        // SAFETY: off + len <= region.len() (bump_place), so the pointer stays inside the
        // region, which lives as long as this mapper (arenas are never dropped early).
        let virt = unsafe { NonNull::new_unchecked(arena.region.as_ptr().add(off)) };
        let phys = arena.region.phys_of(off);
        // SAFETY: virt is valid for len bytes while the mapper lives; the range does not
        // cross a page boundary, so phys..phys+len is its contiguous physical range.
        Ok(unsafe { DmaBuf::new(virt, phys, len) })
    }

    fn map(&self, buf: &DmaBuf, offset: usize, len: usize, _dir: Dir) -> Result<u64> {
        buf.check_range(offset, len)?;
        self.counts.lock().unwrap_or_else(|e| e.into_inner()).0 += 1;
        Ok(buf.phys() + offset as u64)
    }

    fn unmap(&self, _iova: u64, _len: usize, _dir: Dir) -> Result<()> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner()).1 += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bump_aligns_and_never_crosses_a_page() {
        let page = 4096;
        assert_eq!(bump_place(0, 2048, page, 8192), Some(0));
        assert_eq!(bump_place(2048, 2048, page, 8192), Some(2048));
        assert_eq!(bump_place(4096, 2048, page, 8192), Some(4096));
        assert_eq!(bump_place(1, 16, page, 8192), Some(128));
        // 2048 at 3000 would cross into the next page: moved to 4096.
        assert_eq!(bump_place(3000, 2048, page, 8192), Some(4096));
        // Does not fit the region.
        assert_eq!(bump_place(6144, 4096, page, 8192), None);
        // Larger than a contiguous page.
        assert_eq!(bump_place(0, 8192, page, 8192), None);
        assert_eq!(bump_place(0, 0, page, 8192), None);
    }

    #[test]
    fn check_range_bounds() {
        let mut backing = [0u8; 64];
        let p = NonNull::new(backing.as_mut_ptr()).expect("stack pointer");
        // SAFETY: backing is valid for 64 bytes for this test's duration.
        let b = unsafe { DmaBuf::new(p, 0x1000, 64) };
        assert!(b.check_range(0, 64).is_ok());
        assert!(b.check_range(60, 4).is_ok());
        assert!(b.check_range(60, 5).is_err());
        assert!(b.check_range(0, 0).is_err());
        assert!(b.check_range(usize::MAX, 2).is_err());
    }
}
