//! The QEMU guest harness: boot a Debian cloud kernel with a busybox initramfs holding
//! the project's static binaries, on a q35 machine with an emulated Intel VT-d unit (left
//! alone by the guest kernel) and two e1000 NICs on one hub (a TX→RX loop).
//!
//! Reuse it from a new subcommand like this:
//!
//! ```ignore
//! let out = guest::run(
//!     &GuestRun::new("netloop", "iommud & sleep 1; e1000d --selftest")
//!         .package("iommud")
//!         .package("e1000d")
//!         .caching_mode(true)
//!         .timeout(Duration::from_secs(120)),
//! )?;
//! out.expect_success()?;                       // `GUEST-EXIT 0` seen, no timeout
//! let pkts = out.value("PACKETS");             // from a line `PACKETS 1000` in the console
//! ```
//!
//! Guest facts: NICs at 0000:00:01.0 and 0000:00:02.0 (8086:100e), VT-d registers at
//! 0xfed90000 (`/dev/mem`, `iomem=relaxed`), 64 × 2 MiB hugepages reserved and hugetlbfs
//! mounted at `/dev/hugepages`, busybox applets on `PATH`, project binaries in `/bin`.

pub mod cpio;
pub mod deps;
pub mod image;
pub mod qemu;

use std::path::PathBuf;
use std::time::Duration;

use crate::util::Result;

/// Number of 2 MiB hugepages the guest reserves at boot.
pub const HUGEPAGES: u32 = 64;
/// Printed by `/init` just before the job starts.
pub const START_MARKER: &str = "GUEST-START";
/// Printed by `/init` after the job: `GUEST-EXIT <exit status of /job.sh>`.
pub const EXIT_MARKER: &str = "GUEST-EXIT";

/// An extra file placed in the initramfs.
#[derive(Debug, Clone)]
pub struct GuestFile {
    /// Absolute path in the guest, e.g. `/etc/iommud.conf`.
    pub path: String,
    pub contents: Vec<u8>,
    /// Permission bits, e.g. `0o644` or `0o755`.
    pub mode: u32,
}

/// One guest boot: what goes in the image, what runs, and how long it may take.
#[derive(Debug, Clone)]
pub struct GuestRun {
    /// Names the image (`target/guest/images/<name>.cpio`) and log (`target/guest/logs/<name>.log`).
    pub name: String,
    /// `-device intel-iommu,caching-mode=on`: non-present→present changes need invalidation too.
    pub caching_mode: bool,
    /// Cargo packages whose binaries (all `[[bin]]`s, built static, release) go into `/bin`.
    pub packages: Vec<String>,
    /// Extra files for the initramfs.
    pub files: Vec<GuestFile>,
    /// Shell script (busybox `sh`) run as `/job.sh` by `/init` once proc, sys, devtmpfs,
    /// hugetlbfs (`/dev/hugepages`) and tmpfs (`/tmp`, `/dev/shm`) are mounted. Its exit
    /// status (that of its last command, or `exit N`) is reported as `GUEST-EXIT N`.
    pub script: String,
    /// Wall-clock limit for the whole boot; QEMU is killed when it passes.
    pub timeout: Duration,
    /// NIC model for both NICs (`e1000`, or `igb` for QEMU ≥ 8).
    pub nic_model: String,
    /// Appended to the kernel command line.
    pub extra_append: String,
    /// Replaces the default kernel command line (`extra_append` is still appended): for a
    /// guest kernel that must own the VT-d unit itself (the Linux peer in netbench).
    pub kernel_cmdline: Option<String>,
    /// Appended to QEMU's arguments.
    pub extra_qemu_args: Vec<String>,
    /// Stream the console to stdout while it runs (it is always logged).
    pub echo: bool,
    /// Without `echo`: console lines starting with one of these are still streamed
    /// (a long run's progress lines, e.g. the soak's reports).
    pub echo_prefixes: Vec<String>,
    /// Connect QEMU to the terminal's stdin (for `guest-shell`).
    pub interactive: bool,
    /// A raw image attached as an NVMe controller (`-drive if=none` + `-device nvme`,
    /// 00:03.0, after the NICs); the guest kernel's built-in nvme driver is kept off it.
    pub nvme_disk: Option<PathBuf>,
}

