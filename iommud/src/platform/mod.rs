//! Platform backends: the implementations of [`crate::hw::Mmio`] and
//! [`crate::hw::PhysMem`].

pub mod drhd;
#[cfg(target_os = "linux")]
pub mod linux;
pub mod proof;
pub mod shm;
pub mod sim;
