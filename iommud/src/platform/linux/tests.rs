//! Host tests of the linux platform (what needs no VT-d unit).

use super::*;

/// QEMU's intel-iommu, as measured in the guest (docs/ARCHITECTURE.md, "Platforms").
const QEMU_CAP: u64 = 0x00D2_008C_222F_0606;

#[test]
fn mmio_over_a_file_logs_bad_offsets_instead_of_panicking() {
    let path = std::env::temp_dir().join(format!("iommud-linux-mmio-{}", std::process::id()));
    let mut bytes = vec![0u8; PAGE_SIZE];
    bytes[CAP..CAP + 8].copy_from_slice(&QEMU_CAP.to_le_bytes());
    std::fs::write(&path, &bytes).expect("write temp register file");
    let regs = MmioRegion::from_file(&path, PAGE_SIZE).expect("map temp file");
    let _ = std::fs::remove_file(&path);
    let m = LinuxMmio::from_region(regs);
    assert_eq!(m.len(), PAGE_SIZE);
    assert_eq!(m.read64(CAP), QEMU_CAP);
    m.write32(0x20, 0xdead_beef);
    m.write64(0x28, 0x0123_4567_89ab_cdef);
    assert_eq!(m.read32(0x20), 0xdead_beef);
    assert_eq!(m.read64(0x28), 0x0123_4567_89ab_cdef);
    // Out of range and misaligned: 0 and ignored, no panic.
    assert_eq!(m.read32(PAGE_SIZE), 0);
    assert_eq!(m.read64(PAGE_SIZE - 4), 0);
    assert_eq!(m.read64(0x2c), 0);
    m.write64(PAGE_SIZE, 1);
    m.write32(usize::MAX - 1, 1);
}

/// The small-page source (4 KiB pages, real PFNs as root), or `None` with a note when
/// this host hides PFNs.
fn small() -> Option<HugeMem> {
    match HugeMem::with_source(MemSource::SmallPages) {
        Ok(m) => Some(m),
        Err(e) => {
            eprintln!("skipping: 4 KiB physical memory unavailable here: {e}");
            None
        }
    }
}

#[test]
fn frames_are_aligned_zeroed_distinct_and_reused() {
    let Some(m) = small() else { return };
    assert_eq!(m.source(), MemSource::SmallPages);
    // Exactly three pools' worth: the pool grows twice and ends up full.
    let n = SMALL_POOL_PAGES * 3;
    let mut frames = Vec::new();
    for i in 0..n {
        let f = m.alloc_frame().expect("frame");
        assert_eq!(f % FRAME, 0, "frame {f:#x} not 4 KiB aligned");
        for off in (0..FRAME).step_by(8) {
            assert_eq!(m.read_u64(f + off).expect("read"), 0, "frame {f:#x} dirty");
        }
        // Dirty it so reuse must zero it again.
        m.write_u64(f, 0xabc0 + i as u64).expect("write");
        m.write_u64(f + FRAME - 8, u64::MAX).expect("write");
        frames.push(f);
    }
    let set: BTreeSet<u64> = frames.iter().copied().collect();
    assert_eq!(set.len(), n, "frames handed out twice");
    assert_eq!(m.frames_in_use(), n);

    let victim = frames[5];
    m.free_frame(victim);
    m.free_frame(victim); // double free: logged, ignored
    m.free_frame(victim + 8); // not a frame: ignored
    assert_eq!(m.frames_in_use(), n - 1);
    let again = m.alloc_frame().expect("frame");
    assert_eq!(again, victim, "the only free frame must be reused");
    assert_eq!(m.read_u64(again).expect("read"), 0);
    assert_eq!(m.read_u64(again + FRAME - 8).expect("read"), 0);
    for f in frames {
        m.free_frame(f);
    }
    assert_eq!(m.frames_in_use(), 0);
}

