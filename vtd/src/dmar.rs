//! The ACPI DMA Remapping Reporting (DMAR) table.
//!
//! Layout (Intel VT-d spec ch. 8 "BIOS Considerations"; ACPICA's `iasl` disassembly of real
//! tables, e.g. linux-surface/acpidumps `surface_laptop_studio_1/dmar.dsl`, shows the same
//! offsets):
//!
//! ```text
//! 0   ACPI header (36): "DMAR", u32 length, rev, checksum, OEM id/table id/rev, creator
//! 36  u8  host address width (HAW + 1 = address bits)
//! 37  u8  flags (bit 0 INTR_REMAP, bit 1 X2APIC_OPT_OUT, bit 2 DMA_CTRL_PLATFORM_OPT_IN)
//! 38  10 reserved bytes
//! 48  remapping structures: u16 type, u16 length, body
//!     type 0 DRHD (§8.3): u8 flags (bit 0 INCLUDE_PCI_ALL), u8 size, u16 segment,
//!                         u64 register base, device scopes from +16
//!     type 1 RMRR (§8.4): u16 reserved, u16 segment, u64 base, u64 limit, scopes from +24
//! device scope (§8.3.1): u8 type, u8 length, u16 reserved/flags, u8 enumeration id,
//!                        u8 start bus, then (device, function) byte pairs from +6
//! ```
//!
//! [`parse`] checks every length before reading and never panics on any input.
//!
//! Platform-free: the platforms read the table's bytes (Linux from
//! `/sys/firmware/acpi/tables/DMAR` in `linuxhw::dmar`, Redox from the ACPI scheme in
//! `redox/iommud-scheme`) and share the parser, the DRHD choice ([`choose_drhd`]) and the
//! register span to map ([`register_span`]).

use crate::regs::{Cap, Ecap};

/// A 4 KiB page: the DRHD size field and register mappings count in these.
const PAGE: usize = 4096;

const HEADER_LEN: usize = 36;
const FIXED_LEN: usize = 48;
const STRUCT_HDR_LEN: usize = 4;
const DRHD_FIXED_LEN: usize = 16;
const RMRR_FIXED_LEN: usize = 24;
const SCOPE_FIXED_LEN: usize = 6;

/// DRHD flags bit 0: this unit covers every PCI device of its segment not claimed by
/// another DRHD.
pub const DRHD_INCLUDE_PCI_ALL: u8 = 1 << 0;

/// Why a DMAR table was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DmarError {
    /// Fewer bytes than the fixed 48-byte part of the table.
    #[error("DMAR table too short: {len} bytes, need at least 48")]
    TooShort {
        /// Bytes available.
        len: usize,
    },
    /// The signature is not "DMAR".
    #[error("bad signature {0:?}, expected \"DMAR\"")]
    BadSignature([u8; 4]),
    /// The header's length field disagrees with the bytes available.
    #[error("header length {declared} is invalid for {actual} bytes available (minimum 48)")]
    BadLength {
        /// The header's length field.
        declared: u32,
        /// Bytes available.
        actual: usize,
    },
    /// The bytes of the table do not sum to zero (mod 256).
    #[error("checksum mismatch: bytes sum to {sum:#04x}, expected 0")]
    BadChecksum {
        /// The byte sum mod 256.
        sum: u8,
    },
    /// A remapping structure or device scope is shorter than its fixed part (or 0 long).
    #[error("{what} at table offset {offset:#x} has length {len}, less than its minimum {min}")]
    StructTooShort {
        /// Which kind of structure.
        what: &'static str,
        /// Its offset in the table.
        offset: usize,
        /// Its length field.
        len: usize,
        /// The smallest valid length.
        min: usize,
    },
    /// A remapping structure or device scope runs past the end of its container.
    #[error(
        "{what} at table offset {offset:#x} of length {len} overruns its container by {over} bytes"
    )]
    StructOverrun {
        /// Which kind of structure.
        what: &'static str,
        /// Its offset in the table.
        offset: usize,
        /// Its length field.
        len: usize,
        /// How far it reaches past the end.
        over: usize,
    },
    /// A device scope's path has an odd number of bytes.
    #[error("device scope at table offset {offset:#x}: path of {len} bytes is not (device, function) pairs")]
    OddPath {
        /// The scope's offset in the table.
        offset: usize,
        /// The path's length in bytes.
        len: usize,
    },
}

