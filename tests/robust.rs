//! (moto cannot store a key with a newline; tests/core.rs covers that one
//! over the in-memory store.)
//!
//! Bad input and hostile conditions: keys the POSIX view cannot show, a
//! full cache disk, other users on an allow_other mount, secrets in logs,
//! many processes at once, real repositories and trees.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use common::*;

fn names(dir: &std::path::Path) -> BTreeSet<Vec<u8>> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().as_bytes().to_vec())
        .collect()
}

#[test]
fn keys_the_posix_view_cannot_show_are_skipped_and_nothing_escapes() {
    let b = Bucket::new(server(), "odd", false);
    let long_name = "n".repeat(256);
    let long_key = format!("deep/{}", "k".repeat(1019));
    assert_eq!(long_key.len(), 1024);
    for key in [
        "a//b",
        "/leading",
        "./x",
        "../x",
        "a/./b",
        "a/../b",
        "tab\tname",
        "ctrl\u{1}char",
        &long_name,
        &long_key,
        "dup",
        "dup/child",
        ".versions",
        "normal.txt",
    ] {
        b.put(key, key.as_bytes());
    }
    let m = Mount::new(&b, "");
    let want: BTreeSet<Vec<u8>> = [
        "a",
        "ctrl\u{1}char",
        "deep",
        "dup",
        "normal.txt",
        "tab\tname",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    assert_eq!(names(&m.dir), want);
    assert!(
        names(&m.path("a")).is_empty(),
        "a//b, a/./b, a/../b are skipped"
    );
    assert!(
        names(&m.path("deep")).is_empty(),
        "a 1019-byte name is over 255"
    );
    assert!(
        fs::metadata(m.path("dup")).unwrap().is_dir(),
        "the directory wins"
    );
    assert_eq!(fs::read(m.path("dup/child")).unwrap(), b"dup/child");
    assert_eq!(fs::read(m.path("tab\tname")).unwrap(), b"tab\tname");
    assert_eq!(fs::read(m.path("normal.txt")).unwrap(), b"normal.txt");
    // find walks it all and stays inside.
    let found = sh(&m.dir, "find . | wc -l");
    assert_eq!(found.trim(), "8", "., 6 entries, dup/child");
    // Each odd key is logged once, however often it is listed.
    let _ = names(&m.dir);
    let log = m.log_text();
    for shown_once in ["a//b", "\"../x\""] {
        let n = log
            .lines()
            .filter(|l| l.contains("key not shown") && l.contains(shown_once))
            .count();
        assert!(n <= 1, "{shown_once} logged {n} times");
    }
    // Creating the unshowable is refused, and a long key is ENAMETOOLONG.
    assert_eq!(
        errno(fs::write(m.path(&long_name), b"x").unwrap_err()),
        libc::ENAMETOOLONG
    );
}

#[test]
fn a_full_cache_disk_fails_writes_at_write_time_and_loses_nothing_written() {
    let tmp = tempfile::tempdir().unwrap();
    let small = SmallDisk::new(&tmp.path().join("small-disk"), "4m");
    let b = Bucket::new(server(), "full", false);
    let m = Mount::new(&b, &format!("cache_dir={},cache_size=0", small.0.display()));
    let first = pattern(1024 * 1024, 1);
    fs::write(m.path("first"), &first).unwrap();
    let mut f = fs::File::create(m.path("too-big")).unwrap();
    let chunk = pattern(1024 * 1024, 2);
    let mut failed = None;
    for i in 0..16 {
        if let Err(e) = f.write_all(&chunk) {
            failed = Some((i, errno(e)));
            break;
        }
    }
    let (at, code) = failed.expect("a write must fail on a 4 MiB cache disk");
    assert_eq!(code, libc::ENOSPC, "at write {at}");
    drop(f);
    // What was written before is safe, in S3 and through the mount.
    assert_eq!(sha256(&b.get("first").unwrap()), sha256(&first));
    assert_eq!(sha256_file(&m.path("first")), sha256(&first));
}

/// A small tmpfs for a test's cache dir, unmounted when dropped.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn new(dir: &std::path::Path, size: &str) -> SmallDisk {
        fs::create_dir(dir).unwrap();
        assert!(
            Command::new("mount")
                .args([
                    "-t",
                    "tmpfs",
                    "-o",
                    &format!("size={size},mode=0700"),
                    "tmpfs"
                ])
                .arg(dir)
                .status()
                .unwrap()
                .success()
        );
        SmallDisk(dir.to_path_buf())
    }

    /// Fills it up with a file of its own; returns that file's path.
    fn fill(&self) -> std::path::PathBuf {
        let p = self.0.join("filler");
        let mut f = fs::File::create(&p).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        let mut small = false;
        // Bounded: the disk is a few MiB.
        for _ in 0..100_000 {
            match f.write(if small { &chunk[..512] } else { &chunk }) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && !small => small = true,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => return p,
                Err(e) => panic!("filling the small disk: {e}"),
            }
        }
        panic!("the small disk did not fill up");
    }
}

