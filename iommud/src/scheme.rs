//! The scheme path tree (Redox convention), shared by every transport.
//!
//! ```text
//! stats                         unit-wide counters
//! domains                       one attached BDF per line
//! domains/<bdf>/stats           per-domain counters
//! domains/<bdf>/strategy        read: name; write: switch (idle domain only)
//! domains/<bdf>/flush           read: name; write: switch
//! domains/<bdf>/mappings        iommud-made mappings
//! faults                        recorded DMA faults, oldest first
//! reclaim                       read/write: on | off (empty page-table reclamation)
//! quotas                        per client identity: each quota's use and limit
//!                               (the caller's own line; an administrator's: all)
//! ```
//!
//! Paths may be given as `/scheme/iommu/<p>`, `iommu:<p>`, `/<p>` or `<p>`.

use crate::policy::Peer;
use iommu_abi::proto::ErrorCode;
use iommu_abi::Bdf;

/// A node of the tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Node {
    /// `stats`.
    Stats,
    /// `domains`.
    Domains,
    /// `domains/<bdf>/stats`.
    DomainStats(u16),
    /// `domains/<bdf>/strategy`.
    DomainStrategy(u16),
    /// `domains/<bdf>/flush`.
    DomainFlush(u16),
    /// `domains/<bdf>/mappings`.
    DomainMappings(u16),
    /// `faults`.
    Faults,
    /// `reclaim`.
    Reclaim,
    /// `quotas`.
    Quotas,
}

/// Parses a path into a node.
pub fn parse(path: &str) -> Result<Node, ErrorCode> {
    let p = path.trim();
    let p = p
        .strip_prefix("/scheme/iommu")
        .or_else(|| p.strip_prefix("iommu:"))
        .unwrap_or(p);
    let p = p.trim_matches('/');
    let parts: Vec<&str> = p.split('/').collect();
    Ok(match parts.as_slice() {
        ["stats"] => Node::Stats,
        ["domains"] => Node::Domains,
        ["faults"] => Node::Faults,
        ["reclaim"] => Node::Reclaim,
        ["quotas"] => Node::Quotas,
        ["domains", bdf, leaf] => {
            let sid = Bdf::parse(bdf).map(|b| b.0).ok_or(ErrorCode::NotFound)?;
            match *leaf {
                "stats" => Node::DomainStats(sid),
                "strategy" => Node::DomainStrategy(sid),
                "flush" => Node::DomainFlush(sid),
                "mappings" => Node::DomainMappings(sid),
                _ => return Err(ErrorCode::NotFound),
            }
        }
        _ => return Err(ErrorCode::NotFound),
    })
}

/// What serves the tree: implemented by the server state, used by the Unix
/// socket server and the Redox scheme alike. `caller` is the verified
/// identity of whoever asks: every write is an administrator's, and a
/// domain's `mappings` are its owner's or an administrator's.
pub trait SchemeTree {
    /// Reads a path: `key value` lines (or a bare value for policy files).
    fn read(&self, caller: &Peer, path: &str) -> Result<String, ErrorCode>;
    /// Writes a value to a path.
    fn write(&self, caller: &Peer, path: &str, value: &str) -> Result<(), ErrorCode>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_path_spellings_parse_to_the_same_node() {
        for p in [
            "/scheme/iommu/domains/00:01.0/stats",
            "iommu:domains/00:01.0/stats",
            "/domains/00:01.0/stats",
            "domains/0000:00:01.0/stats",
        ] {
            assert_eq!(parse(p), Ok(Node::DomainStats(0x0008)), "{p}");
        }
        assert_eq!(parse("/scheme/iommu/stats"), Ok(Node::Stats));
        assert_eq!(parse("faults"), Ok(Node::Faults));
        assert_eq!(
            parse("domains/00:02.0/strategy"),
            Ok(Node::DomainStrategy(0x10))
        );
        assert_eq!(parse("domains/00:02.0/flush"), Ok(Node::DomainFlush(0x10)));
    }

    #[test]
    fn unknown_paths_are_not_found() {
        for p in [
            "",
            "/",
            "stat",
            "domains/zz/stats",
            "domains/00:01.0",
            "domains/00:01.0/x",
            "a/b/c/d",
        ] {
            assert_eq!(parse(p), Err(ErrorCode::NotFound), "{p:?}");
        }
    }
}
