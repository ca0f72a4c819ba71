//! One VT-d remapping unit: bring-up, root/context tables, invalidation,
//! domain ids and fault recording.

use crate::hw::{HwError, Mmio, PhysMem};
use crate::invq::{set_gcmd, wait_for, InvQueue};
use crate::stats::UnitStats;
use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use vtd::desc::{Decoded, Descriptor};
use vtd::entry::{context_index, root_index, AddressWidth, ContextEntry, RootEntry};
use vtd::regs::{self, Cap, Ecap, FaultRecord, Fsts, Gcmd, Granularity, Gsts};

/// How to bring the unit up.
#[derive(Clone, Debug)]
pub struct UnitConfig {
    /// Enable DMA remapping (off = the no-IOMMU baseline: devices use physical addresses).
    pub translate: bool,
    /// Bound on every wait for the hardware.
    pub timeout: Duration,
}

impl Default for UnitConfig {
    fn default() -> Self {
        UnitConfig {
            translate: true,
            timeout: Duration::from_secs(1),
        }
    }
}

/// A recorded DMA remapping fault.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FaultEntry {
    /// Source id (bus << 8 | devfn).
    pub sid: u16,
    /// Faulting page address.
    pub addr: u64,
    /// Fault reason (VT-d 3.x Appendix A).
    pub reason: u8,
    /// The request was a read.
    pub is_read: bool,
    /// Milliseconds since iommud started.
    pub at_ms: u64,
}

/// Explains a fault reason code.
pub fn fault_reason_text(r: u8) -> &'static str {
    use vtd::regs::fault_reason as fr;
    match r {
        fr::ROOT_NOT_PRESENT => "root entry not present",
        fr::CONTEXT_NOT_PRESENT => "context entry not present",
        fr::CONTEXT_INVALID => "context entry invalid",
        fr::ADDR_BEYOND_AW => "address beyond the address width",
        fr::WRITE => "write to a non-writable or non-present page",
        fr::READ => "read of a non-readable or non-present page",
        fr::NEXT_TABLE_INVALID => "next-level table address invalid",
        fr::ROOT_TABLE_INVALID => "root table address invalid",
        fr::CONTEXT_TABLE_INVALID => "context table address invalid",
        _ => "other",
    }
}

/// A device whose context entry a takeover carries over (see
/// [`Iommu::init_carrying`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Carried {
    /// Source id.
    pub sid: u16,
    /// Domain id.
    pub did: u16,
    /// The page-table root its entry names.
    pub root: u64,
}

/// The driver of one remapping unit.
pub struct Iommu {
    mmio: Box<dyn Mmio>,
    mem: Arc<dyn PhysMem>,
    /// Capability register.
    pub cap: Cap,
    /// Extended capability register.
    pub ecap: Ecap,
    /// Page-table levels used for every domain.
    pub levels: u8,
    translate: bool,
    timeout: Duration,
    root: u64,
    contexts: Mutex<HashMap<u8, u64>>,
    qi: Mutex<InvQueue>,
    dids: Mutex<Vec<bool>>,
    /// An all-zero table frame for quarantined devices (allocated once).
    quarantine: Mutex<Option<u64>>,
    /// Keep a ledger per delegated domain (memory outlives the process).
    journal: std::sync::atomic::AtomicBool,
    started: Instant,
    /// Unit-wide counters.
    pub stats: UnitStats,
}

impl Iommu {
    /// Brings the unit up: root table, global invalidation, queued
    /// invalidation, then (if configured) translation.
    pub fn init(
        mmio: Box<dyn Mmio>,
        mem: Arc<dyn PhysMem>,
        cfg: &UnitConfig,
    ) -> Result<Iommu, HwError> {
        Self::init_carrying(mmio, mem, cfg, &[])
    }

