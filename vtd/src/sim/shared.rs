//! Shared-memory mappings and the fixed layout of the model's device state.
//!
//! Every field of the state region is an atomic, so any number of processes
//! may map it and hold `&` references to it; consistency between fields is
//! provided by [`SpinLock`], a cross-process lock living in the same region.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::*};

/// "VTDSIM01" little-endian-ish tag marking an initialised state region.
pub(crate) const MAGIC: u64 = 0x3130_4D49_5344_5456;
/// Bytes of register space modelled.
pub(crate) const REG_BYTES: usize = 0x1000;
/// Number of source ids (one context-cache slot each).
pub(crate) const NSID: usize = 1 << 16;
/// Ways per IOTLB / paging-structure-cache bucket.
pub(crate) const WAYS: usize = 8;
/// Number of counters kept (must match `Ctr::COUNT`).
pub(crate) const NCOUNTERS: usize = 32;

/// A context-cache slot. `state`: 0 empty, 1 present entry (`lo`, `hi` as in
/// memory), 2 negative entry (caching mode; `lo` = fault reason).
#[repr(C)]
pub(crate) struct CtxSlot {
    pub state: AtomicU64,
    pub lo: AtomicU64,
    pub hi: AtomicU64,
}

/// A hash-cache slot: `key` 0 = empty.
#[repr(C)]
pub(crate) struct Slot {
    pub key: AtomicU64,
    pub val: AtomicU64,
}

/// Fixed-size head of the state region; the IOTLB and paging-structure
/// cache slot arrays follow it.
#[repr(C)]
pub(crate) struct Header {
    pub magic: AtomicU64,
    pub lock: AtomicU32,
    pub _pad: AtomicU32,
    pub mem_bytes: AtomicU64,
    pub caching_mode: AtomicU64,
    pub aw_bits: AtomicU64,
    pub iotlb_capacity: AtomicU64,
    pub buckets: AtomicU64,
    pub nfr: AtomicU64,
    pub inval_latency_ns: AtomicU64,
    /// Root table address latched by GCMD.SRTP.
    pub root: AtomicU64,
    pub next_frcd: AtomicU64,
    pub iotlb_count: AtomicU64,
    pub ps_count: AtomicU64,
    /// 1 when the last queued descriptor executed was an invalidation wait
    /// (QEMU refuses to disable QI otherwise: docs/ARCHITECTURE.md, "QEMU's VT-d unit").
    pub last_wait: AtomicU64,
    pub regs: [AtomicU64; REG_BYTES / 8],
    pub counters: [AtomicU64; NCOUNTERS],
    pub ctx: [CtxSlot; NSID],
}

/// Total bytes of a state region whose caches have `buckets` buckets each.
pub(crate) fn state_bytes(buckets: usize) -> usize {
    std::mem::size_of::<Header>() + 2 * buckets * WAYS * std::mem::size_of::<Slot>()
}

/// A `MAP_SHARED` mapping of a whole memfd (the project's one mapping type,
/// `iommu_abi::shm::Mapping`), with the file kept to share it further.
pub(crate) struct Mapping {
    map: iommu_abi::shm::Mapping,
    pub fd: OwnedFd,
}

impl Mapping {
    /// Create a zero-filled memfd of `len` bytes and map it shared.
    pub fn create(name: &str, len: usize) -> io::Result<Self> {
        let fd = iommu_abi::shm::memfd(name, len)?;
        Self::map(fd, len)
    }

    /// Map an existing fd (duplicated) of at least `len` bytes.
    pub fn open(fd: BorrowedFd<'_>, len: usize) -> io::Result<Self> {
        let fd = fd.try_clone_to_owned()?;
        // SAFETY: `st` is a plain out-parameter for fstat.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid fd and a valid pointer to `st`.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } < 0 {
            return Err(io::Error::last_os_error());
        }
        if u64::try_from(st.st_size).unwrap_or(0) < len as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "shared region smaller than expected",
            ));
        }
        Self::map(fd, len)
    }

    fn map(fd: OwnedFd, len: usize) -> io::Result<Self> {
        let map = iommu_abi::shm::Mapping::new(fd.as_fd(), 0, len)?;
        Ok(Self { map, fd })
    }

    /// Start of the mapping.
    pub fn as_ptr(&self) -> *mut u8 {
        self.map.as_ptr()
    }

    /// Bytes mapped.
    pub fn len(&self) -> usize {
        self.map.len()
    }
}

