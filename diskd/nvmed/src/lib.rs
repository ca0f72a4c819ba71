//! nvmed: a userspace NVMe driver (QEMU `-device nvme`) that maps every data buffer and
//! PRP list page for DMA when a command is submitted and unmaps it when the command
//! completes, through a [`DmaMapper`](e1000d::DmaMapper) (an iommud domain through
//! libdma, or IOVA = physical). Queues are mapped once. Polled: one I/O queue pair per
//! CPU, each driven by a worker pinned to its CPU.
#![deny(missing_docs)]

pub mod bench;
pub mod cmd;
pub mod ctrl;
mod error;
pub mod identify;
pub mod io;
pub mod pattern;
pub mod queue;
pub mod regs;

pub use ctrl::Nvme;
pub use error::{Error, Result};
