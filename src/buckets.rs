//! What a mount shows: one bucket (the core, `Fs`, as it is), or for an
//! `s3://` mount every bucket of the account as a top-level directory,
//! each served by a core of its own.
//!
//! This is the thin layer between the FUSE adapter and the core. For an
//! `s3://` mount it owns the top level (ListBuckets, mkdir as
//! CreateBucket, rmdir as DeleteBucket) and maps the kernel's inode and
//! handle numbers to a bucket's core and that core's own numbers:
//!
//! ```text
//!   global = slot << SLOT_SHIFT | local       (slot >= 1: a bucket)
//!   global = 1                                (the top level)
//! ```
//!
//! A bucket gets a slot the first time its name is seen (a listing, a
//! lookup, a mkdir) and keeps it for the life of the mount; a slot is never
//! reused, not even after the bucket was removed, so no two objects ever
//! share a number. Each bucket's core (its store, inode table, caches,
//! write-back, journals and staging directory: the same one a mount of
//! that bucket alone uses) is created on first use. Everything inside a
//! bucket is the core's business, unchanged; a rename between two
//! buckets is EXDEV. With one bucket the numbers are the core's own.
//!
//! Staged data of a killed mount is recovered per bucket (each bucket's
//! staging directory is named by a hash of endpoint, bucket and SSE-C key,
//! if any, so data can only ever go back to the bucket it was written for,
//! under the key it was written with): at mount for
//! every listed bucket whose staging directory holds something, and when
//! any other bucket's core is created.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use tracing::{error, info, warn};

use crate::cache::block::CacheStats;
use crate::fs::inodes::ROOT_INO;
use crate::fs::names::check_name;
use crate::fs::{
    Attr, Creator, Defaults, DirAsk, DirEntry, DirPage, FileKind, Fs, FsConfig, FsError, FsResult,
    KernelDir, PendingFile, Placed, SetAttr, StatFs,
};
use crate::store::{Account, Op, StoreError};

/// Bits of a global number that are a bucket core's own number.
const SLOT_SHIFT: u32 = 44;
const LOCAL_MASK: u64 = (1 << SLOT_SHIFT) - 1;
/// Slots there are room for (slot 0 is the top level).
const MAX_SLOTS: u64 = 1 << (64 - SLOT_SHIFT);

/// What the kernel sees of a bucket core: its slot (0 when the mount is
/// one bucket, and the numbers are the core's own).
#[derive(Clone, Copy, Debug)]
struct Ids {
    slot: u64,
}

impl Ids {
    fn global(self, local: u64) -> FsResult<u64> {
        if self.slot == 0 {
            return Ok(local);
        }
        if local > LOCAL_MASK {
            // 17 trillion numbers in one bucket's core: never in practice,
            // but never a number that collides either.
            error!(
                slot = self.slot,
                local, "inode or handle number out of the bucket's range"
            );
            return Err(FsError::Io(libc::EOVERFLOW));
        }
        Ok(self.slot << SLOT_SHIFT | local)
    }

    fn attr(self, mut a: Attr) -> FsResult<Attr> {
        a.ino = self.global(a.ino)?;
        Ok(a)
    }

    /// A directory entry of directory `dir` (a local number): the `..`
    /// of a bucket's root is the top level.
    fn entry(self, dir: u64, mut e: DirEntry) -> FsResult<DirEntry> {
        e.ino = if self.slot != 0 && dir == ROOT_INO && e.name == ".." {
            ROOT_INO
        } else {
            self.global(e.ino)?
        };
        Ok(e)
    }
}

/// Splits a global number of an `s3://` mount into slot and local number.
fn split(global: u64) -> (u64, u64) {
    (global >> SLOT_SHIFT, global & LOCAL_MASK)
}

/// Where a number leads.
enum At {
    /// The top level of an `s3://` mount.
    Top,
    Bucket(Arc<Fs>, Ids, u64),
}

/// Makes the core's configuration of a bucket.
pub type ConfigFor = Box<dyn Fn(&str) -> FsConfig + Send + Sync>;

/// How the top level of an `s3://` mount looks and behaves.
pub struct TopConfig {
    /// Owner and modes of the top level and of each bucket's root.
    pub defaults: Defaults,
    /// Mode of the top level (`mp_umask`).
    pub root_perm: Option<u16>,
    /// How long the list of buckets is trusted.
    pub ttl: Duration,
    pub read_only: bool,
    /// Read block size of every bucket (`block_size`).
    pub block_size: u64,
}

/// One bucket of an `s3://` mount.
struct Slot {
    name: String,
    /// Its core, once used.
    fs: Arc<tokio::sync::OnceCell<Arc<Fs>>>,
}

#[derive(Default)]
struct AllState {
    /// Current slot of each bucket name.
    by_name: HashMap<String, u64>,
    /// Every slot handed out, by number (removed buckets' too, so their
    /// numbers stay theirs); `None` once its bucket was removed.
    slots: HashMap<u64, Option<Slot>>,
    next_slot: u64,
    /// The last ListBuckets and when it was made.
    listed: Option<(Instant, Vec<String>)>,
    /// Names found to be no bucket one can reach, until when.
    missing: HashMap<String, Instant>,
    /// Open handles of the top level: its entries.
    handles: HashMap<u64, Vec<DirEntry>>,
    next_fh: u64,
}

/// Every bucket of an account.
struct All {
    account: Arc<dyn Account>,
    config_for: ConfigFor,
    top: TopConfig,
    state: Mutex<AllState>,
}

enum Inner {
    One(Arc<Fs>),
    All(Box<All>),
}

/// What the FUSE adapter talks to: one bucket, or all of them.
pub struct Buckets {
    inner: Inner,
    /// The kernel's id of this mount (see `Fs::mount_id`), for cores made
    /// after it was known.
    mount_id: AtomicU64,
    pub started: Instant,
    ttl: Duration,
    /// Read block size of the mount's buckets (`block_size`).
    block_size: u64,
}

/// The name rules S3 gives new buckets (general purpose buckets): 3 to 63
/// lowercase letters, digits, dots and hyphens, starting and ending with a
/// letter or digit, not shaped like an IP address.
pub fn valid_bucket_name(name: &str) -> bool {
    let b = name.as_bytes();
    (3..=63).contains(&b.len())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'.' || *c == b'-')
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && !name.contains("..")
        && name.parse::<std::net::Ipv4Addr>().is_err()
}

