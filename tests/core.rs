//! The filesystem core over the in-memory store: fast, no kernel. Request
//! counts, write patterns against a plain model, failure handling.

mod common;

use std::ffi::OsStr;
use std::sync::Arc;

use bucketfs::fs::inodes::ROOT_INO;
use bucketfs::fs::{Attr, Creator, DirAsk, FileKind, Fs, FsConfig, FsError, RELIST_AFTER, SetAttr};
use bucketfs::store::memory::MemStore;
use bucketfs::store::{Metadata, ObjectStore, Op, StoreError};
use bucketfs::write::UploadOptions;

const USER: Creator = Creator {
    uid: 1000,
    gid: 1000,
    mode: 0o644,
    umask: 0o022,
};

fn fs_with(store: Arc<MemStore>, tweak: impl FnOnce(&mut FsConfig)) -> (Fs, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = FsConfig {
        staging_dir: dir.path().to_path_buf(),
        ..FsConfig::default()
    };
    tweak(&mut cfg);
    (Fs::new(store, cfg), dir)
}

/// The same over a `Faulty` store in front of `m`, to hold or fail its
/// requests.
fn faulty_fs_with(
    m: Arc<MemStore>,
    tweak: impl FnOnce(&mut FsConfig),
) -> (
    Arc<bucketfs::store::faulty::Faulty<MemStore>>,
    Fs,
    tempfile::TempDir,
) {
    let f = Arc::new(bucketfs::store::faulty::Faulty::new(m));
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = FsConfig {
        staging_dir: dir.path().to_path_buf(),
        ..FsConfig::default()
    };
    tweak(&mut cfg);
    (f.clone(), Fs::new(f, cfg), dir)
}

/// `-o uid=1001,gid=1001,umask=0`: the mount's defaults give everything
/// to uid 1001.
fn defaults_to_uid_1001(c: &mut FsConfig) {
    c.defaults.uid = 1001;
    c.defaults.gid = 1001;
    c.defaults.file_perm = 0o666;
}

fn name(s: &str) -> &OsStr {
    OsStr::new(s)
}

fn requests(s: &MemStore) -> u64 {
    Op::ALL.iter().map(|&op| s.counters().get(op)).sum()
}

fn s3fs_meta(mode: u32, uid: u32, mtime: u64) -> Metadata {
    let mut m = Metadata::new();
    m.insert("mode".into(), mode.to_string());
    m.insert("uid".into(), uid.to_string());
    m.insert("gid".into(), uid.to_string());
    m.insert("mtime".into(), mtime.to_string());
    m
}

/// A metadata TTL no machine is slow enough to outlast within one test:
/// request counts must not depend on speed.
const LONG_TTL: std::time::Duration = std::time::Duration::from_secs(3600);

#[tokio::test]
async fn without_object_metadata_ten_thousand_objects_cost_ten_lists_and_no_head() {
    let s = Arc::new(MemStore::unversioned());
    for i in 0..10_000 {
        s.insert(
            &format!("dir/f{i:05}"),
            b"abc",
            s3fs_meta(0o100600, 42, 1_000_000_000),
        );
    }
    let (fs, _d) = fs_with(s.clone(), |c| {
        c.metadata_ttl = LONG_TTL;
        c.object_metadata = false;
    });
    let dir = fs.lookup(ROOT_INO, name("dir")).await.unwrap();
    let before = (s.counters().get(Op::List), s.counters().get(Op::Head));
    let entries = fs.list(dir.ino).await.unwrap();
    assert_eq!(entries.len(), 10_002, "with . and ..");
    assert_eq!(
        s.counters().get(Op::List) - before.0,
        10,
        "one LIST per 1,000"
    );
    let n = requests(&s);
    for e in entries.iter().skip(2) {
        let a = fs.lookup(dir.ino, name(&e.name)).await.unwrap();
        assert_eq!((a.size, a.perm, a.uid), (3, 0o644, 0), "mount defaults");
    }
    assert_eq!(
        s.counters().get(Op::Head) - before.1,
        0,
        "no HEAD per entry"
    );
    assert_eq!(
        requests(&s),
        n,
        "stat after readdir is answered from the listing"
    );
    let f = fs.lookup(dir.ino, name("f00001")).await.unwrap();
    let chmod = SetAttr {
        mode: Some(0o600),
        ..SetAttr::default()
    };
    assert_eq!(
        fs.setattr(f.ino, chmod).await.unwrap_err(),
        FsError::NotPermitted
    );
}

#[tokio::test]
async fn ten_thousand_listed_objects_show_their_own_metadata_for_at_most_one_head_each() {
    let s = Arc::new(MemStore::unversioned());
    for i in 0..10_000 {
        s.insert(
            &format!("dir/f{i:05}"),
            b"abc",
            s3fs_meta(0o100600, 42, 1_000_000_000 + i),
        );
    }
    let (fs, _d) = fs_with(s.clone(), |c| c.metadata_ttl = LONG_TTL);
    let dir = fs.lookup(ROOT_INO, name("dir")).await.unwrap();
    let before = (s.counters().get(Op::List), s.counters().get(Op::Head));
    let entries = fs.list(dir.ino).await.unwrap();
    assert_eq!(entries.len(), 10_002, "with . and ..");
    assert_eq!(
        s.counters().get(Op::List) - before.0,
        10,
        "one LIST per 1,000"
    );
    // Each stat gets the object's own metadata (read ahead, or waited for).
    for (i, e) in entries.iter().skip(2).enumerate() {
        let a = fs.lookup(dir.ino, name(&e.name)).await.unwrap();
        assert_eq!((a.size, a.perm, a.uid, a.gid), (3, 0o600, 42, 42));
        assert_eq!(
            a.mtime,
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000_000 + i as u64)
        );
    }
    let heads = s.counters().get(Op::Head) - before.1;
    assert!(heads <= 10_000, "{heads} HEADs: at most one per entry");
    assert_eq!(s.counters().get(Op::List) - before.0, 10, "no more LISTs");
    let n = requests(&s);
    for e in entries.iter().skip(2) {
        fs.lookup(dir.ino, name(&e.name)).await.unwrap();
        fs.getattr(fs.lookup(dir.ino, name(&e.name)).await.unwrap().ino)
            .await
            .unwrap();
    }
    assert_eq!(
        requests(&s),
        n,
        "stat after the metadata is read costs nothing"
    );
}

#[tokio::test]
async fn readdirplus_never_hands_out_attributes_not_read_from_the_object() {
    let s = Arc::new(MemStore::unversioned());
    for i in 0..600 {
        s.insert(
            &format!("d/f{i:03}"),
            b"x",
            s3fs_meta(0o100600, 42, 1_000_000_000),
        );
    }
    s.insert("d/link", b"f000", s3fs_meta(0o120777, 42, 1_000_000_000));
    s.insert("d/sub/", b"", s3fs_meta(0o040700, 42, 1_000_000_000));
    s.insert("d/sub/x", b"", Metadata::new());
    let (fs, _d) = fs_with(s.clone(), |c| c.metadata_ttl = LONG_TTL);
    let d = fs.lookup(ROOT_INO, name("d")).await.unwrap();
    let fh = fs.opendir(d.ino).await.unwrap();
    let mut offset = 0;
    let mut own = 0;
    loop {
        let batch = fs
            .readdirplus(d.ino, fh, DirAsk::at(offset))
            .await
            .unwrap()
            .entries;
        let Some(last) = batch.last() else { break };
        offset = last.0;
        for (_, e, a, _, is_own) in &batch {
            if e.name == "." || e.name == ".." || !is_own {
                continue;
            }
            own += 1;
            let want = match e.name.as_str() {
                "link" => (FileKind::Symlink, 0o777),
                "sub" => (FileKind::Dir, 0o700),
                _ => (FileKind::File, 0o600),
            };
            assert_eq!((a.kind, a.perm, a.uid), (want.0, want.1, 42), "{}", e.name);
        }
    }
    assert!(
        own >= 128,
        "the first entries of each reply wait for their metadata"
    );
    let link = fs.lookup(d.ino, name("link")).await.unwrap();
    assert_eq!((link.kind, link.perm), (FileKind::Symlink, 0o777));
    let sub = fs.lookup(d.ino, name("sub")).await.unwrap();
    assert_eq!((sub.kind, sub.perm, sub.uid), (FileKind::Dir, 0o700, 42));
}

/// A file the kernel holds (looked up, then kept through an O_PATH
/// descriptor) is rewritten by another client; a listing finds it changed
/// and reads its metadata again, but the object is deleted before that
/// HEAD: the node loses its name with only the listing's attributes,
/// which are the mount's defaults. fstat of the descriptor showed them
/// (with `uid=1001,umask=0`: uid 1001, mode 0666, so the kernel let uid
/// 1001 chmod it). Now such a node's attributes grant nothing.
#[tokio::test]
async fn a_file_that_loses_its_name_before_its_metadata_is_read_grants_nothing() {
    let m = Arc::new(MemStore::unversioned());
    m.insert("d/secret", b"x", s3fs_meta(0o100600, 42, 1_000_000_000));
    let (f, fs, _dir) = faulty_fs_with(m.clone(), |c| {
        c.metadata_ttl = LONG_TTL;
        defaults_to_uid_1001(c);
    });
    let d = fs.lookup(ROOT_INO, name("d")).await.unwrap();
    let a = fs.lookup(d.ino, name("secret")).await.unwrap();
    assert_eq!((a.perm, a.uid), (0o600, 42));
    // Rewritten by another client, then listed again: its HEAD is held.
    m.insert(
        "d/secret",
        b"rewritten",
        s3fs_meta(0o100600, 42, 1_000_000_000),
    );
    f.hold(Op::Head, u32::MAX);
    let fh = fs.opendir(d.ino).await.unwrap();
    // Deleted by the other client before the HEAD reaches S3.
    m.delete("d/secret").await.unwrap();
    let stat = async {
        f.wait_held(Op::Head).await.unwrap();
        f.release(Op::Head);
        fs.getattr(a.ino).await
    };
    let (seen, again) = tokio::join!(fs.getattr(a.ino), stat);
    let last = fs.getattr(a.ino).await;
    assert!(last.is_ok(), "the held file still has attributes: {last:?}");
    for got in [seen, again, last].into_iter().flatten() {
        assert!(
            got.uid != 1001 && got.perm & 0o066 == 0,
            "the mount's defaults: uid {} mode {:o}",
            got.uid,
            got.perm
        );
    }
    fs.releasedir(fh);
}

/// `ls -l` stats what it listed a while ago: an entry that expired is
/// looked up again, a LIST (is it a directory now?) and a HEAD (its
/// metadata). For a name last seen as a file the HEAD now goes beside the
/// LIST, one round trip instead of two; a name never seen costs the LIST
/// alone, as before.
#[tokio::test]
async fn an_expired_files_lookup_sends_its_head_beside_its_list() {
    let m = Arc::new(MemStore::unversioned());
    m.insert("f", b"abc", s3fs_meta(0o100640, 42, 1_000_000_000));
    let (f, fs, _dir) = faulty_fs_with(m.clone(), |c| {
        c.metadata_ttl = std::time::Duration::ZERO;
    });
    let a = fs.lookup(ROOT_INO, name("f")).await.unwrap();
    assert_eq!(
        (f.calls(Op::List), f.calls(Op::Head)),
        (1, 1),
        "first lookup"
    );
    // Expired at once (metadata_ttl=0): looked up again, LIST held.
    f.hold(Op::List, 1);
    let held = async {
        f.wait_held(Op::List).await.unwrap();
        let heads = f.calls(Op::Head);
        f.release(Op::List);
        heads
    };
    let (again, heads_meanwhile) = tokio::join!(fs.lookup(ROOT_INO, name("f")), held);
    assert_eq!(heads_meanwhile, 2, "the HEAD went while the LIST was out");
    let again = again.unwrap();
    assert_eq!((again.ino, again.perm, again.uid), (a.ino, 0o640, 42));
    assert_eq!(
        (f.calls(Op::List), f.calls(Op::Head)),
        (2, 2),
        "no HEAD after"
    );
    // Rewritten meanwhile by another client: the HEAD still counts only
    // for the object the LIST saw (same ETag here, new metadata).
    m.insert("f", b"abcd", s3fs_meta(0o100600, 7, 1_000_000_000));
    let b = fs.lookup(ROOT_INO, name("f")).await.unwrap();
    assert_eq!((b.size, b.perm, b.uid), (4, 0o600, 7));
    // A name never seen: the LIST alone.
    assert_eq!(
        fs.lookup(ROOT_INO, name("g")).await.err(),
        Some(FsError::NotFound)
    );
    assert_eq!(
        (f.calls(Op::List), f.calls(Op::Head)),
        (4, 3),
        "g: one LIST"
    );
}

/// readdirplus waits for its entries' metadata, but the HEAD may fail, or
/// a re-listing may find the object rewritten by another client and make
/// its metadata unknown again right after the wait. Such an entry went to
/// the kernel with the mount's defaults, which with `uid=` gave another
/// user's 0600 file to whoever the option names (the kernel keeps
/// attributes even with a zero timeout): chmod through O_PATH, then read.
/// Now a reply ends before such an entry, and when it is the first, it
/// goes with attributes that grant nothing.
#[tokio::test]
async fn readdirplus_never_hands_out_the_mounts_defaults_for_unread_metadata() {
    let m = Arc::new(MemStore::unversioned());
    let meta = || s3fs_meta(0o100600, 42, 1_000_000_000);
    for i in 0..300 {
        m.insert(&format!("d/f{i:03}"), b"x", meta());
    }
    let (f, fs, _dir) = faulty_fs_with(m.clone(), |c| {
        c.metadata_ttl = LONG_TTL;
        defaults_to_uid_1001(c);
    });
    let d = fs.lookup(ROOT_INO, name("d")).await.unwrap();
    let check = |batch: &[(u64, bucketfs::fs::DirEntry, bucketfs::fs::Attr, bool, bool)]| {
        let mut placeholders = 0;
        for (_, e, a, _, own) in batch {
            if e.name == "." || e.name == ".." {
                continue;
            }
            if *own {
                assert_eq!((a.perm, a.uid, a.gid), (0o600, 42, 42), "{}", e.name);
            } else {
                assert_eq!((a.perm, a.uid, a.gid), (0, 0, 0), "{} grants", e.name);
                placeholders += 1;
            }
        }
        placeholders
    };
    // 1. Every HEAD fails: a reply holds one entry, granting nothing.
    f.fail(
        Op::Head,
        1_000_000,
        StoreError::Transient("503 SlowDown".into()),
    );
    let fh = fs.opendir(d.ino).await.unwrap();
    let (mut offset, mut replies, mut sent) = (0, 0, 0);
    while replies < 20 {
        let batch = fs
            .readdirplus(d.ino, fh, DirAsk::at(offset))
            .await
            .unwrap()
            .entries;
        let Some(last) = batch.last() else { break };
        replies += 1;
        sent += batch.len();
        offset = last.0;
        let p = check(&batch);
        assert!(p <= 1 && batch.len() <= 2, "{} entries", batch.len());
    }
    assert_eq!(sent, 2 + 19, ". and .. then one entry a reply");
    // 2. HEADs work again: the rest comes with its own metadata.
    f.clear(Op::Head);
    let mut own = 0;
    loop {
        let batch = fs
            .readdirplus(d.ino, fh, DirAsk::at(offset))
            .await
            .unwrap()
            .entries;
        let Some(last) = batch.last() else { break };
        offset = last.0;
        assert_eq!(check(&batch), 0);
        own += batch.len();
    }
    assert_eq!(own, 300 - 19, "the rest, each with its own metadata");
    fs.releasedir(fh);
    // 3. Another client rewrites every object; a second listing (the
    //    first one's time is up) finds them changed while HEADs fail, as
    //    the first handle is read.
    let fh = fs.opendir(d.ino).await.unwrap();
    let first = fs
        .readdirplus(d.ino, fh, DirAsk::at(0))
        .await
        .unwrap()
        .entries;
    assert_eq!(check(&first), 0);
    for i in 0..300 {
        m.insert(&format!("d/f{i:03}"), b"rewritten", meta());
    }
    f.fail(
        Op::Head,
        1_000_000,
        StoreError::Transient("503 SlowDown".into()),
    );
    fs.listing_expires_in("d", std::time::Duration::ZERO);
    let again = fs.opendir(d.ino).await.unwrap();
    // The first handle read again (rewinddir).
    assert_eq!(first.len(), 302, "all known: one reply");
    let (mut offset, mut placeholders) = (0, 0);
    for _ in 0..20 {
        let batch = fs
            .readdirplus(d.ino, fh, DirAsk::at(offset))
            .await
            .unwrap()
            .entries;
        let Some(last) = batch.last() else { break };
        offset = last.0;
        placeholders += check(&batch);
    }
    assert!(placeholders > 0, "the re-listing made the metadata unknown");
    f.clear(Op::Head);
    let a = fs.lookup(d.ino, name("f299")).await.unwrap();
    assert_eq!((a.perm, a.uid, a.size), (0o600, 42, 9), "its new metadata");
    fs.releasedir(again);
    fs.releasedir(fh);
}

