//! The client: [`DmaDomain`] (map and unmap DMA buffers) and [`Control`]
//! (read and write iommud's path tree).
//!
//! ## Per-CPU caches
//!
//! Magazines live in per-CPU slots chosen with `sched_getcpu()` (slot =
//! CPU number modulo the slot count), each behind its own mutex. A thread
//! keeps using the slot of the CPU it runs on, so the lock is uncontended
//! unless a thread is preempted inside the few instructions it holds it —
//! the same assumption Linux's per-CPU IOVA caches make with preemption
//! disabled. Per-thread caches would avoid even that, but strand IOVAs in
//! idle threads; per-CPU slots bound the cached IOVAs by the CPU count.

use crate::carrier::{Share, Transport};
use crate::magazine::{class_pages, size_class, Backend, Clean, CpuCache, FlushQueue};
use crate::proto::{
    AttachReply, Dir, ErrorCode, FlushPolicy, MapEntry, PoolReply, ProtoError, Reply, Request,
    Strategy, FLAG_CACHING_MODE, FLAG_COHERENT, FLAG_TRANSLATING, MAX_BATCH, MAX_MESSAGE, VERSION,
};
use crate::shared::{
    bump, view, ClientPage, EpochPage, CLIENT_LEN, EXCHANGE_OFFSET, EXCHANGE_SLOTS,
    MAGAZINE_IOVA_BASE, MAX_CPUS, PUBLISHED_LEN,
};
use crate::shm::{flush_cache_range, Mapping};
use std::os::fd::OwnedFd;
#[cfg(not(target_os = "redox"))]
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Mutex, MutexGuard};
use thiserror::Error;

pub use iommu_abi::DEFAULT_SOCKET;
const PAGE: u64 = 4096;

