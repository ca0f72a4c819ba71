//! Platform backends: the implementations of [`crate::hw::Mmio`] and
//! [`crate::hw::PhysMem`].
