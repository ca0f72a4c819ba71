//! VT-d remapping-unit registers: offsets, capability decoding and the
//! encodings of the command/status/invalidation/fault registers.
//!
//! References are to the Intel VT-d Architecture Specification, chapter 10
//! ("Register Descriptions"); section numbers follow revision 3.x/4.x.

use bitflags::bitflags;

/// §10.4.1 Version register (32-bit).
pub const VER: usize = 0x0;
/// §10.4.2 Capability register (64-bit).
pub const CAP: usize = 0x8;
/// §10.4.3 Extended capability register (64-bit).
pub const ECAP: usize = 0x10;
/// §10.4.4 Global command register (32-bit).
pub const GCMD: usize = 0x18;
/// §10.4.5 Global status register (32-bit).
pub const GSTS: usize = 0x1C;
/// §10.4.6 Root table address register (64-bit).
pub const RTADDR: usize = 0x20;
/// §10.4.7 Context command register (64-bit).
pub const CCMD: usize = 0x28;
/// §10.4.9 Fault status register (32-bit).
pub const FSTS: usize = 0x34;
/// §10.4.10 Fault event control register (32-bit).
pub const FECTL: usize = 0x38;
/// §10.4.11 Fault event data register (32-bit).
pub const FEDATA: usize = 0x3C;
/// §10.4.12 Fault event address register (32-bit).
pub const FEADDR: usize = 0x40;
/// §10.4.22 Invalidation queue head register (64-bit).
pub const IQH: usize = 0x80;
/// §10.4.23 Invalidation queue tail register (64-bit).
pub const IQT: usize = 0x88;
/// §10.4.24 Invalidation queue address register (64-bit).
pub const IQA: usize = 0x90;
/// §10.4.25 Invalidation completion status register (32-bit).
pub const ICS: usize = 0x9C;
/// §10.4.29 Invalidation queue error record register (64-bit).
pub const IQER: usize = 0xB0;

/// Extract bits `hi:lo` (inclusive) of `v`.
#[inline]
pub(crate) const fn bits(v: u64, hi: u32, lo: u32) -> u64 {
    (v >> lo) & (u64::MAX >> (63 - (hi - lo)))
}

/// §10.4.2 Capability register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cap(pub u64);

impl Cap {
    /// ND, bits 2:0: number-of-domains field.
    pub fn nd(self) -> u8 {
        bits(self.0, 2, 0) as u8
    }
    /// Number of domain ids supported: 2^(4 + 2*ND).
    pub fn domain_ids(self) -> u32 {
        1u32 << (4 + 2 * u32::from(self.nd()))
    }
    /// CM, bit 7: caching mode (not-present entries may be cached).
    pub fn cm(self) -> bool {
        bits(self.0, 7, 7) != 0
    }
    /// SAGAW, bits 12:8: supported adjusted guest address widths
    /// (bit 1 = 39-bit/3-level, bit 2 = 48-bit/4-level).
    pub fn sagaw(self) -> u8 {
        bits(self.0, 12, 8) as u8
    }
    /// MGAW, bits 21:16, plus one: maximum guest address width in bits.
    pub fn mgaw(self) -> u8 {
        bits(self.0, 21, 16) as u8 + 1
    }
    /// FRO, bits 33:24, times 16: byte offset of the first fault recording register.
    pub fn fro_bytes(self) -> usize {
        bits(self.0, 33, 24) as usize * 16
    }
    /// SLLPS, bits 37:34: second-level large page sizes (bit 0 = 2 MiB, bit 1 = 1 GiB).
    pub fn sllps(self) -> u8 {
        bits(self.0, 37, 34) as u8
    }
    /// PSI, bit 39: page-selective invalidation supported.
    pub fn psi(self) -> bool {
        bits(self.0, 39, 39) != 0
    }
    /// NFR, bits 47:40, plus one: number of fault recording registers.
    pub fn nfr(self) -> u16 {
        bits(self.0, 47, 40) as u16 + 1
    }
    /// MAMV, bits 53:48: maximum address mask value for page-selective invalidation.
    pub fn mamv(self) -> u8 {
        bits(self.0, 53, 48) as u8
    }
    /// DWD, bit 54: write draining supported.
    pub fn dwd(self) -> bool {
        bits(self.0, 54, 54) != 0
    }
    /// DRD, bit 55: read draining supported.
    pub fn drd(self) -> bool {
        bits(self.0, 55, 55) != 0
    }
    /// Page-table levels to use: 4 if SAGAW bit 2 (48-bit) is set, else 3 if
    /// bit 1 (39-bit), else none supported.
    pub fn levels(self) -> Option<u8> {
        let s = self.sagaw();
        if s & 0b100 != 0 {
            Some(4)
        } else if s & 0b010 != 0 {
            Some(3)
        } else {
            None
        }
    }
}

