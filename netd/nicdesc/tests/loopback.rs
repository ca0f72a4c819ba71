//! The queues against a NIC played by the test: a TX queue and an RX queue over heap
//! "DMA" memory (IOVA = CPU address) and a register file in a temporary file. The model
//! reads the tails the queues write, takes TX descriptors between head and tail, copies
//! each frame into the next RX buffer it owns and writes both write-backs, as the
//! datasheets describe. Checks that every frame arrives intact, the tails and heads
//! follow the ring protocol, every buffer the NIC touches is mapped at that moment, and
//! every map is unmapped exactly once.

use std::collections::BTreeMap;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use linuxhw::mmio::MmioRegion;
use nicdesc::desc::{self, RxWb};
use nicdesc::frame;
use nicdesc::queue::{RxQueue, SharedMapper, TxQueue};
use nicdesc::regs::{Doorbell, Regs};
use nicdesc::{Dir, DmaBuf, DmaMapper};

/// Heap memory, IOVA = address; tracks live mappings.
#[derive(Default)]
struct HeapMapper {
    blocks: Mutex<Vec<Box<[u64]>>>,
    live: Mutex<BTreeMap<u64, usize>>,
    counts: Mutex<(u64, u64)>,
}

impl HeapMapper {
    fn mapped(&self, iova: u64, len: usize) -> bool {
        let live = self.live.lock().unwrap();
        live.range(..=iova)
            .next_back()
            .is_some_and(|(&a, &l)| iova + len as u64 <= a + l as u64)
    }
}

impl DmaMapper for HeapMapper {
    fn alloc(&self, len: usize) -> e1000d::Result<DmaBuf> {
        let mut b = vec![0u64; len.div_ceil(8)].into_boxed_slice();
        let p = NonNull::new(b.as_mut_ptr().cast::<u8>()).expect("heap pointer");
        self.blocks.lock().unwrap().push(b);
        // SAFETY: the block lives in `blocks` (never freed before the mapper) and holds
        // at least len bytes; "physical" = virtual address for this model.
        Ok(unsafe { DmaBuf::new(p, p.as_ptr() as u64, len) })
    }
    fn map(&self, buf: &DmaBuf, offset: usize, len: usize, _dir: Dir) -> e1000d::Result<u64> {
        buf.check_range(offset, len)?;
        let iova = buf.phys() + offset as u64;
        let prev = self.live.lock().unwrap().insert(iova, len);
        assert!(prev.is_none(), "{iova:#x} mapped twice");
        self.counts.lock().unwrap().0 += 1;
        Ok(iova)
    }
    fn unmap(&self, iova: u64, len: usize, _dir: Dir) -> e1000d::Result<()> {
        let l = self.live.lock().unwrap().remove(&iova);
        assert_eq!(
            l,
            Some(len),
            "unmap of {iova:#x} that is not mapped with that length"
        );
        self.counts.lock().unwrap().1 += 1;
        Ok(())
    }
}

const TDT: usize = 0x18;
const RDT: usize = 0x28;

/// The NIC, played by the test.
struct Model {
    regs: MmioRegion,
    tx_base: u64,
    rx_base: u64,
    n: u16,
    tdh: u16,
    rdh: u16,
}

impl Model {
    fn word(addr: u64, i: usize) -> *mut u64 {
        (addr as *mut u64).wrapping_add(i)
    }

    /// Moves every posted TX frame into the next RX buffer; returns how many moved.
    fn step(&mut self, m: &HeapMapper) -> usize {
        let tdt = self.regs.read32(TDT).unwrap() as u16;
        let rdt = self.regs.read32(RDT).unwrap() as u16;
        let mut moved = 0;
        while self.tdh != tdt {
            if self.rdh == rdt {
                break; // no RX buffer owned by the NIC: leave the frame queued
            }
            let td = Self::word(self.tx_base, 2 * usize::from(self.tdh));
            // SAFETY: the TX ring has n descriptors and tdh < n; heap memory.
            let (addr, w1) = unsafe { (td.read_volatile(), td.add(1).read_volatile()) };
            assert_eq!(
                w1 & (0xF << 20),
                desc::DTYP_DATA,
                "not an advanced data descriptor"
            );
            let len = (w1 & 0xFFFF) as usize;
            assert_eq!((w1 >> desc::PAYLEN_SHIFT) as usize, len);
            assert!(
                m.mapped(addr, len),
                "TX buffer {addr:#x}+{len} read while not mapped"
            );
            let rd = Self::word(self.rx_base, 2 * usize::from(self.rdh));
            // SAFETY: as above for the RX ring.
            let (buf, hdr) = unsafe { (rd.read_volatile(), rd.add(1).read_volatile()) };
            assert_eq!(hdr, 0, "header buffer set");
            assert!(
                m.mapped(buf, 2048),
                "RX buffer {buf:#x} written while not mapped"
            );
            // SAFETY: both buffers are heap blocks of at least len / 2048 bytes.
            unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, buf as *mut u8, len) };
            let wb0 = (0xABCD_0123u64 << 32) | 0x7;
            let wb1 = ((len as u64) << 32) | u64::from(desc::rxstat::DD | desc::rxstat::EOP);
            // SAFETY: as above; write-back of both descriptors.
            unsafe {
                rd.write_volatile(wb0);
                rd.add(1).write_volatile(wb1);
                td.add(1).write_volatile(w1 | desc::TX_DD);
            }
            self.tdh = (self.tdh + 1) % self.n;
            self.rdh = (self.rdh + 1) % self.n;
            moved += 1;
        }
        moved
    }
}

