//! The block cache's disk tier: blocks in slots of a few large files, so
//! caching a block costs a write, not a file.
//!
//! One file per slot size (`slots-<size>`: 4 KiB, 8 KiB, ... doubling up
//! to the block size), a block going into the smallest slot that holds
//! it; beside each, an index of 64-byte records (`slots-<size>.idx`), one
//! per slot: the block's identity (a digest of key, ETag, index and block
//! size), its length and when it was written. A block file per block cost
//! an inode each: creating and deleting them was about half of the tier's
//! cost in a cold sequential read.
//!
//! Written in place, no rename; what a kill at any moment leaves is never
//! served:
//! - a block's data is written before its record, so a slot whose record
//!   did not make it is free at the next start;
//! - a freed slot has its record zeroed before its data is punched out
//!   (the space goes back to the filesystem), and it is handed out again
//!   only after both;
//! - a slot being read is pinned: it is neither freed nor reused until
//!   the read is done.
//!
//! The process can die at any point and the kernel still has every write
//! it returned from; a machine that went down may not. So the tier is
//! trusted at start only if the last mount closed it (`state` says
//! `clean`) or died in this boot (`open <boot id>`); else it starts
//! empty. `state` also holds the tier's lock: a second mount of the same
//! bucket with the same cache directory runs without a disk tier.
//!
//! Data is written with `O_DIRECT` where the filesystem takes it (a
//! buffered write cost about a quarter of the daemon's CPU in a cold
//! sequential read, and filled the page cache with bytes read again, if
//! ever, long after), straight from a store's aligned `PieceBuf` or from a
//! padded copy. Reads are buffered.
//!
//! Lock order: `state`, then a class's `files`; neither is held across
//! file I/O but a class file's truncation.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;
use lru::LruCache;
use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use tracing::{debug, info, warn};

use super::block::BlockKey;
use crate::store::{PIECE_ALIGN, PieceBuf};

/// Bytes of blocks handed to the disk tier and not written yet, at most.
pub(super) const DISK_BACKLOG: u64 = 64 * 1024 * 1024;

/// The smallest slot, and what every slot is a multiple of.
const PAGE: u64 = 4096;

/// One slot's record in the index.
const RECORD: u64 = 64;

/// Starts every record of this layout (a zeroed or older one never
/// matches).
const RECORD_MAGIC: &[u8; 8] = b"bfsslot1";

/// A block's identity on disk.
type Id = [u8; 32];

/// Where a block lies: slot `at` of class `class`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Slot {
    class: usize,
    at: u64,
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    slot: Slot,
    len: u64,
}

#[derive(Debug, Default)]
struct Class {
    /// Slots below `end` free to hand out (record zeroed, data punched).
    free: Vec<u64>,
    /// Slots in the files.
    end: u64,
    /// Slots not free: cached, being written, or freed once unpinned.
    held: u64,
}

#[derive(Debug)]
struct State {
    /// Blocks on disk, least recently used first.
    lru: LruCache<Id, Entry>,
    /// Their slots' bytes.
    bytes: u64,
    classes: Vec<Class>,
    /// Slots being read, and how many times.
    pins: HashMap<Slot, u32>,
    /// Pinned slots no longer cached: freed when the last read is done.
    doomed: HashSet<Slot>,
}

#[derive(Debug)]
struct Files {
    /// Buffered: reads, truncation, and writes where `O_DIRECT` is refused.
    data: File,
    /// The same file opened with `O_DIRECT`, if the filesystem takes it.
    direct: Option<File>,
    index: File,
}

/// The on-disk tier.
#[derive(Debug)]
pub(super) struct Disk {
    dir: PathBuf,
    limit_bytes: u64,
    block_size: u64,
    /// Slot sizes, smallest first.
    sizes: Vec<u64>,
    state: Mutex<State>,
    /// Each class's files, opened when first needed.
    files: Vec<Mutex<Option<Arc<Files>>>>,
    /// `state`, locked while this tier is open.
    marker: File,
    /// `state` says `clean`: the next write says `open` first.
    clean: AtomicBool,
    /// Set on the first write error: the tier stops, reads go on.
    broken: AtomicBool,
    /// Cleared once a write with `O_DIRECT` was refused: buffered from then on.
    direct: AtomicBool,
    /// Blocks being written now.
    pub(super) pending: AtomicU64,
    /// Their bytes.
    pub(super) pending_bytes: AtomicU64,
    /// The thread that writes blocks, one after the other.
    writer: Writer,
}

/// A block to write: the tier, its slot class, identity and bytes.
struct WriteJob {
    disk: Arc<Disk>,
    class: usize,
    id: Id,
    data: Bytes,
}

