//! The block cache for reads: fixed-size blocks of objects, keyed by the
//! object's identity (key + ETag + block index), so a block of a changed
//! object can never be served. Two tiers:
//!
//! - memory: LRU, bounded in bytes;
//! - disk (optional, `super::disk`): slots in a few files under
//!   `<cache_dir>/blocks/<bucket hash>/`, LRU, bounded in bytes, kept
//!   across a remount. Disk errors (a full disk...) only make the disk
//!   tier stop; reads go on from S3. Writes in flight are bounded
//!   (`DISK_BACKLOG`): a disk slower than the network skips caching some
//!   blocks rather than holding them all in memory.
//!
//! Concurrent misses of one block make one GET.
//!
//! Lock order: `inflight`, `mem` and the disk state are never held
//! together, nor across an `.await`; `waiting` is taken alone or inside
//! `inflight`.

use std::collections::HashMap;
use std::hash::Hash;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use lru::LruCache;
use parking_lot::Mutex;
use tokio::sync::OnceCell;
use tracing::{debug, info, warn};

use super::disk::Disk;
use crate::store::{ObjectStore, ReadPin, StoreError, StoreResult};

/// Which block of which object.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BlockKey {
    pub key: Arc<str>,
    pub etag: Arc<str>,
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
    pub disk_hits: AtomicU64,
    pub misses: AtomicU64,
}

#[derive(Debug)]
pub struct BlockCache {
    block_size: u64,
    mem_limit_bytes: u64,
    mem: Mutex<Mem>,
    /// The disk tier, once open (a tier another mount still holds is
    /// attached when it lets go).
    disk: Arc<std::sync::OnceLock<Arc<Disk>>>,
    inflight: Mutex<HashMap<BlockKey, Arc<OnceCell<Bytes>>>>,
    /// Blocks of read-ahead runs waiting for their share of the budget:
    /// a read of one of them wakes its run, which then goes at once.
    waiting: Mutex<HashMap<BlockKey, Arc<tokio::sync::Notify>>>,
    /// Chunks of `CHUNK` bytes read at random (index = chunk number),
    /// memory only, within a quarter of the memory budget.
    chunks: Mutex<Mem>,
    /// Blocks of read-ahead GETs in flight, across every reader: a run
    /// takes one per block before its GET and gives each back as that
    /// block arrives. Read-ahead of many files at once shares it instead
    /// of each asking for its own window.
    readahead: tokio::sync::Semaphore,
    /// The budget's size in blocks: the most one run may wait for.
    readahead_blocks: usize,
    pub stats: CacheStats,
}

/// How long a disk tier another mount holds is waited for.
const DISK_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// How random reads are kept: in chunks of 16 KiB, so a read across a
/// chunk's edge (the kernel asks for 16 KiB at any page) needs no second
/// large one.
pub const CHUNK: u64 = 16 * 1024;

/// What one random read fetches (at least, where it asks for less): a read
/// of 4 KiB costs 64 KiB, not a block plus read-ahead, and not 128 KiB
/// where it straddles two chunks.
pub const RANDOM_FETCH: u64 = 64 * 1024;

/// The bytes a random read of chunks `c0..=c1` fetches: those chunks,
/// grown to `RANDOM_FETCH` forward (back where the object ends first).
fn random_fetch(c0: u64, c1: u64, object_size: u64) -> (u64, u64) {
    let from = c0 * CHUNK;
    let to = ((c1 + 1) * CHUNK).max(from + RANDOM_FETCH).min(object_size);
    let from = from.min(to.saturating_sub(RANDOM_FETCH).div_ceil(CHUNK) * CHUNK);
    (from, to)
}

