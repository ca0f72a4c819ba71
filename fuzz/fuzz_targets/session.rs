//! A session fed arbitrary request sequences against the sim platform, as an
//! unprivileged client that owns one device (it holds the proof of it): the
//! input is a series of datagrams (one length byte, then the bytes), each
//! decoded as iommud's server does and handed to `Session::handle`, with the
//! proof attached when the length byte's top bit is set; a datagram starting
//! with 0xff instead scribbles over the client page. Nothing may panic (a
//! panic caught inside iommud counts as a finding too).
#![no_main]

use iommud::platform::proof::Authority;
use iommud::platform::sim::{SimMmio, SimPlatform};
use iommud::policy::{Peer, Policy};
use iommud::session::{Session, State};
use iommud::unit::{Iommu, UnitConfig};
use libdma::proto::Request;
use libfuzzer_sys::fuzz_target;
use std::os::fd::OwnedFd;
use std::sync::{Arc, OnceLock};

struct World {
    state: Arc<State>,
    proof: std::path::PathBuf,
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        iommud::unit::log::set_quiet(true);
        let plat = Arc::new(
            SimPlatform::new(vtd::sim::SimConfig {
                mem_bytes: 64 << 20,
                ..Default::default()
            })
            .expect("sim platform"),
        );
        let mmio = Box::new(SimMmio(plat.machine().clone()));
        let unit = Iommu::init(mmio, plat, &UnitConfig::default()).expect("unit");
        let mut st = State::new(Arc::new(unit), "sim", true);
        let dir = std::env::temp_dir().join(format!("iommud-fuzz-{}", std::process::id()));
        let sock = dir.join("iommud.sock");
        let devices = libdma::proof::sim_device_dir(&sock).expect("a directory");
        st.authority = Authority::make_sim_dir(&devices).expect("device files");
        // 00:02.0 may run the magazine strategy, so the exchange paths are reachable.
        st.policy = Policy::parse("[[device]]\nmatch = \"00:02.0\"\ntrust = \"delegated\"\n")
            .expect("policy");
        let proof = libdma::proof::path(0x10, Some(&sock));
        World {
            state: Arc::new(st),
            proof,
        }
    })
}

fn proof(w: &World) -> OwnedFd {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&w.proof)
        .expect("proof file")
        .into()
}

fuzz_target!(|data: &[u8]| {
    let w = world();
    let before = w
        .state
        .security
        .internal_errors
        .load(std::sync::atomic::Ordering::SeqCst);
    let peer = Peer {
        uid: 1000,
        gid: 1000,
        pid: 1,
    };
    let mut s = Session::new(w.state.clone(), peer);
    let mut rest = data;
    while let Some((&head, tail)) = rest.split_first() {
        let len = usize::from(head & 0x7f).min(tail.len());
        let (msg, next) = tail.split_at(len);
        rest = next;
        if msg.first() == Some(&0xff) {
            if let Some(d) = s.domain() {
                let c = d.client();
                for (k, ch) in msg[1..].chunks(9).enumerate() {
                    let mut v = [0u8; 8];
                    let n = ch.len().min(8);
                    v[..n].copy_from_slice(&ch[..n]);
                    let word = usize::from(ch.get(8).copied().unwrap_or(k as u8));
                    let val = u64::from_le_bytes(v);
                    let slot = &c.cpu[word % c.cpu.len()];
                    match word % 4 {
                        0 => c.wanted.store(val, std::sync::atomic::Ordering::SeqCst),
                        1 => slot
                            .unmap_oldest
                            .store(val, std::sync::atomic::Ordering::SeqCst),
                        2 => slot
                            .unmap_count
                            .store(val, std::sync::atomic::Ordering::SeqCst),
                        _ => slot.maps.store(val, std::sync::atomic::Ordering::SeqCst),
                    }
                }
                w.state.tick();
            }
            continue;
        }
        if let Ok((_, req)) = Request::decode(msg) {
            let fds = if head & 0x80 != 0 {
                vec![proof(w)]
            } else {
                Vec::new()
            };
            let _ = s.handle(req, fds);
        }
    }
    drop(s);
    let after = w
        .state
        .security
        .internal_errors
        .load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(before, after, "a request panicked inside iommud (caught)");
});
