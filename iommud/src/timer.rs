//! iommud's background duties as two threads that sleep until they are due
//! (docs/ARCHITECTURE.md, "Timers, priorities and storm budgets"):
//!
//! * the **epoch timer** ([`epoch_timer`]): one pass flushes every domain
//!   whose flush is due ([`crate::domain::Domain::timer_due`]) and computes
//!   the earliest next deadline over all domains; the thread then sleeps
//!   until it, or until a hint over its budget [`Wake::kick`]s it. Each
//!   domain's timer state (its last timed flush, whether it is active) is
//!   this thread's own, and a flush never waits for a domain's allocator
//!   lock, so a busy domain delays no other. The thread asks for a real-time
//!   priority where it may (see [`raise_priority`]).
//! * the **fault poller** ([`fault_poller`]): fault records can only be
//!   polled; every [`FAULT_POLL_IDLE`] while none arrive, every
//!   [`FAULT_POLL_BUSY`] for [`FAULT_BUSY_FOR`] after one did.
//!
//! With no traffic, iommud then wakes about 1000 / 10 = 100 times a second
//! for faults and not at all for epochs.

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
/// this long to be read (see docs/ARCHITECTURE.md for why 10 ms).
pub const FAULT_POLL_IDLE: Duration = Duration::from_millis(10);
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
/// Longest sleep with nothing due (a kick or a deadline comes sooner).
pub const IDLE_SLEEP: Duration = Duration::from_secs(1);

/// A wake-up for a sleeping thread (a flag and a condition variable).
#[derive(Debug, Default)]
pub struct Wake {
    kicked: Mutex<bool>,
    cv: Condvar,
}

impl Wake {
    /// Wakes the sleeper now (or makes its next sleep return at once).
    pub fn kick(&self) {
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
}

impl EpochTimer {
    /// One pass at `now` over `domains`: flushes those due, returns when the
    /// next pass is due (`None`: nothing is).
    pub fn pass(&mut self, domains: &[Arc<Domain>], now: Instant) -> Option<Instant> {
        self.passes += 1;
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
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        d.timer_flush()
                    }));
                    match r {
                        Ok(Ok(TimerFlush::Done)) => {}
                        Ok(Ok(TimerFlush::ReleaseOwed)) => at(now + REVISIT),
                        Ok(Err(e)) => log::warn(&format!("{}: timed flush failed: {e}", Bdf(d.sid))),
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
            live.insert(key, t);
        }
        self.doms = live;
        next
    }
}

/// The scheduling class the calling thread got from [`raise_priority`].
pub fn raise_priority() -> &'static str {
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 1 };
        // SAFETY: sets the calling thread's scheduling policy; `param` is a
        // valid sched_param that outlives the call.
        let rc =
            unsafe { libc::pthread_setschedparam(libc::pthread_self(), libc::SCHED_FIFO, &param) };
        if rc == 0 {
            return "SCHED_FIFO priority 1";
        }
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::syscall(libc::SYS_gettid) };
        // SAFETY: setpriority on this thread's own id (Linux: per-thread nice).
        let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, -20) };
        if rc == 0 {
            return "nice -20";
        }
    }
    "normal priority (neither SCHED_FIFO nor nice -20 permitted)"
}

/// Runs the epoch timer until `st.stop` (kick [`State::timer`] after setting it).
pub fn epoch_timer(st: &State) {
    log::info(&format!("epoch timer: {}", raise_priority()));
    let mut timer = EpochTimer::default();
    while !st.stop.load(SeqCst) {
        let doms: Vec<Arc<Domain>> = st
            .domains
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        let now = Instant::now();
        let next = timer.pass(&doms, now);
        drop(doms);
        let deadline = next.unwrap_or(now + IDLE_SLEEP).min(now + IDLE_SLEEP);
        st.timer.sleep_until(deadline);
    }
}

/// Polls fault records until `st.stop`: every [`FAULT_POLL_IDLE`], or
/// [`FAULT_POLL_BUSY`] for a while after faults arrived.
pub fn fault_poller(st: &State) {
    let mut busy_until: Option<Instant> = None;
    while !st.stop.load(SeqCst) {
        let n = st.poll_faults();
        let now = Instant::now();
        if n > 0 {
            busy_until = Some(now + FAULT_BUSY_FOR);
        }
        let period = if busy_until.is_some_and(|b| b > now) {
            FAULT_POLL_BUSY
        } else {
            FAULT_POLL_IDLE
        };
        std::thread::sleep(period);
    }
}

/// Storm control for a `FlushHint` from `d`'s client: within the budget (or
/// backed by an unflushed unmap) the flush happens now; over it the hint is
/// coalesced into the timer's next flush of the domain (counted), the
/// timer is woken, and the connection pauses.
pub fn on_hint(st: &State, d: &Domain) -> Result<(), crate::domain::DomainError> {
    if d.has_unflushed_unmaps() || d.budget.take(Instant::now()) {
        d.flush_if_wanted()?;
    } else {
        stats::add(&d.stats.hints_coalesced, 1);
        st.timer.kick();
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
