//! Rows, repeated runs, and the client processes that do the work.
//!
//! A [`Row`] names a backend (strategy + flush policy), a thread count per
//! client process, a number of client processes and a mapping size. Each run
//! of a row spawns `processes` copies of this binary (`dmabench __client …`);
//! each builds its [`Client`] (per-process state: an allocator, a connection
//! to iommud, a simulated machine), starts `threads` threads, lets every
//! thread build its [`PairRunner`] and warm up, prints `ready`, and waits for
//! `go` on stdin so that all processes start timing together. Each thread then
//! does map+unmap pairs for the time budget and the process prints one
//! `result …` line on stdout.
//!
//! Threads are pinned: thread `i` of process `p` runs on the allowed CPU
//! number `(p * threads + i) % ncpus` (round robin over the CPUs this process
//! may use), so per-core state stays per core and `sched_getcpu()` is stable.
//! With more threads than CPUs, pinned threads share a CPU (time-sliced), as
//! they would on a busy machine.

use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Barrier;
use std::time::{Duration, Instant};

/// Events that predict many-core behaviour, counted where they happen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Blocking IPC round trips (request sent, reply waited for).
    pub ipc: u64,
    /// One-way wake-ups of another process (no reply waited for).
    pub wakeups: u64,
    /// Acquisitions of locks shared between threads or processes.
    pub locks: u64,
    /// IOTLB invalidation requests submitted (any granularity).
    pub invals: u64,
}

impl Counters {
    /// Field-wise sum.
    pub fn add(self, o: Counters) -> Counters {
        Counters {
            ipc: self.ipc + o.ipc,
            wakeups: self.wakeups + o.wakeups,
            locks: self.locks + o.locks,
            invals: self.invals + o.invals,
        }
    }

    /// Field-wise difference (`self` is the later snapshot).
    pub fn since(self, earlier: Counters) -> Counters {
        Counters {
            ipc: self.ipc - earlier.ipc,
            wakeups: self.wakeups - earlier.wakeups,
            locks: self.locks - earlier.locks,
            invals: self.invals - earlier.invals,
        }
    }
}

/// One thread's map+unmap loop body. Built on the thread that uses it,
/// after that thread is pinned.
pub trait PairRunner: Send {
    /// Map `pages` pages of this thread's buffer (read+write), do what the
    /// backend's device side needs, and unmap them again.
    fn pair(&mut self, pages: u64);
    /// Events caused by this thread so far (cumulative).
    fn counters(&self) -> Counters;
}

/// Per-process state of a backend in one client process.
pub trait Client: Send + Sync {
    /// The runner for thread `index` (0-based within this process).
    fn thread(&self, index: usize) -> io::Result<Box<dyn PairRunner>>;
    /// Page-table pages live now (for this process's domain).
    fn pt_pages(&self) -> u64;
    /// Events counted per process rather than per thread (e.g. by a
    /// daemon), cumulative; read before timing starts and after every
    /// thread stopped. Default: none.
    fn counters(&self) -> io::Result<Counters> {
        Ok(Counters::default())
    }
}

/// What a client process knows about its place in a run.
#[derive(Clone, Debug, Default)]
pub struct ClientEnv {
    /// Index of this client process (0-based).
    pub process: usize,
    /// Socket of the daemon [`Backend::daemon`] started, if any.
    pub socket: Option<PathBuf>,
}

/// A daemon serving the clients of one row (e.g. `iommud --platform sim`).
/// Killed and reaped when dropped.
pub struct Daemon {
    /// The daemon process.
    pub child: Child,
    /// Where clients connect.
    pub socket: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A way to do DMA mappings, known by the same name in the parent and in
/// client processes (see `crate::backends`).
pub trait Backend: Send + Sync {
    /// The `strategy` column.
    fn strategy(&self) -> &str;
    /// The `flush` column.
    fn flush(&self) -> &str;
    /// The `trust` column: `delegated`, `validated`, or `none` (peers and
    /// translation off).
    fn trust(&self) -> &str {
        "none"
    }
    /// The `batch` column: maps (and unmaps) per request.
    fn batch(&self) -> usize {
        1
    }
    /// Parent side, once per row before any client starts: start a daemon
    /// the clients connect to, with its socket under `dir`. Default: none.
    fn daemon(&self, _dir: &Path) -> io::Result<Option<Daemon>> {
        Ok(None)
    }
    /// Client side: build this process's state.
    fn client(&self, env: &ClientEnv) -> io::Result<Box<dyn Client>>;
}

/// One line of the results.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    /// Backend strategy name.
    pub strategy: String,
    /// Backend flush policy name.
    pub flush: String,
    /// Threads per client process.
    pub threads: usize,
    /// Client processes.
    pub processes: usize,
    /// Pages per mapping.
    pub pages: u64,
    /// The backend's trust mode.
    pub trust: String,
    /// Maps (and unmaps) per request.
    pub batch: usize,
}

