//! igbd: a userspace Intel 82576 (QEMU `igb`) driver with several RX/TX queue pairs and
//! RSS, on nicdesc's advanced-descriptor core; every packet buffer is mapped through a
//! `DmaMapper` (an iommud domain through libdma in the real setup).
#![deny(missing_docs)]

mod igb;
pub mod regs;

pub use igb::{Igb, DEVICE, MAX_QUEUES, RING_LEN, VENDOR};
