//! The igb (82576) side of the demo, the guest tests and netbench: two QEMU `igb` NICs
//! on one hub, iommud on the emulated VT-d unit, `igbd loop --queues N` with one pinned
//! worker per queue pair and RSS spreading the flows over the RX queues.
//!
//! ```text
//! cargo xtask demo --nic igb [--queues N] [--strategy S] [--flush F] [--caching-mode]
//!                  [--no-translation] [--packets N] [--size BYTES]
//! ```
//! ends with `demo: nic=igb queues=2 strategy=… sent=N received=N corrupt=0 lost=0
//! pps=… faults=0 q0=… q1=…` (frames received per queue). `--packets` is the total,
//! split evenly over the queues.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::demo::{domain_sum, section, start_iommud, DemoOpts, STOP_IOMMUD};
use crate::fault::kv;
use crate::guest::{self, parse_hex, GuestOutput, GuestRun};
use crate::util::Result;

/// One igb run.
#[derive(Debug, Clone)]
pub struct IgbOpts {
    pub demo: DemoOpts,
    pub queues: u16,
}

impl IgbOpts {
    /// Frames per queue.
    pub fn per_queue(&self) -> u64 {
        (self.demo.packets / u64::from(self.queues.max(1))).max(1)
    }
    /// Frames over all queues.
    pub fn total(&self) -> u64 {
        self.per_queue() * u64::from(self.queues)
    }
}

/// The two igbs (see `guest::qemu::qemu_args`: the second sits in slot 3).
pub const TX: &str = "0000:00:01.0";
pub const RX: &str = "0000:00:03.0";

/// Shell lines listing the PCI functions (`PCI <bdf> <vendor> <device>`).
const LIST_PCI: &str = r#"for d in /sys/bus/pci/devices/*; do echo "PCI ${d##*/} $(cat $d/vendor) $(cat $d/device)"; done
"#;

/// The `igbd loop` command of a run (without the `--then`).
pub fn loop_cmd(o: &IgbOpts, extra: &str) -> String {
    format!(
        "igbd loop --tx {TX} --rx {RX} --mapper libdma --strategy {} --flush {} --queues {} --packets {} --size {}{extra}",
        o.demo.strategy,
        o.demo.flush,
        o.queues,
        o.per_queue(),
        o.demo.size
    )
}

/// The guest job of a demo run.
pub fn script(o: &IgbOpts) -> String {
    let mut s = start_iommud(if o.demo.no_translation {
        "--no-translation"
    } else {
        ""
    });
    s.push_str(LIST_PCI);
    s.push_str(&loop_cmd(
        o,
        " --then 'echo STATS-BEGIN; iommuctl cat /scheme/iommu/stats; echo STATS-END'",
    ));
    s.push_str("\nrc=$?\necho \"IGBD-EXIT $rc\"\n");
    s.push_str(STOP_IOMMUD);
    s.push_str("exit $rc\n");
    s
}

/// A guest with two igb NICs running `script`.
pub fn guest(name: &str, script: String, cm: bool, secs: u64) -> GuestRun {
    GuestRun::new(name, script)
        .package("iommud")
        .package("igbd")
        .nic_model("igb")
        .caching_mode(cm)
        .timeout(Duration::from_secs(secs))
        .echo(false)
}

/// `key=value` words of the first job line starting with `prefix`.
pub fn kv_line(out: &GuestOutput, prefix: &str) -> Option<BTreeMap<String, String>> {
    out.job_lines().find_map(|l| fields(l, prefix))
}

