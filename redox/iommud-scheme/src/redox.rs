//! The Redox system calls: daemonise, register `iommu`, serve requests.
//! Never compiled: no Redox toolchain is reachable here (see recipes/README.md).

use std::sync::Arc;

use iommud::session::State;
use redox_scheme::scheme::{SchemeState, SchemeSync};
use redox_scheme::{RequestKind, SignalBehavior, Socket};

use crate::scheme::IommuScheme;

/// Daemonises, then serves the scheme until the socket closes.
pub fn daemon() -> ! {
    redox_daemon::Daemon::new(|daemon| {
        let state = start().expect("iommud: failed to bring up VT-d");
        let socket = Socket::create().expect("iommud: failed to create the scheme socket");
        let mut scheme = IommuScheme::new(state);
        redox_scheme::scheme::register_sync_scheme(&socket, crate::paths::SCHEME, &mut scheme)
            .expect("iommud: failed to register the iommu scheme");
        daemon.ready().expect("iommud: failed to signal readiness");
        serve(&socket, &mut scheme);
        std::process::exit(0);
    })
    .expect("iommud: failed to daemonise");
    unreachable!()
}

fn serve(socket: &Socket, scheme: &mut IommuScheme<Arc<State>>) {
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
/// through the memory scheme, and brings the unit up.
fn start() -> Result<Arc<State>, String> {
    let names = std::fs::read_dir(crate::paths::ACPI_TABLES)
        .map_err(|e| format!("{}: {e}", crate::paths::ACPI_TABLES))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok());
    let name = crate::paths::dmar_table(names).ok_or("no DMAR table: boot QEMU with -device intel-iommu")?;
    let dmar = std::fs::read(format!("{}/{name}", crate::paths::ACPI_TABLES))
        .map_err(|e| format!("{name}: {e}"))?;
    // The DMAR parse, the register mapping (mmap of PHYS_UNCACHED at the DRHD
    // base) and the DMA memory (DMA_ZEROED) go through iommud's hw seams; the
    // Redox PhysMem/Mmio backends are not written yet (see recipes/README.md).
    Err(format!(
        "{name} ({} bytes) found, but iommud has no Redox hardware backend yet",
        dmar.len()
    ))
}
