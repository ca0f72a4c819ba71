//! The disk side: guests with an NVMe controller (a raw image made with `qemu-img`,
//! attached with `-drive if=none`) driven by `nvmed` under iommud.
//!
//! ```text
//! cargo xtask demo --disk [--strategy S] [--flush F] [--caching-mode] [--no-translation]
//! cargo xtask diskbench [--ios N] [--reps N] [--only NAME[,NAME...]] [--idle-sleep-us N]
//! ```
//! The demo fills 64 MiB of the disk with verified blocks and runs a short mixed
//! workload (4 KiB random and 128 KiB sequential reads and writes, every block read
//! checked), prints iommud's stats and ends with
//! `disk: strategy=… ios=N verified=N corrupt=0 iops=… faults=0`.
//! The guest tests `guest-disk-*` (see [`crate::tests`]) reuse it. `diskbench` boots one
//! guest per configuration (translation off first; `--reps N` repeats the whole round N
//! times, interleaved, and keeps each job's median-IOPS repetition) and writes
//! `target/diskbench/results.json` and `target/diskbench/iops-ratio.svg`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::demo::{section, start_iommud, STOP_IOMMUD};
use crate::guest::{self, GuestOutput, GuestRun};
use crate::util::{json_num, mkdirs, workspace_root, write_json, Flags, Result};

use benchplot as plot;

/// The controller's address in the guest (after the two NICs).
pub const NVME_BDF: &str = "0000:00:03.0";
/// Size of the raw image.
pub const DISK_MB: u64 = 128;
/// Part of the disk the workloads use.
pub const REGION_MB: u64 = 64;

/// Options of one disk run.
#[derive(Debug, Clone)]
pub struct DiskOpts {
    pub strategy: String,
    pub flush: String,
    pub caching_mode: bool,
    pub no_translation: bool,
    /// `nvmed --job` specs.
    pub jobs: Vec<String>,
    /// More `nvmed` options (e.g. `--idle-sleep-us 50`).
    pub nvmed_extra: String,
}

impl Default for DiskOpts {
    fn default() -> Self {
        DiskOpts {
            strategy: "magazine".into(),
            flush: "percore".into(),
            caching_mode: false,
            no_translation: false,
            jobs: vec!["randrw/4096/16/4000".into(), "seqrw/128k/4/400".into()],
            nvmed_extra: String::new(),
        }
    }
}

/// `target/guest/disks/<name>.raw`, created with `qemu-img` (`fresh`: recreated).
pub fn image(name: &str, fresh: bool) -> Result<PathBuf> {
    let dir = workspace_root().join("target").join("guest").join("disks");
    mkdirs(&dir)?;
    let p = dir.join(format!("{name}.raw"));
    if fresh || !p.exists() {
        let _ = std::fs::remove_file(&p);
        crate::util::run(Command::new("qemu-img").args([
            "create",
            "-q",
            "-f",
            "raw",
            &p.display().to_string(),
            &format!("{DISK_MB}M"),
        ]))?;
    }
    Ok(p)
}

/// The `nvmed` command line for `o` (`extra`: more options).
fn nvmed_cmd(o: &DiskOpts, cmd: &str, extra: &str) -> String {
    let mut s = format!(
        "nvmed {cmd} --bdf {NVME_BDF} --mapper libdma --strategy {} --flush {} --region-mb {REGION_MB}",
        o.strategy, o.flush
    );
    for j in &o.jobs {
        let _ = write!(s, " --job {j}");
    }
    if !o.nvmed_extra.is_empty() {
        let _ = write!(s, " {}", o.nvmed_extra);
    }
    if !extra.is_empty() {
        s.push(' ');
        s.push_str(extra);
    }
    s
}

/// A guest job: iommud, then `nvmed` lines, then the faults and iommud's log.
fn script(o: &DiskOpts, nvmed_lines: &[String]) -> String {
    let mut s = start_iommud(if o.no_translation {
        "--no-translation"
    } else {
        ""
    });
    s.push_str("rc=0\n");
    for l in nvmed_lines {
        let _ = writeln!(s, "{l} || rc=$?");
    }
    s.push_str("echo \"NVMED-EXIT $rc\"\n");
    s.push_str(STOP_IOMMUD);
    s.push_str("exit $rc\n");
    s
}

/// The stats command `--then` runs while the domain is attached.
const THEN_STATS: &str =
    "--then 'echo STATS-BEGIN; iommuctl cat /scheme/iommu/stats; echo STATS-END'";

