//! Helpers for the integration tests: start an `iommud` on the sim platform.
#![allow(dead_code)]

use libdma::Control;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running sim iommud, stopped on drop.
pub struct Daemon {
    pub child: Child,
    pub socket: PathBuf,
    dir: PathBuf,
}

impl Daemon {
    pub fn start(name: &str, extra: &[&str]) -> Daemon {
        let dir = std::env::temp_dir().join(format!("iommud-test-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("iommud.sock");
        // The tests of strategies run every strategy, so unless a test
        // brings its own policy the administrator here grants delegated
        // trust (the magazine strategy) to every device.
        let mut policy = Vec::new();
        if !extra.contains(&"--config") {
            let cfg = dir.join("iommud.toml");
            std::fs::write(&cfg, "[default]\ntrust = \"delegated\"\n").unwrap();
            policy.push("--config".to_string());
            policy.push(cfg.display().to_string());
        }
        let child = Command::new(env!("CARGO_BIN_EXE_iommud"))
            .args(["--platform", "sim", "--socket"])
            .arg(&socket)
            .args(&policy)
            .args(extra)
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn iommud");
        let t = Instant::now();
        while Control::connect(&socket).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "iommud did not come up"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Daemon { child, socket, dir }
    }

    pub fn ctl(&self) -> Control {
        Control::connect(&self.socket).unwrap()
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The directory the daemon's files live in (socket, policy, device files).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The sim machine, as a device would see it.
    pub fn machine(&self) -> vtd::sim::SimMachine {
        use std::os::fd::AsFd;
        let (m, s, _) = self.ctl().sim_info().unwrap();
        vtd::sim::SimMachine::open(m.as_fd(), s.as_fd()).unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(c) = Control::connect(&self.socket) {
            let _ = c.shutdown();
        }
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Parses `key value` text into a lookup.
pub fn kv(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == key).then(|| v.trim().parse().ok())?
        })
        .unwrap_or_else(|| panic!("no numeric key {key} in:\n{text}"))
}

/// What a re-executed client process was asked to do (`IOMMUD_TEST_CLIENT`:
/// `socket,bdf,strategy,flush[,extra...]`), with its domain attached and the
/// simulated machine opened as the device.
pub struct Client {
    pub socket: PathBuf,
    pub bdf: u16,
    pub strategy: libdma::Strategy,
    pub flush: libdma::FlushPolicy,
    /// Fields after the fourth.
    pub extra: Vec<String>,
    pub dom: std::sync::Arc<libdma::DmaDomain>,
    pub dev: std::sync::Arc<vtd::sim::SimMachine>,
}

impl Client {
    /// `None` when not run as a client process (the variable is unset).
    pub fn from_env() -> Option<Client> {
        use std::os::fd::AsFd;
        let spec = std::env::var("IOMMUD_TEST_CLIENT").ok()?;
        let f: Vec<&str> = spec.split(',').collect();
        let socket = PathBuf::from(f[0]);
        let bdf: u16 = f[1].parse().unwrap();
        let strategy = libdma::Strategy::parse(f[2]).unwrap();
        let flush = libdma::FlushPolicy::parse(f[3]).unwrap();
        let dom =
            std::sync::Arc::new(libdma::DmaDomain::connect(&socket, bdf, strategy, flush).unwrap());
        let (m, s, _) = Control::connect(&socket).unwrap().sim_info().unwrap();
        let dev = std::sync::Arc::new(vtd::sim::SimMachine::open(m.as_fd(), s.as_fd()).unwrap());
        Some(Client {
            socket,
            bdf,
            strategy,
            flush,
            extra: f[4..].iter().map(|x| x.to_string()).collect(),
            dom,
            dev,
        })
    }
}

/// The device writes `pattern` at `iova`, the CPU finds it at `off` in `buf`,
/// writes its complement back, and the device reads that at `iova`.
pub fn device_round_trip(
    dev: &vtd::sim::SimMachine,
    bdf: u16,
    iova: u64,
    buf: &libdma::DmaBuffer,
    off: usize,
    pattern: &[u8],
) {
    let mut back = vec![0u8; pattern.len()];
    dev.dma_write(bdf, iova, pattern)
        .unwrap_or_else(|e| panic!("device write to {iova:#x}: {e:?}"));
    buf.read(off, &mut back).unwrap();
    assert_eq!(back, pattern, "bytes the device wrote through the IOMMU");
    let inverse: Vec<u8> = pattern.iter().map(|b| !b).collect();
    buf.write(off, &inverse).unwrap();
    dev.dma_read(bdf, iova, &mut back).unwrap();
    assert_eq!(back, inverse, "bytes the device read");
}
