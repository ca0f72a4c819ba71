//! Linux's own intel-iommu driver as a netbench peer, on the same QEMU machine.
//!
//! A stock Debian kernel (the `linux-image-amd64` flavour: it has e1000, igb and pktgen as
//! modules, which the cloud flavour lacks) boots with the harness's machine (`-M q35`,
//! TCG, the same `intel-iommu` device options, two NICs on one hub) and a busybox
//! initramfs carrying those modules. The guest kernel owns the VT-d unit in one of four
//! modes ([`MODES`]); the in-kernel packet generator (`/proc/net/pktgen`) sends frames from
//! NIC A to NIC B's MAC over the hub, and B's `rx_packets` counts what arrived. Every boot
//! reports the mode the kernel actually took (IOMMU group type of both NICs, the iommu
//! core's policy lines, the DMAR enable/disable line); a row whose reported mode is not
//! the one asked for fails. See `docs/PERFORMANCE.md` ("Linux as a peer") for how these
//! rows compare with iommud's.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::guest::deps::{self, Apt};
use crate::guest::{self, GuestOutput, GuestRun};
use crate::util::{output, Result};

/// The metapackage whose dependency names the versioned stock kernel package.
const METAPACKAGE: &str = "linux-image-amd64";
/// Where the unpacked stock kernel lives under the guest cache.
const UNPACK: &str = "linux-peer-kernel";
/// Guest directory holding the modules.
const GUEST_MODDIR: &str = "/lib/modules/linuxpeer";
/// The modules the peer loads (their dependencies are added from `.modinfo`).
pub const MODULES: [&str; 2] = ["e1000", "pktgen"];
/// Seconds the guest waits after pktgen stops before reading B's counters: frames still
/// queued in QEMU's hub land, and e1000's watchdog (every 2 s) copies the NIC's missed
/// packets register into `rx_missed_errors`.
const SETTLE_SECS: u32 = 3;

/// One way the guest kernel runs its IOMMU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mode {
    /// Row name (`linux-strict`, ...).
    pub name: &'static str,
    /// Short mode word the kernel log must confirm (see [`Reported::mode`]).
    pub expect: &'static str,
    /// Kernel command line arguments selecting the mode.
    pub args: &'static str,
}

/// The four modes, the translation-off baseline first.
pub const MODES: [Mode; 4] = [
    Mode {
        name: "linux-off",
        expect: "off",
        args: "intel_iommu=off",
    },
    Mode {
        name: "linux-strict",
        expect: "strict",
        args: "intel_iommu=on iommu.strict=1",
    },
    Mode {
        name: "linux-lazy",
        expect: "lazy",
        args: "intel_iommu=on iommu.strict=0",
    },
    Mode {
        name: "linux-passthrough",
        expect: "passthrough",
        args: "intel_iommu=on iommu.passthrough=1",
    },
];

/// The modes `--only` names select: `linux` means all four.
pub fn select(only: &[String]) -> Vec<Mode> {
    MODES
        .into_iter()
        .filter(|m| only.is_empty() || only.iter().any(|o| o == "linux" || o == m.name))
        .collect()
}

/// The unpacked stock kernel.
#[derive(Clone, Debug)]
pub struct PeerKernel {
    pub vmlinuz: PathBuf,
    /// `lib/modules/<version>`.
    pub moddir: PathBuf,
}

/// The versioned package `linux-image-amd64` depends on (e.g. `linux-image-6.1.0-56-amd64`).
fn kernel_package(apt: &mut Apt) -> Result<String> {
    let query = || -> Option<String> {
        let out = output(Command::new("apt-cache").args(["depends", METAPACKAGE])).ok()?;
        out.lines()
            .filter_map(|l| l.trim().strip_prefix("Depends:"))
            .map(|p| p.trim().trim_matches(|c| c == '<' || c == '>').to_string())
            .find(|p| {
                p.starts_with("linux-image-")
                    && p.ends_with("-amd64")
                    && p.as_bytes()
                        .get("linux-image-".len())
                        .is_some_and(u8::is_ascii_digit)
            })
    };
    if let Some(p) = query() {
        return Ok(p);
    }
    apt.update()?;
    query().ok_or_else(|| format!("apt-cache depends {METAPACKAGE} names no versioned kernel"))
}

fn single_subdir(dir: &Path) -> Option<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    v.sort();
    (v.len() == 1).then(|| v.remove(0))
}

