//! Platform backends: the implementations of [`crate::hw::Mmio`] and
//! [`crate::hw::PhysMem`].

#[cfg(target_os = "linux")]
pub mod linux;
pub mod proof;
pub mod shm;
#[cfg(feature = "sim")]
pub mod sim;

/// Whether process `pid` has exited (gone, or a zombie waiting to be
/// reaped): `None` where the platform cannot tell. An attach waits longer
/// for the teardown of a domain whose owner has exited (docs/ARCHITECTURE.md,
/// "Stop, crash and restart").
pub fn process_exited(pid: i32) -> Option<bool> {
    if !cfg!(target_os = "linux") || pid <= 0 {
        return None;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the first field after the command's closing parenthesis.
        Ok(stat) => {
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next());
            Some(matches!(state, Some("Z" | "X")))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(true),
        Err(_) => None,
    }
}
