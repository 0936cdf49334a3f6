//! Issue 9, over the core: interleavings made deterministic with
//! `Faulty<MemStore>` (calls held, failed, or answered with an error after
//! they landed). Each test asserts what a user checks: the bytes in the
//! bucket (`MemStore::object`), the errors returned, the names listed, and
//! that no multipart upload is left open. Every wait is bounded.

mod common;

use std::ffi::OsStr;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bucketfs::error::errno;
use bucketfs::fs::inodes::ROOT_INO;
use bucketfs::fs::{Creator, Fs, FsConfig, FsError, SetAttr};
use bucketfs::store::faulty::Faulty;
use bucketfs::store::memory::MemStore;
use bucketfs::store::{Metadata, Op, StoreError};
use bucketfs::write::UploadOptions;

const MIB: usize = 1024 * 1024;

/// How long any single step may take before the test fails.
const STEP: Duration = Duration::from_secs(30);

const USER: Creator = Creator {
    uid: 1000,
    gid: 1000,
    mode: 0o644,
    umask: 0o022,
};

struct T {
    fs: Arc<Fs>,
    /// The store the filesystem talks to.
    f: Arc<Faulty<MemStore>>,
    /// The bucket, as another client sees it.
    m: Arc<MemStore>,
    _dir: tempfile::TempDir,
}

fn setup(versioned: bool, tweak: impl FnOnce(&mut FsConfig)) -> T {
    let m = Arc::new(if versioned {
        MemStore::versioned()
    } else {
        MemStore::unversioned()
    });
    let f = Arc::new(Faulty::new(m.clone()));
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = FsConfig {
        staging_dir: dir.path().join("staging"),
        // Multipart above 5 MiB (S3's minimum part size), so a 12 MiB
        // object is a multipart upload with server-side copies.
        upload: UploadOptions {
            part_size_bytes: 5 * MIB as u64,
            concurrency: 4,
        },
        // Failed uploads are retried soon (the mount's default waits up to
        // 300 s between tries).
        upload_retry_max: Duration::from_secs(1),
        ..FsConfig::default()
    };
    tweak(&mut cfg);
    let fs = Arc::new(Fs::new(f.clone(), cfg));
    // As the mount does: failed uploads are retried in the background.
    fs.spawn_retrier();
    T {
        fs,
        f,
        m,
        _dir: dir,
    }
}

fn name(s: &str) -> &'static OsStr {
    OsStr::new(Box::leak(s.to_string().into_boxed_str()))
}

/// Deterministic, non-repeating-looking bytes.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u64).wrapping_mul(2_654_435_761) >> 13) as u8 ^ seed)
        .collect()
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

