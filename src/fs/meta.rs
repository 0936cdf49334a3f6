//! Each listed object's own metadata, read ahead of the kernel's stats.
//!
//! A listing (ListObjectsV2) tells a key's size and ETag, not its mode,
//! owner, type or mtime (`x-amz-meta-*`). The kernel checks permissions
//! against the attributes it is given, so a listed entry's attributes are
//! not handed out until that object's metadata was read: a listing starts
//! a background pass that HEADs its entries in order, at most
//! `MAX_HEADS_IN_FLIGHT` at a time for the whole mount, and a `stat` of an
//! entry waits for (or starts) that one HEAD. Concurrent askers share one
//! request, and the answer stays in the inode table for `metadata_ttl`, so
//! an object costs at most one HEAD per TTL.
//!
//! The pass keeps `METADATA_AHEAD` entries ahead of the directory's reader,
//! not of the listing: each readdirplus call lets it go further (from where it asks), and so
//! does a stat of an entry it has not read (`ls -l` reads every name
//! first, then stats each). `ls -f` or `find` of 200,000 objects then
//! costs the LISTs and the first window's HEADs, not 200,000 HEADs and the
//! memory of every object's metadata.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use futures::StreamExt;
use parking_lot::Mutex;
use tokio::sync::{Notify, OnceCell, Semaphore};

use super::files::OpenFile;
use super::inodes::{InodeTable, NodeKey};
use super::{Attr, Defaults, FileKind, FsError, FsResult};
use crate::store::{ObjectInfo, ObjectStore, StoreError, StoreResult};

/// HEADs in flight for metadata, per mount.
pub const MAX_HEADS_IN_FLIGHT: usize = 64;

/// Entries of a listing whose metadata is read ahead of its reader.
pub const METADATA_AHEAD: usize = 1024;

/// How far a listing's metadata pass may go: the entries (in listing
/// order) below `allowed`. Its reader moves it on.
#[derive(Debug)]
pub(super) struct Pace {
    /// The listing position of each entry the pass reads, ascending: the
    /// reader counts all entries, the pass only these.
    positions: Vec<usize>,
    /// Entries of the pass (indices into `positions`) it may start.
    allowed: AtomicUsize,
    /// Entries the pass has started.
    started: AtomicUsize,
    /// The reader is gone (its directory handle closed): the pass ends
    /// once it has what was allowed.
    closed: AtomicBool,
    wake: Notify,
}

impl Pace {
    /// The reader is at listing position `at`: the pass may read the
    /// entries before `at + METADATA_AHEAD`.
    pub(super) fn reader_at(&self, at: usize) {
        let upto = at.saturating_add(METADATA_AHEAD);
        self.allow(self.positions.partition_point(|&p| p < upto));
    }

    /// Lets the pass read its entries up to `upto` (exclusive).
    fn allow(&self, upto: usize) {
        self.allowed.fetch_max(upto, Ordering::Relaxed);
        self.wake.notify_one();
    }

    /// The reader stats an entry the pass has not read: it caught up (or
    /// reads in another order), so the pass goes a window further.
    fn caught_up(&self) {
        self.allow(self.started.load(Ordering::Relaxed) + METADATA_AHEAD);
    }

    /// Waits until entry `i` may be read; false once it never may.
    async fn reached(&self, i: usize) -> bool {
        loop {
            if i < self.allowed.load(Ordering::Relaxed) {
                self.started.fetch_max(i + 1, Ordering::Relaxed);
                return true;
            }
            if self.closed.load(Ordering::Relaxed) {
                return false;
            }
            // notify_one keeps a wake-up sent between the checks and here.
            self.wake.notified().await;
        }
    }
}

/// Held by a directory handle: while it lives, the handle's reader paces
/// its listing's metadata pass; dropped, the pass stops at what was
/// allowed.
#[derive(Debug)]
pub struct PaceGuard(pub(super) Arc<Pace>);

impl Drop for PaceGuard {
    fn drop(&mut self) {
        self.0.closed.store(true, Ordering::Relaxed);
        self.0.wake.notify_one();
    }
}

/// Lookups of expired entries of one directory, within one
/// `metadata_ttl`, after which its listing is read again instead
/// (`Fs::stale_lookup`).
pub const RELIST_AFTER: u32 = 8;

