//! iommud's hardware on Redox: [`RegisterWindow`] (the VT-d registers, an
//! [`Mmio`] over a mapping of the DRHD base) and [`RedoxMem`] (a [`PhysMem`]
//! over physically contiguous blocks from the kernel's memory scheme).
//!
//! Everything here but [`kernel`] is platform-free and tested on the host: the
//! register window is any mapping, and [`RedoxMem`] is generic over a
//! [`Backing`] that hands out mapped, physically contiguous blocks. The tests
//! use heap memory with made-up physical addresses; on Redox
//! [`kernel::KernelMemory`] opens the memory scheme. Frames for tables are
//! carved from 2 MiB blocks with [`RangeAllocator`]; a client region is one
//! block of its own (its own file handle, so the scheme's `mmap_prep` can find
//! it by handle through [`SharedRegions`]).

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, MutexGuard};

use iommud::hw::{HwError, Mmio, PhysMem, Region};
use iommud::range_alloc::RangeAllocator;
use iommud::session::Share;
use syscall::error::{Error, Result as SysResult, EBADF};

use crate::scheme::RegionMapper;

/// Page size.
pub const PAGE: u64 = 4096;
/// Bytes of table frames fetched from the kernel at once.
pub const FRAME_BLOCK: u64 = 2 << 20;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// ---------------------------------------------------------------------------
// Address arithmetic
// ---------------------------------------------------------------------------

/// The page-aligned window to map for `len` bytes at physical `phys`:
/// (aligned base, bytes to map, offset of `phys` inside the window).
pub fn page_window(phys: u64, len: u64) -> Option<(u64, u64, u64)> {
    let base = phys & !(PAGE - 1);
    let within = phys - base;
    let end = phys
        .checked_add(len.max(1))?
        .checked_next_multiple_of(PAGE)?;
    Some((base, end - base, within))
}

/// Bytes to ask the kernel for so that a block at any page-aligned physical
/// address holds `len` bytes aligned to `align` (a power of two).
pub fn padded_len(len: u64, align: u64) -> Option<u64> {
    if len == 0 || !align.is_power_of_two() {
        return None;
    }
    let len = len.checked_next_multiple_of(PAGE)?;
    len.checked_add(align.max(PAGE) - PAGE)
}

/// Offset inside a block at `phys` of `block_len` bytes where `len` bytes
/// aligned to `align` start, if they fit.
pub fn aligned_offset(phys: u64, block_len: u64, len: u64, align: u64) -> Option<u64> {
    let align = align.max(PAGE);
    let at = phys.checked_next_multiple_of(align)?;
    let off = at - phys;
    (off.checked_add(len)? <= block_len).then_some(off)
}

/// The unit iommud drives, from the DMAR table's bytes: (register base,
/// bytes to map at least, from the DRHD size field: 2^N pages), and a line per
/// DRHD for the log. Same parser and choice as the Linux platform
/// ([`vtd::dmar::choose_drhd`]).
pub fn drhd_plan(dmar: &[u8]) -> Result<(u64, usize, Vec<String>), String> {
    let dmar = vtd::dmar::parse(dmar).map_err(|e| format!("DMAR: {e}"))?;
    let log = dmar
        .drhds
        .iter()
        .map(|d| {
            format!(
                "DRHD at {:#x}, segment {}, flags {:#x}, {} scope(s)",
                d.register_base,
                d.segment,
                d.flags,
                d.scopes.len()
            )
        })
        .collect();
    let d = vtd::dmar::choose_drhd(&dmar).ok_or("the DMAR table lists no DRHD (no VT-d unit)")?;
    Ok((d.register_base, d.min_register_bytes(), log))
}

// ---------------------------------------------------------------------------
// Registers
// ---------------------------------------------------------------------------

/// A VT-d register set mapped at some address: volatile, bounds-checked
/// accesses. An access outside the window or misaligned is an iommud bug: it
/// is logged and reads as all-ones / is dropped, never a panic.
pub struct RegisterWindow {
    base: *mut u8,
    len: usize,
}

// SAFETY: the window is MMIO (or, in tests, memory no Rust reference aliases);
// every access is a single volatile load or store.
unsafe impl Send for RegisterWindow {}
// SAFETY: as above; VT-d registers tolerate accesses from any thread, and
// iommud serialises the sequences that must not interleave.
unsafe impl Sync for RegisterWindow {}

