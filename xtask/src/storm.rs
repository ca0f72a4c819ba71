//! `cargo xtask guest-storm`: one device's fault storm hides no other device's fault and
//! does not cost iommud its CPU.
//!
//! The guest gets a third e1000 (C, 00:04.0) on a hub of its own next to the A → B loop.
//! In one boot, with iommud translating:
//! 1. `e1000d storm` keeps C's TX ring full of descriptors at unmapped IOVAs for
//!    [`STORM_SECS`] seconds (thousands of faults; its own process and domain). iommud
//!    must block C once it faults faster than the guest policy's
//!    `fault_block_per_second` (see [`crate::demo::GUEST_POLICY`]).
//! 2. Meanwhile a second e1000d moves [`PACKETS`] verified frames A → B (its own two
//!    domains) and, after [`FAULT_AT`] frames, posts a single TX descriptor at the
//!    unmapped IOVA [`A_IOVA`]: that one fault of A must be listed in iommud's `faults`,
//!    and every frame must arrive intact.
//! 3. After the storm, iommud's CPU time is read from `/proc/<pid>/stat` (utime + stime,
//!    in USER_HZ = 100 ticks/s) over [`IDLE_SECS`] seconds: it must stay under
//!    [`MAX_CPU_PCT`] % of one CPU. Its share while idle before the storm and during the
//!    storm are printed as well.

use std::time::Duration;

use crate::demo::{section, start_iommud, STOP_IOMMUD};
use crate::fault::kv;
use crate::guest::{self, parse_hex, GuestOutput, GuestRun};
use crate::util::Result;

/// The storming NIC (a third e1000, on a hub of its own).
pub const STORM_BDF: &str = "0000:00:04.0";
/// How long the storm lasts.
pub const STORM_SECS: u64 = 15;
/// Frames of the A → B loop during the storm.
pub const PACKETS: u64 = 20_000;
/// A's single fault is posted after this many frames.
pub const FAULT_AT: u64 = 5_000;
/// A's unmapped IOVA (the storm uses 256 pages from 0x900000).
pub const A_IOVA: u64 = 0xb0_0000;
/// iommud's CPU is measured over this long after the storm.
pub const IDLE_SECS: u64 = 10;
/// The acceptance bound on iommud's CPU after the storm (percent of one CPU).
pub const MAX_CPU_PCT: f64 = 5.0;
/// "Thousands of descriptors": the fewest the storm must have pushed through C.
pub const MIN_STORM: u64 = 2_000;

