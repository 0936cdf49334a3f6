//! `MemStore`: an in-memory bucket with versions, request counters and
//! failure injection, for fast tests of everything above the store.
//!
//! It follows S3's rules where the core depends on them: lexicographic key
//! order, ListObjectsV2 pagination (1,000 entries a page unless asked for
//! fewer) with common prefixes, delete markers on a versioned bucket, ETag
//! preconditions, and the 1,024-byte key limit.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use md5::Digest;
use parking_lot::Mutex;

use super::{
    Counters, ListPage, Metadata, ObjectHeaders, ObjectInfo, ObjectStore, Op, Part, PutBody,
    PutResult, ReadPin, StoreError, StoreResult, Upload, VersionInfo, VersionPage,
};

const MAX_KEY_BYTES: usize = 1024;
const DEFAULT_PAGE_KEYS: usize = 1000;

#[derive(Clone, Debug)]
struct MemVersion {
    id: String,
    /// `None` is a delete marker.
    data: Option<Bytes>,
    meta: Metadata,
    headers: ObjectHeaders,
    etag: String,
    last_modified: SystemTime,
}

#[derive(Debug)]
struct MemUpload {
    key: String,
    started: SystemTime,
    meta: Metadata,
    headers: ObjectHeaders,
    /// Declared with CRC32C: each part's is checked when it is sent and
    /// must be repeated by Complete, as S3 does.
    crc32c: bool,
    /// Each part's bytes and CRC32C (base64).
    parts: BTreeMap<i32, (Bytes, String)>,
}

/// The CRC32C of `data` as S3 writes it (base64 of the big-endian value).
pub fn crc32c_b64(data: &[u8]) -> String {
    b64_of(crc32c(data))
}

fn crc32c(data: &[u8]) -> u32 {
    crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, data) as u32
}

/// A CRC32C as S3 writes it.
fn b64_of(crc: u32) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(crc.to_be_bytes())
}

#[derive(Debug, Default)]
struct State {
    /// Versions of each key, oldest first.
    objects: BTreeMap<String, Vec<MemVersion>>,
    uploads: HashMap<String, MemUpload>,
    /// Uploads are created without CRC32C (a store that refuses it, or
    /// an older bucketfs's upload).
    no_checksums: bool,
    /// Failures to inject: the next `n` calls of an op fail with the error.
    failures: HashMap<Op, (u32, StoreError)>,
    /// Calls that do their work, then answer with an error.
    lies: HashMap<Op, StoreError>,
}

/// An in-memory bucket.
#[derive(Debug)]
pub struct MemStore {
    state: Mutex<State>,
    versioned: bool,
    counters: Counters,
    seq: AtomicU64,
}

impl MemStore {
    /// A bucket with versioning enabled.
    pub fn versioned() -> Self {
        Self::new(true)
    }

    /// A bucket that never had versioning (version id `null`).
    pub fn unversioned() -> Self {
        Self::new(false)
    }

    fn new(versioned: bool) -> Self {
        MemStore {
            state: Mutex::new(State::default()),
            versioned,
            counters: Counters::default(),
            seq: AtomicU64::new(1),
        }
    }

    /// From now on, multipart uploads are made without CRC32C, as an older
    /// bucketfs made them (or a store that refuses it).
    pub fn without_part_checksums(&self) {
        self.state.lock().no_checksums = true;
    }

    /// Makes the next `times` calls of `op` fail with `err`.
    pub fn fail_next(&self, op: Op, times: u32, err: StoreError) {
        self.state.lock().failures.insert(op, (times, err));
    }

    /// The next `op` does its work, then answers `err` (a Complete that
    /// times out after it landed). Only CompleteMultipart honours it.
    pub fn lie_after_next(&self, op: Op, err: StoreError) {
        self.state.lock().lies.insert(op, err);
    }

    /// Current bytes of a key, as another S3 client would see them.
    pub fn object(&self, key: &str) -> Option<Bytes> {
        let st = self.state.lock();
        st.objects.get(key)?.last()?.data.clone()
    }

    /// User metadata of the current object.
    pub fn metadata(&self, key: &str) -> Option<Metadata> {
        let st = self.state.lock();
        let v = st.objects.get(key)?.last()?;
        v.data.as_ref().map(|_| v.meta.clone())
    }