/// Cross-process spin lock on an `AtomicU32` in shared memory.
pub(crate) struct SpinLock;

/// Held lock; released on drop.
pub(crate) struct Guard<'a>(&'a AtomicU32);

impl SpinLock {
    /// Acquire `word` (CAS 0 -> 1, spinning, then yielding, then sleeping
    /// briefly). A process that dies holding it leaves it held: the model is
    /// a test fixture.
    ///
    /// The sleeps matter to a real-time waiter (iommud's epoch timer runs
    /// `SCHED_FIFO`): `sched_yield` gives its CPU to no thread of a lower
    /// class, so a holder preempted on that CPU would never run again.
    pub fn lock(word: &AtomicU32) -> Guard<'_> {
        let mut spins = 0u32;
        loop {
            if word.compare_exchange_weak(0, 1, Acquire, Relaxed).is_ok() {
                return Guard(word);
            }
            spins = spins.saturating_add(1);
            if spins < 64 {
                std::hint::spin_loop();
            } else if spins < 128 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(std::time::Duration::from_micros(20));
            }
        }
    }
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        self.0.store(0, Release);
    }
}

/// A set-associative hash cache over a slot array, wiped whole when it
/// holds `capacity` entries (QEMU wipes its 1024-entry IOTLB hash the same
/// way) or when a key's bucket is full.
pub(crate) struct HashCache<'a> {
    pub slots: &'a [Slot],
    pub count: &'a AtomicU64,
    pub capacity: u64,
}

fn hash(key: u64) -> u64 {
    let h = key.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    h ^ (h >> 29)
}

impl HashCache<'_> {
    fn bucket(&self, key: u64) -> &[Slot] {
        let nb = self.slots.len() / WAYS;
        let b = (hash(key) as usize) & (nb - 1);
        &self.slots[b * WAYS..(b + 1) * WAYS]
    }

    pub fn lookup(&self, key: u64) -> Option<u64> {
        self.bucket(key)
            .iter()
            .find(|s| s.key.load(Relaxed) == key)
            .map(|s| s.val.load(Relaxed))
    }

    /// Insert or update; returns true if the cache was wiped to make room.
    pub fn insert(&self, key: u64, val: u64) -> bool {
        if let Some(s) = self.bucket(key).iter().find(|s| s.key.load(Relaxed) == key) {
            s.val.store(val, Relaxed);
            return false;
        }
        let mut wiped = false;
        if self.count.load(Relaxed) >= self.capacity {
            self.wipe();
            wiped = true;
        }
        let free = match self.bucket(key).iter().find(|s| s.key.load(Relaxed) == 0) {
            Some(s) => s,
            None => {
                self.wipe();
                wiped = true;
                &self.bucket(key)[0]
            }
        };
        free.key.store(key, Relaxed);
        free.val.store(val, Relaxed);
        self.count.fetch_add(1, Relaxed);
        wiped
    }

    pub fn remove(&self, key: u64) {
        for s in self.bucket(key) {
            if s.key.load(Relaxed) == key {
                s.key.store(0, Relaxed);
                self.count.fetch_sub(1, Relaxed);
            }
        }
    }

    pub fn remove_if(&self, mut pred: impl FnMut(u64) -> bool) {
        // An empty cache has nothing to scan (the slots are many; the model's
        // invalidations run on the CPU of whoever wrote the queue tail).
        if self.count.load(Relaxed) == 0 {
            return;
        }
        for s in self.slots {
            let k = s.key.load(Relaxed);
            if k != 0 && pred(k) {
                s.key.store(0, Relaxed);
                self.count.fetch_sub(1, Relaxed);
            }
        }
    }

    pub fn wipe(&self) {
        for s in self.slots {
            s.key.store(0, Relaxed);
        }
        self.count.store(0, Relaxed);
    }
}
