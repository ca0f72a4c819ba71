//! The ring path (docs/ARCHITECTURE.md, "Rings and service threads"): a
//! client's submission rings, served by iommud's service threads with no
//! system call on either side in steady state.
//!
//! **Validated magazines.** In a validated magazine domain iommud keeps the
//! per-CPU magazines itself: each ring has its own caches of clean IOVAs per
//! size class, refilled a magazine at a time from the depot (the only time
//! the allocator lock is taken), and iommud writes the leaf entries into the
//! domain's arena, which is never shared. A live-map table (one byte per
//! IOVA page: the length of the mapping that starts there) makes an unmap's
//! validation one compare-and-swap: an IOVA that was not mapped, or is
//! unmapped twice or with another length, is refused.
//!
//! **Batches.** A pass takes up to [`PASS_BUDGET`] entries of a ring and
//! completes them together. With `strict`, the entries an unmap batch
//! cleared are invalidated once, before any of their completions is posted:
//! page-selective with an address mask for each naturally aligned run (the
//! invalidation hint set, since only leaves changed: the arena's leaf tables
//! stay), or domain-selective when the runs are too many. Each ring's IOVAs
//! come from magazines carved from contiguous ranges, so a ring's batch
//! usually falls in one or two masked runs. With `percore` and `deferred`,
//! cleared IOVAs are batched per ring and size class, tagged with iommud's
//! epoch when a batch (a magazine's worth) is sealed, and reused once an
//! invalidation covers the tag (the epoch protocol of `iommu_abi::shared`,
//! run entirely by iommud). The service thread flushes the domain itself
//! right after the pass that sealed a batch has posted its completions; the
//! epoch timer only bounds the wait of batches not yet full.
//!
//! **Static.** A map returns the pool's IOVA plus the offset.
//!
//! Every other strategy (global, identity, va, and magazine maps larger than
//! a size class) goes through the same request handling as the socket path.

use super::*;
use iommu_abi::ring::{
    ring_at, Cqe, MapArgs, RingShm, SqOp, Sqe, CQE_WORDS, RING_BYTES, RING_ENTRIES,
};
use std::collections::VecDeque;
use std::sync::atomic::{
    AtomicU8, AtomicUsize, Ordering::Acquire, Ordering::Relaxed, Ordering::Release,
};
use std::time::{Duration, Instant};

/// A duration in ns, for the time counters.
fn nanos(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Entries one pass takes from one ring (fairness between rings and domains).
pub const PASS_BUDGET: u32 = 64;
/// Separate masked invalidations one strict batch may issue before one
/// domain-selective invalidation is cheaper.
const MAX_MASKED: usize = 4;
/// Largest address mask joined from separate runs: 2^9 pages, one leaf table.
const MAX_RUN_PAGES: u64 = 512;
/// Clean IOVAs a ring keeps per class before giving a magazine back.
const KEEP_CLEAN: usize = 2 * MAG_SIZE;

/// A client's rings and iommud's private state for each.
pub struct Rings {
    shm: SharedMem,
    /// The doorbell the client writes when the service thread sleeps.
    pub doorbell: Arc<OwnedFd>,
    servers: Vec<Mutex<RingServer>>,
    /// Each ring's home service thread (its index): the one thread that
    /// serves the ring while it is awake (`Domain::serve_rings`).
    homes: Box<[AtomicUsize]>,
    /// Validated magazine: for each IOVA page of the span, the page count of
    /// the live ring mapping starting there (0: none).
    live: Box<[AtomicU8]>,
    /// The arena's physical address (validated magazine), fixed for the
    /// domain's life.
    arena: Option<u64>,
}

/// iommud's own state of one ring: never in client-writable memory.
#[derive(Default)]
struct RingServer {
    sq_head: u32,
    cq_tail: u32,
    clean: [Vec<u64>; SIZE_CLASSES],
    open: [Vec<u64>; SIZE_CLASSES],
    /// Sealed batches: (tag, class, IOVAs).
    dirty: VecDeque<(u64, usize, Vec<u64>)>,
    /// The pass buffers, kept between passes (emptied, their memory kept):
    /// a pass in steady state allocates nothing. While a pass is held they
    /// hold it.
    pass: Pass,
    /// A pass of lazy entries whose entries are written and whose
    /// invalidation and completions wait (`Sqe::is_lazy`): no other pass of
    /// this ring starts meanwhile.
    held: Option<Held>,
}

/// A held pass: its entry count, when it was held, and until when at most.
#[derive(Clone, Copy)]
struct Held {
    n: u32,
    at: Instant,
    until: Instant,
}

/// The service thread passing over a domain's rings (`Domain::serve_rings`).
pub struct Passer<'a> {
    /// Its index.
    pub index: usize,
    /// The CPU it is pinned to, if any.
    pub cpu: Option<usize>,
    /// Whether service thread `i` sleeps: its rings are then served by any
    /// thread passing, which wakes it.
    pub asleep: &'a dyn Fn(usize) -> bool,
}

impl Passer<'_> {
    /// Service thread 0, the home of every ring nobody assigned, with no
    /// other thread (tests, the fuzz target).
    pub const SOLE: Passer<'static> = Passer {
        index: 0,
        cpu: None,
        asleep: &|_| false,
    };

    /// Whether this thread serves a ring whose home is `home`: its own, or
    /// a sleeping thread's.
    pub fn serves(&self, home: usize) -> bool {
        home == self.index || (self.asleep)(home)
    }
}

