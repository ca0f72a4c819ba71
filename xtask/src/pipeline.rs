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
