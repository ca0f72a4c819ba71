//! Advanced descriptor encodings (pure functions, tested against hand-worked values).
//!
//! Both layouts are 16 bytes, little-endian, seen here as two `u64` words.
//!
//! TX *advanced data descriptor*, read format (82576 datasheet §7.2.2.3.2 / 82599
//! datasheet §7.2.3.2.4): word 0 is the buffer address; word 1 holds DTALEN (bits 15:0),
//! DTYP (bits 23:20, `0011b` = data), DCMD (bits 31:24: EOP 24, IFCS 25, RS 27, DEXT 29,
//! VLE 30, TSE 31) and PAYLEN (bits 63:46). The NIC writes back STA.DD at bit 32 of
//! word 1 when RS asked for it (§7.2.2.3.3 / §7.2.3.2.4 "write-back format").
//!
//! RX *advanced descriptor*, read format (82576 §7.1.5.1 / 82599 §7.1.6.1): word 0 is the
//! packet buffer address, word 1 the header buffer address (0: no header split; its
//! bit 0 becomes DD, so it must be 0). Write-back format (82576 §7.1.5.2 / 82599
//! §7.1.6.2): word 0 bits 3:0 RSS type, bits 16:4 packet type, bits 63:32 the RSS hash;
//! word 1 bits 19:0 extended status (DD bit 0, EOP bit 1), bits 31:20 extended errors,
//! bits 47:32 PKT_LEN, bits 63:48 VLAN tag.

/// Bytes per advanced descriptor.
pub const DESC_LEN: usize = 16;

/// TX DCMD bits, as bits of word 1.
pub mod txcmd {
    /// End of packet.
    pub const EOP: u64 = 1 << 24;
    /// Insert FCS (the Ethernet CRC).
    pub const IFCS: u64 = 1 << 25;
    /// Report status: write DD back.
    pub const RS: u64 = 1 << 27;
    /// Descriptor extension: advanced format.
    pub const DEXT: u64 = 1 << 29;
    /// VLAN packet enable.
    pub const VLE: u64 = 1 << 30;
    /// TCP/UDP segmentation enable.
    pub const TSE: u64 = 1 << 31;
}

/// DTYP field value of a data descriptor (`0011b`), bits 23:20 of word 1.
pub const DTYP_DATA: u64 = 0x3 << 20;
/// Shift of PAYLEN in word 1.
pub const PAYLEN_SHIFT: u32 = 46;
/// STA.DD in a TX write-back, bit 32 of word 1.
pub const TX_DD: u64 = 1 << 32;

/// RX extended status bits (word 1, bits 19:0).
pub mod rxstat {
    /// Descriptor done.
    pub const DD: u32 = 1 << 0;
    /// End of packet.
    pub const EOP: u32 = 1 << 1;
}
/// RX extended errors: bits 31:20 of the status/error dword.
pub const RX_ERR_MASK: u32 = 0xFFF0_0000;

/// The read-format words of a one-buffer TX data descriptor for a whole frame of
/// `len` bytes at `addr`: EOP, IFCS, RS, DEXT, DTYP = data, PAYLEN = `len`.
pub fn tx_data(addr: u64, len: u16) -> [u64; 2] {
    let cmd = txcmd::EOP | txcmd::IFCS | txcmd::RS | txcmd::DEXT;
    [
        addr,
        u64::from(len) | DTYP_DATA | cmd | (u64::from(len) << PAYLEN_SHIFT),
    ]
}

/// Whether a TX descriptor's word 1 shows the NIC's write-back (STA.DD).
pub fn tx_done(word1: u64) -> bool {
    word1 & TX_DD != 0
}

/// The read-format words of an RX descriptor for a packet buffer at `addr`, no header
/// buffer.
pub fn rx_read(addr: u64) -> [u64; 2] {
    [addr, 0]
}

/// An RX write-back, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RxWb {
    /// RSS type (bits 3:0 of word 0).
    pub rss_type: u8,
    /// Packet type (bits 16:4 of word 0).
    pub pkt_type: u16,
    /// RSS hash (bits 63:32 of word 0), when RXCSUM.PCSD is set.
    pub rss_hash: u32,
    /// Extended status (bits 19:0 of word 1).
    pub status: u32,
    /// Extended errors (bits 31:20 of word 1, left in place).
    pub errors: u32,
    /// PKT_LEN (bits 47:32 of word 1).
    pub len: u16,
    /// VLAN tag (bits 63:48 of word 1).
    pub vlan: u16,
}

