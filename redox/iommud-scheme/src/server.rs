//! What the `iommu` scheme needs from iommud: its scheme tree and its sessions.
//!
//! The adapter ([`crate::scheme::IommuScheme`]) is generic over this trait so
//! it can be driven on the host by a test server and, on Redox, by iommud's
//! real state. The path parsing and request handling stay in iommud (the same
//! code the Linux socket server calls); this trait only names them.

use iommu_abi::proto::{ErrorCode, Request};
use iommud::policy::Peer;
use iommud::session::Share;

/// What a path opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathKind {
    /// A directory (`domains`): readable listing, not writable.
    Dir,
    /// A read-only text node (`stats`, `faults`, `domains/<bdf>/stats`, `.../mappings`).
    ReadOnly,
    /// A writable text node (`domains/<bdf>/strategy`, `.../flush`).
    ReadWrite,
    /// A client session for the domain of PCI function `bdf`
    /// (`domains/<bdf>/session`): requests go through `call`, memory through `mmap`.
    Session {
        /// PCI source id (bus << 8 | dev << 3 | fn).
        bdf: u16,
    },
}

/// iommud's answer to one request: the reply and the memory it offers.
#[derive(Debug)]
pub struct Answer {
    /// `Ok(args)` or the error, as in [`iommu_abi::proto::Reply`].
    pub result: Result<[u64; 5], ErrorCode>,
    /// Reply payload (text for path reads).
    pub payload: Vec<u8>,
    /// Shared memory handed to the client (fds on Linux, mmap slots on Redox).
    pub shares: Vec<Share>,
}

/// iommud's state seen from the scheme. Paths are relative to the scheme
/// root, with no leading `/` (`stats`, `domains/00:01.0/strategy`).
pub trait Server {
    /// One client connection (one open session handle).
    type Session;
    /// Classifies a path; `Err(NotFound)` for paths outside the tree.
    fn kind(&self, path: &str) -> Result<PathKind, ErrorCode>;
    /// Reads a node's text.
    fn read(&self, caller: &Peer, path: &str) -> Result<String, ErrorCode>;
    /// Writes a node (`strategy`, `flush`).
    fn write(&self, caller: &Peer, path: &str, value: &str) -> Result<(), ErrorCode>;
    /// Opens a session for the domain of `bdf` on behalf of `caller`.
    fn open_session(&mut self, bdf: u16, caller: Peer) -> Result<Self::Session, ErrorCode>;
    /// Handles one decoded request of a session.
    fn handle(&mut self, session: &mut Self::Session, req: Request) -> Answer;
    /// The session's handle was closed (or its process died): give its domain back.
    fn close_session(&mut self, session: Self::Session);
}
