//! Translation-structure entries: root, context and second-level page-table
//! entries (VT-d spec §9.1, §9.3, §9.8), all legacy-mode (not scalable mode).

/// Entries in every root table, context table and page-table page.
pub const ENTRIES_PER_TABLE: usize = 512;

/// Bytes in a root or context entry.
pub const ROOT_ENTRY_BYTES: usize = 16;
/// Bytes in a root or context entry.
pub const CONTEXT_ENTRY_BYTES: usize = 16;
/// Bytes in a second-level page-table entry.
pub const PTE_BYTES: usize = 8;

const ADDR_63_12: u64 = !0xFFF;

/// Index of `iova` in a table at `level` (1 = leaf table, whose entries map
/// 4 KiB pages; each level above consumes 9 more bits above the 12-bit page
/// offset). §3.7, Figure 3-8 / 3-9.
pub fn level_index(iova: u64, level: u8) -> usize {
    let shift = 12 + 9 * u32::from(level.saturating_sub(1));
    ((iova >> shift) & 0x1FF) as usize
}

/// Bytes mapped by one entry at `level` (1 = 4 KiB, 2 = 2 MiB, 3 = 1 GiB).
pub fn level_size(level: u8) -> u64 {
    1u64 << (12 + 9 * u32::from(level.saturating_sub(1)))
}

/// Root table index of a requester id: its bus number.
pub fn root_index(sid: u16) -> usize {
    usize::from(sid >> 8)
}

/// Context table index of a requester id: its devfn.
pub fn context_index(sid: u16) -> usize {
    usize::from(sid & 0xFF)
}

/// §9.1 Root entry (legacy mode, 128 bits): P bit 0, context-table pointer
/// 63:12 of the low qword; the high qword is reserved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RootEntry(pub u128);

impl RootEntry {
    /// A present root entry pointing at the context table at `ctp`.
    pub fn new(ctp: u64) -> Self {
        Self(u128::from((ctp & ADDR_63_12) | 1))
    }
    /// Build from the two qwords as read from memory.
    pub fn from_qwords(lo: u64, hi: u64) -> Self {
        Self(u128::from(lo) | (u128::from(hi) << 64))
    }
    /// Low qword.
    pub fn lo(self) -> u64 {
        self.0 as u64
    }
    /// High qword.
    pub fn hi(self) -> u64 {
        (self.0 >> 64) as u64
    }
    /// P, bit 0.
    pub fn present(self) -> bool {
        self.lo() & 1 != 0
    }
    /// Context-table pointer, bits 63:12.
    pub fn ctp(self) -> u64 {
        self.lo() & ADDR_63_12
    }
}

/// Translation type of a context entry (§9.3, TT bits 3:2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TranslationType {
    /// 0: untranslated requests are translated through the second-level tables.
    Translate = 0,
    /// 1: device-TLB translation also allowed.
    TranslateDevTlb = 1,
    /// 2: pass-through (iova is the physical address).
    PassThrough = 2,
    /// 3: reserved.
    Reserved = 3,
}

/// Address width encoding of a context entry (§9.3, AW bits 66:64).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddressWidth {
    /// AW 1: 39-bit, 3-level tables.
    Aw39 = 1,
    /// AW 2: 48-bit, 4-level tables.
    Aw48 = 2,
}

impl AddressWidth {
    /// Page-table levels.
    pub fn levels(self) -> u8 {
        match self {
            Self::Aw39 => 3,
            Self::Aw48 => 4,
        }
    }
    /// Input address bits.
    pub fn bits(self) -> u8 {
        match self {
            Self::Aw39 => 39,
            Self::Aw48 => 48,
        }
    }
    /// From the 3-bit AW field; other values are not supported here.
    pub fn from_field(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Aw39),
            2 => Some(Self::Aw48),
            _ => None,
        }
    }
    /// From a number of page-table levels (3 or 4).
    pub fn from_levels(levels: u8) -> Option<Self> {
        match levels {
            3 => Some(Self::Aw39),
            4 => Some(Self::Aw48),
            _ => None,
        }
    }
}

/// §9.3 Context entry (legacy mode, 128 bits). Low qword: P 0, FPD 1, TT 3:2,
/// SLPTPTR 63:12. High qword: AW 2:0, DID 23:8.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ContextEntry(pub u128);