async fn within<R>(what: &str, fut: impl Future<Output = R>) -> R {
    tokio::time::timeout(STEP, fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {STEP:?} (hung)"))
}

/// Waits (bounded) for a spawned task's result.
async fn join<R>(what: &str, h: tokio::task::JoinHandle<R>) -> R {
    within(what, h)
        .await
        .unwrap_or_else(|e| panic!("{what}: task failed: {e}"))
}

/// Whether `key` holds `want`, with a short description when it does not.
fn holds(m: &MemStore, key: &str, want: &[u8]) -> Result<(), String> {
    match m.object(key) {
        None => Err(format!("{key}: no object")),
        Some(got) if got.as_ref() == want => Ok(()),
        Some(got) => Err(format!(
            "{key}: {} bytes, want {} (first difference at {:?})",
            got.len(),
            want.len(),
            got.iter().zip(want).position(|(a, b)| a != b)
        )),
    }
}

fn assert_holds(m: &MemStore, key: &str, want: &[u8], ctx: &str) {
    if let Err(e) = holds(m, key, want) {
        panic!("{ctx}: {e}; keys now {:?}", m.keys());
    }
}

/// Polls `cond` every 10 ms until it is true or `max` passed.
async fn eventually(max: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + max;
    loop {
        if cond() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn names(fs: &Fs, ino: u64) -> Vec<String> {
    within("readdir", fs.list(ino))
        .await
        .unwrap()
        .into_iter()
        .skip(2)
        .map(|e| e.name)
        .collect()
}

async fn read_all(fs: &Fs, fh: u64, len: usize) -> Result<Vec<u8>, FsError> {
    let mut out = Vec::new();
    while out.len() < len {
        let d = within("read", fs.read(fh, out.len() as u64, 1 << 20)).await?;
        if d.is_empty() {
            break;
        }
        out.extend_from_slice(&d);
    }
    Ok(out)
}

// ----------------------------------------------------------------------
// Case 4: chmod/touch of a file open for writing.

/// An object written as multipart, edited through an open handle: fsync
/// uploads it (UploadPartCopy of the untouched range, pinned by ETag);
/// chmod and touch change the object (a self-copy gives a new ETag); more
/// writes, close: the object has every byte, the close is Ok.
#[tokio::test]
async fn case4_chmod_and_touch_of_an_open_file_keep_its_data() {
    let t = setup(true, |_| {});
    let orig = pattern(12 * MIB, 4);
    t.m.insert("f", &orig, Metadata::new());
    let a = within("lookup", t.fs.lookup(ROOT_INO, name("f")))
        .await
        .unwrap();
    let fh = within("open", t.fs.open(a.ino, libc::O_WRONLY))
        .await
        .unwrap();
    let w1 = pattern(4096, 41);
    t.fs.write(fh, orig.len() as u64, &w1).await.unwrap();
    within("fsync", t.fs.fsync(fh)).await.unwrap();
    assert_holds(&t.m, "f", &cat(&[&orig, &w1]), "after fsync");
    assert!(
        t.f.calls(Op::UploadPartCopy) >= 1,
        "the untouched range is copied server-side"
    );
    within(
        "chmod",
        t.fs.setattr(
            a.ino,
            SetAttr {
                mode: Some(0o600),
                ..Default::default()
            },
        ),
    )
    .await
    .expect("chmod of an open file");
    let when = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    within(
        "touch",
        t.fs.setattr(
            a.ino,
            SetAttr {
                mtime: Some(when),
                ..Default::default()
            },
        ),
    )
    .await
    .expect("touch of an open file");
    let w2 = pattern(8192, 42);
    t.fs.write(fh, (orig.len() + w1.len()) as u64, &w2)
        .await
        .unwrap();
    let flushed = within("close (flush)", t.fs.flush(fh)).await;
    let released = within("close (release)", t.fs.release(fh)).await;
    assert_eq!(
        flushed,
        Ok(()),
        "close() after chmod/touch of the open file"
    );
    assert_eq!(released, Ok(()), "release after chmod/touch");
    assert_holds(&t.m, "f", &cat(&[&orig, &w1, &w2]), "after close");
    let meta = t.m.metadata("f").unwrap();
    assert_eq!(
        meta.get("mode").map(String::as_str),
        Some("33152"),
        "chmod 600 kept (0100600)"
    );
    assert_eq!(t.m.open_uploads(), 0, "no multipart upload left open");
}

// ----------------------------------------------------------------------
// Case 5: a directory rename racing a write inside it.

/// `mv dir dir2` with its first Copy held; meanwhile a new file is created,
/// written and closed in dir. After the rename: its bytes are in the
/// bucket (under dir2/ or dir/), if its close returned Ok.
#[tokio::test]
async fn case5_a_file_created_in_a_directory_being_renamed_is_not_lost() {
    let t = setup(true, |_| {});
    for k in ["dir/a", "dir/b", "dir/c"] {
        t.m.insert(k, k.as_bytes(), Metadata::new());
    }
    t.f.hold(Op::Copy, 1);
    let fs = t.fs.clone();
    let mv = tokio::spawn(async move {
        fs.rename(ROOT_INO, name("dir"), ROOT_INO, name("dir2"), false)
            .await
    });
    t.f.wait_held(Op::Copy).await.expect("the rename copies");
    let data = pattern(100_000, 5);
    let fs = t.fs.clone();
    let body = data.clone();
    let mut writer = tokio::spawn(async move {
        let d = fs.lookup(ROOT_INO, name("dir")).await?;
        let (_, fh) = fs.create(d.ino, name("new"), USER, libc::O_WRONLY).await?;
        fs.write(fh, 0, &body).await?;
        let flushed = fs.flush(fh).await;
        let released = fs.release(fh).await;
        flushed.and(released)
    });
    // The writer may finish now, or wait for the rename (serialised):
    // either is fine; it gets a bounded moment before the rename goes on.
    let early = tokio::time::timeout(Duration::from_secs(2), &mut writer).await;
    t.f.release(Op::Copy);
    let renamed = join("mv dir dir2", mv).await;
    let wrote = match early {
        Ok(r) => r.unwrap(),
        Err(_) => join("create+write+close in dir", writer).await,
    };
    assert_eq!(renamed, Ok(()), "mv dir dir2");
    if wrote.is_ok() {
        let at2 = holds(&t.m, "dir2/new", &data);
        let at1 = holds(&t.m, "dir/new", &data);
        assert!(
            at2.is_ok() || at1.is_ok(),
            "close() returned Ok but the bytes are lost: {at2:?} / {at1:?}; keys {:?}",
            t.m.keys()
        );
    }
    for k in ["a", "b", "c"] {
        assert_holds(
            &t.m,
            &format!("dir2/{k}"),
            format!("dir/{k}").as_bytes(),
            "moved",
        );
    }
}

/// `mv dir dir2` copying keys one by one (the first Copy held, the others
/// done); meanwhile dir/b, already copied, is rewritten and closed. After
/// the rename its new bytes are in the bucket (dir2/b or dir/b): the
/// rename's DeleteObject of dir/b must not drop them.
#[tokio::test]
async fn case5_a_file_rewritten_while_its_directory_is_renamed_keeps_its_new_bytes() {
    let t = setup(true, |_| {});
    for k in ["dir/a", "dir/b", "dir/c"] {
        t.m.insert(k, b"old", Metadata::new());
    }
    t.f.hold(Op::Copy, 1);
    let fs = t.fs.clone();
    let mv = tokio::spawn(async move {
        fs.rename(ROOT_INO, name("dir"), ROOT_INO, name("dir2"), false)
            .await
    });
    t.f.wait_held(Op::Copy).await.expect("the rename copies");
    let data = pattern(50_000, 55);
    let fs = t.fs.clone();
    let body = data.clone();
    let mut writer = tokio::spawn(async move {
        let d = fs.lookup(ROOT_INO, name("dir")).await?;
        let (_, fh) = fs
            .create(d.ino, name("b"), USER, libc::O_WRONLY | libc::O_TRUNC)
            .await?;
        fs.write(fh, 0, &body).await?;
        let flushed = fs.flush(fh).await;
        let released = fs.release(fh).await;
        flushed.and(released)
    });
    let early = tokio::time::timeout(Duration::from_secs(2), &mut writer).await;
    t.f.release(Op::Copy);
    let renamed = join("mv dir dir2", mv).await;
    let wrote = match early {
        Ok(r) => r.unwrap(),
        Err(_) => join("rewrite dir/b", writer).await,
    };
    assert_eq!(renamed, Ok(()), "mv dir dir2");
    if wrote.is_ok() {
        let at2 = holds(&t.m, "dir2/b", &data);
        let at1 = holds(&t.m, "dir/b", &data);
        assert!(
            at2.is_ok() || at1.is_ok(),
            "close() of the rewritten dir/b returned Ok but its bytes are lost: \
             dir2/b {at2:?}, dir/b {at1:?}; keys {:?}",
            t.m.keys()
        );
    }
}

// ----------------------------------------------------------------------
// Case 6: rm of a file open for writing whose DeleteObject fails.

#[tokio::test]
async fn case6_rm_whose_delete_fails_keeps_the_open_writers_data() {
    let t = setup(true, |_| {});
    t.m.insert("f", b"old contents", Metadata::new());
    let a = within("lookup", t.fs.lookup(ROOT_INO, name("f")))
        .await
        .unwrap();
    let fh = within("open", t.fs.open(a.ino, libc::O_WRONLY))
        .await
        .unwrap();
    let data = b"NEW DATA, precious, longer than the old".to_vec();
    t.fs.write(fh, 0, &data).await.unwrap();
    t.f.fail(
        Op::Delete,
        u32::MAX,
        StoreError::AccessDenied("denied".into()),
    );
    let rm = within("rm f", t.fs.unlink(ROOT_INO, name("f"))).await;
    assert!(
        rm.is_err(),
        "rm f must fail when DeleteObject fails: {rm:?}"
    );
    t.f.clear(Op::Delete);
    let flushed = within("close (flush)", t.fs.flush(fh)).await;
    let released = within("close (release)", t.fs.release(fh)).await;
    assert_eq!(flushed, Ok(()), "the writer's close");
    assert_eq!(released, Ok(()), "the writer's release");
    assert_holds(
        &t.m,
        "f",
        &data,
        "the failed rm kept f; its writer's data landed",
    );
}

// ----------------------------------------------------------------------
// Case 7: mv src dst while dst's close is uploading.

#[tokio::test]
async fn case7_a_rename_over_a_file_being_uploaded_wins() {
    let t = setup(true, |_| {});
    t.m.insert("src", b"SRC content", Metadata::new());
    t.m.insert("dst", b"old dst", Metadata::new());
    let d = within("lookup", t.fs.lookup(ROOT_INO, name("dst")))
        .await
        .unwrap();
    let fh = within("open", t.fs.open(d.ino, libc::O_WRONLY | libc::O_TRUNC))
        .await
        .unwrap();
    t.fs.write(fh, 0, b"stale bytes of dst").await.unwrap();
    t.f.hold(Op::Put, 1);
    let fs = t.fs.clone();
    let closer = tokio::spawn(async move {
        let flushed = fs.flush(fh).await;
        let released = fs.release(fh).await;
        flushed.and(released)
    });
    t.f.wait_held(Op::Put)
        .await
        .expect("dst's close uploads (held)");
    let fs = t.fs.clone();
    let mut mv = tokio::spawn(async move {
        fs.rename(ROOT_INO, name("src"), ROOT_INO, name("dst"), false)
            .await
    });
    // Let the rename run as far as it goes while the upload is held: until
    // it copied, or finished, or (serialised behind dst) a bounded moment.
    let f = t.f.clone();
    let early = tokio::time::timeout(Duration::from_secs(2), async {
        tokio::select! {
            r = &mut mv => Some(r),
            _ = async { while f.calls(Op::Copy) == 0 { tokio::time::sleep(Duration::from_millis(5)).await } } => None,
        }
    })
    .await;
    t.f.release(Op::Put);
    let renamed = match early {
        Ok(Some(r)) => r.unwrap(),
        _ => join("mv src dst", mv).await,
    };
    let closed = join("close of dst", closer).await;
    assert_eq!(renamed, Ok(()), "mv src dst");
    // The close raced the rename: its result may be either, but the bytes
    // at dst must be the renamed ones.
    let _ = closed;
    assert_holds(
        &t.m,
        "dst",
        b"SRC content",
        "the rename wins over a stale upload",
    );
    assert_eq!(t.m.object("src"), None, "src is gone");
    let a = within("lookup dst", t.fs.lookup(ROOT_INO, name("dst")))
        .await
        .unwrap();
    let rh = within("open dst", t.fs.open(a.ino, libc::O_RDONLY))
        .await
        .unwrap();
    assert_eq!(
        read_all(&t.fs, rh, 100).await.unwrap(),
        b"SRC content",
        "the mount reads the renamed content"
    );
}

// ----------------------------------------------------------------------
// Case 1 (core): logrotate: rename of a large file open for appending.

async fn append_rename_append(dir_rename: bool) {
    let t = setup(true, |_| {});
    let (old_key, new_key) = if dir_rename {
        ("logs/app.log", "logs.old/app.log")
    } else {
        ("app.log", "app.log.1")
    };
    let orig = pattern(12 * MIB, 1);
    t.m.insert(old_key, &orig, Metadata::new());
    let parent = if dir_rename {
        within("lookup logs", t.fs.lookup(ROOT_INO, name("logs")))
            .await
            .unwrap()
            .ino
    } else {
        ROOT_INO
    };
    let a = within("lookup", t.fs.lookup(parent, name("app.log")))
        .await
        .unwrap();
    let fh = within("open", t.fs.open(a.ino, libc::O_WRONLY | libc::O_APPEND))
        .await
        .unwrap();
    let w1 = pattern(100_000, 11);
    t.fs.write(fh, orig.len() as u64, &w1).await.unwrap();
    let mv = if dir_rename {
        t.fs.rename(ROOT_INO, name("logs"), ROOT_INO, name("logs.old"), false)
    } else {
        t.fs.rename(
            ROOT_INO,
            name("app.log"),
            ROOT_INO,
            name("app.log.1"),
            false,
        )
    };
    within("mv", mv).await.expect("rename of the open log");
    let w2 = pattern(200_000, 12);
    let w = t.fs.write(fh, (orig.len() + w1.len()) as u64, &w2).await;
    assert_eq!(w, Ok(w2.len() as u32), "write after the rename");
    let flushed = within("close (flush)", t.fs.flush(fh)).await;
    let released = within("close (release)", t.fs.release(fh)).await;
    assert_eq!(flushed, Ok(()), "close() after the rename");
    assert_eq!(released, Ok(()), "release after the rename");
    assert_holds(&t.m, new_key, &cat(&[&orig, &w1, &w2]), "at the new key");
    assert_eq!(t.m.object(old_key), None, "nothing left at the old key");
    assert_eq!(t.m.open_uploads(), 0, "no multipart upload left open");
}

#[tokio::test]
async fn case1_rename_of_a_large_file_open_for_appending_keeps_every_byte() {
    append_rename_append(false).await;
}

#[tokio::test]
async fn case1_rename_of_the_directory_of_a_large_file_open_for_appending_keeps_every_byte() {
    append_rename_append(true).await;
}

// ----------------------------------------------------------------------
// Case 19 (core): listings of unlinked and replaced open files.

#[tokio::test]
async fn case19_an_unlinked_open_file_is_not_listed_and_its_directory_can_be_removed() {
    let t = setup(true, |c| c.metadata_ttl = Duration::ZERO);
    let d = within("mkdir", t.fs.mkdir(ROOT_INO, name("d"), USER))
        .await
        .unwrap();
    let (_, fh) = within(
        "create",
        t.fs.create(d.ino, name("f"), USER, libc::O_WRONLY),
    )
    .await
    .unwrap();
    t.fs.write(fh, 0, b"first").await.unwrap();
    within("fsync", t.fs.fsync(fh)).await.unwrap();
    t.fs.write(fh, 5, b" second").await.unwrap();
    within("rm d/f", t.fs.unlink(d.ino, name("f")))
        .await
        .unwrap();
    let listed = names(&t.fs, d.ino).await;
    assert!(
        !listed.contains(&"f".to_string()),
        "an unlinked open file is listed: {listed:?}"
    );
    assert_eq!(
        within("rmdir d", t.fs.rmdir(ROOT_INO, name("d"))).await,
        Ok(()),
        "rmdir of a directory whose only file was unlinked while open"
    );
    let _ = t.fs.write(fh, 12, b" third").await;
    let _ = within("close", t.fs.flush(fh)).await;
    let _ = within("release", t.fs.release(fh)).await;
    assert_eq!(
        t.m.object("d/f"),
        None,
        "the unlinked file does not come back"
    );
    assert!(
        !names(&t.fs, ROOT_INO).await.contains(&"d".to_string()),
        "d stays removed"
    );
}

/// Every file left below the staging directory (staged copies, journals).
fn staged_files(t: &T) -> Vec<std::path::PathBuf> {
    common::files_below(&t._dir.path().join("staging"))
}

/// What takes f's name away while a rewrite of f opens.
#[derive(Clone, Copy)]
enum Detach {
    /// `rm f`, held at its DeleteObject.
    Unlink,
    /// `mv g f` (g holding "moved"), held at its CopyObject.
    RenameOver,
}

/// `f` (holding `contents`) is looked up, and `rm f` or `mv g f` is
/// started and held at its request: f's inode, the held task and the
/// request held.
async fn detach_held(
    t: &T,
    contents: &[u8],
    how: Detach,
) -> (u64, tokio::task::JoinHandle<Result<(), FsError>>, Op) {
    t.m.insert("f", contents, Metadata::new());
    let a = within("lookup", t.fs.lookup(ROOT_INO, name("f")))
        .await
        .unwrap();
    let fs = t.fs.clone();
    let (op, gone) = match how {
        Detach::Unlink => {
            t.f.hold(Op::Delete, 1);
            let j = tokio::spawn(async move { fs.unlink(ROOT_INO, name("f")).await });
            (Op::Delete, j)
        }
        Detach::RenameOver => {
            t.m.insert("g", b"moved", Metadata::new());
            t.f.hold(Op::Copy, 1);
            let j = tokio::spawn(async move {
                fs.rename(ROOT_INO, name("g"), ROOT_INO, name("f"), false)
                    .await
            });
            (Op::Copy, j)
        }
    };
    within("the held request", t.f.wait_held(op)).await.unwrap();
    (a.ino, gone, op)
}

/// The same, and an `O_TRUNC` open of the looked-up inode comes meanwhile:
/// the open's handle and the held unlink or rename (its request still
/// held).
async fn rewrite_during_held(
    t: &T,
    contents: &[u8],
    how: Detach,
) -> (u64, tokio::task::JoinHandle<Result<(), FsError>>) {
    let (ino, gone, _) = detach_held(t, contents, how).await;
    let fh = within(
        "open O_TRUNC",
        t.fs.open(ino, libc::O_WRONLY | libc::O_TRUNC),
    )
    .await
    .unwrap();
    (fh, gone)
}

/// `cat f` racing `rm f` or `mv g f`: the kernel looked f up, and its
/// open came while the DeleteObject or CopyObject was in flight, after
/// the unlink or rename had looked for f's readers to keep their bytes.
/// The open succeeded and the first read failed with EIO (the object it
/// pinned was gone). An open now waits for the unlink or rename it
/// races: then ESTALE (the kernel looks the name up again), or a
/// handle that reads what it opened.
#[tokio::test]
async fn case19_a_read_open_racing_an_unlink_or_rename_over_reads_or_is_estale() {
    for how in [Detach::RenameOver, Detach::Unlink] {
        let t = setup(false, |c| c.metadata_ttl = Duration::ZERO);
        let (ino, gone, op) = detach_held(&t, b"old contents", how).await;
        let fs = t.fs.clone();
        let open = tokio::spawn(async move { fs.open(ino, libc::O_RDONLY).await });
        // Everything but the held request runs meanwhile (bounded: the
        // open either answers or waits).
        for _ in 0..1000 {
            if open.is_finished() {
                break;
            }
            tokio::task::yield_now().await;
        }
        t.f.release(op);
        assert_eq!(join("rm f / mv g f", gone).await, Ok(()));
        match join("open", open).await {
            Err(e) => assert_eq!(errno(&e), libc::ESTALE, "open"),
            Ok(fh) => {
                let got = within("read", t.fs.read(fh, 0, 100)).await;
                assert_eq!(got.as_deref(), Ok(&b"old contents"[..]), "read");
                within("release", t.fs.release(fh)).await.unwrap();
            }
        }
    }
}

/// `rm f` or `mv g f` racing a rewrite of f (`O_TRUNC` open, write,
/// close): the open comes while the unlink's DeleteObject (the rename's
/// CopyObject) is in flight, so the unlink finds no write state to
/// discard. The rewrite's data belongs to a file that no longer has a
/// name: it is never uploaded, and its staged copy and journal go with its
/// last close (they were kept for "recovery", and the next mount put them
/// in the bucket beside the key).
#[tokio::test]
async fn case19_a_rewrite_racing_its_unlink_or_a_rename_over_it_leaves_nothing_staged() {
    for (how, op, want) in [
        (Detach::Unlink, Op::Delete, None),
        (Detach::RenameOver, Op::Copy, Some(&b"moved"[..])),
    ] {
        let t = setup(true, |c| c.metadata_ttl = Duration::ZERO);
        let (fh, gone) = rewrite_during_held(&t, b"old contents", how).await;
        t.fs.write(fh, 0, b"rewritten").await.unwrap();
        t.f.release(op);
        assert_eq!(join("rm f / mv g f", gone).await, Ok(()));
        // Written after the unlink: still accepted, as by any unlinked file.
        assert_eq!(t.fs.write(fh, 9, b" again").await, Ok(6));
        assert_eq!(within("close", t.fs.flush(fh)).await, Ok(()));
        assert_eq!(within("release", t.fs.release(fh)).await, Ok(()));
        match want {
            None => assert_eq!(
                t.m.keys(),
                Vec::<String>::new(),
                "the unlinked file came back"
            ),
            Some(w) => {
                assert_holds(&t.m, "f", w, "the renamed file");
                assert_eq!(t.m.keys(), ["f"], "the bucket");
            }
        }
        assert_eq!(
            staged_files(&t),
            Vec::<std::path::PathBuf>::new(),
            "left staged"
        );
    }
}

/// The same race, and the daemon is killed before the rewrite writes or
/// closes: its state was journaled as a rewrite of f, and the next mount's
/// recovery put the empty copy over f (written again by then, with the
/// same bytes and so the same ETag). The unlink now discards the state
/// that came while its DeleteObject was in flight.
#[tokio::test]
async fn case19_a_rewrite_racing_its_unlink_is_not_recovered_after_a_crash() {
    let t = setup(false, |c| c.metadata_ttl = Duration::ZERO);
    let (_fh, rm) = rewrite_during_held(&t, b"data", Detach::Unlink).await;
    t.f.release(Op::Delete);
    assert_eq!(join("rm f", rm).await, Ok(()), "rm f");
    // Another writer makes f again, with the same bytes.
    t.m.insert("f", b"data", Metadata::new());
    crash_then_bucket_holds_only(t, "f", b"data").await;
}

/// The same with `mv g f`: the open comes while the rename's CopyObject is
/// in flight, and the state it starts is journaled as a rewrite of the f
/// that the rename replaces. The next mount's recovery put its empty copy
/// beside the renamed file as `f.bucketfs-recovered-…`.
#[tokio::test]
async fn case19_a_rewrite_racing_a_rename_over_it_is_not_recovered_after_a_crash() {
    let t = setup(false, |c| c.metadata_ttl = Duration::ZERO);
    let (_fh, mv) = rewrite_during_held(&t, b"data", Detach::RenameOver).await;
    t.f.release(Op::Copy);
    assert_eq!(join("mv g f", mv).await, Ok(()), "mv g f");
    crash_then_bucket_holds_only(t, "f", b"moved").await;
}

/// The daemon dies in the middle of `mv g f`: its CopyObject landed (f
/// holds g's bytes) but not the DeleteObject of g, and an `O_TRUNC` open
/// of f came meanwhile and wrote nothing. Its journal names the f the
/// rename replaced, so the next mount's recovery found the object changed
/// and put the empty copy beside it (`f.bucketfs-recovered-…`, found by
/// the attack session's kill cycles). An emptied file never written,
/// whose object changed or went since, has nothing to keep: dropped.
#[tokio::test]
async fn case19_a_crash_mid_rename_leaves_no_empty_copy_of_a_rewrite_that_wrote_nothing() {
    let t = setup(false, |c| c.metadata_ttl = Duration::ZERO);
    t.f.hold(Op::Delete, 1);
    let (_fh, mv) = rewrite_during_held(&t, b"data", Detach::RenameOver).await;
    t.f.release(Op::Copy);
    within("mv's DeleteObject of g", t.f.wait_held(Op::Delete))
        .await
        .unwrap();
    // The daemon is killed: the rename never finishes.
    mv.abort();
    let _ = mv.await;
    let m = crash_and_recover(t).await;
    assert_holds(&m, "f", b"moved", "the rename's copy");
    assert_eq!(m.keys(), ["f", "g"], "nothing beside f");
}

/// `rm f` racing `mv f h` while f is written: the unlink looked f up, the
/// writer opened it while the DeleteObject was in flight, and the rename
/// moved f, its writer with it, to h. The unlink then discarded the write
/// state of the inode it had looked up, though it was h by then: what was
/// written to h after the rename went nowhere. A late writer is discarded
/// only if its file really lost its name.
#[tokio::test]
async fn case19_a_writer_of_a_file_renamed_away_during_its_unlink_keeps_its_data() {
    let t = setup(false, |c| c.metadata_ttl = Duration::ZERO);
    let (fh, rm) = rewrite_during_held(&t, b"old", Detach::Unlink).await;
    within(
        "mv f h",
        t.fs.rename(ROOT_INO, name("f"), ROOT_INO, name("h"), false),
    )
    .await
    .unwrap();
    t.f.release(Op::Delete);
    assert_eq!(join("rm f", rm).await, Ok(()), "rm f");
    assert_eq!(t.fs.write(fh, 0, b"written to h").await, Ok(12));
    assert_eq!(within("close", t.fs.flush(fh)).await, Ok(()));
    assert_eq!(within("release", t.fs.release(fh)).await, Ok(()));
    assert_holds(&t.m, "h", b"written to h", "the renamed file");
    assert_eq!(t.m.keys(), ["h"], "the bucket");
}

/// The same with the writer there first: `mv f h` holds f's write state
/// through its CopyObject, `rm f` waits for it, then found the state (now
/// h's) and discarded it. The unlink now sees that the name is no longer
/// that file's: ENOENT, as if it came after the rename.
#[tokio::test]
async fn case19_an_unlink_waiting_for_a_writer_renamed_away_leaves_it() {
    let t = setup(false, |c| c.metadata_ttl = Duration::ZERO);
    t.m.insert("f", b"old", Metadata::new());
    let a = within("lookup", t.fs.lookup(ROOT_INO, name("f")))
        .await
        .unwrap();
    let fh = within("open", t.fs.open(a.ino, libc::O_WRONLY | libc::O_TRUNC))
        .await
        .unwrap();
    t.f.hold(Op::Copy, 1);
    let fs = t.fs.clone();
    let mv = tokio::spawn(async move {
        fs.rename(ROOT_INO, name("f"), ROOT_INO, name("h"), false)
            .await
    });
    within("mv's CopyObject", t.f.wait_held(Op::Copy))
        .await
        .unwrap();
    let fs = t.fs.clone();
    let rm = tokio::spawn(async move { fs.unlink(ROOT_INO, name("f")).await });
    // Everything but the held copy runs meanwhile (bounded).
    for _ in 0..1000 {
        tokio::task::yield_now().await;
    }
    t.f.release(Op::Copy);
    assert_eq!(join("mv f h", mv).await, Ok(()), "mv f h");
    let gone = join("rm f", rm).await;
    assert!(
        matches!(gone, Ok(()) | Err(FsError::NotFound)),
        "rm f: {gone:?}"
    );
    assert_eq!(t.fs.write(fh, 0, b"written to h").await, Ok(12));
    assert_eq!(within("close", t.fs.flush(fh)).await, Ok(()));
    assert_eq!(within("release", t.fs.release(fh)).await, Ok(()));
    assert_holds(&t.m, "h", b"written to h", "the renamed file");
    assert_eq!(t.m.keys(), ["h"], "the bucket");
}

/// The daemon dies with everything of `t` as it is, and the next mount's
/// recovery runs over its staging directory: the bucket afterwards.
async fn crash_and_recover(t: T) -> Arc<MemStore> {
    let staging = t._dir.path().join("staging");
    drop(t.fs);
    let opts = UploadOptions {
        part_size_bytes: 5 * MIB as u64,
        concurrency: 2,
    };
    let r = bucketfs::write::recover(&*t.m, &staging, &opts).await;
    assert!(r.iter().all(|r| r.is_ok()), "{r:?}");
    t.m
}

/// The same, and the bucket then holds `key` with `want` and nothing else.
async fn crash_then_bucket_holds_only(t: T, key: &str, want: &[u8]) {
    let m = crash_and_recover(t).await;
    assert_holds(&m, key, want, "recovery after the crash");
    assert_eq!(m.keys(), [key], "nothing beside {key}");
}

#[tokio::test]
async fn case19_rename_over_an_open_file_lists_it_once() {
    let t = setup(true, |c| c.metadata_ttl = Duration::ZERO);
    t.m.insert("x", b"content of x", Metadata::new());
    t.m.insert("y", b"content of y", Metadata::new());
    let y = within("lookup y", t.fs.lookup(ROOT_INO, name("y")))
        .await
        .unwrap();
    let fh = within("open y", t.fs.open(y.ino, libc::O_WRONLY))
        .await
        .unwrap();
    t.fs.write(fh, 0, b"y is being rewritten").await.unwrap();
    within(
        "mv x y",
        t.fs.rename(ROOT_INO, name("x"), ROOT_INO, name("y"), false),
    )
    .await
    .unwrap();
    let listed = names(&t.fs, ROOT_INO).await;
    assert_eq!(
        listed.iter().filter(|n| *n == "y").count(),
        1,
        "y listed once while the replaced y is open: {listed:?}"
    );
    assert!(!listed.contains(&"x".to_string()), "x is gone: {listed:?}");
    let _ = within("close old y", t.fs.flush(fh)).await;
    let _ = within("release old y", t.fs.release(fh)).await;
    let listed = names(&t.fs, ROOT_INO).await;
    assert_eq!(
        listed.iter().filter(|n| *n == "y").count(),
        1,
        "y listed once after the replaced y is closed: {listed:?}"
    );
    assert_holds(
        &t.m,
        "y",
        b"content of x",
        "the replaced (unlinked) y's close must not overwrite the renamed x",
    );
}

// ----------------------------------------------------------------------
// Case 17 (core): readers.

fn uploads(f: &Faulty<MemStore>) -> u64 {
    f.calls(Op::Put) + f.calls(Op::CreateMultipart)
}

#[tokio::test]
async fn case17_closing_a_reader_of_a_new_file_uploads_nothing() {
    let t = setup(true, |_| {});
    let (a, wh) = within(
        "create",
        t.fs.create(ROOT_INO, name("f"), USER, libc::O_WRONLY),
    )
    .await
    .unwrap();
    t.fs.write(wh, 0, b"half of it").await.unwrap();
    let before = uploads(&t.f);
    let rh = within("open reader", t.fs.open(a.ino, libc::O_RDONLY))
        .await
        .unwrap();
    within("close reader (flush)", t.fs.flush(rh))
        .await
        .unwrap();
    within("close reader (release)", t.fs.release(rh))
        .await
        .unwrap();
    assert_eq!(
        uploads(&t.f) - before,
        0,
        "a reader's close uploaded the half-written file: {:?}",
        t.f.log()
    );
    assert_ne!(
        t.m.object("f").as_deref(),
        Some(&b"half of it"[..]),
        "half-written file in S3"
    );
    t.fs.write(wh, 10, b", and the rest").await.unwrap();
    within("close writer", t.fs.flush(wh)).await.unwrap();
    within("release writer", t.fs.release(wh)).await.unwrap();
    assert_holds(
        &t.m,
        "f",
        b"half of it, and the rest",
        "after the writer's close",
    );
}

#[tokio::test]
async fn case17_a_reader_of_a_growing_new_file_reads_its_bytes_after_the_writer_closes() {
    let t = setup(true, |_| {});
    let (a, wh) = within(
        "create",
        t.fs.create(ROOT_INO, name("f"), USER, libc::O_WRONLY),
    )
    .await
    .unwrap();
    t.fs.write(wh, 0, b"hello").await.unwrap();
    let rh = within("open reader", t.fs.open(a.ino, libc::O_RDONLY))
        .await
        .unwrap();
    t.fs.write(wh, 5, b" world").await.unwrap();
    within("close writer", t.fs.flush(wh)).await.unwrap();
    within("release writer", t.fs.release(wh)).await.unwrap();
    assert_holds(&t.m, "f", b"hello world", "the writer's close");
    let got = read_all(&t.fs, rh, 100).await;
    assert_eq!(
        got.as_deref(),
        Ok(&b"hello world"[..]),
        "the reader reads the bytes after the writer closed (not EOF)"
    );
}

#[tokio::test]
async fn case17_a_reader_never_sees_new_bytes_then_old_ones() {
    let t = setup(true, |c| c.block_size_bytes = 64 * 1024);
    t.m.insert("f", b"old old old old", Metadata::new());
    let a = within("lookup", t.fs.lookup(ROOT_INO, name("f")))
        .await
        .unwrap();
    let wh = within("open writer", t.fs.open(a.ino, libc::O_WRONLY))
        .await
        .unwrap();
    t.fs.write(wh, 0, b"NEW").await.unwrap();
    let rh = within("open reader", t.fs.open(a.ino, libc::O_RDONLY))
        .await
        .unwrap();
    let first = read_all(&t.fs, rh, 100).await.unwrap();
    assert_eq!(
        first, b"NEW old old old",
        "the reader sees the writer's bytes"
    );
    within("close writer", t.fs.flush(wh)).await.unwrap();
    within("release writer", t.fs.release(wh)).await.unwrap();
    let second = read_all(&t.fs, rh, 100).await;
    assert_eq!(
        second.as_deref(),
        Ok(&first[..]),
        "after the writer closed the same reader reads old bytes again"
    );
}

/// How a file that a handle reads goes away, by this mount's own hand.
#[derive(Clone, Copy, Debug)]
enum Away {
    /// `mv d/f d/h`
    Rename,
    /// `rm d/f`
    Remove,
    /// `mv d/g d/f`: another file replaces it.
    Replace,
    /// `mv d e`: its directory moves.
    DirRename,
    /// `rm d/f; rmdir d`
    RemoveThenRmdir,
    /// `rm d/f`, then a new `d/f` written and closed.
    RemoveThenRecreate,
    /// `rm d/f; mv d e`
    RemoveThenDirRename,
    /// `rm d/f; mv x d`: an empty-looking d replaced by directory x.
    RemoveThenReplaceDir,
}

/// Unversioned: reads are pinned by ETag, so an object deleted or
/// overwritten is gone for good; the reader must still read its bytes
/// (POSIX: an open file lives until its last close).
async fn reader_across(away: Away) {
    reader_across_on(away, false).await;
}

async fn reader_across_on(away: Away, versioned: bool) {
    let t = setup(versioned, |c| c.block_size_bytes = 64 * 1024);
    let data = pattern(512 * 1024, 17);
    let other = pattern(300 * 1024, 71);
    t.m.insert("d/f", &data, Metadata::new());
    t.m.insert("d/g", &other, Metadata::new());
    t.m.insert("x/y", b"y in x", Metadata::new());
    let d = within("lookup d", t.fs.lookup(ROOT_INO, name("d")))
        .await
        .unwrap();
    let a = within("lookup f", t.fs.lookup(d.ino, name("f")))
        .await
        .unwrap();
    let rh = within("open reader", t.fs.open(a.ino, libc::O_RDONLY))
        .await
        .unwrap();
    let head = within("read", t.fs.read(rh, 0, 1000)).await.unwrap();
    assert_eq!(head.as_ref(), &data[..1000]);
    let mv = |from: u64, f: &'static str, to: u64, g: &'static str| {
        within("rename", t.fs.rename(from, name(f), to, name(g), false))
    };
    match away {
        Away::Rename => mv(d.ino, "f", d.ino, "h").await.unwrap(),
        Away::Replace => mv(d.ino, "g", d.ino, "f").await.unwrap(),
        Away::DirRename => mv(ROOT_INO, "d", ROOT_INO, "e").await.unwrap(),
        _ => {
            within("rm d/f", t.fs.unlink(d.ino, name("f")))
                .await
                .unwrap();
            // Only f was being read: g may go too.
            within("rm d/g", t.fs.unlink(d.ino, name("g")))
                .await
                .unwrap();
        }
    }
    match away {
        Away::RemoveThenRmdir => within("rmdir d", t.fs.rmdir(ROOT_INO, name("d")))
            .await
            .unwrap(),
        Away::RemoveThenRecreate => {
            let (_, wh) = within(
                "create d/f",
                t.fs.create(d.ino, name("f"), USER, libc::O_WRONLY),
            )
            .await
            .unwrap();
            t.fs.write(wh, 0, b"a new f").await.unwrap();
            within("close new f", t.fs.flush(wh)).await.unwrap();
            within("release new f", t.fs.release(wh)).await.unwrap();
        }
        Away::RemoveThenDirRename => mv(ROOT_INO, "d", ROOT_INO, "e").await.unwrap(),
        Away::RemoveThenReplaceDir => mv(ROOT_INO, "x", ROOT_INO, "d").await.unwrap(),
        _ => {}
    }
    // A block far from what was read (and read ahead): a new GET.
    let off = 400 * 1024;
    let tail = within("read after", t.fs.read(rh, off as u64, 1000)).await;
    match tail {
        Ok(b) => assert!(
            b.as_ref() == &data[off..off + 1000],
            "{away:?}: an open reader read other bytes"
        ),
        Err(e) => panic!("{away:?}: an open reader got {e:?}"),
    }
    let whole = read_all(&t.fs, rh, data.len()).await;
    assert!(
        whole.as_deref() == Ok(&data[..]),
        "{away:?}: the reader reads the whole file as it opened it"
    );
    within("release reader", t.fs.release(rh)).await.unwrap();
    // The bucket as the user left it.
    let keys = t.m.keys();
    let want: Vec<(&str, &[u8])> = match away {
        Away::Rename => vec![("d/g", &other), ("d/h", &data), ("x/y", b"y in x")],
        Away::Replace => vec![("d/f", &other), ("x/y", b"y in x")],
        Away::DirRename => vec![("e/f", &data), ("e/g", &other), ("x/y", b"y in x")],
        Away::Remove | Away::RemoveThenRmdir => vec![("x/y", b"y in x")],
        Away::RemoveThenRecreate => vec![("d/f", b"a new f"), ("x/y", b"y in x")],
        Away::RemoveThenDirRename => vec![("x/y", b"y in x")],
        Away::RemoveThenReplaceDir => vec![("d/y", b"y in x")],
    };
    for (k, v) in &want {
        assert_holds(&t.m, k, v, &format!("{away:?}"));
    }
    let want_keys: Vec<&str> = want.iter().map(|(k, _)| *k).collect();
    assert_eq!(keys, want_keys, "{away:?}: the keys in the bucket");
}

#[tokio::test]
async fn case17_a_reader_keeps_reading_a_file_renamed_by_this_mount() {
    reader_across(Away::Rename).await;
}

#[tokio::test]
async fn case17_a_reader_keeps_reading_a_file_removed_by_this_mount() {
    reader_across(Away::Remove).await;
}

#[tokio::test]
async fn case17_a_reader_keeps_reading_a_file_replaced_by_a_rename() {
    reader_across(Away::Replace).await;
}

#[tokio::test]
async fn case17_a_reader_keeps_reading_a_file_whose_directory_was_renamed() {
    reader_across(Away::DirRename).await;
}

#[tokio::test]
async fn case17_a_reader_keeps_reading_a_removed_file_whose_directory_was_removed() {
    reader_across(Away::RemoveThenRmdir).await;
}

#[tokio::test]
async fn case17_a_reader_keeps_reading_a_removed_file_written_anew() {
    reader_across(Away::RemoveThenRecreate).await;
}

#[tokio::test]
async fn case17_a_removed_file_being_read_does_not_move_with_its_directory() {
    reader_across(Away::RemoveThenDirRename).await;
}

#[tokio::test]
async fn case17_a_removed_file_being_read_does_not_keep_its_directory_from_being_replaced() {
    reader_across(Away::RemoveThenReplaceDir).await;
}

/// The same on a versioned bucket, where readers are pinned by version id.
#[tokio::test]
async fn case17_readers_keep_their_bytes_on_a_versioned_bucket_too() {
    use Away::*;
    for away in [
        Rename,
        Remove,
        Replace,
        DirRename,
        RemoveThenRmdir,
        RemoveThenRecreate,
        RemoveThenDirRename,
        RemoveThenReplaceDir,
    ] {
        reader_across_on(away, true).await;
    }
}

// ----------------------------------------------------------------------
// Case 2 (core): the last upload fails.

/// PUT fails at close (503 SlowDown, for as long as it takes): close
/// reports it, the data stays (a new open reads it), and once S3 answers
/// again it lands with no further user action (background retry).
#[tokio::test]
async fn case2_a_failed_last_upload_keeps_the_data_and_lands_it_later() {
    let t = setup(true, |_| {});
    let data = pattern(300_000, 2);
    let (a, fh) = within(
        "create",
        t.fs.create(ROOT_INO, name("f"), USER, libc::O_WRONLY),
    )
    .await
    .unwrap();
    t.fs.write(fh, 0, &data).await.unwrap();
    t.f.fail(
        Op::Put,
        u32::MAX,
        StoreError::Transient("503 SlowDown".into()),
    );
    let flushed = within("close (flush)", t.fs.flush(fh)).await;
    let released = within("close (release)", t.fs.release(fh)).await;
    assert!(
        flushed.is_err() || released.is_err(),
        "the failed upload is reported: flush {flushed:?}, release {released:?}"
    );
    assert_eq!(t.m.object("f"), None, "nothing half-written");
    // The data was not thrown away: the file still reads its bytes.
    let again = within("lookup", t.fs.lookup(ROOT_INO, name("f"))).await;
    assert_eq!(
        again.as_ref().map(|x| x.size),
        Ok(data.len() as u64),
        "stat of the file whose upload failed"
    );
    let rh = within("reopen", t.fs.open(a.ino, libc::O_RDONLY))
        .await
        .expect("a new open of the unsaved file");
    assert!(
        read_all(&t.fs, rh, data.len()).await.as_deref() == Ok(&data[..]),
        "a new open reads the unsaved bytes"
    );
    within("release reader", t.fs.release(rh)).await.unwrap();
    // S3 is back: no user action; the data lands in bounded time.
    t.f.clear(Op::Put);
    let landed = eventually(Duration::from_secs(30), || holds(&t.m, "f", &data).is_ok()).await;
    assert!(
        landed,
        "the staged data did not land within 30 s of S3 coming back: {:?} (PUT tried {} times)",
        holds(&t.m, "f", &data),
        t.f.calls(Op::Put)
    );
}

// ----------------------------------------------------------------------
// Case 3 (core): CompleteMultipartUpload lands but answers an error.

/// A 12 MiB new file: its Complete is performed by the store, its answer
/// held, then the answer is a transient error (a timeout, or a 200 with
/// an error body). The upload that completed must not be aborted, the
/// data must not be lost, the object is exact, no upload left open.
#[tokio::test]
async fn case3_a_complete_that_landed_but_answered_an_error_is_not_aborted_nor_lost() {
    let t = setup(true, |_| {});
    let data = pattern(12 * MIB, 3);
    let (a, fh) = within(
        "create",
        t.fs.create(ROOT_INO, name("big"), USER, libc::O_WRONLY),
    )
    .await
    .unwrap();
    t.fs.write(fh, 0, &data).await.unwrap();
    t.f.hold_after(Op::CompleteMultipart, 1);
    t.f.lie_after(
        Op::CompleteMultipart,
        1,
        StoreError::Transient("timed out waiting for the answer".into()),
    );
    let fs = t.fs.clone();
    let closer = tokio::spawn(async move {
        let flushed = fs.flush(fh).await;
        let released = fs.release(fh).await;
        (flushed, released)
    });
    t.f.wait_held(Op::CompleteMultipart)
        .await
        .expect("close completes a multipart upload");
    assert_holds(&t.m, "big", &data, "the Complete landed");
    let aborts_before = t.f.calls(Op::AbortMultipart);
    t.f.release(Op::CompleteMultipart);
    let (flushed, released) = join("close", closer).await;
    assert_eq!(
        t.f.calls(Op::AbortMultipart) - aborts_before,
        0,
        "an upload that completed was aborted (close: {flushed:?}/{released:?}); calls {:?}",
        t.f.log()
            .iter()
            .filter(|(op, _)| matches!(
                op,
                Op::CompleteMultipart | Op::AbortMultipart | Op::CreateMultipart | Op::Put
            ))
            .collect::<Vec<_>>()
    );
    if flushed.is_err() || released.is_err() {
        // Reported, but the data must not be lost: the mount still has it.
        let got = within("lookup", t.fs.lookup(ROOT_INO, name("big"))).await;
        assert_eq!(got.map(|x| x.size), Ok(data.len() as u64));
    }
    assert_holds(&t.m, "big", &data, "after close");
    assert_eq!(t.m.open_uploads(), 0, "no multipart upload left open");
    let rh = within("reopen", t.fs.open(a.ino, libc::O_RDONLY))
        .await
        .unwrap();
    let back = read_all(&t.fs, rh, data.len()).await.unwrap();
    assert!(back == data, "the mount reads the file back exact");
}

// ----------------------------------------------------------------------
// Case 4, raced: a chmod of a closed file whose self-copy is answered
// while the same file's first open for writing takes the old ETag.

#[tokio::test]
async fn case4_a_chmod_racing_the_first_open_for_writing_keeps_every_byte() {
    let t = setup(false, |_| {});
    let orig = pattern(12 * MIB, 41);
    t.m.insert("f", &orig, Metadata::new());
    let a = within("lookup", t.fs.lookup(ROOT_INO, name("f")))
        .await
        .unwrap();
    // The copy is done by the store; its answer waits.
    t.f.hold_after(Op::Copy, 1);
    let fs = t.fs.clone();
    let chmod = tokio::spawn(async move {
        fs.setattr(
            a.ino,
            SetAttr {
                mode: Some(0o600),
                ..Default::default()
            },
        )
        .await
    });
    within("copy held", t.f.wait_held(Op::Copy))
        .await
        .expect("the self-copy is under way");
    // Opened now, the writer builds on the ETag from before the copy.
    let fh = within(
        "open for append",
        t.fs.open(a.ino, libc::O_WRONLY | libc::O_APPEND),
    )
    .await
    .unwrap();
    t.f.release(Op::Copy);
    within("chmod", chmod).await.unwrap().unwrap();
    within("write", t.fs.write(fh, orig.len() as u64, b"TAIL"))
        .await
        .unwrap();
    within("close", t.fs.flush(fh)).await.unwrap();
    within("release", t.fs.release(fh)).await.unwrap();
    let mut want = orig;
    want.extend_from_slice(b"TAIL");
    holds(&t.m, "f", &want).unwrap();
    assert_eq!(
        t.m.metadata("f").unwrap().get("mode").map(String::as_str),
        Some(&*format!("{}", libc::S_IFREG | 0o600)),
        "the mode rode along"
    );
}

// ----------------------------------------------------------------------
// A create in a directory while the directory is being renamed (the
// kernel does not lock the directory being moved): it lands under the
// new name, never under the old one, and the old directory stays gone.

#[tokio::test]
async fn a_create_during_a_directory_rename_lands_under_the_new_name() {
    let t = setup(false, |_| {});
    t.m.insert("d/old", b"old", Metadata::new());
    let d = within("lookup d", t.fs.lookup(ROOT_INO, name("d")))
        .await
        .unwrap();
    t.f.hold(Op::Copy, 1);
    let fs = t.fs.clone();
    let mv = tokio::spawn(async move {
        fs.rename(ROOT_INO, name("d"), ROOT_INO, name("e"), false)
            .await
    });
    within("copy held", t.f.wait_held(Op::Copy)).await.unwrap();
    let fs = t.fs.clone();
    let create = tokio::spawn(async move {
        let (_, fh) = fs.create(d.ino, name("new"), USER, libc::O_WRONLY).await?;
        fs.write(fh, 0, b"fresh").await?;
        fs.flush(fh).await?;
        fs.release(fh).await
    });
    // Give the create every chance to run ahead of the rename.
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
    t.f.release(Op::Copy);
    within("mv", mv).await.unwrap().unwrap();
    within("create", create).await.unwrap().unwrap();
    holds(&t.m, "e/new", b"fresh").unwrap();
    holds(&t.m, "e/old", b"old").unwrap();
    let keys = t.m.keys();
    assert!(
        keys.iter().all(|k| !k.starts_with("d/")),
        "the old directory came back: {keys:?}"
    );
}

/// `mv x y` of a new file not sent yet over an object, done; then another
/// client puts y's old bytes back (same ETag: a sync tool, a restore); then
/// the daemon dies before x is sent. The other client's object keeps the
/// key and x goes beside it: the rename's journal no longer says "over
/// y's old object" once that was deleted (an outsider found x put over it).
#[tokio::test]
async fn a_finished_rename_over_does_not_overwrite_the_old_bytes_put_back() {
    let t = setup(false, |_| {});
    t.m.insert("y", b"the old y", Metadata::new());
    within("lookup y", t.fs.lookup(ROOT_INO, name("y")))
        .await
        .unwrap();
    let (_, wh) = within(
        "create x",
        t.fs.create(ROOT_INO, name("x"), USER, libc::O_WRONLY),
    )
    .await
    .unwrap();
    t.fs.write(wh, 0, b"x, never sent").await.unwrap();
    within(
        "mv x y",
        t.fs.rename(ROOT_INO, name("x"), ROOT_INO, name("y"), false),
    )
    .await
    .unwrap();
    assert_eq!(t.m.keys(), Vec::<String>::new(), "y's object deleted");
    t.m.insert("y", b"the old y", Metadata::new());
    let m = crash_and_recover(t).await;
    assert_holds(&m, "y", b"the old y", "the other client's object");
    let keys = m.keys();
    assert_eq!(keys.len(), 2, "{keys:?}");
    assert!(keys[1].starts_with("y.bucketfs-recovered-"), "{keys:?}");
    assert_holds(&m, &keys[1], b"x, never sent", "x beside it");
}

/// Opens `f` (at the root) for reading and reads from it (so it reads
/// the object it pinned): the handle.
async fn open_and_read(t: &T, f: &'static str) -> u64 {
    let a = within("lookup", t.fs.lookup(ROOT_INO, name(f)))
        .await
        .unwrap();
    let rh = within("open", t.fs.open(a.ino, libc::O_RDONLY))
        .await
        .unwrap();
    within("read", t.fs.read(rh, 0, 7)).await.unwrap();
    rh
}

/// Opens `f` (at the root) for reading, reads from it, and removes it:
/// its delete then waits for the handle returned.
async fn read_then_rm(t: &T, f: &'static str) -> u64 {
    let rh = open_and_read(t, f).await;
    within("rm", t.fs.unlink(ROOT_INO, name(f))).await.unwrap();
    rh
}

/// The last reader of a removed file closes while its rm is still making
/// the tombstone (held at its HEAD): the delete is done all the same.
/// Before, the close found nothing deferred yet, the rm then deferred the
/// delete to a reader already gone, and the object stayed in the bucket
/// until the next mount (an `mv` across buckets, under load).
#[tokio::test]
async fn a_reader_closing_while_its_file_is_removed_leaves_no_object() {
    let t = setup(false, |_| {});
    t.m.insert("y", &pattern(70_000, 5), Metadata::new());
    let rh = open_and_read(&t, "y").await;
    t.f.hold(Op::Head, 1);
    let fs = t.fs.clone();
    let rm = tokio::spawn(async move { fs.unlink(ROOT_INO, name("y")).await });
    within("the rm's HEAD", t.f.wait_held(Op::Head))
        .await
        .unwrap();
    within("close", t.fs.release(rh)).await.unwrap();
    t.f.release(Op::Head);
    join("rm", rm).await.unwrap();
    assert!(
        eventually(STEP, || t.m.keys().is_empty()).await,
        "y's object is still in the bucket: {:?}",
        t.m.keys()
    );
}

/// A removed file's reader closes and its deferred DeleteObject is in
/// flight (held) when a new file with the same bytes is written at the
/// name: the new file waits for that delete, so the delete never removes
/// it. Before, the create found no delete to wait for (the close had
/// taken it) and its PUT could land first, then be deleted.
#[tokio::test]
async fn a_new_file_at_a_removed_name_waits_for_the_delete_in_flight() {
    let t = setup(false, |_| {});
    let body = pattern(70_000, 3);
    t.m.insert("y", &body, Metadata::new());
    let rh = read_then_rm(&t, "y").await;
    t.f.hold(Op::Delete, 1);
    let fs = t.fs.clone();
    let closing = tokio::spawn(async move { fs.release(rh).await });
    within("the deferred delete", t.f.wait_held(Op::Delete))
        .await
        .unwrap();
    t.f.hold(Op::Put, 1);
    let (fs, b) = (t.fs.clone(), body.clone());
    let writing = tokio::spawn(async move {
        let (_, fh) = fs.create(ROOT_INO, name("y"), USER, libc::O_WRONLY).await?;
        fs.write(fh, 0, &b).await?;
        fs.release(fh).await
    });
    // A writer that does not wait sends its PUT while the delete is held:
    // let it land first, the order that loses it. (The bound only limits
    // how long a wrong build gets to show it; a right one never sends.)
    let put_first = tokio::time::timeout(Duration::from_secs(2), t.f.wait_held(Op::Put))
        .await
        .is_ok();
    if put_first {
        t.f.release(Op::Put);
        assert!(
            eventually(STEP, || writing.is_finished()).await,
            "the new file's close"
        );
    }
    t.f.release(Op::Delete);
    join("close of the reader", closing).await.unwrap();
    if !put_first {
        within("the PUT after the delete", t.f.wait_held(Op::Put))
            .await
            .unwrap();
        t.f.release(Op::Put);
    }
    join("the new file", writing).await.unwrap();
    assert_holds(&t.m, "y", &body, "the new file");
    assert!(
        !put_first,
        "the new file's PUT went out before the delete's answer"
    );
}

/// A deferred delete that fails at the last reader's close is this
/// mount's still: the name stays hidden, and the retrier deletes the
/// object once S3 answers, without another mount. Before, the name came
/// back in the listing and the object stayed until the next mount.
#[tokio::test]
async fn a_failed_deferred_delete_is_retried_and_the_name_stays_removed() {
    let t = setup(false, |_| {});
    t.m.insert("y", b"removed", Metadata::new());
    let rh = read_then_rm(&t, "y").await;
    t.f.fail(
        Op::Delete,
        u32::MAX,
        StoreError::Transient("refused".into()),
    );
    within("close", t.fs.release(rh)).await.unwrap();
    assert_eq!(t.f.calls(Op::Delete), 1, "tried at the close");
    assert!(t.m.object("y").is_some(), "the delete failed");
    assert!(!names(&t.fs, ROOT_INO).await.contains(&"y".to_string()));
    // The retrier is due to try again within `upload_retry_max` (1 s
    // here), not at its next sweep.
    let due = within("a pass of the retrier", t.fs.retry_pending()).await;
    assert!(
        due.is_some_and(|d| d <= std::time::Instant::now() + Duration::from_secs(1)),
        "{due:?}"
    );
    // `bucketfs status` shows it, also after the retrier failed again.
    assert!(
        eventually(STEP, || t.f.calls(Op::Delete) >= 2).await,
        "retried"
    );
    let failed = t.fs.failed_deletes();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0].0, "y");
    assert!(failed[0].1.contains("refused"), "{failed:?}");
    assert!(t.m.object("y").is_some());
    t.f.clear(Op::Delete);
    assert!(
        eventually(STEP, || t.m.object("y").is_none()).await,
        "deleted by the retrier; deletes tried: {}",
        t.f.calls(Op::Delete)
    );
    assert!(!names(&t.fs, ROOT_INO).await.contains(&"y".to_string()));
    assert!(t.fs.failed_deletes().is_empty());
}

/// With the mount's default `upload_retry_max` (300 s), a deferred delete
/// that failed once (a store slow for a moment: a timeout) is tried again
/// after a second, and the wait doubles with each failure, as a failed
/// upload's does. Before, the first retry came a full minute later, so an
/// `mv` across buckets on a loaded machine left the old object for that
/// minute. (The third try comes 2 s after the second: 1 + 2 s.)
#[tokio::test]
async fn a_failed_deferred_delete_is_tried_again_within_a_second() {
    let t = setup(false, |c| c.upload_retry_max = Duration::from_secs(300));
    t.m.insert("y", b"removed", Metadata::new());
    let rh = read_then_rm(&t, "y").await;
    t.f.fail(Op::Delete, u32::MAX, StoreError::Transient("slow".into()));
    within("close", t.fs.release(rh)).await.unwrap();
    let closed = std::time::Instant::now();
    assert_eq!(t.f.calls(Op::Delete), 1, "tried at the close");
    let due = within("a pass of the retrier", t.fs.retry_pending()).await;
    assert!(
        due.is_some_and(|d| d <= closed + Duration::from_secs(1)),
        "next try {:?} after the close",
        due.map(|d| d.saturating_duration_since(closed))
    );
    assert!(
        eventually(STEP, || t.f.calls(Op::Delete) >= 3).await,
        "retried again and again"
    );
    t.f.clear(Op::Delete);
    assert!(
        eventually(STEP, || t.m.object("y").is_none()).await,
        "deleted by the retrier; deletes tried: {}",
        t.f.calls(Op::Delete)
    );
    assert!(t.fs.failed_deletes().is_empty());
}

/// `mv x y`, x a new file not sent yet: y's DeleteObject lands but its
/// answer is an error (a timeout with retries off). The key is asked
/// again: y is gone, so the rename went through, and x goes up at y.
/// Before, the rename failed with EIO, x kept its name and y was gone:
/// to its user, a failed `mv` that lost the file it left in place.
#[tokio::test]
async fn a_rename_over_whose_delete_landed_unanswered_goes_through() {
    let t = setup(false, |_| {});
    t.m.insert("y", b"the old y", Metadata::new());
    let body = pattern(40_000, 21);
    let (_, fh) = within(
        "create x",
        t.fs.create(ROOT_INO, name("x"), USER, libc::O_WRONLY),
    )
    .await
    .unwrap();
    within("write x", t.fs.write(fh, 0, &body)).await.unwrap();
    within("lookup y", t.fs.lookup(ROOT_INO, name("y")))
        .await
        .unwrap();
    t.f.lie_after(Op::Delete, 1, StoreError::Transient("timed out".into()));
    within(
        "mv x y",
        t.fs.rename(ROOT_INO, name("x"), ROOT_INO, name("y"), false),
    )
    .await
    .unwrap();
    within("close x", t.fs.release(fh)).await.unwrap();
    assert_holds(&t.m, "y", &body, "x at y");
    assert_eq!(t.m.keys(), vec!["y".to_string()]);
    assert_eq!(names(&t.fs, ROOT_INO).await, vec!["y".to_string()]);
}

/// A create at a removed name waits for that name's deferred DeleteObject
/// (held here) without holding the namespace lock meanwhile: a directory
/// rename, and a create elsewhere queued behind it, go on. Before, the
/// create waited inside the lock, the rename waited for the lock, and
/// every create after it waited for the rename (an outsider measured 60 s
/// with S3 silent).
#[tokio::test]
async fn a_create_waiting_for_a_deferred_delete_holds_up_no_other_create() {
    let t = setup(false, |_| {});
    t.m.insert("y", b"removed", Metadata::new());
    t.m.insert("d1/a", b"a", Metadata::new());
    t.m.insert("e/keep", b"k", Metadata::new());
    let e = within("lookup e", t.fs.lookup(ROOT_INO, name("e")))
        .await
        .unwrap();
    within("lookup d1", t.fs.lookup(ROOT_INO, name("d1")))
        .await
        .unwrap();
    let rh = read_then_rm(&t, "y").await;
    t.f.fail(Op::Delete, 1, StoreError::Transient("refused".into()));
    within("close the reader", t.fs.release(rh)).await.unwrap();
    assert!(t.m.object("y").is_some());
    // The delete at the close failed; the create at the name sends it
    // again, and it is held.
    t.f.hold(Op::Delete, 1);
    let fs = t.fs.clone();
    let waiting = tokio::spawn(async move {
        fs.create(ROOT_INO, name("y"), USER, libc::O_WRONLY)
            .await
            .map(|_| ())
    });
    within("the create's delete", t.f.wait_held(Op::Delete))
        .await
        .unwrap();
    within(
        "mv d1 d2 while the delete is held",
        t.fs.rename(ROOT_INO, name("d1"), ROOT_INO, name("d2"), false),
    )
    .await
    .unwrap();
    let (_, fh) = within(
        "a create elsewhere while the delete is held",
        t.fs.create(e.ino, name("w"), USER, libc::O_WRONLY),
    )
    .await
    .unwrap();
    within("close", t.fs.release(fh)).await.unwrap();
    assert!(
        !waiting.is_finished(),
        "the create at y waits for its delete"
    );
    t.f.release(Op::Delete);
    join("the create at y", waiting).await.unwrap();
    assert!(t.m.object("d2/a").is_some() && t.m.object("e/w").is_some());
    assert!(t.m.object("y").is_none(), "{:?}", t.m.keys());
}
