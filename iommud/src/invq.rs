//! The queued-invalidation engine driver (VT-d 3.x §6.5.2).
//!
//! One 4 KiB queue of 256 128-bit descriptors (IQA.QS = 0 → 2^(0+8)
//! entries; IQT/IQH hold byte offsets, index << 4). Every submission ends
//! with an invalidation-wait descriptor whose status write (SW) stores a
//! fresh sequence number into a status word in memory; completion is that
//! word reaching the number, awaited with a bound. Queue errors (FSTS.IQE)
//! are reported with IQER and cleared.

use crate::hw::{HwError, Mmio, PhysMem};
use std::time::{Duration, Instant};
use vtd::desc::{Descriptor, DESC_BYTES};
use vtd::regs::{self, Fsts, Gcmd, Gsts};

/// Queue entries (QS = 0).
const ENTRIES: usize = 256;

/// The invalidation queue of one unit. Callers serialise access (the unit
/// keeps it behind a mutex: this is the one lock every invalidation takes).
#[derive(Debug)]
pub struct InvQueue {
    base: u64,
    status: u64,
    tail: usize,
    /// Where the hardware's head is known to be at least: the tail after
    /// each completed wait (the unit fetched every descriptor before it),
    /// re-read from IQH only when the queue looks full. An MMIO read per
    /// descriptor costs a microsecond on hardware, and under QEMU's TCG a
    /// trip through the emulator's global lock, which a NIC's transmit may
    /// hold for tens of microseconds.
    head: usize,
    seq: u32,
    timeout: Duration,
    coherent: bool,
    /// Wait descriptors completed.
    pub waits: u64,
    /// Descriptors submitted (waits included).
    pub submitted: u64,
}

impl InvQueue {
    /// Allocates the queue page and the status word's page.
    pub fn new(mem: &dyn PhysMem, timeout: Duration, coherent: bool) -> Result<InvQueue, HwError> {
        Ok(InvQueue {
            base: mem.alloc_frame()?,
            status: mem.alloc_frame()?,
            tail: 0,
            head: 0,
            seq: 0,
            timeout,
            coherent,
            waits: 0,
            submitted: 0,
        })
    }

    /// Points the hardware at the queue and enables it (GCMD.QIE), waiting
    /// for GSTS.QIES with a bound.
    pub fn enable(&mut self, mmio: &dyn Mmio) -> Result<(), HwError> {
        // §6.5.2: IQT must be 0 before enabling; the hardware resets IQH.
        mmio.write64(regs::IQT, 0);
        mmio.write64(regs::IQA, regs::iqa(self.base, 0));
        self.tail = 0;
        self.head = 0;
        set_gcmd(mmio, Gcmd::QIE, true, Gsts::QIES, "GSTS.QIES", self.timeout)
    }

