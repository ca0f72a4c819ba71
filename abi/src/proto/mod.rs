//! The wire protocol between libdma and iommud, defined in one place.
//!
//! Every message is one datagram on a Unix `SOCK_SEQPACKET` socket: a fixed
//! 64-byte header, optionally followed by a payload of at most
//! [`MAX_PAYLOAD`] bytes (only the path operations carry one). All integers
//! are little-endian. File descriptors (shared memory) travel beside the
//! datagram as `SCM_RIGHTS`.
//!
//! ```text
//! offset size field
//!      0    4 magic        "IOMD" (0x444D_4F49 little-endian)
//!      4    2 version      [`VERSION`]
//!      6    2 op           [`Op`]; a reply carries the request's op | 0x8000
//!      8    4 seq          chosen by the client, echoed by the reply
//!     12    4 status       0 = ok, else an [`ErrorCode`] (replies only)
//!     16   40 args         five u64, meaning per op (see [`Request`])
//!     56    4 payload_len  bytes after the header
//!     60    4 reserved     must be 0
//! ```
//!
//! Decoding never panics: any byte string gives a message or a [`ProtoError`].

use thiserror::Error;

/// `"IOMD"` read as a little-endian u32.
pub const MAGIC: u32 = u32::from_le_bytes(*b"IOMD");
/// Protocol version; bumped on any incompatible change.
pub const VERSION: u16 = 2;
/// Size of the fixed header.
pub const HEADER_LEN: usize = 64;
/// Largest payload (path text) a message may carry.
pub const MAX_PAYLOAD: usize = 16 * 1024;
/// Largest datagram either side sends or accepts.
pub const MAX_MESSAGE: usize = HEADER_LEN + MAX_PAYLOAD;
/// Bit set in `op` of every reply.
pub const REPLY_BIT: u16 = 0x8000;

/// Operation codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Op {
    /// Version handshake.
    Hello = 1,
    /// Attach to (create) the domain of a PCI function.
    Attach = 2,
    /// Allocate DMA-capable memory for the client.
    AllocPool = 3,
    /// Map `len` bytes at physical `phys` (iommud allocates the IOVA).
    Map = 4,
    /// Unmap a mapping made by [`Op::Map`].
    Unmap = 5,
    /// Return a magazine of clean IOVAs and/or take a full one.
    Exchange = 6,
    /// One-way: the domain has unmapped IOVAs waiting for invalidation.
    FlushHint = 7,
    /// Invalidate now and reply when the domain's completed epoch covers all unmaps.
    FlushSync = 8,
    /// Give the domain back: iommud unmaps, invalidates and reclaims everything.
    Detach = 9,
    /// Read a scheme path (payload: path); reply payload: text.
    ReadPath = 10,
    /// Write a scheme path (payload: path, NUL, value).
    WritePath = 11,
    /// Sim platform only: get the simulated machine's memory and state fds.
    SimInfo = 12,
    /// Stop the daemon.
    Shutdown = 13,
    /// Validated trust: map up to [`MAX_BATCH`] buffers in one request.
    MapBatch = 14,
    /// Unmap up to [`MAX_BATCH`] mappings in one request.
    UnmapBatch = 15,
    /// Create the client's submission and completion rings (`crate::ring`).
    SetupRings = 16,
    /// Reattach to a domain a restarted iommud adopted, proving with the
    /// token the first attach's reply carried (docs/ARCHITECTURE.md, "Stop,
    /// crash and restart").
    Reattach = 17,
}

impl Op {
    fn from_u16(v: u16) -> Option<Op> {
        Some(match v {
            1 => Op::Hello,
            2 => Op::Attach,
            3 => Op::AllocPool,
            4 => Op::Map,
            5 => Op::Unmap,
            6 => Op::Exchange,
            7 => Op::FlushHint,
            8 => Op::FlushSync,
            9 => Op::Detach,
            10 => Op::ReadPath,
            11 => Op::WritePath,
            12 => Op::SimInfo,
            13 => Op::Shutdown,
            14 => Op::MapBatch,
            15 => Op::UnmapBatch,
            16 => Op::SetupRings,
            17 => Op::Reattach,
            _ => return None,
        })
    }
}

