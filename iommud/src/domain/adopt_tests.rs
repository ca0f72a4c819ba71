//! Adoption after a crash, in one process over one simulated machine: the
//! first unit and domain are forgotten (nothing torn down), as a `kill -9`
//! leaves them, and a second unit takes over from the ledger.

use super::*;
use crate::ledger::{Ledger, PageEntry, LEDGER_BYTES};
use crate::platform::sim::{SimMmio, SimPlatform};
use crate::state::State;
use crate::unit::{Carried, UnitConfig};
use vtd::entry::SlPte;
use vtd::sim::{SimConfig, SimMachine};

const SID: u16 = 0x08;
const OWNER: (u32, u32) = (1000, 1000);

fn platform() -> (Arc<SimPlatform>, Arc<SimMachine>) {
    let p = Arc::new(
        SimPlatform::new(SimConfig {
            mem_bytes: 32 << 20,
            ..Default::default()
        })
        .unwrap(),
    );
    let m = p.machine().clone();
    (p, m)
}

fn unit(p: &Arc<SimPlatform>, m: &Arc<SimMachine>, carry: &[Carried]) -> Arc<Iommu> {
    let mem: Arc<dyn PhysMem> = p.clone();
    let u = Iommu::init_carrying(
        Box::new(SimMmio(m.clone())),
        mem,
        &UnitConfig::default(),
        carry,
    )
    .unwrap();
    u.set_journal(true);
    Arc::new(u)
}

/// A delegated magazine domain of [`SID`] (per-CPU flushes), charged to `account`.
fn delegated_magazine(u: &Arc<Iommu>, account: Arc<crate::quota::Account>) -> Arc<Domain> {
    Domain::new(
        u.clone(),
        SID,
        Strategy::Magazine,
        FlushPolicy::PerCore,
        Trust::Delegated,
        true,
        account,
    )
    .unwrap()
}

/// iommud dies with `dom` attached: nothing is torn down (as after a
/// `kill -9`), and the next iommud reads its ledger back.
fn crash(dom: Arc<Domain>, first: Arc<Iommu>) -> (crate::ledger::Image, Region) {
    let ledger = dom.ledger.get().unwrap().region.clone();
    std::mem::forget(dom);
    std::mem::forget(first);
    let image = Ledger::open(ledger.clone())
        .unwrap()
        .read(IOVA_SPAN / PAGE)
        .expect("a live ledger");
    (image, ledger)
}

/// The next iommud's takeover: the ledger's regions taken back, and a unit
/// that carries the device's context entry over.
fn take_over(
    p: &Arc<SimPlatform>,
    m: &Arc<SimMachine>,
    image: crate::ledger::Image,
    ledger: Region,
) -> (Adoption, Arc<Iommu>) {
    let regions = image
        .regions
        .iter()
        .map(|r| p.adopt_region(Some(r.phys), r.len, None).unwrap())
        .collect();
    let a = Adoption {
        image,
        ledger,
        regions,
    };
    let second = unit(p, m, &crate::restart::carried(std::slice::from_ref(&a)));
    (a, second)
}

/// The client's side of a delegated map: its own leaf entry in the arena.
fn client_map(d: &Domain, iova: u64, phys: u64) {
    let arena = d.arena().unwrap();
    let at = arena.phys + ((iova - IOVA_BASE) >> 12) * 8;
    d.mem()
        .write_u64(at, SlPte::new(phys, true, true).0)
        .unwrap();
}

