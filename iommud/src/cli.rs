//! The `iommud` command line: the daemon's `main` (in the library, so the
//! end-to-end tests in `systest` can run the same daemon as a binary of theirs).
//!
//! ```text
//! iommud [--platform sim|linux] [--socket PATH] [--config FILE] [--no-translation]
//!        [--no-reclaim] [--caching-mode] [--coherent] [--sim-inval-latency-ns N] [--sim-mem-mb N]
//!        [--timeout-ms N] [--service-threads N] [--ring-spin-us N] [--service-cpus LIST]
//!        [--lazy-hold-us N] [--state-dir DIR] [--grace-ms N]
//! ```
//! `--service-threads` (default 1) threads serve the clients' rings, each
//! polling `--ring-spin-us` (default 2000) after the last entry before it
//! sleeps on the doorbells, pinned to the CPUs of `--service-cpus` (e.g. `1`
//! or `2,3`: thread `k` on the `k`-th; default: not pinned), each ring served
//! by its home thread, the one on its clients' CPU where there is one
//! (docs/ARCHITECTURE.md, "Rings and service threads"). A `strict` pass of lazy entries (a NIC's RX refill) is held,
//! its invalidation and completions after other work, for at most
//! `--lazy-hold-us` (default 200, at most 10 s; 0: never held).
//! `--state-dir` (linux) is where the memory the unit may reach lives, in
//! files that outlive the process (default: `iommud/` on the hugetlbfs mount,
//! else `/dev/shm/iommud`; see `crate::persist`). A restarted iommud adopts
//! the magazine and `static` domains the previous one left there and holds each
//! for its driver `--grace-ms` (default 30000) before blocking the device
//! (`crate::restart`).
//! `--config` names the administrator's policy (TOML, see `crate::policy`);
//! without it every device gets validated trust and only root administers.
//! On `sim`, device ownership is proven with the files iommud creates in
//! `devices/` beside the socket (mode 0600; chown one to hand it to a driver).
//! `--coherent` (sim only) makes the simulated unit report ECAP.C = 1, so
//! neither iommud nor libdma flushes CPU cache lines after table writes; the
//! default is C = 0, as QEMU reports.
//! It logs to stderr and serves until `iommuctl stop` (or SIGTERM).

use crate::hw::{Mmio, PhysMem};
use crate::platform::proof::Authority;
use crate::session::State;
use crate::unit::{Iommu, UnitConfig};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

struct Args {
    platform: String,
    socket: PathBuf,
    translate: bool,
    reclaim: bool,
    caching_mode: bool,
    coherent: bool,
    sim_inval_latency_ns: u64,
    sim_mem_mb: usize,
    timeout_ms: u64,
    config: Option<PathBuf>,
    service_threads: usize,
    ring_spin_us: u64,
    lazy_hold_us: u64,
    service_cpus: Vec<usize>,
    state_dir: Option<PathBuf>,
    grace_ms: u64,
}

const USAGE: &str = "usage: iommud [--platform sim|linux] [--socket PATH] [--config FILE] \
[--no-translation] [--no-reclaim] [--caching-mode] [--coherent] [--sim-inval-latency-ns N] \
[--sim-mem-mb N] [--timeout-ms N] [--service-threads N] [--ring-spin-us N] [--service-cpus LIST] \
[--lazy-hold-us N] [--state-dir DIR] [--grace-ms N]";

