//! `s3://`: every bucket of the account as a top-level directory, through
//! real FUSE mounts over moto, checked on the server with the S3 API:
//! buckets listed, made by mkdir and removed by rmdir, everything inside
//! a bucket as in a mount of that bucket alone, renames between buckets
//! EXDEV, nothing but buckets at the top, crash recovery into the right
//! bucket, status and url, another uid, names that look like options,
//! and `s3://BUCKET/PREFIX/` as the same as `BUCKET:/PREFIX`.
//!
//! moto's server is shared by the tests of this binary: each test only
//! looks at the buckets it made (the listing may hold others').

mod common;

use std::collections::HashSet;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const MIB: usize = 1024 * 1024;

fn top_names(m: &Mount) -> HashSet<String> {
    fs::read_dir(m.path(""))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// Whether a bucket of that name exists, asked of the server.
fn bucket_exists(c: &aws_sdk_s3::Client, name: &str) -> bool {
    rt().block_on(c.head_bucket().bucket(name).send()).is_ok()
}

fn server_buckets(c: &aws_sdk_s3::Client) -> HashSet<String> {
    rt().block_on(c.list_buckets().send())
        .unwrap()
        .buckets()
        .iter()
        .filter_map(|b| b.name().map(str::to_string))
        .collect()
}

#[test]
fn every_bucket_is_a_directory_and_works_as_a_mount_of_it_alone() {
    let a = Bucket::new(server(), "all-a", false);
    let b = Bucket::new(server(), "all-b", true);
    a.put("dir/hello.txt", b"hello from a");
    a.put("same.txt", b"a's");
    b.put("same.txt", b"b's");
    let m = Mount::with_source(&a, "s3://", "part_size=5M");
    let p = |bucket: &Bucket, rel: &str| m.path(&format!("{}/{rel}", bucket.name));

    let top = top_names(&m);
    assert!(top.contains(&a.name) && top.contains(&b.name), "{top:?}");
    for name in [&a.name, &b.name] {
        assert!(fs::metadata(m.path(name)).unwrap().is_dir());
    }
    assert_eq!(fs::read(p(&a, "dir/hello.txt")).unwrap(), b"hello from a");
    // The same key in two buckets: each its own bytes and inode number.
    assert_eq!(fs::read(p(&a, "same.txt")).unwrap(), b"a's");
    assert_eq!(fs::read(p(&b, "same.txt")).unwrap(), b"b's");
    let inos: HashSet<u64> = [
        m.path(""),
        m.path(&a.name),
        m.path(&b.name),
        p(&a, "same.txt"),
        p(&b, "same.txt"),
        p(&a, "dir"),
        p(&a, "dir/hello.txt"),
    ]
    .iter()
    .map(|x| fs::metadata(x).unwrap().ino())
    .collect();
    assert_eq!(inos.len(), 7, "inode numbers never meet across buckets");

    // Writes land in their own bucket only: small, and multipart.
    fs::write(p(&b, "new.txt"), b"new in b").unwrap();
    assert_eq!(b.get("new.txt").as_deref(), Some(&b"new in b"[..]));
    assert_eq!(a.get("new.txt"), None);
    let big = pattern(12 * MIB, 1);
    fs::write(p(&b, "big.bin"), &big).unwrap();
    assert_eq!(b.get("big.bin").map(|d| sha256(&d)), Some(sha256(&big)));

    // A rename within a bucket is a rename.
    fs::rename(p(&a, "dir/hello.txt"), p(&a, "moved.txt")).unwrap();
    assert_eq!(a.get("moved.txt").as_deref(), Some(&b"hello from a"[..]));
    assert_eq!(a.get("dir/hello.txt"), None);
    // Across buckets, or of a bucket itself: EXDEV, nothing changed.
    let e = fs::rename(p(&a, "moved.txt"), p(&b, "moved.txt")).unwrap_err();
    assert_eq!(errno(e), libc::EXDEV);
    let e = fs::rename(m.path(&a.name), m.path(&format!("{}-renamed", a.name))).unwrap_err();
    assert_eq!(errno(e), libc::EXDEV);
    assert!(a.get("moved.txt").is_some() && b.get("moved.txt").is_none());
    // So `mv` copies and removes, as between two disks.
    sh(
        &m.dir,
        &format!("mv {0}/moved.txt {1}/moved.txt", a.name, b.name),
    );
    assert_eq!(b.get("moved.txt").as_deref(), Some(&b"hello from a"[..]));
    // The name is gone at once; the object once `mv`'s reader of it is
    // released (the kernel may send that release after the unlink, and a
    // removed file's readers keep its bytes until they close). A delete
    // that timed out on a loaded machine is tried again 1, 2, 4... s
    // later: the bound leaves room for a few of those.
    assert!(!p(&a, "moved.txt").exists());
    assert!(
        poll(Duration::from_secs(90), || a.get("moved.txt").is_none()),
        "a/moved.txt still in the bucket after its reader closed"
    );

    // .versions works inside a (versioned) bucket.
    fs::write(p(&b, "same.txt"), b"b's again").unwrap();
    let vdir = p(&b, ".versions/same.txt");
    let versions: HashSet<Vec<u8>> = fs::read_dir(&vdir)
        .unwrap()
        .map(|e| fs::read(e.unwrap().path()).unwrap())
        .collect();
    let want: HashSet<Vec<u8>> = [b"b's".to_vec(), b"b's again".to_vec()].into();
    assert_eq!(versions, want);

    // Nothing but buckets at the top: EPERM, and nothing made anywhere.
    let e = fs::File::create(m.path("file.txt")).unwrap_err();
    assert_eq!(errno(e), libc::EPERM);
    let e = std::os::unix::fs::symlink("x", m.path("link")).unwrap_err();
    assert_eq!(errno(e), libc::EPERM);
    assert!(!server_buckets(&a.client).contains("file.txt"));
    assert!(!top_names(&m).contains("file.txt"));
}

#[test]
fn mkdir_makes_a_bucket_and_rmdir_removes_an_empty_one() {
    let seed = Bucket::new(server(), "mk-seed", false);
    let c = &seed.client;
    let m = Mount::with_source(&seed, "s3://", "");
    let name = format!("made-by-mkdir-{}", std::process::id());
    fs::create_dir(m.path(&name)).unwrap();
    assert!(bucket_exists(c, &name), "CreateBucket was made");
    assert!(top_names(&m).contains(&name));
    fs::write(m.path(&format!("{name}/f.txt")), b"in the new bucket").unwrap();
    let made = Bucket {
        name: name.clone(),
        ..seed.clone()
    };
    assert_eq!(
        made.get("f.txt").as_deref(),
        Some(&b"in the new bucket"[..])
    );
    // Not empty: ENOTEMPTY, and the bucket stays.
    let e = fs::remove_dir(m.path(&name)).unwrap_err();
    assert_eq!(errno(e), libc::ENOTEMPTY);
    assert!(bucket_exists(c, &name));
    fs::remove_file(m.path(&format!("{name}/f.txt"))).unwrap();
    fs::remove_dir(m.path(&name)).unwrap();
    assert!(!bucket_exists(c, &name), "DeleteBucket was made");
    assert!(!top_names(&m).contains(&name));
    // Made again, it is a new, empty bucket.
    fs::create_dir(m.path(&name)).unwrap();
    assert_eq!(fs::read_dir(m.path(&name)).unwrap().count(), 0);
    fs::remove_dir(m.path(&name)).unwrap();

    // An existing bucket: EEXIST.
    let e = fs::create_dir(m.path(&seed.name)).unwrap_err();
    assert_eq!(errno(e), libc::EEXIST);
    // Names S3 refuses, including ones that look like options: EINVAL,
    // and no bucket.
    for bad in ["-o", "--help", "-oallow_other", "Upper_Case", "ab", "a..b"] {
        let e = fs::create_dir(m.path(bad)).unwrap_err();
        assert_eq!(errno(e), libc::EINVAL, "{bad}");
        assert!(!bucket_exists(c, bad), "{bad}");
    }
    // A bucket whose name reads like an option is just a directory.
    let optlike = format!("allow-other.ro-{}", std::process::id());
    fs::create_dir(m.path(&optlike)).unwrap();
    fs::write(m.path(&format!("{optlike}/x")), b"x").unwrap();
    assert!(bucket_exists(c, &optlike));
    fs::remove_file(m.path(&format!("{optlike}/x"))).unwrap();
    fs::remove_dir(m.path(&optlike)).unwrap();
    assert!(!bucket_exists(c, &optlike));

    // A read-only s3:// mount makes and removes nothing.
    drop(m);
    let ro = Mount::with_source(&seed, "s3://", "ro");
    let e = fs::create_dir(ro.path(&name)).unwrap_err();
    assert_eq!(errno(e), libc::EROFS);
    assert!(!bucket_exists(c, &name));
}

#[test]
fn a_killed_s3_mount_recovers_each_file_into_its_own_bucket() {
    let a = Bucket::new(server(), "crash-a", false);
    let b = Bucket::new(server(), "crash-b", false);
    a.put("same.txt", b"old a");
    b.put("same.txt", b"old b");
    let m = Mount::with_source(&a, "s3://", "part_size=5M");
    let p = |bucket: &Bucket, rel: &str| m.path(&format!("{}/{rel}", bucket.name));
    // Half written when the daemon dies: an overwrite in a (large enough
    // to stream parts) and a new file in b, both still open.
    let data_a = pattern(12 * MIB, 3);
    let data_b = pattern(300_000, 4);
    let mut fa = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(p(&a, "same.txt"))
        .unwrap();
    fa.write_all(&data_a).unwrap();
    let mut fb = fs::File::create(p(&b, "fresh.bin")).unwrap();
    fb.write_all(&data_b).unwrap();
    kill9(&m);
    drop((fa, fb));
    assert_eq!(a.get("same.txt").as_deref(), Some(&b"old a"[..]));
    assert_eq!(b.get("fresh.bin"), None);

    m.restart();
    let limit = Duration::from_secs(60);
    assert_lands(&a, "same.txt", &data_a, limit, "a's overwrite");
    assert_lands(&b, "fresh.bin", &data_b, limit, "b's new file");
    // Each into its own bucket, nothing into the other, nothing beside.
    assert_eq!(b.get("same.txt").as_deref(), Some(&b"old b"[..]));
    assert_eq!(a.get("fresh.bin"), None);
    assert!(recovered_keys(&a).is_empty() && recovered_keys(&b).is_empty());
    assert!(
        poll(limit, || a.open_multipart_uploads() == 0),
        "the dead daemon's multipart upload was aborted"
    );
    assert_eq!(sha256_file(&p(&b, "fresh.bin")), sha256(&data_b));

    // The staging of a bucket is the same whether it is mounted alone or
    // under s3://: what an s3:// mount left, a mount of that bucket alone
    // recovers (and only that bucket's).
    let data = pattern(200_000, 5);
    let mut f = fs::File::create(p(&b, "second.bin")).unwrap();
    f.write_all(&data).unwrap();
    let mut g = fs::File::create(p(&a, "elsewhere.bin")).unwrap();
    g.write_all(b"a's pending file").unwrap();
    kill9(&m);
    drop((f, g));
    m.restart_as(&b.name);
    assert_lands(&b, "second.bin", &data, limit, "recovered by a mount of b");
    assert_eq!(a.get("second.bin"), None);
    assert_eq!(b.get("elsewhere.bin"), None, "a's file never goes to b");
    assert_eq!(a.get("elsewhere.bin"), None, "a is not mounted");
    // The s3:// mount again: a's file lands in a.
    m.unmount();
    m.restart_as("s3://");
    assert_lands(&a, "elsewhere.bin", b"a's pending file", limit, "a's file");
    assert_eq!(b.get("elsewhere.bin"), None);
}

#[test]
fn status_and_url_answer_for_every_bucket() {
    let a = Bucket::new(server(), "url-a", true);
    a.put("dir/r.pdf", b"first");
    a.put("dir/r.pdf", b"second");
    let m = Mount::with_source(&a, "s3://", "");
    let file = m.path(&format!("{}/dir/r.pdf", a.name));
    assert_eq!(fs::read(&file).unwrap(), b"second");
    let out = command().arg("status").arg(&m.dir).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("s3://") && text.contains(&a.name), "{text}");
    assert!(requests(&m, "LIST_BUCKETS") > 0, "{text}");
    assert!(requests(&m, "GET") > 0, "the bucket's requests are counted");
    let url = |path: &std::path::Path| {
        let out = command()
            .arg("url")
            .arg(path)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let fetch = |link: &str| {
        let got = Command::new(python())
            .args([
                "-c",
                "import sys, urllib.request; sys.stdout.buffer.write(urllib.request.urlopen(sys.argv[1]).read())",
                link,
            ])
            .env_clear()
            .output()
            .unwrap();
        assert!(
            got.status.success(),
            "{}",
            String::from_utf8_lossy(&got.stderr)
        );
        got.stdout
    };
    assert_eq!(fetch(&url(&file)), b"second");
    // An old version: the URL names its version id.
    let vdir = m.path(&format!("{}/dir/.versions/r.pdf", a.name));
    let first = fs::read_dir(&vdir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|v| fs::read(v).unwrap() == b"first")
        .expect("the first version is listed");
    let link = url(&first);
    assert!(link.contains("versionId="), "{link}");
    assert_eq!(fetch(&link), b"first");
    // A bucket is no file: one line, non-zero.
    let out = command().arg("url").arg(m.path(&a.name)).output().unwrap();
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim().lines().count(),
        1
    );
}

