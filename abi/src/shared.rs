//! Layout of the memory iommud shares with each attached client.
//!
//! Two memfds per domain, so that nothing iommud decides with is ever in
//! memory a client can write (docs/ARCHITECTURE.md, "Trust and the attacker"):
//!
//! * the **published page** ([`PUBLISHED_LEN`] bytes, [`EpochPage`]): the
//!   invalidation epochs, the policy and the clock calibration. iommud keeps
//!   the authoritative values in its own memory and copies them here; the
//!   memfd is sealed against writable mappings (`F_SEAL_FUTURE_WRITE`) before
//!   it is handed out, so a client can only map it read-only.
//! * the **client page** ([`CLIENT_LEN`] bytes): page 0 is [`ClientPage`]
//!   (the flush the client asks for, and its fast-path counters, one block per
//!   CPU slot, so iommud can serve the domain's `stats` without asking); page
//!   1 the exchange area, up to [`EXCHANGE_SLOTS`] IOVAs a magazine exchange
//!   hands back or out (the 64-byte messages carry only counts). Everything
//!   here is hostile input to iommud: it reads each value once, copies it, and
//!   uses it only as a wish (a flush it may grant, bounded by its own epoch)
//!   or a statistic (saturating arithmetic).
//!
//! ## Epochs (the per-core deferred invalidation protocol)
//!
//! `epoch` starts at 1 and only iommud advances it, once at the start of each
//! invalidation of the domain; when that invalidation's wait descriptor has
//! completed, iommud stores the epoch it started from into `completed`.
//!
//! A client that clears a leaf entry then reads `epoch` (with a `SeqCst`
//! fence between) tags the IOVA with the value `t` it read. The clear happened
//! before iommud moved the epoch past `t`, so the invalidation that did so
//! covers it: once `completed >= t`, the IOVA can be reused. To ask for that,
//! the client raises `wanted` to `t` and, if `hint_pending` was 0, sends one
//! one-way `FlushHint`. iommud clears `hint_pending` *before* reading
//! `wanted`, so no request is lost between the two. iommud never trusts
//! `wanted` beyond its own epoch: a wish for a later epoch is one flush, no
//! more.
//!
//! ## Stale window (how long an unmapped IOVA stays un-invalidated)
//!
//! Whoever clears entries (the client on its fast path, iommud for the
//! unmaps it does itself, in a slot of its own memory) calls
//! [`CpuCounters::note_unmap`] *after* reading the epoch tag: it records, in
//! its CPU slot (so the fast path writes no line another CPU writes), the
//! time of the oldest unmap not yet taken by a flush, and running totals of
//! the count and the sum of unmap times. Each slot has one writer at a time
//! (the client's slot lock, iommud's domain lock), so the totals are plain
//! loads and stores, not locked read-modify-writes: the fast path pays a
//! clock read and no bus lock. iommud takes the records of all slots
//! ([`take_unmaps`], against its own snapshot of the totals) *before* it
//! advances the epoch, and when the invalidation completes, `now - oldest`
//! is the flush's longest window and `count * now - sum` the sum of its
//! windows. An unmap recorded after the take is charged to the next flush
//! (never under-estimated): if its record precedes the take, its epoch read
//! preceded the epoch advance, so this flush covers it. A client that lies
//! in its records distorts only its own domain's stale-window figures.
//!
//! ## Policy
//!
//! iommud publishes the domain's strategy and flush policy (wire values) in
//! `strategy` and `flush`; the client reads them on every map and unmap, so a
//! switch of an idle domain (`domains/<bdf>/strategy`) takes effect in the
//! client without a message.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// CLOCK_MONOTONIC in nanoseconds (system-wide, so comparable across processes).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// The time-stamp counter (0 where there is none).
pub fn read_tsc() -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: RDTSC reads a counter; it touches no memory.
        unsafe { core::arch::x86_64::_rdtsc() }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        0
    }
}

