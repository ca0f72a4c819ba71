//! nicdesc: what Intel's 82576 (igb) and 82599 (ixgbe) drivers share.
//!
//! Both NICs use the same *advanced* descriptor formats (82576 datasheet §7.1.5 and
//! §7.2.2.3; 82599 datasheet §7.1.6 and §7.2.3.2.4), the same head/tail ring protocol,
//! several RX/TX queue pairs per function and RSS (a Toeplitz hash over the IPv4
//! addresses and UDP ports, indexed into a 128-entry redirection table). This crate has:
//!
//! * [`desc`]: the advanced TX data and RX (read and write-back) descriptor encodings;
//! * [`queue`]: one TX or RX ring of one queue, mapping every packet buffer through a
//!   [`DmaMapper`] before the NIC sees it and unmapping it when the NIC is done, RX
//!   refilled and TX completed in batches, each unmap paired with the next map of the
//!   same buffer (one remap batch; a mapper may keep the IOVA);
//! * [`rss`]: the Toeplitz hash and the redirection-table lookup, so a sender can pick
//!   UDP ports that land on a given RX queue;
//! * [`frame`]: the loop's IPv4/UDP test frames (queue, sequence, length, FNV-1a checksum);
//! * [`mqloop`]: the multi-queue loop, one worker thread per queue pair pinned to its CPU.
//!
//! The register maps and bring-up sequences are the drivers' (`igbd`, `ixgbed`).
#![deny(missing_docs)]

pub mod cli;
pub mod desc;
pub mod error;
pub mod frame;
pub mod mqloop;
pub mod queue;
pub mod regs;
pub mod rss;

#[cfg(target_os = "linux")]
pub use e1000d::PhysMapper;
pub use e1000d::{
    collect_maps, take_refill, Collect, Dir, DmaBuf, DmaMapper, LibdmaMapper, PendingMaps,
    PendingUnmaps,
};
pub use error::{Error, Result};
