//! `Faulty<S>`: wraps any `ObjectStore` and injects, per kind of call,
//! deterministic faults for tests of interleavings:
//!
//! - `hold(op, n)`: the next `n` calls of `op` stop *before* reaching the
//!   inner store (a request stuck on the way) until `release(op)`;
//!   `hold_after(op, n)`: the inner store performs the call, then the
//!   answer is held (a slow response to a request that did land).
//!   `wait_held(op)` waits (bounded) until a call is held.
//! - `fail(op, n, err)`: the next `n` calls fail with `err`, without
//!   reaching the inner store (`u32::MAX` for "until `clear`").
//! - `lie_after(op, n, err)`: the next `n` calls are performed, then
//!   answer `err` anyway (S3's 200-with-an-error-body, a timed-out answer
//!   to a request that succeeded).
//! - `latency(op, d)`: every call of `op` first sleeps `d` (tokio time).
//!
//! A call that is cancelled while held before the inner call never
//! reaches the store; one cancelled while its answer is held has landed.
//! Every attempt is counted (`calls`, and `counters()`), failed ones too,
//! and logged with its key (`log`).

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::watch;

use super::{
    Counters, ListPage, Metadata, ObjectHeaders, ObjectInfo, ObjectStore, Op, Part, PutBody,
    PutResult, ReadPin, StoreError, StoreResult, Upload, VersionPage,
};

/// How long `wait_held` waits at most.
pub const WAIT_HELD_MAX: Duration = Duration::from_secs(60);

#[derive(Debug, Default)]
struct Rule {
    hold_before: u32,
    hold_after: u32,
    /// Calls waiting now.
    held: usize,
    /// Bumped by `release`: a call held at epoch e waits until epoch > e.
    epoch: u64,
    fail: Option<(u32, StoreError)>,
    lie: Option<(u32, StoreError)>,
    latency: Option<Duration>,
}

/// A held call did not show up in time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotHeld {
    pub op: Op,
    pub held: usize,
    pub calls: u64,
}

impl std::fmt::Display for NotHeld {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "no {} call held within {WAIT_HELD_MAX:?} ({} held, {} calls made)",
            self.op.name(),
            self.held,
            self.calls
        )
    }
}

impl std::error::Error for NotHeld {}

/// A store wrapper that injects holds, failures, lies and latency.
pub struct Faulty<S: ObjectStore> {
    inner: Arc<S>,
    rules: Mutex<HashMap<Op, Rule>>,
    /// Bumped on every change of `rules` (a call held, a release).
    changed: watch::Sender<u64>,
    counters: Counters,
    log: Mutex<Vec<(Op, String)>>,
}

impl<S: ObjectStore> Faulty<S> {
    pub fn new(inner: Arc<S>) -> Self {
        Faulty {
            inner,
            rules: Mutex::new(HashMap::new()),
            changed: watch::channel(0).0,
            counters: Counters::default(),
            log: Mutex::new(Vec::new()),
        }
    }

    /// The wrapped store.
    pub fn inner(&self) -> &Arc<S> {
        &self.inner
    }

    fn with<R>(&self, op: Op, f: impl FnOnce(&mut Rule) -> R) -> R {
        let r = f(self.rules.lock().entry(op).or_default());
        self.changed.send_modify(|n| *n += 1);
        r
    }

    /// The next `n` calls of `op` wait before reaching the store until
    /// `release(op)`.
    pub fn hold(&self, op: Op, n: u32) {
        self.with(op, |r| r.hold_before = n);
    }

    /// The next `n` calls of `op` are performed, then their answer waits
    /// until `release(op)`.
    pub fn hold_after(&self, op: Op, n: u32) {
        self.with(op, |r| r.hold_after = n);
    }

    /// Lets every held call of `op` go on, and cancels holds not yet used.
    pub fn release(&self, op: Op) {
        self.with(op, |r| {
            r.hold_before = 0;
            r.hold_after = 0;
            r.epoch += 1;
        });
    }

    /// The next `n` calls of `op` fail with `err` (`u32::MAX`: until `clear`).
    pub fn fail(&self, op: Op, n: u32, err: StoreError) {
        self.with(op, |r| r.fail = Some((n, err)));
    }

