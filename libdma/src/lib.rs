//! libdma: the client library of iommud.
//!
//! A driver links this crate, connects to iommud, attaches to the domain of
//! its PCI function and then maps and unmaps DMA buffers. With the
//! `magazine` strategy the fast path makes no IPC: see [`magazine`].
#![deny(missing_docs)]

pub mod carrier;
pub mod client;
pub mod magazine;
#[cfg(not(target_os = "redox"))]
pub use iommu_abi::transport;
pub use iommu_abi::{proof, proto, ring, shared, shm, Bdf};

pub use client::{
    Control, DmaBuffer, DmaDomain, Error, MapTicket, RemapHints, UnmapTicket, DEFAULT_SOCKET,
};
pub use proto::{Dir, FlushPolicy, Strategy};
