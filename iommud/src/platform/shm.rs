//! Memory iommud shares with a client that is not DMA memory (a domain's
//! published page and client page), on Unix: memfds.
//!
//! Memory the client must not write is sealed before it is handed out
//! (`F_SEAL_FUTURE_WRITE`, Linux ≥ 5.1): from then on no new writable
//! mapping and no `write()` is possible through *any* descriptor of the file
//! — not the one passed, and not one reopened through `/proc` — while the
//! writable mapping iommud made before sealing keeps working.
//! docs/ARCHITECTURE.md, "Trust and the attacker".

use crate::hw::{HwError, SharedMem};
#[cfg(target_os = "linux")]
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
#[cfg(target_os = "linux")]
use std::sync::Arc;

#[cfg(target_os = "linux")]
fn os(what: &'static str) -> HwError {
    HwError::Os {
        what,
        err: std::io::Error::last_os_error(),
    }
}

/// Creates `len` zeroed bytes; see [`crate::hw::PhysMem::alloc_shared`].
#[cfg(target_os = "linux")]
pub fn create(len: usize, client_writable: bool) -> Result<SharedMem, HwError> {
    let name = c"iommud-shared";
    // SAFETY: FFI call with a valid NUL-terminated name; the fd is checked.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(os("memfd_create"));
    }
    // SAFETY: `fd` was just returned by memfd_create and nobody else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let size = libc::off_t::try_from(len).map_err(|_| HwError::NoMemory("shared page size"))?;
    // SAFETY: plain FFI call on an fd we own.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), size) } != 0 {
        return Err(os("ftruncate"));
    }
    let map = iommu_abi::shm::Mapping::new(fd.as_fd(), 0, len).map_err(|err| HwError::Os {
        what: "mmap of a shared page",
        err,
    })?;
    let mut seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
    if !client_writable {
        seals |= libc::F_SEAL_FUTURE_WRITE;
    }
    seals |= libc::F_SEAL_SEAL;
    // SAFETY: plain FFI call on an fd we own.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(os("sealing a shared page"));
    }
    Ok(SharedMem {
        fd: Arc::new(fd),
        map,
    })
}

/// Like [`create`], but in a named file (mode 0600) that outlives iommud,
/// so a restarted iommud can adopt the domain with its pages
/// ([`open_file`]). The client of a page it must not write gets a
/// descriptor opened read-only, which no mapping can make writable, and
/// cannot reopen the root-only file otherwise. docs/ARCHITECTURE.md, "Stop,
/// crash and restart".
#[cfg(target_os = "linux")]
pub fn create_file(
    path: &std::path::Path,
    len: usize,
    client_writable: bool,
) -> Result<SharedMem, HwError> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|err| HwError::Os {
            what: "creating a shared page file",
            err,
        })?;
    if let Err(err) = f.set_len(len as u64) {
        let _ = std::fs::remove_file(path);
        return Err(HwError::Os {
            what: "sizing a shared page file",
            err,
        });
    }
    let r = share_file(path, OwnedFd::from(f), len, client_writable);
    if r.is_err() {
        let _ = std::fs::remove_file(path);
    }
    r
}

/// Maps a shared page file a previous iommud made (contents kept).
#[cfg(target_os = "linux")]
pub fn open_file(
    path: &std::path::Path,
    len: usize,
    client_writable: bool,
) -> Result<SharedMem, HwError> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|err| HwError::Os {
            what: "opening a shared page file",
            err,
        })?;
    let size = f.metadata().map(|m| m.len()).unwrap_or(0);
    if size != len as u64 {
        return Err(HwError::Hardware(format!(
            "{}: {size} bytes, expected {len}",
            path.display()
        )));
    }
    share_file(path, OwnedFd::from(f), len, client_writable)
}

