//! `.versions/` through a real FUSE mount over a real S3 server with
//! versioning: list, read, restore, read-only, hidden from tree walkers,
//! xattrs, point-in-time mounts, and a bucket without versioning.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use common::*;

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

#[test]
fn every_version_is_a_file_and_a_deleted_file_comes_back_with_cp() {
    let b = Bucket::new(server(), "ver", true);
    let m = Mount::new(&b, "metadata_ttl=0");
    fs::create_dir_all(m.path("docs/sub dir")).unwrap();
    let name = "docs/sub dir/rapport é.txt";
    let bodies: Vec<Vec<u8>> = (0..3).map(|i| pattern(1000 + i * 777, i as u64)).collect();
    for body in &bodies {
        fs::write(m.path(name), body).unwrap();
    }
    fs::remove_file(m.path(name)).unwrap();
    assert_eq!(b.get(name), None);

    let vdir = m.path("docs/sub dir/.versions");
    assert_eq!(
        names(&vdir),
        vec!["rapport é.txt"],
        "a deleted file keeps its .versions entry"
    );
    let list = names(&vdir.join("rapport é.txt"));
    assert_eq!(list.len(), 4, "{list:?}");
    let s3 = b.versions(name);
    assert_eq!(s3.len(), 4);
    // ls -t: newest first, and the newest is the delete marker.
    let by_time = sh(&vdir.join("rapport é.txt"), "ls -t");
    let by_time: Vec<&str> = by_time.lines().collect();
    assert!(by_time[0].ends_with(".deleted"), "{by_time:?}");
    let marker = s3.iter().find(|v| v.1).expect("a delete marker in S3");
    assert!(by_time[0].contains(&marker.0));
    assert_eq!(
        fs::metadata(vdir.join("rapport é.txt").join(by_time[0]))
            .unwrap()
            .len(),
        0
    );
    for (i, v) in by_time[1..].iter().enumerate() {
        let want = &bodies[2 - i];
        let p = vdir.join("rapport é.txt").join(v);
        assert_eq!(sha256_file(&p), sha256(want), "version {v}");
        let md = fs::metadata(&p).unwrap();
        assert_eq!(
            (md.len(), md.permissions().mode() & 0o777),
            (want.len() as u64, 0o444)
        );
    }
    // Restore the middle version by cp.
    let middle = vdir.join("rapport é.txt").join(by_time[2]);
    sh(
        &m.dir,
        &format!("cp '{}' '{}'", middle.display(), m.path(name).display()),
    );
    assert_eq!(sha256(&b.get(name).unwrap()), sha256(&bodies[1]));
    assert_eq!(sha256_file(&m.path(name)), sha256(&bodies[1]));
}

#[test]
fn versions_are_read_only_and_hidden_from_tree_walkers() {
    let b = Bucket::new(server(), "ro", true);
    let m = Mount::new(&b, "");
    fs::create_dir(m.path("d")).unwrap();
    fs::write(m.path("d/f"), b"1").unwrap();
    fs::write(m.path("d/f"), b"2").unwrap();
    let vf = m.path("d/.versions/f");
    let v = names(&vf);
    assert_eq!(v.len(), 2);
    let one = vf.join(&v[0]);
    assert_eq!(errno(fs::write(&one, b"x").unwrap_err()), libc::EROFS);
    assert_eq!(
        errno(fs::OpenOptions::new().append(true).open(&one).unwrap_err()),
        libc::EROFS
    );
    assert_eq!(
        errno(fs::write(vf.join("new"), b"x").unwrap_err()),
        libc::EROFS
    );
    assert_eq!(errno(fs::remove_file(&one).unwrap_err()), libc::EROFS);
    assert_eq!(
        errno(fs::create_dir(m.path("d/.versions/x")).unwrap_err()),
        libc::EROFS
    );
    assert_eq!(
        errno(fs::rename(&one, m.path("d/stolen")).unwrap_err()),
        libc::EROFS
    );
    assert_eq!(
        errno(fs::set_permissions(&one, fs::Permissions::from_mode(0o777)).unwrap_err()),
        libc::EROFS
    );
    assert_eq!(
        errno(fs::create_dir(m.path("d/.versions")).unwrap_err()),
        libc::EEXIST
    );
    let setf = std::process::Command::new("setfattr")
        .args(["-n", "user.x", "-v", "1"])
        .arg(&one)
        .output()
        .unwrap();
    assert!(!setf.status.success());
    assert!(
        String::from_utf8_lossy(&setf.stderr).contains("Read-only"),
        "{setf:?}"
    );

    // ls -a, find, cp -r and du never descend into .versions...
    assert!(!sh(&m.dir, "ls -a d").contains(".versions"));
    assert!(!sh(&m.dir, "find .").contains(".versions"));
    let out = tempfile::tempdir().unwrap();
    sh(&m.dir, &format!("cp -r d {}/copy", out.path().display()));
    assert_eq!(names(&out.path().join("copy")), vec!["f"]);
    // ...but the path works, and stat and cd do too.
    assert!(fs::metadata(m.path("d/.versions")).unwrap().is_dir());
    assert_eq!(sh(&m.path("d"), "cd .versions/f && ls | wc -l").trim(), "2");
    assert!(
        names(&m.path(".versions")).contains(&"d".to_string())
            || names(&m.path(".versions")).is_empty()
    );

    // This mount's own changes show in .versions at once.
    fs::remove_file(m.path("d/f")).unwrap();
    let after = names(&vf);
    assert_eq!(after.len(), 3, "{after:?}");
    assert!(after.iter().any(|n| n.ends_with(".deleted")));

    let vis = Mount::new(&b, "versions=visible");
    assert!(sh(&vis.dir, "ls -a d").contains(".versions"));
}

