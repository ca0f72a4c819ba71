//! The domain's half of the epoch timer and of storm control
//! (docs/ARCHITECTURE.md, "Timers, priorities and storm budgets"):
//!
//! * [`Domain::timer_due`]: when the timer must next flush this domain (a
//!   wish for an epoch not yet completed: now; else the oldest unflushed
//!   unmap plus [`FLUSH_TIMEOUT_NS`]), never sooner than [`TIMER_MIN_GAP`]
//!   after its previous timed flush, so neither a hostile `wanted` nor
//!   hostile unmap records can make the timer spin;
//! * [`Domain::timer_flush`]: a flush that never waits for the domain's
//!   allocator lock: if a request holds it, the release of what was parked
//!   is owed ([`Domain::release_owed`]) and retried on the timer's next pass
//!   (or done by the next flush that takes the lock anyway);
//! * [`Budget`]: how many flushes per millisecond hints and `FlushSync`
//!   may trigger when no unmap backs them.

use super::*;
use std::time::{Duration, Instant};

/// Flushes per millisecond a domain's hints and `FlushSync` requests may
/// trigger when no unflushed unmap backs them (a client that unmapped since
/// the last flush is never refused: that flush is due anyway).
pub const FLUSH_BUDGET_PER_MS: u64 = 2;
/// Unbacked flushes a domain may trigger in a burst, before the budget.
pub const FLUSH_BUDGET_BURST: u64 = 4;
/// The shortest gap between two timed flushes of one domain.
pub const TIMER_MIN_GAP: Duration = crate::TICK;
/// Longest a connection is held back at once when it exceeds its budget.
pub const MAX_BACKOFF: Duration = Duration::from_millis(2);

/// Nanoseconds one budgeted flush costs in the token bucket.
const TOKEN_NS: u64 = 1_000_000 / FLUSH_BUDGET_PER_MS;

/// A per-domain token bucket for flushes no unmap backs.
#[derive(Debug)]
pub struct Budget {
    inner: Mutex<BudgetState>,
}

#[derive(Debug)]
struct BudgetState {
    /// Credit in nanoseconds, up to `FLUSH_BUDGET_BURST * TOKEN_NS`.
    credit: u64,
    last: Instant,
    /// How long the domain's connection should pause before its next request.
    backoff: Option<Duration>,
}

impl Default for Budget {
    fn default() -> Self {
        Budget {
            inner: Mutex::new(BudgetState {
                credit: FLUSH_BUDGET_BURST * TOKEN_NS,
                last: Instant::now(),
                backoff: None,
            }),
        }
    }
}

impl Budget {
    /// Takes one flush from the budget at `now`: `true` if there was one.
    /// Otherwise the connection is asked to pause until the next token
    /// (at most [`MAX_BACKOFF`]), so a client that floods requests is
    /// slowed down by its own socket filling up.
    pub fn take(&self, now: Instant) -> bool {
        let mut s = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let elapsed = now.saturating_duration_since(s.last).as_nanos();
        s.last = now;
        let elapsed = u64::try_from(elapsed).unwrap_or(u64::MAX);
        s.credit = s
            .credit
            .saturating_add(elapsed)
            .min(FLUSH_BUDGET_BURST * TOKEN_NS);
        if s.credit >= TOKEN_NS {
            s.credit -= TOKEN_NS;
            return true;
        }
        let wait = Duration::from_nanos(TOKEN_NS - s.credit).min(MAX_BACKOFF);
        s.backoff = Some(s.backoff.map_or(wait, |b| b.max(wait)));
        false
    }

    /// The pause owed by the last requests over budget, once.
    pub fn take_backoff(&self) -> Option<Duration> {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .backoff
            .take()
    }
}

/// What [`Domain::timer_flush`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimerFlush {
    /// Flushed, and what waited for it released.
    Done,
    /// Flushed; the allocator lock was busy, so the release is owed.
    ReleaseOwed,
}

impl Domain {
    /// True when a client's wish (bounded by iommud's own epoch) or iommud's
    /// own unmaps wait for an epoch not yet completed.
    pub fn wants_flush(&self) -> bool {
        let wanted = self
            .client()
            .wanted
            .load(SeqCst)
            .min(self.epoch())
            .max(self.server_wanted.load(SeqCst));
        self.completed() < wanted
    }

    /// True when an unmap not yet taken by a flush is on record (the
    /// client's records are its own to write: faking them only earns the
    /// flushes a client that really unmaps would get).
    pub fn has_unflushed_unmaps(&self) -> bool {
        self.oldest_unmap_age().is_some()
    }

