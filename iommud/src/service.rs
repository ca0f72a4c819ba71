//! Service threads: serve the rings of active domains with adaptive polling
//! (docs/ARCHITECTURE.md, "Rings and service threads").
//!
//! A service thread passes over the rings of the domains it serves while
//! entries keep arriving, and keeps looking for [`Service::spin`] after the
//! last one (yielding the CPU between looks, so a client on the same CPU
//! still runs). Then it lowers each of its domains' count of awake service
//! threads (`ring_awake` in the published page), looks once more, and
//! sleeps in `poll` on the domains' doorbells and its own wake-up
//! descriptor. A client rings its doorbell only when it saw no thread
//! awake, so in steady state neither side makes a system call. A domain
//! with several rings is served by as many threads as it has rings (at
//! most all of them): each ring has a home thread, the one that serves it
//! while awake (with pinned threads, the one on the CPU of the ring's
//! clients). A thread passing finds the rings of sleeping threads too,
//! serves them and wakes their home thread.

use crate::domain::Domain;
use crate::state::State;
use crate::unit::log;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a service thread keeps looking after the last entry, by default:
/// longer than a NIC driver's usual gap between two requests during traffic
/// (under QEMU's TCG a doorbell wake-up costs milliseconds), short enough
/// that a quiet system sleeps at once (docs/PERFORMANCE.md).
pub const DEFAULT_SPIN: Duration = Duration::from_millis(2);
/// How long after the last entry a service thread looks without yielding
/// (short: the client may be waiting on this very CPU). Not at all after
/// completing entries for clients on its own CPU: they need it now.
const HOT: Duration = Duration::from_micros(3);
/// Longest sleep without a doorbell (to notice a stop).
const SLEEP_MS: i32 = 1000;

/// One service thread's share of the domains.
struct Worker {
    /// Index of the thread (its passes start at this ring).
    index: usize,
    domains: Mutex<Vec<Arc<Domain>>>,
    generation: AtomicU64,
    wake: Option<OwnedFd>,
    /// It sleeps (or is about to): another thread serves its rings and
    /// wakes it.
    asleep: AtomicBool,
}

/// The service threads.
pub struct Service {
    workers: Vec<Arc<Worker>>,
    /// How long to keep polling after the last entry.
    pub spin: Duration,
    stopping: AtomicBool,
    started: AtomicBool,
    /// CPUs to pin the threads to (thread k on `cpus[k % len]`); empty: none.
    pub cpus: Vec<usize>,
    /// The longest a pass of lazy entries is held (`Domain::serve_rings`).
    pub lazy_hold: Duration,
}

impl Service {
    /// `threads` service threads (at least 1), polling `spin` after the last entry.
    pub fn new(threads: usize, spin: Duration) -> Service {
        Service {
            workers: (0..threads.max(1))
                .map(|index| {
                    Arc::new(Worker {
                        index,
                        domains: Mutex::default(),
                        generation: AtomicU64::new(0),
                        wake: crate::platform::shm::eventfd().ok(),
                        asleep: AtomicBool::new(false),
                    })
                })
                .collect(),
            spin,
            stopping: AtomicBool::new(false),
            started: AtomicBool::new(false),
            cpus: Vec::new(),
            lazy_hold: Duration::from_micros(iommu_abi::ring::LAZY_HOLD_US),
        }
    }

    /// Starts the threads (once).
    pub fn start(state: &Arc<State>) -> std::io::Result<()> {
        if state.service.started.swap(true, SeqCst) {
            return Ok(());
        }
        for (k, w) in state.service.workers.iter().enumerate() {
            let (st, w) = (state.clone(), w.clone());
            let cpu = state.service.cpu_of(k);
            std::thread::Builder::new()
                .name(format!("iommud-svc{k}"))
                .spawn(move || {
                    if let Some(c) = cpu {
                        pin(c);
                    }
                    run(&st, &w)
                })?;
        }
        Ok(())
    }

    /// The CPU thread `k` is pinned to, if any.
    fn cpu_of(&self, k: usize) -> Option<usize> {
        (!self.cpus.is_empty()).then(|| self.cpus[k % self.cpus.len()])
    }

    /// Serves `d`'s rings from now on: each ring gets a home thread
    /// ([`homes`]), and those threads take the domain in their lists.
    pub fn add(&self, d: Arc<Domain>) {
        let rings = d.rings().map_or(1, |r| r.count());
        let loads: Vec<usize> = self
            .workers
            .iter()
            .map(|w| {
                w.domains
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .iter()
                    .filter(|d| !d.is_dead())
                    .count()
            })
            .collect();
        let cpus: Vec<Option<usize>> = (0..self.workers.len()).map(|k| self.cpu_of(k)).collect();
        let home = homes(rings, &loads, &cpus);
        d.set_ring_homes(&home.iter().map(|&h| (h, cpus[h])).collect::<Vec<_>>());
        let mut chosen: Vec<&Arc<Worker>> = Vec::new();
        for &h in &home {
            if !chosen.iter().any(|w| w.index == h) {
                chosen.push(&self.workers[h]);
            }
        }
        // Counted awake before any of them can sleep with it in its list.
        d.set_ring_servers(chosen.len() as u32);
        for w in chosen {
            w.asleep.store(false, SeqCst);
            w.domains
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(d.clone());
            w.generation.fetch_add(1, SeqCst);
            ring(w.wake.as_ref());
        }
    }

