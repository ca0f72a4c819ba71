//! iommud's background duties in one thread that sleeps until the next is
//! due (docs/ARCHITECTURE.md, "Timers, priorities and storm budgets"):
//!
//! * the **epoch timer** ([`EpochTimer::pass`]): one pass flushes every domain
//!   whose flush is due ([`crate::domain::Domain::timer_due`]) and computes
//!   the earliest next deadline over all domains; the thread then sleeps
//!   until it, or until a hint over its budget [`Wake::kick`]s it. Each
//!   domain's timer state (its last timed flush, whether it is active) is
//!   this thread's own, and a flush never waits for a domain's allocator
//!   lock, so a busy domain delays no other. The thread asks for a real-time
//!   priority where it may (see [`raise_priority`]).
//! * the **fault poll**: fault records can only be polled; every
//!   [`FAULT_POLL_IDLE`] while none arrive, every [`FAULT_POLL_BUSY`] for
//!   [`FAULT_BUSY_FOR`] after one did.
//!
//! With no traffic the thread wakes 50 times a second (a fault poll and a
//! pass that finds nothing due: a few hundred loads per domain) instead of
//! 500, and every wake-up costs 25-110 microseconds on these VMs.

use crate::domain::{Domain, TimerFlush};
use crate::session::State;
use crate::stats;
use crate::unit::log;
use iommu_abi::Bdf;
use std::collections::HashMap;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Fault-poll period while no fault arrives: a fault record waits at most
/// this long to be read (see docs/ARCHITECTURE.md for why 20 ms).
pub const FAULT_POLL_IDLE: Duration = Duration::from_millis(20);
/// Fault-poll period while faults arrive.
pub const FAULT_POLL_BUSY: Duration = Duration::from_millis(1);
/// How long after a fault the poller stays at [`FAULT_POLL_BUSY`].
pub const FAULT_BUSY_FOR: Duration = Duration::from_millis(200);
/// After a timed flush, the timer looks at the domain again every tick for
/// this long: a busy client raises `wanted` without a hint (only every
/// eighth batch hints) and gets its batches back within a tick.
pub const ACTIVE_FOR: Duration = Duration::from_millis(10);
/// How soon an owed release (the domain's lock was busy) is retried.
pub const REVISIT: Duration = Duration::from_micros(500);
/// Longest sleep of the epoch timer. A client's unmap on the fast path
/// sends no message, so the timer learns of the first unmap after a quiet
/// spell only by looking: it looks at least this often, and an unmap seen
/// up to this late is still flushed by its deadline (unmap + 10 ms).
pub const SCAN_PERIOD: Duration = Duration::from_nanos(crate::domain::FLUSH_TIMEOUT_NS);
/// The scan period once every domain is idle (nothing waited at the last
/// look): each domain's published `timer_idle` then asks its client to hint
/// on the first unmap it records, which wakes the timer at once.
pub const IDLE_SCAN: Duration = Duration::from_nanos(iommu_abi::shared::IDLE_SCAN_NS);

/// What the real-time timer does instead of waiting for a lock: the guard
/// when `m` is free (poison recovered, as everywhere in iommud), `None` when
/// another thread holds it.
pub(crate) fn try_lock<T>(m: &Mutex<T>) -> Option<std::sync::MutexGuard<'_, T>> {
    match m.try_lock() {
        Ok(g) => Some(g),
        Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => None,
    }
}

/// A wake-up for a sleeping thread (a flag and a condition variable).
#[derive(Debug, Default)]
pub struct Wake {
    kicked: Mutex<bool>,
    cv: Condvar,
    /// Kicks so far (`timer_kicks` in the daemon's stats).
    pub kicks: std::sync::atomic::AtomicU64,
}

impl Wake {
    /// Wakes the sleeper now (or makes its next sleep return at once).
    pub fn kick(&self) {
        stats::add(&self.kicks, 1);
        *self.kicked.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.cv.notify_all();
    }

