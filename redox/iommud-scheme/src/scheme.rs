//! The `iommu` scheme: redox-scheme's `SchemeSync` over a [`Server`].
//!
//! Handles:
//! * a **node** (`stats`, `faults`, `domains`, `domains/<bdf>/{stats,strategy,flush,mappings}`):
//!   `read` gives the same text the Linux server's `ReadPath` gives (the text is
//!   taken when a read starts at offset 0, so a reader in several pieces sees one
//!   snapshot); `write` on `strategy`/`flush` sets them (a trailing newline is ignored);
//! * a **session** (`domains/<bdf>/session`): `call` carries one request frame of
//!   [`iommu_abi::proto`] in the buffer and gets the reply frame back in the same
//!   buffer; `call` returns how many shared-memory regions the reply offers (the
//!   count of fds the Linux transport passes beside a reply). The `k`-th region a
//!   session was offered is mapped with `mmap(handle, offset = k * REGION_SPAN + o)`,
//!   `o` page-aligned inside the region. Closing the handle gives the domain back.
//!
//! Errors are errnos: a path outside the tree is `ENOENT`, an undecodable frame
//! is `EINVAL`, iommud's own codes map through [`crate::errno`].

use std::collections::BTreeMap;

use iommu_abi::proto::{Reply, Request, HEADER_LEN};
use iommud::policy::Peer;
use iommud::session::Share;
use redox_scheme::scheme::SchemeSync;
use redox_scheme::{CallerCtx, OpenResult};
use syscall::error::{Error, Result, EBADF, EINVAL, EISDIR, ENOTDIR, EOVERFLOW};
use syscall::flag::{MapFlags, MunmapFlags, MODE_CHR, MODE_DIR, MODE_FILE};
use syscall::schemev2::NewFdFlags;
use syscall::Stat;

use crate::errno::{error, read_only};
use crate::server::{PathKind, Server};

/// Distance between two region slots in a session's mmap offset space.
pub use iommu_abi::session::REGION_SPAN;

/// Page size of mmap offsets.
pub const PAGE: u64 = 4096;

/// Where a handle's shared regions live in iommud's own address space (the
/// kernel grants the pages at the address `mmap_prep` returns to the client).
pub trait RegionMapper {
    /// The address and length of `share`'s whole file mapped in this process,
    /// mapping it on first use.
    fn map(&mut self, share: &Share) -> Result<(usize, u64)>;
    /// The handle holding `share` closed: drop iommud's mapping of it.
    fn forget(&mut self, share: &Share);
}

/// Maps each region's fd with `mmap(MAP_SHARED)` once (a
/// [`iommu_abi::shm::Mapping`]) and keeps it mapped until the handle holding it
/// closes. The same call works on Linux and on Redox (relibc's `mmap` on a
/// memory-scheme fd).
#[derive(Default)]
pub struct FdMapper {
    maps: BTreeMap<usize, iommu_abi::shm::Mapping>,
}

impl RegionMapper for FdMapper {
    fn map(&mut self, share: &Share) -> Result<(usize, u64)> {
        use std::os::fd::AsFd;
        // The Arc's address names the file while a handle holds it.
        let key = std::sync::Arc::as_ptr(&share.fd) as usize;
        if let Some(m) = self.maps.get(&key) {
            return Ok((m.as_ptr() as usize, m.len() as u64));
        }
        let size = std::fs::File::from(share.fd.try_clone().map_err(|_| Error::new(EINVAL))?)
            .metadata()
            .map_err(|e| Error::new(e.raw_os_error().unwrap_or(EINVAL)))?
            .len();
        let len = usize::try_from(size).map_err(|_| Error::new(EOVERFLOW))?;
        let m = iommu_abi::shm::Mapping::new(share.fd.as_fd(), 0, len)
            .map_err(|e| Error::new(e.raw_os_error().unwrap_or(EINVAL)))?;
        let addr = m.as_ptr() as usize;
        self.maps.insert(key, m);
        Ok((addr, size))
    }

    fn forget(&mut self, share: &Share) {
        // Dropping the mapping unmaps iommud's view; clients keep their own.
        self.maps
            .remove(&(std::sync::Arc::as_ptr(&share.fd) as usize));
    }
}

enum Handle<T> {
    Root,
    Node {
        path: String,
        kind: PathKind,
        text: Vec<u8>,
        /// Who opened it (what it may read and write is judged by that).
        caller: Peer,
    },
    Session {
        bdf: u16,
        session: Option<T>,
        shares: Vec<Share>,
    },
}

/// The `iommu` scheme over a [`Server`].
pub struct IommuScheme<S: Server, M: RegionMapper = FdMapper> {
    server: S,
    mapper: M,
    handles: BTreeMap<usize, Handle<S::Session>>,
    next_id: usize,
}