    /// Submits `descs` followed by a wait descriptor and waits for its status write.
    pub fn run(
        &mut self,
        mmio: &dyn Mmio,
        mem: &dyn PhysMem,
        descs: &[Descriptor],
    ) -> Result<(), HwError> {
        self.seq = self.seq.wrapping_add(1).max(1);
        let wait = Descriptor::wait(self.status, self.seq, false, true, true);
        let start = Instant::now();
        for d in descs.iter().chain(std::iter::once(&wait)) {
            // Never overtake the head: the slot after tail must not be IQH.
            while (self.tail + 1) % ENTRIES == self.head {
                self.head = (mmio.read64(regs::IQH) >> 4) as usize % ENTRIES;
                if (self.tail + 1) % ENTRIES != self.head {
                    break;
                }
                self.check_error(mmio)?;
                if start.elapsed() > self.timeout {
                    return Err(HwError::Timeout {
                        what: "IQH to advance (invalidation queue full)",
                        ms: self.timeout.as_millis() as u64,
                    });
                }
                std::hint::spin_loop();
            }
            let at = self.base + (self.tail * DESC_BYTES) as u64;
            mem.write_u64(at, d.lo)?;
            mem.write_u64(at + 8, d.hi)?;
            if !self.coherent {
                mem.flush(at, DESC_BYTES as u64);
            }
            self.tail = (self.tail + 1) % ENTRIES;
            self.submitted += 1;
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        mmio.write64(regs::IQT, (self.tail as u64) << 4);
        loop {
            if mem.read_u32(self.status)? == self.seq {
                self.waits += 1;
                // The wait is done: the unit has fetched everything before it.
                self.head = self.tail;
                return Ok(());
            }
            self.check_error(mmio)?;
            if start.elapsed() > self.timeout {
                return Err(HwError::Timeout {
                    what: "invalidation wait status write",
                    ms: self.timeout.as_millis() as u64,
                });
            }
            std::hint::spin_loop();
        }
    }

    fn check_error(&mut self, mmio: &dyn Mmio) -> Result<(), HwError> {
        let fsts = Fsts::from_bits_retain(mmio.read32(regs::FSTS));
        let bad = fsts & (Fsts::IQE | Fsts::ICE | Fsts::ITE);
        if bad.is_empty() {
            return Ok(());
        }
        let iqer = mmio.read64(regs::IQER);
        let head = mmio.read64(regs::IQH);
        // Write-1-to-clear the error bits only; skip the bad descriptor by
        // moving our tail to the head so the queue is usable again.
        mmio.write32(regs::FSTS, bad.bits());
        self.tail = (head >> 4) as usize % ENTRIES;
        self.head = self.tail;
        mmio.write64(regs::IQT, head);
        Err(HwError::Hardware(format!(
            "invalidation queue error FSTS={:#x} IQER={iqer:#x} IQH={head:#x}",
            fsts.bits()
        )))
    }
}

/// Sets or clears one GCMD command and waits for the matching GSTS bit
/// (VT-d 3.x §10.4.4: write GCMD with the persistent enables preserved,
/// one-shot bits masked).
pub fn set_gcmd(
    mmio: &dyn Mmio,
    cmd: Gcmd,
    on: bool,
    status: Gsts,
    what: &'static str,
    timeout: Duration,
) -> Result<(), HwError> {
    let persistent = Gsts::TES | Gsts::QIES | Gsts::IRES | Gsts::CFIS;
    let cur = Gsts::from_bits_retain(mmio.read32(regs::GSTS)) & persistent;
    let mut v = Gcmd::from_bits_retain(cur.bits());
    v.set(cmd, on);
    mmio.write32(regs::GCMD, v.bits());
    wait_for(timeout, what, || {
        let s = Gsts::from_bits_retain(mmio.read32(regs::GSTS));
        s.contains(status) == on
    })
}

/// Polls `done` until true or `timeout` passes.
pub fn wait_for(
    timeout: Duration,
    what: &'static str,
    mut done: impl FnMut() -> bool,
) -> Result<(), HwError> {
    let start = Instant::now();
    loop {
        if done() {
            return Ok(());
        }
        if start.elapsed() > timeout {
            return Err(HwError::Timeout {
                what,
                ms: timeout.as_millis() as u64,
            });
        }
        std::thread::yield_now();
    }
}

#[cfg(all(test, feature = "sim"))]
mod tests {
    use super::*;
    use crate::platform::sim::{SimMmio, SimPlatform};
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    use vtd::sim::SimConfig;

    /// The model's registers, counting IQH reads.
    struct Counting {
        inner: SimMmio,
        iqh_reads: AtomicU64,
    }

    impl Mmio for Counting {
        fn read32(&self, off: usize) -> u32 {
            self.inner.read32(off)
        }
        fn read64(&self, off: usize) -> u64 {
            if off == regs::IQH {
                self.iqh_reads.fetch_add(1, Relaxed);
            }
            self.inner.read64(off)
        }
        fn write32(&self, off: usize, v: u32) {
            self.inner.write32(off, v)
        }
        fn write64(&self, off: usize, v: u64) {
            self.inner.write64(off, v)
        }
    }

    #[test]
    fn a_queue_in_steady_state_never_reads_its_head_and_never_overtakes_it() {
        let p = SimPlatform::new(SimConfig {
            mem_bytes: 16 << 20,
            ..Default::default()
        })
        .unwrap();
        let mmio = Counting {
            inner: SimMmio(p.machine().clone()),
            iqh_reads: AtomicU64::new(0),
        };
        let mut q = InvQueue::new(&p, Duration::from_millis(200), true).unwrap();
        q.enable(&mmio).unwrap();
        // 3 descriptors + 1 wait per run: 600 runs wrap the 256-entry queue
        // 9 times, each run completed before the next.
        let d = Descriptor::iotlb_global(false, false);
        for _ in 0..600 {
            q.run(&mmio, &p, &[d, d, d]).unwrap();
        }
        assert_eq!(q.submitted, 2400);
        assert_eq!(q.waits, 600);
        assert_eq!(mmio.iqh_reads.load(Relaxed), 0, "IQH read in steady state");
        // The unit executed every one of them (no slot overwritten unread).
        assert_eq!(p.machine().read64(regs::IQH), p.machine().read64(regs::IQT));
        // More than fits at once: the queue fills, IQH is read to find room.
        let many = vec![d; 300];
        assert!(
            q.run(&mmio, &p, &many).is_err(),
            "300 descriptors cannot be queued before IQT moves"
        );
    }
}
