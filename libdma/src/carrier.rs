//! The carriers of the protocol in [`crate::proto`]: what [`crate::DmaDomain`]
//! and [`crate::Control`] need from a connection to iommud, whatever carries it.
//!
//! * Linux (and the sim): a Unix `SOCK_SEQPACKET` socket
//!   ([`crate::transport::SeqPacket`]); shared memory arrives as fds beside the
//!   reply, each mapped from offset 0 of its own file.
//! * Redox: a session handle on `/scheme/iommu/domains/<bdf>/session`
//!   ([`SchemeSession`], `target_os = "redox"` only): one `call` per request
//!   (request frame in, reply frame out, in one buffer) returning how many
//!   regions the reply offers; region `k` of a session is mapped from that
//!   same handle at offset `k << 40` ([`REGION_SPAN`]).
//!
//! Either way a region is a [`Share`]: a handle and the offset its first
//! byte has in it. The fast paths of [`crate::DmaDomain`] make no call here.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use crate::shm::Mapping;
pub use iommu_abi::session::{frame_len, session_path, slot_offset, Slots, REGION_SPAN};

/// Shared memory offered by a reply.
#[derive(Debug, Clone)]
pub struct Share {
    fd: Arc<OwnedFd>,
    base: u64,
}

impl Share {
    /// A region that is the whole file `fd` (the Linux transport's fds).
    pub fn file(fd: OwnedFd) -> Share {
        Share {
            fd: Arc::new(fd),
            base: 0,
        }
    }

    /// Region `slot` of a session handle: mapped from `handle` at `slot << 40`.
    pub fn slot(handle: Arc<OwnedFd>, slot: u64) -> Share {
        Share {
            fd: handle,
            base: slot_offset(slot),
        }
    }

    /// Where the region starts in its handle's mmap offset space.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Maps `len` bytes at byte `offset` of the region.
    pub fn map(&self, offset: u64, len: usize) -> io::Result<Mapping> {
        let at = self
            .base
            .checked_add(offset)
            .ok_or(io::ErrorKind::InvalidInput)?;
        Mapping::new(self.fd.as_fd(), at, len)
    }

    /// Maps `len` bytes at byte `offset` of the region, read-only (the
    /// published page: iommud seals it against writable mappings).
    pub fn map_readonly(&self, offset: u64, len: usize) -> io::Result<Mapping> {
        let at = self
            .base
            .checked_add(offset)
            .ok_or(io::ErrorKind::InvalidInput)?;
        Mapping::new_readonly(self.fd.as_fd(), at, len)
    }

    /// The file itself, if this share is a whole file nobody else holds.
    pub fn into_fd(self) -> Option<OwnedFd> {
        if self.base != 0 {
            return None;
        }
        Arc::try_unwrap(self.fd).ok()
    }
}

