//! POSIX as far as S3 allows (issue 13): directory times, atime and
//! ctime, nlink, extended attributes. Each rule is checked over the core
//! on the in-memory store (`core_*`, request counts exact) and through a
//! real mount on a real local S3 server, with what was stored read back
//! with the S3 API, never through the mount.

mod common;

use std::ffi::OsStr;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bucketfs::fs::inodes::ROOT_INO;
use bucketfs::fs::{Creator, Fs, FsConfig, FsError, SetAttr};
use bucketfs::store::memory::MemStore;
use bucketfs::store::{Metadata, ObjectStore, Op};
use common::*;

const USER: Creator = Creator {
    uid: 1000,
    gid: 1000,
    mode: 0o644,
    umask: 0o022,
};

/// Long enough that nothing expires within a test, however slow the
/// machine.
const LONG_TTL: Duration = Duration::from_secs(3600);

/// An old time, seconds since the epoch, that no change made now equals.
const OLD_SECS: u64 = 1_000_000_000;

fn old() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(OLD_SECS)
}

fn core_fs(store: Arc<MemStore>, ttl: Duration) -> (Fs, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = FsConfig {
        staging_dir: dir.path().to_path_buf(),
        metadata_ttl: ttl,
        ..FsConfig::default()
    };
    cfg.defaults.dir_mtime = old();
    (Fs::new(store, cfg), dir)
}

fn name(s: &str) -> &OsStr {
    OsStr::new(s)
}

fn dir_meta(mtime: u64) -> Metadata {
    [("mode", "16877"), ("uid", "0"), ("gid", "0")]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .chain([("mtime".to_string(), mtime.to_string())])
        .collect()
}

/// A time as stored in `x-amz-meta-*` (s3fs-fuse's form).
fn stored(t: SystemTime) -> String {
    bucketfs::fs::attr::format_epoch(t)
}

/// The mtime and ctime `stat` shows.
fn times(md: &std::fs::Metadata) -> (SystemTime, SystemTime) {
    let at = |s: i64, n: i64| UNIX_EPOCH + Duration::new(s as u64, n as u32);
    (
        at(md.mtime(), md.mtime_nsec()),
        at(md.ctime(), md.ctime_nsec()),
    )
}

// ------------------------------------------------------ directory times

/// A directory that is only a prefix has nowhere to store its times: a
/// create there moves them in memory, costs no request more than a create
/// anywhere, and keeps them when the directory is read from S3 again.
#[tokio::test]
async fn core_a_directory_without_marker_keeps_its_new_times_in_memory() {
    let s = Arc::new(MemStore::unversioned());
    s.insert("bare/old", b"x", Metadata::new());
    // A zero TTL: every getattr asks S3 again.
    let (fs, _d) = core_fs(s.clone(), Duration::ZERO);
    let dir = fs.lookup(ROOT_INO, name("bare")).await.unwrap();
    assert_eq!((dir.mtime, dir.ctime), (old(), old()));
    let before: Vec<u64> = Op::ALL.iter().map(|&o| s.counters().get(o)).collect();
    let (_, fh) = fs.create(dir.ino, name("new"), USER, 0).await.unwrap();
    fs.release(fh).await.unwrap();
    let ops: Vec<(Op, u64)> = Op::ALL
        .iter()
        .zip(&before)
        .map(|(&o, b)| (o, s.counters().get(o) - b))
        .filter(|(_, n)| *n > 0)
        .collect();
    assert_eq!(
        ops.iter().find(|(o, _)| *o == Op::Copy),
        None,
        "no copy for the directory: {ops:?}"
    );
    let a = fs.getattr(dir.ino).await.unwrap();
    assert!(a.mtime > old() && a.ctime > old(), "{a:?}");
    let changed = a.mtime;
    fs.unlink(dir.ino, name("old")).await.unwrap();
    let b = fs.getattr(dir.ino).await.unwrap();
    assert!(b.mtime > changed, "an unlink moves it again");
    assert_eq!(s.counters().get(Op::Copy), 0);
}

/// A directory with a marker gets its new times stored on it: deferred,
/// a burst of changes costs one copy, made by fsync of the directory (or
/// the background task, or unmount).
#[tokio::test]
async fn core_a_directory_with_a_marker_stores_its_times_on_it_once_per_batch() {
    let s = Arc::new(MemStore::unversioned());
    s.insert("d/", b"", dir_meta(OLD_SECS));
    let (fs, _d) = core_fs(s.clone(), LONG_TTL);
    let dir = fs.lookup(ROOT_INO, name("d")).await.unwrap();
    assert_eq!(dir.mtime, old());
    let copies = s.counters().get(Op::Copy);
    for f in ["a", "b", "c"] {
        let (_, fh) = fs.create(dir.ino, name(f), USER, 0).await.unwrap();
        fs.release(fh).await.unwrap();
    }
    fs.mknod(
        dir.ino,
        name("fifo"),
        Creator {
            mode: libc::S_IFIFO | 0o644,
            ..USER
        },
        0,
    )
    .await
    .unwrap();
    fs.unlink(dir.ino, name("a")).await.unwrap();
    assert_eq!(s.counters().get(Op::Copy), copies, "deferred");
    let shown = fs.getattr(dir.ino).await.unwrap();
    assert!(shown.mtime > old(), "seen at once");
    fs.fsyncdir(dir.ino).await.unwrap();
    assert_eq!(s.counters().get(Op::Copy) - copies, 1, "one copy for all");
    let m = s.metadata("d/").unwrap();
    assert_eq!(m["mtime"], stored(shown.mtime));
    assert_eq!(m["ctime"], stored(shown.ctime));
    assert_eq!(m["mode"], "16877", "the marker's mode is kept");
    // Nothing queued: a second fsync copies nothing.
    fs.fsyncdir(dir.ino).await.unwrap();
    assert_eq!(s.counters().get(Op::Copy) - copies, 1);
}