#[test]
fn phys_accesses_agree_with_the_virtual_mapping() {
    let Some(m) = small() else { return };
    let f = m.alloc_frame().expect("frame");
    let ptr = {
        let g = m.read();
        let (c, d) = g.find(f, PAGE_SIZE).expect("frame is mapped");
        c.ptr(d)
    };
    // Pagemap agrees that this virtual page is at `f`.
    assert_eq!(linuxhw::hugemem::virt_to_phys(ptr).expect("pagemap"), f);
    m.write_u64(f + 16, 0x1122_3344_5566_7788).expect("write");
    // SAFETY: `ptr` is the frame's mapping, live while `m` is; 8-aligned, volatile.
    let via_virt = unsafe { ptr.add(16).cast::<u64>().read_volatile() };
    assert_eq!(via_virt, 0x1122_3344_5566_7788);
    // SAFETY: as above.
    unsafe {
        ptr.add(24)
            .cast::<u64>()
            .write_volatile(0x99aa_bbcc_ddee_ff00)
    };
    assert_eq!(m.read_u64(f + 24).expect("read"), 0x99aa_bbcc_ddee_ff00);
    assert_eq!(m.read_u32(f + 24).expect("read"), 0xddee_ff00);
    assert_eq!(m.read_u32(f + 28).expect("read"), 0x99aa_bbcc);
    m.flush(f, FRAME);
    m.flush(f + 60, 10); // straddles a line
}

#[test]
fn bad_phys_is_refused() {
    let Some(m) = small() else { return };
    let f = m.alloc_frame().expect("frame");
    assert!(matches!(m.read_u64(0), Err(HwError::BadPhys(0))));
    assert!(matches!(
        m.write_u64(u64::MAX - 3, 1),
        Err(HwError::BadPhys(_))
    ));
    assert!(matches!(m.read_u32(u64::MAX), Err(HwError::BadPhys(_))));
    // Misaligned.
    assert!(matches!(m.read_u64(f + 4), Err(HwError::BadPhys(_))));
    assert!(matches!(m.read_u32(f + 2), Err(HwError::BadPhys(_))));
    // An address just past the last chunk iommud owns.
    let last = {
        let g = m.read();
        let (&b, c) = g.chunks.iter().next_back().expect("a chunk");
        b + c.len as u64
    };
    assert!(matches!(m.read_u64(last), Err(HwError::BadPhys(p)) if p == last));
}

#[test]
fn regions_are_shared_through_their_fd() {
    let Some(m) = small() else { return };
    let r = m.alloc_region(100, 64).expect("region");
    assert_eq!(r.len, FRAME, "small source gives one whole 4 KiB page");
    assert_eq!(r.fd_offset, 0);
    assert_eq!(r.phys % FRAME, 0);
    assert_eq!(m.regions_live(), 1);
    // Zeroed.
    for off in (0..r.len).step_by(8) {
        assert_eq!(m.read_u64(r.phys + off).expect("read"), 0);
    }
    // Mapped as a client maps it.
    let client = iommu_abi::shm::Mapping::new(
        std::os::fd::AsFd::as_fd(&*r.fd),
        r.fd_offset,
        usize::try_from(r.len).expect("region length fits"),
    )
    .expect("client mapping");
    for i in 0..r.len / 8 {
        m.write_u64(r.phys + i * 8, 0x5a5a_0000_0000_0000 | i)
            .expect("write");
    }
    for i in 0..r.len / 8 {
        assert_eq!(
            client.read_u64(i as usize * 8),
            Some(0x5a5a_0000_0000_0000 | i)
        );
    }
    // The client's mapping (faulted in above) is the same physical page.
    assert_eq!(
        linuxhw::hugemem::virt_to_phys(client.as_ptr()).expect("pagemap"),
        r.phys
    );
    client
        .write_bytes(8, &0x600d_f00du32.to_le_bytes())
        .expect("in bounds");
    assert_eq!(m.read_u32(r.phys + 8).expect("read"), 0x600d_f00d);

    // Limits of the small source.
    assert!(matches!(
        m.alloc_region(FRAME + 1, 8),
        Err(HwError::NoMemory(_))
    ));
    assert!(matches!(m.alloc_region(64, 3), Err(HwError::NoMemory(_))));
    assert!(matches!(m.alloc_region(0, 8), Err(HwError::NoMemory(_))));
    // Regions are not table frames.
    m.free_frame(r.phys);
    assert_eq!(m.frames_in_use(), 0);

    m.free_region(&r);
    assert_eq!(m.regions_live(), 0);
    assert!(matches!(m.read_u64(r.phys), Err(HwError::BadPhys(_))));
    m.free_region(&r); // double free: logged, ignored
                       // The client's mapping outlives iommud's: memfd pages stay.
    assert_eq!(client.read_u64(0), Some(0x5a5a_0000_0000_0000));
    drop(client);
}