/// Hands blocks to a thread of the tier's own, which writes them in
/// turn: a cold read caches each block it streams, and a blocking-pool
/// task per block had the read-ahead tasks and the pool's threads
/// contending for the pool's lock and waking each other for every block.
/// The thread ends once the tier is dropped and its queue is empty.
struct Writer(std::sync::mpsc::Sender<WriteJob>);

impl Writer {
    fn start() -> std::io::Result<Writer> {
        let (tx, rx) = std::sync::mpsc::channel::<WriteJob>();
        std::thread::Builder::new()
            .name("bucketfs-disk".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    job.disk.write_block(job.class, &job.id, job.data);
                }
            })?;
        Ok(Writer(tx))
    }
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Writer")
    }
}

/// The slot sizes for blocks of `block_size`: 4 KiB doubling, then the
/// block size rounded up to 4 KiB.
fn slot_sizes(block_size: u64) -> Vec<u64> {
    let top = block_size.max(1).div_ceil(PAGE) * PAGE;
    let mut sizes = Vec::new();
    let mut s = PAGE;
    while s < top {
        sizes.push(s);
        s *= 2;
    }
    sizes.push(top);
    sizes
}

/// This boot's id: a tier left open by a process of this boot has every
/// write that process made.
fn boot_id() -> Option<String> {
    let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    Some(id.trim().to_string()).filter(|s| !s.is_empty())
}

fn open_marker(boot: Option<&str>) -> String {
    format!("open {}\n", boot.unwrap_or("unknown"))
}

/// Written over the old text, then cut to its length: a write that fails
/// (a full disk) leaves text that matches no marker, not an empty file.
fn set_marker(f: &File, text: &str) -> std::io::Result<()> {
    f.write_all_at(text.as_bytes(), 0)?;
    f.set_len(text.len() as u64)?;
    f.sync_data()
}

/// Writes `data` at `at` through an `O_DIRECT` file: from where it lies
/// when that is as `O_DIRECT` needs (a store's `PieceBuf`), else from an
/// aligned copy padded to a page.
fn write_direct(f: &File, data: &[u8], at: u64) -> std::io::Result<()> {
    let aligned =
        data.as_ptr().align_offset(PIECE_ALIGN) == 0 && (data.len() as u64).is_multiple_of(PAGE);
    if aligned {
        return f.write_all_at(data, at);
    }
    let padded = (data.len() as u64).div_ceil(PAGE) * PAGE;
    let mut buf = PieceBuf::new(padded as usize);
    buf.fill(data);
    let zeros = [0u8; PAGE as usize];
    buf.fill(&zeros[..buf.room()]);
    f.write_all_at(&buf.freeze(), at)
}

