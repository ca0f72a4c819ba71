//! The ring path of a validated domain (see `iommu_abi::ring` and
//! docs/ARCHITECTURE.md, "Rings and service threads"): maps and unmaps are
//! entries in this CPU slot's submission ring, served by an iommud service
//! thread; no system call in steady state.
//!
//! A map waits for its completion (it needs the IOVA). An unmap waits only
//! with `strict` (its completion means the invalidation covering it has
//! completed); with `percore` and `deferred` it returns once submitted, and
//! its completion is consumed later (a refused unmap is then counted in
//! [`ClientCounts::ring_errors`](super::ClientCounts)).

use super::*;
use crate::ring::{
    ring_at, Cqe, MapArgs, RingShm, SqOp, Sqe, CQE_WORDS, MAX_RINGS, RING_BYTES, RING_ENTRIES,
};
use std::os::fd::AsRawFd;
use std::sync::atomic::{Ordering::Acquire, Ordering::Release};
use std::time::{Duration, Instant};

/// Looks a waiter spins before it yields the CPU between looks (a few
/// microseconds: iommud's service thread may be waiting for this very CPU).
const SPIN_LOOKS: u32 = 100;
/// How long a waiter waits for iommud before it gives up.
const WAIT_LIMIT: Duration = Duration::from_secs(10);
/// How long a waiter sees no completion before it checks that iommud is
/// still there (one round trip), and reattaches if it is not.
const PROBE_AFTER: Duration = Duration::from_millis(200);
/// Entries submitted at once (at most half a ring, so reaping keeps up).
const CHUNK: usize = (RING_ENTRIES / 2) as usize;

/// This client's side of one ring.
#[derive(Default)]
struct RingClient {
    /// Entries submitted.
    tail: u32,
    /// Completions consumed.
    head: u32,
    /// Submitted batches somebody will collect later ([`MapTicket`]): their
    /// first sequence number and length.
    awaited: Vec<(u32, u32)>,
    /// Completions of awaited batches consumed before their owner came.
    stash: Stash,
}

/// A completion's result as the ring reports it.
type Completion = std::result::Result<u64, ErrorCode>;

/// The completions of awaited batches, by sequence number: a slot per ring
/// entry (no hashing on the path of every completion), and a map for the
/// rare sequence number whose slot an older, still uncollected completion
/// holds (a ticket collected more than a ring's worth of entries late).
#[derive(Default)]
struct Stash {
    slots: Vec<Option<(u32, Completion)>>,
    overflow: std::collections::HashMap<u32, Completion>,
}

impl Stash {
    fn insert(&mut self, seq: u32, r: Completion) {
        if self.slots.is_empty() {
            self.slots = vec![None; RING_ENTRIES as usize];
        }
        let slot = &mut self.slots[(seq % RING_ENTRIES) as usize];
        match slot {
            None => *slot = Some((seq, r)),
            Some(_) => {
                self.overflow.insert(seq, r);
            }
        }
    }

    fn remove(&mut self, seq: u32) -> Option<Completion> {
        if let Some(slot) = self.slots.get_mut((seq % RING_ENTRIES) as usize) {
            if matches!(slot, Some((s, _)) if *s == seq) {
                return slot.take().map(|(_, r)| r);
            }
        }
        self.overflow.remove(&seq)
    }
}

/// Hints on a remap batch ([`DmaDomain::remap_batch_submit_hinted`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RemapHints {
    /// The driver collects the new IOVAs at a later call, not at once (a
    /// NIC's RX refill): [`iommu_abi::ring::SQE_LAZY`].
    pub lazy: bool,
    /// A pair whose new buffer is the memory, and the direction, of its old
    /// mapping may keep the old IOVA under `percore` or `deferred`, no entry
    /// changed (a recycled buffer; docs/ARCHITECTURE.md, "Kept remaps"):
    /// [`iommu_abi::ring::SQE_KEEP`]. Never under `strict`.
    pub keep: bool,
}

impl RemapHints {
    /// The hints as ring entry bits.
    fn bits(self) -> u64 {
        let mut b = 0;
        if self.lazy {
            b |= iommu_abi::ring::SQE_LAZY;
        }
        if self.keep {
            b |= iommu_abi::ring::SQE_KEEP;
        }
        b
    }
}

/// Maps submitted with [`DmaDomain::map_batch_submit`], to be collected with
/// [`DmaDomain::map_batch_complete`].
#[derive(Debug)]
#[must_use = "collect the IOVAs (and unmap them) with map_batch_complete"]
pub struct MapTicket {
    inner: Ticket,
}

