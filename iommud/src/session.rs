//! Request handling for one client, independent of the transport: the Unix
//! socket server and the Redox scheme both feed [`Session::handle`].

use crate::domain::{Domain, DomainError};
use crate::scheme::{parse, Node, SchemeTree};
use crate::stats::{self, Text};
use crate::unit::{bdf_string, fault_reason_text, log, Iommu};
use libdma::proto::{ErrorCode, FlushPolicy, Request, Strategy, VERSION};
use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Attach reply flag: the unit is in caching mode (CAP.CM).
pub const FLAG_CACHING_MODE: u64 = 1 << 0;
/// Attach reply flag: table walks are cache-coherent (ECAP.C).
pub const FLAG_COHERENT: u64 = 1 << 1;
/// Attach reply flag: DMA remapping is on.
pub const FLAG_TRANSLATING: u64 = 1 << 2;

/// State shared by all sessions.
pub struct State {
    /// The remapping unit.
    pub unit: Arc<Iommu>,
    /// Attached domains by source id.
    pub domains: Mutex<BTreeMap<u16, Arc<Domain>>>,
    /// Reclaim empty page-table pages in new domains.
    pub reclaim: AtomicBool,
    /// Set to stop the daemon.
    pub stop: AtomicBool,
    /// Platform name for `stats`.
    pub platform: &'static str,
    /// Sim platform: the machine's memory and state fds, for test devices.
    pub sim_fds: Option<(Arc<OwnedFd>, Arc<OwnedFd>, u64)>,
    started: Instant,
}

impl State {
    /// New state over a unit.
    pub fn new(unit: Arc<Iommu>, platform: &'static str, reclaim: bool) -> State {
        State {
            unit,
            domains: Mutex::new(BTreeMap::new()),
            reclaim: AtomicBool::new(reclaim),
            stop: AtomicBool::new(false),
            platform,
            sim_fds: None,
            started: Instant::now(),
        }
    }

    /// The domain of `sid`, if attached.
    pub fn domain(&self, sid: u16) -> Option<Arc<Domain>> {
        self.domains
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&sid)
            .cloned()
    }

    fn all_domains(&self) -> Vec<Arc<Domain>> {
        self.domains
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Background duties, called every few milliseconds: record faults and
    /// run the epoch timer (flush domains whose clients wait for an epoch).
    pub fn tick(&self) {
        for f in self.unit.poll_faults() {
            if let Some(d) = self.domain(f.sid) {
                stats::add(&d.stats.faults, 1);
            }
        }
        for d in self.all_domains() {
            if let Err(e) = d.tick() {
                log::warn(&format!("{}: timed flush failed: {e}", bdf_string(d.sid)));
            }
        }
    }

    /// Removes and tears down a domain.
    pub fn detach(&self, sid: u16) {
        // Tear down before the domain leaves the list, so whoever sees it
        // gone also sees the device blocked.
        let d = self.domain(sid);
        if let Some(d) = d {
            d.teardown();
            self.domains
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&sid);
            log::info(&format!(
                "{}: detached, mappings reclaimed",
                bdf_string(sid)
            ));
        }
    }

    fn render_stats(&self) -> String {
        let mut t = Text::default();
        let doms = self.all_domains();
        t.kv("platform", self.platform)
            .kv("uptime_ms", self.started.elapsed().as_millis())
            .kv(
                "translation",
                if self.unit.translating() { "on" } else { "off" },
            )
            .kv("caching_mode", u8::from(self.unit.caching_mode()))
            .kv("levels", self.unit.levels)
            .kv(
                "reclaim",
                if self.reclaim.load(SeqCst) {
                    "on"
                } else {
                    "off"
                },
            )
            .kv("domains", doms.len());
        let sum = |f: &dyn Fn(&Domain) -> u64| doms.iter().map(|d| f(d)).sum::<u64>();
        let maps = sum(&|d| stats::get(&d.stats.maps) + d.page().sum(|c| &c.maps));
        let unmaps = sum(&|d| stats::get(&d.stats.unmaps) + d.page().sum(|c| &c.unmaps));
        let ipc = sum(&|d| stats::get(&d.stats.ipc_round_trips));
        let wake = sum(&|d| stats::get(&d.stats.wakeups));
        let exch = sum(&|d| stats::get(&d.stats.depot_exchanges));
        let hits = sum(&|d| d.page().sum(|c| &c.mag_hits));
        let misses = sum(&|d| {
            let p = d.page();
            p.sum(|c| &c.maps).saturating_sub(p.sum(|c| &c.mag_hits))
        });
        let locks = sum(&|d| stats::get(&d.stats.lock_acquisitions));
        let live = sum(&|d| d.table_pages().2);
        let alloc = sum(&|d| d.table_pages().0);
        let freed = sum(&|d| d.table_pages().1);
        t.kv("maps", maps)
            .kv("unmaps", unmaps)
            .kv("magazine_hits", hits)
            .kv("magazine_misses", misses)
            .kv("depot_exchanges", exch)
            .kv("ipc_round_trips", ipc)
            .kv("ipc_wakeups", wake)
            .kv("lock_acquisitions", locks)
            .kv("pt_pages_allocated", alloc)
            .kv("pt_pages_freed", freed)
            .kv("pt_pages_live", live);
        self.unit.stats.render(&mut t);
        t.0
    }

    fn render_faults(&self) -> String {
        let mut s = String::new();
        for f in self.unit.faults() {
            s.push_str(&format!(
                "fault bdf={} iova={:#x} access={} reason={:#x} ({}) at_ms={}\n",
                bdf_string(f.sid),
                f.addr,
                if f.is_read { "read" } else { "write" },
                f.reason,
                fault_reason_text(f.reason),
                f.at_ms
            ));
        }
        s
    }
}

