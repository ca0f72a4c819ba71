//! `nvmed`: the NVMe driver's jobs.
//!
//! ```text
//! nvmed info  [--bdf BDF] [--mapper phys|libdma] [--strategy S] [--flush F] [--socket PATH]
//! nvmed bench [--bdf BDF] [--mapper phys|libdma] [--strategy S] [--flush F] [--socket PATH]
//!             [--queues N] [--region-mb M] [--fill] [--fill-gen G] [--expect-gen G]
//!             [--job NAME/BS/QD/IOS]... [--idle-sleep-us N] [--then SHELL-COMMAND]
//! nvmed fault [--bdf BDF] [--mapper libdma] ...
//! ```
//! `bench` resets the controller, creates one I/O queue pair per CPU (`--queues`,
//! default: every online CPU), gives each a worker pinned to its CPU and a disjoint part
//! of the first `--region-mb` MiB (default 64) of namespace 1, optionally fills the region
//! (`--fill`: sequential 128 KiB writes of generation `--fill-gen`, default 1), then runs
//! each `--job` (`randread|randwrite|randrw|seqread|seqwrite|seqrw`, bytes per command,
//! queue depth per queue, commands in total; default `randrw/4096/8/2000`) and prints one
//! `bench: job=… iops=… mbps=… p50_us=… p99_us=… verified=N corrupt=0 misplaced=0 …` line
//! per job, with `dma: maps=… unmaps=…` and, with libdma, the domain's
//! `ipc_round_trips` and `invalidations` during the job. `--expect-gen G` says every
//! block already holds generation G (written by an earlier boot). A worker that finds no
//! completion 64 times in a row sleeps `--idle-sleep-us` µs (default 50; 0: it only
//! yields its CPU). Under TCG a spinning vCPU takes host CPU from QEMU's device model:
//! measured, 4 KiB random reads at QD32 went from 9.1 k to 30.2 k IOPS with the sleep. Exit status 1 if any
//! block was corrupt, misplaced or stale, or any command failed.
//!
//! `fault` fills a canary page of DMA memory nobody maps, submits a READ whose PRP1 is
//! the canary's physical address used as an IOVA (and one whose PRP list pointer is
//! such an address), prints each completion's status and
//! `fault: canary addr=… changed_bytes=N data_command=… list_command_failed=yes|no`,
//! then runs the jobs to show the controller still works.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[cfg(target_os = "linux")]
use e1000d::PhysMapper;
use e1000d::{DmaMapper, LibdmaMapper};
use libdma::{DmaDomain, FlushPolicy, Strategy};
use nvmed::bench::{self, Job, Worker};
use nvmed::cmd::Prp;
use nvmed::io::IoQueue;
use nvmed::pattern::BLOCK;
use nvmed::Nvme;

const USAGE: &str = "usage: nvmed info|bench|fault [--bdf BDF] [--mapper phys|libdma] \
[--strategy magazine|global|identity|va] [--flush percore|strict|deferred] [--socket PATH] \
[--queues N] [--region-mb M] [--fill] [--fill-gen G] [--expect-gen G] [--job NAME/BS/QD/IOS]... \
[--idle-sleep-us N] [--then CMD]";

#[derive(Debug)]
struct Opts {
    cmd: String,
    bdf: String,
    mapper: String,
    strategy: Strategy,
    flush: FlushPolicy,
    socket: PathBuf,
    queues: Option<usize>,
    region_mb: u64,
    fill: bool,
    fill_gen: u64,
    expect_gen: u64,
    jobs: Vec<Job>,
    then: Option<String>,
    idle_sleep_us: u64,
}

fn parse_u64(s: &str) -> Result<u64, String> {
    s.parse().map_err(|_| format!("not a number: {s:?}"))
}

