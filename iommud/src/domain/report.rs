//! What the path tree shows of a domain: `stats`, `mappings`, table counts.

use super::*;

impl Domain {
    /// Table-page counters: (allocated, freed, live).
    pub fn table_pages(&self) -> (u64, u64, u64) {
        let i = self.lock_uncounted();
        let c = i.pt.counts();
        (c.allocated, stats::get(&self.stats.pt_freed), c.live)
    }

    /// Renders `domains/<bdf>/stats`.
    pub fn render_stats(&self) -> String {
        let p = self.client();
        let s = &self.stats;
        let (strategy, flush, mapped, delegated, parked, pools, depot, c, refs, dirty) = {
            let i = self.lock_uncounted();
            (
                i.strategy,
                i.flush,
                (i.mapped.len() as u64)
                    .saturating_add(i.ref_maps.values().fold(0u64, |a, n| a.saturating_add(*n))),
                i.delegated.len(),
                i.parked.len(),
                i.pools.iter().map(|r| r.len).sum::<u64>(),
                i.depot.iter().map(|d| d.len()).sum::<usize>(),
                i.pt.counts(),
                i.refs.len(),
                i.dirty.len(),
            )
        };
        let client_maps = p.sum(|c| &c.maps);
        let client_unmaps = p.sum(|c| &c.unmaps);
        let stale_sum = stats::get(&s.stale_ns_sum);
        let stale_n = stats::get(&s.stale_count);
        let mut t = Text::default();
        t.kv("bdf", Bdf(self.sid))
            .kv("domain_id", self.did)
            .kv("strategy", strategy.name())
            .kv("flush", flush.name())
            .kv("trust", self.trust.name())
            .kv("maps", client_maps.saturating_add(stats::get(&s.maps)))
            .kv(
                "unmaps",
                client_unmaps.saturating_add(stats::get(&s.unmaps)),
            )
            .kv("magazine_hits", p.sum(|c| &c.mag_hits))
            .kv(
                "magazine_misses",
                p.sum(|c| &c.maps).saturating_sub(p.sum(|c| &c.mag_hits)),
            )
            .kv("batches_recycled", p.sum(|c| &c.batches_recycled))
            .kv("depot_exchanges", stats::get(&s.depot_exchanges))
            .kv("depot_hits", stats::get(&s.depot_hits))
            .kv("depot_magazines", depot)
            .kv("ipc_round_trips", stats::get(&s.ipc_round_trips))
            .kv("ipc_wakeups", stats::get(&s.wakeups))
            .kv("lock_acquisitions", stats::get(&s.lock_acquisitions))
            .kv("invalidations_domain", stats::get(&s.inval_domain))
            .kv("invalidations_page", stats::get(&s.inval_page))
            .kv(
                "invalidations",
                stats::get(&s.inval_domain) + stats::get(&s.inval_page),
            )
            .kv("epoch", self.epoch())
            .kv("epoch_completed", self.completed())
            .kv("stale_window_max_ns", stats::get(&s.stale_ns_max))
            .kv(
                "stale_window_mean_ns",
                stale_sum.checked_div(stale_n).unwrap_or(0),
            )
            .kv("stale_window_unmaps", stale_n)
            .kv("pt_pages_allocated", c.allocated)
            .kv("pt_pages_freed", stats::get(&s.pt_freed))
            .kv("pt_pages_live", c.live)
            .kv("mapped", mapped)
            .kv("delegated_iovas", delegated)
            .kv("refcounted_pages", refs)
            .kv("dirty_pages", dirty)
            .kv("parked", parked)
            .kv("pool_bytes", pools)
            .kv("faults", stats::get(&s.faults))
            .kv("blocked", u8::from(self.is_blocked()))
            .kv("errors", stats::get(&s.errors))
            .kv("rejected", stats::get(&s.rejected))
            .kv("rings", self.rings().map_or(0, |r| r.count()))
            .kv("ring_entries", stats::get(&s.ring_entries))
            .kv("ring_passes", stats::get(&s.ring_passes))
            .kv("ring_sleeps", stats::get(&s.ring_sleeps))
            .kv("ring_doorbells", stats::get(&s.ring_doorbells))
            .kv("ring_helped", stats::get(&s.ring_helped))
            .kv("ring_strict_unmaps", stats::get(&s.ring_strict_unmaps))
            .kv(
                "ring_strict_invalidations",
                stats::get(&s.ring_strict_invals),
            )
            .kv("ring_busy_ns", stats::get(&s.ring_busy_ns))
            .kv("ring_write_ns", stats::get(&s.ring_write_ns))
            .kv("ring_inval_ns", stats::get(&s.ring_inval_ns))
            .kv("ring_held", stats::get(&s.ring_held))
            .kv("ring_kept", stats::get(&s.ring_kept))
            .kv("timer_flushes", stats::get(&s.timer_flushes))
            .kv("timer_late_max_ns", stats::get(&s.timer_late_max_ns))
            .kv("timer_lock_busy", stats::get(&s.timer_lock_busy))
            .kv("hints_coalesced", stats::get(&s.hints_coalesced))
            .kv("syncs_throttled", stats::get(&s.syncs_throttled));
        t.0
    }

    /// Renders `domains/<bdf>/mappings`: iommud-made mappings, one per line.
    pub fn render_mappings(&self) -> String {
        let i = self.lock_uncounted();
        let mut t = Text::default();
        for (iova, m) in &i.mapped {
            t.kv(
                &format!("{iova:#x}"),
                format!("phys {:#x} pages {}", m.phys, m.pages),
            );
        }
        for ((iova, len), n) in &i.ref_maps {
            t.kv(&format!("{iova:#x}"), format!("len {len:#x} maps {n}"));
        }
        t.kv("delegated_iovas", i.delegated.len());
        t.kv("refcounted_pages", i.refs.len());
        t.0
    }
}
