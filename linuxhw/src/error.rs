//! The crate's error type.

use std::io;
use std::path::PathBuf;

use vtd::dmar::DmarError;

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong talking to Linux about hardware.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was attempted (`open`, `read`, `mmap`, ...).
        op: &'static str,
        /// The file involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A system call not tied to a path failed.
    #[error("{op}: {source}")]
    Sys {
        /// The call and its arguments, briefly.
        op: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A volatile access fell outside its region or was not naturally aligned.
    #[error("{origin}: {width}-byte access at offset {offset:#x} is outside the {len:#x}-byte region or misaligned")]
    OutOfBounds {
        /// The region (`/dev/mem@0x...` or a file path).
        origin: String,
        /// Offset of the access within the region.
        offset: usize,
        /// Access width in bytes.
        width: usize,
        /// Region length in bytes.
        len: usize,
    },
    /// A requested length was zero, too large or otherwise unusable.
    #[error("{what}: bad length {len:#x}")]
    BadLength {
        /// What the length was for.
        what: &'static str,
        /// The length given.
        len: usize,
    },
    /// `/proc/self/pagemap` says a page is not present (or gives a PFN beyond 52 bits).
    #[error("pagemap: virtual address {virt:#x} is not present or has an impossible PFN (entry {entry:#018x})")]
    NotPresent {
        /// The virtual address looked up.
        virt: usize,
        /// The raw 64-bit pagemap entry.
        entry: u64,
    },
    /// `/proc/self/pagemap` hides PFNs (reads as 0) from callers without CAP_SYS_ADMIN.
    #[error("pagemap: PFN of virtual address {virt:#x} reads as 0; physical addresses need CAP_SYS_ADMIN (run as root)")]
    PfnHidden {
        /// The virtual address looked up.
        virt: usize,
    },
    /// A hugepage's 4 KiB frames were not physically contiguous.
    #[error(
        "hugepage at offset {offset:#x}: frame at {virt:#x} is at {got:#x}, expected {expected:#x}"
    )]
    NotContiguous {
        /// Offset of the hugepage in its region.
        offset: usize,
        /// The virtual address whose frame was out of place.
        virt: usize,
        /// The physical address pagemap gave.
        got: u64,
        /// The physical address contiguity implies.
        expected: u64,
    },
    /// A PCI address string could not be parsed.
    #[error("bad PCI address {0:?} (expected segment:bus:device.function, e.g. 0000:00:01.0)")]
    BadBdf(String),
    /// A sysfs text file did not hold what it should.
    #[error("{}: cannot parse {text:?}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The offending text.
        text: String,
    },
    /// A PCI BAR is not implemented or not assigned an address.
    #[error("{}: BAR {index} is unassigned or absent", path.display())]
    NoBar {
        /// The device's sysfs directory.
        path: PathBuf,
        /// The BAR index.
        index: usize,
    },
    /// The DMAR table was malformed.
    #[error("{}: {source}", path.display())]
    Dmar {
        /// Where the table was read from.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: DmarError,
    },
}

impl Error {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }

    #[cfg(target_os = "linux")]
    pub(crate) fn last_os(op: impl Into<String>) -> Self {
        Error::Sys {
            op: op.into(),
            source: io::Error::last_os_error(),
        }
    }
}
