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

mod shared;

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

/// VER as QEMU reports it (major 1, minor 0).
const VER_VALUE: u64 = 0x10;
/// CAP as QEMU reports it (DESIGN.md); CM, SAGAW, MGAW and NFR are replaced
/// per configuration.
const QEMU_CAP: u64 = 0x00D2_008C_222F_0606;
/// ECAP as QEMU reports it: C=0, QI=1, PT=1, IRO=0xF (IOTLB regs at 0xF0).
const QEMU_ECAP: u64 = 0xF42;
/// Offset of the invalidate-address register (ECAP.IRO * 16).
const IVA: usize = 0xF0;
/// Offset of the IOTLB invalidate register (ECAP.IRO * 16 + 8).
const IOTLB: usize = 0xF8;
/// Offset of the first fault recording register (CAP.FRO * 16).
const FRCD: usize = 0x220;
/// §10.4.3 ECAP.IR, bit 3 cleared; §10.4.2 CAP fields CM 7, SAGAW 12:8,
/// MGAW 21:16, NFR 47:40.
const CAP_CM: u64 = 1 << 7;
const CAP_SAGAW_MASK: u64 = 0x1F << 8;
const CAP_MGAW_MASK: u64 = 0x3F << 16;
const CAP_NFR_MASK: u64 = 0xFF << 40;

/// Bit in a cache key marking it in use (key 0 means empty).
const KEY_VALID: u64 = 1 << 63;
const KEY_LOW_BITS: u64 = 44;
const KEY_LOW_MASK: u64 = (1 << KEY_LOW_BITS) - 1;

fn cache_key(did: u16, low: u64) -> u64 {
    KEY_VALID | (u64::from(did) << KEY_LOW_BITS) | (low & KEY_LOW_MASK)
}

fn key_did(key: u64) -> u16 {
    (key >> KEY_LOW_BITS) as u16
}

fn key_low(key: u64) -> u64 {
    key & KEY_LOW_MASK
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

/// Result of one translation: the 4 KiB physical page and its permissions
/// (R bit 0, W bit 1; 0 = not present).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Leaf {
    page: u64,
    perms: u64,
}

impl Leaf {
    const NONE: Leaf = Leaf { page: 0, perms: 0 };
}

/// A translation error: fault reason and whether the context had FPD set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Fault {
    reason: u8,
    fpd: bool,
}

type Xlate = Result<Leaf, Fault>;

