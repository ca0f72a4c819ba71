//! Intel VT-d encoding and software model.
#![deny(missing_docs)]
