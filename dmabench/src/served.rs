//! Rows served by a real `iommud --platform sim` daemon, one per row, with
//! `libdma` clients in separate processes.
//!
//! Every [`Strategy`] × [`FlushPolicy`] the library lists becomes a
//! backend; combinations iommud refuses at attach are found by a probe
//! attach when the row's daemon starts, and skipped with iommud's reason.
//! `Strategy::NoIommu` (translation off for the device: `map` returns the
//! physical address) appears once, as `libdma-noiommu / none`, to show the
//! library's own cost next to the bare `noiommu` peer.
//!
//! Every row runs on a sim unit started with `--coherent` (ECAP.C = 1: table
//! walks snoop the CPU caches, as on most server IOMMUs), which is what the
//! peers assume too: they write entries without cache-line write-backs. The
//! extra row `magazine-noncoherent / percore` is the research's design on
//! the unit QEMU models (ECAP.C = 0), where every entry write must be written
//! back to memory: the difference to `magazine / percore` is that cost.
//!
//! Client process `p` attaches the device `00:0(p+1).0`; each of its
//! threads maps and unmaps its own 128 KiB buffer from `DmaDomain::alloc`.
//! Counters are per process, read at the start and the end of the timed
//! interval: blocking round trips and one-way wake-ups from the client's
//! own counts, shared-lock acquisitions and IOTLB invalidations from
//! iommud's `domains/<bdf>/stats`, and page-table pages live at the end.
//! The stats reads themselves (a round trip and a domain-lock acquisition
//! each) are subtracted.

use std::hint::black_box;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libdma::{Control, Dir, DmaBuffer, DmaDomain, FlushPolicy, Strategy};

use crate::harness::{Backend, Client, ClientEnv, Counters, Daemon, PairRunner};
use crate::peers::MAX_PAGES;

const PAGE: u64 = 4096;
/// Device the probe attach uses (00:1f.7), never a client's.
const PROBE_BDF: u16 = 0x00ff;
/// How long a daemon may take to listen.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Environment variable naming the iommud binary (default: next to this one).
pub const IOMMUD_ENV: &str = "DMABENCH_IOMMUD";

/// A strategy × flush policy served by iommud, optionally with extra
/// daemon arguments (a variant such as a coherent sim unit).
pub struct Served {
    strategy: Strategy,
    flush: FlushPolicy,
    strategy_label: String,
    flush_label: String,
    daemon_args: Vec<String>,
    /// The administrator's trust for the row's devices.
    trust: &'static str,
    /// Maps (and unmaps) per request: 1, or a batch through the rings.
    batch: usize,
    /// Batches recycle their buffers: each batch remaps the previous one's
    /// mappings onto the same memory with the keep hint (a NIC's RX refill
    /// and TX sweep, docs/ARCHITECTURE.md, "Kept remaps"), where the other
    /// batched rows map and unmap.
    recycle: bool,
    /// iommud's refusal, once the probe has seen one (skip later rows).
    refused: Mutex<Option<String>>,
}

impl Served {
    fn new(strategy: Strategy, flush: FlushPolicy) -> Served {
        let (strategy_label, flush_label) = if strategy == Strategy::NoIommu {
            ("libdma-noiommu".to_string(), "none".to_string())
        } else {
            (strategy.name().to_string(), flush.name().to_string())
        };
        Served {
            strategy,
            flush,
            strategy_label,
            flush_label,
            daemon_args: vec!["--coherent".into()],
            trust: if strategy == Strategy::NoIommu {
                "none"
            } else {
                "delegated"
            },
            batch: 1,
            recycle: false,
            refused: Mutex::new(None),
        }
    }

    /// `batch` pairs per request, each batch the previous one's buffers
    /// remapped with the keep hint (`-keep<batch>`).
    fn recycling(mut b: Served, label: &str, batch: usize) -> Served {
        b.strategy_label = format!("{label}-keep{batch}");
        b.batch = batch;
        b.recycle = true;
        b
    }

