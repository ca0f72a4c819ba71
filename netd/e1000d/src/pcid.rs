//! What a driver started by Redox's pcid-spawner learns about its PCI function,
//! as platform-free functions tested on the host (the Redox entry in `main.rs`
//! makes the system calls).
//!
//! pcid-spawner starts the driver with the fd of the function's pcid channel in
//! [`PCID_CHANNEL_ENV`]; `fpath` on that fd names the function
//! (`/scheme/pci/0000--00--03.0/channel`). Redox's own drivers speak pcid's
//! protocol on the channel through `pcid_interface`, which is not published as a
//! crate; this driver instead reads the function's configuration space through
//! the pci scheme ([`config_path`]) and maps BAR 0 itself. Both conventions are
//! taken from Redox's public sources and are unverified here.

/// Environment variable through which pcid-spawner hands a driver its channel fd.
pub const PCID_CHANNEL_ENV: &str = "PCID_CLIENT_CHANNEL";

/// Physical memory, uncached: offset = physical address (for BARs).
pub const PHYS_UNCACHED: &str = "/scheme/memory/physical@uc";

/// Parses the channel fd from the value of [`PCID_CHANNEL_ENV`].
pub fn pcid_channel(value: Option<&str>) -> Result<usize, String> {
    let v =
        value.ok_or_else(|| format!("{PCID_CHANNEL_ENV} not set: start me from pcid-spawner"))?;
    v.trim()
        .parse()
        .map_err(|_| format!("{PCID_CHANNEL_ENV}={v:?} is not an fd number"))
}

/// The PCI source id (bus << 8 | dev << 3 | fn) of a pci scheme path such as
/// `/scheme/pci/0000--00--03.0/channel`; also accepts `0000:00:03.0` and
/// `00:03.0` address forms.
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

/// The function's configuration-space file next to its channel
/// (`.../0000--00--03.0/channel` → `.../0000--00--03.0/config`).
pub fn config_path(channel_path: &str) -> Option<String> {
    let dir = channel_path
        .trim_end_matches('/')
        .strip_suffix("/channel")?;
    Some(format!("{dir}/config"))
}

fn dword(config: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        config.get(off..off + 4)?.try_into().ok()?,
    ))
}

/// (vendor id, device id) from a configuration header.
pub fn ids(config: &[u8]) -> Option<(u16, u16)> {
    let d = dword(config, 0)?;
    Some((d as u16, (d >> 16) as u16))
}

/// BAR0's physical address from a configuration header (at least 0x18 bytes);
/// `None` for an I/O BAR. A 64-bit BAR takes BAR1 as its high half.
pub fn bar0(config: &[u8]) -> Option<u64> {
    // PCI Local Bus 3.0 §6.2.5.1: bit 0 = I/O space, bits 2:1 = type (2 = 64-bit).
    let lo = dword(config, 0x10)?;
    if lo & 1 != 0 {
        return None;
    }
    let base = u64::from(lo & !0xf);
    if (lo >> 1) & 3 == 2 {
        Some(base | u64::from(dword(config, 0x14)?) << 32)
    } else {
        Some(base)
    }
}

/// What pcid-spawner handed this driver, brought up to where a driver's own
/// code starts: the function, its BAR 0 mapped uncached, its iommud domain.
#[cfg(target_os = "redox")]
pub struct Function {
    /// Source id (bus << 8 | devfn).
    pub sid: u16,
    /// `bb:dd.f`.
    pub bdf: String,
    /// BAR 0, mapped through the physical-memory scheme.
    pub regs: linuxhw::mmio::MmioRegion,
    /// The function's domain on the `iommu` scheme (magazine, percore).
    pub domain: libdma::DmaDomain,
}

