//! Through a real FUSE mount over a real local S3 server: what a user does
//! with ls, cat, cp, mv, chmod... and what lands in the bucket, checked
//! with the S3 API directly.

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;

fn mount(tag: &str) -> Mount {
    let b = Bucket::new(server(), tag, false);
    Mount::new(&b, "")
}

#[test]
fn echo_append_cat_and_the_object_is_in_the_bucket() {
    let m = mount("echo");
    fs::write(m.path("f.txt"), b"hello\n").unwrap();
    assert_eq!(
        m.bucket.get("f.txt").as_deref(),
        Some(&b"hello\n"[..]),
        "after close the object is in S3"
    );
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(m.path("f.txt"))
        .unwrap();
    f.write_all(b"world\n").unwrap();
    drop(f);
    assert_eq!(fs::read(m.path("f.txt")).unwrap(), b"hello\nworld\n");
    assert_eq!(
        m.bucket.get("f.txt").as_deref(),
        Some(&b"hello\nworld\n"[..])
    );
    sh(&m.dir, "echo replaced > f.txt");
    assert_eq!(m.bucket.get("f.txt").as_deref(), Some(&b"replaced\n"[..]));
    // An empty file exists as soon as it is created.
    let f = fs::File::create(m.path("empty")).unwrap();
    assert_eq!(fs::metadata(m.path("empty")).unwrap().len(), 0);
    drop(f);
    assert_eq!(m.bucket.get("empty").as_deref(), Some(&b""[..]));
}

#[test]
fn cp_in_and_out_keeps_bytes_across_the_multipart_threshold() {
    let m = mount("cp");
    let src = tempfile::tempdir().unwrap();
    for (name, len) in [
        ("small", 1000usize),
        ("part", 8 * 1024 * 1024),
        ("big", 21 * 1024 * 1024 + 7),
    ] {
        let data = pattern(len, len as u64);
        let local = src.path().join(name);
        fs::write(&local, &data).unwrap();
        sh(&m.dir, &format!("cp {} {}", local.display(), name));
        assert_eq!(
            sha256(&m.bucket.get(name).unwrap()),
            sha256(&data),
            "{name} in S3"
        );
        sh(
            &m.dir,
            &format!("cp {name} {}/back-{name}", src.path().display()),
        );
        assert_eq!(
            sha256_file(&src.path().join(format!("back-{name}"))),
            sha256(&data),
            "{name} read back"
        );
    }
    // A streaming upload that close() does not use (the file ended up a
    // single part) is aborted in the background: on a loaded machine that
    // abort can still be in flight here.
    assert!(
        poll(Duration::from_secs(30), || m
            .bucket
            .open_multipart_uploads()
            == 0),
        "multipart uploads left open: {}",
        m.bucket.open_multipart_uploads()
    );
}