impl SchemeTree for State {
    fn read(&self, path: &str) -> Result<String, ErrorCode> {
        let dom = |sid| self.domain(sid).ok_or(ErrorCode::NotFound);
        Ok(match parse(path)? {
            Node::Stats => self.render_stats(),
            Node::Domains => self
                .all_domains()
                .iter()
                .map(|d| format!("{}\n", bdf_string(d.sid)))
                .collect(),
            Node::DomainStats(s) => dom(s)?.render_stats(),
            Node::DomainStrategy(s) => format!("{}\n", dom(s)?.policy().0.name()),
            Node::DomainFlush(s) => format!("{}\n", dom(s)?.policy().1.name()),
            Node::DomainMappings(s) => dom(s)?.render_mappings(),
            Node::Faults => self.render_faults(),
            Node::Reclaim => format!(
                "{}\n",
                if self.reclaim.load(SeqCst) {
                    "on"
                } else {
                    "off"
                }
            ),
        })
    }

    fn write(&self, path: &str, value: &str) -> Result<(), ErrorCode> {
        let dom = |sid| self.domain(sid).ok_or(ErrorCode::NotFound);
        match parse(path)? {
            Node::DomainStrategy(s) => {
                let st = Strategy::parse(value).ok_or(ErrorCode::Invalid)?;
                dom(s)?.set_policy(Some(st), None).map_err(|e| e.code())
            }
            Node::DomainFlush(s) => {
                let f = FlushPolicy::parse(value).ok_or(ErrorCode::Invalid)?;
                dom(s)?.set_policy(None, Some(f)).map_err(|e| e.code())
            }
            Node::Reclaim => {
                let on = match value.trim() {
                    "on" | "1" => true,
                    "off" | "0" => false,
                    _ => return Err(ErrorCode::Invalid),
                };
                self.reclaim.store(on, SeqCst);
                Ok(())
            }
            _ => Err(ErrorCode::Unsupported),
        }
    }
}

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
}