#[test]
fn xattrs_expose_s3_facts() {
    let b = Bucket::new(server(), "xattr", true);
    let m = Mount::new(&b, "");
    fs::write(m.path("f"), b"hello").unwrap();
    let out = sh(&m.dir, "getfattr -d f");
    let vid = &b.versions("f")[0].0;
    assert!(
        out.contains(&format!("user.s3.version_id=\"{vid}\"")),
        "{out}"
    );
    assert!(
        out.contains("user.s3.etag=\"5d41402abc4b2a76b9719d911017c592\""),
        "md5 of hello: {out}"
    );
    assert!(out.contains("user.s3.storage_class=\"STANDARD\""), "{out}");
    assert!(out.contains("user.s3.last_modified=\"20"), "{out}");
    let v = names(&m.path(".versions/f"));
    let out = sh(
        &m.path(".versions/f"),
        &format!("getfattr -n user.s3.version_id --only-values '{}'", v[0]),
    );
    assert_eq!(out, *vid);
}

#[test]
fn as_of_mounts_show_the_bucket_at_each_moment() {
    let b = Bucket::new(server(), "asof", true);
    let m = Mount::new(&b, "");
    // moto keeps whole seconds: space the writes by more than one.
    let tick = || std::thread::sleep(Duration::from_millis(1100));
    let stamp = || humantime::format_rfc3339_millis(SystemTime::now()).to_string();
    fs::create_dir(m.path("dir")).unwrap();
    fs::write(m.path("dir/a"), b"a1").unwrap();
    tick();
    let t1 = stamp();
    tick();
    fs::write(m.path("dir/a"), b"a2").unwrap();
    fs::write(m.path("dir/b"), b"b2").unwrap();
    tick();
    let t2 = stamp();
    tick();
    fs::remove_file(m.path("dir/a")).unwrap();
    tick();
    let t3 = stamp();

    let at1 = Mount::new(&b, &format!("as_of={t1}"));
    assert_eq!(names(&at1.path("dir")), vec!["a"]);
    assert_eq!(fs::read(at1.path("dir/a")).unwrap(), b"a1");
    // `bucketfs url` of a file there is of the version shown, not of the
    // current object.
    let out = command()
        .arg("url")
        .arg(at1.path("dir/a"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let link = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(link.contains("versionId="), "{link}");
    let got = std::process::Command::new(python())
        .args([
            "-c",
            "import sys, urllib.request; sys.stdout.buffer.write(urllib.request.urlopen(sys.argv[1]).read())",
            &link,
        ])
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(
        got.stdout,
        b"a1",
        "{}",
        String::from_utf8_lossy(&got.stderr)
    );
    assert_eq!(
        errno(fs::write(at1.path("dir/a"), b"x").unwrap_err()),
        libc::EROFS
    );
    let at2 = Mount::new(&b, &format!("as_of={t2}"));
    assert_eq!(names(&at2.path("dir")), vec!["a", "b"]);
    assert_eq!(fs::read(at2.path("dir/a")).unwrap(), b"a2");
    let at3 = Mount::new(&b, &format!("as_of={t3}"));
    assert_eq!(names(&at3.path("dir")), vec!["b"]);
    assert_eq!(
        errno(fs::metadata(at3.path("dir/a")).unwrap_err()),
        libc::ENOENT
    );
}

#[test]
fn a_bucket_without_versioning_shows_the_current_object_as_null() {
    let b = Bucket::new(server(), "nover", false);
    b.put("plain", b"only");
    let m = Mount::new(&b, "");
    let v = names(&m.path(".versions/plain"));
    assert_eq!(v.len(), 1);
    assert!(v[0].ends_with("~null"), "{v:?}");
    assert_eq!(
        fs::read(m.path(".versions/plain").join(&v[0])).unwrap(),
        b"only"
    );
}

#[test]
fn keys_sharing_a_prefix_do_not_leak_into_each_others_versions() {
    let b = Bucket::new(server(), "prefix", true);
    b.put("a", b"1");
    b.put("a.txt", b"22");
    b.put("a/b", b"333");
    let m = Mount::new(&b, "");
    let v = names(&m.path(".versions/a"));
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!(fs::read(m.path(".versions/a").join(&v[0])).unwrap(), b"1");
    assert_eq!(names(&m.path(".versions")), vec!["a", "a.txt"]);
    assert_eq!(names(&m.path("a/.versions")), vec!["b"]);
}

#[test]
fn versions_grant_no_more_than_the_file() {
    use std::os::unix::fs::MetadataExt;
    let b = Bucket::new(server(), "vperm", true);
    // Written through the mount and made 0600, and written by another
    // tool with s3fs metadata, then deleted (the newest is a marker).
    let m = Mount::new(&b, "allow_other");
    fs::write(m.path("secret"), b"first").unwrap();
    fs::write(m.path("secret"), b"second").unwrap();
    fs::set_permissions(m.path("secret"), fs::Permissions::from_mode(0o600)).unwrap();
    for body in [&b"old"[..], b"older"] {
        b.put_meta(
            "gone",
            body,
            &[("mode", "33152"), ("uid", "0"), ("gid", "0")],
        );
    }
    b.put_meta("shared.sh", b"#!/bin/sh\n", &[("mode", "33261")]);
    b.delete("gone");
    let d = m.dir.display();
    for name in ["secret", "gone"] {
        let (ok, err) = as_user(
            1000,
            &format!("ls -l {d}/.versions/{name}/ >/dev/null; cat {d}/.versions/{name}/*"),
        );
        assert!(!ok && err.contains("Permission denied"), "{name}: {err}");
        let vdir = m.path(&format!(".versions/{name}"));
        let md = fs::metadata(&vdir).unwrap();
        assert_eq!((md.mode() & 0o7777, md.uid()), (0o500, 0), "{name}/");
        for v in names(&vdir) {
            let md = fs::metadata(vdir.join(&v)).unwrap();
            assert_eq!((md.mode() & 0o7777, md.uid()), (0o400, 0), "{name}/{v}");
        }
    }
    let vdir = m.path(".versions/shared.sh");
    let (ok, err) = as_user(1000, &format!("cat {}/*", vdir.display()));
    assert!(ok, "a 0755 file's versions are readable: {err}");
    for v in names(&vdir) {
        let md = fs::metadata(vdir.join(&v)).unwrap();
        assert_eq!(md.mode() & 0o7777, 0o555, "no write bit");
    }
}

/// An old version keeps the protection it had: a secret written 0600,
/// then overwritten with something harmless and made 0644, does not
/// become readable to others under `.versions`.
#[test]
fn an_old_0600_version_stays_private_after_chmod_644() {
    use std::os::unix::fs::MetadataExt;
    let b = Bucket::new(server(), "vold", true);
    let m = Mount::new(&b, "allow_other");
    let p = m.path("notes");
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&p)
            .unwrap();
        f.write_all(b"password=hunter2").unwrap();
    }
    fs::write(&p, b"nothing to see").unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
    let vdir = m.path(".versions/notes");
    let d = vdir.display();
    let (mut private, mut readable) = (0, 0);
    for v in names(&vdir) {
        let path = vdir.join(&v);
        let body = fs::read(&path).unwrap();
        let (ok, err) = as_user(1000, &format!("cat '{}'", path.display()));
        if body == b"password=hunter2" {
            private += 1;
            assert!(!ok && err.contains("Permission denied"), "{v}: {err}");
            assert_eq!(fs::metadata(&path).unwrap().mode() & 0o077, 0, "{v}");
        } else if body == b"nothing to see" && ok {
            readable += 1;
        }
    }
    assert!(private >= 1, "the secret version is listed in {d}");
    assert!(readable >= 1, "the current version is readable to others");
    let (ok, out) = as_user(1000, &format!("cat {d}/*"));
    assert!(!out.contains("hunter2") && !ok, "{out}");
}