/// Fetches (once) and unpacks the stock kernel into `target/guest/cache/linux-peer-kernel`.
pub fn ensure_kernel() -> Result<PeerKernel> {
    let cache = deps::cache_dir();
    let root = cache.join(UNPACK);
    if deps::find_vmlinuz(&root).is_none() {
        let mut apt = Apt::default();
        let pkg = kernel_package(&mut apt)?;
        deps::fetch_unpacked(&mut apt, &cache, &pkg, UNPACK)?;
    }
    let vmlinuz = deps::find_vmlinuz(&root)
        .ok_or_else(|| format!("{} has no boot/vmlinuz-*", root.display()))?;
    let moddir = single_subdir(&root.join("lib").join("modules"))
        .ok_or_else(|| format!("{}: expected one lib/modules/<version>", root.display()))?;
    Ok(PeerKernel { vmlinuz, moddir })
}

/// Module names compare with `-` and `_` as the same character.
fn norm(name: &str) -> String {
    name.replace('-', "_")
}

/// Every `.ko` under `moddir/kernel`, by normalised name.
fn module_index(moddir: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let mut idx = BTreeMap::new();
    let mut stack = vec![moddir.join("kernel")];
    while let Some(d) = stack.pop() {
        let rd = fs::read_dir(&d).map_err(|e| format!("{}: {e}", d.display()))?;
        for p in rd.filter_map(|e| e.ok().map(|e| e.path())) {
            if p.is_dir() {
                stack.push(p);
            } else if let Some(n) = p.file_name().and_then(|n| n.to_str()) {
                if let Some(stem) = n.strip_suffix(".ko") {
                    idx.insert(norm(stem), p.clone());
                }
            }
        }
    }
    Ok(idx)
}

/// The `depends=` entry of a module's `.modinfo` strings (NUL-separated `key=value`).
pub fn modinfo_depends(ko: &[u8]) -> Vec<String> {
    let key = b"depends=";
    let mut i = 0;
    while let Some(off) = ko[i..].windows(key.len()).position(|w| w == key) {
        let at = i + off;
        if at == 0 || ko[at - 1] == 0 {
            let start = at + key.len();
            let end = ko[start..]
                .iter()
                .position(|&b| b == 0)
                .map_or(ko.len(), |n| start + n);
            return String::from_utf8_lossy(&ko[start..end])
                .split(',')
                .filter(|s| !s.is_empty())
                .map(norm)
                .collect();
        }
        i = at + 1;
    }
    Vec::new()
}

/// `wanted` and their dependencies, each after everything it depends on.
fn load_order(idx: &BTreeMap<String, PathBuf>, wanted: &[&str]) -> Result<Vec<(String, PathBuf)>> {
    fn visit(
        idx: &BTreeMap<String, PathBuf>,
        name: &str,
        depth: usize,
        out: &mut Vec<(String, PathBuf)>,
    ) -> Result<()> {
        if out.iter().any(|(n, _)| n == name) {
            return Ok(());
        }
        if depth > 32 {
            return Err(format!("module dependency chain too deep at {name}"));
        }
        let path = idx
            .get(name)
            .ok_or_else(|| format!("stock kernel has no module {name}"))?;
        let bytes = fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        for d in modinfo_depends(&bytes) {
            visit(idx, &d, depth + 1, out)?;
        }
        if !out.iter().any(|(n, _)| n == name) {
            out.push((name.to_string(), path.clone()));
        }
        Ok(())
    }
    let mut out = Vec::new();
    for w in wanted {
        visit(idx, &norm(w), 0, &mut out)?;
    }
    Ok(out)
}