/// §10.4.3 Extended capability register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ecap(pub u64);

impl Ecap {
    /// C, bit 0: page-walk coherency (0 = software must flush CPU caches).
    pub fn c(self) -> bool {
        bits(self.0, 0, 0) != 0
    }
    /// QI, bit 1: queued invalidation supported.
    pub fn qi(self) -> bool {
        bits(self.0, 1, 1) != 0
    }
    /// DT, bit 2: device-TLB supported.
    pub fn dt(self) -> bool {
        bits(self.0, 2, 2) != 0
    }
    /// IR, bit 3: interrupt remapping supported.
    pub fn ir(self) -> bool {
        bits(self.0, 3, 3) != 0
    }
    /// PT, bit 6: pass-through translation type supported.
    pub fn pt(self) -> bool {
        bits(self.0, 6, 6) != 0
    }
    /// SC, bit 7: snoop control supported.
    pub fn sc(self) -> bool {
        bits(self.0, 7, 7) != 0
    }
    /// IRO, bits 17:8, times 16: byte offset of the IOTLB registers (IVA
    /// at +0, IOTLB at +8).
    pub fn iro_bytes(self) -> usize {
        bits(self.0, 17, 8) as usize * 16
    }
}

bitflags! {
    /// §10.4.4 Global command register bits.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Gcmd: u32 {
        /// Translation enable.
        const TE = 1 << 31;
        /// Set root table pointer (one-shot).
        const SRTP = 1 << 30;
        /// Set fault log (one-shot).
        const SFL = 1 << 29;
        /// Enable advanced fault logging.
        const EAFL = 1 << 28;
        /// Write buffer flush (one-shot).
        const WBF = 1 << 27;
        /// Queued invalidation enable.
        const QIE = 1 << 26;
        /// Interrupt remapping enable.
        const IRE = 1 << 25;
        /// Set interrupt remap table pointer (one-shot).
        const SIRTP = 1 << 24;
        /// Compatibility format interrupt.
        const CFI = 1 << 23;
    }
}

bitflags! {
    /// §10.4.5 Global status register bits.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Gsts: u32 {
        /// Translation enable status.
        const TES = 1 << 31;
        /// Root table pointer status.
        const RTPS = 1 << 30;
        /// Fault log status.
        const FLS = 1 << 29;
        /// Advanced fault logging status.
        const AFLS = 1 << 28;
        /// Write buffer flush status (1 = flush in progress).
        const WBFS = 1 << 27;
        /// Queued invalidation enable status.
        const QIES = 1 << 26;
        /// Interrupt remapping enable status.
        const IRES = 1 << 25;
        /// Interrupt remapping table pointer status.
        const IRTPS = 1 << 24;
        /// Compatibility format interrupt status.
        const CFIS = 1 << 23;
    }
}

bitflags! {
    /// §10.4.9 Fault status register bits (FRI, bits 15:8, via [`fsts_fri`]).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Fsts: u32 {
        /// Primary fault overflow (write 1 to clear).
        const PFO = 1 << 0;
        /// Primary pending fault (read-only: some FRCD has F set).
        const PPF = 1 << 1;
        /// Advanced fault overflow.
        const AFO = 1 << 2;
        /// Advanced pending fault.
        const APF = 1 << 3;
        /// Invalidation queue error (write 1 to clear).
        const IQE = 1 << 4;
        /// Invalidation completion error (write 1 to clear).
        const ICE = 1 << 5;
        /// Invalidation time-out error (write 1 to clear).
        const ITE = 1 << 6;
        /// The fault record index field, bits 15:8.
        const FRI = 0xFF << 8;
    }
}

