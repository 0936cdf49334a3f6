//! The `.versions/` tree and point-in-time (`as_of`) mounts.
//!
//! - `DIR/.versions/` lists one directory per name in DIR that has or had
//!   versions (a deleted file included): one ListObjectVersions of DIR's
//!   prefix with `/` as delimiter, paginated.
//! - `DIR/.versions/NAME/` lists every version of the key `DIR/NAME`,
//!   newest first, from ListObjectVersions with prefix = that key (pages
//!   stop at the first other key, so `a` never shows `a.txt` or `a/b`).
//! - A version file is named `<last-modified, RFC 3339, ms, UTC>~<version
//!   id>`, with `%`, `/` and control characters of the id percent-encoded;
//!   a delete marker gets the suffix `.deleted` and is empty. Names sort by
//!   time, are unique, and carry the version's size and mtime.
//! - Everything here is read-only; version files are immutable, so their
//!   attributes and blocks are cached without a TTL.
//! - `.versions` grants no more than the file, nor than the version or
//!   any version since: a version file has the owner of the newest
//!   version's metadata (the current file's, while it exists) and only the
//!   mode bits that metadata and the own metadata of it and of every newer
//!   version all grant (without write bits), so an old secret stays
//!   private after a `chmod 644`. A version whose owner or group differs
//!   from the newest's, or older than one that does, grants nothing (root
//!   alone reads it): a `chown` does not hand the old contents to the new
//!   owner. Where a version or the file has a POSIX ACL, only its owner
//!   bits count (the group bits are the ACL's mask, and named entries are
//!   not carried over). `NAME/` is r-x exactly where the newest mode has
//!   r. A user who cannot read `f`, or could not read that version when it
//!   was current, reads nothing. `DIR/.versions/` may be listed by those
//!   who may list `DIR`, and has `DIR`'s owner.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;
use percent_encoding::{AsciiSet, CONTROLS, percent_decode_str, utf8_percent_encode};

use super::acl;
use super::inodes::NodeKey;
use super::names::{join, showable};
use super::{Attr, DirEntry, FileKind, Fs, FsError, FsResult, Resolved};
use crate::store::{ObjectInfo, ReadPin, VersionInfo};

/// User metadata keys that hold the mount's own attributes, not shown as
/// `user.s3.meta.*`.
const OWNED_META: [&str; 5] = [
    super::attr::META_MODE,
    super::attr::META_UID,
    super::attr::META_GID,
    super::attr::META_MTIME,
    super::attr::META_RDEV,
];

const ID_ENCODE: &AsciiSet = &CONTROLS.add(b'%').add(b'/');
const DELETED_SUFFIX: &str = ".deleted";
const VERSIONS_PERM: u16 = 0o555;

/// Mode and owner that every version of one key is shown with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Owner {
    perm: u16,
    uid: u32,
    gid: u32,
}

impl Owner {
    /// What one object's metadata grants, for `.versions`: with an access
    /// ACL, only the owner's bits (its group bits are the ACL's mask).
    fn of(a: &Attr) -> Owner {
        let has_acl = a.xattrs.contains_key(acl::ACCESS);
        Owner {
            perm: if has_acl { a.perm & 0o700 } else { a.perm },
            uid: a.uid,
            gid: a.gid,
        }
    }

    /// The bits a version with these own attributes grants under the
    /// newest's owner `shown`: none if it had another owner or group.
    fn grants_under(self, shown: Owner) -> u16 {
        if self.uid == shown.uid && self.gid == shown.gid {
            self.perm
        } else {
            0
        }
    }

    /// A version file: readable (and executable) as the file, never writable.
    fn file_perm(self) -> u16 {
        self.perm & 0o555
    }

    /// `NAME/`: r-x for each class that may read the file.
    fn dir_perm(self) -> u16 {
        let r = self.perm & 0o444;
        r | (r >> 2)
    }
}

/// A version list and when it was fetched.
type Listed = (Instant, Arc<Vec<VersionInfo>>);

/// Recent version lists, by path.
#[derive(Debug, Default)]
pub struct VersionCache {
    lists: Mutex<HashMap<String, Listed>>,
    owners: Mutex<HashMap<String, (Instant, Owner)>>,
    /// Each version's own owner and mode bits (versions never change: no
    /// TTL).
    own: Mutex<HashMap<(String, String), Owner>>,
}

