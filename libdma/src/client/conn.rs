//! The connection to iommud ([`Conn`], one blocking round trip at a time)
//! and [`Control`], the path tree and daemon control.

use super::*;

pub(super) struct Conn {
    pub(super) link: Box<dyn Transport>,
    seq: u32,
    buf: Vec<u8>,
    /// The socket connected to, if any (where to look for the sim's device files).
    #[cfg_attr(target_os = "redox", allow(dead_code))]
    pub(super) path: Option<std::path::PathBuf>,
}

impl Conn {
    #[cfg(not(target_os = "redox"))]
    pub(super) fn connect(path: &Path) -> Result<Conn> {
        let mut c = Conn::over(Box::new(crate::transport::SeqPacket::connect(path)?))?;
        c.path = Some(path.to_path_buf());
        Ok(c)
    }

    /// A connection over any carrier (see [`crate::carrier`]).
    pub(super) fn over(link: Box<dyn Transport>) -> Result<Conn> {
        let mut c = Conn {
            link,
            seq: 0,
            buf: vec![0; MAX_MESSAGE],
            path: None,
        };
        c.call(&Request::Hello {
            version: u64::from(VERSION),
        })?;
        Ok(c)
    }

    /// One blocking round trip.
    pub(super) fn call(&mut self, req: &Request) -> Result<(Reply, Vec<Share>)> {
        self.call_with_fds(req, &[])
    }

    /// One blocking round trip passing `fds` with the request.
    pub(super) fn call_with_fds(
        &mut self,
        req: &Request,
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> Result<(Reply, Vec<Share>)> {
        self.seq = self.seq.wrapping_add(1);
        let mut got = self
            .link
            .call_with_fds(&req.encode(self.seq), fds, &mut self.buf)?;
        loop {
            let (n, shares) = got;
            if n == 0 {
                return Err(Error::Dead);
            }
            let r = Reply::decode(&self.buf[..n])?;
            // Sequence 0 is iommud refusing the connection itself (its
            // connection cap, this identity's quota): the reason, then EOF.
            if r.seq == 0 && r.seq != self.seq {
                if let Err(code) = r.result {
                    return Err(Error::Server {
                        code,
                        msg: String::from_utf8_lossy(&r.payload).into_owned(),
                    });
                }
            }
            if r.seq != self.seq {
                got = self.link.recv(&mut self.buf)?;
                continue; // a stale answer; ours follows
            }
            return match r.result {
                Ok(_) => Ok((r, shares)),
                Err(code) => Err(Error::Server {
                    code,
                    msg: String::from_utf8_lossy(&r.payload).into_owned(),
                }),
            };
        }
    }

    pub(super) fn args(&mut self, req: &Request) -> Result<[u64; 5]> {
        let (r, _) = self.call(req)?;
        r.result.map_err(|code| Error::Server {
            code,
            msg: String::new(),
        })
    }

    /// One-way message.
    pub(super) fn post(&mut self, req: &Request) -> Result<()> {
        self.seq = self.seq.wrapping_add(1);
        self.link.post(&req.encode(self.seq))?;
        Ok(())
    }
}

/// Control connection: the path tree and daemon control.
pub struct Control {
    conn: Mutex<Conn>,
}

impl Control {
    /// Connects to iommud.
    #[cfg(not(target_os = "redox"))]
    pub fn connect(socket: &Path) -> Result<Control> {
        Ok(Control {
            conn: Mutex::new(Conn::connect(socket)?),
        })
    }

    /// A control connection over any carrier.
    pub fn over(link: Box<dyn Transport>) -> Result<Control> {
        Ok(Control {
            conn: Mutex::new(Conn::over(link)?),
        })
    }

    pub(super) fn conn(&self) -> MutexGuard<'_, Conn> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads a path, e.g. `/scheme/iommu/stats`.
    pub fn read(&self, path: &str) -> Result<String> {
        let (r, _) = self.conn().call(&Request::ReadPath { path: path.into() })?;
        Ok(String::from_utf8_lossy(&r.payload).into_owned())
    }

    /// Writes a path.
    pub fn write(&self, path: &str, value: &str) -> Result<()> {
        self.conn().call(&Request::WritePath {
            path: path.into(),
            value: value.into(),
        })?;
        Ok(())
    }

    /// Stops the daemon.
    pub fn shutdown(&self) -> Result<()> {
        self.conn().call(&Request::Shutdown)?;
        Ok(())
    }

    /// Sim platform: the machine's (memory fd, state fd, memory bytes), so a
    /// test can act as a device with `vtd::sim::SimMachine::open`.
    pub fn sim_info(&self) -> Result<(OwnedFd, OwnedFd, u64)> {
        let (r, shares) = self.conn().call(&Request::SimInfo)?;
        let args = r.result.unwrap_or_default();
        let mut fds: Vec<OwnedFd> = shares.into_iter().filter_map(Share::into_fd).collect();
        if fds.len() != 2 {
            return Err(Error::Invalid(format!("SimInfo carried {} fds", fds.len())));
        }
        let s = fds.remove(1);
        let m = fds.remove(0);
        Ok((m, s, args[0]))
    }

    /// Sends raw bytes and returns the raw reply (for robustness tests).
    pub fn raw(&self, bytes: &[u8]) -> Result<Vec<u8>> {
        let mut c = self.conn();
        let mut buf = vec![0u8; MAX_MESSAGE];
        let (n, _) = c.link.call(bytes, &mut buf)?;
        buf.truncate(n);
        Ok(buf)
    }
}
