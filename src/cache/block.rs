//! The block cache for reads: fixed-size blocks of objects, keyed by the
//! object's identity (key + ETag + block index), so a block of a changed
//! object can never be served. Two tiers:
//!
//! - memory: LRU, bounded in bytes;
//! - disk (optional): one file per block under `<cache_dir>/blocks/<bucket
//!   hash>/`, LRU, bounded in bytes, rebuilt from the directory at start so
//!   it survives a remount. Each file starts with the identity it holds,
//!   checked on every read. Disk errors (a full disk...) only make the disk
//!   tier stop; reads go on from S3. Files are written with `O_DIRECT`
//!   where the filesystem allows it (the identity and the data each
//!   padded to the alignment it takes, 512 bytes or a page): a buffered
//!   write cost about a quarter of the daemon's CPU in a cold sequential
//!   read, in the page cache's bookkeeping, and filled the page cache with
//!   bytes that are read again, if ever, long after. Writes in flight are bounded
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
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use bytes::Bytes;
use lru::LruCache;
use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;
use tracing::{debug, warn};

use crate::store::{ObjectStore, ReadPin, StoreError, StoreResult};

/// Which block of which object.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BlockKey {
    pub key: Arc<str>,
    pub etag: Arc<str>,
    pub index: u64,
}

/// The alignments a disk block file's layout is tried with, smallest
/// (least padding) first: the identity and the data each start on a
/// multiple of it, as `O_DIRECT` needs (a device's logical block size).
const DISK_ALIGNS: [usize; 2] = [512, 4096];

/// What a block file's buffer in memory is aligned to (enough for any
/// `O_DIRECT`): that of the store's pieces, so theirs are written as
/// they lie.
const MEM_ALIGN: usize = crate::store::PIECE_ALIGN;

/// Bytes of blocks handed to the disk tier and not written yet, at most.
const DISK_BACKLOG: u64 = 64 * 1024 * 1024;

/// Starts every disk block file of this layout (older layouts never match).
const DISK_MAGIC: &[u8; 16] = b"bucketfs-block-2";

fn align_up(n: usize, align: usize) -> usize {
    n.div_ceil(align) * align
}

impl BlockKey {
    /// The identity a disk block file starts with.
    fn header(&self) -> Vec<u8> {
        let mut h = Vec::with_capacity(self.key.len() + self.etag.len() + 40);
        h.extend_from_slice(DISK_MAGIC);
        h.extend_from_slice(&(self.key.len() as u32).to_le_bytes());
        h.extend_from_slice(self.key.as_bytes());
        h.extend_from_slice(&(self.etag.len() as u32).to_le_bytes());
        h.extend_from_slice(self.etag.as_bytes());
        h.extend_from_slice(&self.index.to_le_bytes());
        h
    }

    fn file_name(&self) -> String {
        let digest = Sha256::digest(self.header());
        crate::hex(&digest[..16])
    }
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
struct DiskState {
    /// File name → size, least recently used first.
    lru: LruCache<String, u64>,
    bytes: u64,
}

/// The on-disk tier.
#[derive(Debug)]
struct Disk {
    dir: PathBuf,
    limit_bytes: u64,
    state: Mutex<DiskState>,
    /// Set on the first write error: the tier stops, reads go on.
    broken: AtomicBool,
    /// Block files being written now.
    pending: AtomicU64,
    /// Their bytes.
    pending_bytes: AtomicU64,
    /// The index in `DISK_ALIGNS` block files are written with; past its
    /// end once the filesystem refused `O_DIRECT` with each: buffered
    /// writes from then on.
    align: AtomicUsize,
}

impl Disk {
    /// Opens (or creates) the tier, indexing the blocks a previous mount left.
    fn open(dir: PathBuf, limit_bytes: u64) -> std::io::Result<Disk> {
        crate::private::create_private_dir(&dir)?;
        let mut found = Vec::new();
        for e in std::fs::read_dir(&dir)? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            // Left by versions that wrote a block aside, then renamed it.
            if name.ends_with(".tmp") {
                let _ = std::fs::remove_file(e.path());
                continue;
            }
            let md = e.metadata()?;
            if md.permissions().mode() & 0o077 != 0 {
                // Left readable by an older version: private now.
                std::fs::set_permissions(e.path(), std::fs::Permissions::from_mode(0o600))?;
            }
            found.push((md.modified().ok(), name, md.len()));
        }
        found.sort();
        let mut state = DiskState {
            lru: LruCache::unbounded(),
            bytes: 0,
        };
        for (_, name, len) in found {
            state.bytes += len;
            state.lru.put(name, len);
        }
        let disk = Disk {
            dir,
            limit_bytes,
            state: Mutex::new(state),
            broken: AtomicBool::new(false),
            pending: AtomicU64::new(0),
            pending_bytes: AtomicU64::new(0),
            align: AtomicUsize::new(0),
        };
        disk.evict();
        Ok(disk)
    }

