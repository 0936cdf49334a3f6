//! Outside attacks on a real mount, written by someone who did not write
//! the code: handles kept open across renames, unlinks and chmods,
//! uploads that fail or stall, kill -9 with namespace operations in flight,
//! other users after listings and under `.versions`. Each was a finding
//! or a check that held; all must pass.

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::proxy::Fault;
use common::*;

const MIB: usize = 1024 * 1024;

/// Files whose close returned: name and bytes.
type Confirmed = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

fn status(m: &Mount) -> String {
    let out = command().arg("status").arg(&m.dir).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

// ---------------------------------------------------------------------
// A1: an in-place edit of an existing object that another client
// replaced before close (unversioned bucket).

#[test]
fn a1_edit_of_an_object_replaced_by_another_client_lands_somewhere() {
    let b = Bucket::new(server(), "a1", false);
    let old = pattern(100_000, 1);
    b.put("f", &old);
    let m = Mount::new(&b, "upload_retry_max=1");
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.path("f"))
        .unwrap();
    f.write_all_at(b"EDIT", 0).unwrap();
    // Another client replaces the object meanwhile.
    let theirs = pattern(50_000, 2);
    b.put("f", &theirs);
    let closed = close(f);
    eprintln!("close: {closed:?}");
    let read = fs::read(m.path("f")).map(|d| d.len());
    eprintln!("read through the mount: {read:?}");
    std::thread::sleep(Duration::from_secs(5));
    let st = status(&m);
    eprintln!("status:\n{st}");
    let code = m.unmount();
    eprintln!("umount exit: {code:?}; keys {:?}", b.keys(""));
    m.restart();
    for k in b.keys("") {
        let d = b.get(&k).unwrap();
        eprintln!(
            "after remount: {k}: {} bytes, head {:?}, zero bytes {}",
            d.len(),
            String::from_utf8_lossy(&d[..8.min(d.len())]),
            d.iter().filter(|x| **x == 0).count()
        );
    }
    let mut want = old.clone();
    want[..4].copy_from_slice(b"EDIT");
    // Our edit must be in S3 somewhere: at f (if the mount wins) or beside.
    let ours_somewhere = b
        .keys("")
        .iter()
        .any(|k| b.get(k).is_some_and(|d| d == want));
    assert!(
        closed.is_ok() && ours_somewhere,
        "close {closed:?}, read {read:?}, umount {code:?}: the edit is not in S3 anywhere; keys {:?}\nstatus:\n{st}\n{}",
        b.keys(""),
        tail(&m.log_text())
    );
}

// ---------------------------------------------------------------------
// A2: O_TRUNC rewrite while the previous close's upload is stalled.

#[test]
fn a2_o_trunc_while_the_previous_close_is_still_uploading() {
    let (proxy, b, m) = through_proxy("a2", false, "upload_retry_max=1");
    let v1 = pattern(3 * MIB, 11);
    fs::write(m.path("f"), &v1).unwrap();
    // v2: its close stalls (every PUT stalls for a while).
    let v2 = pattern(2 * MIB, 12);
    proxy.inject("PUT", 2, Fault::Stall);
    let p2 = m.path("f");
    let v2c = v2.clone();
    let t2 = std::thread::spawn(move || {
        let mut f = fs::File::create(&p2).unwrap();
        f.write_all(&v2c).unwrap();
        let t = Instant::now();
        (close(f).map_err(|e| e.to_string()), t.elapsed())
    });
    std::thread::sleep(Duration::from_millis(1500));
    let st = status(&m);
    // v3 with O_TRUNC while v2's close is stalled.
    let v3 = pattern(MIB / 2, 13);
    let t = Instant::now();
    let mut f = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(m.path("f"))
        .unwrap();
    let open_took = t.elapsed();
    f.write_all(&v3).unwrap();
    let c3 = close(f);
    let r2 = t2.join().unwrap();
    eprintln!("v2 close {r2:?}; v3 open took {open_took:?}, close {c3:?}\nstatus during:\n{st}");
    proxy.clear();
    let landed = poll(Duration::from_secs(30), || state(&b, "f", &v3).is_ok());
    let through = fs::read(m.path("f")).unwrap();
    assert!(
        landed && through == v3,
        "last writer (O_TRUNC, close {c3:?}) not what S3 holds: {:?}\n{}",
        state(&b, "f", &v3),
        tail(&m.log_text())
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(state(&b, "f", &v3), Ok(()), "a stale upload landed late");
    assert_eq!(b.open_multipart_uploads(), 0);
}

// ---------------------------------------------------------------------
// A3: `mv` of a directory back and forth while files inside are created,
// written and closed.

#[test]
fn a3_directory_mv_while_files_inside_are_written_and_closed() {
    let b = Bucket::new(server(), "a3", false);
    let m = Mount::new(&b, "");
    fs::create_dir(m.path("d")).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    // Which name the directory has: writers retry on ENOENT at the other.
    let done: Confirmed = Arc::default();
    let mut threads = Vec::new();
    for w in 0..2 {
        let (stop, done, root) = (stop.clone(), done.clone(), m.dir.clone());
        threads.push(std::thread::spawn(move || {
            let mut i = 0;
            let mut errors = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let name = format!("w{w}-{i}");
                let data = pattern(100_000 + i * 7919 % 300_000, (w * 1000 + i) as u64);
                let mut ok = false;
                for dir in ["d", "e"] {
                    let p = root.join(dir).join(&name);
                    let Ok(mut f) = fs::File::create(&p) else {
                        continue;
                    };
                    let wrote = f.write_all(&data[..data.len() / 2]).and_then(|_| {
                        std::thread::sleep(Duration::from_millis(20));
                        f.write_all(&data[data.len() / 2..])
                    });
                    match (wrote, close(f)) {
                        (Ok(()), Ok(())) => ok = true,
                        (a, c) => errors.push(format!("{name}: write {a:?} close {c:?}")),
                    }
                    break;
                }
                if ok {
                    done.lock().unwrap().push((name, data));
                }
                i += 1;
            }
            errors
        }));
    }
    let mut mv_errors = Vec::new();
    for k in 0..12 {
        let (a, bb) = if k % 2 == 0 { ("d", "e") } else { ("e", "d") };
        if let Err(e) = fs::rename(m.path(a), m.path(bb)) {
            mv_errors.push(format!("mv {a} {bb}: {e}"));
        }
        std::thread::sleep(Duration::from_millis(150));
    }
    stop.store(true, Ordering::Relaxed);
    let write_errors: Vec<String> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    let final_dir = if m.path("d").exists() { "d" } else { "e" };
    let done = done.lock().unwrap().clone();
    let keys = b.keys("");
    let mut problems = Vec::new();
    for (name, data) in &done {
        let key = format!("{final_dir}/{name}");
        if let Err(e) = state(&b, &key, data) {
            problems.push(e);
        }
    }
    let other = if final_dir == "d" { "e/" } else { "d/" };
    let strays: Vec<&String> = keys.iter().filter(|k| k.starts_with(other)).collect();
    eprintln!(
        "{} files closed OK, write errors {:?}, mv errors {:?}",
        done.len(),
        write_errors,
        mv_errors
    );
    assert!(
        problems.is_empty() && strays.is_empty(),
        "closed files not exact under {final_dir}/: {problems:?}\nstray keys: {strays:?}\n{}",
        tail(&m.log_text())
    );
}