/// What one or more passes did (`Domain::serve_rings`).
#[derive(Clone, Copy, Default)]
pub struct Served {
    /// Entries completed.
    pub entries: u32,
    /// Entries were completed on a ring whose clients run on the passing
    /// thread's CPU: they need that CPU now.
    pub local: bool,
    /// Sleeping service threads (bit `i`: thread `i`) whose rings this pass
    /// served: to be woken, so that each ring is served by its home again.
    pub woke: u32,
    /// Unmaps were left to the epoch timer (`percore`, `deferred`).
    pub deferred: bool,
    /// A pass is held (lazy entries): the service thread must look again
    /// within its bound, not sleep.
    pub held: bool,
}

/// What one pass over a ring gathered for its end. Every vector is empty
/// between passes ([`Pass::clear`]) but `regions`, a cache.
#[derive(Default)]
struct Pass {
    results: Vec<(u64, Result<u64, ErrorCode>)>,
    /// Strict unmaps: (IOVA, pages, class), reusable once invalidated.
    strict: Vec<(u64, u64, usize)>,
    /// Maps to invalidate before completing (caching mode).
    fresh: Vec<(u64, u64)>,
    /// Validated magazine maps, their entries written at the end of the
    /// pass (runs of neighbours at once).
    maps: Vec<PassMap>,
    /// Validated magazine unmaps, cleared at the end of the pass: (IOVA,
    /// pages, class).
    unmaps: Vec<(u64, u64, usize)>,
    /// The registered regions, copied when an entry names one beyond the
    /// copy (at most once a pass; regions are only ever added, never
    /// changed, so a copied one stays right).
    regions: Vec<Registered>,
    /// The copy of `regions` was refreshed in this pass.
    regions_fresh: bool,
    /// A batch was sealed: flush the domain once the pass's completions
    /// are posted (`serve_ring`), off their path and without waking the
    /// epoch timer, which would preempt the service thread on its CPU.
    /// Should that flush fail, the timer's deadline on the noted unmaps
    /// still covers them.
    flush_after: bool,
    /// Unmaps were left to the epoch timer (`percore`, `deferred`).
    deferred: bool,
    /// Remaps kept at their old IOVA (counted once per pass).
    kept: u64,
    /// Scratch of `write_pass` and `write_phase`: entry runs to clear, a
    /// run's leaf entries, ranges to invalidate, their runs, descriptors.
    clears: Vec<(u64, u64)>,
    run: Vec<u64>,
    ranges: Vec<(u64, u64)>,
    runs: Vec<(u64, u64)>,
    descs: Vec<vtd::desc::Descriptor>,
}

impl Pass {
    /// Empties the pass for the next one (keeping the memory and the
    /// regions' copy).
    fn clear(&mut self) {
        self.results.clear();
        self.strict.clear();
        self.fresh.clear();
        self.maps.clear();
        self.unmaps.clear();
        self.regions_fresh = false;
        self.deferred = false;
        self.flush_after = false;
        self.kept = 0;
        self.clears.clear();
        self.run.clear();
        self.ranges.clear();
        self.runs.clear();
        self.descs.clear();
    }

    /// The registered region `index`, refreshing the copy once a pass when
    /// the index is beyond it.
    fn region(&mut self, d: &Domain, index: u32) -> Option<Registered> {
        let k = index as usize;
        if k >= self.regions.len() && !self.regions_fresh {
            self.regions_fresh = true;
            let now = d.regions.read().unwrap_or_else(|p| p.into_inner());
            self.regions.clear();
            self.regions.extend_from_slice(&now);
        }
        self.regions.get(k).copied()
    }
}

/// Zeros to clear entries from (a run longer than this is cleared in pieces).
const ZEROS: [u64; 64] = [0; 64];

/// A validated magazine map of a pass, written at its end.
#[derive(Clone, Copy)]
struct PassMap {
    /// Its entry's index in the pass (its completion).
    at: usize,
    iova: u64,
    class: usize,
    /// Page-aligned physical address and pages.
    phys: u64,
    pages: u64,
    dir: Dir,
}

impl Rings {
    fn ring(&self, k: usize) -> &RingShm {
        // SAFETY: `shm` maps `servers.len() * RING_BYTES` bytes (checked at
        // creation), page-aligned, alive as long as `self`.
        unsafe { ring_at(self.shm.map.as_ptr(), k) }
    }

    /// The ring memfd to hand the client.
    pub fn share(&self) -> Arc<OwnedFd> {
        self.shm.fd.clone()
    }

    /// How many rings.
    pub fn count(&self) -> usize {
        self.servers.len()
    }

    /// Ring `k`'s home service thread.
    pub fn home(&self, k: usize) -> usize {
        self.homes.get(k).map_or(0, |h| h.load(Relaxed))
    }

    /// True if some ring `by` serves has entries iommud could take now: entries beyond
    /// iommud's own head, and room for their completions. The client's
    /// indices (hostile) decide only whether to look, never what is done;
    /// a client that stops consuming completions, or moves its copies of
    /// iommud's indices, cannot keep a service thread awake.
    pub fn pending(&self, by: &Passer<'_>) -> bool {
        (0..self.count()).any(|k| {
            if !by.serves(self.home(k)) {
                return false;
            }
            let Ok(st) = self.servers[k].try_lock() else {
                // Being served right now.
                return true;
            };
            let shm = self.ring(k);
            let avail = shm.sq_tail.0.load(Acquire).wrapping_sub(st.sq_head);
            let used = st.cq_tail.wrapping_sub(shm.cq_head.0.load(Acquire));
            avail != 0 && used < RING_ENTRIES
        })
    }
}