    /// The same strategy in validated trust, `batch` maps per request (the
    /// ring path: iommud checks every map and writes every entry). One ring
    /// service thread per CPU, pinned to it: each CPU serves the rings of
    /// the client threads pinned beside it, handing over to them at once
    /// (docs/ARCHITECTURE.md, "Rings and service threads": placement), so
    /// the cost per thread is what one CPU spends per pair.
    fn validated(strategy: Strategy, flush: FlushPolicy, batch: usize) -> Served {
        let cpus: Vec<usize> = crate::harness::allowed_cpus()
            .into_iter()
            .take(16)
            .collect();
        let list: Vec<String> = cpus.iter().map(|c| c.to_string()).collect();
        Served::through_rings(
            strategy,
            flush,
            batch,
            format!("{}-val{batch}", strategy.name()),
            [
                "--service-threads".to_string(),
                cpus.len().max(1).to_string(),
                "--service-cpus".to_string(),
                list.join(","),
            ],
        )
    }

    /// Validated trust with [`SERVICE_THREADS`] service threads left to the
    /// scheduler (`-val<batch>-float`): with one client thread, its service
    /// thread finds a CPU of its own, as io_uring's SQPOLL thread would.
    fn validated_floating(strategy: Strategy, flush: FlushPolicy, batch: usize) -> Served {
        Served::through_rings(
            strategy,
            flush,
            batch,
            format!("{}-val{batch}-float", strategy.name()),
            ["--service-threads".to_string(), SERVICE_THREADS.to_string()],
        )
    }

    fn through_rings(
        strategy: Strategy,
        flush: FlushPolicy,
        batch: usize,
        label: String,
        service: impl IntoIterator<Item = String>,
    ) -> Served {
        let mut b = Served::new(strategy, flush);
        b.strategy_label = label;
        b.trust = "validated";
        b.daemon_args.extend(service);
        b.batch = batch;
        b
    }

    /// The same strategy in delegated trust, `batch` maps per `map_batch`
    /// (the fast path's batches: one slot lock and one write-back fence per
    /// batch, and with `strict` one wait for one invalidation).
    fn batched(strategy: Strategy, flush: FlushPolicy, batch: usize) -> Served {
        let mut b = Served::new(strategy, flush);
        b.strategy_label = format!("{}-b{batch}", strategy.name());
        b.batch = batch;
        b
    }
}

/// iommud's ring service threads in the validated rows.
pub const SERVICE_THREADS: usize = 2;

/// Batched rows (validated, and the delegated `-b32`) take this many maps per
/// request (an RX refill).
pub const VALIDATED_BATCH: usize = 32;

/// Every strategy × flush policy libdma knows, in its own order.
pub fn backends() -> Vec<Box<dyn Backend>> {
    rows()
        .into_iter()
        .map(|b| Box::new(b) as Box<dyn Backend>)
        .collect()
}

fn rows() -> Vec<Served> {
    let mut out: Vec<Served> = Vec::new();
    for s in Strategy::ALL {
        if s == Strategy::NoIommu {
            out.push(Served::new(s, FlushPolicy::ALL[0]));
            continue;
        }
        if s == Strategy::Static {
            // Pools mapped once: no flush policy applies.
            let mut b = Served::validated(s, FlushPolicy::PerCore, 1);
            b.strategy_label = "static".into();
            b.flush_label = "none".into();
            out.push(b);
            continue;
        }
        for f in FlushPolicy::ALL {
            out.push(Served::new(s, f));
        }
    }
    // The delegated fast path in batches of 32 (what a NIC driver's RX
    // refill and TX completion sweep do).
    for f in [FlushPolicy::Strict, FlushPolicy::PerCore] {
        out.push(Served::batched(Strategy::Magazine, f, VALIDATED_BATCH));
    }
    // Validated trust through the rings, in batches of 32 and one at a time:
    // what confining a compromised driver costs on top of `magazine`, and
    // `static` (pools mapped once) as the floor of per-buffer protection.
    for f in FlushPolicy::ALL {
        out.push(Served::validated(Strategy::Magazine, f, VALIDATED_BATCH));
    }
    for f in [FlushPolicy::Strict, FlushPolicy::PerCore] {
        out.push(Served::validated_floating(
            Strategy::Magazine,
            f,
            VALIDATED_BATCH,
        ));
    }
    for f in [FlushPolicy::Strict, FlushPolicy::PerCore] {
        out.push(Served::validated(Strategy::Magazine, f, 1));
    }
    out.push(Served::validated(
        Strategy::Global,
        FlushPolicy::Strict,
        VALIDATED_BATCH,
    ));
    // Recycled buffers, as a NIC driver remaps them: the delegated magazine
    // keeps the IOVAs locally, the validated one on the rings, and no IOMMU
    // makes the same calls, as the floor.
    out.push(Served::recycling(
        Served::new(Strategy::Magazine, FlushPolicy::PerCore),
        "magazine",
        VALIDATED_BATCH,
    ));
    out.push(Served::recycling(
        Served::validated(Strategy::Magazine, FlushPolicy::PerCore, VALIDATED_BATCH),
        "magazine-val",
        VALIDATED_BATCH,
    ));
    out.push(Served::recycling(
        Served::new(Strategy::NoIommu, FlushPolicy::ALL[0]),
        "libdma-noiommu",
        VALIDATED_BATCH,
    ));
    // The research's design once more on a unit with ECAP.C = 0 (QEMU's),
    // where every entry write is followed by a cache-line write-back: the
    // cost of the write-back is the difference to `magazine / percore`.
    if let Some(f) = FlushPolicy::parse("percore") {
        let mut b = Served::new(Strategy::Magazine, f);
        b.strategy_label = "magazine-noncoherent".into();
        b.daemon_args = Vec::new();
        out.push(b);
    }
    out
}