/// What an ACL, a chown or a directory's mode withholds, `.versions` does
/// not give away: a version file carries no ACL, so only its owner bits
/// count where there is one; a version of another owner or group is for
/// root alone; and `DIR/.versions` lists names only to who may list DIR.
#[test]
fn versions_keep_what_acls_owners_and_directory_modes_withhold() {
    use std::os::unix::fs::{MetadataExt, chown};
    let b = Bucket::new(server(), "vacl", true);
    let m = Mount::new(&b, "allow_other");
    let d = m.dir.display();
    // Readable to uid 1001 by a named entry; the owning group (1002) has
    // nothing, though the mode's group bits (the mask) say r.
    fs::write(m.path("f"), b"TOP SECRET acl").unwrap();
    chown(m.path("f"), Some(0), Some(1002)).unwrap();
    let u = u32::MAX;
    let acl = acl_of(&[
        (1, 6, u),
        (2, 4, 1001),
        (4, 0, u),
        (0x10, 4, u),
        (0x20, 0, u),
    ]);
    set_xattr(&m.path("f"), "system.posix_acl_access", &acl).unwrap();
    assert_eq!(fs::metadata(m.path("f")).unwrap().mode() & 0o777, 0o640);
    let (ok, _) = as_user(1002, &format!("cat {d}/f"));
    assert!(!ok, "the owning group has no access to the file");
    let (ok, out) = as_user(1002, &format!("cat {d}/.versions/f/*"));
    assert!(!ok && !out.contains("TOP SECRET"), "{out}");
    // A private diary of uid 1000, overwritten by root and given to 1003.
    fs::create_dir(m.path("home")).unwrap();
    fs::set_permissions(m.path("home"), fs::Permissions::from_mode(0o777)).unwrap();
    let (ok, err) = as_user(
        1000,
        &format!("umask 077; echo 'alice private diary' > {d}/home/diary"),
    );
    assert!(ok, "{err}");
    fs::write(m.path("home/diary"), b"root's text\n").unwrap();
    chown(m.path("home/diary"), Some(1003), Some(1003)).unwrap();
    let (_, out) = as_user(1003, &format!("cat {d}/home/.versions/diary/*"));
    assert!(!out.contains("alice"), "{out}");
    assert!(
        out.contains("root's text"),
        "the new owner reads its own version: {out}"
    );
    // A directory others may enter but not list.
    fs::create_dir(m.path("d711")).unwrap();
    fs::write(m.path("d711/secret-name-salary"), b"x").unwrap();
    fs::set_permissions(m.path("d711"), fs::Permissions::from_mode(0o711)).unwrap();
    let (ok, out) = as_user(1000, &format!("ls {d}/d711/.versions"));
    assert!(!ok && !out.contains("secret-name"), "{out}");
    let md = fs::metadata(m.path("d711/.versions")).unwrap();
    assert_eq!(md.mode() & 0o777, 0o511);
}

