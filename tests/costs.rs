//! What everyday commands cost in S3 requests, through a real mount over
//! a real local S3 server, counted by `bucketfs status` and checked in the
//! bucket with the S3 API.

mod common;

use common::*;
use std::time::Duration;

/// Long enough that no cache expires within a test, however slow the
/// machine: the counts must not depend on speed.
const PINNED: &str = "metadata_ttl=3600";

#[test]
fn a_shell_redirect_is_one_put_and_one_version() {
    let b = Bucket::new(server(), "redirect", true);
    let m = Mount::new(&b, PINNED);
    let puts = requests(&m, "PUT");
    sh(&m.dir, "echo x > new; echo y > new");
    assert_eq!(requests(&m, "PUT") - puts, 2, "one PUT per redirect");
    assert!(m.unmount().is_some());
    let versions = b.versions("new");
    assert_eq!(
        versions.len(),
        2,
        "no empty version of a new or rewritten file: {versions:?}"
    );
    assert_eq!(b.get("new").unwrap(), b"y\n");
}

#[test]
fn touch_of_a_new_file_lands_it_empty() {
    let b = Bucket::new(server(), "touchnew", false);
    let m = Mount::new(&b, PINNED);
    sh(&m.dir, "touch empty");
    assert!(m.unmount().is_some());
    assert_eq!(b.get("empty").unwrap(), b"");
}

#[test]
fn a_chmod_that_changes_nothing_sends_nothing() {
    let b = Bucket::new(server(), "noopchmod", false);
    let m = Mount::new(&b, PINNED);
    b.put_meta(
        "f",
        b"data",
        &[
            ("mode", "33188"),
            ("uid", "0"),
            ("gid", "0"),
            ("mtime", "1600000000"),
        ],
    );
    sh(&m.dir, "stat f >/dev/null");
    let copies = requests(&m, "COPY");
    sh(
        &m.dir,
        "chmod 644 f; chown 0:0 f; touch -m -d @1600000000 f",
    );
    assert_eq!(requests(&m, "COPY") - copies, 0, "nothing changed");
    sh(&m.dir, "chmod 600 f");
    assert_eq!(requests(&m, "COPY") - copies, 1);
    assert_eq!(
        b.metadata("f").get("mode").map(String::as_str),
        Some("33152")
    );
}

/// A file manager's copy through GIO: the file written and closed, then
/// its owner, mode and mtime set one after another.
fn gio_copy(m: &Mount) {
    sh(
        &m.dir,
        "printf 'copied bytes' > f; chown 4242:4343 f; chmod 600 f; touch -m -d @978307200 f",
    );
}

/// Waits (bounded) until `gio_copy`'s attributes are in S3, with its bytes.
fn assert_gio_copy_stored(b: &Bucket) {
    let stored = poll(Duration::from_secs(60), || {
        b.metadata("f").get("mtime").map(String::as_str) == Some("978307200")
    });
    assert!(stored, "never stored: {:?}", b.metadata("f"));
    let meta = b.metadata("f");
    assert_eq!(
        (
            meta["mode"].as_str(),
            meta["uid"].as_str(),
            meta["gid"].as_str()
        ),
        ("33152", "4242", "4343")
    );
    assert_eq!(b.get("f").unwrap(), b"copied bytes");
}

/// What GIO (a file manager's copy) does: the file written and closed,
/// then its owner, mode and mtime set one after another. One PUT and one
/// COPY, two versions, not a copy (and a version) per call.
#[test]
fn a_file_managers_copy_costs_one_put_and_one_copy() {
    let b = Bucket::new(server(), "giocopy", true);
    let m = Mount::new(&b, PINNED);
    let (puts, copies) = (requests(&m, "PUT"), requests(&m, "COPY"));
    gio_copy(&m);
    let shown = sh(&m.dir, "stat -c '%a %u %g %Y' f");
    assert_eq!(shown.trim(), "600 4242 4343 978307200", "shown at once");
    assert_gio_copy_stored(&b);
    assert_eq!(requests(&m, "PUT") - puts, 1);
    assert_eq!(requests(&m, "COPY") - copies, 1, "one copy for all three");
    assert_eq!(b.versions("f").len(), 2);
}

/// kill -9 right after those calls: the next mount stores them (the
/// journal holds them), the bytes untouched, nothing beside.
#[test]
fn owner_mode_and_mtime_set_after_a_close_survive_a_kill() {
    let b = Bucket::new(server(), "giokill", false);
    let m = Mount::new(&b, PINNED);
    gio_copy(&m);
    kill9(&m);
    m.restart();
    assert_gio_copy_stored(&b);
    assert_eq!(b.keys(""), ["f"]);
    let shown = sh(&m.dir, "stat -c '%a %u %g %Y' f");
    assert_eq!(shown.trim(), "600 4242 4343 978307200");
}

#[test]
fn a_missing_name_costs_one_list_and_no_head() {
    let b = Bucket::new(server(), "probe", false);
    let m = Mount::new(&b, PINNED);
    b.put("folder/doc.txt", b"d");
    sh(&m.dir, "stat folder >/dev/null");
    let (lists, heads) = (requests(&m, "LIST"), requests(&m, "HEAD"));
    for probe in [".Trash", ".hidden", ".directory"] {
        let e = std::fs::metadata(m.path(&format!("folder/{probe}"))).unwrap_err();
        assert_eq!(errno(e), libc::ENOENT);
    }
    assert_eq!(requests(&m, "LIST") - lists, 3, "one LIST per missing name");
    assert_eq!(requests(&m, "HEAD") - heads, 0, "no HEAD");
}