    fn evict(&self) {
        self.evict_to(self.limit_bytes);
    }

    /// Drops least recently used blocks until at most `keep` bytes remain.
    fn evict_to(&self, keep: u64) {
        let mut victims = Vec::new();
        {
            let mut st = self.state.lock();
            while st.bytes > keep {
                match st.lru.pop_lru() {
                    Some((name, len)) => {
                        st.bytes -= len;
                        victims.push(name);
                    }
                    None => break,
                }
            }
        }
        for v in victims {
            let _ = std::fs::remove_file(self.dir.join(v));
        }
    }

    async fn read(&self, bk: &BlockKey) -> Option<Bytes> {
        let name = bk.file_name();
        if !self.state.lock().lru.contains(&name) {
            return None;
        }
        let file = tokio::fs::read(self.dir.join(&name)).await.ok()?;
        let header = bk.header();
        let at = header.len();
        if file.len() < at + 24 || file[..at] != header[..] {
            return None;
        }
        let field = |i: usize| -> Option<usize> {
            let b = file.get(at + 8 * i..at + 8 * (i + 1))?;
            usize::try_from(u64::from_le_bytes(b.try_into().ok()?)).ok()
        };
        let (len, start, end) = (field(0)?, field(1)?, field(2)?);
        // Whole, or not at all: a file cut short (a kill, a full disk) is
        // never served.
        // Where `layout` puts the data, at one of the alignments.
        let placed = DISK_ALIGNS.iter().any(|&a| start == align_up(at + 24, a));
        if !placed || start.checked_add(len)? > end || file.len() != end {
            return None;
        }
        self.state.lock().lru.get(&name);
        Some(Bytes::from(file).slice(start..start + len))
    }

    /// A block file's bytes: the identity, the data's length, where it
    /// starts and the file's length, then the data, each part padded to `align`, in a buffer
    /// aligned to `MEM_ALIGN` (the range of the vector to write).
    /// `with_data`: the data is copied in; else the buffer ends where the
    /// data starts.
    fn layout(
        bk: &BlockKey,
        data: &[u8],
        align: usize,
        with_data: bool,
    ) -> (Vec<u8>, std::ops::Range<usize>) {
        let header = bk.header();
        let start = align_up(header.len() + 24, align);
        let total = align_up(start + data.len(), align);
        let len = if with_data { total } else { start };
        let mut v = vec![0u8; len + MEM_ALIGN];
        let at = v.as_ptr().align_offset(MEM_ALIGN);
        let buf = &mut v[at..at + len];
        let h = header.len();
        buf[..h].copy_from_slice(&header);
        buf[h..h + 8].copy_from_slice(&(data.len() as u64).to_le_bytes());
        buf[h + 8..h + 16].copy_from_slice(&(start as u64).to_le_bytes());
        buf[h + 16..h + 24].copy_from_slice(&(total as u64).to_le_bytes());
        if with_data {
            buf[start..start + data.len()].copy_from_slice(data);
        }
        (v, at..at + len)
    }