    /// Makes every thread return.
    pub fn stop(&self) {
        self.stopping.store(true, SeqCst);
        for w in &self.workers {
            ring(w.wake.as_ref());
        }
    }
}

/// The home thread of each of `rings` rings, given each thread's load
/// (domains served) and the CPU it is pinned to. Clients use ring
/// [`iommu_abi::ring::ring_of_cpu`], so ring `k` goes to the least loaded thread pinned to a
/// CPU of ring `k` (that thread then shares its CPU with the ring's
/// clients and hands over to them at once); failing that, to the least
/// loaded thread, and as many distinct threads as there are rings.
pub fn homes(rings: usize, loads: &[usize], cpus: &[Option<usize>]) -> Vec<usize> {
    let threads = loads.len().min(cpus.len());
    if threads == 0 {
        return vec![0; rings];
    }
    let mut load: Vec<usize> = loads[..threads].to_vec();
    let mut out = Vec::with_capacity(rings);
    for k in 0..rings {
        let on_cpu = (0..threads)
            .filter(|&t| cpus[t].is_some_and(|c| iommu_abi::ring::ring_of_cpu(c, rings) == k))
            .min_by_key(|&t| (load[t], t));
        let t = on_cpu.unwrap_or_else(|| {
            (0..threads)
                .min_by_key(|&t| (out.contains(&t), load[t], t))
                .unwrap_or(0)
        });
        load[t] += 1;
        out.push(t);
    }
    out
}

/// Pins the calling thread to `cpu` (a dedicated core, as io_uring's
/// SQPOLL thread may have); says so, or why not.
fn pin(cpu: usize) {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET stays within it
        // for cpu < CPU_SETSIZE (checked); sched_setaffinity reads it.
        let r = unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            if cpu >= libc::CPU_SETSIZE as usize {
                -1
            } else {
                libc::CPU_SET(cpu, &mut set);
                libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
            }
        };
        if r == 0 {
            log::info(&format!("ring service thread pinned to CPU {cpu}"));
        } else {
            log::warn(&format!(
                "cannot pin the ring service thread to CPU {cpu}: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    #[cfg(not(target_os = "linux"))]
    log::warn(&format!("pinning to CPU {cpu} is not supported here"));
}

fn ring(fd: Option<&OwnedFd>) {
    if let Some(fd) = fd {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer to an fd we own.
        let _ = unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), 8) };
    }
}

fn drain(fd: i32) {
    let mut b = [0u8; 8];
    // SAFETY: reads at most 8 bytes into a live buffer; the fd is non-blocking.
    let _ = unsafe { libc::read(fd, b.as_mut_ptr().cast(), 8) };
}

