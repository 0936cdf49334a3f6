//! The object store boundary: the few calls the filesystem needs from S3.
//!
//! Everything above this module talks to `dyn ObjectStore` and never sees an
//! SDK type. `S3Store` (s3.rs) is the real implementation over aws-sdk-s3;
//! `MemStore` (memory.rs) keeps objects and their versions in memory, counts
//! calls and injects failures, for fast tests of the core.
//!
//! Errors are classified once, in each implementation, into `StoreError`;
//! `StoreError::is_transient` is what retry decisions look at.

mod fast_head;
pub mod faulty;
pub mod memory;
mod piece;
pub use piece::{PIECE_ALIGN, PieceBuf, release as release_piece_pages};
pub mod s3;
mod sendbuf;
pub use sendbuf::SendMemory;

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;

/// User metadata (the `x-amz-meta-*` headers, names without the prefix).
pub type Metadata = HashMap<String, String>;

/// The user-metadata keys the filesystem writes as a whole (s3fs-fuse's
/// names): a copy given new metadata replaces these, dropping one it is
/// not given (the last extended attribute removed), and keeps every other
/// key of the source (another tool's).
pub const OWNED_METADATA: [&str; 8] = [
    "mode", "uid", "gid", "mtime", "atime", "ctime", "rdev", "xattr",
];

/// The metadata of a copy of an object with `source`'s metadata, given
/// `given`: `given` over the source's keys the filesystem does not own.
pub fn merge_metadata(source: &Metadata, given: &Metadata) -> Metadata {
    let mut merged: Metadata = source
        .iter()
        .filter(|(k, _)| !OWNED_METADATA.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    merged.extend(given.iter().map(|(k, v)| (k.clone(), v.clone())));
    merged
}

/// The headers of an object besides its user metadata that a copy or an
/// overwrite must send again to keep (S3 resets them otherwise): the
/// standard HTTP headers, storage class and encryption. Tags are kept by
/// CopyObject itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ObjectHeaders {
    pub content_type: Option<String>,
    pub cache_control: Option<String>,
    pub content_disposition: Option<String>,
    pub content_encoding: Option<String>,
    pub content_language: Option<String>,
    /// As an HTTP date.
    pub expires: Option<String>,
    /// None for STANDARD.
    pub storage_class: Option<String>,
    /// `AES256`, `aws:kms`, `aws:kms:dsse`; None when not encrypted with
    /// S3- or KMS-managed keys.
    pub sse: Option<String>,
    pub sse_kms_key_id: Option<String>,
    /// Encrypted with a customer key (SSE-C).
    pub sse_c: bool,
    // Shown as xattrs, never sent: S3 sets these itself.
    /// `x-amz-restore` of an archived object (`ongoing-request="..."`).
    pub restore: Option<String>,
    /// Object Lock mode (GOVERNANCE, COMPLIANCE).
    pub lock_mode: Option<String>,
    /// Object Lock retain-until date, RFC 3339.
    pub lock_retain_until: Option<String>,
    /// Object Lock legal hold (ON, OFF).
    pub legal_hold: Option<String>,
    /// How many tags the object has: an overwrite reads and sends them
    /// again when there are any (PutObject does not keep them).
    pub tag_count: u32,
}

/// The Content-Type of a new object, from its name's extension
/// (`index.html` is text/html; unknown: application/octet-stream);
/// directory markers get none.
pub fn content_type_for(key: &str) -> Option<String> {
    if key.ends_with('/') {
        return None;
    }
    Some(
        mime_guess::from_path(key)
            .first_raw()
            .unwrap_or("application/octet-stream")
            .to_string(),
    )
}

/// One object as a listing or a HEAD reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct ObjectInfo {
    pub key: String,
    pub size: u64,
    pub etag: String,
    pub last_modified: SystemTime,
    pub version_id: Option<String>,
    pub storage_class: Option<String>,
    /// `None` when the source (a listing) does not carry user metadata.
    pub metadata: Option<Metadata>,
    /// `None` when the source (a listing) does not carry them.
    pub headers: Option<Box<ObjectHeaders>>,
}

/// One page of ListObjectsV2.
#[derive(Debug, Default)]
pub struct ListPage {
    pub objects: Vec<ObjectInfo>,
    /// Common prefixes, each ending with the delimiter.
    pub prefixes: Vec<String>,
    pub next_token: Option<String>,
}

