//! The write-back buffer: a file being modified is staged in a sparse local
//! file under the cache dir (never in RAM), and uploaded on flush as one PUT
//! or as a parallel multipart upload.
//!
//! Invariant of a `Staged` file of `size` bytes: a byte in `loaded` is in
//! the local file; a byte below `base_valid` and not in `loaded` is the byte
//! of the base object (the object the file was opened on, pinned by ETag);
//! every other byte is zero (a hole of the local file). So any write
//! pattern (append, overwrite in the middle, truncate down and up, sparse
//! writes) needs no download up front, and an upload re-sends only what
//! changed: untouched ranges of a large base are copied server-side with
//! UploadPartCopy.
//!
//! Durability. Staged data is deleted only once it is in S3, or when the
//! file was unlinked: a `Staged` dropped while its data is dirty leaves
//! its file and journal for recovery. A staging file is owned by whoever
//! holds its `flock` (taken before the file gets its final name), never by
//! a pid: recovery takes over any staging file nobody holds, and never one
//! a live mount holds. The journal records every multipart upload before
//! its first part, so a killed daemon's upload is completed or aborted.
//! The upload runs from the open descriptor, so removing the cache
//! directory under a live mount loses nothing.

mod journal;
pub mod outside;
mod ranges;
pub mod state;
mod stream;
pub mod tombstone;

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use tracing::{debug, info, warn};

pub use journal::{Header as JournalHeader, Journal};
pub use ranges::RangeSet;

use crate::store::{
    Metadata, ObjectHeaders, ObjectStore, Part, PutBody, PutResult, ReadPin, StoreError, Upload,
};

/// S3's limits on multipart uploads.
pub const MIN_PART_SIZE_BYTES: u64 = 5 * 1024 * 1024;
pub const MAX_PARTS: u64 = 10_000;
/// Server-side copies are cut in parts of at most this many bytes, so the
/// store copies them in parallel.
const COPY_PART_MAX_BYTES: u64 = 128 * 1024 * 1024;
/// The largest object one CopyObject can copy.
const COPY_OBJECT_MAX_BYTES: u64 = 5 * 1024 * 1024 * 1024;
/// Ranged GETs that fill a staged file are at most this large.
const FILL_CHUNK_BYTES: u64 = 8 * 1024 * 1024;
/// Names of staging files; a file being created has the temporary prefix
/// until it is locked.
const STAGE_PREFIX: &str = "stage-";
const TMP_PREFIX: &str = ".tmp-stage-";
const JOURNAL_SUFFIX: &str = ".journal";

#[derive(Debug)]
pub enum WriteError {
    Io(io::Error),
    Store(StoreError),
}

impl From<io::Error> for WriteError {
    fn from(e: io::Error) -> Self {
        WriteError::Io(e)
    }
}

impl From<StoreError> for WriteError {
    fn from(e: StoreError) -> Self {
        WriteError::Store(e)
    }
}

impl std::fmt::Display for WriteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WriteError::Io(e) => write!(f, "staging file: {e}"),
            WriteError::Store(e) => write!(f, "{e}"),
        }
    }
}

/// How uploads are cut and run.
#[derive(Clone, Debug)]
pub struct UploadOptions {
    /// Files larger than one part go multipart.
    pub part_size_bytes: u64,
    pub concurrency: usize,
}

/// How far an upload has come, readable while it runs.
#[derive(Debug, Default)]
pub struct Progress {
    pub done_bytes: AtomicU64,
    pub total_bytes: AtomicU64,
}

/// The object a staged file started from.
#[derive(Clone, Debug)]
pub struct Base {
    pub key: String,
    pub etag: String,
    pub size: u64,
    /// Its version id, when the bucket has versions.
    pub version: Option<String>,
}

/// Creates a new private file (0600, owner only), failing if it exists.
pub(crate) fn private_file(path: &Path) -> io::Result<File> {
    crate::private::private_file()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
}

/// A private file in `dir` with no name (O_TMPFILE, else created and
/// unlinked at once): its space goes back with its last descriptor, and a
/// killed daemon leaves nothing behind.
pub(crate) fn anonymous_file(dir: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmpfile = crate::private::private_file()
        .read(true)
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .open(dir);
    match tmpfile {
        Ok(f) => Ok(f),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
            crate::private::create_private_dir(dir)?;
            anonymous_file(dir)
        }
        Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EISDIR)) => {
            let (file, path) = new_locked_file(dir, TMP_PREFIX)?;
            std::fs::remove_file(path)?;
            Ok(file)
        }
        Err(e) => Err(e),
    }
}

/// Takes the exclusive lock of a staging file without waiting.
pub(crate) fn try_lock(file: &File) -> io::Result<bool> {
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EWOULDBLOCK) => Ok(false),
        _ => Err(e),
    }
}

static STAGING_SEQ: AtomicU64 = AtomicU64::new(0);

/// Why a `Found::Busy` file is not taken over yet.
pub fn busy(path: &Path) -> String {
    format!(
        "{}: still held open by a writer of the killed mount",
        path.display()
    )
}

/// Whether this process holds the `flock` of `file` (a staging file this
/// mount took over from a dead one), as /proc/locks says: its lines name
/// the holder's pid and the file's inode (`FLOCK ADVISORY WRITE PID
/// MAJ:MIN:INODE ...`). Yes when that cannot be read: the file is skipped
/// then, as a live mount's is.
fn locked_by_this_process(file: &File) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(m), Ok(locks)) = (file.metadata(), std::fs::read_to_string("/proc/locks")) else {
        return true;
    };
    let me = std::process::id().to_string();
    locks.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().filter(|w| *w != "->").collect();
        f.get(1) == Some(&"FLOCK")
            && f.get(4) == Some(&me.as_str())
            && f.get(5)
                .and_then(|d| d.rsplit(':').next())
                .and_then(|i| i.parse::<u64>().ok())
                == Some(m.ino())
    })
}

/// Whether the staging file `name` (`new_locked_file`'s: its creation
/// time first, seconds and nanoseconds in hex) was made before `t`.
fn made_before(name: &str, t: std::time::SystemTime) -> bool {
    let id = name.strip_prefix(STAGE_PREFIX).unwrap_or(name);
    let made = id.split('-').next().filter(|h| h.len() > 8).and_then(|h| {
        let (secs, nanos) = h.split_at(h.len() - 8);
        Some(
            std::time::UNIX_EPOCH
                + std::time::Duration::new(
                    u64::from_str_radix(secs, 16).ok()?,
                    u32::from_str_radix(nanos, 16).ok()?,
                ),
        )
    });
    made.is_some_and(|m| m < t)
}

/// Creates, locks and names a new staging file in `dir`.
fn new_staging_file(dir: &Path) -> io::Result<(File, PathBuf)> {
    new_locked_file(dir, STAGE_PREFIX)
}

/// Creates, locks and names a new private file `<prefix><id>` in `dir`:
/// it gets its final name only once its lock is held.
fn new_locked_file(dir: &Path, prefix: &str) -> io::Result<(File, PathBuf)> {
    for attempt in 0..100 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let id = format!(
            "{:x}{:08x}-{:x}-{}",
            now.as_secs(),
            now.subsec_nanos(),
            std::process::id(),
            STAGING_SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let tmp = dir.join(format!("{TMP_PREFIX}{id}"));
        let file = match private_file(&tmp) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            // The directory is made (and checked) when it is missing, not
            // before every file: `rm -rf` of the cache dir lands here.
            Err(e) if e.kind() == io::ErrorKind::NotFound && attempt == 0 => {
                crate::private::create_private_dir(dir)?;
                continue;
            }
            Err(e) => return Err(e),
        };
        if !try_lock(&file)? {
            continue;
        }
        let path = dir.join(format!("{prefix}{id}"));
        if path.exists() {
            let _ = std::fs::remove_file(&tmp);
            continue;
        }
        std::fs::rename(&tmp, &path)?;
        return Ok((file, path));
    }
    Err(io::Error::other("no free staging file name"))
}

/// A dead mount's multipart upload of a file's data, every part sent.
#[derive(Debug)]
struct Resume {
    /// The key it was made for.
    key: String,
    upload: Upload,
    parts: Vec<Part>,
    /// The data is still what the parts hold (no write, truncation or
    /// new metadata since): else the upload is only to be aborted.
    current: bool,
}

/// A file's contents while it is open for writing.
/// The encryption and storage class the mount writing a file sends
/// (mount options): journaled with its staged data, so a mount recovering
/// it after a kill uploads it as asked, whatever its own options (one
/// without `use_sse` would otherwise store it unencrypted). The
/// recovering mount's own options still win where it has them, as they
/// win over the object replaced.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WrittenWith {
    /// `x-amz-server-side-encryption` (AES256, aws:kms, aws:kms:dsse).
    pub sse: Option<String>,
    pub sse_kms_key_id: Option<String>,
    pub storage_class: Option<String>,
}

impl WrittenWith {
    /// `keep` (the headers of the object replaced) with these over them.
    fn over(&self, keep: Option<&ObjectHeaders>) -> Option<ObjectHeaders> {
        if *self == WrittenWith::default() {
            return keep.cloned();
        }
        let mut h = keep.cloned().unwrap_or_default();
        if self.sse.is_some() {
            h.sse = self.sse.clone();
            h.sse_kms_key_id = self.sse_kms_key_id.clone();
        }
        if self.storage_class.is_some() {
            h.storage_class = self.storage_class.clone();
        }
        Some(h)
    }
}

#[derive(Debug)]
pub struct Staged {
    file: Arc<File>,
    path: PathBuf,
    size: u64,
    base: Option<Base>,
    base_valid: u64,
    loaded: RangeSet,
    /// The ETag of the object the data replaces at its key (see
    /// `JournalHeader::replaces`).
    replaces: Option<String>,
    /// Present while the staged data is not all in S3.
    journal: Option<Journal>,
    /// The header the journal was started with (for compaction).
    header: Option<JournalHeader>,
    /// Multipart uploads open for this data (journaled).
    uploads: Vec<Upload>,
    /// A dead mount's multipart upload of this data, all its parts sent
    /// (journaled with their checksums): completing it is the upload.
    resume: Option<Resume>,
    /// Whether untouched base ranges may be copied server-side (not when
    /// the key now holds another object).
    copy_ok: bool,
    /// The file was unlinked: its data is never uploaded.
    unlinked: bool,
    /// Parts of a new file sent while it is being written.
    stream: Option<stream::Streaming>,
    /// Leave the files at drop (a recovery that failed).
    keep_files: bool,
    /// An upload was sent since the last journaled write.
    sent_since_write: bool,
    /// An upload of this data was ever sent (it may have landed even if it
    /// answered an error): a rename then copies what is there.
    attempted: bool,
    /// Metadata was set while the data was dirty (chmod, utimes: `cp -p`).
    meta_set: bool,
    /// The bytes differ from the base's (written, truncated, or there is
    /// no base): without that, only the metadata is sent, by a copy.
    data_changed: bool,
    /// What its uploads are sent with (journaled).
    written_with: WrittenWith,
    /// The kernel writes to the staged file itself (`-o passthrough`):
    /// its stamp tells this mount what changed.
    outside: Option<Arc<outside::Outside>>,
}

impl Staged {
    /// Stages a file of `base`'s contents (or an empty file) in `dir`.
    /// `replaces` is the ETag of the object at the key (the base's, or the
    /// one an O_TRUNC open empties).
    pub fn new(dir: &Path, base: Option<Base>, replaces: Option<String>) -> io::Result<Staged> {
        let (file, path) = new_staging_file(dir)?;
        let size = base.as_ref().map_or(0, |b| b.size);
        let base_is_none = base.is_none();
        file.set_len(size)?;
        Ok(Staged {
            file: Arc::new(file),
            path,
            size,
            base_valid: size,
            replaces: replaces.or_else(|| base.as_ref().map(|b| b.etag.clone())),
            base,
            loaded: RangeSet::default(),
            journal: None,
            header: None,
            uploads: Vec::new(),
            resume: None,
            copy_ok: true,
            unlinked: false,
            stream: None,
            keep_files: false,
            sent_since_write: false,
            attempted: false,
            meta_set: false,
            data_changed: base_is_none,
            written_with: WrittenWith::default(),
            outside: None,
        })
    }

    /// Uploads of this data are sent with `w` (the mount's options; set
    /// before the journal begins, which records it).
    pub fn set_written_with(&mut self, w: WrittenWith) {
        self.written_with = w;
    }

    /// Whether a write just made a part ready to stream (a new file
    /// written in order, with a full part beyond what was sent).
    pub fn stream_due(&self, opts: &UploadOptions) -> bool {
        self.stream_due_at(opts, self.size)
    }

    /// Whether a write that leaves the file `size` bytes long would make a
    /// part ready to stream.
    pub fn stream_due_at(&self, opts: &UploadOptions, size: u64) -> bool {
        if self.base.is_some() || self.unlinked || self.outside.is_some() {
            return false;
        }
        let (covered, next) = self
            .stream
            .as_ref()
            .map_or((0, 1), |s| (s.next_offset, s.next_part));
        let part = stream::stream_part_size(opts.part_size_bytes, next);
        let needed = if self.stream.is_none() {
            2 * part
        } else {
            part
        };
        size >= covered + needed
    }

