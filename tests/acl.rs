//! POSIX ACLs (issue 13): stored in `x-amz-meta-xattr` as s3fs-fuse
//! stores them, in step with the mode, inherited from default ACLs, and
//! checked by the kernel. The rules are checked over the core on the
//! in-memory store (`core_*`, request counts exact) and through a real
//! mount with `setfacl`/`getfacl` and other uids, with what was stored
//! read back with the S3 API, never through the mount.

mod common;

use std::ffi::OsStr;
use std::sync::Arc;
use std::time::Duration;

use bucketfs::fs::acl::{ACCESS, Acl, DEFAULT};
use bucketfs::fs::attr::decode_xattrs;
use bucketfs::fs::inodes::ROOT_INO;
use bucketfs::fs::{Creator, Fs, FsConfig, FsError, SetAttr};
use bucketfs::store::memory::MemStore;
use bucketfs::store::{Metadata, ObjectStore, Op};
use common::*;

const ROOT: Creator = Creator {
    uid: 0,
    gid: 0,
    mode: 0o644,
    umask: 0o022,
};

/// Long enough that nothing expires within a test, however slow the
/// machine.
const LONG_TTL: Duration = Duration::from_secs(3600);

const U: u32 = u32::MAX;

/// The longest a deferred change of a file this mount just wrote may take
/// to reach S3 (it is due after about a second): a bound, not a timing.
const STORED_WITHIN: Duration = Duration::from_secs(30);

fn core_fs(store: Arc<MemStore>) -> (Fs, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = FsConfig {
        staging_dir: dir.path().to_path_buf(),
        metadata_ttl: LONG_TTL,
        ..FsConfig::default()
    };
    (Fs::new(store, cfg), dir)
}

fn name(s: &str) -> &OsStr {
    OsStr::new(s)
}

/// Creates a regular file as root (umask 022), open for writing.
async fn create(fs: &Fs, parent: u64, n: &str, mode: u32) -> (bucketfs::fs::Attr, u64) {
    let c = Creator {
        mode: libc::S_IFREG | mode,
        ..ROOT
    };
    fs.create(parent, name(n), c, libc::O_WRONLY).await.unwrap()
}

/// The kernel's binary form of an ACL, written out by hand (not by the
/// code under test): u32 version 2, then {u16 tag, u16 perm, u32 id}.
fn acl_bytes(entries: &[(u16, u16, u32)]) -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec();
    for (t, p, i) in entries {
        v.extend_from_slice(&t.to_le_bytes());
        v.extend_from_slice(&p.to_le_bytes());
        v.extend_from_slice(&i.to_le_bytes());
    }
    v
}

/// u::rw-, u:1234:rw-, g::r--, m::rw-, o::---
fn named_1234() -> Vec<u8> {
    acl_bytes(&[
        (0x01, 6, U),
        (0x02, 6, 1234),
        (0x04, 4, U),
        (0x10, 6, U),
        (0x20, 0, U),
    ])
}

fn file_meta(mode: u32) -> Metadata {
    [("mode", (libc::S_IFREG | mode).to_string())]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
}

fn stored_xattrs(s: &MemStore, key: &str) -> bucketfs::fs::attr::Xattrs {
    s.metadata(key)
        .unwrap()
        .get("xattr")
        .map(|v| decode_xattrs(v))
        .unwrap_or_default()
}

fn mode_of(s: &MemStore, key: &str) -> u32 {
    s.metadata(key).unwrap()["mode"].parse::<u32>().unwrap() & 0o7777
}