/// The guest job: load the modules, report the IOMMU mode, then per rep one pktgen run
/// per frame size.
pub fn script(modules: &[String], sizes: &[u64], packets: u64, reps: u64) -> String {
    let mut s = String::new();
    // No IPv6 autoconfiguration traffic on the hub: B must count pktgen's frames only.
    s.push_str(
        "echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6\n\
echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6\n",
    );
    for m in modules {
        let _ = writeln!(
            s,
            "insmod {GUEST_MODDIR}/{m}.ko || {{ echo \"linuxpeer: failed insmod {m}\"; exit 1; }}"
        );
    }
    let _ = write!(
        s,
        r#"A=""; B=""
for i in $(seq 100); do
  A=$(ls /sys/bus/pci/devices/0000:00:01.0/net 2>/dev/null); B=$(ls /sys/bus/pci/devices/0000:00:02.0/net 2>/dev/null)
  [ -n "$A" ] && [ -n "$B" ] && break; sleep 0.1
done
[ -n "$A" ] && [ -n "$B" ] || {{ echo "linuxpeer: failed no network interfaces on 00:01.0 / 00:02.0"; exit 1; }}
ip link set "$A" up; ip link set "$B" up
for i in $(seq 200); do
  [ "$(cat /sys/class/net/$A/carrier 2>/dev/null)" = 1 ] && [ "$(cat /sys/class/net/$B/carrier 2>/dev/null)" = 1 ] && break; sleep 0.1
done
# pktgen's thread for A is kpktgend_0 (CPU 0); A's interrupt goes to CPU 0 too and B's to
# CPU 1, so B's receive work runs beside the sender instead of starving under it.
IA=$(cat /sys/class/net/$A/device/irq); IB=$(cat /sys/class/net/$B/device/irq)
echo 1 > /proc/irq/$IA/smp_affinity; echo 2 > /proc/irq/$IB/smp_affinity
echo "linuxpeer-irq: a=$IA b=$IB affinity_a=$(cat /proc/irq/$IA/smp_affinity) affinity_b=$(cat /proc/irq/$IB/smp_affinity)"
echo "linuxpeer-group: a=$(cat /sys/bus/pci/devices/0000:00:01.0/iommu_group/type 2>/dev/null || echo none) b=$(cat /sys/bus/pci/devices/0000:00:02.0/iommu_group/type 2>/dev/null || echo none) carrier_a=$(cat /sys/class/net/$A/carrier) carrier_b=$(cat /sys/class/net/$B/carrier)"
dmesg | grep -E 'iommu: Default domain type|DMA domain TLB invalidation policy|DMAR: IOMMU (enabled|disabled)' | sed 's/^/linuxpeer-klog: /'
PG=/proc/net/pktgen
echo rem_device_all > $PG/kpktgend_0
echo "add_device $A" > $PG/kpktgend_0 || {{ echo "linuxpeer: failed pktgen add_device $A"; exit 1; }}
MACB=$(cat /sys/class/net/$B/address)
pg() {{ echo "$1" > $PG/$A || echo "linuxpeer: failed pktgen $1"; }}
run() {{
  pg "count $2"; pg "pkt_size $1"; pg "delay 0"; pg "clone_skb 0"; pg "dst_mac $MACB"; pg "dst 10.99.0.2"
  r0=$(cat /sys/class/net/$B/statistics/rx_packets); m0=$(cat /sys/class/net/$B/statistics/rx_missed_errors)
  echo start > $PG/pgctrl
  # The write normally returns when the run ends, but can return early; wait for the
  # result line (at most 10 min).
  for i in $(seq 6000); do grep -q "Result: OK" $PG/$A && break; sleep 0.1; done
  sleep {SETTLE_SECS}
  r1=$(cat /sys/class/net/$B/statistics/rx_packets); m1=$(cat /sys/class/net/$B/statistics/rx_missed_errors)
  echo "linuxpeer-run: size=$1 count=$2 rx_before=$r0 rx_after=$r1 missed_before=$m0 missed_after=$m1"
  sed 's/^/linuxpeer-pg: /' $PG/$A
}}
"#
    );
    for _ in 0..reps {
        for size in sizes {
            let _ = writeln!(s, "run {size} {packets}");
        }
    }
    s.push_str("exit 0\n");
    s
}

/// What the guest kernel reported about its IOMMU.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Reported {
    /// `iommu_group/type` of NIC A and NIC B (`None`: no group).
    pub group_a: Option<String>,
    pub group_b: Option<String>,
    /// "Default domain type: X".
    pub domain: Option<String>,
    /// "DMA domain TLB invalidation policy: X mode".
    pub policy: Option<String>,
    /// `Some(true)` on "DMAR: IOMMU enabled", `Some(false)` on "DMAR: IOMMU disabled".
    pub dmar_enabled: Option<bool>,
}

impl Reported {
    /// The mode these facts amount to: `strict`, `lazy`, `passthrough`, `off`, or a
    /// `mismatch(...)` description.
    pub fn mode(&self) -> String {
        let g = (self.group_a.as_deref(), self.group_b.as_deref());
        let same = g.0 == g.1;
        let policy = self.policy.as_deref();
        let domain = self.domain.as_deref();
        match (same, g.1, policy, domain, self.dmar_enabled) {
            (true, Some("DMA"), Some("strict"), Some("Translated"), Some(true)) => "strict".into(),
            (true, Some("DMA-FQ"), Some("lazy"), Some("Translated"), Some(true)) => "lazy".into(),
            (true, Some("identity"), _, Some("Passthrough"), Some(true)) => "passthrough".into(),
            (true, None, _, _, Some(false)) => "off".into(),
            _ => format!(
                "mismatch(group_a={} group_b={} domain={} policy={} dmar={})",
                g.0.unwrap_or("none"),
                g.1.unwrap_or("none"),
                domain.unwrap_or("?"),
                policy.unwrap_or("?"),
                match self.dmar_enabled {
                    Some(true) => "enabled",
                    Some(false) => "disabled",
                    None => "?",
                }
            ),
        }
    }

