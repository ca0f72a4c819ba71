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
//!
//! A unit may name a known blocker: a build that fails with exactly that error (every
//! diagnostic in the blocker's file and mentioning its needle) is reported as blocked,
//! with the reason, and does not fail the check; any other error does.

use std::process::Command;

use crate::util::{cargo, describe, output, workspace_root, Result};

/// The Redox target triple.
pub const TARGET: &str = "x86_64-unknown-redox";

/// The crates that use nightly features, allowed for them alone (see the module docs).
const NIGHTLY_FEATURE_CRATES: &str = "redox_daemon,redox_scheme";

const SCHEME_MANIFEST: &str = "redox/iommud-scheme/Cargo.toml";

/// An error that is known and has an owner: the build is reported as blocked by it.
#[derive(Clone, Copy, Debug)]
pub struct Blocker {
    /// The file every diagnostic of the failure must be in.
    pub file: &'static str,
    /// A word every diagnostic of the failure must contain.
    pub needle: &'static str,
    /// What has to change.
    pub why: &'static str,
}

/// The iommud core allocates its per-domain shared page with `libdma::shm::memfd`, which
/// relibc lacks. The fix (the shared page from the platform, `hw::PhysMem`) is part of
/// issue 15's platform seam, in `iommud/src/domain.rs`.
const DOMAIN_MEMFD: Blocker = Blocker {
    file: "iommud/src/domain.rs",
    needle: "memfd",
    why: "iommud/src/domain.rs allocates the domain's shared page with libdma::shm::memfd \
          (Linux only); it must come from the platform (hw::PhysMem) instead",
};

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
    blocker: Option<Blocker>,
}

fn units() -> Vec<Unit> {
    vec![
        Unit {
            what: "vtd (without the sim feature)",
            args: &["-p", "vtd", "--lib"],
            sub: "build",
            nightly_features: false,
            blocker: None,
        },
        Unit {
            what: "libdma with its Redox transport (SchemeSession)",
            args: &["-p", "libdma", "--lib"],
            sub: "build",
            nightly_features: false,
            blocker: None,
        },
        Unit {
            what: "e1000d library (with linuxhw's portable MMIO window)",
            args: &["-p", "e1000d", "--lib"],
            sub: "build",
            nightly_features: false,
            blocker: None,
        },
        Unit {
            what: "e1000d binary with its Redox entry (pcid channel)",
            args: &["-p", "e1000d", "--bins"],
            sub: "check",
            nightly_features: false,
            blocker: None,
        },
        Unit {
            what: "iommud core (without the sim platform)",
            args: &["-p", "iommud", "--lib", "--no-default-features"],
            sub: "build",
            nightly_features: false,
            blocker: Some(DOMAIN_MEMFD),
        },
        Unit {
            what: "redox/iommud-scheme library",
            args: &["--manifest-path", SCHEME_MANIFEST, "--lib"],
            sub: "build",
            nightly_features: true,
            blocker: Some(DOMAIN_MEMFD),
        },
        Unit {
            what: "redox/iommud-scheme binary (daemon, scheme socket)",
            args: &["--manifest-path", SCHEME_MANIFEST, "--bins"],
            sub: "check",
            nightly_features: true,
            blocker: Some(DOMAIN_MEMFD),
        },
    ]
}

/// What a failed build means.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// It failed with exactly its known blocker; the diagnostics.
    Blocked(Vec<String>),
    /// It failed otherwise.
    Failed,
}

/// The diagnostics in cargo's `--message-format short` output: `path:line:col: error...`
/// lines (the closing `error: could not compile ...` lines carry no location).
pub fn diagnostics(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| {
            let Some((loc, rest)) = l.split_once(": ") else {
                return false;
            };
            (rest.starts_with("error") || rest.starts_with("warning"))
                && loc.contains(".rs:")
                && !loc.contains(' ')
        })
        .collect()
}

/// Classifies a failed build's stderr against its known blocker.
pub fn classify(stderr: &str, blocker: Option<&Blocker>) -> Outcome {
    let diags = diagnostics(stderr);
    match blocker {
        Some(b)
            if !diags.is_empty()
                && diags
                    .iter()
                    .all(|d| d.contains(b.file) && d.contains(b.needle)) =>
        {
            Outcome::Blocked(diags.iter().map(|d| d.to_string()).collect())
        }
        _ => Outcome::Failed,
    }
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
    let mut blocked = 0;
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
            Ok(_) => {
                let note = match u.blocker {
                    Some(b) => format!(
                        " (its known blocker is gone: remove it from xtask/src/redox.rs: {})",
                        b.why
                    ),
                    None => String::new(),
                };
                println!("redox-check: ok       {}: {shown}{note}", u.what);
            }
            Err(e) => match classify(&e, u.blocker.as_ref()) {
                Outcome::Blocked(diags) => {
                    blocked += 1;
                    println!("redox-check: BLOCKED  {}: {shown}", u.what);
                    if let Some(b) = u.blocker {
                        println!("             known blocker: {}", b.why);
                    }
                    for d in diags {
                        println!("             {d}");
                    }
                }
                Outcome::Failed => {
                    println!("redox-check: FAILED   {}: {shown}\n{e}", u.what);
                    failed.push(describe(&cmd));
                }
            },
        }
    }
    println!(
        "redox-check: {} built or checked for {TARGET}, {blocked} blocked by known errors, {} failed",
        units().len() - blocked - failed.len(),
        failed.len()
    );
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("redox-check failed: {}", failed.join("; ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `cargo build -p iommud --lib --no-default-features --target
    /// x86_64-unknown-redox --message-format short` printed before the seam existed.
    const MEMFD_ONLY: &str = "   Compiling iommud v0.1.0 (/w/iommud)\n\
        iommud/src/domain.rs:55:19: error[E0432]: unresolved import `libdma::shm::memfd`: no `memfd` in `shm`\n\
        error: could not compile `iommud` (lib) due to 1 previous error\n";

    #[test]
    fn only_located_lines_are_diagnostics() {
        assert_eq!(
            diagnostics(MEMFD_ONLY),
            vec![
                "iommud/src/domain.rs:55:19: error[E0432]: unresolved import `libdma::shm::memfd`: no `memfd` in `shm`"
            ]
        );
        let warn = "libdma/src/shm.rs:4:40: warning: unused imports: `FromRawFd` and `OwnedFd`\n";
        assert_eq!(diagnostics(warn).len(), 1);
        assert!(diagnostics("error: could not compile `x` (lib)\n").is_empty());
    }

    #[test]
    fn the_known_memfd_error_is_blocked_and_anything_more_fails() {
        assert_eq!(
            classify(MEMFD_ONLY, Some(&DOMAIN_MEMFD)),
            Outcome::Blocked(vec![
                "iommud/src/domain.rs:55:19: error[E0432]: unresolved import `libdma::shm::memfd`: no `memfd` in `shm`".into()
            ])
        );
        // The same error without a blocker is a failure.
        assert_eq!(classify(MEMFD_ONLY, None), Outcome::Failed);
        // A second, different error alongside it is a failure.
        let more = format!(
            "{MEMFD_ONLY}src/redox.rs:80:36: error[E0599]: no method named `read64` found\n"
        );
        assert_eq!(classify(&more, Some(&DOMAIN_MEMFD)), Outcome::Failed);
        // A failure with no located diagnostic (e.g. a missing target) is a failure.
        let no_std = "error[E0463]: can't find crate for `std`\n";
        assert_eq!(classify(no_std, Some(&DOMAIN_MEMFD)), Outcome::Failed);
    }
}