fn parse_args() -> Result<Args, String> {
    use lexopt::prelude::*;
    let mut a = Args {
        platform: "linux".into(),
        socket: PathBuf::from(iommu_abi::DEFAULT_SOCKET),
        translate: true,
        reclaim: true,
        caching_mode: false,
        coherent: false,
        sim_inval_latency_ns: 0,
        sim_mem_mb: 256,
        timeout_ms: 1000,
        config: None,
        service_threads: 1,
        ring_spin_us: crate::service::DEFAULT_SPIN.as_micros() as u64,
        lazy_hold_us: iommu_abi::ring::LAZY_HOLD_US,
        service_cpus: Vec::new(),
        state_dir: None,
        grace_ms: crate::state::DEFAULT_GRACE.as_millis() as u64,
    };
    let e = |e: lexopt::Error| format!("{e} (try --help)");
    let mut p = lexopt::Parser::from_env();
    while let Some(arg) = p.next().map_err(e)? {
        match arg {
            Long("platform") => a.platform = p.value().map_err(e)?.string().map_err(e)?,
            Long("socket") => a.socket = p.value().map_err(e)?.into(),
            Long("config") => a.config = Some(p.value().map_err(e)?.into()),
            Long("state-dir") => a.state_dir = Some(p.value().map_err(e)?.into()),
            Long("grace-ms") => a.grace_ms = p.value().map_err(e)?.parse().map_err(e)?,
            Long("no-translation") => a.translate = false,
            Long("no-reclaim") => a.reclaim = false,
            Long("caching-mode") => a.caching_mode = true,
            Long("coherent") => a.coherent = true,
            Long("sim-inval-latency-ns") => {
                a.sim_inval_latency_ns = p.value().map_err(e)?.parse().map_err(e)?
            }
            Long("sim-mem-mb") => a.sim_mem_mb = p.value().map_err(e)?.parse().map_err(e)?,
            Long("timeout-ms") => a.timeout_ms = p.value().map_err(e)?.parse().map_err(e)?,
            Long("service-threads") => {
                a.service_threads = p.value().map_err(e)?.parse().map_err(e)?;
                if !(1..=16).contains(&a.service_threads) {
                    return Err("--service-threads must be 1..=16".into());
                }
            }
            Long("ring-spin-us") => a.ring_spin_us = p.value().map_err(e)?.parse().map_err(e)?,
            Long("lazy-hold-us") => a.lazy_hold_us = p.value().map_err(e)?.parse().map_err(e)?,
            Long("service-cpus") => {
                let v = p.value().map_err(e)?.string().map_err(e)?;
                a.service_cpus = v
                    .split(',')
                    .map(|c| c.trim().parse::<usize>())
                    .collect::<Result<_, _>>()
                    .map_err(|_| format!("--service-cpus {v:?}: a comma-separated list of CPUs"))?;
            }
            Short('h') | Long("help") => return Err(USAGE.into()),
            _ => return Err(e(arg.unexpected())),
        }
    }
    Ok(a)
}