/// A parsed DMAR table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dmar {
    /// Host address width: the field's value + 1 (DMA addresses have this many bits).
    pub host_address_width: u8,
    /// Table flags (bit 0 INTR_REMAP, bit 1 X2APIC_OPT_OUT, bit 2 DMA_CTRL_PLATFORM_OPT_IN).
    pub flags: u8,
    /// Remapping hardware units, in table order.
    pub drhds: Vec<Drhd>,
    /// Reserved memory regions that devices keep DMAing to, in table order.
    pub rmrrs: Vec<Rmrr>,
}

/// A DMA remapping hardware unit definition (type 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drhd {
    /// Flags; see [`DRHD_INCLUDE_PCI_ALL`].
    pub flags: u8,
    /// Register-set size field (bits 3:0: 2^N 4 KiB pages; 0 in older tables).
    pub size: u8,
    /// PCI segment number.
    pub segment: u16,
    /// Physical address of the unit's register set.
    pub register_base: u64,
    /// Devices explicitly under this unit.
    pub scopes: Vec<DeviceScope>,
}

impl Drhd {
    /// Whether this unit covers all PCI devices of its segment not listed elsewhere.
    pub fn include_pci_all(&self) -> bool {
        self.flags & DRHD_INCLUDE_PCI_ALL != 0
    }
}

/// A reserved memory region reporting structure (type 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rmrr {
    /// PCI segment number.
    pub segment: u16,
    /// First byte of the region.
    pub base: u64,
    /// Last byte of the region (inclusive).
    pub limit: u64,
    /// Devices that use the region.
    pub scopes: Vec<DeviceScope>,
}

/// A device scope entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceScope {
    /// 1 PCI endpoint, 2 PCI sub-hierarchy, 3 IOAPIC, 4 MSI-capable HPET, 5 ACPI namespace.
    pub scope_type: u8,
    /// Enumeration id (IOAPIC id, HPET number, ACPI device number).
    pub enumeration_id: u8,
    /// Bus number where the path starts.
    pub start_bus: u8,
    /// (device, function) hops from `start_bus` through bridges to the device.
    pub path: Vec<(u8, u8)>,
}

/// Bounds-checked little-endian reads; every caller has checked lengths already, but these
/// return 0 rather than panic if that reasoning were ever wrong.
fn le(bytes: &[u8], off: usize, n: usize) -> u64 {
    let mut v = 0u64;
    for i in (0..n).rev() {
        v = (v << 8) | u64::from(bytes.get(off + i).copied().unwrap_or(0));
    }
    v
}

fn u8_at(b: &[u8], off: usize) -> u8 {
    b.get(off).copied().unwrap_or(0)
}

/// Checks that a structure at `offset` with length `len` fits in `[offset, end)`.
fn check_struct(
    what: &'static str,
    offset: usize,
    len: usize,
    min: usize,
    end: usize,
) -> Result<(), DmarError> {
    if len < min {
        return Err(DmarError::StructTooShort {
            what,
            offset,
            len,
            min,
        });
    }
    let reach = offset.saturating_add(len);
    if reach > end {
        return Err(DmarError::StructOverrun {
            what,
            offset,
            len,
            over: reach - end,
        });
    }
    Ok(())
}

