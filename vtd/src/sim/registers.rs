//! The model's registers (VT-d 3.x chapter 10): the register file in shared
//! state, 32/64-bit MMIO accesses, and the command registers that act on a
//! write (GCMD, CCMD, IOTLB, IQT, fault recording).

use super::*;

/// VER as QEMU reports it (major 1, minor 0).
pub(super) const VER_VALUE: u64 = 0x10;
/// CAP as QEMU reports it (docs/ARCHITECTURE.md, "QEMU's VT-d unit"); CM, SAGAW, MGAW and NFR are replaced
/// per configuration.
pub(super) const QEMU_CAP: u64 = 0x00D2_008C_222F_0606;
/// ECAP as QEMU reports it: C=0, QI=1, PT=1, IRO=0xF (IOTLB regs at 0xF0).
pub(super) const QEMU_ECAP: u64 = 0xF42;
/// Offset of the invalidate-address register (ECAP.IRO * 16).
pub(super) const IVA: usize = 0xF0;
/// Offset of the IOTLB invalidate register (ECAP.IRO * 16 + 8).
pub(super) const IOTLB: usize = 0xF8;
/// Offset of the first fault recording register (CAP.FRO * 16).
pub(super) const FRCD: usize = 0x220;
/// §10.4.3 ECAP.IR, bit 3 cleared; §10.4.2 CAP fields CM 7, SAGAW 12:8,
/// MGAW 21:16, NFR 47:40.
pub(super) const CAP_CM: u64 = 1 << 7;
pub(super) const CAP_SAGAW_MASK: u64 = 0x1F << 8;
pub(super) const CAP_MGAW_MASK: u64 = 0x3F << 16;
pub(super) const CAP_NFR_MASK: u64 = 0xFF << 40;

impl SimMachine {
    pub(super) fn reg(&self, off: usize) -> u64 {
        self.hdr().regs[off / 8].load(Relaxed)
    }

    pub(super) fn set_reg(&self, off: usize, v: u64) {
        self.hdr().regs[off / 8].store(v, Relaxed);
    }

    pub(super) fn reg32(&self, off: usize) -> u32 {
        (self.reg(off & !7) >> ((off & 4) * 8)) as u32
    }

    pub(super) fn set_reg32(&self, off: usize, v: u32) {
        let shift = (off & 4) * 8;
        let old = self.reg(off & !7);
        let new = (old & !(0xFFFF_FFFFu64 << shift)) | (u64::from(v) << shift);
        self.set_reg(off & !7, new);
    }

    pub(super) fn gsts(&self) -> Gsts {
        Gsts::from_bits_retain(self.reg32(regs::GSTS))
    }

    pub(super) fn fsts(&self) -> u32 {
        self.reg32(regs::FSTS)
    }

    pub(super) fn frcd_end(&self) -> usize {
        FRCD + 16 * self.hdr().nfr.load(Relaxed) as usize
    }

    /// 32-bit register read. Unaligned or out-of-range offsets read as all
    /// ones; GCMD reads as 0 (status is in GSTS).
    pub fn read32(&self, off: usize) -> u32 {
        if off & 3 != 0 || off + 4 > REG_BYTES {
            return u32::MAX;
        }
        let _g = SpinLock::lock(&self.hdr().lock);
        self.reg32(off)
    }

    /// 64-bit register read.
    pub fn read64(&self, off: usize) -> u64 {
        if off & 7 != 0 || off + 8 > REG_BYTES {
            return u64::MAX;
        }
        let _g = SpinLock::lock(&self.hdr().lock);
        self.reg(off)
    }

    /// 32-bit register write.
    pub fn write32(&self, off: usize, v: u32) {
        if off & 3 != 0 || off + 4 > REG_BYTES {
            return;
        }
        let _g = SpinLock::lock(&self.hdr().lock);
        self.mmio_write32(off, v);
    }

    /// 64-bit register write. Writes to a pair of 32-bit registers act as
    /// two 32-bit writes, low first.
    pub fn write64(&self, off: usize, v: u64) {
        if off & 7 != 0 || off + 8 > REG_BYTES {
            return;
        }
        let _g = SpinLock::lock(&self.hdr().lock);
        if is_reg64(off) || (FRCD..self.frcd_end()).contains(&off) {
            self.mmio_write64(off, v);
        } else {
            self.mmio_write32(off, v as u32);
            self.mmio_write32(off + 4, (v >> 32) as u32);
        }
    }

