//! The multi-queue loop: queue pair q = TX queue q of NIC A and RX queue q of NIC B (two
//! NICs on one QEMU hub), driven by worker thread q pinned to CPU q (mod the CPU count).
//! Worker q sends IPv4/UDP frames from source ports RSS sends to RX queue q, with up to
//! `window` in flight, checks every frame it receives (queue, sequence, length,
//! checksums) and counts received / corrupt / duplicate / misrouted / foreign; frames
//! never seen are lost. Each worker maps and unmaps on its own CPU, so with libdma's
//! magazines every queue uses its CPU's magazines.

use std::sync::Barrier;
use std::time::{Duration, Instant};

use crate::frame::{self, Bad};
use crate::queue::{RxMeta, RxQueue, TxQueue};
use crate::rss::{self, RETA_LEN};
use crate::{Error, Result};

/// Sequence number of settle probes (never a data frame's).
pub const PROBE_SEQ: u64 = u64::MAX;
/// No frame arrived on a queue for this long: what it has in flight is written off.
const STALL: Duration = Duration::from_secs(2);
/// How long a queue pair may take to start delivering.
const SETTLE: Duration = Duration::from_secs(5);
/// Frames per `send_batch`.
const TX_BATCH: usize = 32;
/// Source ports (flows) per queue.
const FLOWS: usize = 16;

/// What to run.
#[derive(Debug, Clone, Copy)]
pub struct LoopCfg {
    /// Frames per queue.
    pub packets: u64,
    /// Ethernet payload bytes (the IPv4 packet), `frame::MIN_SIZE..=frame::MAX_SIZE`.
    pub size: usize,
    /// Frames in flight per queue.
    pub window: u16,
    /// Pin worker q to CPU q mod the CPU count.
    pub pin: bool,
}

/// One queue's outcome.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tally {
    /// Queue pair.
    pub queue: u16,
    /// CPU the worker ran on at the end (`sched_getcpu`), -1 if unknown.
    pub cpu: i32,
    /// Frames sent.
    pub sent: u64,
    /// Intact frames received on this queue for this queue.
    pub received: u64,
    /// Frames of ours with a bad length or checksum.
    pub corrupt: u64,
    /// Frames seen twice.
    pub duplicate: u64,
    /// Intact frames meant for another queue.
    pub misrouted: u64,
    /// Frames whose written-back RSS hash differs from the one computed here.
    pub rss_mismatch: u64,
    /// Frames not ours.
    pub foreign: u64,
    /// Frames sent and never received.
    pub lost: u64,
    /// Seconds from the common start to this queue's last frame.
    pub elapsed_s: f64,
    /// Buffer maps and unmaps this worker made during the loop (TX queue + RX queue),
    /// all on its own CPU.
    pub maps: u64,
    /// See `maps`.
    pub unmaps: u64,
    /// Batched map/unmap calls it made (one `map_batch` or `unmap_batch` each).
    pub batches: u64,
}

impl Tally {
    /// Received frames per second.
    pub fn pps(&self) -> f64 {
        self.received as f64 / self.elapsed_s.max(1e-9)
    }

    fn classify(&mut self, seen: &mut [bool], table: &[u8; RETA_LEN], f: &[u8], m: RxMeta) {
        match frame::check(f) {
            Ok((_, PROBE_SEQ, _)) => {}
            Ok((q, seq, sport)) => {
                let h = rss::toeplitz(
                    &rss::KEY,
                    &rss::ipv4_udp_input(frame::SRC_IP, frame::DST_IP, sport, frame::DPORT),
                );
                if m.rss_type != 0 && m.rss_hash != h {
                    self.rss_mismatch += 1;
                }
                if q != m.queue || rss::queue_of(table, h) != q as u8 {
                    self.misrouted += 1;
                    return;
                }
                match usize::try_from(seq).ok().and_then(|i| seen.get_mut(i)) {
                    Some(s) if *s => self.duplicate += 1,
                    Some(s) => {
                        *s = true;
                        self.received += 1;
                    }
                    None => self.foreign += 1,
                }
            }
            Err(Bad::Corrupt) => self.corrupt += 1,
            Err(Bad::Foreign) => self.foreign += 1,
        }
    }

