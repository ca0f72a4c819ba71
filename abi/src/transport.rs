//! Unix `SOCK_SEQPACKET` sockets with file-descriptor passing (`SCM_RIGHTS`),
//! the Linux (and sim) transport of the protocol in [`crate::proto`].

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

/// Most descriptors one message carries.
pub const MAX_FDS: usize = 4;

/// A connected or listening seqpacket socket.
#[derive(Debug)]
pub struct SeqPacket {
    fd: OwnedFd,
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn sockaddr(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("socket path too long: {}", path.display()),
        ));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    Ok((addr, len as libc::socklen_t))
}

fn socket() -> io::Result<OwnedFd> {
    // SAFETY: plain FFI call; the result is checked.
    let fd =
        cvt(unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl SeqPacket {
    /// Connects to a listening socket at `path`.
    pub fn connect(path: &Path) -> io::Result<SeqPacket> {
        let fd = socket()?;
        let (addr, len) = sockaddr(path)?;
        // SAFETY: `addr` is a valid sockaddr_un of `len` bytes.
        cvt(unsafe {
            libc::connect(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_un).cast(),
                len,
            )
        })
        .map_err(|e| io::Error::new(e.kind(), format!("connect {}: {e}", path.display())))?;
        Ok(SeqPacket { fd })
    }

    /// Binds and listens at `path` (removing a stale socket file first).
    pub fn listen(path: &Path) -> io::Result<SeqPacket> {
        let _ = std::fs::remove_file(path);
        let fd = socket()?;
        let (addr, len) = sockaddr(path)?;
        // SAFETY: `addr` is a valid sockaddr_un of `len` bytes.
        cvt(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_un).cast(),
                len,
            )
        })
        .map_err(|e| io::Error::new(e.kind(), format!("bind {}: {e}", path.display())))?;
        // SAFETY: plain FFI call on our socket.
        cvt(unsafe { libc::listen(fd.as_raw_fd(), 64) })?;
        Ok(SeqPacket { fd })
    }

    /// Waits up to `timeout` for a connection; `Ok(None)` on timeout.
    pub fn accept_timeout(&self, timeout: Duration) -> io::Result<Option<SeqPacket>> {
        let mut p = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut p, 1, timeout.as_millis() as libc::c_int) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(None)
            } else {
                Err(e)
            };
        }
        if n == 0 {
            return Ok(None);
        }
        // SAFETY: accept on our listening socket; the new fd is checked and owned.
        let fd = cvt(unsafe {
            libc::accept4(
                self.fd.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        })?;
        // SAFETY: a fresh descriptor nobody else owns.
        Ok(Some(SeqPacket {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        }))
    }

    /// Sends one datagram with descriptors attached.
    pub fn send(&self, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        if fds.len() > MAX_FDS {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        let mut iov = libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        };
        let mut cbuf = [0u64; 8]; // 64 bytes, aligned, enough for MAX_FDS ints
                                  // SAFETY: msghdr is plain old data; all-zero is valid.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if !fds.is_empty() {
            let bytes = std::mem::size_of_val(fds) as u32;
            // SAFETY: CMSG_SPACE is a pure size computation.
            let space = unsafe { libc::CMSG_SPACE(bytes) } as usize;
            msg.msg_control = cbuf.as_mut_ptr().cast();
            msg.msg_controllen = space as _;
            // SAFETY: msg_control points at `space` (≤ 64) bytes of `cbuf`, so
            // the first header and its data fit; we write within them only.
            unsafe {
                let c = libc::CMSG_FIRSTHDR(&msg);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN(bytes) as _;
                let p = libc::CMSG_DATA(c).cast::<RawFd>();
                for (i, f) in fds.iter().enumerate() {
                    p.add(i).write_unaligned(f.as_raw_fd());
                }
            }
        }
        // SAFETY: msg points at live buffers for the duration of the call.
        let n = unsafe { libc::sendmsg(self.fd.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Receives one datagram into `buf`; returns its length (0 = peer closed)
    /// and the descriptors that came with it. A datagram longer than `buf` is
    /// reported as `InvalidData` (it was truncated).
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let mut cbuf = [0u64; 8];
        // SAFETY: msghdr is plain old data; all-zero is valid.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&cbuf) as _;
        let n = loop {
            // SAFETY: msg points at live buffers we own for the duration of the call.
            let n = unsafe { libc::recvmsg(self.fd.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
            if n >= 0 {
                break n as usize;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        };
        let mut fds = Vec::new();
        // SAFETY: walking the control messages the kernel wrote into `cbuf`,
        // with the libc macros that bound every step by msg_controllen.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(c).cast::<RawFd>();
                    let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                        / std::mem::size_of::<RawFd>();
                    for i in 0..count {
                        fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        if msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "datagram or its descriptors truncated",
            ));
        }
        Ok((n, fds))
    }

    /// The peer's identity as the kernel recorded it when the connection was
    /// made (`SO_PEERCRED`): `(uid, gid, pid)`. Nothing the peer sends can
    /// change it.
    pub fn peer_cred(&self) -> io::Result<(u32, u32, i32)> {
        let mut cred = libc::ucred {
            pid: 0,
            uid: 0,
            gid: 0,
        };
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `cred`, which we own.
        cvt(unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                (&mut cred as *mut libc::ucred).cast(),
                &mut len,
            )
        })?;
        Ok((cred.uid, cred.gid, cred.pid))
    }

    /// Sets a receive timeout (None = block forever).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        let tv = match t {
            Some(d) => libc::timeval {
                tv_sec: d.as_secs() as libc::time_t,
                tv_usec: d.subsec_micros() as libc::suseconds_t,
            },
            None => libc::timeval {
                tv_sec: 0,
                tv_usec: 0,
            },
        };
        // SAFETY: setsockopt with a valid timeval of the stated size.
        cvt(unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn datagrams_and_descriptors_cross_a_socket() {
        let dir = std::env::temp_dir().join(format!("libdma-t-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s");
        let l = SeqPacket::listen(&path).unwrap();
        let t = std::thread::spawn(move || {
            let c = l.accept_timeout(Duration::from_secs(5)).unwrap().unwrap();
            let mut buf = [0u8; 256];
            let (n, fds) = c.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], b"hello");
            assert_eq!(fds.len(), 1);
            let m = crate::shm::Mapping::new(fds[0].as_fd(), 0, 4096).unwrap();
            assert_eq!(m.read_u64(0), Some(42));
            let (n, _) = c.recv(&mut buf).unwrap();
            assert_eq!(n, 0, "peer closed");
        });
        let c = SeqPacket::connect(&path).unwrap();
        let fd = crate::shm::memfd("t", 4096).unwrap();
        crate::shm::Mapping::new(fd.as_fd(), 0, 4096)
            .unwrap()
            .write_u64(0, 42)
            .unwrap();
        c.send(b"hello", &[fd.as_fd()]).unwrap();
        drop(c);
        t.join().unwrap();
        let _ = std::fs::remove_dir_all(dir);
    }
}
