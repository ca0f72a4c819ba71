//! Quotas per client identity (uid): what one driver may hold of iommud's
//! resources, so that a misbehaving or hostile one runs out of its own share
//! and nobody else's (docs/ARCHITECTURE.md, "Trust and the attacker").
//!
//! Every charge is checked against the limit and made in one atomic step,
//! and given back when the resource goes (an unmap, a freed table, a
//! detached domain, a closed connection), so the figures return to zero when
//! a client is gone.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};

/// One kind of resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quota {
    /// Bytes of DMA pool memory.
    PoolBytes = 0,
    /// Live page-table pages of the client's domains.
    PtPages = 1,
    /// Live mappings made by iommud plus IOVAs delegated to magazines.
    Mappings = 2,
    /// Attached domains.
    Domains = 3,
    /// Open connections.
    Connections = 4,
}

const KINDS: usize = 5;

impl Quota {
    /// Every kind.
    pub const ALL: [Quota; KINDS] = [
        Quota::PoolBytes,
        Quota::PtPages,
        Quota::Mappings,
        Quota::Domains,
        Quota::Connections,
    ];

    /// The name in the configuration, errors and stats.
    pub fn name(self) -> &'static str {
        match self {
            Quota::PoolBytes => "pool_bytes",
            Quota::PtPages => "pt_pages",
            Quota::Mappings => "mappings",
            Quota::Domains => "domains",
            Quota::Connections => "connections",
        }
    }
}

/// The limits of one identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits(pub [u64; KINDS]);

impl Default for Limits {
    /// 256 MiB of pools, 16 Ki table pages (64 MiB), 1 Mi mappings, 16
    /// domains and 64 connections per identity.
    fn default() -> Self {
        Limits([256 << 20, 16 << 10, 1 << 20, 16, 64])
    }
}

impl Limits {
    /// The limit of `q`.
    pub fn get(&self, q: Quota) -> u64 {
        self.0[q as usize]
    }

    /// Sets the limit of `q`.
    pub fn set(&mut self, q: Quota, v: u64) {
        self.0[q as usize] = v;
    }
}

/// What one identity holds, against its limits.
#[derive(Debug)]
pub struct Account {
    /// The identity.
    pub uid: u32,
    limits: Limits,
    used: [AtomicU64; KINDS],
    /// Charges refused.
    pub refused: AtomicU64,
}

impl Account {
    fn new(uid: u32, limits: Limits) -> Account {
        Account {
            uid,
            limits,
            used: Default::default(),
            refused: AtomicU64::new(0),
        }
    }

    /// Takes `n` of `q`, or refuses with a message naming the quota.
    pub fn charge(&self, q: Quota, n: u64) -> Result<(), String> {
        let limit = self.limits.get(q);
        let used = &self.used[q as usize];
        let r = used.fetch_update(SeqCst, SeqCst, |u| {
            u.checked_add(n).filter(|total| *total <= limit)
        });
        r.map(|_| ()).map_err(|u| {
            self.refused.fetch_add(1, SeqCst);
            format!(
                "quota {} exceeded for uid {}: {u} in use, {n} more asked, limit {limit}",
                q.name(),
                self.uid
            )
        })
    }

    /// Takes `n` of `q` whatever the limit (for what was already taken: the
    /// tables a permitted map needed).
    pub fn add(&self, q: Quota, n: u64) {
        let _ = self.used[q as usize].fetch_update(SeqCst, SeqCst, |u| Some(u.saturating_add(n)));
    }

    /// Refuses when `q` is already at its limit.
    pub fn check(&self, q: Quota) -> Result<(), String> {
        let (u, limit) = (self.used(q), self.limits.get(q));
        if u < limit {
            return Ok(());
        }
        self.refused.fetch_add(1, SeqCst);
        Err(format!(
            "quota {} exceeded for uid {}: {u} in use, limit {limit}",
            q.name(),
            self.uid
        ))
    }

    /// Gives `n` of `q` back.
    pub fn release(&self, q: Quota, n: u64) {
        let _ = self.used[q as usize].fetch_update(SeqCst, SeqCst, |u| Some(u.saturating_sub(n)));
    }

    /// How much of `q` is in use.
    pub fn used(&self, q: Quota) -> u64 {
        self.used[q as usize].load(SeqCst)
    }

    /// The limit of `q`.
    pub fn limit(&self, q: Quota) -> u64 {
        self.limits.get(q)
    }
}

/// Every identity's account.
#[derive(Debug, Default)]
pub struct Accounts {
    /// Limits of identities without their own.
    pub default: Limits,
    /// Limits per uid.
    pub per_uid: HashMap<u32, Limits>,
    open: Mutex<HashMap<u32, Arc<Account>>>,
}

impl Accounts {
    /// Accounts with these limits.
    pub fn new(default: Limits, per_uid: HashMap<u32, Limits>) -> Accounts {
        Accounts {
            default,
            per_uid,
            open: Mutex::new(HashMap::new()),
        }
    }

    /// The account of `uid` (one per identity, shared by its connections).
    pub fn of(&self, uid: u32) -> Arc<Account> {
        let mut m = self.open.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(uid)
            .or_insert_with(|| {
                Arc::new(Account::new(
                    uid,
                    self.per_uid.get(&uid).copied().unwrap_or(self.default),
                ))
            })
            .clone()
    }

    /// Every account, by uid.
    pub fn all(&self) -> Vec<Arc<Account>> {
        let m = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = m.values().cloned().collect();
        v.sort_by_key(|a| a.uid);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_stop_at_the_limit_and_come_back() {
        let mut l = Limits::default();
        l.set(Quota::Domains, 2);
        let a = Accounts::new(l, HashMap::new()).of(7);
        assert!(a.charge(Quota::Domains, 1).is_ok());
        assert!(a.charge(Quota::Domains, 1).is_ok());
        let e = a.charge(Quota::Domains, 1).unwrap_err();
        assert!(e.contains("quota domains exceeded for uid 7"), "{e}");
        assert_eq!(a.used(Quota::Domains), 2);
        assert_eq!(a.refused.load(SeqCst), 1);
        a.release(Quota::Domains, 1);
        assert!(a.charge(Quota::Domains, 1).is_ok());
        a.release(Quota::Domains, 5);
        assert_eq!(a.used(Quota::Domains), 0, "never below zero");
        // No wrap-around on hostile sizes.
        assert!(a.charge(Quota::PoolBytes, u64::MAX).is_err());
    }

    #[test]
    fn identities_have_their_own_accounts_and_limits() {
        let mut l = Limits::default();
        l.set(Quota::Connections, 1);
        let mut per = HashMap::new();
        let mut big = l;
        big.set(Quota::Connections, 3);
        per.insert(0, big);
        let acc = Accounts::new(l, per);
        let (root, user) = (acc.of(0), acc.of(1000));
        assert!(Arc::ptr_eq(&root, &acc.of(0)));
        assert!(user.charge(Quota::Connections, 1).is_ok());
        assert!(user.charge(Quota::Connections, 1).is_err());
        for _ in 0..3 {
            assert!(root.charge(Quota::Connections, 1).is_ok());
        }
        assert_eq!(acc.all().len(), 2);
    }
}
