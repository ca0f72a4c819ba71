//! Per-CPU IOVA magazines with epoch-tagged dirty batches.
//!
//! This is the client half of the research's magazine design, adapted to a
//! split where only iommud can invalidate the IOTLB:
//!
//! * a map pops an IOVA from the CPU's `loaded` magazine of [`Clean`] IOVAs;
//! * an unmap (after the caller cleared the leaf entries and read the epoch)
//!   pushes the IOVA into the CPU's open dirty batch; a full batch is closed
//!   into a [`Dirty`] magazine tagged with the epoch and queued as `pending`,
//!   and the backend is asked (one-way) to invalidate up to that epoch;
//! * when `loaded` runs dry, the oldest pending batch whose tag iommud has
//!   completed becomes the new `loaded` — no IPC; only if none has completed
//!   does the CPU exchange with iommud's depot (one round trip per
//!   [`MAG_SIZE`] maps), and with [`MAX_PENDING`] batches already waiting it
//!   waits for the oldest instead of growing its working set.
//!
//! Where Linux keeps `loaded` + `prev` so balanced alloc/free never touches
//! the depot, we keep `loaded` + the pending queue: a freed IOVA cannot go
//! straight back into `loaded` because its IOTLB entry may still be live.
//!
//! The only ways to obtain a [`Clean`] magazine are from the depot (iommud
//! vouches for it) and [`Dirty::try_clean`] with a completed epoch at least
//! the batch's tag, so "no IOVA is reused before its invalidation completed"
//! is a property of the types, not of the call sites.

use std::collections::VecDeque;

pub use iommu_abi::classes::{
    class_pages, size_class, FLUSH_QUEUE_LEN, FLUSH_QUEUE_TIMEOUT_NS, MAG_SIZE, SIZE_CLASSES,
};
/// Closed dirty batches a CPU lets wait before it blocks on the oldest (for
/// the smallest size class; see [`max_pending`]).
pub const MAX_PENDING: usize = 32;
/// Batches waiting for an invalidation at which a CPU wakes iommud with a
/// one-way hint (for the smallest size class; see [`hint_pending`]); below
/// it, the CPU only raises `wanted` and leaves the flush to iommud's epoch
/// timer. One wake-up (and one invalidation) then covers several batches,
/// while [`MAX_PENDING`] leaves room to absorb the wait.
pub const HINT_PENDING: usize = 8;
/// IOVA pages one CPU may hold in waiting batches of one size class: the
/// pending limits shrink for larger classes so that a CPU cannot hoard the
/// domain's IOVA space (32 MiB of it per class here, of 1 GiB).
pub const PENDING_PAGES: u64 = 8192;
/// The client-side bound on the stale window: a CPU whose open batch, or a
/// sealed batch still waiting for its invalidation, holds an unmap this old
/// (ns) forces the flush on its next unmap, or next map that is not served
/// from the loaded magazine (seals the open batch, raises `wanted`, hints),
/// so the window stays bounded even when iommud's timer runs late. The same
/// 10 ms as iommud's timer.
pub const BATCH_AGE_LIMIT_NS: u64 = FLUSH_QUEUE_TIMEOUT_NS;
/// After forcing a flush, the CPU looks again this much later (ns) if the
/// batch is still waiting, so a late iommud gets a hint per millisecond at
/// most, not one per operation.
pub const FORCE_RETRY_NS: u64 = 1_000_000;

/// Waiting batches of `class` at which a CPU blocks on the oldest.
pub fn max_pending(class: usize) -> usize {
    let by_pages = PENDING_PAGES / (MAG_SIZE as u64 * class_pages(class));
    (by_pages as usize).clamp(2, MAX_PENDING)
}

/// Waiting batches of `class` at which a CPU wakes iommud.
pub fn hint_pending(class: usize) -> usize {
    (max_pending(class) / 4).clamp(1, HINT_PENDING)
}
/// A magazine of IOVAs whose previous mappings are known to be invalidated.
#[derive(Debug, Default)]
pub struct Clean(Vec<u64>);