/// `DIR/.versions` follows a change of DIR's mode, owner or ACL at once,
/// though the kernel was told its attributes may be kept for ten minutes:
/// a directory made unlistable to others does not stay listable under
/// `.versions` for that long.
#[test]
fn a_directory_closed_to_others_closes_its_versions_at_once() {
    use std::os::unix::fs::{MetadataExt, chown};
    let b = Bucket::new(server(), "vchmod", true);
    let m = Mount::new(&b, "allow_other,metadata_ttl=600");
    let d = m.dir.display();
    fs::create_dir(m.path("d")).unwrap();
    fs::write(m.path("d/secret-name-salary"), b"x").unwrap();
    fs::set_permissions(m.path("d"), fs::Permissions::from_mode(0o755)).unwrap();
    let ls = format!("ls {d}/d/.versions");
    let (ok, out) = as_user(1000, &ls);
    assert!(
        ok && out.contains("secret-name"),
        "listable while d is 755: {out}"
    );
    fs::set_permissions(m.path("d"), fs::Permissions::from_mode(0o711)).unwrap();
    let (ok, out) = as_user(1000, &ls);
    assert!(
        !ok && !out.contains("secret-name"),
        "after chmod 711: {out}"
    );
    assert_eq!(
        fs::metadata(m.path("d/.versions")).unwrap().mode() & 0o777,
        0o511
    );
    // Given to uid 1000, mode 0700: its owner lists, root's group does not.
    chown(m.path("d"), Some(1000), Some(0)).unwrap();
    fs::set_permissions(m.path("d"), fs::Permissions::from_mode(0o700)).unwrap();
    let (ok, out) = as_user(1000, &ls);
    assert!(
        ok && out.contains("secret-name"),
        "its new owner lists: {out}"
    );
    let md = fs::metadata(m.path("d/.versions")).unwrap();
    assert_eq!((md.uid(), md.mode() & 0o777), (1000, 0o500));
    let (ok, out) = as_user(1001, &ls);
    assert!(!ok && !out.contains("secret-name"), "uid 1001: {out}");
    // An access ACL on d giving uid 1002 r-x (user::rwx, user:1002:rwx,
    // group::---, mask::r-x, other::---): 1002 lists d/.versions as it
    // lists d, and writes in neither; 1001 lists neither.
    let u = u32::MAX;
    let acl = acl_of(&[
        (1, 7, u),
        (2, 7, 1002),
        (4, 0, u),
        (0x10, 5, u),
        (0x20, 0, u),
    ]);
    set_xattr(&m.path("d"), "system.posix_acl_access", &acl).unwrap();
    for (uid, lists) in [(1002, true), (1001, false)] {
        for dir in ["d", "d/.versions"] {
            let (ok, out) = as_user(uid, &format!("ls {d}/{dir}"));
            assert_eq!(
                ok && out.contains("secret-name"),
                lists,
                "uid {uid} ls {dir}: {out}"
            );
        }
    }
    let (ok, _) = as_user(1002, &format!("touch {d}/d/.versions/new"));
    assert!(!ok, "d/.versions is read-only");
    // The ACL taken off (d is 0750 again): 1002 is an other.
    remove_xattr(&m.path("d"), "system.posix_acl_access").unwrap();
    let (ok, out) = as_user(1002, &ls);
    assert!(
        !ok && !out.contains("secret-name"),
        "uid 1002 after setfacl -b: {out}"
    );
}

