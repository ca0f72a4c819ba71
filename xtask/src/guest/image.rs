//! Building the guest: static project binaries and a newc initramfs around them.

use std::fs;
use std::path::{Path, PathBuf};

use super::cpio::Cpio;
use super::deps::Assets;
use super::GuestRun;
use crate::util::{cargo, describe, guest_dir, mkdirs, workspace_root, Result};

/// The only target installed here; `+crt-static` makes its binaries static-pie.
pub const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";

/// Where the guest build lives, apart from the host's `target/` so that the different
/// RUSTFLAGS never invalidate the host build.
pub fn build_dir() -> PathBuf {
    guest_dir().join("build")
}

/// Builds every binary of `packages` statically (release profile); returns their paths.
pub fn build_binaries(packages: &[String]) -> Result<Vec<PathBuf>> {
    // The daemon ships with its control tool (`iommuctl`, its own crate).
    let mut packages = packages.to_vec();
    if packages.iter().any(|p| p == "iommud") && !packages.iter().any(|p| p == "iommuctl") {
        packages.push("iommuctl".into());
    }
    let packages = &packages[..];
    if packages.is_empty() {
        return Ok(Vec::new());
    }
    let mut cmd = cargo();
    cmd.current_dir(workspace_root())
        .env("CARGO_TARGET_DIR", build_dir())
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .args([
            "build",
            "--profile",
            "guest",
            "--target",
            GUEST_TARGET,
            "--bins",
        ])
        .args(["--message-format", "json-render-diagnostics"]);
    for p in packages {
        cmd.args(["-p", p]);
    }
    eprintln!("xtask: building guest binaries: {}", packages.join(" "));
    let out = cmd
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot start `{}`: {e}", describe(&cmd)))?;
    if !out.status.success() {
        return Err(format!("guest build failed: {}", out.status));
    }
    let mut bins = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if !line.contains("\"reason\":\"compiler-artifact\"")
            || !line.contains("\"kind\":[\"bin\"]")
        {
            continue;
        }
        if let Some(exe) = json_string_field(line, "executable") {
            bins.push(PathBuf::from(exe));
        }
    }
    if bins.is_empty() {
        return Err(format!("packages {packages:?} produced no binaries"));
    }
    Ok(bins)
}

/// The string value of `"key":"…"` in one line of cargo's JSON (no escapes expected).
fn json_string_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let pat = format!("\"{key}\":\"");
    let start = line.find(&pat)? + pat.len();
    let len = line[start..].find('"')?;
    Some(&line[start..start + len])
}

/// The `/init` every guest runs: mounts, hugepages, the job (`/job.sh`), the exit marker,
/// power-off.
pub fn init_script() -> String {
    format!(
        r#"#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /run /sbin /usr/bin /usr/sbin /dev/hugepages
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/hugepages /dev/pts /dev/shm
mount -t hugetlbfs -o pagesize=2M hugetlbfs /dev/hugepages
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
if [ "$(cat /proc/sys/vm/nr_hugepages)" -lt {hp} ]; then echo {hp} > /proc/sys/vm/nr_hugepages; fi
echo
echo "{start}"
cd /
sh /job.sh
rc=$?
echo "{exit} $rc"
sync
poweroff -f
"#,
        hp = super::HUGEPAGES,
        start = super::START_MARKER,
        exit = super::EXIT_MARKER,
    )
}

/// Packs the initramfs for `run` at `target/guest/images/<name>.cpio`.
pub fn build(run: &GuestRun, assets: &Assets) -> Result<PathBuf> {
    let bins = build_binaries(&run.packages)?;
    let mut c = Cpio::new();
    for d in ["/bin", "/dev", "/etc", "/proc", "/root", "/sys", "/tmp"] {
        c.dir(d);
    }
    c.char_dev("/dev/console", 0o600, 5, 1);
    c.char_dev("/dev/null", 0o666, 1, 3);
    c.file("/bin/busybox", 0o755, &read(&assets.busybox)?);
    c.symlink("/bin/sh", "busybox");
    c.file("/init", 0o755, init_script().as_bytes());
    let mut job = String::from("#!/bin/sh\n");
    job.push_str(&run.script);
    job.push('\n');
    c.file("/job.sh", 0o755, job.as_bytes());
    for b in &bins {
        let name = b
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or("bad binary name")?;
        c.file(&format!("/bin/{name}"), 0o755, &read(b)?);
    }
    let mut made_dirs: Vec<String> = Vec::new();
    for f in &run.files {
        let parent = Path::new(&f.path)
            .parent()
            .and_then(|p| p.to_str())
            .unwrap_or("/");
        let mut acc = String::new();
        for comp in parent.split('/').filter(|s| !s.is_empty()) {
            acc.push('/');
            acc.push_str(comp);
            let exists =
                ["/bin", "/dev", "/etc", "/proc", "/root", "/sys", "/tmp"].contains(&acc.as_str());
            if !exists && !made_dirs.contains(&acc) {
                c.dir(&acc);
                made_dirs.push(acc.clone());
            }
        }
        c.file(&f.path, f.mode, &f.contents);
    }
    let dir = guest_dir().join("images");
    mkdirs(&dir)?;
    let path = dir.join(format!("{}.cpio", run.name));
    fs::write(&path, c.finish()).map_err(|e| format!("write {}: {e}", path.display()))?;
    Ok(path)
}

fn read(p: &Path) -> Result<Vec<u8>> {
    fs::read(p).map_err(|e| format!("read {}: {e}", p.display()))
}
