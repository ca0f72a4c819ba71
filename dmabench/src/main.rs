//! dmabench: DMA map+unmap cost per IOVA strategy and flush policy, on the
//! sim platform, against no IOMMU, the physical floor and rust-vmm's
//! `vm-allocator`.
//!
//! `cargo run --release -p dmabench -- [--quick] [--out DIR] [--rows FILTER]`
//!
//! Prints a table, writes `results.json` and SVG plots into the out dir
//! (default `<workspace>/target/dmabench`). `--rows` keeps rows whose label
//! `strategy/flush/t<threads>/p<processes>/n<pages>` contains any of the
//! comma-separated terms. `--scale auto|log|linear` sets the plots' y axis
//! (auto: log when bars span more than two decades).

mod harness;
mod peers;
use benchplot as plot;
mod ptblowup;
mod results;
mod served;

use std::io::{self, BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use harness::{Backend, Budget, ClientArgs, ClientEnv, Row, RowResult, Sample, CLIENT_CMD};

/// Pages per mapping, threads per process, client processes.
const PAGES: [u64; 3] = [1, 4, 32];
const THREADS: [usize; 3] = [1, 2, 4];
const PROCESSES: [usize; 2] = [1, 2];

/// Every backend this build has, peers first, then every strategy × flush
/// policy served by `iommud --platform sim` (see `served`).
fn backends() -> Vec<Box<dyn Backend>> {
    let mut all = peers::backends();
    all.extend(served::backends());
    all
}

/// The peers every strategy is measured against (no daemon).
fn is_peer(strategy: &str) -> bool {
    matches!(strategy, "noiommu" | "limit" | "vm-allocator")
}

fn find<'a>(all: &'a [Box<dyn Backend>], strategy: &str, flush: &str) -> Option<&'a dyn Backend> {
    all.iter()
        .find(|b| b.strategy() == strategy && b.flush() == flush)
        .map(|b| &**b)
}

fn rows(all: &[Box<dyn Backend>], filter: Option<&str>) -> Vec<Row> {
    let terms: Vec<&str> = filter
        .map(|f| f.split(',').filter(|t| !t.is_empty()).collect())
        .unwrap_or_default();
    let mut out = Vec::new();
    for b in all {
        for pages in PAGES {
            for processes in PROCESSES {
                for threads in THREADS {
                    let r = Row {
                        strategy: b.strategy().into(),
                        flush: b.flush().into(),
                        threads,
                        processes,
                        pages,
                        trust: b.trust().into(),
                        batch: b.batch(),
                    };
                    if terms.is_empty() || terms.iter().any(|t| r.label().contains(t)) {
                        out.push(r);
                    }
                }
            }
        }
    }
    out
}

/// Environment variable carrying `--inval-latency-ns` to client processes.
const INVAL_LATENCY_ENV: &str = "DMABENCH_INVAL_LATENCY_NS";

/// What an invalidation costs the simulated unit unless `--inval-latency-ns`
/// says otherwise: a synchronous IOTLB invalidation costs "thousands of
/// cycles" (docs/ARCHITECTURE.md, "Costs"), and 1 µs is 2–3 thousand at 2–3 GHz. An assumption,
/// printed with every run; `--inval-latency-ns 0` gives instantaneous hardware.
pub const DEFAULT_INVAL_LATENCY_NS: u64 = 1000;

/// How long the simulated unit takes per invalidation descriptor (ns), for
/// every row that uses the model: the `vm-allocator` peer and every iommud
/// daemon.
pub fn inval_latency_ns() -> u64 {
    std::env::var(INVAL_LATENCY_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_INVAL_LATENCY_NS)
}

struct Opts {
    quick: bool,
    out: PathBuf,
    rows: Option<String>,
    scale: plot::Scale,
}

fn usage() -> ExitCode {
    eprintln!(
        "usage: dmabench [--quick] [--out DIR] [--rows TERM[,TERM...]] [--scale auto|log|linear] \
         [--inval-latency-ns N]"
    );
    ExitCode::from(2)
}

fn parse_opts(args: &[String]) -> Option<Opts> {
    use lexopt::prelude::*;
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."));
    let mut o = Opts {
        quick: false,
        out: workspace.join("target").join("dmabench"),
        rows: None,
        scale: plot::Scale::Auto,
    };
    let mut p = lexopt::Parser::from_args(args);
    while let Some(arg) = p.next().ok()? {
        match arg {
            Long("quick") => o.quick = true,
            Long("out") => o.out = p.value().ok()?.into(),
            Long("rows") => o.rows = Some(p.value().ok()?.string().ok()?),
            Long("inval-latency-ns") => {
                let ns: u64 = p.value().ok()?.parse().ok()?;
                // Inherited by the client processes and passed to every daemon.
                std::env::set_var(INVAL_LATENCY_ENV, ns.to_string());
            }
            Long("scale") => {
                o.scale = match p.value().ok()?.string().ok()?.as_str() {
                    "auto" => plot::Scale::Auto,
                    "log" => plot::Scale::Log,
                    "linear" => plot::Scale::Linear,
                    _ => return None,
                }
            }
            _ => return None,
        }
    }
    Some(o)
}