impl Clean {
    /// IOVAs the depot handed out. Only the transport that received them from
    /// iommud calls this: iommud hands out only IOVAs no IOTLB can hold.
    pub fn from_depot(iovas: Vec<u64>) -> Clean {
        Clean(iovas)
    }
    /// Number of IOVAs.
    pub fn len(&self) -> usize {
        self.0.len()
    }
    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// The IOVAs, to give back to the depot.
    pub fn into_vec(self) -> Vec<u64> {
        self.0
    }
}

/// A closed batch of unmapped IOVAs waiting for the invalidation of `tag`.
#[derive(Debug)]
pub struct Dirty {
    iovas: Vec<u64>,
    tag: u64,
    /// Time of the batch's first unmap ([`Backend::now`]; 0 = unknown).
    since: u64,
}

impl Dirty {
    /// The epoch whose completed invalidation makes this batch clean.
    pub fn tag(&self) -> u64 {
        self.tag
    }
    /// Becomes [`Clean`] if `completed` covers the tag.
    pub fn try_clean(self, completed: u64) -> Result<Clean, Dirty> {
        if completed >= self.tag {
            Ok(Clean(self.iovas))
        } else {
            Err(self)
        }
    }
}

/// What a CPU cache needs from the rest of the client.
pub trait Backend {
    /// Error of the slow paths.
    type Error;
    /// The domain's completed epoch (a shared-memory read).
    fn completed(&self) -> u64;
    /// Asks iommud (one-way) to invalidate up to `tag`.
    fn request_flush(&self, tag: u64);
    /// Records that `tag` must be invalidated, without waking iommud (its
    /// epoch timer will).
    fn want(&self, tag: u64);
    /// The epoch read after a full fence: a tag covering every entry cleared
    /// before the call (a batch is sealed with it when it closes).
    fn seal(&self) -> u64;
    /// Blocks until `completed() >= tag` (a round trip).
    fn wait_completed(&self, tag: u64) -> Result<(), Self::Error>;
    /// Gives `give` (clean IOVAs of `class`) to the depot and takes up to `want`.
    fn exchange(&self, class: usize, give: Clean, want: usize) -> Result<Clean, Self::Error>;
    /// The error for "no IOVA anywhere": depot dry and nothing pending here.
    fn exhausted(&self) -> Self::Error;
    /// Nanoseconds on the domain's clock (never 0), for
    /// [`BATCH_AGE_LIMIT_NS`]; a backend without a clock returns 0, which
    /// turns the client-side bound off.
    fn now(&self) -> u64 {
        0
    }
}

/// What happened on an allocation, for the counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllocEvent {
    /// Served from `loaded` without refilling.
    pub hit: bool,
    /// A completed dirty batch was recycled.
    pub recycled: bool,
    /// A depot exchange (round trip) was made.
    pub exchanged: bool,
    /// Waited for an invalidation (round trip).
    pub waited: bool,
}

#[derive(Debug, Default)]
struct ClassCache {
    loaded: Clean,
    open: Vec<u64>,
    open_tag: u64,
    /// Time of the open batch's first unmap (0 = empty or no clock).
    open_since: u64,
    pending: VecDeque<Dirty>,
}

/// The magazines of one CPU slot, one set per size class.
#[derive(Debug, Default)]
pub struct CpuCache {
    classes: [ClassCache; SIZE_CLASSES],
    /// When something here may reach [`BATCH_AGE_LIMIT_NS`] (0: nothing
    /// waits); may be early (a batch completed meanwhile), never late.
    deadline: u64,
    /// Flushes forced by the age bound (for tests and stats).
    forced: u64,
}

