//! The daemon's state shared by every session: the unit, the attached
//! domains and their owners, the administrator's policy, the background
//! duties (faults, timed flushes), the unit-wide counters (cumulative over
//! clients) and the path tree it serves.

use crate::domain::Domain;
use crate::faults::{FaultBook, DEFAULT_BLOCK_PER_SECOND};
use crate::platform::proof::Authority;
use crate::policy::{Peer, Policy};
use crate::quota::{Accounts, Quota};
use crate::scheme::{parse, Node, SchemeTree};
use crate::stats::{self, Text};
use crate::unit::{log, Iommu};
use iommu_abi::proto::{ErrorCode, FlushPolicy, Strategy};
use iommu_abi::Bdf;
use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

/// A domain's counters as the unit-wide `stats` sums them.
#[derive(Debug, Default, Clone, Copy)]
struct Totals {
    maps: u64,
    unmaps: u64,
    hits: u64,
    misses: u64,
    exchanges: u64,
    ipc: u64,
    wakeups: u64,
    locks: u64,
    pt_allocated: u64,
    pt_freed: u64,
    invalidations: u64,
    rejected: u64,
}

impl Totals {
    /// The counters of `d`; those the client writes are hostile input,
    /// summed with saturation.
    fn of(d: &Domain) -> Totals {
        let c = d.client();
        let s = &d.stats;
        let (alloc, freed, _) = d.table_pages();
        let maps = c.sum(|k| &k.maps);
        let hits = c.sum(|k| &k.mag_hits);
        Totals {
            maps: maps.saturating_add(stats::get(&s.maps)),
            unmaps: c.sum(|k| &k.unmaps).saturating_add(stats::get(&s.unmaps)),
            hits,
            misses: maps.saturating_sub(hits),
            exchanges: stats::get(&s.depot_exchanges),
            ipc: stats::get(&s.ipc_round_trips),
            wakeups: stats::get(&s.wakeups),
            locks: stats::get(&s.lock_acquisitions),
            pt_allocated: alloc,
            pt_freed: freed,
            invalidations: stats::get(&s.inval_domain).saturating_add(stats::get(&s.inval_page)),
            rejected: stats::get(&s.rejected),
        }
    }

    fn add(mut self, o: Totals) -> Totals {
        let f = |a: &mut u64, b: u64| *a = a.saturating_add(b);
        f(&mut self.maps, o.maps);
        f(&mut self.unmaps, o.unmaps);
        f(&mut self.hits, o.hits);
        f(&mut self.misses, o.misses);
        f(&mut self.exchanges, o.exchanges);
        f(&mut self.ipc, o.ipc);
        f(&mut self.wakeups, o.wakeups);
        f(&mut self.locks, o.locks);
        f(&mut self.pt_allocated, o.pt_allocated);
        f(&mut self.pt_freed, o.pt_freed);
        f(&mut self.invalidations, o.invalidations);
        f(&mut self.rejected, o.rejected);
        self
    }
}

/// Refusals, unit-wide and cumulative.
#[derive(Debug, Default)]
pub struct SecurityStats {
    /// Administrative operations refused to a non-administrator.
    pub refused_admin: AtomicU64,
    /// Attaches refused for want of a proof of device ownership.
    pub refused_proof: AtomicU64,
    /// Requests for more than the administrator's policy allows.
    pub refused_policy: AtomicU64,
    /// Reads of another client's domain refused.
    pub refused_read: AtomicU64,
    /// Messages that did not decode.
    pub malformed: AtomicU64,
    /// Connections refused at the daemon's connection cap.
    pub refused_connections: AtomicU64,
    /// Requests that hit a bug (a panic caught; the request failed, the daemon went on).
    pub internal_errors: AtomicU64,
}

/// An adopted domain waiting for its owner.
#[derive(Clone, Copy, Debug)]
pub struct Orphan {
    /// The token the owner proves itself with.
    pub token: u128,
    /// The owner's uid (only it may reattach).
    pub uid: u32,
    /// When the device is blocked and the domain freed if nobody came.
    pub until: Instant,
}

