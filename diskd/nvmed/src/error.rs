//! The driver's error type.

/// Everything the NVMe driver can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Linux refused a hardware access (sysfs, BAR mapping).
    #[error("{0}")]
    Hw(#[from] linuxhw::Error),
    /// The DMA mapper failed (allocation, map or unmap).
    #[error("{0}")]
    Dma(#[from] e1000d::Error),
    /// The PCI function is not an NVMe controller.
    #[error("{bdf} has class {class:06x}, not an NVMe controller (010802)")]
    WrongDevice {
        /// The function.
        bdf: String,
        /// Its class code.
        class: u32,
    },
    /// A bounded wait on a register or queue entry expired.
    #[error("timeout after {ms} ms waiting for {what}")]
    Timeout {
        /// The register or queue field waited on.
        what: String,
        /// How long we waited.
        ms: u64,
    },
    /// A command completed with an error status.
    #[error("{what}: status SCT {sct:#x} SC {sc:#04x} ({name})")]
    Status {
        /// The command.
        what: String,
        /// Status Code Type.
        sct: u8,
        /// Status Code.
        sc: u8,
        /// The status's name.
        name: &'static str,
    },
    /// CSTS.CFS (0x1C bit 1) is set: the controller hit a fatal error.
    #[error("controller fatal status: CSTS (0x1C) = {csts:#x}")]
    Fatal {
        /// CSTS.
        csts: u32,
    },
    /// The controller lacks something the driver needs.
    #[error("unsupported controller: {0}")]
    Unsupported(String),
    /// Every submission slot is in use.
    #[error("submission queue {qid} full ({entries} entries)")]
    QueueFull {
        /// The queue.
        qid: u16,
        /// Its size.
        entries: u16,
    },
    /// The caller or the device asked for something impossible.
    #[error("{0}")]
    Invalid(String),
}

/// Result with the driver's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