/// `(tsc_base, ns per tick in 32.32 fixed point)` when the TSC is the
/// system's clock source (Linux: `/sys/devices/system/clocksource/
/// clocksource0/current_clocksource` reads `tsc`, which the kernel picks only
/// for a TSC that is invariant and synchronised across CPUs), measured once
/// per process against `CLOCK_MONOTONIC` over 20 ms; else `None`.
pub fn tsc_calibration() -> Option<(u64, u64)> {
    use std::sync::OnceLock;
    static CAL: OnceLock<Option<(u64, u64)>> = OnceLock::new();
    *CAL.get_or_init(|| {
        let src = std::fs::read_to_string(
            "/sys/devices/system/clocksource/clocksource0/current_clocksource",
        )
        .ok()?;
        if src.trim() != "tsc" {
            return None;
        }
        let (n0, t0) = (monotonic_ns(), read_tsc());
        std::thread::sleep(std::time::Duration::from_millis(20));
        let (n1, t1) = (monotonic_ns(), read_tsc());
        let ticks = t1.checked_sub(t0).filter(|t| *t > 0)?;
        let mult = ((u128::from(n1 - n0) << 32) / u128::from(ticks)) as u64;
        (mult != 0).then_some((t0, mult))
    })
}

/// First IOVA of a magazine domain's IOVA space. Leaf table `i` of the
/// domain's arena maps `[MAGAZINE_IOVA_BASE + i * 2 MiB, + 2 MiB)`, so the
/// entry of IOVA `v` is at arena offset `((v - MAGAZINE_IOVA_BASE) >> 12) * 8`.
pub const MAGAZINE_IOVA_BASE: u64 = 1 << 30;

/// Bytes of the published (client read-only) memfd.
pub const PUBLISHED_LEN: usize = 4096;
/// Bytes of the client-writable memfd: the client page and the exchange area.
pub const CLIENT_LEN: usize = 2 * 4096;
/// Offset of the exchange area in the client memfd.
pub const EXCHANGE_OFFSET: usize = 4096;
/// IOVAs that fit in the exchange area.
pub const EXCHANGE_SLOTS: usize = 4096 / 8;
/// CPU slots with their own counter block.
pub const MAX_CPUS: usize = 32;

/// The client's per-CPU-slot counters (written by the client only, under the
/// slot's lock, read by iommud at any time), and the slot's unmap record for
/// the stale window (written with atomics by the client; taken by iommud).
/// One cache line per slot. iommud keeps one more of these in its own memory
/// for the unmaps it does itself.
#[repr(C, align(64))]
#[derive(Debug, Default)]
pub struct CpuCounters {
    /// Fast-path maps.
    pub maps: AtomicU64,
    /// Fast-path unmaps.
    pub unmaps: AtomicU64,
    /// Maps served from a CPU-local magazine (misses = maps − hits).
    pub mag_hits: AtomicU64,
    /// Dirty batches completed into clean magazines without IPC.
    pub batches_recycled: AtomicU64,
    /// Time of the slot's oldest unmap not yet taken by a flush (0 = none).
    pub unmap_oldest: AtomicU64,
    /// Running total of the slot's unmap times (ns; wraps).
    pub unmap_sum: AtomicU64,
    /// Running total of the slot's unmaps.
    pub unmap_count: AtomicU64,
    /// Time of the slot's latest clock sample (see [`CpuCounters::note_unmap`]).
    pub unmap_last: AtomicU64,
}

const _: () = assert!(std::mem::size_of::<CpuCounters>() == 64);
// Each slot on its own cache line, none on the line of the flush words:
// slots of different CPUs must not share a line (false sharing on every op).
const _: () = assert!(std::mem::offset_of!(ClientPage, cpu) % 64 == 0);

/// Slots of unmap records iommud takes: the client's and its own.
pub const RECORD_SLOTS: usize = MAX_CPUS + 1;

/// iommud's snapshot of every slot's running unmap totals `(sum, count)`,
/// for [`take_unmaps`].
#[derive(Debug, Clone)]
pub struct UnmapTotals(pub [(u64, u64); RECORD_SLOTS]);

impl Default for UnmapTotals {
    fn default() -> Self {
        UnmapTotals([(0, 0); RECORD_SLOTS])
    }
}

/// How often iommud's epoch timer looks at a domain whose `timer_idle` is set.
pub const IDLE_SCAN_NS: u64 = 20_000_000;

