//! Minimal PCI function access through sysfs, private to e1000d until `linuxhw::pci`
//! lands: identity check, command register, BAR 0 mapping.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;

use linuxhw::mmio::MmioRegion;

use crate::{Error, Result};

/// PCI 3.0 §6.2.2: Command register at config offset 0x04.
const CFG_COMMAND: u64 = 0x04;
/// Command bit 1: memory space enable.
const CMD_MEMORY: u16 = 1 << 1;
/// Command bit 2: bus master enable.
const CMD_BUS_MASTER: u16 = 1 << 2;

/// Parses `dddd:bb:dd.f` (or `bb:dd.f`) into the canonical sysfs form.
pub fn canonical_bdf(s: &str) -> Result<String> {
    let bad = || Error::BadBdf(s.to_string());
    let parts: Vec<&str> = s.split(':').collect();
    let (dom, bus, devfn) = match parts.as_slice() {
        [d, b, df] => (u16::from_str_radix(d, 16).map_err(|_| bad())?, *b, *df),
        [b, df] => (0, *b, *df),
        _ => return Err(bad()),
    };
    let bus = u8::from_str_radix(bus, 16).map_err(|_| bad())?;
    let (dev, func) = devfn.split_once('.').ok_or_else(bad)?;
    let dev = u8::from_str_radix(dev, 16).map_err(|_| bad())?;
    let func = u8::from_str_radix(func, 16).map_err(|_| bad())?;
    if dev > 31 || func > 7 {
        return Err(bad());
    }
    Ok(format!("{dom:04x}:{bus:02x}:{dev:02x}.{func}"))
}

/// An opened PCI function.
pub struct Function {
    dir: String,
    bdf: String,
}

impl Function {
    /// Opens `/sys/bus/pci/devices/<bdf>` and checks its vendor/device ids.
    pub fn open(bdf: &str, vendor: u16, device: u16) -> Result<Self> {
        let bdf = canonical_bdf(bdf)?;
        let f = Function {
            dir: format!("/sys/bus/pci/devices/{bdf}"),
            bdf,
        };
        let id = f.read_config(0, 4)?;
        let (v, d) = (id as u16, (id >> 16) as u16);
        if (v, d) != (vendor, device) {
            return Err(Error::WrongDevice {
                bdf: f.bdf,
                vendor: v,
                device: d,
            });
        }
        Ok(f)
    }

    /// The canonical address.
    pub fn bdf(&self) -> &str {
        &self.bdf
    }

    fn io_err(&self, op: &'static str, file: &str, source: std::io::Error) -> Error {
        Error::Io {
            op,
            path: format!("{}/{file}", self.dir),
            source,
        }
    }

    fn read_config(&self, off: u64, len: usize) -> Result<u32> {
        let path = format!("{}/config", self.dir);
        let f = OpenOptions::new()
            .read(true)
            .open(&path)
            .map_err(|e| self.io_err("open", "config", e))?;
        let mut b = [0u8; 4];
        f.read_exact_at(&mut b[..len], off)
            .map_err(|e| self.io_err("read", "config", e))?;
        Ok(u32::from_le_bytes(b))
    }

    /// Sets memory-space and bus-master enable in the command register.
    pub fn enable(&self) -> Result<()> {
        let cmd = self.read_config(CFG_COMMAND, 2)? as u16 | CMD_MEMORY | CMD_BUS_MASTER;
        let f = OpenOptions::new()
            .write(true)
            .open(format!("{}/config", self.dir))
            .map_err(|e| self.io_err("open", "config", e))?;
        f.write_all_at(&cmd.to_le_bytes(), CFG_COMMAND)
            .map_err(|e| self.io_err("write", "config", e))
    }

    /// Maps BAR 0 (`resource0`) whole.
    pub fn bar0(&self) -> Result<MmioRegion> {
        let path = format!("{}/resource0", self.dir);
        let len = std::fs::metadata(&path)
            .map_err(|e| self.io_err("stat", "resource0", e))?
            .len();
        let len = usize::try_from(len).map_err(|_| Error::Device(format!("{path}: size {len}")))?;
        Ok(MmioRegion::from_file(&path, len)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bdf_forms() {
        assert_eq!(
            canonical_bdf("0000:00:01.0").ok().as_deref(),
            Some("0000:00:01.0")
        );
        assert_eq!(
            canonical_bdf("00:02.0").ok().as_deref(),
            Some("0000:00:02.0")
        );
        assert_eq!(
            canonical_bdf("0:1f.7").ok().as_deref(),
            Some("0000:00:1f.7")
        );
        assert!(canonical_bdf("00:20.0").is_err());
        assert!(canonical_bdf("00:01").is_err());
        assert!(canonical_bdf("zz:01.0").is_err());
    }
}
