//! Primary fault logging (VT-d 3.x §7.2.1): fault recording registers,
//! FSTS.PPF/PFO/FRI, and clearing a record.

use super::*;

impl SimMachine {
    /// §7.2.1 primary fault logging into the fault recording registers.
    pub(super) fn record_fault(&self, sid: u16, iova: u64, reason: u8, write: bool) {
        let h = self.hdr();
        let fsts = self.fsts();
        if fsts & Fsts::PFO.bits() != 0 {
            self.bump(Ctr::faults_dropped);
            return;
        }
        let nfr = h.nfr.load(Relaxed).max(1);
        let idx = h.next_frcd.load(Relaxed) % nfr;
        let at = FRCD + 16 * idx as usize;
        if self.reg(at + 8) & FRCD_F != 0 {
            self.set_reg32(regs::FSTS, fsts | Fsts::PFO.bits());
            self.bump(Ctr::faults_dropped);
            return;
        }
        let (lo, hi) = FaultRecord {
            fault_addr: iova,
            sid,
            reason,
            is_read: !write,
            f: true,
        }
        .encode();
        self.set_reg(at, lo);
        self.set_reg(at + 8, hi);
        let mut fsts = fsts;
        if fsts & Fsts::PPF.bits() == 0 {
            fsts = (fsts & !Fsts::FRI.bits()) | ((idx as u32) << 8) | Fsts::PPF.bits();
        }
        self.set_reg32(regs::FSTS, fsts);
        self.set_reg32(regs::FECTL, self.reg32(regs::FECTL) | regs::FECTL_IP);
        h.next_frcd.store((idx + 1) % nfr, Relaxed);
        self.bump(Ctr::faults_recorded);
    }

    /// Software wrote 1 to F of the record at `at`: clear it and recompute
    /// FSTS.PPF/FRI (§10.4.9: PPF is the OR of all F bits).
    pub(super) fn clear_frcd(&self, at: usize) {
        self.set_reg(at + 8, self.reg(at + 8) & !FRCD_F);
        let nfr = self.hdr().nfr.load(Relaxed) as usize;
        let pending = (0..nfr).find(|i| self.reg(FRCD + 16 * i + 8) & FRCD_F != 0);
        let mut fsts = self.fsts() & !(Fsts::PPF.bits() | Fsts::FRI.bits());
        if let Some(i) = pending {
            fsts |= Fsts::PPF.bits() | ((i as u32) << 8);
        }
        self.set_reg32(regs::FSTS, fsts);
    }
}
