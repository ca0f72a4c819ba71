//! `e1000d`: the 82540EM driver's traffic jobs.
//!
//! ```text
//! e1000d loop --tx 0000:00:01.0 --rx 0000:00:02.0 [--packets N] [--size BYTES]
//!             [--window W] [--burst B] [--no-tx-ahead] [--tx-depth D] [--no-keep]
//!             [--warmup N]
//!             [--mapper phys|libdma] [--ping-pong]
//!             [--bad-iova ADDR]
//!             [--strategy global|magazine] [--flush strict|percore] [--socket PATH]
//!             [--canary [--canary-only]] [--then SHELL-COMMAND] [--bad-iova-at N]
//!             [--duration SECS [--report-every SECS] [--report-cmd SHELL-COMMAND]]
//! e1000d storm --nic BDF [--iova ADDR] [--descriptors N] [--seconds S] [loop's mapper options]
//! e1000d info BDF
//! ```
//! `loop` sends N sequence-numbered, checksummed frames from the TX NIC to the RX NIC
//! (QEMU hub) with up to W in flight, at most B (default W) handed to the NIC at once,
//! verifies each one and prints
//! `loop: sent=N received=N corrupt=0 lost=0 duplicate=0 foreign=0 pps=<float>`;
//! it exits 1 if any frame was lost or corrupt. `--ping-pong` instead echoes each frame
//! back (A→B→A) and prints round-trip p50/p99 in µs.
//!
//! `--mapper libdma` attaches one iommud domain per NIC (its BDF) over `--socket`
//! (default `/run/iommud.sock`) with `--strategy` (default magazine) and `--flush`
//! (default percore); every packet buffer is mapped before the NIC sees it and unmapped
//! when the NIC is done. After the loop each domain's `domains/<bdf>/stats` is printed
//! as `domain <bdf> <key> <value>` lines; `--then` runs a shell command at that point,
//! while both domains are still attached (e.g. `iommuctl cat /scheme/iommu/stats`).
//!
//! On Redox, started by pcid-spawner (`PCID_CLIENT_CHANNEL` set), it drives the function
//! pcid names under its iommud domain instead (see `src/redox.rs`).
//!
//! `--canary` (before the loop): fills a page of DMA memory the driver never maps with a
//! pattern, points the RX NIC's next descriptor at its physical address used as an IOVA,
//! sends a frame, and prints `canary: addr=<hex> bdf=<bdf> changed_bytes=N`: with the
//! IOMMU translating, N must be 0 (the write is blocked and shows up in iommud's faults).
//!
//! The next burst is prepared (copied into its TX buffers, its maps submitted) as soon
//! as the previous one went out, and handed to the NIC once the window has room for it:
//! a mapper that serves maps elsewhere (iommud's rings) maps it while this thread
//! receives. `--tx-depth D` prepares up to D bursts ahead (default 1), each submitted
//! as soon as the one D before it went out. `--no-tx-ahead` prepares a burst only once
//! the window has room (its maps are then served while this thread receives only what
//! is still in flight).
//!
//! A buffer the driver unmaps and maps again at once (an RX slot's refill, a reaped TX
//! buffer carrying the next frame) may keep its IOVA under `percore` (and `deferred`):
//! the device reaches exactly the pages it could reach through the old, not yet
//! invalidated, mapping (docs/ARCHITECTURE.md, "Kept remaps"). `--no-keep` gives every
//! such remap a new IOVA, as `strict` always does.
//!
//! `--bad-iova-at N` posts the `--bad-iova` descriptor in the middle of the burst, after
//! N frames were sent, instead of before it.
//!
//! Each burst also prints where its time went, per frame received:
//! `cost_ns: map=.. unmap=.. ring=.. other=.. total=.. batch=..` (see `src/cost.rs`;
//! `batch` is buffers per map or unmap call).
//!
//! `--duration SECS` (soak): repeats bursts of `--packets` frames for SECS seconds on the
//! same two domains and, every `--report-every` seconds (default 60) and at the end,
//! prints `soak: t_s=.. frames=.. pps=.. lost=.. corrupt=..` (the frames and rate of that
//! period) and runs `--report-cmd`.
//!
//! `storm` keeps one NIC's TX ring full of descriptors at unmapped IOVAs (256 pages from
//! `--iova`, default 0x900000) until `--descriptors` (default: no limit) were consumed or
//! `--seconds` (default 10) passed, and prints `storm: bdf=.. posted=N consumed=N ..`.
//! `--canary-only` runs just that step, with no settling before it and no burst after it
//! (exit 0 iff the canary is intact): for NICs that must not be able to DMA at all.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use e1000d::payload::{self, Bad};
#[cfg(target_os = "linux")]
use e1000d::PhysMapper;
use e1000d::{DmaMapper, Error, LibdmaMapper, E1000};
use libdma::{DmaDomain, FlushPolicy, Strategy};

type Nic = E1000<Box<dyn DmaMapper>>;

