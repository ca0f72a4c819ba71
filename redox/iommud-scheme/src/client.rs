//! libdma's Redox transport: a session on `/scheme/iommu/domains/<bdf>/session`.
//!
//! Same messages as the Linux transport ([`iommu_abi::proto`] frames); only the
//! carrier differs: one `call` per request (the request frame goes in the
//! buffer, the reply frame comes back in it), and shared memory is mapped with
//! `mmap` on the session handle instead of received as fds. `call` returns how
//! many regions the reply offers; they take the session's next slots, and slot
//! `k` is at mmap offset `k * REGION_SPAN`.
//!
//! [`Channel`] is platform-free over an [`Endpoint`]; [`SchemeEndpoint`] is the
//! Redox one (system calls only). On the host the tests drive [`Channel`] over
//! the scheme adapter itself.

use std::io;
use std::ops::Range;

use iommu_abi::proto::{Reply, Request, MAX_MESSAGE};

use crate::scheme::{frame_len, REGION_SPAN};

/// The two system calls a session needs.
pub trait Endpoint {
    /// Sends the request frame in `buf` and receives the reply frame in it;
    /// returns how many regions the reply offers.
    fn call(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Maps `len` bytes of the session at `offset` (read/write, shared).
    fn map(&mut self, offset: u64, len: usize) -> io::Result<*mut u8>;
}

/// A client session with iommud.
pub struct Channel<E: Endpoint> {
    ep: E,
    seq: u32,
    slots: usize,
    buf: Vec<u8>,
}

pub use iommu_abi::session::session_path;

impl<E: Endpoint> Channel<E> {
    /// A session over an open endpoint.
    pub fn new(ep: E) -> Self {
        Channel {
            ep,
            seq: 0,
            slots: 0,
            buf: vec![0; MAX_MESSAGE],
        }
    }

    /// Sends `req` and waits for its reply; also returns the slots of the
    /// regions the reply offers (map them with [`Channel::map_slot`]).
    pub fn request(&mut self, req: &Request) -> io::Result<(Reply, Range<usize>)> {
        self.seq = self.seq.wrapping_add(1);
        let bytes = req.encode(self.seq);
        self.buf[..bytes.len()].copy_from_slice(&bytes);
        let offered = self.ep.call(&mut self.buf)?;
        let first = self.slots;
        self.slots += offered;
        let len = frame_len(&self.buf).ok_or_else(|| bad("reply frame truncated"))?;
        let reply = Reply::decode(&self.buf[..len]).map_err(|e| bad(&e.to_string()))?;
        if reply.seq != self.seq || reply.op != req.op() {
            return Err(bad("reply does not answer the request"));
        }
        Ok((reply, first..self.slots))
    }

    /// Maps `len` bytes at byte `within` of the region in `slot`.
    pub fn map_slot(&mut self, slot: usize, within: u64, len: usize) -> io::Result<*mut u8> {
        if slot >= self.slots || within >= REGION_SPAN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "no such region slot",
            ));
        }
        self.ep.map(slot as u64 * REGION_SPAN + within, len)
    }
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("iommu scheme: {what}"))
}

/// The Redox endpoint: an open session handle.
#[cfg(target_os = "redox")]
pub struct SchemeEndpoint {
    fd: libredox::Fd,
}

#[cfg(target_os = "redox")]
impl SchemeEndpoint {
    /// Opens the session for `bdf`.
    pub fn open(bdf: u16) -> io::Result<Self> {
        let flags = (libredox::flag::O_RDWR | libredox::flag::O_CLOEXEC) as i32;
        let fd = libredox::Fd::open(&session_path(bdf), flags, 0).map_err(os)?;
        Ok(SchemeEndpoint { fd })
    }
}

#[cfg(target_os = "redox")]
fn os(e: libredox::error::Error) -> io::Error {
    io::Error::from_raw_os_error(e.errno())
}

#[cfg(target_os = "redox")]
impl Endpoint for SchemeEndpoint {
    fn call(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.fd
            .call_rw(buf, syscall::CallFlags::empty(), &[])
            .map_err(os)
    }

    fn map(&mut self, offset: u64, len: usize) -> io::Result<*mut u8> {
        use libredox::call::{mmap, MmapArgs};
        use libredox::flag::{MAP_SHARED, PROT_READ, PROT_WRITE};
        // SAFETY: a fresh mapping at an address the kernel picks; it is handed
        // out as a raw pointer and accessed only through volatile operations.
        let p = unsafe {
            mmap(MmapArgs {
                addr: std::ptr::null_mut(),
                length: len,
                prot: PROT_READ | PROT_WRITE,
                flags: MAP_SHARED,
                fd: self.fd.raw(),
                offset,
            })
        }
        .map_err(os)?;
        Ok(p.cast())
    }
}
