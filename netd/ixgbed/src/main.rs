//! `ixgbed`: the 82599 driver's traffic jobs (see nicdesc's `cli` for the options).
//!
//! ```text
//! ixgbed loop --tx 0000:00:01.0 --rx 0000:00:02.0 [--queues N] [--packets N] [--size B]
//!           [--window W] [--mapper phys|libdma] [--strategy S] [--flush F]
//!           [--socket PATH] [--no-pin] [--bad-iova ADDR] [--canary] [--then CMD]
//! ixgbed info BDF
//! ```
//! On Redox, started by pcid-spawner (`PCID_CLIENT_CHANNEL` set), it drives the function
//! pcid names under its iommud domain instead (see `src/redox.rs`).

use std::process::ExitCode;

use ixgbed::Ixgbe;

const USAGE: &str =
    "usage: ixgbed loop --tx BDF --rx BDF [--queues N] [--packets N] [--size BYTES] \
[--window W] [--mapper phys|libdma] [--strategy S] [--flush F] [--socket PATH] [--no-pin] \
[--no-keep] [--bad-iova ADDR] [--canary] [--then CMD]\n       ixgbed info BDF";

#[cfg(target_os = "redox")]
mod redox;

fn main() -> ExitCode {
    #[cfg(target_os = "redox")]
    if std::env::var_os(e1000d::pcid::PCID_CHANNEL_ENV).is_some() {
        return match redox::run() {
            Ok(()) => ExitCode::SUCCESS,
            Err(msg) => {
                eprintln!("ixgbed: {msg}");
                ExitCode::from(2)
            }
        };
    }
    nicdesc::cli::main("ixgbed", Ixgbe::open, USAGE)
}