/// How long an adopted domain waits for its owner by default.
pub const DEFAULT_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

/// State shared by all sessions.
pub struct State {
    /// The remapping unit.
    pub unit: Arc<Iommu>,
    /// Attached domains by source id.
    pub domains: Mutex<BTreeMap<u16, Arc<Domain>>>,
    /// Signalled (with `domains` locked) each time a domain leaves it, so an
    /// attach can wait out a departed owner's teardown.
    pub detached: Condvar,
    /// Reclaim empty page-table pages in new domains.
    pub reclaim: AtomicBool,
    /// Set to stop the daemon.
    pub stop: AtomicBool,
    /// Platform name for `stats`.
    pub platform: &'static str,
    /// Sim platform: the machine's memory and state fds, for test devices.
    pub sim_fds: Option<(Arc<OwnedFd>, Arc<OwnedFd>, u64)>,
    /// The administrator's policy.
    pub policy: Policy,
    /// Who vouches for device ownership.
    pub authority: Authority,
    /// What each client identity holds, against its quotas.
    pub accounts: Accounts,
    /// Connections open now (against `policy.max_connections`).
    pub open_connections: AtomicU64,
    /// Every device's DMA faults.
    pub faults: Mutex<FaultBook>,
    /// Refusal counters.
    pub security: SecurityStats,
    /// The service threads that serve clients' rings.
    pub service: crate::service::Service,
    /// Wakes the epoch timer (a hint over budget, a stop).
    pub timer: crate::timer::Wake,
    /// Domains a restarted iommud adopted whose owner has not reattached
    /// yet (docs/ARCHITECTURE.md, "Stop, crash and restart").
    pub orphans: Mutex<BTreeMap<u16, Orphan>>,
    /// Owner of each attached domain.
    owners: Mutex<BTreeMap<u16, Peer>>,
    /// Counters of domains already detached (so unit-wide stats are
    /// cumulative over the daemon's life).
    retired: Mutex<Totals>,
    started: Instant,
}

impl State {
    /// New state over a unit.
    pub fn new(unit: Arc<Iommu>, platform: &'static str, reclaim: bool) -> State {
        State {
            unit,
            domains: Mutex::new(BTreeMap::new()),
            detached: Condvar::new(),
            reclaim: AtomicBool::new(reclaim),
            stop: AtomicBool::new(false),
            platform,
            sim_fds: None,
            policy: Policy::default(),
            authority: Authority::Sysfs,
            accounts: Accounts::default(),
            open_connections: AtomicU64::new(0),
            faults: Mutex::new(FaultBook::new(DEFAULT_BLOCK_PER_SECOND)),
            security: SecurityStats::default(),
            service: crate::service::Service::new(1, crate::service::DEFAULT_SPIN),
            timer: crate::timer::Wake::default(),
            orphans: Mutex::new(BTreeMap::new()),
            owners: Mutex::new(BTreeMap::new()),
            retired: Mutex::new(Totals::default()),
            started: Instant::now(),
        }
    }

    /// Records `peer` as the owner of `sid`'s domain.
    pub(crate) fn set_owner(&self, sid: u16, peer: Peer) {
        self.owners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(sid, peer);
    }

    /// Installs the administrator's policy (and the quotas it sets).
    pub fn set_policy(&mut self, policy: Policy) {
        self.accounts = Accounts::new(policy.quota, policy.quota_per_uid.clone());
        self.faults = Mutex::new(FaultBook::new(policy.fault_block_per_second));
        self.policy = policy;
    }

