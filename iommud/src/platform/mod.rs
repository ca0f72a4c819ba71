//! Platform backends: the implementations of [`crate::hw::Mmio`] and
//! [`crate::hw::PhysMem`].

pub mod drhd;
#[cfg(target_os = "linux")]
pub mod linux;
#[cfg(feature = "sim")]
pub mod sim;
