//! Issue 9 regressions over the in-memory store: operations on a file
//! while a handle on it stays open, and uploads that fail half-way. Each
//! test keeps a writer open across another operation, as users do
//! (logrotate, rsync, editors), and checks what lands in the bucket.

use std::ffi::OsStr;
use std::sync::Arc;

use bucketfs::fs::inodes::ROOT_INO;
use bucketfs::fs::{Creator, Fs, FsConfig, SetAttr};
use bucketfs::store::memory::MemStore;
use bucketfs::store::{Metadata, ObjectStore, Op, StoreError};
use bucketfs::write::UploadOptions;

const MIB: usize = 1024 * 1024;

const USER: Creator = Creator {
    uid: 1000,
    gid: 1000,
    mode: 0o644,
    umask: 0o022,
};

fn fs_with(store: Arc<MemStore>) -> (Fs, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = FsConfig {
        staging_dir: dir.path().to_path_buf(),
        upload: UploadOptions {
            part_size_bytes: 5 * MIB as u64,
            concurrency: 4,
        },
        upload_retry_max: std::time::Duration::from_millis(50),
        ..FsConfig::default()
    };
    (Fs::new(store, cfg), dir)
}

fn name(s: &str) -> &OsStr {
    OsStr::new(s)
}

fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Files left in the staging directory.
fn staged_files(dir: &tempfile::TempDir) -> usize {
    staged_named(dir, |_| true)
}

/// Files in the staging directory whose names `pick` takes.
fn staged_named(dir: &tempfile::TempDir, pick: impl Fn(&str) -> bool) -> usize {
    std::fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| pick(&e.as_ref().unwrap().file_name().to_string_lossy()))
        .count()
}

async fn open_existing(fs: &Fs, n: &str, flags: i32) -> (u64, u64) {
    let a = fs.lookup(ROOT_INO, name(n)).await.unwrap();
    (a.ino, fs.open(a.ino, flags).await.unwrap())
}

/// Case 1, the logrotate pattern: a large object opened for appending is
/// renamed, written again and closed: every byte lands at the new key.
#[tokio::test]
async fn rename_of_a_file_open_for_append_keeps_every_byte() {
    let s = Arc::new(MemStore::unversioned());
    let orig = data(12 * MIB, 1);
    s.insert("app.log", &orig, Metadata::new());
    let (fs, _d) = fs_with(s.clone());
    let (_, fh) = open_existing(&fs, "app.log", libc::O_WRONLY | libc::O_APPEND).await;
    fs.write(fh, orig.len() as u64, b"before rename\n")
        .await
        .unwrap();
    fs.rename(
        ROOT_INO,
        name("app.log"),
        ROOT_INO,
        name("app.log.1"),
        false,
    )
    .await
    .unwrap();
    fs.write(fh, (orig.len() + 14) as u64, b"after rename\n")
        .await
        .unwrap();
    fs.flush(fh).await.unwrap();
    fs.release(fh).await.unwrap();
    let mut want = orig.clone();
    want.extend_from_slice(b"before rename\nafter rename\n");
    assert_eq!(s.object("app.log.1").unwrap().as_ref(), &want[..]);
    assert!(s.object("app.log").is_none());
    assert_eq!(s.open_uploads(), 0);
}

/// Case 1 through a directory rename.
#[tokio::test]
async fn directory_rename_moves_an_open_writer_with_it() {
    let s = Arc::new(MemStore::unversioned());
    let orig = data(11 * MIB, 2);
    s.insert("logs/app.log", &orig, Metadata::new());
    let (fs, _d) = fs_with(s.clone());
    let logs = fs.lookup(ROOT_INO, name("logs")).await.unwrap();
    let a = fs.lookup(logs.ino, name("app.log")).await.unwrap();
    let fh = fs
        .open(a.ino, libc::O_WRONLY | libc::O_APPEND)
        .await
        .unwrap();
    fs.write(fh, orig.len() as u64, b"x").await.unwrap();
    fs.rename(ROOT_INO, name("logs"), ROOT_INO, name("old-logs"), false)
        .await
        .unwrap();
    fs.write(fh, orig.len() as u64 + 1, b"y").await.unwrap();
    fs.release(fh).await.unwrap();
    let mut want = orig;
    want.extend_from_slice(b"xy");
    assert_eq!(s.object("old-logs/app.log").unwrap().as_ref(), &want[..]);
    assert!(s.object("logs/app.log").is_none());
}