impl RxWb {
    /// Decodes write-back words.
    pub fn decode(w: [u64; 2]) -> RxWb {
        let se = w[1] as u32;
        RxWb {
            rss_type: (w[0] & 0xF) as u8,
            pkt_type: ((w[0] >> 4) & 0x1FFF) as u16,
            rss_hash: (w[0] >> 32) as u32,
            status: se & 0x000F_FFFF,
            errors: se & RX_ERR_MASK,
            len: (w[1] >> 32) as u16,
            vlan: (w[1] >> 48) as u16,
        }
    }

    /// DD: the NIC has written this descriptor back.
    pub fn done(&self) -> bool {
        self.status & rxstat::DD != 0
    }

    /// EOP: the frame ends in this descriptor.
    pub fn eop(&self) -> bool {
        self.status & rxstat::EOP != 0
    }
}

/// RSS type of an IPv4/UDP packet in the RX write-back (82576 §7.1.5.2, RSS Type field:
/// `0x7` = IPv4 with UDP; the same code in the 82599's, §7.1.6.2).
pub const RSS_TYPE_IPV4_UDP: u8 = 0x7;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tx_data_by_hand() {
        // 60-byte frame at 0x1234_5000. Word 1: DTALEN 0x003C; DTYP 0011b in bits 23:20
        // -> 0x0030_0000; DCMD = EOP(0x01) | IFCS(0x02) | RS(0x08) | DEXT(0x20) = 0x2B in
        // bits 31:24 -> 0x2B00_0000; PAYLEN 60 in bits 63:46 = 60 << 14 in the high
        // dword = 0x000F_0000.
        assert_eq!(
            tx_data(0x1234_5000, 60),
            [0x1234_5000, 0x000F_0000_2B30_003C]
        );
        // 1514 bytes (0x5EA): PAYLEN 0x5EA << 14 = 0x017A_8000 in the high dword.
        assert_eq!(tx_data(0xFFFF_F000_0000, 1514)[1], 0x017A_8000_2B30_05EA);
    }

    #[test]
    fn tx_dd_is_bit_32() {
        assert!(!tx_done(tx_data(0x1000, 64)[1]));
        assert!(tx_done(tx_data(0x1000, 64)[1] | 0x1_0000_0000));
        assert!(!tx_done(0xFFFF_FFFF));
    }

    #[test]
    fn rx_read_has_no_header_buffer() {
        assert_eq!(rx_read(0xDEAD_B000), [0xDEAD_B000, 0]);
        assert!(!RxWb::decode(rx_read(0xDEAD_B000)).done());
    }

    #[test]
    fn rx_writeback_by_hand() {
        // Word 0: RSS hash 0x51CC_C178 in the high dword; low dword = packet type
        // 0x021 (IPv4 = type bit 0, UDP = type bit 5) in bits 16:4, RSS type 7 in
        // bits 3:0: (0x021 << 4) | 0x7 = 0x0000_0217.
        // Word 1: VLAN 0, length 0x05EA, errors 0, status DD | EOP = 0x3.
        let w = [0x51CC_C178_0000_0217, 0x0000_05EA_0000_0003];
        let d = RxWb::decode(w);
        assert_eq!(
            d,
            RxWb {
                rss_type: 7,
                pkt_type: 0x21,
                rss_hash: 0x51CC_C178,
                status: 3,
                errors: 0,
                len: 1514,
                vlan: 0
            }
        );
        assert!(d.done() && d.eop());
        // RXE (bit 31) and L4E (bit 29): errors kept in place, status untouched.
        let e = RxWb::decode([0, 0x0000_0040_A000_0003]);
        assert_eq!((e.errors, e.status, e.len), (0xA000_0000, 3, 0x40));
        // VLAN tag in bits 63:48.
        assert_eq!(RxWb::decode([0, 0x0123_0000_0000_0001]).vlan, 0x0123);
    }
}