impl ContextEntry {
    /// A present context entry translating through the tables at `slptptr`.
    pub fn translated(slptptr: u64, aw: AddressWidth, did: u16) -> Self {
        let lo = (slptptr & ADDR_63_12) | 1;
        let hi = (aw as u64) | (u64::from(did) << 8);
        Self::from_qwords(lo, hi)
    }
    /// A present pass-through context entry (TT = 2). §9.3: AW must still
    /// hold a supported value.
    pub fn pass_through(aw: AddressWidth, did: u16) -> Self {
        let lo = ((TranslationType::PassThrough as u64) << 2) | 1;
        let hi = (aw as u64) | (u64::from(did) << 8);
        Self::from_qwords(lo, hi)
    }
    /// Build from the two qwords as read from memory.
    pub fn from_qwords(lo: u64, hi: u64) -> Self {
        Self(u128::from(lo) | (u128::from(hi) << 64))
    }
    /// Same entry with FPD (fault processing disable, bit 1) set or clear.
    pub fn with_fpd(self, fpd: bool) -> Self {
        let lo = (self.lo() & !2) | (u64::from(fpd) << 1);
        Self::from_qwords(lo, self.hi())
    }
    /// Low qword.
    pub fn lo(self) -> u64 {
        self.0 as u64
    }
    /// High qword.
    pub fn hi(self) -> u64 {
        (self.0 >> 64) as u64
    }
    /// P, bit 0.
    pub fn present(self) -> bool {
        self.lo() & 1 != 0
    }
    /// FPD, bit 1: fault processing disabled (faults are not recorded).
    pub fn fpd(self) -> bool {
        self.lo() & 2 != 0
    }
    /// TT, bits 3:2.
    pub fn tt(self) -> TranslationType {
        match (self.lo() >> 2) & 3 {
            0 => TranslationType::Translate,
            1 => TranslationType::TranslateDevTlb,
            2 => TranslationType::PassThrough,
            _ => TranslationType::Reserved,
        }
    }
    /// SLPTPTR, bits 63:12.
    pub fn slptptr(self) -> u64 {
        self.lo() & ADDR_63_12
    }
    /// AW field, bits 66:64 (high qword 2:0).
    pub fn aw_field(self) -> u8 {
        (self.hi() & 7) as u8
    }
    /// AW decoded, if supported.
    pub fn aw(self) -> Option<AddressWidth> {
        AddressWidth::from_field(self.aw_field())
    }
    /// DID, bits 87:72 (high qword 23:8).
    pub fn did(self) -> u16 {
        (self.hi() >> 8) as u16
    }
}

/// §9.8 Second-level paging entry: R bit 0, W bit 1, SP bit 7 (superpage,
/// in level-2/3 entries), SNP bit 11, address 51:12. An entry with neither R
/// nor W is not present.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SlPte(pub u64);

impl SlPte {
    /// R, bit 0.
    pub const R: u64 = 1 << 0;
    /// W, bit 1.
    pub const W: u64 = 1 << 1;
    /// SP, bit 7.
    pub const SP: u64 = 1 << 7;
    /// SNP, bit 11.
    pub const SNP: u64 = 1 << 11;
    /// Address bits 51:12.
    pub const ADDR_MASK: u64 = 0x000F_FFFF_FFFF_F000;

