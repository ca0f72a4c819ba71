//! PCI function addresses: one type for the whole project.

use std::fmt;

/// A PCI function in segment 0, as VT-d's source id names it: bus << 8 |
/// device << 3 | function.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Bdf(pub u16);

impl Bdf {
    /// From bus, device (0..32) and function (0..8); `None` when out of range.
    pub fn new(bus: u8, dev: u8, func: u8) -> Option<Bdf> {
        (dev < 32 && func < 8)
            .then(|| Bdf(u16::from(bus) << 8 | u16::from(dev) << 3 | u16::from(func)))
    }

    /// Bus number.
    pub fn bus(self) -> u8 {
        (self.0 >> 8) as u8
    }

    /// Device number.
    pub fn dev(self) -> u8 {
        ((self.0 >> 3) & 0x1f) as u8
    }

    /// Function number.
    pub fn func(self) -> u8 {
        (self.0 & 7) as u8
    }

    /// Parses `bb:dd.f` or `0000:bb:dd.f` (hex; segment 0 only).
    pub fn parse(s: &str) -> Option<Bdf> {
        let s = s.trim();
        let s = match s.matches(':').count() {
            2 => s.strip_prefix("0000:")?,
            1 => s,
            _ => return None,
        };
        let (bus, rest) = s.split_once(':')?;
        let (dev, func) = rest.split_once('.')?;
        let hex = |x: &str, max: usize| {
            (!x.is_empty() && x.len() <= max)
                .then(|| u8::from_str_radix(x, 16).ok())
                .flatten()
        };
        Bdf::new(hex(bus, 2)?, hex(dev, 2)?, hex(func, 1)?)
    }

    /// The sysfs name, `0000:bb:dd.f`.
    pub fn sysfs_name(self) -> String {
        format!("0000:{self}")
    }
}

/// `bb:dd.f`, as lspci prints it.
impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}:{:02x}.{:x}", self.bus(), self.dev(), self.func())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_source_ids_by_hand() {
        // 00:01.0 → device 1 << 3 = 0x08; 00:02.0 → 0x10; ff:1f.3 → 0xfffb.
        assert_eq!(Bdf::parse("00:01.0"), Some(Bdf(0x0008)));
        assert_eq!(Bdf::parse("0000:00:02.0"), Some(Bdf(0x0010)));
        assert_eq!(Bdf::parse("ff:1f.3"), Some(Bdf(0xfffb)));
        assert_eq!(Bdf::parse(" 1a:01.7 "), Some(Bdf(0x1a0f)));
        assert_eq!(Bdf(0x0008).to_string(), "00:01.0");
        assert_eq!(Bdf(0xfffb).to_string(), "ff:1f.3");
        assert_eq!(Bdf(0x1a0f).sysfs_name(), "0000:1a:01.7");
        assert_eq!(Bdf::new(0, 32, 0), None);
        for bad in [
            "00:20.0",
            "00:01.8",
            "zz",
            "",
            "0001:00:01.0",
            "00:01",
            "000:01.0",
            "1:2:3:4",
        ] {
            assert_eq!(Bdf::parse(bad), None, "{bad:?}");
        }
        for sid in [0u16, 0x08, 0x10, 0x1a0f, 0xffff] {
            assert_eq!(Bdf::parse(&Bdf(sid).to_string()), Some(Bdf(sid)));
            assert_eq!(Bdf::parse(&Bdf(sid).sysfs_name()), Some(Bdf(sid)));
        }
    }
}
