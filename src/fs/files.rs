//! Open files: handles, reads, and the write-back state of files open for
//! writing.
//!
//! A handle opened for reading is pinned to the object it opened (version
//! id when known, else ETag): it never returns a mix of old and new bytes.
//! Reads go through the block cache with per-handle sequential detection:
//! the read-ahead window doubles while reads stay sequential and falls back
//! to nothing on a seek.
//!
//! All handles open for writing on one inode share one `OpenFile` (one
//! staged copy), so every handle, reader or writer, sees what was written.
//! The last release uploads what is still dirty; `flush` (every `close` of
//! a descriptor that wrote) and `fsync` upload and return the upload's
//! error.
//!
//! One owner: an inode's write state (its staged copy, its journal, the
//! identity of the object it replaces) is changed only under its lock, in
//! the order lock → S3 side effect → record. Rename, unlink, chmod of an
//! open file go through it (see `namespace.rs`). A failed upload keeps the
//! state (and the inode) as *pending*: `retry_pending` tries it again with
//! capped exponential backoff until it lands; the staged data is deleted
//! only then, or when the file is unlinked.
//!
//! Readers see what this mount did: a read handle follows the inode's
//! object when this mount changes it (upload, rename, metadata copy; the
//! inode's `generation` counts those), and stays pinned against changes by
//! other clients.

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use futures::{StreamExt, TryStreamExt};
use parking_lot::Mutex;
use tracing::{error, warn};

use super::inodes::NodeKey;
use super::{Attr, FileKind, Fs, FsError, FsResult};
use crate::cache::block::BlockKey;
use crate::store::{ObjectInfo, ReadPin};
use crate::write::tombstone::Tombstone;
use crate::write::{Base, Progress, Staged};

/// What an open handle is.
#[derive(Debug)]
pub enum Handle {
    File(FileHandle),
    Dir(super::dirs::DirHandle),
}

#[derive(Debug)]
pub struct FileHandle {
    pub ino: u64,
    pub writable: bool,
    /// Whether this handle wrote (or truncated by ftruncate) since its last
    /// flush: only then does `close()` upload, so closing a reader, a
    /// forked child's copy, or a descriptor that wrote nothing sends
    /// nothing; the last release uploads whatever is left (a new empty
    /// file, an O_TRUNC that wrote nothing).
    wrote: std::sync::atomic::AtomicBool,
    /// It created the file or truncated it at open (O_TRUNC), and no close
    /// of it uploaded that yet (see `flush_from`).
    pub(super) made: std::sync::atomic::AtomicBool,
    /// The process (thread group) that opened it, 0 if unknown.
    opener: std::sync::atomic::AtomicU32,
    /// The thread that wrote through it last, 0 if unknown.
    last_writer: std::sync::atomic::AtomicU32,
    /// The object reads are pinned to (when the inode has no write state).
    target: Mutex<Option<ReadTarget>>,
    /// The inode's generation the target was taken at.
    generation: std::sync::atomic::AtomicU64,
    readahead: Mutex<Readahead>,
}

impl FileHandle {
    /// Notes that a read was answered from its target.
    fn served(&self) {
        if let Some(t) = self.target.lock().as_mut() {
            t.served = true;
        }
    }

    /// A handle on a file created by this mount (nothing to read from S3).
    pub fn writer(ino: u64) -> Self {
        FileHandle {
            ino,
            writable: true,
            wrote: Default::default(),
            made: true.into(),
            opener: Default::default(),
            last_writer: Default::default(),
            target: Mutex::new(None),
            generation: Default::default(),
            readahead: Mutex::new(Readahead::default()),
        }
    }
}

#[derive(Clone, Debug)]
struct ReadTarget {
    key: Arc<str>,
    /// The object's identity in the block cache.
    etag: Arc<str>,
    /// How its GETs are pinned.
    pin: ReadPin,
    size: u64,
    /// Whether this handle has returned data (then a changed object is an
    /// error, not a reason to re-pin).
    served: bool,
    /// The object's bytes on the cache disk, kept when this mount removed
    /// or overwrote it while this handle read it: read from here on.
    kept: Option<Arc<std::fs::File>>,
}

impl ReadTarget {
    /// Block `index` of the object in the block cache.
    fn block(&self, index: u64) -> BlockKey {
        BlockKey {
            key: self.key.clone(),
            etag: self.etag.clone(),
            index,
        }
    }

    /// Where a read of `len` bytes at `offset` ends in the object, and
    /// its first and last blocks; `None`: nothing to read there.
    fn span(&self, offset: u64, len: u64, bs: u64) -> Option<(u64, u64, u64)> {
        let end = (offset + len).min(self.size);
        (offset < end).then(|| (end, offset / bs, (end - 1) / bs))
    }
}

#[derive(Debug, Default)]
struct Readahead {
    next_offset: u64,
    window_blocks: u64,
}

impl Readahead {
    /// Takes a read of `offset..end` into account: the blocks to read
    /// ahead of it (doubling while access is sequential, up to `max`; 0
    /// means none at all), and whether the read is at random.
    fn advance(&mut self, offset: u64, end: u64, bs: u64, max: u64) -> (u64, bool) {
        // The kernel has several reads in flight and they may arrive out
        // of order: a read near the last one is still sequential.
        let slack = (4 * (end - offset)).max(bs);
        let sequential = offset > 0 && offset.abs_diff(self.next_offset) <= slack;
        self.window_blocks = if sequential {
            (self.window_blocks * 2).clamp(1, max.max(1))
        } else if offset == 0 {
            1
        } else {
            0
        }
        .min(max);
        self.next_offset = if sequential {
            self.next_offset.max(end)
        } else {
            end
        };
        (self.window_blocks, offset > 0 && !sequential)
    }
}

/// Descriptors of a closing process looked at, at most (a process with
/// more open files is taken to hold none of this one).
const FDINFO_SCAN_MAX: usize = 4096;

/// The most one read-ahead GET asks for.
const READAHEAD_RUN_BYTES: u64 = 8 * 1024 * 1024;

/// How long `writeback=async` leaves a closed file before sending it.
const WRITEBACK_DELAY: std::time::Duration = std::time::Duration::from_millis(500);

/// How soon after this mount wrote a file a chmod, chown or utimes of it
/// is deferred and merged with the ones that follow (GIO and rsync set
/// owner, mode and times one after another right after the close).
pub(super) const JUST_WRITTEN: std::time::Duration = std::time::Duration::from_secs(5);

/// How long a deferred change of attributes waits for more before its one
/// self-copy is made.
pub const ATTR_BATCH: std::time::Duration = std::time::Duration::from_secs(1);

/// How often the background task looks for inode table nodes to drop.
const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

/// Files uploaded at once in the background (`writeback=async`, retries).
const PENDING_UPLOADS_IN_FLIGHT: usize = 16;

/// Blocks fetched at once when an object still being read is kept.
const KEEP_CONCURRENCY: usize = 8;

/// Times a read-only open waits for an unlink or rename of its file and
/// opens again (`open`), before ESTALE.
const OPEN_ROUNDS: usize = 4;

/// The shared write state of one inode, behind an async lock that may be
/// held across an upload.
pub type OpenFile = tokio::sync::Mutex<WriteState>;
pub(super) type StateGuard = tokio::sync::OwnedMutexGuard<WriteState>;

use crate::write::state::RETRY_FIRST_WAIT;
pub use crate::write::state::WriteState;

/// A file whose data is not in S3 yet, for `status`.
#[derive(Clone, Debug)]
pub struct PendingFile {
    pub path: String,
    pub size: u64,
    /// (bytes sent, bytes to send) of a running upload.
    pub progress: Option<(u64, u64)>,
    pub last_error: Option<String>,
    /// Seconds until the next background try.
    pub next_try_secs: Option<u64>,
}

/// The changes of a setattr call.
#[derive(Clone, Debug, Default)]
pub struct SetAttr {
    /// The handle of an ftruncate/fchmod..., if any.
    pub fh: Option<u64>,
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SystemTime>,
    pub mtime: Option<SystemTime>,
    /// Clear set-user-ID, and set-group-ID where the group may execute
    /// (`killed_perm`), after applying `mode` if any: a chown, and a write
    /// or truncation by a process without CAP_FSETID (the kernel leaves
    /// this to the filesystem under FUSE_HANDLE_KILLPRIV_V2).
    pub kill_suid: bool,
}

/// `perm` without set-user-ID, and without set-group-ID when the group may
/// execute, as Linux clears them on chown, write and truncate. Without
/// group execute Linux clears set-group-ID only for a caller outside the
/// file's group, which a FUSE request does not tell (supplementary groups):
/// it is kept, and means nothing without group execute.
pub fn killed_perm(perm: u16) -> u16 {
    let mut p = perm & !(libc::S_ISUID as u16);
    if p & (libc::S_ISGID as u16 | 0o010) == libc::S_ISGID as u16 | 0o010 {
        p &= !(libc::S_ISGID as u16);
    }
    p
}

/// Bytes `offset..end` of consecutive blocks `parts` of `bs` bytes, the
/// first starting at `first_start`: a slice of one block, else copied.
fn span_of(parts: &[Bytes], offset: u64, end: u64, first_start: u64, bs: u64) -> Bytes {
    if let [one] = parts {
        let s = (offset - first_start) as usize;
        let e = ((end - first_start) as usize).min(one.len());
        return one.slice(s.min(e)..e);
    }
    let mut out = BytesMut::with_capacity((end - offset) as usize);
    for (i, p) in parts.iter().enumerate() {
        let block_start = first_start + i as u64 * bs;
        let s = offset.saturating_sub(block_start) as usize;
        let e = ((end - block_start) as usize).min(p.len());
        out.extend_from_slice(&p[s.min(e)..e]);
    }
    out.freeze()
}