    /// `queue: q=0 cpu=0 sent=N received=N ... pps=...`
    pub fn line(&self) -> String {
        format!(
            "queue: q={} cpu={} sent={} received={} corrupt={} lost={} duplicate={} misrouted={} rss_mismatch={} foreign={} pps={:.1} elapsed_s={:.3} maps={} unmaps={} map_batches={}",
            self.queue,
            self.cpu,
            self.sent,
            self.received,
            self.corrupt,
            self.lost,
            self.duplicate,
            self.misrouted,
            self.rss_mismatch,
            self.foreign,
            self.pps(),
            self.elapsed_s,
            self.maps,
            self.unmaps,
            self.batches
        )
    }
}

/// Pins the calling thread to `cpu` (mod the CPU count). Returns the CPU it runs on.
#[cfg_attr(not(target_os = "linux"), allow(unused_variables))]
pub fn pin_to(cpu: usize) -> i32 {
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    #[cfg(target_os = "linux")]
    {
        // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET write inside it; the call
        // reads `size_of` bytes of it for the calling thread (pid 0).
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_ZERO(&mut set);
            libc::CPU_SET(cpu % n, &mut set);
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                eprintln!(
                    "nicdesc: pinning to CPU {}: {}",
                    cpu % n,
                    std::io::Error::last_os_error()
                );
            }
        }
        // SAFETY: no preconditions.
        unsafe { libc::sched_getcpu() }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = n;
        -1
    }
}

/// Sends probes on `tx` until one arrives on `rx` (bounded), then drains `rx`.
pub fn settle(
    tx: &mut TxQueue,
    rx: &mut RxQueue,
    dst: [u8; 6],
    src: [u8; 6],
    sport: u16,
) -> Result<Duration> {
    let start = Instant::now();
    let mut probe = Vec::new();
    frame::build(dst, src, sport, tx.index(), PROBE_SEQ, 64, &mut probe);
    let mut arrived = false;
    while !arrived {
        if start.elapsed() > SETTLE {
            return Err(Error::Device(format!(
                "queue {}: no probe reached RX queue {} within {} s",
                tx.index(),
                rx.index(),
                SETTLE.as_secs()
            )));
        }
        if tx.in_flight() == 0 {
            tx.send_batch(&[&probe])?;
        }
        let until = Instant::now() + Duration::from_millis(50);
        while !arrived && Instant::now() < until {
            tx.reap()?;
            rx.recv_batch(64, |f, _| {
                arrived |= matches!(frame::check(f), Ok((_, PROBE_SEQ, _)))
            })?;
        }
    }
    let took = start.elapsed();
    let until = Instant::now() + Duration::from_millis(20);
    while Instant::now() < until {
        tx.reap()?;
        rx.recv_batch(64, |_, _| {})?;
    }
    tx.flush(1000)?;
    Ok(took)
}

/// Where a worker's frames go: MACs, B's redirection table, the flows' source ports.
struct Flows<'a> {
    dst: [u8; 6],
    src: [u8; 6],
    table: &'a [u8; RETA_LEN],
    ports: &'a [u16],
}

