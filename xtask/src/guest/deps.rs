//! `cargo xtask deps`: host tools and cached guest ingredients.
//!
//! Idempotent: a second run finds everything in place (QEMU on the host, busybox and the
//! kernel under `target/guest/cache/`) and touches neither apt nor the network.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::{guest_dir, mkdirs, output, run, which, Result};

/// The oldest QEMU with `igb` (and a VT-d model good enough for us).
const MIN_QEMU_MAJOR: u32 = 8;
const APT_SOURCES_DIR: &str = "/etc/apt/sources.list.d";
const BACKPORTS: &str = "bookworm-backports";

/// What a guest boot needs from the host, all present on disk.
#[derive(Debug, Clone)]
pub struct Assets {
    /// `qemu-system-x86_64`.
    pub qemu: PathBuf,
    /// The Debian cloud kernel image (`boot/vmlinuz-*`).
    pub kernel: PathBuf,
    /// A static busybox binary.
    pub busybox: PathBuf,
}

/// `target/guest/cache`.
pub fn cache_dir() -> PathBuf {
    guest_dir().join("cache")
}

/// Makes sure every host tool and guest ingredient exists; quiet when nothing is to do.
pub fn ensure() -> Result<Assets> {
    let mut apt = Apt::default();
    let qemu = ensure_qemu(&mut apt)?;
    if which("cpio").is_none() {
        apt.install(&["cpio"], None)?;
    }
    let cache = cache_dir();
    mkdirs(&cache)?;
    let busybox = ensure_busybox(&mut apt, &cache)?;
    let kernel = ensure_kernel(&mut apt, &cache)?;
    Ok(Assets {
        qemu,
        kernel,
        busybox,
    })
}

/// apt-get, with `apt-get update` run at most once per xtask invocation.
#[derive(Default)]
pub(crate) struct Apt {
    updated: bool,
}

impl Apt {
    pub(crate) fn update(&mut self) -> Result<()> {
        if !self.updated {
            eprintln!("xtask deps: apt-get update");
            output(Command::new("apt-get").args(["-q", "update"]))?;
            self.updated = true;
        }
        Ok(())
    }

    fn install(&mut self, pkgs: &[&str], suite: Option<&str>) -> Result<()> {
        eprintln!("xtask deps: apt-get install {}", pkgs.join(" "));
        let attempt = |_: &mut Self| {
            let mut cmd = Command::new("apt-get");
            cmd.env("DEBIAN_FRONTEND", "noninteractive")
                .args(["-q", "install", "-y"]);
            if let Some(s) = suite {
                cmd.args(["-t", s]);
            }
            output(cmd.args(pkgs))
        };
        if attempt(self).is_err() {
            self.update()?;
            attempt(self)?;
        }
        Ok(())
    }

    /// `apt-get download <pkg>` into `dir`; returns the `.deb`.
    pub(crate) fn download(&mut self, pkg: &str, dir: &Path) -> Result<PathBuf> {
        eprintln!("xtask deps: apt-get download {pkg}");
        let attempt = || {
            output(
                Command::new("apt-get")
                    .current_dir(dir)
                    .args(["-q", "download", pkg]),
            )
        };
        if attempt().is_err() {
            self.update()?;
            attempt()?;
        }
        find_deb(dir, pkg)
            .ok_or_else(|| format!("apt-get download {pkg} left no .deb in {}", dir.display()))
    }
}

fn find_deb(dir: &Path, pkg: &str) -> Option<PathBuf> {
    let prefix = format!("{pkg}_");
    fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
        })
}

fn qemu_major(qemu: &Path) -> Option<u32> {
    let out = output(Command::new(qemu).arg("--version")).ok()?;
    // "QEMU emulator version 10.0.2 (Debian ...)"
    let ver = out.split("version ").nth(1)?;
    ver.split('.').next()?.trim().parse().ok()
}

fn ensure_qemu(apt: &mut Apt) -> Result<PathBuf> {
    if let Some(q) = which("qemu-system-x86_64") {
        if qemu_major(&q).is_some_and(|m| m >= MIN_QEMU_MAJOR) {
            return Ok(q);
        }
    }
    enable_backports()?;
    apt.updated = false;
    apt.update()?;
    apt.install(&["qemu-system-x86"], Some(BACKPORTS))?;
    let q = which("qemu-system-x86_64").ok_or("qemu-system-x86_64 still missing after install")?;
    match qemu_major(&q) {
        Some(m) if m >= MIN_QEMU_MAJOR => Ok(q),
        m => Err(format!(
            "QEMU major version {m:?} < {MIN_QEMU_MAJOR} after install"
        )),
    }
}