/// Lets the background tasks of this (current-thread) runtime run: a
/// listing's metadata pass has every chance to go further meanwhile.
async fn yield_to_background() {
    for _ in 0..200 {
        tokio::task::yield_now().await;
    }
}

/// Lets background tasks run until `done` (at most 10,000 turns):
/// whether it came.
async fn turns_until(done: impl Fn() -> bool) -> bool {
    for _ in 0..10_000 {
        if done() {
            return true;
        }
        tokio::task::yield_now().await;
    }
    done()
}

/// `n` objects `dir/f00000`... of one byte, each with `meta()`.
fn fill(s: &MemStore, dir: &str, n: usize, meta: impl Fn() -> Metadata) {
    for i in 0..n {
        s.insert(&format!("{dir}/f{i:05}"), b"x", meta());
    }
}

/// The names of a directory handle's listing in the order its reader
/// gets them, as `ls -f` reads after its first call (plain readdir, which
/// reads no metadata), without `.` and `..`.
fn listing_order(fs: &Fs, fh: u64) -> Vec<String> {
    let (mut offset, mut names) = (0, Vec::new());
    loop {
        let page = fs
            .readdir(fh, DirAsk::at(offset))
            .unwrap()
            .expect("current")
            .entries;
        let Some(last) = page.last() else {
            return names;
        };
        offset = last.0;
        names.extend(
            page.into_iter()
                .map(|(_, e)| e.name)
                .filter(|n| n != "." && n != ".."),
        );
    }
}

/// A reply made of small calls, as the FUSE layer fills one (`DirAsk`):
/// each call hands out at most what it is asked for, the next goes on
/// past the last, and the whole pass gives every name once, as one
/// unbounded call per reply does. (Calls of thousands of entries per
/// reply, of which the kernel takes a few dozen, made a cold `ls -l` of
/// 10,000 entries copy and look up about 1.6 million.)
#[tokio::test]
async fn a_reply_filled_by_small_calls_gives_every_name_once() {
    let s = Arc::new(MemStore::unversioned());
    fill(&s, "d", 300, || s3fs_meta(0o100600, 42, 1_000_000_000));
    let (fs, _d) = fs_with(s.clone(), |c| c.metadata_ttl = LONG_TTL);
    let d = fs.lookup(ROOT_INO, name("d")).await.unwrap();
    let fh = fs.opendir(d.ino).await.unwrap();
    let whole = listing_order(&fs, fh);
    assert_eq!(whole.len(), 300);
    // Plain readdir: replies of 5 calls of 7 entries at most.
    let (mut names, mut offset, mut calls) = (Vec::new(), 0, 0);
    'pass: loop {
        let mut ask = DirAsk::first(offset, 7);
        let mut sent = 0;
        for _ in 0..5 {
            calls += 1;
            let page = fs.readdir(fh, ask).unwrap().expect("current");
            assert!(page.entries.len() <= 7, "{} entries", page.entries.len());
            if page.entries.is_empty() && sent == 0 {
                break 'pass;
            }
            sent += page.entries.len();
            if let Some(&(p, _)) = page.entries.last() {
                offset = p;
            }
            names.extend(page.entries.into_iter().map(|(_, e)| e.name));
            match page.more {
                Some(next) => {
                    assert_eq!(next, offset, "goes on past the last entry sent");
                    ask = ask.next(next, sent);
                }
                None => break,
            }
        }
    }
    names.retain(|n| n != "." && n != "..");
    assert_eq!(names, whole);
    assert!(calls >= 300 / 7, "{calls} calls");
    // readdirplus: the same names, each with its own attributes.
    let fh = fs.opendir(d.ino).await.unwrap();
    let (mut plus, mut offset) = (Vec::new(), 0);
    'pass: loop {
        let mut ask = DirAsk::first(offset, 7);
        let mut sent = 0;
        for _ in 0..5 {
            let page = fs.readdirplus(d.ino, fh, ask).await.unwrap();
            assert!(page.entries.len() <= 7, "{} entries", page.entries.len());
            if page.entries.is_empty() && sent == 0 {
                break 'pass;
            }
            sent += page.entries.len();
            for (p, e, a, _, own) in page.entries {
                offset = p;
                if e.name != "." && e.name != ".." {
                    assert!(own && a.perm == 0o600 && a.uid == 42, "{}: {a:?}", e.name);
                    plus.push(e.name);
                }
            }
            match page.more {
                Some(next) => ask = ask.next(next, sent),
                None => break,
            }
        }
    }
    assert_eq!(plus, whole);
}

/// How many HEADs a cold listing of `names` (in its reader's order) costs
/// when its metadata pass may read the first `upto` of them: those, and
/// the first window of objects in key order (`f00000` on), whose HEADs
/// start while the next LIST pages are read.
fn heads_of_listing(names: &[String], upto: usize) -> u64 {
    let ahead = bucketfs::fs::METADATA_AHEAD;
    let early = |n: &String| n.as_str() < format!("f{ahead:05}").as_str();
    (names.iter().filter(|n| early(n)).count() + names[..upto].iter().filter(|n| !early(n)).count())
        as u64
}

/// The same from position `offset` on.
fn readdir_from(fs: &Fs, fh: u64, mut offset: u64) -> u64 {
    let mut n = 0;
    loop {
        let page = fs
            .readdir(fh, DirAsk::at(offset))
            .unwrap()
            .expect("current")
            .entries;
        let Some(last) = page.last() else {
            return n;
        };
        offset = last.0;
        n += page.len() as u64;
    }
}

/// The metadata of a listing is read ahead of its reader, not of the
/// listing: `ls -f` of a large directory costs its LISTs and one window of
/// HEADs (it was a HEAD per entry, and every object's metadata in memory).
/// readdirplus moves the window on, and a closed handle stops it.
#[tokio::test]
async fn a_listings_metadata_is_read_only_ahead_of_its_reader() {
    const N: usize = 5000;
    let s = Arc::new(MemStore::unversioned());
    fill(&s, "d", N, || s3fs_meta(0o100600, 42, 1_000_000_000));
    fill(&s, "e", N, Metadata::new);
    fill(&s, "g", N, || s3fs_meta(0o100640, 7, 1_000_000_000));
    let (fs, _d) = fs_with(s.clone(), |c| c.metadata_ttl = LONG_TTL);
    let heads = || s.counters().get(Op::Head);
    let ahead = bucketfs::fs::METADATA_AHEAD as u64;
    let d = fs.lookup(ROOT_INO, name("d")).await.unwrap();
    let e = fs.lookup(ROOT_INO, name("e")).await.unwrap();
    let h0 = heads();
    let fh = fs.opendir(d.ino).await.unwrap();
    let order = listing_order(&fs, fh);
    assert_eq!(order.len(), N, "every entry");
    yield_to_background().await;
    let window = heads_of_listing(&order, ahead as usize);
    assert!(
        window < 2 * ahead,
        "{window}: the early HEADs are in it too"
    );
    assert_eq!(heads() - h0, window, "one window of HEADs for readdir");
    // readdirplus to the end: each entry's own metadata, one HEAD each.
    let (mut offset, mut own) = (0, 0);
    loop {
        let batch = fs
            .readdirplus(d.ino, fh, DirAsk::at(offset))
            .await
            .unwrap()
            .entries;
        let Some(last) = batch.last() else { break };
        offset = last.0;
        own += batch
            .iter()
            .filter(|b| b.4 && b.1.name != "." && b.1.name != "..")
            .count();
    }
    assert_eq!(own, N, "every entry handed out with its own metadata");
    assert_eq!(heads() - h0, N as u64, "one HEAD per entry");
    fs.releasedir(fh);
    // A handle closed before its reader got far: the pass stops.
    let h1 = heads();
    let fh = fs.opendir(e.ino).await.unwrap();
    fs.readdirplus(e.ino, fh, DirAsk::at(0)).await.unwrap();
    fs.releasedir(fh);
    yield_to_background().await;
    let took = heads() - h1;
    assert!(took <= 3 * ahead, "{took} HEADs after the handle closed");
    // `ls -l` reads every name, then stats each: a stat of an entry the
    // pass has not read moves it a window on.
    let g = fs.lookup(ROOT_INO, name("g")).await.unwrap();
    let h2 = heads();
    let fh = fs.opendir(g.ino).await.unwrap();
    yield_to_background().await;
    let order = listing_order(&fs, fh);
    let window = ahead as usize;
    assert_eq!(
        heads() - h2,
        heads_of_listing(&order, window),
        "the first window"
    );
    // The first entry past it in the listing not read early.
    let past = order[window..]
        .iter()
        .find(|n| heads_of_listing(std::slice::from_ref(n), 0) == 0)
        .expect("5,000 entries")
        .clone();
    let a = fs.lookup(g.ino, name(&past)).await.unwrap();
    assert_eq!((a.perm, a.uid), (0o640, 7), "its own metadata");
    yield_to_background().await;
    assert_eq!(
        heads() - h2,
        heads_of_listing(&order, 2 * window),
        "a stat past the window"
    );
    for i in 0..N {
        let a = fs.lookup(g.ino, name(&format!("f{i:05}"))).await.unwrap();
        assert_eq!((a.perm, a.uid), (0o640, 7), "f{i:05}");
    }
    yield_to_background().await;
    assert_eq!(heads() - h2, N as u64, "one HEAD per entry");
    fs.releasedir(fh);
}

/// Each `ls -f` of a directory read a window of metadata further than the
/// one before (the session-9 attack: 1,274 HEADs, then 2,682, then every
/// entry): the pass counted only the entries it reads, its reader every
/// entry; and the kernel serves the first call of a plain `ls` by
/// readdirplus, whose reply holds every entry already known, so the pace
/// moved a window past all of them. The pace now counts listing positions
/// on both sides, from where the reader asks: a listing whose first
/// window is known reads no metadata until its reader asks beyond it.
#[tokio::test]
async fn listing_again_reads_no_metadata_ahead_of_what_its_reader_reached() {
    const N: usize = 4000;
    let s = Arc::new(MemStore::unversioned());
    fill(&s, "d", N, || s3fs_meta(0o100600, 42, 1_000_000_000));
    let (fs, _d) = fs_with(s.clone(), |c| c.metadata_ttl = LONG_TTL);
    let heads = || s.counters().get(Op::Head);
    let ahead = bucketfs::fs::METADATA_AHEAD as u64;
    let d = fs.lookup(ROOT_INO, name("d")).await.unwrap();
    // `ls -f`, three times, as the kernel reads it: readdirplus for the
    // first call, plain readdir from where its reply ended.
    let mut took = Vec::new();
    for _ in 0..3 {
        let h = heads();
        let fh = fs.opendir(d.ino).await.unwrap();
        let first = fs
            .readdirplus(d.ino, fh, DirAsk::at(0))
            .await
            .unwrap()
            .entries;
        let rest = readdir_from(&fs, fh, first.last().unwrap().0);
        assert_eq!(
            first.len() as u64 + rest,
            N as u64 + 2,
            "every entry, . and .."
        );
        yield_to_background().await;
        fs.releasedir(fh);
        took.push(heads() - h);
    }
    let h = heads();
    let fh = fs.opendir(d.ino).await.unwrap();
    let order = listing_order(&fs, fh);
    fs.releasedir(fh);
    assert_eq!(heads(), h, "plain readdir reads no metadata");
    let window = ahead as usize;
    let known = heads_of_listing(&order, window);
    assert_eq!(took, [known, 0, 0], "HEADs of each listing");
    // A reader that asks from where the known entries end (`ls -l`) moves
    // it a window on. The known entries: the first window, and those read
    // early right after it.
    let run = order[window..]
        .iter()
        .take_while(|n| heads_of_listing(std::slice::from_ref(n), 0) == 1)
        .count();
    let fh = fs.opendir(d.ino).await.unwrap();
    let batch = fs
        .readdirplus(d.ino, fh, DirAsk::at(0))
        .await
        .unwrap()
        .entries;
    let reached = batch.last().unwrap().0;
    assert_eq!(
        batch.len(),
        window + run + 2,
        "known entries, after . and .."
    );
    let next = fs
        .readdirplus(d.ino, fh, DirAsk::at(reached))
        .await
        .unwrap()
        .entries;
    assert!(
        next.iter().all(|e| e.4),
        "handed out with their own metadata"
    );
    yield_to_background().await;
    assert_eq!(heads() - h, ahead, "one window past the reader");
    fs.releasedir(fh);
}

/// `ls -l` needs every object's metadata, and a cold listing of a large
/// directory is several LIST pages in a row: the objects of its first
/// window (in key order) have their HEADs run while the next pages are
/// listed (they waited for the last page), and the metadata pass takes
/// them over: still one HEAD per entry.
#[tokio::test]
async fn a_first_window_of_heads_runs_beside_the_next_list_pages() {
    const N: usize = 2500;
    let m = Arc::new(MemStore::unversioned());
    fill(&m, "d", N, || s3fs_meta(0o100640, 7, 1_000_000_000));
    let (f, fs, _dir) = faulty_fs_with(m.clone(), |c| c.metadata_ttl = LONG_TTL);
    let d = fs.lookup(ROOT_INO, name("d")).await.unwrap();
    let (lists, heads) = (f.calls(Op::List), f.calls(Op::Head));
    let during = async { f.calls(Op::Head) - heads };
    let (fh, early) = while_listing(&f, &fs, d.ino, during).await;
    assert_eq!(early, 1000, "the first page's objects, all in the window");
    let log = f.log();
    let second_list = log
        .iter()
        .filter(|(op, _)| *op == Op::List)
        .nth(lists as usize + 1);
    let early_keys: Vec<&String> = log
        .iter()
        .skip_while(|e| Some(*e) != second_list)
        .filter(|(op, _)| *op == Op::Head)
        .map(|(_, k)| k)
        .take(1000)
        .collect();
    assert!(
        early_keys.iter().all(|k| k.as_str() < "d/f01000"),
        "the first page's objects"
    );
    // Every entry stat'ed: the pass took the early HEADs over.
    let order = listing_order(&fs, fh);
    assert_eq!(order.len(), N, "every entry");
    for n in &order {
        let a = fs.lookup(d.ino, name(n)).await.unwrap();
        assert_eq!((a.perm, a.uid), (0o640, 7), "{n}");
    }
    yield_to_background().await;
    assert_eq!(f.calls(Op::Head) - heads, N as u64, "one HEAD per entry");
    fs.releasedir(fh);
}

