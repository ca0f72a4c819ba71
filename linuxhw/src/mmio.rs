//! Memory-mapped I/O regions: physical ranges through `/dev/mem`, PCI BARs through sysfs
//! `resource<N>` files.
//!
//! Accesses are volatile, naturally aligned (by physical/virtual address) and bounds-checked. An offset outside the region
//! (or a misaligned one) is a programming error, but it is reported as
//! [`Error::OutOfBounds`] rather than a panic, so a bad register offset computed from a
//! device's capability bits can never turn into a wild access or a crash. No Rust reference
//! into the mapping is ever created.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::ptr::NonNull;

use crate::{Error, Result, PAGE_SIZE};

/// A mapped MMIO range, unmapped on drop.
#[derive(Debug)]
pub struct MmioRegion {
    /// Start of the whole (page-aligned) mapping, as returned by `mmap`.
    map_base: NonNull<u8>,
    /// Length of the whole mapping.
    map_len: usize,
    /// Offset of the region's first byte within the mapping.
    delta: usize,
    /// Length of the region the caller asked for.
    len: usize,
    /// Physical address of the region's first byte, when known.
    phys: Option<u64>,
    /// Where the mapping came from, for error messages.
    origin: String,
}

// SAFETY: the mapping is owned by this value alone and accessed only through volatile raw-
// pointer operations; moving it to another thread moves that ownership. It is not `Sync`:
// concurrent register writes need the caller's own locking.
unsafe impl Send for MmioRegion {}

/// Where a region's first byte lies inside a page-aligned mapping.
///
/// Returns `(file offset of the mapping, offset of the region inside it, mapping length)`,
/// or `None` if the range overflows.
pub(crate) fn page_span(start: u64, len: usize) -> Option<(u64, usize, usize)> {
    let page = PAGE_SIZE as u64;
    let base = start & !(page - 1);
    let delta = usize::try_from(start - base).ok()?;
    let total = delta.checked_add(len)?;
    let map_len = total.checked_add(PAGE_SIZE - 1)? & !(PAGE_SIZE - 1);
    Some((base, delta, map_len))
}

/// Checks that a `width`-byte access at `offset` lies inside `len` bytes.
pub(crate) fn in_bounds(offset: usize, width: usize, len: usize) -> bool {
    offset.checked_add(width).is_some_and(|end| end <= len)
}

impl MmioRegion {
    /// Maps `len` bytes of physical address space starting at `phys` through `/dev/mem`
    /// (`O_RDWR | O_SYNC`, `MAP_SHARED`, uncached for MMIO). `phys` need not be page-aligned.
    /// Needs root, and `iomem=relaxed` on the kernel command line for ranges a driver claims.
    pub fn map(phys: u64, len: usize) -> Result<Self> {
        let mut r = Self::map_file_at(Path::new("/dev/mem"), phys, len)?;
        r.phys = Some(phys);
        r.origin = format!("/dev/mem@{phys:#x}");
        Ok(r)
    }

    /// Maps `len` bytes of physical address space at `phys` through a physical-memory
    /// file other than `/dev/mem` whose offsets are physical addresses (Redox's
    /// `/scheme/memory/physical@uc`; there relibc's `mmap` goes to the memory scheme).
    pub fn map_phys_via(path: impl AsRef<Path>, phys: u64, len: usize) -> Result<Self> {
        let path = path.as_ref();
        let mut r = Self::map_file_at(path, phys, len)?;
        r.phys = Some(phys);
        r.origin = format!("{}@{phys:#x}", path.display());
        Ok(r)
    }

    /// Maps the first `len` bytes of a file, e.g. a sysfs PCI `resource0` (BAR 0).
    pub fn from_file(path: impl AsRef<Path>, len: usize) -> Result<Self> {
        Self::map_file_at(path.as_ref(), 0, len)
    }

