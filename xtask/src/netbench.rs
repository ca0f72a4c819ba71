//! `cargo xtask netbench`: packets/s and ping-pong latency of the e1000 loop in the QEMU
//! guest, per IOVA strategy and flush policy and with translation off.
//!
//! ```text
//! cargo xtask netbench [--packets N] [--rounds N] [--reps N] [--linux-packets N]
//!                      [--only NAME[,NAME...]]
//! ```
//! One guest boot per configuration (`notrans`, then `<strategy>-<flush>` for every
//! strategy and flush policy): iommud on the emulated VT-d unit (`--no-translation` for
//! `notrans`), then `e1000d loop --mapper libdma` `--reps` times with 64-byte and with
//! 1500-byte frames (N each; every payload is checked by e1000d), then one ping-pong of
//! `--rounds` 64-byte frames A→B→A. Per configuration and frame size the median packets/s
//! over the reps is kept, with min and max. Writes `target/netbench/results.json` and
//! `target/netbench/throughput-ratio.svg` (packets/s as a ratio to `notrans`). Fails if
//! any frame was lost or corrupt. Defaults: 4000 frames, 3 reps, 1000 rounds: about
//! 6 minutes on 2 vCPUs under TCG, most of it in the strict rows (a blocking round trip
//! to iommud per map and unmap, 0.25-1.5 ms each in the guest).
//!
//! Linux peer rows (`crate::linuxpeer`): four more boots, of a stock Debian kernel whose own
//! intel-iommu driver runs `off`, `strict`, `lazy` or `passthrough`, spread between the
//! iommud boots; each sends `--linux-packets` (default 50 000) pktgen frames per size and
//! rep. `--only linux` runs just those four, `--only linux-strict` one of them. Every
//! ratio is per rep, against the same system's translation-off boot's same rep (iommud:
//! `notrans`; Linux: `linux-off`), then median, min and max over the reps.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use crate::demo::{start_iommud, STOP_IOMMUD};
use crate::guest::{self, GuestOutput, GuestRun};
use crate::util::{json_num, workspace_root, write_json, Flags, Result};

#[allow(dead_code)]
pub(crate) use benchplot as plot;

const USAGE: &str = "usage: cargo xtask netbench [--packets N] [--rounds N] [--reps N] \
[--linux-packets N] [--only NAME[,NAME...]] [--nic e1000|igb|all]  (NAME: a configuration, `linux` or linux-MODE)";

/// Frame sizes measured (bytes, including the Ethernet header).
pub const SIZES: [u64; 2] = [64, 1500];

/// One guest configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Name in the results and on the command line.
    pub name: String,
    /// `e1000d --strategy` (iommud forces no translation for `notrans`).
    pub strategy: &'static str,
    /// `e1000d --flush`.
    pub flush: &'static str,
    /// Translation on.
    pub translate: bool,
}

/// Every configuration, the translation-off baseline first.
pub fn configs() -> Vec<Config> {
    let c = |name, strategy, flush, translate| Config {
        name,
        strategy,
        flush,
        translate,
    };
    let mut v = vec![c("notrans".into(), "magazine", "percore", false)];
    for strategy in crate::demo::STRATEGIES {
        for flush in crate::demo::FLUSHES {
            v.push(c(format!("{strategy}-{flush}"), strategy, flush, true));
        }
    }
    v
}

#[derive(Clone, Debug)]
struct Opts {
    packets: u64,
    rounds: u64,
    reps: u64,
    only: Vec<String>,
    /// `e1000`, `igb` (the igb rows: 1 and 2 queue pairs) or `all`.
    nic: String,
    /// pktgen frames per size and rep in the Linux peer's boots.
    linux_packets: u64,
}

fn parse(args: &[String]) -> Result<Opts> {
    let mut o = Opts {
        packets: 4_000,
        rounds: 1_000,
        reps: 3,
        only: Vec::new(),
        nic: "all".into(),
        linux_packets: 50_000,
    };
    let mut f = Flags::new(args, USAGE);
    while let Some(a) = f.next_flag() {
        match a {
            "--packets" => o.packets = f.number(a, 1)?,
            "--rounds" => o.rounds = f.number(a, 1)?,
            "--reps" => o.reps = f.number(a, 1)?,
            "--linux-packets" => o.linux_packets = f.number(a, 1)?,
            "--only" => o.only = f.value(a)?.split(',').map(str::to_string).collect(),
            "--nic" => {
                o.nic = f.value(a)?;
                if !["e1000", "igb", "all"].contains(&o.nic.as_str()) {
                    return Err(format!("unknown --nic {:?}\n{USAGE}", o.nic));
                }
            }
            _ => return Err(f.unknown(a)),
        }
    }
    Ok(o)
}

