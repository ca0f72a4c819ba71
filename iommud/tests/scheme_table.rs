// The scheme-path table shared by the transports: the same path must give
// the same answer from the Linux socket server (`ReadPath`) and from the Redox
// scheme handler (`open` + `read`). Included with `include!` by both tests.
//
// State the table assumes (each test builds it): the sim platform with
// translation on, reclamation on (`State::new(unit, "sim", true)`), and one
// client that sent `Hello` and `Attach { bdf: 00:01.0 (0x0008), strategy:
// magazine, flush: percore }`.
//
// A case is `(path, Ok(prefix of the text) | Err(error code))`.

/// The source id the table's client attaches to (`00:01.0`).
#[allow(dead_code)]
pub const TABLE_BDF: u16 = 0x0008;

/// The cases.
#[allow(dead_code)]
pub const SCHEME_TABLE: &[(&str, Result<&str, iommu_abi::proto::ErrorCode>)] = &[
    ("stats", Ok("platform sim\n")),
    ("/scheme/iommu/stats", Ok("platform sim\n")),
    ("iommu:stats", Ok("platform sim\n")),
    ("domains", Ok("00:01.0\n")),
    ("domains/00:01.0/strategy", Ok("magazine\n")),
    ("domains/00:01.0/flush", Ok("percore\n")),
    ("/scheme/iommu/domains/0000:00:01.0/flush", Ok("percore\n")),
    ("domains/00:01.0/stats", Ok("")),
    ("domains/00:01.0/mappings", Ok("")),
    ("faults", Ok("")),
    ("reclaim", Ok("on\n")),
    (
        "domains/00:02.0/stats",
        Err(iommu_abi::proto::ErrorCode::NotFound),
    ),
    (
        "domains/00:02.0/strategy",
        Err(iommu_abi::proto::ErrorCode::NotFound),
    ),
    (
        "domains/zz/stats",
        Err(iommu_abi::proto::ErrorCode::NotFound),
    ),
    (
        "domains/00:01.0/nonesuch",
        Err(iommu_abi::proto::ErrorCode::NotFound),
    ),
    ("nonesuch", Err(iommu_abi::proto::ErrorCode::NotFound)),
    ("", Err(iommu_abi::proto::ErrorCode::NotFound)),
];
