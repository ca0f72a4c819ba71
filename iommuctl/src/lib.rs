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

/// The options before the command (`--socket`, `--as`, which drops root at
/// once), then the command's words.
fn parse_options() -> Result<(PathBuf, Vec<String>), String> {
    use lexopt::prelude::*;
    let mut socket = PathBuf::from(libdma::DEFAULT_SOCKET);
    let mut p = lexopt::Parser::from_env();
    let e = |e: lexopt::Error| e.to_string();
    while let Some(arg) = p.next().map_err(e)? {
        match arg {
            Long("socket") => socket = p.value().map_err(e)?.into(),
            Long("as") => become_user(&p.value().map_err(e)?.string().map_err(e)?)?,
            Short('h') | Long("help") => return Err("help".into()),
            Value(first) => {
                let mut words = vec![first.string().map_err(e)?];
                for w in p.raw_args().map_err(e)? {
                    words.push(w.into_string().map_err(|w| format!("not UTF-8: {w:?}"))?);
                }
                return Ok((socket, words));
            }
            _ => return Err(e(arg.unexpected())),
        }
    }
    Ok((socket, Vec::new()))
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
    let (socket, args) = match parse_options() {
        Ok(v) => v,
        Err(e) => {
            eprintln!("iommuctl: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
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