fn run(state: &Arc<State>, w: &Worker) {
    let svc = &state.service;
    let mut doms: Vec<Arc<Domain>> = Vec::new();
    let mut seen = u64::MAX;
    let mut last_work = Instant::now();
    // When this thread last finished passes that did work: a pass held
    // before that goes on (its invalidation follows that work).
    let mut other_work: Option<Instant> = None;
    // The last passes that did work completed entries for clients on this
    // thread's CPU.
    let mut local = false;
    let asleep = |t: usize| svc.workers.get(t).is_some_and(|w| w.asleep.load(SeqCst));
    let me = crate::domain::Passer {
        index: w.index,
        cpu: svc.cpu_of(w.index),
        asleep: &asleep,
    };
    while !svc.stopping.load(SeqCst) && !state.stop.load(SeqCst) {
        let g = w.generation.load(SeqCst);
        if g != seen {
            seen = g;
            let mut list = w.domains.lock().unwrap_or_else(|p| p.into_inner());
            list.retain(|d| !d.is_dead());
            doms = list.clone();
        }
        let mut work = 0u32;
        let mut dead = false;
        let mut held = false;
        let mut woke = 0u32;
        let mut local_now = false;
        for d in &doms {
            dead |= d.is_dead();
            // A bug reached through one client's ring must not stop the others.
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                d.serve_rings(&me, other_work, svc.lazy_hold)
            })) {
                Ok(crate::domain::Served {
                    entries: n,
                    deferred,
                    held: h,
                    local: l,
                    woke: woken,
                }) => {
                    held |= h;
                    local_now |= l;
                    woke |= woken;
                    if n > 0 {
                        // This thread serves one pass after another: work
                        // that ended now began after any pass held before.
                        other_work = Some(Instant::now());
                    }
                    // An idle epoch timer learns of iommud's own unmaps now.
                    // Only then: the timer thread outranks this one on its
                    // CPU, and waking it after every pass (a strict batch, a
                    // batch of maps: nothing for it to do) cost the next
                    // pass tens of microseconds under TCG (docs/PERFORMANCE.md).
                    if deferred && d.timer_idle() {
                        state.timer.kick();
                    }
                    work += n
                }
                Err(_) => {
                    crate::stats::add(&state.security.internal_errors, 1);
                    log::warn("a ring pass hit an internal error (panic caught)");
                }
            }
        }
        if dead {
            // Drop torn-down domains (their memory goes with the last Arc).
            w.generation.fetch_add(1, SeqCst);
        }
        // Wake the home threads whose rings this pass found asleep (once:
        // the flag is theirs again from now on).
        for t in (0..svc.workers.len().min(32)).filter(|t| woke & (1 << t) != 0) {
            if svc.workers[t].asleep.swap(false, SeqCst) {
                ring(svc.workers[t].wake.as_ref());
            }
        }
        if work > 0 {
            last_work = Instant::now();
            local = local_now;
            continue;
        }
        let idle = last_work.elapsed();
        // A held pass is never slept on: its bound is microseconds.
        if idle < svc.spin || held {
            // Right after work the next entry is likely microseconds away:
            // look without giving the CPU up; later, yield between looks so a
            // client on this CPU runs.
            if idle < HOT && !local {
                for _ in 0..64 {
                    std::hint::spin_loop();
                }
            } else {
                std::thread::yield_now();
            }
            continue;
        }
        // Sleep: say so, then look once more (a client that submitted
        // before seeing no thread awake is found here; one after rings).
        for d in &doms {
            d.set_ring_idle(true);
        }
        w.asleep.store(true, SeqCst);
        std::sync::atomic::fence(SeqCst);
        let pending = doms
            .iter()
            .any(|d| d.rings().is_some_and(|r| r.pending(&me)));
        if !pending {
            let mut fds: Vec<libc::pollfd> = Vec::with_capacity(doms.len() + 1);
            if let Some(f) = &w.wake {
                fds.push(libc::pollfd {
                    fd: f.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
            for d in &doms {
                if let Some(r) = d.rings() {
                    fds.push(libc::pollfd {
                        fd: r.doorbell.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    });
                }
            }
            let timeout = if w.wake.is_some() { SLEEP_MS } else { 10 };
            // SAFETY: `fds` is a live array of `fds.len()` pollfds.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
            if n == 0 {
                // Woken by the timeout, not by a client: one pass, and back
                // to sleep at once unless it finds entries (spinning after
                // every timeout would cost an idle daemon 2 ms a second).
                for d in &doms {
                    d.set_ring_idle(false);
                }
                last_work = Instant::now().checked_sub(svc.spin).unwrap_or(last_work);
                continue;
            }
            if n > 0 {
                let wake_fd = w.wake.as_ref().map(|f| f.as_raw_fd());
                for p in &fds {
                    if p.revents != 0 {
                        drain(p.fd);
                        if Some(p.fd) != wake_fd {
                            if let Some(d) = doms
                                .iter()
                                .find(|d| d.rings().is_some_and(|r| r.doorbell.as_raw_fd() == p.fd))
                            {
                                crate::stats::add(&d.stats.ring_doorbells, 1);
                            }
                        }
                    }
                }
            }
        }
        w.asleep.store(false, SeqCst);
        for d in &doms {
            d.set_ring_idle(false);
        }
        last_work = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::homes;

    #[test]
    fn a_ring_goes_home_to_the_thread_pinned_on_its_clients_cpu() {
        // Clients on CPU k use ring k % rings.
        assert_eq!(homes(2, &[0, 0], &[Some(0), Some(1)]), vec![0, 1]);
        assert_eq!(homes(2, &[0, 0], &[Some(1), Some(0)]), vec![1, 0]);
        // Pinned to CPUs 2 and 3 of a 2-ring client: 2 % 2 = ring 0.
        assert_eq!(homes(2, &[5, 0], &[Some(2), Some(3)]), vec![0, 1]);
        // The only thread, pinned to CPU 1 (the guest's layout): every ring.
        assert_eq!(homes(2, &[0], &[Some(1)]), vec![0, 0]);
        // Two threads on CPU 1: the less loaded one.
        assert_eq!(homes(2, &[3, 1], &[Some(1), Some(1)]), vec![1, 1]);
    }

    #[test]
    fn unpinned_threads_share_the_rings_least_loaded_first() {
        assert_eq!(homes(2, &[3, 0], &[None, None]), vec![1, 0]);
        assert_eq!(homes(4, &[0, 0], &[None, None]), vec![0, 1, 0, 1]);
        assert_eq!(homes(1, &[2, 1, 0], &[None, None, None]), vec![2]);
        // More threads than rings: one thread per ring.
        assert_eq!(homes(2, &[0, 0, 0], &[None, None, None]), vec![0, 1]);
        // No thread known: ring 0's default.
        assert_eq!(homes(3, &[], &[]), vec![0, 0, 0]);
    }
}
