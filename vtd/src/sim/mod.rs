//! A software model of one VT-d remapping unit, the `sim` platform's hardware.
//!
//! All state lives in two memfds mapped `MAP_SHARED`, so several processes
//! can drive one machine: iommud programs registers and writes tables,
//! drivers write leaf entries, a test process plays the device.
//!
//! - *Physical memory*: physical address = offset in the memory memfd.
//! - *Device state*: registers, caches, fault records and counters, behind a
//!   cross-process spin lock.
//!
//! The model is "instant" hardware: register commands and queued
//! descriptors complete during the MMIO write that starts them. It caches
//! like hardware and like QEMU: an IOTLB keyed by (domain, page), a
//! paging-structure cache keyed by (domain, 2 MiB region) holding the leaf
//! table's address, and a context cache keyed by source id. Entries leave the
//! caches only through invalidations that cover them, or when the IOTLB (or
//! PS cache) fills up, which wipes it whole as QEMU does. With caching mode
//! on, not-present results are cached too.
//!
//! `stale_hits` is the safety oracle: whenever a translation used a cache,
//! the real tables are walked again (without filling caches) and a
//! different answer is counted. The DMA still uses the cached answer.

mod caches;
mod faults;
mod registers;
mod shared;
mod translation;

use std::fmt;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use thiserror::Error;

use crate::desc::{Decoded, Descriptor, DESC_BYTES};
use crate::entry::{
    context_index, level_index, level_size, root_index, ContextEntry, RootEntry, SlPte,
    TranslationType, CONTEXT_ENTRY_BYTES, ENTRIES_PER_TABLE, PTE_BYTES, ROOT_ENTRY_BYTES,
};
use crate::regs::{self, fault_reason, FaultRecord, Fsts, Gcmd, Granularity, Gsts, FRCD_F};
use caches::cache_key;
use registers::{
    CAP_CM, CAP_MGAW_MASK, CAP_NFR_MASK, CAP_SAGAW_MASK, FRCD, IOTLB, IVA, QEMU_CAP, QEMU_ECAP,
    VER_VALUE,
};
use shared::{
    state_bytes, CtxSlot, HashCache, Header, Mapping, Slot, SpinLock, MAGIC, NCOUNTERS, REG_BYTES,
    WAYS,
};

/// Configuration of a simulated machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimConfig {
    /// Bytes of physical memory (rounded up to a page).
    pub mem_bytes: usize,
    /// CAP.CM: cache not-present entries too.
    pub caching_mode: bool,
    /// Address width: 39 (3-level) or 48 (4-level, also supports 3-level).
    pub aw_bits: u8,
    /// IOTLB entries before the whole IOTLB is wiped.
    pub iotlb_capacity: usize,
    /// Number of fault recording registers (1..=64).
    pub nfr: u16,
    /// ECAP.C: table walks snoop CPU caches, so software need not flush
    /// them after table writes. QEMU reports 0, which is the default.
    pub coherent: bool,
    /// Time each context-cache or IOTLB invalidation descriptor takes to
    /// execute (busy, like the unit: the wait descriptor after it completes
    /// that much later). 0, the default, is instantaneous hardware; real
    /// units take on the order of a microsecond ("thousands of cycles"),
    /// which is what makes strict invalidation expensive.
    pub inval_latency_ns: u64,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            mem_bytes: 64 << 20,
            caching_mode: false,
            aw_bits: 48,
            iotlb_capacity: 1024,
            nfr: 1,
            coherent: false,
            inval_latency_ns: 0,
        }
    }
}

macro_rules! counters {
    ($($name:ident: $doc:literal),* $(,)?) => {
        #[allow(non_camel_case_types)]
        #[derive(Clone, Copy)]
        enum Ctr { $($name),* }

        /// A snapshot of the model's counters.
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct Counters {
            $(#[doc = $doc] pub $name: u64,)*
        }

        impl Counters {
            fn load(arr: &[AtomicU64; NCOUNTERS]) -> Self {
                Self { $($name: arr[Ctr::$name as usize].load(Relaxed),)* }
            }
        }

        impl fmt::Display for Counters {
            /// One `name value` line per counter.
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                $(writeln!(f, "{} {}", stringify!($name), self.$name)?;)*
                Ok(())
            }
        }
    };
}