    /// When the epoch timer must next flush this domain, given `now` and
    /// its previous timed flush; `None` when nothing waits.
    pub fn timer_due(&self, now: Instant, last: Option<Instant>) -> Option<Instant> {
        if self.is_dead() {
            return None;
        }
        let by_wish = self.wants_flush().then_some(now);
        // Past deadlines stay in the past, so the timer's lateness shows.
        let by_age = self.oldest_unmap_age().map(|age| {
            if age <= FLUSH_TIMEOUT_NS {
                now + Duration::from_nanos(FLUSH_TIMEOUT_NS - age)
            } else {
                let over = Duration::from_nanos(age - FLUSH_TIMEOUT_NS);
                now.checked_sub(over).unwrap_or(now)
            }
        });
        let due = match (by_wish, by_age) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b)?,
        };
        Some(match last {
            Some(l) => due.max(l + TIMER_MIN_GAP),
            None => due,
        })
    }

    /// The timer's flush: completes the current epoch, then releases what
    /// waited for it only if the allocator lock is free right now; if a
    /// request holds it, the release is owed and retried later
    /// ([`Domain::retry_release`]). Never waits for a lock: if another flush
    /// of the domain is running (a connection thread's, which the load may
    /// preempt), the timer flushes beside it at once, as the deadline asks,
    /// and a duplicate invalidation is the price; otherwise it first checks
    /// that a wish or an unmap record that old is still there, and when the
    /// flush before it covered them, makes none.
    pub fn timer_flush(&self) -> Result<TimerFlush, DomainError> {
        let guard = crate::timer::try_lock(&self.flush_lock);
        if guard.is_some() {
            let aged = self
                .oldest_unmap_age()
                .is_some_and(|age| age >= FLUSH_TIMEOUT_NS);
            if !aged && !self.wants_flush() {
                return Ok(TimerFlush::Done);
            }
        }
        // As for a hint: clear the flag before the epoch advances.
        self.client().hint_pending.store(0, SeqCst);
        let e = self.flush_epoch(self.unit.iotlb_domain(self.did))?;
        drop(guard);
        stats::add(&self.stats.timer_flushes, 1);
        Ok(self.try_release(e))
    }

    /// Publishes whether the timer now looks at this domain only every
    /// `IDLE_SCAN_NS`. Setting it re-checks the records after a fence (the
    /// client stores its record, fences, then reads the flag): if an unmap
    /// or a wish appeared meanwhile the flag is withdrawn and false returned.
    pub fn set_timer_idle(&self, idle: bool) -> bool {
        let p = self.page();
        if !idle {
            if p.timer_idle.load(SeqCst) != 0 {
                p.timer_idle.store(0, SeqCst);
            }
            return true;
        }
        if p.timer_idle.load(SeqCst) == 0 {
            p.timer_idle.store(1, SeqCst);
            std::sync::atomic::fence(SeqCst);
            if self.has_unflushed_unmaps() || self.wants_flush() {
                p.timer_idle.store(0, SeqCst);
                return false;
            }
        }
        true
    }

    /// True while the published page says the timer looks only every `IDLE_SCAN_NS`.
    pub fn timer_idle(&self) -> bool {
        self.page().timer_idle.load(SeqCst) != 0
    }

    /// An epoch whose release is owed (0: none).
    pub fn release_owed(&self) -> u64 {
        self.release_owed.load(SeqCst)
    }

    /// Retries an owed release without waiting for the lock.
    pub fn retry_release(&self) -> TimerFlush {
        match self.release_owed.swap(0, SeqCst) {
            0 => TimerFlush::Done,
            e => self.try_release(e),
        }
    }

    fn try_release(&self, e: u64) -> TimerFlush {
        let Some(guard) = crate::timer::try_lock(&self.inner) else {
            stats::add(&self.stats.timer_lock_busy, 1);
            self.release_owed.fetch_max(e, SeqCst);
            return TimerFlush::ReleaseOwed;
        };
        stats::add(&self.stats.lock_acquisitions, 1);
        self.release_locked(guard, e);
        TimerFlush::Done
    }

    /// True when the unit runs in caching mode (a map needs a flush too).
    pub fn unit_caching_mode(&self) -> bool {
        self.unit.caching_mode()
    }

    /// Test hook: holds the allocator lock, as a long request would.
    #[cfg(test)]
    pub(super) fn hold_lock(&self) -> MutexGuard<'_, Inner> {
        self.lock_uncounted()
    }
}