/// One entry of ListObjectVersions: a version or a delete marker.
#[derive(Clone, Debug, PartialEq)]
pub struct VersionInfo {
    pub key: String,
    pub version_id: String,
    pub is_latest: bool,
    pub last_modified: SystemTime,
    pub size: u64,
    pub etag: String,
    pub delete_marker: bool,
}

/// One page of ListObjectVersions.
#[derive(Debug, Default)]
pub struct VersionPage {
    pub versions: Vec<VersionInfo>,
    pub prefixes: Vec<String>,
    /// (key marker, version id marker) of the next page.
    pub next: Option<(String, String)>,
}

/// What a ranged read is pinned to, so a handle never mixes two objects.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ReadPin {
    /// Any current object.
    Latest,
    /// Fail with `PreconditionFailed` unless the current ETag is this one.
    Etag(String),
    /// This exact version.
    Version(String),
}

/// The body of a PUT or an UploadPart.
#[derive(Clone, Debug)]
pub enum PutBody {
    Bytes(Bytes),
    /// A byte range of a local file (a staged write: it stays on disk
    /// until it is in S3; a store may read it into memory to send it).
    /// The open file, not its path: a staged file whose directory was
    /// removed is still uploaded from its descriptor.
    File {
        file: Arc<std::fs::File>,
        offset: u64,
        len: u64,
    },
}

impl PutBody {
    pub fn len(&self) -> u64 {
        match self {
            PutBody::Bytes(b) => b.len() as u64,
            PutBody::File { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The MD5 digest (S3's Content-MD5, when `md5`) and CRC32C of the
    /// body, in one pass, read in 1 MiB steps.
    pub fn checksums(&self, md5: bool) -> std::io::Result<(Option<[u8; 16]>, u32)> {
        let mut sums = Sums::new(md5);
        match self {
            PutBody::Bytes(b) => sums.update(b),
            PutBody::File { file, offset, len } => {
                use std::os::unix::fs::FileExt;
                let mut buf = vec![0u8; (*len).min(1 << 20) as usize];
                let mut pos = 0;
                while pos < *len {
                    let n = ((*len - pos) as usize).min(buf.len());
                    file.read_exact_at(&mut buf[..n], offset + pos)?;
                    sums.update(&buf[..n]);
                    pos += n as u64;
                }
            }
        }
        Ok(sums.finish())
    }

    /// Reads the body into `buf` (its length) and hashes it there: its
    /// MD5 digest (when `md5`) and CRC32C.
    pub fn read_hashed(
        &self,
        buf: &mut [u8],
        md5: bool,
    ) -> std::io::Result<(Option<[u8; 16]>, u32)> {
        match self {
            PutBody::Bytes(b) => buf.copy_from_slice(b),
            PutBody::File { file, offset, .. } => {
                std::os::unix::fs::FileExt::read_exact_at(&**file, buf, *offset)?
            }
        }
        let mut sums = Sums::new(md5);
        sums.update(buf);
        Ok(sums.finish())
    }

    /// Reads the whole body into memory (for stores that keep bytes in RAM).
    pub fn read_all(&self) -> std::io::Result<Bytes> {
        match self {
            PutBody::Bytes(b) => Ok(b.clone()),
            PutBody::File { file, offset, len } => {
                use std::os::unix::fs::FileExt;
                let mut buf = vec![0u8; *len as usize];
                file.read_exact_at(&mut buf, *offset)?;
                Ok(Bytes::from(buf))
            }
        }
    }
}

/// A body's MD5 (when asked) and CRC32C, in one pass.
struct Sums {
    md5: Option<md5::Md5>,
    crc: crc_fast::Digest,
}

impl Sums {
    fn new(md5: bool) -> Self {
        use md5::Digest;
        Sums {
            md5: md5.then(md5::Md5::new),
            crc: crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc32Iscsi),
        }
    }

    fn update(&mut self, b: &[u8]) {
        use md5::Digest;
        if let Some(m) = &mut self.md5 {
            m.update(b);
        }
        self.crc.update(b);
    }

    fn finish(self) -> (Option<[u8; 16]>, u32) {
        use md5::Digest;
        (
            self.md5.map(|m| m.finalize().into()),
            self.crc.finalize() as u32,
        )
    }
}

/// A multipart upload as it was created: its id, and whether it declared
/// CRC32C (then every part carries its CRC32C and CompleteMultipartUpload
/// repeats each; a store that refused that gets Content-MD5 instead).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upload {
    pub id: String,
    pub crc32c: bool,
}

/// A part of a multipart upload, sent: what CompleteMultipartUpload lists.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Part {
    pub number: i32,
    pub etag: String,
    /// Its CRC32C (base64 of the big-endian value), on an upload that
    /// declared CRC32C; for a copied part, when the store said it.
    pub crc32c: Option<String>,
    /// The CRC32C of the bytes this client sent as the part, as it
    /// computed them (also where the upload declared no CRC32C: then the
    /// store checked their Content-MD5, computed in the same pass). None
    /// for a copied part, and for one read back from a journal.
    pub sent_crc32c: Option<u32>,
}

/// The identity of a stored object after a write.
#[derive(Clone, Debug, PartialEq)]
pub struct PutResult {
    pub etag: String,
    pub version_id: Option<String>,
    /// For a PUT of bytes this client sent: their CRC32C, which the store
    /// checked (see `Part::sent_crc32c`). None for copies and completions.
    pub sent_crc32c: Option<u32>,
}

/// A failed store call, classified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreError {
    /// No such key or version.
    NotFound,
    /// The bucket itself does not exist.
    NoSuchBucket,
    /// Credentials refused or not allowed.
    AccessDenied(String),
    /// A pinned ETag no longer matches: the object changed.
    PreconditionFailed,
    /// A request the server rejected as invalid (e.g. key too long).
    InvalidRequest(String),
    /// Timeouts, connection failures, 5xx, throttling; worth retrying.
    Transient(String),
    /// Anything else; not worth retrying.
    Other(String),
    /// The bucket is in another region than the one requests were signed
    /// for (S3's 301 PermanentRedirect with `x-amz-bucket-region`).
    WrongRegion(String),
    /// A bucket of that name exists already (CreateBucket).
    AlreadyExists,
    /// The store refused the CRC32C of a multipart upload (the upload is
    /// to be made again: the store's next ones carry Content-MD5).
    ChecksumRefused(String),
    /// The bucket still holds objects or versions (DeleteBucket).
    BucketNotEmpty,
}

