//! Submission and completion rings: the request path with no system call
//! in steady state (docs/ARCHITECTURE.md, "Rings and service threads").
//!
//! A client asks for up to [`MAX_RINGS`] rings (one per CPU slot) with
//! `SetupRings`; iommud creates one client-writable memfd holding them all
//! ([`RING_BYTES`] each, ring `k` at `k * RING_BYTES`) and an eventfd, the
//! doorbell, and passes both.
//!
//! **Submitting.** The client writes [`Sqe`]s at `sq_tail` (modulo
//! [`RING_ENTRIES`]), then publishes `sq_tail` with a release store, then
//! (after a full fence) reads the published page's `ring_awake`: only when
//! iommud said every service thread serving the domain sleeps (0) does it
//! ring the doorbell (an 8-byte write to the eventfd). A service thread
//! lowers `ring_awake`, fences, and looks at its rings once more before it
//! sleeps, so either it sees the new tail or the client sees 0 (no lost
//! wake-up).
//!
//! **Waiting.** A client waiting for completions spins briefly, then yields
//! between looks; on the CPU named by `server_cpu` (where iommud pinned the
//! ring's home service thread) it yields at once, since that thread needs
//! the CPU to complete the entries.
//!
//! **Completing.** Every entry gets exactly one [`Cqe`], in order. iommud
//! writes it at its own `cq_tail`, then publishes `cq_tail` (release); the
//! client consumes and advances `cq_head`. An honest client never has more
//! than [`RING_ENTRIES`] entries submitted and not yet consumed.
//!
//! **Hostile memory.** The whole ring is client-writable. iommud keeps its
//! own `sq_head` and `cq_tail` in private memory (the copies here are for
//! the client), reads each entry's words once into a private copy before
//! validating it, never takes more than [`RING_ENTRIES`] entries for one
//! tail value, and never writes past what `cq_head` frees (a `cq_head` that
//! makes no sense frees nothing: that client's ring stalls, nobody else's).

use crate::proto::{Dir, ErrorCode};
use std::sync::atomic::{AtomicU32, AtomicU64};

/// Entries per ring (a power of two).
pub const RING_ENTRIES: u32 = 256;
/// Rings one client may have (one per CPU slot).
pub const MAX_RINGS: usize = 8;

/// The ring a client uses on CPU slot `slot` when it has `rings` rings (one
/// per CPU slot, fewer past [`MAX_RINGS`]): libdma submits there, and
/// iommud gives the ring a home service thread on such a CPU.
pub fn ring_of_cpu(slot: usize, rings: usize) -> usize {
    slot % rings.max(1)
}
/// Bytes of a ring's header (the four indices, each on its own cache line).
pub const HEADER_BYTES: usize = 4096;
/// Words (u64) of a submission entry: 64 bytes, one cache line.
pub const SQE_WORDS: usize = 8;
/// Words (u64) of a completion entry: 32 bytes.
pub const CQE_WORDS: usize = 4;
/// Bytes of one ring: header, submission entries, completion entries.
pub const RING_BYTES: usize =
    HEADER_BYTES + RING_ENTRIES as usize * 8 * SQE_WORDS + RING_ENTRIES as usize * 8 * CQE_WORDS;

/// An index on its own cache line.
#[repr(C, align(64))]
#[derive(Debug, Default)]
pub struct Index(pub AtomicU32);

/// One ring in shared memory (atomics only: the other process writes it).
#[repr(C)]
#[derive(Debug)]
pub struct RingShm {
    /// Entries submitted (client writes).
    pub sq_tail: Index,
    /// Completions consumed (client writes).
    pub cq_head: Index,
    /// Entries taken by iommud (iommud writes; a copy for the client).
    pub sq_head: Index,
    /// Completions written (iommud writes; a copy for the client).
    pub cq_tail: Index,
    /// The CPU the ring's home service thread is pinned to, plus one (0:
    /// not pinned). iommud writes it; it is advice for the client only (a
    /// waiter on that very CPU yields at once instead of spinning, since
    /// the thread that completes its entries needs that CPU), never read
    /// back by iommud.
    pub server_cpu: Index,
    _pad: [AtomicU64; (HEADER_BYTES - 5 * 64) / 8],
    /// Submission entries.
    pub sq: [[AtomicU64; SQE_WORDS]; RING_ENTRIES as usize],
    /// Completion entries.
    pub cq: [[AtomicU64; CQE_WORDS]; RING_ENTRIES as usize],
}

