//! Locked memory for DMA buffers and IOMMU tables, with the physical address of each page.
//!
//! Memory comes from a `memfd` (so it can be passed to another process by fd), mapped
//! `MAP_SHARED | MAP_POPULATE`, locked with `mlock` and zeroed. Physical addresses come
//! from `/proc/self/pagemap` (Linux `Documentation/admin-guide/mm/pagemap.rst`: one 64-bit
//! entry per 4 KiB virtual page; bit 63 present, bits 54:0 the PFN; the PFN reads as 0
//! without CAP_SYS_ADMIN).
//!
//! Hugetlb pages are not moved by the kernel while mapped. Normal 4 KiB pages
//! ([`HugeRegion::alloc_small`]) are locked but could in principle be migrated by
//! compaction; that fallback is for machines without hugepages (tests, small guests).

use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::ptr::NonNull;

use crate::{Error, Result, PAGE_SIZE};

/// Size of an x86-64 2 MiB hugepage.
pub const HUGE_PAGE_SIZE: usize = 2 << 20;

const PAGEMAP: &str = "/proc/self/pagemap";

/// Pagemap bit 63: page present in RAM.
const PM_PRESENT: u64 = 1 << 63;
/// Pagemap bits 54:0: page frame number (when present).
const PM_PFN_MASK: u64 = (1 << 55) - 1;

/// Decodes one 64-bit `/proc/self/pagemap` entry for virtual address `virt` into the
/// physical address of `virt` (frame address plus `virt`'s offset within its 4 KiB page).
pub fn decode_pagemap_entry(entry: u64, virt: usize) -> Result<u64> {
    if entry & PM_PRESENT == 0 {
        return Err(Error::NotPresent { virt, entry });
    }
    let pfn = entry & PM_PFN_MASK;
    if pfn == 0 {
        return Err(Error::PfnHidden { virt });
    }
    // x86-64 physical addresses have at most 52 bits: a larger PFN is garbage.
    if pfn >= 1 << (52 - 12) {
        return Err(Error::NotPresent { virt, entry });
    }
    Ok(pfn * PAGE_SIZE as u64 + (virt % PAGE_SIZE) as u64)
}

/// Reads the pagemap entry of `virt` from an open pagemap file.
fn pagemap_lookup(pagemap: &File, virt: usize) -> Result<u64> {
    let mut buf = [0u8; 8];
    let off = (virt / PAGE_SIZE) as u64 * 8;
    pagemap
        .read_exact_at(&mut buf, off)
        .map_err(|e| Error::io("read", PAGEMAP, e))?;
    decode_pagemap_entry(u64::from_le_bytes(buf), virt)
}

fn open_pagemap() -> Result<File> {
    File::open(PAGEMAP).map_err(|e| Error::io("open", PAGEMAP, e))
}

/// Physical address of the byte at `ptr` in this process, via `/proc/self/pagemap`.
///
/// The page must be resident (touch or lock it first); needs CAP_SYS_ADMIN.
pub fn virt_to_phys(ptr: *const u8) -> Result<u64> {
    pagemap_lookup(&open_pagemap()?, ptr as usize)
}

/// A locked, zeroed, physically-addressed memory region backed by a memfd.
#[derive(Debug)]
pub struct HugeRegion {
    fd: OwnedFd,
    ptr: NonNull<u8>,
    len: usize,
    /// Size of each backing page: [`HUGE_PAGE_SIZE`] or [`PAGE_SIZE`].
    page_size: usize,
    /// Physical address of each backing page, in order.
    pages: Vec<u64>,
}

// SAFETY: the region only hands out raw pointers and physical addresses; it never creates
// references into the memory, so sharing or moving it between threads is sound. Users
// synchronise their own volatile accesses.
unsafe impl Send for HugeRegion {}
// SAFETY: as above; `&HugeRegion` exposes no interior mutation of Rust-visible state.
unsafe impl Sync for HugeRegion {}

