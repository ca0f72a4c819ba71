//! The Redox system calls: daemonise, register `iommu`, serve requests.
//! Type-checked for `x86_64-unknown-redox` by `cargo xtask redox-check` (docs/ARCHITECTURE.md,
//! "Building for Redox"); never run (no relibc to link with, no Redox image here).
//! The calls follow redox-scheme 0.12 and redox-daemon 0.1.3 as read in their
//! sources; unverified on Redox.

use std::sync::Arc;

use iommud::session::State;
use redox_scheme::scheme::{SchemeState, SchemeSync};
use redox_scheme::{RequestKind, SignalBehavior, Socket};

use iommud::hw::Mmio;
use iommud::unit::{Iommu, UnitConfig};
use vtd::dmar::register_span;
use vtd::regs::{CAP, ECAP};

use crate::hw_redox::{drhd_plan, kernel, BlockMapper, RedoxMem, SharedRegions, PAGE};
use crate::scheme::IommuScheme;

/// Daemonises, then serves the scheme until the socket closes.
pub fn daemon() -> ! {
    redox_daemon::Daemon::new(|daemon| {
        let (state, shared) = start().expect("iommud: failed to bring up VT-d");
        let st = state.clone();
        // Faults and the epoch timer, as the Linux server's ticker does.
        std::thread::Builder::new()
            .name("iommud-tick".into())
            .spawn(move || loop {
                st.tick();
                std::thread::sleep(iommud::TICK);
            })
            .expect("iommud: failed to start the tick thread");
        let socket = Socket::create().expect("iommud: failed to create the scheme socket");
        let mut scheme = IommuScheme::with_mapper(state, BlockMapper(shared));
        redox_scheme::scheme::register_sync_scheme(&socket, crate::paths::SCHEME, &mut scheme)
            .expect("iommud: failed to register the iommu scheme");
        daemon.ready().expect("iommud: failed to signal readiness");
        serve(&socket, &mut scheme);
        std::process::exit(0);
    })
    .expect("iommud: failed to daemonise")
}

fn serve(socket: &Socket, scheme: &mut IommuScheme<Arc<State>, BlockMapper>) {
    let mut st = SchemeState::new();
    while let Some(req) = socket
        .next_request(SignalBehavior::Restart)
        .expect("iommud: failed to read a scheme request")
    {
        match req.kind() {
            RequestKind::Call(c) => {
                let resp = c.handle_sync(scheme, &mut st);
                socket
                    .write_response(resp, SignalBehavior::Restart)
                    .expect("iommud: failed to write a scheme response");
            }
            RequestKind::OnClose { id } => scheme.on_close(id),
            _ => {}
        }
    }
}

/// Reads the DMAR table from the ACPI scheme, maps the unit's registers
/// through the memory scheme, and brings the unit up. Returns the state and
/// the region table the scheme's mapper reads.
fn start() -> Result<(Arc<State>, SharedRegions), String> {
    let names = std::fs::read_dir(crate::paths::ACPI_TABLES)
        .map_err(|e| format!("{}: {e}", crate::paths::ACPI_TABLES))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok());
    let name = crate::paths::dmar_table(names)
        .ok_or("no DMAR table: boot QEMU with -M q35 -device intel-iommu")?;
    let dmar = std::fs::read(format!("{}/{name}", crate::paths::ACPI_TABLES))
        .map_err(|e| format!("{name}: {e}"))?;
    let (base, min, log) = drhd_plan(&dmar)?;
    for line in log {
        eprintln!("iommud: {name}: {line}");
    }
    // One page first, to learn from CAP/ECAP how much register space the unit has.
    let first = kernel::map_registers(base, PAGE).map_err(|e| e.to_string())?;
    let span = register_span(first.read64(CAP), first.read64(ECAP), min);
    let regs = if span > first.len() {
        // The first page stays mapped (a few KiB, once).
        kernel::map_registers(base, span as u64).map_err(|e| e.to_string())?
    } else {
        first
    };
    eprintln!(
        "iommud: VT-d unit at {base:#x}: {:#x} bytes of registers mapped",
        regs.len()
    );
    let mem = RedoxMem::new(kernel::KernelMemory::new().map_err(|e| e.to_string())?);
    let shared = mem.shared_regions();
    let cfg = UnitConfig::default();
    let unit = Iommu::init(Box::new(regs), Arc::new(mem), &cfg)
        .map_err(|e| format!("bringing up VT-d: {e}"))?;
    let mut state = State::new(Arc::new(unit), "redox", true);
    // Until the pcid handle is checked as the proof of ownership, only
    // administrators (drivers run as root on Redox) may attach.
    state.authority = iommud::platform::proof::Authority::Administrators;
    Ok((Arc::new(state), shared))
}
