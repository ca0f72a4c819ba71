//! Linux userspace hardware access for the `linux` platform of the IOMMU server.
//!
//! - [`mmio`]: physical MMIO ranges mapped through `/dev/mem` or a sysfs `resource<N>` file,
//!   accessed with bounds-checked volatile reads and writes.
//! - [`hugemem`]: locked DMA memory (2 MiB hugepages or 4 KiB pages) with the physical address
//!   of every page, read from `/proc/self/pagemap`.
//! - [`pci`]: PCI functions through `/sys/bus/pci/devices/<bdf>/` (config space, BARs).
//! - [`dmar`]: reads the ACPI DMAR table from sysfs (parsed by the platform-free `vtd::dmar`).
//!
//! Every fallible call returns [`Error`], which names the path or address involved.
#![deny(missing_docs)]

pub mod dmar;
mod error;
#[cfg(target_os = "linux")]
pub mod hugemem;
pub mod mmio;
pub mod pci;

pub use error::{Error, Result};

/// Size of a base page on x86-64.
pub const PAGE_SIZE: usize = 4096;

#[cfg(test)]
pub(crate) mod testutil {
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A fresh, empty directory under the system temp dir (removed on drop).
    pub struct TempDir(pub PathBuf);

    impl TempDir {
        pub fn new(tag: &str) -> Self {
            static N: AtomicUsize = AtomicUsize::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            let p =
                std::env::temp_dir().join(format!("linuxhw-test-{tag}-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).expect("create temp dir");
            TempDir(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