counters! {
    iotlb_hits: "Translations answered by the IOTLB.",
    iotlb_misses: "Translations that missed the IOTLB.",
    stale_hits: "Cached translations that differ from the tables in memory.",
    walks: "Page walks done to fill the IOTLB.",
    ps_hits: "Walks that started from a paging-structure-cache entry.",
    ctx_hits: "Context lookups answered by the context cache.",
    iotlb_wipes: "Times the IOTLB or PS cache was wiped whole because it was full.",
    faults_recorded: "Faults written into a fault recording register.",
    faults_dropped: "Faults not recorded (overflow).",
    cc_global: "Global context-cache invalidations.",
    cc_domain: "Domain-selective context-cache invalidations.",
    cc_device: "Device-selective context-cache invalidations.",
    iotlb_global: "Global IOTLB invalidations.",
    iotlb_domain: "Domain-selective IOTLB invalidations.",
    iotlb_page: "Page-selective IOTLB invalidations.",
    wait: "Invalidation wait descriptors executed.",
    descriptors_executed: "Queued invalidation descriptors executed.",
    queue_errors: "Invalid descriptors (FSTS.IQE set).",
    register_invalidations_refused: "Register-based invalidations ignored while QI is on.",
}

/// Errors of the CPU-side physical memory helpers.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum MemError {
    /// Access outside the simulated memory.
    #[error("physical range {phys:#x}+{len:#x} outside simulated memory")]
    OutOfBounds {
        /// Start address.
        phys: u64,
        /// Length in bytes.
        len: usize,
    },
    /// A qword or dword access not naturally aligned.
    #[error("physical address {phys:#x} misaligned")]
    Misaligned {
        /// Address.
        phys: u64,
    },
}

/// A DMA the model refused.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum DmaFault {
    /// The remapping unit blocked the access (and recorded a fault unless
    /// the record registers overflowed or FPD was set).
    #[error("DMA {} fault: sid {sid:#06x} iova {iova:#x} reason {reason:#x}",
        if *.write { "write" } else { "read" })]
    Translation {
        /// Requester id.
        sid: u16,
        /// Faulting address.
        iova: u64,
        /// Fault reason (see [`crate::regs::fault_reason`]).
        reason: u8,
        /// The access was a write.
        write: bool,
    },
    /// The translated address is outside physical memory (a bus abort; no
    /// fault record).
    #[error("DMA to physical {phys:#x} outside simulated memory")]
    Bus {
        /// Translated physical address.
        phys: u64,
    },
}

/// An uncached translation of one page, for tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// Physical address of the byte at the iova.
    pub phys: u64,
    /// Reads allowed.
    pub read: bool,
    /// Writes allowed.
    pub write: bool,
}

/// One simulated VT-d unit plus its physical memory.
pub struct SimMachine {
    mem: Mapping,
    state: Mapping,
}

// SAFETY: the mappings are process-wide and shared; all access goes through
// atomics (state) or volatile raw-pointer accesses (memory), never through
// Rust references to plain data, so concurrent use from threads is as sound
// as concurrent use from processes.
unsafe impl Send for SimMachine {}
// SAFETY: as above.
unsafe impl Sync for SimMachine {}

impl fmt::Debug for SimMachine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimMachine")
            .field("mem_len", &self.mem.len())
            .field("config", &self.config())
            .finish()
    }
}

