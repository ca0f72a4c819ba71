//! The command line both drivers share: `loop` and `info` over any [`MqNic`].
//!
//! ```text
//! <driver> loop --tx BDF --rx BDF [--queues N] [--packets N] [--size BYTES] [--window W]
//!               [--mapper phys|libdma] [--strategy S] [--flush F] [--socket PATH]
//!               [--no-pin] [--no-keep] [--bad-iova ADDR] [--canary] [--then SHELL-COMMAND]
//! <driver> info BDF
//! ```
//! `--packets` counts frames per queue. Output: one `<driver>: <bdf> up` line per NIC,
//! `settle:` lines, one `queue:` line per queue ([`Tally::line`]), `stats` lines, the
//! domains' counters as `domain <bdf> <key> <value>` lines, and
//! `loop: queues=N sent=N received=N corrupt=0 lost=0 ... pps=<float>`. Exit status 1
//! if a frame was lost, corrupt or misrouted, or the canary changed; 2 on setup errors.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use libdma::{DmaDomain, FlushPolicy, Strategy};

use crate::mqloop::{self, LoopCfg, Tally};
use crate::queue::{QueueStats, RxQueue, SharedMapper, TxQueue};
use crate::rss::RETA_LEN;
#[cfg(target_os = "linux")]
use crate::PhysMapper;
use crate::{frame, Error, LibdmaMapper, Result};

/// How long `attach` retries while iommud still holds the function for a driver that
/// has just exited.
#[cfg(not(target_os = "redox"))]
const ATTACH_RETRY: Duration = Duration::from_secs(3);

/// What the shared command line needs of a multi-queue NIC.
pub trait MqNic {
    /// The function's PCI address.
    fn bdf(&self) -> &str;
    /// The station address.
    fn mac(&self) -> [u8; 6];
    /// The redirection table programmed into the NIC.
    fn reta(&self) -> [u8; RETA_LEN];
    /// The queues, TX and RX.
    fn queues_mut(&mut self) -> (&mut [TxQueue], &mut [RxQueue]);
    /// The NIC's statistics registers, accumulated (name, value).
    fn hw_stats(&mut self) -> Result<Vec<(&'static str, u64)>>;
    /// The mapper this NIC's queues use.
    fn mapper(&self) -> SharedMapper;
    /// RX queue `q`'s head and tail registers (diagnostics).
    fn rx_head_tail(&self, q: u16) -> Result<(u32, u32)>;
}

/// Opens a NIC: `(bdf, mapper, queues)`.
pub type Opener<N> = fn(&str, SharedMapper, u16) -> Result<N>;

/// Options of `loop`.
#[derive(Debug, Clone)]
pub struct LoopOpts {
    /// TX NIC.
    pub tx: String,
    /// RX NIC.
    pub rx: String,
    /// Queue pairs.
    pub queues: u16,
    /// Frames per queue.
    pub packets: u64,
    /// Ethernet payload bytes.
    pub size: usize,
    /// Frames in flight per queue.
    pub window: u16,
    /// `phys` or `libdma`.
    pub mapper: String,
    /// libdma strategy.
    pub strategy: Strategy,
    /// libdma flush policy.
    pub flush: FlushPolicy,
    /// iommud's socket.
    pub socket: PathBuf,
    /// Pin worker q to CPU q.
    pub pin: bool,
    /// Let a recycled buffer keep its IOVA where the mapper can (off with
    /// `--no-keep`; docs/ARCHITECTURE.md, "Kept remaps").
    pub keep: bool,
    /// Post a TX descriptor at this unmapped IOVA first.
    pub bad_iova: Option<u64>,
    /// Run the RX canary first.
    pub canary: bool,
    /// Shell command run after the loop, domains still attached.
    pub then: Option<String>,
}

fn parse_u64(s: &str) -> std::result::Result<u64, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.map_err(|_| format!("not a number: {s:?}"))
}