/// A delete an `rm` deferred (its tombstone), this mount's until done.
pub(super) struct Deferred {
    key: String,
    etag: String,
    /// Locked while its DeleteObject is in flight, so a write at the key
    /// waits for the answer; `None` once done.
    tomb: Arc<tokio::sync::Mutex<Option<Tombstone>>>,
    /// Failed: when the retrier tries again, and why (for `status`).
    failed: Option<(Instant, String)>,
    /// The wait after the last failure; doubles with each one.
    backoff: std::time::Duration,
}

impl Deferred {
    pub(super) fn new(t: Tombstone) -> Deferred {
        Deferred {
            key: t.key.clone(),
            etag: t.etag.clone(),
            tomb: Arc::new(tokio::sync::Mutex::new(Some(t))),
            failed: None,
            backoff: crate::write::state::RETRY_FIRST_WAIT,
        }
    }

    /// Failed with `error`: due again after a wait that starts as a
    /// failed upload's (a second) and doubles up to `deferred_retry`, so
    /// a store that was only slow for a moment sees the delete soon.
    fn failed(&mut self, error: String, cfg: &super::FsConfig) {
        if self.failed.is_some() {
            self.backoff = (self.backoff * 2).min(deferred_retry(cfg));
        }
        let at = Instant::now() + self.backoff.min(deferred_retry(cfg));
        self.failed = Some((at, error));
    }
}

/// Keys in `Fs::deferred` for deletes taken over from a dead mount: no
/// file of this mount has them (inode numbers count up from 1).
static ADOPTED_REMOVALS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(u64::MAX);

/// How long a failed deferred delete waits before the retrier tries it
/// again.
fn deferred_retry(cfg: &super::FsConfig) -> std::time::Duration {
    cfg.upload_retry_max.min(std::time::Duration::from_secs(60))
}

/// The read pin of an object: its version when known, else its ETag.
fn pin_of(o: &ObjectInfo) -> ReadPin {
    match &o.version_id {
        Some(v) if v != "null" => ReadPin::Version(v.clone()),
        _ => ReadPin::Etag(o.etag.clone()),
    }
}

