//! The verifier's block format. Every 4 KiB block written carries a header
//!
//! ```text
//! 0        8        16          24         32                                4096
//! | magic  | lba    | generation| checksum | payload (u64 words from lba, gen) |
//! ```
//! little endian; `lba` is the device LBA of the block's first byte, the checksum an
//! FNV-1a-style hash over the block's 64-bit words with the checksum word taken as 0.
//! A block read back is *verified* (magic, checksum, LBA and generation all as
//! expected), *corrupt* (magic or checksum wrong), *misplaced* (intact, but written
//! for another LBA) or *stale* (intact, right LBA, another generation).

/// Bytes per verified block.
pub const BLOCK: usize = 4096;
/// Header magic ("NVMEDBLK").
pub const MAGIC: u64 = u64::from_le_bytes(*b"NVMEDBLK");
const WORDS: usize = BLOCK / 8;
const SUM_WORD: usize = 3;

/// Verdict on one block read back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Everything as expected.
    Verified,
    /// Magic or checksum wrong.
    Corrupt,
    /// Intact but carries another LBA (the data went to or came from the wrong place).
    Misplaced,
    /// Intact, right LBA, wrong generation (a lost or misordered write).
    Stale,
}

/// FNV-1a 64 offset basis and prime.
const FNV_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a (64-bit) over bytes: the reference the word hash is built from.
pub fn fnv1a64(data: &[u8]) -> u64 {
    data.iter().fold(FNV_BASIS, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(FNV_PRIME)
    })
}

/// The word hash: FNV-1a steps over 64-bit words (checksum word as 0).
pub fn checksum(words: &[u64]) -> u64 {
    words.iter().enumerate().fold(FNV_BASIS, |h, (i, &w)| {
        let w = if i == SUM_WORD { 0 } else { w };
        (h ^ w).wrapping_mul(FNV_PRIME)
    })
}

fn payload_word(lba: u64, gen: u64, i: usize) -> u64 {
    let x = lba
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(gen.wrapping_mul(0xd6e8_feb8_6659_fd93))
        .wrapping_add(i as u64);
    // splitmix64 finalizer
    let x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Fills `out` (one block as words) for `lba`, generation `gen`.
pub fn fill(out: &mut [u64; WORDS], lba: u64, gen: u64) {
    out[0] = MAGIC;
    out[1] = lba;
    out[2] = gen;
    for (i, w) in out.iter_mut().enumerate().skip(4) {
        *w = payload_word(lba, gen, i);
    }
    out[SUM_WORD] = checksum(out);
}

/// Judges a block read from `lba`, expected to be of generation `gen`.
pub fn verify(b: &[u64; WORDS], lba: u64, gen: u64) -> Verdict {
    if b[0] != MAGIC || b[SUM_WORD] != checksum(b) {
        return Verdict::Corrupt;
    }
    if b[1] != lba {
        return Verdict::Misplaced;
    }
    if b[2] != gen {
        return Verdict::Stale;
    }
    Verdict::Verified
}

/// A block's words as the bytes they are on disk (little endian).
pub fn to_bytes(b: &[u64; WORDS]) -> Vec<u8> {
    b.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// A zeroed block.
pub fn block() -> Box<[u64; WORDS]> {
    Box::new([0u64; WORDS])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_reference_vectors_and_word_hash() {
        // Published FNV-1a 64 test vectors.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
        // One word 0x61 ("a" widened) hashes as byte "a" does.
        assert_eq!(checksum(&[0x61]), 0xaf63_dc4c_8601_ec8c);
        // The checksum word (index 3) is ignored.
        assert_eq!(checksum(&[1, 2, 3, 99]), checksum(&[1, 2, 3, 0]));
        assert_ne!(checksum(&[1, 2, 3, 0]), checksum(&[1, 2, 4, 0]));
    }

    #[test]
    fn header_layout_and_verdicts() {
        let mut b = block();
        fill(&mut b, 0x1234, 7);
        let bytes = to_bytes(&b);
        assert_eq!(&bytes[0..8], b"NVMEDBLK");
        assert_eq!(&bytes[8..16], &0x1234u64.to_le_bytes());
        assert_eq!(&bytes[16..24], &7u64.to_le_bytes());
        assert_eq!(verify(&b, 0x1234, 7), Verdict::Verified);
        assert_eq!(verify(&b, 0x1235, 7), Verdict::Misplaced);
        assert_eq!(verify(&b, 0x1234, 8), Verdict::Stale);
        // Another generation changes the payload, not only the header.
        let mut c = block();
        fill(&mut c, 0x1234, 8);
        assert_ne!(b[100], c[100]);
        // One flipped payload bit is corruption.
        b[300] ^= 1 << 17;
        assert_eq!(verify(&b, 0x1234, 7), Verdict::Corrupt);
        // So is a zeroed block (never written).
        assert_eq!(verify(&block(), 0, 0), Verdict::Corrupt);
    }
}