/// Appends the backports suite to the `Suites:` line that lists plain `bookworm` in the
/// Debian `.sources` file(s). Idempotent: lines already naming backports are left alone.
fn enable_backports() -> Result<()> {
    let entries = fs::read_dir(APT_SOURCES_DIR).map_err(|e| format!("{APT_SOURCES_DIR}: {e}"))?;
    let mut edited = false;
    for path in entries.filter_map(|e| e.ok().map(|e| e.path())) {
        if path.extension().and_then(|e| e.to_str()) != Some("sources") {
            continue;
        }
        let text = fs::read_to_string(&path).unwrap_or_default();
        let has_plain_bookworm = text.lines().any(|l| {
            l.starts_with("Suites:") && l.split_whitespace().skip(1).any(|w| w == "bookworm")
        });
        if !has_plain_bookworm {
            continue;
        }
        let script = format!(
            "/^Suites:(.*[[:space:]])?bookworm([[:space:]]|$)/{{/{BACKPORTS}/!s/[[:space:]]*$/ {BACKPORTS}/}}"
        );
        eprintln!("xtask deps: adding {BACKPORTS} to {}", path.display());
        run(Command::new("sed").args(["-i", "-E", &script]).arg(&path))?;
        edited = true;
    }
    if edited {
        Ok(())
    } else {
        Err(format!(
            "no Debian .sources file with a `bookworm` suite in {APT_SOURCES_DIR}"
        ))
    }
}

/// Downloads `pkg` into the cache and unpacks it into `cache/<unpack>` unless done before.
pub(crate) fn fetch_unpacked(
    apt: &mut Apt,
    cache: &Path,
    pkg: &str,
    unpack: &str,
) -> Result<PathBuf> {
    let deb = match find_deb(cache, pkg) {
        Some(d) => d,
        None => apt.download(pkg, cache)?,
    };
    let root = cache.join(unpack);
    let tmp = cache.join(format!("{unpack}.tmp"));
    let _ = fs::remove_dir_all(&tmp);
    mkdirs(&tmp)?;
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tmp))?;
    let _ = fs::remove_dir_all(&root);
    fs::rename(&tmp, &root).map_err(|e| format!("rename {}: {e}", tmp.display()))?;
    Ok(root)
}

fn ensure_busybox(apt: &mut Apt, cache: &Path) -> Result<PathBuf> {
    let bin = cache.join("busybox-static").join("bin").join("busybox");
    if !bin.is_file() {
        fetch_unpacked(apt, cache, "busybox-static", "busybox-static")?;
    }
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(format!("busybox-static has no {}", bin.display()))
    }
}

pub(crate) fn find_vmlinuz(root: &Path) -> Option<PathBuf> {
    fs::read_dir(root.join("boot"))
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
}

/// The versioned kernel package the `linux-image-cloud-amd64` metapackage depends on.
fn cloud_kernel_package(apt: &mut Apt) -> Result<String> {
    let query = || -> Option<String> {
        let out =
            output(Command::new("apt-cache").args(["depends", "linux-image-cloud-amd64"])).ok()?;
        out.lines()
            .filter_map(|l| l.trim().strip_prefix("Depends:"))
            .map(|p| p.trim().trim_matches(|c| c == '<' || c == '>').to_string())
            .find(|p| p.starts_with("linux-image-") && p.contains("-cloud-amd64"))
    };
    if let Some(p) = query() {
        return Ok(p);
    }
    apt.update()?;
    query().ok_or_else(|| "apt-cache depends linux-image-cloud-amd64 names no kernel".to_string())
}

fn ensure_kernel(apt: &mut Apt, cache: &Path) -> Result<PathBuf> {
    let root = cache.join("kernel");
    if let Some(k) = find_vmlinuz(&root) {
        return Ok(k);
    }
    let pkg = cloud_kernel_package(apt)?;
    fetch_unpacked(apt, cache, &pkg, "kernel")?;
    find_vmlinuz(&root).ok_or_else(|| format!("{pkg} has no boot/vmlinuz-*"))
}
