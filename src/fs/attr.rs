//! File attributes and their s3fs-fuse compatible storage.
//!
//! Mode, owner and times live in user metadata exactly as s3fs-fuse writes
//! them (`x-amz-meta-mode` as the decimal `st_mode` with the type bits,
//! `-uid`, `-gid`, `-mtime`, `-atime`, `-ctime` in decimal seconds,
//! `-rdev`), so a bucket written by one tool reads right in the other.
//! Objects without them get the mount's defaults; a missing atime or ctime
//! is the mtime.
//!
//! Extended attributes live where s3fs-fuse's `use_xattr` keeps them:
//! `x-amz-meta-xattr` holds `{"name":"base64 of the value",...}`,
//! URL-encoded (everything but `A-Za-z0-9.-_~/` as `%XX`). A header that
//! does not decode is no attributes at all, never a panic.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;

use crate::store::{Metadata, ObjectInfo};

pub const META_MODE: &str = "mode";
pub const META_UID: &str = "uid";
pub const META_GID: &str = "gid";
pub const META_MTIME: &str = "mtime";
pub const META_RDEV: &str = "rdev";
pub const META_ATIME: &str = "atime";
pub const META_CTIME: &str = "ctime";
pub const META_XATTR: &str = "xattr";

/// Extended attributes by name (`user.x`), raw values.
pub type Xattrs = BTreeMap<String, Vec<u8>>;

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
    /// Set by utimensat only: reads do not move it (noatime).
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    /// Links: 1 for a file (0 once unlinked while open), 2 plus its
    /// subdirectories for a directory (set by the core when it knows).
    pub nlink: u32,
    pub xattrs: Xattrs,
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
            atime: d.dir_mtime,
            mtime: d.dir_mtime,
            ctime: d.dir_mtime,
            nlink: 2,
            xattrs: Xattrs::new(),
        }
    }

    /// What stands in for `a` while its object's own metadata is unknown:
    /// owned by root, no permission bits. The mount's defaults (`uid=`,
    /// `umask=`) would give the object to whoever they name.
    pub fn granting_nothing(a: &Attr) -> Attr {
        Attr {
            perm: 0,
            uid: 0,
            gid: 0,
            xattrs: Xattrs::new(),
            ..a.clone()
        }
    }

    /// Attributes of an object, from its metadata when known.
    /// `dir_marker` is true for a `name/` marker object.
    ///
    /// Any writer of the bucket sets these headers: a value that does not
    /// parse, or is out of range, counts as absent (the mount's default),
    /// an unknown file type is a regular file, an mtime outside years
    /// 1..=9999 is the object's last-modified time (an atime or ctime
    /// there is the mtime), and an xattr header that does not decode is
    /// no attributes. Never panics.
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
        let time = |k: &str| get(k).and_then(parse_epoch).unwrap_or(mtime);
        Attr {
            ino,
            kind,
            size: if kind == FileKind::Dir { 0 } else { o.size },
            perm,
            uid: get(META_UID).and_then(|v| v.parse().ok()).unwrap_or(d.uid),
            gid: get(META_GID).and_then(|v| v.parse().ok()).unwrap_or(d.gid),
            rdev: get(META_RDEV).and_then(|v| v.parse().ok()).unwrap_or(0),
            atime: time(META_ATIME),
            mtime,
            ctime: time(META_CTIME),
            nlink: if kind == FileKind::Dir { 2 } else { 1 },
            xattrs: get(META_XATTR).map(decode_xattrs).unwrap_or_default(),
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
        m.insert(META_ATIME.into(), format_epoch(self.atime));
        m.insert(META_CTIME.into(), format_epoch(self.ctime));
        if self.rdev != 0 {
            m.insert(META_RDEV.into(), self.rdev.to_string());
        }
        if !self.xattrs.is_empty() {
            m.insert(META_XATTR.into(), encode_xattrs(&self.xattrs));
        }
        m
    }
}

/// What s3fs-fuse's URL encoding leaves as it is: `A-Za-z0-9.-_~/`.
const XATTR_ENCODE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'.')
    .remove(b'-')
    .remove(b'_')
    .remove(b'~')
    .remove(b'/');

/// The `x-amz-meta-xattr` value of a set of attributes, as s3fs-fuse
/// writes it.
pub fn encode_xattrs(x: &Xattrs) -> String {
    let json: serde_json::Map<String, serde_json::Value> = x
        .iter()
        .map(|(k, v)| (k.clone(), BASE64.encode(v).into()))
        .collect();
    let json = serde_json::Value::Object(json).to_string();
    percent_encoding::utf8_percent_encode(&json, XATTR_ENCODE).to_string()
}