fn boot(
    name: &str,
    o: &DiskOpts,
    disk: PathBuf,
    lines: &[String],
    secs: u64,
) -> Result<GuestOutput> {
    let run = GuestRun::new(name, script(o, lines))
        .package("iommud")
        .package("nvmed")
        .caching_mode(o.caching_mode)
        .nvme_disk(disk)
        .timeout(Duration::from_secs(secs))
        .echo(false);
    guest::run(&run)
}

/// `key=value` words after `prefix`.
fn fields(line: &str, prefix: &str) -> Option<BTreeMap<String, String>> {
    let rest = line.trim().strip_prefix(prefix)?;
    Some(
        rest.split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

/// One `bench:` line with the `dma:` line after it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobResult {
    pub job: String,
    pub ios: u64,
    pub iops: f64,
    pub mbps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub secs: f64,
    /// I/O queue pairs, one worker (and CPU) each.
    pub queues: u64,
    pub verified: u64,
    /// Corrupt + misplaced + stale blocks.
    pub bad_blocks: u64,
    pub misplaced: u64,
    pub errors: u64,
    /// iommud's blocking round trips for the domain during the job (None: no domain).
    pub ipc_round_trips: Option<u64>,
    pub invalidations: Option<u64>,
    pub maps: u64,
    /// Seconds between nvmed's counter reads around the job (its start and end
    /// included), which `invalidations` covers; `secs` when not printed.
    pub window_secs: Option<f64>,
}

/// Every job's results in the guest's output.
pub fn jobs(out: &GuestOutput) -> Vec<JobResult> {
    let mut v: Vec<JobResult> = Vec::new();
    for l in out.job_lines() {
        let n = |m: &BTreeMap<String, String>, k: &str| -> f64 {
            m.get(k).and_then(|x| x.parse().ok()).unwrap_or(0.0)
        };
        if let Some(f) = fields(l, "bench:") {
            let Some(job) = f.get("job") else { continue };
            v.push(JobResult {
                job: job.clone(),
                ios: n(&f, "ios") as u64,
                iops: n(&f, "iops"),
                mbps: n(&f, "mbps"),
                p50_us: n(&f, "p50_us"),
                p99_us: n(&f, "p99_us"),
                secs: n(&f, "secs"),
                queues: n(&f, "queues") as u64,
                verified: n(&f, "verified") as u64,
                bad_blocks: (n(&f, "corrupt") + n(&f, "misplaced") + n(&f, "stale")) as u64,
                misplaced: n(&f, "misplaced") as u64,
                errors: n(&f, "errors") as u64,
                ..JobResult::default()
            });
        } else if let Some(f) = fields(l, "dma:") {
            if let Some(last) = v
                .last_mut()
                .filter(|r| f.get("job").is_some_and(|j| *j == r.job))
            {
                last.ipc_round_trips = f.get("ipc_round_trips").and_then(|x| x.parse().ok());
                last.invalidations = f.get("invalidations").and_then(|x| x.parse().ok());
                last.maps = n(&f, "maps") as u64;
                last.window_secs = f.get("window_secs").and_then(|x| x.parse().ok());
            }
        }
    }
    v
}

/// iommud's fault lines naming the controller.
pub fn nvme_faults(out: &GuestOutput) -> Vec<String> {
    crate::demo::fault_lines(out)
        .into_iter()
        .filter(|l| l.contains("bdf=00:03.0"))
        .map(str::to_string)
        .collect()
}

fn strategy_name(o: &DiskOpts) -> &str {
    if o.no_translation {
        "noiommu"
    } else {
        &o.strategy
    }
}

/// The summary line of a run.
pub fn summary(o: &DiskOpts, js: &[JobResult], faults: usize) -> String {
    let ios: u64 = js.iter().map(|j| j.ios).sum();
    let verified: u64 = js.iter().map(|j| j.verified).sum();
    let bad: u64 = js.iter().map(|j| j.bad_blocks).sum();
    let misplaced: u64 = js.iter().map(|j| j.misplaced).sum();
    format!(
        "disk: strategy={} flush={} ios={ios} verified={verified} corrupt={bad} misplaced={misplaced} iops={:.1} faults={faults}",
        strategy_name(o),
        o.flush,
        js.first().map_or(0.0, |j| j.iops)
    )
}

/// Problems with a demo-style run: job failed, bad blocks, command errors, faults,
/// nothing verified, and (magazine/percore, caching mode off) round trips or
/// invalidations per 1000 I/Os at or above 2 and 10.
pub fn check(o: &DiskOpts, out: &GuestOutput, js: &[JobResult], faults: usize) -> Vec<String> {
    let mut bad = Vec::new();
    if !out.success() {
        bad.push(format!("job failed: GUEST-EXIT {:?}", out.exit_marker));
    }
    if js.len() != o.jobs.len() {
        bad.push(format!("{} of {} bench lines", js.len(), o.jobs.len()));
    }
    for j in js {
        if j.bad_blocks != 0 || j.errors != 0 {
            bad.push(format!(
                "{}: {} bad blocks, {} command errors",
                j.job, j.bad_blocks, j.errors
            ));
        }
        if j.verified == 0 && j.job.contains("read") {
            bad.push(format!("{}: nothing verified", j.job));
        }
    }
    if faults != 0 {
        bad.push(format!("{faults} DMA fault(s) recorded"));
    }
    if o.strategy == "magazine" && o.flush == "percore" && !o.no_translation && !o.caching_mode {
        // Blocking round trips: < 2 per 1000 I/Os over the run (the first magazines of
        // each size class come from the depot: a few round trips per run, whatever its
        // length). Invalidations: one per sealed batch of 128 unmapped IOVAs, and
        // those that bound the stale window at 10 ms: iommud's timer flushes when the
        // oldest unflushed unmap is 10 ms old, and each worker's CPU seals and flushes
        // its open batches once they are 10 ms old (libdma's client-side bound,
        // docs/ARCHITECTURE.md, "Timers, priorities and storm budgets"). So at this
        // guest's I/O rates the count follows the run time: at most maps / 128 +
        // (workers + 1) x secs / 10 ms (+ 4 at the edges of the job), `secs` being the
        // time the counters were read over (the job's start and end with its I/O).
        let ios: u64 = js.iter().map(|j| j.ios).sum();
        match js.iter().map(|j| j.ipc_round_trips).sum::<Option<u64>>() {
            Some(x) if (x as f64) * 1000.0 / (ios.max(1) as f64) < 2.0 => {}
            other => bad.push(format!(
                "ipc_round_trips {other:?} for {ios} I/Os (want < 2 per 1000)"
            )),
        }
        for j in js {
            let secs = j.window_secs.unwrap_or(j.secs).max(j.secs);
            let windows = (j.queues.max(1) + 1) as f64 * secs / 0.010;
            let bound = j.maps as f64 / 128.0 + windows + 4.0;
            match j.invalidations {
                Some(x) if (x as f64) <= bound => {}
                other => bad.push(format!(
                    "{}: invalidations {other:?} above {bound:.1} (maps / 128 + (workers + 1) x secs / 10 ms + 4)",
                    j.job
                )),
            }
        }
    }
    bad
}

fn per_1000(v: Option<u64>, ios: u64) -> String {
    v.map_or("?".into(), |x| {
        format!("{:.2}", x as f64 * 1000.0 / ios.max(1) as f64)
    })
}

/// Boots one demo-style run on a fresh disk; prints its results; errors on a failure.
fn run_checked(o: &DiskOpts, name: &str, print_stats: bool) -> Result<()> {
    let disk = image(name, true)?;
    let lines = vec![nvmed_cmd(o, "bench", &format!("--fill {THEN_STATS}"))];
    let out = boot(name, o, disk, &lines, 600)?;
    let js = jobs(&out);
    for l in out.job_lines() {
        let t = l.trim();
        if t.starts_with("nvmed:") || t.starts_with("fill:") || t.starts_with("bench:") {
            println!("{t}");
        }
    }
    if print_stats {
        println!("$ iommuctl cat /scheme/iommu/stats");
        for l in section(&out, "STATS") {
            println!("{l}");
        }
    }
    for j in &js {
        println!(
            "  {}: per 1000 I/Os ipc_round_trips={} invalidations={}",
            j.job,
            per_1000(j.ipc_round_trips, j.ios),
            per_1000(j.invalidations, j.ios)
        );
    }
    let faults = crate::demo::fault_lines(&out).len();
    println!("log: {}", out.log_path.display());
    let bad = check(o, &out, &js, faults);
    println!("{}", summary(o, &js, faults));
    if bad.is_empty() {
        Ok(())
    } else {
        Err(format!("{name}: {}", bad.join("; ")))
    }
}

const USAGE: &str = "usage: cargo xtask demo --disk [--strategy magazine|global|identity|va] \
[--flush percore|strict|deferred] [--caching-mode] [--no-translation]";

/// `cargo xtask demo --disk ...` (`args` without `--disk`).
pub fn demo(args: &[String]) -> Result<()> {
    let mut o = DiskOpts::default();
    let mut f = Flags::new(args, USAGE);
    while let Some(a) = f.next_flag() {
        match a {
            "--strategy" => o.strategy = f.value(a)?,
            "--flush" => o.flush = f.value(a)?,
            "--caching-mode" => o.caching_mode = true,
            "--no-translation" => o.no_translation = true,
            _ => return Err(f.unknown(a)),
        }
    }
    if !crate::demo::STRATEGIES.contains(&o.strategy.as_str())
        || !crate::demo::FLUSHES.contains(&o.flush.as_str())
    {
        return Err(format!("unknown strategy or flush policy\n{USAGE}"));
    }
    println!(
        "xtask demo --disk: booting a guest (iommud on VT-d{}, nvmed with libdma {}/{}), NVMe on a {DISK_MB} MiB raw image",
        if o.caching_mode { ", caching mode" } else { "" },
        strategy_name(&o),
        o.flush
    );
    let name = format!(
        "disk-demo-{}{}{}",
        o.strategy,
        if o.caching_mode { "-cm" } else { "" },
        if o.no_translation { "-notrans" } else { "" }
    );
    run_checked(&o, &name, true)
}

/// A guest test: the disk demo with `strategy`/`flush`, caching mode `cm`.
pub fn test(strategy: &str, flush: &str, cm: bool) -> Result<()> {
    let o = DiskOpts {
        strategy: strategy.into(),
        flush: flush.into(),
        caching_mode: cm,
        jobs: if strategy == "magazine" {
            vec!["randrw/4096/16/6000".into(), "seqrw/128k/4/600".into()]
        } else {
            vec!["randrw/4096/8/1000".into(), "seqrw/128k/4/100".into()]
        },
        ..DiskOpts::default()
    };
    let name = format!(
        "test-disk-{strategy}-{flush}{}",
        if cm { "-cm" } else { "" }
    );
    run_checked(&o, &name, false)?;
    println!("{name}: PASS");
    Ok(())
}

/// The fault test: READs whose data pointer or PRP list pointer is an unmapped IOVA are
/// blocked by the IOMMU and both accesses are reported with the controller's BDF; a
/// canary page is intact; the PRP-list command completes with an error status (QEMU
/// completes the one whose data write was blocked as successful); a verified workload
/// then succeeds.
pub fn test_fault() -> Result<()> {
    let o = DiskOpts {
        jobs: vec!["randrw/4096/8/1000".into()],
        ..DiskOpts::default()
    };
    let name = "test-disk-fault";
    let disk = image(name, true)?;
    let lines = vec![nvmed_cmd(&o, "fault", "--fill")];
    let out = boot(name, &o, disk, &lines, 600)?;
    let mut bad = Vec::new();
    for l in out.job_lines() {
        let t = l.trim();
        if t.starts_with("fault:") || t.starts_with("bench:") || t.starts_with("nvmed:") {
            println!("  {t}");
        }
    }
    let canary = out
        .job_lines()
        .find_map(|l| fields(l, "fault: canary"))
        .ok_or("no `fault: canary` line")?;
    if canary.get("changed_bytes").map(String::as_str) != Some("0") {
        bad.push(format!("canary changed: {canary:?}"));
    }
    if canary.get("list_command_failed").map(String::as_str) != Some("yes") {
        bad.push("the READ whose PRP list sits at an unmapped IOVA did not fail".into());
    }
    let faults = nvme_faults(&out);
    for f in &faults {
        println!("  iommud: {f}");
    }
    // The data write into the canary and the PRP list read, both blocked.
    for access in ["access=write", "access=read"] {
        if !faults.iter().any(|f| f.contains(access)) {
            bad.push(format!("iommud recorded no {access} fault for 00:03.0"));
        }
    }
    let js = jobs(&out);
    match js.first() {
        Some(j) if j.verified > 0 && j.bad_blocks == 0 && j.errors == 0 => {}
        other => bad.push(format!("workload after the faults: {other:?}")),
    }
    if !out.success() {
        bad.push(format!("job failed: GUEST-EXIT {:?}", out.exit_marker));
    }
    println!("  log: {}", out.log_path.display());
    if bad.is_empty() {
        println!("{name}: PASS");
        Ok(())
    } else {
        Err(format!("{name}: {}", bad.join("; ")))
    }
}

/// Nothing lost across boots: boot 1 fills the region (generation 4242) with iommud
/// translating (magazine/percore) and flushes; boot 2 reads every block back with
/// translation off, and every one verifies.
pub fn test_across_boots() -> Result<()> {
    const GEN: u64 = 4242;
    let name = "test-disk-boots";
    let disk = image(name, true)?;
    let blocks = REGION_MB << 20 >> 12;
    let w = DiskOpts {
        jobs: vec!["randread/4096/8/500".into()],
        ..DiskOpts::default()
    };
    let out1 = boot(
        &format!("{name}-1"),
        &w,
        disk.clone(),
        &[nvmed_cmd(&w, "bench", &format!("--fill --fill-gen {GEN}"))],
        600,
    )?;
    let j1 = jobs(&out1);
    let r = DiskOpts {
        no_translation: true,
        jobs: vec![format!("seqread/128k/8/{}", blocks / 32)],
        ..DiskOpts::default()
    };
    let out2 = boot(
        &format!("{name}-2"),
        &r,
        disk,
        &[nvmed_cmd(&r, "bench", &format!("--expect-gen {GEN}"))],
        600,
    )?;
    let j2 = jobs(&out2);
    let mut bad = Vec::new();
    if !out1.success() || !out2.success() {
        bad.push(format!(
            "exits {:?} / {:?}",
            out1.exit_marker, out2.exit_marker
        ));
    }
    println!("  boot 1 (translating): {:?}", j1.first());
    println!("  boot 2 (translation off): {:?}", j2.first());
    match j2.first() {
        Some(j) if j.verified == blocks && j.bad_blocks == 0 && j.errors == 0 => {}
        other => bad.push(format!("boot 2 verified {other:?}, want {blocks} blocks")),
    }
    if bad.is_empty() {
        println!("{name}: PASS ({blocks} blocks written in one boot verified in the next)");
        Ok(())
    } else {
        Err(format!(
            "{name}: {} (logs {} {})",
            bad.join("; "),
            out1.log_path.display(),
            out2.log_path.display()
        ))
    }
}

/// One diskbench configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub name: String,
    pub strategy: &'static str,
    pub flush: &'static str,
    pub translate: bool,
}

