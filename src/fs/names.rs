//! The rules between POSIX names and S3 keys.
//!
//! A path below the mount root maps to `root_prefix + path`; a directory
//! also has the prefix `key + "/"`. Keys that the POSIX view cannot show
//! (an empty component as in `a//b`, `.` or `..`, a name over 255 bytes,
//! the reserved `.versions`) are never turned into paths: a listing skips
//! them and logs each once, so nothing can escape the mount.

use std::collections::HashSet;
use std::ffi::OsStr;

use parking_lot::Mutex;
use tracing::warn;

use super::FsError;

pub const MAX_NAME_BYTES: usize = 255;
pub const MAX_KEY_BYTES: usize = 1024;
/// The hidden directory of versions present in every directory.
pub const VERSIONS_DIR: &str = ".versions";

/// Checks a name the kernel gives us (create, lookup, rename...).
pub fn check_name(name: &OsStr) -> Result<&str, FsError> {
    let s = name.to_str().ok_or(FsError::InvalidName)?;
    if s.len() > MAX_NAME_BYTES {
        return Err(FsError::NameTooLong);
    }
    if s.is_empty() || s == "." || s == ".." || s.contains('/') {
        return Err(FsError::InvalidName);
    }
    Ok(s)
}

/// Checks the key of a file: S3 takes keys of up to 1,024 bytes.
pub fn check_key(key: &str) -> Result<(), FsError> {
    if key.len() > MAX_KEY_BYTES {
        return Err(FsError::NameTooLong);
    }
    Ok(())
}

/// Checks the key of a new directory, whose `key/` marker is one byte more.
pub fn check_dir_key(key: &str) -> Result<(), FsError> {
    check_key(&format!("{key}/"))
}

/// Joins a directory path and a name ("" is the root).
pub fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

/// Whether a name from a listing can be shown as a directory entry.
pub fn showable(name: &str) -> bool {
    !(name.is_empty()
        || name == "."
        || name == ".."
        || name == VERSIONS_DIR
        || name.len() > MAX_NAME_BYTES
        || name.contains('\0'))
}

/// Remembers which odd keys were already logged, so each is logged once.
#[derive(Debug, Default)]
pub struct OddKeys {
    seen: Mutex<HashSet<String>>,
}

impl OddKeys {
    pub fn skipped(&self, key: &str, why: &str) {
        let mut seen = self.seen.lock();
        if seen.len() < 100_000 && seen.insert(key.to_string()) {
            warn!(key = %key.escape_debug(), why, "key not shown in the mount");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_could_escape_are_refused() {
        for bad in ["", ".", "..", "a/b"] {
            assert_eq!(
                check_name(OsStr::new(bad)),
                Err(FsError::InvalidName),
                "{bad:?}"
            );
        }
        assert_eq!(
            check_name(OsStr::new(&"x".repeat(256))),
            Err(FsError::NameTooLong)
        );
        assert_eq!(check_name(OsStr::new("ok name+%#é")), Ok("ok name+%#é"));
        for bad in ["", ".", "..", ".versions", "a\0b"] {
            assert!(!showable(bad), "{bad:?}");
        }
        assert!(showable("line\nbreak"));
    }

    #[test]
    fn key_limit_is_s3s_and_counts_a_directory_markers_byte() {
        assert!(check_key(&"k".repeat(1024)).is_ok(), "S3 takes 1,024 bytes");
        assert_eq!(check_key(&"k".repeat(1025)), Err(FsError::NameTooLong));
        assert!(check_dir_key(&"k".repeat(1023)).is_ok());
        assert_eq!(check_dir_key(&"k".repeat(1024)), Err(FsError::NameTooLong));
        assert_eq!(join("", "a"), "a");
        assert_eq!(join("a/b", "c"), "a/b/c");
    }

    /// Random names, including every troublesome character: whatever
    /// check_name accepts can never leave its directory.
    #[test]
    fn fuzzed_names_never_escape() {
        let alphabet = ['a', '/', '.', '\n', '\u{1}', ' ', 'é', '%', '+', '\0', '~'];
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 8) as usize;
            let name: String = (0..len)
                .map(|i| alphabet[((x >> (i * 4)) % 11) as usize])
                .collect();
            if let Ok(n) = check_name(OsStr::new(&name)) {
                assert!(
                    !n.contains('/') && n != "." && n != ".." && !n.is_empty(),
                    "{n:?}"
                );
                let joined = join("dir", n);
                assert!(
                    joined
                        .split('/')
                        .all(|c| c != ".." && c != "." && !c.is_empty()),
                    "{joined:?}"
                );
            }
            if showable(&name) {
                assert!(name != "." && name != ".." && !name.is_empty() && !name.contains('\0'));
            }
        }
    }
}
