//! The Identify data structures the driver reads (NVMe Base Specification 1.4, §5.15.2).

/// What the driver uses of the Identify Controller data structure (Figure 247).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Controller {
    /// PCI vendor id (bytes 1:0).
    pub vid: u16,
    /// Serial number (bytes 23:4, ASCII, space padded).
    pub serial: String,
    /// Model number (bytes 63:24).
    pub model: String,
    /// Firmware revision (bytes 71:64).
    pub firmware: String,
    /// Maximum Data Transfer Size (byte 77): 2^MDTS minimum pages; 0 = no limit.
    pub mdts: u8,
    /// Number of Namespaces (bytes 519:516).
    pub nn: u32,
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).trim().to_string()
}

fn le32(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        w.copy_from_slice(s);
    }
    u32::from_le_bytes(w)
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        w.copy_from_slice(s);
    }
    u64::from_le_bytes(w)
}

impl Controller {
    /// Parses a 4096-byte Identify Controller result.
    pub fn parse(b: &[u8]) -> Option<Controller> {
        if b.len() < 4096 {
            return None;
        }
        Some(Controller {
            vid: u16::from_le_bytes([b[0], b[1]]),
            serial: text(&b[4..24]),
            model: text(&b[24..64]),
            firmware: text(&b[64..72]),
            mdts: b[77],
            nn: le32(b, 516),
        })
    }

    /// Largest transfer in bytes with 4 KiB pages (`None`: no limit).
    pub fn max_transfer(&self) -> Option<u64> {
        (self.mdts != 0).then(|| 4096u64 << self.mdts.min(40))
    }
}

/// What the driver uses of the Identify Namespace data structure (Figure 249).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    /// Namespace Size in logical blocks (bytes 7:0).
    pub nsze: u64,
    /// Namespace Capacity (bytes 15:8).
    pub ncap: u64,
    /// The LBA format in use: FLBAS (byte 26) bits 3:0.
    pub flbas: u8,
    /// Logical block size in bytes: 2^LBADS of that format (LBAF at byte 128 + 4 × n,
    /// LBADS in bits 23:16).
    pub block_size: u32,
    /// Metadata bytes per block of that format (bits 15:0).
    pub metadata: u16,
}

impl Namespace {
    /// Parses a 4096-byte Identify Namespace result; `None` when the size or the block
    /// size is impossible.
    pub fn parse(b: &[u8]) -> Option<Namespace> {
        if b.len() < 4096 {
            return None;
        }
        let flbas = b[26] & 0xf;
        let lbaf = le32(b, 128 + 4 * usize::from(flbas));
        let lbads = (lbaf >> 16) & 0xff;
        if !(9..=16).contains(&lbads) {
            return None;
        }
        let ns = Namespace {
            nsze: le64(b, 0),
            ncap: le64(b, 8),
            flbas,
            block_size: 1 << lbads,
            metadata: lbaf as u16,
        };
        (ns.nsze > 0).then_some(ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controller_fields() {
        let mut b = vec![0u8; 4096];
        b[0..2].copy_from_slice(&0x1b36u16.to_le_bytes());
        b[4..24].copy_from_slice(b"nvmed-test          ");
        b[24..64].copy_from_slice(b"QEMU NVMe Ctrl                          ");
        b[64..72].copy_from_slice(b"10.0    ");
        b[77] = 7;
        b[516..520].copy_from_slice(&[1, 1, 0, 0]);
        let c = Controller::parse(&b).expect("parses");
        assert_eq!(c.vid, 0x1b36);
        assert_eq!(c.serial, "nvmed-test");
        assert_eq!(c.model, "QEMU NVMe Ctrl");
        assert_eq!(c.firmware, "10.0");
        assert_eq!(c.nn, 0x101);
        // MDTS 7 with 4 KiB pages: 512 KiB.
        assert_eq!(c.max_transfer(), Some(512 << 10));
        assert!(Controller::parse(&b[..100]).is_none());
    }

    #[test]
    fn namespace_fields() {
        let mut b = vec![0u8; 4096];
        // 64 MiB of 512-byte blocks = 0x20000 blocks; format 1 (4 KiB, LBADS 12) in use.
        b[0..8].copy_from_slice(&0x20000u64.to_le_bytes());
        b[8..16].copy_from_slice(&0x20000u64.to_le_bytes());
        b[26] = 0x01;
        b[128..132].copy_from_slice(&(9u32 << 16).to_le_bytes());
        b[132..136].copy_from_slice(&(12u32 << 16 | 8).to_le_bytes());
        let n = Namespace::parse(&b).expect("parses");
        assert_eq!((n.nsze, n.ncap, n.flbas), (0x20000, 0x20000, 1));
        assert_eq!((n.block_size, n.metadata), (4096, 8));
        b[26] = 0;
        assert_eq!(Namespace::parse(&b).map(|n| n.block_size), Some(512));
        // LBADS 0 (an unused format) is refused.
        b[26] = 2;
        assert_eq!(Namespace::parse(&b), None);
    }
}