    /// One line for the results: the mode and the facts behind it.
    pub fn describe(&self) -> String {
        let group = self.group_b.as_deref().unwrap_or("none");
        let policy = self.policy.as_deref().unwrap_or("?");
        match self.mode().as_str() {
            "off" => "off (DMAR: IOMMU disabled; no IOMMU group)".into(),
            "passthrough" => {
                format!("passthrough (group type {group}, default domain Passthrough)")
            }
            m @ ("strict" | "lazy") => format!("{m} (group type {group}, policy {policy} mode)"),
            m => m.to_string(),
        }
    }
}

/// One pktgen run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sample {
    pub size: u64,
    /// Frames pktgen sent (`pkts-sofar`).
    pub sent: u64,
    /// B's `rx_packets` increase.
    pub received: u64,
    /// B's `rx_missed_errors` increase: frames the NIC dropped for want of a free RX
    /// descriptor (the kernel driver did not refill its ring in time).
    pub missed: u64,
    /// pktgen's run time (µs, from its `Result: OK:` line).
    pub usec: u64,
}

impl Sample {
    /// The row's rate: frames pktgen sent per second (each one mapped by A's driver,
    /// transmitted by the device, delivered into B's ring or dropped by B, and unmapped at
    /// TX completion). `docs/PERFORMANCE.md` says why this and not B's delivered rate.
    pub fn pps(&self) -> Option<f64> {
        (self.usec > 0).then(|| self.sent as f64 * 1e6 / self.usec as f64)
    }

    /// Frames B's driver took in per second of pktgen's run (stray frames beyond what was
    /// sent are not counted).
    pub fn delivered_pps(&self) -> Option<f64> {
        (self.usec > 0).then(|| self.received.min(self.sent) as f64 * 1e6 / self.usec as f64)
    }
}

/// What one Linux boot measured.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LinuxMeasured {
    pub reported: Reported,
    pub samples: Vec<Sample>,
    /// `linuxpeer: failed ...` lines.
    pub failures: Vec<String>,
}

impl LinuxMeasured {
    /// packets/s of each rep, per frame size, in run order.
    pub fn pps(&self) -> BTreeMap<u64, Vec<f64>> {
        self.per_size(Sample::pps)
    }

    /// B's delivered rate of each rep, per frame size.
    pub fn delivered_pps(&self) -> BTreeMap<u64, Vec<f64>> {
        self.per_size(Sample::delivered_pps)
    }

    /// packets/s of every rep of `size` in run order, `None` where a run gave no result
    /// (so that rep *i* pairs with rep *i* of the baseline).
    pub fn pps_by_rep(&self, size: u64) -> Vec<Option<f64>> {
        self.samples
            .iter()
            .filter(|s| s.size == size)
            .map(Sample::pps)
            .collect()
    }

    fn per_size(&self, f: fn(&Sample) -> Option<f64>) -> BTreeMap<u64, Vec<f64>> {
        let mut m: BTreeMap<u64, Vec<f64>> = BTreeMap::new();
        for s in &self.samples {
            if let Some(p) = f(s) {
                m.entry(s.size).or_default().push(p);
            }
        }
        m
    }

    pub fn sent(&self) -> u64 {
        self.samples.iter().map(|s| s.sent).sum()
    }

    pub fn received(&self) -> u64 {
        self.samples.iter().map(|s| s.received.min(s.sent)).sum()
    }
}

fn kv(rest: &str) -> BTreeMap<&str, &str> {
    rest.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .collect()
}

/// The number after `key` in `line` (`pkts-sofar: 123` → 123).
fn after(line: &str, key: &str) -> Option<u64> {
    let rest = &line[line.find(key)? + key.len()..];
    let digits: String = rest
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// Parses a Linux boot's job output.
pub fn measure<'a>(lines: impl Iterator<Item = &'a str>) -> LinuxMeasured {
    let mut m = LinuxMeasured::default();
    let mut cur: Option<Sample> = None;
    for l in lines {
        let t = l.trim();
        if let Some(r) = t.strip_prefix("linuxpeer-group:") {
            let f = kv(r);
            let g = |k| f.get(k).filter(|v| **v != "none").map(|v| v.to_string());
            m.reported.group_a = g("a");
            m.reported.group_b = g("b");
        } else if let Some(r) = t.strip_prefix("linuxpeer-klog:") {
            if let Some(x) = r.split("Default domain type:").nth(1) {
                m.reported.domain = x.split_whitespace().next().map(str::to_string);
            } else if let Some(x) = r.split("TLB invalidation policy:").nth(1) {
                m.reported.policy = x.split_whitespace().next().map(str::to_string);
            } else if r.contains("DMAR: IOMMU enabled") {
                m.reported.dmar_enabled = Some(true);
            } else if r.contains("DMAR: IOMMU disabled") {
                m.reported.dmar_enabled = Some(false);
            }
        } else if let Some(r) = t.strip_prefix("linuxpeer-run:") {
            m.samples.extend(cur.take());
            let f = kv(r);
            let n = |k| f.get(k).and_then(|v| v.parse::<u64>().ok());
            let delta = |a, b| n(a).zip(n(b)).map_or(0, |(a, b)| a.saturating_sub(b));
            cur = Some(Sample {
                size: n("size").unwrap_or(0),
                received: delta("rx_after", "rx_before"),
                missed: delta("missed_after", "missed_before"),
                ..Sample::default()
            });
        } else if let Some(r) = t.strip_prefix("linuxpeer-pg:") {
            if let Some(s) = cur.as_mut() {
                if let Some(n) = after(r, "pkts-sofar:") {
                    s.sent = n;
                }
                if let Some(n) = after(r, "Result: OK:") {
                    s.usec = n;
                }
            }
        } else if t.starts_with("linuxpeer: failed") {
            m.failures.push(t.to_string());
        }
    }
    m.samples.extend(cur.take());
    m
}

