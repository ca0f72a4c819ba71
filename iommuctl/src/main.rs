//! `iommuctl`: see [`iommuctl::main`] for usage.

fn main() -> std::process::ExitCode {
    iommuctl::main()
}