/// Why an object cannot be read: said once in the log, with EACCES.
pub const SSE_C_REFUSED: &str = "the object is encrypted with a customer key (SSE-C) this mount does not have: mount with -o sse_c_key_file=PATH holding the key it was written with";

impl StoreError {
    /// The object is SSE-C encrypted with a key this mount does not have
    /// (none, or another).
    pub fn is_sse_c_refusal(&self) -> bool {
        matches!(self, StoreError::AccessDenied(m) if m == SSE_C_REFUSED)
    }

    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Transient(_))
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::NotFound => write!(f, "no such key"),
            StoreError::NoSuchBucket => write!(f, "the bucket does not exist"),
            StoreError::AccessDenied(m) => write!(f, "access denied: {m}"),
            StoreError::PreconditionFailed => write!(f, "the object changed (precondition failed)"),
            StoreError::InvalidRequest(m) => write!(f, "invalid request: {m}"),
            StoreError::Transient(m) => write!(f, "S3 unavailable: {m}"),
            StoreError::Other(m) => write!(f, "S3 error: {m}"),
            StoreError::WrongRegion(r) => write!(f, "the bucket is in region {r}"),
            StoreError::AlreadyExists => write!(f, "a bucket of that name exists already"),
            StoreError::ChecksumRefused(m) => {
                write!(f, "the store refused CRC32C on a multipart upload: {m}")
            }
            StoreError::BucketNotEmpty => write!(f, "the bucket is not empty"),
        }
    }
}

impl std::error::Error for StoreError {}

pub type StoreResult<T> = Result<T, StoreError>;

/// Which store call, for request counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    List,
    Head,
    Get,
    Put,
    Copy,
    Delete,
    CreateMultipart,
    UploadPart,
    UploadPartCopy,
    CompleteMultipart,
    AbortMultipart,
    ListVersions,
    HeadBucket,
    ListUploads,
    GetTagging,
    GetAcl,
    GetOwnership,
    ListBuckets,
    CreateBucket,
    DeleteBucket,
}

