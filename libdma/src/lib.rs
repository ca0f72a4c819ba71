//! libdma: client library of iommud.
#![deny(missing_docs)]
