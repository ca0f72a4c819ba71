//! The page-table blowup experiment (`dmabench --ptblowup`).
//!
//! The research's `va` ("kmalloc") design uses the address a buffer already
//! has as its IOVA, so no allocator is needed, but the IOMMU page tables then
//! follow the sparsity of the address space. A heap's buffers move through a
//! large range over a long run (arenas are created and released, addresses
//! are rarely reused), so unless empty page-table pages are freed, the
//! tables grow with the range touched, not with what is mapped.
//!
//! The experiment drives an iommud `Domain` in process over the sim
//! platform with the `va` strategy and the `deferred` flush policy (Linux's
//! lazy default): a fixed number of live buffers; each step unmaps a random
//! one and maps a new one at the heap's next address (a cursor moving up
//! through [`RANGE`] with random gaps, like a heap growing into fresh
//! arenas). It runs once with page-table reclamation off and once on,
//! sampling the live page-table pages, and writes `ptblowup.json` and
//! `ptblowup.svg` into the out dir.

use iommud::domain::Domain;
use iommud::hw::PhysMem;
use iommud::platform::sim::{SimMmio, SimPlatform};
use iommud::unit::{Iommu, UnitConfig};
use libdma::proto::{Dir, FlushPolicy, Strategy};
use serde::Serialize;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

const PAGE: u64 = 4096;
/// Bytes of address space the heap moves through over a full run.
const RANGE: u64 = 32 << 30;
/// First heap address (a typical user mmap area, below 2^47).
const HEAP_BASE: u64 = 0x7f00_0000_0000 - RANGE;
/// Buffers mapped at any time (packets in flight).
const LIVE: usize = 256;
/// Frames of the client's DMA pool the buffers' pages come from.
const POOL_PAGES: u64 = 1024;
/// Map/unmap pairs of a full run, and between two samples.
const PAIRS: u64 = 200_000;
const SAMPLE_EVERY: u64 = 1_000;

#[derive(Serialize)]
struct Sample {
    pairs: u64,
    ms: f64,
    pt_pages_live: u64,
    range_touched_mib: u64,
}

#[derive(Serialize)]
struct Run {
    reclaim: bool,
    samples: Vec<Sample>,
    final_pt_pages_live: u64,
    peak_pt_pages_live: u64,
    pt_pages_allocated: u64,
    pt_pages_freed: u64,
    ns_per_pair: f64,
    invalidations: u64,
}

#[derive(Serialize)]
struct Report {
    strategy: &'static str,
    flush: &'static str,
    range_bytes: u64,
    live_mappings: usize,
    pairs: u64,
    runs: Vec<Run>,
}

/// A small deterministic generator (xorshift64*), so both runs see the same heap.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn kv(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn err(what: &str, e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("{what}: {e}"))
}

