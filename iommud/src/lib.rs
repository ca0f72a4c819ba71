//! iommud: the IOMMU server.
#![deny(missing_docs)]
