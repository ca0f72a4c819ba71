//! Request handling for one client, independent of the transport: the Unix
//! socket server and the Redox scheme both feed [`Session::handle`].

use crate::domain::{Domain, DomainError};
use crate::policy::{Peer, Trust};
use crate::quota::Account;
use crate::scheme::SchemeTree;
pub use crate::state::State;
use crate::stats;
use crate::unit::log;
use iommu_abi::proto::{
    AttachReply, ErrorCode, FlushPolicy, PoolReply, Request, Strategy, FLAG_CACHING_MODE,
    FLAG_COHERENT, FLAG_TRANSLATING, FLAG_VALIDATED, VERSION,
};
use iommu_abi::Bdf;
use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long an attach waits for a device held by a live owner to be
/// released (a detach posted just before, still in flight) before `Busy`.
const ATTACH_GRACE_LIVE: Duration = Duration::from_millis(250);
/// How long an attach waits for the teardown of a domain whose owner has
/// exited (its session thread has not yet seen the socket close).
const ATTACH_GRACE_EXITED: Duration = Duration::from_secs(5);

/// Shared memory to hand to the client with a reply (fds on Unix sockets,
/// `mmap_prep` offers on Redox).
#[derive(Debug, Clone)]
pub struct Share {
    /// The file.
    pub fd: Arc<OwnedFd>,
}

/// The answer to one request.
#[derive(Debug)]
pub struct Response {
    /// Arguments or error.
    pub result: Result<[u64; 5], ErrorCode>,
    /// Text (paths) or an error message.
    pub payload: Vec<u8>,
    /// Shared memory to pass along.
    pub shares: Vec<Share>,
}

impl Response {
    fn ok(args: [u64; 5]) -> Response {
        Response {
            result: Ok(args),
            payload: Vec::new(),
            shares: Vec::new(),
        }
    }
    /// An error with a message.
    pub fn err(code: ErrorCode, msg: impl Into<String>) -> Response {
        Response {
            result: Err(code),
            payload: msg.into().into_bytes(),
            shares: Vec::new(),
        }
    }
}

impl From<DomainError> for Response {
    fn from(e: DomainError) -> Response {
        Response::err(e.code(), e.to_string())
    }
}

/// One client connection.
pub struct Session {
    state: Arc<State>,
    domain: Option<Arc<Domain>>,
    /// Who is at the other end (verified by the transport).
    peer: Peer,
    /// Its identity's quotas.
    account: Arc<Account>,
}

impl Session {
    /// How long the connection should pause before its next request: its
    /// domain went over its flush budget (storm control, `crate::timer`).
    pub fn take_backoff(&self) -> Option<std::time::Duration> {
        self.domain.as_ref().and_then(|d| d.budget.take_backoff())
    }

    /// A session with nothing attached, for the client `peer` (its identity
    /// as the kernel reports it, never as the client claims it).
    pub fn new(state: Arc<State>, peer: Peer) -> Session {
        let account = state.accounts.of(peer.uid);
        Session {
            state,
            domain: None,
            peer,
            account,
        }
    }

    /// The client's identity.
    pub fn peer(&self) -> Peer {
        self.peer
    }

    /// The attached domain.
    pub fn domain(&self) -> Option<&Arc<Domain>> {
        self.domain.as_ref()
    }

    fn need_domain(&self) -> Result<&Arc<Domain>, Response> {
        match &self.domain {
            Some(d) if !d.is_dead() => Ok(d),
            _ => Err(Response::err(
                ErrorCode::NoDomain,
                "attach to a device first",
            )),
        }
    }

