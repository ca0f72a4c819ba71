//! Taking a VT-d unit over from a previous iommud that stopped or died.
//!
//! A unit a previous owner left on has translation (GSTS.TES) and queued
//! invalidation (GSTS.QIES) enabled, with RTADDR and IQA naming memory of the
//! previous process. iommud never turns translation off to take it over (that
//! would let every device DMA anywhere until the new tables are in place);
//! it only releases the queue, so that it can point the unit at its own root
//! table and queue (`Iommu::init` then replaces the root with SRTP while
//! translation stays on, and invalidates globally). See docs/ARCHITECTURE.md,
//! "Stop, crash and restart".
//!
//! QI can only be turned off while the queue is idle: QEMU's model clears
//! QIES only when IQH = IQT *and* the last descriptor it executed was an
//! invalidation wait (docs/ARCHITECTURE.md, "QEMU's VT-d unit"). Every iommud
//! therefore runs a wait as soon as its queue is on, so a unit it leaves
//! behind can always be released.

use crate::hw::{HwError, Mmio};
use crate::invq::set_gcmd;
use std::time::Duration;
use vtd::regs::{self, Fsts, Gcmd, Gsts};

/// Turns queued invalidation off if a previous owner left it on, and
/// returns GSTS as found (so the caller knows whether translation was on).
/// Translation is left as it is.
pub fn release_queue(mmio: &dyn Mmio, timeout: Duration) -> Result<Gsts, HwError> {
    let gsts = Gsts::from_bits_retain(mmio.read32(regs::GSTS));
    if !gsts.contains(Gsts::QIES) {
        return Ok(gsts);
    }
    // A queue error the previous owner never cleared would keep the queue
    // stopped with IQH short of IQT (§6.5.2.10: IQE is RW1C).
    let fsts = Fsts::from_bits_retain(mmio.read32(regs::FSTS));
    let errs = fsts & (Fsts::IQE | Fsts::ICE | Fsts::ITE);
    if !errs.is_empty() {
        mmio.write32(regs::FSTS, errs.bits());
    }
    let (iqh, iqt) = (mmio.read64(regs::IQH), mmio.read64(regs::IQT));
    crate::unit::log::info(&format!(
        "taking the unit over: translation {}, queued invalidation on (IQA {:#x}, IQH {iqh:#x}, \
         IQT {iqt:#x}, RTADDR {:#x})",
        if gsts.contains(Gsts::TES) {
            "on"
        } else {
            "off"
        },
        mmio.read64(regs::IQA),
        mmio.read64(regs::RTADDR),
    ));
    set_gcmd(
        mmio,
        Gcmd::QIE,
        false,
        Gsts::QIES,
        "GSTS.QIES to clear",
        timeout,
    )
    .map_err(|e| {
        HwError::Hardware(format!(
            "the previous owner left queued invalidation on and the unit refuses to turn it \
             off ({e}; IQH {iqh:#x}, IQT {iqt:#x}): its queue is not idle or its last \
             descriptor was not a wait; only a reset of the unit clears this"
        ))
    })?;
    Ok(gsts)
}

#[cfg(test)]
mod tests {
    use crate::domain::Domain;
    use crate::hw::PhysMem;
    use crate::platform::sim::{SimMmio, SimPlatform};
    use crate::policy::Trust;
    use crate::unit::{Iommu, UnitConfig};
    use iommu_abi::proto::{Dir, FlushPolicy, Strategy};
    use std::sync::Arc;
    use vtd::regs::{self, Gsts};
    use vtd::sim::{SimConfig, SimMachine};

    const SID: u16 = 0x08;

    /// One platform for both owners: the memory of the first outlives it,
    /// as the table memory of a dead iommud must.
    fn platform() -> (Arc<SimPlatform>, Arc<SimMachine>) {
        let p = Arc::new(
            SimPlatform::new(SimConfig {
                mem_bytes: 16 << 20,
                ..Default::default()
            })
            .unwrap(),
        );
        let m = p.machine().clone();
        (p, m)
    }

    fn bring_up(p: &Arc<SimPlatform>, m: &Arc<SimMachine>) -> Result<Iommu, crate::hw::HwError> {
        let mem: Arc<dyn PhysMem> = p.clone();
        Iommu::init(Box::new(SimMmio(m.clone())), mem, &UnitConfig::default())
    }

    fn gsts(m: &SimMachine) -> Gsts {
        Gsts::from_bits_retain(m.read32(regs::GSTS))
    }

    #[test]
    fn a_unit_left_on_by_an_owner_that_never_attached_is_taken_over() {
        let (p, m) = platform();
        let first = bring_up(&p, &m).unwrap();
        assert!(gsts(&m).contains(Gsts::TES | Gsts::QIES));
        let old_root = m.read64(regs::RTADDR);
        // The owner dies: nothing is torn down, the unit stays on.
        std::mem::forget(first);
        let second = bring_up(&p, &m).expect("second bring-up");
        assert!(gsts(&m).contains(Gsts::TES | Gsts::QIES));
        assert_ne!(m.read64(regs::RTADDR), old_root, "the new owner's root");
        drop(second);
    }

    #[test]
    fn a_dead_owners_device_is_blocked_and_translation_never_went_off() {
        let (p, m) = platform();
        let first = Arc::new(bring_up(&p, &m).unwrap());
        let account = crate::quota::Accounts::default().of(0);
        let dom = Domain::new(
            first.clone(),
            SID,
            Strategy::Global,
            FlushPolicy::Strict,
            Trust::Validated,
            true,
            account,
        )
        .unwrap();
        let pool = dom.alloc_pool(4096).unwrap().0;
        let iova = dom.map(pool.phys, 4096, Dir::Bidirectional, 0).unwrap();
        m.dma_write(SID, iova, b"before")
            .expect("DMA through the first owner's tables");
        let faults_before = m.counters().faults_recorded;
        // The owner dies with its domain attached.
        std::mem::forget(dom);
        std::mem::forget(first);
        let second = bring_up(&p, &m).expect("second bring-up");
        assert!(
            gsts(&m).contains(Gsts::TES),
            "translation is on after the takeover"
        );
        // The device is blocked (no context entry in the new root), and the
        // model records the attempt as a fault: it was translated, not passed.
        let r = m.dma_write(SID, iova, b"after!");
        assert!(r.is_err(), "a dead owner's device still reaches memory");
        assert_eq!(m.counters().faults_recorded, faults_before + 1);
        let mut buf = [0u8; 6];
        m.read_bytes(pool.phys, &mut buf).unwrap();
        assert_eq!(&buf, b"before");
        // Untranslated DMA would have landed at the physical address itself.
        let r = m.dma_write(SID, pool.phys, b"phys!!");
        assert!(r.is_err(), "DMA to a physical address passed untranslated");
        drop(second);
    }
}