impl BlockCache {
    /// A memory-only cache; read-ahead in flight within half of it.
    pub fn new(block_size: u64, mem_limit_bytes: u64) -> Self {
        BlockCache {
            block_size,
            mem_limit_bytes,
            mem: Mutex::new(Mem {
                lru: LruCache::unbounded(),
                bytes: 0,
            }),
            disk: Arc::default(),
            inflight: Mutex::new(HashMap::new()),
            waiting: Mutex::new(HashMap::new()),
            chunks: Mutex::new(Mem {
                lru: LruCache::unbounded(),
                bytes: 0,
            }),
            readahead: tokio::sync::Semaphore::new(0),
            readahead_blocks: 0,
            stats: CacheStats::default(),
        }
        .with_readahead_budget(mem_limit_bytes / 2)
    }

    /// Read-ahead in flight across every reader, at most `bytes` (at
    /// least one block; half the memory tier unless set).
    pub fn with_readahead_budget(mut self, bytes: u64) -> Self {
        let blocks = (bytes / self.block_size.max(1)).max(1) as usize;
        self.readahead = tokio::sync::Semaphore::new(blocks);
        self.readahead_blocks = blocks;
        self
    }

    /// With a disk tier of `limit_bytes` in `dir` (0 = none). A disk that
    /// cannot be used is logged and left out. One another mount holds
    /// (its daemon still exiting after `umount`, most often) is asked for
    /// again in the background for `DISK_WAIT`, and used once free.
    pub fn with_disk(self, dir: &Path, limit_bytes: u64) -> Self {
        if limit_bytes == 0 {
            return self;
        }
        let shown = dir.display().to_string();
        let (dir, block_size) = (dir.to_path_buf(), self.block_size);
        let open = move |slot: &std::sync::OnceLock<Arc<Disk>>| -> std::io::Result<()> {
            let d = Disk::open(dir.clone(), limit_bytes, block_size)?;
            debug!(dir = %dir.display(), blocks = d.blocks(), "disk cache opened");
            let _ = slot.set(Arc::new(d));
            Ok(())
        };
        let busy = |e: &std::io::Error| e.kind() == std::io::ErrorKind::WouldBlock;
        match open(&self.disk) {
            Ok(()) => {}
            Err(e) if busy(&e) => {
                info!(dir = %shown, error = %e, "disk cache used once it is free");
                let slot = Arc::downgrade(&self.disk);
                std::thread::spawn(move || {
                    let (start, mut last) = (std::time::Instant::now(), e);
                    while start.elapsed() < DISK_WAIT {
                        std::thread::sleep(std::time::Duration::from_millis(100));
                        // The cache is gone: nothing to attach to.
                        let Some(slot) = slot.upgrade() else { return };
                        match open(&slot) {
                            Ok(()) => return,
                            Err(e) => {
                                let again = busy(&e);
                                last = e;
                                if !again {
                                    break;
                                }
                            }
                        }
                    }
                    warn!(dir = %shown, error = %last, "no disk cache");
                });
            }
            Err(e) => warn!(dir = %shown, error = %e, "no disk cache"),
        }
        self
    }

    /// The disk tier, if open.
    pub(super) fn disk(&self) -> Option<&Arc<Disk>> {
        self.disk.get()
    }

    /// Gives up to `bytes` of the disk tier back (least recently used
    /// first): staged data needs the room more than cached blocks do.
    pub fn free_disk(&self, bytes: u64) {
        if let Some(d) = self.disk() {
            d.evict_to(d.bytes().saturating_sub(bytes));
        }
    }

    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    /// Whether a block is in memory (no I/O).
    pub fn contains(&self, bk: &BlockKey) -> bool {
        self.mem.lock().lru.contains(bk)
    }

    /// A block if it is in memory (a hit), else nothing (no I/O).
    pub fn get_cached(&self, bk: &BlockKey) -> Option<Bytes> {
        let b = self.mem.lock().lru.get(bk).cloned()?;
        self.stats.hits.fetch_add(1, Ordering::Relaxed);
        Some(b)
    }

