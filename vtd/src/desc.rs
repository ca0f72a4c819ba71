//! 128-bit invalidation-queue descriptors (VT-d spec §6.5.2).

use crate::regs::Granularity;

/// §6.5.2.1 Context-cache invalidate descriptor type.
pub const TYPE_CC: u64 = 0x1;
/// §6.5.2.3 IOTLB invalidate descriptor type.
pub const TYPE_IOTLB: u64 = 0x2;
/// §6.5.2.5 Device-TLB invalidate descriptor type.
pub const TYPE_DEVTLB: u64 = 0x3;
/// §6.5.2.7 Interrupt entry cache invalidate descriptor type.
pub const TYPE_IEC: u64 = 0x4;
/// §6.5.2.8 Invalidation wait descriptor type.
pub const TYPE_WAIT: u64 = 0x5;

/// Bytes per (128-bit) descriptor in the queue.
pub const DESC_BYTES: usize = 16;

// §6.5.2.3 IOTLB descriptor, low qword.
const IOTLB_DW: u64 = 1 << 6;
const IOTLB_DR: u64 = 1 << 7;
// §6.5.2.3 IOTLB descriptor, high qword.
const IOTLB_IH: u64 = 1 << 6;
// §6.5.2.8 Wait descriptor, low qword.
const WAIT_IF: u64 = 1 << 4;
const WAIT_SW: u64 = 1 << 5;
const WAIT_FN: u64 = 1 << 6;

/// One 128-bit invalidation descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Descriptor {
    /// Bits 63:0.
    pub lo: u64,
    /// Bits 127:64.
    pub hi: u64,
}

/// A descriptor decoded into its fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decoded {
    /// Context-cache invalidate.
    ContextCache {
        /// Granularity (global / domain / device).
        g: Granularity,
        /// Domain id (domain- and device-selective).
        did: u16,
        /// Source id (device-selective).
        sid: u16,
        /// Function mask (device-selective).
        fm: u8,
    },
    /// IOTLB invalidate.
    Iotlb {
        /// Granularity (global / domain / page).
        g: Granularity,
        /// Domain id.
        did: u16,
        /// Page-aligned address (page-selective).
        addr: u64,
        /// Address mask: 2^am pages (page-selective).
        am: u8,
        /// Invalidation hint: leaf entries only, keep paging-structure caches.
        ih: bool,
        /// Drain reads.
        dr: bool,
        /// Drain writes.
        dw: bool,
    },
    /// Device-TLB invalidate (not interpreted further).
    DevTlb,
    /// Interrupt entry cache invalidate (not interpreted further).
    Iec,
    /// Invalidation wait.
    Wait {
        /// Physical address the status is written to (4-byte aligned).
        status_addr: u64,
        /// 32-bit status value written when SW is set.
        status_data: u32,
        /// Interrupt flag: set ICS.IWC (and signal) on completion.
        intr: bool,
        /// Status write.
        sw: bool,
        /// Fence: later descriptors wait for this one.
        fence: bool,
    },
    /// Unknown type or reserved granularity.
    Invalid,
}

impl Descriptor {
    /// §6.5.2.1 Context-cache invalidate: type 1 (3:0), G 5:4, DID 31:16,
    /// SID 47:32, FM 49:48.
    fn cc(g: Granularity, did: u16, sid: u16, fm: u8) -> Self {
        let lo = TYPE_CC
            | ((g as u64) << 4)
            | (u64::from(did) << 16)
            | (u64::from(sid) << 32)
            | ((u64::from(fm) & 3) << 48);
        Self { lo, hi: 0 }
    }

    /// Global context-cache invalidation.
    pub fn cc_global() -> Self {
        Self::cc(Granularity::Global, 0, 0, 0)
    }

    /// Domain-selective context-cache invalidation.
    pub fn cc_domain(did: u16) -> Self {
        Self::cc(Granularity::Domain, did, 0, 0)
    }

    /// Device-selective context-cache invalidation (`did` is the domain the
    /// context entry had; FM masks low bits of the function number).
    pub fn cc_device(did: u16, sid: u16, fm: u8) -> Self {
        Self::cc(Granularity::Selective, did, sid, fm)
    }

