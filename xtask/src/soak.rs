//! `cargo xtask demo --duration 10m [--report-every 60s]`: the demo's traffic for a long
//! time, watched for anything that grows without bound.
//!
//! One guest boot: iommud, then one `e1000d loop --duration` that sends bursts of
//! `--packets` verified frames A → B back to back on the same two domains. Every
//! `--report-every` (default 60 s) and at the end it prints a `soak:` line (frames and
//! packets/s of that period, lost and corrupt so far) and runs a sampler that prints
//! `soak-sample: rss_kb=.. fds=.. pt_pages_live=.. iovas=..`: iommud's resident memory
//! and open descriptors (`/proc/<pid>/status`, `/proc/<pid>/fd`), its live page-table
//! pages (`iommuctl cat /scheme/iommu/stats`) and the IOVAs it holds for the two domains
//! (`mapped + delegated_iovas + parked + refcounted_pages` of each domain's `stats`).
//! Both lines are streamed to the terminal as they come.
//!
//! The run fails if a frame was lost or corrupt, or if a watched figure grows without
//! bound, by this rule ([`grows_without_bound`]): the reports are cut into thirds (in time
//! order); a figure grows without bound when the maximum of the last third exceeds the
//! maximum of the first third by more than [`GROWTH_PCT`] % plus a small absolute slack
//! (noise of a few pages, descriptors or IOVAs), *and* the maxima of the three thirds
//! rise monotonically (first < middle < last). A figure that jumps once and then stays
//! flat (a cache filled, a magazine taken) is not growth; a leak per burst is. At least
//! three reports are needed to judge; fewer, and the rule is skipped (said so).
//!
//! The IOVAs have a ceiling by design, [`IOVA_CEILING`]: a magazine client takes a new
//! magazine from the depot whenever its oldest waiting batch is not yet invalidated, up
//! to a fixed number of waiting batches per CPU (libdma/src/magazine.rs). Each time
//! iommud's flush lags further than before, the working set steps up by a magazine
//! (128), so over minutes it climbs towards that ceiling and a 10-minute run cannot tell
//! the climb from a leak by its trend. The IOVAs therefore fail when they pass the
//! ceiling (at any report), and a rising trend below it is reported, not failed.
//! Writes `target/soak/soak.json` (every report).

use std::time::Duration;

use crate::demo::{start_iommud_trust, DemoOpts, STOP_IOMMUD};
use crate::guest::{self, GuestOutput, GuestRun};
use crate::util::{workspace_root, write_json, Result};

/// How much the last third's maximum may exceed the first third's, in percent.
pub const GROWTH_PCT: f64 = 10.0;

/// The most IOVAs the two magazine domains can hold by design: per domain and CPU
/// (the guest has 2), `MAX_PENDING` (32) waiting batches plus the loaded and the open
/// one, of `MAG_SIZE` (128) IOVAs, all in the 1-page size class (2 KiB buffers and 4 KiB
/// rings) — libdma/src/magazine.rs and abi/src/classes.rs.
pub const IOVA_CEILING: u64 = 2 * 2 * (32 + 2) * 128;

/// `--duration` and `--report-every` of a soak run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SoakOpts {
    pub duration: Duration,
    pub report_every: Duration,
}

/// Parses `90`, `90s`, `10m`, `1h` (seconds when no unit).
pub fn parse_duration(s: &str) -> Result<Duration> {
    let (num, mult) = match s.chars().last() {
        Some('s') => (&s[..s.len() - 1], 1),
        Some('m') => (&s[..s.len() - 1], 60),
        Some('h') => (&s[..s.len() - 1], 3600),
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("bad duration {s:?} (e.g. 90s, 10m, 1h)"))?;
    if n == 0 {
        return Err(format!("duration {s:?} must be positive"));
    }
    Ok(Duration::from_secs(n * mult))
}

/// Takes `--duration D` and `--report-every D` out of the demo's arguments.
pub fn split_args(args: &[String]) -> Result<(Vec<String>, Option<SoakOpts>)> {
    let (mut rest, mut duration, mut every) = (Vec::new(), None, Duration::from_secs(60));
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut v = || it.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--duration" => duration = Some(parse_duration(v()?)?),
            "--report-every" => every = parse_duration(v()?)?,
            _ => rest.push(a.clone()),
        }
    }
    Ok((
        rest,
        duration.map(|duration| SoakOpts {
            duration,
            report_every: every,
        }),
    ))
}