fn run(reclaim: bool, pairs: u64) -> io::Result<Run> {
    let platform = Arc::new(
        SimPlatform::new(vtd::sim::SimConfig {
            mem_bytes: 512 << 20,
            ..Default::default()
        })
        .map_err(|e| err("sim platform", e))?,
    );
    let machine = platform.machine().clone();
    let mem: Arc<dyn PhysMem> = platform;
    let unit = Iommu::init(Box::new(SimMmio(machine)), mem, &UnitConfig::default())
        .map_err(|e| err("VT-d bring-up", e))?;
    let dom = Domain::new(
        Arc::new(unit),
        0x08,
        Strategy::Va,
        FlushPolicy::Deferred,
        iommud::policy::Trust::Validated,
        reclaim,
        // The experiment grows tables on purpose: no quota on them.
        iommud::quota::Accounts::new(
            {
                let mut l = iommud::quota::Limits::default();
                l.set(iommud::quota::Quota::PtPages, u64::MAX);
                l.set(iommud::quota::Quota::Mappings, u64::MAX);
                l
            },
            Default::default(),
        )
        .of(0),
    )
    .map_err(|e| err("domain", e))?;
    let pool = dom
        .alloc_pool(POOL_PAGES * PAGE)
        .map_err(|e| err("pool", e))?
        .0;
    let stride = RANGE / pairs.max(1) * 2;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut cursor = HEAP_BASE;
    let mut live: Vec<(u64, u64)> = Vec::with_capacity(LIVE);
    let mut samples = Vec::new();
    let mut peak = 0;
    let t0 = Instant::now();
    for n in 0..=pairs {
        if n % SAMPLE_EVERY == 0 {
            let (_, _, pt_live) = dom.table_pages();
            peak = peak.max(pt_live);
            samples.push(Sample {
                pairs: n,
                ms: t0.elapsed().as_secs_f64() * 1e3,
                pt_pages_live: pt_live,
                range_touched_mib: (cursor - HEAP_BASE) >> 20,
            });
        }
        if n == pairs {
            break;
        }
        if live.len() >= LIVE {
            let (va, len) = live.swap_remove(rng.below(live.len() as u64) as usize);
            dom.unmap(va, len).map_err(|e| err("unmap", e))?;
        }
        // The heap's next buffer: 1-2 pages at a fresh address.
        let len = PAGE * (1 + rng.below(2));
        cursor += rng.below(stride).next_multiple_of(PAGE) + len;
        let frame = rng.below(POOL_PAGES - 1);
        let phys = pool.phys + frame * PAGE;
        let va = cursor;
        dom.map(phys, len, Dir::FromDevice, va)
            .map_err(|e| err("map", e))?;
        live.push((va, len));
        if n % 64 == 0 {
            dom.tick().map_err(|e| err("tick", e))?;
        }
    }
    let elapsed = t0.elapsed();
    for (va, len) in live.drain(..) {
        dom.unmap(va, len).map_err(|e| err("unmap", e))?;
    }
    dom.flush().map_err(|e| err("flush", e))?;
    let stats = dom.render_stats();
    let (allocated, freed, _) = dom.table_pages();
    let final_live = samples.last().map(|s| s.pt_pages_live).unwrap_or(0);
    dom.teardown();
    Ok(Run {
        reclaim,
        samples,
        final_pt_pages_live: final_live,
        peak_pt_pages_live: peak,
        pt_pages_allocated: allocated,
        pt_pages_freed: freed,
        ns_per_pair: elapsed.as_nanos() as f64 / pairs.max(1) as f64,
        invalidations: kv(&stats, "invalidations"),
    })
}

/// `dmabench --ptblowup [--quick] [--out DIR]`.
pub fn main(args: &[String], default_out: PathBuf) -> io::Result<()> {
    let mut out = default_out;
    let mut pairs = PAIRS;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--ptblowup" => {}
            "--quick" => pairs = PAIRS / 4,
            "--out" => {
                out = PathBuf::from(it.next().ok_or_else(|| err("--out", "needs a directory"))?)
            }
            other => return Err(err("--ptblowup", format!("unknown argument {other:?}"))),
        }
    }
    std::fs::create_dir_all(&out)?;
    println!(
        "ptblowup: va strategy, deferred flush, {LIVE} live buffers, {pairs} map/unmap pairs \
         through {} GiB of address space",
        RANGE >> 30
    );
    let mut runs = Vec::new();
    for reclaim in [false, true] {
        let r = run(reclaim, pairs)?;
        println!(
            "reclaim {:3}: page-table pages live at end {:6}, peak {:6}, allocated {:6}, freed {:6}, {:.0} ns/pair, {} invalidations",
            if reclaim { "on" } else { "off" },
            r.final_pt_pages_live,
            r.peak_pt_pages_live,
            r.pt_pages_allocated,
            r.pt_pages_freed,
            r.ns_per_pair,
            r.invalidations
        );
        runs.push(r);
    }
    let report = Report {
        strategy: Strategy::Va.name(),
        flush: FlushPolicy::Deferred.name(),
        range_bytes: RANGE,
        live_mappings: LIVE,
        pairs,
        runs,
    };
    let json = serde_json::to_string_pretty(&report).map_err(|e| err("json", e))?;
    std::fs::write(out.join("ptblowup.json"), json + "\n")?;
    std::fs::write(out.join("ptblowup.svg"), svg(&report))?;
    println!(
        "wrote {} and {}",
        out.join("ptblowup.json").display(),
        out.join("ptblowup.svg").display()
    );
    Ok(())
}