const USAGE: &str =
    "usage: e1000d loop --tx BDF --rx BDF [--packets N] [--size BYTES] [--window W] [--burst B] \
[--no-tx-ahead] [--tx-depth D] [--no-keep] [--mapper phys|libdma] [--ping-pong] [--bad-iova ADDR] [--strategy global|magazine] \
[--flush strict|percore] [--socket PATH] [--canary [--canary-only]] [--then CMD] [--bad-iova-at N] \
[--warmup N] [--duration SECS [--report-every SECS] [--report-cmd CMD]]\n       \
e1000d storm --nic BDF [--iova ADDR] [--descriptors N] [--seconds S] [--mapper ..] [--strategy ..]\n       \
e1000d info BDF";

/// No frame arrived for this long: everything in flight is written off as lost.
const STALL: Duration = Duration::from_secs(2);
/// Sequence number of warm-up probes (never a data frame's).
const PROBE_SEQ: u64 = u64::MAX;
/// How long a path may take to start delivering. QEMU's e1000 refuses to receive (and
/// queues frames) for 1 s after every RCTL write (its `flush_queue_timer`), so the first
/// frames after `open` arrive about 1 s late.
const SETTLE: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
struct LoopOpts {
    tx: String,
    rx: String,
    packets: u64,
    /// Frames sent and checked before the measured burst, not reported.
    warmup: u64,
    size: usize,
    window: u64,
    /// Most frames handed to the NIC at once (0: the window). Below the window,
    /// the next burst goes out while the previous one is received.
    burst: u64,
    /// Prepare the next burst (copy, submit its maps) as soon as the last went
    /// out, and hand it to the NIC once the window has room (`--no-tx-ahead`:
    /// only once it has room).
    tx_ahead: bool,
    /// Bursts prepared ahead at most (`--tx-depth`, default 1: the next one).
    tx_depth: usize,
    /// Remaps of a recycled buffer may keep its IOVA (`--no-keep`: never).
    keep: bool,
    mapper: String,
    ping_pong: bool,
    bad_iova: Option<u64>,
    strategy: Strategy,
    flush: FlushPolicy,
    socket: PathBuf,
    canary: bool,
    canary_only: bool,
    then: Option<String>,
    bad_iova_at: Option<u64>,
    duration: Option<Duration>,
    report_every: Duration,
    report_cmd: Option<String>,
}

fn parse_u64(s: &str) -> Result<u64, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.map_err(|_| format!("not a number: {s:?}"))
}

/// The value of the option just read.
fn val(p: &mut lexopt::Parser) -> Result<String, String> {
    use lexopt::ValueExt;
    p.value()
        .and_then(|v| v.string())
        .map_err(|e| format!("{e}\n{USAGE}"))
}

fn parse_loop(args: &[String]) -> Result<LoopOpts, String> {
    let mut o = LoopOpts {
        tx: "0000:00:01.0".into(),
        rx: "0000:00:02.0".into(),
        packets: 10_000,
        warmup: 0,
        size: 1500,
        window: 32,
        burst: 0,
        tx_ahead: true,
        tx_depth: 1,
        keep: true,
        mapper: "phys".into(),
        ping_pong: false,
        bad_iova: None,
        strategy: Strategy::Magazine,
        flush: FlushPolicy::PerCore,
        socket: PathBuf::from(libdma::DEFAULT_SOCKET),
        canary: false,
        canary_only: false,
        then: None,
        bad_iova_at: None,
        duration: None,
        report_every: Duration::from_secs(60),
        report_cmd: None,
    };
    use lexopt::prelude::*;
    let mut p = lexopt::Parser::from_args(args);
    let e = |e: lexopt::Error| format!("{e}\n{USAGE}");
    while let Some(arg) = p.next().map_err(e)? {
        match arg {
            Long("tx") => o.tx = val(&mut p)?,
            Long("rx") => o.rx = val(&mut p)?,
            Long("packets") => o.packets = parse_u64(&val(&mut p)?)?,
            Long("warmup") => o.warmup = parse_u64(&val(&mut p)?)?,
            Long("size") => o.size = parse_u64(&val(&mut p)?)? as usize,
            Long("window") => o.window = parse_u64(&val(&mut p)?)?.max(1),
            Long("burst") => o.burst = parse_u64(&val(&mut p)?)?,
            Long("no-tx-ahead") => o.tx_ahead = false,
            Long("no-keep") => o.keep = false,
            Long("tx-depth") => o.tx_depth = parse_u64(&val(&mut p)?)?.clamp(1, 8) as usize,
            Long("mapper") => o.mapper = val(&mut p)?,
            Long("ping-pong") => o.ping_pong = true,
            Long("bad-iova") => o.bad_iova = Some(parse_u64(&val(&mut p)?)?),
            Long("strategy") => {
                let v = val(&mut p)?;
                o.strategy = Strategy::parse(&v).ok_or(format!(
                    "unknown strategy {v:?} (noiommu|global|magazine|identity|va)"
                ))?
            }
            Long("flush") => {
                let v = val(&mut p)?;
                o.flush = FlushPolicy::parse(&v).ok_or(format!(
                    "unknown flush policy {v:?} (strict|percore|deferred)"
                ))?
            }
            Long("socket") => o.socket = PathBuf::from(val(&mut p)?),
            Long("canary") => o.canary = true,
            Long("canary-only") => {
                o.canary = true;
                o.canary_only = true;
            }
            Long("then") => o.then = Some(val(&mut p)?),
            Long("bad-iova-at") => o.bad_iova_at = Some(parse_u64(&val(&mut p)?)?),
            Long("duration") => {
                o.duration = Some(Duration::from_secs(parse_u64(&val(&mut p)?)?.max(1)))
            }
            Long("report-every") => {
                o.report_every = Duration::from_secs(parse_u64(&val(&mut p)?)?.max(1))
            }
            Long("report-cmd") => o.report_cmd = Some(val(&mut p)?),
            _ => return Err(e(arg.unexpected())),
        }
    }
    if !(payload::MIN_PAYLOAD..=payload::MAX_PAYLOAD).contains(&o.size) {
        return Err(format!(
            "--size {} outside {}..={} (Ethernet payload bytes)",
            o.size,
            payload::MIN_PAYLOAD,
            payload::MAX_PAYLOAD
        ));
    }
    Ok(o)
}

