//! `iommu-abi`: the contract between iommud and its clients, in one crate
//! both depend on (docs/ARCHITECTURE.md, "Who may import whom").
//!
//! * [`proto`]: the messages. One datagram each (a Unix `SOCK_SEQPACKET` on
//!   Linux, one `call` on a Redox session handle): a 64-byte header (the byte
//!   table is in [`proto`]) and at most 16 KiB of payload.
//! * [`shared`]: the layouts of the two pages each domain shares: the
//!   published page (epochs, policy, clock; read-only for the client) and the
//!   client page (flush wishes, counters, the exchange area).
//! * [`classes`]: the page, size classes, magazine size, flush-queue bounds.
//! * [`bdf`]: PCI function addresses ([`Bdf`]).
//! * [`proof`]: where a client finds its proof of device ownership.
//! * [`session`]: the Redox carrier's paths, region slots and frame lengths.
//! * [`shm`]: the one type through which either side touches shared memory
//!   (a mapping with bounds-checked, volatile or atomic access only).
//! * `transport` (not on Redox): the Unix `SOCK_SEQPACKET` carrier with
//!   descriptor passing and peer credentials.
//!
//! ## What each operation's arguments mean
//!
//! ```text
//! op  name        request args                     reply args / payload / shares
//!  1  Hello       [version]                        [version]
//!  2  Attach      [bdf, strategy, flush]           AttachReply: [did, flags, arena phys,
//!                 + proof fd (Linux)                arena offset, arena len]; shares:
//!                                                  published page, client page, [arena]
//!  3  AllocPool   [bytes]                          PoolReply: [phys, offset, len]; share: pool
//!  4  Map         [phys, len, dir, va]             [iova]
//!  5  Unmap       [iova, len]                      []
//!  6  Exchange    [pages, returned, want]          [handed out] (IOVAs in the exchange area)
//!  7  FlushHint   []                               none (one-way)
//!  8  FlushSync   [epoch, 0 = now]                 [completed epoch]
//!  9  Detach      []                               []
//! 10  ReadPath    payload: path                    payload: text
//! 11  WritePath   payload: path NUL value          []
//! 12  SimInfo     []                               [mem bytes]; shares: memory, state
//! 13  Shutdown    []                               []
//! 14  MapBatch    [n]; payload n × 32 B            [n]; payload n IOVAs
//!                 (phys, len, dir, va)
//! 15  UnmapBatch  [n]; payload n × 16 B (iova, len) [n]
//! ```
//!
//! ## Versions and compatibility
//!
//! [`proto::VERSION`] is bumped on any change a peer of the other version
//! would misread: a field's meaning, a layout of a shared page, a share added
//! to or removed from a reply. Both sides check it in every header, and a
//! client says its version in `Hello`; a mismatch is an error with both
//! numbers (never a guess). Adding an operation or an error code is
//! compatible only in the direction that cannot meet it: an old server
//! answers an unknown op with `Malformed`, an old client reads an unknown
//! error code as `Malformed`. Reserved header fields must be zero, so they
//! can gain a meaning later. Version 2 (this one): the published/client page
//! split, the proof of ownership at `Attach`, `PermissionDenied` (13), `QuotaExceeded` (14).
#![deny(missing_docs)]

pub mod bdf;
pub mod classes;
pub mod proof;
pub mod proto;
pub mod ring;
pub mod session;
pub mod shared;
pub mod shm;
#[cfg(not(target_os = "redox"))]
pub mod transport;

pub use bdf::Bdf;

/// Where iommud listens by default (the Unix socket; on Redox the scheme is
/// `/scheme/iommu`).
pub const DEFAULT_SOCKET: &str = "/run/iommud.sock";