/// The iommud binary: `$DMABENCH_IOMMUD`, else next to this executable
/// (a test binary in `deps/` looks one directory up).
pub fn iommud_exe() -> io::Result<PathBuf> {
    if let Some(p) = std::env::var_os(IOMMUD_ENV) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().unwrap_or(Path::new(".")).to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    Ok(dir.join("iommud"))
}

/// Make sure the iommud binary exists and is current: when run by cargo
/// (`$CARGO` set) build it with the same profile and target directory as
/// this executable; otherwise only check that it is there.
pub fn ensure_iommud() -> io::Result<PathBuf> {
    let exe = iommud_exe()?;
    let cargo = std::env::var_os("CARGO");
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(|w| w.join("Cargo.toml"));
    if let (None, Some(cargo), Some(manifest), Some(profile_dir)) = (
        std::env::var_os(IOMMUD_ENV),
        cargo,
        manifest.filter(|m| m.exists()),
        exe.parent(),
    ) {
        let profile = profile_dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("debug");
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "-p", "iommud", "--bin", "iommud"])
            .arg("--manifest-path")
            .arg(&manifest);
        match profile {
            "debug" => {}
            "release" => {
                cmd.arg("--release");
            }
            other => {
                cmd.args(["--profile", other]);
            }
        }
        if let Some(target) = profile_dir.parent() {
            cmd.env("CARGO_TARGET_DIR", target);
        }
        let status = cmd.status()?;
        if !status.success() {
            return Err(io::Error::other(format!(
                "cargo build -p iommud failed ({status})"
            )));
        }
    }
    if !exe.exists() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "no iommud at {} (build it: cargo build --release -p iommud -p dmabench, \
                 or set {IOMMUD_ENV})",
                exe.display()
            ),
        ));
    }
    Ok(exe)
}

/// `00:0(p+1).0` for client process `p`.
pub fn bdf_of(process: usize) -> u16 {
    ((process as u16) + 1) << 3
}

fn lib_err(e: libdma::Error) -> io::Error {
    io::Error::other(e.to_string())
}

impl Backend for Served {
    fn strategy(&self) -> &str {
        &self.strategy_label
    }

    fn flush(&self) -> &str {
        &self.flush_label
    }

    fn trust(&self) -> &str {
        self.trust
    }

    fn batch(&self) -> usize {
        self.batch
    }