/// The stock kernel's cached modules placed in a run's initramfs; returns the load order.
fn add_modules(
    mut run: GuestRun,
    k: &PeerKernel,
    wanted: &[&str],
) -> Result<(GuestRun, Vec<String>)> {
    let idx = module_index(&k.moddir)?;
    let mut names = Vec::new();
    for (name, path) in load_order(&idx, wanted)? {
        let bytes = fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        run = run.file(format!("{GUEST_MODDIR}/{name}.ko"), bytes, 0o644);
        names.push(name);
    }
    Ok((run, names))
}

/// Boots the stock kernel in `mode` and runs `reps` × every size × `packets` frames.
pub fn boot(
    mode: &Mode,
    sizes: &[u64],
    packets: u64,
    reps: u64,
    name: &str,
) -> Result<(LinuxMeasured, GuestOutput)> {
    let kernel = ensure_kernel()?;
    let mut assets = guest::deps::ensure()?;
    assets.kernel = kernel.vmlinuz.clone();
    // Boot (~30 s under TCG) plus the runs at a pessimistic 1000 frames/s.
    let secs = 180 + reps * sizes.len() as u64 * (packets / 1000 + SETTLE_SECS as u64 + 1);
    let mut run = GuestRun::new(name.to_string(), String::new())
        .timeout(Duration::from_secs(secs))
        .echo(false);
    // The harness's command line keeps the guest kernel off the VT-d unit; the peer's
    // kernel owns it, so the mode arguments replace that line.
    run.kernel_cmdline = Some(format!(
        "console=ttyS0 intremap=off panic=-1 quiet {}",
        mode.args
    ));
    let (mut run, modules) = add_modules(run, &kernel, &MODULES)?;
    run.script = script(&modules, sizes, packets, reps);
    let initrd = guest::image::build(&run, &assets)?;
    let out = guest::qemu::boot(&run, &assets, &initrd)?;
    let m = measure(out.job_lines());
    Ok((m, out))
}

/// Why a Linux row failed, if it did: boot failed, mode not the one asked for, runs
/// missing, or no frame arrived.
pub fn problems(
    mode: &Mode,
    m: &LinuxMeasured,
    out: &GuestOutput,
    sizes: &[u64],
    reps: u64,
) -> Vec<String> {
    let mut bad = Vec::new();
    if !out.success() {
        bad.push(format!(
            "{}: exit {:?}{} (log {})",
            mode.name,
            out.exit_marker,
            if out.timed_out { ", timed out" } else { "" },
            out.log_path.display()
        ));
    }
    let got = m.reported.mode();
    if got != mode.expect {
        bad.push(format!(
            "{}: asked for {} ({}), kernel reported {got} (log {})",
            mode.name,
            mode.expect,
            mode.args,
            out.log_path.display()
        ));
    }
    bad.extend(m.failures.iter().map(|f| format!("{}: {f}", mode.name)));
    let pps = m.pps();
    for size in sizes {
        if pps.get(size).is_none_or(|v| v.len() as u64 != reps) {
            bad.push(format!(
                "{}: missing pktgen results for {size} B",
                mode.name
            ));
        }
    }
    if m.samples.iter().any(|s| s.sent == 0 || s.received == 0) {
        bad.push(format!(
            "{}: a pktgen run sent or received no frame",
            mode.name
        ));
    }
    bad
}

