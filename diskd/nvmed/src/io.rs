//! One I/O queue pair with its per-request DMA: every data buffer and PRP list page is
//! mapped when its command is submitted and unmapped when its completion is taken.

use std::sync::Arc;
use std::time::Instant;

use e1000d::{Dir, DmaBuf, DmaMapper};

use crate::cmd::{self, nvm, prp_plan, Cqe, Prp, Prp2, Sqe, PAGE};
use crate::queue::QueuePair;
use crate::{Error, Result};

/// Kind of an I/O command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Device → memory.
    Read,
    /// Memory → device.
    Write,
    /// No data.
    Flush,
}

/// What a command slot holds while the device owns it.
#[derive(Debug, Clone, Copy)]
enum Slot {
    Free,
    Busy {
        op: Op,
        /// Data mapping (IOVA, length), none for FLUSH and raw commands.
        data: Option<(u64, usize)>,
        /// PRP list page mapping.
        list: Option<u64>,
        tag: u64,
        start: Instant,
    },
}

/// A finished command.
#[derive(Debug, Clone, Copy)]
pub struct Done {
    /// The caller's tag.
    pub tag: u64,
    /// Its kind.
    pub op: Op,
    /// The completion.
    pub cqe: Cqe,
    /// Submission to completion taken.
    pub ns: u64,
}

/// An I/O queue pair driven by one thread.
pub struct IoQueue<M: DmaMapper> {
    qp: QueuePair,
    mapper: Arc<M>,
    nsid: u32,
    /// Logical block size in bytes.
    pub lba_size: u32,
    slots: Vec<Slot>,
    lists: Vec<DmaBuf>,
    free: Vec<u16>,
    /// Maps made (data + list pages).
    pub maps: u64,
    /// Unmaps made.
    pub unmaps: u64,
}

// SAFETY: the PRP list pages are DMA memory owned by the mapper (kept alive by the Arc)
// and touched only through raw pointers by the thread owning this queue.
unsafe impl<M: DmaMapper + Send + Sync> Send for IoQueue<M> {}

fn dir_of(op: Op) -> Dir {
    match op {
        Op::Read => Dir::FromDevice,
        _ => Dir::ToDevice,
    }
}

impl<M: DmaMapper> IoQueue<M> {
    /// Wraps a created queue pair; allocates one PRP list page per command slot (mapped
    /// only while its command is in flight).
    pub fn new(qp: QueuePair, mapper: Arc<M>, nsid: u32, lba_size: u32) -> Result<Self> {
        let n = qp.entries() - 1;
        let mut lists = Vec::with_capacity(usize::from(n));
        for _ in 0..n {
            lists.push(mapper.alloc(PAGE as usize)?);
        }
        Ok(IoQueue {
            qp,
            mapper,
            nsid,
            lba_size,
            slots: vec![Slot::Free; usize::from(n)],
            lists,
            free: (0..n).rev().collect(),
            maps: 0,
            unmaps: 0,
        })
    }

    /// Queue id.
    pub fn qid(&self) -> u16 {
        self.qp.qid
    }

    /// Commands that can be submitted now.
    pub fn free_slots(&self) -> usize {
        self.free.len()
    }

    /// Commands in flight.
    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    fn take_slot(&mut self) -> Result<u16> {
        self.free.pop().ok_or(Error::QueueFull {
            qid: self.qp.qid,
            entries: self.qp.entries(),
        })
    }

    /// Submits READ or WRITE of `len` bytes (a multiple of the block size) at `lba`
    /// from/to `buf[..len]`: maps the buffer (and a PRP list page if the transfer spans
    /// three pages or more), fills the list, rings the doorbell.
    pub fn submit_rw(
        &mut self,
        op: Op,
        lba: u64,
        buf: &DmaBuf,
        len: usize,
        tag: u64,
    ) -> Result<()> {
        let bs = self.lba_size as usize;
        if op == Op::Flush || len == 0 || !len.is_multiple_of(bs) || len / bs > 0xffff {
            return Err(Error::Invalid(format!(
                "{op:?} of {len} bytes with {bs}-byte blocks"
            )));
        }
        buf.check_range(0, len)?;
        let cid = self.take_slot()?;
        let dir = dir_of(op);
        // Pages touched, from the buffer's physical offset (IOVAs keep the page offset).
        let pages = ((buf.phys() % PAGE) as usize + len).div_ceil(PAGE as usize);
        let list_buf = self.lists[usize::from(cid)];
        let mapped = if pages > 2 {
            self.mapper.map_batch(&[
                (buf, 0, len, dir),
                (&list_buf, 0, PAGE as usize, Dir::ToDevice),
            ])
        } else {
            self.mapper.map(buf, 0, len, dir).map(|i| vec![i])
        };
        let iovas = match mapped {
            Ok(v) => v,
            Err(e) => {
                self.free.push(cid);
                return Err(e.into());
            }
        };
        self.maps += iovas.len() as u64;
        let data = iovas[0];
        let list = iovas.get(1).copied();
        let prp = match (prp_plan(data, len), list) {
            (Some((p1, Prp2::None)), _) => Prp { prp1: p1, prp2: 0 },
            (Some((p1, Prp2::Page(p2))), _) => Prp { prp1: p1, prp2: p2 },
            (Some((p1, Prp2::List(entries))), Some(list_iova)) => {
                // SAFETY: list_buf is one 4 KiB page (allocated in `new`) and entries has
                // at most 512 items (prp_plan); the device reads the page only after the
                // doorbell below; raw volatile writes, no reference formed.
                unsafe {
                    let p = list_buf.as_ptr().cast::<u64>();
                    for (i, e) in entries.iter().enumerate() {
                        p.add(i).write_volatile(*e);
                    }
                }
                Prp {
                    prp1: p1,
                    prp2: list_iova,
                }
            }
            _ => {
                self.release(cid, Some((data, len)), list, dir);
                return Err(Error::Invalid(format!(
                    "no PRP plan for {len} bytes at IOVA {data:#x}"
                )));
            }
        };
        let opcode = if op == Op::Read {
            nvm::READ
        } else {
            nvm::WRITE
        };
        let sqe = Sqe::rw(opcode, cid, self.nsid, lba, (len / bs) as u16, &prp);
        self.slots[usize::from(cid)] = Slot::Busy {
            op,
            data: Some((data, len)),
            list,
            tag,
            start: Instant::now(),
        };
        if let Err(e) = self.qp.submit(&sqe) {
            self.slots[usize::from(cid)] = Slot::Free;
            self.release(cid, Some((data, len)), list, dir);
            return Err(e);
        }
        Ok(())
    }

