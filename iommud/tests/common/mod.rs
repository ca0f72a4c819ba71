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
        let child = Command::new(env!("CARGO_BIN_EXE_iommud"))
            .args(["--platform", "sim", "--socket"])
            .arg(&socket)
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