/// Error codes carried in a reply's `status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
#[repr(u32)]
pub enum ErrorCode {
    /// The request could not be decoded.
    #[error("malformed request")]
    Malformed = 1,
    /// The client speaks another protocol version.
    #[error("protocol version mismatch")]
    Version = 2,
    /// An argument is out of range or inconsistent.
    #[error("invalid argument")]
    Invalid = 3,
    /// The request needs an attached domain and there is none.
    #[error("no domain attached")]
    NoDomain = 4,
    /// The domain is in use (attached elsewhere, or not idle for a switch).
    #[error("busy")]
    Busy = 5,
    /// Out of physical memory for tables or pools.
    #[error("out of memory")]
    NoMemory = 6,
    /// Out of IOVA space.
    #[error("out of IOVA space")]
    NoSpace = 7,
    /// A frame or IOVA does not belong to the caller.
    #[error("not owned by this client")]
    NotOwner = 8,
    /// A hardware wait ran out of time.
    #[error("hardware timeout")]
    Timeout = 9,
    /// The operation does not apply to this strategy or platform.
    #[error("unsupported")]
    Unsupported = 10,
    /// No such scheme path.
    #[error("no such path")]
    NotFound = 11,
    /// The hardware reported an error.
    #[error("hardware error")]
    Hardware = 12,
    /// The caller lacks the identity, the proof of device ownership or the
    /// administrator's permission the request needs (the message says which).
    #[error("permission denied")]
    PermissionDenied = 13,
    /// The caller's identity holds all of one resource its quota allows
    /// (the message names the quota).
    #[error("quota exceeded")]
    QuotaExceeded = 14,
}

impl ErrorCode {
    /// Decodes a status word; `None` for 0 (ok) and unknown codes map to `Malformed`.
    pub fn from_status(status: u32) -> Option<ErrorCode> {
        Some(match status {
            0 => return None,
            2 => ErrorCode::Version,
            3 => ErrorCode::Invalid,
            4 => ErrorCode::NoDomain,
            5 => ErrorCode::Busy,
            6 => ErrorCode::NoMemory,
            7 => ErrorCode::NoSpace,
            8 => ErrorCode::NotOwner,
            9 => ErrorCode::Timeout,
            10 => ErrorCode::Unsupported,
            11 => ErrorCode::NotFound,
            12 => ErrorCode::Hardware,
            13 => ErrorCode::PermissionDenied,
            14 => ErrorCode::QuotaExceeded,
            _ => ErrorCode::Malformed,
        })
    }
}

/// Why a byte string is not a message.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum ProtoError {
    /// Fewer bytes than the header.
    #[error("truncated message: {0} bytes, header needs {HEADER_LEN}")]
    Truncated(usize),
    /// Wrong magic number.
    #[error("bad magic {0:#010x}")]
    BadMagic(u32),
    /// Unsupported protocol version.
    #[error("unsupported protocol version {0} (this side speaks {VERSION})")]
    BadVersion(u16),
    /// Unknown operation code.
    #[error("unknown op {0:#06x}")]
    BadOp(u16),
    /// `payload_len` disagrees with the datagram or exceeds the maximum.
    #[error(
        "payload length {claimed} does not match the {actual} bytes received (max {MAX_PAYLOAD})"
    )]
    BadPayloadLen {
        /// Length in the header.
        claimed: usize,
        /// Bytes actually after the header.
        actual: usize,
    },
    /// Reserved bits are not zero.
    #[error("reserved field is not zero")]
    Reserved,
    /// A field has a value the op does not allow.
    #[error("bad field: {0}")]
    BadField(&'static str),
}

mod kinds;
mod replies;
mod request;

pub use kinds::{Dir, FlushPolicy, Strategy};
pub use replies::{
    AttachReply, PoolReply, FLAG_CACHING_MODE, FLAG_COHERENT, FLAG_TRANSLATING, FLAG_VALIDATED,
};
pub use request::{MapEntry, Request, MAP_RECORD, MAX_BATCH, UNMAP_RECORD};

/// A decoded message header with its arguments and payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// Operation (reply bit stripped).
    pub op: Op,
    /// True for replies.
    pub reply: bool,
    /// Sequence number.
    pub seq: u32,
    /// Status (replies).
    pub status: u32,
    /// Arguments.
    pub args: [u64; 5],
    /// Payload bytes.
    pub payload: Vec<u8>,
}

