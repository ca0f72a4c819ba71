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
//! `guest-restart`, one boot:
//! 1. e1000d streams [`RESUMED`] frames; iommud is killed with SIGKILL mid-stream. Its
//!    table, region and ledger files must still be there, and the unit still translating
//!    over its root. A restarted iommud (same command line) takes the unit over, adopts
//!    both NICs' domains from the ledgers, and the running e1000d's libdma reconnects and
//!    reattaches by itself. That iommud is killed too, and a third adopts the adopted
//!    domains. The run finishes: no frame corrupt, lost ones (in flight at a crash)
//!    counted.
//! 2. A second stream; iommud *and* e1000d are killed. An iommud with a short grace
//!    period adopts the orphans, nobody reattaches, and when the grace ends both devices
//!    are blocked and their memory freed (no domain, no region or ledger file left).
//! 3. The same as 1 with validated trust: iommud keeps the magazines and serves the
//!    client's rings; the restarted iommud adopts the rings (same memory, new doorbell)
//!    and the live ring mappings, and the run finishes.
//! 4. The same with the `static` strategy (validated: each pool mapped whole once): the
//!    restarted iommud maps every pool again at its IOVA.
//! 5. A new e1000d run moves every frame intact.

use std::time::Duration;

use crate::demo::{guest_policy, start_iommud, GUEST_POLICY};
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