fn fields(l: &str, prefix: &str) -> Option<BTreeMap<String, String>> {
    let rest = l.trim().strip_prefix(prefix)?;
    Some(
        rest.split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

fn get(m: &BTreeMap<String, String>, k: &str) -> Option<u64> {
    m.get(k)?.parse().ok()
}

/// The outcome of an igb run.
#[derive(Debug, Clone)]
pub struct IgbResult {
    pub sent: u64,
    pub received: u64,
    pub corrupt: u64,
    pub lost: u64,
    pub misrouted: u64,
    pub pps: f64,
    pub faults: usize,
    /// Frames received per queue, in queue order.
    pub per_queue: Vec<u64>,
    /// CPU each queue's worker ran on.
    pub cpus: Vec<i64>,
    /// Per 1000 frames, both domains summed.
    pub round_trips_per_k: Option<f64>,
    pub invalidations_per_k: Option<f64>,
    /// Per 1000 frames of the measured loop (after ring set-up and settling), the busier
    /// of the two domains (each frame is mapped and unmapped once in the TX NIC's
    /// domain and once in the RX NIC's).
    pub round_trips_per_k_domain: Option<f64>,
    pub invalidations_per_k_domain: Option<f64>,
    /// Remaps libdma kept at their old IOVA, both domains, per frame sent (each frame
    /// has two chances: its TX buffer and its RX buffer).
    pub kept_per_frame: Option<f64>,
    pub out: GuestOutput,
}

/// Parses an igb run's output.
pub fn parse(out: GuestOutput, name: &str) -> Result<IgbResult> {
    let l = kv_line(&out, "loop:").ok_or_else(|| {
        format!(
            "{name}: no `loop:` line (exit {:?}); log {}",
            out.exit_marker,
            out.log_path.display()
        )
    })?;
    let num = |k: &str| get(&l, k).ok_or_else(|| format!("{name}: loop line has no {k}"));
    let queues: Vec<BTreeMap<String, String>> = out
        .job_lines()
        .filter_map(|l| fields(l, "queue:"))
        .collect();
    let sent = num("sent")?;
    let per_k = |k: &str| domain_sum(&out, k).map(|v| v as f64 * 1000.0 / sent.max(1) as f64);
    let per_k_dom = |k: &str| domain_max(&out, k).map(|v| v as f64 * 1000.0 / sent.max(1) as f64);
    Ok(IgbResult {
        sent,
        received: num("received")?,
        corrupt: num("corrupt")?,
        lost: num("lost")?,
        misrouted: num("misrouted")?,
        pps: l
            .get("pps")
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN),
        faults: crate::demo::fault_lines(&out).len(),
        per_queue: queues
            .iter()
            .map(|q| get(q, "received").unwrap_or(0))
            .collect(),
        cpus: queues
            .iter()
            .map(|q| q.get("cpu").and_then(|c| c.parse().ok()).unwrap_or(-1))
            .collect(),
        round_trips_per_k: per_k("ipc_round_trips"),
        invalidations_per_k: per_k("invalidations"),
        round_trips_per_k_domain: per_k_dom("ipc_round_trips"),
        invalidations_per_k_domain: per_k_dom("invalidations"),
        kept_per_frame: per_k("client_kept").map(|k| k / 1000.0),
        out,
    })
}

/// The largest growth of counter `key` over the domains during the measured loop
/// (`loopdomain <bdf> <key> <delta>`, printed by igbd: warm-up excluded).
pub fn domain_max(out: &GuestOutput, key: &str) -> Option<u64> {
    out.job_lines()
        .filter_map(|l| l.trim().strip_prefix("loopdomain "))
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let (_bdf, k, v) = (w.next()?, w.next()?, w.next()?);
            (k == key).then(|| v.parse().ok())?
        })
        .max()
}

/// Boots an igb demo and parses it.
pub fn run_igb(o: &IgbOpts, name: &str) -> Result<IgbResult> {
    let secs = 120 + o.total() / 50;
    let out = guest::run(&guest(name, script(o), o.demo.caching_mode, secs))?;
    parse(out, name)
}

/// The one summary line.
pub fn summary(o: &IgbOpts, r: &IgbResult) -> String {
    let q: Vec<String> = r
        .per_queue
        .iter()
        .enumerate()
        .map(|(i, n)| format!("q{i}={n}"))
        .collect();
    format!(
        "demo: nic=igb queues={} strategy={} sent={} received={} corrupt={} lost={} pps={:.1} faults={} {}",
        o.queues,
        if o.demo.no_translation { "noiommu" } else { &o.demo.strategy },
        r.sent,
        r.received,
        r.corrupt,
        r.lost,
        r.pps,
        r.faults,
        q.join(" ")
    )
}

fn ratio(v: Option<f64>) -> String {
    v.map_or("?".into(), |x| format!("{x:.2}"))
}

