//! The 82576 driver: reset, link, RSS and queue bring-up; the queues are nicdesc's.

use std::sync::Arc;
use std::time::Duration;

use linuxhw::mmio::MmioRegion;
use linuxhw::pci::PciFunction;
use nicdesc::cli::MqNic;
use nicdesc::queue::{RxQueue, SharedMapper, TxQueue};
use nicdesc::regs::{Doorbell, Regs};
use nicdesc::rss::{self, RETA_LEN};
use nicdesc::{Error, Result};

use crate::regs::{self, ctrl, eerd, mdic, mrqc, phy, rctl, srrctl, stat, tctl};

/// PCI vendor id of Intel.
pub const VENDOR: u16 = 0x8086;
/// PCI device id of the 82576 (QEMU `-device igb`).
pub const DEVICE: u16 = 0x10C9;
/// Queue pairs the 82576 has (§7.1.1: 16 RX and 16 TX queues).
pub const MAX_QUEUES: u16 = 16;
/// Descriptors per ring: 256 × 16 B = 4 KiB.
pub const RING_LEN: u16 = 256;

const RESET_MS: u64 = 100;
const MDIC_MS: u64 = 10;
const LINK_MS: u64 = 5000;
const QUEUE_MS: u64 = 100;

/// An 82576 owned from userspace, polled, with `queues` RX/TX queue pairs.
pub struct Igb {
    bdf: String,
    source_id: u16,
    regs: Arc<Regs>,
    mapper: SharedMapper,
    mac: [u8; 6],
    reta: [u8; RETA_LEN],
    tx: Vec<TxQueue>,
    rx: Vec<RxQueue>,
    hw: [u64; 5],
}

impl Igb {
    /// Claims the function at `bdf` (enables memory space and bus mastering), resets it
    /// and brings up `queues` queue pairs with RSS.
    pub fn open(bdf: &str, mapper: SharedMapper, queues: u16) -> Result<Igb> {
        let func = PciFunction::open(bdf)?;
        let (vendor, device) = (func.vendor_id()?, func.device_id()?);
        if (vendor, device) != (VENDOR, DEVICE) {
            return Err(Error::WrongDevice {
                bdf: func.bdf().to_string(),
                vendor,
                device,
                want: "82576 (8086:10c9)",
            });
        }
        func.enable(true, true)?;
        let bar = func.bar0()?;
        Igb::with_bar(func.bdf().to_string(), func.bdf_u16(), bar, mapper, queues)
    }

    /// Drives a function already claimed whose BAR 0 is mapped at `bar` (the Linux
    /// [`open`](Self::open) and the Redox entry both end here).
    pub fn with_bar(
        bdf: String,
        source_id: u16,
        bar: MmioRegion,
        mapper: SharedMapper,
        queues: u16,
    ) -> Result<Igb> {
        if queues == 0 || queues > MAX_QUEUES {
            return Err(Error::Device(format!(
                "{queues} queue pairs: the 82576 has 1..={MAX_QUEUES}"
            )));
        }
        let regs = Regs::new(bar);
        reset(&regs)?;
        let mut tx = Vec::new();
        let mut rx = Vec::new();
        for q in 0..queues {
            tx.push(TxQueue::new(
                q,
                mapper.clone(),
                RING_LEN,
                Doorbell::new(regs.clone(), regs::tdt(q)),
            )?);
            rx.push(RxQueue::new(
                q,
                mapper.clone(),
                RING_LEN,
                Doorbell::new(regs.clone(), regs::rdt(q)),
            )?);
        }
        let mut nic = Igb {
            bdf,
            source_id,
            regs,
            mapper,
            mac: [0; 6],
            reta: rss::reta(queues as u8),
            tx,
            rx,
            hw: [0; 5],
        };
        nic.mac = nic.read_mac()?;
        nic.setup_rx()?;
        nic.setup_tx()?;
        nic.regs.wait(
            regs::STATUS,
            regs::STATUS_LU,
            regs::STATUS_LU,
            LINK_MS,
            "STATUS.LU (0x0008 bit 1)",
        )?;
        Ok(nic)
    }

