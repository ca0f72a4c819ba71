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
    Strategy, FLAG_CACHING_MODE, FLAG_COHERENT, FLAG_TRANSLATING, FLAG_VALIDATED, MAX_BATCH,
    MAX_MESSAGE, VERSION,
};
use crate::shared::{
    bump, bump_by, view, ClientPage, EpochPage, CLIENT_LEN, EXCHANGE_OFFSET, EXCHANGE_SLOTS,
    MAGAZINE_IOVA_BASE, MAX_CPUS, PUBLISHED_LEN,
};
use crate::shm::{write_back_fence, write_back_lines, Mapping};
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

/// True if `e` says the connection to iommud is gone (it exited or died),
/// or that no iommud listens yet.
fn broken(e: &Error) -> bool {
    use std::io::ErrorKind as K;
    match e {
        Error::Dead => true,
        Error::Io(io) => matches!(
            io.kind(),
            K::BrokenPipe
                | K::ConnectionReset
                | K::ConnectionAborted
                | K::ConnectionRefused
                | K::NotConnected
                | K::NotFound
                | K::UnexpectedEof
        ),
        _ => false,
    }
}

mod batch;
mod buffer;
mod conn;
mod fastbatch;
mod fastpath;
mod remote;
mod ring;
#[cfg(all(test, not(target_os = "redox")))]
mod tests;

pub use buffer::DmaBuffer;
use conn::Conn;
pub use conn::Control;
pub use fastbatch::UnmapTicket;
use remote::Remote;
use ring::{ClientRings, RegionInfo};
pub use ring::{MapTicket, RemapHints};

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
    /// One-way flush hints sent (and ring doorbells rung).
    pub wakeups: AtomicU64,
    /// Reattaches to a restarted iommud.
    pub reattaches: AtomicU64,
    /// Ring entries iommud refused that nobody waited for (unmaps).
    pub ring_errors: AtomicU64,
    /// Remap pairs kept at their old IOVA here (delegated trust; iommud
    /// counts those of the rings as `ring_kept`).
    pub kept: AtomicU64,
}