    /// Maps `len` bytes of `path` starting at byte `offset` (any alignment).
    pub(crate) fn map_file_at(path: &Path, offset: u64, len: usize) -> Result<Self> {
        if len == 0 {
            return Err(Error::BadLength {
                what: "MMIO region",
                len,
            });
        }
        let (file_off, delta, map_len) = page_span(offset, len).ok_or(Error::BadLength {
            what: "MMIO region",
            len,
        })?;
        let file_off = libc::off_t::try_from(file_off).map_err(|_| Error::BadLength {
            what: "MMIO region offset",
            len,
        })?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_SYNC)
            .open(path)
            .map_err(|e| Error::io("open", path, e))?;
        // SAFETY: FFI call with a valid fd and no address hint; the result is checked below
        // and the kernel picks an address range no other Rust object uses.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                file_off,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::io("mmap", path, std::io::Error::last_os_error()));
        }
        // The mapping stays valid after the fd is closed (file dropped at end of scope).
        let map_base = NonNull::new(p.cast::<u8>()).ok_or(Error::BadLength {
            what: "MMIO region (mmap returned null)",
            len,
        })?;
        Ok(MmioRegion {
            map_base,
            map_len,
            delta,
            len,
            phys: None,
            origin: path.display().to_string(),
        })
    }

    /// Length of the region in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the region is empty (never true: mapping requires a nonzero length).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Physical address of the region's first byte, if mapped through `/dev/mem`.
    pub fn phys(&self) -> Option<u64> {
        self.phys
    }

    /// A raw pointer to the region's first byte (for callers with their own volatile
    /// accessors). Valid while `self` lives.
    pub fn as_ptr(&self) -> *mut u8 {
        // SAFETY: delta < map_len by construction (page_span), so this stays inside the mapping.
        unsafe { self.map_base.as_ptr().add(self.delta) }
    }

    fn check(&self, offset: usize, width: usize) -> Result<*mut u8> {
        // Alignment is checked on the address: the region may start unaligned in its page.
        let addr = (self.map_base.as_ptr() as usize + self.delta).wrapping_add(offset);
        if in_bounds(offset, width, self.len) && addr.is_multiple_of(width) {
            // SAFETY: offset + width <= len, and the region lies inside the mapping.
            Ok(unsafe { self.as_ptr().add(offset) })
        } else {
            Err(Error::OutOfBounds {
                origin: self.origin.clone(),
                offset,
                width,
                len: self.len,
            })
        }
    }

    /// Volatile 32-bit read at `offset` (must be 4-byte aligned and in bounds).
    pub fn read32(&self, offset: usize) -> Result<u32> {
        let p = self.check(offset, 4)?;
        // SAFETY: p is in bounds and 4-byte aligned (checked on the address); volatile
        // because the device may change the value at any time.
        Ok(unsafe { p.cast::<u32>().read_volatile() })
    }

    /// Volatile 64-bit read at `offset` (must be 8-byte aligned and in bounds).
    pub fn read64(&self, offset: usize) -> Result<u64> {
        let p = self.check(offset, 8)?;
        // SAFETY: p is in bounds and 8-byte aligned; volatile as for read32.
        Ok(unsafe { p.cast::<u64>().read_volatile() })
    }

    /// Volatile 32-bit write at `offset` (must be 4-byte aligned and in bounds).
    pub fn write32(&self, offset: usize, value: u32) -> Result<()> {
        let p = self.check(offset, 4)?;
        // SAFETY: p is in bounds and 4-byte aligned; no reference into the mapping exists.
        unsafe { p.cast::<u32>().write_volatile(value) };
        Ok(())
    }

    /// Volatile 64-bit write at `offset` (must be 8-byte aligned and in bounds).
    pub fn write64(&self, offset: usize, value: u64) -> Result<()> {
        let p = self.check(offset, 8)?;
        // SAFETY: p is in bounds and 8-byte aligned; no reference into the mapping exists.
        unsafe { p.cast::<u64>().write_volatile(value) };
        Ok(())
    }
}