impl HugeRegion {
    /// Allocates `len` bytes (rounded up to 2 MiB) of hugepage memory:
    /// `memfd_create(MFD_HUGETLB | MFD_HUGE_2MB)`, `ftruncate`, `mmap(MAP_SHARED |
    /// MAP_POPULATE)`, `mlock`, zeroed. Fails if the system has too few free hugepages
    /// (`/proc/sys/vm/nr_hugepages`) or pagemap hides PFNs.
    pub fn alloc(len: usize) -> Result<Self> {
        Self::alloc_with(
            len,
            HUGE_PAGE_SIZE,
            libc::MFD_CLOEXEC | libc::MFD_HUGETLB | libc::MFD_HUGE_2MB,
        )
    }

    /// Allocates `len` bytes (rounded up to 4 KiB) of ordinary locked shared memory, for
    /// machines without hugepages. Physical addresses are per 4 KiB page.
    pub fn alloc_small(len: usize) -> Result<Self> {
        Self::alloc_with(len, PAGE_SIZE, libc::MFD_CLOEXEC)
    }

    fn alloc_with(len: usize, page_size: usize, flags: libc::c_uint) -> Result<Self> {
        // SAFETY: FFI with a NUL-terminated static name; the result is checked.
        let raw = unsafe { libc::memfd_create(c"linuxhw-dma".as_ptr(), flags) };
        if raw < 0 {
            return Err(Error::last_os(format!("memfd_create(flags {flags:#x})")));
        }
        // SAFETY: raw is a fresh fd owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Self::from_new_fd(fd, len, page_size)
    }