    /// The next `n` calls of `op` are performed and then answer `err`.
    pub fn lie_after(&self, op: Op, n: u32, err: StoreError) {
        self.with(op, |r| r.lie = Some((n, err)));
    }

    /// Whether a failure or a lie is still to strike a call of `op`.
    pub fn pending(&self, op: Op) -> bool {
        self.rules.lock().get(&op).is_some_and(|r| {
            r.fail.as_ref().is_some_and(|(n, _)| *n > 0)
                || r.lie.as_ref().is_some_and(|(n, _)| *n > 0)
        })
    }

    /// Every call of `op` first waits `d` (`Duration::ZERO` to stop).
    pub fn latency(&self, op: Op, d: Duration) {
        self.with(op, |r| r.latency = (!d.is_zero()).then_some(d));
    }

    /// Removes failures, lies and latency of `op` and releases its holds.
    pub fn clear(&self, op: Op) {
        self.with(op, |r| {
            r.fail = None;
            r.lie = None;
            r.latency = None;
        });
        self.release(op);
    }

    /// Calls of `op` waiting now.
    pub fn held(&self, op: Op) -> usize {
        self.rules.lock().get(&op).map_or(0, |r| r.held)
    }

    /// Calls of `op` attempted so far (failed and held ones included).
    pub fn calls(&self, op: Op) -> u64 {
        self.counters.get(op)
    }

    /// Every call attempted so far: its op and key, in order.
    pub fn log(&self) -> Vec<(Op, String)> {
        self.log.lock().clone()
    }

    /// Waits until at least one call of `op` is held (at most
    /// `WAIT_HELD_MAX`, tokio time).
    pub async fn wait_held(&self, op: Op) -> Result<(), NotHeld> {
        self.wait_held_n(op, 1).await
    }