/// The xattr value of a POSIX ACL of (tag, perm, id) entries.
fn acl_of(entries: &[(u16, u16, u32)]) -> Vec<u8> {
    let mut acl = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in entries {
        acl.extend_from_slice(&tag.to_le_bytes());
        acl.extend_from_slice(&perm.to_le_bytes());
        acl.extend_from_slice(&id.to_le_bytes());
    }
    acl
}

/// An object written before versioning was enabled is the "null"
/// version; once newer versions are on top of it, it is read by that id
/// (not by the current object's ETag, which no longer matches).
#[test]
fn a_version_from_before_versioning_reads_back() {
    let b = Bucket::new(server(), "vnull", false);
    let old = pattern(100_000, 7);
    b.put("f", &old);
    b.enable_versioning();
    b.put("f", b"newer");
    let m = Mount::new(&b, "");
    let vdir = m.path(".versions/f");
    let null: Vec<String> = names(&vdir)
        .into_iter()
        .filter(|n| n.ends_with("~null"))
        .collect();
    assert_eq!(null.len(), 1, "{:?}", names(&vdir));
    let got = fs::read(vdir.join(&null[0])).unwrap();
    assert_eq!(sha256(&got), sha256(&old));
    assert_eq!(fs::read(m.path("f")).unwrap(), b"newer");
}