impl VersionCache {
    /// Drops the cached list of a path this mount just changed.
    pub fn forget(&self, path: &str) {
        self.lists.lock().remove(path);
        self.owners.lock().remove(path);
    }

    /// Drops every cached list (after a directory rename).
    pub fn clear(&self) {
        self.lists.lock().clear();
        self.owners.lock().clear();
    }
}

/// The file name of one version.
pub fn version_name(v: &VersionInfo) -> String {
    let t = humantime::format_rfc3339_millis(v.last_modified);
    let id = utf8_percent_encode(&v.version_id, ID_ENCODE);
    let suffix = if v.delete_marker { DELETED_SUFFIX } else { "" };
    format!("{t}~{id}{suffix}")
}

/// The version id in a version file name.
pub fn version_id_of(name: &str) -> Option<String> {
    let (_, id) = name.split_once('~')?;
    let id = id.strip_suffix(DELETED_SUFFIX).unwrap_or(id);
    percent_decode_str(id)
        .decode_utf8()
        .ok()
        .map(|s| s.into_owned())
}

/// The mtime shown for each version of a list (newest first): its
/// last-modified time, less a nanosecond per tie, so `ls -t` keeps S3's
/// order even when a store records whole seconds.
fn display_times(list: &[VersionInfo]) -> Vec<SystemTime> {
    let mut out: Vec<SystemTime> = Vec::with_capacity(list.len());
    for v in list {
        let t = match out.last() {
            Some(&prev) if v.last_modified >= prev => prev - Duration::from_nanos(1),
            _ => v.last_modified,
        };
        out.push(t);
    }
    out
}

impl Fs {
    /// A presigned GET URL of the file at `path` (below the mount root):
    /// its object, or under `.versions/NAME/` that version, or on an
    /// `as_of` mount the version shown. The error is one line for the
    /// user.
    pub async fn presign(&self, path: &str, expires: Duration) -> Result<String, String> {
        let comps: Vec<&str> = path.split('/').collect();
        let (key, version) = match comps.iter().position(|c| *c == super::names::VERSIONS_DIR) {
            None => {
                // An as_of mount shows one version of each key.
                let version = if self.cfg.as_of.is_some() {
                    let t = self.table.lock();
                    t.find(&NodeKey::Path(path.to_string()))
                        .and_then(|i| t.get(i))
                        .and_then(|n| n.object.as_ref())
                        .and_then(|o| o.version_id.clone())
                } else {
                    None
                };
                (self.key_of(path), version)
            }
            Some(i) if i + 3 == comps.len() => {
                let file = comps[i + 2];
                if file.ends_with(DELETED_SUFFIX) {
                    return Err(format!("{path}: a delete marker has no data to fetch"));
                }
                let id = version_id_of(file)
                    .ok_or_else(|| format!("{path}: not a version file name"))?;
                (
                    self.key_of(&join(&comps[..i].join("/"), comps[i + 1])),
                    Some(id),
                )
            }
            Some(_) => return Err(format!("{path}: not a file")),
        };
        // The object must be there, and a URL cannot carry an SSE-C key.
        match self.store.head(&key, version.as_deref()).await {
            Ok(o) if o.headers.as_ref().is_some_and(|h| h.sse_c) => {
                return Err(format!(
                    "{path} is encrypted with a customer key (SSE-C), which a URL cannot carry: whoever fetches it must send the key in x-amz-server-side-encryption-customer-* headers"
                ));
            }
            Ok(_) => {}
            Err(crate::store::StoreError::NotFound) => {
                return Err(format!("{path}: no such object in S3 (not uploaded yet?)"));
            }
            Err(e) => return Err(format!("{path}: {e}")),
        }
        self.store
            .presign_get(&key, version.as_deref(), expires)
            .await
            .map_err(|e| format!("{path}: {e}"))
    }

    fn ro_dir_attr(&self, mtime: SystemTime) -> Attr {
        let mut a = Attr::implicit_dir(0, &self.cfg.defaults);
        a.perm = VERSIONS_PERM;
        a.atime = mtime;
        a.mtime = mtime;
        a.ctime = mtime;
        a
    }