impl GuestRun {
    /// A run named `name` executing `script`, with no project binaries, caching mode off,
    /// two e1000 NICs, a 120 s timeout and the console echoed.
    pub fn new(name: impl Into<String>, script: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            caching_mode: false,
            packages: Vec::new(),
            files: Vec::new(),
            script: script.into(),
            timeout: Duration::from_secs(120),
            nic_model: "e1000".into(),
            extra_append: String::new(),
            kernel_cmdline: None,
            extra_qemu_args: Vec::new(),
            echo: true,
            echo_prefixes: Vec::new(),
            interactive: false,
            nvme_disk: None,
        }
    }

    /// Attaches the raw image `path` as an NVMe controller at 00:03.0.
    pub fn nvme_disk(mut self, path: impl Into<PathBuf>) -> Self {
        self.nvme_disk = Some(path.into());
        self
    }

    /// Adds the binaries of cargo package `pkg` to `/bin`.
    pub fn package(mut self, pkg: impl Into<String>) -> Self {
        self.packages.push(pkg.into());
        self
    }

    pub fn caching_mode(mut self, on: bool) -> Self {
        self.caching_mode = on;
        self
    }

    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    #[allow(dead_code)] // API for guest tests to come
    /// Adds a file at `path` in the guest.
    pub fn file(
        mut self,
        path: impl Into<String>,
        contents: impl Into<Vec<u8>>,
        mode: u32,
    ) -> Self {
        self.files.push(GuestFile {
            path: path.into(),
            contents: contents.into(),
            mode,
        });
        self
    }

    #[allow(dead_code)] // API for guest tests to come
    pub fn nic_model(mut self, model: impl Into<String>) -> Self {
        self.nic_model = model.into();
        self
    }

    #[allow(dead_code)] // API for guest tests to come
    pub fn echo(mut self, on: bool) -> Self {
        self.echo = on;
        self
    }
}

/// What a boot left behind.
#[derive(Debug, Clone)]
pub struct GuestOutput {
    /// The full console (and QEMU stderr, prefixed `[qemu] `) log.
    pub log_path: PathBuf,
    /// The console output, `\r` removed.
    pub console: String,
    /// N from the last `GUEST-EXIT N` line; `None` if the job never finished.
    pub exit_marker: Option<i32>,
    /// QEMU was killed at the timeout.
    pub timed_out: bool,
    /// Wall-clock time from QEMU start to exit.
    pub duration: Duration,
}

impl GuestOutput {
    /// The guest kernel hung before the job started: QEMU was killed at the timeout
    /// and the console never showed the start marker. Seen under TCG on a slow host
    /// as an RCU stall during boot; nothing of the job ran.
    pub fn hung_in_boot(&self) -> bool {
        self.timed_out && !self.console.contains(START_MARKER)
    }

    /// The job ran to completion with exit status 0.
    pub fn success(&self) -> bool {
        self.exit_marker == Some(0) && !self.timed_out
    }

    /// `Ok` on [`success`](Self::success), else an error naming the log.
    pub fn expect_success(&self) -> Result<()> {
        if self.success() {
            return Ok(());
        }
        Err(format!(
            "guest job failed ({}); log: {}",
            if self.timed_out {
                "timed out".to_string()
            } else {
                match self.exit_marker {
                    Some(c) => format!("exit status {c}"),
                    None => "no GUEST-EXIT marker".to_string(),
                }
            },
            self.log_path.display()
        ))
    }

    /// Console lines printed by the job (between the start and exit markers).
    pub fn job_lines(&self) -> impl Iterator<Item = &str> {
        let mut inside = false;
        self.console.lines().filter(move |l| {
            let t = l.trim();
            // The console may prefix terminal escapes to the marker's line.
            if t.ends_with(START_MARKER) {
                inside = true;
                return false;
            }
            if t.starts_with(EXIT_MARKER) {
                inside = false;
            }
            inside
        })
    }

    /// The rest of the first job line starting with `key` followed by a space, trimmed:
    /// `value("VTD CAP")` on `VTD CAP 0x00D2008C222F0606` gives `0x00D2008C222F0606`.
    pub fn value(&self, key: &str) -> Option<&str> {
        self.job_lines().find_map(|l| {
            l.trim()
                .strip_prefix(key)
                .filter(|r| r.starts_with(' '))
                .map(str::trim)
        })
    }
}