    /// The function's VT-d source id.
    pub fn source_id(&self) -> u16 {
        self.source_id
    }

    fn read_mac(&self) -> Result<[u8; 6]> {
        let lo = self.regs.read(regs::RAL0)?;
        let hi = self.regs.read(regs::RAH0)?;
        if hi & (1 << 31) != 0 {
            let (l, h) = (lo.to_le_bytes(), hi.to_le_bytes());
            return Ok([l[0], l[1], l[2], l[3], h[0], h[1]]);
        }
        // §6.1: EEPROM words 0..2 hold the Ethernet address.
        let mut mac = [0u8; 6];
        for w in 0..3u32 {
            self.regs
                .write(regs::EERD, eerd::START | (w << eerd::ADDR_SHIFT))?;
            self.regs.wait(
                regs::EERD,
                eerd::DONE,
                eerd::DONE,
                10,
                "EERD.DONE (0x0014 bit 1)",
            )?;
            let v = ((self.regs.read(regs::EERD)? >> eerd::DATA_SHIFT) as u16).to_le_bytes();
            mac[2 * w as usize] = v[0];
            mac[2 * w as usize + 1] = v[1];
        }
        Ok(mac)
    }

    /// §4.5.9 receive initialization with RSS (§7.1.2.10).
    fn setup_rx(&mut self) -> Result<()> {
        let r = &self.regs;
        r.write(regs::RCTL, 0)?;
        for i in 0..128 {
            r.write(regs::MTA + 4 * i, 0)?;
        }
        // The write-back carries the RSS hash instead of the checksum.
        r.write(regs::RXCSUM, regs::RXCSUM_PCSD)?;
        for (n, v) in rss::key_regs(&rss::KEY).iter().enumerate() {
            r.write(regs::RSSRK + 4 * n, *v)?;
        }
        for (k, v) in rss::reta_regs(&self.reta).iter().enumerate() {
            r.write(regs::RETA + 4 * k, *v)?;
        }
        r.write(
            regs::MRQC,
            mrqc::RSS | mrqc::IPV4 | mrqc::TCP_IPV4 | mrqc::UDP_IPV4,
        )?;
        for q in self.rx.iter_mut() {
            let n = q.index();
            r.write(regs::rdbal(n), q.ring_iova() as u32)?;
            r.write(regs::rdbah(n), (q.ring_iova() >> 32) as u32)?;
            r.write(regs::rdlen(n), q.ring_bytes())?;
            r.write(
                regs::srrctl(n),
                srrctl::BSIZEPKT_2K | srrctl::DESCTYPE_ADV_ONEBUF | srrctl::DROP_EN,
            )?;
            r.write(regs::rdh(n), 0)?;
            r.write(regs::rdt(n), 0)?;
            r.modify(regs::rxdctl(n), regs::QUEUE_ENABLE, 0)?;
            r.wait(
                regs::rxdctl(n),
                regs::QUEUE_ENABLE,
                regs::QUEUE_ENABLE,
                QUEUE_MS,
                "RXDCTL.ENABLE (0xC028 + 0x40 n, bit 25)",
            )?;
            q.arm()?;
        }
        r.write(
            regs::RCTL,
            rctl::EN | rctl::UPE | rctl::MPE | rctl::BAM | rctl::SECRC,
        )?;
        Ok(())
    }

    /// §4.5.10 transmit initialization.
    fn setup_tx(&mut self) -> Result<()> {
        let r = &self.regs;
        r.write(regs::TCTL, 0)?;
        for q in &self.tx {
            let n = q.index();
            r.write(regs::tdbal(n), q.ring_iova() as u32)?;
            r.write(regs::tdbah(n), (q.ring_iova() >> 32) as u32)?;
            r.write(regs::tdlen(n), q.ring_bytes())?;
            r.write(regs::tdh(n), 0)?;
            r.write(regs::tdt(n), 0)?;
            r.modify(regs::txdctl(n), regs::QUEUE_ENABLE, 0)?;
            r.wait(
                regs::txdctl(n),
                regs::QUEUE_ENABLE,
                regs::QUEUE_ENABLE,
                QUEUE_MS,
                "TXDCTL.ENABLE (0xE028 + 0x40 n, bit 25)",
            )?;
        }
        r.write(
            regs::TCTL,
            tctl::EN | tctl::PSP | tctl::CT_DEFAULT | tctl::COLD_FD,
        )?;
        Ok(())
    }

