//! The cache disk is private: staged files, journals and cached blocks may
//! hold the bytes of 0600 objects. Directories are 0700 and files 0600,
//! owned by the mounting user, whatever the umask; a directory someone else
//! owns or can write to is refused, and recovery trusts only files that
//! this user owns inside such a directory.

use std::fs::{DirBuilder, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use tracing::warn;

fn euid() -> u32 {
    unsafe { libc::geteuid() }
}

/// Why `dir` (which exists) may not hold private data, if it may not.
fn unsafe_dir(dir: &Path) -> Option<String> {
    let md = match std::fs::symlink_metadata(dir) {
        Ok(md) => md,
        Err(e) => return Some(format!("{}: {e}", dir.display())),
    };
    if !md.is_dir() {
        return Some(format!("{} is not a directory", dir.display()));
    }
    if md.uid() != euid() {
        return Some(format!(
            "{} is owned by uid {}, not by the mounting user (uid {})",
            dir.display(),
            md.uid(),
            euid()
        ));
    }
    if md.mode() & 0o022 != 0 {
        return Some(format!(
            "{} is writable by group or others (mode {:o})",
            dir.display(),
            md.mode() & 0o7777
        ));
    }
    None
}

/// Creates `dir` (and missing parents) as 0700, or checks that it is the
/// mounting user's and not writable by others, and makes it 0700.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    if let Some(why) = unsafe_dir(dir) {
        return Err(io::Error::new(io::ErrorKind::PermissionDenied, why));
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Open options that create a file 0600 (never wider, whatever the umask).
pub fn private_file() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.mode(0o600);
    o
}

/// Checks the cache directory before mounting: created 0700 if missing;
/// refused (one line) if another user owns it or others can write to it.
pub fn check_cache_dir(dir: &Path) -> Result<(), String> {
    if !dir.exists() {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("cache_dir {}: {e}", dir.display()))?;
    }
    if let Some(why) = unsafe_dir(dir) {
        return Err(format!(
            "cache_dir refused: {why}; use a directory of your own (-o cache_dir=PATH)"
        ));
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| format!("cache_dir {}: {e}", dir.display()))
}

/// Whether a file found in the cache disk may be trusted (uploaded by
/// recovery): a regular file (not a link) owned by the mounting user, in
/// a directory the mounting user owns that others cannot write to.
/// Anything else is logged and must be skipped.
pub fn trusted(path: &Path) -> bool {
    let why = match std::fs::symlink_metadata(path) {
        Err(e) => Some(e.to_string()),
        Ok(md) if !md.is_file() => Some("not a regular file".into()),
        Ok(md) if md.uid() != euid() => Some(format!("owned by uid {}", md.uid())),
        Ok(_) => path.parent().and_then(unsafe_dir),
    };
    match why {
        None => true,
        Some(why) => {
            warn!(path = %path.display(), why, "not trusted; skipped");
            false
        }
    }
}

/// Bytes free to an unprivileged user on the filesystem holding `path`
/// (or its nearest existing ancestor, for a directory not made yet).
pub fn free_bytes(path: &Path) -> Option<u64> {
    let dir = path.ancestors().find(|p| p.exists())?;
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a valid out-pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_bavail as u64 * st.f_frsize as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_dirs_and_files_ignore_the_umask() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("a/b");
        create_private_dir(&d).unwrap();
        let f = d.join("f");
        private_file().write(true).create(true).open(&f).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o7777;
        assert_eq!(mode(&d), 0o700);
        assert_eq!(mode(&f), 0o600);
        assert!(trusted(&f));
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(!trusted(&f), "a directory others can write to");
        assert!(
            check_cache_dir(&d)
                .unwrap_err()
                .contains("writable by group or others")
        );
        std::os::unix::fs::symlink(&f, d.join("l")).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(!trusted(&d.join("l")), "a symlink");
    }
}