/// Case 2: the last close fails; the data is kept, reported, and lands
/// once S3 answers again, with no user action.
#[tokio::test]
async fn a_failed_last_close_keeps_the_data_and_retries_until_it_lands() {
    let s = Arc::new(MemStore::unversioned());
    let (fs, d) = fs_with(s.clone());
    let fs = Arc::new(fs);
    let (_, fh) = fs
        .create(ROOT_INO, name("f"), USER, libc::O_WRONLY)
        .await
        .unwrap();
    fs.write(fh, 0, b"precious").await.unwrap();
    s.fail_next(Op::Put, 3, StoreError::Transient("503 SlowDown".into()));
    assert!(fs.flush(fh).await.is_err());
    assert!(fs.release(fh).await.is_err(), "close reports the error");
    assert!(staged_files(&d) >= 1, "staged data kept");
    let pending = fs.dirty_files();
    assert_eq!(pending.len(), 1);
    assert!(pending[0].last_error.is_some());
    // Still readable through the mount meanwhile.
    let (_, rh) = open_existing(&fs, "f", libc::O_RDONLY).await;
    assert_eq!(fs.read(rh, 0, 100).await.unwrap().as_ref(), b"precious");
    fs.release(rh).await.unwrap();
    fs.spawn_retrier();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while s.object("f").is_none() && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(s.object("f").unwrap().as_ref(), b"precious");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while staged_files(&d) > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(staged_files(&d), 0, "deleted only once in S3");
    assert!(fs.dirty_files().is_empty());
}

