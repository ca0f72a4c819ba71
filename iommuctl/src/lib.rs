//! `iommuctl`: a small CLI for iommud's path tree.
//!
//! ```text
//! iommuctl [--socket PATH] [--as UID[:GID]] cat <path>   print a path (e.g. /scheme/iommu/stats)
//! iommuctl [--socket PATH] [--as UID[:GID]] write <path> <value>
//! iommuctl [--socket PATH] [--as UID[:GID]] stop         stop the daemon (administrators only)
//! iommuctl [--socket PATH] [--as UID[:GID]] attach <bdf> [strategy [flush]]
//!                                  attach to a device's domain (with the proof of
//!                                  ownership libdma finds), print it, detach
//! ```
//! `--as` gives up root before connecting (to see what that user may do:
//! iommud judges the identity the kernel reports, not anything sent).

use libdma::client::Control;
use libdma::proto::{FlushPolicy, Strategy};
use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "usage: iommuctl [--socket PATH] [--as UID[:GID]] \
cat <path> | write <path> <value> | stop | attach <bdf> [strategy [flush]]";

/// Drops to `uid`/`gid` for good (supplementary groups cleared first).
fn become_user(spec: &str) -> Result<(), String> {
    let (u, g) = spec.split_once(':').unwrap_or((spec, spec));
    let uid: libc::uid_t = u.parse().map_err(|_| format!("bad uid {u:?}"))?;
    let gid: libc::gid_t = g.parse().map_err(|_| format!("bad gid {g:?}"))?;
    // SAFETY: plain FFI calls changing this process's credentials; each result is checked.
    let ok = unsafe {
        libc::setgroups(0, std::ptr::null()) == 0
            && libc::setgid(gid) == 0
            && libc::setuid(uid) == 0
    };
    if !ok {
        return Err(format!(
            "cannot become {uid}:{gid}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

fn attach(socket: &std::path::Path, bdf: &str, s: &str, f: &str) -> Result<(), String> {
    let sid = libdma::Bdf::parse(bdf).ok_or(format!("bad PCI address {bdf:?}"))?;
    let strategy = Strategy::parse(s).ok_or(format!("unknown strategy {s:?}"))?;
    let flush = FlushPolicy::parse(f).ok_or(format!("unknown flush policy {f:?}"))?;
    let d =
        libdma::DmaDomain::connect(socket, sid.0, strategy, flush).map_err(|e| e.to_string())?;
    println!(
        "attached {} strategy={} flush={}",
        sid,
        d.strategy().name(),
        d.flush_policy().name()
    );
    d.shutdown().map(|_| ()).map_err(|e| e.to_string())
}

/// The command: parses `std::env::args`, talks to iommud, returns the exit status.
pub fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut socket = PathBuf::from(libdma::DEFAULT_SOCKET);
    loop {
        match args.first().map(String::as_str) {
            Some("--socket") if args.len() >= 2 => {
                socket = PathBuf::from(args.remove(1));
                args.remove(0);
            }
            Some("--as") if args.len() >= 2 => {
                let who = args.remove(1);
                args.remove(0);
                if let Err(e) = become_user(&who) {
                    eprintln!("iommuctl: {e}");
                    return ExitCode::FAILURE;
                }
            }
            _ => break,
        }
    }
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    if let ["attach", bdf, rest @ ..] = words.as_slice() {
        let s = rest.first().copied().unwrap_or("global");
        let f = rest.get(1).copied().unwrap_or("strict");
        return match attach(&socket, bdf, s, f) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("iommuctl: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let ctl = match Control::connect(&socket) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("iommuctl: {e}");
            return ExitCode::FAILURE;
        }
    };
    let r = match words.as_slice() {
        ["cat", path] => ctl.read(path).map(|t| print!("{t}")),
        ["write", path, value] => ctl.write(path, value),
        ["stop"] => ctl.shutdown(),
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("iommuctl: {e}");
            ExitCode::FAILURE
        }
    }
}