/// Quick: under a minute on 2 cores in all. Each row costs ~0.1 s beyond
/// its timed runs (a daemon, client processes, warm-up); the rest of 45 s is
/// shared out as timed work, 3 runs per row, 10-200 ms per run.
/// Full: 1 s per run, 5 runs.
fn budget(quick: bool, nrows: usize) -> Budget {
    if quick {
        let runs = 3;
        let overhead = Duration::from_millis(100) * nrows as u32;
        let share = Duration::from_secs(45).saturating_sub(overhead) / (nrows.max(1) * runs) as u32;
        Budget {
            per_run: share.clamp(Duration::from_millis(10), Duration::from_millis(200)),
            runs,
        }
    } else {
        Budget {
            per_run: Duration::from_secs(1),
            runs: 5,
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some(CLIENT_CMD) {
        return match client_main(&args[1..]) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("dmabench client: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if args.iter().any(|a| a == "--ptblowup") {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent();
        let out = ptblowup::default_out(workspace.unwrap_or(Path::new(".")));
        return match ptblowup::main(&args, out) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("dmabench --ptblowup: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let Some(opts) = parse_opts(&args) else {
        return usage();
    };
    match bench(&opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dmabench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn bench(o: &Opts) -> io::Result<()> {
    let all = backends();
    let rows = rows(&all, o.rows.as_deref());
    let b = budget(o.quick, rows.len());
    std::fs::create_dir_all(&o.out)?;
    let tmp = std::env::temp_dir().join(format!("dmabench.{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    if rows.iter().any(|r| !is_peer(&r.strategy)) {
        let exe = served::ensure_iommud()?;
        println!(
            "iommud rows: {} --platform sim, one daemon per row",
            exe.display()
        );
    }
    println!(
        "{} rows, {} runs of {} ms each; ns/pair is per thread, Mpair/s is all threads together",
        rows.len(),
        b.runs,
        b.per_run.as_millis()
    );
    println!(
        "simulated VT-d: {} ns per invalidation descriptor ({})",
        inval_latency_ns(),
        if inval_latency_ns() == DEFAULT_INVAL_LATENCY_NS {
            "the default: \"thousands of cycles\"; --inval-latency-ns N to change"
        } else if inval_latency_ns() == 0 {
            "instantaneous hardware"
        } else {
            "--inval-latency-ns"
        }
    );
    println!("{}", results::TABLE_HEADER);
    let mut done: Vec<RowResult> = Vec::with_capacity(rows.len());
    for row in &rows {
        let backend = find(&all, &row.strategy, &row.flush).expect("row from a backend");
        let r = match harness::run_row(backend, row, b, &tmp) {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                println!("skipped {}: {e}", row.label());
                continue;
            }
            Err(e) => return Err(io::Error::other(format!("{}: {e}", row.label()))),
        };
        println!("{}", results::table_line(&r));
        done.push(r);
    }
    let _ = std::fs::remove_dir_all(&tmp);
    results::write_json(&o.out, &done)?;
    write_plots(&o.out, &done, o.scale)?;
    println!(
        "wrote {0}/results.json, {0}/throughput.svg, {0}/scaling.svg",
        o.out.display()
    );
    Ok(())
}

/// Series names in first-seen row order.
fn series_names(rows: &[RowResult]) -> Vec<(String, String)> {
    let mut names: Vec<(String, String)> = Vec::new();
    for r in rows {
        let k = (r.row.strategy.clone(), r.row.flush.clone());
        if !names.contains(&k) {
            names.push(k);
        }
    }
    names
}

fn write_plots(dir: &Path, rows: &[RowResult], scale: plot::Scale) -> io::Result<()> {
    let names = series_names(rows);
    let value = |s: &(String, String), f: &dyn Fn(&Row) -> bool| {
        rows.iter()
            .find(|r| r.row.strategy == s.0 && r.row.flush == s.1 && f(&r.row))
            .map(|r| r.mpairs_per_s)
    };
    let series = |f: &dyn Fn(&Row, usize) -> bool, ngroups: usize| {
        names
            .iter()
            .map(|s| plot::Series {
                name: format!("{} / {}", s.0, s.1),
                values: (0..ngroups).map(|g| value(s, &|r: &Row| f(r, g))).collect(),
            })
            .collect()
    };
    let by_pages = plot::Chart {
        title: "DMA map+unmap throughput, 1 thread, 1 client process (sim)".into(),
        x_label: "pages per mapping".into(),
        y_label: "throughput (million map+unmap pairs / s)".into(),
        groups: PAGES.iter().map(|p| p.to_string()).collect(),
        series: series(
            &|r, g| r.pages == PAGES[g] && r.threads == 1 && r.processes == 1,
            PAGES.len(),
        ),
        scale,
    };
    let configs: Vec<(usize, usize)> = PROCESSES
        .iter()
        .flat_map(|&p| THREADS.iter().map(move |&t| (p, t)))
        .collect();
    let scaling = plot::Chart {
        title: "DMA map+unmap throughput, 1-page mappings, all threads together (sim)".into(),
        x_label: "client processes × threads per process".into(),
        y_label: "throughput (million map+unmap pairs / s)".into(),
        groups: configs.iter().map(|(p, t)| format!("{p} × {t}")).collect(),
        series: series(
            &|r, g| r.pages == 1 && (r.processes, r.threads) == configs[g],
            configs.len(),
        ),
        scale,
    };
    std::fs::write(dir.join("throughput.svg"), plot::svg(&by_pages))?;
    std::fs::write(dir.join("scaling.svg"), plot::svg(&scaling))
}

/// `dmabench __client --strategy S --flush F --threads T --pages N
/// --budget-ns NS --process I [--socket PATH]`: one client process of a run.
fn client_main(args: &[String]) -> io::Result<()> {
    let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidInput, m.to_string());
    let (mut strategy, mut flush) = (None, None);
    let mut a = ClientArgs {
        threads: 1,
        pages: 1,
        budget: Duration::from_millis(100),
        env: ClientEnv::default(),
    };
    use lexopt::prelude::*;
    let mut p = lexopt::Parser::from_args(args);
    let e = |e: lexopt::Error| bad(&e.to_string());
    while let Some(arg) = p.next().map_err(e)? {
        let Long(k) = arg else {
            return Err(e(arg.unexpected()));
        };
        let k = k.to_string();
        let v = p.value().map_err(e)?.string().map_err(e)?;
        let num = || {
            v.parse::<u64>()
                .map_err(|_| bad(&format!("--{k}: bad number {v:?}")))
        };
        match k.as_str() {
            "strategy" => strategy = Some(v.clone()),
            "flush" => flush = Some(v.clone()),
            "threads" => a.threads = num()? as usize,
            "pages" => a.pages = num()?,
            "budget-ns" => a.budget = Duration::from_nanos(num()?),
            "process" => a.env.process = num()? as usize,
            "socket" => a.env.socket = Some(PathBuf::from(&v)),
            _ => return Err(bad(&format!("unknown option --{k}"))),
        }
    }
    if a.threads == 0 || a.pages == 0 || a.pages > peers::MAX_PAGES {
        return Err(bad("threads must be > 0 and pages 1..=32"));
    }
    let all = backends();
    let (s, f) = strategy
        .zip(flush)
        .ok_or_else(|| bad("need --strategy and --flush"))?;
    let b = find(&all, &s, &f).ok_or_else(|| bad("unknown strategy/flush"))?;
    let sample: Sample = harness::run_client(b, &a, || {
        let mut out = io::stdout().lock();
        writeln!(out, "ready")?;
        out.flush()?;
        let mut go = String::new();
        io::stdin().lock().read_line(&mut go)?;
        Ok(())
    })?;
    println!("{}", sample.to_line());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_cover_the_grid_and_filter() {
        let all = backends();
        let r = rows(&all, None);
        assert_eq!(r.len(), all.len() * 3 * 3 * 2);
        let r = rows(&all, Some("limit/none/t1/p1,vm-allocator/strict/t2/p1/n4"));
        let labels: Vec<String> = r.iter().map(Row::label).collect();
        assert_eq!(
            labels,
            [
                "limit/none/t1/p1/n1",
                "limit/none/t1/p1/n4",
                "limit/none/t1/p1/n32",
                "vm-allocator/strict/t2/p1/n4"
            ]
        );
    }

    #[test]
    fn quick_budget_fits_a_minute() {
        for rows in [54, 162, 306] {
            let b = budget(true, rows);
            let total = (b.per_run * b.runs as u32 + Duration::from_millis(100)) * rows as u32;
            assert!(total <= Duration::from_secs(46), "{rows} rows: {total:?}");
            assert_eq!(b.runs, 3);
        }
        assert_eq!(budget(true, 1).per_run, Duration::from_millis(200));
    }

    #[test]
    fn client_runs_in_process() {
        let all = backends();
        for b in all.iter().filter(|b| is_peer(b.strategy())) {
            let a = ClientArgs {
                threads: 2,
                pages: 4,
                budget: Duration::from_millis(5),
                env: ClientEnv::default(),
            };
            let s = harness::run_client(&**b, &a, || Ok(())).unwrap();
            assert!(s.pairs > 0 && s.wall_ns >= 5_000_000, "{s:?}");
        }
    }
}
