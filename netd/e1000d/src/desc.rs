//! Legacy receive and transmit descriptors: encoding and decoding.
//!
//! Descriptors are 16 bytes, little-endian, handled here as two `u64` words so the
//! ring code can move them with two volatile accesses (the device writes status back
//! into the second word; see `ring::DescRing`).

/// Size of one descriptor in bytes (8254x SDM 3.2.3 and 3.3.3).
pub const DESC_LEN: usize = 16;

/// Legacy transmit descriptor command bits (8254x SDM 3.3.3.1, TDESC.CMD).
pub mod tx_cmd {
    /// End of packet.
    pub const EOP: u8 = 1 << 0;
    /// Insert FCS (Ethernet CRC).
    pub const IFCS: u8 = 1 << 1;
    /// Insert checksum.
    pub const IC: u8 = 1 << 2;
    /// Report status: write DD back when done.
    pub const RS: u8 = 1 << 3;
    /// Extension (0 = legacy descriptor).
    pub const DEXT: u8 = 1 << 5;
    /// Interrupt delay enable.
    pub const IDE: u8 = 1 << 7;
}

/// Legacy transmit descriptor status bits (8254x SDM 3.3.3.2, TDESC.STA).
pub mod tx_sta {
    /// Descriptor done.
    pub const DD: u8 = 1 << 0;
    /// Excess collisions.
    pub const EC: u8 = 1 << 1;
    /// Late collision.
    pub const LC: u8 = 1 << 2;
}

/// Receive descriptor status bits (8254x SDM 3.2.3.1, RDESC.STATUS).
pub mod rx_sta {
    /// Descriptor done.
    pub const DD: u8 = 1 << 0;
    /// End of packet.
    pub const EOP: u8 = 1 << 1;
    /// Ignore checksum indication.
    pub const IXSM: u8 = 1 << 2;
}

/// Receive descriptor error bits (8254x SDM 3.2.3.2, RDESC.ERRORS).
pub mod rx_err {
    /// CRC or alignment error.
    pub const CE: u8 = 1 << 0;
    /// Symbol error.
    pub const SE: u8 = 1 << 1;
    /// Sequence error.
    pub const SEQ: u8 = 1 << 2;
    /// Carrier extension error.
    pub const CXE: u8 = 1 << 4;
    /// TCP/UDP checksum error.
    pub const TCPE: u8 = 1 << 5;
    /// IP checksum error.
    pub const IPE: u8 = 1 << 6;
    /// RX data error.
    pub const RXE: u8 = 1 << 7;
}

/// A legacy transmit descriptor (8254x SDM 3.3.3, table 3-8).
///
/// Layout: bytes 0..8 buffer address, 8..10 length, 10 CSO, 11 CMD, 12 STA (bits 3:0,
/// 7:4 reserved), 13 CSS, 14..16 special.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TxDesc {
    /// Buffer address as the device sees it (an IOVA).
    pub addr: u64,
    /// Bytes in the buffer.
    pub len: u16,
    /// Checksum offset.
    pub cso: u8,
    /// Command bits, see [`tx_cmd`].
    pub cmd: u8,
    /// Status bits, see [`tx_sta`].
    pub sta: u8,
    /// Checksum start.
    pub css: u8,
    /// VLAN tag.
    pub special: u16,
}

impl TxDesc {
    /// A descriptor sending one whole frame from `addr`: EOP, IFCS, RS.
    pub fn frame(addr: u64, len: u16) -> Self {
        TxDesc {
            addr,
            len,
            cmd: tx_cmd::EOP | tx_cmd::IFCS | tx_cmd::RS,
            ..TxDesc::default()
        }
    }

