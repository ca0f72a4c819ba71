//! 82540EM register offsets and bit positions.
//!
//! Every value here is taken from the Intel PCI/PCI-X Family of Gigabit Ethernet
//! Controllers Software Developer's Manual (8254x SDM, rev. 4.0), chapter 13
//! ("Register Descriptions") unless noted otherwise.

/// 8254x SDM 13.4.1: Device Control (CTRL).
pub const CTRL: usize = 0x0000;
/// 8254x SDM 13.4.2: Device Status (STATUS).
pub const STATUS: usize = 0x0008;
/// 8254x SDM 13.4.4: EEPROM Read (EERD).
pub const EERD: usize = 0x0014;
/// 8254x SDM 13.4.17: Interrupt Cause Read (ICR), clear on read.
pub const ICR: usize = 0x00C0;
/// 8254x SDM 13.4.21: Interrupt Mask Clear (IMC).
pub const IMC: usize = 0x00D8;
/// 8254x SDM 13.4.22: Receive Control (RCTL).
pub const RCTL: usize = 0x0100;
/// 8254x SDM 13.4.33: Transmit Control (TCTL).
pub const TCTL: usize = 0x0400;
/// 8254x SDM 13.4.34: Transmit Inter Packet Gap (TIPG).
pub const TIPG: usize = 0x0410;
/// 8254x SDM 13.4.27: Receive Descriptor Base Address Low (RDBAL).
pub const RDBAL: usize = 0x2800;
/// 8254x SDM 13.4.28: Receive Descriptor Base Address High (RDBAH).
pub const RDBAH: usize = 0x2804;
/// 8254x SDM 13.4.29: Receive Descriptor Length in bytes (RDLEN).
pub const RDLEN: usize = 0x2808;
/// 8254x SDM 13.4.30: Receive Descriptor Head (RDH).
pub const RDH: usize = 0x2810;
/// 8254x SDM 13.4.31: Receive Descriptor Tail (RDT).
pub const RDT: usize = 0x2818;
/// 8254x SDM 13.4.36: Transmit Descriptor Base Address Low (TDBAL).
pub const TDBAL: usize = 0x3800;
/// 8254x SDM 13.4.37: Transmit Descriptor Base Address High (TDBAH).
pub const TDBAH: usize = 0x3804;
/// 8254x SDM 13.4.38: Transmit Descriptor Length in bytes (TDLEN).
pub const TDLEN: usize = 0x3808;
/// 8254x SDM 13.4.39: Transmit Descriptor Head (TDH).
pub const TDH: usize = 0x3810;
/// 8254x SDM 13.4.40: Transmit Descriptor Tail (TDT).
pub const TDT: usize = 0x3818;
/// 8254x SDM 13.4.41: Transmit Interrupt Delay Value (TIDV).
pub const TIDV: usize = 0x3820;
/// 8254x SDM 13.5.1: Multicast Table Array, 128 dwords.
pub const MTA: usize = 0x5200;
/// 8254x SDM 13.5.2: Receive Address Low, entry 0 (RAL0).
pub const RAL0: usize = 0x5400;
/// 8254x SDM 13.5.3: Receive Address High, entry 0 (RAH0).
pub const RAH0: usize = 0x5404;

/// 8254x SDM 13.7: statistics registers, all clear on read.
pub mod stat {
    /// CRC Error Count (CRCERRS).
    pub const CRCERRS: usize = 0x4000;
    /// Missed Packets Count (MPC): no room in the receive FIFO/ring.
    pub const MPC: usize = 0x4010;
    /// Good Packets Received Count (GPRC).
    pub const GPRC: usize = 0x4074;
    /// Good Packets Transmitted Count (GPTC).
    pub const GPTC: usize = 0x4080;
    /// Receive No Buffers Count (RNBC).
    pub const RNBC: usize = 0x40A0;
}

/// CTRL bits (8254x SDM table 13-3).
pub mod ctrl {
    /// Full duplex.
    pub const FD: u32 = 1 << 0;
    /// Link reset.
    pub const LRST: u32 = 1 << 3;
    /// Auto-speed detection enable.
    pub const ASDE: u32 = 1 << 5;
    /// Set link up.
    pub const SLU: u32 = 1 << 6;
    /// Device reset; self-clearing.
    pub const RST: u32 = 1 << 26;
    /// PHY reset.
    pub const PHY_RST: u32 = 1 << 31;
}

/// STATUS bits (8254x SDM table 13-5).
pub mod status {
    /// Link up.
    pub const LU: u32 = 1 << 1;
}

/// EERD bits for the 82540EM (8254x SDM 13.4.4, table 13-7).
pub mod eerd {
    /// Start a read.
    pub const START: u32 = 1 << 0;
    /// Read done.
    pub const DONE: u32 = 1 << 4;
    /// Word address shift (bits 15:8).
    pub const ADDR_SHIFT: u32 = 8;
    /// Data shift (bits 31:16).
    pub const DATA_SHIFT: u32 = 16;
}

/// RCTL bits (8254x SDM table 13-67).
pub mod rctl {
    /// Receiver enable.
    pub const EN: u32 = 1 << 1;
    /// Store bad packets.
    pub const SBP: u32 = 1 << 2;
    /// Unicast promiscuous enable.
    pub const UPE: u32 = 1 << 3;
    /// Multicast promiscuous enable.
    pub const MPE: u32 = 1 << 4;
    /// Long packet enable.
    pub const LPE: u32 = 1 << 5;
    /// Broadcast accept mode.
    pub const BAM: u32 = 1 << 15;
    /// Buffer size field, bits 17:16; 00b with BSEX = 0 means 2048 bytes.
    pub const BSIZE_2048: u32 = 0b00 << 16;
    /// Buffer size extension.
    pub const BSEX: u32 = 1 << 25;
    /// Strip Ethernet CRC from incoming packets.
    pub const SECRC: u32 = 1 << 26;
}

/// TCTL bits (8254x SDM table 13-76).
pub mod tctl {
    /// Transmit enable.
    pub const EN: u32 = 1 << 1;
    /// Pad short packets.
    pub const PSP: u32 = 1 << 3;
    /// Collision threshold, bits 11:4.
    pub const CT_SHIFT: u32 = 4;
    /// Collision distance, bits 21:12.
    pub const COLD_SHIFT: u32 = 12;
    /// Recommended collision threshold (16 retries).
    pub const CT_DEFAULT: u32 = 0x10;
    /// Recommended collision distance for full duplex (64-byte times).
    pub const COLD_FULL_DUPLEX: u32 = 0x40;
}

/// TIPG fields (8254x SDM table 13-77): IPGT 9:0, IPGR1 19:10, IPGR2 29:20.
pub mod tipg {
    /// Recommended value for the 82540EM on copper: IPGT = 10, IPGR1 = 8, IPGR2 = 6.
    pub const COPPER_DEFAULT: u32 = 10 | (8 << 10) | (6 << 20);
}

/// RAH bits (8254x SDM table 13-91).
pub mod rah {
    /// Address valid.
    pub const AV: u32 = 1 << 31;
}