impl Frame {
    /// Encodes into a datagram.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_LEN + self.payload.len()];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..6].copy_from_slice(&VERSION.to_le_bytes());
        let op = self.op as u16 | if self.reply { REPLY_BIT } else { 0 };
        b[6..8].copy_from_slice(&op.to_le_bytes());
        b[8..12].copy_from_slice(&self.seq.to_le_bytes());
        b[12..16].copy_from_slice(&self.status.to_le_bytes());
        for (i, a) in self.args.iter().enumerate() {
            b[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_le_bytes());
        }
        b[56..60].copy_from_slice(&(self.payload.len() as u32).to_le_bytes());
        b[HEADER_LEN..].copy_from_slice(&self.payload);
        b
    }

    /// Decodes a datagram; never panics.
    pub fn decode(b: &[u8]) -> Result<Frame, ProtoError> {
        if b.len() < HEADER_LEN {
            return Err(ProtoError::Truncated(b.len()));
        }
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(a)
        };
        let magic = u32_at(0);
        if magic != MAGIC {
            return Err(ProtoError::BadMagic(magic));
        }
        let version = u16_at(4);
        if version != VERSION {
            return Err(ProtoError::BadVersion(version));
        }
        let raw_op = u16_at(6);
        let op = Op::from_u16(raw_op & !REPLY_BIT).ok_or(ProtoError::BadOp(raw_op))?;
        let claimed = u32_at(56) as usize;
        let actual = b.len() - HEADER_LEN;
        if claimed != actual || claimed > MAX_PAYLOAD {
            return Err(ProtoError::BadPayloadLen { claimed, actual });
        }
        if u32_at(60) != 0 {
            return Err(ProtoError::Reserved);
        }
        let mut args = [0u64; 5];
        for (i, a) in args.iter_mut().enumerate() {
            *a = u64_at(16 + 8 * i);
        }
        Ok(Frame {
            op,
            reply: raw_op & REPLY_BIT != 0,
            seq: u32_at(8),
            status: u32_at(12),
            args,
            payload: b[HEADER_LEN..].to_vec(),
        })
    }
}

/// A reply: status, arguments, payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// Op being answered.
    pub op: Op,
    /// Sequence number of the request.
    pub seq: u32,
    /// `Ok(args)` or the error.
    pub result: Result<[u64; 5], ErrorCode>,
    /// Payload (text for [`Op::ReadPath`], error detail otherwise).
    pub payload: Vec<u8>,
}

impl Reply {
    /// Encodes into a datagram.
    pub fn encode(&self) -> Vec<u8> {
        let (status, args) = match self.result {
            Ok(a) => (0, a),
            Err(e) => (e as u32, [0; 5]),
        };
        let mut payload = self.payload.clone();
        payload.truncate(MAX_PAYLOAD);
        Frame {
            op: self.op,
            reply: true,
            seq: self.seq,
            status,
            args,
            payload,
        }
        .encode()
    }