/// Checks: every frame intact on its queue, every queue carried its share, no fault,
/// and with magazine/percore (caching mode off) fewer than 2 blocking round trips and
/// 10 invalidations per 1000 frames in each NIC's domain.
pub fn check(o: &IgbOpts, r: &IgbResult) -> Vec<String> {
    let mut bad = Vec::new();
    if !r.out.success() {
        bad.push(format!("job failed: GUEST-EXIT {:?}", r.out.exit_marker));
    }
    if r.sent != o.total() || r.received != o.total() {
        bad.push(format!(
            "sent {} received {} of {}",
            r.sent,
            r.received,
            o.total()
        ));
    }
    if r.lost != 0 || r.corrupt != 0 || r.misrouted != 0 {
        bad.push(format!(
            "lost {} corrupt {} misrouted {}",
            r.lost, r.corrupt, r.misrouted
        ));
    }
    if r.per_queue.len() != usize::from(o.queues) || r.per_queue.iter().any(|&n| n != o.per_queue())
    {
        bad.push(format!(
            "per-queue received {:?}, want {} on each of {} queues",
            r.per_queue,
            o.per_queue(),
            o.queues
        ));
    }
    if r.faults != 0 {
        bad.push(format!("{} DMA fault(s) recorded", r.faults));
    }
    if o.demo.strategy == "magazine"
        && o.demo.flush == "percore"
        && !o.demo.no_translation
        && !o.demo.caching_mode
    {
        for (what, v, max) in [
            ("ipc_round_trips", r.round_trips_per_k_domain, 2.0),
            ("invalidations", r.invalidations_per_k_domain, 10.0),
        ] {
            match v {
                Some(x) if x < max => {}
                Some(x) => bad.push(format!(
                    "{what} per 1000 frames in a domain {x:.2} (want < {max})"
                )),
                None => bad.push(format!("no {what} in the domain stats")),
            }
        }
        // Every RX refill and nearly every TX buffer is the same buffer mapped again
        // (docs/ARCHITECTURE.md, "Kept remaps"): well over one kept remap per frame.
        match r.kept_per_frame {
            Some(k) if k >= 1.0 => {}
            k => bad.push(format!(
                "kept remaps per frame {k:?} (want >= 1: RX refills and TX buffers keep their IOVAs)"
            )),
        }
    }
    bad
}

/// `cargo xtask demo --nic igb`.
pub fn demo(o: &IgbOpts) -> Result<()> {
    let name = format!(
        "demo-igb-q{}-{}{}{}",
        o.queues,
        o.demo.strategy,
        if o.demo.caching_mode { "-cm" } else { "" },
        if o.demo.no_translation {
            "-notrans"
        } else {
            ""
        }
    );
    println!(
        "xtask demo: booting a guest (iommud on VT-d{}, igbd with libdma {} / {}, {} queue pairs), {} frames of {} B",
        if o.demo.caching_mode { ", caching mode" } else { "" },
        o.demo.strategy,
        o.demo.flush,
        o.queues,
        o.total(),
        o.demo.size
    );
    let r = run_igb(o, &name)?;
    for l in r.out.job_lines() {
        let t = l.trim();
        if ["PCI ", "igbd:", "settle:", "queue:", "stats ", "loop:"]
            .iter()
            .any(|p| t.starts_with(p))
        {
            println!("{t}");
        }
    }
    println!("$ iommuctl cat /scheme/iommu/stats");
    for l in section(&r.out, "STATS") {
        println!("{l}");
    }
    println!(
        "per 1000 frames: ipc_round_trips={} invalidations={} (both domains, whole run), {} and {} (busier domain, measured loop); worker CPUs {:?}",
        ratio(r.round_trips_per_k),
        ratio(r.invalidations_per_k),
        ratio(r.round_trips_per_k_domain),
        ratio(r.invalidations_per_k_domain),
        r.cpus
    );
    println!("log: {}", r.out.log_path.display());
    let bad = check(o, &r);
    println!("{}", summary(o, &r));
    if bad.is_empty() {
        Ok(())
    } else {
        Err(format!("demo failed: {}", bad.join("; ")))
    }
}