/// A snapshot of [`ClientStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientCounts {
    /// Blocking round trips.
    pub round_trips: u64,
    /// One-way wake-ups (flush hints and ring doorbells).
    pub wakeups: u64,
    /// Ring entries refused that nobody waited for.
    pub ring_errors: u64,
    /// Remap pairs kept at their old IOVA by libdma (delegated trust).
    pub kept: u64,
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
    /// The registered regions (pools), for ring entries and `static`:
    /// appended under the pools' lock, read without any lock.
    regions: ring::Regions,
    /// Validated trust: the submission and completion rings.
    rings: Option<ClientRings>,
    free_bufs: Mutex<Vec<(usize, DmaBuffer)>>,
    cpus: Vec<Slot>,
    /// The deferred policy's domain-wide queue (see `magazine::FlushQueue`).
    flush_queue: Mutex<FlushQueue>,
    stats: ClientStats,
    closed: AtomicBool,
    /// The reattach token of the attach reply: with it, libdma reconnects
    /// to a restarted iommud by itself (docs/ARCHITECTURE.md, "Stop, crash
    /// and restart"). `None`: the domain dies with its iommud.
    token: Option<u128>,
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
        let token = <[u8; 16]>::try_from(r.payload.as_slice())
            .ok()
            .map(u128::from_le_bytes)
            .filter(|t| *t != 0);
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
            (None, None)
                if strategy == Strategy::Magazine
                    && a.flags & FLAG_TRANSLATING != 0
                    && a.flags & FLAG_VALIDATED == 0 =>
            {
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
        // Validated trust: every map and unmap is a request; the rings carry
        // them with no system call. Without rings (a platform without them)
        // the socket carries them, one round trip per request or batch.
        let mut setup_trips = 2; // hello + attach
        let rings = if a.flags & FLAG_VALIDATED != 0 && a.flags & FLAG_TRANSLATING != 0 {
            setup_trips += 1;
            ClientRings::setup(&mut conn, ncpu).ok()
        } else {
            None
        };
        let d = DmaDomain {
            conn: Mutex::new(conn),
            bdf,
            flags: a.flags,
            published,
            shared,
            arena,
            pools: Mutex::new(Vec::new()),
            regions: Default::default(),
            rings,
            free_bufs: Mutex::new(Vec::new()),
            cpus: (0..ncpu).map(|_| Slot::default()).collect(),
            flush_queue: Mutex::new(FlushQueue::default()),
            stats: ClientStats::default(),
            closed: AtomicBool::new(false),
            token,
        };
        d.stats.round_trips.fetch_add(setup_trips, Relaxed);
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

    /// True when iommud validates every map (validated trust).
    pub fn validated(&self) -> bool {
        self.flags & FLAG_VALIDATED != 0
    }

    /// True when maps and unmaps travel through the rings.
    pub fn uses_rings(&self) -> bool {
        self.rings.is_some()
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
        self.with_conn(|c| c.args(req))
    }

    /// Runs `f` on the connection. If iommud is gone (the connection broke)
    /// and the domain has a reattach token, reconnects to the restarted
    /// iommud, reattaches and runs `f` once more: the driver sees a slow
    /// request, not an error. Other threads needing the connection wait;
    /// the fast path (magazine hits) goes on meanwhile, its entries in the
    /// arena the restarted iommud adopts.
    fn with_conn<T>(&self, mut f: impl FnMut(&mut Conn) -> Result<T>) -> Result<T> {
        let mut c = self.conn();
        match f(&mut c) {
            // A domain iommud detached (an orderly stop) is not coming back.
            Err(e)
                if self.token.is_some()
                    && broken(&e)
                    && self.page().dead.load(SeqCst) != iommu_abi::shared::DEAD_DETACHED =>
            {
                self.reattach(&mut c, &e)?;
                f(&mut c)
            }
            r => r,
        }
    }

    /// One round trip that only asks whether iommud is there: a broken
    /// connection reattaches (see [`DmaDomain::with_conn`]).
    pub(super) fn probe(&self) -> Result<()> {
        self.with_conn(|c| {
            c.call(&Request::Hello {
                version: u64::from(VERSION),
            })
            .map(|_| ())
        })
    }

    /// The published page says the domain is not ours to use as it is:
    /// detached for good (`Dead`), or adopted by a restarted iommud, in which
    /// case this reattaches now (one round trip that finds the connection
    /// broken) and returns once the domain is ours again.
    pub(super) fn reattach_if_adopted(&self) -> Result<()> {
        match self.page().dead.load(SeqCst) {
            0 => Ok(()),
            iommu_abi::shared::DEAD_ADOPTED if self.token.is_some() => {
                self.probe()?;
                // A reply from a live iommud that still holds us adopted
                // means another thread's reattach is on its way: wait for it.
                let start = std::time::Instant::now();
                while self.page().dead.load(SeqCst) == iommu_abi::shared::DEAD_ADOPTED {
                    if start.elapsed() > std::time::Duration::from_secs(10) {
                        return Err(Error::Dead);
                    }
                    std::thread::yield_now();
                }
                if self.page().dead.load(SeqCst) != 0 {
                    return Err(Error::Dead);
                }
                Ok(())
            }
            _ => Err(Error::Dead),
        }
    }

    /// Reconnects and reattaches (see [`DmaDomain::with_conn`]), retrying
    /// while iommud is not back, for up to `LIBDMA_REATTACH_MS` (default
    /// 60 000) milliseconds.
    #[cfg(not(target_os = "redox"))]
    fn reattach(&self, c: &mut Conn, why: &Error) -> Result<()> {
        let (Some(token), Some(path)) = (self.token, c.path.clone()) else {
            return Err(Error::Dead);
        };
        let limit = std::env::var("LIBDMA_REATTACH_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(60_000u64);
        let start = std::time::Instant::now();
        let mut pause = std::time::Duration::from_millis(10);
        let why = match why {
            Error::Dead => "its connection closed".to_string(),
            e => e.to_string(),
        };
        eprintln!(
            "libdma: {}: lost iommud ({why}); reconnecting",
            iommu_abi::Bdf(self.bdf)
        );
        loop {
            let attempt = Conn::connect(&path).and_then(|mut n| {
                let proof = crate::proof::open(self.bdf, Some(&path)).ok();
                let proofs: Vec<std::os::fd::BorrowedFd<'_>> =
                    proof.iter().map(std::os::fd::AsFd::as_fd).collect();
                let (_, fds) = n.call_with_fds(
                    &Request::Reattach {
                        bdf: self.bdf,
                        token,
                    },
                    &proofs,
                )?;
                // Rings go on in the same memory; their doorbell is new (last).
                if let Some(rings) = &self.rings {
                    let bell = fds
                        .into_iter()
                        .last()
                        .and_then(|s| s.into_fd())
                        .ok_or_else(|| {
                            Error::Invalid("reattach reply carried no doorbell".into())
                        })?;
                    rings.new_doorbell(bell);
                }
                Ok(n)
            });
            match attempt {
                Ok(n) => {
                    *c = n;
                    self.stats.reattaches.fetch_add(1, Relaxed);
                    eprintln!(
                        "libdma: {}: reattached after {} ms",
                        iommu_abi::Bdf(self.bdf),
                        start.elapsed().as_millis()
                    );
                    return Ok(());
                }
                // Not back yet (no socket, refused, or gone again).
                Err(e) if broken(&e) && start.elapsed().as_millis() < u128::from(limit) => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(std::time::Duration::from_millis(250));
                }
                Err(e) => {
                    eprintln!("libdma: {}: reattach failed: {e}", iommu_abi::Bdf(self.bdf));
                    return Err(e);
                }
            }
        }
    }

    /// Redox: the scheme session is the connection; no reattach.
    #[cfg(target_os = "redox")]
    fn reattach(&self, _c: &mut Conn, _why: &Error) -> Result<()> {
        Err(Error::Dead)
    }

    /// How many times this domain reattached to a restarted iommud.
    pub fn reattaches(&self) -> u64 {
        self.stats.reattaches.load(Relaxed)
    }

    /// Counters of this client.
    pub fn counts(&self) -> ClientCounts {
        ClientCounts {
            round_trips: self.stats.round_trips.load(Relaxed),
            wakeups: self.stats.wakeups.load(Relaxed),
            ring_errors: self.stats.ring_errors.load(Relaxed),
            kept: self.stats.kept.load(Relaxed),
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
            let (r, mut fds) =
                self.with_conn(|c| c.call(&Request::AllocPool { bytes: POOL_BYTES }))?;
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
            self.regions.push(RegionInfo {
                phys: a.phys,
                len: a.len,
                index: a.region,
                iova: a.iova,
            })?;
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

    /// Waits for every unmapped IOVA's invalidation and returns all cached
    /// IOVAs to iommud's depot; returns how many.
    pub fn drain(&self) -> Result<usize> {
        self.ring_drain()?;
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
        let (r, _) = self.with_conn(|c| c.call(&Request::ReadPath { path: path.into() }))?;
        Ok(String::from_utf8_lossy(&r.payload).into_owned())
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
