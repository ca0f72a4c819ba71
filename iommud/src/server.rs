//! The Unix `SOCK_SEQPACKET` server: one thread per client connection, plus
//! a ticker thread for fault polling and the epoch timer.

use crate::policy::Peer;
use crate::session::{Response, Session, State};
use crate::unit::log;
use iommu_abi::proto::{Frame, Op, Reply, Request, HEADER_LEN, MAX_MESSAGE};
use iommu_abi::transport::SeqPacket;
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::time::Duration;

/// How often faults are polled and waiting epochs flushed.
pub use crate::TICK;

/// Serves `path` until a `Shutdown` request (or `state.stop`).
pub fn serve(state: Arc<State>, path: &Path) -> std::io::Result<()> {
    let listener = SeqPacket::listen(path)?;
    // Anyone may connect: what a connection may do is decided by the
    // identity the kernel reports for it (SO_PEERCRED), not by who could
    // open the socket (docs/ARCHITECTURE.md, "Trust and the attacker").
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    }
    log::info(&format!("serving on {}", path.display()));
    let ticker = {
        let st = state.clone();
        std::thread::Builder::new()
            .name("iommud-tick".into())
            .spawn(move || {
                while !st.stop.load(SeqCst) {
                    st.tick();
                    std::thread::sleep(TICK);
                }
            })?
    };
    while !state.stop.load(SeqCst) {
        match listener.accept_timeout(Duration::from_millis(50)) {
            Ok(Some(conn)) => {
                let st = state.clone();
                std::thread::Builder::new()
                    .name("iommud-conn".into())
                    .spawn(move || connection(st, conn))?;
            }
            Ok(None) => {}
            Err(e) => log::warn(&format!("accept: {e}")),
        }
    }
    let _ = ticker.join();
    let _ = std::fs::remove_file(path);
    // Block every device before this process (and its memory) goes: each
    // context entry cleared and invalidated, then the domain's memory freed.
    state.detach_all();
    log::info("stopped");
    Ok(())
}

fn send(conn: &SeqPacket, op: Op, seq: u32, r: Response) -> std::io::Result<()> {
    let bytes = Reply {
        op,
        seq,
        result: r.result,
        payload: r.payload,
    }
    .encode();
    let fds: Vec<_> = r.shares.iter().map(|s| s.fd.as_fd()).collect();
    conn.send(&bytes, &fds)
}

/// Serves one client until it disconnects; its domain is then torn down.
/// The client's identity is the one the kernel recorded at connect
/// (`SO_PEERCRED`); a connection whose identity cannot be read is closed.
pub fn connection(state: Arc<State>, conn: SeqPacket) {
    let peer = match conn.peer_cred() {
        Ok((uid, gid, pid)) => Peer { uid, gid, pid },
        Err(e) => {
            log::warn(&format!("connection without credentials closed: {e}"));
            return;
        }
    };
    let mut session = Session::new(state.clone(), peer);
    let mut buf = vec![0u8; MAX_MESSAGE];
    // Wake up now and then to notice a daemon shutdown.
    let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
    loop {
        let (n, fds) = match conn.recv(&mut buf) {
            Ok((0, _)) => break,
            Ok(got) => got,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if state.stop.load(SeqCst) {
                    break;
                }
                continue;
            }
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                crate::stats::add(&state.security.malformed, 1);
                let _ = send(
                    &conn,
                    Op::Hello,
                    0,
                    Response::err(iommu_abi::proto::ErrorCode::Malformed, e.to_string()),
                );
                continue;
            }
            Err(e) => {
                log::warn(&format!("connection: {e}"));
                break;
            }
        };
        let msg = &buf[..n];
        match Request::decode(msg) {
            Ok((seq, req)) => {
                let op = req.op();
                if let Some(r) = session.handle(req, fds) {
                    if send(&conn, op, seq, r).is_err() {
                        break;
                    }
                }
            }
            Err(e) => {
                crate::stats::add(&state.security.malformed, 1);
                // Answer with whatever op/seq can be salvaged; the client gets
                // a clear error and the connection stays usable.
                let (op, seq) = Frame::decode(msg)
                    .map(|f| (f.op, f.seq))
                    .unwrap_or_else(|_| {
                        let seq = if n >= HEADER_LEN {
                            u32::from_le_bytes([msg[8], msg[9], msg[10], msg[11]])
                        } else {
                            0
                        };
                        (Op::Hello, seq)
                    });
                let r = Response::err(iommu_abi::proto::ErrorCode::Malformed, e.to_string());
                if send(&conn, op, seq, r).is_err() {
                    break;
                }
            }
        }
    }
    drop(session);
}
