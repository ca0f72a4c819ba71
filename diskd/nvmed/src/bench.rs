//! `nvmed bench`: a verifying disk workload. One worker per I/O queue, pinned to its CPU,
//! each owning a disjoint part of the tested region; every block written carries a
//! [`pattern`](crate::pattern) header and every block read is checked against what
//! this run (or `--expect-gen`) last wrote there.

use std::sync::Arc;
use std::time::{Duration, Instant};

use e1000d::{DmaBuf, DmaMapper};

use crate::io::{IoQueue, Op};
use crate::pattern::{self, Verdict, BLOCK};
use crate::{Error, Result};

/// No completion for this long with commands in flight: the queue is declared stuck.
pub const STALL: Duration = Duration::from_secs(10);

/// Kind of workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Reads only.
    Read,
    /// Writes only.
    Write,
    /// Half reads, half writes.
    Mixed,
}

/// One measured workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// Read, write or mixed.
    pub kind: Kind,
    /// Random offsets (aligned to `bs`) or sequential.
    pub random: bool,
    /// Bytes per command (a multiple of 4 KiB).
    pub bs: usize,
    /// Commands in flight per queue.
    pub qd: usize,
    /// Commands in total (split over the queues).
    pub ios: u64,
    /// Writes store this generation instead of the next one (the fill).
    pub set_gen: Option<u64>,
}

impl Job {
    /// Parses `randread|randwrite|seqread|seqwrite|randrw|seqrw/BS/QD/IOS`, e.g.
    /// `randread/4096/32/20000` (BS may end in `k`).
    pub fn parse(s: &str) -> std::result::Result<Job, String> {
        let p: Vec<&str> = s.split('/').collect();
        let [name, bs, qd, ios] = p.as_slice() else {
            return Err(format!("job {s:?}: want NAME/BS/QD/IOS"));
        };
        let (random, kind) = match *name {
            "randread" => (true, Kind::Read),
            "randwrite" => (true, Kind::Write),
            "randrw" => (true, Kind::Mixed),
            "seqread" => (false, Kind::Read),
            "seqwrite" => (false, Kind::Write),
            "seqrw" => (false, Kind::Mixed),
            _ => return Err(format!("job {s:?}: unknown workload {name:?}")),
        };
        let num = |v: &str| -> std::result::Result<u64, String> {
            let (v, mul) = match v.strip_suffix(['k', 'K']) {
                Some(v) => (v, 1024),
                None => (v, 1),
            };
            v.parse::<u64>()
                .map(|n| n * mul)
                .map_err(|_| format!("job {s:?}: not a number {v:?}"))
        };
        let bs = num(bs)? as usize;
        if bs == 0 || !bs.is_multiple_of(BLOCK) || bs > 128 << 10 {
            return Err(format!("job {s:?}: BS must be 4k..128k in 4k steps"));
        }
        let qd = num(qd)? as usize;
        if !(1..=32).contains(&qd) {
            return Err(format!("job {s:?}: QD must be 1..=32"));
        }
        Ok(Job {
            kind,
            random,
            bs,
            qd,
            ios: num(ios)?.max(1),
            set_gen: None,
        })
    }

    /// The job's name as parsed (`randread/4096/32`).
    pub fn name(&self) -> String {
        let k = match self.kind {
            Kind::Read => "read",
            Kind::Write => "write",
            Kind::Mixed => "rw",
        };
        format!(
            "{}{k}/{}/{}",
            if self.random { "rand" } else { "seq" },
            self.bs,
            self.qd
        )
    }
}

/// What one job (or one worker of it) counted.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Commands completed.
    pub ios: u64,
    /// Bytes moved.
    pub bytes: u64,
    /// Blocks read back and verified.
    pub verified: u64,
    /// Blocks with a wrong magic or checksum.
    pub corrupt: u64,
    /// Intact blocks from another LBA.
    pub misplaced: u64,
    /// Intact blocks of another generation.
    pub stale: u64,
    /// Blocks read that nothing had written yet (not verifiable).
    pub unwritten: u64,
    /// Commands completed with an error status.
    pub errors: u64,
    /// The first error status, named.
    pub first_error: Option<String>,
    /// Latency of every command, ns.
    pub lat_ns: Vec<u64>,
    /// Wall time of the job.
    pub secs: f64,
}