/// A clock read taking longer than this (ns) means the reader was
/// preempted (see [`CpuCounters::note_unmap_start`]).
pub const RECHECK_NS: u64 = 100_000;

/// Unmaps between two clock reads of [`CpuCounters::note_unmap`].
pub const TIME_SAMPLE: u64 = 16;

/// Adds one to a counter whose only writer is the caller (a slot's counters
/// are written under that slot's lock): a plain load and store, no bus lock.
pub fn bump(c: &AtomicU64) {
    bump_by(c, 1);
}

/// [`bump`] by `n` (a batch counts once).
pub fn bump_by(c: &AtomicU64, n: u64) {
    c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
}

impl CpuCounters {
    /// Marks an unmap about to clear entries in this slot (before the
    /// clear; the caller is the slot's only writer): if no unmap is on
    /// record, records the time now as the oldest. A writer preempted
    /// between its clear and [`CpuCounters::note_unmap`] is then still seen
    /// by iommud's timer, which flushes 10 ms after this time and so covers
    /// the clear; a flush that takes this mark before the clear happened
    /// leaves `unmap_oldest` at 0 again, and `note_unmap` records the
    /// unmap afresh. Either way no window goes unmeasured or unbounded.
    ///
    /// The time is read before it is stored: a writer preempted in between
    /// would publish a time long before its clear (a window that never
    /// was), so it reads the clock again and, if that took longer than
    /// [`RECHECK_NS`], moves the mark to the later time (still before the
    /// clear) unless a flush took it meanwhile.
    ///
    /// Returns true when it recorded (the first unmap since iommud's last
    /// take of this slot).
    pub fn note_unmap_start(&self, clock: &EpochPage) -> bool {
        if self.unmap_oldest.load(Ordering::Relaxed) != 0 {
            return false;
        }
        let t = clock.now();
        self.unmap_last.store(t, Ordering::Relaxed);
        self.unmap_oldest.store(t, Ordering::Relaxed);
        let t2 = clock.now();
        if t2.saturating_sub(t) > RECHECK_NS {
            self.unmap_last.store(t2, Ordering::Relaxed);
            let _ = self
                .unmap_oldest
                .compare_exchange(t, t2, Ordering::Relaxed, Ordering::Relaxed);
        }
        true
    }

    /// Records one unmap in this slot, whose entries are cleared and whose
    /// epoch tag was read (see the module docs), with times on `clock`. The
    /// caller must be the slot's only writer (it holds the slot's lock).
    ///
    /// Reading a clock costs as much as the rest of an unmap, so the clock
    /// is read for the first unmap after each take (the oldest: the longest
    /// window stays exact) and for every [`TIME_SAMPLE`]th unmap; the
    /// unmaps in between are charged the sample's time, so the mean window
    /// is estimated from samples at most `TIME_SAMPLE` unmaps apart.
    pub fn note_unmap(&self, clock: &EpochPage) {
        let n = self.unmap_count.load(Ordering::Relaxed).wrapping_add(1);
        let first = self.unmap_oldest.load(Ordering::Relaxed) == 0;
        let t = if first || n.is_multiple_of(TIME_SAMPLE) {
            let t = clock.now();
            self.unmap_last.store(t, Ordering::Relaxed);
            if first {
                // iommud may swap in 0 between the load and the store; then this
                // unmap is simply charged to the next flush (never under-counted).
                self.unmap_oldest.store(t, Ordering::Relaxed);
            }
            t
        } else {
            self.unmap_last.load(Ordering::Relaxed)
        };
        let sum = self.unmap_sum.load(Ordering::Relaxed);
        self.unmap_sum.store(sum.wrapping_add(t), Ordering::Relaxed);
        // Release: whoever sees the new count sees the sum that includes it.
        self.unmap_count.store(n, Ordering::Release);
    }
}

/// [`EpochPage::dead`]: the domain was detached (a stop, a client gone).
pub const DEAD_DETACHED: u32 = 1;
/// [`EpochPage::dead`]: iommud died and a restarted one adopted the domain;
/// the client reattaches (with its token) on its next operation.
pub const DEAD_ADOPTED: u32 = 2;