/// The guest job of one configuration.
fn script(c: &Config, o: &Opts) -> String {
    let mut s = start_iommud(if c.translate { "" } else { "--no-translation" });
    let base = format!(
        "e1000d loop --mapper libdma --strategy {} --flush {}",
        c.strategy, c.flush
    );
    for _ in 0..o.reps {
        for size in SIZES {
            let _ = writeln!(
                s,
                "{base} --packets {} --size {size} || echo \"netbench: loop failed size={size}\"",
                o.packets
            );
        }
    }
    let _ = writeln!(
        s,
        "{base} --ping-pong --packets {} --size 64 || echo \"netbench: ping-pong failed\"",
        o.rounds
    );
    s.push_str(STOP_IOMMUD);
    s.push_str("exit 0\n");
    s
}

/// `key=value` words after `prefix` on a line.
fn fields(line: &str, prefix: &str) -> Option<BTreeMap<String, String>> {
    let rest = line.trim().strip_prefix(prefix)?;
    Some(
        rest.split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

fn num(m: &BTreeMap<String, String>, k: &str) -> Option<f64> {
    m.get(k)?.parse().ok()
}

/// Per-rep ratios `x[i] / base[i]` (a configuration against its system's translation-off
/// run of the same rep).
pub fn rep_ratios(x: &[f64], base: &[f64]) -> Vec<f64> {
    x.iter()
        .zip(base)
        .filter(|(_, b)| **b > 0.0)
        .map(|(a, b)| a / b)
        .collect()
}

/// Median, min, max.
pub fn spread(v: &[f64]) -> Option<(f64, f64, f64)> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    let med = if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    };
    Some((med, s[0], s[n - 1]))
}

/// What one configuration measured.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Measured {
    /// Per frame size: packets/s of each rep.
    pub pps: BTreeMap<u64, Vec<f64>>,
    /// Ping-pong round trip p50 and p99 (µs).
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    /// Frames sent, received, lost and corrupt over all loops and the ping-pong.
    pub sent: u64,
    pub received: u64,
    pub lost: u64,
    pub corrupt: u64,
    /// `netbench: ... failed` lines.
    pub failures: Vec<String>,
}

/// Parses a configuration's job output.
pub fn measure<'a>(lines: impl Iterator<Item = &'a str>) -> Measured {
    let mut m = Measured::default();
    for l in lines {
        let t = l.trim();
        if let Some(f) = fields(t, "loop:") {
            let size = num(&f, "size").unwrap_or(0.0) as u64;
            if let Some(p) = num(&f, "pps") {
                m.pps.entry(size).or_default().push(p);
            }
            m.sent += num(&f, "sent").unwrap_or(0.0) as u64;
            m.received += num(&f, "received").unwrap_or(0.0) as u64;
            m.lost += num(&f, "lost").unwrap_or(0.0) as u64;
            m.corrupt += num(&f, "corrupt").unwrap_or(0.0) as u64;
        } else if let Some(f) = fields(t, "pingpong:") {
            m.p50_us = num(&f, "p50_us");
            m.p99_us = num(&f, "p99_us");
            m.sent += num(&f, "rounds").unwrap_or(0.0) as u64;
            m.received += num(&f, "replies").unwrap_or(0.0) as u64;
            m.lost += num(&f, "lost").unwrap_or(0.0) as u64;
            m.corrupt += num(&f, "corrupt").unwrap_or(0.0) as u64;
        } else if t.starts_with("netbench:") {
            m.failures.push(t.to_string());
        }
    }
    m
}

