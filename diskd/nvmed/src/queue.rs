//! A submission/completion queue pair in DMA memory, mapped once for its lifetime, with
//! polled completions (phase tag, NVMe Base Specification 1.4 §4.6) and its two doorbells.

use std::sync::atomic::{fence, Ordering};
use std::sync::{Arc, Mutex};

use linuxhw::mmio::MmioRegion;

use crate::cmd::{Cqe, Sqe, CQE_LEN, SQE_LEN};
use crate::{Error, Result};
use e1000d::DmaBuf;

/// BAR 0 of a controller, shared by every queue's doorbells.
pub struct Bar {
    region: Mutex<MmioRegion>,
    base: *mut u8,
    len: usize,
}

// SAFETY: the mapping lives as long as the `Bar` (the region is dropped with it) and is
// only accessed through volatile raw-pointer operations on 32-bit registers; each
// doorbell is written by the one queue that owns it, other registers under the mutex.
unsafe impl Send for Bar {}
// SAFETY: as above: shared access never forms references into the mapping.
unsafe impl Sync for Bar {}

impl Bar {
    /// Wraps a mapped BAR 0.
    pub fn new(region: MmioRegion) -> Bar {
        let (base, len) = (region.as_ptr(), region.len());
        Bar {
            region: Mutex::new(region),
            base,
            len,
        }
    }

    fn regs(&self) -> std::sync::MutexGuard<'_, MmioRegion> {
        self.region.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// 32-bit register read.
    pub fn read32(&self, off: usize) -> Result<u32> {
        Ok(self.regs().read32(off)?)
    }

    /// 64-bit register read.
    pub fn read64(&self, off: usize) -> Result<u64> {
        Ok(self.regs().read64(off)?)
    }

    /// 32-bit register write.
    pub fn write32(&self, off: usize, v: u32) -> Result<()> {
        Ok(self.regs().write32(off, v)?)
    }

    /// 64-bit register write (ASQ/ACQ).
    pub fn write64(&self, off: usize, v: u64) -> Result<()> {
        Ok(self.regs().write64(off, v)?)
    }

    /// A doorbell at `off` (checked to lie inside the BAR).
    pub fn doorbell(self: &Arc<Self>, off: usize) -> Result<Doorbell> {
        if !off.is_multiple_of(4) || off + 4 > self.len {
            return Err(Error::Invalid(format!(
                "doorbell {off:#x} outside the {:#x}-byte BAR",
                self.len
            )));
        }
        Ok(Doorbell {
            bar: self.clone(),
            off,
        })
    }
}

/// One doorbell register, written by its queue alone.
pub struct Doorbell {
    bar: Arc<Bar>,
    off: usize,
}

impl Doorbell {
    /// Writes the new tail (SQ) or head (CQ).
    pub fn ring(&self, v: u16) {
        // Entries written to memory before must be visible before the device sees the
        // doorbell (on x86 stores are ordered; the fence keeps the compiler honest).
        fence(Ordering::SeqCst);
        // SAFETY: off + 4 <= len (checked in `Bar::doorbell`) and 4-aligned; the BAR
        // stays mapped while `self.bar` lives; volatile MMIO write, no reference formed.
        unsafe {
            self.bar
                .base
                .add(self.off)
                .cast::<u32>()
                .write_volatile(u32::from(v))
        };
    }
}

/// A submission queue and its completion queue (same size, one CQ per SQ).
pub struct QueuePair {
    /// Queue identifier (0 = admin).
    pub qid: u16,
    entries: u16,
    sq: DmaBuf,
    cq: DmaBuf,
    /// IOVAs of the two rings (mapped once).
    pub sq_iova: u64,
    /// See `sq_iova`.
    pub cq_iova: u64,
    sq_tail: u16,
    sq_head: u16,
    cq_head: u16,
    phase: bool,
    sq_db: Doorbell,
    cq_db: Doorbell,
}

// SAFETY: the rings are DMA memory owned by the mapper (which outlives the queue) and
// touched only through volatile raw-pointer accesses by the thread owning the pair.
unsafe impl Send for QueuePair {}