    /// The `.versions` directory of directory `dir` (inode `dir_ino`):
    /// `dir`'s owner, and r-x where `dir` grants r-x, by its mode and its
    /// ACL (its names, deleted ones too, are for those who may list `dir`).
    pub(super) fn versions_root(&self, dir_ino: u64, dir: &str) -> FsResult<Attr> {
        let mut attr = self.ro_dir_attr(self.cfg.defaults.dir_mtime);
        let mut t = self.table.lock();
        let of_dir = &t.get(dir_ino).ok_or(FsError::NotFound)?.attr;
        (attr.perm, attr.uid, attr.gid) = (of_dir.perm & 0o555, of_dir.uid, of_dir.gid);
        // An ACL that cannot be read grants nothing: owner bits alone.
        match of_dir.xattrs.get(acl::ACCESS).map(|v| acl::Acl::parse(v)) {
            Some(Ok(Some(a))) => {
                attr.xattrs
                    .insert(acl::ACCESS.into(), a.read_only().encode());
            }
            Some(_) => attr.perm &= 0o500,
            None => {}
        }
        let ino = t.upsert(
            NodeKey::Versions(dir.to_string()),
            dir_ino,
            attr,
            None,
            None,
        );
        Ok(t.get(ino).expect("inserted").attr.clone())
    }

    /// The mode, owner or ACL of `ino` changed: what its versions are
    /// shown with follows (the owner remembered for a file's versions is
    /// forgotten). Returns the number of the node showing them, if the
    /// table holds it (so the kernel may too), for the kernel to drop its
    /// attributes: `DIR/.versions` for a directory, `DIR/.versions/NAME`
    /// for a file.
    pub fn versions_changed(&self, ino: u64) -> Option<u64> {
        let mut t = self.table.lock();
        let n = t.get(ino)?;
        let NodeKey::Path(path) = n.key.clone() else {
            return None;
        };
        if n.attr.kind == FileKind::Dir {
            return t.find(&NodeKey::Versions(path));
        }
        let v = t.find(&NodeKey::VersionsOf(path.clone()));
        // Worked out again at the next ask.
        if let Some(n) = v.and_then(|v| t.get_mut(v)) {
            n.fresh_until = Some(Instant::now());
        }
        drop(t);
        self.versions.forget(&path);
        v
    }

    /// The mode and owner the versions of `path` are shown with: the
    /// current file's own, else the newest version's metadata (one HEAD,
    /// kept for metadata_ttl); with no version left, the mount's defaults
    /// for a file.
    ///
    /// Where the file's owner is not its directory's, the owner's bits
    /// alone: what once protected the file may have been a directory since
    /// removed or moved, and the directory now at its path (one anybody
    /// could make in a shared parent) must not open its old versions.
    async fn versions_owner(&self, path: &str, list: &[VersionInfo]) -> FsResult<Owner> {
        let mut owner = self.file_owner(path, list).await?;
        let dir = path.rsplit_once('/').map_or("", |(d, _)| d);
        let dir_uid = {
            let t = self.table.lock();
            t.find(&NodeKey::Path(dir.to_string()))
                .and_then(|i| t.get(i))
                .map(|n| n.attr.uid)
        };
        if dir_uid != Some(owner.uid) {
            owner.perm &= 0o700;
        }
        Ok(owner)
    }

    /// The owner and mode of `path`'s newest version (see `versions_owner`).
    async fn file_owner(&self, path: &str, list: &[VersionInfo]) -> FsResult<Owner> {
        if let Some((at, o)) = self.versions.owners.lock().get(path)
            && at.elapsed() < self.cfg.metadata_ttl
        {
            return Ok(*o);
        }
        // The file this mount shows at the path, where its attributes are
        // known (read with its metadata, or this mount's own new file): a
        // chmod not stored yet included. A file only listed has default
        // attributes, never to be trusted here.
        let current = {
            let t = self.table.lock();
            t.find(&NodeKey::Path(path.to_string()))
                .and_then(|i| t.get(i))
                .filter(|n| n.attr.kind == FileKind::File)
                .filter(|n| n.object.as_ref().is_none_or(|o| o.metadata.is_some()))
                .map(|n| Owner::of(&n.attr))
        };
        if let Some(o) = current {
            return Ok(o);
        }
        let d = &self.cfg.defaults;
        let mut owner = Owner {
            perm: d.file_perm,
            uid: d.uid,
            gid: d.gid,
        };
        if let Some(v) = list.iter().find(|v| !v.delete_marker) {
            let key = self.key_of(path);
            let version = (!v.is_latest).then_some(v.version_id.as_str());
            let info = self.store.head(&key, version).await?;
            owner = Owner::of(&self.attr_of(&info, false));
        }
        self.versions
            .owners
            .lock()
            .insert(path.to_string(), (Instant::now(), owner));
        Ok(owner)
    }