    /// [`TxDesc::frame`] without RS: the NIC writes nothing back for it. A batch
    /// of frames sets RS on its last descriptor only; the NIC processes
    /// descriptors in ring order, so that one's DD means the whole batch is done
    /// (8254x SDM 3.3.3.1: RS asks for status on this descriptor only). One DMA
    /// write per batch instead of per frame.
    pub fn frame_unreported(addr: u64, len: u16) -> Self {
        TxDesc {
            addr,
            len,
            cmd: tx_cmd::EOP | tx_cmd::IFCS,
            ..TxDesc::default()
        }
    }

    /// The two little-endian words as stored in the ring.
    pub fn to_words(&self) -> [u64; 2] {
        let hi = u64::from(self.len)
            | u64::from(self.cso) << 16
            | u64::from(self.cmd) << 24
            | u64::from(self.sta & 0x0F) << 32
            | u64::from(self.css) << 40
            | u64::from(self.special) << 48;
        [self.addr, hi]
    }

    /// Decodes the two ring words.
    pub fn from_words(w: [u64; 2]) -> Self {
        let hi = w[1];
        TxDesc {
            addr: w[0],
            len: hi as u16,
            cso: (hi >> 16) as u8,
            cmd: (hi >> 24) as u8,
            sta: ((hi >> 32) as u8) & 0x0F,
            css: (hi >> 40) as u8,
            special: (hi >> 48) as u16,
        }
    }

    /// The 16 bytes as the device reads them.
    pub fn to_bytes(&self) -> [u8; DESC_LEN] {
        words_to_bytes(self.to_words())
    }
}

/// A legacy receive descriptor (8254x SDM 3.2.3, table 3-1).
///
/// Layout: bytes 0..8 buffer address, 8..10 length, 10..12 packet checksum,
/// 12 status, 13 errors, 14..16 special.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RxDesc {
    /// Buffer address as the device sees it (an IOVA).
    pub addr: u64,
    /// Bytes the device wrote into the buffer.
    pub len: u16,
    /// Raw packet checksum.
    pub csum: u16,
    /// Status bits, see [`rx_sta`].
    pub status: u8,
    /// Error bits, see [`rx_err`].
    pub errors: u8,
    /// VLAN tag.
    pub special: u16,
}

impl RxDesc {
    /// A descriptor handing the buffer at `addr` to the device (status cleared).
    pub fn empty(addr: u64) -> Self {
        RxDesc {
            addr,
            ..RxDesc::default()
        }
    }

    /// The two little-endian words as stored in the ring.
    pub fn to_words(&self) -> [u64; 2] {
        let hi = u64::from(self.len)
            | u64::from(self.csum) << 16
            | u64::from(self.status) << 32
            | u64::from(self.errors) << 40
            | u64::from(self.special) << 48;
        [self.addr, hi]
    }

    /// Decodes the two ring words.
    pub fn from_words(w: [u64; 2]) -> Self {
        let hi = w[1];
        RxDesc {
            addr: w[0],
            len: hi as u16,
            csum: (hi >> 16) as u16,
            status: (hi >> 32) as u8,
            errors: (hi >> 40) as u8,
            special: (hi >> 48) as u16,
        }
    }

    /// Decodes the 16 bytes the device wrote.
    pub fn from_bytes(b: [u8; DESC_LEN]) -> Self {
        Self::from_words(bytes_to_words(b))
    }

    /// The device has written this descriptor back.
    pub fn done(&self) -> bool {
        self.status & rx_sta::DD != 0
    }
}

fn words_to_bytes(w: [u64; 2]) -> [u8; DESC_LEN] {
    let mut out = [0u8; DESC_LEN];
    out[..8].copy_from_slice(&w[0].to_le_bytes());
    out[8..].copy_from_slice(&w[1].to_le_bytes());
    out
}

