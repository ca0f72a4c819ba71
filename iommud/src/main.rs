//! `iommud`: the IOMMU server daemon. Usage and behaviour: [`iommud::cli`].

fn main() -> std::process::ExitCode {
    iommud::cli::main()
}