    /// Handles one request with the descriptors that came with it (the
    /// proof of device ownership an Attach carries; ignored otherwise);
    /// `None` for one-way requests. A bug reached by a request fails that
    /// request with `Hardware` and leaves the daemon serving.
    pub fn handle(&mut self, req: Request, fds: Vec<OwnedFd>) -> Option<Response> {
        if let Some(d) = &self.domain {
            if req.wants_reply() {
                stats::add(&d.stats.ipc_round_trips, 1);
            }
        }
        let wants_reply = req.wants_reply();
        let r = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.dispatch(req, fds)
        })) {
            Ok(r) => r?,
            Err(_) => {
                stats::add(&self.state.security.internal_errors, 1);
                log::warn("a request hit an internal error (panic caught); the request failed");
                if !wants_reply {
                    return None;
                }
                Response::err(ErrorCode::Hardware, "internal error in iommud")
            }
        };
        if let (Err(_), Some(d)) = (&r.result, &self.domain) {
            stats::add(&d.stats.errors, 1);
        }
        Some(r)
    }

    fn dispatch(&mut self, req: Request, mut fds: Vec<OwnedFd>) -> Option<Response> {
        let st = self.state.clone();
        let peer = self.peer;
        Some(match req {
            Request::Hello { version } => {
                if version != u64::from(VERSION) {
                    Response::err(
                        ErrorCode::Version,
                        format!("client speaks version {version}, iommud {VERSION}"),
                    )
                } else {
                    Response::ok([u64::from(VERSION), 0, 0, 0, 0])
                }
            }
            Request::Attach {
                bdf,
                strategy,
                flush,
            } => {
                let proof = if fds.is_empty() {
                    None
                } else {
                    Some(fds.swap_remove(0))
                };
                self.attach(bdf, strategy, flush, proof.as_ref())
            }
            Request::Reattach { bdf, token } => {
                let proof = if fds.is_empty() {
                    None
                } else {
                    Some(fds.swap_remove(0))
                };
                self.reattach(bdf, token, proof.as_ref())
            }
            Request::AllocPool { bytes } => match self.need_domain() {
                Err(r) => r,
                Ok(d) => match d.alloc_pool(bytes) {
                    Ok((r, region, reg)) => Response {
                        result: Ok(PoolReply {
                            phys: r.phys,
                            fd_offset: r.fd_offset,
                            len: r.len,
                            region,
                            iova: reg.iova,
                        }
                        .encode()),
                        payload: Vec::new(),
                        shares: vec![Share { fd: r.fd }],
                    },
                    Err(e) => e.into(),
                },
            },
            Request::SetupRings { rings } => match self.need_domain() {
                Err(r) => r,
                Ok(d) => match d.setup_rings(rings) {
                    Ok(r) => {
                        let shares = vec![
                            Share { fd: r.share() },
                            Share {
                                fd: r.doorbell.clone(),
                            },
                        ];
                        st.service.add(d.clone());
                        Response {
                            result: Ok([rings, iommu_abi::ring::RING_BYTES as u64, 0, 0, 0]),
                            payload: Vec::new(),
                            shares,
                        }
                    }
                    Err(e) => e.into(),
                },
            },
            Request::Map { phys, len, dir, va } => match self.need_domain() {
                Err(r) => r,
                Ok(d) => match d.map(phys, len, dir, va) {
                    Ok(iova) => Response::ok([iova, 0, 0, 0, 0]),
                    Err(e) => e.into(),
                },
            },
            Request::MapBatch { entries } => match self.need_domain() {
                Err(r) => r,
                Ok(d) => map_batch(d, &entries),
            },
            Request::UnmapBatch { entries } => match self.need_domain() {
                Err(r) => r,
                Ok(d) => {
                    for (k, &(iova, len)) in entries.iter().enumerate() {
                        if let Err(e) = d.unmap(iova, len) {
                            return Some(Response::err(
                                e.code(),
                                format!("entry {k}: {e} (the {k} entries before it are unmapped)"),
                            ));
                        }
                    }
                    Response::ok([entries.len() as u64, 0, 0, 0, 0])
                }
            },
            Request::Unmap { iova, len } => match self.need_domain() {
                Err(r) => r,
                Ok(d) => match d.unmap(iova, len) {
                    Ok(()) => {
                        // An idle epoch timer learns of iommud's own unmap now.
                        if d.timer_idle() {
                            st.timer.kick();
                        }
                        Response::ok([0; 5])
                    }
                    Err(e) => e.into(),
                },
            },
            Request::Exchange {
                pages,
                returned,
                want,
            } => match self.need_domain() {
                Err(r) => r,
                Ok(d) => match d.exchange(pages, returned, want) {
                    Ok(n) => Response::ok([n, 0, 0, 0, 0]),
                    Err(e) => e.into(),
                },
            },
            Request::FlushHint => {
                if let Ok(d) = self.need_domain() {
                    stats::add(&d.stats.wakeups, 1);
                    // Storm control: over its budget, a hint waits for the timer.
                    if let Err(e) = crate::timer::on_hint(&st, d) {
                        log::warn(&format!("{}: flush failed: {e}", Bdf(d.sid)));
                    }
                }
                return None;
            }
            Request::FlushSync { upto } => match self.need_domain() {
                Err(r) => r,
                Ok(d) => {
                    // Storm control: counted, and the connection pauses, over budget.
                    crate::timer::on_sync(d);
                    match d.flush_to(upto) {
                        Ok(()) => Response::ok([d.completed(), 0, 0, 0, 0]),
                        Err(e) => e.into(),
                    }
                }
            },
            Request::Detach => match self.domain.take() {
                Some(d) => {
                    st.detach(d.sid);
                    Response::ok([0; 5])
                }
                None => Response::err(ErrorCode::NoDomain, "nothing attached"),
            },
            Request::ReadPath { path } => match st.read(&peer, &path) {
                Ok(text) => Response {
                    result: Ok([text.len() as u64, 0, 0, 0, 0]),
                    payload: text.into_bytes(),
                    shares: Vec::new(),
                },
                Err(e) => Response::err(e, format!("{path}: {e}")),
            },
            Request::WritePath { path, value } => match st.write(&peer, &path, &value) {
                Ok(()) => Response::ok([0; 5]),
                Err(e) => Response::err(e, format!("{path}: {e}")),
            },
            Request::SimInfo if st.need_admin(&peer, "SimInfo").is_err() => Response::err(
                ErrorCode::PermissionDenied,
                "the simulated machine is the administrator's",
            ),
            Request::SimInfo => match &st.sim_fds {
                Some((m, s, len)) => Response {
                    result: Ok([*len, 0, 0, 0, 0]),
                    payload: Vec::new(),
                    shares: vec![Share { fd: m.clone() }, Share { fd: s.clone() }],
                },
                None => Response::err(ErrorCode::Unsupported, "not the sim platform"),
            },
            Request::Shutdown => match st.need_admin(&peer, "Shutdown") {
                Ok(()) => {
                    log::info(&format!(
                        "stop requested by uid {} pid {}",
                        peer.uid, peer.pid
                    ));
                    st.stop.store(true, SeqCst);
                    Response::ok([0; 5])
                }
                Err(c) => Response::err(c, "only an administrator may stop iommud"),
            },
        })
    }

    fn attach(
        &mut self,
        sid: u16,
        strategy: Strategy,
        flush: FlushPolicy,
        proof: Option<&OwnedFd>,
    ) -> Response {
        if self.domain.is_some() {
            return Response::err(ErrorCode::Busy, "this connection is already attached");
        }
        let st = &self.state;
        // Proof of device ownership first: nobody learns anything about a
        // device (not even whether it is attached) without it.
        if let Err(e) = st
            .authority
            .verify(sid, proof, st.policy.is_admin(&self.peer))
        {
            stats::add(&st.security.refused_proof, 1);
            log::warn(&format!(
                "{}: attach refused to uid {} pid {}: {e}",
                Bdf(sid),
                self.peer.uid,
                self.peer.pid
            ));
            return Response::err(ErrorCode::PermissionDenied, e);
        }
        // Then the administrator's policy: trust, strategy, flush policy.
        let rule = st.rule_for(sid);
        let effective = if st.unit.translating() {
            strategy
        } else {
            Strategy::NoIommu
        };
        if let Err(e) = rule.check(effective, flush) {
            stats::add(&st.security.refused_policy, 1);
            log::warn(&format!(
                "{}: attach refused to uid {} pid {}: {e}",
                Bdf(sid),
                self.peer.uid,
                self.peer.pid
            ));
            return Response::err(ErrorCode::PermissionDenied, e);
        }
        // The administrator's trust, whatever the strategy: a validated
        // magazine domain keeps its magazines in iommud (the ring path).
        let trust = rule.trust;
        let d = {
            let mut doms = st.domains.lock().unwrap_or_else(|p| p.into_inner());
            // A driver restarted right after its predecessor exited (or a
            // client that detached and attaches again) can get here before
            // the old session's thread has torn the domain down: wait that
            // out, bounded, rather than refuse (docs/ARCHITECTURE.md,
            // "Stop, crash and restart").
            let start = Instant::now();
            while doms.contains_key(&sid) {
                if let Some(left) = st.orphan_left(sid) {
                    return Response::err(
                        ErrorCode::Busy,
                        format!(
                            "{} is held for the driver that had it before iommud restarted \
                             (it may reattach for {} ms more)",
                            Bdf(sid),
                            left.as_millis()
                        ),
                    );
                }
                let departed = st
                    .owner(sid)
                    .map_or(Some(true), |o| crate::platform::process_exited(o.pid));
                let grace = match departed {
                    Some(false) => ATTACH_GRACE_LIVE,
                    _ => ATTACH_GRACE_EXITED,
                };
                let Some(left) = grace.checked_sub(start.elapsed()).filter(|l| !l.is_zero()) else {
                    return Response::err(
                        ErrorCode::Busy,
                        format!("{} is attached by another client", Bdf(sid)),
                    );
                };
                // Re-judged at least every 50 ms: the owner may exit meanwhile.
                doms = st
                    .detached
                    .wait_timeout(doms, left.min(Duration::from_millis(50)))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            let strategy = if st.unit.translating() {
                strategy
            } else {
                Strategy::NoIommu
            };
            match Domain::new(
                st.unit.clone(),
                sid,
                strategy,
                flush,
                trust,
                st.reclaim.load(SeqCst),
                self.account.clone(),
            ) {
                Ok(d) => {
                    doms.insert(sid, d.clone());
                    st.set_owner(sid, self.peer);
                    // A new domain starts unblocked (its history stays).
                    st.faults
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .reattached(sid);
                    d
                }
                Err(e) => return e.into(),
            }
        };
        log::info(&format!(
            "{}: attached by uid {} pid {} (domain {}, {}, {}, {} trust)",
            Bdf(sid),
            self.peer.uid,
            self.peer.pid,
            d.did,
            d.policy().0.name(),
            d.policy().1.name(),
            d.trust.name()
        ));
        // A ledger lets the driver reattach after an iommud restart; the
        // token that proves it is the reply's payload.
        let token = d.start_ledger((self.peer.uid, self.peer.gid));
        self.attach_reply(d, token)
    }

    /// The reply to an attach or a reattach: flags, the shared pages, the
    /// arena (delegated trust), and the reattach token (if any) as payload.
    fn attach_reply(&mut self, d: Arc<Domain>, token: Option<u128>) -> Response {
        let st = self.state.clone();
        let u = &st.unit;
        let flags = (if d.trust == Trust::Validated {
            FLAG_VALIDATED
        } else {
            0
        }) | (if u.caching_mode() {
            FLAG_CACHING_MODE
        } else {
            0
        }) | (if u.coherent() { FLAG_COHERENT } else { 0 })
            | (if u.translating() { FLAG_TRANSLATING } else { 0 });
        let (published, client) = d.shares();
        let mut shares = vec![Share { fd: published }, Share { fd: client }];
        let mut reply = AttachReply {
            did: d.did,
            flags,
            arena: None,
        };
        // The arena (client-writable leaf tables) only where the driver is
        // trusted to write entries.
        if let Some(a) = d.arena().filter(|_| d.trust == Trust::Delegated) {
            reply.arena = Some((a.phys, a.fd_offset, a.len));
            shares.push(Share { fd: a.fd });
        }
        self.domain = Some(d);
        Response {
            result: Ok(reply.encode()),
            payload: token.map(|t| t.to_le_bytes().to_vec()).unwrap_or_default(),
            shares,
        }
    }

    /// A driver whose iommud died comes back to the domain a restarted
    /// iommud adopted: proof of device ownership as for an attach, then its
    /// uid and the token of its first attach. The domain is invalidated
    /// before the reply.
    fn reattach(&mut self, sid: u16, token: u128, proof: Option<&OwnedFd>) -> Response {
        if self.domain.is_some() {
            return Response::err(ErrorCode::Busy, "this connection is already attached");
        }
        let st = self.state.clone();
        if let Err(e) = st
            .authority
            .verify(sid, proof, st.policy.is_admin(&self.peer))
        {
            stats::add(&st.security.refused_proof, 1);
            return Response::err(ErrorCode::PermissionDenied, e);
        }
        let d = match st.claim_orphan(sid, self.peer.uid, token) {
            Ok(d) => d,
            Err(e) => {
                stats::add(&st.security.refused_proof, 1);
                log::warn(&format!(
                    "reattach refused to uid {} pid {}: {e}",
                    self.peer.uid, self.peer.pid
                ));
                return Response::err(ErrorCode::PermissionDenied, e);
            }
        };
        let held = match d.resume() {
            Ok(n) => n,
            Err(e) => {
                // Whatever went wrong, the device must not keep DMA nobody owns.
                log::warn(&format!(
                    "{}: reattach failed: {e}; device blocked",
                    Bdf(sid)
                ));
                st.detach(sid);
                return e.into();
            }
        };
        st.set_owner(sid, self.peer);
        log::info(&format!(
            "{}: reattached by uid {} pid {} (domain {}; it holds {held} IOVAs)",
            Bdf(sid),
            self.peer.uid,
            self.peer.pid,
            d.did
        ));
        let rings = d.rings().map(|r| (r.share(), r.doorbell.clone()));
        let mut r = self.attach_reply(d, Some(token));
        // A validated domain's rings: the same memory, a new doorbell (last).
        if let Some((ring, bell)) = rings {
            r.shares.push(Share { fd: ring });
            r.shares.push(Share { fd: bell });
        }
        r
    }
}