impl Drop for MmioRegion {
    fn drop(&mut self) {
        // SAFETY: map_base/map_len are exactly what mmap returned; nothing refers into the
        // mapping after drop (accessors borrow self).
        unsafe {
            libc::munmap(self.map_base.as_ptr().cast(), self.map_len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempDir;

    #[test]
    fn page_span_math() {
        assert_eq!(
            page_span(0xfed9_0000, 0x1000),
            Some((0xfed9_0000, 0, 0x1000))
        );
        assert_eq!(
            page_span(0xfed9_0010, 0x1000),
            Some((0xfed9_0000, 0x10, 0x2000))
        );
        assert_eq!(page_span(0x1ffc, 8), Some((0x1000, 0xffc, 0x2000)));
        assert_eq!(page_span(0, 1), Some((0, 0, 0x1000)));
        assert_eq!(page_span(0xfff, usize::MAX), None);
    }

    #[test]
    fn access_bounds() {
        assert!(in_bounds(0, 4, 4));
        assert!(!in_bounds(4, 4, 4));
        assert!(in_bounds(8, 8, 16));
        assert!(!in_bounds(12, 8, 16));
        assert!(!in_bounds(usize::MAX - 3, 4, usize::MAX)); // overflow
    }

    fn file_with(dir: &TempDir, len: usize) -> std::path::PathBuf {
        let p = dir.0.join("res");
        let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        std::fs::write(&p, bytes).expect("write temp file");
        p
    }

    #[test]
    fn file_mapping_reads_writes_and_bounds() {
        let dir = TempDir::new("mmio");
        let p = file_with(&dir, 3 * PAGE_SIZE);
        let r = MmioRegion::from_file(&p, 64).expect("map");
        assert_eq!(r.len(), 64);
        assert_eq!(r.phys(), None);
        assert_eq!(r.read32(0).expect("read"), u32::from_le_bytes([0, 1, 2, 3]));
        assert_eq!(
            r.read64(8).expect("read"),
            u64::from_le_bytes([8, 9, 10, 11, 12, 13, 14, 15])
        );
        r.write32(60, 0xdead_beef).expect("write");
        r.write64(48, 0x0123_4567_89ab_cdef).expect("write");
        assert_eq!(r.read32(60).expect("read"), 0xdead_beef);
        assert_eq!(r.read64(48).expect("read"), 0x0123_4567_89ab_cdef);
        assert!(matches!(
            r.read32(64),
            Err(Error::OutOfBounds { offset: 64, .. })
        ));
        assert!(matches!(r.read64(60), Err(Error::OutOfBounds { .. })));
        assert!(matches!(r.write32(2, 0), Err(Error::OutOfBounds { .. })));
        assert!(matches!(
            r.write64(usize::MAX - 7, 0),
            Err(Error::OutOfBounds { .. })
        ));
        drop(r);
        // MAP_SHARED: the writes reached the file.
        let bytes = std::fs::read(&p).expect("read back");
        assert_eq!(&bytes[60..64], &0xdead_beef_u32.to_le_bytes());
    }

    #[test]
    fn unaligned_start_maps_the_right_bytes() {
        let dir = TempDir::new("mmio-off");
        let p = file_with(&dir, 3 * PAGE_SIZE);
        // Starts 16 bytes into page 1 and crosses into page 2.
        let start = PAGE_SIZE as u64 + 16;
        let r = MmioRegion::map_file_at(&p, start, PAGE_SIZE).expect("map");
        let b = |i: usize| ((start as usize + i) % 251) as u8;
        assert_eq!(
            r.read32(0).expect("read"),
            u32::from_le_bytes([b(0), b(1), b(2), b(3)])
        );
        let last = PAGE_SIZE - 4;
        assert_eq!(
            r.read32(last).expect("read"),
            u32::from_le_bytes([b(last), b(last + 1), b(last + 2), b(last + 3)])
        );
        assert!(r.read32(PAGE_SIZE).is_err());
        // Region starting 2 bytes into a page: offset 2 is the 4-byte-aligned address.
        let r = MmioRegion::map_file_at(&p, 2, 16).expect("map");
        assert!(r.read32(0).is_err());
        assert_eq!(r.read32(2).ok(), Some(u32::from_le_bytes([4, 5, 6, 7])));
    }

    #[test]
    fn errors_name_the_path() {
        assert!(matches!(
            MmioRegion::from_file("/nonexistent/linuxhw/resource0", 4096),
            Err(Error::Io { op: "open", .. })
        ));
        let e = MmioRegion::from_file("/nonexistent/x", 0)
            .err()
            .map(|e| e.to_string());
        assert!(e.is_some_and(|s| s.contains("bad length")));
    }
}
