//! Controller bring-up and the admin queue: reset and enable (NVMe Base Specification
//! 1.4 §7.6.1 "Initialization", §7.3 resets via CC.EN), Identify, and one I/O queue pair
//! per CPU.

use std::sync::Arc;
use std::time::{Duration, Instant};

use e1000d::{Dir, DmaBuf, DmaMapper};
use linuxhw::pci::PciFunction;

use crate::cmd::{self, admin, cns, Cqe, Sqe, CQE_LEN, SQE_LEN};
use crate::identify::{Controller, Namespace};
use crate::queue::{Bar, QueuePair};
use crate::regs::{self, cap, cc, csts};
use crate::{Error, Result};

/// PCI class code of an NVM Express controller (base 01h mass storage, sub 08h
/// non-volatile memory, interface 02h NVMe).
pub const CLASS_NVME: u32 = 0x01_08_02;
/// Bytes of BAR 0 mapped (registers and the doorbells of 511 queue pairs at the
/// smallest stride; QEMU's BAR is larger).
pub const BAR0_LEN: usize = 0x2000;

/// The class code (base, sub, interface: bytes 0x0b, 0x0a, 0x09) of a configuration
/// header (PCI Local Bus 3.0 §6.2.1).
pub fn class_of(config: &[u8]) -> Option<u32> {
    let b = config.get(0x09..0x0c)?;
    Some(u32::from(b[2]) << 16 | u32::from(b[1]) << 8 | u32::from(b[0]))
}

/// Admin queue entries.
pub const ADMIN_ENTRIES: u16 = 32;
/// I/O queue entries (queue depth up to 63 per queue).
pub const IO_ENTRIES: u16 = 64;
/// Bound on one admin command.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);

/// A controller owned from userspace, polled, with namespace `nsid`.
pub struct Nvme<M: DmaMapper> {
    /// `0000:00:03.0` form.
    pub bdf: String,
    /// VT-d source id.
    pub source_id: u16,
    bar: Arc<Bar>,
    mapper: Arc<M>,
    /// CAP as read at open.
    pub cap: u64,
    dstrd: u32,
    admin: QueuePair,
    admin_cid: u16,
    /// Identify Controller.
    pub ident: Controller,
    /// Identify Namespace of `nsid`.
    pub ns: Namespace,
    /// The namespace used.
    pub nsid: u32,
    io_created: Vec<u16>,
}