    /// The mode bits each of `versions` (newest first) may grant: what its
    /// own metadata and that of every newer version grant (one HEAD by
    /// version id each, a few at a time, remembered for good); the latest
    /// and delete markers count as `owner`'s. A version whose metadata
    /// cannot be read grants nothing.
    async fn own_perms(&self, path: &str, versions: &[VersionInfo], owner: Owner) -> Vec<u16> {
        use futures::StreamExt;
        let key = self.key_of(path);
        let needs_own = |v: &VersionInfo| !(v.delete_marker || v.is_latest);
        let missing: Vec<String> = {
            let own = self.versions.own.lock();
            versions
                .iter()
                .filter(|v| needs_own(v))
                .filter(|v| !own.contains_key(&(path.to_string(), v.version_id.clone())))
                .map(|v| v.version_id.clone())
                .collect()
        };
        let store = self.store.clone();
        let heads: Vec<(String, crate::store::StoreResult<ObjectInfo>)> =
            futures::stream::iter(missing)
                .map(move |id| {
                    let (store, key) = (store.clone(), key.clone());
                    async move {
                        let r = store.head(&key, Some(&id)).await;
                        (id, r)
                    }
                })
                .buffered(16)
                .collect()
                .await;
        {
            let mut own = self.versions.own.lock();
            for (id, r) in heads {
                match r {
                    Ok(info) => {
                        own.insert(
                            (path.to_string(), id),
                            Owner::of(&self.attr_of(&info, false)),
                        );
                    }
                    Err(e) => {
                        tracing::debug!(path, error = %e, "version metadata unreadable: no access")
                    }
                }
            }
        }
        // A version grants only what every version since granted too: a
        // secret written 0644 and made 0600 a moment later stays 0600
        // under .versions after the file is made 0644 again.
        let own = self.versions.own.lock();
        let mut since = owner.perm;
        versions
            .iter()
            .map(|v| {
                if needs_own(v) {
                    since &= own
                        .get(&(path.to_string(), v.version_id.clone()))
                        .map_or(0, |o| o.grants_under(owner));
                }
                since
            })
            .collect()
    }

    /// How to read version `id` of `path` (whose ETag is `etag`): the
    /// "null" version (written before versioning was enabled) by the ETag
    /// while it is the current object, which stores without versioning
    /// can read; by its id once newer versions are above it.
    pub(super) async fn version_pin(&self, path: &str, id: &str, etag: &str) -> ReadPin {
        if id != "null" {
            return ReadPin::Version(id.to_string());
        }
        let latest = self.versions_of(path).await.map_or(true, |l| {
            l.iter().any(|v| v.version_id == "null" && v.is_latest)
        });
        if latest {
            ReadPin::Etag(etag.to_string())
        } else {
            ReadPin::Version(id.to_string())
        }
    }

    /// Every version and delete marker of exactly the key at `path`,
    /// newest first.
    async fn versions_of(&self, path: &str) -> FsResult<Arc<Vec<VersionInfo>>> {
        // A deferred chmod or chown is stored first: the versions show,
        // and grant, no more than the file does now.
        self.settle_attrs(path).await;
        if let Some((at, list)) = self.versions.lists.lock().get(path)
            && at.elapsed() < self.cfg.metadata_ttl
        {
            return Ok(list.clone());
        }
        let key = self.key_of(path);
        let mut out = Vec::new();
        let mut marker = None;
        loop {
            let page = self.store.list_versions(&key, None, marker).await?;
            let other_key = page.versions.iter().any(|v| v.key != key);
            out.extend(page.versions.into_iter().filter(|v| v.key == key));
            marker = page.next;
            if marker.is_none() || other_key {
                break;
            }
        }
        out.sort_by(|a, b| {
            b.last_modified
                .cmp(&a.last_modified)
                .then(b.is_latest.cmp(&a.is_latest))
        });
        let list = Arc::new(out);
        self.versions
            .lists
            .lock()
            .insert(path.to_string(), (Instant::now(), list.clone()));
        Ok(list)
    }

