//! The Unix `SOCK_SEQPACKET` server: one thread per client connection, plus
//! a ticker thread for fault polling and the epoch timer.

use crate::policy::Peer;
use crate::quota::Quota;
use crate::session::{Response, Session, State};
use crate::unit::log;
use iommu_abi::proto::{ErrorCode, Frame, Op, Reply, Request, HEADER_LEN, MAX_MESSAGE};
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
    // The background duties sleep until one is due (crate::timer).
    let ticker = {
        let st = state.clone();
        std::thread::Builder::new()
            .name("iommud-tick".into())
            .spawn(move || crate::timer::ticker(&st))?
    };
    crate::service::Service::start(&state)?;
    let mut accept_errors = RateLimited::default();
    while !state.stop.load(SeqCst) {
        match listener.accept_timeout(STOP_CHECK) {
            Ok(Some(conn)) => {
                let Some(admitted) = admit(&state, &conn) else {
                    continue; // refused with a reply, and closed
                };
                let st = state.clone();
                // The connection moves into the thread; if the thread cannot
                // be made, the closure (and with it the connection and its
                // charges) is dropped: the client sees the socket close.
                let spawned = std::thread::Builder::new()
                    .name("iommud-conn".into())
                    .spawn(move || connection(st, conn, admitted));
                if let Err(e) = spawned {
                    accept_errors.warn(&format!("cannot start a connection thread: {e}"));
                    std::thread::sleep(BACKOFF);
                }
            }
            Ok(None) => {}
            Err(e) => {
                // Out of descriptors (EMFILE, ENFILE) or memory: say so at
                // most once a second and back off, never spin.
                accept_errors.warn(&format!("accept: {e}"));
                std::thread::sleep(BACKOFF);
            }
        }
    }
    state.timer.kick();
    let _ = ticker.join();
    state.service.stop();
    let _ = std::fs::remove_file(path);
    // Block every device before this process (and its memory) goes: every
    // context entry cleared and invalidated, then the domains' memory freed,
    // then the unit parked on an empty root (crate::stop).
    state.stop_orderly();
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

/// How often the accept loop looks for a stop (few wake-ups: idle is free).
const STOP_CHECK: Duration = Duration::from_millis(200);

/// How long the accept loop waits after a failure before it tries again.
const BACKOFF: Duration = Duration::from_millis(100);

/// A warning logged at most once a second, with how many were held back.
#[derive(Default)]
struct RateLimited {
    last: Option<std::time::Instant>,
    held: u64,
}

impl RateLimited {
    fn warn(&mut self, msg: &str) {
        let now = std::time::Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            self.held += 1;
            return;
        }
        let held = std::mem::take(&mut self.held);
        if held > 0 {
            log::warn(&format!("{msg} (and {held} more in the last second)"));
        } else {
            log::warn(msg);
        }
        self.last = Some(now);
    }
}

/// A connection admitted: its identity and what it holds of the caps, given
/// back when it closes.
pub struct Admitted {
    peer: Peer,
    account: Arc<crate::quota::Account>,
    state: Arc<State>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.account.release(Quota::Connections, 1);
        self.state.open_connections.fetch_sub(1, SeqCst);
    }
}

/// Admits `conn` under the daemon's connection cap and its identity's
/// connections quota, or refuses it: an unsolicited error reply (sequence
/// number 0, which libdma reports as the reason) and the socket closed.
fn admit(state: &Arc<State>, conn: &SeqPacket) -> Option<Admitted> {
    let refuse = |code: ErrorCode, msg: String| {
        let _ = send(conn, Op::Hello, 0, Response::err(code, msg));
    };
    let peer = match conn.peer_cred() {
        Ok((uid, gid, pid)) => Peer { uid, gid, pid },
        Err(e) => {
            log::warn(&format!("connection without credentials closed: {e}"));
            return None;
        }
    };
    let cap = state.policy.max_connections;
    let open = state.open_connections.fetch_add(1, SeqCst);
    if open >= cap {
        state.open_connections.fetch_sub(1, SeqCst);
        crate::stats::add(&state.security.refused_connections, 1);
        refuse(
            ErrorCode::Busy,
            format!("iommud serves at most {cap} connections; try again later"),
        );
        return None;
    }
    let account = state.accounts.of(peer.uid);
    if let Err(m) = account.charge(Quota::Connections, 1) {
        state.open_connections.fetch_sub(1, SeqCst);
        refuse(ErrorCode::QuotaExceeded, m);
        return None;
    }
    Some(Admitted {
        peer,
        account,
        state: state.clone(),
    })
}

/// Serves one admitted client until it disconnects; its domain is then torn
/// down. The client's identity is the one the kernel recorded at connect
/// (`SO_PEERCRED`).
pub fn connection(state: Arc<State>, conn: SeqPacket, admitted: Admitted) {
    let mut session = Session::new(state.clone(), admitted.peer);
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
                if let Some(pause) = session.take_backoff() {
                    std::thread::sleep(pause);
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
