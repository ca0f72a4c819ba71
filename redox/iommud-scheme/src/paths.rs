//! The Redox paths and conventions iommud relies on, as platform-free
//! functions (the system calls that use them are in `redox` and
//! `hw_redox::kernel`). The pcid conventions a driver needs live in
//! `netd/e1000d/src/pcid.rs`.

/// The scheme iommud registers.
pub const SCHEME: &str = "iommu";

/// Directory of the ACPI tables served by Redox's ACPI daemon.
pub const ACPI_TABLES: &str = "/scheme/acpi/tables";

/// Physical memory, uncached: mmap at offset = physical address (VT-d registers, BARs).
pub const PHYS_UNCACHED: &str = "/scheme/memory/physical@uc";

/// Zeroed, physically contiguous memory for tables and DMA pools.
pub const DMA_ZEROED: &str = "/scheme/memory/zeroed?phys_contiguous";

/// Virtual → physical address translation of the caller's own pages: `call`
/// with a native-endian address in the buffer gives the physical address back.
pub const TRANSLATION: &str = "/scheme/memory/translation";

/// Picks the DMAR table among the names listed in [`ACPI_TABLES`]
/// (named `DMAR` plus the OEM id and revision); the first in sorted order if
/// several, so the choice is stable.
pub fn dmar_table<I: IntoIterator<Item = String>>(names: I) -> Option<String> {
    let mut v: Vec<String> = names
        .into_iter()
        .map(|n| n.trim().to_string())
        .filter(|n| n == "DMAR" || n.starts_with("DMAR-") || n.starts_with("DMAR_"))
        .collect();
    v.sort();
    v.into_iter().next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dmar_is_found_among_acpi_table_names() {
        let names = ["APIC-BOCHS-BXPC", "DMAR-BOCHS-BXPC", "FACP-BOCHS-BXPC"];
        let got = dmar_table(names.iter().map(|s| s.to_string()));
        assert_eq!(got.as_deref(), Some("DMAR-BOCHS-BXPC"));
        assert_eq!(dmar_table(["APIC".to_string()]), None);
        assert_eq!(dmar_table(["DMARX".to_string()]), None);
    }
}
