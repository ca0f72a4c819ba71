//! ixgbed: a userspace Intel 82599 (ixgbe) driver on nicdesc's advanced-descriptor core,
//! the same queues, RSS and per-packet DMA mapping as igbd. QEMU emulates no 82599:
//! the register map and the bring-up program are host-tested against values worked
//! out from the 82599 datasheet; the driver has never run on a device.
#![deny(missing_docs)]

mod ixgbe;
pub mod program;
pub mod regs;

pub use ixgbe::{Ixgbe, DEVICE, MAX_QUEUES, RING_LEN, VENDOR};