impl GuestOutput {
    /// A finished boot read back from its log (`target/guest/logs/<name>.log`): the
    /// console lines (QEMU's `[qemu] ` lines and the harness's `# ` lines left out), for
    /// re-reading a benchmark's figures without booting again.
    pub fn from_log(path: &std::path::Path) -> Result<GuestOutput> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut console = String::new();
        let mut timed_out = false;
        for l in text.lines() {
            if l.starts_with("[qemu] ") {
                continue;
            }
            if let Some(h) = l.strip_prefix("# ") {
                timed_out |= h.contains("timed out");
                continue;
            }
            console.push_str(l);
            console.push('\n');
        }
        let exit_marker = console.lines().rev().find_map(|l| {
            l.trim()
                .strip_prefix(EXIT_MARKER)
                .and_then(|r| r.trim().parse::<i32>().ok())
        });
        Ok(GuestOutput {
            log_path: path.to_path_buf(),
            console,
            exit_marker,
            timed_out,
            duration: Duration::ZERO,
        })
    }
}

/// Ensures the dependencies, builds the image and boots it. Fails only if the harness
/// itself fails (build, missing QEMU, ...); a failing or hung job is reported in the output.
/// A boot whose kernel hung before the job started ([`GuestOutput::hung_in_boot`]) is
/// booted once more, its log kept beside the new one; a job that started is never rerun.
pub fn run(run: &GuestRun) -> Result<GuestOutput> {
    let assets = deps::ensure()?;
    let initrd = image::build(run, &assets)?;
    let out = qemu::boot(run, &assets, &initrd)?;
    if !out.hung_in_boot() {
        return Ok(out);
    }
    let kept = out.log_path.with_extension("boot-hang.log");
    let _ = std::fs::rename(&out.log_path, &kept);
    eprintln!(
        "xtask: guest `{}`: the kernel hung before the job started (log: {}); booting once more",
        run.name,
        kept.display()
    );
    qemu::boot(run, &assets, &initrd)
}

/// Parses a `0x…` (or bare) hexadecimal number.
pub fn parse_hex(s: &str) -> Option<u64> {
    let s = s.trim();
    let s = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    u64::from_str_radix(s, 16).ok()
}

#[cfg(test)]
impl GuestOutput {
    /// A finished boot whose console printed `console` (for parser tests).
    pub(crate) fn from_console(console: &str) -> GuestOutput {
        GuestOutput {
            log_path: PathBuf::new(),
            console: console.into(),
            exit_marker: Some(0),
            timed_out: false,
            duration: Duration::ZERO,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_reads_back_as_the_console() {
        let dir = std::env::temp_dir().join(format!("xtask-log-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let p = dir.join("x.log");
        std::fs::write(
            &p,
            "# qemu-system-x86_64 ...\n[qemu] warning\nGUEST-START\nloop: pps=5\nGUEST-EXIT 0\n",
        )
        .expect("write");
        let o = GuestOutput::from_log(&p).expect("read");
        assert_eq!(o.job_lines().collect::<Vec<_>>(), ["loop: pps=5"]);
        assert!(o.success());
        std::fs::write(
            &p,
            "GUEST-START\n# xtask: guest `x` timed out after 1s; QEMU killed\n",
        )
        .expect("write");
        let o = GuestOutput::from_log(&p).expect("read");
        assert!(o.timed_out && o.exit_marker.is_none());
        assert!(!o.hung_in_boot(), "the job had started: not booted again");
        std::fs::write(
            &p,
            "[   23.6] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:\n\
             # xtask: guest `x` timed out after 1s; QEMU killed\n",
        )
        .expect("write");
        let o = GuestOutput::from_log(&p).expect("read");
        assert!(o.hung_in_boot(), "killed before the start marker");
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn output(console: &str) -> GuestOutput {
        GuestOutput::from_console(console)
    }

    #[test]
    fn job_lines_and_values() {
        let o =
            output("KEY boot\n\x1bc\x1b[2JGUEST-START\nKEY 1\nVTD CAP 0x86\nGUEST-EXIT 0\nKEY 2\n");
        assert_eq!(o.job_lines().collect::<Vec<_>>(), ["KEY 1", "VTD CAP 0x86"]);
        assert_eq!(o.value("KEY"), Some("1"));
        assert_eq!(o.value("VTD"), Some("CAP 0x86"));
        assert_eq!(o.value("VTD CAP").and_then(parse_hex), Some(0x86));
        assert_eq!(o.value("VT"), None);
        assert!(o.success());
    }
}
