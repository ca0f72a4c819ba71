//! `cargo xtask fuzz [--seconds N]`: the `cargo fuzz` targets in `fuzz/` (the
//! protocol decoder; a session fed arbitrary request sequences against the
//! sim), each run for a bounded time from its committed seed corpus. Any
//! crash, panic or sanitizer report fails the step. Also a step of
//! `cargo xtask test` (60 s per target).
//!
//! `cargo fuzz` needs the nightly toolchain (sanitizers) and the `cargo-fuzz`
//! tool, which this installs from crates.io when missing. New inputs go to
//! `target/fuzz-corpus/<target>`; the committed seeds in `fuzz/corpus/` are
//! only read.

use std::process::Command;

use crate::util::{mkdirs, run, workspace_root, Result};

/// The targets, in `fuzz/fuzz_targets/`.
pub const TARGETS: [&str; 3] = ["proto_decode", "session", "rings"];

/// Seconds per target in `cargo xtask test`.
pub const TEST_SECONDS: u64 = 60;

fn nightly_cargo() -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo"])
        .current_dir(workspace_root())
        // The outer stable cargo's variables would pin the toolchain.
        .env_remove("RUSTC")
        .env_remove("RUSTDOC")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO");
    cmd
}

/// Installs `cargo-fuzz` if `cargo fuzz` does not answer.
fn ensure_cargo_fuzz() -> Result<()> {
    let ok = nightly_cargo()
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return Ok(());
    }
    println!("xtask fuzz: cargo install cargo-fuzz --locked");
    run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))
}

/// Runs every target for `secs` seconds.
pub fn run_all(secs: u64) -> Result<()> {
    ensure_cargo_fuzz()?;
    let root = workspace_root();
    for t in TARGETS {
        let corpus = root.join("target").join("fuzz-corpus").join(t);
        mkdirs(&corpus)?;
        let seeds = root.join("fuzz").join("corpus").join(t);
        println!("xtask fuzz: {t} for {secs} s");
        run(nightly_cargo()
            .args(["fuzz", "run", t])
            .arg(&corpus)
            .arg(&seeds)
            .args([
                "--",
                &format!("-max_total_time={secs}"),
                "-print_final_stats=1",
            ]))
        .map_err(|e| format!("fuzz target {t} found a problem (see fuzz/artifacts/{t}): {e}"))?;
    }
    Ok(())
}

/// `cargo xtask fuzz [--seconds N]`.
pub fn command(args: &[String]) -> Result<()> {
    let secs = match args {
        [] => TEST_SECONDS,
        [flag, v] if flag == "--seconds" => v.parse().map_err(|_| format!("bad --seconds {v}"))?,
        _ => return Err("usage: cargo xtask fuzz [--seconds N]".into()),
    };
    run_all(secs)
}