impl RegisterWindow {
    /// A window over `len` bytes at `base`.
    ///
    /// # Safety
    /// `base..base+len` must stay mapped for the window's lifetime and must
    /// not be accessed through Rust references.
    pub unsafe fn new(base: *mut u8, len: usize) -> Self {
        RegisterWindow { base, len }
    }

    /// Bytes mapped.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if nothing is mapped.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn at(&self, off: usize, width: usize, what: &str) -> Option<*mut u8> {
        if !off.is_multiple_of(width) || off.checked_add(width).is_none_or(|e| e > self.len) {
            eprintln!(
                "iommud: bug: {what} at register offset {off:#x} (window {:#x} bytes)",
                self.len
            );
            return None;
        }
        // SAFETY: off + width <= len, inside the mapping (checked above).
        Some(unsafe { self.base.add(off) })
    }
}

impl Mmio for RegisterWindow {
    fn read32(&self, off: usize) -> u32 {
        match self.at(off, 4, "read32") {
            // SAFETY: in bounds and 4-byte aligned (the base is page-aligned).
            Some(p) => unsafe { p.cast::<u32>().read_volatile() },
            None => u32::MAX,
        }
    }
    fn read64(&self, off: usize) -> u64 {
        match self.at(off, 8, "read64") {
            // SAFETY: in bounds and 8-byte aligned.
            Some(p) => unsafe { p.cast::<u64>().read_volatile() },
            None => u64::MAX,
        }
    }
    fn write32(&self, off: usize, v: u32) {
        if let Some(p) = self.at(off, 4, "write32") {
            // SAFETY: in bounds and 4-byte aligned.
            unsafe { p.cast::<u32>().write_volatile(v) }
        }
    }
    fn write64(&self, off: usize, v: u64) {
        if let Some(p) = self.at(off, 8, "write64") {
            // SAFETY: in bounds and 8-byte aligned.
            unsafe { p.cast::<u64>().write_volatile(v) }
        }
    }
}

// ---------------------------------------------------------------------------
// Physical memory
// ---------------------------------------------------------------------------

/// A physically contiguous block mapped in iommud: byte `i` at `virt + i`
/// has physical address `phys + i`.
#[derive(Clone, Debug)]
pub struct Block {
    /// Address in iommud's address space.
    pub virt: usize,
    /// Physical address of the first byte.
    pub phys: u64,
    /// Length in bytes (a page multiple).
    pub len: u64,
    /// The handle the block was mapped from (names the block for `mmap_prep`).
    pub fd: Arc<OwnedFd>,
}

/// Where [`RedoxMem`] gets its memory: zeroed, physically contiguous, mapped.
pub trait Backing: Send + Sync {
    /// A zeroed block of `len` bytes (a page multiple).
    fn alloc(&self, len: u64) -> Result<Block, HwError>;
    /// Unmaps and gives back a block from [`Backing::alloc`].
    fn free(&self, block: &Block);
}

/// Physical → virtual lookup over the blocks iommud owns.
#[derive(Default, Debug)]
pub struct PhysBook {
    blocks: BTreeMap<u64, (u64, usize)>,
}

impl PhysBook {
    /// Records `[phys, phys+len)` mapped at `virt`.
    pub fn insert(&mut self, phys: u64, len: u64, virt: usize) {
        self.blocks.insert(phys, (len, virt));
    }

    /// Forgets the block starting at `phys`.
    pub fn remove(&mut self, phys: u64) -> Option<(u64, usize)> {
        self.blocks.remove(&phys)
    }

    /// The virtual address of `width` bytes at `phys`, if one block holds them all.
    pub fn virt(&self, phys: u64, width: u64) -> Option<usize> {
        let (&start, &(len, virt)) = self.blocks.range(..=phys).next_back()?;
        let end = phys.checked_add(width)?;
        (end <= start + len).then(|| virt + (phys - start) as usize)
    }
}

/// Table frames carved from blocks, one [`RangeAllocator`] per block.
#[derive(Default, Debug)]
pub struct FramePool {
    blocks: Vec<(u64, RangeAllocator)>,
}