/// A NIC's mapper, and its iommud domain when it has one.
type Mapper = (Box<dyn DmaMapper>, Option<Arc<DmaDomain>>);

/// The DMA mapper for the NIC at `bdf`. One mapper (one IOMMU domain) per device.
fn make_mapper(o: &LoopOpts, bdf: &str) -> Result<Mapper, String> {
    match o.mapper.as_str() {
        #[cfg(target_os = "linux")]
        "phys" => Ok((Box::new(PhysMapper::new()), None)),
        #[cfg(not(target_os = "linux"))]
        "phys" => Err("mapper phys needs Linux (hugepages and /proc/self/pagemap)".into()),
        "libdma" => {
            let sid = bdf
                .parse::<linuxhw::pci::Bdf>()
                .map_err(|e| format!("{bdf}: {e}"))?
                .source_id();
            #[cfg(not(target_os = "redox"))]
            let m = LibdmaMapper::connect(&o.socket, sid, o.strategy, o.flush)
                .map_err(|e| format!("{bdf}: iommud at {}: {e}", o.socket.display()))?;
            #[cfg(target_os = "redox")]
            let m = DmaDomain::open(sid, o.strategy, o.flush)
                .map(LibdmaMapper::from_domain)
                .map_err(|e| format!("{bdf}: iommu scheme: {e}"))?;
            let m = m.with_keep(o.keep);
            let d = m.domain();
            Ok((Box::new(m), Some(d)))
        }
        other => Err(format!("unknown mapper {other:?} (phys|libdma)")),
    }
}

fn open(bdf: &str, o: &LoopOpts) -> Result<(Nic, Option<Arc<DmaDomain>>), String> {
    let (m, dom) = make_mapper(o, bdf)?;
    let nic = E1000::open(bdf, m).map_err(|e| format!("{bdf}: {e}"))?;
    let mac = nic.mac();
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
        None => o.mapper.clone(),
    };
    println!(
        "e1000d: {bdf} up, mac {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}, mapper {how}",
        mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]
    );
    Ok((nic, dom))
}

/// Prints a domain's iommud counters as `domain <bdf> <key> <value>` lines.
fn print_domain(bdf: &str, d: &DmaDomain) {
    match d.read_path(&format!("domains/{bdf}/stats")) {
        Ok(text) => {
            for l in text.lines() {
                println!("domain {bdf} {l}");
            }
        }
        Err(err) => println!("domain {bdf} unreadable: {err}"),
    }
    let c = d.counts();
    println!(
        "domain {bdf} client_round_trips {} client_wakeups {} client_kept {}",
        c.round_trips, c.wakeups, c.kept
    );
}

/// Byte pattern of the canary page.
fn canary_byte(i: usize) -> u8 {
    (i as u8) ^ 0xA5
}

/// Points `b`'s next RX descriptor at a page nobody mapped, sends frames at it from `a`,
/// and checks the page afterwards. Returns the number of changed bytes.
fn canary(a: &mut Nic, b: &mut Nic) -> Result<usize, String> {
    const LEN: usize = 4096;
    let page = b.mapper().alloc(LEN).map_err(e)?;
    let p = page.as_ptr();
    for i in 0..LEN {
        // SAFETY: i < LEN = page.len(); the page is this driver's and no device can reach
        // it through a mapping; raw-pointer volatile writes, no reference.
        unsafe { p.add(i).write_volatile(canary_byte(i)) };
    }
    let addr = page.phys();
    let done_before = b.rx_unmapped_done();
    b.post_rx_unmapped(addr).map_err(e)?;
    let mut frame = Vec::new();
    payload::build(b.mac(), a.mac(), PROBE_SEQ, 1000, &mut frame);
    a.send(&frame).map_err(e)?;
    let until = Instant::now() + Duration::from_secs(2);
    while b.rx_unmapped_done() == done_before && Instant::now() < until {
        a.reap_tx().map_err(e)?;
        b.recv_batch(64, |_| {}).map_err(e)?;
    }
    // A device the IOMMU blocks never completes its TX descriptor: report, do not fail.
    let flushed = a.flush_tx(Duration::from_secs(1)).is_ok();
    let completed = b.rx_unmapped_done() > done_before;
    let mut changed = 0;
    for i in 0..LEN {
        // SAFETY: as above; reading back through a raw pointer.
        if unsafe { p.add(i).read_volatile() } != canary_byte(i) {
            changed += 1;
        }
    }
    println!(
        "canary: addr={addr:#x} bdf={} descriptor_completed={completed} tx_flushed={flushed} \
         changed_bytes={changed}",
        b.bdf()
    );
    Ok(changed)
}

