//! Checking a client's proof that it owns the device it attaches to
//! (docs/ARCHITECTURE.md, "Trust and the attacker"; the client side is
//! `iommu_abi::proof`).
//!
//! The proof is a file descriptor, and everything iommud checks it comes
//! from the descriptor itself, through the kernel: the access mode it was
//! opened with, the file system it lives on, and the path it resolves to.
//! Nothing the client says about it is believed.

#[cfg(target_os = "linux")]
use std::os::fd::AsRawFd;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

/// `statfs.f_type` of sysfs (Linux `include/uapi/linux/magic.h`).
pub const SYSFS_MAGIC: i64 = 0x6265_6572;

/// Who vouches for device ownership on this platform.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Authority {
    /// Only administrators attach (Redox until its proof, the handle pcid
    /// gives the driver, is checked: drivers run as root there).
    Administrators,
    /// Linux: a read-write descriptor of one of the function's
    /// `resource<N>` BAR files in sysfs (root-only files).
    Sysfs,
    /// The sim platform: a read-write descriptor of
    /// `<dir>/<dddd:bb:dd.f>/resource0`, files iommud created (mode 0600).
    SimDir(PathBuf),
}

fn refuse(sid: u16, what: impl std::fmt::Display) -> String {
    format!(
        "no proof of ownership of {}: {what}",
        iommu_abi::proof::pci_name(sid)
    )
}

#[cfg(target_os = "linux")]
/// Where the descriptor `fd` of this process points.
fn resolve(fd: &OwnedFd) -> Result<PathBuf, String> {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map_err(|e| format!("cannot resolve the descriptor: {e}"))
}

