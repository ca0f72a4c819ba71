//! e1000d on Redox, started by pcid-spawner (see `recipes/e1000d`).
//!
//! Type-checked for `x86_64-unknown-redox` by `cargo xtask redox-check`, never run
//! (docs/ARCHITECTURE.md, "Building for Redox"). From the pcid channel in
//! `PCID_CLIENT_CHANNEL` it learns its function (`fpath` on the channel), reads
//! the configuration header next to it in the pci scheme, maps BAR 0 through
//! `/scheme/memory/physical@uc`, attaches to its iommud domain through the
//! `iommu` scheme (libdma's Redox carrier) and brings the NIC up with the same
//! core as on Linux ([`E1000::with_bar`]). It assumes pcid-spawner has enabled
//! memory space and bus mastering, as Redox's pcid does for the drivers it
//! spawns; that, the `config` file and the `fpath` form are unverified.
//! No network scheme is served yet: the driver holds the NIC and idles.

use std::time::Duration;

use e1000d::pcid::{self, PCID_CHANNEL_ENV};
use e1000d::{DmaMapper, LibdmaMapper, DEVICE, E1000, VENDOR};
use libdma::{DmaDomain, FlushPolicy, Strategy};
use linuxhw::mmio::MmioRegion;

/// Bytes of BAR 0 on the 82540EM (128 KiB of registers).
const BAR0_LEN: usize = 0x2_0000;

/// Brings the function pcid-spawner gave us up under its iommud domain.
pub fn run() -> Result<bool, String> {
    let env = std::env::var(PCID_CHANNEL_ENV).ok();
    let fd = pcid::pcid_channel(env.as_deref())?;
    let mut buf = [0u8; 256];
    let n = libredox::call::fpath(fd, &mut buf)
        .map_err(|e| format!("fpath of the pcid channel: {e}"))?;
    let path = String::from_utf8_lossy(&buf[..n]).into_owned();
    let sid = pcid::bdf_of_pci_path(&path).ok_or(format!("no PCI address in {path:?}"))?;
    let bdf = libdma::Bdf(sid).to_string();
    let cfg_path = pcid::config_path(&path).ok_or(format!("{path:?} is not a channel"))?;
    let config = std::fs::read(&cfg_path).map_err(|e| format!("{cfg_path}: {e}"))?;
    match pcid::ids(&config) {
        Some((VENDOR, DEVICE)) => {}
        other => return Err(format!("{bdf}: not an 82540EM ({other:x?})")),
    }
    let bar = pcid::bar0(&config).ok_or(format!("{bdf}: BAR 0 is not memory"))?;
    let regs = MmioRegion::map_phys_via(pcid::PHYS_UNCACHED, bar, BAR0_LEN)
        .map_err(|e| format!("{bdf}: BAR 0 at {bar:#x}: {e}"))?;
    let domain = DmaDomain::open(sid, Strategy::Magazine, FlushPolicy::PerCore)
        .map_err(|e| format!("{bdf}: iommu scheme: {e}"))?;
    let mapper: Box<dyn DmaMapper> = Box::new(LibdmaMapper::from_domain(domain));
    let nic = E1000::with_bar(bdf.clone(), sid, regs, mapper).map_err(|e| format!("{bdf}: {e}"))?;
    let m = nic.mac();
    println!(
        "e1000d: {bdf} up under iommud, mac {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    );
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