    /// One block of an object of `object_size` bytes: from memory, from
    /// disk, or with one ranged GET pinned by `pin`.
    pub async fn get(
        &self,
        store: &dyn ObjectStore,
        bk: &BlockKey,
        pin: &ReadPin,
        object_size: u64,
    ) -> StoreResult<Bytes> {
        if let Some(b) = self.get_cached(bk) {
            return Ok(b);
        }
        let cell = self
            .inflight
            .lock()
            .entry(bk.clone())
            .or_insert_with(|| Arc::new(OnceCell::new()))
            .clone();
        // The block's run waits for budget: a read needs it now.
        if let Some(demand) = self.waiting.lock().get(bk) {
            demand.notify_one();
        }
        let result = cell
            .get_or_try_init(|| async {
                let start = bk.index * self.block_size;
                let end = (start + self.block_size).min(object_size);
                if let Some(disk) = self.disk()
                    && let Some(data) = disk
                        .read(bk)
                        .await
                        .filter(|d| d.len() as u64 == end - start)
                {
                    self.stats.disk_hits.fetch_add(1, Ordering::Relaxed);
                    self.insert(bk.clone(), data.clone());
                    return Ok(data);
                }
                self.stats.misses.fetch_add(1, Ordering::Relaxed);
                let data = store.get_range(&bk.key, start..end, pin).await?;
                if (data.len() as u64) < end.saturating_sub(start) {
                    // The object is shorter than its listing said: it changed.
                    return Err(StoreError::PreconditionFailed);
                }
                self.insert(bk.clone(), data.clone());
                if let Some(disk) = self.disk() {
                    disk.write(bk, data.clone());
                }
                Ok(data)
            })
            .await
            .cloned();
        self.inflight.lock().remove(bk);
        result
    }