/// `results.json`: one object per configuration and frame size, then `extra` (the
/// Linux peer's rows).
fn to_json(
    rows: &[(Config, Measured)],
    o: &Opts,
    extra: Vec<serde_json::Value>,
) -> Vec<serde_json::Value> {
    let base = rows.iter().find(|(c, _)| !c.translate).map(|(_, m)| m);
    let mut out = Vec::new();
    for (c, m) in rows {
        for size in SIZES {
            let s = m.pps.get(&size).and_then(|v| spread(v));
            let ratio = base.and_then(|b| rep_ratio(m, b, size));
            out.push(serde_json::json!({
                "system": "iommud",
                "config": c.name,
                "strategy": if c.translate { c.strategy } else { "noiommu" },
                "flush": if c.translate { c.flush } else { "none" },
                "translation": c.translate,
                "frame_bytes": size,
                "packets_per_rep": o.packets,
                "reps": m.pps.get(&size).map_or(0, Vec::len),
                "pps": json_num(s.map(|s| s.0)),
                "pps_min": json_num(s.map(|s| s.1)),
                "pps_max": json_num(s.map(|s| s.2)),
                "ratio_to_notrans": json_num(ratio.map(|r| r.0)),
                "ratio_min": json_num(ratio.map(|r| r.1)),
                "ratio_max": json_num(ratio.map(|r| r.2)),
                "pingpong_rounds": o.rounds,
                "rtt_p50_us": json_num(m.p50_us),
                "rtt_p99_us": json_num(m.p99_us),
                "sent": m.sent,
                "received": m.received,
                "lost": m.lost,
                "corrupt": m.corrupt,
            }));
        }
    }
    out.extend(extra);
    out
}

/// A figure for the console: 3 decimals, `-` when missing.
fn shown(v: Option<f64>) -> String {
    v.filter(|x| x.is_finite())
        .map_or("-".into(), |x| format!("{x:.3}"))
}

/// Median, min and max over reps of `m`'s packets/s over `base`'s in the same rep.
fn rep_ratio(m: &Measured, base: &Measured, size: u64) -> Option<(f64, f64, f64)> {
    let x = m.pps.get(&size)?;
    spread(&rep_ratios(x, base.pps.get(&size)?))
}

fn ratio_chart(rows: &[(Config, Measured)], peer: &[(String, Vec<Option<f64>>)]) -> plot::Chart {
    let base = rows.iter().find(|(c, _)| !c.translate).map(|(_, m)| m);
    let mut chart = plot::Chart {
        title: "e1000 in the QEMU guest (TCG): packets/s relative to each system's translation off"
            .into(),
        x_label: "frame size (bytes)".into(),
        y_label: "throughput / throughput with translation off (ratio)".into(),
        groups: SIZES.iter().map(|s| s.to_string()).collect(),
        series: rows
            .iter()
            .map(|(c, m)| plot::Series {
                name: if c.translate {
                    format!("{} / {}", c.strategy, c.flush)
                } else {
                    "translation off".into()
                },
                values: SIZES
                    .iter()
                    .map(|&size| base.and_then(|b| rep_ratio(m, b, size)).map(|r| r.0))
                    .collect(),
            })
            .collect(),
        scale: plot::Scale::Linear,
    };
    chart
        .series
        .extend(peer.iter().map(|(name, values)| plot::Series {
            name: name.clone(),
            values: values.clone(),
        }));
    chart
}