    /// [`Iommu::init`] taking over a unit a previous iommud left translating,
    /// with the devices of `carry` still translating through the page tables
    /// that iommud left (its domains, which the caller adopts next): their
    /// context entries are in the new root before the unit is pointed at it,
    /// so not one DMA of theirs meets a missing entry (docs/ARCHITECTURE.md,
    /// "Stop, crash and restart"). Their domain ids stay reserved.
    pub fn init_carrying(
        mmio: Box<dyn Mmio>,
        mem: Arc<dyn PhysMem>,
        cfg: &UnitConfig,
        carry: &[Carried],
    ) -> Result<Iommu, HwError> {
        let ver = mmio.read32(regs::VER);
        let cap = Cap(mmio.read64(regs::CAP));
        let ecap = Ecap(mmio.read64(regs::ECAP));
        if !ecap.qi() {
            return Err(HwError::Unsupported(
                "ECAP.QI = 0: queued invalidation is required".into(),
            ));
        }
        let levels = cap.levels().ok_or_else(|| {
            HwError::Unsupported(format!(
                "CAP.SAGAW {:#x} has neither 3 nor 4 levels",
                cap.sagaw()
            ))
        })?;
        let t = cfg.timeout;
        // A previous owner (an iommud that stopped or died) may have left
        // translation and the queue on: see `crate::handover`.
        let gsts = crate::handover::release_queue(&*mmio, t)?;
        let root = mem.alloc_frame()?;
        let ecap_c = ecap.c();
        let mut contexts = HashMap::new();
        if gsts.contains(Gsts::TES) && cfg.translate {
            let aw = AddressWidth::from_levels(levels)
                .ok_or_else(|| HwError::Unsupported(format!("{levels} levels")))?;
            for c in carry {
                let bus = root_index(c.sid);
                let ctp = match contexts.get(&(bus as u8)) {
                    Some(&t) => t,
                    None => {
                        let t = mem.alloc_frame()?;
                        let re = RootEntry::new(t);
                        mem.write_u64(root + (bus * 16) as u64 + 8, re.hi())?;
                        mem.write_u64(root + (bus * 16) as u64, re.lo())?;
                        contexts.insert(bus as u8, t);
                        t
                    }
                };
                let ce = ContextEntry::translated(c.root, aw, c.did);
                let at = ctp + (context_index(c.sid) * 16) as u64;
                mem.write_u64(at + 8, ce.hi())?;
                mem.write_u64(at, ce.lo())?;
                if !ecap_c {
                    mem.flush(at, 16);
                }
            }
            if !ecap_c {
                mem.flush(root, 4096);
            }
        }
        // §10.4.6 RTADDR: table address 63:12, TTM 11:10 = 00 (legacy root table).
        mmio.write64(regs::RTADDR, root);
        set_gcmd(&*mmio, Gcmd::SRTP, true, Gsts::RTPS, "GSTS.RTPS", t)?;
        // §6.5.1 register-based global invalidations, before QI is enabled.
        mmio.write64(
            regs::CCMD,
            regs::ccmd(Granularity::Global, 0, 0, 0) | regs::CCMD_ICC,
        );
        wait_for(t, "CCMD.ICC to clear", || {
            mmio.read64(regs::CCMD) & regs::CCMD_ICC == 0
        })?;
        let iotlb = ecap.iro_bytes() + 8;
        mmio.write64(
            iotlb,
            regs::iotlb_reg(Granularity::Global, 0, cap.drd(), cap.dwd()) | regs::IOTLB_IVT,
        );
        wait_for(t, "IOTLB.IVT to clear", || {
            mmio.read64(iotlb) & regs::IOTLB_IVT == 0
        })?;
        let coherent = ecap.c();
        let mut qi = InvQueue::new(&*mem, t, coherent)?;
        qi.enable(&*mmio)?;
        // One global invalidation through the queue now, so the last
        // descriptor the unit executed is always a wait: QEMU refuses to
        // turn QI off otherwise, which would leave the next iommud unable
        // to take the unit over (see `crate::handover`).
        qi.run(
            &*mmio,
            &*mem,
            &[
                Descriptor::cc_global(),
                Descriptor::iotlb_global(cap.drd(), cap.dwd()),
            ],
        )?;
        let ndids = cap.domain_ids().min(1 << 16) as usize;
        let mut dids = vec![false; ndids];
        // DID 0 is reserved when caching mode is set (§9.3); we never use it.
        if let Some(d) = dids.first_mut() {
            *d = true;
        }
        for c in carry {
            if let Some(d) = dids.get_mut(usize::from(c.did)) {
                *d = true;
            }
        }
        let unit = Iommu {
            mmio,
            mem,
            cap,
            ecap,
            levels,
            translate: cfg.translate,
            timeout: t,
            root,
            contexts: Mutex::new(contexts),
            journal: std::sync::atomic::AtomicBool::new(false),
            qi: Mutex::new(qi),
            dids: Mutex::new(dids),
            quarantine: Mutex::new(None),
            started: Instant::now(),
            stats: UnitStats::default(),
        };
        // Stale fault records from before us: clear, don't report.
        unit.clear_faults();
        if cfg.translate && !gsts.contains(Gsts::TES) {
            set_gcmd(&*unit.mmio, Gcmd::TE, true, Gsts::TES, "GSTS.TES", t)?;
        } else if !cfg.translate && gsts.contains(Gsts::TES) {
            // The administrator asked for no translation: only now, with
            // every context entry gone, does TE go off.
            set_gcmd(
                &*unit.mmio,
                Gcmd::TE,
                false,
                Gsts::TES,
                "GSTS.TES to clear",
                t,
            )?;
        }
        log::info(&format!(
            "VT-d unit up: VER {ver:#x} CAP {:#018x} ECAP {:#018x}; {levels}-level tables, \
             caching mode {}, coherent {}, {} domain ids, translation {}, root {root:#x}",
            cap.0,
            ecap.0,
            cap.cm(),
            coherent,
            ndids,
            if cfg.translate { "on" } else { "off" }
        ));
        Ok(unit)
    }

