//! The model works across processes: the parent (playing iommud) builds the
//! tables and enables translation; a child process (playing a driver and the
//! device) attaches through the memfds and does DMA.
//!
//! The child is this test binary re-run with `--exact child_role`; it opens
//! the parent's memfds through `/proc/<pid>/fd/<n>`, so no fd has to survive
//! exec.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, AsRawFd};
use std::process::Command;

use vtd::desc::Descriptor;
use vtd::entry::{level_index, AddressWidth, ContextEntry, RootEntry, SlPte};
use vtd::regs::{self, FaultRecord, Gcmd, Gsts};
use vtd::sim::{SimConfig, SimMachine};

const ROOT: u64 = 0x1000;
const CTX: u64 = 0x2000;
const L3: u64 = 0x3000;
const L2: u64 = 0x4000;
const L1: u64 = 0x5000;
const QUEUE: u64 = 0x10000;
const STATUS: u64 = 0x20000;
const DATA: u64 = 0x10_0000;
const SID: u16 = 0x0108; // 01:01.0
const DID: u16 = 3;

fn w128(m: &SimMachine, at: u64, v: u128) {
    m.write_u64(at, v as u64).expect("lo");
    m.write_u64(at + 8, (v >> 64) as u64).expect("hi");
}

fn map(m: &SimMachine, iova: u64, phys: u64) {
    let at = L1 + 8 * level_index(iova, 1) as u64;
    m.write_u64(at, SlPte::new(phys, true, true).0)
        .expect("pte");
}

#[test]
fn child_sees_parent_tables_and_parent_sees_child_dma() {
    let m = SimMachine::create(SimConfig {
        mem_bytes: 8 << 20,
        ..SimConfig::default()
    })
    .expect("create");
    // Bus 1 -> context table; devfn 0x08 -> 3-level tables of domain 3.
    w128(&m, ROOT + 16, RootEntry::new(CTX).0);
    w128(
        &m,
        CTX + 0x08 * 16,
        ContextEntry::translated(L3, AddressWidth::Aw39, DID).0,
    );
    m.write_u64(L3, SlPte::table(L2).0).expect("l3");
    m.write_u64(L2, SlPte::table(L1).0).expect("l2");
    map(&m, 0x9000, DATA);
    m.write_bytes(DATA, b"from parent").expect("data");
    m.write64(regs::RTADDR, ROOT);
    m.write32(regs::GCMD, Gcmd::SRTP.bits());
    m.write64(regs::IQA, regs::iqa(QUEUE, 0));
    m.write32(regs::GCMD, Gcmd::QIE.bits());
    m.write_u64(QUEUE, Descriptor::cc_global().lo).expect("q0");
    m.write_u64(QUEUE + 16, Descriptor::iotlb_global(true, true).lo)
        .expect("q1");
    m.write64(regs::IQT, 2 << 4);
    m.write32(regs::GCMD, (Gcmd::QIE | Gcmd::TE).bits());
    assert!(Gsts::from_bits_retain(m.read32(regs::GSTS)).contains(Gsts::TES));

    let (mfd, sfd) = m.fds();
    let pid = std::process::id();
    let exe = std::env::current_exe().expect("current_exe");
    let out = Command::new(exe)
        .args(["--exact", "child_role", "--ignored", "--nocapture"])
        .env(
            "VTD_SIM_MEM",
            format!("/proc/{pid}/fd/{}", mfd.as_fd().as_raw_fd()),
        )
        .env(
            "VTD_SIM_STATE",
            format!("/proc/{pid}/fd/{}", sfd.as_fd().as_raw_fd()),
        )
        .output()
        .expect("spawn child");
    assert!(
        out.status.success(),
        "child failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The child's DMA through the parent's mapping...
    let mut b = [0u8; 10];
    m.read_bytes(DATA + 0x100, &mut b).expect("read");
    assert_eq!(&b, b"from child");
    // ...through the leaf entry the child wrote as a driver...
    m.read_bytes(DATA + 0x1000, &mut b).expect("read");
    assert_eq!(&b, b"driver map");
    // ...and the child's fault shows in the parent's registers.
    let r = FaultRecord::decode(m.read64(0x220), m.read64(0x228));
    assert_eq!(
        (r.fault_addr, r.sid, r.reason, r.is_read),
        (0xB000, SID, 6, true)
    );
    // The child invalidated through the queue; its wait status landed.
    assert_eq!(m.read_u32(STATUS), Ok(0x600D));
    let c = m.counters();
    assert_eq!((c.faults_recorded, c.stale_hits, c.wait), (1, 0, 1));
    assert!(c.iotlb_hits >= 1);
}

fn open_rw(var: &str) -> Option<File> {
    let path = std::env::var(var).ok()?;
    Some(
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .expect("open memfd"),
    )
}

/// Runs only as the child of the test above.
#[test]
#[ignore = "child process of child_sees_parent_tables_and_parent_sees_child_dma"]
fn child_role() {
    let (Some(mem), Some(state)) = (open_rw("VTD_SIM_MEM"), open_rw("VTD_SIM_STATE")) else {
        return;
    };
    let m = SimMachine::open(mem.as_fd(), state.as_fd()).expect("attach");
    let mut b = [0u8; 11];
    m.dma_read(SID, 0x9000, &mut b).expect("dma read");
    assert_eq!(&b, b"from parent");
    m.dma_read(SID, 0x9000, &mut b)
        .expect("dma read (IOTLB hit)");
    m.dma_write(SID, 0x9100, b"from child").expect("dma write");
    // As a driver: write a leaf entry for a new IOVA, then DMA to it.
    map(&m, 0xA000, DATA + 0x1000);
    m.dma_write(SID, 0xA000, b"driver map").expect("dma write");
    assert!(m.dma_read(SID, 0xB000, &mut b).is_err());
    // As iommud: queue a page-selective invalidation and a wait (the queue
    // tail continues at 2).
    let inv = Descriptor::iotlb_page(DID, 0xA000, 0, true, true, true);
    let wait = Descriptor::wait(STATUS, 0x600D, false, true, true);
    for (i, d) in [inv, wait].iter().enumerate() {
        let at = QUEUE + 16 * (2 + i as u64);
        m.write_u64(at, d.lo).expect("lo");
        m.write_u64(at + 8, d.hi).expect("hi");
    }
    m.write64(regs::IQT, 4 << 4);
    assert_eq!(m.read_u32(STATUS), Ok(0x600D));
}