    /// Like [`alloc`](Self::alloc) (`huge`) or [`alloc_small`](Self::alloc_small), but
    /// backed by a new file `path` (created with mode 0600, never an existing one) instead
    /// of a memfd: a file on hugetlbfs (`huge`) or tmpfs keeps its pages after the process
    /// exits or dies, until it is unlinked, so memory a device may still reach is never
    /// given back to the kernel with the process. The caller removes the file when the
    /// memory is free.
    pub fn create_file(path: &std::path::Path, len: usize, huge: bool) -> Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| Error::Io {
                op: "create",
                path: path.to_path_buf(),
                source,
            })?;
        let page_size = if huge { HUGE_PAGE_SIZE } else { PAGE_SIZE };
        let r = Self::from_new_fd(OwnedFd::from(file), len, page_size);
        if r.is_err() {
            // Nothing of it was handed out: do not leave an empty or partial file behind.
            let _ = std::fs::remove_file(path);
        }
        r
    }

    /// Maps an existing file made by [`create_file`](Self::create_file) (by this
    /// process or one that died), whole, locked and addressed, *keeping its contents*:
    /// how a restarted iommud takes back memory a device may still be using.
    pub fn open_file(path: &std::path::Path, huge: bool) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| Error::Io {
                op: "open",
                path: path.to_path_buf(),
                source,
            })?;
        let len = file
            .metadata()
            .map_err(|source| Error::Io {
                op: "stat",
                path: path.to_path_buf(),
                source,
            })?
            .len();
        let len = usize::try_from(len).map_err(|_| Error::BadLength {
            what: "existing memory file",
            len: usize::MAX,
        })?;
        let page_size = if huge { HUGE_PAGE_SIZE } else { PAGE_SIZE };
        if len == 0 || !len.is_multiple_of(page_size) {
            return Err(Error::BadLength {
                what: "existing memory file",
                len,
            });
        }
        Self::from_fd(OwnedFd::from(file), len, page_size, false)
    }

    /// Sizes, maps, locks, zeroes and addresses a fresh, empty file.
    fn from_new_fd(fd: OwnedFd, len: usize, page_size: usize) -> Result<Self> {
        Self::from_fd(fd, len, page_size, true)
    }

    /// Maps, locks and addresses `fd`; a `fresh` one is sized and zeroed first.
    fn from_fd(fd: OwnedFd, len: usize, page_size: usize, fresh: bool) -> Result<Self> {
        let bad = Error::BadLength {
            what: "DMA memory region",
            len,
        };
        if len == 0 {
            return Err(bad);
        }
        let len = len.checked_next_multiple_of(page_size).ok_or(bad)?;
        let flen = libc::off_t::try_from(len).map_err(|_| Error::BadLength {
            what: "DMA memory region",
            len,
        })?;
        // SAFETY: FFI on our own valid fd.
        if fresh && unsafe { libc::ftruncate(fd.as_raw_fd(), flen) } != 0 {
            return Err(Error::last_os(format!("ftruncate(memfd, {len:#x})")));
        }
        // SAFETY: FFI, no address hint, valid fd; the result is checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::last_os(format!(
                "mmap(memfd, {len:#x}, page size {page_size:#x})"
            )));
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| Error::Sys {
            op: "mmap returned null".into(),
            source: std::io::Error::other("null mapping"),
        })?;
        // From here on, `region`'s Drop unmaps on every error path.
        let mut region = HugeRegion {
            fd,
            ptr,
            len,
            page_size,
            pages: Vec::new(),
        };
        // SAFETY: FFI over exactly the range we just mapped.
        if unsafe { libc::mlock(p, len) } != 0 {
            return Err(Error::last_os(format!(
                "mlock({len:#x} bytes; check `ulimit -l`)"
            )));
        }
        if fresh {
            // SAFETY: the mapping is ours, writable and len bytes long; no device knows
            // its address yet, and no reference into it exists.
            unsafe { std::ptr::write_bytes(ptr.as_ptr(), 0, len) };
        }

        let pagemap = open_pagemap()?;
        let base = ptr.as_ptr() as usize;
        let mut pages = Vec::with_capacity(len / page_size);
        for off in (0..len).step_by(page_size) {
            let phys = pagemap_lookup(&pagemap, base + off)?;
            if page_size > PAGE_SIZE {
                // Check the hugepage really is contiguous: its last 4 KiB frame must sit
                // where the first one implies.
                let last = off + page_size - PAGE_SIZE;
                let got = pagemap_lookup(&pagemap, base + last)?;
                let expected = phys + (page_size - PAGE_SIZE) as u64;
                if got != expected {
                    return Err(Error::NotContiguous {
                        offset: off,
                        virt: base + last,
                        got,
                        expected,
                    });
                }
            }
            pages.push(phys);
        }
        region.pages = pages;
        Ok(region)
    }

    /// The memfd backing the region (to pass to another process, which may map it).
    pub fn fd(&self) -> BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.fd.as_fd()
    }

    /// Start of the mapping. Valid for `len()` bytes while `self` lives. Access it with
    /// volatile operations once a device may write it.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length in bytes (a multiple of [`page_size`](Self::page_size)).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the region is empty (never true: allocation requires a nonzero length).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Size of each backing page: 2 MiB for [`alloc`](Self::alloc), 4 KiB for
    /// [`alloc_small`](Self::alloc_small). Physical addresses are contiguous within a page.
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// Physical address of the byte at `offset`.
    ///
    /// # Panics
    /// If `offset >= len()` (a caller bug, like indexing a slice out of range).
    pub fn phys_of(&self, offset: usize) -> u64 {
        assert!(
            offset < self.len,
            "HugeRegion::phys_of: offset {offset:#x} >= len {:#x}",
            self.len
        );
        self.pages[offset / self.page_size] + (offset % self.page_size) as u64
    }

    /// Each backing page as `(offset in region, physical address)`: 2 MiB hugepages for
    /// [`alloc`](Self::alloc), 4 KiB pages for [`alloc_small`](Self::alloc_small).
    pub fn chunks(&self) -> impl Iterator<Item = (usize, u64)> + '_ {
        self.pages
            .iter()
            .enumerate()
            .map(|(i, &phys)| (i * self.page_size, phys))
    }
}

