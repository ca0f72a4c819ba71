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
    vec![GuestTest {
        name: "guest-smoke",
        about: "boot a guest; check kernel, /dev/mem, DMAR, two e1000s, VT-d registers, hugepages",
        run: || crate::smoke::run(false),
    }]
}