/// Parses `loop`'s options.
pub fn parse_loop(args: &[String], usage: &str) -> std::result::Result<LoopOpts, String> {
    let mut o = LoopOpts {
        tx: "0000:00:01.0".into(),
        rx: "0000:00:02.0".into(),
        queues: 2,
        packets: 10_000,
        size: 1500,
        window: 64,
        mapper: "phys".into(),
        strategy: Strategy::Magazine,
        flush: FlushPolicy::PerCore,
        socket: PathBuf::from(libdma::DEFAULT_SOCKET),
        pin: true,
        keep: true,
        bad_iova: None,
        canary: false,
        then: None,
    };
    use lexopt::prelude::*;
    let mut p = lexopt::Parser::from_args(args);
    let lex = |e: lexopt::Error| format!("{e}\n{}", usage);
    while let Some(arg) = p.next().map_err(lex)? {
        let name = match arg {
            Long(n) => format!("--{n}"),
            other => return Err(lex(other.unexpected())),
        };
        let mut val = || -> std::result::Result<String, String> {
            p.value().and_then(|v| v.string()).map_err(lex)
        };
        match name.as_str() {
            "--tx" => o.tx = val()?,
            "--rx" => o.rx = val()?,
            "--queues" => {
                o.queues = u16::try_from(parse_u64(&val()?)?)
                    .map_err(|_| "--queues too large".to_string())?
            }
            "--packets" => o.packets = parse_u64(&val()?)?,
            "--size" => o.size = parse_u64(&val()?)? as usize,
            "--window" => {
                o.window = u16::try_from(parse_u64(&val()?)?.clamp(1, 200)).unwrap_or(200)
            }
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
            "--no-pin" => o.pin = false,
            "--no-keep" => o.keep = false,
            "--bad-iova" => o.bad_iova = Some(parse_u64(&val()?)?),
            "--canary" => o.canary = true,
            "--then" => o.then = Some(val()?),
            _ => return Err(format!("unknown option {name:?}\n{usage}")),
        }
    }
    if !(frame::MIN_SIZE..=frame::MAX_SIZE).contains(&o.size) {
        return Err(format!(
            "--size {} outside {}..={} (Ethernet payload bytes)",
            o.size,
            frame::MIN_SIZE,
            frame::MAX_SIZE
        ));
    }
    if o.queues == 0 {
        return Err("--queues must be at least 1".into());
    }
    Ok(o)
}

/// The NIC's mapper and its iommud domain. The one place a driver attaches to iommud.
pub fn attach(
    o: &LoopOpts,
    bdf: &str,
) -> std::result::Result<(SharedMapper, Option<Arc<DmaDomain>>), String> {
    match o.mapper.as_str() {
        #[cfg(target_os = "linux")]
        "phys" => Ok((Arc::new(PhysMapper::new()), None)),
        "libdma" => {
            let sid = bdf
                .parse::<linuxhw::pci::Bdf>()
                .map_err(|e| format!("{bdf}: {e}"))?
                .source_id();
            // A previous driver of this function that just exited may still be being
            // detached by iommud ("busy"): retry for a while.
            #[cfg(not(target_os = "redox"))]
            let m = {
                let until = Instant::now() + ATTACH_RETRY;
                loop {
                    match LibdmaMapper::connect(&o.socket, sid, o.strategy, o.flush) {
                        Ok(m) => break m,
                        Err(err) if err.to_string().contains("busy") && Instant::now() < until => {
                            std::thread::sleep(Duration::from_millis(50));
                        }
                        Err(err) => {
                            return Err(format!("{bdf}: iommud at {}: {err}", o.socket.display()))
                        }
                    }
                }
            };
            #[cfg(target_os = "redox")]
            let m = DmaDomain::open(sid, o.strategy, o.flush)
                .map(LibdmaMapper::from_domain)
                .map_err(|e| format!("{bdf}: iommu scheme: {e}"))?;
            let m = m.with_keep(o.keep);
            let d = m.domain();
            Ok((Arc::new(m), Some(d)))
        }
        other => Err(format!("unknown mapper {other:?} (phys|libdma)")),
    }
}

/// Prints a domain's iommud counters as `domain <bdf> <key> <value>` lines.
pub fn print_domain(bdf: &str, d: &DmaDomain) {
    match d.read_path(&format!("domains/{bdf}/stats")) {
        Ok(text) => {
            for l in text.lines() {
                println!("domain {bdf} {l}");
            }
        }
        Err(err) => println!("domain {bdf} unreadable: {err}"),
    }
    let c = d.counts();
    // One counter per line, as the server's: `domain <bdf> <key> <value>`.
    for (k, v) in [
        ("client_round_trips", c.round_trips),
        ("client_wakeups", c.wakeups),
        ("client_kept", c.kept),
    ] {
        println!("domain {bdf} {k} {v}");
    }
}