/// The sampler the soak's e1000d runs at every report (busybox sh).
const SAMPLER: &str = r#"P=$(pidof iommud)
rss=$(awk '/^VmRSS:/ {print $2}' /proc/$P/status)
fds=$(ls /proc/$P/fd | wc -l)
pt=$(iommuctl cat /scheme/iommu/stats | awk '$1 == "pt_pages_live" {print $2}')
iovas=0
for d in 00:01.0 00:02.0; do
  n=$(iommuctl cat /scheme/iommu/domains/$d/stats | awk '$1 == "mapped" || $1 == "delegated_iovas" || $1 == "parked" || $1 == "refcounted_pages" {s += $2} END {print s + 0}')
  iovas=$((iovas + n))
done
echo "soak-sample: rss_kb=$rss fds=$fds pt_pages_live=$pt iovas=$iovas"
"#;

/// The guest job of a soak run.
pub fn script(o: &DemoOpts, s: &SoakOpts) -> String {
    // The NICs' trust as asked (`--trust`), as the demo's burst gives it.
    let mut sc = start_iommud_trust(
        if o.no_translation {
            "--no-translation"
        } else {
            ""
        },
        &o.trust,
    );
    sc.push_str(&format!(
        "cat > /tmp/soak-sample.sh <<'SAMPLER-EOF'\n{SAMPLER}SAMPLER-EOF\n\
e1000d loop --mapper libdma --strategy {} --flush {} --packets {} --size {} \
--duration {} --report-every {} --report-cmd 'sh /tmp/soak-sample.sh'\nrc=$?\necho \"E1000D-EXIT $rc\"\n",
        o.strategy,
        o.flush,
        o.packets,
        o.size,
        s.duration.as_secs(),
        s.report_every.as_secs()
    ));
    sc.push_str(STOP_IOMMUD);
    sc.push_str("exit $rc\n");
    sc
}

/// One report: the `soak:` line and the sample after it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sample {
    pub t_s: f64,
    pub pps: f64,
    pub frames: u64,
    pub lost: u64,
    pub corrupt: u64,
    pub rss_kb: Option<u64>,
    pub fds: Option<u64>,
    pub pt_pages_live: Option<u64>,
    pub iovas: Option<u64>,
}

/// The reports in a soak's output.
pub fn samples<'a>(lines: impl Iterator<Item = &'a str>) -> Vec<Sample> {
    let mut v: Vec<Sample> = Vec::new();
    for l in lines {
        let t = l.trim();
        let get = |rest: &str, k: &str| crate::fault::kv(rest, k).map(str::to_string);
        if let Some(r) = t.strip_prefix("soak: ") {
            let f = |k| get(r, k).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
            v.push(Sample {
                t_s: f("t_s"),
                pps: f("pps"),
                frames: f("frames") as u64,
                lost: f("lost") as u64,
                corrupt: f("corrupt") as u64,
                ..Sample::default()
            });
        } else if let Some(r) = t.strip_prefix("soak-sample: ") {
            if let Some(s) = v.last_mut() {
                let n = |k| get(r, k).and_then(|x| x.parse::<u64>().ok());
                s.rss_kb = n("rss_kb");
                s.fds = n("fds");
                s.pt_pages_live = n("pt_pages_live");
                s.iovas = n("iovas");
            }
        }
    }
    v
}

/// The growth rule (see the module text). `slack`: absolute allowance in the figure's
/// own unit. `None` when there are fewer than three values to judge.
pub fn grows_without_bound(values: &[f64], slack: f64) -> Option<bool> {
    let n = values.len();
    if n < 3 {
        return None;
    }
    let third = n.div_ceil(3);
    let max = |s: &[f64]| s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let first = max(&values[..third]);
    let last = max(&values[n - third..]);
    let middle = max(&values[third.min(n - third)..(n - third).max(third)]);
    let middle = if middle.is_finite() { middle } else { first };
    let rising = first < middle && middle < last || (n < 5 && first < last);
    Some(last > first * (1.0 + GROWTH_PCT / 100.0) + slack && rising)
}