/// Starts a bucket core's background work: uploads retried, directory
/// times stored, and what a killed mount staged for this bucket taken
/// over (served at once, uploaded in the background; what cannot be
/// looked at yet is tried again later). Runs on the tokio runtime.
pub async fn start_core(fs: &Arc<Fs>) {
    fs.spawn_retrier();
    fs.spawn_dir_times();
    let cfg = fs.config();
    if cfg.read_only || cfg.as_of.is_some() {
        return;
    }
    if recover_staged(fs).await {
        let (fs, retry_max) = (fs.clone(), cfg.upload_retry_max);
        tokio::spawn(async move {
            let mut wait = Duration::from_secs(5);
            loop {
                tokio::time::sleep(wait).await;
                if !recover_staged(&fs).await {
                    return;
                }
                wait = (wait * 2).min(retry_max);
            }
        });
    }
}

/// Takes over what killed daemons left staged (served from the staged
/// copies, uploaded in the background); logs each. Returns whether
/// anything is left to try again.
async fn recover_staged(fs: &Fs) -> bool {
    let mut failed = false;
    for r in fs.adopt_staged().await {
        match r {
            Ok(r) if r.uploaded_as.is_empty() => {
                info!(key = %r.key, "staged data of a killed mount: nothing to upload (unlinked, or already in S3)")
            }
            Ok(r) if r.uploaded_as == r.key => {
                info!(key = %r.key, "recovered staged data of a killed mount; uploading it in the background")
            }
            Ok(r) => warn!(
                key = %r.key,
                uploaded_as = %r.uploaded_as,
                incomplete = r.incomplete,
                "recovered staged data of a killed mount; the object had changed since, so it was kept beside it"
            ),
            Err(e) => {
                failed = true;
                error!(error = %e, "could not recover staged data yet; will try again")
            }
        }
    }
    failed
}

impl Buckets {
    /// A mount of one bucket (its core started already).
    pub fn one(fs: Arc<Fs>) -> Buckets {
        let ttl = fs.config().metadata_ttl;
        let block_size = fs.config().block_size_bytes;
        Buckets {
            inner: Inner::One(fs),
            mount_id: AtomicU64::new(0),
            started: Instant::now(),
            ttl,
            block_size,
        }
    }

    /// A mount of every bucket of `account`.
    pub fn all(account: Arc<dyn Account>, config_for: ConfigFor, top: TopConfig) -> Buckets {
        let (ttl, block_size) = (top.ttl, top.block_size);
        Buckets {
            inner: Inner::All(Box::new(All {
                account,
                config_for,
                top,
                state: Mutex::new(AllState {
                    next_slot: 1,
                    next_fh: 1,
                    ..Default::default()
                }),
            })),
            mount_id: AtomicU64::new(0),
            started: Instant::now(),
            ttl,
            block_size,
        }
    }

    /// Read block size of the mount's buckets (`block_size`).
    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    /// Whether this is an `s3://` mount of every bucket.
    pub fn is_all(&self) -> bool {
        matches!(self.inner, Inner::All(_))
    }

    /// The kernel's id of the mount, once known.
    pub fn set_mount_id(&self, id: u64) {
        self.mount_id.store(id, Ordering::Relaxed);
        for fs in self.cores() {
            fs.mount_id.store(id, Ordering::Relaxed);
        }
    }

    /// Every bucket core made so far, with its bucket's name ("" for a
    /// mount of one bucket).
    fn named_cores(&self) -> Vec<(String, Arc<Fs>)> {
        match &self.inner {
            Inner::One(fs) => vec![(String::new(), fs.clone())],
            Inner::All(all) => {
                let st = all.state.lock();
                let mut v: Vec<(String, Arc<Fs>)> = st
                    .slots
                    .values()
                    .flatten()
                    .filter_map(|s| Some((s.name.clone(), s.fs.get()?.clone())))
                    .collect();
                v.sort_by(|a, b| a.0.cmp(&b.0));
                v
            }
        }
    }

    fn cores(&self) -> Vec<Arc<Fs>> {
        self.named_cores().into_iter().map(|(_, f)| f).collect()
    }

    // ------------------------------------------------------------ routing

    /// Where an inode number leads; a bucket's core is made on first use.
    async fn at(&self, ino: u64) -> FsResult<At> {
        match &self.inner {
            Inner::One(fs) => Ok(At::Bucket(fs.clone(), Ids { slot: 0 }, ino)),
            Inner::All(all) => {
                if ino == ROOT_INO {
                    return Ok(At::Top);
                }
                let (slot, local) = split(ino);
                let fs = self.core(all, slot).await?;
                Ok(At::Bucket(fs, Ids { slot }, local))
            }
        }
    }

    /// The core behind an inode number, if made already (no I/O).
    fn at_now(&self, ino: u64) -> Option<At> {
        match &self.inner {
            Inner::One(fs) => Some(At::Bucket(fs.clone(), Ids { slot: 0 }, ino)),
            Inner::All(all) => {
                if ino == ROOT_INO {
                    return Some(At::Top);
                }
                let (slot, local) = split(ino);
                let st = all.state.lock();
                let fs = st.slots.get(&slot)?.as_ref()?.fs.get()?.clone();
                Some(At::Bucket(fs, Ids { slot }, local))
            }
        }
    }

    /// The core of a handle and the core's own handle number; `None` for a
    /// handle of the top level.
    fn handle(&self, fh: u64) -> FsResult<Option<(Arc<Fs>, Ids, u64)>> {
        match self.at_now(fh) {
            // Handle numbers are split as inode numbers are; slot 0 is the
            // top level's.
            Some(At::Bucket(fs, ids, local)) => Ok(Some((fs, ids, local))),
            Some(At::Top) => Ok(None),
            None if matches!(self.inner, Inner::All(_)) && split(fh).0 == 0 => Ok(None),
            None => Err(FsError::BadHandle),
        }
    }

