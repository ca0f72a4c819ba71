//! PCI functions through Linux sysfs (`/sys/bus/pci/devices/<bdf>/`).
//!
//! Config space is read and written through the `config` file with `pread`/`pwrite` at the
//! register's offset (little-endian). BARs are mapped through `resource<N>`, their sizes
//! taken from the `resource` file (one `start end flags` line per BAR, hex).

use std::fmt;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::mmio::MmioRegion;
use crate::{Error, Result};

/// Where Linux lists PCI functions.
pub const SYSFS_PCI_DEVICES: &str = "/sys/bus/pci/devices";

/// Config space: vendor id (16 bits).
pub const CFG_VENDOR_ID: u64 = 0x00;
/// Config space: device id (16 bits).
pub const CFG_DEVICE_ID: u64 = 0x02;
/// Config space: command register (16 bits).
pub const CFG_COMMAND: u64 = 0x04;
/// COMMAND bit 1: respond to memory-space accesses.
pub const CMD_MEMORY_SPACE: u16 = 1 << 1;
/// COMMAND bit 2: bus master (the function may issue DMA).
pub const CMD_BUS_MASTER: u16 = 1 << 2;

/// A PCI address: segment (domain), bus, device, function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bdf {
    /// PCI segment (domain).
    pub segment: u16,
    /// Bus number.
    pub bus: u8,
    /// Device number (0..32).
    pub dev: u8,
    /// Function number (0..8).
    pub func: u8,
}

impl Bdf {
    /// The VT-d source id of this function: `bus << 8 | dev << 3 | func`.
    pub fn source_id(&self) -> u16 {
        u16::from(self.bus) << 8 | u16::from(self.dev) << 3 | u16::from(self.func)
    }
}

impl FromStr for Bdf {
    type Err = Error;

    /// Parses `ssss:bb:dd.f` (hex; the segment may be omitted: `bb:dd.f`).
    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::BadBdf(s.to_string());
        let (rest, func) = s.rsplit_once('.').ok_or_else(bad)?;
        let mut parts: Vec<&str> = rest.split(':').collect();
        let dev = parts.pop().ok_or_else(bad)?;
        let bus = parts.pop().ok_or_else(bad)?;
        let segment = match parts.as_slice() {
            [] => "0",
            [seg] => seg,
            _ => return Err(bad()),
        };
        let hex = |t: &str, max_digits: usize| -> Result<u32> {
            if t.is_empty() || t.len() > max_digits || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            u32::from_str_radix(t, 16).map_err(|_| bad())
        };
        let segment = hex(segment, 4)?;
        let bus = hex(bus, 2)?;
        let dev = hex(dev, 2)?;
        let func = hex(func, 1)?;
        if dev >= 32 || func >= 8 {
            return Err(bad());
        }
        Ok(Bdf {
            segment: segment as u16,
            bus: bus as u8,
            dev: dev as u8,
            func: func as u8,
        })
    }
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.segment, self.bus, self.dev, self.func
        )
    }
}

/// One line of a sysfs `resource` file: `start end flags`, all hex with `0x`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resource {
    /// First physical address.
    pub start: u64,
    /// Last physical address (inclusive).
    pub end: u64,
    /// Linux `IORESOURCE_*` flags.
    pub flags: u64,
}

impl Resource {
    /// Size in bytes, or `None` if the resource is unassigned (`0 0 0`) or inverted.
    pub fn size(&self) -> Option<u64> {
        if self.start == 0 && self.end == 0 {
            return None;
        }
        self.end.checked_sub(self.start)?.checked_add(1)
    }
}

fn parse_hex(t: &str) -> Option<u64> {
    let t = t
        .strip_prefix("0x")
        .or_else(|| t.strip_prefix("0X"))
        .unwrap_or(t);
    if t.is_empty() {
        return None;
    }
    u64::from_str_radix(t, 16).ok()
}

/// Parses one `resource` line (`0x00000000febc0000 0x00000000febdffff 0x0000000000040200`).
pub fn parse_resource_line(line: &str) -> Option<Resource> {
    let mut it = line.split_whitespace();
    let r = Resource {
        start: parse_hex(it.next()?)?,
        end: parse_hex(it.next()?)?,
        flags: parse_hex(it.next()?)?,
    };
    it.next().is_none().then_some(r)
}

