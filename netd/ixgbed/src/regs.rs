//! 82599 registers used by ixgbed, with the datasheet section that defines each
//! (Intel 82599 10 GbE Controller Datasheet, chapter 8 "Programming Interface",
//! section 8.2.3). Every value is checked against one worked out by hand in the tests.

/// Device Control (§8.2.3.1.1).
pub const CTRL: usize = 0x0_0000;
/// Device Status (§8.2.3.1.2).
pub const STATUS: usize = 0x0_0008;
/// Extended Device Control (§8.2.3.1.3).
pub const CTRL_EXT: usize = 0x0_0018;
/// EEPROM/Flash Control (§8.2.3.2.1).
pub const EEC: usize = 0x1_0010;
/// Extended Interrupt Cause Read (§8.2.3.5.1).
pub const EICR: usize = 0x0_0800;
/// Extended Interrupt Mask Clear (§8.2.3.5.4).
pub const EIMC: usize = 0x0_0888;
/// Receive DMA Control (§8.2.3.8.8).
pub const RDRXCTL: usize = 0x0_2F00;
/// Receive Control (§8.2.3.8.10).
pub const RXCTRL: usize = 0x0_3000;
/// MAC Core Control 0 (§8.2.3.22.8).
pub const HLREG0: usize = 0x0_4240;
/// Auto-Negotiation Control (§8.2.3.22.19).
pub const AUTOC: usize = 0x0_42A0;
/// Link Status (§8.2.3.22.20).
pub const LINKS: usize = 0x0_42A4;
/// DCB Transmit Descriptor Plane Control and Status (§8.2.3.10.2).
pub const RTTDCS: usize = 0x0_4900;
/// DMA Tx Control (§8.2.3.9.2).
pub const DMATXCTL: usize = 0x0_4A80;
/// Receive Checksum Control (§8.2.3.7.5).
pub const RXCSUM: usize = 0x0_5000;
/// Filter Control (§8.2.3.7.1).
pub const FCTRL: usize = 0x0_5080;
/// Multicast Table Array, 128 registers (§8.2.3.7.7).
pub const MTA: usize = 0x0_5200;
/// Receive Address Low 0 (§8.2.3.7.8).
pub const RAL0: usize = 0x0_A200;
/// Receive Address High 0 (§8.2.3.7.9).
pub const RAH0: usize = 0x0_A204;
/// Multiple Transmit Queues Command (§8.2.3.9.15).
pub const MTQC: usize = 0x0_8120;
/// Redirection Table, 32 registers (§8.2.3.7.13).
pub const RETA: usize = 0x0_EB00;
/// RSS Random Key, 10 registers (§8.2.3.7.14).
pub const RSSRK: usize = 0x0_EB80;
/// Multiple Receive Queues Command (§8.2.3.7.12).
pub const MRQC: usize = 0x0_EC80;

/// Queues 0-63 of each direction, register blocks 0x40 apart (§8.2.3.8.1-§8.2.3.8.7,
/// §8.2.3.9.5-§8.2.3.9.10).
const Q_STRIDE: usize = 0x40;

/// RX Descriptor Base Address Low n (§8.2.3.8.1): 0x01000 + 0x40 n.
pub fn rdbal(n: u16) -> usize {
    0x0_1000 + Q_STRIDE * usize::from(n)
}
/// RX Descriptor Base Address High n (§8.2.3.8.2).
pub fn rdbah(n: u16) -> usize {
    rdbal(n) + 0x04
}
/// RX Descriptor Length n (§8.2.3.8.3).
pub fn rdlen(n: u16) -> usize {
    rdbal(n) + 0x08
}
/// RX Descriptor Head n (§8.2.3.8.4).
pub fn rdh(n: u16) -> usize {
    rdbal(n) + 0x10
}
/// Split Receive Control n (§8.2.3.8.7).
pub fn srrctl(n: u16) -> usize {
    rdbal(n) + 0x14
}
/// RX Descriptor Tail n (§8.2.3.8.5).
pub fn rdt(n: u16) -> usize {
    rdbal(n) + 0x18
}
/// Receive Descriptor Control n (§8.2.3.8.6).
pub fn rxdctl(n: u16) -> usize {
    rdbal(n) + 0x28
}
/// TX Descriptor Base Address Low n (§8.2.3.9.5): 0x06000 + 0x40 n.
pub fn tdbal(n: u16) -> usize {
    0x0_6000 + Q_STRIDE * usize::from(n)
}
/// TX Descriptor Base Address High n (§8.2.3.9.6).
pub fn tdbah(n: u16) -> usize {
    tdbal(n) + 0x04
}
/// TX Descriptor Length n (§8.2.3.9.7).
pub fn tdlen(n: u16) -> usize {
    tdbal(n) + 0x08
}
/// TX Descriptor Head n (§8.2.3.9.8).
pub fn tdh(n: u16) -> usize {
    tdbal(n) + 0x10
}
/// TX Descriptor Tail n (§8.2.3.9.9).
pub fn tdt(n: u16) -> usize {
    tdbal(n) + 0x18
}
/// Transmit Descriptor Control n (§8.2.3.9.10).
pub fn txdctl(n: u16) -> usize {
    tdbal(n) + 0x28
}