    /// Headers of the current object.
    pub fn headers(&self, key: &str) -> Option<ObjectHeaders> {
        let st = self.state.lock();
        let v = st.objects.get(key)?.last()?;
        v.data.as_ref().map(|_| v.headers.clone())
    }

    /// Every current key, in order.
    pub fn keys(&self) -> Vec<String> {
        let st = self.state.lock();
        st.objects
            .iter()
            .filter(|(_, vs)| vs.last().is_some_and(|v| v.data.is_some()))
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Multipart uploads started and neither completed nor aborted.
    pub fn open_uploads(&self) -> usize {
        self.state.lock().uploads.len()
    }

    /// Replaces the user metadata of `key`'s current version and keeps its
    /// ETag, as S3 does when a single-part object is copied onto itself
    /// with new metadata (another client's chmod). False if `key` is absent.
    pub fn set_metadata_keeping_etag(&self, key: &str, meta: Metadata) -> bool {
        let mut st = self.state.lock();
        match st.objects.get_mut(key).and_then(|v| v.last_mut()) {
            Some(v) if v.data.is_some() => {
                v.meta = meta;
                true
            }
            _ => false,
        }
    }

    /// Writes an object behind the filesystem's back, as another client would.
    pub fn insert(&self, key: &str, data: &[u8], meta: Metadata) -> PutResult {
        self.insert_with_headers(key, data, meta, ObjectHeaders::default())
    }

    /// `insert`, with headers (Content-Type, storage class...).
    pub fn insert_with_headers(
        &self,
        key: &str,
        data: &[u8],
        meta: Metadata,
        headers: ObjectHeaders,
    ) -> PutResult {
        let mut st = self.state.lock();
        let data = Some(Bytes::copy_from_slice(data));
        self.store_version(&mut st, key, data, meta, headers)
    }

    fn enter(&self, op: Op) -> StoreResult<()> {
        self.counters.record(op);
        let mut st = self.state.lock();
        if let Some((n, err)) = st.failures.get_mut(&op)
            && *n > 0
        {
            *n -= 1;
            return Err(err.clone());
        }
        Ok(())
    }

    fn next_id(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    fn store_version(
        &self,
        st: &mut State,
        key: &str,
        data: Option<Bytes>,
        meta: Metadata,
        headers: ObjectHeaders,
    ) -> PutResult {
        let n = self.next_id();
        let id = if self.versioned {
            format!("v{n:08}")
        } else {
            "null".to_string()
        };
        // As S3 without SSE-KMS or SSE-C: the MD5 of the bytes (the same
        // bytes written again have the same ETag).
        let etag = md5_etag(data.as_deref().unwrap_or(&[]));
        // Strictly increasing times, so "newest first" is well defined.
        let last_modified = SystemTime::now() + Duration::from_millis(n);
        let versions = st.objects.entry(key.to_string()).or_default();
        if !self.versioned {
            versions.clear();
        }
        versions.push(MemVersion {
            id: id.clone(),
            data,
            meta,
            headers,
            etag: etag.clone(),
            last_modified,
        });
        PutResult {
            etag,
            version_id: self.versioned.then_some(id),
            sent_crc32c: None,
        }
    }

    fn current<'a>(st: &'a State, key: &str) -> StoreResult<&'a MemVersion> {
        match st.objects.get(key).and_then(|vs| vs.last()) {
            Some(v) if v.data.is_some() => Ok(v),
            _ => Err(StoreError::NotFound),
        }
    }

    fn find<'a>(st: &'a State, key: &str, version: Option<&str>) -> StoreResult<&'a MemVersion> {
        match version {
            None => Self::current(st, key),
            Some(id) => st
                .objects
                .get(key)
                .and_then(|vs| vs.iter().find(|v| v.id == id))
                .ok_or(StoreError::NotFound),
        }
    }

    fn info(&self, key: &str, v: &MemVersion, with_meta: bool) -> ObjectInfo {
        ObjectInfo {
            key: key.to_string(),
            size: v.data.as_ref().map_or(0, |d| d.len() as u64),
            etag: v.etag.clone(),
            last_modified: v.last_modified,
            version_id: self.versioned.then(|| v.id.clone()),
            storage_class: Some(
                v.headers
                    .storage_class
                    .clone()
                    .unwrap_or_else(|| "STANDARD".to_string()),
            ),
            metadata: with_meta.then(|| v.meta.clone()),
            headers: with_meta.then(|| Box::new(v.headers.clone())),
        }
    }
}