fn parse_scopes(t: &[u8], mut off: usize, end: usize) -> Result<Vec<DeviceScope>, DmarError> {
    let mut scopes = Vec::new();
    while off < end {
        if end - off < 2 {
            return Err(DmarError::StructOverrun {
                what: "device scope",
                offset: off,
                len: end - off,
                over: 2 - (end - off),
            });
        }
        let len = usize::from(u8_at(t, off + 1));
        check_struct("device scope", off, len, SCOPE_FIXED_LEN, end)?;
        let path_len = len - SCOPE_FIXED_LEN;
        if !path_len.is_multiple_of(2) {
            return Err(DmarError::OddPath {
                offset: off,
                len: path_len,
            });
        }
        let path = (0..path_len / 2)
            .map(|i| {
                let p = off + SCOPE_FIXED_LEN + 2 * i;
                (u8_at(t, p), u8_at(t, p + 1))
            })
            .collect();
        scopes.push(DeviceScope {
            scope_type: u8_at(t, off),
            enumeration_id: u8_at(t, off + 4),
            start_bus: u8_at(t, off + 5),
            path,
        });
        off += len;
    }
    Ok(scopes)
}

/// Parses a DMAR table from its raw bytes. Unknown structure types are skipped by their
/// length. Bytes past the header's length field are ignored.
pub fn parse(bytes: &[u8]) -> Result<Dmar, DmarError> {
    if bytes.len() < FIXED_LEN {
        return Err(DmarError::TooShort { len: bytes.len() });
    }
    let sig = [bytes[0], bytes[1], bytes[2], bytes[3]];
    if &sig != b"DMAR" {
        return Err(DmarError::BadSignature(sig));
    }
    let declared = le(bytes, 4, 4) as u32;
    let total = usize::try_from(declared).unwrap_or(usize::MAX);
    if total < FIXED_LEN || total > bytes.len() {
        return Err(DmarError::BadLength {
            declared,
            actual: bytes.len(),
        });
    }
    let t = &bytes[..total];
    let sum = t.iter().fold(0u8, |a, &b| a.wrapping_add(b));
    if sum != 0 {
        return Err(DmarError::BadChecksum { sum });
    }
    let mut dmar = Dmar {
        host_address_width: u8_at(t, HEADER_LEN).wrapping_add(1),
        flags: u8_at(t, HEADER_LEN + 1),
        drhds: Vec::new(),
        rmrrs: Vec::new(),
    };
    let mut off = FIXED_LEN;
    while off < total {
        if total - off < STRUCT_HDR_LEN {
            return Err(DmarError::StructOverrun {
                what: "remapping structure header",
                offset: off,
                len: total - off,
                over: STRUCT_HDR_LEN - (total - off),
            });
        }
        let ty = le(t, off, 2) as u16;
        let len = le(t, off + 2, 2) as usize;
        match ty {
            0 => {
                check_struct("DRHD", off, len, DRHD_FIXED_LEN, total)?;
                dmar.drhds.push(Drhd {
                    flags: u8_at(t, off + 4),
                    size: u8_at(t, off + 5),
                    segment: le(t, off + 6, 2) as u16,
                    register_base: le(t, off + 8, 8),
                    scopes: parse_scopes(t, off + DRHD_FIXED_LEN, off + len)?,
                });
            }
            1 => {
                check_struct("RMRR", off, len, RMRR_FIXED_LEN, total)?;
                dmar.rmrrs.push(Rmrr {
                    segment: le(t, off + 6, 2) as u16,
                    base: le(t, off + 8, 8),
                    limit: le(t, off + 16, 8),
                    scopes: parse_scopes(t, off + RMRR_FIXED_LEN, off + len)?,
                });
            }
            _ => check_struct("remapping structure", off, len, STRUCT_HDR_LEN, total)?,
        }
        off += len;
    }
    Ok(dmar)
}

/// Upper bound on the register span we will map (VT-d offsets are at most 0x3ff0 + 256 * 16).
pub const MAX_REG_SPAN: usize = 0x1_0000;

/// Bytes of register space a unit with these CAP/ECAP values needs mapped, rounded up to
/// whole 4 KiB pages and at least `min` (e.g. from the DRHD size field).
///
/// VT-d 3.x §10.4.2/§10.4.3: the fault recording registers (128 bits each, NFR+1 of them)
/// start at CAP.FRO * 16; the IOTLB registers (IVA at +0, IOTLB at +8) at ECAP.IRO * 16.
pub fn register_span(cap: u64, ecap: u64, min: usize) -> usize {
    let cap = Cap(cap);
    let ecap = Ecap(ecap);
    let frcd_end = cap.fro_bytes() + usize::from(cap.nfr()) * 16;
    let iotlb_end = ecap.iro_bytes() + 16;
    let need = frcd_end.max(iotlb_end).max(min).max(PAGE);
    // Both offsets are 10-bit fields times 16 and NFR <= 256, so `need` is small unless `min`
    // is absurd; clamp so a corrupt DRHD size cannot make us map megabytes of MMIO.
    need.min(MAX_REG_SPAN).next_multiple_of(PAGE)
}