/// Translation off first, then magazine/percore and the validated strategies.
pub fn configs() -> Vec<Config> {
    let c = |name: &str, strategy, flush, translate| Config {
        name: name.into(),
        strategy,
        flush,
        translate,
    };
    vec![
        c("notrans", "magazine", "percore", false),
        c("magazine-percore", "magazine", "percore", true),
        c("magazine-strict", "magazine", "strict", true),
        c("global-strict", "global", "strict", true),
        c("identity-percore", "identity", "percore", true),
        c("va-percore", "va", "percore", true),
    ]
}

/// The measured jobs for `ios` 4 KiB commands (128 KiB jobs get an eighth).
pub fn bench_jobs(ios: u64) -> Vec<String> {
    let big = (ios / 8).max(8);
    vec![
        format!("randread/4096/32/{ios}"),
        format!("randread/4096/1/{}", (ios / 4).max(8)),
        format!("randwrite/4096/32/{ios}"),
        format!("seqread/128k/8/{big}"),
        format!("seqwrite/128k/8/{big}"),
    ]
}

const BENCH_USAGE: &str = "usage: cargo xtask diskbench [--ios N] [--reps N] \
[--only NAME[,NAME...]] [--idle-sleep-us N]";

/// Per job, the IOPS of every repetition.
fn iops_by_job(runs: &[Vec<JobResult>]) -> BTreeMap<String, Vec<f64>> {
    let mut m: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for js in runs {
        for j in js {
            m.entry(j.job.clone()).or_default().push(j.iops);
        }
    }
    m
}

