//! `cargo xtask guest-smoke`: proves the harness (kernel, devices, VT-d registers,
//! hugepages) without any project binary.

use std::time::Duration;

use crate::guest::{self, parse_hex, GuestOutput, GuestRun};
use crate::util::Result;

/// VER, CAP and ECAP of QEMU's `intel-iommu` as measured here (caching mode off).
pub const VTD_VER: u64 = 0x10;
pub const VTD_CAP: u64 = 0x00D2_008C_222F_0606;
pub const VTD_ECAP: u64 = 0xF42;
/// CAP.CM.
const CAP_CM: u64 = 1 << 7;

const SCRIPT: &str = r#"
echo "KERNEL $(uname -r)"
if [ -c /dev/mem ]; then echo "DEVMEM present"; else echo "DEVMEM missing"; fi
if [ -f /sys/firmware/acpi/tables/DMAR ]; then
  echo "DMAR present $(wc -c < /sys/firmware/acpi/tables/DMAR) bytes"
else
  echo "DMAR missing"
fi
for d in /sys/bus/pci/devices/*; do
  echo "PCI ${d##*/} $(cat $d/vendor):$(cat $d/device) class $(cat $d/class)"
done
echo "VTD VER $(devmem 0xfed90000 32)"
echo "VTD CAP $(devmem 0xfed90008 64)"
echo "VTD ECAP $(devmem 0xfed90010 64)"
grep Huge /proc/meminfo
grep hugetlbfs /proc/mounts
true
"#;

/// The boot used by `guest-smoke`.
pub fn guest_run(caching_mode: bool) -> GuestRun {
    let name = if caching_mode { "smoke-cm" } else { "smoke" };
    GuestRun::new(name, SCRIPT)
        .caching_mode(caching_mode)
        .timeout(Duration::from_secs(90))
}

/// Boots, then checks every expected line; prints PASS/FAIL per check.
pub fn run(caching_mode: bool) -> Result<()> {
    let out = guest::run(&guest_run(caching_mode))?;
    println!("xtask: guest boot took {:.1} s", out.duration.as_secs_f64());
    let failures = check(&out, caching_mode);
    if failures == 0 {
        println!("guest-smoke: PASS");
        Ok(())
    } else {
        println!(
            "guest-smoke: FAIL ({failures} checks; log {})",
            out.log_path.display()
        );
        Err(format!("guest-smoke: {failures} checks failed"))
    }
}

fn check(out: &GuestOutput, caching_mode: bool) -> usize {
    let mut failures = 0;
    let mut expect = |ok: bool, what: &str| {
        println!("  {} {what}", if ok { "ok  " } else { "FAIL" });
        failures += usize::from(!ok);
    };
    expect(
        out.success(),
        &format!("job finished: GUEST-EXIT {:?}", out.exit_marker),
    );
    expect(
        out.value("KERNEL").is_some(),
        &format!("kernel {}", out.value("KERNEL").unwrap_or("?")),
    );
    expect(out.value("DEVMEM") == Some("present"), "/dev/mem exists");
    expect(
        out.value("DMAR").is_some_and(|v| v.starts_with("present")),
        "/sys/firmware/acpi/tables/DMAR exists",
    );
    let nics: Vec<&str> = out
        .job_lines()
        .filter_map(|l| l.strip_prefix("PCI "))
        .filter(|l| l.contains("0x8086:0x100e"))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    expect(
        nics == ["0000:00:01.0", "0000:00:02.0"],
        &format!("two e1000 (8086:100e) at 00:01.0, 00:02.0: found {nics:?}"),
    );
    let reg = |k: &str| out.value(k).and_then(parse_hex);
    let cap = if caching_mode {
        VTD_CAP | CAP_CM
    } else {
        VTD_CAP
    };
    for (k, want) in [
        ("VTD VER", VTD_VER),
        ("VTD CAP", cap),
        ("VTD ECAP", VTD_ECAP),
    ] {
        let got = reg(k);
        let read = got.map_or("nothing".to_string(), |v| format!("{v:#X}"));
        expect(got == Some(want), &format!("{k} = {want:#X} (read {read})"));
    }
    let huge = out
        .value("HugePages_Total:")
        .and_then(|v| v.parse::<u32>().ok());
    expect(
        huge == Some(guest::HUGEPAGES),
        &format!("HugePages_Total {huge:?} == {}", guest::HUGEPAGES),
    );
    expect(
        out.job_lines()
            .any(|l| l.contains("hugetlbfs /dev/hugepages")),
        "hugetlbfs mounted at /dev/hugepages",
    );
    failures
}