impl Op {
    pub const ALL: [Op; 20] = [
        Op::List,
        Op::Head,
        Op::Get,
        Op::Put,
        Op::Copy,
        Op::Delete,
        Op::CreateMultipart,
        Op::UploadPart,
        Op::UploadPartCopy,
        Op::CompleteMultipart,
        Op::AbortMultipart,
        Op::ListVersions,
        Op::HeadBucket,
        Op::ListUploads,
        Op::GetTagging,
        Op::GetAcl,
        Op::GetOwnership,
        Op::ListBuckets,
        Op::CreateBucket,
        Op::DeleteBucket,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Op::List => "LIST",
            Op::Head => "HEAD",
            Op::Get => "GET",
            Op::Put => "PUT",
            Op::Copy => "COPY",
            Op::Delete => "DELETE",
            Op::CreateMultipart => "CREATE_MULTIPART",
            Op::UploadPart => "UPLOAD_PART",
            Op::UploadPartCopy => "UPLOAD_PART_COPY",
            Op::CompleteMultipart => "COMPLETE_MULTIPART",
            Op::AbortMultipart => "ABORT_MULTIPART",
            Op::ListVersions => "LIST_VERSIONS",
            Op::HeadBucket => "HEAD_BUCKET",
            Op::ListUploads => "LIST_UPLOADS",
            Op::GetTagging => "GET_TAGGING",
            Op::GetAcl => "GET_ACL",
            Op::GetOwnership => "GET_OWNERSHIP",
            Op::ListBuckets => "LIST_BUCKETS",
            Op::CreateBucket => "CREATE_BUCKET",
            Op::DeleteBucket => "DELETE_BUCKET",
        }
    }
}

/// Requests made, by type. Both stores keep one.
#[derive(Debug, Default)]
pub struct Counters {
    counts: [AtomicU64; Op::ALL.len()],
    sent: AtomicU64,
    received: AtomicU64,
    sent_from_memory: AtomicU64,
}

impl Counters {
    /// Body bytes sent (PUT, UploadPart) and received (GET).
    pub fn add_sent(&self, n: u64) {
        self.sent.fetch_add(n, Ordering::Relaxed);
    }

    /// Of the bytes sent from staged files, those read into memory first
    /// (`SendMemory`).
    pub fn add_sent_from_memory(&self, n: u64) {
        self.sent_from_memory.fetch_add(n, Ordering::Relaxed);
    }

    pub fn sent_from_memory(&self) -> u64 {
        self.sent_from_memory.load(Ordering::Relaxed)
    }

    pub fn add_received(&self, n: u64) {
        self.received.fetch_add(n, Ordering::Relaxed);
    }

    pub fn bytes(&self) -> (u64, u64) {
        (
            self.sent.load(Ordering::Relaxed),
            self.received.load(Ordering::Relaxed),
        )
    }

    pub fn record(&self, op: Op) {
        self.counts[op as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self, op: Op) -> u64 {
        self.counts[op as usize].load(Ordering::Relaxed)
    }

    /// Every non-zero counter, e.g. for `bucketfs status`.
    pub fn snapshot(&self) -> Vec<(Op, u64)> {
        Op::ALL
            .iter()
            .map(|&op| (op, self.get(op)))
            .filter(|&(_, n)| n > 0)
            .collect()
    }
}

/// The calls the filesystem makes on a bucket. Keys are full object keys.
#[async_trait]
pub trait ObjectStore: Send + Sync + 'static {
    /// One page of ListObjectsV2.
    async fn list(
        &self,
        prefix: &str,
        delimiter: Option<&str>,
        token: Option<String>,
        max_keys: Option<i32>,
    ) -> StoreResult<ListPage>;

    /// HeadObject, of the current object or of one version.
    async fn head(&self, key: &str, version: Option<&str>) -> StoreResult<ObjectInfo>;

    /// A byte range of an object. The range is clamped to the object size.
    async fn get_range(&self, key: &str, range: Range<u64>, pin: &ReadPin) -> StoreResult<Bytes>;

    /// The same bytes, handed to `sink` in order as pieces of `piece`
    /// bytes (the last may be shorter) as soon as each has arrived, so a
    /// reader of the first need not wait for the whole range. Fewer bytes
    /// than asked are handed on when the object is shorter; a failure
    /// after some pieces leaves those handed on.
    async fn get_range_pieces(
        &self,
        key: &str,
        range: Range<u64>,
        pin: &ReadPin,
        piece: u64,
        sink: &mut (dyn FnMut(Bytes) + Send),
    ) -> StoreResult<()> {
        let data = self.get_range(key, range, pin).await?;
        let piece = piece.max(1) as usize;
        let mut at = 0;
        while at < data.len() {
            let to = (at + piece).min(data.len());
            sink(data.slice(at..to));
            at = to;
        }
        Ok(())
    }

