//! The `linux` platform: a root process in a Linux guest that owns the VT-d unit.
//!
//! - [`LinuxMmio`]: the unit's registers, mapped through `/dev/mem` (the guest kernel is
//!   booted with `intel_iommu=off intremap=off iomem=relaxed`, so it leaves them alone).
//! - [`discover`]: finds the unit through the ACPI DMAR table.
//! - [`HugeMem`]: physical memory from 2 MiB hugepages (`memfd_create(MFD_HUGETLB)`),
//!   physical addresses from `/proc/self/pagemap`; 4 KiB pages as a fallback.
//!
//! Limitations, by design for now:
//! - Only one DRHD is driven (see [`discover`]).
//! - A client region is one backing page: at most 2 MiB with hugepages, at most 4 KiB with
//!   the small-page fallback (4 KiB pages are not physically contiguous with each other).

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use linuxhw::hugemem::{HugeRegion, HUGE_PAGE_SIZE};
use linuxhw::mmio::MmioRegion;
use linuxhw::PAGE_SIZE;
use vtd::regs::{CAP, ECAP};

use vtd::dmar::{choose_drhd, register_span};

use crate::hw::{HwError, Mmio, PhysMem, Region};

/// Size of a table frame.
const FRAME: u64 = PAGE_SIZE as u64;
/// CPU cache line size on x86-64 (the `clflush` granule).
const CACHE_LINE: usize = 64;
/// Small pages allocated at once when the table-frame pool grows on the small-page source.
const SMALL_POOL_PAGES: usize = 16;

/// Converts a `linuxhw` error into [`HwError::Os`], keeping the OS error kind when there is
/// one and the full message (path, address) always.
fn os_err(what: &'static str, e: linuxhw::Error) -> HwError {
    let msg = e.to_string();
    let kind = match &e {
        linuxhw::Error::Io { source, .. } | linuxhw::Error::Sys { source, .. } => source.kind(),
        _ => std::io::ErrorKind::Other,
    };
    HwError::Os {
        what,
        err: std::io::Error::new(kind, msg),
    }
}

/// Takes a lock even if another thread panicked while holding it: the protected state is
/// only mappings and allocator bookkeeping, which every critical section leaves consistent.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------------------
// Registers
// ---------------------------------------------------------------------------------------

/// One VT-d unit's registers, mapped through `/dev/mem`.
///
/// Accesses are volatile and serialised by a mutex (the mapping is not `Sync` by itself; the
/// lock is uncontended in practice and costs nothing next to an MMIO trap into QEMU). An
/// access outside the mapping or misaligned is an iommud bug: it is logged with its offset
/// and reads as 0 / is dropped, never a panic.
#[derive(Debug)]
pub struct LinuxMmio {
    regs: Mutex<MmioRegion>,
    phys: Option<u64>,
    len: usize,
}

impl LinuxMmio {
    /// Maps the register set at physical `base`: first one page, to read CAP and ECAP, then
    /// the span they (and `min_len`) call for. Needs root and `iomem=relaxed`.
    pub fn map(base: u64, min_len: usize) -> Result<LinuxMmio, HwError> {
        let first =
            MmioRegion::map(base, PAGE_SIZE).map_err(|e| os_err("map VT-d registers", e))?;
        let cap = first
            .read64(CAP)
            .map_err(|e| os_err("read VT-d CAP register", e))?;
        let ecap = first
            .read64(ECAP)
            .map_err(|e| os_err("read VT-d ECAP register", e))?;
        if cap == u64::MAX || ecap == u64::MAX {
            return Err(HwError::Hardware(format!(
                "VT-d registers at {base:#x} read all-ones (CAP {cap:#x}, ECAP {ecap:#x}): \
                 nothing decodes there"
            )));
        }
        let span = register_span(cap, ecap, min_len);
        let regs = if span > first.len() {
            drop(first);
            MmioRegion::map(base, span).map_err(|e| os_err("map VT-d registers", e))?
        } else {
            first
        };
        Ok(LinuxMmio::from_region(regs))
    }

    /// Wraps an already-mapped region (a `/dev/mem` mapping, or a file in tests).
    pub fn from_region(regs: MmioRegion) -> LinuxMmio {
        LinuxMmio {
            phys: regs.phys(),
            len: regs.len(),
            regs: Mutex::new(regs),
        }
    }