// ---------------------------------------------------------------------
// A4: rename chains with handles open on both names.

#[test]
fn a4_rename_chain_a_to_b_to_a_with_writers_open_on_both() {
    let b = Bucket::new(server(), "a4", false);
    let m = Mount::new(&b, "");
    let mut fa = fs::File::create(m.path("a")).unwrap();
    let mut fb = fs::File::create(m.path("b")).unwrap();
    fa.write_all(b"A1").unwrap();
    fb.write_all(b"B1").unwrap();
    fs::rename(m.path("a"), m.path("b")).unwrap(); // fb's file is replaced
    fa.write_all(b"A2").unwrap();
    fb.write_all(b"B2").unwrap();
    fs::rename(m.path("b"), m.path("a")).unwrap();
    fa.write_all(b"A3").unwrap();
    fb.write_all(b"B3").unwrap();
    let (ca, cb) = (close(fa), close(fb));
    assert!(ca.is_ok(), "{ca:?}");
    eprintln!("close of the replaced file's writer: {cb:?}");
    assert_eq!(state(&b, "a", b"A1A2A3"), Ok(()));
    assert_eq!(b.get("b"), None, "the replaced file came back");
    assert_eq!(fs::read(m.path("a")).unwrap(), b"A1A2A3");
    assert!(!m.path("b").exists());
    m.remount();
    assert_eq!(fs::read(m.path("a")).unwrap(), b"A1A2A3");
    assert!(!m.path("b").exists());
}

// ---------------------------------------------------------------------
// A5: rm of a file and a new file at the same name while the old
// writer is still open; the old writer writes on and closes.

#[test]
fn a5_old_writer_of_an_unlinked_name_never_overwrites_the_new_file() {
    let b = Bucket::new(server(), "a5", false);
    let m = Mount::new(&b, "");
    let mut old = fs::File::create(m.path("f")).unwrap();
    old.write_all(&pattern(3 * MIB, 1)).unwrap();
    fs::remove_file(m.path("f")).unwrap();
    fs::write(m.path("f"), b"new file").unwrap();
    old.write_all(b"more old").unwrap();
    old.sync_all().ok();
    let c = close(old);
    eprintln!("old close {c:?}");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(state(&b, "f", b"new file"), Ok(()));
    assert_eq!(fs::read(m.path("f")).unwrap(), b"new file");
    assert_eq!(b.open_multipart_uploads(), 0);
}

// ---------------------------------------------------------------------
// A6: truncate by path while a writer is open, then more writes.

#[test]
fn a6_truncate_by_path_and_chmod_while_a_writer_is_open() {
    let b = Bucket::new(server(), "a6", false);
    let m = Mount::new(&b, "");
    let mut f = fs::File::create(m.path("f")).unwrap();
    f.write_all(&pattern(MIB, 3)).unwrap();
    Command::new("truncate")
        .args(["-s", "10"])
        .arg(m.path("f"))
        .status()
        .unwrap();
    fs::set_permissions(m.path("f"), fs::Permissions::from_mode(0o600)).unwrap();
    f.write_all(b"tail").unwrap(); // at offset 1 MiB: a hole from 10
    let c = close(f);
    assert!(c.is_ok(), "{c:?}");
    let mut want = pattern(MIB, 3)[..10].to_vec();
    want.resize(MIB, 0);
    want.extend_from_slice(b"tail");
    assert_eq!(state(&b, "f", &want), Ok(()));
    assert_eq!(
        b.metadata("f").get("mode").map(String::as_str),
        Some("33152"),
        "chmod 600 of an open file lost"
    );
}

