//! The one list of guest tests. `cargo xtask test` runs them all in order, and each is
//! also a subcommand of its own (`cargo xtask <name>`). To add one, append an entry.

use crate::util::Result;

/// A test that boots one or more QEMU guests.
pub struct GuestTest {
    /// Subcommand name, e.g. `guest-smoke`.
    pub name: &'static str,
    /// One line for `cargo xtask help`.
    pub about: &'static str,
    pub run: fn() -> Result<()>,
}

/// Every guest test, in the order `cargo xtask test` runs them.
pub fn guest_tests() -> Vec<GuestTest> {
    vec![
        GuestTest {
            name: "guest-smoke",
            about:
                "boot a guest; check kernel, /dev/mem, DMAR, two e1000s, VT-d registers, hugepages",
            run: || crate::smoke::run(false),
        },
        GuestTest {
            name: "guest-demo-magazine",
            about:
                "demo, magazine strategy: 5000 frames intact, IPC and invalidations < 0.1/packet",
            run: || crate::demo::test("magazine", "percore", false, TEST_PACKETS),
        },
        GuestTest {
            name: "guest-demo-magazine-cm",
            about: "demo, magazine strategy, VT-d caching mode on: 5000 frames intact",
            run: || crate::demo::test("magazine", "percore", true, TEST_PACKETS),
        },
        GuestTest {
            name: "guest-demo-validated-strict",
            about: "demo, validated magazine (iommud keeps the magazines, rings), strict: \
                    5000 frames intact, IPC and invalidations < 0.1/packet",
            run: || crate::demo::test_trust("magazine", "strict", false, TEST_PACKETS, "validated"),
        },
        GuestTest {
            name: "guest-demo-validated-cm",
            about: "demo, validated magazine, percore, VT-d caching mode on: 5000 frames intact",
            run: || crate::demo::test_trust("magazine", "percore", true, TEST_PACKETS, "validated"),
        },
        GuestTest {
            name: "guest-demo-static",
            about: "demo, static strategy (pools mapped once, validated): 5000 frames intact",
            run: || crate::demo::test_trust("static", "percore", false, TEST_PACKETS, "validated"),
        },
        GuestTest {
            name: "guest-demo-global",
            about: "demo, global strategy (a round trip per map/unmap): 5000 frames intact",
            run: || crate::demo::test("global", "strict", false, TEST_PACKETS),
        },
        GuestTest {
            name: "guest-demo-global-cm",
            about: "demo, global strategy, VT-d caching mode on: 5000 frames intact",
            run: || crate::demo::test("global", "strict", true, TEST_PACKETS),
        },
        GuestTest {
            name: "guest-demo-magazine-deferred",
            about:
                "demo, magazine strategy, deferred flush queue (256 / 10 ms): 5000 frames intact",
            run: || crate::demo::test("magazine", "deferred", false, TEST_PACKETS),
        },
        GuestTest {
            name: "guest-demo-identity",
            about:
                "demo, identity strategy (IOVA = physical, refcounted, validated): frames intact",
            run: || crate::demo::test("identity", "percore", false, SLOW_TEST_PACKETS),
        },
        GuestTest {
            name: "guest-demo-va",
            about:
                "demo, va strategy (IOVA = the driver's virtual address, validated): frames intact",
            run: || crate::demo::test("va", "percore", false, SLOW_TEST_PACKETS),
        },
        GuestTest {
            name: "guest-security",
            about: "as nobody: iommuctl stop / policy switch / reclaim / mappings / attach are \
refused; root e1000d still moves every frame; refusals counted",
            run: crate::security::run,
        },
        GuestTest {
            name: "guest-fault",
            about: "DMA to unmapped IOVAs (TX read, RX write over a canary page) is blocked and \
reported in iommud's faults; the canary is intact; later bursts succeed",
            run: crate::fault::run,
        },
        GuestTest {
            name: "guest-storm",
            about: "a third e1000 faults thousands of times (blocked by iommud) while A->B moves \
20 000 verified frames; A's single fault is still listed; iommud < 5% CPU after the storm",
            run: crate::storm::run,
        },
        GuestTest {
            name: "guest-stop",
            about: "iommuctl stop mid-stream blocks both NICs before their memory goes and \
parks the unit (still translating, root kept in the state dir): a canary the NIC overwrites \
without iommud stays intact; a second and third iommud take the unit over; frames intact",
            run: crate::restart::stop,
        },
        GuestTest {
            name: "guest-restart",
            about: "kill -9 of iommud mid-stream: its table and region files outlive it, the \
unit still walks its root; a restarted iommud takes over (translation on) and a new e1000d \
run is intact (the killed run is not resumed: no reattach yet)",
            run: crate::restart::restart,
        },
        GuestTest {
            name: "guest-igb-magazine-q1",
            about: "igb, 1 queue pair, magazine/percore: frames intact, < 2 round trips and \
< 10 invalidations per 1000",
            run: || crate::igb::test("magazine", "percore", 1, false, TEST_PACKETS),
        },
        GuestTest {
            name: "guest-igb-magazine-q2",
            about: "igb, 2 queue pairs (RSS, pinned workers), magazine/percore: both queues \
carry their frames intact, < 2 round trips and < 10 invalidations per 1000",
            run: || crate::igb::test("magazine", "percore", 2, false, TEST_PACKETS),
        },
        GuestTest {
            name: "guest-igb-magazine-q2-cm",
            about: "igb, 2 queue pairs, magazine/percore, VT-d caching mode on: frames intact",
            run: || crate::igb::test("magazine", "percore", 2, true, TEST_PACKETS),
        },
        GuestTest {
            name: "guest-igb-global-q2",
            about: "igb, 2 queue pairs, global/strict (validated, a round trip per batch): \
frames intact",
            run: || crate::igb::test("global", "strict", 2, false, SLOW_TEST_PACKETS),
        },
        GuestTest {
            name: "guest-igb-fault",
            about: "igb, 2 queues: a TX read at an unmapped IOVA and an RX write over a canary \
page are blocked and reported; canary intact; traffic after it intact; control without translation",
            run: crate::igb::fault,
        },
        GuestTest {
            name: "guest-disk-magazine",
            about: "nvmed on QEMU's NVMe, magazine/percore: every block verified, < 2 round \
trips and < 10 invalidations per 1000 I/Os",
            run: || crate::disk::test("magazine", "percore", false),
        },
        GuestTest {
            name: "guest-disk-global",
            about: "nvmed, global/strict (validated, a round trip per map and unmap): verified",
            run: || crate::disk::test("global", "strict", false),
        },
        GuestTest {
            name: "guest-disk-magazine-cm",
            about: "nvmed, magazine/percore, VT-d caching mode on: every block verified",
            run: || crate::disk::test("magazine", "percore", true),
        },
        GuestTest {
            name: "guest-disk-fault",
            about: "nvmed: READs to an unmapped IOVA are blocked (faults name 00:03.0), fail \
with an error status, a canary page is intact, later I/O verifies",
            run: crate::disk::test_fault,
        },
        GuestTest {
            name: "guest-disk-boots",
            about: "nvmed: 64 MiB written translating in one boot all verify in the next \
with translation off",
            run: crate::disk::test_across_boots,
        },
        GuestTest {
            name: "guest-linux-peer",
            about: "stock Debian kernel owning the VT-d unit (netbench's Linux peer): each of \
off/strict/lazy/passthrough reported by the kernel; pktgen frames A->B all counted on B",
            run: crate::linuxpeer::test,
        },
    ]
}

/// Frames per demo guest test (the CI budget; `cargo xtask demo` defaults to 20 000).
const TEST_PACKETS: u64 = 5000;
/// Frames for strategies that make a round trip per map and unmap (validated trust).
const SLOW_TEST_PACKETS: u64 = 2000;
