//! The 82540EM driver: reset, ring setup, polled send and receive.

use std::collections::VecDeque;
use std::ptr;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use linuxhw::mmio::MmioRegion;

use crate::cost::{self, Cost};
use crate::desc::{rx_err, rx_sta, tx_sta, RxDesc, TxDesc, DESC_LEN};
use crate::dma::{Collect, Dir, DmaBuf, DmaMapper};
use crate::regs::{self, ctrl, eerd, rah, rctl, stat, status, tctl, tipg};
use crate::ring;
use crate::{Error, Result};
use linuxhw::pci::PciFunction;

/// PCI vendor id of Intel.
pub const VENDOR: u16 = 0x8086;
/// PCI device id of the 82540EM (QEMU `-device e1000`).
pub const DEVICE: u16 = 0x100E;
/// Descriptors per ring (TX and RX). 256 × 16 B = 4 KiB: one page, a multiple of 128 B.
pub const RING_LEN: u16 = 256;
/// Bytes per packet buffer (RCTL.BSIZE = 2048).
pub const BUF_LEN: usize = 2048;
/// Largest frame accepted by [`E1000::send`]: 1500-byte payload + 14-byte header (the
/// NIC appends the CRC; no VLAN tag, RCTL.LPE off).
pub const MAX_FRAME: usize = 1514;

/// Unmap batches of the receive path that may stay outstanding after their slots
/// went back to the NIC ([`E1000::finish_rx_refill`]); one more waits for the oldest.
pub const RX_UNMAPS_BEHIND: usize = 4;
/// RX refills (a receive call's emptied slots, their buffers mapped again) that may
/// wait for their new IOVAs while the NIC keeps the rest of the ring: a receive call
/// hands back those whose maps are done, and waits for the oldest only when this
/// many are outstanding. Two refills of up to 64 slots leave the NIC at least half
/// of its 256 descriptors.
pub const RX_REFILLS_BEHIND: usize = 2;
const RESET_TIMEOUT: Duration = Duration::from_millis(100);
const LINK_TIMEOUT: Duration = Duration::from_secs(2);
const EERD_TIMEOUT: Duration = Duration::from_millis(10);

/// Counters kept by the driver (software) and read from the NIC (hardware, `hw_*`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Frames handed to the NIC.
    pub tx_packets: u64,
    /// Bytes handed to the NIC.
    pub tx_bytes: u64,
    /// TX descriptors written back with excess or late collision.
    pub tx_errors: u64,
    /// `send` calls refused because every TX descriptor was in flight.
    pub tx_ring_full: u64,
    /// Good frames received.
    pub rx_packets: u64,
    /// Bytes of good frames received.
    pub rx_bytes: u64,
    /// RX descriptors with any error bit (frames dropped).
    pub rx_errors: u64,
    /// Of those, CRC/alignment errors (RDESC.ERRORS.CE).
    pub rx_crc_errors: u64,
    /// RX descriptors without EOP or with an impossible length (dropped).
    pub rx_malformed: u64,
    /// Buffer maps performed (rings + packets).
    pub maps: u64,
    /// Buffer unmaps performed.
    pub unmaps: u64,
    /// NIC: good packets received (GPRC).
    pub hw_gprc: u64,
    /// NIC: good packets transmitted (GPTC).
    pub hw_gptc: u64,
    /// NIC: CRC errors (CRCERRS).
    pub hw_crcerrs: u64,
    /// NIC: missed packets (MPC).
    pub hw_mpc: u64,
    /// NIC: receive-no-buffers events (RNBC).
    pub hw_rnbc: u64,
}

/// A descriptor ring in DMA memory, mapped once for the device's lifetime.
struct Ring {
    mem: DmaBuf,
    iova: u64,
    n: u16,
}

impl Ring {
    fn slot(&self, i: u16) -> *mut u64 {
        debug_assert!(i < self.n);
        // SAFETY: i < n and mem holds n * 16 bytes, so the offset stays in the buffer.
        unsafe {
            self.mem
                .as_ptr()
                .add(usize::from(i) * DESC_LEN)
                .cast::<u64>()
        }
    }

    /// Volatile read of descriptor `i` (the device writes status back into it).
    fn read(&self, i: u16) -> [u64; 2] {
        let p = self.slot(i);
        // SAFETY: p points at a 16-byte, 16-aligned descriptor inside the ring, which lives
        // as long as the mapper; volatile because the device writes it.
        unsafe { [p.read_volatile(), p.add(1).read_volatile()] }
    }

    /// Volatile write of descriptor `i`: address word first, then length/status word.
    fn write(&self, i: u16, w: [u64; 2]) {
        let p = self.slot(i);
        // SAFETY: as in `read`; the slot is owned by software (not between head and tail).
        unsafe {
            p.write_volatile(w[0]);
            p.add(1).write_volatile(w[1]);
        }
    }
}

/// What a TX slot holds while the device owns it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TxSlot {
    Free,
    /// Packet buffer `buf` (an index into `tx_bufs`) mapped at `iova` for
    /// `len` bytes.
    Mapped {
        iova: u64,
        len: usize,
        buf: u16,
    },
    /// A descriptor pointing at an address nobody mapped (fault injection).
    Raw,
}

/// An 82540EM owned from userspace. Polled: no interrupts.
pub struct E1000<M: DmaMapper> {
    bdf: String,
    source_id: u16,
    regs: MmioRegion,
    mapper: M,
    mac: [u8; 6],
    tx: Ring,
    tx_bufs: Vec<DmaBuf>,
    /// The TX buffers no slot holds (indices into `tx_bufs`), unmapped; the
    /// last one freed is used first.
    tx_free: Vec<u16>,
    tx_slots: Vec<TxSlot>,
    tx_tail: u16,
    tx_clean: u16,
    /// Frames of prepared batches not yet posted: ring slots they will take.
    tx_reserved: usize,
    rx: Ring,
    rx_bufs: Vec<DmaBuf>,
    rx_iova: Vec<Option<u64>>,
    /// Slots whose descriptor points at an address nobody mapped (fault injection).
    rx_raw: Vec<bool>,
    rx_raw_done: u64,
    /// The next RX slot to look at (the NIC's head, as far as software knows).
    rx_next: u16,
    /// Receive calls' slots, their buffers unmapped and mapped again, not yet
    /// handed back to the NIC, oldest first: at most [`RX_REFILLS_BEHIND`]. They
    /// lie in ring order from the oldest's first slot to `rx_next`.
    rx_refills: VecDeque<RxRefill>,
    /// Unmap batches of slots already handed back, whose completion (`strict`:
    /// the invalidation of the old IOVAs) is still outstanding, oldest first,
    /// with their buffer counts: at most [`RX_UNMAPS_BEHIND`].
    rx_unmaps: VecDeque<(crate::PendingUnmaps, usize)>,
    stats: Stats,
    scratch: Vec<u8>,
    /// Time spent in the per-packet paths (see [`cost`]).
    cost: Cost,
}