/// The register file's backing file, removed when the test ends.
struct TempFile(std::path::PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A TX and an RX queue of `n` descriptors over `mapper`, with a register file in
/// a temporary file named after `name`, the RX ring armed, and the NIC model at
/// both rings.
fn rig(name: &str, mapper: SharedMapper, n: u16) -> (TempFile, TxQueue, RxQueue, Model) {
    let file =
        TempFile(std::env::temp_dir().join(format!("nicdesc-{name}-{}", std::process::id())));
    std::fs::write(&file.0, vec![0u8; 4096]).unwrap();
    let regs = Regs::new(MmioRegion::from_file(&file.0, 4096).unwrap());
    let tx = TxQueue::new(0, mapper.clone(), n, Doorbell::new(regs.clone(), TDT)).unwrap();
    let mut rx = RxQueue::new(0, mapper, n, Doorbell::new(regs, RDT)).unwrap();
    rx.arm().unwrap();
    let model = Model {
        regs: MmioRegion::from_file(&file.0, 4096).unwrap(),
        tx_base: tx.ring_iova(),
        rx_base: rx.ring_iova(),
        n,
        tdh: 0,
        rdh: 0,
    };
    (file, tx, rx, model)
}

/// Frames `from..from + k` (their sequence numbers), `len(seq)` bytes each.
fn frames(from: u64, k: u64, len: impl Fn(u64) -> usize) -> Vec<Vec<u8>> {
    (from..from + k)
        .map(|s| {
            let mut v = Vec::new();
            frame::build([4; 6], [2; 6], 4000, 0, s, len(s), &mut v);
            v
        })
        .collect()
}

#[test]
fn frames_cross_the_rings_intact_and_every_map_is_unmapped_once() {
    let heap = Arc::new(HeapMapper::default());
    let n = 16u16;
    let (_file, mut tx, mut rx, mut model) = rig("loopback", heap.clone(), n);
    assert_eq!(model.regs.read32(RDT).unwrap(), u32::from(n - 1));
    assert!(heap.mapped(tx.ring_iova(), tx.ring_bytes() as usize));

    let (a, b) = ([2u8; 6], [4u8; 6]);
    let total = 200u64;
    let (mut sent, mut got) = (0u64, Vec::new());
    let mut f: Vec<Vec<u8>> = Vec::new();
    while (got.len() as u64) < total {
        // Batches of up to 7, never more than the ring holds.
        f.clear();
        for s in sent..(sent + 7).min(total) {
            let mut v = Vec::new();
            frame::build(
                b,
                a,
                4000 + s as u16,
                0,
                s,
                60 + (s as usize * 37) % 1400,
                &mut v,
            );
            f.push(v);
        }
        let refs: Vec<&[u8]> = f.iter().map(Vec::as_slice).collect();
        let k = tx.send_batch(&refs).unwrap();
        sent += k as u64;
        assert!(tx.in_flight() < n, "one slot is always kept back");
        model.step(&heap);
        rx.recv_batch(64, |fr, meta| {
            assert_eq!((meta.rss_hash, meta.rss_type), (0xABCD_0123, 7));
            got.push(frame::check(fr).expect("intact frame"));
        })
        .unwrap();
        tx.reap().unwrap();
    }
    tx.flush(100).unwrap();
    let seqs: Vec<u64> = got.iter().map(|&(_, s, _)| s).collect();
    assert_eq!(
        seqs,
        (0..total).collect::<Vec<_>>(),
        "every frame once, in order"
    );
    let (ts, rs) = (tx.stats(), rx.stats());
    assert_eq!((ts.packets, rs.packets), (total, total));
    // TX: ring + one map per frame, each unmapped once.
    assert_eq!(ts.maps, 1 + total);
    assert_eq!(ts.unmaps, total);
    tx.release().unwrap();
    rx.release().unwrap();
    assert!(
        heap.live.lock().unwrap().is_empty(),
        "mappings left after release"
    );
    let (maps, unmaps) = *heap.counts.lock().unwrap();
    assert_eq!(maps, unmaps);
    // RX: ring + n initial buffers + one re-map per received frame.
    assert_eq!(maps, (1 + total) + (1 + u64::from(n) + total));
}

#[test]
fn an_rx_slot_holding_a_frame_is_never_overwritten_by_fault_injection() {
    let heap = Arc::new(HeapMapper::default());
    let (_file, mut tx, mut rx, mut model) = rig("inject", heap.clone(), 8);
    let mut v = Vec::new();
    frame::build([4; 6], [2; 6], 4000, 0, 1, 100, &mut v);
    tx.send_batch(&[&v]).unwrap();
    assert_eq!(model.step(&heap), 1);
    // Slot 0 holds a received frame: posting an unmapped buffer there must be refused.
    assert!(rx.post_unmapped(0xDEAD_0000).is_err());
    assert_eq!(rx.recv_batch(64, |_, _| {}).unwrap(), 1);
    // Now slot 1 is free: accepted; its own buffer is unmapped first and the
    // descriptor points at the unmapped address.
    let d1 = Model::word(model.rx_base, 2);
    // SAFETY: slot 1 of the 8-descriptor RX ring, heap memory.
    let own = unsafe { d1.read_volatile() };
    assert!(heap.mapped(own, 2048));
    rx.post_unmapped(0xDEAD_0000).unwrap();
    assert!(!heap.mapped(own, 2048));
    // SAFETY: as above.
    let w = unsafe { [d1.read_volatile(), d1.add(1).read_volatile()] };
    assert_eq!(w, [0xDEAD_0000, 0]);
    assert!(!RxWb::decode(w).done());
}

/// A mapper that keeps a recycled buffer's IOVA, as libdma's kept remaps do: a
/// remap pair whose new buffer starts where the old IOVA does keeps that IOVA (its
/// recorded length updated), anything else is unmapped and mapped. Counts what it
/// kept and records how each RX refill is to be collected.
#[derive(Default)]
struct KeepingMapper {
    heap: HeapMapper,
    kept: Mutex<u64>,
    tx_pairs: Mutex<u64>,
    rx_collect: Mutex<Vec<nicdesc::Collect>>,
}

impl KeepingMapper {
    fn remap(&self, unmaps: &[(u64, usize)], reqs: &[(&DmaBuf, usize, usize, Dir)]) -> Vec<u64> {
        assert_eq!(
            unmaps.len(),
            reqs.len(),
            "a remap pairs each unmap with a map"
        );
        unmaps
            .iter()
            .zip(reqs)
            .map(|(&(old, old_len), &(buf, off, len, dir))| {
                if buf.phys() + off as u64 == old {
                    let mut live = self.heap.live.lock().unwrap();
                    let l = live.get_mut(&old).expect("kept IOVA is mapped");
                    assert_eq!(*l, old_len, "unmap length");
                    *l = len;
                    *self.kept.lock().unwrap() += 1;
                    old
                } else {
                    self.heap.unmap(old, old_len, dir).unwrap();
                    self.heap.map(buf, off, len, dir).unwrap()
                }
            })
            .collect()
    }
}

impl DmaMapper for KeepingMapper {
    fn alloc(&self, len: usize) -> e1000d::Result<DmaBuf> {
        self.heap.alloc(len)
    }
    fn map(&self, buf: &DmaBuf, offset: usize, len: usize, dir: Dir) -> e1000d::Result<u64> {
        self.heap.map(buf, offset, len, dir)
    }
    fn unmap(&self, iova: u64, len: usize, dir: Dir) -> e1000d::Result<()> {
        self.heap.unmap(iova, len, dir)
    }
    fn remap_batch_nowait(
        &self,
        unmaps: &[(u64, usize)],
        reqs: &[(&DmaBuf, usize, usize, Dir)],
        dir: Dir,
    ) -> e1000d::Result<nicdesc::PendingMaps> {
        assert_eq!(dir, Dir::ToDevice);
        *self.tx_pairs.lock().unwrap() += unmaps.len() as u64;
        Ok(nicdesc::PendingMaps::Ready(self.remap(unmaps, reqs)))
    }
    fn remap_batch_submit(
        &self,
        unmaps: &[(u64, usize)],
        reqs: &[(&DmaBuf, usize, usize, Dir)],
        dir: Dir,
        collect: nicdesc::Collect,
    ) -> e1000d::Result<(nicdesc::PendingUnmaps, e1000d::Result<nicdesc::PendingMaps>)> {
        assert_eq!(dir, Dir::FromDevice);
        self.rx_collect.lock().unwrap().push(collect);
        let iovas = self.remap(unmaps, reqs);
        Ok((
            nicdesc::PendingUnmaps::Done,
            Ok(nicdesc::PendingMaps::Ready(iovas)),
        ))
    }
}

#[test]
fn finished_tx_buffers_and_received_buffers_are_remapped_in_pairs_and_keep_their_iovas() {
    let keeping = Arc::new(KeepingMapper::default());
    let n = 16u16;
    let (_file, mut tx, mut rx, mut model) = rig("keep", keeping.clone(), n);
    let total = 200u64;
    let (mut sent, mut got) = (0u64, Vec::new());
    while (got.len() as u64) < total {
        // Batches of 7: the model moves each batch before the next send, which
        // finds the previous 7 descriptors done (the last batch: 4 frames).
        let f = frames(sent, (sent + 7).min(total) - sent, |s| {
            60 + (s as usize * 37) % 1400
        });
        if !f.is_empty() {
            let refs: Vec<&[u8]> = f.iter().map(Vec::as_slice).collect();
            sent += tx.send_batch(&refs).unwrap() as u64;
        }
        model.step(&keeping.heap);
        rx.recv_batch(64, |fr, _| {
            got.push(frame::check(fr).expect("intact frame").1)
        })
        .unwrap();
    }
    assert_eq!(
        got,
        (0..total).collect::<Vec<_>>(),
        "every frame once, in order"
    );
    // TX: the first batch maps 7 pool buffers; every later frame goes into the buffer
    // of a finished one, paired and kept (27 batches of 7, then 4 of the last 7).
    assert_eq!(*keeping.tx_pairs.lock().unwrap(), total - 7);
    // RX: each received buffer is refilled as a pair, collected at once.
    let collect = keeping.rx_collect.lock().unwrap().clone();
    assert!(collect.iter().all(|&c| c == nicdesc::Collect::Now));
    assert_eq!(*keeping.kept.lock().unwrap(), (total - 7) + total);
    // The last send took 4 of the 7 finished buffers: the other 3 were unmapped on
    // their own; the last batch's 4 stay mapped until a reap.
    assert_eq!(tx.stats().unmaps, (total - 7) + 3);
    tx.flush(100).unwrap();
    assert_eq!(tx.in_flight(), 0);
    assert_eq!(tx.stats().unmaps, total);
    tx.release().unwrap();
    rx.release().unwrap();
    assert!(
        keeping.heap.live.lock().unwrap().is_empty(),
        "mappings left after release"
    );
}

/// [`HeapMapper`] whose maps fail while `fail` is set, and whose TX remaps, while
/// `lose_remaps` is set, unmap the old IOVAs and hand back no new ones.
#[derive(Default)]
struct FlakyMapper {
    heap: HeapMapper,
    fail: std::sync::atomic::AtomicBool,
    lose_remaps: std::sync::atomic::AtomicBool,
}

impl DmaMapper for FlakyMapper {
    fn alloc(&self, len: usize) -> e1000d::Result<DmaBuf> {
        self.heap.alloc(len)
    }
    fn map(&self, buf: &DmaBuf, offset: usize, len: usize, dir: Dir) -> e1000d::Result<u64> {
        if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(e1000d::Error::Dma {
                op: "map",
                msg: "refused by the test".into(),
            });
        }
        self.heap.map(buf, offset, len, dir)
    }
    fn unmap(&self, iova: u64, len: usize, dir: Dir) -> e1000d::Result<()> {
        self.heap.unmap(iova, len, dir)
    }
    fn remap_batch_nowait(
        &self,
        unmaps: &[(u64, usize)],
        reqs: &[(&DmaBuf, usize, usize, Dir)],
        dir: Dir,
    ) -> e1000d::Result<nicdesc::PendingMaps> {
        if !self.lose_remaps.load(std::sync::atomic::Ordering::SeqCst) {
            self.unmap_batch_nowait(unmaps, dir)?;
            return self.map_batch_submit(reqs);
        }
        self.unmap_batch(unmaps, dir)?;
        Ok(nicdesc::PendingMaps::Ready(Vec::new()))
    }
}