impl CpuCache {
    /// Takes an IOVA of `class`.
    pub fn alloc<B: Backend>(
        &mut self,
        class: usize,
        b: &B,
    ) -> Result<(u64, AllocEvent), B::Error> {
        let mut ev = AllocEvent::default();
        let c = &mut self.classes[class];
        loop {
            if let Some(iova) = c.loaded.0.pop() {
                ev.hit = !(ev.recycled || ev.exchanged || ev.waited);
                return Ok((iova, ev));
            }
            let completed = b.completed();
            if let Some(front) = c.pending.pop_front() {
                match front.try_clean(completed) {
                    Ok(clean) => {
                        c.loaded = clean;
                        ev.recycled = true;
                        continue;
                    }
                    Err(front) => {
                        let tag = front.tag;
                        c.pending.push_front(front);
                        if c.pending.len() >= max_pending(class) {
                            b.wait_completed(tag)?;
                            ev.waited = true;
                            continue;
                        }
                    }
                }
            }
            let got = b.exchange(class, Clean::default(), MAG_SIZE)?;
            ev.exchanged = true;
            if got.is_empty() {
                // The depot is dry; our own dirty IOVAs are the only source left.
                if let Some(tag) = c.pending.front().map(|d| d.tag) {
                    b.wait_completed(tag)?;
                    ev.waited = true;
                    continue;
                }
                if !c.open.is_empty() {
                    Self::close(class, c, b);
                    continue;
                }
                return Err(b.exhausted());
            }
            c.loaded = got;
        }
    }

    /// Returns an unmapped IOVA of `class`, tagged with the epoch the caller
    /// read after clearing its leaf entries — or with 0, to be covered by the
    /// tag the batch is sealed with when it closes ([`Backend::seal`]).
    pub fn free<B: Backend>(&mut self, class: usize, iova: u64, tag: u64, b: &B) {
        let c = &mut self.classes[class];
        if c.open.is_empty() {
            // One clock read per batch, for the client-side age bound.
            c.open_since = b.now();
            if c.open_since != 0 {
                let d = c.open_since.saturating_add(BATCH_AGE_LIMIT_NS);
                if self.deadline == 0 || d < self.deadline {
                    self.deadline = d;
                }
            }
        }
        c.open.push(iova);
        c.open_tag = c.open_tag.max(tag);
        if c.open.len() >= MAG_SIZE {
            Self::close(class, c, b);
        }
    }

    fn close<B: Backend>(class: usize, c: &mut ClassCache, b: &B) {
        let batch = Dirty {
            iovas: std::mem::replace(&mut c.open, Vec::with_capacity(MAG_SIZE)),
            tag: c.open_tag.max(b.seal()),
            since: c.open_since,
        };
        c.open_tag = 0;
        c.open_since = 0;
        let completed = b.completed();
        let waiting = 1 + c
            .pending
            .iter()
            .rev()
            .take_while(|d| d.tag > completed)
            .count();
        if waiting >= hint_pending(class) {
            b.request_flush(batch.tag);
        } else {
            b.want(batch.tag);
        }
        c.pending.push_back(batch);
    }

    /// The client-side bound on the stale window, run on every map and
    /// unmap (under the slot lock): if this CPU's open batch, or a sealed
    /// batch whose invalidation has not completed, holds an unmap
    /// [`BATCH_AGE_LIMIT_NS`] old, seal the open batch and ask iommud for
    /// the flush with a hint. Costs one clock read while anything waits.
    pub fn enforce_age<B: Backend>(&mut self, b: &B) {
        if self.deadline == 0 {
            return;
        }
        self.enforce_age_at(b, b.now());
    }

    /// [`CpuCache::enforce_age`] against a time the caller already has (the
    /// unmap path's latest clock sample, at most `TIME_SAMPLE` unmaps old:
    /// no clock read per unmap). A stale `now` only makes the check later;
    /// iommud's timer still bounds the window.
    pub fn enforce_age_at<B: Backend>(&mut self, b: &B, now: u64) {
        if self.deadline == 0 || now == 0 {
            return;
        }
        if now < self.deadline {
            return;
        }
        let completed = b.completed();
        let limit = now.saturating_sub(BATCH_AGE_LIMIT_NS);
        let mut force = 0u64;
        let mut next = 0u64;
        let mut earliest = |t: u64| {
            if t != 0 {
                let d = t.saturating_add(BATCH_AGE_LIMIT_NS);
                if next == 0 || d < next {
                    next = d;
                }
            }
        };
        for class in 0..SIZE_CLASSES {
            let c = &mut self.classes[class];
            if !c.open.is_empty() && c.open_since != 0 && c.open_since <= limit {
                let batch = Dirty {
                    iovas: std::mem::replace(&mut c.open, Vec::with_capacity(MAG_SIZE)),
                    tag: c.open_tag.max(b.seal()),
                    since: c.open_since,
                };
                c.open_tag = 0;
                c.open_since = 0;
                c.pending.push_back(batch);
            }
            if !c.open.is_empty() {
                earliest(c.open_since);
            }
            for d in c.pending.iter().filter(|d| d.tag > completed) {
                if d.since != 0 && d.since <= limit {
                    force = force.max(d.tag);
                } else {
                    earliest(d.since);
                }
            }
        }
        if force != 0 {
            self.forced += 1;
            b.request_flush(force);
            let retry = now.saturating_add(FORCE_RETRY_NS);
            next = if next == 0 { retry } else { next.min(retry) };
        }
        self.deadline = next;
    }