    pub(super) async fn versions_lookup(
        &self,
        parent: u64,
        key: NodeKey,
        name: &str,
    ) -> FsResult<Attr> {
        match key {
            NodeKey::Versions(dir) => self.versions_of_attr(parent, join(&dir, name)).await,
            NodeKey::VersionsOf(path) => {
                let id = version_id_of(name).ok_or(FsError::NotFound)?;
                let list = self.versions_of(&path).await?;
                let times = display_times(&list);
                let i = list
                    .iter()
                    .position(|v| v.version_id == id && version_name(v) == name)
                    .ok_or(FsError::NotFound)?;
                let owner = self.versions_owner(&path, &list).await?;
                let own = self.own_perms(&path, &list[..=i], owner).await;
                let own = own.get(i).copied().unwrap_or(0);
                Ok(self.remember_version(parent, &path, &list[i], times[i], owner, own))
            }
            NodeKey::Version { .. } => Err(FsError::NotDir),
            NodeKey::Path(_) | NodeKey::Detached(_) => Err(FsError::NotFound),
        }
    }

    /// `DIR/.versions/NAME` (the versions of `path`), under `parent`, as
    /// it is now: recorded in the table, its attributes returned.
    pub(super) async fn versions_of_attr(&self, parent: u64, path: String) -> FsResult<Attr> {
        let list = self.versions_of(&path).await?;
        let newest = list.first().ok_or(FsError::NotFound)?;
        let owner = self.versions_owner(&path, &list).await?;
        let mut attr = self.ro_dir_attr(newest.last_modified);
        (attr.perm, attr.uid, attr.gid) = (owner.dir_perm(), owner.uid, owner.gid);
        let mut t = self.table.lock();
        let ino = t.upsert(
            NodeKey::VersionsOf(path),
            parent,
            attr,
            None,
            self.fresh_until(),
        );
        Ok(t.get(ino).expect("inserted").attr.clone())
    }

    fn remember_version(
        &self,
        parent: u64,
        path: &str,
        v: &VersionInfo,
        mtime: SystemTime,
        owner: Owner,
        own_perm: u16,
    ) -> Attr {
        let attr = Attr {
            ino: 0,
            kind: FileKind::File,
            size: v.size,
            perm: owner.file_perm() & own_perm,
            uid: owner.uid,
            gid: owner.gid,
            rdev: 0,
            atime: mtime,
            mtime,
            ctime: mtime,
            nlink: 1,
            xattrs: Default::default(),
        };
        let object = ObjectInfo {
            key: self.key_of(path),
            size: v.size,
            etag: v.etag.clone(),
            last_modified: v.last_modified,
            version_id: Some(v.version_id.clone()),
            storage_class: None,
            metadata: None,
            headers: None,
        };
        let node = NodeKey::Version {
            path: path.to_string(),
            version_id: v.version_id.clone(),
        };
        let mut t = self.table.lock();
        let ino = t.upsert(node, parent, attr, Some(object), None);
        t.get(ino).expect("inserted").attr.clone()
    }

