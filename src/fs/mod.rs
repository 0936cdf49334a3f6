//! The filesystem core: what a path, a directory, a file handle mean over a
//! bucket. It knows nothing of FUSE (the adapter in `fuse.rs` calls these
//! `async fn`s) and nothing of the SDK (it talks to `dyn ObjectStore`).
//!
//! - `inodes`: inode numbers ⇄ paths, attributes with a TTL, lookup counts.
//! - `files`: open handles, reads through the block cache, the write-back
//!   state of files open for writing.
//! - `namespace`: create, mkdir, unlink, rmdir, rename, symlink, setattr.
//! - `versions`: the read-only `.versions/` tree and point-in-time mounts.
//! - `xattr`, `acl`: extended attributes and POSIX ACLs.
//!
//! Lock order: `ns` (async), then files' write states (async, in inode
//! order when two are held), then `table` before `handles` before
//! `writes`, each a `parking_lot` lock held for a few map operations,
//! never across `.await`; `marker_meta` (async, a directory marker's
//! metadata copies) after `ns`. `ns` is taken for reading by what looks a name
//! up, lists a directory, adds a name or a writer (create, mkdir, open for
//! writing, unlink, file rename) and for
//! writing by what must see a directory hold still (rmdir, directory
//! rename); it is never held across an upload of data, except by a
//! directory rename uploading the dirty files it moves.

pub mod acl;
pub mod attr;
mod dirs;
mod dirtimes;
mod files;
pub mod inodes;
mod kdirs;
mod meta;
pub mod names;
mod namespace;
mod outside;
mod versions;
mod xattr;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;
use tracing::debug;

pub use attr::{Attr, Defaults, FileKind};
use dirs::{DirHandle, Listing};
use files::{Handle, OpenFile};
pub use files::{PendingFile, SetAttr, killed_perm};
use inodes::{InodeTable, NodeKey, ROOT_INO};
pub use kdirs::KernelDir;
pub use meta::{METADATA_AHEAD, RELIST_AFTER};
use names::{OddKeys, VERSIONS_DIR, check_key, check_name, join, showable};
pub use namespace::Creator;
pub use xattr::{UNSUPPORTED_PREFIXES as UNSUPPORTED_XATTR_PREFIXES, acl_xattr};

use crate::cache::block::BlockCache;
use crate::store::{ObjectInfo, ObjectStore, StoreError};
use crate::write::{UploadOptions, WriteError};

/// How many names a lookup's ListObjectsV2 asks for: enough to reach
/// `name/` past the names that sort between (`name-1`, `name.bak`).
const LOOKUP_LIST_KEYS: i32 = 100;

/// Entries handed out per readdir call when the caller sets no bound
/// (`DirAsk::at`); the kernel asks again for more.
const DIR_CHUNK_ENTRIES: usize = 4096;

/// Entries of a readdirplus reply that wait for their metadata. Entries
/// after them go only while their metadata is already known: the reply
/// ends at the first that is not, and the kernel asks again from there.
/// So `ls -l` gets every entry's own attributes with the listing (no
/// LOOKUP per entry), and a plain `ls`, which the kernel serves by
/// readdirplus only for its first call, waits for this many at most.
const PLUS_WAIT_ENTRIES: usize = 128;

/// Times readdirplus asks again for the metadata of a reply's first entry
/// that is still unknown after its wait, before sending it with
/// attributes that grant nothing.
const PLUS_FIRST_RETRIES: usize = 3;

/// Everything the core needs to know about a mount.
#[derive(Clone, Debug)]
pub struct FsConfig {
    /// Key prefix shown as the root ("" or ending with `/`).
    pub root_prefix: String,
    pub defaults: Defaults,
    /// Permissions of the mount root (default: `defaults.dir_perm`).
    pub root_perm: Option<u16>,
    /// How long attributes and listings are trusted.
    pub metadata_ttl: Duration,
    pub read_only: bool,
    /// Where dirty files are staged.
    pub staging_dir: PathBuf,
    pub block_size_bytes: u64,
    pub mem_cache_bytes: u64,
    /// Where cached blocks are kept on disk, and how many bytes at most
    /// (0 = no disk tier).
    pub disk_cache_dir: PathBuf,
    pub disk_cache_bytes: u64,
    /// Read-ahead grows up to this many blocks per handle.
    pub readahead_max_blocks: u64,
    /// Read-ahead in flight across every handle, in bytes (None: half of
    /// `mem_cache_bytes`).
    pub readahead_budget_bytes: Option<u64>,
    pub upload: UploadOptions,
    /// Longest wait between background retries of a failed upload.
    pub upload_retry_max: Duration,
    /// close() leaves the upload to the background (`writeback=async`).
    pub writeback_async: bool,
    /// Whether readdir lists `.versions`.
    pub versions_visible: bool,
    /// Show the bucket as it was at this moment (read-only).
    pub as_of: Option<SystemTime>,
    /// Whether objects' `x-amz-meta-*` mode, owner and mtime are used.
    /// Off: every object has the mount's uid, gid and umask, chmod and
    /// chown fail with EPERM, and a listing needs no HEAD per entry.
    pub object_metadata: bool,
    /// The encryption and storage class the mount's uploads are sent with
    /// (journaled with staged data, for the mount that recovers it).
    pub written_with: crate::write::WrittenWith,
}

impl Default for FsConfig {
    fn default() -> Self {
        FsConfig {
            root_prefix: String::new(),
            defaults: Defaults {
                uid: 0,
                gid: 0,
                file_perm: 0o644,
                dir_perm: 0o755,
                dir_mtime: SystemTime::now(),
            },
            root_perm: None,
            metadata_ttl: Duration::from_secs(5),
            read_only: false,
            staging_dir: std::env::temp_dir().join("bucketfs-staging"),
            block_size_bytes: 1024 * 1024,
            mem_cache_bytes: 64 * 1024 * 1024,
            disk_cache_dir: std::env::temp_dir().join("bucketfs-blocks"),
            disk_cache_bytes: 0,
            readahead_max_blocks: 32,
            readahead_budget_bytes: None,
            upload: UploadOptions {
                part_size_bytes: 8 * 1024 * 1024,
                concurrency: 8,
            },
            upload_retry_max: Duration::from_secs(300),
            writeback_async: false,
            versions_visible: false,
            as_of: None,
            object_metadata: true,
            written_with: Default::default(),
        }
    }
}

/// The core's errors; `error.rs` maps each to an errno.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FsError {
    NotFound,
    Exists,
    NotEmpty,
    NotDir,
    IsDir,
    NameTooLong,
    /// A name that cannot be a key component (`.`, `..`, not UTF-8).
    InvalidName,
    /// An argument that makes no sense (renaming a dir into itself...).
    Invalid,
    ReadOnly,
    NotPermitted,
    NotSupported,
    /// No such extended attribute.
    NoAttr,
    /// A buffer too small for the reply (xattrs).
    Range,
    /// An extended attribute that does not fit in the object's metadata.
    TooBig,
    /// Refused whoever asks: a default ACL on a node that is not a
    /// directory (EACCES, as Linux says).
    AccessDenied,
    BadHandle,
    /// The object changed under an open handle.
    Stale,
    /// A rename between two buckets of an `s3://` mount (or of a bucket
    /// itself): `mv` copies and deletes instead.
    CrossDevice,
    /// A local I/O error (staging file), as an errno.
    Io(i32),
    Store(StoreError),
}

impl From<StoreError> for FsError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => FsError::NotFound,
            StoreError::PreconditionFailed => FsError::Stale,
            e => FsError::Store(e),
        }
    }
}

impl From<WriteError> for FsError {
    fn from(e: WriteError) -> Self {
        match e {
            WriteError::Io(e) => FsError::Io(e.raw_os_error().unwrap_or(libc::EIO)),
            WriteError::Store(e) => e.into(),
        }
    }
}

impl From<std::io::Error> for FsError {
    fn from(e: std::io::Error) -> Self {
        FsError::Io(e.raw_os_error().unwrap_or(libc::EIO))
    }
}

impl std::fmt::Display for FsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FsError::Store(e) => write!(f, "{e}"),
            FsError::Io(n) => write!(f, "{}", std::io::Error::from_raw_os_error(*n)),
            other => write!(f, "{other:?}"),
        }
    }
}

pub type FsResult<T> = Result<T, FsError>;

/// One directory entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub ino: u64,
    pub name: String,
    pub kind: FileKind,
}

/// What `statfs` reports: S3 has no size limit, so a large free size.
#[derive(Clone, Copy, Debug)]
pub struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
}

/// A node's attributes as the core resolved them from the bucket.
struct Resolved {
    attr: Attr,
    object: Option<ObjectInfo>,
    dir_marker: bool,
}

