//! `cargo xtask guest-stop` and `cargo xtask guest-restart`: iommud stops, dies and
//! starts again without a device ever reaching memory that is not its own (issue 12;
//! docs/ARCHITECTURE.md, "Stop, crash and restart").
//!
//! `guest-stop`, one boot:
//! 1. Control, before any iommud (translation off): `e1000d --mapper phys --canary-only`
//!    must see NIC B overwrite the canary page, so the later intact canary is the IOMMU's
//!    doing.
//! 2. iommud starts and stops with no client; a second iommud starts on the unit the first
//!    left on (this timed out on "GSTS.QIES to clear" before).
//! 3. e1000d streams frames through that iommud; `iommuctl stop` mid-stream. The stop must
//!    block both devices before their memory goes and park the unit: GSTS.TES still 1, RTADDR
//!    the stopped iommud's root, that root's file still in the state directory.
//! 4. The same canary step as 1 now finds the canary intact: no device can DMA.
//! 5. A third iommud takes the unit over, removes what the second left, and a new e1000d run
//!    moves every frame intact.
//!
//! `guest-restart`, one boot: e1000d streams frames; iommud is killed with SIGKILL mid-stream.
//! Its table and region files must still be in the state directory after it and its client
//! are gone (nothing the unit may walk went back to the kernel), RTADDR must still be its
//! root, and a restarted iommud (same command line) takes the unit over (translation never
//! turned off), releases the dead one's files, and a new e1000d run moves every frame
//! intact. The killed e1000d run itself is not resumed: clients do not reattach yet.

use std::time::Duration;

use crate::demo::{start_iommud, GUEST_POLICY};
use crate::fault::kv;
use crate::guest::{self, parse_hex, GuestOutput, GuestRun};
use crate::util::Result;

/// Frames of each intact run.
const BURST: u64 = 2000;
/// The VT-d unit's registers in the guest (docs/ARCHITECTURE.md, "QEMU's VT-d unit"):
/// GSTS at +0x1C, RTADDR at +0x20 (VT-d 3.x §10.4.5, §10.4.6).
const GSTS: &str = "0xfed9001c";
const RTADDR: &str = "0xfed90020";
/// GSTS.TES, bit 31 (§10.4.5).
const TES: u64 = 1 << 31;
/// The default state directory on the guest's hugetlbfs mount.
const STATE_DIR: &str = "/dev/hugepages/iommud";

/// Shell lines: print GSTS and RTADDR (busybox `devmem`) and the state directory.
fn show_unit(tag: &str) -> String {
    format!(
        "echo \"UNIT-{tag} gsts=$(devmem {GSTS} 32) rtaddr=$(devmem {RTADDR} 64)\"
for f in {STATE_DIR}/iommud-*; do [ -e \"$f\" ] && echo \"FILE-{tag} $(basename $f)\"; done
echo \"HUGE-{tag} total=$(sed -n 's/^HugePages_Total: *//p' /proc/meminfo) free=$(sed -n 's/^HugePages_Free: *//p' /proc/meminfo)\"
"
    )
}

/// Shell lines: start iommud again (same command line as [`start_iommud`]), logging to
/// `/tmp/iommud-<n>.log`.
fn restart_iommud(n: u32) -> String {
    format!(
        "rm -f /run/iommud.sock
iommud --platform linux --socket /run/iommud.sock --config /run/iommud.toml > /tmp/iommud-{n}.log 2>&1 &
IPID=$!
i=0; while [ ! -S /run/iommud.sock ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
if [ ! -S /run/iommud.sock ]; then echo \"IOMMUD-{n}-FAILED\"; fi
"
    )
}

fn show_log(n: u32) -> String {
    format!("sed 's/^/iommud-{n}: /' /tmp/iommud-{n}.log\n")
}

fn stop_script() -> String {
    let mut s = String::from(
        "echo CONTROL-BEGIN\ne1000d loop --mapper phys --canary-only\necho CONTROL-END\n",
    );
    s.push_str(&start_iommud(""));
    s.push_str("iommuctl stop; sleep 0.5\nsed 's/^/iommud-1: /' /tmp/iommud.log\n");
    s.push_str(&restart_iommud(2));
    s.push_str(&format!(
        "e1000d loop --mapper libdma --strategy magazine --packets 1000000 > /tmp/e1000d.log 2>&1 &
EPID=$!
sleep 3
iommuctl stop
wait $EPID; echo \"STREAM-EXIT $?\"
sleep 0.3
{}{}echo STOPPED-CANARY-BEGIN
e1000d loop --mapper phys --canary-only
echo STOPPED-CANARY-END
{}e1000d loop --mapper libdma --strategy magazine --packets {BURST}
echo \"AFTER-EXIT $?\"
iommuctl stop; sleep 0.3
{}",
        show_log(2),
        show_unit("STOPPED"),
        restart_iommud(3),
        show_log(3),
    ));
    s
}

fn restart_script() -> String {
    let mut s = restart_iommud(1).replace(
        "rm -f /run/iommud.sock\n",
        &format!("rm -f /run/iommud.sock\ncat > /run/iommud.toml <<'POLICY-EOF'\n{GUEST_POLICY}POLICY-EOF\n"),
    );
    s.push_str(&format!(
        "e1000d loop --mapper libdma --strategy magazine --packets 1000000 > /tmp/e1000d.log 2>&1 &
EPID=$!
sleep 3
kill -9 $IPID
wait $EPID; echo \"STREAM-EXIT $?\"
sleep 0.3
{}{}{}e1000d loop --mapper libdma --strategy magazine --packets {BURST}
echo \"AFTER-EXIT $?\"
iommuctl stop; sleep 0.3
{}",
        show_log(1),
        show_unit("KILLED"),
        restart_iommud(2),
        show_log(2),
    ));
    s
}

/// The value of `key=` on the first job line starting with `prefix`.
fn field<'a>(out: &'a GuestOutput, prefix: &str, key: &str) -> Option<&'a str> {
    out.job_lines()
        .find(|l| l.trim().starts_with(prefix))
        .and_then(|l| kv(l, key))
}

