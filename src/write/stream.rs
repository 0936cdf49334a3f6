//! Uploading while writing: a new file written sequentially sends its
//! parts while the writer is still going, so close() waits only for the
//! tail. Any write behind what was sent, or a truncation below it, cancels
//! the stream (the multipart upload is aborted) and close() falls back to
//! the ordinary upload. The upload id is journaled, so a killed daemon's
//! next mount aborts it.

use std::sync::Arc;

use tokio::task::JoinSet;
use tracing::{debug, warn};

use super::{MIN_PART_SIZE_BYTES, Progress};
use crate::store::{Metadata, ObjectStore, Part, PutBody, StoreError, StoreResult, Upload};

/// Parts 1..=1000 are the configured size, then it doubles every 1,000
/// parts, so a stream of any size fits S3's 10,000 parts.
pub fn stream_part_size(configured: u64, part_number: i32) -> u64 {
    let base = configured.max(MIN_PART_SIZE_BYTES);
    base << ((part_number.max(1) - 1) / 1000).min(20)
}

pub struct Streaming {
    pub key: String,
    pub upload: Upload,
    /// The metadata the upload was created with (fixed from then on).
    pub meta: Metadata,
    /// Bytes [0, next_offset) are in parts sent or being sent.
    pub next_offset: u64,
    pub next_part: i32,
    tasks: JoinSet<StoreResult<Part>>,
    pub done: Vec<Part>,
    failed: Option<StoreError>,
    store: Arc<dyn ObjectStore>,
}

impl std::fmt::Debug for Streaming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Streaming")
            .field("key", &self.key)
            .field("next_offset", &self.next_offset)
            .field("next_part", &self.next_part)
            .finish()
    }
}

impl Streaming {
    pub fn new(store: Arc<dyn ObjectStore>, key: String, upload: Upload, meta: Metadata) -> Self {
        Streaming {
            key,
            upload,
            meta,
            next_offset: 0,
            next_part: 1,
            tasks: JoinSet::new(),
            done: Vec::new(),
            failed: None,
            store,
        }
    }

    fn record(&mut self, r: Result<StoreResult<Part>, tokio::task::JoinError>) {
        match r {
            Ok(Ok(part)) => self.done.push(part),
            Ok(Err(e)) => self.failed = Some(e),
            Err(e) => self.failed = Some(StoreError::Other(format!("part task: {e}"))),
        }
    }

    /// Sends one part of the staging file, waiting first while `limit`
    /// parts are in flight.
    pub async fn send(&mut self, file: Arc<std::fs::File>, len: u64, limit: usize) {
        while let Some(r) = self.tasks.try_join_next() {
            self.record(r);
        }
        while self.tasks.len() >= limit.max(1) {
            if let Some(r) = self.tasks.join_next().await {
                self.record(r);
            }
        }
        let (n, offset) = (self.next_part, self.next_offset);
        let (store, key, upload) = (self.store.clone(), self.key.clone(), self.upload.clone());
        self.tasks.spawn(async move {
            let body = PutBody::File { file, offset, len };
            store.upload_part(&key, &upload, n, body).await
        });
        self.next_offset += len;
        self.next_part += 1;
    }

    /// Waits for every part sent; the parts, or the first failure.
    pub async fn finish(&mut self, progress: &Progress) -> StoreResult<Vec<Part>> {
        while let Some(r) = self.tasks.join_next().await {
            self.record(r);
        }
        progress
            .done_bytes
            .store(self.next_offset, std::sync::atomic::Ordering::Relaxed);
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        let mut parts = std::mem::take(&mut self.done);
        parts.sort();
        Ok(parts)
    }

    /// Stops the stream and aborts its multipart upload, waiting for it.
    pub async fn abort(mut self) {
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
        if let Err(e) = self.store.abort_multipart(&self.key, &self.upload.id).await {
            warn!(key = %self.key, error = %e, "could not abort a failed streaming upload");
        }
    }

    /// Stops the stream and aborts its multipart upload (in the background).
    pub fn cancel(self) {
        self.cancel_then(|| {});
    }

    /// As `cancel`, and runs `aborted` once the abort is confirmed: what
    /// records the upload (a journal) can go then, not before, so a daemon
    /// killed meanwhile leaves its id to the next mount's recovery.
    pub fn cancel_then(mut self, aborted: impl FnOnce() + Send + 'static) {
        self.tasks.abort_all();
        debug!(key = %self.key, "streaming upload cancelled");
        let (store, key, id) = (self.store.clone(), self.key.clone(), self.upload.id.clone());
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                match store.abort_multipart(&key, &id).await {
                    Ok(()) | Err(crate::store::StoreError::NotFound) => aborted(),
                    Err(e) => warn!(key, error = %e,
                        "could not abort a cancelled streaming upload; the next mount aborts it"),
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_parts_grow_to_fit_five_tib() {
        const MIB: u64 = 1024 * 1024;
        let total: u64 = (1..=10_000).map(|n| stream_part_size(8 * MIB, n)).sum();
        assert!(total > 5 * 1024 * 1024 * MIB, "{total}");
        assert_eq!(stream_part_size(8 * MIB, 1), 8 * MIB);
        assert_eq!(stream_part_size(MIB, 1), 5 * MIB);
    }
}