    /// Writes the block file's bytes to `f`: its data straight from
    /// memory when it lies as `O_DIRECT` needs (a store's `PieceBuf`),
    /// else copied behind the header. Returns the file's length.
    fn write_layout(
        f: &std::fs::File,
        bk: &BlockKey,
        data: &[u8],
        align: usize,
    ) -> std::io::Result<u64> {
        use std::os::unix::fs::FileExt;
        let in_place =
            data.as_ptr().align_offset(MEM_ALIGN) == 0 && data.len().is_multiple_of(align);
        let (buf, range) = Disk::layout(bk, data, align, !in_place);
        f.write_all_at(&buf[range.clone()], 0)?;
        if !in_place {
            return Ok(range.len() as u64);
        }
        f.write_all_at(data, range.len() as u64)?;
        Ok((range.len() + data.len()) as u64)
    }

    /// Writes a block file, with `O_DIRECT` while the filesystem takes it
    /// (at the smallest alignment it takes). Returns the file's length.
    fn write_file(&self, path: &Path, bk: &BlockKey, data: &[u8]) -> std::io::Result<u64> {
        use std::os::unix::fs::OpenOptionsExt;
        let open = |flags: i32| {
            crate::private::private_file()
                .write(true)
                .create(true)
                .truncate(true)
                .custom_flags(flags)
                .open(path)
        };
        loop {
            let i = self.align.load(Ordering::Relaxed);
            let Some(&align) = DISK_ALIGNS.get(i) else {
                return Disk::write_layout(&open(0)?, bk, data, DISK_ALIGNS[0]);
            };
            match open(libc::O_DIRECT).and_then(|f| Disk::write_layout(&f, bk, data, align)) {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    debug!(dir = %self.dir.display(), align, "O_DIRECT refused at this alignment");
                    let _ =
                        self.align
                            .compare_exchange(i, i + 1, Ordering::Relaxed, Ordering::Relaxed);
                }
                r => return r,
            }
        }
    }

    fn write(self: &Arc<Self>, bk: &BlockKey, data: Bytes) {
        if self.broken.load(Ordering::Relaxed) {
            return;
        }
        let size = data.len() as u64;
        if self.pending_bytes.fetch_add(size, Ordering::SeqCst) + size > DISK_BACKLOG {
            // The disk is behind: this block stays in memory only.
            self.pending_bytes.fetch_sub(size, Ordering::SeqCst);
            return;
        }
        let disk = self.clone();
        let bk = bk.clone();
        self.pending.fetch_add(1, Ordering::SeqCst);
        tokio::task::spawn_blocking(move || {
            // Written in place, no rename: a file cut short (a full disk,
            // a kill) is never served, as a read checks the identity it
            // starts with and the file's length; and it is listed only
            // once written whole.
            let name = bk.file_name();
            let path = disk.dir.join(&name);
            let r = disk.write_file(&path, &bk, &data);
            drop(data);
            match r {
                Ok(len) => {
                    {
                        let mut st = disk.state.lock();
                        if let Some(old) = st.lru.put(name, len) {
                            st.bytes -= old;
                        }
                        st.bytes += len;
                    }
                    disk.evict();
                }
                Err(e) => {
                    let _ = std::fs::remove_file(&path);
                    if !disk.broken.swap(true, Ordering::Relaxed) {
                        warn!(dir = %disk.dir.display(), error = %e, "disk cache stopped; reads go on from S3");
                    }
                }
            }
            disk.pending_bytes.fetch_sub(size, Ordering::SeqCst);
            disk.pending.fetch_sub(1, Ordering::SeqCst);
        });
    }

    fn bytes(&self) -> u64 {
        self.state.lock().bytes
    }
}