impl Summary {
    fn merge(&mut self, o: Summary) {
        self.ios += o.ios;
        self.bytes += o.bytes;
        self.verified += o.verified;
        self.corrupt += o.corrupt;
        self.misplaced += o.misplaced;
        self.stale += o.stale;
        self.unwritten += o.unwritten;
        self.errors += o.errors;
        if self.first_error.is_none() {
            self.first_error = o.first_error;
        }
        self.lat_ns.extend(o.lat_ns);
    }

    /// Latency percentile `p` (0..=100) in µs.
    pub fn pct_us(&self, p: usize) -> f64 {
        percentile(&self.lat_ns, p) as f64 / 1000.0
    }

    /// Nothing wrong was seen.
    pub fn clean(&self) -> bool {
        self.corrupt == 0 && self.misplaced == 0 && self.stale == 0 && self.errors == 0
    }

    /// The `bench:` line.
    pub fn line(&self, job: &Job, queues: usize) -> String {
        let secs = self.secs.max(1e-9);
        format!(
            "bench: job={} queues={queues} ios={} secs={:.3} iops={:.1} mbps={:.2} p50_us={:.1} \
p99_us={:.1} verified={} corrupt={} misplaced={} stale={} unwritten={} errors={}",
            job.name(),
            self.ios,
            self.secs,
            self.ios as f64 / secs,
            self.bytes as f64 / secs / 1e6,
            self.pct_us(50),
            self.pct_us(99),
            self.verified,
            self.corrupt,
            self.misplaced,
            self.stale,
            self.unwritten,
            self.errors
        )
    }
}

/// The `p`th percentile (nearest rank) of `v`, 0 when empty.
pub fn percentile(v: &[u64], p: usize) -> u64 {
    if v.is_empty() {
        return 0;
    }
    let mut s = v.to_vec();
    s.sort_unstable();
    let rank = (p.min(100) * s.len()).div_ceil(100).max(1);
    s[rank - 1]
}

#[derive(Debug, Clone, Copy)]
struct Req {
    op: Op,
    unit: u64,
    gen_base: Option<u64>,
}

/// One queue's worker: its queue, buffers, and the part of the region it owns.
pub struct Worker<M: DmaMapper> {
    q: IoQueue<M>,
    cpu: usize,
    bufs: Vec<DmaBuf>,
    /// First LBA of the part.
    first_lba: u64,
    /// Generation last written per 4 KiB unit (0 = unknown).
    gens: Vec<u64>,
    busy: Vec<bool>,
    rng: u64,
    cursor: u64,
    /// Sleep this long after 64 empty polls in a row (None: spin, yielding the CPU).
    pub idle_sleep: Option<Duration>,
}

// SAFETY: the data buffers are DMA memory owned by the mapper (alive through the queue's
// Arc) and touched only through raw pointers by the thread running the worker.
unsafe impl<M: DmaMapper + Send + Sync> Send for Worker<M> {}

impl<M: DmaMapper> Worker<M> {
    /// A worker for `q`, pinned to `cpu` when it runs, owning `units` 4 KiB units from
    /// `first_lba`, with 32 buffers of 128 KiB; every unit is assumed to hold generation
    /// `expect_gen` (0: unknown).
    pub fn new(
        q: IoQueue<M>,
        mapper: &Arc<M>,
        cpu: usize,
        first_lba: u64,
        units: u64,
        expect_gen: u64,
    ) -> Result<Self> {
        let mut bufs = Vec::with_capacity(32);
        for _ in 0..32 {
            bufs.push(mapper.alloc(128 << 10)?);
        }
        Ok(Worker {
            q,
            cpu,
            bufs,
            first_lba,
            gens: vec![expect_gen; units as usize],
            busy: vec![false; units as usize],
            rng: 0x9e37_79b9_7f4a_7c15 ^ (cpu as u64 + 1).wrapping_mul(0x2545_f491_4f6c_dd1d),
            cursor: 0,
            idle_sleep: None,
        })
    }

    /// The queue (for fault injection and counters).
    pub fn queue(&mut self) -> &mut IoQueue<M> {
        &mut self.q
    }