    /// The core of the bucket in `slot`, made on first use.
    async fn core(&self, all: &All, slot: u64) -> FsResult<Arc<Fs>> {
        let (name, cell) = {
            let st = all.state.lock();
            match st.slots.get(&slot) {
                Some(Some(s)) => (s.name.clone(), s.fs.clone()),
                _ => return Err(FsError::NotFound),
            }
        };
        cell.get_or_try_init(|| self.open_core(all, &name))
            .await
            .cloned()
    }

    /// Makes and starts the core of bucket `name`.
    async fn open_core(&self, all: &All, name: &str) -> FsResult<Arc<Fs>> {
        let store = match all.account.open_bucket(name).await {
            Ok(s) => s,
            Err(StoreError::NoSuchBucket) => return Err(FsError::NotFound),
            Err(e) => return Err(e.into()),
        };
        let cfg = (all.config_for)(name);
        crate::private::create_private_dir(&cfg.staging_dir)?;
        let fs = Arc::new(Fs::new(store, cfg));
        fs.mount_id
            .store(self.mount_id.load(Ordering::Relaxed), Ordering::Relaxed);
        start_core(&fs).await;
        info!(bucket = name, "bucket opened");
        Ok(fs)
    }

    /// The slot of bucket `name`, given one if it has none yet.
    fn slot_for(all: &All, name: &str) -> FsResult<u64> {
        let mut st = all.state.lock();
        if let Some(s) = st.by_name.get(name) {
            return Ok(*s);
        }
        let slot = st.next_slot;
        if slot >= MAX_SLOTS {
            error!(
                bucket = name,
                "no slot left for another bucket in this mount"
            );
            return Err(FsError::Io(libc::ENOSPC));
        }
        st.next_slot += 1;
        st.by_name.insert(name.to_string(), slot);
        st.slots.insert(
            slot,
            Some(Slot {
                name: name.to_string(),
                fs: Arc::new(tokio::sync::OnceCell::new()),
            }),
        );
        Ok(slot)
    }

    /// The account's buckets, from a ListBuckets at most `ttl` old.
    async fn bucket_names(&self, all: &All) -> FsResult<Vec<String>> {
        {
            let st = all.state.lock();
            if let Some((at, names)) = &st.listed
                && at.elapsed() < all.top.ttl
            {
                return Ok(names.clone());
            }
        }
        let names = all.account.list_buckets().await?;
        all.state.lock().listed = Some((Instant::now(), names.clone()));
        Ok(names)
    }

    /// The attributes of the top level.
    fn top_attr(all: &All) -> Attr {
        let mut a = Attr::implicit_dir(ROOT_INO, &all.top.defaults);
        a.perm = all.top.root_perm.unwrap_or(a.perm);
        a
    }

    /// A bucket's root as the top level lists it (its core's root before
    /// anything changed it).
    fn bucket_attr(all: &All, ino: u64) -> Attr {
        Attr::implicit_dir(ino, &all.top.defaults)
    }

    /// A bucket of the top level, by name: listed by ListBuckets, or
    /// (another account's, a name one may reach without listing it)
    /// reachable. Its core is made here.
    async fn lookup_bucket(&self, all: &All, name: &OsStr) -> FsResult<Attr> {
        let name = check_name(name)?;
        let listed = self.bucket_names(all).await?;
        // A listed bucket may have a name S3 no longer gives new ones
        // (upper case, underscores: old us-east-1 buckets).
        if !listed.iter().any(|n| n == name) {
            if !valid_bucket_name(name) {
                return Err(FsError::NotFound);
            }
            let mut st = all.state.lock();
            if st
                .missing
                .get(name)
                .is_some_and(|until| Instant::now() < *until)
            {
                return Err(FsError::NotFound);
            }
            st.missing.remove(name);
        }
        let slot = Self::slot_for(all, name)?;
        let opened = all
            .state
            .lock()
            .slots
            .get(&slot)
            .and_then(|s| s.as_ref()?.fs.get().cloned());
        let fs = match opened {
            // Not listed (any more): made on first use, or asked whether it
            // is still there (another client may have removed it).
            Some(fs) if !listed.iter().any(|n| n == name) => {
                match fs.store().check_bucket().await {
                    Ok(()) => Ok(fs),
                    Err(StoreError::NoSuchBucket) => Err(FsError::NotFound),
                    Err(e) => Err(e.into()),
                }
            }
            Some(fs) => Ok(fs),
            None => self.core(all, slot).await,
        };
        let fs = match fs {
            Err(FsError::NotFound) => {
                let mut st = all.state.lock();
                st.missing
                    .insert(name.to_string(), Instant::now() + all.top.ttl);
                return Err(FsError::NotFound);
            }
            r => r?,
        };
        let a = fs.getattr(ROOT_INO).await?;
        Ids { slot }.attr(a)
    }

    /// The top level's entries: `.`, `..` and every listed bucket.
    async fn list_top(&self, all: &All) -> FsResult<Vec<DirEntry>> {
        let names = self.bucket_names(all).await?;
        let mut out = vec![
            DirEntry {
                ino: ROOT_INO,
                name: ".".into(),
                kind: FileKind::Dir,
            },
            DirEntry {
                ino: ROOT_INO,
                name: "..".into(),
                kind: FileKind::Dir,
            },
        ];
        for name in names {
            // A name the kernel could not take as one entry is not shown.
            if check_name(OsStr::new(&name)).is_err() {
                continue;
            }
            let slot = Self::slot_for(all, &name)?;
            out.push(DirEntry {
                ino: Ids { slot }.global(ROOT_INO)?,
                name,
                kind: FileKind::Dir,
            });
        }
        Ok(out)
    }

    async fn mkdir_bucket(&self, all: &All, name: &OsStr) -> FsResult<Attr> {
        let name = check_name(name)?;
        if all.top.read_only {
            return Err(FsError::ReadOnly);
        }
        if !valid_bucket_name(name) {
            warn!(
                name,
                "not a valid bucket name: 3 to 63 lowercase letters, digits, dots and hyphens, starting and ending with a letter or digit"
            );
            return Err(FsError::InvalidName);
        }
        all.account.create_bucket(name).await?;
        info!(bucket = name, "bucket created");
        {
            let mut st = all.state.lock();
            st.missing.remove(name);
            if let Some((_, names)) = &mut st.listed
                && !names.iter().any(|n| n == name)
            {
                names.push(name.to_string());
                names.sort();
            }
        }
        let slot = Self::slot_for(all, name)?;
        let fs = self.core(all, slot).await?;
        let a = fs.getattr(ROOT_INO).await?;
        Ids { slot }.attr(a)
    }

