//! What iommud keeps and says about DMA faults, per device, so that a
//! device that faults without end can neither flood the log nor push
//! another device's fault out of `faults` (docs/ARCHITECTURE.md, "Trust and
//! the attacker"), and a device that faults faster than the administrator
//! allows is blocked.
//!
//! Per device: the first [`KEEP_FIRST`] faults and the latest one are kept
//! for the `faults` path, with the total; the log gets the first
//! [`LOG_PER_SECOND`] faults of each second one by one and a summary line
//! for the rest; past `block_per_second` faults in one second the device is
//! to be blocked (its context entry cleared), once.

use crate::unit::{fault_reason_text, FaultEntry};
use iommu_abi::Bdf;
use std::collections::BTreeMap;

/// Faults of one device kept in full from the start.
pub const KEEP_FIRST: usize = 8;
/// Faults of one device logged one by one per second.
pub const LOG_PER_SECOND: u64 = 4;
/// Faults per second past which a device is blocked, unless configured.
pub const DEFAULT_BLOCK_PER_SECOND: u64 = 10_000;

#[derive(Debug, Default)]
struct Device {
    total: u64,
    first: Vec<FaultEntry>,
    last: Option<FaultEntry>,
    second_start_ms: u64,
    in_second: u64,
    blocked: bool,
}

/// What to do after recording faults.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Lines for the log.
    pub log: Vec<String>,
    /// Devices (source ids) to block now.
    pub block: Vec<u16>,
}

/// Every device's faults.
#[derive(Debug)]
pub struct FaultBook {
    devices: BTreeMap<u16, Device>,
    block_per_second: u64,
}

fn line(f: &FaultEntry) -> String {
    format!(
        "fault bdf={} iova={:#x} access={} reason={:#x} ({}) at_ms={}",
        Bdf(f.sid),
        f.addr,
        if f.is_read { "read" } else { "write" },
        f.reason,
        fault_reason_text(f.reason),
        f.at_ms
    )
}

impl FaultBook {
    /// A book that blocks a device past `block_per_second` faults in one
    /// second (0: never).
    pub fn new(block_per_second: u64) -> FaultBook {
        FaultBook {
            devices: BTreeMap::new(),
            block_per_second,
        }
    }

    /// Records `faults`, seen at `now_ms`.
    pub fn record(&mut self, faults: &[FaultEntry], now_ms: u64) -> Outcome {
        let mut out = Outcome::default();
        for f in faults {
            let d = self.devices.entry(f.sid).or_default();
            out.log.extend(close_second(f.sid, d, now_ms));
            d.total = d.total.saturating_add(1);
            d.in_second = d.in_second.saturating_add(1);
            if d.first.len() < KEEP_FIRST {
                d.first.push(f.clone());
            }
            d.last = Some(f.clone());
            if d.in_second <= LOG_PER_SECOND {
                out.log.push(format!("DMA {}", line(f)));
            }
            if self.block_per_second != 0 && d.in_second > self.block_per_second && !d.blocked {
                d.blocked = true;
                out.block.push(f.sid);
                out.log.push(format!(
                    "{}: more than {} DMA faults in one second: blocking the device",
                    Bdf(f.sid),
                    self.block_per_second
                ));
            }
        }
        out
    }

    /// Closes the seconds that are over (summary lines for held faults).
    pub fn tick(&mut self, now_ms: u64) -> Vec<String> {
        let mut log = Vec::new();
        for (sid, d) in self.devices.iter_mut() {
            log.extend(close_second(*sid, d, now_ms));
        }
        log
    }

    /// Faults of `sid` so far.
    pub fn total(&self, sid: u16) -> u64 {
        self.devices.get(&sid).map_or(0, |d| d.total)
    }

    /// True once `sid` was blocked for faulting too fast.
    pub fn blocked(&self, sid: u16) -> bool {
        self.devices.get(&sid).is_some_and(|d| d.blocked)
    }

    /// A new domain of `sid` was attached (with a fresh context entry): it
    /// is no longer blocked and its rate starts over; its faults so far stay
    /// in the record.
    pub fn reattached(&mut self, sid: u16) {
        if let Some(d) = self.devices.get_mut(&sid) {
            d.blocked = false;
            d.in_second = 0;
        }
    }