const _: () = assert!(std::mem::size_of::<RingShm>() == RING_BYTES);
const _: () = assert!(std::mem::offset_of!(RingShm, sq) == HEADER_BYTES);
const _: () = assert!(RING_BYTES.is_multiple_of(4096));
const _: () = assert!(RING_ENTRIES.is_power_of_two());

/// A map: `len` bytes at `offset` of registered region `region`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapArgs {
    /// Registered region (DMA pool) index, in allocation order.
    pub region: u32,
    /// Byte offset in the region.
    pub offset: u64,
    /// Bytes.
    pub len: u64,
    /// Direction.
    pub dir: Dir,
    /// The client's address of the buffer (the `va` strategy's IOVA; 0 otherwise).
    pub va: u64,
}

/// What a submission entry asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SqOp {
    /// Map a buffer of a registered region.
    Map(MapArgs),
    /// Unmap what a map returned (same `len`).
    Unmap {
        /// The IOVA a map returned.
        iova: u64,
        /// Its length.
        len: u64,
    },
    /// An unmap and a map in one entry (a NIC's RX refill: the buffer the
    /// device filled goes back at a new IOVA). The map's bounds are checked
    /// first: a remap that could never map unmaps nothing. Otherwise, once
    /// it completes, `old` is not mapped any more (refused if it was not
    /// mapped, and then nothing is mapped), and on success the completion
    /// carries the new IOVA. With `strict`, the completion follows the
    /// invalidation of `old`, as an unmap's does.
    Remap {
        /// The IOVA a map returned, to unmap.
        old: u64,
        /// Its length.
        old_len: u64,
        /// The new map.
        map: MapArgs,
    },
}

/// A submission entry: the operation and a value echoed in its completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sqe {
    /// What to do.
    pub op: SqOp,
    /// Echoed in the completion.
    pub user: u64,
}

const OP_MAP: u64 = 1;
const OP_UNMAP: u64 = 2;
const OP_REMAP: u64 = 3;

/// w0 bit 16: the client collects this entry's completion later, not at
/// once (a NIC's RX refill). iommud may then hold a `strict` pass made only
/// of such entries, its entries written and its IOVAs not reused, and issue
/// its invalidation and post its completions after serving other work, for
/// at most [`LAZY_HOLD_US`] by default (docs/ARCHITECTURE.md, "Rings and
/// service threads"). It changes nothing else about the entry.
pub const SQE_LAZY: u64 = 1 << 16;
/// w0 bit 17, on a remap entry: the client lets iommud keep the old IOVA
/// when the new buffer is the same memory, in the same direction, as the
/// old mapping (a recycled RX or TX buffer). Under `percore` or `deferred`
/// iommud then answers with the old IOVA and changes no entry: the device
/// reaches exactly the pages it could reach through the old, not yet
/// invalidated, mapping anyway. Never honoured under `strict`, whose unmap
/// promises the old IOVA is dead (docs/ARCHITECTURE.md, "Kept remaps").
pub const SQE_KEEP: u64 = 1 << 17;
/// The hint bits a client may set in w0 ([`SQE_LAZY`], [`SQE_KEEP`]).
pub const SQE_HINTS: u64 = SQE_LAZY | SQE_KEEP;
/// The longest iommud holds a lazy pass by default (µs; its
/// `--lazy-hold-us`).
pub const LAZY_HOLD_US: u64 = 200;

/// Why a submission entry cannot be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SqeError {
    /// Unknown operation byte.
    #[error("unknown ring operation {0}")]
    Op(u64),
    /// Unknown direction.
    #[error("unknown direction {0}")]
    Dir(u64),
}

impl Sqe {
    /// [`Sqe::encode`], with the hint bits of `hints` ([`SQE_HINTS`]; others
    /// are dropped) set in w0.
    pub fn encode_hinted(&self, hints: u64) -> [u64; SQE_WORDS] {
        let mut w = self.encode();
        w[0] |= hints & SQE_HINTS;
        w
    }

    /// Whether an entry's words carry [`SQE_LAZY`] (hostile words: only a
    /// hint about the client's own completions).
    pub fn is_lazy(w: &[u64; SQE_WORDS]) -> bool {
        w[0] & SQE_LAZY != 0
    }