/// The `canary:` line between two markers.
fn canary_between<'a>(out: &'a GuestOutput, begin: &str, end: &str) -> Option<&'a str> {
    let mut inside = false;
    out.job_lines().find_map(|l| {
        let t = l.trim();
        if t == begin {
            inside = true;
        } else if t == end {
            inside = false;
        } else if inside {
            if let Some(c) = t.strip_prefix("canary:") {
                return Some(c);
            }
        }
        None
    })
}

/// The root a given iommud's log reports (`... root 0x...` on the `VT-d unit up` line).
fn root_of(out: &GuestOutput, log: &str) -> Option<u64> {
    out.job_lines()
        .find(|l| l.starts_with(&format!("{log}: iommud: VT-d unit up")))
        .and_then(|l| l.rsplit("root ").next())
        .and_then(parse_hex)
}

/// Checks that the hugepages in use are exactly the state directory's files (one 2 MiB
/// page each): with iommud and its clients gone, nothing else holds any, so the memory the
/// unit may reach is held by those files and by no process.
fn hugepages_are_the_files(out: &GuestOutput, tag: &str, expect: &mut impl FnMut(bool, String)) {
    let n = |k| field(out, &format!("HUGE-{tag}"), k).and_then(|v| v.parse::<u64>().ok());
    let used = n("total").zip(n("free")).map(|(t, f)| t.saturating_sub(f));
    let files = files(out, tag).len() as u64;
    expect(
        used == Some(files) && files > 0,
        format!(
            "hugepages in use ({used:?}) are exactly the {files} state file(s), held by no process"
        ),
    );
}

fn hex(v: Option<u64>) -> String {
    v.map_or("?".into(), |v| format!("{v:#x}"))
}

fn files(out: &GuestOutput, tag: &str) -> Vec<String> {
    let p = format!("FILE-{tag} ");
    out.job_lines()
        .filter_map(|l| l.trim().strip_prefix(p.as_str()).map(str::to_string))
        .collect()
}

/// The checks shared by both tests: the unit still translates over the root of the
/// iommud that is gone, and the final run after a new iommud took the unit over is intact.
fn common(
    out: &GuestOutput,
    tag: &str,
    gone: &str,
    next: &str,
    expect: &mut impl FnMut(bool, String),
) {
    let gsts = field(out, &format!("UNIT-{tag}"), "gsts").and_then(parse_hex);
    let rtaddr = field(out, &format!("UNIT-{tag}"), "rtaddr").and_then(parse_hex);
    expect(
        gsts.is_some_and(|g| g & TES != 0),
        format!(
            "translation still on after {gone} went (GSTS {})",
            hex(gsts)
        ),
    );
    let root = root_of(out, gone);
    expect(
        root.is_some() && rtaddr == root,
        format!("RTADDR {} is {gone}'s root {}", hex(rtaddr), hex(root)),
    );
    let has = |l: &str| {
        out.job_lines()
            .any(|j| j.starts_with(next) && j.contains(l))
    };
    expect(
        has("taking the unit over: translation on"),
        format!("{next} took the unit over with translation on"),
    );
    expect(
        has("released "),
        format!("{next} released the memory files {gone} left"),
    );
    expect(
        !out.job_lines().any(|l| l.contains("-FAILED")),
        "every iommud started".into(),
    );
    let last = out
        .job_lines()
        .filter_map(|l| l.trim().strip_prefix("loop: "))
        .last();
    let n = |k| {
        last.and_then(|l| kv(l, k))
            .and_then(|v| v.parse::<u64>().ok())
    };
    expect(
        n("received") == Some(BURST) && n("lost") == Some(0) && n("corrupt") == Some(0),
        format!(
            "the run after the takeover: received={:?} lost={:?} corrupt={:?} of {BURST}",
            n("received"),
            n("lost"),
            n("corrupt")
        ),
    );
    expect(
        out.value("AFTER-EXIT") == Some("0"),
        format!("that e1000d exits 0 ({:?})", out.value("AFTER-EXIT")),
    );
}