impl Session {
    /// A session with nothing attached.
    pub fn new(state: Arc<State>) -> Session {
        Session {
            state,
            domain: None,
        }
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

    /// Handles one request; `None` for one-way requests.
    pub fn handle(&mut self, req: Request) -> Option<Response> {
        if let Some(d) = &self.domain {
            if req.wants_reply() {
                stats::add(&d.stats.ipc_round_trips, 1);
            }
        }
        let r = self.dispatch(req)?;
        if let (Err(_), Some(d)) = (&r.result, &self.domain) {
            stats::add(&d.stats.errors, 1);
        }
        Some(r)
    }

    fn dispatch(&mut self, req: Request) -> Option<Response> {
        let st = self.state.clone();
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
            } => self.attach(bdf, strategy, flush),
            Request::AllocPool { bytes } => match self.need_domain() {
                Err(r) => r,
                Ok(d) => match d.alloc_pool(bytes) {
                    Ok(r) => Response {
                        result: Ok([r.phys, r.fd_offset, r.len, 0, 0]),
                        payload: Vec::new(),
                        shares: vec![Share { fd: r.fd }],
                    },
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
                    Ok(()) => Response::ok([0; 5]),
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
                    if let Err(e) = d.flush_if_wanted() {
                        log::warn(&format!("{}: flush failed: {e}", bdf_string(d.sid)));
                    }
                }
                return None;
            }
            Request::FlushSync => match self.need_domain() {
                Err(r) => r,
                Ok(d) => match d.flush() {
                    Ok(()) => Response::ok([d.page().completed.load(SeqCst), 0, 0, 0, 0]),
                    Err(e) => e.into(),
                },
            },
            Request::Detach => match self.domain.take() {
                Some(d) => {
                    st.detach(d.sid);
                    Response::ok([0; 5])
                }
                None => Response::err(ErrorCode::NoDomain, "nothing attached"),
            },
            Request::ReadPath { path } => match st.read(&path) {
                Ok(text) => Response {
                    result: Ok([text.len() as u64, 0, 0, 0, 0]),
                    payload: text.into_bytes(),
                    shares: Vec::new(),
                },
                Err(e) => Response::err(e, format!("{path}: {e}")),
            },
            Request::WritePath { path, value } => match st.write(&path, &value) {
                Ok(()) => Response::ok([0; 5]),
                Err(e) => Response::err(e, format!("{path}: {e}")),
            },
            Request::SimInfo => match &st.sim_fds {
                Some((m, s, len)) => Response {
                    result: Ok([*len, 0, 0, 0, 0]),
                    payload: Vec::new(),
                    shares: vec![Share { fd: m.clone() }, Share { fd: s.clone() }],
                },
                None => Response::err(ErrorCode::Unsupported, "not the sim platform"),
            },
            Request::Shutdown => {
                st.stop.store(true, SeqCst);
                Response::ok([0; 5])
            }
        })
    }

    fn attach(&mut self, sid: u16, strategy: Strategy, flush: FlushPolicy) -> Response {
        if self.domain.is_some() {
            return Response::err(ErrorCode::Busy, "this connection is already attached");
        }
        let st = &self.state;
        let d = {
            let mut doms = st.domains.lock().unwrap_or_else(|p| p.into_inner());
            if doms.contains_key(&sid) {
                return Response::err(
                    ErrorCode::Busy,
                    format!("{} is attached by another client", bdf_string(sid)),
                );
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
                st.reclaim.load(SeqCst),
            ) {
                Ok(d) => {
                    doms.insert(sid, d.clone());
                    d
                }
                Err(e) => return e.into(),
            }
        };
        log::info(&format!(
            "{}: attached (domain {}, {}, {})",
            bdf_string(sid),
            d.did,
            d.policy().0.name(),
            d.policy().1.name()
        ));
        let u = &st.unit;
        let flags = (if u.caching_mode() {
            FLAG_CACHING_MODE
        } else {
            0
        }) | (if u.coherent() { FLAG_COHERENT } else { 0 })
            | (if u.translating() { FLAG_TRANSLATING } else { 0 });
        let mut shares = vec![Share { fd: d.shared_fd() }];
        let mut args = [u64::from(d.did), flags, 0, 0, 0];
        if let Some(a) = d.arena() {
            args[2] = a.phys;
            args[3] = a.fd_offset;
            args[4] = a.len;
            shares.push(Share { fd: a.fd });
        }
        self.domain = Some(d);
        Response {
            result: Ok(args),
            payload: Vec::new(),
            shares,
        }
    }
}

/// Maps a batch, all or nothing: on the first failure the entries already
/// mapped are unmapped again and the error names the failing entry.
fn map_batch(d: &Domain, entries: &[libdma::proto::MapEntry]) -> Response {
    let mut iovas: Vec<u64> = Vec::with_capacity(entries.len());
    for (k, e) in entries.iter().enumerate() {
        match d.map(e.phys, e.len, e.dir, e.va) {
            Ok(iova) => iovas.push(iova),
            Err(err) => {
                for (iova, done) in iovas.iter().zip(entries) {
                    if let Err(u) = d.unmap(*iova, done.len) {
                        log::warn(&format!(
                            "{}: undoing a failed batch: {u}",
                            bdf_string(d.sid)
                        ));
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