impl FramePool {
    /// Adds a block of `len` bytes at `phys` to carve frames from.
    pub fn add_block(&mut self, phys: u64, len: u64) {
        self.blocks.push((phys, RangeAllocator::new(phys, len)));
    }

    /// One 4 KiB frame, or `None` when every block is full.
    pub fn alloc(&mut self) -> Option<u64> {
        self.blocks
            .iter_mut()
            .find_map(|(_, a)| a.alloc(PAGE, PAGE))
    }

    /// Frees a frame; false if it was not allocated from this pool.
    pub fn free(&mut self, phys: u64) -> bool {
        self.blocks
            .iter_mut()
            .find(|(start, _)| phys >= *start && phys < start + FRAME_BLOCK)
            .is_some_and(|(_, a)| a.free(phys, PAGE))
    }
}

/// The regions handed to clients, by the handle their [`Share`] carries:
/// what the scheme's `mmap_prep` gives the kernel. Shared by [`RedoxMem`]
/// (which fills it) and [`BlockMapper`] (which reads it).
#[derive(Clone, Default)]
pub struct SharedRegions(Arc<Mutex<BTreeMap<usize, (usize, u64)>>>);

fn key(fd: &Arc<OwnedFd>) -> usize {
    Arc::as_ptr(fd) as usize
}

impl SharedRegions {
    /// Where the block behind `fd` is mapped in iommud, and its length.
    pub fn get(&self, fd: &Arc<OwnedFd>) -> Option<(usize, u64)> {
        lock(&self.0).get(&key(fd)).copied()
    }
    fn insert(&self, b: &Block) {
        lock(&self.0).insert(key(&b.fd), (b.virt, b.len));
    }
    fn remove(&self, fd: &Arc<OwnedFd>) {
        lock(&self.0).remove(&key(fd));
    }
}

/// The scheme's [`RegionMapper`] on Redox: the block is already mapped in
/// iommud, so `mmap_prep` answers with that address and the kernel lends the
/// client the same pages.
pub struct BlockMapper(pub SharedRegions);

impl RegionMapper for BlockMapper {
    fn map(&mut self, share: &Share) -> SysResult<(usize, u64)> {
        self.0.get(&share.fd).ok_or(Error::new(EBADF))
    }
    fn forget(&mut self, _share: &Share) {
        // The block stays mapped until iommud frees the region.
    }
}

struct MemState {
    book: PhysBook,
    frames: FramePool,
    frame_blocks: Vec<Block>,
    regions: BTreeMap<u64, Block>,
}

/// [`PhysMem`] over a [`Backing`].
pub struct RedoxMem<B: Backing> {
    backing: B,
    state: Mutex<MemState>,
    shared: SharedRegions,
}

impl<B: Backing> RedoxMem<B> {
    /// Memory from `backing`; no block is taken until the first allocation.
    pub fn new(backing: B) -> Self {
        RedoxMem {
            backing,
            state: Mutex::new(MemState {
                book: PhysBook::default(),
                frames: FramePool::default(),
                frame_blocks: Vec::new(),
                regions: BTreeMap::new(),
            }),
            shared: SharedRegions::default(),
        }
    }

    /// The region table the scheme's [`BlockMapper`] reads.
    pub fn shared_regions(&self) -> SharedRegions {
        self.shared.clone()
    }

    /// Regions live (for tests and stats).
    pub fn regions_live(&self) -> usize {
        lock(&self.state).regions.len()
    }

    fn virt(&self, phys: u64, width: u64) -> Result<*mut u8, HwError> {
        lock(&self.state)
            .book
            .virt(phys, width)
            .map(|v| v as *mut u8)
            .ok_or(HwError::BadPhys(phys))
    }
}

impl<B: Backing> Drop for RedoxMem<B> {
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        for b in st.frame_blocks.iter().chain(st.regions.values()) {
            self.backing.free(b);
        }
    }
}

