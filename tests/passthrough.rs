//! `-o passthrough` through a real mount over moto: the kernel writes a
//! new or emptied file straight to its staged copy, and what a user
//! checks must hold as without it: the bytes in S3 (hashed through the
//! S3 API) after close, one PUT for `echo x > f`, `stat` sizes while
//! written, other handles with a rename, chmod or unlink between their
//! writes, and nothing lost to a kill -9 at any point: before any upload,
//! or after one landed and more was written. That the kernel, not the
//! daemon, did the writes is checked by the daemon's own write count
//! (`/proc/PID/io`), which passthrough writes never reach.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::time::Duration;

use common::*;

const MIB: usize = 1024 * 1024;

fn mount(b: &Bucket) -> Mount {
    let m = Mount::new(b, "passthrough");
    assert!(
        !m.log_text().contains("passthrough is off"),
        "passthrough is on: {}",
        m.log_text()
    );
    m
}

/// Bytes the daemon wrote with write(2) and its like, so far.
fn daemon_wrote(m: &Mount) -> u64 {
    let io = fs::read_to_string(format!("/proc/{}/io", m.pid().unwrap())).unwrap();
    io.lines()
        .find_map(|l| l.strip_prefix("wchar:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Writes `data` in 4 KiB writes at `offset`.
fn write_small(f: &fs::File, data: &[u8], offset: u64) {
    for (i, c) in data.chunks(4096).enumerate() {
        f.write_all_at(c, offset + (i * 4096) as u64).unwrap();
    }
}

/// A new file of `len` zero bytes at `name`, open read-write, and a
/// shared writable mapping of all of it.
fn mapped_new_file(m: &Mount, name: &str, len: usize) -> (fs::File, *mut u8) {
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(m.path(name))
        .unwrap();
    f.set_len(len as u64).unwrap();
    // SAFETY: a fresh shared mapping of `len` bytes of an open file.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            std::os::fd::AsRawFd::as_raw_fd(&f),
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
    (f, p as *mut u8)
}

fn staged_files(m: &Mount) -> Vec<std::path::PathBuf> {
    files_below(&m.cache_dir().join("staging"))
}

#[test]
fn small_writes_reach_the_staged_file_without_the_daemon_and_land_at_close() {
    if !passthrough_available() {
        return;
    }
    let b = Bucket::new(server(), "pt-small", false);
    let m = mount(&b);
    let data = pattern(4 * MIB, 1);
    let before = daemon_wrote(&m);
    let f = fs::File::create(m.path("f")).unwrap();
    write_small(&f, &data, 0);
    let wrote = daemon_wrote(&m) - before;
    assert!(
        wrote < MIB as u64,
        "the daemon wrote {wrote} bytes for 4 MiB of writes: not passthrough"
    );
    // Sizes while written, by descriptor and by name.
    assert_eq!(f.metadata().unwrap().len(), data.len() as u64);
    assert_eq!(fs::metadata(m.path("f")).unwrap().len(), data.len() as u64);
    // A reader opened meanwhile reads what was written.
    let mut got = Vec::new();
    fs::File::open(m.path("f"))
        .unwrap()
        .read_to_end(&mut got)
        .unwrap();
    assert_eq!(sha256(&got), sha256(&data), "a reader during the writes");
    assert_eq!(b.get("f"), None, "nothing is sent before close");
    close(f).unwrap();
    assert_eq!(state(&b, "f", &data), Ok(()), "in S3 when close returns");
    assert_eq!(requests(&m, "PUT"), 1, "one PUT");
    assert_eq!(requests(&m, "CREATE_MULTIPART"), 0);
    let md = fs::metadata(m.path("f")).unwrap();
    assert_eq!(md.len(), data.len() as u64);
    assert!(
        poll(Duration::from_secs(30), || staged_files(&m).is_empty()),
        "staged copy and journal go once the data is in S3: {:?}",
        staged_files(&m)
    );
}

#[test]
fn a_shell_redirection_is_one_put_and_a_large_file_lands_whole() {
    if !passthrough_available() {
        return;
    }
    let b = Bucket::new(server(), "pt-shell", false);
    let m = mount(&b);
    // The shell opens, dup2s and closes the original before echo writes.
    sh(&m.dir, "echo hello > e");
    assert_eq!(state(&b, "e", b"hello\n"), Ok(()));
    assert_eq!(requests(&m, "PUT"), 1, "one PUT for `echo x > f`");
    // dd rewrites it with O_TRUNC; 20 MiB goes up in parts at close.
    sh(
        &m.dir,
        "head -c 20971520 /dev/urandom > /tmp/pt-src-$$ && dd if=/tmp/pt-src-$$ of=e bs=4k status=none && cmp /tmp/pt-src-$$ e && sha256sum < /tmp/pt-src-$$ > /tmp/pt-sum && rm /tmp/pt-src-$$",
    );
    let want = fs::read_to_string("/tmp/pt-sum").unwrap();
    let got = b.get("e").expect("the dd output in S3");
    assert_eq!(
        sha256(&got),
        want.split_whitespace().next().unwrap(),
        "dd's bytes in S3"
    );
    assert_eq!(got.len(), 20 * MIB);
}

#[test]
fn kill_9_with_a_passthrough_writer_open_loses_nothing() {
    if !passthrough_available() {
        return;
    }
    let b = Bucket::new(server(), "pt-kill", false);
    b.put("old", &pattern(100_000, 2));
    let m = mount(&b);
    let new = pattern(3 * MIB + 5, 3);
    let f = fs::File::create(m.path("new")).unwrap();
    write_small(&f, &new, 0);
    let rewrite = pattern(70_000, 4);
    let g = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(m.path("old"))
        .unwrap();
    write_small(&g, &rewrite, 0);
    kill9(&m);
    drop((f, g));
    m.restart();
    assert_lands(&b, "new", &new, Duration::from_secs(60), "the new file");
    assert_lands(&b, "old", &rewrite, Duration::from_secs(60), "the rewrite");
    assert!(recovered_keys(&b).is_empty(), "{:?}", b.keys(""));
}

/// The case the journal must get right: an upload landed (fsync), then
/// the kernel wrote more, which the daemon never saw, then the daemon
/// died. The next mount must send the staged file again, not take the
/// landed upload for all of it. The writer keeps its descriptor across
/// the restart and writes on (the kernel still takes passthrough writes
/// of a dead mount): the new mount takes the file over once it closes.
#[test]
fn kill_9_after_an_upload_landed_and_more_was_written_loses_nothing() {
    if !passthrough_available() {
        return;
    }
    let b = Bucket::new(server(), "pt-after", false);
    let m = mount(&b);
    // A single PUT (small), and a multipart upload (large).
    let files = [("small", 300_000), ("large", 18 * MIB)];
    let mut open = Vec::new();
    let mut wants = Vec::new();
    for (key, len) in files {
        let mut want = pattern(len, 5);
        let f = fs::File::create(m.path(key)).unwrap();
        write_small(&f, &want, 0);
        f.sync_all().unwrap();
        assert_eq!(state(&b, key, &want), Ok(()), "{key}: fsync landed");
        // Same size, new bytes: only the stamp's times tell.
        let patch = pattern(10_000, 6);
        f.write_all_at(&patch, 1000).unwrap();
        want[1000..11_000].copy_from_slice(&patch);
        open.push(f);
        wants.push(want);
    }
    kill9(&m);
    m.restart();
    for (f, want) in open.iter().zip(&mut wants) {
        if f.write_all_at(b"late", 20).is_ok() {
            want[20..24].copy_from_slice(b"late");
        }
    }
    for ((key, _), want) in files.iter().zip(&wants) {
        assert_ne!(
            state(&b, key, want),
            Ok(()),
            "{key}: not before its writer closed"
        );
    }
    drop(open);
    for ((key, _), want) in files.iter().zip(&wants) {
        assert_lands(&b, key, want, Duration::from_secs(60), key);
    }
    assert!(recovered_keys(&b).is_empty(), "{:?}", b.keys(""));
}

#[test]
fn a_write_after_fsync_of_the_same_size_is_uploaded_at_close() {
    if !passthrough_available() {
        return;
    }
    let b = Bucket::new(server(), "pt-same", false);
    let m = mount(&b);
    let first = pattern(200_000, 7);
    let f = fs::File::create(m.path("f")).unwrap();
    write_small(&f, &first, 0);
    f.sync_all().unwrap();
    assert_eq!(state(&b, "f", &first), Ok(()));
    let mut want = first.clone();
    want[..3].copy_from_slice(b"xyz");
    f.write_all_at(b"xyz", 0).unwrap();
    // A truncation through the same descriptor goes by the daemon.
    f.set_len(150_000).unwrap();
    want.truncate(150_000);
    assert_eq!(fs::metadata(m.path("f")).unwrap().len(), 150_000);
    close(f).unwrap();
    assert_eq!(state(&b, "f", &want), Ok(()), "at close");
}

#[test]
fn two_handles_with_a_rename_and_a_chmod_between_their_writes() {
    if !passthrough_available() {
        return;
    }
    let b = Bucket::new(server(), "pt-two", false);
    let m = mount(&b);
    let h1 = fs::File::create(m.path("a")).unwrap();
    let p1 = pattern(2 * MIB, 8);
    write_small(&h1, &p1, 0);
    // A second opener of the same file shares the kernel's backing file.
    let h2 = fs::OpenOptions::new()
        .write(true)
        .open(m.path("a"))
        .unwrap();
    fs::rename(m.path("a"), m.path("b")).unwrap();
    fs::set_permissions(m.path("b"), fs::Permissions::from_mode(0o640)).unwrap();
    let p2 = pattern(MIB, 9);
    write_small(&h2, &p2, p1.len() as u64);
    let p3 = pattern(4096, 10);
    h1.write_all_at(&p3, 4096).unwrap();
    close(h2).unwrap();
    close(h1).unwrap();
    let mut want = p1.clone();
    want[4096..8192].copy_from_slice(&p3);
    want.extend_from_slice(&p2);
    assert_eq!(state(&b, "b", &want), Ok(()));
    assert_eq!(b.get("a"), None, "nothing at the old name");
    assert_eq!(
        b.metadata("b").get("mode").map(String::as_str),
        Some("33184")
    );
    let md = fs::metadata(m.path("b")).unwrap();
    assert_eq!((md.len(), md.mode()), (want.len() as u64, 0o100640));
}

#[test]
fn an_unlink_between_two_handles_uploads_nothing() {
    if !passthrough_available() {
        return;
    }
    let b = Bucket::new(server(), "pt-rm", false);
    let m = mount(&b);
    let h1 = fs::File::create(m.path("gone")).unwrap();
    write_small(&h1, &pattern(MIB, 11), 0);
    let mut h2 = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.path("gone"))
        .unwrap();
    fs::remove_file(m.path("gone")).unwrap();
    h1.write_all_at(b"more", 10).unwrap();
    let mut head = [0u8; 14];
    h2.read_exact(&mut head).unwrap();
    assert_eq!(&head[10..], b"more", "the open file reads on");
    h2.write_all(b"still").unwrap();
    close(h1).unwrap();
    close(h2).unwrap();
    assert_eq!(b.get("gone"), None);
    assert!(b.keys("").is_empty(), "{:?}", b.keys(""));
    assert!(
        poll(Duration::from_secs(30), || staged_files(&m).is_empty()),
        "{:?}",
        staged_files(&m)
    );
}

/// An `O_TRUNC` writer while a reader reads through the page cache: the
/// kernel cannot mix the two modes on one file, so the writer goes
/// through the daemon (no EIO), and the reader keeps its bytes.
#[test]
fn an_o_trunc_writer_beside_an_open_reader_is_served_without_passthrough() {
    if !passthrough_available() {
        return;
    }
    let b = Bucket::new(server(), "pt-mixed", false);
    let old = pattern(300_000, 12);
    b.put("f", &old);
    let m = mount(&b);
    let mut r = fs::File::open(m.path("f")).unwrap();
    let mut first = vec![0u8; 1000];
    r.read_exact(&mut first).unwrap();
    let before = daemon_wrote(&m);
    let new = pattern(MIB, 13);
    let w = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(m.path("f"))
        .unwrap();
    write_small(&w, &new, 0);
    assert!(
        daemon_wrote(&m) - before >= new.len() as u64,
        "the writes went by the daemon"
    );
    close(w).unwrap();
    assert_eq!(state(&b, "f", &new), Ok(()));
    drop(r);
    // Now nothing is open: the next O_TRUNC writer is passthrough again.
    let before = daemon_wrote(&m);
    let w = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(m.path("f"))
        .unwrap();
    write_small(&w, &old, 0);
    assert!(daemon_wrote(&m) - before < (MIB / 4) as u64);
    close(w).unwrap();
    assert_eq!(state(&b, "f", &old), Ok(()));
}

/// A shared writable mapping kept after close still writes to the staged
/// file: what it writes lands, and the staged copy goes only after it is
/// unmapped.
#[test]
fn writes_through_a_mapping_kept_after_close_land() {
    if !passthrough_available() {
        return;
    }
    let b = Bucket::new(server(), "pt-mmap", false);
    let m = mount(&b);
    let len = 64 * 1024;
    let (f, p) = mapped_new_file(&m, "mapped", len);
    close(f).unwrap();
    assert_eq!(state(&b, "mapped", &vec![0u8; len]), Ok(()), "at close");
    let want = pattern(len, 14);
    // SAFETY: the mapping is `len` bytes long and writable.
    unsafe { std::ptr::copy_nonoverlapping(want.as_ptr(), p, len) };
    // SAFETY: unmapping what was mapped above.
    unsafe {
        libc::msync(p as *mut libc::c_void, len, libc::MS_SYNC);
        libc::munmap(p as *mut libc::c_void, len);
    }
    assert_lands(
        &b,
        "mapped",
        &want,
        Duration::from_secs(30),
        "the mapped writes",
    );
    assert!(
        poll(Duration::from_secs(30), || staged_files(&m).is_empty()),
        "{:?}",
        staged_files(&m)
    );
    let mut got = Vec::new();
    fs::File::open(m.path("mapped"))
        .unwrap()
        .read_to_end(&mut got)
        .unwrap();
    assert_eq!(sha256(&got), sha256(&want));
}

#[test]
fn without_the_option_writes_go_by_the_daemon() {
    let b = Bucket::new(server(), "pt-off", false);
    let m = Mount::new(&b, "");
    let before = daemon_wrote(&m);
    let data = pattern(MIB, 15);
    let mut f = fs::File::create(m.path("f")).unwrap();
    f.write_all(&data).unwrap();
    assert!(daemon_wrote(&m) - before >= data.len() as u64);
    close(f).unwrap();
    assert_eq!(state(&b, "f", &data), Ok(()));
}

/// logrotate's pattern under passthrough: fsync, rename the open file,
/// chmod it, write on, then a kill. The journal must follow the file to
/// its new name and mode: the next mount puts every byte at the new name
/// and nothing back at the old one.
#[test]
fn kill_9_after_a_rename_and_chmod_of_an_open_file_puts_it_at_the_new_name() {
    if !passthrough_available() {
        return;
    }
    let b = Bucket::new(server(), "pt-rot", false);
    let m = mount(&b);
    let f = fs::File::create(m.path("a.log")).unwrap();
    let mut want = pattern(500_000, 16);
    write_small(&f, &want, 0);
    f.sync_all().unwrap();
    assert_eq!(state(&b, "a.log", &want), Ok(()));
    fs::rename(m.path("a.log"), m.path("a.log.1")).unwrap();
    fs::set_permissions(m.path("a.log.1"), fs::Permissions::from_mode(0o600)).unwrap();
    let more = pattern(70_000, 17);
    write_small(&f, &more, want.len() as u64);
    want.extend_from_slice(&more);
    kill9(&m);
    drop(f);
    m.restart();
    assert_lands(
        &b,
        "a.log.1",
        &want,
        Duration::from_secs(60),
        "at the new name",
    );
    assert_eq!(b.get("a.log"), None, "nothing back at the old name");
    assert_eq!(
        b.metadata("a.log.1").get("mode").map(String::as_str),
        Some("33152")
    );
    assert!(recovered_keys(&b).is_empty(), "{:?}", b.keys(""));
}

/// A forked child writes to the descriptor its parent opened and closed
/// first (`Popen(cmd, stdout=f)`): its exit (its close) returns once its
/// bytes are in S3, as a writer's close does.
#[test]
fn a_childs_close_after_its_writes_waits_for_s3() {
    if !passthrough_available() {
        return;
    }
    let b = Bucket::new(server(), "pt-child", false);
    let m = mount(&b);
    let f = fs::File::create(m.path("out")).unwrap();
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg("sleep 0.3; yes hello | head -c 3000000")
        .stdout(f.try_clone().unwrap())
        .spawn()
        .unwrap();
    close(f).unwrap();
    assert!(child.wait().unwrap().success());
    let want: Vec<u8> = b"hello\n".iter().copied().cycle().take(3_000_000).collect();
    assert_eq!(
        state(&b, "out", &want),
        Ok(()),
        "in S3 once the child exited"
    );
}

/// Stores through a shared mapping after an fsync, to a page stored to
/// before it: close still uploads them.
#[test]
fn a_store_through_a_mapping_after_fsync_is_uploaded_at_close() {
    if !passthrough_available() {
        return;
    }
    let b = Bucket::new(server(), "pt-mmap2", false);
    let m = mount(&b);
    let len = 8192;
    let (f, p) = mapped_new_file(&m, "m", len);
    let mut want = vec![0u8; len];
    // SAFETY: within the mapping.
    unsafe { *p = b'a' };
    want[0] = b'a';
    f.sync_all().unwrap();
    assert_eq!(state(&b, "m", &want), Ok(()), "fsync");
    // SAFETY: within the mapping; unmapped after.
    unsafe {
        *p.add(1) = b'b';
        libc::munmap(p as *mut libc::c_void, len);
    }
    want[1] = b'b';
    close(f).unwrap();
    assert_eq!(state(&b, "m", &want), Ok(()), "at close");
}