impl Fs {
    pub(super) fn new_handle(&self, h: Handle) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().insert(fh, Arc::new(h));
        fh
    }

    /// The handle open as `fh`, file or directory.
    pub(super) fn handle(&self, fh: u64) -> FsResult<Arc<Handle>> {
        self.handles
            .lock()
            .get(&fh)
            .cloned()
            .ok_or(FsError::BadHandle)
    }

    pub(super) fn file_handle(&self, fh: u64) -> FsResult<Arc<Handle>> {
        let h = self.handle(fh)?;
        match &*h {
            Handle::File(_) => Ok(h),
            Handle::Dir(_) => Err(FsError::IsDir),
        }
    }

    /// Notes that a handle changed its file (so its close uploads).
    pub(super) fn mark_handle_wrote(&self, fh: u64) {
        if let Some(h) = self.handles.lock().get(&fh)
            && let Handle::File(f) = &**h
        {
            f.wrote.store(true, Ordering::Relaxed);
        }
    }

    /// Locks the inode's live write state, if it has one.
    pub(super) async fn live(&self, ino: u64) -> Option<StateGuard> {
        let of = self.writes.lock().get(&ino).cloned()?;
        let st = of.lock_owned().await;
        (!st.closed).then_some(st)
    }

    /// Opens a file. `flags` are open(2)'s.
    ///
    /// A read-only open that comes while an unlink or a rename over the
    /// file is under way (the kernel looked the name up before) may have
    /// registered after that looked for the file's readers to keep their
    /// bytes: its reads would find the object gone. It waits for the
    /// change and opens again: ESTALE once the name is gone (the kernel
    /// looks it up again), the file as it was if the change failed.
    pub async fn open(&self, ino: u64, flags: i32) -> FsResult<u64> {
        let writable = flags & libc::O_ACCMODE != libc::O_RDONLY;
        for _ in 0..OPEN_ROUNDS {
            let fh = self.open_once(ino, flags).await?;
            if writable {
                return Ok(fh);
            }
            let Some((gate, _)) = self.detaching.lock().get(&ino).cloned() else {
                return Ok(fh);
            };
            self.release(fh).await?;
            drop(gate.read().await);
        }
        Err(FsError::Io(libc::ESTALE))
    }

    /// Takes the name from `ino` (an unlink, or a rename over it) while
    /// the guard lives: opens of it meanwhile wait (`open`). Taken before
    /// the caller looks for the file's readers, dropped once the table has
    /// detached it.
    pub(super) async fn detaching(&self, ino: u64) -> Detaching<'_> {
        let gate = {
            let mut m = self.detaching.lock();
            let (gate, holders) = m.entry(ino).or_default();
            *holders += 1;
            gate.clone()
        };
        // Counted from here: dropped while waiting, it counts itself out.
        let mut d = Detaching {
            fs: self,
            ino,
            held: None,
        };
        d.held = Some(gate.write_owned().await);
        d
    }

    async fn open_once(&self, ino: u64, flags: i32) -> FsResult<u64> {
        let writable = flags & libc::O_ACCMODE != libc::O_RDONLY;
        let trunc = flags & libc::O_TRUNC != 0;
        let key = self.node_key(ino)?;
        let attr = self.getattr(ino).await?;
        if attr.kind == FileKind::Dir {
            return Err(FsError::IsDir);
        }
        let target = match &key {
            NodeKey::Version { path, version_id } => {
                if writable {
                    return Err(FsError::ReadOnly);
                }
                let etag = self
                    .table
                    .lock()
                    .get(ino)
                    .and_then(|n| n.object.as_ref().map(|o| o.etag.clone()))
                    .unwrap_or_default();
                Some(ReadTarget {
                    key: self.key_of(path).into(),
                    pin: self.version_pin(path, version_id, &etag).await,
                    etag: etag.into(),
                    size: attr.size,
                    served: false,
                    kept: None,
                })
            }
            NodeKey::Path(path) => {
                if writable && self.read_only() {
                    return Err(FsError::ReadOnly);
                }
                if writable {
                    self.attach_writer(ino, trunc).await?;
                }
                let info = self.table.lock().get(ino).and_then(|n| n.object.clone());
                info.map(|o| ReadTarget {
                    key: self.key_of(path).into(),
                    pin: pin_of(&o),
                    etag: o.etag.as_str().into(),
                    size: o.size,
                    served: false,
                    kept: None,
                })
            }
            // Unlinked between the kernel's lookup and this open (another
            // process won the race): ESTALE makes the kernel look the name
            // up again, and an `O_CREAT` open then creates it anew. An
            // `O_TRUNC` open writes to the unnamed file (`attach_writer`).
            NodeKey::Detached(_) if writable && trunc && !self.read_only() => {
                self.attach_writer(ino, trunc).await?;
                None
            }
            NodeKey::Detached(_) => return Err(FsError::Io(libc::ESTALE)),
            _ => return Err(FsError::IsDir),
        };
        let generation = self.table.lock().get(ino).map_or(0, |n| n.generation);
        Ok(self.new_handle(Handle::File(FileHandle {
            ino,
            writable,
            // An O_TRUNC open that writes nothing is uploaded by the last
            // release, not by each close: `echo x > f` closes a duplicate
            // of its descriptor before writing, and that close sends
            // nothing (one PUT per file, no empty version).
            wrote: Default::default(),
            made: (writable && trunc).into(),
            opener: Default::default(),
            last_writer: Default::default(),
            target: Mutex::new(target),
            generation: generation.into(),
            readahead: Mutex::new(Readahead::default()),
        })))
    }

    /// Joins (or starts) the inode's write state.
    async fn attach_writer(&self, ino: u64, trunc: bool) -> FsResult<()> {
        // Repeats only when it races with a last writer leaving.
        for _ in 0..100 {
            let _ns = self.ns.read().await;
            if let Some(mut st) = self.live(ino).await {
                st.handles += 1;
                if st.last_error.is_some() {
                    // Reopened while its upload is pending: try it now.
                    st.next_try = Some(std::time::Instant::now());
                    self.retry_wake.notify_one();
                }
                if trunc {
                    self.set_dirty(ino, &mut st)?;
                    st.staged.truncate(0)?;
                    self.note_size(ino, 0);
                }
                return Ok(());
            }
            let found = {
                let t = self.table.lock();
                let n = t.get(ino).ok_or(FsError::NotFound)?;
                n.path()
                    .map(|p| (n.object.clone(), p.to_string(), n.generation))
            };
            let Some((object, path, generation)) = found else {
                // Unlinked or replaced since the kernel's lookup. Any open
                // but `O_TRUNC` is ESTALE: the kernel looks the name up
                // again, once. An `O_TRUNC` open is served as if it came
                // first: it emptied the file, which then lost its name, so
                // it writes to an unnamed file that is never uploaded (a
                // second lost race in a row would otherwise reach the
                // caller as ESTALE).
                if !trunc {
                    return Err(FsError::Io(libc::ESTALE));
                }
                let mut staged = self.staged_new(None, None)?;
                self.abort_leftover(staged.discard());
                if let std::collections::hash_map::Entry::Vacant(v) = self.writes.lock().entry(ino)
                {
                    v.insert(Arc::new(tokio::sync::Mutex::new(WriteState::new(
                        staged, false,
                    ))));
                    self.note_size(ino, 0);
                    return Ok(());
                }
                continue;
            };
            let replaces = object.as_ref().map(|o| o.etag.clone());
            let base = object.filter(|_| !trunc).map(|o| Base {
                key: self.key_of(&path),
                etag: o.etag,
                size: o.size,
                version: o.version_id,
            });
            let mut staged = self.staged_new(base, replaces)?;
            if trunc {
                let (key, meta) = self.journal_header(ino)?;
                staged.begin_journal(&key, &meta)?;
            }
            let lost = match self.writes.lock().entry(ino) {
                std::collections::hash_map::Entry::Occupied(_) => Some(staged),
                std::collections::hash_map::Entry::Vacant(v) => {
                    let mut st = WriteState::new(staged, trunc);
                    st.generation = generation;
                    v.insert(Arc::new(tokio::sync::Mutex::new(st)));
                    None
                }
            };
            let Some(mut unused) = lost else {
                if trunc {
                    self.note_size(ino, 0);
                }
                drop(_ns);
                self.discard_writer_if_nameless(ino).await;
                return Ok(());
            };
            // Another open of the file started its write state first (two
            // `O_TRUNC` opens at once): this copy was never written, so its
            // journal goes with it. Kept, it named the object's ETag as
            // the one it replaced, and the next mount "recovered" the
            // empty copy over the file.
            unused.end_journal();
        }
        Err(FsError::Io(libc::EBUSY))
    }

    /// Starts the write state of a file created by this mount.
    pub(super) fn start_new_file(&self, ino: u64) -> FsResult<()> {
        let mut staged = self.staged_new(None, None)?;
        let (key, meta) = self.journal_header(ino)?;
        staged.begin_journal(&key, &meta)?;
        self.writes.lock().insert(
            ino,
            Arc::new(tokio::sync::Mutex::new(WriteState::new(staged, true))),
        );
        Ok(())
    }

    /// A new staging file; a full cache disk first gives up cached blocks.
    fn staged_new(&self, base: Option<Base>, replaces: Option<String>) -> FsResult<Staged> {
        let mut staged = match Staged::new(&self.cfg.staging_dir, base.clone(), replaces.clone()) {
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                self.blocks.free_disk(u64::MAX);
                Staged::new(&self.cfg.staging_dir, base, replaces)?
            }
            r => r?,
        };
        staged.set_written_with(self.cfg.written_with.clone());
        Ok(staged)
    }

    /// Writes to the staged copy; on a full cache disk, cached read blocks
    /// are given up to make room (staged data comes first), then it fails
    /// with ENOSPC only if the data itself cannot fit.
    fn staged_write(&self, st: &mut WriteState, offset: u64, data: &[u8]) -> FsResult<usize> {
        match st.staged.write(offset, data) {
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                self.blocks.free_disk(u64::MAX);
                Ok(st.staged.write(offset, data)?)
            }
            r => Ok(r?),
        }
    }

    /// The key and metadata a journal starts with.
    fn journal_header(&self, ino: u64) -> FsResult<(String, crate::store::Metadata)> {
        let t = self.table.lock();
        let n = t.get(ino).ok_or(FsError::NotFound)?;
        Ok((
            self.key_of(n.path().unwrap_or_default()),
            n.attr.to_metadata(),
        ))
    }

    /// Marks a file's data as differing from S3, journaling from now on so
    /// a killed daemon's next mount can finish the upload.
    pub(super) fn set_dirty(&self, ino: u64, st: &mut WriteState) -> FsResult<()> {
        if st.staged.is_unlinked() || self.discard_if_nameless(ino, st) {
            return Ok(());
        }
        if !st.dirty || !st.staged.journaling() {
            let (key, meta) = self.journal_header(ino)?;
            st.staged.begin_journal(&key, &meta)?;
        }
        st.dirty = true;
        Ok(())
    }

    /// The uploads a discarded file left open are aborted now, in the
    /// background (a kill meanwhile leaves them to the next mount).
    pub(super) fn abort_leftover(&self, left: Option<crate::write::Leftover>) {
        if let Some(l) = left {
            l.abort_in_background(self.store.clone());
        }
    }

    /// The file lost its name (unlinked, or replaced by a rename) while
    /// this state was not there for the unlink to discard: its open raced
    /// the unlink's DeleteObject. Its data is discarded as the unlink would
    /// have, so no journal outlives its last close.
    fn discard_if_nameless(&self, ino: u64, st: &mut WriteState) -> bool {
        let nameless = {
            let t = self.table.lock();
            !t.get(ino)
                .is_some_and(|n| matches!(n.key, NodeKey::Path(_)) && t.find(&n.key) == Some(ino))
        };
        if nameless && !st.staged.is_unlinked() {
            self.abort_leftover(st.discard());
        }
        nameless
    }

    /// Discards `ino`'s write state if the file has no name any more. An
    /// unlink or a rename over the file calls it once the table has
    /// detached it: an `O_TRUNC` open that came while its DeleteObject or
    /// CopyObject was in flight started a state the unlink or rename did
    /// not find. A new state (an open, a create) calls it once it is in:
    /// the unlink or rename, on another thread, may have looked before.
    /// Either way the state goes as it would have with the unlink; left to
    /// its first write or close, it was journaled as a rewrite of a name
    /// the file no longer has, and a crash before then had the next mount
    /// recover it beside (or over) the file now at that name. A file that
    /// moved to another name meanwhile keeps its state.
    pub(super) async fn discard_writer_if_nameless(&self, ino: u64) {
        if let Some(mut st) = self.live(ino).await {
            self.discard_if_nameless(ino, &mut st);
        }
    }

    fn note_size(&self, ino: u64, size: u64) {
        if let Some(n) = self.table.lock().get_mut(ino) {
            n.attr.size = size;
            n.attr.mtime = SystemTime::now();
            n.attr.ctime = n.attr.mtime;
        }
    }

    pub async fn read(&self, fh: u64, offset: u64, size: u32) -> FsResult<Bytes> {
        let h = self.file_handle(fh)?;
        let Handle::File(fhd) = &*h else {
            unreachable!()
        };
        if let Some(mut st) = self.live(fhd.ino).await {
            return Ok(st
                .staged
                .read(&*self.store, offset, u64::from(size))
                .await?);
        }
        self.follow_own_changes(fhd);
        match self.read_object(fhd, offset, u64::from(size)).await {
            Err(FsError::Stale) if !fhd.target.lock().as_ref().is_some_and(|t| t.served) => {
                // The object changed between lookup and the first read:
                // pin the current one and read that.
                let ino = fhd.ino;
                if let Some(n) = self.table.lock().get_mut(ino) {
                    n.fresh_until = Some(std::time::Instant::now());
                }
                self.getattr(ino).await?;
                let info = self.table.lock().get(ino).and_then(|n| n.object.clone());
                if let (Some(o), Some(t)) = (info, fhd.target.lock().as_mut()) {
                    t.pin = pin_of(&o);
                    t.etag = o.etag.as_str().into();
                    t.size = o.size;
                }
                self.read_object(fhd, offset, u64::from(size)).await
            }
            other => other,
        }
    }

    /// Records a copy this mount made of an inode's object that kept its
    /// bytes (a rename, a metadata self-copy): the table's object and the
    /// inode's generation follow it (so readers re-pin), and so does its
    /// write state, which the caller holds locked.
    pub(super) fn own_copy(
        &self,
        ino: u64,
        st: Option<&mut WriteState>,
        key: &str,
        put: &crate::store::PutResult,
        meta: Option<&crate::store::Metadata>,
    ) {
        let fresh = self.fresh_until();
        let mut t = self.table.lock();
        let Some(n) = t.get_mut(ino) else { return };
        if let Some(o) = n.object.as_mut() {
            o.key = key.to_string();
            o.etag = put.etag.clone();
            o.version_id = put.version_id.clone();
            // As the store's copy: the new keys over the object's own.
            if let Some(m) = meta {
                o.metadata
                    .get_or_insert_default()
                    .extend(m.iter().map(|(k, v)| (k.clone(), v.clone())));
                n.fresh_until = fresh;
            }
        }
        n.generation += 1;
        if let Some(st) = st {
            st.object_moved(key, put, meta);
            st.generation = n.generation;
        }
    }

    /// A reader follows the changes this mount made to its inode's object
    /// (an upload, a rename, a metadata copy) since it took its target.
    fn follow_own_changes(&self, fhd: &FileHandle) {
        let (generation, object, path) = {
            let t = self.table.lock();
            let Some(n) = t.get(fhd.ino) else { return };
            (n.generation, n.object.clone(), n.path().map(str::to_string))
        };
        if generation == fhd.generation.load(Ordering::Relaxed)
            || fhd.target.lock().as_ref().is_some_and(|t| t.kept.is_some())
        {
            return;
        }
        let (Some(o), Some(path)) = (object, path) else {
            return;
        };
        *fhd.target.lock() = Some(ReadTarget {
            key: self.key_of(&path).into(),
            pin: pin_of(&o),
            etag: o.etag.as_str().into(),
            size: o.size,
            served: false,
            kept: None,
        });
        fhd.generation.store(generation, Ordering::Relaxed);
    }

    /// Reads from the pinned object through the block cache, and starts
    /// read-ahead when access is sequential.
    async fn read_object(&self, fhd: &FileHandle, offset: u64, len: u64) -> FsResult<Bytes> {
        let Some(target) = fhd.target.lock().clone() else {
            return Ok(Bytes::new());
        };
        let bs = self.blocks.block_size();
        let Some((end, first, last)) = target.span(offset, len, bs) else {
            return Ok(Bytes::new());
        };
        if let Some(file) = &target.kept {
            let mut buf = vec![0u8; (end - offset) as usize];
            file.read_exact_at(&mut buf, offset)?;
            return Ok(buf.into());
        }
        let (window, random) =
            fhd.readahead
                .lock()
                .advance(offset, end, bs, self.cfg.readahead_max_blocks);
        if random {
            // Read at random: fetch what is asked for (rounded out to a
            // small chunk), not whole blocks and read-ahead.
            let object = target.block(0);
            let data = self
                .blocks
                .get_small(&*self.store, &object, offset..end, &target.pin, target.size)
                .await?;
            fhd.served();
            return Ok(data);
        }
        self.read_ahead(&target, last, window);
        let parts = futures::future::try_join_all((first..=last).map(|index| {
            let bk = target.block(index);
            let (blocks, store, pin) = (&self.blocks, &*self.store, &target.pin);
            async move { blocks.get(store, &bk, pin, target.size).await }
        }))
        .await?;
        fhd.served();
        Ok(span_of(&parts, offset, end, first * bs, bs))
    }

    /// `read` when every block it needs is in memory and the handle reads
    /// an object (no write state): answered on the FUSE thread, without a
    /// task (read-ahead it starts goes to the runtime the caller entered).
    /// `None`: ask `read`.
    pub fn read_now(&self, fh: u64, offset: u64, size: u32) -> Option<FsResult<Bytes>> {
        let h = self.file_handle(fh).ok()?;
        let Handle::File(fhd) = &*h else { return None };
        if self.writes.lock().contains_key(&fhd.ino) {
            return None;
        }
        self.follow_own_changes(fhd);
        let target = fhd.target.lock().clone()?;
        let bs = self.blocks.block_size();
        let (end, first, last) = target.span(offset, u64::from(size), bs)?;
        if target.kept.is_some() {
            return None;
        }
        let parts = (first..=last)
            .map(|index| self.blocks.get_cached(&target.block(index)))
            .collect::<Option<Vec<Bytes>>>()?;
        let (window, _) =
            fhd.readahead
                .lock()
                .advance(offset, end, bs, self.cfg.readahead_max_blocks);
        self.read_ahead(&target, last, window);
        fhd.served();
        Some(Ok(span_of(&parts, offset, end, first * bs, bs)))
    }

    /// Starts read-ahead of `window` blocks past block `last`, in runs of
    /// blocks aligned to the run size, one GET each: the window slides a
    /// little with every read, and the first read to reach into a run asks
    /// for all of it at once (not one GET per block as each block enters
    /// the window).
    fn read_ahead(&self, target: &ReadTarget, last: u64, window: u64) {
        let bs = self.blocks.block_size();
        let last_block = (target.size - 1) / bs;
        let run = (READAHEAD_RUN_BYTES / bs).max(1);
        if window == 0 || last >= last_block {
            return;
        }
        let ahead_last = (last + window).min(last_block);
        let mut start = (last + 1) / run * run;
        while start <= ahead_last {
            let bk = target.block(start.max(last + 1));
            let count = start + run - bk.index;
            start += run;
            if self.blocks.contains(&target.block(bk.index + count - 1)) {
                continue;
            }
            let (store, blocks, size) = (self.store.clone(), self.blocks.clone(), target.size);
            let pin = target.pin.clone();
            tokio::spawn(async move {
                blocks.fetch_run(&*store, &bk, count, &pin, size).await;
            });
        }
    }

    /// `write` when it needs neither a request nor a wait: the file's write
    /// state is free, already dirty (no old bytes to read first), and this
    /// write starts no part upload. It is then a write to the staged file
    /// and its journal (local disk), answered on the FUSE thread: a task
    /// per small write cost more than the write. `None`: ask `write`.
    pub fn write_now(&self, fh: u64, offset: u64, data: &[u8]) -> Option<FsResult<u32>> {
        let h = self.file_handle(fh).ok()?;
        let Handle::File(fhd) = &*h else { return None };
        if !fhd.writable {
            return None;
        }
        let of = self.writes.lock().get(&fhd.ino).cloned()?;
        let mut st = of.try_lock_owned().ok()?;
        let size_after = st.staged.size().max(offset + data.len() as u64);
        if st.closed
            || !st.dirty
            || st.staged.is_unlinked()
            || !st.staged.journaling()
            || st.staged.stream_due_at(&self.cfg.upload, size_after)
        {
            return None;
        }
        Some(self.staged_write(&mut st, offset, data).map(|n| {
            fhd.wrote.store(true, Ordering::Relaxed);
            self.note_size(fhd.ino, st.staged.size());
            n as u32
        }))
    }

    pub async fn write(&self, fh: u64, offset: u64, data: &[u8]) -> FsResult<u32> {
        let h = self.file_handle(fh)?;
        let Handle::File(fhd) = &*h else {
            unreachable!()
        };
        if !fhd.writable {
            return Err(FsError::BadHandle);
        }
        let mut st = self.live(fhd.ino).await.ok_or(FsError::BadHandle)?;
        if !st.dirty && !st.staged.is_unlinked() {
            // Best effort: a base that is gone already is found at upload.
            let single = crate::write::part_size(st.staged.size(), self.cfg.upload.part_size_bytes);
            if let Err(e) = st.staged.secure_small_base(&*self.store, single).await {
                tracing::debug!(ino = fhd.ino, error = %e, "could not read the old bytes ahead");
            }
        }
        self.set_dirty(fhd.ino, &mut st)?;
        let written = self.staged_write(&mut st, offset, data)?;
        if st.staged.stream_due(&self.cfg.upload) {
            let (key, own) = self.journal_header(fhd.ino)?;
            let object = self
                .table
                .lock()
                .get(fhd.ino)
                .and_then(|n| n.object.clone());
            let (meta, keep) = self
                .kept_over(&key, object.as_ref(), st.staged.replaces(), own)
                .await;
            st.staged
                .stream(&self.store, &key, &meta, keep.as_ref(), &self.cfg.upload)
                .await;
        }
        fhd.wrote.store(true, Ordering::Relaxed);
        self.note_size(fhd.ino, st.staged.size());
        Ok(written as u32)
    }

    /// Uploads the inode's dirty data, if any. The error is the upload's.
    pub(super) async fn upload_if_dirty(&self, ino: u64, st: &mut WriteState) -> FsResult<()> {
        self.outside_sync(ino, st)?;
        if !st.dirty || st.staged.is_unlinked() || self.discard_if_nameless(ino, st) {
            return Ok(());
        }
        let (path, attr, generation, object) = {
            let t = self.table.lock();
            let n = t.get(ino).ok_or(FsError::NotFound)?;
            // The state follows renames: the key is the inode's path now.
            let Some(p) = n.path() else {
                return Ok(());
            };
            (
                p.to_string(),
                n.attr.clone(),
                n.generation,
                n.object.clone(),
            )
        };
        // This mount changed the object since the state last looked (a
        // metadata self-copy that raced this state's first open): same
        // bytes, a new identity to build on.
        if generation != st.generation
            && let Some(o) = &object
        {
            st.object_moved(
                &o.key,
                &crate::store::PutResult {
                    etag: o.etag.clone(),
                    version_id: o.version_id.clone(),
                    sent_crc32c: None,
                },
                None,
            );
            st.generation = generation;
        }
        let key = self.key_of(&path);
        let (meta, keep) = self
            .kept_over(
                &key,
                object.as_ref(),
                st.staged.replaces(),
                attr.to_metadata(),
            )
            .await;
        let progress = Arc::new(Progress::default());
        self.uploads.lock().insert(ino, progress.clone());
        let put = st
            .staged
            .upload(
                &*self.store,
                &key,
                &meta,
                keep.as_ref(),
                &self.cfg.upload,
                &progress,
            )
            .await;
        self.uploads.lock().remove(&ino);
        let put = match put {
            Ok(p) => p,
            Err(e) => {
                let e = FsError::from(e);
                if e == FsError::Stale && !st.staged.base_readable_elsewhere() {
                    // Another client replaced the object this file is an
                    // edit of, and its untouched bytes are gone (no
                    // version to read them by): retrying cannot help. The
                    // edit lands once, beside the key, like a recovery.
                    return self.land_beside(ino, st, &key, &meta).await;
                }
                st.last_error = Some(e.to_string());
                return Err(e);
            }
        };
        st.landed(&key, &put);
        self.versions.forget(&path);
        let sent = keep.unwrap_or_else(|| crate::store::ObjectHeaders {
            content_type: crate::store::content_type_for(&key),
            ..Default::default()
        });
        let info = ObjectInfo {
            key,
            size: st.staged.size(),
            etag: put.etag,
            last_modified: SystemTime::now(),
            version_id: put.version_id,
            storage_class: None,
            metadata: Some(meta),
            // What the next overwrite keeps: what this one sent.
            headers: Some(Box::new(sent)),
        };
        let fresh = self.fresh_until();
        if let Some(n) = self.table.lock().get_mut(ino) {
            n.object = Some(info);
            n.fresh_until = fresh;
            n.generation += 1;
            n.landed = Some(std::time::Instant::now());
            st.generation = n.generation;
        }
        Ok(())
    }

    /// Whether an upload of this mount landed on the file within
    /// `JUST_WRITTEN`, and nothing holds its write state now.
    pub(super) fn just_written(&self, ino: u64) -> bool {
        let recent = self.table.lock().get(ino).is_some_and(|n| {
            n.object.is_some() && n.landed.is_some_and(|t| t.elapsed() < JUST_WRITTEN)
        });
        recent && !self.has_write_state(ino)
    }

    /// Defers storing `meta` on a file this mount just wrote: a write state
    /// holding only the new metadata, journaled at once (so a kill loses
    /// nothing: the next mount copies it on), is stored by one self-copy
    /// `ATTR_BATCH` later; changes meanwhile join it (`store_change`), and
    /// rename, unlink, a writer, fsync and unmount take it as they take
    /// any write state. False when a write state appeared meanwhile: the
    /// caller stores the change itself then.
    pub(super) async fn defer_meta(
        &self,
        ino: u64,
        meta: &crate::store::Metadata,
    ) -> FsResult<bool> {
        let _ns = self.ns.read().await;
        let (object, path, generation) = {
            let t = self.table.lock();
            let n = t.get(ino).ok_or(FsError::NotFound)?;
            (
                n.object.clone(),
                n.path().unwrap_or_default().to_string(),
                n.generation,
            )
        };
        let Some(o) = object else { return Ok(false) };
        let key = self.key_of(&path);
        let base = Base {
            key: key.clone(),
            etag: o.etag.clone(),
            size: o.size,
            version: o.version_id,
        };
        let mut staged = self.staged_new(Some(base), Some(o.etag))?;
        staged.begin_journal(&key, meta)?;
        staged.set_meta(meta)?;
        let mut st = WriteState::new(staged, true);
        st.handles = 0;
        st.generation = generation;
        st.next_try = Some(std::time::Instant::now() + ATTR_BATCH);
        match self.writes.lock().entry(ino) {
            std::collections::hash_map::Entry::Occupied(_) => {
                st.staged.end_journal();
                return Ok(false);
            }
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(Arc::new(tokio::sync::Mutex::new(st)));
            }
        }
        self.retry_wake.notify_one();
        Ok(true)
    }

    /// The metadata and headers of an upload to `key`: the file's own
    /// metadata (`own`) over the user metadata the mount does not own of
    /// the object it replaces, and that object's headers to keep.
    async fn kept_over(
        &self,
        key: &str,
        known: Option<&ObjectInfo>,
        replaces: Option<&str>,
        own: crate::store::Metadata,
    ) -> (crate::store::Metadata, Option<crate::store::ObjectHeaders>) {
        let replaced = self.replaced_object(key, known, replaces).await;
        let mut meta = replaced
            .as_ref()
            .and_then(|o| o.metadata.clone())
            .unwrap_or_default();
        // Every key the mount owns is its own to set or leave out: an
        // extended attribute or ACL removed since must not come back from
        // the object replaced.
        meta.retain(|k, _| !crate::store::OWNED_METADATA.contains(&k.as_str()));
        meta.extend(own);
        (meta, replaced.and_then(|o| o.headers.map(|h| *h)))
    }

    /// The object an upload to `key` replaces, with its headers and user
    /// metadata: the inode's own when it was read by a HEAD of that very
    /// object (same ETag), else one HEAD. None for a new key, or when the
    /// key now holds something else.
    async fn replaced_object(
        &self,
        key: &str,
        known: Option<&ObjectInfo>,
        replaces: Option<&str>,
    ) -> Option<ObjectInfo> {
        let etag = replaces?;
        if let Some(o) = known.filter(|o| {
            o.key == key && o.etag == etag && o.headers.is_some() && o.metadata.is_some()
        }) {
            return Some(o.clone());
        }
        match self.store.head(key, None).await {
            Ok(o) if o.etag == etag => Some(o),
            _ => None,
        }
    }

    /// Uploads an edit whose base another client replaced (and whose
    /// untouched ranges cannot be read any more) as
    /// `KEY.bucketfs-recovered-<time>`: what was written, zeros where the
    /// old object's bytes were never read. The key keeps the other
    /// client's object, which this inode shows from then on.
    async fn land_beside(
        &self,
        ino: u64,
        st: &mut WriteState,
        key: &str,
        meta: &crate::store::Metadata,
    ) -> FsResult<()> {
        let beside = crate::write::beside_name(key);
        st.staged.forget_base();
        let progress = Progress::default();
        let put = st
            .staged
            .upload(
                &*self.store,
                &beside,
                meta,
                None,
                &self.cfg.upload,
                &progress,
            )
            .await;
        let put = match put {
            Ok(p) => p,
            Err(e) => {
                let e = FsError::from(e);
                st.last_error = Some(e.to_string());
                return Err(e);
            }
        };
        error!(ino, key, uploaded_as = %beside,
            "another client replaced the object while it was being edited and its old bytes cannot be read: the edit was kept beside it (zeros where old bytes were never read)");
        st.landed(&beside, &put);
        if let Some(n) = self.table.lock().get_mut(ino) {
            // Show what is at the key now.
            n.object = None;
            n.fresh_until = Some(std::time::Instant::now());
            n.generation += 1;
            st.generation = n.generation;
        }
        Ok(())
    }

    /// `close()` of a descriptor that wrote: upload what is dirty. The
    /// last release uploads whatever no flush did.
    pub async fn flush(&self, fh: u64) -> FsResult<()> {
        self.flush_from(fh, None, None).await
    }

    /// Records which thread writes through a handle (before the write).
    pub fn note_writer(&self, fh: u64, pid: u32) {
        if let Ok(h) = self.file_handle(fh)
            && let Handle::File(f) = &*h
        {
            f.last_writer.store(pid, Ordering::Relaxed);
        }
    }

    /// The thread that wrote through a handle last.
    pub fn last_writer(&self, fh: u64) -> Option<u32> {
        match &*self.file_handle(fh).ok()? {
            Handle::File(f) => Some(f.last_writer.load(Ordering::Relaxed)).filter(|p| *p != 0),
            Handle::Dir(_) => None,
        }
    }

    /// Records which process opened a handle (its thread group id).
    pub fn set_opener(&self, fh: u64, tgid: u32) {
        if let Ok(h) = self.file_handle(fh)
            && let Handle::File(f) = &*h
        {
            f.opener.store(tgid, Ordering::Relaxed);
        }
    }

    /// `close()` from process `tgid`. A close by another process than the
    /// opener is a forked child dropping its inherited copy (at exec, say):
    /// it uploads nothing, so a fork never sends a half-written file.
    pub async fn flush_from(
        &self,
        fh: u64,
        tgid: Option<u32>,
        writer_tgid: Option<u32>,
    ) -> FsResult<()> {
        let h = self.file_handle(fh)?;
        let Handle::File(fhd) = &*h else {
            unreachable!()
        };
        let opener = fhd.opener.load(Ordering::Relaxed);
        // Writes the kernel sent to the staged file itself (passthrough):
        // told by its stamp, not by whom.
        let mut outside_wrote = false;
        if fhd.writable
            && self.is_outside(fhd.ino)
            && let Some(mut st) = self.live(fhd.ino).await
        {
            outside_wrote = self.outside_sync(fhd.ino, &mut st)?;
        }
        // Another process than the opener (a forked child) uploads only
        // what it wrote itself: a child that merely execs sends nothing,
        // one that wrote after its parent closed waits for S3 like any
        // writer's close (under passthrough: one that closes after writes
        // it may have made).
        if let Some(t) = tgid
            && opener != 0
            && t != opener
            && writer_tgid != Some(t)
            && !outside_wrote
        {
            tracing::debug!(
                tgid = t,
                opener,
                "close by another process: nothing uploaded"
            );
            return Ok(());
        }
        // A descriptor that wrote nothing uploads nothing, unless its open
        // created or truncated the file and the closing process holds no
        // other descriptor of it: a shell's `echo x > f` closes the
        // original after dup2, before writing, and that close sends
        // nothing (one PUT per file); `: > f` or a plain create-and-close
        // lands at its close, as any write does. What no close sent, the
        // last release does.
        let wrote = fhd.wrote.swap(false, Ordering::Relaxed) || outside_wrote;
        let made = !wrote
            && fhd.writable
            && fhd.made.load(Ordering::Relaxed)
            && !tgid.is_some_and(|t| self.caller_holds_another(t, fhd.ino));
        if wrote || made {
            fhd.made.store(false, Ordering::Relaxed);
            if self.cfg.writeback_async {
                // Staged and journaled is enough: the last release hands
                // it to the background uploader.
                return Ok(());
            }
            return self.upload_now(fhd.ino).await;
        }
        Ok(())
    }

    /// Whether process `tgid` still has a descriptor open on inode `ino`
    /// of this mount (read from /proc/TGID/fdinfo: `mnt_id` and `ino`).
    /// False when that cannot be told (another mount namespace, /proc not
    /// readable): the close then uploads, as a last close would.
    fn caller_holds_another(&self, tgid: u32, ino: u64) -> bool {
        let mount_id = self.mount_id.load(Ordering::Relaxed);
        if mount_id == 0 {
            return false;
        }
        let Ok(fds) = std::fs::read_dir(format!("/proc/{tgid}/fdinfo")) else {
            return false;
        };
        fds.flatten().take(FDINFO_SCAN_MAX).any(|e| {
            let Ok(info) = std::fs::read_to_string(e.path()) else {
                return false;
            };
            let field = |name: &str| {
                info.lines()
                    .find_map(|l| l.strip_prefix(name))
                    .and_then(|v| v.trim().parse::<u64>().ok())
            };
            field("mnt_id:") == Some(mount_id) && field("ino:") == Some(ino)
        })
    }

    /// fsync: upload what is dirty, whoever wrote it.
    pub async fn fsync(&self, fh: u64) -> FsResult<()> {
        let h = self.file_handle(fh)?;
        let Handle::File(fhd) = &*h else {
            unreachable!()
        };
        self.upload_now(fhd.ino).await
    }

    async fn upload_now(&self, ino: u64) -> FsResult<()> {
        if let Some(mut st) = self.live(ino).await {
            let r = self.upload_if_dirty(ino, &mut st).await;
            if let Err(e) = &r {
                warn!(ino, path = %st.staged.path().display(), error = %e,
                    "upload failed; the data is kept there and retried");
            }
            self.end_if_idle(ino, &mut st);
            return r;
        }
        Ok(())
    }

    /// Stores now a deferred change of attributes of the file at `path`
    /// (`defer_meta`), if one waits.
    pub(super) async fn settle_attrs(&self, path: &str) {
        let ino = self.table.lock().find(&NodeKey::Path(path.to_string()));
        let Some(ino) = ino else { return };
        let Some(mut st) = self.live(ino).await else {
            return;
        };
        if st.dirty && st.handles == 0 && st.staged.meta_only() {
            if let Err(e) = self.upload_if_dirty(ino, &mut st).await {
                tracing::debug!(ino, error = %e, "a deferred change of attributes is not stored yet");
            }
            self.end_if_idle(ino, &mut st);
        }
    }

    /// Ends a write state nobody needs any more: no writer holds it and
    /// its data is in S3 (an fsync, a rename or a deferred change of
    /// attributes stored it). Left standing, it would keep showing the
    /// staged copy over what another client writes next, until the
    /// background pass came by.
    pub(super) fn end_if_idle(&self, ino: u64, st: &mut WriteState) {
        if st.handles == 0
            && !st.dirty
            && !st.closed
            && !st.staged.is_unlinked()
            && st.staged.outside().is_none()
        {
            st.closed = true;
            self.writes.lock().remove(&ino);
        }
    }

    /// The last reference to a handle is gone.
    pub async fn release(&self, fh: u64) -> FsResult<()> {
        let h = self.handles.lock().remove(&fh).ok_or(FsError::BadHandle)?;
        let Handle::File(fhd) = &*h else {
            return Ok(());
        };
        if fhd.writable {
            self.detach_writer(fhd.ino).await?;
        }
        self.end_unlinked_state(fhd.ino).await;
        self.complete_deferred(fhd.ino).await;
        Ok(())
    }

    /// Whether any file handle is open on the inode.
    fn file_handles_open(&self, ino: u64) -> bool {
        self.handles
            .lock()
            .values()
            .any(|h| matches!(&**h, Handle::File(f) if f.ino == ino))
    }

    /// An unlinked file's staged copy is its only data: it stays while any
    /// handle, reader or writer, is open on it (POSIX: an unlinked file
    /// lives until its last close), and goes with the last one.
    async fn end_unlinked_state(&self, ino: u64) {
        if self.file_handles_open(ino) {
            return;
        }
        if let Some(mut st) = self.live(ino).await
            && st.handles == 0
            && st.staged.is_unlinked()
        {
            st.closed = true;
            self.writes.lock().remove(&ino);
            self.outside.lock().remove(&ino);
        }
    }

    /// Whether handles read the inode's object pinned by ETag (a deleted
    /// object is gone for them; a version id would still read).
    pub(super) fn has_etag_pinned_readers(&self, ino: u64) -> bool {
        let open: Vec<Arc<Handle>> = self.handles.lock().values().cloned().collect();
        open.iter().any(|h| match &**h {
            Handle::File(f) if f.ino == ino => {
                // A handle that has not read since this mount uploaded the
                // file reads that upload next: judge by it.
                self.follow_own_changes(f);
                f.target
                    .lock()
                    .as_ref()
                    .is_some_and(|t| t.kept.is_none() && matches!(t.pin, ReadPin::Etag(_)))
            }
            _ => false,
        })
    }

    /// The DeleteObject an `rm` deferred, once no handle reads the file.
    /// Failed, it stays this mount's (the name stays hidden) and is tried
    /// again by the retrier, or first by a write at the key.
    pub(super) async fn complete_deferred(&self, ino: u64) {
        if self.file_handles_open(ino) {
            return;
        }
        let _ = self.finish_deferred(ino).await;
    }

    /// Deferred deletes of `key`, or of the keys below it when it ends with
    /// `/`, done now: something is about to be written there, or the
    /// directory goes (rmdir, rename). Their readers keep their bytes.
    /// One in flight (a last reader's close, the retrier) is waited for.
    /// A delete that fails fails the caller, which then writes nothing: a
    /// tombstone left behind a file written at its key cannot tell that
    /// file from the one removed (the same bytes within the same second),
    /// and a next mount would delete it.
    pub(super) async fn settle_deferred(&self, key: &str) -> FsResult<()> {
        let inos: Vec<u64> = self
            .deferred
            .lock()
            .iter()
            .filter(|(_, d)| d.key == key || (key.ends_with('/') && d.key.starts_with(key)))
            .map(|(i, _)| *i)
            .collect();
        for i in inos {
            self.keep_for_readers(i).await;
            self.finish_deferred(i).await?;
        }
        Ok(())
    }

    /// Sends `ino`'s deferred DeleteObject (once: callers meanwhile wait
    /// for its answer). Done, it is forgotten; failed, it is kept and due
    /// again later.
    async fn finish_deferred(&self, ino: u64) -> Result<(), crate::store::StoreError> {
        let Some(cell) = self.deferred.lock().get(&ino).map(|d| d.tomb.clone()) else {
            return Ok(());
        };
        let mut tomb = cell.lock().await;
        let Some(t) = tomb.take() else {
            return Ok(()); // done by whoever held it before
        };
        let out = match t.complete(&*self.store).await {
            Ok(()) => Ok(()),
            Err((e, t)) => {
                *tomb = Some(t);
                Err(e)
            }
        };
        let mut m = self.deferred.lock();
        if let Some(d) = m.get_mut(&ino).filter(|d| Arc::ptr_eq(&d.tomb, &cell)) {
            match &out {
                Ok(()) => {
                    m.remove(&ino);
                }
                Err(e) => {
                    warn!(key = %d.key, error = %e, "deferred delete failed; kept to try again");
                    d.failed(e.to_string(), &self.cfg);
                    // The retrier sleeps until what it knew was due.
                    self.retry_wake.notify_one();
                }
            }
        }
        out
    }

    /// Keys of deferred deletes that failed and wait for the retrier
    /// (for `status`), with their last error.
    pub fn failed_deletes(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = self
            .deferred
            .lock()
            .values()
            .filter_map(|d| Some((d.key.clone(), d.failed.as_ref()?.1.clone())))
            .collect();
        out.sort();
        out
    }

    /// Deferred deletes that failed once no reader was left, tried again
    /// when due; returns when the next one is.
    async fn retry_deferred(&self) -> Option<Instant> {
        let now = Instant::now();
        let mut next = None;
        let waiting: Vec<(u64, Instant)> = self
            .deferred
            .lock()
            .iter()
            .filter_map(|(i, d)| Some((*i, d.failed.as_ref()?.0)))
            .collect();
        for (ino, at) in waiting {
            if at > now {
                next = Some(next.map_or(at, |n: Instant| n.min(at)));
            } else if !self.file_handles_open(ino) && self.finish_deferred(ino).await.is_err() {
                let again = self
                    .deferred
                    .lock()
                    .get(&ino)
                    .and_then(|d| Some(d.failed.as_ref()?.0));
                let again = again.unwrap_or_else(|| now + deferred_retry(&self.cfg));
                next = Some(next.map_or(again, |n: Instant| n.min(again)));
            }
        }
        next
    }

    /// Before this mount deletes or overwrites the object that handles of
    /// `ino` read pinned by ETag (no versions to read it by later), its
    /// bytes are copied to a nameless file on the cache disk (through the
    /// block cache, so what was read already is not fetched again), and
    /// those handles read that until they close: POSIX keeps an open file
    /// until its last close. Best effort: when the copy fails (a full cache
    /// disk, S3 down) the change goes ahead and those readers get ESTALE,
    /// as for a change made by another client; logged.
    pub(super) async fn keep_for_readers(&self, ino: u64) {
        let readers: Vec<Arc<Handle>> = self
            .handles
            .lock()
            .values()
            .filter(|h| matches!(&***h, Handle::File(f) if f.ino == ino))
            .cloned()
            .collect();
        let mut kept: Vec<(ReadTarget, Arc<std::fs::File>)> = Vec::new();
        for h in readers {
            let Handle::File(f) = &*h else { continue };
            self.follow_own_changes(f);
            let Some(t) = f.target.lock().clone() else {
                continue;
            };
            if t.kept.is_some() || !matches!(t.pin, ReadPin::Etag(_)) {
                continue;
            }
            let same = |k: &ReadTarget| k.key == t.key && k.etag == t.etag;
            let file = match kept.iter().find(|(k, _)| same(k)) {
                Some((_, file)) => file.clone(),
                None => match self.copy_out(&t).await {
                    Ok(file) => {
                        kept.push((t.clone(), file.clone()));
                        file
                    }
                    Err(e) => {
                        tracing::warn!(key = %t.key, error = %e,
                            "could not keep the bytes of a file still being read; its readers will get ESTALE");
                        continue;
                    }
                },
            };
            if let Some(t) = f.target.lock().as_mut() {
                t.kept = Some(file);
            }
        }
    }

    /// Handles reading an object this mount copied elsewhere (a directory
    /// rename: `(from, to, result)` per key) read the copy from now on, as
    /// the original is about to go. Handles pinned by version id read the
    /// original's version still.
    pub(super) fn readers_follow(&self, copied: &[(String, String, crate::store::PutResult)]) {
        if copied.is_empty() {
            return;
        }
        let by_src: std::collections::HashMap<&str, (&String, &crate::store::PutResult)> = copied
            .iter()
            .map(|(s, d, p)| (s.as_str(), (d, p)))
            .collect();
        for h in self.handles.lock().values() {
            let Handle::File(f) = &**h else { continue };
            let mut target = f.target.lock();
            let Some(t) = target.as_mut() else { continue };
            if t.kept.is_some() || !matches!(t.pin, ReadPin::Etag(_)) {
                continue;
            }
            if let Some((dst, put)) = by_src.get(&*t.key) {
                t.key = dst.as_str().into();
                t.etag = put.etag.as_str().into();
                t.pin = ReadPin::Etag(put.etag.clone());
            }
        }
    }

    /// The whole object of `t`, into a nameless file on the cache disk.
    async fn copy_out(&self, t: &ReadTarget) -> FsResult<Arc<std::fs::File>> {
        let file = Arc::new(crate::write::anonymous_file(&self.cfg.staging_dir)?);
        let bs = self.blocks.block_size();
        let blocks = t.size.div_ceil(bs);
        let fetches = (0..blocks).map(|index| {
            let bk = t.block(index);
            let (cache, store, pin, file) = (&self.blocks, &*self.store, &t.pin, &file);
            async move {
                let data = cache.get(store, &bk, pin, t.size).await?;
                file.write_all_at(&data, index * bs).or_else(|e| {
                    // The cache disk is full: cached blocks make room.
                    if e.raw_os_error() != Some(libc::ENOSPC) {
                        return Err(e);
                    }
                    cache.free_disk(u64::MAX);
                    file.write_all_at(&data, index * bs)
                })?;
                Ok::<_, FsError>(())
            }
        });
        futures::stream::iter(fetches)
            .buffer_unordered(KEEP_CONCURRENCY)
            .try_collect::<()>()
            .await?;
        Ok(file)
    }

    /// Whether `key` at `etag` was removed by this mount and only waits for
    /// its readers: it is not shown.
    pub(super) fn is_deferred(&self, key: &str, etag: &str) -> bool {
        self.deferred
            .lock()
            .values()
            .any(|d| d.key == key && crate::write::same_etag(&d.etag, etag))
    }

    /// Drops one writer; the last one uploads and ends the write state.
    pub(super) async fn detach_writer(&self, ino: u64) -> FsResult<()> {
        let Some(mut st) = self.live(ino).await else {
            return Ok(());
        };
        st.handles = st.handles.saturating_sub(1);
        if st.handles > 0 {
            return Ok(());
        }
        self.last_writer_gone(ino, &mut st).await
    }

    /// No writer holds the state any more: its data goes to S3 (now, or
    /// from the background) and the state ends, unless the kernel may
    /// still write to its staged file (`end_outside` ends it then).
    pub(super) async fn last_writer_gone(&self, ino: u64, st: &mut StateGuard) -> FsResult<()> {
        let st = &mut **st;
        self.discard_if_nameless(ino, st);
        if st.staged.is_unlinked() && self.file_handles_open(ino) {
            // Readers still read what was written: kept until the last
            // of them closes (`end_unlinked_state`).
            return Ok(());
        }
        if self.cfg.writeback_async && st.dirty && !st.staged.is_unlinked() {
            // writeback=async: staged and journaled is enough for close();
            // the background uploader sends it shortly, so that the
            // chmod, utimes and rename tools do right after a close (rsync,
            // cp -p) only change what it will send.
            st.next_try = Some(std::time::Instant::now() + WRITEBACK_DELAY);
            self.retry_wake.notify_one();
            return Ok(());
        }
        let r = self.upload_if_dirty(ino, st).await;
        if let Err(e) = &r {
            // Never dropped: the state stays, pending, and is retried in the
            // background until it lands (or the file is unlinked).
            let path = self
                .table
                .lock()
                .get(ino)
                .and_then(|n| n.path().map(str::to_string));
            error!(ino, path = ?path, staged = %st.staged.path().display(), error = %e,
                "upload failed at close; the data is kept and retried in the background");
            st.backoff = st.backoff.min(self.cfg.upload_retry_max);
            st.next_try = Some(std::time::Instant::now() + st.backoff);
            self.retry_wake.notify_one();
            return r;
        }
        if st.staged.outside().is_some() {
            return Ok(());
        }
        st.closed = true;
        self.writes.lock().remove(&ino);
        Ok(())
    }

    /// Uploads the files whose last close left them to the background
    /// (a failed upload, or `writeback=async`), those whose time has come,
    /// several at once; returns when the next one is due. A state that
    /// lands (or was unlinked) is ended; one that fails waits twice as long
    /// (at most `upload_retry_max`).
    pub async fn retry_pending(&self) -> Option<std::time::Instant> {
        let mut next_deferred = self.retry_deferred().await;
        let states: Vec<(u64, Arc<OpenFile>)> = self
            .writes
            .lock()
            .iter()
            .map(|(i, s)| (*i, s.clone()))
            .collect();
        let mut next: Option<std::time::Instant> = None;
        let mut due = Vec::new();
        for (ino, of) in states {
            let Ok(st) = of.try_lock_owned() else {
                // Busy (written, uploaded, or its last close is still
                // recording a failure): look again shortly.
                let soon = std::time::Instant::now() + RETRY_FIRST_WAIT;
                next = Some(next.map_or(soon, |n| n.min(soon)));
                continue;
            };
            // An open file uploads at its close; one whose upload failed is
            // retried even while reopened. An unlinked file's state lives
            // until its last handle of any kind closes.
            if st.closed
                || (st.handles > 0 && st.last_error.is_none())
                || (st.staged.is_unlinked() && self.file_handles_open(ino))
            {
                continue;
            }
            let now = std::time::Instant::now();
            if let Some(t) = st.next_try.filter(|t| *t > now) {
                next = Some(next.map_or(t, |n| n.min(t)));
                continue;
            }
            due.push((ino, st));
        }
        let uploads = due.into_iter().map(|(ino, mut st)| async move {
            if st.outside_released && st.staged.outside().is_some() {
                return self.finish_outside(ino, &mut st).await;
            }
            let retried = st.last_error.is_some();
            match self.upload_if_dirty(ino, &mut st).await {
                Ok(()) => {
                    if retried {
                        tracing::info!(ino, "a pending upload landed");
                    } else {
                        tracing::debug!(ino, "a background upload landed");
                    }
                    if st.handles == 0 && st.staged.outside().is_none() {
                        st.closed = true;
                        self.writes.lock().remove(&ino);
                    }
                    None
                }
                Err(e) => {
                    let t = st.failed_again(self.cfg.upload_retry_max);
                    warn!(ino, error = %e, retry_in = ?st.backoff, "pending upload failed again");
                    Some(t)
                }
            }
        });
        let retries: Vec<Option<std::time::Instant>> = futures::stream::iter(uploads)
            .buffer_unordered(PENDING_UPLOADS_IN_FLIGHT)
            .collect()
            .await;
        for t in retries.into_iter().flatten().chain(next_deferred.take()) {
            next = Some(next.map_or(t, |n| n.min(t)));
        }
        next
    }

    /// Takes over what killed mounts left staged in the cache dir: a file
    /// under this mount's root is served from its staged copy at once and
    /// uploaded by the background retrier (like a file whose upload
    /// failed); one outside the root is uploaded here. Settles unlinked
    /// files, landed uploads and deferred deletes. Makes no upload itself
    /// for files it serves, so a mount never waits for recovery.
    pub async fn adopt_staged(&self) -> Vec<Result<crate::write::Recovered, String>> {
        use crate::write::Found;
        let mut out = Vec::new();
        for f in crate::write::scan(&*self.store, &self.cfg.staging_dir, self.started_at).await {
            match f {
                Ok(Found::Done(r)) => out.push(Ok(r)),
                Err(e) => out.push(Err(e)),
                // Looked at again by the caller's next try.
                Ok(Found::Busy(p)) => out.push(Err(crate::write::busy(&p))),
                // A dead mount's delete that failed: this mount's now, so a
                // write at its key waits for it as for its own, and the
                // retrier tries it again (left on disk, a write here could
                // land before a later try deleted it).
                Ok(Found::Removal(e, t)) => {
                    let id = ADOPTED_REMOVALS.fetch_sub(1, Ordering::Relaxed);
                    let mut d = Deferred::new(*t);
                    d.failed(e.clone(), &self.cfg);
                    self.deferred.lock().insert(id, d);
                    out.push(Err(e));
                }
                Ok(Found::Pending(a)) => {
                    let path = a
                        .target
                        .strip_prefix(self.cfg.root_prefix.as_str())
                        .filter(|p| !p.is_empty() && p.split('/').all(super::names::showable))
                        .map(str::to_string);
                    out.push(match path {
                        Some(p) => self.adopt_one(p, *a),
                        None => a.upload_now(&*self.store, &self.cfg.upload).await,
                    });
                }
            }
        }
        if !out.is_empty() {
            self.retry_wake.notify_one();
        }
        out
    }

    fn adopt_one(
        &self,
        path: String,
        a: crate::write::Adoptable,
    ) -> Result<crate::write::Recovered, String> {
        let (key, target, incomplete) = (a.key.clone(), a.target.clone(), a.incomplete);
        let (meta, current) = (a.meta.clone(), a.current.clone());
        let staged = a
            .into_staged()
            .map_err(|e| format!("{key}: journal: {e} (kept for the next try)"))?;
        let now = std::time::Instant::now();
        let info = ObjectInfo {
            key: target.clone(),
            size: staged.size(),
            etag: String::new(),
            last_modified: SystemTime::now(),
            version_id: None,
            storage_class: None,
            metadata: Some(meta),
            headers: None,
        };
        let attr = self.attr_of(&info, false);
        let ino = {
            let d = self.cfg.defaults;
            let mut t = self.table.lock();
            let comps: Vec<&str> = path.split('/').collect();
            let mut parent = super::inodes::ROOT_INO;
            for i in 0..comps.len() - 1 {
                let dir = comps[..=i].join("/");
                parent = match t.find(&NodeKey::Path(dir.clone())) {
                    Some(ino) => ino,
                    None => t.upsert(
                        NodeKey::Path(dir),
                        parent,
                        Attr::implicit_dir(0, &d),
                        None,
                        Some(now),
                    ),
                };
            }
            t.upsert(NodeKey::Path(path), parent, attr, current, Some(now))
        };
        let mut st = WriteState::new(staged, true);
        st.handles = 0;
        st.next_try = Some(now);
        st.last_error = Some("recovered from a killed mount; uploading".into());
        self.writes
            .lock()
            .insert(ino, Arc::new(tokio::sync::Mutex::new(st)));
        Ok(crate::write::Recovered {
            key,
            uploaded_as: target,
            incomplete,
        })
    }

    /// Runs `retry_pending` whenever an upload is due, for the life of the
    /// mount.
    pub fn spawn_retrier(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let fs = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(f) = fs.upgrade() else { return };
                let next = f.retry_pending().await;
                f.sweep_stale();
                let wake = f.retry_wake.clone();
                drop(f);
                // Awake at least once a sweep period.
                let wait = next
                    .map_or(SWEEP_EVERY, |t| {
                        t.saturating_duration_since(std::time::Instant::now())
                    })
                    .min(SWEEP_EVERY);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = wake.notified() => {}
                }
            }
        })
    }

    /// Truncates or extends a file, open or not.
    pub(super) async fn set_size(&self, ino: u64, size: u64) -> FsResult<()> {
        if let Some(mut st) = self.live(ino).await {
            self.set_dirty(ino, &mut st)?;
            st.staged.truncate(size)?;
            self.note_size(ino, size);
            return Ok(());
        }
        self.attach_writer(ino, size == 0).await?;
        let r = async {
            let mut st = self.live(ino).await.ok_or(FsError::BadHandle)?;
            self.set_dirty(ino, &mut st)?;
            st.staged.truncate(size)?;
            self.note_size(ino, size);
            Ok::<_, FsError>(())
        }
        .await;
        let detached = self.detach_writer(ino).await;
        r.and(detached)
    }

    /// Uploads an open file's dirty data now (before a rename).
    pub(super) async fn sync_ino(&self, ino: u64) -> FsResult<()> {
        if let Some(mut st) = self.live(ino).await {
            self.upload_if_dirty(ino, &mut st).await?;
            // A state left behind with nothing to do would be taken up by
            // the next open for writing, built on an object another client
            // may have replaced meanwhile.
            self.end_if_idle(ino, &mut st);
        }
        Ok(())
    }

    /// Whether this mount holds dirty data in or below a directory.
    pub(super) fn pending_below(&self, dir: &str) -> bool {
        !self.writers_below(dir).is_empty()
    }

    /// The inodes with write state in or below a directory.
    pub(super) fn writers_below(&self, dir: &str) -> Vec<u64> {
        let prefix = format!("{dir}/");
        let inos: Vec<u64> = self.writes.lock().keys().copied().collect();
        let t = self.table.lock();
        inos.into_iter()
            .filter(|i| {
                t.get(*i)
                    .and_then(|n| n.path())
                    .is_some_and(|p| p.starts_with(&prefix))
            })
            .collect()
    }

    /// Uploads every dirty file (unmount, SIGTERM), each within `limit`.
    /// Returns the paths that could not be uploaded: their staged data and
    /// journals stay for the next mount.
    pub async fn sync_all(&self, limit: std::time::Duration) -> Vec<String> {
        let inos: Vec<u64> = self.writes.lock().keys().copied().collect();
        let mut failed = Vec::new();
        // Several at once: under writeback=async many files may be waiting.
        let syncs = inos.into_iter().map(|ino| async move {
            let r = match tokio::time::timeout(limit, self.sync_ino(ino)).await {
                Ok(r) => r,
                Err(_) => Err(FsError::Store(crate::store::StoreError::Transient(
                    "timed out at shutdown".into(),
                ))),
            };
            (ino, r)
        });
        let results: Vec<(u64, FsResult<()>)> = futures::stream::iter(syncs)
            .buffer_unordered(PENDING_UPLOADS_IN_FLIGHT)
            .collect()
            .await;
        for (ino, r) in results {
            if let Err(e) = r {
                let path = self
                    .table
                    .lock()
                    .get(ino)
                    .and_then(|n| n.path().map(str::to_string));
                error!(ino, path = ?path, error = %e,
                    "could not upload at shutdown; kept for the next mount with this cache_dir");
                failed.push(path.unwrap_or_else(|| format!("inode {ino}")));
            }
        }
        self.store_dir_times().await;
        failed
    }

    /// Files with data not in S3 yet (dirty, or busy being written or
    /// uploaded): path, current size, the running upload's progress, the
    /// last error and the next background try.
    pub fn dirty_files(&self) -> Vec<PendingFile> {
        // A state that is locked is being written or uploaded: count it.
        let now = std::time::Instant::now();
        let inos: Vec<(u64, Option<String>, Option<u64>)> = self
            .writes
            .lock()
            .iter()
            .filter_map(|(i, st)| match st.try_lock() {
                Err(_) => Some((*i, None, None)),
                Ok(st) if st.dirty && !st.closed && !st.staged.is_unlinked() => Some((
                    *i,
                    st.last_error.clone(),
                    st.next_try
                        .map(|t| t.saturating_duration_since(now).as_secs()),
                )),
                Ok(_) => None,
            })
            .collect();
        let uploads = self.uploads.lock().clone();
        let t = self.table.lock();
        let mut out: Vec<PendingFile> = inos
            .into_iter()
            .filter_map(|(i, err, next)| t.get(i).map(|n| (i, n, err, next)))
            .map(|(i, n, last_error, next_try_secs)| PendingFile {
                path: n.path().unwrap_or("?").to_string(),
                size: n.attr.size,
                progress: uploads.get(&i).map(|p| {
                    (
                        p.done_bytes.load(Ordering::Relaxed),
                        p.total_bytes.load(Ordering::Relaxed),
                    )
                }),
                last_error,
                next_try_secs,
            })
            .collect();
        out.sort_by(|a, b| a.path.cmp(&b.path));
        out
    }

    /// The attributes shown for an inode that has write state.
    pub(super) fn attr_now(&self, ino: u64) -> FsResult<Attr> {
        self.table
            .lock()
            .get(ino)
            .map(|n| n.attr.clone())
            .ok_or(FsError::NotFound)
    }
}