/// What a connection to iommud must do.
pub trait Transport: Send {
    /// Sends a request frame and receives the next reply frame into `reply`
    /// (at least [`crate::proto::MAX_MESSAGE`] bytes); returns the reply's
    /// length and the regions it offers. Length 0 means iommud closed.
    fn call(&mut self, frame: &[u8], reply: &mut [u8]) -> io::Result<(usize, Vec<Share>)>;
    /// Receives one more reply frame (a carrier that delivers replies to
    /// posted requests may hold a stale one before the answer awaited).
    fn recv(&mut self, reply: &mut [u8]) -> io::Result<(usize, Vec<Share>)>;
    /// Sends a frame whose reply nobody awaits.
    fn post(&mut self, frame: &[u8]) -> io::Result<()>;
    /// Like [`Transport::call`], passing `fds` with the request (the proof
    /// of device ownership an Attach carries). A carrier that cannot pass
    /// descriptors sends the frame alone: its proof travels another way
    /// (on Redox, the session handle pcid gave the driver).
    fn call_with_fds(
        &mut self,
        frame: &[u8],
        _fds: &[BorrowedFd<'_>],
        reply: &mut [u8],
    ) -> io::Result<(usize, Vec<Share>)> {
        self.call(frame, reply)
    }
}

/// Sends `frame` and receives the answer; if the send finds the connection
/// closed, the reason iommud may have left before closing (a refused
/// connection) is still read and returned.
#[cfg(not(target_os = "redox"))]
fn send_then_recv(
    s: &crate::transport::SeqPacket,
    frame: &[u8],
    fds: &[BorrowedFd<'_>],
    reply: &mut [u8],
) -> io::Result<(usize, Vec<Share>)> {
    if let Err(e) = s.send(frame, fds) {
        if !matches!(
            e.kind(),
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
        ) {
            return Err(e);
        }
        let got = match s.recv(reply) {
            Err(r) if r.kind() == io::ErrorKind::ConnectionReset => s.recv(reply),
            r => r,
        };
        return match got {
            Ok((n, fds)) if n > 0 => Ok((n, fds.into_iter().map(Share::file).collect())),
            _ => Err(e),
        };
    }
    // A refusal arrives followed by the close; Linux reports the reset
    // (our request was never read) before the queued reply, once.
    let (n, fds) = match s.recv(reply) {
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => s.recv(reply).map_err(|_| e)?,
        r => r?,
    };
    Ok((n, fds.into_iter().map(Share::file).collect()))
}

#[cfg(not(target_os = "redox"))]
impl Transport for crate::transport::SeqPacket {
    fn call(&mut self, frame: &[u8], reply: &mut [u8]) -> io::Result<(usize, Vec<Share>)> {
        send_then_recv(self, frame, &[], reply)
    }

    fn recv(&mut self, reply: &mut [u8]) -> io::Result<(usize, Vec<Share>)> {
        let (n, fds) = crate::transport::SeqPacket::recv(self, reply)?;
        Ok((n, fds.into_iter().map(Share::file).collect()))
    }

    fn post(&mut self, frame: &[u8]) -> io::Result<()> {
        self.send(frame, &[])
    }

    fn call_with_fds(
        &mut self,
        frame: &[u8],
        fds: &[BorrowedFd<'_>],
        reply: &mut [u8],
    ) -> io::Result<(usize, Vec<Share>)> {
        send_then_recv(self, frame, fds, reply)
    }
}

/// The Redox carrier: a session handle on the `iommu` scheme.
///
/// Compiled for `x86_64-unknown-redox` by `cargo xtask redox-check` (docs/ARCHITECTURE.md,
/// "Building for Redox"), never run: `open` is std's, `call` is
/// libredox 0.1.25's `call_rw` as read in its source, and mapping is
/// [`Mapping::new`] (relibc's `mmap`) on the session handle, which the scheme
/// answers in `mmap_prep`. Unverified on Redox.
#[cfg(target_os = "redox")]
pub struct SchemeSession {
    handle: Arc<OwnedFd>,
    slots: Slots,
}

#[cfg(target_os = "redox")]
impl SchemeSession {
    /// Opens the session of PCI function `bdf`.
    pub fn open(bdf: u16) -> io::Result<SchemeSession> {
        let path = session_path(bdf);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("open {path}: {e}")))?;
        Ok(SchemeSession {
            handle: Arc::new(f.into()),
            slots: Slots::default(),
        })
    }
}

#[cfg(target_os = "redox")]
impl Transport for SchemeSession {
    fn call(&mut self, frame: &[u8], reply: &mut [u8]) -> io::Result<(usize, Vec<Share>)> {
        use std::os::fd::AsRawFd;
        let n = frame.len();
        if n > reply.len() {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        reply[..n].copy_from_slice(frame);
        let offered = libredox::call::call_rw(
            self.handle.as_raw_fd() as usize,
            reply,
            syscall::CallFlags::empty(),
            &[],
        )
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        let len = frame_len(reply).ok_or(io::ErrorKind::InvalidData)?;
        let first = self.slots.take(offered);
        let shares = (first..first + offered as u64)
            .map(|k| Share::slot(self.handle.clone(), k))
            .collect();
        Ok((len, shares))
    }

    fn recv(&mut self, _reply: &mut [u8]) -> io::Result<(usize, Vec<Share>)> {
        // A call's reply is its own; there is never a stale one to skip.
        Err(io::ErrorKind::Unsupported.into())
    }

    fn post(&mut self, frame: &[u8]) -> io::Result<()> {
        let mut buf = vec![0u8; crate::proto::MAX_MESSAGE];
        self.call(frame, &mut buf).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_map_at_their_base() {
        let fd = crate::shm::memfd("share-test", 3 * 4096).unwrap();
        let s = Share::file(fd);
        assert_eq!(s.base(), 0);
        let m = s.map(4096, 4096).unwrap();
        m.write_u64(0, 5).unwrap();
        let again = s.map(4096, 4096).unwrap();
        assert_eq!(again.read_u64(0), Some(5));
        let fd = s.clone().into_fd();
        assert!(fd.is_none(), "a share held twice is not given away");
        assert!(s.into_fd().is_some());
        let handle = Arc::new(crate::shm::memfd("slot-test", 4096).unwrap());
        assert_eq!(Share::slot(handle.clone(), 2).base(), 2 << 40);
        assert!(
            Share::slot(handle, 1).into_fd().is_none(),
            "a slot is not a file"
        );
    }
}
