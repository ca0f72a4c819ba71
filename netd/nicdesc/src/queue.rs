//! One TX or RX ring of one queue, with per-packet DMA mapping.
//!
//! Ring protocol (82576 datasheet §7.1.4 / §7.2.1.2, 82599 §7.1.9 / §7.2.1.2): the NIC
//! owns the descriptors from head up to, not including, tail; software keeps one slot
//! back so `head == tail` always means "the NIC owns nothing". Descriptor rings are
//! allocated and mapped once; every packet buffer is mapped just before its descriptor
//! is handed to the NIC and unmapped when the NIC is done with it, in batches, each
//! unmap paired with the map of the same buffer where one follows
//! (docs/ARCHITECTURE.md, "Kept remaps"):
//! * TX buffers are a pool. A send takes the finished descriptors' buffers first: each
//!   new frame goes into a finished frame's buffer, whose unmap is submitted with the
//!   new map as one remap (`remap_batch_nowait`), so a mapper may keep that buffer's
//!   IOVA. Finished buffers no frame needs are unmapped ([`TxQueue::reap`]).
//! * A receive submits the received buffers' unmaps and their maps again as one remap
//!   batch (`remap_batch_submit`), reads the frames, collects the new IOVAs and hands
//!   the buffers back with one tail write.

use std::ptr;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use e1000d::ring;

use crate::desc::{self, RxWb, DESC_LEN};
use crate::regs::Doorbell;
use crate::{Collect, Dir, DmaBuf, DmaMapper, Error, PendingMaps, Result};

/// A mapper shared by the queues (threads) of one NIC.
pub type SharedMapper = Arc<dyn DmaMapper + Send + Sync>;

/// Bytes per packet buffer (SRRCTL.BSIZEPKT = 2 KiB).
pub const BUF_LEN: usize = 2048;
/// Largest frame a TX queue accepts (1500-byte MTU + Ethernet header; the NIC adds
/// the CRC).
pub const MAX_FRAME: usize = 1514;

/// Per-queue counters kept by the driver.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Frames handed to (TX) or taken from (RX, good ones) the NIC.
    pub packets: u64,
    /// Their bytes.
    pub bytes: u64,
    /// RX: descriptors with an error bit, no EOP, or an impossible length (dropped).
    pub errors: u64,
    /// TX: sends refused because the ring was full.
    pub ring_full: u64,
    /// Buffer maps (packet buffers and the ring).
    pub maps: u64,
    /// Buffer unmaps.
    pub unmaps: u64,
    /// Batched map or unmap calls.
    pub batches: u64,
}

/// A descriptor ring in DMA memory, mapped once.
struct Ring {
    mem: DmaBuf,
    iova: u64,
    n: u16,
}

impl Ring {
    fn new(mapper: &SharedMapper, n: u16) -> Result<Ring> {
        if !ring::valid_len(usize::from(n)) {
            return Err(Error::Device(format!(
                "ring of {n} descriptors: not a multiple of 8 in 8..=32768"
            )));
        }
        let mem = mapper.alloc(usize::from(n) * DESC_LEN)?;
        let iova = mapper.map(&mem, 0, mem.len(), Dir::Bidirectional)?;
        Ok(Ring { mem, iova, n })
    }

    fn slot(&self, i: u16) -> *mut u64 {
        let i = usize::from(i % self.n);
        // SAFETY: i < n and mem holds n * 16 bytes, so the pointer stays in the ring.
        unsafe { self.mem.as_ptr().add(i * DESC_LEN).cast::<u64>() }
    }

    /// Volatile read of descriptor `i` (the device writes it back).
    fn read(&self, i: u16) -> [u64; 2] {
        let p = self.slot(i);
        // SAFETY: p is a 16-byte-aligned descriptor inside the ring, which the mapper
        // keeps alive; volatile because the device writes it; no reference is formed.
        unsafe { [p.read_volatile(), p.add(1).read_volatile()] }
    }

