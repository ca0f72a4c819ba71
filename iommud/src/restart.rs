//! A restarted iommud adopts the domains the previous one left
//! (docs/ARCHITECTURE.md, "Stop, crash and restart").
//!
//! Before the unit is taken over, [`prepare`] reads every ledger in the state
//! directory and takes back the memory each names (ledger, arena, pools),
//! contents kept. The takeover then carries those devices' context entries
//! into the new root ([`crate::unit::Iommu::init_carrying`]), so they keep
//! translating, and [`adopt_all`] builds each domain anew over its old arena
//! and pools. An adopted domain waits for its owner (`--grace-ms`); the
//! owner's libdma reconnects and reattaches with its token, and a domain
//! nobody claims in time is torn down (device blocked, memory freed).

use crate::domain::{Adoption, Domain, IOVA_SPAN};
use crate::hw::PhysMem;
use crate::ledger::{Ledger, LEDGER_BYTES};
use crate::pagetable::PAGE;
use crate::persist::StateDir;
use crate::session::State;
use crate::unit::{log, Carried};
use iommu_abi::proto::Strategy;
use iommu_abi::Bdf;
use std::sync::Arc;
use std::time::Duration;

/// Reads the ledgers a previous iommud left and takes back their memory.
/// A file that cannot be used is left in the stale list: it is removed
/// only once the unit walks this iommud's root (its device blocked).
pub fn prepare(sd: &mut StateDir, mem: &dyn PhysMem) -> Vec<Adoption> {
    let mut out: Vec<Adoption> = Vec::new();
    for name in sd.ledgers() {
        let ledger = match mem.adopt_region(None, LEDGER_BYTES, Some(&name)) {
            Ok(r) => r,
            Err(e) => {
                log::warn(&format!("{name}: not adopted: {e}"));
                continue;
            }
        };
        let Some(image) = Ledger::open(ledger.clone())
            .ok()
            .and_then(|l| l.read(IOVA_SPAN / PAGE))
        else {
            // A domain torn down (or blocked) before the crash, or not a ledger.
            continue;
        };
        let h = image.header;
        if !matches!(h.strategy, Strategy::Magazine | Strategy::Static)
            || out.iter().any(|a| a.image.header.sid == h.sid)
        {
            log::warn(&format!(
                "{}: its {} domain cannot be adopted; the device stays blocked",
                Bdf(h.sid),
                h.strategy.name()
            ));
            continue;
        }
        let mut regions = Vec::new();
        // The shared pages and rings too: a domain adopted once must be
        // adoptable again after the next crash.
        let mut names = vec![name.clone()];
        names.extend(image.shared.0.iter().cloned());
        names.extend(image.shared.1.iter().cloned());
        names.extend(image.rings.iter().map(|r| r.0.clone()));
        for r in &image.regions {
            match mem.adopt_region(Some(r.phys), r.len, r.name.as_deref()) {
                Ok(got) => {
                    regions.push(got);
                    names.extend(r.name.clone());
                }
                Err(e) => {
                    log::warn(&format!(
                        "{}: region {:#x} ({:?}) not adopted: {e}; the device stays blocked",
                        Bdf(h.sid),
                        r.phys,
                        r.name
                    ));
                    break;
                }
            }
        }
        if regions.len() != image.regions.len() {
            continue;
        }
        for n in &names {
            sd.keep(n);
        }
        out.push(Adoption {
            image,
            ledger,
            regions,
        });
    }
    out
}

/// The context entries the takeover carries over.
pub fn carried(adoptions: &[Adoption]) -> Vec<Carried> {
    adoptions
        .iter()
        .map(|a| Carried {
            sid: a.image.header.sid,
            did: a.image.header.did,
            root: a.image.root,
        })
        .collect()
}

/// Adopts each domain (see the module doc) and starts the grace period of
/// every one adopted; a domain that cannot be adopted has its device
/// blocked and its memory freed.
pub fn adopt_all(state: &Arc<State>, adoptions: Vec<Adoption>, grace: Duration) {
    let unit = state.unit.clone();
    let reclaim = state.reclaim.load(std::sync::atomic::Ordering::SeqCst);
    for a in adoptions {
        let h = a.image.header;
        let account = state.accounts.of(h.owner.0);
        // The administrator's policy of this start decides, not the last one's.
        let rule = state.rule_for(h.sid);
        let allowed = if rule.trust != h.trust {
            Err(format!(
                "the policy now gives it {} trust, not {}",
                rule.trust.name(),
                h.trust.name()
            ))
        } else {
            rule.check(h.strategy, h.flush)
        };
        let adopted = allowed.map_err(|e| e.to_string()).and_then(|()| {
            Domain::adopt(unit.clone(), &a, reclaim, account).map_err(|e| e.to_string())
        });
        match adopted {
            Ok(d) => {
                log::info(&format!(
                    "{}: adopted (domain {}, {} pools, {} allocations) from the previous \
                     iommud; its driver (uid {}) may reattach within {} ms",
                    Bdf(h.sid),
                    h.did,
                    a.regions.len() - usize::from(a.image.has_arena),
                    a.image.pages.len(),
                    h.owner.0,
                    grace.as_millis()
                ));
                if d.rings().is_some() {
                    state.service.add(d.clone());
                }
                state.add_orphan(d, h.token, h.owner.0, grace);
            }
            Err(e) => {
                log::warn(&format!(
                    "{}: adoption failed: {e}; device blocked",
                    Bdf(h.sid)
                ));
                if let Err(e) = unit.clear_context(h.sid, h.did) {
                    log::warn(&format!(
                        "{}: blocking failed: {e}; its memory is kept",
                        Bdf(h.sid)
                    ));
                    continue;
                }
                unit.free_did(h.did);
                let mem = unit.mem();
                for r in a.regions.iter().chain([&a.ledger]) {
                    mem.free_region(r);
                }
            }
        }
    }
    let st = state.clone();
    std::thread::spawn(move || {
        while let Some(next) = st.expire_orphans() {
            std::thread::sleep(next.saturating_duration_since(std::time::Instant::now()));
        }
    });
}
