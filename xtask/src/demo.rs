//! `cargo xtask demo`: placeholder until iommud and e1000d can run together in a guest.
//!
//! Wiring it up is a [`crate::guest::GuestRun`] with `.package("iommud").package("e1000d")`,
//! a script that starts iommud then e1000d over the two hub-connected NICs, and checks on
//! the resulting [`crate::guest::GuestOutput`] (`expect_success`, `value`).

use crate::util::Result;

pub fn run() -> Result<()> {
    println!(
        "xtask demo: not wired yet; the demo needs iommud + e1000d integration \
         (boot it with guest::run(&GuestRun::new(..).package(\"iommud\").package(\"e1000d\")))"
    );
    Ok(())
}
