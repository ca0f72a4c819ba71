//! The 82599 bring-up as data: ordered register steps (pure functions of the queue
//! layout), run against the BAR by [`run`] and checked step by step in host tests.
//!
//! Sequence (82599 datasheet §4.6.3 "Initialization Sequence"): mask interrupts, global
//! reset (CTRL.RST | CTRL.LRST, §4.6.3.2), wait for RST to clear, mask again, wait for
//! the EEPROM auto-read (EEC.ARD) and DMA initialisation (RDRXCTL.DMAIDONE); restart
//! auto-negotiation (AUTOC.Restart_AN, §4.6.4) and wait for LINKS.Link_Up; receive
//! set-up (§4.6.7) with RSS (§7.1.2.8); transmit set-up (§4.6.8, with the arbiter
//! disabled while MTQC is written, §4.6.11.3.4).

use nicdesc::regs::Regs;
use nicdesc::rss::{self, RETA_LEN};
use nicdesc::Result;

use crate::regs::{self, ctrl, fctrl, hlreg0, mrqc, rdrxctl, srrctl};

/// One register step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Write a value.
    Write(usize, u32),
    /// Read-modify-write: set `.1`, clear `.2`.
    Modify(usize, u32, u32),
    /// Read and discard (clear-on-read registers).
    Read(usize),
    /// Poll until `(value & mask) == want`, at most `ms` milliseconds; `what` names the
    /// register and bit in the timeout error.
    Wait {
        /// Register.
        reg: usize,
        /// Bits compared.
        mask: u32,
        /// Their wanted value.
        want: u32,
        /// Bound in milliseconds.
        ms: u64,
        /// Register and bit, for the error.
        what: &'static str,
    },
    /// Sleep this many milliseconds.
    Sleep(u64),
}

/// A queue's ring as programmed: index, ring IOVA, ring bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingLayout {
    /// Queue number.
    pub index: u16,
    /// Descriptor ring IOVA.
    pub iova: u64,
    /// Ring length in bytes.
    pub bytes: u32,
}

/// Reset and link.
pub fn reset() -> Vec<Step> {
    use Step::*;
    vec![
        Write(regs::EIMC, 0x7FFF_FFFF),
        Modify(regs::CTRL, ctrl::RESET, 0),
        // §4.6.3.2: wait at least 10 ms after a global reset before polling.
        Sleep(10),
        Wait {
            reg: regs::CTRL,
            mask: ctrl::RST,
            want: 0,
            ms: 100,
            what: "CTRL.RST (0x00000 bit 26) to clear",
        },
        Write(regs::EIMC, 0x7FFF_FFFF),
        Read(regs::EICR),
        Wait {
            reg: regs::EEC,
            mask: regs::EEC_ARD,
            want: regs::EEC_ARD,
            ms: 500,
            what: "EEC.ARD (0x10010 bit 9)",
        },
        Wait {
            reg: regs::RDRXCTL,
            mask: rdrxctl::DMAIDONE,
            want: rdrxctl::DMAIDONE,
            ms: 500,
            what: "RDRXCTL.DMAIDONE (0x02F00 bit 3)",
        },
        Modify(regs::AUTOC, regs::AUTOC_RESTART_AN, 0),
        Wait {
            reg: regs::LINKS,
            mask: regs::LINKS_UP,
            want: regs::LINKS_UP,
            ms: 5000,
            what: "LINKS.Link_Up (0x042A4 bit 30)",
        },
    ]
}

/// Receive set-up up to (not including) handing buffers to the NIC: filters, CRC
/// stripping, RSS, then per queue base, length, buffer size, head/tail, enable.
pub fn rx(queues: &[RingLayout], reta: &[u8; RETA_LEN]) -> Vec<Step> {
    use Step::*;
    let mut v = vec![Modify(regs::RXCTRL, 0, regs::RXCTRL_RXEN)];
    v.extend((0..128).map(|i| Write(regs::MTA + 4 * i, 0)));
    v.push(Modify(regs::FCTRL, fctrl::BAM | fctrl::MPE | fctrl::UPE, 0));
    v.push(Modify(regs::HLREG0, hlreg0::RXCRCSTRP, 0));
    v.push(Modify(regs::RDRXCTL, rdrxctl::CRC_STRIP, 0));
    v.push(Write(regs::RXCSUM, regs::RXCSUM_PCSD));
    v.extend(
        rss::key_regs(&rss::KEY)
            .iter()
            .enumerate()
            .map(|(n, &k)| Write(regs::RSSRK + 4 * n, k)),
    );
    v.extend(
        rss::reta_regs(reta)
            .iter()
            .enumerate()
            .map(|(n, &r)| Write(regs::RETA + 4 * n, r)),
    );
    v.push(Write(
        regs::MRQC,
        mrqc::RSS | mrqc::IPV4 | mrqc::TCP_IPV4 | mrqc::UDP_IPV4,
    ));
    for q in queues {
        let n = q.index;
        v.push(Write(regs::rdbal(n), q.iova as u32));
        v.push(Write(regs::rdbah(n), (q.iova >> 32) as u32));
        v.push(Write(regs::rdlen(n), q.bytes));
        v.push(Write(
            regs::srrctl(n),
            srrctl::BSIZEPKT_2K | srrctl::DESCTYPE_ADV_ONEBUF | srrctl::DROP_EN,
        ));
        v.push(Write(regs::rdh(n), 0));
        v.push(Write(regs::rdt(n), 0));
        v.push(Modify(regs::rxdctl(n), regs::QUEUE_ENABLE, 0));
        v.push(Wait {
            reg: regs::rxdctl(n),
            mask: regs::QUEUE_ENABLE,
            want: regs::QUEUE_ENABLE,
            ms: 100,
            what: "RXDCTL.ENABLE (0x01028 + 0x40 n, bit 25)",
        });
    }
    v
}

