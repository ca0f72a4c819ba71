//! `cargo xtask demo`: the end-to-end run. Boots a guest whose job starts iommud on the
//! emulated VT-d unit, then e1000d with one libdma domain per NIC, streams sequence-
//! numbered, checksummed frames from NIC A (00:01.0) to NIC B (00:02.0), checks every
//! one, prints iommud's unit-wide stats (`iommuctl cat /scheme/iommu/stats`, taken while
//! both domains are attached) and ends with
//! `demo: strategy=magazine sent=N received=N corrupt=0 lost=0 pps=<float> faults=<n>`.
//!
//! ```text
//! cargo xtask demo [--strategy global|magazine] [--caching-mode] [--no-translation]
//!                  [--packets N] [--size BYTES]
//! ```
//! The guest tests `guest-demo-*` and `guest-fault` (see [`crate::tests`]) reuse this.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::guest::{self, GuestOutput, GuestRun};
use crate::util::{Flags, Result};

/// Options of one demo run.
#[derive(Debug, Clone)]
pub struct DemoOpts {
    pub strategy: String,
    pub flush: String,
    pub caching_mode: bool,
    pub no_translation: bool,
    pub packets: u64,
    pub size: u64,
    /// The NICs' trust in the guest policy: `delegated` or `validated`.
    pub trust: String,
    /// More iommud arguments (e.g. `--ring-spin-us 1000`).
    pub iommud_args: String,
}

impl Default for DemoOpts {
    fn default() -> Self {
        DemoOpts {
            strategy: "magazine".into(),
            flush: "percore".into(),
            caching_mode: false,
            no_translation: false,
            packets: 20_000,
            size: 1500,
            trust: "delegated".into(),
            iommud_args: String::new(),
        }
    }
}

/// Strategies iommud offers (libdma::proto::Strategy names, noiommu aside:
/// that is `--no-translation`).
pub const STRATEGIES: [&str; 4] = ["magazine", "global", "identity", "va"];
/// Trust modes the demo's policy can give the NICs.
pub const TRUSTS: [&str; 2] = ["delegated", "validated"];
/// Flush policies (libdma::proto::FlushPolicy names).
pub const FLUSHES: [&str; 3] = ["percore", "strict", "deferred"];

const USAGE: &str = "usage: cargo xtask demo [--strategy magazine|global|identity|va|static] \
[--flush percore|strict|deferred] [--trust delegated|validated] [--caching-mode] [--no-translation] \
[--packets N] [--size BYTES] [--iommud-args ARGS] [--duration D [--report-every D]]";

/// Parses the demo's command line.
pub fn parse(args: &[String]) -> Result<DemoOpts> {
    let mut o = DemoOpts::default();
    let mut f = Flags::new(args, USAGE);
    while let Some(a) = f.next_flag() {
        match a {
            "--strategy" => {
                o.strategy = f.value(a)?;
                // `static` (pools mapped once) too: with `--trust validated`.
                if !STRATEGIES.contains(&o.strategy.as_str()) && o.strategy != "static" {
                    return Err(format!("unknown strategy {:?}\n{USAGE}", o.strategy));
                }
            }
            "--flush" => {
                o.flush = f.value(a)?;
                if !FLUSHES.contains(&o.flush.as_str()) {
                    return Err(format!("unknown flush policy {:?}\n{USAGE}", o.flush));
                }
            }
            "--trust" => {
                o.trust = f.value(a)?;
                if !TRUSTS.contains(&o.trust.as_str()) {
                    return Err(format!("unknown trust {:?}\n{USAGE}", o.trust));
                }
            }
            "--iommud-args" => o.iommud_args = f.value(a)?,
            "--caching-mode" => o.caching_mode = true,
            "--no-translation" => o.no_translation = true,
            "--packets" => o.packets = f.number(a, 1)?,
            "--size" => o.size = f.number(a, 0)?,
            _ => return Err(f.unknown(a)),
        }
    }
    Ok(o)
}

/// The guest administrator's policy (`iommud --config`): the emulated NICs
/// and disk get delegated trust, so the magazine strategy may run on them;
/// every other device keeps the default, validated trust. A device faulting more
/// than 50 times in a second is blocked: iommud reads the emulated unit's single fault
/// record once per tick, so it sees at most a few hundred faults a second and the
/// default rate (10 000) would never block a storming device here (`guest-storm`).
pub const GUEST_POLICY: &str = r#"# written by cargo xtask: the guest's administrator
fault_block_per_second = 50
[[device]]
match = "8086:100e"   # e1000
trust = "delegated"
[[device]]
match = "8086:10c9"   # igb (82576)
trust = "delegated"
[[device]]
match = "1b36:0010"   # QEMU NVMe
trust = "delegated"
"#;

