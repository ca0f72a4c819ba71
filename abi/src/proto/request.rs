//! Requests: the operations a client may ask for, their fields, and their
//! encoding (see the byte table in [`super`]).

use super::*;

/// A request, decoded and validated for shape (not yet against server state).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// args: [version].
    Hello {
        /// The client's [`VERSION`].
        version: u64,
    },
    /// args: [bdf, strategy, flush].
    Attach {
        /// PCI source id (bus << 8 | dev << 3 | fn).
        bdf: u16,
        /// Requested strategy.
        strategy: Strategy,
        /// Requested flush policy.
        flush: FlushPolicy,
    },
    /// args: [bdf, token low, token high]. Reply: as [`Request::Attach`]'s.
    Reattach {
        /// PCI source id.
        bdf: u16,
        /// The reattach token of the first attach's reply.
        token: u128,
    },
    /// args: [bytes]. Reply args: [phys_base, fd_offset, len]; fd attached.
    AllocPool {
        /// Bytes wanted (rounded up to the platform's chunk).
        bytes: u64,
    },
    /// args: [phys, len, dir, va]. Reply args: [iova].
    Map {
        /// Physical address of the buffer.
        phys: u64,
        /// Length in bytes (> 0).
        len: u64,
        /// Direction.
        dir: Dir,
        /// The client's virtual address of `phys` (0 = not given). The `va`
        /// strategy uses it as the IOVA; the others ignore it.
        va: u64,
    },
    /// args: [iova, len].
    Unmap {
        /// IOVA returned by [`Request::Map`].
        iova: u64,
        /// Length given to the map.
        len: u64,
    },
    /// args: [pages, returned, want]. The client wrote `returned` clean IOVAs of
    /// size class `pages` into the exchange page; the reply's args[0] says how
    /// many full-magazine IOVAs iommud wrote back there (at most `want`).
    Exchange {
        /// Size class in pages (a power of two, 1..=32).
        pages: u64,
        /// IOVAs handed back in the exchange page.
        returned: u64,
        /// IOVAs wanted (≤ magazine size).
        want: u64,
    },
    /// No args, no reply.
    FlushHint,
    /// args: [epoch]. Reply args: [completed epoch]. With `epoch` 0, an
    /// invalidation that starts after the request arrived; otherwise one that
    /// completes `epoch` (the tag a client waits for), which a flush already
    /// under way may be. iommud bounds it by its own epoch.
    FlushSync {
        /// The epoch the client needs completed (0: whatever was cleared
        /// before this request).
        upto: u64,
    },
    /// No args.
    Detach,
    /// Payload: UTF-8 path.
    ReadPath {
        /// The path, e.g. `/scheme/iommu/stats`.
        path: String,
    },
    /// Payload: path, NUL, value.
    WritePath {
        /// The path.
        path: String,
        /// The value written.
        value: String,
    },
    /// No args. Reply: fds (memory, state), args [mem_bytes].
    SimInfo,
    /// No args.
    Shutdown,
    /// args: [n]; payload: n records of [`MAP_RECORD`] bytes, each
    /// `phys, len, dir, va` as u64. Reply args: [n]; payload: n IOVAs (u64).
    /// All or nothing: on an error no entry of the batch stays mapped, and
    /// the message names the first entry that failed.
    MapBatch {
        /// The buffers (1..=[`MAX_BATCH`]).
        entries: Vec<MapEntry>,
    },
    /// args: [n]; payload: n records of [`UNMAP_RECORD`] bytes, each
    /// `iova, len` as u64. In order; on an error the entries before the
    /// failing one are unmapped and the message names it.
    UnmapBatch {
        /// `(iova, len)` pairs (1..=[`MAX_BATCH`]).
        entries: Vec<(u64, u64)>,
    },
    /// args: [rings]. Creates the client's submission and completion rings
    /// (1..=`ring::MAX_RINGS`, see `crate::ring`). Reply args: [rings,
    /// ring bytes]; shares: the ring memfd (client-writable) and the doorbell
    /// eventfd.
    SetupRings {
        /// How many rings (one per CPU slot the client uses).
        rings: u64,
    },
}

/// Most entries one batch request carries (64 × 32 bytes = 2 KiB of payload).
pub const MAX_BATCH: usize = 64;
/// Bytes of one [`Request::MapBatch`] record.
pub const MAP_RECORD: usize = 32;
/// Bytes of one [`Request::UnmapBatch`] record.
pub const UNMAP_RECORD: usize = 16;