    fn daemon(&self, dir: &Path) -> io::Result<Option<Daemon>> {
        if let Some(why) = self
            .refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            return Err(io::Error::new(io::ErrorKind::Unsupported, why));
        }
        let exe = iommud_exe()?;
        let name = format!("{}-{}", self.strategy_label, self.flush_label);
        let socket = dir.join(format!("iommud-{name}.sock"));
        let log_path = dir.join(format!("iommud-{name}.log"));
        let _ = std::fs::remove_file(&socket);
        let log = std::fs::File::create(&log_path)?;
        // The benchmark is the administrator here: it grants every device
        // the row's trust (delegated, so the magazine rows run beside the
        // others, or validated for the ring rows).
        let policy = dir.join(format!("iommud-bench-{name}.toml"));
        let text = if self.trust == "validated" {
            // `static` is allowed only where the configuration lists it.
            "[default]\ntrust = \"validated\"\n\
             strategies = [\"global\", \"magazine\", \"identity\", \"va\", \"static\"]\n"
        } else {
            "[default]\ntrust = \"delegated\"\n"
        };
        std::fs::write(&policy, text)?;
        let child = Command::new(&exe)
            .args(["--platform", "sim", "--socket"])
            .arg(&socket)
            .arg("--config")
            .arg(&policy)
            .args(&self.daemon_args)
            .args([
                "--sim-inval-latency-ns",
                &crate::inval_latency_ns().to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("starting {}: {e}", exe.display())))?;
        let mut d = Daemon { child, socket };
        let t = Instant::now();
        while Control::connect(&d.socket).is_err() {
            if let Some(status) = d.child.try_wait()? {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                return Err(io::Error::other(format!("iommud exited ({status}): {log}")));
            }
            if t.elapsed() > START_TIMEOUT {
                return Err(io::Error::other("iommud did not start listening in 10 s"));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        // Does iommud take this strategy and policy at all?
        match DmaDomain::connect(&d.socket, PROBE_BDF, self.strategy, self.flush) {
            Ok(dom) => {
                dom.shutdown().map_err(lib_err)?;
            }
            Err(e @ libdma::Error::Server { .. }) => {
                let why = format!(
                    "iommud refuses {}/{}: {e}",
                    self.strategy_label, self.flush_label
                );
                *self.refused.lock().unwrap_or_else(|p| p.into_inner()) = Some(why.clone());
                return Err(io::Error::new(io::ErrorKind::Unsupported, why));
            }
            Err(e) => return Err(lib_err(e)),
        }
        Ok(Some(d))
    }

    fn client(&self, env: &ClientEnv) -> io::Result<Box<dyn Client>> {
        let socket = env
            .socket
            .as_deref()
            .ok_or_else(|| io::Error::other("iommud rows need --socket"))?;
        let bdf = bdf_of(env.process);
        let dom = DmaDomain::connect(socket, bdf, self.strategy, self.flush).map_err(lib_err)?;
        let c = ServedClient {
            batch: self.batch,
            recycle: self.recycle,
            dom: Some(Arc::new(dom)),
            stats_path: format!("domains/{}/stats", libdma::Bdf(bdf)),
            reads: AtomicU64::new(0),
            locks_per_read: AtomicU64::new(0),
        };
        // What one stats read costs the domain lock: the least of a few
        // back-to-back differences (nothing else runs in this domain yet).
        let mut last = c.stats()?;
        let mut per_read = u64::MAX;
        for _ in 0..3 {
            let now = c.stats()?;
            per_read =
                per_read.min(kv(&now, "lock_acquisitions")? - kv(&last, "lock_acquisitions")?);
            last = now;
        }
        c.locks_per_read.store(per_read, Relaxed);
        Ok(Box::new(c))
    }
}

/// `key value` lookup in iommud's stats text.
fn kv(text: &str, key: &str) -> io::Result<u64> {
    text.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == key).then(|| v.trim().parse().ok())?
        })
        .ok_or_else(|| io::Error::other(format!("no counter {key} in iommud's stats")))
}

struct ServedClient {
    batch: usize,
    recycle: bool,
    /// `None` only while dropping.
    dom: Option<Arc<DmaDomain>>,
    stats_path: String,
    /// Stats reads made so far (each is one round trip of ours).
    reads: AtomicU64,
    /// Domain-lock acquisitions one stats read causes.
    locks_per_read: AtomicU64,
}

impl ServedClient {
    fn dom(&self) -> &Arc<DmaDomain> {
        self.dom.as_ref().expect("domain until drop")
    }

    fn stats(&self) -> io::Result<String> {
        self.reads.fetch_add(1, Relaxed);
        self.dom().read_path(&self.stats_path).map_err(lib_err)
    }
}

impl Client for ServedClient {
    fn thread(&self, _index: usize) -> io::Result<Box<dyn PairRunner>> {
        let dom = self.dom().clone();
        let buf = dom.alloc((MAX_PAGES * PAGE) as usize).map_err(lib_err)?;
        Ok(Box::new(ServedRunner {
            dom,
            buf,
            batch: self.batch,
            recycle: self.recycle,
            live: Vec::new(),
            done: 0,
        }))
    }

