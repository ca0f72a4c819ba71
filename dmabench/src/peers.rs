//! The peers every strategy is measured against.
//!
//! - `noiommu`: IOVA = physical address; map and unmap do nothing else.
//! - `limit`: the physical floor of any per-core design: per pair a
//!   `sched_getcpu()`, a pop from a per-thread free list, one 8-byte entry
//!   write per page to set and one to clear it, and a push back. No locks, no
//!   bookkeeping. (With 1 page this is exactly two entry writes per pair; a
//!   larger mapping writes one entry per page, as any mapping must.)
//! - `vm-allocator`: what a kernel without our design would do, in-process:
//!   rust-vmm's `AddressAllocator` behind one mutex, leaf entries written into
//!   real second-level tables in a `vtd::sim` model, and a strict
//!   page-selective IOTLB invalidation plus wait through the model's
//!   invalidation queue on every unmap, before the IOVA is freed.
//!   Each client process has its own allocator and its own simulated VT-d
//!   unit (an in-process allocator cannot be shared between processes).

use std::hint::black_box;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use vm_allocator::{AddressAllocator, AllocPolicy, RangeInclusive};
use vtd::desc::Descriptor;
use vtd::entry::{
    context_index, level_index, root_index, AddressWidth, ContextEntry, RootEntry, SlPte,
    CONTEXT_ENTRY_BYTES, PTE_BYTES, ROOT_ENTRY_BYTES,
};
use vtd::regs::{self, Gcmd, Gsts};
use vtd::sim::{SimConfig, SimMachine};

use crate::harness::{Backend, Client, ClientEnv, Counters, PairRunner};

const PAGE: u64 = 4096;
/// Largest mapping a row uses; each thread's buffer is this big.
pub const MAX_PAGES: u64 = 32;
/// Where each thread's DMA buffer notionally lives (physical).
const BUF_BASE: u64 = 0x10_0000;

fn buffer_phys(thread: usize) -> u64 {
    BUF_BASE + thread as u64 * MAX_PAGES * PAGE
}

/// All peers, in table order.
pub fn backends() -> Vec<Box<dyn Backend>> {
    vec![Box::new(NoIommu), Box::new(Limit), Box::new(VmAllocator)]
}

// ----- noiommu -----

/// No IOMMU: the driver hands the device its physical address.
pub struct NoIommu;

impl Backend for NoIommu {
    fn strategy(&self) -> &str {
        "noiommu"
    }
    fn flush(&self) -> &str {
        "none"
    }
    fn client(&self, _env: &ClientEnv) -> io::Result<Box<dyn Client>> {
        Ok(Box::new(NoIommuClient))
    }
}

struct NoIommuClient;

impl Client for NoIommuClient {
    fn thread(&self, index: usize) -> io::Result<Box<dyn PairRunner>> {
        Ok(Box::new(NoIommuRunner {
            phys: buffer_phys(index),
        }))
    }
    fn pt_pages(&self) -> u64 {
        0
    }
}

struct NoIommuRunner {
    phys: u64,
}

impl PairRunner for NoIommuRunner {
    fn pair(&mut self, pages: u64) {
        // map: IOVA = physical address; unmap: nothing.
        let iova = black_box(self.phys);
        black_box((iova, pages));
    }
    fn counters(&self) -> Counters {
        Counters::default()
    }
}

// ----- limit -----

/// The physical floor: a bare per-thread array pop + push and entry writes.
pub struct Limit;

impl Backend for Limit {
    fn strategy(&self) -> &str {
        "limit"
    }
    fn flush(&self) -> &str {
        "none"
    }
    fn client(&self, _env: &ClientEnv) -> io::Result<Box<dyn Client>> {
        Ok(Box::new(LimitClient {
            entry_pages: AtomicU64::new(0),
        }))
    }
}

struct LimitClient {
    /// Pages of entries handed to threads (one each).
    entry_pages: AtomicU64,
}

/// Free IOVAs per thread: more than any row keeps in flight.
const LIMIT_SLOTS: u64 = 64;

impl Client for LimitClient {
    fn thread(&self, index: usize) -> io::Result<Box<dyn PairRunner>> {
        self.entry_pages.fetch_add(1, Relaxed);
        // Slots are MAX_PAGES apart so a mapping's entries stay in the page.
        let per_page = 512 / MAX_PAGES;
        let free = (0..LIMIT_SLOTS)
            .map(|i| (i % per_page) * MAX_PAGES * PAGE)
            .collect();
        Ok(Box::new(LimitRunner {
            free,
            entries: Box::new(EntryPage([0; 512])),
            phys: buffer_phys(index),
        }))
    }
    fn pt_pages(&self) -> u64 {
        self.entry_pages.load(Relaxed)
    }
}