    /// An entry pointing at a page (leaf) or next-level table (non-leaf).
    pub fn new(addr: u64, read: bool, write: bool) -> Self {
        Self(
            (addr & Self::ADDR_MASK)
                | if read { Self::R } else { 0 }
                | if write { Self::W } else { 0 },
        )
    }
    /// A non-leaf entry pointing at a next-level table, R and W both set
    /// (permissions are cumulative across levels, §3.7.1).
    pub fn table(addr: u64) -> Self {
        Self::new(addr, true, true)
    }
    /// A superpage leaf (level 2 = 2 MiB, level 3 = 1 GiB).
    pub fn superpage(addr: u64, read: bool, write: bool) -> Self {
        Self(Self::new(addr, read, write).0 | Self::SP)
    }
    /// Same entry with SNP set or clear.
    pub fn with_snp(self, snp: bool) -> Self {
        Self((self.0 & !Self::SNP) | if snp { Self::SNP } else { 0 })
    }
    /// R bit.
    pub fn read(self) -> bool {
        self.0 & Self::R != 0
    }
    /// W bit.
    pub fn write(self) -> bool {
        self.0 & Self::W != 0
    }
    /// Present: R or W set.
    pub fn present(self) -> bool {
        self.0 & (Self::R | Self::W) != 0
    }
    /// SP bit.
    pub fn sp(self) -> bool {
        self.0 & Self::SP != 0
    }
    /// SNP bit.
    pub fn snp(self) -> bool {
        self.0 & Self::SNP != 0
    }
    /// Address, bits 51:12.
    pub fn addr(self) -> u64 {
        self.0 & Self::ADDR_MASK
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_entry() {
        // ctp 0x12_3000 | P -> lo 0x12_3001, hi 0.
        let r = RootEntry::new(0x12_3456);
        assert_eq!(r.0, 0x12_3001);
        assert_eq!((r.lo(), r.hi()), (0x12_3001, 0));
        assert!(r.present());
        assert_eq!(r.ctp(), 0x12_3000);
        assert!(!RootEntry::default().present());
    }

    #[test]
    fn context_entry() {
        // SLPTPTR 0xABC_D000 | P -> lo 0xABC_D001; AW 1 | DID 0x42<<8 = 0x4200
        // -> hi 0x4201.
        let c = ContextEntry::translated(0xABC_D000, AddressWidth::Aw39, 0x42);
        assert_eq!(c.lo(), 0xABC_D001);
        assert_eq!(c.hi(), 0x4201);
        assert_eq!(c.0, (0x4201u128 << 64) | 0xABC_D001);
        assert!(c.present() && !c.fpd());
        assert_eq!(c.tt(), TranslationType::Translate);
        assert_eq!(c.slptptr(), 0xABC_D000);
        assert_eq!(c.aw(), Some(AddressWidth::Aw39));
        assert_eq!(c.did(), 0x42);
        // Pass-through: TT 2<<2 = 0x8 | P -> lo 0x9; AW 2 | DID 0xFFFF<<8
        // -> hi 0xFF_FF02.
        let p = ContextEntry::pass_through(AddressWidth::Aw48, 0xFFFF);
        assert_eq!((p.lo(), p.hi()), (0x9, 0xFF_FF02));
        assert_eq!(p.tt(), TranslationType::PassThrough);
        assert_eq!(p.did(), 0xFFFF);
        // FPD bit 1: 0x9 | 0x2 = 0xB.
        assert_eq!(p.with_fpd(true).lo(), 0xB);
        assert!(p.with_fpd(true).fpd());
    }

    #[test]
    fn sl_pte() {
        // addr 0x8_7654_3000 | W (0x2) | R (0x1) -> 0x8_7654_3003.
        let e = SlPte::new(0x8_7654_3000, true, true);
        assert_eq!(e.0, 0x8_7654_3003);
        // Read-only: 0x1000 | 1 = 0x1001.
        assert_eq!(SlPte::new(0x1000, true, false).0, 0x1001);
        // 2 MiB superpage at 0x20_0000, RW: 0x20_0000 | 0x80 | 0x3 = 0x20_0083.
        let s = SlPte::superpage(0x20_0000, true, true);
        assert_eq!(s.0, 0x20_0083);
        assert!(s.sp());
        // SNP bit 11 = 0x800.
        assert_eq!(SlPte::new(0x1000, false, true).with_snp(true).0, 0x1802);
        // Address bits above 51 are dropped: 0xFFF0_0000_0000_1000 -> 0x1000.
        assert_eq!(
            SlPte::new(0xFFF0_0000_0000_1000, true, false).addr(),
            0x1000
        );
        assert!(!SlPte(0x1000).present());
    }

    #[test]
    fn indices() {
        // iova 0x7F_C020_3000: bits 20:12 = 0x203 & 0x1FF = 3;
        // bits 29:21 = (0x7F_C020_3000 >> 21) & 0x1FF = 0x3FE01 & 0x1FF = 1;
        // bits 38:30 = (>> 30) & 0x1FF = 0x1FF; bits 47:39 = 0.
        let iova = 0x7F_C020_3000;
        assert_eq!(level_index(iova, 1), 3);
        assert_eq!(level_index(iova, 2), 1);
        assert_eq!(level_index(iova, 3), 0x1FF);
        assert_eq!(level_index(iova, 4), 0);
        assert_eq!(level_index(1 << 39, 4), 1);
        assert_eq!(level_size(2), 0x20_0000);
        assert_eq!(root_index(0x0110), 1);
        assert_eq!(context_index(0x0110), 0x10);
    }
}
