//! Small helpers shared by the subcommands: errors, paths, running processes.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Every xtask function reports failure as a human-readable message.
pub type Result<T, E = String> = std::result::Result<T, E>;

/// The Cargo workspace root (the parent of the `xtask` crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}

/// `<workspace>/target/guest`: everything the QEMU harness produces or caches.
pub fn guest_dir() -> PathBuf {
    workspace_root().join("target").join("guest")
}

/// The `cargo` that runs us (falls back to `cargo` on `PATH`).
pub fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// Describes a command for error messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` with inherited stdio; fails unless it exits 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .map_err(|e| format!("cannot start `{}`: {e}", describe(cmd)))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`{}` failed: {status}", describe(cmd)))
    }
}

/// Runs `cmd` quietly; returns its stdout, or an error carrying stdout and stderr.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot start `{}`: {e}", describe(cmd)))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`{}` failed: {}\n{}{}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Finds an executable on `PATH`.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

pub fn mkdirs(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))
}

/// `--flag value` options, with errors that quote the command's usage.
pub struct Flags<'a> {
    it: std::slice::Iter<'a, String>,
    usage: &'static str,
}

impl<'a> Flags<'a> {
    /// Options `args` of a command whose usage line is `usage`.
    pub fn new(args: &'a [String], usage: &'static str) -> Flags<'a> {
        Flags {
            it: args.iter(),
            usage,
        }
    }

    /// The next flag.
    pub fn next_flag(&mut self) -> Option<&'a str> {
        self.it.next().map(String::as_str)
    }

    /// The value after `flag`.
    pub fn value(&mut self, flag: &str) -> Result<String> {
        self.it
            .next()
            .cloned()
            .ok_or(format!("{flag} needs a value\n{}", self.usage))
    }

    /// The value after `flag`, a number ≥ `min`.
    pub fn number(&mut self, flag: &str, min: u64) -> Result<u64> {
        let v = self.value(flag)?;
        v.parse::<u64>()
            .ok()
            .filter(|n| *n >= min)
            .ok_or(format!("{flag}: not a number ≥ {min}: {v:?}"))
    }

    /// The error for an option the command does not know (or `--help`).
    pub fn unknown(&self, flag: &str) -> String {
        match flag {
            "-h" | "--help" => self.usage.into(),
            _ => format!("unknown option {flag:?}\n{}", self.usage),
        }
    }
}

/// A number for the results files: rounded to 3 decimals; `null` when
/// missing or not finite.
pub fn json_num(v: Option<f64>) -> serde_json::Value {
    v.filter(|x| x.is_finite())
        .map_or(serde_json::Value::Null, |x| {
            serde_json::json!((x * 1000.0).round() / 1000.0)
        })
}

/// Writes `rows` as `path` (a JSON array, one object per row), the one way
/// every benchmark writes its `results.json`.
pub fn write_json(path: &Path, rows: Vec<serde_json::Value>) -> Result<()> {
    let text = serde_json::to_string_pretty(&serde_json::Value::Array(rows))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    std::fs::write(path, text + "\n").map_err(|e| format!("{}: {e}", path.display()))
}
