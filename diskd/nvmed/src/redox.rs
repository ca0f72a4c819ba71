//! nvmed on Redox, started by pcid-spawner (see `recipes/nvmed`).
//!
//! Type-checked for x86_64-unknown-redox by `cargo xtask redox-check`; never run. Like e1000d's entry: from the pcid channel
//! in `PCID_CLIENT_CHANNEL` it learns its function, reads the configuration header next
//! to it in the pci scheme, checks the class code, maps BAR 0 through
//! `/scheme/memory/physical@uc`, attaches to its iommud domain through the `iommu`
//! scheme and brings the controller up with the same core as on Linux
//! ([`Nvme::with_bar`]); then it creates its I/O queues, runs a short verified
//! workload over the first 4 MiB (which it overwrites) and idles. It serves no disk
//! scheme yet. Memory space and bus mastering are assumed enabled by pcid.

use std::sync::Arc;
use std::time::Duration;

use e1000d::pcid;
use e1000d::LibdmaMapper;
use nvmed::bench::{self, Job, Worker};
use nvmed::ctrl::{class_of, BAR0_LEN, CLASS_NVME};
use nvmed::io::IoQueue;
use nvmed::queue::Bar;
use nvmed::Nvme;

/// Brings the function pcid-spawner gave us up under its iommud domain.
pub fn run() -> Result<bool, String> {
    let pcid::Function {
        sid,
        bdf,
        regs,
        domain,
    } = pcid::open_function(
        |c| match class_of(c) {
            Some(CLASS_NVME) => Ok(()),
            other => Err(format!("class {other:x?} is not NVMe")),
        },
        BAR0_LEN,
    )?;
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