/// Gives a slot's bytes back to the filesystem (they read as zeros).
fn punch(f: &File, at: u64, len: u64) -> std::io::Result<()> {
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            at as libc::off_t,
            len as libc::off_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A block's identity on disk: the block size is part of it, as the same
/// index is another range of the object under another size.
fn block_id(bk: &BlockKey, block_size: u64) -> Id {
    let mut h = Sha256::new();
    h.update(b"bucketfs-block-3");
    h.update((bk.key.len() as u64).to_le_bytes());
    h.update(bk.key.as_bytes());
    h.update((bk.etag.len() as u64).to_le_bytes());
    h.update(bk.etag.as_bytes());
    h.update(bk.index.to_le_bytes());
    h.update(block_size.to_le_bytes());
    h.finalize().into()
}

fn record(id: &Id, len: u64) -> [u8; RECORD as usize] {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut r = [0u8; RECORD as usize];
    r[..8].copy_from_slice(RECORD_MAGIC);
    r[8..40].copy_from_slice(id);
    r[40..48].copy_from_slice(&len.to_le_bytes());
    r[48..56].copy_from_slice(&stamp.to_le_bytes());
    r
}

/// A record's identity, length and stamp, if it holds a block of at
/// most `size` bytes.
fn parse_record(r: &[u8], size: u64) -> Option<(Id, u64, u64)> {
    if r.len() != RECORD as usize || &r[..8] != RECORD_MAGIC {
        return None;
    }
    let len = u64::from_le_bytes(r[40..48].try_into().ok()?);
    let stamp = u64::from_le_bytes(r[48..56].try_into().ok()?);
    (len > 0 && len <= size).then(|| (r[8..40].try_into().unwrap(), len, stamp))
}

impl Disk {
    /// Opens (or creates) the tier in `dir`, indexing what a previous
    /// mount left if it can be trusted.
    pub(super) fn open(dir: PathBuf, limit_bytes: u64, block_size: u64) -> std::io::Result<Disk> {
        crate::private::create_private_dir(&dir)?;
        let mut marker = crate::private::private_file()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join("state"))?;
        if !crate::write::try_lock(&marker)? {
            return Err(std::io::Error::new(
                std::io::ErrorKind::WouldBlock,
                "in use by another mount of this bucket",
            ));
        }
        let mut was = String::new();
        let _ = marker.read_to_string(&mut was);
        let boot = boot_id();
        let trusted = was == "clean\n" || (boot.is_some() && was == open_marker(boot.as_deref()));
        set_marker(&marker, &open_marker(boot.as_deref()))?;
        let sizes = slot_sizes(block_size);
        let names: Vec<String> = sizes.iter().map(|s| format!("slots-{s}")).collect();
        for e in std::fs::read_dir(&dir)? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            let ours = names
                .iter()
                .any(|n| name == *n || name.strip_suffix(".idx") == Some(n));
            if name == "state" {
                continue;
            }
            if !trusted || !ours {
                // Another layout's files (an older version, another block
                // size), or a tier that cannot be trusted.
                let _ = std::fs::remove_file(e.path());
            } else if e.metadata()?.permissions().mode() & 0o077 != 0 {
                std::fs::set_permissions(e.path(), std::fs::Permissions::from_mode(0o600))?;
            }
        }
        let disk = Disk {
            dir,
            limit_bytes,
            block_size,
            state: Mutex::new(State {
                lru: LruCache::unbounded(),
                bytes: 0,
                classes: sizes.iter().map(|_| Class::default()).collect(),
                pins: HashMap::new(),
                doomed: HashSet::new(),
            }),
            files: sizes.iter().map(|_| Mutex::new(None)).collect(),
            sizes,
            marker,
            clean: AtomicBool::new(false),
            broken: AtomicBool::new(false),
            direct: AtomicBool::new(true),
            pending: AtomicU64::new(0),
            pending_bytes: AtomicU64::new(0),
            writer: Writer::start()?,
        };
        disk.load()?;
        disk.evict();
        Ok(disk)
    }

    /// Indexes the blocks the files hold, oldest first; frees the rest.
    fn load(&self) -> std::io::Result<()> {
        let mut found = Vec::new();
        for (class, &size) in self.sizes.iter().enumerate() {
            let index = self.dir.join(format!("slots-{size}.idx"));
            let Ok(records) = std::fs::read(&index) else {
                // Data without an index holds no block.
                let _ = std::fs::remove_file(self.dir.join(format!("slots-{size}")));
                continue;
            };
            let f = self.files(class)?;
            let end = records.len() as u64 / RECORD;
            // Data past the last record: written by a process that died
            // before its record. A record cut short (a full disk) is no
            // slot: the next one handed out there gets a whole record.
            // A record of data the file no longer holds (cut short or
            // replaced by hand, or by another version) is no block.
            let data_len = f.data.metadata()?.len();
            if data_len > end * size {
                f.data.set_len(end * size)?;
            }
            f.index.set_len(end * RECORD)?;
            let mut st = self.state.lock();
            st.classes[class].end = end;
            for (at, r) in records.chunks_exact(RECORD as usize).enumerate() {
                let slot = Slot {
                    class,
                    at: at as u64,
                };
                match parse_record(r, size) {
                    Some((id, len, stamp)) if slot.at * size + len <= data_len => {
                        found.push((stamp, id, Entry { slot, len }))
                    }
                    _ => st.classes[class].free.push(at as u64),
                }
            }
            st.classes[class].free.reverse();
        }
        found.sort_by_key(|(stamp, ..)| *stamp);
        let mut twice = Vec::new();
        {
            let mut st = self.state.lock();
            for (_, id, e) in found {
                st.bytes += self.sizes[e.slot.class];
                st.classes[e.slot.class].held += 1;
                if let Some(older) = st.lru.put(id, e) {
                    st.bytes -= self.sizes[older.slot.class];
                    twice.push(older.slot);
                }
            }
        }
        self.release(twice);
        // Slots free at start may hold a dead process's data: given back.
        let free: Vec<Slot> = {
            let st = self.state.lock();
            (st.classes.iter().enumerate())
                .flat_map(|(class, c)| c.free.iter().map(move |&at| Slot { class, at }))
                .collect()
        };
        for s in free {
            if let Ok(f) = self.files(s.class) {
                let size = self.sizes[s.class];
                let _ = punch(&f.data, s.at * size, size);
            }
        }
        Ok(())
    }

    /// A class's files, opened (created) when first needed.
    fn files(&self, class: usize) -> std::io::Result<Arc<Files>> {
        let mut f = self.files[class].lock();
        if let Some(f) = &*f {
            return Ok(f.clone());
        }
        let path = self.dir.join(format!("slots-{}", self.sizes[class]));
        let open = |p: &Path, flags: i32| {
            crate::private::private_file()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .custom_flags(flags)
                .open(p)
        };
        let files = Arc::new(Files {
            data: open(&path, 0)?,
            direct: open(&path, libc::O_DIRECT).ok(),
            index: open(&path.with_extension("idx"), 0)?,
        });
        *f = Some(files.clone());
        Ok(files)
    }

    fn id(&self, bk: &BlockKey) -> Id {
        block_id(bk, self.block_size)
    }

    /// Whether a block is on disk (no I/O).
    pub(super) fn holds(&self, bk: &BlockKey) -> bool {
        let id = self.id(bk);
        self.state.lock().lru.contains(&id)
    }

    pub(super) fn evict(&self) {
        self.evict_to(self.limit_bytes);
    }

    /// Drops least recently used blocks until at most `keep` bytes remain
    /// (a slot being read stays until it is done).
    pub(super) fn evict_to(&self, keep: u64) {
        let victims = {
            let mut st = self.state.lock();
            let State {
                lru, pins, bytes, ..
            } = &mut *st;
            let mut victims = Vec::new();
            while *bytes > keep {
                let Some(id) = lru
                    .iter()
                    .rev()
                    .find(|(_, e)| !pins.contains_key(&e.slot))
                    .map(|(id, _)| *id)
                else {
                    break;
                };
                let e = lru.pop(&id).expect("found above");
                *bytes -= self.sizes[e.slot.class];
                victims.push(e.slot);
            }
            victims
        };
        self.release(victims);
    }

    /// Frees slots no longer cached: record zeroed, then data punched
    /// out, then free to hand out. A class left with no slot held is
    /// truncated (its space back even where punching is not supported).
    fn release(&self, slots: Vec<Slot>) {
        for s in slots {
            let size = self.sizes[s.class];
            if let Ok(f) = self.files(s.class) {
                let zeroed = f.index.write_all_at(&[0u8; RECORD as usize], s.at * RECORD);
                let punched = zeroed.and_then(|()| punch(&f.data, s.at * size, size));
                if let Err(e) = punched {
                    debug!(dir = %self.dir.display(), error = %e, "a freed slot keeps its space");
                }
            }
            let mut st = self.state.lock();
            let c = &mut st.classes[s.class];
            c.held -= 1;
            c.free.push(s.at);
            if c.held == 0 {
                let f = self.files[s.class].lock().clone();
                if let Some(f) = f
                    && f.data.set_len(0).and_then(|()| f.index.set_len(0)).is_ok()
                {
                    c.end = 0;
                    c.free.clear();
                }
            }
        }
    }

    /// A block from disk, if it is there whole.
    pub(super) async fn read(self: &Arc<Self>, bk: &BlockKey) -> Option<Bytes> {
        let id = self.id(bk);
        let entry = {
            let mut st = self.state.lock();
            let e = *st.lru.get(&id)?;
            *st.pins.entry(e.slot).or_default() += 1;
            e
        };
        let disk = self.clone();
        let data = tokio::task::spawn_blocking(move || disk.read_pinned(entry))
            .await
            .ok()
            .flatten();
        self.unpin(entry.slot);
        data
    }

    fn read_pinned(&self, e: Entry) -> Option<Bytes> {
        let f = self.files(e.slot.class).ok()?;
        let at = e.slot.at * self.sizes[e.slot.class];
        PieceBuf::read_at(&f.data, at, usize::try_from(e.len).ok()?).ok()
    }

    fn unpin(&self, slot: Slot) {
        let freed = {
            let mut st = self.state.lock();
            let n = st.pins.get_mut(&slot).expect("pinned");
            *n -= 1;
            if *n > 0 {
                return;
            }
            st.pins.remove(&slot);
            st.doomed.remove(&slot)
        };
        if freed {
            self.release(vec![slot]);
        }
    }

    /// Caches a block on disk in the background, unless the disk is behind.
    pub(super) fn write(self: &Arc<Self>, bk: &BlockKey, data: Bytes) {
        if self.broken.load(Ordering::Relaxed) || data.is_empty() {
            return;
        }
        let len = data.len() as u64;
        let Some(class) = self.sizes.iter().position(|&s| s >= len) else {
            return;
        };
        if self.pending_bytes.fetch_add(len, Ordering::SeqCst) + len > DISK_BACKLOG {
            // The disk is behind: this block stays in memory only.
            self.pending_bytes.fetch_sub(len, Ordering::SeqCst);
            return;
        }
        self.pending.fetch_add(1, Ordering::SeqCst);
        let job = WriteJob {
            disk: self.clone(),
            class,
            id: self.id(bk),
            data,
        };
        if let Err(std::sync::mpsc::SendError(job)) = self.writer.0.send(job) {
            // The thread is gone (it cannot be while the tier lives).
            self.pending_bytes.fetch_sub(len, Ordering::SeqCst);
            self.pending.fetch_sub(1, Ordering::SeqCst);
            drop(job);
        }
    }

    /// Writes a block handed to the writer thread, then counts it done.
    fn write_block(self: &Arc<Self>, class: usize, id: &Id, data: Bytes) {
        let len = data.len() as u64;
        let slot = self.take(class);
        let r = self.write_slot(slot, id, &data);
        drop(data);
        match r {
            Ok(()) => {
                let replaced = {
                    let mut st = self.state.lock();
                    st.bytes += self.sizes[class];
                    let old = st.lru.put(*id, Entry { slot, len });
                    old.and_then(|old| {
                        st.bytes -= self.sizes[old.slot.class];
                        if st.pins.contains_key(&old.slot) {
                            st.doomed.insert(old.slot);
                            None
                        } else {
                            Some(old.slot)
                        }
                    })
                };
                self.release(replaced.into_iter().collect());
                self.evict();
            }
            Err(e) => {
                self.release(vec![slot]);
                if !self.broken.swap(true, Ordering::Relaxed) {
                    warn!(dir = %self.dir.display(), error = %e, "disk cache stopped; reads go on from S3");
                }
            }
        }
        self.pending_bytes.fetch_sub(len, Ordering::SeqCst);
        self.pending.fetch_sub(1, Ordering::SeqCst);
    }

    /// A free slot of `class`, held until released.
    fn take(&self, class: usize) -> Slot {
        let mut st = self.state.lock();
        let c = &mut st.classes[class];
        c.held += 1;
        let at = c.free.pop().unwrap_or_else(|| {
            c.end += 1;
            c.end - 1
        });
        Slot { class, at }
    }

    /// Writes a block into a slot it holds: the data, then its record.
    fn write_slot(&self, slot: Slot, id: &Id, data: &[u8]) -> std::io::Result<()> {
        if self.clean.swap(false, Ordering::SeqCst) {
            set_marker(&self.marker, &open_marker(boot_id().as_deref()))?;
        }
        let f = self.files(slot.class)?;
        let at = slot.at * self.sizes[slot.class];
        let direct = f
            .direct
            .as_ref()
            .filter(|_| self.direct.load(Ordering::Relaxed));
        match direct.map(|d| write_direct(d, data, at)) {
            Some(Err(e)) if e.raw_os_error() == Some(libc::EINVAL) => {
                debug!(dir = %self.dir.display(), "O_DIRECT refused: buffered writes");
                self.direct.store(false, Ordering::Relaxed);
                f.data.write_all_at(data, at)?;
            }
            Some(r) => r?,
            None => f.data.write_all_at(data, at)?,
        }
        f.index
            .write_all_at(&record(id, data.len() as u64), slot.at * RECORD)
    }

    /// Called once no write is pending, before the process exits: the
    /// files reach the disk, then `state` says `clean`, so the tier is
    /// trusted after a reboot too.
    pub(super) fn close(&self) {
        let files: Vec<Arc<Files>> = self.files.iter().filter_map(|f| f.lock().clone()).collect();
        let synced = files
            .iter()
            .try_for_each(|f| f.data.sync_data().and_then(|()| f.index.sync_data()));
        let r = synced.and_then(|()| {
            self.clean.store(true, Ordering::SeqCst);
            set_marker(&self.marker, "clean\n")
        });
        if let Err(e) = r {
            self.clean.store(false, Ordering::SeqCst);
            info!(dir = %self.dir.display(), error = %e, "disk cache not closed cleanly");
        }
    }

    pub(super) fn bytes(&self) -> u64 {
        self.state.lock().bytes
    }

    pub(super) fn blocks(&self) -> usize {
        self.state.lock().lru.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::block::BlockCache;
    use crate::cache::block::tests::{bk, pin};
    use crate::store::memory::MemStore;
    use crate::store::{Metadata, ObjectStore, Op};
    use std::time::Duration;

    fn cache(dir: &Path, block_size: u64, limit: u64) -> BlockCache {
        BlockCache::new(block_size, 1 << 20).with_disk(dir, limit)
    }

    /// Reads every block of `key` (`data`, stored with `etag`) through
    /// `c`; returns the GETs it made.
    async fn read_all(c: &BlockCache, s: &MemStore, key: &str, etag: &str, data: &[u8]) -> u64 {
        let gets = s.counters().get(Op::Get);
        let bs = c.block_size();
        for i in 0..(data.len() as u64).div_ceil(bs) {
            let got = c
                .get(s, &bk(key, etag, i), &pin(etag), data.len() as u64)
                .await
                .unwrap();
            let end = ((i + 1) * bs).min(data.len() as u64) as usize;
            assert_eq!(&got[..], &data[(i * bs) as usize..end], "block {i}");
        }
        s.counters().get(Op::Get) - gets
    }

    fn state_file(dir: &Path) -> PathBuf {
        dir.join("state")
    }

    /// Blocks of each slot size, written with `O_DIRECT` and buffered,
    /// from an aligned piece and from unaligned bytes, read back after a
    /// remount without a GET.
    #[tokio::test]
    async fn blocks_of_every_size_read_back_after_a_remount() {
        let s = MemStore::versioned();
        let data: Vec<u8> = (0..=250u8).cycle().take(20_000).collect();
        let e = s.insert("k", &data, Metadata::new()).etag;
        for direct in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let c = cache(dir.path(), 8192, 1 << 20);
            let disk = c.disk().cloned().unwrap();
            disk.direct.store(direct, Ordering::Relaxed);
            assert_eq!(read_all(&c, &s, "k", &e, &data).await, 3, "direct {direct}");
            // The same 8 KiB block from an aligned piece and from bytes
            // one off alignment, under two other names.
            let mut piece = PieceBuf::new(8192);
            piece.fill(&data[..8192]);
            let mut v = vec![0u8; 8193];
            v[1..].copy_from_slice(&data[..8192]);
            disk.write(&bk("aligned", "e", 0), piece.freeze());
            disk.write(&bk("unaligned", "e", 0), Bytes::from(v).slice(1..));
            c.settle(Duration::from_secs(5)).await;
            assert_eq!(
                std::fs::read_to_string(state_file(dir.path())).unwrap(),
                "clean\n"
            );
            assert_eq!(disk.blocks(), 5);
            assert_eq!(
                disk.bytes(),
                4 * 8192 + 4096,
                "slots of 8 KiB, 8 KiB, 4 KiB"
            );
            drop((c, disk));
            let again = cache(dir.path(), 8192, 1 << 20);
            assert_eq!(
                read_all(&again, &s, "k", &e, &data).await,
                0,
                "direct {direct}"
            );
            let disk = again.disk().unwrap();
            for k in ["aligned", "unaligned"] {
                let got = disk.read(&bk(k, "e", 0)).await;
                assert_eq!(got.as_deref(), Some(&data[..8192]), "{k}, direct {direct}");
            }
            assert_eq!(again.stats.disk_hits.load(Ordering::Relaxed), 3);
        }
    }

    /// What a process killed while writing leaves (data without its
    /// record, a record that does not fit its slot) is never served; the
    /// rest is. A tier a machine left open in another boot is not
    /// trusted at all; one a process left open in this boot is.
    #[tokio::test]
    async fn what_a_kill_or_a_crash_leaves_is_never_served() {
        let dir = tempfile::tempdir().unwrap();
        let s = MemStore::versioned();
        let data: Vec<u8> = (0..=250u8).cycle().take(4 * 4096).collect();
        let e = s.insert("k", &data, Metadata::new()).etag;
        let c = cache(dir.path(), 4096, 1 << 20);
        assert_eq!(read_all(&c, &s, "k", &e, &data).await, 4);
        c.settle(Duration::from_secs(5)).await;
        drop(c);
        let index = dir.path().join("slots-4096.idx");
        let mut records = std::fs::read(&index).unwrap();
        assert_eq!(records.len(), 4 * RECORD as usize);
        // Block 1's record lost (the kill came between data and record);
        // block 2's says more than its slot holds.
        let slot_of = |records: &[u8], i: u64| {
            let id = block_id(&bk("k", &e, i), 4096);
            records
                .chunks(RECORD as usize)
                .position(|r| r[8..40] == id)
                .unwrap()
        };
        let (one, two) = (slot_of(&records, 1), slot_of(&records, 2));
        records[one * 64..(one + 1) * 64].fill(0);
        records[two * 64 + 40..two * 64 + 48].copy_from_slice(&4097u64.to_le_bytes());
        std::fs::write(&index, &records).unwrap();
        let boot = boot_id().expect("a boot id on Linux");
        std::fs::write(state_file(dir.path()), open_marker(Some(&boot))).unwrap();
        let c = cache(dir.path(), 4096, 1 << 20);
        assert_eq!(c.disk().unwrap().blocks(), 2, "blocks 0 and 3 kept");
        assert_eq!(
            read_all(&c, &s, "k", &e, &data).await,
            2,
            "blocks 1 and 2 again"
        );
        c.settle(Duration::from_secs(5)).await;
        drop(c);
        // Left open in another boot: everything fetched again.
        std::fs::write(state_file(dir.path()), "open another-boot\n").unwrap();
        let c = cache(dir.path(), 4096, 1 << 20);
        assert_eq!(c.disk_bytes(), 0);
        assert_eq!(read_all(&c, &s, "k", &e, &data).await, 4);
        c.settle(Duration::from_secs(5)).await;
        drop(c);
        // No state at all (an older layout's directory) is not trusted
        // either; the older layout's files are removed.
        std::fs::remove_file(state_file(dir.path())).unwrap();
        std::fs::write(dir.path().join("0123abcd"), b"an older block file").unwrap();
        let c = cache(dir.path(), 4096, 1 << 20);
        assert_eq!(c.disk_bytes(), 0);
        assert!(!dir.path().join("0123abcd").exists());
    }

    /// A record cut short (a disk full while it was written) is no slot:
    /// the blocks cached after it each get a slot of their own.
    #[tokio::test]
    async fn a_record_cut_short_is_no_slot() {
        let dir = tempfile::tempdir().unwrap();
        let s = MemStore::versioned();
        let data: Vec<u8> = (0..=250u8).cycle().take(3 * 4096).collect();
        let e = s.insert("k", &data, Metadata::new()).etag;
        let c = cache(dir.path(), 4096, 1 << 20);
        c.get(&s, &bk("k", &e, 0), &pin(&e), data.len() as u64)
            .await
            .unwrap();
        c.settle(Duration::from_secs(5)).await;
        drop(c);
        let index = dir.path().join("slots-4096.idx");
        let mut records = std::fs::read(&index).unwrap();
        records.extend_from_slice(&[7u8; 10]);
        std::fs::write(&index, &records).unwrap();
        let c = cache(dir.path(), 4096, 1 << 20);
        assert_eq!(read_all(&c, &s, "k", &e, &data).await, 2, "blocks 1 and 2");
        c.settle(Duration::from_secs(5)).await;
        drop(c);
        let c = BlockCache::new(4096, 0).with_disk(dir.path(), 1 << 20);
        assert_eq!(read_all(&c, &s, "k", &e, &data).await, 0, "all from disk");
    }

    /// A slot file cut short or removed behind its index (by hand, or by
    /// an older version evicting it as a block file) serves nothing: its
    /// records past the data are no blocks, and the file is not grown
    /// with zeros to match them.
    #[tokio::test]
    async fn records_past_the_data_are_no_blocks() {
        let s = MemStore::versioned();
        let data: Vec<u8> = (1..=250u8).cycle().take(3 * 4096).collect();
        let e = s.insert("k", &data, Metadata::new()).etag;
        for cut in [4096, 0] {
            let dir = tempfile::tempdir().unwrap();
            let c = cache(dir.path(), 4096, 1 << 20);
            // One at a time: block i in slot i.
            for i in 0..3 {
                c.get(&s, &bk("k", &e, i), &pin(&e), data.len() as u64)
                    .await
                    .unwrap();
                c.settle(Duration::from_secs(5)).await;
            }
            drop(c);
            let slots = dir.path().join("slots-4096");
            if cut == 0 {
                std::fs::remove_file(&slots).unwrap();
            } else {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&slots)
                    .unwrap();
                f.set_len(cut).unwrap();
            }
            let c = cache(dir.path(), 4096, 1 << 20);
            assert_eq!(c.disk().unwrap().blocks(), (cut / 4096) as usize);
            let fetched = read_all(&c, &s, "k", &e, &data).await;
            assert_eq!(fetched, 3 - cut / 4096, "cut at {cut}");
            c.settle(Duration::from_secs(5)).await;
            drop(c);
            // The index removed: the data holds no block and goes.
            std::fs::remove_file(slots.with_extension("idx")).unwrap();
            let c = cache(dir.path(), 4096, 1 << 20);
            assert_eq!(c.disk_bytes(), 0);
            assert!(!slots.exists());
            assert_eq!(read_all(&c, &s, "k", &e, &data).await, 3);
        }
    }

    /// One index of an object is another range under another block size:
    /// a remount with another `block_size` never serves a block cached
    /// under the old one (here both are 2 bytes long).
    #[tokio::test]
    async fn a_block_of_another_block_size_is_never_served() {
        let dir = tempfile::tempdir().unwrap();
        let s = MemStore::versioned();
        let data = b"abcde";
        let e = s.insert("k", data, Metadata::new()).etag;
        let c = cache(dir.path(), 3, 1 << 20);
        assert_eq!(read_all(&c, &s, "k", &e, data).await, 2);
        c.settle(Duration::from_secs(5)).await;
        drop(c);
        let c = cache(dir.path(), 2, 1 << 20);
        // Block 1 is "de" under 3 bytes, "cd" under 2.
        assert_eq!(read_all(&c, &s, "k", &e, data).await, 3);
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
        let disk = c.disk().cloned().unwrap();
        disk.pending_bytes.store(DISK_BACKLOG - 5, Ordering::SeqCst);
        c.get(&s, &bk("k", &e, 0), &pin(&e), 30).await.unwrap();
        c.settle(Duration::from_secs(5)).await;
        assert_eq!(c.disk_bytes(), 0, "skipped while behind");
        assert!(c.contains(&bk("k", &e, 0)), "served and kept in memory");
        disk.pending_bytes.store(0, Ordering::SeqCst);
        c.get(&s, &bk("k", &e, 1), &pin(&e), 30).await.unwrap();
        c.settle(Duration::from_secs(5)).await;
        assert_eq!(c.disk_bytes(), PAGE, "written once caught up");
        assert_eq!(disk.pending_bytes.load(Ordering::SeqCst), 0);
    }

    /// Bytes the files take on disk.
    fn allocated(dir: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().blocks() * 512)
            .sum()
    }

    /// The newest blocks within the limit stay; evicted slots are reused
    /// and their space goes back to the filesystem; giving all back
    /// leaves empty files.
    #[tokio::test]
    async fn the_tier_stays_within_its_limit_and_gives_evicted_space_back() {
        let dir = tempfile::tempdir().unwrap();
        let s = MemStore::versioned();
        let data: Vec<u8> = (0..=250u8).cycle().take(10 * 4096).collect();
        let e = s.insert("k", &data, Metadata::new()).etag;
        let c = BlockCache::new(4096, 4096).with_disk(dir.path(), 3 * 4096);
        // One at a time: blocks being written take slots of their own
        // (at most `DISK_BACKLOG` of them).
        for i in 0..10 {
            c.get(&s, &bk("k", &e, i), &pin(&e), data.len() as u64)
                .await
                .unwrap();
            c.settle(Duration::from_secs(5)).await;
        }
        let disk = c.disk().cloned().unwrap();
        assert_eq!((disk.blocks(), disk.bytes()), (3, 3 * 4096));
        let len = std::fs::metadata(dir.path().join("slots-4096"))
            .unwrap()
            .len();
        assert!(len <= 4 * 4096, "slots reused: the file is {len} bytes");
        let used = allocated(dir.path());
        assert!(
            used <= 4 * 4096 + 4096,
            "{used} bytes allocated for 3 blocks"
        );
        // The three newest (7, 8, 9) from disk, after a remount too.
        drop((c, disk));
        let c = BlockCache::new(4096, 4096).with_disk(dir.path(), 3 * 4096);
        let etag = e.clone();
        let gets = s.counters().get(Op::Get);
        for i in 7..10 {
            c.get(&s, &bk("k", &etag, i), &pin(&etag), data.len() as u64)
                .await
                .unwrap();
        }
        assert_eq!(s.counters().get(Op::Get), gets);
        c.free_disk(u64::MAX);
        assert_eq!(c.disk_bytes(), 0);
        let len = std::fs::metadata(dir.path().join("slots-4096"))
            .unwrap()
            .len();
        assert_eq!(len, 0, "nothing held: the file is truncated");
    }

    /// A slot being read is neither freed nor handed out again; a block
    /// cached again meanwhile frees its old slot once the read is done.
    #[tokio::test]
    async fn a_slot_being_read_is_never_freed_or_reused() {
        let dir = tempfile::tempdir().unwrap();
        let c = BlockCache::new(4096, 1 << 20).with_disk(dir.path(), 1 << 20);
        let disk = c.disk().cloned().unwrap();
        let a = bk("a", "e", 0);
        disk.write(&a, Bytes::from(vec![1u8; 4096]));
        c.settle(Duration::from_secs(5)).await;
        let entry = {
            let mut st = disk.state.lock();
            let e = *st.lru.get(&disk.id(&a)).unwrap();
            st.pins.insert(e.slot, 1);
            e
        };
        disk.evict_to(0);
        assert_eq!(disk.blocks(), 1, "pinned: kept");
        disk.write(&bk("b", "e", 0), Bytes::from(vec![2u8; 4096]));
        disk.write(&a, Bytes::from(vec![1u8; 4096]));
        c.settle(Duration::from_secs(5)).await;
        let slots: Vec<Slot> = disk.state.lock().lru.iter().map(|(_, e)| e.slot).collect();
        assert!(!slots.contains(&entry.slot), "{slots:?}: not reused");
        assert_eq!(disk.read_pinned(entry).as_deref(), Some(&[1u8; 4096][..]));
        assert!(disk.state.lock().doomed.contains(&entry.slot));
        disk.unpin(entry.slot);
        let st = disk.state.lock();
        assert!(
            st.classes[0].free.contains(&entry.slot.at),
            "freed once read"
        );
        assert_eq!(st.classes[0].held, 2);
    }

    /// Two mounts of one bucket with one cache directory: the second runs
    /// without the disk tier while the first holds it (never sharing its
    /// slots), and gets it once the first let go (a remount right after
    /// `umount`, the old daemon still exiting).
    #[tokio::test]
    async fn a_second_mount_of_the_same_directory_waits_for_the_disk_tier() {
        let dir = tempfile::tempdir().unwrap();
        let first = cache(dir.path(), 4096, 1 << 20);
        assert!(first.disk().is_some());
        let second = cache(dir.path(), 4096, 1 << 20);
        assert!(second.disk().is_none());
        drop(first);
        let start = std::time::Instant::now();
        while second.disk().is_none() && start.elapsed() < Duration::from_secs(20) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(second.disk().is_some(), "attached once the first let go");
    }
}
