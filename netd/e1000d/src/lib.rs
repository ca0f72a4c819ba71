//! e1000d: a userspace Intel 82540EM (QEMU `e1000`) driver that maps every packet
//! buffer for DMA before the NIC sees it and unmaps it when the NIC is done, through a
//! [`DmaMapper`] (identity here, an IOMMU domain through libdma in the real setup).
#![deny(missing_docs)]

pub mod cost;
pub mod desc;
pub mod dma;
mod e1000;
mod error;
pub mod libdma_mapper;
pub mod payload;
pub mod pcid;
pub mod regs;
pub mod ring;

#[cfg(target_os = "linux")]
pub use dma::PhysMapper;
pub use dma::{
    collect_maps, take_refill, Collect, Dir, DmaBuf, DmaMapper, PendingMaps, PendingUnmaps,
};
pub use e1000::{Stats, TxBatch, BUF_LEN, DEVICE, E1000, MAX_FRAME, RING_LEN, VENDOR};
pub use error::{Error, Result};
pub use libdma_mapper::LibdmaMapper;
