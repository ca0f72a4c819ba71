//! Receive-side scaling: the Toeplitz hash and the redirection table.
//!
//! The hash (82576 datasheet §7.1.2.10.1, 82599 datasheet §7.1.2.8.1, both following
//! Microsoft's RSS specification): for every set bit of the input, most significant
//! first, XOR in the 32 key bits starting at that bit position. For IPv4/UDP the input
//! is source address, destination address, source port, destination port, all in
//! network byte order (12 bytes). The queue is the redirection-table entry indexed by
//! the hash's 7 low bits (128 entries).

/// Bytes of the RSS key (RSSRK0..9).
pub const KEY_LEN: usize = 40;
/// Entries of the redirection table (RETA).
pub const RETA_LEN: usize = 128;

/// The key of Microsoft's RSS verification suite; the drivers program it, so its
/// published test vectors check the hash here and the NIC's write-back checks QEMU's.
pub const KEY: [u8; KEY_LEN] = [
    0x6d, 0x5a, 0x56, 0xda, 0x25, 0x5b, 0x0e, 0xc2, 0x41, 0x67, 0x25, 0x3d, 0x43, 0xa3, 0x8f, 0xb0,
    0xd0, 0xca, 0x2b, 0xcb, 0xae, 0x7b, 0x30, 0xb4, 0x77, 0xcb, 0x2d, 0xa3, 0x80, 0x30, 0xf2, 0x0c,
    0x6a, 0x42, 0xb7, 0x3b, 0xbe, 0xac, 0x01, 0xfa,
];

/// Toeplitz hash of `input` under `key` (`input` at most `KEY_LEN - 4` bytes).
pub fn toeplitz(key: &[u8; KEY_LEN], input: &[u8]) -> u32 {
    let mut h = 0u32;
    // The 32-bit window of the key starting at bit i, kept in `win`; `next` holds the
    // following key bits to shift in.
    let mut win = u32::from_be_bytes([key[0], key[1], key[2], key[3]]);
    for (i, &b) in input.iter().enumerate() {
        let next = key.get(i + 4).copied().unwrap_or(0);
        for bit in 0..8 {
            if b & (0x80 >> bit) != 0 {
                h ^= win;
            }
            win = (win << 1) | u32::from((next >> (7 - bit)) & 1);
        }
    }
    h
}

/// The 12-byte IPv4/UDP hash input.
pub fn ipv4_udp_input(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> [u8; 12] {
    let mut v = [0u8; 12];
    v[0..4].copy_from_slice(&src);
    v[4..8].copy_from_slice(&dst);
    v[8..10].copy_from_slice(&sport.to_be_bytes());
    v[10..12].copy_from_slice(&dport.to_be_bytes());
    v
}

/// The redirection table spreading `queues` queues round-robin: entry j = j mod queues.
pub fn reta(queues: u8) -> [u8; RETA_LEN] {
    let q = queues.max(1);
    std::array::from_fn(|j| (j % usize::from(q)) as u8)
}

/// The 32 RETA register values (entry 4k + b in bits 8b+7:8b of register k).
pub fn reta_regs(table: &[u8; RETA_LEN]) -> [u32; RETA_LEN / 4] {
    std::array::from_fn(|k| {
        u32::from_le_bytes([
            table[4 * k],
            table[4 * k + 1],
            table[4 * k + 2],
            table[4 * k + 3],
        ])
    })
}

/// The 10 RSSRK register values (key byte 4n + b in bits 8b+7:8b of register n).
pub fn key_regs(key: &[u8; KEY_LEN]) -> [u32; KEY_LEN / 4] {
    std::array::from_fn(|n| {
        u32::from_le_bytes([key[4 * n], key[4 * n + 1], key[4 * n + 2], key[4 * n + 3]])
    })
}

/// The queue a hash selects.
pub fn queue_of(table: &[u8; RETA_LEN], hash: u32) -> u8 {
    table[(hash as usize) & (RETA_LEN - 1)]
}

/// The first `count` source ports from 1024 upwards whose IPv4/UDP flow
/// (`src`:port → `dst`:`dport`) lands on `queue`.
pub fn ports_for_queue(
    table: &[u8; RETA_LEN],
    src: [u8; 4],
    dst: [u8; 4],
    dport: u16,
    queue: u8,
    count: usize,
) -> Vec<u16> {
    (1024..=u16::MAX)
        .filter(|&p| queue_of(table, toeplitz(&KEY, &ipv4_udp_input(src, dst, p, dport))) == queue)
        .take(count)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    // Microsoft's RSS verification suite, IPv4 rows ("Verifying the RSS Hash
    // Calculation"): destination:port, source:port, IPv4 hash, IPv4-with-ports hash.
    /// (destination, port, source, port, IPv4 hash, IPv4-with-ports hash).
    type Vector = ([u8; 4], u16, [u8; 4], u16, u32, u32);
    const VECTORS: [Vector; 3] = [
        (
            [161, 142, 100, 80],
            1766,
            [66, 9, 149, 187],
            2794,
            0x323e_8fc2,
            0x51cc_c178,
        ),
        (
            [65, 69, 140, 83],
            4739,
            [199, 92, 111, 2],
            14230,
            0xd718_262a,
            0xc626_b0ea,
        ),
        (
            [12, 22, 207, 184],
            38024,
            [24, 19, 198, 95],
            12898,
            0xd2d0_a5de,
            0x5c2b_394a,
        ),
    ];

    #[test]
    fn microsoft_vectors() {
        for (dst, dport, src, sport, h_ip, h_l4) in VECTORS {
            let mut ip = [0u8; 8];
            ip[0..4].copy_from_slice(&src);
            ip[4..8].copy_from_slice(&dst);
            assert_eq!(toeplitz(&KEY, &ip), h_ip, "{src:?} -> {dst:?}");
            assert_eq!(
                toeplitz(&KEY, &ipv4_udp_input(src, dst, sport, dport)),
                h_l4,
                "{src:?}:{sport} -> {dst:?}:{dport}"
            );
        }
    }

    #[test]
    fn register_layouts_by_hand() {
        let k = key_regs(&KEY);
        // Key bytes 6d 5a 56 da -> RSSRK0 = 0xda565a6d; bytes 01 fa at the end of RSSRK9.
        assert_eq!(k[0], 0xda56_5a6d);
        assert_eq!(k[9], 0xfa01_acbe);
        let t = reta(2);
        assert_eq!(&t[..5], &[0, 1, 0, 1, 0]);
        let r = reta_regs(&t);
        assert_eq!(r[0], 0x0100_0100);
        assert_eq!(r[31], 0x0100_0100);
        assert_eq!(reta_regs(&reta(1)), [0; 32]);
        assert_eq!(reta_regs(&reta(4))[0], 0x0302_0100);
    }

    #[test]
    fn ports_land_on_their_queue() {
        let t = reta(2);
        let (src, dst) = ([10, 0, 0, 1], [10, 0, 0, 2]);
        for q in 0..2u8 {
            let ports = ports_for_queue(&t, src, dst, 9000, q, 8);
            assert_eq!(ports.len(), 8);
            for p in ports {
                let h = toeplitz(&KEY, &ipv4_udp_input(src, dst, p, 9000));
                assert_eq!(usize::from(q), (h as usize & 127) % 2);
            }
        }
    }
}
