//! Layout of the memory iommud shares with each attached client.
//!
//! One memfd per domain, [`SHARED_LEN`] bytes:
//!
//! * page 0, [`DomainPage`]: the invalidation epochs and the client's
//!   fast-path counters (one block per CPU slot, so iommud can serve the
//!   domain's `stats` path without asking the client);
//! * page 1, the exchange area: up to [`EXCHANGE_SLOTS`] IOVAs a magazine
//!   exchange hands back or out (the 64-byte messages carry only counts).
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
//! `wanted`, so no request is lost between the two.
//!
//! ## Stale window (how long an unmapped IOVA stays un-invalidated)
//!
//! Whoever clears entries (the client on its fast path, iommud for the
//! unmaps it does itself) calls [`DomainPage::note_unmap`] *after* reading
//! the epoch tag: it records, in its CPU slot (so the fast path writes no
//! line another CPU writes), the time of the oldest unmap not yet taken by a
//! flush, and the sum and count of unmap times. iommud takes the records of
//! all slots ([`DomainPage::take_unmaps`]) *before* it advances the epoch, and when the
//! invalidation completes, `now - oldest` is the flush's longest window and
//! `count * now - sum` the sum of its windows. An unmap recorded after the
//! take is charged to the next flush (never under-estimated): if its record
//! precedes the take, its epoch read preceded the epoch advance, so this
//! flush covers it.
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

/// First IOVA of a magazine domain's IOVA space. Leaf table `i` of the
/// domain's arena maps `[MAGAZINE_IOVA_BASE + i * 2 MiB, + 2 MiB)`, so the
/// entry of IOVA `v` is at arena offset `((v - MAGAZINE_IOVA_BASE) >> 12) * 8`.
pub const MAGAZINE_IOVA_BASE: u64 = 1 << 30;

/// Bytes of the shared memfd.
pub const SHARED_LEN: usize = 2 * 4096;
/// Offset of the exchange area.
pub const EXCHANGE_OFFSET: usize = 4096;
/// IOVAs that fit in the exchange area.
pub const EXCHANGE_SLOTS: usize = 4096 / 8;
/// CPU slots with their own counter block.
pub const MAX_CPUS: usize = 32;

/// The client's per-CPU-slot counters (written by the client only, under the
/// slot's lock, read by iommud at any time), and the slot's unmap record for
/// the stale window (written with atomics by the client; taken by iommud).
/// One cache line per slot.
#[repr(C, align(64))]
#[derive(Debug, Default)]
pub struct CpuCounters {
    /// Fast-path maps.
    pub maps: AtomicU64,
    /// Fast-path unmaps.
    pub unmaps: AtomicU64,
    /// Maps served from a CPU-local magazine.
    pub mag_hits: AtomicU64,
    /// Maps that found the CPU's magazines empty.
    pub mag_misses: AtomicU64,
    /// Dirty batches completed into clean magazines without IPC.
    pub batches_recycled: AtomicU64,
    /// Time of the slot's oldest unmap not yet taken by a flush (0 = none).
    pub unmap_oldest: AtomicU64,
    /// Sum of the times of the slot's unmaps not yet taken by a flush.
    pub unmap_sum: AtomicU64,
    /// Number of the slot's unmaps not yet taken by a flush.
    pub unmap_count: AtomicU64,
}

const _: () = assert!(std::mem::size_of::<CpuCounters>() == 64);

/// Page 0 of the shared memfd.
#[repr(C)]
#[derive(Debug)]
pub struct DomainPage {
    /// Current epoch (iommud advances it when an invalidation starts).
    pub epoch: AtomicU64,
    /// Highest epoch whose invalidation has completed.
    pub completed: AtomicU64,
    /// Highest tag a client waits for.
    pub wanted: AtomicU64,
    /// 1 while a `FlushHint` is on its way and not yet taken by iommud.
    pub hint_pending: AtomicU32,
    /// Nonzero once iommud has detached the domain (client must stop).
    pub dead: AtomicU32,
    /// The domain's strategy (`proto::Strategy` wire value), written by iommud.
    pub strategy: AtomicU32,
    /// The domain's flush policy (`proto::FlushPolicy` wire value), written by iommud.
    pub flush: AtomicU32,
    /// [`monotonic_ns`] at initialisation; unmap times are relative to it.
    pub clock_base: AtomicU64,
    /// Client counters per CPU slot.
    pub cpu: [CpuCounters; MAX_CPUS],
}

