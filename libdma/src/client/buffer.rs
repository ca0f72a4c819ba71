//! DMA buffers: CPU pointer and physical address of memory iommud gave the
//! client, accessed by copies only (the device may write it at any time).

use super::*;

/// A DMA-capable buffer from iommud's pools: CPU pointer and physical address.
#[derive(Debug, Clone, Copy)]
pub struct DmaBuffer {
    pub(super) ptr: *mut u8,
    /// Physical address of the first byte.
    pub phys: u64,
    /// Length in bytes.
    pub len: usize,
}

// SAFETY: a DmaBuffer is an address range in a mapping the DmaDomain keeps
// alive; accesses go through raw-pointer copies, never Rust references.
unsafe impl Send for DmaBuffer {}
// SAFETY: as above.
unsafe impl Sync for DmaBuffer {}

impl DmaBuffer {
    /// CPU pointer of the first byte (the device may write this memory:
    /// access it only with raw-pointer reads and writes).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Copies `data` into the buffer at `off`.
    pub fn write(&self, off: usize, data: &[u8]) -> Result<()> {
        if off.checked_add(data.len()).is_none_or(|e| e > self.len) {
            return Err(Error::Invalid("write past the buffer".into()));
        }
        // SAFETY: in bounds (checked); the mapping outlives the buffer's use by
        // contract of DmaDomain; `data` is a distinct Rust slice.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(off), data.len()) };
        Ok(())
    }

    /// Copies bytes out of the buffer at `off`.
    pub fn read(&self, off: usize, out: &mut [u8]) -> Result<()> {
        if off.checked_add(out.len()).is_none_or(|e| e > self.len) {
            return Err(Error::Invalid("read past the buffer".into()));
        }
        // SAFETY: in bounds (checked); `out` is a distinct Rust slice.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(off), out.as_mut_ptr(), out.len()) };
        Ok(())
    }
}