#[test]
fn a_crashed_iommuds_domain_is_adopted_with_its_mappings_and_reclaimed_at_reattach() {
    let (p, m) = platform();
    let first = unit(&p, &m, &[]);
    let dom = delegated_magazine(&first, crate::quota::Accounts::default().of(OWNER.0));
    let token = dom.start_ledger(OWNER).expect("a ledger and a token");
    assert_ne!(token, 0);
    let (pool, _, _) = dom.alloc_pool(512 << 10).unwrap();
    // Four one-page IOVAs delegated; the client maps the first.
    assert_eq!(dom.exchange(1, 0, 4).unwrap(), 4);
    let iovas: Vec<u64> = (0..4).map(|k| dom.exchange_slot(k).unwrap()).collect();
    client_map(&dom, iovas[0], pool.phys);
    // And a map too large for a magazine, which iommud makes: 64 pages.
    let big = dom
        .map(pool.phys + (64 << 12), 64 << 12, Dir::Bidirectional, 0)
        .unwrap();
    m.dma_write(SID, iovas[0], b"before").unwrap();
    m.dma_write(SID, big + (63 << 12), b"big-end").unwrap();
    let old_root = dom.lock_uncounted().pt.root();
    let arena = dom.arena().unwrap();
    // iommud dies: nothing is torn down.
    let (image, ledger) = crash(dom, first);

    // The next iommud reads the ledger back: exactly what was recorded.
    assert_eq!(image.header.sid, SID);
    assert_eq!(image.header.token, token);
    assert_eq!(image.header.owner, OWNER);
    assert_eq!(image.root, old_root);
    assert_eq!(image.regions.len(), 2, "the arena and one pool");
    assert_eq!(image.regions[0].phys, arena.phys);
    assert_eq!(image.regions[1].phys, pool.phys);
    let mut expect: Vec<(u64, PageEntry)> = iovas
        .iter()
        .map(|&v| ((v - IOVA_BASE) / PAGE, PageEntry::Delegated(0)))
        .collect();
    expect.push(((big - IOVA_BASE) / PAGE, PageEntry::Mapped(64)));
    expect.sort_by_key(|e| e.0);
    assert_eq!(image.pages, expect);
    let (a, second) = take_over(&p, &m, image, ledger);
    // Between the takeover and the adoption the device translates through
    // the old tables (carried context entry): no DMA meets a missing entry.
    m.dma_write(SID, iovas[0], b"carry!").expect("carried over");
    let faults = m.counters().faults_recorded;
    let d = Domain::adopt(
        second.clone(),
        &a,
        true,
        crate::quota::Accounts::default().of(OWNER.0),
    )
    .expect("adopted");
    assert_eq!(d.did, a.image.header.did, "the same domain id");
    assert_ne!(d.lock_uncounted().pt.root(), old_root, "new tables");
    m.dma_write(SID, iovas[0], b"after!")
        .expect("the client's mapping");
    m.dma_write(SID, big, b"big-start").expect("iommud's map");
    let mut got = [0u8; 6];
    m.read_bytes(pool.phys, &mut got).unwrap();
    assert_eq!(&got, b"after!");
    assert!(
        m.dma_write(SID, iovas[1], b"x").is_err(),
        "an unmapped IOVA"
    );
    assert_eq!(m.counters().faults_recorded, faults + 1);
    // iommud's own map can be unmapped as before (its length was rebuilt).
    assert!(d.unmap(big, 63 << 12).is_err(), "wrong length refused");
    d.unmap(big, 64 << 12).unwrap();
    // Epochs go on above every one recorded (the client's tags keep their meaning).
    assert!(d.epoch() > a.image.epoch);
    // The owner reattaches: one invalidation of the domain; the client
    // keeps its four IOVAs (mapped or in its magazines).
    let invals = crate::stats::get(&second.stats.iotlb_domain);
    assert_eq!(d.resume().unwrap(), 4);
    assert!(
        crate::stats::get(&second.stats.iotlb_domain) > invals,
        "invalidated before the client goes on"
    );
    // It can return an unmapped one as before the crash, not a mapped one.
    d.client.map.write_u64(EXCHANGE_OFFSET, iovas[1]).unwrap();
    assert_eq!(d.exchange(1, 1, 0).unwrap(), 0);
    d.client.map.write_u64(EXCHANGE_OFFSET, iovas[0]).unwrap();
    assert!(d.exchange(1, 1, 0).is_err(), "still mapped");
    let held: Vec<u64> = vec![iovas[0], iovas[2], iovas[3]];
    // A second crash finds the ledger current: three delegated IOVAs.
    let again = Ledger::open((d.ledger.get().unwrap().region).clone())
        .unwrap()
        .read(IOVA_SPAN / PAGE)
        .unwrap();
    assert_eq!(
        again.pages,
        held.iter()
            .map(|&v| ((v - IOVA_BASE) / PAGE, PageEntry::Delegated(0)))
            .collect::<Vec<_>>()
    );
    assert!(again.epoch >= d.epoch() - 1);
    assert_eq!(again.root, d.lock_uncounted().pt.root());
    // Teardown retires the ledger: never adopted again.
    let l = d.ledger.get().unwrap().region.clone();
    d.teardown();
    assert!(Ledger::open((l).clone()).unwrap().read(1).is_none());
    let _ = LEDGER_BYTES;
}