/// [`GUEST_POLICY`] with the e1000 NICs given `trust` instead (and every
/// strategy, `static` included, allowed for them).
pub fn guest_policy(trust: &str) -> String {
    if trust == "delegated" {
        return GUEST_POLICY.to_string();
    }
    GUEST_POLICY.replacen(
        "match = \"8086:100e\"   # e1000\ntrust = \"delegated\"",
        &format!(
            "match = \"8086:100e\"   # e1000\ntrust = \"{trust}\"\n\
             strategies = [\"magazine\", \"global\", \"identity\", \"va\", \"static\"]"
        ),
        1,
    )
}

/// Shell lines that start iommud (extra arguments `args`) with
/// [`GUEST_POLICY`] and wait for its socket; iommud's threads run where the
/// guest's scheduler puts them (the functional guest tests).
pub fn start_iommud(args: &str) -> String {
    iommud_lines(args, "delegated", "")
}

/// [`start_iommud`] with the e1000 NICs in `trust` (see [`guest_policy`]), for the
/// jobs that measure: iommud runs on CPU 1 (`taskset -c 1`: its ring service thread,
/// and the threads that answer requests and flush, which otherwise wake up on
/// whichever CPU and preempt the driver there) and the demo's and netbench's
/// drivers run on CPU 0 (`taskset -c 0`), as a deployment would give iommud a core
/// of its own (docs/PERFORMANCE.md).
pub fn start_iommud_trust(args: &str, trust: &str) -> String {
    iommud_lines(args, trust, "taskset -c 1 ")
}

fn iommud_lines(args: &str, trust: &str, prefix: &str) -> String {
    let policy = guest_policy(trust);
    format!(
        r#"cat > /run/iommud.toml <<'POLICY-EOF'
{policy}POLICY-EOF
{prefix}iommud --platform linux --socket /run/iommud.sock --config /run/iommud.toml --service-cpus 1 {args} > /tmp/iommud.log 2>&1 &
i=0; while [ ! -S /run/iommud.sock ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
if [ ! -S /run/iommud.sock ]; then echo "iommud did not start"; cat /tmp/iommud.log; exit 3; fi
"#
    )
}

/// The recorded faults in iommud's `faults` output (one `fault ...` line
/// each; the `device ...` lines are per-device summaries).
pub fn fault_lines(out: &GuestOutput) -> Vec<&str> {
    section(out, "FAULTS")
        .into_iter()
        .filter(|l| l.starts_with("fault "))
        .collect()
}

/// Shell lines that print the faults, stop iommud and show its log (prefixed).
pub const STOP_IOMMUD: &str = r#"echo FAULTS-BEGIN
iommuctl cat /scheme/iommu/faults
echo FAULTS-END
iommuctl stop; sleep 0.3
sed 's/^/iommud-log: /' /tmp/iommud.log
"#;

/// The guest job of a demo run.
pub fn script(o: &DemoOpts) -> String {
    let args = format!(
        "{}{}",
        if o.no_translation {
            "--no-translation "
        } else {
            ""
        },
        o.iommud_args
    );
    let mut s = start_iommud_trust(args.trim(), &o.trust);
    s.push_str(&format!(
        "taskset -c 0 e1000d loop --mapper libdma --strategy {} --flush {} --packets {} --size {} \
--then 'echo STATS-BEGIN; iommuctl cat /scheme/iommu/stats; echo STATS-END'\nrc=$?\necho \"E1000D-EXIT $rc\"\n",
        o.strategy, o.flush, o.packets, o.size
    ));
    s.push_str(STOP_IOMMUD);
    s.push_str("exit $rc\n");
    s
}

/// The guest boot of a demo run.
pub fn guest_run(o: &DemoOpts, name: &str) -> GuestRun {
    // ~2 s of boot and settling plus the stream; `global` is the slow one (a cross-CPU
    // round trip per map and per unmap).
    let secs = 90 + o.packets / 100;
    GuestRun::new(name, script(o))
        .package("iommud")
        .package("e1000d")
        .caching_mode(o.caching_mode)
        .timeout(Duration::from_secs(secs))
}

/// What a loop reported: `loop: key=value ...`.
pub fn loop_line(out: &GuestOutput) -> Option<BTreeMap<String, String>> {
    let rest = out.value("loop:")?;
    Some(
        rest.split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

/// Lines between `<tag>-BEGIN` and `<tag>-END` in the job's output.
pub fn section<'a>(out: &'a GuestOutput, tag: &str) -> Vec<&'a str> {
    let (b, e) = (format!("{tag}-BEGIN"), format!("{tag}-END"));
    let mut inside = false;
    let mut v = Vec::new();
    for l in out.job_lines() {
        let t = l.trim();
        if t == b {
            inside = true;
        } else if t == e {
            inside = false;
        } else if inside {
            v.push(t);
        }
    }
    v
}

/// Sum over both NICs' domains of the counter `key` (`domain <bdf> <key> <value>` lines).
pub fn domain_sum(out: &GuestOutput, key: &str) -> Option<u64> {
    let vals: Vec<u64> = out
        .job_lines()
        .filter_map(|l| l.trim().strip_prefix("domain "))
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let (_bdf, k, v) = (w.next()?, w.next()?, w.next()?);
            (k == key).then(|| v.parse().ok())?
        })
        .collect();
    (!vals.is_empty()).then(|| vals.iter().sum())
}