const _: () = assert!(std::mem::size_of::<DomainPage>() <= EXCHANGE_OFFSET);

impl DomainPage {
    /// Views the start of a shared mapping as the domain page.
    ///
    /// # Safety
    /// `ptr` must point to at least `size_of::<DomainPage>()` bytes of shared
    /// memory, 8-byte aligned, that stay mapped for `'a` and are only ever
    /// accessed atomically (which holds for the memfds iommud creates: every
    /// field is an atomic).
    pub unsafe fn from_ptr<'a>(ptr: *mut u8) -> &'a DomainPage {
        // SAFETY: guaranteed by the caller; all fields are atomics, so shared
        // references are the right way to access memory another process writes.
        unsafe { &*ptr.cast::<DomainPage>() }
    }

    /// Initialises a fresh page (iommud, before sharing it).
    pub fn init(&self) {
        self.epoch.store(1, Ordering::SeqCst);
        self.completed.store(0, Ordering::SeqCst);
        self.wanted.store(0, Ordering::SeqCst);
        self.hint_pending.store(0, Ordering::SeqCst);
        self.dead.store(0, Ordering::SeqCst);
        self.clock_base
            .store(monotonic_ns().saturating_sub(1), Ordering::SeqCst);
        for c in &self.cpu {
            c.unmap_oldest.store(0, Ordering::SeqCst);
            c.unmap_sum.store(0, Ordering::SeqCst);
            c.unmap_count.store(0, Ordering::SeqCst);
        }
    }

    /// Nanoseconds since initialisation (never 0).
    pub fn now(&self) -> u64 {
        monotonic_ns()
            .saturating_sub(self.clock_base.load(Ordering::Relaxed))
            .max(1)
    }

    /// Records one unmap in CPU slot `slot` (modulo the slots) whose entries
    /// are cleared and whose epoch tag was read (see the module docs).
    pub fn note_unmap(&self, slot: usize) {
        let c = &self.cpu[slot % MAX_CPUS];
        let t = self.now();
        let _ = c
            .unmap_oldest
            .compare_exchange(0, t, Ordering::SeqCst, Ordering::SeqCst);
        c.unmap_sum.fetch_add(t, Ordering::SeqCst);
        c.unmap_count.fetch_add(1, Ordering::SeqCst);
    }

    /// Age (ns) of the oldest unmap not yet taken by a flush.
    pub fn oldest_unmap_age(&self) -> Option<u64> {
        let oldest = self
            .cpu
            .iter()
            .map(|c| c.unmap_oldest.load(Ordering::SeqCst))
            .filter(|t| *t != 0)
            .min()?;
        Some(self.now().saturating_sub(oldest))
    }

    /// Takes the unmap records of all slots (iommud, before advancing the
    /// epoch): `(oldest, sum, count)` or `None` if no unmap is waiting.
    pub fn take_unmaps(&self) -> Option<(u64, u64, u64)> {
        let (mut oldest, mut sum, mut count) = (0u64, 0u64, 0u64);
        for c in &self.cpu {
            let o = c.unmap_oldest.swap(0, Ordering::SeqCst);
            if o != 0 && (oldest == 0 || o < oldest) {
                oldest = o;
            }
            count += c.unmap_count.swap(0, Ordering::SeqCst);
            sum = sum.wrapping_add(c.unmap_sum.swap(0, Ordering::SeqCst));
        }
        (oldest != 0 || count != 0).then_some((oldest, sum, count))
    }

    /// Sums one counter over all CPU slots.
    pub fn sum(&self, f: impl Fn(&CpuCounters) -> &AtomicU64) -> u64 {
        self.cpu.iter().map(|c| f(c).load(Ordering::Relaxed)).sum()
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