/// Case 4: chmod of a file open for writing, then more writes: nothing
/// is dropped (the state is rebased on the self-copy's new ETag).
#[tokio::test]
async fn chmod_of_an_open_clean_file_then_more_writes_lands() {
    let s = Arc::new(MemStore::unversioned());
    let orig = data(12 * MIB, 3);
    s.insert("f", &orig, Metadata::new());
    let (fs, _d) = fs_with(s.clone());
    let (ino, fh) = open_existing(&fs, "f", libc::O_RDWR).await;
    fs.write(fh, 0, b"HEAD").await.unwrap();
    fs.fsync(fh).await.unwrap();
    fs.setattr(
        ino,
        SetAttr {
            mode: Some(0o600),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    fs.write(fh, orig.len() as u64, b"TAIL").await.unwrap();
    fs.release(fh).await.unwrap();
    let mut want = orig;
    want[..4].copy_from_slice(b"HEAD");
    want.extend_from_slice(b"TAIL");
    assert_eq!(s.object("f").unwrap().as_ref(), &want[..]);
    assert_eq!(
        s.metadata("f").unwrap().get("mode").map(String::as_str),
        Some(&*format!("{}", libc::S_IFREG | 0o600))
    );
}

/// Case 6: `rm` whose DeleteObject fails leaves the writer's data alone.
#[tokio::test]
async fn a_failed_unlink_keeps_the_open_writers_data() {
    let s = Arc::new(MemStore::unversioned());
    s.insert("f", b"old", Metadata::new());
    let (fs, _d) = fs_with(s.clone());
    let (_, fh) = open_existing(&fs, "f", libc::O_WRONLY | libc::O_TRUNC).await;
    fs.write(fh, 0, b"new data").await.unwrap();
    s.fail_next(Op::Delete, 20, StoreError::AccessDenied("no".into()));
    assert!(fs.unlink(ROOT_INO, name("f")).await.is_err());
    fs.release(fh).await.unwrap();
    assert_eq!(s.object("f").unwrap().as_ref(), b"new data");
}

/// Case 7 and 19: `mv src dst` over an open, dirty dst: the rename wins,
/// dst's pending data is discarded, and dst is listed once.
#[tokio::test]
async fn rename_over_an_open_file_wins_and_lists_once() {
    let s = Arc::new(MemStore::unversioned());
    s.insert("src", b"renamed content", Metadata::new());
    let (fs, _d) = fs_with(s.clone());
    let (_, dh) = fs
        .create(ROOT_INO, name("dst"), USER, libc::O_WRONLY)
        .await
        .unwrap();
    fs.write(dh, 0, b"stale").await.unwrap();
    fs.rename(ROOT_INO, name("src"), ROOT_INO, name("dst"), false)
        .await
        .unwrap();
    let names: Vec<String> = fs
        .list(ROOT_INO)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .filter(|n| n == "dst")
        .collect();
    assert_eq!(names.len(), 1, "dst listed once");
    fs.write(dh, 5, b" more").await.unwrap();
    fs.release(dh).await.unwrap();
    assert_eq!(s.object("dst").unwrap().as_ref(), b"renamed content");
    assert!(s.object("src").is_none());
}

/// Case 19 and 10: an unlinked open file is not listed, its directory can
/// be removed, and its later writes are never uploaded nor journaled.
#[tokio::test]
async fn an_unlinked_open_file_is_gone_for_good() {
    let s = Arc::new(MemStore::unversioned());
    let (fs, d) = fs_with(s.clone());
    let dir = fs.mkdir(ROOT_INO, name("d"), USER).await.unwrap();
    let (_, fh) = fs
        .create(dir.ino, name("f"), USER, libc::O_WRONLY)
        .await
        .unwrap();
    fs.write(fh, 0, b"doomed").await.unwrap();
    fs.unlink(dir.ino, name("f")).await.unwrap();
    fs.write(fh, 6, b" still").await.unwrap();
    let journals = staged_named(&d, |n| n.ends_with(".journal"));
    assert_eq!(journals, 0, "nothing a recovery could bring back");
    assert!(
        fs.list(dir.ino)
            .await
            .unwrap()
            .iter()
            .all(|e| e.name != "f")
    );
    fs.rmdir(ROOT_INO, name("d")).await.unwrap();
    fs.release(fh).await.unwrap();
    assert!(s.keys().is_empty(), "{:?}", s.keys());
}

/// Case 17: a reader's close never uploads a half-written new file, and a
/// reader follows what this mount wrote (never new bytes, then old).
#[tokio::test]
async fn readers_never_upload_and_follow_this_mounts_writes() {
    let s = Arc::new(MemStore::unversioned());
    s.insert("f", b"old old old", Metadata::new());
    let (fs, _d) = fs_with(s.clone());
    let (ino, rh) = open_existing(&fs, "f", libc::O_RDONLY).await;
    assert_eq!(fs.read(rh, 0, 3).await.unwrap().as_ref(), b"old");
    let wh = fs.open(ino, libc::O_WRONLY | libc::O_TRUNC).await.unwrap();
    fs.write(wh, 0, b"new").await.unwrap();
    let puts = s.counters().get(Op::Put);
    fs.flush(rh).await.unwrap();
    assert_eq!(
        s.counters().get(Op::Put),
        puts,
        "a reader's close sends nothing"
    );
    assert_eq!(fs.read(rh, 0, 3).await.unwrap().as_ref(), b"new");
    fs.release(wh).await.unwrap();
    assert_eq!(
        fs.read(rh, 0, 100).await.unwrap().as_ref(),
        b"new",
        "still the new bytes after the writer closed"
    );
    fs.rename(ROOT_INO, name("f"), ROOT_INO, name("g"), false)
        .await
        .unwrap();
    assert_eq!(fs.read(rh, 0, 100).await.unwrap().as_ref(), b"new");
    fs.release(rh).await.unwrap();

    // A new file: a reader's close does not upload it half-written.
    let (a, wh) = fs
        .create(ROOT_INO, name("n"), USER, libc::O_WRONLY)
        .await
        .unwrap();
    fs.write(wh, 0, b"part").await.unwrap();
    let rh = fs.open(a.ino, libc::O_RDONLY).await.unwrap();
    let puts = s.counters().get(Op::Put);
    fs.flush(rh).await.unwrap();
    fs.release(rh).await.unwrap();
    assert_eq!(s.counters().get(Op::Put), puts);
    let rh = fs.open(a.ino, libc::O_RDONLY).await.unwrap();
    fs.write(wh, 4, b"ial").await.unwrap();
    fs.release(wh).await.unwrap();
    assert_eq!(fs.read(rh, 0, 100).await.unwrap().as_ref(), b"partial");
    fs.release(rh).await.unwrap();
    assert_eq!(s.object("n").unwrap().as_ref(), b"partial");
}

/// Case 3: a Complete that fails although the object landed is a success
/// (recognised by the multipart ETag), not an abort and an EIO.
#[tokio::test]
async fn a_complete_that_landed_but_failed_is_a_success() {
    let s = Arc::new(MemStore::unversioned());
    let (fs, d) = fs_with(s.clone());
    let body = data(11 * MIB, 4);
    let (_, fh) = fs
        .create(ROOT_INO, name("big"), USER, libc::O_WRONLY)
        .await
        .unwrap();
    // Written backwards so nothing streams: the upload happens at close.
    fs.write(fh, (6 * MIB) as u64, &body[6 * MIB..])
        .await
        .unwrap();
    fs.write(fh, 0, &body[..6 * MIB]).await.unwrap();
    s.lie_after_next(
        Op::CompleteMultipart,
        StoreError::Transient("timed out".into()),
    );
    fs.release(fh).await.unwrap();
    assert_eq!(s.object("big").unwrap().as_ref(), &body[..]);
    assert_eq!(s.open_uploads(), 0);
    assert_eq!(staged_files(&d), 0);
}

/// Case 17 on an unversioned bucket: `rm` of a file that a handle still
/// reads waits for that handle before the DeleteObject; the name is gone
/// at once; a daemon killed meanwhile leaves a tombstone that the next
/// mount completes, so the file never comes back.
#[tokio::test]
async fn rm_of_a_file_being_read_defers_the_delete_and_survives_a_crash() {
    let s = Arc::new(MemStore::unversioned());
    let body = data(300_000, 5);
    s.insert("f", &body, Metadata::new());
    s.insert("g", b"kept", Metadata::new());
    s.insert("h", &body, Metadata::new());
    let (fs, d) = fs_with(s.clone());
    let (_, rh) = open_existing(&fs, "f", libc::O_RDONLY).await;
    assert_eq!(fs.read(rh, 0, 10).await.unwrap().as_ref(), &body[..10]);
    fs.unlink(ROOT_INO, name("f")).await.unwrap();
    assert!(
        fs.list(ROOT_INO)
            .await
            .unwrap()
            .iter()
            .all(|e| e.name != "f")
    );
    assert!(fs.lookup(ROOT_INO, name("f")).await.is_err());
    assert_eq!(
        fs.read(rh, 200_000, 10).await.unwrap().as_ref(),
        &body[200_000..200_010],
        "the reader still reads"
    );
    fs.release(rh).await.unwrap();
    assert!(s.object("f").is_none(), "deleted at the last close");

    // The same, killed before the reader closed: the next mount deletes.
    let (_, rh) = open_existing(&fs, "h", libc::O_RDONLY).await;
    fs.read(rh, 0, 10).await.unwrap();
    fs.unlink(ROOT_INO, name("h")).await.unwrap();
    std::mem::forget(fs); // a killed daemon runs no destructor
    // (its flock dies with it: here, a new process stands in)
    assert_eq!(staged_named(&d, |n| n.starts_with("unlink-")), 1);
    release_dead_locks(d.path());
    let opts = UploadOptions {
        part_size_bytes: 5 * MIB as u64,
        concurrency: 2,
    };
    let r = bucketfs::write::recover(&*s, d.path(), &opts).await;
    assert!(r.iter().all(|r| r.is_ok()), "{r:?}");
    assert!(s.object("h").is_none(), "the removed file never comes back");
    assert_eq!(s.object("g").unwrap().as_ref(), b"kept");
}

/// A write at the name of a file removed while still read first deletes
/// the removed object; when that DeleteObject fails, the write fails
/// (EIO) and the delete stays this mount's, to be done before the next
/// try. Before, the create went ahead and left the tombstone on disk; the
/// new file, written with the same bytes in the same second as the old
/// one's Last-Modified, was then deleted by the next mount's recovery,
/// which cannot tell the two apart (a tombstone records whole seconds).
#[tokio::test]
async fn a_new_file_at_a_removed_names_key_waits_for_its_delete() {
    let (s, body, fs, d, rh) = removed_while_read(70_000, 9).await;
    let tombstones = || staged_named(&d, |n| n.starts_with("unlink-"));
    assert_eq!(tombstones(), 1);
    s.fail_next(Op::Delete, 100, StoreError::Transient("refused".into()));
    let e = fs
        .create(ROOT_INO, name("y"), USER, libc::O_WRONLY)
        .await
        .unwrap_err();
    assert_eq!(bucketfs::error::errno(&e), libc::EIO, "{e:?}");
    assert!(
        fs.lookup(ROOT_INO, name("y")).await.is_err(),
        "still removed"
    );
    assert_eq!(tombstones(), 1, "the delete is still to do");
    // A rename to that name waits for it the same way.
    s.insert("z", b"other", Metadata::new());
    fs.rename(ROOT_INO, name("z"), ROOT_INO, name("y"), false)
        .await
        .unwrap_err();
    assert_eq!(s.object("z").unwrap().as_ref(), b"other");
    s.fail_next(Op::Delete, 0, StoreError::Transient("healed".into()));
    // S3 answers again: the same bytes, written again, are the file's.
    let (_, fh) = fs
        .create(ROOT_INO, name("y"), USER, libc::O_WRONLY)
        .await
        .unwrap();
    assert_eq!(tombstones(), 0, "deleted before the new file");
    fs.write(fh, 0, &body).await.unwrap();
    fs.release(fh).await.unwrap();
    fs.release(rh).await.unwrap();
    assert!(s.object("y").is_some_and(|b| b[..] == body[..]));
    std::mem::forget(fs);
    let opts = UploadOptions {
        part_size_bytes: 5 * MIB as u64,
        concurrency: 2,
    };
    let r = bucketfs::write::recover(&*s, d.path(), &opts).await;
    assert!(r.iter().all(|r| r.is_ok()), "{r:?}");
    assert!(
        s.object("y").is_some_and(|b| b[..] == body[..]),
        "the new file outlives a restart"
    );
}

/// A dead mount left a deferred delete (rm of a file still read, then
/// kill -9), and the next mount's start-up recovery could not do it (S3
/// refused). That mount keeps it as its own: a create at the name fails
/// while the delete does, and once S3 answers the new file, written with
/// the same bytes, stays. Before, the create went ahead and the recovery's
/// retry a few seconds later deleted the new, acknowledged file (found by
/// an outsider on a real mount: `REPRO_leftover_tombstone_recovery_retry`).
#[tokio::test]
async fn a_dead_mounts_failed_deferred_delete_gates_a_new_file_at_its_name() {
    let (s, body, fs, d, _reader) = removed_while_read(60_000, 12).await;
    std::mem::forget(fs); // killed with the reader open
    release_dead_locks(d.path());
    let cfg = FsConfig {
        staging_dir: d.path().to_path_buf(),
        upload_retry_max: std::time::Duration::from_millis(50),
        ..FsConfig::default()
    };
    let fs = Fs::new(s.clone(), cfg);
    s.fail_next(Op::Delete, 1000, StoreError::Transient("refused".into()));
    let r = fs.adopt_staged().await;
    assert!(r.iter().any(|r| r.is_err()), "{r:?}");
    assert!(s.object("y").is_some(), "not deleted yet");
    let e = fs
        .create(ROOT_INO, name("y"), USER, libc::O_WRONLY)
        .await
        .unwrap_err();
    assert_eq!(bucketfs::error::errno(&e), libc::EIO, "{e:?}");
    assert_eq!(fs.failed_deletes().len(), 1);
    s.fail_next(Op::Delete, 0, StoreError::Transient("healed".into()));
    let (_, fh) = fs
        .create(ROOT_INO, name("y"), USER, libc::O_WRONLY)
        .await
        .unwrap();
    fs.write(fh, 0, &body).await.unwrap();
    fs.release(fh).await.unwrap();
    assert!(s.object("y").is_some_and(|b| b[..] == body[..]));
    // What the start-up recovery's retries do: nothing left to delete.
    let r = fs.adopt_staged().await;
    assert!(r.iter().all(|r| r.is_ok()), "{r:?}");
    fs.retry_pending().await;
    assert!(
        s.object("y").is_some_and(|b| b[..] == body[..]),
        "the new file stays"
    );
    assert!(fs.failed_deletes().is_empty());
}

/// An object `y` of `len` bytes (returned), opened and read by a handle
/// (returned), then removed: its delete waits for that handle.
async fn removed_while_read(
    len: usize,
    seed: u8,
) -> (Arc<MemStore>, Vec<u8>, Fs, tempfile::TempDir, u64) {
    let s = Arc::new(MemStore::unversioned());
    let body = data(len, seed);
    s.insert("y", &body, Metadata::new());
    let (fs, d) = fs_with(s.clone());
    let (_, rh) = open_existing(&fs, "y", libc::O_RDONLY).await;
    fs.read(rh, 0, 10).await.unwrap();
    fs.unlink(ROOT_INO, name("y")).await.unwrap();
    (s, body, fs, d, rh)
}

/// Stands in for the kernel at a killed daemon's exit: the locks of its
/// staging files are released (the files are copied over themselves).
fn release_dead_locks(dir: &std::path::Path) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            let copy = p.with_extension("copy");
            std::fs::copy(&p, &copy).unwrap();
            std::fs::remove_file(&p).unwrap();
            std::fs::rename(&copy, &p).unwrap();
        }
    }
}