/// One buffer of a [`Request::MapBatch`]: the fields of [`Request::Map`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapEntry {
    /// Physical address of the buffer.
    pub phys: u64,
    /// Length in bytes (> 0).
    pub len: u64,
    /// Direction.
    pub dir: Dir,
    /// The client's virtual address of `phys` (0 = not given).
    pub va: u64,
}

fn u64_le(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// Splits a batch payload into `n` records of `size` bytes, checking that
/// `n` is in 1..=[`MAX_BATCH`] and matches the payload exactly.
fn records(payload: &[u8], n: u64, size: usize) -> Result<std::slice::Chunks<'_, u8>, ProtoError> {
    let n = usize::try_from(n).map_err(|_| ProtoError::BadField("batch count"))?;
    if n == 0 || n > MAX_BATCH {
        return Err(ProtoError::BadField("batch count not in 1..=MAX_BATCH"));
    }
    if payload.len() != n * size {
        return Err(ProtoError::BadField(
            "batch payload length != count * record size",
        ));
    }
    Ok(payload.chunks(size))
}

impl Request {
    /// The op code of this request.
    pub fn op(&self) -> Op {
        match self {
            Request::Hello { .. } => Op::Hello,
            Request::Attach { .. } => Op::Attach,
            Request::Reattach { .. } => Op::Reattach,
            Request::AllocPool { .. } => Op::AllocPool,
            Request::Map { .. } => Op::Map,
            Request::Unmap { .. } => Op::Unmap,
            Request::Exchange { .. } => Op::Exchange,
            Request::FlushHint => Op::FlushHint,
            Request::FlushSync { .. } => Op::FlushSync,
            Request::Detach => Op::Detach,
            Request::ReadPath { .. } => Op::ReadPath,
            Request::WritePath { .. } => Op::WritePath,
            Request::SimInfo => Op::SimInfo,
            Request::Shutdown => Op::Shutdown,
            Request::MapBatch { .. } => Op::MapBatch,
            Request::UnmapBatch { .. } => Op::UnmapBatch,
            Request::SetupRings { .. } => Op::SetupRings,
        }
    }

    /// Whether iommud answers this request (all but [`Request::FlushHint`]).
    pub fn wants_reply(&self) -> bool {
        !matches!(self, Request::FlushHint)
    }

    /// Encodes into a frame with the given sequence number.
    pub fn to_frame(&self, seq: u32) -> Frame {
        let mut args = [0u64; 5];
        let mut payload = Vec::new();
        match self {
            Request::Hello { version } => args[0] = *version,
            Request::Attach {
                bdf,
                strategy,
                flush,
            } => {
                args[0] = u64::from(*bdf);
                args[1] = *strategy as u64;
                args[2] = *flush as u64;
            }
            Request::Reattach { bdf, token } => {
                args[0] = u64::from(*bdf);
                args[1] = *token as u64;
                args[2] = (*token >> 64) as u64;
            }
            Request::AllocPool { bytes } => args[0] = *bytes,
            Request::SetupRings { rings } => args[0] = *rings,
            Request::Map { phys, len, dir, va } => {
                args[0] = *phys;
                args[1] = *len;
                args[2] = *dir as u64;
                args[3] = *va;
            }
            Request::Unmap { iova, len } => {
                args[0] = *iova;
                args[1] = *len;
            }
            Request::Exchange {
                pages,
                returned,
                want,
            } => {
                args[0] = *pages;
                args[1] = *returned;
                args[2] = *want;
            }
            Request::ReadPath { path } => payload = path.as_bytes().to_vec(),
            Request::WritePath { path, value } => {
                payload = path.as_bytes().to_vec();
                payload.push(0);
                payload.extend_from_slice(value.as_bytes());
            }
            Request::MapBatch { entries } => {
                args[0] = entries.len() as u64;
                for e in entries {
                    for v in [e.phys, e.len, e.dir as u64, e.va] {
                        payload.extend_from_slice(&v.to_le_bytes());
                    }
                }
            }
            Request::UnmapBatch { entries } => {
                args[0] = entries.len() as u64;
                for (iova, len) in entries {
                    payload.extend_from_slice(&iova.to_le_bytes());
                    payload.extend_from_slice(&len.to_le_bytes());
                }
            }
            Request::FlushSync { upto } => args[0] = *upto,
            Request::FlushHint | Request::Detach | Request::SimInfo | Request::Shutdown => {}
        }
        Frame {
            op: self.op(),
            reply: false,
            seq,
            status: 0,
            args,
            payload,
        }
    }

