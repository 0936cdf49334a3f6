//! Extended attributes.
//!
//! - `user.*` names a user sets (setfattr, `cp -a`, file managers), and
//!   names in no namespace (as s3fs-fuse allows), are
//!   kept with the object's attributes (`Attr::xattrs`) and stored where
//!   s3fs-fuse's `use_xattr` stores them, `x-amz-meta-xattr` (`attr.rs`).
//!   Setting or removing one is a metadata change like a chmod
//!   (`Fs::store_change`): it rides on the pending upload of a file open
//!   with dirty data, else costs one self-copy of the object (or its
//!   `dir/` marker). The mount root has no object: its attributes live in
//!   memory.
//! - `user.s3.*` describe the object (ETag, version...) and are read-only
//!   (`Fs::xattrs`).
//! - `system.posix_acl_access` and `system.posix_acl_default` are POSIX
//!   ACLs (`acl.rs`): kept with the other attributes, as s3fs-fuse keeps
//!   them, checked on the way in, and in step with the mode. Setting one
//!   is a metadata change like any other (`Fs::store_change`); setting an
//!   access ACL that says no more than a mode stores just that mode.
//! - Other names of the namespaces `security.`, `system.`, `trusted.`
//!   are not supported: ENOTSUP.
//!
//! S3 holds at most 2 KiB of user metadata per object: an attribute that
//! would not fit is refused with E2BIG before any request.

use std::time::SystemTime;

use super::acl::{self, Acl};
use super::{Attr, FileKind, Fs, FsError, FsResult};

/// What S3 accepts of user metadata per object: names and values, bytes.
pub const S3_USER_METADATA_MAX_BYTES: usize = 2048;

/// The read-only attributes that describe the object.
const S3_PREFIX: &str = "user.s3.";

/// Namespaces the kernel gives meaning to that bucketfs does not keep.
pub const UNSUPPORTED_PREFIXES: [&str; 3] = ["security.", "system.", "trusted."];

/// Whether `name` is one a user may set: `user.*`, or a name in no
/// namespace (s3fs-fuse keeps those, and its own tests set them).
fn check_settable(name: &str) -> FsResult<()> {
    if name.starts_with(S3_PREFIX) {
        return Err(FsError::NotPermitted);
    }
    if acl::is_acl_name(name) {
        return Ok(());
    }
    if UNSUPPORTED_PREFIXES.iter().any(|p| name.starts_with(p)) {
        return Err(FsError::NotSupported);
    }
    if name.is_empty() || name == "user." {
        return Err(FsError::Invalid);
    }
    Ok(())
}

/// The value of ACL `name` in `a`: ENODATA when there is none, or when
/// what another writer of the bucket stored there is not a valid ACL
/// (the kernel then checks the mode alone, never fails a permission
/// check on it).
pub fn acl_xattr(a: &Attr, name: &str) -> FsResult<Vec<u8>> {
    let v = a.xattrs.get(name).ok_or(FsError::NoAttr)?;
    match Acl::parse(v) {
        Ok(Some(_)) => Ok(v.clone()),
        _ => Err(FsError::NoAttr),
    }
}

/// Whether the attributes fit in S3's user metadata.
fn check_fits(a: &Attr) -> FsResult<()> {
    let bytes: usize = a.to_metadata().iter().map(|(k, v)| k.len() + v.len()).sum();
    if bytes > S3_USER_METADATA_MAX_BYTES {
        return Err(FsError::TooBig);
    }
    Ok(())
}