    /// §6.5.2.3 IOTLB invalidate: type 2 (3:0), G 5:4, DW 6, DR 7,
    /// DID 31:16; high qword ADDR 63:12, IH 6, AM 5:0.
    fn iotlb(g: Granularity, did: u16, hi: u64, dr: bool, dw: bool) -> Self {
        let lo = TYPE_IOTLB
            | ((g as u64) << 4)
            | if dw { IOTLB_DW } else { 0 }
            | if dr { IOTLB_DR } else { 0 }
            | (u64::from(did) << 16);
        Self { lo, hi }
    }

    /// Global IOTLB invalidation. Set `dr`/`dw` when CAP.DRD/DWD are set
    /// (as Linux does).
    pub fn iotlb_global(dr: bool, dw: bool) -> Self {
        Self::iotlb(Granularity::Global, 0, 0, dr, dw)
    }

    /// Domain-selective IOTLB invalidation.
    pub fn iotlb_domain(did: u16, dr: bool, dw: bool) -> Self {
        Self::iotlb(Granularity::Domain, did, 0, dr, dw)
    }

    /// Page-selective-within-domain IOTLB invalidation of 2^`am` pages at
    /// `addr` (which should be aligned to that size). `ih` = leaf entries
    /// only (keeps paging-structure caches).
    pub fn iotlb_page(did: u16, addr: u64, am: u8, ih: bool, dr: bool, dw: bool) -> Self {
        let hi = (addr & !0xFFF) | if ih { IOTLB_IH } else { 0 } | (u64::from(am) & 0x3F);
        Self::iotlb(Granularity::Selective, did, hi, dr, dw)
    }

    /// §6.5.2.8 Invalidation wait: type 5 (3:0), IF 4, SW 5, FN 6, status
    /// data 63:32; high qword status address 63:2.
    pub fn wait(status_addr: u64, status_data: u32, intr: bool, sw: bool, fence: bool) -> Self {
        let lo = TYPE_WAIT
            | if intr { WAIT_IF } else { 0 }
            | if sw { WAIT_SW } else { 0 }
            | if fence { WAIT_FN } else { 0 }
            | (u64::from(status_data) << 32);
        Self {
            lo,
            hi: status_addr & !3,
        }
    }

    /// The type field, bits 3:0.
    pub fn ty(&self) -> u64 {
        self.lo & 0xF
    }

