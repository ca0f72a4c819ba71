//! Physical memory for the linux platform: table frames and client regions
//! from 2 MiB hugepages (or locked 4 KiB pages), physical addresses from
//! `/proc/self/pagemap`.

use super::*;
use crate::hw::SharedMem;

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
    /// Where named memory files go (`None`: anonymous memfds, which the kernel takes
    /// back when the process exits).
    files: Option<Files>,
}

/// Named memory files in iommud's state directory (see `crate::persist`).
#[derive(Debug)]
struct Files {
    dir: std::path::PathBuf,
    /// Every file name starts with this (`iommud-<pid>-`).
    prefix: String,
    next: std::sync::atomic::AtomicU64,
    /// The file of each live client region, by physical base.
    regions: Mutex<BTreeMap<u64, std::path::PathBuf>>,
    /// Where shared pages (published, client) live: tmpfs, in files.
    pages: std::path::PathBuf,
}

impl Files {
    fn alloc(
        &self,
        source: MemSource,
        len: usize,
        kind: &str,
    ) -> linuxhw::Result<(HugeRegion, std::path::PathBuf)> {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = self.dir.join(format!("{}{n}-{kind}", self.prefix));
        let huge = source == MemSource::Hugepages;
        Ok((HugeRegion::create_file(&path, len, huge)?, path))
    }
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
            files: None,
        };
        m.grow(&mut m.write())?;
        Ok(m)
    }

    /// All memory (table-frame pools and client regions) in named files in `dir`, each
    /// named `<prefix><n>-tables` or `<prefix><n>-region`: 2 MiB hugepages when `dir` is
    /// on hugetlbfs, locked 4 KiB pages otherwise (tmpfs). Table pools are never removed
    /// by this process, so the unit's root table and queue outlive it (even `kill -9`);
    /// a region's file is removed when the region is freed. See `crate::persist`.
    pub fn in_dir(
        dir: &std::path::Path,
        pages: &std::path::Path,
        prefix: String,
    ) -> Result<HugeMem, HwError> {
        let source = if crate::persist::on_hugetlbfs(dir) {
            MemSource::Hugepages
        } else {
            MemSource::SmallPages
        };
        let m = HugeMem {
            source,
            inner: RwLock::new(Inner::default()),
            files: Some(Files {
                dir: dir.to_path_buf(),
                prefix,
                next: Default::default(),
                regions: Mutex::new(BTreeMap::new()),
                pages: pages.to_path_buf(),
            }),
        };
        m.grow(&mut m.write())?;
        Ok(m)
    }

    /// Allocates backing memory: a named file when configured, else a memfd.
    fn alloc_mem(
        &self,
        len: usize,
        kind: &str,
    ) -> linuxhw::Result<(HugeRegion, Option<std::path::PathBuf>)> {
        match &self.files {
            Some(f) => f.alloc(self.source, len, kind).map(|(r, p)| (r, Some(p))),
            None => self.source.alloc(len).map(|r| (r, None)),
        }
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
        let (mem, _file) = self
            .alloc_mem(len, "tables")
            .map_err(|e| os_err("allocate table-frame pool", e))?;
        let mem = Arc::new(mem);
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
        self.alloc_region_kind(len, align, "region")
    }

    fn alloc_ledger(&self, len: u64) -> Result<Region, HwError> {
        self.alloc_region_kind(len, PAGE_SIZE as u64, "ledger")
    }

    fn alloc_shared(&self, len: usize, client_writable: bool) -> Result<SharedMem, HwError> {
        let Some(files) = &self.files else {
            return crate::platform::shm::create(len, client_writable);
        };
        let n = files
            .next
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let kind = if client_writable {
            "client"
        } else {
            "published"
        };
        let path = files.pages.join(format!("{}{n}-{kind}", files.prefix));
        crate::platform::shm::create_file(&path, len, client_writable)
    }

    fn shared_name(&self, m: &SharedMem) -> Option<String> {
        self.files.as_ref()?;
        crate::platform::shm::file_name(m)
    }

    fn adopt_shared(
        &self,
        name: &str,
        len: usize,
        client_writable: bool,
    ) -> Result<SharedMem, HwError> {
        let files = self.files.as_ref().ok_or(HwError::Unsupported(
            "shared pages are not kept in files (no state directory)".into(),
        ))?;
        let kind = if client_writable {
            "-client"
        } else {
            "-published"
        };
        if !name.starts_with("iommud-") || !name.ends_with(kind) || name.contains('/') {
            return Err(HwError::Hardware(format!(
                "{name:?} is not a shared page file"
            )));
        }
        crate::platform::shm::open_file(&files.pages.join(name), len, client_writable)
    }

    fn free_shared(&self, m: &SharedMem) {
        if let (Some(files), Some(name)) = (&self.files, self.shared_name(m)) {
            let _ = std::fs::remove_file(files.pages.join(name));
        }
    }

    fn region_name(&self, phys: u64) -> Option<String> {
        let files = self.files.as_ref()?;
        let g = lock(&files.regions);
        let p = g.get(&phys)?;
        Some(p.file_name()?.to_str()?.to_string())
    }

    fn adopt_region(
        &self,
        phys: Option<u64>,
        len: u64,
        name: Option<&str>,
    ) -> Result<Region, HwError> {
        let files = self.files.as_ref().ok_or(HwError::Unsupported(
            "memory is not kept in named files (no state directory)".into(),
        ))?;
        let name = name.ok_or(HwError::Unsupported("adopting needs a file name".into()))?;
        // Names come from a ledger iommud wrote, but a file name is checked anyway:
        // one plain name of ours, inside the state directory.
        let ours = name.starts_with("iommud-")
            && (name.ends_with("-region") || name.ends_with("-ledger"))
            && !name.contains('/')
            && name.len() < 64;
        if !ours {
            return Err(HwError::Hardware(format!(
                "{name:?} is not a memory file name"
            )));
        }
        let path = files.dir.join(name);
        let huge = self.source == MemSource::Hugepages;
        let mem =
            HugeRegion::open_file(&path, huge).map_err(|e| os_err("adopt a memory file", e))?;
        let Some((_, base)) = mem.chunks().next() else {
            return Err(HwError::NoMemory("an adopted file has no pages"));
        };
        if phys.is_some_and(|p| p != base) || (len != 0 && mem.len() as u64 != len) {
            return Err(HwError::Hardware(format!(
                "{name}: found at {base:#x}, {} bytes; expected {phys:x?}, {len} bytes",
                mem.len()
            )));
        }
        let fd: OwnedFd = mem.fd().try_clone_to_owned().map_err(|err| HwError::Os {
            what: "dup adopted file",
            err,
        })?;
        let mem = Arc::new(mem);
        if !self.write().insert(&mem, Use::Region) {
            return Err(HwError::Hardware(format!(
                "{name}: its pages at {base:#x} are already iommud's"
            )));
        }
        lock(&files.regions).insert(base, path);
        Ok(Region {
            fd: Arc::new(fd),
            fd_offset: 0,
            phys: base,
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
                // No device reaches the region any more (its domain's context entry was
                // cleared and invalidated before any pool is freed): its file may go.
                if let Some(files) = &self.files {
                    if let Some(f) = lock(&files.regions).remove(&region.phys) {
                        let _ = std::fs::remove_file(f);
                    }
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

    fn write_u64s(&self, phys: u64, vals: &[u64]) -> Result<(), HwError> {
        let g = self.read();
        match g.find(phys, vals.len() * 8) {
            Some((c, d)) if phys.is_multiple_of(8) => {
                for (k, v) in vals.iter().enumerate() {
                    // SAFETY: the whole run lies in one chunk (find checked
                    // `vals.len() * 8` bytes from `phys`), 8-aligned; no Rust
                    // reference into the memory exists.
                    unsafe { c.ptr(d + 8 * k).cast::<u64>().write_volatile(*v) };
                }
                Ok(())
            }
            // A run across two chunks (or a bad address): one by one.
            _ => {
                drop(g);
                for (k, v) in vals.iter().enumerate() {
                    self.write_u64(phys + 8 * k as u64, *v)?;
                }
                Ok(())
            }
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

// The platform's host tests (registers and memory) sit under the memory
// module, whose private bookkeeping they inspect.
#[cfg(test)]
#[path = "tests.rs"]
mod tests;

impl HugeMem {
    fn alloc_region_kind(&self, len: u64, align: u64, kind: &str) -> Result<Region, HwError> {
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
        let (mem, file) = self
            .alloc_mem(page as usize, kind)
            .map_err(|e| os_err("allocate client region", e))?;
        let mem = Arc::new(mem);
        let remove = |file: &Option<std::path::PathBuf>| {
            if let Some(f) = file {
                let _ = std::fs::remove_file(f);
            }
        };
        let Some((_, phys)) = mem.chunks().next() else {
            remove(&file);
            return Err(HwError::NoMemory("region allocation returned no pages"));
        };
        if !phys.is_multiple_of(align) {
            remove(&file);
            return Err(HwError::NoMemory("region not aligned as requested"));
        }
        let fd: OwnedFd = mem.fd().try_clone_to_owned().map_err(|err| HwError::Os {
            what: "dup region memfd",
            err,
        })?;
        if !self.write().insert(&mem, Use::Region) {
            remove(&file);
            return Err(HwError::Hardware(format!(
                "pagemap gave region phys {phys:#x}, which iommud already owns"
            )));
        }
        if let (Some(files), Some(f)) = (&self.files, file) {
            lock(&files.regions).insert(phys, f);
        }
        Ok(Region {
            fd: Arc::new(fd),
            fd_offset: 0,
            phys,
            len: mem.len() as u64,
        })
    }
}