impl MapTicket {
    /// A ticket whose IOVAs are known already.
    fn ready(iovas: Vec<u64>) -> MapTicket {
        MapTicket {
            inner: Ticket::Ready(iovas),
        }
    }
}

#[derive(Debug)]
enum Ticket {
    /// Done already (no rings): the IOVAs.
    Ready(Vec<u64>),
    /// On ring `ring`: `n` entries from sequence `first`; the lengths, to
    /// undo a partial batch.
    Ring {
        ring: usize,
        first: u32,
        lens: Vec<usize>,
    },
}

#[derive(Default)]
#[repr(align(128))]
struct RingSlot(spin::mutex::SpinMutex<RingClient>);

impl RingSlot {
    /// The slot's lock (held while a batch is submitted and, if waited for,
    /// collected); a waiter yields, like the magazines' `Slot::lock`.
    fn lock(&self) -> spin::mutex::SpinMutexGuard<'_, RingClient> {
        loop {
            if let Some(g) = self.0.try_lock() {
                return g;
            }
            std::thread::yield_now();
        }
    }
}

/// The client's rings.
pub(super) struct ClientRings {
    map: Mapping,
    /// The doorbell's descriptor (a restarted iommud gives a new one).
    doorbell: std::sync::atomic::AtomicI32,
    /// Every doorbell received, kept open: a thread may still be writing to
    /// an older one, whose number must not be reused meanwhile. (Redox
    /// sessions do not reattach, so there only the first is ever here.)
    #[cfg_attr(target_os = "redox", allow(dead_code))]
    doorbells: Mutex<Vec<OwnedFd>>,
    slots: Vec<RingSlot>,
}

/// Most pools one client registers (2 MiB each: 1 GiB, above the default
/// pool quota of 256 MiB).
pub(super) const MAX_REGIONS: usize = 512;

/// The registered regions, append-only: written under the pools' lock, read
/// by every CPU with no lock and no shared write (a map looks its buffer up
/// here).
pub(super) struct Regions {
    slots: Box<[std::sync::OnceLock<RegionInfo>]>,
    len: std::sync::atomic::AtomicUsize,
}

impl Default for Regions {
    fn default() -> Self {
        Regions {
            slots: (0..MAX_REGIONS)
                .map(|_| std::sync::OnceLock::new())
                .collect(),
            len: std::sync::atomic::AtomicUsize::new(0),
        }
    }
}

impl Regions {
    /// Appends one (the caller holds the pools' lock: one writer).
    pub(super) fn push(&self, r: RegionInfo) -> Result<()> {
        let n = self.len.load(SeqCst);
        let slot = self
            .slots
            .get(n)
            .ok_or_else(|| Error::Invalid(format!("more than {MAX_REGIONS} DMA pools")))?;
        let _ = slot.set(r);
        self.len.store(n + 1, Release);
        Ok(())
    }

    /// The regions registered so far.
    pub(super) fn iter(&self) -> impl Iterator<Item = RegionInfo> + '_ {
        let n = self.len.load(Acquire);
        self.slots[..n.min(MAX_REGIONS)]
            .iter()
            .filter_map(|s| s.get().copied())
    }
}

/// A registered region as the client knows it.
#[derive(Debug, Clone, Copy)]
pub(super) struct RegionInfo {
    pub(super) phys: u64,
    pub(super) len: u64,
    pub(super) index: u32,
    /// The static strategy's IOVA of the first byte (0: not mapped whole).
    pub(super) iova: u64,
}

impl ClientRings {
    /// Asks iommud for `count` rings.
    pub(super) fn setup(conn: &mut Conn, count: usize) -> Result<ClientRings> {
        let count = count.clamp(1, MAX_RINGS);
        let (r, mut fds) = conn.call(&Request::SetupRings {
            rings: count as u64,
        })?;
        let a = r.result.map_err(|code| Error::Server {
            code,
            msg: String::from_utf8_lossy(&r.payload).into_owned(),
        })?;
        if a[0] != count as u64 || a[1] != RING_BYTES as u64 || fds.len() != 2 {
            return Err(Error::Invalid("SetupRings reply does not match".into()));
        }
        let doorbell = fds
            .pop()
            .and_then(|s| s.into_fd())
            .ok_or_else(|| Error::Invalid("SetupRings carried no doorbell".into()))?;
        let map = fds
            .pop()
            .ok_or_else(|| Error::Invalid("SetupRings carried no rings".into()))?
            .map(0, count * RING_BYTES)?;
        Ok(ClientRings {
            map,
            doorbell: std::sync::atomic::AtomicI32::new(doorbell.as_raw_fd()),
            doorbells: Mutex::new(vec![doorbell]),
            slots: (0..count).map(|_| RingSlot::default()).collect(),
        })
    }