    /// Submits FLUSH.
    pub fn submit_flush(&mut self, tag: u64) -> Result<()> {
        let cid = self.take_slot()?;
        self.busy_raw(cid, Op::Flush, tag);
        let r = self.qp.submit(&Sqe::flush(cid, self.nsid));
        if r.is_err() {
            self.slots[usize::from(cid)] = Slot::Free;
            self.free.push(cid);
        }
        r
    }

    /// Submits a READ whose data pointer is `prp` as given, mapped by nobody (fault
    /// injection: the IOMMU must block it).
    pub fn submit_raw_read(&mut self, lba: u64, nlb: u16, prp: Prp, tag: u64) -> Result<()> {
        let cid = self.take_slot()?;
        self.busy_raw(cid, Op::Read, tag);
        let r = self
            .qp
            .submit(&Sqe::rw(nvm::READ, cid, self.nsid, lba, nlb, &prp));
        if r.is_err() {
            self.slots[usize::from(cid)] = Slot::Free;
            self.free.push(cid);
        }
        r
    }

    fn busy_raw(&mut self, cid: u16, op: Op, tag: u64) {
        self.slots[usize::from(cid)] = Slot::Busy {
            op,
            data: None,
            list: None,
            tag,
            start: Instant::now(),
        };
    }

    fn release(&mut self, cid: u16, data: Option<(u64, usize)>, list: Option<u64>, dir: Dir) {
        let mut maps = Vec::with_capacity(2);
        if let Some(d) = data {
            maps.push(d);
        }
        if let Some(l) = list {
            maps.push((l, PAGE as usize));
        }
        if !maps.is_empty() {
            // The list page was mapped ToDevice, the data `dir`: unmap with the data's
            // direction for both (libdma ignores it; identity needs only IOVA and length).
            // Best effort on an error path: the command never reached the device.
            if self.mapper.unmap_batch(&maps, dir).is_ok() {
                self.unmaps += maps.len() as u64;
            }
        }
        self.free.push(cid);
    }

    /// Takes one completion, if any: unmaps its buffer and list page and frees its slot.
    pub fn poll(&mut self) -> Result<Option<Done>> {
        let mut out = Vec::with_capacity(1);
        self.poll_batch(1, &mut out)?;
        Ok(out.pop())
    }

    /// Takes up to `max` completions posted so far into `out`, frees their slots and
    /// unmaps all their buffers and list pages in one `unmap_batch` (one round trip for
    /// the lot with a validated strategy). Returns how many were taken.
    pub fn poll_batch(&mut self, max: usize, out: &mut Vec<Done>) -> Result<usize> {
        let mut maps: Vec<(u64, usize)> = Vec::new();
        let mut taken = 0;
        let mut bad = None;
        while taken < max {
            let Some(cqe) = self.qp.poll() else { break };
            let slot = self.slots.get(usize::from(cqe.cid)).copied();
            let Some(Slot::Busy {
                op,
                data,
                list,
                tag,
                start,
            }) = slot
            else {
                bad = Some(format!(
                    "completion for an idle or unknown CID {} on queue {}",
                    cqe.cid, self.qp.qid
                ));
                continue;
            };
            self.slots[usize::from(cqe.cid)] = Slot::Free;
            self.free.push(cqe.cid);
            maps.extend(data);
            maps.extend(list.map(|l| (l, PAGE as usize)));
            out.push(Done {
                tag,
                op,
                cqe,
                ns: start.elapsed().as_nanos() as u64,
            });
            taken += 1;
        }
        if !maps.is_empty() {
            // Directions differ (data FromDevice or ToDevice, list ToDevice); unmapping
            // needs only IOVA and length (libdma and the identity mapper ignore it).
            self.mapper.unmap_batch(&maps, Dir::FromDevice)?;
            self.unmaps += maps.len() as u64;
        }
        match bad {
            Some(msg) => Err(Error::Invalid(msg)),
            None => Ok(taken),
        }
    }

    /// Names a failed completion.
    pub fn status_error(&self, d: &Done) -> Error {
        Error::Status {
            what: format!("{:?} on queue {}", d.op, self.qp.qid),
            sct: d.cqe.sct(),
            sc: d.cqe.sc(),
            name: cmd::status_name(d.cqe.sct(), d.cqe.sc()),
        }
    }
}