/// Lists directory `dir` cold and runs `during` while the listing's second
/// LIST page is held, once the early HEADs of its first page's objects are
/// answered: the directory handle, and what `during` gave.
async fn while_listing<T>(
    f: &bucketfs::store::faulty::Faulty<MemStore>,
    fs: &Fs,
    dir: u64,
    during: impl std::future::Future<Output = T>,
) -> (u64, T) {
    let (lists, heads) = (f.calls(Op::List), f.calls(Op::Head));
    f.hold(Op::List, 1);
    let run = async {
        // The first page goes; the second waits, once it is asked for.
        f.wait_held(Op::List).await.unwrap();
        f.release(Op::List);
        f.hold(Op::List, 1);
        let second = || f.calls(Op::List) == lists + 2 && f.held(Op::List) == 1;
        assert!(turns_until(second).await, "the second page asked for");
        let first_page = || f.calls(Op::Head) - heads >= 1000;
        assert!(turns_until(first_page).await, "the early HEADs answered");
        let r = during.await;
        f.release(Op::List);
        r
    };
    let (fh, r) = tokio::join!(fs.opendir(dir), run);
    yield_to_background().await;
    (fh.unwrap(), r)
}

/// This mount rewrites `dir/f00000` ("new content") and makes
/// `dir/f00001` mode 0600: each file's inode, name and (mode, size).
async fn rewrite_and_chmod(fs: &Fs, dir: u64) -> Vec<(u64, &'static str, (u16, u64))> {
    let a = fs.lookup(dir, name("f00000")).await.unwrap();
    let fh = fs
        .open(a.ino, libc::O_WRONLY | libc::O_TRUNC)
        .await
        .unwrap();
    fs.write(fh, 0, b"new content").await.unwrap();
    fs.release(fh).await.unwrap();
    let b = fs.lookup(dir, name("f00001")).await.unwrap();
    let to_0600 = SetAttr {
        mode: Some(0o600),
        ..SetAttr::default()
    };
    fs.setattr(b.ino, to_0600).await.unwrap();
    vec![
        (a.ino, "f00000", (0o644, 11)),
        (b.ino, "f00001", (0o600, 1)),
    ]
}

/// An early HEAD asked before this mount changed the object, or before
/// it read another client's change, is never its answer. The attack
/// sessions' repros: a cold listing's first page is read and a file's
/// early HEAD answered; then this mount's own write (or chmod) lands, or
/// a lookup reads another client's new object (mode 0600); then the rest
/// of the listing, whose first page still names the old object: the
/// early (old) answer was stored over the newer one, and the file read as
/// its old size or mode (0644: uid 1001 read the new bytes) for a while.
#[tokio::test]
async fn an_early_head_from_before_a_newer_read_or_change_is_not_its_answer() {
    const N: usize = 2500;
    let m = Arc::new(MemStore::unversioned());
    for d in ["a", "b", "c"] {
        fill(&m, d, N, || s3fs_meta(0o100644, 0, 1_000_000_000));
    }
    let (f, fs, _dir) = faulty_fs_with(m.clone(), |c| c.metadata_ttl = LONG_TTL);
    let dir = |n: &'static str| {
        let fs = &fs;
        async move { fs.lookup(ROOT_INO, name(n)).await.unwrap().ino }
    };
    let (a, b, c) = (dir("a").await, dir("b").await, dir("c").await);
    // a: the files unknown before the listing (its early HEADs find no
    // node there), this mount's own changes during it.
    let (ha, in_a) = while_listing(&f, &fs, a, rewrite_and_chmod(&fs, a)).await;
    // b: the files known before (their metadata expired, so read early
    // again, for these nodes), the same changes.
    for n in ["f00000", "f00001"] {
        fs.lookup(b, name(n)).await.unwrap();
    }
    fs.expire_below("b");
    let (hb, in_b) = while_listing(&f, &fs, b, rewrite_and_chmod(&fs, b)).await;
    // c: known before; another client replaces it, this mount reads that.
    fs.lookup(c, name("f00000")).await.unwrap();
    fs.expire_below("c");
    let replaced = async {
        m.insert("c/f00000", b"new secret!", s3fs_meta(0o100600, 0, 1));
        let got = fs.lookup(c, name("f00000")).await.unwrap();
        assert_eq!((got.perm, got.size), (0o600, 11), "the other client's");
        vec![(got.ino, "f00000", (0o600, 11))]
    };
    let (hc, in_c) = while_listing(&f, &fs, c, replaced).await;
    for (d, dir, changed) in [("a", a, in_a), ("b", b, in_b), ("c", c, in_c)] {
        for (ino, n, want) in changed {
            let key = format!("{d}/{n}");
            let size = m.object(&key).expect("in the bucket").len() as u64;
            let meta = m.metadata(&key).expect("in the bucket");
            let mode = meta.get("mode").map(|m| m.parse::<u32>().unwrap() & 0o7777);
            let in_bucket = (Some(u32::from(want.0)), want.1);
            assert_eq!((mode, size), in_bucket, "{key} in the bucket");
            let got = fs.getattr(ino).await.unwrap();
            assert_eq!((got.perm, got.size), want, "{key}");
            let got = fs.lookup(dir, name(n)).await.unwrap();
            assert_eq!((got.perm, got.size), want, "{key} looked up again");
        }
    }
    for fh in [ha, hb, hc] {
        fs.releasedir(fh);
    }
}

/// `ls -l` reads the listing by readdirplus and stats every entry: when
/// the replies carry each entry's own attributes the kernel keeps them and
/// asks nothing more, so a reply holds only entries whose metadata is
/// read, and never ends the listing early. HEADs take a while here, as
/// over a network, so the metadata read ahead is behind the listing.
#[tokio::test]
async fn readdirplus_replies_hold_only_entries_with_their_own_metadata_and_list_all() {
    let m = Arc::new(MemStore::unversioned());
    for i in 0..700 {
        m.insert(
            &format!("d/f{i:03}"),
            b"x",
            s3fs_meta(0o100600, 42, 1_000_000_000),
        );
    }
    let (f, fs, _dir) = faulty_fs_with(m.clone(), |c| c.metadata_ttl = LONG_TTL);
    f.latency(Op::Head, std::time::Duration::from_millis(3));
    let d = fs.lookup(ROOT_INO, name("d")).await.unwrap();
    let fh = fs.opendir(d.ino).await.unwrap();
    let (mut offset, mut seen, mut replies) = (0, Vec::new(), 0);
    loop {
        let batch = fs
            .readdirplus(d.ino, fh, DirAsk::at(offset))
            .await
            .unwrap()
            .entries;
        let Some(last) = batch.last() else { break };
        replies += 1;
        assert!(replies <= 700, "the listing ends");
        offset = last.0;
        for (_, e, a, _, own) in &batch {
            if e.name == "." || e.name == ".." {
                continue;
            }
            assert!(own, "{} handed out before its metadata was read", e.name);
            assert_eq!((a.perm, a.uid), (0o600, 42), "{}", e.name);
            seen.push(e.name.clone());
        }
    }
    let want: Vec<String> = (0..700).map(|i| format!("f{i:03}")).collect();
    seen.sort();
    assert_eq!(seen, want, "every entry once");
}

/// An open that lost the race with an unlink or a rename-over (the kernel
/// looked the name up, another process unlinked or replaced it, then the
/// OPEN came) is ESTALE, which makes the kernel look the name up again (and
/// an O_CREAT open create it anew); it was EISDIR. The kernel does that
/// once: an `O_TRUNC` open (`echo x > f`) that lost twice would fail. It is
/// served as if it came first: it writes to the file that lost its name,
/// which is never uploaded and leaves nothing staged.
#[tokio::test]
async fn opening_a_file_unlinked_since_its_lookup_is_estale_unless_it_truncates() {
    let s = Arc::new(MemStore::unversioned());
    let (fs, d) = fs_with(s.clone(), |_| {});
    for (replace, f, g) in [(false, "f1", "g1"), (true, "f2", "g2")] {
        s.insert(f, b"data", Metadata::new());
        s.insert(g, b"other", Metadata::new());
        let a = fs.lookup(ROOT_INO, name(f)).await.unwrap();
        if replace {
            fs.rename(ROOT_INO, name(g), ROOT_INO, name(f), false)
                .await
                .unwrap();
        } else {
            fs.unlink(ROOT_INO, name(f)).await.unwrap();
        }
        for flags in [
            libc::O_RDONLY,
            libc::O_WRONLY,
            libc::O_RDWR | libc::O_APPEND,
        ] {
            assert_eq!(
                fs.open(a.ino, flags).await,
                Err(FsError::Io(libc::ESTALE)),
                "{flags:o}, replaced: {replace}"
            );
        }
        let fh = fs.open(a.ino, libc::O_RDWR | libc::O_TRUNC).await.unwrap();
        assert_eq!(fs.getattr(a.ino).await.unwrap().size, 0, "truncated");
        assert_eq!(fs.write(fh, 0, b"unnamed").await, Ok(7));
        assert_eq!(fs.read(fh, 0, 100).await.unwrap().as_ref(), b"unnamed");
        fs.flush(fh).await.unwrap();
        fs.release(fh).await.unwrap();
        let want: Option<&[u8]> = if replace { Some(b"other") } else { None };
        assert_eq!(s.object(f).as_deref(), want, "replaced: {replace}");
        assert_eq!(s.object(g).is_none(), replace, "{g} moved");
        let left = common::files_below(d.path());
        assert!(left.is_empty(), "left staged: {left:?}");
    }
}

#[tokio::test]
async fn a_new_small_file_costs_one_put() {
    let s = Arc::new(MemStore::versioned());
    let (fs, _d) = fs_with(s.clone(), |_| {});
    let n = requests(&s);
    let (a, fh) = fs
        .create(ROOT_INO, name("new"), USER, libc::O_WRONLY)
        .await
        .unwrap();
    assert_eq!(
        fs.getattr(a.ino).await.unwrap().size,
        0,
        "exists before close"
    );
    fs.write(fh, 0, b"0123456789").await.unwrap();
    fs.flush(fh).await.unwrap();
    fs.release(fh).await.unwrap();
    assert_eq!(requests(&s) - n, 1);
    assert_eq!(s.counters().get(Op::Put), 1);
    assert_eq!(s.object("new").unwrap().as_ref(), b"0123456789");
    let meta = s.metadata("new").unwrap();
    assert_eq!(meta.get("mode").map(String::as_str), Some("33188")); // 0100644
    assert_eq!(meta.get("uid").map(String::as_str), Some("1000"));
}

#[tokio::test]
async fn close_returns_the_upload_error_and_a_retry_lands_the_data() {
    let s = Arc::new(MemStore::versioned());
    let (fs, _d) = fs_with(s.clone(), |_| {});
    let (_, fh) = fs
        .create(ROOT_INO, name("f"), USER, libc::O_WRONLY)
        .await
        .unwrap();
    fs.write(fh, 0, b"precious").await.unwrap();
    s.fail_next(Op::Put, 1, StoreError::Transient("503 SlowDown".into()));
    let err = fs.flush(fh).await.unwrap_err();
    assert_eq!(bucketfs::error::errno(&err), libc::EIO);
    assert_eq!(s.object("f"), None, "nothing half-written");
    fs.flush(fh).await.unwrap();
    fs.release(fh).await.unwrap();
    assert_eq!(s.object("f").unwrap().as_ref(), b"precious");
}

#[tokio::test]
async fn access_denied_is_eacces_and_missing_is_enoent() {
    let s = Arc::new(MemStore::versioned());
    let (fs, _d) = fs_with(s.clone(), |_| {});
    assert_eq!(
        fs.lookup(ROOT_INO, name("nope")).await.unwrap_err(),
        FsError::NotFound
    );
    s.fail_next(Op::List, 1, StoreError::AccessDenied("403".into()));
    let e = fs.lookup(ROOT_INO, name("secret")).await.unwrap_err();
    assert_eq!(bucketfs::error::errno(&e), libc::EACCES);
    s.insert("secret", b"s", Metadata::new());
    s.fail_next(Op::Head, 1, StoreError::AccessDenied("403".into()));
    let e = fs.lookup(ROOT_INO, name("secret")).await.unwrap_err();
    assert_eq!(bucketfs::error::errno(&e), libc::EACCES, "HEAD refused");
}

/// A small deterministic PRNG for the model test.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Random writes, truncates, flushes and reopens on one file, across the
/// multipart threshold, compared byte for byte with a plain Vec model and
/// with what the bucket holds after every flush.
#[tokio::test]
async fn any_write_pattern_matches_a_plain_model() {
    write_patterns_match_a_plain_model(false).await;
}

/// The same with each write first offered to `write_now`, as the FUSE
/// adapter does (it answers writes that need no request on its own
/// thread, the rest go to `write`).
#[tokio::test]
async fn any_write_pattern_matches_a_plain_model_through_the_inline_path() {
    write_patterns_match_a_plain_model(true).await;
}

async fn write_patterns_match_a_plain_model(inline: bool) {
    const MIB: u64 = 1024 * 1024;
    let mut answered_inline = 0;
    for seed in 1..=6u64 {
        let s = Arc::new(MemStore::versioned());
        let (fs, _d) = fs_with(s.clone(), |c| {
            c.upload = UploadOptions {
                part_size_bytes: 5 * MIB,
                concurrency: 3,
            };
            c.block_size_bytes = 256 * 1024;
        });
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut model: Vec<u8> = Vec::new();
        let (a, mut fh) = fs
            .create(ROOT_INO, name("m"), USER, libc::O_RDWR)
            .await
            .unwrap();
        for step in 0..60 {
            match rng.below(10) {
                0..=4 => {
                    let max = (model.len() as u64 + MIB).min(13 * MIB);
                    let off = rng.below(max + 1);
                    let big = rng.below(4) == 0;
                    let len = 1 + rng.below(if big { 3 * MIB } else { 5000 });
                    let byte = (rng.next() & 0xff) as u8;
                    let data = vec![byte; len as usize];
                    match inline.then(|| fs.write_now(fh, off, &data)).flatten() {
                        Some(r) => {
                            answered_inline += 1;
                            assert_eq!(r, Ok(len as u32));
                        }
                        None => {
                            fs.write(fh, off, &data).await.unwrap();
                        }
                    }
                    let end = (off + len) as usize;
                    if model.len() < end {
                        model.resize(end, 0);
                    }
                    model[off as usize..end].copy_from_slice(&data);
                }
                5 => {
                    let size = rng.below(model.len() as u64 + 2 * MIB);
                    let attr = fs
                        .setattr(
                            a.ino,
                            SetAttr {
                                fh: Some(fh),
                                size: Some(size),
                                ..Default::default()
                            },
                        )
                        .await
                        .unwrap();
                    assert_eq!(attr.size, size);
                    model.resize(size as usize, 0);
                }
                6 => {
                    fs.flush(fh).await.unwrap();
                    let got = s.object("m").unwrap();
                    assert!(
                        got.as_ref() == model.as_slice(),
                        "seed {seed} step {step}: bucket differs after flush"
                    );
                }
                7 => {
                    // Close and reopen: the next writes start from the object.
                    fs.flush(fh).await.unwrap();
                    fs.release(fh).await.unwrap();
                    fh = fs.open(a.ino, libc::O_RDWR).await.unwrap();
                }
                _ => {
                    let off = rng.below(model.len() as u64 + 10);
                    let len = 1 + rng.below(300_000) as u32;
                    let got = fs.read(fh, off, len).await.unwrap();
                    let end = (off as usize + len as usize).min(model.len());
                    let want = if (off as usize) < model.len() {
                        &model[off as usize..end]
                    } else {
                        &[][..]
                    };
                    assert!(
                        got.as_ref() == want,
                        "seed {seed} step {step}: read {off}+{len} differs"
                    );
                }
            }
            assert_eq!(fs.getattr(a.ino).await.unwrap().size, model.len() as u64);
        }
        fs.flush(fh).await.unwrap();
        fs.release(fh).await.unwrap();
        assert!(
            s.object("m").unwrap().as_ref() == model.as_slice(),
            "seed {seed}: final object differs"
        );
        assert_eq!(s.open_uploads(), 0);
    }
    if inline {
        assert!(answered_inline > 50, "only {answered_inline} writes inline");
    }
}