impl QueuePair {
    /// A queue pair over zeroed rings `sq` (entries × 64 B) and `cq` (entries × 16 B)
    /// already mapped at `sq_iova` / `cq_iova`.
    pub fn new(
        qid: u16,
        entries: u16,
        (sq, sq_iova): (DmaBuf, u64),
        (cq, cq_iova): (DmaBuf, u64),
        (sq_db, cq_db): (Doorbell, Doorbell),
    ) -> Result<QueuePair> {
        if entries < 2
            || sq.len() < usize::from(entries) * SQE_LEN
            || cq.len() < usize::from(entries) * CQE_LEN
        {
            return Err(Error::Invalid(format!(
                "queue {qid}: rings too small for {entries} entries"
            )));
        }
        // SAFETY: cq holds entries × 16 bytes (checked); the device does not own the
        // ring before the queue is created.
        unsafe { std::ptr::write_bytes(cq.as_ptr(), 0, usize::from(entries) * CQE_LEN) };
        Ok(QueuePair {
            qid,
            entries,
            sq,
            cq,
            sq_iova,
            cq_iova,
            sq_tail: 0,
            sq_head: 0,
            cq_head: 0,
            phase: true,
            sq_db,
            cq_db,
        })
    }

    /// Entries per ring.
    pub fn entries(&self) -> u16 {
        self.entries
    }

    /// Commands that fit the submission queue now (one slot always stays empty, §4.1.1).
    pub fn free_slots(&self) -> u16 {
        let used = (self.sq_tail + self.entries - self.sq_head) % self.entries;
        self.entries - 1 - used
    }

    /// Writes `sqe` at the tail and rings the tail doorbell.
    pub fn submit(&mut self, sqe: &Sqe) -> Result<()> {
        if self.free_slots() == 0 {
            return Err(Error::QueueFull {
                qid: self.qid,
                entries: self.entries,
            });
        }
        let slot = usize::from(self.sq_tail) * SQE_LEN;
        // SAFETY: sq_tail < entries and the ring holds entries × 64 bytes, so the 64-byte
        // entry is inside it; the slot is between head and tail, not owned by the device;
        // volatile dword writes, no reference formed.
        unsafe {
            let p = self.sq.as_ptr().add(slot).cast::<u32>();
            for (i, d) in sqe.0.iter().enumerate() {
                p.add(i).write_volatile(*d);
            }
        }
        self.sq_tail = (self.sq_tail + 1) % self.entries;
        self.sq_db.ring(self.sq_tail);
        Ok(())
    }