pub struct Fs {
    store: Arc<dyn ObjectStore>,
    cfg: FsConfig,
    table: Arc<Mutex<InodeTable>>,
    handles: Mutex<HashMap<u64, Arc<Handle>>>,
    writes: Arc<Mutex<HashMap<u64, Arc<OpenFile>>>>,
    /// Listed objects' own metadata, read ahead.
    meta: Arc<meta::MetaFetch>,
    /// Directories whose expired entries are being stat'ed, by inode
    /// (`stale_lookup`).
    relists: Mutex<HashMap<u64, meta::Relist>>,
    /// Deletes waiting for the file's last reader (or, failed, for the
    /// retrier), by inode.
    deferred: Mutex<HashMap<u64, files::Deferred>>,
    /// Files an unlink or a rename over them is taking the name from, held
    /// for writing from before it looks for their readers until the table
    /// has detached them (`files::Detaching`); an open meanwhile waits.
    /// With the number of unlinks and renames holding or awaiting it.
    detaching: files::DetachGates,
    /// Namespace lock (see the lock order above).
    ns: tokio::sync::RwLock<()>,
    /// Wakes the background retrier (`spawn_retrier`).
    retry_wake: Arc<tokio::sync::Notify>,
    /// Directories whose new times wait to be stored on their marker
    /// (`dirtimes`), and what wakes the task that stores them.
    dir_times: Mutex<std::collections::HashSet<u64>>,
    dir_times_wake: Arc<tokio::sync::Notify>,
    /// Held while a directory marker's metadata is copied (its times, a
    /// chmod...), so two such copies never interleave. Taken after `ns`.
    marker_meta: tokio::sync::Mutex<()>,
    /// Uploads running now, by inode (for `status`).
    uploads: Mutex<HashMap<u64, Arc<crate::write::Progress>>>,
    /// Files the kernel writes to itself (passthrough), by inode: their
    /// write states own them; `getattr` asks the staged file's size.
    outside: Mutex<HashMap<u64, Arc<crate::write::outside::Outside>>>,
    /// Where names sit in directory streams (`dirs`).
    positions: dirs::Positions,
    /// The latest listing of each directory some handle reads, so a
    /// handle over an older one takes it without a LIST.
    latest: Mutex<HashMap<u64, std::sync::Weak<Listing>>>,
    /// What the kernel may keep of each directory's listing.
    kernel_dirs: kdirs::KernelDirs,
    /// Directory reads answered (readdir and readdirplus), for `status`:
    /// none while the kernel serves a listing it kept.
    pub dir_reads: AtomicU64,
    blocks: Arc<BlockCache>,
    next_fh: AtomicU64,
    odd: OddKeys,
    versions: versions::VersionCache,
    pub started: Instant,
    /// The kernel's id of this mount (`mnt_id` in /proc/PID/fdinfo), 0
    /// until known: tells whether a closing process still holds another
    /// descriptor of a file (`files::caller_holds_another`).
    pub mount_id: AtomicU64,
    /// When this mount started (multipart uploads older than that are not
    /// this mount's).
    pub started_at: SystemTime,
}

/// Directories with expired lookups counted (`Fs::stale_lookup`) beyond
/// which those idle for a TTL are forgotten.
const RELISTS_KEPT: usize = 256;

/// A directory entry with its position in the directory's stream (`dirs`).
pub type Placed = (u64, DirEntry);

/// Entries of an open directory for one reply, or part of one.
pub struct DirPage<T> {
    pub entries: Vec<T>,
    /// When the kernel must be told to drop the listing it keeps of the
    /// directory (`Fs::kernel_dir_expired`), if a timer is to be set.
    pub expire_at: Option<Instant>,
    /// Cut at `DirAsk::max` with entries after it: the reply's next call
    /// goes on past this position (`DirAsk::past`).
    pub more: Option<u64>,
}

/// What `Fs::entries_after` hands out of a handle's listing.
struct Chunk {
    /// The listing index of the first entry.
    from: usize,
    /// Each with its position.
    entries: Vec<Placed>,
    listing: Arc<Listing>,
    /// Where a next call goes on, if entries were left for one.
    more: Option<u64>,
}

/// Which entries of an open directory one call hands out.
///
/// The kernel's reply buffer holds a few dozen to a few hundred entries
/// (4 KiB to 32 KiB), and the kernel asks again for the rest: a call that
/// worked out thousands of entries per reply did most of that work again
/// on every reply (for `ls -l` of 10,000 entries, about 1.6 million entries
/// copied and looked up for 10,000 sent). A reply is filled by calls of
/// `max` entries each, the next going on past the last (`DirPage::more`),
/// until the buffer is full.
#[derive(Clone, Copy, Debug)]
pub struct DirAsk {
    /// The kernel's offset: entries after this position (0: from the
    /// start). Names sharing the position are handed out again.
    pub offset: u64,
    /// A reply's next call: it goes on past every name at `offset`
    /// (the last call handed them all out).
    pub past: bool,
    /// Entries already in the reply from earlier calls.
    pub sent: usize,
    /// Entries at most, but never ending between names of one position.
    pub max: usize,
}

impl DirAsk {
    /// A reply's first call, from the kernel's `offset`.
    pub fn at(offset: u64) -> Self {
        DirAsk {
            offset,
            past: false,
            sent: 0,
            max: DIR_CHUNK_ENTRIES,
        }
    }

    /// A reply's first call, of at most `max` entries.
    pub fn first(offset: u64, max: usize) -> Self {
        DirAsk {
            max,
            ..Self::at(offset)
        }
    }

    /// The same reply's next call, past `position` (a page's `more`),
    /// with `sent` entries in the reply so far.
    pub fn next(self, position: u64, sent: usize) -> Self {
        DirAsk {
            offset: position,
            past: true,
            sent,
            ..self
        }
    }
}

/// What a LIST of a directory found (`Fs::list_dir`).
struct Listed {
    /// Its entries but the leading ones, in position order (`dirs`).
    entries: Vec<DirEntry>,
    pos: Vec<u64>,
    pace: Option<meta::PaceGuard>,
    /// The directory's `entries_gen` these entries show.
    version: u64,
    /// Until when they are this mount's view of it.
    names_until: Option<Instant>,
}

/// A node handed out this recently is never swept (a reply naming it may
/// still be on its way to the kernel).
const SWEEP_GRACE: Duration = Duration::from_secs(60);

/// Nodes dropped by one sweep (or entries of one listing) before freed
/// memory is given back to the system.
const TRIM_AFTER_NODES: usize = 10_000;

/// How the program's allocator gives freed memory back to the system
/// (`set_release_free_memory`); glibc's `malloc_trim` by default.
static RELEASE_FREE_MEMORY: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();

/// Sets how freed memory is given back to the system, for a program whose
/// global allocator is not the C library's.
pub fn set_release_free_memory(f: fn()) {
    let _ = RELEASE_FREE_MEMORY.set(f);
}

/// How the program's allocator purges freed memory in the background
/// (`set_background_purge`); none by default.
static BACKGROUND_PURGE: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();

/// Sets how the program's allocator starts purging freed memory on its
/// own, for a program whose global allocator can.
pub fn set_background_purge(f: fn()) {
    let _ = BACKGROUND_PURGE.set(f);
}

/// Starts the allocator's background purging, if it has one: called by
/// the mount once it runs as the daemon (after the fork into the
/// background, which a thread started earlier would not survive).
pub fn start_background_purge() {
    if let Some(f) = BACKGROUND_PURGE.get() {
        f();
    }
}

/// Moves each time freed memory is given back: each runtime thread that
/// has not given back its own since does so as it next goes idle
/// (`thread_idle`).
static RELEASES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

thread_local! {
    static RELEASED_AT: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Called by each runtime thread as it goes idle: gives back what it
/// holds freed if memory was given back since it last did. The allocator
/// keeps some freed objects per thread, and one such object keeps its
/// whole slab in memory (the dropped nodes' slabs, after a large listing).
pub fn thread_idle() {
    let now = RELEASES.load(std::sync::atomic::Ordering::Relaxed);
    if RELEASED_AT.with(|at| at.replace(now)) != now {
        debug!(now, "freed memory given back by an idle thread");
        release_own_free_memory();
    }
}

/// Hands freed memory back to the system: this thread's now, and every
/// runtime thread's as it next goes idle. Idle runtime threads are woken
/// for it (a few empty tasks, queued from outside the runtime, each
/// wake a parked one).
fn release_free_memory() {
    let now = RELEASES.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
    RELEASED_AT.with(|at| at.set(now));
    crate::store::release_piece_pages();
    release_own_free_memory();
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        let workers = rt.metrics().num_workers();
        let _ = std::thread::Builder::new()
            .name("bucketfs-release".into())
            .spawn(move || {
                for _ in 0..workers {
                    rt.spawn(async {});
                }
            });
    }
}