fn parse(args: &[String]) -> Result<Opts, String> {
    let mut it = args.iter();
    let cmd = it.next().cloned().ok_or(USAGE)?;
    if !["info", "bench", "fault"].contains(&cmd.as_str()) {
        return Err(format!("unknown command {cmd:?}\n{USAGE}"));
    }
    let mut o = Opts {
        cmd,
        bdf: "0000:00:03.0".into(),
        mapper: "libdma".into(),
        strategy: Strategy::Magazine,
        flush: FlushPolicy::PerCore,
        socket: PathBuf::from(libdma::DEFAULT_SOCKET),
        queues: None,
        region_mb: 64,
        fill: false,
        fill_gen: 1,
        expect_gen: 0,
        jobs: Vec::new(),
        then: None,
        idle_sleep_us: 50,
    };
    use lexopt::prelude::*;
    let mut p = lexopt::Parser::from_args(it);
    let lex = |e: lexopt::Error| format!("{e}\n{}", USAGE);
    while let Some(arg) = p.next().map_err(lex)? {
        let name = match arg {
            Long(n) => format!("--{n}"),
            other => return Err(lex(other.unexpected())),
        };
        let mut val = || -> std::result::Result<String, String> {
            p.value().and_then(|v| v.string()).map_err(lex)
        };
        match name.as_str() {
            "--bdf" => o.bdf = val()?,
            "--mapper" => o.mapper = val()?,
            "--strategy" => {
                let v = val()?;
                o.strategy = Strategy::parse(&v).ok_or(format!("unknown strategy {v:?}"))?
            }
            "--flush" => {
                let v = val()?;
                o.flush = FlushPolicy::parse(&v).ok_or(format!("unknown flush policy {v:?}"))?
            }
            "--socket" => o.socket = PathBuf::from(val()?),
            "--queues" => o.queues = Some(parse_u64(&val()?)?.max(1) as usize),
            "--region-mb" => o.region_mb = parse_u64(&val()?)?.max(1),
            "--fill" => o.fill = true,
            "--fill-gen" => o.fill_gen = parse_u64(&val()?)?.max(1),
            "--expect-gen" => o.expect_gen = parse_u64(&val()?)?,
            "--job" => o.jobs.push(Job::parse(&val()?)?),
            "--then" => o.then = Some(val()?),
            "--idle-sleep-us" => o.idle_sleep_us = parse_u64(&val()?)?,
            _ => return Err(format!("unknown option {name:?}\n{USAGE}")),
        }
    }
    if !["phys", "libdma"].contains(&o.mapper.as_str()) {
        return Err(format!("unknown mapper {:?} (phys|libdma)", o.mapper));
    }
    if o.jobs.is_empty() {
        o.jobs.push(Job::parse("randrw/4096/8/2000")?);
    }
    Ok(o)
}

/// Attaches to the controller's iommud domain: the one place that talks to iommud's
/// attach (socket on Linux, the iommu scheme on Redox).
fn attach(o: &Opts) -> Result<LibdmaMapper, String> {
    let sid = o
        .bdf
        .parse::<linuxhw::pci::Bdf>()
        .map_err(|e| format!("{}: {e}", o.bdf))?
        .source_id();
    #[cfg(not(target_os = "redox"))]
    let m = LibdmaMapper::connect(&o.socket, sid, o.strategy, o.flush)
        .map_err(|e| format!("{}: iommud at {}: {e}", o.bdf, o.socket.display()));
    #[cfg(target_os = "redox")]
    let m = DmaDomain::open(sid, o.strategy, o.flush)
        .map(LibdmaMapper::from_domain)
        .map_err(|e| format!("{}: iommu scheme: {e}", o.bdf));
    m
}