#[test]
fn a_tx_batch_whose_paired_maps_fail_unmaps_its_other_maps_with_their_own_lengths() {
    use std::sync::atomic::Ordering::SeqCst;
    let flaky = Arc::new(FlakyMapper::default());
    let n = 8u16;
    let (_file, mut tx, mut rx, mut model) = rig("txfail", flaky.clone(), n);
    let frames = |from, k| frames(from, k, |s| 100 + 50 * s as usize);
    // The rings and the RX buffers.
    let base = 2 + usize::from(n);
    let f = frames(0, 2);
    let refs: Vec<&[u8]> = f.iter().map(Vec::as_slice).collect();
    assert_eq!(tx.send_batch(&refs).unwrap(), 2);
    assert_eq!(model.step(&flaky.heap), 2);
    assert_eq!(rx.recv_batch(64, |_, _| {}).unwrap(), 2);
    assert_eq!(flaky.heap.live.lock().unwrap().len(), base + 2);
    // Five frames of five lengths: two go into the finished buffers (the remap that
    // loses its maps), three into fresh ones, mapped and then unmapped again, each
    // with its own length (HeapMapper checks it).
    flaky.lose_remaps.store(true, SeqCst);
    let f = frames(2, 5);
    let refs: Vec<&[u8]> = f.iter().map(Vec::as_slice).collect();
    assert!(tx.send_batch(&refs).is_err());
    assert_eq!(
        flaky.heap.live.lock().unwrap().len(),
        base,
        "no TX buffer left mapped"
    );
    assert_eq!(tx.in_flight(), 0);
    // The pool is whole again: a full ring's worth goes out.
    flaky.lose_remaps.store(false, SeqCst);
    let f = frames(7, u64::from(n) - 1);
    let refs: Vec<&[u8]> = f.iter().map(Vec::as_slice).collect();
    assert_eq!(tx.send_batch(&refs).unwrap(), usize::from(n) - 1);
    assert_eq!(model.step(&flaky.heap), usize::from(n) - 1);
    let mut got = Vec::new();
    rx.recv_batch(64, |fr, _| got.push(frame::check(fr).unwrap().1))
        .unwrap();
    assert_eq!(got, (7..7 + u64::from(n) - 1).collect::<Vec<_>>());
    tx.flush(100).unwrap();
    tx.release().unwrap();
    rx.release().unwrap();
    assert!(flaky.heap.live.lock().unwrap().is_empty());
}