/// Client errors.
#[derive(Debug, Error)]
pub enum Error {
    /// Talking to iommud failed (it may have exited).
    #[error("iommud connection: {0}")]
    Io(#[from] std::io::Error),
    /// iommud refused the request.
    #[error("iommud: {code}: {msg}")]
    Server {
        /// The code.
        code: ErrorCode,
        /// iommud's explanation.
        msg: String,
    },
    /// iommud sent something we cannot decode.
    #[error("bad reply: {0}")]
    Proto(#[from] ProtoError),
    /// The caller passed something invalid.
    #[error("{0}")]
    Invalid(String),
    /// iommud detached the domain (or is gone).
    #[error("the domain was detached by iommud")]
    Dead,
}

/// Result alias.
pub type Result<T> = std::result::Result<T, Error>;

struct Conn {
    link: Box<dyn Transport>,
    seq: u32,
    buf: Vec<u8>,
    /// The socket connected to, if any (where to look for the sim's device files).
    #[cfg_attr(target_os = "redox", allow(dead_code))]
    path: Option<std::path::PathBuf>,
}

impl Conn {
    #[cfg(not(target_os = "redox"))]
    fn connect(path: &Path) -> Result<Conn> {
        let mut c = Conn::over(Box::new(crate::transport::SeqPacket::connect(path)?))?;
        c.path = Some(path.to_path_buf());
        Ok(c)
    }

    /// A connection over any carrier (see [`crate::carrier`]).
    fn over(link: Box<dyn Transport>) -> Result<Conn> {
        let mut c = Conn {
            link,
            seq: 0,
            buf: vec![0; MAX_MESSAGE],
            path: None,
        };
        c.call(&Request::Hello {
            version: u64::from(VERSION),
        })?;
        Ok(c)
    }

    /// One blocking round trip.
    fn call(&mut self, req: &Request) -> Result<(Reply, Vec<Share>)> {
        self.call_with_fds(req, &[])
    }

    /// One blocking round trip passing `fds` with the request.
    fn call_with_fds(
        &mut self,
        req: &Request,
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> Result<(Reply, Vec<Share>)> {
        self.seq = self.seq.wrapping_add(1);
        let mut got = self
            .link
            .call_with_fds(&req.encode(self.seq), fds, &mut self.buf)?;
        loop {
            let (n, shares) = got;
            if n == 0 {
                return Err(Error::Dead);
            }
            let r = Reply::decode(&self.buf[..n])?;
            if r.seq != self.seq {
                got = self.link.recv(&mut self.buf)?;
                continue; // a stale answer; ours follows
            }
            return match r.result {
                Ok(_) => Ok((r, shares)),
                Err(code) => Err(Error::Server {
                    code,
                    msg: String::from_utf8_lossy(&r.payload).into_owned(),
                }),
            };
        }
    }

    fn args(&mut self, req: &Request) -> Result<[u64; 5]> {
        let (r, _) = self.call(req)?;
        r.result.map_err(|code| Error::Server {
            code,
            msg: String::new(),
        })
    }

    /// One-way message.
    fn post(&mut self, req: &Request) -> Result<()> {
        self.seq = self.seq.wrapping_add(1);
        self.link.post(&req.encode(self.seq))?;
        Ok(())
    }
}

/// Control connection: the path tree and daemon control.
pub struct Control {
    conn: Mutex<Conn>,
}

impl Control {
    /// Connects to iommud.
    #[cfg(not(target_os = "redox"))]
    pub fn connect(socket: &Path) -> Result<Control> {
        Ok(Control {
            conn: Mutex::new(Conn::connect(socket)?),
        })
    }

    /// A control connection over any carrier.
    pub fn over(link: Box<dyn Transport>) -> Result<Control> {
        Ok(Control {
            conn: Mutex::new(Conn::over(link)?),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Conn> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads a path, e.g. `/scheme/iommu/stats`.
    pub fn read(&self, path: &str) -> Result<String> {
        let (r, _) = self.conn().call(&Request::ReadPath { path: path.into() })?;
        Ok(String::from_utf8_lossy(&r.payload).into_owned())
    }

    /// Writes a path.
    pub fn write(&self, path: &str, value: &str) -> Result<()> {
        self.conn().call(&Request::WritePath {
            path: path.into(),
            value: value.into(),
        })?;
        Ok(())
    }

    /// Stops the daemon.
    pub fn shutdown(&self) -> Result<()> {
        self.conn().call(&Request::Shutdown)?;
        Ok(())
    }

    /// Sim platform: the machine's (memory fd, state fd, memory bytes), so a
    /// test can act as a device with `vtd::sim::SimMachine::open`.
    pub fn sim_info(&self) -> Result<(OwnedFd, OwnedFd, u64)> {
        let (r, shares) = self.conn().call(&Request::SimInfo)?;
        let args = r.result.unwrap_or_default();
        let mut fds: Vec<OwnedFd> = shares.into_iter().filter_map(Share::into_fd).collect();
        if fds.len() != 2 {
            return Err(Error::Invalid(format!("SimInfo carried {} fds", fds.len())));
        }
        let s = fds.remove(1);
        let m = fds.remove(0);
        Ok((m, s, args[0]))
    }

    /// Sends raw bytes and returns the raw reply (for robustness tests).
    pub fn raw(&self, bytes: &[u8]) -> Result<Vec<u8>> {
        let mut c = self.conn();
        let mut buf = vec![0u8; MAX_MESSAGE];
        let (n, _) = c.link.call(bytes, &mut buf)?;
        buf.truncate(n);
        Ok(buf)
    }
}

/// A DMA-capable buffer from iommud's pools: CPU pointer and physical address.
#[derive(Debug, Clone, Copy)]
pub struct DmaBuffer {
    ptr: *mut u8,
    /// Physical address of the first byte.
    pub phys: u64,
    /// Length in bytes.
    pub len: usize,
}

// SAFETY: a DmaBuffer is an address range in a mapping the DmaDomain keeps
// alive; accesses go through raw-pointer copies, never Rust references.
unsafe impl Send for DmaBuffer {}
// SAFETY: as above.
unsafe impl Sync for DmaBuffer {}

impl DmaBuffer {
    /// CPU pointer of the first byte (the device may write this memory:
    /// access it only with raw-pointer reads and writes).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Copies `data` into the buffer at `off`.
    pub fn write(&self, off: usize, data: &[u8]) -> Result<()> {
        if off.checked_add(data.len()).is_none_or(|e| e > self.len) {
            return Err(Error::Invalid("write past the buffer".into()));
        }
        // SAFETY: in bounds (checked); the mapping outlives the buffer's use by
        // contract of DmaDomain; `data` is a distinct Rust slice.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(off), data.len()) };
        Ok(())
    }

    /// Copies bytes out of the buffer at `off`.
    pub fn read(&self, off: usize, out: &mut [u8]) -> Result<()> {
        if off.checked_add(out.len()).is_none_or(|e| e > self.len) {
            return Err(Error::Invalid("read past the buffer".into()));
        }
        // SAFETY: in bounds (checked); `out` is a distinct Rust slice.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(off), out.as_mut_ptr(), out.len()) };
        Ok(())
    }
}

struct Pool {
    map: Mapping,
    phys: u64,
    next: usize,
}

/// One CPU slot's magazines behind a spin lock, alone on its cache lines.
///
/// The lock is taken only by threads running on the slot's CPU, so it is
/// uncontended unless a holder was preempted inside its few instructions;
/// then the waiter yields. A spin lock's release is a plain store, where
/// `std::sync::Mutex` pays a second locked instruction to look for sleepers.
#[derive(Default)]
#[repr(align(128))]
struct Slot(spin::mutex::SpinMutex<CpuCache>);

impl Slot {
    fn lock(&self) -> spin::mutex::SpinMutexGuard<'_, CpuCache> {
        loop {
            if let Some(g) = self.0.try_lock() {
                return g;
            }
            std::thread::yield_now();
        }
    }
}

/// Client-side counters.
#[derive(Debug, Default)]
pub struct ClientStats {
    /// Blocking round trips made (attach and pool allocation included).
    pub round_trips: AtomicU64,
    /// One-way flush hints sent.
    pub wakeups: AtomicU64,
}

/// A snapshot of [`ClientStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientCounts {
    /// Blocking round trips.
    pub round_trips: u64,
    /// One-way wake-ups.
    pub wakeups: u64,
}

/// A driver's handle on its device's protection domain.
pub struct DmaDomain {
    conn: Mutex<Conn>,
    /// Source id of the device.
    pub bdf: u16,
    flags: u64,
    /// The published page, mapped read-only.
    published: Mapping,
    /// The client page and exchange area, mapped read-write.
    shared: Mapping,
    arena: Option<Mapping>,
    pools: Mutex<Vec<Pool>>,
    free_bufs: Mutex<Vec<(usize, DmaBuffer)>>,
    cpus: Vec<Slot>,
    /// The deferred policy's domain-wide queue (see `magazine::FlushQueue`).
    flush_queue: Mutex<FlushQueue>,
    stats: ClientStats,
    closed: AtomicBool,
}

/// Size of each pool requested from iommud.
const POOL_BYTES: u64 = 2 << 20;

impl DmaDomain {
    /// Connects to iommud at `socket` and attaches to the domain of `bdf`.
    #[cfg(not(target_os = "redox"))]
    pub fn connect(
        socket: &Path,
        bdf: u16,
        strategy: Strategy,
        flush: FlushPolicy,
    ) -> Result<DmaDomain> {
        Self::attach(Conn::connect(socket)?, bdf, strategy, flush)
    }

    /// Opens the session of `bdf` on the `iommu` scheme and attaches to its domain.
    #[cfg(target_os = "redox")]
    pub fn open(bdf: u16, strategy: Strategy, flush: FlushPolicy) -> Result<DmaDomain> {
        let link = crate::carrier::SchemeSession::open(bdf)?;
        Self::over(Box::new(link), bdf, strategy, flush)
    }

    /// Attaches to the domain of `bdf` over any carrier (see [`crate::carrier`]).
    pub fn over(
        link: Box<dyn Transport>,
        bdf: u16,
        strategy: Strategy,
        flush: FlushPolicy,
    ) -> Result<DmaDomain> {
        Self::attach(Conn::over(link)?, bdf, strategy, flush)
    }

    fn attach(
        mut conn: Conn,
        bdf: u16,
        strategy: Strategy,
        flush: FlushPolicy,
    ) -> Result<DmaDomain> {
        // Proof that this process owns the device (docs/ARCHITECTURE.md,
        // "Trust and the attacker"): on Linux an fd of the function's BAR
        // file opened read-write, which only its owner can open. Without
        // one, iommud refuses with a message saying what is missing.
        #[cfg(not(target_os = "redox"))]
        let proof = crate::proof::open(bdf, conn.path.as_deref()).ok();
        #[cfg(not(target_os = "redox"))]
        let proofs: Vec<std::os::fd::BorrowedFd<'_>> =
            proof.iter().map(std::os::fd::AsFd::as_fd).collect();
        #[cfg(target_os = "redox")]
        let proofs: Vec<std::os::fd::BorrowedFd<'_>> = Vec::new();
        let (r, mut fds) = conn.call_with_fds(
            &Request::Attach {
                bdf,
                strategy,
                flush,
            },
            &proofs,
        )?;
        let a = r
            .result
            .ok()
            .and_then(AttachReply::decode)
            .ok_or_else(|| Error::Invalid("attach reply does not decode".into()))?;
        if fds.len() < 2 {
            return Err(Error::Invalid(
                "attach reply carried no shared memory".into(),
            ));
        }
        let published = fds.remove(0).map_readonly(0, PUBLISHED_LEN)?;
        let shared = fds.remove(0).map(0, CLIENT_LEN)?;
        // A delegated domain has a leaf-table arena (so it can switch to the
        // magazine strategy later without another fd); a validated one none.
        let arena = match (fds.pop(), a.arena) {
            (Some(fd), Some((_, offset, len))) => Some(fd.map(offset, len as usize)?),
            (None, None) if strategy == Strategy::Magazine && a.flags & FLAG_TRANSLATING != 0 => {
                return Err(Error::Invalid("magazine attach without an arena".into()))
            }
            (None, None) => None,
            _ => {
                return Err(Error::Invalid(
                    "attach reply and its shares disagree".into(),
                ))
            }
        };
        let ncpu = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .clamp(1, MAX_CPUS);
        let d = DmaDomain {
            conn: Mutex::new(conn),
            bdf,
            flags: a.flags,
            published,
            shared,
            arena,
            pools: Mutex::new(Vec::new()),
            free_bufs: Mutex::new(Vec::new()),
            cpus: (0..ncpu).map(|_| Slot::default()).collect(),
            flush_queue: Mutex::new(FlushQueue::default()),
            stats: ClientStats::default(),
            closed: AtomicBool::new(false),
        };
        d.stats.round_trips.fetch_add(2, Relaxed); // hello + attach
        Ok(d)
    }

    /// The strategy in effect (NoIommu when iommud runs without translation).
    /// iommud publishes it in the shared page, so a switch of the idle domain
    /// (`domains/<bdf>/strategy`) shows here at once.
    pub fn strategy(&self) -> Strategy {
        if self.flags & FLAG_TRANSLATING == 0 {
            return Strategy::NoIommu;
        }
        Strategy::from_u64(u64::from(self.page().strategy.load(Relaxed)))
            .unwrap_or(Strategy::Global)
    }

    /// The flush policy in effect (published by iommud like the strategy).
    pub fn flush_policy(&self) -> FlushPolicy {
        FlushPolicy::from_u64(u64::from(self.page().flush.load(Relaxed)))
            .unwrap_or(FlushPolicy::Strict)
    }

    /// This process's virtual address of physical `phys`, if it lies in one
    /// of the domain's pools (the `va` strategy's IOVA).
    fn va_of(&self, phys: u64) -> Option<u64> {
        let pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        pools.iter().find_map(|p| {
            let off = phys.checked_sub(p.phys)?;
            (off < p.map.len() as u64).then(|| p.map.as_ptr() as u64 + off)
        })
    }

    /// True when the unit is in caching mode.
    pub fn caching_mode(&self) -> bool {
        self.flags & FLAG_CACHING_MODE != 0
    }

    /// The published page (epochs, policy, clock): read-only here.
    fn page(&self) -> &EpochPage {
        // SAFETY: `published` maps PUBLISHED_LEN bytes of the memfd iommud
        // made for this domain, page-aligned and alive as long as `self`;
        // EpochPage is all atomics and this side only loads from it.
        unsafe { view(self.published.as_ptr()) }
    }

    /// The client page (flush wishes, counters): written here only.
    fn client(&self) -> &ClientPage {
        // SAFETY: `shared` maps CLIENT_LEN bytes of the client memfd,
        // page-aligned and alive as long as `self`; ClientPage is all atomics.
        unsafe { view(self.shared.as_ptr()) }
    }

    fn conn(&self) -> MutexGuard<'_, Conn> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn call(&self, req: &Request) -> Result<[u64; 5]> {
        self.stats.round_trips.fetch_add(1, Relaxed);
        self.conn().args(req)
    }

    /// Counters of this client.
    pub fn counts(&self) -> ClientCounts {
        ClientCounts {
            round_trips: self.stats.round_trips.load(Relaxed),
            wakeups: self.stats.wakeups.load(Relaxed),
        }
    }

    /// Allocates a DMA buffer of `len` bytes (4 KiB aligned, never crossing
    /// a pool) from memory iommud gave this client.
    pub fn alloc(&self, len: usize) -> Result<DmaBuffer> {
        if len == 0 || len as u64 > POOL_BYTES {
            return Err(Error::Invalid(format!(
                "buffer size {len} not in 1..=2 MiB"
            )));
        }
        let rounded = len.next_multiple_of(PAGE as usize);
        {
            let mut f = self.free_bufs.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(i) = f.iter().position(|(sz, _)| *sz == rounded) {
                let (_, mut b) = f.swap_remove(i);
                b.len = len;
                return Ok(b);
            }
        }
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        if pools.last().is_none_or(|p| p.next + rounded > p.map.len()) {
            self.stats.round_trips.fetch_add(1, Relaxed);
            let (r, mut fds) = self
                .conn()
                .call(&Request::AllocPool { bytes: POOL_BYTES })?;
            let a = r
                .result
                .ok()
                .and_then(PoolReply::decode)
                .ok_or_else(|| Error::Invalid("pool reply does not decode".into()))?;
            let fd = fds
                .pop()
                .ok_or_else(|| Error::Invalid("pool reply carried no fd".into()))?;
            pools.push(Pool {
                map: fd.map(a.fd_offset, a.len as usize)?,
                phys: a.phys,
                next: 0,
            });
        }
        let p = pools.last_mut().ok_or(Error::Dead)?;
        if p.next + rounded > p.map.len() {
            return Err(Error::Invalid(format!(
                "pool of {} bytes cannot hold {len}",
                p.map.len()
            )));
        }
        // SAFETY: p.next + rounded ≤ the mapping's length (checked above).
        let ptr = unsafe { p.map.as_ptr().add(p.next) };
        let b = DmaBuffer {
            ptr,
            phys: p.phys + p.next as u64,
            len,
        };
        p.next += rounded;
        Ok(b)
    }

    /// Returns a buffer from [`DmaDomain::alloc`] for reuse.
    pub fn free(&self, b: DmaBuffer) {
        let rounded = b.len.next_multiple_of(PAGE as usize);
        self.free_bufs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((rounded, b));
    }

    fn slot(&self) -> usize {
        // SAFETY: sched_getcpu has no preconditions.
        #[cfg(not(target_os = "redox"))]
        let cpu = unsafe { libc::sched_getcpu() };
        // relibc has no sched_getcpu (libc 0.2.191's redox module): every
        // thread uses slot 0, so threads on several CPUs share its lock.
        #[cfg(target_os = "redox")]
        let cpu = 0;
        usize::try_from(cpu).unwrap_or(0) % self.cpus.len()
    }

    fn pte_offset(&self, iova: u64) -> Result<usize> {
        let rel = iova
            .checked_sub(MAGAZINE_IOVA_BASE)
            .ok_or_else(|| Error::Invalid(format!("iova {iova:#x} below the magazine range")))?;
        Ok(((rel >> 12) * 8) as usize)
    }

    fn write_ptes(
        &self,
        arena: &Mapping,
        iova: u64,
        phys: u64,
        pages: u64,
        dir: Option<Dir>,
    ) -> Result<()> {
        let first = self.pte_offset(iova)?;
        for p in 0..pages as usize {
            let at = first + 8 * p;
            let v = match dir {
                // VT-d 3.x §9.8: second-level leaf: address 51:12, W bit 1, R bit 0.
                Some(d) => vtd::entry::SlPte::new(phys + p as u64 * PAGE, d.read(), d.write()).0,
                None => {
                    let old = arena.read_u64(at).ok_or_else(|| {
                        Error::Invalid(format!("iova {iova:#x} outside the arena"))
                    })?;
                    if !vtd::entry::SlPte(old).present() {
                        return Err(Error::Invalid(format!(
                            "iova {:#x} is not mapped",
                            iova + p as u64 * PAGE
                        )));
                    }
                    0
                }
            };
            arena
                .write_u64(at, v)
                .ok_or_else(|| Error::Invalid(format!("iova {iova:#x} outside the arena")))?;
        }
        if self.flags & FLAG_COHERENT == 0 {
            // SAFETY: `first` and the entries after it are inside the arena (written above).
            flush_cache_range(unsafe { arena.as_ptr().add(first) }, pages as usize * 8);
        }
        Ok(())
    }

    /// Maps `len` bytes at physical `phys` for the device; returns the IOVA of
    /// `phys`. With the magazine strategy this makes no IPC (except a rare
    /// depot exchange, or one round trip per map in caching mode).
    pub fn map(&self, phys: u64, len: usize, dir: Dir) -> Result<u64> {
        self.map_one(phys, len, dir, true)
    }

    /// [`DmaDomain::map`]; `sync` = false leaves the caching-mode
    /// invalidation to the caller (a batch needs only one).
    fn map_one(&self, phys: u64, len: usize, dir: Dir, sync: bool) -> Result<u64> {
        if len == 0 {
            return Err(Error::Invalid("zero-length map".into()));
        }
        // iommud detached the domain (a stop, or it blocked the device): the
        // entries would reach no device; say so instead of mapping.
        if self.page().dead.load(Relaxed) != 0 {
            return Err(Error::Dead);
        }
        let off = phys % PAGE;
        let pages = (off + len as u64).div_ceil(PAGE);
        match (self.strategy(), size_class(pages), &self.arena) {
            (Strategy::NoIommu, _, _) => Ok(phys),
            (Strategy::Magazine, Some(class), Some(arena)) => {
                let slot = self.slot();
                let iova = {
                    let mut c = self.cpus[slot].lock();
                    let (iova, ev) = match c.alloc(class, &Remote(self)) {
                        Err(Error::Server {
                            code: ErrorCode::NoSpace,
                            ..
                        }) => {
                            // The depot is dry and this CPU holds nothing it
                            // could recycle: the IOVAs are in other CPUs'
                            // caches or the deferred queue. As Linux does when
                            // its IOVA caches run dry, give every cache back to
                            // the depot (after their invalidations) and retry once.
                            drop(c);
                            self.drain()?;
                            c = self.cpus[slot].lock();
                            c.alloc(class, &Remote(self))?
                        }
                        r => r?,
                    };
                    // Counted under the slot lock, the slot's only writer.
                    let k = &self.client().cpu[slot];
                    bump(&k.maps);
                    if ev.hit {
                        bump(&k.mag_hits); // misses = maps - hits
                    }
                    if ev.recycled {
                        bump(&k.batches_recycled);
                    }
                    iova
                };
                if let Err(e) = self.write_ptes(arena, iova, phys - off, pages, Some(dir)) {
                    let tag = self.page().epoch.load(SeqCst);
                    self.cpus[slot].lock().free(class, iova, tag, &Remote(self));
                    return Err(e);
                }
                if sync && self.caching_mode() {
                    // CAP.CM: a non-present → present change must be invalidated
                    // before the device may use it.
                    self.call(&Request::FlushSync)?;
                }
                Ok(iova + off)
            }
            // Validated trust: iommud checks the frames and writes the entries
            // (global, identity, va, and magazine mappings over 32 pages).
            (strategy, _, _) => {
                let va = self.va_hint(strategy, phys)?;
                let a = self.call(&Request::Map {
                    phys,
                    len: len as u64,
                    dir,
                    va,
                })?;
                Ok(a[0])
            }
        }
    }

    /// The IOVA the `va` strategy wants for `phys` (its address here), 0 for the others.
    fn va_hint(&self, strategy: Strategy, phys: u64) -> Result<u64> {
        match strategy {
            Strategy::Va => self.va_of(phys).ok_or_else(|| {
                Error::Invalid(format!(
                    "{phys:#x} is not in this domain's pools (the va strategy needs its address)"
                ))
            }),
            _ => Ok(0),
        }
    }

    /// Maps several buffers `(phys, len, dir)`, all or nothing, returning
    /// their IOVAs in order. With the magazine strategy each takes the fast
    /// path, and in caching mode one invalidation covers the whole batch
    /// instead of one per map; with a validated strategy (global, identity,
    /// va) iommud gets the buffers [`MAX_BATCH`] at a time, one round trip
    /// per batch instead of one per buffer.
    pub fn map_batch(&self, bufs: &[(u64, usize, Dir)]) -> Result<Vec<u64>> {
        let mut out = Vec::with_capacity(bufs.len());
        let undo = |out: &[u64]| {
            for (iova, &(_, len, _)) in out.iter().zip(bufs) {
                let _ = self.unmap(*iova, len);
            }
        };
        match self.strategy() {
            Strategy::NoIommu => return Ok(bufs.iter().map(|b| b.0).collect()),
            Strategy::Magazine => {
                for &(phys, len, dir) in bufs {
                    match self.map_one(phys, len, dir, false) {
                        Ok(iova) => out.push(iova),
                        Err(e) => {
                            undo(&out);
                            return Err(e);
                        }
                    }
                }
                if self.caching_mode() && !out.is_empty() {
                    if let Err(e) = self.call(&Request::FlushSync) {
                        undo(&out);
                        return Err(e);
                    }
                }
            }
            strategy => {
                for chunk in bufs.chunks(MAX_BATCH) {
                    let mut entries = Vec::with_capacity(chunk.len());
                    for &(phys, len, dir) in chunk {
                        if len == 0 {
                            undo(&out);
                            return Err(Error::Invalid("zero-length map".into()));
                        }
                        let va = match self.va_hint(strategy, phys) {
                            Ok(va) => va,
                            Err(e) => {
                                undo(&out);
                                return Err(e);
                            }
                        };
                        entries.push(MapEntry {
                            phys,
                            len: len as u64,
                            dir,
                            va,
                        });
                    }
                    self.stats.round_trips.fetch_add(1, Relaxed);
                    let r = self.conn().call(&Request::MapBatch { entries });
                    let (reply, _) = match r {
                        Ok(r) => r,
                        Err(e) => {
                            undo(&out);
                            return Err(e);
                        }
                    };
                    if reply.payload.len() != chunk.len() * 8 {
                        undo(&out);
                        return Err(Error::Invalid(format!(
                            "MapBatch reply carried {} bytes for {} IOVAs",
                            reply.payload.len(),
                            chunk.len()
                        )));
                    }
                    out.extend(reply.payload.chunks(8).map(|b| {
                        let mut a = [0u8; 8];
                        a.copy_from_slice(b);
                        u64::from_le_bytes(a)
                    }));
                }
            }
        }
        Ok(out)
    }

    /// Unmaps several mappings `(iova, len)` made by [`DmaDomain::map`] or
    /// [`DmaDomain::map_batch`], in order; a validated strategy sends them to
    /// iommud [`MAX_BATCH`] at a time.
    pub fn unmap_batch(&self, maps: &[(u64, usize)]) -> Result<()> {
        match self.strategy() {
            Strategy::NoIommu => Ok(()),
            Strategy::Magazine => maps
                .iter()
                .try_for_each(|&(iova, len)| self.unmap(iova, len)),
            _ => {
                for chunk in maps.chunks(MAX_BATCH) {
                    self.call(&Request::UnmapBatch {
                        entries: chunk.iter().map(|&(i, l)| (i, l as u64)).collect(),
                    })?;
                }
                Ok(())
            }
        }
    }

    /// Unmaps what [`DmaDomain::map`] returned (same `len`).
    pub fn unmap(&self, iova: u64, len: usize) -> Result<()> {
        if len == 0 {
            return Err(Error::Invalid("zero-length unmap".into()));
        }
        let off = iova % PAGE;
        let pages = (off + len as u64).div_ceil(PAGE);
        let base = iova - off;
        let in_arena = base >= MAGAZINE_IOVA_BASE;
        match (self.strategy(), size_class(pages), &self.arena) {
            (Strategy::NoIommu, _, _) => Ok(()),
            (Strategy::Magazine, Some(class), Some(arena)) if in_arena => {
                self.write_ptes(arena, base, 0, pages, None)?;
                let flush = self.flush_policy();
                // The tag is the epoch read after the clear (crate::shared),
                // so the clear must be ordered before that read. With percore
                // the batch is tagged once when it is sealed (one fence for
                // MAG_SIZE unmaps, see `Backend::seal`); the others tag each unmap.
                let tag = if flush == FlushPolicy::PerCore {
                    0
                } else {
                    std::sync::atomic::fence(SeqCst);
                    self.page().epoch.load(SeqCst)
                };
                let slot = self.slot();
                {
                    // Recorded under the slot lock, the slot's only writer.
                    let mut c = self.cpus[slot].lock();
                    let k = &self.client().cpu[slot];
                    k.note_unmap(self.page());
                    bump(&k.unmaps);
                    if flush != FlushPolicy::Deferred {
                        c.free(class, base, tag, &Remote(self));
                    }
                }
                if flush == FlushPolicy::Deferred {
                    self.defer(slot, class, base, tag);
                }
                if flush == FlushPolicy::Strict {
                    Remote(self).wait_completed(tag)?;
                }
                Ok(())
            }
            _ => {
                self.call(&Request::Unmap {
                    iova,
                    len: len as u64,
                })?;
                Ok(())
            }
        }
    }

    /// Deferred policy: queue the IOVA in the domain-wide flush queue. A
    /// queue that an invalidation already covers, or one that is full or
    /// 10 ms old, is closed into this CPU's pending batches; a full or old
    /// one also asks iommud (one-way) to flush now.
    fn defer(&self, slot: usize, class: usize, iova: u64, tag: u64) {
        let completed = self.page().completed.load(SeqCst);
        let now = self.page().now();
        let mut closed = Vec::new();
        let mut want = None;
        {
            let mut q = self.flush_queue.lock().unwrap_or_else(|p| p.into_inner());
            if !q.is_empty() && completed >= q.tag() {
                closed = q.close();
            }
            if q.push(class, iova, tag, now) {
                want = Some(q.tag());
                closed.extend(q.close());
            }
        }
        if let Some(t) = want {
            Remote(self).request_flush(t);
        }
        if !closed.is_empty() {
            let mut c = self.cpus[slot].lock();
            for (class, d) in closed {
                c.adopt(class, d);
            }
        }
    }

    /// Waits for every unmapped IOVA's invalidation and returns all cached
    /// IOVAs to iommud's depot; returns how many.
    pub fn drain(&self) -> Result<usize> {
        let closed = {
            let mut q = self.flush_queue.lock().unwrap_or_else(|p| p.into_inner());
            let tag = q.tag();
            (!q.is_empty()).then(|| (tag, q.close()))
        };
        if let Some((tag, batches)) = closed {
            Remote(self).request_flush(tag);
            let mut c = self.cpus[0].lock();
            for (class, d) in batches {
                c.adopt(class, d);
            }
        }
        let mut n = 0;
        for c in &self.cpus {
            n += c.lock().drain(&Remote(self))?;
        }
        Ok(n)
    }

    /// Clean shutdown: drain, then detach (iommud frees tables and pools).
    pub fn shutdown(self) -> Result<usize> {
        let n = self.drain()?;
        self.closed.store(true, SeqCst);
        self.call(&Request::Detach)?;
        Ok(n)
    }

    /// Reads a path of iommud's tree over this connection.
    pub fn read_path(&self, path: &str) -> Result<String> {
        self.stats.round_trips.fetch_add(1, Relaxed);
        let (r, _) = self.conn().call(&Request::ReadPath { path: path.into() })?;
        Ok(String::from_utf8_lossy(&r.payload).into_owned())
    }
}

/// How long a client that needs a completed epoch watches shared memory
/// before it asks with a blocking `FlushSync`.
const POLL_BEFORE_BLOCKING: std::time::Duration = std::time::Duration::from_micros(500);

/// The magazine backend: shared-memory epochs and the depot over IPC.
struct Remote<'a>(&'a DmaDomain);

impl Backend for Remote<'_> {
    type Error = Error;

    fn completed(&self) -> u64 {
        self.0.page().completed.load(SeqCst)
    }

    fn request_flush(&self, tag: u64) {
        let p = self.0.client();
        p.wanted.fetch_max(tag, SeqCst);
        if self.0.page().completed.load(SeqCst) < tag && p.hint_pending.swap(1, SeqCst) == 0 {
            self.0.stats.wakeups.fetch_add(1, Relaxed);
            if self.0.conn().post(&Request::FlushHint).is_err() {
                // iommud's epoch timer still sees `wanted`; nothing is lost.
                p.hint_pending.store(0, SeqCst);
            }
        }
    }

    fn want(&self, tag: u64) {
        self.0.client().wanted.fetch_max(tag, SeqCst);
    }

    fn seal(&self) -> u64 {
        // Every clear of the batch precedes this fence in program order (or
        // happens-before it through the slot lock), so the epoch read after
        // it is at least each clear's own tag.
        std::sync::atomic::fence(SeqCst);
        self.0.page().epoch.load(SeqCst)
    }

    fn wait_completed(&self, tag: u64) -> Result<()> {
        // The batch's flush was already requested (a hint, or iommud's epoch
        // timer sees `wanted`): give iommud a moment to publish the epoch by
        // watching shared memory before paying a blocking round trip.
        self.request_flush(tag);
        let start = std::time::Instant::now();
        while self.completed() < tag && start.elapsed() < POLL_BEFORE_BLOCKING {
            std::thread::yield_now();
        }
        while self.completed() < tag {
            if self.0.page().dead.load(SeqCst) != 0 {
                return Err(Error::Dead);
            }
            self.0.call(&Request::FlushSync)?;
        }
        Ok(())
    }

    fn exchange(&self, class: usize, give: Clean, want: usize) -> Result<Clean> {
        let give = give.into_vec();
        if give.len() > EXCHANGE_SLOTS {
            return Err(Error::Invalid("too many IOVAs for one exchange".into()));
        }
        let mut conn = self.0.conn();
        for (k, iova) in give.iter().enumerate() {
            self.0
                .shared
                .write_u64(EXCHANGE_OFFSET + 8 * k, *iova)
                .ok_or(Error::Dead)?;
        }
        self.0.stats.round_trips.fetch_add(1, Relaxed);
        let a = conn.args(&Request::Exchange {
            pages: class_pages(class),
            returned: give.len() as u64,
            want: want as u64,
        })?;
        let n = (a[0] as usize).min(want).min(EXCHANGE_SLOTS);
        let mut got = Vec::with_capacity(n);
        for k in 0..n {
            got.push(
                self.0
                    .shared
                    .read_u64(EXCHANGE_OFFSET + 8 * k)
                    .ok_or(Error::Dead)?,
            );
        }
        Ok(Clean::from_depot(got))
    }

    fn exhausted(&self) -> Error {
        Error::Server {
            code: ErrorCode::NoSpace,
            msg: "no IOVA left in the depot or this CPU's magazines".into(),
        }
    }
}

impl Drop for DmaDomain {
    fn drop(&mut self) {
        if !self.closed.load(SeqCst) {
            // Best effort; iommud tears the domain down when the socket closes anyway.
            let _ = self.conn().post(&Request::Detach);
        }
    }
}
