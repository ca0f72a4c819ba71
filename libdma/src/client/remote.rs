//! The magazines' backend: iommud's published epochs, flush wishes in the
//! client page, and depot exchanges over IPC.

use super::*;

/// How long a client that needs a completed epoch watches shared memory
/// before it asks with a blocking `FlushSync`.
const POLL_BEFORE_BLOCKING: std::time::Duration = std::time::Duration::from_micros(500);

/// The magazine backend: shared-memory epochs and the depot over IPC.
pub(super) struct Remote<'a>(pub(super) &'a DmaDomain);

impl Remote<'_> {
    /// A one-way hint whose only purpose is to wake iommud's idle epoch
    /// timer (`timer_idle` in the published page), unless one is on its way.
    pub(super) fn wake_timer(&self) {
        let p = self.0.client();
        if p.hint_pending.swap(1, SeqCst) == 0 {
            self.0.stats.wakeups.fetch_add(1, Relaxed);
            if self.0.conn().post(&Request::FlushHint).is_err() {
                p.hint_pending.store(0, SeqCst);
            }
        }
    }
}

impl Backend for Remote<'_> {
    type Error = Error;

    fn completed(&self) -> u64 {
        self.0.page().completed.load(SeqCst)
    }

    fn request_flush(&self, tag: u64) {
        let p = self.0.client();
        p.wanted.fetch_max(tag, SeqCst);
        if self.0.page().completed.load(SeqCst) < tag && p.hint_pending.swap(1, SeqCst) == 0 {
            self.0.stats.wakeups.fetch_add(1, Relaxed);
            if self.0.conn().post(&Request::FlushHint).is_err() {
                // iommud's epoch timer still sees `wanted`; nothing is lost.
                p.hint_pending.store(0, SeqCst);
            }
        }
    }

    fn want(&self, tag: u64) {
        self.0.client().wanted.fetch_max(tag, SeqCst);
    }

    fn seal(&self) -> u64 {
        // Every clear of the batch precedes this fence in program order (or
        // happens-before it through the slot lock), so the epoch read after
        // it is at least each clear's own tag.
        std::sync::atomic::fence(SeqCst);
        self.0.page().epoch.load(SeqCst)
    }

    fn wait_completed(&self, tag: u64) -> Result<()> {
        // The batch's flush was already requested (a hint, or iommud's epoch
        // timer sees `wanted`): give iommud a moment to publish the epoch by
        // watching shared memory before paying a blocking round trip.
        self.request_flush(tag);
        let start = std::time::Instant::now();
        while self.completed() < tag && start.elapsed() < POLL_BEFORE_BLOCKING {
            std::thread::yield_now();
        }
        while self.completed() < tag {
            if self.0.page().dead.load(SeqCst) != 0 {
                self.0.reattach_if_adopted()?;
            }
            self.0.call(&Request::FlushSync { upto: tag })?;
        }
        Ok(())
    }

    fn exchange(&self, class: usize, give: Clean, want: usize) -> Result<Clean> {
        let give = give.into_vec();
        if give.len() > EXCHANGE_SLOTS {
            return Err(Error::Invalid("too many IOVAs for one exchange".into()));
        }
        self.0.stats.round_trips.fetch_add(1, Relaxed);
        // The slots are one area for all of this client's threads: written,
        // and the IOVAs received read back, under the connection's lock, so
        // that no other thread's exchange overwrites them in between (which
        // would hand one IOVA to two owners). A reattach retries it whole.
        let got = self.0.with_conn(|conn| {
            for (k, iova) in give.iter().enumerate() {
                self.0
                    .shared
                    .write_u64(EXCHANGE_OFFSET + 8 * k, *iova)
                    .ok_or(Error::Dead)?;
            }
            let a = conn.args(&Request::Exchange {
                pages: class_pages(class),
                returned: give.len() as u64,
                want: want as u64,
            })?;
            let n = (a[0] as usize).min(want).min(EXCHANGE_SLOTS);
            (0..n)
                .map(|k| {
                    self.0
                        .shared
                        .read_u64(EXCHANGE_OFFSET + 8 * k)
                        .ok_or(Error::Dead)
                })
                .collect::<Result<Vec<u64>>>()
        })?;
        Ok(Clean::from_depot(got))
    }

    fn now(&self) -> u64 {
        self.0.page().now()
    }

    fn exhausted(&self) -> Error {
        Error::Server {
            code: ErrorCode::NoSpace,
            msg: "no IOVA left in the depot or this CPU's magazines".into(),
        }
    }
}
