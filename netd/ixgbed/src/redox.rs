//! ixgbed on Redox, started by pcid-spawner (see `recipes/ixgbed`).
//!
//! Never compiled (no Redox toolchain here). The same steps as e1000d's Redox entry:
//! the function from `fpath` on the pcid channel, its configuration header from the pci
//! scheme, BAR 0 through `/scheme/memory/physical@uc`, the iommud domain through the
//! `iommu` scheme, then the same bring-up as on Linux ([`Ixgbe::with_bar`]). Serves no
//! network scheme yet: it holds the NIC and idles.

use std::sync::Arc;
use std::time::Duration;

use e1000d::pcid::{self, PCID_CHANNEL_ENV};
use ixgbed::{Ixgbe, DEVICE, VENDOR};
use libdma::{DmaDomain, FlushPolicy, Strategy};
use linuxhw::mmio::MmioRegion;
use nicdesc::LibdmaMapper;

/// Bytes of the 82599's register BAR (128 KiB of CSR space).
const BAR0_LEN: usize = 0x2_0000;
/// Queue pairs brought up on Redox.
const QUEUES: u16 = 2;

/// Brings the function pcid-spawner gave us up under its iommud domain.
pub fn run() -> Result<(), String> {
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
        other => return Err(format!("{bdf}: not an 82599 ({other:x?})")),
    }
    let bar = pcid::bar0(&config).ok_or(format!("{bdf}: BAR 0 is not memory"))?;
    let regs = MmioRegion::map_phys_via(pcid::PHYS_UNCACHED, bar, BAR0_LEN)
        .map_err(|e| format!("{bdf}: BAR 0 at {bar:#x}: {e}"))?;
    let domain = DmaDomain::open(sid, Strategy::Magazine, FlushPolicy::PerCore)
        .map_err(|e| format!("{bdf}: iommu scheme: {e}"))?;
    let nic = Ixgbe::with_bar(
        bdf.clone(),
        sid,
        regs,
        Arc::new(LibdmaMapper::from_domain(domain)),
        QUEUES,
    )
    .map_err(|e| format!("{bdf}: {e}"))?;
    println!(
        "ixgbed: {bdf} up under iommud, {QUEUES} queue pairs, source id {:#x}",
        nic.source_id()
    );
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