fn worker(
    cfg: &LoopCfg,
    tx: &mut TxQueue,
    rx: &mut RxQueue,
    fl: Flows<'_>,
    start_line: &Barrier,
) -> Result<Tally> {
    let Flows {
        dst,
        src,
        table,
        ports,
    } = fl;
    let q = tx.index();
    let cpu = if cfg.pin { pin_to(usize::from(q)) } else { -1 };
    let n = usize::try_from(cfg.packets).map_err(|_| Error::Device("too many packets".into()))?;
    let mut seen = vec![false; n];
    let mut t = Tally {
        queue: q,
        cpu,
        ..Tally::default()
    };
    let mut frames: Vec<Vec<u8>> = (0..TX_BATCH)
        .map(|_| Vec::with_capacity(frame::ETH_HDR + cfg.size))
        .collect();
    let window = u64::from(cfg.window.max(1));
    let (tx0, rx0) = (tx.stats(), rx.stats());
    start_line.wait();
    let start = Instant::now();
    let (mut last_rx, mut last_progress) = (start, start);
    let mut written_off = 0u64;
    while t.received + t.corrupt + written_off < cfg.packets {
        let done = t.received + t.corrupt + written_off;
        let in_flight = t.sent - done.min(t.sent);
        let room = window.saturating_sub(in_flight).min(cfg.packets - t.sent) as usize;
        let k = room.min(TX_BATCH);
        if k > 0 {
            for (j, f) in frames.iter_mut().take(k).enumerate() {
                let seq = t.sent + j as u64;
                let sport = ports[seq as usize % ports.len()];
                frame::build(dst, src, sport, q, seq, cfg.size, f);
            }
            let refs: Vec<&[u8]> = frames[..k].iter().map(Vec::as_slice).collect();
            t.sent += tx.send_batch(&refs)? as u64;
        }
        // TX completions are reaped by the next send, paired with its frames.
        let got = rx.recv_batch(64, |f, m| t.classify(&mut seen, table, f, m))?;
        let now = Instant::now();
        if got > 0 {
            last_rx = now;
            last_progress = now;
        } else if now.duration_since(last_progress) > STALL {
            let done = t.received + t.corrupt + written_off;
            written_off += t.sent - done.min(t.sent);
            last_progress = now;
            if t.sent == 0 {
                break;
            }
        }
    }
    tx.flush(1000)?;
    t.elapsed_s = last_rx.duration_since(start).as_secs_f64();
    t.lost = cfg.packets.saturating_sub(t.received + t.corrupt);
    let (tx1, rx1) = (tx.stats(), rx.stats());
    t.maps = (tx1.maps - tx0.maps) + (rx1.maps - rx0.maps);
    t.unmaps = (tx1.unmaps - tx0.unmaps) + (rx1.unmaps - rx0.unmaps);
    t.batches = (tx1.batches - tx0.batches) + (rx1.batches - rx0.batches);
    if cfg.pin {
        // SAFETY: no preconditions.
        #[cfg(target_os = "linux")]
        {
            t.cpu = unsafe { libc::sched_getcpu() };
        }
    }
    Ok(t)
}

/// Runs the loop over `pairs` (TX queue q of A, RX queue q of B), one pinned thread per
/// pair, all starting together. `table` is the redirection table B was programmed with.
pub fn run(
    cfg: &LoopCfg,
    pairs: Vec<(&mut TxQueue, &mut RxQueue)>,
    dst: [u8; 6],
    src: [u8; 6],
    table: &[u8; RETA_LEN],
) -> Result<Vec<Tally>> {
    let start_line = Barrier::new(pairs.len());
    let mut flows = Vec::new();
    for (tx, _) in &pairs {
        let ports = rss::ports_for_queue(
            table,
            frame::SRC_IP,
            frame::DST_IP,
            frame::DPORT,
            tx.index() as u8,
            FLOWS,
        );
        if ports.is_empty() {
            return Err(Error::Device(format!(
                "no UDP source port reaches queue {}",
                tx.index()
            )));
        }
        flows.push(ports);
    }
    std::thread::scope(|s| {
        let handles: Vec<_> = pairs
            .into_iter()
            .zip(&flows)
            .map(|((tx, rx), ports)| {
                let sl = &start_line;
                s.spawn(move || {
                    let fl = Flows {
                        dst,
                        src,
                        table,
                        ports,
                    };
                    worker(cfg, tx, rx, fl, sl)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::Device("a queue worker panicked".into())))
            })
            .collect()
    })
}

/// The first source port that reaches `queue` (for settle probes).
pub fn probe_port(table: &[u8; RETA_LEN], queue: u16) -> Option<u16> {
    rss::ports_for_queue(
        table,
        frame::SRC_IP,
        frame::DST_IP,
        frame::DPORT,
        queue as u8,
        1,
    )
    .first()
    .copied()
}
