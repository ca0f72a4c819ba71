//! A NIC's register BAR shared by the queue workers of one function.
//!
//! Each worker writes only its own queues' tail registers, and the bring-up code writes
//! the rest before the workers start; every access is one aligned 32-bit volatile load
//! or store to device memory, which the device serialises.

use std::sync::Arc;

use linuxhw::mmio::MmioRegion;

use crate::Result;

/// BAR 0 of one NIC, shareable between threads.
pub struct Regs(MmioRegion);

// SAFETY: `MmioRegion` is only `Send` because it leaves locking of concurrent register
// writes to its user. Through `Regs` every access is a single 32-bit volatile access
// (`read32` / `write32`, bounds- and alignment-checked) with no Rust reference into the
// mapping; the drivers give each tail register to exactly one worker, so no two threads
// run a read-modify-write on one register.
unsafe impl Sync for Regs {}

impl Regs {
    /// Wraps a mapped BAR.
    pub fn new(bar: MmioRegion) -> Arc<Regs> {
        Arc::new(Regs(bar))
    }

    /// 32-bit register read.
    pub fn read(&self, off: usize) -> Result<u32> {
        Ok(self.0.read32(off)?)
    }

    /// 32-bit register write.
    pub fn write(&self, off: usize, v: u32) -> Result<()> {
        Ok(self.0.write32(off, v)?)
    }

    /// Read-modify-write: sets `set`, clears `clear`.
    pub fn modify(&self, off: usize, set: u32, clear: u32) -> Result<()> {
        let v = self.read(off)?;
        self.write(off, (v & !clear) | set)
    }

    /// Polls `off` until `(value & mask) == want`, sleeping 1 ms between reads, for at
    /// most `ms` milliseconds; the error names `what` (the register and bit).
    pub fn wait(
        &self,
        off: usize,
        mask: u32,
        want: u32,
        ms: u64,
        what: &'static str,
    ) -> Result<()> {
        let start = std::time::Instant::now();
        loop {
            if self.read(off)? & mask == want {
                return Ok(());
            }
            if start.elapsed().as_millis() as u64 >= ms {
                return Err(crate::Error::Timeout { what, ms });
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}

/// A queue's tail register: the one register its worker writes.
#[derive(Clone)]
pub struct Doorbell {
    regs: Arc<Regs>,
    off: usize,
}

impl Doorbell {
    /// The tail register at `off` in `regs`.
    pub fn new(regs: Arc<Regs>, off: usize) -> Doorbell {
        Doorbell { regs, off }
    }

    /// Writes the tail.
    pub fn ring(&self, tail: u16) -> Result<()> {
        self.regs.write(self.off, u32::from(tail))
    }
}
