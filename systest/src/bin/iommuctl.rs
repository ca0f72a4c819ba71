//! `iommuctl`, for the end-to-end tests.

fn main() -> std::process::ExitCode {
    iommuctl::main()
}
