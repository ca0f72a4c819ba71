//! Shared memory mapped into both iommud and its clients: [`Mapping`] of any
//! shareable fd (a memfd on Linux, a scheme handle such as a memory region
//! iommud hands out on Redox), and [`memfd`] to create one on Linux.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
#[cfg(not(target_os = "redox"))]
use std::os::fd::{FromRawFd, OwnedFd};
use std::ptr::NonNull;

/// Creates an anonymous shared-memory file of `len` bytes (zero-filled).
///
/// Not on Redox: relibc has no `memfd_create` (libc 0.2.191); there, shared
/// memory comes from the platform (iommud's Redox backend hands out regions
/// through the `iommu` scheme).
#[cfg(not(target_os = "redox"))]
pub fn memfd(name: &str, len: usize) -> io::Result<OwnedFd> {
    let cname = std::ffi::CString::new(name).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: FFI call with a valid NUL-terminated name; the returned fd is checked.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = libc::off_t::try_from(len).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: plain FFI call on an fd we own.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// A `MAP_SHARED` mapping of (part of) a file, unmapped on drop.
///
/// The memory may be written by other processes (and, for DMA memory, by
/// devices) at any time, so this type never hands out Rust references into
/// it: callers use raw pointers with volatile or atomic accesses.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; all accesses through it are raw
// (volatile or atomic), so moving or sharing the handle between threads is sound.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `fd` from `offset` (page-aligned), read-write.
    pub fn new(fd: BorrowedFd<'_>, offset: u64, len: usize) -> io::Result<Mapping> {
        Self::with_prot(fd, offset, len, libc::PROT_READ | libc::PROT_WRITE)
    }

    /// Maps `len` bytes of `fd` from `offset` (page-aligned), read-only: for
    /// memory the other side publishes and seals against writers.
    pub fn new_readonly(fd: BorrowedFd<'_>, offset: u64, len: usize) -> io::Result<Mapping> {
        Self::with_prot(fd, offset, len, libc::PROT_READ)
    }

    fn with_prot(
        fd: BorrowedFd<'_>,
        offset: u64,
        len: usize,
        prot: libc::c_int,
    ) -> io::Result<Mapping> {
        if len == 0 || !offset.is_multiple_of(4096) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad mapping: offset {offset:#x} len {len:#x}"),
            ));
        }
        let off = libc::off_t::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
        // SAFETY: a fresh mapping chosen by the kernel; it aliases no Rust object.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                off,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or(io::ErrorKind::Other)?;
        Ok(Mapping { ptr, len })
    }

    /// Puts `len()` bytes of `fd` from `offset` where this mapping is, in one
    /// step (`MAP_FIXED`): a thread reading through it meanwhile sees the
    /// old memory or the new, never a hole. How libdma moves to the shared
    /// pages of a restarted iommud without stopping its readers.
    pub fn replace(&self, fd: BorrowedFd<'_>, offset: u64, readonly: bool) -> io::Result<()> {
        if !offset.is_multiple_of(4096) {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        let off = libc::off_t::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
        let prot = if readonly {
            libc::PROT_READ
        } else {
            libc::PROT_READ | libc::PROT_WRITE
        };
        // SAFETY: replaces exactly the range this Mapping owns (its address and
        // length); no Rust reference points into it (all accesses are raw), so
        // swapping the pages under concurrent raw accesses is sound.
        let p = unsafe {
            libc::mmap(
                self.ptr.as_ptr().cast(),
                self.len,
                prot,
                libc::MAP_SHARED | libc::MAP_FIXED,
                fd.as_raw_fd(),
                off,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Start of the mapping.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false (mappings are never empty); for clippy's `len` convention.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Reads a u64 at a byte offset (8-byte aligned), volatile.
    pub fn read_u64(&self, off: usize) -> Option<u64> {
        if !off.is_multiple_of(8) || off.checked_add(8)? > self.len {
            return None;
        }
        // SAFETY: in bounds and aligned (checked above); volatile because another
        // process or a device may write this memory.
        Some(unsafe { self.ptr.as_ptr().add(off).cast::<u64>().read_volatile() })
    }

    /// Writes a u64 at a byte offset (8-byte aligned), volatile.
    pub fn write_u64(&self, off: usize, v: u64) -> Option<()> {
        if !off.is_multiple_of(8) || off.checked_add(8)? > self.len {
            return None;
        }
        // SAFETY: in bounds and aligned (checked above); volatile as in `read_u64`.
        unsafe { self.ptr.as_ptr().add(off).cast::<u64>().write_volatile(v) };
        Some(())
    }

    /// Volatile 32-bit read at byte offset `off` (4-aligned, in bounds).
    pub fn read_u32(&self, off: usize) -> Option<u32> {
        if !off.is_multiple_of(4) || off.checked_add(4)? > self.len {
            return None;
        }
        // SAFETY: in bounds and aligned (checked above); volatile as in `read_u64`.
        Some(unsafe { self.ptr.as_ptr().add(off).cast::<u32>().read_volatile() })
    }

    /// Volatile 32-bit write at byte offset `off` (4-aligned, in bounds).
    pub fn write_u32(&self, off: usize, v: u32) -> Option<()> {
        if !off.is_multiple_of(4) || off.checked_add(4)? > self.len {
            return None;
        }
        // SAFETY: in bounds and aligned (checked above); volatile as in `read_u64`.
        unsafe { self.ptr.as_ptr().add(off).cast::<u32>().write_volatile(v) };
        Some(())
    }

    /// Copies bytes out, volatile byte by byte is not needed: the range is
    /// bounds-checked and copied with `copy_nonoverlapping` from a raw pointer.
    pub fn read_bytes(&self, off: usize, out: &mut [u8]) -> Option<()> {
        if off.checked_add(out.len())? > self.len {
            return None;
        }
        // SAFETY: source range checked in bounds; `out` is a distinct Rust buffer.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(off), out.as_mut_ptr(), out.len())
        };
        Some(())
    }

    /// Copies bytes in.
    pub fn write_bytes(&self, off: usize, data: &[u8]) -> Option<()> {
        if off.checked_add(data.len())? > self.len {
            return None;
        }
        // SAFETY: destination range checked in bounds; `data` is a distinct Rust buffer.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(off), data.len())
        };
        Some(())
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the range mmap returned; no references into it exist.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// How this CPU writes a cache line back to memory (x86-64 CPUID leaf 7:
/// EBX bit 24 CLWB, bit 23 CLFLUSHOPT; CLFLUSH is baseline SSE2).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WriteBack {
    /// Writes back and may keep the line cached (the next access hits).
    Clwb,
    /// Writes back and evicts, weakly ordered (one fence per range).
    Clflushopt,
    /// Writes back and evicts, ordered with every store.
    Clflush,
}

#[cfg(target_arch = "x86_64")]
fn write_back_kind() -> WriteBack {
    use std::sync::OnceLock;
    static KIND: OnceLock<WriteBack> = OnceLock::new();
    *KIND.get_or_init(|| {
        // CPUID is safe to execute on x86-64; leaf 7 is read only if leaf 0
        // says it exists.
        let max = core::arch::x86_64::__cpuid(0).eax;
        let ebx = if max >= 7 {
            core::arch::x86_64::__cpuid_count(7, 0).ebx
        } else {
            0
        };
        if ebx & (1 << 24) != 0 {
            WriteBack::Clwb
        } else if ebx & (1 << 23) != 0 {
            WriteBack::Clflushopt
        } else {
            WriteBack::Clflush
        }
    })
}

/// Writes back the CPU cache lines covering `[ptr, ptr+len)` so a non-coherent
/// IOMMU (ECAP.C = 0) sees table writes (VT-d 3.x §6.5: software must flush).
/// Uses CLWB where the CPU has it (the line stays cached, so the unmap that
/// re-reads the entry does not miss), else CLFLUSHOPT, else CLFLUSH; then one
/// fence so the write-backs complete before anything the device is told next.
pub fn flush_cache_range(ptr: *const u8, len: usize) {
    write_back_lines(ptr, len);
    write_back_fence();
}

/// The write-backs of [`flush_cache_range`] without its fence: a batch
/// writes back each of its entries' lines, then calls [`write_back_fence`]
/// once for all of them.
pub fn write_back_lines(ptr: *const u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        let start = ptr as usize & !63;
        let end = ptr as usize + len;
        let kind = write_back_kind();
        let mut p = start;
        while p < end {
            // SAFETY: each instruction takes any mapped address and only moves the
            // line between cache and memory; the range belongs to a live mapping
            // of the caller's. CLWB/CLFLUSHOPT are used only when CPUID says so.
            unsafe {
                match kind {
                    WriteBack::Clwb => {
                        std::arch::asm!("clwb [{0}]", in(reg) p, options(nostack, preserves_flags))
                    }
                    WriteBack::Clflushopt => {
                        std::arch::asm!("clflushopt [{0}]", in(reg) p, options(nostack, preserves_flags))
                    }
                    WriteBack::Clflush => core::arch::x86_64::_mm_clflush(p as *const u8),
                }
            }
            p += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (ptr, len);
}

/// Completes the write-backs issued before it ([`write_back_lines`]).
pub fn write_back_fence() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: fence instructions, no memory operands. SFENCE orders the weakly
    // ordered CLWB/CLFLUSHOPT; CLFLUSH is bracketed by MFENCE as Linux does.
    unsafe {
        match write_back_kind() {
            WriteBack::Clflush => core::arch::x86_64::_mm_mfence(),
            _ => core::arch::x86_64::_mm_sfence(),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn cache_write_back_keeps_the_bytes() {
        let fd = memfd("t", 4096).unwrap();
        let m = Mapping::new(fd.as_fd(), 0, 4096).unwrap();
        for i in 0..512 {
            m.write_u64(i * 8, i as u64 * 0x0101).unwrap();
        }
        flush_cache_range(m.as_ptr(), 4096);
        flush_cache_range(ptr_at(&m, 100), 3); // unaligned, spans one line
        for i in 0..512 {
            assert_eq!(m.read_u64(i * 8), Some(i as u64 * 0x0101));
        }
    }

    fn ptr_at(m: &Mapping, off: usize) -> *const u8 {
        m.as_ptr().wrapping_add(off)
    }

    #[test]
    fn two_mappings_of_one_memfd_see_each_others_writes() {
        let fd = memfd("t", 8192).unwrap();
        let a = Mapping::new(fd.as_fd(), 0, 8192).unwrap();
        let b = Mapping::new(fd.as_fd(), 4096, 4096).unwrap();
        a.write_u64(4096 + 16, 0xdead_beef_0bad_f00d).unwrap();
        assert_eq!(b.read_u64(16), Some(0xdead_beef_0bad_f00d));
        b.write_bytes(100, b"hello").unwrap();
        let mut out = [0u8; 5];
        a.read_bytes(4196, &mut out).unwrap();
        assert_eq!(&out, b"hello");
    }

    #[test]
    fn out_of_bounds_and_misaligned_accesses_are_refused() {
        let fd = memfd("t", 4096).unwrap();
        let m = Mapping::new(fd.as_fd(), 0, 4096).unwrap();
        assert_eq!(m.read_u64(4096), None);
        assert_eq!(m.read_u64(4), None);
        assert_eq!(m.write_u64(usize::MAX - 3, 1), None);
        assert!(m.write_bytes(4090, &[0; 7]).is_none());
        assert!(Mapping::new(fd.as_fd(), 100, 4096).is_err());
    }
}
