//! Linux userspace hardware access for iommud and netd drivers.
#![deny(missing_docs)]
