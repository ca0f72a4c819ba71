//! Platform backends: the implementations of [`crate::hw::Mmio`] and
//! [`crate::hw::PhysMem`].

#[cfg(target_os = "linux")]
pub mod linux;
pub mod proof;
pub mod shm;
#[cfg(feature = "sim")]
pub mod sim;