impl<B: Backing> PhysMem for RedoxMem<B> {
    fn alloc_frame(&self) -> Result<u64, HwError> {
        let mut st = lock(&self.state);
        let phys = match st.frames.alloc() {
            Some(p) => p,
            None => {
                let b = self.backing.alloc(FRAME_BLOCK)?;
                st.book.insert(b.phys, b.len, b.virt);
                st.frames.add_block(b.phys, b.len);
                st.frame_blocks.push(b);
                st.frames.alloc().ok_or(HwError::NoMemory("table frames"))?
            }
        };
        let v = st.book.virt(phys, PAGE).ok_or(HwError::BadPhys(phys))?;
        // Frames are recycled: zero it. SAFETY: a whole frame of a block this
        // process maps, referenced by no Rust reference.
        unsafe { std::ptr::write_bytes(v as *mut u8, 0, PAGE as usize) };
        Ok(phys)
    }

    fn free_frame(&self, phys: u64) {
        if !lock(&self.state).frames.free(phys) {
            eprintln!("iommud: bug: freeing frame {phys:#x} not allocated");
        }
    }

    fn alloc_region(&self, len: u64, align: u64) -> Result<Region, HwError> {
        let want = len.checked_next_multiple_of(PAGE).filter(|l| *l > 0);
        let (Some(want), Some(padded)) = (want, padded_len(len, align)) else {
            return Err(HwError::NoMemory("region of zero bytes or bad alignment"));
        };
        let b = self.backing.alloc(padded)?;
        let Some(off) = aligned_offset(b.phys, b.len, want, align) else {
            self.backing.free(&b);
            return Err(HwError::NoMemory("aligned region"));
        };
        let region = Region {
            fd: b.fd.clone(),
            fd_offset: off,
            phys: b.phys + off,
            len: want,
        };
        let mut st = lock(&self.state);
        st.book.insert(b.phys, b.len, b.virt);
        self.shared.insert(&b);
        st.regions.insert(b.phys, b);
        Ok(region)
    }

    fn free_region(&self, region: &Region) {
        let base = region.phys - region.fd_offset;
        let mut st = lock(&self.state);
        if let Some(b) = st.regions.remove(&base) {
            st.book.remove(base);
            self.shared.remove(&b.fd);
            drop(st);
            self.backing.free(&b);
        }
    }

    fn read_u64(&self, phys: u64) -> Result<u64, HwError> {
        let p = self.virt(phys, 8)?;
        // SAFETY: 8 bytes inside a block this process maps; volatile because
        // the unit and clients write this memory too.
        Ok(unsafe { p.cast::<u64>().read_volatile() })
    }

    fn write_u64(&self, phys: u64, v: u64) -> Result<(), HwError> {
        let p = self.virt(phys, 8)?;
        // SAFETY: as in read_u64.
        unsafe { p.cast::<u64>().write_volatile(v) };
        Ok(())
    }

    fn read_u32(&self, phys: u64) -> Result<u32, HwError> {
        let p = self.virt(phys, 4)?;
        // SAFETY: as in read_u64.
        Ok(unsafe { p.cast::<u32>().read_volatile() })
    }

    fn flush(&self, phys: u64, len: u64) {
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let Ok(p) = self.virt(phys, len.max(1)) else {
            return;
        };
        flush_lines(p, len as usize);
    }
}

/// Writes back the cache lines of `[p, p+len)` (ECAP.C = 0: the unit does not snoop).
fn flush_lines(p: *const u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        let start = p as usize & !63;
        let end = p as usize + len;
        for line in (start..end).step_by(64) {
            // SAFETY: clflush of a line inside memory this process maps.
            unsafe { core::arch::x86_64::_mm_clflush(line as *const u8) };
        }
        // SAFETY: a fence instruction.
        unsafe { core::arch::x86_64::_mm_mfence() };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, len);
}

/// The Redox system calls behind [`RegisterWindow`] and [`RedoxMem`].
///
/// Type-checked for `x86_64-unknown-redox` by `cargo xtask redox-check`, never run. The
/// calls follow libredox 0.1.25 as read in its source (`Fd::open`, `Fd::call_rw`, `call::mmap`,
/// `call::munmap`); which memory-scheme paths exist and what they accept
/// (`physical@uc`, `zeroed?phys_contiguous`, `translation`) is taken from
/// Redox's public driver code and is **unverified** here, as is whether a
/// `MAP_SHARED` mapping of a `zeroed` handle can be lent to a client through
/// `mmap_prep`.
#[cfg(target_os = "redox")]
pub mod kernel {
    use super::*;
    use libredox::call::{mmap, munmap, MmapArgs};
    use libredox::flag::{MAP_SHARED, O_CLOEXEC, O_RDWR, PROT_READ, PROT_WRITE};
    use libredox::Fd;
    use std::os::fd::FromRawFd;