// ---------------------------------------------------------------------
// A7: a close that failed (503 burst), then rm: nothing resurrects when
// S3 is back, status shows nothing pending.

#[test]
fn a7_failed_close_then_rm_never_resurrects() {
    let (proxy, b, m) = through_proxy("a7", false, "upload_retry_max=1");
    proxy.inject("PUT", 1_000_000, Fault::Status(503));
    let mut f = fs::File::create(m.path("f")).unwrap();
    f.write_all(&pattern(2 * MIB, 7)).unwrap();
    let c = close(f);
    assert!(c.is_err(), "close must fail under a 503 burst");
    let st1 = status(&m);
    assert!(
        st1.contains("f"),
        "status does not list the pending file:\n{st1}"
    );
    fs::remove_file(m.path("f")).unwrap();
    proxy.clear();
    std::thread::sleep(Duration::from_secs(6));
    let st2 = status(&m);
    assert_eq!(b.keys(""), Vec::<String>::new(), "rm'd file came back");
    assert!(
        st2.contains("0 file(s)"),
        "status still lists an unlinked file:\n{st2}"
    );
    m.remount();
    assert_eq!(
        b.keys(""),
        Vec::<String>::new(),
        "rm'd file came back at remount"
    );
}

// ---------------------------------------------------------------------
// A8: a close that failed, then mv: the data must end at the new name
// only, once S3 is back.

#[test]
fn a8_failed_close_then_mv_lands_at_the_new_name_only() {
    let (proxy, b, m) = through_proxy("a8", false, "upload_retry_max=1");
    fs::create_dir(m.path("d")).unwrap();
    let data = pattern(2 * MIB, 8);
    proxy.inject("PUT", 1_000_000, Fault::Status(503));
    let mut f = fs::File::create(m.path("d/f")).unwrap();
    f.write_all(&data).unwrap();
    let c = close(f);
    assert!(c.is_err());
    let mv = fs::rename(m.path("d/f"), m.path("d/g"));
    let mvd = fs::rename(m.path("d"), m.path("e"));
    eprintln!("mv under failure: {mv:?}, mv dir: {mvd:?}");
    proxy.clear();
    let (want_key, gone) = match (&mv, &mvd) {
        (Ok(()), Ok(())) => ("e/g", vec!["d/f", "d/g", "e/f"]),
        (Ok(()), Err(_)) => ("d/g", vec!["d/f"]),
        (Err(_), Ok(())) => ("e/f", vec!["d/f"]),
        (Err(_), Err(_)) => ("d/f", vec![]),
    };
    let landed = poll(Duration::from_secs(30), || {
        state(&b, want_key, &data).is_ok()
    });
    std::thread::sleep(Duration::from_secs(3));
    let keys = b.keys("");
    let st = status(&m);
    assert!(
        landed && gone.iter().all(|k| !keys.contains(&k.to_string())),
        "want only {want_key}: {:?}, keys {keys:?}\nstatus 33 s after S3 came back:\n{st}\n{}",
        state(&b, want_key, &data),
        tail(&m.log_text())
    );
}

// ---------------------------------------------------------------------
// A9: kill -9 right after a rename of a dirty open file and more writes.

#[test]
fn a9_kill_9_after_rename_of_an_open_file_and_more_writes() {
    let b = Bucket::new(server(), "a9", false);
    let m = Mount::new(&b, "");
    let mut f = fs::File::create(m.path("log")).unwrap();
    f.write_all(b"before rename\n").unwrap();
    fs::rename(m.path("log"), m.path("log.1")).unwrap();
    f.write_all(b"after rename\n").unwrap();
    f.sync_all().unwrap();
    f.write_all(b"after fsync\n").unwrap();
    kill9(&m);
    drop(f);
    m.restart();
    let keys = b.keys("");
    let got = b.get("log.1").unwrap_or_default();
    eprintln!("keys {keys:?} log.1 {:?}", String::from_utf8_lossy(&got));
    assert!(
        got.starts_with(b"before rename\nafter rename\n"),
        "fsync'd bytes lost at the new name: {:?}",
        String::from_utf8_lossy(&got)
    );
    assert_eq!(recovered_keys(&b), Vec::<String>::new());
    assert!(
        !keys.contains(&"log".to_string()),
        "old name resurrected: {keys:?}"
    );
    assert_eq!(b.open_multipart_uploads(), 0);
}

// ---------------------------------------------------------------------
// A10: kill -9 after a directory rename with an open dirty file inside.