/// `cargo xtask guest-linux-peer`: one short boot per mode; the kernel must report the
/// mode asked for, pktgen must send every frame, B must receive some and no more than
/// were sent, and every frame B did not receive must show in its missed counter (no free
/// RX descriptor: the kernel driver has no flow control on this loop). The counter can
/// count one frame more than once (QEMU retries a queued frame), so it is a lower bound.
pub fn test() -> Result<()> {
    const FRAMES: u64 = 2000;
    for mode in MODES {
        let (m, out) = boot(&mode, &[64], FRAMES, 1, &format!("test-{}", mode.name))?;
        let mut bad = problems(&mode, &m, &out, &[64], 1);
        for s in &m.samples {
            if s.sent != FRAMES
                || s.received == 0
                || s.received > FRAMES
                || s.received + s.missed < FRAMES
            {
                bad.push(format!(
                    "{}: pktgen sent {}, B received {} and missed {} of {FRAMES} frames (log {})",
                    mode.name,
                    s.sent,
                    s.received,
                    s.missed,
                    out.log_path.display()
                ));
            }
        }
        println!(
            "guest-linux-peer: {:<18} kernel reported {}; sent {} received {} missed {} pps {}  ({:.0} s)",
            mode.name,
            m.reported.describe(),
            m.sent(),
            m.received(),
            m.samples.iter().map(|s| s.missed).sum::<u64>(),
            m.samples
                .first()
                .and_then(Sample::pps)
                .map_or("-".into(), |p| format!("{p:.0}")),
            out.duration.as_secs_f64()
        );
        if !bad.is_empty() {
            return Err(bad.join("; "));
        }
    }
    Ok(())
}

/// The Linux rows of one netbench run, interleaved with iommud's boots.
pub struct PeerBench {
    /// (index of the iommud boot this one runs before, mode), in run order.
    queue: Vec<(usize, Mode)>,
    pub rows: Vec<(Mode, LinuxMeasured)>,
    sizes: Vec<u64>,
    packets: u64,
    reps: u64,
}

