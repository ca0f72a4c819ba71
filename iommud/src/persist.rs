//! iommud's state directory: where the memory the unit may reach lives, in
//! named files that outlive the process (docs/ARCHITECTURE.md, "Stop, crash
//! and restart").
//!
//! On Linux every table-frame pool (root table, context tables, page tables,
//! the invalidation queue and its status word) and every client region (DMA
//! pools, leaf-table arenas) is a file `iommud-<pid>-<n>-tables` or
//! `iommud-<pid>-<n>-region` in this directory, on hugetlbfs when the
//! directory is there (else tmpfs with the pages locked while iommud lives).
//! A region's file is removed when the region is freed (after its device was
//! blocked); table pools are never removed by the iommud that made them, so
//! after an orderly stop or a `kill -9` the unit, still translating, reaches
//! only memory that no one else can be given.
//!
//! The next iommud takes the directory (an exclusive `flock` on `lock`: one
//! iommud per directory), points the unit at a root of its own while
//! translation stays on and invalidates globally (`crate::handover`), and
//! only then removes the files a previous iommud left ([`StateDir::release_stale`]).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// hugetlbfs's `statfs` magic (Linux `include/uapi/linux/magic.h`).
const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

/// Files a stale-file scan looks at, at most (the directory is root-only, but
/// a bound costs nothing).
const MAX_FILES: usize = 1 << 16;

/// True if `dir` is on hugetlbfs.
pub fn on_hugetlbfs(dir: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: `st` is a plain out-parameter; `c` is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path pointer and out-pointer; the result is checked.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return false;
    }
    st.f_type as i64 == HUGETLBFS_MAGIC
}

/// The default state directory: `iommud/` on the first hugetlbfs mount
/// (`/proc/mounts`), else `/dev/shm/iommud`.
pub fn default_dir() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, at, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "hugetlbfs").then(|| PathBuf::from(at).join("iommud"))
        })
        .next()
        .unwrap_or_else(|| PathBuf::from("/dev/shm/iommud"))
}

/// A taken state directory.
#[derive(Debug)]
pub struct StateDir {
    dir: PathBuf,
    /// Where the shared pages go: the directory itself on tmpfs, else
    /// `/dev/shm/<name>-pages` (hugetlbfs holds only 2 MiB files).
    pages: PathBuf,
    /// Held (with an exclusive flock) for the life of the process.
    _lock: File,
    /// Memory files a previous iommud left, and their sizes.
    stale: Vec<(PathBuf, u64)>,
}

