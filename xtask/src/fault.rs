//! `cargo xtask guest-fault`: a device DMA outside its mappings is blocked and reported.
//!
//! In one guest, with iommud translating and e1000d on libdma (magazine):
//! 1. NIC A (00:01.0) gets a TX descriptor at IOVA [`BAD_IOVA`], never mapped: its read
//!    must show up in iommud's `faults` as `bdf=00:01.0 iova=0x900000 access=read`.
//! 2. NIC B (00:02.0) gets an RX descriptor whose buffer address is the *physical* address
//!    of a canary page (filled with a pattern, never mapped), and A sends it a frame.
//!    Without an IOMMU the NIC would write the frame over the canary; here the write must
//!    be blocked (`changed_bytes=0`) and listed as `bdf=00:02.0 iova=<canary> access=write`.
//! 3. The same e1000d then streams a normal burst, and a second e1000d process after it
//!    another: both must deliver every frame intact.
//!
//! A second, short boot is the control: iommud with `--no-translation` (IOVA = physical
//! address) and the same canary step, which must find the canary *overwritten*: proof that
//! the first boot's intact canary is the IOMMU's doing, not a test that cannot fail.

use std::time::Duration;

use crate::demo::{section, start_iommud, STOP_IOMMUD};
use crate::guest::{self, parse_hex, GuestOutput, GuestRun};
use crate::util::Result;

/// The TX descriptor's unmapped IOVA (below the magazine range, which starts at 1 GiB).
const BAD_IOVA: u64 = 0x90_0000;
/// Frames in each burst.
const BURST: u64 = 2000;

fn script() -> String {
    let mut s = start_iommud("");
    s.push_str(&format!(
        "e1000d loop --mapper libdma --strategy magazine --packets {BURST} --bad-iova {BAD_IOVA:#x} --canary
rc1=$?
echo \"E1000D-EXIT $rc1\"
e1000d loop --mapper libdma --strategy magazine --packets {BURST}
rc2=$?
echo \"E1000D-EXIT $rc2\"
"
    ));
    s.push_str(STOP_IOMMUD);
    s.push_str("[ $rc1 -eq 0 ] && [ $rc2 -eq 0 ]\n");
    s
}

/// The value of `key=value` in a line of space-separated fields.
pub fn kv<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
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
        format!("both e1000d runs exit 0: GUEST-EXIT {:?}", out.exit_marker),
    );
    let loops: Vec<&str> = out
        .job_lines()
        .filter_map(|l| l.trim().strip_prefix("loop: "))
        .collect();
    expect(
        loops.len() == 2,
        format!("two bursts reported ({} found)", loops.len()),
    );
    for (i, l) in loops.iter().enumerate() {
        let n = |k| kv(l, k).and_then(|v| v.parse::<u64>().ok());
        expect(
            n("received") == Some(BURST) && n("lost") == Some(0) && n("corrupt") == Some(0),
            format!(
                "burst {} after the faults: received={:?} lost={:?} corrupt={:?} of {BURST}",
                i + 1,
                n("received"),
                n("lost"),
                n("corrupt")
            ),
        );
    }
    expect(
        out.job_lines()
            .any(|l| l.contains("bad-iova: TX descriptor")),
        format!("NIC A was given a TX descriptor at {BAD_IOVA:#x}"),
    );
    let canary = out.value("canary:");
    let addr = canary.and_then(|c| kv(c, "addr")).and_then(parse_hex);
    let changed = canary
        .and_then(|c| kv(c, "changed_bytes"))
        .and_then(|v| v.parse::<u64>().ok());
    expect(
        canary.and_then(|c| kv(c, "descriptor_completed")) == Some("true"),
        "NIC B completed the RX descriptor pointing at the canary".into(),
    );
    expect(
        changed == Some(0),
        format!(
            "canary page at {} unchanged (changed_bytes={changed:?})",
            addr.map_or("?".into(), |a| format!("{a:#x}"))
        ),
    );
    expect_blocked_faults(out, ("00:01.0", BAD_IOVA), "00:02.0", addr, &mut expect);
    bad
}

/// The checks every fault test makes of iommud's `faults`: it lists the TX
/// device's read at its unmapped IOVA (`tx`: BDF and IOVA), and the RX
/// device's write over the canary page at `canary` (its page address).
pub fn expect_blocked_faults(
    out: &GuestOutput,
    tx: (&str, u64),
    rx: &str,
    canary: Option<u64>,
    expect: &mut impl FnMut(bool, String),
) {
    let faults = crate::demo::fault_lines(out);
    for f in section(out, "FAULTS") {
        println!("       {f}");
    }
    let has = |bdf: &str, iova: u64, access: &str| {
        faults.iter().any(|f| {
            kv(f, "bdf") == Some(bdf)
                && kv(f, "iova").and_then(parse_hex) == Some(iova)
                && kv(f, "access") == Some(access)
        })
    };
    let (tx_bdf, bad_iova) = tx;
    expect(
        has(tx_bdf, bad_iova, "read"),
        format!("faults lists bdf={tx_bdf} iova={bad_iova:#x} access=read"),
    );
    match canary {
        Some(a) => expect(
            has(rx, a & !0xfff, "write"),
            format!("faults lists bdf={rx} iova={:#x} access=write", a & !0xfff),
        ),
        None => expect(false, "canary address reported".into()),
    }
}

/// The control boot: without translation the NIC's write lands on the canary.
fn control() -> Result<Vec<String>> {
    let mut s = start_iommud("--no-translation");
    s.push_str(&format!(
        "e1000d loop --mapper libdma --packets 100 --canary\necho \"E1000D-EXIT $?\"\n{STOP_IOMMUD}"
    ));
    let out = guest::run(
        &GuestRun::new("test-fault-control", s)
            .package("iommud")
            .package("e1000d")
            .timeout(Duration::from_secs(90))
            .echo(false),
    )?;
    let canary = out.value("canary:");
    let changed = canary
        .and_then(|c| kv(c, "changed_bytes"))
        .and_then(|v| v.parse::<u64>().ok());
    let ok = changed.is_some_and(|n| n > 0);
    println!(
        "  {} control (--no-translation): the NIC overwrote the canary (changed_bytes={changed:?})",
        if ok { "ok  " } else { "FAIL" }
    );
    Ok(if ok {
        Vec::new()
    } else {
        vec![format!(
            "control run did not overwrite the canary; log {}",
            out.log_path.display()
        )]
    })
}

/// `cargo xtask guest-fault`.
pub fn run() -> Result<()> {
    let out = guest::run(
        &GuestRun::new("test-fault", script())
            .package("iommud")
            .package("e1000d")
            .timeout(Duration::from_secs(150))
            .echo(false),
    )?;
    let mut bad = check(&out);
    bad.extend(control()?);
    if bad.is_empty() {
        println!("guest-fault: PASS");
        Ok(())
    } else {
        println!("guest-fault: FAIL; log {}", out.log_path.display());
        Err(format!("guest-fault: {}", bad.join("; ")))
    }
}
