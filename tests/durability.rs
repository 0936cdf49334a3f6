//! Issue 9 through a real mount over moto (and the fault proxy): each
//! numbered case a user can show with shell tools. Every check is what a
//! user sees: close()'s result, bytes hashed through the S3 API, keys and
//! open multipart uploads listed by the S3 API, errnos. Every wait is a
//! bounded poll.

mod common;

use std::fs;
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::proxy::Fault;
use common::*;

const MIB: usize = 1024 * 1024;

fn cache_dir(m: &Mount) -> PathBuf {
    m.dir.parent().unwrap().join("cache")
}

// ----------------------------------------------------------------------
// Case 1: logrotate.

fn logrotate(dir_mv: bool) {
    let b = Bucket::new(server(), if dir_mv { "rot-dir" } else { "rot" }, false);
    let orig = pattern(12 * MIB, 1);
    b.put("logs/app.log", &orig);
    let m = Mount::new(&b, "");
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(m.path("logs/app.log"))
        .unwrap();
    let w1 = pattern(100_000, 11);
    f.write_all(&w1).unwrap();
    let new_key = if dir_mv {
        fs::rename(m.path("logs"), m.path("logs.old")).expect("mv logs logs.old");
        "logs.old/app.log"
    } else {
        fs::rename(m.path("logs/app.log"), m.path("logs/app.log.1")).expect("mv app.log app.log.1");
        "logs/app.log.1"
    };
    let w2 = pattern(300_000, 12);
    f.write_all(&w2).expect("write after the rename");
    let closed = close(f);
    assert!(
        closed.is_ok(),
        "close() after the rename: {closed:?}\nlog tail:\n{}",
        tail(&m.log_text())
    );
    let want = [&orig[..], &w1, &w2].concat();
    assert_lands(
        &b,
        new_key,
        &want,
        Duration::from_secs(10),
        "the rotated log",
    );
    assert_eq!(b.get("logs/app.log"), None, "nothing at the old key");
    assert_eq!(b.open_multipart_uploads(), 0);
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

#[test]
fn case1_logrotate_rename_of_a_large_file_open_for_appending() {
    logrotate(false);
}

#[test]
fn case1_logrotate_mv_of_the_directory_of_a_file_open_for_appending() {
    logrotate(true);
}

// ----------------------------------------------------------------------
// Case 2: a burst of 503 SlowDown at the last close.

#[test]
fn case2_a_slowdown_burst_at_close_never_loses_the_file() {
    let (proxy, b, m) = through_proxy("slowdown", false, "upload_retry_max=1");
    let data = pattern(2 * MIB, 2);
    let mut f = fs::File::create(m.path("f")).unwrap();
    f.write_all(&data).unwrap();
    proxy.inject("PUT", 1_000_000, Fault::Status(503));
    // The burst lasts about 3 s from close() (the fault schedule, not a
    // wait). Until the object is in S3 the file keeps reading its bytes;
    // once S3 answers again it lands with no user action.
    let burst_end = Instant::now() + Duration::from_secs(3);
    let closed = close(f);
    let (mut cleared, mut vanished) = (false, None);
    let landed = poll(Duration::from_secs(40), || {
        if !cleared && Instant::now() >= burst_end {
            proxy.clear();
            cleared = true;
        }
        if state(&b, "f", &data).is_ok() {
            return true;
        }
        match fs::read(m.path("f")) {
            Ok(d) if d == data => {}
            other => {
                vanished.get_or_insert(format!("{:?}", other.map(|d| d.len())));
            }
        }
        false
    });
    proxy.clear();
    assert_eq!(
        vanished, None,
        "the file vanished or changed before its bytes reached S3 (close: {closed:?})"
    );
    assert!(
        landed,
        "not in S3 40 s after a 3 s burst (close returned {closed:?}): {:?}\n{}",
        state(&b, "f", &data),
        tail(&m.log_text())
    );
}

// ----------------------------------------------------------------------
// Case 3: a CompleteMultipartUpload slower than the per-attempt timeout.

#[test]
fn case3_a_slow_complete_multipart_is_not_cut_and_lands() {
    // timeout=5 (the test default); the Complete's answer comes after 8 s.
    let (proxy, b, m) = through_proxy("slowcomplete", false, "");
    let data = pattern(20 * MIB, 3);
    let mut f = fs::File::create(m.path("big")).unwrap();
    f.write_all(&data).unwrap();
    // 20 MiB written in order: its multipart upload started while writing
    // (POST ?uploads); the next POST is close()'s Complete.
    assert!(
        poll(Duration::from_secs(10), || proxy.requests("POST") >= 1),
        "the upload streams while written"
    );
    // Every POST from now on (Complete, its retries, any new upload) is
    // answered 8 s late; each does land.
    proxy.inject("POST", 50, Fault::Delay(8));
    let closed = close(f);
    assert!(
        closed.is_ok(),
        "close() of a file whose Complete took 8 s: {closed:?}\n{}",
        tail(&m.log_text())
    );
    assert_lands(&b, "big", &data, Duration::from_secs(30), "the object");
    assert!(
        poll(Duration::from_secs(30), || b.open_multipart_uploads() == 0),
        "a multipart upload is left open"
    );
    assert_eq!(
        sha256_file(&m.path("big")),
        sha256(&data),
        "the mount reads it back"
    );
}

// ----------------------------------------------------------------------
// Case 8: a restart that gets the same pid (pid 1 in a pid namespace).

struct PidOne {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    cache: PathBuf,
    log: PathBuf,
    bucket: Bucket,
    child: Option<Child>,
}

impl PidOne {
    fn new(b: &Bucket) -> PidOne {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("mnt");
        fs::create_dir_all(&dir).unwrap();
        let mut p = PidOne {
            cache: tmp.path().join("cache"),
            log: tmp.path().join("log"),
            _tmp: tmp,
            dir,
            bucket: b.clone(),
            child: None,
        };
        p.start();
        p
    }

    fn start(&mut self) {
        let opts = base_options(&self.bucket.endpoint, &self.cache, &self.log);
        let child = Command::new("unshare")
            .args(["--pid", "--fork", "--kill-child", bin(), "-f", "-o", &opts])
            .arg(&self.bucket.name)
            .arg(&self.dir)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            .env("AWS_REGION", "us-east-1")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("RUST_LOG", "bucketfs=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("unshare");
        self.child = Some(child);
        let dir = self.dir.clone();
        assert!(
            poll(Duration::from_secs(30), || is_mounted(&dir)),
            "the pid-1 daemon did not mount\n{}",
            fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    /// kill -9 of the namespace's init (the daemon dies with it).
    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

impl Drop for PidOne {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
        if let Some(mut c) = self.child.take() {
            let done = poll(Duration::from_secs(20), || {
                matches!(c.try_wait(), Ok(Some(_)))
            });
            if !done {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

#[test]
fn case8_kill_9_and_a_restart_with_the_same_pid_loses_nothing() {
    let b = Bucket::new(server(), "samepid", false);
    let mut p = PidOne::new(&b);
    let a = pattern(3 * MIB, 81);
    let mut f = fs::File::create(p.dir.join("a")).unwrap();
    f.write_all(&a).unwrap();
    let edited0 = pattern(500_000, 82);
    b.put("e", &edited0);
    let e = fs::OpenOptions::new()
        .write(true)
        .open(p.dir.join("e"))
        .unwrap();
    e.write_all_at(b"EDIT", 1000).unwrap();
    p.kill9();
    drop((f, e));
    assert_eq!(b.get("a"), None, "not uploaded before the kill");
    p.start();
    // The new daemon is pid 1 again; its first new files must not
    // clobber the dead one's staged data.
    let fresh = pattern(MIB, 83);
    fs::write(p.dir.join("fresh"), &fresh).unwrap();
    let mut fresh2 = fs::File::create(p.dir.join("fresh2")).unwrap();
    fresh2.write_all(b"still open").unwrap();
    let mut e_want = edited0.clone();
    e_want[1000..1004].copy_from_slice(b"EDIT");
    assert_lands(
        &b,
        "a",
        &a,
        Duration::from_secs(30),
        "a, staged before kill -9",
    );
    assert_lands(
        &b,
        "e",
        &e_want,
        Duration::from_secs(30),
        "e, edited before kill -9",
    );
    assert_lands(&b, "fresh", &fresh, Duration::from_secs(5), "fresh");
    assert!(close(fresh2).is_ok());
    assert!(recovered_keys(&b).is_empty(), "{:?}", b.keys(""));
}

// ----------------------------------------------------------------------
// Case 9: recovery of an edit whose base is a `null` version, changed by
// another client meanwhile, must land (beside) once, not loop forever.

#[test]
fn case9_recovery_over_a_changed_null_version_base_lands_once() {
    let b = Bucket::new(server(), "nullbase", false);
    let m = Mount::new(&b, "");
    let orig = pattern(12 * MIB, 90);
    fs::write(m.path("f"), &orig).unwrap();
    assert_lands(
        &b,
        "f",
        &orig,
        Duration::from_secs(5),
        "written as multipart",
    );
    let f = fs::OpenOptions::new()
        .write(true)
        .open(m.path("f"))
        .unwrap();
    f.write_all_at(b"EDIT", 6 * MIB as u64).unwrap();
    kill9(&m);
    drop(f);
    b.put("f", b"another client's");
    m.restart();
    let mut beside = Vec::new();
    let landed = poll(Duration::from_secs(30), || {
        beside = recovered_keys(&b);
        beside.len() == 1
    });
    assert_eq!(
        b.get("f").as_deref(),
        Some(&b"another client's"[..]),
        "never overwritten"
    );
    assert!(
        landed,
        "the edit never landed beside the changed object (keys {:?}); log says kept for the next mount: {}",
        b.keys(""),
        m.log_text().contains("kept for the next mount")
    );
    m.remount();
    assert_eq!(recovered_keys(&b).len(), 1, "landed beside exactly once");
}

// ----------------------------------------------------------------------
// Case 10: an unlinked open file must not come back after kill -9.

#[test]
fn case10_an_unlinked_open_file_does_not_come_back_after_kill_9() {
    let b = Bucket::new(server(), "unlinked", false);
    b.put("old-gone", &pattern(200_000, 100));
    let m = Mount::new(&b, "");
    let old = fs::OpenOptions::new()
        .write(true)
        .open(m.path("old-gone"))
        .unwrap();
    old.write_all_at(b"edit", 10).unwrap();
    let mut new = fs::File::create(m.path("new-gone")).unwrap();
    new.write_all(&pattern(MIB, 101)).unwrap();
    let keep = pattern(MIB, 102);
    let mut k = fs::File::create(m.path("keep")).unwrap();
    k.write_all(&keep).unwrap();
    fs::remove_file(m.path("old-gone")).unwrap();
    fs::remove_file(m.path("new-gone")).unwrap();
    old.write_all_at(b"more", 20).unwrap();
    new.write_all(b"more").unwrap();
    kill9(&m);
    drop((old, new, k));
    m.restart();
    // "keep" landing shows recovery ran.
    assert_lands(
        &b,
        "keep",
        &keep,
        Duration::from_secs(30),
        "keep (recovery ran)",
    );
    assert_eq!(
        b.get("old-gone").map(|d| d.len()),
        None,
        "old-gone came back"
    );
    assert_eq!(
        b.get("new-gone").map(|d| d.len()),
        None,
        "new-gone came back"
    );
    let listed: Vec<String> = fs::read_dir(&m.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!listed.iter().any(|n| n.ends_with("-gone")), "{listed:?}");
}

// ----------------------------------------------------------------------
// Case 11: an O_TRUNC rewrite, kill -9 before close.

#[test]
fn case11_an_o_trunc_rewrite_killed_before_close_lands_at_its_key() {
    let b = Bucket::new(server(), "trunc", true);
    let keys = ["t1", "t2", "t3"];
    for (i, k) in keys.iter().enumerate() {
        b.put(k, &pattern(300_000, 110 + i as u64));
    }
    let m = Mount::new(&b, "");
    let mut open = Vec::new();
    let mut want = Vec::new();
    for (i, k) in keys.iter().enumerate() {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(m.path(k))
            .unwrap();
        let d = pattern(100_000 + i * 1000, 120 + i as u64);
        f.write_all(&d).unwrap();
        open.push(f);
        want.push(d);
    }
    kill9(&m);
    drop(open);
    m.restart();
    for (k, d) in keys.iter().zip(&want) {
        assert_lands(&b, k, d, Duration::from_secs(30), "the rewrite");
    }
    assert!(
        recovered_keys(&b).is_empty(),
        "nobody else touched the keys, yet: {:?}",
        b.keys("")
    );
}

// ----------------------------------------------------------------------
// Case 12: kill -9 during a multipart upload started by fsync.

#[test]
fn case12_kill_9_during_a_multipart_upload_leaves_no_upload_open() {
    let (proxy, b, m) = through_proxy("mpu-kill", false, "");
    let orig = pattern(20 * MIB, 120);
    b.put("big", &orig);
    let mut want = orig.clone();
    let edit = pattern(9 * MIB, 121);
    want[..edit.len()].copy_from_slice(&edit);
    let f = fs::OpenOptions::new()
        .write(true)
        .open(m.path("big"))
        .unwrap();
    f.write_all_at(&edit, 0).unwrap();
    // Parts land but their answers come late: the upload stays open a while.
    proxy.inject("PUT", 1000, Fault::Delay(5));
    let syncer = std::thread::spawn(move || {
        let r = f.sync_all();
        drop(f);
        r
    });
    assert!(
        poll(Duration::from_secs(30), || b.open_multipart_uploads() >= 1),
        "fsync started a multipart upload"
    );
    kill9(&m);
    proxy.clear();
    let _ = syncer.join();
    assert!(b.open_multipart_uploads() >= 1, "killed mid-upload");
    m.restart();
    assert_lands(&b, "big", &want, Duration::from_secs(60), "the edit");
    let mut open = usize::MAX;
    let ok = poll(Duration::from_secs(30), || {
        open = b.open_multipart_uploads();
        open == 0
    });
    assert!(ok, "{open} multipart upload(s) left open after the remount");
}

// ----------------------------------------------------------------------
// Case 13: rm -rf of the cache dir while a file is open for writing.

#[test]
fn case13_rm_rf_of_the_cache_dir_while_writing_loses_nothing() {
    let b = Bucket::new(server(), "rmcache", false);
    let m = Mount::new(&b, "");
    let data = pattern(3 * MIB, 13);
    let mut f = fs::File::create(m.path("f")).unwrap();
    f.write_all(&data[..MIB]).unwrap();
    fs::remove_dir_all(cache_dir(&m)).expect("rm -rf the cache dir");
    let w = f.write_all(&data[MIB..]);
    assert!(w.is_ok(), "write after rm -rf of the cache: {w:?}");
    let closed = close(f);
    assert!(
        closed.is_ok(),
        "close(): {closed:?}\n{}",
        tail(&m.log_text())
    );
    assert_lands(&b, "f", &data, Duration::from_secs(10), "f");
}

// ----------------------------------------------------------------------
// Case 14: read blocks fill a small cache disk; staging comes first.

struct Tmpfs(PathBuf);
impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn used_bytes(p: &Path) -> u64 {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return 0;
    }
    (s.f_blocks - s.f_bfree) * s.f_frsize
}

#[test]
fn case14_read_blocks_are_evicted_to_make_room_for_a_write() {
    let b = Bucket::new(server(), "smalldisk", false);
    let big = pattern(7 * MIB, 14);
    b.put("big", &big);
    let m = Mount::new(&b, "mem_cache=1M,block_size=1M,cache_size=1G");
    assert_eq!(m.unmount(), Some(0));
    let cache = cache_dir(&m);
    let _ = fs::remove_dir_all(&cache);
    fs::create_dir_all(&cache).unwrap();
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs"])
        .arg(&cache)
        .status()
        .unwrap();
    assert!(st.success(), "mount a tmpfs for the cache dir");
    let _tmpfs = Tmpfs(cache.clone());
    m.restart();
    assert_eq!(sha256_file(&m.path("big")), sha256(&big));
    let filled = poll(Duration::from_secs(30), || {
        used_bytes(&cache) >= 6 * MIB as u64
    });
    assert!(
        filled,
        "read blocks did not fill the cache disk ({} bytes used): cannot reproduce",
        used_bytes(&cache)
    );
    let data = pattern(3 * MIB, 15);
    let mut f = fs::File::create(m.path("new")).unwrap();
    let w = f.write_all(&data);
    assert!(
        w.is_ok(),
        "a 3 MiB write with the 8 MiB cache disk full of read blocks: {w:?}"
    );
    let closed = close(f);
    assert!(closed.is_ok(), "close(): {closed:?}");
    assert_lands(&b, "new", &data, Duration::from_secs(10), "new");
    drop(m);
}

// ----------------------------------------------------------------------
// Case 15: signals.

fn alive(pid: u32) -> bool {
    let exists = unsafe { libc::kill(pid as i32, 0) } == 0;
    exists
        && !fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z")
}

#[test]
fn case15_hup_usr1_usr2_do_not_kill_the_daemon_and_hup_reopens_the_log() {
    let b = Bucket::new(server(), "signals", false);
    let m = Mount::new(&b, "");
    let pid = m.pid().unwrap();
    fs::write(m.path("before"), b"x").unwrap();
    let rotated = m.log.with_extension("log.1");
    fs::rename(&m.log, &rotated).unwrap();
    for (sig, name) in [
        (libc::SIGHUP, "SIGHUP"),
        (libc::SIGUSR1, "SIGUSR1"),
        (libc::SIGUSR2, "SIGUSR2"),
    ] {
        unsafe { libc::kill(pid as i32, sig) };
        // A round trip through the daemon after the signal was handled.
        let r = fs::write(m.path(name), name.as_bytes());
        assert!(r.is_ok() && alive(pid), "the daemon died on {name}: {r:?}");
        assert_eq!(b.get(name).as_deref(), Some(name.as_bytes()));
    }
    let reopened = poll(Duration::from_secs(10), || {
        let _ = fs::metadata(m.path("nonexistent-to-log"));
        fs::metadata(&m.log).is_ok_and(|md| md.len() > 0)
    });
    assert!(reopened, "after SIGHUP the log_file was not reopened");
}

// ----------------------------------------------------------------------
// Case 16: a stalled server; cat of a large file returns in bounded time.

#[test]
fn case16_cat_under_a_stalled_server_returns_within_the_bound() {
    // The old defaults (timeout=10, retries=3): 180 s and more today.
    let (proxy, b, m) = through_proxy("stall", false, "timeout=10,retries=3,metadata_ttl=600");
    let data = pattern(8 * MIB, 16);
    b.put("big", &data);
    assert_eq!(
        fs::metadata(m.path("big")).unwrap().len(),
        data.len() as u64
    );
    proxy.inject("GET", 1_000_000, Fault::Stall);
    let mut cat = Command::new("cat")
        .arg(m.path("big"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    let mut status = None;
    poll(Duration::from_secs(120), || {
        status = cat.try_wait().ok().flatten();
        status.is_some()
    });
    let took = t.elapsed();
    proxy.clear();
    if status.is_none() {
        let _ = cat.kill();
        let _ = cat.wait();
        panic!("cat is still blocked after {took:?} (bound 120 s; documented ≤ 60 s)");
    }
    let mut err = String::new();
    let _ = cat.stderr.take().unwrap().read_to_string(&mut err);
    assert!(
        !status.unwrap().success(),
        "cat of a stalled object cannot succeed"
    );
    assert!(err.contains("Input/output error"), "EIO: {err}");
}

// ----------------------------------------------------------------------
// Case 17 through the mount: readers.

#[test]
fn case17_a_readers_close_uploads_nothing_and_a_reader_of_a_growing_file_reads_on() {
    let b = Bucket::new(server(), "readers", false);
    let m = Mount::new(&b, "");
    let mut w = fs::File::create(m.path("f")).unwrap();
    w.write_all(b"half of it").unwrap();
    let r = fs::File::open(m.path("f")).unwrap();
    drop(r);
    let early = b.get("f");
    assert!(
        early.as_deref() != Some(&b"half of it"[..]),
        "a reader's close uploaded the half-written file"
    );
    let mut r = fs::File::open(m.path("f")).unwrap();
    w.write_all(b", and the rest").unwrap();
    assert!(close(w).is_ok());
    let mut got = Vec::new();
    r.read_to_end(&mut got).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&got),
        "half of it, and the rest",
        "a reader opened on the growing file reads its bytes after the writer closed"
    );
    assert_lands(
        &b,
        "f",
        b"half of it, and the rest",
        Duration::from_secs(5),
        "f",
    );
}

#[test]
fn case17_an_open_reader_keeps_reading_a_file_renamed_by_this_mount() {
    let b = Bucket::new(server(), "reader-mv", false);
    let data = pattern(6 * MIB, 17);
    b.put("f", &data);
    let m = Mount::new(&b, "block_size=1M,readahead=1,mem_cache=2M");
    let mut r = fs::File::open(m.path("f")).unwrap();
    let mut head = vec![0u8; 4096];
    r.read_exact(&mut head).unwrap();
    fs::rename(m.path("f"), m.path("g")).unwrap();
    let mut far = vec![0u8; 4096];
    let got = r.read_exact_at(&mut far, 5 * MIB as u64);
    assert!(got.is_ok(), "read of a file renamed by this mount: {got:?}");
    assert!(far == data[5 * MIB..5 * MIB + 4096], "its bytes");
}

/// `mv g f` over a file being read, and `mv d e` of the directory of one,
/// on a bucket without versions (the old object cannot be read by version
/// later): each reader reads the bytes it opened to the end.
#[test]
fn case17_an_open_reader_keeps_reading_a_file_replaced_or_moved_by_this_mount() {
    let b = Bucket::new(server(), "reader-over", false);
    let (f, g, h) = (
        pattern(6 * MIB, 27),
        pattern(3 * MIB, 28),
        pattern(6 * MIB, 29),
    );
    b.put("f", &f);
    b.put("g", &g);
    b.put("d/h", &h);
    let m = Mount::new(&b, "block_size=1M,readahead=1,mem_cache=2M");
    let mut rf = fs::File::open(m.path("f")).unwrap();
    let mut rh = fs::File::open(m.path("d/h")).unwrap();
    let mut head = vec![0u8; 4096];
    rf.read_exact(&mut head).unwrap();
    rh.read_exact(&mut head).unwrap();
    fs::rename(m.path("g"), m.path("f")).unwrap();
    fs::rename(m.path("d"), m.path("e")).unwrap();
    for (r, want, what) in [
        (&mut rf, &f, "f, replaced by mv g f"),
        (&mut rh, &h, "d/h, moved by mv d e"),
    ] {
        let mut far = vec![0u8; 4096];
        let got = r.read_exact_at(&mut far, 5 * MIB as u64);
        assert!(got.is_ok(), "read of {what}: {got:?}");
        assert!(
            far == want[5 * MIB..5 * MIB + 4096],
            "{what}: its own bytes"
        );
        let mut all = Vec::new();
        r.seek(std::io::SeekFrom::Start(0)).unwrap();
        r.read_to_end(&mut all).unwrap();
        assert!(all == **want, "{what}: the whole file as opened");
    }
    assert_eq!(
        b.get("f").as_deref(),
        Some(&g[..]),
        "f in the bucket is g's bytes"
    );
    assert_eq!(b.get("e/h").as_deref(), Some(&h[..]), "e/h in the bucket");
    assert_eq!(b.get("d/h"), None, "d/h is gone from the bucket");
    assert_eq!(b.get("g"), None, "g is gone from the bucket");
}

// ----------------------------------------------------------------------
// Case 18: cp -p of a 20 MiB file keeps mode and mtime.

#[test]
fn case18_cp_p_of_a_large_file_keeps_mode_and_mtime() {
    let b = Bucket::new(server(), "cpp", false);
    let m = Mount::new(&b, "metadata_ttl=1");
    let src_dir = tempfile::tempdir().unwrap();
    let src = src_dir.path().join("src");
    fs::write(&src, pattern(20 * MIB, 18)).unwrap();
    fs::set_permissions(&src, fs::Permissions::from_mode(0o600)).unwrap();
    sh(src_dir.path(), "touch -d @978307200 src");
    sh(
        src_dir.path(),
        &format!("cp -p src {}", m.path("dst").display()),
    );
    let meta = b.metadata("dst");
    let mode = meta.get("mode").cloned().unwrap_or_default();
    let mtime = meta.get("mtime").cloned().unwrap_or_default();
    assert!(
        mode == "33152" && mtime.split('.').next() == Some("978307200"),
        "x-amz-meta-mode {mode:?} (want 33152 = 0100600), x-amz-meta-mtime {mtime:?} (want 978307200)"
    );
    m.remount();
    let md = fs::metadata(m.path("dst")).unwrap();
    assert_eq!(md.mode() & 0o7777, 0o600, "mode after remount");
    assert_eq!(md.mtime(), 978307200, "mtime after remount");
}

// ----------------------------------------------------------------------
// Case 19 through the mount: listings.

#[test]
fn case19_an_unlinked_open_file_is_not_listed_and_rmdir_succeeds() {
    let b = Bucket::new(server(), "unlisted", false);
    let m = Mount::new(&b, "");
    fs::create_dir(m.path("d")).unwrap();
    let mut f = fs::File::create(m.path("d/f")).unwrap();
    f.write_all(b"data").unwrap();
    fs::remove_file(m.path("d/f")).unwrap();
    let listed: Vec<String> = fs::read_dir(m.path("d"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(listed.is_empty(), "ls d after rm d/f: {listed:?}");
    let rm = fs::remove_dir(m.path("d"));
    assert!(rm.is_ok(), "rmdir d: {rm:?}");
    let _ = close(f);
    assert_eq!(b.get("d/f"), None, "the unlinked file does not come back");
}

#[test]
fn case19_mv_over_an_open_file_lists_it_once() {
    let b = Bucket::new(server(), "mvover", false);
    b.put("x", b"content of x");
    b.put("y", b"content of y");
    let m = Mount::new(&b, "");
    let mut y = fs::OpenOptions::new()
        .write(true)
        .open(m.path("y"))
        .unwrap();
    y.write_all(b"rewriting y").unwrap();
    fs::rename(m.path("x"), m.path("y")).unwrap();
    let listed: Vec<String> = fs::read_dir(&m.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        listed.iter().filter(|n| *n == "y").count(),
        1,
        "ls after mv x y over an open y: {listed:?}"
    );
    let _ = close(y);
    assert_lands(
        &b,
        "y",
        b"content of x",
        Duration::from_secs(5),
        "y after the old y's close",
    );
}

// ----------------------------------------------------------------------
// writeback=async: close() returns before S3, and kill -9 still loses
// nothing.

/// With every PUT held back by the server, `cp` of ten files and an
/// rsync-style temporary-then-rename return at once under
/// writeback=async; the daemon is then killed with nothing in S3; the next
/// mount (S3 answering again) lands every file at its final name, exact,
/// with nothing beside and no temporary name left.
#[test]
fn writeback_async_closes_at_once_and_a_kill_loses_nothing() {
    let (proxy, b, m) = through_proxy("wb-async", false, "writeback=async");
    b.put("dst", b"the old dst");
    // mkdir writes its marker at once (not a file's data): before the stall.
    fs::create_dir(m.path("copy")).unwrap();
    proxy.inject("PUT", 100_000, Fault::Stall);
    let files: Vec<(String, Vec<u8>)> = (0..10)
        .map(|i| (format!("f{i}"), pattern(1000 + i * 70_000, i as u64)))
        .collect();
    let src = tempfile::tempdir().unwrap();
    for (n, d) in &files {
        fs::write(src.path().join(n), d).unwrap();
    }
    let status = Command::new("cp")
        .arg("-r")
        .arg(format!("{}/.", src.path().display()))
        .arg(m.path("copy"))
        .status()
        .unwrap();
    assert!(status.success(), "cp -r under writeback=async");
    let new_dst = pattern(3 * MIB, 99);
    fs::write(m.path(".dst.tmp"), &new_dst).unwrap();
    fs::rename(m.path(".dst.tmp"), m.path("dst")).unwrap();
    assert_eq!(
        fs::read(m.path("dst")).unwrap(),
        new_dst,
        "read back before upload"
    );
    assert!(
        b.keys("") == ["copy/"],
        "nothing reached S3 while PUTs stall (the old dst went at the rename): {:?}",
        b.keys("")
    );
    kill9(&m);
    proxy.clear();
    m.restart();
    for (n, d) in &files {
        assert_lands(&b, &format!("copy/{n}"), d, Duration::from_secs(60), n);
    }
    assert_lands(&b, "dst", &new_dst, Duration::from_secs(60), "dst");
    assert_eq!(b.get(".dst.tmp"), None, "no temporary name left");
    assert!(
        recovered_keys(&b).is_empty(),
        "nothing beside: {:?}",
        b.keys("")
    );
}

// Found by an attack session: two processes rewriting one file at once
// (`cat p > f` in two loops). Both O_TRUNC opens found no write state and
// each began a staged copy with a journal; the one not kept left its
// journal after a clean unmount, naming the object's ETag as the one it
// replaced, and the next mount "recovered" that empty copy over the file.
#[test]
fn two_rewriters_of_one_file_leave_nothing_staged_and_a_remount_keeps_it() {
    let b = Bucket::new(server(), "tworewrite", false);
    let m = Mount::new(&b, "");
    let data = pattern(100_000, 5);
    fs::write(m.path("f"), &data).unwrap();
    let writers: Vec<_> = (0..2)
        .map(|_| {
            let (p, d) = (m.path("f"), data.clone());
            std::thread::spawn(move || {
                for _ in 0..150 {
                    fs::write(&p, &d).unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    assert_eq!(m.unmount(), Some(0), "clean exit\n{}", m.log_text());
    let left = files_below(&m.cache_dir().join("staging"));
    assert!(
        left.is_empty(),
        "left staged after a clean unmount: {left:?}"
    );
    m.restart();
    assert_eq!(sha256(&fs::read(m.path("f")).unwrap()), sha256(&data));
    assert_eq!(sha256(&b.get("f").unwrap()), sha256(&data), "in S3");
    assert!(recovered_keys(&b).is_empty(), "{:?}", b.keys(""));
}

// ----------------------------------------------------------------------
// A kill in `mv src victim` (src new, open, never sent) while the victim's
// DeleteObject waits on S3.

/// An outsider found it through a real mount: the next mount kept the
/// victim and put src's bytes beside it (`victim.bucketfs-recovered-…`),
/// src at neither name. Now the rename goes through: src's bytes at the
/// victim's name, nothing beside, no upload left open. With the victim a
/// plain object, and open with unsent changes of its own.
#[test]
fn a_kill_in_mv_of_a_new_file_over_another_puts_it_at_the_new_name() {
    for (tag, victim_open) in [("mvover-plain", false), ("mvover-open", true)] {
        let (proxy, b, m) = through_proxy(tag, false, "");
        b.put("victim", &pattern(300_000, 110));
        let src_data = pattern(200_000, 111);
        let mut src = fs::File::create(m.path("src")).unwrap();
        src.write_all(&src_data).unwrap();
        let victim = victim_open.then(|| {
            let v = fs::OpenOptions::new()
                .write(true)
                .open(m.path("victim"))
                .unwrap();
            v.write_all_at(b"unsent edit", 100).unwrap();
            v
        });
        proxy.inject("DELETE", 1_000_000, Fault::Stall);
        let (from, to) = (m.path("src"), m.path("victim"));
        let mv = std::thread::spawn(move || fs::rename(from, to));
        assert!(
            poll(Duration::from_secs(30), || proxy.faults_injected() > 0),
            "{tag}: the DeleteObject never came"
        );
        kill9(&m);
        let answered = mv.join().unwrap();
        drop((src, victim));
        proxy.clear();
        m.restart();
        assert_lands(
            &b,
            "victim",
            &src_data,
            Duration::from_secs(30),
            &format!("{tag}: src at the new name (mv answered {answered:?})"),
        );
        let keys = b.keys("");
        assert_eq!(keys, vec!["victim".to_string()], "{tag}: nothing beside");
        assert_eq!(b.open_multipart_uploads(), 0, "{tag}");
        drop(m);
    }
}