#[repr(C, align(4096))]
struct EntryPage([u64; 512]);

struct LimitRunner {
    free: Vec<u64>,
    entries: Box<EntryPage>,
    phys: u64,
}

impl LimitRunner {
    fn write_entry(&mut self, index: usize, v: u64) {
        let slot: *mut u64 = &mut self.entries.0[index % 512];
        // SAFETY: `slot` comes from a live &mut to an element of this
        // thread's own page of entries, so it is valid, aligned and
        // unaliased; volatile only keeps the store from being elided, as
        // it would be for memory a device reads.
        unsafe { slot.write_volatile(v) };
    }
}

impl PairRunner for LimitRunner {
    fn pair(&mut self, pages: u64) {
        black_box(sched_getcpu());
        let Some(iova) = self.free.pop() else {
            return;
        };
        let first = (iova / PAGE) as usize;
        for i in 0..pages {
            let pte = SlPte::new(self.phys + i * PAGE, true, true).0;
            self.write_entry(first + i as usize, pte);
        }
        black_box(iova);
        for i in 0..pages {
            self.write_entry(first + i as usize, 0);
        }
        self.free.push(iova);
    }
    fn counters(&self) -> Counters {
        Counters::default()
    }
}

fn sched_getcpu() -> i32 {
    // SAFETY: sched_getcpu takes no arguments and only returns a number.
    unsafe { libc::sched_getcpu() }
}

// ----- vm-allocator -----

/// rust-vmm `vm-allocator` behind a mutex, strict invalidation per unmap.
pub struct VmAllocator;

impl Backend for VmAllocator {
    fn strategy(&self) -> &str {
        "vm-allocator"
    }
    fn flush(&self) -> &str {
        "strict"
    }
    fn client(&self, _env: &ClientEnv) -> io::Result<Box<dyn Client>> {
        Ok(Box::new(KernelClient(Arc::new(Kernel::boot()?))))
    }
}

// Layout of the simulated machine's physical memory.
const ROOT: u64 = 0x1000;
const CTX: u64 = 0x2000;
const TOP: u64 = 0x3000;
const QUEUE: u64 = 0x4000;
const STATUS: u64 = 0x5000;
const TABLES: u64 = 0x40_0000;
const MEM_BYTES: usize = 16 << 20;
/// Requester id of the device (00:01.0) and its domain id.
const SID: u16 = 0x0008;
const DID: u16 = 1;
/// IOVA window the allocator hands out.
const IOVA_BASE: u64 = 1 << 32;
const IOVA_SIZE: u64 = 1 << 30;
/// Invalidation queue: QS = 0, 256 descriptors.
const QUEUE_LEN: u64 = 256;
/// Bound on polls of the wait descriptor's status (the model completes
/// during the IQT write, so the first poll should succeed).
const WAIT_POLLS: u32 = 1 << 20;

/// A kernel-style DMA API over one simulated VT-d unit.
struct Kernel {
    m: SimMachine,
    locked: Mutex<Locked>,
}

/// Everything the one lock guards.
struct Locked {
    iovas: AddressAllocator,
    /// Next free page for a page-table page.
    next_table: u64,
    /// Page-table pages in use (top level included).
    tables: u64,
    /// Invalidation queue tail, in descriptors.
    tail: u64,
    /// Last wait-status token.
    token: u32,
}

fn sim_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("dmabench: vtd sim: {e}"))
}

