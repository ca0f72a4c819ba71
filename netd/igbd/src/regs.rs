//! 82576 registers used by igbd, with the datasheet section that defines each
//! (Intel 82576EB GbE Controller Datasheet, chapter 8 "Programming Interface").

/// Device Control (§8.2.1).
pub const CTRL: usize = 0x0000;
/// Device Status (§8.2.2).
pub const STATUS: usize = 0x0008;
/// EEPROM Read (§8.2.4).
pub const EERD: usize = 0x0014;
/// MDI Control: PHY register access (§8.2, MDIC).
pub const MDIC: usize = 0x0020;
/// Interrupt Cause Read (§8.8.1).
pub const ICR: usize = 0x00C0;
/// Interrupt Mask Clear (§8.8.5).
pub const IMC: usize = 0x00D8;
/// Extended Interrupt Mask Clear (§8.8.11).
pub const EIMC: usize = 0x1528;
/// Receive Control (§8.10.1).
pub const RCTL: usize = 0x0100;
/// Transmit Control (§8.12.1).
pub const TCTL: usize = 0x0400;
/// Receive Checksum Control (§8.10.13).
pub const RXCSUM: usize = 0x5000;
/// Multicast Table Array, 128 registers (§8.10.15).
pub const MTA: usize = 0x5200;
/// Receive Address Low 0 (§8.10.16).
pub const RAL0: usize = 0x5400;
/// Receive Address High 0 (§8.10.17).
pub const RAH0: usize = 0x5404;
/// Multiple Receive Queues Command (§8.10.21).
pub const MRQC: usize = 0x5818;
/// Redirection Table, 32 registers (§8.10.22).
pub const RETA: usize = 0x5C00;
/// RSS Random Key, 10 registers (§8.10.23).
pub const RSSRK: usize = 0x5C80;

/// Receive queue n register block (§8.10.5-§8.10.11): queues 0-15 at 0xC000 + 0x40 n.
const RXQ: usize = 0xC000;
/// Transmit queue n register block (§8.12.7-§8.12.14): queues 0-15 at 0xE000 + 0x40 n.
const TXQ: usize = 0xE000;
const Q_STRIDE: usize = 0x40;

/// RX Descriptor Base Low n.
pub fn rdbal(n: u16) -> usize {
    RXQ + Q_STRIDE * usize::from(n)
}
/// RX Descriptor Base High n.
pub fn rdbah(n: u16) -> usize {
    rdbal(n) + 0x04
}
/// RX Descriptor Length n.
pub fn rdlen(n: u16) -> usize {
    rdbal(n) + 0x08
}
/// Split and Replication Receive Control n (§8.10.8).
pub fn srrctl(n: u16) -> usize {
    rdbal(n) + 0x0C
}
/// RX Descriptor Head n.
pub fn rdh(n: u16) -> usize {
    rdbal(n) + 0x10
}
/// RX Descriptor Tail n.
pub fn rdt(n: u16) -> usize {
    rdbal(n) + 0x18
}
/// Receive Descriptor Control n (§8.10.11).
pub fn rxdctl(n: u16) -> usize {
    rdbal(n) + 0x28
}
/// TX Descriptor Base Low n.
pub fn tdbal(n: u16) -> usize {
    TXQ + Q_STRIDE * usize::from(n)
}
/// TX Descriptor Base High n.
pub fn tdbah(n: u16) -> usize {
    tdbal(n) + 0x04
}
/// TX Descriptor Length n.
pub fn tdlen(n: u16) -> usize {
    tdbal(n) + 0x08
}
/// TX Descriptor Head n.
pub fn tdh(n: u16) -> usize {
    tdbal(n) + 0x10
}
/// TX Descriptor Tail n.
pub fn tdt(n: u16) -> usize {
    tdbal(n) + 0x18
}
/// Transmit Descriptor Control n (§8.12.13).
pub fn txdctl(n: u16) -> usize {
    tdbal(n) + 0x28
}