    /// Physical address of the register set, when mapped through `/dev/mem`.
    pub fn phys(&self) -> Option<u64> {
        self.phys
    }

    /// Bytes of register space mapped.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is mapped (never true).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn bug(&self, op: &str, off: usize, e: &linuxhw::Error) {
        eprintln!(
            "iommud: BUG: VT-d register {op} at offset {off:#x} (mapped {:#x} bytes): {e}",
            self.len
        );
    }
}

impl Mmio for LinuxMmio {
    fn read32(&self, off: usize) -> u32 {
        lock(&self.regs).read32(off).unwrap_or_else(|e| {
            self.bug("read32", off, &e);
            0
        })
    }

    fn read64(&self, off: usize) -> u64 {
        lock(&self.regs).read64(off).unwrap_or_else(|e| {
            self.bug("read64", off, &e);
            0
        })
    }

    fn write32(&self, off: usize, v: u32) {
        if let Err(e) = lock(&self.regs).write32(off, v) {
            self.bug("write32", off, &e);
        }
    }

    fn write64(&self, off: usize, v: u64) {
        if let Err(e) = lock(&self.regs).write64(off, v) {
            self.bug("write64", off, &e);
        }
    }
}

/// Finds the VT-d unit through `/sys/firmware/acpi/tables/DMAR` and maps its registers.
///
/// Known limitation: only one DRHD is driven (the first with INCLUDE_PCI_ALL, else the
/// first). QEMU's q35 has exactly one; on a machine with several, devices behind the others
/// stay untranslated by iommud. Every DRHD found is logged.
pub fn discover() -> Result<LinuxMmio, HwError> {
    let dmar = linuxhw::dmar::read().map_err(|e| os_err("read ACPI DMAR table", e))?;
    for (i, d) in dmar.drhds.iter().enumerate() {
        eprintln!(
            "iommud: DMAR: DRHD {i}: registers at {:#x}, segment {}, flags {:#x}{}, {} device scope(s)",
            d.register_base,
            d.segment,
            d.flags,
            if d.include_pci_all() {
                " (INCLUDE_PCI_ALL)"
            } else {
                ""
            },
            d.scopes.len()
        );
    }
    let drhd = choose_drhd(&dmar).ok_or_else(|| {
        HwError::Unsupported("the ACPI DMAR table lists no DRHD (no VT-d unit)".into())
    })?;
    if dmar.drhds.len() > 1 {
        eprintln!(
            "iommud: DMAR: {} DRHDs found; only the one at {:#x} is driven \
             (multiple VT-d units are a known limitation)",
            dmar.drhds.len(),
            drhd.register_base
        );
    }
    let mmio = LinuxMmio::map(drhd.register_base, drhd.min_register_bytes())?;
    eprintln!(
        "iommud: VT-d unit at {:#x}: {:#x} bytes of registers mapped (HAW {} bits)",
        drhd.register_base,
        mmio.len(),
        dmar.host_address_width
    );
    Ok(mmio)
}

// ---------------------------------------------------------------------------------------
// Physical memory
// ---------------------------------------------------------------------------------------

/// Where [`HugeMem`] gets its memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemSource {
    /// 2 MiB hugepages: table frames carved from them; regions up to 2 MiB.
    Hugepages,
    /// Ordinary locked 4 KiB pages: regions of at most 4 KiB (for hosts without hugepages).
    SmallPages,
}

impl MemSource {
    fn page_size(self) -> usize {
        match self {
            MemSource::Hugepages => HUGE_PAGE_SIZE,
            MemSource::SmallPages => PAGE_SIZE,
        }
    }

    fn alloc(self, len: usize) -> linuxhw::Result<HugeRegion> {
        match self {
            MemSource::Hugepages => HugeRegion::alloc(len),
            MemSource::SmallPages => HugeRegion::alloc_small(len),
        }
    }
}

/// What a chunk of physical memory is used for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Use {
    /// Carved into 4 KiB table frames.
    Tables,
    /// One client region (the whole chunk).
    Region,
}

/// One physically contiguous backing page (2 MiB or 4 KiB) of a [`HugeRegion`].
#[derive(Debug)]
struct Chunk {
    mem: Arc<HugeRegion>,
    /// Offset of the chunk in `mem`.
    off: usize,
    len: usize,
    used: Use,
}