    /// Read-ahead: blocks `first.index .. first.index + count` (clamped
    /// to the object) with one ranged GET instead of one per block. Blocks
    /// in memory, on disk or being fetched already are left out (the GET
    /// spans the first to the last block left). A read of one of these
    /// blocks meanwhile waits for this GET. On a failure nothing is
    /// cached; a read asks again.
    pub async fn fetch_run(
        &self,
        store: &dyn ObjectStore,
        first: &BlockKey,
        count: u64,
        pin: &ReadPin,
        object_size: u64,
    ) {
        let bs = self.block_size;
        if object_size == 0 {
            return;
        }
        let end_index = (first.index + count).min((object_size - 1) / bs + 1);
        let wanted: Vec<BlockKey> = {
            let mem = self.mem.lock();
            (first.index..end_index)
                .map(|index| BlockKey {
                    index,
                    ..first.clone()
                })
                .filter(|bk| !mem.lru.contains(bk))
                .collect()
        };
        let wanted: Vec<BlockKey> = match self.disk() {
            Some(d) => wanted.into_iter().filter(|bk| !d.holds(bk)).collect(),
            None => wanted,
        };
        // At most the whole budget, nearest blocks first.
        let mut wanted = wanted;
        wanted.truncate(self.readahead_blocks);
        // Claimed first: a read of one of these blocks waits for this run
        // (one large GET) rather than asking for its block alone, and wakes
        // it if it waits for budget (`waiting`, registered with the claim,
        // so no read comes between the two).
        let demand = Arc::new(tokio::sync::Notify::new());
        let claimed: Vec<(BlockKey, Arc<OnceCell<Bytes>>)> = {
            let mut inflight = self.inflight.lock();
            let mut waiting = self.waiting.lock();
            let mut claimed = Vec::new();
            for bk in wanted {
                if let std::collections::hash_map::Entry::Vacant(v) = inflight.entry(bk.clone()) {
                    let cell = Arc::new(OnceCell::new());
                    v.insert(cell.clone());
                    waiting.insert(bk.clone(), demand.clone());
                    claimed.push((bk, cell));
                }
            }
            claimed
        };
        let (Some((lo, _)), Some((hi, _))) = (claimed.first(), claimed.last()) else {
            return;
        };
        let mut permits = claimed.len();
        let start = lo.index * bs;
        let end = ((hi.index + 1) * bs).min(object_size);
        self.stats
            .misses
            .fetch_add(claimed.len() as u64, Ordering::Relaxed);
        // Each block is filled as soon as its bytes have arrived: a reader
        // waits for its block, not for the whole run.
        let mut senders = HashMap::new();
        let fills: Vec<_> = claimed
            .iter()
            .map(|(bk, cell)| {
                let (tx, rx) = tokio::sync::oneshot::channel::<StoreResult<Bytes>>();
                senders.insert(bk.index, tx);
                cell.get_or_try_init(move || async move {
                    let block = rx.await.unwrap_or(Err(StoreError::PreconditionFailed))?;
                    let want = ((bk.index + 1) * bs).min(object_size) - bk.index * bs;
                    if (block.len() as u64) < want {
                        // The object is shorter than its listing said: it changed.
                        return Err(StoreError::PreconditionFailed);
                    }
                    self.insert(bk.clone(), block.clone());
                    if let Some(disk) = self.disk() {
                        disk.write(bk, block.clone());
                    }
                    Ok(block)
                })
            })
            .collect();
        let budget = &self.readahead;
        let waiting = &self.waiting;
        let blocks: Vec<BlockKey> = claimed.iter().map(|(bk, _)| bk.clone()).collect();
        let get = async move {
            // The run waits for its share of the budget, held by other
            // runs' GETs, which give it back block by block: while many
            // files are read at once, each GET still fetches a whole run
            // (it was cut to what was left, and 4 readers made GETs of a
            // block or two). Its blocks' readers wait for it meanwhile,
            // but not behind every other run: a read of one of its blocks
            // sends it at once, with what is left of the budget (a read
            // caught up with its read-ahead, which is no longer ahead; the
            // budget is exceeded by at most one run per such reader).
            permits = tokio::select! {
                biased;
                p = budget.acquire_many(permits as u32) => p.map_or(0, |p| {
                    p.forget();
                    permits
                }),
                () = demand.notified() => {
                    let mut got = 0;
                    while got < permits
                        && budget.try_acquire().is_ok_and(|p| {
                            p.forget();
                            true
                        })
                    {
                        got += 1;
                    }
                    got
                }
            };
            {
                let mut w = waiting.lock();
                for bk in &blocks {
                    if w.get(bk).is_some_and(|d| Arc::ptr_eq(d, &demand)) {
                        w.remove(bk);
                    }
                }
            }
            let mut next = lo.index;
            let r = store
                .get_range_pieces(&first.key, start..end, pin, bs, &mut |piece| {
                    if let Some(tx) = senders.remove(&next) {
                        if permits > 0 {
                            budget.add_permits(1);
                            permits -= 1;
                        }
                        let _ = tx.send(Ok(piece));
                    }
                    next += 1;
                })
                .await;
            budget.add_permits(permits);
            // Blocks the GET did not bring: it failed, or the object is
            // shorter than its listing said (it changed).
            let e = r.err().unwrap_or(StoreError::PreconditionFailed);
            for (_, tx) in senders.drain() {
                let _ = tx.send(Err(e.clone()));
            }
        };
        let ((), results) = futures::join!(get, futures::future::join_all(fills));
        if let Some(Err(e)) = results.iter().find(|r| r.is_err()) {
            debug!(key = %first.key, error = %e, "read-ahead failed");
        }
        let mut inflight = self.inflight.lock();
        for (bk, cell) in &claimed {
            if inflight.get(bk).is_some_and(|c| Arc::ptr_eq(c, cell)) {
                inflight.remove(bk);
            }
        }
    }

