//! The `sim` platform: the software VT-d model of [`vtd::sim`] as iommud's
//! hardware. Physical memory is the model's shared memfd; regions handed to
//! clients are ranges of it (so on this platform a client *could* map all of
//! simulated memory: the sim is for testing, not a security boundary).

use crate::hw::{HwError, Mmio, PhysMem, Region};
use crate::range_alloc::RangeAllocator;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use vtd::sim::{SimConfig, SimMachine};

/// Low memory never allocated (so physical address 0 is never valid).
const RESERVED: u64 = 1 << 20;

/// The simulated machine as iommud's MMIO and memory.
pub struct SimPlatform {
    machine: Arc<SimMachine>,
    frames: Mutex<RangeAllocator>,
    mem_fd: Arc<OwnedFd>,
}

impl SimPlatform {
    /// Creates a machine.
    pub fn new(cfg: SimConfig) -> Result<SimPlatform, HwError> {
        let machine = SimMachine::create(cfg).map_err(|err| HwError::Os {
            what: "creating the simulated machine",
            err,
        })?;
        let len = machine.mem_len() as u64;
        let mem_fd = machine
            .fds()
            .0
            .try_clone_to_owned()
            .map_err(|err| HwError::Os { what: "dup", err })?;
        Ok(SimPlatform {
            machine: Arc::new(machine),
            frames: Mutex::new(RangeAllocator::new(RESERVED, len - RESERVED)),
            mem_fd: Arc::new(mem_fd),
        })
    }

    /// The machine (for tests acting as devices, and for `SimInfo`).
    pub fn machine(&self) -> &Arc<SimMachine> {
        &self.machine
    }

    fn alloc(&self, len: u64, align: u64) -> Result<u64, HwError> {
        let p = self
            .frames
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .alloc(len, align)
            .ok_or(HwError::NoMemory("simulated memory"))?;
        // Zero it (frames are recycled).
        let zero = vec![0u8; len as usize];
        self.machine
            .write_bytes(p, &zero)
            .map_err(|_| HwError::BadPhys(p))?;
        Ok(p)
    }
}

/// The model's registers as [`Mmio`].
pub struct SimMmio(pub Arc<SimMachine>);

impl Mmio for SimMmio {
    fn read32(&self, off: usize) -> u32 {
        self.0.read32(off)
    }
    fn read64(&self, off: usize) -> u64 {
        self.0.read64(off)
    }
    fn write32(&self, off: usize, v: u32) {
        self.0.write32(off, v)
    }
    fn write64(&self, off: usize, v: u64) {
        self.0.write64(off, v)
    }
}

impl PhysMem for SimPlatform {
    fn alloc_frame(&self) -> Result<u64, HwError> {
        self.alloc(4096, 4096)
    }
    fn free_frame(&self, phys: u64) {
        self.frames
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .free(phys, 4096);
    }
    fn alloc_region(&self, len: u64, align: u64) -> Result<Region, HwError> {
        let len = len.next_multiple_of(4096);
        let phys = self.alloc(len, align.max(4096))?;
        Ok(Region {
            fd: self.mem_fd.clone(),
            fd_offset: phys,
            phys,
            len,
        })
    }
    /// In one process (the handover tests), the old unit's regions are
    /// still allocated in the machine: adopting one is naming it.
    fn adopt_region(
        &self,
        phys: Option<u64>,
        len: u64,
        _name: Option<&str>,
    ) -> Result<Region, HwError> {
        let phys = phys.ok_or(HwError::Unsupported("sim: adopt needs an address".into()))?;
        let end = phys.checked_add(len).ok_or(HwError::BadPhys(phys))?;
        if len == 0 || !phys.is_multiple_of(4096) || end > self.machine.mem_len() as u64 {
            return Err(HwError::BadPhys(phys));
        }
        Ok(Region {
            fd: self.mem_fd.clone(),
            fd_offset: phys,
            phys,
            len,
        })
    }
    fn free_region(&self, r: &Region) {
        self.frames
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .free(r.phys, r.len);
    }
    fn read_u64(&self, phys: u64) -> Result<u64, HwError> {
        self.machine
            .read_u64(phys)
            .map_err(|_| HwError::BadPhys(phys))
    }
    fn write_u64(&self, phys: u64, v: u64) -> Result<(), HwError> {
        self.machine
            .write_u64(phys, v)
            .map_err(|_| HwError::BadPhys(phys))
    }
    fn read_u32(&self, phys: u64) -> Result<u32, HwError> {
        self.machine
            .read_u32(phys)
            .map_err(|_| HwError::BadPhys(phys))
    }
    fn flush(&self, _phys: u64, _len: u64) {
        // The model reads the same memory the CPU writes; a fence orders it.
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    }
}