/// The one bring-up every Redox driver entry shares: the function from
/// `fpath` on the pcid channel, its configuration header from the pci scheme
/// (which `check` must accept: the driver's ids or class), `bar0_len` bytes of
/// BAR 0 through `/scheme/memory/physical@uc`, the domain through the
/// `iommu` scheme.
#[cfg(target_os = "redox")]
pub fn open_function(
    check: impl Fn(&[u8]) -> Result<(), String>,
    bar0_len: usize,
) -> Result<Function, String> {
    let env = std::env::var(PCID_CHANNEL_ENV).ok();
    let fd = pcid_channel(env.as_deref())?;
    let mut buf = [0u8; 256];
    let n = libredox::call::fpath(fd, &mut buf)
        .map_err(|e| format!("fpath of the pcid channel: {e}"))?;
    let path = String::from_utf8_lossy(&buf[..n]).into_owned();
    let sid = bdf_of_pci_path(&path).ok_or(format!("no PCI address in {path:?}"))?;
    let bdf = libdma::Bdf(sid).to_string();
    let cfg_path = config_path(&path).ok_or(format!("{path:?} is not a channel"))?;
    let config = std::fs::read(&cfg_path).map_err(|e| format!("{cfg_path}: {e}"))?;
    check(&config).map_err(|e| format!("{bdf}: {e}"))?;
    let bar = bar0(&config).ok_or(format!("{bdf}: BAR 0 is not memory"))?;
    let regs = linuxhw::mmio::MmioRegion::map_phys_via(PHYS_UNCACHED, bar, bar0_len)
        .map_err(|e| format!("{bdf}: BAR 0 at {bar:#x}: {e}"))?;
    let domain = libdma::DmaDomain::open(
        sid,
        libdma::Strategy::Magazine,
        libdma::FlushPolicy::PerCore,
    )
    .map_err(|e| format!("{bdf}: iommu scheme: {e}"))?;
    Ok(Function {
        sid,
        bdf,
        regs,
        domain,
    })
}

/// A `check` for [`open_function`]: the header's vendor:device is `want`.
pub fn expect_ids(config: &[u8], want: (u16, u16), what: &str) -> Result<(), String> {
    match ids(config) {
        Some(got) if got == want => Ok(()),
        other => Err(format!("not {what} ({other:x?})")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn config_sits_next_to_the_channel() {
        assert_eq!(
            config_path("/scheme/pci/0000--00--03.0/channel").as_deref(),
            Some("/scheme/pci/0000--00--03.0/config")
        );
        assert_eq!(config_path("/scheme/pci/0000--00--03.0"), None);
    }

    #[test]
    fn ids_and_bar0_decode_a_header() {
        let mut cfg = [0u8; 0x40];
        // QEMU e1000: 8086:100e, BAR0 = 0xfebc0000, 32-bit memory.
        cfg[0..4].copy_from_slice(&0x100e_8086u32.to_le_bytes());
        cfg[0x10..0x14].copy_from_slice(&0xfebc_0000u32.to_le_bytes());
        assert_eq!(ids(&cfg), Some((0x8086, 0x100e)));
        assert!(expect_ids(&cfg, (0x8086, 0x100e), "an 82540EM").is_ok());
        let e = expect_ids(&cfg, (0x8086, 0x10c9), "an 82576").unwrap_err();
        assert!(e.contains("not an 82576"), "{e}");
        assert_eq!(bar0(&cfg), Some(0xfebc_0000));
        // 64-bit memory BAR (type 2 = bits 2:1 = 0b10 → low nibble 0x4).
        cfg[0x10..0x14].copy_from_slice(&0xc000_0004u32.to_le_bytes());
        cfg[0x14..0x18].copy_from_slice(&0x0000_0001u32.to_le_bytes());
        assert_eq!(bar0(&cfg), Some(0x1_c000_0000));
        // I/O BAR.
        cfg[0x10..0x14].copy_from_slice(&0xc001u32.to_le_bytes());
        assert_eq!(bar0(&cfg), None);
        assert_eq!(bar0(&cfg[..0x10]), None);
        assert_eq!(ids(&cfg[..2]), None);
    }
}