/// §10.4.9 FSTS.FRI, bits 15:8: index of the first pending fault record.
pub fn fsts_fri(fsts: u32) -> u8 {
    (fsts >> 8) as u8
}

/// §10.4.10 FECTL.IM, bit 31: interrupt mask.
pub const FECTL_IM: u32 = 1 << 31;
/// §10.4.10 FECTL.IP, bit 30: interrupt pending.
pub const FECTL_IP: u32 = 1 << 30;
/// §10.4.25 ICS.IWC, bit 0: invalidation wait descriptor complete.
pub const ICS_IWC: u32 = 1;

/// Invalidation granularity, shared by CCMD.CIRG, the IOTLB register's IIRG
/// and the descriptors' G fields (§10.4.7, §10.4.8.1, §6.5.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Granularity {
    /// Everything.
    Global = 1,
    /// One domain id.
    Domain = 2,
    /// One device (context cache) or a page range (IOTLB).
    Selective = 3,
}

impl Granularity {
    /// Decode a 2-bit granularity field; 0 is reserved.
    pub fn from_bits(v: u64) -> Option<Self> {
        match v & 3 {
            1 => Some(Self::Global),
            2 => Some(Self::Domain),
            3 => Some(Self::Selective),
            _ => None,
        }
    }
}

/// §10.4.7 CCMD.ICC, bit 63: invalidate context cache (cleared by hardware when done).
pub const CCMD_ICC: u64 = 1 << 63;

/// §10.4.7 Encode a context-command register write: ICC bit 63, CIRG 62:61,
/// FM 33:32, SID 31:16, DID 15:0.
pub fn ccmd(g: Granularity, did: u16, sid: u16, fm: u8) -> u64 {
    CCMD_ICC
        | ((g as u64) << 61)
        | ((u64::from(fm) & 3) << 32)
        | (u64::from(sid) << 16)
        | u64::from(did)
}

/// §10.4.7 CCMD.CIRG, bits 62:61: requested granularity.
pub fn ccmd_cirg(v: u64) -> Option<Granularity> {
    Granularity::from_bits(bits(v, 62, 61))
}

/// §10.4.7 CCMD.CAIG, bits 60:59: granularity actually performed.
pub fn ccmd_caig(v: u64) -> Option<Granularity> {
    Granularity::from_bits(bits(v, 60, 59))
}

/// §10.4.7 CCMD.SID, bits 31:16.
pub fn ccmd_sid(v: u64) -> u16 {
    bits(v, 31, 16) as u16
}

/// §10.4.7 CCMD.DID, bits 15:0.
pub fn ccmd_did(v: u64) -> u16 {
    bits(v, 15, 0) as u16
}

/// §10.4.8.1 IOTLB.IVT, bit 63: invalidate IOTLB (cleared by hardware when done).
pub const IOTLB_IVT: u64 = 1 << 63;
/// §10.4.8.1 IOTLB.DR, bit 49: drain reads.
pub const IOTLB_DR: u64 = 1 << 49;
/// §10.4.8.1 IOTLB.DW, bit 48: drain writes.
pub const IOTLB_DW: u64 = 1 << 48;

/// §10.4.8.1 Encode an IOTLB invalidate register write: IVT 63, IIRG 61:60,
/// DR 49, DW 48, DID 47:32. For page-selective, program IVA first ([`iva`]).
pub fn iotlb_reg(g: Granularity, did: u16, dr: bool, dw: bool) -> u64 {
    IOTLB_IVT
        | ((g as u64) << 60)
        | if dr { IOTLB_DR } else { 0 }
        | if dw { IOTLB_DW } else { 0 }
        | (u64::from(did) << 32)
}

/// §10.4.8.1 IOTLB.IIRG, bits 61:60: requested granularity.
pub fn iotlb_iirg(v: u64) -> Option<Granularity> {
    Granularity::from_bits(bits(v, 61, 60))
}

/// §10.4.8.1 IOTLB.IAIG, bits 58:57: granularity actually performed.
pub fn iotlb_iaig(v: u64) -> Option<Granularity> {
    Granularity::from_bits(bits(v, 58, 57))
}