    /// Flushes the age bound forced on this CPU.
    pub fn forced(&self) -> u64 {
        self.forced
    }

    /// Takes over a closed batch (from the deferred policy's [`FlushQueue`]):
    /// it joins this CPU's pending queue and is recycled once clean.
    pub fn adopt(&mut self, class: usize, batch: Dirty) {
        if batch.since != 0 {
            let d = batch.since.saturating_add(BATCH_AGE_LIMIT_NS);
            if self.deadline == 0 || d < self.deadline {
                self.deadline = d;
            }
        }
        self.classes[class].pending.push_back(batch);
    }

    /// Empties the cache for shutdown: waits for every dirty IOVA's
    /// invalidation and gives all IOVAs back to the depot.
    pub fn drain<B: Backend>(&mut self, b: &B) -> Result<usize, B::Error> {
        let mut returned = 0;
        for class in 0..SIZE_CLASSES {
            let c = &mut self.classes[class];
            if !c.open.is_empty() {
                Self::close(class, c, b);
            }
            let mut all = std::mem::take(&mut c.loaded).into_vec();
            while let Some(d) = c.pending.pop_front() {
                let d = match d.try_clean(b.completed()) {
                    Ok(clean) => clean,
                    Err(d) => {
                        b.wait_completed(d.tag)?;
                        match d.try_clean(b.completed()) {
                            Ok(clean) => clean,
                            Err(d) => {
                                c.pending.push_front(d);
                                continue;
                            }
                        }
                    }
                };
                all.extend(d.into_vec());
            }
            returned += all.len();
            for chunk in all.chunks(crate::shared::EXCHANGE_SLOTS) {
                b.exchange(class, Clean(chunk.to_vec()), 0)?;
            }
        }
        Ok(returned)
    }

    /// IOVAs held (clean, open, pending) per class, for tests and stats.
    pub fn held(&self) -> usize {
        self.classes
            .iter()
            .map(|c| {
                c.loaded.len()
                    + c.open.len()
                    + c.pending.iter().map(|d| d.iovas.len()).sum::<usize>()
            })
            .sum()
    }
}

/// The deferred flush policy's domain-wide queue of unmapped IOVAs (one per
/// domain, behind one lock: Linux's flush queue, not a per-CPU one). It is
/// closed when it holds [`FLUSH_QUEUE_LEN`] entries or its oldest is
/// [`FLUSH_QUEUE_TIMEOUT_NS`] old (the closer asks for a flush; iommud's
/// timer does the same for a queue nobody pushes to), or when an
/// invalidation already covers all of it;
/// closing turns it into [`Dirty`] batches of at most [`MAG_SIZE`] IOVAs,
/// each tagged with the newest epoch in the queue.
#[derive(Debug, Default)]
pub struct FlushQueue {
    entries: Vec<(usize, u64)>,
    tag: u64,
    oldest: u64,
}