/// The watched figures: name, absolute slack, ceiling by design, value of a sample.
type Figure = (&'static str, f64, Option<u64>, fn(&Sample) -> Option<u64>);

const FIGURES: [Figure; 4] = [
    ("rss_kb", 512.0, None, |s| s.rss_kb),
    ("fds", 2.0, None, |s| s.fds),
    ("pt_pages_live", 4.0, None, |s| s.pt_pages_live),
    ("iovas", 128.0, Some(IOVA_CEILING), |s| s.iovas),
];

/// Every failure of a soak's reports.
pub fn check(v: &[Sample]) -> Vec<String> {
    let mut bad = Vec::new();
    if v.is_empty() {
        return vec!["no soak report".into()];
    }
    if let Some(l) = v.last() {
        if l.lost != 0 || l.corrupt != 0 {
            bad.push(format!("lost {} corrupt {}", l.lost, l.corrupt));
        }
    }
    for (name, slack, ceiling, get) in FIGURES {
        let vals: Vec<f64> = v.iter().filter_map(get).map(|x| x as f64).collect();
        if vals.len() != v.len() {
            bad.push(format!(
                "{name}: sampled in {} of {} reports",
                vals.len(),
                v.len()
            ));
            continue;
        }
        let top = vals.iter().copied().fold(0.0, f64::max);
        if let Some(c) = ceiling.filter(|c| top > *c as f64) {
            bad.push(format!(
                "{name} passed its ceiling by design ({c}): {vals:?}"
            ));
            continue;
        }
        match grows_without_bound(&vals, slack) {
            Some(true) if ceiling.is_some() => println!(
                "  ok   {name} rising, below its ceiling by design ({}; at most {:.0}% of it): {vals:?}",
                ceiling.unwrap_or(0),
                top / ceiling.unwrap_or(1).max(1) as f64 * 100.0
            ),
            Some(true) => bad.push(format!("{name} grows without bound: {vals:?}")),
            Some(false) => println!("  ok   {name} bounded: {vals:?}"),
            None => println!("  --   {name}: fewer than 3 reports, growth not judged"),
        }
    }
    bad
}

/// `cargo xtask demo --duration D`.
pub fn run(o: &DemoOpts, s: &SoakOpts) -> Result<()> {
    println!(
        "xtask demo (soak): {} s of {} B frames A -> B, bursts of {}, strategy {} flush {} \
trust {}, a report every {} s",
        s.duration.as_secs(),
        o.size,
        o.packets,
        if o.no_translation {
            "noiommu"
        } else {
            &o.strategy
        },
        o.flush,
        o.trust,
        s.report_every.as_secs()
    );
    let mut run = GuestRun::new("demo-soak", script(o, s))
        .package("iommud")
        .package("e1000d")
        .caching_mode(o.caching_mode)
        .timeout(s.duration + Duration::from_secs(240))
        .echo(false);
    run.echo_prefixes = vec!["soak:".into(), "soak-sample:".into(), "soak-end:".into()];
    let out: GuestOutput = guest::run(&run)?;
    let v = samples(out.job_lines());
    println!(
        "{:>8} {:>10} {:>9} {:>8} {:>5} {:>13} {:>7}",
        "t_s", "frames", "pps", "rss_kb", "fds", "pt_pages_live", "iovas"
    );
    let opt = |x: Option<u64>| x.map_or("-".into(), |x| x.to_string());
    for x in &v {
        println!(
            "{:>8.0} {:>10} {:>9.1} {:>8} {:>5} {:>13} {:>7}",
            x.t_s,
            x.frames,
            x.pps,
            opt(x.rss_kb),
            opt(x.fds),
            opt(x.pt_pages_live),
            opt(x.iovas)
        );
    }
    let mut bad = check(&v);
    if !out.success() {
        bad.push(format!("job failed: GUEST-EXIT {:?}", out.exit_marker));
    }
    let dir = workspace_root().join("target").join("soak");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    write_json(
        &dir.join("soak.json"),
        v.iter()
            .map(|x| {
                serde_json::json!({
                    "t_s": x.t_s, "frames": x.frames, "pps": x.pps, "lost": x.lost,
                    "corrupt": x.corrupt, "rss_kb": x.rss_kb, "fds": x.fds,
                    "pt_pages_live": x.pt_pages_live, "iovas": x.iovas,
                    "strategy": if o.no_translation { "noiommu" } else { &o.strategy },
                    "flush": o.flush, "frame_bytes": o.size,
                })
            })
            .collect(),
    )?;
    println!(
        "wrote {}; log {}",
        dir.join("soak.json").display(),
        out.log_path.display()
    );
    if bad.is_empty() {
        println!("soak: PASS ({} reports)", v.len());
        Ok(())
    } else {
        Err(format!("soak failed: {}", bad.join("; ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("0m").is_err());
        assert!(parse_duration("ten").is_err());
        let a = |s: &str| s.split_whitespace().map(String::from).collect::<Vec<_>>();
        let (rest, s) =
            split_args(&a("--strategy global --duration 2m --report-every 20s")).expect("valid");
        assert_eq!(rest, a("--strategy global"));
        assert_eq!(
            s,
            Some(SoakOpts {
                duration: Duration::from_secs(120),
                report_every: Duration::from_secs(20)
            })
        );
        assert_eq!(split_args(&a("--packets 5")).expect("valid").1, None);
        assert!(split_args(&a("--duration")).is_err());
    }

    #[test]
    fn growth_rule() {
        // A leak: rises steadily.
        let leak: Vec<f64> = (0..10).map(|i| 1000.0 + 200.0 * i as f64).collect();
        assert_eq!(grows_without_bound(&leak, 0.0), Some(true));
        // A step at the start, then flat: bounded.
        let step = [1000.0, 3000.0, 3000.0, 3000.0, 3000.0, 3000.0];
        assert_eq!(grows_without_bound(&step, 0.0), Some(false));
        // Noise around a level: bounded.
        let noise = [100.0, 104.0, 98.0, 103.0, 101.0, 105.0, 99.0, 104.0, 102.0];
        assert_eq!(grows_without_bound(&noise, 0.0), Some(false));
        // Rising, but within the slack: bounded.
        let small = [10.0, 11.0, 12.0, 13.0, 14.0, 15.0];
        assert_eq!(grows_without_bound(&small, 8.0), Some(false));
        assert_eq!(grows_without_bound(&small, 0.0), Some(true));
        // Up then down again (last third below the middle): not a monotone trend.
        let hump = [100.0, 100.0, 500.0, 500.0, 120.0, 130.0];
        assert_eq!(grows_without_bound(&hump, 0.0), Some(false));
        assert_eq!(grows_without_bound(&[1.0, 2.0], 0.0), None);
        assert_eq!(grows_without_bound(&[1.0, 2.0, 4.0], 0.0), Some(true));
    }

    #[test]
    fn parses_reports_and_checks_them() {
        let mut text = String::new();
        for i in 0..6u64 {
            text.push_str(&format!(
                "soak: t_s={}.0 bursts=3 frames=6000 pps=100.0 lost=0 corrupt=0 total_frames=1\n\
soak-sample: rss_kb={} fds=9 pt_pages_live=6 iovas=3300\n",
                60 * (i + 1),
                4000 + 300 * i
            ));
        }
        let v = samples(text.lines());
        assert_eq!(v.len(), 6);
        assert_eq!(v[1].t_s, 120.0);
        assert_eq!(v[5].rss_kb, Some(5500));
        assert_eq!(v[0].iovas, Some(3300));
        let bad = check(&v);
        assert_eq!(bad.len(), 1, "{bad:?}");
        assert!(bad[0].starts_with("rss_kb grows"), "{bad:?}");
        let flat: Vec<Sample> = v
            .iter()
            .map(|s| Sample {
                rss_kb: Some(4000),
                ..s.clone()
            })
            .collect();
        assert!(check(&flat).is_empty());
        let mut lossy = flat.clone();
        lossy[5].lost = 2;
        assert_eq!(check(&lossy).len(), 1);
        let mut unsampled = flat.clone();
        unsampled[2].fds = None;
        assert_eq!(check(&unsampled).len(), 1);
        // IOVAs climbing below their ceiling: reported, not failed; past it: failed.
        let mut climbing = flat;
        for (i, s) in climbing.iter_mut().enumerate() {
            s.iovas = Some(5000 + 600 * i as u64);
        }
        assert!(check(&climbing).is_empty());
        climbing[5].iovas = Some(IOVA_CEILING + 1);
        assert_eq!(check(&climbing).len(), 1);
    }

    #[test]
    fn script_runs_one_soak_loop() {
        let o = DemoOpts::default();
        let s = SoakOpts {
            duration: Duration::from_secs(600),
            report_every: Duration::from_secs(60),
        };
        let sc = script(&o, &s);
        assert_eq!(sc.matches("e1000d loop").count(), 1);
        assert!(sc.contains("--duration 600 --report-every 60"));
        assert!(sc.contains("soak-sample:"));
        assert!(sc.contains("iommud --platform linux"));
        assert!(sc.contains("# e1000\ntrust = \"delegated\""), "{sc}");
        // `--trust validated` reaches the guest policy.
        let v = DemoOpts {
            trust: "validated".into(),
            ..DemoOpts::default()
        };
        let sc = script(&v, &s);
        assert!(sc.contains("# e1000\ntrust = \"validated\""), "{sc}");
    }
}