fn e(x: Error) -> String {
    x.to_string()
}

fn print_stats(role: &str, nic: &mut Nic) -> Result<(), String> {
    let s = nic.stats().map_err(e)?;
    println!(
        "stats {role} {}: tx_packets={} tx_bytes={} tx_errors={} ring_full={} rx_packets={} rx_bytes={} \
rx_errors={} rx_crc_errors={} rx_malformed={} maps={} unmaps={} hw_gptc={} hw_gprc={} hw_crcerrs={} hw_mpc={} hw_rnbc={}",
        nic.bdf(),
        s.tx_packets,
        s.tx_bytes,
        s.tx_errors,
        s.tx_ring_full,
        s.rx_packets,
        s.rx_bytes,
        s.rx_errors,
        s.rx_crc_errors,
        s.rx_malformed,
        s.maps,
        s.unmaps,
        s.hw_gptc,
        s.hw_gprc,
        s.hw_crcerrs,
        s.hw_mpc,
        s.hw_rnbc
    );
    Ok(())
}

/// Sends probe frames `from` → `to` until one arrives (bounded by [`SETTLE`]), then
/// drains `to`. Keeps the receive setup delay of the NIC model out of the measurement.
fn settle(from: &mut Nic, to: &mut Nic) -> Result<Duration, String> {
    let start = Instant::now();
    let mut frame = Vec::new();
    payload::build(to.mac(), from.mac(), PROBE_SEQ, 64, &mut frame);
    let mut arrived = false;
    while !arrived {
        if start.elapsed() > SETTLE {
            return Err(format!(
                "no frame from {} reached {} within {} s",
                from.bdf(),
                to.bdf(),
                SETTLE.as_secs()
            ));
        }
        if from.tx_in_flight() == 0 {
            from.send(&frame).map_err(e)?;
        }
        from.reap_tx().map_err(e)?;
        let until = Instant::now() + Duration::from_millis(100);
        while !arrived && Instant::now() < until {
            to.recv_batch(64, |f| arrived |= payload::check(f) == Ok(PROBE_SEQ))
                .map_err(e)?;
        }
    }
    let took = start.elapsed();
    // Drain late duplicates of the probe.
    let until = Instant::now() + Duration::from_millis(20);
    while Instant::now() < until {
        from.reap_tx().map_err(e)?;
        to.recv_batch(64, |_| {}).map_err(e)?;
    }
    from.flush_tx(Duration::from_secs(1)).map_err(e)?;
    println!(
        "settle: {} -> {} delivering after {:.0} ms",
        from.bdf(),
        to.bdf(),
        took.as_secs_f64() * 1e3
    );
    Ok(took)
}

/// Posts one descriptor at an unmapped IOVA, waits for the NIC to finish it, drains
/// whatever reached the other side.
fn inject_bad_iova(a: &mut Nic, b: &mut Nic, iova: u64) -> Result<(), String> {
    a.send_unmapped(iova, 64).map_err(e)?;
    match a.flush_tx(Duration::from_secs(1)) {
        Ok(()) => println!(
            "bad-iova: TX descriptor at iova {iova:#x} completed (DD set; a blocked read shows only in iommud's fault records)"
        ),
        Err(err) => println!("bad-iova: TX descriptor at iova {iova:#x}: {err}"),
    }
    let until = Instant::now() + Duration::from_millis(50);
    let mut arrived = 0;
    while Instant::now() < until {
        arrived += b.recv_batch(64, |_| {}).map_err(e)?;
    }
    println!(
        "bad-iova: {arrived} frame(s) arrived on {} from it",
        b.bdf()
    );
    Ok(())
}

#[derive(Default)]
struct Tally {
    received: u64,
    corrupt: u64,
    duplicate: u64,
    foreign: u64,
}

impl Tally {
    fn classify(&mut self, seen: &mut [bool], frame: &[u8]) {
        match payload::check(frame) {
            Ok(seq) => match usize::try_from(seq).ok().and_then(|i| seen.get_mut(i)) {
                Some(s) if *s => self.duplicate += 1,
                Some(s) => {
                    *s = true;
                    self.received += 1;
                }
                // An intact frame with a sequence number we never sent.
                None => self.foreign += 1,
            },
            Err(Bad::Corrupt) => self.corrupt += 1,
            Err(Bad::Foreign) => self.foreign += 1,
        }
    }
}