/// After the RX tails are written: enable reception.
pub fn rx_enable() -> Vec<Step> {
    vec![Step::Modify(regs::RXCTRL, regs::RXCTRL_RXEN, 0)]
}

/// Transmit set-up: CRC and padding, 64-queue mode with the arbiter off while MTQC
/// changes, per queue base, length, head/tail, DMA TX enable, then queue enables.
pub fn tx(queues: &[RingLayout]) -> Vec<Step> {
    use Step::*;
    let mut v = vec![
        Modify(regs::HLREG0, hlreg0::TXCRCEN | hlreg0::TXPADEN, 0),
        Modify(regs::RTTDCS, regs::RTTDCS_ARBDIS, 0),
        Write(regs::MTQC, regs::MTQC_64Q),
        Modify(regs::RTTDCS, 0, regs::RTTDCS_ARBDIS),
    ];
    for q in queues {
        let n = q.index;
        v.push(Write(regs::tdbal(n), q.iova as u32));
        v.push(Write(regs::tdbah(n), (q.iova >> 32) as u32));
        v.push(Write(regs::tdlen(n), q.bytes));
        v.push(Write(regs::tdh(n), 0));
        v.push(Write(regs::tdt(n), 0));
    }
    v.push(Modify(regs::DMATXCTL, regs::DMATXCTL_TE, 0));
    for q in queues {
        v.push(Modify(regs::txdctl(q.index), regs::QUEUE_ENABLE, 0));
        v.push(Wait {
            reg: regs::txdctl(q.index),
            mask: regs::QUEUE_ENABLE,
            want: regs::QUEUE_ENABLE,
            ms: 100,
            what: "TXDCTL.ENABLE (0x06028 + 0x40 n, bit 25)",
        });
    }
    v
}

/// Stop all DMA: receive off, queues off (before any mapping goes away).
pub fn stop(queues: u16) -> Vec<Step> {
    use Step::*;
    let mut v = vec![Modify(regs::RXCTRL, 0, regs::RXCTRL_RXEN)];
    for n in 0..queues {
        v.push(Modify(regs::rxdctl(n), 0, regs::QUEUE_ENABLE));
        v.push(Modify(regs::txdctl(n), 0, regs::QUEUE_ENABLE));
    }
    v.push(Modify(regs::DMATXCTL, 0, regs::DMATXCTL_TE));
    v
}