    /// The `faults` path: per device, its first faults and its latest, then
    /// a summary line.
    pub fn render(&self) -> String {
        let mut s = String::new();
        for (sid, d) in &self.devices {
            for f in &d.first {
                s.push_str(&line(f));
                s.push('\n');
            }
            if let Some(l) = d.last.as_ref().filter(|_| d.total > d.first.len() as u64) {
                s.push_str(&line(l));
                s.push('\n');
            }
            s.push_str(&format!(
                "device bdf={} faults={} blocked={}\n",
                Bdf(*sid),
                d.total,
                if d.blocked { "yes" } else { "no" }
            ));
        }
        s
    }
}

/// Ends `d`'s current second if `now_ms` is past it; the summary of what
/// was not logged one by one.
fn close_second(sid: u16, d: &mut Device, now_ms: u64) -> Option<String> {
    if now_ms < d.second_start_ms.saturating_add(1000) {
        return None;
    }
    let held = d.in_second.saturating_sub(LOG_PER_SECOND);
    d.second_start_ms = now_ms;
    d.in_second = 0;
    (held > 0).then(|| {
        format!(
            "{}: {held} more DMA faults in the last second (total {})",
            Bdf(sid),
            d.total
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fault(sid: u16, addr: u64, at_ms: u64) -> FaultEntry {
        FaultEntry {
            sid,
            addr,
            reason: 6,
            is_read: true,
            at_ms,
        }
    }

    #[test]
    fn a_storming_device_is_summarised_blocked_and_hides_nobody() {
        let mut b = FaultBook::new(100);
        // Device B faults once, early.
        let o = b.record(&[fault(0x10, 0x9000, 0)], 0);
        assert_eq!(o.log.len(), 1);
        // Device A faults 150 times in one second.
        let storm: Vec<_> = (0..150).map(|k| fault(0x08, k << 12, 5)).collect();
        let o = b.record(&storm, 5);
        let one_by_one = o.log.iter().filter(|l| l.starts_with("DMA fault")).count();
        assert_eq!(one_by_one as u64, LOG_PER_SECOND, "{:?}", o.log);
        assert_eq!(o.block, vec![0x08], "blocked once, past 100 per second");
        assert!(b.blocked(0x08) && !b.blocked(0x10));
        // The second ends: one summary line for A's held faults.
        let log = b.tick(1005);
        assert_eq!(
            log,
            vec!["00:01.0: 146 more DMA faults in the last second (total 150)".to_string()]
        );
        assert!(b.tick(1006).is_empty());
        // B's fault is still shown, and A's first, latest and totals.
        let text = b.render();
        assert!(
            text.contains("fault bdf=00:02.0 iova=0x9000 access=read"),
            "{text}"
        );
        assert!(
            text.contains("device bdf=00:02.0 faults=1 blocked=no"),
            "{text}"
        );
        assert!(
            text.contains("device bdf=00:01.0 faults=150 blocked=yes"),
            "{text}"
        );
        assert_eq!(text.matches("fault bdf=00:01.0").count(), KEEP_FIRST + 1);
        assert!(
            text.contains("iova=0x95000"),
            "the latest of the storm: {text}"
        );
        // More faults later do not block again.
        assert!(b.record(&storm, 2000).block.is_empty());
        assert_eq!(b.total(0x08), 300);
        // A new domain of the device: unblocked, its history kept, and a new
        // storm blocks it again.
        b.reattached(0x08);
        assert!(!b.blocked(0x08));
        assert_eq!(b.total(0x08), 300);
        assert!(b
            .render()
            .contains("device bdf=00:01.0 faults=300 blocked=no"));
        assert_eq!(b.record(&storm, 5000).block, vec![0x08]);
    }

    #[test]
    fn zero_means_never_block() {
        let mut b = FaultBook::new(0);
        let storm: Vec<_> = (0..50_000).map(|k| fault(0x08, k, 1)).collect();
        assert!(b.record(&storm, 1).block.is_empty());
    }
}
