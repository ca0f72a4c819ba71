//! The drivers' error type.

/// Everything an advanced-descriptor driver can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Linux refused a hardware access (sysfs, /dev/mem, hugepages, pagemap) or a
    /// register offset was out of the BAR.
    #[error("{0}")]
    Hw(#[from] linuxhw::Error),
    /// The PCI function is not the NIC this driver drives.
    #[error("{bdf} is {vendor:04x}:{device:04x}, not an {want}")]
    WrongDevice {
        /// The function.
        bdf: String,
        /// Its vendor id.
        vendor: u16,
        /// Its device id.
        device: u16,
        /// What the driver wanted, e.g. `82576 (8086:10c9)`.
        want: &'static str,
    },
    /// A bounded wait on a register or descriptor expired.
    #[error("timeout after {ms} ms waiting for {what}")]
    Timeout {
        /// The register or descriptor field waited on.
        what: &'static str,
        /// How long we waited.
        ms: u64,
    },
    /// Every TX descriptor of the queue is in flight; reap and retry.
    #[error("TX ring full ({slots} descriptors in flight)")]
    RingFull {
        /// Descriptors in flight.
        slots: usize,
    },
    /// A frame does not fit one TX buffer.
    #[error("frame of {len} bytes is too long (max {max})")]
    FrameTooLong {
        /// The frame's length.
        len: usize,
        /// The largest frame accepted.
        max: usize,
    },
    /// The DMA mapper failed (allocation, map or unmap).
    #[error("DMA: {0}")]
    Dma(String),
    /// The device reported something impossible, or a request is out of range.
    #[error("{0}")]
    Device(String),
}

impl From<e1000d::Error> for Error {
    fn from(e: e1000d::Error) -> Self {
        match e {
            e1000d::Error::Hw(h) => Error::Hw(h),
            other => Error::Dma(other.to_string()),
        }
    }
}

/// Result with the drivers' [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