/// The headers of a new object: those it keeps, else a Content-Type from
/// its extension (as S3Store sends).
fn new_headers(key: &str, keep: Option<&ObjectHeaders>) -> ObjectHeaders {
    match keep {
        Some(h) => h.clone(),
        None => ObjectHeaders {
            content_type: super::content_type_for(key),
            ..ObjectHeaders::default()
        },
    }
}

fn md5_etag(data: &[u8]) -> String {
    format!("\"{}\"", crate::hex(&md5::Md5::digest(data)))
}

fn check_key(key: &str) -> StoreResult<()> {
    if key.len() > MAX_KEY_BYTES || key.is_empty() {
        return Err(StoreError::InvalidRequest(format!(
            "key length {} is outside 1..=1024 bytes",
            key.len()
        )));
    }
    Ok(())
}

/// Splits `key` under `prefix` by `delimiter`: `Some(common_prefix)` when
/// the key lies below a deeper level.
fn common_prefix(prefix: &str, key: &str, delimiter: Option<&str>) -> Option<String> {
    let d = delimiter?;
    let rest = &key[prefix.len()..];
    rest.find(d)
        .map(|i| format!("{prefix}{}", &rest[..i + d.len()]))
}

#[async_trait]
impl ObjectStore for MemStore {
    async fn list(
        &self,
        prefix: &str,
        delimiter: Option<&str>,
        token: Option<String>,
        max_keys: Option<i32>,
    ) -> StoreResult<ListPage> {
        self.enter(Op::List)?;
        let st = self.state.lock();
        let limit = max_keys.map_or(DEFAULT_PAGE_KEYS, |m| m.clamp(1, 1000) as usize);
        let mut page = ListPage::default();
        let mut count = 0;
        let mut last: Option<String> = None;
        let start = token.clone().unwrap_or_else(|| prefix.to_string());
        for (key, versions) in st.objects.range(start.clone()..) {
            if !key.starts_with(prefix) {
                break;
            }
            if token.as_deref().is_some_and(|t| key.as_str() <= t) {
                continue;
            }
            let Some(v) = versions.last().filter(|v| v.data.is_some()) else {
                continue;
            };
            let name = match common_prefix(prefix, key, delimiter) {
                Some(cp) => {
                    if page.prefixes.last() == Some(&cp) || token.as_deref() == Some(cp.as_str()) {
                        continue;
                    }
                    if count == limit {
                        page.next_token = last;
                        return Ok(page);
                    }
                    page.prefixes.push(cp.clone());
                    cp
                }
                None => {
                    if count == limit {
                        page.next_token = last;
                        return Ok(page);
                    }
                    page.objects.push(self.info(key, v, false));
                    key.clone()
                }
            };
            count += 1;
            last = Some(name);
        }
        Ok(page)
    }

    async fn head(&self, key: &str, version: Option<&str>) -> StoreResult<ObjectInfo> {
        self.enter(Op::Head)?;
        let st = self.state.lock();
        let v = Self::find(&st, key, version)?;
        if v.data.is_none() {
            return Err(StoreError::NotFound);
        }
        Ok(self.info(key, v, true))
    }

    async fn get_range(&self, key: &str, range: Range<u64>, pin: &ReadPin) -> StoreResult<Bytes> {
        self.enter(Op::Get)?;
        let st = self.state.lock();
        let v = match pin {
            ReadPin::Version(id) => Self::find(&st, key, Some(id))?,
            ReadPin::Latest => Self::current(&st, key)?,
            ReadPin::Etag(etag) => {
                let v = Self::current(&st, key)?;
                if &v.etag != etag {
                    return Err(StoreError::PreconditionFailed);
                }
                v
            }
        };
        let data = v.data.as_ref().ok_or(StoreError::NotFound)?;
        let end = range.end.min(data.len() as u64) as usize;
        let start = (range.start as usize).min(end);
        self.counters.add_received((end - start) as u64);
        Ok(data.slice(start..end))
    }

