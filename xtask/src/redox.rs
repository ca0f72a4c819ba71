//! `cargo xtask redox-check`: builds every crate that runs on Redox for the real
//! `x86_64-unknown-redox` target, and type-checks their binaries.
//!
//! Libraries are built (`cargo build --lib`: an rlib needs no linker); binaries are
//! type-checked (`cargo check --bins`), because linking a Redox executable needs relibc,
//! which is not reachable here. The target's standard library comes from
//! `rustup target add x86_64-unknown-redox` on the stable toolchain (nightly has no such
//! component), so everything is built with stable. `redox/iommud-scheme` depends on
//! `redox-scheme` (`#![feature(linked_list_cursors)]`) and `redox-daemon`
//! (`#![feature(never_type)]`); for those two crates only, `RUSTC_BOOTSTRAP` names them so
//! stable rustc accepts their feature gates. Our own crates stay on stable Rust.
//!
//! Every build runs with `-D warnings` (code that is cfg'd for Redox must not rot) into
//! `target/redox-check`, away from the host builds.

use std::process::Command;

use crate::util::{cargo, describe, output, workspace_root, Result};

/// The Redox target triple.
pub const TARGET: &str = "x86_64-unknown-redox";

/// The crates that use nightly features, allowed for them alone (see the module docs).
const NIGHTLY_FEATURE_CRATES: &str = "redox_daemon,redox_scheme";

const SCHEME_MANIFEST: &str = "redox/iommud-scheme/Cargo.toml";

/// One build for the Redox target.
struct Unit {
    /// What is built, for the report.
    what: &'static str,
    /// The cargo arguments after the subcommand.
    args: &'static [&'static str],
    /// `build` (libraries) or `check` (binaries).
    sub: &'static str,
    /// Whether the crate graph needs the nightly-feature allowance.
    nightly_features: bool,
}

fn units() -> Vec<Unit> {
    vec![
        Unit {
            what: "vtd (without the sim feature)",
            args: &["-p", "vtd", "--lib"],
            sub: "build",
            nightly_features: false,
        },
        Unit {
            what: "iommu-abi (the protocol, shared-page layouts, session contract)",
            args: &["-p", "iommu-abi", "--lib"],
            sub: "build",
            nightly_features: false,
        },
        Unit {
            what: "libdma with its Redox transport (SchemeSession)",
            args: &["-p", "libdma", "--lib"],
            sub: "build",
            nightly_features: false,
        },
        Unit {
            what: "e1000d library (with linuxhw's portable MMIO window)",
            args: &["-p", "e1000d", "--lib"],
            sub: "build",
            nightly_features: false,
        },
        Unit {
            what: "e1000d binary with its Redox entry (pcid channel)",
            args: &["-p", "e1000d", "--bins"],
            sub: "check",
            nightly_features: false,
        },
        Unit {
            what: "nicdesc, igbd and ixgbed libraries (the advanced-descriptor core and drivers)",
            args: &["-p", "nicdesc", "-p", "igbd", "-p", "ixgbed", "--lib"],
            sub: "build",
            nightly_features: false,
        },
        Unit {
            what: "igbd and ixgbed binaries with their Redox entries",
            args: &["-p", "igbd", "-p", "ixgbed", "--bins"],
            sub: "check",
            nightly_features: false,
        },
        Unit {
            what: "nvmed (library, and its binary with the Redox entry type-checked)",
            args: &["-p", "nvmed", "--lib", "--bins"],
            sub: "check",
            nightly_features: false,
        },
        Unit {
            what: "iommud core (without the sim platform)",
            args: &["-p", "iommud", "--lib", "--no-default-features"],
            sub: "build",
            nightly_features: false,
        },
        Unit {
            what: "redox/iommud-scheme library",
            args: &["--manifest-path", SCHEME_MANIFEST, "--lib"],
            sub: "build",
            nightly_features: true,
        },
        Unit {
            what: "redox/iommud-scheme binary (daemon, scheme socket)",
            args: &["--manifest-path", SCHEME_MANIFEST, "--bins"],
            sub: "check",
            nightly_features: true,
        },
    ]
}

/// Installs the Redox standard library for the active toolchain if it is missing.
pub fn ensure_target() -> Result<()> {
    let installed = output(Command::new("rustup").args(["target", "list", "--installed"]))?;
    if installed.lines().any(|l| l.trim() == TARGET) {
        return Ok(());
    }
    println!("redox-check: rustup target add {TARGET}");
    crate::util::run(Command::new("rustup").args(["target", "add", TARGET]))
}

/// `cargo xtask redox-check`.
pub fn check() -> Result<()> {
    ensure_target()?;
    let root = workspace_root();
    let target_dir = root.join("target").join("redox-check");
    let mut failed = Vec::new();
    for u in units() {
        let mut cmd = cargo();
        cmd.current_dir(&root)
            .arg(u.sub)
            .args(["--target", TARGET, "--message-format", "short"])
            .args(u.args)
            .env("CARGO_TARGET_DIR", &target_dir)
            .env("RUSTFLAGS", "-D warnings");
        if u.nightly_features {
            cmd.env("RUSTC_BOOTSTRAP", NIGHTLY_FEATURE_CRATES);
        }
        let shown = format!("cargo {} --target {TARGET} {}", u.sub, u.args.join(" "));
        match output(&mut cmd) {
            Ok(_) => println!("redox-check: ok       {}: {shown}", u.what),
            Err(e) => {
                println!("redox-check: FAILED   {}: {shown}\n{e}", u.what);
                failed.push(describe(&cmd));
            }
        }
    }
    println!(
        "redox-check: {} built or checked for {TARGET}, {} failed",
        units().len() - failed.len(),
        failed.len()
    );
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("redox-check failed: {}", failed.join("; ")))
    }
}