    async fn rmdir_bucket(&self, all: &All, name: &OsStr) -> FsResult<()> {
        let name = check_name(name)?;
        if all.top.read_only {
            return Err(FsError::ReadOnly);
        }
        let slot = all.state.lock().by_name.get(name).copied();
        // Files of it not in S3 yet make it not empty, whatever S3 says.
        if let Some(slot) = slot {
            let cell = all
                .state
                .lock()
                .slots
                .get(&slot)
                .and_then(|s| s.as_ref().map(|s| s.fs.clone()));
            if let Some(fs) = cell.as_ref().and_then(|c| c.get())
                && fs.has_pending_writes()
            {
                return Err(FsError::NotEmpty);
            }
        }
        match all.account.delete_bucket(name).await {
            Ok(()) => {}
            Err(StoreError::NoSuchBucket) => return Err(FsError::NotFound),
            Err(e) => return Err(e.into()),
        }
        info!(bucket = name, "bucket removed");
        let mut st = all.state.lock();
        if let Some(slot) = st.by_name.remove(name) {
            let gone = st.slots.insert(slot, None).flatten();
            if let Some(fs) = gone.as_ref().and_then(|s| s.fs.get()) {
                let _ = std::fs::remove_dir(&fs.config().staging_dir);
            }
        }
        if let Some((_, names)) = &mut st.listed {
            names.retain(|n| n != name);
        }
        Ok(())
    }

    /// Takes over, at mount, what a killed mount staged for any bucket of
    /// the account: each listed bucket whose staging directory holds
    /// something gets its core now (which recovers it). Staging
    /// directories of no listed bucket are left alone.
    pub async fn recover_all(&self) -> FsResult<()> {
        let Inner::All(all) = &self.inner else {
            return Ok(());
        };
        if all.top.read_only {
            return Ok(());
        }
        for name in self.bucket_names(all).await? {
            let dir = (all.config_for)(&name).staging_dir;
            let has_files = std::fs::read_dir(&dir).is_ok_and(|mut d| d.next().is_some());
            if !has_files {
                continue;
            }
            let slot = Self::slot_for(all, &name)?;
            if let Err(e) = self.core(all, slot).await {
                error!(bucket = %name, error = %e, "cannot open the bucket to recover what a killed mount staged; will try when it is used");
            }
        }
        Ok(())
    }

    // ------------------------------------------------------ the operations

    pub async fn lookup(&self, parent: u64, name: &OsStr) -> FsResult<Attr> {
        match self.at(parent).await? {
            At::Top => match &self.inner {
                Inner::All(all) => self.lookup_bucket(all, name).await,
                Inner::One(_) => Err(FsError::NotFound),
            },
            At::Bucket(fs, ids, p) => ids.attr(fs.lookup(p, name).await?),
        }
    }

    pub fn forget(&self, ino: u64, n: u64) {
        if let Some(At::Bucket(fs, _, local)) = self.at_now(ino) {
            fs.forget(local, n);
        }
    }

    /// How long the kernel may keep an inode's attributes (and its name's
    /// link to it): what is left of their freshness.
    pub fn kernel_ttl(&self, ino: u64) -> Duration {
        match self.at_now(ino) {
            Some(At::Bucket(fs, _, local)) => fs.kernel_ttl(local),
            _ => self.ttl,
        }
    }

    pub fn getattr_cached(&self, ino: u64) -> Option<Attr> {
        match (self.at_now(ino)?, &self.inner) {
            (At::Top, Inner::All(all)) => Some(Self::top_attr(all)),
            (At::Top, Inner::One(_)) => None,
            (At::Bucket(fs, ids, local), _) => ids.attr(fs.getattr_cached(local)?).ok(),
        }
    }

    pub async fn getattr(&self, ino: u64) -> FsResult<Attr> {
        match (self.at(ino).await?, &self.inner) {
            (At::Top, Inner::All(all)) => Ok(Self::top_attr(all)),
            (At::Top, Inner::One(_)) => Err(FsError::NotFound),
            (At::Bucket(fs, ids, local), _) => ids.attr(fs.getattr(local).await?),
        }
    }

    pub async fn setattr(&self, ino: u64, mut s: SetAttr) -> FsResult<Attr> {
        match (self.at(ino).await?, &self.inner) {
            (At::Top, Inner::All(all)) => {
                if s.size.is_some() {
                    return Err(FsError::IsDir);
                }
                if s.mode.is_some() || s.uid.is_some() || s.gid.is_some() {
                    return Err(FsError::NotPermitted);
                }
                // A time change of the top level (`touch MOUNTPOINT`) is
                // accepted and not kept.
                Ok(Self::top_attr(all))
            }
            (At::Top, Inner::One(_)) => Err(FsError::NotFound),
            (At::Bucket(fs, ids, local), _) => {
                s.fh = match s.fh.map(|fh| self.handle(fh)) {
                    Some(Ok(Some((_, _, local_fh)))) => Some(local_fh),
                    _ => None,
                };
                ids.attr(fs.setattr(local, s).await?)
            }
        }
    }

    /// `DIR/.versions` of directory `ino`, if its core holds it: its
    /// attributes follow DIR's, so the kernel must drop them with DIR's.
    pub fn versions_changed(&self, ino: u64) -> Option<u64> {
        match self.at_now(ino)? {
            At::Top => None,
            At::Bucket(fs, ids, local) => ids.global(fs.versions_changed(local)?).ok(),
        }
    }

    pub async fn readlink(&self, ino: u64) -> FsResult<String> {
        match self.at(ino).await? {
            At::Top => Err(FsError::Invalid),
            At::Bucket(fs, _, local) => fs.readlink(local).await,
        }
    }