/// One directory's expired lookups, and its listing read again for them.
///
/// `ls -l` reads every name, then stats each. When reading the names took
/// longer than `metadata_ttl` (a large directory, a slow or busy server),
/// the first entries have expired by the time they are stat'ed, and each
/// was looked up again alone: a LIST and a HEAD, one entry after another
/// (10,000 entries took 113 s on a busy server). After `RELIST_AFTER` such
/// lookups, the directory is listed again (its LIST pages), the entries
/// from the one asked for on have their metadata read again, in the
/// background ahead of the stats as after a first listing, and everything
/// it listed is fresh for another `metadata_ttl`.
#[derive(Debug, Default)]
pub(super) struct Relist {
    /// Expired lookups since `since`.
    pub(super) stale: u32,
    pub(super) since: Option<Instant>,
    /// Held for writing while the listing is read again: lookups of the
    /// directory's entries meanwhile wait for it.
    pub(super) running: Option<Arc<tokio::sync::RwLock<()>>>,
    /// When the last one ended, and how long it took: the next waits at
    /// least `metadata_ttl` and four times that (a listing that outlasts
    /// the TTL is not read again and again).
    pub(super) last: Option<(Instant, Duration)>,
    /// Keeps its metadata pass going while stats come.
    pub(super) pace: Option<PaceGuard>,
}

type Pending = Arc<OnceCell<FsResult<()>>>;

/// The node at a path (inode, generation), when a listing asked for its
/// object's metadata early.
pub(super) type Stamp = Option<(u64, u64)>;

/// A HEAD a listing started before it had every page.
#[derive(Clone)]
pub(super) struct Early {
    asked: Instant,
    /// The only node its answer may go to, as it was: this mount's own
    /// changes to the object move its generation (an upload, a chmod's
    /// copy, a rename), and the answer, asked before them, is then not
    /// used. `None`: none.
    node: Stamp,
    answer: Arc<OnceCell<StoreResult<ObjectInfo>>>,
}

/// The HEADs one listing started while it read its pages, by key: its
/// metadata pass takes them over as soon as the listing is complete (so
/// none is wasted, whatever order its reader reads in); dropped (with the
/// pass, or with the listing when it fails), they are forgotten.
pub(super) struct EarlyBatch {
    meta: Arc<MetaFetch>,
    keys: std::collections::HashSet<String>,
}

impl EarlyBatch {
    /// Whether this listing started a HEAD of `key`.
    pub(super) fn has(&self, key: &str) -> bool {
        self.keys.contains(key)
    }

    /// The listing has the node `now` at `key`'s path (a key this listing
    /// started a HEAD of; the caller holds the table). `trusted`: nothing newer than the HEAD `key` was asked
    /// for early may have reached that path since: this mount added or
    /// removed no name in the directory while the LIST ran (it may have
    /// made, changed and dropped a node there after the HEAD was asked),
    /// and the node held no metadata read meanwhile (a lookup may have
    /// read another client's newer object: the early answer would take
    /// the mount back to the older one). Untrusted, the answer goes to no
    /// node; trusted, a HEAD asked when the path had no node goes to this
    /// one. Whether the answer may go to node `now`.
    pub(super) fn settle(&self, key: &str, now: (u64, u64), trusted: bool) -> bool {
        let mut m = self.meta.early.lock();
        let Some(e) = m.get_mut(key) else {
            return false;
        };
        if !trusted {
            e.node = None;
        } else if e.node.is_none() {
            e.node = Some(now);
        }
        e.node == Some(now)
    }
}

impl Drop for EarlyBatch {
    fn drop(&mut self) {
        let mut m = self.meta.early.lock();
        for k in &self.keys {
            m.remove(k);
        }
    }
}

pub(super) struct MetaFetch {
    pub(super) store: Arc<dyn ObjectStore>,
    pub(super) table: Arc<Mutex<InodeTable>>,
    pub(super) writes: Arc<Mutex<HashMap<u64, Arc<OpenFile>>>>,
    pub(super) root_prefix: String,
    pub(super) defaults: Defaults,
    pub(super) ttl: Duration,
    /// Point-in-time mount: HEAD the listed version, not the current one.
    pub(super) pinned_versions: bool,
    pub(super) heads: Semaphore,
    pub(super) inflight: Mutex<HashMap<u64, Pending>>,
    /// The metadata pass of each directory's latest listing, while it runs.
    pub(super) paces: Mutex<HashMap<u64, Weak<Pace>>>,
    /// HEADs started by listings still being read, by object key.
    pub(super) early: Mutex<HashMap<String, Early>>,
}

/// What the table says of a node's metadata.
enum Known {
    /// Read from the object (or made by this mount): these attributes.
    Yes(Attr),
    /// No longer at its path.
    Gone,
    /// Listed in this directory, metadata not read yet.
    No { parent: u64 },
}