impl Chunk {
    /// Pointer to byte `delta` of the chunk (`delta < len`, checked by the caller).
    fn ptr(&self, delta: usize) -> *mut u8 {
        self.mem.as_ptr().wrapping_add(self.off + delta)
    }
}

#[derive(Debug, Default)]
struct Inner {
    /// Every chunk iommud owns, by physical base.
    chunks: BTreeMap<u64, Chunk>,
    /// Free 4 KiB table frames.
    free_frames: BTreeSet<u64>,
    /// Table frames in all pools.
    frames_total: usize,
}

impl Inner {
    /// The chunk holding `[phys, phys+width)` and the offset of `phys` in it.
    fn find(&self, phys: u64, width: usize) -> Option<(&Chunk, usize)> {
        let (&base, chunk) = self.chunks.range(..=phys).next_back()?;
        let delta = usize::try_from(phys - base).ok()?;
        (delta.checked_add(width)? <= chunk.len).then_some((chunk, delta))
    }

    /// Adds every backing page of `mem` as a chunk; false (and nothing added) on overlap,
    /// which would mean pagemap lied.
    fn insert(&mut self, mem: &Arc<HugeRegion>, used: Use) -> bool {
        let page = mem.page_size();
        let overlap = mem.chunks().any(|(_, phys)| {
            self.find(phys, 1).is_some()
                || self
                    .chunks
                    .range(phys..phys.saturating_add(page as u64))
                    .next()
                    .is_some()
        });
        if overlap {
            return false;
        }
        for (off, phys) in mem.chunks() {
            self.chunks.insert(
                phys,
                Chunk {
                    mem: Arc::clone(mem),
                    off,
                    len: page,
                    used,
                },
            );
        }
        true
    }
}

/// Physical memory for the `linux` platform.
///
/// Table frames are carved from pools of backing pages (one 2 MiB hugepage per pool, or
/// [`SMALL_POOL_PAGES`] 4 KiB pages) and tracked in a free set, so freed frames are reused;
/// pools are never returned to the OS. Each client region is a fresh memfd of one backing
/// page, so it is physically contiguous and can be passed by fd; it lives until
/// [`PhysMem::free_region`]. Physical-to-virtual lookups go through an ordered map of chunk
/// bases (O(log n)) under a read lock; accesses happen under that lock, so a concurrent
/// `free_region` cannot unmap memory mid-access.
#[derive(Debug)]
pub struct HugeMem {
    source: MemSource,
    inner: RwLock<Inner>,
}

impl HugeMem {
    /// Uses 2 MiB hugepages, or falls back (logged) to 4 KiB pages if the first hugepage
    /// cannot be had (none reserved, or hugetlbfs missing).
    pub fn new() -> Result<HugeMem, HwError> {
        match HugeMem::with_source(MemSource::Hugepages) {
            Ok(m) => Ok(m),
            Err(e) => {
                eprintln!(
                    "iommud: hugepages unavailable ({e}); falling back to 4 KiB pages: \
                     client regions are limited to 4 KiB"
                );
                HugeMem::with_source(MemSource::SmallPages)
            }
        }
    }

    /// Uses the given source only; allocates the first table-frame pool now, so a source
    /// that cannot work (no hugepages, PFNs hidden from non-root) fails here.
    pub fn with_source(source: MemSource) -> Result<HugeMem, HwError> {
        let m = HugeMem {
            source,
            inner: RwLock::new(Inner::default()),
        };
        m.grow(&mut m.write())?;
        Ok(m)
    }

    /// The memory source in use.
    pub fn source(&self) -> MemSource {
        self.source
    }

    /// Largest region [`PhysMem::alloc_region`] can return (one backing page).
    pub fn max_region(&self) -> u64 {
        self.source.page_size() as u64
    }

    /// Table frames currently allocated.
    pub fn frames_in_use(&self) -> usize {
        let g = self.read();
        g.frames_total - g.free_frames.len()
    }

    /// Client regions currently allocated.
    pub fn regions_live(&self) -> usize {
        self.read()
            .chunks
            .values()
            .filter(|c| c.used == Use::Region && c.off == 0)
            .count()
    }