/// The smallest naturally aligned power-of-two run of pages holding
/// `[start, end)` (byte addresses): (base, pages).
fn aligned_cover(start: u64, end: u64) -> (u64, u64) {
    let mut pages = 1u64;
    loop {
        let span = pages * PAGE;
        let base = start & !(span - 1);
        if base + span >= end || pages >= 1 << 18 {
            return (base, pages);
        }
        pages *= 2;
    }
}

/// Groups cleared ranges `(iova, pages)` into naturally aligned runs, joining
/// neighbours while the joined run stays within [`MAX_RUN_PAGES`].
#[cfg(test)]
pub(crate) fn cover_runs(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    let mut runs = Vec::new();
    cover_runs_into(&mut ranges, &mut runs);
    runs
}

/// [`cover_runs`] into `runs` (emptied first); sorts `ranges`.
fn cover_runs_into(ranges: &mut [(u64, u64)], runs: &mut Vec<(u64, u64)>) {
    ranges.sort_unstable();
    runs.clear();
    for &(iova, pages) in ranges.iter() {
        let end = iova + pages * PAGE;
        if let Some(last) = runs.last_mut() {
            let joined = aligned_cover(last.0.min(iova), (last.0 + last.1 * PAGE).max(end));
            if joined.1 <= MAX_RUN_PAGES {
                *last = joined;
                continue;
            }
        }
        runs.push(aligned_cover(iova, end));
    }
}

impl Domain {
    /// Creates the client's rings (once per domain).
    pub fn setup_rings(&self, count: u64) -> Result<&Rings, DomainError> {
        if count == 0 || count as usize > iommu_abi::ring::MAX_RINGS {
            return Err(reply(
                ErrorCode::Invalid,
                format!("{count} rings (1..={})", iommu_abi::ring::MAX_RINGS),
            ));
        }
        if self.rings.get().is_some() {
            return Err(reply(ErrorCode::Busy, "this domain already has rings"));
        }
        let n = count as usize;
        let shm = self.mem().alloc_shared(n * RING_BYTES, true)?;
        if shm.map.len() < n * RING_BYTES {
            return Err(reply(ErrorCode::NoMemory, "ring memory too small"));
        }
        let doorbell = crate::platform::shm::eventfd()
            .map_err(|e| reply(ErrorCode::Unsupported, format!("doorbell: {e}")))?;
        let (arena, validated_magazine) = {
            let i = self.lock();
            (
                i.arena.as_ref().map(|a| a.phys),
                i.strategy == Strategy::Magazine && self.trust == Trust::Validated,
            )
        };
        let live_len = if validated_magazine {
            (IOVA_SPAN / PAGE) as usize
        } else {
            0
        };
        let rings = Rings {
            shm,
            doorbell: Arc::new(doorbell),
            servers: (0..n).map(|_| Mutex::default()).collect(),
            homes: (0..n).map(|_| AtomicUsize::new(0)).collect(),
            live: (0..live_len).map(|_| AtomicU8::new(0)).collect(),
            arena: arena.filter(|_| validated_magazine),
        };
        self.install_rings(rings)
    }

    fn install_rings(&self, rings: Rings) -> Result<&Rings, DomainError> {
        let name = self.mem().shared_name(&rings.shm);
        let n = rings.servers.len() as u64;
        self.rings
            .set(rings)
            .map_err(|_| reply(ErrorCode::Busy, "this domain already has rings"))?;
        if let Some(l) = self.ledger.get() {
            if let Err(e) = l.set_rings(name.as_deref(), if name.is_some() { n } else { 0 }) {
                crate::unit::log::warn(&format!("{}: ledger: {e}", Bdf(self.sid)));
                l.retire();
            }
        }
        self.rings
            .get()
            .ok_or_else(|| reply(ErrorCode::Hardware, "rings vanished"))
    }

    /// The rings of an adopted validated magazine domain: the same memory
    /// (the client keeps using it), a new doorbell, each ring taken up where
    /// the dead iommud's copies of its indices say (client-writable memory:
    /// at worst the client confuses its own rings; every pass is bounded),
    /// and the live table rebuilt from the ledger's live ring mappings.
    pub(super) fn adopt_rings(
        &self,
        shm: SharedMem,
        n: usize,
        live: &[(u64, u64)],
    ) -> Result<&Rings, DomainError> {
        if n == 0 || n > iommu_abi::ring::MAX_RINGS || shm.map.len() < n * RING_BYTES {
            return Err(reply(ErrorCode::Invalid, "adopted rings do not fit"));
        }
        let doorbell = crate::platform::shm::eventfd()
            .map_err(|e| reply(ErrorCode::Unsupported, format!("doorbell: {e}")))?;
        let arena = {
            let i = self.lock_uncounted();
            i.arena
                .as_ref()
                .map(|a| a.phys)
                .filter(|_| i.strategy == Strategy::Magazine && self.trust == Trust::Validated)
        };
        let rings = Rings {
            shm,
            doorbell: Arc::new(doorbell),
            servers: (0..n).map(|_| Mutex::default()).collect(),
            homes: (0..n).map(|_| AtomicUsize::new(0)).collect(),
            live: (0..(IOVA_SPAN / PAGE) as usize)
                .map(|_| AtomicU8::new(0))
                .collect(),
            arena,
        };
        for (k, srv) in rings.servers.iter().enumerate() {
            let r = rings.ring(k);
            let mut st = srv.lock().unwrap_or_else(|p| p.into_inner());
            st.sq_head = r.sq_head.0.load(Acquire);
            st.cq_tail = r.cq_tail.0.load(Acquire);
        }
        for &(iova, pages) in live {
            if let Some(slot) = rings.live.get(((iova - IOVA_BASE) / PAGE) as usize) {
                slot.store(pages.min(u64::from(u8::MAX)) as u8, Release);
            }
        }
        self.install_rings(rings)
    }

