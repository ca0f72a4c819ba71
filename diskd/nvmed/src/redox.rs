//! nvmed on Redox, started by pcid-spawner (see `recipes/nvmed`).
//!
//! Never compiled (no Redox toolchain here). Like e1000d's entry: from the pcid channel
//! in `PCID_CLIENT_CHANNEL` it learns its function, reads the configuration header next
//! to it in the pci scheme, checks the class code, maps BAR 0 through
//! `/scheme/memory/physical@uc`, attaches to its iommud domain through the `iommu`
//! scheme and brings the controller up with the same core as on Linux
//! ([`Nvme::with_bar`]); then it creates its I/O queues, runs a short verified
//! workload over the first 4 MiB (which it overwrites) and idles. It serves no disk
//! scheme yet. Memory space and bus mastering are assumed enabled by pcid.

use std::sync::Arc;
use std::time::Duration;

use e1000d::pcid::{self, PCID_CHANNEL_ENV};
use e1000d::LibdmaMapper;
use libdma::{DmaDomain, FlushPolicy, Strategy};
use linuxhw::mmio::MmioRegion;
use nvmed::bench::{self, Job, Worker};
use nvmed::ctrl::{class_of, BAR0_LEN, CLASS_NVME};
use nvmed::io::IoQueue;
use nvmed::queue::Bar;
use nvmed::Nvme;

/// Brings the function pcid-spawner gave us up under its iommud domain.
pub fn run() -> Result<bool, String> {
    let env = std::env::var(PCID_CHANNEL_ENV).ok();
    let fd = pcid::pcid_channel(env.as_deref())?;
    let mut buf = [0u8; 256];
    let n = libredox::call::fpath(fd, &mut buf)
        .map_err(|e| format!("fpath of the pcid channel: {e}"))?;
    let path = String::from_utf8_lossy(&buf[..n]).into_owned();
    let sid = pcid::bdf_of_pci_path(&path).ok_or(format!("no PCI address in {path:?}"))?;
    let bdf = libdma::Bdf(sid).to_string();
    let cfg_path = pcid::config_path(&path).ok_or(format!("{path:?} is not a channel"))?;
    let config = std::fs::read(&cfg_path).map_err(|e| format!("{cfg_path}: {e}"))?;
    if class_of(&config) != Some(CLASS_NVME) {
        return Err(format!("{bdf}: class {:x?} is not NVMe", class_of(&config)));
    }
    let bar = pcid::bar0(&config).ok_or(format!("{bdf}: BAR 0 is not memory"))?;
    let regs = MmioRegion::map_phys_via(pcid::PHYS_UNCACHED, bar, BAR0_LEN)
        .map_err(|e| format!("{bdf}: BAR 0 at {bar:#x}: {e}"))?;
    let domain = DmaDomain::open(sid, Strategy::Magazine, FlushPolicy::PerCore)
        .map_err(|e| format!("{bdf}: iommu scheme: {e}"))?;
    let mapper = Arc::new(LibdmaMapper::from_domain(domain));
    let mut nvme = Nvme::with_bar(bdf.clone(), sid, Bar::new(regs), mapper.clone(), 1)
        .map_err(|e| format!("{bdf}: {e}"))?;
    println!(
        "nvmed: {bdf} up under iommud: {:?}, {} blocks of {} B",
        nvme.ident.model, nvme.ns.nsze, nvme.ns.block_size
    );
    // relibc has no sched_getcpu: one queue.
    let qp = nvme
        .create_io_queues(1)
        .map_err(|e| format!("{bdf}: {e}"))?
        .pop()
        .ok_or(format!("{bdf}: no I/O queue granted"))?;
    let q = IoQueue::new(qp, mapper.clone(), nvme.nsid, nvme.ns.block_size)
        .map_err(|e| e.to_string())?;
    let mut w = vec![Worker::new(q, &mapper, 0, 0, 1024, 0).map_err(|e| e.to_string())?];
    let mut fill = Job::parse("seqwrite/128k/4/32")?;
    fill.set_gen = Some(1);
    bench::run_job(&mut w, &fill).map_err(|e| e.to_string())?;
    let s =
        bench::run_job(&mut w, &Job::parse("randread/4096/8/1000")?).map_err(|e| e.to_string())?;
    println!("{}", s.line(&Job::parse("randread/4096/8/1000")?, 1));
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