fn run_loop(o: &LoopOpts) -> Result<bool, String> {
    let (mut a, da) = open(&o.tx, o)?;
    let (mut b, db) = open(&o.rx, o)?;
    if o.canary_only {
        // Only the canary step, with no settling first: for a device that must not be
        // able to DMA at all (e.g. after iommud stopped), where nothing would settle.
        let n = canary(&mut a, &mut b)?;
        return Ok(n == 0);
    }
    settle(&mut a, &mut b)?;
    if o.ping_pong {
        settle(&mut b, &mut a)?;
    }
    if let (Some(iova), None) = (o.bad_iova, o.bad_iova_at) {
        inject_bad_iova(&mut a, &mut b, iova)?;
        // Let iommud record (and clear) the fault before the next one: the unit keeps
        // one record and drops a second fault until it is cleared.
        std::thread::sleep(Duration::from_millis(200));
    }
    let canary_changed = if o.canary {
        let n = canary(&mut a, &mut b)?;
        std::thread::sleep(Duration::from_millis(200));
        n
    } else {
        0
    };
    // Calibrate the cost clock before any timed loop.
    e1000d::cost::ticks_per_ns();
    let ok = if o.ping_pong {
        ping_pong(o, &mut a, &mut b)?
    } else if let Some(d) = o.duration {
        soak(o, d, &mut a, &mut b)?
    } else {
        warm_up(o, &mut a, &mut b)? && burst(o, &mut a, &mut b, true)?.ok()
    };
    for (nic, d) in [(&a, &da), (&b, &db)] {
        if let Some(d) = d {
            print_domain(nic.bdf(), d);
        }
    }
    if let Some(cmd) = &o.then {
        match std::process::Command::new("sh").arg("-c").arg(cmd).status() {
            Ok(st) if st.success() => {}
            Ok(st) => println!("e1000d: --then {cmd:?}: {st}"),
            Err(err) => println!("e1000d: --then {cmd:?}: {err}"),
        }
    }
    Ok(ok && canary_changed == 0)
}

/// `o.warmup` frames through the same loop before the measured burst, so that what
/// it measures is the steady state: the code paths already run once (under QEMU's
/// TCG the first run of a path translates it), the IOVA caches filled and iommud's
/// service threads awake. Every frame is checked as in the burst; true if all arrived
/// intact.
fn warm_up(o: &LoopOpts, a: &mut Nic, b: &mut Nic) -> Result<bool, String> {
    if o.warmup == 0 {
        return Ok(true);
    }
    let w = LoopOpts {
        packets: o.warmup,
        bad_iova: None,
        bad_iova_at: None,
        ..o.clone()
    };
    let start = Instant::now();
    let r = burst(&w, a, b, false)?;
    println!(
        "warmup: sent={} received={} lost={} corrupt={} elapsed_s={:.3}",
        w.packets,
        r.received,
        r.lost,
        r.corrupt,
        start.elapsed().as_secs_f64()
    );
    Ok(r.ok())
}

/// What one burst moved.
struct Burst {
    received: u64,
    lost: u64,
    corrupt: u64,
}

impl Burst {
    fn ok(&self) -> bool {
        self.lost == 0 && self.corrupt == 0
    }
}

/// Soak: bursts back to back for `d`, a report every `o.report_every` and at the end.
fn soak(o: &LoopOpts, d: Duration, a: &mut Nic, b: &mut Nic) -> Result<bool, String> {
    let start = Instant::now();
    let (mut frames, mut lost, mut corrupt, mut bursts) = (0u64, 0u64, 0u64, 0u64);
    let (mut period_frames, mut period_start) = (0u64, Duration::ZERO);
    let mut next_report = o.report_every;
    loop {
        let r = burst(o, a, b, false)?;
        bursts += 1;
        frames += r.received;
        period_frames += r.received;
        lost += r.lost;
        corrupt += r.corrupt;
        let now = start.elapsed();
        let done = now >= d;
        if now >= next_report || done {
            let secs = (now - period_start).as_secs_f64().max(1e-9);
            println!(
                "soak: t_s={:.1} bursts={bursts} frames={period_frames} pps={:.1} lost={lost} \
corrupt={corrupt} total_frames={frames}",
                now.as_secs_f64(),
                period_frames as f64 / secs
            );
            if let Some(cmd) = &o.report_cmd {
                match std::process::Command::new("sh").arg("-c").arg(cmd).status() {
                    Ok(st) if st.success() => {}
                    Ok(st) => println!("e1000d: --report-cmd {cmd:?}: {st}"),
                    Err(err) => println!("e1000d: --report-cmd {cmd:?}: {err}"),
                }
            }
            period_frames = 0;
            period_start = start.elapsed();
            while next_report <= now {
                next_report += o.report_every;
            }
        }
        if done {
            break;
        }
    }
    print_stats("tx", a)?;
    print_stats("rx", b)?;
    println!(
        "soak-end: seconds={:.1} bursts={bursts} frames={frames} lost={lost} corrupt={corrupt}",
        start.elapsed().as_secs_f64()
    );
    Ok(lost == 0 && corrupt == 0)
}