fn release_own_free_memory() {
    match RELEASE_FREE_MEMORY.get() {
        Some(f) => f(),
        #[cfg(target_env = "gnu")]
        None => unsafe {
            libc::malloc_trim(0);
        },
        #[cfg(not(target_env = "gnu"))]
        None => {}
    }
}

impl Fs {
    pub fn new(store: Arc<dyn ObjectStore>, cfg: FsConfig) -> Fs {
        let mut root = Attr::implicit_dir(ROOT_INO, &cfg.defaults);
        root.perm = cfg.root_perm.unwrap_or(root.perm);
        let table = Arc::new(Mutex::new(InodeTable::new(root)));
        let writes = Arc::new(Mutex::new(HashMap::new()));
        let meta = Arc::new(meta::MetaFetch {
            store: store.clone(),
            table: table.clone(),
            writes: writes.clone(),
            root_prefix: cfg.root_prefix.clone(),
            defaults: cfg.defaults,
            ttl: cfg.metadata_ttl,
            pinned_versions: cfg.as_of.is_some(),
            heads: tokio::sync::Semaphore::new(meta::MAX_HEADS_IN_FLIGHT),
            inflight: Mutex::new(HashMap::new()),
            paces: Mutex::new(HashMap::new()),
            early: Mutex::new(HashMap::new()),
        });
        let mut blocks = BlockCache::new(cfg.block_size_bytes, cfg.mem_cache_bytes)
            .with_disk(&cfg.disk_cache_dir, cfg.disk_cache_bytes);
        if let Some(b) = cfg.readahead_budget_bytes {
            blocks = blocks.with_readahead_budget(b);
        }
        Fs {
            blocks: Arc::new(blocks),
            store,
            table,
            handles: Mutex::new(HashMap::new()),
            writes,
            meta,
            ns: tokio::sync::RwLock::new(()),
            deferred: Mutex::new(HashMap::new()),
            detaching: Mutex::new(HashMap::new()),
            relists: Mutex::new(HashMap::new()),
            retry_wake: Arc::new(tokio::sync::Notify::new()),
            dir_times: Mutex::new(Default::default()),
            dir_times_wake: Arc::new(tokio::sync::Notify::new()),
            marker_meta: tokio::sync::Mutex::new(()),
            uploads: Mutex::new(HashMap::new()),
            outside: Mutex::new(HashMap::new()),
            positions: Default::default(),
            latest: Mutex::new(HashMap::new()),
            kernel_dirs: Default::default(),
            dir_reads: AtomicU64::new(0),
            next_fh: AtomicU64::new(1),
            odd: OddKeys::default(),
            versions: versions::VersionCache::default(),
            started: Instant::now(),
            mount_id: AtomicU64::new(0),
            started_at: SystemTime::now(),
            cfg,
        }
    }

    pub fn config(&self) -> &FsConfig {
        &self.cfg
    }

    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    pub fn block_cache(&self) -> &BlockCache {
        &self.blocks
    }

    fn read_only(&self) -> bool {
        self.cfg.read_only || self.cfg.as_of.is_some()
    }

    /// The attributes of an object: from its own metadata, or, with
    /// `no_object_metadata`, the mount's defaults (type and size only).
    fn attr_of(&self, info: &ObjectInfo, dir_marker: bool) -> Attr {
        if self.cfg.object_metadata {
            return Attr::from_object(0, info, dir_marker, &self.cfg.defaults);
        }
        let bare = ObjectInfo {
            metadata: None,
            ..info.clone()
        };
        Attr::from_object(0, &bare, dir_marker, &self.cfg.defaults)
    }

    /// A new node's attributes as they will read back: with
    /// `no_object_metadata`, the mount's owner and modes.
    fn own_or_defaults(&self, mut a: Attr) -> Attr {
        if !self.cfg.object_metadata {
            let d = &self.cfg.defaults;
            a.uid = d.uid;
            a.gid = d.gid;
            a.perm = if a.kind == FileKind::Dir {
                d.dir_perm
            } else {
                d.file_perm
            };
        }
        a
    }

    /// With `no_object_metadata` there is nowhere to keep a mode, owner or
    /// mtime: chmod and chown fail with EPERM, a time change is a no-op.
    fn without_object_metadata(&self, mut s: SetAttr) -> FsResult<SetAttr> {
        if self.cfg.object_metadata {
            return Ok(s);
        }
        if s.mode.is_some() || s.uid.is_some() || s.gid.is_some() {
            return Err(FsError::NotPermitted);
        }
        s.atime = None;
        s.mtime = None;
        Ok(s)
    }

    /// The attributes of a node whose table entry is fresh: as stored
    /// when its metadata was read, else after reading it (one HEAD).
    async fn own_attr(&self, ino: u64, stored: Attr, known: bool) -> FsResult<Attr> {
        if known || self.has_write_state(ino) {
            return Ok(stored);
        }
        self.meta.attr(ino).await?.ok_or(FsError::NotFound)
    }

    /// The object key of a path under the mount (no leading '/').
    pub fn key_for_path(&self, path: &str) -> String {
        self.key_of(path)
    }

    fn key_of(&self, path: &str) -> String {
        format!("{}{path}", self.cfg.root_prefix)
    }

    /// The prefix under which a directory's children live.
    fn dir_prefix(&self, path: &str) -> String {
        if path.is_empty() {
            self.cfg.root_prefix.clone()
        } else {
            format!("{}{path}/", self.cfg.root_prefix)
        }
    }

    fn fresh_until(&self) -> Option<Instant> {
        Some(Instant::now() + self.cfg.metadata_ttl)
    }

    /// The node key of an inode.
    fn node_key(&self, ino: u64) -> FsResult<NodeKey> {
        self.table
            .lock()
            .get(ino)
            .map(|n| n.key.clone())
            .ok_or(FsError::NotFound)
    }

    /// The path of a directory inode (not a `.versions` node).
    fn dir_path(&self, ino: u64) -> FsResult<String> {
        let t = self.table.lock();
        let n = t.get(ino).ok_or(FsError::NotFound)?;
        match &n.key {
            NodeKey::Path(p) if n.attr.kind == FileKind::Dir => Ok(p.clone()),
            NodeKey::Path(_) => Err(FsError::NotDir),
            _ => Err(FsError::ReadOnly),
        }
    }

    /// Fails with EROFS for nodes nothing may change (read-only mount,
    /// anything under `.versions`).
    pub fn check_writable(&self, ino: u64) -> FsResult<()> {
        match self.node_key(ino)? {
            NodeKey::Path(_) if !self.read_only() => Ok(()),
            _ => Err(FsError::ReadOnly),
        }
    }

    fn has_write_state(&self, ino: u64) -> bool {
        self.writes.lock().contains_key(&ino)
    }

    /// Whether any file has write state (data that may not be in S3 yet).
    pub fn has_pending_writes(&self) -> bool {
        !self.writes.lock().is_empty()
    }

    // ---------------------------------------------------------------- lookup

    /// Looks `name` up in directory `parent`; counts a kernel reference.
    pub async fn lookup(&self, parent: u64, name: &OsStr) -> FsResult<Attr> {
        let name = check_name(name)?;
        // Never while a directory is renamed key by key: its old name
        // would be found (its keys half copied) and come back.
        let _ns = self.ns.read().await;
        let attr = match self.node_key(parent)? {
            NodeKey::Path(dir) if name == VERSIONS_DIR => {
                self.getattr(parent).await?;
                self.versions_root(parent, &dir)?
            }
            NodeKey::Path(dir) => {
                if self.getattr(parent).await?.kind != FileKind::Dir {
                    return Err(FsError::NotDir);
                }
                self.lookup_path(parent, join(&dir, name)).await?
            }
            other => self.versions_lookup(parent, other, name).await?,
        };
        self.table.lock().add_lookup(attr.ino);
        Ok(self.with_links(attr))
    }

    /// The attributes at `path`, from the table while fresh, else from S3.
    async fn lookup_path(&self, parent: u64, path: String) -> FsResult<Attr> {
        check_key(&self.key_of(&path))?;
        let mut relisted = false;
        loop {
            let now = Instant::now();
            let (fresh, expired) = {
                let t = self.table.lock();
                if let Some(ino) = t.find(&NodeKey::Path(path.clone())) {
                    let n = t.get(ino).expect("found");
                    let fresh = (n.is_fresh(now) || self.has_write_state(ino))
                        .then(|| (ino, n.attr.clone(), n.meta_known));
                    (fresh, true)
                } else if t.is_negative(&path, now)
                    || t.get(parent)
                        .and_then(|p| p.listed_until)
                        .is_some_and(|u| now < u)
                {
                    return Err(FsError::NotFound);
                } else {
                    (None, false)
                }
            };
            if let Some((ino, attr, known)) = fresh {
                return self.own_attr(ino, attr, known).await;
            }
            if !expired || relisted || !self.stale_lookup(parent, &path).await {
                return self.refresh_path(parent, path).await;
            }
            relisted = true;
        }
    }