#[test]
fn a10_kill_9_after_directory_rename_with_an_open_dirty_file() {
    let b = Bucket::new(server(), "a10", false);
    let m = Mount::new(&b, "");
    fs::create_dir(m.path("d")).unwrap();
    fs::write(m.path("d/other"), b"other").unwrap();
    let mut f = fs::File::create(m.path("d/f")).unwrap();
    f.write_all(b"one\n").unwrap();
    fs::rename(m.path("d"), m.path("e")).unwrap();
    f.write_all(b"two\n").unwrap();
    f.sync_all().unwrap();
    f.write_all(b"three\n").unwrap();
    kill9(&m);
    drop(f);
    m.restart();
    let keys = b.keys("");
    let got = b.get("e/f").unwrap_or_default();
    eprintln!("keys {keys:?}, e/f {:?}", String::from_utf8_lossy(&got));
    assert!(
        got.starts_with(b"one\ntwo\n"),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    assert!(
        keys.iter().all(|k| !k.starts_with("d/")),
        "old directory resurrected: {keys:?}"
    );
    assert_eq!(recovered_keys(&b), Vec::<String>::new());
}

// ---------------------------------------------------------------------
// A11: chmod 600 of a dirty open file, then kill -9: the recovered object
// must not be readable by others.

#[test]
fn a11_kill_9_after_chmod_600_of_a_dirty_open_file() {
    let b = Bucket::new(server(), "a11", false);
    let m = Mount::new(&b, "allow_other");
    let mut f = fs::File::create(m.path("secret")).unwrap();
    f.write_all(b"password=hunter2\n").unwrap();
    fs::set_permissions(m.path("secret"), fs::Permissions::from_mode(0o600)).unwrap();
    f.write_all(b"more\n").unwrap();
    kill9(&m);
    drop(f);
    m.restart();
    // The restarted mount uploads what was staged in the background: on a
    // loaded machine the object is not in S3 yet when the mount is live.
    wait_until(Duration::from_secs(60), "the recovered upload", || {
        b.get("secret").is_some()
    });
    let meta = b.metadata("secret");
    let d = m.dir.display();
    let (ok, out) = as_user(1000, &format!("cat {d}/secret"));
    assert!(
        !ok,
        "uid 1000 reads a file chmod'ed 600 before the crash: {out} (meta {meta:?})"
    );
}

// ---------------------------------------------------------------------
// A12: versions of a file that was 0600 then became 0644.

#[test]
fn a12_old_0600_version_readable_after_chmod_644() {
    let b = Bucket::new(server(), "a12", true);
    let m = Mount::new(&b, "allow_other");
    fs::write(m.path("notes"), b"password=hunter2\n").unwrap();
    fs::set_permissions(m.path("notes"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(m.path("notes"), b"nothing to see\n").unwrap();
    fs::set_permissions(m.path("notes"), fs::Permissions::from_mode(0o644)).unwrap();
    let d = m.dir.display();
    let (_, out) = as_user(1000, &format!("cat {d}/.versions/notes/* 2>&1"));
    assert!(
        !out.contains("hunter2"),
        "uid 1000 read the content of a version that was 0600: {out}"
    );
}

// ---------------------------------------------------------------------
// A13: other uid on the cache dir and on a pending file.

#[test]
fn a13_other_uid_cannot_read_staged_data_of_a_0600_file() {
    let (proxy, b, m) = through_proxy("a13", false, "allow_other,upload_retry_max=1");
    proxy.inject("PUT", 1_000_000, Fault::Status(503));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(m.path("secret"))
        .unwrap();
    f.write_all(b"password=hunter2\n").unwrap();
    let _ = close(f);
    let d = m.dir.display();
    let c = m.cache_dir().display();
    let (_, out) = as_user(
        1000,
        &format!("cat {d}/secret; ls -la {d}; grep -r hunter2 {c} 2>&1; find {c} 2>&1 | head"),
    );
    proxy.clear();
    assert!(!out.contains("hunter2"), "{out}");
    drop(b);
}

// ---------------------------------------------------------------------
// A14: the plainest failed close: a 503 burst over close only, then S3
// is back. Does the background retry ever run?

#[test]
fn a14_a_failed_close_lands_by_itself_once_s3_is_back() {
    let (proxy, b, m) = through_proxy("a14", false, "upload_retry_max=1");
    let data = pattern(2 * MIB, 14);
    let mut f = fs::File::create(m.path("f")).unwrap();
    f.write_all(&data).unwrap();
    proxy.inject("PUT", 1_000_000, Fault::Status(503));
    let c = close(f);
    assert!(c.is_err());
    // Release (the upload that follows close) is async: give it its time.
    std::thread::sleep(Duration::from_secs(2));
    proxy.clear();
    let landed = poll(Duration::from_secs(30), || state(&b, "f", &data).is_ok());
    let st = status(&m);
    assert!(
        landed,
        "a failed close never landed 30 s after S3 came back: {:?}\nstatus:\n{st}\n{}",
        state(&b, "f", &data),
        tail(&m.log_text())
    );
}

// ---------------------------------------------------------------------
// A15: create / rm inside a directory while that directory is being
// renamed (made slow by a proxy that holds CopyObject answers 3 s).
// The kernel does not lock the moved directory itself, so both reach
// the daemon during the rename.

#[test]
fn a15_create_and_rm_inside_a_directory_being_renamed() {
    let (proxy, b, m) = through_proxy("a15", false, "");
    fs::create_dir(m.path("d")).unwrap();
    fs::write(m.path("d/old"), b"old").unwrap();
    fs::write(m.path("d/victim"), b"victim").unwrap();
    proxy.inject("PUT", 10, Fault::Delay(3));
    let (from, to) = (m.path("d"), m.path("e"));
    let mv = std::thread::spawn(move || fs::rename(from, to));
    std::thread::sleep(Duration::from_millis(700));
    // Both resolve `d` (its dentry stays until the rename returns).
    let p = m.path("d/new");
    let creator = std::thread::spawn(move || -> std::io::Result<()> {
        let mut f = fs::File::create(p)?;
        f.write_all(b"created during the mv")?;
        close(f)
    });
    let p = m.path("d/victim");
    let remover = std::thread::spawn(move || fs::remove_file(p));
    let mvr = mv.join().unwrap();
    let cr = creator.join().unwrap();
    let rmr = remover.join().unwrap();
    proxy.clear();
    let keys = b.keys("");
    let listed: Vec<String> = fs::read_dir(&m.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    eprintln!("mv {mvr:?}, create {cr:?}, rm {rmr:?}; keys {keys:?}; root lists {listed:?}");
    let mut problems = Vec::new();
    if cr.is_ok() && !keys.contains(&"e/new".to_string()) {
        problems
            .push("a file created (close OK) in the renamed directory is not under its new name");
    }
    if keys.iter().any(|k| k.starts_with("d/")) {
        problems.push("keys under the old directory name: it came back");
    }
    if rmr.is_ok() && keys.contains(&"e/victim".to_string()) {
        problems.push("rm returned success but the file is still there");
    }
    assert!(problems.is_empty(), "{problems:?}; keys {keys:?}");
}

// ---------------------------------------------------------------------
// A16: one stalled upload freezes unrelated namespace operations in the
// whole mount: `mv` of the directory holding a file whose close is
// uploading takes the namespace lock for writing and waits for the
// upload; every create/mkdir/rm anywhere queues behind it.

// ---------------------------------------------------------------------
// A17: a large directory listed by another uid: entries past the first
// readdirplus reply go to the kernel before their metadata is read.
// Every 0600 root file must stay unreadable, every symlink a symlink.

#[test]
fn a17_large_listing_never_lends_defaults_to_other_users() {
    let b = Bucket::new(server(), "a17", false);
    let n = 400;
    std::thread::scope(|s| {
        for chunk in 0..8 {
            let b = &b;
            s.spawn(move || {
                for i in (chunk..n).step_by(8) {
                    if i % 50 == 49 {
                        b.put_meta(
                            &format!("big/f{i:04}"),
                            b"secret-target",
                            &[("mode", "41471"), ("uid", "0"), ("gid", "0")],
                        );
                    } else {
                        b.put_meta(
                            &format!("big/f{i:04}"),
                            format!("secret {i}").as_bytes(),
                            &[("mode", "33152"), ("uid", "0"), ("gid", "0")],
                        );
                    }
                }
            });
        }
    });
    let m = Mount::new(&b, "allow_other");
    let d = m.dir.display();
    // uid 1000: list (readdirplus) and immediately try to read each.
    let (_, out) = as_user(
        1000,
        &format!(
            "cd {d}/big && for f in $(ls -f); do cat \"$f\" 2>/dev/null; done; \
             python3 -c 'import os\nfor e in os.scandir(\".\"):\n  try: print(open(e.name).read())\n  except Exception: pass'"
        ),
    );
    assert!(
        !out.contains("secret"),
        "uid 1000 read 0600 files: {}",
        &out[..out.len().min(500)]
    );
    // Root: ls -l of everything must not fail (EIO from a type change).
    let ls = Command::new("ls")
        .arg("-l")
        .arg(m.path("big"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&ls.stderr);
    let links = String::from_utf8_lossy(&ls.stdout)
        .lines()
        .filter(|l| l.starts_with('l'))
        .count();
    assert!(
        ls.status.success() && links == n / 50,
        "ls -l: {err} (symlinks shown: {links})"
    );
}

// ---------------------------------------------------------------------
// A18: the minimal form of A8: a failed close, then a rename attempt
// (which fails too) holding the file's state while its background retry
// is due: the retrier skips it and nothing ever lands.

#[test]
fn a18_a_pending_upload_busy_when_its_retry_is_due_is_never_retried() {
    let (proxy, b, m) = through_proxy("a18", false, "upload_retry_max=1");
    let data = pattern(2 * MIB, 18);
    let mut f = fs::File::create(m.path("f")).unwrap();
    f.write_all(&data).unwrap();
    proxy.inject("PUT", 1_000_000, Fault::Status(503));
    assert!(close(f).is_err());
    // A rename attempt holds the file's state while the retry is due. (A
    // file none of whose bytes were sent is renamed without S3: it then
    // lands at its new name.)
    let mut key = "f";
    for _ in 0..3 {
        if fs::rename(m.path(key), m.path("g")).is_ok() {
            key = "g";
        }
    }
    proxy.clear();
    let landed = poll(Duration::from_secs(30), || state(&b, key, &data).is_ok());
    let st = status(&m);
    assert!(
        landed,
        "not retried 30 s after S3 came back: {:?}\nstatus:\n{st}",
        state(&b, key, &data)
    );
    assert_eq!(b.keys(""), [key], "one object, at the file's name");
}

// ---------------------------------------------------------------------
// A19: a descriptor inherited by a child that writes after the opener
// closed: the child's close() returns before its bytes are in S3.

#[test]
fn a19_close_by_a_child_that_wrote_after_the_opener_closed_waits_for_s3() {
    let (proxy, b, m) = through_proxy("a19", false, "upload_retry_max=1");
    let p = m.path("log");
    let script = r#"
import os, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
os.write(fd, b"parent\n")
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.read(r, 1)                 # wait for the parent's close
    time.sleep(1.5)               # and for the test to stall PUTs
    os.write(fd, b"child\n")
    t = time.time()
    os.close(fd)
    print("child close ok after %.2fs" % (time.time() - t), flush=True)
    os._exit(0)
os.close(fd)                      # the opener closes first
os.write(w, b"x")
os.waitpid(pid, 0)
"#;
    // The opener's close goes through; then every PUT stalls.
    let child = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&p)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Stall PUTs once the parent's upload landed.
    assert!(poll(Duration::from_secs(20), || b.get("log").is_some()));
    proxy.inject("PUT", 3, Fault::Stall);
    let out = child.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    let now = b.get("log").unwrap_or_default();
    eprintln!(
        "child said {said:?}; S3 holds {:?}",
        String::from_utf8_lossy(&now)
    );
    proxy.clear();
    assert!(
        !said.contains("close ok") || now == b"parent\nchild\n",
        "the child's close() returned 0 ({said:?}) while S3 holds {:?}",
        String::from_utf8_lossy(&now)
    );
}

// ---------------------------------------------------------------------
// A20: a chmod whose S3 self-copy fails must not show the new mode.

#[test]
fn a20_a_failed_chmod_changes_nothing_visible() {
    let (proxy, b, m) = through_proxy("a20", false, "");
    fs::write(m.path("f"), b"data").unwrap();
    fs::set_permissions(m.path("f"), fs::Permissions::from_mode(0o600)).unwrap();
    proxy.inject("PUT", 1_000_000, Fault::Status(503));
    let r = fs::set_permissions(m.path("f"), fs::Permissions::from_mode(0o644));
    // The kernel forgets its copy; the daemon is asked again.
    fs::write("/proc/sys/vm/drop_caches", "2").unwrap();
    let shown = fs::metadata(m.path("f")).unwrap().mode() & 0o777;
    proxy.clear();
    let stored = b.metadata("f").get("mode").cloned();
    eprintln!("chmod {r:?}, shown {shown:o}, stored {stored:?}");
    assert!(
        r.is_ok() || shown == 0o600,
        "chmod failed ({r:?}) yet the mount shows {shown:o} (S3 says mode {stored:?})"
    );
}

// ---------------------------------------------------------------------
// A21: a large new file streamed while written, renamed half-way, more
// writes, an fsync, then kill -9.

#[test]
fn a21_streamed_file_renamed_mid_write_then_kill_9() {
    let b = Bucket::new(server(), "a21", false);
    let m = Mount::new(&b, "");
    let first = pattern(24 * MIB, 21);
    let second = pattern(12 * MIB, 22);
    let mut f = fs::File::create(m.path("big")).unwrap();
    for c in first.chunks(128 * 1024) {
        f.write_all(c).unwrap();
    }
    fs::rename(m.path("big"), m.path("big.1")).unwrap();
    for c in second.chunks(128 * 1024) {
        f.write_all(c).unwrap();
    }
    f.sync_all().unwrap();
    f.write_all(b"unsynced tail").unwrap();
    kill9(&m);
    drop(f);
    m.restart();
    let mut want = first.clone();
    want.extend_from_slice(&second);
    // The tail was written (into the staged file) before the kill: the
    // recovery lands it too. Until then big.1 holds what the fsync sent,
    // and the recovery's upload may not have begun yet: "settled" is the
    // whole file there and no upload open.
    let mut whole = want.clone();
    whole.extend_from_slice(b"unsynced tail");
    let settled = poll(Duration::from_secs(60), || {
        b.open_multipart_uploads() == 0 && b.get("big.1").is_some_and(|g| g == whole)
    });
    let got = b.get("big.1").unwrap_or_default();
    let keys = b.keys("");
    assert!(
        got.len() >= want.len() && got[..want.len()] == want[..],
        "fsync'd bytes not at big.1: {} bytes; keys {keys:?}",
        got.len()
    );
    assert!(
        settled,
        "the written tail did not land: {} bytes",
        got.len()
    );
    assert_eq!(recovered_keys(&b), Vec::<String>::new());
    assert!(!keys.contains(&"big".to_string()), "{keys:?}");
    assert_eq!(b.open_multipart_uploads(), 0);
}

// ---------------------------------------------------------------------
// A22: crash loop with namespace operations in flight (what tests/crash.rs
// does not do): per thread, in its own directory, create/overwrite,
// append, rename (over existing too), rm, chmod and a rename of the
// directory itself; kill -9 at a random moment; remount; every confirmed
// file exact at its confirmed name, every confirmed rm absent, no
// recovered keys, no open multipart uploads.

#[derive(Default, Clone)]
struct Model {
    dir: String,
    files: std::collections::BTreeMap<String, Vec<u8>>,
    removed: std::collections::BTreeSet<String>,
    /// Names an operation that did not return OK touched (in flight at
    /// the kill, or failed and maybe pending), until a later success.
    in_flight: Vec<String>,
    dir_in_flight: bool,
    log: Vec<String>,
}

fn a22_round(seed: u64) {
    let b = Bucket::new(server(), "a22", false);
    let m = Mount::new(&b, "");
    let models: Vec<Arc<Mutex<Model>>> = (0..2)
        .map(|t| {
            let dir = format!("t{t}");
            fs::create_dir(m.path(&dir)).unwrap();
            Arc::new(Mutex::new(Model {
                dir,
                ..Default::default()
            }))
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for (t, model) in models.iter().enumerate() {
        let (model, stop, root) = (model.clone(), stop.clone(), m.dir.clone());
        threads.push(std::thread::spawn(move || {
            let mut x = (seed * 2 + t as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let mut rnd = |n: u64| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x % n
            };
            let mut step = 0u64;
            while !stop.load(Ordering::Relaxed) {
                step += 1;
                let dir = model.lock().unwrap().dir.clone();
                let name = format!("f{}", rnd(5));
                let other = format!("f{}", rnd(5));
                let p = root.join(&dir).join(&name);
                match rnd(10) {
                    0..=3 => {
                        let len = [1000, 200_000, 3 * MIB, 9 * MIB][rnd(4) as usize];
                        let data = pattern(len, seed ^ step ^ ((t as u64) << 40));
                        model.lock().unwrap().in_flight.push(name.clone());
                        let r = fs::File::create(&p).and_then(|mut f| {
                            for c in data.chunks(128 * 1024) {
                                f.write_all(c)?;
                            }
                            close(f)
                        });
                        let mut md = model.lock().unwrap();
                        md.log.push(format!("{dir}/{name} write {len}: {r:?}"));
                        if r.is_ok() {
                            md.files.insert(name.clone(), data);
                            md.removed.remove(&name);
                            md.in_flight.retain(|n| *n != name && *n != other);
                        }
                    }
                    4 => {
                        let Some(mut cur) = model.lock().unwrap().files.get(&name).cloned() else {
                            continue;
                        };
                        let add = pattern(50_000, step);
                        model.lock().unwrap().in_flight.push(name.clone());
                        let r = fs::OpenOptions::new()
                            .append(true)
                            .open(&p)
                            .and_then(|mut f| {
                                f.write_all(&add)?;
                                close(f)
                            });
                        model
                            .lock()
                            .unwrap()
                            .log
                            .push(format!("{dir}/{name} append: {r:?}"));
                        if r.is_ok() {
                            cur.extend_from_slice(&add);
                            let mut md = model.lock().unwrap();
                            md.files.insert(name.clone(), cur);
                            md.in_flight.retain(|n| *n != name && *n != other);
                        }
                    }
                    5 | 6 => {
                        if name == other || !model.lock().unwrap().files.contains_key(&name) {
                            continue;
                        }
                        model
                            .lock()
                            .unwrap()
                            .in_flight
                            .extend([name.clone(), other.clone()]);
                        let r = fs::rename(&p, root.join(&dir).join(&other));
                        model
                            .lock()
                            .unwrap()
                            .log
                            .push(format!("{dir}/{name} -> {other}: {r:?}"));
                        if r.is_ok() {
                            let mut md = model.lock().unwrap();
                            let d = md.files.remove(&name).unwrap();
                            md.files.insert(other.clone(), d);
                            md.removed.insert(name.clone());
                            md.removed.remove(&other);
                            md.in_flight.retain(|n| *n != name && *n != other);
                        }
                    }
                    7 => {
                        if !model.lock().unwrap().files.contains_key(&name) {
                            continue;
                        }
                        model.lock().unwrap().in_flight.push(name.clone());
                        let r = fs::remove_file(&p);
                        model
                            .lock()
                            .unwrap()
                            .log
                            .push(format!("rm {dir}/{name}: {r:?}"));
                        if r.is_ok() {
                            let mut md = model.lock().unwrap();
                            md.files.remove(&name);
                            md.removed.insert(name.clone());
                            md.in_flight.retain(|n| *n != name && *n != other);
                        }
                    }
                    8 => {
                        let r = fs::set_permissions(&p, fs::Permissions::from_mode(0o600));
                        model
                            .lock()
                            .unwrap()
                            .log
                            .push(format!("chmod {dir}/{name}: {r:?}"));
                    }
                    _ => {
                        let new = if dir.ends_with('x') {
                            dir.trim_end_matches('x').to_string()
                        } else {
                            format!("{dir}x")
                        };
                        model.lock().unwrap().dir_in_flight = true;
                        let r = fs::rename(root.join(&dir), root.join(&new));
                        model
                            .lock()
                            .unwrap()
                            .log
                            .push(format!("mv {dir} {new}: {r:?}"));
                        if r.is_ok() {
                            let mut md = model.lock().unwrap();
                            md.dir = new;
                            md.dir_in_flight = false;
                        }
                    }
                }
            }
        }));
    }
    let wait = 1500 + (seed * 7919) % 3000;
    std::thread::sleep(Duration::from_millis(wait));
    kill9(&m);
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    m.restart();
    // Recovery uploads in the background once the mount is live: wait for
    // it to settle (bounded) before judging.
    let settled = poll(Duration::from_secs(90), || {
        status(&m).contains("not yet in S3: 0 file(s)") && b.open_multipart_uploads() == 0
    });
    let keys = b.keys("");
    let mut problems = Vec::new();
    if !settled {
        problems.push("recovery did not settle within 90 s".to_string());
    }
    for model in &models {
        let md = model.lock().unwrap();
        if md.dir_in_flight {
            continue; // a directory half-moved: documented as not atomic
        }
        for (name, data) in &md.files {
            if md.in_flight.contains(name) {
                continue;
            }
            if let Err(e) = state(&b, &format!("{}/{name}", md.dir), data) {
                problems.push(e);
            }
        }
        for name in &md.removed {
            let key = format!("{}/{name}", md.dir);
            if !md.in_flight.contains(name) && !md.files.contains_key(name) && keys.contains(&key) {
                problems.push(format!("{key}: removed/renamed away, but back"));
            }
        }
    }
    if !recovered_keys(&b).is_empty() {
        problems.push(format!("recovered keys: {:?}", recovered_keys(&b)));
    }
    if b.open_multipart_uploads() > 0 {
        problems.push(format!(
            "{} multipart uploads open",
            b.open_multipart_uploads()
        ));
    }
    for model in &models {
        let md = model.lock().unwrap();
        eprintln!(
            "ops of {}: in flight {:?}\n  {}",
            md.dir,
            md.in_flight,
            md.log.join("\n  ")
        );
    }
    assert!(
        problems.is_empty(),
        "seed {seed}: {problems:?}\nkeys {keys:?}\n{}",
        tail(&m.log_text())
    );
}

#[test]
fn a22_crash_loop_with_renames_rm_chmod_and_dir_renames_in_flight() {
    let seeds: Vec<u64> = match std::env::var("A22_SEED") {
        Ok(s) => vec![s.parse().unwrap()],
        Err(_) => (1..=4).collect(),
    };
    for s in seeds {
        eprintln!("a22 seed {s}");
        a22_round(s);
    }
}

/// Without XDG_RUNTIME_DIR a user's status sockets live in a predictable
/// directory under /tmp, which another user can make first and fill with
/// a socket of their own: `bucketfs status` and `bucketfs url` talk only
/// to a socket served by the user or root.
#[test]
fn a_status_socket_served_by_another_user_is_not_believed() {
    use std::io::BufRead;
    let victim = 1001;
    let place = std::path::PathBuf::from(format!("/tmp/bucketfs-spoof-{}", std::process::id()));
    fs::create_dir_all(place.join("m")).unwrap();
    fs::write(place.join("m/report.pdf"), b"x").unwrap();
    for p in [place.clone(), place.join("m"), place.join("m/report.pdf")] {
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
    }
    let dir = format!("/tmp/bucketfs-{victim}");
    let _ = fs::remove_dir_all(&dir);
    use sha2::Digest;
    let hash = |p: &std::path::Path| {
        let d = sha2::Sha256::digest(p.as_os_str().as_encoded_bytes());
        d[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let sockets: Vec<String> = [place.join("m"), place.clone()]
        .iter()
        .map(|p| format!("{dir}/{}.sock", hash(p)))
        .collect();
    // The other user's server: answers anything with its own text.
    let server = format!(
        r#"
import os, socket, sys, threading
os.makedirs("{dir}", exist_ok=True)
os.chmod("{dir}", 0o755)
def serve(path):
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    os.chmod(path, 0o777)
    s.listen(8)
    while True:
        c, _ = s.accept()
        c.sendall(b"ok https://attacker.example/phish\n")
        c.close()
for p in sys.argv[1:]:
    threading.Thread(target=serve, args=(p,), daemon=True).start()
import time
time.sleep(0.5)
print("ready", flush=True)
time.sleep(60)
"#
    );
    // The system's Python: another user may not reach root's (pyenv).
    let py = ["/usr/bin/python3", "/usr/local/bin/python3"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or("python3");
    let mut attacker = Command::new("setpriv")
        .args(["--reuid", "1002", "--regid", "1002", "--clear-groups"])
        .args([py, "-c", &server])
        .args(&sockets)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(attacker.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
    let run = |args: &str| {
        as_user(
            victim,
            &format!("env -u XDG_RUNTIME_DIR TMPDIR=/tmp {} {args}", bin()),
        )
    };
    let (ok, out) = run(&format!("status {}", place.join("m").display()));
    let (url_ok, url_out) = run(&format!("url {}", place.join("m/report.pdf").display()));
    // A link to a socket root serves (another mount's): not followed.
    let rooted = place.join("root.sock");
    let listener = std::os::unix::net::UnixListener::bind(&rooted).unwrap();
    fs::set_permissions(&rooted, fs::Permissions::from_mode(0o777)).unwrap();
    let other = place.join("other");
    fs::create_dir(&other).unwrap();
    fs::set_permissions(&other, fs::Permissions::from_mode(0o755)).unwrap();
    let link = format!("{dir}/{}.sock", hash(&other));
    let (linked, err) = as_user(1002, &format!("ln -s {} {link}", rooted.display()));
    let served = std::thread::spawn(move || {
        listener.set_nonblocking(true).unwrap();
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if let Ok((mut c, _)) = listener.accept() {
                let _ = c.write_all(b"report of another mount\n");
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    });
    let (link_ok, link_out) = run(&format!("status {}", other.display()));
    let _ = attacker.kill();
    let _ = attacker.wait();
    let _ = fs::remove_dir_all(&dir);
    let _ = fs::remove_dir_all(&place);
    assert!(
        !ok && out.contains("not a socket of this user or root"),
        "status: {out}"
    );
    assert!(!out.contains("attacker"), "status: {out}");
    assert!(!url_ok && !url_out.contains("attacker"), "url: {url_out}");
    assert!(linked, "{err}");
    assert!(
        !link_ok && !link_out.contains("another mount"),
        "{link_out}"
    );
    let _ = served.join();
}
