//! iommud on Redox: owns VT-d and serves the `iommu` scheme.

#[cfg(target_os = "redox")]
fn main() {
    iommud_scheme::redox::daemon();
}

#[cfg(not(target_os = "redox"))]
fn main() {
    eprintln!("iommud-scheme: this daemon runs on Redox only; on Linux run `iommud`");
    std::process::exit(2);
}