impl Drop for HugeRegion {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly what mmap returned; munmap also drops the mlock.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_hand_made_entries() {
        // Present, PFN 0x12345, soft-dirty (bit 55) and exclusive (bit 56) set: ignored.
        let e = PM_PRESENT | (1 << 55) | (1 << 56) | 0x12345;
        assert_eq!(
            decode_pagemap_entry(e, 0x7f00_0000_0abc).ok(),
            Some(0x1234_5abc)
        );
        // Largest PFN of a 52-bit physical address space; one more is rejected.
        let max = (1u64 << 40) - 1;
        assert_eq!(
            decode_pagemap_entry(PM_PRESENT | max, 0x1fff).ok(),
            Some((max << 12) | 0xfff)
        );
        assert!(decode_pagemap_entry(PM_PRESENT | PM_PFN_MASK, 0x1000).is_err());
        // Not present (swapped: bit 62) -> error, whatever the low bits say.
        assert!(matches!(
            decode_pagemap_entry((1 << 62) | 0x55, 0x2000),
            Err(Error::NotPresent { virt: 0x2000, .. })
        ));
        // Present but PFN hidden (no CAP_SYS_ADMIN).
        assert!(matches!(
            decode_pagemap_entry(PM_PRESENT, 0x3000),
            Err(Error::PfnHidden { virt: 0x3000 })
        ));
    }

    /// Runs a check on an allocation, or explains why the host cannot provide one.
    fn with_region(r: Result<HugeRegion>, what: &str, check: impl FnOnce(HugeRegion)) {
        match r {
            Ok(r) => check(r),
            Err(e @ (Error::PfnHidden { .. } | Error::Sys { .. })) => {
                eprintln!("skipping {what} checks on this host: {e}");
            }
            Err(e) => panic!("{what}: unexpected error {e}"),
        }
    }

    #[test]
    fn small_pages_are_zeroed_and_addressed() {
        with_region(
            HugeRegion::alloc_small(3 * PAGE_SIZE + 1),
            "alloc_small",
            |r| {
                assert_eq!(r.len(), 4 * PAGE_SIZE);
                assert_eq!(r.page_size(), PAGE_SIZE);
                let chunks: Vec<_> = r.chunks().collect();
                assert_eq!(chunks.len(), 4);
                for (i, &(off, phys)) in chunks.iter().enumerate() {
                    assert_eq!(off, i * PAGE_SIZE);
                    assert_eq!(phys % PAGE_SIZE as u64, 0);
                    assert_eq!(r.phys_of(off + 0x123), phys + 0x123);
                    // Agrees with an independent pagemap lookup.
                    // SAFETY: off < len.
                    let p = unsafe { r.as_ptr().add(off) };
                    assert_eq!(virt_to_phys(p).ok(), Some(phys));
                    // Zeroed.
                    // SAFETY: in bounds; no device has this memory.
                    assert_eq!(unsafe { p.add(7).read_volatile() }, 0);
                }
            },
        );
    }

    #[test]
    fn hugepages_when_available() {
        with_region(HugeRegion::alloc(1), "alloc (hugepages)", |r| {
            assert_eq!(r.len(), HUGE_PAGE_SIZE);
            let (off, phys) = r.chunks().next().expect("one chunk");
            assert_eq!(off, 0);
            assert_eq!(phys % HUGE_PAGE_SIZE as u64, 0);
            assert_eq!(
                r.phys_of(HUGE_PAGE_SIZE - 1),
                phys + HUGE_PAGE_SIZE as u64 - 1
            );
        });
    }

    #[test]
    fn a_named_file_outlives_its_mapping_and_is_never_reused() {
        let dir = std::env::temp_dir().join(format!("linuxhw-named-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("region");
        {
            let r = HugeRegion::create_file(&path, 100, false);
            let Ok(r) = r else {
                // Without CAP_SYS_ADMIN pagemap hides PFNs: the file must not stay behind.
                assert!(!path.exists(), "a failed region left its file");
                return;
            };
            assert_eq!(r.len(), PAGE_SIZE);
            // SAFETY: inside the fresh mapping; no device knows it.
            unsafe { r.as_ptr().add(10).write_volatile(0xA5) };
        }
        // The mapping is gone; the file (and its page) is not.
        let data = std::fs::read(&path).unwrap();
        assert_eq!((data.len(), data[10]), (PAGE_SIZE, 0xA5));
        // An existing file is never taken over as fresh memory.
        assert!(HugeRegion::create_file(&path, 100, false).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn zero_length_is_rejected() {
        assert!(matches!(
            HugeRegion::alloc_small(0),
            Err(Error::BadLength { len: 0, .. })
        ));
    }
}
