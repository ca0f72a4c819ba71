//! `iommuctl`: a small CLI for iommud's path tree.
//!
//! ```text
//! iommuctl [--socket PATH] cat <path>          print a path (e.g. /scheme/iommu/stats)
//! iommuctl [--socket PATH] write <path> <value>
//! iommuctl [--socket PATH] stop                stop the daemon
//! ```

use libdma::client::Control;
use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut socket = PathBuf::from(libdma::DEFAULT_SOCKET);
    if args.first().map(String::as_str) == Some("--socket") && args.len() >= 2 {
        socket = PathBuf::from(args.remove(1));
        args.remove(0);
    }
    let ctl = match Control::connect(&socket) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("iommuctl: {e}");
            return ExitCode::FAILURE;
        }
    };
    let r = match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["cat", path] => ctl.read(path).map(|t| print!("{t}")),
        ["write", path, value] => ctl.write(path, value),
        ["stop"] => ctl.shutdown(),
        _ => {
            eprintln!("usage: iommuctl [--socket PATH] cat <path> | write <path> <value> | stop");
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