/// True when two translation outcomes give the device the same access.
fn same_outcome(a: &Xlate, b: &Xlate) -> bool {
    let norm = |x: &Xlate| match x {
        Ok(l) if l.perms != 0 => *l,
        _ => Leaf::NONE,
    };
    norm(a) == norm(b)
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
            .field("mem_len", &self.mem.len)
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
        let mem = Mapping::create(c"vtd-sim-mem", mem_bytes)?;
        let state = Mapping::create(c"vtd-sim-state", state_bytes(buckets))?;
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
        let h = unsafe { &*probe.ptr.as_ptr().cast::<Header>() };
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
            mem_bytes: self.mem.len,
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
        unsafe { &*self.state.ptr.as_ptr().cast::<Header>() }
    }

    fn slots(&self, which: usize) -> &[Slot] {
        let n = self.hdr().buckets.load(Relaxed) as usize * WAYS;
        // SAFETY: the state region is Header followed by two arrays of `n`
        // Slots (state_bytes); Slot is all atomics and 8-aligned, and
        // size_of::<Header>() is a multiple of 8.
        unsafe {
            let base = self
                .state
                .ptr
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
        self.mem.ptr.as_ptr()
    }

    /// Bytes of physical memory.
    pub fn mem_len(&self) -> usize {
        self.mem.len
    }

    fn check(&self, phys: u64, len: usize, align: usize) -> Result<usize, MemError> {
        let oob = MemError::OutOfBounds { phys, len };
        let start = usize::try_from(phys).map_err(|_| oob)?;
        let end = start.checked_add(len).ok_or(oob)?;
        if end > self.mem.len {
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

    // ----- MMIO -----

    fn reg(&self, off: usize) -> u64 {
        self.hdr().regs[off / 8].load(Relaxed)
    }

    fn set_reg(&self, off: usize, v: u64) {
        self.hdr().regs[off / 8].store(v, Relaxed);
    }

    fn reg32(&self, off: usize) -> u32 {
        (self.reg(off & !7) >> ((off & 4) * 8)) as u32
    }

    fn set_reg32(&self, off: usize, v: u32) {
        let shift = (off & 4) * 8;
        let old = self.reg(off & !7);
        let new = (old & !(0xFFFF_FFFFu64 << shift)) | (u64::from(v) << shift);
        self.set_reg(off & !7, new);
    }

    fn gsts(&self) -> Gsts {
        Gsts::from_bits_retain(self.reg32(regs::GSTS))
    }

    fn fsts(&self) -> u32 {
        self.reg32(regs::FSTS)
    }

    fn frcd_end(&self) -> usize {
        FRCD + 16 * self.hdr().nfr.load(Relaxed) as usize
    }

    /// 32-bit register read. Unaligned or out-of-range offsets read as all
    /// ones; GCMD reads as 0 (status is in GSTS).
    pub fn read32(&self, off: usize) -> u32 {
        if off & 3 != 0 || off + 4 > REG_BYTES {
            return u32::MAX;
        }
        let _g = SpinLock::lock(&self.hdr().lock);
        self.reg32(off)
    }

    /// 64-bit register read.
    pub fn read64(&self, off: usize) -> u64 {
        if off & 7 != 0 || off + 8 > REG_BYTES {
            return u64::MAX;
        }
        let _g = SpinLock::lock(&self.hdr().lock);
        self.reg(off)
    }

    /// 32-bit register write.
    pub fn write32(&self, off: usize, v: u32) {
        if off & 3 != 0 || off + 4 > REG_BYTES {
            return;
        }
        let _g = SpinLock::lock(&self.hdr().lock);
        self.mmio_write32(off, v);
    }

    /// 64-bit register write. Writes to a pair of 32-bit registers act as
    /// two 32-bit writes, low first.
    pub fn write64(&self, off: usize, v: u64) {
        if off & 7 != 0 || off + 8 > REG_BYTES {
            return;
        }
        let _g = SpinLock::lock(&self.hdr().lock);
        if is_reg64(off) || (FRCD..self.frcd_end()).contains(&off) {
            self.mmio_write64(off, v);
        } else {
            self.mmio_write32(off, v as u32);
            self.mmio_write32(off + 4, (v >> 32) as u32);
        }
    }

    fn mmio_write32(&self, off: usize, v: u32) {
        let base = off & !7;
        if (FRCD..self.frcd_end()).contains(&off) {
            // §10.4.14: only F (bit 127 = bit 31 of the record's last dword)
            // is writable, write-1-to-clear.
            if off % 16 == 12 && v & (1 << 31) != 0 {
                self.clear_frcd(off - 12);
            }
            return;
        }
        if is_reg64(base) {
            let shift = (off & 4) * 8;
            let merged = (self.reg(base) & !(0xFFFF_FFFFu64 << shift)) | (u64::from(v) << shift);
            self.mmio_write64(base, merged);
            return;
        }
        match off {
            regs::GCMD => self.gcmd(Gcmd::from_bits_retain(v)),
            regs::FSTS => {
                // §10.4.9: PFO, AFO, APF, IQE, ICE, ITE are RW1C; PPF and FRI
                // are read-only.
                let w1c =
                    (Fsts::PFO | Fsts::AFO | Fsts::APF | Fsts::IQE | Fsts::ICE | Fsts::ITE).bits();
                self.set_reg32(regs::FSTS, self.fsts() & !(v & w1c));
            }
            regs::FECTL => {
                // §10.4.10: IM (31) is RW, IP (30) read-only.
                let ip = self.reg32(regs::FECTL) & regs::FECTL_IP;
                self.set_reg32(regs::FECTL, (v & regs::FECTL_IM) | ip);
            }
            regs::FEDATA | regs::FEADDR | 0x44 => self.set_reg32(off, v),
            regs::ICS => {
                // §10.4.25: IWC is RW1C.
                self.set_reg32(regs::ICS, self.reg32(regs::ICS) & !(v & regs::ICS_IWC));
            }
            _ => {}
        }
    }

    fn mmio_write64(&self, off: usize, v: u64) {
        if (FRCD..self.frcd_end()).contains(&off) {
            if off % 16 == 8 && v & FRCD_F != 0 {
                self.clear_frcd(off - 8);
            }
            return;
        }
        match off {
            regs::RTADDR => self.set_reg(off, v & !0xFFF),
            regs::CCMD => {
                self.set_reg(off, v);
                if v & regs::CCMD_ICC != 0 {
                    self.register_cc(v);
                }
            }
            regs::IQT => {
                self.set_reg(off, v & 0x7_FFF0);
                self.run_queue();
            }
            regs::IQA => self.set_reg(off, v & !0x7F8),
            IVA => self.set_reg(off, v),
            IOTLB => {
                self.set_reg(off, v);
                if v & regs::IOTLB_IVT != 0 {
                    self.register_iotlb(v);
                }
            }
            // VER, CAP, ECAP, IQH, IQER and anything else: read-only.
            _ => {}
        }
    }

    /// §10.4.4: act on a GCMD write; the result shows in GSTS.
    fn gcmd(&self, cmd: Gcmd) {
        let mut sts = self.gsts();
        sts.set(Gsts::TES, cmd.contains(Gcmd::TE));
        if cmd.contains(Gcmd::SRTP) {
            self.hdr().root.store(self.reg(regs::RTADDR), Relaxed);
            sts.insert(Gsts::RTPS);
        }
        if cmd.contains(Gcmd::QIE) && !sts.contains(Gsts::QIES) {
            // §6.5.2: enabling QI resets IQH to 0.
            self.set_reg(regs::IQH, 0);
            sts.insert(Gsts::QIES);
        } else if !cmd.contains(Gcmd::QIE) {
            sts.remove(Gsts::QIES);
        }
        // WBF completes instantly (WBFS stays 0); IR is not supported
        // (ECAP.IR = 0), so IRE/SIRTP/CFI have no effect.
        self.set_reg32(regs::GSTS, sts.bits());
    }

    /// §10.4.7 register-based context-cache invalidation.
    fn register_cc(&self, v: u64) {
        let mut out = v & !regs::CCMD_ICC & !(3 << 59);
        if self.gsts().contains(Gsts::QIES) {
            self.bump(Ctr::register_invalidations_refused);
        } else if let Some(g) = regs::ccmd_cirg(v) {
            let fm = ((v >> 32) & 3) as u8;
            self.invalidate_cc(g, regs::ccmd_did(v), regs::ccmd_sid(v), fm);
            out |= (g as u64) << 59;
        }
        self.set_reg(regs::CCMD, out);
    }

    /// §10.4.8.1 register-based IOTLB invalidation.
    fn register_iotlb(&self, v: u64) {
        let mut out = v & !regs::IOTLB_IVT & !(3 << 57);
        if self.gsts().contains(Gsts::QIES) {
            self.bump(Ctr::register_invalidations_refused);
        } else if let Some(g) = regs::iotlb_iirg(v) {
            let iva = self.reg(IVA);
            let ok = self.invalidate_iotlb(
                g,
                regs::iotlb_did(v),
                iva & !0xFFF,
                (iva & 0x3F) as u8,
                iva & (1 << 6) != 0,
            );
            if ok {
                out |= (g as u64) << 57;
            }
        }
        self.set_reg(IOTLB, out);
    }

    /// §6.5.2: execute descriptors from IQH to IQT.
    fn run_queue(&self) {
        if !self.gsts().contains(Gsts::QIES) || self.fsts() & Fsts::IQE.bits() != 0 {
            return;
        }
        let iqa = self.reg(regs::IQA);
        let base = regs::iqa_base(iqa);
        let n = regs::iqa_entries(iqa);
        let tail = (self.reg(regs::IQT) >> 4) as usize;
        let mut head = (self.reg(regs::IQH) >> 4) as usize;
        if regs::iqa_dw(iqa) || tail >= n || head >= n {
            self.queue_error();
            return;
        }
        while head != tail {
            let at = base + (head * DESC_BYTES) as u64;
            let d = match (self.read_u64(at), self.read_u64(at + 8)) {
                (Ok(lo), Ok(hi)) => Descriptor { lo, hi },
                _ => {
                    self.set_reg(regs::IQH, (head as u64) << 4);
                    self.queue_error();
                    return;
                }
            };
            if !self.execute(d) {
                // IQH stays at the offending descriptor.
                self.set_reg(regs::IQH, (head as u64) << 4);
                self.queue_error();
                return;
            }
            self.bump(Ctr::descriptors_executed);
            head = (head + 1) % n;
        }
        self.set_reg(regs::IQH, (head as u64) << 4);
    }

    fn queue_error(&self) {
        self.bump(Ctr::queue_errors);
        self.set_reg32(regs::FSTS, self.fsts() | Fsts::IQE.bits());
    }

    /// Spends the configured invalidation latency (see
    /// [`SimConfig::inval_latency_ns`]).
    fn take_time(&self) {
        let ns = self.hdr().inval_latency_ns.load(Relaxed);
        if ns > 0 {
            let until = std::time::Instant::now() + std::time::Duration::from_nanos(ns);
            while std::time::Instant::now() < until {
                std::hint::spin_loop();
            }
        }
    }

    /// Execute one descriptor; false if it is invalid.
    fn execute(&self, d: Descriptor) -> bool {
        match d.decode() {
            Decoded::ContextCache { g, did, sid, fm } => {
                self.invalidate_cc(g, did, sid, fm);
                self.take_time();
                true
            }
            Decoded::Iotlb {
                g,
                did,
                addr,
                am,
                ih,
                ..
            } => {
                let ok = self.invalidate_iotlb(g, did, addr, am, ih);
                self.take_time();
                ok
            }
            Decoded::Wait {
                status_addr,
                status_data,
                intr,
                sw,
                ..
            } => {
                if sw && self.write_u32(status_addr, status_data).is_err() {
                    return false;
                }
                if intr {
                    self.set_reg32(regs::ICS, self.reg32(regs::ICS) | regs::ICS_IWC);
                }
                self.bump(Ctr::wait);
                true
            }
            // ECAP.DT = 0 and ECAP.IR = 0: these types are invalid here.
            Decoded::DevTlb | Decoded::Iec | Decoded::Invalid => false,
        }
    }

    fn ctx_slot(&self, sid: u16) -> &CtxSlot {
        &self.hdr().ctx[usize::from(sid)]
    }

    fn invalidate_cc(&self, g: Granularity, did: u16, sid: u16, fm: u8) {
        let clear = |s: &CtxSlot| s.state.store(0, Relaxed);
        match g {
            Granularity::Global => {
                self.bump(Ctr::cc_global);
                self.hdr().ctx.iter().for_each(clear);
            }
            Granularity::Domain => {
                self.bump(Ctr::cc_domain);
                // Negative entries (caching mode) are tagged with domain 0
                // (§6.1: software uses DID 0 for not-present entries).
                for s in self.hdr().ctx.iter() {
                    let st = s.state.load(Relaxed);
                    let sdid = if st == 1 {
                        ContextEntry::from_qwords(0, s.hi.load(Relaxed)).did()
                    } else {
                        0
                    };
                    if st != 0 && sdid == did {
                        clear(s);
                    }
                }
            }
            Granularity::Selective => {
                self.bump(Ctr::cc_device);
                // §6.5.2.1 FM: 0 none, 1 masks function bit 2, 2 bits 2:1,
                // 3 bits 2:0.
                let mask: u16 = (0b111u16 << (3 - u16::from(fm.min(3)))) & 0b111;
                let base = sid & !mask;
                for f in 0..=mask {
                    if f & !mask == 0 {
                        clear(self.ctx_slot(base | f));
                    }
                }
            }
        }
    }

    /// Returns false for an invalid request (AM above CAP.MAMV).
    fn invalidate_iotlb(&self, g: Granularity, did: u16, addr: u64, am: u8, ih: bool) -> bool {
        let iotlb = self.iotlb();
        let ps = self.ps_cache();
        match g {
            Granularity::Global => {
                self.bump(Ctr::iotlb_global);
                iotlb.wipe();
                ps.wipe();
            }
            Granularity::Domain => {
                self.bump(Ctr::iotlb_domain);
                iotlb.remove_if(|k| key_did(k) == did);
                ps.remove_if(|k| key_did(k) == did);
            }
            Granularity::Selective => {
                if am > regs::Cap(self.reg(regs::CAP)).mamv() {
                    return false;
                }
                self.bump(Ctr::iotlb_page);
                // §6.5.2.3: the range is 2^AM pages at ADDR, ADDR aligned to
                // it (low bits ignored).
                let pages = 1u64 << am;
                let first = (addr >> 12) & !(pages - 1);
                let last = first + pages - 1;
                if pages <= 64 {
                    for p in first..=last {
                        iotlb.remove(cache_key(did, p));
                    }
                } else {
                    iotlb.remove_if(|k| key_did(k) == did && (first..=last).contains(&key_low(k)));
                }
                if !ih {
                    let (r0, r1) = (first >> 9, last >> 9);
                    ps.remove_if(|k| key_did(k) == did && (r0..=r1).contains(&key_low(k)));
                }
            }
        }
        true
    }

    // ----- translation -----

    /// Read root and context entries from memory (no caching).
    fn read_context(&self, sid: u16) -> Result<ContextEntry, u8> {
        let root = self.hdr().root.load(Relaxed);
        let rt_len = (ENTRIES_PER_TABLE * ROOT_ENTRY_BYTES) as u64;
        if self.check(root, rt_len as usize, 4096).is_err() {
            return Err(fault_reason::ROOT_TABLE_INVALID);
        }
        let ra = root + (root_index(sid) * ROOT_ENTRY_BYTES) as u64;
        let re = match (self.read_u64(ra), self.read_u64(ra + 8)) {
            (Ok(lo), Ok(hi)) => RootEntry::from_qwords(lo, hi),
            _ => return Err(fault_reason::ROOT_TABLE_INVALID),
        };
        if !re.present() {
            return Err(fault_reason::ROOT_NOT_PRESENT);
        }
        let ca = re.ctp() + (context_index(sid) * CONTEXT_ENTRY_BYTES) as u64;
        let ce = match (self.read_u64(ca), self.read_u64(ca + 8)) {
            (Ok(lo), Ok(hi)) => ContextEntry::from_qwords(lo, hi),
            _ => return Err(fault_reason::CONTEXT_TABLE_INVALID),
        };
        if !ce.present() {
            return Err(fault_reason::CONTEXT_NOT_PRESENT);
        }
        Ok(ce)
    }

    /// Context lookup through the context cache. Returns the entry (or
    /// fault reason) and whether the cache answered.
    fn context(&self, sid: u16) -> (Result<ContextEntry, u8>, bool) {
        let s = self.ctx_slot(sid);
        match s.state.load(Relaxed) {
            1 => {
                self.bump(Ctr::ctx_hits);
                let ce = ContextEntry::from_qwords(s.lo.load(Relaxed), s.hi.load(Relaxed));
                return (Ok(ce), true);
            }
            2 => {
                self.bump(Ctr::ctx_hits);
                return (Err(s.lo.load(Relaxed) as u8), true);
            }
            _ => {}
        }
        let r = self.read_context(sid);
        match r {
            Ok(ce) => {
                s.lo.store(ce.lo(), Relaxed);
                s.hi.store(ce.hi(), Relaxed);
                s.state.store(1, Relaxed);
            }
            Err(reason) if self.hdr().caching_mode.load(Relaxed) != 0 => {
                s.lo.store(u64::from(reason), Relaxed);
                s.state.store(2, Relaxed);
            }
            Err(_) => {}
        }
        (r, false)
    }

    /// Check a context entry and the iova against it; on success returns
    /// `None` for pass-through or `Some(levels)`.
    fn context_mode(&self, ce: ContextEntry, iova: u64) -> Result<Option<u8>, Fault> {
        let fault = |reason| Fault {
            reason,
            fpd: ce.fpd(),
        };
        let aw = ce.aw().ok_or(fault(fault_reason::CONTEXT_INVALID))?;
        if aw.bits() > self.hdr().aw_bits.load(Relaxed) as u8 {
            return Err(fault(fault_reason::CONTEXT_INVALID));
        }
        match ce.tt() {
            TranslationType::PassThrough => Ok(None),
            TranslationType::Translate | TranslationType::TranslateDevTlb => {
                if iova >> aw.bits() != 0 {
                    return Err(fault(fault_reason::ADDR_BEYOND_AW));
                }
                Ok(Some(aw.levels()))
            }
            TranslationType::Reserved => Err(fault(fault_reason::CONTEXT_INVALID)),
        }
    }

    /// §3.7 second-level walk from `ce`'s SLPTPTR. With `cache`, starts
    /// from (and fills) the paging-structure cache; returns whether it
    /// started from a cached entry.
    fn walk(&self, ce: ContextEntry, levels: u8, iova: u64, cache: bool) -> (Xlate, bool) {
        let fault = |reason| Fault {
            reason,
            fpd: ce.fpd(),
        };
        let did = ce.did();
        let ps_key = cache_key(did, iova >> 21);
        let read_pte = |table: u64, level: u8| {
            self.read_u64(table + (level_index(iova, level) * PTE_BYTES) as u64)
                .map(SlPte)
                .map_err(|_| fault(fault_reason::NEXT_TABLE_INVALID))
        };
        let rw = SlPte::R | SlPte::W;
        if cache {
            if let Some(leaf_table) = self.ps_cache().lookup(ps_key) {
                self.bump(Ctr::ps_hits);
                let r = read_pte(leaf_table, 1).map(|p| Leaf {
                    page: p.addr(),
                    perms: p.0 & rw,
                });
                return (r, true);
            }
        }
        let sllps = regs::Cap(self.reg(regs::CAP)).sllps();
        let mut perms = rw;
        let mut table = ce.slptptr();
        for level in (1..=levels).rev() {
            let pte = match read_pte(table, level) {
                Ok(p) => p,
                Err(f) => return (Err(f), false),
            };
            if !pte.present() {
                return (Ok(Leaf::NONE), false);
            }
            // §3.7.1: permissions are the AND of all levels.
            perms &= pte.0 & rw;
            if level == 1 {
                return (
                    Ok(Leaf {
                        page: pte.addr(),
                        perms,
                    }),
                    false,
                );
            }
            if pte.sp() {
                // §9.8: SP is valid at level 2 (2 MiB, SLLPS bit 0) and
                // level 3 (1 GiB, SLLPS bit 1); elsewhere it is reserved.
                let ok = (level == 2 && sllps & 1 != 0) || (level == 3 && sllps & 2 != 0);
                if !ok {
                    return (Err(fault(0xC)), false);
                }
                let size = level_size(level);
                let page = (pte.addr() & !(size - 1)) | (iova & (size - 1) & !0xFFF);
                return (Ok(Leaf { page, perms }), false);
            }
            if level == 2 && cache && self.ps_cache().insert(ps_key, pte.addr()) {
                self.bump(Ctr::iotlb_wipes);
            }
            table = pte.addr();
        }
        (Ok(Leaf::NONE), false)
    }

    /// Translate one page with no cache use at all (the truth in memory).
    fn translate_real(&self, sid: u16, iova: u64) -> Xlate {
        if !self.gsts().contains(Gsts::TES) {
            return Ok(Leaf {
                page: iova & !0xFFF,
                perms: SlPte::R | SlPte::W,
            });
        }
        let ce = self
            .read_context(sid)
            .map_err(|reason| Fault { reason, fpd: false })?;
        match self.context_mode(ce, iova)? {
            None => Ok(Leaf {
                page: iova & !0xFFF,
                perms: SlPte::R | SlPte::W,
            }),
            Some(levels) => self.walk(ce, levels, iova, false).0,
        }
    }

    /// Translate one page as the hardware would, through the caches.
    fn translate_cached(&self, sid: u16, iova: u64) -> Xlate {
        if !self.gsts().contains(Gsts::TES) {
            return self.translate_real(sid, iova);
        }
        let (ctx, mut used_cache) = self.context(sid);
        let result = (|| {
            let ce = ctx.map_err(|reason| Fault { reason, fpd: false })?;
            let Some(levels) = self.context_mode(ce, iova)? else {
                return Ok(Leaf {
                    page: iova & !0xFFF,
                    perms: SlPte::R | SlPte::W,
                });
            };
            let key = cache_key(ce.did(), iova >> 12);
            let iotlb = self.iotlb();
            if let Some(v) = iotlb.lookup(key) {
                self.bump(Ctr::iotlb_hits);
                used_cache = true;
                return Ok(Leaf {
                    page: v & !0xFFF,
                    perms: v & (SlPte::R | SlPte::W),
                });
            }
            self.bump(Ctr::iotlb_misses);
            self.bump(Ctr::walks);
            let (r, from_ps) = self.walk(ce, levels, iova, true);
            used_cache |= from_ps;
            if let Ok(leaf) = r {
                let cm = self.hdr().caching_mode.load(Relaxed) != 0;
                if (leaf.perms != 0 || cm) && iotlb.insert(key, leaf.page | leaf.perms) {
                    self.bump(Ctr::iotlb_wipes);
                }
            }
            r
        })();
        if used_cache && !same_outcome(&result, &self.translate_real(sid, iova)) {
            self.bump(Ctr::stale_hits);
        }
        result
    }

    /// §7.2.1 primary fault logging into the fault recording registers.
    fn record_fault(&self, sid: u16, iova: u64, reason: u8, write: bool) {
        let h = self.hdr();
        let fsts = self.fsts();
        if fsts & Fsts::PFO.bits() != 0 {
            self.bump(Ctr::faults_dropped);
            return;
        }
        let nfr = h.nfr.load(Relaxed).max(1);
        let idx = h.next_frcd.load(Relaxed) % nfr;
        let at = FRCD + 16 * idx as usize;
        if self.reg(at + 8) & FRCD_F != 0 {
            self.set_reg32(regs::FSTS, fsts | Fsts::PFO.bits());
            self.bump(Ctr::faults_dropped);
            return;
        }
        let (lo, hi) = FaultRecord {
            fault_addr: iova,
            sid,
            reason,
            is_read: !write,
            f: true,
        }
        .encode();
        self.set_reg(at, lo);
        self.set_reg(at + 8, hi);
        let mut fsts = fsts;
        if fsts & Fsts::PPF.bits() == 0 {
            fsts = (fsts & !Fsts::FRI.bits()) | ((idx as u32) << 8) | Fsts::PPF.bits();
        }
        self.set_reg32(regs::FSTS, fsts);
        self.set_reg32(regs::FECTL, self.reg32(regs::FECTL) | regs::FECTL_IP);
        h.next_frcd.store((idx + 1) % nfr, Relaxed);
        self.bump(Ctr::faults_recorded);
    }

    /// Software wrote 1 to F of the record at `at`: clear it and recompute
    /// FSTS.PPF/FRI (§10.4.9: PPF is the OR of all F bits).
    fn clear_frcd(&self, at: usize) {
        self.set_reg(at + 8, self.reg(at + 8) & !FRCD_F);
        let nfr = self.hdr().nfr.load(Relaxed) as usize;
        let pending = (0..nfr).find(|i| self.reg(FRCD + 16 * i + 8) & FRCD_F != 0);
        let mut fsts = self.fsts() & !(Fsts::PPF.bits() | Fsts::FRI.bits());
        if let Some(i) = pending {
            fsts |= Fsts::PPF.bits() | ((i as u32) << 8);
        }
        self.set_reg32(regs::FSTS, fsts);
    }

    /// Translate one page for a device access; records a fault on failure.
    fn translate_for_dma(&self, sid: u16, iova: u64, write: bool) -> Result<u64, DmaFault> {
        let _g = SpinLock::lock(&self.hdr().lock);
        let r = self.translate_cached(sid, iova);
        let need = if write { SlPte::W } else { SlPte::R };
        let reason = match r {
            Ok(leaf) if leaf.perms & need != 0 => return Ok(leaf.page | (iova & 0xFFF)),
            // §7.1.3 / Appendix A: an entry lacking the needed permission
            // (including a not-present one) gives reason 5 (write) / 6 (read).
            Ok(_) => Fault {
                reason: if write {
                    fault_reason::WRITE
                } else {
                    fault_reason::READ
                },
                fpd: false,
            },
            Err(f) => f,
        };
        if !reason.fpd {
            self.record_fault(sid, iova & !0xFFF, reason.reason, write);
        }
        Err(DmaFault::Translation {
            sid,
            iova,
            reason: reason.reason,
            write,
        })
    }

    fn dma(
        &self,
        sid: u16,
        iova: u64,
        len: usize,
        write: bool,
        mut copy: impl FnMut(u64, std::ops::Range<usize>) -> Result<(), MemError>,
    ) -> Result<(), DmaFault> {
        let mut done = 0usize;
        while done < len {
            let a = iova.wrapping_add(done as u64);
            let chunk = (4096 - (a & 0xFFF) as usize).min(len - done);
            let phys = self.translate_for_dma(sid, a, write)?;
            copy(phys, done..done + chunk).map_err(|_| DmaFault::Bus { phys })?;
            done += chunk;
        }
        Ok(())
    }

    /// Device-side read of `buf.len()` bytes at `iova` by requester `sid`.
    /// Each page is translated separately; a fault aborts the access (bytes
    /// of earlier pages are already copied).
    pub fn dma_read(&self, sid: u16, iova: u64, buf: &mut [u8]) -> Result<(), DmaFault> {
        let len = buf.len();
        self.dma(sid, iova, len, false, |phys, r| {
            self.read_bytes(phys, &mut buf[r])
        })
    }

    /// Device-side write of `data` at `iova` by requester `sid`.
    pub fn dma_write(&self, sid: u16, iova: u64, data: &[u8]) -> Result<(), DmaFault> {
        self.dma(sid, iova, data.len(), true, |phys, r| {
            self.write_bytes(phys, &data[r])
        })
    }

    /// Translate `iova` for `sid` from the tables in memory, ignoring and
    /// not filling any cache. `Err` holds a root/context-level fault reason;
    /// a not-present leaf gives `Ok` with neither permission.
    pub fn translate_uncached(&self, sid: u16, iova: u64) -> Result<Translation, u8> {
        let _g = SpinLock::lock(&self.hdr().lock);
        let leaf = self.translate_real(sid, iova).map_err(|f| f.reason)?;
        Ok(Translation {
            phys: leaf.page | (iova & 0xFFF),
            read: leaf.perms & SlPte::R != 0,
            write: leaf.perms & SlPte::W != 0,
        })
    }
}

/// Registers modelled as one 64-bit register (the rest of the 8-byte slots
/// are pairs of 32-bit registers).
fn is_reg64(off: usize) -> bool {
    matches!(
        off,
        regs::CAP
            | regs::ECAP
            | regs::RTADDR
            | regs::CCMD
            | regs::IQH
            | regs::IQT
            | regs::IQA
            | regs::IQER
            | IVA
            | IOTLB
    )
}

#[cfg(test)]
mod tests;