    /// Physical memory seam.
    pub fn mem(&self) -> &Arc<dyn PhysMem> {
        &self.mem
    }

    /// True when table writes need a CPU cache flush (ECAP.C = 0).
    pub fn coherent(&self) -> bool {
        self.ecap.c()
    }

    /// True in caching mode (non-present → present changes need invalidation).
    pub fn caching_mode(&self) -> bool {
        self.cap.cm()
    }

    /// Whether DMA remapping is enabled.
    pub fn translating(&self) -> bool {
        self.translate
    }

    fn qi(&self) -> MutexGuard<'_, InvQueue> {
        self.stats.qi_lock.fetch_add(1, Relaxed);
        self.qi.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs invalidation descriptors and waits for their completion.
    pub fn invalidate(&self, descs: &[Descriptor]) -> Result<(), HwError> {
        for d in descs {
            let c = match d.decode() {
                Decoded::Iotlb { g, .. } => match g {
                    Granularity::Global => &self.stats.iotlb_global,
                    Granularity::Domain => &self.stats.iotlb_domain,
                    Granularity::Selective => &self.stats.iotlb_page,
                },
                Decoded::ContextCache { .. } => &self.stats.context,
                _ => &self.stats.other,
            };
            c.fetch_add(1, Relaxed);
        }
        let r = self.qi().run(&*self.mmio, &*self.mem, descs);
        self.stats.waits.fetch_add(1, Relaxed);
        if r.is_err() {
            self.stats.errors.fetch_add(1, Relaxed);
        }
        r
    }

    /// The IOTLB descriptors that invalidate `pages` pages from `iova` in
    /// `did`: page-selective with an address mask when the unit supports it
    /// (CAP.PSI, CAP.MAMV) and the range is a naturally aligned power of two,
    /// else domain-selective. `ih` keeps the paging-structure caches (only
    /// when no table was freed).
    pub fn iotlb_range(&self, did: u16, iova: u64, pages: u64, ih: bool) -> Descriptor {
        let (dr, dw) = (self.cap.drd(), self.cap.dwd());
        let am = pages.next_power_of_two().trailing_zeros() as u8;
        let aligned = iova.is_multiple_of(pages.next_power_of_two() << 12);
        if self.cap.psi() && am <= self.cap.mamv() && aligned {
            Descriptor::iotlb_page(did, iova, am, ih, dr, dw)
        } else {
            Descriptor::iotlb_domain(did, dr, dw)
        }
    }

