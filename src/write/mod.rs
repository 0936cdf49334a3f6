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

mod journal;
mod ranges;
mod stream;

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use tracing::{debug, warn};

pub use journal::{Header as JournalHeader, Journal};
pub use ranges::RangeSet;

use crate::store::{Metadata, ObjectStore, PutBody, PutResult, ReadPin, StoreError};

/// S3's limits on multipart uploads.
pub const MIN_PART_SIZE_BYTES: u64 = 5 * 1024 * 1024;
pub const MAX_PARTS: u64 = 10_000;
/// Server-side copies are cut in parts of at most this many bytes, so the
/// store copies them in parallel.
const COPY_PART_MAX_BYTES: u64 = 128 * 1024 * 1024;
/// Ranged GETs that fill a staged file are at most this large.
const FILL_CHUNK_BYTES: u64 = 8 * 1024 * 1024;

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

/// A file's contents while it is open for writing.
#[derive(Debug)]
pub struct Staged {
    file: Arc<File>,
    path: PathBuf,
    size: u64,
    base: Option<Base>,
    base_valid: u64,
    loaded: RangeSet,
    /// Present while the staged data is not all in S3.
    journal: Option<Journal>,
    /// Whether untouched base ranges may be copied server-side (not when
    /// the key now holds another object).
    copy_ok: bool,
    /// Keep the staging file at drop (a recovery that failed).
    keep: bool,
    /// Parts of a new file sent while it is being written.
    stream: Option<stream::Streaming>,
}

static STAGING_SEQ: AtomicU64 = AtomicU64::new(0);