    /// Rings the doorbell of a restarted iommud from now on.
    #[cfg_attr(target_os = "redox", allow(dead_code))]
    pub(super) fn new_doorbell(&self, fd: OwnedFd) {
        let raw = fd.as_raw_fd();
        self.doorbells
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(fd);
        self.doorbell.store(raw, SeqCst);
    }

    fn ring(&self, k: usize) -> &RingShm {
        // SAFETY: `map` covers `slots.len() * RING_BYTES` bytes of the ring
        // memfd, page-aligned, alive as long as `self`; k < slots.len().
        unsafe { ring_at(self.map.as_ptr(), k) }
    }

    fn ring_doorbell(&self) {
        let one = 1u64.to_ne_bytes();
        let fd = self.doorbell.load(SeqCst);
        // SAFETY: writes 8 bytes from a live buffer to an eventfd we hold
        // (every doorbell stays open as long as `self`).
        let _ = unsafe { libc::write(fd, one.as_ptr().cast(), 8) };
    }
}

/// The ring entries unmapping `(iova, len)` pairs.
fn unmap_ops(maps: &[(u64, usize)]) -> Vec<SqOp> {
    maps.iter()
        .map(|&(iova, len)| SqOp::Unmap {
            iova,
            len: len as u64,
        })
        .collect()
}