/// Statistics (§8.2.3.23), clear on read.
pub mod stat {
    /// CRC Error Count.
    pub const CRCERRS: usize = 0x0_4000;
    /// Good Packets Received Count.
    pub const GPRC: usize = 0x0_4074;
    /// Good Packets Transmitted Count.
    pub const GPTC: usize = 0x0_4080;
    /// Missed Packets Count, packet buffer 0.
    pub const MPC0: usize = 0x0_3FA0;
}

/// CTRL bits (§8.2.3.1.1).
pub mod ctrl {
    /// Link reset.
    pub const LRST: u32 = 1 << 3;
    /// Device reset (self-clearing).
    pub const RST: u32 = 1 << 26;
    /// Both, as §4.6.3.2 recommends for a global reset.
    pub const RESET: u32 = RST | LRST;
}
/// CTRL_EXT.NS_DIS: no-snoop disable (§8.2.3.1.3).
pub const CTRL_EXT_NS_DIS: u32 = 1 << 16;
/// EEC.ARD: EEPROM auto-read done (§8.2.3.2.1).
pub const EEC_ARD: u32 = 1 << 9;
/// RDRXCTL bits (§8.2.3.8.8): CRCStrip bit 1, DMAIDONE bit 3.
pub mod rdrxctl {
    /// Strip the CRC (must match HLREG0.RXCRCSTRP).
    pub const CRC_STRIP: u32 = 1 << 1;
    /// DMA initialisation done.
    pub const DMAIDONE: u32 = 1 << 3;
}
/// RXCTRL.RXEN: receive enable (§8.2.3.8.10).
pub const RXCTRL_RXEN: u32 = 1 << 0;
/// HLREG0 bits (§8.2.3.22.8): TXCRCEN bit 0, RXCRCSTRP bit 1, TXPADEN bit 10.
pub mod hlreg0 {
    /// Append the CRC to transmitted frames.
    pub const TXCRCEN: u32 = 1 << 0;
    /// Strip the CRC of received frames.
    pub const RXCRCSTRP: u32 = 1 << 1;
    /// Pad short transmitted frames.
    pub const TXPADEN: u32 = 1 << 10;
}
/// AUTOC.Restart_AN: restart auto-negotiation (§8.2.3.22.19, bit 12).
pub const AUTOC_RESTART_AN: u32 = 1 << 12;
/// LINKS.Link Up (§8.2.3.22.20, bit 30).
pub const LINKS_UP: u32 = 1 << 30;
/// RTTDCS.ARBDIS: disable the TX descriptor arbiter while MTQC changes (§8.2.3.10.2,
/// bit 6; §4.6.11.3.4).
pub const RTTDCS_ARBDIS: u32 = 1 << 6;
/// DMATXCTL.TE: transmit enable (§8.2.3.9.2).
pub const DMATXCTL_TE: u32 = 1 << 0;
/// MTQC = 0: no DCB, no virtualisation, 64 TX queues (§8.2.3.9.15).
pub const MTQC_64Q: u32 = 0;
/// RXCSUM.PCSD: the write-back carries the RSS hash (§8.2.3.7.5, bit 13).
pub const RXCSUM_PCSD: u32 = 1 << 13;
/// FCTRL bits (§8.2.3.7.1): MPE bit 8, UPE bit 9, BAM bit 10.
pub mod fctrl {
    /// Multicast promiscuous.
    pub const MPE: u32 = 1 << 8;
    /// Unicast promiscuous.
    pub const UPE: u32 = 1 << 9;
    /// Accept broadcast.
    pub const BAM: u32 = 1 << 10;
}
/// MRQC (§8.2.3.7.12): MRQE bits 3:0 = 0001b (RSS only), field enables TcpIPv4 bit 16,
/// IPv4 bit 17, UdpIPv4 bit 22.
pub mod mrqc {
    /// MRQE = RSS.
    pub const RSS: u32 = 0b0001;
    /// Hash TCP/IPv4.
    pub const TCP_IPV4: u32 = 1 << 16;
    /// Hash IPv4.
    pub const IPV4: u32 = 1 << 17;
    /// Hash UDP/IPv4.
    pub const UDP_IPV4: u32 = 1 << 22;
}
/// SRRCTL (§8.2.3.8.7): BSIZEPACKET bits 4:0 in KiB, DESCTYPE bits 27:25 (001b =
/// advanced one buffer), DROP_EN bit 28.
pub mod srrctl {
    /// 2 KiB packet buffers.
    pub const BSIZEPKT_2K: u32 = 2;
    /// Advanced descriptors, one buffer.
    pub const DESCTYPE_ADV_ONEBUF: u32 = 0b001 << 25;
    /// Drop when the queue has no descriptors.
    pub const DROP_EN: u32 = 1 << 28;
}
/// RXDCTL.ENABLE / TXDCTL.ENABLE (§8.2.3.8.6, §8.2.3.9.10, bit 25).
pub const QUEUE_ENABLE: u32 = 1 << 25;
/// RAH.AV: address valid (§8.2.3.7.9, bit 31).
pub const RAH_AV: u32 = 1 << 31;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_offsets_by_hand() {
        // Values from the datasheet's register summary (table 8-2 area), typed here.
        let table: [(usize, usize); 25] = [
            (CTRL, 0x00000),
            (STATUS, 0x00008),
            (CTRL_EXT, 0x00018),
            (EEC, 0x10010),
            (EICR, 0x00800),
            (EIMC, 0x00888),
            (RDRXCTL, 0x02F00),
            (RXCTRL, 0x03000),
            (HLREG0, 0x04240),
            (AUTOC, 0x042A0),
            (LINKS, 0x042A4),
            (RTTDCS, 0x04900),
            (DMATXCTL, 0x04A80),
            (RXCSUM, 0x05000),
            (FCTRL, 0x05080),
            (MTA, 0x05200),
            (RAL0, 0x0A200),
            (RAH0, 0x0A204),
            (MTQC, 0x08120),
            (RETA, 0x0EB00),
            (RSSRK, 0x0EB80),
            (MRQC, 0x0EC80),
            (stat::CRCERRS, 0x04000),
            (stat::GPRC, 0x04074),
            (stat::GPTC, 0x04080),
        ];
        for (got, want) in table {
            assert_eq!(got, want);
        }
        assert_eq!(stat::MPC0, 0x03FA0);
    }

    #[test]
    fn queue_offsets_by_hand() {
        // Queue 0.
        assert_eq!(
            [
                rdbal(0),
                rdbah(0),
                rdlen(0),
                rdh(0),
                srrctl(0),
                rdt(0),
                rxdctl(0)
            ],
            [0x1000, 0x1004, 0x1008, 0x1010, 0x1014, 0x1018, 0x1028]
        );
        assert_eq!(
            [tdbal(0), tdbah(0), tdlen(0), tdh(0), tdt(0), txdctl(0)],
            [0x6000, 0x6004, 0x6008, 0x6010, 0x6018, 0x6028]
        );
        // Queue 1: + 0x40; queue 63: + 0xFC0.
        assert_eq!(
            [rdbal(1), rdt(1), rxdctl(1), srrctl(1)],
            [0x1040, 0x1058, 0x1068, 0x1054]
        );
        assert_eq!([tdbal(1), tdt(1), txdctl(1)], [0x6040, 0x6058, 0x6068]);
        assert_eq!([rdt(63), tdt(63)], [0x1FD8, 0x6FD8]);
    }

    #[test]
    fn bit_values_by_hand() {
        assert_eq!(ctrl::RESET, 0x0400_0008);
        assert_eq!(CTRL_EXT_NS_DIS, 0x0001_0000);
        assert_eq!(EEC_ARD, 0x200);
        assert_eq!(rdrxctl::CRC_STRIP | rdrxctl::DMAIDONE, 0xA);
        assert_eq!(hlreg0::TXCRCEN | hlreg0::RXCRCSTRP | hlreg0::TXPADEN, 0x403);
        assert_eq!(AUTOC_RESTART_AN, 0x1000);
        assert_eq!(LINKS_UP, 0x4000_0000);
        assert_eq!(RTTDCS_ARBDIS, 0x40);
        assert_eq!(fctrl::MPE | fctrl::UPE | fctrl::BAM, 0x700);
        // MRQC: 0x1 | 0x1_0000 | 0x2_0000 | 0x40_0000.
        assert_eq!(
            mrqc::RSS | mrqc::TCP_IPV4 | mrqc::IPV4 | mrqc::UDP_IPV4,
            0x0043_0001
        );
        // SRRCTL: 2 | 001b << 25 | 1 << 28 = 0x1200_0002.
        assert_eq!(
            srrctl::BSIZEPKT_2K | srrctl::DESCTYPE_ADV_ONEBUF | srrctl::DROP_EN,
            0x1200_0002
        );
        assert_eq!(QUEUE_ENABLE, 0x0200_0000);
        assert_eq!(RXCSUM_PCSD, 0x2000);
        assert_eq!(RAH_AV, 0x8000_0000);
    }
}