/// QEMU arguments for the third NIC.
fn storm_nic_args() -> Vec<String> {
    [
        "-netdev",
        "hubport,hubid=1,id=c",
        "-device",
        "e1000,netdev=c,romfile=,addr=0x4",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn script() -> String {
    let mut s = start_iommud("");
    s.push_str(&format!(
        r#"P=$(pidof iommud)
cpu() {{ awk '{{print $14 + $15}}' /proc/$P/stat; }}
up() {{ awk '{{print $1}}' /proc/uptime; }}
cb=$(cpu); ub=$(up)
sleep {IDLE_SECS}
c0=$(cpu); u0=$(up)
echo "iommud-cpu: phase=before ticks=$((c0 - cb)) from=$ub to=$u0"
e1000d storm --nic {STORM_BDF} --mapper libdma --strategy magazine --seconds {STORM_SECS} &
S=$!
sleep 2
e1000d loop --mapper libdma --strategy magazine --packets {PACKETS} --bad-iova {A_IOVA:#x} --bad-iova-at {FAULT_AT}
rc1=$?
echo "E1000D-EXIT $rc1"
wait $S
rc2=$?
echo "STORM-EXIT $rc2"
c1=$(cpu); u1=$(up)
echo "iommud-cpu: phase=storm ticks=$((c1 - c0)) from=$u0 to=$u1"
sleep 2
c2=$(cpu); u2=$(up)
sleep {IDLE_SECS}
c3=$(cpu); u3=$(up)
echo "iommud-cpu: phase=after ticks=$((c3 - c2)) from=$u2 to=$u3"
"#
    ));
    s.push_str(STOP_IOMMUD);
    s.push_str("[ $rc1 -eq 0 ] && [ $rc2 -eq 0 ]\n");
    s
}

/// iommud's CPU share (percent of one CPU) in `phase` from its `iommud-cpu:` line.
pub fn cpu_pct(out: &GuestOutput, phase: &str) -> Option<f64> {
    let l = out
        .job_lines()
        .map(str::trim)
        .filter_map(|l| l.strip_prefix("iommud-cpu: "))
        .find(|l| kv(l, "phase") == Some(phase))?;
    let f = |k| kv(l, k).and_then(|v| v.parse::<f64>().ok());
    let secs = f("to")? - f("from")?;
    (secs > 0.0).then(|| f("ticks").map(|t| t / 100.0 / secs * 100.0))?
}

/// Index of the first job line containing `needle`.
fn line_of(out: &GuestOutput, needle: &str) -> Option<usize> {
    out.job_lines().position(|l| l.contains(needle))
}

/// Every check on the guest's output; returns the failures.
fn check(out: &GuestOutput) -> Vec<String> {
    let mut bad = Vec::new();
    let mut expect = |ok: bool, what: String| {
        println!("  {} {what}", if ok { "ok  " } else { "FAIL" });
        if !ok {
            bad.push(what);
        }
    };
    expect(
        out.success(),
        format!(
            "storm and loop exit 0: GUEST-EXIT {:?}{}",
            out.exit_marker,
            if out.timed_out { " (timed out)" } else { "" }
        ),
    );
    let storm = out
        .job_lines()
        .map(str::trim)
        .find(|l| l.starts_with("storm: bdf=") && l.contains("consumed="))
        .map(str::to_string);
    let consumed = storm
        .as_deref()
        .and_then(|l| kv(l, "consumed"))
        .and_then(|v| v.parse::<u64>().ok());
    expect(
        consumed.is_some_and(|n| n >= MIN_STORM),
        format!(
            "C ({STORM_BDF}) consumed {consumed:?} descriptors at unmapped IOVAs (want >= {MIN_STORM}): {}",
            storm.as_deref().unwrap_or("no storm line")
        ),
    );
    let lp = out.value("loop:");
    let n = |k| {
        lp.and_then(|l| kv(l, k))
            .and_then(|v| v.parse::<u64>().ok())
    };
    expect(
        n("received") == Some(PACKETS) && n("lost") == Some(0) && n("corrupt") == Some(0),
        format!(
            "A -> B during the storm: received={:?} lost={:?} corrupt={:?} of {PACKETS}",
            n("received"),
            n("lost"),
            n("corrupt")
        ),
    );
    let injected = line_of(out, "bad-iova: TX descriptor at iova");
    let storm_end = line_of(out, "storm: bdf=");
    // (the start line is `storm: start ...`)
    expect(
        injected.is_some() && injected < storm_end,
        format!(
            "A's fault was posted while C was still storming (lines {injected:?} < {storm_end:?})"
        ),
    );
    let faults = crate::demo::fault_lines(out);
    for f in section(out, "FAULTS") {
        println!("       {f}");
    }
    expect(
        faults.iter().any(|f| {
            kv(f, "bdf") == Some("00:01.0")
                && kv(f, "iova").and_then(parse_hex) == Some(A_IOVA)
                && kv(f, "access") == Some("read")
        }),
        format!("faults lists A's single fault: bdf=00:01.0 iova={A_IOVA:#x} access=read"),
    );
    let dev = section(out, "FAULTS")
        .into_iter()
        .find(|l| l.starts_with("device ") && kv(l, "bdf") == Some("00:04.0"));
    let c_faults = dev
        .and_then(|l| kv(l, "faults"))
        .and_then(|v| v.parse::<u64>().ok());
    expect(
        dev.and_then(|l| kv(l, "blocked")) == Some("yes") && c_faults.is_some_and(|n| n > 50),
        format!("faults shows C blocked after more than 50 faults: {dev:?}"),
    );
    let pct = |p: Option<f64>| p.map_or("?".into(), |p| format!("{p:.1} %"));
    let after = cpu_pct(out, "after");
    println!(
        "  iommud CPU (of one CPU): idle before the storm {}, during the storm and loop {}, after the storm {}",
        pct(cpu_pct(out, "before")),
        pct(cpu_pct(out, "storm")),
        pct(after)
    );
    expect(
        after.is_some_and(|p| p < MAX_CPU_PCT),
        format!(
            "iommud under {MAX_CPU_PCT} % CPU over {IDLE_SECS} s after the storm: {} \
(idle before the storm: {})",
            after.map_or("not measured".into(), |p| format!("{p:.2} %")),
            pct(cpu_pct(out, "before"))
        ),
    );
    bad
}

/// `cargo xtask guest-storm`.
pub fn run() -> Result<()> {
    let mut run = GuestRun::new("test-storm", script())
        .package("iommud")
        .package("e1000d")
        .timeout(Duration::from_secs(240))
        .echo(false);
    run.extra_qemu_args = storm_nic_args();
    let out = guest::run(&run)?;
    for l in out.job_lines() {
        let t = l.trim();
        if t.starts_with("storm:")
            || t.starts_with("loop:")
            || t.starts_with("bad-iova:")
            || t.starts_with("iommud-cpu:")
            || t.contains("blocking the device")
            || t.contains("more DMA faults")
        {
            println!("  | {t}");
        }
    }
    let bad = check(&out);
    if bad.is_empty() {
        println!("guest-storm: PASS; log {}", out.log_path.display());
        Ok(())
    } else {
        println!("guest-storm: FAIL; log {}", out.log_path.display());
        Err(format!("guest-storm: {}", bad.join("; ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_share_from_proc_ticks() {
        let o = GuestOutput::from_console(
            "GUEST-START\niommud-cpu: phase=storm ticks=150 from=10.00 to=25.00\n\
iommud-cpu: phase=after ticks=4 from=26.50 to=31.50\nGUEST-EXIT 0\n",
        );
        // 150 ticks = 1.5 s of CPU over 15 s: 10 %; 4 ticks over 5 s: 0.8 %.
        let s = cpu_pct(&o, "storm").expect("storm");
        assert!((s - 10.0).abs() < 1e-9, "{s}");
        let a = cpu_pct(&o, "after").expect("after");
        assert!((a - 0.8).abs() < 1e-9, "{a}");
        assert_eq!(cpu_pct(&o, "idle"), None);
    }

    #[test]
    fn script_storms_c_and_faults_a_once() {
        let s = script();
        assert!(s.contains(&format!("e1000d storm --nic {STORM_BDF}")));
        assert!(s.contains("--bad-iova 0xb00000 --bad-iova-at 5000"));
        assert_eq!(s.matches("phase=").count(), 3);
        assert!(storm_nic_args().join(" ").contains("hubid=1"));
    }
}
