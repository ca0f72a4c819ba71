//! The model's caches and their invalidation: the cache keys of the IOTLB and
//! the paging-structure cache, the register-based invalidations (CCMD, IOTLB
//! registers) and the invalidation queue (VT-d 3.x §6.5).

use super::*;

/// Bit in a cache key marking it in use (key 0 means empty).
pub(super) const KEY_VALID: u64 = 1 << 63;
pub(super) const KEY_LOW_BITS: u64 = 44;
pub(super) const KEY_LOW_MASK: u64 = (1 << KEY_LOW_BITS) - 1;

pub(super) fn cache_key(did: u16, low: u64) -> u64 {
    KEY_VALID | (u64::from(did) << KEY_LOW_BITS) | (low & KEY_LOW_MASK)
}

pub(super) fn key_did(key: u64) -> u16 {
    (key >> KEY_LOW_BITS) as u16
}

pub(super) fn key_low(key: u64) -> u64 {
    key & KEY_LOW_MASK
}

impl SimMachine {
    /// §10.4.7 register-based context-cache invalidation.
    pub(super) fn register_cc(&self, v: u64) {
        let mut out = v & !regs::CCMD_ICC & !(3 << 59);
        if self.gsts().contains(Gsts::QIES) {
            self.bump(Ctr::register_invalidations_refused);
        } else if let Some(g) = regs::ccmd_cirg(v) {
            let fm = ((v >> 32) & 3) as u8;
            self.invalidate_cc(g, regs::ccmd_did(v), regs::ccmd_sid(v), fm);
            out |= (g as u64) << 59;
        }
        self.set_reg(regs::CCMD, out);
    }

    /// §10.4.8.1 register-based IOTLB invalidation.
    pub(super) fn register_iotlb(&self, v: u64) {
        let mut out = v & !regs::IOTLB_IVT & !(3 << 57);
        if self.gsts().contains(Gsts::QIES) {
            self.bump(Ctr::register_invalidations_refused);
        } else if let Some(g) = regs::iotlb_iirg(v) {
            let iva = self.reg(IVA);
            let ok = self.invalidate_iotlb(
                g,
                regs::iotlb_did(v),
                iva & !0xFFF,
                (iva & 0x3F) as u8,
                iva & (1 << 6) != 0,
            );
            if ok {
                out |= (g as u64) << 57;
            }
        }
        self.set_reg(IOTLB, out);
    }

    /// §6.5.2: execute descriptors from IQH to IQT.
    pub(super) fn run_queue(&self) {
        if !self.gsts().contains(Gsts::QIES) || self.fsts() & Fsts::IQE.bits() != 0 {
            return;
        }
        let iqa = self.reg(regs::IQA);
        let base = regs::iqa_base(iqa);
        let n = regs::iqa_entries(iqa);
        let tail = (self.reg(regs::IQT) >> 4) as usize;
        let mut head = (self.reg(regs::IQH) >> 4) as usize;
        if regs::iqa_dw(iqa) || tail >= n || head >= n {
            self.queue_error();
            return;
        }
        while head != tail {
            let at = base + (head * DESC_BYTES) as u64;
            let d = match (self.read_u64(at), self.read_u64(at + 8)) {
                (Ok(lo), Ok(hi)) => Descriptor { lo, hi },
                _ => {
                    self.set_reg(regs::IQH, (head as u64) << 4);
                    self.queue_error();
                    return;
                }
            };
            let is_wait = matches!(d.decode(), Decoded::Wait { .. });
            if !self.execute(d) {
                self.hdr().last_wait.store(0, Relaxed);
                // IQH stays at the offending descriptor.
                self.set_reg(regs::IQH, (head as u64) << 4);
                self.queue_error();
                return;
            }
            self.bump(Ctr::descriptors_executed);
            self.hdr().last_wait.store(u64::from(is_wait), Relaxed);
            head = (head + 1) % n;
        }
        self.set_reg(regs::IQH, (head as u64) << 4);
    }

    pub(super) fn queue_error(&self) {
        self.bump(Ctr::queue_errors);
        self.set_reg32(regs::FSTS, self.fsts() | Fsts::IQE.bits());
    }

    /// Spends the configured invalidation latency (see
    /// [`SimConfig::inval_latency_ns`]).
    pub(super) fn take_time(&self) {
        let ns = self.hdr().inval_latency_ns.load(Relaxed);
        if ns > 0 {
            let until = std::time::Instant::now() + std::time::Duration::from_nanos(ns);
            while std::time::Instant::now() < until {
                std::hint::spin_loop();
            }
        }
    }