    /// Whether an entry's words carry [`SQE_KEEP`] (hostile words: it can
    /// only let iommud answer a remap with the client's own old IOVA).
    pub fn is_keep(w: &[u64; SQE_WORDS]) -> bool {
        w[0] & SQE_KEEP != 0
    }

    /// The entry's words: w0 = op (bits 7:0) | dir (15:8) | region (63:32),
    /// w1 = offset or IOVA, w2 = length, w3 = va, w4 = user, w5 = the old
    /// IOVA and w6 its length (remap), w7 = 0.
    pub fn encode(&self) -> [u64; SQE_WORDS] {
        let mut w = [0u64; SQE_WORDS];
        match self.op {
            SqOp::Map(m) => m.put(OP_MAP, &mut w),
            SqOp::Unmap { iova, len } => {
                w[0] = OP_UNMAP;
                w[1] = iova;
                w[2] = len;
            }
            SqOp::Remap { old, old_len, map } => {
                map.put(OP_REMAP, &mut w);
                w[5] = old;
                w[6] = old_len;
            }
        }
        w[4] = self.user;
        w
    }

    /// Decodes a private copy of an entry's words (hostile: any value).
    pub fn decode(w: &[u64; SQE_WORDS]) -> Result<Sqe, SqeError> {
        let op = match w[0] & 0xff {
            OP_MAP => SqOp::Map(MapArgs::take(w)?),
            OP_UNMAP => SqOp::Unmap {
                iova: w[1],
                len: w[2],
            },
            OP_REMAP => SqOp::Remap {
                old: w[5],
                old_len: w[6],
                map: MapArgs::take(w)?,
            },
            other => return Err(SqeError::Op(other)),
        };
        Ok(Sqe { op, user: w[4] })
    }
}

impl MapArgs {
    /// Writes `op` and the map into an entry's words w0..w3.
    fn put(&self, op: u64, w: &mut [u64; SQE_WORDS]) {
        w[0] = op | (self.dir as u64) << 8 | u64::from(self.region) << 32;
        w[1] = self.offset;
        w[2] = self.len;
        w[3] = self.va;
    }

    /// The map of an entry's words w0..w3 (hostile: any value).
    fn take(w: &[u64; SQE_WORDS]) -> Result<MapArgs, SqeError> {
        let d = (w[0] >> 8) & 0xff;
        Ok(MapArgs {
            region: (w[0] >> 32) as u32,
            offset: w[1],
            len: w[2],
            dir: Dir::from_u64(d).ok_or(SqeError::Dir(d))?,
            va: w[3],
        })
    }
}

/// A completion entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cqe {
    /// The submission's `user`.
    pub user: u64,
    /// The IOVA (map) or 0, or the error.
    pub result: Result<u64, ErrorCode>,
}

impl Cqe {
    /// The entry's words: w0 = user, w1 = value, w2 = status (0 or an
    /// [`ErrorCode`]), w3 = 0.
    pub fn encode(&self) -> [u64; CQE_WORDS] {
        match self.result {
            Ok(v) => [self.user, v, 0, 0],
            Err(c) => [self.user, 0, c as u64, 0],
        }
    }

    /// Decodes a completion (from iommud: still checked, a bad status is
    /// reported as `Hardware`).
    pub fn decode(w: &[u64; CQE_WORDS]) -> Cqe {
        let result = if w[2] == 0 {
            Ok(w[1])
        } else {
            Err(u32::try_from(w[2])
                .ok()
                .and_then(ErrorCode::from_status)
                .filter(|c| *c != ErrorCode::Malformed || w[2] == 1)
                .unwrap_or(ErrorCode::Hardware))
        };
        Cqe { user: w[0], result }
    }
}

