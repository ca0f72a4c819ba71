//! igbd on Redox, started by pcid-spawner (see `recipes/igbd`).
//!
//! Type-checked for x86_64-unknown-redox by `cargo xtask redox-check`; never run. The same steps as e1000d's Redox entry:
//! the function from `fpath` on the pcid channel, its configuration header from the pci
//! scheme, BAR 0 through `/scheme/memory/physical@uc`, the iommud domain through the
//! `iommu` scheme, then the same bring-up as on Linux ([`Igb::with_bar`]). Serves no
//! network scheme yet: it holds the NIC and idles.

use std::sync::Arc;
use std::time::Duration;

use e1000d::pcid;
use igbd::{Igb, DEVICE, VENDOR};
use nicdesc::LibdmaMapper;

/// Bytes of the 82576's register BAR (128 KiB).
const BAR0_LEN: usize = 0x2_0000;
/// Queue pairs brought up on Redox.
const QUEUES: u16 = 2;

/// Brings the function pcid-spawner gave us up under its iommud domain.
pub fn run() -> Result<(), String> {
    let pcid::Function {
        sid,
        bdf,
        regs,
        domain,
    } = pcid::open_function(
        |c| pcid::expect_ids(c, (VENDOR, DEVICE), "an 82576"),
        BAR0_LEN,
    )?;
    let nic = Igb::with_bar(
        bdf.clone(),
        sid,
        regs,
        Arc::new(LibdmaMapper::from_domain(domain)),
        QUEUES,
    )
    .map_err(|e| format!("{bdf}: {e}"))?;
    println!(
        "igbd: {bdf} up under iommud, {QUEUES} queue pairs, source id {:#x}",
        nic.source_id()
    );
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