/// An access ACL with a named user is stored as s3fs-fuse stores it (one
/// self-copy), sets the mode's group bits from its mask, and reads back;
/// one that says no more than a mode is stored as that mode; what Linux
/// refuses is refused before any request.
#[tokio::test]
async fn core_an_access_acl_is_stored_and_sets_the_mode() {
    let s = Arc::new(MemStore::unversioned());
    s.insert("f", b"data", file_meta(0o640));
    let (fs, _d) = core_fs(s.clone());
    let f = fs.lookup(ROOT_INO, name("f")).await.unwrap();
    assert_eq!(fs.get_xattr(f.ino, ACCESS).await, Err(FsError::NoAttr));
    let copies = s.counters().get(Op::Copy);
    fs.set_xattr(f.ino, ACCESS, &named_1234(), 0).await.unwrap();
    assert_eq!(s.counters().get(Op::Copy) - copies, 1, "one self-copy");
    // In the JSON of x-amz-meta-xattr, base64 of the kernel's bytes.
    let raw = s.metadata("f").unwrap()["xattr"].clone();
    assert!(raw.contains("system.posix_acl_access"), "{raw}");
    assert_eq!(stored_xattrs(&s, "f")[ACCESS], named_1234());
    assert_eq!(mode_of(&s, "f"), 0o660, "group bits from the mask");
    assert_eq!(&s.object("f").unwrap()[..], b"data");
    assert_eq!(fs.get_xattr(f.ino, ACCESS).await.unwrap(), named_1234());
    assert!(
        fs.list_xattr(f.ino)
            .await
            .unwrap()
            .contains(&ACCESS.to_string())
    );

    // Refused as Linux refuses them, with no request.
    let copies = s.counters().get(Op::Copy);
    let no_mask = acl_bytes(&[(0x01, 6, U), (0x02, 6, 5), (0x04, 4, U), (0x20, 0, U)]);
    assert_eq!(
        fs.set_xattr(f.ino, ACCESS, &no_mask, 0).await,
        Err(FsError::Invalid)
    );
    assert_eq!(
        fs.set_xattr(f.ino, ACCESS, &named_1234()[..7], 0).await,
        Err(FsError::Invalid)
    );
    let mut v3 = named_1234();
    v3[0] = 3;
    assert_eq!(
        fs.set_xattr(f.ino, ACCESS, &v3, 0).await,
        Err(FsError::NotSupported)
    );
    assert_eq!(
        fs.set_xattr(f.ino, DEFAULT, &named_1234(), 0).await,
        Err(FsError::AccessDenied),
        "a default ACL on a file"
    );
    fs.remove_xattr(f.ino, DEFAULT).await.unwrap();
    assert_eq!(
        s.counters().get(Op::Copy) - copies,
        0,
        "refused: no request"
    );

    // An ACL equivalent to a mode is that mode, and nothing more is kept.
    let plain = acl_bytes(&[(0x01, 7, U), (0x04, 5, U), (0x20, 0, U)]);
    fs.set_xattr(f.ino, ACCESS, &plain, 0).await.unwrap();
    assert_eq!(mode_of(&s, "f"), 0o750);
    assert!(!stored_xattrs(&s, "f").contains_key(ACCESS));
    assert_eq!(fs.get_xattr(f.ino, ACCESS).await, Err(FsError::NoAttr));
    // The same again changes nothing: no request.
    let copies = s.counters().get(Op::Copy);
    fs.set_xattr(f.ino, ACCESS, &plain, 0).await.unwrap();
    fs.remove_xattr(f.ino, ACCESS).await.unwrap();
    assert_eq!(s.counters().get(Op::Copy) - copies, 0);
}