/// The caller's identity as the kernel reports it with each request.
fn peer(ctx: &CallerCtx) -> Peer {
    Peer {
        uid: ctx.uid,
        gid: ctx.gid,
        pid: i32::try_from(ctx.pid).unwrap_or(i32::MAX),
    }
}

/// Id of the scheme root handle.
pub const ROOT_ID: usize = 0;

/// Strips the forms a scheme path may arrive in (`/scheme/iommu/x`, `iommu:x`,
/// `/x`, `x`) down to `x`, without trailing slashes.
pub fn relative(path: &str) -> &str {
    let p = path
        .strip_prefix("/scheme/iommu")
        .or_else(|| path.strip_prefix("iommu:"))
        .unwrap_or(path);
    p.trim_matches('/')
}

impl<S: Server> IommuScheme<S, FdMapper> {
    /// A scheme over `server`, sharing regions by mapping their fds.
    pub fn new(server: S) -> Self {
        Self::with_mapper(server, FdMapper::default())
    }
}

impl<S: Server, M: RegionMapper> IommuScheme<S, M> {
    /// A scheme over `server` with a custom region mapper.
    pub fn with_mapper(server: S, mapper: M) -> Self {
        let mut handles = BTreeMap::new();
        handles.insert(ROOT_ID, Handle::Root);
        IommuScheme {
            server,
            mapper,
            handles,
            next_id: ROOT_ID + 1,
        }
    }

    /// The server (for tests and the daemon's housekeeping).
    pub fn server(&self) -> &S {
        &self.server
    }

    /// Number of open handles besides the root.
    pub fn open_handles(&self) -> usize {
        self.handles.len() - 1
    }

    fn node_text(&mut self, id: usize, refresh: bool) -> Result<&[u8]> {
        let server = &self.server;
        match self.handles.get_mut(&id) {
            Some(Handle::Node {
                path, text, caller, ..
            }) => {
                if refresh || text.is_empty() {
                    *text = server.read(caller, path).map_err(error)?.into_bytes();
                }
                Ok(text)
            }
            _ => Err(Error::new(EBADF)),
        }
    }
}

impl<S: Server, M: RegionMapper> SchemeSync for IommuScheme<S, M> {
    fn scheme_root(&mut self) -> Result<usize> {
        Ok(ROOT_ID)
    }

    fn openat(
        &mut self,
        dirfd: usize,
        path: &str,
        _flags: usize,
        _fcntl_flags: u32,
        ctx: &CallerCtx,
    ) -> Result<OpenResult> {
        let full = match self.handles.get(&dirfd) {
            Some(Handle::Root) => relative(path).to_string(),
            Some(Handle::Node {
                path: dir,
                kind: PathKind::Dir,
                ..
            }) => format!("{dir}/{}", path.trim_matches('/')),
            Some(_) => return Err(Error::new(ENOTDIR)),
            None => return Err(Error::new(EBADF)),
        };
        let kind = self.server.kind(&full).map_err(error)?;
        let (handle, flags) = match kind {
            PathKind::Session { bdf } => {
                let session = self.server.open_session(bdf, peer(ctx)).map_err(error)?;
                let h = Handle::Session {
                    bdf,
                    session: Some(session),
                    shares: Vec::new(),
                };
                (h, NewFdFlags::empty())
            }
            kind => (
                Handle::Node {
                    path: full,
                    kind,
                    text: Vec::new(),
                    caller: peer(ctx),
                },
                NewFdFlags::POSITIONED,
            ),
        };
        let id = self.next_id;
        self.next_id += 1;
        self.handles.insert(id, handle);
        Ok(OpenResult::ThisScheme { number: id, flags })
    }

    fn read(
        &mut self,
        id: usize,
        buf: &mut [u8],
        offset: u64,
        _fcntl_flags: u32,
        _ctx: &CallerCtx,
    ) -> Result<usize> {
        if matches!(self.handles.get(&id), Some(Handle::Session { .. })) {
            return Err(Error::new(EINVAL));
        }
        let text = self.node_text(id, offset == 0)?;
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(text.len());
        let n = buf.len().min(text.len() - start);
        buf[..n].copy_from_slice(&text[start..start + n]);
        Ok(n)
    }

    fn write(
        &mut self,
        id: usize,
        buf: &[u8],
        _offset: u64,
        _fcntl_flags: u32,
        ctx: &CallerCtx,
    ) -> Result<usize> {
        match self.handles.get(&id) {
            Some(Handle::Node {
                path,
                kind: PathKind::ReadWrite,
                ..
            }) => {
                let value = std::str::from_utf8(buf).map_err(|_| Error::new(EINVAL))?;
                let value = value.trim_end_matches(['\n', '\r']);
                self.server.write(&peer(ctx), path, value).map_err(error)?;
                Ok(buf.len())
            }
            Some(Handle::Node {
                kind: PathKind::Dir,
                ..
            }) => Err(Error::new(EISDIR)),
            Some(Handle::Node { .. }) => Err(read_only()),
            Some(Handle::Session { .. }) => Err(Error::new(EINVAL)),
            Some(Handle::Root) => Err(Error::new(EISDIR)),
            None => Err(Error::new(EBADF)),
        }
    }