/// Polls `reg` of `bar` until `done(value)` or `limit`; the error names the register.
fn wait_reg(
    bar: &Bar,
    reg: usize,
    name: &str,
    limit: Duration,
    done: impl Fn(u32) -> bool,
) -> Result<u32> {
    let start = Instant::now();
    loop {
        let v = bar.read32(reg)?;
        if done(v) {
            return Ok(v);
        }
        if start.elapsed() >= limit {
            return Err(Error::Timeout {
                what: format!("{name} (register {reg:#x}, last value {v:#x})"),
                ms: limit.as_millis() as u64,
            });
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Detaches a kernel driver bound to the function (the guest kernel's built-in nvme
/// driver), so that this process alone drives it.
fn release_kernel_driver(func: &PciFunction) -> Result<()> {
    let drv = func.sysfs_dir().join("driver");
    if drv.exists() {
        let unbind = drv.join("unbind");
        std::fs::write(&unbind, func.bdf().to_string()).map_err(|e| {
            Error::Invalid(format!(
                "{}: a kernel driver holds it and {} failed: {e}",
                func.bdf(),
                unbind.display()
            ))
        })?;
    }
    Ok(())
}

impl<M: DmaMapper + Send + Sync + 'static> Nvme<M> {
    /// Claims the function at `bdf`, resets and enables the controller, identifies it and
    /// namespace `nsid`.
    pub fn open(bdf: &str, mapper: Arc<M>, nsid: u32) -> Result<Self> {
        let func = PciFunction::open(bdf)?;
        let class = func.read_config32(0x08)? >> 8;
        if class != CLASS_NVME {
            return Err(Error::WrongDevice {
                bdf: func.bdf().to_string(),
                class,
            });
        }
        release_kernel_driver(&func)?;
        func.enable(true, true)?;
        let bar = Bar::new(func.bar0()?);
        Self::with_bar(func.bdf().to_string(), func.bdf_u16(), bar, mapper, nsid)
    }

    /// Drives a function already claimed (memory space and bus mastering on) whose BAR 0
    /// is `bar`. The Linux [`open`](Self::open) and the Redox entry both end here.
    pub fn with_bar(
        bdf: String,
        source_id: u16,
        bar: Bar,
        mapper: Arc<M>,
        nsid: u32,
    ) -> Result<Self> {
        let bar = Arc::new(bar);
        let capv = bar.read64(regs::CAP)?;
        if cap::css(capv) & 1 == 0 {
            return Err(Error::Unsupported(format!(
                "CAP.CSS {:#x} lacks the NVM command set",
                cap::css(capv)
            )));
        }
        if cap::mpsmin(capv) != 0 {
            return Err(Error::Unsupported(format!(
                "CAP.MPSMIN {} (pages larger than 4 KiB)",
                cap::mpsmin(capv)
            )));
        }
        // CAP.TO bounds both transitions of CSTS.RDY; at least 500 ms, plus slack for TCG.
        let to = Duration::from_millis(cap::timeout_ms(capv).max(500) * 2);
        let dstrd = cap::dstrd(capv);

        // §7.6.1 step 1-2: disable (CC.EN = 0) and wait for CSTS.RDY = 0.
        let cur = bar.read32(regs::CC)?;
        bar.write32(regs::CC, cur & !cc::EN)?;
        wait_reg(&bar, regs::CSTS, "CSTS.RDY = 0 after CC.EN = 0", to, |v| {
            v & csts::RDY == 0
        })?;

        // Step 3: admin queues (mapped once, kept for the controller's lifetime).
        let admin = Self::queue_pair(&bar, &mapper, 0, ADMIN_ENTRIES, dstrd)?;
        bar.write32(regs::AQA, regs::aqa(ADMIN_ENTRIES, ADMIN_ENTRIES))?;
        bar.write64(regs::ASQ, admin.sq_iova)?;
        bar.write64(regs::ACQ, admin.cq_iova)?;
        // Polled: mask every interrupt vector (INTMS, §3.1.3).
        bar.write32(regs::INTMS, u32::MAX)?;
        // Step 4-5: CC (4 KiB pages, NVM command set, entry sizes), then EN = 1, and
        // wait for CSTS.RDY = 1.
        bar.write32(regs::CC, cc::value(false))?;
        bar.write32(regs::CC, cc::value(true))?;
        let st = wait_reg(&bar, regs::CSTS, "CSTS.RDY = 1 after CC.EN = 1", to, |v| {
            v & (csts::RDY | csts::CFS) != 0
        })?;
        if st & csts::CFS != 0 {
            return Err(Error::Fatal { csts: st });
        }

        let mut n = Nvme {
            bdf,
            source_id,
            bar,
            mapper,
            cap: capv,
            dstrd,
            admin,
            admin_cid: 0,
            ident: Controller {
                vid: 0,
                serial: String::new(),
                model: String::new(),
                firmware: String::new(),
                mdts: 0,
                nn: 0,
            },
            ns: Namespace {
                nsze: 0,
                ncap: 0,
                flbas: 0,
                block_size: 512,
                metadata: 0,
            },
            nsid,
            io_created: Vec::new(),
        };
        // Step 6: Identify Controller, then the namespace.
        let page = n.identify(0, cns::CONTROLLER)?;
        n.ident = Controller::parse(&page)
            .ok_or_else(|| Error::Invalid("short Identify Controller data".into()))?;
        if nsid == 0 || nsid > n.ident.nn {
            return Err(Error::Invalid(format!(
                "namespace {nsid} not in 1..={}",
                n.ident.nn
            )));
        }
        let page = n.identify(nsid, cns::NAMESPACE)?;
        n.ns = Namespace::parse(&page).ok_or_else(|| {
            Error::Invalid(format!("namespace {nsid}: impossible size or block size"))
        })?;
        if n.ns.metadata != 0 {
            return Err(Error::Unsupported(format!(
                "namespace {nsid} has {} metadata bytes per block",
                n.ns.metadata
            )));
        }
        Ok(n)
    }

    fn queue_pair(
        bar: &Arc<Bar>,
        mapper: &Arc<M>,
        qid: u16,
        entries: u16,
        dstrd: u32,
    ) -> Result<QueuePair> {
        let sq_len = (usize::from(entries) * SQE_LEN).next_multiple_of(4096);
        let cq_len = (usize::from(entries) * CQE_LEN).next_multiple_of(4096);
        let sq = mapper.alloc(sq_len)?;
        let cq = mapper.alloc(cq_len)?;
        let sq_iova = mapper.map(&sq, 0, sq_len, Dir::ToDevice)?;
        let cq_iova = mapper.map(&cq, 0, cq_len, Dir::FromDevice)?;
        QueuePair::new(
            qid,
            entries,
            (sq, sq_iova),
            (cq, cq_iova),
            (
                bar.doorbell(regs::sq_tail_doorbell(qid, dstrd))?,
                bar.doorbell(regs::cq_head_doorbell(qid, dstrd))?,
            ),
        )
    }

    /// The DMA mapper.
    pub fn mapper(&self) -> &Arc<M> {
        &self.mapper
    }

    /// Runs one admin command to completion (bounded).
    pub fn admin(&mut self, what: &str, build: impl FnOnce(u16) -> Sqe) -> Result<Cqe> {
        self.admin_cid = self.admin_cid.wrapping_add(1);
        let cid = self.admin_cid;
        self.admin.submit(&build(cid))?;
        let start = Instant::now();
        loop {
            if let Some(c) = self.admin.poll() {
                if c.cid != cid {
                    continue;
                }
                if !c.ok() {
                    return Err(Error::Status {
                        what: what.to_string(),
                        sct: c.sct(),
                        sc: c.sc(),
                        name: cmd::status_name(c.sct(), c.sc()),
                    });
                }
                return Ok(c);
            }
            if start.elapsed() >= ADMIN_TIMEOUT {
                let csts = self.bar.read32(regs::CSTS).unwrap_or(u32::MAX);
                return Err(Error::Timeout {
                    what: format!(
                        "admin completion queue phase tag ({what}, CID {cid}; CSTS {csts:#x})"
                    ),
                    ms: ADMIN_TIMEOUT.as_millis() as u64,
                });
            }
            std::thread::yield_now();
        }
    }

    /// Identify with CNS `cns`: the 4 KiB result, through a buffer mapped for this
    /// command only.
    pub fn identify(&mut self, nsid: u32, cns: u32) -> Result<Vec<u8>> {
        let buf = self.mapper.alloc(4096)?;
        let iova = self.mapper.map(&buf, 0, 4096, Dir::FromDevice)?;
        let r = self.admin("Identify", |cid| Sqe::identify(cid, nsid, cns, iova));
        let un = self.mapper.unmap(iova, 4096, Dir::FromDevice);
        r?;
        un?;
        let mut out = vec![0u8; 4096];
        // SAFETY: buf holds 4096 bytes; the command completed and the mapping is gone,
        // so the device no longer writes it; raw copy, no reference into DMA memory.
        unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), out.as_mut_ptr(), 4096) };
        Ok(out)
    }

    /// Asks for `want` I/O queue pairs (Set Features, Number of Queues) and creates as
    /// many as granted (at most `want`), each a CQ then its SQ with the same id.
    pub fn create_io_queues(&mut self, want: u16) -> Result<Vec<QueuePair>> {
        let want = want.clamp(1, 64);
        let c = self.admin("Set Features (Number of Queues)", |cid| {
            Sqe::set_num_queues(cid, want)
        })?;
        // DW0: NCQA (31:16), NSQA (15:0), both 0's based.
        let granted = (c.result & 0xffff).min(c.result >> 16) as u16 + 1;
        let n = want.min(granted);
        let entries = IO_ENTRIES.min(cap::mqes(self.cap).saturating_add(1).min(4096) as u16);
        let mut out = Vec::with_capacity(usize::from(n));
        for qid in 1..=n {
            let qp = Self::queue_pair(&self.bar, &self.mapper, qid, entries, self.dstrd)?;
            let (sq, cq) = (qp.sq_iova, qp.cq_iova);
            self.admin("Create I/O Completion Queue", |cid| {
                Sqe::create_cq(cid, qid, entries, cq)
            })?;
            self.admin("Create I/O Submission Queue", |cid| {
                Sqe::create_sq(cid, qid, entries, qid, sq)
            })?;
            self.io_created.push(qid);
            out.push(qp);
        }
        Ok(out)
    }

    /// Deletes the I/O queues created (SQ before CQ, §5.6) and shuts the controller down
    /// (CC.SHN normal, wait CSTS.SHST = 2, §7.6.2). Call with no command in flight.
    pub fn shutdown(&mut self) -> Result<()> {
        for qid in std::mem::take(&mut self.io_created) {
            self.admin("Delete I/O Submission Queue", |cid| {
                Sqe::delete_queue(cid, admin::DELETE_SQ, qid)
            })?;
            self.admin("Delete I/O Completion Queue", |cid| {
                Sqe::delete_queue(cid, admin::DELETE_CQ, qid)
            })?;
        }
        let v = self.bar.read32(regs::CC)?;
        self.bar.write32(regs::CC, v | cc::SHN_NORMAL)?;
        let to = Duration::from_millis(cap::timeout_ms(self.cap).max(500) * 2);
        wait_reg(
            &self.bar,
            regs::CSTS,
            "CSTS.SHST = 2 after CC.SHN",
            to,
            |v| csts::shst(v) == 2,
        )?;
        Ok(())
    }

    /// The controller's version register.
    pub fn version(&self) -> Result<u32> {
        self.bar.read32(regs::VS)
    }

    /// An unused buffer of `len` bytes from the mapper (for callers building I/O).
    pub fn alloc(&self, len: usize) -> Result<DmaBuf> {
        Ok(self.mapper.alloc(len)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_code_from_config_header() {
        let mut cfg = [0u8; 0x40];
        // QEMU nvme: revision 2 at 0x08, interface 02, subclass 08, base class 01.
        cfg[0x08..0x0c].copy_from_slice(&[0x02, 0x02, 0x08, 0x01]);
        assert_eq!(class_of(&cfg), Some(CLASS_NVME));
        assert_eq!(class_of(&cfg), Some(0x01_08_02));
        // An e1000 (network controller 02 00 00).
        cfg[0x09..0x0c].copy_from_slice(&[0x00, 0x00, 0x02]);
        assert_eq!(class_of(&cfg), Some(0x02_00_00));
        assert_eq!(class_of(&cfg[..0x0b]), None);
    }
}