    async fn put(
        &self,
        key: &str,
        body: PutBody,
        meta: &Metadata,
        keep: Option<&ObjectHeaders>,
    ) -> StoreResult<PutResult> {
        self.enter(Op::Put)?;
        check_key(key)?;
        let data = body
            .read_all()
            .map_err(|e| StoreError::Other(e.to_string()))?;
        self.counters.add_sent(data.len() as u64);
        let sent_crc32c = Some(crc32c(&data));
        let mut st = self.state.lock();
        let headers = new_headers(key, keep);
        let put = self.store_version(&mut st, key, Some(data), meta.clone(), headers);
        Ok(PutResult { sent_crc32c, ..put })
    }

    async fn copy(
        &self,
        src: &str,
        dst: &str,
        meta: Option<&Metadata>,
        src_version: Option<&str>,
    ) -> StoreResult<PutResult> {
        self.enter(Op::Copy)?;
        check_key(dst)?;
        let mut st = self.state.lock();
        let v = Self::find(&st, src, src_version)?.clone();
        // As S3Store: the given keys over the source's, the others kept.
        let merged = match meta {
            Some(m) => super::merge_metadata(&v.meta, m),
            None => v.meta,
        };
        Ok(self.store_version(&mut st, dst, v.data, merged, v.headers))
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        self.enter(Op::Delete)?;
        let mut st = self.state.lock();
        if !st.objects.contains_key(key) {
            return Ok(());
        }
        if self.versioned {
            self.store_version(
                &mut st,
                key,
                None,
                Metadata::new(),
                ObjectHeaders::default(),
            );
        } else {
            st.objects.remove(key);
        }
        Ok(())
    }

    async fn create_multipart(
        &self,
        key: &str,
        meta: &Metadata,
        keep: Option<&ObjectHeaders>,
    ) -> StoreResult<Upload> {
        self.enter(Op::CreateMultipart)?;
        check_key(key)?;
        let id = format!("upload-{}", self.next_id());
        let mut st = self.state.lock();
        let crc32c = !st.no_checksums;
        st.uploads.insert(
            id.clone(),
            MemUpload {
                key: key.to_string(),
                started: SystemTime::now(),
                meta: meta.clone(),
                headers: new_headers(key, keep),
                crc32c,
                parts: BTreeMap::new(),
            },
        );
        Ok(Upload { id, crc32c })
    }

    async fn upload_part(
        &self,
        _key: &str,
        upload: &Upload,
        part_number: i32,
        body: PutBody,
    ) -> StoreResult<Part> {
        self.enter(Op::UploadPart)?;
        let data = body
            .read_all()
            .map_err(|e| StoreError::Other(e.to_string()))?;
        self.counters.add_sent(data.len() as u64);
        // As S3: a part's ETag is the MD5 of its bytes.
        let etag = md5_etag(&data);
        let sent = crc32c(&data);
        let crc = b64_of(sent);
        let mut st = self.state.lock();
        let up = st.uploads.get_mut(&upload.id).ok_or(StoreError::NotFound)?;
        if up.crc32c != upload.crc32c {
            return Err(StoreError::InvalidRequest(format!(
                "part {part_number}: the upload's checksum is {}",
                if up.crc32c { "CRC32C" } else { "none" }
            )));
        }
        up.parts.insert(part_number, (data, crc.clone()));
        Ok(Part {
            number: part_number,
            etag,
            crc32c: upload.crc32c.then_some(crc),
            sent_crc32c: Some(sent),
        })
    }

    async fn upload_part_copy(
        &self,
        _key: &str,
        upload: &Upload,
        part_number: i32,
        src: &str,
        range: Range<u64>,
        src_etag: Option<&str>,
    ) -> StoreResult<Part> {
        self.enter(Op::UploadPartCopy)?;
        let mut st = self.state.lock();
        let v = Self::current(&st, src)?;
        if src_etag.is_some_and(|e| e != v.etag) {
            return Err(StoreError::PreconditionFailed);
        }
        let data = v.data.clone().unwrap_or_default();
        let end = (range.end as usize).min(data.len());
        let part = data.slice((range.start as usize).min(end)..end);
        // As S3: a copied part's ETag is the MD5 of its bytes too.
        let etag = md5_etag(&part);
        let crc = crc32c_b64(&part);
        let up = st.uploads.get_mut(&upload.id).ok_or(StoreError::NotFound)?;
        let declared = up.crc32c;
        up.parts.insert(part_number, (part, crc.clone()));
        // As S3: a copied part's checksum comes back in CopyPartResult.
        Ok(Part {
            number: part_number,
            etag,
            crc32c: declared.then_some(crc),
            sent_crc32c: None,
        })
    }

