//! Reading the firmware's ACPI DMAR table on Linux.
//!
//! The table is parsed by the platform-free [`vtd::dmar`] (re-exported here); this module
//! only knows where Linux exposes it.

use std::path::Path;

pub use vtd::dmar::*;

use crate::{Error, Result};

/// Where Linux exposes the firmware's DMAR table.
pub const DMAR_SYSFS_PATH: &str = "/sys/firmware/acpi/tables/DMAR";

/// Reads and parses the firmware's table from [`DMAR_SYSFS_PATH`] (needs root).
pub fn read() -> Result<Dmar> {
    read_from(DMAR_SYSFS_PATH)
}

/// Reads and parses a DMAR table from a file (e.g. a saved copy).
pub fn read_from(path: impl AsRef<Path>) -> Result<Dmar> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| Error::io("read", path, e))?;
    parse(&bytes).map_err(|source| Error::Dmar {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal valid table by hand: the 48-byte fixed part (VT-d spec §8.1) with HAW
    /// field 38 and one DRHD (§8.3) with INCLUDE_PCI_ALL at 0xfed9_0000, checksum fixed.
    fn one_drhd_table() -> Vec<u8> {
        let mut t = Vec::new();
        t.extend_from_slice(b"DMAR");
        t.extend_from_slice(&64u32.to_le_bytes()); // length: 48 + one 16-byte DRHD
        t.push(1); // revision
        t.push(0); // checksum, patched below
        t.extend_from_slice(&[0; 26]); // OEM ids, revisions, creator
        t.push(38); // host address width - 1
        t.push(0); // flags
        t.extend_from_slice(&[0; 10]);
        t.extend_from_slice(&0u16.to_le_bytes()); // type 0: DRHD
        t.extend_from_slice(&16u16.to_le_bytes()); // length
        t.push(DRHD_INCLUDE_PCI_ALL);
        t.push(0); // size
        t.extend_from_slice(&0u16.to_le_bytes()); // segment
        t.extend_from_slice(&0xfed9_0000u64.to_le_bytes());
        let sum = t.iter().fold(0u8, |a, b| a.wrapping_add(*b));
        t[9] = 0u8.wrapping_sub(sum);
        t
    }

    #[test]
    fn read_from_names_the_path() {
        let dir = crate::testutil::TempDir::new("dmar");
        let p = dir.0.join("DMAR");
        std::fs::write(&p, one_drhd_table()).expect("write");
        let d = read_from(&p).expect("parse");
        assert_eq!(d.host_address_width, 39);
        assert_eq!(d.drhds.len(), 1);
        assert_eq!(d.drhds[0].register_base, 0xfed9_0000);
        assert!(d.drhds[0].include_pci_all());
        std::fs::write(&p, b"DMARxx").expect("write");
        let e = read_from(&p).expect_err("too short");
        assert!(e.to_string().contains("DMAR"), "{e}");
        assert!(matches!(
            e,
            Error::Dmar {
                source: DmarError::TooShort { len: 6 },
                ..
            }
        ));
    }
}