fn report(name: &str, out: &GuestOutput, bad: Vec<String>) -> Result<()> {
    if bad.is_empty() {
        println!("{name}: PASS");
        Ok(())
    } else {
        println!("{name}: FAIL; log {}", out.log_path.display());
        Err(format!("{name}: {}", bad.join("; ")))
    }
}

fn checker(bad: &mut Vec<String>) -> impl FnMut(bool, String) + '_ {
    move |ok: bool, what: String| {
        println!("  {} {what}", if ok { "ok  " } else { "FAIL" });
        if !ok {
            bad.push(what);
        }
    }
}

/// `cargo xtask guest-stop`.
pub fn stop() -> Result<()> {
    let out = guest::run(
        &GuestRun::new("test-stop", stop_script())
            .package("iommud")
            .package("e1000d")
            .package("iommuctl")
            .timeout(Duration::from_secs(240))
            .echo(false),
    )?;
    let mut bad = Vec::new();
    let mut expect = checker(&mut bad);
    let changed = |c: Option<&str>| {
        c.and_then(|c| kv(c, "changed_bytes"))
            .and_then(|v| v.parse::<u64>().ok())
    };
    let control = changed(canary_between(&out, "CONTROL-BEGIN", "CONTROL-END"));
    expect(
        control.is_some_and(|n| n > 0),
        format!(
            "control, before any iommud: NIC B overwrote the canary (changed_bytes={control:?})"
        ),
    );
    let log1 = |l: &str| {
        out.job_lines()
            .any(|j| j.starts_with("iommud-1:") && j.contains(l))
    };
    expect(log1("stopped"), "an iommud with no client stops".into());
    let second_up = out
        .job_lines()
        .any(|l| l.starts_with("iommud-2: iommud: VT-d unit up"));
    expect(
        second_up,
        "a second iommud brings the unit up after the first stopped".into(),
    );
    let log2 = |l: &str| {
        out.job_lines()
            .any(|j| j.starts_with("iommud-2:") && j.contains(l))
    };
    expect(
        log2("device(s) blocked before their memory was freed"),
        "the stop blocked every device before freeing its memory".into(),
    );
    expect(
        out.value("STREAM-EXIT").is_some_and(|v| v != "0"),
        format!(
            "the streaming e1000d was told its domain went (exit {:?})",
            out.value("STREAM-EXIT")
        ),
    );
    common(&out, "STOPPED", "iommud-2", "iommud-3", &mut expect);
    let files = files(&out, "STOPPED");
    expect(
        files.iter().any(|f| f.ends_with("-tables"))
            && !files.iter().any(|f| f.ends_with("-region")),
        format!("after the stop: only table files stay (the parked root), no region: {files:?}"),
    );
    hugepages_are_the_files(&out, "STOPPED", &mut expect);
    let after = canary_between(&out, "STOPPED-CANARY-BEGIN", "STOPPED-CANARY-END");
    expect(
        changed(after) == Some(0),
        format!(
            "after the stop no device can DMA: canary intact (changed_bytes={:?})",
            changed(after)
        ),
    );
    drop(expect);
    report("guest-stop", &out, bad)
}

/// `cargo xtask guest-restart`.
pub fn restart() -> Result<()> {
    let out = guest::run(
        &GuestRun::new("test-restart", restart_script())
            .package("iommud")
            .package("e1000d")
            .package("iommuctl")
            .timeout(Duration::from_secs(240))
            .echo(false),
    )?;
    let mut bad = Vec::new();
    let mut expect = checker(&mut bad);
    let streamed = out
        .job_lines()
        .any(|l| l.starts_with("iommud-1:") && l.contains("attached by"));
    expect(
        streamed,
        "e1000d was streaming through iommud-1 when it was killed".into(),
    );
    expect(
        out.value("STREAM-EXIT").is_some_and(|v| v != "0"),
        format!(
            "the streaming e1000d saw iommud die (exit {:?})",
            out.value("STREAM-EXIT")
        ),
    );
    let files = files(&out, "KILLED");
    expect(
        files.iter().any(|f| f.ends_with("-tables")) && files.iter().any(|f| f.ends_with("-region")),
        format!(
            "after kill -9 (and its client's exit) the table and region files are still there: {files:?}"
        ),
    );
    hugepages_are_the_files(&out, "KILLED", &mut expect);
    common(&out, "KILLED", "iommud-1", "iommud-2", &mut expect);
    drop(expect);
    report("guest-restart", &out, bad)
}
