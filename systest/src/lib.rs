//! End-to-end tests of iommud with libdma clients, each a separate process,
//! over the sim platform: see `tests/`. The package's binaries are the
//! daemon and `iommuctl` themselves (`iommud::cli::main`, `iommuctl::main`),
//! so the tests run exactly what ships while iommud's own crate never
//! depends on its client library (docs/ARCHITECTURE.md, "Who may import whom").