    /// After a write: sends the full parts of a new file written
    /// sequentially from its start, so close() waits only for the tail.
    /// Starts once two parts are there (small files never stream).
    pub async fn stream(
        &mut self,
        store: &Arc<dyn ObjectStore>,
        key: &str,
        meta: &Metadata,
        keep: Option<&ObjectHeaders>,
        opts: &UploadOptions,
    ) {
        if !self.stream_due(opts)
            || self.stream.as_ref().is_some_and(|s| s.key != key)
            || !self.loaded.missing(0..self.size).is_empty()
        {
            return;
        }
        let keep = self.written_with.over(keep);
        let keep = keep.as_ref();
        if self.stream.is_none() {
            match store.create_multipart(key, meta, keep).await {
                Ok(upload) => {
                    if let Err(e) = self.note_upload(&upload) {
                        warn!(key, error = %e, "journal: no streaming upload");
                        abort_quietly(&**store, key, &upload.id).await;
                        return;
                    }
                    self.stream = Some(stream::Streaming::new(
                        store.clone(),
                        key.to_string(),
                        upload,
                        meta.clone(),
                    ));
                }
                Err(e) => {
                    debug!(key, error = %e, "no streaming upload; the file goes up at close");
                    return;
                }
            }
        }
        let file = self.file.clone();
        let Some(s) = self.stream.as_mut() else {
            return;
        };
        loop {
            let part = stream::stream_part_size(opts.part_size_bytes, s.next_part);
            if self.size < s.next_offset + part {
                break;
            }
            s.send(file.clone(), part, opts.concurrency).await;
        }
    }

    /// A change behind what was streamed: the stream is no good.
    fn cancel_stream_below(&mut self, offset: u64) {
        if self.stream.as_ref().is_some_and(|s| offset < s.next_offset)
            && let Some(s) = self.stream.take()
        {
            // Aborted in the background; it stays in `uploads` (and the
            // journal) until the next upload has made sure it is gone, so
            // a kill before the abort leaves it to the next mount.
            s.cancel();
        }
    }

    /// Journals a multipart upload about to get its first part.
    fn note_upload(&mut self, upload: &Upload) -> io::Result<()> {
        if let Some(j) = &mut self.journal {
            j.upload_started(upload)?;
        }
        self.uploads.push(upload.clone());
        Ok(())
    }

    /// Starts journaling (the data is about to differ from S3), unless it
    /// already is, or the file was unlinked (nothing to recover then).
    pub fn begin_journal(&mut self, key: &str, meta: &Metadata) -> io::Result<()> {
        if self.journal.is_some() || self.unlinked {
            return Ok(());
        }
        let h = JournalHeader {
            key: key.to_string(),
            base_etag: self.base.as_ref().map(|b| b.etag.clone()),
            base_version: self.base.as_ref().and_then(|b| b.version.clone()),
            replaces: self.replaces.clone(),
            over: None,
            written_with: self.written_with.clone(),
            base_valid: self.base_valid,
            size: self.size,
            meta: meta.clone(),
        };
        self.journal = Some(Journal::create(journal_path(&self.path), &h)?);
        self.header = Some(h);
        Ok(())
    }

    pub fn journaling(&self) -> bool {
        self.journal.is_some()
    }

    /// Whether the kernel may be given the staged file to write to: only
    /// while it is all of the data (no base whose untouched ranges live
    /// in S3) and nothing streams from it.
    pub fn may_go_outside(&self) -> bool {
        self.outside.is_some() || (self.base.is_none() && !self.unlinked && self.stream.is_none())
    }

    /// From now on the kernel writes to the staged file: its stamp says
    /// what changed. A recovered upload to complete is not of this data
    /// any more.
    pub fn go_outside(&mut self) -> io::Result<Arc<outside::Outside>> {
        if let Some(o) = &self.outside {
            return Ok(o.clone());
        }
        let o = Arc::new(outside::Outside::new(self.file.clone())?);
        self.drop_resume();
        self.outside = Some(o.clone());
        Ok(o)
    }

    pub fn outside(&self) -> Option<&Arc<outside::Outside>> {
        self.outside.as_ref()
    }

    /// Takes account of what the kernel wrote since last asked: the
    /// file's stamp when it changed (the size follows it).
    pub fn sync_outside(&mut self) -> io::Result<Option<outside::Stamp>> {
        let Some(o) = &self.outside else {
            return Ok(None);
        };
        let Some(stamp) = o.take()? else {
            return Ok(None);
        };
        self.size = stamp.size;
        self.changed_outside();
        Ok(Some(stamp))
    }

    /// The kernel changed the staged file (all of it may differ from what
    /// was uploaded).
    pub fn changed_outside(&mut self) {
        self.loaded.insert(0..self.size);
        self.data_changed = true;
        self.drop_resume();
    }

    /// No kernel writes to the staged file any more (its last such
    /// handle closed, no mapping of it left).
    pub fn end_outside(&mut self) {
        self.outside = None;
    }

    /// This mount uploaded the data, or moved or copied its object, while
    /// the kernel may write on: the journal is rewritten (in one rename)
    /// for the object now at `key`, the ETag the data replaces there and
    /// the metadata it has now (`meta`, if new), with the mark that the
    /// staged file may have changed since. Left as it was, a kill would
    /// have the next mount put the data back at the old name, or beside.
    pub fn rejournal_outside(&mut self, key: &str, meta: Option<&Metadata>) {
        if self.outside.is_none() {
            return;
        }
        let (Some(j), Some(h)) = (self.journal.as_mut(), self.header.as_mut()) else {
            return;
        };
        h.key = key.to_string();
        h.base_etag = None;
        h.base_version = None;
        h.replaces = self.replaces.clone();
        h.over = None;
        h.base_valid = 0;
        h.size = self.size;
        if let Some(m) = meta {
            h.meta = m.clone();
        }
        if let Err(e) = j.compact(h, &[journal::OUTSIDE_LINE.to_string()]) {
            warn!(key, error = %e, "journal of a passthrough file not rewritten");
        }
    }

    /// The data is all in S3: nothing to recover.
    pub fn end_journal(&mut self) {
        if let Some(j) = self.journal.take() {
            j.remove();
        }
        self.header = None;
        self.uploads.clear();
    }

    /// The file was unlinked: its data is never to be uploaded, by this
    /// mount or by a recovery. Writes through handles still open go to
    /// the staging file only.
    pub fn discard(&mut self) -> Option<Leftover> {
        let mut leftover = None;
        self.unlinked = true;
        if let Some(j) = &mut self.journal
            && let Err(e) = j.unlinked()
        {
            warn!(error = %e, "journal: could not record an unlink");
        }
        if let Some(s) = self.stream.take() {
            // The journal, final now, names the stream's upload: it goes
            // once that is aborted, so a kill meanwhile leaves the abort to
            // the next mount's recovery.
            let j = self.journal.take();
            s.cancel_then(move || {
                if let Some(j) = j {
                    j.remove();
                }
            });
        } else if self.resume.is_some() || !self.uploads.is_empty() {
            // A dead mount's upload is still open, or a cancelled stream's
            // abort may not be done: aborted by the caller, the journal,
            // final now, naming them until then (a kill meanwhile leaves
            // them to the next mount's recovery).
            let key = self.header.as_ref().map(|h| h.key.clone());
            let mut uploads: Vec<(String, String)> = Vec::new();
            if let Some(r) = self.resume.take() {
                uploads.push((r.key, r.upload.id));
            }
            for u in std::mem::take(&mut self.uploads) {
                if let Some(k) = &key
                    && !uploads.iter().any(|(_, id)| *id == u.id)
                {
                    uploads.push((k.clone(), u.id));
                }
            }
            leftover = Some(Leftover {
                uploads,
                journal: self.journal.take(),
            });
        }
        self.end_journal();
        leftover
    }

    /// This mount is about to remove the file's object or put another
    /// over it (an unlink, a rename over the file): journaled first, so a
    /// kill after that landed drops the data rather than keeping it beside
    /// the key (the removal was this mount's own, not another client's).
    /// Not journaled (a full disk), the removal must not go ahead.
    pub fn removing(&mut self) -> io::Result<()> {
        match &mut self.journal {
            Some(j) => j.removing(),
            None => Ok(()),
        }
    }

    /// The removal failed: the file stays, and a kill must keep its data
    /// as for any file. (Not journaled, the next change to it is.)
    pub fn kept(&mut self) {
        if let Some(j) = &mut self.journal
            && let Err(e) = j.kept()
        {
            warn!(error = %e, "journal: could not record a failed removal");
        }
    }

    /// The metadata the data is to be uploaded with changed (chmod while
    /// dirty): journaled, so a recovery uses it too.
    pub fn set_meta(&mut self, meta: &Metadata) -> io::Result<()> {
        self.meta_set = true;
        self.drop_resume();
        if let Some(j) = &mut self.journal {
            j.meta_changed(meta)?;
        }
        if let Some(h) = &mut self.header {
            h.meta = meta.clone();
        }
        Ok(())
    }

    /// Reads the rest of a small base now, when it could not be read later
    /// (no version id to pin it by): another client replacing the object
    /// before close then costs nothing. A file that goes up as one PUT
    /// reads its base at close anyway, so this moves that GET earlier; a
    /// larger one keeps copying its untouched ranges server-side.
    pub async fn secure_small_base(
        &mut self,
        store: &dyn ObjectStore,
        single_put_max: u64,
    ) -> Result<(), WriteError> {
        if self.base_readable_elsewhere() || self.size > single_put_max {
            return Ok(());
        }
        self.fill(store, 0..self.size).await
    }

    /// Whether the base's untouched bytes could still be read if the key
    /// now holds another object (by a real version id).
    pub fn base_readable_elsewhere(&self) -> bool {
        self.base
            .as_ref()
            .is_none_or(|b| b.version.as_ref().is_some_and(|v| v != "null"))
    }

    /// The base cannot be read any more: what was never read of it is
    /// zeros from now on, and the data replaces nothing known.
    pub fn forget_base(&mut self) {
        self.base = None;
        self.base_valid = 0;
        self.replaces = None;
        self.copy_ok = false;
    }

    /// Only metadata differs from the object the data was staged from.
    pub fn meta_only(&self) -> bool {
        !self.data_changed && self.base.is_some()
    }

    /// An upload of this data was sent: where the file has no object
    /// known, one that failed may have stored it all the same.
    pub fn may_have_landed(&self) -> bool {
        self.attempted
    }

