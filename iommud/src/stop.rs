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

#[cfg(test)]
mod tests {
    use crate::domain::Domain;
    use crate::hw::{HwError, PhysMem, Region};
    use crate::platform::sim::{SimMmio, SimPlatform};
    use crate::policy::Trust;
    use crate::session::State;
    use crate::unit::{Iommu, UnitConfig};
    use iommu_abi::proto::{Dir, FlushPolicy, Strategy};
    use std::sync::{Arc, Mutex};
    use vtd::regs::{self, Gsts};
    use vtd::sim::{SimConfig, SimMachine};

    const SIDS: [u16; 2] = [0x08, 0x10];

    /// The sim's memory, checking at every free that no watched device can
    /// still reach memory through the unit.
    struct Watching {
        inner: Arc<SimPlatform>,
        machine: Arc<SimMachine>,
        watch: Mutex<Vec<(u16, u64)>>,
        violations: Mutex<Vec<String>>,
        frees: Mutex<u64>,
    }

    impl Watching {
        fn check(&self, what: &str) {
            *self.frees.lock().unwrap() += 1;
            for &(sid, iova) in self.watch.lock().unwrap().iter() {
                if self.machine.translate_uncached(sid, iova).is_ok() {
                    self.violations
                        .lock()
                        .unwrap()
                        .push(format!("{what} while sid {sid:#x} still reaches {iova:#x}"));
                }
            }
        }
    }

    impl PhysMem for Watching {
        fn alloc_frame(&self) -> Result<u64, HwError> {
            self.inner.alloc_frame()
        }
        fn free_frame(&self, phys: u64) {
            self.check("a frame freed");
            self.inner.free_frame(phys)
        }
        fn alloc_region(&self, len: u64, align: u64) -> Result<Region, HwError> {
            self.inner.alloc_region(len, align)
        }
        fn free_region(&self, region: &Region) {
            self.check("a region freed");
            self.inner.free_region(region)
        }
        fn read_u64(&self, phys: u64) -> Result<u64, HwError> {
            self.inner.read_u64(phys)
        }
        fn write_u64(&self, phys: u64, v: u64) -> Result<(), HwError> {
            self.inner.write_u64(phys, v)
        }
        fn read_u32(&self, phys: u64) -> Result<u32, HwError> {
            self.inner.read_u32(phys)
        }
        fn flush(&self, phys: u64, len: u64) {
            self.inner.flush(phys, len)
        }
    }

    #[test]
    fn every_device_is_blocked_before_any_memory_goes_and_the_unit_stays_on() {
        let p = Arc::new(
            SimPlatform::new(SimConfig {
                mem_bytes: 16 << 20,
                ..Default::default()
            })
            .unwrap(),
        );
        let m = p.machine().clone();
        let w = Arc::new(Watching {
            inner: p,
            machine: m.clone(),
            watch: Mutex::new(Vec::new()),
            violations: Mutex::new(Vec::new()),
            frees: Mutex::new(0),
        });
        let mem: Arc<dyn PhysMem> = w.clone();
        let unit = Arc::new(
            Iommu::init(Box::new(SimMmio(m.clone())), mem, &UnitConfig::default()).unwrap(),
        );
        let state = State::new(unit.clone(), "sim", true);
        let account = crate::quota::Accounts::default().of(0);
        for sid in SIDS {
            let d = Domain::new(
                unit.clone(),
                sid,
                Strategy::Global,
                FlushPolicy::Strict,
                Trust::Validated,
                true,
                account.clone(),
            )
            .unwrap();
            let pool = d.alloc_pool(4096).unwrap().0;
            let iova = d.map(pool.phys, 4096, Dir::Bidirectional, 0).unwrap();
            m.dma_write(sid, iova, b"live")
                .expect("DMA before the stop");
            w.watch.lock().unwrap().push((sid, iova));
            state.domains.lock().unwrap().insert(sid, d);
        }
        state.stop_orderly();
        let v = w.violations.lock().unwrap().clone();
        assert!(
            v.is_empty(),
            "memory freed before every device was blocked: {v:?}"
        );
        assert!(
            *w.frees.lock().unwrap() > 2,
            "the stop freed the domains' memory"
        );
        assert!(state.domains.lock().unwrap().is_empty());
        // Parked: still translating, over a root with no entry.
        assert!(Gsts::from_bits_retain(m.read32(regs::GSTS)).contains(Gsts::TES));
        let root = m.read64(regs::RTADDR);
        for bus in 0..256u64 {
            assert_eq!(m.read_u64(root + bus * 16), Ok(0), "root entry {bus}");
        }
        for &(sid, iova) in w.watch.lock().unwrap().iter() {
            assert!(
                m.dma_write(sid, iova, b"gone").is_err(),
                "sid {sid:#x} after stop"
            );
        }
    }
}