impl DmaDomain {
    /// The registered region holding `[phys, phys+len)`.
    fn region_of(&self, phys: u64, len: u64) -> Result<RegionInfo> {
        self.regions
            .iter()
            .find(|r| phys >= r.phys && phys.checked_add(len).is_some_and(|e| e <= r.phys + r.len))
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "{phys:#x}+{len:#x} is not in this domain's pools (rings map registered memory)"
                ))
            })
    }

    /// The static strategy's map: the pool's IOVA plus the offset, no IPC.
    pub(super) fn static_map(&self, phys: u64, len: usize) -> Result<u64> {
        let r = self.region_of(phys, len as u64)?;
        if r.iova == 0 {
            return Err(Error::Invalid(format!(
                "region {} was not mapped whole by iommud",
                r.index
            )));
        }
        Ok(r.iova + (phys - r.phys))
    }

    /// Maps buffers `(phys, len, dir)` through the rings; all or nothing.
    pub(super) fn ring_map(&self, bufs: &[(u64, usize, Dir)]) -> Result<Vec<u64>> {
        let ops = self.map_ops(bufs)?;
        let results = self.submit(&ops, true)?;
        let lens: Vec<usize> = bufs.iter().map(|b| b.1).collect();
        self.all_or_nothing(results, &lens)
    }

    /// The ring entries mapping `bufs` (registered region, offset, length).
    fn map_ops(&self, bufs: &[(u64, usize, Dir)]) -> Result<Vec<SqOp>> {
        Ok(self.map_args(bufs)?.into_iter().map(SqOp::Map).collect())
    }

    /// What mapping `bufs` asks of iommud: registered region, offset, length.
    fn map_args(&self, bufs: &[(u64, usize, Dir)]) -> Result<Vec<MapArgs>> {
        let strategy = self.strategy();
        let mut ops = Vec::with_capacity(bufs.len());
        for &(phys, len, dir) in bufs {
            if len == 0 {
                return Err(Error::Invalid("zero-length map".into()));
            }
            let r = self.region_of(phys, len as u64)?;
            ops.push(MapArgs {
                region: r.index,
                offset: phys - r.phys,
                len: len as u64,
                dir,
                va: self.va_hint(strategy, phys)?,
            });
        }
        Ok(ops)
    }

    /// The IOVAs of a batch's map completions, all or nothing: if one was
    /// refused, the others (of lengths `lens`) are unmapped again and the
    /// first refusal is the error.
    fn all_or_nothing(
        &self,
        results: Vec<std::result::Result<u64, ErrorCode>>,
        lens: &[usize],
    ) -> Result<Vec<u64>> {
        let mut out = Vec::with_capacity(results.len());
        let mut first_err = None;
        for (k, r) in results.into_iter().enumerate() {
            match r {
                Ok(iova) => out.push((k, iova)),
                Err(code) => {
                    first_err.get_or_insert((k, code));
                }
            }
        }
        let Some((k, code)) = first_err else {
            return Ok(out.into_iter().map(|(_, v)| v).collect());
        };
        let undo: Vec<SqOp> = out
            .iter()
            .map(|&(j, iova)| SqOp::Unmap {
                iova,
                len: lens.get(j).copied().unwrap_or(0) as u64,
            })
            .collect();
        if !undo.is_empty() {
            let _ = self.submit(&undo, self.flush_policy() == FlushPolicy::Strict);
        }
        Err(Error::Server {
            code,
            msg: format!("ring map entry {k} refused"),
        })
    }

    /// Unmaps `(iova, len)` pairs through the rings. With `strict` this
    /// returns once one invalidation covering all of them has completed.
    pub(super) fn ring_unmap(&self, maps: &[(u64, usize)]) -> Result<()> {
        let ops = unmap_ops(maps);
        let strict = self.flush_policy() == FlushPolicy::Strict;
        let results = self.submit(&ops, strict)?;
        if let Some((k, Err(code))) = results.iter().enumerate().find(|(_, r)| r.is_err()) {
            return Err(Error::Server {
                code: *code,
                msg: format!("ring unmap entry {k} refused"),
            });
        }
        Ok(())
    }

    /// Submits unmaps without waiting for them, whatever the flush policy.
    pub(super) fn ring_unmap_nowait(&self, maps: &[(u64, usize)]) -> Result<()> {
        let ops = unmap_ops(maps);
        self.submit(&ops, false).map(|_| ())
    }

    /// Maps buffers `(phys, len, dir)` without waiting for iommud (on the
    /// rings; elsewhere at once): collect the IOVAs with
    /// [`DmaDomain::map_batch_complete`]. Meanwhile the driver can do other
    /// work (a TX batch's maps travel while it handles its RX ring).
    pub fn map_batch_submit(&self, bufs: &[(u64, usize, Dir)]) -> Result<MapTicket> {
        if !self.submits_ahead(bufs.len()) {
            return Ok(MapTicket {
                inner: Ticket::Ready(self.map_batch(bufs)?),
            });
        }
        self.submit_maps(&self.map_ops(bufs)?, bufs, 0)
    }

    /// True if a batch of `n` maps goes to the rings as one submission
    /// collected later; otherwise the submit calls map at once.
    fn submits_ahead(&self, n: usize) -> bool {
        self.rings.is_some()
            && !matches!(self.strategy(), Strategy::NoIommu | Strategy::Static)
            && n > 0
            && n <= CHUNK
    }

    /// Submits `ops`, whose completions are the maps of `bufs`, for
    /// [`DmaDomain::map_batch_complete`].
    fn submit_maps(
        &self,
        ops: &[SqOp],
        bufs: &[(u64, usize, Dir)],
        hints: u64,
    ) -> Result<MapTicket> {
        let (ring, first) = self.submit_on(ops, true, hints)?;
        Ok(MapTicket {
            inner: Ticket::Ring {
                ring,
                first,
                lens: bufs.iter().map(|b| b.1).collect(),
            },
        })
    }

    /// Unmaps `old[k]` and maps `bufs[k]` in one ring entry each (a NIC's
    /// RX refill: the buffers the device filled, mapped again at new IOVAs),
    /// half the entries of [`DmaDomain::unmap_batch_submit`] followed by
    /// [`DmaDomain::map_batch_submit`], which is what it does off the rings
    /// (or for `static`). Collect the new IOVAs with
    /// [`DmaDomain::map_batch_complete`], all or nothing; complete the
    /// returned [`UnmapTicket`] as for `unmap_batch_submit`. On the rings the
    /// unmaps complete with the maps (with `strict`, after the invalidation
    /// of the old IOVAs), and when the maps fail the old IOVAs are unmapped
    /// all the same (a remap always ends its old mapping, except that one
    /// whose new map is out of the region's bounds unmaps nothing, and is a
    /// caller's bug: `old` must be what a map returned). Until then the same
    /// rules hold as for `unmap_batch_submit`: the driver may read what it
    /// copies out of the buffers, nothing else.
    pub fn remap_batch_submit(
        &self,
        old: &[(u64, usize)],
        bufs: &[(u64, usize, Dir)],
    ) -> Result<(super::fastbatch::UnmapTicket, MapTicket)> {
        self.remap_batch_submit_hinted(old, bufs, RemapHints::default())
    }

    /// [`DmaDomain::remap_batch_submit`] for a refill the driver collects
    /// later (a NIC's RX refill handed back at a later receive): its entries
    /// carry [`iommu_abi::ring::SQE_LAZY`], so with `strict` iommud may hold
    /// their pass, and its invalidation, for up to
    /// [`iommu_abi::ring::LAZY_HOLD_US`] while it serves other work first.
    pub fn remap_batch_submit_lazy(
        &self,
        old: &[(u64, usize)],
        bufs: &[(u64, usize, Dir)],
    ) -> Result<(super::fastbatch::UnmapTicket, MapTicket)> {
        let hints = RemapHints {
            lazy: true,
            keep: false,
        };
        self.remap_batch_submit_hinted(old, bufs, hints)
    }

    /// [`DmaDomain::remap_batch_submit`] with `hints` ([`RemapHints`]).
    pub fn remap_batch_submit_hinted(
        &self,
        old: &[(u64, usize)],
        bufs: &[(u64, usize, Dir)],
        hints: RemapHints,
    ) -> Result<(super::fastbatch::UnmapTicket, MapTicket)> {
        if old.len() != bufs.len() {
            return Err(Error::Invalid(format!(
                "{} unmaps for {} maps in a remap batch",
                old.len(),
                bufs.len()
            )));
        }
        if !self.submits_ahead(bufs.len()) {
            if hints.keep {
                if let Some(r) = self.remap_kept_locally(old, bufs)? {
                    return Ok(r);
                }
            }
            let u = self.unmap_batch_submit(old)?;
            return Ok((u, self.map_batch_submit(bufs)?));
        }
        let ops: Vec<SqOp> = self
            .map_args(bufs)?
            .into_iter()
            .zip(old)
            .map(|(map, &(iova, old_len))| SqOp::Remap {
                old: iova,
                old_len: old_len as u64,
                map,
            })
            .collect();
        let maps = self.submit_maps(&ops, bufs, hints.bits())?;
        Ok((
            super::fastbatch::UnmapTicket {
                wait: super::fastbatch::UnmapWait::Done,
            },
            maps,
        ))
    }

    /// A kept remap of the delegated magazine strategy under `percore` or
    /// `deferred` (docs/ARCHITECTURE.md, "Kept remaps"): a pair whose new
    /// buffer is the memory, and the direction, the old IOVA's entries
    /// already hold keeps that IOVA, no entry written; the other pairs are
    /// unmapped and mapped. `None` where keeping does not apply (another
    /// strategy or policy, no arena, a buffer over the largest size class).
    fn remap_kept_locally(
        &self,
        old: &[(u64, usize)],
        bufs: &[(u64, usize, Dir)],
    ) -> Result<Option<(super::fastbatch::UnmapTicket, MapTicket)>> {
        let Some(arena) = self.arena.as_ref() else {
            return Ok(None);
        };
        if self.strategy() != Strategy::Magazine
            || self.flush_policy() == FlushPolicy::Strict
            || self.rings.is_some()
            || self.page().dead.load(Relaxed) != 0
        {
            return Ok(None);
        }
        // One pass: the IOVA each pair keeps (its old one, at the new buffer's
        // in-page offset), or `None`. A steady RX refill or TX sweep keeps every
        // pair, and then this vector is the answer: nothing else is allocated.
        let mut kept_at: Vec<Option<u64>> = Vec::with_capacity(old.len());
        let mut n_kept = 0;
        for (&(iova, old_len), &(phys, len, dir)) in old.iter().zip(bufs) {
            let k = self.entries_hold(arena, iova, old_len, phys, len, dir);
            n_kept += usize::from(k);
            kept_at.push(k.then(|| iova - iova % PAGE + phys % PAGE));
        }
        if n_kept == 0 {
            return Ok(None);
        }
        if n_kept == old.len() {
            self.stats.kept.fetch_add(n_kept as u64, Relaxed);
            let mut iovas = Vec::with_capacity(old.len());
            iovas.extend(kept_at.iter().flatten());
            return Ok(Some((
                super::fastbatch::UnmapTicket {
                    wait: super::fastbatch::UnmapWait::Done,
                },
                MapTicket::ready(iovas),
            )));
        }
        let kept: Vec<bool> = kept_at.iter().map(Option::is_some).collect();
        let rest_old: Vec<(u64, usize)> = old
            .iter()
            .zip(&kept)
            .filter(|(_, &k)| !k)
            .map(|(o, _)| *o)
            .collect();
        let rest_bufs: Vec<(u64, usize, Dir)> = bufs
            .iter()
            .zip(&kept)
            .filter(|(_, &k)| !k)
            .map(|(b, _)| *b)
            .collect();
        let u = self.unmap_batch_submit(&rest_old)?;
        let mut fresh = if rest_bufs.is_empty() {
            Vec::new()
        } else {
            match self.map_batch(&rest_bufs) {
                Ok(v) => v,
                Err(e) => {
                    // The kept buffers stay mapped at their IOVAs, as a
                    // refused map leaves a remap's old mapping unmapped:
                    // unmap them too, so the batch fails as a whole.
                    let keep_old: Vec<(u64, usize)> = old
                        .iter()
                        .zip(&kept)
                        .filter(|(_, &k)| k)
                        .map(|(o, _)| *o)
                        .collect();
                    let _ = self.unmap_batch(&keep_old);
                    let _ = self.unmap_batch_complete(u);
                    return Err(e);
                }
            }
        }
        .into_iter();
        let iovas = kept_at
            .into_iter()
            .map(|k| match k {
                Some(iova) => Ok(iova),
                None => fresh.next().ok_or(Error::Dead),
            })
            .collect::<Result<Vec<u64>>>()?;
        // Counted once the whole batch stands (a failed rest unmaps them).
        self.stats.kept.fetch_add(n_kept as u64, Relaxed);
        Ok(Some((u, MapTicket::ready(iovas))))
    }

    /// Whether the arena's entries at `iova` (mapped for `old_len` bytes)
    /// already map `len` bytes at `phys` for `dir`: the same in-page offset,
    /// the same pages, each entry exactly the leaf a map would write. Reads
    /// this client's own arena only.
    fn entries_hold(
        &self,
        arena: &Mapping,
        iova: u64,
        old_len: usize,
        phys: u64,
        len: usize,
        dir: Dir,
    ) -> bool {
        let Some((base, pages)) =
            iommu_abi::classes::keep_span(iova, old_len as u64, phys, len as u64)
        else {
            return false;
        };
        let off = phys % PAGE;
        let Ok(first) = self.pte_offset(base) else {
            return false;
        };
        (0..pages).all(|p| {
            // VT-d 3.x §9.8: second-level leaf: address 51:12, W bit 1, R bit 0.
            let want = vtd::entry::SlPte::new(phys - off + p * PAGE, dir.read(), dir.write()).0;
            arena.read_u64(first + 8 * p as usize) == Some(want)
        })
    }

    /// The IOVAs of a [`DmaDomain::map_batch_submit`], all or nothing (a
    /// partly refused batch is unmapped again and reported).
    pub fn map_batch_complete(&self, t: MapTicket) -> Result<Vec<u64>> {
        let (ring, first, lens) = match t.inner {
            Ticket::Ready(v) => return Ok(v),
            Ticket::Ring { ring, first, lens } => (ring, first, lens),
        };
        let results = self.ring_collect(ring, first, lens.len() as u32)?;
        self.all_or_nothing(results, &lens)
    }

    /// True if [`DmaDomain::map_batch_complete`] of `t` would not wait for
    /// iommud: every completion of the batch is posted (or it was mapped at
    /// once). Never blocks; a driver polls it to hand buffers to its device
    /// only once their IOVAs are there, doing other work meanwhile.
    pub fn map_batch_ready(&self, t: &MapTicket) -> bool {
        match &t.inner {
            Ticket::Ready(_) => true,
            Ticket::Ring { ring, first, lens } => {
                self.ring_posted(*ring, *first, lens.len() as u32)
            }
        }
    }

    /// The results of `n` awaited entries from sequence `first` on ring
    /// `ring` (a [`MapTicket`] or an unmap ticket), waiting for them.
    pub(super) fn ring_collect(
        &self,
        ring: usize,
        first: u32,
        n: u32,
    ) -> Result<Vec<std::result::Result<u64, ErrorCode>>> {
        let rings = self.rings.as_ref().ok_or(Error::Dead)?;
        let slot = rings.slots.get(ring).ok_or(Error::Dead)?;
        let shm = rings.ring(ring);
        let mut c = slot.lock();
        let end = first.wrapping_add(n);
        if end.wrapping_sub(c.head) <= RING_ENTRIES && c.head != end {
            // Not all consumed yet: consume up to the batch's end.
            let r = self.reap(rings, shm, &mut c, end, None);
            if let Err(e) = r {
                c.awaited.retain(|&(f, _)| f != first);
                return Err(e);
            }
        }
        c.awaited.retain(|&(f, _)| f != first);
        Ok((0..n)
            .map(|k| {
                c.stash
                    .remove(first.wrapping_add(k))
                    .unwrap_or(Err(ErrorCode::Hardware))
            })
            .collect())
    }

    /// True if the `n` completions from sequence `first` on ring `ring`
    /// are posted: collecting them would not wait. (With no rings, or a
    /// ring that is not this domain's, collecting fails at once: true.)
    pub(super) fn ring_posted(&self, ring: usize, first: u32, n: u32) -> bool {
        let Some(rings) = self.rings.as_ref() else {
            return true;
        };
        if ring >= rings.slots.len() {
            return true;
        }
        // Sequence numbers wrap: the tail is past the batch's end when it is
        // at least `n`, and less than half the space, ahead of `first`.
        let ahead = rings.ring(ring).cq_tail.0.load(Acquire).wrapping_sub(first);
        ahead >= n && ahead < 1 << 31
    }

    /// Submits unmaps for [`DmaDomain::unmap_batch_submit`]: with `strict`
    /// their completions (which follow the invalidation) are awaited later;
    /// otherwise nobody waits for them, as in [`DmaDomain::unmap_batch`].
    pub(super) fn ring_unmap_submit(
        &self,
        maps: &[(u64, usize)],
        strict: bool,
    ) -> Result<super::fastbatch::UnmapWait> {
        use super::fastbatch::UnmapWait;
        if !strict {
            self.ring_unmap_nowait(maps)?;
            return Ok(UnmapWait::Done);
        }
        if maps.len() > CHUNK {
            self.ring_unmap(maps)?;
            return Ok(UnmapWait::Done);
        }
        let (ring, first) = self.submit_on(&unmap_ops(maps), true, 0)?;
        Ok(UnmapWait::Ring {
            ring,
            first,
            n: maps.len() as u32,
        })
    }

    /// Submits `ops` (at most [`CHUNK`]) on this CPU slot's ring without
    /// waiting; with `awaited`, their completions are kept for a later
    /// collector. Returns the ring and the first sequence number.
    fn submit_on(&self, ops: &[SqOp], awaited: bool, hints: u64) -> Result<(usize, u32)> {
        let rings = self.rings.as_ref().ok_or(Error::Dead)?;
        let k = crate::ring::ring_of_cpu(self.slot(), rings.slots.len());
        let ring = rings.ring(k);
        let mut c = rings.slots[k].lock();
        let n = ops.len() as u32;
        while c.tail.wrapping_sub(c.head) + n > RING_ENTRIES {
            let target = c.tail.wrapping_sub(RING_ENTRIES - n);
            self.reap(rings, ring, &mut c, target, None)?;
        }
        let first = c.tail;
        if awaited {
            c.awaited.push((first, n));
        }
        self.publish(rings, ring, &mut c, ops, hints);
        Ok((k, first))
    }

    /// Writes `ops` at the tail (each with the hint bits `hints`,
    /// [`iommu_abi::ring::SQE_HINTS`]), publishes it, and rings the doorbell if the service thread
    /// sleeps.
    fn publish(
        &self,
        rings: &ClientRings,
        ring: &RingShm,
        c: &mut RingClient,
        ops: &[SqOp],
        hints: u64,
    ) {
        let first = c.tail;
        for (j, op) in ops.iter().enumerate() {
            let seq = first.wrapping_add(j as u32);
            let w = Sqe {
                op: *op,
                user: u64::from(seq),
            }
            .encode_hinted(hints);
            let slot = &ring.sq[(seq % RING_ENTRIES) as usize];
            for (x, v) in w.iter().enumerate() {
                slot[x].store(*v, Relaxed);
            }
        }
        c.tail = first.wrapping_add(ops.len() as u32);
        ring.sq_tail.0.store(c.tail, Release);
        // Dekker with the service threads: our tail before their `ring_awake`.
        std::sync::atomic::fence(SeqCst);
        if self.page().ring_awake.load(SeqCst) == 0 {
            self.stats.wakeups.fetch_add(1, Relaxed);
            rings.ring_doorbell();
        }
    }

    /// Submits `ops` on this CPU slot's ring; with `wait`, returns each
    /// entry's result (else an empty list once all are submitted).
    fn submit(&self, ops: &[SqOp], wait: bool) -> Result<Vec<std::result::Result<u64, ErrorCode>>> {
        let rings = self.rings.as_ref().ok_or(Error::Dead)?;
        let k = crate::ring::ring_of_cpu(self.slot(), rings.slots.len());
        let ring = rings.ring(k);
        let mut c = rings.slots[k].lock();
        let mut out = Vec::with_capacity(if wait { ops.len() } else { 0 });
        for chunk in ops.chunks(CHUNK) {
            let n = chunk.len() as u32;
            // Room for the chunk and its completions: consume older ones first.
            while c.tail.wrapping_sub(c.head) + n > RING_ENTRIES {
                let target = c.tail.wrapping_sub(RING_ENTRIES - n);
                self.reap(rings, ring, &mut c, target, None)?;
            }
            let first = c.tail;
            self.publish(rings, ring, &mut c, chunk, 0);
            if wait {
                let target = c.tail;
                self.reap(rings, ring, &mut c, target, Some((first, &mut out)))?;
            }
        }
        Ok(out)
    }

    /// Waits until every entry submitted on every ring has completed.
    pub(super) fn ring_drain(&self) -> Result<()> {
        let Some(rings) = self.rings.as_ref() else {
            return Ok(());
        };
        for k in 0..rings.slots.len() {
            let mut c = rings.slots[k].lock();
            let target = c.tail;
            self.reap(rings, rings.ring(k), &mut c, target, None)?;
        }
        Ok(())
    }

    /// Consumes completions until `head` reaches `target`; those of
    /// `collect.0..` go to `collect.1`, older ones (unmaps nobody waited
    /// for) only count their errors.
    fn reap(
        &self,
        rings: &ClientRings,
        ring: &RingShm,
        c: &mut RingClient,
        target: u32,
        mut collect: Option<(u32, &mut Vec<std::result::Result<u64, ErrorCode>>)>,
    ) -> Result<()> {
        let mut start = Instant::now();
        let mut probe = start + PROBE_AFTER;
        let mut looks = 0u32;
        // A waiter on the CPU of the ring's home service thread yields at
        // once: spinning there only delays the thread that completes it.
        let spin = if on_server_cpu(ring) { 0 } else { SPIN_LOOKS };
        while c.head != target {
            let avail = ring.cq_tail.0.load(Acquire);
            if avail == c.head {
                looks = looks.saturating_add(1);
                if looks < spin {
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                    if looks.is_multiple_of(1024) {
                        if self.page().dead.load(Relaxed) != 0 {
                            self.reattach_if_adopted()?;
                        }
                        if self.page().ring_awake.load(SeqCst) == 0 {
                            rings.ring_doorbell();
                        }
                        // Nothing served for a while: is iommud still there? A
                        // broken connection reattaches (to a restarted iommud that
                        // adopted these rings), and the wait starts over.
                        if Instant::now() > probe {
                            let before = self.reattaches();
                            self.probe()?;
                            if self.reattaches() != before {
                                rings.ring_doorbell();
                                start = Instant::now();
                            }
                            probe = Instant::now() + PROBE_AFTER;
                        }
                        if start.elapsed() > WAIT_LIMIT {
                            return Err(Error::Io(std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                "iommud did not serve the ring",
                            )));
                        }
                    }
                }
                continue;
            }
            while c.head != avail && c.head != target {
                let slot = &ring.cq[(c.head % RING_ENTRIES) as usize];
                let w: [u64; CQE_WORDS] = std::array::from_fn(|x| slot[x].load(Relaxed));
                let cqe = Cqe::decode(&w);
                let seq = c.head;
                match &mut collect {
                    Some((first, out)) if seq.wrapping_sub(*first) < RING_ENTRIES => {
                        out.push(cqe.result)
                    }
                    _ if c.awaited.iter().any(|&(f, n)| seq.wrapping_sub(f) < n) => {
                        c.stash.insert(seq, cqe.result);
                    }
                    _ => {
                        if cqe.result.is_err() {
                            self.stats.ring_errors.fetch_add(1, Relaxed);
                        }
                    }
                }
                c.head = c.head.wrapping_add(1);
            }
            ring.cq_head.0.store(c.head, Release);
        }
        Ok(())
    }
}