    pub(super) async fn versions_list(&self, ino: u64, key: NodeKey) -> FsResult<Vec<DirEntry>> {
        match key {
            NodeKey::Versions(dir) => {
                let prefix = self.dir_prefix(&dir);
                let mut names = BTreeSet::new();
                let mut marker = None;
                loop {
                    let page = self.store.list_versions(&prefix, Some("/"), marker).await?;
                    for v in &page.versions {
                        let name = &v.key[prefix.len().min(v.key.len())..];
                        if showable(name) {
                            names.insert(name.to_string());
                        }
                    }
                    marker = page.next;
                    if marker.is_none() {
                        break;
                    }
                }
                let fresh = self.fresh_until();
                let mut t = self.table.lock();
                Ok(names
                    .into_iter()
                    .map(|name| {
                        // Its mode and owner are the file's, read at
                        // lookup: none is granted until then.
                        let mut attr = self.ro_dir_attr(self.cfg.defaults.dir_mtime);
                        attr.perm = 0;
                        let node = NodeKey::VersionsOf(join(&dir, &name));
                        let i = match t.find(&node) {
                            Some(i) => i,
                            None => {
                                let i = t.upsert(node, ino, attr, None, fresh);
                                if let Some(n) = t.get_mut(i) {
                                    n.meta_known = false;
                                }
                                i
                            }
                        };
                        DirEntry {
                            ino: i,
                            name,
                            kind: FileKind::Dir,
                        }
                    })
                    .collect())
            }
            NodeKey::VersionsOf(path) => {
                let list = self.versions_of(&path).await?;
                let times = display_times(&list);
                let owner = self.versions_owner(&path, &list).await?;
                let own = self.own_perms(&path, &list, owner).await;
                Ok(list
                    .iter()
                    .zip(times)
                    .zip(own)
                    .map(|((v, t), own)| DirEntry {
                        ino: self.remember_version(ino, &path, v, t, owner, own).ino,
                        name: version_name(v),
                        kind: FileKind::File,
                    })
                    .collect())
            }
            _ => Err(FsError::NotDir),
        }
    }