    fn read(&self) -> RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds one pool of table frames.
    fn grow(&self, inner: &mut Inner) -> Result<(), HwError> {
        let len = match self.source {
            MemSource::Hugepages => HUGE_PAGE_SIZE,
            MemSource::SmallPages => SMALL_POOL_PAGES * PAGE_SIZE,
        };
        let mem = Arc::new(
            self.source
                .alloc(len)
                .map_err(|e| os_err("allocate table-frame pool", e))?,
        );
        if !inner.insert(&mem, Use::Tables) {
            return Err(HwError::Hardware(
                "pagemap gave a physical address iommud already owns".into(),
            ));
        }
        for (_, phys) in mem.chunks() {
            for f in (0..mem.page_size() as u64).step_by(PAGE_SIZE) {
                inner.free_frames.insert(phys + f);
                inner.frames_total += 1;
            }
        }
        Ok(())
    }
}

/// Writes back and invalidates the cache lines covering `[p, p+len)`, then fences.
/// `p..p+len` must lie in one live mapping that starts on a 4 KiB boundary.
fn clflush_range(p: *const u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        let misalign = p as usize % CACHE_LINE;
        let first = p.wrapping_sub(misalign);
        let mut at = 0;
        while at < misalign + len {
            // SAFETY: the line starts inside the caller's live mapping (rounding down to a
            // cache line stays inside its 4 KiB-aligned start); clflush writes the line back
            // and invalidates it without changing memory contents.
            unsafe { core::arch::x86_64::_mm_clflush(first.wrapping_add(at)) };
            at += CACHE_LINE;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, len, CACHE_LINE);
    // A SeqCst fence is MFENCE on x86-64, which orders the CLFLUSHes before later stores
    // (e.g. the register write telling the unit to look at the tables).
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
}

impl PhysMem for HugeMem {
    fn alloc_frame(&self) -> Result<u64, HwError> {
        let mut g = self.write();
        if g.free_frames.is_empty() {
            self.grow(&mut g)?;
        }
        let phys = g
            .free_frames
            .pop_first()
            .ok_or(HwError::NoMemory("table-frame pool empty after growing"))?;
        let Some((chunk, delta)) = g.find(phys, PAGE_SIZE) else {
            return Err(HwError::BadPhys(phys));
        };
        let p = chunk.ptr(delta);
        for i in 0..PAGE_SIZE / 8 {
            // SAFETY: the frame lies inside a live mapping we own (found in the chunk map),
            // is 4 KiB aligned and free (no device is pointed at it); raw volatile writes, no
            // reference into DMA memory.
            unsafe { p.cast::<u64>().add(i).write_volatile(0) };
        }
        // The unit may read the whole frame without snooping (ECAP.C = 0 under QEMU).
        clflush_range(p, PAGE_SIZE);
        Ok(phys)
    }

    fn free_frame(&self, phys: u64) {
        let mut g = self.write();
        let is_frame = phys.is_multiple_of(FRAME)
            && g.find(phys, PAGE_SIZE)
                .is_some_and(|(c, _)| c.used == Use::Tables);
        if !is_frame {
            eprintln!("iommud: BUG: free_frame({phys:#x}): not a table frame; ignored");
        } else if !g.free_frames.insert(phys) {
            eprintln!("iommud: BUG: free_frame({phys:#x}): double free; ignored");
        }
    }

    fn alloc_region(&self, len: u64, align: u64) -> Result<Region, HwError> {
        let page = self.max_region();
        if len == 0 {
            return Err(HwError::NoMemory("zero-length region requested"));
        }
        if len > page {
            return Err(match self.source {
                MemSource::Hugepages => HwError::NoMemory("region larger than one hugepage"),
                MemSource::SmallPages => {
                    HwError::NoMemory("region larger than 4 KiB without hugepages")
                }
            });
        }
        if !align.is_power_of_two() || align > page {
            return Err(HwError::NoMemory(
                "region alignment not a power of two or above the page size",
            ));
        }
        // A fresh memfd per region: the fd handed to the client maps exactly this memory.
        let mem = Arc::new(
            self.source
                .alloc(page as usize)
                .map_err(|e| os_err("allocate client region", e))?,
        );
        let (_, phys) = mem
            .chunks()
            .next()
            .ok_or(HwError::NoMemory("region allocation returned no pages"))?;
        if !phys.is_multiple_of(align) {
            return Err(HwError::NoMemory("region not aligned as requested"));
        }
        let fd: OwnedFd = mem.fd().try_clone_to_owned().map_err(|err| HwError::Os {
            what: "dup region memfd",
            err,
        })?;
        if !self.write().insert(&mem, Use::Region) {
            return Err(HwError::Hardware(format!(
                "pagemap gave region phys {phys:#x}, which iommud already owns"
            )));
        }
        Ok(Region {
            fd: Arc::new(fd),
            fd_offset: 0,
            phys,
            len: mem.len() as u64,
        })
    }

