//! `cargo xtask netbench`: packets/s and ping-pong latency of the e1000 loop in the QEMU
//! guest, per IOVA strategy and flush policy and with translation off.
//!
//! ```text
//! cargo xtask netbench [--packets N] [--warmup N] [--window N] [--burst N] [--no-tx-ahead]
//!                      [--tx-depth N]
//!                      [--rounds N] [--reps N] [--linux-packets N]
//!                      [--only NAME[,NAME...]]
//! ```
//! The configurations ([`configs`]: `notrans`, then `<strategy>-<flush>` for every
//! strategy and flush policy) are interleaved: the repetition loop is outside and the
//! configuration loop inside, one guest boot per (repetition, configuration), so a drift
//! of the host (other guests starting, a slower minute) hits every configuration alike.
//! Each boot: iommud on the emulated VT-d unit (`--no-translation` for `notrans`), then
//! `e1000d loop --mapper libdma` with 64-byte and with 1500-byte frames (N each, after
//! `--warmup` frames through the same loop that are checked but not measured, so the
//! rate is the steady state's; every payload is checked by e1000d), then a ping-pong
//! of `--rounds` 64-byte frames A→B→A.
//! Each ratio is computed against the `notrans` boot of the same repetition, then the
//! median, min and max over the repetitions are reported (packets/s likewise).
//! e1000d's per-packet cost breakdown (`cost_ns:`: map, unmap, ring, other, total; see
//! netd/e1000d/src/cost.rs) and the buffers per map/unmap call it made (`batch`) are
//! kept per configuration and size (medians over the repetitions), with the trust
//! mode iommud reported for the domain. Writes `target/netbench/results.json`,
//! `target/netbench/cost-table.md` (the breakdown as a Markdown table) and
//! `target/netbench/throughput-ratio.svg` (packets/s as a ratio to `notrans`). Fails if
//! any frame was lost or corrupt. Defaults: 20 000 frames after 2000 of warm-up, 5 reps,
//! 1000 rounds: 15 configurations x 5 boots. The socket rows (`global`, `identity`, `va`:
//! a blocking round trip to iommud per map and unmap, 0.25-1.5 ms each in the guest)
//! take most of it, over an hour on 2 vCPUs under TCG; the ring, fast-path and `static`
//! rows take a few seconds each beyond their boot. 20 000 frames: at 64 bytes
//! translation off moves them in about 40 ms (4000 took 8 ms, too short to measure
//! against the host's scheduling hiccups of a millisecond or more).
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

use crate::demo::{start_iommud, start_iommud_trust, STOP_IOMMUD};
use crate::guest::{self, GuestOutput, GuestRun};
use crate::util::{json_num, workspace_root, write_json, Flags, Result};

#[allow(dead_code)]
pub(crate) use benchplot as plot;

const USAGE: &str =
    "usage: cargo xtask netbench [--packets N] [--warmup N] [--window N] [--burst N] \
[--no-tx-ahead] [--tx-depth N] [--rounds N] [--reps N] \
[--linux-packets N] [--only NAME[,NAME...]] [--nic e1000|igb|all] [--from-logs]  \
(NAME: a configuration, `linux` or linux-MODE; --from-logs: re-read the e1000 rows from the \
last run's guest logs, no boot)";

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
    /// The trust mode the domain runs in (`delegated`, `validated`; `none` without
    /// translation); the results take iommud's own report where it printed one.
    pub trust: &'static str,
    /// A recycled buffer's remap may keep its IOVA (e1000d's default; false:
    /// `--no-keep`, every remap a new IOVA; docs/ARCHITECTURE.md, "Kept remaps").
    pub keep: bool,
}

