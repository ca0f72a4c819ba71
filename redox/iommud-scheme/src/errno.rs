//! iommud's error codes as the errnos a Redox scheme returns.

use iommu_abi::proto::ErrorCode;
use syscall::error::{
    Error, EACCES, EBUSY, EDQUOT, EINVAL, EIO, ENODEV, ENOENT, ENOMEM, ENOSPC, EOPNOTSUPP, EPERM,
    EPROTO, ETIMEDOUT,
};

/// The errno a scheme call answers for `code`. One table, so the Linux
/// server's status words and the Redox scheme's errnos never drift apart.
pub fn errno(code: ErrorCode) -> i32 {
    match code {
        ErrorCode::Malformed | ErrorCode::Invalid => EINVAL,
        ErrorCode::Version => EPROTO,
        ErrorCode::NoDomain => ENODEV,
        ErrorCode::Busy => EBUSY,
        ErrorCode::NoMemory => ENOMEM,
        ErrorCode::NoSpace => ENOSPC,
        ErrorCode::NotOwner | ErrorCode::PermissionDenied => EPERM,
        ErrorCode::Timeout => ETIMEDOUT,
        ErrorCode::Unsupported => EOPNOTSUPP,
        ErrorCode::NotFound => ENOENT,
        ErrorCode::Hardware => EIO,
        ErrorCode::QuotaExceeded => EDQUOT,
    }
}

/// [`errno`] as a `syscall::Error`.
pub fn error(code: ErrorCode) -> Error {
    Error::new(errno(code))
}

/// Writing to a read-only node.
pub fn read_only() -> Error {
    Error::new(EACCES)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_a_distinct_meaning_except_the_two_argument_errors() {
        assert_eq!(errno(ErrorCode::NotFound), ENOENT);
        assert_eq!(errno(ErrorCode::Malformed), EINVAL);
        assert_eq!(errno(ErrorCode::Invalid), EINVAL);
        assert_eq!(errno(ErrorCode::Busy), EBUSY);
        assert_eq!(errno(ErrorCode::Unsupported), EOPNOTSUPP);
    }
}