fn bytes_to_words(b: [u8; DESC_LEN]) -> [u64; 2] {
    let mut lo = [0u8; 8];
    let mut hi = [0u8; 8];
    lo.copy_from_slice(&b[..8]);
    hi.copy_from_slice(&b[8..]);
    [u64::from_le_bytes(lo), u64::from_le_bytes(hi)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tx_frame_bytes_by_hand() {
        // addr 0x0000_0001_2345_6000, len 1514 = 0x05EA, CMD = EOP|IFCS|RS = 0b1011 = 0x0B.
        let d = TxDesc::frame(0x0000_0001_2345_6000, 1514);
        assert_eq!(
            d.to_bytes(),
            [
                0x00, 0x60, 0x45, 0x23, 0x01, 0x00, 0x00, 0x00, // address, LE
                0xEA, 0x05, // length
                0x00, // CSO
                0x0B, // CMD
                0x00, // STA
                0x00, // CSS
                0x00, 0x00, // special
            ]
        );
    }

    #[test]
    fn an_unreported_frame_lacks_only_rs() {
        // CMD = EOP|IFCS = 0b0011 = 0x03: byte 11, bits 24-31 of the second word.
        let d = TxDesc::frame_unreported(0x0000_0001_2345_6000, 60);
        assert_eq!(d.to_bytes()[11], 0x03);
        assert_eq!(d.to_words()[1], 60 | 0x03 << 24);
        assert_eq!(
            TxDesc::frame(0x0000_0001_2345_6000, 60).to_words()[1],
            60 | 0x0B << 24
        );
    }

    #[test]
    fn tx_status_written_back() {
        // Device sets STA.DD (byte 12 bit 0) in the second word: bit 32.
        let mut w = TxDesc::frame(0x1000, 60).to_words();
        w[1] |= 1 << 32;
        let d = TxDesc::from_words(w);
        assert_eq!(d.sta & tx_sta::DD, tx_sta::DD);
        assert_eq!(d.len, 60);
        assert_eq!(d.cmd, 0x0B);
        // Reserved upper nibble of the STA byte is not reported as status.
        w[1] |= 0xF0 << 32;
        assert_eq!(TxDesc::from_words(w).sta, tx_sta::DD);
    }

    #[test]
    fn tx_round_trip_all_fields() {
        let d = TxDesc {
            addr: 0xDEAD_BEEF_0000_1230,
            len: 0x1234,
            cso: 0x56,
            cmd: 0x9B,
            sta: 0x07,
            css: 0x22,
            special: 0xABCD,
        };
        assert_eq!(d.to_words(), [0xDEAD_BEEF_0000_1230, 0xABCD_2207_9B56_1234]);
        assert_eq!(TxDesc::from_words(d.to_words()), d);
    }

    #[test]
    fn rx_written_back_by_hand() {
        // A 1500-byte frame (0x05DC), checksum 0xBEEF, status DD|EOP = 0x03, no errors.
        let bytes = [
            0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // address 0x1000
            0xDC, 0x05, // length
            0xEF, 0xBE, // checksum
            0x03, // status
            0x00, // errors
            0x00, 0x00, // special
        ];
        let d = RxDesc::from_bytes(bytes);
        assert_eq!(d.addr, 0x1000);
        assert_eq!(d.len, 1500);
        assert_eq!(d.csum, 0xBEEF);
        assert!(d.done());
        assert_eq!(d.status & rx_sta::EOP, rx_sta::EOP);
        assert_eq!(d.errors, 0);
    }

    #[test]
    fn rx_errors_byte() {
        // errors byte 13 = CE|RXE = 0x81 -> bits 47:40 of the second word.
        let mut b = [0u8; 16];
        b[12] = 0x03;
        b[13] = 0x81;
        let d = RxDesc::from_bytes(b);
        assert_eq!(d.errors & rx_err::CE, rx_err::CE);
        assert_eq!(d.errors & rx_err::RXE, rx_err::RXE);
        assert_eq!(d.to_words()[1], 0x0000_8103_0000_0000);
    }

    #[test]
    fn rx_empty_has_no_status() {
        let d = RxDesc::empty(0xFEED_0000);
        assert_eq!(d.to_words(), [0xFEED_0000, 0]);
        assert!(!d.done());
    }
}