/// Live page-table pages against map/unmap pairs, one line per run, log y.
fn svg(r: &Report) -> String {
    use std::fmt::Write as _;
    let (w, h, left, right, top, bottom) = (900.0, 500.0, 90.0, 40.0, 50.0, 70.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let max_y = r
        .runs
        .iter()
        .flat_map(|run| run.samples.iter().map(|s| s.pt_pages_live))
        .max()
        .unwrap_or(1)
        .max(10) as f64;
    let decades = max_y.log10().ceil().max(1.0);
    let x = |p: u64| left + pw * p as f64 / r.pairs.max(1) as f64;
    let y = |v: u64| top + ph - ph * (v.max(1) as f64).log10() / decades;
    let mut s = String::new();
    let _ = write!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="13">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="28" text-anchor="middle" font-size="16">Page-table pages of a va domain: reclamation off vs on ({} live buffers, {} GiB heap range)</text>
"##,
        w / 2.0,
        r.live_mappings,
        r.range_bytes >> 30
    );
    for d in 0..=decades as u32 {
        let v = 10u64.pow(d);
        let yy = y(v);
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{yy:.1}" x2="{}" y2="{yy:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{v}</text>"##,
            left + pw,
            left - 8.0,
            yy + 4.0
        );
    }
    for k in 0..=4u64 {
        let p = r.pairs * k / 4;
        let xx = x(p);
        let _ = writeln!(
            s,
            r##"<line x1="{xx:.1}" y1="{}" x2="{xx:.1}" y2="{}" stroke="#999"/><text x="{xx:.1}" y="{}" text-anchor="middle">{}k</text>"##,
            top + ph,
            top + ph + 5.0,
            top + ph + 20.0,
            p / 1000
        );
    }
    let _ = writeln!(
        s,
        r##"<line x1="{left}" y1="{top}" x2="{left}" y2="{}" stroke="black"/><line x1="{left}" y1="{}" x2="{}" y2="{}" stroke="black"/>"##,
        top + ph,
        top + ph,
        left + pw,
        top + ph
    );
    let _ = writeln!(
        s,
        r##"<text x="{}" y="{}" text-anchor="middle">map/unmap pairs (the heap moves up through its range as they go)</text>"##,
        left + pw / 2.0,
        h - 20.0
    );
    let _ = writeln!(
        s,
        r##"<text transform="translate(24,{}) rotate(-90)" text-anchor="middle">live page-table pages (log scale)</text>"##,
        top + ph / 2.0
    );
    for (i, run) in r.runs.iter().enumerate() {
        let color = if run.reclaim { "#55a868" } else { "#c44e52" };
        let pts: Vec<String> = run
            .samples
            .iter()
            .map(|s| format!("{:.1},{:.1}", x(s.pairs), y(s.pt_pages_live)))
            .collect();
        let _ = writeln!(
            s,
            r##"<polyline fill="none" stroke="{color}" stroke-width="2.5" points="{}"/>"##,
            pts.join(" ")
        );
        let ly = top + 20.0 + 22.0 * i as f64;
        let _ = writeln!(
            s,
            r##"<line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="3"/><text x="{}" y="{}">reclamation {} (end: {} pages)</text>"##,
            left + 20.0,
            left + 50.0,
            left + 58.0,
            ly + 4.0,
            if run.reclaim { "on" } else { "off" },
            run.final_pt_pages_live
        );
    }
    s.push_str("</svg>\n");
    s
}

/// The experiment's out dir next to the benchmark's.
pub fn default_out(workspace: &Path) -> PathBuf {
    workspace.join("target").join("dmabench")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_run_grows_without_reclamation_and_stays_bounded_with_it() {
        let off = run(false, 4_000).unwrap();
        let on = run(true, 4_000).unwrap();
        assert!(
            off.final_pt_pages_live > 4 * on.final_pt_pages_live,
            "off {} on {}",
            off.final_pt_pages_live,
            on.final_pt_pages_live
        );
        // Bounded by the live mappings: each needs at most one leaf table,
        // plus the upper levels over the live span.
        assert!(
            on.peak_pt_pages_live <= LIVE as u64 + 16,
            "{}",
            on.peak_pt_pages_live
        );
        assert!(on.pt_pages_freed > 0);
        assert_eq!(off.pt_pages_freed, 0);
        let s = svg(&Report {
            strategy: "va",
            flush: "deferred",
            range_bytes: RANGE,
            live_mappings: LIVE,
            pairs: 4_000,
            runs: vec![off, on],
        });
        assert!(s.contains("reclamation off") && s.contains("reclamation on"));
        assert!(s.contains("live page-table pages"));
    }
}