/// The published page: written by iommud only (copies of its own state),
/// mapped read-only by the client.
#[repr(C)]
#[derive(Debug)]
pub struct EpochPage {
    /// Current epoch (iommud advances it when an invalidation starts).
    pub epoch: AtomicU64,
    /// Highest epoch whose invalidation has completed.
    pub completed: AtomicU64,
    /// [`DEAD_DETACHED`] once iommud has detached the domain (the client
    /// must stop); [`DEAD_ADOPTED`] while a restarted iommud holds the
    /// domain for its client, which should reattach (0 otherwise).
    pub dead: AtomicU32,
    /// The domain's strategy (`proto::Strategy` wire value).
    pub strategy: AtomicU32,
    /// The domain's flush policy (`proto::FlushPolicy` wire value).
    pub flush: AtomicU32,
    /// How many of the service threads serving this domain's rings are
    /// awake: at 0 a client that submits must ring the doorbell (`crate::ring`).
    pub ring_awake: AtomicU32,
    /// 1 while iommud's epoch timer looks at this domain only every
    /// [`IDLE_SCAN_NS`] (nothing waited at its last look): a client that
    /// records the first unmap since then sends a `FlushHint`, so the
    /// timer learns of it at once and still flushes it 10 ms after.
    pub timer_idle: AtomicU32,
    /// Padding (zero).
    pub _reserved: AtomicU32,
    /// [`monotonic_ns`] at initialisation; unmap times are relative to it.
    pub clock_base: AtomicU64,
    /// Time-stamp counter at initialisation (with `tsc_mult`).
    pub tsc_base: AtomicU64,
    /// Nanoseconds per TSC tick in 32.32 fixed point, or 0: then [`EpochPage::now`]
    /// reads `CLOCK_MONOTONIC` instead (see [`tsc_calibration`]).
    pub tsc_mult: AtomicU64,
}

const _: () = assert!(std::mem::size_of::<EpochPage>() <= PUBLISHED_LEN);

/// Page 0 of the client memfd: written by the client, hostile to iommud.
#[repr(C)]
#[derive(Debug)]
pub struct ClientPage {
    /// Highest tag the client waits for.
    pub wanted: AtomicU64,
    /// 1 while a `FlushHint` is on its way and not yet taken by iommud.
    pub hint_pending: AtomicU32,
    /// Padding (zero).
    pub _reserved: AtomicU32,
    /// Client counters per CPU slot.
    pub cpu: [CpuCounters; MAX_CPUS],
}

const _: () = assert!(std::mem::size_of::<ClientPage>() <= EXCHANGE_OFFSET);

/// Views the start of a shared mapping as a `T` made of atomics.
///
/// # Safety
/// `ptr` must point to at least `size_of::<T>()` bytes of shared memory,
/// 64-byte aligned (a mapping's start is page-aligned), that stay mapped for
/// `'a`, and `T` must consist of atomics only (so shared references are the
/// right way to access memory another process writes). A read-only mapping
/// is fine as long as the caller only loads.
pub unsafe fn view<'a, T>(ptr: *mut u8) -> &'a T {
    // SAFETY: guaranteed by the caller.
    unsafe { &*ptr.cast::<T>() }
}

impl EpochPage {
    /// Initialises a fresh page (iommud, before sharing it).
    pub fn init(&self) {
        self.epoch.store(1, Ordering::SeqCst);
        self.completed.store(0, Ordering::SeqCst);
        self.dead.store(0, Ordering::SeqCst);
        self.clock_base
            .store(monotonic_ns().saturating_sub(1), Ordering::SeqCst);
        let (base, mult) = tsc_calibration().unwrap_or((0, 0));
        self.tsc_base.store(base, Ordering::SeqCst);
        self.tsc_mult.store(mult, Ordering::SeqCst);
    }