/// Parses a sysfs id file such as `vendor` (`0x8086\n`).
pub fn parse_id(text: &str) -> Option<u16> {
    u16::try_from(parse_hex(text.trim())?).ok()
}

/// An open PCI function.
#[derive(Debug)]
pub struct PciFunction {
    bdf: Bdf,
    dir: PathBuf,
    config: File,
}

impl PciFunction {
    /// Opens `/sys/bus/pci/devices/<bdf>/` (e.g. `"0000:00:01.0"`); config space read-write
    /// (needs root for more than the first 64 bytes and for writes).
    pub fn open(bdf: &str) -> Result<Self> {
        Self::open_in(Path::new(SYSFS_PCI_DEVICES), bdf)
    }

    /// Like [`open`](Self::open) under another sysfs `devices` directory (for tests).
    pub fn open_in(devices: &Path, bdf: &str) -> Result<Self> {
        let bdf: Bdf = bdf.parse()?;
        let dir = devices.join(bdf.to_string());
        let cfg = dir.join("config");
        let config = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&cfg)
            .map_err(|e| Error::io("open", &cfg, e))?;
        Ok(PciFunction { bdf, dir, config })
    }

    /// All functions with this vendor and device id, sorted by address.
    pub fn list(vendor: u16, device: u16) -> Result<Vec<PciFunction>> {
        Self::list_in(Path::new(SYSFS_PCI_DEVICES), vendor, device)
    }

    /// Like [`list`](Self::list) under another sysfs `devices` directory (for tests).
    pub fn list_in(devices: &Path, vendor: u16, device: u16) -> Result<Vec<PciFunction>> {
        let entries = std::fs::read_dir(devices).map_err(|e| Error::io("read_dir", devices, e))?;
        let mut found = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::io("read_dir", devices, e))?;
            let name = entry.file_name();
            let Some(bdf) = name.to_str().and_then(|n| n.parse::<Bdf>().ok()) else {
                continue;
            };
            let dir = entry.path();
            if read_id(&dir.join("vendor"))? == vendor && read_id(&dir.join("device"))? == device {
                found.push(bdf);
            }
        }
        found.sort();
        found
            .iter()
            .map(|b| Self::open_in(devices, &b.to_string()))
            .collect()
    }

    /// The function's address.
    pub fn bdf(&self) -> Bdf {
        self.bdf
    }

    /// The VT-d source id (`bus << 8 | dev << 3 | func`), e.g. 0x0008 for 00:01.0.
    pub fn bdf_u16(&self) -> u16 {
        self.bdf.source_id()
    }

    /// The function's sysfs directory.
    pub fn sysfs_dir(&self) -> &Path {
        &self.dir
    }

    /// Vendor id (config offset 0x00).
    pub fn vendor_id(&self) -> Result<u16> {
        self.read_config16(CFG_VENDOR_ID)
    }

    /// Device id (config offset 0x02).
    pub fn device_id(&self) -> Result<u16> {
        self.read_config16(CFG_DEVICE_ID)
    }

    fn read_config<const N: usize>(&self, offset: u64) -> Result<[u8; N]> {
        let mut buf = [0u8; N];
        self.config
            .read_exact_at(&mut buf, offset)
            .map_err(|e| Error::io("read config", self.dir.join("config"), e))?;
        Ok(buf)
    }

    fn write_config(&self, offset: u64, bytes: &[u8]) -> Result<()> {
        self.config
            .write_all_at(bytes, offset)
            .map_err(|e| Error::io("write config", self.dir.join("config"), e))
    }

    /// Reads a little-endian 16-bit config register.
    pub fn read_config16(&self, offset: u64) -> Result<u16> {
        Ok(u16::from_le_bytes(self.read_config(offset)?))
    }

    /// Reads a little-endian 32-bit config register.
    pub fn read_config32(&self, offset: u64) -> Result<u32> {
        Ok(u32::from_le_bytes(self.read_config(offset)?))
    }

    /// Writes a little-endian 16-bit config register.
    pub fn write_config16(&self, offset: u64, value: u16) -> Result<()> {
        self.write_config(offset, &value.to_le_bytes())
    }

    /// Writes a little-endian 32-bit config register.
    pub fn write_config32(&self, offset: u64, value: u32) -> Result<()> {
        self.write_config(offset, &value.to_le_bytes())
    }

    /// Sets the COMMAND register's memory-space (bit 1) and bus-master (bit 2) bits to the
    /// given values, leaving its other bits as they were. Returns the new COMMAND value.
    pub fn enable(&self, memory_space: bool, bus_master: bool) -> Result<u16> {
        let old = self.read_config16(CFG_COMMAND)?;
        let new = command_with(old, memory_space, bus_master);
        if new != old {
            self.write_config16(CFG_COMMAND, new)?;
        }
        Ok(new)
    }

    /// The `resource` line of BAR `index` (0..6).
    pub fn resource(&self, index: usize) -> Result<Resource> {
        let path = self.dir.join("resource");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io("read", &path, e))?;
        let line = text.lines().nth(index).ok_or(Error::NoBar {
            path: self.dir.clone(),
            index,
        })?;
        parse_resource_line(line).ok_or_else(|| Error::Parse {
            path: path.clone(),
            text: line.to_string(),
        })
    }

    /// Maps BAR `index` through `resource<index>` (memory BARs only).
    pub fn bar(&self, index: usize) -> Result<MmioRegion> {
        let res = self.resource(index)?;
        let no_bar = || Error::NoBar {
            path: self.dir.clone(),
            index,
        };
        let size = res.size().ok_or_else(no_bar)?;
        let len = usize::try_from(size).map_err(|_| no_bar())?;
        MmioRegion::from_file(self.dir.join(format!("resource{index}")), len)
    }

    /// Maps BAR 0 (e.g. the e1000's registers).
    pub fn bar0(&self) -> Result<MmioRegion> {
        self.bar(0)
    }
}