impl Row {
    /// `strategy/flush/t<threads>/p<processes>/n<pages>`, matched by `--rows`.
    pub fn label(&self) -> String {
        format!(
            "{}/{}/t{}/p{}/n{}",
            self.strategy, self.flush, self.threads, self.processes, self.pages
        )
    }
}

/// What one run of a row measured, summed over its processes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sample {
    /// Map+unmap pairs done by all threads.
    pub pairs: u64,
    /// Sum over threads of each thread's timed nanoseconds.
    pub thread_ns: u64,
    /// Longest timed interval of any thread (wall time of the run).
    pub wall_ns: u64,
    /// Events during the timed interval.
    pub counters: Counters,
    /// Page-table pages live at the end, summed over processes.
    pub pt_pages: u64,
}

impl Sample {
    /// Per-thread cost: nanoseconds a thread spent per pair it did.
    pub fn ns_per_pair(&self) -> f64 {
        self.thread_ns as f64 / self.pairs.max(1) as f64
    }

    /// Aggregate throughput in million pairs per second.
    pub fn mpairs_per_s(&self) -> f64 {
        self.pairs as f64 / self.wall_ns.max(1) as f64 * 1e3
    }

    fn merge(self, o: Sample) -> Sample {
        Sample {
            pairs: self.pairs + o.pairs,
            thread_ns: self.thread_ns + o.thread_ns,
            wall_ns: self.wall_ns.max(o.wall_ns),
            counters: self.counters.add(o.counters),
            pt_pages: self.pt_pages + o.pt_pages,
        }
    }

    /// The `result …` line a client process prints.
    pub fn to_line(self) -> String {
        let c = self.counters;
        format!(
            "result pairs={} thread_ns={} wall_ns={} ipc={} wakeups={} locks={} invals={} pt_pages={}",
            self.pairs, self.thread_ns, self.wall_ns, c.ipc, c.wakeups, c.locks, c.invals, self.pt_pages
        )
    }

    /// Parse [`Sample::to_line`]'s output.
    pub fn from_line(line: &str) -> Option<Sample> {
        let rest = line.trim().strip_prefix("result ")?;
        let mut s = Sample::default();
        for kv in rest.split_whitespace() {
            let (k, v) = kv.split_once('=')?;
            let v: u64 = v.parse().ok()?;
            match k {
                "pairs" => s.pairs = v,
                "thread_ns" => s.thread_ns = v,
                "wall_ns" => s.wall_ns = v,
                "ipc" => s.counters.ipc = v,
                "wakeups" => s.counters.wakeups = v,
                "locks" => s.counters.locks = v,
                "invals" => s.counters.invals = v,
                "pt_pages" => s.pt_pages = v,
                _ => return None,
            }
        }
        Some(s)
    }
}

/// Median, min and max of a non-empty sample set.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spread {
    /// Median (mean of the middle two for an even count).
    pub median: f64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
}

/// Median/min/max of `v`; `None` when empty.
pub fn spread(v: &[f64]) -> Option<Spread> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    let median = if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    };
    Some(Spread {
        median,
        min: s[0],
        max: s[n - 1],
    })
}

/// A row's outcome over its repeated runs.
#[derive(Clone, Debug, PartialEq)]
pub struct RowResult {
    /// The row.
    pub row: Row,
    /// Per-thread nanoseconds per pair over runs.
    pub ns: Spread,
    /// Median aggregate throughput, million pairs per second.
    pub mpairs_per_s: f64,
    /// Events per 1000 pairs, over all runs.
    pub ipc_per_1k: f64,
    /// One-way wake-ups per 1000 pairs.
    pub wakeups_per_1k: f64,
    /// Shared-lock acquisitions per 1000 pairs.
    pub locks_per_1k: f64,
    /// IOTLB invalidations per 1000 pairs.
    pub inval_per_1k: f64,
    /// Page-table pages live at the end of the last run.
    pub pt_pages: u64,
    /// Number of runs.
    pub runs: usize,
}

/// Summarise the runs of one row.
pub fn summarise(row: Row, samples: &[Sample]) -> Option<RowResult> {
    let ns = spread(&samples.iter().map(Sample::ns_per_pair).collect::<Vec<_>>())?;
    let tput = spread(&samples.iter().map(Sample::mpairs_per_s).collect::<Vec<_>>())?;
    let total = samples.iter().fold(Sample::default(), |a, s| a.merge(*s));
    let per_1k = |n: u64| n as f64 * 1000.0 / total.pairs.max(1) as f64;
    Some(RowResult {
        row,
        ns,
        mpairs_per_s: tput.median,
        ipc_per_1k: per_1k(total.counters.ipc),
        wakeups_per_1k: per_1k(total.counters.wakeups),
        locks_per_1k: per_1k(total.counters.locks),
        inval_per_1k: per_1k(total.counters.invals),
        pt_pages: samples.last().map_or(0, |s| s.pt_pages),
        runs: samples.len(),
    })
}