extern "C" fn on_term(_: libc::c_int) {
    STOP.store(true, std::sync::atomic::Ordering::SeqCst);
}
static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn run(a: Args) -> Result<(), String> {
    // The policy before the hardware: a bad file must not leave a unit on.
    let policy = match &a.config {
        Some(p) => crate::policy::Policy::load(p)?,
        None => crate::policy::Policy::default(),
    };
    let cfg = UnitConfig {
        translate: a.translate,
        timeout: Duration::from_millis(a.timeout_ms),
    };
    #[cfg(target_os = "linux")]
    let mut state_dir: Option<crate::persist::StateDir> = None;
    #[cfg(target_os = "linux")]
    let mut adoptions = Vec::new();
    let (mmio, mem, sim_fds): (Box<dyn Mmio>, Arc<dyn PhysMem>, _) = match a.platform.as_str() {
        "sim" => {
            let sc = vtd::sim::SimConfig {
                mem_bytes: a.sim_mem_mb << 20,
                caching_mode: a.caching_mode,
                coherent: a.coherent,
                inval_latency_ns: a.sim_inval_latency_ns,
                ..Default::default()
            };
            let p = Arc::new(
                crate::platform::sim::SimPlatform::new(sc)
                    .map_err(|e| format!("sim platform: {e}"))?,
            );
            let m = p.machine().clone();
            let (mf, sf) = m.fds();
            let dup = |f: std::os::fd::BorrowedFd<'_>| f.try_clone_to_owned().map(Arc::new);
            let fds = (
                dup(mf).map_err(|e| e.to_string())?,
                dup(sf).map_err(|e| e.to_string())?,
                m.mem_len() as u64,
            );
            (Box::new(crate::platform::sim::SimMmio(m)), p, Some(fds))
        }
        #[cfg(target_os = "linux")]
        "linux" => {
            if a.coherent {
                return Err("--coherent is a property of the hardware on linux (ECAP.C)".into());
            }
            if a.caching_mode {
                return Err(
                    "--caching-mode is a property of the hardware on linux (QEMU: caching-mode=on)"
                        .into(),
                );
            }
            let mmio =
                crate::platform::linux::discover().map_err(|e| format!("VT-d discovery: {e}"))?;
            // Memory the unit may reach lives in named files that outlive this process
            // (crate::persist; docs/ARCHITECTURE.md, "Stop, crash and restart").
            let dir = a
                .state_dir
                .clone()
                .unwrap_or_else(crate::persist::default_dir);
            let mut sd = crate::persist::StateDir::open(&dir)?;
            let mem = crate::platform::linux::HugeMem::in_dir(sd.path(), sd.pages(), sd.prefix())
                .map_err(|e| format!("DMA memory in {}: {e}", dir.display()))?;
            let (n, bytes) = sd.stale();
            crate::unit::log::info(&format!(
                "state dir {} ({:?} pages): {n} file(s), {} KiB, left by a previous iommud",
                dir.display(),
                mem.source(),
                bytes >> 10
            ));
            // The domains the previous iommud left, their memory taken back
            // before the unit is (docs/ARCHITECTURE.md, "Stop, crash and restart").
            if cfg.translate {
                adoptions = crate::restart::prepare(&mut sd, &mem);
            }
            state_dir = Some(sd);
            (Box::new(mmio), Arc::new(mem), None)
        }
        other => return Err(format!("unknown platform {other:?} (sim or linux)")),
    };
    #[cfg(target_os = "linux")]
    let carry = crate::restart::carried(&adoptions);
    #[cfg(not(target_os = "linux"))]
    let carry = Vec::new();
    let unit = Iommu::init_carrying(mmio, mem, &cfg, &carry)
        .map_err(|e| format!("bringing up VT-d: {e}"))?;
    // Ledgers where memory outlives the process (a state directory).
    #[cfg(target_os = "linux")]
    unit.set_journal(state_dir.is_some() && cfg.translate);
    let mut state = State::new(
        Arc::new(unit),
        if sim_fds.is_some() { "sim" } else { "linux" },
        a.reclaim,
    );
    state.authority = if sim_fds.is_some() {
        let dir = iommu_abi::proof::sim_device_dir(&a.socket)
            .ok_or("the socket path has no directory for the device files")?;
        Authority::make_sim_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?
    } else {
        Authority::Sysfs
    };
    state.sim_fds = sim_fds;
    state.service = crate::service::Service::new(
        a.service_threads,
        Duration::from_micros(a.ring_spin_us.min(1_000_000)),
    );
    state.service.cpus = a.service_cpus;
    state.service.lazy_hold = Duration::from_micros(a.lazy_hold_us.min(10_000_000));
    crate::unit::log::info(&policy.describe());
    state.set_policy(policy);
    let state = Arc::new(state);
    #[cfg(target_os = "linux")]
    crate::restart::adopt_all(&state, adoptions, Duration::from_millis(a.grace_ms));
    // The unit now walks our root and tables only (every adopted device was
    // moved to new tables, the rest blocked, all invalidated): what a
    // previous iommud left and nobody adopted may go.
    #[cfg(target_os = "linux")]
    if let Some(sd) = state_dir.as_mut() {
        let (n, bytes) = sd.release_stale();
        if n > 0 {
            crate::unit::log::info(&format!(
                "released {n} memory file(s), {} KiB, of a previous iommud",
                bytes >> 10
            ));
        }
    }
    // SAFETY: installing an async-signal-safe handler (it only stores an atomic).
    unsafe {
        libc::signal(libc::SIGTERM, on_term as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_term as *const () as libc::sighandler_t);
    }
    {
        let st = state.clone();
        std::thread::spawn(move || loop {
            if STOP.load(std::sync::atomic::Ordering::SeqCst) {
                st.stop.store(true, std::sync::atomic::Ordering::SeqCst);
                return;
            }
            // A signal's stop is noticed within 200 ms (few wake-ups when idle).
            std::thread::sleep(Duration::from_millis(200));
        });
    }
    let r = crate::server::serve(state, &a.socket)
        .map_err(|e| format!("serving {}: {e}", a.socket.display()));
    // The state directory's lock is held until the process ends.
    #[cfg(target_os = "linux")]
    drop(state_dir);
    r
}

/// The daemon: parses `std::env::args`, brings the unit up, serves.
pub fn main() -> ExitCode {
    match parse_args().and_then(run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("iommud: {e}");
            ExitCode::FAILURE
        }
    }
}