/// §10.4.8.1 IOTLB.DID, bits 47:32.
pub fn iotlb_did(v: u64) -> u16 {
    bits(v, 47, 32) as u16
}

/// §10.4.8.2 Encode the invalidate-address register: ADDR 63:12, IH 6, AM 5:0.
pub fn iva(addr: u64, am: u8, ih: bool) -> u64 {
    (addr & !0xFFF) | (u64::from(ih) << 6) | (u64::from(am) & 0x3F)
}

/// §10.4.24 Encode IQA: queue base 63:12, DW bit 11 = 0 (128-bit
/// descriptors), QS 2:0 (2^(QS+8) entries).
pub fn iqa(base: u64, qs: u8) -> u64 {
    (base & !0xFFF) | (u64::from(qs) & 7)
}

/// §10.4.24 IQA base address, bits 63:12.
pub fn iqa_base(v: u64) -> u64 {
    v & !0xFFF
}

/// §10.4.24 IQA.DW, bit 11: 256-bit descriptors.
pub fn iqa_dw(v: u64) -> bool {
    bits(v, 11, 11) != 0
}

/// §10.4.24 Number of 128-bit entries in the queue: 2^(QS+8).
pub fn iqa_entries(v: u64) -> usize {
    1usize << (bits(v, 2, 0) + 8)
}

/// §10.4.14 A primary fault record (128 bits, at CAP.FRO*16 + i*16).
///
/// Low qword: FI (faulting page address) 63:12. High qword: SID 15:0,
/// FR 39:32, T 62 (1 = read, 0 = write), F 63 (write 1 to clear).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultRecord {
    /// Page-aligned faulting address (FI).
    pub fault_addr: u64,
    /// Requester id (bus << 8 | devfn).
    pub sid: u16,
    /// Fault reason (see [`fault_reason`]).
    pub reason: u8,
    /// T bit: the request was a read.
    pub is_read: bool,
    /// F bit: the record holds a fault not yet cleared by software.
    pub f: bool,
}

/// §10.4.14 FRCD high qword F bit (bit 127 of the record).
pub const FRCD_F: u64 = 1 << 63;
/// §10.4.14 FRCD high qword T bit (bit 126 of the record): 1 = read.
pub const FRCD_T: u64 = 1 << 62;

impl FaultRecord {
    /// Decode a record from its low and high qwords.
    pub fn decode(lo: u64, hi: u64) -> Self {
        Self {
            fault_addr: lo & !0xFFF,
            sid: bits(hi, 15, 0) as u16,
            reason: bits(hi, 39, 32) as u8,
            is_read: hi & FRCD_T != 0,
            f: hi & FRCD_F != 0,
        }
    }

    /// Encode into `(lo, hi)` qwords (used by the model).
    pub fn encode(&self) -> (u64, u64) {
        let lo = self.fault_addr & !0xFFF;
        let hi = u64::from(self.sid)
            | (u64::from(self.reason) << 32)
            | if self.is_read { FRCD_T } else { 0 }
            | if self.f { FRCD_F } else { 0 };
        (lo, hi)
    }
}