    /// Decode into fields.
    pub fn decode(&self) -> Decoded {
        let (lo, hi) = (self.lo, self.hi);
        let g = Granularity::from_bits(lo >> 4);
        match (self.ty(), g) {
            (TYPE_CC, Some(g)) => Decoded::ContextCache {
                g,
                did: (lo >> 16) as u16,
                sid: (lo >> 32) as u16,
                fm: ((lo >> 48) & 3) as u8,
            },
            (TYPE_IOTLB, Some(g)) => Decoded::Iotlb {
                g,
                did: (lo >> 16) as u16,
                addr: hi & !0xFFF,
                am: (hi & 0x3F) as u8,
                ih: hi & IOTLB_IH != 0,
                dr: lo & IOTLB_DR != 0,
                dw: lo & IOTLB_DW != 0,
            },
            (TYPE_DEVTLB, _) => Decoded::DevTlb,
            (TYPE_IEC, _) => Decoded::Iec,
            (TYPE_WAIT, _) => Decoded::Wait {
                status_addr: hi & !3,
                status_data: (lo >> 32) as u32,
                intr: lo & WAIT_IF != 0,
                sw: lo & WAIT_SW != 0,
                fence: lo & WAIT_FN != 0,
            },
            _ => Decoded::Invalid,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_cache() {
        // Global: type 1 | G 1<<4 = 0x10 -> 0x11.
        assert_eq!(Descriptor::cc_global(), Descriptor { lo: 0x11, hi: 0 });
        // Domain 0x1234: 1 | 2<<4 = 0x21 | 0x1234<<16 = 0x1234_0000 -> 0x1234_0021.
        assert_eq!(Descriptor::cc_domain(0x1234).lo, 0x1234_0021);
        // Device did 5, sid 0x0108, fm 2: 1 | 3<<4 (0x30) | 5<<16 (0x5_0000) |
        // 0x108<<32 (0x108_0000_0000) | 2<<48 (0x2_0000_0000_0000)
        // -> 0x0002_0108_0005_0031.
        let d = Descriptor::cc_device(5, 0x0108, 2);
        assert_eq!(d.lo, 0x0002_0108_0005_0031);
        assert_eq!(
            d.decode(),
            Decoded::ContextCache {
                g: Granularity::Selective,
                did: 5,
                sid: 0x108,
                fm: 2
            }
        );
    }

    #[test]
    fn iotlb() {
        // Page-selective did 5, addr 0x1234_5000, am 2, ih 1, no drains:
        // lo = 0x2 | 3<<4 (0x30) | 5<<16 (0x5_0000) = 0x5_0032;
        // hi = 0x1234_5000 | 1<<6 (0x40) | 2 = 0x1234_5042.
        let d = Descriptor::iotlb_page(5, 0x1234_5000, 2, true, false, false);
        assert_eq!(
            d,
            Descriptor {
                lo: 0x5_0032,
                hi: 0x1234_5042
            }
        );
        // With DR (1<<7 = 0x80) and DW (1<<6 = 0x40): 0x5_0032 | 0xC0 = 0x5_00F2.
        let d2 = Descriptor::iotlb_page(5, 0x1234_5000, 2, true, true, true);
        assert_eq!(d2.lo, 0x5_00F2);
        assert_eq!(
            d2.decode(),
            Decoded::Iotlb {
                g: Granularity::Selective,
                did: 5,
                addr: 0x1234_5000,
                am: 2,
                ih: true,
                dr: true,
                dw: true
            }
        );
        // Global: 0x2 | 1<<4 = 0x12. Domain 0xFFFF: 0x2 | 2<<4 | 0xFFFF<<16
        // = 0xFFFF_0022.
        assert_eq!(
            Descriptor::iotlb_global(false, false),
            Descriptor { lo: 0x12, hi: 0 }
        );
        assert_eq!(
            Descriptor::iotlb_domain(0xFFFF, false, false).lo,
            0xFFFF_0022
        );
    }

    #[test]
    fn wait() {
        // status addr 0x9000, data 0xDEAD_BEEF, SW + FN, no IF:
        // lo = 0x5 | 1<<5 (0x20) | 1<<6 (0x40) | 0xDEAD_BEEF<<32
        //    = 0xDEAD_BEEF_0000_0065; hi = 0x9000.
        let d = Descriptor::wait(0x9000, 0xDEAD_BEEF, false, true, true);
        assert_eq!(
            d,
            Descriptor {
                lo: 0xDEAD_BEEF_0000_0065,
                hi: 0x9000
            }
        );
        // IF only: 0x5 | 1<<4 = 0x15.
        assert_eq!(Descriptor::wait(0, 0, true, false, false).lo, 0x15);
        assert_eq!(
            d.decode(),
            Decoded::Wait {
                status_addr: 0x9000,
                status_data: 0xDEAD_BEEF,
                intr: false,
                sw: true,
                fence: true
            }
        );
    }

    #[test]
    fn invalid() {
        // Type 0 and types 6..15 are invalid; CC/IOTLB with G = 0 too.
        assert_eq!(Descriptor { lo: 0, hi: 0 }.decode(), Decoded::Invalid);
        assert_eq!(Descriptor { lo: 0x7, hi: 0 }.decode(), Decoded::Invalid);
        assert_eq!(Descriptor { lo: 0x1, hi: 0 }.decode(), Decoded::Invalid);
        assert_eq!(Descriptor { lo: 0x2, hi: 0 }.decode(), Decoded::Invalid);
        assert_eq!(Descriptor { lo: 0x3, hi: 0 }.decode(), Decoded::DevTlb);
        assert_eq!(Descriptor { lo: 0x4, hi: 0 }.decode(), Decoded::Iec);
    }
}
