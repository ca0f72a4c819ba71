//! iommud's Redox platform: the `iommu` scheme, its client transport, and the
//! Redox paths iommud and the netd drivers use.
//!
//! Everything here except [`redox`] and `hw_redox::kernel` (system calls;
//! `target_os = "redox"` only)
//! compiles and is tested on the host with nightly (`redox-scheme` needs it).
//! See `recipes/README.md` in the repository for what has and has not run on Redox.
#![deny(missing_docs)]

pub mod client;
pub mod errno;
pub mod hw_redox;
pub mod iommud_server;
pub mod paths;
pub mod scheme;
pub mod server;

#[cfg(target_os = "redox")]
pub mod redox;

pub use scheme::{IommuScheme, REGION_SPAN};
pub use server::{Answer, PathKind, Server};