    /// The owner of `sid`'s domain.
    pub fn owner(&self, sid: u16) -> Option<Peer> {
        self.owners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&sid)
            .copied()
    }

    /// The domain of `sid`, if attached.
    pub fn domain(&self, sid: u16) -> Option<Arc<Domain>> {
        self.domains
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&sid)
            .cloned()
    }

    pub(crate) fn all_domains(&self) -> Vec<Arc<Domain>> {
        self.domains
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Background duties, called every few milliseconds: record faults and
    /// run the epoch timer (flush domains whose clients wait for an epoch).
    ///
    /// A failure (or a bug) in one domain never stops the ticker or the
    /// other domains: each domain's work runs on its own, panics caught.
    pub fn tick(&self) {
        self.poll_faults();
        for d in self.all_domains() {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| d.tick()));
            match r {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => log::warn(&format!("{}: timed flush failed: {e}", Bdf(d.sid))),
                Err(_) => {
                    stats::add(&self.security.internal_errors, 1);
                    log::warn(&format!("{}: timed flush panicked", Bdf(d.sid)));
                }
            }
        }
    }

    /// Reads the unit's fault records into the fault book, and blocks the
    /// devices that fault faster than the policy allows; returns how many
    /// records were read.
    pub fn poll_faults(&self) -> usize {
        let faults = self.unit.poll_faults();
        let now = self.unit.now_ms();
        let outcome = {
            let mut book = self.faults.lock().unwrap_or_else(|p| p.into_inner());
            let mut o = book.record(&faults, now);
            o.log.extend(book.tick(now));
            o
        };
        for f in &faults {
            if let Some(d) = self.domain(f.sid) {
                stats::add(&d.stats.faults, 1);
            }
        }
        for l in &outcome.log {
            log::warn(l);
        }
        for sid in outcome.block {
            if let Some(d) = self.domain(sid) {
                if let Err(e) = d.block() {
                    log::warn(&format!("{}: blocking failed: {e}", Bdf(sid)));
                }
            }
        }
        faults.len()
    }

    /// Takes in a domain adopted from a previous iommud: attached, its
    /// device translating, waiting `grace` for its owner to reattach.
    pub fn add_orphan(&self, d: Arc<Domain>, token: u128, uid: u32, grace: std::time::Duration) {
        let sid = d.sid;
        let mut doms = self.domains.lock().unwrap_or_else(|p| p.into_inner());
        doms.insert(sid, d);
        self.orphans
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                sid,
                Orphan {
                    token,
                    uid,
                    until: Instant::now() + grace,
                },
            );
    }

    /// Takes the orphan of `sid` for a reattaching owner: its uid must be
    /// the recorded owner's and its token the recorded one (compared in
    /// constant time). The orphan is no longer one afterwards.
    pub fn claim_orphan(&self, sid: u16, uid: u32, token: u128) -> Result<Arc<Domain>, String> {
        let doms = self.domains.lock().unwrap_or_else(|p| p.into_inner());
        let mut orphans = self.orphans.lock().unwrap_or_else(|p| p.into_inner());
        let Some(o) = orphans.get(&sid).copied() else {
            return Err(format!(
                "no domain of {} waits for its owner (never adopted, reattached already, \
                 or its grace period ended)",
                Bdf(sid)
            ));
        };
        let diff = (o.token ^ token).count_ones() | (o.uid ^ uid);
        if diff != 0 || token == 0 {
            return Err(format!(
                "{}: the reattach token or the uid does not match the domain's owner",
                Bdf(sid)
            ));
        }
        let d = doms
            .get(&sid)
            .cloned()
            .ok_or_else(|| format!("{}: adopted domain gone", Bdf(sid)))?;
        orphans.remove(&sid);
        Ok(d)
    }

    /// True if `sid`'s domain waits for its owner; how long it still will.
    pub fn orphan_left(&self, sid: u16) -> Option<std::time::Duration> {
        self.orphans
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&sid)
            .map(|o| o.until.saturating_duration_since(Instant::now()))
    }

    /// Blocks and frees every orphan whose grace period ended; returns when
    /// the next one ends (`None`: no orphan left).
    pub fn expire_orphans(&self) -> Option<Instant> {
        let now = Instant::now();
        let (due, next): (Vec<u16>, Option<Instant>) = {
            let o = self.orphans.lock().unwrap_or_else(|p| p.into_inner());
            (
                o.iter()
                    .filter(|(_, v)| v.until <= now)
                    .map(|(k, _)| *k)
                    .collect(),
                o.values().map(|v| v.until).filter(|t| *t > now).min(),
            )
        };
        for sid in due {
            log::warn(&format!(
                "{}: its owner did not come back within the grace period: device blocked, \
                 domain freed",
                Bdf(sid)
            ));
            self.detach(sid);
        }
        next
    }

    /// Tears down every domain (a stop): each device is blocked (context
    /// entry cleared and invalidated) before its memory is freed. Clients
    /// see `dead` in their published page.
    pub fn detach_all(&self) {
        for d in self.all_domains() {
            self.detach(d.sid);
        }
    }

    /// Removes and tears down a domain.
    pub fn detach(&self, sid: u16) {
        // Tear down before the domain leaves the list, so whoever sees it
        // gone also sees the device blocked.
        let d = self.domain(sid);
        if let Some(d) = d {
            // The domain's figures before teardown gives its tables away.
            let mut last = Totals::of(&d);
            d.teardown();
            {
                // Under the list's lock, so `stats` counts the domain once.
                let mut doms = self.domains.lock().unwrap_or_else(|p| p.into_inner());
                let mut r = self.retired.lock().unwrap_or_else(|p| p.into_inner());
                // Teardown's own invalidation and frees count too.
                let after = Totals::of(&d);
                last.invalidations = after.invalidations;
                last.pt_freed = after.pt_freed;
                *r = r.add(last);
                doms.remove(&sid);
                // Under the list's lock too: a new attach of `sid` (which
                // sets its owner under that lock) must not lose its owner
                // to this late removal.
                self.owners
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&sid);
                self.orphans
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&sid);
                self.detached.notify_all();
            }
            log::info(&format!("{}: detached, mappings reclaimed", Bdf(sid)));
        }
    }

    fn render_stats(&self) -> String {
        let mut t = Text::default();
        let (doms, retired) = {
            let doms = self.domains.lock().unwrap_or_else(|p| p.into_inner());
            let r = *self.retired.lock().unwrap_or_else(|p| p.into_inner());
            (doms.values().cloned().collect::<Vec<_>>(), r)
        };
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
        let all = doms.iter().fold(retired, |acc, d| acc.add(Totals::of(d)));
        let live = doms
            .iter()
            .fold(0u64, |a, d| a.saturating_add(d.table_pages().2));
        let sec = &self.security;
        t.kv("maps", all.maps)
            .kv("unmaps", all.unmaps)
            .kv("magazine_hits", all.hits)
            .kv("magazine_misses", all.misses)
            .kv("depot_exchanges", all.exchanges)
            .kv("ipc_round_trips", all.ipc)
            .kv("ipc_wakeups", all.wakeups)
            .kv("lock_acquisitions", all.locks)
            .kv("pt_pages_allocated", all.pt_allocated)
            .kv("pt_pages_freed", all.pt_freed)
            .kv("pt_pages_live", live)
            .kv("domain_invalidations", all.invalidations)
            .kv("rejected_inputs", all.rejected)
            .kv("refused_admin", stats::get(&sec.refused_admin))
            .kv("refused_proof", stats::get(&sec.refused_proof))
            .kv("refused_policy", stats::get(&sec.refused_policy))
            .kv("refused_read", stats::get(&sec.refused_read))
            .kv("connections", stats::get(&self.open_connections))
            .kv("refused_connections", stats::get(&sec.refused_connections))
            .kv(
                "refused_quota",
                self.accounts
                    .all()
                    .iter()
                    .fold(0u64, |a, c| a.saturating_add(stats::get(&c.refused))),
            )
            .kv("malformed", stats::get(&sec.malformed))
            .kv("internal_errors", stats::get(&sec.internal_errors))
            .kv("timer_kicks", stats::get(&self.timer.kicks));
        self.unit.stats.render(&mut t);
        t.0
    }

    /// One line per identity: `uid U pool_bytes used/limit ...`; a
    /// non-administrator sees its own line only.
    fn render_quotas(&self, caller: &Peer) -> String {
        let admin = self.policy.is_admin(caller);
        let mut s = String::new();
        for a in self.accounts.all() {
            if !admin && a.uid != caller.uid {
                continue;
            }
            s.push_str(&format!("uid {}", a.uid));
            for q in Quota::ALL {
                s.push_str(&format!(" {} {}/{}", q.name(), a.used(q), a.limit(q)));
            }
            s.push_str(&format!(" refused {}\n", stats::get(&a.refused)));
        }
        s
    }
}