    /// Takes the next completion if its phase tag says the device posted it; rings the
    /// head doorbell.
    pub fn poll(&mut self) -> Option<Cqe> {
        let slot = usize::from(self.cq_head) * CQE_LEN;
        // SAFETY: cq_head < entries and the ring holds entries × 16 bytes; volatile reads
        // because the device writes the entry; no reference formed.
        let dw3 = unsafe {
            self.cq
                .as_ptr()
                .add(slot + 12)
                .cast::<u32>()
                .read_volatile()
        };
        if (dw3 & (1 << 16) != 0) != self.phase {
            return None;
        }
        // The rest of the entry is read only after its phase tag.
        fence(Ordering::Acquire);
        // SAFETY: as above.
        let d = unsafe {
            let p = self.cq.as_ptr().add(slot).cast::<u32>();
            [
                p.read_volatile(),
                p.add(1).read_volatile(),
                p.add(2).read_volatile(),
                dw3,
            ]
        };
        let cqe = Cqe::decode(d);
        self.cq_head += 1;
        if self.cq_head == self.entries {
            self.cq_head = 0;
            self.phase = !self.phase;
        }
        if cqe.sq_head < self.entries {
            self.sq_head = cqe.sq_head;
        }
        self.cq_db.ring(self.cq_head);
        Some(cqe)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmd::{nvm, Prp};
    use std::ptr::NonNull;

    /// A BAR backed by a temporary file (the doorbells land in it) and heap rings.
    fn setup(entries: u16) -> (Arc<Bar>, Vec<u64>, Vec<u64>, std::path::PathBuf) {
        let path = std::env::temp_dir().join(format!("nvmed-bar-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; 0x2000]).expect("temp BAR file");
        let region = MmioRegion::from_file(&path, 0x2000).expect("map temp BAR");
        let sq = vec![0u64; usize::from(entries) * SQE_LEN / 8];
        let cq = vec![0u64; usize::from(entries) * CQE_LEN / 8];
        (Arc::new(Bar::new(region)), sq, cq, path)
    }

    fn buf(v: &mut [u64], phys: u64) -> DmaBuf {
        let p = NonNull::new(v.as_mut_ptr().cast::<u8>()).expect("heap pointer");
        // SAFETY: v lives for the whole test and is only accessed through this buffer.
        unsafe { DmaBuf::new(p, phys, v.len() * 8) }
    }

    /// The "device" posts a completion for `cid` with `phase` in CQ slot `slot`.
    fn post(cq: &DmaBuf, slot: usize, cid: u16, sq_head: u16, phase: bool) {
        let d = [
            0u32,
            0,
            u32::from(sq_head) | 1 << 16,
            u32::from(cid) | u32::from(phase) << 16,
        ];
        // SAFETY: slot < entries; 16 bytes inside the CQ buffer.
        unsafe {
            let p = cq.as_ptr().add(slot * CQE_LEN).cast::<u32>();
            for (i, w) in d.iter().enumerate() {
                p.add(i).write_volatile(*w);
            }
        }
    }

    #[test]
    fn submit_poll_phase_and_doorbells() {
        let (bar, mut sqv, mut cqv, path) = setup(4);
        let (sq, cq) = (buf(&mut sqv, 0x10000), buf(&mut cqv, 0x20000));
        let dbs = (
            bar.doorbell(crate::regs::sq_tail_doorbell(1, 0))
                .expect("sq db"),
            bar.doorbell(crate::regs::cq_head_doorbell(1, 0))
                .expect("cq db"),
        );
        let mut q = QueuePair::new(1, 4, (sq, 0x10000), (cq, 0x20000), dbs).expect("queue");
        // One slot always stays empty: 3 of 4 usable.
        assert_eq!(q.free_slots(), 3);
        let prp = Prp {
            prp1: 0x5000,
            prp2: 0,
        };
        for cid in 0..3 {
            q.submit(&Sqe::rw(nvm::READ, cid, 1, 0, 8, &prp))
                .expect("submit");
        }
        assert!(matches!(
            q.submit(&Sqe::flush(9, 1)),
            Err(Error::QueueFull { .. })
        ));
        // SQ 1 tail doorbell at 0x1008 holds 3; the third entry's CDW0 = READ | CID 2.
        assert_eq!(bar.read32(0x1008).expect("db"), 3);
        // SAFETY: entry 2 of the 4-entry SQ.
        let cdw0 = unsafe { sq.as_ptr().add(2 * SQE_LEN).cast::<u32>().read_volatile() };
        assert_eq!(cdw0, 0x0002_0002);
        // Nothing posted yet (phase 0 in a zeroed ring, expected 1).
        assert!(q.poll().is_none());
        post(&cq, 0, 0, 1, true);
        post(&cq, 1, 1, 2, true);
        assert_eq!(q.poll().map(|c| c.cid), Some(0));
        assert_eq!(q.poll().map(|c| c.cid), Some(1));
        assert!(q.poll().is_none());
        // CQ 1 head doorbell at 0x100c holds 2; the SQ head moved to 2: two slots free.
        assert_eq!(bar.read32(0x100c).expect("db"), 2);
        assert_eq!(q.free_slots(), 2);
        post(&cq, 2, 2, 3, true);
        post(&cq, 3, 7, 3, true);
        assert_eq!(q.poll().map(|c| c.cid), Some(2));
        assert_eq!(q.poll().map(|c| c.cid), Some(7));
        // Wrapped: head 0, the expected phase is now 0; slot 0 still holds a phase-1
        // entry from the first pass, which must not be taken again.
        assert_eq!(bar.read32(0x100c).expect("db"), 0);
        assert!(q.poll().is_none());
        post(&cq, 0, 5, 3, false);
        assert_eq!(q.poll().map(|c| (c.cid, c.phase)), Some((5, false)));
        // A doorbell outside the BAR is refused.
        assert!(bar.doorbell(0x2000).is_err());
        assert!(bar.doorbell(0x1002).is_err());
        drop(q);
        let _ = std::fs::remove_file(path);
    }
}