/// Hidden subcommand that runs one client process.
pub const CLIENT_CMD: &str = "__client";

/// How long each thread runs per run, and how many runs per row.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    /// Timed interval per run.
    pub per_run: Duration,
    /// Runs per row.
    pub runs: usize,
}

/// Run `row` `budget.runs` times with client processes and summarise.
pub fn run_row(b: &dyn Backend, row: &Row, budget: Budget, tmp: &Path) -> io::Result<RowResult> {
    let daemon = b.daemon(tmp)?;
    let socket = daemon.as_ref().map(|d| d.socket.clone());
    let mut samples = Vec::with_capacity(budget.runs);
    for _ in 0..budget.runs {
        samples.push(run_processes(row, budget.per_run, socket.as_deref())?);
    }
    drop(daemon);
    summarise(row.clone(), &samples).ok_or_else(|| io::Error::other("no runs"))
}

fn run_processes(row: &Row, per_run: Duration, socket: Option<&Path>) -> io::Result<Sample> {
    let exe = std::env::current_exe()?;
    let mut kids = Vec::with_capacity(row.processes);
    for p in 0..row.processes {
        let mut cmd = Command::new(&exe);
        cmd.arg(CLIENT_CMD)
            .args(["--strategy", &row.strategy, "--flush", &row.flush])
            .args(["--threads", &row.threads.to_string()])
            .args(["--pages", &row.pages.to_string()])
            .args(["--budget-ns", &per_run.as_nanos().to_string()])
            .args(["--process", &p.to_string()]);
        if let Some(s) = socket {
            cmd.arg("--socket").arg(s);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let out = BufReader::new(child.stdout.take().expect("piped stdout"));
        kids.push((child, out));
    }
    // Everyone set up and warmed up before anyone starts timing.
    for (child, out) in &mut kids {
        let line = read_line(out)?;
        if line.trim() != "ready" {
            let _ = child.kill();
            return Err(io::Error::other(format!(
                "client: expected ready, got {line:?}"
            )));
        }
    }
    for (child, _) in &mut kids {
        let stdin = child.stdin.as_mut().expect("piped stdin");
        stdin.write_all(b"go\n")?;
        stdin.flush()?;
    }
    let mut total = Sample::default();
    for (mut child, mut out) in kids {
        let line = read_line(&mut out)?;
        let status = child.wait()?;
        let s = Sample::from_line(&line)
            .filter(|_| status.success())
            .ok_or_else(|| io::Error::other(format!("client failed ({status}): {line:?}")))?;
        total = total.merge(s);
    }
    Ok(total)
}

fn read_line(r: &mut impl BufRead) -> io::Result<String> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "client exited early",
        ));
    }
    Ok(line)
}

/// Parameters of one client process.
#[derive(Clone, Debug)]
pub struct ClientArgs {
    /// Threads in this process.
    pub threads: usize,
    /// Pages per mapping.
    pub pages: u64,
    /// Timed interval.
    pub budget: Duration,
    /// Environment handed to the backend.
    pub env: ClientEnv,
}

struct ThreadOut {
    pairs: u64,
    ns: u64,
    counters: Counters,
}

/// Run one client process's share of a run in this process. `sync` is
/// called once every thread is built and warmed up (the process prints
/// `ready` and waits for `go` there); timing starts when it returns.
pub fn run_client(
    b: &dyn Backend,
    a: &ClientArgs,
    sync: impl FnOnce() -> io::Result<()>,
) -> io::Result<Sample> {
    let client = b.client(&a.env)?;
    let client = &*client;
    let cpus = allowed_cpus();
    let ready = Barrier::new(a.threads + 1);
    let go = Barrier::new(a.threads + 1);
    let outs = std::thread::scope(|s| -> io::Result<(Vec<ThreadOut>, Counters)> {
        let handles: Vec<_> = (0..a.threads)
            .map(|i| {
                let (ready, go, cpus) = (&ready, &go, &cpus);
                let slot = a.env.process * a.threads + i;
                s.spawn(move || -> io::Result<ThreadOut> {
                    if !cpus.is_empty() {
                        pin_to(cpus[slot % cpus.len()]);
                    }
                    let prepared = client.thread(i).map(|mut r| {
                        let batch = warm_up(&mut *r, a.pages, a.budget);
                        (r, batch)
                    });
                    // Reach both barriers even on error, so no one waits forever.
                    ready.wait();
                    go.wait();
                    let (mut runner, batch) = prepared?;
                    Ok(timed(&mut *runner, a.pages, a.budget, batch))
                })
            })
            .collect();
        ready.wait();
        let before = client.counters();
        let synced = sync();
        go.wait();
        let outs = handles
            .into_iter()
            .map(|h| h.join().expect("dmabench: client thread panicked"))
            .collect::<io::Result<Vec<_>>>()?;
        synced?;
        Ok((outs, client.counters()?.since(before?)))
    })?;
    let (outs, process_counters) = outs;
    let mut s = Sample {
        pt_pages: client.pt_pages(),
        counters: process_counters,
        ..Sample::default()
    };
    for o in outs {
        s.pairs += o.pairs;
        s.thread_ns += o.ns;
        s.wall_ns = s.wall_ns.max(o.ns);
        s.counters = s.counters.add(o.counters);
    }
    Ok(s)
}