    /// Sleeps until `deadline` or a kick; true if kicked.
    pub fn sleep_until(&self, deadline: Instant) -> bool {
        let mut k = self.kicked.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if std::mem::take(&mut *k) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            k = self
                .cv
                .wait_timeout(k, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// The timer thread's own state of one domain.
#[derive(Debug, Default, Clone, Copy)]
struct DomTimer {
    last_flush: Option<Instant>,
    active_until: Option<Instant>,
}

/// The epoch timer's per-domain state, kept by its thread only.
#[derive(Debug, Default)]
pub struct EpochTimer {
    doms: HashMap<usize, DomTimer>,
    /// Passes run (for tests and the idle measurement).
    pub passes: u64,
    /// At the last pass, every domain was idle (`timer_idle` published).
    pub all_idle: bool,
}

impl EpochTimer {
    /// One pass at `now` over `domains`: flushes those due, returns when the
    /// next pass is due (`None`: nothing is).
    pub fn pass(&mut self, domains: &[Arc<Domain>], now: Instant) -> Option<Instant> {
        self.passes += 1;
        let mut all_idle = true;
        let mut next: Option<Instant> = None;
        let mut at = |t: Instant| next = Some(next.map_or(t, |n: Instant| n.min(t)));
        let mut live = HashMap::with_capacity(domains.len());
        for d in domains {
            let key = Arc::as_ptr(d) as usize;
            let mut t = self.doms.get(&key).copied().unwrap_or_default();
            if d.is_dead() {
                continue;
            }
            if d.release_owed() != 0 && d.retry_release() == TimerFlush::ReleaseOwed {
                at(now + REVISIT);
            }
            let active = t.active_until.is_some_and(|a| a > now);
            let due = d.timer_due(now, t.last_flush);
            match due {
                Some(due) if due <= now => {
                    let late = now.saturating_duration_since(due).as_nanos();
                    stats::max(
                        &d.stats.timer_late_max_ns,
                        u64::try_from(late).unwrap_or(u64::MAX),
                    );
                    let r =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| d.timer_flush()));
                    match r {
                        Ok(Ok(TimerFlush::Done)) => {}
                        Ok(Ok(TimerFlush::ReleaseOwed)) => at(now + REVISIT),
                        Ok(Err(e)) => {
                            log::warn(&format!("{}: timed flush failed: {e}", Bdf(d.sid)))
                        }
                        Err(_) => log::warn(&format!("{}: timed flush panicked", Bdf(d.sid))),
                    }
                    t.last_flush = Some(now);
                    t.active_until = Some(now + ACTIVE_FOR);
                    at(now + crate::TICK);
                }
                Some(due) => at(if active {
                    due.min(now + crate::TICK)
                } else {
                    due
                }),
                None if active => at(now + crate::TICK),
                None => {}
            }
            let idle = due.is_none() && !active;
            if !d.set_timer_idle(idle) {
                // An unmap appeared while the flag went up: look again now.
                at(now);
            }
            all_idle &= idle;
            live.insert(key, t);
        }
        self.doms = live;
        self.all_idle = all_idle;
        next
    }
}

/// Raises the calling thread's priority: a real-time class (`SCHED_FIFO`,
/// lowest priority) when `realtime` is allowed and permitted, else nice -20
/// when permitted, else nothing; says which it got.
///
/// A real-time thread must never wait for a lock by spinning and yielding
/// alone: `sched_yield` hands its CPU to no thread of a lower class, so a
/// holder preempted on that CPU would not run until the kernel's real-time
/// throttling steps in (hundreds of milliseconds; seen here with the sim
/// model's cross-process lock, which therefore sleeps after a while).
/// iommud's own locks sleep.
pub fn raise_priority(realtime: bool) -> &'static str {
    #[cfg(target_os = "linux")]
    if realtime {
        let param = libc::sched_param { sched_priority: 1 };
        // SAFETY: sets the calling thread's scheduling policy; `param` is a
        // valid sched_param that outlives the call.
        let rc =
            unsafe { libc::pthread_setschedparam(libc::pthread_self(), libc::SCHED_FIFO, &param) };
        if rc == 0 {
            return "SCHED_FIFO priority 1";
        }
    }
    #[cfg(target_os = "linux")]
    {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::syscall(libc::SYS_gettid) };
        // SAFETY: setpriority on this thread's own id (Linux: per-thread nice).
        let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, -20) };
        if rc == 0 {
            return "nice -20";
        }
    }
    let _ = realtime;
    "normal priority (no raise permitted)"
}