    /// Domain-selective IOTLB descriptor.
    pub fn iotlb_domain(&self, did: u16) -> Descriptor {
        Descriptor::iotlb_domain(did, self.cap.drd(), self.cap.dwd())
    }

    /// Allocates a domain id.
    pub fn alloc_did(&self) -> Option<u16> {
        let mut d = self.dids.lock().unwrap_or_else(|p| p.into_inner());
        let i = d.iter().position(|used| !used)?;
        d[i] = true;
        u16::try_from(i).ok()
    }

    /// Whether domains keep ledgers (`crate::ledger`) for a restarted iommud.
    pub fn journal(&self) -> bool {
        self.journal.load(Relaxed)
    }

    /// Turns ledgers on (where memory outlives the process) or off.
    pub fn set_journal(&self, on: bool) {
        self.journal.store(on, Relaxed);
    }

    /// Frees a domain id.
    pub fn free_did(&self, did: u16) {
        let mut d = self.dids.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = d.get_mut(usize::from(did)) {
            *slot = false;
        }
    }

    fn write_entry128(&self, at: u64, lo: u64, hi: u64, present_last: bool) -> Result<(), HwError> {
        // Write the half holding P last when making present, first when clearing.
        if present_last {
            self.mem.write_u64(at + 8, hi)?;
            self.mem.write_u64(at, lo)?;
        } else {
            self.mem.write_u64(at, lo)?;
            self.mem.write_u64(at + 8, hi)?;
        }
        if !self.coherent() {
            self.mem.flush(at, 16);
        }
        Ok(())
    }

    /// Points `sid`'s context entry at a second-level table (or pass-through
    /// when translation is off) and invalidates the context cache for it.
    pub fn set_context(&self, sid: u16, did: u16, slptptr: u64) -> Result<(), HwError> {
        self.write_context(sid, did, slptptr, false)
    }

    /// Quarantines `sid`: its context entry points at a table with no
    /// present entry and has Fault Processing Disable set (VT-d 3.x §9.3,
    /// FPD bit 1), so every DMA of the device is blocked and none is
    /// recorded — a device that faults without end cannot fill the fault
    /// records that every other device's faults need.
    pub fn quarantine_context(&self, sid: u16, did: u16) -> Result<(), HwError> {
        let empty = {
            let mut q = self.quarantine.lock().unwrap_or_else(|p| p.into_inner());
            match *q {
                Some(f) => f,
                None => {
                    let f = self.mem.alloc_frame()?;
                    *q = Some(f);
                    f
                }
            }
        };
        self.write_context(sid, did, empty, true)
    }

    fn write_context(&self, sid: u16, did: u16, slptptr: u64, fpd: bool) -> Result<(), HwError> {
        let bus = root_index(sid);
        let ctp = {
            let mut ctx = self.contexts.lock().unwrap_or_else(|p| p.into_inner());
            match ctx.get(&(bus as u8)) {
                Some(&c) => c,
                None => {
                    let c = self.mem.alloc_frame()?;
                    let re = RootEntry::new(c);
                    self.write_entry128(self.root + (bus * 16) as u64, re.lo(), re.hi(), true)?;
                    ctx.insert(bus as u8, c);
                    c
                }
            }
        };
        let aw = AddressWidth::from_levels(self.levels)
            .ok_or_else(|| HwError::Unsupported(format!("{} levels", self.levels)))?;
        let ce = ContextEntry::translated(slptptr, aw, did).with_fpd(fpd);
        self.write_entry128(
            ctp + (context_index(sid) * 16) as u64,
            ce.lo(),
            ce.hi(),
            true,
        )?;
        self.invalidate(&[Descriptor::cc_device(did, sid, 0), self.iotlb_domain(did)])
    }

