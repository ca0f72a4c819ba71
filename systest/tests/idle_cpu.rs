//! Idle is free: with two attached clients that do nothing, iommud sleeps
//! until something is due (its fault poll every 20 ms; no epoch timer tick),
//! so it uses at most 1% of one CPU. Its own test binary, so no other test
//! loads the machine meanwhile.

mod common;

use common::{kv, Daemon};
use libdma::{Dir, DmaDomain, FlushPolicy, Strategy};
use std::time::{Duration, Instant};

/// How long the idle daemon is watched.
const WATCH: Duration = Duration::from_secs(10);

#[test]
fn an_idle_iommud_uses_at_most_one_percent_of_a_cpu() {
    let d = Daemon::start("idle-cpu", &[]);
    let a = DmaDomain::connect(d.socket(), 0x08, Strategy::Magazine, FlushPolicy::PerCore).unwrap();
    let b = DmaDomain::connect(d.socket(), 0x10, Strategy::Global, FlushPolicy::Deferred).unwrap();
    // Some traffic first, so that both domains had flushes waiting and the
    // timer has gone back to sleep since.
    for dom in [&a, &b] {
        let buf = dom.alloc(4096).unwrap();
        for _ in 0..100 {
            let iova = dom.map(buf.phys, 64, Dir::ToDevice).unwrap();
            dom.unmap(iova, 64).unwrap();
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    let flushes = |dom: &DmaDomain, bdf: &str| {
        kv(
            &dom.read_path(&format!("domains/{bdf}/stats")).unwrap(),
            "timer_flushes",
        )
    };
    let f0 = flushes(&a, "00:01.0") + flushes(&b, "00:02.0");
    let (t0, c0, r0, s0) = (
        Instant::now(),
        d.cpu_ticks(),
        run_ns(&d, ""),
        run_ns(&d, "iommud-svc"),
    );
    std::thread::sleep(WATCH);
    let ticks = d.cpu_ticks() - c0;
    let run = run_ns(&d, "") - r0;
    let svc = run_ns(&d, "iommud-svc") - s0;
    let secs = t0.elapsed().as_secs_f64();
    let f1 = flushes(&a, "00:01.0") + flushes(&b, "00:02.0");
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let pct = ticks as f64 / hz as f64 / secs * 100.0;
    let exact = run as f64 / 1e9 / secs * 100.0;
    let svc_pct = svc as f64 / 1e9 / secs * 100.0;
    println!(
        "idle cpu: {pct:.3}% of one CPU ({ticks} ticks of 1/{hz} s over {secs:.1} s, 2 idle clients; \
         {exact:.3}% by the scheduler's run time, of which the ring service threads {svc_pct:.4}%; \
         timed flushes while idle: {})",
        f1 - f0
    );
    common::write_result(
        "idle_cpu.txt",
        &format!(
            "idle_cpu_percent {pct:.3}\nidle_cpu_percent_schedstat {exact:.3}\nwatch_s {secs:.1}\n\
             idle_cpu_percent_service {svc_pct:.4}\ntimed_flushes_idle {}\n",
            f1 - f0
        ),
    );
    // A service thread with nothing to serve sleeps in poll; waking at its
    // timeout it looks once and sleeps again (it used to spin its 2 ms after
    // every timeout: 0.2%).
    assert!(
        svc_pct <= 0.05,
        "idle ring service threads used {svc_pct:.3}% of a CPU"
    );
    assert_eq!(
        f1,
        f0,
        "no timed flush while nothing waits:\n{}\n{}",
        a.read_path("domains/00:01.0/stats").unwrap(),
        b.read_path("domains/00:02.0/stats").unwrap()
    );
    assert!(pct <= 1.0, "idle iommud used {pct:.2}% of a CPU");
}

/// The time on a CPU of the daemon's threads whose name starts with `name`
/// (ns, `/proc/<pid>/task/*/schedstat`: exact, where utime + stime are
/// sampled at the scheduler's tick).
fn run_ns(d: &Daemon, name: &str) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", d.child.id())) else {
        return 0;
    };
    tasks
        .filter_map(|t| t.ok().map(|t| t.path()))
        .filter(|t| {
            std::fs::read_to_string(t.join("comm")).is_ok_and(|c| c.trim().starts_with(name))
        })
        .filter_map(|t| std::fs::read_to_string(t.join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}
