//! `cargo xtask guest-security`: in the QEMU guest, an unprivileged process
//! (uid 65534, `nobody`) cannot stop iommud, switch a domain's policy, tune
//! reclamation, read a domain's mappings or attach a NIC (it cannot open the
//! NIC's sysfs BAR file, the proof of ownership); the NIC's real driver (root
//! e1000d) still attaches and moves every frame intact, and iommud counts
//! each refusal.

use std::time::Duration;

use crate::demo::{start_iommud, STOP_IOMMUD};
use crate::guest::{self, GuestOutput, GuestRun};
use crate::util::Result;

const FRAMES: u64 = 2000;

/// `(label, iommuctl arguments)` each run as nobody; every one must fail
/// with "permission denied".
const REFUSED: [(&str, &str); 5] = [
    ("stop", "stop"),
    ("switch", "write /scheme/iommu/domains/00:01.0/flush strict"),
    ("reclaim", "write /scheme/iommu/reclaim off"),
    ("mappings", "cat /scheme/iommu/domains/00:01.0/mappings"),
    ("attach", "attach 00:02.0 global strict"),
];

fn script() -> String {
    let mut s = start_iommud("");
    // The real driver attaches 00:01.0 and 00:02.0 and streams frames in the
    // background while nobody tries its luck.
    s.push_str(&format!(
        "e1000d loop --mapper libdma --strategy magazine --packets {FRAMES} > /tmp/e1000d.out 2>&1 &\n\
epid=$!\nsleep 1\n"
    ));
    for (label, args) in REFUSED {
        s.push_str(&format!(
            "out=$(iommuctl --as 65534:65534 {args} 2>&1); rc=$?\n\
echo \"SEC {label} rc=$rc $(echo \"$out\" | grep -c -i 'permission denied')\"\n\
echo \"$out\" | sed 's/^/sec-out: /'\n"
        ));
    }
    s.push_str(
        "iommuctl --as 65534:65534 cat /scheme/iommu/stats > /dev/null; echo \"SEC stats rc=$?\"\n\
wait $epid; rc=$?\ncat /tmp/e1000d.out\necho \"E1000D-EXIT $rc\"\n\
echo STATS-BEGIN\niommuctl cat /scheme/iommu/stats\necho STATS-END\n\
iommuctl cat /scheme/iommu/stats > /dev/null && echo \"SEC alive 1\"\n",
    );
    s.push_str(STOP_IOMMUD);
    s.push_str("exit $rc\n");
    s
}

fn stat(out: &GuestOutput, key: &str) -> Option<u64> {
    crate::demo::section(out, "STATS")
        .iter()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
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
    for (label, args) in REFUSED {
        let line = out.value(&format!("SEC {label}")).unwrap_or("");
        expect(
            line.starts_with("rc=1 ") && !line.ends_with(" 0"),
            format!("nobody: `iommuctl {args}` refused with permission denied ({line:?})"),
        );
    }
    expect(
        out.value("SEC stats") == Some("rc=0"),
        "nobody may read the unit-wide stats".into(),
    );
    let l = crate::demo::loop_line(out);
    let n = |k: &str| l.as_ref().and_then(|m| m.get(k)).cloned();
    expect(
        out.success()
            && n("received").as_deref() == Some(&FRAMES.to_string())
            && n("lost").as_deref() == Some("0")
            && n("corrupt").as_deref() == Some("0"),
        format!(
            "the real driver (root e1000d) moved {FRAMES} frames intact: received={:?} lost={:?} corrupt={:?}",
            n("received"),
            n("lost"),
            n("corrupt")
        ),
    );
    let admin = stat(out, "refused_admin");
    expect(
        admin.is_some_and(|v| v >= 3),
        format!("iommud counted the administrative refusals: refused_admin={admin:?}"),
    );
    let proof = stat(out, "refused_proof");
    expect(
        proof == Some(1),
        format!("and the attach without proof: refused_proof={proof:?}"),
    );
    expect(
        out.value("SEC alive") == Some("1"),
        "iommud still running after the attempts".into(),
    );
    bad
}

/// Runs the test.
pub fn run() -> Result<()> {
    let run = GuestRun::new("test-security", script())
        .package("iommud")
        .package("e1000d")
        .timeout(Duration::from_secs(180));
    let out = guest::run(&run)?;
    println!("log: {}", out.log_path.display());
    let bad = check(&out);
    if bad.is_empty() {
        println!("guest-security: PASS");
        Ok(())
    } else {
        Err(format!("guest-security: {}", bad.join("; ")))
    }
}