    /// PutObject. `keep`: the headers of the object this one replaces,
    /// sent again (a mount option still wins); without them the
    /// Content-Type comes from the key's extension.
    async fn put(
        &self,
        key: &str,
        body: PutBody,
        meta: &Metadata,
        keep: Option<&ObjectHeaders>,
    ) -> StoreResult<PutResult>;

    /// Server-side copy of an object (of one version if given). With
    /// `meta`, those user metadata keys are set over the source's; every
    /// other header of the source (Content-Type, Cache-Control and the
    /// like, its other `x-amz-meta-*`, tags, storage class, encryption)
    /// is kept unless a mount option sets it.
    async fn copy(
        &self,
        src: &str,
        dst: &str,
        meta: Option<&Metadata>,
        src_version: Option<&str>,
    ) -> StoreResult<PutResult>;

    async fn delete(&self, key: &str) -> StoreResult<()>;

    /// CreateMultipartUpload; `keep` as for `put`. Declares CRC32C unless
    /// the store refused it before.
    async fn create_multipart(
        &self,
        key: &str,
        meta: &Metadata,
        keep: Option<&ObjectHeaders>,
    ) -> StoreResult<Upload>;

    /// UploadPart, with the part's CRC32C when the upload declared it
    /// (else its Content-MD5).
    async fn upload_part(
        &self,
        key: &str,
        upload: &Upload,
        part_number: i32,
        body: PutBody,
    ) -> StoreResult<Part>;

    async fn upload_part_copy(
        &self,
        key: &str,
        upload: &Upload,
        part_number: i32,
        src: &str,
        range: Range<u64>,
        src_etag: Option<&str>,
    ) -> StoreResult<Part>;

    /// CompleteMultipartUpload, each part with the checksum it was sent
    /// with.
    async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: Vec<Part>,
    ) -> StoreResult<PutResult>;

    async fn abort_multipart(&self, key: &str, upload_id: &str) -> StoreResult<()>;

    /// Multipart uploads in progress for exactly `key`: id and when each
    /// was started.
    async fn list_uploads(&self, key: &str) -> StoreResult<Vec<(String, SystemTime)>>;

    /// One page of ListObjectVersions.
    async fn list_versions(
        &self,
        prefix: &str,
        delimiter: Option<&str>,
        marker: Option<(String, String)>,
    ) -> StoreResult<VersionPage>;

    /// A URL anyone can GET the current object (or one version) at for
    /// `expires`, signed with the mount's credentials (no request is
    /// made). What every request of the mount carries goes in its query
    /// (requester pays), not in headers the fetcher would have to send.
    async fn presign_get(
        &self,
        key: &str,
        version: Option<&str>,
        expires: std::time::Duration,
    ) -> StoreResult<String>;

    /// Checks that the bucket exists and is reachable with these credentials.
    async fn check_bucket(&self) -> StoreResult<()>;

    /// Requests made so far, by type.
    fn counters(&self) -> &Counters;
}

/// Deletes `key`, counting it done when the key is gone: a DeleteObject
/// may land and still answer an error (a timeout with retries off), so on
/// an error the key is asked with a HEAD. The error stands unless that
/// finds nothing there.
pub async fn delete_gone(store: &dyn ObjectStore, key: &str) -> StoreResult<()> {
    match store.delete(key).await {
        Ok(()) | Err(StoreError::NotFound) => Ok(()),
        Err(e) => match store.head(key, None).await {
            Err(StoreError::NotFound) => {
                tracing::debug!(key, error = %e, "the DeleteObject landed unanswered");
                Ok(())
            }
            _ => Err(e),
        },
    }
}

/// The buckets of an account, for an `s3://` mount: each bucket is then
/// an `ObjectStore` of its own.
#[async_trait]
pub trait Account: Send + Sync + 'static {
    /// ListBuckets: the names of the account's buckets.
    async fn list_buckets(&self) -> StoreResult<Vec<String>>;

    /// CreateBucket, in the account's (the mount's) region.
    async fn create_bucket(&self, name: &str) -> StoreResult<()>;

    /// DeleteBucket; `BucketNotEmpty` while it holds objects or versions.
    async fn delete_bucket(&self, name: &str) -> StoreResult<()>;

    /// The store of one bucket, reachable with these credentials (in
    /// whatever region it is): `NoSuchBucket` if there is none.
    async fn open_bucket(&self, name: &str) -> StoreResult<Arc<dyn ObjectStore>>;

    /// Account-level requests made so far (the buckets' own are counted
    /// by their stores).
    fn counters(&self) -> &Counters;
}