#[test]
fn only_the_owner_with_the_token_claims_an_orphan_and_the_grace_period_ends_it() {
    let (p, m) = platform();
    let u = unit(&p, &m, &[]);
    let st = State::new(u.clone(), "sim", true);
    let d = delegated_magazine(&u, st.accounts.of(OWNER.0));
    let token = d.start_ledger(OWNER).unwrap();
    st.add_orphan(
        d.clone(),
        token,
        OWNER.0,
        std::time::Duration::from_secs(60),
    );
    assert!(
        st.claim_orphan(SID, OWNER.0, token ^ 1).is_err(),
        "wrong token"
    );
    assert!(
        st.claim_orphan(SID, OWNER.0 + 1, token).is_err(),
        "wrong uid"
    );
    assert!(
        st.claim_orphan(SID + 1, OWNER.0, token).is_err(),
        "no such orphan"
    );
    assert!(st.orphan_left(SID).is_some());
    let got = st.claim_orphan(SID, OWNER.0, token).expect("the owner");
    assert!(Arc::ptr_eq(&got, &d));
    assert!(
        st.claim_orphan(SID, OWNER.0, token).is_err(),
        "claimed once"
    );
    // An orphan nobody claims: its device is blocked when the grace ends.
    st.detach(SID);
    let d2 = delegated_magazine(&u, st.accounts.of(OWNER.0));
    let (pool, _, _) = d2.alloc_pool(4096).unwrap();
    assert_eq!(d2.exchange(1, 0, 1).unwrap(), 1);
    let iova = d2.exchange_slot(0).unwrap();
    client_map(&d2, iova, pool.phys);
    m.dma_write(SID, iova, b"live").unwrap();
    let t2 = d2.start_ledger(OWNER).unwrap();
    st.add_orphan(d2, t2, OWNER.0, std::time::Duration::ZERO);
    assert_eq!(st.expire_orphans(), None);
    assert!(st.domain(SID).is_none(), "freed");
    assert!(m.dma_write(SID, iova, b"dead").is_err(), "blocked");
}

#[test]
fn a_static_domain_is_adopted_with_its_pools_mapped_at_the_same_iovas() {
    let (p, m) = platform();
    let first = unit(&p, &m, &[]);
    let dom = Domain::new(
        first.clone(),
        SID,
        Strategy::Static,
        FlushPolicy::Strict,
        Trust::Validated,
        true,
        crate::quota::Accounts::default().of(OWNER.0),
    )
    .unwrap();
    let token = dom
        .start_ledger(OWNER)
        .expect("static domains keep a ledger");
    let (pool, _, reg) = dom.alloc_pool(64 << 10).unwrap();
    assert_ne!(reg.iova, 0);
    m.dma_write(SID, reg.iova + 0x1000, b"static").unwrap();
    let (image, ledger) = crash(dom, first);
    assert_eq!(image.header.token, token);
    assert!(!image.has_arena, "a validated static domain has no arena");
    assert_eq!(image.regions.len(), 1);
    assert_eq!(
        (image.regions[0].phys, image.regions[0].iova),
        (pool.phys, reg.iova)
    );
    let (a, second) = take_over(&p, &m, image, ledger);
    let d = Domain::adopt(
        second,
        &a,
        true,
        crate::quota::Accounts::default().of(OWNER.0),
    )
    .expect("adopted");
    // The same IOVA reaches the same pool through the new tables.
    m.dma_write(SID, reg.iova + 0x2000, b"again!").unwrap();
    let mut got = [0u8; 6];
    m.read_bytes(pool.phys + 0x2000, &mut got).unwrap();
    assert_eq!(&got, b"again!");
    assert!(
        m.dma_write(SID, reg.iova + (64 << 10), b"x").is_err(),
        "past the pool"
    );
    assert_eq!(
        d.map(pool.phys + 0x3000, 16, Dir::ToDevice, 0).unwrap(),
        reg.iova + 0x3000
    );
}

#[cfg(target_os = "linux")]
#[test]
fn a_domain_the_new_policy_would_not_grant_is_blocked_not_adopted() {
    let (p, m) = platform();
    let first = unit(&p, &m, &[]);
    let dom = delegated_magazine(&first, crate::quota::Accounts::default().of(OWNER.0));
    dom.start_ledger(OWNER).unwrap();
    let (pool, _, _) = dom.alloc_pool(4096).unwrap();
    assert_eq!(dom.exchange(1, 0, 1).unwrap(), 1);
    let iova = dom.exchange_slot(0).unwrap();
    client_map(&dom, iova, pool.phys);
    m.dma_write(SID, iova, b"before").unwrap();
    let (image, ledger) = crash(dom, first);
    let (a, second) = take_over(&p, &m, image, ledger);
    m.dma_write(SID, iova, b"carry!")
        .expect("carried until judged");
    // This start's policy is the default: validated trust for every device.
    let st = Arc::new(State::new(second, "sim", true));
    crate::restart::adopt_all(&st, vec![a], std::time::Duration::from_secs(60));
    assert!(st.domain(SID).is_none(), "not adopted");
    assert!(st.orphan_left(SID).is_none());
    assert!(m.dma_write(SID, iova, b"after!").is_err(), "blocked");
}