/// A rename moves the times of both directories, and the renamed file's
/// ctime, not its mtime.
#[tokio::test]
async fn core_a_rename_moves_both_directories_and_the_files_ctime() {
    let s = Arc::new(MemStore::unversioned());
    s.insert(
        "src/f",
        b"x",
        [
            ("mtime", OLD_SECS.to_string()),
            ("ctime", OLD_SECS.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect(),
    );
    s.insert("dst/", b"", dir_meta(OLD_SECS));
    let (fs, _d) = core_fs(s.clone(), LONG_TTL);
    let src = fs.lookup(ROOT_INO, name("src")).await.unwrap();
    let dst = fs.lookup(ROOT_INO, name("dst")).await.unwrap();
    let f = fs.lookup(src.ino, name("f")).await.unwrap();
    assert_eq!((f.mtime, f.ctime), (old(), old()));
    fs.rename(src.ino, name("f"), dst.ino, name("g"), false)
        .await
        .unwrap();
    let moved = fs.getattr(f.ino).await.unwrap();
    assert_eq!(moved.mtime, old(), "a rename is no write");
    assert!(moved.ctime > old());
    for d in [src.ino, dst.ino] {
        let a = fs.getattr(d).await.unwrap();
        assert!(a.mtime > old() && a.ctime > old(), "{a:?}");
    }
}

// ------------------------------------------------------ atime and ctime

/// utimensat sets atime, stored as s3fs-fuse stores it; a read does not
/// move it; a chmod moves ctime, stored too.
#[tokio::test]
async fn core_atime_is_set_by_utimens_only_and_ctime_by_every_change() {
    let s = Arc::new(MemStore::unversioned());
    s.insert(
        "f",
        b"data",
        [("mode", "33188"), ("mtime", "1000000000")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    );
    let (fs, _d) = core_fs(s.clone(), LONG_TTL);
    let f = fs.lookup(ROOT_INO, name("f")).await.unwrap();
    assert_eq!((f.atime, f.ctime), (old(), old()), "absent: the mtime");
    let at = UNIX_EPOCH + Duration::from_secs(1_500_000_000);
    let a = fs
        .setattr(
            f.ino,
            SetAttr {
                atime: Some(at),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!((a.atime, a.mtime), (at, old()));
    assert!(a.ctime > old());
    let m = s.metadata("f").unwrap();
    assert_eq!(
        (m["atime"].as_str(), m["mtime"].as_str()),
        ("1500000000", "1000000000")
    );
    assert_eq!(m["ctime"], stored(a.ctime));
    let fh = fs.open(f.ino, libc::O_RDONLY).await.unwrap();
    assert_eq!(&fs.read(fh, 0, 4).await.unwrap()[..], b"data");
    fs.release(fh).await.unwrap();
    assert_eq!(fs.getattr(f.ino).await.unwrap().atime, at, "noatime");
    assert_eq!(s.metadata("f").unwrap()["atime"], "1500000000");
}

/// A write moves mtime and ctime, and both are stored with the data.
#[tokio::test]
async fn core_a_write_stores_mtime_and_ctime_with_the_data() {
    let s = Arc::new(MemStore::unversioned());
    s.insert(
        "f",
        b"data",
        [
            ("mode", "33188"),
            ("mtime", "1000000000"),
            ("atime", "1000000000"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect(),
    );
    let (fs, _d) = core_fs(s.clone(), LONG_TTL);
    let f = fs.lookup(ROOT_INO, name("f")).await.unwrap();
    let fh = fs.open(f.ino, libc::O_WRONLY).await.unwrap();
    fs.write(fh, 0, b"DATA").await.unwrap();
    fs.release(fh).await.unwrap();
    let a = fs.getattr(f.ino).await.unwrap();
    assert!(a.mtime > old() && a.ctime >= a.mtime);
    assert_eq!(a.atime, old(), "a write is no access");
    let m = s.metadata("f").unwrap();
    assert_eq!(m["mtime"], stored(a.mtime));
    assert_eq!(m["ctime"], stored(a.ctime));
    assert_eq!(m["atime"], "1000000000");
    assert_eq!(&s.object("f").unwrap()[..], b"DATA");
}

// ------------------------------------------------- through a real mount

const PINNED: &str = "metadata_ttl=3600";

fn stat(m: &Mount, rel: &str) -> std::fs::Metadata {
    std::fs::symlink_metadata(m.path(rel)).unwrap_or_else(|e| panic!("stat {rel}: {e}"))
}

/// The permission bits by statx(2) asking STATX_MODE only.
fn mode_only(p: &std::path::Path) -> u32 {
    let path = c_str(p.to_str().unwrap());
    let mut sx: libc::statx = unsafe { std::mem::zeroed() };
    let r = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            path.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
            libc::STATX_MODE,
            &mut sx,
        )
    };
    assert_eq!(
        r,
        0,
        "statx {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
    u32::from(sx.stx_mode) & 0o7777
}

/// fsync(2) of a directory.
fn fsync_dir(m: &Mount, rel: &str) {
    std::fs::File::open(m.path(rel))
        .unwrap()
        .sync_all()
        .unwrap();
}

fn put_dir_marker(b: &Bucket, key: &str) {
    let old = OLD_SECS.to_string();
    b.put_meta(
        key,
        b"",
        &[
            ("mode", "16877"),
            ("uid", "0"),
            ("gid", "0"),
            ("mtime", &old),
        ],
    );
}

#[test]
fn a_directory_with_a_marker_shows_new_times_at_once_and_stores_them_on_it() {
    let b = Bucket::new(server(), "dirtimes", false);
    put_dir_marker(&b, "d/");
    put_dir_marker(&b, "e/");
    let m = Mount::new(&b, PINNED);
    assert_eq!(stat(&m, "d").mtime() as u64, OLD_SECS);
    std::fs::write(m.path("d/f"), b"x").unwrap();
    let d = stat(&m, "d");
    assert!(d.mtime() as u64 > OLD_SECS && d.ctime() as u64 > OLD_SECS);
    fsync_dir(&m, "d");
    let meta = b.metadata("d/");
    assert_eq!(meta["mtime"], stored(times(&d).0));
    assert_eq!(meta["ctime"], stored(times(&d).1));
    assert_eq!(meta["mode"], "16877");
    // Removed and renamed out, then stored by the unmount.
    std::fs::rename(m.path("d/f"), m.path("e/g")).unwrap();
    let e = stat(&m, "e");
    assert!(e.mtime() as u64 > OLD_SECS);
    assert!(m.unmount().is_some());
    assert_eq!(b.metadata("e/")["mtime"], stored(times(&e).0));
    assert_eq!(b.get("e/g").unwrap(), b"x");
}

/// A create in a directory without a marker costs the file's PUT and
/// nothing for the directory, whose times move in memory.
#[test]
fn a_directory_without_a_marker_costs_no_request_for_its_times() {
    let b = Bucket::new(server(), "baretimes", false);
    b.put("bare/old", b"x");
    let m = Mount::new(&b, PINNED);
    let before = stat(&m, "bare");
    let (puts, copies) = (requests(&m, "PUT"), requests(&m, "COPY"));
    sh(&m.dir, "for i in 1 2 3 4 5; do echo $i > bare/f$i; done");
    assert_eq!(requests(&m, "PUT") - puts, 5, "one PUT per file");
    assert_eq!(
        requests(&m, "COPY") - copies,
        0,
        "nothing for the directory"
    );
    let after = stat(&m, "bare");
    assert!(after.mtime() > before.mtime() || after.mtime_nsec() > before.mtime_nsec());
    std::fs::remove_file(m.path("bare/old")).unwrap();
    let gone = stat(&m, "bare");
    assert!((gone.mtime(), gone.mtime_nsec()) > (after.mtime(), after.mtime_nsec()));
    assert!(m.unmount().is_some());
    assert!(
        b.keys("bare/").iter().all(|k| k != "bare/"),
        "no marker made"
    );
}

#[test]
fn utimensat_sets_atime_a_read_does_not_and_chmod_moves_ctime() {
    let b = Bucket::new(server(), "atime", false);
    let old = OLD_SECS.to_string();
    b.put_meta("f", b"data", &[("mode", "33188"), ("mtime", &old)]);
    let m = Mount::new(&b, PINNED);
    let f = stat(&m, "f");
    assert_eq!((f.atime() as u64, f.ctime() as u64), (OLD_SECS, OLD_SECS));
    sh(&m.dir, "touch -a -d @1500000000 f");
    let f = stat(&m, "f");
    assert_eq!((f.atime(), f.mtime() as u64), (1_500_000_000, OLD_SECS));
    assert!(f.ctime() as u64 > OLD_SECS, "utimensat moves ctime");
    let meta = b.metadata("f");
    assert_eq!(meta["atime"], "1500000000");
    assert_eq!(meta["mtime"], old);
    assert_eq!(std::fs::read(m.path("f")).unwrap(), b"data");
    assert_eq!(stat(&m, "f").atime(), 1_500_000_000, "noatime");
    sh(&m.dir, "touch -m -d @1600000000 f; chmod 600 f");
    let f = stat(&m, "f");
    let meta = b.metadata("f");
    assert_eq!(meta["ctime"], stored(times(&f).1));
    assert_eq!(
        (
            meta["atime"].as_str(),
            meta["mtime"].as_str(),
            meta["mode"].as_str()
        ),
        ("1500000000", "1600000000", "33152")
    );
}

#[test]
fn a_renamed_file_and_directory_get_a_new_ctime() {
    let b = Bucket::new(server(), "renamectime", false);
    let old = OLD_SECS.to_string();
    b.put_meta("f", b"data", &[("mtime", &old), ("ctime", &old)]);
    put_dir_marker(&b, "dir/");
    b.put_meta("dir/inner", b"i", &[("mtime", &old)]);
    let m = Mount::new(&b, PINNED);
    std::fs::rename(m.path("f"), m.path("g")).unwrap();
    std::fs::rename(m.path("dir"), m.path("dir2")).unwrap();
    let g = stat(&m, "g");
    assert_eq!(g.mtime() as u64, OLD_SECS);
    assert!(g.ctime() as u64 > OLD_SECS);
    let d = stat(&m, "dir2");
    assert!(d.ctime() as u64 > OLD_SECS);
    assert_eq!(std::fs::read(m.path("dir2/inner")).unwrap(), b"i");
}

/// The kernel forgets inodes at will (memory pressure, `drop_caches`) and
/// looks the file up again: it keeps its inode number, also after a
/// rename, and so does a directory (pjdfstest `rename/10.t` compares them).
#[test]
fn a_file_keeps_its_inode_number_when_the_kernel_evicts_it() {
    let b = Bucket::new(server(), "inokeep", false);
    b.put("d/f", b"data");
    let m = Mount::new(&b, "");
    let (f, d) = (stat(&m, "d/f").ino(), stat(&m, "d").ino());
    let evict = || std::fs::write("/proc/sys/vm/drop_caches", "2").unwrap();
    evict();
    assert_eq!(stat(&m, "d/f").ino(), f, "after an eviction");
    assert_eq!(stat(&m, "d").ino(), d, "a directory after an eviction");
    std::fs::rename(m.path("d/f"), m.path("d/g")).unwrap();
    evict();
    assert_eq!(stat(&m, "d/g").ino(), f, "renamed, after an eviction");
    std::fs::write(m.path("d/h"), b"new").unwrap();
    let h = stat(&m, "d/h").ino();
    evict();
    assert_eq!(stat(&m, "d/h").ino(), h, "a file this mount made");
    assert_ne!(h, f);
}

/// Set-user-ID and set-group-ID (with group execute) are cleared as Linux
/// clears them: by a write, a truncation and an `O_TRUNC` open of another
/// user (no CAP_FSETID), by every chown, not by root's own write; the
/// bits of what was cleared land in S3 too. (The filesystem does it
/// itself: FUSE_HANDLE_KILLPRIV_V2 spares each write a GETXATTR.)
#[test]
fn set_user_id_is_cleared_by_writes_truncations_and_chown() {
    let b = Bucket::new(server(), "killsuid", false);
    let m = shared_mount(&b, "");
    let f = m.path("f");
    std::fs::write(&f, b"data").unwrap();
    std::os::unix::fs::chown(&f, Some(1000), Some(1000)).unwrap();
    // As `stat -c %a` and `find -perm` ask: the mode alone. (A full stat
    // after a write makes the kernel ask again; this does not, so it shows
    // whether the kernel was told the bits changed.)
    let mode = || mode_only(&f);
    let set = |bits: u32| {
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(bits)).unwrap();
        assert_eq!(mode(), bits);
    };
    let path = f.display().to_string();
    let as_owner = |script: &str| {
        let (ok, out) = as_user(1000, &script.replace("F", &path));
        assert!(ok, "{script}: {out}");
    };
    for (before, script, after, what) in [
        (0o6755, "echo more >> F", 0o755, "a write by the owner"),
        (
            0o6745,
            "echo more >> F",
            0o2745,
            "set-group-ID without group execute stays",
        ),
        (0o6755, "truncate -s 2 F", 0o755, "truncate"),
        (0o6755, ": > F", 0o755, "an O_TRUNC open"),
    ] {
        set(before);
        as_owner(script);
        assert_eq!(mode(), after, "{what}");
    }
    set(0o6755);
    std::fs::OpenOptions::new()
        .append(true)
        .open(&f)
        .unwrap()
        .write_all(b"root")
        .unwrap();
    assert_eq!(mode(), 0o6755, "root's own write keeps them");
    std::os::unix::fs::chown(&f, Some(1001), None).unwrap();
    assert_eq!(mode(), 0o755, "chown, even by root");
    assert_eq!(std::fs::read(&f).unwrap(), b"root", "what the steps wrote");
    assert!(
        poll(Duration::from_secs(30), || b.metadata("f")["mode"]
            == (0o100755).to_string()),
        "stored: {:?}",
        b.metadata("f")
    );
}

/// The names an open directory stream reads from where it stands.
fn read_names(d: *mut libc::DIR) -> Vec<String> {
    let mut listed = Vec::new();
    loop {
        let e = unsafe { libc::readdir(d) };
        if e.is_null() {
            return listed;
        }
        let name = unsafe { std::ffi::CStr::from_ptr((*e).d_name.as_ptr()) };
        listed.push(name.to_string_lossy().into_owned());
    }
}

/// A directory handle opened before a rename or an unlink lists from its
/// snapshot; the kernel links each name it is given to its inode. The old
/// name must not come back pointing at the renamed file (an `O_TRUNC`
/// open of it then truncated the renamed file, in S3 too), nor the name
/// of a file unlinked while open.
#[test]
fn a_listing_older_than_a_rename_does_not_bring_the_old_name_back() {
    let b = Bucket::new(server(), "stalelist", false);
    let m = Mount::new(&b, "");
    std::fs::create_dir(m.path("g")).unwrap();
    std::fs::write(m.path("g/doc.tmp"), b"v1\n").unwrap();
    std::fs::write(m.path("g/gone"), b"x").unwrap();
    let held = std::fs::File::open(m.path("g/gone")).unwrap();
    let dir = c_str(m.path("g").to_str().unwrap());
    let d = unsafe { libc::opendir(dir.as_ptr()) };
    assert!(!d.is_null());
    std::fs::rename(m.path("g/doc.tmp"), m.path("g/doc")).unwrap();
    std::fs::remove_file(m.path("g/gone")).unwrap();
    let listed = read_names(d);
    unsafe { libc::closedir(d) };
    // The names may be listed (POSIX leaves it open for a handle older
    // than the change); they must not resolve.
    assert!(
        listed.iter().any(|n| n == "doc.tmp" || n == "doc"),
        "{listed:?}"
    );
    assert_eq!(
        std::fs::metadata(m.path("g/gone"))
            .map_err(|e| e.raw_os_error())
            .err(),
        Some(Some(libc::ENOENT))
    );
    assert_eq!(
        std::fs::metadata(m.path("g/doc.tmp"))
            .map_err(|e| e.raw_os_error())
            .err(),
        Some(Some(libc::ENOENT))
    );
    // rsync's next temporary file, at the old name.
    std::fs::write(m.path("g/doc.tmp"), b"").unwrap();
    assert_eq!(std::fs::read(m.path("g/doc")).unwrap(), b"v1\n");
    assert_eq!(b.get("g/doc").as_deref(), Some(&b"v1\n"[..]));
    assert_eq!(b.get("g/doc.tmp").as_deref(), Some(&b""[..]));
    drop(held);
}

/// The names of directory stream `d` after a `rewinddir`, sorted, without
/// `.` and `..`.
fn rewound_names(d: *mut libc::DIR) -> Vec<String> {
    unsafe { libc::rewinddir(d) };
    let mut listed = read_names(d);
    listed.retain(|n| n != "." && n != "..");
    listed.sort();
    listed
}

/// `rewinddir` shows the directory as it is now (POSIX: as `opendir`
/// would): a file this mount made at once, another client's object once
/// the listing's time (`metadata_ttl`) is up; both used to stay hidden
/// from the open handle for as long as it was open.
#[test]
fn rewinddir_shows_new_entries() {
    let b = Bucket::new(server(), "rewind", false);
    b.put("r/old", b"o");
    let m = Mount::new(&b, "metadata_ttl=1");
    let dir = c_str(m.path("r").to_str().unwrap());
    let d = unsafe { libc::opendir(dir.as_ptr()) };
    assert!(!d.is_null());
    let list = || rewound_names(d);
    assert_eq!(list(), ["old"]);
    std::fs::write(m.path("r/mine"), b"m").unwrap();
    assert_eq!(list(), ["mine", "old"], "this mount's new file at once");
    b.put("r/theirs", b"t");
    let shown = poll(Duration::from_secs(20), || list().len() == 3);
    unsafe { libc::closedir(d) };
    let fresh = names_in(&m, "r");
    assert!(
        shown,
        "another client's object after the TTL (a new opendir: {fresh:?})"
    );
}

/// Names in directory `rel` of the mount, sorted, by a new opendir.
fn names_in(m: &Mount, rel: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(m.path(rel))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Directory reads the mount answered, from `bucketfs status`.
fn dir_reads(m: &Mount) -> u64 {
    let out = command().arg("status").arg(&m.dir).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("directory reads answered: "))
        .and_then(|l| l.split(' ').next()?.parse().ok())
        .expect("status reports directory reads")
}

/// Within `metadata_ttl` the kernel serves a listing again from what it
/// kept (`ls -l` again: no directory read reaches the mount, so no
/// readdirplus makes it drop every entry's cached ACL), and this mount's
/// own changes still show at once; another client's object does not
/// before the TTL has passed.
#[test]
fn the_kernel_serves_a_current_listing_again() {
    let b = Bucket::new(server(), "kdirkeep", false);
    for i in 0..40 {
        b.put(&format!("k/f{i:02}"), b"x");
    }
    let m = Mount::new(&b, "metadata_ttl=600");
    assert_eq!(names_in(&m, "k").len(), 40);
    let reads = dir_reads(&m);
    assert!(reads > 0);
    let listed = sh(&m.dir, "ls -l k");
    assert_eq!(listed.lines().count(), 41, "{listed}");
    assert_eq!(dir_reads(&m), reads, "ls -l again within the TTL");
    // This mount's own changes, at once.
    std::fs::write(m.path("k/mine"), b"m").unwrap();
    std::fs::remove_file(m.path("k/f00")).unwrap();
    std::fs::rename(m.path("k/f01"), m.path("k/g01")).unwrap();
    let now = names_in(&m, "k");
    assert!(now.contains(&"mine".to_string()) && now.contains(&"g01".to_string()));
    assert!(!now.contains(&"f00".to_string()) && !now.contains(&"f01".to_string()));
    assert_eq!(now.len(), 40);
    // Another client's object: not before the TTL (600 s) has passed.
    b.put("k/theirs", b"t");
    assert_eq!(names_in(&m, "k"), now);
}

/// Once the TTL has passed, another client's object shows to a new
/// opendir and to a handle kept open across it and rewound: the kernel is
/// told to drop the listing it kept (it would otherwise serve a rewind
/// from it, asking nothing).
#[test]
fn a_kept_listing_is_dropped_when_it_expires() {
    let b = Bucket::new(server(), "kdirexpire", false);
    b.put("k/old", b"o");
    let m = Mount::new(&b, "metadata_ttl=1");
    let dir = c_str(m.path("k").to_str().unwrap());
    let d = unsafe { libc::opendir(dir.as_ptr()) };
    assert!(!d.is_null());
    let rewound = || rewound_names(d);
    assert_eq!(rewound(), ["old"]);
    b.put("k/theirs", b"t");
    // Rewinds only: no opendir in between has the kernel drop the listing.
    let shown = poll(Duration::from_secs(20), || rewound().len() == 2);
    unsafe { libc::closedir(d) };
    assert!(shown, "a rewound handle: {:?}", names_in(&m, "k"));
    assert_eq!(names_in(&m, "k"), ["old", "theirs"]);
}

/// A pass over a directory goes on to its end after the name it stopped
/// at is renamed and another `ls` lists the directory, also when the
/// kernel's kept listing of it is exactly one page long (`.`, `..` and
/// 126 names of five bytes: 128 entries of 32 bytes). The kernel takes a
/// position missing from a complete, page-long listing it keeps for the
/// end of the directory: a second handle filling that listing while the
/// first was partway through ended the first's pass there.
#[test]
fn a_pass_goes_on_after_its_last_name_leaves_a_page_long_kept_listing() {
    let b = Bucket::new(server(), "kdirpage", false);
    let m = Mount::new(&b, "metadata_ttl=600");
    std::fs::create_dir(m.path("p")).unwrap();
    let names: Vec<String> = (0..126).map(|i| format!("f{i:04}")).collect();
    for n in &names {
        std::fs::write(m.path(&format!("p/{n}")), b"").unwrap();
    }
    assert_eq!(names_in(&m, "p").len(), 126, "the kernel keeps it");
    let dir = std::fs::File::open(m.path("p")).unwrap();
    // `.`, `..` and one name fill 80 bytes.
    let first = getdents(dir.as_raw_fd(), 80);
    let x = first.last().unwrap().clone();
    assert!(x.starts_with('f'), "{first:?}");
    std::fs::rename(
        m.path(&format!("p/{x}")),
        m.path(&format!("p/g{}", &x[1..])),
    )
    .unwrap();
    assert_eq!(names_in(&m, "p").len(), 126);
    let mut got = first;
    for _ in 0..200 {
        let more = getdents(dir.as_raw_fd(), 1024);
        if more.is_empty() {
            break;
        }
        got.extend(more);
    }
    let missed: Vec<&String> = names
        .iter()
        .filter(|n| **n != x && !got.contains(n))
        .collect();
    assert!(
        missed.is_empty(),
        "{} names never returned: {missed:?}",
        missed.len()
    );
}

/// Names of one getdents64 call on `fd` with a buffer of `size` bytes
/// (glibc's readdir asks for 32 KiB at once: this keeps a reader partway).
fn getdents(fd: i32, size: usize) -> Vec<String> {
    let mut buf = vec![0u8; size];
    let n = unsafe { libc::syscall(libc::SYS_getdents64, fd, buf.as_mut_ptr(), size) };
    assert!(n >= 0, "getdents64: {}", std::io::Error::last_os_error());
    let mut names = Vec::new();
    let mut at = 0;
    while at < n as usize {
        // struct linux_dirent64: d_ino u64, d_off i64, d_reclen u16, d_type u8, d_name
        let reclen = u16::from_ne_bytes([buf[at + 16], buf[at + 17]]) as usize;
        let name = std::ffi::CStr::from_bytes_until_nul(&buf[at + 19..at + reclen]).unwrap();
        names.push(name.to_string_lossy().into_owned());
        at += reclen;
    }
    names
}

/// A directory handle opened before this mount creates a file and read
/// only after it must not make a new `opendir` miss the file: whatever
/// that handle was given (its snapshot) is no listing of the directory now.
#[test]
fn a_handle_read_after_a_create_leaves_new_listings_whole() {
    let b = Bucket::new(server(), "oldhandle", false);
    let m = Mount::new(&b, "metadata_ttl=600");
    std::fs::create_dir(m.path("d")).unwrap();
    std::fs::write(m.path("d/a"), b"a").unwrap();
    assert_eq!(names_in(&m, "d"), ["a"]);
    let dir = std::fs::File::open(m.path("d")).unwrap();
    std::fs::write(m.path("d/new"), b"n").unwrap();
    // Read as `os.listdir(fd)` reads it: a stream over a copy of the
    // descriptor, rewound, read to its end, closed.
    let copy = unsafe { libc::dup(dir.as_raw_fd()) };
    let d = unsafe { libc::fdopendir(copy) };
    assert!(!d.is_null());
    unsafe { libc::rewinddir(d) };
    let read = read_names(d);
    unsafe { libc::closedir(d) };
    assert!(read.contains(&"a".to_string()));
    assert_eq!(names_in(&m, "d"), ["a", "new"]);
    drop(dir);
    assert_eq!(names_in(&m, "d"), ["a", "new"]);
}

/// A loop that removes each entry as it reads it (as `rm -r` does), while
/// another process lists the directory between its reads, sees every
/// name once, never one it removed already, and leaves the directory empty.
#[test]
fn removing_entries_while_reading_beside_other_listings_misses_none() {
    let b = Bucket::new(server(), "rmwhile", false);
    let m = Mount::new(&b, "metadata_ttl=600");
    std::fs::create_dir(m.path("d")).unwrap();
    let n = 120;
    for i in 0..n {
        std::fs::write(m.path(&format!("d/f{i:04}")), b"").unwrap();
    }
    assert_eq!(names_in(&m, "d").len(), n);
    let dir = std::fs::File::open(m.path("d")).unwrap();
    let mut seen = std::collections::BTreeMap::<String, u32>::new();
    let mut gone = Vec::new();
    for _ in 0..10 * n {
        let names = getdents(dir.as_raw_fd(), 1024);
        if names.is_empty() {
            break;
        }
        for name in names.into_iter().filter(|n| n != "." && n != "..") {
            if let Err(e) = std::fs::remove_file(m.path(&format!("d/{name}"))) {
                gone.push(format!("{name}: {e}"));
            }
            *seen.entry(name).or_default() += 1;
        }
        names_in(&m, "d"); // someone else's ls
    }
    assert!(gone.is_empty(), "removed already: {gone:?}");
    assert_eq!(seen.len(), n, "names seen");
    assert!(seen.values().all(|&k| k == 1), "twice: {seen:?}");
    assert_eq!(names_in(&m, "d"), Vec::<String>::new());
}

/// One pass over a directory, read a little at a time, while another
/// client removes an entry it has passed and, once the listing's time is
/// up, another process lists the directory again: every entry that was
/// there all along comes exactly once.
#[test]
fn a_pass_over_a_directory_listed_again_meanwhile_skips_and_repeats_nothing() {
    let b = Bucket::new(server(), "passrelist", false);
    let all: Vec<String> = (0..120).map(|i| format!("f{i:04}")).collect();
    for n in &all {
        b.put(&format!("p/{n}"), b"");
    }
    let m = Mount::new(&b, "metadata_ttl=1");
    assert_eq!(names_in(&m, "p"), all);
    let dir = std::fs::File::open(m.path("p")).unwrap();
    let mut read = getdents(dir.as_raw_fd(), 1024);
    assert!(read.len() > 10 && read.len() < 60, "{}", read.len());
    b.delete("p/f0005");
    // Another process's listing, once it shows the removal (a new LIST).
    assert!(
        poll(Duration::from_secs(20), || !names_in(&m, "p")
            .contains(&"f0005".to_string())),
        "the removal never showed"
    );
    for _ in 0..100 {
        let names = getdents(dir.as_raw_fd(), 1024);
        if names.is_empty() {
            break;
        }
        read.extend(names);
    }
    read.retain(|n| n != "." && n != ".." && n != "f0005");
    let mut sorted = read.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), read.len(), "a name came twice");
    let mut want = all.clone();
    want.retain(|n| n != "f0005");
    assert_eq!(sorted, want, "names there all along");
}

/// What is below a renamed directory keeps its times to the nanosecond:
/// they are stored with their nanoseconds, as s3fs-fuse stores them, so
/// reading them back after the move (the keys were copied) changes nothing.
#[test]
fn times_below_a_renamed_directory_keep_their_nanoseconds() {
    let b = Bucket::new(server(), "renamensec", false);
    let m = Mount::new(&b, PINNED);
    sh(&m.dir, "mkdir -p d/sub; echo x > d/f");
    let (sub, f) = (times(&stat(&m, "d/sub")), times(&stat(&m, "d/f")));
    std::fs::rename(m.path("d"), m.path("d2")).unwrap();
    assert_eq!(times(&stat(&m, "d2/sub")), sub);
    assert_eq!(times(&stat(&m, "d2/f")), f);
    assert_eq!(b.metadata("d2/f")["mtime"], stored(f.0));
}

// ---------------------------------------------------------------- nlink

/// A directory's nlink is 2 plus its subdirectories once its listing is
/// known (2 before); a file unlinked while open has none.
#[tokio::test]
async fn core_nlink_counts_subdirectories_and_an_unlinked_file_has_none() {
    let s = Arc::new(MemStore::unversioned());
    s.insert("p/x/f", b"f", Metadata::new());
    s.insert("p/y/", b"", Metadata::new());
    s.insert("p/z", b"file", Metadata::new());
    let (fs, _d) = core_fs(s.clone(), LONG_TTL);
    let p = fs.lookup(ROOT_INO, name("p")).await.unwrap();
    assert_eq!(p.nlink, 2, "not listed: not counted");
    fs.list(p.ino).await.unwrap();
    assert_eq!(fs.getattr(p.ino).await.unwrap().nlink, 4, "x and y");
    let made = fs.mkdir(p.ino, name("w"), USER).await.unwrap();
    assert_eq!(made.nlink, 2);
    assert_eq!(fs.getattr(p.ino).await.unwrap().nlink, 5);
    fs.rmdir(p.ino, name("y")).await.unwrap();
    assert_eq!(fs.getattr(p.ino).await.unwrap().nlink, 4);
    let w = fs.lookup(p.ino, name("w")).await.unwrap();
    fs.rename(p.ino, name("w"), ROOT_INO, name("w2"), false)
        .await
        .unwrap();
    assert_eq!(fs.getattr(p.ino).await.unwrap().nlink, 3, "moved out");
    assert_eq!(fs.getattr(w.ino).await.unwrap().nlink, 2);
    let z = fs.lookup(p.ino, name("z")).await.unwrap();
    assert_eq!(z.nlink, 1);
    let fh = fs.open(z.ino, libc::O_RDONLY).await.unwrap();
    fs.unlink(p.ino, name("z")).await.unwrap();
    assert_eq!(fs.getattr(z.ino).await.unwrap().nlink, 0);
    assert_eq!(&fs.read(fh, 0, 4).await.unwrap()[..], b"file");
    fs.release(fh).await.unwrap();
    let (c, wfh) = fs.create(p.ino, name("new"), USER, 0).await.unwrap();
    fs.write(wfh, 0, b"w").await.unwrap();
    fs.unlink(p.ino, name("new")).await.unwrap();
    assert_eq!(
        fs.getattr(c.ino).await.unwrap().nlink,
        0,
        "open for writing"
    );
    fs.release(wfh).await.unwrap();
}

#[test]
fn nlink_through_the_mount() {
    let b = Bucket::new(server(), "nlink", false);
    let m = Mount::new(&b, PINNED);
    sh(&m.dir, "mkdir -p top/a top/b top/c/deep; touch top/file");
    assert_eq!(stat(&m, "top").nlink(), 5);
    assert_eq!(stat(&m, "top/c").nlink(), 3);
    assert_eq!(stat(&m, "top/file").nlink(), 1);
    std::fs::remove_dir(m.path("top/a")).unwrap();
    assert_eq!(stat(&m, "top").nlink(), 4);
    let f = std::fs::File::open(m.path("top/file")).unwrap();
    let mut w = std::fs::OpenOptions::new()
        .write(true)
        .open(m.path("top/file"))
        .unwrap();
    std::fs::remove_file(m.path("top/file")).unwrap();
    assert_eq!(f.metadata().unwrap().nlink(), 0);
    std::io::Write::write_all(&mut w, b"still writable").unwrap();
    assert_eq!(w.metadata().unwrap().nlink(), 0);
    drop(w);
    drop(f);
    assert!(m.unmount().is_some());
    assert_eq!(b.get("top/file"), None, "unlinked stays unlinked");
}

/// A file unlinked while open, and one replaced by a rename while open,
/// still take every change through their descriptors: the temporary-file
/// pattern (open, unlink, then `ftruncate`, `fchmod`, `futimens`,
/// `fsetxattr`) works as on a local disk. Nothing of it reaches S3: no
/// key for the unlinked file, and the file now at the replaced name keeps
/// its own bytes and mode.
#[test]
fn an_unlinked_or_replaced_open_file_takes_truncate_chmod_times_and_xattrs() {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let b = Bucket::new(server(), "nameless", false);
    let m = shared_mount(&b, "");
    let open_rw = |rel: &str| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(m.path(rel))
            .unwrap()
    };
    let data = pattern(8192, 7);
    let when = UNIX_EPOCH + Duration::from_secs(OLD_SECS);
    let work = |f: &std::fs::File, what: &str| {
        f.write_all_at(&data, 0).unwrap();
        f.set_len(100)
            .unwrap_or_else(|e| panic!("{what}: ftruncate: {e}"));
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .unwrap_or_else(|e| panic!("{what}: fchmod: {e}"));
        f.set_times(std::fs::FileTimes::new().set_modified(when))
            .unwrap_or_else(|e| panic!("{what}: futimens: {e}"));
        let (n, v) = (c_str("user.k"), b"v1");
        let r = unsafe { libc::fsetxattr(f.as_raw_fd(), n.as_ptr(), v.as_ptr().cast(), 2, 0) };
        assert_eq!(
            r,
            0,
            "{what}: fsetxattr: {}",
            std::io::Error::last_os_error()
        );
        let mut got = [0u8; 8];
        let len = unsafe { libc::fgetxattr(f.as_raw_fd(), n.as_ptr(), got.as_mut_ptr().cast(), 8) };
        assert_eq!(&got[..len.max(0) as usize], b"v1", "{what}: fgetxattr");
        let md = f.metadata().unwrap();
        assert_eq!(
            (
                md.len(),
                md.mode() & 0o7777,
                md.nlink(),
                md.modified().unwrap()
            ),
            (100, 0o600, 0, when),
            "{what}: fstat"
        );
        f.set_len(200).unwrap();
        let mut back = vec![1u8; 200];
        f.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(&back[..100], &data[..100], "{what}: kept bytes");
        assert!(
            back[100..].iter().all(|&c| c == 0),
            "{what}: extended with zeros"
        );
    };
    // Unlinked.
    let t = open_rw("tmp");
    std::fs::remove_file(m.path("tmp")).unwrap();
    work(&t, "unlinked");
    // Replaced by a rename, after its bytes went up.
    std::fs::write(m.path("r"), b"old").unwrap();
    std::fs::write(m.path("n"), b"new").unwrap();
    let r = open_rw("r");
    std::fs::rename(m.path("n"), m.path("r")).unwrap();
    work(&r, "replaced");
    assert_eq!(std::fs::read(m.path("r")).unwrap(), b"new");
    drop((t, r));
    assert_eq!(m.unmount(), Some(0));
    assert_eq!(b.get("tmp"), None, "the unlinked file stays unlinked");
    assert_eq!(
        b.get("r").as_deref(),
        Some(&b"new"[..]),
        "the name keeps the new file"
    );
    assert_ne!(b.metadata("r").get("mode"), Some(&0o100600.to_string()));
    assert_eq!(
        b.keys(""),
        vec!["r".to_string()],
        "nothing else in the bucket"
    );
}

// ------------------------------------------------- extended attributes

fn xattr_meta(json: &str) -> Metadata {
    let enc = json
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'.' | b'-' | b'_' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect::<String>();
    [("xattr".to_string(), enc)].into_iter().collect()
}

/// A `user.` attribute set on a closed file is one self-copy; the value
/// reads back, lists, and is stored as s3fs-fuse stores it; flags, the
/// read-only `user.s3.` names, other namespaces and S3's 2 KiB limit say
/// what setxattr(2) says.
#[tokio::test]
async fn core_user_xattrs_are_stored_on_the_object_as_s3fs_fuse_does() {
    let s = Arc::new(MemStore::unversioned());
    s.insert("f", b"data", xattr_meta(r#"{"user.old":"b2xk"}"#));
    let (fs, _d) = core_fs(s.clone(), LONG_TTL);
    let f = fs.lookup(ROOT_INO, name("f")).await.unwrap();
    assert_eq!(fs.get_xattr(f.ino, "user.old").await.unwrap(), b"old");
    let copies = s.counters().get(Op::Copy);
    fs.set_xattr(f.ino, "user.color", b"red", 0).await.unwrap();
    assert_eq!(s.counters().get(Op::Copy) - copies, 1);
    assert_eq!(
        s.metadata("f").unwrap()["xattr"],
        "%7B%22user.color%22%3A%22cmVk%22%2C%22user.old%22%3A%22b2xk%22%7D"
    );
    assert_eq!(&s.object("f").unwrap()[..], b"data");
    assert_eq!(fs.get_xattr(f.ino, "user.color").await.unwrap(), b"red");
    let names = fs.list_xattr(f.ino).await.unwrap();
    assert_eq!(&names[..2], ["user.color", "user.old"]);
    assert!(names.iter().any(|n| n == "user.s3.etag"));
    assert_eq!(
        fs.set_xattr(f.ino, "user.color", b"x", libc::XATTR_CREATE)
            .await,
        Err(FsError::Exists)
    );
    assert_eq!(
        fs.set_xattr(f.ino, "user.none", b"x", libc::XATTR_REPLACE)
            .await,
        Err(FsError::NoAttr)
    );
    assert_eq!(
        fs.set_xattr(f.ino, "user.s3.etag", b"x", 0).await,
        Err(FsError::NotPermitted)
    );
    assert_eq!(
        fs.set_xattr(f.ino, "security.selinux", b"x", 0).await,
        Err(FsError::NotSupported)
    );
    // A name in no namespace, as s3fs-fuse keeps it.
    fs.set_xattr(f.ino, "bare", b"1", 0).await.unwrap();
    assert_eq!(fs.get_xattr(f.ino, "bare").await.unwrap(), b"1");
    fs.remove_xattr(f.ino, "bare").await.unwrap();
    assert_eq!(
        fs.set_xattr(f.ino, "user.big", &[7u8; 2048], 0).await,
        Err(FsError::TooBig)
    );
    assert_eq!(
        s.counters().get(Op::Copy) - copies,
        3,
        "refused: no request"
    );
    // A chmod keeps them.
    fs.setattr(
        f.ino,
        SetAttr {
            mode: Some(0o600),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    fs.remove_xattr(f.ino, "user.old").await.unwrap();
    assert_eq!(
        fs.remove_xattr(f.ino, "user.old").await,
        Err(FsError::NoAttr)
    );
    let m = s.metadata("f").unwrap();
    assert_eq!(m["xattr"], "%7B%22user.color%22%3A%22cmVk%22%7D");
    assert_eq!(m["mode"], "33152");
    fs.remove_xattr(f.ino, "user.color").await.unwrap();
    assert!(!s.metadata("f").unwrap().contains_key("xattr"));
    assert_eq!(
        fs.get_xattr(f.ino, "user.color").await,
        Err(FsError::NoAttr)
    );
}

/// On a file open with dirty data, an attribute rides on the upload at
/// close: no copy, and both the data written before and after it land.
#[tokio::test]
async fn core_a_user_xattr_set_while_writing_rides_on_the_upload() {
    let s = Arc::new(MemStore::unversioned());
    let (fs, _d) = core_fs(s.clone(), LONG_TTL);
    let (f, fh) = fs.create(ROOT_INO, name("new"), USER, 0).await.unwrap();
    fs.write(fh, 0, b"first ").await.unwrap();
    fs.set_xattr(f.ino, "user.tag", b"v", 0).await.unwrap();
    assert_eq!(fs.get_xattr(f.ino, "user.tag").await.unwrap(), b"v");
    fs.write(fh, 6, b"second").await.unwrap();
    fs.release(fh).await.unwrap();
    assert_eq!(s.counters().get(Op::Copy), 0);
    assert_eq!(&s.object("new").unwrap()[..], b"first second");
    assert_eq!(
        s.metadata("new").unwrap()["xattr"],
        "%7B%22user.tag%22%3A%22dg%3D%3D%22%7D"
    );
}

/// A file this mount just wrote stores a change of its attributes by a
/// deferred self-copy; removing an attribute that way removes it from the
/// object (the copy does not keep the old `x-amz-meta-xattr`).
#[tokio::test]
async fn core_a_user_xattr_removed_from_a_file_just_written_is_gone_from_s3() {
    let s = Arc::new(MemStore::unversioned());
    let (fs, _d) = core_fs(s.clone(), LONG_TTL);
    let (f, fh) = fs.create(ROOT_INO, name("f"), USER, 0).await.unwrap();
    fs.write(fh, 0, b"data").await.unwrap();
    fs.set_xattr(f.ino, "user.tag", b"v", 0).await.unwrap();
    fs.release(fh).await.unwrap();
    assert!(s.metadata("f").unwrap().contains_key("xattr"));
    let fh = fs.open(f.ino, libc::O_WRONLY).await.unwrap();
    fs.write(fh, 4, b"!").await.unwrap();
    fs.release(fh).await.unwrap();
    let copies = s.counters().get(Op::Copy);
    fs.remove_xattr(f.ino, "user.tag").await.unwrap();
    assert_eq!(s.counters().get(Op::Copy), copies, "deferred");
    assert!(fs.sync_all(Duration::from_secs(30)).await.is_empty());
    assert_eq!(s.counters().get(Op::Copy), copies + 1);
    let m = s.metadata("f").unwrap();
    assert!(!m.contains_key("xattr"), "{m:?}");
    assert_eq!(&s.object("f").unwrap()[..], b"data!");
}

fn list_xattr(path: &std::path::Path) -> Vec<String> {
    let p = c_str(path.to_str().unwrap());
    let mut buf = vec![0u8; 4096];
    let r = unsafe { libc::listxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(r >= 0, "{}", std::io::Error::last_os_error());
    buf.truncate(r as usize);
    buf.split(|b| *b == 0)
        .filter(|n| !n.is_empty())
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .collect()
}

#[test]
fn user_xattrs_through_the_mount_land_as_s3fs_fuse_stores_them() {
    let b = Bucket::new(server(), "xattrw", false);
    let enc = xattr_meta(r#"{"user.from_s3fs":"aGk="}"#)["xattr"].clone();
    b.put_meta("f", b"data", &[("xattr", &enc)]);
    put_dir_marker(&b, "d/");
    let m = Mount::new(&b, PINNED);
    let f = m.path("f");
    assert_eq!(get_xattr(&f, "user.from_s3fs").unwrap(), b"hi");
    let copies = requests(&m, "COPY");
    set_xattr(&f, "user.color", b"red").unwrap();
    assert_eq!(requests(&m, "COPY") - copies, 1, "one self-copy");
    assert_eq!(
        b.metadata("f")["xattr"],
        "%7B%22user.color%22%3A%22cmVk%22%2C%22user.from_s3fs%22%3A%22aGk%3D%22%7D"
    );
    let names = list_xattr(&f);
    assert!(names.contains(&"user.color".to_string()), "{names:?}");
    assert!(names.contains(&"user.from_s3fs".to_string()), "{names:?}");
    remove_xattr(&f, "user.from_s3fs").unwrap();
    assert_eq!(remove_xattr(&f, "user.from_s3fs"), Err(libc::ENODATA));
    assert_eq!(get_xattr(&f, "user.from_s3fs"), Err(libc::ENODATA));
    assert_eq!(
        b.metadata("f")["xattr"],
        "%7B%22user.color%22%3A%22cmVk%22%7D"
    );
    assert_eq!(set_xattr(&f, "user.s3.etag", b"x"), Err(libc::EPERM));
    assert_eq!(set_xattr(&f, "trusted.x", b"x"), Err(libc::ENOTSUP));
    assert_eq!(set_xattr(&f, "user.big", &[1u8; 3000]), Err(libc::E2BIG));
    // A directory with a marker keeps them on it.
    set_xattr(&m.path("d"), "user.dir", b"yes").unwrap();
    assert_eq!(get_xattr(&m.path("d"), "user.dir").unwrap(), b"yes");
    assert_eq!(
        b.metadata("d/")["xattr"],
        "%7B%22user.dir%22%3A%22eWVz%22%7D"
    );
    assert_eq!(b.get("f").unwrap(), b"data");
}

/// setxattr between two writes of a file open for writing, with a second
/// handle open for reading: the attribute rides on the close's upload
/// (no copy), and the data written before and after it both land.
#[test]
fn a_user_xattr_set_on_a_file_open_for_writing_lands_with_its_data() {
    let b = Bucket::new(server(), "xattropen", false);
    let m = Mount::new(&b, PINNED);
    let mut w = std::fs::File::create(m.path("w")).unwrap();
    std::io::Write::write_all(&mut w, b"before ").unwrap();
    let r = std::fs::File::open(m.path("w")).unwrap();
    let copies = requests(&m, "COPY");
    set_xattr(&m.path("w"), "user.k", b"v").unwrap();
    assert_eq!(get_xattr(&m.path("w"), "user.k").unwrap(), b"v");
    std::io::Write::write_all(&mut w, b"after").unwrap();
    close(w).unwrap();
    drop(r);
    assert_eq!(requests(&m, "COPY") - copies, 0, "rode on the upload");
    assert_eq!(b.get("w").unwrap(), b"before after");
    assert_eq!(
        b.metadata("w")["xattr"],
        "%7B%22user.k%22%3A%22dg%3D%3D%22%7D"
    );
    assert!(m.unmount().is_some());
}

/// The deferred copy of a directory's times and a chmod of it never land
/// out of order: the chmod waits for the copy in flight, so the marker
/// ends with the new mode, not the one the copy read before it.
#[tokio::test(flavor = "current_thread")]
async fn core_a_chmod_of_a_directory_waits_for_the_copy_of_its_times() {
    use bucketfs::store::faulty::Faulty;
    let m = Arc::new(MemStore::unversioned());
    m.insert("d/", b"", dir_meta(OLD_SECS));
    let f = Arc::new(Faulty::new(m.clone()));
    let dir = tempfile::tempdir().unwrap();
    let cfg = FsConfig {
        staging_dir: dir.path().to_path_buf(),
        metadata_ttl: LONG_TTL,
        ..FsConfig::default()
    };
    let fs = Arc::new(Fs::new(f.clone(), cfg));
    let d = fs.lookup(ROOT_INO, name("d")).await.unwrap();
    fs.mkdir(d.ino, name("sub"), USER).await.unwrap();
    f.hold(Op::Copy, 1);
    let times = tokio::spawn({
        let fs = fs.clone();
        async move { fs.fsyncdir(d.ino).await }
    });
    f.wait_held(Op::Copy)
        .await
        .expect("the times' copy is held");
    let chmod = fs.setattr(
        d.ino,
        SetAttr {
            mode: Some(0o700),
            ..Default::default()
        },
    );
    tokio::pin!(chmod);
    for _ in 0..100 {
        assert!(
            futures::poll!(chmod.as_mut()).is_pending(),
            "the chmod went ahead of the copy in flight"
        );
        tokio::task::yield_now().await;
    }
    f.release(Op::Copy);
    times.await.unwrap().unwrap();
    chmod.await.unwrap();
    assert_eq!(m.metadata("d/").unwrap()["mode"], "16832", "0o40700");
    assert_eq!(fs.getattr(d.ino).await.unwrap().perm, 0o700);
}