    /// Waits until at least `n` calls of `op` are held.
    pub async fn wait_held_n(&self, op: Op, n: usize) -> Result<(), NotHeld> {
        let mut rx = self.changed.subscribe();
        let wait = async {
            loop {
                if self.held(op) >= n {
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        };
        tokio::time::timeout(WAIT_HELD_MAX, wait)
            .await
            .map_err(|_| NotHeld {
                op,
                held: self.held(op),
                calls: self.calls(op),
            })
    }

    /// Waits until `release(op)`, if a hold of this kind is armed.
    async fn maybe_hold(&self, op: Op, after: bool) {
        let mut rx = self.changed.subscribe();
        let epoch = {
            let mut rules = self.rules.lock();
            let r = rules.entry(op).or_default();
            let n = if after {
                &mut r.hold_after
            } else {
                &mut r.hold_before
            };
            if *n == 0 {
                return;
            }
            *n -= 1;
            r.held += 1;
            r.epoch
        };
        self.changed.send_modify(|n| *n += 1);
        // Counts the call as no longer held even if it is cancelled.
        struct Unheld<'a, S: ObjectStore>(&'a Faulty<S>, Op);
        impl<S: ObjectStore> Drop for Unheld<'_, S> {
            fn drop(&mut self) {
                if let Some(r) = self.0.rules.lock().get_mut(&self.1) {
                    r.held -= 1;
                }
                self.0.changed.send_modify(|n| *n += 1);
            }
        }
        let _unheld = Unheld(self, op);
        loop {
            if self.rules.lock().get(&op).is_some_and(|r| r.epoch > epoch) {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    async fn before(&self, op: Op, key: &str) -> StoreResult<()> {
        self.counters.record(op);
        self.log.lock().push((op, key.to_string()));
        let latency = self.rules.lock().get(&op).and_then(|r| r.latency);
        if let Some(d) = latency {
            tokio::time::sleep(d).await;
        }
        self.maybe_hold(op, false).await;
        let mut rules = self.rules.lock();
        if let Some(r) = rules.get_mut(&op)
            && let Some((n, err)) = &mut r.fail
            && *n > 0
        {
            if *n != u32::MAX {
                *n -= 1;
            }
            return Err(err.clone());
        }
        Ok(())
    }

    async fn after<T>(&self, op: Op, res: StoreResult<T>) -> StoreResult<T> {
        self.maybe_hold(op, true).await;
        let res = res?;
        let mut rules = self.rules.lock();
        if let Some(r) = rules.get_mut(&op)
            && let Some((n, err)) = &mut r.lie
            && *n > 0
        {
            if *n != u32::MAX {
                *n -= 1;
            }
            return Err(err.clone());
        }
        Ok(res)
    }
}

#[async_trait]
impl<S: ObjectStore> ObjectStore for Faulty<S> {
    async fn list(
        &self,
        prefix: &str,
        delimiter: Option<&str>,
        token: Option<String>,
        max_keys: Option<i32>,
    ) -> StoreResult<ListPage> {
        self.before(Op::List, prefix).await?;
        let r = self.inner.list(prefix, delimiter, token, max_keys).await;
        self.after(Op::List, r).await
    }

    async fn head(&self, key: &str, version: Option<&str>) -> StoreResult<ObjectInfo> {
        self.before(Op::Head, key).await?;
        let r = self.inner.head(key, version).await;
        self.after(Op::Head, r).await
    }

    async fn get_range(&self, key: &str, range: Range<u64>, pin: &ReadPin) -> StoreResult<Bytes> {
        self.before(Op::Get, key).await?;
        let r = self.inner.get_range(key, range, pin).await;
        self.after(Op::Get, r).await
    }

    async fn put(
        &self,
        key: &str,
        body: PutBody,
        meta: &Metadata,
        keep: Option<&ObjectHeaders>,
    ) -> StoreResult<PutResult> {
        self.before(Op::Put, key).await?;
        let r = self.inner.put(key, body, meta, keep).await;
        self.after(Op::Put, r).await
    }

    async fn copy(
        &self,
        src: &str,
        dst: &str,
        meta: Option<&Metadata>,
        src_version: Option<&str>,
    ) -> StoreResult<PutResult> {
        self.before(Op::Copy, dst).await?;
        let r = self.inner.copy(src, dst, meta, src_version).await;
        self.after(Op::Copy, r).await
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        self.before(Op::Delete, key).await?;
        let r = self.inner.delete(key).await;
        self.after(Op::Delete, r).await
    }

    async fn create_multipart(
        &self,
        key: &str,
        meta: &Metadata,
        keep: Option<&ObjectHeaders>,
    ) -> StoreResult<Upload> {
        self.before(Op::CreateMultipart, key).await?;
        let r = self.inner.create_multipart(key, meta, keep).await;
        self.after(Op::CreateMultipart, r).await
    }

    async fn upload_part(
        &self,
        key: &str,
        upload: &Upload,
        part_number: i32,
        body: PutBody,
    ) -> StoreResult<Part> {
        self.before(Op::UploadPart, key).await?;
        let r = self.inner.upload_part(key, upload, part_number, body).await;
        self.after(Op::UploadPart, r).await
    }

    async fn upload_part_copy(
        &self,
        key: &str,
        upload: &Upload,
        part_number: i32,
        src: &str,
        range: Range<u64>,
        src_etag: Option<&str>,
    ) -> StoreResult<Part> {
        self.before(Op::UploadPartCopy, key).await?;
        let r = self
            .inner
            .upload_part_copy(key, upload, part_number, src, range, src_etag)
            .await;
        self.after(Op::UploadPartCopy, r).await
    }

    async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: Vec<Part>,
    ) -> StoreResult<PutResult> {
        self.before(Op::CompleteMultipart, key).await?;
        let r = self.inner.complete_multipart(key, upload_id, parts).await;
        self.after(Op::CompleteMultipart, r).await
    }

    async fn abort_multipart(&self, key: &str, upload_id: &str) -> StoreResult<()> {
        self.before(Op::AbortMultipart, key).await?;
        let r = self.inner.abort_multipart(key, upload_id).await;
        self.after(Op::AbortMultipart, r).await
    }

    async fn list_uploads(&self, key: &str) -> StoreResult<Vec<(String, SystemTime)>> {
        self.before(Op::ListUploads, key).await?;
        let r = self.inner.list_uploads(key).await;
        self.after(Op::ListUploads, r).await
    }

    async fn list_versions(
        &self,
        prefix: &str,
        delimiter: Option<&str>,
        marker: Option<(String, String)>,
    ) -> StoreResult<VersionPage> {
        self.before(Op::ListVersions, prefix).await?;
        let r = self.inner.list_versions(prefix, delimiter, marker).await;
        self.after(Op::ListVersions, r).await
    }

    async fn presign_get(
        &self,
        key: &str,
        version: Option<&str>,
        expires: std::time::Duration,
    ) -> StoreResult<String> {
        self.inner.presign_get(key, version, expires).await
    }

    async fn check_bucket(&self) -> StoreResult<()> {
        self.before(Op::HeadBucket, "").await?;
        let r = self.inner.check_bucket().await;
        self.after(Op::HeadBucket, r).await
    }

    fn counters(&self) -> &Counters {
        &self.counters
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemStore;

    fn store() -> Arc<Faulty<MemStore>> {
        Arc::new(Faulty::new(Arc::new(MemStore::versioned())))
    }

    fn body(b: &'static [u8]) -> PutBody {
        PutBody::Bytes(Bytes::from_static(b))
    }

    #[tokio::test]
    async fn a_held_call_waits_for_release_and_lands_after_it() {
        let s = store();
        s.hold(Op::Put, 1);
        let t = tokio::spawn({
            let s = s.clone();
            async move { s.put("k", body(b"v"), &Metadata::new(), None).await }
        });
        s.wait_held(Op::Put).await.unwrap();
        assert_eq!(s.inner().object("k"), None, "held before the store");
        assert_eq!(s.held(Op::Put), 1);
        s.release(Op::Put);
        tokio::time::timeout(Duration::from_secs(10), t)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(s.inner().object("k").unwrap().as_ref(), b"v");
        assert_eq!(s.held(Op::Put), 0);
        // The hold was used up: the next call goes straight through.
        s.put("k2", body(b"w"), &Metadata::new(), None)
            .await
            .unwrap();
        assert_eq!(s.calls(Op::Put), 2);
    }

    #[tokio::test]
    async fn hold_after_lands_first_and_lie_answers_an_error() {
        let s = store();
        s.hold_after(Op::Put, 1);
        s.lie_after(Op::Put, 1, StoreError::Transient("timeout".into()));
        let t = tokio::spawn({
            let s = s.clone();
            async move { s.put("k", body(b"v"), &Metadata::new(), None).await }
        });
        s.wait_held(Op::Put).await.unwrap();
        assert_eq!(s.inner().object("k").unwrap().as_ref(), b"v", "landed");
        s.release(Op::Put);
        let r = tokio::time::timeout(Duration::from_secs(10), t)
            .await
            .unwrap()
            .unwrap();
        assert!(r.unwrap_err().is_transient());
        s.put("k", body(b"w"), &Metadata::new(), None)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn failures_run_out_or_last_until_cleared() {
        let s = store();
        s.fail(Op::Head, 2, StoreError::Transient("503".into()));
        assert!(s.head("x", None).await.unwrap_err().is_transient());
        assert!(s.head("x", None).await.unwrap_err().is_transient());
        assert_eq!(s.head("x", None).await, Err(StoreError::NotFound));
        s.fail(Op::Delete, u32::MAX, StoreError::AccessDenied("no".into()));
        for _ in 0..5 {
            assert!(s.delete("x").await.is_err());
        }
        s.clear(Op::Delete);
        s.delete("x").await.unwrap();
        assert_eq!(s.calls(Op::Head), 3);
        assert_eq!(
            s.inner().counters().get(Op::Head),
            1,
            "failed calls never reached it"
        );
    }

    #[tokio::test]
    async fn latency_delays_every_call_until_cleared() {
        let s = store();
        s.latency(Op::Head, Duration::from_millis(50));
        let t0 = tokio::time::Instant::now();
        let _ = s.head("x", None).await;
        assert!(t0.elapsed() >= Duration::from_millis(50));
        s.clear(Op::Head);
        assert_eq!(s.head("x", None).await, Err(StoreError::NotFound));
    }

    #[tokio::test]
    async fn a_cancelled_held_call_is_no_longer_counted_as_held() {
        let s = store();
        s.hold(Op::Get, 1);
        let s2 = s.clone();
        let t = tokio::spawn(async move { s2.get_range("k", 0..1, &ReadPin::Latest).await });
        s.wait_held(Op::Get).await.unwrap();
        t.abort();
        let _ = t.await;
        assert_eq!(s.held(Op::Get), 0);
    }
}