#[test]
fn another_uid_sees_the_buckets_and_is_refused_what_modes_refuse() {
    let a = Bucket::new(server(), "uid-a", false);
    let m = Mount::with_source(&a, "s3://", "allow_other");
    // The tests' temp dirs are 0700: let uid 1000 reach the mountpoint.
    let parent = m.dir.parent().unwrap();
    fs::set_permissions(parent, fs::Permissions::from_mode(0o755)).unwrap();
    let bdir = m.path(&a.name);
    fs::write(bdir.join("secret"), b"root only").unwrap();
    fs::set_permissions(bdir.join("secret"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(bdir.join("public"), b"for all").unwrap();
    let d = m.dir.display();
    let (ok, err) = as_user(
        1000,
        &format!("ls -l {d} >/dev/null && ls -l {d}/{} >/dev/null", a.name),
    );
    assert!(ok, "{err}");
    let (ok, err) = as_user(1000, &format!("cat {d}/{}/secret", a.name));
    assert!(!ok && err.contains("Permission denied"), "{err}");
    let (ok, _) = as_user(1000, &format!("cat {d}/{}/public", a.name));
    assert!(ok);
    let name = format!("uid1000-{}", std::process::id());
    let (ok, err) = as_user(1000, &format!("mkdir {d}/{name}"));
    assert!(!ok && err.contains("Permission denied"), "{err}");
    assert!(!bucket_exists(&a.client, &name));
    let (ok, err) = as_user(1000, &format!("touch {d}/{}/mine", a.name));
    assert!(!ok && err.contains("Permission denied"), "{err}");
    assert_eq!(a.get("mine"), None);
}

#[test]
fn s3_url_sources_are_bucket_and_prefix_even_for_a_bucket_named_status() {
    let b = Bucket::new(server(), "src-prefix", false);
    b.put("photos/2024/a.jpg", b"jpeg");
    b.put("other.txt", b"x");
    let m = Mount::with_source(&b, &format!("s3://{}/photos/", b.name), "");
    assert_eq!(fs::read(m.path("2024/a.jpg")).unwrap(), b"jpeg");
    assert!(!m.path("other.txt").exists());
    fs::write(m.path("new.jpg"), b"n").unwrap();
    assert_eq!(b.get("photos/new.jpg").as_deref(), Some(&b"n"[..]));
    drop(m);

    // A bucket named like a subcommand, in the form mount(8) and fstab
    // use (options after the positionals): no `--` needed.
    rt().block_on(b.client.create_bucket().bucket("status").send())
        .unwrap();
    let status = Bucket {
        name: "status".into(),
        ..b.clone()
    };
    status.put("inside.txt", b"in the bucket named status");
    let (tmp, mp) = scratch_mountpoint();
    let opts = base_options(&b.endpoint, &tmp.path().join("c"), &tmp.path().join("log"));
    let out = command()
        .arg("s3://status/")
        .arg(&mp)
        .args(["-o", &opts])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let read = fs::read(mp.join("inside.txt"));
    assert!(Command::new("umount").arg(&mp).status().unwrap().success());
    assert_eq!(read.unwrap(), b"in the bucket named status");
}

#[test]
fn buckets_another_client_makes_or_removes_come_and_go() {
    let seed = Bucket::new(server(), "other-seed", false);
    let m = Mount::with_source(&seed, "s3://", "metadata_ttl=0");
    let name = format!("made-elsewhere-{}", std::process::id());
    rt().block_on(seed.client.create_bucket().bucket(&name).send())
        .unwrap();
    let other = Bucket {
        name: name.clone(),
        ..seed.clone()
    };
    other.put("f.txt", b"theirs");
    assert!(top_names(&m).contains(&name));
    assert_eq!(
        fs::read(m.path(&format!("{name}/f.txt"))).unwrap(),
        b"theirs"
    );
    other.delete("f.txt");
    rt().block_on(other.client.delete_bucket().bucket(&name).send())
        .unwrap();
    assert!(!top_names(&m).contains(&name));
    let e = fs::metadata(m.path(&name)).unwrap_err();
    assert_eq!(
        errno(e),
        libc::ENOENT,
        "gone once another client removed it"
    );
}

/// A bucket the top level has not listed (made since the listing, or
/// another account's, which ListBuckets never shows) is found by its name.
#[test]
fn a_bucket_not_listed_is_found_by_its_name() {
    let seed = Bucket::new(server(), "unlisted-seed", false);
    let m = Mount::with_source(&seed, "s3://", "metadata_ttl=600");
    assert!(top_names(&m).contains(&seed.name), "listed and remembered");
    let name = format!("made-after-listing-{}", std::process::id());
    rt().block_on(seed.client.create_bucket().bucket(&name).send())
        .unwrap();
    let other = Bucket {
        name: name.clone(),
        ..seed.clone()
    };
    other.put("f.txt", b"found by name");
    assert!(
        !top_names(&m).contains(&name),
        "not in the remembered listing"
    );
    assert_eq!(
        fs::read(m.path(&format!("{name}/f.txt"))).unwrap(),
        b"found by name"
    );
    // A name that is no bucket at all: ENOENT.
    let e = fs::metadata(m.path(&format!("no-such-bucket-{}", std::process::id()))).unwrap_err();
    assert_eq!(errno(e), libc::ENOENT);
}