/// Fault reason codes, VT-d spec Appendix A (non-recoverable fault reasons).
pub mod fault_reason {
    /// Root entry present bit clear.
    pub const ROOT_NOT_PRESENT: u8 = 0x1;
    /// Context entry present bit clear.
    pub const CONTEXT_NOT_PRESENT: u8 = 0x2;
    /// Invalid programming of a context entry (e.g. unsupported AW or TT).
    pub const CONTEXT_INVALID: u8 = 0x3;
    /// Input address beyond the domain's address width.
    pub const ADDR_BEYOND_AW: u8 = 0x4;
    /// Write to a page without W (incl. a non-present entry).
    pub const WRITE: u8 = 0x5;
    /// Read from a page without R (incl. a non-present entry).
    pub const READ: u8 = 0x6;
    /// Next-level table address invalid.
    pub const NEXT_TABLE_INVALID: u8 = 0x7;
    /// Root table address invalid.
    pub const ROOT_TABLE_INVALID: u8 = 0x8;
    /// Context table pointer invalid.
    pub const CONTEXT_TABLE_INVALID: u8 = 0x9;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_qemu_cap() {
        // CAP 0x00D2008C222F0606 as QEMU reports (docs/ARCHITECTURE.md, "QEMU's VT-d unit"):
        // bits 2:0   = 0x6           -> ND 6, 2^(4+12) = 65536 ids
        // bit 7      = 0 (0x06)      -> CM off
        // bits 12:8  = 0x06          -> SAGAW 39- and 48-bit
        // bits 21:16 = 0x2F = 47     -> MGAW 48
        // bits 33:24 = 0x8C22 & 0x3FF = 0x22 = 34 -> FRO at 34*16 = 0x220
        // bits 37:34 = (0x8C22 >> 10) & 0xF = 0x23 & 0xF = 3 -> 2M + 1G
        // bit 39     = (0x8C22 >> 15) & 1 = 1 -> PSI
        // bits 47:40 = 0x00          -> NFR 1
        // bits 53:48 = 0xD2 & 0x3F = 0x12 = 18 -> MAMV 18
        // bit 54, 55 = (0xD2 >> 6) = 3 -> DWD, DRD
        let c = Cap(0x00D2_008C_222F_0606);
        assert_eq!(c.nd(), 6);
        assert_eq!(c.domain_ids(), 65536);
        assert!(!c.cm());
        assert_eq!(c.sagaw(), 0x6);
        assert_eq!(c.mgaw(), 48);
        assert_eq!(c.fro_bytes(), 0x220);
        assert_eq!(c.sllps(), 3);
        assert!(c.psi());
        assert_eq!(c.nfr(), 1);
        assert_eq!(c.mamv(), 18);
        assert!(c.dwd() && c.drd());
        assert_eq!(c.levels(), Some(4));
        // SAGAW = 0b010 only -> 3 levels; 0 -> none.
        assert_eq!(Cap(0x2 << 8).levels(), Some(3));
        assert_eq!(Cap(0).levels(), None);
        // CM bit 7 alone.
        assert!(Cap(0x80).cm());
    }

    #[test]
    fn decode_qemu_ecap() {
        // ECAP 0xF42 = 0b1111_0100_0010:
        // bit 0 C = 0, bit 1 QI = 1, bit 2 DT = 0, bit 3 IR = 0,
        // bit 6 PT = 1, bit 7 SC = 0, bits 17:8 IRO = 0xF -> 0xF0.
        let e = Ecap(0xF42);
        assert!(!e.c());
        assert!(e.qi());
        assert!(!e.dt());
        assert!(!e.ir());
        assert!(e.pt());
        assert!(!e.sc());
        assert_eq!(e.iro_bytes(), 0xF0);
    }

    #[test]
    fn gcmd_gsts_bits() {
        assert_eq!(Gcmd::TE.bits(), 0x8000_0000);
        assert_eq!(Gcmd::SRTP.bits(), 0x4000_0000);
        assert_eq!(Gcmd::WBF.bits(), 0x0800_0000);
        assert_eq!(Gcmd::QIE.bits(), 0x0400_0000);
        assert_eq!(Gcmd::IRE.bits(), 0x0200_0000);
        assert_eq!(Gcmd::SIRTP.bits(), 0x0100_0000);
        assert_eq!(Gcmd::CFI.bits(), 0x0080_0000);
        assert_eq!(Gsts::TES.bits(), 0x8000_0000);
        assert_eq!(Gsts::RTPS.bits(), 0x4000_0000);
        assert_eq!(Gsts::QIES.bits(), 0x0400_0000);
        assert_eq!(Fsts::PFO.bits(), 0x1);
        assert_eq!(Fsts::PPF.bits(), 0x2);
        assert_eq!(Fsts::IQE.bits(), 0x10);
        assert_eq!(Fsts::ICE.bits(), 0x20);
        assert_eq!(Fsts::ITE.bits(), 0x40);
        // FRI 15:8: 0x0302 -> FRI 3 (with PPF).
        assert_eq!(fsts_fri(0x0302), 3);
    }