/// Every configuration, the translation-off baseline first. The one list: a new row
/// (a strategy, a trust mode) is added here.
///
/// The strategy x flush matrix runs with the guest policy's delegated trust for the
/// NICs: `magazine` is the research's fast path in the driver, `global`, `identity`
/// and `va` send every map and unmap (or batch) to iommud over the socket (the naive
/// baseline and the refcounted designs). The `-val` rows run the NICs in validated
/// trust through the rings: iommud keeps the magazines and writes every entry
/// (`magazine-val-*`), or maps each pool once (`static`, the DPDK-style reference).
pub fn configs() -> Vec<Config> {
    let c = |name, strategy: &'static str, flush, translate: bool, trust| Config {
        name,
        strategy,
        flush,
        translate,
        trust: if translate { trust } else { "none" },
        keep: true,
    };
    let mut v = vec![c("notrans".into(), "magazine", "percore", false, "none")];
    for strategy in crate::demo::STRATEGIES {
        for flush in crate::demo::FLUSHES {
            v.push(c(
                format!("{strategy}-{flush}"),
                strategy,
                flush,
                true,
                "delegated",
            ));
        }
    }
    for flush in crate::demo::FLUSHES {
        v.push(c(
            format!("magazine-val-{flush}"),
            "magazine",
            flush,
            true,
            "validated",
        ));
    }
    v.push(c("static".into(), "static", "percore", true, "validated"));
    // The percore rows again with a new IOVA for every remap: what keeping a
    // recycled buffer's IOVA saves.
    for (name, trust) in [
        ("magazine-percore-rotate", "delegated"),
        ("magazine-val-percore-rotate", "validated"),
    ] {
        let mut r = c(name.into(), "magazine", "percore", true, trust);
        r.keep = false;
        v.push(r);
    }
    v
}

#[derive(Clone, Debug)]
struct Opts {
    packets: u64,
    /// Frames e1000d sends, unmeasured, before each measured loop.
    warmup: u64,
    /// e1000d's `--window` (frames in flight) and `--burst` (frames handed to the
    /// NIC at once; 0: the window).
    window: u64,
    burst: u64,
    /// e1000d prepares each burst as soon as the previous one went out (its
    /// default); `--no-tx-ahead` passes its `--no-tx-ahead`.
    tx_ahead: bool,
    /// e1000d's `--tx-depth` (bursts prepared ahead; its default 1).
    tx_depth: u64,
    rounds: u64,
    reps: u64,
    only: Vec<String>,
    /// `e1000`, `igb` (the igb rows: 1 and 2 queue pairs) or `all`.
    nic: String,
    /// pktgen frames per size and rep in the Linux peer's boots.
    linux_packets: u64,
    /// Re-read the e1000 rows from `target/guest/logs/netbench-<config>-rep<k>.log`.
    from_logs: bool,
}