/// Statistics (§8.19), clear on read.
pub mod stat {
    /// CRC Error Count.
    pub const CRCERRS: usize = 0x4000;
    /// Missed Packets Count.
    pub const MPC: usize = 0x4010;
    /// Good Packets Received Count.
    pub const GPRC: usize = 0x4074;
    /// Good Packets Transmitted Count.
    pub const GPTC: usize = 0x4080;
    /// Receive No Buffers Count.
    pub const RNBC: usize = 0x40A0;
}

/// CTRL bits (§8.2.1).
pub mod ctrl {
    /// Set Link Up.
    pub const SLU: u32 = 1 << 6;
    /// Device reset (self-clearing).
    pub const RST: u32 = 1 << 26;
}
/// STATUS.LU: link up (§8.2.2).
pub const STATUS_LU: u32 = 1 << 1;
/// MDIC fields: DATA bits 15:0, REGADD bits 20:16, PHYADD bits 25:21, OP bits 27:26
/// (01b write, 10b read), R (ready) bit 28, E (error) bit 30.
pub mod mdic {
    /// Shift of the PHY register address.
    pub const REG_SHIFT: u32 = 16;
    /// The internal PHY's address, 1, in bits 25:21.
    pub const PHY_1: u32 = 1 << 21;
    /// OP = write.
    pub const OP_WRITE: u32 = 0b01 << 26;
    /// Ready.
    pub const READY: u32 = 1 << 28;
    /// Error.
    pub const ERROR: u32 = 1 << 30;
}
/// PHY Control register (IEEE 802.3 clause 22 register 0) and the value igbd writes:
/// auto-negotiation enable (bit 12) and restart (bit 9), full duplex (bit 8), 1000 Mb/s
/// (bit 6 set, bit 13 clear).
pub mod phy {
    /// PHY register 0, control.
    pub const CTRL: u32 = 0;
    /// AN enable | AN restart | full duplex | speed 1000.
    pub const CTRL_AUTONEG_RESTART: u32 = (1 << 12) | (1 << 9) | (1 << 8) | (1 << 6);
}
/// EERD fields (§8.2.4): START bit 0, DONE bit 1, ADDR bits 15:2, DATA bits 31:16.
pub mod eerd {
    /// Start a read.
    pub const START: u32 = 1 << 0;
    /// Read done.
    pub const DONE: u32 = 1 << 1;
    /// Shift of the word address.
    pub const ADDR_SHIFT: u32 = 2;
    /// Shift of the data.
    pub const DATA_SHIFT: u32 = 16;
}
/// RCTL bits (§8.10.1).
pub mod rctl {
    /// Receiver enable.
    pub const EN: u32 = 1 << 1;
    /// Unicast promiscuous.
    pub const UPE: u32 = 1 << 3;
    /// Multicast promiscuous.
    pub const MPE: u32 = 1 << 4;
    /// Broadcast accept.
    pub const BAM: u32 = 1 << 15;
    /// Strip the Ethernet CRC.
    pub const SECRC: u32 = 1 << 26;
}
/// TCTL bits (§8.12.1).
pub mod tctl {
    /// Transmit enable.
    pub const EN: u32 = 1 << 1;
    /// Pad short packets.
    pub const PSP: u32 = 1 << 3;
    /// Collision threshold 0x0F, bits 11:4.
    pub const CT_DEFAULT: u32 = 0x0F << 4;
    /// Collision distance 0x3F (full duplex), bits 21:12.
    pub const COLD_FD: u32 = 0x3F << 12;
}
/// RXCSUM.PCSD: packet checksum disable, so the write-back carries the RSS hash (§8.10.13).
pub const RXCSUM_PCSD: u32 = 1 << 13;
/// MRQC (§8.10.21): Multiple Receive Queues Enable = 010b (RSS only) and the hash
/// fields: IPv4/TCP bit 16, IPv4 bit 17, IPv4/UDP bit 22.
pub mod mrqc {
    /// MRQE = 010b, RSS.
    pub const RSS: u32 = 0b010;
    /// Hash TCP/IPv4.
    pub const TCP_IPV4: u32 = 1 << 16;
    /// Hash IPv4.
    pub const IPV4: u32 = 1 << 17;
    /// Hash UDP/IPv4.
    pub const UDP_IPV4: u32 = 1 << 22;
}
/// SRRCTL (§8.10.8): BSIZEPACKET bits 6:0 in KiB, DESCTYPE bits 27:25 (001b = advanced,
/// one buffer), Drop_En bit 31.
pub mod srrctl {
    /// Packet buffer size 2 KiB.
    pub const BSIZEPKT_2K: u32 = 2;
    /// DESCTYPE = advanced one buffer.
    pub const DESCTYPE_ADV_ONEBUF: u32 = 0b001 << 25;
    /// Drop packets when the queue has no descriptors (instead of stalling the others).
    pub const DROP_EN: u32 = 1 << 31;
}
/// RXDCTL.ENABLE / TXDCTL.ENABLE: queue enable (§8.10.11, §8.12.13).
pub const QUEUE_ENABLE: u32 = 1 << 25;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_registers_by_hand() {
        // Queue 0 at 0xC000 / 0xE000, queue 1 at + 0x40, queue 15 at + 0x3C0.
        assert_eq!(
            (rdbal(0), rdbah(0), rdlen(0), srrctl(0)),
            (0xC000, 0xC004, 0xC008, 0xC00C)
        );
        assert_eq!((rdh(0), rdt(0), rxdctl(0)), (0xC010, 0xC018, 0xC028));
        assert_eq!((rdbal(1), rdt(1), rxdctl(1)), (0xC040, 0xC058, 0xC068));
        assert_eq!(rdt(15), 0xC3D8);
        assert_eq!((tdbal(0), tdbah(0), tdlen(0)), (0xE000, 0xE004, 0xE008));
        assert_eq!((tdh(0), tdt(0), txdctl(0)), (0xE010, 0xE018, 0xE028));
        assert_eq!((tdbal(1), tdt(1), txdctl(1)), (0xE040, 0xE058, 0xE068));
    }

    #[test]
    fn control_values_by_hand() {
        // SRRCTL: 2 | 001b << 25 | 1 << 31 = 0x8200_0002.
        assert_eq!(
            srrctl::BSIZEPKT_2K | srrctl::DESCTYPE_ADV_ONEBUF | srrctl::DROP_EN,
            0x8200_0002
        );
        // MRQC for RSS over IPv4, TCP/IPv4, UDP/IPv4: 0x2 | 0x1_0000 | 0x2_0000 | 0x40_0000.
        assert_eq!(
            mrqc::RSS | mrqc::TCP_IPV4 | mrqc::IPV4 | mrqc::UDP_IPV4,
            0x0043_0002
        );
        // RCTL: EN | UPE | MPE | BAM | SECRC = 0x2 | 0x8 | 0x10 | 0x8000 | 0x400_0000.
        assert_eq!(
            rctl::EN | rctl::UPE | rctl::MPE | rctl::BAM | rctl::SECRC,
            0x0400_801A
        );
        // TCTL: EN | PSP | CT 0x0F << 4 | COLD 0x3F << 12 = 0x0003_F0FA.
        assert_eq!(
            tctl::EN | tctl::PSP | tctl::CT_DEFAULT | tctl::COLD_FD,
            0x0003_F0FA
        );
        assert_eq!(QUEUE_ENABLE, 0x0200_0000);
        assert_eq!(RXCSUM_PCSD, 0x2000);
        // MDIC write of 0x1340 to PHY 1 register 0: 0x1340 | 0 << 16 | 1 << 21 | 01b << 26.
        assert_eq!(phy::CTRL_AUTONEG_RESTART, 0x1340);
        assert_eq!(
            phy::CTRL_AUTONEG_RESTART
                | (phy::CTRL << mdic::REG_SHIFT)
                | mdic::PHY_1
                | mdic::OP_WRITE,
            0x0420_1340
        );
        assert_eq!((mdic::READY, mdic::ERROR), (0x1000_0000, 0x4000_0000));
    }
}