/// Whether the calling thread runs on the CPU iommud pinned the ring's
/// home service thread to (`RingShm::server_cpu`, advice iommud writes).
fn on_server_cpu(ring: &RingShm) -> bool {
    let server = ring.server_cpu.0.load(Relaxed);
    server != 0
        && super::fastpath::current_cpu().is_some_and(|c| u32::try_from(c + 1) == Ok(server))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stash_keeps_every_completion_until_its_owner_takes_it() {
        let mut s = Stash::default();
        s.insert(5, Ok(0x1000));
        // A ring's worth later the same slot: kept apart, not overwritten.
        s.insert(5 + RING_ENTRIES, Ok(0x2000));
        s.insert(6, Err(ErrorCode::NotOwner));
        assert_eq!(s.overflow.len(), 1);
        assert_eq!(s.remove(5 + RING_ENTRIES), Some(Ok(0x2000)));
        assert_eq!(s.remove(5), Some(Ok(0x1000)));
        assert_eq!(s.remove(5), None, "taken once");
        assert_eq!(s.remove(6), Some(Err(ErrorCode::NotOwner)));
        // A sequence number never stashed, in an empty and in a taken slot.
        assert_eq!(s.remove(7), None);
        assert_eq!(s.remove(6 + RING_ENTRIES), None);
        // Sequence numbers wrap around u32.
        s.insert(u32::MAX, Ok(1));
        s.insert(0, Ok(2));
        assert_eq!(
            (s.remove(0), s.remove(u32::MAX)),
            (Some(Ok(2)), Some(Ok(1)))
        );
    }
}