/// chmod rewrites the stored access ACL: owner and other entries, and the
/// mask (not the owning group's entry); named entries stay.
#[tokio::test]
async fn core_chmod_updates_the_stored_access_acl() {
    let s = Arc::new(MemStore::unversioned());
    s.insert("f", b"data", file_meta(0o640));
    let (fs, _d) = core_fs(s.clone());
    let f = fs.lookup(ROOT_INO, name("f")).await.unwrap();
    fs.set_xattr(f.ino, ACCESS, &named_1234(), 0).await.unwrap();
    let copies = s.counters().get(Op::Copy);
    fs.setattr(
        f.ino,
        SetAttr {
            mode: Some(0o705),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(s.counters().get(Op::Copy) - copies, 1, "one self-copy");
    assert_eq!(mode_of(&s, "f"), 0o705);
    let want = acl_bytes(&[
        (0x01, 7, U),
        (0x02, 6, 1234),
        (0x04, 4, U),
        (0x10, 0, U),
        (0x20, 5, U),
    ]);
    assert_eq!(stored_xattrs(&s, "f")[ACCESS], want);
    assert_eq!(fs.get_xattr(f.ino, ACCESS).await.unwrap(), want);
}

/// A directory's default ACL: a new file gets it as its access ACL, masked
/// by the mode asked for with no umask; a new directory gets it as both;
/// the directory's own mode and a sibling directory without one keep the
/// umask. An access ACL set on a file open with dirty data rides its
/// upload (no copy).
#[tokio::test]
async fn core_a_default_acl_is_inherited_by_new_files_and_directories() {
    let s = Arc::new(MemStore::unversioned());
    let (fs, _d) = core_fs(s.clone());
    let mkdir = |n: &'static str, parent: u64| {
        let fs = &fs;
        async move {
            fs.mkdir(
                parent,
                name(n),
                Creator {
                    mode: libc::S_IFDIR | 0o777,
                    ..ROOT
                },
            )
            .await
            .unwrap()
        }
    };
    let d = mkdir("d", ROOT_INO).await;
    assert_eq!(d.perm, 0o755);
    // setfacl -d -m u:1234:rwx d
    let default = acl_bytes(&[
        (0x01, 7, U),
        (0x02, 7, 1234),
        (0x04, 5, U),
        (0x10, 7, U),
        (0x20, 5, U),
    ]);
    fs.set_xattr(d.ino, DEFAULT, &default, 0).await.unwrap();
    assert_eq!(stored_xattrs(&s, "d/")[DEFAULT], default);
    assert_eq!(mode_of(&s, "d/"), 0o755, "a default ACL leaves the mode");

    let (f, fh) = create(&fs, d.ino, "new", 0o666).await;
    assert_eq!(f.perm, 0o664, "no umask under a default ACL");
    fs.write(fh, 0, b"x").await.unwrap();
    // setfacl -m u:1235:r on the open, dirty file.
    let later = acl_bytes(&[
        (0x01, 6, U),
        (0x02, 7, 1234),
        (0x02, 4, 1235),
        (0x04, 4, U),
        (0x10, 6, U),
        (0x20, 4, U),
    ]);
    fs.set_xattr(f.ino, ACCESS, &later, 0).await.unwrap();
    fs.release(fh).await.unwrap();
    assert_eq!(
        s.counters().get(Op::Copy),
        1,
        "only the one of d/ for its default"
    );
    assert_eq!(stored_xattrs(&s, "d/new")[ACCESS], later);
    assert_eq!(mode_of(&s, "d/new"), 0o664);

    let (g, fh) = create(&fs, d.ino, "plain", 0o640).await;
    fs.release(fh).await.unwrap();
    assert_eq!(g.perm, 0o640);
    let access = Acl::parse(&stored_xattrs(&s, "d/plain")[ACCESS])
        .unwrap()
        .unwrap();
    assert_eq!(
        access.encode(),
        acl_bytes(&[
            (0x01, 6, U),
            (0x02, 7, 1234),
            (0x04, 5, U),
            (0x10, 4, U),
            (0x20, 0, U),
        ])
    );
    assert!(!stored_xattrs(&s, "d/plain").contains_key(DEFAULT));

    let sub = mkdir("sub", d.ino).await;
    assert_eq!(sub.perm, 0o775);
    let x = stored_xattrs(&s, "d/sub/");
    assert_eq!(x[DEFAULT], default);
    assert_eq!(
        x[ACCESS],
        acl_bytes(&[
            (0x01, 7, U),
            (0x02, 7, 1234),
            (0x04, 5, U),
            (0x10, 7, U),
            (0x20, 5, U),
        ])
    );
    // A grandchild inherits through the new directory.
    let (gc, fh) = create(&fs, sub.ino, "gc", 0o600).await;
    fs.release(fh).await.unwrap();
    assert_eq!(gc.perm, 0o600);
    assert!(stored_xattrs(&s, "d/sub/gc").contains_key(ACCESS));

    // Without a default ACL: the umask, and no ACL.
    let e = mkdir("e", ROOT_INO).await;
    let (h, fh) = create(&fs, e.ino, "h", 0o666).await;
    fs.release(fh).await.unwrap();
    assert_eq!(h.perm, 0o644);
    assert!(stored_xattrs(&s, "e/h").is_empty());

    // Removing the default ACL: new files get the umask again.
    fs.remove_xattr(d.ino, DEFAULT).await.unwrap();
    assert!(!stored_xattrs(&s, "d/").contains_key(DEFAULT));
    let (k, fh) = create(&fs, d.ino, "k", 0o666).await;
    fs.release(fh).await.unwrap();
    assert_eq!(k.perm, 0o644);
    assert!(stored_xattrs(&s, "d/k").is_empty());
}

/// On a file this mount just wrote, setting and then removing an access
/// ACL ride the deferred self-copy (`store_change`), and the removal
/// really removes it from the object.
#[tokio::test]
async fn core_acl_changes_of_a_file_just_written_are_deferred_and_removals_land() {
    let s = Arc::new(MemStore::unversioned());
    let (fs, _d) = core_fs(s.clone());
    let (f, fh) = fs
        .create(
            ROOT_INO,
            name("f"),
            Creator {
                mode: libc::S_IFREG | 0o640,
                umask: 0,
                ..ROOT
            },
            libc::O_WRONLY,
        )
        .await
        .unwrap();
    fs.write(fh, 0, b"data").await.unwrap();
    fs.release(fh).await.unwrap();
    let copies = s.counters().get(Op::Copy);
    fs.set_xattr(f.ino, ACCESS, &named_1234(), 0).await.unwrap();
    assert_eq!(s.counters().get(Op::Copy), copies, "deferred");
    assert_eq!(fs.get_xattr(f.ino, ACCESS).await.unwrap(), named_1234());
    assert!(fs.sync_all(Duration::from_secs(30)).await.is_empty());
    assert_eq!(stored_xattrs(&s, "f")[ACCESS], named_1234());
    assert_eq!(mode_of(&s, "f"), 0o660);
    // Written again, then the ACL removed (setfacl -b: the base entries).
    let fh = fs.open(f.ino, libc::O_WRONLY).await.unwrap();
    fs.write(fh, 4, b"!").await.unwrap();
    fs.release(fh).await.unwrap();
    let plain = acl_bytes(&[(0x01, 6, U), (0x04, 4, U), (0x20, 0, U)]);
    fs.set_xattr(f.ino, ACCESS, &plain, 0).await.unwrap();
    assert!(fs.sync_all(Duration::from_secs(30)).await.is_empty());
    assert!(
        !stored_xattrs(&s, "f").contains_key(ACCESS),
        "{:?}",
        s.metadata("f")
    );
    assert_eq!(mode_of(&s, "f"), 0o640);
    assert_eq!(&s.object("f").unwrap()[..], b"data!");
}

/// An ACL header another tool wrote that is not a valid ACL is no ACL
/// (the kernel checks the mode alone), never an error on every access.
#[tokio::test]
async fn core_a_garbage_stored_acl_is_no_acl() {
    let s = Arc::new(MemStore::unversioned());
    let mut meta = file_meta(0o644);
    // {"system.posix_acl_access":"AgAAAA=="}: version 2, no entry... and
    // {"system.posix_acl_default":"eA=="} on a file: one byte.
    meta.insert(
        "xattr".into(),
        "%7B%22system.posix_acl_access%22%3A%22AgAAAA%3D%3D%22%2C%22system.posix_acl_default%22%3A%22eA%3D%3D%22%7D".into(),
    );
    s.insert("f", b"data", meta);
    let (fs, _d) = core_fs(s.clone());
    let f = fs.lookup(ROOT_INO, name("f")).await.unwrap();
    assert_eq!(fs.get_xattr(f.ino, ACCESS).await, Err(FsError::NoAttr));
    assert_eq!(fs.get_xattr(f.ino, DEFAULT).await, Err(FsError::NoAttr));
    let names = fs.list_xattr(f.ino).await.unwrap();
    assert!(!names.iter().any(|n| n.starts_with("system.")), "{names:?}");
}

// ------------------------------------------------------------ real mount

/// The line of `getfacl` output that starts with `prefix`.
fn line<'a>(acl: &'a str, prefix: &str) -> &'a str {
    acl.lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no {prefix} in {acl}"))
}