    pub(super) fn mmio_write32(&self, off: usize, v: u32) {
        let base = off & !7;
        if (FRCD..self.frcd_end()).contains(&off) {
            // §10.4.14: only F (bit 127 = bit 31 of the record's last dword)
            // is writable, write-1-to-clear.
            if off % 16 == 12 && v & (1 << 31) != 0 {
                self.clear_frcd(off - 12);
            }
            return;
        }
        if is_reg64(base) {
            let shift = (off & 4) * 8;
            let merged = (self.reg(base) & !(0xFFFF_FFFFu64 << shift)) | (u64::from(v) << shift);
            self.mmio_write64(base, merged);
            return;
        }
        match off {
            regs::GCMD => self.gcmd(Gcmd::from_bits_retain(v)),
            regs::FSTS => {
                // §10.4.9: PFO, AFO, APF, IQE, ICE, ITE are RW1C; PPF and FRI
                // are read-only.
                let w1c =
                    (Fsts::PFO | Fsts::AFO | Fsts::APF | Fsts::IQE | Fsts::ICE | Fsts::ITE).bits();
                self.set_reg32(regs::FSTS, self.fsts() & !(v & w1c));
            }
            regs::FECTL => {
                // §10.4.10: IM (31) is RW, IP (30) read-only.
                let ip = self.reg32(regs::FECTL) & regs::FECTL_IP;
                self.set_reg32(regs::FECTL, (v & regs::FECTL_IM) | ip);
            }
            regs::FEDATA | regs::FEADDR | 0x44 => self.set_reg32(off, v),
            regs::ICS => {
                // §10.4.25: IWC is RW1C.
                self.set_reg32(regs::ICS, self.reg32(regs::ICS) & !(v & regs::ICS_IWC));
            }
            _ => {}
        }
    }

    pub(super) fn mmio_write64(&self, off: usize, v: u64) {
        if (FRCD..self.frcd_end()).contains(&off) {
            if off % 16 == 8 && v & FRCD_F != 0 {
                self.clear_frcd(off - 8);
            }
            return;
        }
        match off {
            regs::RTADDR => self.set_reg(off, v & !0xFFF),
            regs::CCMD => {
                self.set_reg(off, v);
                if v & regs::CCMD_ICC != 0 {
                    self.register_cc(v);
                }
            }
            regs::IQT => {
                self.set_reg(off, v & 0x7_FFF0);
                self.run_queue();
            }
            regs::IQA => self.set_reg(off, v & !0x7F8),
            IVA => self.set_reg(off, v),
            IOTLB => {
                self.set_reg(off, v);
                if v & regs::IOTLB_IVT != 0 {
                    self.register_iotlb(v);
                }
            }
            // VER, CAP, ECAP, IQH, IQER and anything else: read-only.
            _ => {}
        }
    }

    /// §10.4.4: act on a GCMD write; the result shows in GSTS.
    pub(super) fn gcmd(&self, cmd: Gcmd) {
        let mut sts = self.gsts();
        sts.set(Gsts::TES, cmd.contains(Gcmd::TE));
        if cmd.contains(Gcmd::SRTP) {
            self.hdr().root.store(self.reg(regs::RTADDR), Relaxed);
            sts.insert(Gsts::RTPS);
        }
        if cmd.contains(Gcmd::QIE) && !sts.contains(Gsts::QIES) {
            // §6.5.2: enabling QI resets IQH to 0.
            self.set_reg(regs::IQH, 0);
            sts.insert(Gsts::QIES);
        } else if !cmd.contains(Gcmd::QIE) && sts.contains(Gsts::QIES) {
            // As QEMU does (docs/ARCHITECTURE.md, "QEMU's VT-d unit"): QI is
            // disabled only when the queue is empty (IQH = IQT) and the last
            // descriptor executed was a wait; otherwise QIES stays set.
            let idle = self.reg(regs::IQH) == self.reg(regs::IQT);
            if idle && self.hdr().last_wait.load(Relaxed) == 1 {
                self.set_reg(regs::IQH, 0);
                sts.remove(Gsts::QIES);
            }
        }
        // WBF completes instantly (WBFS stays 0); IR is not supported
        // (ECAP.IR = 0), so IRE/SIRTP/CFI have no effect.
        self.set_reg32(regs::GSTS, sts.bits());
    }
}

/// Registers modelled as one 64-bit register (the rest of the 8-byte slots
/// are pairs of 32-bit registers).
pub(super) fn is_reg64(off: usize) -> bool {
    matches!(
        off,
        regs::CAP
            | regs::ECAP
            | regs::RTADDR
            | regs::CCMD
            | regs::IQH
            | regs::IQT
            | regs::IQA
            | regs::IQER
            | IVA
            | IOTLB
    )
}