fn read_id(path: &Path) -> Result<u16> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io("read", path, e))?;
    parse_id(&text).ok_or_else(|| Error::Parse {
        path: path.to_path_buf(),
        text,
    })
}

/// COMMAND value with bits 1 (memory space) and 2 (bus master) set as requested.
fn command_with(old: u16, memory_space: bool, bus_master: bool) -> u16 {
    let mut v = old & !(CMD_MEMORY_SPACE | CMD_BUS_MASTER);
    if memory_space {
        v |= CMD_MEMORY_SPACE;
    }
    if bus_master {
        v |= CMD_BUS_MASTER;
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempDir;

    #[test]
    fn bdf_parse_format_and_source_id() {
        let b: Bdf = "0000:00:01.0".parse().expect("parse");
        assert_eq!((b.segment, b.bus, b.dev, b.func), (0, 0, 1, 0));
        assert_eq!(b.source_id(), 0x0008);
        assert_eq!(
            "0000:00:02.0".parse::<Bdf>().map(|b| b.source_id()).ok(),
            Some(0x0010)
        );
        let b: Bdf = "0001:3a:1f.7".parse().expect("parse");
        assert_eq!(b.source_id(), 0x3a00 | 0x1f << 3 | 7);
        assert_eq!(b.to_string(), "0001:3a:1f.7");
        assert_eq!(
            "02:00.1".parse::<Bdf>().map(|b| b.to_string()).ok(),
            Some("0000:02:00.1".into())
        );
        for bad in [
            "",
            "0000:00:01",
            "0000:00:20.0",
            "0000:00:01.8",
            "00000:00:01.0",
            "x:00:01.0",
            "0000:00:01.0.1",
            "0:0:0:01.0",
            "0000:100:01.0",
            "0000::01.0",
            "0000:00:+1.0",
        ] {
            assert!(
                matches!(bad.parse::<Bdf>(), Err(Error::BadBdf(_))),
                "{bad:?}"
            );
        }
        let mut v: Vec<Bdf> = ["0000:00:02.0", "0000:00:01.1", "0000:00:01.0"]
            .iter()
            .filter_map(|s| s.parse().ok())
            .collect();
        v.sort();
        assert_eq!(
            v.iter().map(|b| b.func + b.dev * 10).collect::<Vec<_>>(),
            [10, 11, 20]
        );
    }

    #[test]
    fn resource_lines() {
        let r = parse_resource_line("0x00000000febc0000 0x00000000febdffff 0x0000000000040200");
        assert_eq!(
            r,
            Some(Resource {
                start: 0xfebc_0000,
                end: 0xfebd_ffff,
                flags: 0x40200
            })
        );
        assert_eq!(r.and_then(|r| r.size()), Some(0x20000));
        let unassigned =
            parse_resource_line("0x0000000000000000 0x0000000000000000 0x0000000000000000");
        assert_eq!(unassigned.and_then(|r| r.size()), None);
        assert_eq!(parse_resource_line("0x1 0x2"), None);
        assert_eq!(parse_resource_line("0x1 0x2 0x3 0x4"), None);
        assert_eq!(parse_resource_line("0x1 zz 0x3"), None);
        assert_eq!(
            Resource {
                start: 5,
                end: 4,
                flags: 0
            }
            .size(),
            None
        );
        assert_eq!(parse_id("0x8086\n"), Some(0x8086));
        assert_eq!(parse_id("0x100ee\n"), None);
        assert_eq!(parse_id("\n"), None);
    }

    #[test]
    fn command_bits() {
        assert_eq!(command_with(0x0400, true, true), 0x0406);
        assert_eq!(command_with(0x0007, true, false), 0x0003);
        assert_eq!(command_with(0x0006, false, false), 0x0000);
    }

    /// A fake sysfs device directory: config space, ids, one 128 KiB BAR 0.
    fn fake_device(devices: &Path, bdf: &str, vendor: u16, device: u16) {
        let d = devices.join(bdf);
        std::fs::create_dir_all(&d).expect("mkdir");
        let mut cfg = vec![0u8; 256];
        cfg[0..2].copy_from_slice(&vendor.to_le_bytes());
        cfg[2..4].copy_from_slice(&device.to_le_bytes());
        cfg[4..6].copy_from_slice(&0x0400u16.to_le_bytes());
        std::fs::write(d.join("config"), cfg).expect("config");
        std::fs::write(d.join("vendor"), format!("{vendor:#06x}\n")).expect("vendor");
        std::fs::write(d.join("device"), format!("{device:#06x}\n")).expect("device");
        std::fs::write(
            d.join("resource"),
            "0x00000000febc0000 0x00000000febdffff 0x0000000000040200\n\
             0x0000000000000000 0x0000000000000000 0x0000000000000000\n",
        )
        .expect("resource");
        std::fs::write(d.join("resource0"), vec![0u8; 0x20000]).expect("resource0");
    }

    #[test]
    fn fake_sysfs_open_list_config_bar() {
        let root = TempDir::new("pci");
        let devs = &root.0;
        fake_device(devs, "0000:00:02.0", 0x8086, 0x100e);
        fake_device(devs, "0000:00:01.0", 0x8086, 0x100e);
        fake_device(devs, "0000:00:03.0", 0x8086, 0x10c9);
        std::fs::create_dir_all(devs.join("not-a-bdf")).expect("mkdir");

        let found = PciFunction::list_in(devs, 0x8086, 0x100e).expect("list");
        let names: Vec<String> = found.iter().map(|f| f.bdf().to_string()).collect();
        assert_eq!(names, ["0000:00:01.0", "0000:00:02.0"]);
        assert_eq!(found[0].bdf_u16(), 0x0008);
        assert_eq!(found[1].bdf_u16(), 0x0010);

        let f = PciFunction::open_in(devs, "0000:00:01.0").expect("open");
        assert_eq!(f.vendor_id().ok(), Some(0x8086));
        assert_eq!(f.device_id().ok(), Some(0x100e));
        assert_eq!(f.enable(true, true).ok(), Some(0x0406));
        assert_eq!(f.read_config16(CFG_COMMAND).ok(), Some(0x0406));
        f.write_config32(0x10, 0xfebc_0000).expect("write");
        assert_eq!(f.read_config32(0x10).ok(), Some(0xfebc_0000));
        assert!(matches!(f.read_config32(0x1000), Err(Error::Io { .. })));

        let bar = f.bar0().expect("bar0");
        assert_eq!(bar.len(), 0x20000);
        bar.write32(0x1fffc, 7).expect("write");
        assert_eq!(bar.read32(0x1fffc).ok(), Some(7));
        assert!(matches!(f.bar(1), Err(Error::NoBar { index: 1, .. })));
        assert!(matches!(f.bar(5), Err(Error::NoBar { index: 5, .. })));

        assert!(matches!(
            PciFunction::open_in(devs, "0000:00:09.0"),
            Err(Error::Io { op: "open", .. })
        ));
    }
}