    fn free_region(&self, region: &Region) {
        let mut g = self.write();
        match g.chunks.get(&region.phys) {
            Some(c) if c.used == Use::Region && c.off == 0 => {
                let mem = Arc::clone(&c.mem);
                for (_, phys) in mem.chunks() {
                    g.chunks.remove(&phys);
                }
                // `mem` drops here: the mapping goes; a client's own mapping keeps the memfd.
            }
            _ => eprintln!(
                "iommud: BUG: free_region({:#x}, {:#x} bytes): not a live region; ignored",
                region.phys, region.len
            ),
        }
    }

    fn read_u64(&self, phys: u64) -> Result<u64, HwError> {
        let g = self.read();
        match g.find(phys, 8) {
            Some((c, d)) if phys.is_multiple_of(8) => {
                // SAFETY: 8 bytes in bounds of a live mapping (checked by `find`), 8-byte
                // aligned (chunks are page-aligned); volatile because the device may write.
                Ok(unsafe { c.ptr(d).cast::<u64>().read_volatile() })
            }
            _ => Err(HwError::BadPhys(phys)),
        }
    }

    fn write_u64(&self, phys: u64, v: u64) -> Result<(), HwError> {
        let g = self.read();
        match g.find(phys, 8) {
            Some((c, d)) if phys.is_multiple_of(8) => {
                // SAFETY: as for read_u64; no Rust reference into the memory exists.
                unsafe { c.ptr(d).cast::<u64>().write_volatile(v) };
                Ok(())
            }
            _ => Err(HwError::BadPhys(phys)),
        }
    }

    fn read_u32(&self, phys: u64) -> Result<u32, HwError> {
        let g = self.read();
        match g.find(phys, 4) {
            Some((c, d)) if phys.is_multiple_of(4) => {
                // SAFETY: 4 bytes in bounds of a live mapping, 4-byte aligned; volatile
                // because the unit writes status words (invalidation wait) behind our back.
                Ok(unsafe { c.ptr(d).cast::<u32>().read_volatile() })
            }
            _ => Err(HwError::BadPhys(phys)),
        }
    }