#[cfg(target_os = "linux")]
fn share_file(
    path: &std::path::Path,
    fd: OwnedFd,
    len: usize,
    client_writable: bool,
) -> Result<SharedMem, HwError> {
    let map = iommu_abi::shm::Mapping::new(fd.as_fd(), 0, len).map_err(|err| HwError::Os {
        what: "mmap of a shared page file",
        err,
    })?;
    let client_fd = if client_writable {
        fd
    } else {
        OwnedFd::from(std::fs::File::open(path).map_err(|err| HwError::Os {
            what: "reopening a shared page file read-only",
            err,
        })?)
    };
    Ok(SharedMem {
        fd: Arc::new(client_fd),
        map,
    })
}

/// The file a shared page lives in (`None`: a memfd, gone with iommud).
#[cfg(target_os = "linux")]
pub fn file_name(m: &SharedMem) -> Option<String> {
    let p = std::fs::read_link(format!("/proc/self/fd/{}", m.fd.as_raw_fd())).ok()?;
    if p.to_string_lossy().starts_with("/memfd:") {
        return None;
    }
    Some(p.file_name()?.to_str()?.to_string())
}

/// A doorbell: a non-blocking eventfd (the client writes 8 bytes to ring
/// it; a service thread polls it while it sleeps).
#[cfg(target_os = "linux")]
pub fn eventfd() -> std::io::Result<OwnedFd> {
    // SAFETY: plain FFI call; the fd is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by eventfd and nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Rings are Linux-only for now (Redox would use its event scheme).
#[cfg(not(target_os = "linux"))]
pub fn eventfd() -> std::io::Result<std::os::fd::OwnedFd> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "rings need an eventfd (Linux)",
    ))
}

/// Redox shares memory through its own backend (the memory scheme), which
/// overrides [`crate::hw::PhysMem::alloc_shared`].
#[cfg(not(target_os = "linux"))]
pub fn create(_len: usize, _client_writable: bool) -> Result<SharedMem, HwError> {
    Err(HwError::Unsupported(
        "shared pages need the platform's own allocator here".into(),
    ))
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::io::Write;

    /// A sealed page: iommud's mapping writes, nobody else can get write access.
    #[test]
    fn a_read_only_page_cannot_be_written_through_any_descriptor() {
        let s = create(4096, false).unwrap();
        s.map.write_u64(0, 0x1122_3344).unwrap();
        let fd = s.fd.as_fd();
        assert!(
            iommu_abi::shm::Mapping::new(fd, 0, 4096).is_err(),
            "writable mapping"
        );
        let ro = iommu_abi::shm::Mapping::new_readonly(fd, 0, 4096).unwrap();
        assert_eq!(ro.read_u64(0), Some(0x1122_3344));
        // mprotect of the read-only mapping to writable is refused too.
        // SAFETY: asking the kernel to change protection of a mapping we own;
        // it refuses, so no memory is touched.
        let r =
            unsafe { libc::mprotect(ro.as_ptr().cast(), 4096, libc::PROT_READ | libc::PROT_WRITE) };
        assert_ne!(r, 0, "mprotect to writable succeeded");
        // A descriptor reopened through /proc with write access cannot write.
        let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
        let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        assert!(
            f.write_all(&[0xff; 8]).is_err(),
            "write() through a reopened fd"
        );
        assert!(iommu_abi::shm::Mapping::new(f.as_fd(), 0, 4096).is_err());
        // Nor can seals be removed or the file shrunk.
        // SAFETY: plain FFI calls on fds we own; they fail.
        unsafe {
            assert_ne!(libc::ftruncate(f.as_raw_fd(), 0), 0);
            assert_ne!(
                libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_WRITE),
                0
            );
        }
        assert_eq!(ro.read_u64(0), Some(0x1122_3344));
    }

    #[test]
    fn a_client_page_is_writable_by_the_client() {
        let s = create(8192, true).unwrap();
        let c = iommu_abi::shm::Mapping::new(s.fd.as_fd(), 0, 8192).unwrap();
        c.write_u64(4096, 7).unwrap();
        assert_eq!(s.map.read_u64(4096), Some(7));
    }
}