impl StateDir {
    /// Creates (mode 0700) or opens `dir`, refuses one that is not a
    /// directory owned by this user with no access for others, takes its
    /// lock, and lists the memory files a previous iommud left.
    pub fn open(dir: &Path) -> Result<StateDir, String> {
        let say =
            |what: &str, e: std::io::Error| format!("state dir {}: {what}: {e}", dir.display());
        std::fs::create_dir_all(dir).map_err(|e| say("create", e))?;
        let md = std::fs::symlink_metadata(dir).map_err(|e| say("stat", e))?;
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        if !md.is_dir() || md.uid() != me {
            return Err(format!(
                "state dir {}: not a directory owned by uid {me}",
                dir.display()
            ));
        }
        if md.mode() & 0o077 != 0 {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| say("chmod 0700", e))?;
        }
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(dir.join("lock"))
            .map_err(|e| say("open lock", e))?;
        // SAFETY: flock on our own open fd; the result is checked.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(format!(
                "state dir {}: another iommud holds it ({})",
                dir.display(),
                std::io::Error::last_os_error()
            ));
        }
        let pages = if on_hugetlbfs(dir) {
            let base = dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "iommud".into());
            PathBuf::from("/dev/shm").join(format!("{base}-pages"))
        } else {
            dir.to_path_buf()
        };
        if pages != dir {
            std::fs::create_dir_all(&pages).map_err(|e| say("create the pages directory", e))?;
            std::fs::set_permissions(&pages, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| say("chmod 0700 the pages directory", e))?;
        }
        let mut stale = Vec::new();
        for d in [dir, pages.as_path()] {
            for e in std::fs::read_dir(d)
                .map_err(|e| say("list", e))?
                .take(MAX_FILES)
                .flatten()
            {
                let name = e.file_name();
                let name = name.to_string_lossy();
                let ours = name.starts_with("iommud-")
                    && ["-tables", "-region", "-ledger", "-published", "-client"]
                        .iter()
                        .any(|k| name.ends_with(k));
                let Ok(m) = e.metadata() else { continue };
                if ours && m.is_file() && !stale.iter().any(|(p, _)| *p == e.path()) {
                    stale.push((e.path(), m.len()));
                }
            }
        }
        stale.sort();
        Ok(StateDir {
            dir: dir.to_path_buf(),
            pages,
            _lock: lock,
            stale,
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Where shared pages go.
    pub fn pages(&self) -> &Path {
        &self.pages
    }

    /// The prefix of this process's memory files.
    pub fn prefix(&self) -> String {
        format!("iommud-{}-", std::process::id())
    }

    /// Memory files a previous iommud left: (count, bytes).
    pub fn stale(&self) -> (usize, u64) {
        (self.stale.len(), self.stale.iter().map(|s| s.1).sum())
    }

    /// The ledgers a previous iommud left (file names): the domains a
    /// restart may adopt.
    pub fn ledgers(&self) -> Vec<String> {
        self.stale
            .iter()
            .filter_map(|(p, _)| p.file_name()?.to_str().map(str::to_string))
            .filter(|n| n.ends_with("-ledger"))
            .collect()
    }

    /// Keeps a previous iommud's file (adopted): [`StateDir::release_stale`]
    /// leaves it alone.
    pub fn keep(&mut self, name: &str) {
        self.stale
            .retain(|(p, _)| p.file_name().and_then(|n| n.to_str()) != Some(name));
    }

    /// Removes the files a previous iommud left. Call only once the unit
    /// points at this iommud's own root table and has been invalidated
    /// globally: before that, the unit may still walk them. Returns (files,
    /// bytes) removed.
    pub fn release_stale(&mut self) -> (usize, u64) {
        let (mut n, mut bytes) = (0, 0);
        for (p, len) in self.stale.drain(..) {
            match std::fs::remove_file(&p) {
                Ok(()) => {
                    n += 1;
                    bytes += len;
                }
                Err(e) => crate::unit::log::warn(&format!("removing {}: {e}", p.display())),
            }
        }
        (n, bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("iommud-persist-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn stale_files_are_listed_and_released_and_the_lock_is_exclusive() {
        let d = temp("stale");
        {
            let s = StateDir::open(&d).unwrap();
            assert_eq!(s.stale(), (0, 0));
            let mode = std::fs::metadata(&d).unwrap().mode() & 0o777;
            assert_eq!(mode, 0o700);
            // A second iommud on the same directory is refused while the first lives.
            let e = StateDir::open(&d).unwrap_err();
            assert!(e.contains("another iommud"), "{e}");
        }
        std::fs::write(d.join("iommud-7-0-tables"), vec![0u8; 4096]).unwrap();
        std::fs::write(d.join("iommud-7-1-region"), vec![0u8; 8192]).unwrap();
        std::fs::write(d.join("notes.txt"), b"not ours").unwrap();
        std::fs::write(d.join("iommud-7-2-ledger"), vec![0u8; 4096]).unwrap();
        std::fs::write(d.join("iommud-7-3-published"), vec![0u8; 4096]).unwrap();
        let mut s = StateDir::open(&d).unwrap();
        assert_eq!(s.pages(), d.as_path(), "on tmpfs the pages live beside");
        assert_eq!(s.ledgers(), vec!["iommud-7-2-ledger".to_string()]);
        assert_eq!(s.stale(), (4, 20480));
        // What a restart adopted stays; the rest goes.
        s.keep("iommud-7-2-ledger");
        s.keep("iommud-7-3-published");
        assert_eq!(s.stale(), (2, 12288));
        assert_eq!(s.release_stale(), (2, 12288));
        assert!(!d.join("iommud-7-0-tables").exists());
        assert!(d.join("iommud-7-2-ledger").exists(), "kept");
        assert!(
            d.join("notes.txt").exists(),
            "a file not ours is left alone"
        );
        drop(s);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_directory_open_to_others_is_closed() {
        let d = temp("mode");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).unwrap();
        let s = StateDir::open(&d).unwrap();
        assert_eq!(std::fs::metadata(&d).unwrap().mode() & 0o777, 0o700);
        drop(s);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
