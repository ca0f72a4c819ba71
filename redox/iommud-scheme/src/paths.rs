//! The Redox paths and conventions iommud and the netd drivers rely on, as
//! platform-free functions (the system calls that use them are in `redox`).

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

/// Environment variable through which pcid-spawner hands a driver its PCI channel fd.
pub const PCID_CHANNEL_ENV: &str = "PCID_CLIENT_CHANNEL";

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

/// Parses the pcid channel fd from the value of [`PCID_CHANNEL_ENV`].
pub fn pcid_channel(value: Option<&str>) -> Result<usize, String> {
    let v =
        value.ok_or_else(|| format!("{PCID_CHANNEL_ENV} not set: start me from pcid-spawner"))?;
    v.trim()
        .parse()
        .map_err(|_| format!("{PCID_CHANNEL_ENV}={v:?} is not an fd number"))
}

/// The PCI source id (bus << 8 | dev << 3 | fn) of a pci scheme path such as
/// `/scheme/pci/0000--00--03.0/channel` (what `fpath` on the pcid channel gives);
/// also accepts `0000:00:03.0` and `00:03.0` address forms.
pub fn bdf_of_pci_path(path: &str) -> Option<u16> {
    let addr = path
        .split('/')
        .find(|seg| seg.contains('.') && (seg.contains("--") || seg.contains(':')))?;
    let addr = addr.replace("--", ":");
    let (rest, func) = addr.rsplit_once('.')?;
    let parts: Vec<&str> = rest.split(':').collect();
    let (bus, dev) = match parts.as_slice() {
        [_, bus, dev] | [bus, dev] => (*bus, *dev),
        _ => return None,
    };
    let bus = u16::from_str_radix(bus, 16).ok().filter(|b| *b < 256)?;
    let dev = u16::from_str_radix(dev, 16).ok().filter(|d| *d < 32)?;
    let func = u16::from_str_radix(func, 16).ok().filter(|f| *f < 8)?;
    Some(bus << 8 | dev << 3 | func)
}

/// BAR0's physical address from a PCI configuration header (at least 0x18
/// bytes); `None` for an I/O BAR. A 64-bit BAR takes BAR1 as its high half.
pub fn bar0(config: &[u8]) -> Option<u64> {
    let dword = |off: usize| -> Option<u32> {
        Some(u32::from_le_bytes(
            config.get(off..off + 4)?.try_into().ok()?,
        ))
    };
    // PCI Local Bus 3.0 §6.2.5.1: bit 0 = I/O space, bits 2:1 = type (2 = 64-bit).
    let lo = dword(0x10)?;
    if lo & 1 != 0 {
        return None;
    }
    let base = u64::from(lo & !0xf);
    if (lo >> 1) & 3 == 2 {
        Some(base | u64::from(dword(0x14)?) << 32)
    } else {
        Some(base)
    }
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

    #[test]
    fn pcid_channel_is_parsed_or_explained() {
        assert_eq!(pcid_channel(Some("7")), Ok(7));
        assert!(pcid_channel(None).unwrap_err().contains("pcid-spawner"));
        assert!(pcid_channel(Some("x")).is_err());
    }

    #[test]
    fn bdf_comes_from_any_pci_address_form() {
        assert_eq!(
            bdf_of_pci_path("/scheme/pci/0000--00--03.0/channel"),
            Some(0x18)
        );
        assert_eq!(
            bdf_of_pci_path("/scheme/pci/0000:00:02.0/channel"),
            Some(0x10)
        );
        assert_eq!(bdf_of_pci_path("pci:00:01.0"), Some(0x08));
        assert_eq!(bdf_of_pci_path("/scheme/pci/0000--00--20.0"), None); // dev 0x20 > 31
        assert_eq!(bdf_of_pci_path("/scheme/pci/channel"), None);
    }

    #[test]
    fn bar0_decodes_32_and_64_bit_memory_bars() {
        let mut cfg = [0u8; 0x40];
        // QEMU e1000: BAR0 = 0xfebc0000, 32-bit memory.
        cfg[0x10..0x14].copy_from_slice(&0xfebc_0000u32.to_le_bytes());
        assert_eq!(bar0(&cfg), Some(0xfebc_0000));
        // 64-bit memory BAR (type 2 = bits 2:1 = 0b10 → low nibble 0x4).
        cfg[0x10..0x14].copy_from_slice(&0xc000_0004u32.to_le_bytes());
        cfg[0x14..0x18].copy_from_slice(&0x0000_0001u32.to_le_bytes());
        assert_eq!(bar0(&cfg), Some(0x1_c000_0000));
        // I/O BAR.
        cfg[0x10..0x14].copy_from_slice(&0xc001u32.to_le_bytes());
        assert_eq!(bar0(&cfg), None);
        assert_eq!(bar0(&cfg[..0x10]), None);
    }
}