    #[test]
    fn ccmd_encoding() {
        // Device-selective: ICC 1<<63 = 0x8000_0000_0000_0000; CIRG 3<<61 =
        // 0x6000_0000_0000_0000; FM 1<<32 = 0x1_0000_0000; SID 0x0008<<16 =
        // 0x8_0000; DID 5 -> 0xE000_0001_0008_0005.
        let v = ccmd(Granularity::Selective, 5, 0x0008, 1);
        assert_eq!(v, 0xE000_0001_0008_0005);
        assert_eq!(ccmd_cirg(v), Some(Granularity::Selective));
        assert_eq!(ccmd_sid(v), 8);
        assert_eq!(ccmd_did(v), 5);
        // Global: ICC | 1<<61 = 0xA000_0000_0000_0000.
        assert_eq!(ccmd(Granularity::Global, 0, 0, 0), 0xA000_0000_0000_0000);
        // CAIG 60:59 = 1 (global): 1<<59 = 0x0800_0000_0000_0000.
        assert_eq!(ccmd_caig(0x0800_0000_0000_0000), Some(Granularity::Global));
    }

    #[test]
    fn iotlb_reg_encoding() {
        // Domain-selective did 7 with drains: IVT 1<<63 = 0x8000..., IIRG
        // 2<<60 = 0x2000..., DR 1<<49 = 0x0002_0000_0000_0000, DW 1<<48 =
        // 0x0001_0000_0000_0000, DID 7<<32 = 0x7_0000_0000
        // -> 0xA003_0007_0000_0000.
        let v = iotlb_reg(Granularity::Domain, 7, true, true);
        assert_eq!(v, 0xA003_0007_0000_0000);
        assert_eq!(iotlb_iirg(v), Some(Granularity::Domain));
        assert_eq!(iotlb_did(v), 7);
        // Global, no drain: 0x8000.. | 1<<60 = 0x9000_0000_0000_0000.
        assert_eq!(
            iotlb_reg(Granularity::Global, 0, false, false),
            0x9000_0000_0000_0000
        );
        // IAIG 58:57 = 3: 3<<57 = 0x0600_0000_0000_0000.
        assert_eq!(
            iotlb_iaig(0x0600_0000_0000_0000),
            Some(Granularity::Selective)
        );
        // IVA 0x1234_5000, IH (1<<6 = 0x40), AM 2 -> 0x1234_5042.
        assert_eq!(iva(0x1234_5678, 2, true), 0x1234_5042);
    }

    #[test]
    fn iqa_encoding() {
        // Base 0x10_0000, QS 0 -> 0x10_0000; 256 entries; DW bit 11 clear.
        let v = iqa(0x10_0000, 0);
        assert_eq!(v, 0x10_0000);
        assert_eq!(iqa_entries(v), 256);
        assert!(!iqa_dw(v));
        // QS 3 -> 2^11 = 2048 entries.
        assert_eq!(iqa_entries(iqa(0x10_0000, 3)), 2048);
        assert!(iqa_dw(0x800));
        assert_eq!(iqa_base(0x10_0803), 0x10_0000);
    }

    #[test]
    fn fault_record_decode_encode() {
        // The record QEMU gave (docs/ARCHITECTURE.md, "QEMU's VT-d unit"): page 0x900000,
        // F=1, T=1, FR=6, SID 0x0008: hi = 1<<63 | 1<<62 | 6<<32 | 8 = 0xC000_0006_0000_0008.
        let r = FaultRecord::decode(0x90_0000, 0xC000_0006_0000_0008);
        assert_eq!(
            r,
            FaultRecord {
                fault_addr: 0x90_0000,
                sid: 8,
                reason: 6,
                is_read: true,
                f: true
            }
        );
        // Write fault (T = 0), FR 5, SID 0x0110, not pending:
        // hi = 5<<32 | 0x110 = 0x0000_0005_0000_0110.
        let w = FaultRecord {
            fault_addr: 0x1234_5000,
            sid: 0x110,
            reason: 5,
            is_read: false,
            f: false,
        };
        assert_eq!(w.encode(), (0x1234_5000, 0x0000_0005_0000_0110));
        assert_eq!(
            FaultRecord::decode(0x90_0abc, 0xC000_0006_0000_0008).encode(),
            (0x90_0000, 0xC000_0006_0000_0008)
        );
    }
}