/// An object `f` of `len` bytes in a new bucket, mounted with its cache
/// on a 4 MiB tmpfs, opened for writing without O_TRUNC (so the journal
/// records each write).
struct FullDiskRig {
    _tmp: tempfile::TempDir,
    disk: SmallDisk,
    b: Bucket,
    m: Mount,
    f: fs::File,
    base: Vec<u8>,
}

impl FullDiskRig {
    fn new(tag: &str, len: usize) -> FullDiskRig {
        let tmp = tempfile::tempdir().unwrap();
        let disk = SmallDisk::new(&tmp.path().join("small-disk"), "4m");
        let b = Bucket::new(server(), tag, false);
        let base = pattern(len, 1);
        b.put("f", &base);
        let m = Mount::new(&b, &format!("cache_dir={},cache_size=0", disk.0.display()));
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(m.path("f"))
            .unwrap();
        FullDiskRig {
            _tmp: tmp,
            disk,
            b,
            m,
            f,
            base,
        }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// The journal of an overwritten file records each write; a write whose
/// journal line finds no room fails before it changes a byte (its data
/// is not in S3 later), and the writes and chmod
/// acknowledged once there is room again are recovered after kill -9
/// (once glued to the fragment, a recovering mount read none of them).
#[test]
fn a_journal_line_cut_short_by_a_full_disk_loses_no_later_write() {
    use std::os::unix::fs::FileExt;
    // `_tmp` kept to the end: it holds the tmpfs's mountpoint.
    let FullDiskRig {
        _tmp,
        disk,
        b,
        m,
        f,
        base,
    } = FullDiskRig::new("torn", 1024 * 1024);
    let (x, c, d) = (pattern(4096, 2), pattern(4096, 3), pattern(4096, 4));
    f.write_at(&x, 0).unwrap();
    let filler = disk.fill();
    // Each overwrite of the same page needs no room for data, only for
    // its journal line: one fails once the journal needs a new page.
    let failed = (0..5000).find_map(|_| f.write_at(&x, 0).err());
    let e = failed.expect("a journal line must run out of room on a full disk");
    assert_eq!(errno(e), libc::ENOSPC);
    // A write that fails changes nothing: not the bytes it would replace.
    let z = pattern(4096, 9);
    assert_eq!(f.write_at(&z, 0).map_err(errno).err(), Some(libc::ENOSPC));
    fs::remove_file(&filler).unwrap();
    f.write_at(&c, 512 * 1024).unwrap();
    f.write_at(&d, 768 * 1024).unwrap();
    f.set_permissions(fs::Permissions::from_mode(0o600))
        .unwrap();
    kill9(&m);
    drop(f);
    m.restart();
    let mut want = base.clone();
    want[..4096].copy_from_slice(&x);
    want[512 * 1024..512 * 1024 + 4096].copy_from_slice(&c);
    want[768 * 1024..768 * 1024 + 4096].copy_from_slice(&d);
    assert_lands(&b, "f", &want, Duration::from_secs(60), "after the remount");
    let mode = b.metadata("f").get("mode").cloned().unwrap_or_default();
    assert_eq!(
        mode.parse::<u32>().ok().map(|m| m & 0o7777),
        Some(0o600),
        "mode {mode}"
    );
}

#[test]
fn the_kernel_enforces_modes_for_other_users() {
    let b = Bucket::new(server(), "perm", false);
    let m = Mount::new(&b, "allow_other");
    let mut perms = fs::metadata(m.path("")).unwrap().permissions();
    perms.set_mode(0o755);
    fs::write(m.path("secret"), b"root only").unwrap();
    fs::set_permissions(m.path("secret"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::create_dir(m.path("rootdir")).unwrap();
    fs::create_dir(m.path("shared")).unwrap();
    fs::set_permissions(m.path("shared"), fs::Permissions::from_mode(0o777)).unwrap();
    let d = m.dir.display();
    let (ok, err) = as_user(1000, &format!("cat {d}/secret"));
    assert!(!ok && err.contains("Permission denied"), "{err}");
    let (ok, err) = as_user(1000, &format!("touch {d}/rootdir/x"));
    assert!(!ok && err.contains("Permission denied"), "{err}");
    let (ok, err) = as_user(
        1000,
        &format!("echo mine > {d}/shared/x && cat {d}/shared/x"),
    );
    assert!(ok, "a 0777 directory is writable by others: {err}");
    assert_eq!(
        b.metadata("shared/x").get("uid").map(String::as_str),
        Some("1000")
    );

    let ro = Mount::new(&b, "allow_other,ro");
    let (ok, err) = as_user(1000, &format!("echo x > {}/shared/y", ro.dir.display()));
    assert!(!ok && err.contains("Read-only"), "{err}");
    let (ok, _) = as_user(1000, &format!("cat {}/shared/x", ro.dir.display()));
    assert!(ok);
}

#[test]
fn secrets_never_reach_the_log_even_at_trace_level() {
    let b = Bucket::new(server(), "trace", false);
    let (tmp, mp) = scratch_mountpoint();
    let log = tmp.path().join("log");
    let opts = base_options(&b.endpoint, &tmp.path().join("c"), &log);
    let st = command()
        .env("RUST_LOG", "trace")
        .args(["-o", &opts, &b.name])
        .arg(&mp)
        .status()
        .unwrap();
    assert!(st.success());
    fs::write(mp.join("f"), pattern(6 * 1024 * 1024, 3)).unwrap();
    let _ = fs::read(mp.join("f")).unwrap();
    let _ = fs::read_dir(&mp).unwrap().count();
    assert!(Command::new("umount").arg(&mp).status().unwrap().success());
    let text = fs::read_to_string(&log).unwrap();
    assert!(text.len() > 10_000, "trace logging was on");
    assert!(!text.contains(SECRET_KEY), "the secret key is in the log");
}

#[test]
fn thirty_two_processes_write_and_read_at_once() {
    let b = Bucket::new(server(), "load", false);
    let m = Mount::new(&b, "");
    let script = r#"
        set -e
        for i in $(seq 0 31); do
          ( head -c $((100000 + i * 4099)) /dev/urandom > "src$i" &&
            cp "src$i" "p$i" && cmp "src$i" "p$i" && cat "p$i" > /dev/null ) &
        done
        wait
    "#;
    let work = tempfile::tempdir().unwrap();
    let out = Command::new("bash")
        .arg("-c")
        .arg(script.replace("\"src$i\"", &format!("\"{}/src$i\"", work.path().display())))
        .current_dir(&m.dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for i in 0..32 {
        let want = fs::read(work.path().join(format!("src{i}"))).unwrap();
        assert_eq!(
            sha256(&b.get(&format!("p{i}")).unwrap()),
            sha256(&want),
            "p{i}"
        );
    }
}

#[test]
fn git_clone_status_and_log_work_in_the_mount() {
    let m = mount_plain("git");
    let repo = env!("CARGO_MANIFEST_DIR");
    sh(&m.dir, &format!("git clone -q --no-hardlinks {repo} clone"));
    let status = sh(&m.path("clone"), "git status --porcelain");
    assert_eq!(status, "", "a fresh clone is clean");
    let log = sh(&m.path("clone"), "git log --oneline | wc -l");
    let want = sh(std::path::Path::new(repo), "git log --oneline | wc -l");
    assert_eq!(log, want);
    sh(
        &m.path("clone"),
        "git fsck --no-progress 2>&1 | grep -v '^dangling' || true",
    );
}

fn mount_plain(tag: &str) -> Mount {
    Mount::new(&Bucket::new(server(), tag, false), "")
}

#[test]
fn tar_of_many_small_files_and_rsync_checksum_round_trip() {
    let m = mount_plain("tree");
    let src = tempfile::tempdir().unwrap();
    sh(
        src.path(),
        "mkdir -p t && for d in $(seq 0 19); do mkdir -p t/d$d; for f in $(seq 0 49); do echo \"$d-$f\" > t/d$d/f$f; done; done",
    );
    let sum =
        |dir: &std::path::Path| sh(dir, "find . -type f -print0 | sort -z | xargs -0 sha256sum");
    let want = sum(&src.path().join("t"));
    sh(
        &m.dir,
        &format!(
            "mkdir x && tar -C {}/t -cf - . | tar -C x -xf -",
            src.path().display()
        ),
    );
    assert_eq!(sum(&m.path("x")), want, "1,000 small files through tar");
    sh(
        &m.dir,
        &format!("rsync -a --checksum {}/t/ r/", src.path().display()),
    );
    let back = src.path().join("back");
    sh(
        &m.dir,
        &format!("rsync -a --checksum r/ {}/", back.display()),
    );
    assert_eq!(sum(&back), want);
    // A second rsync --checksum finds nothing to send.
    let again = sh(
        &m.dir,
        &format!(
            "rsync -a --checksum --itemize-changes {}/t/ r/",
            src.path().display()
        ),
    );
    assert_eq!(again.trim(), "", "{again}");
}

/// A reader keeps reading the object it opened while another client
/// replaces it: the old bytes whole (versioned bucket), or an error, never
/// a mix of old and new.
#[test]
fn a_reader_never_sees_a_mix_of_old_and_new() {
    use std::io::Read;
    for versioned in [true, false] {
        let b = Bucket::new(server(), "mix", versioned);
        let old = pattern(6 * 1024 * 1024, 1);
        let new = pattern(6 * 1024 * 1024, 2);
        b.put("f", &old);
        let m = Mount::new(&b, "readahead=1");
        let mut f = fs::File::open(m.path("f")).unwrap();
        let mut got = vec![0u8; 1024 * 1024];
        f.read_exact(&mut got).unwrap();
        b.put("f", &new);
        let mut rest = Vec::new();
        match f.read_to_end(&mut rest) {
            Ok(_) => {
                got.extend_from_slice(&rest);
                assert!(got == old, "versioned={versioned}: the old object, whole");
            }
            Err(e) => {
                assert!(!versioned, "a versioned bucket serves the old version: {e}");
                assert_eq!(errno(e), libc::EIO);
            }
        }
        drop(f);
        // A new open sees the new object.
        sh(&m.dir, "echo 3 > /proc/sys/vm/drop_caches");
        let m2 = Mount::new(&b, "");
        assert_eq!(sha256_file(&m2.path("f")), sha256(&new));
    }
}

/// s3fs-style objects written with the S3 API: (key, body, mode, uid, mtime).
const S3FS_OBJECTS: [(&str, &[u8], u32, u32, i64); 6] = [
    ("d/private", b"root only", 0o100600, 0, 1_600_000_000),
    ("d/theirs", b"user 1000's", 0o100600, 1000, 1_600_000_001),
    ("d/link", b"private", 0o120777, 0, 1_600_000_002),
    (
        "d/script.sh",
        b"#!/bin/sh\necho hi\n",
        0o100755,
        0,
        1_600_000_003,
    ),
    ("d/old", b"old", 0o100644, 0, 1_000_000_000),
    ("d/fifo", b"", 0o010640, 0, 1_600_000_005),
];

/// After `ls -l`, every entry shows exactly its own metadata and another
/// uid is refused where the mode says so.
fn check_own_metadata(m: &Mount) {
    use std::os::unix::fs::MetadataExt;
    let d = m.dir.display();
    sh(&m.dir, "ls -l d >/dev/null");
    let (ok, err) = as_user(1000, &format!("ls -l {d}/d >/dev/null; cat {d}/d/private"));
    assert!(
        !ok && err.contains("Permission denied"),
        "another user read a 0600 root file after ls -l: {err}"
    );
    for (key, body, mode, uid, mtime) in S3FS_OBJECTS {
        let md = fs::symlink_metadata(m.path(key)).unwrap();
        assert_eq!(md.mode(), mode, "{key}: mode {:o}", md.mode());
        assert_eq!((md.uid(), md.gid()), (uid, uid), "{key}: owner");
        assert_eq!(md.mtime(), mtime, "{key}: mtime");
        if mode & libc::S_IFMT == libc::S_IFREG {
            assert_eq!(md.len(), body.len() as u64, "{key}: size");
        }
    }
    assert_eq!(
        fs::read_link(m.path("d/link")).unwrap().as_os_str(),
        "private"
    );
    let (ok, err) = as_user(1000, &format!("cat {d}/d/theirs && {d}/d/script.sh"));
    assert!(ok, "own file and a 0755 script: {err}");
    let (ok, err) = as_user(1000, &format!("cat {d}/d/link"));
    assert!(!ok && err.contains("Permission denied"), "{err}");
}

#[test]
fn listed_entries_show_only_their_own_metadata_to_every_user() {
    let b = Bucket::new(server(), "ownmeta", false);
    for (key, body, mode, uid, mtime) in S3FS_OBJECTS {
        let (mode, uid, mtime) = (mode.to_string(), uid.to_string(), mtime.to_string());
        b.put_meta(
            key,
            body,
            &[
                ("mode", &mode),
                ("uid", &uid),
                ("gid", &uid),
                ("mtime", &mtime),
            ],
        );
    }
    let m = Mount::new(&b, "allow_other");
    check_own_metadata(&m);
    m.remount();
    check_own_metadata(&m);
    fs::write("/proc/sys/vm/drop_caches", "2").unwrap();
    check_own_metadata(&m);
}

#[test]
fn without_object_metadata_every_object_is_the_mounts_and_chmod_is_eperm() {
    use std::os::unix::fs::MetadataExt;
    let b = Bucket::new(server(), "nometa", false);
    b.put_meta("p", b"x", &[("mode", "33152"), ("uid", "1000")]);
    let m = Mount::new(&b, "allow_other,no_object_metadata,umask=077");
    sh(&m.dir, "ls -l >/dev/null");
    let md = fs::metadata(m.path("p")).unwrap();
    assert_eq!((md.mode() & 0o7777, md.uid()), (0o600, 0));
    let (ok, err) = as_user(1000, &format!("cat {}/p", m.dir.display()));
    assert!(!ok && err.contains("Permission denied"), "{err}");
    let e = fs::set_permissions(m.path("p"), fs::Permissions::from_mode(0o644)).unwrap_err();
    assert_eq!(errno(e), libc::EPERM);
}

#[test]
fn hostile_metadata_gives_sane_attributes_and_never_breaks_the_listing() {
    use std::os::unix::fs::MetadataExt;
    let b = Bucket::new(server(), "hostile", false);
    let cases: [(&str, &str, &str); 8] = [
        ("mtime", "99999999999999999999", "beyond i64"),
        ("mtime", "9223372036854775808", "i64::MAX + 1"),
        ("mtime", "-99999999999999", "far negative"),
        ("mtime", "NaN", "nan"),
        ("mtime", "garbage", "garbage"),
        ("uid", "99999999999", "huge uid"),
        ("mode", "61951", "mode 0170777"),
        ("mode", "-1", "negative mode"),
    ];
    for (i, (k, v, _)) in cases.iter().enumerate() {
        b.put_meta(&format!("h/f{i}"), b"data", &[(k, v)]);
    }
    let m = Mount::new(&b, "");
    for round in 0..2 {
        let listed = sh(&m.dir, "ls -l h | wc -l");
        assert_eq!(listed.trim(), "9", "round {round}: total + 8 entries");
        for (i, (_, _, what)) in cases.iter().enumerate() {
            let p = m.path(&format!("h/f{i}"));
            let md = fs::metadata(&p).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert!(md.is_file(), "{what}");
            assert_eq!(md.len(), 4, "{what}");
            assert!(md.mode() & 0o7777 <= 0o777, "{what}");
            assert!((0..=253_402_300_799).contains(&md.mtime()), "{what}");
            let out = Command::new("getfattr")
                .args(["-n", "user.s3.etag"])
                .arg(&p)
                .output()
                .unwrap();
            assert!(out.status.success(), "{what}: getfattr failed");
            assert_eq!(fs::read(&p).unwrap(), b"data", "{what}");
        }
    }
    assert!(!m.log_text().contains("panicked"), "no panic in the daemon");
}

#[test]
fn a_key_of_exactly_1024_bytes_opens_and_only_longer_keys_are_refused() {
    let b = Bucket::new(server(), "key1024", false);
    // Components of at most 255 bytes: 4 × (200 + '/') + 220 = 1,024.
    let dirs = ["a", "b", "c", "d"].map(|c| c.repeat(200)).join("/");
    let key = format!("{dirs}/{}", "f".repeat(220));
    assert_eq!(key.len(), 1024);
    b.put(&key, b"at the limit");
    let m = Mount::new(&b, "");
    assert_eq!(fs::read(m.path(&key)).unwrap(), b"at the limit");
    let parent = m.path(&dirs);
    assert_eq!(names(&parent).len(), 1, "listed");
    fs::write(m.path(&format!("{dirs}/{}", "g".repeat(220))), b"new").unwrap();
    assert_eq!(
        b.get(&format!("{dirs}/{}", "g".repeat(220))).unwrap(),
        b"new"
    );
    assert_eq!(
        errno(fs::write(m.path(&format!("{dirs}/{}", "h".repeat(221))), b"x").unwrap_err()),
        libc::ENAMETOOLONG,
        "1,025 bytes"
    );
    assert_eq!(
        errno(fs::create_dir(m.path(&format!("{dirs}/{}", "i".repeat(220)))).unwrap_err()),
        libc::ENAMETOOLONG,
        "a directory's marker would be 1,025 bytes"
    );
}

/// Every directory and file under `dir`: (path, mode, uid).
fn tree_modes(dir: &std::path::Path, out: &mut Vec<(std::path::PathBuf, u32, u32)>) {
    use std::os::unix::fs::MetadataExt;
    let md = fs::symlink_metadata(dir).unwrap();
    out.push((dir.to_path_buf(), md.mode(), md.uid()));
    if md.is_dir() {
        for e in fs::read_dir(dir).unwrap() {
            tree_modes(&e.unwrap().path(), out);
        }
    }
}

fn assert_private(dir: &std::path::Path) -> usize {
    let mut all = Vec::new();
    tree_modes(dir, &mut all);
    for (p, mode, uid) in &all {
        let want = if mode & libc::S_IFMT == libc::S_IFDIR {
            0o700
        } else {
            0o600
        };
        assert_eq!((mode & 0o7777, *uid), (want, 0), "{}", p.display());
    }
    all.len()
}

#[test]
fn the_cache_disk_is_private_and_an_unsafe_cache_dir_is_refused() {
    let b = Bucket::new(server(), "privcache", false);
    b.put("read-me", &pattern(2 * 1024 * 1024, 1));
    let m = Mount::new(&b, "allow_other");
    // A file being written: its staged copy and journal exist now.
    let mut f = fs::File::create(m.path("dirty")).unwrap();
    f.write_all(&pattern(300_000, 2)).unwrap();
    f.sync_all().unwrap();
    f.write_all(b"more").unwrap();
    let n = assert_private(m.cache_dir());
    assert!(n >= 4, "cache dir, staging dirs and files: {n}");
    let mut all = Vec::new();
    tree_modes(m.cache_dir(), &mut all);
    let staged = all
        .iter()
        .find(|(p, mode, _)| {
            mode & libc::S_IFMT == libc::S_IFREG && p.to_string_lossy().contains("stage-")
        })
        .expect("a staged file")
        .0
        .clone();
    let (ok, err) = as_user(1000, &format!("cat {}", staged.display()));
    assert!(!ok && err.contains("Permission denied"), "{err}");
    drop(f);
    assert_eq!(fs::read(m.path("read-me")).unwrap().len(), 2 * 1024 * 1024);
    assert_eq!(m.unmount(), Some(0));
    let blocks = m.cache_dir().join("blocks");
    assert!(assert_private(&blocks) >= 3, "the disk tier's files");
    let mut tier = Vec::new();
    tree_modes(&blocks, &mut tier);
    assert!(
        tier.iter()
            .any(|(p, mode, _)| mode & libc::S_IFMT == libc::S_IFREG
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("slots-"))
                && fs::metadata(p).unwrap().len() > 0),
        "cached blocks were written: {tier:?}"
    );

    // Refused before mounting: another user's directory, a directory
    // others may write to, and no HOME/XDG_CACHE_HOME for a non-root user.
    for (setup, why) in [
        ("chown 1000 {c}", "owned by uid 1000"),
        ("chmod 0777 {c}", "writable by group or others"),
    ] {
        let (tmp, mp) = scratch_mountpoint();
        let c = tmp.path().join("c");
        fs::create_dir(&c).unwrap();
        sh(tmp.path(), &setup.replace("{c}", &c.display().to_string()));
        let opts = base_options(&b.endpoint, &c, &tmp.path().join("log"));
        let out = command()
            .args(["-o", &opts, &b.name])
            .arg(&mp)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{setup}");
        assert!(
            err.contains(why) && err.contains("cache_dir"),
            "{setup}: {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(!is_mounted(&mp), "nothing mounted");
    }
    let (tmp, mp) = scratch_mountpoint();
    let out = Command::new("setpriv")
        .args(["--reuid", "1000", "--regid", "1000", "--clear-groups"])
        .arg(bin())
        .args([
            "-o",
            &format!("endpoint={},path_style", b.endpoint),
            &b.name,
        ])
        .arg(&mp)
        .env_clear()
        .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("-o cache_dir="),
        "{err}"
    );
    assert!(!tmp.path().join("bucketfs").exists() && !is_mounted(&mp));
}

#[test]
fn planted_journals_are_never_uploaded() {
    let b = Bucket::new(server(), "planted", false);
    let m = Mount::new(&b, "");
    let mut f = fs::File::create(m.path("injected.sh")).unwrap();
    f.write_all(b"echo owned").unwrap();
    f.sync_all().unwrap();
    f.write_all(b" and more").unwrap();
    // A killed daemon leaves a staged file and its journal.
    unsafe { libc::kill(m.pid().unwrap() as i32, libc::SIGKILL) };
    m.wait_exit(Duration::from_secs(30));
    drop(f);
    assert!(
        Command::new("umount")
            .arg("-l")
            .arg(&m.dir)
            .status()
            .unwrap()
            .success()
    );
    b.put("injected.sh", b"the original");
    let staged: Vec<_> = {
        let mut all = Vec::new();
        tree_modes(&m.cache_dir().join("staging"), &mut all);
        all.into_iter()
            .filter(|(_, mode, _)| mode & libc::S_IFMT == libc::S_IFREG)
            .map(|(p, _, _)| p)
            .collect()
    };
    assert_eq!(staged.len(), 2, "a staged file and its journal");
    // As if another user had planted them.
    for p in &staged {
        std::os::unix::fs::chown(p, Some(1000), Some(1000)).unwrap();
    }
    m.restart();
    assert_eq!(
        b.get("injected.sh").as_deref(),
        Some(&b"the original"[..]),
        "another user's journal is not uploaded"
    );
    assert!(
        b.keys("").iter().all(|k| !k.contains("recovered")),
        "{:?}",
        b.keys("")
    );
    assert!(m.log_text().contains("not trusted"));
}

/// On a full cache disk a truncation the journal cannot record fails and
/// cuts nothing: the bytes past it stay the file's, in S3 after kill -9
/// and a remount.
#[test]
fn a_truncation_failing_on_a_full_disk_cuts_nothing() {
    use std::os::unix::fs::FileExt;
    // `_tmp` kept to the end: it holds the tmpfs's mountpoint.
    let FullDiskRig {
        _tmp,
        disk,
        b,
        m,
        f,
        base,
    } = FullDiskRig::new("trunc-full", 256 * 1024);
    let (x, y) = (pattern(4096, 2), pattern(4096, 3));
    f.write_at(&x, 0).unwrap();
    f.write_at(&y, base.len() as u64 - 4096).unwrap();
    let filler = disk.fill();
    // Journal lines until one finds no room: the journal is full now.
    let failed = (0..5000).find_map(|_| f.write_at(&x, 0).err());
    assert_eq!(failed.map(errno), Some(libc::ENOSPC));
    let e = f.set_len(base.len() as u64 - 1).unwrap_err();
    assert_eq!(errno(e), libc::ENOSPC);
    fs::remove_file(&filler).unwrap();
    assert_eq!(f.metadata().unwrap().len(), base.len() as u64);
    kill9(&m);
    drop(f);
    m.restart();
    let mut want = base.clone();
    want[..4096].copy_from_slice(&x);
    let n = want.len();
    want[n - 4096..].copy_from_slice(&y);
    assert_lands(&b, "f", &want, Duration::from_secs(60), "after the remount");
}

/// rsync's pattern on a full cache disk: a new file renamed over an
/// existing object fails with ENOSPC, and the object it would have
/// replaced is still in the bucket.
#[test]
fn a_rename_failing_on_a_full_disk_leaves_the_target_in_the_bucket() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = SmallDisk::new(&tmp.path().join("small-disk"), "4m");
    let b = Bucket::new(server(), "rename-full", false);
    b.put("dest", b"IMPORTANT ORIGINAL CONTENT");
    let m = Mount::new(&b, &format!("cache_dir={},cache_size=0", disk.0.display()));
    assert_eq!(
        fs::read(m.path("dest")).unwrap(),
        b"IMPORTANT ORIGINAL CONTENT"
    );
    let mut f = fs::File::create(m.path("tmp.x")).unwrap();
    f.write_all(b"new content").unwrap();
    let filler = disk.fill();
    let e = fs::rename(m.path("tmp.x"), m.path("dest")).unwrap_err();
    assert_eq!(errno(e), libc::ENOSPC);
    assert_eq!(
        b.get("dest").as_deref(),
        Some(&b"IMPORTANT ORIGINAL CONTENT"[..]),
        "the target is still in the bucket"
    );
    fs::remove_file(&filler).unwrap();
    drop(f);
    assert_lands(
        &b,
        "tmp.x",
        b"new content",
        Duration::from_secs(60),
        "after the close",
    );
    assert_eq!(
        b.get("dest").as_deref(),
        Some(&b"IMPORTANT ORIGINAL CONTENT"[..])
    );
}

/// A create that fails on a full cache disk leaves no name behind: before,
/// the failed file showed (0 bytes), and a rename of it over an existing
/// file returned 0 while the bucket, and the next mount, kept the old one.
#[test]
fn a_create_failing_on_a_full_disk_leaves_no_name() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = SmallDisk::new(&tmp.path().join("small-disk"), "4m");
    let b = Bucket::new(server(), "create-full", false);
    b.put("b", b"acknowledged-B");
    let m = Mount::new(&b, &format!("cache_dir={},cache_size=0", disk.0.display()));
    assert_eq!(fs::read(m.path("b")).unwrap(), b"acknowledged-B");
    let filler = disk.fill();
    let e = fs::File::create(m.path("a")).unwrap_err();
    assert_eq!(errno(e), libc::ENOSPC);
    assert_eq!(errno(fs::metadata(m.path("a")).unwrap_err()), libc::ENOENT);
    assert!(!names(&m.dir).contains(b"a".as_slice()));
    assert_eq!(
        errno(fs::rename(m.path("a"), m.path("b")).unwrap_err()),
        libc::ENOENT
    );
    fs::remove_file(&filler).unwrap();
    assert_eq!(fs::read(m.path("b")).unwrap(), b"acknowledged-B");
    assert_eq!(b.get("b").unwrap(), b"acknowledged-B");
}

/// A write the disk has room for only part of is a short write, as on a
/// local disk: the count says what landed, and that is what a killed
/// daemon's next mount uploads; a write that returned ENOSPC changed
/// nothing (before, its first pages were in the staged file, and in S3
/// after the kill).
#[test]
fn a_write_cut_short_by_a_full_disk_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = SmallDisk::new(&tmp.path().join("small-disk"), "4m");
    let b = Bucket::new(server(), "short-full", false);
    b.put("f", &pattern(11_837, 4));
    let m = Mount::new(&b, &format!("cache_dir={},cache_size=0", disk.0.display()));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(m.path("f"))
        .unwrap();
    let filler = disk.fill();
    // Free a little: room for part of the next write only.
    let room = fs::OpenOptions::new().write(true).open(&filler).unwrap();
    let len = room.metadata().unwrap().len();
    room.set_len(len - 12 * 1024).unwrap();
    let data = pattern(200_000, 5);
    let mut written = 0;
    // Bounded: each round either writes something or fails.
    for _ in 0..1000 {
        match f.write(&data[written..]) {
            Ok(0) => break,
            Ok(n) => written += n,
            Err(e) => {
                assert_eq!(errno(e), libc::ENOSPC);
                break;
            }
        }
    }
    assert!(written < data.len(), "the disk had room for all of it");
    assert_eq!(f.metadata().unwrap().len(), written as u64);
    kill9(&m);
    drop(f);
    drop(room);
    fs::remove_file(&filler).unwrap();
    m.restart();
    assert_lands(
        &b,
        "f",
        &data[..written],
        Duration::from_secs(60),
        "after the remount",
    );
}

/// A file rewritten with the bytes it already had, then chmod-ed, and the
/// daemon killed before close: the object holds those bytes but not the
/// mode, and the next mount stores the mode (it took the object for the
/// upload landed already, and dropped the chmod).
#[test]
fn a_chmod_of_a_file_rewritten_with_the_same_bytes_survives_a_kill() {
    use std::os::unix::fs::PermissionsExt;
    let b = Bucket::new(server(), "same-bytes-chmod", false);
    let body = pattern(20_000, 6);
    b.put("f", &body);
    let m = Mount::new(&b, "");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(m.path("f"))
        .unwrap();
    f.write_all(&body).unwrap();
    f.set_permissions(fs::Permissions::from_mode(0o600))
        .unwrap();
    assert_eq!(
        fs::metadata(m.path("f")).unwrap().permissions().mode() & 0o777,
        0o600
    );
    kill9(&m);
    drop(f);
    m.restart();
    wait_until(Duration::from_secs(60), "the mode in S3", || {
        b.metadata("f")
            .get("mode")
            .and_then(|v| v.parse::<u32>().ok())
            == Some(0o100600)
    });
    assert_eq!(sha256(&b.get("f").unwrap()), sha256(&body));
    assert_eq!(b.keys(""), vec!["f".to_string()]);
}

/// A PUT the store carried out but whose answer never came (a timeout
/// after the work): close() reports success, since the object is those
/// bytes, and a later rm removes it. The file counted as never uploaded
/// before, so its close failed and an rm left the object in the bucket.
#[test]
fn a_put_whose_answer_was_lost_counts_as_landed_and_rm_removes_it() {
    let (proxy, b, m) = through_proxy("put-landed", false, "");
    let data = pattern(300 * 1024, 141);
    proxy.inject("PUT", 1000, proxy::Fault::Landed);
    let mut f = fs::File::create(m.path("f")).unwrap();
    f.write_all(&data).unwrap();
    let closed = close(f);
    proxy.clear();
    assert!(proxy.faults_injected() >= 1, "no PUT reached the proxy");
    assert!(
        closed.is_ok(),
        "close() after a PUT that landed: {closed:?}\n{}",
        m.log_text()
    );
    assert_eq!(sha256(&b.get("f").expect("f in the bucket")), sha256(&data));
    fs::remove_file(m.path("f")).unwrap();
    assert_eq!(
        b.get("f").map(|d| d.len()),
        None,
        "rm f left it in the bucket"
    );
}
