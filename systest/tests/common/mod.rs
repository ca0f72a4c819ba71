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
        Self::start_with(name, extra, false, None, &[])
    }

    /// A logged daemon whose descriptor limit (RLIMIT_NOFILE) is `nofile`.
    pub fn start_limited(name: &str, extra: &[&str], nofile: u64) -> Daemon {
        Self::start_with(name, extra, true, Some(nofile), &[])
    }

    /// The daemon's open descriptors and resident anonymous memory (KiB,
    /// `RssAnon`: its heap and stacks; the sim's physical memory is a shared
    /// file whose pages count as `RssShmem` as the allocator touches them),
    /// from /proc.
    pub fn fds_and_rss(&self) -> (usize, u64) {
        let pid = self.child.id();
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let rss = status
            .lines()
            .find_map(|l| l.strip_prefix("RssAnon:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0);
        (fds, rss)
    }

    /// CPU time (user + system, in clock ticks) the daemon used so far.
    pub fn cpu_ticks(&self) -> u64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // Fields after the command's closing parenthesis; utime and stime are 14 and 15.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<u64> = rest
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)
    }

    /// Like [`Daemon::start`], with the daemon's stderr kept in
    /// [`Daemon::log`] instead of the test's.
    pub fn start_logged(name: &str, extra: &[&str]) -> Daemon {
        Self::start_with(name, extra, true, None, &[])
    }

    /// A logged daemon whose heap is one malloc arena (`MALLOC_ARENA_MAX=1`):
    /// its memory then measures what iommud keeps, not how many per-thread
    /// arenas glibc happened to open under load.
    pub fn start_one_arena(name: &str) -> Daemon {
        Self::start_with(name, &[], true, None, &[("MALLOC_ARENA_MAX", "1")])
    }

    /// What the daemon wrote to stderr (a logged daemon).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("iommud.log")).unwrap_or_default()
    }

    fn start_with(
        name: &str,
        extra: &[&str],
        logged: bool,
        nofile: Option<u64>,
        env: &[(&str, &str)],
    ) -> Daemon {
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
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_systest-iommud"));
        cmd.envs(env.iter().copied());
        if let Some(n) = nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: between fork and exec, setrlimit only changes this
            // child's own limit; it allocates nothing.
            unsafe {
                cmd.pre_exec(move || {
                    let l = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &l) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd
            .args(["--platform", "sim", "--socket"])
            .arg(&socket)
            .args(&policy)
            .args(extra)
            .stderr(if logged {
                Stdio::from(std::fs::File::create(dir.join("iommud.log")).unwrap())
            } else {
                Stdio::inherit()
            })
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

/// A client that speaks the protocol by hand, to do what libdma never does
/// (the adversarial tests): choose the proof it passes, write anything into
/// its client page, send any request.
pub struct RawClient {
    pub sock: libdma::transport::SeqPacket,
    seq: u32,
    /// Attach reply: the published page (read-only) and the client page.
    pub published: Option<libdma::shm::Mapping>,
    pub client: Option<libdma::shm::Mapping>,
    /// The published page's descriptor (to try to get write access).
    pub published_fd: Option<std::os::fd::OwnedFd>,
    /// How many descriptors the Attach reply carried.
    pub attach_fds: usize,
}

/// A reply, or the server's error with its message.
pub type RawResult = Result<([u64; 5], Vec<u8>), (libdma::proto::ErrorCode, String)>;

impl RawClient {
    pub fn connect(socket: &Path) -> RawClient {
        let sock = libdma::transport::SeqPacket::connect(socket).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut c = RawClient {
            sock,
            seq: 0,
            published: None,
            client: None,
            published_fd: None,
            attach_fds: 0,
        };
        c.call(&libdma::proto::Request::Hello {
            version: u64::from(libdma::proto::VERSION),
        })
        .unwrap();
        c
    }

    /// Sends `req` with `fds`, returns the reply and its descriptors.
    pub fn call_fds(
        &mut self,
        req: &libdma::proto::Request,
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> (RawResult, Vec<std::os::fd::OwnedFd>) {
        self.seq = self.seq.wrapping_add(1);
        self.sock.send(&req.encode(self.seq), fds).unwrap();
        let mut buf = vec![0u8; libdma::proto::MAX_MESSAGE];
        loop {
            let (n, got) = self.sock.recv(&mut buf).unwrap();
            assert!(n > 0, "iommud closed the connection");
            let r = libdma::proto::Reply::decode(&buf[..n]).unwrap();
            if r.seq != self.seq {
                continue;
            }
            let res = match r.result {
                Ok(a) => Ok((a, r.payload)),
                Err(c) => Err((c, String::from_utf8_lossy(&r.payload).into_owned())),
            };
            return (res, got);
        }
    }

    pub fn call(&mut self, req: &libdma::proto::Request) -> RawResult {
        self.call_fds(req, &[]).0
    }

    /// One-way message.
    pub fn post(&mut self, req: &libdma::proto::Request) {
        self.seq = self.seq.wrapping_add(1);
        self.sock.send(&req.encode(self.seq), &[]).unwrap();
    }

    /// Attaches with `proof` (or none); maps the pages it is given.
    pub fn attach(
        &mut self,
        bdf: u16,
        strategy: libdma::Strategy,
        flush: libdma::FlushPolicy,
        proof: Option<std::os::fd::BorrowedFd<'_>>,
    ) -> RawResult {
        let fds: Vec<_> = proof.into_iter().collect();
        let (r, mut got) = self.call_fds(
            &libdma::proto::Request::Attach {
                bdf,
                strategy,
                flush,
            },
            &fds,
        );
        if r.is_ok() {
            use std::os::fd::AsFd;
            self.attach_fds = got.len();
            let p = got.remove(0);
            let c = got.remove(0);
            self.published = Some(
                libdma::shm::Mapping::new_readonly(p.as_fd(), 0, libdma::shared::PUBLISHED_LEN)
                    .unwrap(),
            );
            self.client =
                Some(libdma::shm::Mapping::new(c.as_fd(), 0, libdma::shared::CLIENT_LEN).unwrap());
            self.published_fd = Some(p);
        }
        r
    }

    /// Allocates a pool: (phys, CPU mapping).
    pub fn pool(&mut self, bytes: u64) -> (u64, libdma::shm::Mapping) {
        use std::os::fd::AsFd;
        let (r, fds) = self.call_fds(&libdma::proto::Request::AllocPool { bytes }, &[]);
        let (a, _) = r.unwrap();
        let m = libdma::shm::Mapping::new(fds[0].as_fd(), a[1], a[2] as usize).unwrap();
        (a[0], m)
    }

    pub fn map(&mut self, phys: u64, len: u64, dir: libdma::Dir) -> RawResult {
        self.call(&libdma::proto::Request::Map {
            phys,
            len,
            dir,
            va: 0,
        })
    }

    pub fn unmap(&mut self, iova: u64, len: u64) -> RawResult {
        self.call(&libdma::proto::Request::Unmap { iova, len })
    }
}

/// The proof of ownership of `bdf` a root process can open for a sim daemon.
pub fn proof(d: &Daemon, bdf: u16) -> std::os::fd::OwnedFd {
    libdma::proof::open(bdf, Some(d.socket())).unwrap()
}

/// Starts a sim daemon with `policy` as its configuration file.
pub fn daemon_with_policy(name: &str, policy: &str, extra: &[&str]) -> Daemon {
    let dir = std::env::temp_dir().join(format!("iommud-policy-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("iommud.toml");
    std::fs::write(&cfg, policy).unwrap();
    let cfg = cfg.display().to_string();
    let mut args = vec!["--config", cfg.as_str()];
    args.extend_from_slice(extra);
    Daemon::start(name, &args)
}

/// Writes a test's figures to `target/timers/<name>` (next to the
/// workspace's build output), and says where.
pub fn write_result(name: &str, text: &str) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/timers");
    if std::fs::create_dir_all(&dir).is_ok() && std::fs::write(dir.join(name), text).is_ok() {
        println!("figures written to {}", dir.join(name).display());
    }
}

/// The `key value` statistics of `dom`'s device `bdf` (`domains/<bdf>/stats`).
pub fn domain_stats(dom: &libdma::DmaDomain, bdf: u16) -> String {
    dom.read_path(&format!("domains/{}/stats", iommu_abi::Bdf(bdf)))
        .unwrap()
}

/// Pins the calling thread to `cpu` (best effort).
pub fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes inside it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}