    fn os(what: &'static str, e: libredox::error::Error) -> HwError {
        HwError::Os {
            what,
            err: std::io::Error::from_raw_os_error(e.errno()),
        }
    }

    /// Maps `len` bytes of physical MMIO at `phys` (uncached) and returns
    /// the window and the mapped base; the mapping is never unmapped (iommud
    /// owns the unit for its lifetime).
    pub fn map_registers(phys: u64, len: u64) -> Result<RegisterWindow, HwError> {
        let (base, map_len, within) = page_window(phys, len).ok_or(HwError::BadPhys(phys))?;
        let fd = Fd::open(crate::paths::PHYS_UNCACHED, (O_CLOEXEC | O_RDWR) as i32, 0)
            .map_err(|e| os("open /scheme/memory/physical@uc", e))?;
        // SAFETY: a fresh mapping at an address the kernel picks.
        let p = unsafe {
            mmap(MmapArgs {
                addr: std::ptr::null_mut(),
                length: map_len as usize,
                prot: PROT_READ | PROT_WRITE,
                flags: MAP_SHARED,
                fd: fd.raw(),
                offset: base,
            })
        }
        .map_err(|e| os("map VT-d registers", e))?;
        // SAFETY: the mapping lives as long as the process; only volatile access.
        Ok(unsafe {
            RegisterWindow::new(
                p.cast::<u8>().add(within as usize),
                (map_len - within) as usize,
            )
        })
    }

    /// Physically contiguous zeroed memory from the memory scheme.
    pub struct KernelMemory {
        translation: Fd,
    }

    impl KernelMemory {
        /// Opens the translation handle (needs uid 0).
        pub fn new() -> Result<Self, HwError> {
            let translation = Fd::open(crate::paths::TRANSLATION, O_CLOEXEC as i32, 0)
                .map_err(|e| os("open /scheme/memory/translation", e))?;
            Ok(KernelMemory { translation })
        }

        fn phys_of(&self, virt: usize) -> Result<u64, HwError> {
            let mut buf = virt.to_ne_bytes();
            self.translation
                .call_rw(&mut buf, syscall::CallFlags::empty(), &[])
                .map_err(|e| os("translate a virtual address", e))?;
            Ok(usize::from_ne_bytes(buf) as u64)
        }
    }

    impl Backing for KernelMemory {
        fn alloc(&self, len: u64) -> Result<Block, HwError> {
            let fd = Fd::open(crate::paths::DMA_ZEROED, (O_CLOEXEC | O_RDWR) as i32, 0)
                .map_err(|e| os("open /scheme/memory/zeroed", e))?;
            // SAFETY: a fresh mapping at an address the kernel picks.
            let p = unsafe {
                mmap(MmapArgs {
                    addr: std::ptr::null_mut(),
                    length: len as usize,
                    prot: PROT_READ | PROT_WRITE,
                    flags: MAP_SHARED,
                    fd: fd.raw(),
                    offset: 0,
                })
            }
            .map_err(|e| os("map physically contiguous memory", e))?;
            let virt = p as usize;
            let phys = self.phys_of(virt)?;
            // SAFETY: Fd owns the descriptor; it moves into the OwnedFd.
            let fd = unsafe { OwnedFd::from_raw_fd(fd.into_raw() as i32) };
            Ok(Block {
                virt,
                phys,
                len,
                fd: Arc::new(fd),
            })
        }