    /// Execute one descriptor; false if it is invalid.
    pub(super) fn execute(&self, d: Descriptor) -> bool {
        match d.decode() {
            Decoded::ContextCache { g, did, sid, fm } => {
                self.invalidate_cc(g, did, sid, fm);
                self.take_time();
                true
            }
            Decoded::Iotlb {
                g,
                did,
                addr,
                am,
                ih,
                ..
            } => {
                let ok = self.invalidate_iotlb(g, did, addr, am, ih);
                self.take_time();
                ok
            }
            Decoded::Wait {
                status_addr,
                status_data,
                intr,
                sw,
                ..
            } => {
                if sw && self.write_u32(status_addr, status_data).is_err() {
                    return false;
                }
                if intr {
                    self.set_reg32(regs::ICS, self.reg32(regs::ICS) | regs::ICS_IWC);
                }
                self.bump(Ctr::wait);
                true
            }
            // ECAP.DT = 0 and ECAP.IR = 0: these types are invalid here.
            Decoded::DevTlb | Decoded::Iec | Decoded::Invalid => false,
        }
    }

    pub(super) fn ctx_slot(&self, sid: u16) -> &CtxSlot {
        &self.hdr().ctx[usize::from(sid)]
    }

    pub(super) fn invalidate_cc(&self, g: Granularity, did: u16, sid: u16, fm: u8) {
        let clear = |s: &CtxSlot| s.state.store(0, Relaxed);
        match g {
            Granularity::Global => {
                self.bump(Ctr::cc_global);
                self.hdr().ctx.iter().for_each(clear);
            }
            Granularity::Domain => {
                self.bump(Ctr::cc_domain);
                // Negative entries (caching mode) are tagged with domain 0
                // (§6.1: software uses DID 0 for not-present entries).
                for s in self.hdr().ctx.iter() {
                    let st = s.state.load(Relaxed);
                    let sdid = if st == 1 {
                        ContextEntry::from_qwords(0, s.hi.load(Relaxed)).did()
                    } else {
                        0
                    };
                    if st != 0 && sdid == did {
                        clear(s);
                    }
                }
            }
            Granularity::Selective => {
                self.bump(Ctr::cc_device);
                // §6.5.2.1 FM: 0 none, 1 masks function bit 2, 2 bits 2:1,
                // 3 bits 2:0.
                let mask: u16 = (0b111u16 << (3 - u16::from(fm.min(3)))) & 0b111;
                let base = sid & !mask;
                for f in 0..=mask {
                    if f & !mask == 0 {
                        clear(self.ctx_slot(base | f));
                    }
                }
            }
        }
    }

    /// Returns false for an invalid request (AM above CAP.MAMV).
    pub(super) fn invalidate_iotlb(
        &self,
        g: Granularity,
        did: u16,
        addr: u64,
        am: u8,
        ih: bool,
    ) -> bool {
        let iotlb = self.iotlb();
        let ps = self.ps_cache();
        match g {
            Granularity::Global => {
                self.bump(Ctr::iotlb_global);
                iotlb.wipe();
                ps.wipe();
            }
            Granularity::Domain => {
                self.bump(Ctr::iotlb_domain);
                iotlb.remove_if(|k| key_did(k) == did);
                ps.remove_if(|k| key_did(k) == did);
            }
            Granularity::Selective => {
                if am > regs::Cap(self.reg(regs::CAP)).mamv() {
                    return false;
                }
                self.bump(Ctr::iotlb_page);
                // §6.5.2.3: the range is 2^AM pages at ADDR, ADDR aligned to
                // it (low bits ignored).
                let pages = 1u64 << am;
                let first = (addr >> 12) & !(pages - 1);
                let last = first + pages - 1;
                if pages <= 64 {
                    for p in first..=last {
                        iotlb.remove(cache_key(did, p));
                    }
                } else {
                    iotlb.remove_if(|k| key_did(k) == did && (first..=last).contains(&key_low(k)));
                }
                if !ih {
                    let (r0, r1) = (first >> 9, last >> 9);
                    ps.remove_if(|k| key_did(k) == did && (r0..=r1).contains(&key_low(k)));
                }
            }
        }
        true
    }
}