/// The outcome of a demo run, parsed from the guest's output.
#[derive(Debug, Clone)]
pub struct DemoResult {
    pub sent: u64,
    pub received: u64,
    pub corrupt: u64,
    pub lost: u64,
    pub pps: f64,
    pub faults: usize,
    /// Per packet, summed over both domains (None when the domains printed nothing).
    pub ipc_per_packet: Option<f64>,
    pub invalidations_per_packet: Option<f64>,
    pub out: GuestOutput,
}

/// Boots the demo and parses its output; fails if the job did not produce a loop line.
pub fn run_demo(o: &DemoOpts, name: &str) -> Result<DemoResult> {
    let out = guest::run(&guest_run(o, name).echo(false))?;
    let l = loop_line(&out).ok_or_else(|| {
        format!(
            "{name}: no `loop:` line (exit {:?}); log {}",
            out.exit_marker,
            out.log_path.display()
        )
    })?;
    let num = |k: &str| -> Result<u64> {
        l.get(k)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("{name}: loop line has no {k}"))
    };
    let per = |k: &str| domain_sum(&out, k).map(|v| v as f64 / o.packets as f64);
    Ok(DemoResult {
        sent: num("sent")?,
        received: num("received")?,
        corrupt: num("corrupt")?,
        lost: num("lost")?,
        pps: l
            .get("pps")
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN),
        faults: fault_lines(&out).len(),
        ipc_per_packet: per("ipc_round_trips"),
        invalidations_per_packet: per("invalidations"),
        out,
    })
}

/// The one summary line.
pub fn summary(o: &DemoOpts, r: &DemoResult) -> String {
    format!(
        "demo: strategy={} sent={} received={} corrupt={} lost={} pps={:.1} faults={}",
        if o.no_translation {
            "noiommu"
        } else {
            &o.strategy
        },
        r.sent,
        r.received,
        r.corrupt,
        r.lost,
        r.pps,
        r.faults
    )
}

/// Checks a demo result: every frame delivered intact, no fault, the job succeeded, and
/// (magazine, caching mode off) IPC round trips and invalidations far below one per packet.
pub fn check(o: &DemoOpts, r: &DemoResult) -> Vec<String> {
    let mut bad = Vec::new();
    if !r.out.success() {
        bad.push(format!("job failed: GUEST-EXIT {:?}", r.out.exit_marker));
    }
    if r.sent != o.packets || r.received != o.packets {
        bad.push(format!(
            "sent {} received {} of {}",
            r.sent, r.received, o.packets
        ));
    }
    if r.lost != 0 || r.corrupt != 0 {
        bad.push(format!("lost {} corrupt {}", r.lost, r.corrupt));
    }
    if r.faults != 0 {
        bad.push(format!("{} DMA fault(s) recorded", r.faults));
    }
    if o.strategy == "magazine" && !o.no_translation && !o.caching_mode {
        for (what, v) in [
            ("ipc_round_trips", r.ipc_per_packet),
            ("invalidations", r.invalidations_per_packet),
        ] {
            match v {
                Some(x) if x < 0.1 => {}
                Some(x) => bad.push(format!("{what} per packet {x:.3} (want < 0.1)")),
                None => bad.push(format!("no {what} in the domain stats")),
            }
        }
    }
    bad
}

fn ratio(v: Option<f64>) -> String {
    v.map_or("?".into(), |x| format!("{x:.4}"))
}