impl Staged {
    /// Stages a file of `base`'s contents (or an empty file) in `dir`.
    pub fn new(dir: &Path, base: Option<Base>) -> io::Result<Staged> {
        crate::private::create_private_dir(dir)?;
        let n = STAGING_SEQ.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!("stage-{}-{n}", std::process::id()));
        let file = crate::private::private_file()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        let size = base.as_ref().map_or(0, |b| b.size);
        file.set_len(size)?;
        Ok(Staged {
            file: Arc::new(file),
            path,
            size,
            base_valid: size,
            base,
            loaded: RangeSet::default(),
            journal: None,
            copy_ok: true,
            keep: false,
            stream: None,
        })
    }

    /// Whether a write just made a part ready to stream (a new file
    /// written in order, with a full part beyond what was sent).
    pub fn stream_due(&self, opts: &UploadOptions) -> bool {
        if self.base.is_some() {
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
        self.size >= covered + needed
    }

    /// After a write: sends the full parts of a new file written
    /// sequentially from its start, so close() waits only for the tail.
    /// Starts once two parts are there (small files never stream).
    pub async fn stream(
        &mut self,
        store: &Arc<dyn ObjectStore>,
        key: &str,
        meta: &Metadata,
        opts: &UploadOptions,
    ) {
        if !self.stream_due(opts)
            || self.stream.as_ref().is_some_and(|s| s.key != key)
            || !self.loaded.missing(0..self.size).is_empty()
        {
            return;
        }
        if self.stream.is_none() {
            match store.create_multipart(key, meta).await {
                Ok(id) => {
                    if let Some(j) = &mut self.journal {
                        let _ = j.streaming(&id);
                    }
                    self.stream = Some(stream::Streaming::new(store.clone(), key.to_string(), id));
                }
                Err(e) => {
                    debug!(key, error = %e, "no streaming upload; the file goes up at close");
                    return;
                }
            }
        }
        let path = self.path.clone();
        let Some(s) = self.stream.as_mut() else {
            return;
        };
        loop {
            let part = stream::stream_part_size(opts.part_size_bytes, s.next_part);
            if self.size < s.next_offset + part {
                break;
            }
            s.send(path.clone(), part, opts.concurrency).await;
        }
    }

    /// A change behind what was streamed: the stream is no good.
    fn cancel_stream_below(&mut self, offset: u64) {
        if self.stream.as_ref().is_some_and(|s| offset < s.next_offset)
            && let Some(s) = self.stream.take()
        {
            s.cancel();
        }
    }

    /// Starts journaling (the data is about to differ from S3), unless it
    /// already is.
    pub fn begin_journal(&mut self, key: &str, meta: &Metadata) -> io::Result<()> {
        if self.journal.is_some() {
            return Ok(());
        }
        let h = JournalHeader {
            key: key.to_string(),
            base_etag: self.base.as_ref().map(|b| b.etag.clone()),
            base_version: self.base.as_ref().and_then(|b| b.version.clone()),
            base_valid: self.base_valid,
            size: self.size,
            meta: meta.clone(),
        };
        self.journal = Some(Journal::create(journal_path(&self.path), &h)?);
        Ok(())
    }

    pub fn journaling(&self) -> bool {
        self.journal.is_some()
    }

    /// The data is all in S3 (or thrown away): nothing to recover.
    pub fn end_journal(&mut self) {
        if let Some(j) = self.journal.take() {
            j.remove();
        }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.cancel_stream_below(offset);
        self.file.write_all_at(data, offset)?;
        // Without a base, the staging file itself is the whole truth:
        // only writes over a base need recording.
        if let Some(j) = self.journal.as_mut().filter(|_| self.base.is_some()) {
            j.wrote(offset, data.len() as u64)?;
        }
        let end = offset + data.len() as u64;
        self.loaded.insert(offset..end);
        self.size = self.size.max(end);
        Ok(())
    }

    pub fn truncate(&mut self, size: u64) -> io::Result<()> {
        self.cancel_stream_below(size);
        self.file.set_len(size)?;
        if let Some(j) = &mut self.journal {
            j.truncated(size)?;
        }
        self.loaded.truncate(size);
        self.base_valid = self.base_valid.min(size);
        self.size = size;
        Ok(())
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

    /// Uploads the whole contents as `key` with `meta`. On failure nothing
    /// changes in the bucket and no multipart upload is left behind.
    pub async fn upload(
        &mut self,
        store: &dyn ObjectStore,
        key: &str,
        meta: &Metadata,
        opts: &UploadOptions,
        progress: &Progress,
    ) -> Result<PutResult, WriteError> {
        progress.total_bytes.store(self.size, Ordering::Relaxed);
        progress.done_bytes.store(0, Ordering::Relaxed);
        if let Some(mut s) = self.stream.take() {
            if s.key == key {
                match self.finish_stream(&mut s, store, meta, progress).await {
                    Ok(put) => return Ok(put),
                    Err(e) => {
                        warn!(key, error = %e, "streaming upload failed; uploading the file whole")
                    }
                }
            }
            s.abort().await;
        }
        let part = part_size(self.size, opts.part_size_bytes);
        if self.size <= part {
            self.fill(store, 0..self.size).await?;
            let body = PutBody::File {
                path: self.path.clone(),
                offset: 0,
                len: self.size,
            };
            let put = store.put(key, body, meta).await?;
            progress.done_bytes.store(self.size, Ordering::Relaxed);
            return Ok(put);
        }
        let parts = self.plan_parts(part);
        for (_, r, copy) in &parts {
            if !copy {
                self.fill(store, r.clone()).await?;
            }
        }
        let upload_id = store.create_multipart(key, meta).await?;
        debug!(
            key,
            parts = parts.len(),
            part_size = part,
            "multipart upload"
        );
        let base = self.base.clone();
        let path = self.path.clone();
        let results: Result<Vec<(i32, String)>, StoreError> = futures::stream::iter(parts)
            .map(|(n, r, copy)| {
                let (base, path, upload_id) = (&base, &path, &upload_id);
                async move {
                    let len = r.end - r.start;
                    let etag = match (copy, base) {
                        (true, Some(b)) => {
                            store
                                .upload_part_copy(key, upload_id, n, &b.key, r, Some(&b.etag))
                                .await?
                        }
                        _ => {
                            let body = PutBody::File {
                                path: path.clone(),
                                offset: r.start,
                                len: r.end - r.start,
                            };
                            store.upload_part(key, upload_id, n, body).await?
                        }
                    };
                    progress.done_bytes.fetch_add(len, Ordering::Relaxed);
                    Ok((n, etag))
                }
            })
            .buffered(opts.concurrency.max(1))
            .try_collect()
            .await;
        let done = match results {
            Ok(parts) => store.complete_multipart(key, &upload_id, parts).await,
            Err(e) => Err(e),
        };
        match done {
            Ok(put) => Ok(put),
            Err(e) => {
                if let Err(abort) = store.abort_multipart(key, &upload_id).await {
                    warn!(key, error = %abort, "could not abort a failed multipart upload");
                }
                Err(WriteError::Store(e))
            }
        }
    }

    /// Completes a streaming upload: waits for the parts sent, sends the
    /// tail as the last part.
    async fn finish_stream(
        &mut self,
        s: &mut stream::Streaming,
        store: &dyn ObjectStore,
        _meta: &Metadata,
        progress: &Progress,
    ) -> Result<PutResult, WriteError> {
        let mut parts = s.finish(progress).await?;
        if self.size > s.next_offset {
            let body = PutBody::File {
                path: self.path.clone(),
                offset: s.next_offset,
                len: self.size - s.next_offset,
            };
            let etag = store
                .upload_part(&s.key, &s.upload_id, s.next_part, body)
                .await?;
            parts.push((s.next_part, etag));
        }
        let put = store
            .complete_multipart(&s.key, &s.upload_id, parts)
            .await?;
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

    /// After an upload the staged bytes are the new base's.
    pub fn rebase(&mut self, key: &str, etag: String) {
        self.base = Some(Base {
            key: key.to_string(),
            etag,
            size: self.size,
            version: None,
        });
        self.base_valid = self.size;
        self.copy_ok = true;
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if let Some(s) = self.stream.take() {
            s.cancel();
        }
        if self.keep {
            return;
        }
        self.end_journal();
        let _ = std::fs::remove_file(&self.path);
    }
}

fn journal_path(staged: &Path) -> PathBuf {
    let mut p = staged.as_os_str().to_owned();
    p.push(".journal");
    PathBuf::from(p)
}

/// What recovery did with one staged file a dead daemon left.
#[derive(Debug)]
pub struct Recovered {
    pub key: String,
    /// Where the data went: the key itself, or a `.bucketfs-recovered-`
    /// name beside it when the object changed meanwhile.
    pub uploaded_as: String,
    /// Ranges that came from an object no longer available were zeros.
    pub incomplete: bool,
}

fn pid_alive(pid: i32) -> bool {
    pid > 0
        && (unsafe { libc::kill(pid, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH))
}

/// The pid in a staging file name `stage-<pid>-<n>[.journal]`.
fn owner_pid(name: &str) -> Option<i32> {
    name.strip_prefix("stage-")?.split('-').next()?.parse().ok()
}

/// Finishes the uploads of staged files left in `dir` by daemons that are
/// gone (killed): each goes to its key if the object there is still the
/// one the data started from (same ETag, or still absent for a new file),
/// else beside it as `KEY.bucketfs-recovered-<time>`. Files that fail stay
/// for the next try. Staging files without a journal held nothing dirty
/// and are removed.
pub async fn recover(
    store: &dyn ObjectStore,
    dir: &Path,
    opts: &UploadOptions,
) -> Vec<Result<Recovered, String>> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut out = Vec::new();
    for name in &names {
        let Some(pid) = owner_pid(name) else { continue };
        if pid_alive(pid) {
            continue;
        }
        let path = dir.join(name);
        if !crate::private::trusted(&path) {
            continue;
        }
        let Some(stage_name) = name.strip_suffix(".journal") else {
            if !names.contains(&format!("{name}.journal")) {
                let _ = std::fs::remove_file(&path);
            }
            continue;
        };
        if !crate::private::trusted(&dir.join(stage_name)) {
            continue;
        }
        out.push(recover_one(store, &dir.join(stage_name), &path, opts).await);
    }
    out
}

async fn recover_one(
    store: &dyn ObjectStore,
    stage: &Path,
    journal: &Path,
    opts: &UploadOptions,
) -> Result<Recovered, String> {
    let r = journal::replay(journal).map_err(|e| e.to_string())?;
    let key = r.header.key.clone();
    // A streaming upload the dead daemon left open goes away first.
    for id in &r.uploads {
        if let Err(e) = store.abort_multipart(&key, id).await {
            debug!(key, error = %e, "could not abort a dead mount's multipart upload");
        }
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(stage)
        .map_err(|e| format!("{key}: staged data missing ({e})"))?;
    let size = if r.header.base_etag.is_none() {
        file.metadata().map_err(|e| e.to_string())?.len()
    } else {
        r.size
    };
    file.set_len(size).map_err(|e| e.to_string())?;
    let r = journal::Replayed { size, ..r };
    let current = match store.head(&key, None).await {
        Ok(o) => Some(o.etag),
        Err(StoreError::NotFound) => None,
        Err(e) => return Err(format!("{key}: {e}")),
    };
    let unchanged = current == r.header.base_etag;
    let target = if unchanged {
        key.clone()
    } else {
        format!(
            "{key}.bucketfs-recovered-{}",
            humantime::format_rfc3339_seconds(std::time::SystemTime::now())
                .to_string()
                .replace(':', "")
        )
    };
    let base = r.header.base_etag.clone().map(|etag| Base {
        key: key.clone(),
        etag,
        size: r.size,
        version: r.header.base_version.clone(),
    });
    // Without the old object (changed, and no version id to read it by),
    // its untouched ranges cannot be had: they stay zero.
    let base_readable = unchanged || r.header.base_version.is_some();
    let incomplete = base.is_some()
        && !base_readable
        && !r.loaded.missing(0..r.base_valid.min(r.size)).is_empty();
    let mut staged = Staged {
        file: Arc::new(file),
        path: stage.to_path_buf(),
        size: r.size,
        base_valid: if base_readable { r.base_valid } else { 0 },
        base: if base_readable { base } else { None },
        loaded: r.loaded,
        journal: None,
        copy_ok: unchanged,
        keep: true,
        stream: None,
    };
    staged
        .upload(store, &target, &r.header.meta, opts, &Progress::default())
        .await
        .map_err(|e| format!("{key}: {e} (kept for the next mount)"))?;
    staged.keep = false;
    drop(staged);
    let _ = std::fs::remove_file(journal);
    Ok(Recovered {
        key,
        uploaded_as: target,
        incomplete,
    })
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
    use crate::store::memory::MemStore;

    const MIB: u64 = 1024 * 1024;

    fn opts() -> UploadOptions {
        UploadOptions {
            part_size_bytes: 5 * MIB,
            concurrency: 4,
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
        let mut st = Staged::new(dir.path(), Some(base)).unwrap();
        st.write(orig.len() as u64, b"tail").unwrap();
        st.upload(&s, "big", &Metadata::new(), &opts(), &Progress::default())
            .await
            .unwrap();
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
        let mut st = Staged::new(dir.path(), None).unwrap();
        st.write(0, &vec![7u8; (11 * MIB) as usize]).unwrap();
        s.fail_next(Op::UploadPart, 1, StoreError::Transient("503".into()));
        assert!(
            st.upload(&s, "k", &Metadata::new(), &opts(), &Progress::default())
                .await
                .is_err()
        );
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
        let mut st = Staged::new(dir.path(), Some(base)).unwrap();
        st.truncate(3).unwrap();
        st.truncate(6).unwrap();
        st.write(7, b"Z").unwrap();
        assert_eq!(st.read(&s, 0, 100).await.unwrap().as_ref(), b"abc\0\0\0\0Z");
    }

    /// Leaves a staged file and its journal as a killed daemon (pid 999999,
    /// not running) would.
    fn leave_staged(dir: &Path, n: u32, base: Option<Base>, writes: &[(u64, &[u8])]) {
        let path = dir.join(format!("stage-999999-{n}"));
        let size = base.as_ref().map_or(0, |b| b.size);
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(size).unwrap();
        let key = base.as_ref().map_or("new".to_string(), |b| b.key.clone());
        let h = JournalHeader {
            key,
            base_etag: base.as_ref().map(|b| b.etag.clone()),
            base_version: base.as_ref().and_then(|b| b.version.clone()),
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
        let mut st = Staged::new(dir.path(), None).unwrap();
        let data: Vec<u8> = (0..17 * MIB).map(|i| (i % 249) as u8).collect();
        for c in data.chunks(MIB as usize) {
            let off = st.size();
            st.write(off, c).unwrap();
            st.stream(&store, "f", &Metadata::new(), &opts()).await;
        }
        tokio::task::yield_now().await;
        assert_eq!(
            s.counters().get(Op::CreateMultipart),
            1,
            "started while writing"
        );
        st.upload(
            &*store,
            "f",
            &Metadata::new(),
            &opts(),
            &Progress::default(),
        )
        .await
        .unwrap();
        assert_eq!(s.object("f").unwrap().as_ref(), &data[..]);
        assert_eq!(
            s.counters().get(Op::UploadPart),
            4,
            "three 5 MiB parts and the tail"
        );
        assert_eq!(s.counters().bytes().0, 17 * MIB, "each byte sent once");
        assert_eq!(s.open_uploads(), 0);
    }

    #[tokio::test]
    async fn a_write_behind_the_stream_cancels_it_and_close_sends_the_right_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(MemStore::versioned());
        let store: Arc<dyn ObjectStore> = s.clone();
        let mut st = Staged::new(dir.path(), None).unwrap();
        let mut data: Vec<u8> = vec![3u8; (12 * MIB) as usize];
        st.write(0, &data).unwrap();
        st.stream(&store, "f", &Metadata::new(), &opts()).await;
        assert_eq!(s.counters().get(Op::CreateMultipart), 1);
        st.write(10, b"changed").unwrap();
        data[10..17].copy_from_slice(b"changed");
        st.truncate(11 * MIB).unwrap();
        data.truncate((11 * MIB) as usize);
        st.upload(
            &*store,
            "f",
            &Metadata::new(),
            &opts(),
            &Progress::default(),
        )
        .await
        .unwrap();
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
