//! Project tasks: `cargo xtask <command>`. Run `cargo xtask help` for the list.

mod demo;
mod disk;
mod fault;
mod fuzz;
mod guest;
mod igb;
mod linuxpeer;
mod netbench;
mod pipeline;
mod redox;
mod restart;
mod security;
mod smoke;
mod soak;
mod storm;
mod tests;
mod util;

use std::process::ExitCode;
use std::time::Duration;

use guest::GuestRun;
use util::Result;

const USAGE: &str = "\
usage: cargo xtask <command> [options]

  deps                      install QEMU (>= 8), cpio; fetch busybox + cloud kernel into target/guest/cache
  image [-p PKG]...         build the guest binaries of PKGs and an initramfs (target/guest/images/image.cpio)
  guest-run [-p PKG]... [--caching-mode] [--timeout SECS] [--name NAME] -- SCRIPT...
                            boot a guest running SCRIPT; exit status is the script's
  guest-shell [-p PKG]... [--caching-mode]
                            boot a guest to an interactive shell (quit: Ctrl-A X)
  guest-smoke [--caching-mode]
                            (see below)
  test [--host-only] [--keep-going]
                            fmt --check, clippy -D warnings, cargo test, the Redox scheme crate
                            (nightly), redox-check, fuzz (60 s per target), then every guest test
                            (stops at the first failure unless --keep-going)
  demo [--strategy magazine|global|identity|va] [--flush percore|strict|deferred]
       [--caching-mode] [--no-translation] [--packets N] [--size B] [--nic e1000|igb [--queues N]]
                            boot iommud + e1000d (or igbd with N queue pairs, RSS, one pinned
                            worker per queue), stream frames A->B through the IOMMU,
                            print iommud's stats and a `demo: ...` summary line
  demo --duration D [--report-every D] [demo options]
                            soak: the demo's traffic for D (e.g. 10m), every D' (default 60s)
                            throughput, iommud RSS, fds, live table pages, IOVAs held; fails
                            on a lost/corrupt frame or a figure that grows without bound
  redox-check               build for x86_64-unknown-redox (installs the target if missing) every
                            crate that runs on Redox: libraries built, binaries type-checked
  fuzz [--seconds N]        the cargo fuzz targets (protocol decoder, session on the sim), N s
                            each (default 60) from fuzz/corpus; installs cargo-fuzz if missing
  netbench [--packets N] [--rounds N] [--reps N] [--only NAME,...] [--nic e1000|igb|all]
           [--from-logs]
                            e1000 loop packets/s (64 and 1500 B) and ping-pong p50/p99 per
                            strategy and with translation off, igb rows (1 and 2 queue
                            pairs), and Linux's own intel-iommu (off/strict/lazy/passthrough,
                            pktgen; --linux-packets N; --only linux); writes target/netbench/;
                            reps outside, configurations inside (5 reps, a boot each), ratios
                            per rep; --from-logs re-reads the e1000 rows from the guest logs
  demo --disk [--strategy S] [--flush F] [--caching-mode] [--no-translation]
                            boot iommud + nvmed on QEMU's NVMe (raw image), fill 64 MiB with
                            verified blocks, run a mixed workload, print a `disk: ...` line
  diskbench [--ios N] [--reps N] [--only NAME,...] [--idle-sleep-us N]
                            nvmed IOPS, MB/s, p50/p99 per strategy and with translation off;
                            writes target/diskbench/
  help                      this text

guest tests (each also a command):";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match dispatch(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn usage() {
    println!("{USAGE}");
    for t in tests::guest_tests() {
        println!("  {:<30} {}", t.name, t.about);
    }
}

/// Options shared by the guest commands.
struct GuestOpts {
    packages: Vec<String>,
    caching_mode: bool,
    timeout: Option<u64>,
    name: Option<String>,
    script: Vec<String>,
}

fn parse_guest_opts(args: &[String]) -> Result<GuestOpts> {
    let mut o = GuestOpts {
        packages: Vec::new(),
        caching_mode: false,
        timeout: None,
        name: None,
        script: Vec::new(),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |flag: &str| it.next().cloned().ok_or(format!("{flag} needs a value"));
        match a.as_str() {
            "-p" | "--package" => o.packages.push(value(a)?),
            "--caching-mode" => o.caching_mode = true,
            "--timeout" => {
                let v = value(a)?;
                o.timeout = Some(v.parse().map_err(|_| format!("bad --timeout {v}"))?);
            }
            "--name" => o.name = Some(value(a)?),
            "--" => {
                o.script = it.cloned().collect();
                break;
            }
            other => return Err(format!("unknown option `{other}`")),
        }
    }
    Ok(o)
}

fn guest_run_from(o: GuestOpts, default_name: &str, script: String) -> GuestRun {
    let mut r = GuestRun::new(o.name.unwrap_or_else(|| default_name.into()), script)
        .caching_mode(o.caching_mode);
    for p in o.packages {
        r = r.package(p);
    }
    if let Some(t) = o.timeout {
        r.timeout = Duration::from_secs(t);
    }
    r
}

fn dispatch(args: &[String]) -> Result<()> {
    let cmd = args.first().map(String::as_str).unwrap_or("help");
    let rest = args.get(1..).unwrap_or(&[]);
    match cmd {
        "help" | "-h" | "--help" => {
            usage();
            Ok(())
        }
        "deps" => {
            let a = guest::deps::ensure()?;
            println!("qemu    {}", a.qemu.display());
            println!("kernel  {}", a.kernel.display());
            println!("busybox {}", a.busybox.display());
            Ok(())
        }
        "image" => {
            let o = parse_guest_opts(rest)?;
            let run = guest_run_from(o, "image", "sh".into());
            let assets = guest::deps::ensure()?;
            let path = guest::image::build(&run, &assets)?;
            println!("{}", path.display());
            Ok(())
        }
        "guest-run" => {
            let o = parse_guest_opts(rest)?;
            if o.script.is_empty() {
                return Err("guest-run needs a script after `--`".into());
            }
            let script = o.script.join(" ");
            let out = guest::run(&guest_run_from(o, "guest-run", script))?;
            println!(
                "xtask: guest ran {:.1} s, log {}",
                out.duration.as_secs_f64(),
                out.log_path.display()
            );
            out.expect_success()
        }
        "guest-shell" => {
            let o = parse_guest_opts(rest)?;
            let mut run = guest_run_from(o, "shell", "setsid cttyhack sh".into());
            run.interactive = true;
            run.timeout = Duration::from_secs(24 * 3600);
            guest::run(&run).map(|_| ())
        }
        "guest-smoke" => {
            let o = parse_guest_opts(rest)?;
            smoke::run(o.caching_mode)
        }
        "test" => {
            let (mut host_only, mut keep_going) = (false, false);
            for a in rest {
                match a.as_str() {
                    "--host-only" => host_only = true,
                    "--keep-going" => keep_going = true,
                    other => return Err(format!("test: unknown option `{other}`")),
                }
            }
            pipeline::test(host_only, keep_going)
        }
        "demo" if rest.iter().any(|a| a == "--disk") => {
            let rest: Vec<String> = rest.iter().filter(|a| *a != "--disk").cloned().collect();
            disk::demo(&rest)
        }
        "demo" => demo::run(rest),
        "diskbench" => disk::diskbench(rest),
        "netbench" => netbench::run(rest),
        "redox-check" => redox::check(),
        "fuzz" => fuzz::command(rest),
        other => match tests::guest_tests().into_iter().find(|t| t.name == other) {
            Some(t) => (t.run)(),
            None => {
                usage();
                Err(format!("unknown command `{other}`"))
            }
        },
    }
}