    fn flush(&self, phys: u64, len: u64) {
        let g = self.read();
        let end = phys.saturating_add(len);
        let mut at = phys;
        while at < end {
            let Some((c, d)) = g.find(at, 1) else {
                eprintln!("iommud: BUG: flush({phys:#x}, {len:#x}): {at:#x} is not ours");
                return;
            };
            let n = (c.len - d).min(usize::try_from(end - at).unwrap_or(usize::MAX));
            clflush_range(c.ptr(d), n);
            at += n as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// QEMU's intel-iommu, as measured in the guest (docs/ARCHITECTURE.md, "Platforms").
    const QEMU_CAP: u64 = 0x00D2_008C_222F_0606;

    #[test]
    fn mmio_over_a_file_logs_bad_offsets_instead_of_panicking() {
        let path = std::env::temp_dir().join(format!("iommud-linux-mmio-{}", std::process::id()));
        let mut bytes = vec![0u8; PAGE_SIZE];
        bytes[CAP..CAP + 8].copy_from_slice(&QEMU_CAP.to_le_bytes());
        std::fs::write(&path, &bytes).expect("write temp register file");
        let regs = MmioRegion::from_file(&path, PAGE_SIZE).expect("map temp file");
        let _ = std::fs::remove_file(&path);
        let m = LinuxMmio::from_region(regs);
        assert_eq!(m.len(), PAGE_SIZE);
        assert_eq!(m.read64(CAP), QEMU_CAP);
        m.write32(0x20, 0xdead_beef);
        m.write64(0x28, 0x0123_4567_89ab_cdef);
        assert_eq!(m.read32(0x20), 0xdead_beef);
        assert_eq!(m.read64(0x28), 0x0123_4567_89ab_cdef);
        // Out of range and misaligned: 0 and ignored, no panic.
        assert_eq!(m.read32(PAGE_SIZE), 0);
        assert_eq!(m.read64(PAGE_SIZE - 4), 0);
        assert_eq!(m.read64(0x2c), 0);
        m.write64(PAGE_SIZE, 1);
        m.write32(usize::MAX - 1, 1);
    }

    /// The small-page source (4 KiB pages, real PFNs as root), or `None` with a note when
    /// this host hides PFNs.
    fn small() -> Option<HugeMem> {
        match HugeMem::with_source(MemSource::SmallPages) {
            Ok(m) => Some(m),
            Err(e) => {
                eprintln!("skipping: 4 KiB physical memory unavailable here: {e}");
                None
            }
        }
    }

    #[test]
    fn frames_are_aligned_zeroed_distinct_and_reused() {
        let Some(m) = small() else { return };
        assert_eq!(m.source(), MemSource::SmallPages);
        // Exactly three pools' worth: the pool grows twice and ends up full.
        let n = SMALL_POOL_PAGES * 3;
        let mut frames = Vec::new();
        for i in 0..n {
            let f = m.alloc_frame().expect("frame");
            assert_eq!(f % FRAME, 0, "frame {f:#x} not 4 KiB aligned");
            for off in (0..FRAME).step_by(8) {
                assert_eq!(m.read_u64(f + off).expect("read"), 0, "frame {f:#x} dirty");
            }
            // Dirty it so reuse must zero it again.
            m.write_u64(f, 0xabc0 + i as u64).expect("write");
            m.write_u64(f + FRAME - 8, u64::MAX).expect("write");
            frames.push(f);
        }
        let set: BTreeSet<u64> = frames.iter().copied().collect();
        assert_eq!(set.len(), n, "frames handed out twice");
        assert_eq!(m.frames_in_use(), n);

        let victim = frames[5];
        m.free_frame(victim);
        m.free_frame(victim); // double free: logged, ignored
        m.free_frame(victim + 8); // not a frame: ignored
        assert_eq!(m.frames_in_use(), n - 1);
        let again = m.alloc_frame().expect("frame");
        assert_eq!(again, victim, "the only free frame must be reused");
        assert_eq!(m.read_u64(again).expect("read"), 0);
        assert_eq!(m.read_u64(again + FRAME - 8).expect("read"), 0);
        for f in frames {
            m.free_frame(f);
        }
        assert_eq!(m.frames_in_use(), 0);
    }

    #[test]
    fn phys_accesses_agree_with_the_virtual_mapping() {
        let Some(m) = small() else { return };
        let f = m.alloc_frame().expect("frame");
        let ptr = {
            let g = m.read();
            let (c, d) = g.find(f, PAGE_SIZE).expect("frame is mapped");
            c.ptr(d)
        };
        // Pagemap agrees that this virtual page is at `f`.
        assert_eq!(linuxhw::hugemem::virt_to_phys(ptr).expect("pagemap"), f);
        m.write_u64(f + 16, 0x1122_3344_5566_7788).expect("write");
        // SAFETY: `ptr` is the frame's mapping, live while `m` is; 8-aligned, volatile.
        let via_virt = unsafe { ptr.add(16).cast::<u64>().read_volatile() };
        assert_eq!(via_virt, 0x1122_3344_5566_7788);
        // SAFETY: as above.
        unsafe {
            ptr.add(24)
                .cast::<u64>()
                .write_volatile(0x99aa_bbcc_ddee_ff00)
        };
        assert_eq!(m.read_u64(f + 24).expect("read"), 0x99aa_bbcc_ddee_ff00);
        assert_eq!(m.read_u32(f + 24).expect("read"), 0xddee_ff00);
        assert_eq!(m.read_u32(f + 28).expect("read"), 0x99aa_bbcc);
        m.flush(f, FRAME);
        m.flush(f + 60, 10); // straddles a line
    }

    #[test]
    fn bad_phys_is_refused() {
        let Some(m) = small() else { return };
        let f = m.alloc_frame().expect("frame");
        assert!(matches!(m.read_u64(0), Err(HwError::BadPhys(0))));
        assert!(matches!(
            m.write_u64(u64::MAX - 3, 1),
            Err(HwError::BadPhys(_))
        ));
        assert!(matches!(m.read_u32(u64::MAX), Err(HwError::BadPhys(_))));
        // Misaligned.
        assert!(matches!(m.read_u64(f + 4), Err(HwError::BadPhys(_))));
        assert!(matches!(m.read_u32(f + 2), Err(HwError::BadPhys(_))));
        // An address just past the last chunk iommud owns.
        let last = {
            let g = m.read();
            let (&b, c) = g.chunks.iter().next_back().expect("a chunk");
            b + c.len as u64
        };
        assert!(matches!(m.read_u64(last), Err(HwError::BadPhys(p)) if p == last));
    }

    #[test]
    fn regions_are_shared_through_their_fd() {
        let Some(m) = small() else { return };
        let r = m.alloc_region(100, 64).expect("region");
        assert_eq!(r.len, FRAME, "small source gives one whole 4 KiB page");
        assert_eq!(r.fd_offset, 0);
        assert_eq!(r.phys % FRAME, 0);
        assert_eq!(m.regions_live(), 1);
        // Zeroed.
        for off in (0..r.len).step_by(8) {
            assert_eq!(m.read_u64(r.phys + off).expect("read"), 0);
        }
        // Mapped as a client maps it.
        let client = iommu_abi::shm::Mapping::new(
            std::os::fd::AsFd::as_fd(&*r.fd),
            r.fd_offset,
            usize::try_from(r.len).expect("region length fits"),
        )
        .expect("client mapping");
        for i in 0..r.len / 8 {
            m.write_u64(r.phys + i * 8, 0x5a5a_0000_0000_0000 | i)
                .expect("write");
        }
        for i in 0..r.len / 8 {
            assert_eq!(
                client.read_u64(i as usize * 8),
                Some(0x5a5a_0000_0000_0000 | i)
            );
        }
        // The client's mapping (faulted in above) is the same physical page.
        assert_eq!(
            linuxhw::hugemem::virt_to_phys(client.as_ptr()).expect("pagemap"),
            r.phys
        );
        client
            .write_bytes(8, &0x600d_f00du32.to_le_bytes())
            .expect("in bounds");
        assert_eq!(m.read_u32(r.phys + 8).expect("read"), 0x600d_f00d);

        // Limits of the small source.
        assert!(matches!(
            m.alloc_region(FRAME + 1, 8),
            Err(HwError::NoMemory(_))
        ));
        assert!(matches!(m.alloc_region(64, 3), Err(HwError::NoMemory(_))));
        assert!(matches!(m.alloc_region(0, 8), Err(HwError::NoMemory(_))));
        // Regions are not table frames.
        m.free_frame(r.phys);
        assert_eq!(m.frames_in_use(), 0);

        m.free_region(&r);
        assert_eq!(m.regions_live(), 0);
        assert!(matches!(m.read_u64(r.phys), Err(HwError::BadPhys(_))));
        m.free_region(&r); // double free: logged, ignored
                           // The client's mapping outlives iommud's: memfd pages stay.
        assert_eq!(client.read_u64(0), Some(0x5a5a_0000_0000_0000));
        drop(client);
    }

    #[test]
    fn frames_from_many_threads_are_distinct() {
        let Some(m) = small() else { return };
        let m = Arc::new(m);
        let per = 40;
        let all: Vec<u64> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4)
                .map(|_| {
                    let m = Arc::clone(&m);
                    s.spawn(move || {
                        (0..per)
                            .map(|_| m.alloc_frame().expect("frame"))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            hs.into_iter()
                .flat_map(|h| h.join().expect("thread"))
                .collect()
        });
        let set: BTreeSet<u64> = all.iter().copied().collect();
        assert_eq!(set.len(), 4 * per);
    }

    #[test]
    fn new_falls_back_when_hugepages_are_missing() {
        match HugeMem::new() {
            Ok(m) => {
                if m.source() == MemSource::Hugepages {
                    assert_eq!(m.max_region(), HUGE_PAGE_SIZE as u64);
                    let r = m
                        .alloc_region(HUGE_PAGE_SIZE as u64, 0x20_0000)
                        .expect("2 MiB");
                    assert_eq!(r.phys % 0x20_0000, 0);
                    m.write_u64(r.phys + 0x1f_fff8, 7)
                        .expect("write at the end");
                    assert!(matches!(
                        m.alloc_region(HUGE_PAGE_SIZE as u64 + 1, 8),
                        Err(HwError::NoMemory("region larger than one hugepage"))
                    ));
                    m.free_region(&r);
                } else {
                    assert_eq!(m.max_region(), FRAME);
                }
            }
            Err(e) => eprintln!("skipping: no physical memory source on this host: {e}"),
        }
    }
}
