//! iommud: the IOMMU server.
//!
//! iommud is the only process that touches the VT-d registers. It owns the
//! root/context tables, one protection domain per PCI function, the
//! second-level page tables, the invalidation queue, fault recording, and
//! the IOVA allocator with its magazine depot. Drivers reach it through
//! `libdma`; see `docs/ARCHITECTURE.md` for the architecture.
//!
//! Where to find things: [`unit`] (bring-up, context entries, faults),
//! [`invq`] (queued invalidation), [`pagetable`] (second-level tables and
//! their reclamation), [`range_alloc`] (the locked IOVA allocator),
//! [`domain`] (a domain: allocator, depot, epochs), [`session`] (requests),
//! [`scheme`] (the path tree), [`server`] (the socket transport),
//! [`policy`] (the administrator's configuration: who administers, which
//! trust each device gets),
//! [`platform`] (sim and linux backends).
#![deny(missing_docs)]

#[cfg(all(feature = "sim", not(target_os = "redox")))]
pub mod cli;
pub mod domain;
pub mod faults;
pub mod handover;
pub mod hw;
pub mod invq;
pub mod ledger;
pub mod pagetable;
#[cfg(target_os = "linux")]
pub mod persist;
pub mod platform;
pub mod policy;
pub mod quota;
pub mod range_alloc;
#[cfg(target_os = "linux")]
pub mod restart;
pub mod scheme;
// The Unix socket transport (libdma's Linux transport); on Redox the `iommu` scheme in
// `redox/iommud-scheme` serves the same sessions.
#[cfg(not(target_os = "redox"))]
pub mod server;
pub mod service;
pub mod session;
pub mod state;
pub mod stats;
mod stop;
pub mod timer;
pub mod unit;

/// How often the ticker polls faults and flushes waiting epochs, on every platform (the
/// Linux socket server's ticker and the Redox scheme daemon's).
pub const TICK: std::time::Duration = std::time::Duration::from_millis(2);