    /// Clears `sid`'s context entry (the device is blocked) and invalidates
    /// the context cache and the domain's IOTLB entries.
    pub fn clear_context(&self, sid: u16, did: u16) -> Result<(), HwError> {
        let ctp = self
            .contexts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(root_index(sid) as u8))
            .copied();
        if let Some(ctp) = ctp {
            self.write_entry128(ctp + (context_index(sid) * 16) as u64, 0, 0, false)?;
        }
        self.invalidate(&[Descriptor::cc_device(did, sid, 0), self.iotlb_domain(did)])
    }

    /// Physical address of the root table the unit points at.
    pub fn root(&self) -> u64 {
        self.root
    }

    /// The last step of an orderly stop, once every domain is gone: clears
    /// every root entry and invalidates the context caches and IOTLB
    /// globally, so the unit, still translating, walks an all-zero root
    /// table and reaches no context table, page table or pool. Only the root
    /// frame (and the queue) must then stay allocated; see
    /// docs/ARCHITECTURE.md, "Stop, crash and restart".
    pub fn park(&self) -> Result<(), HwError> {
        let mut ctx = self.contexts.lock().unwrap_or_else(|p| p.into_inner());
        for bus in 0..256u64 {
            self.mem.write_u64(self.root + bus * 16, 0)?;
            self.mem.write_u64(self.root + bus * 16 + 8, 0)?;
        }
        if !self.coherent() {
            self.mem.flush(self.root, 4096);
        }
        let r = self.invalidate(&[
            Descriptor::cc_global(),
            Descriptor::iotlb_global(self.cap.drd(), self.cap.dwd()),
        ]);
        if r.is_ok() {
            // The context tables are unreachable now and no longer ours to use.
            for (_, c) in ctx.drain() {
                self.mem.free_frame(c);
            }
        }
        r
    }

    fn clear_faults(&self) {
        let fro = self.cap.fro_bytes();
        for i in 0..usize::from(self.cap.nfr()) {
            self.mmio.write64(fro + i * 16 + 8, regs::FRCD_F);
        }
        self.mmio.write32(
            regs::FSTS,
            (Fsts::PFO | Fsts::IQE | Fsts::ICE | Fsts::ITE).bits(),
        );
    }

    /// Reads and clears pending fault records; returns the new ones (also
    /// kept in the log that the `faults` path shows).
    pub fn poll_faults(&self) -> Vec<FaultEntry> {
        let fsts = Fsts::from_bits_retain(self.mmio.read32(regs::FSTS));
        if !fsts.intersects(Fsts::PPF | Fsts::PFO) {
            return Vec::new();
        }
        let fro = self.cap.fro_bytes();
        let nfr = usize::from(self.cap.nfr()).max(1);
        let mut i = usize::from(regs::fsts_fri(fsts.bits())) % nfr;
        let mut out = Vec::new();
        for _ in 0..nfr {
            let hi = self.mmio.read64(fro + i * 16 + 8);
            if hi & regs::FRCD_F == 0 {
                break;
            }
            let lo = self.mmio.read64(fro + i * 16);
            let r = FaultRecord::decode(lo, hi);
            // §10.4.14: F is write-1-to-clear.
            self.mmio.write64(fro + i * 16 + 8, regs::FRCD_F);
            out.push(FaultEntry {
                sid: r.sid,
                addr: r.fault_addr,
                reason: r.reason,
                is_read: r.is_read,
                at_ms: self.started.elapsed().as_millis() as u64,
            });
            i = (i + 1) % nfr;
        }
        if fsts.contains(Fsts::PFO) {
            self.stats.faults_lost.fetch_add(1, Relaxed);
            self.mmio.write32(regs::FSTS, Fsts::PFO.bits());
        }
        self.stats.faults.fetch_add(out.len() as u64, Relaxed);
        out
    }

    /// Milliseconds since the unit was brought up (the faults' clock).
    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// The bound used for hardware waits.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

/// Minimal logging to stderr with the daemon's name (no logging crate needed).
pub mod log {
    use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

    static QUIET: AtomicBool = AtomicBool::new(false);

    /// Silences the log (the in-process fuzzer, whose millions of refused
    /// requests would otherwise be millions of lines).
    pub fn set_quiet(on: bool) {
        QUIET.store(on, Relaxed);
    }

    /// Informational line.
    pub fn info(msg: &str) {
        if !QUIET.load(Relaxed) {
            eprintln!("iommud: {msg}");
        }
    }
    /// Warning line.
    pub fn warn(msg: &str) {
        if !QUIET.load(Relaxed) {
            eprintln!("iommud: warning: {msg}");
        }
    }
}
