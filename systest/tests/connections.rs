//! Connections cannot exhaust iommud: out of descriptors it backs off
//! instead of spinning and logs at most once a second, recovers when
//! clients go, and a thousand connect / attach / drop cycles (plus clients
//! killed mid-session) leave its descriptors and memory where they were.

mod common;

use common::{proof, Daemon, RawClient};
use libdma::{FlushPolicy, Strategy};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

const ENV: &str = "IOMMUD_CONN_CYCLE";

#[test]
fn out_of_descriptors_the_daemon_backs_off_and_recovers() {
    // 48 descriptors: the daemon's own (memfds, the socket, the log) and a
    // few for clients; 80 connections ask for more than it has (those it
    // cannot accept wait in the listen backlog of 64, so connecting does
    // not block here).
    let d = Daemon::start_limited("nofile", &[], 48);
    let socks: Vec<_> = (0..80)
        .map(|_| libdma::transport::SeqPacket::connect(d.socket()).unwrap())
        .collect();
    // Over a second of this, the daemon must not spin on accept.
    let (t0, c0) = (Instant::now(), d.cpu_ticks());
    std::thread::sleep(Duration::from_millis(1500));
    let ticks = d.cpu_ticks() - c0;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let cpu = ticks as f64 / hz as f64 / t0.elapsed().as_secs_f64();
    println!(
        "iommud CPU while out of descriptors: {:.1}% of one CPU",
        cpu * 100.0
    );
    assert!(cpu < 0.2, "iommud used {:.0}% of a CPU", cpu * 100.0);
    let log = d.log();
    let warnings = log.matches("accept:").count();
    assert!(warnings >= 1, "the exhaustion is logged:\n{log}");
    assert!(warnings <= 4, "{warnings} accept warnings in 1.5 s:\n{log}");
    // The clients go; a legitimate one gets in and is served.
    drop(socks);
    let t = Instant::now();
    loop {
        match libdma::Control::connect(d.socket()).and_then(|c| c.read("stats")) {
            Ok(s) => {
                assert!(s.contains("platform sim"), "{s}");
                break;
            }
            Err(e) => {
                assert!(t.elapsed() < Duration::from_secs(10), "{e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

#[test]
fn a_thousand_connect_attach_drop_cycles_leak_nothing() {
    if let Ok(socket) = std::env::var(ENV) {
        // A client process: attach, map, and wait to be killed.
        let dom = libdma::DmaDomain::connect(
            std::path::Path::new(&socket),
            0x10,
            Strategy::Magazine,
            FlushPolicy::PerCore,
        )
        .unwrap();
        // Enough live mappings (8 MiB in pages) that tearing the domain
        // down takes iommud a while after the kill.
        let bufs: Vec<_> = (0..4).map(|_| dom.alloc(2 << 20).unwrap()).collect();
        for b in &bufs {
            for p in 0..512 {
                dom.map(b.phys + p * 4096, 4096, libdma::Dir::ToDevice)
                    .unwrap();
            }
        }
        println!("READY");
        std::thread::sleep(Duration::from_secs(60));
        return;
    }
    let d = Daemon::start_one_arena("cycles");
    let cycle = |k: u64| {
        // The previous cycle's domain may still be being torn down: iommud
        // waits that out instead of answering busy.
        let mut c = RawClient::connect(d.socket());
        if let Err(e) = c.attach(
            0x08,
            Strategy::Global,
            FlushPolicy::Strict,
            Some(proof(&d, 0x08).as_fd()),
        ) {
            panic!("cycle {k}: attach right after the last cycle's drop: {e:?}");
        }
        // The new domain's owner is this process (the last cycle's late
        // teardown must not have erased it).
        let stats = d.ctl().read("domains/00:01.0/stats").unwrap();
        assert!(
            stats.contains(&format!("owner_pid {}\n", std::process::id())),
            "cycle {k}: owner lost: {stats}"
        );
        let (phys, _m) = c.pool(4096);
        c.map(phys, 4096, libdma::Dir::ToDevice).unwrap();
        if k.is_multiple_of(2) {
            c.post(&iommu_abi::proto::Request::FlushHint);
        }
        // Dropped with its mapping live: iommud tears the domain down.
    };
    let settle = |d: &Daemon| {
        let t = Instant::now();
        while d.ctl().read("domains").unwrap().contains("00:01.0") {
            assert!(t.elapsed() < Duration::from_secs(5));
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(100));
        d.fds_and_rss()
    };
    for k in 0..100 {
        cycle(k);
    }
    let (fd0, rss0) = settle(&d);
    for k in 0..1000 {
        cycle(k);
    }
    // And clients killed in the middle of a session.
    for _ in 0..20 {
        use std::io::BufRead;
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "a_thousand_connect_attach_drop_cycles_leak_nothing",
                "--nocapture",
            ])
            .env(ENV, d.socket())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let ready = std::io::BufReader::new(out)
            .lines()
            .any(|l| l.is_ok_and(|l| l.contains("READY")));
        assert!(ready, "the client attached");
        child.kill().unwrap();
        child.wait().unwrap();
        // A driver restarted at once gets the device: iommud waits for the
        // dead owner's teardown rather than refuse (the race a restarted
        // driver hits when it is quicker than iommud's session thread).
        let mut c = RawClient::connect(d.socket());
        if let Err(e) = c.attach(
            0x10,
            Strategy::Magazine,
            FlushPolicy::PerCore,
            Some(proof(&d, 0x10).as_fd()),
        ) {
            panic!("attach right after the owner was killed: {e:?}");
        }
        drop(c);
    }
    let (fd1, rss1) = settle(&d);
    println!(
        "iommud after 100 cycles: {fd0} fds, {rss0} KiB anonymous; after 1000 more and 20 kills: \
         {fd1} fds, {rss1} KiB"
    );
    assert_eq!(fd1, fd0, "descriptors leaked");
    assert!(rss1 <= rss0 + 1024, "RSS grew from {rss0} to {rss1} KiB");
    let q = d.ctl().read("quotas").unwrap();
    for line in q.lines() {
        for quota in ["pool_bytes", "pt_pages", "mappings", "domains"] {
            assert!(
                line.contains(&format!("{quota} 0/")),
                "{quota} not given back: {line}"
            );
        }
    }
}

#[test]
fn a_reattach_without_the_owners_token_gets_nothing() {
    let d = Daemon::start("reattach", &[]);
    // A live domain of 00:01.0, held by a client that attached normally.
    let owner = libdma::DmaDomain::connect(d.socket(), 0x08, Strategy::Global, FlushPolicy::Strict)
        .unwrap();
    let refused = |d: &Daemon| {
        let s = d.ctl().read("stats").unwrap();
        s.lines()
            .find_map(|l| l.strip_prefix("refused_proof "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap()
    };
    let before = refused(&d);
    for (bdf, token, with_proof) in [
        (0x08u16, 0x1234_5678_9abc_def0_u128, true), // a live domain, a guessed token
        (0x08, 0, true),                             // the zero token
        (0x10, u128::MAX, true),                     // no domain there at all
        (0x08, 1, false),                            // no proof of ownership
    ] {
        let mut c = RawClient::connect(d.socket());
        let p = proof(&d, bdf);
        let fds: Vec<_> = if with_proof { vec![p.as_fd()] } else { vec![] };
        let (r, got) = c.call_fds(&libdma::proto::Request::Reattach { bdf, token }, &fds);
        match r {
            Err((libdma::proto::ErrorCode::PermissionDenied, msg)) => {
                assert!(got.is_empty(), "no memory handed out: {msg}");
            }
            other => panic!("reattach {bdf:#x} token {token:#x}: {other:?}"),
        }
    }
    assert_eq!(refused(&d), before + 4, "each refusal counted");
    // The owner's domain is untouched.
    let b = owner.alloc(4096).unwrap();
    owner.map(b.phys, 4096, libdma::Dir::ToDevice).unwrap();
}
