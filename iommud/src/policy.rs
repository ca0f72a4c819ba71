//! The administrator's policy: who may administer iommud, and, per device,
//! which trust mode, strategies and flush policies a driver may have
//! (docs/ARCHITECTURE.md, "Trust and the attacker").
//!
//! Trust is the administrator's choice, never the driver's: a delegated
//! leaf entry can name any physical address, so a driver that could choose
//! delegated trust could make its device read and write all of memory. The
//! default for every device is therefore `validated`, where iommud checks
//! every map and writes every entry (for the `magazine` strategy it keeps
//! the magazines itself and serves maps through the rings); `delegated`
//! (the driver writes the leaf entries of the IOVAs it holds) must be
//! granted per device in the configuration file. `static` (each pool mapped
//! whole once: no per-buffer protection) is never a default; list it to
//! allow it:
//!
//! ```toml
//! # Who may stop iommud, write the path tree, read any domain's mappings:
//! # root always, and members of these groups (numeric gids).
//! admin_gids = [10]
//! # Connections served at once, all clients together (the default).
//! max_connections = 512
//! # A device faulting faster than this (per second) is blocked (0: never).
//! fault_block_per_second = 10000
//!
//! # Every device not matched below (these are the defaults).
//! [default]
//! trust = "validated"
//! strategies = ["global", "magazine", "identity", "va"]
//! flush = ["strict", "percore", "deferred"]
//!
//! # A device, by PCI address or by vendor:device id (first match wins).
//! [[device]]
//! match = "00:01.0"          # or "0000:00:01.0", or "8086:100e"
//! trust = "delegated"
//! strategies = ["magazine", "global"]
//!
//! # What one client identity (uid) may hold (defaults shown); see `quota`.
//! [quota]
//! pool_bytes = 268435456
//! pt_pages = 16384
//! mappings = 1048576
//! domains = 16
//! connections = 64
//! [[quota.user]]
//! uid = 0
//! connections = 256
//! ```
//!
//! A missing `strategies` list means every strategy but `static`; a missing
//! `flush` list every flush policy. Unknown keys are errors, so a typo cannot silently widen access.

use crate::quota::{Limits, Quota};
use iommu_abi::proto::{FlushPolicy, Strategy};
use iommu_abi::Bdf;
use serde::Deserialize;
use std::collections::HashMap;

/// The verified identity of a client: what the kernel says about the other
/// end of the connection (Linux `SO_PEERCRED`, Redox the caller's uid/gid),
/// never what the client says about itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// Process id (for logs; 0 where unknown).
    pub pid: i32,
}

impl Peer {
    /// The superuser.
    pub const ROOT: Peer = Peer {
        uid: 0,
        gid: 0,
        pid: 0,
    };
}

/// How far a domain's driver is trusted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Trust {
    /// iommud checks every frame and writes every entry: the IOMMU confines a
    /// compromised driver too.
    Validated,
    /// The driver writes leaf entries of the IOVAs it holds (the magazine
    /// strategy): the IOMMU confines the device; the driver is trusted for
    /// its own domain, as Linux trusts an in-kernel driver.
    Delegated,
}

impl Trust {
    /// The name in stats and the configuration.
    pub fn name(self) -> &'static str {
        match self {
            Trust::Validated => "validated",
            Trust::Delegated => "delegated",
        }
    }

    /// The trust of a number `self as u64` gave (a ledger's record).
    pub fn from_u64(v: u64) -> Option<Trust> {
        match v {
            0 => Some(Trust::Validated),
            1 => Some(Trust::Delegated),
            _ => None,
        }
    }
}

/// What one device's driver may have.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceRule {
    /// Most trust granted.
    pub trust: Trust,
    /// Strategies allowed.
    pub strategies: Vec<Strategy>,
    /// Flush policies allowed.
    pub flush: Vec<FlushPolicy>,
}

impl DeviceRule {
    /// Checks a request for strategy `s` with flush policy `f`; the error
    /// says what the policy allows.
    pub fn check(&self, s: Strategy, f: FlushPolicy) -> Result<(), String> {
        if s != Strategy::NoIommu && !self.strategies.contains(&s) {
            return Err(format!(
                "strategy {} is not allowed for this device (allowed: {})",
                s.name(),
                names(self.strategies.iter().map(|s| s.name()))
            ));
        }
        if !self.flush.contains(&f) {
            return Err(format!(
                "flush policy {} is not allowed for this device (allowed: {})",
                f.name(),
                names(self.flush.iter().map(|f| f.name()))
            ));
        }
        Ok(())
    }
}

fn names<'a>(it: impl Iterator<Item = &'a str>) -> String {
    it.collect::<Vec<_>>().join(", ")
}

/// How a rule names its device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Match {
    /// A PCI function (source id).
    Bdf(u16),
    /// A vendor:device id.
    Id(u16, u16),
}