    /// The client's rings, if set up.
    pub fn rings(&self) -> Option<&Rings> {
        self.rings.get()
    }

    /// Tells the client whether the service thread sleeps (`crate::ring`).
    pub fn set_ring_idle(&self, idle: bool) {
        let awake = &self.page().ring_awake;
        if idle {
            // Only this thread's own count comes off (never below 0).
            let _ = awake.fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1));
            stats::add(&self.stats.ring_sleeps, 1);
        } else {
            awake.fetch_add(1, SeqCst);
        }
    }

    /// Publishes how many service threads serve the rings (all awake now).
    pub fn set_ring_servers(&self, n: u32) {
        self.page().ring_awake.store(n, SeqCst);
    }

    /// Sets each ring's home service thread, and tells the client the CPU
    /// it is pinned to (`homes[k]`: thread index, CPU). Rings beyond
    /// `homes` keep theirs.
    pub fn set_ring_homes(&self, homes: &[(usize, Option<usize>)]) {
        let Some(rings) = self.rings.get() else {
            return;
        };
        for (k, &(thread, cpu)) in homes.iter().enumerate().take(rings.count()) {
            rings.homes[k].store(thread, Relaxed);
            let cpu = cpu.and_then(|c| u32::try_from(c + 1).ok()).unwrap_or(0);
            rings.ring(k).server_cpu.0.store(cpu, Release);
        }
    }

    /// One pass over the rings `by` serves (its own, and those of sleeping
    /// threads): the entries completed, whether the passes left unmaps to
    /// the epoch timer (`percore`, `deferred`: their IOVAs wait for its
    /// flush), and whether a pass is held. A held pass goes on (its
    /// invalidation, its completions) once the service thread has done
    /// other work after holding it (`other_work`: when it last finished
    /// some) or `hold` has passed. A ring another service thread is serving
    /// is skipped.
    ///
    /// Each ring has one home thread, so two clients on two CPUs are served
    /// by two threads at once; were any thread to take any ring, the first
    /// awake would serve them all while the others slept
    /// (docs/ARCHITECTURE.md, "Rings and service threads").
    pub fn serve_rings(
        &self,
        by: &Passer<'_>,
        other_work: Option<Instant>,
        hold: Duration,
    ) -> Served {
        let mut out = Served::default();
        let Some(rings) = self.rings.get() else {
            return out;
        };
        let count = rings.count();
        for j in 0..count {
            let k = (by.index + j) % count;
            let home = rings.home(k);
            if !by.serves(home) {
                continue;
            }
            let Ok(mut st) = rings.servers[k].try_lock() else {
                continue;
            };
            if self.is_dead() {
                break;
            }
            let s = self.serve_ring(rings, k, &mut st, other_work, hold);
            out.entries += s.entries;
            out.deferred |= s.deferred;
            out.held |= s.held;
            if s.entries > 0 {
                out.local |= by
                    .cpu
                    .is_some_and(|c| iommu_abi::ring::ring_of_cpu(c, count) == k);
                if home != by.index {
                    stats::add(&self.stats.ring_helped, 1);
                    if home < 32 {
                        out.woke |= 1 << home;
                    }
                }
            }
        }
        out
    }

    fn serve_ring(
        &self,
        rings: &Rings,
        k: usize,
        st: &mut RingServer,
        other_work: Option<Instant>,
        hold: Duration,
    ) -> Served {
        let shm = rings.ring(k);
        if let Some(h) = st.held {
            let now = Instant::now();
            if now < h.until && other_work.is_none_or(|t| t <= h.at) {
                return Served {
                    held: true,
                    ..Served::default()
                };
            }
            st.held = None;
            let mut pass = std::mem::take(&mut st.pass);
            self.invalidate_pass(st, &mut pass);
            return self.post_pass(shm, st, pass, h.n, now);
        }
        // The client's indices are hostile: bounded here, never trusted.
        let tail = shm.sq_tail.0.load(Acquire);
        let avail = tail.wrapping_sub(st.sq_head).min(RING_ENTRIES);
        if avail == 0 {
            return Served::default();
        }
        let used = st.cq_tail.wrapping_sub(shm.cq_head.0.load(Acquire));
        let free = RING_ENTRIES.saturating_sub(used);
        let n = avail.min(free).min(PASS_BUDGET);
        if n == 0 {
            return Served::default();
        }
        let started = Instant::now();
        let strategy = self.strategy_now();
        let flush = FlushPolicy::from_u64(u64::from(self.page().flush.load(SeqCst)))
            .unwrap_or(FlushPolicy::Strict);
        // Empty: every pass leaves it cleared.
        let mut pass = std::mem::take(&mut st.pass);
        let (mut rejected, mut errors) = (0, 0);
        let mut lazy = true;
        for j in 0..n {
            let slot = &shm.sq[(st.sq_head.wrapping_add(j) % RING_ENTRIES) as usize];
            // One private copy of the entry, then decisions only on the copy.
            let w: [u64; iommu_abi::ring::SQE_WORDS] =
                std::array::from_fn(|x| slot[x].load(Relaxed));
            lazy &= Sqe::is_lazy(&w);
            // A kept remap changes nothing a strict unmap must end.
            let keep = Sqe::is_keep(&w) && flush != FlushPolicy::Strict;
            let r = match Sqe::decode(&w) {
                Ok(sqe) => self.ring_op(rings, st, &mut pass, strategy, sqe.op, keep),
                Err(e) => {
                    rejected += 1;
                    Err(reply(ErrorCode::Invalid, e.to_string()))
                }
            };
            let r = r.map_err(|e| {
                errors += 1;
                e.code()
            });
            pass.results.push((w[4], r));
        }
        if rejected > 0 {
            stats::add(&self.stats.rejected, rejected);
        }
        if errors > 0 {
            stats::add(&self.stats.errors, errors);
        }
        self.write_phase(rings, st, &mut pass, flush);
        if lazy && !pass.descs.is_empty() && !hold.is_zero() {
            // Every entry lazy, an invalidation due: its entries are written
            // and its IOVAs are in no cache; the invalidation and the
            // completions wait for other work, or the bound.
            stats::add(&self.stats.ring_held, 1);
            stats::add(&self.stats.ring_busy_ns, nanos(started.elapsed()));
            st.pass = pass;
            let now = Instant::now();
            st.held = Some(Held {
                n,
                at: now,
                until: now + hold,
            });
            return Served {
                held: true,
                ..Served::default()
            };
        }
        self.invalidate_pass(st, &mut pass);
        self.post_pass(shm, st, pass, n, started)
    }

    /// The end of a pass: its completions posted, its entries consumed and
    /// counted, and a sealed batch's flush (`Pass::flush_after`).
    fn post_pass(
        &self,
        shm: &RingShm,
        st: &mut RingServer,
        mut pass: Pass,
        n: u32,
        started: Instant,
    ) -> Served {
        let (deferred, flush_after) = (pass.deferred, pass.flush_after);
        if pass.kept > 0 {
            stats::add(&self.stats.ring_kept, pass.kept);
        }
        for &(user, result) in &pass.results {
            let c = Cqe { user, result }.encode();
            let slot = &shm.cq[(st.cq_tail % RING_ENTRIES) as usize];
            for (x, v) in c.iter().enumerate().take(CQE_WORDS) {
                slot[x].store(*v, Relaxed);
            }
            st.cq_tail = st.cq_tail.wrapping_add(1);
        }
        pass.clear();
        st.pass = pass;
        st.sq_head = st.sq_head.wrapping_add(n);
        // Counted before the completions are published: a client that saw
        // them finds them counted.
        stats::add(&self.stats.ring_entries, u64::from(n));
        stats::add(&self.stats.ring_passes, 1);
        shm.sq_head.0.store(st.sq_head, Release);
        shm.cq_tail.0.store(st.cq_tail, Release);
        if flush_after {
            // The sealed batches become clean for this ring's next maps.
            if let Err(e) = self.flush() {
                crate::unit::log::warn(&format!("{}: ring flush failed: {e}", Bdf(self.sid)));
            }
            self.recycle(st);
        }
        stats::add(&self.stats.ring_busy_ns, nanos(started.elapsed()));
        Served {
            entries: n,
            deferred,
            ..Served::default()
        }
    }

    /// One entry. Errors become the entry's completion.
    fn ring_op(
        &self,
        rings: &Rings,
        st: &mut RingServer,
        pass: &mut Pass,
        strategy: Strategy,
        op: SqOp,
        keep: bool,
    ) -> Result<u64, DomainError> {
        match op {
            SqOp::Remap { old, old_len, map } => {
                // A remap that could never map unmaps nothing.
                let r = self.ring_target(pass, &map)?;
                if keep && strategy == Strategy::Magazine {
                    if let Some(iova) =
                        self.ring_keep(rings, old, old_len, r.phys + map.offset, &map)
                    {
                        pass.kept += 1;
                        return Ok(iova);
                    }
                }
                let unmap = SqOp::Unmap {
                    iova: old,
                    len: old_len,
                };
                self.ring_op(rings, st, pass, strategy, unmap, false)?;
                self.ring_op(rings, st, pass, strategy, SqOp::Map(map), false)
            }
            SqOp::Map(m) => {
                let MapArgs {
                    offset,
                    len,
                    dir,
                    va,
                    ..
                } = m;
                let r = self.ring_target(pass, &m)?;
                let phys = r.phys + offset;
                match strategy {
                    Strategy::Static if r.iova != 0 => Ok(r.iova + offset),
                    Strategy::Magazine => {
                        match (rings.arena, size_class((phys % PAGE + len).div_ceil(PAGE))) {
                            (Some(_), Some(class)) => {
                                self.ring_map(st, pass, class, phys, len, dir)
                            }
                            _ => self.map(phys, len, dir, va),
                        }
                    }
                    _ => self.map(phys, len, dir, va),
                }
            }
            SqOp::Unmap { iova, len } => {
                if let (Strategy::Magazine, Some(_)) = (strategy, rings.arena) {
                    if let Some(done) = self.ring_unmap(rings, pass, iova, len)? {
                        return Ok(done);
                    }
                }
                self.unmap(iova, len).map(|()| 0)
            }
        }
    }

    /// A kept remap (docs/ARCHITECTURE.md, "Kept remaps"): `old` if it is a
    /// live ring mapping of exactly the pages and direction the entry asks
    /// for at `phys` (the same in-page offset, the same number of pages,
    /// every arena entry the leaf a map would write), else `None` (then the
    /// remap unmaps and maps). Decided from iommud's own memory only: the
    /// live table and the arena, which no client can write. The mapping is
    /// taken for the check, like an unmap takes it, and given back: an
    /// unmap of the same IOVA racing on another ring is refused meanwhile.
    fn ring_keep(
        &self,
        rings: &Rings,
        old: u64,
        old_len: u64,
        phys: u64,
        m: &MapArgs,
    ) -> Option<u64> {
        let arena = rings.arena?;
        if old_len > MAX_MAP_LEN || !(IOVA_BASE..IOVA_BASE + IOVA_SPAN).contains(&old) {
            return None;
        }
        let (base, pages) = iommu_abi::classes::keep_span(old, old_len, phys, m.len)?;
        let off = phys % PAGE;
        let slot = rings.live.get(((base - IOVA_BASE) / PAGE) as usize)?;
        slot.compare_exchange(pages as u8, 0, SeqCst, SeqCst).ok()?;
        let first = arena + ((base - IOVA_BASE) >> 12) * 8;
        let holds = (0..pages).all(|p| {
            // VT-d 3.x §9.8: second-level leaf: address 51:12, W bit 1, R bit 0.
            let want = vtd::entry::SlPte::new(phys - off + p * PAGE, m.dir.read(), m.dir.write()).0;
            self.mem().read_u64(first + 8 * p).is_ok_and(|v| v == want)
        });
        slot.store(pages as u8, Release);
        holds.then_some(old)
    }

    /// The registered region a map entry names, if `[offset, offset+len)`
    /// lies inside it.
    fn ring_target(&self, pass: &mut Pass, m: &MapArgs) -> Result<Registered, DomainError> {
        let MapArgs {
            region,
            offset,
            len,
            ..
        } = *m;
        let r = pass.region(self, region).ok_or_else(|| {
            reply(
                ErrorCode::NotOwner,
                format!("no registered region {region}"),
            )
        })?;
        if len == 0 || len > MAX_MAP_LEN || offset.checked_add(len).is_none_or(|e| e > r.len) {
            return Err(reply(
                ErrorCode::NotOwner,
                format!("region {region}: offset {offset:#x} length {len:#x} out of bounds"),
            ));
        }
        Ok(r)
    }

    fn ring_map(
        &self,
        st: &mut RingServer,
        pass: &mut Pass,
        class: usize,
        phys: u64,
        len: u64,
        dir: Dir,
    ) -> Result<u64, DomainError> {
        let off = phys % PAGE;
        let pages = (off + len).div_ceil(PAGE);
        let iova = match st.clean[class].pop() {
            Some(v) => v,
            None => {
                self.ring_refill(st, class)?;
                st.clean[class]
                    .pop()
                    .ok_or_else(|| reply(ErrorCode::NoSpace, "IOVA space exhausted"))?
            }
        };
        let base = phys - off;
        // VT-d 3.x §9.8: second-level leaf: address 51:12, W bit 1, R bit 0.
        // Written, and made live, at the end of the pass (before any completion).
        pass.maps.push(PassMap {
            at: pass.results.len(),
            iova,
            class,
            phys: base,
            pages,
            dir,
        });
        Ok(iova + off)
    }

    /// A validated magazine unmap; `None` when the IOVA is not a live ring
    /// mapping (then the socket path's bookkeeping decides).
    fn ring_unmap(
        &self,
        rings: &Rings,
        pass: &mut Pass,
        iova: u64,
        len: u64,
    ) -> Result<Option<u64>, DomainError> {
        if len == 0 || len > MAX_MAP_LEN || !(IOVA_BASE..IOVA_BASE + IOVA_SPAN).contains(&iova) {
            return Ok(None);
        }
        let off = iova % PAGE;
        let base = iova - off;
        let pages = (off + len).div_ceil(PAGE);
        let Some(class) = size_class(pages) else {
            return Ok(None);
        };
        let Some(slot) = rings.live.get(((base - IOVA_BASE) / PAGE) as usize) else {
            return Ok(None);
        };
        // The one check that matters: this exact mapping is live, and only
        // one unmap can take it.
        if slot
            .compare_exchange(pages as u8, 0, SeqCst, SeqCst)
            .is_err()
        {
            return Ok(None);
        }
        // Cleared at the end of the pass, before its invalidation or tag.
        pass.unmaps.push((base, pages, class));
        Ok(Some(0))
    }

    /// Seals a ring's open batch of `class`: tagged with iommud's epoch read
    /// after its clears (`iommu_abi::shared`).
    fn seal(&self, st: &mut RingServer, class: usize) {
        std::sync::atomic::fence(SeqCst);
        let tag = self.epoch();
        let batch = std::mem::take(&mut st.open[class]);
        if !batch.is_empty() {
            st.dirty.push_back((tag, class, batch));
        }
    }

    /// Moves sealed batches an invalidation has covered to the clean caches.
    fn recycle(&self, st: &mut RingServer) {
        let done = self.completed();
        let mut k = 0;
        while k < st.dirty.len() {
            if st.dirty[k].0 <= done {
                if let Some((_, class, v)) = st.dirty.remove(k) {
                    st.clean[class].extend(v);
                }
            } else {
                k += 1;
            }
        }
    }

    /// Refills a ring's clean cache of `class`: recycled batches first, then
    /// a magazine from the depot (the allocator lock, rarely), and as a last
    /// resort an invalidation that makes the ring's own batches clean.
    fn ring_refill(&self, st: &mut RingServer, class: usize) -> Result<(), DomainError> {
        self.recycle(st);
        if !st.clean[class].is_empty() {
            return Ok(());
        }
        match self.depot_take(class) {
            Ok(v) if !v.is_empty() => {
                st.clean[class] = v;
                return Ok(());
            }
            Ok(_) => {}
            Err(e) if e.code() != ErrorCode::NoSpace => return Err(e),
            Err(_) => {}
        }
        if !st.open[class].is_empty() {
            self.seal(st, class);
        }
        if !st.dirty.is_empty() {
            self.flush()?;
            self.recycle(st);
        }
        Ok(())
    }

    /// The first part of a pass's end: the entry writes, and the
    /// descriptors of the strict batch's one invalidation and of the caching
    /// mode's invalidation of fresh entries (`Pass::descs`, empty if none is
    /// due).
    fn write_phase(&self, rings: &Rings, st: &mut RingServer, pass: &mut Pass, flush: FlushPolicy) {
        let t = Instant::now();
        self.write_pass(rings, st, pass, flush);
        stats::add(&self.stats.ring_write_ns, nanos(t.elapsed()));
        let Pass {
            strict,
            fresh,
            ranges,
            runs,
            descs,
            ..
        } = &mut *pass;
        ranges.extend(strict.iter().map(|&(v, p, _)| (v, p)));
        ranges.extend(fresh.iter().copied());
        if !ranges.is_empty() {
            cover_runs_into(ranges, runs);
            if runs.len() > MAX_MASKED {
                descs.push(self.unit.iotlb_domain(self.did));
            } else {
                // IH: only leaf entries changed; the arena's tables stay.
                descs.extend(
                    runs.iter()
                        .map(|&(v, p)| self.unit.iotlb_range(self.did, v, p, true)),
                );
            }
        }
    }

    /// The rest of a pass's end: its invalidation (if due), after which the
    /// strict batch's IOVAs are clean, and the clean caches kept bounded.
    fn invalidate_pass(&self, st: &mut RingServer, pass: &mut Pass) {
        if !pass.descs.is_empty() {
            for d in pass.descs.iter() {
                match d.decode() {
                    vtd::desc::Decoded::Iotlb {
                        g: vtd::regs::Granularity::Selective,
                        ..
                    } => stats::add(&self.stats.inval_page, 1),
                    _ => stats::add(&self.stats.inval_domain, 1),
                }
            }
            if !pass.strict.is_empty() {
                stats::add(&self.stats.ring_strict_unmaps, pass.strict.len() as u64);
                stats::add(&self.stats.ring_strict_invals, pass.descs.len() as u64);
            }
            let t = Instant::now();
            let r = self.unit.invalidate(&pass.descs);
            stats::add(&self.stats.ring_inval_ns, nanos(t.elapsed()));
            if let Err(e) = r {
                // Not invalidated: the IOVAs must never be reused, and every
                // entry of the pass reports the failure.
                crate::unit::log::warn(&format!(
                    "{}: ring batch invalidation failed: {e}",
                    Bdf(self.sid)
                ));
                let code = DomainError::from(e).code();
                for r in pass.results.iter_mut() {
                    r.1 = Err(code);
                }
                pass.strict.clear();
            }
        }
        for (iova, _, class) in pass.strict.drain(..) {
            st.clean[class].push(iova);
        }
        // Keep the caches bounded: a full magazine goes back to the depot.
        for class in 0..SIZE_CLASSES {
            if st.clean[class].len() > KEEP_CLEAN {
                let at = st.clean[class].len() - MAG_SIZE;
                let back = st.clean[class].split_off(at);
                self.depot_give(class, back);
            }
        }
    }

    /// The pass's entry writes, a run of neighbouring entries at a time: the
    /// unmaps' clears (then their strict batch or their epoch tags), and the
    /// maps' entries (then they become live and their completions may go).
    fn write_pass(&self, rings: &Rings, st: &mut RingServer, pass: &mut Pass, flush: FlushPolicy) {
        let Some(arena) = rings.arena else {
            return;
        };
        let pte = |iova: u64| arena + ((iova - IOVA_BASE) >> 12) * 8;
        // Clears: runs of neighbouring entries, one write call each (per
        // ZEROS.len() entries).
        let clears = &mut pass.clears;
        clears.extend(pass.unmaps.iter().map(|&(v, p, _)| (pte(v), p)));
        clears.sort_unstable();
        let mut failed = false;
        let mut k = 0;
        while k < clears.len() {
            let (start, mut n) = clears[k];
            k += 1;
            while k < clears.len() && clears[k].0 == start + 8 * n {
                n += clears[k].1;
                k += 1;
            }
            let mut at = 0;
            while at < n {
                let m = (n - at).min(ZEROS.len() as u64);
                failed |= self
                    .mem()
                    .write_u64s(start + 8 * at, &ZEROS[..m as usize])
                    .is_err();
                at += m;
            }
            if !self.unit.coherent() {
                self.mem().flush(start, n * 8);
            }
        }
        if failed {
            // Cannot happen for arena memory; if it did, nothing is reused.
            crate::unit::log::warn(&format!("{}: clearing ring entries failed", Bdf(self.sid)));
            pass.unmaps.clear();
        }
        // No longer live for a restarted iommud either (after the clears).
        for &(v, _, _) in &pass.unmaps {
            self.note(v, None);
        }
        let unmaps = &mut pass.unmaps;
        if !unmaps.is_empty() {
            stats::add(&self.stats.unmaps, unmaps.len() as u64);
        }
        match flush {
            FlushPolicy::Strict => pass.strict.append(unmaps),
            FlushPolicy::PerCore | FlushPolicy::Deferred if !unmaps.is_empty() => {
                pass.deferred = true;
                {
                    let _r = self.record_lock.lock().unwrap_or_else(|p| p.into_inner());
                    for _ in unmaps.iter() {
                        self.server_unmaps.note_unmap(self.page());
                    }
                }
                let mut full = [false; SIZE_CLASSES];
                for (v, _, class) in unmaps.drain(..) {
                    st.open[class].push(v);
                    full[class] |= st.open[class].len() >= MAG_SIZE;
                }
                // Sealed after the clears above (seal fences, then reads the epoch).
                for class in (0..SIZE_CLASSES).filter(|&c| full[c]) {
                    self.seal(st, class);
                    pass.flush_after = true;
                }
            }
            _ => unmaps.clear(),
        }
        // Maps: entries written in runs, then live (an unmap of the same pass
        // found them not live and was refused), then completed.
        let Pass {
            maps,
            run,
            results,
            fresh,
            ..
        } = &mut *pass;
        maps.sort_unstable_by_key(|m| m.iova);
        let mut k = 0;
        while k < maps.len() {
            run.clear();
            let start = maps[k].iova;
            let mut j = k;
            while j < maps.len() && maps[j].iova == start + run.len() as u64 * PAGE {
                let m = maps[j];
                // VT-d 3.x §9.8: second-level leaf: address 51:12, W bit 1, R bit 0.
                run.extend((0..m.pages).map(|p| {
                    vtd::entry::SlPte::new(m.phys + p * PAGE, m.dir.read(), m.dir.write()).0
                }));
                j += 1;
            }
            let ok = self.mem().write_u64s(pte(start), run).is_ok();
            if ok && !self.unit.coherent() {
                self.mem().flush(pte(start), run.len() as u64 * 8);
            }
            for m in &maps[k..j] {
                if ok {
                    if let Some(slot) = rings.live.get(((m.iova - IOVA_BASE) / PAGE) as usize) {
                        slot.store(m.pages as u8, Release);
                    }
                    // On record for a restarted iommud (after its entries).
                    self.note(m.iova, Some(crate::ledger::PageEntry::Live(m.pages)));
                    if self.unit.caching_mode() {
                        fresh.push((m.iova, m.pages));
                    }
                } else {
                    let _ = self
                        .mem()
                        .write_u64s(pte(m.iova), &vec![0; m.pages as usize]);
                    st.clean[m.class].push(m.iova);
                    if let Some(r) = results.get_mut(m.at) {
                        r.1 = Err(ErrorCode::Hardware);
                    }
                }
            }
            k = j;
        }
        if !maps.is_empty() {
            stats::add(&self.stats.maps, maps.len() as u64);
        }
    }

    /// Takes a magazine of `class` for a ring: from the depot, else from the
    /// allocator (leaf tables installed). The IOVAs count as delegated to
    /// the ring (so the domain is not idle while a ring holds them) and
    /// against the owner's mappings quota.
    fn depot_take(&self, class: usize) -> Result<Vec<u64>, DomainError> {
        self.charge(Quota::Mappings, MAG_SIZE as u64)?;
        let mut i = self.lock();
        let mut out = if let Some(m) = i.depot[class].pop() {
            stats::add(&self.stats.depot_hits, 1);
            m
        } else {
            match self.fresh_iovas(&mut i, class, MAG_SIZE) {
                Ok(v) => v,
                Err(e) => {
                    drop(i);
                    self.uncharge(Quota::Mappings, MAG_SIZE as u64);
                    return Err(e);
                }
            }
        };
        for &iova in &out {
            i.delegated.insert(iova, class);
        }
        drop(i);
        stats::add(&self.stats.depot_exchanges, 1);
        self.uncharge(Quota::Mappings, (MAG_SIZE - out.len().min(MAG_SIZE)) as u64);
        // Handed out in descending order, so popping gives ascending IOVAs:
        // consecutive maps of a ring land next to each other.
        out.sort_unstable_by(|a, b| b.cmp(a));
        Ok(out)
    }

    /// Gives a ring's clean IOVAs back to the depot.
    fn depot_give(&self, class: usize, iovas: Vec<u64>) {
        let n = iovas.len() as u64;
        let mut i = self.lock();
        for v in &iovas {
            i.delegated.remove(v);
        }
        if i.depot[class].len() < DEPOT_MAX {
            i.depot[class].push(iovas);
        } else {
            for v in iovas {
                i.iova.free(v, class_pages(class) * PAGE);
            }
        }
        drop(i);
        self.uncharge(Quota::Mappings, n);
    }

    /// Waits for every ring pass in progress to end and stops new ones
    /// (teardown: no entry is written after the memory goes).
    pub(super) fn quiesce_rings(&self) {
        if let Some(r) = self.rings.get() {
            for s in &r.servers {
                let mut st = s.lock().unwrap_or_else(|p| p.into_inner());
                let (sq_head, cq_tail) = (st.sq_head, st.cq_tail);
                *st = RingServer {
                    sq_head,
                    cq_tail,
                    ..RingServer::default()
                };
            }
        }
    }
}