#[cfg(target_os = "linux")]
fn access_mode(fd: &OwnedFd) -> Result<libc::c_int, String> {
    // SAFETY: F_GETFL on a descriptor we own reads its flags.
    let fl = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if fl < 0 {
        return Err(format!(
            "cannot read the descriptor's flags: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(fl & libc::O_ACCMODE)
}

#[cfg(target_os = "linux")]
fn fs_type(fd: &OwnedFd) -> Result<i64, String> {
    // SAFETY: statfs is plain old data; all-zero is valid.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs writes one statfs we own.
    if unsafe { libc::fstatfs(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(format!("fstatfs: {}", std::io::Error::last_os_error()));
    }
    #[allow(clippy::unnecessary_cast)] // the field's type differs between libcs
    Ok(st.f_type as i64)
}

#[cfg(target_os = "linux")]
fn is_regular(fd: &OwnedFd) -> Result<bool, String> {
    // SAFETY: stat is plain old data; all-zero is valid.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes one stat we own.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(format!("fstat: {}", std::io::Error::last_os_error()));
    }
    Ok(st.st_mode & libc::S_IFMT == libc::S_IFREG)
}

#[cfg(target_os = "linux")]
/// True for `resource0`..`resource5` and their `_wc` twins: the BAR files.
fn is_bar_file(name: &str) -> bool {
    let Some(n) = name.strip_prefix("resource") else {
        return false;
    };
    let n = n.strip_suffix("_wc").unwrap_or(n);
    n.len() == 1 && n.as_bytes()[0].is_ascii_digit() && n.as_bytes()[0] <= b'5'
}

impl Authority {
    /// Checks that `proof` shows ownership of function `sid`; the error
    /// says what was missing or wrong.
    pub fn verify(&self, sid: u16, proof: Option<&OwnedFd>, admin: bool) -> Result<(), String> {
        if *self == Authority::Administrators {
            return if admin {
                Ok(())
            } else {
                Err(refuse(
                    sid,
                    "only an administrator may attach on this platform",
                ))
            };
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = proof;
            Err(refuse(sid, "descriptor proofs are checked on Linux only"))
        }
        #[cfg(target_os = "linux")]
        self.verify_fd(sid, proof)
    }

    #[cfg(target_os = "linux")]
    fn verify_fd(&self, sid: u16, proof: Option<&OwnedFd>) -> Result<(), String> {
        let name = iommu_abi::proof::pci_name(sid);
        let Some(fd) = proof else {
            return Err(refuse(
                sid,
                match self {
                    Authority::Administrators => String::new(),
                    Authority::Sysfs => format!(
                        "pass a read-write descriptor of {}/{name}/resource0 with Attach",
                        iommu_abi::proof::SYSFS_PCI_DEVICES
                    ),
                    Authority::SimDir(d) => format!(
                        "pass a read-write descriptor of {}/{name}/resource0 with Attach",
                        d.display()
                    ),
                },
            ));
        };
        if access_mode(fd).map_err(|e| refuse(sid, e))? != libc::O_RDWR {
            return Err(refuse(
                sid,
                "the descriptor is not open for reading and writing",
            ));
        }
        if !is_regular(fd).map_err(|e| refuse(sid, e))? {
            return Err(refuse(sid, "the descriptor is not a device file"));
        }
        let path = resolve(fd).map_err(|e| refuse(sid, e))?;
        match self {
            Authority::Administrators => Ok(()),
            Authority::Sysfs => {
                if fs_type(fd).map_err(|e| refuse(sid, e))? != SYSFS_MAGIC {
                    return Err(refuse(sid, format!("{} is not on sysfs", path.display())));
                }
                let file = path.file_name().and_then(|f| f.to_str()).unwrap_or("");
                let dir = path
                    .parent()
                    .and_then(Path::file_name)
                    .and_then(|f| f.to_str())
                    .unwrap_or("");
                if !path.starts_with("/sys/devices") || !is_bar_file(file) {
                    return Err(refuse(
                        sid,
                        format!("{} is not a PCI BAR file", path.display()),
                    ));
                }
                if dir != name {
                    return Err(refuse(sid, format!("{} belongs to {dir}", path.display())));
                }
                Ok(())
            }
            Authority::SimDir(d) => {
                let want = d.join(&name).join("resource0");
                if path != want {
                    return Err(refuse(
                        sid,
                        format!("{} is not {}", path.display(), want.display()),
                    ));
                }
                Ok(())
            }
        }
    }

    /// The vendor and device id of `sid`, where the platform can tell.
    pub fn device_ids(&self, sid: u16) -> Option<(u16, u16)> {
        match self {
            Authority::Administrators => None,
            Authority::Sysfs => {
                let dir = Path::new(iommu_abi::proof::SYSFS_PCI_DEVICES)
                    .join(iommu_abi::proof::pci_name(sid));
                let read = |f: &str| {
                    let t = std::fs::read_to_string(dir.join(f)).ok()?;
                    u16::from_str_radix(t.trim().trim_start_matches("0x"), 16).ok()
                };
                Some((read("vendor")?, read("device")?))
            }
            Authority::SimDir(_) => None,
        }
    }

    /// The sim platform's device files: `<dir>/<name>/resource0` for every
    /// function on bus 0, mode 0600, owned by iommud's user. `dir` is
    /// created; the result is its canonical form.
    pub fn make_sim_dir(dir: &Path) -> std::io::Result<Authority> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)?;
        let dir = dir.canonicalize()?;
        for devfn in 0..=0xffu16 {
            let d = dir.join(iommu_abi::proof::pci_name(devfn));
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(&d)?;
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o600)
                .open(d.join("resource0"))?;
        }
        Ok(Authority::SimDir(dir))
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("iommud-proof-{name}-{}", std::process::id()))
    }

    fn open(p: &Path, write: bool) -> OwnedFd {
        std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .open(p)
            .unwrap()
            .into()
    }

    #[test]
    fn bar_file_names() {
        for ok in ["resource0", "resource5", "resource2_wc"] {
            assert!(is_bar_file(ok), "{ok}");
        }
        for bad in [
            "resource",
            "resource6",
            "resource01",
            "config",
            "resource0x",
            "rom",
        ] {
            assert!(!is_bar_file(bad), "{bad}");
        }
    }

    #[test]
    fn sim_proofs_name_exactly_one_function_and_need_write_access() {
        let root = tmp("sim");
        let a = Authority::make_sim_dir(&root).unwrap();
        let Authority::SimDir(dir) = &a else { panic!() };
        let f01 = dir.join("0000:00:01.0/resource0");
        assert!(a.verify(0x08, Some(&open(&f01, true)), false).is_ok());
        // Another function's file, a read-only descriptor, no descriptor, a
        // look-alike file elsewhere: all refused, each saying why.
        let e = a.verify(0x10, Some(&open(&f01, true)), false).unwrap_err();
        assert!(e.contains("is not"), "{e}");
        let e = a.verify(0x08, Some(&open(&f01, false)), false).unwrap_err();
        assert!(e.contains("not open for reading and writing"), "{e}");
        let e = a.verify(0x08, None, false).unwrap_err();
        assert!(e.contains("pass a read-write descriptor"), "{e}");
        let fake = tmp("fake").join("0000:00:01.0");
        std::fs::create_dir_all(&fake).unwrap();
        std::fs::write(fake.join("resource0"), b"").unwrap();
        assert!(a
            .verify(0x08, Some(&open(&fake.join("resource0"), true)), false)
            .is_err());
        // A directory is not a device file.
        let d: OwnedFd = std::fs::File::open(dir).unwrap().into();
        assert!(a.verify(0x08, Some(&d), false).is_err());
        // The files are the owner's only.
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&f01).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::remove_dir_all(&root).unwrap();
        std::fs::remove_dir_all(tmp("fake")).unwrap();
    }

    #[test]
    fn sysfs_refuses_files_off_sysfs_and_world_readable_config() {
        let a = Authority::Sysfs;
        // A regular file elsewhere, even one named like a BAR file.
        let p = tmp("sysfs").join("0000:00:01.0");
        std::fs::create_dir_all(&p).unwrap();
        std::fs::write(p.join("resource0"), b"").unwrap();
        let e = a
            .verify(0x08, Some(&open(&p.join("resource0"), true)), false)
            .unwrap_err();
        assert!(e.contains("not on sysfs"), "{e}");
        std::fs::remove_dir_all(tmp("sysfs")).unwrap();
        // A real sysfs `config` file of a function of this machine (readable
        // by anyone) proves nothing.
        let devs = Path::new(iommu_abi::proof::SYSFS_PCI_DEVICES);
        if let Some(dev) = std::fs::read_dir(devs).ok().and_then(|mut d| d.next()) {
            let dev = dev.unwrap().path();
            let name = dev.file_name().unwrap().to_str().unwrap().to_string();
            let sid = iommu_abi::Bdf::parse(&name).map(|b| b.0).unwrap();
            let e = a
                .verify(sid, Some(&open(&dev.join("config"), false)), false)
                .unwrap_err();
            assert!(e.contains("not open for reading and writing"), "{e}");
            if let Ok(f) = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(dev.join("config"))
            {
                let e = a.verify(sid, Some(&f.into()), false).unwrap_err();
                assert!(e.contains("not a PCI BAR file"), "{e}");
            }
        }
    }
}
