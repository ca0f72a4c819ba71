//! The two hardware seams iommud's policy code needs, each with a real
//! implementation (Linux `/dev/mem` + hugepages, Redox memory scheme) and a
//! model (the `sim` platform over [`vtd::sim`]).

use std::os::fd::OwnedFd;
use std::sync::Arc;
use thiserror::Error;

/// Errors from the hardware seams.
#[derive(Debug, Error)]
pub enum HwError {
    /// No physical memory left for tables or pools.
    #[error("out of physical memory ({0})")]
    NoMemory(&'static str),
    /// A physical address outside every region iommud owns.
    #[error("physical address {0:#x} is not in memory iommud owns")]
    BadPhys(u64),
    /// A wait on the hardware ran out of time.
    #[error("timed out after {ms} ms waiting for {what}")]
    Timeout {
        /// What was awaited (register and bit).
        what: &'static str,
        /// Milliseconds waited.
        ms: u64,
    },
    /// The hardware reported an error.
    #[error("hardware error: {0}")]
    Hardware(String),
    /// The hardware lacks something iommud needs.
    #[error("unsupported hardware: {0}")]
    Unsupported(String),
    /// An OS call failed.
    #[error("{what}: {err}")]
    Os {
        /// What was being done.
        what: &'static str,
        /// The error.
        err: std::io::Error,
    },
}

/// Register access to one VT-d unit (32- and 64-bit, at byte offsets).
pub trait Mmio: Send + Sync {
    /// Reads a 32-bit register.
    fn read32(&self, off: usize) -> u32;
    /// Reads a 64-bit register.
    fn read64(&self, off: usize) -> u64;
    /// Writes a 32-bit register.
    fn write32(&self, off: usize, v: u32);
    /// Writes a 64-bit register.
    fn write64(&self, off: usize, v: u64);
}

/// Physically contiguous memory that can be shared with a client process:
/// the client maps `len` bytes of `fd` from `fd_offset`; byte `i` of that
/// mapping has physical address `phys + i`.
#[derive(Clone, Debug)]
pub struct Region {
    /// File to map.
    pub fd: Arc<OwnedFd>,
    /// Offset of the region in the file (page-aligned).
    pub fd_offset: u64,
    /// Physical address of the first byte.
    pub phys: u64,
    /// Length in bytes.
    pub len: u64,
}

impl Region {
    /// True if `[phys, phys+len)` lies inside the region.
    pub fn contains(&self, phys: u64, len: u64) -> bool {
        phys >= self.phys
            && len <= self.len
            && phys
                .checked_add(len)
                .is_some_and(|end| end <= self.phys + self.len)
    }
}

/// Physical memory: iommud's page-table frames, the invalidation queue, and
/// the regions handed to clients (DMA pools, leaf-table arenas).
pub trait PhysMem: Send + Sync {
    /// Allocates one zeroed 4 KiB frame for a table.
    fn alloc_frame(&self) -> Result<u64, HwError>;
    /// Frees a frame from [`PhysMem::alloc_frame`].
    fn free_frame(&self, phys: u64);
    /// Allocates a zeroed shareable region of at least `len` bytes, aligned to `align`.
    fn alloc_region(&self, len: u64, align: u64) -> Result<Region, HwError>;
    /// Frees a region.
    fn free_region(&self, region: &Region);
    /// Reads a u64 (volatile) at a physical address iommud owns.
    fn read_u64(&self, phys: u64) -> Result<u64, HwError>;
    /// Writes a u64 (volatile) at a physical address iommud owns.
    fn write_u64(&self, phys: u64, v: u64) -> Result<(), HwError>;
    /// Writes consecutive u64s (volatile) from `phys` (a run of table
    /// entries). The default writes them one by one; platforms override it
    /// to find the memory once.
    fn write_u64s(&self, phys: u64, vals: &[u64]) -> Result<(), HwError> {
        for (k, v) in vals.iter().enumerate() {
            self.write_u64(phys + 8 * k as u64, *v)?;
        }
        Ok(())
    }
    /// Reads a u32 (volatile), e.g. an invalidation-wait status word.
    fn read_u32(&self, phys: u64) -> Result<u32, HwError>;
    /// Writes back CPU cache lines of `[phys, phys+len)` (needed when ECAP.C = 0).
    fn flush(&self, phys: u64, len: u64);
    /// Allocates a domain's ledger (`crate::ledger`): like a region, but
    /// never handed to a client or a device, and findable by the next iommud
    /// where memory outlives the process.
    fn alloc_ledger(&self, len: u64) -> Result<Region, HwError> {
        self.alloc_region(len, 4096)
    }
    /// The name under which region `phys` outlives this process (`None`
    /// where memory does not).
    fn region_name(&self, _phys: u64) -> Option<String> {
        None
    }
    /// Takes back a region (or ledger) a previous iommud left: by `name`
    /// where memory outlives the process in named files, else the still
    /// allocated memory at `phys`. Its contents are kept; `phys` and `len`,
    /// when given, must match what is found.
    fn adopt_region(
        &self,
        _phys: Option<u64>,
        _len: u64,
        _name: Option<&str>,
    ) -> Result<Region, HwError> {
        Err(HwError::Unsupported(
            "this platform cannot take memory over from a previous iommud".into(),
        ))
    }
    /// The name under which a shared page outlives this process (`None`
    /// where it does not).
    fn shared_name(&self, _m: &SharedMem) -> Option<String> {
        None
    }
    /// Takes back a shared page a previous iommud left, by name.
    fn adopt_shared(
        &self,
        _name: &str,
        _len: usize,
        _client_writable: bool,
    ) -> Result<SharedMem, HwError> {
        Err(HwError::Unsupported(
            "this platform cannot take shared pages over from a previous iommud".into(),
        ))
    }
    /// Lets a shared page go with its domain (its file, if it has one, is
    /// removed; the mappings live on until dropped).
    fn free_shared(&self, _m: &SharedMem) {}
    /// Creates `len` bytes of zeroed memory to share with one client (not
    /// DMA memory: the published page and the client page of a domain).
    /// With `client_writable` false the client can only ever map it
    /// read-only, whatever it does with what it is given; iommud keeps a
    /// writable mapping. The default is the Unix one (sealed memfds).
    fn alloc_shared(&self, len: usize, client_writable: bool) -> Result<SharedMem, HwError> {
        crate::platform::shm::create(len, client_writable)
    }
}

/// Memory shared with one client: iommud's own mapping of it and the handle
/// the client gets.
#[derive(Debug)]
pub struct SharedMem {
    /// What the client receives (an fd on Unix).
    pub fd: Arc<OwnedFd>,
    /// iommud's read-write mapping.
    pub map: iommu_abi::shm::Mapping,
}