    /// An expired entry `path` of directory `parent` is looked up. After
    /// `meta::RELIST_AFTER` of them within one `metadata_ttl`, the
    /// directory's listing is read again (one lookup does it, the others
    /// wait for it) and its metadata read ahead from `path` on (see
    /// `meta::Relist`). True when a listing was read again meanwhile: the
    /// entry is to be looked for in the table again.
    async fn stale_lookup(&self, parent: u64, path: &str) -> bool {
        let ttl = self.cfg.metadata_ttl;
        if ttl.is_zero() {
            // Nothing stays fresh: every lookup asks S3, as configured.
            return false;
        }
        let running = {
            let mut all = self.relists.lock();
            if all.len() > RELISTS_KEPT {
                // Forget directories with nothing counted or run within the
                // TTL (the map's size is bounded by the stale lookups one
                // TTL sees, each of which costs a request anyway).
                all.retain(|_, r| {
                    r.running.is_some()
                        || [r.since, r.last.map(|(at, _)| at)]
                            .into_iter()
                            .flatten()
                            .any(|t| t.elapsed() < ttl)
                });
            }
            let r = all.entry(parent).or_default();
            match &r.running {
                Some(lock) => Err(lock.clone()),
                None => {
                    let now = Instant::now();
                    if r.since.is_none_or(|t| now.duration_since(t) > ttl) {
                        (r.since, r.stale) = (Some(now), 0);
                    }
                    r.stale += 1;
                    let rested = r
                        .last
                        .is_none_or(|(at, took)| now.duration_since(at) >= ttl.max(took * 4));
                    if r.stale < meta::RELIST_AFTER || !rested {
                        return false;
                    }
                    let lock = Arc::new(tokio::sync::RwLock::new(()));
                    let held = lock.clone().try_write_owned().expect("new");
                    r.running = Some(lock);
                    Ok(held)
                }
            }
        };
        let _held = match running {
            Err(lock) => {
                drop(lock.read().await);
                return true;
            }
            Ok(held) => held,
        };
        let start = Instant::now();
        let dir = match self.table.lock().get(parent).map(|n| n.key.clone()) {
            Some(NodeKey::Path(dir)) => Some(dir),
            _ => None,
        };
        let name = path.rsplit('/').next().unwrap_or(path);
        let listed = match dir {
            Some(dir) => self.list_dir(parent, &dir, 2, Some(name)).await.ok(),
            None => None,
        };
        let mut all = self.relists.lock();
        let r = all.entry(parent).or_default();
        (r.running, r.since, r.stale) = (None, None, 0);
        r.last = Some((Instant::now(), start.elapsed()));
        if let Some(l) = listed {
            debug!(
                parent,
                entries = l.entries.len(),
                from = name,
                "listed again for expired lookups"
            );
            r.pace = l.pace;
        }
        true
    }

    /// Asks S3 about `path` and remembers the answer (or its absence).
    async fn refresh_path(&self, parent: u64, path: String) -> FsResult<Attr> {
        match self.resolve(&path).await? {
            Some(r) => Ok(self.remember(parent, path, r)),
            None => {
                let mut t = self.table.lock();
                // A file created meanwhile by this mount still exists.
                if let Some(ino) = t.find(&NodeKey::Path(path.clone()))
                    && self.has_write_state(ino)
                {
                    return Ok(t.get(ino).expect("found").attr.clone());
                }
                t.remove_path(&path, Instant::now() + self.cfg.metadata_ttl);
                Err(FsError::NotFound)
            }
        }
    }

    fn remember(&self, parent: u64, path: String, r: Resolved) -> Attr {
        let mut t = self.table.lock();
        let fresh = self.fresh_until();
        let ino = t.upsert(NodeKey::Path(path), parent, r.attr, r.object, fresh);
        let n = t.get_mut(ino).expect("just inserted");
        n.dir_marker = r.dir_marker;
        n.attr.clone()
    }

    /// Asks S3 what is at `path`: a file, a directory (a marker or any key
    /// below the prefix), or nothing. A directory wins over a file of the
    /// same name.
    ///
    /// One ListObjectsV2 with the name itself as prefix tells which: the
    /// key `name` is listed first if it exists, then names that sort before
    /// `name/` (`name-1`, `name.bak`), then `name/` as a common prefix. A
    /// missing name costs that one request (file managers probe `.Trash`,
    /// `.hidden`... in every folder); a HEAD follows only for the metadata
    /// of what is there.
    async fn resolve(&self, path: &str) -> FsResult<Option<Resolved>> {
        if self.cfg.as_of.is_some() {
            return self.resolve_as_of(path).await;
        }
        let key = self.key_of(path);
        let prefix = format!("{key}/");
        // A name this mount last saw as a file (its entry expired: `ls -l`
        // stats what it listed a while ago) is most likely one still: its
        // HEAD goes beside the LIST, one round trip instead of two.
        let was_file = self.cfg.object_metadata && {
            let t = self.table.lock();
            t.find(&NodeKey::Path(path.to_string()))
                .and_then(|i| t.get(i))
                .is_some_and(|n| n.attr.kind != FileKind::Dir && n.object.is_some())
        };
        let head = async {
            if was_file {
                Some(self.store.head(&key, None).await)
            } else {
                None
            }
        };
        let (page, head) = futures::join!(
            self.store
                .list(&key, Some("/"), None, Some(LOOKUP_LIST_KEYS)),
            head
        );
        let page = page?;
        // The HEAD counts only if it saw the object the LIST lists.
        let head = head.and_then(Result::ok);
        let is_dir = page.prefixes.contains(&prefix);
        let file = page.objects.iter().find(|o| o.key == key).cloned();
        // Past the page's last name, `name/` could still come: the answer
        // holds only if the listing ended, or reached past `name/`.
        let conclusive = is_dir
            || page.next_token.is_none()
            || page
                .objects
                .iter()
                .map(|o| o.key.as_str())
                .chain(page.prefixes.iter().map(String::as_str))
                .any(|k| k > prefix.as_str());
        if !conclusive {
            // Over LOOKUP_LIST_KEYS names sort between `name` and `name/`:
            // ask about the directory directly.
            let list = self.store.list(&prefix, Some("/"), None, Some(1)).await?;
            if !list.objects.is_empty() || !list.prefixes.is_empty() {
                return self.resolve_dir(&prefix, file).await.map(Some);
            }
            return self.resolve_file(file, head).await;
        }
        if is_dir {
            return self.resolve_dir(&prefix, file).await.map(Some);
        }
        self.resolve_file(file, head).await
    }