    /// Decodes a reply datagram; never panics.
    pub fn decode(b: &[u8]) -> Result<Reply, ProtoError> {
        let f = Frame::decode(b)?;
        if !f.reply {
            return Err(ProtoError::BadField("reply bit missing"));
        }
        Ok(Reply {
            op: f.op,
            seq: f.seq,
            result: match ErrorCode::from_status(f.status) {
                None => Ok(f.args),
                Some(e) => Err(e),
            },
            payload: f.payload,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{Dir, ErrorCode, FlushPolicy, MapEntry, Op, ProtoError, Reply, Request, MAX_BATCH};
    use proptest::prelude::*;

    #[test]
    fn header_layout_matches_the_documented_offsets() {
        let b = Request::Map {
            phys: 0x1122_3344_5566_7788,
            len: 0x1000,
            dir: Dir::FromDevice,
            va: 0x7f00_dead_b000,
        }
        .encode(0xA1B2_C3D4);
        assert_eq!(b.len(), 64);
        assert_eq!(&b[0..4], b"IOMD");
        assert_eq!(&b[4..6], &[2, 0]); // version 2
        assert_eq!(&b[6..8], &[4, 0]); // op Map = 4
        assert_eq!(&b[8..12], &[0xD4, 0xC3, 0xB2, 0xA1]);
        assert_eq!(&b[12..16], &[0; 4]);
        assert_eq!(
            &b[16..24],
            &[0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11]
        );
        assert_eq!(&b[24..32], &[0, 0x10, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&b[32..40], &[2, 0, 0, 0, 0, 0, 0, 0]);
        // args[3]: the client's virtual address (the va strategy's IOVA).
        assert_eq!(&b[40..48], &[0x00, 0xb0, 0xad, 0xde, 0x00, 0x7f, 0, 0]);
        assert_eq!(&b[48..56], &[0; 8]);
        assert_eq!(&b[56..64], &[0; 8]);
    }

    #[test]
    fn reply_sets_the_high_op_bit_and_status() {
        let r = Reply {
            op: Op::Unmap,
            seq: 7,
            result: Err(ErrorCode::NotOwner),
            payload: b"iova 0x5000 not mapped".to_vec(),
        };
        let b = r.encode();
        assert_eq!(&b[6..8], &[5, 0x80]);
        assert_eq!(&b[12..16], &[8, 0, 0, 0]);
        assert_eq!(&b[56..60], &[22, 0, 0, 0]);
        assert_eq!(Reply::decode(&b), Ok(r));
    }

    fn arb_request() -> impl proptest::strategy::Strategy<Value = Request> {
        prop_oneof![
            any::<u64>().prop_map(|version| Request::Hello { version }),
            (any::<u16>(), 0usize..5, 0usize..3).prop_map(|(bdf, s, f)| Request::Attach {
                bdf,
                strategy: super::Strategy::ALL[s],
                flush: FlushPolicy::ALL[f],
            }),
            any::<u64>().prop_map(|bytes| Request::AllocPool { bytes }),
            (any::<u64>(), any::<u64>(), 1u64..4, any::<u64>()).prop_map(|(phys, len, d, va)| {
                Request::Map {
                    phys,
                    len,
                    dir: Dir::from_u64(d).unwrap(),
                    va,
                }
            }),
            (any::<u64>(), any::<u64>()).prop_map(|(iova, len)| Request::Unmap { iova, len }),
            (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(pages, returned, want)| {
                Request::Exchange {
                    pages,
                    returned,
                    want,
                }
            }),
            Just(Request::FlushHint),
            any::<u64>().prop_map(|upto| Request::FlushSync { upto }),
            Just(Request::Detach),
            "[a-z/0-9:.]{0,64}".prop_map(|path| Request::ReadPath { path }),
            ("[a-z/0-9:.]{0,64}", "[a-z0-9 ]{0,16}")
                .prop_map(|(path, value)| Request::WritePath { path, value }),
            Just(Request::SimInfo),
            Just(Request::Shutdown),
            proptest::collection::vec(
                (any::<u64>(), any::<u64>(), 1u64..4, any::<u64>()),
                1..=MAX_BATCH
            )
            .prop_map(|v| Request::MapBatch {
                entries: v
                    .into_iter()
                    .map(|(phys, len, d, va)| MapEntry {
                        phys,
                        len,
                        dir: Dir::from_u64(d).unwrap(),
                        va
                    })
                    .collect(),
            }),
            proptest::collection::vec((any::<u64>(), any::<u64>()), 1..=MAX_BATCH)
                .prop_map(|entries| Request::UnmapBatch { entries }),
        ]
    }

    proptest! {
        #[test]
        fn requests_round_trip(req in arb_request(), seq in any::<u32>()) {
            let b = req.encode(seq);
            prop_assert_eq!(Request::decode(&b), Ok((seq, req)));
        }

        #[test]
        fn decoding_random_bytes_never_panics(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Request::decode(&b);
            let _ = Reply::decode(&b);
        }

        #[test]
        fn mutated_valid_messages_never_panic(req in arb_request(), pos in 0usize..128, byte in any::<u8>(), cut in 0usize..128) {
            let mut b = req.encode(1);
            if pos < b.len() { b[pos] = byte; }
            let _ = Request::decode(&b);
            b.truncate(cut.min(b.len()));
            prop_assert!(cut >= 64 || Request::decode(&b).is_err());
        }
    }

    #[test]
    fn strategy_and_flush_wire_values_and_names_are_fixed() {
        use super::Strategy as S;
        let s: Vec<(u64, &str)> = S::ALL.iter().map(|s| (*s as u64, s.name())).collect();
        assert_eq!(
            s,
            [
                (0, "noiommu"),
                (1, "global"),
                (2, "magazine"),
                (3, "identity"),
                (4, "va"),
                (5, "static")
            ]
        );
        let f: Vec<(u64, &str)> = FlushPolicy::ALL
            .iter()
            .map(|f| (*f as u64, f.name()))
            .collect();
        assert_eq!(f, [(1, "strict"), (3, "deferred"), (2, "percore")]);
        for s in S::ALL {
            assert_eq!(S::parse(s.name()), Some(s));
            assert_eq!(S::from_u64(s as u64), Some(s));
        }
        for f in FlushPolicy::ALL {
            assert_eq!(FlushPolicy::parse(&format!("{}\n", f.name())), Some(f));
            assert_eq!(FlushPolicy::from_u64(f as u64), Some(f));
        }
        assert_eq!(S::from_u64(6), None);
        assert_eq!(FlushPolicy::from_u64(0), None);
    }

    #[test]
    fn batch_records_follow_the_documented_layout() {
        let b = Request::MapBatch {
            entries: vec![
                MapEntry {
                    phys: 0x1000,
                    len: 0x200,
                    dir: Dir::ToDevice,
                    va: 0,
                },
                MapEntry {
                    phys: 0x5000,
                    len: 0x10,
                    dir: Dir::FromDevice,
                    va: 0x7f00_0000_5000,
                },
            ],
        }
        .encode(3);
        assert_eq!(&b[6..8], &[14, 0]); // op MapBatch
        assert_eq!(&b[16..24], &[2, 0, 0, 0, 0, 0, 0, 0]); // n = 2
        assert_eq!(&b[56..60], &[64, 0, 0, 0]); // 2 records of 32 bytes
                                                // record 1 at 64 + 32: phys 0x5000, len 0x10, dir 2, va 0x7f00_0000_5000
        assert_eq!(&b[96..104], &[0, 0x50, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&b[104..112], &[0x10, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&b[112..120], &[2, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&b[120..128], &[0, 0x50, 0, 0, 0, 0x7f, 0, 0]);
        // A count that disagrees with the payload, an empty or oversized batch.
        let mut bad = b.clone();
        bad[16] = 3;
        assert!(Request::decode(&bad).is_err());
        let mut bad = b.clone();
        bad[16] = 0;
        assert!(Request::decode(&bad).is_err());
        let big = Request::UnmapBatch {
            entries: vec![(0, 1); MAX_BATCH + 1],
        }
        .encode(1);
        assert!(Request::decode(&big).is_err());
        let mut bad = b;
        bad[112] = 9; // direction 9
        assert!(Request::decode(&bad).is_err());
    }

    #[test]
    fn rejects_each_kind_of_bad_header() {
        let good = Request::Detach.encode(1);
        assert_eq!(Request::decode(&good[..63]), Err(ProtoError::Truncated(63)));
        let mut b = good.clone();
        b[0] = b'X';
        assert!(matches!(Request::decode(&b), Err(ProtoError::BadMagic(_))));
        let mut b = good.clone();
        b[4] = 9;
        assert_eq!(Request::decode(&b), Err(ProtoError::BadVersion(9)));
        let mut b = good.clone();
        b[6] = 0x77;
        assert_eq!(Request::decode(&b), Err(ProtoError::BadOp(0x77)));
        let mut b = good.clone();
        b[56] = 1;
        assert!(matches!(
            Request::decode(&b),
            Err(ProtoError::BadPayloadLen {
                claimed: 1,
                actual: 0
            })
        ));
        let mut b = good.clone();
        b[61] = 1;
        assert_eq!(Request::decode(&b), Err(ProtoError::Reserved));
        let mut b = Request::Attach {
            bdf: 8,
            strategy: super::Strategy::Magazine,
            flush: FlushPolicy::PerCore,
        }
        .encode(1);
        b[24] = 77;
        assert_eq!(
            Request::decode(&b),
            Err(ProtoError::BadField("unknown strategy"))
        );
        let mut b = good;
        b[7] = 0x80;
        assert!(Request::decode(&b).is_err(), "a reply is not a request");
    }
}
