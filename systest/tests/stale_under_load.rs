//! Issue 11's acceptance: 12 client processes on this 2-CPU machine, each
//! mapping and unmapping with the magazine strategy as fast as it can (6
//! with `percore`, 6 with `deferred` flush). iommud's epoch timer runs in
//! its own thread at a raised priority, and each client forces the flush of
//! a batch 10 ms old on its next operation.
//!
//! Printed (and written to `target/timers/stale_under_load.txt`): per
//! policy the longest stale window, the median of the domains' longest
//! windows, how many domains stayed within 10 ms plus one tick, and how late
//! after a deadline the timer found a domain's oldest unmap. Issue 11 asks
//! for every domain within the bound; it is met since the timer stopped
//! waiting for the domain list while clients attach (docs/PERFORMANCE.md,
//! "Timers"; before, 20-35 ms). It is a time figure, so it is printed, not
//! asserted; the cause it had is tested deterministically
//! (`iommud` `timer_tests::the_timer_never_waits_for_the_domain_list`).
//! Asserted: every unmap of every client was measured, and the timer
//! flushed every domain.
//!
//! The clients are this test binary re-executed with `IOMMUD_TEST_CLIENT`
//! set, running the ignored test `load_client`; each reports its domain's
//! stale window before it exits (its domain goes with it).

mod common;

use common::{kv, Daemon};
use libdma::{Dir, FlushPolicy};
use std::process::Command;
use std::time::{Duration, Instant};

const CLIENTS_PER_POLICY: usize = 6;
/// How long each client maps and unmaps.
const RUN: Duration = Duration::from_secs(4);
/// The bound: iommud's flush timeout plus one tick.
const BOUND_NS: u64 = 10_000_000 + TICK_NS;
/// One tick of iommud's former fixed ticker (`iommud::TICK`).
const TICK_NS: u64 = 2_000_000;

/// Run by the re-executed child: map/unmap for [`RUN`], then report.
#[test]
#[ignore = "run as a child process by the stale-window test"]
fn load_client() {
    let Some(c) = common::Client::from_env() else {
        return;
    };
    let dom = c.dom;
    let buf = dom.alloc(16 * 4096).unwrap();
    let t0 = Instant::now();
    let mut pairs = 0u64;
    while t0.elapsed() < RUN {
        for k in 0..64u64 {
            let iova = dom
                .map(buf.phys + (k % 16) * 4096, 512, Dir::Bidirectional)
                .unwrap();
            dom.unmap(iova, 512).unwrap();
        }
        pairs += 64;
    }
    // The last unmaps are flushed by iommud's timer within 10 ms.
    std::thread::sleep(Duration::from_millis(60));
    let s = common::domain_stats(&dom, c.bdf);
    println!(
        "RESULT pairs {pairs} max {} late {} mean {} unmaps {} timer_flushes {} wakeups {}",
        kv(&s, "stale_window_max_ns"),
        kv(&s, "timer_late_max_ns"),
        kv(&s, "stale_window_mean_ns"),
        kv(&s, "stale_window_unmaps"),
        kv(&s, "timer_flushes"),
        kv(&s, "ipc_wakeups"),
    );
}

#[test]
fn twelve_busy_clients_every_unmap_measured_and_the_stale_window_reported() {
    let d = Daemon::start_logged("stale-load", &[]);
    let mut children = Vec::new();
    for n in 0..2 * CLIENTS_PER_POLICY {
        let flush = if n % 2 == 0 {
            FlushPolicy::PerCore
        } else {
            FlushPolicy::Deferred
        };
        let bdf = ((n as u16) + 1) << 3;
        let c = Command::new(std::env::current_exe().unwrap())
            .args([
                "load_client",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(
                "IOMMUD_TEST_CLIENT",
                format!("{},{bdf},magazine,{}", d.socket().display(), flush.name()),
            )
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        children.push((flush, c));
    }
    // Per policy: every domain's longest window, the timer's latest flush, pairs.
    let mut per: Vec<(FlushPolicy, Vec<u64>, u64, u64)> = vec![
        (FlushPolicy::PerCore, Vec::new(), 0, 0),
        (FlushPolicy::Deferred, Vec::new(), 0, 0),
    ];
    let mut lines = String::new();
    for (flush, c) in children {
        let o = c.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success(),
            "{} client failed:\n{text}\n{}",
            flush.name(),
            String::from_utf8_lossy(&o.stderr)
        );
        let line = text
            .lines()
            .find_map(|l| l.split_once("RESULT ").map(|(_, r)| r))
            .unwrap_or_else(|| panic!("no result from a {} client:\n{text}", flush.name()))
            .to_string();
        let field = |k: &str| -> u64 {
            let mut it = line.split_whitespace();
            while let Some(w) = it.next() {
                if w == k {
                    return it.next().and_then(|v| v.parse().ok()).unwrap();
                }
            }
            panic!("no {k} in {line}")
        };
        assert!(field("unmaps") > 0, "{line}");
        assert_eq!(
            field("unmaps"),
            field("pairs"),
            "every unmap measured: {line}"
        );
        assert!(
            field("timer_flushes") > 0,
            "the timer flushed this domain: {line}"
        );
        let w = per.iter_mut().find(|w| w.0 == flush).unwrap();
        w.1.push(field("max"));
        w.2 = w.2.max(field("late"));
        w.3 += field("pairs");
        lines.push_str(&format!("{} {line}\n", flush.name()));
    }
    print!("{lines}");
    let prio = d
        .log()
        .lines()
        .find(|l| l.contains("epoch timer:"))
        .unwrap_or("epoch timer: (not logged)")
        .to_string();
    let mut out = format!("clients {}\n{prio}\n", 2 * CLIENTS_PER_POLICY);
    let mut checks = Vec::new();
    for (flush, mut maxes, late, pairs) in per {
        maxes.sort_unstable();
        let median = maxes[maxes.len() / 2];
        let max = maxes[maxes.len() - 1];
        let within = maxes.iter().filter(|m| **m <= BOUND_NS).count();
        let f = flush.name();
        println!(
            "stale window under load: {f} max {:.3} ms, median of domains {:.3} ms, \
             {within} of {} domains within 10 ms + one tick, timer at most {:.3} ms late, \
             {pairs} map/unmap pairs ({prio})",
            max as f64 / 1e6,
            median as f64 / 1e6,
            maxes.len(),
            late as f64 / 1e6,
        );
        out.push_str(&format!(
            "{f}_stale_window_max_ns {max}\n{f}_stale_window_median_of_domains_ns {median}\n\
             {f}_domains_within_bound {within}\n{f}_timer_late_max_ns {late}\n{f}_pairs {pairs}\n"
        ));
        checks.push((f, median, late));
    }
    common::write_result("stale_under_load.txt", &out);
    // The bound issue 11 asks for, reported (see the module docs).
    for (f, median, late) in checks {
        println!(
            "{f}: median within bound: {}, timer found deadlines at most {:.3} ms late",
            median <= BOUND_NS,
            late as f64 / 1e6
        );
    }
}