impl Kernel {
    /// Create the machine, point one device at an empty 3-level table and
    /// enable queued invalidation and translation through the registers.
    fn boot() -> io::Result<Kernel> {
        let m = SimMachine::create(SimConfig {
            mem_bytes: MEM_BYTES,
            inval_latency_ns: crate::inval_latency_ns(),
            ..SimConfig::default()
        })?;
        let w128 = |at: u64, v: u128| -> io::Result<()> {
            m.write_u64(at, v as u64).map_err(sim_err)?;
            m.write_u64(at + 8, (v >> 64) as u64).map_err(sim_err)
        };
        w128(
            ROOT + (root_index(SID) * ROOT_ENTRY_BYTES) as u64,
            RootEntry::new(CTX).0,
        )?;
        w128(
            CTX + (context_index(SID) * CONTEXT_ENTRY_BYTES) as u64,
            ContextEntry::translated(TOP, AddressWidth::Aw39, DID).0,
        )?;
        m.write64(regs::RTADDR, ROOT);
        m.write32(regs::GCMD, Gcmd::SRTP.bits());
        m.write64(regs::IQA, regs::iqa(QUEUE, 0));
        m.write32(regs::GCMD, Gcmd::QIE.bits());
        m.write32(regs::GCMD, (Gcmd::QIE | Gcmd::TE).bits());
        let want = Gsts::RTPS | Gsts::QIES | Gsts::TES;
        if !Gsts::from_bits_retain(m.read32(regs::GSTS)).contains(want) {
            return Err(sim_err("GSTS: translation or QI did not come on"));
        }
        let iovas = AddressAllocator::new(IOVA_BASE, IOVA_SIZE).map_err(sim_err)?;
        Ok(Kernel {
            m,
            locked: Mutex::new(Locked {
                iovas,
                next_table: TABLES,
                tables: 1,
                tail: 0,
                token: 0,
            }),
        })
    }

    /// The leaf table covering `iova`, creating missing tables (under the
    /// lock, so two threads never install two tables for one slot).
    fn leaf_table(&self, k: &mut Locked, iova: u64) -> io::Result<u64> {
        let mut table = TOP;
        for level in [3u8, 2] {
            let at = table + (level_index(iova, level) * PTE_BYTES) as u64;
            let pte = SlPte(self.m.read_u64(at).map_err(sim_err)?);
            table = if pte.present() {
                pte.addr()
            } else {
                let new = k.next_table;
                if new + PAGE > MEM_BYTES as u64 {
                    return Err(sim_err("out of page-table memory"));
                }
                k.next_table += PAGE;
                k.tables += 1;
                self.m.write_u64(at, SlPte::table(new).0).map_err(sim_err)?;
                new
            };
        }
        Ok(table)
    }

    /// Strict invalidation of `2^am` pages at `iova`: a page-selective
    /// IOTLB descriptor and a wait descriptor, then poll the status write.
    /// IH (leaf entries only) is set, as Linux sets it when an unmap freed
    /// no page-table page: this kernel never frees tables.
    fn invalidate(&self, k: &mut Locked, iova: u64, am: u8) -> io::Result<()> {
        k.token = k.token.wrapping_add(1).max(1);
        let descs = [
            Descriptor::iotlb_page(DID, iova, am, true, false, false),
            Descriptor::wait(STATUS, k.token, false, true, true),
        ];
        for d in descs {
            let at = QUEUE + k.tail * 16;
            self.m.write_u64(at, d.lo).map_err(sim_err)?;
            self.m.write_u64(at + 8, d.hi).map_err(sim_err)?;
            k.tail = (k.tail + 1) % QUEUE_LEN;
        }
        self.m.write64(regs::IQT, k.tail << 4);
        for _ in 0..WAIT_POLLS {
            if self.m.read_u32(STATUS).map_err(sim_err)? == k.token {
                return Ok(());
            }
            std::hint::spin_loop();
        }
        Err(sim_err(format!(
            "invalidation wait: status at {STATUS:#x} never became {} (IQH {:#x})",
            k.token,
            self.m.read64(regs::IQH)
        )))
    }
}

/// The client of a [`Kernel`]: threads share it through an `Arc`.
struct KernelClient(Arc<Kernel>);

impl Client for KernelClient {
    fn thread(&self, index: usize) -> io::Result<Box<dyn PairRunner>> {
        Ok(Box::new(KernelRunner {
            k: Arc::clone(&self.0),
            phys: buffer_phys(index),
            c: Counters::default(),
        }))
    }
    fn pt_pages(&self) -> u64 {
        self.0.locked.lock().map_or(0, |k| k.tables)
    }
}

struct KernelRunner {
    k: Arc<Kernel>,
    phys: u64,
    c: Counters,
}