fn invalid(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

impl SimMachine {
    /// Create a machine with zeroed memory, translation disabled.
    pub fn create(cfg: SimConfig) -> io::Result<SimMachine> {
        if cfg.aw_bits != 39 && cfg.aw_bits != 48 {
            return Err(invalid("aw_bits must be 39 or 48"));
        }
        if cfg.nfr == 0 || cfg.nfr > 64 {
            return Err(invalid("nfr must be 1..=64"));
        }
        if cfg.iotlb_capacity == 0 || cfg.iotlb_capacity > 1 << 24 {
            return Err(invalid("iotlb_capacity must be 1..=2^24"));
        }
        let mem_bytes = cfg
            .mem_bytes
            .checked_next_multiple_of(4096)
            .filter(|&m| m > 0)
            .ok_or_else(|| invalid("bad mem_bytes"))?;
        let buckets = cfg.iotlb_capacity.next_power_of_two();
        let mem = Mapping::create("vtd-sim-mem", mem_bytes)?;
        let state = Mapping::create("vtd-sim-state", state_bytes(buckets))?;
        let m = SimMachine { mem, state };
        let h = m.hdr();
        h.mem_bytes.store(mem_bytes as u64, Relaxed);
        h.caching_mode.store(u64::from(cfg.caching_mode), Relaxed);
        h.aw_bits.store(u64::from(cfg.aw_bits), Relaxed);
        h.iotlb_capacity.store(cfg.iotlb_capacity as u64, Relaxed);
        h.buckets.store(buckets as u64, Relaxed);
        h.nfr.store(u64::from(cfg.nfr), Relaxed);
        h.inval_latency_ns.store(cfg.inval_latency_ns, Relaxed);
        let (sagaw, mgaw) = if cfg.aw_bits == 48 {
            (0b110, 47)
        } else {
            (0b010, 38)
        };
        let cap = (QEMU_CAP & !(CAP_CM | CAP_SAGAW_MASK | CAP_MGAW_MASK | CAP_NFR_MASK))
            | if cfg.caching_mode { CAP_CM } else { 0 }
            | (sagaw << 8)
            | (mgaw << 16)
            | (u64::from(cfg.nfr - 1) << 40);
        h.regs[regs::VER / 8].store(VER_VALUE, Relaxed);
        h.regs[regs::CAP / 8].store(cap, Relaxed);
        // §10.4.3 ECAP.C, bit 0.
        let ecap = QEMU_ECAP | u64::from(cfg.coherent);
        h.regs[regs::ECAP / 8].store(ecap, Relaxed);
        h.magic.store(MAGIC, std::sync::atomic::Ordering::Release);
        Ok(m)
    }

    /// The memfds: (physical memory, device state). Pass both to
    /// [`SimMachine::open`] in another process (they are close-on-exec;
    /// clear that or dup2 them when exec'ing).
    pub fn fds(&self) -> (BorrowedFd<'_>, BorrowedFd<'_>) {
        (self.mem.fd.as_fd(), self.state.fd.as_fd())
    }

    /// Attach to a machine created (possibly) by another process.
    pub fn open(mem_fd: BorrowedFd<'_>, state_fd: BorrowedFd<'_>) -> io::Result<SimMachine> {
        let probe = Mapping::open(state_fd, std::mem::size_of::<Header>())?;
        // SAFETY: the mapping is at least size_of::<Header>() bytes, page
        // aligned, and every field of Header is an atomic (valid for any bit
        // pattern, shared mutation allowed).
        let h = unsafe { &*probe.as_ptr().cast::<Header>() };
        if h.magic.load(std::sync::atomic::Ordering::Acquire) != MAGIC {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "not a vtd sim state region",
            ));
        }
        let buckets = usize::try_from(h.buckets.load(Relaxed)).unwrap_or(0);
        let mem_bytes = usize::try_from(h.mem_bytes.load(Relaxed)).unwrap_or(0);
        if !buckets.is_power_of_two() || mem_bytes == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "corrupt header"));
        }
        drop(probe);
        let state = Mapping::open(state_fd, state_bytes(buckets))?;
        let mem = Mapping::open(mem_fd, mem_bytes)?;
        Ok(SimMachine { mem, state })
    }

    /// The configuration this machine was created with.
    pub fn config(&self) -> SimConfig {
        let h = self.hdr();
        SimConfig {
            mem_bytes: self.mem.len(),
            caching_mode: h.caching_mode.load(Relaxed) != 0,
            aw_bits: h.aw_bits.load(Relaxed) as u8,
            iotlb_capacity: h.iotlb_capacity.load(Relaxed) as usize,
            nfr: h.nfr.load(Relaxed) as u16,
            inval_latency_ns: h.inval_latency_ns.load(Relaxed),
            coherent: h.regs[regs::ECAP / 8].load(Relaxed) & 1 != 0,
        }
    }

    fn hdr(&self) -> &Header {
        // SAFETY: the state mapping is page aligned and at least
        // size_of::<Header>() bytes (checked in create/open); it lives as
        // long as `self`; every field is an atomic, so shared references are
        // sound even while other processes write.
        unsafe { &*self.state.as_ptr().cast::<Header>() }
    }

    fn slots(&self, which: usize) -> &[Slot] {
        let n = self.hdr().buckets.load(Relaxed) as usize * WAYS;
        // SAFETY: the state region is Header followed by two arrays of `n`
        // Slots (state_bytes); Slot is all atomics and 8-aligned, and
        // size_of::<Header>() is a multiple of 8.
        unsafe {
            let base = self
                .state
                .as_ptr()
                .add(std::mem::size_of::<Header>())
                .cast::<Slot>();
            std::slice::from_raw_parts(base.add(which * n), n)
        }
    }

    fn iotlb(&self) -> HashCache<'_> {
        let h = self.hdr();
        HashCache {
            slots: self.slots(0),
            count: &h.iotlb_count,
            capacity: h.iotlb_capacity.load(Relaxed),
        }
    }

    fn ps_cache(&self) -> HashCache<'_> {
        let h = self.hdr();
        HashCache {
            slots: self.slots(1),
            count: &h.ps_count,
            capacity: h.iotlb_capacity.load(Relaxed),
        }
    }

    fn bump(&self, c: Ctr) {
        self.hdr().counters[c as usize].fetch_add(1, Relaxed);
    }

    /// A snapshot of the counters.
    pub fn counters(&self) -> Counters {
        Counters::load(&self.hdr().counters)
    }

    // ----- physical memory (CPU side) -----

    /// Base of the physical memory mapping. Writes through it must be
    /// volatile; the device side reads it concurrently.
    pub fn mem_ptr(&self) -> *mut u8 {
        self.mem.as_ptr()
    }

    /// Bytes of physical memory.
    pub fn mem_len(&self) -> usize {
        self.mem.len()
    }

    fn check(&self, phys: u64, len: usize, align: usize) -> Result<usize, MemError> {
        let oob = MemError::OutOfBounds { phys, len };
        let start = usize::try_from(phys).map_err(|_| oob)?;
        let end = start.checked_add(len).ok_or(oob)?;
        if end > self.mem.len() {
            return Err(oob);
        }
        if start % align != 0 {
            return Err(MemError::Misaligned { phys });
        }
        Ok(start)
    }

    /// Volatile read of the aligned qword at `phys`.
    pub fn read_u64(&self, phys: u64) -> Result<u64, MemError> {
        let off = self.check(phys, 8, 8)?;
        // SAFETY: in bounds and 8-aligned (checked); shared DMA memory is
        // only ever accessed through volatile raw-pointer accesses.
        Ok(unsafe { self.mem_ptr().add(off).cast::<u64>().read_volatile() })
    }

    /// Volatile write of the aligned qword at `phys`.
    pub fn write_u64(&self, phys: u64, v: u64) -> Result<(), MemError> {
        let off = self.check(phys, 8, 8)?;
        // SAFETY: in bounds and 8-aligned (checked); volatile access to
        // shared memory.
        unsafe { self.mem_ptr().add(off).cast::<u64>().write_volatile(v) };
        Ok(())
    }

    /// Volatile read of the aligned dword at `phys`.
    pub fn read_u32(&self, phys: u64) -> Result<u32, MemError> {
        let off = self.check(phys, 4, 4)?;
        // SAFETY: in bounds and 4-aligned (checked); volatile access.
        Ok(unsafe { self.mem_ptr().add(off).cast::<u32>().read_volatile() })
    }

    /// Volatile write of the aligned dword at `phys`.
    pub fn write_u32(&self, phys: u64, v: u32) -> Result<(), MemError> {
        let off = self.check(phys, 4, 4)?;
        // SAFETY: in bounds and 4-aligned (checked); volatile access.
        unsafe { self.mem_ptr().add(off).cast::<u32>().write_volatile(v) };
        Ok(())
    }

    /// Copy physical memory at `phys` into `buf`.
    pub fn read_bytes(&self, phys: u64, buf: &mut [u8]) -> Result<(), MemError> {
        let off = self.check(phys, buf.len(), 1)?;
        for (i, b) in buf.iter_mut().enumerate() {
            // SAFETY: off + i < off + len <= mem_len (checked); byte
            // volatile reads of shared memory.
            *b = unsafe { self.mem_ptr().add(off + i).read_volatile() };
        }
        Ok(())
    }

    /// Copy `data` into physical memory at `phys`.
    pub fn write_bytes(&self, phys: u64, data: &[u8]) -> Result<(), MemError> {
        let off = self.check(phys, data.len(), 1)?;
        for (i, b) in data.iter().enumerate() {
            // SAFETY: off + i < off + len <= mem_len (checked); byte
            // volatile writes to shared memory.
            unsafe { self.mem_ptr().add(off + i).write_volatile(*b) };
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