    /// Encodes into a datagram.
    pub fn encode(&self, seq: u32) -> Vec<u8> {
        self.to_frame(seq).encode()
    }

    /// Decodes and shape-checks a request datagram; returns its sequence number too.
    pub fn decode(b: &[u8]) -> Result<(u32, Request), ProtoError> {
        let f = Frame::decode(b)?;
        if f.reply || f.status != 0 {
            return Err(ProtoError::BadField("reply bit or status set in a request"));
        }
        let a = f.args;
        let no_payload = |r: Request| {
            if f.payload.is_empty() {
                Ok(r)
            } else {
                Err(ProtoError::BadField("unexpected payload"))
            }
        };
        let req = match f.op {
            Op::Hello => no_payload(Request::Hello { version: a[0] })?,
            Op::Attach => no_payload(Request::Attach {
                bdf: u16::try_from(a[0]).map_err(|_| ProtoError::BadField("bdf > 0xffff"))?,
                strategy: Strategy::from_u64(a[1])
                    .ok_or(ProtoError::BadField("unknown strategy"))?,
                flush: FlushPolicy::from_u64(a[2])
                    .ok_or(ProtoError::BadField("unknown flush policy"))?,
            })?,
            Op::Reattach => no_payload(Request::Reattach {
                bdf: u16::try_from(a[0]).map_err(|_| ProtoError::BadField("bdf > 0xffff"))?,
                token: u128::from(a[1]) | (u128::from(a[2]) << 64),
            })?,
            Op::AllocPool => no_payload(Request::AllocPool { bytes: a[0] })?,
            Op::SetupRings => no_payload(Request::SetupRings { rings: a[0] })?,
            Op::Map => no_payload(Request::Map {
                phys: a[0],
                len: a[1],
                dir: Dir::from_u64(a[2]).ok_or(ProtoError::BadField("unknown direction"))?,
                va: a[3],
            })?,
            Op::Unmap => no_payload(Request::Unmap {
                iova: a[0],
                len: a[1],
            })?,
            Op::Exchange => no_payload(Request::Exchange {
                pages: a[0],
                returned: a[1],
                want: a[2],
            })?,
            Op::FlushHint => no_payload(Request::FlushHint)?,
            Op::FlushSync => no_payload(Request::FlushSync { upto: a[0] })?,
            Op::Detach => no_payload(Request::Detach)?,
            Op::SimInfo => no_payload(Request::SimInfo)?,
            Op::Shutdown => no_payload(Request::Shutdown)?,
            Op::MapBatch => Request::MapBatch {
                entries: records(&f.payload, a[0], MAP_RECORD)?
                    .map(|r| {
                        Ok(MapEntry {
                            phys: u64_le(&r[0..]),
                            len: u64_le(&r[8..]),
                            dir: Dir::from_u64(u64_le(&r[16..]))
                                .ok_or(ProtoError::BadField("unknown direction"))?,
                            va: u64_le(&r[24..]),
                        })
                    })
                    .collect::<Result<_, ProtoError>>()?,
            },
            Op::UnmapBatch => Request::UnmapBatch {
                entries: records(&f.payload, a[0], UNMAP_RECORD)?
                    .map(|r| (u64_le(&r[0..]), u64_le(&r[8..])))
                    .collect(),
            },
            Op::ReadPath => Request::ReadPath {
                path: String::from_utf8(f.payload.clone())
                    .map_err(|_| ProtoError::BadField("path is not UTF-8"))?,
            },
            Op::WritePath => {
                let nul = f
                    .payload
                    .iter()
                    .position(|&c| c == 0)
                    .ok_or(ProtoError::BadField("write payload has no NUL"))?;
                Request::WritePath {
                    path: String::from_utf8(f.payload[..nul].to_vec())
                        .map_err(|_| ProtoError::BadField("path is not UTF-8"))?,
                    value: String::from_utf8(f.payload[nul + 1..].to_vec())
                        .map_err(|_| ProtoError::BadField("value is not UTF-8"))?,
                }
            }
        };
        Ok((f.seq, req))
    }
}