#[test]
fn objects_from_other_clients_show_right() {
    let b = Bucket::new(server(), "foreign", false);
    b.put("plain.txt", b"12345");
    b.put_meta(
        "owned",
        b"x",
        &[
            ("mode", "33216"),
            ("uid", "1234"),
            ("gid", "99"),
            ("mtime", "1600000000"),
        ],
    );
    b.put("implicit/dir/file", b"abc");
    for name in [
        "with space.txt",
        "ünïcødé.txt",
        "a+b.txt",
        "100%.txt",
        "hash#tag.txt",
    ] {
        b.put(&format!("odd/{name}"), name.as_bytes());
    }
    let m = Mount::new(&b, "");
    let md = fs::metadata(m.path("plain.txt")).unwrap();
    assert_eq!((md.len(), md.mode() & 0o7777), (5, 0o644));
    let md = fs::metadata(m.path("owned")).unwrap();
    assert_eq!(
        (md.mode() & 0o7777, md.uid(), md.gid(), md.mtime()),
        (0o700, 1234, 99, 1_600_000_000)
    );
    assert!(fs::metadata(m.path("implicit/dir")).unwrap().is_dir());
    assert_eq!(fs::read(m.path("implicit/dir/file")).unwrap(), b"abc");
    let mut names: Vec<String> = fs::read_dir(m.path("odd"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let mut want = vec![
        "100%.txt",
        "a+b.txt",
        "hash#tag.txt",
        "with space.txt",
        "ünïcødé.txt",
    ];
    want.sort();
    assert_eq!(names, want);
    for n in want {
        assert_eq!(fs::read(m.path(&format!("odd/{n}"))).unwrap(), n.as_bytes());
    }
    let ls = sh(&m.dir, "ls -la");
    assert!(ls.contains("plain.txt") && ls.contains("implicit"), "{ls}");
}

#[test]
fn mkdir_rmdir_and_enotempty() {
    let m = mount("dirs");
    fs::create_dir(m.path("d")).unwrap();
    assert_eq!(m.bucket.keys("d"), vec!["d/"], "mkdir writes a marker");
    assert_eq!(
        errno(fs::create_dir(m.path("d")).unwrap_err()),
        libc::EEXIST
    );
    fs::write(m.path("d/f"), b"x").unwrap();
    assert_eq!(
        errno(fs::remove_dir(m.path("d")).unwrap_err()),
        libc::ENOTEMPTY
    );
    fs::remove_file(m.path("d/f")).unwrap();
    assert_eq!(m.bucket.get("d/f"), None);
    fs::remove_dir(m.path("d")).unwrap();
    assert!(m.bucket.keys("d").is_empty());
    assert_eq!(errno(fs::metadata(m.path("d")).unwrap_err()), libc::ENOENT);
}

#[test]
fn mv_of_a_file_and_of_a_tree() {
    let m = mount("mv");
    fs::create_dir_all(m.path("a/b/c")).unwrap();
    let big = pattern(9 * 1024 * 1024, 3);
    fs::write(m.path("a/b/c/deep"), &big).unwrap();
    fs::write(m.path("a/top"), b"top").unwrap();
    sh(&m.dir, "mv a/top a/top2");
    assert_eq!(m.bucket.get("a/top"), None);
    assert_eq!(m.bucket.get("a/top2").as_deref(), Some(&b"top"[..]));
    sh(&m.dir, "mv a z");
    assert!(m.bucket.keys("a/").is_empty(), "{:?}", m.bucket.keys("a/"));
    let mut keys = m.bucket.keys("z/");
    keys.sort();
    assert_eq!(keys, vec!["z/", "z/b/", "z/b/c/", "z/b/c/deep", "z/top2"]);
    assert_eq!(sha256_file(&m.path("z/b/c/deep")), sha256(&big));
    assert_eq!(errno(fs::metadata(m.path("a")).unwrap_err()), libc::ENOENT);
    // Rename over an existing file replaces it.
    fs::write(m.path("x"), b"new").unwrap();
    fs::write(m.path("y"), b"old").unwrap();
    fs::rename(m.path("x"), m.path("y")).unwrap();
    assert_eq!(m.bucket.get("y").as_deref(), Some(&b"new"[..]));
    assert_eq!(m.bucket.get("x"), None);
}

#[test]
fn chmod_chown_touch_are_kept_across_a_remount() {
    let m = mount("meta");
    fs::write(m.path("f"), b"data").unwrap();
    fs::create_dir(m.path("d")).unwrap();
    fs::set_permissions(m.path("f"), fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::chown(m.path("f"), Some(1000), Some(1001)).unwrap();
    fs::set_permissions(m.path("d"), fs::Permissions::from_mode(0o700)).unwrap();
    sh(&m.dir, "touch -d '2021-02-03 04:05:06Z' f");
    // Set right after the write: deferred and merged into one copy, which
    // lands about a second later.
    let stored = poll(std::time::Duration::from_secs(60), || {
        m.bucket.metadata("f").get("mtime").map(String::as_str) == Some("1612325106")
    });
    assert!(stored, "{:?}", m.bucket.metadata("f"));
    let meta = m.bucket.metadata("f");
    assert_eq!(
        meta.get("mode").map(String::as_str),
        Some("33184"),
        "{meta:?}"
    ); // 0100640
    assert_eq!(meta.get("uid").map(String::as_str), Some("1000"));
    assert_eq!(meta.get("mtime").map(String::as_str), Some("1612325106"));
    m.remount();
    let md = fs::metadata(m.path("f")).unwrap();
    assert_eq!(
        (md.mode() & 0o7777, md.uid(), md.gid(), md.mtime()),
        (0o640, 1000, 1001, 1_612_325_106)
    );
    assert_eq!(fs::metadata(m.path("d")).unwrap().mode() & 0o7777, 0o700);
    assert_eq!(fs::read(m.path("f")).unwrap(), b"data");
}

#[test]
fn symlink_truncate_rm_and_df() {
    let m = mount("misc");
    fs::write(m.path("target"), b"0123456789").unwrap();
    std::os::unix::fs::symlink("target", m.path("link")).unwrap();
    assert_eq!(
        fs::read_link(m.path("link")).unwrap().to_str(),
        Some("target")
    );
    assert_eq!(fs::read(m.path("link")).unwrap(), b"0123456789");
    assert_eq!(m.bucket.get("link").as_deref(), Some(&b"target"[..]));
    sh(&m.dir, "truncate -s 4 target");
    assert_eq!(m.bucket.get("target").as_deref(), Some(&b"0123"[..]));
    sh(&m.dir, "truncate -s 6 target");
    assert_eq!(m.bucket.get("target").as_deref(), Some(&b"0123\0\0"[..]));
    assert_eq!(fs::read(m.path("target")).unwrap(), b"0123\0\0");
    fs::remove_file(m.path("link")).unwrap();
    assert_eq!(m.bucket.get("link"), None);
    assert_eq!(
        errno(fs::hard_link(m.path("target"), m.path("hard")).unwrap_err()),
        libc::EPERM
    );
    let df = sh(&m.dir, "df -P . | tail -1");
    let avail: u64 = df.split_whitespace().nth(3).unwrap().parse().unwrap();
    assert!(avail >= 1 << 40, "df reports a large free size: {df}");
}

#[test]
fn a_large_directory_lists_completely() {
    let b = Bucket::new(server(), "many", false);
    const N: usize = 2100; // three pages of ListObjectsV2
    let names: Vec<String> = (0..N).map(|i| format!("big/f{i:05}")).collect();
    common::rt().block_on(async {
        let c = common::client(&b.endpoint);
        let puts = names.iter().map(|k| {
            let c = c.clone();
            let bucket = b.name.clone();
            async move {
                c.put_object()
                    .bucket(bucket)
                    .key(k)
                    .body(vec![1u8].into())
                    .send()
                    .await
                    .unwrap()
            }
        });
        // A bounded number in flight: 2,100 connections at once time out
        // on a loaded machine.
        use futures::StreamExt;
        futures::stream::iter(puts)
            .buffer_unordered(16)
            .collect::<Vec<_>>()
            .await;
    });
    // A TTL no machine outlasts here: the counts must not depend on speed.
    let m = Mount::new(&b, "metadata_ttl=3600");
    let out = sh(&m.dir, "ls -l big | grep -c '^-'");
    assert_eq!(out.trim(), N.to_string());
    // One LIST per 1,000 entries (and one to look `big` up); each entry's
    // metadata is read at most once (and `big` looked up once).
    assert!(requests(&m, "LIST") <= 4, "LIST {}", requests(&m, "LIST"));
    let heads = requests(&m, "HEAD");
    assert!(heads <= N as u64 + 2, "HEAD {heads}");
    let mut listed: Vec<String> = fs::read_dir(m.path("big"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    listed.sort();
    assert_eq!(listed.len(), N);
    assert_eq!(listed[0], "f00000");
    assert_eq!(listed[N - 1], format!("f{:05}", N - 1));
}

#[test]
fn errors_have_the_right_errno() {
    let m = mount("errno");
    assert_eq!(
        errno(fs::read(m.path("missing")).unwrap_err()),
        libc::ENOENT
    );
    assert_eq!(
        errno(fs::write(m.path(&"n".repeat(256)), b"x").unwrap_err()),
        libc::ENAMETOOLONG
    );
    // Four components of 255 bytes make a key over S3's 1,024 bytes.
    let mut p = String::new();
    let mut last = 0;
    for i in 0..5 {
        p = if p.is_empty() {
            "d".repeat(250) + &i.to_string()
        } else {
            format!("{p}/{}{i}", "d".repeat(250))
        };
        match fs::create_dir(m.path(&p)) {
            Ok(()) => {}
            Err(e) => {
                last = errno(e);
                break;
            }
        }
    }
    assert_eq!(last, libc::ENAMETOOLONG);
    fs::write(m.path("f"), b"x").unwrap();
    assert_eq!(errno(fs::read_dir(m.path("f")).unwrap_err()), libc::ENOTDIR);
    assert_eq!(
        errno(fs::remove_dir(m.path("f")).unwrap_err()),
        libc::ENOTDIR
    );

    let ro = Mount::new(&m.bucket, "ro");
    assert_eq!(
        errno(fs::write(ro.path("new"), b"x").unwrap_err()),
        libc::EROFS
    );
    assert_eq!(
        errno(fs::write(ro.path("f"), b"y").unwrap_err()),
        libc::EROFS
    );
    assert_eq!(
        errno(fs::create_dir(ro.path("d")).unwrap_err()),
        libc::EROFS
    );
    assert_eq!(fs::read(ro.path("f")).unwrap(), b"x");
}

#[test]
fn real_tools_cp_r_tar_rsync_round_trip() {
    let m = mount("tools");
    let src = tempfile::tempdir().unwrap();
    let tree = src.path().join("tree");
    for (i, rel) in ["a.txt", "sub/b.bin", "sub/deeper/c", "sub/deeper/d e"]
        .iter()
        .enumerate()
    {
        let p = tree.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, pattern(1000 + i * 100_000, i as u64)).unwrap();
    }
    let sum =
        |dir: &std::path::Path| sh(dir, "find . -type f -print0 | sort -z | xargs -0 sha256sum");
    let want = sum(&tree);
    sh(&m.dir, &format!("cp -r {} cp-copy", tree.display()));
    assert_eq!(sum(&m.path("cp-copy")), want);
    sh(
        &m.dir,
        &format!(
            "mkdir tar-copy && tar -C {} -cf - . | tar -C tar-copy -xf -",
            tree.display()
        ),
    );
    assert_eq!(sum(&m.path("tar-copy")), want);
    sh(&m.dir, &format!("rsync -a {}/ rsync-copy/", tree.display()));
    assert_eq!(sum(&m.path("rsync-copy")), want);
    let back = src.path().join("back");
    sh(&m.dir, &format!("rsync -a rsync-copy/ {}/", back.display()));
    assert_eq!(sum(&back), want);
    assert_eq!(
        sha256(&m.bucket.get("tar-copy/sub/deeper/d e").unwrap()),
        sha256(&fs::read(tree.join("sub/deeper/d e")).unwrap())
    );
}

#[test]
fn stat_after_the_server_is_gone_fails_in_bounded_time() {
    let own = Server::start();
    let b = Bucket::new(&own, "gone", false);
    b.put("known", b"x");
    let m = Mount::new(&b, "timeout=1,retries=1,metadata_ttl=0");
    assert_eq!(fs::read(m.path("known")).unwrap(), b"x");
    own.kill();
    let (tx, rx) = std::sync::mpsc::channel();
    let p = m.path("other");
    std::thread::spawn(move || {
        let r = fs::metadata(&p).map(|_| ()).map_err(errno);
        let _ = tx.send(r);
    });
    let r = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("stat must not hang");
    assert_eq!(r, Err(libc::EIO));
}

#[test]
fn mount_failures_exit_non_zero_with_one_line_and_leave_nothing_mounted() {
    let (tmp, mp) = scratch_mountpoint();
    let ep = &server().endpoint;
    let dead = format!("http://127.0.0.1:{}", free_port());
    let full = tmp.path().join("full");
    fs::create_dir(&full).unwrap();
    fs::write(full.join("precious"), b"x").unwrap();
    // An HTTP server that is not S3.
    let not_s3_port = free_port();
    let mut not_s3 = std::process::Command::new("python3")
        .args([
            "-m",
            "http.server",
            "--bind",
            "127.0.0.1",
            &not_s3_port.to_string(),
        ])
        .current_dir(tmp.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(30), "http.server", || {
        std::net::TcpStream::connect(("127.0.0.1", not_s3_port)).is_ok()
    });
    let not_s3_ep = format!("http://127.0.0.1:{not_s3_port}");
    let cases = [
        (
            format!("endpoint={not_s3_ep},path_style,retries=0"),
            "b".to_string(),
            mp.clone(),
            "S3 endpoint",
        ),
        (
            format!("endpoint={ep},path_style"),
            "b".to_string(),
            full.clone(),
            "not empty",
        ),
        (
            format!("endpoint={ep},path_style"),
            "no-such-bucket-here".to_string(),
            mp.clone(),
            "does not exist",
        ),
        (
            format!("endpoint={dead},path_style,timeout=1,retries=0"),
            "b".into(),
            mp.clone(),
            "cannot reach",
        ),
        (
            format!("endpoint={ep},path_style,bogus_option"),
            "b".into(),
            mp.clone(),
            "unknown option",
        ),
        (
            format!("endpoint={ep},path_style,part_size=1M"),
            "b".into(),
            mp.clone(),
            "option part_size: 1M is outside 5M..=5G",
        ),
        (
            format!("endpoint={ep},path_style,block_size=8M,mem_cache=4M"),
            "b".into(),
            mp.clone(),
            "option mem_cache",
        ),
        (
            format!("endpoint={ep},path_style"),
            "b".into(),
            tmp.path().join("nope"),
            "mountpoint",
        ),
    ];
    for (opts, bucket, dir, word) in cases {
        let start = Instant::now();
        let out = command()
            .args(["-o", &opts, &bucket])
            .arg(&dir)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{opts}: should fail");
        assert!(err.contains(word), "{opts}: {err:?} should say {word:?}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err:?}");
        assert!(!is_mounted(&dir));
        assert!(start.elapsed() < Duration::from_secs(60));
    }
    let _ = not_s3.kill();
    let _ = not_s3.wait();
    assert_eq!(fs::read(full.join("precious")).unwrap(), b"x");
}

#[test]
fn wrong_credentials_are_one_clear_line_and_nothing_mounted() {
    // moto takes any key: a proxy answers as S3 does to an unknown one.
    let b = Bucket::new(server(), "denied", false);
    let proxy = common::proxy::Proxy::start(server().endpoint.trim_start_matches("http://"));
    proxy.inject("", 1000, common::proxy::Fault::Status(403));
    let (_tmp, mp) = scratch_mountpoint();
    let opts = format!("endpoint={},path_style,retries=0", proxy.endpoint);
    let out = command()
        .args(["-o", &opts, &b.name])
        .arg(&mp)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("denied") && err.contains("credentials"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(!err.contains(SECRET_KEY));
    assert!(!is_mounted(&mp));
}

#[test]
fn no_credentials_at_all_is_said_in_one_line() {
    let b = Bucket::new(server(), "nocreds", false);
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    fs::create_dir(&home).unwrap();
    let (_mp_tmp, mp) = scratch_mountpoint();
    let opts = format!(
        "endpoint={},path_style,cache_dir={}",
        b.endpoint,
        tmp.path().join("cache").display()
    );
    for (extra, profile) in [("", "default"), (",profile=work", "work")] {
        // An empty HOME, no AWS_* variables, and no instance metadata
        // lookup: no request leaves 127.0.0.1.
        let out = command()
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .env("HOME", &home)
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .args(["-o", &format!("{opts}{extra}"), &b.name])
            .arg(&mp)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{extra}: mounted without credentials"
        );
        assert_eq!(
            err.trim(),
            format!(
                "bucketfs: no credentials found (looked in: environment \
                 AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, profile \"{profile}\" in \
                 ~/.aws/credentials and ~/.aws/config, web identity, container and instance \
                 metadata); set them or use -o passwd_file="
            )
        );
        assert!(!is_mounted(&mp));
    }
}

#[test]
fn background_mount_returns_once_live_and_serves() {
    let b = Bucket::new(server(), "bg", false);
    b.put("hello", b"from s3");
    let (tmp, mp) = scratch_mountpoint();
    let opts = base_options(
        &b.endpoint,
        &tmp.path().join("cache"),
        &tmp.path().join("log"),
    );
    let out = command()
        .args(["-o", &opts, &b.name])
        .arg(&mp)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success());
    // It says where the daemon logs, in one line.
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.trim(),
        format!("bucketfs: logging to {}", tmp.path().join("log").display()),
    );
    // Live the moment the command returned: no waiting.
    assert!(is_mounted(&mp));
    assert_eq!(fs::read(mp.join("hello")).unwrap(), b"from s3");
    fs::write(mp.join("new"), b"n").unwrap();
    assert!(
        std::process::Command::new("umount")
            .arg(&mp)
            .status()
            .unwrap()
            .success()
    );
    assert_eq!(b.get("new").as_deref(), Some(&b"n"[..]));
    // A second mount on a live mountpoint is refused.
    let status = command()
        .args(["-o", &opts, &b.name])
        .arg(&mp)
        .stdin(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let again = command()
        .args(["-o", &opts, &b.name])
        .arg(&mp)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already"));
    assert!(
        std::process::Command::new("umount")
            .arg(&mp)
            .status()
            .unwrap()
            .success()
    );
}

#[test]
fn mtime_of_a_written_file_is_now_and_size_is_current_while_open() {
    let m = mount("open");
    let before = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut f = fs::File::create(m.path("growing")).unwrap();
    f.write_all(&[7u8; 5000]).unwrap();
    assert_eq!(
        fs::metadata(m.path("growing")).unwrap().len(),
        5000,
        "stat sees the current size"
    );
    assert_eq!(
        fs::read(m.path("growing")).unwrap().len(),
        5000,
        "another handle sees the data"
    );
    drop(f);
    let md = fs::metadata(m.path("growing")).unwrap();
    assert!(md.mtime() as u64 >= before - 1);
}

fn get_requests(m: &Mount) -> u64 {
    requests(m, "GET")
}

#[test]
fn a_cached_file_is_read_again_without_a_get_even_after_a_remount() {
    // A TTL no machine outlasts: the GET counts must not depend on whether
    // the attributes expired between two reads on a loaded machine.
    let b = Bucket::new(server(), "cache", false);
    let m = Mount::new(&b, "metadata_ttl=3600");
    let data = pattern(3 * 1024 * 1024 + 5, 9);
    m.bucket.put("f", &data);
    assert_eq!(sha256_file(&m.path("f")), sha256(&data));
    let first = get_requests(&m);
    assert!(first >= 1);
    // Drop the kernel's page cache so the reads reach bucketfs again.
    sh(&m.dir, "echo 3 > /proc/sys/vm/drop_caches");
    assert_eq!(sha256_file(&m.path("f")), sha256(&data));
    assert_eq!(get_requests(&m), first, "memory hit: no GET");
    m.remount();
    assert_eq!(sha256_file(&m.path("f")), sha256(&data));
    assert_eq!(get_requests(&m), 0, "disk hit after a remount: no GET");
}

#[test]
fn stat_suggests_a_read_block_as_the_io_size_and_cat_reads_right() {
    // `cp`, `cat` and the rest of coreutils size their buffer by
    // `st_blksize`: the read block (so reads do not straddle two blocks),
    // at most the 1 MiB the kernel sends in one request.
    let b = Bucket::new(server(), "blksize", false);
    let data = pattern(3 * 1024 * 1024 + 77, 5);
    b.put("f", &data);
    for (opts, want) in [
        ("", "1048576"),
        ("block_size=256K", "262144"),
        ("block_size=4M", "1048576"),
    ] {
        let m = Mount::new(&b, opts);
        for name in ["f", "."] {
            let out = sh(&m.dir, &format!("stat -c %o {name}"));
            assert_eq!(out.trim(), want, "{opts:?}: st_blksize of {name}");
        }
        fs::write(m.path("new"), b"x").unwrap();
        assert_eq!(
            fs::metadata(m.path("new")).unwrap().blksize().to_string(),
            want,
            "{opts:?}: a file just written"
        );
        let out = sh(&m.dir, "cat f | sha256sum");
        assert!(out.starts_with(&sha256(&data)), "{opts:?}: {out}");
    }
}

#[test]
fn readahead_0_reads_sequentially_without_read_ahead() {
    let b = Bucket::new(server(), "noahead", false);
    let data = pattern(5 * 1024 * 1024 + 123, 7);
    b.put("f", &data);
    let m = Mount::new(&b, "readahead=0,metadata_ttl=3600");
    assert_eq!(sha256_file(&m.path("f")), sha256(&data));
    // Each block fetched once, none ahead of the reads.
    assert_eq!(get_requests(&m), 6);
    // A partial read in the middle, then on to the end.
    let out = sh(&m.dir, "tail -c 1000 f | sha256sum");
    assert!(
        out.starts_with(&sha256(&data[data.len() - 1000..])),
        "{out}"
    );
}

#[test]
fn a_changed_object_is_never_served_from_stale_blocks() {
    let b = Bucket::new(server(), "stale", false);
    b.put("f", &pattern(2 * 1024 * 1024, 1));
    let m = Mount::new(&b, "metadata_ttl=0");
    assert_eq!(
        sha256_file(&m.path("f")),
        sha256(&pattern(2 * 1024 * 1024, 1))
    );
    let new = pattern(2 * 1024 * 1024, 2);
    b.put("f", &new);
    assert_eq!(sha256_file(&m.path("f")), sha256(&new));
}

#[test]
fn a_fork_while_writing_uploads_nothing_half_written() {
    let m = mount("fork");
    let mut f = fs::File::create(m.path("f")).unwrap();
    f.write_all(b"first half ").unwrap();
    // The child inherits the descriptor and closes it at exec: a FUSE flush
    // from another process.
    assert!(
        std::process::Command::new("true")
            .status()
            .unwrap()
            .success()
    );
    assert_eq!(m.bucket.get("f"), None, "no partial object in S3");
    f.write_all(b"second half").unwrap();
    drop(f);
    assert_eq!(
        m.bucket.get("f").as_deref(),
        Some(&b"first half second half"[..])
    );
}

/// Every write pattern, applied to a local file and to a file in the
/// mount, compared by hash after each step (through the mount and in S3),
/// around the multipart threshold and part boundaries (part size 5 MiB).
#[test]
fn every_write_pattern_matches_a_local_file() {
    write_patterns_match("patterns", "part_size=5M", true);
}

/// The same with no memory for bodies being sent: every part and file is
/// read from its staged file as it is sent (the path of what does not fit
/// in `upload_memory`).
#[test]
fn every_write_pattern_matches_a_local_file_sent_from_the_staged_file() {
    write_patterns_match("patternsnomem", "part_size=5M,upload_memory=0", false);
}

/// `from_memory`: whether parts are to be sent from memory (the default)
/// or none is (`upload_memory=0`), as `bucketfs status` counts them.
fn write_patterns_match(bucket: &str, opts: &str, from_memory: bool) {
    const P: u64 = 5 * 1024 * 1024;
    let b = Bucket::new(server(), bucket, false);
    let m = Mount::new(&b, opts);
    let local = tempfile::tempdir().unwrap();
    let src = local.path().join("src");
    fs::write(&src, pattern(3 * P as usize, 11)).unwrap();
    let steps: Vec<String> = vec![
        format!("head -c {} SRC > F", P - 1),
        format!("head -c {} SRC > F", P),
        format!("head -c {} SRC > F", P + 1),
        format!("head -c {} SRC > F", 2 * P + 1),
        "printf 'appended' >> F".into(),
        format!("dd if=SRC of=F bs=1 skip=7 seek={} count=3 conv=notrunc status=none", P - 1),
        format!("dd if=SRC of=F bs=4096 skip=3 seek={} count=2 conv=notrunc status=none", P / 4096),
        format!("truncate -s {} F", P + 1),
        format!("truncate -s {} F", P - 1),
        format!("truncate -s {} F", 2 * P + 3),
        format!("dd if=SRC of=F bs=1 count=5 seek={} conv=notrunc status=none", 3 * P - 2),
        "python3 -c 'import os; f=os.open(\"F\", os.O_WRONLY); os.pwrite(f, b\"sparse\", 100); os.pwrite(f, b\"far\", 16000000); os.close(f)'".into(),
        "python3 -c 'import os; f=os.open(\"F\", os.O_RDWR|os.O_TRUNC); os.write(f, b\"short\"); os.close(f)'".into(),
        ": > F".into(),
        format!("head -c {} SRC > F && truncate -s 0 F && printf again >> F", P + 1),
    ];
    for (i, step) in steps.iter().enumerate() {
        for dir in [local.path(), m.dir.as_path()] {
            let cmd = step.replace("SRC", &src.display().to_string());
            sh(dir, &cmd);
        }
        let want = sha256_file(&local.path().join("F"));
        assert_eq!(
            sha256_file(&m.path("F")),
            want,
            "step {i}: `{step}` through the mount"
        );
        assert_eq!(
            sha256(&b.get("F").unwrap()),
            want,
            "step {i}: `{step}` in S3"
        );
    }
    assert_eq!(b.open_multipart_uploads(), 0);
    let status = status_of(&m);
    let sent = |what: &str| -> u64 {
        (status.lines())
            .find_map(|l| l.strip_prefix(what)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no `{what}` in {status}"))
    };
    let (all, memory) = (sent("bytes sent:"), sent("bytes sent from memory:"));
    assert!(all > 10 * P, "{status}");
    if from_memory {
        assert!(memory > 10 * P && memory <= all, "{status}");
    } else {
        assert_eq!(memory, 0, "{status}");
    }
}

#[test]
fn mounts_with_different_credentials_sharing_a_cache_dir_never_share_blocks() {
    let b = Bucket::new(server(), "creds", false);
    let data = pattern(2 * 1024 * 1024, 4);
    b.put("f", &data);
    let tmp = tempfile::tempdir().unwrap();
    let shared = tmp.path().join("shared-cache");
    let other_keys = tmp.path().join("other-keys");
    fs::write(&other_keys, "someone-else:their-secret\n").unwrap();
    fs::set_permissions(&other_keys, fs::Permissions::from_mode(0o600)).unwrap();
    // metadata_ttl: the GET counts must not depend on the machine's speed.
    let cache = format!("cache_dir={},metadata_ttl=3600", shared.display());

    let first = Mount::new(&b, &cache);
    assert_eq!(sha256_file(&first.path("f")), sha256(&data));
    assert!(get_requests(&first) >= 1);
    assert_eq!(first.unmount(), Some(0), "blocks settle on disk");
    // Same credentials: read from the shared disk tier, no GET.
    let same = Mount::new(&b, &cache);
    assert_eq!(sha256_file(&same.path("f")), sha256(&data));
    assert_eq!(get_requests(&same), 0, "disk hit with the same credentials");
    assert_eq!(same.unmount(), Some(0));
    // Other credentials: their own GETs, never the first mount's blocks.
    let other = Mount::new(&b, &format!("{cache},passwd_file={}", other_keys.display()));
    assert_eq!(sha256_file(&other.path("f")), sha256(&data));
    assert!(
        get_requests(&other) >= 1,
        "blocks fetched with other credentials are not read"
    );
}

#[test]
fn status_sockets_of_similar_mountpoints_never_collide() {
    let b = Bucket::new(server(), "sockets", false);
    let tmp = tempfile::tempdir().unwrap();
    let x = tmp.path().join("x");
    let (one, two) = (x.join("x_y"), x.join("x/y"));
    fs::create_dir_all(&one).unwrap();
    fs::create_dir_all(&two).unwrap();
    let start = |mp: &std::path::Path, tag: &str| {
        let opts = base_options(
            &b.endpoint,
            &tmp.path().join(format!("cache-{tag}")),
            &tmp.path().join(format!("log-{tag}")),
        );
        let st = command()
            .args(["-o", &opts, &b.name])
            .arg(mp)
            .status()
            .unwrap();
        assert!(st.success(), "mount {tag}");
    };
    let status = |mp: &std::path::Path| {
        let out = command().arg("status").arg(mp).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    start(&one, "one");
    start(&two, "two");
    for mp in [&one, &two] {
        let (ok, text) = status(mp);
        let first = text.lines().next().unwrap_or_default().to_string();
        assert!(
            ok && first == format!("mountpoint: {}", mp.display()),
            "{text}"
        );
    }
    assert!(Command::new("umount").arg(&one).status().unwrap().success());
    let (ok, text) = status(&two);
    assert!(
        ok && text.contains(&two.display().to_string()),
        "still served: {text}"
    );
    assert!(Command::new("umount").arg(&two).status().unwrap().success());
    wait_until(Duration::from_secs(30), "daemons to exit", || {
        !is_mounted(&one) && !is_mounted(&two)
    });
}

/// The runtime's threads of `m`'s daemon, as `bucketfs status` reports
/// them, checked against the threads named `bucketfs-io` (blocking-pool
/// threads, started on demand, have that name too).
fn io_threads_of(m: &Mount) -> usize {
    let out = Command::new(bin())
        .arg("status")
        .arg(&m.dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let n: usize = text
        .lines()
        .find_map(|l| l.strip_prefix("io threads: "))
        .unwrap_or_else(|| panic!("no io threads line in {text}"))
        .trim()
        .parse()
        .unwrap();
    let pid = m.pid().expect("a live daemon");
    let named = fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|c| c.trim() == "bucketfs-io")
        .count();
    assert!(
        named >= n,
        "{named} threads named bucketfs-io, {n} reported"
    );
    n
}

#[test]
fn io_threads_sets_the_runtime_and_one_thread_serves_reads_writes_and_listings() {
    let b = Bucket::new(server(), "iothreads", false);
    let data = pattern(6 * 1024 * 1024 + 11, 3);
    b.put("big", &data);
    for i in 0..40 {
        b.put(&format!("d/f{i:02}"), format!("file {i}").as_bytes());
    }
    let cpus = std::thread::available_parallelism().unwrap().get();
    let m = Mount::new(&b, "");
    assert_eq!(io_threads_of(&m), cpus, "the default");
    drop(m);
    let m = Mount::new(&b, "io_threads=3");
    assert_eq!(io_threads_of(&m), 3);
    drop(m);

    // One thread: every request, and every task waiting on another, on it.
    let m = Mount::new(&b, "io_threads=1,part_size=5M,upload_concurrency=4");
    assert_eq!(io_threads_of(&m), 1);
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let p = m.path("big");
            std::thread::spawn(move || sha256_file(&p))
        })
        .collect();
    let written = pattern(17 * 1024 * 1024 + 5, 9);
    fs::write(m.path("new"), &written).unwrap();
    for r in readers {
        assert_eq!(r.join().unwrap(), sha256(&data));
    }
    assert_eq!(b.get("new").map(|d| sha256(&d)), Some(sha256(&written)));
    let out = sh(&m.dir, "ls -l d | grep -c '^-'");
    assert_eq!(out.trim(), "40");
    let out = sh(
        &m.dir,
        "dd if=big bs=4k skip=777 count=1 2>/dev/null | sha256sum",
    );
    assert!(
        out.starts_with(&sha256(&data[777 * 4096..778 * 4096])),
        "{out}"
    );
}