#[test]
fn frames_from_many_threads_are_distinct() {
    let Some(m) = small() else { return };
    let m = Arc::new(m);
    let per = 40;
    let all: Vec<u64> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..4)
            .map(|_| {
                let m = Arc::clone(&m);
                s.spawn(move || {
                    (0..per)
                        .map(|_| m.alloc_frame().expect("frame"))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        hs.into_iter()
            .flat_map(|h| h.join().expect("thread"))
            .collect()
    });
    let set: BTreeSet<u64> = all.iter().copied().collect();
    assert_eq!(set.len(), 4 * per);
}

#[test]
fn new_falls_back_when_hugepages_are_missing() {
    match HugeMem::new() {
        Ok(m) => {
            if m.source() == MemSource::Hugepages {
                assert_eq!(m.max_region(), HUGE_PAGE_SIZE as u64);
                let r = m
                    .alloc_region(HUGE_PAGE_SIZE as u64, 0x20_0000)
                    .expect("2 MiB");
                assert_eq!(r.phys % 0x20_0000, 0);
                m.write_u64(r.phys + 0x1f_fff8, 7)
                    .expect("write at the end");
                assert!(matches!(
                    m.alloc_region(HUGE_PAGE_SIZE as u64 + 1, 8),
                    Err(HwError::NoMemory("region larger than one hugepage"))
                ));
                m.free_region(&r);
            } else {
                assert_eq!(m.max_region(), FRAME);
            }
        }
        Err(e) => eprintln!("skipping: no physical memory source on this host: {e}"),
    }
}

/// Memory in a state directory (tmpfs here: 4 KiB pages): table pools and regions are
/// named files; a freed region's file goes, and the table files (with what was written
/// into them) stay after the memory object is gone, as after iommud exits.
#[test]
fn memory_in_a_state_dir_outlives_the_process_but_not_a_freed_region() {
    let dir = std::path::PathBuf::from(format!("/dev/shm/iommud-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir");
    let list = || {
        let mut v: Vec<String> = std::fs::read_dir(&dir)
            .expect("list")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let m = match HugeMem::in_dir(&dir, &dir, "iommud-1-".into()) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("skipping: 4 KiB physical memory unavailable here: {e}");
            let _ = std::fs::remove_dir_all(&dir);
            return;
        }
    };
    assert_eq!(
        m.source(),
        MemSource::SmallPages,
        "/dev/shm is tmpfs, not hugetlbfs"
    );
    assert_eq!(list(), ["iommud-1-0-tables"]);
    let f = m.alloc_frame().expect("frame");
    m.write_u64(f + 8, 0x5eed_0000_0000_0001).expect("write");
    let r = m
        .alloc_region(PAGE_SIZE as u64, PAGE_SIZE as u64)
        .expect("region");
    assert_eq!(list(), ["iommud-1-0-tables", "iommud-1-1-region"]);
    m.free_region(&r);
    drop(r);
    assert_eq!(
        list(),
        ["iommud-1-0-tables"],
        "a freed region's file is removed"
    );
    // Where in the table file the frame sits is not known here; its value is found in it.
    drop(m);
    let bytes = std::fs::read(dir.join("iommud-1-0-tables")).expect("table file kept");
    let found = bytes
        .chunks_exact(8)
        .any(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()) == 0x5eed_0000_0000_0001);
    assert!(
        found,
        "what iommud wrote into its tables is still in the file"
    );
    std::fs::remove_dir_all(&dir).expect("cleanup");
}