#[test]
fn the_mount_shows_as_fuse_s3fs_with_the_bucket_as_source() {
    let b = Bucket::new(server(), "mtab", false);
    let m = Mount::new(&b, "");
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let dir = m.dir.to_string_lossy().into_owned();
    let line = mounts
        .lines()
        .find(|l| l.split(' ').nth(1) == Some(dir.as_str()))
        .expect("mounted");
    let fields: Vec<&str> = line.split(' ').collect();
    assert_eq!(
        (fields[0], fields[2]),
        (b.name.as_str(), "fuse.s3fs"),
        "{line}"
    );
    let out = std::process::Command::new("findmnt")
        .args(["-n", "-t", "fuse.s3fs", "-o", "TARGET"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains(&dir));
}

/// The kernel keeps 64 reads in flight (FUSE's default is 12), as the
/// FUSE control filesystem shows for this mount's connection.
#[test]
fn the_kernel_keeps_64_requests_in_flight() {
    let b = Bucket::new(server(), "inflight", false);
    let m = Mount::new(&b, "");
    let ctl = std::path::Path::new("/sys/fs/fuse/connections");
    if std::fs::read_dir(ctl).map_or(true, |mut d| d.next().is_none()) {
        // fusectl is not mounted on every machine: mount it (root).
        let _ = std::process::Command::new("mount")
            .args(["-t", "fusectl", "none", "/sys/fs/fuse/connections"])
            .status();
    }
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(&m.dir).unwrap().dev();
    let minor = libc::minor(dev);
    let got = std::fs::read_to_string(ctl.join(minor.to_string()).join("max_background"))
        .unwrap_or_else(|e| panic!("connection {minor} of {}: {e}", m.dir.display()));
    assert_eq!(got.trim(), "64");
}

/// The kernel reads ahead 1 MiB at a time on a mount (as root), not the
/// 128 KiB FUSE takes from the block device default: a file read through
/// costs an eighth of the kernel requests.
#[test]
fn the_kernel_reads_ahead_a_mebibyte() {
    let b = Bucket::new(server(), "readahead", false);
    let m = Mount::new(&b, "");
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(&m.dir).unwrap().dev();
    let knob = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        libc::major(dev),
        libc::minor(dev)
    );
    let got = std::fs::read_to_string(&knob).unwrap_or_else(|e| panic!("{knob}: {e}"));
    assert_eq!(got.trim(), "1024");
}

/// `ls -l` asks every entry for security.selinux and the POSIX ACL: "not
/// supported" (which ls remembers per filesystem, so it stops asking),
/// while a missing `user.` name is "no such attribute" and the object's
/// own `user.s3.*` attributes read.
#[test]
fn extended_attributes_bucketfs_does_not_keep_are_not_supported() {
    let b = Bucket::new(server(), "xattrs", false);
    let m = Mount::new(&b, PINNED);
    b.put("f", b"data");
    let get = |name: &str| get_xattr(&m.path("f"), name);
    assert_eq!(get("security.selinux"), Err(libc::ENOTSUP));
    assert_eq!(get("system.nfs4_acl"), Err(libc::ENOTSUP));
    // POSIX ACLs are kept (tests/acl.rs): this file has none.
    assert_eq!(get("system.posix_acl_access"), Err(libc::ENODATA));
    assert_eq!(get("user.nope"), Err(libc::ENODATA));
    let etag = String::from_utf8(get("user.s3.etag").unwrap()).unwrap();
    assert!(etag.contains("8d777f385d3dfec8815d20f7496026dc"), "{etag}");
}

/// rsync writes each file to a temporary name, sets its mode and times and
/// renames it. Under writeback=async that costs one PUT per file, at its
/// final name, with its mode and mtime, and no copy or delete of a file.
#[test]
fn rsync_under_writeback_async_is_one_put_per_file() {
    let b = Bucket::new(server(), "rsync-async", false);
    let m = Mount::new(&b, &format!("{PINNED},writeback=async"));
    let src = tempfile::tempdir().unwrap();
    let files: Vec<(String, Vec<u8>)> = (0..20)
        .map(|i| {
            (
                format!("f{i:02}"),
                format!("file {i}\n").repeat(i + 1).into_bytes(),
            )
        })
        .collect();
    for (n, d) in &files {
        std::fs::write(src.path().join(n), d).unwrap();
    }
    sh(src.path(), "chmod 600 f03; touch -m -d @978307200 f03");
    let (puts, copies, deletes) = (
        requests(&m, "PUT"),
        requests(&m, "COPY"),
        requests(&m, "DELETE"),
    );
    let status = std::process::Command::new("rsync")
        .arg("-rt")
        .arg("--chmod=ugo=rwX")
        .arg("--perms")
        .arg(format!("{}/", src.path().display()))
        .arg(format!("{}/", m.dir.display()))
        .status()
        .unwrap();
    assert!(status.success(), "rsync into the mount");
    // The uploads run in the background: wait (bounded) for all of them.
    let landed = poll(std::time::Duration::from_secs(60), || {
        files
            .iter()
            .all(|(n, d)| b.get(n).as_deref() == Some(&d[..]))
    });
    assert!(landed, "in S3: {:?}", b.keys(""));
    let keys = b.keys("");
    assert_eq!(keys.len(), files.len(), "no temporary name left: {keys:?}");
    assert!(
        b.metadata("f03")
            .get("mtime")
            .is_some_and(|t| t.starts_with("978307200")),
        "{:?}",
        b.metadata("f03")
    );
    assert_eq!(requests(&m, "PUT") - puts, 20, "one PUT per file");
    assert_eq!(requests(&m, "DELETE") - deletes, 0, "no delete");
    // The directory's own times may cost a copy of its marker; a file
    // costs none.
    assert!(
        requests(&m, "COPY") - copies <= 2,
        "copies: {}",
        requests(&m, "COPY") - copies
    );
}