#[tokio::test]
async fn a_read_handle_keeps_reading_the_version_it_opened() {
    let s = Arc::new(MemStore::versioned());
    s.insert("f", &[1u8; 300_000], Metadata::new());
    let (fs, _d) = fs_with(s.clone(), |c| c.block_size_bytes = 100_000);
    let a = fs.lookup(ROOT_INO, name("f")).await.unwrap();
    let fh = fs.open(a.ino, libc::O_RDONLY).await.unwrap();
    assert_eq!(fs.read(fh, 0, 10).await.unwrap().as_ref(), &[1u8; 10]);
    s.insert("f", &[2u8; 300_000], Metadata::new());
    assert_eq!(
        fs.read(fh, 250_000, 10).await.unwrap().as_ref(),
        &[1u8; 10],
        "no mix of old and new"
    );
    fs.release(fh).await.unwrap();
}

#[tokio::test]
async fn a_changed_object_is_never_served_from_cached_blocks() {
    let s = Arc::new(MemStore::versioned());
    s.insert("f", b"old old old", Metadata::new());
    let (fs, _d) = fs_with(s.clone(), |c| c.metadata_ttl = std::time::Duration::ZERO);
    let a = fs.lookup(ROOT_INO, name("f")).await.unwrap();
    let fh = fs.open(a.ino, libc::O_RDONLY).await.unwrap();
    assert_eq!(fs.read(fh, 0, 100).await.unwrap().as_ref(), b"old old old");
    fs.release(fh).await.unwrap();
    s.insert("f", b"new!", Metadata::new());
    let fh = fs.open(a.ino, libc::O_RDONLY).await.unwrap();
    assert_eq!(fs.read(fh, 0, 100).await.unwrap().as_ref(), b"new!");
}

