//! The multi-queue loop's test frames: IPv4/UDP, so RSS spreads them over the RX queues.
//!
//! ```text
//! 0    14        34       42     46  48    56    58          14+size-4  14+size
//! | eth | IPv4    | UDP    | magic| q | seq | len | pattern... | FNV-1a32 |
//! ```
//! Ethernet type 0x0800; IPv4 (RFC 791) with IHL 5, DF, TTL 64, protocol 17, a valid
//! header checksum, 10.0.0.1 → 10.0.0.2; UDP (RFC 768) from the flow's source port to
//! [`DPORT`] with checksum 0 (none). The UDP payload is the magic `b"NQLP"`, the queue
//! the sender meant the frame for (u16 LE), the sequence number (u64 LE), the size (u16
//! LE, the IPv4 packet's length), a pattern, and FNV-1a over the UDP header..pattern. `size` is
//! the Ethernet payload (the IPv4 packet), as e1000d's `--size`.

use e1000d::payload::fnv1a32;

/// Source address of loop frames.
pub const SRC_IP: [u8; 4] = [10, 0, 0, 1];
/// Destination address of loop frames.
pub const DST_IP: [u8; 4] = [10, 0, 0, 2];
/// Destination UDP port of loop frames.
pub const DPORT: u16 = 9000;
/// UDP payload magic.
pub const MAGIC: [u8; 4] = *b"NQLP";
/// Ethernet header bytes.
pub const ETH_HDR: usize = 14;
const IP_HDR: usize = 20;
const UDP_HDR: usize = 8;
const HEADERS: usize = ETH_HDR + IP_HDR + UDP_HDR;
/// Smallest `size`: IPv4 + UDP headers, magic, queue, seq, len, checksum.
pub const MIN_SIZE: usize = IP_HDR + UDP_HDR + 4 + 2 + 8 + 2 + 4;
/// Largest `size` (a standard 1500-byte MTU).
pub const MAX_SIZE: usize = 1500;

/// Why a received frame is not a good loop frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bad {
    /// Not one of ours: another EtherType or protocol, or no magic.
    Foreign,
    /// Ours, but a length, the IPv4 header checksum or the payload checksum is wrong.
    Corrupt,
}

/// The RFC 1071 Internet checksum of `data` (even length).
pub fn inet_csum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xFFFF {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    !(sum as u16)
}

fn pattern(seq: u64, i: usize) -> u8 {
    let x =
        seq.wrapping_mul(0xA24B_AED4_963E_E407) ^ (i as u64).wrapping_mul(0x9FB2_1C65_1E98_DF25);
    (x >> 31) as u8
}

/// Builds frame `seq` for `queue` from source port `sport`, `size` bytes of Ethernet
/// payload (clamped to `MIN_SIZE..=MAX_SIZE`), into `out` (cleared first).
pub fn build(
    dst: [u8; 6],
    src: [u8; 6],
    sport: u16,
    queue: u16,
    seq: u64,
    size: usize,
    out: &mut Vec<u8>,
) {
    let size = size.clamp(MIN_SIZE, MAX_SIZE);
    out.clear();
    out.extend_from_slice(&dst);
    out.extend_from_slice(&src);
    out.extend_from_slice(&0x0800u16.to_be_bytes());
    // IPv4 header.
    out.extend_from_slice(&[0x45, 0]);
    out.extend_from_slice(&(size as u16).to_be_bytes());
    out.extend_from_slice(&(seq as u16).to_be_bytes()); // identification
    out.extend_from_slice(&[0x40, 0, 64, 17, 0, 0]); // DF, TTL 64, UDP, checksum later
    out.extend_from_slice(&SRC_IP);
    out.extend_from_slice(&DST_IP);
    let csum = inet_csum(&out[ETH_HDR..ETH_HDR + IP_HDR]);
    out[ETH_HDR + 10..ETH_HDR + 12].copy_from_slice(&csum.to_be_bytes());
    // UDP header, no checksum.
    out.extend_from_slice(&sport.to_be_bytes());
    out.extend_from_slice(&DPORT.to_be_bytes());
    out.extend_from_slice(&((size - IP_HDR) as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0]);
    // Payload.
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&queue.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&(size as u16).to_le_bytes());
    let pattern_len = size - MIN_SIZE;
    out.extend((0..pattern_len).map(|i| pattern(seq, i)));
    let sum = fnv1a32(&out[ETH_HDR + IP_HDR..]);
    out.extend_from_slice(&sum.to_le_bytes());
}