    /// Nothing but buckets lives at the top level: EPERM.
    pub async fn create(
        &self,
        parent: u64,
        name: &OsStr,
        c: Creator,
        flags: i32,
    ) -> FsResult<(Attr, u64)> {
        match self.at(parent).await? {
            At::Top => Err(FsError::NotPermitted),
            At::Bucket(fs, ids, p) => {
                let (a, fh) = fs.create(p, name, c, flags).await?;
                Ok((ids.attr(a)?, ids.global(fh)?))
            }
        }
    }

    pub async fn mknod(&self, parent: u64, name: &OsStr, c: Creator, rdev: u32) -> FsResult<Attr> {
        match self.at(parent).await? {
            At::Top => Err(FsError::NotPermitted),
            At::Bucket(fs, ids, p) => ids.attr(fs.mknod(p, name, c, rdev).await?),
        }
    }

    pub async fn mkdir(&self, parent: u64, name: &OsStr, c: Creator) -> FsResult<Attr> {
        match (self.at(parent).await?, &self.inner) {
            (At::Top, Inner::All(all)) => self.mkdir_bucket(all, name).await,
            (At::Top, Inner::One(_)) => Err(FsError::NotFound),
            (At::Bucket(fs, ids, p), _) => ids.attr(fs.mkdir(p, name, c).await?),
        }
    }

    pub async fn symlink(
        &self,
        parent: u64,
        name: &OsStr,
        target: &str,
        c: Creator,
    ) -> FsResult<Attr> {
        match self.at(parent).await? {
            At::Top => Err(FsError::NotPermitted),
            At::Bucket(fs, ids, p) => ids.attr(fs.symlink(p, name, target, c).await?),
        }
    }

    pub async fn unlink(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        match self.at(parent).await? {
            At::Top => Err(FsError::NotPermitted),
            At::Bucket(fs, _, p) => fs.unlink(p, name).await,
        }
    }

    pub async fn rmdir(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        match (self.at(parent).await?, &self.inner) {
            (At::Top, Inner::All(all)) => self.rmdir_bucket(all, name).await,
            (At::Top, Inner::One(_)) => Err(FsError::NotFound),
            (At::Bucket(fs, _, p), _) => fs.rmdir(p, name).await,
        }
    }

