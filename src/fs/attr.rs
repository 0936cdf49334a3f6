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
    ///
    /// Any writer of the bucket sets these headers: a value that does not
    /// parse, or is out of range, counts as absent (the mount's default),
    /// an unknown file type is a regular file, and an mtime outside years
    /// 1..=9999 is the object's last-modified time. Never panics.
    pub fn from_object(ino: u64, o: &ObjectInfo, dir_marker: bool, d: &Defaults) -> Attr {
        let meta = o.metadata.as_ref();
        let get = |k: &str| meta.and_then(|m| m.get(k)).map(|v| v.trim());
        let mode = get(META_MODE).and_then(|v| v.parse::<u32>().ok());
        let kind = if dir_marker {
            FileKind::Dir
        } else {
            // Only a `name/` marker is a directory here.
            match mode.map_or(FileKind::File, FileKind::from_mode) {
                FileKind::Dir => FileKind::File,
                k => k,
            }
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

/// The latest time an mtime may say: 9999-12-31T23:59:59Z.
const MAX_EPOCH_SECS: u64 = 253_402_300_799;
/// The earliest: 0001-01-01T00:00:00Z.
const MIN_EPOCH_SECS: u64 = 62_135_596_800;

/// Seconds since the epoch, possibly fractional ("1700000000.25") or
/// negative ("-86400", before 1970), within years 1..=9999; anything else
/// is None.
pub fn parse_epoch(v: &str) -> Option<SystemTime> {
    let (negative, v) = match v.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, v),
    };
    let (secs, frac) = v.split_once('.').unwrap_or((v, ""));
    if secs.is_empty() || !secs.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let secs: u64 = secs.parse().ok()?;
    let digits = &frac[..frac.len().min(9)];
    let nanos = if digits.is_empty() {
        0
    } else {
        let n: u32 = digits.parse().ok()?;
        n * 10u32.pow(9 - digits.len() as u32)
    };
    let d = Duration::new(secs, nanos);
    if negative {
        if secs >= MIN_EPOCH_SECS {
            return None;
        }
        UNIX_EPOCH.checked_sub(d)
    } else {
        if secs > MAX_EPOCH_SECS {
            return None;
        }
        UNIX_EPOCH.checked_add(d)
    }
}

/// Whole seconds, as s3fs-fuse writes them (negative before 1970).
pub fn format_epoch(t: SystemTime) -> String {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs().to_string(),
        Err(e) => format!("-{}", e.duration().as_secs()),
    }
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
            headers: None,
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
        assert_eq!(
            parse_epoch("-86400"),
            Some(UNIX_EPOCH - Duration::from_secs(86_400))
        );
        for bad in [
            "",
            "-",
            ".5",
            "1.x",
            "NaN",
            "inf",
            "1e9",
            "+5",
            "99999999999999999999",
            "9223372036854775808",
            "18446744073709551615",
            "-99999999999999",
            "253402300800",
        ] {
            assert_eq!(parse_epoch(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn hostile_metadata_gives_sane_attributes() {
        let mut m = Metadata::new();
        m.insert("mode".into(), format!("{}", 0o170777));
        m.insert("uid".into(), "99999999999".into());
        m.insert("gid".into(), "-1".into());
        m.insert("mtime".into(), "99999999999999999999".into());
        m.insert("rdev".into(), "garbage".into());
        let a = Attr::from_object(5, &obj(Some(m)), false, &D);
        assert_eq!(
            (a.kind, a.perm, a.uid, a.gid, a.rdev),
            (FileKind::File, 0o777, 7, 8, 0)
        );
        assert_eq!(a.mtime, UNIX_EPOCH + Duration::from_secs(1000));
        let mut m = Metadata::new();
        m.insert("mode".into(), format!("{}", libc::S_IFDIR | 0o755));
        let a = Attr::from_object(5, &obj(Some(m)), false, &D);
        assert_eq!(a.kind, FileKind::File, "only a marker is a directory");
    }

    proptest::proptest! {
        /// Whatever headers a writer of the bucket sets, the attributes
        /// are sane and formatting them (as the kernel and xattrs do)
        /// never panics.
        #[test]
        fn any_metadata_gives_sane_attributes(
            mode in proptest::option::of(".{0,12}|[0-9]{1,12}"),
            uid in proptest::option::of(".{0,12}|[0-9]{1,12}"),
            mtime in proptest::option::of(".{0,24}|-?[0-9]{1,22}(\\.[0-9]{0,12})?"),
            rdev in proptest::option::of(".{0,12}"),
            marker in proptest::bool::ANY,
        ) {
            let mut m = Metadata::new();
            for (k, v) in [("mode", mode), ("uid", uid.clone()), ("gid", uid), ("mtime", mtime), ("rdev", rdev)] {
                if let Some(v) = v {
                    m.insert(k.into(), v);
                }
            }
            let a = Attr::from_object(5, &obj(Some(m)), marker, &D);
            proptest::prop_assert!(a.perm <= 0o7777);
            proptest::prop_assert_eq!(a.kind == FileKind::Dir, marker);
            let secs = match a.mtime.duration_since(UNIX_EPOCH) {
                Ok(d) => d.as_secs() as i128,
                Err(e) => -(e.duration().as_secs() as i128),
            };
            proptest::prop_assert!((-(MIN_EPOCH_SECS as i128)..=MAX_EPOCH_SECS as i128).contains(&secs));
            let _ = humantime::format_rfc3339_millis(a.mtime.max(UNIX_EPOCH)).to_string();
            let back = Attr::from_object(5, &obj(Some(a.to_metadata())), marker, &D);
            proptest::prop_assert_eq!((back.kind, back.perm, back.uid, back.gid), (a.kind, a.perm, a.uid, a.gid));
        }
    }
}
