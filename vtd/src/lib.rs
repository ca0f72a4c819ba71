//! Intel VT-d encoding and software model.
//!
//! - [`regs`]: register offsets, capability decoding, command/status encodings.
//! - [`entry`]: root, context and second-level page-table entries.
//! - [`desc`]: invalidation-queue descriptors.
//! - [`dmar`]: the ACPI DMAR table, which unit to drive and how much of it to map.
//! - `sim` (cargo feature `sim`): a software model of a VT-d unit living in shared memory,
//!   for iommud's sim platform, tests and benchmarks.
#![deny(missing_docs)]

pub mod desc;
pub mod dmar;
pub mod entry;
pub mod regs;
#[cfg(feature = "sim")]
pub mod sim;
