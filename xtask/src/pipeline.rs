//! `cargo xtask test`: format, lint, unit tests, then the guest tests.

use std::process::Command;
use std::time::Instant;

use crate::tests::guest_tests;
use crate::util::{cargo, run, workspace_root, Result};

struct Step {
    name: String,
    run: Box<dyn Fn() -> Result<()>>,
}

fn cargo_step(name: &str, args: &'static [&'static str]) -> Step {
    Step {
        name: name.to_string(),
        run: Box::new(move || {
            let mut cmd: Command = cargo();
            run(cmd.current_dir(workspace_root()).args(args))
        }),
    }
}

/// A cargo command on the nightly toolchain (through rustup), for the Redox
/// scheme crate, which lives in its own workspace because `redox-scheme`
/// needs nightly features while the core stays on stable.
fn nightly_step(name: &str, args: &'static [&'static str]) -> Step {
    Step {
        name: name.to_string(),
        run: Box::new(move || {
            let mut cmd = Command::new("rustup");
            cmd.current_dir(workspace_root())
                .args(["run", "nightly", "cargo"])
                .args(args)
                // The outer stable cargo's variables would pin the toolchain.
                .env_remove("RUSTC")
                .env_remove("RUSTDOC")
                .env_remove("RUSTUP_TOOLCHAIN")
                .env_remove("CARGO");
            run(&mut cmd)
        }),
    }
}

const REDOX_MANIFEST: &str = "redox/iommud-scheme/Cargo.toml";

/// Runs the steps in order, stopping at the first failure unless `keep_going`.
pub fn test(host_only: bool, keep_going: bool) -> Result<()> {
    let mut steps = vec![
        cargo_step(
            "cargo fmt --all -- --check",
            &["fmt", "--all", "--", "--check"],
        ),
        cargo_step(
            "cargo clippy --workspace --all-targets -- -D warnings",
            &[
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ],
        ),
        cargo_step("cargo test --workspace", &["test", "--workspace"]),
        nightly_step(
            "cargo +nightly fmt --check (redox/iommud-scheme)",
            &["fmt", "--manifest-path", REDOX_MANIFEST, "--", "--check"],
        ),
        nightly_step(
            "cargo +nightly clippy (redox/iommud-scheme)",
            &[
                "clippy",
                "--manifest-path",
                REDOX_MANIFEST,
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ],
        ),
        nightly_step(
            "cargo +nightly test (redox/iommud-scheme)",
            &["test", "--manifest-path", REDOX_MANIFEST],
        ),
        nightly_step(
            "cargo +nightly fmt --check (fuzz)",
            &["fmt", "--manifest-path", "fuzz/Cargo.toml", "--", "--check"],
        ),
        Step {
            name: "cargo xtask redox-check".into(),
            run: Box::new(crate::redox::check),
        },
        Step {
            name: format!(
                "cargo xtask fuzz ({} s per target: {})",
                crate::fuzz::TEST_SECONDS,
                crate::fuzz::TARGETS.join(", ")
            ),
            run: Box::new(|| crate::fuzz::run_all(crate::fuzz::TEST_SECONDS)),
        },
    ];
    if !host_only {
        for t in guest_tests() {
            steps.push(Step {
                name: t.name.to_string(),
                run: Box::new(t.run),
            });
        }
    }
    let (mut passed, mut failed) = (0, 0);
    let mut result = Ok(());
    for step in &steps {
        println!("\n==== xtask: {} ====", step.name);
        let start = Instant::now();
        let r = (step.run)();
        let secs = start.elapsed().as_secs_f64();
        match r {
            Ok(()) => {
                passed += 1;
                println!("==== {}: ok ({secs:.1} s) ====", step.name);
            }
            Err(e) => {
                failed += 1;
                println!("==== {}: FAILED ({secs:.1} s): {e} ====", step.name);
                if result.is_ok() {
                    result = Err(format!("step `{}` failed", step.name));
                }
                if !keep_going {
                    break;
                }
            }
        }
    }
    println!("xtask: {passed} passed, {failed} failed");
    result
}