/// A guest test: igb with `queues` queue pairs, `strategy` / `flush`, caching mode `cm`.
pub fn test(strategy: &str, flush: &str, queues: u16, cm: bool, packets: u64) -> Result<()> {
    let o = IgbOpts {
        demo: DemoOpts {
            strategy: strategy.into(),
            flush: flush.into(),
            caching_mode: cm,
            packets,
            ..DemoOpts::default()
        },
        queues,
    };
    let name = format!(
        "test-igb-q{queues}-{strategy}-{flush}{}",
        if cm { "-cm" } else { "" }
    );
    let r = run_igb(&o, &name)?;
    println!("{}", summary(&o, &r));
    println!(
        "  per 1000 frames: ipc_round_trips={} invalidations={} (both domains, whole run), {} and {} (busier domain, measured loop); kept remaps per frame {}; CPUs {:?}; log {}",
        ratio(r.round_trips_per_k),
        ratio(r.invalidations_per_k),
        ratio(r.round_trips_per_k_domain),
        ratio(r.invalidations_per_k_domain),
        ratio(r.kept_per_frame),
        r.cpus,
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

/// The unmapped IOVA of the fault test's TX descriptor.
const BAD_IOVA: u64 = 0x90_0000;

/// `cargo xtask guest-igb-fault`: on igb with 2 queues, a TX descriptor at an unmapped
/// IOVA and an RX descriptor pointing at a canary page nobody mapped are blocked and
/// listed in iommud's faults, the canary is intact, and the traffic after it is intact;
/// the control boot without translation must find the canary overwritten.
pub fn fault() -> Result<()> {
    let o = IgbOpts {
        demo: DemoOpts {
            packets: 2000,
            ..DemoOpts::default()
        },
        queues: 2,
    };
    let mut s = start_iommud("");
    s.push_str(&loop_cmd(
        &o,
        &format!(" --bad-iova {BAD_IOVA:#x} --canary"),
    ));
    s.push_str(&format!(
        "\nrc=$?\necho \"IGBD-EXIT $rc\"\n{STOP_IOMMUD}exit $rc\n"
    ));
    let out = guest::run(&guest("test-igb-fault", s, false, 180))?;
    let mut bad = Vec::new();
    let mut expect = |ok: bool, what: String| {
        println!("  {} {what}", if ok { "ok  " } else { "FAIL" });
        if !ok {
            bad.push(what);
        }
    };
    expect(
        out.success(),
        format!("igbd exits 0: GUEST-EXIT {:?}", out.exit_marker),
    );
    let l = kv_line(&out, "loop:");
    let n = |k: &str| l.as_ref().and_then(|m| get(m, k));
    expect(
        n("received") == Some(o.total()) && n("lost") == Some(0) && n("corrupt") == Some(0),
        format!(
            "traffic after the faults intact: received={:?} lost={:?} corrupt={:?} of {}",
            n("received"),
            n("lost"),
            n("corrupt"),
            o.total()
        ),
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
        format!("canary unchanged (changed_bytes={changed:?})"),
    );
    crate::fault::expect_blocked_faults(&out, ("00:01.0", BAD_IOVA), "00:03.0", addr, &mut expect);
    // Control: without translation the NIC's write lands on the canary.
    let mut c = start_iommud("--no-translation");
    c.push_str(&format!(
        "igbd loop --tx {TX} --rx {RX} --mapper libdma --queues 2 --packets 100 --canary\necho \"IGBD-EXIT $?\"\n{STOP_IOMMUD}"
    ));
    let cout = guest::run(&guest("test-igb-fault-control", c, false, 120))?;
    let cchanged = cout
        .value("canary:")
        .and_then(|c| kv(c, "changed_bytes"))
        .and_then(|v| v.parse::<u64>().ok());
    expect(
        cchanged.is_some_and(|n| n > 0),
        format!(
            "control (--no-translation): the NIC overwrote the canary (changed_bytes={cchanged:?})"
        ),
    );
    if bad.is_empty() {
        println!("guest-igb-fault: PASS");
        Ok(())
    } else {
        println!(
            "guest-igb-fault: FAIL; logs {} {}",
            out.log_path.display(),
            cout.log_path.display()
        );
        Err(format!("guest-igb-fault: {}", bad.join("; ")))
    }
}

/// Takes `--nic e1000|igb` and `--queues N` out of the demo's arguments: `Some(queues)`
/// for igb (default 2 queue pairs), `None` for the default e1000 demo.
pub fn split_nic_args(args: &[String]) -> Result<(Vec<String>, Option<u16>)> {
    let (mut rest, mut nic, mut queues) = (Vec::new(), "e1000".to_string(), 2u16);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--nic" => {
                nic = it
                    .next()
                    .cloned()
                    .ok_or("--nic needs a value (e1000|igb)")?
            }
            "--queues" => {
                let v = it.next().ok_or("--queues needs a value")?;
                queues = v
                    .parse()
                    .ok()
                    .filter(|q| (1..=16).contains(q))
                    .ok_or(format!("bad --queues {v} (1..=16)"))?;
            }
            _ => rest.push(a.clone()),
        }
    }
    match nic.as_str() {
        "e1000" => Ok((rest, None)),
        "igb" => Ok((rest, Some(queues))),
        other => Err(format!("unknown --nic {other:?} (e1000|igb)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_queues_and_loop() {
        let out = GuestOutput::from_console(
            "GUEST-START\nqueue: q=0 cpu=0 sent=5 received=5 corrupt=0\nqueue: q=1 cpu=1 sent=5 received=5\n\
domain 00:01.0 ipc_round_trips 1\ndomain 00:03.0 ipc_round_trips 0\nloopdomain 00:01.0 ipc_round_trips 1\nloopdomain 00:03.0 ipc_round_trips 0\nloopdomain 00:03.0 invalidations 3\ndomain 00:01.0 invalidations 3\n\
loop: queues=2 sent=10 received=10 corrupt=0 lost=0 duplicate=0 misrouted=0 pps=99.5\nFAULTS-BEGIN\nFAULTS-END\nGUEST-EXIT 0\n",
        );
        let r = parse(out, "t").expect("parsed");
        assert_eq!(
            (r.sent, r.received, r.per_queue.clone(), r.cpus.clone()),
            (10, 10, vec![5, 5], vec![0, 1])
        );
        assert_eq!(r.round_trips_per_k, Some(100.0));
        assert_eq!(r.invalidations_per_k, Some(300.0));
        assert_eq!(r.round_trips_per_k_domain, Some(100.0));
        assert_eq!(r.invalidations_per_k_domain, Some(300.0));
        assert_eq!(r.kept_per_frame, None);
        let o = IgbOpts {
            demo: DemoOpts {
                packets: 10,
                ..DemoOpts::default()
            },
            queues: 2,
        };
        assert!(summary(&o, &r)
            .starts_with("demo: nic=igb queues=2 strategy=magazine sent=10 received=10"));
        let bad = check(&o, &r);
        // Round trips and invalidations too high, and no kept remaps.
        assert_eq!(bad.len(), 3, "{bad:?}");
        assert!(bad[2].starts_with("kept remaps per frame None"), "{bad:?}");
        let kept = GuestOutput::from_console(
            "GUEST-START\nqueue: q=0 cpu=0 sent=5 received=5\nqueue: q=1 cpu=1 sent=5 received=5\n\
domain 00:01.0 client_kept 12\ndomain 00:03.0 client_kept 10\n\
loop: queues=2 sent=10 received=10 corrupt=0 lost=0 misrouted=0 pps=99.5\nGUEST-EXIT 0\n",
        );
        let r = parse(kept, "t").expect("parsed");
        assert_eq!(r.kept_per_frame, Some(2.2));
        assert!(!check(&o, &r).iter().any(|b| b.contains("kept")));
        assert!(loop_cmd(&o, "").contains("--queues 2 --packets 5"));
        let a = |s: &str| s.split_whitespace().map(String::from).collect::<Vec<_>>();
        assert_eq!(
            split_nic_args(&a("--packets 9")).expect("e1000"),
            (a("--packets 9"), None)
        );
        assert_eq!(
            split_nic_args(&a("--nic igb --packets 9")).expect("igb").1,
            Some(2)
        );
        assert_eq!(
            split_nic_args(&a("--nic igb --queues 1")).expect("igb").1,
            Some(1)
        );
        assert!(split_nic_args(&a("--nic igb --queues 17")).is_err());
        assert!(split_nic_args(&a("--nic ixgbe")).is_err());
    }
}