/// Checks a received frame; returns `(queue, seq, source port)` if it is intact.
pub fn check(f: &[u8]) -> Result<(u16, u64, u16), Bad> {
    if f.len() < HEADERS + 4
        || f[12..14] != [0x08, 0x00]
        || f[ETH_HDR] != 0x45
        || f[ETH_HDR + 9] != 17
        || f[HEADERS..HEADERS + 4] != MAGIC
    {
        return Err(Bad::Foreign);
    }
    let be = |o: usize| usize::from(u16::from_be_bytes([f[o], f[o + 1]]));
    let size = be(ETH_HDR + 2);
    if !(MIN_SIZE..=MAX_SIZE).contains(&size)
        || f.len() < ETH_HDR + size
        || be(ETH_HDR + IP_HDR + 4) != size - IP_HDR
        || inet_csum(&f[ETH_HDR..ETH_HDR + IP_HDR]) != 0
    {
        return Err(Bad::Corrupt);
    }
    let udp = &f[ETH_HDR + IP_HDR..ETH_HDR + size];
    let mut sum = [0u8; 4];
    sum.copy_from_slice(&udp[udp.len() - 4..]);
    if fnv1a32(&udp[..udp.len() - 4]) != u32::from_le_bytes(sum) {
        return Err(Bad::Corrupt);
    }
    let p = &udp[UDP_HDR..];
    if usize::from(u16::from_le_bytes([p[14], p[15]])) != size {
        return Err(Bad::Corrupt);
    }
    let queue = u16::from_le_bytes([p[4], p[5]]);
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&p[6..14]);
    let sport = be(ETH_HDR + IP_HDR) as u16;
    Ok((queue, u64::from_le_bytes(seq), sport))
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    const B: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x57];

    #[test]
    fn inet_checksum_rfc1071_example() {
        // RFC 1071 §3: the words 0001 f203 f4f5 f6f7 sum (with end-around carry) to
        // 0xddf2; the checksum is its complement.
        assert_eq!(
            inet_csum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            !0xddf2
        );
    }

    #[test]
    fn headers_by_hand() {
        let mut f = Vec::new();
        build(B, A, 0x1234, 1, 0x0102_0304_0506_0708, 64, &mut f);
        assert_eq!(f.len(), 14 + 64);
        assert_eq!(&f[0..12], &[B, A].concat()[..]);
        assert_eq!(&f[12..14], &[0x08, 0x00]);
        // IPv4: 45 00 | total length 0x0040 | id 0x0708 | 40 00 | ttl 64, proto 17.
        assert_eq!(
            &f[14..24],
            &[0x45, 0, 0x00, 0x40, 0x07, 0x08, 0x40, 0, 64, 17]
        );
        assert_eq!(&f[26..34], &[10, 0, 0, 1, 10, 0, 0, 2]);
        // Header checksum by hand: 4500 + 0040 + 0708 + 4000 + 4011 + 0a00 + 0001 +
        // 0a00 + 0002 = 0xe05c; complement 0x1fa3.
        assert_eq!(&f[24..26], &[0x1f, 0xa3]);
        // UDP: sport 0x1234, dport 9000 = 0x2328, length 64 - 20 = 44 = 0x2c, csum 0.
        assert_eq!(&f[34..42], &[0x12, 0x34, 0x23, 0x28, 0, 0x2c, 0, 0]);
        assert_eq!(&f[42..46], b"NQLP");
        assert_eq!(&f[46..48], &[1, 0]);
        assert_eq!(&f[48..56], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(&f[56..58], &[64, 0]);
        assert_eq!(check(&f), Ok((1, 0x0102_0304_0506_0708, 0x1234)));
    }

    #[test]
    fn sizes_round_trip_and_padding_is_ignored() {
        let mut f = Vec::new();
        for (seq, size) in [(0u64, MIN_SIZE), (5, 100), (9, 1500)] {
            build(B, A, 2000, 3, seq, size, &mut f);
            assert_eq!(f.len(), ETH_HDR + size);
            assert_eq!(check(&f), Ok((3, seq, 2000)));
            f.extend_from_slice(&[0; 4]); // a CRC or padding after the packet
            assert_eq!(check(&f), Ok((3, seq, 2000)));
        }
    }

    #[test]
    fn every_bit_flip_after_the_ethernet_header_is_detected() {
        let mut f = Vec::new();
        build(B, A, 2000, 0, 42, 120, &mut f);
        for byte in ETH_HDR..f.len() {
            for bit in 0..8 {
                let mut g = f.clone();
                g[byte] ^= 1 << bit;
                assert!(check(&g).is_err(), "byte {byte} bit {bit}");
            }
        }
    }

    #[test]
    fn foreign_and_truncated() {
        let mut f = Vec::new();
        build(B, A, 2000, 0, 1, 300, &mut f);
        assert_eq!(check(&f[..f.len() - 1]), Err(Bad::Corrupt));
        assert_eq!(check(&f[..30]), Err(Bad::Foreign));
        let mut g = f.clone();
        g[23] = 6; // TCP
        assert_eq!(check(&g), Err(Bad::Foreign));
        assert_eq!(check(&[0u8; 60]), Err(Bad::Foreign));
    }
}