fn parse(args: &[String]) -> Result<Opts> {
    let mut o = Opts {
        packets: 20_000,
        warmup: 2_000,
        window: 32,
        burst: 0,
        tx_ahead: true,
        tx_depth: 1,
        rounds: 1_000,
        reps: 5,
        only: Vec::new(),
        nic: "all".into(),
        linux_packets: 50_000,
        from_logs: false,
    };
    let mut f = Flags::new(args, USAGE);
    while let Some(a) = f.next_flag() {
        match a {
            "--packets" => o.packets = f.number(a, 1)?,
            "--warmup" => o.warmup = f.number(a, 0)?,
            "--window" => o.window = f.number(a, 1)?,
            "--burst" => o.burst = f.number(a, 0)?,
            "--no-tx-ahead" => o.tx_ahead = false,
            "--tx-depth" => o.tx_depth = f.number(a, 1)?,
            "--rounds" => o.rounds = f.number(a, 1)?,
            "--reps" => o.reps = f.number(a, 1)?,
            "--linux-packets" => o.linux_packets = f.number(a, 1)?,
            "--from-logs" => o.from_logs = true,
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

/// The guest job of one configuration in one repetition.
fn script(c: &Config, o: &Opts) -> String {
    let mut s = start_iommud_trust(
        if c.translate { "" } else { "--no-translation" },
        if c.trust == "validated" {
            "validated"
        } else {
            "delegated"
        },
    );
    let base = format!(
        "taskset -c 0 e1000d loop --mapper libdma --strategy {} --flush {}{}",
        c.strategy,
        c.flush,
        if c.keep { "" } else { " --no-keep" }
    );
    for size in SIZES {
        let _ = writeln!(
            s,
            "{base} --packets {} --warmup {} --window {} --burst {} --tx-depth {}{} --size {size} || \
echo \"netbench: loop failed size={size}\"",
            o.packets,
            o.warmup,
            o.window,
            o.burst,
            o.tx_depth,
            if o.tx_ahead { "" } else { " --no-tx-ahead" }
        );
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
/// run of the same rep); a rep missing on either side (NaN) gives no ratio.
pub fn rep_ratios(x: &[f64], base: &[f64]) -> Vec<f64> {
    x.iter()
        .zip(base)
        .filter(|(a, b)| a.is_finite() && **b > 0.0)
        .map(|(a, b)| a / b)
        .collect()
}

/// Median, min, max of the finite values.
pub fn spread(v: &[f64]) -> Option<(f64, f64, f64)> {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return None;
    }
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
    /// Ping-pong round trip p50 and p99 (µs; over reps: the medians of the reps').
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    /// Every rep's p50 and p99.
    pub p50s: Vec<f64>,
    pub p99s: Vec<f64>,
    /// Frames sent, received, lost and corrupt over all loops and the ping-pong.
    pub sent: u64,
    pub received: u64,
    pub lost: u64,
    pub corrupt: u64,
    /// `netbench: ... failed` lines.
    pub failures: Vec<String>,
    /// Per frame size: e1000d's per-packet cost breakdown of each rep (ns).
    pub cost: BTreeMap<u64, Vec<Cost>>,
    /// The trust mode iommud reported for the domains (`domain <bdf> trust <mode>`).
    pub trust: Option<String>,
}

/// e1000d's `cost_ns:` line: ns per packet, and buffers per map/unmap call.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Cost {
    pub map: f64,
    pub unmap: f64,
    pub ring: f64,
    pub other: f64,
    pub total: f64,
    pub batch: f64,
}

impl Cost {
    /// The parts, in the order of [`COST_PARTS`].
    fn parts(&self) -> [f64; 6] {
        [
            self.map, self.unmap, self.ring, self.other, self.total, self.batch,
        ]
    }
}

/// Names of [`Cost`]'s parts.
pub const COST_PARTS: [&str; 6] = ["map", "unmap", "ring", "other", "total", "batch"];

/// Per part, the median over `v`.
pub fn cost_median(v: &[Cost]) -> Option<[f64; 6]> {
    let mut out = [0.0; 6];
    for (i, o) in out.iter_mut().enumerate() {
        *o = spread(&v.iter().map(|c| c.parts()[i]).collect::<Vec<_>>())?.0;
    }
    Some(out)
}

impl Measured {
    /// Adds one repetition's boot. Every frame size gets exactly one packets/s value per
    /// repetition (NaN when the boot gave none), so the reps of two configurations stay
    /// aligned for the per-rep ratios.
    pub fn add_rep(&mut self, r: Measured) {
        for size in SIZES {
            let v = r.pps.get(&size).and_then(|v| v.first().copied());
            self.pps
                .entry(size)
                .or_default()
                .push(v.unwrap_or(f64::NAN));
            // Aligned with the reps too (NaN parts when the boot gave none).
            let nan = Cost {
                map: f64::NAN,
                unmap: f64::NAN,
                ring: f64::NAN,
                other: f64::NAN,
                total: f64::NAN,
                batch: f64::NAN,
            };
            let c = r.cost.get(&size).and_then(|v| v.first()).copied();
            self.cost.entry(size).or_default().push(c.unwrap_or(nan));
        }
        self.p50s.extend(r.p50_us);
        self.p99s.extend(r.p99_us);
        self.p50_us = spread(&self.p50s).map(|s| s.0);
        self.p99_us = spread(&self.p99s).map(|s| s.0);
        self.sent += r.sent;
        self.received += r.received;
        self.lost += r.lost;
        self.corrupt += r.corrupt;
        self.failures.extend(r.failures);
        self.trust = self.trust.take().or(r.trust);
    }
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
        } else if let Some(f) = fields(t, "cost_ns:") {
            let size = num(&f, "size").unwrap_or(0.0) as u64;
            let g = |k| num(&f, k).unwrap_or(f64::NAN);
            m.cost.entry(size).or_default().push(Cost {
                map: g("map"),
                unmap: g("unmap"),
                ring: g("ring"),
                other: g("other"),
                total: g("total"),
                batch: g("batch"),
            });
        } else if let Some(rest) = t.strip_prefix("domain ") {
            let w: Vec<&str> = rest.split_whitespace().collect();
            if let [_bdf, "trust", mode] = w.as_slice() {
                m.trust.get_or_insert_with(|| mode.to_string());
            }
        } else if t.starts_with("netbench:") {
            m.failures.push(t.to_string());
        }
    }
    m
}

/// The ratio to translation off that the NIC model's translated DMA alone leaves,
/// per rep (median, min, max): translation off's per-frame `total` over that total
/// plus what `static`'s `ring` time (the tail writes, in which the NIC model does its
/// DMA) spent above translation off's, in the same rep. `static` maps nothing per
/// frame and never invalidates, so every IOTLB lookup of the emulated unit is a hit:
/// no translating row's NIC DMA costs less, so no translating row can pass this bound
/// (docs/PERFORMANCE.md, "The bound the emulated unit sets"). `None` without both rows.
pub fn dma_bound(rows: &[(Config, Measured)], size: u64) -> Option<(f64, f64, f64)> {
    let cost = |f: &dyn Fn(&Config) -> bool| {
        rows.iter()
            .find(|(c, _)| f(c))
            .and_then(|(_, m)| m.cost.get(&size))
    };
    let base = cost(&|c| !c.translate)?;
    let fixed = cost(&|c| c.translate && c.strategy == "static")?;
    let v: Vec<f64> = base
        .iter()
        .zip(fixed)
        .map(|(b, s)| b.total / (b.total + (s.ring - b.ring).max(0.0)))
        .collect();
    spread(&v)
}

/// The trust mode of a row: iommud's report for a translating domain, else the
/// configuration's (`none` without translation).
fn trust_of<'a>(c: &'a Config, m: &'a Measured) -> &'a str {
    match &m.trust {
        Some(t) if c.translate => t,
        _ => c.trust,
    }
}

/// The per-packet cost table (Markdown): per configuration and frame size, the medians
/// over the reps of e1000d's breakdown, with packets/s and the ratio to `notrans`.
pub fn cost_table(rows: &[(Config, Measured)]) -> String {
    let base = rows.iter().find(|(c, _)| !c.translate).map(|(_, m)| m);
    let mut t = String::from(
        "| configuration | trust | bytes | pps (median) | ratio to notrans (min-max) | map ns | unmap ns | ring ns | other ns | total ns | batch |\n\
|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let f = |v: Option<f64>, d: usize| {
        v.filter(|x| x.is_finite())
            .map_or("-".into(), |x| format!("{x:.d$}"))
    };
    for (c, m) in rows {
        for size in SIZES {
            let pps = m.pps.get(&size).and_then(|v| spread(v));
            let r = base.and_then(|b| rep_ratio(m, b, size));
            let cm = m.cost.get(&size).and_then(|v| cost_median(v));
            let part = |i: usize, d| f(cm.map(|c| c[i]), d);
            let _ = writeln!(
                t,
                "| {} | {} | {size} | {} | {} ({}-{}) | {} | {} | {} | {} | {} | {} |",
                c.name,
                trust_of(c, m),
                f(pps.map(|p| p.0), 0),
                f(r.map(|r| r.0), 3),
                f(r.map(|r| r.1), 3),
                f(r.map(|r| r.2), 3),
                part(0, 0),
                part(1, 0),
                part(2, 0),
                part(3, 0),
                part(4, 0),
                part(5, 2),
            );
        }
    }
    for size in SIZES {
        if let Some(b) = dma_bound(rows, size) {
            let _ = writeln!(
                t,
                "\nBound at {size} B, from `static`'s ring column (the NIC model's translated DMA alone): {:.3} ({:.3}-{:.3})",
                b.0, b.1, b.2
            );
        }
    }
    t
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
            let cm = m.cost.get(&size).and_then(|v| cost_median(v));
            let cost: serde_json::Map<String, serde_json::Value> = COST_PARTS[..5]
                .iter()
                .enumerate()
                .map(|(i, k)| (k.to_string(), json_num(cm.map(|c| c[i]))))
                .collect();
            out.push(serde_json::json!({
                "system": "iommud",
                "config": c.name,
                "strategy": if c.translate { c.strategy } else { "noiommu" },
                "flush": if c.translate { c.flush } else { "none" },
                "translation": c.translate,
                "trust": trust_of(c, m),
                "batch": json_num(cm.map(|c| c[5])),
                "cost_ns": cost,
                "frame_bytes": size,
                "packets_per_rep": o.packets,
                "warmup_packets": o.warmup,
                "window": o.window,
                "burst": if o.burst == 0 { o.window } else { o.burst.min(o.window) },
                "tx_ahead": o.tx_ahead,
                "tx_depth": if o.tx_ahead { o.tx_depth } else { 0 },
                "keep": c.keep,
                "reps": m.pps.get(&size).map_or(0, |v| v.iter().filter(|x| x.is_finite()).count()),
                "interleaved": true,
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
    for size in SIZES {
        if let Some(b) = dma_bound(rows, size) {
            out.push(serde_json::json!({
                "system": "bound",
                "config": "translated-dma-bound",
                "basis": "translation off's total per frame over it plus static's ring time above translation off's, per rep",
                "frame_bytes": size,
                "ratio_to_notrans": b.0,
                "ratio_min": b.1,
                "ratio_max": b.2,
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
                    // The configuration's own name: `strategy / flush` alone
                    // named the delegated, validated and -rotate rows alike.
                    c.name.clone()
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
    if SIZES.iter().any(|&size| dma_bound(rows, size).is_some()) {
        chart.series.push(plot::Series {
            name: "bound: the NIC's translated DMA (static's ring)".into(),
            values: SIZES
                .iter()
                .map(|&size| dma_bound(rows, size).map(|b| b.0))
                .collect(),
        });
    }
    chart
        .series
        .extend(peer.iter().map(|(name, values)| plot::Series {
            name: name.clone(),
            values: values.clone(),
        }));
    chart
}

/// Writes `results.json`, `cost-table.md` and `throughput-ratio.svg` into
/// `target/netbench/`; returns the cost table.
fn write_results(
    rows: &[(Config, Measured)],
    o: &Opts,
    peer: &crate::linuxpeer::PeerBench,
) -> Result<String> {
    let dir = workspace_root().join("target").join("netbench");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let write = |name: &str, text: String| {
        let p = dir.join(name);
        std::fs::write(&p, text).map_err(|e| format!("{}: {e}", p.display()))
    };
    write_json(&dir.join("results.json"), to_json(rows, o, peer.json()))?;
    let table = cost_table(rows);
    write("cost-table.md", table.clone())?;
    write(
        "throughput-ratio.svg",
        plot::svg(&ratio_chart(rows, &peer.series())),
    )?;
    println!(
        "wrote {0}/results.json, {0}/cost-table.md, {0}/throughput-ratio.svg",
        dir.display()
    );
    Ok(table)
}

/// `cargo xtask netbench`.
pub fn run(args: &[String]) -> Result<()> {
    let o = parse(args)?;
    let chosen: Vec<Config> = configs()
        .into_iter()
        .filter(|c| o.only.is_empty() || o.only.contains(&c.name))
        .collect();
    // Re-reading logs boots nothing: no Linux peer rows then.
    let no_peer = vec!["-".to_string()];
    let mut peer = crate::linuxpeer::PeerBench::new(
        if o.from_logs { &no_peer } else { &o.only },
        chosen.len() * o.reps as usize,
        &SIZES,
        o.linux_packets,
        o.reps,
    );
    if chosen.is_empty() && peer.is_empty() {
        return Err(format!("--only matches no configuration\n{USAGE}"));
    }
    if o.nic == "igb" {
        return igb_rows(&chosen, &o);
    }
    println!(
        "xtask netbench: {} reps x {} configurations, interleaved (one boot each); per boot {} frames of {:?} B, then {} ping-pong rounds",
        o.reps,
        chosen.len(),
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
    let mut rows: Vec<(Config, Measured)> = chosen
        .iter()
        .map(|c| (c.clone(), Measured::default()))
        .collect();
    let mut bad = Vec::new();
    let mut boot = 0;
    // Repetitions outside, configurations inside: drift hits all configurations alike.
    for rep in 0..o.reps {
        for (c, acc) in rows.iter_mut() {
            peer.run_due(boot, &mut bad)?;
            boot += 1;
            // Boot and settling (~15 s), plus the loops at a pessimistic 200 frames/s (the
            // validated rows ran at 250-400 frames/s with other guests on the same 2 cores).
            let secs = 120 + ((o.packets + o.warmup) * 2 + o.rounds) / 200;
            let run = GuestRun::new(format!("netbench-{}-rep{rep}", c.name), script(c, &o))
                .package("iommud")
                .package("e1000d")
                .timeout(Duration::from_secs(secs))
                .echo(false);
            let out: GuestOutput = if o.from_logs {
                let p = crate::util::guest_dir()
                    .join("logs")
                    .join(format!("{}.log", run.name));
                GuestOutput::from_log(&p)?
            } else {
                guest::run(&run)?
            };
            let m = measure(out.job_lines());
            let one = |size: u64| {
                m.pps
                    .get(&size)
                    .and_then(|v| v.first())
                    .map_or("-".into(), |p| format!("{p:.0}"))
            };
            let cost = |size: u64| {
                m.cost
                    .get(&size)
                    .and_then(|v| v.first())
                    .map_or("-".into(), |c| {
                        format!(
                            "map {:.0} unmap {:.0} ring {:.0} other {:.0}",
                            c.map, c.unmap, c.ring, c.other
                        )
                    })
            };
            println!(
                "rep {rep} {:<17} 64 B: {:>8} pps ({} ns)  1500 B: {:>8} pps  rtt p50 {} µs p99 {} µs  lost {} corrupt {}  ({:.0} s, log {})",
                c.name,
                one(64),
                cost(64),
                one(1500),
                shown(m.p50_us),
                shown(m.p99_us),
                m.lost,
                m.corrupt,
                out.duration.as_secs_f64(),
                out.log_path.display()
            );
            if !out.success() || m.lost != 0 || m.corrupt != 0 || !m.failures.is_empty() {
                bad.push(format!(
                    "{} rep {rep}: exit {:?}, lost {}, corrupt {}, {:?} (log {})",
                    c.name,
                    out.exit_marker,
                    m.lost,
                    m.corrupt,
                    m.failures,
                    out.log_path.display()
                ));
            }
            for size in SIZES {
                if m.pps.get(&size).is_none_or(|v| v.len() != 1) {
                    bad.push(format!("{} rep {rep}: no loop result for {size} B", c.name));
                }
            }
            acc.add_rep(m);
        }
        // The results so far, so an interrupted run still leaves its completed reps.
        write_results(&rows, &o, &peer)?;
    }
    let base = rows.iter().find(|(c, _)| !c.translate).map(|(_, m)| m);
    for (c, m) in &rows {
        let med = |size: u64| {
            let p = m.pps.get(&size).and_then(|v| spread(v));
            let r = base.and_then(|b| rep_ratio(m, b, size));
            format!(
                "{} pps, ratio {} ({}-{})",
                p.map_or("-".into(), |p| format!("{:.0}", p.0)),
                shown(r.map(|r| r.0)),
                shown(r.map(|r| r.1)),
                shown(r.map(|r| r.2))
            )
        };
        println!(
            "{:<17} {:<9} 64 B: {}  1500 B: {}  rtt p50 {} µs",
            c.name,
            trust_of(c, m),
            med(64),
            med(1500),
            shown(m.p50_us)
        );
    }
    let bound = |size| {
        dma_bound(&rows, size).map_or("-".into(), |b| {
            format!(
                "{} ({}-{})",
                shown(Some(b.0)),
                shown(Some(b.1)),
                shown(Some(b.2))
            )
        })
    };
    println!(
        "{:<17} {:<9} 64 B: ratio {}  1500 B: ratio {}  (the NIC model's translated DMA alone: static's ring column)",
        "bound",
        "-",
        bound(64),
        bound(1500)
    );
    peer.run_due(usize::MAX, &mut bad)?;
    let table = write_results(&rows, &o, &peer)?;
    println!("{table}");
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
/// igb loops move this many times `--packets` frames (20 000 by default, as
/// before the e1000 default went from 4000 to 20 000).
pub const IGB_PACKET_FACTOR: u64 = 1;

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
                    "igbd loop --tx {TX} --rx {RX} --mapper libdma --strategy {} --flush {}{} --queues {q} \
--packets {} --size {size} || echo \"netbench: igb loop failed q={q} size={size}\"",
                    c.strategy,
                    c.flush,
                    if c.keep { "" } else { " --no-keep" },
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
    // The validated rows are e1000 rows (the validated policy changes only the e1000 rule).
    configs.extend(
        chosen
            .iter()
            .filter(|c| c.translate && c.trust == "delegated")
            .cloned(),
    );
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
    fn script_runs_every_size_once_and_one_ping_pong() {
        let o = parse(&["--reps".into(), "2".into(), "--packets".into(), "7".into()]).unwrap();
        assert_eq!((o.warmup, o.window, o.burst), (2000, 32, 0), "defaults");
        assert_eq!(parse(&[]).unwrap().reps, 5, "at least 5 reps by default");
        let s = script(&configs()[0], &o);
        assert!(s.contains("--no-translation"));
        // One repetition per boot: the reps are boots, interleaved with the other
        // configurations'.
        assert_eq!(s.matches("failed size=64").count(), 1);
        assert_eq!(s.matches("failed size=1500").count(), 1);
        assert_eq!(s.matches("--ping-pong").count(), 1);
        assert!(
            s.contains("--packets 7 --warmup 2000 --window 32 --burst 0 --tx-depth 1 --size 1500")
        );
        let mut no_ahead = o.clone();
        no_ahead.tx_ahead = false;
        let s = script(&configs()[0], &no_ahead);
        assert_eq!(
            s.matches("--burst 0 --tx-depth 1 --no-tx-ahead --size")
                .count(),
            2
        );
        let two = parse(&["--tx-depth".into(), "2".into()]).unwrap();
        assert!(script(&configs()[0], &two).contains("--tx-depth 2 --size 64"));
        // The rotate rows pass --no-keep, the others do not.
        let rotate = configs()
            .into_iter()
            .find(|c| c.name == "magazine-val-percore-rotate")
            .unwrap();
        assert_eq!(script(&rotate, &o).matches("--no-keep").count(), 3);
        assert!(!script(&configs()[1], &o).contains("--no-keep"));
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
        assert!(!s.contains("--no-keep"));
        // The rotate rows pass --no-keep to igbd too.
        let rotate = configs()
            .into_iter()
            .find(|c| c.name == "magazine-percore-rotate")
            .expect("rotate row");
        assert_eq!(
            igb_script(&rotate, &o).matches("--no-keep").count(),
            2 * 2 * 2
        );
        assert!(parse(&["--nic".into(), "ixgbe".into()]).is_err());
    }

    #[test]
    fn reps_stay_aligned_and_ratios_are_per_rep() {
        let boot = |p64: Option<f64>, map: f64| {
            let mut t = String::from("domain 0000:00:01.0 trust validated\n");
            t.push_str("domain 0000:00:02.0 trust delegated\n");
            if let Some(p) = p64 {
                t.push_str(&format!(
                    "loop: sent=10 received=10 corrupt=0 lost=0 pps={p} size=64\n"
                ));
                t.push_str(&format!(
                    "cost_ns: map={map} unmap=20 ring=30 other=40 total={} batch=1.50 size=64\n",
                    map + 90.0
                ));
            }
            t.push_str("loop: sent=10 received=10 corrupt=0 lost=0 pps=50.0 size=1500\n");
            t.push_str(
                "pingpong: rounds=10 replies=10 corrupt=0 lost=0 p50_us=100.0 p99_us=200.0\n",
            );
            measure(t.lines().collect::<Vec<_>>().into_iter())
        };
        let (mut base, mut x) = (Measured::default(), Measured::default());
        // Rep 0: base 1000, x 500. Rep 1: x's boot gave no 64 B figure. Rep 2: base
        // 2000, x 1600. Against the same rep: 0.5 and 0.8 (not 0.5 and 1.6/1.0 shifted).
        for (b, v, map) in [
            (1000.0, Some(500.0), 10.0),
            (4000.0, None, 0.0),
            (2000.0, Some(1600.0), 30.0),
        ] {
            base.add_rep(boot(Some(b), 1.0));
            x.add_rep(boot(v, map));
        }
        assert_eq!(x.pps[&64].len(), 3);
        assert!(x.pps[&64][1].is_nan());
        let r = rep_ratio(&x, &base, 64).expect("ratios");
        assert!(
            (r.0 - 0.65).abs() < 1e-9 && r.1 == 0.5 && r.2 == 0.8,
            "{r:?}"
        );
        assert_eq!(x.trust.as_deref(), Some("validated"));
        let c = cost_median(&x.cost[&64]).expect("costs");
        assert_eq!(c, [20.0, 20.0, 30.0, 40.0, 110.0, 1.5]);
        assert_eq!(x.p50_us, Some(100.0));
        let cs = configs();
        let rows = vec![(cs[0].clone(), base), (cs[4].clone(), x)];
        let j = to_json(&rows, &parse(&[]).unwrap(), Vec::new());
        assert_eq!(j[2]["trust"], "validated");
        assert_eq!(j[0]["trust"], "none");
        assert_eq!(j[2]["batch"], 1.5);
        assert_eq!(j[2]["cost_ns"]["ring"], 30.0);
        assert_eq!(j[2]["reps"], 2);
        let t = cost_table(&rows);
        assert!(
            t.contains(&format!("| {} | validated | 64 | 1050 | 0.650 (0.500-0.800) | 20 | 20 | 30 | 40 | 110 | 1.50 |", cs[4].name)),
            "{t}"
        );
    }

    #[test]
    fn the_translated_dma_bound_is_per_rep_from_static_ring_column() {
        let boot = |ring: f64, total: f64| {
            let t = format!(
                "loop: sent=1 received=1 corrupt=0 lost=0 pps=1 size=64\n\
                 cost_ns: map=1 unmap=0 ring={ring} other=1 total={total} batch=1 size=64\n"
            );
            measure(t.lines())
        };
        let cs = configs();
        let by = |n: &str| cs.iter().find(|c| c.name == n).cloned().expect(n);
        let (mut off, mut fixed, mut other) = Default::default();
        // Rep 0: 1000 / (1000 + 250) = 0.8. Rep 1: 2000 / (2000 + 0) = 1 (static's
        // ring below translation off's counts as no cost). Rep 2: 1000 / 1500.
        for (r0, t0, r1) in [
            (500.0, 1000.0, 750.0),
            (900.0, 2000.0, 800.0),
            (400.0, 1000.0, 900.0),
        ] {
            Measured::add_rep(&mut off, boot(r0, t0));
            Measured::add_rep(&mut fixed, boot(r1, 5000.0));
            Measured::add_rep(&mut other, boot(9999.0, 9999.0));
        }
        let rows = vec![
            (by("notrans"), off),
            (by("magazine-percore"), other),
            (by("static"), fixed),
        ];
        let b = dma_bound(&rows, 64).expect("bound");
        assert!(
            (b.0 - 0.8).abs() < 1e-12 && (b.1 - 2.0 / 3.0).abs() < 1e-12 && b.2 == 1.0,
            "{b:?}"
        );
        assert!(dma_bound(&rows, 1500).is_none(), "no cost line at 1500 B");
        assert!(dma_bound(&rows[..2], 64).is_none(), "no static row");
        let j = to_json(&rows, &parse(&[]).unwrap(), Vec::new());
        let last = j.last().expect("rows");
        assert_eq!(last["config"], "translated-dma-bound");
        assert_eq!(last["ratio_to_notrans"], 0.8);
        assert!(cost_table(&rows).contains("Bound at 64 B, from `static`'s ring column (the NIC model's translated DMA alone): 0.800 (0.667-1.000)"));
    }

    #[test]
    fn configurations_carry_their_trust() {
        let cs = configs();
        assert_eq!(cs[0].trust, "none");
        for c in &cs[1..] {
            let want = if c.name.contains("-val-") || c.strategy == "static" {
                "validated"
            } else {
                "delegated"
            };
            assert_eq!(c.trust, want, "{}", c.name);
        }
        assert!(cs.iter().any(|c| c.name == "magazine-val-strict"));
        assert!(cs
            .iter()
            .any(|c| c.name == "static" && c.trust == "validated"));
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