/// The attributes in an `x-amz-meta-xattr` value; whatever does not decode
/// (not URL-encoded JSON, a value not base64) is left out.
pub fn decode_xattrs(v: &str) -> Xattrs {
    let json = percent_encoding::percent_decode_str(v).decode_utf8_lossy();
    let Ok(serde_json::Value::Object(map)) = serde_json::from_str(&json) else {
        return Xattrs::new();
    };
    map.into_iter()
        .filter_map(|(k, v)| Some((k, BASE64.decode(v.as_str()?).ok()?)))
        .collect()
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

/// Seconds as s3fs-fuse writes them: `1700000000`, or with nanoseconds
/// `1700000000.000000250` when there are any. Before 1970, whole seconds
/// (`-86400`): s3fs-fuse's negative form counts its fraction the other way.
pub fn format_epoch(t: SystemTime) -> String {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) if d.subsec_nanos() == 0 => d.as_secs().to_string(),
        Ok(d) => format!("{}.{:09}", d.as_secs(), d.subsec_nanos()),
        Err(e) => format!("-{}", e.duration().as_secs()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every key the attributes write is one the store's copies replace
    /// as a whole (so a removed extended attribute does not come back).
    #[test]
    fn the_keys_attributes_write_are_the_ones_copies_replace() {
        for k in [
            META_MODE, META_UID, META_GID, META_MTIME, META_RDEV, META_ATIME, META_CTIME,
            META_XATTR,
        ] {
            assert!(crate::store::OWNED_METADATA.contains(&k), "{k}");
        }
    }

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
        m.insert("atime".into(), "1500000000".into());
        m.insert("ctime".into(), "1700000000".into());
        let a = Attr::from_object(5, &obj(Some(m.clone())), false, &D);
        assert_eq!(
            (a.kind, a.perm, a.uid, a.gid),
            (FileKind::File, 0o700, 1000, 100)
        );
        let secs = |s| UNIX_EPOCH + Duration::from_secs(s);
        assert_eq!(a.mtime, secs(1_600_000_000));
        assert_eq!(a.atime, secs(1_500_000_000));
        assert_eq!(a.ctime, secs(1_700_000_000));
        assert_eq!(a.to_metadata(), m);
    }

    #[test]
    fn a_missing_atime_or_ctime_is_the_mtime() {
        let mut m = Metadata::new();
        m.insert("mtime".into(), "1600000000".into());
        m.insert("ctime".into(), "yesterday".into());
        let a = Attr::from_object(5, &obj(Some(m)), false, &D);
        assert_eq!((a.atime, a.ctime), (a.mtime, a.mtime));
        let back = a.to_metadata();
        assert_eq!(back["atime"], "1600000000");
        assert_eq!(back["ctime"], "1600000000");
    }

    /// The exact bytes s3fs-fuse's `use_xattr` writes: JSON of base64
    /// values, URL-encoded with `.-_~/` left as they are.
    #[test]
    fn xattrs_are_stored_as_s3fs_fuse_stores_them() {
        let mut x = Xattrs::new();
        x.insert("user.foo".into(), b"bar".to_vec());
        x.insert("user.e".into(), Vec::new());
        let v = encode_xattrs(&x);
        assert_eq!(
            v,
            "%7B%22user.e%22%3A%22%22%2C%22user.foo%22%3A%22YmFy%22%7D"
        );
        assert_eq!(decode_xattrs(&v), x);
        // As s3fs-fuse writes a value with bytes that are not UTF-8.
        let s3fs = "%7B%22user.bin%22%3A%22%2F%2F8A%22%7D";
        assert_eq!(decode_xattrs(s3fs)["user.bin"], vec![0xff, 0xff, 0]);
        let mut m = Metadata::new();
        m.insert("xattr".into(), v.clone());
        let a = Attr::from_object(5, &obj(Some(m)), false, &D);
        assert_eq!(a.xattrs, x);
        assert_eq!(a.to_metadata()["xattr"], v);
        // No attributes, no header.
        let a = Attr::from_object(5, &obj(None), false, &D);
        assert!(!a.to_metadata().contains_key("xattr"));
    }

    #[test]
    fn a_garbage_xattr_header_is_no_attributes() {
        for bad in [
            "",
            "%",
            "%7",
            "%ZZ",
            "{",
            "[1,2]",
            "%7B%22user.a%22%3A5%7D",
            "%7B%22user.a%22%3A%22%21%21%21%22%7D",
            "%FF%FE",
            "null",
        ] {
            let mut m = Metadata::new();
            m.insert("xattr".into(), bad.into());
            let a = Attr::from_object(5, &obj(Some(m)), false, &D);
            assert!(a.xattrs.is_empty(), "{bad:?}");
        }
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
    fn times_keep_their_nanoseconds_as_s3fs_fuse_writes_them() {
        let t = UNIX_EPOCH + Duration::new(1_700_000_000, 250);
        assert_eq!(format_epoch(t), "1700000000.000000250");
        assert_eq!(parse_epoch(&format_epoch(t)), Some(t));
        let whole = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(format_epoch(whole), "1700000000");
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
            atime in proptest::option::of(".{0,24}|-?[0-9]{1,22}(\\.[0-9]{0,12})?"),
            xattr in proptest::option::of(".{0,40}|(%[0-9A-Fa-f]{2}|[a-z.:{}\"]){0,40}"),
            marker in proptest::bool::ANY,
        ) {
            let mut m = Metadata::new();
            for (k, v) in [("mode", mode), ("uid", uid.clone()), ("gid", uid), ("mtime", mtime), ("rdev", rdev), ("atime", atime.clone()), ("ctime", atime), ("xattr", xattr)] {
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
            proptest::prop_assert_eq!(&back.xattrs, &a.xattrs);
            for t in [a.atime, a.ctime] {
                let _ = humantime::format_rfc3339_millis(t.max(UNIX_EPOCH)).to_string();
            }
        }
    }
}
