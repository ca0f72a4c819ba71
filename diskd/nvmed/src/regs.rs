//! NVMe controller registers (NVM Express Base Specification 1.4, §3.1 "Register
//! Definition"; the same offsets in 2.0 §3.1.3).

/// Controller Capabilities, 64 bit (§3.1.1).
pub const CAP: usize = 0x00;
/// Version (§3.1.2).
pub const VS: usize = 0x08;
/// Interrupt Mask Set (§3.1.3).
pub const INTMS: usize = 0x0C;
/// Controller Configuration (§3.1.5).
pub const CC: usize = 0x14;
/// Controller Status (§3.1.6).
pub const CSTS: usize = 0x1C;
/// Admin Queue Attributes (§3.1.8).
pub const AQA: usize = 0x24;
/// Admin Submission Queue Base Address, 64 bit (§3.1.9).
pub const ASQ: usize = 0x28;
/// Admin Completion Queue Base Address, 64 bit (§3.1.10).
pub const ACQ: usize = 0x30;
/// First doorbell (§3.1.24: SQ y tail at 0x1000 + (2y) × (4 << CAP.DSTRD)).
pub const DOORBELL_BASE: usize = 0x1000;

/// Fields of CAP (§3.1.1).
pub mod cap {
    /// Maximum Queue Entries Supported, 0's based (bits 15:0).
    pub fn mqes(cap: u64) -> u32 {
        (cap & 0xffff) as u32
    }
    /// Worst-case time from CC.EN change to CSTS.RDY following it, in 500 ms units
    /// (bits 31:24).
    pub fn timeout_ms(cap: u64) -> u64 {
        ((cap >> 24) & 0xff) * 500
    }
    /// Doorbell Stride: doorbells are 4 << DSTRD bytes apart (bits 35:32).
    pub fn dstrd(cap: u64) -> u32 {
        ((cap >> 32) & 0xf) as u32
    }
    /// Command Sets Supported (bits 44:37); bit 0 = the NVM command set.
    pub fn css(cap: u64) -> u32 {
        ((cap >> 37) & 0xff) as u32
    }
    /// Memory Page Size Minimum: 2 ^ (12 + MPSMIN) bytes (bits 51:48).
    pub fn mpsmin(cap: u64) -> u32 {
        ((cap >> 48) & 0xf) as u32
    }
    /// Memory Page Size Maximum (bits 55:52).
    pub fn mpsmax(cap: u64) -> u32 {
        ((cap >> 52) & 0xf) as u32
    }
}

/// Fields of CC (§3.1.5).
pub mod cc {
    /// Enable (bit 0).
    pub const EN: u32 = 1 << 0;
    /// I/O Submission Queue Entry Size: 2^n bytes (bits 19:16); 6 = 64 bytes.
    pub const IOSQES_SHIFT: u32 = 16;
    /// I/O Completion Queue Entry Size (bits 23:20); 4 = 16 bytes.
    pub const IOCQES_SHIFT: u32 = 20;
    /// Memory Page Size: 2 ^ (12 + MPS) (bits 10:7).
    pub const MPS_SHIFT: u32 = 7;
    /// I/O Command Set Selected (bits 6:4); 0 = NVM.
    pub const CSS_SHIFT: u32 = 4;
    /// Arbitration Mechanism Selected (bits 13:11); 0 = round robin.
    pub const AMS_SHIFT: u32 = 11;
    /// Shutdown Notification (bits 15:14); 1 = normal shutdown.
    pub const SHN_NORMAL: u32 = 1 << 14;

    /// CC for 4 KiB pages, the NVM command set, round robin, 64-byte SQ and 16-byte CQ
    /// entries, with EN = `enable`.
    pub fn value(enable: bool) -> u32 {
        (6 << IOSQES_SHIFT)
            | (4 << IOCQES_SHIFT)
            | (0 << MPS_SHIFT)
            | (0 << AMS_SHIFT)
            | (0 << CSS_SHIFT)
            | u32::from(enable)
    }
}

/// Fields of CSTS (§3.1.6).
pub mod csts {
    /// Ready (bit 0).
    pub const RDY: u32 = 1 << 0;
    /// Controller Fatal Status (bit 1).
    pub const CFS: u32 = 1 << 1;
    /// Shutdown Status (bits 3:2); 2 = shutdown processing complete.
    pub fn shst(csts: u32) -> u32 {
        (csts >> 2) & 3
    }
}

/// AQA (§3.1.8): admin SQ size (bits 11:0) and CQ size (bits 27:16), both 0's based.
pub fn aqa(sq_entries: u16, cq_entries: u16) -> u32 {
    (u32::from(cq_entries.saturating_sub(1)) & 0xfff) << 16
        | (u32::from(sq_entries.saturating_sub(1)) & 0xfff)
}

/// Offset of queue `qid`'s submission-tail doorbell (§3.1.24).
pub fn sq_tail_doorbell(qid: u16, dstrd: u32) -> usize {
    DOORBELL_BASE + (2 * usize::from(qid)) * (4usize << dstrd)
}

/// Offset of queue `qid`'s completion-head doorbell (§3.1.25).
pub fn cq_head_doorbell(qid: u16, dstrd: u32) -> usize {
    DOORBELL_BASE + (2 * usize::from(qid) + 1) * (4usize << dstrd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_fields_of_qemus_controller() {
        // MQES 0x7ff, CQR (bit 16), TO 0xf, DSTRD 0, CSS 0x81 (NVM + admin only),
        // MPSMIN 0, MPSMAX 4, assembled by hand: 0x81 << 37 = 0x1020_0000_0000,
        // 4 << 52 = 0x0040_0000_0000_0000.
        let cap: u64 = 0x0040_1020_0f01_07ff;
        assert_eq!(cap::mqes(cap), 0x7ff);
        assert_eq!(cap::timeout_ms(cap), 7500);
        assert_eq!(cap::dstrd(cap), 0);
        assert_eq!(cap::css(cap) & 1, 1);
        assert_eq!(cap::mpsmin(cap), 0);
        assert_eq!(cap::mpsmax(cap), 4);
        // DSTRD = 2 (16-byte stride) in bits 35:32.
        assert_eq!(cap::dstrd(2 << 32), 2);
    }

    #[test]
    fn cc_enable_value() {
        // IOCQES 4 in 23:20 = 0x40_0000, IOSQES 6 in 19:16 = 0x6_0000, EN = 1.
        assert_eq!(cc::value(true), 0x0046_0001);
        assert_eq!(cc::value(false), 0x0046_0000);
    }

    #[test]
    fn aqa_and_doorbells() {
        // 32-entry admin queues: 31 in both fields.
        assert_eq!(aqa(32, 32), 0x001f_001f);
        assert_eq!(aqa(64, 16), 0x000f_003f);
        // Stride 4 bytes: SQ0 0x1000, CQ0 0x1004, SQ1 0x1008, CQ1 0x100c.
        assert_eq!(sq_tail_doorbell(0, 0), 0x1000);
        assert_eq!(cq_head_doorbell(0, 0), 0x1004);
        assert_eq!(sq_tail_doorbell(1, 0), 0x1008);
        assert_eq!(cq_head_doorbell(1, 0), 0x100c);
        // Stride 16 bytes (DSTRD 2): SQ3 at 0x1000 + 6 × 16 = 0x1060, CQ3 0x1070.
        assert_eq!(sq_tail_doorbell(3, 2), 0x1060);
        assert_eq!(cq_head_doorbell(3, 2), 0x1070);
        assert_eq!(csts::shst(0b1001), 2);
    }
}