    fn fsize(&mut self, id: usize, _ctx: &CallerCtx) -> Result<u64> {
        Ok(self.node_text(id, true)?.len() as u64)
    }

    fn fstat(&mut self, id: usize, stat: &mut Stat, _ctx: &CallerCtx) -> Result<()> {
        let (mode, size) = match self.handles.get(&id) {
            Some(Handle::Root) => (MODE_DIR | 0o555, 0),
            Some(Handle::Session { .. }) => (MODE_CHR | 0o600, 0),
            Some(Handle::Node { kind, .. }) => {
                let kind = *kind;
                let size = self.node_text(id, true)?.len() as u64;
                let mode = match kind {
                    PathKind::Dir => MODE_DIR | 0o555,
                    PathKind::ReadWrite => MODE_FILE | 0o644,
                    _ => MODE_FILE | 0o444,
                };
                (mode, size)
            }
            None => return Err(Error::new(EBADF)),
        };
        stat.st_mode = mode;
        stat.st_size = size;
        Ok(())
    }

    fn fpath(&mut self, id: usize, buf: &mut [u8], _ctx: &CallerCtx) -> Result<usize> {
        let path = match self.handles.get(&id) {
            Some(Handle::Root) => "/scheme/iommu".to_string(),
            Some(Handle::Node { path, .. }) => format!("/scheme/iommu/{path}"),
            Some(Handle::Session { bdf, .. }) => format!(
                "/scheme/iommu/domains/{:02x}:{:02x}.{}/session",
                bdf >> 8,
                (bdf >> 3) & 0x1f,
                bdf & 7
            ),
            None => return Err(Error::new(EBADF)),
        };
        let n = path.len().min(buf.len());
        buf[..n].copy_from_slice(&path.as_bytes()[..n]);
        Ok(n)
    }

    fn call(
        &mut self,
        id: usize,
        payload: &mut [u8],
        _metadata: &[u64],
        _ctx: &CallerCtx,
    ) -> Result<usize> {
        let Some(Handle::Session {
            session: Some(session),
            shares,
            ..
        }) = self.handles.get_mut(&id)
        else {
            return Err(Error::new(EBADF));
        };
        let req_len = frame_len(payload).ok_or(Error::new(EINVAL))?;
        let (seq, req) = Request::decode(&payload[..req_len]).map_err(|_| Error::new(EINVAL))?;
        let op = req.op();
        let answer = self.server.handle(session, req);
        let offered = answer.shares.len();
        shares.extend(answer.shares);
        let mut reply = Reply {
            op,
            seq,
            result: answer.result,
            payload: answer.payload,
        };
        reply.payload.truncate(payload.len() - HEADER_LEN);
        let bytes = reply.encode();
        payload[..bytes.len()].copy_from_slice(&bytes);
        Ok(offered)
    }

    fn mmap_prep(
        &mut self,
        id: usize,
        offset: u64,
        size: usize,
        _flags: MapFlags,
        _ctx: &CallerCtx,
    ) -> Result<usize> {
        let Some(Handle::Session { shares, .. }) = self.handles.get(&id) else {
            return Err(Error::new(EBADF));
        };
        let slot = usize::try_from(offset / REGION_SPAN).map_err(|_| Error::new(EINVAL))?;
        let within = offset % REGION_SPAN;
        let share = shares.get(slot).ok_or(Error::new(EINVAL))?;
        let (base, len) = self.mapper.map(share)?;
        let end = within.checked_add(size as u64).ok_or(Error::new(EINVAL))?;
        if !within.is_multiple_of(PAGE) || size == 0 || end > len {
            return Err(Error::new(EINVAL));
        }
        Ok(base + within as usize)
    }

    fn munmap(
        &mut self,
        _id: usize,
        _offset: u64,
        _size: usize,
        _flags: MunmapFlags,
        _ctx: &CallerCtx,
    ) -> Result<()> {
        // iommud keeps its own mapping until the region is freed; nothing to do
        // when a client unmaps its view.
        Ok(())
    }

    fn on_close(&mut self, id: usize) {
        if id == ROOT_ID {
            return;
        }
        if let Some(Handle::Session {
            session, shares, ..
        }) = self.handles.remove(&id)
        {
            for share in &shares {
                self.mapper.forget(share);
            }
            if let Some(s) = session {
                self.server.close_session(s);
            }
        }
    }
}

pub use iommu_abi::session::frame_len;