impl State {
    /// Refuses `caller` unless it administers iommud.
    pub(crate) fn need_admin(&self, caller: &Peer, what: &str) -> Result<(), ErrorCode> {
        if self.policy.is_admin(caller) {
            return Ok(());
        }
        stats::add(&self.security.refused_admin, 1);
        log::warn(&format!(
            "refused {what} to uid {} gid {} pid {}: not an administrator",
            caller.uid, caller.gid, caller.pid
        ));
        Err(ErrorCode::PermissionDenied)
    }

    /// The administrator's rule for `sid`.
    pub fn rule_for(&self, sid: u16) -> &crate::policy::DeviceRule {
        self.policy.rule_for(sid, self.authority.device_ids(sid))
    }

    /// Checks a strategy/flush switch of `d` against the policy.
    fn check_switch(
        &self,
        d: &Domain,
        s: Option<Strategy>,
        f: Option<FlushPolicy>,
    ) -> Result<(), ErrorCode> {
        let (cs, cf) = d.policy();
        let (s, f) = (s.unwrap_or(cs), f.unwrap_or(cf));
        let allowed = if s == Strategy::NoIommu {
            Ok(())
        } else {
            self.rule_for(d.sid).check(s, f)
        };
        allowed.map_err(|e| {
            stats::add(&self.security.refused_policy, 1);
            log::warn(&format!("{}: switch refused: {e}", Bdf(d.sid)));
            ErrorCode::PermissionDenied
        })
    }
}

