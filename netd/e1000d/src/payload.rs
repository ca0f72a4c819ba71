//! The loop test's frame format: sequence number plus checksum, checked end to end.
//!
//! ```text
//! 0      6      12     14     18     26     28           14+len-4   14+len
//! | dst  | src  | type | magic| seq  | len  | pattern... | FNV-1a32 |
//! ```
//! `type` is 0x88B5 (IEEE 802 local experimental EtherType), `magic` is `b"E1KD"`,
//! `seq` is little-endian u64, `len` is the payload length (EtherType excluded), the
//! checksum covers magic through the end of the pattern. Padding added by the NIC
//! after `14 + len` bytes is ignored.

/// EtherType of loop frames (IEEE 802 local experimental 1).
pub const ETHERTYPE: u16 = 0x88B5;
/// Payload magic.
pub const MAGIC: [u8; 4] = *b"E1KD";
/// Ethernet header length (no VLAN tag).
pub const ETH_HDR: usize = 14;
/// Smallest payload carrying magic, sequence, length and checksum.
pub const MIN_PAYLOAD: usize = 4 + 8 + 2 + 4;
/// Largest payload of a standard Ethernet frame.
pub const MAX_PAYLOAD: usize = 1500;

/// Why a received frame is not a good loop frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bad {
    /// Not one of ours: other EtherType, magic, or too short for a header.
    Foreign,
    /// Ours, but the length field or the checksum does not match.
    Corrupt,
}

/// FNV-1a, 32-bit.
pub fn fnv1a32(data: &[u8]) -> u32 {
    let mut h: u32 = 0x811C_9DC5;
    for &b in data {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// The pattern byte at payload position `i` of frame `seq`.
fn pattern(seq: u64, i: usize) -> u8 {
    let x =
        seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (i as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93);
    (x >> 29) as u8
}

/// Builds a loop frame with `payload_len` payload bytes into `out` (cleared first).
/// `payload_len` is clamped to `MIN_PAYLOAD..=MAX_PAYLOAD`.
pub fn build(dst: [u8; 6], src: [u8; 6], seq: u64, payload_len: usize, out: &mut Vec<u8>) {
    let len = payload_len.clamp(MIN_PAYLOAD, MAX_PAYLOAD);
    out.clear();
    out.extend_from_slice(&dst);
    out.extend_from_slice(&src);
    out.extend_from_slice(&ETHERTYPE.to_be_bytes());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&(len as u16).to_le_bytes());
    let pattern_len = len - MIN_PAYLOAD;
    out.extend((0..pattern_len).map(|i| pattern(seq, i)));
    let sum = fnv1a32(&out[ETH_HDR..]);
    out.extend_from_slice(&sum.to_le_bytes());
}

/// Checks a received frame; returns its sequence number if it is intact.
pub fn check(frame: &[u8]) -> Result<u64, Bad> {
    if frame.len() < ETH_HDR + MIN_PAYLOAD
        || frame[12..14] != ETHERTYPE.to_be_bytes()
        || frame[14..18] != MAGIC
    {
        return Err(Bad::Foreign);
    }
    let len = usize::from(u16::from_le_bytes([frame[26], frame[27]]));
    if !(MIN_PAYLOAD..=MAX_PAYLOAD).contains(&len) || frame.len() < ETH_HDR + len {
        return Err(Bad::Corrupt);
    }
    let body = &frame[ETH_HDR..ETH_HDR + len - 4];
    let mut sum = [0u8; 4];
    sum.copy_from_slice(&frame[ETH_HDR + len - 4..ETH_HDR + len]);
    if fnv1a32(body) != u32::from_le_bytes(sum) {
        return Err(Bad::Corrupt);
    }
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&frame[18..26]);
    Ok(u64::from_le_bytes(seq))
}

/// Swaps destination and source MAC in place (for an echo).
pub fn swap_macs(frame: &mut [u8]) {
    if frame.len() >= 12 {
        for i in 0..6 {
            frame.swap(i, i + 6);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    const B: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x57];

    #[test]
    fn fnv1a_known_vectors() {
        // Reference values of the FNV-1a 32-bit test suite.
        assert_eq!(fnv1a32(b""), 0x811C_9DC5);
        assert_eq!(fnv1a32(b"a"), 0xE40C_292C);
        assert_eq!(fnv1a32(b"foobar"), 0xBF9C_F968);
    }

    #[test]
    fn header_bytes_by_hand() {
        let mut f = Vec::new();
        build(B, A, 0x0102_0304_0506_0708, MIN_PAYLOAD, &mut f);
        assert_eq!(f.len(), ETH_HDR + MIN_PAYLOAD);
        assert_eq!(&f[0..6], &B);
        assert_eq!(&f[6..12], &A);
        assert_eq!(&f[12..14], &[0x88, 0xB5]);
        assert_eq!(&f[14..18], b"E1KD");
        assert_eq!(&f[18..26], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(&f[26..28], &[18, 0]);
        let sum = fnv1a32(&f[14..28]).to_le_bytes();
        assert_eq!(&f[28..32], &sum);
    }

    #[test]
    fn round_trip_sizes() {
        let mut f = Vec::new();
        for (seq, len) in [(0u64, 18usize), (1, 46), (77, 1000), (u64::MAX, 1500)] {
            build(B, A, seq, len, &mut f);
            assert_eq!(f.len(), ETH_HDR + len);
            assert_eq!(check(&f), Ok(seq));
        }
    }

    #[test]
    fn nic_padding_is_ignored() {
        let mut f = Vec::new();
        build(B, A, 5, MIN_PAYLOAD, &mut f);
        f.resize(60, 0);
        assert_eq!(check(&f), Ok(5));
    }

    #[test]
    fn every_single_bit_flip_in_payload_is_detected() {
        let mut f = Vec::new();
        build(B, A, 42, 200, &mut f);
        for byte in ETH_HDR + 4..f.len() {
            for bit in 0..8 {
                let mut g = f.clone();
                g[byte] ^= 1 << bit;
                assert_eq!(check(&g), Err(Bad::Corrupt), "byte {byte} bit {bit}");
            }
        }
    }

    #[test]
    fn truncation_and_foreign_frames() {
        let mut f = Vec::new();
        build(B, A, 9, 300, &mut f);
        assert_eq!(check(&f[..f.len() - 1]), Err(Bad::Corrupt));
        assert_eq!(check(&f[..20]), Err(Bad::Foreign));
        let mut g = f.clone();
        g[12] = 0x08; // IPv4
        g[13] = 0x00;
        assert_eq!(check(&g), Err(Bad::Foreign));
        assert_eq!(check(&[0u8; 60]), Err(Bad::Foreign));
    }

    #[test]
    fn pattern_differs_between_frames() {
        let (mut f, mut g) = (Vec::new(), Vec::new());
        build(B, A, 1, 1500, &mut f);
        build(B, A, 2, 1500, &mut g);
        assert_ne!(f[28..1510], g[28..1510]);
    }

    #[test]
    fn swap_macs_echo() {
        let mut f = Vec::new();
        build(B, A, 3, 64, &mut f);
        swap_macs(&mut f);
        assert_eq!(&f[0..6], &A);
        assert_eq!(&f[6..12], &B);
        assert_eq!(check(&f), Ok(3));
    }
}