/// The whole policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Groups whose members administer iommud (root always does).
    pub admin_gids: Vec<u32>,
    /// Rule for devices no entry matches.
    pub default: DeviceRule,
    /// Per-device rules, first match wins.
    pub devices: Vec<(Match, DeviceRule)>,
    /// Connections the daemon serves at once (all identities).
    pub max_connections: u64,
    /// DMA faults per second past which a device is blocked (0: never).
    pub fault_block_per_second: u64,
    /// Quotas of identities without their own.
    pub quota: Limits,
    /// Quotas per uid.
    pub quota_per_uid: HashMap<u32, Limits>,
}

impl Default for Policy {
    /// Validated trust for every device, root alone administers.
    fn default() -> Self {
        Policy {
            admin_gids: Vec::new(),
            default: rule(Trust::Validated, None, None),
            devices: Vec::new(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            fault_block_per_second: crate::faults::DEFAULT_BLOCK_PER_SECOND,
            quota: Limits::default(),
            quota_per_uid: HashMap::new(),
        }
    }
}

/// Connections served at once unless the configuration says otherwise.
pub const DEFAULT_MAX_CONNECTIONS: u64 = 512;

fn rule(trust: Trust, s: Option<Vec<Strategy>>, f: Option<Vec<FlushPolicy>>) -> DeviceRule {
    DeviceRule {
        trust,
        strategies: s.unwrap_or_else(|| {
            Strategy::ALL
                .into_iter()
                .filter(|s| !matches!(s, Strategy::NoIommu | Strategy::Static))
                .collect()
        }),
        flush: f.unwrap_or_else(|| FlushPolicy::ALL.to_vec()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRule {
    trust: Option<Trust>,
    strategies: Option<Vec<String>>,
    flush: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDevice {
    #[serde(rename = "match")]
    matches: String,
    #[serde(flatten)]
    rule: FileRule,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileLimits {
    pool_bytes: Option<u64>,
    pt_pages: Option<u64>,
    mappings: Option<u64>,
    domains: Option<u64>,
    connections: Option<u64>,
}

impl FileLimits {
    fn apply(&self, mut l: Limits) -> Limits {
        for (q, v) in [
            (Quota::PoolBytes, self.pool_bytes),
            (Quota::PtPages, self.pt_pages),
            (Quota::Mappings, self.mappings),
            (Quota::Domains, self.domains),
            (Quota::Connections, self.connections),
        ] {
            if let Some(v) = v {
                l.set(q, v);
            }
        }
        l
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileUserLimits {
    uid: u32,
    #[serde(flatten)]
    limits: FileLimits,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileQuota {
    #[serde(flatten)]
    limits: FileLimits,
    #[serde(default)]
    user: Vec<FileUserLimits>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    admin_gids: Vec<u32>,
    default: Option<FileRule>,
    #[serde(default)]
    device: Vec<FileDevice>,
    #[serde(default)]
    quota: FileQuota,
    max_connections: Option<u64>,
    fault_block_per_second: Option<u64>,
}

impl FileRule {
    fn build(&self, inherit: Option<&DeviceRule>) -> Result<DeviceRule, String> {
        let trust = self
            .trust
            .or(inherit.map(|r| r.trust))
            .unwrap_or(Trust::Validated);
        let strategies = match &self.strategies {
            Some(v) => Some(
                v.iter()
                    .map(|n| {
                        Strategy::parse(n)
                            .filter(|s| *s != Strategy::NoIommu)
                            .ok_or_else(|| format!("unknown strategy {n:?}"))
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
            None => None,
        };
        let flush = match &self.flush {
            Some(v) => Some(
                v.iter()
                    .map(|n| FlushPolicy::parse(n).ok_or_else(|| format!("unknown flush {n:?}")))
                    .collect::<Result<Vec<_>, _>>()?,
            ),
            None => inherit.map(|r| r.flush.clone()),
        };
        Ok(rule(trust, strategies, flush))
    }
}

fn parse_match(s: &str) -> Result<Match, String> {
    if let Some(sid) = Bdf::parse(s).map(|b| b.0) {
        return Ok(Match::Bdf(sid));
    }
    let (v, d) = s
        .split_once(':')
        .filter(|(v, d)| v.len() == 4 && d.len() == 4)
        .ok_or_else(|| format!("{s:?} is neither a PCI address nor a vendor:device id"))?;
    let hex = |x: &str| u16::from_str_radix(x, 16).map_err(|_| format!("bad id {s:?}"));
    Ok(Match::Id(hex(v)?, hex(d)?))
}

impl Policy {
    /// Parses a configuration file's text.
    pub fn parse(text: &str) -> Result<Policy, String> {
        let f: File = toml::from_str(text).map_err(|e| e.to_string())?;
        let default = match &f.default {
            Some(r) => r.build(None).map_err(|e| format!("[default]: {e}"))?,
            None => Policy::default().default,
        };
        let mut devices = Vec::new();
        for (k, d) in f.device.iter().enumerate() {
            let m = parse_match(&d.matches).map_err(|e| format!("device {k}: {e}"))?;
            let r = d
                .rule
                .build(Some(&default))
                .map_err(|e| format!("device {k} ({}): {e}", d.matches))?;
            devices.push((m, r));
        }
        let quota = f.quota.limits.apply(Limits::default());
        let quota_per_uid = f
            .quota
            .user
            .iter()
            .map(|u| (u.uid, u.limits.apply(quota)))
            .collect();
        Ok(Policy {
            admin_gids: f.admin_gids,
            default,
            devices,
            max_connections: f.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS),
            fault_block_per_second: f
                .fault_block_per_second
                .unwrap_or(crate::faults::DEFAULT_BLOCK_PER_SECOND),
            quota,
            quota_per_uid,
        })
    }

    /// Reads and parses a configuration file.
    pub fn load(path: &std::path::Path) -> Result<Policy, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Policy::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// True when `p` may administer iommud.
    pub fn is_admin(&self, p: &Peer) -> bool {
        p.uid == 0 || self.admin_gids.contains(&p.gid)
    }

    /// The rule for device `sid` whose vendor:device id is `id` (if known).
    pub fn rule_for(&self, sid: u16, id: Option<(u16, u16)>) -> &DeviceRule {
        self.devices
            .iter()
            .find(|(m, _)| match *m {
                Match::Bdf(s) => s == sid,
                Match::Id(v, d) => id == Some((v, d)),
            })
            .map(|(_, r)| r)
            .unwrap_or(&self.default)
    }

    /// One line per rule, for the log at start-up.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "policy: admins uid 0 and gids {:?}; default {}",
            self.admin_gids,
            describe_rule(&self.default)
        );
        for (m, r) in &self.devices {
            let who = match m {
                Match::Bdf(sid) => Bdf(*sid).to_string(),
                Match::Id(v, d) => format!("{v:04x}:{d:04x}"),
            };
            s.push_str(&format!("; {who}: {}", describe_rule(r)));
        }
        s
    }
}

fn describe_rule(r: &DeviceRule) -> String {
    format!(
        "{} trust, strategies [{}], flush [{}]",
        r.trust.name(),
        names(r.strategies.iter().map(|s| s.name())),
        names(r.flush.iter().map(|f| f.name()))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_is_validated_without_static() {
        let p = Policy::default();
        let r = p.rule_for(0x08, None);
        assert_eq!(r.trust, Trust::Validated);
        assert_eq!(
            r.strategies,
            vec![
                Strategy::Global,
                Strategy::Magazine,
                Strategy::Identity,
                Strategy::Va
            ]
        );
        // A validated magazine: iommud keeps the magazines.
        assert!(r.check(Strategy::Magazine, FlushPolicy::PerCore).is_ok());
        assert!(r.check(Strategy::Static, FlushPolicy::PerCore).is_err());
        assert!(r.check(Strategy::Global, FlushPolicy::Strict).is_ok());
        assert!(p.is_admin(&Peer::ROOT));
        assert!(!p.is_admin(&Peer {
            uid: 65534,
            gid: 65534,
            pid: 1
        }));
    }

    #[test]
    fn devices_match_by_address_or_id_first_match_wins() {
        let p = Policy::parse(
            r#"
admin_gids = [10]
[default]
flush = ["strict"]
[[device]]
match = "00:01.0"
trust = "delegated"
strategies = ["magazine"]
flush = ["percore"]
[[device]]
match = "8086:100e"
trust = "delegated"
[[device]]
match = "0000:00:01.0"
trust = "validated"
"#,
        )
        .unwrap();
        assert!(p.is_admin(&Peer {
            uid: 1000,
            gid: 10,
            pid: 0
        }));
        let a = p.rule_for(0x08, Some((0x8086, 0x100e)));
        assert_eq!(a.trust, Trust::Delegated);
        assert_eq!(a.strategies, vec![Strategy::Magazine]);
        assert_eq!(a.flush, vec![FlushPolicy::PerCore]);
        // Matched by id: every strategy but static, flush inherited.
        let b = p.rule_for(0x10, Some((0x8086, 0x100e)));
        assert_eq!(b.trust, Trust::Delegated);
        assert_eq!(
            b.strategies,
            vec![
                Strategy::Global,
                Strategy::Magazine,
                Strategy::Identity,
                Strategy::Va
            ]
        );
        assert_eq!(b.flush, vec![FlushPolicy::Strict]);
        let c = p.rule_for(0x18, None);
        assert_eq!(c.trust, Trust::Validated);
        assert!(c.check(Strategy::Global, FlushPolicy::PerCore).is_err());
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        for (text, want) in [
            ("admin_gid = [1]", "unknown field"),
            ("[default]\ntrust = \"root\"", "unknown variant"),
            ("[[device]]\nmatch = \"zz\"", "neither a PCI address"),
            (
                "[[device]]\nmatch = \"00:01.0\"\nflush = [\"sometimes\"]",
                "unknown flush",
            ),
            (
                "[[device]]\nmatch = \"00:01.0\"\nstrategies = [\"noiommu\"]",
                "unknown strategy",
            ),
        ] {
            let e = Policy::parse(text).unwrap_err();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }
}