/// One burst of `o.packets` frames; `report`: print the NICs' stats, the `loop:` and the
/// `cost_ns:` lines.
fn burst(o: &LoopOpts, a: &mut Nic, b: &mut Nic, report: bool) -> Result<Burst, String> {
    let n = usize::try_from(o.packets).map_err(|_| "--packets too large".to_string())?;
    let mut seen = vec![false; n];
    let mut t = Tally::default();
    let (dst, src) = (b.mac(), a.mac());
    // The frames to send next, built in sequence (the application's side of the
    // loop): a burst's worth is built after each receive, so a burst is copied
    // and mapped the moment the previous one went out.
    let burst_len = if o.burst == 0 { o.window } else { o.burst };
    let mut queue: VecDeque<Vec<u8>> = VecDeque::new();
    let mut spare: Vec<Vec<u8>> = Vec::new();
    let mut built: u64 = 0;
    let mut build = |queue: &mut VecDeque<Vec<u8>>, spare: &mut Vec<Vec<u8>>| {
        while (queue.len() as u64) < burst_len && built < o.packets {
            let mut f = spare
                .pop()
                .unwrap_or_else(|| Vec::with_capacity(payload::ETH_HDR + o.size));
            payload::build(dst, src, built, o.size, &mut f);
            queue.push_back(f);
            built += 1;
        }
    };
    let mut sent: u64 = 0;
    let mut written_off: u64 = 0;
    let start = Instant::now();
    let mut last_progress = start;
    let mut last_rx = start;
    let mut first_rx: Option<Instant> = None;
    let mut max_gap = Duration::ZERO;
    let mut bad_pending = o.bad_iova.zip(o.bad_iova_at);
    // The next bursts, prepared ahead (see the loop), oldest first.
    let mut tx: VecDeque<e1000d::TxBatch> = VecDeque::new();
    let depth = if o.tx_ahead { o.tx_depth.max(1) } else { 1 };
    a.reset_cost();
    b.reset_cost();
    loop {
        let accounted = t.received + t.corrupt + t.duplicate + written_off;
        let in_flight = sent.saturating_sub(accounted);
        if sent == o.packets && in_flight == 0 {
            break;
        }
        // Up to a burst of frames at once, within the window: one map request, one
        // tail write. A burst is prepared (copied, its maps submitted) ahead, as soon
        // as the previous one went out, and posted once the window has room for all
        // of it; its maps are collected only then, so a mapper that serves them
        // elsewhere (iommud's rings) works while this thread receives.
        let room = o.window.saturating_sub(in_flight);
        if tx.front().is_some_and(|b| b.frames() as u64 <= room) {
            if let Some(batch) = tx.pop_front() {
                sent += a
                    .tx_post(batch)
                    .map_err(|err| format!("{}: send #{sent}: {err}", a.bdf()))?
                    as u64;
            }
        }
        if let Some((iova, at)) = bad_pending.filter(|(_, at)| tx.is_empty() && sent >= *at) {
            a.reap_tx().map_err(e)?;
            match a.send_unmapped(iova, 64) {
                Ok(()) => {
                    bad_pending = None;
                    println!(
                        "bad-iova: TX descriptor at iova {iova:#x} posted after {sent} frames (asked: {at})"
                    );
                }
                Err(Error::RingFull { .. }) => {}
                Err(err) => return Err(format!("{}: bad-iova: {err}", a.bdf())),
            }
        }
        // Without --tx-ahead, or with a bad descriptor to post (which must not
        // land between a prepared batch and its post), only what fits now.
        let fits = if o.tx_ahead && bad_pending.is_none() {
            burst_len.min(o.window)
        } else {
            o.window.saturating_sub(sent.saturating_sub(accounted))
        };
        let depth = if bad_pending.is_some() { 1 } else { depth };
        let mut prepared = false;
        while tx.len() < depth {
            if queue.is_empty() {
                build(&mut queue, &mut spare);
            }
            let want = burst_len.min(fits).min(queue.len() as u64) as usize;
            if want == 0 {
                break;
            }
            let refs: Vec<&[u8]> = queue.iter().take(want).map(|f| f.as_slice()).collect();
            // It reaps what the NIC finished, those unmaps paired with its maps.
            match a.tx_prepare(&refs) {
                Ok(batch) => {
                    spare.extend(queue.drain(..batch.frames()));
                    tx.push_back(batch);
                    prepared = true;
                }
                Err(Error::RingFull { .. }) => break,
                Err(err) => return Err(format!("{}: send #{sent}: {err}", a.bdf())),
            }
        }
        if !prepared {
            a.reap_tx().map_err(e)?;
        }
        let got = b
            .recv_batch(64, |f| t.classify(&mut seen, f))
            .map_err(|err| format!("{}: recv: {err}", b.bdf()))?;
        build(&mut queue, &mut spare);
        let now = Instant::now();
        if got > 0 {
            first_rx.get_or_insert(now);
            max_gap = max_gap.max(now.duration_since(last_rx));
            last_progress = now;
            last_rx = now;
        } else if now.duration_since(last_progress) > STALL {
            // Nothing arrived for a while: whatever is in flight is lost.
            written_off += in_flight;
            last_progress = now;
        }
    }
    // The last receive's slots back to the NIC (their maps count in the cost).
    b.finish_rx_refill().map_err(e)?;
    let loop_ns = start.elapsed().as_nanos() as f64;
    let cost = a.cost().plus(&b.cost());
    a.flush_tx(Duration::from_secs(1)).map_err(e)?;
    let elapsed = last_rx.duration_since(start).as_secs_f64().max(1e-9);
    let lost = o.packets.saturating_sub(t.received + t.corrupt);
    let pps = t.received as f64 / elapsed;
    let result = Burst {
        received: t.received,
        lost,
        corrupt: t.corrupt,
    };
    if !report {
        return Ok(result);
    }
    let c = cost.per_packet(loop_ns, t.received, e1000d::cost::ticks_per_ns());
    // The map column split by NIC: the sender's TX maps, the receiver's RX refills.
    let per_frame =
        |ticks: u64| ticks as f64 / e1000d::cost::ticks_per_ns() / t.received.max(1) as f64;
    println!(
        "cost_ns: map={:.0} unmap={:.0} ring={:.0} other={:.0} total={:.0} batch={:.2} \
map_calls={} unmap_calls={} size={} map_tx={:.0} map_rx={:.0}",
        c.map,
        c.unmap,
        c.ring,
        c.other,
        c.total,
        cost.batch(),
        cost.map_calls,
        cost.unmap_calls,
        o.size,
        per_frame(a.cost().map_ticks),
        per_frame(b.cost().map_ticks),
    );
    print_stats("tx", a)?;
    print_stats("rx", b)?;
    println!(
        "loop: sent={sent} received={} corrupt={} lost={lost} duplicate={} foreign={} pps={pps:.1} \
size={} window={} burst={} mapper={} elapsed_s={elapsed:.3} first_rx_ms={:.3} max_gap_ms={:.3}",
        t.received,
        t.corrupt,
        t.duplicate,
        t.foreign,
        o.size,
        o.window,
        if o.burst == 0 { o.window } else { o.burst.min(o.window) },
        o.mapper,
        first_rx.map_or(f64::NAN, |f| f.duration_since(start).as_secs_f64() * 1e3),
        max_gap.as_secs_f64() * 1e3
    );
    Ok(result)
}