#[cfg(test)]
mod cover_tests {
    use super::*;

    #[test]
    fn runs_are_aligned_powers_of_two_by_hand() {
        // One page at 0x4000_3000: itself.
        assert_eq!(cover_runs(vec![(0x4000_3000, 1)]), vec![(0x4000_3000, 1)]);
        // Two pages from 0x4000_3000 straddle the 16 KiB boundary at 0x4000_4000:
        // 8 pages from 0x4000_0000.
        assert_eq!(cover_runs(vec![(0x4000_3000, 2)]), vec![(0x4000_0000, 8)]);
        // Two pages from 0x4000_2000 are a naturally aligned 8 KiB run.
        assert_eq!(cover_runs(vec![(0x4000_2000, 2)]), vec![(0x4000_2000, 2)]);
        // 32 neighbouring single pages: one 32-page run.
        let v: Vec<(u64, u64)> = (0..32).map(|k| (0x4010_0000 + k * PAGE, 1)).collect();
        assert_eq!(cover_runs(v), vec![(0x4010_0000, 32)]);
        // Two pages 4 MiB apart: joining would need 1024+ pages, so two runs.
        assert_eq!(
            cover_runs(vec![(0x4040_0000, 1), (0x4000_0000, 1)]),
            vec![(0x4000_0000, 1), (0x4040_0000, 1)]
        );
    }
}