    /// A rename within one bucket is the core's; anything else (between
    /// buckets, or of a bucket itself) is EXDEV, so `mv` copies.
    pub async fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        noreplace: bool,
    ) -> FsResult<()> {
        let (from, to) = (self.at(parent).await?, self.at(newparent).await?);
        match (from, to) {
            (At::Bucket(fs, a, p), At::Bucket(_, b, np)) if a.slot == b.slot => {
                fs.rename(p, name, np, newname, noreplace).await
            }
            _ => Err(FsError::CrossDevice),
        }
    }

    pub async fn open(&self, ino: u64, flags: i32) -> FsResult<u64> {
        match self.at(ino).await? {
            At::Top => Err(FsError::IsDir),
            At::Bucket(fs, ids, local) => ids.global(fs.open(local, flags).await?),
        }
    }

    pub fn set_opener(&self, fh: u64, tgid: u32) {
        if let Ok(Some((fs, _, fh))) = self.handle(fh) {
            fs.set_opener(fh, tgid);
        }
    }

    pub async fn read(&self, fh: u64, offset: u64, size: u32) -> FsResult<Bytes> {
        match self.handle(fh)? {
            Some((fs, _, fh)) => fs.read(fh, offset, size).await,
            None => Err(FsError::IsDir),
        }
    }

    pub fn read_now(&self, fh: u64, offset: u64, size: u32) -> Option<FsResult<Bytes>> {
        match self.handle(fh) {
            Ok(Some((fs, _, fh))) => fs.read_now(fh, offset, size),
            Ok(None) => Some(Err(FsError::IsDir)),
            Err(e) => Some(Err(e)),
        }
    }

    pub fn note_writer(&self, fh: u64, pid: u32) {
        if let Ok(Some((fs, _, fh))) = self.handle(fh) {
            fs.note_writer(fh, pid);
        }
    }

    /// `Fs::open_outside` of handle `fh`.
    pub async fn open_outside(&self, fh: u64, grant: impl FnOnce(&std::fs::File) -> bool) -> bool {
        match self.handle(fh) {
            Ok(Some((fs, _, fh))) => fs.open_outside(fh, grant).await,
            _ => false,
        }
    }

    /// `Fs::end_outside` of inode `ino`.
    pub async fn end_outside(&self, ino: u64, still_open: impl Fn() -> bool) {
        if let Some(At::Bucket(fs, _, local)) = self.at_now(ino) {
            fs.end_outside(local, still_open).await;
        }
    }

    pub fn write_now(&self, fh: u64, offset: u64, data: &[u8]) -> Option<FsResult<u32>> {
        match self.handle(fh) {
            Ok(Some((fs, _, fh))) => fs.write_now(fh, offset, data),
            Ok(None) => Some(Err(FsError::IsDir)),
            Err(e) => Some(Err(e)),
        }
    }

    pub async fn write(&self, fh: u64, offset: u64, data: &[u8]) -> FsResult<u32> {
        match self.handle(fh)? {
            Some((fs, _, fh)) => fs.write(fh, offset, data).await,
            None => Err(FsError::IsDir),
        }
    }

    pub fn last_writer(&self, fh: u64) -> Option<u32> {
        let (fs, _, fh) = self.handle(fh).ok()??;
        fs.last_writer(fh)
    }

    pub async fn flush_from(
        &self,
        fh: u64,
        closer: Option<u32>,
        writer: Option<u32>,
    ) -> FsResult<()> {
        match self.handle(fh)? {
            Some((fs, _, fh)) => fs.flush_from(fh, closer, writer).await,
            None => Ok(()),
        }
    }

    pub async fn release(&self, fh: u64) -> FsResult<()> {
        match self.handle(fh)? {
            Some((fs, _, fh)) => fs.release(fh).await,
            None => Ok(()),
        }
    }

    pub async fn fsync(&self, fh: u64) -> FsResult<()> {
        match self.handle(fh)? {
            Some((fs, _, fh)) => fs.fsync(fh).await,
            None => Ok(()),
        }
    }

    pub async fn opendir(&self, ino: u64) -> FsResult<u64> {
        match (self.at(ino).await?, &self.inner) {
            (At::Top, Inner::All(all)) => {
                let entries = self.list_top(all).await?;
                let mut st = all.state.lock();
                let fh = st.next_fh;
                st.next_fh += 1;
                st.handles.insert(fh, entries);
                Ok(fh)
            }
            (At::Top, Inner::One(_)) => Err(FsError::NotFound),
            (At::Bucket(fs, ids, local), _) => ids.global(fs.opendir(local).await?),
        }
    }

    /// Entries of an open directory (`ino`) after position `offset`, each
    /// with its position; `None`: it must be listed first
    /// (`readdir_listed`).
    pub fn readdir(&self, ino: u64, fh: u64, ask: DirAsk) -> FsResult<Option<DirPage<Placed>>> {
        match (self.handle(fh)?, &self.inner) {
            (None, Inner::All(all)) => Ok(Some(Self::top_entries(all, fh, ask)?)),
            (None, Inner::One(_)) => Err(FsError::BadHandle),
            (Some((fs, ids, fh)), _) => {
                let dir = split_local(ids, ino);
                fs.readdir(fh, ask)?
                    .map(|p| Self::map_page(p, |(o, e)| Ok((o, ids.entry(dir, e)?))))
                    .transpose()
            }
        }
    }

    /// As `readdir`, listing the directory first if need be.
    pub async fn readdir_listed(
        &self,
        ino: u64,
        fh: u64,
        ask: DirAsk,
    ) -> FsResult<DirPage<Placed>> {
        match (self.handle(fh)?, &self.inner) {
            (None, Inner::All(all)) => Self::top_entries(all, fh, ask),
            (None, Inner::One(_)) => Err(FsError::BadHandle),
            (Some((fs, ids, fh)), _) => {
                let dir = split_local(ids, ino);
                let p = fs.readdir_listed(dir, fh, ask).await?;
                Self::map_page(p, |(o, e)| Ok((o, ids.entry(dir, e)?)))
            }
        }
    }

    /// A page with each entry made into another (global inode numbers,
    /// attributes added).
    fn map_page<T, U>(p: DirPage<T>, global: impl Fn(T) -> FsResult<U>) -> FsResult<DirPage<U>> {
        Ok(DirPage {
            entries: p.entries.into_iter().map(global).collect::<FsResult<_>>()?,
            expire_at: p.expire_at,
            more: p.more,
        })
    }

    /// Entries of the top level (every bucket) that `ask` asks for; the
    /// position of each is its index + 1, so "after" and "past" a position
    /// are the same.
    fn top_entries(all: &All, fh: u64, ask: DirAsk) -> FsResult<DirPage<Placed>> {
        let st = all.state.lock();
        let entries = st.handles.get(&fh).ok_or(FsError::BadHandle)?;
        let page: Vec<Placed> = (ask.offset..)
            .zip(entries.iter().skip(ask.offset as usize))
            .take(ask.max.max(1))
            .map(|(i, e)| (i + 1, e.clone()))
            .collect();
        let more = page
            .last()
            .map(|&(p, _)| p)
            .filter(|&p| (p as usize) < entries.len());
        Ok(DirPage {
            entries: page,
            expire_at: None,
            more,
        })
    }

    /// As `Fs::readdirplus`.
    pub async fn readdirplus(
        &self,
        ino: u64,
        fh: u64,
        ask: DirAsk,
    ) -> FsResult<DirPage<(u64, DirEntry, Attr, bool, bool)>> {
        match (self.handle(fh)?, &self.inner) {
            (None, Inner::All(all)) => {
                let page = Self::top_entries(all, fh, ask)?;
                Self::map_page(page, |(o, e)| {
                    let a = if e.ino == ROOT_INO {
                        Self::top_attr(all)
                    } else {
                        // The core's root attributes when it has
                        // any, else what it will start with.
                        self.getattr_cached(e.ino)
                            .unwrap_or_else(|| Self::bucket_attr(all, e.ino))
                    };
                    Ok((o, e, a, false, true))
                })
            }
            (None, Inner::One(_)) => Err(FsError::BadHandle),
            (Some((fs, ids, fh)), _) => {
                let dir = split_local(ids, ino);
                let page = fs.readdirplus(dir, fh, ask).await?;
                Self::map_page(page, |(o, e, a, counted, own)| {
                    Ok((o, ids.entry(dir, e)?, ids.attr(a)?, counted, own))
                })
            }
        }
    }

    /// What the kernel may keep of directory `ino`, just opened as `fh`
    /// (the top level of every bucket: nothing).
    pub fn kernel_dir(&self, ino: u64, fh: u64) -> KernelDir {
        match self.handle(fh) {
            Ok(Some((fs, ids, fh))) => fs.kernel_dir(split_local(ids, ino), fh),
            _ => KernelDir::default(),
        }
    }

    /// As `Fs::kernel_dir_expired`.
    pub fn kernel_dir_expired(&self, ino: u64) -> bool {
        match self.at_now(ino) {
            Some(At::Bucket(fs, _, local)) => fs.kernel_dir_expired(local),
            _ => false,
        }
    }

    /// Directory reads the cores answered (`Fs::dir_reads`).
    pub fn dir_reads(&self) -> u64 {
        self.cores()
            .iter()
            .map(|fs| fs.dir_reads.load(Ordering::Relaxed))
            .sum()
    }

    /// The kernel got a reference to an entry of a readdirplus reply.
    pub fn note_lookup(&self, ino: u64) {
        if let Some(At::Bucket(fs, _, local)) = self.at_now(ino) {
            fs.note_lookup(local);
        }
    }

    pub fn releasedir(&self, fh: u64) {
        match (self.handle(fh), &self.inner) {
            (Ok(Some((fs, _, fh))), _) => fs.releasedir(fh),
            (Ok(None), Inner::All(all)) => {
                all.state.lock().handles.remove(&fh);
            }
            _ => {}
        }
    }

    pub async fn fsyncdir(&self, ino: u64) -> FsResult<()> {
        match self.at(ino).await? {
            At::Top => Ok(()),
            At::Bucket(fs, _, local) => fs.fsyncdir(local).await,
        }
    }

    pub fn statfs(&self) -> StatFs {
        Fs::statfs_any()
    }

    pub async fn set_s3_xattr(&self, ino: u64, name: &str, value: &[u8]) -> FsResult<()> {
        match self.at(ino).await? {
            At::Top => Err(FsError::NotPermitted),
            At::Bucket(fs, _, local) => fs.set_s3_xattr(local, name, value).await,
        }
    }

    pub async fn set_xattr(&self, ino: u64, name: &str, value: &[u8], flags: i32) -> FsResult<()> {
        match self.at(ino).await? {
            At::Top => Err(FsError::NotSupported),
            At::Bucket(fs, _, local) => fs.set_xattr(local, name, value, flags).await,
        }
    }

    pub async fn remove_xattr(&self, ino: u64, name: &str) -> FsResult<()> {
        match self.at(ino).await? {
            At::Top => Err(FsError::NoAttr),
            At::Bucket(fs, _, local) => fs.remove_xattr(local, name).await,
        }
    }

    pub async fn get_xattr(&self, ino: u64, name: &str) -> FsResult<Vec<u8>> {
        match self.at(ino).await? {
            At::Top => Err(FsError::NoAttr),
            At::Bucket(fs, _, local) => fs.get_xattr(local, name).await,
        }
    }

    pub async fn list_xattr(&self, ino: u64) -> FsResult<Vec<String>> {
        match self.at(ino).await? {
            At::Top => Ok(Vec::new()),
            At::Bucket(fs, _, local) => fs.list_xattr(local).await,
        }
    }

    // ------------------------------------------- status, url, shutdown

    /// A presigned GET URL of the file at `path` (relative to the
    /// mountpoint; for an `s3://` mount its first component is the bucket).
    pub async fn presign(&self, path: &str, expires: Duration) -> Result<String, String> {
        match &self.inner {
            Inner::One(fs) => fs.presign(path, expires).await,
            Inner::All(all) => {
                let (bucket, rest) = path
                    .split_once('/')
                    .ok_or_else(|| format!("{path}: a bucket, not a file"))?;
                let slot = Self::slot_for(all, bucket).map_err(|e| format!("{path}: {e}"))?;
                let fs = self
                    .core(all, slot)
                    .await
                    .map_err(|e| format!("{bucket}: {e}"))?;
                fs.presign(rest, expires).await
            }
        }
    }

    /// Files with data not in S3 yet, every bucket's (paths start with
    /// the bucket for an `s3://` mount).
    pub fn dirty_files(&self) -> Vec<PendingFile> {
        let mut out = Vec::new();
        for (name, fs) in self.named_cores() {
            for mut f in fs.dirty_files() {
                if !name.is_empty() {
                    f.path = format!("{name}/{}", f.path);
                }
                out.push(f);
            }
        }
        out
    }

    /// Deferred deletes (of files removed while read) that failed and
    /// are retried: (key, last error).
    pub fn failed_deletes(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (name, fs) in self.named_cores() {
            for (key, e) in fs.failed_deletes() {
                let key = if name.is_empty() {
                    key
                } else {
                    format!("{name}/{key}")
                };
                out.push((key, e));
            }
        }
        out
    }

    /// The buckets whose cores are open (empty for one bucket).
    pub fn open_buckets(&self) -> Vec<String> {
        if !self.is_all() {
            return Vec::new();
        }
        self.named_cores().into_iter().map(|(n, _)| n).collect()
    }

    /// Block cache use, summed over the buckets: (bytes in memory, bytes
    /// on disk, memory hits, disk hits, misses).
    pub fn cache_totals(&self) -> (u64, u64, u64, u64, u64) {
        let mut t = (0, 0, 0, 0, 0);
        for fs in self.cores() {
            let c = fs.block_cache();
            let s: &CacheStats = &c.stats;
            t.0 += c.mem_bytes();
            t.1 += c.disk_bytes();
            t.2 += s.hits.load(Ordering::Relaxed);
            t.3 += s.disk_hits.load(Ordering::Relaxed);
            t.4 += s.misses.load(Ordering::Relaxed);
        }
        t
    }

    /// S3 requests made, by type, summed over the buckets and the account.
    pub fn requests(&self) -> Vec<(Op, u64)> {
        let mut sum: HashMap<Op, u64> = HashMap::new();
        let mut add = |c: &crate::store::Counters| {
            for (op, n) in c.snapshot() {
                *sum.entry(op).or_default() += n;
            }
        };
        for fs in self.cores() {
            add(fs.store().counters());
        }
        if let Inner::All(all) = &self.inner {
            add(all.account.counters());
        }
        Op::ALL
            .iter()
            .filter_map(|op| sum.get(op).map(|n| (*op, *n)))
            .collect()
    }

    /// Body bytes sent and received, summed over the buckets.
    pub fn bytes(&self) -> (u64, u64) {
        self.cores().iter().fold((0, 0), |(s, r), fs| {
            let (a, b) = fs.store().counters().bytes();
            (s + a, r + b)
        })
    }

    /// Of the bytes sent, those read from staged files into memory first.
    pub fn sent_from_memory(&self) -> u64 {
        (self.cores().iter())
            .map(|fs| fs.store().counters().sent_from_memory())
            .sum()
    }

    /// Uploads every dirty file of every bucket (unmount, SIGTERM); the
    /// paths that could not be.
    pub async fn sync_all(&self, limit: Duration) -> Vec<String> {
        let mut failed = Vec::new();
        for (name, fs) in self.named_cores() {
            for p in fs.sync_all(limit).await {
                failed.push(if name.is_empty() {
                    p
                } else {
                    format!("{name}/{p}")
                });
            }
        }
        failed
    }

    /// Lets the block caches finish writing to disk; removes the empty
    /// staging directories.
    pub async fn settle(&self, limit: Duration) {
        for fs in self.cores() {
            fs.block_cache().settle(limit).await;
            let _ = std::fs::remove_dir(&fs.config().staging_dir);
        }
    }
}