/// Shell lines: start iommud again (same command line as [`start_iommud`], plus `extra`),
/// logging to `/tmp/iommud-<n>.log`.
fn restart_iommud_with(n: u32, extra: &str) -> String {
    format!(
        "rm -f /run/iommud.sock
iommud --platform linux --socket /run/iommud.sock --config /run/iommud.toml {extra} > /tmp/iommud-{n}.log 2>&1 &
IPID=$!
i=0; while [ ! -S /run/iommud.sock ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
if [ ! -S /run/iommud.sock ]; then echo \"IOMMUD-{n}-FAILED\"; fi
"
    )
}

fn restart_iommud(n: u32) -> String {
    restart_iommud_with(n, "")
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

/// Frames of the run iommud is killed in the middle of.
const RESUMED: u64 = 400_000;
/// Frames of the validated run iommud is killed in the middle of.
const VALIDATED: u64 = 300_000;
/// The grace period of the iommud that finds an orphan nobody claims.
const GRACE_MS: u64 = 3000;

fn restart_script() -> String {
    let mut s = restart_iommud(1).replace(
        "rm -f /run/iommud.sock\n",
        &format!("rm -f /run/iommud.sock\ncat > /run/iommud.toml <<'POLICY-EOF'\n{GUEST_POLICY}POLICY-EOF\n"),
    );
    s.push_str(&format!(
        "e1000d loop --mapper libdma --strategy magazine --packets {RESUMED} > /tmp/e1000d.log 2>&1 &
EPID=$!
sleep 3
kill -9 $IPID
sleep 1
{}{}{}sleep 2
kill -9 $IPID
sleep 1
{}wait $EPID; echo \"STREAM-EXIT $?\"
sed 's/^/resumed: /' /tmp/e1000d.log
e1000d loop --mapper libdma --strategy magazine --packets 1000000 > /tmp/e1000d-2.log 2>&1 &
EPID=$!
sleep 3
kill -9 $EPID $IPID
wait $EPID
sleep 0.3
{}{}{}sleep {}
echo \"DOMAINS-AFTER-GRACE [$(iommuctl cat /scheme/iommu/domains | tr '\\n' ' ')]\"
{}iommuctl stop; sleep 0.3
cat > /run/iommud.toml <<'POLICY-EOF'
{}POLICY-EOF
{}taskset -c 0 e1000d loop --mapper libdma --strategy magazine --flush percore --packets {VALIDATED} > /tmp/e1000d-3.log 2>&1 &
EPID=$!
sleep 3
kill -9 $IPID
sleep 1
{}wait $EPID; echo \"VALIDATED-EXIT $?\"
sed 's/^/validated: /' /tmp/e1000d-3.log
taskset -c 0 e1000d loop --mapper libdma --strategy static --packets {VALIDATED} > /tmp/e1000d-4.log 2>&1 &
EPID=$!
sleep 3
kill -9 $IPID
sleep 1
{}wait $EPID; echo \"STATIC-EXIT $?\"
sed 's/^/static: /' /tmp/e1000d-4.log
{}e1000d loop --mapper libdma --strategy magazine --packets {BURST}
echo \"AFTER-EXIT $?\"
iommuctl stop; sleep 0.3
{}",
        show_log(1),
        show_unit("KILLED"),
        restart_iommud(2),
        restart_iommud(7),
        show_log(2) + &show_log(7),
        show_unit("ORPHANED"),
        restart_iommud_with(3, &format!("--grace-ms {GRACE_MS}")),
        GRACE_MS / 1000 + 2,
        show_unit("AFTER-GRACE"),
        guest_policy("validated"),
        restart_iommud_with(4, "--service-cpus 1"),
        restart_iommud_with(5, "--service-cpus 1"),
        restart_iommud_with(6, "--service-cpus 1"),
        show_log(4) + &show_log(5) + &show_log(6),
        show_log(3),
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
    final_run_intact(out, "the run after the takeover", expect);
}

/// Received, lost and corrupt of the last `loop:` line of the job lines that start
/// with `prefix` (all of them for "").
fn last_loop(out: &GuestOutput, prefix: &str) -> [Option<u64>; 3] {
    let line = out
        .job_lines()
        .filter_map(|l| l.strip_prefix(prefix))
        .filter_map(|l| l.trim().strip_prefix("loop: "))
        .last();
    ["received", "lost", "corrupt"].map(|k| {
        line.and_then(|l| kv(l, k))
            .and_then(|v| v.parse::<u64>().ok())
    })
}

/// The guest's last run (`what`) moved its whole burst intact and its e1000d exited 0.
fn final_run_intact(out: &GuestOutput, what: &str, expect: &mut impl FnMut(bool, String)) {
    let [received, lost, corrupt] = last_loop(out, "");
    expect(
        received == Some(BURST) && lost == Some(0) && corrupt == Some(0),
        format!("{what}: received={received:?} lost={lost:?} corrupt={corrupt:?} of {BURST}"),
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

/// Checks the `loop:` line of the e1000d run whose log lines carry `tag`: of
/// `frames`, every one received or lost (in flight at a crash: at most a ring),
/// none corrupt.
fn across_the_crash(
    out: &GuestOutput,
    tag: &str,
    frames: u64,
    expect: &mut impl FnMut(bool, String),
) {
    let [received, lost, corrupt] = last_loop(out, &format!("{tag}: "));
    expect(
        corrupt == Some(0)
            && received
                .zip(lost)
                .is_some_and(|(r, l)| r + l == frames && l <= 256),
        format!(
            "{tag}, across the crash: received={received:?} lost={lost:?} (in flight at a \
             crash, at most a ring) corrupt={corrupt:?} of {frames}"
        ),
    );
}

/// `cargo xtask guest-restart`.
pub fn restart() -> Result<()> {
    let out = guest::run(
        &GuestRun::new("test-restart", restart_script())
            .package("iommud")
            .package("e1000d")
            .package("iommuctl")
            .timeout(Duration::from_secs(300))
            .echo(false),
    )?;
    let mut bad = Vec::new();
    let mut expect = checker(&mut bad);
    let log_has = |n: u32, l: &str| {
        out.job_lines()
            .any(|j| j.starts_with(&format!("iommud-{n}:")) && j.contains(l))
    };
    expect(
        log_has(1, "attached by"),
        "e1000d was streaming through iommud-1 when it was killed".into(),
    );
    let files_killed = files(&out, "KILLED");
    expect(
        ["-tables", "-region", "-ledger"]
            .iter()
            .all(|k| files_killed.iter().any(|f| f.ends_with(k))),
        format!(
            "after kill -9 the table, region and ledger files are still there: {files_killed:?}"
        ),
    );
    let gsts = field(&out, "UNIT-KILLED", "gsts").and_then(parse_hex);
    let rtaddr = field(&out, "UNIT-KILLED", "rtaddr").and_then(parse_hex);
    let root1 = root_of(&out, "iommud-1");
    expect(
        gsts.is_some_and(|g| g & TES != 0) && root1.is_some() && rtaddr == root1,
        format!(
            "with iommud-1 dead the unit still translates over its root (GSTS {}, RTADDR {} = {})",
            hex(gsts),
            hex(rtaddr),
            hex(root1)
        ),
    );
    expect(
        log_has(2, "taking the unit over: translation on"),
        "iommud-2 took the unit over with translation on".into(),
    );
    expect(
        log_has(2, "00:01.0: adopted") && log_has(2, "00:02.0: adopted"),
        "iommud-2 adopted both NICs' domains from iommud-1's ledgers".into(),
    );
    expect(
        log_has(2, "00:01.0: reattached by") && log_has(2, "00:02.0: reattached by"),
        "the running e1000d reattached both domains by itself".into(),
    );
    expect(
        log_has(7, "00:01.0: adopted")
            && log_has(7, "00:02.0: adopted")
            && log_has(7, "00:01.0: reattached by")
            && log_has(7, "00:02.0: reattached by"),
        "killed again, a third iommud adopted the adopted domains and e1000d reattached again"
            .into(),
    );
    let reattached = out
        .job_lines()
        .filter(|l| l.starts_with("resumed: ") && l.contains("reattached after"))
        .count();
    expect(
        reattached >= 4,
        format!("libdma reported the reattach ({reattached} lines)"),
    );
    expect(
        out.value("STREAM-EXIT") == Some("0"),
        format!(
            "the e1000d run iommud died in finished and exited 0 ({:?})",
            out.value("STREAM-EXIT")
        ),
    );
    // Frames in flight when iommud died may be lost (counted); none may be corrupt.
    across_the_crash(&out, "resumed", RESUMED, &mut expect);
    expect(
        log_has(3, "did not come back within the grace period"),
        format!("iommud-3 blocked the orphaned devices after its {GRACE_MS} ms grace period"),
    );
    let after = out
        .job_lines()
        .find_map(|l| l.trim().strip_prefix("DOMAINS-AFTER-GRACE "));
    expect(
        after == Some("[]"),
        format!("no domain is left after the grace period: {after:?}"),
    );
    let files_after = files(&out, "AFTER-GRACE");
    expect(
        !files_after
            .iter()
            .any(|f| f.ends_with("-region") || f.ends_with("-ledger")),
        format!("the orphans' region and ledger files are gone: {files_after:?}"),
    );
    expect(
        log_has(5, "00:01.0: adopted") && log_has(5, "00:01.0: reattached by"),
        "validated trust: iommud-5 adopted the ring domain and the running e1000d reattached"
            .into(),
    );
    expect(
        out.value("VALIDATED-EXIT") == Some("0"),
        format!(
            "the validated run iommud died in finished and exited 0 ({:?})",
            out.value("VALIDATED-EXIT")
        ),
    );
    across_the_crash(&out, "validated", VALIDATED, &mut expect);
    expect(
        log_has(6, "00:01.0: adopted") && log_has(6, "00:01.0: reattached by"),
        "static: iommud-6 adopted the domain (pools mapped whole) and e1000d reattached".into(),
    );
    expect(
        out.value("STATIC-EXIT") == Some("0"),
        format!(
            "the static run iommud died in finished and exited 0 ({:?})",
            out.value("STATIC-EXIT")
        ),
    );
    across_the_crash(&out, "static", VALIDATED, &mut expect);
    final_run_intact(&out, "a new driver after the grace period", &mut expect);
    expect(
        !out.job_lines().any(|l| l.contains("-FAILED")),
        "every iommud started".into(),
    );
    drop(expect);
    report("guest-restart", &out, bad)
}
