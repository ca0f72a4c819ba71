//! A device that faults without end: iommud logs its first faults of each
//! second and a summary for the rest, blocks it past the configured rate
//! (quarantined: no DMA, no fault records), keeps its first and latest
//! faults in `faults`, and still reports another device's single fault,
//! while a healthy client keeps moving verified bytes.

mod common;

use common::{device_round_trip, kv, Daemon};
use libdma::{Dir, DmaDomain, FlushPolicy, Strategy};
use std::time::{Duration, Instant};

const A: u16 = 0x08;
const B: u16 = 0x10;
const C: u16 = 0x18;

#[test]
fn a_fault_storm_is_summarised_blocked_and_hides_no_other_fault() {
    let cfg_dir = std::env::temp_dir().join(format!("iommud-storm-{}", std::process::id()));
    std::fs::create_dir_all(&cfg_dir).unwrap();
    let cfg = cfg_dir.join("iommud.toml");
    std::fs::write(
        &cfg,
        "fault_block_per_second = 200\n[default]\ntrust = \"delegated\"\n",
    )
    .unwrap();
    let cfg = cfg.display().to_string();
    let d = Daemon::start_logged("storm", &["--config", &cfg]);
    let dev = d.machine();
    // The stormer's own, valid mapping (to see it blocked later).
    let a = DmaDomain::connect(d.socket(), A, Strategy::Global, FlushPolicy::Strict).unwrap();
    let abuf = a.alloc(4096).unwrap();
    let aiova = a.map(abuf.phys, 4096, Dir::Bidirectional).unwrap();
    dev.dma_write(A, aiova, &[1; 8]).unwrap();
    // A healthy client on C.
    let c = DmaDomain::connect(d.socket(), C, Strategy::Magazine, FlushPolicy::PerCore).unwrap();
    let cbuf = c.alloc(4096).unwrap();
    // B is attached and will fault once.
    let _b = DmaDomain::connect(d.socket(), B, Strategy::Global, FlushPolicy::Strict).unwrap();

    // The storm: A reads an unmapped IOVA as fast as it can.
    let t0 = Instant::now();
    let mut healthy = 0u64;
    let mut stormed = 0u64;
    // Blocked means: the fault book says so and the quarantine is in place.
    let blocked = || {
        let text = d.ctl().read("faults").unwrap();
        text.lines()
            .any(|l| l.starts_with("device bdf=00:01.0 ") && l.ends_with("blocked=yes"))
            && kv(&d.ctl().read("domains/00:01.0/stats").unwrap(), "blocked") == 1
    };
    while !blocked() {
        for _ in 0..200 {
            let mut x = [0u8; 8];
            let _ = dev.dma_read(A, 0x90_0000, &mut x);
            stormed += 1;
        }
        let iova = c.map(cbuf.phys, 4096, Dir::Bidirectional).unwrap();
        device_round_trip(&dev, C, iova, &cbuf, 0, &[healthy as u8; 16]);
        c.unmap(iova, 4096).unwrap();
        healthy += 1;
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "not blocked after {stormed} faulting reads:\n{}",
            d.ctl().read("faults").unwrap()
        );
    }
    // Blocked: its own valid mapping no longer reaches memory.
    let mut x = [0u8; 8];
    assert!(
        dev.dma_read(A, aiova, &mut x).is_err(),
        "blocked device still reads"
    );
    let st = a.read_path("domains/00:01.0/stats").unwrap();
    assert_eq!(kv(&st, "blocked"), 1, "{st}");
    // The storm's last records, taken before the quarantine landed, are
    // drained within a tick or two (FSTS, VT-d 3.x §10.4.9, back to 0);
    // after that the stormer records nothing however much it faults, and
    // B's single fault is recorded and reported.
    let t = Instant::now();
    while dev.read32(0x34) != 0 {
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "fault records not drained"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let recorded = dev.counters().faults_recorded;
    for _ in 0..2000 {
        let _ = dev.dma_read(A, 0x90_0000, &mut x);
    }
    assert_eq!(
        dev.counters().faults_recorded,
        recorded,
        "the quarantined device still records"
    );
    assert!(dev.dma_read(B, 0x70_0000, &mut x).is_err());
    let t = Instant::now();
    loop {
        let f = d.ctl().read("faults").unwrap();
        if f.contains("fault bdf=00:02.0 iova=0x700000 access=read") {
            assert!(f.contains("device bdf=00:02.0 faults=1 blocked=no"), "{f}");
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "B's fault not reported:\n{f}\nmodel: {:?}\nlog:\n{}",
            dev.counters(),
            d.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // The healthy client kept moving verified bytes throughout, and still does.
    assert!(healthy > 0);
    let iova = c.map(cbuf.phys, 4096, Dir::Bidirectional).unwrap();
    device_round_trip(&dev, C, iova, &cbuf, 0, &[0x77; 16]);
    c.unmap(iova, 4096).unwrap();
    // The log: a handful of A's faults one by one per second, then summaries.
    std::thread::sleep(Duration::from_millis(1100));
    let _ = d.ctl().read("stats"); // one more tick has run
    let log = d.log();
    let one_by_one = log.matches("DMA fault bdf=00:01.0").count() as u64;
    let secs = t0.elapsed().as_secs() + 2;
    assert!(
        one_by_one <= iommud::faults::LOG_PER_SECOND * secs,
        "{one_by_one} lines for A's faults in {secs} s:\n{log}"
    );
    assert!(log.contains("blocking the device"), "{log}");
    drop(a);
    let _ = std::fs::remove_dir_all(&cfg_dir);
}