    async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: Vec<Part>,
    ) -> StoreResult<PutResult> {
        self.enter(Op::CompleteMultipart)?;
        let mut st = self.state.lock();
        let up = st.uploads.get(upload_id).ok_or(StoreError::NotFound)?;
        let mut data = Vec::new();
        for p in &parts {
            let (part, crc) = up
                .parts
                .get(&p.number)
                .ok_or_else(|| StoreError::InvalidRequest(format!("part {} missing", p.number)))?;
            // As S3: an upload declared with CRC32C needs each part's
            // checksum, and one without takes none.
            match (&p.crc32c, up.crc32c) {
                (Some(c), true) if c == crc => {}
                (None, false) => {}
                (c, _) => {
                    return Err(StoreError::InvalidRequest(format!(
                        "part {}: checksum {c:?} in the request, {} uploaded",
                        p.number,
                        if up.crc32c { crc.as_str() } else { "none" }
                    )));
                }
            }
            data.extend_from_slice(part);
        }
        let up = st.uploads.remove(upload_id).expect("looked up above");
        debug_assert_eq!(up.key, key);
        let mut put =
            self.store_version(&mut st, key, Some(Bytes::from(data)), up.meta, up.headers);
        // As S3: MD5 of the parts' MD5s, dash, part count.
        let mut h = md5::Md5::new();
        for p in &parts {
            h.update(md5::Md5::digest(&up.parts[&p.number].0));
        }
        put.etag = format!("\"{}-{}\"", crate::hex(&h.finalize()), parts.len());
        if let Some(v) = st.objects.get_mut(key).and_then(|vs| vs.last_mut()) {
            v.etag = put.etag.clone();
        }
        if let Some(e) = st.lies.remove(&Op::CompleteMultipart) {
            return Err(e);
        }
        Ok(put)
    }

    async fn abort_multipart(&self, _key: &str, upload_id: &str) -> StoreResult<()> {
        self.enter(Op::AbortMultipart)?;
        self.state.lock().uploads.remove(upload_id);
        Ok(())
    }

    async fn list_uploads(&self, key: &str) -> StoreResult<Vec<(String, SystemTime)>> {
        self.enter(Op::ListUploads)?;
        Ok(self
            .state
            .lock()
            .uploads
            .iter()
            .filter(|(_, u)| u.key == key)
            .map(|(id, u)| (id.clone(), u.started))
            .collect())
    }

    async fn list_versions(
        &self,
        prefix: &str,
        delimiter: Option<&str>,
        _marker: Option<(String, String)>,
    ) -> StoreResult<VersionPage> {
        self.enter(Op::ListVersions)?;
        let st = self.state.lock();
        let mut page = VersionPage::default();
        for (key, versions) in st.objects.range(prefix.to_string()..) {
            if !key.starts_with(prefix) {
                break;
            }
            if let Some(cp) = common_prefix(prefix, key, delimiter) {
                if page.prefixes.last() != Some(&cp) {
                    page.prefixes.push(cp);
                }
                continue;
            }
            let latest = versions.len() - 1;
            for (i, v) in versions.iter().enumerate().rev() {
                page.versions.push(VersionInfo {
                    key: key.clone(),
                    version_id: v.id.clone(),
                    is_latest: i == latest,
                    last_modified: v.last_modified,
                    size: v.data.as_ref().map_or(0, |d| d.len() as u64),
                    etag: v.etag.clone(),
                    delete_marker: v.data.is_none(),
                });
            }
        }
        Ok(page)
    }

    async fn presign_get(
        &self,
        key: &str,
        version: Option<&str>,
        expires: Duration,
    ) -> StoreResult<String> {
        let v = version
            .map(|v| format!("&versionId={v}"))
            .unwrap_or_default();
        Ok(format!("memory:///{key}?expires={}{v}", expires.as_secs()))
    }

    async fn check_bucket(&self) -> StoreResult<()> {
        self.enter(Op::HeadBucket)
    }

    fn counters(&self) -> &Counters {
        &self.counters
    }
}