impl MetaFetch {
    fn known(&self, ino: u64) -> Known {
        let t = self.table.lock();
        let Some(n) = t.get(ino) else {
            return Known::Gone;
        };
        if matches!(n.key, NodeKey::Path(_)) && t.find(&n.key) != Some(ino) {
            return Known::Gone;
        }
        if n.meta_known || self.writes.lock().contains_key(&ino) {
            return Known::Yes(n.attr.clone());
        }
        match n.key {
            NodeKey::Path(_) => Known::No { parent: n.parent },
            // Lost its name before its metadata was read (its HEAD found
            // the object gone): what it has are the listing's defaults.
            NodeKey::Detached(_) => Known::Yes(Attr::granting_nothing(&n.attr)),
            // Nodes of `.versions` are read by their own lookup.
            _ => Known::Yes(n.attr.clone()),
        }
    }

    /// The attributes of `ino` from its own metadata: from the table when
    /// known, else from one HEAD shared by everyone asking meanwhile.
    /// `None`: the object is gone.
    pub(super) async fn attr(&self, ino: u64) -> FsResult<Option<Attr>> {
        self.attr_for(ino, true).await
    }

    /// The same; `reader`: asked by a reader of the directory, not by its
    /// metadata pass.
    async fn attr_for(&self, ino: u64, reader: bool) -> FsResult<Option<Attr>> {
        // A listing may mark the node unknown again right after a fetch:
        // a few rounds, each one HEAD, settle it.
        for round in 0..3 {
            match self.known(ino) {
                Known::Yes(a) => return Ok(Some(a)),
                Known::Gone => return Ok(None),
                Known::No { parent } if round == 0 && reader => {
                    let pace = self.paces.lock().get(&parent).and_then(Weak::upgrade);
                    if let Some(p) = pace {
                        p.caught_up();
                    }
                }
                Known::No { .. } => {}
            }
            let cell = self.inflight.lock().entry(ino).or_default().clone();
            let r = cell.get_or_init(|| self.fetch(ino)).await.clone();
            {
                let mut m = self.inflight.lock();
                if m.get(&ino).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
                    m.remove(&ino);
                }
            }
            r?;
        }
        Err(FsError::Stale)
    }

    /// One HEAD for `ino`'s object (or its `dir/` marker), stored in the
    /// table unless the node changed meanwhile.
    async fn fetch(&self, ino: u64) -> FsResult<()> {
        let (path, parent, dir, version, generation) = {
            let t = self.table.lock();
            let Some(n) = t.get(ino) else { return Ok(()) };
            if n.meta_known || self.writes.lock().contains_key(&ino) {
                return Ok(());
            }
            let NodeKey::Path(p) = &n.key else {
                return Ok(());
            };
            let version = n
                .object
                .as_ref()
                .and_then(|o| o.version_id.clone())
                .filter(|_| self.pinned_versions);
            (
                p.clone(),
                n.parent,
                n.attr.kind == FileKind::Dir,
                version,
                n.generation,
            )
        };
        let key = format!("{}{}{}", self.root_prefix, path, if dir { "/" } else { "" });
        let d = &self.defaults;
        // A HEAD its listing started, if young enough to trust and for
        // this node as it was then: what it read is fresh from when it
        // was asked.
        let early = self
            .early
            .lock()
            .get(&key)
            .filter(|e| {
                version.is_none()
                    && e.asked.elapsed() < self.ttl
                    && e.node == Some((ino, generation))
            })
            .cloned();
        let (answer, asked) = match early {
            Some(e) => {
                let read = e.answer.get_or_init(|| self.head(&key, None)).await;
                (read.clone(), e.asked)
            }
            None => (self.head(&key, version.as_deref()).await, Instant::now()),
        };
        let (attr, object) = match answer {
            Ok(info) => (Attr::from_object(0, &info, dir, d), Some(info)),
            // A directory without a marker object has no metadata of its
            // own: the mount's defaults are its attributes.
            Err(StoreError::NotFound) if dir => (Attr::implicit_dir(0, d), None),
            Err(StoreError::NotFound) => {
                let mut t = self.table.lock();
                let node = NodeKey::Path(path.clone());
                if t.find(&node) == Some(ino) && !self.writes.lock().contains_key(&ino) {
                    t.remove_path(&path, Instant::now() + self.ttl);
                }
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        let mut t = self.table.lock();
        let node = NodeKey::Path(path);
        let unchanged = t.find(&node) == Some(ino)
            && t.get(ino)
                .is_some_and(|n| !n.meta_known && n.generation == generation)
            && !self.writes.lock().contains_key(&ino);
        if unchanged {
            let marker = dir && object.is_some();
            t.upsert(node, parent, attr, object, Some(asked + self.ttl));
            if let Some(n) = t.get_mut(ino) {
                n.dir_marker = marker;
            }
        }
        Ok(())
    }

    /// One HEAD of `key` (or a version of it), counted against the
    /// mount's bound.
    async fn head(&self, key: &str, version: Option<&str>) -> StoreResult<ObjectInfo> {
        let _permit = self.heads.acquire().await.expect("never closed");
        self.store.head(key, version).await
    }

    pub(super) fn early_batch(self: &Arc<Self>) -> EarlyBatch {
        EarlyBatch {
            meta: self.clone(),
            keys: Default::default(),
        }
    }

    /// Starts the HEADs of `keys` (objects of a listing page) in the
    /// background, within the mount's bound, for `batch`'s listing to take
    /// over once it has every page.
    /// `keys`: each with the node at its path now, if any.
    pub(super) fn head_early(self: &Arc<Self>, batch: &mut EarlyBatch, keys: Vec<(String, Stamp)>) {
        let now = Instant::now();
        let cells: Vec<(String, Arc<OnceCell<_>>)> = {
            let mut m = self.early.lock();
            let mut cells = Vec::with_capacity(keys.len());
            for (k, node) in keys {
                if let std::collections::hash_map::Entry::Vacant(v) = m.entry(k.clone()) {
                    let cell = Arc::new(OnceCell::new());
                    v.insert(Early {
                        asked: now,
                        node,
                        answer: cell.clone(),
                    });
                    batch.keys.insert(k.clone());
                    cells.push((k, cell));
                }
            }
            cells
        };
        if cells.is_empty() {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            futures::stream::iter(cells)
                .map(|(key, cell)| {
                    let me = &me;
                    async move {
                        cell.get_or_init(|| me.head(&key, None)).await;
                    }
                })
                .buffer_unordered(MAX_HEADS_IN_FLIGHT)
                .collect::<()>()
                .await;
        });
    }

    /// Stores what `early`'s HEADs read (the metadata of `inos`, the nodes
    /// of its now complete listing they may go to) in the table as they
    /// come in, then forgets them.
    pub(super) fn take_over(self: &Arc<Self>, early: EarlyBatch, inos: Vec<u64>) {
        if inos.is_empty() {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            futures::stream::iter(inos)
                .map(|ino| {
                    let me = &me;
                    async move {
                        let _ = me.attr_for(ino, false).await;
                    }
                })
                .buffer_unordered(MAX_HEADS_IN_FLIGHT)
                .collect::<()>()
                .await;
            drop(early);
        });
    }

    /// Reads the metadata of `entries` (listing position, inode: the
    /// entries of directory `dir_ino`'s listing whose metadata is unknown)
    /// in the background, in order, a bounded number at a time, and at
    /// most `METADATA_AHEAD`
    /// listing positions ahead of the reader, who starts at `first`: the
    /// guard's holder moves it on (`Pace::reader_at`), and a stat of an
    /// entry not read yet does (`Pace::caught_up`). Without a holder, the
    /// pass reads the first window only.
    pub(super) fn prefetch(
        self: &Arc<Self>,
        dir_ino: u64,
        entries: Vec<(usize, u64)>,
        first: usize,
    ) -> Option<PaceGuard> {
        if entries.is_empty() {
            return None;
        }
        let (positions, inos): (Vec<usize>, Vec<u64>) = entries.into_iter().unzip();
        let pace = Arc::new(Pace {
            positions,
            allowed: AtomicUsize::new(0),
            started: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            wake: Notify::new(),
        });
        // The first window, before the reader reads: from the listing's
        // first entry of the directory (`first`, after `.` and `..`).
        pace.reader_at(first);
        self.paces.lock().insert(dir_ino, Arc::downgrade(&pace));
        let me = self.clone();
        let guard = PaceGuard(pace.clone());
        tokio::spawn(async move {
            let gate = pace.clone();
            futures::stream::iter(inos.into_iter().enumerate())
                .then(move |(i, ino)| {
                    let gate = gate.clone();
                    async move { gate.reached(i).await.then_some(ino) }
                })
                .take_while(|ino| std::future::ready(ino.is_some()))
                .map(|ino| {
                    let me = me.clone();
                    async move {
                        let _ = me.attr_for(ino.expect("taken while some"), false).await;
                    }
                })
                .buffer_unordered(MAX_HEADS_IN_FLIGHT)
                .collect::<()>()
                .await;
            let mut paces = me.paces.lock();
            if paces
                .get(&dir_ino)
                .is_some_and(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(&pace)))
            {
                paces.remove(&dir_ino);
            }
        });
        Some(guard)
    }
}