/// Case 18 (`cp -p`): a large new file streams its parts while written;
/// its mode and mtime set before close land on the object by one
/// server-side self-copy, and no byte is sent twice.
#[tokio::test]
async fn metadata_set_after_a_streamed_write_lands_without_resending() {
    let s = Arc::new(MemStore::unversioned());
    let (fs, _d) = fs_with(s.clone());
    let body = data(17 * MIB, 6);
    let (a, fh) = fs
        .create(ROOT_INO, name("copy"), USER, libc::O_WRONLY)
        .await
        .unwrap();
    for (i, c) in body.chunks(MIB).enumerate() {
        fs.write(fh, (i * MIB) as u64, c).await.unwrap();
    }
    assert_eq!(s.counters().get(Op::CreateMultipart), 1, "streamed");
    let old = std::time::UNIX_EPOCH + std::time::Duration::from_secs(978_307_200);
    fs.setattr(
        a.ino,
        SetAttr {
            mode: Some(0o640),
            mtime: Some(old),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    fs.flush(fh).await.unwrap();
    fs.release(fh).await.unwrap();
    assert_eq!(s.object("copy").unwrap().as_ref(), &body[..]);
    let meta = s.metadata("copy").unwrap();
    assert_eq!(
        meta.get("mode").map(String::as_str),
        Some(&*format!("{}", libc::S_IFREG | 0o640))
    );
    assert_eq!(meta.get("mtime").map(String::as_str), Some("978307200"));
    assert_eq!(
        s.counters().bytes().0,
        body.len() as u64,
        "each byte sent once"
    );
    assert_eq!(s.counters().get(Op::Copy), 1);
}

/// A file whose upload failed at close is tried again at once when it is
/// reopened (not after its backoff), even while the new handle is open.
#[tokio::test]
async fn reopening_a_file_whose_upload_failed_retries_it_at_once() {
    let s = Arc::new(MemStore::unversioned());
    let (fs, _d) = fs_with(s.clone());
    let (a, fh) = fs
        .create(ROOT_INO, name("f"), USER, libc::O_WRONLY)
        .await
        .unwrap();
    fs.write(fh, 0, b"pending").await.unwrap();
    s.fail_next(Op::Put, 2, StoreError::Transient("503".into()));
    assert!(fs.flush(fh).await.is_err());
    assert!(fs.release(fh).await.is_err());
    let wh = fs.open(a.ino, libc::O_WRONLY).await.unwrap();
    fs.retry_pending().await;
    assert_eq!(s.object("f").unwrap().as_ref(), b"pending", "tried at once");
    fs.write(wh, 7, b"!").await.unwrap();
    fs.release(wh).await.unwrap();
    assert_eq!(s.object("f").unwrap().as_ref(), b"pending!");
}

/// chmod 600 of a file open and dirty, then the daemon dies: the recovered
/// object carries the new mode (the journal records metadata changes).
#[tokio::test]
async fn a_chmod_of_a_dirty_file_survives_a_crash() {
    let s = Arc::new(MemStore::unversioned());
    let (fs, d) = fs_with(s.clone());
    let (a, fh) = fs
        .create(ROOT_INO, name("secret"), USER, libc::O_WRONLY)
        .await
        .unwrap();
    fs.write(fh, 0, b"password=hunter2").await.unwrap();
    fs.setattr(
        a.ino,
        SetAttr {
            mode: Some(0o600),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    std::mem::forget(fs); // killed: no close, no destructor
    // The kernel drops a dead process's locks: reopen the files anew.
    for e in std::fs::read_dir(d.path()).unwrap() {
        let p = e.unwrap().path();
        let copy = p.with_extension("copy");
        std::fs::copy(&p, &copy).unwrap();
        std::fs::rename(&copy, &p).unwrap();
    }
    let opts = UploadOptions {
        part_size_bytes: 5 * MIB as u64,
        concurrency: 2,
    };
    let r = bucketfs::write::recover(&*s, d.path(), &opts).await;
    assert!(r.iter().all(|r| r.is_ok()) && !r.is_empty(), "{r:?}");
    assert_eq!(s.object("secret").unwrap().as_ref(), b"password=hunter2");
    assert_eq!(
        s.metadata("secret")
            .unwrap()
            .get("mode")
            .map(String::as_str),
        Some(&*format!("{}", libc::S_IFREG | 0o600))
    );
}

/// An edit in place of an object another client replaced meanwhile, on a
/// bucket without versions: the old bytes the edit did not touch cannot be
/// read any more, so the edit lands once beside the key (never retried
/// forever), and the key keeps the other client's object.
#[tokio::test]
async fn an_edit_of_an_object_replaced_meanwhile_lands_beside_once() {
    let s = Arc::new(MemStore::unversioned());
    // Large (its untouched ranges are copied server-side, not read): a
    // small file reads its base at its first write and wins at its key.
    let size = 12 * MIB;
    s.insert("f", &data(size, 7), Metadata::new());
    let (fs, d) = fs_with(s.clone());
    let (_, fh) = open_existing(&fs, "f", libc::O_RDWR).await;
    fs.write(fh, 0, b"EDIT").await.unwrap();
    s.insert("f", b"another client's", Metadata::new());
    fs.flush(fh).await.unwrap();
    fs.release(fh).await.unwrap();
    assert_eq!(s.object("f").unwrap().as_ref(), b"another client's");
    let beside: Vec<String> = s
        .keys()
        .into_iter()
        .filter(|k| k.starts_with("f.bucketfs-recovered-"))
        .collect();
    assert_eq!(beside.len(), 1, "{:?}", s.keys());
    let got = s.object(&beside[0]).unwrap();
    assert_eq!(&got[..4], b"EDIT");
    assert_eq!(got.len(), size);
    assert!(fs.dirty_files().is_empty(), "nothing pending");
    assert_eq!(staged_files(&d), 0);
    let (_, rh) = open_existing(&fs, "f", libc::O_RDONLY).await;
    assert_eq!(
        fs.read(rh, 0, 100).await.unwrap().as_ref(),
        b"another client's"
    );
}

/// Found by tests/model.rs: a file unlinked while a writer and a reader
/// have it open lives until its last close (POSIX). What the writer wrote
/// before it closed is read by the reader, though it is never uploaded.
#[tokio::test]
async fn a_reader_of_an_unlinked_file_reads_what_a_closed_writer_wrote() {
    let s = Arc::new(MemStore::unversioned());
    let (fs, _d) = fs_with(s.clone());
    let (a, wh) = fs
        .create(ROOT_INO, name("tmp"), USER, libc::O_WRONLY)
        .await
        .unwrap();
    let rh = fs.open(a.ino, libc::O_RDONLY).await.unwrap();
    fs.unlink(ROOT_INO, name("tmp")).await.unwrap();
    fs.write(wh, 0, b"scratch data").await.unwrap();
    fs.flush(wh).await.unwrap();
    fs.release(wh).await.unwrap();
    assert_eq!(fs.read(rh, 0, 100).await.unwrap().as_ref(), b"scratch data");
    fs.release(rh).await.unwrap();
    assert!(s.keys().is_empty(), "{:?}", s.keys());
    assert!(fs.dirty_files().is_empty());

    // The same over an existing object: the reader sees the new bytes,
    // not the object's (on a versioned bucket: on an unversioned one the
    // object's bytes not staged yet are gone with it, see README).
    let s = Arc::new(MemStore::versioned());
    let (fs, _d) = fs_with(s.clone());
    s.insert("f", b"old bytes", Metadata::new());
    let (ino, wh) = open_existing(&fs, "f", libc::O_WRONLY).await;
    let rh = fs.open(ino, libc::O_RDONLY).await.unwrap();
    fs.unlink(ROOT_INO, name("f")).await.unwrap();
    fs.write(wh, 0, b"NEW").await.unwrap();
    fs.release(wh).await.unwrap();
    assert_eq!(fs.read(rh, 0, 100).await.unwrap().as_ref(), b"NEW bytes");
    fs.release(rh).await.unwrap();
    assert!(s.keys().is_empty(), "{:?}", s.keys());
}

/// Found by tests/model.rs: a write of zero bytes beyond the end changes
/// nothing (POSIX); it used to set the size past the staging file's end,
/// so every upload of the file failed ("failed to fill whole buffer") and
/// its data never landed.
#[tokio::test]
async fn a_zero_length_write_past_the_end_changes_nothing() {
    let s = Arc::new(MemStore::unversioned());
    let (fs, _d) = fs_with(s.clone());
    let (a, fh) = fs
        .create(ROOT_INO, name("f"), USER, libc::O_WRONLY)
        .await
        .unwrap();
    fs.write(fh, 0, b"abc").await.unwrap();
    assert_eq!(fs.write(fh, 10, b"").await.unwrap(), 0);
    assert_eq!(fs.getattr(a.ino).await.unwrap().size, 3);
    fs.fsync(fh).await.unwrap();
    fs.release(fh).await.unwrap();
    assert_eq!(s.object("f").unwrap().as_ref(), b"abc");
    assert!(fs.dirty_files().is_empty());
}

/// Found by tests/model.rs: `mv d e` over an empty directory `e`, where
/// the upload of a file open in `d` fails: the rename fails and changes
/// nothing; `e` used to lose its marker (and vanish) before the upload.
#[tokio::test]
async fn a_directory_rename_failing_on_an_upload_keeps_the_empty_target() {
    let s = Arc::new(MemStore::unversioned());
    let (fs, _d) = fs_with(s.clone());
    let d = fs.mkdir(ROOT_INO, name("d"), USER).await.unwrap();
    fs.mkdir(ROOT_INO, name("e"), USER).await.unwrap();
    let (_, fh) = fs
        .create(d.ino, name("f"), USER, libc::O_WRONLY)
        .await
        .unwrap();
    fs.write(fh, 0, b"data").await.unwrap();
    s.fail_next(Op::Put, 1, StoreError::Transient("503 SlowDown".into()));
    assert!(
        fs.rename(ROOT_INO, name("d"), ROOT_INO, name("e"), false)
            .await
            .is_err()
    );
    assert!(s.object("e/").is_some(), "e kept: {:?}", s.keys());
    assert!(fs.lookup(ROOT_INO, name("e")).await.is_ok());
    fs.release(fh).await.unwrap();
    assert_eq!(s.object("d/f").unwrap().as_ref(), b"data");
    // Tried again, it replaces e.
    fs.rename(ROOT_INO, name("d"), ROOT_INO, name("e"), false)
        .await
        .unwrap();
    assert_eq!(s.keys(), vec!["e/".to_string(), "e/f".to_string()]);
}

/// Found by tests/model.rs: a reader opened on a new file before its
/// writer's close uploaded it, then `rm`: the reader read nothing (its
/// pin was still "no object", so the delete was not deferred for it).
#[tokio::test]
async fn a_reader_opened_before_the_upload_still_reads_after_rm() {
    let s = Arc::new(MemStore::unversioned());
    let (fs, _d) = fs_with(s.clone());
    let (a, wh) = fs
        .create(ROOT_INO, name("f"), USER, libc::O_WRONLY)
        .await
        .unwrap();
    let rh = fs.open(a.ino, libc::O_RDONLY).await.unwrap();
    fs.write(wh, 0, b"written then removed").await.unwrap();
    fs.release(wh).await.unwrap();
    fs.unlink(ROOT_INO, name("f")).await.unwrap();
    assert!(fs.lookup(ROOT_INO, name("f")).await.is_err());
    assert_eq!(
        fs.read(rh, 0, 100).await.unwrap().as_ref(),
        b"written then removed"
    );
    fs.release(rh).await.unwrap();
    assert!(s.keys().is_empty(), "{:?}", s.keys());
}

/// A small file edited in place while another client replaces it (no
/// versions): its old bytes were read at the first write, so the edit
/// lands whole at its key (the last writer wins, as with any S3 client).
#[tokio::test]
async fn a_small_edit_reads_its_base_at_the_first_write_and_lands_whole() {
    let s = Arc::new(MemStore::unversioned());
    let old = data(100_000, 8);
    s.insert("f", &old, Metadata::new());
    let (fs, _d) = fs_with(s.clone());
    let (_, fh) = open_existing(&fs, "f", libc::O_RDWR).await;
    fs.write(fh, 0, b"EDIT").await.unwrap();
    s.insert("f", b"another client's", Metadata::new());
    fs.release(fh).await.unwrap();
    let mut want = old;
    want[..4].copy_from_slice(b"EDIT");
    assert_eq!(s.object("f").unwrap().as_ref(), &want[..]);
}