#[tokio::test]
async fn second_read_of_an_unchanged_file_makes_no_get() {
    let s = Arc::new(MemStore::versioned());
    s.insert("f", &vec![5u8; 3_000_000], Metadata::new());
    let (fs, _d) = fs_with(s.clone(), |_| {});
    let a = fs.lookup(ROOT_INO, name("f")).await.unwrap();
    for round in 0..2 {
        let fh = fs.open(a.ino, libc::O_RDONLY).await.unwrap();
        let mut off = 0;
        while off < 3_000_000 {
            let d = fs.read(fh, off, 131_072).await.unwrap();
            assert!(d.iter().all(|&b| b == 5));
            off += d.len() as u64;
        }
        fs.release(fh).await.unwrap();
        if round == 0 {
            // Read-ahead may still be landing: wait for it, bounded.
            for _ in 0..100 {
                if fs.block_cache().mem_bytes() >= 3_000_000 {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    }
    assert_eq!(
        s.counters().get(Op::Get),
        3,
        "three 1 MiB blocks, fetched once"
    );
}

/// A 16 MiB object `f` (byte i is i / `div`) in a fresh mount, open for
/// reading: (store, fs, cache dir, bytes, handle).
async fn sixteen_mib_open(div: u32) -> (Arc<MemStore>, Fs, tempfile::TempDir, Vec<u8>, u64) {
    let s = Arc::new(MemStore::unversioned());
    let data: Vec<u8> = (0..16 * 1024 * 1024u32).map(|i| (i / div) as u8).collect();
    s.insert("f", &data, Metadata::new());
    let (fs, d) = fs_with(s.clone(), |_| {});
    let a = fs.lookup(ROOT_INO, name("f")).await.unwrap();
    let fh = fs.open(a.ino, libc::O_RDONLY).await.unwrap();
    (s, fs, d, data, fh)
}

/// Reads all of `data` from handle `fh` in order, `size` bytes a read,
/// checking every byte; with `at_once`, each read is first offered to
/// `read_now` as the FUSE thread does. Returns how many it answered.
async fn read_in_order(fs: &Fs, fh: u64, data: &[u8], size: u32, at_once: bool) -> usize {
    let (mut off, mut answered) = (0u64, 0);
    while off < data.len() as u64 {
        let d = match at_once.then(|| fs.read_now(fh, off, size)).flatten() {
            Some(r) => {
                answered += 1;
                r.unwrap()
            }
            None => fs.read(fh, off, size).await.unwrap(),
        };
        assert!(d.len() == size as usize || off + d.len() as u64 == data.len() as u64);
        assert!(
            d[..] == data[off as usize..off as usize + d.len()],
            "bytes at {off}"
        );
        off += d.len() as u64;
        // Let the read-ahead tasks run (this runtime has one thread).
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
    }
    answered
}

/// A sequential reader's read-ahead asks for runs of 8 blocks in one GET
/// each, as the window first reaches into them, not a GET per block.
#[tokio::test]
async fn sequential_read_ahead_fetches_runs_of_blocks() {
    let (s, fs, _d, data, fh) = sixteen_mib_open(3).await;
    read_in_order(&fs, fh, &data, 128 * 1024, false).await;
    fs.release(fh).await.unwrap();
    let gets = s.counters().get(Op::Get);
    assert!(gets <= 4, "{gets} GETs for 16 blocks read in order");
}

/// The FUSE thread answers a read whose blocks are in memory itself
/// (`read_now`), as most of a sequential read is once read-ahead runs
/// ahead; it never answers one that needs a block fetched, or a file
/// being written, and the read-ahead it starts keeps GETs to whole runs.
#[tokio::test]
async fn reads_of_blocks_in_memory_are_answered_at_once_with_the_same_bytes() {
    let (s, fs, _d, data, fh) = sixteen_mib_open(7).await;
    let ino = fs.lookup(ROOT_INO, name("f")).await.unwrap().ino;
    assert!(fs.read_now(fh, 0, 4096).is_none(), "nothing in memory yet");
    // Reads of an odd size, so that many span two blocks.
    let at_once = read_in_order(&fs, fh, &data, 300_000, true).await;
    assert!(at_once >= 40, "{at_once} of 56 reads answered at once");
    let gets = s.counters().get(Op::Get);
    assert!(gets <= 4, "{gets} GETs for 16 blocks read in order");
    // A file open for writing is read through its write state.
    let w = fs.open(ino, libc::O_WRONLY).await.unwrap();
    fs.write(w, 0, b"changed").await.unwrap();
    assert!(fs.read_now(fh, 0, 7).is_none(), "being written");
    assert_eq!(&fs.read(fh, 0, 7).await.unwrap()[..], b"changed");
    fs.release(w).await.unwrap();
    fs.release(fh).await.unwrap();
}

/// Reads at random offsets fetch 64 KiB each, also across a 64 KiB
/// boundary, not a 1 MiB block plus read-ahead; a second read of the same
/// place is served from memory.
#[tokio::test]
async fn random_reads_download_at_most_64_kib_each() {
    let s = Arc::new(MemStore::unversioned());
    let data: Vec<u8> = (0..16 * 1024 * 1024u32).map(|i| (i / 7) as u8).collect();
    s.insert("f", &data, Metadata::new());
    let (fs, _d) = fs_with(s.clone(), |_| {});
    let a = fs.lookup(ROOT_INO, name("f")).await.unwrap();
    let fh = fs.open(a.ino, libc::O_RDONLY).await.unwrap();
    // 16 KiB, as the kernel asks, some across a 64 KiB boundary; the
    // last one ends at the object's end.
    let offsets = [
        9_000_000u64,
        1_234_567,
        15_000_000,
        4_100_000,
        12_345_678,
        7_000_001,
        65_536 * 9 - 8_192,
        16 * 1024 * 1024 - 16_384,
    ];
    for &off in &offsets {
        let d = fs.read(fh, off, 16_384).await.unwrap();
        assert!(
            d[..] == data[off as usize..off as usize + 16_384],
            "bytes at {off}"
        );
    }
    let (_, received) = s.counters().bytes();
    assert!(
        received <= offsets.len() as u64 * 64 * 1024,
        "{received} bytes downloaded for {} random reads of 16 KiB",
        offsets.len()
    );
    let gets = s.counters().get(Op::Get);
    let d = fs.read(fh, offsets[2], 16_384).await.unwrap();
    assert!(d[..] == data[offsets[2] as usize..offsets[2] as usize + 16_384]);
    assert_eq!(
        s.counters().get(Op::Get),
        gets,
        "a second read of the same place"
    );
    fs.release(fh).await.unwrap();
}

/// `write_now` declines what needs a request or a wait: the first write
/// to an existing file (its old bytes may be read first) and a write that
/// makes a part ready to stream; a new file written in order still streams
/// its parts before close.
#[tokio::test]
async fn the_inline_write_path_leaves_requests_to_write() {
    const MIB: u64 = 1024 * 1024;
    let s = Arc::new(MemStore::unversioned());
    s.insert("old", b"old bytes", Metadata::new());
    let (fs, _d) = fs_with(s.clone(), |c| {
        c.upload = UploadOptions {
            part_size_bytes: 5 * MIB,
            concurrency: 2,
        };
    });
    let a = fs.lookup(ROOT_INO, name("old")).await.unwrap();
    let fh = fs.open(a.ino, libc::O_WRONLY).await.unwrap();
    assert_eq!(
        fs.write_now(fh, 0, b"new"),
        None,
        "first write of an existing file"
    );
    fs.write(fh, 0, b"new").await.unwrap();
    assert_eq!(fs.write_now(fh, 3, b"!"), Some(Ok(1)));
    fs.flush(fh).await.unwrap();
    fs.release(fh).await.unwrap();
    assert_eq!(s.object("old").unwrap().as_ref(), b"new!bytes");

    let (_, fh) = fs
        .create(ROOT_INO, name("big"), USER, libc::O_WRONLY)
        .await
        .unwrap();
    let chunk = vec![7u8; 128 * 1024];
    let mut off = 0;
    while off < 12 * MIB {
        if fs.write_now(fh, off, &chunk).is_none() {
            fs.write(fh, off, &chunk).await.unwrap();
        }
        off += chunk.len() as u64;
    }
    assert!(
        s.counters().get(Op::CreateMultipart) == 1,
        "the parts of a new file written in order stream before close"
    );
    fs.flush(fh).await.unwrap();
    fs.release(fh).await.unwrap();
    assert_eq!(s.object("big").unwrap().len() as u64, 12 * MIB);
    assert_eq!(s.open_uploads(), 0);
}

#[tokio::test]
async fn versions_tree_lists_and_reads_every_version() {
    let s = Arc::new(MemStore::versioned());
    // TTL 0: changes made behind the mount's back show at once.
    let (fs, _d) = fs_with(s.clone(), |c| c.metadata_ttl = std::time::Duration::ZERO);
    for body in ["one", "two!", "three"] {
        let (_, fh) = fs
            .create(ROOT_INO, name("doc"), USER, libc::O_WRONLY | libc::O_TRUNC)
            .await
            .unwrap();
        fs.write(fh, 0, body.as_bytes()).await.unwrap();
        fs.release(fh).await.unwrap();
    }
    s.insert("doc.txt", b"neighbour", Metadata::new());
    s.insert("doc/inner", b"nested", Metadata::new());
    let dir = fs.lookup(ROOT_INO, name("doc")).await.unwrap();
    assert_eq!(
        dir.kind,
        FileKind::Dir,
        "the prefix doc/ makes doc a directory"
    );
    s.delete("doc/inner").await.unwrap();
    let v = fs.lookup(ROOT_INO, name(".versions")).await.unwrap();
    let names: Vec<String> = fs
        .list(v.ino)
        .await
        .unwrap()
        .into_iter()
        .skip(2)
        .map(|e| e.name)
        .collect();
    assert_eq!(names, vec!["doc", "doc.txt"]);
    let of = fs.lookup(v.ino, name("doc")).await.unwrap();
    let entries = fs.list(of.ino).await.unwrap();
    let files: Vec<_> = entries.iter().skip(2).collect();
    assert_eq!(
        files.len(),
        3,
        "doc.txt and doc/inner do not leak in: {files:?}"
    );
    let mut bodies = Vec::new();
    for e in &files {
        let a = fs.lookup(of.ino, name(&e.name)).await.unwrap();
        // USER's file in a directory of uid 0: owner bits only (a
        // directory that kept others out may have stood at this path).
        assert_eq!(a.perm, 0o400);
        let fh = fs.open(a.ino, libc::O_RDONLY).await.unwrap();
        bodies.push(String::from_utf8(fs.read(fh, 0, 100).await.unwrap().to_vec()).unwrap());
        fs.release(fh).await.unwrap();
        assert_eq!(
            fs.open(a.ino, libc::O_WRONLY).await.unwrap_err(),
            FsError::ReadOnly
        );
        assert_eq!(
            fs.setattr(
                a.ino,
                SetAttr {
                    mode: Some(0o600),
                    ..Default::default()
                }
            )
            .await
            .unwrap_err(),
            FsError::ReadOnly
        );
    }
    assert_eq!(bodies, vec!["three", "two!", "one"], "newest first");
    assert_eq!(
        fs.create(of.ino, name("x"), USER, libc::O_WRONLY)
            .await
            .unwrap_err(),
        FsError::ReadOnly
    );
}

#[tokio::test]
async fn appending_to_a_large_object_sends_only_the_new_bytes() {
    const MIB: usize = 1024 * 1024;
    let s = Arc::new(MemStore::versioned());
    let orig: Vec<u8> = (0..40 * MIB).map(|i| (i % 253) as u8).collect();
    s.insert("big", &orig, Metadata::new());
    let (fs, _d) = fs_with(s.clone(), |_| {});
    let a = fs.lookup(ROOT_INO, name("big")).await.unwrap();
    let fh = fs
        .open(a.ino, libc::O_WRONLY | libc::O_APPEND)
        .await
        .unwrap();
    let tail = vec![9u8; MIB];
    fs.write(fh, orig.len() as u64, &tail).await.unwrap();
    let (sent0, recv0) = s.counters().bytes();
    fs.flush(fh).await.unwrap();
    fs.release(fh).await.unwrap();
    let (sent, recv) = s.counters().bytes();
    assert_eq!(sent - sent0, MIB as u64, "only the appended MiB is sent");
    assert_eq!(recv - recv0, 0, "nothing of the old object is downloaded");
    assert!(s.counters().get(Op::UploadPartCopy) >= 1);
    let got = s.object("big").unwrap();
    assert_eq!(got.len(), 41 * MIB);
    assert!(got[..40 * MIB] == orig[..] && got[40 * MIB..] == tail[..]);
}

#[tokio::test]
async fn names_with_newlines_and_control_characters_list_and_read() {
    let s = Arc::new(MemStore::unversioned());
    for k in ["new\nline", "bell\u{7}", "ok", "a//b", "../up", "x/./y"] {
        s.insert(k, k.as_bytes(), Metadata::new());
    }
    let (fs, _d) = fs_with(s.clone(), |_| {});
    let mut names: Vec<String> = fs
        .list(ROOT_INO)
        .await
        .unwrap()
        .into_iter()
        .skip(2)
        .map(|e| e.name)
        .collect();
    names.sort();
    assert_eq!(names, vec!["a", "bell\u{7}", "new\nline", "ok", "x"]);
    let a = fs.lookup(ROOT_INO, name("new\nline")).await.unwrap();
    let fh = fs.open(a.ino, libc::O_RDONLY).await.unwrap();
    assert_eq!(fs.read(fh, 0, 100).await.unwrap().as_ref(), b"new\nline");
    let x = fs.lookup(ROOT_INO, name("x")).await.unwrap();
    assert!(
        fs.list(x.ino).await.unwrap().len() == 2,
        "x/./y is not shown"
    );
    assert_eq!(
        fs.lookup(ROOT_INO, name("..")).await.unwrap_err(),
        FsError::InvalidName
    );
}

// ----------------------------------------------------------------------
// A reference model: random namespace operations, some made behind the
// mount's back, compared with a plain map of path -> contents.

use std::collections::BTreeMap;

/// The plain model: files with their bytes, and explicit directories
/// (markers). A directory also exists while anything lies below it.
#[derive(Default)]
struct Model {
    files: BTreeMap<String, Vec<u8>>,
    dirs: std::collections::BTreeSet<String>,
}

impl Model {
    fn is_dir(&self, p: &str) -> bool {
        p.is_empty()
            || self.dirs.contains(p)
            || self
                .files
                .keys()
                .chain(self.dirs.iter())
                .any(|k| k.starts_with(&format!("{p}/")))
    }
    /// A file of the model picked at random, if there is one.
    fn any_file(&self, rng: &mut Rng) -> Option<String> {
        let n = self.files.len().max(1) as u64;
        self.files.keys().nth(rng.below(n) as usize).cloned()
    }

    fn parent(p: &str) -> &str {
        p.rsplit_once('/').map_or("", |(d, _)| d)
    }
}

async fn resolve(fs: &Fs, path: &str) -> Result<u64, FsError> {
    let mut ino = ROOT_INO;
    if path.is_empty() {
        return Ok(ino);
    }
    for c in path.split('/') {
        ino = fs.lookup(ino, name(c)).await?.ino;
    }
    Ok(ino)
}

async fn walk(fs: &Fs, dir: &str, out: &mut BTreeMap<String, Option<Vec<u8>>>) {
    let ino = resolve(fs, dir).await.unwrap();
    for e in fs.list(ino).await.unwrap().into_iter().skip(2) {
        let p = if dir.is_empty() {
            e.name.clone()
        } else {
            format!("{dir}/{}", e.name)
        };
        if e.kind == FileKind::Dir {
            out.insert(p.clone(), None);
            Box::pin(walk(fs, &p, out)).await;
        } else {
            let fh = fs.open(e.ino, libc::O_RDONLY).await.unwrap();
            let data = fs.read(fh, 0, 1 << 20).await.unwrap().to_vec();
            fs.release(fh).await.unwrap();
            out.insert(p, Some(data));
        }
    }
}

#[tokio::test]
async fn random_namespace_operations_match_a_plain_model() {
    const DIRS: [&str; 4] = ["", "d1", "d2", "d1/s"];
    const NAMES: [&str; 3] = ["a", "b", "c"];
    for seed in 1..=40u64 {
        let s = Arc::new(MemStore::unversioned());
        let (fs, _d) = fs_with(s.clone(), |c| c.metadata_ttl = std::time::Duration::ZERO);
        let mut m = Model::default();
        let mut rng = Rng(seed.wrapping_mul(0xA24B_AED4_963E_E407) | 1);
        let pick = |rng: &mut Rng| {
            let d = DIRS[rng.below(4) as usize];
            let n = NAMES[rng.below(3) as usize];
            if d.is_empty() {
                n.to_string()
            } else {
                format!("{d}/{n}")
            }
        };
        let mut trace: Vec<String> = Vec::new();
        for step in 0..250 {
            let ctx = format!(
                "seed {seed} step {step} after {:?}",
                trace.iter().rev().take(6).collect::<Vec<_>>()
            );
            let op = rng.below(11);
            trace.push(format!("{step}:{op}"));
            match op {
                0 | 1 => {
                    // Create (or overwrite) a file with new contents.
                    let p = pick(&mut rng);
                    let parent = Model::parent(&p).to_string();
                    if !m.is_dir(&parent) || m.is_dir(&p) {
                        continue;
                    }
                    let data: Vec<u8> = (0..rng.below(3000))
                        .map(|i| (i as u8) ^ (step as u8))
                        .collect();
                    let pino = resolve(&fs, &parent).await.unwrap();
                    let leaf = p.rsplit('/').next().unwrap();
                    let (_, fh) = fs
                        .create(pino, name(leaf), USER, libc::O_WRONLY | libc::O_TRUNC)
                        .await
                        .unwrap();
                    fs.write(fh, 0, &data).await.unwrap();
                    fs.flush(fh).await.unwrap();
                    fs.release(fh).await.unwrap();
                    m.files.insert(p, data);
                }
                2 => {
                    // Write into an existing file at an offset.
                    let Some(p) = m.any_file(&mut rng) else {
                        continue;
                    };
                    let off = rng.below(m.files[&p].len() as u64 + 100);
                    let data = vec![(step % 251) as u8 + 1; 1 + rng.below(500) as usize];
                    let ino = resolve(&fs, &p).await.unwrap_or_else(|e| {
                        panic!("{ctx}: {p}: {e:?} {:?} {:?}", m.files.keys(), m.dirs)
                    });
                    let fh = fs.open(ino, libc::O_WRONLY).await.unwrap();
                    fs.write(fh, off, &data).await.unwrap();
                    fs.flush(fh).await.unwrap();
                    fs.release(fh).await.unwrap();
                    let f = m.files.get_mut(&p).unwrap();
                    let end = off as usize + data.len();
                    if f.len() < end {
                        f.resize(end, 0);
                    }
                    f[off as usize..end].copy_from_slice(&data);
                }
                3 => {
                    let Some(p) = m.any_file(&mut rng) else {
                        continue;
                    };
                    let size = rng.below(4000);
                    let ino = resolve(&fs, &p).await.unwrap();
                    fs.setattr(
                        ino,
                        SetAttr {
                            size: Some(size),
                            ..Default::default()
                        },
                    )
                    .await
                    .unwrap();
                    m.files.get_mut(&p).unwrap().resize(size as usize, 0);
                }
                4 => {
                    // Rename a file onto another name (replacing a file).
                    let Some(from) = m.any_file(&mut rng) else {
                        continue;
                    };
                    let to = pick(&mut rng);
                    let (fp, tp) = (
                        Model::parent(&from).to_string(),
                        Model::parent(&to).to_string(),
                    );
                    if !m.is_dir(&tp) || from == to {
                        continue;
                    }
                    let r = fs
                        .rename(
                            resolve(&fs, &fp).await.unwrap(),
                            name(from.rsplit('/').next().unwrap()),
                            resolve(&fs, &tp).await.unwrap(),
                            name(to.rsplit('/').next().unwrap()),
                            false,
                        )
                        .await;
                    if m.is_dir(&to) {
                        assert_eq!(r, Err(FsError::IsDir), "{ctx}");
                        continue;
                    }
                    r.unwrap_or_else(|e| panic!("{ctx}: rename {from} {to}: {e:?}"));
                    let data = m.files.remove(&from).unwrap();
                    m.files.insert(to, data);
                }
                5 => {
                    let p = pick(&mut rng);
                    if !m.is_dir(Model::parent(&p)) {
                        continue;
                    }
                    let pino = resolve(&fs, Model::parent(&p)).await.unwrap();
                    let r = fs.unlink(pino, name(p.rsplit('/').next().unwrap())).await;
                    match m.files.remove(&p) {
                        Some(_) => r.unwrap_or_else(|e| panic!("{ctx}: unlink {p}: {e:?}")),
                        None if m.is_dir(&p) => assert_eq!(r, Err(FsError::IsDir), "{ctx}"),
                        None => assert_eq!(r, Err(FsError::NotFound), "{ctx}"),
                    }
                }
                6 => {
                    let d = DIRS[1 + rng.below(3) as usize];
                    if !m.is_dir(Model::parent(d)) {
                        continue;
                    }
                    let pino = resolve(&fs, Model::parent(d)).await.unwrap();
                    let r = fs
                        .mkdir(pino, name(d.rsplit('/').next().unwrap()), USER)
                        .await;
                    if m.is_dir(d) || m.files.contains_key(d) {
                        assert_eq!(r.map(|_| ()), Err(FsError::Exists), "{ctx}");
                    } else {
                        r.unwrap_or_else(|e| panic!("{ctx}: mkdir {d}: {e:?}"));
                        m.dirs.insert(d.to_string());
                    }
                }
                7 => {
                    let d = DIRS[1 + rng.below(3) as usize];
                    if !m.is_dir(d) {
                        continue;
                    }
                    let pino = resolve(&fs, Model::parent(d)).await.unwrap();
                    let r = fs.rmdir(pino, name(d.rsplit('/').next().unwrap())).await;
                    let below = format!("{d}/");
                    let empty = !m
                        .files
                        .keys()
                        .chain(m.dirs.iter())
                        .any(|k| k.starts_with(&below));
                    if empty {
                        r.unwrap_or_else(|e| panic!("{ctx}: rmdir {d}: {e:?}"));
                        m.dirs.remove(d);
                    } else {
                        assert_eq!(r, Err(FsError::NotEmpty), "{ctx}");
                    }
                }
                8 => {
                    // Another client writes or deletes a file behind the mount's back.
                    let p = pick(&mut rng);
                    if m.is_dir(&p) {
                        continue;
                    }
                    if rng.below(2) == 0 {
                        let data = vec![b'x'; rng.below(100) as usize];
                        s.insert(&p, &data, Metadata::new());
                        m.files.insert(p, data);
                    } else if m.files.remove(&p).is_some() {
                        s.delete(&p).await.unwrap();
                    }
                }
                _ => {
                    let Some(p) = m.any_file(&mut rng) else {
                        continue;
                    };
                    let ino = resolve(&fs, &p)
                        .await
                        .unwrap_or_else(|e| panic!("{ctx}: lookup {p}: {e:?}"));
                    let fh = fs.open(ino, libc::O_RDONLY).await.unwrap();
                    let got = fs.read(fh, 0, 1 << 20).await.unwrap();
                    fs.release(fh).await.unwrap();
                    assert!(got.as_ref() == m.files[&p].as_slice(), "{ctx}: read {p}");
                }
            }
        }
        // The whole tree, through the filesystem and in the bucket.
        let mut seen = BTreeMap::new();
        walk(&fs, "", &mut seen).await;
        let mut want: BTreeMap<String, Option<Vec<u8>>> = m
            .files
            .iter()
            .map(|(k, v)| (k.clone(), Some(v.clone())))
            .collect();
        for d in ["d1", "d2", "d1/s"] {
            if m.is_dir(d) {
                want.insert(d.to_string(), None);
            }
        }
        assert_eq!(
            seen.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>(),
            "seed {seed}"
        );
        assert!(seen == want, "seed {seed}: contents differ");
        for (k, v) in &m.files {
            assert_eq!(
                s.object(k).as_deref(),
                Some(v.as_slice()),
                "seed {seed}: bucket {k}"
            );
        }
    }
}

#[tokio::test]
async fn a_forgotten_entry_of_a_fresh_listing_is_found_again() {
    let s = Arc::new(MemStore::unversioned());
    s.insert("d/x", b"1", Metadata::new());
    let (fs, _d) = fs_with(s.clone(), |_| {});
    let d = fs.lookup(ROOT_INO, name("d")).await.unwrap();
    fs.list(d.ino).await.unwrap();
    let x = fs.lookup(d.ino, name("x")).await.unwrap();
    fs.forget(x.ino, 1);
    let before = requests(&s);
    let again = fs.lookup(d.ino, name("x")).await.unwrap();
    assert_eq!(again.size, 1, "not a false ENOENT");
    assert_eq!(again.ino, x.ino, "the same inode number");
    assert_eq!(
        requests(&s),
        before,
        "an entry of a fresh listing needs no request after the kernel forgot it"
    );
    assert_eq!(
        fs.lookup(d.ino, name("nope")).await.unwrap_err(),
        FsError::NotFound
    );
}

/// A directory listed less than `metadata_ttl` ago is listed again from
/// memory (an `ls -l` run twice costs one LIST), with what this mount did
/// since; once its time is up, or an entry's metadata expired, it is read
/// from S3 again and shows what other clients did.
#[tokio::test]
async fn a_listing_within_the_ttl_needs_no_request_and_shows_this_mounts_changes() {
    let s = Arc::new(MemStore::unversioned());
    for i in 0..20 {
        s.insert(&format!("d/f{i:02}"), b"x", s3fs_meta(0o100644, 1000, 1));
    }
    let (fs, _d) = fs_with(s.clone(), |c| c.metadata_ttl = LONG_TTL);
    let d = fs.lookup(ROOT_INO, name("d")).await.unwrap();
    let names = |v: Vec<bucketfs::fs::DirEntry>| -> Vec<String> {
        v.into_iter()
            .map(|e| e.name)
            .filter(|n| n != "." && n != "..")
            .collect()
    };
    let plus_all = async |fs: &Fs| {
        let fh = fs.opendir(d.ino).await.unwrap();
        let (mut out, mut offset) = (Vec::new(), 0);
        loop {
            let batch = fs
                .readdirplus(d.ino, fh, DirAsk::at(offset))
                .await
                .unwrap()
                .entries;
            let Some(last) = batch.last() else {
                break;
            };
            offset = last.0;
            out.extend(
                batch
                    .into_iter()
                    .map(|(_, e, a, _, own)| (e.name, a.perm, own)),
            );
        }
        fs.releasedir(fh);
        out
    };
    let first = plus_all(&fs).await;
    let lists = s.counters().get(Op::List);
    let n = requests(&s);
    assert_eq!(
        plus_all(&fs).await,
        first,
        "the same entries and attributes"
    );
    assert_eq!(requests(&s), n, "listed again from memory");
    // This mount's own changes show at once, without a request to list.
    let (_, fh) = fs
        .create(d.ino, name("new"), USER, libc::O_WRONLY)
        .await
        .unwrap();
    fs.write(fh, 0, b"new").await.unwrap();
    fs.release(fh).await.unwrap();
    let (_, open) = fs
        .create(d.ino, name("open"), USER, libc::O_WRONLY)
        .await
        .unwrap();
    fs.unlink(d.ino, name("f03")).await.unwrap();
    fs.rename(d.ino, name("f04"), d.ino, name("g04"), false)
        .await
        .unwrap();
    fs.mkdir(d.ino, name("sub"), USER).await.unwrap();
    // Another client's object shows once the listing's time is up.
    s.insert("d/other", b"o", s3fs_meta(0o100600, 7, 1));
    let mut want: Vec<String> = (0..20).map(|i| format!("f{i:02}")).collect();
    want.retain(|n| n != "f03" && n != "f04");
    want.extend(["g04", "new", "open", "sub"].map(String::from));
    want.sort();
    assert_eq!(names(fs.list(d.ino).await.unwrap()), want);
    assert_eq!(s.counters().get(Op::List), lists, "no LIST within the TTL");
    // One entry's metadata expired: listed (and its metadata read) again.
    fs.expire_below("d/f05");
    fs.list(d.ino).await.unwrap();
    assert_eq!(s.counters().get(Op::List), lists + 1, "an expired entry");
    fs.listing_expires_in("d", std::time::Duration::ZERO);
    want.push("other".into());
    want.sort();
    assert_eq!(names(fs.list(d.ino).await.unwrap()), want, "after the TTL");
    assert_eq!(s.counters().get(Op::List), lists + 2);
    fs.release(open).await.unwrap();
}

/// A directory handle rewound (`rewinddir`: read from offset 0 again)
/// shows the directory as it is now, as a new `opendir` would: this
/// mount's changes at once, another client's once the listing's time is
/// up. Reads further on follow this mount's changes too.
#[tokio::test]
async fn a_rewound_directory_handle_shows_the_directory_as_it_is_now() {
    let s = Arc::new(MemStore::unversioned());
    for i in 0..5 {
        s.insert(&format!("d/f{i}"), b"x", s3fs_meta(0o100644, 1000, 1));
    }
    let (fs, _d) = fs_with(s.clone(), |c| c.metadata_ttl = LONG_TTL);
    let d = fs.lookup(ROOT_INO, name("d")).await.unwrap();
    let fh = fs.opendir(d.ino).await.unwrap();
    let names = async |fs: &Fs| {
        let mut v: Vec<String> = plus_all(fs, d.ino, fh).await.into_keys().collect();
        v.retain(|n| n != "." && n != "..");
        v.sort();
        v
    };
    assert_eq!(names(&fs).await, ["f0", "f1", "f2", "f3", "f4"]);
    fs.unlink(d.ino, name("f1")).await.unwrap();
    let (_, new) = fs
        .create(d.ino, name("new"), USER, libc::O_WRONLY)
        .await
        .unwrap();
    fs.release(new).await.unwrap();
    let lists = s.counters().get(Op::List);
    assert_eq!(names(&fs).await, ["f0", "f2", "f3", "f4", "new"]);
    assert_eq!(s.counters().get(Op::List), lists, "within the TTL: no LIST");
    s.insert("d/other", b"o", s3fs_meta(0o100644, 1000, 1));
    fs.listing_expires_in("d", std::time::Duration::ZERO);
    assert_eq!(
        names(&fs).await,
        ["f0", "f2", "f3", "f4", "new", "other"],
        "another client's object, once the listing expired"
    );
    // Read on from where it was, the handle takes the directory as this
    // mount changed it, without a request.
    fs.unlink(d.ino, name("f0")).await.unwrap();
    let n = requests(&s);
    let rest: Vec<String> = fs
        .readdir(fh, DirAsk::at(2))
        .unwrap()
        .expect("the listing held")
        .entries
        .into_iter()
        .map(|(_, e)| e.name)
        .collect();
    assert!(!rest.contains(&"f0".to_string()), "{rest:?}");
    assert!(rest.contains(&"new".to_string()), "{rest:?}");
    assert_eq!(requests(&s), n, "no request");
    fs.releasedir(fh);
}

/// `d/f0`...`d/f4` over a `Faulty` store, `d` looked up: (the store,
/// its faults, the core, its staging directory, `d`).
async fn five_in_d() -> (
    Arc<MemStore>,
    Arc<bucketfs::store::faulty::Faulty<MemStore>>,
    Fs,
    tempfile::TempDir,
    Attr,
) {
    let m = Arc::new(MemStore::unversioned());
    for i in 0..5 {
        m.insert(&format!("d/f{i}"), b"x", s3fs_meta(0o100644, 1000, 1));
    }
    let (f, fs, dir) = faulty_fs_with(m.clone(), |c| c.metadata_ttl = LONG_TTL);
    let d = fs.lookup(ROOT_INO, name("d")).await.unwrap();
    (m, f, fs, dir, d)
}

/// The first read of directory handle `fh` of `dir` (`five_in_d`) has
/// the five names and `new`, then the handle is released.
async fn assert_first_read_has_new(fs: &Fs, dir: u64, fh: u64) {
    let got: Vec<String> = fs
        .readdirplus(dir, fh, DirAsk::at(0))
        .await
        .unwrap()
        .entries
        .into_iter()
        .map(|(_, e, ..)| e.name)
        .collect();
    assert!(got.contains(&"new".to_string()), "{got:?}");
    assert_eq!(got.len(), 2 + 6, "{got:?}");
    fs.releasedir(fh);
}

/// A file this mount creates while a LIST of its directory runs may be
/// missing from what that LIST found (it landed after the LIST read its
/// page): that listing is never taken as the directory's current one, so
/// the handle over it shows the file at its first read (and the kernel,
/// which may keep what a handle is sent, is never sent the listing).
#[tokio::test]
async fn a_listing_that_ran_beside_a_create_is_never_served_as_current() {
    let (m, f, fs, _dir, d) = five_in_d().await;
    // The opendir's LIST reads the bucket, then its answer waits while the
    // file is made and uploaded.
    f.hold_after(Op::List, 1);
    let made = async {
        f.wait_held(Op::List).await.unwrap();
        let (_, fh) = fs
            .create(d.ino, name("new"), USER, libc::O_WRONLY)
            .await
            .unwrap();
        fs.write(fh, 0, b"n").await.unwrap();
        fs.release(fh).await.unwrap();
        f.release(Op::List);
    };
    let (fh, ()) = tokio::join!(fs.opendir(d.ino), made);
    let fh = fh.unwrap();
    assert!(m.object("d/new").is_some(), "uploaded during the LIST");
    assert_first_read_has_new(&fs, d.ino, fh).await;
}

/// A file this mount made before a LIST of its directory began, whose
/// upload landed while the LIST ran (after it read the page the file's
/// name is on), is in that listing: it was missing, and the kernel could
/// keep the listing without it.
#[tokio::test]
async fn a_file_that_lands_while_its_directory_is_listed_is_in_the_listing() {
    let (m, f, fs, _dir, d) = five_in_d().await;
    let (_, fh) = fs
        .create(d.ino, name("new"), USER, libc::O_WRONLY)
        .await
        .unwrap();
    fs.write(fh, 0, b"n").await.unwrap();
    f.hold_after(Op::List, 1);
    let landed = async {
        f.wait_held(Op::List).await.unwrap();
        fs.release(fh).await.unwrap();
        f.release(Op::List);
    };
    let (dh, ()) = tokio::join!(fs.opendir(d.ino), landed);
    let dh = dh.unwrap();
    assert!(m.object("d/new").is_some(), "landed during the LIST");
    assert_first_read_has_new(&fs, d.ino, dh).await;
}

/// A directory made by this mount is known empty only as long as what
/// told it the name was free: another client's objects already under that
/// prefix show once the parent's listing expires, not a whole TTL after
/// the mkdir (which would hide them for up to depth × TTL down a chain).
#[tokio::test]
async fn a_new_directory_is_known_empty_only_as_long_as_its_parents_listing() {
    let s = Arc::new(MemStore::unversioned());
    s.insert("d/a", b"1", Metadata::new());
    let (fs, _d) = fs_with(s.clone(), |c| c.metadata_ttl = LONG_TTL);
    let d = fs.lookup(ROOT_INO, name("d")).await.unwrap();
    fs.list(d.ino).await.unwrap();
    // Another client puts d/sub/x; this mount's listing of d says nothing
    // is named sub, for 50 ms more.
    s.insert("d/sub/x", b"x", Metadata::new());
    fs.listing_expires_in("d", std::time::Duration::from_millis(50));
    let sub = match fs.mkdir(d.ino, name("sub"), USER).await {
        Ok(a) => a,
        // The listing expired before the mkdir (a slow machine): the
        // mount asked S3 and saw the directory. Nothing hidden.
        Err(FsError::Exists) => return,
        Err(e) => panic!("mkdir: {e}"),
    };
    // Past the parent listing's expiry (a longer wait changes nothing).
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let names: Vec<String> = fs
        .list(sub.ino)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, [".", "..", "x"], "the other client's object shows");
}

/// The kernel is told to keep attributes only for what is left of their
/// freshness: a mode read almost `metadata_ttl` ago and handed out again
/// (a listing served from memory, a getattr answered from the table) must
/// not be trusted for another whole TTL (uid 1001 entered a directory made
/// private by another client for about 2 x TTL).
#[tokio::test]
async fn the_kernel_keeps_attributes_only_for_what_is_left_of_their_freshness() {
    let s = Arc::new(MemStore::unversioned());
    s.insert("d/f", b"1", s3fs_meta(0o100644, 1000, 1));
    let (fs, _d) = fs_with(s.clone(), |c| c.metadata_ttl = LONG_TTL);
    let d = fs.lookup(ROOT_INO, name("d")).await.unwrap();
    let f = fs.lookup(d.ino, name("f")).await.unwrap();
    let left = fs.kernel_ttl(f.ino);
    assert!(
        left <= LONG_TTL && left > LONG_TTL / 2,
        "just read: {left:?}"
    );
    fs.expire_below("d");
    assert_eq!(fs.kernel_ttl(f.ino), std::time::Duration::ZERO, "expired");
    assert_eq!(fs.kernel_ttl(d.ino), std::time::Duration::ZERO, "expired");
    // Read again: a whole TTL again.
    fs.getattr(f.ino).await.unwrap();
    assert!(fs.kernel_ttl(f.ino) > LONG_TTL / 2);
    // A file this mount writes is its own.
    let (n, fh) = fs
        .create(d.ino, name("new"), USER, libc::O_WRONLY)
        .await
        .unwrap();
    fs.expire_below("d");
    assert_eq!(fs.kernel_ttl(n.ino), LONG_TTL, "being written");
    fs.release(fh).await.unwrap();
}

// ------------------------------------------------------- first-hour costs

/// A create or an O_TRUNC open closed without a write lands at that close
/// (as `: > f` and `touch` expect), once: a later close sends nothing.
/// (Whether the closing process still holds another descriptor, as a
/// shell's `echo x > f` does, is told from /proc: tests/costs.rs.)
#[tokio::test]
async fn a_create_or_truncation_closed_without_a_write_lands_at_that_close() {
    let s = Arc::new(MemStore::versioned());
    let (fs, _d) = fs_with(s.clone(), |c| c.metadata_ttl = LONG_TTL);
    s.insert("full", b"old bytes", Metadata::new());
    let (_, fh) = fs
        .create(ROOT_INO, name("empty"), USER, libc::O_WRONLY)
        .await
        .unwrap();
    fs.flush(fh).await.unwrap();
    assert_eq!(s.object("empty").unwrap().as_ref(), b"");
    fs.flush(fh).await.unwrap();
    fs.release(fh).await.unwrap();
    let ino = fs.lookup(ROOT_INO, name("full")).await.unwrap().ino;
    let fh = fs.open(ino, libc::O_WRONLY | libc::O_TRUNC).await.unwrap();
    fs.flush(fh).await.unwrap();
    assert_eq!(s.object("full").unwrap().as_ref(), b"");
    fs.flush(fh).await.unwrap();
    fs.release(fh).await.unwrap();
    assert_eq!(s.counters().get(Op::Put), 2, "one PUT each");
}

/// chmod 644 of a 0644 file, chown to the owner it has, utimes to the
/// mtime it has: nothing changes, nothing is sent. A real change is one
/// server-side copy.
#[tokio::test]
async fn a_chmod_chown_or_utimes_that_changes_nothing_costs_no_request() {
    let s = Arc::new(MemStore::versioned());
    let (fs, _d) = fs_with(s.clone(), |c| c.metadata_ttl = LONG_TTL);
    s.insert("f", b"data", s3fs_meta(0o100644, 1000, 1_600_000_000));
    let a = fs.lookup(ROOT_INO, name("f")).await.unwrap();
    let n = requests(&s);
    for change in [
        SetAttr {
            mode: Some(0o100644),
            ..SetAttr::default()
        },
        SetAttr {
            uid: Some(1000),
            gid: Some(1000),
            ..SetAttr::default()
        },
        SetAttr {
            mtime: Some(a.mtime),
            ..SetAttr::default()
        },
    ] {
        let after = fs.setattr(a.ino, change).await.unwrap();
        assert_eq!((after.perm, after.uid, after.mtime), (0o644, 1000, a.mtime));
    }
    assert_eq!(requests(&s) - n, 0, "no request for no change");
    let after = fs
        .setattr(
            a.ino,
            SetAttr {
                mode: Some(0o100600),
                ..SetAttr::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(after.perm, 0o600);
    assert_eq!(requests(&s) - n, 1, "one copy for a real change");
    assert_eq!(
        s.metadata("f").unwrap().get("mode").map(String::as_str),
        Some("33152")
    );
}

/// A lookup asks one ListObjectsV2 with the name as prefix: a missing name
/// costs that one request; a file or a directory adds the HEAD of its
/// metadata; names sorting between `name` and `name/` do not hide a
/// directory.
#[tokio::test]
async fn a_missing_name_costs_one_request_and_a_lookup_tells_files_from_directories() {
    let s = Arc::new(MemStore::versioned());
    let (fs, _d) = fs_with(s.clone(), |c| c.metadata_ttl = LONG_TTL);
    s.insert("file", b"1", s3fs_meta(0o100600, 7, 1_600_000_000));
    s.insert("file-2", b"2", Metadata::new());
    s.insert("dir/", b"", s3fs_meta(0o040700, 7, 1_600_000_000));
    s.insert("dir/x", b"x", Metadata::new());
    s.insert("implicit/y", b"y", Metadata::new());
    for i in 0..150 {
        // Sort between "crowded" and "crowded/": past one LIST's answer.
        s.insert(&format!("crowded-{i:03}"), b"", Metadata::new());
    }
    s.insert("crowded/z", b"z", Metadata::new());

    let n = requests(&s);
    for missing in [".Trash", ".hidden", ".directory"] {
        assert_eq!(
            fs.lookup(ROOT_INO, name(missing)).await.unwrap_err(),
            FsError::NotFound
        );
    }
    assert_eq!(requests(&s) - n, 3, "one request per missing name");

    let n = requests(&s);
    let f = fs.lookup(ROOT_INO, name("file")).await.unwrap();
    assert_eq!(
        (f.kind, f.perm, f.uid, f.size),
        (FileKind::File, 0o600, 7, 1)
    );
    assert_eq!(requests(&s) - n, 2, "LIST + HEAD for a file's metadata");

    let d = fs.lookup(ROOT_INO, name("dir")).await.unwrap();
    assert_eq!((d.kind, d.perm, d.uid), (FileKind::Dir, 0o700, 7));
    let i = fs.lookup(ROOT_INO, name("implicit")).await.unwrap();
    assert_eq!(i.kind, FileKind::Dir);
    let c = fs.lookup(ROOT_INO, name("crowded")).await.unwrap();
    assert_eq!(c.kind, FileKind::Dir, "found past 150 sibling names");
    assert_eq!(
        fs.lookup(ROOT_INO, name("file-")).await.unwrap_err(),
        FsError::NotFound,
        "a prefix of a name is not a name"
    );
}

/// A chmod or chown whose self-copy fails changes nothing the kernel is
/// shown: the node keeps the attributes that are in S3.
#[tokio::test]
async fn a_failed_chmod_leaves_the_attributes_as_stored() {
    let s = Arc::new(MemStore::unversioned());
    s.insert("f", b"data", s3fs_meta(0o100600, 42, 1_000_000_000));
    let (fs, _d) = fs_with(s.clone(), |c| c.metadata_ttl = LONG_TTL);
    let f = fs.lookup(ROOT_INO, name("f")).await.unwrap();
    assert_eq!(f.perm, 0o600);
    s.fail_next(Op::Copy, 1, StoreError::Transient("503 SlowDown".into()));
    let chmod = SetAttr {
        mode: Some(0o644),
        uid: Some(7),
        ..SetAttr::default()
    };
    assert!(fs.setattr(f.ino, chmod).await.is_err());
    let shown = fs.getattr(f.ino).await.unwrap();
    assert_eq!((shown.perm, shown.uid), (0o600, 42));
    // And a chmod that lands is shown.
    let chmod = SetAttr {
        mode: Some(0o640),
        ..SetAttr::default()
    };
    assert_eq!(fs.setattr(f.ino, chmod).await.unwrap().perm, 0o640);
    assert_eq!(fs.getattr(f.ino).await.unwrap().perm, 0o640);
}

// ----------------------------------------------------------------------
// writeback=async

fn async_fs(s: &Arc<MemStore>) -> (Fs, tempfile::TempDir) {
    fs_with(s.clone(), |c| {
        c.writeback_async = true;
        c.metadata_ttl = LONG_TTL;
    })
}

/// close() returns with the data staged, before any PUT; the background
/// pass sends it, once; reads meanwhile see the new bytes.
#[tokio::test]
async fn writeback_async_close_returns_before_the_upload_and_the_background_sends_it() {
    let s = Arc::new(MemStore::unversioned());
    let (fs, _d) = async_fs(&s);
    let (a, fh) = fs
        .create(ROOT_INO, name("f"), USER, libc::O_WRONLY)
        .await
        .unwrap();
    fs.write(fh, 0, b"later").await.unwrap();
    fs.flush(fh).await.unwrap();
    fs.release(fh).await.unwrap();
    assert_eq!(s.counters().get(Op::Put), 0, "nothing sent at close");
    let rh = fs.open(a.ino, libc::O_RDONLY).await.unwrap();
    assert_eq!(fs.read(rh, 0, 100).await.unwrap().as_ref(), b"later");
    fs.release(rh).await.unwrap();
    assert_eq!(fs.dirty_files().len(), 1, "status lists it");
    assert!(
        fs.sync_all(std::time::Duration::from_secs(30))
            .await
            .is_empty()
    );
    assert_eq!(s.object("f").unwrap().as_ref(), b"later");
    assert_eq!(s.counters().get(Op::Put), 1);
    assert!(fs.dirty_files().is_empty());
}

/// rsync's pattern: a temporary file written and closed, its mode and
/// mtime set, then renamed over the destination. Under writeback=async it
/// costs one PUT, at the final name, with the mode and mtime, and no copy.
#[tokio::test]
async fn writeback_async_rsync_pattern_costs_one_put_per_file() {
    let s = Arc::new(MemStore::unversioned());
    s.insert("f", b"old f", Metadata::new());
    let (fs, _d) = async_fs(&s);
    fs.lookup(ROOT_INO, name("f")).await.unwrap();
    let (a, fh) = fs
        .create(
            ROOT_INO,
            name(".f.Xy12"),
            USER,
            libc::O_WRONLY | libc::O_EXCL,
        )
        .await
        .unwrap();
    fs.write(fh, 0, b"new f").await.unwrap();
    fs.flush(fh).await.unwrap();
    fs.release(fh).await.unwrap();
    let mtime = std::time::UNIX_EPOCH + std::time::Duration::from_secs(978_307_200);
    for set in [
        SetAttr {
            mode: Some(0o600),
            ..Default::default()
        },
        SetAttr {
            mtime: Some(mtime),
            ..Default::default()
        },
    ] {
        fs.setattr(a.ino, set).await.unwrap();
    }
    fs.rename(ROOT_INO, name(".f.Xy12"), ROOT_INO, name("f"), false)
        .await
        .unwrap();
    let before = requests(&s);
    assert!(
        fs.sync_all(std::time::Duration::from_secs(30))
            .await
            .is_empty()
    );
    assert_eq!(s.object("f").unwrap().as_ref(), b"new f");
    assert_eq!(s.object(".f.Xy12"), None);
    let meta = s.head("f", None).await.unwrap().metadata.unwrap();
    assert_eq!(
        meta.get("mode").map(String::as_str),
        Some("33152"),
        "{meta:?}"
    );
    assert!(
        meta.get("mtime")
            .is_some_and(|m| m.starts_with("978307200")),
        "{meta:?}"
    );
    assert_eq!(
        (
            s.counters().get(Op::Put),
            s.counters().get(Op::Copy),
            s.counters().get(Op::Delete)
        ),
        (1, 0, 1),
        "one PUT, no copy, one delete (of the replaced f, at the rename)"
    );
    assert_eq!(
        requests(&s) - before,
        2,
        "the PUT and the HEAD of this check"
    );
}

/// Killed after the rename of a file not sent yet: the next mount's
/// recovery puts it at the new name, over the file it replaced (not
/// beside it, as if another client had written that).
#[tokio::test]
async fn writeback_async_a_renamed_file_not_sent_yet_is_recovered_at_its_new_name() {
    let s = Arc::new(MemStore::unversioned());
    s.insert("f", b"old f", Metadata::new());
    let (fs, d) = async_fs(&s);
    fs.lookup(ROOT_INO, name("f")).await.unwrap();
    let (_, fh) = fs
        .create(ROOT_INO, name("tmp"), USER, libc::O_WRONLY)
        .await
        .unwrap();
    fs.write(fh, 0, b"new f").await.unwrap();
    fs.flush(fh).await.unwrap();
    fs.release(fh).await.unwrap();
    fs.rename(ROOT_INO, name("tmp"), ROOT_INO, name("f"), false)
        .await
        .unwrap();
    // The daemon dies: nothing was sent.
    drop(fs);
    assert_eq!(s.counters().get(Op::Put), 0);
    let opts = UploadOptions {
        part_size_bytes: 8 * 1024 * 1024,
        concurrency: 2,
    };
    let r = bucketfs::write::recover(&*s, d.path(), &opts).await;
    assert!(r.iter().all(|r| r.is_ok()), "{r:?}");
    assert_eq!(s.object("f").unwrap().as_ref(), b"new f");
    assert_eq!(s.object("tmp"), None);
    assert_eq!(s.keys(), ["f"], "nothing beside");
}

/// What another client set on an object and the mount does not own
/// (Content-Type and the other headers, storage class, encryption, its
/// own `x-amz-meta-*`) survives a chmod, a rename, an overwrite and an
/// overwrite of an object first seen in a listing.
#[tokio::test]
async fn chmod_rename_and_overwrite_keep_the_headers_and_metadata_of_others() {
    use bucketfs::store::ObjectHeaders;
    let s = Arc::new(MemStore::versioned());
    let (fs, _d) = fs_with(s.clone(), |c| c.metadata_ttl = LONG_TTL);
    let headers = ObjectHeaders {
        content_type: Some("text/html; charset=utf-8".into()),
        cache_control: Some("max-age=60".into()),
        content_disposition: Some("inline".into()),
        storage_class: Some("STANDARD_IA".into()),
        sse: Some("aws:kms".into()),
        sse_kms_key_id: Some("key-1".into()),
        ..ObjectHeaders::default()
    };
    let mut meta = s3fs_meta(0o100644, 1000, 1_600_000_000);
    meta.insert("owner-app".into(), "cms".into());
    for k in ["page", "listed"] {
        s.insert_with_headers(k, b"<p>old</p>", meta.clone(), headers.clone());
    }
    let kept = |key: &str, what: &str| {
        assert_eq!(s.headers(key).as_ref(), Some(&headers), "{what}");
        let m = s.metadata(key).unwrap();
        assert_eq!(
            m.get("owner-app").map(String::as_str),
            Some("cms"),
            "{what}"
        );
    };
    let a = fs.lookup(ROOT_INO, name("page")).await.unwrap();
    fs.setattr(
        a.ino,
        SetAttr {
            mode: Some(0o100600),
            ..SetAttr::default()
        },
    )
    .await
    .unwrap();
    kept("page", "chmod");
    assert_eq!(
        s.metadata("page").unwrap().get("mode").map(String::as_str),
        Some("33152"),
        "the chmod itself landed"
    );
    fs.rename(ROOT_INO, name("page"), ROOT_INO, name("moved.html"), false)
        .await
        .unwrap();
    kept("moved.html", "rename");
    let fh = fs
        .open(a.ino, libc::O_WRONLY | libc::O_TRUNC)
        .await
        .unwrap();
    fs.write(fh, 0, b"<p>new</p>").await.unwrap();
    fs.flush(fh).await.unwrap();
    fs.release(fh).await.unwrap();
    assert_eq!(s.object("moved.html").unwrap().as_ref(), b"<p>new</p>");
    kept("moved.html", "overwrite");
    assert_eq!(
        s.metadata("moved.html")
            .unwrap()
            .get("mode")
            .map(String::as_str),
        Some("33152"),
        "the overwrite carries the file's own mode"
    );
    // Seen only in a listing (no headers yet): the overwrite looks first.
    let entries = fs.list(ROOT_INO).await.unwrap();
    assert!(entries.iter().any(|e| e.name == "listed"));
    let l = fs.lookup(ROOT_INO, name("listed")).await.unwrap();
    let fh = fs
        .open(l.ino, libc::O_WRONLY | libc::O_TRUNC)
        .await
        .unwrap();
    fs.write(fh, 0, b"x").await.unwrap();
    fs.release(fh).await.unwrap();
    assert_eq!(s.object("listed").unwrap().as_ref(), b"x");
    kept("listed", "overwrite after a listing");
    // A new file gets its type from its name.
    let (_, fh) = fs
        .create(ROOT_INO, name("new.css"), USER, libc::O_WRONLY)
        .await
        .unwrap();
    fs.write(fh, 0, b"p{}").await.unwrap();
    fs.release(fh).await.unwrap();
    assert_eq!(
        s.headers("new.css").unwrap().content_type.as_deref(),
        Some("text/css")
    );
}

// ----------------------------------------------------------------------
// Owner, mode and times set one after another right after a close (GIO)

/// Writes `name` with `data` through the mount and closes it.
async fn write_file(fs: &Fs, name_: &str, data: &[u8]) -> u64 {
    let (a, fh) = fs
        .create(ROOT_INO, name(name_), USER, libc::O_WRONLY)
        .await
        .unwrap();
    fs.write(fh, 0, data).await.unwrap();
    fs.flush(fh).await.unwrap();
    fs.release(fh).await.unwrap();
    a.ino
}

/// What GIO does after copying a file: chown, chmod, then utimes, each its
/// own call.
async fn gio_attributes(fs: &Fs, ino: u64, mtime: std::time::SystemTime) {
    for set in [
        SetAttr {
            uid: Some(4242),
            gid: Some(4343),
            ..Default::default()
        },
        SetAttr {
            mode: Some(0o100600),
            ..Default::default()
        },
        SetAttr {
            atime: Some(mtime),
            mtime: Some(mtime),
            ..Default::default()
        },
    ] {
        fs.setattr(ino, set).await.unwrap();
    }
}

const GIO_MTIME: u64 = 978_307_200;

fn gio_mtime() -> std::time::SystemTime {
    std::time::UNIX_EPOCH + std::time::Duration::from_secs(GIO_MTIME)
}

/// The object `key` carries what `gio_attributes` set.
fn assert_gio_metadata(s: &MemStore, key: &str) {
    let meta = s.metadata(key).unwrap();
    let get = |k: &str| meta.get(k).map(String::as_str);
    assert_eq!(
        (get("mode"), get("uid"), get("gid"), get("mtime")),
        (
            Some("33152"),
            Some("4242"),
            Some("4343"),
            Some(GIO_MTIME.to_string().as_str())
        ),
        "{meta:?}"
    );
}

/// Runs the background uploader until nothing is due any more (at most
/// 60 s): what the mount's retrier task does.
async fn settle(fs: &Fs) {
    let give_up = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while let Some(next) = fs.retry_pending().await {
        assert!(std::time::Instant::now() < give_up, "never settled");
        tokio::time::sleep(next.saturating_duration_since(std::time::Instant::now())).await;
    }
}

/// The three calls are shown at once and stored by one self-copy after
/// the first of them waited `ATTR_BATCH`: a new file costs 1 PUT and 1
/// COPY, not 1 PUT and 3 COPYs, and the bytes are untouched.
#[tokio::test]
async fn owner_mode_and_times_set_after_a_close_cost_one_copy_together() {
    let s = Arc::new(MemStore::versioned());
    let (fs, _d) = fs_with(s.clone(), |c| c.metadata_ttl = LONG_TTL);
    let ino = write_file(&fs, "copied", b"the bytes").await;
    let n = requests(&s);
    gio_attributes(&fs, ino, gio_mtime()).await;
    let shown = fs.getattr(ino).await.unwrap();
    assert_eq!(
        (shown.perm, shown.uid, shown.gid, shown.mtime),
        (0o600, 4242, 4343, gio_mtime()),
        "shown at once"
    );
    assert_eq!(requests(&s) - n, 0, "nothing sent yet");
    settle(&fs).await;
    assert_eq!(s.counters().get(Op::Copy), 1, "one copy for all three");
    assert_eq!(s.counters().get(Op::Put), 1);
    assert_gio_metadata(&s, "copied");
    assert_eq!(s.object("copied").unwrap().as_ref(), b"the bytes");
    assert!(fs.dirty_files().is_empty());
    // Long after the write, a chmod is stored at once, as ever.
    s.insert("old", b"old", s3fs_meta(0o100644, 1, 1));
    let old = fs.lookup(ROOT_INO, name("old")).await.unwrap();
    let n = requests(&s);
    fs.setattr(
        old.ino,
        SetAttr {
            mode: Some(0o100600),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(
        s.metadata("old").unwrap().get("mode").map(String::as_str),
        Some("33152")
    );
    assert_eq!(requests(&s) - n, 1, "its copy");
}

/// Unmount (sync_all) stores deferred attributes at once.
#[tokio::test]
async fn deferred_attributes_are_stored_at_unmount() {
    let s = Arc::new(MemStore::unversioned());
    let (fs, _d) = fs_with(s.clone(), |c| c.metadata_ttl = LONG_TTL);
    let ino = write_file(&fs, "f", b"x").await;
    gio_attributes(&fs, ino, gio_mtime()).await;
    assert!(
        fs.sync_all(std::time::Duration::from_secs(30))
            .await
            .is_empty()
    );
    assert_gio_metadata(&s, "f");
    assert_eq!(s.counters().get(Op::Copy), 1);
}

/// Killed while the change waits: the next mount's recovery stores it
/// (one copy, the bytes untouched), from the journal alone.
#[tokio::test]
async fn a_deferred_change_of_attributes_survives_a_kill() {
    let s = Arc::new(MemStore::versioned());
    let (fs, d) = fs_with(s.clone(), |c| c.metadata_ttl = LONG_TTL);
    let ino = write_file(&fs, "f", b"kept bytes").await;
    gio_attributes(&fs, ino, gio_mtime()).await;
    drop(fs);
    assert_eq!(s.counters().get(Op::Copy), 0, "killed before the copy");
    let (fs, _d2) = fs_with(s.clone(), |c| {
        c.metadata_ttl = LONG_TTL;
        c.staging_dir = d.path().to_path_buf();
    });
    let r = fs.adopt_staged().await;
    assert!(r.iter().all(|r| r.is_ok()), "{r:?}");
    settle(&fs).await;
    assert_gio_metadata(&s, "f");
    assert_eq!(s.object("f").unwrap().as_ref(), b"kept bytes");
    assert_eq!(
        (s.counters().get(Op::Copy), s.counters().get(Op::Put)),
        (1, 1)
    );
    assert_eq!(s.keys(), ["f"], "nothing beside");
    assert_eq!(
        std::fs::read_dir(d.path()).unwrap().count(),
        0,
        "journal settled"
    );
}

/// Killed while the change waits, and another client replaced the object
/// before the next mount: its object is left as it wrote it, nothing goes
/// beside it, and the journal is settled.
#[tokio::test]
async fn a_deferred_change_for_an_object_replaced_since_is_dropped() {
    let s = Arc::new(MemStore::unversioned());
    let (fs, d) = fs_with(s.clone(), |c| c.metadata_ttl = LONG_TTL);
    let ino = write_file(&fs, "f", b"mine").await;
    gio_attributes(&fs, ino, gio_mtime()).await;
    drop(fs);
    s.insert("f", b"theirs", s3fs_meta(0o100640, 9, 5));
    let opts = UploadOptions {
        part_size_bytes: 8 * 1024 * 1024,
        concurrency: 2,
    };
    let r = bucketfs::write::recover(&*s, d.path(), &opts).await;
    assert!(r.iter().all(|r| r.is_ok()), "{r:?}");
    assert_eq!(s.object("f").unwrap().as_ref(), b"theirs");
    assert_eq!(
        s.metadata("f").unwrap().get("mode").map(String::as_str),
        Some("33184")
    );
    assert_eq!(s.keys(), ["f"]);
    assert_eq!(s.counters().get(Op::Copy), 0);
    assert_eq!(
        std::fs::read_dir(d.path()).unwrap().count(),
        0,
        "journal settled"
    );
}

/// A rename, an unlink or a writer while the change waits: the renamed
/// file lands at its new name with the attributes (the old name gone), the
/// unlinked one never comes back, the rewritten one goes up in one PUT
/// with its new bytes and the attributes, no copy of its own.
#[tokio::test]
async fn rename_unlink_and_a_writer_take_a_deferred_change_along() {
    let s = Arc::new(MemStore::unversioned());
    let (fs, _d) = fs_with(s.clone(), |c| c.metadata_ttl = LONG_TTL);
    let moved = write_file(&fs, "moved", b"m").await;
    let gone = write_file(&fs, "gone", b"g").await;
    let rewritten = write_file(&fs, "rewritten", b"r").await;
    for ino in [moved, gone, rewritten] {
        gio_attributes(&fs, ino, gio_mtime()).await;
    }
    fs.rename(ROOT_INO, name("moved"), ROOT_INO, name("there"), false)
        .await
        .unwrap();
    fs.unlink(ROOT_INO, name("gone")).await.unwrap();
    let fh = fs.open(rewritten, libc::O_WRONLY).await.unwrap();
    fs.write(fh, 0, b"R2").await.unwrap();
    let copies = s.counters().get(Op::Copy);
    let puts = s.counters().get(Op::Put);
    fs.flush(fh).await.unwrap();
    fs.release(fh).await.unwrap();
    assert_eq!(s.counters().get(Op::Put) - puts, 1);
    assert_eq!(
        s.counters().get(Op::Copy) - copies,
        0,
        "the PUT carries them"
    );
    settle(&fs).await;
    assert_eq!(s.keys(), ["rewritten", "there"]);
    assert_eq!(s.object("there").unwrap().as_ref(), b"m");
    assert_eq!(s.object("rewritten").unwrap().as_ref(), b"R2");
    assert_gio_metadata(&s, "there");
    // The write moved its mtime; the owner and mode stay as set.
    let meta = s.metadata("rewritten").unwrap();
    let get = |k: &str| meta.get(k).map(String::as_str);
    assert_eq!(
        (get("mode"), get("uid"), get("gid")),
        (Some("33152"), Some("4242"), Some("4343"))
    );
    let gone = fs.lookup(ROOT_INO, name("gone")).await.unwrap_err();
    assert_eq!(gone, FsError::NotFound);
}

/// rsync's pattern without writeback=async: the temporary file goes up at
/// its close, its mode and mtime set after, then it is renamed over the
/// destination. The deferred mode and mtime ride on the rename's copy:
/// 1 PUT, 1 COPY, 1 DELETE, and the destination carries them.
#[tokio::test]
async fn rsync_pattern_costs_one_put_one_copy_and_one_delete() {
    let s = Arc::new(MemStore::unversioned());
    s.insert("f", b"old f", Metadata::new());
    let (fs, _d) = fs_with(s.clone(), |c| c.metadata_ttl = LONG_TTL);
    fs.lookup(ROOT_INO, name("f")).await.unwrap();
    let ino = write_file(&fs, ".f.Xy12", b"new f").await;
    for set in [
        SetAttr {
            mode: Some(0o100600),
            ..Default::default()
        },
        SetAttr {
            atime: Some(gio_mtime()),
            mtime: Some(gio_mtime()),
            ..Default::default()
        },
    ] {
        fs.setattr(ino, set).await.unwrap();
    }
    fs.rename(ROOT_INO, name(".f.Xy12"), ROOT_INO, name("f"), false)
        .await
        .unwrap();
    settle(&fs).await;
    assert_eq!(s.keys(), ["f"]);
    assert_eq!(s.object("f").unwrap().as_ref(), b"new f");
    let meta = s.metadata("f").unwrap();
    assert_eq!(
        (
            meta.get("mode").map(String::as_str),
            meta.get("mtime").map(String::as_str)
        ),
        (Some("33152"), Some(GIO_MTIME.to_string().as_str())),
        "{meta:?}"
    );
    assert_eq!(
        (
            s.counters().get(Op::Put),
            s.counters().get(Op::Copy),
            s.counters().get(Op::Delete)
        ),
        (1, 1, 1)
    );
    let shown = fs.lookup(ROOT_INO, name("f")).await.unwrap();
    assert_eq!(
        (shown.perm, shown.mtime, shown.size),
        (0o600, gio_mtime(), 5)
    );
}

/// `ls -l` of a directory whose names took longer to read than
/// `metadata_ttl` stats entries that have expired. Each was looked up
/// again alone, one after another: a LIST and a HEAD per entry. After a
/// few, the directory is listed again once and the metadata of the rest
/// read ahead of the stats. What the stats show is still S3's: a file
/// deleted, one added, and one whose metadata changed with its ETag kept
/// (another client's chmod) are each seen.
#[tokio::test]
async fn expired_entries_stated_one_by_one_are_listed_again_once() {
    let m = Arc::new(MemStore::unversioned());
    let meta = s3fs_meta(0o100640, 42, 1_000_000_000);
    for i in 0..300 {
        m.insert(&format!("d/f{i:03}"), b"same bytes", meta.clone());
    }
    let (f, fs, _dir) = faulty_fs_with(m.clone(), |c| c.metadata_ttl = LONG_TTL);
    let d = fs.lookup(ROOT_INO, name("d")).await.unwrap();
    fs.list(d.ino).await.unwrap();
    for i in 0..300 {
        fs.lookup(d.ino, name(&format!("f{i:03}"))).await.unwrap();
    }
    // Another client: a chmod (a copy onto itself: same bytes, same
    // ETag), a delete, a new file.
    assert!(m.set_metadata_keeping_etag("d/f200", s3fs_meta(0o100600, 7, 1_000_000_000)));
    m.delete("d/f100").await.unwrap();
    m.insert("d/f300", b"new", meta.clone());
    fs.expire_below("d");
    let (lists, heads) = (f.calls(Op::List), f.calls(Op::Head));
    // One entry far ahead is looked up first, alone: fresh again, it is
    // not asked about again by what follows.
    fs.lookup(d.ino, name("f250")).await.unwrap();
    for i in 0..=300 {
        let got = fs.lookup(d.ino, name(&format!("f{i:03}"))).await;
        match i {
            100 => assert_eq!(got.err(), Some(FsError::NotFound), "f100 was deleted"),
            200 => {
                let a = got.unwrap();
                assert_eq!((a.perm, a.uid), (0o600, 7), "f200's new metadata");
            }
            _ => {
                let a = got.unwrap();
                assert_eq!((a.perm, a.uid), (0o640, 42), "f{i:03}");
            }
        }
    }
    let relist = RELIST_AFTER as u64;
    assert_eq!(
        f.calls(Op::List) - lists,
        // d itself (expired too), its entries alone before its listing is
        // read again (f250, then f000...), that listing, and f100 (not
        // listed any more: asked about once).
        1 + (relist - 1) + 1 + 1,
        "LISTs"
    );
    assert_eq!(
        f.calls(Op::Head) - heads,
        // d's marker, one per entry still there (f000..f300 but f100, f250
        // too only once), and f100's beside its LIST.
        1 + 300 + 1,
        "HEADs"
    );
    // Expired again within one TTL of that listing (only a listing that
    // outlasts the TTL does this): not listed again and again, each entry
    // is looked up alone.
    fs.expire_below("d");
    let lists = f.calls(Op::List);
    for i in 0..20 {
        fs.lookup(d.ino, name(&format!("f{i:03}"))).await.unwrap();
    }
    assert_eq!(f.calls(Op::List) - lists, 1 + 20, "d, then one per entry");
}

/// Metadata an object keeps its ETag through (another client's chmod or
/// chown copies it onto itself) is read again once it has expired, by a
/// listing of its directory too: neither a listing read again for other
/// names' expired lookups nor a plain listing may keep handing out the old
/// mode and owner (a file made private stayed readable to other users).
#[tokio::test]
async fn a_listing_after_the_ttl_reads_unchanged_objects_metadata_again() {
    let m = Arc::new(MemStore::unversioned());
    let open = s3fs_meta(0o100644, 0, 1_000_000_000);
    let private = s3fs_meta(0o100600, 1234, 1_000_000_000);
    for i in 0..30 {
        m.insert(&format!("r/o{i:02}"), b"bytes", open.clone());
    }
    m.insert("r/sub/", b"", s3fs_meta(0o040755, 0, 1_000_000_000));
    let (_f, fs, _dir) = faulty_fs_with(m.clone(), |c| c.metadata_ttl = LONG_TTL);
    let r = fs.lookup(ROOT_INO, name("r")).await.unwrap();
    fs.list(r.ino).await.unwrap();
    for i in 0..30 {
        fs.lookup(r.ino, name(&format!("o{i:02}"))).await.unwrap();
    }
    assert_eq!(fs.lookup(r.ino, name("sub")).await.unwrap().perm, 0o755);
    let chmod = |key: &str, meta: &Metadata| {
        assert!(m.set_metadata_keeping_etag(key, meta.clone()));
    };
    // Names before the ones whose expired lookups list the directory again.
    for i in 0..5 {
        chmod(&format!("r/o{i:02}"), &private);
    }
    fs.expire_below("r");
    for i in (22..30).rev() {
        fs.lookup(r.ino, name(&format!("o{i:02}"))).await.unwrap();
    }
    for i in 0..5 {
        let a = fs.lookup(r.ino, name(&format!("o{i:02}"))).await.unwrap();
        assert_eq!((a.perm, a.uid), (0o600, 1234), "o{i:02} after the listing");
    }
    // A plain listing (opendir) after the TTL, files and a directory.
    chmod("r/o10", &private);
    chmod("r/sub/", &s3fs_meta(0o040700, 1234, 1_000_000_000));
    fs.expire_below("r");
    fs.list(r.ino).await.unwrap();
    let a = fs.lookup(r.ino, name("o10")).await.unwrap();
    assert_eq!((a.perm, a.uid), (0o600, 1234), "o10 after opendir");
    let s = fs.lookup(r.ino, name("sub")).await.unwrap();
    assert_eq!((s.perm, s.uid), (0o700, 1234), "sub after opendir");
}

/// Every entry a directory handle's readdirplus hands out from its start:
/// name → (mode bits, owner).
async fn plus_all(fs: &Fs, dir: u64, fh: u64) -> std::collections::HashMap<String, (u16, u32)> {
    let mut got = std::collections::HashMap::new();
    let mut offset = 0;
    loop {
        let batch = fs
            .readdirplus(dir, fh, DirAsk::at(offset))
            .await
            .unwrap()
            .entries;
        let Some((last, ..)) = batch.last() else {
            break;
        };
        offset = *last;
        for (_, e, a, _, _) in batch {
            got.insert(e.name.clone(), (a.perm, a.uid));
        }
    }
    got
}

/// A directory handle opened while its entries' metadata was fresh, and
/// read (or rewound) after `metadata_ttl`, hands out nothing older than
/// that: the attack helper read a file another client had made private
/// (a chmod keeps the ETag) through such a handle, 20 s after the change.
#[tokio::test]
async fn readdirplus_of_an_old_handle_reads_expired_metadata_again() {
    let m = Arc::new(MemStore::unversioned());
    for i in 0..200 {
        m.insert(
            &format!("p/o{i:03}"),
            b"bytes",
            s3fs_meta(0o100644, 0, 1_000_000_000),
        );
    }
    m.insert("p/zd/", b"", s3fs_meta(0o040755, 0, 1_000_000_000));
    let (_f, fs, _dir) = faulty_fs_with(m.clone(), |c| c.metadata_ttl = LONG_TTL);
    let p = fs.lookup(ROOT_INO, name("p")).await.unwrap();
    let fh = fs.opendir(p.ino).await.unwrap();
    let before = plus_all(&fs, p.ino, fh).await;
    assert_eq!(before["o010"], (0o644, 0));
    assert_eq!(before["zd"], (0o755, 0));
    let private = s3fs_meta(0o100600, 1234, 1_000_000_000);
    assert!(m.set_metadata_keeping_etag("p/o010", private.clone()));
    assert!(m.set_metadata_keeping_etag("p/o150", private));
    assert!(m.set_metadata_keeping_etag("p/zd/", s3fs_meta(0o040700, 1234, 1_000_000_000)));
    fs.expire_below("p");
    // The same handle, rewound.
    let after = plus_all(&fs, p.ino, fh).await;
    assert_eq!(after.len(), before.len(), "every entry still listed");
    for n in ["o010", "o150"] {
        assert_eq!(after[n], (0o600, 1234), "{n}");
    }
    assert_eq!(after["zd"], (0o700, 1234), "zd");
    assert_eq!(after["o011"], (0o644, 0));
    fs.releasedir(fh);
}