/// `cargo xtask netbench`.
pub fn run(args: &[String]) -> Result<()> {
    let o = parse(args)?;
    let chosen: Vec<Config> = configs()
        .into_iter()
        .filter(|c| o.only.is_empty() || o.only.contains(&c.name))
        .collect();
    let mut peer =
        crate::linuxpeer::PeerBench::new(&o.only, chosen.len(), &SIZES, o.linux_packets, o.reps);
    if chosen.is_empty() && peer.is_empty() {
        return Err(format!("--only matches no configuration\n{USAGE}"));
    }
    if o.nic == "igb" {
        return igb_rows(&chosen, &o);
    }
    println!(
        "xtask netbench: {} boots; per boot {} x {} frames of {:?} B, then {} ping-pong rounds",
        chosen.len(),
        o.reps,
        o.packets,
        SIZES,
        o.rounds
    );
    println!(
        "xtask netbench: {} Linux peer boots; per boot {} x {} pktgen frames of {:?} B",
        peer.boots(),
        o.reps,
        o.linux_packets,
        SIZES
    );
    let mut rows: Vec<(Config, Measured)> = Vec::new();
    let mut bad = Vec::new();
    for (i, c) in chosen.iter().cloned().enumerate() {
        peer.run_due(i, &mut bad)?;
        // Boot and settling (~15 s), plus the loops at a pessimistic 200 frames/s (the
        // validated rows ran at 250-400 frames/s with other guests on the same 2 cores).
        let secs = 120 + (o.reps * o.packets * 2 + o.rounds) / 200;
        let run = GuestRun::new(format!("netbench-{}", c.name), script(&c, &o))
            .package("iommud")
            .package("e1000d")
            .timeout(Duration::from_secs(secs))
            .echo(false);
        let out: GuestOutput = guest::run(&run)?;
        let m = measure(out.job_lines());
        let med = |size: u64| {
            m.pps
                .get(&size)
                .and_then(|v| spread(v))
                .map_or("-".into(), |s| {
                    format!("{:.0} ({:.0}-{:.0})", s.0, s.1, s.2)
                })
        };
        println!(
            "{:<17} 64 B: {:>22} pps  1500 B: {:>22} pps  rtt p50 {} µs p99 {} µs  lost {} corrupt {}  ({:.0} s, log {})",
            c.name,
            med(64),
            med(1500),
            shown(m.p50_us),
            shown(m.p99_us),
            m.lost,
            m.corrupt,
            out.duration.as_secs_f64(),
            out.log_path.display()
        );
        if !out.success() || m.lost != 0 || m.corrupt != 0 || !m.failures.is_empty() {
            bad.push(format!(
                "{}: exit {:?}, lost {}, corrupt {}, {:?} (log {})",
                c.name,
                out.exit_marker,
                m.lost,
                m.corrupt,
                m.failures,
                out.log_path.display()
            ));
        }
        for size in SIZES {
            if m.pps.get(&size).is_none_or(|v| v.len() as u64 != o.reps) {
                bad.push(format!("{}: missing loop results for {size} B", c.name));
            }
        }
        rows.push((c, m));
    }
    peer.run_due(usize::MAX, &mut bad)?;
    let dir = workspace_root().join("target").join("netbench");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let write = |name: &str, text: String| {
        let p = dir.join(name);
        std::fs::write(&p, text).map_err(|e| format!("{}: {e}", p.display()))
    };
    write_json(&dir.join("results.json"), to_json(&rows, &o, peer.json()))?;
    write(
        "throughput-ratio.svg",
        plot::svg(&ratio_chart(&rows, &peer.series())),
    )?;
    println!(
        "wrote {0}/results.json, {0}/throughput-ratio.svg",
        dir.display()
    );
    let igb = if o.nic == "all" {
        igb_rows(&chosen, &o)
    } else {
        Ok(())
    };
    if bad.is_empty() {
        igb
    } else {
        Err(format!("netbench: {}", bad.join("; ")))
    }
}

// ---- igb rows: 1 and 2 queue pairs, translation off as its own boot first ----

/// Queue pairs measured on igb.
pub const IGB_QUEUES: [u16; 2] = [1, 2];
/// igb loops move this many times `--packets` frames: a 4000-frame igb loop lasts
/// only tens of milliseconds here, too short to time.
pub const IGB_PACKET_FACTOR: u64 = 5;

/// The guest job of one configuration's igb rows: iommud (translation off for
/// `notrans`), then per repetition `igbd loop` for every queue count and frame size
/// (`--packets` x [`IGB_PACKET_FACTOR`] frames per loop, split over the queues).
/// iommud is started once per boot: restarting it on a unit it left enabled fails
/// (GSTS.QIES does not clear), so translation off is a boot of its own, run first.
fn igb_script(c: &Config, o: &Opts) -> String {
    use crate::igb::{RX, TX};
    let mut s = start_iommud(if c.translate { "" } else { "--no-translation" });
    for rep in 0..o.reps {
        let _ = writeln!(s, "echo \"igbbench-phase {} rep={rep}\"", c.name);
        for q in IGB_QUEUES {
            for size in SIZES {
                let _ = writeln!(
                    s,
                    "igbd loop --tx {TX} --rx {RX} --mapper libdma --strategy {} --flush {} --queues {q} \
--packets {} --size {size} || echo \"netbench: igb loop failed q={q} size={size}\"",
                    c.strategy,
                    c.flush,
                    (o.packets * IGB_PACKET_FACTOR / u64::from(q)).max(1)
                );
            }
        }
    }
    s.push_str(STOP_IOMMUD);
    s.push_str("exit 0\n");
    s
}

/// packets/s per (phase, queues, frame size), and frames lost or corrupt.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct IgbMeasured {
    pub pps: BTreeMap<(String, u64, u64), Vec<f64>>,
    pub lost: u64,
    pub corrupt: u64,
    pub failures: Vec<String>,
}

