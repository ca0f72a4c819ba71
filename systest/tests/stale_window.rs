//! The stale window per flush policy, measured by a running iommud (its
//! 2 ms ticker is the epoch timer) with light traffic: strict invalidates
//! inside the unmap; percore within a tick (server-side batches ask at once,
//! the timer catches the rest); deferred waits for 256 unmaps or 10 ms.
//! Its own test binary, so no other test loads the machine meanwhile.

mod common;

use common::{kv, Daemon};
use libdma::{Dir, DmaDomain, FlushPolicy, Strategy};
use std::time::Duration;

fn stale_window(strategy: Strategy, flush: FlushPolicy) -> (u64, u64) {
    let d = Daemon::start(&format!("stale-{}-{}", strategy.name(), flush.name()), &[]);
    let dom = DmaDomain::connect(d.socket(), 0x08, strategy, flush).unwrap();
    let buf = dom.alloc(4096).unwrap();
    for _ in 0..20 {
        let iova = dom.map(buf.phys, 64, Dir::ToDevice).unwrap();
        dom.unmap(iova, 64).unwrap();
        std::thread::sleep(Duration::from_millis(3));
    }
    dom.drain().unwrap();
    std::thread::sleep(Duration::from_millis(40));
    let s = dom.read_path("domains/00:01.0/stats").unwrap();
    println!(
        "{} {}: stale_window_max_ns {} mean {} unmaps {}",
        strategy.name(),
        flush.name(),
        kv(&s, "stale_window_max_ns"),
        kv(&s, "stale_window_mean_ns"),
        kv(&s, "stale_window_unmaps")
    );
    assert_eq!(kv(&s, "stale_window_unmaps"), 20, "{s}");
    (
        kv(&s, "stale_window_max_ns"),
        kv(&s, "stale_window_mean_ns"),
    )
}

#[test]
fn stale_window_per_flush_policy() {
    for strategy in [Strategy::Identity, Strategy::Magazine] {
        let (strict, _) = stale_window(strategy, FlushPolicy::Strict);
        assert!(
            strict < 5_000_000,
            "{}: strict {strict} ns",
            strategy.name()
        );
        let (percore, _) = stale_window(strategy, FlushPolicy::PerCore);
        assert!(
            percore < 10_000_000 + 8_000_000,
            "{}: percore {percore} ns",
            strategy.name()
        );
        let (deferred, mean) = stale_window(strategy, FlushPolicy::Deferred);
        assert!(
            (5_000_000..10_000_000 + 8_000_000).contains(&deferred),
            "{}: deferred max {deferred} ns",
            strategy.name()
        );
        assert!(
            mean > 1_000_000,
            "{}: deferred batches wait",
            strategy.name()
        );
    }
}