fn can_append(uid: u32, path: &std::path::Path) -> Result<(), String> {
    let (ok, out) = as_user(uid, &format!("echo more >> '{}'", path.display()));
    if ok { Ok(()) } else { Err(out) }
}

fn refused(uid: u32, path: &std::path::Path) {
    let err = can_append(uid, path).expect_err("must be refused");
    assert!(err.contains("Permission denied"), "{err}");
}

/// `setfacl -m u:1234:rw f` on a 0640 file of root: the kernel lets uid
/// 1234 write it and refuses uid 1235; the ACL is in the object's
/// `x-amz-meta-xattr` and still enforced after a remount; a chmod moves
/// the mask (and so takes 1234's write away); `setfacl -b` removes it.
#[test]
fn setfacl_grants_another_uid_and_the_kernel_enforces_it() {
    let b = Bucket::new(server(), "acl-file", false);
    let m = shared_mount(&b, "metadata_ttl=1");
    let f = m.path("f");
    sh(&m.dir, "echo data > f && chmod 640 f");
    refused(1234, &f);
    sh(&m.dir, "setfacl -m u:1234:rw f");
    can_append(1234, &f).unwrap();
    refused(1235, &f);
    let acl = sh(&m.dir, "getfacl -cn f");
    assert!(acl.contains("user:1234:rw-"), "{acl}");
    assert!(acl.contains("mask::rw-"), "{acl}");
    assert_eq!(sh(&m.dir, "stat -c %a f").trim(), "660");
    let stored = || {
        let m = b.metadata("f");
        let acl = m.get("xattr").and_then(|v| decode_xattrs(v).remove(ACCESS));
        (acl, m.get("mode").cloned())
    };
    let want = (
        Some(named_1234()),
        Some((libc::S_IFREG | 0o660).to_string()),
    );
    assert!(poll(STORED_WITHIN, || stored() == want), "{:?}", stored());

    m.remount();
    let acl = sh(&m.dir, "getfacl -cn f");
    assert!(acl.contains("user:1234:rw-"), "after a remount: {acl}");
    can_append(1234, &f).unwrap();
    refused(1235, &f);

    // A default ACL on a file: EACCES, as on a local disk.
    assert_eq!(set_xattr(&f, DEFAULT, &named_1234()), Err(libc::EACCES));

    sh(&m.dir, "chmod 604 f");
    let acl = sh(&m.dir, "getfacl -cn f");
    assert!(acl.contains("mask::---"), "{acl}");
    assert!(
        line(&acl, "user:1234:rw-").contains("#effective:---"),
        "{acl}"
    );
    refused(1234, &f);
    // This mount just wrote f (1234's append): the change is stored by
    // the deferred self-copy, within a second or so.
    let stored_mode = || {
        decode_xattrs(&b.metadata("f")["xattr"])
            .get(ACCESS)
            .and_then(|v| Acl::parse(v).ok().flatten())
            .map(|a| a.mode())
    };
    let landed = poll(STORED_WITHIN, || stored_mode() == Some((0o604, false)));
    assert!(landed, "{:?}", stored_mode());

    sh(&m.dir, "setfacl -b f");
    let acl = sh(&m.dir, "getfacl -cn f");
    assert!(!acl.contains("1234"), "{acl}");
    let landed = poll(STORED_WITHIN, || {
        !b.metadata("f")
            .get("xattr")
            .is_some_and(|v| decode_xattrs(v).contains_key(ACCESS))
    });
    assert!(landed, "{:?}", b.metadata("f"));
    refused(1234, &f);
    assert_eq!(b.get("f").unwrap(), b"data\nmore\nmore\n");
}