    /// Volatile write of descriptor `i`.
    fn write(&self, i: u16, w: [u64; 2]) {
        let p = self.slot(i);
        // SAFETY: as in `read`; software owns the slot (it is not between head and tail).
        unsafe {
            p.write_volatile(w[0]);
            p.add(1).write_volatile(w[1]);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TxSlot {
    Free,
    /// Buffer `buf` (an index into the pool), mapped at `iova` for `len` bytes.
    Mapped {
        iova: u64,
        len: usize,
        buf: u16,
    },
    /// A descriptor at an address nobody mapped (fault injection).
    Raw,
}

/// One TX queue.
pub struct TxQueue {
    index: u16,
    mapper: SharedMapper,
    ring: Ring,
    /// The buffer pool: one per descriptor.
    bufs: Vec<DmaBuf>,
    /// Pool buffers no slot holds, unmapped.
    free: Vec<u16>,
    slots: Vec<TxSlot>,
    tail: u16,
    clean: u16,
    tdt: Doorbell,
    stats: QueueStats,
}

// SAFETY: the queue owns its ring and buffers (DMA memory reached only through raw
// pointers, never references) and its mapper is `Send + Sync`; moving the whole queue to
// the worker thread that alone uses it moves that ownership.
unsafe impl Send for TxQueue {}

impl TxQueue {
    /// Allocates and maps a ring of `n` descriptors and `n` buffers for queue `index`;
    /// `tdt` is its tail register. The driver programs the ring's base and length
    /// ([`ring_iova`](Self::ring_iova), [`ring_bytes`](Self::ring_bytes)).
    pub fn new(index: u16, mapper: SharedMapper, n: u16, tdt: Doorbell) -> Result<TxQueue> {
        let ring = Ring::new(&mapper, n)?;
        let mut bufs = Vec::with_capacity(usize::from(n));
        for _ in 0..n {
            bufs.push(mapper.alloc(BUF_LEN)?);
        }
        for i in 0..n {
            ring.write(i, [0, 0]);
        }
        Ok(TxQueue {
            index,
            mapper,
            ring,
            bufs,
            free: (0..n).rev().collect(),
            slots: vec![TxSlot::Free; usize::from(n)],
            tail: 0,
            clean: 0,
            tdt,
            stats: QueueStats {
                maps: 1,
                ..QueueStats::default()
            },
        })
    }

    /// The queue's number.
    pub fn index(&self) -> u16 {
        self.index
    }
    /// IOVA of the descriptor ring (TDBAL/TDBAH).
    pub fn ring_iova(&self) -> u64 {
        self.ring.iova
    }
    /// Bytes of the ring (TDLEN).
    pub fn ring_bytes(&self) -> u32 {
        u32::from(self.ring.n) * DESC_LEN as u32
    }
    /// The driver's counters.
    pub fn stats(&self) -> QueueStats {
        self.stats
    }
    /// Descriptors handed to the NIC and not reaped yet.
    pub fn in_flight(&self) -> u16 {
        ring::distance(self.clean, self.tail, self.ring.n)
    }
    /// Descriptors software may still post.
    pub fn room(&self) -> u16 {
        ring::free_slots(self.clean, self.tail, self.ring.n)
    }

    /// Copies `frames` into buffers, maps them, writes their descriptors and moves the
    /// tail once. Sends as many as fit; returns how many were sent (0 and `ring_full`
    /// counted when none fit). The descriptors the NIC finished are reaped here: a new
    /// frame goes into a finished frame's buffer, its unmap and the new map submitted
    /// as one remap (a mapper may keep the IOVA); the finished buffers left over are
    /// unmapped; the other frames take unmapped buffers of the pool.
    pub fn send_batch(&mut self, frames: &[&[u8]]) -> Result<usize> {
        for f in frames {
            if f.len() > MAX_FRAME || f.is_empty() {
                return Err(Error::FrameTooLong {
                    len: f.len(),
                    max: MAX_FRAME,
                });
            }
        }
        let (done, finished) = self.finished();
        let room = usize::from(self.room()) + done.len();
        let k = room.min(frames.len());
        if k == 0 {
            self.unmap_finished(&done, &finished)?;
            if !frames.is_empty() {
                self.stats.ring_full += 1;
            }
            return Ok(0);
        }
        let p = finished.len().min(k);
        if k - p > self.free.len() {
            // One buffer per descriptor: a slot with room always has one.
            self.unmap_finished(&done, &finished)?;
            return Err(Error::Device(format!(
                "TX queue {}: {} frames, {} free buffers",
                self.index,
                k - p,
                self.free.len()
            )));
        }
        let unmaps: Vec<(u64, usize)> = finished.iter().map(|&(a, l, _)| (a, l)).collect();
        let mut bufs: Vec<u16> = finished[..p].iter().map(|f| f.2).collect();
        let fresh_from = self.free.len() - (k - p);
        bufs.extend(self.free.drain(fresh_from..));
        let mut reqs = Vec::with_capacity(k);
        for (f, &b) in frames[..k].iter().zip(&bufs) {
            let buf = &self.bufs[usize::from(b)];
            // SAFETY: the buffer holds BUF_LEN >= f.len() bytes and no descriptor the
            // NIC still owns points at it: it is free, or its descriptor is done (the
            // NIC read it, and at most reads it again through its old mapping, which
            // hands it the same device and direction it is about to get anyway).
            // Raw-pointer copy, no reference.
            unsafe { ptr::copy_nonoverlapping(f.as_ptr(), buf.as_ptr(), f.len()) };
            reqs.push((buf, 0, f.len(), Dir::ToDevice));
        }
        // The finished buffers no frame takes are unmapped first: on failure nothing
        // else was submitted, and the slots stay unreaped.
        if unmaps.len() > p {
            if let Err(e) = self.mapper.unmap_batch_nowait(&unmaps[p..], Dir::ToDevice) {
                self.free.extend(bufs.drain(p..));
                return Err(e.into());
            }
        }
        let paired = (p > 0).then(|| {
            self.mapper
                .remap_batch_nowait(&unmaps[..p], &reqs[..p], Dir::ToDevice)
        });
        if matches!(paired, Some(Err(_))) {
            // Whether or not the failed request got to them, the paired buffers are
            // unmapped on their own (a second unmap is refused, harmlessly): a reaped
            // slot's buffer never stays reachable.
            let _ = self.mapper.unmap_batch_nowait(&unmaps[..p], Dir::ToDevice);
        }
        let rest = (k > p && !matches!(paired, Some(Err(_))))
            .then(|| self.mapper.map_batch_submit(&reqs[p..]));
        drop(reqs);
        // Every finished buffer's unmap was submitted (or refused): the slots are free.
        self.reaped(&done, unmaps.len());
        self.free.extend(finished[p..].iter().map(|f| f.2));
        // Each ticket with the frames it maps: the paired ones, then the rest.
        let mut pending: Vec<(PendingMaps, std::ops::Range<usize>)> = Vec::with_capacity(2);
        let mut failed: Option<Error> = None;
        for (r, range) in paired
            .into_iter()
            .zip(Some(0..p))
            .chain(rest.zip(Some(p..k)))
        {
            match r {
                Ok(t) => pending.push((t, range)),
                Err(e) => failed = Some(e.into()),
            }
        }
        let (iovas, mapped, collected) =
            crate::collect_maps(&*self.mapper, pending, k, |j| frames[j].len());
        if let Some(e) = collected {
            failed = Some(e.into());
        }
        self.stats.batches += 1;
        if let Some(e) = failed {
            // Nothing goes out: what was mapped is unmapped, the buffers are free.
            let _ = self.mapper.unmap_batch(&mapped, Dir::ToDevice);
            self.free.extend(bufs);
            return Err(e);
        }
        for ((f, &iova), &buf) in frames[..k].iter().zip(&iovas).zip(&bufs) {
            let t = self.tail;
            self.ring.write(t, desc::tx_data(iova, f.len() as u16));
            self.slots[usize::from(t)] = TxSlot::Mapped {
                iova,
                len: f.len(),
                buf,
            };
            self.tail = ring::next(t, self.ring.n);
            self.stats.packets += 1;
            self.stats.bytes += f.len() as u64;
        }
        self.stats.maps += k as u64;
        // Buffers and descriptors must be visible before the tail moves.
        fence(Ordering::SeqCst);
        self.tdt.ring(self.tail)?;
        Ok(k)
    }

    /// Fault injection: posts one descriptor at `iova`, which nobody mapped.
    pub fn send_unmapped(&mut self, iova: u64, len: u16) -> Result<()> {
        self.reap()?;
        if self.room() == 0 {
            return Err(Error::RingFull {
                slots: usize::from(self.in_flight()),
            });
        }
        let t = self.tail;
        self.ring.write(t, desc::tx_data(iova, len));
        self.slots[usize::from(t)] = TxSlot::Raw;
        self.tail = ring::next(t, self.ring.n);
        fence(Ordering::SeqCst);
        self.tdt.ring(self.tail)
    }

    /// The slots the NIC has written back (DD), from `clean` on, in ring order.
    fn done_slots(&self) -> Vec<u16> {
        let mut done = Vec::new();
        let mut i = self.clean;
        while i != self.tail && desc::tx_done(self.ring.read(i)[1]) {
            done.push(i);
            i = ring::next(i, self.ring.n);
        }
        if !done.is_empty() {
            // The buffers' reuse comes after the NIC's write-back of their status.
            fence(Ordering::Acquire);
        }
        done
    }

    /// [`done_slots`](Self::done_slots), and the buffers they hold: `(iova, len,
    /// pool index)` of each mapped one, to unmap (a fault injection's slot has none).
    fn finished(&self) -> (Vec<u16>, Vec<(u64, usize, u16)>) {
        let done = self.done_slots();
        let finished = done
            .iter()
            .filter_map(|&i| match self.slots[usize::from(i)] {
                TxSlot::Mapped { iova, len, buf } => Some((iova, len, buf)),
                _ => None,
            })
            .collect();
        (done, finished)
    }

    /// Frees the slots of a [`done_slots`](Self::done_slots) whose `unmapped`
    /// buffers' unmaps were submitted.
    fn reaped(&mut self, done: &[u16], unmapped: usize) {
        for &i in done {
            self.slots[usize::from(i)] = TxSlot::Free;
        }
        if let Some(&last) = done.last() {
            self.clean = ring::next(last, self.ring.n);
        }
        if unmapped > 0 {
            self.stats.unmaps += unmapped as u64;
            self.stats.batches += 1;
        }
    }

    /// Unmaps the buffers of `done` slots (`finished`), in one batch, frees the slots
    /// and returns the buffers to the pool. On failure the slots stay unreaped.
    fn unmap_finished(&mut self, done: &[u16], finished: &[(u64, usize, u16)]) -> Result<()> {
        if !finished.is_empty() {
            let maps: Vec<(u64, usize)> = finished.iter().map(|&(a, l, _)| (a, l)).collect();
            self.mapper.unmap_batch(&maps, Dir::ToDevice)?;
        }
        self.reaped(done, finished.len());
        self.free.extend(finished.iter().map(|f| f.2));
        Ok(())
    }

    /// Reaps the descriptors the NIC has written back (DD) and unmaps their buffers in
    /// one batch. Returns how many were reaped. [`send_batch`](Self::send_batch) reaps
    /// too, pairing finished buffers with new frames; call this when no send follows.
    pub fn reap(&mut self) -> Result<usize> {
        let (done, finished) = self.finished();
        self.unmap_finished(&done, &finished)?;
        Ok(done.len())
    }

    /// Reaps until nothing is in flight, for at most `ms` milliseconds.
    pub fn flush(&mut self, ms: u64) -> Result<()> {
        let start = std::time::Instant::now();
        while self.in_flight() > 0 {
            self.reap()?;
            if start.elapsed().as_millis() as u64 > ms {
                return Err(Error::Timeout {
                    what: "TX descriptor write-back (STA.DD, word 1 bit 32)",
                    ms,
                });
            }
            std::hint::spin_loop();
        }
        Ok(())
    }

    /// Unmaps everything still mapped, the ring last. Call only after the NIC's DMA is
    /// stopped (queue disabled or the function reset).
    pub fn release(&mut self) -> Result<()> {
        for s in self.slots.iter_mut() {
            if let TxSlot::Mapped { iova, len, buf } = *s {
                self.mapper.unmap(iova, len, Dir::ToDevice)?;
                self.stats.unmaps += 1;
                self.free.push(buf);
            }
            *s = TxSlot::Free;
        }
        self.clean = self.tail;
        if self.ring.iova != 0 {
            self.mapper
                .unmap(self.ring.iova, self.ring.mem.len(), Dir::Bidirectional)?;
            self.ring.iova = 0;
            self.stats.unmaps += 1;
        }
        Ok(())
    }
}

/// What the NIC said about a received frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RxMeta {
    /// The queue it arrived on.
    pub queue: u16,
    /// RSS hash from the write-back.
    pub rss_hash: u32,
    /// RSS type from the write-back.
    pub rss_type: u8,
}

/// One RX queue.
pub struct RxQueue {
    index: u16,
    mapper: SharedMapper,
    ring: Ring,
    bufs: Vec<DmaBuf>,
    iova: Vec<Option<u64>>,
    raw: Vec<bool>,
    raw_done: u64,
    next: u16,
    rdt: Doorbell,
    stats: QueueStats,
    scratch: Vec<u8>,
}

// SAFETY: as for `TxQueue`: sole owner of its ring and buffers, `Send + Sync` mapper.
unsafe impl Send for RxQueue {}

impl RxQueue {
    /// Allocates and maps a ring of `n` descriptors, allocates `n` buffers, maps them all
    /// (one batch) and writes their descriptors. The driver programs the ring, enables
    /// the queue, then calls [`arm`](Self::arm).
    pub fn new(index: u16, mapper: SharedMapper, n: u16, rdt: Doorbell) -> Result<RxQueue> {
        let ring = Ring::new(&mapper, n)?;
        let mut bufs = Vec::with_capacity(usize::from(n));
        for _ in 0..n {
            bufs.push(mapper.alloc(BUF_LEN)?);
        }
        let reqs: Vec<_> = bufs
            .iter()
            .map(|b| (b, 0, BUF_LEN, Dir::FromDevice))
            .collect();
        let iovas = mapper.map_batch(&reqs)?;
        for (i, &iova) in iovas.iter().enumerate() {
            ring.write(i as u16, desc::rx_read(iova));
        }
        Ok(RxQueue {
            index,
            mapper,
            ring,
            bufs,
            iova: iovas.into_iter().map(Some).collect(),
            raw: vec![false; usize::from(n)],
            raw_done: 0,
            next: 0,
            rdt,
            stats: QueueStats {
                maps: 1 + u64::from(n),
                batches: 1,
                ..QueueStats::default()
            },
            scratch: Vec::with_capacity(BUF_LEN),
        })
    }

    /// The queue's number.
    pub fn index(&self) -> u16 {
        self.index
    }
    /// IOVA of the descriptor ring (RDBAL/RDBAH).
    pub fn ring_iova(&self) -> u64 {
        self.ring.iova
    }
    /// Bytes of the ring (RDLEN).
    pub fn ring_bytes(&self) -> u32 {
        u32::from(self.ring.n) * DESC_LEN as u32
    }
    /// The driver's counters.
    pub fn stats(&self) -> QueueStats {
        self.stats
    }

    /// Hands every buffer but one to the NIC (tail = n - 1). Call once the queue is
    /// enabled.
    pub fn arm(&mut self) -> Result<()> {
        fence(Ordering::SeqCst);
        self.next = 0;
        self.rdt.ring(self.ring.n - 1)
    }

    /// Takes up to `max` frames the NIC has written back: submits their buffers'
    /// unmaps and maps again (one remap batch), passes each good frame to `f`,
    /// collects the new IOVAs and moves the tail once. Returns the number of good
    /// frames. Slots a failed refill left without a buffer are mapped again here.
    pub fn recv_batch(&mut self, max: usize, mut f: impl FnMut(&[u8], RxMeta)) -> Result<usize> {
        let mut slots: Vec<u16> = Vec::new();
        let mut i = self.next;
        while slots.len() < max && slots.len() + 1 < usize::from(self.ring.n) {
            let idx = usize::from(i);
            let unfilled = self.iova[idx].is_none() && !self.raw[idx];
            if !unfilled && !RxWb::decode(self.ring.read(i)).done() {
                break;
            }
            slots.push(i);
            i = ring::next(i, self.ring.n);
        }
        let Some(&last) = slots.last() else {
            return Ok(0);
        };
        fence(Ordering::Acquire);
        // The NIC is done with these buffers: their unmaps and their maps again (the
        // same buffers, for the slots' next frames) are submitted before the frames
        // are read, so a mapper serving them elsewhere (iommud's rings) works while
        // this thread copies. Each frame is copied out to `scratch` and checked there,
        // never in the buffer: what the device might still write through an old IOVA
        // (an unmap not yet invalidated, or a kept one) cannot change what was
        // checked, and the buffers go back to this same device, for the same direction.
        let (unmaps, had) = crate::take_refill(&mut self.iova, &slots, BUF_LEN);
        let reqs: Vec<_> = slots
            .iter()
            .map(|&s| (&self.bufs[usize::from(s)], 0, BUF_LEN, Dir::FromDevice))
            .collect();
        let (pending_unmaps, pending_maps) = if unmaps.len() == slots.len() {
            let (u, m) =
                self.mapper
                    .remap_batch_submit(&unmaps, &reqs, Dir::FromDevice, Collect::Now)?;
            (Some(u), m)
        } else {
            let u = if unmaps.is_empty() {
                None
            } else {
                Some(self.mapper.unmap_batch_submit(&unmaps, Dir::FromDevice)?)
            };
            (u, self.mapper.map_batch_submit(&reqs))
        };
        drop(reqs);
        if !unmaps.is_empty() {
            self.stats.unmaps += unmaps.len() as u64;
            self.stats.batches += 1;
        }
        let mut good = 0;
        for (&s, &had) in slots.iter().zip(&had) {
            let idx = usize::from(s);
            let wb = RxWb::decode(self.ring.read(s));
            if std::mem::take(&mut self.raw[idx]) {
                self.raw_done += 1;
            } else if !had {
                // A slot a failed refill left without a buffer: nothing to read.
            } else if wb.errors != 0 || !wb.eop() || usize::from(wb.len) > BUF_LEN || wb.len == 0 {
                self.stats.errors += 1;
            } else {
                let len = usize::from(wb.len);
                self.scratch.clear();
                self.scratch.resize(len, 0);
                // SAFETY: the NIC wrote DD back for this slot (acquire fence above);
                // len <= BUF_LEN is inside the buffer; raw-pointer copy, no reference,
                // and everything after it reads the copy, whatever the device does to
                // the buffer meanwhile.
                unsafe {
                    ptr::copy_nonoverlapping(
                        self.bufs[idx].as_ptr(),
                        self.scratch.as_mut_ptr(),
                        len,
                    )
                };
                self.stats.packets += 1;
                self.stats.bytes += len as u64;
                good += 1;
                f(
                    &self.scratch,
                    RxMeta {
                        queue: self.index,
                        rss_hash: wb.rss_hash,
                        rss_type: wb.rss_type,
                    },
                );
            }
            // Clear the write-back so a slot is never taken twice; a slot whose refill
            // fails below is taken again by the next call (no buffer).
            self.ring.write(s, [0, 0]);
        }
        let unmapped = pending_unmaps.map_or(Ok(()), |u| self.mapper.unmap_batch_complete(u));
        let iovas = pending_maps.and_then(|m| self.mapper.map_batch_complete(m));
        self.stats.batches += 1;
        let iovas = match iovas {
            Ok(v) if v.len() == slots.len() => v,
            Ok(v) => {
                let maps: Vec<(u64, usize)> = v.iter().map(|&iova| (iova, BUF_LEN)).collect();
                let _ = self.mapper.unmap_batch(&maps, Dir::FromDevice);
                unmapped?;
                return Err(Error::Device(format!(
                    "{} IOVAs for {} RX buffers",
                    v.len(),
                    slots.len()
                )));
            }
            Err(e) => {
                unmapped?;
                return Err(e.into());
            }
        };
        self.stats.maps += iovas.len() as u64;
        for (&s, &iova) in slots.iter().zip(&iovas) {
            self.iova[usize::from(s)] = Some(iova);
            self.ring.write(s, desc::rx_read(iova));
        }
        // The refilled slots go back: `last` becomes the one held back.
        fence(Ordering::SeqCst);
        self.rdt.ring(last)?;
        self.next = ring::next(last, self.ring.n);
        unmapped?;
        Ok(good)
    }

    /// Fault injection: points the next descriptor the NIC fills at `addr`, which this
    /// driver did not map (its own buffer is unmapped first). Call with the queue idle.
    pub fn post_unmapped(&mut self, addr: u64) -> Result<()> {
        if RxWb::decode(self.ring.read(self.next)).done() {
            return Err(Error::Device(format!(
                "RX queue {}: slot {} holds a received frame; receive it before posting an unmapped buffer",
                self.index, self.next
            )));
        }
        let idx = usize::from(self.next);
        if let Some(iova) = self.iova[idx].take() {
            self.mapper.unmap(iova, BUF_LEN, Dir::FromDevice)?;
            self.stats.unmaps += 1;
        }
        self.raw[idx] = true;
        self.ring.write(self.next, desc::rx_read(addr));
        fence(Ordering::SeqCst);
        Ok(())
    }

    /// Descriptor `slot` as it is in memory now (diagnostics).
    pub fn peek(&self, slot: u16) -> [u64; 2] {
        self.ring.read(slot)
    }

    /// The slot the NIC fills next (software's view).
    pub fn next_slot(&self) -> u16 {
        self.next
    }

    /// Descriptors posted by [`post_unmapped`](Self::post_unmapped) the NIC completed.
    pub fn unmapped_done(&self) -> u64 {
        self.raw_done
    }

    /// Unmaps every buffer and the ring. Call only after the NIC's DMA is stopped.
    pub fn release(&mut self) -> Result<()> {
        for v in self.iova.iter_mut() {
            if let Some(iova) = v.take() {
                self.mapper.unmap(iova, BUF_LEN, Dir::FromDevice)?;
                self.stats.unmaps += 1;
            }
        }
        if self.ring.iova != 0 {
            self.mapper
                .unmap(self.ring.iova, self.ring.mem.len(), Dir::Bidirectional)?;
            self.ring.iova = 0;
            self.stats.unmaps += 1;
        }
        Ok(())
    }
}
