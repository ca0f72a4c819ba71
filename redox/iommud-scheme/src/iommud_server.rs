//! [`Server`] for iommud's own state: the same [`iommud::scheme::parse`],
//! [`SchemeTree`] and [`Session::handle`] the Linux socket server calls.

use std::sync::Arc;

use iommu_abi::proto::{ErrorCode, Request};
use iommud::policy::Peer;
use iommud::scheme::{parse, Node, SchemeTree};
use iommud::session::{Session, State};

use crate::server::{Answer, PathKind, Server};

/// A session opened on `domains/<bdf>/session`: it may attach to `bdf` only.
pub struct DomainSession {
    bdf: u16,
    session: Session,
}

impl Server for Arc<State> {
    type Session = DomainSession;

    fn kind(&self, path: &str) -> Result<PathKind, ErrorCode> {
        // `domains/<bdf>/session` is the Redox-only leaf: its bdf is parsed by
        // the tree's own parser, through the sibling `stats` leaf.
        if let Some(dir) = path.trim_end_matches('/').strip_suffix("/session") {
            return match parse(&format!("{dir}/stats"))? {
                Node::DomainStats(bdf) => Ok(PathKind::Session { bdf }),
                _ => Err(ErrorCode::NotFound),
            };
        }
        Ok(match parse(path)? {
            Node::Domains => PathKind::Dir,
            Node::DomainStrategy(_) | Node::DomainFlush(_) | Node::Reclaim => PathKind::ReadWrite,
            Node::Stats
            | Node::DomainStats(_)
            | Node::DomainMappings(_)
            | Node::Faults
            | Node::Quotas => PathKind::ReadOnly,
        })
    }

    fn read(&self, caller: &Peer, path: &str) -> Result<String, ErrorCode> {
        SchemeTree::read(&**self, caller, path)
    }

    fn write(&self, caller: &Peer, path: &str, value: &str) -> Result<(), ErrorCode> {
        SchemeTree::write(&**self, caller, path, value)
    }

    fn open_session(&mut self, bdf: u16, caller: Peer) -> Result<DomainSession, ErrorCode> {
        Ok(DomainSession {
            bdf,
            session: Session::new(self.clone(), caller),
        })
    }

    fn handle(&mut self, s: &mut DomainSession, req: Request) -> Answer {
        if let Request::Attach { bdf, .. } = req {
            if bdf != s.bdf {
                return Answer {
                    result: Err(ErrorCode::NotOwner),
                    payload: b"this session was opened for another device".to_vec(),
                    shares: Vec::new(),
                };
            }
        }
        // Redox carries no descriptors here: the proof is the caller's
        // identity (iommud's Authority::Administrators on Redox).
        match s.session.handle(req, Vec::new()) {
            Some(r) => Answer {
                result: r.result,
                payload: r.payload,
                shares: r.shares,
            },
            // One-way request (FlushHint): the carrier still returns; say ok.
            None => Answer {
                result: Ok([0; 5]),
                payload: Vec::new(),
                shares: Vec::new(),
            },
        }
    }

    fn close_session(&mut self, s: DomainSession) {
        // Session's Drop detaches the domain: unmap, invalidate, reclaim.
        drop(s);
    }
}