/// Per job (in the first run's order), the repetition with the median IOPS (the lower
/// of the two middle ones for an even count).
pub fn median_runs(runs: &[Vec<JobResult>]) -> Vec<JobResult> {
    let Some(first) = runs.first() else {
        return Vec::new();
    };
    first
        .iter()
        .filter_map(|j0| {
            let mut all: Vec<&JobResult> = runs
                .iter()
                .filter_map(|js| js.iter().find(|j| j.job == j0.job))
                .collect();
            all.sort_by(|a, b| a.iops.total_cmp(&b.iops));
            all.get((all.len().max(1) - 1) / 2).map(|j| (*j).clone())
        })
        .collect()
}

fn to_json(
    rows: &[(Config, Vec<JobResult>)],
    spreads: &[BTreeMap<String, Vec<f64>>],
) -> Vec<serde_json::Value> {
    let base = rows.iter().find(|(c, _)| !c.translate).map(|(_, j)| j);
    let mut out = Vec::new();
    for (ci, (c, js)) in rows.iter().enumerate() {
        for j in js {
            let reps: Vec<serde_json::Value> = spreads
                .get(ci)
                .and_then(|m| m.get(&j.job))
                .map(|v| v.iter().map(|x| json_num(Some(*x))).collect())
                .unwrap_or_default();
            let b = base.and_then(|b| b.iter().find(|x| x.job == j.job));
            let ratio = b.map(|b| j.iops / b.iops);
            out.push(serde_json::json!({
                "config": c.name,
                "strategy": if c.translate { c.strategy } else { "noiommu" },
                "flush": if c.translate { c.flush } else { "none" },
                "translation": c.translate,
                "job": j.job,
                "ios": j.ios,
                "iops": json_num(Some(j.iops)),
                "mbps": json_num(Some(j.mbps)),
                "p50_us": json_num(Some(j.p50_us)),
                "p99_us": json_num(Some(j.p99_us)),
                "ratio_to_notrans": json_num(ratio),
                "verified": j.verified,
                "bad_blocks": j.bad_blocks,
                "errors": j.errors,
                "maps": j.maps,
                "ipc_round_trips": j.ipc_round_trips,
                "invalidations": j.invalidations,
                "iops_reps": reps,
            }));
        }
    }
    out
}