/// Warm caches for a tenth of the budget; returns a batch size that makes
/// the clock read cost well under 1% of a batch.
fn warm_up(r: &mut dyn PairRunner, pages: u64, budget: Duration) -> u64 {
    let target = budget / 10;
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < target || n == 0 {
        for _ in 0..16 {
            r.pair(pages);
        }
        n += 16;
    }
    let ns_per = start.elapsed().as_nanos() as f64 / n as f64;
    // Aim for a batch of ~20 µs, bounded so short budgets still stop on time.
    ((20_000.0 / ns_per.max(0.1)) as u64).clamp(1, 1 << 16)
}

fn timed(r: &mut dyn PairRunner, pages: u64, budget: Duration, batch: u64) -> ThreadOut {
    let before = r.counters();
    let start = Instant::now();
    let mut pairs = 0u64;
    let ns = loop {
        for _ in 0..batch {
            r.pair(pages);
        }
        pairs += batch;
        let e = start.elapsed();
        if e >= budget {
            break e.as_nanos() as u64;
        }
    };
    ThreadOut {
        pairs,
        ns,
        counters: r.counters().since(before),
    }
}

/// CPUs this process may run on.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data (all-zero is the empty set);
    // sched_getaffinity writes at most size_of::<cpu_set_t>() bytes into it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

/// Pin the calling thread to `cpu` (best effort: a refused pin leaves the
/// thread unpinned, which only makes the numbers noisier).
fn pin_to(cpu: usize) {
    // SAFETY: as in allowed_cpus; pid 0 means the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_by_hand() {
        let s = spread(&[5.0, 1.0, 3.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (3.0, 1.0, 5.0));
        let s = spread(&[4.0, 10.0, 2.0, 8.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (6.0, 2.0, 10.0));
        let s = spread(&[7.5]).unwrap();
        assert_eq!((s.median, s.min, s.max), (7.5, 7.5, 7.5));
        assert!(spread(&[]).is_none());
    }

    #[test]
    fn summary_of_hand_made_runs() {
        let c = Counters {
            ipc: 1,
            wakeups: 2,
            locks: 200,
            invals: 100,
        };
        let mk = |pairs, thread_ns, wall_ns| Sample {
            pairs,
            thread_ns,
            wall_ns,
            counters: c,
            pt_pages: 3,
        };
        // ns/pair per run: 10, 30, 20.
        let runs = [
            mk(100, 1000, 1000),
            mk(100, 3000, 3000),
            mk(100, 2000, 1000),
        ];
        let row = Row {
            strategy: "x".into(),
            flush: "y".into(),
            threads: 1,
            processes: 1,
            pages: 1,
            trust: "none".into(),
            batch: 1,
        };
        let r = summarise(row, &runs).unwrap();
        assert_eq!((r.ns.median, r.ns.min, r.ns.max), (20.0, 10.0, 30.0));
        // Throughput per run: 100, 33.3, 100 Mpairs/s -> median 100.
        assert!((r.mpairs_per_s - 100.0).abs() < 1e-9);
        // 300 pairs, 3 ipc, 600 locks, 300 invals.
        assert!((r.ipc_per_1k - 10.0).abs() < 1e-9);
        assert!((r.wakeups_per_1k - 20.0).abs() < 1e-9);
        assert!((r.locks_per_1k - 2000.0).abs() < 1e-9);
        assert!((r.inval_per_1k - 1000.0).abs() < 1e-9);
        assert_eq!((r.pt_pages, r.runs), (3, 3));
    }

    #[test]
    fn result_line_round_trip() {
        let s = Sample {
            pairs: 12,
            thread_ns: 34,
            wall_ns: 30,
            counters: Counters {
                ipc: 1,
                wakeups: 2,
                locks: 3,
                invals: 4,
            },
            pt_pages: 5,
        };
        assert_eq!(Sample::from_line(&s.to_line()), Some(s));
        assert_eq!(Sample::from_line("result pairs=x"), None);
        assert_eq!(Sample::from_line("ready"), None);
    }
}