        fn free(&self, b: &Block) {
            // SAFETY: a mapping `alloc` made; nothing references it any more.
            let _ = unsafe { munmap(b.virt as *mut (), b.len as usize) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A DMAR table built by hand from ACPI 6 §5.2.6 (header) and VT-d 3.x
    /// §8.1/§8.3 (DMAR fields, one DRHD of 16 bytes with INCLUDE_PCI_ALL).
    fn dmar_bytes(size: u8) -> Vec<u8> {
        let mut t = vec![0u8; 48];
        t[..4].copy_from_slice(b"DMAR");
        t[36] = 38; // host address width - 1
        let mut drhd = vec![0u8; 16];
        drhd[2] = 16; // length
        drhd[4] = 1; // INCLUDE_PCI_ALL
        drhd[5] = size;
        drhd[8..16].copy_from_slice(&0xfed9_0000u64.to_le_bytes());
        t.extend_from_slice(&drhd);
        let len = t.len() as u32;
        t[4..8].copy_from_slice(&len.to_le_bytes());
        let sum = t.iter().fold(0u8, |a, &b| a.wrapping_add(b));
        t[9] = 0u8.wrapping_sub(sum); // checksum byte
        t
    }

    #[test]
    fn drhd_plan_picks_the_unit_and_its_size() {
        let (base, min, log) = drhd_plan(&dmar_bytes(0)).unwrap();
        assert_eq!((base, min), (0xfed9_0000, 0x1000));
        assert_eq!(log.len(), 1);
        assert!(log[0].contains("0xfed90000"));
        assert_eq!(drhd_plan(&dmar_bytes(2)).unwrap().1, 0x4000);
        assert!(drhd_plan(b"APIC").is_err());
    }

    #[test]
    fn windows_are_page_aligned() {
        assert_eq!(
            page_window(0xfed9_0000, 0x1000),
            Some((0xfed9_0000, 0x1000, 0))
        );
        assert_eq!(
            page_window(0xfed9_0100, 0x1000),
            Some((0xfed9_0000, 0x2000, 0x100))
        );
        assert_eq!(page_window(0x1000, 0), Some((0x1000, 0x1000, 0)));
        assert_eq!(page_window(u64::MAX - 8, 0x100), None);
    }

    #[test]
    fn alignment_padding_and_offsets() {
        assert_eq!(padded_len(100, 64), Some(PAGE));
        assert_eq!(padded_len(2 << 20, 2 << 20), Some((4 << 20) - PAGE));
        assert_eq!(padded_len(0, 8), None);
        assert_eq!(padded_len(64, 3), None);
        // A block at 1 MiB + 4 KiB holds a 2 MiB-aligned 2 MiB region at 2 MiB.
        let phys = (1 << 20) + PAGE;
        let len = padded_len(2 << 20, 2 << 20).unwrap();
        assert_eq!(
            aligned_offset(phys, len, 2 << 20, 2 << 20),
            Some((2 << 20) - phys)
        );
        assert_eq!(aligned_offset(phys, PAGE, 2 * PAGE, PAGE), None);
    }

    #[test]
    fn phys_book_translates_inside_blocks_only() {
        let mut b = PhysBook::default();
        b.insert(0x10_0000, 0x2000, 0x7000_0000);
        b.insert(0x20_0000, 0x1000, 0x8000_0000);
        assert_eq!(b.virt(0x10_0008, 8), Some(0x7000_0008));
        assert_eq!(b.virt(0x10_1ff8, 8), Some(0x7000_1ff8));
        assert_eq!(b.virt(0x10_1ffc, 8), None); // straddles the end
        assert_eq!(b.virt(0x0f_fff8, 8), None);
        assert_eq!(b.virt(0x20_0000, 4), Some(0x8000_0000));
        assert_eq!(b.remove(0x20_0000), Some((0x1000, 0x8000_0000)));
        assert_eq!(b.virt(0x20_0000, 4), None);
    }

    #[test]
    fn frame_pool_carves_blocks_and_refuses_foreign_frees() {
        let mut f = FramePool::default();
        assert_eq!(f.alloc(), None);
        f.add_block(0x40_0000, FRAME_BLOCK);
        let n = (FRAME_BLOCK / PAGE) as usize;
        let got: Vec<u64> = (0..n).map(|_| f.alloc().unwrap()).collect();
        assert_eq!(f.alloc(), None);
        let mut sorted = got.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), n);
        assert!(f.free(got[3]));
        assert!(!f.free(got[3]), "double free refused");
        assert!(!f.free(0x1000), "foreign frame refused");
        assert_eq!(f.alloc(), Some(got[3]));
    }