/// Views ring `k` of a mapping of the ring memfd.
///
/// # Safety
/// `base` must be the start of a live shared mapping of at least
/// `(k + 1) * RING_BYTES` bytes, page-aligned, that outlives `'a`.
pub unsafe fn ring_at<'a>(base: *mut u8, k: usize) -> &'a RingShm {
    // SAFETY: the caller guarantees the mapping; RingShm is atomics only.
    unsafe { crate::shared::view(base.add(k * RING_BYTES)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_by_hand() {
        // 4 KiB header, 256 × 64 B submissions, 256 × 32 B completions.
        assert_eq!(RING_BYTES, 4096 + 16384 + 8192);
        assert_eq!(std::mem::offset_of!(RingShm, cq_head), 64);
        assert_eq!(std::mem::offset_of!(RingShm, sq_head), 128);
        assert_eq!(std::mem::offset_of!(RingShm, cq_tail), 192);
        assert_eq!(std::mem::offset_of!(RingShm, server_cpu), 256);
        assert_eq!(std::mem::offset_of!(RingShm, cq), 4096 + 16384);
    }

    #[test]
    fn a_cpu_slot_uses_its_ring_modulo_the_rings() {
        assert_eq!(ring_of_cpu(0, 2), 0);
        assert_eq!(ring_of_cpu(1, 2), 1);
        assert_eq!(ring_of_cpu(9, 8), 1);
        assert_eq!(ring_of_cpu(5, 1), 0);
        assert_eq!(ring_of_cpu(3, 0), 0, "no rings: never a division by zero");
    }

    #[test]
    fn entries_encode_by_hand() {
        let m = Sqe {
            op: SqOp::Map(MapArgs {
                region: 3,
                offset: 0x1234,
                len: 1500,
                dir: Dir::FromDevice,
                va: 0x7f00_0000_1000,
            }),
            user: 99,
        };
        let w = m.encode();
        assert_eq!(w[0], 1 | 2 << 8 | 3 << 32);
        assert_eq!(&w[1..5], &[0x1234, 1500, 0x7f00_0000_1000, 99]);
        assert_eq!(Sqe::decode(&w), Ok(m));
        // The lazy hint is bit 16 of w0, the keep hint bit 17; they change
        // nothing else, and no other bit passes as a hint.
        let l = m.encode_hinted(SQE_LAZY);
        assert_eq!(l[0], w[0] | 0x1_0000);
        assert_eq!(&l[1..], &w[1..]);
        assert!(Sqe::is_lazy(&l) && !Sqe::is_lazy(&w) && !Sqe::is_keep(&l));
        assert_eq!(Sqe::decode(&l), Ok(m));
        let k = m.encode_hinted(SQE_KEEP);
        assert_eq!(k[0], w[0] | 0x2_0000);
        assert!(Sqe::is_keep(&k) && !Sqe::is_lazy(&k));
        assert_eq!(Sqe::decode(&k), Ok(m));
        assert_eq!(m.encode_hinted(0), w);
        assert_eq!(m.encode_hinted(!0)[0], w[0] | 0x3_0000);
        let u = Sqe {
            op: SqOp::Unmap {
                iova: 0x4000_2000,
                len: 64,
            },
            user: 7,
        };
        assert_eq!(u.encode(), [2, 0x4000_2000, 64, 0, 7, 0, 0, 0]);
        assert_eq!(Sqe::decode(&u.encode()), Ok(u));
        let r = Sqe {
            op: SqOp::Remap {
                old: 0x4000_3000,
                old_len: 2048,
                map: MapArgs {
                    region: 2,
                    offset: 0x800,
                    len: 2048,
                    dir: Dir::FromDevice,
                    va: 0,
                },
            },
            user: 11,
        };
        assert_eq!(
            r.encode(),
            [
                3 | 2 << 8 | 2 << 32,
                0x800,
                2048,
                0,
                11,
                0x4000_3000,
                2048,
                0
            ]
        );
        assert_eq!(Sqe::decode(&r.encode()), Ok(r));
        assert_eq!(
            Sqe::decode(&[3 | 9 << 8, 0, 0, 0, 0, 0, 0, 0]),
            Err(SqeError::Dir(9))
        );
        assert_eq!(Sqe::decode(&[9, 0, 0, 0, 0, 0, 0, 0]), Err(SqeError::Op(9)));
        assert_eq!(
            Sqe::decode(&[1 | 7 << 8, 0, 0, 0, 0, 0, 0, 0]),
            Err(SqeError::Dir(7))
        );
        let c = Cqe {
            user: 5,
            result: Err(ErrorCode::NotOwner),
        };
        assert_eq!(c.encode(), [5, 0, ErrorCode::NotOwner as u64, 0]);
        assert_eq!(Cqe::decode(&c.encode()), c);
        assert_eq!(Cqe::decode(&[1, 0x4000_0000, 0, 0]).result, Ok(0x4000_0000));
        assert_eq!(
            Cqe::decode(&[1, 0, 0xdead, 0]).result,
            Err(ErrorCode::Hardware)
        );
    }
}