impl Fs {
    /// The value of one attribute.
    pub async fn get_xattr(&self, ino: u64, name: &str) -> FsResult<Vec<u8>> {
        if name.starts_with(S3_PREFIX) {
            return self
                .xattrs(ino)
                .await?
                .into_iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.into_bytes())
                .ok_or(FsError::NoAttr);
        }
        check_settable(name).map_err(|e| match e {
            FsError::NotSupported => e,
            _ => FsError::NoAttr,
        })?;
        let a = self.getattr(ino).await?;
        if acl::is_acl_name(name) {
            return acl_xattr(&a, name);
        }
        a.xattrs.get(name).cloned().ok_or(FsError::NoAttr)
    }

    /// Every attribute's name: the user's, then the object's `user.s3.*`.
    pub async fn list_xattr(&self, ino: u64) -> FsResult<Vec<String>> {
        let a = self.getattr(ino).await?;
        let mut names: Vec<String> = a
            .xattrs
            .keys()
            .filter(|k| !acl::is_acl_name(k) || acl_xattr(&a, k).is_ok())
            .cloned()
            .collect();
        names.extend(self.xattrs(ino).await?.into_iter().map(|(k, _)| k));
        Ok(names)
    }

    /// setxattr(2): `flags` XATTR_CREATE fails if it exists, XATTR_REPLACE
    /// if it does not.
    pub async fn set_xattr(&self, ino: u64, name: &str, value: &[u8], flags: i32) -> FsResult<()> {
        let path = self.xattr_target(ino, name)?;
        if acl::is_acl_name(name) {
            return self.set_acl(ino, path, name, value).await;
        }
        let a = self.getattr(ino).await?;
        let exists = a.xattrs.contains_key(name);
        if flags & libc::XATTR_CREATE != 0 && exists {
            return Err(FsError::Exists);
        }
        if flags & libc::XATTR_REPLACE != 0 && !exists {
            return Err(FsError::NoAttr);
        }
        let mut next = a.clone();
        next.xattrs.insert(name.to_string(), value.to_vec());
        check_fits(&next)?;
        let ctime = SystemTime::now();
        self.store_change(ino, path, |a| {
            a.xattrs.insert(name.to_string(), value.to_vec());
            a.ctime = ctime;
        })
        .await?;
        Ok(())
    }

    /// removexattr(2).
    pub async fn remove_xattr(&self, ino: u64, name: &str) -> FsResult<()> {
        let path = self.xattr_target(ino, name)?;
        let present = self.getattr(ino).await?.xattrs.contains_key(name);
        if !present && acl::is_acl_name(name) {
            // Removing an ACL a node does not have succeeds, as in Linux
            // (`setfacl -b` of a directory without a default ACL).
            return Ok(());
        }
        if !present {
            return Err(FsError::NoAttr);
        }
        let ctime = SystemTime::now();
        self.store_change(ino, path, |a| {
            a.xattrs.remove(name);
            a.ctime = ctime;
        })
        .await?;
        Ok(())
    }

    /// setxattr of a POSIX ACL, checked as Linux checks it (`acl.rs`). An
    /// access ACL sets the mode's permission bits; one equivalent to a mode
    /// is stored as that mode alone. An empty ACL is a removal. Neither
    /// XATTR_CREATE nor XATTR_REPLACE applies: the kernel never sends them
    /// for ACLs. A change that changes nothing costs no request.
    async fn set_acl(
        &self,
        ino: u64,
        path: Option<String>,
        name: &str,
        value: &[u8],
    ) -> FsResult<()> {
        let parsed = Acl::parse(value)?;
        let a = self.getattr(ino).await?;
        if name == acl::DEFAULT && a.kind != FileKind::Dir {
            return match parsed {
                Some(_) => Err(FsError::AccessDenied),
                None => Ok(()),
            };
        }
        let Some(parsed) = parsed else {
            return self.remove_xattr(ino, name).await;
        };
        let (perm, stored) = if name == acl::ACCESS {
            let (mode, equivalent) = parsed.mode();
            (Some(mode), (!equivalent).then(|| parsed.encode()))
        } else {
            (None, Some(parsed.encode()))
        };
        let ctime = SystemTime::now();
        let change = |a: &mut Attr| {
            if let Some(m) = perm {
                a.perm = (a.perm & !0o777) | m;
            }
            match &stored {
                Some(v) => a.xattrs.insert(name.to_string(), v.clone()),
                None => a.xattrs.remove(name),
            };
            a.ctime = ctime;
        };
        let mut next = a.clone();
        change(&mut next);
        if next.perm == a.perm && next.xattrs == a.xattrs {
            let mut t = self.table.lock();
            let n = t.get_mut(ino).ok_or(FsError::NotFound)?;
            n.attr.ctime = ctime;
            return Ok(());
        }
        check_fits(&next)?;
        self.store_change(ino, path, change).await?;
        Ok(())
    }

    /// The path of a node whose attribute `name` may be changed.
    fn xattr_target(&self, ino: u64, name: &str) -> FsResult<Option<String>> {
        check_settable(name)?;
        let path = self.change_target(ino)?;
        // With no_object_metadata there is nowhere to keep them.
        if !self.cfg.object_metadata {
            return Err(FsError::NotSupported);
        }
        Ok(path)
    }
}