/// By inode: the gate opens wait at while an unlink or rename takes the
/// file's name, and how many unlinks and renames hold or await it.
pub(super) type DetachGates =
    Mutex<std::collections::HashMap<u64, (Arc<tokio::sync::RwLock<()>>, usize)>>;

/// An unlink or rename taking a file's name: taken before it looks for
/// the file's readers, dropped once the table has detached the file.
pub(super) struct Detaching<'a> {
    fs: &'a Fs,
    ino: u64,
    held: Option<tokio::sync::OwnedRwLockWriteGuard<()>>,
}

impl Drop for Detaching<'_> {
    fn drop(&mut self) {
        let mut m = self.fs.detaching.lock();
        drop(self.held.take());
        if let Some((_, holders)) = m.get_mut(&self.ino) {
            *holders -= 1;
            if *holders == 0 {
                m.remove(&self.ino);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Readahead;

    const K: u64 = 1024;
    const BS: u64 = 1024 * K;

    #[test]
    fn read_ahead_grows_through_reordered_reads_and_stops_at_random_ones() {
        let mut ra = Readahead::default();
        let mut windows = Vec::new();
        // 128 KiB reads, each pair arriving swapped, as concurrent kernel
        // reads do.
        for off in [0, 256, 128, 512, 384, 768, 640, 1024] {
            let (w, random) = ra.advance(off * K, off * K + 128 * K, BS, 16);
            assert!(!random, "read at {off} KiB taken as random");
            windows.push(w);
        }
        assert_eq!(windows, [1, 2, 4, 8, 16, 16, 16, 16]);
        // A jump far away: random, no read-ahead.
        assert_eq!(ra.advance(900 * BS, 900 * BS + 4 * K, BS, 16), (0, true));
        assert_eq!(ra.advance(20 * BS, 20 * BS + 4 * K, BS, 16), (0, true));
        // Reading on from there is sequential again.
        assert_eq!(
            ra.advance(20 * BS + 4 * K, 20 * BS + 8 * K, BS, 16),
            (1, false)
        );
        // readahead=0: never any.
        let mut none = Readahead::default();
        assert_eq!(none.advance(0, 128 * K, BS, 0), (0, false));
        assert_eq!(none.advance(128 * K, 256 * K, BS, 0), (0, false));
    }
}