/// Runs the background duties (fault poll, epoch timer) until `st.stop`
/// (kick [`State::timer`] after setting it).
pub fn ticker(st: &State) {
    let got = raise_priority(true);
    log::info(&format!("epoch timer: {got}"));
    let mut timer = EpochTimer::default();
    let mut faults = FaultPoll::default();
    // The last list of domains the timer read, held weakly (a detached
    // domain is not kept alive by it).
    let mut known: Vec<std::sync::Weak<Domain>> = Vec::new();
    while !st.stop.load(SeqCst) {
        // Never wait for the domain list: an attach holds it while it builds
        // the new domain, in a connection thread the load may preempt for
        // tens of milliseconds (a timer blocked there was seen 60-370 ms
        // late with 12 busy clients attaching). Then the last list serves,
        // and the timer looks again soon.
        let (doms, fresh): (Vec<Arc<Domain>>, bool) = match try_lock(&st.domains) {
            Some(g) => (g.values().cloned().collect(), true),
            None => (
                known.iter().filter_map(std::sync::Weak::upgrade).collect(),
                false,
            ),
        };
        if fresh {
            known = doms.iter().map(Arc::downgrade).collect();
        }
        let now = Instant::now();
        let poll_at = faults.run_if_due(st, now);
        let next = timer.pass(&doms, now);
        let scan = now
            + if timer.all_idle {
                IDLE_SCAN
            } else {
                SCAN_PERIOD
            };
        let mut deadline = next.unwrap_or(scan).min(scan).min(poll_at);
        if !fresh {
            deadline = deadline.min(now + REVISIT);
        }
        drop(doms);
        st.timer.sleep_until(deadline);
    }
}

/// The fault poll's schedule: every [`FAULT_POLL_IDLE`], or
/// [`FAULT_POLL_BUSY`] for [`FAULT_BUSY_FOR`] after faults arrived.
#[derive(Debug, Default)]
struct FaultPoll {
    next: Option<Instant>,
    busy_until: Option<Instant>,
}

impl FaultPoll {
    /// Polls if due at `now`; returns when the next poll is due.
    fn run_if_due(&mut self, st: &State, now: Instant) -> Instant {
        if self.next.is_some_and(|n| n > now) {
            return self.next.unwrap_or(now);
        }
        if st.poll_faults() > 0 {
            self.busy_until = Some(now + FAULT_BUSY_FOR);
        }
        let period = if self.busy_until.is_some_and(|b| b > now) {
            FAULT_POLL_BUSY
        } else {
            FAULT_POLL_IDLE
        };
        let next = now + period;
        self.next = Some(next);
        next
    }
}

/// Storm control for a `FlushHint` from `d`'s client: within the budget (or
/// backed by an unflushed unmap) the flush happens now; over it the hint is
/// coalesced into the timer's next flush of the domain (counted) and the
/// connection pauses.
pub fn on_hint(st: &State, d: &Domain) -> Result<(), crate::domain::DomainError> {
    if d.timer_idle() {
        // The client's first unmap since the timer went idle.
        st.timer.kick();
    }
    if d.has_unflushed_unmaps() || d.budget.take(Instant::now()) {
        d.flush_if_wanted()?;
    } else {
        // The timer sees the wish at its next look at the domain (within a
        // tick while the domain is active, 10 ms otherwise; an idle timer was
        // woken above): a storm of hints costs no wake-up of its own.
        stats::add(&d.stats.hints_coalesced, 1);
        // Taken: the client may hint again (its wish stays in `wanted`).
        d.client()
            .hint_pending
            .store(0, std::sync::atomic::Ordering::SeqCst);
    }
    Ok(())
}

/// Storm control for a `FlushSync` from `d`'s client: the flush always
/// happens (the client needs it done), but one no unmap backs, over the
/// budget, pauses the connection (counted).
pub fn on_sync(d: &Domain) {
    if d.has_unflushed_unmaps() || d.unit_caching_mode() || d.budget.take(Instant::now()) {
        return;
    }
    stats::add(&d.stats.syncs_throttled, 1);
}