    fn next_rand(&mut self) -> u64 {
        // xorshift64*
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn lba_of(&self, unit: u64) -> u64 {
        self.first_lba + unit * (BLOCK as u64 / u64::from(self.q.lba_size))
    }

    /// Runs `ios` commands of `job` on this worker's part; then a FLUSH if it wrote.
    pub fn run(&mut self, job: &Job, ios: u64) -> Result<Summary> {
        pin_to(self.cpu);
        let per = (job.bs / BLOCK) as u64;
        let units = self.gens.len() as u64;
        let slots = units / per;
        if slots == 0 {
            return Err(Error::Invalid(format!(
                "region part of {units} blocks smaller than one {}-byte command",
                job.bs
            )));
        }
        let qd = job.qd.min(self.bufs.len()).min(self.q.free_slots());
        let mut free: Vec<usize> = (0..qd).rev().collect();
        let mut reqs: Vec<Option<Req>> = vec![None; qd];
        let mut sum = Summary::default();
        let mut blk = pattern::block();
        let (mut issued, mut done) = (0u64, 0u64);
        let mut last = Instant::now();
        let mut wrote = false;
        let mut idle = 0u32;
        let mut done_batch = Vec::with_capacity(qd);
        while done < ios {
            while issued < ios && !free.is_empty() {
                let unit = if job.random {
                    let mut pick = None;
                    for _ in 0..8 {
                        let u = self.next_rand() % slots * per;
                        if !self.busy[u as usize..(u + per) as usize].iter().any(|b| *b) {
                            pick = Some(u);
                            break;
                        }
                    }
                    match pick {
                        Some(u) => u,
                        None => break,
                    }
                } else {
                    let u = self.cursor;
                    if self.busy[u as usize..(u + per) as usize].iter().any(|b| *b) {
                        break;
                    }
                    self.cursor = (self.cursor + per) % (slots * per);
                    u
                };
                let op = match job.kind {
                    Kind::Read => Op::Read,
                    Kind::Write => Op::Write,
                    Kind::Mixed if self.next_rand() & 1 == 0 => Op::Read,
                    Kind::Mixed => Op::Write,
                };
                let Some(bi) = free.pop() else { break };
                let buf = self.bufs[bi];
                let mut gen_base = None;
                if op == Op::Write {
                    for k in 0..per {
                        let u = (unit + k) as usize;
                        let gen = job.set_gen.unwrap_or(self.gens[u] + 1);
                        pattern::fill(&mut blk, self.lba_of(unit + k), gen);
                        // SAFETY: buf holds 128 KiB ≥ bs = per × 4096; not mapped yet,
                        // so the device cannot touch it; blk is 4096 bytes of u64 words
                        // (little endian on x86, as on disk); raw copy, no reference
                        // into DMA memory formed.
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                blk.as_ptr().cast::<u8>(),
                                buf.as_ptr().add(k as usize * BLOCK),
                                BLOCK,
                            )
                        };
                    }
                    gen_base = Some(0);
                    wrote = true;
                }
                if let Err(e) = self
                    .q
                    .submit_rw(op, self.lba_of(unit), &buf, job.bs, bi as u64)
                {
                    free.push(bi);
                    if matches!(e, Error::QueueFull { .. }) {
                        break;
                    }
                    return Err(e);
                }
                for b in &mut self.busy[unit as usize..(unit + per) as usize] {
                    *b = true;
                }
                reqs[bi] = Some(Req { op, unit, gen_base });
                issued += 1;
            }
            done_batch.clear();
            self.q.poll_batch(qd, &mut done_batch)?;
            if done_batch.is_empty() {
                if last.elapsed() > STALL {
                    return Err(Error::Timeout {
                        what: format!(
                            "I/O completion queue {} phase tag ({} commands in flight)",
                            self.q.qid(),
                            self.q.in_flight()
                        ),
                        ms: STALL.as_millis() as u64,
                    });
                }
                idle += 1;
                if idle >= 64 {
                    idle = 0;
                    match self.idle_sleep {
                        Some(t) => std::thread::sleep(t),
                        None => std::thread::yield_now(),
                    }
                } else {
                    std::hint::spin_loop();
                }
            }
            for d in done_batch.drain(..) {
                last = Instant::now();
                idle = 0;
                done += 1;
                let bi = d.tag as usize;
                let req = reqs
                    .get_mut(bi)
                    .and_then(Option::take)
                    .ok_or_else(|| Error::Invalid(format!("completion for idle tag {bi}")))?;
                free.push(bi);
                for b in &mut self.busy[req.unit as usize..(req.unit + per) as usize] {
                    *b = false;
                }
                sum.ios += 1;
                sum.lat_ns.push(d.ns);
                if !d.cqe.ok() {
                    sum.errors += 1;
                    if sum.first_error.is_none() {
                        sum.first_error = Some(self.q.status_error(&d).to_string());
                    }
                    continue;
                }
                sum.bytes += job.bs as u64;
                match req.op {
                    Op::Write if req.gen_base.is_some() => {
                        for k in 0..per {
                            let u = (req.unit + k) as usize;
                            self.gens[u] = job.set_gen.unwrap_or(self.gens[u] + 1);
                        }
                    }
                    Op::Read => {
                        let buf = self.bufs[bi];
                        for k in 0..per {
                            let u = req.unit + k;
                            // SAFETY: the command completed and its mapping is gone;
                            // raw copy of 4096 bytes inside the 128 KiB buffer into a
                            // private block, no reference into DMA memory.
                            unsafe {
                                std::ptr::copy_nonoverlapping(
                                    buf.as_ptr().add(k as usize * BLOCK),
                                    blk.as_mut_ptr().cast::<u8>(),
                                    BLOCK,
                                )
                            };
                            let gen = self.gens[u as usize];
                            if gen == 0 {
                                sum.unwritten += 1;
                                continue;
                            }
                            match pattern::verify(&blk, self.lba_of(u), gen) {
                                Verdict::Verified => sum.verified += 1,
                                Verdict::Corrupt => sum.corrupt += 1,
                                Verdict::Misplaced => sum.misplaced += 1,
                                Verdict::Stale => sum.stale += 1,
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        if wrote {
            self.flush()?;
        }
        Ok(sum)
    }

    /// FLUSH, waited for (bounded).
    pub fn flush(&mut self) -> Result<()> {
        self.q.submit_flush(u64::MAX)?;
        let start = Instant::now();
        loop {
            if let Some(d) = self.q.poll()? {
                if d.tag == u64::MAX {
                    return if d.cqe.ok() {
                        Ok(())
                    } else {
                        Err(self.q.status_error(&d))
                    };
                }
            }
            if start.elapsed() > STALL {
                return Err(Error::Timeout {
                    what: format!("FLUSH completion on queue {}", self.q.qid()),
                    ms: STALL.as_millis() as u64,
                });
            }
            std::thread::yield_now();
        }
    }
}

/// Pins the calling thread to `cpu` (best effort: a refusal leaves it unpinned).
pub fn pin_to(cpu: usize) {
    #[cfg(target_os = "linux")]
    // SAFETY: cpu_set_t is plain data; CPU_SET bounds-checks against its size; the call
    // only reads the set.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = cpu;
}

/// Runs `job` on every worker at once (each on its own thread), `ios` split evenly.
pub fn run_job<M: DmaMapper + Send + Sync>(
    workers: &mut [Worker<M>],
    job: &Job,
) -> Result<Summary> {
    let n = workers.len().max(1) as u64;
    let start = Instant::now();
    let results: Vec<Result<Summary>> = std::thread::scope(|s| {
        let handles: Vec<_> = workers
            .iter_mut()
            .enumerate()
            .map(|(i, w)| {
                let share = job.ios / n + u64::from((i as u64) < job.ios % n);
                s.spawn(move || w.run(job, share))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::Invalid("worker panicked".into())))
            })
            .collect()
    });
    let secs = start.elapsed().as_secs_f64();
    let mut total = Summary::default();
    for r in results {
        total.merge(r?);
    }
    total.secs = secs;
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_specs() {
        let j = Job::parse("randread/4k/32/20000").expect("valid");
        assert_eq!(
            (j.kind, j.random, j.bs, j.qd, j.ios),
            (Kind::Read, true, 4096, 32, 20000)
        );
        assert_eq!(j.name(), "randread/4096/32");
        let j = Job::parse("seqwrite/131072/8/100").expect("valid");
        assert_eq!((j.kind, j.random, j.bs), (Kind::Write, false, 128 << 10));
        assert_eq!(Job::parse("randrw/8k/1/5").map(|j| j.kind), Ok(Kind::Mixed));
        assert!(Job::parse("randread/4000/32/1").is_err());
        assert!(Job::parse("randread/256k/32/1").is_err());
        assert!(Job::parse("randread/4k/33/1").is_err());
        assert!(Job::parse("randread/4k/0/1").is_err());
        assert!(Job::parse("trim/4k/1/1").is_err());
        assert!(Job::parse("randread/4k/1").is_err());
    }

    #[test]
    fn percentiles_nearest_rank() {
        let v: Vec<u64> = (1..=100).rev().collect();
        assert_eq!(percentile(&v, 50), 50);
        assert_eq!(percentile(&v, 99), 99);
        assert_eq!(percentile(&v, 100), 100);
        assert_eq!(percentile(&[7], 99), 7);
        assert_eq!(percentile(&[], 50), 0);
        // 3 values: p50 is the 2nd (rank ceil(1.5) = 2).
        assert_eq!(percentile(&[30, 10, 20], 50), 20);
    }
}