fn ratio_chart(rows: &[(Config, Vec<JobResult>)]) -> plot::Chart {
    let base = rows.iter().find(|(c, _)| !c.translate).map(|(_, j)| j);
    let groups: Vec<String> = base
        .map(|b| b.iter().map(|j| j.job.clone()).collect())
        .unwrap_or_default();
    plot::Chart {
        title: "nvmed in the QEMU guest (TCG): IOPS relative to translation off".into(),
        x_label: "job (workload/bytes/queue depth)".into(),
        y_label: "IOPS / IOPS with translation off (ratio)".into(),
        groups: groups.clone(),
        series: rows
            .iter()
            .map(|(c, js)| plot::Series {
                name: if c.translate {
                    format!("{} / {}", c.strategy, c.flush)
                } else {
                    "translation off".into()
                },
                values: groups
                    .iter()
                    .map(|g| {
                        let b = base?.iter().find(|j| &j.job == g)?.iops;
                        js.iter().find(|j| &j.job == g).map(|j| j.iops / b)
                    })
                    .collect(),
            })
            .collect(),
        scale: plot::Scale::Linear,
    }
}

/// `cargo xtask diskbench`.
pub fn diskbench(args: &[String]) -> Result<()> {
    let mut ios = 20_000u64;
    let mut reps = 1u64;
    let mut only: Vec<String> = Vec::new();
    let mut extra = String::new();
    let mut f = Flags::new(args, BENCH_USAGE);
    while let Some(a) = f.next_flag() {
        match a {
            "--ios" => ios = f.number(a, 64)?,
            "--reps" => reps = f.number(a, 1)?,
            "--idle-sleep-us" => extra = format!("--idle-sleep-us {}", f.number(a, 0)?),
            "--only" => only = f.value(a)?.split(',').map(str::to_string).collect(),
            _ => return Err(f.unknown(a)),
        }
    }
    let chosen: Vec<Config> = configs()
        .into_iter()
        .filter(|c| only.is_empty() || only.contains(&c.name))
        .collect();
    if chosen.is_empty() {
        return Err(format!("--only matches no configuration\n{BENCH_USAGE}"));
    }
    let jobs_spec = bench_jobs(ios);
    println!(
        "xtask diskbench: {} boots ({} configurations x {reps}, interleaved), jobs {:?} after a 64 MiB fill",
        chosen.len() as u64 * reps,
        chosen.len(),
        jobs_spec
    );
    let mut runs: Vec<Vec<Vec<JobResult>>> = vec![Vec::new(); chosen.len()];
    let mut bad = Vec::new();
    for (ci, c) in (0..reps).flat_map(|_| chosen.iter().enumerate()) {
        let o = DiskOpts {
            strategy: c.strategy.into(),
            flush: c.flush.into(),
            caching_mode: false,
            no_translation: !c.translate,
            jobs: jobs_spec.clone(),
            nvmed_extra: extra.clone(),
        };
        let name = format!("diskbench-{}", c.name);
        let disk = image(&name, true)?;
        let out = boot(&name, &o, disk, &[nvmed_cmd(&o, "bench", "--fill")], 1800)?;
        let js = jobs(&out);
        for j in &js {
            println!(
                "{:<17} {:<20} iops {:>9.1}  MB/s {:>7.2}  p50 {:>8.1} µs  p99 {:>8.1} µs  verified {:>6}  bad {}  per 1000 I/Os: ipc {} inval {}",
                c.name,
                j.job,
                j.iops,
                j.mbps,
                j.p50_us,
                j.p99_us,
                j.verified,
                j.bad_blocks,
                per_1000(j.ipc_round_trips, j.ios),
                per_1000(j.invalidations, j.ios)
            );
        }
        let faults = crate::demo::fault_lines(&out).len();
        if !out.success() || js.len() != jobs_spec.len() || faults != 0 {
            bad.push(format!(
                "{}: exit {:?}, {} of {} jobs, {faults} faults (log {})",
                c.name,
                out.exit_marker,
                js.len(),
                jobs_spec.len(),
                out.log_path.display()
            ));
        }
        if js.iter().any(|j| j.bad_blocks != 0 || j.errors != 0) {
            bad.push(format!("{}: bad blocks or command errors", c.name));
        }
        let _ =
            std::fs::remove_file(workspace_root().join(format!("target/guest/disks/{name}.raw")));
        runs[ci].push(js);
    }
    let rows: Vec<(Config, Vec<JobResult>)> = chosen
        .iter()
        .cloned()
        .zip(runs.iter().map(|r| median_runs(r)))
        .collect();
    let spreads: Vec<BTreeMap<String, Vec<f64>>> = runs.iter().map(|r| iops_by_job(r)).collect();
    let dir = workspace_root().join("target").join("diskbench");
    mkdirs(&dir)?;
    let write = |n: &str, text: String| {
        let p = dir.join(n);
        std::fs::write(&p, text).map_err(|e| format!("{}: {e}", p.display()))
    };
    write_json(&dir.join("results.json"), to_json(&rows, &spreads))?;
    write("iops-ratio.svg", plot::svg(&ratio_chart(&rows)))?;
    println!("wrote {0}/results.json, {0}/iops-ratio.svg", dir.display());
    if let Some((_, base)) = rows.iter().find(|(c, _)| !c.translate) {
        if let Some(b) = base.iter().find(|j| j.job == "randread/4096/32") {
            for (c, js) in rows.iter().filter(|(c, _)| c.translate) {
                if let Some(j) = js.iter().find(|j| j.job == "randread/4096/32") {
                    println!(
                        "randread/4096/32 ratio to translation off (medians of {reps}): {:<17} {:.3}",
                        c.name,
                        j.iops / b.iops
                    );
                }
            }
        }
    }
    if bad.is_empty() {
        Ok(())
    } else {
        Err(format!("diskbench: {}", bad.join("; ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output(console: &str) -> GuestOutput {
        GuestOutput::from_console(console)
    }

    #[test]
    fn parses_bench_and_dma_lines() {
        let o = output(
            "GUEST-START\nnvmed: 0000:00:03.0 up\n\
bench: job=randread/4096/32 queues=2 ios=1000 secs=0.5 iops=2000.0 mbps=8.19 p50_us=10.0 p99_us=40.5 verified=1000 corrupt=0 misplaced=1 stale=2 unwritten=0 errors=0\n\
dma: job=randread/4096/32 maps=1000 unmaps_total=1000 ipc_round_trips=3 client_round_trips=3 invalidations=7 window_secs=0.52\n\
bench: job=seqwrite/131072/8 queues=2 ios=10 secs=1.0 iops=10.0 mbps=1.31 p50_us=1.0 p99_us=2.0 verified=0 corrupt=0 misplaced=0 stale=0 unwritten=0 errors=0\n\
dma: job=seqwrite/131072/8 maps=20 unmaps_total=1020 ipc_round_trips=- client_round_trips=0 invalidations=-\n\
FAULTS-BEGIN\nfault bdf=00:03.0 iova=0x1000 access=write\nfault bdf=00:01.0 iova=0x2000\nFAULTS-END\nGUEST-EXIT 0\n",
        );
        let js = jobs(&o);
        assert_eq!(js.len(), 2);
        assert_eq!(js[0].job, "randread/4096/32");
        assert_eq!(
            (js[0].ios, js[0].verified, js[0].bad_blocks),
            (1000, 1000, 3)
        );
        assert_eq!(
            (js[0].ipc_round_trips, js[0].invalidations),
            (Some(3), Some(7))
        );
        assert_eq!((js[0].iops, js[0].p99_us), (2000.0, 40.5));
        assert_eq!((js[1].ipc_round_trips, js[1].maps), (None, 20));
        assert_eq!((js[0].window_secs, js[1].window_secs), (Some(0.52), None));
        assert_eq!((js[0].queues, js[1].queues), (2, 2));
        assert_eq!(nvme_faults(&o).len(), 1);
        let d = DiskOpts {
            jobs: vec!["a".into(), "b".into()],
            ..DiskOpts::default()
        };
        let s = summary(&d, &js, 0);
        assert_eq!(
            s,
            "disk: strategy=magazine flush=percore ios=1010 verified=1000 corrupt=3 misplaced=1 iops=2000.0 faults=0"
        );
        // Bad blocks, and (magazine/percore) a missing invalidation count, are failures.
        let problems = check(&d, &o, &js, 0);
        assert!(
            problems.iter().any(|p| p.contains("3 bad blocks")),
            "{problems:?}"
        );
        // The 128 KiB job has no counts at all: no round-trip total for the run, and
        // no invalidation count for that job; 7 invalidations for 1000 maps in 0.5 s
        // are within 1000 / 128 + 3 x 50 + 4.
        let has = |s: &str| problems.iter().any(|p| p.contains(s));
        assert!(has("ipc_round_trips None for 1010 I/Os"), "{problems:?}");
        assert!(!has("randread/4096/32: invalidations"), "{problems:?}");
        assert!(has("seqwrite/131072/8: invalidations None"), "{problems:?}");
        assert_eq!(problems.len(), 3, "{problems:?}");
        // With counts everywhere: 3 + 3 round trips in 1010 I/Os are too many.
        let mut js2 = js.clone();
        js2[1].ipc_round_trips = Some(3);
        js2[1].invalidations = Some(1);
        let p2 = check(&d, &o, &js2, 0);
        assert!(
            p2.iter().any(|p| p.contains("Some(6) for 1010 I/Os")),
            "{p2:?}"
        );
        // Two workers: 170 invalidations for 1000 maps are above 1000 / 128 + 3 x 50 +
        // 4 over the I/O's 0.5 s, within 1000 / 128 + 3 x 70 + 4 over a 0.7 s counter
        // window.
        let mut js3 = js.clone();
        js3[0].invalidations = Some(170);
        js3[0].window_secs = None;
        assert!(check(&d, &o, &js3, 0)
            .iter()
            .any(|p| p.contains("randread/4096/32: invalidations Some(170)")));
        js3[0].window_secs = Some(0.7);
        assert!(!check(&d, &o, &js3, 0)
            .iter()
            .any(|p| p.contains("randread/4096/32: invalidations")));
        js2[0].ipc_round_trips = Some(1);
        js2[1].ipc_round_trips = Some(0);
        assert!(!check(&d, &o, &js2, 0).iter().any(|p| p.contains("round")));
    }

    #[test]
    fn median_of_repetitions() {
        let j = |iops: f64| JobResult {
            job: "randread/4096/32".into(),
            iops,
            ..JobResult::default()
        };
        let runs = vec![vec![j(30.0)], vec![j(10.0)], vec![j(20.0)]];
        assert_eq!(median_runs(&runs)[0].iops, 20.0);
        assert_eq!(median_runs(&runs[..2])[0].iops, 10.0);
        assert_eq!(
            iops_by_job(&runs)["randread/4096/32"],
            vec![30.0, 10.0, 20.0]
        );
        assert!(median_runs(&[]).is_empty());
    }

    #[test]
    fn commands_and_script() {
        let o = DiskOpts::default();
        let c = nvmed_cmd(&o, "bench", "--fill");
        assert!(c.starts_with("nvmed bench --bdf 0000:00:03.0 --mapper libdma --strategy magazine"));
        assert!(c.contains("--job randrw/4096/16/4000 --job seqrw/128k/4/400 --fill"));
        let s = script(
            &DiskOpts {
                no_translation: true,
                ..o
            },
            &[c],
        );
        assert!(s.contains("--no-translation"));
        assert!(s.contains("|| rc=$?"));
        assert_eq!(bench_jobs(800)[3], "seqread/128k/8/100");
        assert_eq!(configs()[0].name, "notrans");
    }
}
