//! Counters, rendered as `key value` lines for the scheme paths.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Counters of one remapping unit.
#[derive(Debug, Default)]
pub struct UnitStats {
    /// Global IOTLB invalidations.
    pub iotlb_global: AtomicU64,
    /// Domain-selective IOTLB invalidations.
    pub iotlb_domain: AtomicU64,
    /// Page-selective IOTLB invalidations.
    pub iotlb_page: AtomicU64,
    /// Context-cache invalidations.
    pub context: AtomicU64,
    /// Other descriptors.
    pub other: AtomicU64,
    /// Wait descriptors (one per submission).
    pub waits: AtomicU64,
    /// Failed submissions (timeouts, queue errors).
    pub errors: AtomicU64,
    /// Acquisitions of the invalidation-queue lock.
    pub qi_lock: AtomicU64,
    /// Faults recorded.
    pub faults: AtomicU64,
    /// Fault overflows (faults the hardware could not record).
    pub faults_lost: AtomicU64,
}

/// Counters iommud keeps per domain (the client's fast-path counters live in
/// the shared domain page and are added when rendering).
#[derive(Debug, Default)]
pub struct DomainStats {
    /// Maps done by iommud (global strategy).
    pub maps: AtomicU64,
    /// Unmaps done by iommud.
    pub unmaps: AtomicU64,
    /// Requests answered (blocking round trips).
    pub ipc_round_trips: AtomicU64,
    /// One-way flush hints received.
    pub wakeups: AtomicU64,
    /// Depot exchanges.
    pub depot_exchanges: AtomicU64,
    /// Magazines served from the depot without touching the allocator.
    pub depot_hits: AtomicU64,
    /// Acquisitions of the domain's allocator lock.
    pub lock_acquisitions: AtomicU64,
    /// Invalidations issued for this domain, by granularity.
    pub inval_domain: AtomicU64,
    /// Page-selective invalidations for this domain.
    pub inval_page: AtomicU64,
    /// Longest stale window of server-side unmaps (ns).
    pub stale_ns_max: AtomicU64,
    /// Sum of server-side stale windows (ns).
    pub stale_ns_sum: AtomicU64,
    /// Server-side unmaps measured.
    pub stale_count: AtomicU64,
    /// Page-table pages freed after their invalidation.
    pub pt_freed: AtomicU64,
    /// Faults of this domain's device.
    pub faults: AtomicU64,
    /// Rejected requests.
    pub errors: AtomicU64,
    /// Hostile or inconsistent input from shared memory that iommud refused
    /// (an IOVA returned that was not delegated, or returned twice).
    pub rejected: AtomicU64,
    /// Requests refused because the owner's quota was used up.
    pub quota_refusals: AtomicU64,
    /// Ring entries served (maps and unmaps through the rings).
    pub ring_entries: AtomicU64,
    /// Passes over the rings that found work.
    pub ring_passes: AtomicU64,
    /// Times the service thread went to sleep on this domain's doorbell.
    pub ring_sleeps: AtomicU64,
    /// Doorbells rung by the client (eventfd wake-ups seen).
    pub ring_doorbells: AtomicU64,
    /// Ring passes with entries made by a thread other than the ring's
    /// home, which slept (it is woken).
    pub ring_helped: AtomicU64,
    /// Strict ring unmaps invalidated, and the invalidations that covered them.
    pub ring_strict_unmaps: AtomicU64,
    /// Invalidations issued for strict ring batches (page-selective with
    /// address masks, or domain-selective when that is cheaper).
    pub ring_strict_invals: AtomicU64,
    /// Time the service threads spent in passes over this domain's rings
    /// that found work (ns): the server's side of the ring path.
    pub ring_busy_ns: AtomicU64,
    /// Of `ring_busy_ns`: writing and clearing entries at a pass's end.
    pub ring_write_ns: AtomicU64,
    /// Of `ring_busy_ns`: the passes' invalidations (issued and waited for).
    pub ring_inval_ns: AtomicU64,
    /// Passes of lazy entries held (their invalidation and completions after
    /// other work; `iommu_abi::ring::SQE_LAZY`).
    pub ring_held: AtomicU64,
    /// Remap entries answered with their old IOVA, no entry changed
    /// (`iommu_abi::ring::SQE_KEEP` under `percore` or `deferred`).
    pub ring_kept: AtomicU64,
    /// Flushes made by the epoch timer.
    pub timer_flushes: AtomicU64,
    /// The latest the epoch timer ran a flush after its deadline (ns).
    pub timer_late_max_ns: AtomicU64,
    /// Timer flushes whose release waited for a busy allocator lock (owed,
    /// retried on a later pass).
    pub timer_lock_busy: AtomicU64,
    /// Hints over the flush budget, left to the timer's next flush.
    pub hints_coalesced: AtomicU64,
    /// `FlushSync` requests over the flush budget (served, the connection paused).
    pub syncs_throttled: AtomicU64,
}

/// Builder of `key value` text.
#[derive(Default)]
pub struct Text(pub String);

impl Text {
    /// Appends one line.
    pub fn kv(&mut self, key: &str, v: impl std::fmt::Display) -> &mut Self {
        let _ = writeln!(self.0, "{key} {v}");
        self
    }
}

/// Loads a counter.
pub fn get(c: &AtomicU64) -> u64 {
    c.load(Relaxed)
}

/// Raises `c` to at least `v`.
pub fn max(c: &AtomicU64, v: u64) {
    c.fetch_max(v, Relaxed);
}

/// Adds `v`.
pub fn add(c: &AtomicU64, v: u64) {
    c.fetch_add(v, Relaxed);
}

impl UnitStats {
    /// Renders the unit-wide lines.
    pub fn render(&self, t: &mut Text) {
        let g = get(&self.iotlb_global);
        let d = get(&self.iotlb_domain);
        let p = get(&self.iotlb_page);
        t.kv("invalidations", g + d + p)
            .kv("invalidations_global", g)
            .kv("invalidations_domain", d)
            .kv("invalidations_page", p)
            .kv("invalidations_context", get(&self.context))
            .kv("invalidation_waits", get(&self.waits))
            .kv("invalidation_errors", get(&self.errors))
            .kv("qi_lock_acquisitions", get(&self.qi_lock))
            .kv("faults", get(&self.faults))
            .kv("faults_lost", get(&self.faults_lost));
    }
}