/// An account of in-memory buckets, for tests of `s3://` mounts.
#[derive(Debug, Default)]
pub struct MemAccount {
    buckets: Mutex<BTreeMap<String, std::sync::Arc<MemStore>>>,
    counters: Counters,
}

impl MemAccount {
    /// A bucket (unversioned) as another client would make it.
    pub fn add(&self, name: &str) -> std::sync::Arc<MemStore> {
        self.buckets
            .lock()
            .entry(name.to_string())
            .or_insert_with(|| std::sync::Arc::new(MemStore::unversioned()))
            .clone()
    }

    /// The bucket of that name, if there is one.
    pub fn bucket(&self, name: &str) -> Option<std::sync::Arc<MemStore>> {
        self.buckets.lock().get(name).cloned()
    }
}

#[async_trait]
impl super::Account for MemAccount {
    async fn list_buckets(&self) -> StoreResult<Vec<String>> {
        self.counters.record(Op::ListBuckets);
        Ok(self.buckets.lock().keys().cloned().collect())
    }

    async fn create_bucket(&self, name: &str) -> StoreResult<()> {
        self.counters.record(Op::CreateBucket);
        let mut b = self.buckets.lock();
        if b.contains_key(name) {
            return Err(StoreError::AlreadyExists);
        }
        b.insert(
            name.to_string(),
            std::sync::Arc::new(MemStore::unversioned()),
        );
        Ok(())
    }

    async fn delete_bucket(&self, name: &str) -> StoreResult<()> {
        self.counters.record(Op::DeleteBucket);
        let mut b = self.buckets.lock();
        let store = b.get(name).ok_or(StoreError::NoSuchBucket)?;
        let st = store.state.lock();
        if !st.objects.is_empty() {
            return Err(StoreError::BucketNotEmpty);
        }
        drop(st);
        b.remove(name);
        Ok(())
    }

    async fn open_bucket(&self, name: &str) -> StoreResult<std::sync::Arc<dyn ObjectStore>> {
        let store = self.bucket(name).ok_or(StoreError::NoSuchBucket)?;
        Ok(store)
    }

    fn counters(&self) -> &Counters {
        &self.counters
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn list_paginates_and_groups_prefixes() {
        let s = MemStore::versioned();
        for i in 0..2500 {
            s.insert(&format!("d/f{i:05}"), b"x", Metadata::new());
        }
        s.insert("d/sub/a", b"x", Metadata::new());
        s.insert("d/sub/b", b"x", Metadata::new());
        s.insert("e", b"x", Metadata::new());
        let mut token = None;
        let (mut objects, mut prefixes, mut pages) = (0, Vec::new(), 0);
        loop {
            let p = s.list("d/", Some("/"), token, None).await.unwrap();
            pages += 1;
            objects += p.objects.len();
            prefixes.extend(p.prefixes);
            token = p.next_token;
            if token.is_none() {
                break;
            }
        }
        assert_eq!(
            (objects, prefixes, pages),
            (2500, vec!["d/sub/".to_string()], 3)
        );
    }

    #[tokio::test]
    async fn delete_leaves_marker_on_versioned_bucket() {
        let s = MemStore::versioned();
        s.insert("k", b"1", Metadata::new());
        s.insert("k", b"2", Metadata::new());
        s.delete("k").await.unwrap();
        assert_eq!(s.head("k", None).await, Err(StoreError::NotFound));
        let v = s.list_versions("k", None, None).await.unwrap().versions;
        assert_eq!(v.len(), 3);
        assert!(v[0].delete_marker && v[0].is_latest);
        let old = s
            .get_range("k", 0..10, &ReadPin::Version(v[2].version_id.clone()))
            .await;
        assert_eq!(old.unwrap(), Bytes::from_static(b"1"));
    }

    #[tokio::test]
    async fn injected_failures_run_out() {
        let s = MemStore::versioned();
        s.fail_next(Op::Head, 2, StoreError::Transient("503".into()));
        assert!(s.head("x", None).await.unwrap_err().is_transient());
        assert!(s.head("x", None).await.unwrap_err().is_transient());
        assert_eq!(s.head("x", None).await, Err(StoreError::NotFound));
        assert_eq!(s.counters().get(Op::Head), 3);
    }
}