    fn shutdown(&mut self) -> Result<()> {
        // Stop all DMA before any mapping goes away.
        self.regs.write(regs::RCTL, 0)?;
        self.regs.write(regs::TCTL, 0)?;
        for q in 0..self.tx.len() as u16 {
            self.regs.modify(regs::rxdctl(q), 0, regs::QUEUE_ENABLE)?;
            self.regs.modify(regs::txdctl(q), 0, regs::QUEUE_ENABLE)?;
        }
        reset(&self.regs)?;
        for q in self.tx.iter_mut() {
            q.release()?;
        }
        for q in self.rx.iter_mut() {
            q.release()?;
        }
        Ok(())
    }
}

impl Drop for Igb {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            eprintln!("igbd: {}: shutdown: {e}", self.bdf);
        }
    }
}

impl MqNic for Igb {
    fn bdf(&self) -> &str {
        &self.bdf
    }
    fn mac(&self) -> [u8; 6] {
        self.mac
    }
    fn reta(&self) -> [u8; RETA_LEN] {
        self.reta
    }
    fn queues_mut(&mut self) -> (&mut [TxQueue], &mut [RxQueue]) {
        (&mut self.tx, &mut self.rx)
    }
    fn hw_stats(&mut self) -> Result<Vec<(&'static str, u64)>> {
        let regs = [stat::GPTC, stat::GPRC, stat::CRCERRS, stat::MPC, stat::RNBC];
        for (acc, r) in self.hw.iter_mut().zip(regs) {
            *acc += u64::from(self.regs.read(r)?);
        }
        let names = ["gptc", "gprc", "crcerrs", "mpc", "rnbc"];
        Ok(names.into_iter().zip(self.hw).collect())
    }
    fn mapper(&self) -> SharedMapper {
        self.mapper.clone()
    }
    fn rx_head_tail(&self, q: u16) -> Result<(u32, u32)> {
        Ok((self.regs.read(regs::rdh(q))?, self.regs.read(regs::rdt(q))?))
    }
}

/// Datasheet §4.5 (initialization): mask interrupts, software reset (CTRL.RST), wait for
/// RST to clear, mask again; then link: CTRL.SLU and a PHY auto-negotiation restart
/// through MDIC (§4.5.7, copper link set-up). The datasheet also asks to wait for
/// EEC.Auto_RD after a reset; QEMU's igb never sets that bit (its EECD reset value has
/// none), so igbd does not wait for it: CTRL.RST clearing marks the reset's end.
fn reset(r: &Regs) -> Result<()> {
    r.write(regs::IMC, u32::MAX)?;
    r.write(regs::EIMC, u32::MAX)?;
    r.modify(regs::CTRL, ctrl::RST, 0)?;
    // The datasheet asks for at least 1 µs before the next access after a reset.
    std::thread::sleep(Duration::from_micros(10));
    r.wait(
        regs::CTRL,
        ctrl::RST,
        0,
        RESET_MS,
        "CTRL.RST (0x0000 bit 26) to clear",
    )?;
    r.write(regs::IMC, u32::MAX)?;
    r.write(regs::EIMC, u32::MAX)?;
    r.read(regs::ICR)?;
    r.modify(regs::CTRL, ctrl::SLU, 0)?;
    r.write(
        regs::MDIC,
        phy::CTRL_AUTONEG_RESTART | (phy::CTRL << mdic::REG_SHIFT) | mdic::PHY_1 | mdic::OP_WRITE,
    )?;
    r.wait(
        regs::MDIC,
        mdic::READY,
        mdic::READY,
        MDIC_MS,
        "MDIC.R (0x0020 bit 28)",
    )?;
    if r.read(regs::MDIC)? & mdic::ERROR != 0 {
        return Err(Error::Device(
            "MDIC.E (0x0020 bit 30): the PHY refused the control write".into(),
        ));
    }
    Ok(())
}