/// A directory's default ACL is inherited by a new file (no umask: mode
/// from the create mode and the ACL) and a new subdirectory (as both its
/// access and its default ACL); uid 1234 may write the new file, 1235 may
/// not; `setfacl -k` removes the default and the umask is back.
#[test]
fn a_default_acl_is_inherited_through_the_mount() {
    let b = Bucket::new(server(), "acl-default", false);
    let m = shared_mount(&b, "metadata_ttl=1");
    sh(&m.dir, "mkdir d && setfacl -d -m u:1234:rwx d");
    let acl = sh(&m.dir, "getfacl -cn d");
    assert!(acl.contains("default:user:1234:rwx"), "{acl}");
    sh(&m.dir, "umask 022 && echo x > d/new && mkdir d/sub");
    let acl = sh(&m.dir, "getfacl -cn d/new");
    assert!(
        line(&acl, "user:1234:rwx").contains("#effective:rw-"),
        "{acl}"
    );
    assert_eq!(sh(&m.dir, "stat -c %a d/new").trim(), "664", "no umask");
    can_append(1234, &m.path("d/new")).unwrap();
    refused(1235, &m.path("d/new"));
    let acl = sh(&m.dir, "getfacl -cn d/sub");
    assert!(acl.contains("\nuser:1234:rwx"), "{acl}");
    assert!(acl.contains("default:user:1234:rwx"), "{acl}");
    let x = decode_xattrs(&b.metadata("d/sub/")["xattr"]);
    assert!(x.contains_key(ACCESS) && x.contains_key(DEFAULT), "{x:?}");
    assert!(decode_xattrs(&b.metadata("d/new")["xattr"]).contains_key(ACCESS));

    m.remount();
    let acl = sh(&m.dir, "getfacl -cn d/sub");
    assert!(acl.contains("default:user:1234:rwx"), "{acl}");
    sh(&m.dir, "setfacl -k d && umask 022 && echo y > d/later");
    let acl = sh(&m.dir, "getfacl -cn d");
    assert!(!acl.contains("default:"), "{acl}");
    assert_eq!(sh(&m.dir, "stat -c %a d/later").trim(), "644");
    assert!(!b.metadata("d/later").contains_key("xattr"));
    sh(&m.dir, "setfacl -b d/sub");
    let acl = sh(&m.dir, "getfacl -cn d/sub");
    assert!(!acl.contains("1234"), "{acl}");
}

/// Without `default_permissions` the kernel checks nothing: ACLs are not
/// offered (ENOTSUP), as before.
#[test]
fn without_default_permissions_acls_are_not_supported() {
    let b = Bucket::new(server(), "acl-off", false);
    let m = Mount::new(&b, "no_default_permissions");
    sh(&m.dir, "echo data > f");
    assert_eq!(
        set_xattr(&m.path("f"), ACCESS, &named_1234()),
        Err(libc::EOPNOTSUPP)
    );
}