/// `cargo xtask demo`.
pub fn run(args: &[String]) -> Result<()> {
    // `--nic igb [--queues N]`: the multi-queue igb demo (see crate::igb).
    let (args, nic) = crate::igb::split_nic_args(args)?;
    // `--duration D [--report-every D]`: the soak (see crate::soak).
    let (args, soak) = crate::soak::split_args(&args)?;
    let o = parse(&args)?;
    if let Some(s) = soak {
        return crate::soak::run(&o, &s);
    }
    if let Some(queues) = nic {
        return crate::igb::demo(&crate::igb::IgbOpts { demo: o, queues });
    }
    let name = format!(
        "demo-{}{}{}",
        o.strategy,
        if o.caching_mode { "-cm" } else { "" },
        if o.no_translation { "-notrans" } else { "" }
    );
    println!(
        "xtask demo: booting a guest (iommud on VT-d{}, e1000d with libdma {}), {} frames of {} B",
        if o.caching_mode { ", caching mode" } else { "" },
        o.strategy,
        o.packets,
        o.size
    );
    let r = run_demo(&o, &name)?;
    for l in r.out.job_lines() {
        let t = l.trim();
        if t.starts_with("e1000d:") || t.starts_with("settle:") || t.starts_with("loop:") {
            println!("{t}");
        }
    }
    println!("$ iommuctl cat /scheme/iommu/stats");
    for l in section(&r.out, "STATS") {
        println!("{l}");
    }
    println!(
        "per packet (both domains): ipc_round_trips={} invalidations={}",
        ratio(r.ipc_per_packet),
        ratio(r.invalidations_per_packet)
    );
    println!("log: {}", r.out.log_path.display());
    let bad = check(&o, &r);
    println!("{}", summary(&o, &r));
    if bad.is_empty() {
        Ok(())
    } else {
        Err(format!("demo failed: {}", bad.join("; ")))
    }
}

/// A guest test: the demo with `strategy`, caching mode `cm`, `packets` frames.
pub fn test(strategy: &str, flush: &str, cm: bool, packets: u64) -> Result<()> {
    test_trust(strategy, flush, cm, packets, "delegated")
}

/// [`test`] with the NICs in `trust` (validated: the ring path).
pub fn test_trust(strategy: &str, flush: &str, cm: bool, packets: u64, trust: &str) -> Result<()> {
    let o = DemoOpts {
        strategy: strategy.into(),
        flush: flush.into(),
        caching_mode: cm,
        packets,
        trust: trust.into(),
        ..DemoOpts::default()
    };
    let name = format!(
        "test-demo-{strategy}{}{}{}",
        if trust == "validated" { "-val" } else { "" },
        if flush == "percore" {
            String::new()
        } else {
            format!("-{flush}")
        },
        if cm { "-cm" } else { "" }
    );
    let r = run_demo(&o, &name)?;
    println!("{}", summary(&o, &r));
    println!(
        "  per packet: ipc_round_trips={} invalidations={}; log {}",
        ratio(r.ipc_per_packet),
        ratio(r.invalidations_per_packet),
        r.out.log_path.display()
    );
    let bad = check(&o, &r);
    for b in &bad {
        println!("  FAIL {b}");
    }
    if bad.is_empty() {
        println!("{name}: PASS");
        Ok(())
    } else {
        Err(format!("{name}: {}", bad.join("; ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output(console: &str) -> GuestOutput {
        GuestOutput::from_console(console)
    }

    #[test]
    fn parses_loop_stats_and_domains() {
        let o = output(
            "GUEST-START\ndomain 0000:00:01.0 ipc_round_trips 7\ndomain 0000:00:02.0 ipc_round_trips 5\n\
STATS-BEGIN\nmaps 10\nSTATS-END\n\
loop: sent=100 received=100 corrupt=0 lost=0 pps=123.5\nFAULTS-BEGIN\nFAULTS-END\nGUEST-EXIT 0\n",
        );
        let l = loop_line(&o).expect("loop line");
        assert_eq!(l.get("pps").map(String::as_str), Some("123.5"));
        assert_eq!(domain_sum(&o, "ipc_round_trips"), Some(12));
        assert_eq!(domain_sum(&o, "invalidations"), None);
        assert_eq!(section(&o, "STATS"), ["maps 10"]);
        assert!(section(&o, "FAULTS").is_empty());
    }

    #[test]
    fn options() {
        let a = |s: &str| s.split_whitespace().map(String::from).collect::<Vec<_>>();
        let o = parse(&a("--strategy global --caching-mode --packets 5")).expect("valid");
        assert_eq!(
            (o.strategy.as_str(), o.caching_mode, o.packets),
            ("global", true, 5)
        );
        let o = parse(&a("--strategy va --flush deferred")).expect("valid");
        assert_eq!((o.strategy.as_str(), o.flush.as_str()), ("va", "deferred"));
        assert_eq!(parse(&a("")).expect("defaults").flush, "percore");
        assert!(parse(&a("--strategy kmalloc")).is_err());
        assert!(parse(&a("--flush lazy")).is_err());
        assert!(parse(&a("--packets")).is_err());
    }
}