impl FlushQueue {
    /// Adds an unmapped IOVA of `class`, tagged with the epoch read after
    /// its entries were cleared, at time `now` (ns, any monotonic clock).
    /// Returns true when the queue must be flushed: full, or its oldest
    /// entry is [`FLUSH_QUEUE_TIMEOUT_NS`] old.
    pub fn push(&mut self, class: usize, iova: u64, tag: u64, now: u64) -> bool {
        if self.entries.is_empty() {
            self.oldest = now;
        }
        self.entries.push((class, iova));
        self.tag = self.tag.max(tag);
        self.entries.len() >= FLUSH_QUEUE_LEN
            || now.saturating_sub(self.oldest) >= FLUSH_QUEUE_TIMEOUT_NS
    }
    /// The epoch whose completed invalidation covers every entry.
    pub fn tag(&self) -> u64 {
        self.tag
    }
    /// Entries queued.
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    /// Empties the queue into dirty batches `(class, batch)`.
    pub fn close(&mut self) -> Vec<(usize, Dirty)> {
        let mut by_class: [Vec<u64>; SIZE_CLASSES] = Default::default();
        for (class, iova) in self.entries.drain(..) {
            by_class[class].push(iova);
        }
        let tag = self.tag;
        let mut out = Vec::new();
        for (class, iovas) in by_class.into_iter().enumerate() {
            for chunk in iovas.chunks(MAG_SIZE) {
                out.push((
                    class,
                    Dirty {
                        iovas: chunk.to_vec(),
                        tag,
                        since: self.oldest,
                    },
                ));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::cell::RefCell;
    use std::collections::{BTreeMap, BTreeSet};

    /// A fake iommud: a depot with a finite pool, an epoch counter, and a log
    /// of when each IOVA was unmapped (with its tag) to check reuse safety.
    struct Fake {
        depot: RefCell<Vec<u64>>,
        epoch: RefCell<u64>,
        completed: RefCell<u64>,
        exchanges: RefCell<u64>,
        waits: RefCell<u64>,
        hints: RefCell<u64>,
        /// The domain clock (0: none, the age bound is off).
        clock: RefCell<u64>,
        /// The highest tag asked for by a hint.
        hinted: RefCell<u64>,
    }

    impl Fake {
        fn new(n: u64) -> Fake {
            Fake {
                depot: RefCell::new((0..n).map(|i| i << 12).collect()),
                epoch: RefCell::new(1),
                completed: RefCell::new(0),
                exchanges: RefCell::new(0),
                waits: RefCell::new(0),
                hints: RefCell::new(0),
                clock: RefCell::new(0),
                hinted: RefCell::new(0),
            }
        }
        /// An invalidation: starts at the current epoch, completes it.
        fn flush(&self) {
            let e = *self.epoch.borrow();
            *self.epoch.borrow_mut() = e + 1;
            *self.completed.borrow_mut() = e;
        }
    }

    impl Backend for Fake {
        type Error = ();
        fn completed(&self) -> u64 {
            *self.completed.borrow()
        }
        fn request_flush(&self, tag: u64) {
            *self.hints.borrow_mut() += 1;
            let mut h = self.hinted.borrow_mut();
            *h = (*h).max(tag);
        }
        fn now(&self) -> u64 {
            *self.clock.borrow()
        }
        fn want(&self, _tag: u64) {}
        fn seal(&self) -> u64 {
            *self.epoch.borrow()
        }
        fn wait_completed(&self, tag: u64) -> Result<(), ()> {
            *self.waits.borrow_mut() += 1;
            while self.completed() < tag {
                self.flush();
            }
            Ok(())
        }
        fn exchange(&self, _class: usize, give: Clean, want: usize) -> Result<Clean, ()> {
            *self.exchanges.borrow_mut() += 1;
            let mut d = self.depot.borrow_mut();
            d.extend(give.into_vec());
            let n = want.min(d.len());
            let at = d.len() - n;
            Ok(Clean(d.split_off(at)))
        }
        fn exhausted(&self) {}
    }

    #[test]
    fn balanced_traffic_recycles_batches_without_exchanges() {
        let f = Fake::new(10_000);
        let mut cpu = CpuCache::default();
        for i in 0..10_000u64 {
            let (iova, _) = cpu.alloc(0, &f).unwrap();
            let tag = *f.epoch.borrow();
            cpu.free(0, iova, tag, &f);
            if i % 64 == 0 {
                f.flush(); // iommud keeps up with the hints
            }
        }
        // One exchange to start, then completed batches refill `loaded`.
        assert!(
            *f.exchanges.borrow() <= 3,
            "exchanges {}",
            f.exchanges.borrow()
        );
        assert_eq!(*f.waits.borrow(), 0);
        // iommud's timer keeps up: no batch ever waits long enough to wake it.
        assert_eq!(*f.hints.borrow(), 0);
    }

    #[test]
    fn a_slow_iommud_is_woken_once_per_hint_pending_batches() {
        let f = Fake::new(100_000);
        let mut cpu = CpuCache::default();
        let mut seen = 0;
        for _ in 0..MAG_SIZE * 40 {
            let (iova, _) = cpu.alloc(0, &f).unwrap();
            let tag = *f.epoch.borrow();
            cpu.free(0, iova, tag, &f);
            // This iommud flushes only when woken.
            if *f.hints.borrow() > seen {
                seen = *f.hints.borrow();
                f.flush();
            }
        }
        assert_eq!(
            seen,
            40 / HINT_PENDING as u64,
            "one wake-up per {HINT_PENDING} batches"
        );
        assert_eq!(*f.waits.borrow(), 0);
    }

    #[test]
    fn an_old_open_or_sealed_batch_forces_its_flush_on_the_next_operation() {
        let f = Fake::new(4 * MAG_SIZE as u64);
        *f.clock.borrow_mut() = 1_000;
        let mut cpu = CpuCache::default();
        let (iova, _) = cpu.alloc(0, &f).unwrap();
        cpu.free(0, iova, 0, &f);
        // 9.9 ms later: nothing forced, the open batch stays open.
        *f.clock.borrow_mut() = 1_000 + BATCH_AGE_LIMIT_NS - 100_000;
        cpu.enforce_age(&f);
        assert_eq!((*f.hints.borrow(), cpu.forced()), (0, 0));
        assert_eq!(cpu.classes[0].open.len(), 1);
        // At 10 ms: sealed with the current epoch and hinted for it.
        *f.clock.borrow_mut() = 1_000 + BATCH_AGE_LIMIT_NS;
        cpu.enforce_age(&f);
        assert_eq!((*f.hints.borrow(), cpu.forced()), (1, 1));
        assert!(cpu.classes[0].open.is_empty());
        assert_eq!(cpu.classes[0].pending.len(), 1);
        assert_eq!(*f.hinted.borrow(), *f.epoch.borrow());
        // iommud still late: the next hint comes a retry period later, not per operation.
        *f.clock.borrow_mut() += FORCE_RETRY_NS / 2;
        cpu.enforce_age(&f);
        assert_eq!(*f.hints.borrow(), 1);
        *f.clock.borrow_mut() += FORCE_RETRY_NS / 2;
        cpu.enforce_age(&f);
        assert_eq!(*f.hints.borrow(), 2);
        // Flushed: nothing waits any more, no hint however late.
        f.flush();
        *f.clock.borrow_mut() += 10 * BATCH_AGE_LIMIT_NS;
        cpu.enforce_age(&f);
        assert_eq!(*f.hints.borrow(), 2);
        assert_eq!(cpu.deadline, 0);
    }

    #[test]
    fn without_a_clock_the_age_bound_is_off() {
        let f = Fake::new(MAG_SIZE as u64);
        let mut cpu = CpuCache::default();
        let (iova, _) = cpu.alloc(0, &f).unwrap();
        cpu.free(0, iova, 0, &f);
        cpu.enforce_age(&f);
        assert_eq!((*f.hints.borrow(), cpu.classes[0].open.len()), (0, 1));
    }

    #[test]
    fn a_dirty_batch_is_not_reused_before_its_epoch_completes() {
        let f = Fake::new(MAG_SIZE as u64); // exactly one magazine in the system
        let mut cpu = CpuCache::default();
        let mut first = BTreeSet::new();
        for _ in 0..MAG_SIZE {
            first.insert(cpu.alloc(0, &f).unwrap().0);
        }
        for &iova in &first {
            cpu.free(0, iova, *f.epoch.borrow(), &f);
        }
        // Nothing completed: the next alloc must wait for the invalidation.
        assert_eq!(*f.completed.borrow(), 0);
        let (iova, ev) = cpu.alloc(0, &f).unwrap();
        assert!(first.contains(&iova));
        assert!(ev.waited || *f.waits.borrow() > 0);
        assert!(*f.completed.borrow() >= 1);
    }

    #[test]
    fn the_flush_queue_closes_into_batches_tagged_with_its_newest_epoch() {
        let mut q = FlushQueue::default();
        for i in 0..FLUSH_QUEUE_LEN as u64 - 1 {
            assert!(!q.push((i % 2) as usize, i << 12, 1 + i / 100, 5 + i));
        }
        assert!(q.push(0, 0xfff000, 2, 400), "256th entry fills it");
        assert_eq!(q.tag(), 3);
        let batches = q.close();
        assert!(q.is_empty());
        assert_eq!(
            batches.iter().map(|(_, d)| d.iovas.len()).sum::<usize>(),
            256
        );
        assert!(batches
            .iter()
            .all(|(_, d)| d.tag == 3 && d.iovas.len() <= MAG_SIZE));
        let (class, d) = batches.into_iter().next().unwrap();
        assert_eq!(class, 0);
        let d = d.try_clean(2).unwrap_err();
        assert_eq!(d.try_clean(3).unwrap().len(), MAG_SIZE);
        assert!(!q.push(1, 0x1000, 4, 1_000));
        assert!(
            q.push(1, 0x2000, 4, 1_000 + FLUSH_QUEUE_TIMEOUT_NS),
            "10 ms after its oldest"
        );
    }

    #[derive(Debug, Clone)]
    enum Step {
        Alloc(usize),
        Free(usize, usize),
        Flush,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (0usize..3).prop_map(Step::Alloc),
            4 => (0usize..3, any::<usize>()).prop_map(|(c, i)| Step::Free(c, i)),
            1 => Just(Step::Flush),
        ]
    }

    proptest! {
        /// Three CPUs share a depot: no IOVA is held twice, none is reused
        /// before the epoch it was freed under completed, none is lost.
        #[test]
        fn magazines_never_duplicate_lose_or_reuse_early(steps in proptest::collection::vec(step(), 1..3000)) {
            let total = 3 * MAG_SIZE as u64 + 17;
            let f = Fake::new(total);
            let mut cpus: Vec<CpuCache> = (0..3).map(|_| CpuCache::default()).collect();
            let mut mapped: Vec<Vec<u64>> = vec![Vec::new(); 3];
            let mut owner: BTreeSet<u64> = BTreeSet::new();
            let mut freed_tag: BTreeMap<u64, u64> = BTreeMap::new();
            for s in steps {
                match s {
                    Step::Alloc(c) => {
                        let (iova, _) = cpus[c].alloc(0, &f).unwrap();
                        prop_assert!(owner.insert(iova), "iova {:#x} handed out twice", iova);
                        if let Some(tag) = freed_tag.remove(&iova) {
                            prop_assert!(*f.completed.borrow() >= tag, "reused before epoch {} completed", tag);
                        }
                        mapped[c].push(iova);
                    }
                    Step::Free(c, i) => {
                        // Free from any CPU's mappings on CPU c (threads migrate).
                        let from = i % 3;
                        if mapped[from].is_empty() { continue; }
                        let at = i % mapped[from].len();
                        let iova = mapped[from].swap_remove(at);
                        owner.remove(&iova);
                        let tag = *f.epoch.borrow();
                        freed_tag.insert(iova, tag);
                        cpus[c].free(0, iova, tag, &f);
                    }
                    Step::Flush => f.flush(),
                }
            }
            for (c, cpu) in cpus.iter_mut().enumerate() {
                for iova in mapped[c].drain(..) {
                    let tag = *f.epoch.borrow();
                    cpu.free(0, iova, tag, &f);
                }
                cpu.drain(&f).unwrap();
                prop_assert_eq!(cpu.held(), 0);
            }
            let back: BTreeSet<u64> = f.depot.borrow().iter().copied().collect();
            prop_assert_eq!(back.len() as u64, total, "IOVAs lost or duplicated");
        }
    }
}
