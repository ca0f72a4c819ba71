//! Typed replies: what the five argument words of a reply mean, per
//! operation, written and read in one place.

/// Attach reply flag: the unit is in caching mode (CAP.CM): even a
/// not-present → present change must be invalidated before the device uses it.
pub const FLAG_CACHING_MODE: u64 = 1 << 0;
/// Attach reply flag: table walks are cache-coherent (ECAP.C), so nobody
/// writes back CPU cache lines after writing an entry.
pub const FLAG_COHERENT: u64 = 1 << 1;
/// Attach reply flag: DMA remapping is on (off: IOVA = physical address).
pub const FLAG_TRANSLATING: u64 = 1 << 2;
/// Attach reply flag: validated trust: iommud checks every map and writes
/// every entry (for the magazine strategy it keeps the magazines itself and
/// serves maps through the rings, `crate::ring`).
pub const FLAG_VALIDATED: u64 = 1 << 3;

/// The reply to `Attach`. Shares, in order: the published page (map it
/// read-only), the client page, and, for a delegated domain, the leaf-table
/// arena.
///
/// ```text
/// args[0] domain id   args[1] FLAG_* bits
/// args[2] arena physical address, args[3] its offset in its share,
/// args[4] its length (all 0: no arena)
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AttachReply {
    /// The domain id in the context entry.
    pub did: u16,
    /// `FLAG_*` bits.
    pub flags: u64,
    /// The arena, if the domain has delegated trust: (physical address,
    /// offset in the third share, length).
    pub arena: Option<(u64, u64, u64)>,
}

impl AttachReply {
    /// The argument words.
    pub fn encode(&self) -> [u64; 5] {
        let (p, o, l) = self.arena.unwrap_or_default();
        [u64::from(self.did), self.flags, p, o, l]
    }

    /// From the argument words; `None` if they cannot be an attach reply.
    pub fn decode(a: [u64; 5]) -> Option<AttachReply> {
        let did = u16::try_from(a[0]).ok()?;
        let arena = match (a[2], a[3], a[4]) {
            (0, 0, 0) => None,
            (_, _, 0) => return None,
            (p, o, l) => Some((p, o, l)),
        };
        Some(AttachReply {
            did,
            flags: a[1],
            arena,
        })
    }
}

/// The reply to `AllocPool`: the memory is `len` bytes of the share from
/// `fd_offset`, physically contiguous from `phys`; it is registered region
/// `region` (ring map entries name it), and with the `static` strategy it is
/// mapped whole at `iova` (0 otherwise).
///
/// ```text
/// args[0] phys   args[1] fd_offset   args[2] len   args[3] region   args[4] iova
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolReply {
    /// Physical address of the first byte.
    pub phys: u64,
    /// Offset of the pool in the share (page-aligned).
    pub fd_offset: u64,
    /// Bytes.
    pub len: u64,
    /// Registered region index (allocation order within the domain).
    pub region: u32,
    /// The static strategy's IOVA of the first byte (0: not mapped whole).
    pub iova: u64,
}

impl PoolReply {
    /// The argument words.
    pub fn encode(&self) -> [u64; 5] {
        [
            self.phys,
            self.fd_offset,
            self.len,
            u64::from(self.region),
            self.iova,
        ]
    }

    /// From the argument words; `None` for an empty or misaligned pool.
    pub fn decode(a: [u64; 5]) -> Option<PoolReply> {
        (a[2] != 0 && a[1].is_multiple_of(4096)).then_some(PoolReply {
            phys: a[0],
            fd_offset: a[1],
            len: a[2],
            region: u32::try_from(a[3]).ok()?,
            iova: a[4],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attach_replies_round_trip_and_bad_ones_are_refused() {
        let r = AttachReply {
            did: 3,
            flags: FLAG_TRANSLATING | FLAG_CACHING_MODE,
            arena: Some((0x20_0000, 0x1000, 0x20_0000)),
        };
        assert_eq!(r.encode(), [3, 0b101, 0x20_0000, 0x1000, 0x20_0000]);
        assert_eq!(AttachReply::decode(r.encode()), Some(r));
        let v = AttachReply {
            did: 7,
            flags: FLAG_TRANSLATING,
            arena: None,
        };
        assert_eq!(v.encode(), [7, 4, 0, 0, 0]);
        assert_eq!(AttachReply::decode(v.encode()), Some(v));
        assert_eq!(AttachReply::decode([1 << 16, 0, 0, 0, 0]), None);
        assert_eq!(AttachReply::decode([1, 0, 0x1000, 0, 0]), None);
    }

    #[test]
    fn pool_replies_round_trip() {
        let p = PoolReply {
            phys: 0x4000_0000,
            fd_offset: 0x20_0000,
            len: 1 << 20,
            region: 2,
            iova: 0x4020_0000,
        };
        assert_eq!(
            p.encode(),
            [0x4000_0000, 0x20_0000, 1 << 20, 2, 0x4020_0000]
        );
        assert_eq!(PoolReply::decode(p.encode()), Some(p));
        assert_eq!(PoolReply::decode([1, 0, 0, 0, 0]), None);
        assert_eq!(PoolReply::decode([1, 0x800, 4096, 0, 0]), None);
        assert_eq!(PoolReply::decode([1, 0, 4096, 1 << 32, 0]), None);
    }
}