impl SchemeTree for State {
    fn read(&self, caller: &Peer, path: &str) -> Result<String, ErrorCode> {
        let dom = |sid| self.domain(sid).ok_or(ErrorCode::NotFound);
        Ok(match parse(path)? {
            Node::Stats => self.render_stats(),
            Node::Domains => self
                .all_domains()
                .iter()
                .map(|d| format!("{}\n", Bdf(d.sid)))
                .collect(),
            Node::DomainStats(s) => {
                let mut text = dom(s)?.render_stats();
                // Who holds the device (the kernel's record of the
                // attaching process); absent only mid-teardown.
                if let Some(o) = self.owner(s) {
                    text.push_str(&format!("owner_uid {}\nowner_pid {}\n", o.uid, o.pid));
                }
                text
            }
            Node::DomainStrategy(s) => format!("{}\n", dom(s)?.policy().0.name()),
            Node::DomainFlush(s) => format!("{}\n", dom(s)?.policy().1.name()),
            Node::DomainMappings(s) => {
                // Physical addresses of a domain: its owner's and the
                // administrator's business only.
                let d = dom(s)?;
                if self.owner(s) != Some(*caller) && !self.policy.is_admin(caller) {
                    stats::add(&self.security.refused_read, 1);
                    return Err(ErrorCode::PermissionDenied);
                }
                d.render_mappings()
            }
            Node::Faults => self
                .faults
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .render(),
            Node::Quotas => self.render_quotas(caller),
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

    fn write(&self, caller: &Peer, path: &str, value: &str) -> Result<(), ErrorCode> {
        let node = parse(path)?;
        self.need_admin(caller, &format!("write of {path}"))?;
        let dom = |sid| self.domain(sid).ok_or(ErrorCode::NotFound);
        match node {
            Node::DomainStrategy(s) => {
                let st = Strategy::parse(value).ok_or(ErrorCode::Invalid)?;
                let d = dom(s)?;
                self.check_switch(&d, Some(st), None)?;
                d.set_policy(Some(st), None).map_err(|e| e.code())
            }
            Node::DomainFlush(s) => {
                let f = FlushPolicy::parse(value).ok_or(ErrorCode::Invalid)?;
                let d = dom(s)?;
                self.check_switch(&d, None, Some(f))?;
                d.set_policy(None, Some(f)).map_err(|e| e.code())
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
