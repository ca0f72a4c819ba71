//! [`DmaMapper`] over an iommud protection domain through libdma: one
//! [`libdma::DmaDomain`] per NIC, attached to that NIC's BDF. Memory comes from
//! iommud's pools; every map/unmap goes through the domain's strategy (magazines with no
//! IPC on the fast path, or a round trip per call with `global`).

#[cfg(not(target_os = "redox"))]
use std::path::Path;
use std::ptr::NonNull;
use std::sync::Arc;

use libdma::DmaDomain;
use libdma::{FlushPolicy, Strategy};

use crate::dma::{Collect, Dir, DmaBuf, DmaMapper};
use crate::{Error, Result};

/// A NIC's DMA through its iommud domain.
pub struct LibdmaMapper {
    domain: Arc<DmaDomain>,
    /// Remaps let a recycled buffer keep its IOVA under `percore` and
    /// `deferred` ([`libdma::RemapHints::keep`]); on unless
    /// [`with_keep`](Self::with_keep) turned it off.
    keep: bool,
}

fn err(op: &'static str, e: libdma::Error) -> Error {
    Error::Dma {
        op,
        msg: e.to_string(),
    }
}

impl LibdmaMapper {
    /// Connects to iommud at `socket` and attaches to the domain of source id `bdf`.
    #[cfg(not(target_os = "redox"))]
    pub fn connect(
        socket: &Path,
        bdf: u16,
        strategy: Strategy,
        flush: FlushPolicy,
    ) -> Result<Self> {
        let domain =
            DmaDomain::connect(socket, bdf, strategy, flush).map_err(|e| err("attach", e))?;
        Ok(LibdmaMapper {
            domain: Arc::new(domain),
            keep: true,
        })
    }

    /// A mapper over a domain attached by other means (on Redox:
    /// `DmaDomain::open`, the iommu scheme).
    pub fn from_domain(domain: DmaDomain) -> Self {
        LibdmaMapper {
            domain: Arc::new(domain),
            keep: true,
        }
    }

    /// Whether remaps may keep a recycled buffer's IOVA (docs/ARCHITECTURE.md,
    /// "Kept remaps"); `false` gives every remap a new IOVA, as under `strict`.
    pub fn with_keep(mut self, keep: bool) -> Self {
        self.keep = keep;
        self
    }

    /// Whether libdma itself may keep IOVAs here: the delegated magazine
    /// under `percore` or `deferred` (on the rings iommud decides).
    fn keeps_locally(&self) -> bool {
        self.keep
            && !self.domain.uses_rings()
            && self.domain.strategy() == Strategy::Magazine
            && self.domain.flush_policy() != FlushPolicy::Strict
    }

    /// The domain (for its stats paths and counters).
    pub fn domain(&self) -> Arc<DmaDomain> {
        self.domain.clone()
    }
}

fn to_libdma(d: Dir) -> libdma::Dir {
    match d {
        Dir::ToDevice => libdma::Dir::ToDevice,
        Dir::FromDevice => libdma::Dir::FromDevice,
        Dir::Bidirectional => libdma::Dir::Bidirectional,
    }
}

/// libdma's `(phys, len, dir)` of each request, its range checked.
fn phys_bufs(reqs: &[(&DmaBuf, usize, usize, Dir)]) -> Result<Vec<(u64, usize, libdma::Dir)>> {
    reqs.iter()
        .map(|&(buf, offset, len, dir)| {
            buf.check_range(offset, len)?;
            Ok((buf.phys() + offset as u64, len, to_libdma(dir)))
        })
        .collect()
}

impl DmaMapper for LibdmaMapper {
    fn alloc(&self, len: usize) -> Result<DmaBuf> {
        let b = self.domain.alloc(len).map_err(|e| err("alloc", e))?;
        let virt = NonNull::new(b.as_ptr()).ok_or_else(|| Error::Dma {
            op: "alloc",
            msg: "iommud pool gave a null pointer".into(),
        })?;
        // SAFETY: `virt` points at `b.len` bytes of a pool mapping the domain keeps alive
        // (it lives as long as this mapper); nothing else holds the buffer yet.
        unsafe { std::ptr::write_bytes(virt.as_ptr(), 0, b.len) };
        // SAFETY: as above; `b.phys` is the physical address iommud reported for it, and
        // pool buffers never cross a physically contiguous pool.
        Ok(unsafe { DmaBuf::new(virt, b.phys, b.len) })
    }

    fn map(&self, buf: &DmaBuf, offset: usize, len: usize, dir: Dir) -> Result<u64> {
        buf.check_range(offset, len)?;
        self.domain
            .map(buf.phys() + offset as u64, len, to_libdma(dir))
            .map_err(|e| err("map", e))
    }

    fn unmap(&self, iova: u64, len: usize, _dir: Dir) -> Result<()> {
        self.domain.unmap(iova, len).map_err(|e| err("unmap", e))
    }

    /// One round trip per 64 buffers with a validated strategy, one
    /// invalidation per batch for magazines in caching mode.
    fn map_batch(&self, reqs: &[(&DmaBuf, usize, usize, Dir)]) -> Result<Vec<u64>> {
        let bufs = phys_bufs(reqs)?;
        self.domain.map_batch(&bufs).map_err(|e| err("map", e))
    }