/// Waits (bounded) for one frame on `nic`.
fn wait_frame(nic: &mut Nic, out: &mut Vec<u8>, bound: Duration) -> Result<bool, String> {
    let start = Instant::now();
    while start.elapsed() < bound {
        if nic.recv(out).map_err(e)? {
            return Ok(true);
        }
    }
    Ok(false)
}

fn ping_pong(o: &LoopOpts, a: &mut Nic, b: &mut Nic) -> Result<bool, String> {
    let bound = Duration::from_secs(1);
    let (mut frame, mut echo, mut back) = (Vec::new(), Vec::new(), Vec::new());
    let mut rtts_ns: Vec<u64> = Vec::new();
    let (mut lost, mut corrupt) = (0u64, 0u64);
    for seq in 0..o.packets {
        payload::build(b.mac(), a.mac(), seq, o.size, &mut frame);
        let t0 = Instant::now();
        a.send(&frame).map_err(e)?;
        if !wait_frame(b, &mut echo, bound)? {
            lost += 1;
            continue;
        }
        payload::swap_macs(&mut echo);
        b.send(&echo).map_err(e)?;
        // Skip anything that is not this round's reply (a late echo of a lost round).
        let mut ok = false;
        while wait_frame(a, &mut back, bound)? {
            match payload::check(&back) {
                Ok(s) if s == seq => {
                    ok = true;
                    break;
                }
                Ok(_) | Err(Bad::Foreign) => {}
                Err(Bad::Corrupt) => {
                    corrupt += 1;
                    break;
                }
            }
        }
        if ok {
            rtts_ns.push(t0.elapsed().as_nanos() as u64);
        } else {
            lost += 1;
        }
        a.reap_tx().map_err(e)?;
        b.reap_tx().map_err(e)?;
    }
    rtts_ns.sort_unstable();
    let pct = |p: f64| -> f64 {
        if rtts_ns.is_empty() {
            return f64::NAN;
        }
        let i = ((rtts_ns.len() - 1) as f64 * p).round() as usize;
        rtts_ns[i.min(rtts_ns.len() - 1)] as f64 / 1000.0
    };
    let mean = if rtts_ns.is_empty() {
        f64::NAN
    } else {
        rtts_ns.iter().sum::<u64>() as f64 / rtts_ns.len() as f64 / 1000.0
    };
    print_stats("a", a)?;
    print_stats("b", b)?;
    println!(
        "pingpong: rounds={} replies={} corrupt={corrupt} lost={lost} p50_us={:.1} p99_us={:.1} max_us={:.1} mean_us={mean:.1} size={} mapper={}",
        o.packets,
        rtts_ns.len(),
        pct(0.50),
        pct(0.99),
        pct(1.0),
        o.size,
        o.mapper
    );
    Ok(lost == 0 && corrupt == 0)
}

/// `e1000d storm`: its own options, the mapper options go to [`parse_loop`].
struct StormOpts {
    nic: String,
    iova: u64,
    descriptors: u64,
    seconds: u64,
    lo: LoopOpts,
}

fn parse_storm(args: &[String]) -> Result<StormOpts, String> {
    let (mut nic, mut iova, mut descriptors, mut seconds) = (None, 0x90_0000u64, u64::MAX, 10u64);
    let mut rest = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut v = || {
            it.next()
                .cloned()
                .ok_or(format!("{a} needs a value\n{USAGE}"))
        };
        match a.as_str() {
            "--nic" => nic = Some(v()?),
            "--iova" => iova = parse_u64(&v()?)?,
            "--descriptors" => descriptors = parse_u64(&v()?)?,
            "--seconds" => seconds = parse_u64(&v()?)?,
            _ => rest.push(a.clone()),
        }
    }
    Ok(StormOpts {
        nic: nic.ok_or(format!("storm needs --nic BDF\n{USAGE}"))?,
        iova,
        descriptors,
        seconds,
        lo: parse_loop(&rest)?,
    })
}