/// A directory made at the path of a removed (or moved) private one does
/// not open the old directory's files through `.versions`: where a file's
/// owner is not its directory's, its versions grant only owner bits.
#[test]
fn a_new_directory_at_a_private_ones_old_path_opens_no_versions() {
    let b = Bucket::new(server(), "vreborn", true);
    let m = Mount::new(&b, "allow_other");
    let d = m.dir.display();
    fs::set_permissions(&m.dir, fs::Permissions::from_mode(0o1777)).unwrap();
    fs::create_dir(m.path("shared")).unwrap();
    fs::set_permissions(m.path("shared"), fs::Permissions::from_mode(0o1777)).unwrap();
    fs::create_dir(m.path("shared/sec")).unwrap();
    fs::set_permissions(m.path("shared/sec"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::write(m.path("shared/sec/s"), b"TOPSECRET-A").unwrap();
    fs::set_permissions(m.path("shared/sec/s"), fs::Permissions::from_mode(0o644)).unwrap();
    let (ok, _) = as_user(1001, &format!("cat {d}/shared/sec/s"));
    assert!(!ok, "the directory keeps 1001 out");
    fs::create_dir(m.path("priv")).unwrap();
    fs::rename(m.path("shared/sec"), m.path("priv/sec")).unwrap();
    let (ok, err) = as_user(1001, &format!("mkdir {d}/shared/sec"));
    assert!(ok, "{err}");
    let (_, out) = as_user(1001, &format!("cat {d}/shared/sec/.versions/s/*"));
    assert!(!out.contains("TOPSECRET"), "{out}");
    // Root still reads them; 1001 its own file's versions in its own
    // directory.
    let vdir = m.path("shared/sec/.versions/s");
    let all: Vec<Vec<u8>> = names(&vdir)
        .iter()
        .map(|v| fs::read(vdir.join(v)).unwrap())
        .collect();
    assert!(
        all.iter().any(|v| v == b"TOPSECRET-A"),
        "root reads the version"
    );
    let (ok, err) = as_user(
        1001,
        &format!("echo mine > {d}/shared/sec/t && echo again > {d}/shared/sec/t"),
    );
    assert!(ok, "{err}");
    let (ok, out) = as_user(1001, &format!("cat {d}/shared/sec/.versions/t/*"));
    assert!(ok && out.contains("mine"), "{out}");
}

/// `DIR/.versions/NAME` follows a chmod of NAME at once, though the kernel
/// was told its attributes may be kept for ten minutes: a file made
/// private does not leave the names, sizes and times of its versions open
/// to others for that long (their bytes were refused at once already).
#[test]
fn a_file_closed_to_others_closes_its_versions_directory_at_once() {
    use std::os::unix::fs::MetadataExt;
    let b = Bucket::new(server(), "vfchmod", true);
    let m = Mount::new(&b, "allow_other,metadata_ttl=600");
    let d = m.dir.display();
    fs::create_dir(m.path("d")).unwrap();
    fs::set_permissions(m.path("d"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(m.path("d/f"), b"first").unwrap();
    fs::write(m.path("d/f"), b"second").unwrap();
    fs::set_permissions(m.path("d/f"), fs::Permissions::from_mode(0o644)).unwrap();
    let ls = format!("ls {d}/d/.versions/f");
    let (ok, out) = as_user(1000, &ls);
    assert!(
        ok && !out.trim().is_empty(),
        "listable while f is 644: {out}"
    );
    fs::set_permissions(m.path("d/f"), fs::Permissions::from_mode(0o600)).unwrap();
    let (ok, out) = as_user(1000, &ls);
    assert!(!ok, "after chmod 600 of f, uid 1000 listed: {out}");
    assert_eq!(
        fs::metadata(m.path("d/.versions/f")).unwrap().mode() & 0o777,
        0o700 & 0o500
    );
    fs::set_permissions(m.path("d/f"), fs::Permissions::from_mode(0o644)).unwrap();
    let (ok, out) = as_user(1000, &ls);
    assert!(ok && !out.trim().is_empty(), "after chmod 644 again: {out}");
}
