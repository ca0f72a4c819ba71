//! The `linux` platform: a root process in a Linux guest that owns the VT-d unit.
//!
//! - [`LinuxMmio`]: the unit's registers, mapped through `/dev/mem` (the guest kernel is
//!   booted with `intel_iommu=off intremap=off iomem=relaxed`, so it leaves them alone).
//! - [`discover`]: finds the unit through the ACPI DMAR table.
//! - [`HugeMem`]: physical memory from 2 MiB hugepages (`memfd_create(MFD_HUGETLB)`),
//!   physical addresses from `/proc/self/pagemap`; 4 KiB pages as a fallback.
//!
//! Limitations, by design for now:
//! - Only one DRHD is driven (see [`discover`]).
//! - A client region is one backing page: at most 2 MiB with hugepages, at most 4 KiB with
//!   the small-page fallback (4 KiB pages are not physically contiguous with each other).

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use linuxhw::hugemem::{HugeRegion, HUGE_PAGE_SIZE};
use linuxhw::mmio::MmioRegion;
use linuxhw::PAGE_SIZE;
use vtd::regs::{CAP, ECAP};

use vtd::dmar::{choose_drhd, register_span};

use crate::hw::{HwError, Mmio, PhysMem, Region};

/// Size of a table frame.
const FRAME: u64 = PAGE_SIZE as u64;
/// CPU cache line size on x86-64 (the `clflush` granule).
const CACHE_LINE: usize = 64;
/// Small pages allocated at once when the table-frame pool grows on the small-page source.
const SMALL_POOL_PAGES: usize = 16;

/// Converts a `linuxhw` error into [`HwError::Os`], keeping the OS error kind when there is
/// one and the full message (path, address) always.
fn os_err(what: &'static str, e: linuxhw::Error) -> HwError {
    let msg = e.to_string();
    let kind = match &e {
        linuxhw::Error::Io { source, .. } | linuxhw::Error::Sys { source, .. } => source.kind(),
        _ => std::io::ErrorKind::Other,
    };
    HwError::Os {
        what,
        err: std::io::Error::new(kind, msg),
    }
}

/// Takes a lock even if another thread panicked while holding it: the protected state is
/// only mappings and allocator bookkeeping, which every critical section leaves consistent.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------------------
// Registers
// ---------------------------------------------------------------------------------------

/// One VT-d unit's registers, mapped through `/dev/mem`.
///
/// Accesses are volatile and serialised by a mutex (the mapping is not `Sync` by itself; the
/// lock is uncontended in practice and costs nothing next to an MMIO trap into QEMU). An
/// access outside the mapping or misaligned is an iommud bug: it is logged with its offset
/// and reads as 0 / is dropped, never a panic.
#[derive(Debug)]
pub struct LinuxMmio {
    regs: Mutex<MmioRegion>,
    phys: Option<u64>,
    len: usize,
}

impl LinuxMmio {
    /// Maps the register set at physical `base`: first one page, to read CAP and ECAP, then
    /// the span they (and `min_len`) call for. Needs root and `iomem=relaxed`.
    pub fn map(base: u64, min_len: usize) -> Result<LinuxMmio, HwError> {
        let first =
            MmioRegion::map(base, PAGE_SIZE).map_err(|e| os_err("map VT-d registers", e))?;
        let cap = first
            .read64(CAP)
            .map_err(|e| os_err("read VT-d CAP register", e))?;
        let ecap = first
            .read64(ECAP)
            .map_err(|e| os_err("read VT-d ECAP register", e))?;
        if cap == u64::MAX || ecap == u64::MAX {
            return Err(HwError::Hardware(format!(
                "VT-d registers at {base:#x} read all-ones (CAP {cap:#x}, ECAP {ecap:#x}): \
                 nothing decodes there"
            )));
        }
        let span = register_span(cap, ecap, min_len);
        let regs = if span > first.len() {
            drop(first);
            MmioRegion::map(base, span).map_err(|e| os_err("map VT-d registers", e))?
        } else {
            first
        };
        Ok(LinuxMmio::from_region(regs))
    }

    /// Wraps an already-mapped region (a `/dev/mem` mapping, or a file in tests).
    pub fn from_region(regs: MmioRegion) -> LinuxMmio {
        LinuxMmio {
            phys: regs.phys(),
            len: regs.len(),
            regs: Mutex::new(regs),
        }
    }

    /// Physical address of the register set, when mapped through `/dev/mem`.
    pub fn phys(&self) -> Option<u64> {
        self.phys
    }

    /// Bytes of register space mapped.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is mapped (never true).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn bug(&self, op: &str, off: usize, e: &linuxhw::Error) {
        eprintln!(
            "iommud: BUG: VT-d register {op} at offset {off:#x} (mapped {:#x} bytes): {e}",
            self.len
        );
    }
}

impl Mmio for LinuxMmio {
    fn read32(&self, off: usize) -> u32 {
        lock(&self.regs).read32(off).unwrap_or_else(|e| {
            self.bug("read32", off, &e);
            0
        })
    }

    fn read64(&self, off: usize) -> u64 {
        lock(&self.regs).read64(off).unwrap_or_else(|e| {
            self.bug("read64", off, &e);
            0
        })
    }

    fn write32(&self, off: usize, v: u32) {
        if let Err(e) = lock(&self.regs).write32(off, v) {
            self.bug("write32", off, &e);
        }
    }

    fn write64(&self, off: usize, v: u64) {
        if let Err(e) = lock(&self.regs).write64(off, v) {
            self.bug("write64", off, &e);
        }
    }
}

/// Finds the VT-d unit through `/sys/firmware/acpi/tables/DMAR` and maps its registers.
///
/// Known limitation: only one DRHD is driven (the first with INCLUDE_PCI_ALL, else the
/// first). QEMU's q35 has exactly one; on a machine with several, devices behind the others
/// stay untranslated by iommud. Every DRHD found is logged.
pub fn discover() -> Result<LinuxMmio, HwError> {
    let dmar = linuxhw::dmar::read().map_err(|e| os_err("read ACPI DMAR table", e))?;
    for (i, d) in dmar.drhds.iter().enumerate() {
        eprintln!(
            "iommud: DMAR: DRHD {i}: registers at {:#x}, segment {}, flags {:#x}{}, {} device scope(s)",
            d.register_base,
            d.segment,
            d.flags,
            if d.include_pci_all() {
                " (INCLUDE_PCI_ALL)"
            } else {
                ""
            },
            d.scopes.len()
        );
    }
    let drhd = choose_drhd(&dmar).ok_or_else(|| {
        HwError::Unsupported("the ACPI DMAR table lists no DRHD (no VT-d unit)".into())
    })?;
    if dmar.drhds.len() > 1 {
        eprintln!(
            "iommud: DMAR: {} DRHDs found; only the one at {:#x} is driven \
             (multiple VT-d units are a known limitation)",
            dmar.drhds.len(),
            drhd.register_base
        );
    }
    let mmio = LinuxMmio::map(drhd.register_base, drhd.min_register_bytes())?;
    eprintln!(
        "iommud: VT-d unit at {:#x}: {:#x} bytes of registers mapped (HAW {} bits)",
        drhd.register_base,
        mmio.len(),
        dmar.host_address_width
    );
    Ok(mmio)
}

mod hugemem;

pub use hugemem::{HugeMem, MemSource};