fn run_storm(s: &StormOpts) -> Result<bool, String> {
    let (mut nic, dom) = open(&s.nic, &s.lo)?;
    println!(
        "storm: start bdf={} iova={:#x} seconds={}",
        nic.bdf(),
        s.iova,
        s.seconds
    );
    let start = Instant::now();
    let (posted, consumed) = nic
        .storm_tx(s.iova, s.descriptors, Duration::from_secs(s.seconds))
        .map_err(e)?;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "storm: bdf={} posted={posted} consumed={consumed} elapsed_s={secs:.3} per_s={:.0}",
        nic.bdf(),
        consumed as f64 / secs.max(1e-9)
    );
    if let Some(d) = dom {
        print_domain(nic.bdf(), &d);
    }
    Ok(consumed > 0)
}

fn info(bdf: &str) -> Result<bool, String> {
    let o = parse_loop(&[])?;
    let (mut nic, _) = open(bdf, &o)?;
    println!("link_up {}", nic.link_up().map_err(e)?);
    print_stats("info", &mut nic)?;
    Ok(true)
}

#[cfg(target_os = "redox")]
mod redox;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        // Started by pcid-spawner: drive the function it names.
        #[cfg(target_os = "redox")]
        _ if std::env::var_os(e1000d::pcid::PCID_CHANNEL_ENV).is_some() => redox::run(),
        Some("loop") => parse_loop(&args[1..]).and_then(|o| run_loop(&o)),
        Some("storm") => parse_storm(&args[1..]).and_then(|o| run_storm(&o)),
        Some("info") => match args.get(1) {
            Some(bdf) => info(bdf),
            None => Err(USAGE.to_string()),
        },
        _ => Err(USAGE.to_string()),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(msg) => {
            eprintln!("e1000d: {msg}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn tally_counts_each_kind_once() {
        let mut seen = vec![false; 4];
        let mut t = Tally::default();
        let mut f = Vec::new();
        let (a, b) = ([2u8; 6], [4u8; 6]);
        for seq in [0, 1, 1, 3, 9] {
            payload::build(b, a, seq, 100, &mut f);
            t.classify(&mut seen, &f);
        }
        payload::build(b, a, 2, 100, &mut f);
        f[40] ^= 0x10;
        t.classify(&mut seen, &f);
        t.classify(&mut seen, &[0u8; 60]);
        assert_eq!(
            (t.received, t.duplicate, t.corrupt, t.foreign),
            (3, 1, 1, 2)
        );
        assert_eq!(seen, [true, true, false, true]);
    }

    #[test]
    fn loop_options() {
        let o = parse_loop(&args(
            "--tx 00:01.0 --rx 00:02.0 --packets 0x10 --size 64 --window 0 --ping-pong --bad-iova 0x900000",
        ))
        .expect("valid options");
        assert_eq!((o.packets, o.size, o.window), (16, 64, 1));
        assert!(o.ping_pong);
        assert_eq!(o.bad_iova, Some(0x90_0000));
        assert!(parse_loop(&args("--size 1501")).is_err());
        assert!(parse_loop(&args("--size 17")).is_err());
        assert!(parse_loop(&args("--packets")).is_err());
        assert!(parse_loop(&args("--bogus")).is_err());
        let o = parse_loop(&args(
            "--bad-iova 0xa00000 --bad-iova-at 500 --duration 600",
        ))
        .expect("valid soak options");
        assert_eq!(o.bad_iova_at, Some(500));
        assert_eq!(o.duration, Some(Duration::from_secs(600)));
        assert_eq!(o.report_every, Duration::from_secs(60));
        assert_eq!(o.warmup, 0);
        let o = parse_loop(&args("--packets 4000 --warmup 0x800")).expect("valid warm-up");
        assert_eq!((o.packets, o.warmup), (4000, 2048));
        assert_eq!(
            (o.window, o.burst),
            (32, 0),
            "a burst is the window by default"
        );
        let o = parse_loop(&args("--window 64 --burst 32")).expect("valid burst");
        assert_eq!((o.window, o.burst), (64, 32));
        assert!(o.tx_ahead, "bursts are prepared ahead by default");
        assert!(!parse_loop(&args("--no-tx-ahead")).unwrap().tx_ahead);
        assert!(o.keep, "remaps may keep IOVAs by default");
        assert_eq!(o.tx_depth, 1, "one burst prepared ahead by default");
        assert_eq!(parse_loop(&args("--tx-depth 2")).unwrap().tx_depth, 2);
        assert_eq!(parse_loop(&args("--tx-depth 0")).unwrap().tx_depth, 1);
        assert!(!parse_loop(&args("--no-keep")).unwrap().keep);
        assert!(parse_loop(&args("--warmup many")).is_err());
    }

    #[test]
    fn storm_options() {
        let s = parse_storm(&args(
            "--nic 0000:00:04.0 --mapper libdma --seconds 3 --iova 0x100000",
        ))
        .expect("valid");
        assert_eq!(
            (s.nic.as_str(), s.iova, s.seconds, s.descriptors),
            ("0000:00:04.0", 0x10_0000, 3, u64::MAX)
        );
        assert_eq!(s.lo.mapper, "libdma");
        assert!(parse_storm(&args("--seconds 3")).is_err());
        assert!(parse_storm(&args("--nic x --seconds")).is_err());
    }
}