#[test]
fn rx_slots_a_failed_refill_left_without_buffers_are_refilled_by_the_next_receive() {
    use std::sync::atomic::Ordering::SeqCst;
    let flaky = Arc::new(FlakyMapper::default());
    let n = 8u16;
    let (_file, mut tx, mut rx, mut model) = rig("refill", flaky.clone(), n);
    let frames = |from, k| frames(from, k, |_| 100);
    let f = frames(0, 3);
    let refs: Vec<&[u8]> = f.iter().map(Vec::as_slice).collect();
    assert_eq!(tx.send_batch(&refs).unwrap(), 3);
    assert_eq!(model.step(&flaky.heap), 3);
    let mut got = Vec::new();
    flaky.fail.store(true, SeqCst);
    assert!(rx
        .recv_batch(64, |fr, _| got.push(frame::check(fr).unwrap().1))
        .is_err());
    assert_eq!(
        got,
        vec![0, 1, 2],
        "the frames were read before the refill failed"
    );
    let live_before = flaky.heap.live.lock().unwrap().len();
    flaky.fail.store(false, SeqCst);
    // The three slots have no buffer now: the next receive maps them again.
    assert_eq!(rx.recv_batch(64, |_, _| panic!("no frame")).unwrap(), 0);
    assert_eq!(flaky.heap.live.lock().unwrap().len(), live_before + 3);
    // And the ring keeps working: 20 more frames, in batches of 5.
    for b in 0..4 {
        let f = frames(3 + 5 * b, 5);
        let refs: Vec<&[u8]> = f.iter().map(Vec::as_slice).collect();
        assert_eq!(tx.send_batch(&refs).unwrap(), 5);
        assert_eq!(model.step(&flaky.heap), 5);
        rx.recv_batch(64, |fr, _| got.push(frame::check(fr).unwrap().1))
            .unwrap();
    }
    assert_eq!(got, (0..23).collect::<Vec<_>>());
    tx.flush(100).unwrap();
    tx.release().unwrap();
    rx.release().unwrap();
    assert!(flaky.heap.live.lock().unwrap().is_empty());
}