/// A domain's numeric counters (`domains/<bdf>/stats`).
fn domain_counters(bdf: &str, d: &DmaDomain) -> std::collections::BTreeMap<String, u64> {
    d.read_path(&format!("domains/{bdf}/stats"))
        .map(|text| {
            text.lines()
                .filter_map(|l| {
                    let (k, v) = l.split_once(' ')?;
                    Some((k.to_string(), v.trim().parse().ok()?))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Prints what the domain's counters grew by since `before` as
/// `loopdomain <bdf> <key> <delta>` lines (the measured loop alone, after warm-up).
fn print_domain_delta(bdf: &str, d: &DmaDomain, before: &std::collections::BTreeMap<String, u64>) {
    for (k, v) in domain_counters(bdf, d) {
        if let Some(b) = before.get(&k) {
            println!("loopdomain {bdf} {k} {}", v.saturating_sub(*b));
        }
    }
}

fn e(x: Error) -> String {
    x.to_string()
}

fn open_one<N: MqNic>(
    name: &str,
    open: Opener<N>,
    bdf: &str,
    o: &LoopOpts,
) -> std::result::Result<(N, Option<Arc<DmaDomain>>), String> {
    let (m, dom) = attach(o, bdf)?;
    let nic = open(bdf, m, o.queues).map_err(|err| format!("{bdf}: {err}"))?;
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
        "{name}: {bdf} up, {} queue pairs, mac {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}, mapper {how}",
        o.queues, mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]
    );
    Ok((nic, dom))
}

fn sum_stats(v: impl Iterator<Item = QueueStats>) -> QueueStats {
    v.fold(QueueStats::default(), |a, s| QueueStats {
        packets: a.packets + s.packets,
        bytes: a.bytes + s.bytes,
        errors: a.errors + s.errors,
        ring_full: a.ring_full + s.ring_full,
        maps: a.maps + s.maps,
        unmaps: a.unmaps + s.unmaps,
        batches: a.batches + s.batches,
    })
}

fn print_stats<N: MqNic>(role: &str, nic: &mut N) -> std::result::Result<(), String> {
    let hw = nic.hw_stats().map_err(e)?;
    let bdf = nic.bdf().to_string();
    let (tx, rx) = nic.queues_mut();
    let t = sum_stats(tx.iter().map(TxQueue::stats));
    let r = sum_stats(rx.iter().map(RxQueue::stats));
    let per_q: Vec<String> = tx
        .iter()
        .zip(rx.iter())
        .map(|(t, r)| {
            format!(
                "q{}_tx={} q{}_rx={}",
                t.index(),
                t.stats().packets,
                r.index(),
                r.stats().packets
            )
        })
        .collect();
    let hw: Vec<String> = hw.iter().map(|(k, v)| format!("hw_{k}={v}")).collect();
    println!(
        "stats {role} {bdf}: tx_packets={} rx_packets={} rx_errors={} ring_full={} maps={} unmaps={} map_batches={} {} {}",
        t.packets,
        r.packets,
        r.errors,
        t.ring_full,
        t.maps + r.maps,
        t.unmaps + r.unmaps,
        t.batches + r.batches,
        per_q.join(" "),
        hw.join(" ")
    );
    Ok(())
}

fn canary_byte(i: usize) -> u8 {
    (i as u8) ^ 0x5A
}

/// Points B's RX queue 0 at a page nobody mapped, sends a frame at it from A's TX
/// queue 0, and checks the page. Returns the number of changed bytes.
fn canary<N: MqNic>(a: &mut N, b: &mut N) -> std::result::Result<usize, String> {
    const LEN: usize = 4096;
    let page = b.mapper().alloc(LEN).map_err(|x| x.to_string())?;
    let p = page.as_ptr();
    for i in 0..LEN {
        // SAFETY: i < LEN = page.len(); the page is this driver's and no device can
        // reach it through a mapping; raw-pointer volatile writes, no reference.
        unsafe { p.add(i).write_volatile(canary_byte(i)) };
    }
    let addr = page.phys();
    let table = b.reta();
    let port = mqloop::probe_port(&table, 0).ok_or("no port reaches queue 0")?;
    let (dst, src) = (b.mac(), a.mac());
    let bdf = b.bdf().to_string();
    drain(b)?;
    let (_, brx) = b.queues_mut();
    let rx0 = brx.first_mut().ok_or("no RX queue")?;
    let before = rx0.unmapped_done();
    let next = rx0.next_slot();
    rx0.post_unmapped(addr).map_err(e)?;
    let ht0 = b.rx_head_tail(0).map_err(e)?;
    let (_, brx) = b.queues_mut();
    let rx0 = brx.first_mut().ok_or("no RX queue")?;
    let mut f = Vec::new();
    frame::build(dst, src, port, 0, mqloop::PROBE_SEQ, 1000, &mut f);
    let (atx, _) = a.queues_mut();
    let tx0 = atx.first_mut().ok_or("no TX queue")?;
    tx0.send_batch(&[&f]).map_err(e)?;
    let until = Instant::now() + Duration::from_secs(2);
    while rx0.unmapped_done() == before && Instant::now() < until {
        tx0.reap().map_err(e)?;
        rx0.recv_batch(64, |_, _| {}).map_err(e)?;
    }
    tx0.flush(1000).map_err(e)?;
    let completed = rx0.unmapped_done() > before;
    let ht1 = b.rx_head_tail(0).map_err(e)?;
    let changed = (0..LEN)
        // SAFETY: as above; reading back through a raw pointer.
        .filter(|&i| unsafe { p.add(i).read_volatile() } != canary_byte(i))
        .count();
    println!(
        "canary: addr={addr:#x} bdf={bdf} queue=0 descriptor_completed={completed} changed_bytes={changed} slot={next} rdh_rdt_before={ht0:?} rdh_rdt_after={ht1:?}"
    );
    Ok(changed)
}

/// Receives (and drops) whatever arrives on any of `nic`'s RX queues for 50 ms.
/// Returns how many frames that was.
fn drain<N: MqNic>(nic: &mut N) -> std::result::Result<usize, String> {
    let until = Instant::now() + Duration::from_millis(50);
    let mut n = 0;
    while Instant::now() < until {
        let (_, rx) = nic.queues_mut();
        for q in rx.iter_mut() {
            n += q.recv_batch(64, |_, _| {}).map_err(e)?;
        }
    }
    Ok(n)
}

fn inject_bad_iova<N: MqNic>(a: &mut N, b: &mut N, iova: u64) -> std::result::Result<(), String> {
    let (atx, _) = a.queues_mut();
    let tx0 = atx.first_mut().ok_or("no TX queue")?;
    tx0.send_unmapped(iova, 64).map_err(e)?;
    match tx0.flush(1000) {
        Ok(()) => println!("bad-iova: TX descriptor at iova {iova:#x} on queue 0 completed (a blocked read shows only in iommud's fault records)"),
        Err(err) => println!("bad-iova: TX descriptor at iova {iova:#x}: {err}"),
    }
    let arrived = drain(b)?;
    println!(
        "bad-iova: {arrived} frame(s) arrived on {} from it",
        b.bdf()
    );
    Ok(())
}

/// `loop`: returns whether every frame arrived intact on its queue.
pub fn run_loop<N: MqNic>(
    name: &str,
    open: Opener<N>,
    o: &LoopOpts,
) -> std::result::Result<bool, String> {
    let (mut a, da) = open_one(name, open, &o.tx, o)?;
    let (mut b, db) = open_one(name, open, &o.rx, o)?;
    let (dst, src) = (b.mac(), a.mac());
    let table = b.reta();
    {
        let (atx, _) = a.queues_mut();
        let (_, brx) = b.queues_mut();
        for (tx, rx) in atx.iter_mut().zip(brx.iter_mut()) {
            let port = mqloop::probe_port(&table, tx.index()).ok_or("no port reaches a queue")?;
            let took = mqloop::settle(tx, rx, dst, src, port).map_err(e)?;
            println!(
                "settle: queue {} delivering after {:.0} ms",
                tx.index(),
                took.as_secs_f64() * 1e3
            );
        }
    }
    if let Some(iova) = o.bad_iova {
        inject_bad_iova(&mut a, &mut b, iova)?;
        // The unit keeps one fault record: let iommud read and clear it first.
        std::thread::sleep(Duration::from_millis(200));
    }
    let canary_changed = if o.canary {
        let n = canary(&mut a, &mut b)?;
        std::thread::sleep(Duration::from_millis(200));
        n
    } else {
        0
    };
    let cfg = LoopCfg {
        packets: o.packets,
        size: o.size,
        window: o.window,
        pin: o.pin,
    };
    // Counters before the measured loop: rings and RX buffers are mapped, paths settled.
    let before: Vec<_> = [(a.bdf().to_string(), &da), (b.bdf().to_string(), &db)]
        .into_iter()
        .filter_map(|(bdf, d)| {
            d.as_ref()
                .map(|d| (bdf.clone(), d.clone(), domain_counters(&bdf, d)))
        })
        .collect();
    let tallies: Vec<Tally> = {
        let (atx, _) = a.queues_mut();
        let (_, brx) = b.queues_mut();
        let pairs: Vec<(&mut TxQueue, &mut RxQueue)> = atx.iter_mut().zip(brx.iter_mut()).collect();
        mqloop::run(&cfg, pairs, dst, src, &table).map_err(e)?
    };
    for t in &tallies {
        println!("{}", t.line());
    }
    print_stats("tx", &mut a)?;
    print_stats("rx", &mut b)?;
    let sum = |f: fn(&Tally) -> u64| tallies.iter().map(f).sum::<u64>();
    let (sent, received, corrupt, lost) = (
        sum(|t| t.sent),
        sum(|t| t.received),
        sum(|t| t.corrupt),
        sum(|t| t.lost),
    );
    let (dup, mis, rssm, foreign) = (
        sum(|t| t.duplicate),
        sum(|t| t.misrouted),
        sum(|t| t.rss_mismatch),
        sum(|t| t.foreign),
    );
    let elapsed = tallies
        .iter()
        .map(|t| t.elapsed_s)
        .fold(0.0, f64::max)
        .max(1e-9);
    let pps = received as f64 / elapsed;
    let per_q: Vec<String> = tallies
        .iter()
        .map(|t| format!("q{}={}", t.queue, t.received))
        .collect();
    for (nic, d) in [(a.bdf().to_string(), &da), (b.bdf().to_string(), &db)] {
        if let Some(d) = d {
            print_domain(&nic, d);
        }
    }
    for (bdf, d, counters) in &before {
        print_domain_delta(bdf, d, counters);
    }
    if let Some(cmd) = &o.then {
        match std::process::Command::new("sh").arg("-c").arg(cmd).status() {
            Ok(st) if st.success() => {}
            Ok(st) => println!("{name}: --then {cmd:?}: {st}"),
            Err(err) => println!("{name}: --then {cmd:?}: {err}"),
        }
    }
    println!(
        "loop: queues={} sent={sent} received={received} corrupt={corrupt} lost={lost} duplicate={dup} misrouted={mis} rss_mismatch={rssm} foreign={foreign} pps={pps:.1} size={} window={} mapper={} elapsed_s={elapsed:.3} {}",
        o.queues,
        o.size,
        o.window,
        o.mapper,
        per_q.join(" ")
    );
    Ok(lost == 0 && corrupt == 0 && mis == 0 && canary_changed == 0)
}

/// `info BDF`.
pub fn info<N: MqNic>(
    name: &str,
    open: Opener<N>,
    bdf: &str,
    usage: &str,
) -> std::result::Result<bool, String> {
    let o = parse_loop(&[], usage)?;
    let (mut nic, _) = open_one(name, open, bdf, &o)?;
    print_stats("info", &mut nic)?;
    Ok(true)
}

/// The Linux `main` of a driver: dispatches `loop` and `info`.
pub fn main<N: MqNic>(name: &str, open: Opener<N>, usage: &str) -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("loop") => parse_loop(&args[1..], usage).and_then(|o| run_loop(name, open, &o)),
        Some("info") => match args.get(1) {
            Some(bdf) => info(name, open, bdf, usage),
            None => Err(usage.to_string()),
        },
        _ => Err(usage.to_string()),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(msg) => {
            eprintln!("{name}: {msg}");
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
    fn loop_options() {
        let o = parse_loop(
            &args("--queues 2 --packets 0x10 --size 64 --window 0 --no-pin --no-keep --bad-iova 0x900000"),
            "u",
        )
        .expect("valid");
        assert_eq!(
            (o.queues, o.packets, o.size, o.window, o.pin),
            (2, 16, 64, 1, false)
        );
        assert_eq!(o.bad_iova, Some(0x90_0000));
        assert!(!o.keep);
        assert!(parse_loop(&args(""), "u").expect("defaults").keep);
        assert!(parse_loop(&args("--size 1501"), "u").is_err());
        assert!(parse_loop(&args("--size 47"), "u").is_err());
        assert!(parse_loop(&args("--queues 0"), "u").is_err());
        assert!(parse_loop(&args("--bogus"), "u").is_err());
    }
}