impl Drhd {
    /// Bytes of registers the DRHD's size field announces (bits 3:0: 2^N 4 KiB pages;
    /// 0 in old tables, so one page).
    pub fn min_register_bytes(&self) -> usize {
        PAGE << (self.size & 0xf)
    }
}

/// The DRHD iommud drives: the first with INCLUDE_PCI_ALL, else the first listed.
pub fn choose_drhd(dmar: &Dmar) -> Option<&Drhd> {
    dmar.drhds
        .iter()
        .find(|d| d.include_pci_all())
        .or_else(|| dmar.drhds.first())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Encodes a DMAR table by hand: header, HAW, flags, reserved, then `body`; fixes the
    /// length and checksum.
    fn table(haw: u8, flags: u8, body: &[u8]) -> Vec<u8> {
        let mut t = Vec::new();
        t.extend_from_slice(b"DMAR");
        t.extend_from_slice(&0u32.to_le_bytes()); // length, patched below
        t.push(1); // revision
        t.push(0); // checksum, patched below
        t.extend_from_slice(b"BOCHS "); // OEM id (6)
        t.extend_from_slice(b"BXPC    "); // OEM table id (8)
        t.extend_from_slice(&1u32.to_le_bytes()); // OEM revision
        t.extend_from_slice(b"BXPC"); // creator id
        t.extend_from_slice(&1u32.to_le_bytes()); // creator revision
        assert_eq!(t.len(), 36);
        t.push(haw);
        t.push(flags);
        t.extend_from_slice(&[0; 10]);
        t.extend_from_slice(body);
        let len = t.len() as u32;
        t[4..8].copy_from_slice(&len.to_le_bytes());
        let sum = t.iter().fold(0u8, |a, &b| a.wrapping_add(b));
        t[9] = 0u8.wrapping_sub(sum);
        t
    }

    /// QEMU q35 + intel-iommu: one DRHD, INCLUDE_PCI_ALL, registers at 0xfed90000, no scopes.
    fn qemu_drhd() -> Vec<u8> {
        let mut d = vec![0, 0, 16, 0]; // type 0, length 16
        d.push(DRHD_INCLUDE_PCI_ALL);
        d.push(0); // size
        d.extend_from_slice(&0u16.to_le_bytes()); // segment
        d.extend_from_slice(&0xfed9_0000u64.to_le_bytes());
        d
    }

    #[test]
    fn qemu_q35_table() {
        // HAW field 38 => 39-bit addresses (QEMU aw-bits=39 default).
        let t = table(38, 0, &qemu_drhd());
        assert_eq!(t.len(), 64);
        let d = parse(&t).expect("valid table");
        assert_eq!(d.host_address_width, 39);
        assert_eq!(d.flags, 0);
        assert_eq!(d.rmrrs, vec![]);
        assert_eq!(
            d.drhds,
            vec![Drhd {
                flags: 1,
                size: 0,
                segment: 0,
                register_base: 0xfed9_0000,
                scopes: vec![],
            }]
        );
        assert!(d.drhds[0].include_pci_all());
    }

    #[test]
    fn scopes_rmrr_and_unknown_types() {
        let mut body = Vec::new();
        // DRHD with one endpoint scope 00:02.0 and an IOAPIC scope (id 8, bus 0xf0, 1f.0).
        body.extend_from_slice(&[0, 0, 32, 0, 0, 0, 1, 0]);
        body.extend_from_slice(&0xfed9_1000u64.to_le_bytes());
        body.extend_from_slice(&[1, 8, 0, 0, 0, 0, 2, 0]);
        body.extend_from_slice(&[3, 8, 0, 0, 8, 0xf0, 0x1f, 0]);
        // An unknown type 7 structure of 6 bytes, to be skipped.
        body.extend_from_slice(&[7, 0, 6, 0, 0xaa, 0xbb]);
        // RMRR 0x7c000000..=0x7c7fffff for a bridge path 1c.0 -> 00.0 from bus 0.
        body.extend_from_slice(&[1, 0, 34, 0, 0, 0, 0, 0]);
        body.extend_from_slice(&0x7c00_0000u64.to_le_bytes());
        body.extend_from_slice(&0x7c7f_ffffu64.to_le_bytes());
        body.extend_from_slice(&[1, 10, 0, 0, 0, 0, 0x1c, 0, 0, 0]);
        let d = parse(&table(45, 1, &body)).expect("valid table");
        assert_eq!(d.host_address_width, 46);
        assert_eq!(d.flags, 1);
        assert_eq!(d.drhds.len(), 1);
        let h = &d.drhds[0];
        assert!(!h.include_pci_all());
        assert_eq!((h.segment, h.register_base), (1, 0xfed9_1000));
        assert_eq!(
            h.scopes,
            vec![
                DeviceScope {
                    scope_type: 1,
                    enumeration_id: 0,
                    start_bus: 0,
                    path: vec![(2, 0)]
                },
                DeviceScope {
                    scope_type: 3,
                    enumeration_id: 8,
                    start_bus: 0xf0,
                    path: vec![(0x1f, 0)]
                },
            ]
        );
        assert_eq!(
            d.rmrrs,
            vec![Rmrr {
                segment: 0,
                base: 0x7c00_0000,
                limit: 0x7c7f_ffff,
                scopes: vec![DeviceScope {
                    scope_type: 1,
                    enumeration_id: 0,
                    start_bus: 0,
                    path: vec![(0x1c, 0), (0, 0)]
                }],
            }]
        );
    }

    #[test]
    fn malformed_tables_are_rejected() {
        let good = table(38, 0, &qemu_drhd());
        assert_eq!(parse(&good[..40]), Err(DmarError::TooShort { len: 40 }));

        let mut t = good.clone();
        t[0] = b'X';
        assert!(matches!(parse(&t), Err(DmarError::BadSignature(_))));

        let mut t = good.clone();
        t[20] ^= 0xff;
        assert!(matches!(parse(&t), Err(DmarError::BadChecksum { .. })));

        // Declared length larger than the file.
        assert!(matches!(
            parse(&good[..60]),
            Err(DmarError::BadLength {
                declared: 64,
                actual: 60
            })
        ));

        // Structure length 0 (would loop forever if accepted).
        let t = table(38, 0, &[9, 0, 0, 0]);
        assert!(matches!(
            parse(&t),
            Err(DmarError::StructTooShort { len: 0, .. })
        ));

        // DRHD claiming 32 bytes with only 16 present.
        let mut d = qemu_drhd();
        d[2] = 32;
        assert!(matches!(
            parse(&table(38, 0, &d)),
            Err(DmarError::StructOverrun {
                what: "DRHD",
                over: 16,
                ..
            })
        ));

        // Scope of length 0 inside a DRHD.
        let mut d = qemu_drhd();
        d[2] = 24;
        d.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0]);
        assert!(matches!(
            parse(&table(38, 0, &d)),
            Err(DmarError::StructTooShort {
                what: "device scope",
                ..
            })
        ));

        // Trailing 2 bytes: too short for a structure header.
        let mut d = qemu_drhd();
        d.extend_from_slice(&[0, 0]);
        assert!(matches!(
            parse(&table(38, 0, &d)),
            Err(DmarError::StructOverrun { .. })
        ));
    }

    /// xorshift64*: a tiny deterministic PRNG for the fuzz loop.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
    }

    #[test]
    fn random_and_truncated_input_never_panics() {
        let mut body = qemu_drhd();
        body[2] = 24;
        body.extend_from_slice(&[1, 8, 0, 0, 0, 0, 1, 0]);
        let good = table(38, 0, &body);
        for cut in 0..=good.len() {
            let _ = parse(&good[..cut]);
        }
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut accepted = 0;
        for _ in 0..20_000 {
            let mut t = good.clone();
            // Flip a few random bytes, sometimes truncate or extend.
            for _ in 0..(rng.next() % 4 + 1) {
                let i = (rng.next() as usize) % t.len();
                t[i] = rng.next() as u8;
            }
            match rng.next() % 3 {
                0 => t.truncate((rng.next() as usize) % (t.len() + 1)),
                1 => t.extend((0..rng.next() % 32).map(|_| rng.next() as u8)),
                _ => {}
            }
            // Re-fix the checksum half the time so the structure walk gets exercised.
            if rng.next().is_multiple_of(2) && t.len() >= 48 {
                let n = usize::try_from(le(&t, 4, 4)).unwrap_or(0).min(t.len());
                if n > 9 {
                    t[9] = 0;
                    let sum = t[..n].iter().fold(0u8, |a, &b| a.wrapping_add(b));
                    t[9] = 0u8.wrapping_sub(sum);
                }
            }
            if parse(&t).is_ok() {
                accepted += 1;
            }
            // Pure noise too.
            let n = (rng.next() % 128) as usize;
            let mut noise: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            if n >= 4 {
                noise[..4].copy_from_slice(b"DMAR");
            }
            let _ = parse(&noise);
        }
        // The walk must have been reached on some mutated inputs, not only early rejects.
        assert!(accepted > 0);
    }

    /// QEMU's intel-iommu, as measured in the guest (docs/ARCHITECTURE.md, "Platforms").
    const QEMU_CAP: u64 = 0x00D2_008C_222F_0606;
    const QEMU_ECAP: u64 = 0xF42;

    #[test]
    fn register_span_from_cap_and_ecap() {
        // QEMU: FRO = 0x22 (0x220), NFR = 0 (one record, ends 0x230); IRO = 0xF (0xF0,
        // IOTLB ends 0x100): one page.
        assert_eq!(register_span(QEMU_CAP, QEMU_ECAP, 0), 0x1000);
        // FRO = 0x3ff (0x3ff0) with NFR = 3 (4 records, end 0x4030) -> 5 pages.
        let cap = (0x3ffu64 << 24) | (3u64 << 40);
        assert_eq!(register_span(cap, 0, 0), 0x5000);
        // IRO = 0x100 (0x1000): IOTLB register at 0x1008, so two pages.
        assert_eq!(register_span(0, 0x100 << 8, 0), 0x2000);
        // The DRHD size field's minimum wins when larger; absurd values are clamped.
        assert_eq!(register_span(QEMU_CAP, QEMU_ECAP, 0x4000), 0x4000);
        assert_eq!(register_span(QEMU_CAP, QEMU_ECAP, 1 << 30), MAX_REG_SPAN);
    }

    fn drhd(flags: u8, base: u64) -> Drhd {
        Drhd {
            flags,
            size: 0,
            segment: 0,
            register_base: base,
            scopes: vec![],
        }
    }

    #[test]
    fn drhd_choice_prefers_include_pci_all() {
        let mut dmar = Dmar {
            host_address_width: 39,
            flags: 0,
            drhds: vec![],
            rmrrs: vec![],
        };
        assert!(choose_drhd(&dmar).is_none());
        dmar.drhds = vec![drhd(0, 0x1000), drhd(0, 0x2000)];
        assert_eq!(choose_drhd(&dmar).map(|d| d.register_base), Some(0x1000));
        dmar.drhds.push(drhd(DRHD_INCLUDE_PCI_ALL, 0x3000));
        assert_eq!(choose_drhd(&dmar).map(|d| d.register_base), Some(0x3000));
    }

    #[test]
    fn drhd_size_field_counts_pages() {
        let mut d = drhd(0, 0x1000);
        assert_eq!(d.min_register_bytes(), 0x1000);
        d.size = 2; // 2^2 pages
        assert_eq!(d.min_register_bytes(), 0x4000);
        d.size = 0xf1; // bits 7:4 reserved: ignored
        assert_eq!(d.min_register_bytes(), 0x2000);
    }
}