/// Maps a batch, all or nothing: on the first failure the entries already
/// mapped are unmapped again and the error names the failing entry.
fn map_batch(d: &Domain, entries: &[iommu_abi::proto::MapEntry]) -> Response {
    let mut iovas: Vec<u64> = Vec::with_capacity(entries.len());
    for (k, e) in entries.iter().enumerate() {
        match d.map(e.phys, e.len, e.dir, e.va) {
            Ok(iova) => iovas.push(iova),
            Err(err) => {
                for (iova, done) in iovas.iter().zip(entries) {
                    if let Err(u) = d.unmap(*iova, done.len) {
                        log::warn(&format!("{}: undoing a failed batch: {u}", Bdf(d.sid)));
                    }
                }
                return Response::err(err.code(), format!("entry {k}: {err}"));
            }
        }
    }
    Response {
        result: Ok([iovas.len() as u64, 0, 0, 0, 0]),
        payload: iovas.iter().flat_map(|v| v.to_le_bytes()).collect(),
        shares: Vec::new(),
    }
}

impl Drop for Session {
    /// A client that goes away loses its domain: iommud unmaps, invalidates
    /// and reclaims everything.
    fn drop(&mut self) {
        if let Some(d) = self.domain.take() {
            self.state.detach(d.sid);
        }
    }
}