    fn pt_pages(&self) -> u64 {
        match self.stats().and_then(|s| kv(&s, "pt_pages_live")) {
            Ok(n) => n,
            Err(e) => {
                eprintln!("dmabench: reading pt_pages_live: {e}");
                0
            }
        }
    }

    fn counters(&self) -> io::Result<Counters> {
        let s = self.stats()?;
        let c = self.dom().counts();
        let reads = self.reads.load(Relaxed);
        let per_read = self.locks_per_read.load(Relaxed);
        Ok(Counters {
            ipc: c.round_trips.saturating_sub(reads),
            wakeups: c.wakeups,
            locks: kv(&s, "lock_acquisitions")?.saturating_sub(reads * per_read),
            invals: kv(&s, "invalidations")?,
        })
    }
}

impl Drop for ServedClient {
    fn drop(&mut self) {
        // Detach synchronously, so the next run's process can attach the
        // same device at once.
        if let Some(dom) = self.dom.take().and_then(|d| Arc::try_unwrap(d).ok()) {
            if let Err(e) = dom.shutdown() {
                eprintln!("dmabench: detaching: {e}");
            }
        }
    }
}

struct ServedRunner {
    dom: Arc<DmaDomain>,
    buf: DmaBuffer,
    /// Pairs per batch (1: one map, one unmap).
    batch: usize,
    /// Remap the previous batch's mappings instead of mapping and unmapping.
    recycle: bool,
    /// A recycling runner's mappings `(iova, len)`, remapped by each batch.
    live: Vec<(u64, usize)>,
    /// Pairs of the current batch already counted.
    done: usize,
}

impl Drop for ServedRunner {
    fn drop(&mut self) {
        if !self.live.is_empty() {
            if let Err(e) = self.dom.unmap_batch(&self.live) {
                eprintln!("dmabench: unmapping a recycling runner's buffers: {e}");
            }
        }
    }
}

impl ServedRunner {
    /// One recycling batch: the previous batch's mappings remapped onto the
    /// same memory with the keep hint (the first batch, or one of another
    /// length, maps afresh). What is counted is the remaps: a pair is one
    /// unmap and one map.
    fn recycle(&mut self, len: usize) {
        let bufs = vec![(self.buf.phys, len, Dir::Bidirectional); self.batch];
        if self.live.len() != self.batch || self.live.iter().any(|&(_, l)| l != len) {
            if !self.live.is_empty() {
                self.dom
                    .unmap_batch(&self.live)
                    .unwrap_or_else(|e| panic!("dmabench: libdma unmap_batch: {e}"));
            }
            let iovas = self
                .dom
                .map_batch(&bufs)
                .unwrap_or_else(|e| panic!("dmabench: libdma map_batch: {e}"));
            self.live = iovas.into_iter().map(|v| (v, len)).collect();
        }
        let hints = libdma::RemapHints {
            lazy: false,
            keep: true,
        };
        let (u, t) = self
            .dom
            .remap_batch_submit_hinted(&self.live, &bufs, hints)
            .unwrap_or_else(|e| panic!("dmabench: libdma remap: {e}"));
        self.dom
            .unmap_batch_complete(u)
            .unwrap_or_else(|e| panic!("dmabench: libdma remap's unmaps: {e}"));
        let iovas = self
            .dom
            .map_batch_complete(t)
            .unwrap_or_else(|e| panic!("dmabench: libdma remap's maps: {e}"));
        self.live.clear();
        self.live.extend(iovas.into_iter().map(|v| (v, len)));
    }
}

impl PairRunner for ServedRunner {
    fn pair(&mut self, pages: u64) {
        let len = (pages * PAGE) as usize;
        if self.batch > 1 && self.recycle {
            if self.done == 0 {
                self.recycle(len);
            }
            self.done = (self.done + 1) % self.batch;
            return;
        }
        if self.batch > 1 {
            // A batch: `batch` maps of the buffer in one request, then their
            // unmaps in one; the work is done on the batch's first pair, so
            // the time per pair is the batch's over `batch`.
            if self.done == 0 {
                let bufs = vec![(self.buf.phys, len, Dir::Bidirectional); self.batch];
                let iovas = self
                    .dom
                    .map_batch(&bufs)
                    .unwrap_or_else(|e| panic!("dmabench: libdma map_batch of {pages} pages: {e}"));
                black_box(&iovas);
                let maps: Vec<(u64, usize)> = iovas.iter().map(|&v| (v, len)).collect();
                self.dom
                    .unmap_batch(&maps)
                    .unwrap_or_else(|e| panic!("dmabench: libdma unmap_batch: {e}"));
            }
            self.done = (self.done + 1) % self.batch;
            return;
        }
        let iova = self
            .dom
            .map(self.buf.phys, len, Dir::Bidirectional)
            .unwrap_or_else(|e| panic!("dmabench: libdma map of {pages} pages: {e}"));
        black_box(iova);
        self.dom
            .unmap(iova, len)
            .unwrap_or_else(|e| panic!("dmabench: libdma unmap of {iova:#x}: {e}"));
    }