/// Parses an igb job: `igbbench-phase <name>` lines, then `loop:` lines.
pub fn igb_measure<'a>(lines: impl Iterator<Item = &'a str>) -> IgbMeasured {
    let mut m = IgbMeasured::default();
    let mut phase = String::new();
    for l in lines {
        let t = l.trim();
        if let Some(p) = t.strip_prefix("igbbench-phase ") {
            phase = p.split_whitespace().next().unwrap_or("").to_string();
        } else if let Some(f) = fields(t, "loop:") {
            let q = num(&f, "queues").unwrap_or(0.0) as u64;
            let size = num(&f, "size").unwrap_or(0.0) as u64;
            if let Some(p) = num(&f, "pps") {
                m.pps.entry((phase.clone(), q, size)).or_default().push(p);
            }
            m.lost += num(&f, "lost").unwrap_or(0.0) as u64;
            m.corrupt += num(&f, "corrupt").unwrap_or(0.0) as u64;
        } else if t.starts_with("netbench:") {
            m.failures.push(t.to_string());
        }
    }
    m
}

/// The igb rows of `cargo xtask netbench`: one boot per configuration; writes
/// `target/netbench/igb-results.json`.
fn igb_rows(chosen: &[Config], o: &Opts) -> Result<()> {
    let mut configs: Vec<Config> = configs().into_iter().filter(|c| !c.translate).collect();
    configs.extend(chosen.iter().filter(|c| c.translate).cloned());
    println!(
        "xtask netbench igb: {} boots (translation off first); per boot {} reps of {:?} queue pairs x {:?} B, {} frames per loop",
        configs.len(),
        o.reps,
        IGB_QUEUES,
        SIZES,
        o.packets * IGB_PACKET_FACTOR
    );
    let mut json = Vec::new();
    let mut bad = Vec::new();
    let mut all = IgbMeasured::default();
    for c in &configs {
        let secs = 150 + (o.reps * o.packets * IGB_PACKET_FACTOR * 4) / 400;
        let run = crate::igb::guest(
            &format!("netbench-igb-{}", c.name),
            igb_script(c, o),
            false,
            secs,
        );
        let out = guest::run(&run)?;
        let m = igb_measure(out.job_lines());
        all.pps.extend(m.pps.clone());
        let med = |phase: &str, q: u16, size: u64| {
            all.pps
                .get(&(phase.to_string(), u64::from(q), size))
                .and_then(|v| spread(v))
        };
        for size in SIZES {
            let one = |q: u16| med(&c.name, q, size).map(|s| s.0);
            for q in IGB_QUEUES {
                let (v, b) = (med(&c.name, q, size), med("notrans", q, size));
                let ratio = v.zip(b).map(|(v, b)| v.0 / b.0);
                println!(
                    "igb {:<17} q={q} {size:>4} B: {:>8} pps ({}), translation off {:>8}, ratio {}",
                    c.name,
                    v.map_or("-".into(), |v| format!("{:.0}", v.0)),
                    v.map_or("-".into(), |v| format!("{:.0}-{:.0}", v.1, v.2)),
                    b.map_or("-".into(), |b| format!("{:.0}", b.0)),
                    shown(ratio)
                );
                json.push(serde_json::json!({
                    "nic": "igb",
                    "config": c.name,
                    "strategy": if c.translate { c.strategy } else { "noiommu" },
                    "flush": if c.translate { c.flush } else { "none" },
                    "translation": c.translate,
                    "queues": q,
                    "frame_bytes": size,
                    "packets_per_loop": o.packets * IGB_PACKET_FACTOR,
                    "reps": o.reps,
                    "pps": json_num(v.map(|v| v.0)),
                    "pps_min": json_num(v.map(|v| v.1)),
                    "pps_max": json_num(v.map(|v| v.2)),
                    "notrans_pps": json_num(b.map(|b| b.0)),
                    "ratio_to_notrans": json_num(ratio),
                }));
            }
            println!(
                "igb {:<17} {size:>4} B: 2-queue / 1-queue packets/s = {}",
                c.name,
                shown(one(2).zip(one(1)).map(|(a, b)| a / b))
            );
        }
        if !out.success() || m.lost != 0 || m.corrupt != 0 || !m.failures.is_empty() {
            bad.push(format!(
                "igb {}: exit {:?}, lost {}, corrupt {}, {:?} (log {})",
                c.name,
                out.exit_marker,
                m.lost,
                m.corrupt,
                m.failures,
                out.log_path.display()
            ));
        }
    }
    let dir = workspace_root().join("target").join("netbench");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let p = dir.join("igb-results.json");
    write_json(&p, json)?;
    println!("wrote {}", p.display());
    if bad.is_empty() {
        Ok(())
    } else {
        Err(format!("netbench igb: {}", bad.join("; ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_loops_and_ping_pong() {
        let text = "\
loop: sent=100 received=100 corrupt=0 lost=0 duplicate=0 foreign=0 pps=1000.0 size=64 window=32
loop: sent=100 received=99 corrupt=0 lost=1 duplicate=0 foreign=0 pps=3000.0 size=64 window=32
loop: sent=100 received=100 corrupt=0 lost=0 duplicate=0 foreign=0 pps=2000.0 size=64 window=32
loop: sent=100 received=100 corrupt=0 lost=0 duplicate=0 foreign=0 pps=500.5 size=1500 window=32
pingpong: rounds=10 replies=10 corrupt=0 lost=0 p50_us=120.5 p99_us=300.0 max_us=301.0
netbench: loop failed size=64
";
        let m = measure(text.lines());
        assert_eq!(m.pps[&64], vec![1000.0, 3000.0, 2000.0]);
        assert_eq!(spread(&m.pps[&64]), Some((2000.0, 1000.0, 3000.0)));
        assert_eq!(m.pps[&1500], vec![500.5]);
        assert_eq!((m.p50_us, m.p99_us), (Some(120.5), Some(300.0)));
        assert_eq!((m.sent, m.received, m.lost, m.corrupt), (410, 409, 1, 0));
        assert_eq!(m.failures.len(), 1);
    }

    #[test]
    fn script_runs_every_size_per_rep_and_one_ping_pong() {
        let o = parse(&["--reps".into(), "2".into(), "--packets".into(), "7".into()]).unwrap();
        let s = script(&configs()[0], &o);
        assert!(s.contains("--no-translation"));
        assert_eq!(s.matches("failed size=64").count(), 2);
        assert_eq!(s.matches("failed size=1500").count(), 2);
        assert_eq!(s.matches("--ping-pong").count(), 1);
        assert!(s.contains("--packets 7 --size 1500"));
        assert!(parse(&["--reps".into(), "0".into()]).is_err());
    }

    #[test]
    fn igb_phases_and_queues() {
        let text = "igbbench-phase notrans rep=0\n\
loop: queues=1 sent=10 received=10 corrupt=0 lost=0 pps=100.0 size=64\n\
loop: queues=2 sent=10 received=10 corrupt=0 lost=0 pps=180.0 size=64\n\
igbbench-phase magazine-percore rep=0\n\
loop: queues=2 sent=10 received=9 corrupt=0 lost=1 pps=170.0 size=64\n";
        let m = igb_measure(text.lines());
        assert_eq!(m.pps[&("notrans".to_string(), 1, 64)], vec![100.0]);
        assert_eq!(m.pps[&("notrans".to_string(), 2, 64)], vec![180.0]);
        assert_eq!(m.pps[&("magazine-percore".to_string(), 2, 64)], vec![170.0]);
        assert_eq!(m.lost, 1);
        let o = parse(&["--reps".into(), "2".into(), "--nic".into(), "igb".into()]).unwrap();
        let s = igb_script(&configs()[1], &o);
        assert_eq!(s.matches("--no-translation").count(), 0);
        assert_eq!(
            igb_script(&configs()[0], &o)
                .matches("--no-translation")
                .count(),
            1
        );
        assert_eq!(s.matches("igbd loop").count(), 2 * 2 * 2);
        assert!(s.contains("--queues 2 --packets 10000 --size 64"));
        assert!(parse(&["--nic".into(), "ixgbe".into()]).is_err());
    }

    #[test]
    fn ratios_against_translation_off() {
        let mk = |a: f64, b: f64| Measured {
            pps: BTreeMap::from([(64, vec![a]), (1500, vec![b])]),
            ..Measured::default()
        };
        let cs = configs();
        let rows = vec![
            (cs[0].clone(), mk(1000.0, 400.0)),
            (cs[3].clone(), mk(900.0, 400.0)),
        ];
        let ch = ratio_chart(&rows, &[]);
        assert_eq!(ch.series[0].values, vec![Some(1.0), Some(1.0)]);
        assert_eq!(ch.series[1].values, vec![Some(0.9), Some(1.0)]);
        let o = parse(&[]).unwrap();
        let j = to_json(&rows, &o, Vec::new());
        // Rows: notrans 64 B, notrans 1500 B, then the second configuration.
        assert_eq!(j[2]["ratio_to_notrans"], 0.9, "{}", j[2]);
        assert_eq!(j[0]["strategy"], "noiommu");
        assert_eq!(j[0]["system"], "iommud");
    }
}