impl<M: DmaMapper> E1000<M> {
    /// Claims the function at `bdf`, resets it, sets up both rings and waits for link.
    ///
    /// On QEMU the NIC model queues incoming frames for about 1 s after RCTL is written,
    /// so frames sent right after `open` arrive late (not lost).
    pub fn open(bdf: &str, mapper: M) -> Result<Self> {
        let func = PciFunction::open(bdf)?;
        let (vendor, device) = (func.vendor_id()?, func.device_id()?);
        if (vendor, device) != (VENDOR, DEVICE) {
            return Err(Error::WrongDevice {
                bdf: func.bdf().to_string(),
                vendor,
                device,
            });
        }
        func.enable(true, true)?;
        let regs = func.bar0()?;
        Self::with_bar(func.bdf().to_string(), func.bdf_u16(), regs, mapper)
    }

    /// Drives a function already claimed (vendor/device checked, memory space and bus
    /// mastering on) whose BAR 0 is mapped at `regs`: resets it, sets up both rings and
    /// waits for link. `bdf` names it in messages; `source_id` is its VT-d source id.
    /// The Linux [`open`](Self::open) and the Redox entry both end here.
    pub fn with_bar(bdf: String, source_id: u16, regs: MmioRegion, mapper: M) -> Result<Self> {
        reset(&regs)?;

        let tx_mem = mapper.alloc(usize::from(RING_LEN) * DESC_LEN)?;
        let rx_mem = mapper.alloc(usize::from(RING_LEN) * DESC_LEN)?;
        let mut tx_bufs = Vec::with_capacity(usize::from(RING_LEN));
        let mut rx_bufs = Vec::with_capacity(usize::from(RING_LEN));
        for _ in 0..RING_LEN {
            tx_bufs.push(mapper.alloc(BUF_LEN)?);
            rx_bufs.push(mapper.alloc(BUF_LEN)?);
        }
        let tx_iova = mapper.map(&tx_mem, 0, tx_mem.len(), Dir::Bidirectional)?;
        let rx_iova = mapper.map(&rx_mem, 0, rx_mem.len(), Dir::Bidirectional)?;
        let mut nic = E1000 {
            bdf,
            source_id,
            regs,
            mapper,
            mac: [0; 6],
            tx: Ring {
                mem: tx_mem,
                iova: tx_iova,
                n: RING_LEN,
            },
            tx_bufs,
            tx_free: (0..RING_LEN).rev().collect(),
            tx_slots: vec![TxSlot::Free; usize::from(RING_LEN)],
            tx_tail: 0,
            tx_clean: 0,
            tx_reserved: 0,
            rx: Ring {
                mem: rx_mem,
                iova: rx_iova,
                n: RING_LEN,
            },
            rx_bufs,
            rx_iova: vec![None; usize::from(RING_LEN)],
            rx_raw: vec![false; usize::from(RING_LEN)],
            rx_raw_done: 0,
            rx_next: 0,
            rx_refills: VecDeque::new(),
            rx_unmaps: VecDeque::new(),
            stats: Stats {
                maps: 2,
                ..Stats::default()
            },
            scratch: Vec::with_capacity(BUF_LEN),
            cost: Cost::default(),
        };
        nic.mac = nic.read_mac()?;
        nic.setup_rx()?;
        nic.setup_tx()?;
        nic.wait_link(LINK_TIMEOUT)?;
        Ok(nic)
    }

    /// The function's PCI address.
    pub fn bdf(&self) -> &str {
        &self.bdf
    }

    /// The function's VT-d source id (`bus << 8 | dev << 3 | func`).
    pub fn source_id(&self) -> u16 {
        self.source_id
    }

    /// The station address (RAL0/RAH0, or the EEPROM when RAH0.AV is clear).
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The mapper this NIC uses.
    pub fn mapper(&self) -> &M {
        &self.mapper
    }

    /// STATUS.LU.
    pub fn link_up(&self) -> Result<bool> {
        Ok(self.regs.read32(regs::STATUS)? & status::LU != 0)
    }

