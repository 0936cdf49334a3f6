//! The one table from the core's errors to errno. Exhaustive, with no
//! catch-all arm: a new error variant forces a decision here.

use crate::fs::FsError;
use crate::store::StoreError;

pub fn errno(e: &FsError) -> i32 {
    match e {
        FsError::NotFound => libc::ENOENT,
        FsError::Exists => libc::EEXIST,
        FsError::NotEmpty => libc::ENOTEMPTY,
        FsError::NotDir => libc::ENOTDIR,
        FsError::IsDir => libc::EISDIR,
        FsError::NameTooLong => libc::ENAMETOOLONG,
        FsError::InvalidName => libc::EINVAL,
        FsError::Invalid => libc::EINVAL,
        FsError::ReadOnly => libc::EROFS,
        FsError::NotPermitted => libc::EPERM,
        FsError::NotSupported => libc::ENOTSUP,
        FsError::NoAttr => libc::ENODATA,
        FsError::Range => libc::ERANGE,
        FsError::TooBig => libc::E2BIG,
        FsError::AccessDenied => libc::EACCES,
        FsError::BadHandle => libc::EBADF,
        FsError::Stale => libc::EIO,
        FsError::CrossDevice => libc::EXDEV,
        FsError::Io(n) => *n,
        FsError::Store(s) => store_errno(s),
    }
}

fn store_errno(e: &StoreError) -> i32 {
    match e {
        StoreError::NotFound => libc::ENOENT,
        StoreError::NoSuchBucket => libc::EIO,
        StoreError::AccessDenied(_) => libc::EACCES,
        StoreError::PreconditionFailed => libc::EIO,
        StoreError::InvalidRequest(m) if m.contains("KeyTooLong") => libc::ENAMETOOLONG,
        StoreError::InvalidRequest(_) => libc::EINVAL,
        StoreError::Transient(_) => libc::EIO,
        StoreError::Other(_) => libc::EIO,
        StoreError::WrongRegion(_) => libc::EIO,
        StoreError::AlreadyExists => libc::EEXIST,
        StoreError::ChecksumRefused(_) => libc::EIO,
        StoreError::BucketNotEmpty => libc::ENOTEMPTY,
    }
}

/// Whether a failure is worth a log line above debug (ENOENT is routine;
/// so is ENOTSUP, which `sed -i` and `cp -a` get from setxattr when they
/// copy ACLs and attributes a bucket cannot hold).
pub fn is_expected(e: &FsError) -> bool {
    matches!(
        e,
        FsError::NotFound
            | FsError::Exists
            | FsError::NotEmpty
            | FsError::CrossDevice
            | FsError::Store(StoreError::BucketNotEmpty | StoreError::AlreadyExists)
            | FsError::NoAttr
            | FsError::Range
            | FsError::NotSupported
            // Opened after its unlink (a lost race): the kernel looks the
            // name up again.
            | FsError::Io(libc::ESTALE)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_the_promised_errno() {
        assert_eq!(errno(&StoreError::NotFound.into()), libc::ENOENT);
        assert_eq!(
            errno(&StoreError::AccessDenied("403".into()).into()),
            libc::EACCES
        );
        assert_eq!(
            errno(&StoreError::Transient("503".into()).into()),
            libc::EIO
        );
        assert_eq!(errno(&FsError::ReadOnly), libc::EROFS);
        assert_eq!(errno(&FsError::NameTooLong), libc::ENAMETOOLONG);
        assert_eq!(errno(&FsError::Io(libc::ENOSPC)), libc::ENOSPC);
    }
}