    /// Nanoseconds since initialisation (never 0), on the clock iommud chose
    /// for the domain: the TSC when it is the system's clock source (a
    /// `rdtsc`, no system call, for the per-unmap timestamps of the fast
    /// path), else `CLOCK_MONOTONIC`. Both processes use the same formula.
    pub fn now(&self) -> u64 {
        let mult = self.tsc_mult.load(Ordering::Relaxed);
        if mult != 0 {
            let ticks = read_tsc().wrapping_sub(self.tsc_base.load(Ordering::Relaxed));
            return ((u128::from(ticks) * u128::from(mult)) >> 32) as u64 + 1;
        }
        monotonic_ns()
            .saturating_sub(self.clock_base.load(Ordering::Relaxed))
            .max(1)
    }
}

impl ClientPage {
    /// Sums one counter over all CPU slots (saturating: the values are the
    /// client's to write).
    pub fn sum(&self, f: impl Fn(&CpuCounters) -> &AtomicU64) -> u64 {
        self.cpu
            .iter()
            .fold(0u64, |a, c| a.saturating_add(f(c).load(Ordering::Relaxed)))
    }

    /// Maximum of one counter over all CPU slots.
    pub fn max(&self, f: impl Fn(&CpuCounters) -> &AtomicU64) -> u64 {
        self.cpu
            .iter()
            .map(|c| f(c).load(Ordering::Relaxed))
            .max()
            .unwrap_or(0)
    }
}

/// Age (ns, at `now`) of the oldest unmap not yet taken by a flush, over
/// `slots`. A recorded time in the future counts as age 0.
pub fn oldest_unmap_age<'a>(slots: impl Iterator<Item = &'a CpuCounters>, now: u64) -> Option<u64> {
    let oldest = slots
        .map(|c| c.unmap_oldest.load(Ordering::SeqCst))
        .filter(|t| *t != 0)
        .min()?;
    Some(now.saturating_sub(oldest))
}

/// Takes the unmap records of `slots` (iommud, before advancing the epoch)
/// against `seen`, iommud's snapshot of each slot's totals: `(oldest, sum,
/// count)` of the unmaps since the last take, or `None`. Every value is read
/// once; wrapping differences, so a client that rewinds its totals only
/// garbles its own figures.
pub fn take_unmaps<'a>(
    slots: impl Iterator<Item = &'a CpuCounters>,
    seen: &mut UnmapTotals,
) -> Option<(u64, u64, u64)> {
    let (mut oldest, mut sum, mut count) = (0u64, 0u64, 0u64);
    for (c, (seen_sum, seen_count)) in slots.zip(seen.0.iter_mut()) {
        let o = c.unmap_oldest.swap(0, Ordering::SeqCst);
        if o != 0 && (oldest == 0 || o < oldest) {
            oldest = o;
        }
        let n = c.unmap_count.load(Ordering::Acquire);
        let s = c.unmap_sum.load(Ordering::Relaxed);
        count = count.saturating_add(n.wrapping_sub(*seen_count));
        sum = sum.wrapping_add(s.wrapping_sub(*seen_sum));
        (*seen_sum, *seen_count) = (s, n);
    }
    (oldest != 0 || count != 0).then_some((oldest, sum, count))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_clocks_agree_with_the_monotonic_clock() {
        let fd = crate::shm::memfd("t", PUBLISHED_LEN).unwrap();
        let m = crate::shm::Mapping::new(std::os::fd::AsFd::as_fd(&fd), 0, PUBLISHED_LEN).unwrap();
        // SAFETY: a fresh page-aligned mapping of PUBLISHED_LEN bytes; EpochPage is atomics.
        let p: &EpochPage = unsafe { view(m.as_ptr()) };
        p.init();
        for tsc in [true, false] {
            if !tsc {
                p.tsc_mult.store(0, Ordering::SeqCst);
            } else if p.tsc_mult.load(Ordering::SeqCst) == 0 {
                continue; // no TSC clock here
            }
            let (a, n0) = (p.now(), monotonic_ns());
            std::thread::sleep(std::time::Duration::from_millis(30));
            let (b, n1) = (p.now(), monotonic_ns());
            let (d, dn) = (b - a, n1 - n0);
            assert!(
                d.abs_diff(dn) < dn / 20 + 200_000,
                "tsc={tsc}: {d} ns vs {dn} ns"
            );
        }
    }
}