    fn unmap_batch(&self, maps: &[(u64, usize)], _dir: Dir) -> Result<()> {
        self.domain.unmap_batch(maps).map_err(|e| err("unmap", e))
    }

    fn map_batch_submit(
        &self,
        reqs: &[(&DmaBuf, usize, usize, Dir)],
    ) -> Result<crate::PendingMaps> {
        let bufs = phys_bufs(reqs)?;
        self.domain
            .map_batch_submit(&bufs)
            .map(crate::PendingMaps::Libdma)
            .map_err(|e| err("map", e))
    }

    fn map_batch_complete(&self, p: crate::PendingMaps) -> Result<Vec<u64>> {
        match p {
            crate::PendingMaps::Ready(v) => Ok(v),
            crate::PendingMaps::Libdma(t) => {
                self.domain.map_batch_complete(t).map_err(|e| err("map", e))
            }
        }
    }

    fn unmap_batch_submit(&self, maps: &[(u64, usize)], _dir: Dir) -> Result<crate::PendingUnmaps> {
        self.domain
            .unmap_batch_submit(maps)
            .map(crate::PendingUnmaps::Libdma)
            .map_err(|e| err("unmap", e))
    }

    fn unmap_batch_complete(&self, p: crate::PendingUnmaps) -> Result<()> {
        match p {
            crate::PendingUnmaps::Done => Ok(()),
            crate::PendingUnmaps::Libdma(t) => self
                .domain
                .unmap_batch_complete(t)
                .map_err(|e| err("unmap", e)),
        }
    }

    /// On iommud's rings one entry per buffer (unmap and map together),
    /// marked lazy when the driver collects the refill at a later receive
    /// ([`Collect::Later`]), so a `strict` iommud may first serve other work
    /// (the TX maps the driver waits for); elsewhere the two submissions,
    /// or, for the delegated magazine, kept remaps where they apply.
    fn remap_batch_submit(
        &self,
        unmaps: &[(u64, usize)],
        reqs: &[(&DmaBuf, usize, usize, Dir)],
        dir: Dir,
        collect: Collect,
    ) -> Result<(crate::PendingUnmaps, Result<crate::PendingMaps>)> {
        if !self.domain.uses_rings() && !self.keeps_locally() {
            let u = self.unmap_batch_submit(unmaps, dir)?;
            return Ok((u, self.map_batch_submit(reqs)));
        }
        let bufs = phys_bufs(reqs)?;
        let hints = libdma::RemapHints {
            lazy: collect == Collect::Later,
            keep: self.keep,
        };
        let (u, m) = self
            .domain
            .remap_batch_submit_hinted(unmaps, &bufs, hints)
            .map_err(|e| err("remap", e))?;
        Ok((
            crate::PendingUnmaps::Libdma(u),
            Ok(crate::PendingMaps::Libdma(m)),
        ))
    }

    /// On iommud's rings, for TX buffers, one remap entry per pair (the unmaps
    /// complete with the maps; nobody waits for them alone).
    fn remap_batch_nowait(
        &self,
        unmaps: &[(u64, usize)],
        reqs: &[(&DmaBuf, usize, usize, Dir)],
        dir: Dir,
    ) -> Result<crate::PendingMaps> {
        if (!self.domain.uses_rings() && !self.keeps_locally())
            || dir != Dir::ToDevice
            || unmaps.len() != reqs.len()
        {
            self.unmap_batch_nowait(unmaps, dir)?;
            return self.map_batch_submit(reqs);
        }
        let bufs = phys_bufs(reqs)?;
        let hints = libdma::RemapHints {
            lazy: false,
            keep: self.keep,
        };
        let (u, m) = self
            .domain
            .remap_batch_submit_hinted(unmaps, &bufs, hints)
            .map_err(|e| err("remap", e))?;
        // On the rings this ticket is done already (the unmaps complete with the
        // maps); a batch libdma maps at once has its unmaps completed here.
        self.domain
            .unmap_batch_complete(u)
            .map_err(|e| err("unmap", e))?;
        Ok(crate::PendingMaps::Libdma(m))
    }

    fn map_batch_ready(&self, p: &crate::PendingMaps) -> bool {
        match p {
            crate::PendingMaps::Ready(_) => true,
            crate::PendingMaps::Libdma(t) => self.domain.map_batch_ready(t),
        }
    }

    fn unmap_batch_ready(&self, p: &crate::PendingUnmaps) -> bool {
        match p {
            crate::PendingUnmaps::Done => true,
            crate::PendingUnmaps::Libdma(t) => self.domain.unmap_batch_ready(t),
        }
    }

    fn unmap_batch_nowait(&self, maps: &[(u64, usize)], dir: Dir) -> Result<()> {
        if dir != Dir::ToDevice {
            return self.unmap_batch(maps, dir);
        }
        self.domain
            .unmap_batch_nowait(maps)
            .map_err(|e| err("unmap", e))
    }
}
