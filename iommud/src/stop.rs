//! The orderly stop (`iommuctl stop`, SIGTERM, SIGINT): every device is
//! blocked before any memory goes, then the unit is parked on an empty root
//! table. See docs/ARCHITECTURE.md, "Stop, crash and restart".

use crate::session::State;
use crate::unit::log;
use iommu_abi::Bdf;

impl State {
    /// Blocks every device (context entry cleared and invalidated), only
    /// then tears the domains down (tables, arenas, pools freed), and parks
    /// the unit: translation stays on, over a root table with no entry.
    /// A device whose block fails keeps its memory (teardown leaks it rather
    /// than free what the device may reach).
    pub fn stop_orderly(&self) {
        let unit = self.unit.clone();
        let domains = self.all_domains();
        if unit.translating() {
            for d in &domains {
                if let Err(e) = unit.clear_context(d.sid, d.did) {
                    log::warn(&format!("stop: blocking {} failed: {e}", Bdf(d.sid)));
                }
            }
        }
        let n = domains.len();
        drop(domains);
        self.detach_all();
        match unit.park() {
            Ok(()) => log::info(&format!(
                "stop: {n} device(s) blocked before their memory was freed; the unit stays {} \
                 with an empty root table at {:#x}",
                if unit.translating() {
                    "translating"
                } else {
                    "untranslated"
                },
                unit.root()
            )),
            Err(e) => log::warn(&format!("stop: parking the unit failed: {e}")),
        }
    }
}