/// A core's own number of a directory inode.
fn split_local(ids: Ids, ino: u64) -> u64 {
    if ids.slot == 0 { ino } else { split(ino).1 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemAccount;

    fn all_of(account: Arc<MemAccount>, dir: &std::path::Path) -> Buckets {
        let dir = dir.to_path_buf();
        let config_for: ConfigFor = Box::new(move |b| FsConfig {
            staging_dir: dir.join("staging").join(b),
            disk_cache_dir: dir.join("blocks").join(b),
            ..FsConfig::default()
        });
        let top = TopConfig {
            defaults: FsConfig::default().defaults,
            root_perm: Some(0o700),
            ttl: Duration::from_secs(60),
            read_only: false,
            block_size: FsConfig::default().block_size_bytes,
        };
        Buckets::all(account, config_for, top)
    }

    fn creator() -> Creator {
        Creator {
            uid: 0,
            gid: 0,
            mode: 0o755,
            umask: 0o022,
        }
    }

    /// The top level over the in-memory account: buckets listed, looked
    /// up, made and removed; files of two buckets with distinct numbers;
    /// a rename between them EXDEV; nothing but buckets at the top.
    #[tokio::test]
    async fn the_top_level_routes_each_bucket_to_its_own_core() {
        let tmp = tempfile::tempdir().unwrap();
        let account = Arc::new(MemAccount::default());
        account
            .add("alpha")
            .insert("f", b"in alpha", Default::default());
        account
            .add("beta")
            .insert("f", b"in beta", Default::default());
        let b = all_of(account.clone(), tmp.path());
        let top = b.getattr(ROOT_INO).await.unwrap();
        assert_eq!((top.kind, top.perm), (FileKind::Dir, 0o700));
        let fh = b.opendir(ROOT_INO).await.unwrap();
        let names: Vec<String> = b
            .readdir_listed(ROOT_INO, fh, DirAsk::at(0))
            .await
            .unwrap()
            .entries
            .into_iter()
            .map(|(_, e)| e.name)
            .collect();
        assert_eq!(names, [".", "..", "alpha", "beta"]);
        b.releasedir(fh);
        let alpha = b.lookup(ROOT_INO, OsStr::new("alpha")).await.unwrap();
        let beta = b.lookup(ROOT_INO, OsStr::new("beta")).await.unwrap();
        let fa = b.lookup(alpha.ino, OsStr::new("f")).await.unwrap();
        let fb = b.lookup(beta.ino, OsStr::new("f")).await.unwrap();
        let inos: std::collections::HashSet<u64> =
            [ROOT_INO, alpha.ino, beta.ino, fa.ino, fb.ino].into();
        assert_eq!(inos.len(), 5);
        let ha = b.open(fa.ino, libc::O_RDONLY).await.unwrap();
        let hb = b.open(fb.ino, libc::O_RDONLY).await.unwrap();
        assert_ne!(ha, hb);
        assert_eq!(&b.read(ha, 0, 100).await.unwrap()[..], b"in alpha");
        assert_eq!(&b.read(hb, 0, 100).await.unwrap()[..], b"in beta");
        b.release(ha).await.unwrap();
        b.release(hb).await.unwrap();
        // `..` of a bucket's root is the top level.
        let fh = b.opendir(alpha.ino).await.unwrap();
        let dots = b
            .readdir_listed(alpha.ino, fh, DirAsk::at(0))
            .await
            .unwrap()
            .entries;
        assert_eq!((dots[0].1.ino, dots[1].1.ino), (alpha.ino, ROOT_INO));
        b.releasedir(fh);

        let e = b
            .rename(alpha.ino, OsStr::new("f"), beta.ino, OsStr::new("g"), false)
            .await
            .unwrap_err();
        assert_eq!(e, FsError::CrossDevice);
        b.rename(
            alpha.ino,
            OsStr::new("f"),
            alpha.ino,
            OsStr::new("g"),
            false,
        )
        .await
        .unwrap();
        assert!(account.bucket("alpha").unwrap().object("g").is_some());
        assert!(account.bucket("beta").unwrap().object("g").is_none());
        let e = b
            .create(ROOT_INO, OsStr::new("file"), creator(), libc::O_WRONLY)
            .await
            .unwrap_err();
        assert_eq!(e, FsError::NotPermitted);

        let made = b
            .mkdir(ROOT_INO, OsStr::new("gamma"), creator())
            .await
            .unwrap();
        assert!(account.bucket("gamma").is_some());
        assert_ne!(made.ino, alpha.ino);
        assert_eq!(
            b.mkdir(ROOT_INO, OsStr::new("-o"), creator())
                .await
                .unwrap_err(),
            FsError::InvalidName
        );
        assert_eq!(
            crate::error::errno(&b.rmdir(ROOT_INO, OsStr::new("alpha")).await.unwrap_err()),
            libc::ENOTEMPTY
        );
        b.rmdir(ROOT_INO, OsStr::new("gamma")).await.unwrap();
        assert!(account.bucket("gamma").is_none());
        assert_eq!(b.getattr(made.ino).await.unwrap_err(), FsError::NotFound);
        // Made again: a new number.
        let again = b
            .mkdir(ROOT_INO, OsStr::new("gamma"), creator())
            .await
            .unwrap();
        assert_ne!(again.ino, made.ino);
    }

    #[test]
    fn bucket_names_follow_s3s_rules() {
        for ok in ["abc", "my-bucket.2026", "a1b", &"x".repeat(63)] {
            assert!(valid_bucket_name(ok), "{ok}");
        }
        for bad in [
            "ab",
            &"x".repeat(64),
            "-o",
            "--help",
            "Upper",
            "a_b",
            ".abc",
            "abc-",
            "a..b",
            "192.168.1.1",
            ".versions",
            "a b",
        ] {
            assert!(!valid_bucket_name(bad), "{bad}");
        }
    }

    #[test]
    fn global_numbers_of_two_buckets_never_meet() {
        let (a, b) = (Ids { slot: 1 }, Ids { slot: 2 });
        assert_eq!(a.global(ROOT_INO).unwrap(), 1 << SLOT_SHIFT | 1);
        assert_ne!(a.global(5).unwrap(), b.global(5).unwrap());
        assert_eq!(split(b.global(77).unwrap()), (2, 77));
        assert!(a.global(LOCAL_MASK + 1).is_err());
        assert_eq!(Ids { slot: 0 }.global(12345).unwrap(), 12345);
        // The top level's number is no bucket's.
        assert_ne!(a.global(ROOT_INO).unwrap(), ROOT_INO);
    }
}
