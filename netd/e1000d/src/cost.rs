//! Where the driver's time goes, per packet: time stamps around the DMA map and unmap
//! calls and around the driver's send / reap / receive calls (docs/PERFORMANCE.md,
//! "Per-packet cost breakdown").
//!
//! [`E1000`](crate::E1000) keeps a [`Cost`] in raw ticks; `e1000d loop` divides it by the
//! frames received and prints `cost_ns: map=.. unmap=.. ring=.. other=.. total=..`:
//! * `map`, `unmap`: inside the [`DmaMapper`](crate::DmaMapper) calls made for packet
//!   buffers (TX map in `send`, TX unmap in `reap_tx`, the RX batch unmap and re-map);
//! * `ring`: the rest of the driver's `send`, `reap_tx` and `recv_batch` calls:
//!   descriptor reads and writes, frame copies, fences and the tail/doorbell MMIO writes.
//!   Under QEMU a doorbell write runs the device model (and its DMA through the emulated
//!   VT-d unit) in the writing vCPU, so that time lands here too;
//! * `map_tx`, `map_rx`: the `map` column split by NIC (the sender's TX maps, the
//!   receiver's RX refills);
//! * `other`: the rest of the loop (building and verifying frames, polling an idle ring).
//!
//! Time stamps are TSC reads on x86_64 (a few ns, no system call: a clock read per
//! call site must not be what it measures), converted with a rate calibrated once
//! against the monotonic clock; elsewhere the monotonic clock itself.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// What the driver spent, in [`now`] ticks, and how many entries its map/unmap calls carried.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cost {
    /// Inside packet-buffer map calls.
    pub map_ticks: u64,
    /// Inside packet-buffer unmap calls.
    pub unmap_ticks: u64,
    /// Inside `send`, `reap_tx` and `recv_batch` altogether (map and unmap included).
    pub driver_ticks: u64,
    /// Inside the per-frame callback of `recv_batch` (the caller's work, not the driver's).
    pub callback_ticks: u64,
    /// Map calls and the buffers they mapped.
    pub map_calls: u64,
    /// Buffers mapped by those calls.
    pub map_entries: u64,
    /// Unmap calls.
    pub unmap_calls: u64,
    /// Buffers unmapped by those calls.
    pub unmap_entries: u64,
}

impl Cost {
    /// Sum of two NICs' costs.
    pub fn plus(&self, o: &Cost) -> Cost {
        Cost {
            map_ticks: self.map_ticks + o.map_ticks,
            unmap_ticks: self.unmap_ticks + o.unmap_ticks,
            driver_ticks: self.driver_ticks + o.driver_ticks,
            callback_ticks: self.callback_ticks + o.callback_ticks,
            map_calls: self.map_calls + o.map_calls,
            map_entries: self.map_entries + o.map_entries,
            unmap_calls: self.unmap_calls + o.unmap_calls,
            unmap_entries: self.unmap_entries + o.unmap_entries,
        }
    }

    /// Buffers per map or unmap call (1.0 when every call carried one buffer).
    pub fn batch(&self) -> f64 {
        let calls = self.map_calls + self.unmap_calls;
        if calls == 0 {
            return 0.0;
        }
        (self.map_entries + self.unmap_entries) as f64 / calls as f64
    }

    /// Per packet, in ns: `total_ns` is the loop's whole time, `packets` the frames it
    /// moved, `ticks_per_ns` the rate of [`now`].
    pub fn per_packet(&self, total_ns: f64, packets: u64, ticks_per_ns: f64) -> PerPacket {
        let n = packets.max(1) as f64;
        let ns = |t: u64| t as f64 / ticks_per_ns / n;
        let map = ns(self.map_ticks);
        let unmap = ns(self.unmap_ticks);
        let ring = ns(self
            .driver_ticks
            .saturating_sub(self.map_ticks + self.unmap_ticks + self.callback_ticks));
        let total = total_ns / n;
        PerPacket {
            map,
            unmap,
            ring,
            other: (total - map - unmap - ring).max(0.0),
            total,
        }
    }
}

/// A per-packet breakdown in ns; `map + unmap + ring + other = total` (`other` is what
/// the loop spent outside the driver's calls).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PerPacket {
    /// Map calls.
    pub map: f64,
    /// Unmap calls.
    pub unmap: f64,
    /// Descriptor and ring handling.
    pub ring: f64,
    /// The rest of the loop.
    pub other: f64,
    /// The loop's time per packet.
    pub total: f64,
}

/// A time stamp in ticks (see [`ticks_per_ns`]).
#[inline]
pub fn now() -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: RDTSC only reads the time-stamp counter into registers: no memory is
        // touched and the instruction exists on every x86_64 CPU.
        unsafe { core::arch::x86_64::_rdtsc() }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        origin().elapsed().as_nanos() as u64
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn origin() -> Instant {
    static O: OnceLock<Instant> = OnceLock::new();
    *O.get_or_init(Instant::now)
}

/// Ticks of [`now`] per nanosecond: measured once (20 ms against the monotonic clock).
pub fn ticks_per_ns() -> f64 {
    static RATE: OnceLock<f64> = OnceLock::new();
    *RATE.get_or_init(|| {
        let (t0, i0) = (now(), Instant::now());
        std::thread::sleep(Duration::from_millis(20));
        let (t1, el) = (now(), i0.elapsed());
        let r = t1.wrapping_sub(t0) as f64 / el.as_nanos().max(1) as f64;
        if r.is_finite() && r > 0.0 {
            r
        } else {
            1.0
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breakdown_adds_up_and_ring_excludes_the_rest() {
        let c = Cost {
            map_ticks: 2_000,
            unmap_ticks: 1_000,
            driver_ticks: 10_000,
            callback_ticks: 3_000,
            map_calls: 3,
            map_entries: 12,
            unmap_calls: 5,
            unmap_entries: 12,
        };
        // 2 ticks per ns, 10 packets, 20 µs in all.
        let p = c.per_packet(20_000.0, 10, 2.0);
        assert_eq!((p.map, p.unmap, p.ring), (100.0, 50.0, 200.0));
        assert_eq!(p.total, 2_000.0);
        assert_eq!(p.other, 2_000.0 - 350.0);
        assert_eq!(c.batch(), 3.0);
        assert_eq!(c.plus(&c).map_entries, 24);
        assert_eq!(Cost::default().batch(), 0.0);
    }

    #[test]
    fn the_clock_advances_and_its_rate_is_sane() {
        let a = now();
        std::thread::sleep(Duration::from_millis(2));
        assert!(now() > a);
        let r = ticks_per_ns();
        // Any real TSC or clock runs between 0.1 and 100 ticks per ns.
        assert!(r > 0.1 && r < 100.0, "{r}");
    }
}
