//! The block cache for reads: fixed-size blocks of objects, keyed by the
//! object's identity (key + ETag or version id + block index), so a block of
//! a changed object can never be served. Memory tier with LRU eviction,
//! bounded in bytes. Concurrent misses of one block make one GET.
//!
//! Lock order: `inflight` and `mem` are never held together, nor across an
//! `.await`.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use lru::LruCache;
use parking_lot::Mutex;
use tokio::sync::OnceCell;

use crate::store::{ObjectStore, ReadPin, StoreResult};

/// Which block of which object.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BlockKey {
    pub key: Arc<str>,
    pub pin: ReadPin,
    pub index: u64,
}

#[derive(Debug)]
struct Mem {
    lru: LruCache<BlockKey, Bytes>,
    bytes: u64,
}

/// Hit and miss counts, for `status` and benchmarks.
#[derive(Debug, Default)]
pub struct CacheStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
}

#[derive(Debug)]
pub struct BlockCache {
    block_size: u64,
    mem_limit_bytes: u64,
    mem: Mutex<Mem>,
    inflight: Mutex<HashMap<BlockKey, Arc<OnceCell<Bytes>>>>,
    pub stats: CacheStats,
}

impl BlockCache {
    pub fn new(block_size: u64, mem_limit_bytes: u64) -> Self {
        BlockCache {
            block_size,
            mem_limit_bytes,
            mem: Mutex::new(Mem {
                lru: LruCache::unbounded(),
                bytes: 0,
            }),
            inflight: Mutex::new(HashMap::new()),
            stats: CacheStats::default(),
        }
    }

    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    /// Whether a block is cached (no I/O).
    pub fn contains(&self, bk: &BlockKey) -> bool {
        self.mem.lock().lru.contains(bk)
    }

    /// One block of an object of `object_size` bytes, from the cache or
    /// with one ranged GET.
    pub async fn get(
        &self,
        store: &dyn ObjectStore,
        bk: &BlockKey,
        object_size: u64,
    ) -> StoreResult<Bytes> {
        if let Some(b) = self.mem.lock().lru.get(bk).cloned() {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(b);
        }
        let cell = self
            .inflight
            .lock()
            .entry(bk.clone())
            .or_insert_with(|| Arc::new(OnceCell::new()))
            .clone();
        let result = cell
            .get_or_try_init(|| async {
                self.stats.misses.fetch_add(1, Ordering::Relaxed);
                let start = bk.index * self.block_size;
                let end = (start + self.block_size).min(object_size);
                let data = store.get_range(&bk.key, start..end, &bk.pin).await?;
                if (data.len() as u64) < end.saturating_sub(start) {
                    // The object is shorter than its listing said: it changed.
                    return Err(crate::store::StoreError::PreconditionFailed);
                }
                self.insert(bk.clone(), data.clone());
                Ok(data)
            })
            .await
            .cloned();
        self.inflight.lock().remove(bk);
        result
    }

    fn insert(&self, bk: BlockKey, data: Bytes) {
        let mut mem = self.mem.lock();
        mem.bytes += data.len() as u64;
        if let Some(old) = mem.lru.put(bk, data) {
            mem.bytes -= old.len() as u64;
        }
        while mem.bytes > self.mem_limit_bytes {
            match mem.lru.pop_lru() {
                Some((_, b)) => mem.bytes -= b.len() as u64,
                None => break,
            }
        }
    }

    /// Bytes held in memory.
    pub fn mem_bytes(&self) -> u64 {
        self.mem.lock().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemStore;
    use crate::store::{Metadata, Op};

    fn bk(key: &str, etag: &str, index: u64) -> BlockKey {
        BlockKey {
            key: key.into(),
            pin: ReadPin::Etag(etag.into()),
            index,
        }
    }

    #[tokio::test]
    async fn second_read_is_a_hit_and_changed_object_is_not_served() {
        let s = MemStore::versioned();
        let p = s.insert("k", &[1u8; 10], Metadata::new());
        let c = BlockCache::new(4, 1 << 20);
        assert_eq!(
            c.get(&s, &bk("k", &p.etag, 2), 10).await.unwrap().as_ref(),
            &[1, 1]
        );
        assert_eq!(c.get(&s, &bk("k", &p.etag, 2), 10).await.unwrap().len(), 2);
        assert_eq!(s.counters().get(Op::Get), 1);
        let p2 = s.insert("k", &[2u8; 10], Metadata::new());
        assert!(c.get(&s, &bk("k", &p.etag, 0), 10).await.is_err());
        assert_eq!(
            c.get(&s, &bk("k", &p2.etag, 2), 10).await.unwrap().as_ref(),
            &[2, 2]
        );
    }

    #[tokio::test]
    async fn memory_stays_under_its_limit() {
        let s = MemStore::versioned();
        let p = s.insert("k", &[0u8; 100], Metadata::new());
        let c = BlockCache::new(10, 35);
        for i in 0..10 {
            c.get(&s, &bk("k", &p.etag, i), 100).await.unwrap();
        }
        assert!(c.mem_bytes() <= 35);
        assert!(c.contains(&bk("k", &p.etag, 9)));
        assert!(!c.contains(&bk("k", &p.etag, 0)));
    }
}
