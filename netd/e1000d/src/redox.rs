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

use e1000d::pcid;
use e1000d::{DmaMapper, LibdmaMapper, DEVICE, E1000, VENDOR};

/// Bytes of BAR 0 on the 82540EM (128 KiB of registers).
const BAR0_LEN: usize = 0x2_0000;

/// Brings the function pcid-spawner gave us up under its iommud domain.
pub fn run() -> Result<bool, String> {
    let pcid::Function {
        sid,
        bdf,
        regs,
        domain,
    } = pcid::open_function(
        |c| pcid::expect_ids(c, (VENDOR, DEVICE), "an 82540EM"),
        BAR0_LEN,
    )?;
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
