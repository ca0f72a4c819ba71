//! Proof of device ownership, carried by every Attach (docs/ARCHITECTURE.md,
//! "Trust and the attacker").
//!
//! A driver may attach only to a device it owns, and iommud must be able to
//! check that without trusting what the driver says. On Linux the proof is a
//! file descriptor of one of the function's BAR files
//! (`/sys/bus/pci/devices/<dddd:bb:dd.f>/resource<N>`) opened read-write: the
//! files are root-only (mode 0600), so only the device's owner can open one,
//! and the descriptor names exactly one function, which iommud resolves from
//! the descriptor itself (not from anything the client says). The
//! world-readable `config` file proves nothing and is refused.
//!
//! iommud's `sim` platform keeps the same shape with files of its own: one
//! `devices/<dddd:bb:dd.f>/resource0` per function beside its socket (mode
//! 0600, owned by iommud's user; an administrator hands a device to a driver
//! by changing the owner, as pcid hands a BAR to a driver on Redox).

use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

/// Where Linux lists PCI functions.
pub const SYSFS_PCI_DEVICES: &str = "/sys/bus/pci/devices";

/// The sysfs name of PCI function `sid` in segment 0, e.g. `0000:00:01.0`.
pub fn pci_name(sid: u16) -> String {
    crate::Bdf(sid).sysfs_name()
}

/// The directory of device files of a sim iommud serving `socket`.
pub fn sim_device_dir(socket: &Path) -> Option<PathBuf> {
    Some(socket.parent()?.join("devices"))
}

/// The file whose read-write descriptor proves ownership of `sid`: the sim's
/// own device file when iommud at `socket` keeps a device directory, the
/// function's BAR 0 in sysfs otherwise.
pub fn path(sid: u16, socket: Option<&Path>) -> PathBuf {
    if let Some(dir) = socket.and_then(sim_device_dir).filter(|d| d.is_dir()) {
        return dir.join(pci_name(sid)).join("resource0");
    }
    Path::new(SYSFS_PCI_DEVICES)
        .join(pci_name(sid))
        .join("resource0")
}

/// Opens the proof of ownership of `sid` (read-write, close-on-exec).
pub fn open(sid: u16, socket: Option<&Path>) -> io::Result<OwnedFd> {
    let p = path(sid, socket);
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&p)
        .map(OwnedFd::from)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", p.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysfs_is_the_default_and_the_sim_directory_wins_when_present() {
        let dir = std::env::temp_dir().join(format!("libdma-proof-{}", std::process::id()));
        let sock = dir.join("iommud.sock");
        assert_eq!(
            path(0x08, Some(&sock)),
            PathBuf::from("/sys/bus/pci/devices/0000:00:01.0/resource0")
        );
        std::fs::create_dir_all(dir.join("devices")).unwrap();
        assert_eq!(
            path(0x08, Some(&sock)),
            dir.join("devices/0000:00:01.0/resource0")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
