//! iommud: the IOMMU server.
//!
//! iommud is the only process that touches the VT-d registers. It owns the
//! root/context tables, one protection domain per PCI function, the
//! second-level page tables, the invalidation queue, fault recording, and
//! the IOVA allocator with its magazine depot. Drivers reach it through
//! `libdma`; see `DESIGN.md` for the architecture.
#![deny(missing_docs)]

pub mod hw;
pub mod platform;
pub mod range_alloc;
