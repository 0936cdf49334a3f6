//! File attributes and their s3fs-fuse compatible storage.
//!
//! Mode, owner and mtime live in user metadata exactly as s3fs-fuse writes
//! them (`x-amz-meta-mode` as the decimal `st_mode` with the type bits,
//! `-uid`, `-gid`, `-mtime` in decimal seconds, `-rdev`), so a bucket written
//! by one tool reads right in the other. Objects without them get the
//! mount's defaults.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::store::{Metadata, ObjectInfo};

pub const META_MODE: &str = "mode";
pub const META_UID: &str = "uid";
pub const META_GID: &str = "gid";
pub const META_MTIME: &str = "mtime";
pub const META_RDEV: &str = "rdev";

/// The kind of a node, from the type bits of its mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
}

impl FileKind {
    pub fn from_mode(mode: u32) -> FileKind {
        match mode & libc::S_IFMT {
            libc::S_IFDIR => FileKind::Dir,
            libc::S_IFLNK => FileKind::Symlink,
            libc::S_IFIFO => FileKind::Fifo,
            libc::S_IFSOCK => FileKind::Socket,
            libc::S_IFCHR => FileKind::CharDevice,
            libc::S_IFBLK => FileKind::BlockDevice,
            _ => FileKind::File,
        }
    }

    pub fn type_bits(self) -> u32 {
        match self {
            FileKind::File => libc::S_IFREG,
            FileKind::Dir => libc::S_IFDIR,
            FileKind::Symlink => libc::S_IFLNK,
            FileKind::Fifo => libc::S_IFIFO,
            FileKind::Socket => libc::S_IFSOCK,
            FileKind::CharDevice => libc::S_IFCHR,
            FileKind::BlockDevice => libc::S_IFBLK,
        }
    }
}

/// Owner and modes given to objects that carry no metadata.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Defaults {
    pub uid: u32,
    pub gid: u32,
    pub file_perm: u16,
    pub dir_perm: u16,
    /// The mtime of directories that exist only as a prefix (mount time).
    pub dir_mtime: SystemTime,
}

/// What `stat` shows.
#[derive(Clone, Debug, PartialEq)]
pub struct Attr {
    pub ino: u64,
    pub kind: FileKind,
    pub size: u64,
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
}

impl Attr {
    /// A directory that exists only as a prefix (or the root).
    pub fn implicit_dir(ino: u64, d: &Defaults) -> Attr {
        Attr {
            ino,
            kind: FileKind::Dir,
            size: 0,
            perm: d.dir_perm,
            uid: d.uid,
            gid: d.gid,
            rdev: 0,
            mtime: d.dir_mtime,
            ctime: d.dir_mtime,
        }
    }

    /// Attributes of an object, from its metadata when known.
    /// `dir_marker` is true for a `name/` marker object.
    pub fn from_object(ino: u64, o: &ObjectInfo, dir_marker: bool, d: &Defaults) -> Attr {
        let meta = o.metadata.as_ref();
        let get = |k: &str| meta.and_then(|m| m.get(k)).map(|v| v.trim());
        let mode = get(META_MODE).and_then(|v| v.parse::<u32>().ok());
        let kind = if dir_marker {
            FileKind::Dir
        } else {
            mode.map_or(FileKind::File, FileKind::from_mode)
        };
        let default_perm = if kind == FileKind::Dir {
            d.dir_perm
        } else {
            d.file_perm
        };
        let perm = mode.map_or(default_perm, |m| (m & 0o7777) as u16);
        let mtime = get(META_MTIME)
            .and_then(parse_epoch)
            .unwrap_or(o.last_modified);
        Attr {
            ino,
            kind,
            size: if kind == FileKind::Dir { 0 } else { o.size },
            perm,
            uid: get(META_UID).and_then(|v| v.parse().ok()).unwrap_or(d.uid),
            gid: get(META_GID).and_then(|v| v.parse().ok()).unwrap_or(d.gid),
            rdev: get(META_RDEV).and_then(|v| v.parse().ok()).unwrap_or(0),
            mtime,
            ctime: mtime,
        }
    }

    /// The metadata headers that store these attributes.
    pub fn to_metadata(&self) -> Metadata {
        let mut m = Metadata::new();
        m.insert(
            META_MODE.into(),
            (self.kind.type_bits() | u32::from(self.perm)).to_string(),
        );
        m.insert(META_UID.into(), self.uid.to_string());
        m.insert(META_GID.into(), self.gid.to_string());
        m.insert(META_MTIME.into(), format_epoch(self.mtime));
        if self.rdev != 0 {
            m.insert(META_RDEV.into(), self.rdev.to_string());
        }
        m
    }
}

/// Seconds since the epoch, possibly fractional ("1700000000.25").
pub fn parse_epoch(v: &str) -> Option<SystemTime> {
    let (secs, frac) = v.split_once('.').unwrap_or((v, ""));
    let secs: u64 = secs.parse().ok()?;
    let nanos = if frac.is_empty() {
        0
    } else {
        let digits: String = frac.chars().take(9).collect();
        let n: u32 = digits.parse().ok()?;
        n * 10u32.pow(9 - digits.len() as u32)
    };
    Some(UNIX_EPOCH + Duration::new(secs, nanos))
}

/// Whole seconds, as s3fs-fuse writes them.
pub fn format_epoch(t: SystemTime) -> String {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Defaults = Defaults {
        uid: 7,
        gid: 8,
        file_perm: 0o644,
        dir_perm: 0o755,
        dir_mtime: UNIX_EPOCH,
    };

    fn obj(meta: Option<Metadata>) -> ObjectInfo {
        ObjectInfo {
            key: "k".into(),
            size: 42,
            etag: "e".into(),
            last_modified: UNIX_EPOCH + Duration::from_secs(1000),
            version_id: None,
            storage_class: None,
            metadata: meta,
        }
    }

    #[test]
    fn s3fs_metadata_round_trips() {
        let mut m = Metadata::new();
        m.insert("mode".into(), "33216".into()); // 0100700
        m.insert("uid".into(), "1000".into());
        m.insert("gid".into(), "100".into());
        m.insert("mtime".into(), "1600000000".into());
        let a = Attr::from_object(5, &obj(Some(m.clone())), false, &D);
        assert_eq!(
            (a.kind, a.perm, a.uid, a.gid),
            (FileKind::File, 0o700, 1000, 100)
        );
        assert_eq!(a.mtime, UNIX_EPOCH + Duration::from_secs(1_600_000_000));
        assert_eq!(a.to_metadata(), m);
    }

    #[test]
    fn objects_without_metadata_get_defaults() {
        let a = Attr::from_object(5, &obj(None), false, &D);
        assert_eq!((a.perm, a.uid, a.gid, a.size), (0o644, 7, 8, 42));
        assert_eq!(a.mtime, UNIX_EPOCH + Duration::from_secs(1000));
        let d = Attr::from_object(6, &obj(None), true, &D);
        assert_eq!((d.kind, d.perm, d.size), (FileKind::Dir, 0o755, 0));
    }

    #[test]
    fn epoch_parsing_accepts_fractions_and_rejects_junk() {
        assert_eq!(
            parse_epoch("12.5"),
            Some(UNIX_EPOCH + Duration::from_millis(12_500))
        );
        assert_eq!(parse_epoch("x"), None);
        assert_eq!(parse_epoch("-1"), None);
    }
}