    /// A directory at `prefix`: its marker's metadata if it has one.
    async fn resolve_dir(&self, prefix: &str, file: Option<ObjectInfo>) -> FsResult<Resolved> {
        if let Some(info) = &file {
            self.odd
                .skipped(&info.key, "a directory of the same name hides this file");
        }
        match self.store.head(prefix, None).await {
            Ok(info) => Ok(Resolved {
                attr: self.attr_of(&info, true),
                object: Some(info),
                dir_marker: true,
            }),
            Err(StoreError::NotFound) => Ok(Resolved {
                attr: Attr::implicit_dir(0, &self.cfg.defaults),
                object: None,
                dir_marker: false,
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// A file listed at its key (or none): its own metadata is one HEAD
    /// (`head`, when made already and of that very object), unless the
    /// mount keeps none (`no_object_metadata`).
    async fn resolve_file(
        &self,
        listed: Option<ObjectInfo>,
        head: Option<ObjectInfo>,
    ) -> FsResult<Option<Resolved>> {
        let Some(listed) = listed else {
            return Ok(None);
        };
        let info = if self.cfg.object_metadata {
            match head.filter(|h| h.etag == listed.etag) {
                Some(info) => info,
                None => match self.store.head(&listed.key, None).await {
                    Ok(info) => info,
                    Err(StoreError::NotFound) => return Ok(None),
                    Err(e) => return Err(e.into()),
                },
            }
        } else {
            listed
        };
        if self.is_deferred(&info.key, &info.etag) {
            return Ok(None);
        }
        Ok(Some(Resolved {
            attr: self.attr_of(&info, false),
            object: Some(info),
            dir_marker: false,
        }))
    }

    /// How long the kernel may keep an inode's attributes: what is left of
    /// their freshness, so nothing read from S3 is trusted longer than
    /// `metadata_ttl` after it was read (handed out with a full TTL, a mode
    /// read almost a TTL ago was kept by the kernel for nearly two). A
    /// file this mount is writing, the root and versions get the TTL.
    pub fn kernel_ttl(&self, ino: u64) -> Duration {
        let ttl = self.cfg.metadata_ttl;
        if ino == ROOT_INO || self.has_write_state(ino) {
            return ttl;
        }
        let t = self.table.lock();
        match t.get(ino).and_then(|n| n.fresh_until) {
            Some(until) => until.saturating_duration_since(Instant::now()).min(ttl),
            None => ttl,
        }
    }

    /// `getattr` when no request is needed (the root, a file with write
    /// state, attributes read from the object and still fresh), so the
    /// FUSE thread can answer it without a task. `None`: ask `getattr`.
    pub fn getattr_cached(&self, ino: u64) -> Option<Attr> {
        let writing = self.has_write_state(ino);
        let a = {
            let t = self.table.lock();
            let n = t.get(ino)?;
            if let NodeKey::Versions(dir) = &n.key {
                let (parent, dir) = (n.parent, dir.clone());
                drop(t);
                return self.versions_root(parent, &dir).ok();
            }
            (ino == ROOT_INO || writing || (n.meta_known && n.is_fresh(Instant::now())))
                .then(|| n.attr.clone())?
        };
        // with_links takes the table lock itself.
        Some(self.with_links(a))
    }

    /// Current attributes of an inode, with its link count.
    pub async fn getattr(&self, ino: u64) -> FsResult<Attr> {
        self.stored_attr(ino).await.map(|a| self.with_links(a))
    }

    /// The links of a node, as far as this mount knows them: a directory
    /// has 2 plus one per subdirectory when its whole listing is in the
    /// table (else 2, as for a directory nobody counted); a file 1, or 0
    /// once unlinked (still open). S3 has no hard links.
    pub(super) fn with_links(&self, mut a: Attr) -> Attr {
        self.outside_attr(&mut a);
        let t = self.table.lock();
        let Some(n) = t.get(a.ino) else {
            return a;
        };
        a.nlink = match (&n.key, a.kind) {
            (NodeKey::Detached(_), _) => 0,
            (NodeKey::Path(_), FileKind::Dir)
                if n.listed_until.is_some_and(|u| Instant::now() < u) =>
            {
                2u32.saturating_add(t.subdirs(a.ino))
            }
            (_, FileKind::Dir) => 2,
            _ => 1,
        };
        a
    }

    /// The attributes of an inode as the table or S3 has them.
    async fn stored_attr(&self, ino: u64) -> FsResult<Attr> {
        let (key, parent, fresh, attr, known) = {
            let t = self.table.lock();
            let n = t.get(ino).ok_or(FsError::NotFound)?;
            (
                n.key.clone(),
                n.parent,
                n.is_fresh(Instant::now()),
                n.attr.clone(),
                n.meta_known,
            )
        };
        if ino == ROOT_INO || self.has_write_state(ino) {
            return Ok(attr);
        }
        // `DIR/.versions` takes DIR's owner and mode as they are now.
        if let NodeKey::Versions(dir) = &key {
            return self.versions_root(parent, dir);
        }
        if fresh {
            return self.own_attr(ino, attr, known).await;
        }
        match key {
            NodeKey::Path(path) => self.refresh_path(parent, path).await,
            // `DIR/.versions/NAME` takes NAME's owner and mode as they are.
            NodeKey::VersionsOf(path) => self.versions_of_attr(parent, path).await,
            // A detached node whose metadata was never read grants nothing
            // (`MetaFetch::known`), never the listing's defaults.
            _ => self.own_attr(ino, attr, known).await,
        }
    }

    pub fn forget(&self, ino: u64, n: u64) {
        let pinned = self.has_write_state(ino);
        let mut t = self.table.lock();
        t.forget(ino, n, pinned);
        // What the kernel forgot and no listing keeps goes, now and then.
        t.sweep_if_due(SWEEP_GRACE.max(self.cfg.metadata_ttl), |i| {
            self.has_write_state(i)
        });
    }

    /// Drops what the kernel forgot and no listing keeps, if no sweep ran
    /// for a grace period (called now and then by the background task).
    pub fn sweep_stale(&self) {
        let dropped = self
            .table
            .lock()
            .sweep_stale(SWEEP_GRACE.max(self.cfg.metadata_ttl), |i| {
                self.has_write_state(i)
            });
        if dropped >= TRIM_AFTER_NODES {
            debug!(dropped, "inode table swept");
            // The nodes were many small allocations: hand the freed pages
            // back to the system, not only to the allocator.
            release_free_memory();
        }
    }

    // ------------------------------------------------------------- listing

    /// Every entry of a directory: ".", ".." (and ".versions") first,
    /// then the rest by name (in the `.versions` tree, newest first).
    pub async fn list(&self, ino: u64) -> FsResult<Vec<DirEntry>> {
        let l = self.list_paced(ino).await?.0;
        let mut entries = l.entries.clone();
        if l.version.is_some() {
            entries[l.lead..].sort_by(|a, b| a.name.cmp(&b.name));
        }
        Ok(entries)
    }

    /// `.`, `..` (and `.versions`) of directory `ino`, and its key.
    fn lead_entries(&self, ino: u64) -> FsResult<(Vec<DirEntry>, NodeKey)> {
        let (key, parent) = {
            let t = self.table.lock();
            let n = t.get(ino).ok_or(FsError::NotFound)?;
            if n.attr.kind != FileKind::Dir {
                return Err(FsError::NotDir);
            }
            (n.key.clone(), n.parent)
        };
        let mut lead = vec![
            DirEntry {
                ino,
                name: ".".into(),
                kind: FileKind::Dir,
            },
            DirEntry {
                ino: parent,
                name: "..".into(),
                kind: FileKind::Dir,
            },
        ];
        if let NodeKey::Path(dir) = &key
            && self.cfg.versions_visible
        {
            let a = self.versions_root(ino, dir)?;
            lead.push(DirEntry {
                ino: a.ino,
                name: VERSIONS_DIR.into(),
                kind: FileKind::Dir,
            });
        }
        Ok((lead, key))
    }

    /// A listing of directory `ino` for a handle, with what paces its
    /// metadata pass (`meta`): the holder of the guard reads the entries.
    /// Within `metadata_ttl` of the last LIST it is the one the table
    /// holds when that has every entry fresh (`listing_held`). It becomes
    /// the directory's latest (`latest`).
    async fn list_paced(&self, ino: u64) -> FsResult<(Arc<Listing>, Option<meta::PaceGuard>)> {
        let _ns = self.ns.read().await;
        let (lead, key) = self.lead_entries(ino)?;
        if let Some(l) = self.table_listing(ino, &lead, &key) {
            return Ok((l, None));
        }
        let lead_n = lead.len();
        let (listing, pace) = match key {
            NodeKey::Path(dir) => {
                let l = self.list_dir(ino, &dir, lead_n, None).await?;
                let rest = (l.entries, l.pos);
                let listing = Listing::new(lead, rest, l.names_until, false, Some(l.version));
                (listing, l.pace)
            }
            other => {
                // Versions newest first: a listing that never changes
                // under its handles keeps its order, positions its indexes.
                let rest = self.versions_list(ino, other).await?;
                let pos = (lead_n as u64 + 1..).take(rest.len()).collect();
                (Listing::new(lead, (rest, pos), None, false, None), None)
            }
        };
        Ok((self.keep_latest(ino, listing), pace))
    }

    /// The listing of directory `ino` the table holds (`listing_held`),
    /// made the directory's latest; `None`: it holds none.
    fn held_listing(&self, ino: u64) -> FsResult<Option<Arc<Listing>>> {
        let (lead, key) = self.lead_entries(ino)?;
        Ok(self.table_listing(ino, &lead, &key))
    }

    /// The same, with the directory's leading entries and key.
    fn table_listing(&self, ino: u64, lead: &[DirEntry], key: &NodeKey) -> Option<Arc<Listing>> {
        let NodeKey::Path(dir) = key else {
            return None;
        };
        if self.cfg.as_of.is_some() {
            return None;
        }
        let (rest, version, names_until) = self.listing_held(ino)?;
        debug!(dir, entries = rest.len(), "listing held");
        let rest = self.positions.order(rest);
        let listing = Listing::new(lead.to_vec(), rest, names_until, true, Some(version));
        Some(self.keep_latest(ino, listing))
    }

    /// `listing` is the latest of directory `ino`.
    fn keep_latest(&self, ino: u64, listing: Listing) -> Arc<Listing> {
        let listing = Arc::new(listing);
        if listing.version.is_some() {
            let mut latest = self.latest.lock();
            latest.insert(ino, Arc::downgrade(&listing));
            // Listings no handle reads any more go as the map grows.
            if latest.len() >= 64 && latest.len().is_power_of_two() {
                latest.retain(|_, l| l.strong_count() > 0);
            }
        }
        listing
    }

    /// Lists a directory with ListObjectsV2 (`/` delimiter, paginated) and
    /// remembers each child's attributes, so `stat` after `readdir` needs
    /// no request.
    /// `before`: entries the caller lists ahead of these (`.`, `..`...),
    /// so that listing positions pace the metadata pass.
    /// `again_from`: the listing is read again for expired lookups
    /// (`stale_lookup`): its metadata pass starts at that name. (Every
    /// listing reads again the metadata of the entries whose metadata
    /// expired, even of objects that kept their ETag.)
    async fn list_dir(
        &self,
        ino: u64,
        dir: &str,
        before: usize,
        again_from: Option<&str>,
    ) -> FsResult<Listed> {
        let prefix = self.dir_prefix(dir);
        // What this mount changed in the directory while the LIST ran (a
        // file whose upload landed after its page was read) may be missing
        // from what it finds: such a listing is never current.
        let before_list = self.table.lock().get(ino).map(|n| n.entries_gen);
        let list_started = Instant::now();
        let mut early = self.meta.early_batch();
        let (files, dirs) = if self.cfg.as_of.is_some() {
            self.list_as_of(&prefix).await?
        } else {
            let mut files = Vec::new();
            let mut dirs = Vec::new();
            let mut token = None;
            loop {
                // The metadata pass starts once every page is in: the
                // reader's first entries (by position) may be on the last.
                // Meanwhile the HEADs of a window of objects (in LIST
                // order) run beside the next pages' LISTs: `ls -l` needs
                // them all, and `ls -f` reads at most a window more.
                // (A window of entries, known or not: listing again reads
                // none of the window a listing before read.)
                let page = self.store.list(&prefix, Some("/"), token, None).await?;
                let early_left = meta::METADATA_AHEAD.saturating_sub(files.len() + dirs.len());
                if page.next_token.is_some()
                    && early_left > 0
                    && again_from.is_none()
                    && self.cfg.object_metadata
                    && !self.cfg.metadata_ttl.is_zero()
                {
                    let upto = page.objects.len().min(early_left);
                    let keys = self.metadata_unknown(dir, &prefix, &page.objects[..upto]);
                    self.meta.head_early(&mut early, keys);
                }
                files.extend(page.objects);
                dirs.extend(page.prefixes);
                token = page.next_token;
                if token.is_none() {
                    break;
                }
            }
            (files, dirs)
        };
        let mut dir_names: HashMap<String, ()> = HashMap::new();
        for p in &dirs {
            let name = &p[prefix.len()..p.len() - 1];
            if showable(name) {
                dir_names.insert(name.to_string(), ());
            } else {
                self.odd.skipped(p, "not a valid directory name");
            }
        }
        let now = Instant::now();
        let now_fresh = self.fresh_until();
        let d = self.cfg.defaults;
        let mut out = Vec::with_capacity(files.len() + dir_names.len());
        // Entries whose metadata is read ahead, in listing order.
        let mut unknown = Vec::new();
        // Nodes an early HEAD's answer goes to.
        let mut early_inos = Vec::new();
        let mut t = self.table.lock();
        let changed_meanwhile = t.get(ino).map(|n| n.entries_gen) != before_list;
        let writes = self.writes.lock();
        for o in files {
            let name = o.key[prefix.len()..].to_string();
            let name = name.as_str();
            if name.is_empty() {
                continue; // this directory's own marker
            }
            if !showable(name) {
                self.odd.skipped(&o.key, "not a valid file name");
                continue;
            }
            if self.is_deferred(&o.key, &o.etag) {
                continue; // removed, waiting for its last reader
            }
            if dir_names.contains_key(name) {
                self.odd
                    .skipped(&o.key, "a directory of the same name hides this file");
                continue;
            }
            let path = join(dir, name);
            let existing = t.find(&NodeKey::Path(path.clone()));
            if let Some(i) = existing.filter(|i| writes.contains_key(i)) {
                let kind = t.get(i).expect("found").attr.kind;
                out.push(DirEntry {
                    ino: i,
                    name: name.to_string(),
                    kind,
                });
                continue;
            }
            // Metadata read by HEAD is kept with its own expiry.
            let kept = existing
                .and_then(|i| t.get(i))
                .filter(|n| n.holds_metadata_of(&o, now))
                .and_then(|n| Some((n.object.clone()?, n.fresh_until)));
            let meta_known = kept.is_some() || !self.cfg.object_metadata;
            // Of an early HEAD: whether the node holds fresh metadata, read
            // since (a lookup) or newer than this LIST's page: the early
            // answer may be older.
            let early_key = early.has(&o.key).then(|| {
                let read_meanwhile = existing
                    .and_then(|i| t.get(i))
                    .is_some_and(|n| n.meta_known && n.is_fresh(now));
                (o.key.clone(), read_meanwhile)
            });
            let (info, fresh) = kept.unwrap_or((o, now_fresh));
            let attr = self.attr_of(&info, false);
            let kind = attr.kind;
            let i = t.upsert(NodeKey::Path(path), ino, attr, Some(info), fresh);
            if let Some((key, read_meanwhile)) = early_key
                && let Some(n) = t.get(i)
            {
                let trusted = !changed_meanwhile && !read_meanwhile;
                if early.settle(&key, (i, n.generation), trusted) {
                    early_inos.push(i);
                }
            }
            if !meta_known && let Some(n) = t.get_mut(i) {
                n.meta_known = false;
                unknown.push(i);
            }
            out.push(DirEntry {
                ino: i,
                name: name.to_string(),
                kind,
            });
        }
        for name in dir_names.into_keys() {
            let path = join(dir, &name);
            let i = match t.find(&NodeKey::Path(path.clone())) {
                Some(i) if t.get(i).is_some_and(|n| n.attr.kind == FileKind::Dir) => {
                    if let Some(n) = t.get_mut(i) {
                        if !self.cfg.object_metadata {
                            n.fresh_until = n.fresh_until.max(now_fresh);
                        } else if !n.is_fresh(now) {
                            // Its marker's metadata (a mode, an owner)
                            // expired: read again before it is handed out.
                            n.fresh_until = now_fresh;
                            n.meta_known = false;
                            unknown.push(i);
                        }
                    }
                    i
                }
                _ => {
                    let i = t.upsert(
                        NodeKey::Path(path),
                        ino,
                        Attr::implicit_dir(0, &d),
                        None,
                        now_fresh,
                    );
                    // Its `dir/` marker, if any, may carry a mode.
                    if self.cfg.object_metadata
                        && let Some(n) = t.get_mut(i)
                    {
                        n.meta_known = false;
                        unknown.push(i);
                    }
                    i
                }
            };
            out.push(DirEntry {
                ino: i,
                name,
                kind: FileKind::Dir,
            });
        }
        // Files this mount created that are not uploaded yet, or whose
        // upload landed after the LIST began (it may have read their page
        // before).
        let listed: std::collections::HashSet<u64> = out.iter().map(|e| e.ino).collect();
        for (path, n) in t.children_of(ino) {
            let ours =
                writes.contains_key(&n.attr.ino) || n.landed.is_some_and(|at| at >= list_started);
            if ours && !listed.contains(&n.attr.ino) {
                let name = path.rsplit('/').next().unwrap_or(path).to_string();
                out.push(DirEntry {
                    ino: n.attr.ino,
                    name,
                    kind: n.attr.kind,
                });
            }
        }
        // A LIST read it: handles over older listings take this one.
        t.touch_dir(ino);
        let (version, names_until) = match t.get_mut(ino) {
            Some(n) => {
                n.listed_until = now_fresh;
                (n.entries_gen, n.listed_until)
            }
            None => (0, None),
        };
        // Older than the directory from the start: its readers list again
        // (or take the table's), and the kernel never keeps what it shows.
        let version = match before_list {
            Some(v) if changed_meanwhile => v,
            _ => version,
        };
        drop(writes);
        drop(t);
        let (out, pos) = self.positions.order(out);
        // Each unknown entry with its index in the listing, in listing
        // order (inodes unique).
        let unknown: std::collections::HashSet<u64> = unknown.into_iter().collect();
        let unknown: Vec<(usize, u64)> = out
            .iter()
            .enumerate()
            .filter(|(_, e)| unknown.contains(&e.ino))
            .map(|(at, e)| (before + at, e.ino))
            .collect();
        // The reader starts at the first entry, or at the one asked for.
        let first = before
            + again_from.map_or(0, |from| {
                let at = (self.positions.of(from), from);
                out.iter()
                    .zip(&pos)
                    .take_while(|(e, p)| (**p, e.name.as_str()) < at)
                    .count()
            });
        self.meta.take_over(early, early_inos);
        let pace = self.meta.prefetch(ino, unknown, first);
        debug!(dir, entries = out.len(), "listed");
        if out.len() >= TRIM_AFTER_NODES {
            // The pages of its LIST responses and transient copies.
            release_free_memory();
        }
        Ok(Listed {
            entries: out,
            pos,
            pace,
            version,
            names_until,
        })
    }

    /// The entries of directory `ino`, sorted, without a request, when the
    /// table holds its whole listing (read less than `metadata_ttl` ago,
    /// with what this mount changed since) and every entry is fresh with
    /// its metadata read, or is being written by this mount: as a lookup
    /// of a name it does not hold is answered without one. `None`: list.
    fn listing_held(&self, ino: u64) -> Option<(Vec<DirEntry>, u64, Option<Instant>)> {
        let now = Instant::now();
        let t = self.table.lock();
        let d = t.get(ino)?;
        if d.listed_until.is_none_or(|u| now >= u) {
            return None;
        }
        let (version, names_until) = (d.entries_gen, d.listed_until);
        let writes = self.writes.lock();
        let mut out = Vec::new();
        for (path, n) in t.children_of(ino) {
            let held = n.is_fresh(now) && (n.meta_known || !self.cfg.object_metadata);
            if !held && !writes.contains_key(&n.attr.ino) {
                return None;
            }
            out.push(DirEntry {
                ino: n.attr.ino,
                name: path.rsplit('/').next().unwrap_or(path).to_string(),
                kind: n.attr.kind,
            });
        }
        Some((out, version, names_until))
    }

    /// The keys of `objects` (a page of directory `dir`'s listing, below
    /// `prefix`) whose metadata the table does not hold, each with the
    /// node at its path now, if any.
    fn metadata_unknown(
        &self,
        dir: &str,
        prefix: &str,
        objects: &[ObjectInfo],
    ) -> Vec<(String, meta::Stamp)> {
        let now = Instant::now();
        let t = self.table.lock();
        objects
            .iter()
            .filter_map(|o| {
                let name = &o.key[prefix.len().min(o.key.len())..];
                if name.is_empty() || !showable(name) {
                    return None;
                }
                let node = t
                    .find(&NodeKey::Path(join(dir, name)))
                    .and_then(|i| Some((i, t.get(i)?)));
                if node.is_some_and(|(_, n)| n.holds_metadata_of(o, now)) {
                    return None;
                }
                Some((o.key.clone(), node.map(|(i, n)| (i, n.generation))))
            })
            .collect()
    }

    /// Marks directory `dir`, its listing and every entry below it
    /// expired, as `metadata_ttl` passing would (for tests, whose request
    /// counts must not depend on the machine's speed).
    #[doc(hidden)]
    pub fn expire_below(&self, dir: &str) {
        let mut t = self.table.lock();
        t.expire_below(dir);
        if let Some(n) = t
            .find(&NodeKey::Path(dir.into()))
            .and_then(|i| t.get_mut(i))
        {
            n.fresh_until = Some(Instant::now());
            n.listed_until = None;
        }
    }

    /// Has the listing of directory `dir` expire in `left` (zero: now),
    /// not its entries, as if it had been read longer ago (for tests).
    #[doc(hidden)]
    pub fn listing_expires_in(&self, dir: &str, left: Duration) {
        let mut t = self.table.lock();
        if let Some(n) = t
            .find(&NodeKey::Path(dir.into()))
            .and_then(|i| t.get_mut(i))
        {
            n.listed_until = Some(Instant::now() + left);
        }
    }

    pub fn statfs(&self) -> StatFs {
        Self::statfs_any()
    }

    /// What `statfs` reports, the same for every mount.
    pub fn statfs_any() -> StatFs {
        const BLOCK: u32 = 4096;
        let blocks = (1u64 << 50) / u64::from(BLOCK);
        StatFs {
            blocks,
            bfree: blocks,
            files: 1 << 32,
            ffree: 1 << 32,
            bsize: BLOCK,
            namelen: names::MAX_NAME_BYTES as u32,
        }
    }

    /// Opens a directory handle over a listing of its entries.
    pub async fn opendir(&self, ino: u64) -> FsResult<u64> {
        let (listing, pace) = self.list_paced(ino).await?;
        Ok(self.new_handle(Handle::Dir(DirHandle::new(ino, listing, pace))))
    }

    /// What the kernel may keep of directory `ino`, just opened as `fh`
    /// (`kdirs`): asked once, before the open's reply.
    pub fn kernel_dir(&self, ino: u64, fh: u64) -> KernelDir {
        let Ok(h) = self.handle(fh) else {
            return KernelDir::default();
        };
        let Handle::Dir(d) = &*h else {
            return KernelDir::default();
        };
        let l = &d.listing;
        let k = self
            .kernel_dirs
            .opened(ino, fh, l.version, l.names_until, l.held);
        d.kernel_keeps
            .store(k.cache, std::sync::atomic::Ordering::Relaxed);
        k
    }

    /// `entries` of `listing`, read through handle `h`, are about to be
    /// sent to the kernel (told before they are, so an open meanwhile
    /// knows).
    fn page<T>(
        &self,
        h: &Handle,
        listing: &Listing,
        entries: Vec<T>,
        more: Option<u64>,
    ) -> DirPage<T> {
        let expire_at = match h {
            Handle::Dir(d) if d.kernel_keeps.load(std::sync::atomic::Ordering::Relaxed) => self
                .kernel_dirs
                .served(d.dir, listing.version, listing.names_until),
            _ => None,
        };
        DirPage {
            entries,
            expire_at,
            more,
        }
    }

    /// Whether the kernel must drop the listing of directory `ino` now.
    pub fn kernel_dir_expired(&self, ino: u64) -> bool {
        self.kernel_dirs.expired(ino)
    }

    /// Handle `fh` over a listing of its directory no older than its
    /// directory (`dirs`): one this mount changed, or listed again, since
    /// the handle's listing was taken has the handle take the latest
    /// listing, or the one the table holds. `Ok(None)`: neither is
    /// current, the directory must be listed (`relist_handle`).
    fn dir_handle_now(&self, fh: u64) -> FsResult<Option<Arc<Handle>>> {
        let h = self.handle(fh)?;
        let Handle::Dir(d) = &*h else {
            return Err(FsError::BadHandle);
        };
        let Some(version) = d.listing.version else {
            return Ok(Some(h));
        };
        let Some(now) = self.table.lock().get(d.dir).map(|n| n.entries_gen) else {
            // Gone from the table: nothing newer to take.
            return Ok(Some(h));
        };
        if version == now {
            return Ok(Some(h));
        }
        let latest = self
            .latest
            .lock()
            .get(&d.dir)
            .and_then(std::sync::Weak::upgrade)
            .filter(|l| l.version == Some(now));
        let listing = match latest {
            Some(l) => l,
            None => match self.held_listing(d.dir)? {
                Some(l) => l,
                None => return Ok(None),
            },
        };
        Ok(self.replace_listing(fh, listing, None))
    }

    /// Handle `fh` of directory `dir` over a current listing
    /// (`dir_handle_now`), listing the directory if need be.
    async fn dir_handle_listed(&self, dir: u64, fh: u64) -> FsResult<Arc<Handle>> {
        match self.dir_handle_now(fh)? {
            Some(h) => Ok(h),
            // What a change meanwhile moves on is taken at the next read.
            None => self.relist_handle(dir, fh).await,
        }
    }

    /// Handle `fh` over `listing` from now on (`pace`: the listing's, if
    /// it has one); `None`: released meanwhile.
    fn replace_listing(
        &self,
        fh: u64,
        listing: Arc<Listing>,
        pace: Option<meta::PaceGuard>,
    ) -> Option<Arc<Handle>> {
        let mut handles = self.handles.lock();
        let h = handles.get_mut(&fh)?;
        let Handle::Dir(d) = &**h else {
            return None;
        };
        *h = Arc::new(Handle::Dir(d.with_listing(listing, pace)));
        Some(h.clone())
    }

    /// Handle `fh` of directory `dir` takes a new listing (a LIST unless
    /// the table holds one).
    async fn relist_handle(&self, dir: u64, fh: u64) -> FsResult<Arc<Handle>> {
        let (listing, pace) = self.list_paced(dir).await?;
        self.replace_listing(fh, listing, pace)
            .ok_or(FsError::BadHandle)
    }

    /// A directory handle read from offset 0 again (`rewinddir`) takes a
    /// new listing, as an `opendir` would: POSIX has a rewound stream
    /// show the directory as it is now (within `metadata_ttl`, this
    /// mount's listing, as for `opendir`).
    async fn rewind(&self, ino: u64, fh: u64) -> FsResult<()> {
        let rewound = match self.handles.lock().get(&fh).map(|h| &**h) {
            Some(Handle::Dir(d)) => d.read.load(std::sync::atomic::Ordering::Relaxed),
            _ => return Err(FsError::BadHandle),
        };
        if rewound {
            self.relist_handle(ino, fh).await?;
        }
        Ok(())
    }

    /// Entries of an open directory after position `offset` (0: from the
    /// start), each with its position; `None`: the directory changed
    /// since the handle's listing and must be listed first
    /// (`readdir_listed`).
    pub fn readdir(&self, fh: u64, ask: DirAsk) -> FsResult<Option<DirPage<Placed>>> {
        let Some(h) = self.dir_handle_now(fh)? else {
            return Ok(None);
        };
        let c = self.entries_after(&h, ask)?;
        Ok(Some(self.page(&h, &c.listing, c.entries, c.more)))
    }

    /// The same, listing the directory again first if need be.
    pub async fn readdir_listed(
        &self,
        dir: u64,
        fh: u64,
        ask: DirAsk,
    ) -> FsResult<DirPage<Placed>> {
        let h = self.dir_handle_listed(dir, fh).await?;
        let c = self.entries_after(&h, ask)?;
        Ok(self.page(&h, &c.listing, c.entries, c.more))
    }

    /// Entries of handle `h` that `ask` asks for.
    fn entries_after(&self, h: &Handle, ask: DirAsk) -> FsResult<Chunk> {
        let Handle::Dir(d) = h else {
            return Err(FsError::BadHandle);
        };
        d.read.store(true, std::sync::atomic::Ordering::Relaxed);
        if !ask.past {
            self.dir_reads
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let l = &d.listing;
        let from = if ask.past {
            l.resume_past(ask.offset)
        } else {
            l.resume_at(ask.offset)
        };
        let mut to = from.saturating_add(ask.max.max(1)).min(l.entries.len());
        while to > from && to < l.entries.len() && l.pos[to] == l.pos[to - 1] {
            to += 1;
        }
        let out = (from..to)
            .map(|i| (l.pos[i], l.entries[i].clone()))
            .collect();
        Ok(Chunk {
            from,
            entries: out,
            listing: l.clone(),
            more: (to > from && to < l.entries.len()).then(|| l.pos[to - 1]),
        })
    }

    /// Entries of an open directory after position `offset`, with
    /// attributes, for readdirplus: (position, entry, attributes, counted,
    /// own). The caller counts a kernel
    /// lookup (`note_lookup`) for each
    /// entry it sends but `.` and `..`, except those marked counted (looked
    /// up here again because the table had dropped them), which it gives
    /// back with `forget` if they do not fit. Attributes not marked own
    /// were not read from the object (its HEAD failed, or a re-listing
    /// found it changed): they grant nothing, and the caller must not let
    /// the kernel keep them (zero timeouts). Only a reply's first entry is
    /// ever sent so.
    pub async fn readdirplus(
        &self,
        dir_ino: u64,
        fh: u64,
        ask: DirAsk,
    ) -> FsResult<DirPage<(u64, DirEntry, Attr, bool, bool)>> {
        if ask.offset == 0 && !ask.past {
            self.rewind(dir_ino, fh).await?;
        }
        let h = self.dir_handle_listed(dir_ino, fh).await?;
        let Chunk {
            from: at,
            entries,
            listing,
            mut more,
        } = self.entries_after(&h, ask)?;
        // Metadata is read ahead of this reader: of where it asks from, not
        // of where the reply ends (a reply holds every entry known, and the
        // kernel's first call of a plain `ls` is readdirplus: each `ls -f`
        // read a window further than the one before).
        if let Handle::Dir(DirHandle { pace: Some(p), .. }) = &*h {
            p.0.reader_at(at);
        }
        // What a reply hands out is at most `metadata_ttl` old: a handle
        // opened a while ago (read, or rewound, now) has its expired
        // entries' metadata read again first.
        self.expire_metadata(&entries);
        // The reply's first entries wait for their metadata, already being
        // read ahead; the rest go only as far as it is known.
        let waiting = PLUS_WAIT_ENTRIES.saturating_sub(ask.sent);
        let waits: Vec<_> = entries
            .iter()
            .take(waiting)
            .filter(|(_, e)| e.name != "." && e.name != "..")
            .map(|(_, e)| self.meta.attr(e.ino))
            .collect();
        futures::future::join_all(waits).await;
        let mut out = Vec::with_capacity(entries.len());
        for (i, (index, e)) in entries.into_iter().enumerate() {
            let dot = e.name == "." || e.name == "..";
            let mut cached = self.plus_entry(dir_ino, &e, dot);
            // The reply ends at the first entry whose metadata is not read:
            // past the waited ones, still being read; among them, read and
            // then made unknown again (a re-listing met another client's
            // rewrite) or its HEAD failed. The kernel asks again from there.
            // An entry dropped from the table since the listing is looked
            // up again, among the waited ones.
            let ino = e.ino;
            let unknown = |c: &Option<(Attr, bool, bool, bool)>| match c {
                Some((_, known, true, true)) => !known && !self.has_write_state(ino),
                Some(_) => false,
                None => !dot,
            };
            let first = out.is_empty() && ask.sent == 0;
            if unknown(&cached) && !first && (cached.is_some() || i >= waiting) {
                more = None;
                break;
            }
            // The first entry of a reply (an empty reply reads as the end):
            // its metadata is asked for again, a few times while listings
            // make it unknown again; not after a failed HEAD.
            for _ in 0..PLUS_FIRST_RETRIES {
                if cached.is_none() || !unknown(&cached) {
                    break;
                }
                let read = self.meta.attr(e.ino).await;
                cached = self.plus_entry(dir_ino, &e, dot);
                if read.is_err() {
                    break;
                }
            }
            match cached {
                Some((a, known, _, _)) if dot => out.push((index, e, a, false, known)),
                // Still not read: the name goes with attributes that grant
                // nothing and that the kernel does not keep; the kernel's
                // next stat or open waits for the object's own.
                Some((a, _, true, _)) if unknown(&cached) => {
                    let a = Attr::granting_nothing(&a);
                    out.push((index, e, a, false, false))
                }
                Some((a, known, true, _)) => {
                    let own = known || self.has_write_state(e.ino);
                    out.push((index, e, a, false, own))
                }
                // Gone since the listing (its HEAD found nothing).
                Some((_, _, false, _)) => {}
                None if dot => {
                    let a = Attr::implicit_dir(e.ino, &self.cfg.defaults);
                    out.push((index, e, a, false, true));
                }
                // Dropped from the table since the listing: look it up again.
                None => match self.lookup(dir_ino, OsStr::new(&e.name)).await {
                    Ok(a) => out.push((index, DirEntry { ino: a.ino, ..e }, a, true, true)),
                    Err(FsError::NotFound) => {}
                    Err(err) => return Err(err),
                },
            }
        }
        let out = out
            .into_iter()
            .map(|(i, e, a, counted, own)| (i, e, self.with_links(a), counted, own))
            .collect();
        Ok(self.page(&h, &listing, out, more))
    }

    /// Marks the metadata of those of `entries` whose metadata expired as
    /// not read, so it is read again (a HEAD each) before it is handed out
    /// (another client's chmod keeps the object's ETag: only a HEAD tells).
    fn expire_metadata(&self, entries: &[Placed]) {
        if !self.cfg.object_metadata {
            return;
        }
        let now = Instant::now();
        let mut t = self.table.lock();
        let writes = self.writes.lock();
        for (_, e) in entries
            .iter()
            .filter(|(_, e)| e.name != "." && e.name != "..")
        {
            if let Some(n) = t.get_mut(e.ino)
                && matches!(n.key, NodeKey::Path(_))
                && e.ino != ROOT_INO
                && n.meta_known
                && !n.is_fresh(now)
                && !writes.contains_key(&e.ino)
            {
                n.meta_known = false;
            }
        }
    }

    /// What the table says of a readdirplus entry: (attributes, metadata
    /// read, still at this name, a path node); `None`: not in the table.
    fn plus_entry(
        &self,
        dir_ino: u64,
        e: &DirEntry,
        dot: bool,
    ) -> Option<(Attr, bool, bool, bool)> {
        let t = self.table.lock();
        t.get(e.ino).map(|n| {
            // Still at this very name: since the listing the node may have
            // been renamed, or unlinked while open, and the kernel links
            // the name it is given to the inode (an `O_TRUNC` open of the
            // old name would then truncate the renamed file).
            let mapped = match &n.key {
                NodeKey::Path(p) => {
                    t.find(&n.key) == Some(e.ino)
                        && (dot
                            || (n.parent == dir_ino
                                && p.rsplit('/').next() == Some(e.name.as_str())))
                }
                NodeKey::Detached(_) => dot,
                _ => true,
            };
            let path = matches!(n.key, NodeKey::Path(_));
            (n.attr.clone(), n.meta_known, mapped, path)
        })
    }

    /// The kernel got a reference to an inode (a readdirplus entry).
    pub fn note_lookup(&self, ino: u64) {
        self.table.lock().add_lookup(ino);
    }

    pub fn releasedir(&self, fh: u64) {
        let h = self.handles.lock().remove(&fh);
        if let Some(Handle::Dir(d)) = h.as_deref()
            && d.kernel_keeps.load(std::sync::atomic::Ordering::Relaxed)
        {
            self.kernel_dirs.released(d.dir, fh);
        }
    }
}