/// Runs `steps` against the BAR.
pub fn run(r: &Regs, steps: &[Step]) -> Result<()> {
    for s in steps {
        match *s {
            Step::Write(o, v) => r.write(o, v)?,
            Step::Modify(o, set, clear) => r.modify(o, set, clear)?,
            Step::Read(o) => {
                r.read(o)?;
            }
            Step::Wait {
                reg,
                mask,
                want,
                ms,
                what,
            } => r.wait(reg, mask, want, ms, what)?,
            Step::Sleep(ms) => std::thread::sleep(std::time::Duration::from_millis(ms)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use Step::*;

    fn writes(v: &[Step]) -> Vec<(usize, u32)> {
        v.iter()
            .filter_map(|s| match *s {
                Write(o, x) => Some((o, x)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn reset_sequence_by_hand() {
        let p = reset();
        assert_eq!(p[0], Write(0x00888, 0x7FFF_FFFF));
        assert_eq!(p[1], Modify(0x00000, 0x0400_0008, 0));
        assert_eq!(p[2], Sleep(10));
        assert!(matches!(
            p[3],
            Wait {
                reg: 0x00000,
                mask: 0x0400_0000,
                want: 0,
                ..
            }
        ));
        assert!(matches!(
            p[6],
            Wait {
                reg: 0x10010,
                mask: 0x200,
                want: 0x200,
                ..
            }
        ));
        assert!(matches!(
            p[7],
            Wait {
                reg: 0x02F00,
                mask: 0x8,
                want: 0x8,
                ..
            }
        ));
        assert_eq!(p[8], Modify(0x042A0, 0x1000, 0));
        assert!(matches!(
            p[9],
            Wait {
                reg: 0x042A4,
                mask: 0x4000_0000,
                ..
            }
        ));
    }

    #[test]
    fn rx_sequence_by_hand() {
        let qs = [
            RingLayout {
                index: 0,
                iova: 0x1_2345_6000,
                bytes: 4096,
            },
            RingLayout {
                index: 1,
                iova: 0x7000,
                bytes: 4096,
            },
        ];
        let p = rx(&qs, &rss::reta(2));
        // Receive off first.
        assert_eq!(p[0], Modify(0x03000, 0, 1));
        let w = writes(&p);
        // 128 MTA writes of 0 from 0x05200.
        assert_eq!(w[0], (0x05200, 0));
        assert_eq!(w[127], (0x053FC, 0));
        assert!(p.contains(&Modify(0x05080, 0x700, 0)));
        assert!(p.contains(&Modify(0x04240, 0x2, 0)));
        assert!(p.contains(&Modify(0x02F00, 0x2, 0)));
        assert!(w.contains(&(0x05000, 0x2000)));
        // RSS key: RSSRK0 = key bytes 6d 5a 56 da little-endian.
        assert!(w.contains(&(0x0EB80, 0xDA56_5A6D)));
        // RETA for two queues: entries 0,1,0,1 -> 0x01000100 in every register.
        assert!(w.contains(&(0x0EB00, 0x0100_0100)));
        assert!(w.contains(&(0x0EB7C, 0x0100_0100)));
        assert!(w.contains(&(0x0EC80, 0x0043_0001)));
        // Queue 0: base low/high split, length, SRRCTL, head and tail.
        assert!(w.contains(&(0x01000, 0x2345_6000)));
        assert!(w.contains(&(0x01004, 0x1)));
        assert!(w.contains(&(0x01008, 4096)));
        assert!(w.contains(&(0x01014, 0x1200_0002)));
        assert!(w.contains(&(0x01010, 0)) && w.contains(&(0x01018, 0)));
        // Queue 1.
        assert!(w.contains(&(0x01040, 0x7000)) && w.contains(&(0x01044, 0)));
        assert!(p.contains(&Modify(0x01068, 0x0200_0000, 0)));
        // Each enable is followed by its wait.
        let i = p
            .iter()
            .position(|s| *s == Modify(0x01028, 0x0200_0000, 0))
            .expect("queue 0 enable");
        assert!(matches!(
            p[i + 1],
            Wait {
                reg: 0x01028,
                mask: 0x0200_0000,
                want: 0x0200_0000,
                ..
            }
        ));
        assert_eq!(rx_enable(), vec![Modify(0x03000, 1, 0)]);
    }

    #[test]
    fn tx_sequence_by_hand() {
        let qs = [RingLayout {
            index: 1,
            iova: 0xAB_CDEF_0000,
            bytes: 8192,
        }];
        let p = tx(&qs);
        assert_eq!(
            &p[..4],
            &[
                Modify(0x04240, 0x401, 0),
                Modify(0x04900, 0x40, 0),
                Write(0x08120, 0),
                Modify(0x04900, 0, 0x40)
            ]
        );
        let w = writes(&p);
        assert!(w.contains(&(0x06040, 0xCDEF_0000)));
        assert!(w.contains(&(0x06044, 0xAB)));
        assert!(w.contains(&(0x06048, 8192)));
        assert!(w.contains(&(0x06050, 0)) && w.contains(&(0x06058, 0)));
        // DMA TX enable before the queue enable (§4.6.8).
        let te = p
            .iter()
            .position(|s| *s == Modify(0x04A80, 1, 0))
            .expect("TE");
        let en = p
            .iter()
            .position(|s| *s == Modify(0x06068, 0x0200_0000, 0))
            .expect("enable");
        assert!(te < en);
        assert_eq!(
            stop(1),
            vec![
                Modify(0x03000, 0, 1),
                Modify(0x01028, 0, 0x0200_0000),
                Modify(0x06028, 0, 0x0200_0000),
                Modify(0x04A80, 0, 1)
            ]
        );
    }

    #[test]
    fn advanced_descriptors_as_the_82599_reads_them() {
        // §7.2.3.2.4 advanced TX data descriptor for 1514 bytes at 0x10_0000:
        // DTALEN 0x05EA, DTYP 0011b (0x0030_0000), DCMD EOP|IFCS|RS|DEXT = 0x2B
        // (0x2B00_0000), PAYLEN 1514 in bits 63:46 (0x017A_8000 in the high dword).
        assert_eq!(
            nicdesc::desc::tx_data(0x10_0000, 1514),
            [0x10_0000, 0x017A_8000_2B30_05EA]
        );
        // §7.1.6.1 read format: packet buffer, no header buffer.
        assert_eq!(nicdesc::desc::rx_read(0x20_0000), [0x20_0000, 0]);
        // §7.1.6.2 write-back: RSS type 7 (UDP/IPv4) in bits 3:0, hash in 63:32,
        // DD|EOP, length 60; an RXE error (bit 29) lands in `errors`.
        let d = nicdesc::desc::RxWb::decode([0xDEAD_BEEF_0000_0007, 0x0000_003C_2000_0003]);
        assert_eq!(
            (d.rss_type, d.rss_hash, d.len, d.errors),
            (7, 0xDEAD_BEEF, 60, 0x2000_0000)
        );
        assert!(d.done() && d.eop());
    }
}
