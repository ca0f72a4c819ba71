//! The driver's error type.

/// Everything the e1000 driver can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Linux refused a hardware access (sysfs, /dev/mem, hugepages, pagemap).
    #[error("{0}")]
    Hw(#[from] linuxhw::Error),
    /// The PCI function is not an 82540EM (or not there).
    #[error("{bdf} is {vendor:04x}:{device:04x}, not an 82540EM (8086:100e)")]
    WrongDevice {
        /// The function.
        bdf: String,
        /// Its vendor id.
        vendor: u16,
        /// Its device id.
        device: u16,
    },
    /// CTRL.RST did not clear within the bound.
    #[error("reset timeout: CTRL.RST (0x0000 bit 26) still set after {ms} ms")]
    ResetTimeout {
        /// How long we waited.
        ms: u64,
    },
    /// A bounded wait on a register or descriptor expired.
    #[error("timeout after {ms} ms waiting for {what}")]
    Timeout {
        /// The register or descriptor field waited on.
        what: &'static str,
        /// How long we waited.
        ms: u64,
    },
    /// STATUS.LU stayed clear.
    #[error("no link: STATUS.LU (0x0008 bit 1) clear after {ms} ms")]
    NoLink {
        /// How long we waited.
        ms: u64,
    },
    /// Every TX descriptor is in flight; reap and retry.
    #[error("TX ring full ({slots} descriptors in flight)")]
    RingFull {
        /// Descriptors in flight.
        slots: usize,
    },
    /// A frame does not fit one TX buffer / a standard Ethernet frame.
    #[error("frame of {len} bytes is too long (max {max})")]
    FrameTooLong {
        /// The frame's length.
        len: usize,
        /// The largest frame accepted.
        max: usize,
    },
    /// The DMA mapper failed (allocation, map or unmap).
    #[error("DMA {op}: {msg}")]
    Dma {
        /// `alloc`, `map` or `unmap`.
        op: &'static str,
        /// The mapper's explanation.
        msg: String,
    },
    /// The device reported something impossible (e.g. a length beyond the buffer).
    #[error("device misbehaved: {0}")]
    Device(String),
}

/// Result with the driver's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
