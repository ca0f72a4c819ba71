//! The 82599 driver: the bring-up program of [`crate::program`] run against the BAR,
//! the queues nicdesc's. QEMU has no 82599 model: this code is compiled and its
//! register program is host-tested, but it has never driven a device.

use std::sync::Arc;

use linuxhw::mmio::MmioRegion;
use linuxhw::pci::PciFunction;
use nicdesc::cli::MqNic;
use nicdesc::queue::{RxQueue, SharedMapper, TxQueue};
use nicdesc::regs::{Doorbell, Regs};
use nicdesc::rss::{self, RETA_LEN};
use nicdesc::{Error, Result};

use crate::program::{self, RingLayout};
use crate::regs::{self, stat};

/// PCI vendor id of Intel.
pub const VENDOR: u16 = 0x8086;
/// PCI device id of the 82599 SFP+ (82599ES, 8086:10fb).
pub const DEVICE: u16 = 0x10FB;
/// RSS spreads over at most 16 queues (the redirection table's 4-bit entries, §7.1.2.8).
pub const MAX_QUEUES: u16 = 16;
/// Descriptors per ring.
pub const RING_LEN: u16 = 512;

/// An 82599 owned from userspace, polled, with `queues` RX/TX queue pairs.
pub struct Ixgbe {
    bdf: String,
    source_id: u16,
    regs: Arc<Regs>,
    mapper: SharedMapper,
    mac: [u8; 6],
    reta: [u8; RETA_LEN],
    tx: Vec<TxQueue>,
    rx: Vec<RxQueue>,
    hw: [u64; 4],
}

impl Ixgbe {
    /// Claims the function at `bdf`, resets it and brings up `queues` queue pairs.
    pub fn open(bdf: &str, mapper: SharedMapper, queues: u16) -> Result<Ixgbe> {
        let func = PciFunction::open(bdf)?;
        let (vendor, device) = (func.vendor_id()?, func.device_id()?);
        if (vendor, device) != (VENDOR, DEVICE) {
            return Err(Error::WrongDevice {
                bdf: func.bdf().to_string(),
                vendor,
                device,
                want: "82599 (8086:10fb)",
            });
        }
        func.enable(true, true)?;
        let bar = func.bar0()?;
        Ixgbe::with_bar(func.bdf().to_string(), func.bdf_u16(), bar, mapper, queues)
    }

    /// Drives a function already claimed whose BAR 0 is mapped at `bar`.
    pub fn with_bar(
        bdf: String,
        source_id: u16,
        bar: MmioRegion,
        mapper: SharedMapper,
        queues: u16,
    ) -> Result<Ixgbe> {
        if queues == 0 || queues > MAX_QUEUES {
            return Err(Error::Device(format!(
                "{queues} queue pairs: RSS spreads over 1..={MAX_QUEUES}"
            )));
        }
        let regs = Regs::new(bar);
        program::run(&regs, &program::reset())?;
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
        let mut nic = Ixgbe {
            bdf,
            source_id,
            regs,
            mapper,
            mac: [0; 6],
            reta: rss::reta(queues as u8),
            tx,
            rx,
            hw: [0; 4],
        };
        nic.mac = nic.read_mac()?;
        let rxl: Vec<RingLayout> = nic
            .rx
            .iter()
            .map(|q| RingLayout {
                index: q.index(),
                iova: q.ring_iova(),
                bytes: q.ring_bytes(),
            })
            .collect();
        let txl: Vec<RingLayout> = nic
            .tx
            .iter()
            .map(|q| RingLayout {
                index: q.index(),
                iova: q.ring_iova(),
                bytes: q.ring_bytes(),
            })
            .collect();
        program::run(&nic.regs, &program::rx(&rxl, &nic.reta))?;
        for q in nic.rx.iter_mut() {
            q.arm()?;
        }
        program::run(&nic.regs, &program::rx_enable())?;
        program::run(&nic.regs, &program::tx(&txl))?;
        Ok(nic)
    }

    /// The function's VT-d source id.
    pub fn source_id(&self) -> u16 {
        self.source_id
    }

    /// RAL0/RAH0, loaded from the EEPROM by the reset (§8.2.3.7.8).
    fn read_mac(&self) -> Result<[u8; 6]> {
        let lo = self.regs.read(regs::RAL0)?;
        let hi = self.regs.read(regs::RAH0)?;
        if hi & regs::RAH_AV == 0 {
            return Err(Error::Device(
                "RAH0.AV (0x0A204 bit 31) clear: no station address".into(),
            ));
        }
        let (l, h) = (lo.to_le_bytes(), hi.to_le_bytes());
        Ok([l[0], l[1], l[2], l[3], h[0], h[1]])
    }

    fn shutdown(&mut self) -> Result<()> {
        program::run(&self.regs, &program::stop(self.tx.len() as u16))?;
        program::run(&self.regs, &program::reset())?;
        for q in self.tx.iter_mut() {
            q.release()?;
        }
        for q in self.rx.iter_mut() {
            q.release()?;
        }
        Ok(())
    }
}

impl Drop for Ixgbe {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            eprintln!("ixgbed: {}: shutdown: {e}", self.bdf);
        }
    }
}

impl MqNic for Ixgbe {
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
        let regs = [stat::GPTC, stat::GPRC, stat::CRCERRS, stat::MPC0];
        for (acc, r) in self.hw.iter_mut().zip(regs) {
            *acc += u64::from(self.regs.read(r)?);
        }
        Ok(["gptc", "gprc", "crcerrs", "mpc"]
            .into_iter()
            .zip(self.hw)
            .collect())
    }
    fn mapper(&self) -> SharedMapper {
        self.mapper.clone()
    }
    fn rx_head_tail(&self, q: u16) -> Result<(u32, u32)> {
        Ok((self.regs.read(regs::rdh(q))?, self.regs.read(regs::rdt(q))?))
    }
}