    #[test]
    fn register_window_is_bounded_and_volatile() {
        let mut regs = vec![0u64; 512];
        // SAFETY: the Vec outlives the window and is not otherwise touched meanwhile.
        let w = unsafe { RegisterWindow::new(regs.as_mut_ptr().cast(), 4096) };
        w.write64(0x08, 0x00D2_008C_222F_0606);
        w.write32(0x00, 0x10);
        assert_eq!(w.read64(0x08), 0x00D2_008C_222F_0606);
        assert_eq!(w.read32(0x00), 0x10);
        assert_eq!(w.read32(0x0c), 0x00D2_008C);
        assert_eq!(w.read64(4096), u64::MAX, "out of bounds reads all-ones");
        assert_eq!(w.read64(0x04), u64::MAX, "misaligned reads all-ones");
        w.write64(4096, 1); // dropped
        assert_eq!(regs[1], 0x00D2_008C_222F_0606);
    }

    /// Heap blocks with made-up physical addresses.
    struct HeapBacking {
        next_phys: Mutex<u64>,
        live: Mutex<BTreeMap<usize, Vec<u64>>>,
    }

    impl HeapBacking {
        fn new() -> Self {
            HeapBacking {
                next_phys: Mutex::new(0x100_1000), // deliberately not 2 MiB aligned
                live: Mutex::new(BTreeMap::new()),
            }
        }
    }

    impl Backing for HeapBacking {
        fn alloc(&self, len: u64) -> Result<Block, HwError> {
            let mut v = vec![0u64; (len / 8) as usize];
            let virt = v.as_mut_ptr() as usize;
            lock(&self.live).insert(virt, v);
            let mut n = lock(&self.next_phys);
            let phys = *n;
            *n += len + PAGE;
            let fd = std::fs::File::open("/dev/null").unwrap();
            Ok(Block {
                virt,
                phys,
                len,
                fd: Arc::new(fd.into()),
            })
        }
        fn free(&self, b: &Block) {
            assert!(lock(&self.live).remove(&b.virt).is_some(), "double free");
        }
    }

    #[test]
    fn redox_mem_frames_regions_and_shares() {
        let mem = RedoxMem::new(HeapBacking::new());
        let f = mem.alloc_frame().unwrap();
        assert_eq!(f % PAGE, 0);
        mem.write_u64(f + 8, 0xdead_beef).unwrap();
        assert_eq!(mem.read_u64(f + 8).unwrap(), 0xdead_beef);
        assert_eq!(mem.read_u32(f + 8).unwrap(), 0xdead_beef);
        mem.free_frame(f);
        let g = mem.alloc_frame().unwrap();
        assert_eq!(g, f, "frame recycled");
        assert_eq!(mem.read_u64(g + 8).unwrap(), 0, "recycled frame zeroed");

        let r = mem.alloc_region(2 << 20, 2 << 20).unwrap();
        assert_eq!(r.phys % (2 << 20), 0);
        assert_eq!(r.len, 2 << 20);
        mem.write_u64(r.phys + r.len - 8, 7).unwrap();
        assert_eq!(mem.read_u64(r.phys + r.len - 8).unwrap(), 7);
        mem.flush(r.phys, 128);

        // The scheme finds the block by the share's handle; the client's
        // offset inside it is fd_offset.
        let mut mapper = BlockMapper(mem.shared_regions());
        let share = Share { fd: r.fd.clone() };
        let (virt, len) = mapper.map(&share).unwrap();
        assert!(r.fd_offset + r.len <= len);
        // SAFETY: reading the block through its mapping, as the kernel would lend it.
        let last = unsafe { ((virt + (r.fd_offset + r.len - 8) as usize) as *const u64).read() };
        assert_eq!(last, 7);

        assert_eq!(mem.regions_live(), 1);
        mem.free_region(&r);
        assert_eq!(mem.regions_live(), 0);
        assert!(
            mapper.map(&share).is_err(),
            "freed region no longer shareable"
        );
        assert!(matches!(mem.read_u64(r.phys), Err(HwError::BadPhys(_))));
        assert!(mem.alloc_region(0, 8).is_err());
        assert!(mem.alloc_region(64, 3).is_err());
    }
}