    fn counters(&self) -> Counters {
        // Counted per process (ServedClient::counters).
        Counters::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bdfs_by_hand() {
        assert_eq!(bdf_of(0), 0x0008);
        assert_eq!(bdf_of(1), 0x0010);
        assert_eq!(libdma::Bdf(0x0010).to_string(), "00:02.0");
        assert_eq!(libdma::Bdf(PROBE_BDF).to_string(), "00:1f.7");
    }

    #[test]
    fn every_strategy_and_policy_has_a_backend() {
        let b = backends();
        // Every strategy but noiommu and static x every flush policy, noiommu,
        // static, the noncoherent row, 2 delegated magazine-b32 rows, 3 + 2 + 2
        // validated magazine rows (-val32, -val32-float, -val1), global-val32,
        // and the 3 recycling rows.
        let n =
            (Strategy::ALL.len() - 2) * FlushPolicy::ALL.len() + 1 + 1 + 1 + 2 + 3 + 2 + 2 + 1 + 3;
        assert_eq!(b.len(), n);
        let keep: Vec<(&str, &str, &str, usize)> = b
            .iter()
            .filter(|r| r.strategy().contains("-keep"))
            .map(|r| (r.strategy(), r.flush(), r.trust(), r.batch()))
            .collect();
        assert_eq!(
            keep,
            [
                ("magazine-keep32", "percore", "delegated", 32),
                ("magazine-val-keep32", "percore", "validated", 32),
                ("libdma-noiommu-keep32", "none", "none", 32)
            ]
        );
        assert!(all_recycle(&rows()));
        // A coherent unit (as the peers assume), and one pinned service
        // thread per allowed CPU, but in the -float rows.
        let cpus = crate::harness::allowed_cpus();
        let list = cpus
            .iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let threads = cpus.len().to_string();
        let pinned = [
            "--coherent",
            "--service-threads",
            threads.as_str(),
            "--service-cpus",
            list.as_str(),
        ];
        let float = ["--coherent", "--service-threads", "2"];
        let all = rows();
        for name in [
            "magazine-val32",
            "magazine-val1",
            "global-val32",
            "magazine-val32-float",
        ] {
            let mine: Vec<&Served> = all.iter().filter(|r| r.strategy_label == name).collect();
            assert!(!mine.is_empty(), "{name}");
            for r in mine {
                let want: &[&str] = if name.ends_with("-float") {
                    &float
                } else {
                    &pinned
                };
                assert_eq!(r.daemon_args, want, "{name}");
                assert_eq!(r.trust, "validated", "{name}");
            }
        }
        let b32: Vec<(&str, &str, &str, usize)> = b
            .iter()
            .filter(|r| r.strategy() == "magazine-b32")
            .map(|r| (r.strategy(), r.flush(), r.trust(), r.batch()))
            .collect();
        assert_eq!(
            b32,
            [
                ("magazine-b32", "strict", "delegated", 32),
                ("magazine-b32", "percore", "delegated", 32)
            ]
        );
        assert_eq!((b[0].strategy(), b[0].flush()), ("libdma-noiommu", "none"));
    }

    /// The `-keep` rows, and they alone, recycle.
    fn all_recycle(rows: &[Served]) -> bool {
        rows.iter()
            .all(|r| r.recycle == r.strategy_label.contains("-keep"))
    }

    #[test]
    fn stats_lookup() {
        let t = "maps 3\nlock_acquisitions 12\ninvalidations 0\n";
        assert_eq!(kv(t, "lock_acquisitions").unwrap(), 12);
        assert!(kv(t, "lock").is_err());
    }
}