    pub fn is_unlinked(&self) -> bool {
        self.unlinked
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The ETag of the object at the key this data replaces.
    pub fn replaces(&self) -> Option<&str> {
        self.replaces.as_deref()
    }

    /// Where the staged data is (for logs).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The data changed: a dead mount's upload is not of it any more (the
    /// next upload aborts it).
    fn drop_resume(&mut self) {
        if let Some(r) = &mut self.resume {
            r.current = false;
        }
    }

    /// Compacts a long journal. The change just made is journaled
    /// already: a compaction that fails (a full disk) leaves the journal
    /// long, not wrong, and is tried again at the next change.
    fn maybe_compact(&mut self) -> io::Result<()> {
        if !self.journal.as_ref().is_some_and(|j| j.wants_compaction()) {
            return Ok(());
        }
        if let Err(e) = self.compact() {
            debug!(path = %self.path.display(), error = %e, "journal not compacted yet");
        }
        Ok(())
    }

    /// Rewrites the journal from the in-memory state.
    fn compact(&mut self) -> io::Result<()> {
        let (Some(j), Some(h)) = (self.journal.as_mut(), self.header.as_mut()) else {
            return Ok(());
        };
        h.size = self.size;
        h.base_valid = self.base_valid;
        let sent = self
            .resume
            .as_ref()
            .filter(|r| r.current)
            .map(|r| (r.parts.as_slice(), self.size));
        let mut changes = journal::changes_for(&self.loaded, &self.uploads, sent);
        if self.outside.is_some() {
            changes.push(journal::OUTSIDE_LINE.to_string());
        }
        j.compact(h, &changes)
    }

    /// A new file none of whose bytes were sent (no object under it, no
    /// stream, no upload begun): a rename only changes where it goes.
    pub fn unsent(&self) -> bool {
        self.base.is_none()
            && self.stream.is_none()
            && self.uploads.is_empty()
            && !self.attempted
            && !self.unlinked
    }

    /// An unsent file goes to `key` now (a rename; what was there is
    /// gone): journaled at once, so a recovery uploads it there. `over`:
    /// the ETags the key may hold of the file the rename replaces (see
    /// `JournalHeader::over`), none when it replaces nothing.
    pub fn rekey(&mut self, key: &str, over: Option<Vec<String>>) -> io::Result<()> {
        let Some(h) = self.header.as_mut() else {
            return Ok(());
        };
        let old = (
            std::mem::replace(&mut h.key, key.to_string()),
            std::mem::replace(&mut h.over, over),
        );
        // Not journaled (a full disk): the file keeps its old key.
        self.compact().inspect_err(|_| {
            if let Some(h) = self.header.as_mut() {
                (h.key, h.over) = old;
            }
        })
    }

    /// Writes `data` at `offset`; how much of it was written: all, or
    /// where the disk filled up part way, the part before (a short write,
    /// as a local file system's; the caller sees the count), never an
    /// error after bytes changed.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<usize> {
        if data.is_empty() {
            // A write of nothing changes nothing, not even the size (POSIX);
            // a size beyond the staging file's end would fail every upload.
            return Ok(0);
        }
        self.cancel_stream_below(offset);
        self.drop_resume();
        // Without a base, the staging file itself is the whole truth:
        // only writes over a base need recording, and the first write
        // after an upload was sent (so recovery knows that upload is not
        // of this data any more).
        let recorded = self.base.is_some() || self.sent_since_write;
        // Room for its journal line first: a write that could not be
        // journaled fails before it changes a byte.
        if let Some(j) = self.journal.as_mut().filter(|_| recorded) {
            j.reserve(journal::LINE_MAX)?;
        }
        let mut done = 0;
        while done < data.len() {
            match self.file.write_at(&data[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if done == 0 => return Err(e),
                Err(_) => break,
            }
        }
        if done == 0 {
            return Err(io::Error::from(io::ErrorKind::WriteZero));
        }
        self.data_changed = true;
        if let Some(j) = self.journal.as_mut().filter(|_| recorded) {
            j.wrote(offset, done as u64)?;
            self.sent_since_write = false;
        }
        let end = offset + done as u64;
        self.loaded.insert(offset..end);
        self.size = self.size.max(end);
        self.maybe_compact()?;
        Ok(done)
    }

    pub fn truncate(&mut self, size: u64) -> io::Result<()> {
        self.cancel_stream_below(size);
        self.drop_resume();
        self.data_changed = true;
        // Journaled first: a truncation the journal cannot record (a full
        // disk) must not cut the staged file, whose bytes past `size` are
        // still the file's when it fails.
        if let Some(j) = &mut self.journal {
            j.reserve(journal::LINE_MAX)?;
            j.truncated(size)?;
        }
        self.file.set_len(size)?;
        self.loaded.truncate(size);
        self.base_valid = self.base_valid.min(size);
        self.size = size;
        self.maybe_compact()
    }

    /// Reads from the staged contents, fetching base ranges not yet local.
    pub async fn read(
        &mut self,
        store: &dyn ObjectStore,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, WriteError> {
        let end = (offset + len).min(self.size);
        if offset >= end {
            return Ok(Bytes::new());
        }
        self.fill(store, offset..end).await?;
        let mut buf = vec![0u8; (end - offset) as usize];
        self.file.read_exact_at(&mut buf, offset)?;
        Ok(Bytes::from(buf))
    }

    /// The base ranges within `r` that are not local.
    fn missing_base(&self, r: Range<u64>) -> Vec<Range<u64>> {
        let r = r.start..r.end.min(self.base_valid);
        if r.is_empty() {
            return Vec::new();
        }
        self.loaded.missing(r)
    }

    /// Downloads the base ranges within `r` that are not local yet.
    async fn fill(&mut self, store: &dyn ObjectStore, r: Range<u64>) -> Result<(), WriteError> {
        let missing = self.missing_base(r);
        let Some(base) = self.base.clone().filter(|_| !missing.is_empty()) else {
            return Ok(());
        };
        let chunks: Vec<Range<u64>> = missing
            .iter()
            .flat_map(|m| {
                (m.start..m.end)
                    .step_by(FILL_CHUNK_BYTES as usize)
                    .map(move |s| s..(s + FILL_CHUNK_BYTES).min(m.end))
            })
            .collect();
        let pin = match &base.version {
            Some(v) if v != "null" => ReadPin::Version(v.clone()),
            _ => ReadPin::Etag(base.etag.clone()),
        };
        let file = self.file.clone();
        futures::stream::iter(chunks)
            .map(|c| {
                let (pin, key, file) = (&pin, &base.key, file.clone());
                async move {
                    let data = store.get_range(key, c.clone(), pin).await?;
                    if data.len() as u64 != c.end - c.start {
                        return Err(WriteError::Store(StoreError::PreconditionFailed));
                    }
                    file.write_all_at(&data, c.start)?;
                    Ok::<_, WriteError>(c)
                }
            })
            .buffer_unordered(4)
            .try_for_each(|c| {
                self.loaded.insert(c);
                futures::future::ready(Ok(()))
            })
            .await
    }

    fn body(&self, r: Range<u64>) -> PutBody {
        PutBody::File {
            file: self.file.clone(),
            offset: r.start,
            len: r.end - r.start,
        }
    }

    /// Uploads the whole contents as `key` with `meta`, keeping `keep`
    /// (the headers of the object it replaces). On failure nothing
    /// changes in the bucket and no multipart upload is left behind.
    pub async fn upload(
        &mut self,
        store: &dyn ObjectStore,
        key: &str,
        meta: &Metadata,
        keep: Option<&ObjectHeaders>,
        opts: &UploadOptions,
        progress: &Progress,
    ) -> Result<PutResult, WriteError> {
        if self.unlinked {
            return Err(WriteError::Store(StoreError::NotFound));
        }
        let keep = self.written_with.over(keep);
        let keep = keep.as_ref();
        progress.total_bytes.store(self.size, Ordering::Relaxed);
        progress.done_bytes.store(0, Ordering::Relaxed);
        if let Some(mut s) = self.stream.take() {
            if s.key == key {
                // The mtime of writes after the upload began is not worth a
                // copy of the whole object: the object keeps the time it
                // was begun at. A mode, owner or time set on purpose is.
                let unchanged = s.meta == *meta
                    || (!self.meta_set && same_except(&s.meta, meta, &WRITE_TIME_KEYS));
                match self.finish_stream(&mut s, store, progress).await {
                    Ok(put) if unchanged => {
                        self.uploads.retain(|u| u.id != s.upload.id);
                        return Ok(put);
                    }
                    // The metadata changed after the upload began (`cp -p`
                    // sets mode and times last): the object is copied onto
                    // itself with the file's metadata, server-side, where
                    // one CopyObject can (5 GiB); above, it goes up whole.
                    Ok(_) if self.size <= COPY_OBJECT_MAX_BYTES => {
                        self.uploads.retain(|u| u.id != s.upload.id);
                        return Ok(store.copy(key, key, Some(meta), None).await?);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        warn!(key, error = %e, "streaming upload failed; uploading the file whole")
                    }
                }
            }
            self.uploads.retain(|u| u.id != s.upload.id);
            s.abort().await;
        }
        // Streams cancelled since: aborted for sure before the journal
        // naming them can go (at the end of this upload).
        for u in std::mem::take(&mut self.uploads) {
            if self.resume.as_ref().is_some_and(|r| r.upload.id == u.id) {
                self.uploads.push(u);
            } else {
                abort_quietly(store, key, &u.id).await;
            }
        }
        // A dead mount sent every part of this data: complete its upload.
        // One whose data changed since, or made for another key (the file
        // was renamed), is aborted.
        if let Some(r) = self.resume.take_if(|r| !r.current || r.key != key) {
            self.uploads.retain(|u| u.id != r.upload.id);
            abort_quietly(store, &r.key, &r.upload.id).await;
        }
        if let Some(Resume { upload, parts, .. }) = self.resume.take() {
            match complete(store, key, &upload.id, parts).await {
                Ok(put) => {
                    info!(key, upload = %upload.id, "completed the multipart upload a killed mount had sent");
                    self.uploads.retain(|u| u.id != upload.id);
                    progress.done_bytes.store(self.size, Ordering::Relaxed);
                    return Ok(put);
                }
                // `complete` aborted it: sent again below.
                Err(e) => {
                    self.uploads.retain(|u| u.id != upload.id);
                    warn!(key, error = %e, "could not complete a killed mount's multipart upload; sending the data again");
                }
            }
        }
        // Only the metadata differs from the object (a chmod, chown or
        // utimes deferred after the file was written): one server-side
        // copy of the object onto itself, no bytes sent.
        if self.meta_only()
            && self.copy_ok
            && self.size <= COPY_OBJECT_MAX_BYTES
            && self
                .base
                .as_ref()
                .is_some_and(|b| b.key == key && b.size == self.size)
        {
            return Ok(store.copy(key, key, Some(meta), None).await?);
        }
        let part = part_size(self.size, opts.part_size_bytes);
        if self.size <= part {
            self.fill(store, 0..self.size).await?;
            // A small file is read once: its MD5 and the PUT's body come
            // from the same bytes. The ETag this PUT will give the object
            // (its MD5) is journaled first: a daemon killed before it
            // learns the PUT landed is recognised by the next mount
            // instead of kept beside. Read and hashed off the runtime's
            // threads (with `part_size=5G`, a file of gigabytes).
            let whole = self.body(0..self.size);
            let (file, size) = (self.file.clone(), self.size);
            let (body, md5) = tokio::task::spawn_blocking(move || -> io::Result<_> {
                if size <= IN_MEMORY_PUT_MAX {
                    let b = whole.read_all()?;
                    let md5 = bytes_md5(&b);
                    Ok((PutBody::Bytes(b), md5))
                } else {
                    Ok((whole, file_md5(&file, size)?))
                }
            })
            .await
            .map_err(|e| io::Error::other(format!("hashing the upload: {e}")))??;
            if let Some(j) = &mut self.journal {
                j.put_sent(&md5, self.outside.is_some())?;
                self.sent_since_write = true;
            }
            self.attempted = true;
            let put = match store.put(key, body, meta, keep).await {
                Ok(put) => put,
                // A timeout or a 5xx may come after the object was stored:
                // exactly these bytes with this metadata at the key is a
                // success (else an unlink of a file that never "landed"
                // would leave it in the bucket).
                Err(e @ (StoreError::Transient(_) | StoreError::Other(_))) => {
                    match landed_anyway(store, key, &md5, Some(meta)).await {
                        Some(put) => {
                            info!(key, error = %e, "PUT failed, but the object landed");
                            put
                        }
                        None => return Err(e.into()),
                    }
                }
                Err(e) => return Err(e.into()),
            };
            progress.done_bytes.store(self.size, Ordering::Relaxed);
            if let Some(o) = &self.outside {
                o.uploaded(vec![(0..self.size, put.sent_crc32c)]);
            }
            return Ok(put);
        }
        let parts = self.plan_parts(part);
        for (_, r, copy) in &parts {
            if !copy {
                self.fill(store, r.clone()).await?;
            }
        }
        match self
            .upload_parts(store, key, meta, keep, opts, progress, &parts)
            .await
        {
            // The store refused CRC32C (said once in the log): its next
            // upload carries Content-MD5. Never a failed upload for that.
            Err(WriteError::Store(StoreError::ChecksumRefused(_))) => {
                progress.done_bytes.store(0, Ordering::Relaxed);
                self.upload_parts(store, key, meta, keep, opts, progress, &parts)
                    .await
            }
            r => r,
        }
    }

    /// One multipart upload of the data, cut as `parts` plans.
    #[allow(clippy::too_many_arguments)]
    async fn upload_parts(
        &mut self,
        store: &dyn ObjectStore,
        key: &str,
        meta: &Metadata,
        keep: Option<&ObjectHeaders>,
        opts: &UploadOptions,
        progress: &Progress,
        parts: &[(i32, Range<u64>, bool)],
    ) -> Result<PutResult, WriteError> {
        let upload = store.create_multipart(key, meta, keep).await?;
        if let Err(e) = self.note_upload(&upload) {
            abort_quietly(store, key, &upload.id).await;
            return Err(e.into());
        }
        debug!(
            key,
            parts = parts.len(),
            crc32c = upload.crc32c,
            "multipart upload"
        );
        let base = self.base.clone();
        let this = &*self;
        let results: Result<Vec<Part>, StoreError> = futures::stream::iter(parts.iter().cloned())
            .map(|(n, r, copy)| {
                let (base, upload) = (&base, &upload);
                async move {
                    let len = r.end - r.start;
                    let part = match (copy, base) {
                        (true, Some(b)) => {
                            store
                                .upload_part_copy(key, upload, n, &b.key, r, Some(&b.etag))
                                .await?
                        }
                        _ => store.upload_part(key, upload, n, this.body(r)).await?,
                    };
                    progress.done_bytes.fetch_add(len, Ordering::Relaxed);
                    Ok(part)
                }
            })
            .buffered(opts.concurrency.max(1))
            .try_collect()
            .await;
        let plan = parts;
        let parts = match results {
            Ok(parts) => parts,
            Err(e) => {
                self.uploads.retain(|u| u.id != upload.id);
                abort_quietly(store, key, &upload.id).await;
                return Err(WriteError::Store(e));
            }
        };
        if let Some(j) = &mut self.journal {
            j.parts_sent(&parts, self.size, self.outside.is_some())?;
            self.sent_since_write = true;
            self.attempted = true;
        }
        let sent: outside::Sent = plan
            .iter()
            .zip(&parts)
            .map(|((_, r, _), p)| (r.clone(), p.sent_crc32c))
            .collect();
        let r = complete(store, key, &upload.id, parts).await;
        self.uploads.retain(|u| u.id != upload.id);
        if let (Some(o), Ok(_)) = (&self.outside, &r) {
            o.uploaded(sent);
        }
        r
    }

    /// Completes a streaming upload: waits for the parts sent, sends the
    /// tail as the last part.
    async fn finish_stream(
        &mut self,
        s: &mut stream::Streaming,
        store: &dyn ObjectStore,
        progress: &Progress,
    ) -> Result<PutResult, WriteError> {
        let mut parts = s.finish(progress).await?;
        if self.size > s.next_offset {
            let part = store
                .upload_part(
                    &s.key,
                    &s.upload,
                    s.next_part,
                    self.body(s.next_offset..self.size),
                )
                .await?;
            parts.push(part);
        }
        if let Some(j) = &mut self.journal {
            j.parts_sent(&parts, self.size, self.outside.is_some())?;
            self.sent_since_write = true;
            self.attempted = true;
        }
        let put = complete(store, &s.key, &s.upload.id, parts).await?;
        progress.done_bytes.store(self.size, Ordering::Relaxed);
        Ok(put)
    }

    /// Cuts the file into parts: untouched runs of the base (at least S3's
    /// minimum part size, or the tail) are copied server-side; the rest is
    /// uploaded in parts of `part` bytes. So an append to a large object
    /// sends only the appended bytes. Falls back to uniform parts if the
    /// plan would need more than 10,000 parts.
    fn plan_parts(&self, part: u64) -> Vec<(i32, Range<u64>, bool)> {
        let copy_max = part.max(COPY_PART_MAX_BYTES);
        let mut plan = Vec::new();
        let mut pos = 0;
        while pos < self.size {
            let clean_end = if self.base.is_some() && self.copy_ok && pos < self.base_valid {
                self.loaded
                    .next_start(pos)
                    .unwrap_or(u64::MAX)
                    .min(self.base_valid)
            } else {
                pos
            };
            let clean = clean_end - pos;
            let len = if clean >= MIN_PART_SIZE_BYTES || (clean > 0 && clean_end == self.size) {
                clean.min(copy_max)
            } else {
                0
            };
            if len > 0 {
                plan.push((pos..pos + len, true));
                pos += len;
            } else {
                let end = (pos + part).min(self.size);
                plan.push((pos..end, false));
                pos = end;
            }
        }
        if plan.len() as u64 > MAX_PARTS {
            plan = (0..self.size)
                .step_by(part as usize)
                .map(|s| (s..(s + part).min(self.size), false))
                .collect();
        }
        plan.into_iter()
            .enumerate()
            .map(|(i, (r, copy))| (i as i32 + 1, r, copy))
            .collect()
    }

    /// The object at the key changed by this mount's own doing (an upload,
    /// a metadata self-copy, a rename): the staged bytes are that object's,
    /// now at `key`.
    pub fn rebase(&mut self, key: &str, put: &PutResult) {
        if self.outside.is_some() {
            // The kernel may write on: the staged file stays all of the
            // data, which replaces what just landed.
            self.replaces = Some(put.etag.clone());
            self.data_changed = false;
            return;
        }
        self.base = Some(Base {
            key: key.to_string(),
            etag: put.etag.clone(),
            size: self.size,
            version: put.version_id.clone(),
        });
        self.replaces = Some(put.etag.clone());
        self.base_valid = self.size;
        self.copy_ok = true;
        self.data_changed = false;
    }

    /// The object behind an unchanged staged file moved or got new
    /// metadata (same bytes, a new identity), by this mount.
    pub fn base_moved(&mut self, key: &str, put: &PutResult) {
        if let Some(b) = &mut self.base {
            b.key = key.to_string();
            b.etag = put.etag.clone();
            b.version = put.version_id.clone();
        }
        self.replaces = Some(put.etag.clone());
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if let Some(s) = self.stream.take() {
            s.cancel();
        }
        if self.keep_files {
            return;
        }
        if self.journal.is_some() {
            // Dirty data not in S3: never deleted. A later mount (or this
            // one's recovery pass) uploads it.
            warn!(path = %self.path.display(), "staged data not in S3 is kept for recovery");
            return;
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Aborts a multipart upload, logging (not returning) a failure.
pub(crate) async fn abort_quietly(store: &dyn ObjectStore, key: &str, upload_id: &str) {
    if let Err(e) = store.abort_multipart(key, upload_id).await {
        warn!(key, error = %e, "could not abort a multipart upload");
    }
}

/// The ETag S3 gives a multipart object made of parts with these ETags
/// (each the MD5 of its part): MD5 of the parts' MD5s, `-` part count.
/// None when a part ETag is not an MD5 (SSE-KMS, some stores).
fn multipart_etag(parts: &[Part]) -> Option<String> {
    use md5::Digest;
    let mut h = md5::Md5::new();
    for p in parts {
        let hex = p.etag.trim_matches('"');
        if hex.len() != 32 {
            return None;
        }
        for i in (0..32).step_by(2) {
            h.update([u8::from_str_radix(&hex[i..i + 2], 16).ok()?]);
        }
    }
    let d = h.finalize();
    Some(format!("\"{}-{}\"", crate::hex(&d), parts.len()))
}

pub(crate) fn same_etag(a: &str, b: &str) -> bool {
    a.trim_matches('"') == b.trim_matches('"')
}

/// The object at `key` when it has ETag `etag` (and holds `meta`, when
/// given): an upload whose answer was an error landed after all.
async fn landed_anyway(
    store: &dyn ObjectStore,
    key: &str,
    etag: &str,
    meta: Option<&Metadata>,
) -> Option<PutResult> {
    let o = store.head(key, None).await.ok()?;
    (same_etag(&o.etag, etag) && meta.is_none_or(|m| holds_meta(&o, m))).then_some(PutResult {
        etag: o.etag,
        version_id: o.version_id,
        sent_crc32c: None,
    })
}

/// Whether object `o` has every entry of `meta` in its user metadata.
fn holds_meta(o: &crate::store::ObjectInfo, meta: &Metadata) -> bool {
    o.metadata
        .as_ref()
        .is_some_and(|got| meta.iter().all(|(k, v)| got.get(k) == Some(v)))
}

/// Whether ETag `c` is that of one of these uploads: single PUTs (their
/// ETags) or multipart uploads (their part sets).
fn one_of(c: &str, puts: &[String], part_sets: &[Vec<Part>]) -> bool {
    puts.iter().any(|p| same_etag(c, p))
        || part_sets
            .iter()
            .any(|ps| !ps.is_empty() && multipart_etag(ps).is_some_and(|m| same_etag(c, &m)))
}

/// CompleteMultipartUpload. S3 may take minutes and answer a retry of a
/// Complete that did land with NoSuchUpload, or time out after it landed:
/// on a failure the object is looked at, and an object with exactly this
/// upload's ETag is a success.
async fn complete(
    store: &dyn ObjectStore,
    key: &str,
    upload_id: &str,
    parts: Vec<Part>,
) -> Result<PutResult, WriteError> {
    let expected = multipart_etag(&parts);
    match store.complete_multipart(key, upload_id, parts).await {
        Ok(put) => Ok(put),
        Err(e) => {
            if let Some(exp) = &expected
                && let Some(put) = landed_anyway(store, key, exp, None).await
            {
                info!(key, error = %e, "CompleteMultipartUpload failed, but the object landed");
                return Ok(put);
            }
            // Not landed: abort it (the staged data stays, and the next
            // attempt starts a fresh upload).
            abort_quietly(store, key, upload_id).await;
            Err(WriteError::Store(e))
        }
    }
}

fn journal_path(staged: &Path) -> PathBuf {
    let mut p = staged.as_os_str().to_owned();
    p.push(JOURNAL_SUFFIX);
    PathBuf::from(p)
}

/// What recovery did with one staged file a dead daemon left.
#[derive(Debug)]
pub struct Recovered {
    pub key: String,
    /// Where the data went: the key itself, or a `.bucketfs-recovered-`
    /// name beside it when the object changed meanwhile; empty when
    /// nothing was to be uploaded (unlinked, or already in S3).
    pub uploaded_as: String,
    /// Ranges that came from an object no longer available were zeros.
    pub incomplete: bool,
}

/// Finishes the uploads of staged files in `dir` that no live mount holds
/// (a killed daemon's): each goes to its key if the object there is still
/// the one the data replaces (same ETag, or still absent for a new file),
/// else beside it as `KEY.bucketfs-recovered-<time>`, once. Files that
/// fail stay for the next try. Staging files without a journal held
/// nothing dirty and are removed.
pub async fn recover(
    store: &dyn ObjectStore,
    dir: &Path,
    opts: &UploadOptions,
) -> Vec<Result<Recovered, String>> {
    let mut out = Vec::new();
    for f in scan(store, dir, std::time::SystemTime::now()).await {
        out.push(match f {
            Ok(Found::Done(r)) => Ok(r),
            Ok(Found::Pending(a)) => a.upload_now(store, opts).await,
            // Dropped: the tombstone stays for the next try.
            Ok(Found::Removal(e, _)) | Err(e) => Err(e),
            Ok(Found::Busy(p)) => Err(busy(&p)),
        });
    }
    out
}

/// Multipart uploads a discarded file left open: a dead mount's, taken
/// over to be completed, or cancelled streams' whose abort may not be
/// done. Its journal, final, names them until they are aborted.
#[must_use = "abort the uploads (`abort_in_background`), or they stay open until the next mount"]
#[derive(Debug)]
pub struct Leftover {
    /// (key, upload id)
    uploads: Vec<(String, String)>,
    journal: Option<Journal>,
}

impl Leftover {
    /// Aborts the uploads, then removes the journal; one that fails
    /// leaves the journal for the next mount's recovery.
    pub fn abort_in_background(self, store: Arc<dyn ObjectStore>) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        rt.spawn(async move {
            let mut all = true;
            for (key, id) in &self.uploads {
                match store.abort_multipart(key, id).await {
                    Ok(()) | Err(StoreError::NotFound) => {}
                    Err(e) => {
                        all = false;
                        warn!(key, upload = %id, error = %e,
                            "could not abort a discarded file's upload; the next mount aborts it");
                    }
                }
            }
            if all && let Some(j) = self.journal {
                j.remove();
            }
        });
    }
}

/// A dead mount's staged file, decided on and ready to upload to `target`
/// (its key, or beside it when the object there changed meanwhile).
#[derive(Debug)]
pub struct Adoptable {
    /// The key the data was written for.
    pub key: String,
    /// Where it goes.
    pub target: String,
    pub meta: Metadata,
    /// The object at `target` now, if any.
    pub current: Option<crate::store::ObjectInfo>,
    pub incomplete: bool,
    pub staged: Staged,
    journal: PathBuf,
    /// Put at its key by a rename cut short (`JournalHeader::over`):
    /// journaled again, so a kill before it lands puts it there too.
    over: Option<Vec<String>>,
}

impl Adoptable {
    /// Takes the staged data over as this mount's, journaled under its
    /// target: from now on it is a dirty file like any other (a crash
    /// again leaves it for the next mount).
    pub fn into_staged(mut self) -> io::Result<Staged> {
        let h = JournalHeader {
            key: self.target.clone(),
            base_etag: self.staged.base.as_ref().map(|b| b.etag.clone()),
            base_version: self.staged.base.as_ref().and_then(|b| b.version.clone()),
            replaces: self.staged.replaces.clone(),
            over: self.over.clone(),
            written_with: self.staged.written_with.clone(),
            base_valid: self.staged.base_valid,
            size: self.staged.size,
            meta: self.meta.clone(),
        };
        // A dead mount's upload to complete stays journaled with its
        // parts, so a kill now leaves it to the next mount again. The new
        // journal replaces the old one whole, in one rename: a header
        // without the writes would say the data is the base's.
        let (uploads, sent) = match &self.staged.resume {
            Some(r) => (
                vec![r.upload.clone()],
                Some((r.parts.as_slice(), self.staged.size)),
            ),
            None => (Vec::new(), None),
        };
        let j = Journal::create_with(
            self.journal.clone(),
            &h,
            &journal::changes_for(&self.staged.loaded, &uploads, sent),
        )?;
        self.staged.uploads = uploads;
        self.staged.journal = Some(j);
        self.staged.header = Some(h);
        self.staged.keep_files = false;
        Ok(self.staged)
    }

    /// Uploads it here and now (recovery without a mount to serve it).
    pub async fn upload_now(
        mut self,
        store: &dyn ObjectStore,
        opts: &UploadOptions,
    ) -> Result<Recovered, String> {
        let result = self
            .staged
            .upload(
                store,
                &self.target,
                &self.meta,
                // Headers are kept only of the object the data replaces
                // (not of one a rename put it over).
                self.current
                    .as_ref()
                    .filter(|_| self.staged.replaces.is_some())
                    .and_then(|c| c.headers.as_deref()),
                opts,
                &Progress::default(),
            )
            .await;
        if let Err(e) = result {
            return Err(format!("{}: {e} (kept for the next try)", self.key));
        }
        self.staged.keep_files = false;
        drop(self.staged);
        let _ = std::fs::remove_file(&self.journal);
        Ok(Recovered {
            key: self.key,
            uploaded_as: self.target,
            incomplete: self.incomplete,
        })
    }
}

/// What recovery found in one staged file.
#[derive(Debug)]
pub enum Found {
    /// Nothing left to upload (unlinked, already landed, a tombstone).
    Done(Recovered),
    /// Data to upload.
    Pending(Box<Adoptable>),
    /// A dead mount's deferred delete that failed (why), its tombstone
    /// locked: to keep and try again, or drop for the next try.
    Removal(String, Box<tombstone::Tombstone>),
    /// A dead mount's staged file still held open (locked): the kernel
    /// keeps one its writers write to through passthrough until they
    /// close. To look at again.
    Busy(PathBuf),
}

/// Finds the staged files in `dir` that no live mount holds, settles what
/// needs no upload, and hands back the rest, locked, for this mount to
/// upload (serving them meanwhile).
/// Multipart uploads of a recovered key started before `cutoff` (this
/// mount's start) are a dead daemon's: one killed between starting an
/// upload and journaling its id leaves one nobody recorded.
pub async fn scan(
    store: &dyn ObjectStore,
    dir: &Path,
    cutoff: std::time::SystemTime,
) -> Vec<Result<Found, String>> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    // Deferred deletes first: the objects they remove were gone for the
    // dead mount before anything staged after (a new file at the key of
    // an unlinked one still read then finds the key empty, not kept).
    names.sort_by(|a, b| {
        (!a.starts_with(tombstone::PREFIX), a).cmp(&(!b.starts_with(tombstone::PREFIX), b))
    });
    let overs = RenamesOver::find(dir, &names);
    let mut out = Vec::new();
    for name in &names {
        let path = dir.join(name);
        // Gone since the listing (a journal settled with its staging file).
        if std::fs::symlink_metadata(&path).is_err() || !crate::private::trusted(&path) {
            continue;
        }
        if let Some(stage) = name.strip_suffix(JOURNAL_SUFFIX) {
            // A journal is handled with its staging file; one whose staging
            // file is gone has nothing to upload. One of an unlinked file
            // names the uploads its mount was still aborting.
            if !names.iter().any(|n| n == stage) {
                let mut settled = true;
                if let Ok(r) = journal::replay(&path)
                    && r.unlinked
                {
                    for id in &r.uploads {
                        match store.abort_multipart(&r.header.key, &id.id).await {
                            Ok(()) | Err(StoreError::NotFound) => {}
                            Err(e) => {
                                settled = false;
                                out.push(Err(format!(
                                    "{}: abort of an unlinked file's upload: {e} (kept for the next try)",
                                    r.header.key
                                )));
                            }
                        }
                    }
                }
                if settled {
                    let _ = std::fs::remove_file(&path);
                }
            }
            continue;
        }
        if name.starts_with(TMP_PREFIX) {
            // A staging file a dead daemon was creating: never had data.
            if let Ok(f) = File::open(&path)
                && try_lock(&f).unwrap_or(false)
            {
                let _ = std::fs::remove_file(&path);
            }
            continue;
        }
        if name.starts_with(tombstone::PREFIX) {
            if let Err((e, t)) = tombstone::recover(store, &path).await {
                out.push(Ok(Found::Removal(e, Box::new(t))));
            }
            continue;
        }
        if !name.starts_with(STAGE_PREFIX) || name.contains(JOURNAL_SUFFIX) {
            continue;
        }
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
        {
            Ok(f) => f,
            Err(_) => continue,
        };
        match try_lock(&file) {
            Ok(true) => {}
            // Held by a live mount (this one or another), or one made
            // before this mount started: a dead mount's, its lock kept by
            // a writer's passthrough handle (the kernel holds the dead
            // daemon's descriptor for it) until the writer closes.
            Ok(false) if made_before(name, cutoff) && !locked_by_this_process(&file) => {
                out.push(Ok(Found::Busy(path.clone())));
                continue;
            }
            Ok(false) => continue,
            Err(e) => {
                out.push(Err(format!("{}: cannot lock: {e}", path.display())));
                continue;
            }
        }
        let journal = journal_path(&path);
        if !journal.exists() {
            let _ = std::fs::remove_file(&path);
            continue;
        }
        if !crate::private::trusted(&journal) {
            continue;
        }
        out.push(prepare_one(store, file, &path, &journal, cutoff, &overs).await);
    }
    out
}

/// Renames a kill cut short, as the staged files nobody holds tell them:
/// a new file renamed over another before any of its bytes were sent is
/// journaled at the other's key (`JournalHeader::over`) before that
/// object is deleted, and the file replaced journals its removal (`D`).
/// Each alone would look like another client's change at the key; seen
/// together, the rename goes through: the source's data goes to the key,
/// the replaced file's is dropped.
#[derive(Default)]
struct RenamesOver {
    /// Key → the journal of the file renamed over it.
    to: HashMap<String, PathBuf>,
    /// Key → the journals of the files being replaced there.
    replaced: HashMap<String, Vec<journal::Replayed>>,
}

impl RenamesOver {
    fn find(dir: &Path, names: &[String]) -> RenamesOver {
        let mut found = RenamesOver::default();
        let mut removing = Vec::new();
        for name in names {
            if !name.starts_with(STAGE_PREFIX) || name.contains(JOURNAL_SUFFIX) {
                continue;
            }
            let (path, journal) = (dir.join(name), journal_path(&dir.join(name)));
            // A live mount's (locked) is not a dead one's rename.
            let free = File::open(&path).is_ok_and(|f| try_lock(&f).unwrap_or(false));
            if !free || !crate::private::trusted(&journal) {
                continue;
            }
            let Ok(r) = journal::replay(&journal) else {
                continue;
            };
            if r.unlinked {
                continue;
            }
            // A file being replaced in its turn (`D`) was renamed over
            // another before, and that rename had finished (its state was
            // held until it had): a victim, not a rename in flight.
            if r.removing {
                removing.push(r);
            } else if r.header.over.is_some() {
                found.to.insert(r.header.key.clone(), journal);
            }
        }
        for r in removing {
            if found.to.contains_key(&r.header.key) {
                found
                    .replaced
                    .entry(r.header.key.clone())
                    .or_default()
                    .push(r);
            }
        }
        found
    }

    /// Whether the object at `key` (`current`; none) may be left there by
    /// the file a rename to `key` was replacing: the data renamed there
    /// goes over it.
    fn replaceable(&self, key: &str, over: &[String], current: Option<&str>) -> bool {
        let Some(c) = current else {
            return true;
        };
        over.iter().any(|e| same_etag(c, e))
            || self.replaced.get(key).is_some_and(|rs| {
                rs.iter().any(|r| {
                    one_of(c, &r.puts, std::slice::from_ref(&r.parts))
                        || one_of(c, &r.earlier_puts, &r.earlier_parts)
                        || [&r.header.base_etag, &r.header.replaces]
                            .into_iter()
                            .flatten()
                            .any(|e| same_etag(c, e))
                })
            })
    }

    /// Whether the file journaled at `journal` was being replaced by a
    /// rename that went through (see the type).
    fn replaced_by_rename(&self, r: &journal::Replayed, journal: &Path) -> bool {
        r.removing && self.to.get(&r.header.key).is_some_and(|j| j != journal)
    }
}

/// The metadata keys of the times every write moves (s3fs-fuse's
/// `x-amz-meta-mtime` and `x-amz-meta-ctime`).
const WRITE_TIME_KEYS: [&str; 2] = ["mtime", "ctime"];

/// Whether `a` and `b` hold the same entries, `except` aside.
fn same_except(a: &Metadata, b: &Metadata, except: &[&str]) -> bool {
    let strip = |m: &Metadata| {
        m.iter()
            .filter(|(k, _)| !except.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    strip(a) == strip(b)
}

/// Single PUTs up to this size are read into memory once, not streamed
/// from the staging file (a read for the MD5, another for the body).
const IN_MEMORY_PUT_MAX: u64 = 8 << 20;

/// The MD5 ETag of `data`, as S3 gives a single PUT.
fn bytes_md5(data: &[u8]) -> String {
    use md5::Digest;
    format!("\"{}\"", crate::hex(&md5::Md5::digest(data)))
}

/// The MD5 ETag of a file's first `size` bytes.
fn file_md5(file: &File, size: u64) -> io::Result<String> {
    use md5::Digest;
    let mut h = md5::Md5::new();
    let mut buf = vec![0u8; size.min(1 << 20) as usize];
    let mut pos = 0;
    while pos < size {
        let n = ((size - pos) as usize).min(buf.len());
        file.read_exact_at(&mut buf[..n], pos)?;
        h.update(&buf[..n]);
        pos += n as u64;
    }
    Ok(format!("\"{}\"", crate::hex(&h.finalize())))
}

async fn prepare_one(
    store: &dyn ObjectStore,
    file: File,
    stage: &Path,
    journal: &Path,
    cutoff: std::time::SystemTime,
    overs: &RenamesOver,
) -> Result<Found, String> {
    let r = journal::replay(journal).map_err(|e| e.to_string())?;
    let key = r.header.key.clone();
    match store.list_uploads(&key).await {
        Ok(ups) => {
            for (id, started) in ups {
                if started < cutoff && !r.uploads.iter().any(|u| u.id == id) {
                    debug!(key, upload = %id, "aborting a dead mount's unrecorded multipart upload");
                    abort_quietly(store, &key, &id).await;
                }
            }
        }
        Err(e) => debug!(key, error = %e, "cannot list multipart uploads"),
    }
    let done = |uploaded_as: String| {
        Found::Done(Recovered {
            key: key.clone(),
            uploaded_as,
            incomplete: false,
        })
    };
    if r.unlinked {
        let _ = std::fs::remove_file(journal);
        let _ = std::fs::remove_file(stage);
        for u in &r.uploads {
            abort_quietly(store, &key, &u.id).await;
        }
        return Ok(done(String::new()));
    }
    let size = if r.header.base_etag.is_none() {
        file.metadata().map_err(|e| e.to_string())?.len()
    } else {
        r.size
    };
    file.set_len(size).map_err(|e| e.to_string())?;
    // An object under another SSE-C key than this mount's is not the one
    // the data replaces (this mount could read that one): the data goes
    // beside it. Retrying would never get further.
    let (current_info, foreign) = match store.head(&key, None).await {
        Ok(o) => (Some(o), false),
        Err(StoreError::NotFound) => (None, false),
        Err(e) if e.is_sse_c_refusal() => (None, true),
        Err(e) => return Err(format!("{key}: {e}")),
    };
    let current = current_info.as_ref().map(|o| o.etag.clone());
    // The dead daemon's last upload may have landed before it could say
    // so: then the object is exactly these bytes (a multipart upload's
    // ETag from its journaled parts, a single PUT's from the data).
    let journaled_landed = current
        .as_ref()
        .is_some_and(|c| one_of(c, &r.puts, std::slice::from_ref(&r.parts)));
    // A new file's bytes are compared whole (a read of all of them, so
    // only where no journaled upload matched): the object may hold them
    // from an upload before a change of attributes only (a chmod of the
    // closed file): then it has not landed, but it is what the data
    // replaces (journaled puts and parts are of the last change already).
    let same_bytes = !journaled_landed
        && r.header.base_etag.is_none()
        && current
            .as_ref()
            .is_some_and(|c| file_md5(&file, size).is_ok_and(|m| same_etag(c, &m)));
    // The key holds this file's own older bytes: an upload that answered
    // an error but was carried out (perhaps after this daemon gave up on
    // it) before the data changed again. Only for data without a base,
    // the staging file being all of it.
    let own_earlier = r.header.base_etag.is_none()
        && current
            .as_ref()
            .is_some_and(|c| one_of(c, &r.earlier_puts, &r.earlier_parts));
    let meta_landed = current_info
        .as_ref()
        .is_some_and(|o| holds_meta(o, &r.header.meta));
    // The object holds exactly these bytes. It is what the data is only
    // with the journaled metadata too: a PUT that failed before the store
    // took it journals the ETag of the same bytes already there, and a
    // chmod since would be lost.
    let own_bytes = journaled_landed || same_bytes;
    let landed = own_bytes && meta_landed;
    // A rename of this new file over another, cut short: the key holds
    // what it replaces, or nothing.
    let renamed_over = r
        .header
        .over
        .as_ref()
        .is_some_and(|over| !foreign && overs.replaceable(&key, over, current.as_deref()));
    let unchanged = !foreign
        && (own_bytes
            || own_earlier
            || renamed_over
            || match (&current, &r.header.replaces) {
                (None, None) => true,
                (Some(c), Some(e)) => same_etag(c, e),
                _ => false,
            });
    // Every part of the data was sent (the set sealed in the journal) and
    // the key still holds what the data replaces: the upload is completed,
    // with the checksums its parts were sent with, instead of sent again.
    let resume = match r.uploads.last() {
        Some(u) if !landed && unchanged && r.parts_sealed == Some(size) && !r.parts.is_empty() => {
            Some(Resume {
                key: key.clone(),
                upload: u.clone(),
                parts: r.parts.clone(),
                current: true,
            })
        }
        _ => None,
    };
    for u in &r.uploads {
        if resume.as_ref().is_none_or(|keep| keep.upload.id != u.id) {
            abort_quietly(store, &key, &u.id).await;
        }
    }
    if landed {
        let _ = std::fs::remove_file(journal);
        let _ = std::fs::remove_file(stage);
        return Ok(done(key.clone()));
    }
    // Nothing but new metadata for the object (a deferred chmod, chown or
    // utimes): stored by a copy of the object onto itself while the key
    // still holds it; an object replaced or removed since has nothing to
    // take them.
    // The base object's own size, where the key still holds it: a
    // journal rewritten since (compacted, or taken over by a mount killed
    // in its turn) has the truncated size in its header.
    let base_object_size = current_info
        .as_ref()
        .filter(|o| {
            r.header
                .base_etag
                .as_ref()
                .is_some_and(|b| same_etag(&o.etag, b))
        })
        .map(|o| o.size);
    let data_changed = r.header.base_etag.is_none()
        || r.loaded.ranges().next().is_some()
        || r.size != r.header.size
        || r.base_valid != r.header.size
        || base_object_size.is_some_and(|s| s != r.size || r.base_valid != s);
    // Also an `O_TRUNC` open (or a create) that wrote nothing, of an
    // object replaced or removed since (the daemon died in the middle of
    // a rename over it, or an unlink): an empty copy beside the newer
    // object would keep nothing.
    let dropped = if overs.replaced_by_rename(&r, journal) {
        Some("the data of a file a rename was replacing")
    } else if unchanged {
        None
    } else if r.removing {
        Some("the data of a file this mount was removing or replacing")
    } else if !data_changed {
        Some("a deferred change of attributes")
    } else if size == 0 && r.loaded.ranges().next().is_none() {
        Some("an emptied file that was never written")
    } else {
        None
    };
    if let Some(what) = dropped {
        info!(
            key,
            "{what} is dropped: the object was replaced or removed since"
        );
        let _ = std::fs::remove_file(journal);
        let _ = std::fs::remove_file(stage);
        return Ok(done(String::new()));
    }
    let target = if unchanged {
        key.clone()
    } else {
        beside_name(&key)
    };
    let base = r.header.base_etag.clone().map(|etag| Base {
        key: key.clone(),
        etag,
        size: base_object_size.unwrap_or(r.size),
        version: r.header.base_version.clone(),
    });
    // The old object's untouched ranges: from the key while it is that
    // object, else by its version id (a real one: "null" names whatever is
    // current). Without either they cannot be had and stay zero.
    let base_unchanged = base
        .as_ref()
        .is_some_and(|b| current.as_ref().is_some_and(|c| same_etag(c, &b.etag)));
    let has_version = r.header.base_version.as_ref().is_some_and(|v| v != "null");
    let base_readable = base_unchanged || has_version;
    let incomplete = base.is_some()
        && !base_readable
        && !r.loaded.missing(0..r.base_valid.min(r.size)).is_empty();
    let staged = Staged {
        file: Arc::new(file),
        path: stage.to_path_buf(),
        size,
        base_valid: if base_readable { r.base_valid } else { 0 },
        // Beside the key, the data is a new object.
        replaces: if own_bytes || own_earlier {
            current.clone()
        } else if unchanged {
            r.header.replaces.clone()
        } else {
            None
        },
        base: if base_readable { base } else { None },
        loaded: r.loaded,
        journal: None,
        header: None,
        uploads: Vec::new(),
        resume,
        copy_ok: base_unchanged,
        unlinked: false,
        stream: None,
        keep_files: true,
        sent_since_write: false,
        attempted: true,
        meta_set: false,
        data_changed,
        written_with: r.header.written_with.clone(),
        outside: None,
    };
    Ok(Found::Pending(Box::new(Adoptable {
        key,
        current: if unchanged { current_info } else { None },
        target,
        meta: r.header.meta.clone(),
        incomplete,
        staged,
        journal: journal.to_path_buf(),
        // What the key holds is what the rename goes over (also when it
        // was the replaced file's own upload, whose journal goes now).
        over: r.header.over.clone().filter(|_| unchanged).map(|mut over| {
            if let Some(c) = current.as_ref().filter(|_| renamed_over)
                && !over.iter().any(|e| same_etag(e, c))
            {
                over.push(c.clone());
            }
            over
        }),
    })))
}

/// Where data goes when the object at `key` changed under it:
/// `KEY.bucketfs-recovered-<time>`.
pub fn beside_name(key: &str) -> String {
    format!(
        "{key}.bucketfs-recovered-{}",
        humantime::format_rfc3339_seconds(std::time::SystemTime::now())
            .to_string()
            .replace(':', "")
    )
}

/// The part size for a file: at least the configured one and S3's minimum,
/// growing so the file fits in 10,000 parts.
pub fn part_size(file_size: u64, configured: u64) -> u64 {
    let mut p = configured.max(MIN_PART_SIZE_BYTES);
    while file_size.div_ceil(p) > MAX_PARTS {
        p *= 2;
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Op;

    #[test]
    fn a_staging_file_tells_when_it_was_made() {
        let dir = tempfile::tempdir().unwrap();
        let (_f, path) = new_staging_file(dir.path()).unwrap();
        let name = path.file_name().unwrap().to_str().unwrap();
        let now = std::time::SystemTime::now();
        assert!(made_before(name, now + std::time::Duration::from_millis(1)));
        assert!(!made_before(name, now - std::time::Duration::from_secs(1)));
        assert!(!made_before("stage-zz-1-2", now), "not ours: not before");
        // Its lock is this process's, however it is opened; a file
        // nobody locked is not.
        let other = File::open(&path).unwrap();
        assert!(locked_by_this_process(&other));
        let loose = std::fs::File::create(dir.path().join("loose")).unwrap();
        assert!(!locked_by_this_process(&loose));
    }
    use crate::store::memory::MemStore;
    use journal::{checksum as journal_sum, enc as journal_enc};

    const MIB: u64 = 1024 * 1024;

    /// Uploads `st` as `key` with no metadata, the tests' options.
    async fn upload_to(
        st: &mut Staged,
        store: &dyn ObjectStore,
        key: &str,
    ) -> Result<PutResult, WriteError> {
        st.upload(
            store,
            key,
            &Metadata::new(),
            None,
            &opts(),
            &Progress::default(),
        )
        .await
    }

    fn opts() -> UploadOptions {
        UploadOptions {
            part_size_bytes: 5 * MIB,
            concurrency: 4,
        }
    }

    /// With passthrough, what the last upload sent is kept (CRC32C per
    /// range, single PUT and multipart) and the staged file checked
    /// against it: a change whose stamp was taken account of without an
    /// upload after it (a store through a mapping that landed after the
    /// upload read the page) is told, and the same bytes are not.
    #[tokio::test]
    async fn a_passthrough_file_is_checked_against_what_its_last_upload_sent() {
        let dir = tempfile::tempdir().unwrap();
        if !outside::fine_grained_times(dir.path()).unwrap() {
            eprintln!("no fine-grained change times here: skipped");
            return;
        }
        let crc = MemStore::versioned();
        // A store that takes no part checksums: the parts' Content-MD5 is
        // checked, and the CRC32C kept is computed in the same pass.
        let md5_only = MemStore::versioned();
        md5_only.without_part_checksums();
        for (s, size) in [
            (&crc, 100_000usize),
            (&crc, 12 * MIB as usize),
            (&md5_only, 12 * MIB as usize),
        ] {
            let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            let mut st = Staged::new(dir.path(), None, None).unwrap();
            let o = st.go_outside().unwrap();
            o.file().write_all_at(&data, 0).unwrap();
            assert!(st.sync_outside().unwrap().is_some());
            assert!(!o.holds_last_upload().unwrap(), "nothing uploaded yet");
            upload_to(&mut st, s, "k").await.unwrap();
            assert_eq!(s.object("k").unwrap(), data);
            assert!(o.holds_last_upload().unwrap(), "{size}: as uploaded");
            let mid = (size / 2) as u64;
            o.file().write_all_at(b"late", mid).unwrap();
            // Its stamp taken, no upload since.
            assert!(st.sync_outside().unwrap().is_some());
            assert!(!o.holds_last_upload().unwrap(), "{size}: a late store");
            o.file()
                .write_all_at(&data[mid as usize..mid as usize + 4], mid)
                .unwrap();
            assert!(
                o.holds_last_upload().unwrap(),
                "{size}: the same bytes again"
            );
            o.file().write_all_at(b"x", size as u64).unwrap();
            assert!(!o.holds_last_upload().unwrap(), "{size}: one byte longer");
        }
    }

    #[test]
    fn part_size_fits_five_tib_in_ten_thousand_parts() {
        assert_eq!(part_size(1, 8 * MIB), 8 * MIB);
        assert_eq!(part_size(1, MIB), 5 * MIB);
        let p = part_size(5 * 1024 * 1024 * MIB, 8 * MIB);
        assert!((5 * 1024 * 1024 * MIB).div_ceil(p) <= MAX_PARTS);
    }

    #[tokio::test]
    async fn append_to_large_object_copies_untouched_parts() {
        let dir = tempfile::tempdir().unwrap();
        let s = MemStore::versioned();
        let orig: Vec<u8> = (0..12 * MIB).map(|i| (i % 251) as u8).collect();
        let put = s.insert("big", &orig, Metadata::new());
        let base = Base {
            key: "big".into(),
            etag: put.etag,
            size: orig.len() as u64,
            version: None,
        };
        let mut st = Staged::new(dir.path(), Some(base), None).unwrap();
        st.write(orig.len() as u64, b"tail").unwrap();
        upload_to(&mut st, &s, "big").await.unwrap();
        let mut want = orig.clone();
        want.extend_from_slice(b"tail");
        assert_eq!(s.object("big").unwrap().as_ref(), &want[..]);
        assert_eq!(s.counters().get(Op::Get), 0, "nothing is read back");
        assert_eq!(s.counters().get(Op::UploadPartCopy), 1);
        assert_eq!(
            s.counters().bytes().0,
            4,
            "only the appended bytes are sent"
        );
        assert_eq!(s.open_uploads(), 0);
    }

    #[tokio::test]
    async fn failed_multipart_is_aborted_and_object_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let s = MemStore::versioned();
        s.insert("k", b"old", Metadata::new());
        let mut st = Staged::new(dir.path(), None, None).unwrap();
        st.write(0, &vec![7u8; (11 * MIB) as usize]).unwrap();
        s.fail_next(Op::UploadPart, 1, StoreError::Transient("503".into()));
        assert!(upload_to(&mut st, &s, "k").await.is_err());
        assert_eq!(s.object("k").unwrap().as_ref(), b"old");
        assert_eq!(s.open_uploads(), 0);
    }

    #[tokio::test]
    async fn truncate_then_extend_reads_zeros_not_old_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let s = MemStore::versioned();
        let put = s.insert("k", b"abcdefgh", Metadata::new());
        let base = Base {
            key: "k".into(),
            etag: put.etag,
            size: 8,
            version: None,
        };
        let mut st = Staged::new(dir.path(), Some(base), None).unwrap();
        st.truncate(3).unwrap();
        st.truncate(6).unwrap();
        st.write(7, b"Z").unwrap();
        assert_eq!(st.read(&s, 0, 100).await.unwrap().as_ref(), b"abc\0\0\0\0Z");
    }

    /// Leaves a staged file and its journal as a killed daemon would (no
    /// lock held; the name may even carry this process's pid).
    fn leave_staged(dir: &Path, n: u32, base: Option<Base>, writes: &[(u64, &[u8])]) {
        let path = dir.join(format!("stage-{}-{n}", std::process::id()));
        let size = base.as_ref().map_or(0, |b| b.size);
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(size).unwrap();
        let key = base.as_ref().map_or("new".to_string(), |b| b.key.clone());
        let h = JournalHeader {
            key,
            base_etag: base.as_ref().map(|b| b.etag.clone()),
            base_version: base.as_ref().and_then(|b| b.version.clone()),
            replaces: base.as_ref().map(|b| b.etag.clone()),
            over: None,
            written_with: WrittenWith::default(),
            base_valid: size,
            size,
            meta: Metadata::new(),
        };
        let mut j = Journal::create(journal_path(&path), &h).unwrap();
        for (off, data) in writes {
            file.write_all_at(data, *off).unwrap();
            j.wrote(*off, data.len() as u64).unwrap();
        }
        std::mem::forget(j);
    }

    #[tokio::test]
    async fn recovery_uploads_what_a_killed_daemon_staged() {
        let dir = tempfile::tempdir().unwrap();
        let s = MemStore::versioned();
        // A new file, never uploaded.
        leave_staged(dir.path(), 1, None, &[(0, b"brand new")]);
        // An edit in the middle of an object that has not changed since.
        let p = s.insert("same", b"0123456789", Metadata::new());
        let base = Base {
            key: "same".into(),
            etag: p.etag,
            size: 10,
            version: p.version_id,
        };
        leave_staged(dir.path(), 2, Some(base), &[(3, b"XY")]);
        // An edit of an object another client replaced meanwhile.
        let p = s.insert("changed", b"abcdefghij", Metadata::new());
        let base = Base {
            key: "changed".into(),
            etag: p.etag,
            size: 10,
            version: p.version_id,
        };
        leave_staged(dir.path(), 3, Some(base), &[(0, b"Z")]);
        s.insert("changed", b"other client's", Metadata::new());

        let done = recover(
            &s,
            dir.path(),
            &UploadOptions {
                part_size_bytes: 5 * MIB,
                concurrency: 2,
            },
        )
        .await;
        assert_eq!(done.len(), 3, "{done:?}");
        assert!(done.iter().all(|r| r.is_ok()), "{done:?}");
        assert_eq!(s.object("new").unwrap().as_ref(), b"brand new");
        assert_eq!(s.object("same").unwrap().as_ref(), b"012XY56789");
        assert_eq!(
            s.object("changed").unwrap().as_ref(),
            b"other client's",
            "not overwritten"
        );
        let beside: Vec<String> = s
            .keys()
            .into_iter()
            .filter(|k| k.starts_with("changed.bucketfs-recovered-"))
            .collect();
        assert_eq!(beside.len(), 1);
        assert_eq!(
            s.object(&beside[0]).unwrap().as_ref(),
            b"Zbcdefghij",
            "old bytes read by version id"
        );
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "nothing left to recover"
        );
        // Run again: nothing to do.
        assert!(recover(&s, dir.path(), &opts()).await.is_empty());
    }

    #[tokio::test]
    async fn recovery_aborts_a_multipart_upload_the_dead_daemon_never_journaled() {
        let dir = tempfile::tempdir().unwrap();
        let s = MemStore::versioned();
        leave_staged(dir.path(), 1, None, &[(0, b"brand new")]);
        // Killed between CreateMultipartUpload and journaling its id.
        s.create_multipart("new", &Metadata::new(), None)
            .await
            .unwrap();
        let r = recover(&s, dir.path(), &opts()).await;
        assert!(r.iter().all(|r| r.is_ok()), "{r:?}");
        assert_eq!(s.open_uploads(), 0);
        assert_eq!(s.object("new").unwrap().as_ref(), b"brand new");
    }

    /// An unlinked file's streaming upload is aborted in the background
    /// after its staged copy went: killed before that abort, the journal
    /// alone is left, and the next mount aborts what it names.
    #[tokio::test]
    async fn recovery_aborts_the_upload_of_an_unlinked_file_whose_abort_was_cut_short() {
        let dir = tempfile::tempdir().unwrap();
        let s = MemStore::versioned();
        leave_staged(dir.path(), 1, None, &[(0, b"streamed, then unlinked")]);
        let id = s
            .create_multipart("new", &Metadata::new(), None)
            .await
            .unwrap();
        let stage = dir.path().join(format!("stage-{}-1", std::process::id()));
        let journal = journal_path(&stage);
        let mut text = std::fs::read_to_string(&journal).unwrap();
        for line in [format!("U {}", journal_enc(&id.id)), "X".to_string()] {
            text += &format!("{line} *{:08x}\n", journal_sum(&line));
        }
        std::fs::write(&journal, text).unwrap();
        std::fs::remove_file(&stage).unwrap();
        let r = recover(&s, dir.path(), &opts()).await;
        assert!(r.iter().all(|r| r.is_ok()), "{r:?}");
        assert_eq!(s.open_uploads(), 0, "the unlinked file's upload is aborted");
        assert!(!journal.exists(), "and its journal is gone");
        assert_eq!(s.object("new"), None, "nothing was uploaded");
    }

    /// A new file whose every part a killed daemon had sent (the set
    /// sealed in the journal) and whose Complete never landed: `lines`
    /// are appended to its journal; returns the staged data.
    async fn killed_before_complete(
        dir: &Path,
        s: &MemStore,
        seal: bool,
        old_format: bool,
    ) -> Vec<u8> {
        let data: Vec<u8> = (0..30u8).collect();
        leave_staged(dir, 1, None, &[(0, &data)]);
        let up = s
            .create_multipart("new", &Metadata::new(), None)
            .await
            .unwrap();
        let mut parts = Vec::new();
        for (i, chunk) in data.chunks(10).enumerate() {
            let body = PutBody::Bytes(Bytes::copy_from_slice(chunk));
            parts.push(s.upload_part("new", &up, i as i32 + 1, body).await.unwrap());
        }
        let stage = dir.join(format!("stage-{}-1", std::process::id()));
        let journal = journal_path(&stage);
        let mut text = std::fs::read_to_string(&journal).unwrap();
        let mut lines = vec![if old_format || !up.crc32c {
            format!("U {}", journal_enc(&up.id))
        } else {
            format!("U {} crc32c", journal_enc(&up.id))
        }];
        for p in &parts {
            lines.push(match (&p.crc32c, old_format) {
                (Some(c), false) => {
                    format!("P {} {} {}", p.number, journal_enc(&p.etag), journal_enc(c))
                }
                _ => format!("P {} {}", p.number, journal_enc(&p.etag)),
            });
        }
        if seal {
            lines.push(format!("C {} {}", parts.len(), data.len()));
        }
        for line in lines {
            text += &format!("{line} *{:08x}\n", journal_sum(&line));
        }
        std::fs::write(&journal, text).unwrap();
        data
    }

    /// Recovery completes such an upload with the CRC32C each part was
    /// sent with (the store refuses a Complete without them), sending no
    /// part again.
    #[tokio::test]
    async fn recovery_completes_a_killed_daemons_upload_with_its_part_checksums() {
        let dir = tempfile::tempdir().unwrap();
        let s = MemStore::unversioned();
        let data = killed_before_complete(dir.path(), &s, true, false).await;
        let parts_before = s.counters().get(Op::UploadPart);
        let r = recover(&s, dir.path(), &opts()).await;
        assert!(r.iter().all(|r| r.is_ok()), "{r:?}");
        assert_eq!(s.object("new").unwrap().as_ref(), &data[..]);
        assert_eq!(
            s.counters().get(Op::UploadPart),
            parts_before,
            "no part sent again"
        );
        assert_eq!(s.counters().get(Op::CompleteMultipart), 1);
        assert_eq!(s.counters().get(Op::Put), 0);
        assert_eq!(s.open_uploads(), 0);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    /// A journal of a store without part checksums (or of an older
    /// bucketfs) recovers too: a sealed set is completed without
    /// checksums; an unsealed one (the old format never sealed) is
    /// uploaded again and its upload aborted.
    #[tokio::test]
    async fn recovery_of_journals_without_part_checksums() {
        for (seal, old_format) in [(true, false), (false, true), (true, true)] {
            let dir = tempfile::tempdir().unwrap();
            let s = MemStore::unversioned();
            s.without_part_checksums();
            let data = killed_before_complete(dir.path(), &s, seal, old_format).await;
            let r = recover(&s, dir.path(), &opts()).await;
            assert!(r.iter().all(|r| r.is_ok()), "{seal} {old_format}: {r:?}");
            assert_eq!(s.object("new").unwrap().as_ref(), &data[..]);
            assert_eq!(s.open_uploads(), 0, "{seal} {old_format}");
            let completed = s.counters().get(Op::CompleteMultipart) == 1;
            assert_eq!(
                completed, seal,
                "{seal} {old_format}: completed, not sent again"
            );
        }
        // And a set cut short by the kill (no seal) with checksums: sent
        // again, never completed with the parts it has.
        let dir = tempfile::tempdir().unwrap();
        let s = MemStore::unversioned();
        let data = killed_before_complete(dir.path(), &s, false, false).await;
        let r = recover(&s, dir.path(), &opts()).await;
        assert!(r.iter().all(|r| r.is_ok()), "{r:?}");
        assert_eq!(s.object("new").unwrap().as_ref(), &data[..]);
        assert_eq!(s.counters().get(Op::CompleteMultipart), 0);
        assert_eq!(s.open_uploads(), 0);
    }

    /// The recovered file changes before its upload (a write), or is
    /// unlinked: the dead mount's upload is not completed; it is aborted,
    /// by the upload or by a later recovery pass, never left open.
    #[tokio::test]
    async fn a_resumable_upload_whose_file_changes_or_goes_is_aborted() {
        let dir = tempfile::tempdir().unwrap();
        let s = MemStore::unversioned();
        let mut data = killed_before_complete(dir.path(), &s, true, false).await;
        let found = scan(&s, dir.path(), std::time::SystemTime::now()).await;
        let Some(Ok(Found::Pending(a))) = found.into_iter().next() else {
            panic!("a file to adopt");
        };
        let mut staged = a.into_staged().unwrap();
        staged.write(3, b"XY").unwrap();
        data[3..5].copy_from_slice(b"XY");
        upload_to(&mut staged, &s, "new").await.unwrap();
        assert_eq!(s.object("new").unwrap().as_ref(), &data[..]);
        assert_eq!(s.open_uploads(), 0, "the dead mount's upload is aborted");
        staged.end_journal();
        drop(staged);

        let dir = tempfile::tempdir().unwrap();
        let s = MemStore::unversioned();
        killed_before_complete(dir.path(), &s, true, false).await;
        let found = scan(&s, dir.path(), std::time::SystemTime::now()).await;
        let Some(Ok(Found::Pending(a))) = found.into_iter().next() else {
            panic!("a file to adopt");
        };
        let mut staged = a.into_staged().unwrap();
        // Discarded with a dead mount's upload still open, and killed
        // before that is aborted: the journal left names it.
        let left = staged.discard().expect("an upload left to abort");
        std::mem::forget(left);
        drop(staged);
        assert_eq!(s.open_uploads(), 1, "named by the journal left behind");
        let r = recover(&s, dir.path(), &opts()).await;
        assert!(r.iter().all(|r| r.is_ok()), "{r:?}");
        assert_eq!(s.open_uploads(), 0);
        assert_eq!(s.object("new"), None, "an unlinked file is never uploaded");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);

        // Not killed: the mount aborts it itself, then the journal goes.
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(MemStore::unversioned());
        killed_before_complete(dir.path(), &s, true, false).await;
        let found = scan(&*s, dir.path(), std::time::SystemTime::now()).await;
        let Some(Ok(Found::Pending(a))) = found.into_iter().next() else {
            panic!("a file to adopt");
        };
        let mut staged = a.into_staged().unwrap();
        let left = staged.discard().expect("an upload left to abort");
        drop(staged);
        left.abort_in_background(s.clone());
        let start = std::time::Instant::now();
        while std::fs::read_dir(dir.path()).unwrap().count() > 0
            && start.elapsed() < std::time::Duration::from_secs(10)
        {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert_eq!(s.open_uploads(), 0, "aborted by the mount");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn a_put_that_landed_just_before_the_kill_is_not_kept_beside() {
        let dir = tempfile::tempdir().unwrap();
        let s = MemStore::unversioned();
        let p = s.insert("f", b"0123456789", Metadata::new());
        let base = Base {
            key: "f".into(),
            etag: p.etag,
            size: 10,
            version: None,
        };
        leave_staged(dir.path(), 1, Some(base), &[(2, b"AB")]);
        // The daemon sent the PUT (journaled its ETag), the PUT landed,
        // and the daemon died before it could end the journal.
        let landed = s.insert("f", b"01AB456789", Metadata::new());
        let j = dir
            .path()
            .join(format!("stage-{}-1.journal", std::process::id()));
        let mut text = std::fs::read_to_string(&j).unwrap();
        let line = format!("S {}", journal_enc(&landed.etag));
        text += &format!("{line} *{:08x}\n", journal_sum(&line));
        std::fs::write(&j, text).unwrap();
        let r = recover(&s, dir.path(), &opts()).await;
        assert!(r.iter().all(|r| r.is_ok()), "{r:?}");
        assert_eq!(s.object("f").unwrap().as_ref(), b"01AB456789");
        assert!(
            s.keys().iter().all(|k| !k.contains("recovered")),
            "{:?}",
            s.keys()
        );
    }

    /// A PUT that timed out and was carried out later (a stalled server),
    /// after the file was emptied and written again: the key holds the
    /// file's own older bytes, which the newer data replaces at the key.
    #[tokio::test]
    async fn an_older_put_landing_late_is_replaced_at_the_key_after_a_kill() {
        let dir = tempfile::tempdir().unwrap();
        let s = MemStore::unversioned();
        let meta = Metadata::new();
        let mut st = Staged::new(dir.path(), None, None).unwrap();
        st.begin_journal("f", &meta).unwrap();
        st.write(0, b"first version").unwrap();
        s.fail_next(Op::Put, 1, StoreError::Transient("timed out".into()));
        let sent = st
            .upload(&s, "f", &meta, None, &opts(), &Progress::default())
            .await;
        assert!(sent.is_err());
        assert_eq!(s.object("f"), None);
        st.truncate(0).unwrap();
        st.write(0, b"second").unwrap();
        // The timed-out PUT lands now; then the daemon is killed.
        s.insert("f", b"first version", meta.clone());
        drop(st);
        let r = recover(&s, dir.path(), &opts()).await;
        assert!(r.iter().all(|r| r.is_ok()), "{r:?}");
        assert_eq!(s.object("f").unwrap().as_ref(), b"second");
        assert_eq!(s.keys(), vec!["f".to_string()]);
    }

    /// kill -9 in an unlink (or a rename over the file) of a file with
    /// data not in S3, once its DeleteObject landed: the removal was this
    /// mount's own, so the data goes with it, not beside the key. The
    /// same data, the key removed by someone else (no removal journaled),
    /// is kept beside it; a removal that failed (`kept`) keeps it too.
    #[tokio::test]
    async fn a_kill_after_an_unlinks_delete_landed_drops_the_data_not_beside() {
        for (removing, failed, beside) in [(true, false, 0), (false, false, 1), (true, true, 1)] {
            let dir = tempfile::tempdir().unwrap();
            let s = MemStore::unversioned();
            let meta = Metadata::new();
            let p = s.insert("f", b"old bytes", meta.clone());
            let base = Base {
                key: "f".into(),
                etag: p.etag,
                size: 9,
                version: None,
            };
            let mut st = Staged::new(dir.path(), Some(base), None).unwrap();
            st.begin_journal("f", &meta).unwrap();
            st.write(0, b"NEW").unwrap();
            if removing {
                st.removing().unwrap();
            }
            if failed {
                st.kept();
            }
            // The DELETE lands; the daemon is killed before it hears.
            s.delete("f").await.unwrap();
            drop(st);
            let r = recover(&s, dir.path(), &opts()).await;
            assert!(r.iter().all(|r| r.is_ok()), "{r:?}");
            let keys = s.keys();
            assert_eq!(
                keys.len(),
                beside,
                "removing {removing}, failed {failed}: {keys:?}"
            );
            if beside == 1 {
                assert!(keys[0].starts_with("f.bucketfs-recovered"), "{keys:?}");
                assert!(s.object(&keys[0]).unwrap().starts_with(b"NEW"));
            }
            assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        }
    }

    /// A kill in `mv x y` (x new and never sent, y an object with changes
    /// staged) after x was journaled at y's key: the next mount takes x's
    /// `over` and y's removal as one rename and puts x at y, whether y's
    /// DeleteObject landed or not, in either order of the staging files;
    /// y's data is dropped. An object another client put at y meanwhile
    /// keeps the key (x beside it); a rename that failed and gave x its
    /// name back leaves both files as they were; one whose old name could
    /// not be journaled back (a full disk) leaves y as it was and x's
    /// bytes beside it, never over it.
    #[tokio::test]
    async fn a_rename_of_a_new_file_cut_by_a_kill_goes_through() {
        // (the key after the kill, x journaled first, rename failed)
        for (at_key, x_first, failed, named_back) in [
            ("victim", false, false, false),
            ("victim", true, false, false),
            ("none", false, false, false),
            ("none", true, false, false),
            ("other", false, false, false),
            ("victim", false, true, true),
            ("victim", false, true, false),
            ("victim", true, true, false),
        ] {
            let case = format!(
                "key {at_key}, x first {x_first}, failed {failed}, named back {named_back}"
            );
            let dir = tempfile::tempdir().unwrap();
            let s = MemStore::unversioned();
            let meta = Metadata::new();
            let p = s.insert("y", b"y in S3", meta.clone());
            let stage_y = |dir: &Path| {
                let base = Base {
                    key: "y".into(),
                    etag: p.etag.clone(),
                    size: 7,
                    version: None,
                };
                let mut y = Staged::new(dir, Some(base), None).unwrap();
                y.begin_journal("y", &meta).unwrap();
                y.write(0, b"Y!").unwrap();
                y
            };
            let stage_x = |dir: &Path| {
                let mut x = Staged::new(dir, None, None).unwrap();
                x.begin_journal("x", &meta).unwrap();
                x.write(0, b"x, new").unwrap();
                x
            };
            let (mut x, mut y) = if x_first {
                let x = stage_x(dir.path());
                (x, stage_y(dir.path()))
            } else {
                let y = stage_y(dir.path());
                (stage_x(dir.path()), y)
            };
            y.removing().unwrap();
            x.rekey("y", Some(vec![p.etag.clone()])).unwrap();
            match at_key {
                "none" => s.delete("y").await.unwrap(),
                "other" => drop(s.insert("y", b"another client's", meta.clone())),
                _ => {}
            }
            if failed {
                x.kept();
                if named_back {
                    x.rekey("x", None).unwrap();
                }
                y.kept();
            }
            drop((x, y));
            let r = recover(&s, dir.path(), &opts()).await;
            assert!(r.iter().all(|r| r.is_ok()), "{case}: {r:?}");
            let keys = s.keys();
            let want: &[(&str, &[u8])] = match (at_key, failed, named_back) {
                (_, true, true) => &[("x", b"x, new"), ("y", b"Y!in S3")],
                (_, true, false) => &[("y", b"Y!in S3"), ("y.", b"x, new")],
                ("other", _, _) => &[("y", b"another client's"), ("y.", b"x, new")],
                _ => &[("y", b"x, new")],
            };
            assert_eq!(keys.len(), want.len(), "{case}: {keys:?}");
            for (k, (prefix, bytes)) in keys.iter().zip(want) {
                assert!(k.starts_with(prefix), "{case}: {keys:?}");
                assert_eq!(s.object(k).unwrap().as_ref(), *bytes, "{case}: {k}");
            }
            assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "{case}");
        }
    }

    /// As above, y's own upload having landed unanswered before the kill
    /// (the key holds y's newest bytes, known from y's journal only); the
    /// mount that takes x over is killed in its turn before x lands: the
    /// mount after still puts x at y, the ETag at the key journaled with
    /// x's `over` when y's journal went.
    #[tokio::test]
    async fn a_rename_over_recovered_then_killed_again_still_goes_through() {
        let dir = tempfile::tempdir().unwrap();
        let s = MemStore::unversioned();
        let meta = Metadata::new();
        let old = s.insert("y", b"y0", meta.clone());
        let mut y = Staged::new(dir.path(), None, Some(old.etag.clone())).unwrap();
        y.begin_journal("y", &meta).unwrap();
        y.write(0, b"y's newest").unwrap();
        // y's PUT went out (journaled) and landed; its answer was lost.
        let landed = bytes_md5(b"y's newest");
        y.journal
            .as_mut()
            .unwrap()
            .put_sent(&landed, false)
            .unwrap();
        assert_eq!(s.insert("y", b"y's newest", meta.clone()).etag, landed);
        let mut x = Staged::new(dir.path(), None, None).unwrap();
        x.begin_journal("x", &meta).unwrap();
        x.write(0, b"x, new").unwrap();
        y.removing().unwrap();
        x.rekey("y", Some(vec![old.etag.clone()])).unwrap();
        drop((x, y));
        // The next mount takes x over (y's data dropped), and dies too.
        let mut adopted = 0;
        for f in scan(&s, dir.path(), std::time::SystemTime::now()).await {
            if let Ok(Found::Pending(a)) = f {
                assert_eq!(a.target, "y");
                // Killed: its files stay, their locks go.
                let mut st = a.into_staged().unwrap();
                st.keep_files = true;
                drop(st);
                adopted += 1;
            }
        }
        assert_eq!(adopted, 1, "x alone is taken over");
        let r = recover(&s, dir.path(), &opts()).await;
        assert!(r.iter().all(|r| r.is_ok()), "{r:?}");
        assert_eq!(s.keys(), vec!["y".to_string()]);
        assert_eq!(s.object("y").unwrap().as_ref(), b"x, new");
    }

    /// A killed mount had unlinked y while it was read (its delete
    /// deferred, a tombstone left) and staged a new file at y since: the
    /// delete is finished first, and the new file goes to y, not beside
    /// the object that was removed.
    #[tokio::test]
    async fn a_deferred_delete_is_finished_before_a_new_file_at_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let s = MemStore::unversioned();
        let old = s.insert("y", b"unlinked, still read", Metadata::new());
        let t = tombstone::Tombstone::create(
            dir.path(),
            "y",
            &old.etag,
            Some(s.head("y", None).await.unwrap().last_modified),
        )
        .unwrap();
        let mut w = Staged::new(dir.path(), None, None).unwrap();
        w.begin_journal("y", &Metadata::new()).unwrap();
        w.write(0, b"written at y since").unwrap();
        drop((t, w));
        let r = recover(&s, dir.path(), &opts()).await;
        assert!(r.iter().all(|r| r.is_ok()), "{r:?}");
        assert_eq!(s.keys(), vec!["y".to_string()]);
        assert_eq!(s.object("y").unwrap().as_ref(), b"written at y since");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    /// A mount writing with SSE-KMS and a storage class is killed: the
    /// mount recovering its data, without those options itself, uploads
    /// it encrypted and classed as the writer asked, as a single PUT and
    /// as a multipart upload, and over an object with other headers.
    #[tokio::test]
    async fn recovered_data_goes_up_with_the_encryption_it_was_written_with() {
        let w = WrittenWith {
            sse: Some("aws:kms".into()),
            sse_kms_key_id: Some("key-1".into()),
            storage_class: Some("STANDARD_IA".into()),
        };
        for (len, over_other) in [(10usize, false), (5 * MIB as usize + 1, false), (10, true)] {
            let dir = tempfile::tempdir().unwrap();
            let s = MemStore::unversioned();
            let replaces = over_other.then(|| {
                let h = ObjectHeaders {
                    sse: Some("AES256".into()),
                    storage_class: Some("GLACIER_IR".into()),
                    ..Default::default()
                };
                s.insert_with_headers("new", b"old", Metadata::new(), h)
                    .etag
            });
            let mut st = Staged::new(dir.path(), None, replaces).unwrap();
            st.set_written_with(w.clone());
            st.begin_journal("new", &Metadata::new()).unwrap();
            st.write(0, &vec![7u8; len]).unwrap();
            drop(st);
            let r = recover(&s, dir.path(), &opts()).await;
            assert!(r.iter().all(|r| r.is_ok()), "{len}: {r:?}");
            assert_eq!(s.object("new").unwrap().len(), len);
            let h = s.headers("new").unwrap();
            let got = (h.sse, h.sse_kms_key_id, h.storage_class);
            assert_eq!(
                got,
                (
                    w.sse.clone(),
                    w.sse_kms_key_id.clone(),
                    w.storage_class.clone()
                ),
                "{len} bytes, over another object {over_other}"
            );
        }
    }

    #[tokio::test]
    async fn a_failed_recovery_keeps_the_data_for_the_next_mount() {
        let dir = tempfile::tempdir().unwrap();
        let s = MemStore::versioned();
        leave_staged(dir.path(), 1, None, &[(0, b"keep me")]);
        s.fail_next(Op::Put, 1, StoreError::Transient("503".into()));
        let r = recover(&s, dir.path(), &opts()).await;
        assert!(r[0].is_err());
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            2,
            "staging file and journal kept"
        );
        let r = recover(&s, dir.path(), &opts()).await;
        assert!(r[0].is_ok(), "{r:?}");
        assert_eq!(s.object("new").unwrap().as_ref(), b"keep me");
    }

    #[tokio::test]
    async fn a_new_file_written_in_order_streams_its_parts_before_close() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(MemStore::versioned());
        let store: Arc<dyn ObjectStore> = s.clone();
        let mut st = Staged::new(dir.path(), None, None).unwrap();
        let data: Vec<u8> = (0..17 * MIB).map(|i| (i % 249) as u8).collect();
        for c in data.chunks(MIB as usize) {
            let off = st.size();
            st.write(off, c).unwrap();
            st.stream(&store, "f", &Metadata::new(), None, &opts())
                .await;
        }
        tokio::task::yield_now().await;
        assert_eq!(
            s.counters().get(Op::CreateMultipart),
            1,
            "started while writing"
        );
        upload_to(&mut st, &*store, "f").await.unwrap();
        assert_eq!(s.object("f").unwrap().as_ref(), &data[..]);
        assert_eq!(
            s.counters().get(Op::UploadPart),
            4,
            "three 5 MiB parts and the tail"
        );
        assert_eq!(s.counters().bytes().0, 17 * MIB, "each byte sent once");
        assert_eq!(s.open_uploads(), 0);
    }

    /// The mtime moves with every write: that alone costs no self-copy of
    /// the streamed object. A mode set while writing (`cp -p`) does.
    #[tokio::test]
    async fn a_streamed_file_is_copied_onto_itself_only_for_metadata_set_on_purpose() {
        let meta = |mode: &str, mtime: &str| -> Metadata {
            [("mode", mode), ("mtime", mtime)]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        for (chmod, copies) in [(false, 0), (true, 1)] {
            let dir = tempfile::tempdir().unwrap();
            let s = Arc::new(MemStore::versioned());
            let store: Arc<dyn ObjectStore> = s.clone();
            let mut st = Staged::new(dir.path(), None, None).unwrap();
            let data: Vec<u8> = (0..12 * MIB).map(|i| (i % 251) as u8).collect();
            for c in data.chunks(MIB as usize) {
                let off = st.size();
                st.write(off, c).unwrap();
                st.stream(&store, "f", &meta("33188", "100"), None, &opts())
                    .await;
            }
            let last = if chmod {
                st.set_meta(&meta("33152", "50")).unwrap();
                meta("33152", "50")
            } else {
                meta("33188", "107")
            };
            st.upload(&*store, "f", &last, None, &opts(), &Progress::default())
                .await
                .unwrap();
            assert_eq!(s.object("f").unwrap().as_ref(), &data[..]);
            assert_eq!(s.counters().get(Op::Copy), copies, "chmod: {chmod}");
            let mode = s.metadata("f").unwrap()["mode"].clone();
            assert_eq!(mode, if chmod { "33152" } else { "33188" });
        }
    }

    #[tokio::test]
    async fn a_write_behind_the_stream_cancels_it_and_close_sends_the_right_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(MemStore::versioned());
        let store: Arc<dyn ObjectStore> = s.clone();
        let mut st = Staged::new(dir.path(), None, None).unwrap();
        let mut data: Vec<u8> = vec![3u8; (12 * MIB) as usize];
        st.write(0, &data).unwrap();
        st.stream(&store, "f", &Metadata::new(), None, &opts())
            .await;
        assert_eq!(s.counters().get(Op::CreateMultipart), 1);
        st.write(10, b"changed").unwrap();
        data[10..17].copy_from_slice(b"changed");
        st.truncate(11 * MIB).unwrap();
        data.truncate((11 * MIB) as usize);
        upload_to(&mut st, &*store, "f").await.unwrap();
        assert_eq!(s.object("f").unwrap().as_ref(), &data[..]);
        for _ in 0..100 {
            if s.open_uploads() == 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert_eq!(s.open_uploads(), 0, "the cancelled stream was aborted");
    }
}