#[derive(Debug)]
pub struct BlockCache {
    block_size: u64,
    mem_limit_bytes: u64,
    mem: Mutex<Mem>,
    disk: Option<Arc<Disk>>,
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

/// What a random read fetches at least: a read of 4 KiB costs 64 KiB, not a
/// block plus read-ahead.
pub const CHUNK: u64 = 64 * 1024;

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
            disk: None,
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
    /// cannot be used is logged and left out.
    pub fn with_disk(mut self, dir: &Path, limit_bytes: u64) -> Self {
        if limit_bytes == 0 {
            return self;
        }
        match Disk::open(dir.to_path_buf(), limit_bytes) {
            Ok(d) => {
                debug!(dir = %dir.display(), blocks = d.state.lock().lru.len(), "disk cache opened");
                self.disk = Some(Arc::new(d));
            }
            Err(e) => warn!(dir = %dir.display(), error = %e, "no disk cache"),
        }
        self
    }

    /// Gives up to `bytes` of the disk tier back (least recently used
    /// first): staged data needs the room more than cached blocks do.
    pub fn free_disk(&self, bytes: u64) {
        if let Some(d) = &self.disk {
            let have = d.state.lock().bytes;
            d.evict_to(have.saturating_sub(bytes));
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
                if let Some(disk) = &self.disk
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
                if let Some(disk) = &self.disk {
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
        let wanted: Vec<BlockKey> = match &self.disk {
            Some(d) => {
                let st = d.state.lock();
                wanted
                    .into_iter()
                    .filter(|bk| !st.lru.contains(&bk.file_name()))
                    .collect()
            }
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
                    if let Some(disk) = &self.disk {
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
    /// missing ones fetched with one GET. At most the range rounded out to
    /// `CHUNK` is downloaded.
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
            let (from, to) = (c0 * CHUNK, ((c1 + 1) * CHUNK).min(object_size));
            let data = store.get_range(&object.key, from..to, pin).await?;
            if (data.len() as u64) < to - from {
                return Err(StoreError::PreconditionFailed);
            }
            let mut chunks = self.chunks.lock();
            for (n, slot) in have.iter_mut().enumerate() {
                let a = n as u64 * CHUNK;
                let b = (a + CHUNK).min(to - from);
                let chunk = data.slice(a as usize..b as usize);
                chunks.bytes += chunk.len() as u64;
                if let Some(old) = chunks.lru.put(key(c0 + n as u64), chunk.clone()) {
                    chunks.bytes -= old.len() as u64;
                }
                *slot = Some(chunk);
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

    /// Waits (at most `limit`) for block files being written, e.g. before
    /// the process exits so the next mount finds them.
    pub async fn settle(&self, limit: std::time::Duration) {
        let Some(disk) = &self.disk else { return };
        let start = std::time::Instant::now();
        while disk.pending.load(Ordering::SeqCst) > 0 && start.elapsed() < limit {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    /// Bytes held on disk.
    pub fn disk_bytes(&self) -> u64 {
        self.disk.as_ref().map_or(0, |d| d.bytes())
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
            etag: etag.into(),
            index,
        }
    }

    fn pin(etag: &str) -> ReadPin {
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

    /// A small block's file: its identity and its data, each padded to the
    /// alignment the disk took.
    fn file_len(d: &Disk) -> u64 {
        let i = d.align.load(Ordering::Relaxed);
        2 * *DISK_ALIGNS.get(i).unwrap_or(&DISK_ALIGNS[0]) as u64
    }

    /// Block files written at each alignment, and buffered (a filesystem
    /// refusing `O_DIRECT`), read back whole after a remount; one cut
    /// short by a single byte is never served.
    #[tokio::test]
    async fn block_files_of_every_layout_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let s = MemStore::versioned();
        let data: Vec<u8> = (0..=255u8).cycle().take(3000).collect();
        let e = s.insert("k", &data, Metadata::new()).etag;
        for i in 0..=DISK_ALIGNS.len() {
            let c = BlockCache::new(1000, 1 << 20).with_disk(dir.path(), 1 << 20);
            c.disk.as_ref().unwrap().align.store(i, Ordering::Relaxed);
            c.get(&s, &bk("k", &e, i as u64), &pin(&e), 3000)
                .await
                .unwrap();
            c.settle(std::time::Duration::from_secs(5)).await;
            let f = dir.path().join(bk("k", &e, i as u64).file_name());
            // 1000 bytes after the identity, padded as the disk took them
            // (it may refuse the smaller alignment and take the next).
            let took = c.disk.as_ref().unwrap().align.load(Ordering::Relaxed);
            let align = *DISK_ALIGNS.get(took).unwrap_or(&DISK_ALIGNS[0]) as u64;
            let len = align + (1000u64).div_ceil(align) * align;
            assert_eq!(std::fs::metadata(&f).unwrap().len(), len, "layout {i}");
            let again = BlockCache::new(1000, 1 << 20).with_disk(dir.path(), 1 << 20);
            let gets = s.counters().get(Op::Get);
            let got = again
                .get(&s, &bk("k", &e, i as u64), &pin(&e), 3000)
                .await
                .unwrap();
            assert_eq!(&got[..], &data[i * 1000..(i + 1) * 1000], "layout {i}");
            assert_eq!(s.counters().get(Op::Get), gets, "layout {i}: from disk");
            let whole = std::fs::read(&f).unwrap();
            // The data's start moved (a corrupted header) is not served.
            let at = bk("k", &e, i as u64).header().len() + 8;
            let mut moved = whole.clone();
            let start = u64::from_le_bytes(moved[at..at + 8].try_into().unwrap());
            moved[at..at + 8].copy_from_slice(&(start - 8).to_le_bytes());
            std::fs::write(&f, &moved).unwrap();
            let c = BlockCache::new(1000, 1 << 20).with_disk(dir.path(), 1 << 20);
            let got = c
                .get(&s, &bk("k", &e, i as u64), &pin(&e), 3000)
                .await
                .unwrap();
            assert_eq!(
                &got[..],
                &data[i * 1000..(i + 1) * 1000],
                "layout {i}: moved"
            );
            assert_eq!(s.counters().get(Op::Get), gets + 1, "layout {i}: moved");
            c.settle(std::time::Duration::from_secs(5)).await;
            std::fs::write(&f, &whole[..whole.len() - 1]).unwrap();
            let cut = BlockCache::new(1000, 1 << 20).with_disk(dir.path(), 1 << 20);
            cut.get(&s, &bk("k", &e, i as u64), &pin(&e), 3000)
                .await
                .unwrap();
            assert_eq!(s.counters().get(Op::Get), gets + 2, "layout {i}: cut short");
        }
    }

    /// A block read into a store's aligned `PieceBuf` is written from
    /// where it lies, header first; the file is the same as the one a
    /// copy makes, and reads back, at every alignment.
    #[tokio::test]
    async fn an_aligned_block_is_written_as_a_copied_one_would_be() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..=255u8).cycle().take(8192).collect();
        let mut piece = crate::store::PieceBuf::new(data.len());
        assert_eq!(piece.fill(&data), data.len());
        let aligned = piece.freeze();
        assert_eq!(aligned.as_ptr().align_offset(MEM_ALIGN), 0);
        // The same bytes, one byte off alignment.
        let mut v = vec![0u8; data.len() + 1];
        v[1..].copy_from_slice(&data);
        let unaligned = Bytes::from(v).slice(1..);
        for i in 0..=DISK_ALIGNS.len() {
            let c = BlockCache::new(8192, 1 << 20).with_disk(dir.path(), 1 << 20);
            let disk = c.disk.as_ref().unwrap();
            disk.align.store(i, Ordering::Relaxed);
            let (a, b) = (bk("a", "e", i as u64), bk("b", "e", i as u64));
            disk.write(&a, aligned.clone());
            disk.write(&b, unaligned.clone());
            c.settle(std::time::Duration::from_secs(5)).await;
            let read = |k: &BlockKey| std::fs::read(dir.path().join(k.file_name())).unwrap();
            let (fa, fb) = (read(&a), read(&b));
            let (ha, hb) = (a.header().len(), b.header().len());
            assert_eq!(fa.len(), fb.len(), "layout {i}");
            assert_eq!(fa[ha..], fb[hb..], "layout {i}: same layout");
            let again = BlockCache::new(8192, 1 << 20).with_disk(dir.path(), 1 << 20);
            let disk = again.disk.as_ref().unwrap();
            assert_eq!(
                disk.read(&a).await.as_deref(),
                Some(&data[..]),
                "layout {i}"
            );
            assert_eq!(
                disk.read(&b).await.as_deref(),
                Some(&data[..]),
                "layout {i}"
            );
        }
    }

    /// A disk behind the network (its backlog full) leaves blocks in
    /// memory only, instead of holding every block until it is written;
    /// once it caught up, blocks go to disk again.
    #[tokio::test]
    async fn blocks_skip_a_disk_that_is_behind() {
        let dir = tempfile::tempdir().unwrap();
        let s = MemStore::versioned();
        let e = s.insert("k", &[5u8; 30], Metadata::new()).etag;
        let c = BlockCache::new(10, 1000).with_disk(dir.path(), 1 << 20);
        let disk = c.disk.clone().unwrap();
        disk.pending_bytes.store(DISK_BACKLOG - 5, Ordering::SeqCst);
        c.get(&s, &bk("k", &e, 0), &pin(&e), 30).await.unwrap();
        c.settle(std::time::Duration::from_secs(5)).await;
        assert_eq!(c.disk_bytes(), 0, "skipped while behind");
        assert!(c.contains(&bk("k", &e, 0)), "served and kept in memory");
        disk.pending_bytes.store(0, Ordering::SeqCst);
        c.get(&s, &bk("k", &e, 1), &pin(&e), 30).await.unwrap();
        c.settle(std::time::Duration::from_secs(5)).await;
        assert_eq!(c.disk_bytes(), file_len(&disk), "written once caught up");
        assert_eq!(disk.pending_bytes.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn disk_tier_survives_a_new_cache_and_stays_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let s = MemStore::versioned();
        let data: Vec<u8> = (0..100u8).collect();
        let p = s.insert("k", &data, Metadata::new());
        let e = p.etag.as_str();
        let c = BlockCache::new(10, 1000).with_disk(dir.path(), 1 << 20);
        for i in 0..10 {
            c.get(&s, &bk("k", e, i), &pin(e), 100).await.unwrap();
        }
        c.settle(std::time::Duration::from_secs(5)).await;
        assert_eq!(s.counters().get(Op::Get), 10);
        // A new cache over the same directory (a remount) serves from disk.
        let c2 = BlockCache::new(10, 1000).with_disk(dir.path(), 1 << 20);
        let got = c2.get(&s, &bk("k", e, 3), &pin(e), 100).await.unwrap();
        assert_eq!(got.as_ref(), &data[30..40]);
        assert_eq!(s.counters().get(Op::Get), 10, "no GET after remount");
        // Another identity for the same file name never matches.
        assert!(
            c2.get(&s, &bk("k", "other", 3), &pin("other"), 100)
                .await
                .is_err()
        );
        // A block file cut short (a kill or a full disk while it was
        // written) is never served: its block comes from S3 again.
        let f = dir.path().join(bk("k", e, 5).file_name());
        let whole = std::fs::read(&f).unwrap();
        std::fs::write(&f, &whole[..whole.len() - 4]).unwrap();
        let c4 = BlockCache::new(10, 1000).with_disk(dir.path(), 1 << 20);
        let gets = s.counters().get(Op::Get);
        let got = c4.get(&s, &bk("k", e, 5), &pin(e), 100).await.unwrap();
        assert_eq!(got.as_ref(), &data[50..60]);
        assert_eq!(s.counters().get(Op::Get), gets + 1, "fetched again");
        c4.settle(std::time::Duration::from_secs(5)).await;
        // Bounded: a small limit keeps only the newest blocks.
        let file = file_len(c.disk.as_ref().unwrap());
        assert_eq!(
            std::fs::metadata(dir.path().join(bk("k", e, 0).file_name()))
                .unwrap()
                .len(),
            file
        );
        let c3 = BlockCache::new(10, 1000).with_disk(dir.path(), 3 * file);
        assert_eq!(c3.disk_bytes(), 3 * file);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 3);
    }
}