impl KernelRunner {
    fn lock(&mut self) -> std::sync::MutexGuard<'_, Locked> {
        self.c.locks += 1;
        self.k
            .locked
            .lock()
            .expect("dmabench: vm-allocator lock poisoned")
    }

    /// dma_map: allocate a size-aligned range, write the leaf entries.
    fn map(&mut self, phys: u64, pages: u64) -> io::Result<(RangeInclusive, u64)> {
        let align = pages.next_power_of_two() * PAGE;
        let k = Arc::clone(&self.k);
        let (range, leaf) = {
            let mut g = self.lock();
            let r = g
                .iovas
                .allocate(pages * PAGE, align, AllocPolicy::FirstMatch)
                .map_err(sim_err)?;
            // Size-aligned and at most 32 pages: never crosses a leaf table.
            let leaf = k.leaf_table(&mut g, r.start())?;
            (r, leaf)
        };
        for i in 0..pages {
            let iova = range.start() + i * PAGE;
            let at = leaf + (level_index(iova, 1) * PTE_BYTES) as u64;
            k.m.write_u64(at, SlPte::new(phys + i * PAGE, true, true).0)
                .map_err(sim_err)?;
        }
        Ok((range, leaf))
    }

    /// dma_unmap: clear the entries, invalidate strictly and wait, then
    /// free the range (never before its invalidation completed).
    fn unmap(&mut self, range: RangeInclusive, leaf: u64, pages: u64) -> io::Result<()> {
        let k = Arc::clone(&self.k);
        for i in 0..pages {
            let iova = range.start() + i * PAGE;
            let at = leaf + (level_index(iova, 1) * PTE_BYTES) as u64;
            k.m.write_u64(at, 0).map_err(sim_err)?;
        }
        let am = pages.next_power_of_two().trailing_zeros() as u8;
        let mut g = self.lock();
        k.invalidate(&mut g, range.start(), am)?;
        g.iovas.free(&range).map_err(sim_err)?;
        drop(g);
        self.c.invals += 1;
        Ok(())
    }
}

impl PairRunner for KernelRunner {
    fn pair(&mut self, pages: u64) {
        let (range, leaf) = self
            .map(self.phys, pages)
            .expect("dmabench: vm-allocator map");
        black_box(range.start());
        self.unmap(range, leaf, pages)
            .expect("dmabench: vm-allocator unmap");
    }
    fn counters(&self) -> Counters {
        self.c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(b: &dyn Backend, pages: u64, n: u64) -> (Counters, u64) {
        let c = b.client(&ClientEnv::default()).unwrap();
        let mut r = c.thread(0).unwrap();
        for _ in 0..n {
            r.pair(pages);
        }
        (r.counters(), c.pt_pages())
    }

    #[test]
    fn peers_count_their_events() {
        for pages in [1, 4, 32] {
            let (c, pt) = run(&VmAllocator, pages, 100);
            assert_eq!((c.locks, c.invals, c.ipc, c.wakeups), (200, 100, 0, 0));
            // Top, one level-2 and one leaf table.
            assert_eq!(pt, 3);
            assert_eq!(run(&Limit, pages, 100), (Counters::default(), 1));
            assert_eq!(run(&NoIommu, pages, 100), (Counters::default(), 0));
        }
    }

    #[test]
    fn vm_allocator_maps_through_the_model_and_invalidates() {
        let k = Kernel::boot().unwrap();
        let k = KernelClient(Arc::new(k));
        let mut r = KernelRunner {
            k: Arc::clone(&k.0),
            phys: buffer_phys(1),
            c: Counters::default(),
        };
        let (range, leaf) = r.map(buffer_phys(1), 4).unwrap();
        // The device sees the buffer at the IOVA, through the caches.
        let m = &k.0.m;
        m.write_bytes(buffer_phys(1) + 3 * PAGE + 8, b"dma!")
            .unwrap();
        let mut got = [0u8; 4];
        m.dma_read(SID, range.start() + 3 * PAGE + 8, &mut got)
            .unwrap();
        assert_eq!(&got, b"dma!");
        let before = m.counters();
        r.unmap(range, leaf, 4).unwrap();
        let after = m.counters();
        assert_eq!(after.iotlb_page - before.iotlb_page, 1);
        assert_eq!(after.wait - before.wait, 1);
        // Unmapped and invalidated: the device faults, nothing stale.
        assert!(m.dma_read(SID, range.start() + 3 * PAGE, &mut got).is_err());
        assert_eq!(m.counters().stale_hits, 0);
    }

    #[test]
    fn limit_leaves_entries_clear() {
        let c = Limit.client(&ClientEnv::default()).unwrap();
        let mut r = LimitRunner {
            free: vec![0],
            entries: Box::new(EntryPage([0; 512])),
            phys: 0,
        };
        r.pair(32);
        assert!(r.entries.0.iter().all(|&e| e == 0));
        assert_eq!(r.free, vec![0]);
        drop(c);
    }
}