/// The domain's counters (`key value` lines), empty without one.
fn domain_stats(dom: Option<&DmaDomain>, bdf: &str) -> BTreeMap<String, u64> {
    let Some(d) = dom else {
        return BTreeMap::new();
    };
    d.read_path(&format!("domains/{bdf}/stats"))
        .map(|t| {
            t.lines()
                .filter_map(|l| {
                    let (k, v) = l.split_once(' ')?;
                    Some((k.to_string(), v.trim().parse().ok()?))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn short_bdf(bdf: &str) -> String {
    // iommud names domains `bb:dd.f`.
    bdf.strip_prefix("0000:").unwrap_or(bdf).to_string()
}

#[cfg(target_os = "redox")]
mod redox;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // Started by pcid-spawner on Redox: drive the function it names.
    #[cfg(target_os = "redox")]
    if std::env::var_os(e1000d::pcid::PCID_CHANNEL_ENV).is_some() {
        return match redox::run() {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::from(1),
            Err(e) => {
                eprintln!("nvmed: {e}");
                ExitCode::from(2)
            }
        };
    }
    let o = match parse(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("nvmed: {e}");
            return ExitCode::from(2);
        }
    };
    let r = match phys_run(&o) {
        Some(r) => r,
        None => attach(&o).and_then(|m| {
            let d = m.domain();
            run(&o, Arc::new(m), Some(d))
        }),
    };
    match r {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("nvmed: {e}");
            println!("nvmed: error: {e}");
            ExitCode::from(1)
        }
    }
}

/// Translation off (IOVA = physical address, `--mapper phys`): needs
/// Linux's pagemap; `None` when another mapper was asked for.
#[cfg(target_os = "linux")]
fn phys_run(o: &Opts) -> Option<Result<bool, String>> {
    (o.mapper == "phys").then(|| run(o, Arc::new(PhysMapper::new()), None))
}

#[cfg(not(target_os = "linux"))]
fn phys_run(_o: &Opts) -> Option<Result<bool, String>> {
    None
}

fn run<M: DmaMapper + Send + Sync + 'static>(
    o: &Opts,
    mapper: Arc<M>,
    dom: Option<Arc<DmaDomain>>,
) -> Result<bool, String> {
    let bdf = &o.bdf;
    let t0 = Instant::now();
    let mut nvme = Nvme::open(bdf, mapper.clone(), 1).map_err(|e| format!("{bdf}: {e}"))?;
    let how = match &dom {
        Some(d) => format!(
            "libdma strategy {} flush {}{}",
            d.strategy().name(),
            d.flush_policy().name(),
            if d.caching_mode() {
                " caching-mode"
            } else {
                ""
            }
        ),
        None => "phys".into(),
    };
    println!(
        "nvmed: {bdf} up in {} ms: VS {:#x} model {:?} serial {:?} mdts {} nn {}; ns 1: {} blocks of {} B; mapper {how}",
        t0.elapsed().as_millis(),
        nvme.version().unwrap_or(0),
        nvme.ident.model,
        nvme.ident.serial,
        nvme.ident.mdts,
        nvme.ident.nn,
        nvme.ns.nsze,
        nvme.ns.block_size
    );
    if o.cmd == "info" {
        nvme.shutdown().map_err(|e| e.to_string())?;
        return Ok(true);
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let want = o.queues.unwrap_or(cpus);
    let qps = nvme
        .create_io_queues(want as u16)
        .map_err(|e| e.to_string())?;
    let lba = u64::from(nvme.ns.block_size);
    let region_lbas = (o.region_mb << 20) / lba;
    if region_lbas > nvme.ns.nsze || nvme.ns.block_size as usize > BLOCK {
        return Err(format!(
            "region of {} MiB does not fit namespace 1 ({} blocks of {lba} B)",
            o.region_mb, nvme.ns.nsze
        ));
    }
    let units_total = (o.region_mb << 20) / BLOCK as u64;
    let per_worker = units_total / qps.len() as u64;
    let mut workers = Vec::new();
    for (i, qp) in qps.into_iter().enumerate() {
        let q = IoQueue::new(qp, mapper.clone(), nvme.nsid, nvme.ns.block_size)
            .map_err(|e| e.to_string())?;
        let first = i as u64 * per_worker * (BLOCK as u64 / lba);
        let mut w = Worker::new(q, &mapper, i % cpus, first, per_worker, o.expect_gen)
            .map_err(|e| e.to_string())?;
        w.idle_sleep = (o.idle_sleep_us > 0).then(|| Duration::from_micros(o.idle_sleep_us));
        workers.push(w);
    }
    println!(
        "nvmed: {} I/O queue pairs of {} entries, workers pinned to CPUs 0..{}, region {} MiB",
        workers.len(),
        nvmed::ctrl::IO_ENTRIES,
        workers.len().min(cpus),
        o.region_mb
    );
    let sbdf = short_bdf(bdf);
    let mut good = true;
    if o.cmd == "fault" {
        good &= fault(&mut workers, &mapper)?;
    }
    if o.fill {
        let mut fill = Job::parse(&format!("seqwrite/128k/8/{}", units_total.div_ceil(32)))?;
        fill.set_gen = Some(o.fill_gen);
        let s = bench::run_job(&mut workers, &fill).map_err(|e| e.to_string())?;
        println!(
            "fill: gen={} ios={} secs={:.3} mbps={:.2} errors={}",
            o.fill_gen,
            s.ios,
            s.secs,
            s.bytes as f64 / s.secs.max(1e-9) / 1e6,
            s.errors
        );
        good &= s.clean();
        // Let iommud's epoch timer (2 ms) flush the fill's unmapped IOVAs before the
        // first measured job, so its counters are the job's own.
        std::thread::sleep(Duration::from_millis(100));
    }
    for (k, job) in o.jobs.iter().enumerate() {
        if k > 0 && dom.is_some() {
            // As after the fill: the previous job's last unmaps are flushed by
            // iommud's timer before this job's counters start, so its
            // invalidations are its own.
            std::thread::sleep(Duration::from_millis(100));
        }
        // The counters' window: from the read before the job to the read after
        // it (the job's own `secs` count its I/O only, not its start and end).
        let window = Instant::now();
        let before = domain_stats(dom.as_deref(), &sbdf);
        let maps0: u64 = workers.iter_mut().map(|w| w.queue().maps).sum();
        let rt0 = dom.as_ref().map_or(0, |d| d.counts().round_trips);
        let s = bench::run_job(&mut workers, job).map_err(|e| e.to_string())?;
        let after = domain_stats(dom.as_deref(), &sbdf);
        let window_secs = window.elapsed().as_secs_f64();
        let maps1: u64 = workers.iter_mut().map(|w| w.queue().maps).sum();
        let unmaps: u64 = workers.iter_mut().map(|w| w.queue().unmaps).sum();
        let rt1 = dom.as_ref().map_or(0, |d| d.counts().round_trips);
        println!("{}", s.line(job, workers.len()));
        let delta = |k: &str| match (before.get(k), after.get(k)) {
            (Some(a), Some(b)) => format!("{}", b.saturating_sub(*a)),
            _ => "-".into(),
        };
        println!(
            "dma: job={} maps={} unmaps_total={} ipc_round_trips={} client_round_trips={} invalidations={} timer_flushes={} hints={} window_secs={window_secs:.3}",
            job.name(),
            maps1 - maps0,
            unmaps,
            delta("ipc_round_trips"),
            rt1 - rt0,
            delta("invalidations"),
            delta("timer_flushes"),
            delta("ipc_wakeups")
        );
        if let Some(e) = &s.first_error {
            println!("bench: first error: {e}");
        }
        good &= s.clean();
    }
    if let Some(d) = &dom {
        if let Ok(text) = d.read_path(&format!("domains/{sbdf}/stats")) {
            for l in text.lines() {
                println!("domain {sbdf} {l}");
            }
        }
    }
    if let Some(cmd) = &o.then {
        let _ = std::process::Command::new("sh").arg("-c").arg(cmd).status();
    }
    drop(workers);
    nvme.shutdown().map_err(|e| e.to_string())?;
    Ok(good)
}

/// The fault test on the first worker's queue: two READs whose data or PRP list pointer
/// is an address nobody mapped (the physical address of a canary page).
fn fault<M: DmaMapper + Send + Sync>(
    workers: &mut [Worker<M>],
    mapper: &Arc<M>,
) -> Result<bool, String> {
    const PATTERN: u8 = 0xa5;
    let canary = mapper.alloc(4096).map_err(|e| e.to_string())?;
    // SAFETY: canary is 4096 bytes of DMA memory nobody maps; raw fill.
    unsafe { std::ptr::write_bytes(canary.as_ptr(), PATTERN, 4096) };
    let addr = canary.phys();
    let w = workers.first_mut().ok_or("no I/O queue")?;
    let q = w.queue();
    let nlb = (BLOCK as u32 / q.lba_size) as u16;
    // What each command completed with (true = success).
    let mut statuses = Vec::new();
    for (tag, prp) in [
        // 4 KiB: the device writes the data to PRP1, the canary's address.
        (
            1u64,
            Prp {
                prp1: addr,
                prp2: 0,
            },
        ),
        // 16 KiB: PRP2 must point at a PRP list; it points at the canary instead, so
        // the device's first access is a read of the list.
        (
            2u64,
            Prp {
                prp1: addr,
                prp2: addr,
            },
        ),
    ] {
        let n = if tag == 1 { nlb } else { nlb * 4 };
        q.submit_raw_read(0, n, prp, tag)
            .map_err(|e| e.to_string())?;
        let start = Instant::now();
        loop {
            if let Some(d) = q.poll().map_err(|e| e.to_string())? {
                println!(
                    "fault: read{} prp1={addr:#x} prp2={:#x} status sct={:#x} sc={:#04x} ({}) dnr={}",
                    tag,
                    prp.prp2,
                    d.cqe.sct(),
                    d.cqe.sc(),
                    nvmed::cmd::status_name(d.cqe.sct(), d.cqe.sc()),
                    d.cqe.dnr()
                );
                statuses.push(d.cqe.ok());
                // QEMU's VT-d drops ("compresses") a device's new fault while an
                // earlier one of the same device is still in the fault record:
                // give iommud (2 ms ticker) time to take the record before the
                // next blocked command, so each one is recorded.
                std::thread::sleep(Duration::from_millis(50));
                break;
            }
            if start.elapsed() > Duration::from_secs(10) {
                return Err(format!(
                    "fault read {tag}: no completion within 10 s (I/O completion queue {} phase tag)",
                    q.qid()
                ));
            }
            std::thread::yield_now();
        }
    }
    let mut changed = 0usize;
    for i in 0..4096 {
        // SAFETY: i < 4096, inside the canary; volatile because a device may have
        // written it.
        if unsafe { canary.as_ptr().add(i).read_volatile() } != PATTERN {
            changed += 1;
        }
    }
    // QEMU's NVMe model completes a command whose data write was blocked as successful
    // (measured; the loss is visible only in iommud's faults and in the data), and fails
    // one whose PRP list read was blocked with Data Transfer Error.
    let list_failed = statuses.get(1) == Some(&false);
    println!(
        "fault: canary addr={addr:#x} changed_bytes={changed} data_command={} list_command_failed={}",
        if statuses.first() == Some(&true) {
            "success"
        } else {
            "error"
        },
        if list_failed { "yes" } else { "no" }
    );
    Ok(changed == 0 && list_failed)
}