    /// The version of `versions` (newest first) current at the `as_of` time.
    fn current_at<'a>(
        &self,
        versions: impl Iterator<Item = &'a VersionInfo>,
    ) -> Option<&'a VersionInfo> {
        let at = self.cfg.as_of?;
        versions
            .filter(|v| v.last_modified <= at)
            .max_by(|a, b| a.last_modified.cmp(&b.last_modified))
    }

    fn as_of_object(v: &VersionInfo) -> ObjectInfo {
        ObjectInfo {
            key: v.key.clone(),
            size: v.size,
            etag: v.etag.clone(),
            last_modified: v.last_modified,
            version_id: Some(v.version_id.clone()),
            storage_class: None,
            metadata: None,
            headers: None,
        }
    }

    /// `resolve` for an `as_of` mount.
    pub(super) async fn resolve_as_of(&self, path: &str) -> FsResult<Option<Resolved>> {
        let d = self.cfg.defaults;
        let dir_prefix = format!("{}/", self.key_of(path));
        let (files, dirs) = self.list_as_of(&dir_prefix).await?;
        if !files.is_empty() || !dirs.is_empty() {
            return Ok(Some(Resolved {
                attr: Attr::implicit_dir(0, &d),
                object: None,
                dir_marker: false,
            }));
        }
        let list = self.versions_of(path).await?;
        match self.current_at(list.iter()) {
            Some(v) if !v.delete_marker => {
                // The version's own metadata (a listing has none).
                let o = self.store.head(&v.key, Some(&v.version_id)).await?;
                Ok(Some(Resolved {
                    attr: self.attr_of(&o, false),
                    object: Some(o),
                    dir_marker: false,
                }))
            }
            _ => Ok(None),
        }
    }

    /// A directory listing as it was at the `as_of` time: per key, the
    /// newest version not newer than it, unless that is a delete marker.
    pub(super) async fn list_as_of(
        &self,
        prefix: &str,
    ) -> FsResult<(Vec<ObjectInfo>, Vec<String>)> {
        let mut by_key: HashMap<String, Vec<VersionInfo>> = HashMap::new();
        let mut prefixes = BTreeSet::new();
        let mut marker = None;
        loop {
            let page = self.store.list_versions(prefix, Some("/"), marker).await?;
            for v in page.versions {
                by_key.entry(v.key.clone()).or_default().push(v);
            }
            prefixes.extend(page.prefixes);
            marker = page.next;
            if marker.is_none() {
                break;
            }
        }
        let mut files: Vec<ObjectInfo> = by_key
            .values()
            .filter_map(|vs| self.current_at(vs.iter()))
            .filter(|v| !v.delete_marker)
            .map(Self::as_of_object)
            .collect();
        files.sort_by(|a, b| a.key.cmp(&b.key));
        Ok((files, prefixes.into_iter().collect()))
    }

    /// Read-only S3 facts as extended attributes.
    pub async fn xattrs(&self, ino: u64) -> FsResult<Vec<(String, String)>> {
        let (key, object) = {
            let t = self.table.lock();
            let n = t.get(ino).ok_or(FsError::NotFound)?;
            (n.key.clone(), n.object.clone())
        };
        let object = match (&key, object) {
            (NodeKey::Path(_), Some(o))
                if o.metadata.is_none() || o.storage_class.is_none() || o.headers.is_none() =>
            {
                let info = self.store.head(&o.key, None).await?;
                if let Some(n) = self.table.lock().get_mut(ino) {
                    n.object = Some(info.clone());
                }
                info
            }
            (_, Some(o)) => o,
            (_, None) => return Ok(Vec::new()),
        };
        let mut out = vec![
            (
                "user.s3.etag".to_string(),
                object.etag.trim_matches('"').to_string(),
            ),
            (
                "user.s3.version_id".to_string(),
                object.version_id.clone().unwrap_or_else(|| "null".into()),
            ),
            (
                "user.s3.last_modified".to_string(),
                humantime::format_rfc3339_millis(object.last_modified).to_string(),
            ),
        ];
        if let Some(c) = &object.storage_class {
            out.push(("user.s3.storage_class".to_string(), c.clone()));
        }
        if let Some(h) = &object.headers {
            if let Some(t) = &h.content_type {
                out.push(("user.s3.content_type".to_string(), t.clone()));
            }
            let sse = if h.sse_c {
                Some("SSE-C".to_string())
            } else {
                h.sse.clone()
            };
            if let Some(e) = sse {
                out.push(("user.s3.sse".to_string(), e));
            }
            if let Some(k) = &h.sse_kms_key_id {
                out.push(("user.s3.sse_kms_key_id".to_string(), k.clone()));
            }
            for (name, v) in [
                ("user.s3.restore", &h.restore),
                ("user.s3.object_lock_mode", &h.lock_mode),
                ("user.s3.object_lock_retain_until", &h.lock_retain_until),
                ("user.s3.legal_hold", &h.legal_hold),
            ] {
                if let Some(v) = v {
                    out.push((name.to_string(), v.clone()));
                }
            }
        }
        // The user metadata the mount does not keep mode and owner in.
        let mut foreign: Vec<(&String, &String)> = object
            .metadata
            .iter()
            .flatten()
            .filter(|(k, _)| !OWNED_META.contains(&k.as_str()))
            .collect();
        foreign.sort();
        for (k, v) in foreign {
            out.push((format!("user.s3.meta.{k}"), v.clone()));
        }
        Ok(out)
    }

    /// setxattr of a `user.s3.*` name: these are read-only facts, so only
    /// setting one to the value it has succeeds (`cp -a`, `rsync -aX`
    /// copying a file within the mount; it changes nothing). Anything else
    /// is EROFS where nothing may change (a version, a read-only mount),
    /// else EPERM.
    pub async fn set_s3_xattr(&self, ino: u64, name: &str, value: &[u8]) -> FsResult<()> {
        let all = self.xattrs(ino).await?;
        match all.iter().find(|(k, _)| k == name) {
            Some((_, v)) if v.as_bytes() == value => Ok(()),
            _ => {
                self.check_writable(ino)?;
                Err(FsError::NotPermitted)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    #[test]
    fn version_names_round_trip_any_id() {
        for (id, dm) in [
            ("3HL4kqtJlcpXroDTDmJ+rmSpXd3dIbrHY", false),
            ("a/b%c\n", true),
            ("null", false),
        ] {
            let v = VersionInfo {
                key: "k".into(),
                version_id: id.into(),
                is_latest: true,
                last_modified: UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
                size: 1,
                etag: "e".into(),
                delete_marker: dm,
            };
            let name = version_name(&v);
            assert!(!name.contains('/') && !name.contains('\n'), "{name}");
            assert!(name.starts_with("2023-11-14T22:13:20.123Z~"), "{name}");
            assert_eq!(name.ends_with(".deleted"), dm);
            assert_eq!(version_id_of(&name).as_deref(), Some(id));
        }
    }
}