    fn wait_link(&self, bound: Duration) -> Result<()> {
        let start = Instant::now();
        while !self.link_up()? {
            if start.elapsed() > bound {
                return Err(Error::NoLink {
                    ms: bound.as_millis() as u64,
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    fn read_mac(&self) -> Result<[u8; 6]> {
        let lo = self.regs.read32(regs::RAL0)?;
        let hi = self.regs.read32(regs::RAH0)?;
        if hi & rah::AV != 0 {
            let l = lo.to_le_bytes();
            let h = hi.to_le_bytes();
            return Ok([l[0], l[1], l[2], l[3], h[0], h[1]]);
        }
        // 8254x SDM 5.6.1: EEPROM words 0..2 hold the Ethernet address.
        let mut mac = [0u8; 6];
        for w in 0..3u32 {
            let v = self.eeprom_read(w)?.to_le_bytes();
            mac[2 * w as usize] = v[0];
            mac[2 * w as usize + 1] = v[1];
        }
        Ok(mac)
    }

    fn eeprom_read(&self, word: u32) -> Result<u16> {
        self.regs
            .write32(regs::EERD, eerd::START | (word << eerd::ADDR_SHIFT))?;
        let start = Instant::now();
        loop {
            let v = self.regs.read32(regs::EERD)?;
            if v & eerd::DONE != 0 {
                return Ok((v >> eerd::DATA_SHIFT) as u16);
            }
            if start.elapsed() > EERD_TIMEOUT {
                return Err(Error::Timeout {
                    what: "EERD.DONE (0x0014 bit 4)",
                    ms: EERD_TIMEOUT.as_millis() as u64,
                });
            }
        }
    }

    /// 8254x SDM 14.4: receive initialization.
    fn setup_rx(&mut self) -> Result<()> {
        for i in 0..128 {
            self.regs.write32(regs::MTA + 4 * i, 0)?;
        }
        for i in 0..self.rx.n {
            self.refill(i)?;
        }
        self.regs.write32(regs::RDBAL, self.rx.iova as u32)?;
        self.regs
            .write32(regs::RDBAH, (self.rx.iova >> 32) as u32)?;
        self.regs
            .write32(regs::RDLEN, u32::from(self.rx.n) * DESC_LEN as u32)?;
        self.regs.write32(regs::RDH, 0)?;
        // All n buffers are posted; the device owns [RDH, RDT): keep the last slot back.
        self.regs.write32(regs::RDT, u32::from(self.rx.n - 1))?;
        self.rx_next = 0;
        self.regs.write32(
            regs::RCTL,
            rctl::EN | rctl::UPE | rctl::MPE | rctl::BAM | rctl::BSIZE_2048 | rctl::SECRC,
        )?;
        Ok(())
    }

    /// 8254x SDM 14.5: transmit initialization.
    fn setup_tx(&mut self) -> Result<()> {
        for i in 0..self.tx.n {
            self.tx.write(i, [0, 0]);
        }
        self.regs.write32(regs::TDBAL, self.tx.iova as u32)?;
        self.regs
            .write32(regs::TDBAH, (self.tx.iova >> 32) as u32)?;
        self.regs
            .write32(regs::TDLEN, u32::from(self.tx.n) * DESC_LEN as u32)?;
        self.regs.write32(regs::TDH, 0)?;
        self.regs.write32(regs::TDT, 0)?;
        self.regs.write32(regs::TIDV, 0)?;
        self.regs.write32(
            regs::TCTL,
            tctl::EN
                | tctl::PSP
                | (tctl::CT_DEFAULT << tctl::CT_SHIFT)
                | (tctl::COLD_FULL_DUPLEX << tctl::COLD_SHIFT),
        )?;
        self.regs.write32(regs::TIPG, tipg::COPPER_DEFAULT)?;
        Ok(())
    }

    /// Maps RX buffer `i` and writes its descriptor (status cleared).
    fn refill(&mut self, i: u16) -> Result<()> {
        let idx = usize::from(i);
        let iova = self
            .mapper
            .map(&self.rx_bufs[idx], 0, BUF_LEN, Dir::FromDevice)?;
        self.stats.maps += 1;
        self.rx_iova[idx] = Some(iova);
        self.rx.write(i, RxDesc::empty(iova).to_words());
        Ok(())
    }

    /// Posts a TX descriptor for `addr`/`len`, recording what the slot holds.
    fn post_tx(&mut self, addr: u64, len: u16, slot: TxSlot) -> Result<()> {
        let i = self.tx_tail;
        self.tx.write(i, TxDesc::frame(addr, len).to_words());
        self.tx_slots[usize::from(i)] = slot;
        // Descriptor and buffer contents must be visible before the tail moves.
        fence(Ordering::SeqCst);
        self.tx_tail = ring::next(i, self.tx.n);
        self.regs.write32(regs::TDT, u32::from(self.tx_tail))?;
        Ok(())
    }

    fn check_tx_room(&mut self) -> Result<()> {
        self.reap_tx_untimed()?;
        if ring::is_full(self.tx_clean, self.tx_tail, self.tx.n) {
            self.stats.tx_ring_full += 1;
            return Err(Error::RingFull {
                slots: usize::from(self.tx.n - 1),
            });
        }
        Ok(())
    }

    /// Copies `frame` (header included, CRC excluded) into a TX buffer, maps it and
    /// hands it to the NIC. Reaps finished descriptors first (unmapping their buffers).
    /// Frames shorter than 60 bytes are padded by the NIC (TCTL.PSP).
    pub fn send(&mut self, frame: &[u8]) -> Result<()> {
        if frame.len() > MAX_FRAME {
            return Err(Error::FrameTooLong {
                len: frame.len(),
                max: MAX_FRAME,
            });
        }
        if frame.is_empty() {
            return Err(Error::Device("refusing to send an empty frame".into()));
        }
        let t0 = cost::now();
        self.check_tx_room()?;
        let b = self.take_tx_buf()?;
        let buf = self.tx_bufs[usize::from(b)];
        // SAFETY: buf is valid for BUF_LEN >= frame.len() bytes; it is free (no slot
        // holds it, and it is unmapped), so the device does not read it now.
        unsafe { ptr::copy_nonoverlapping(frame.as_ptr(), buf.as_ptr(), frame.len()) };
        let tm = cost::now();
        let iova = match self.mapper.map(&buf, 0, frame.len(), Dir::ToDevice) {
            Ok(v) => v,
            Err(e) => {
                self.tx_free.push(b);
                return Err(e);
            }
        };
        self.cost.map_ticks += cost::now().wrapping_sub(tm);
        self.cost.map_calls += 1;
        self.cost.map_entries += 1;
        self.stats.maps += 1;
        self.post_tx(
            iova,
            frame.len() as u16,
            TxSlot::Mapped {
                iova,
                len: frame.len(),
                buf: b,
            },
        )?;
        self.stats.tx_packets += 1;
        self.stats.tx_bytes += frame.len() as u64;
        self.cost.driver_ticks += cost::now().wrapping_sub(t0);
        Ok(())
    }

    /// Fault injection: posts one TX descriptor pointing at `iova`, which nobody mapped.
    /// With an IOMMU the device's read is blocked (and recorded by iommud); the emulated
    /// e1000 still writes DD back, so the slot is reaped like any other, with no unmap.
    pub fn send_unmapped(&mut self, iova: u64, len: u16) -> Result<()> {
        self.check_tx_room()?;
        self.post_tx(iova, len, TxSlot::Raw)
    }

    /// Fault storm: keeps the TX ring full of descriptors at `iova`, `iova + 4 KiB`, ...
    /// (256 pages, cycling), none of them mapped, until `count` descriptors were consumed
    /// by the NIC or `bound` has passed. Progress is read from TDH rather than from DD:
    /// once iommud blocks the device it cannot write its descriptors back either.
    /// Returns (posted, consumed); waits (at most 1 s) for the last ones to be consumed.
    pub fn storm_tx(&mut self, iova: u64, count: u64, bound: Duration) -> Result<(u64, u64)> {
        self.flush_tx(Duration::from_secs(1))?;
        let n = self.tx.n;
        let start = Instant::now();
        let (mut posted, mut consumed) = (0u64, 0u64);
        let mut drain_until: Option<Instant> = None;
        loop {
            let head = (self.regs.read32(regs::TDH)? % u32::from(n)) as u16;
            while self.tx_clean != head && !ring::is_empty(self.tx_clean, self.tx_tail) {
                self.tx_slots[usize::from(self.tx_clean)] = TxSlot::Free;
                self.tx_clean = ring::next(self.tx_clean, n);
                consumed += 1;
            }
            let stop = consumed >= count || start.elapsed() > bound;
            if stop {
                let until = *drain_until.get_or_insert(Instant::now() + Duration::from_secs(1));
                if ring::is_empty(self.tx_clean, self.tx_tail) || Instant::now() > until {
                    return Ok((posted, consumed));
                }
                std::thread::yield_now();
                continue;
            }
            let mut new = 0;
            while posted < count && !ring::is_full(self.tx_clean, self.tx_tail, n) {
                let i = self.tx_tail;
                self.tx.write(
                    i,
                    TxDesc::frame(iova + (posted % 256) * 4096, 64).to_words(),
                );
                self.tx_slots[usize::from(i)] = TxSlot::Raw;
                self.tx_tail = ring::next(i, n);
                posted += 1;
                new += 1;
            }
            if new > 0 {
                fence(Ordering::SeqCst);
                self.regs.write32(regs::TDT, u32::from(self.tx_tail))?;
            } else {
                std::thread::yield_now();
            }
        }
    }

    /// Reaps TX descriptors the NIC has finished (DD set): unmaps their buffers,
    /// all of them in one batch (one ring submission, or one round trip, where the
    /// mapper can do that; with `strict`, one invalidation). Returns how many were
    /// reaped.
    pub fn reap_tx(&mut self) -> Result<usize> {
        let t0 = cost::now();
        let r = self.reap_tx_untimed();
        self.cost.driver_ticks += cost::now().wrapping_sub(t0);
        r
    }

    /// [`reap_tx`](Self::reap_tx) without the driver-time stamp (for callers that
    /// take their own).
    fn reap_tx_untimed(&mut self) -> Result<usize> {
        let (done, unmaps, bufs) = self.tx_done();
        if done.is_empty() {
            return Ok(0);
        }
        if !unmaps.is_empty() {
            let tu = cost::now();
            // TX buffers: their next use is this device reading them again.
            self.mapper.unmap_batch_nowait(&unmaps, Dir::ToDevice)?;
            self.cost.unmap_ticks += cost::now().wrapping_sub(tu);
        }
        self.tx_reaped(&done, unmaps.len());
        self.tx_free.extend(bufs);
        Ok(done.len())
    }

    /// A free TX buffer (the one freed last).
    fn take_tx_buf(&mut self) -> Result<u16> {
        // More buffers than slots: a slot with room always finds one.
        self.tx_free
            .pop()
            .ok_or_else(|| Error::Device("no free TX buffer".into()))
    }

    /// The TX descriptors the NIC has finished (DD set), from `tx_clean` on, and
    /// their buffers' mappings and indices: to unmap, then
    /// [`tx_reaped`](Self::tx_reaped); the buffers are free once unmapped.
    #[allow(clippy::type_complexity)]
    fn tx_done(&self) -> (Vec<u16>, Vec<(u64, usize)>, Vec<u16>) {
        // Only a batch's last descriptor asks for DD (RS); the NIC works in ring
        // order, so everything up to the last DD written back is done.
        let mut seen = Vec::new();
        let mut upto = 0;
        let mut i = self.tx_clean;
        while !ring::is_empty(i, self.tx_tail) {
            seen.push(i);
            let d = TxDesc::from_words(self.tx.read(i));
            if d.sta & tx_sta::DD != 0 {
                upto = seen.len();
            }
            i = ring::next(i, self.tx.n);
        }
        seen.truncate(upto);
        let done = seen;
        fence(Ordering::Acquire);
        let (unmaps, bufs) = done
            .iter()
            .filter_map(|&i| match self.tx_slots[usize::from(i)] {
                TxSlot::Mapped { iova, len, buf } => Some(((iova, len), buf)),
                _ => None,
            })
            .unzip();
        (done, unmaps, bufs)
    }

    /// Frees the slots of a [`tx_done`](Self::tx_done) whose `unmapped` buffers
    /// were unmapped (submitted), and counts them.
    fn tx_reaped(&mut self, done: &[u16], unmapped: usize) {
        if unmapped > 0 {
            self.cost.unmap_calls += 1;
            self.cost.unmap_entries += unmapped as u64;
            self.stats.unmaps += unmapped as u64;
        }
        for &i in done {
            let d = TxDesc::from_words(self.tx.read(i));
            if d.sta & (tx_sta::EC | tx_sta::LC) != 0 {
                self.stats.tx_errors += 1;
            }
            self.tx_slots[usize::from(i)] = TxSlot::Free;
            self.tx_clean = ring::next(i, self.tx.n);
        }
    }

    /// Sends several frames like [`send`](Self::send), with one map request for all of
    /// them (one ring submission, or one round trip, where the mapper can do that) and
    /// one tail write. Sends as many as the ring has room for (at least one, else
    /// `RingFull`) and returns how many.
    pub fn send_batch(&mut self, frames: &[&[u8]]) -> Result<usize> {
        let b = self.tx_prepare(frames)?;
        self.tx_post(b)
    }

    /// The first half of [`send_batch`](Self::send_batch): copies as many frames as the
    /// ring has room for into their TX buffers and submits their maps, without waiting
    /// for the IOVAs. [`tx_post`](Self::tx_post) collects them and hands the frames to
    /// the NIC; in between the driver may do other work (its RX ring) while the maps
    /// are served. Several batches may be prepared before the first is posted; each
    /// takes ring slots (set aside when it was prepared) at the tail when it is
    /// posted. Nothing else may send in
    /// between. The slots the NIC finished are reaped here, their unmaps submitted
    /// with the maps, a pair per request where the mapper can
    /// ([`DmaMapper::remap_batch_nowait`]), each new frame in the buffer of the unmap
    /// it is paired with.
    pub fn tx_prepare(&mut self, frames: &[&[u8]]) -> Result<TxBatch> {
        for f in frames {
            if f.len() > MAX_FRAME {
                return Err(Error::FrameTooLong {
                    len: f.len(),
                    max: MAX_FRAME,
                });
            }
            if f.is_empty() {
                return Err(Error::Device("refusing to send an empty frame".into()));
            }
        }
        let t0 = cost::now();
        let r = self.tx_prepare_untimed(frames);
        self.cost.driver_ticks += cost::now().wrapping_sub(t0);
        r
    }

    fn tx_prepare_untimed(&mut self, frames: &[&[u8]]) -> Result<TxBatch> {
        // The slots the NIC finished are reaped with this batch: their unmaps go
        // with its maps (one remap entry per pair on iommud's rings), each new
        // frame in the buffer of the unmap it is paired with, so that a mapper
        // may keep that buffer's IOVA (docs/ARCHITECTURE.md, "Kept remaps").
        let (done, unmaps, reaped) = self.tx_done();
        let room = usize::from(self.tx.n - 1)
            .saturating_sub(self.tx_in_flight() - done.len())
            .saturating_sub(self.tx_reserved);
        let n = frames.len().min(room);
        if n == 0 {
            self.stats.tx_ring_full += 1;
            return Err(Error::RingFull {
                slots: usize::from(self.tx.n - 1),
            });
        }
        // As many unmaps as maps go in pairs, the rest on their own (the device
        // reads these buffers again next, so nobody waits for their unmaps).
        let k = unmaps.len().min(n);
        let mut bufs: Vec<u16> = reaped[..k].to_vec();
        while bufs.len() < n {
            match self.take_tx_buf() {
                Ok(b) => bufs.push(b),
                Err(e) => {
                    self.tx_free.extend(bufs.drain(k..));
                    return Err(e);
                }
            }
        }
        let mut reqs = Vec::with_capacity(n);
        let mut lens = Vec::with_capacity(n);
        for (f, &b) in frames[..n].iter().zip(&bufs) {
            let buf = &self.tx_bufs[usize::from(b)];
            // SAFETY: buf is valid for BUF_LEN >= f.len() bytes. It is free, or its
            // slot's descriptor is done (DD): the device has read it, and at most
            // reads it again through its old mapping, which it is about to be
            // handed anyway (a TX buffer, the same device and direction).
            unsafe { ptr::copy_nonoverlapping(f.as_ptr(), buf.as_ptr(), f.len()) };
            reqs.push((buf, 0, f.len(), Dir::ToDevice));
            lens.push(f.len());
        }
        let tm = cost::now();
        if unmaps.len() > k {
            // Nothing else submitted yet: on failure the slots stay unreaped.
            self.mapper
                .unmap_batch_nowait(&unmaps[k..], Dir::ToDevice)?;
        }
        let paired = if k > 0 {
            Some(
                self.mapper
                    .remap_batch_nowait(&unmaps[..k], &reqs[..k], Dir::ToDevice),
            )
        } else {
            None
        };
        if matches!(paired, Some(Err(_))) {
            // Whether or not the failed request got to them, the paired buffers
            // are unmapped on their own (a second unmap is refused, harmlessly):
            // a reaped slot's buffer never stays reachable.
            let _ = self.mapper.unmap_batch_nowait(&unmaps[..k], Dir::ToDevice);
        }
        let rest = (n > k && !matches!(paired, Some(Err(_))))
            .then(|| self.mapper.map_batch_submit(&reqs[k..]));
        drop(reqs);
        self.cost.map_ticks += cost::now().wrapping_sub(tm);
        // Every unmap was submitted (or refused: retrying would not help): the
        // slots are reaped; buffers not paired with a map are free.
        self.tx_reaped(&done, unmaps.len());
        self.tx_free.extend_from_slice(&reaped[k..]);
        let mut pending = Vec::with_capacity(2);
        let mut failed = None;
        for (r, range) in paired
            .into_iter()
            .zip(Some(0..k))
            .chain(rest.zip(Some(k..n)))
        {
            match r {
                Ok(p) => pending.push((p, range)),
                Err(e) => failed = Some(e),
            }
        }
        if let Some(e) = failed {
            // No batch for the caller: what was mapped is unmapped again.
            for (p, range) in pending {
                if let Ok(v) = self.mapper.map_batch_complete(p) {
                    let maps: Vec<(u64, usize)> =
                        v.into_iter().zip(lens[range].iter().copied()).collect();
                    let _ = self.mapper.unmap_batch(&maps, Dir::ToDevice);
                }
            }
            self.tx_free.extend(bufs);
            return Err(e);
        }
        self.tx_reserved += n;
        Ok(TxBatch {
            lens,
            bufs,
            pending,
        })
    }

    /// The second half of [`send_batch`](Self::send_batch): collects the IOVAs of a
    /// [`tx_prepare`](Self::tx_prepare), writes the descriptors and moves the tail once.
    /// Returns how many frames went out.
    pub fn tx_post(&mut self, b: TxBatch) -> Result<usize> {
        let t0 = cost::now();
        let r = self.tx_post_untimed(b);
        self.cost.driver_ticks += cost::now().wrapping_sub(t0);
        r
    }

    fn tx_post_untimed(&mut self, b: TxBatch) -> Result<usize> {
        let n = b.lens.len();
        // Its slots were set aside when it was prepared; it takes them now.
        self.tx_reserved = self.tx_reserved.saturating_sub(n);
        let free = usize::from(self.tx.n - 1).saturating_sub(self.tx_in_flight());
        let tm = cost::now();
        let (iovas, mapped, mut failed) =
            crate::dma::collect_maps(&self.mapper, b.pending, n, |j| b.lens[j]);
        self.cost.map_ticks += cost::now().wrapping_sub(tm);
        self.cost.map_calls += 1;
        self.cost.map_entries += n as u64;
        if failed.is_none() && n > free {
            failed = Some(Error::Device(format!(
                "a TX batch of {n} frames posted with {free} slots free (another send in between)"
            )));
        }
        if let Some(e) = failed {
            // Nothing goes out: what was mapped is unmapped, the buffers are free.
            let _ = self.mapper.unmap_batch(&mapped, Dir::ToDevice);
            self.tx_free.extend(b.bufs);
            return Err(e);
        }
        self.stats.maps += n as u64;
        for (k, ((&len, &iova), &buf)) in b.lens.iter().zip(&iovas).zip(&b.bufs).enumerate() {
            let i = self.tx_tail;
            // Status (DD) for the batch's last descriptor only (`tx_done`).
            let d = if k + 1 == n {
                TxDesc::frame(iova, len as u16)
            } else {
                TxDesc::frame_unreported(iova, len as u16)
            };
            self.tx.write(i, d.to_words());
            self.tx_slots[usize::from(i)] = TxSlot::Mapped { iova, len, buf };
            self.tx_tail = ring::next(i, self.tx.n);
            self.stats.tx_packets += 1;
            self.stats.tx_bytes += len as u64;
        }
        // Descriptors and buffer contents must be visible before the tail moves.
        fence(Ordering::SeqCst);
        self.regs.write32(regs::TDT, u32::from(self.tx_tail))?;
        Ok(n)
    }

    /// TX descriptors handed to the NIC and not yet reaped.
    pub fn tx_in_flight(&self) -> usize {
        usize::from(ring::distance(self.tx_clean, self.tx_tail, self.tx.n))
    }

    /// Waits (bounded) until every posted TX descriptor is done and reaped.
    pub fn flush_tx(&mut self, bound: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            self.reap_tx()?;
            if self.tx_in_flight() == 0 {
                return Ok(());
            }
            if start.elapsed() > bound {
                return Err(Error::Timeout {
                    what: "TX descriptor DD (TDESC.STA bit 0)",
                    ms: bound.as_millis() as u64,
                });
            }
            std::hint::spin_loop();
        }
    }

    /// Receives one frame into `out` (replacing its contents). Returns `false` when no
    /// frame is waiting. Frames with errors are counted and dropped.
    pub fn recv(&mut self, out: &mut Vec<u8>) -> Result<bool> {
        let mut got = false;
        self.recv_batch(1, |f| {
            out.clear();
            out.extend_from_slice(f);
            got = true;
        })?;
        Ok(got)
    }

    /// Receives up to `max` frames, calling `f` on each (a copy out of the DMA buffer).
    /// Each buffer is unmapped when the NIC is done with it and mapped again (a new
    /// IOVA, the same buffer) for its slot's next frame. The slots found done in one
    /// call are unmapped and mapped again together, both submitted before the frames are
    /// copied out, and handed back to the NIC with one tail update by a later call,
    /// the first to find their new IOVAs there (or, with [`RX_REFILLS_BEHIND`] refills
    /// outstanding, the one that waits for the oldest; or
    /// [`finish_rx_refill`](Self::finish_rx_refill)): a mapper that serves them
    /// elsewhere (iommud's rings, `strict`'s invalidation) does so while this thread
    /// receives, so neither wait stalls the receive path. The NIC keeps the rest of
    /// the ring meanwhile. Returns the number of good frames.
    pub fn recv_batch(&mut self, max: usize, f: impl FnMut(&[u8])) -> Result<usize> {
        let t0 = cost::now();
        let r = self.recv_batch_untimed(max, f);
        self.cost.driver_ticks += cost::now().wrapping_sub(t0);
        r
    }

    fn recv_batch_untimed(&mut self, max: usize, mut f: impl FnMut(&[u8])) -> Result<usize> {
        self.hand_back_refills(false)?;
        let n = self.rx.n;
        // The slots to process, in ring order from rx_next: done by the NIC, or left
        // without a buffer by a refill that failed (software owns those). The scan
        // ends before the oldest outstanding refill (a whole ring's wrap away).
        let pending = self
            .rx_refills
            .front()
            .and_then(|r| r.slots.first().copied());
        let mut slots: Vec<u16> = Vec::new();
        let mut i = self.rx_next;
        let mut frames = 0;
        while frames < max && slots.len() < usize::from(n) && Some(i) != pending {
            let idx = usize::from(i);
            let unfilled = self.rx_iova[idx].is_none() && !self.rx_raw[idx];
            if !unfilled {
                if !RxDesc::from_words(self.rx.read(i)).done() {
                    break;
                }
                if !self.rx_raw[idx] {
                    frames += 1;
                }
            }
            slots.push(i);
            i = ring::next(i, n);
        }
        let Some(&last) = slots.last() else {
            return Ok(0);
        };
        fence(Ordering::Acquire);
        // The device is done with these buffers: unmap them, and map them again
        // (new IOVAs, the same buffers) for the slots' next frames, both submitted
        // before the frames are read so that a mapper serving them elsewhere
        // (iommud's rings) works while this thread copies, and completed by the next
        // call. Each frame is copied out to `scratch` and checked there, never in the
        // buffer, so what the device may still write through an old IOVA whose
        // invalidation (`strict`) is in flight cannot change what was checked; the
        // buffers go back to this same device only, for the same direction, and the
        // old IOVAs are reused only after that invalidation (the mapper's rule).
        let (unmaps, had_buffer) = crate::dma::take_refill(&mut self.rx_iova, &slots, BUF_LEN);
        let reqs: Vec<_> = slots
            .iter()
            .map(|&s| (&self.rx_bufs[usize::from(s)], 0, BUF_LEN, Dir::FromDevice))
            .collect();
        let (pending_unmaps, pending_maps) = if unmaps.len() == slots.len() {
            // Every slot had a buffer: unmap and map again in one request each
            // where the mapper can (its time counts as mapping).
            let tm = cost::now();
            let (u, m) =
                self.mapper
                    .remap_batch_submit(&unmaps, &reqs, Dir::FromDevice, Collect::Later)?;
            self.cost.map_ticks += cost::now().wrapping_sub(tm);
            (Some(u), m)
        } else {
            let tu = cost::now();
            let u = if unmaps.is_empty() {
                None
            } else {
                Some(self.mapper.unmap_batch_submit(&unmaps, Dir::FromDevice)?)
            };
            let tm = cost::now();
            self.cost.unmap_ticks += tm.wrapping_sub(tu);
            let m = self.mapper.map_batch_submit(&reqs);
            self.cost.map_ticks += cost::now().wrapping_sub(tm);
            (u, m)
        };
        let mut good = 0;
        for (&s, &had) in slots.iter().zip(&had_buffer) {
            let idx = usize::from(s);
            if self.rx_raw[idx] {
                // Whatever the NIC did with the unmapped address, the slot's own buffer
                // holds nothing of it: drop the frame and put the slot back in service.
                self.rx_raw[idx] = false;
                self.rx_raw_done += 1;
            } else if had {
                let d = RxDesc::from_words(self.rx.read(s));
                let len = usize::from(d.len);
                if d.errors != 0 {
                    self.stats.rx_errors += 1;
                    if d.errors & rx_err::CE != 0 {
                        self.stats.rx_crc_errors += 1;
                    }
                } else if d.status & rx_sta::EOP == 0 || len == 0 || len > BUF_LEN {
                    self.stats.rx_malformed += 1;
                } else {
                    self.scratch.clear();
                    self.scratch.resize(len, 0);
                    let src = self.rx_bufs[idx].as_ptr();
                    // SAFETY: the device wrote back DD for this slot (acquire fence above)
                    // and its IOVA is unmapped; len <= BUF_LEN is within the buffer; the
                    // copy goes through raw pointers, and everything after it reads the
                    // copy, whatever the device does to the buffer meanwhile.
                    unsafe { ptr::copy_nonoverlapping(src, self.scratch.as_mut_ptr(), len) };
                    self.stats.rx_packets += 1;
                    self.stats.rx_bytes += len as u64;
                    good += 1;
                    let tc = cost::now();
                    f(&self.scratch);
                    self.cost.callback_ticks += cost::now().wrapping_sub(tc);
                }
            }
            // Clear the written-back status so this slot is never processed twice, even
            // if the refill fails.
            self.rx.write(s, [0, 0]);
        }
        match pending_maps {
            Ok(maps) => {
                // The scan goes on past these slots; the NIC gets them back later.
                self.rx_next = ring::next(last, n);
                self.rx_refills.push_back(RxRefill {
                    slots,
                    unmaps: pending_unmaps,
                    n_unmaps: unmaps.len(),
                    maps,
                });
            }
            Err(e) => {
                // Nothing mapped: finish the unmaps, and leave the slots unfilled for
                // the next call to map again (its scan starts at them).
                let tu = cost::now();
                let r = pending_unmaps.map_or(Ok(()), |p| self.mapper.unmap_batch_complete(p));
                self.cost.unmap_ticks += cost::now().wrapping_sub(tu);
                self.count_unmaps(unmaps.len());
                r?;
                return Err(e);
            }
        }
        Ok(good)
    }

    /// Hands every outstanding [`recv_batch`](Self::recv_batch) refill back to the NIC
    /// (waits for their buffers' new maps, writes their descriptors and moves the tail)
    /// and completes every outstanding unmap of the receive path (`strict`: waits for
    /// the invalidations). `recv_batch` hands back, as it starts, the refills whose maps
    /// are done; call this to give the NIC its whole ring back, and have every unmap
    /// done, while no receive follows soon.
    pub fn finish_rx_refill(&mut self) -> Result<()> {
        let t0 = cost::now();
        let r = self
            .hand_back_refills(true)
            .and(self.complete_rx_unmaps(true));
        self.cost.driver_ticks += cost::now().wrapping_sub(t0);
        r
    }

    /// Hands outstanding refills back to the NIC, oldest first (the tail only moves
    /// forward): all of them (`all`), else those whose maps are done and, while
    /// [`RX_REFILLS_BEHIND`] or more are outstanding, the oldest (waiting for it).
    /// Then the unmap batches that are done by now, or more than [`RX_UNMAPS_BEHIND`]
    /// behind, are completed; the others stay outstanding: their buffers went back to
    /// this same device, for the same direction, at new IOVAs, so an old IOVA still in
    /// its IOTLB reaches nothing the device may not reach anyway, and the old IOVAs
    /// are not reused before their invalidation (the mapper's rule;
    /// docs/ARCHITECTURE.md, "Batches").
    fn hand_back_refills(&mut self, all: bool) -> Result<()> {
        let mut last = None;
        while let Some(r) = self.rx_refills.front() {
            if !all
                && self.rx_refills.len() < RX_REFILLS_BEHIND
                && !self.mapper.map_batch_ready(&r.maps)
            {
                break;
            }
            let Some(r) = self.rx_refills.pop_front() else {
                break;
            };
            match self.refill_slots(r) {
                Ok(Some(s)) => last = Some(s),
                Ok(None) => {}
                Err(e) => {
                    self.abandon_refills();
                    // What was refilled before the failure still goes back.
                    self.write_rdt(last)?;
                    return Err(e);
                }
            }
        }
        self.write_rdt(last)?;
        // A refused unmap is reported once the slots are back in service.
        self.complete_rx_unmaps(false)
    }

    /// Moves the RX tail to `last` (the last refilled slot becomes the held-back
    /// one, releasing the previous one), if any.
    fn write_rdt(&mut self, last: Option<u16>) -> Result<()> {
        let Some(last) = last else {
            return Ok(());
        };
        fence(Ordering::SeqCst);
        self.regs.write32(regs::RDT, u32::from(last))?;
        Ok(())
    }

    /// Collects one refill's new IOVAs and writes its slots' descriptors (the tail
    /// is the caller's); returns its last slot. On a failed map the slots stay
    /// unfilled, and the next scan starts at them again.
    fn refill_slots(&mut self, r: RxRefill) -> Result<Option<u16>> {
        if let Some(p) = r.unmaps {
            self.rx_unmaps.push_back((p, r.n_unmaps));
        }
        let (Some(&first), Some(&last)) = (r.slots.first(), r.slots.last()) else {
            return Ok(None);
        };
        let tm = cost::now();
        let iovas = self.mapper.map_batch_complete(r.maps);
        self.cost.map_ticks += cost::now().wrapping_sub(tm);
        let iovas = match iovas {
            Ok(v) if v.len() == r.slots.len() => v,
            other => {
                self.rx_next = first;
                return Err(match other {
                    Err(e) => e,
                    Ok(v) => {
                        Error::Device(format!("{} IOVAs for {} RX slots", v.len(), r.slots.len()))
                    }
                });
            }
        };
        self.cost.map_calls += 1;
        self.cost.map_entries += iovas.len() as u64;
        for (&s, &iova) in r.slots.iter().zip(&iovas) {
            self.rx_iova[usize::from(s)] = Some(iova);
            self.rx.write(s, RxDesc::empty(iova).to_words());
        }
        self.stats.maps += iovas.len() as u64;
        Ok(Some(last))
    }

    /// After a refill failed (its slots unfilled, `rx_next` at its first): the later
    /// refills cannot go back before it (the tail only moves forward), so their new
    /// maps are undone and their slots left unfilled too, for the next scan, which
    /// starts at the failed refill's first slot, to map them all again.
    fn abandon_refills(&mut self) {
        while let Some(r) = self.rx_refills.pop_front() {
            if let Some(p) = r.unmaps {
                self.rx_unmaps.push_back((p, r.n_unmaps));
            }
            if let Ok(iovas) = self.mapper.map_batch_complete(r.maps) {
                let maps: Vec<(u64, usize)> = iovas.iter().map(|&v| (v, BUF_LEN)).collect();
                if let Err(e) = self.mapper.unmap_batch(&maps, Dir::FromDevice) {
                    eprintln!("e1000d: {}: undoing an RX refill: {e}", self.bdf);
                }
            }
        }
    }

    /// Completes the receive path's outstanding unmap batches: all of them
    /// (`all`), else those done by now and any beyond [`RX_UNMAPS_BEHIND`]. The first
    /// refusal is the error, after every batch taken was completed.
    fn complete_rx_unmaps(&mut self, all: bool) -> Result<()> {
        let mut first_err = Ok(());
        while let Some((p, _)) = self.rx_unmaps.front() {
            if !all && self.rx_unmaps.len() <= RX_UNMAPS_BEHIND && !self.mapper.unmap_batch_ready(p)
            {
                break;
            }
            let Some((p, n)) = self.rx_unmaps.pop_front() else {
                break;
            };
            let tu = cost::now();
            let r = self.mapper.unmap_batch_complete(p);
            self.cost.unmap_ticks += cost::now().wrapping_sub(tu);
            self.count_unmaps(n);
            if first_err.is_ok() {
                first_err = r;
            }
        }
        first_err
    }

    fn count_unmaps(&mut self, n: usize) {
        if n > 0 {
            self.cost.unmap_calls += 1;
            self.cost.unmap_entries += n as u64;
            self.stats.unmaps += n as u64;
        }
    }
    /// Fault injection: points the next RX descriptor the NIC will fill at `addr`, an
    /// address this driver did not map (its own buffer is unmapped first). The next frame
    /// that arrives is DMA'd there: blocked by the IOMMU, or written over whatever lives
    /// at that physical address without one. The slot returns to service once the NIC
    /// hands it back; [`rx_unmapped_done`](Self::rx_unmapped_done) counts those.
    ///
    /// Call it with the receive path idle (every completed frame already received).
    pub fn post_rx_unmapped(&mut self, addr: u64) -> Result<()> {
        self.finish_rx_refill()?;
        let i = self.rx_next;
        let idx = usize::from(i);
        if let Some(iova) = self.rx_iova[idx].take() {
            self.mapper.unmap(iova, BUF_LEN, Dir::FromDevice)?;
            self.stats.unmaps += 1;
        }
        self.rx_raw[idx] = true;
        self.rx.write(i, RxDesc::empty(addr).to_words());
        fence(Ordering::SeqCst);
        Ok(())
    }

    /// Time spent in the per-packet paths since the last [`reset_cost`](Self::reset_cost).
    pub fn cost(&self) -> Cost {
        self.cost
    }

    /// Starts the [`cost`](Self::cost) accounting over (e.g. after ring setup and settling).
    pub fn reset_cost(&mut self) {
        self.cost = Cost::default();
    }

    /// RX descriptors posted by [`post_rx_unmapped`](Self::post_rx_unmapped) that the NIC
    /// has completed.
    pub fn rx_unmapped_done(&self) -> u64 {
        self.rx_raw_done
    }

    /// The driver's counters plus the NIC's (statistics registers are clear-on-read and
    /// are accumulated here).
    pub fn stats(&mut self) -> Result<Stats> {
        self.stats.hw_gprc += u64::from(self.regs.read32(stat::GPRC)?);
        self.stats.hw_gptc += u64::from(self.regs.read32(stat::GPTC)?);
        self.stats.hw_crcerrs += u64::from(self.regs.read32(stat::CRCERRS)?);
        self.stats.hw_mpc += u64::from(self.regs.read32(stat::MPC)?);
        self.stats.hw_rnbc += u64::from(self.regs.read32(stat::RNBC)?);
        Ok(self.stats)
    }

    fn shutdown(&mut self) -> Result<()> {
        // Stop all DMA before any mapping goes away.
        self.regs.write32(regs::RCTL, 0)?;
        self.regs.write32(regs::TCTL, 0)?;
        reset(&self.regs)?;
        for slot in self.tx_slots.iter_mut() {
            if let TxSlot::Mapped { iova, len, buf } = *slot {
                self.mapper.unmap(iova, len, Dir::ToDevice)?;
                self.tx_free.push(buf);
            }
            *slot = TxSlot::Free;
        }
        while let Some(r) = self.rx_refills.pop_front() {
            // The NIC is reset: complete the refills without handing them back.
            if let Some(p) = r.unmaps {
                self.rx_unmaps.push_back((p, r.n_unmaps));
            }
            for iova in self.mapper.map_batch_complete(r.maps)? {
                self.mapper.unmap(iova, BUF_LEN, Dir::FromDevice)?;
            }
        }
        self.complete_rx_unmaps(true)?;
        for iova in self.rx_iova.iter_mut() {
            if let Some(iova) = iova.take() {
                self.mapper.unmap(iova, BUF_LEN, Dir::FromDevice)?;
            }
        }
        self.mapper
            .unmap(self.tx.iova, self.tx.mem.len(), Dir::Bidirectional)?;
        self.mapper
            .unmap(self.rx.iova, self.rx.mem.len(), Dir::Bidirectional)?;
        Ok(())
    }
}

impl<M: DmaMapper> Drop for E1000<M> {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            eprintln!("e1000d: {}: shutdown: {e}", self.bdf);
        }
    }
}

/// 8254x SDM 14.3 / 13.4.1: global reset with interrupts masked before and after.
fn reset(regs: &MmioRegion) -> Result<()> {
    regs.write32(regs::IMC, u32::MAX)?;
    let c = regs.read32(regs::CTRL)?;
    regs.write32(regs::CTRL, c | ctrl::RST)?;
    // The SDM asks for at least 1 µs before the next access after a reset.
    std::thread::sleep(Duration::from_micros(10));
    let start = Instant::now();
    while regs.read32(regs::CTRL)? & ctrl::RST != 0 {
        if start.elapsed() > RESET_TIMEOUT {
            return Err(Error::ResetTimeout {
                ms: RESET_TIMEOUT.as_millis() as u64,
            });
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    regs.write32(regs::IMC, u32::MAX)?;
    regs.read32(regs::ICR)?;
    // Link up, auto-speed detection, out of link and PHY reset.
    let c = regs.read32(regs::CTRL)?;
    regs.write32(
        regs::CTRL,
        (c | ctrl::SLU | ctrl::ASDE) & !(ctrl::LRST | ctrl::PHY_RST),
    )?;
    Ok(())
}

/// RX slots a [`E1000::recv_batch`] emptied: their buffers' unmaps and new maps are
/// submitted, the slots not yet handed back to the NIC.
#[derive(Debug)]
struct RxRefill {
    /// In ring order, the first at the old `rx_next`.
    slots: Vec<u16>,
    unmaps: Option<crate::PendingUnmaps>,
    /// Buffers in `unmaps`.
    n_unmaps: usize,
    /// One new map per slot.
    maps: crate::PendingMaps,
}

/// Frames copied into TX buffers whose maps are on their way ([`E1000::tx_prepare`]).
#[derive(Debug)]
#[must_use = "post the batch with E1000::tx_post"]
pub struct TxBatch {
    lens: Vec<usize>,
    /// The frames' buffers (indices into the NIC's TX buffers).
    bufs: Vec<u16>,
    /// The maps paired with the reaped slots' unmaps, then any others, each
    /// with the frames (indices into `lens`) it maps.
    pending: Vec<(crate::PendingMaps, std::ops::Range<usize>)>,
}

impl TxBatch {
    /// How many frames it holds (the ring may have had room for fewer than asked).
    pub fn frames(&self) -> usize {
        self.lens.len()
    }
}