    /// Bytes `range` of an object read at random: from a whole block in
    /// memory when there is one, else from `CHUNK`-sized chunks, the
    /// missing ones fetched with one GET of the range rounded out to
    /// `CHUNK`, and to `RANDOM_FETCH` (forward, or back at the object's
    /// end) where that is less.
    pub async fn get_small(
        &self,
        store: &dyn ObjectStore,
        object: &BlockKey,
        range: std::ops::Range<u64>,
        pin: &ReadPin,
        object_size: u64,
    ) -> StoreResult<Bytes> {
        let end = range.end.min(object_size);
        if range.start >= end {
            return Ok(Bytes::new());
        }
        let bs = self.block_size;
        if range.start / bs == (end - 1) / bs {
            let whole = BlockKey {
                index: range.start / bs,
                ..object.clone()
            };
            if let Some(b) = self.mem.lock().lru.get(&whole).cloned() {
                self.stats.hits.fetch_add(1, Ordering::Relaxed);
                let at = whole.index * bs;
                return Ok(b.slice((range.start - at) as usize..(end - at) as usize));
            }
        }
        let (c0, c1) = (range.start / CHUNK, (end - 1) / CHUNK);
        let key = |index| BlockKey {
            index,
            ..object.clone()
        };
        let mut have: Vec<Option<Bytes>> = {
            let mut chunks = self.chunks.lock();
            (c0..=c1)
                .map(|i| chunks.lru.get(&key(i)).cloned())
                .collect()
        };
        if have.iter().any(Option::is_none) {
            self.stats.misses.fetch_add(1, Ordering::Relaxed);
            let (from, to) = random_fetch(c0, c1, object_size);
            let data = store.get_range(&object.key, from..to, pin).await?;
            if (data.len() as u64) < to - from {
                return Err(StoreError::PreconditionFailed);
            }
            let mut chunks = self.chunks.lock();
            for (n, a) in (0..to - from).step_by(CHUNK as usize).enumerate() {
                let index = from / CHUNK + n as u64;
                let chunk = data.slice(a as usize..(a + CHUNK).min(to - from) as usize);
                chunks.bytes += chunk.len() as u64;
                if let Some(old) = chunks.lru.put(key(index), chunk.clone()) {
                    chunks.bytes -= old.len() as u64;
                }
                if let Some(slot) = index.checked_sub(c0).and_then(|i| have.get_mut(i as usize)) {
                    *slot = Some(chunk);
                }
            }
            while chunks.bytes > (self.mem_limit_bytes / 4).max(CHUNK) {
                match chunks.lru.pop_lru() {
                    Some((_, b)) => chunks.bytes -= b.len() as u64,
                    None => break,
                }
            }
        } else {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
        }
        let mut out = bytes::BytesMut::with_capacity((end - range.start) as usize);
        for (n, c) in have.into_iter().enumerate() {
            let c = c.expect("filled");
            let at = (c0 + n as u64) * CHUNK;
            let a = range.start.saturating_sub(at) as usize;
            let b = ((end - at) as usize).min(c.len());
            out.extend_from_slice(&c[a.min(b)..b]);
        }
        Ok(out.freeze())
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

    /// Waits (at most `limit`) for blocks being written to disk, then
    /// closes the disk tier cleanly, before the process exits so the next
    /// mount finds them.
    pub async fn settle(&self, limit: std::time::Duration) {
        let Some(disk) = self.disk() else { return };
        let start = std::time::Instant::now();
        while disk.pending.load(Ordering::SeqCst) > 0 && start.elapsed() < limit {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        if disk.pending.load(Ordering::SeqCst) == 0 {
            let disk = disk.clone();
            let _ = tokio::task::spawn_blocking(move || disk.close()).await;
        }
    }

    /// Bytes held on disk.
    pub fn disk_bytes(&self) -> u64 {
        self.disk().map_or(0, |d| d.bytes())
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::store::memory::MemStore;
    use crate::store::{Metadata, Op};

    #[test]
    fn a_random_read_fetches_64_kib_within_the_object() {
        const K: u64 = 1024;
        // A chunk: 64 KiB from it.
        assert_eq!(random_fetch(3, 3, 1 << 30), (48 * K, 112 * K));
        // Across a chunk's edge: still 64 KiB.
        assert_eq!(random_fetch(3, 4, 1 << 30), (48 * K, 112 * K));
        // Asked for more: what is asked, rounded out to chunks.
        assert_eq!(random_fetch(0, 7, 1 << 30), (0, 128 * K));
        // At the end: grown back, never before 0 nor past the end.
        assert_eq!(random_fetch(9, 9, 150 * K), (96 * K, 150 * K));
        assert_eq!(random_fetch(0, 0, 10 * K), (0, 10 * K));
        let end = 1000 * K + 5;
        let (from, to) = random_fetch(end / CHUNK, end / CHUNK, end);
        assert_eq!(to, end);
        assert!(
            to - from <= RANDOM_FETCH && from % CHUNK == 0,
            "{from}..{to}"
        );
    }

    pub(in crate::cache) fn bk(key: &str, etag: &str, index: u64) -> BlockKey {
        BlockKey {
            key: key.into(),
            etag: etag.into(),
            index,
        }
    }

    pub(in crate::cache) fn pin(etag: &str) -> ReadPin {
        ReadPin::Etag(etag.into())
    }

    type Faulty = crate::store::faulty::Faulty<MemStore>;

    /// Objects `a` and `b` of 200 bytes (ETag, first block, pin), read in
    /// 10-byte blocks through a store whose first GET is held, by a cache
    /// whose read-ahead budget is 3 blocks.
    fn two_files_one_budget() -> (Faulty, BlockCache, [(String, BlockKey, ReadPin); 2]) {
        let m = Arc::new(MemStore::versioned());
        let files = [("a", 1u8), ("b", 2u8)].map(|(k, byte)| {
            let e = m.insert(k, &[byte; 200], Metadata::new()).etag;
            (e.clone(), bk(k, &e, 0), pin(&e))
        });
        let f = crate::store::faulty::Faulty::new(m);
        f.hold(Op::Get, 1);
        (
            f,
            BlockCache::new(10, 1000).with_readahead_budget(30),
            files,
        )
    }

    /// Two files read ahead at once share one budget: while the first
    /// file's run holds all of it, the second's run waits for it (it was
    /// cut to what was left: GETs of a block or two). A read of one of its
    /// blocks does not wait behind the first run: it sends the waiting run
    /// at once, still one GET for the whole run and none of its own, and
    /// the budget is whole again afterwards.
    #[tokio::test]
    async fn read_ahead_of_many_files_shares_one_budget() {
        let (f, c, [(a, first_a, pin_a), (b, first_b, pin_b)]) = two_files_one_budget();
        let run_a = c.fetch_run(&f, &first_a, 8, &pin_a, 200);
        let run_b = c.fetch_run(&f, &first_b, 8, &pin_b, 200);
        let read_b = async {
            f.wait_held(Op::Get).await.unwrap();
            // a's GET holds the budget: b's run waits.
            assert_eq!(f.calls(Op::Get), 1, "b's run waits");
            // A read of b's first block, a's GET still held (bounded: a
            // read waiting for a's GET would wait forever here).
            let read = c.get(&f, &first_b, &pin_b, 200);
            let got = tokio::time::timeout(std::time::Duration::from_secs(60), read)
                .await
                .expect("the read waited behind the other file's run");
            assert_eq!(f.calls(Op::Get), 2, "b's run went, for the read");
            f.release(Op::Get);
            got
        };
        let ((), (), got) = tokio::join!(run_a, run_b, read_b);
        assert_eq!(got.unwrap().as_ref(), &[2u8; 10]);
        let cached = |k: &str, e: &str| (0..20).filter(|&i| c.contains(&bk(k, e, i))).count();
        assert_eq!(
            cached("a", &a),
            3,
            "a: the nearest blocks, the whole budget"
        );
        assert!((0..3).all(|i| c.contains(&bk("a", &a, i))));
        assert_eq!(cached("b", &b), 3, "b: its whole run");
        assert_eq!(f.calls(Op::Get), 2, "one GET per run, none for the read");
        assert_eq!(c.readahead.available_permits(), 3, "the budget, whole");
        assert!(c.waiting.lock().is_empty());
    }

    /// Without a read of its blocks, a run waits for its share of the
    /// budget, then fetches its whole run in one GET.
    #[tokio::test]
    async fn a_run_without_readers_waits_for_the_budget() {
        let (f, c, [(_, first_a, pin_a), (b, first_b, pin_b)]) = two_files_one_budget();
        let run_a = c.fetch_run(&f, &first_a, 8, &pin_a, 200);
        let run_b = c.fetch_run(&f, &first_b, 8, &pin_b, 200);
        let release = async {
            f.wait_held(Op::Get).await.unwrap();
            // Other tasks run meanwhile; b's run still waits.
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
            assert_eq!(f.calls(Op::Get), 1, "b's run waits for the budget");
            f.release(Op::Get);
        };
        tokio::join!(run_a, run_b, release);
        assert_eq!(f.calls(Op::Get), 2);
        assert!((0..3).all(|i| c.contains(&bk("b", &b, i))));
        assert_eq!(c.readahead.available_permits(), 3);
    }

    #[tokio::test]
    async fn second_read_is_a_hit_and_changed_object_is_not_served() {
        let s = MemStore::versioned();
        let p = s.insert("k", &[1u8; 10], Metadata::new());
        let c = BlockCache::new(4, 1 << 20);
        let e = p.etag.as_str();
        assert_eq!(
            c.get(&s, &bk("k", e, 2), &pin(e), 10)
                .await
                .unwrap()
                .as_ref(),
            &[1, 1]
        );
        assert_eq!(
            c.get(&s, &bk("k", e, 2), &pin(e), 10).await.unwrap().len(),
            2
        );
        assert_eq!(s.counters().get(Op::Get), 1);
        let p2 = s.insert("k", &[2u8; 10], Metadata::new());
        assert!(c.get(&s, &bk("k", e, 0), &pin(e), 10).await.is_err());
        let e2 = p2.etag.as_str();
        assert_eq!(
            c.get(&s, &bk("k", e2, 2), &pin(e2), 10)
                .await
                .unwrap()
                .as_ref(),
            &[2, 2]
        );
    }

    /// A run of blocks is one GET; each block is then a hit with its own
    /// bytes, the last one short; blocks cached already are not asked for
    /// again; a run over a changed object caches nothing.
    #[tokio::test]
    async fn a_read_ahead_run_is_one_get_and_fills_each_block() {
        let s = MemStore::versioned();
        let data: Vec<u8> = (0..22u8).collect();
        let p = s.insert("k", &data, Metadata::new());
        let c = BlockCache::new(4, 1 << 20);
        let e = p.etag.as_str();
        c.get(&s, &bk("k", e, 1), &pin(e), 22).await.unwrap();
        c.fetch_run(&s, &bk("k", e, 0), 100, &pin(e), 22).await;
        assert_eq!(
            s.counters().get(Op::Get),
            2,
            "one GET for the block, one for the run"
        );
        for i in 0..6u64 {
            let got = c.get(&s, &bk("k", e, i), &pin(e), 22).await.unwrap();
            let (a, b) = ((i * 4) as usize, ((i * 4 + 4) as usize).min(22));
            assert_eq!(got.as_ref(), &data[a..b], "block {i}");
        }
        assert_eq!(s.counters().get(Op::Get), 2, "every block was a hit");
        let p2 = s.insert("j", &[7u8; 8], Metadata::new());
        s.insert("j", &[8u8; 8], Metadata::new());
        let old = p2.etag.as_str();
        c.fetch_run(&s, &bk("j", old, 0), 2, &pin(old), 8).await;
        assert!(
            !c.contains(&bk("j", old, 0)),
            "a changed object is not cached"
        );
    }

    #[tokio::test]
    async fn memory_stays_under_its_limit() {
        let s = MemStore::versioned();
        let p = s.insert("k", &[0u8; 100], Metadata::new());
        let c = BlockCache::new(10, 35);
        let e = p.etag.as_str();
        for i in 0..10 {
            c.get(&s, &bk("k", e, i), &pin(e), 100).await.unwrap();
        }
        assert!(c.mem_bytes() <= 35);
        assert!(c.contains(&bk("k", e, 9)));
        assert!(!c.contains(&bk("k", e, 0)));
    }
}