impl PeerBench {
    /// The modes `only` selects, spread evenly over `n_ours` iommud boots (`linux-off`
    /// first, with iommud's own baseline).
    pub fn new(only: &[String], n_ours: usize, sizes: &[u64], packets: u64, reps: u64) -> Self {
        let modes = select(only);
        let n = modes.len().max(1);
        let queue = modes
            .into_iter()
            .enumerate()
            .map(|(j, m)| (j * n_ours / n, m))
            .collect();
        PeerBench {
            queue,
            rows: Vec::new(),
            sizes: sizes.to_vec(),
            packets,
            reps,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty() && self.rows.is_empty()
    }

    pub fn boots(&self) -> usize {
        self.queue.len()
    }

    /// Runs the Linux boots due before iommud boot `index` (`usize::MAX`: all left).
    pub fn run_due(&mut self, index: usize, bad: &mut Vec<String>) -> Result<()> {
        while self.queue.first().is_some_and(|(at, _)| *at <= index) {
            let (_, mode) = self.queue.remove(0);
            let name = format!("netbench-{}", mode.name);
            let (m, out) = boot(&mode, &self.sizes, self.packets, self.reps, &name)?;
            let (pps, tx) = (m.pps(), m.delivered_pps());
            let tx_med = |size: u64| {
                tx.get(&size)
                    .and_then(|v| crate::netbench::spread(v))
                    .map_or("-".into(), |s| format!("{:.0}", s.0))
            };
            let med = |size: u64| {
                pps.get(&size)
                    .and_then(|v| crate::netbench::spread(v))
                    .map_or("-".into(), |s| {
                        format!("{:.0} ({:.0}-{:.0})", s.0, s.1, s.2)
                    })
            };
            println!(
                "{:<17} 64 B: {:>22} pps  1500 B: {:>22} pps  (B took in {}, {} pps)  kernel: {}  sent {} received {}  ({:.0} s, log {})",
                mode.name,
                med(64),
                med(1500),
                tx_med(64),
                tx_med(1500),
                m.reported.describe(),
                m.sent(),
                m.received(),
                out.duration.as_secs_f64(),
                out.log_path.display()
            );
            bad.extend(problems(&mode, &m, &out, &self.sizes, self.reps));
            self.rows.push((mode, m));
        }
        Ok(())
    }

    /// packets/s per rep of `linux-off` (the Linux baseline) for `size`.
    fn base(&self, size: u64) -> Vec<Option<f64>> {
        self.rows
            .iter()
            .find(|(md, _)| md.expect == "off")
            .map(|(_, m)| m.pps_by_rep(size))
            .unwrap_or_default()
    }

    /// Median, min and max over reps of this row's ratio to `linux-off` in the same rep
    /// (a rep missing on either side is left out).
    pub fn ratio(&self, m: &LinuxMeasured, size: u64) -> Option<(f64, f64, f64)> {
        let (mine, base): (Vec<f64>, Vec<f64>) = m
            .pps_by_rep(size)
            .into_iter()
            .zip(self.base(size))
            .filter_map(|(a, b)| a.zip(b))
            .unzip();
        crate::netbench::spread(&crate::netbench::rep_ratios(&mine, &base))
    }

    /// Plot series: (legend, median ratio per size).
    pub fn series(&self) -> Vec<(String, Vec<Option<f64>>)> {
        self.rows
            .iter()
            .map(|(mode, m)| {
                (
                    format!("Linux {}", mode.expect),
                    self.sizes
                        .iter()
                        .map(|&s| self.ratio(m, s).map(|r| r.0))
                        .collect(),
                )
            })
            .collect()
    }

    /// `results.json` objects, one per mode and frame size.
    pub fn json(&self) -> Vec<serde_json::Value> {
        use crate::util::json_num as num;
        let mut v = Vec::new();
        for (mode, m) in &self.rows {
            let pps = m.pps();
            for &size in &self.sizes {
                let s = pps.get(&size).and_then(|v| crate::netbench::spread(v));
                let r = self.ratio(m, size);
                let tx = m
                    .delivered_pps()
                    .get(&size)
                    .and_then(|v| crate::netbench::spread(v));
                let runs = m.samples.iter().filter(|x| x.size == size);
                let (sent, received, missed) = runs.fold((0, 0, 0), |(a, b, c), x| {
                    (a + x.sent, b + x.received.min(x.sent), c + x.missed)
                });
                v.push(serde_json::json!({
                    "system": "linux",
                    "config": mode.name,
                    "kernel_args": mode.args,
                    "mode_asked": mode.expect,
                    "kernel_reported": m.reported.describe(),
                    "translation": mode.expect != "off" && mode.expect != "passthrough",
                    "frame_bytes": size,
                    "packets_per_rep": self.packets,
                    "reps": pps.get(&size).map_or(0, Vec::len),
                    "pps": num(s.map(|s| s.0)),
                    "pps_min": num(s.map(|s| s.1)),
                    "pps_max": num(s.map(|s| s.2)),
                    "ratio_to_notrans": num(r.map(|r| r.0)),
                    "ratio_min": num(r.map(|r| r.1)),
                    "ratio_max": num(r.map(|r| r.2)),
                    "delivered_pps": num(tx.map(|t| t.0)),
                    "sent": sent,
                    "received": received,
                    "lost": sent - received,
                    "missed_on_b": missed,
                }));
            }
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STRICT_LOG: &str = "\
linuxpeer-group: a=DMA b=DMA carrier_a=1 carrier_b=1
linuxpeer-klog: [    0.912345] DMAR: IOMMU enabled
linuxpeer-klog: [    1.234567] iommu: Default domain type: Translated (set via kernel command line)
linuxpeer-klog: [    1.234600] iommu: DMA domain TLB invalidation policy: strict mode (set via kernel command line)
linuxpeer-run: size=64 count=1000 rx_before=3 rx_after=1003 missed_before=0 missed_after=0
linuxpeer-pg: Params: count 1000  min_pkt_size: 64  max_pkt_size: 64
linuxpeer-pg: Current:
linuxpeer-pg:      pkts-sofar: 1000  errors: 0
linuxpeer-pg: Result: OK: 50000(c49000+d1000) usec, 1000 (64byte,0frags)
linuxpeer-pg:   20000pps 10Mb/sec (10240000bps) errors: 0
linuxpeer-run: size=1500 count=1000 rx_before=1003 rx_after=1903 missed_before=7 missed_after=107
linuxpeer-pg:      pkts-sofar: 1000  errors: 0
linuxpeer-pg: Result: OK: 100000(c99000+d1000) usec, 1000 (1500byte,0frags)
";

    #[test]
    fn parses_mode_and_runs() {
        let m = measure(STRICT_LOG.lines());
        assert_eq!(m.reported.mode(), "strict");
        assert_eq!(
            m.reported.describe(),
            "strict (group type DMA, policy strict mode)"
        );
        assert_eq!(m.samples.len(), 2);
        assert_eq!(
            m.samples[0],
            Sample {
                size: 64,
                sent: 1000,
                received: 1000,
                missed: 0,
                usec: 50000
            }
        );
        // 1000 frames sent in 50 ms and in 100 ms; 900 of the second 1000 taken in.
        assert_eq!(m.pps()[&64], vec![20000.0]);
        assert_eq!(m.pps()[&1500], vec![10000.0]);
        assert_eq!(m.delivered_pps()[&1500], vec![9000.0]);
        assert_eq!((m.sent(), m.received()), (2000, 1900));
        assert_eq!(m.samples[1].missed, 100);
        assert!(m.failures.is_empty());
    }

    #[test]
    fn each_mode_is_recognised_and_mismatches_are_not() {
        let lines = |group: &str, dmar: &str, domain: &str, policy: &str| {
            format!(
                "linuxpeer-group: a={group} b={group}\nlinuxpeer-klog: DMAR: IOMMU {dmar}\n\
linuxpeer-klog: iommu: Default domain type: {domain} \n\
linuxpeer-klog: iommu: DMA domain TLB invalidation policy: {policy} mode \n"
            )
        };
        let mode = |s: String| measure(s.lines()).reported.mode();
        assert_eq!(
            mode(lines("DMA-FQ", "enabled", "Translated", "lazy")),
            "lazy"
        );
        assert_eq!(
            mode(lines("identity", "enabled", "Passthrough", "lazy")),
            "passthrough"
        );
        // With the IOMMU off the core still prints its defaults; no group is what counts.
        assert_eq!(mode(lines("none", "disabled", "Translated", "lazy")), "off");
        // Asked strict, got lazy (e.g. the argument ignored): not strict.
        assert!(mode(lines("DMA-FQ", "enabled", "Translated", "strict")).starts_with("mismatch"));
        assert!(mode(lines("DMA", "disabled", "Translated", "strict")).starts_with("mismatch"));
        assert!(mode("linuxpeer-group: a=DMA b=identity\n".into()).starts_with("mismatch"));
    }

    #[test]
    fn modinfo_depends_and_load_order() {
        let ko = b"\x7fELF junk depends=fake\0license=GPL\0depends=dca,i2c-algo-bit\0name=igb\0";
        assert_eq!(modinfo_depends(ko), vec!["dca", "i2c_algo_bit"]);
        assert!(modinfo_depends(b"\0depends=\0name=e1000\0").is_empty());

        let dir = std::env::temp_dir().join(format!("linuxpeer-test-{}", std::process::id()));
        let k = dir.join("kernel").join("drivers");
        fs::create_dir_all(&k).unwrap();
        fs::write(k.join("igb.ko"), b"\0depends=dca,i2c-algo-bit\0").unwrap();
        fs::write(k.join("dca.ko"), b"\0depends=\0").unwrap();
        fs::write(k.join("i2c-algo-bit.ko"), b"\0depends=dca\0").unwrap();
        let idx = module_index(&dir).unwrap();
        let order: Vec<String> = load_order(&idx, &["igb", "dca"])
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(order, ["dca", "i2c_algo_bit", "igb"]);
        assert!(load_order(&idx, &["e1000"]).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn ratios_are_per_rep_against_linux_off() {
        let run = |size, sent, usec| Sample {
            size,
            sent,
            received: sent,
            missed: 0,
            usec,
        };
        // linux-off: 100 k and 200 k pps in reps 1 and 2; strict: 50 k and 150 k.
        let off = LinuxMeasured {
            samples: vec![run(64, 1000, 10_000), run(64, 1000, 5_000)],
            ..LinuxMeasured::default()
        };
        let strict = LinuxMeasured {
            samples: vec![run(64, 1000, 20_000), run(64, 1500, 10_000)],
            ..LinuxMeasured::default()
        };
        let mut b = PeerBench::new(&["linux".into()], 0, &[64], 1000, 2);
        b.rows = vec![(MODES[1], strict.clone()), (MODES[0], off)];
        assert_eq!(b.ratio(&strict, 64), Some((0.625, 0.5, 0.75)));
        // Rep 1 of strict gave no result: rep 2 still pairs with rep 2 of linux-off.
        let mut gap = strict.clone();
        gap.samples[0].usec = 0;
        assert_eq!(b.ratio(&gap, 64), Some((0.75, 0.75, 0.75)));
        assert_eq!(
            b.series()[0],
            ("Linux strict".to_string(), vec![Some(0.625)])
        );
        let j = b.json();
        assert_eq!(j[0]["ratio_to_notrans"], 0.625, "{}", j[0]);
        assert_eq!(j[0]["ratio_min"], 0.5, "{}", j[0]);
        assert_eq!(j[0]["kernel_args"], "intel_iommu=on iommu.strict=1");
        assert_eq!(j[0]["system"], "linux");
    }

    #[test]
    fn script_runs_every_size_per_rep() {
        let s = script(&["e1000".into(), "pktgen".into()], &[64, 1500], 500, 3);
        assert!(s.contains("insmod /lib/modules/linuxpeer/e1000.ko"));
        assert!(s.find("e1000.ko").unwrap() < s.find("pktgen.ko").unwrap());
        assert_eq!(s.matches("\nrun 64 500\n").count(), 3);
        assert_eq!(s.matches("\nrun 1500 500\n").count(), 3);
        assert_eq!(select(&["linux".into()]).len(), 4);
        assert_eq!(select(&["linux-lazy".into()]), vec![MODES[2]]);
        assert!(select(&["notrans".into()]).is_empty());
    }
}
