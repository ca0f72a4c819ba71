//! The daemon, for the end-to-end tests.

fn main() -> std::process::ExitCode {
    iommud::cli::main()
}
