//! Changes to the tree: create, mknod, mkdir, symlink, unlink, rmdir,
//! rename, setattr.
//!
//! A directory is a prefix; `mkdir` writes the `dir/` marker object,
//! `rmdir` deletes it and refuses while any key lies below. A rename is
//! CopyObject + DeleteObject per key: not atomic, as on every S3
//! filesystem; a directory is renamed key by key.
//!
//! Every change to a file with write state goes through that state, under
//! its lock, in the order lock → S3 side effect → record: an unlink whose
//! DeleteObject fails changes nothing; a rename uploads what is dirty,
//! copies, deletes, then moves the state (its key and base identity)
//! with it; a chmod of an open, clean file rebases the state on the
//! object its self-copy made. A rename that replaces a file with write
//! state waits for that state's upload and then discards it.

use std::ffi::OsStr;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};

use super::files::{Handle, SetAttr, StateGuard, WriteState};
use super::inodes::NodeKey;
use super::names::{check_key, check_name, join};
use super::{Attr, FileKind, Fs, FsError, FsResult};
use crate::store::{Metadata, ObjectInfo, PutBody, ReadPin, StoreError};

/// Renames of a directory copy this many keys at once.
const RENAME_CONCURRENCY: usize = 8;

/// Who is creating a node, and with which mode.
#[derive(Clone, Copy, Debug)]
pub struct Creator {
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
    pub umask: u32,
}

impl Fs {
    /// The parent directory and the new path, checked for writing.
    fn new_child(&self, parent: u64, name: &OsStr) -> FsResult<String> {
        let name = check_name(name)?;
        if name == super::names::VERSIONS_DIR {
            return Err(FsError::ReadOnly);
        }
        let dir = self.dir_path(parent)?;
        if self.read_only() {
            return Err(FsError::ReadOnly);
        }
        let path = join(&dir, name);
        check_key(&self.key_of(&path))?;
        Ok(path)
    }

    async fn ensure_absent(&self, parent: u64, path: &str) -> FsResult<()> {
        match self.lookup_path(parent, path.to_string()).await {
            Ok(_) => Err(FsError::Exists),
            Err(FsError::NotFound) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn new_attr(&self, kind: FileKind, c: Creator, size: u64) -> Attr {
        let now = SystemTime::now();
        self.own_or_defaults(Attr {
            ino: 0,
            kind,
            size,
            perm: (c.mode & !c.umask & 0o7777) as u16,
            uid: c.uid,
            gid: c.gid,
            rdev: 0,
            atime: now,
            mtime: now,
            ctime: now,
            nlink: if kind == FileKind::Dir { 2 } else { 1 },
            xattrs: Default::default(),
        })
    }

    /// The attributes of a node created in `parent`: from the creator's
    /// mode and umask, or, when `parent` has a default ACL, from that ACL
    /// and the mode without the umask (POSIX; the kernel sends the mode
    /// unmasked, `FUSE_DONT_MASK`), with the access ACL (and for a
    /// directory the default ACL) it inherits. The parent's attributes
    /// as this mount last read them serve (the kernel has just checked
    /// its permissions): no request, unless they were never read.
    async fn new_attr_in(
        &self,
        parent: u64,
        kind: FileKind,
        c: Creator,
        size: u64,
    ) -> FsResult<Attr> {
        let mut a = self.new_attr(kind, c, size);
        if !self.cfg.object_metadata {
            return Ok(a);
        }
        let known = {
            let t = self.table.lock();
            t.get(parent)
                .filter(|n| n.meta_known || parent == super::inodes::ROOT_INO)
                .map(|n| n.attr.xattrs.get(super::acl::DEFAULT).cloned())
        };
        let default = match known {
            Some(d) => d,
            None => self
                .getattr(parent)
                .await?
                .xattrs
                .remove(super::acl::DEFAULT),
        };
        if let Some(Ok(Some(d))) = default.map(|v| super::acl::Acl::parse(&v)) {
            let perm = (c.mode & 0o7777) as u16;
            a.perm = super::acl::inherit(&d, perm, kind == FileKind::Dir, &mut a.xattrs);
        }
        Ok(a)
    }

    fn insert_node(
        &self,
        parent: u64,
        path: String,
        attr: Attr,
        object: Option<ObjectInfo>,
    ) -> Attr {
        let fresh = self.fresh_until();
        let mut t = self.table.lock();
        let ino = t.upsert(NodeKey::Path(path), parent, attr, object, fresh);
        t.add_lookup(ino);
        t.get(ino).expect("inserted").attr.clone()
    }

    fn object_info(
        key: String,
        size: u64,
        meta: Metadata,
        etag: String,
        version: Option<String>,
    ) -> ObjectInfo {
        // As this mount just wrote it (what a later overwrite keeps).
        let headers = crate::store::ObjectHeaders {
            content_type: crate::store::content_type_for(&key),
            ..Default::default()
        };
        ObjectInfo {
            key,
            size,
            etag,
            last_modified: SystemTime::now(),
            version_id: version,
            storage_class: None,
            metadata: Some(meta),
            headers: Some(Box::new(headers)),
        }
    }

    /// Creates and opens a regular file. It exists for `stat` at once and
    /// is uploaded (even if empty) when closed.
    pub async fn create(
        &self,
        parent: u64,
        name: &OsStr,
        c: Creator,
        flags: i32,
    ) -> FsResult<(Attr, u64)> {
        // A file removed at the name while still read is deleted first,
        // before the namespace lock: a slow DeleteObject then holds up this
        // create only, not every other one queued behind a directory
        // rename waiting for that lock. (Done again under it below:
        // normally nothing is left.)
        if let Ok(p) = self.new_child(parent, name) {
            self.settle_deferred(&self.key_of(&p)).await?;
        }
        // The path is resolved under the namespace lock: a directory being
        // renamed cannot move under a create in it.
        let ns = self.ns.read().await;
        let path = self.new_child(parent, name)?;
        if flags & libc::O_EXCL != 0 {
            self.ensure_absent(parent, &path).await?;
        }
        let existing = self.table.lock().find(&NodeKey::Path(path.clone()));
        if let Some(ino) = existing {
            // `open` takes `ns` itself: never twice (a queued writer would
            // wait for this reader, and this reader for it).
            drop(ns);
            // The kernel's view was stale: the file exists. Open it truncated
            // (unless it is gone meanwhile: then create it anew).
            match self.open(ino, flags | libc::O_TRUNC).await {
                Ok(fh) => {
                    self.table.lock().add_lookup(ino);
                    return Ok((self.attr_now(ino)?, fh));
                }
                Err(FsError::NotFound) => {}
                Err(e) => return Err(e),
            }
        }
        // A removed file still read there is deleted before the new one
        // can land (its readers keep their bytes).
        self.settle_deferred(&self.key_of(&path)).await?;
        let attr = self.new_attr_in(parent, FileKind::File, c, 0).await?;
        let attr = self.insert_node(parent, path.clone(), attr, None);
        if let Err(e) = self.start_new_file(attr.ino) {
            // A file that cannot be staged (a full cache disk) gets no
            // name: one would show, and a rename of it would take the
            // target's name in this mount's view only.
            self.table
                .lock()
                .remove_path(&path, std::time::Instant::now());
            return Err(e);
        }
        self.entries_changed(parent);
        let fh = self.new_handle(Handle::File(super::files::FileHandle::writer(attr.ino)));
        self.discard_writer_if_nameless(attr.ino).await;
        Ok((attr, fh))
    }

    /// mknod: a regular file is an empty object; a FIFO, socket or device
    /// is an empty object whose mode and rdev live in the metadata.
    pub async fn mknod(&self, parent: u64, name: &OsStr, c: Creator, rdev: u32) -> FsResult<Attr> {
        let _ns = self.ns.read().await;
        let path = self.new_child(parent, name)?;
        self.ensure_absent(parent, &path).await?;
        let kind = FileKind::from_mode(c.mode);
        if kind == FileKind::Dir || kind == FileKind::Symlink {
            return Err(FsError::Invalid);
        }
        let mut attr = self.new_attr_in(parent, kind, c, 0).await?;
        attr.rdev = rdev;
        self.put_node(parent, path, attr, Bytes::new()).await
    }

    async fn put_node(&self, parent: u64, path: String, attr: Attr, body: Bytes) -> FsResult<Attr> {
        let key = if attr.kind == FileKind::Dir {
            format!("{}/", self.key_of(&path))
        } else {
            self.key_of(&path)
        };
        let meta = attr.to_metadata();
        let size = body.len() as u64;
        self.settle_deferred(&key).await?;
        let put = self
            .store
            .put(&key, PutBody::Bytes(body), &meta, None)
            .await?;
        self.versions.forget(&path);
        let info = Self::object_info(key, size, meta, put.etag, put.version_id);
        let is_dir = attr.kind == FileKind::Dir;
        let a = self.insert_node(parent, path, attr, Some(info));
        self.entries_changed(parent);
        if is_dir && let Some(n) = self.table.lock().get_mut(a.ino) {
            n.dir_marker = true;
        }
        Ok(a)
    }

    pub async fn mkdir(&self, parent: u64, name: &OsStr, c: Creator) -> FsResult<Attr> {
        let _ns = self.ns.read().await;
        let path = self.new_child(parent, name)?;
        super::names::check_dir_key(&self.key_of(&path))?;
        self.ensure_absent(parent, &path).await?;
        // Nothing was under the new directory's prefix as far as what told
        // its name was free knows (a listing or a negative entry, as old as
        // it is; else a request just now): it is known empty until that
        // expires, not a whole TTL from now, or objects another client put
        // there would stay hidden longer than `metadata_ttl`.
        let known = (self.table.lock()).absent_until(parent, &path, std::time::Instant::now());
        let empty_until = [known, self.fresh_until()].into_iter().flatten().min();
        let attr = self.new_attr_in(parent, FileKind::Dir, c, 0).await?;
        let a = self.put_node(parent, path, attr, Bytes::new()).await?;
        if let Some(n) = self.table.lock().get_mut(a.ino) {
            n.listed_until = empty_until;
        }
        Ok(self.with_links(a))
    }

    /// A symlink is an object whose body is the target, with S_IFLNK in
    /// its mode (s3fs-fuse's convention). It inherits no ACL (as in
    /// Linux: a symlink's permissions are never checked).
    pub async fn symlink(
        &self,
        parent: u64,
        name: &OsStr,
        target: &str,
        c: Creator,
    ) -> FsResult<Attr> {
        let _ns = self.ns.read().await;
        let path = self.new_child(parent, name)?;
        self.ensure_absent(parent, &path).await?;
        let attr = self.new_attr(
            FileKind::Symlink,
            Creator {
                mode: 0o777,
                umask: 0,
                ..c
            },
            target.len() as u64,
        );
        let a = self
            .put_node(
                parent,
                path,
                attr,
                Bytes::copy_from_slice(target.as_bytes()),
            )
            .await?;
        if let Some(n) = self.table.lock().get_mut(a.ino) {
            n.symlink_target = Some(target.to_string());
        }
        Ok(a)
    }

    pub async fn readlink(&self, ino: u64) -> FsResult<String> {
        let attr = self.getattr(ino).await?;
        if attr.kind != FileKind::Symlink {
            return Err(FsError::Invalid);
        }
        let (cached, key) = {
            let t = self.table.lock();
            let n = t.get(ino).ok_or(FsError::NotFound)?;
            (
                n.symlink_target.clone(),
                n.object.as_ref().map(|o| (o.key.clone(), o.etag.clone())),
            )
        };
        if let Some(t) = cached {
            return Ok(t);
        }
        let (key, etag) = key.ok_or(FsError::NotFound)?;
        let body = self
            .store
            .get_range(&key, 0..attr.size, &ReadPin::Etag(etag))
            .await?;
        let target = String::from_utf8_lossy(&body).into_owned();
        if let Some(n) = self.table.lock().get_mut(ino) {
            n.symlink_target = Some(target.clone());
        }
        Ok(target)
    }

    /// Removes a file (not a directory).
    pub async fn unlink(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        let _ns = self.ns.read().await;
        let path = self.new_child(parent, name)?;
        let attr = self.lookup_path(parent, path.clone()).await?;
        if attr.kind == FileKind::Dir {
            return Err(FsError::IsDir);
        }
        let detaching = self.detaching(attr.ino).await;
        // Lock → delete → record: a failed DeleteObject leaves the writer's
        // data as it was, to be uploaded at its close.
        let mut st = self.live(attr.ino).await;
        if self.table.lock().find(&NodeKey::Path(path.clone())) != Some(attr.ino) {
            // Renamed away (or removed) while this waited for its writer,
            // which went with it: the name is not this file's any more.
            return Err(FsError::NotFound);
        }
        let object = self
            .table
            .lock()
            .get(attr.ino)
            .and_then(|n| n.object.clone());
        if let Some(o) = object {
            let key = self.key_of(&path);
            if st.is_none() && self.has_etag_pinned_readers(attr.ino) {
                // Readers would lose the object: the delete waits for the
                // last of them (recorded, so a crash cannot undo the rm).
                // Its Last-Modified by the server's clock: a file written
                // there later with the same bytes (same ETag) is not the
                // one to delete. Unknown (S3 unreachable): the ETag alone.
                let modified = match self.store.head(&key, None).await {
                    Ok(h) if crate::write::same_etag(&h.etag, &o.etag) => Some(h.last_modified),
                    _ => None,
                };
                let t = crate::write::tombstone::Tombstone::create(
                    &self.cfg.staging_dir,
                    &key,
                    &o.etag,
                    modified,
                )?;
                self.deferred
                    .lock()
                    .insert(attr.ino, super::files::Deferred::new(t));
                // The last reader may have closed while the tombstone was
                // made: its close found nothing deferred yet.
                self.complete_deferred(attr.ino).await;
            } else {
                self.delete_staged(st.as_deref_mut(), &key).await?;
            }
        } else if st.as_ref().is_some_and(|st| st.staged.may_have_landed()) {
            // An upload of this new file failed, perhaps only in its answer.
            self.delete_staged(st.as_deref_mut(), &self.key_of(&path))
                .await?;
        }
        if let Some(st) = st.as_mut() {
            self.abort_leftover(st.discard());
        }
        drop(st);
        self.versions.forget(&path);
        let until = Instant::now() + self.cfg.metadata_ttl;
        let gone = self.table.lock().remove_path(&path, until);
        drop(detaching);
        // A writer of the file looked up, or of whatever was at the name
        // when it was removed (a create on another thread may have come in
        // between), that came after the look above.
        for g in [Some(attr.ino), gone].into_iter().flatten() {
            self.discard_writer_if_nameless(g).await;
        }
        self.entries_changed(parent);
        Ok(())
    }

    /// Removes an empty directory.
    pub async fn rmdir(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        // No create in the directory while it is checked and removed.
        let _ns = self.ns.write().await;
        let path = self.new_child(parent, name)?;
        let attr = self.lookup_path(parent, path.clone()).await?;
        if attr.kind != FileKind::Dir {
            return Err(FsError::NotDir);
        }
        let prefix = format!("{}/", self.key_of(&path));
        // Files removed while still read count as gone: their deletes are
        // done now (their readers keep their bytes on the cache disk).
        self.settle_deferred(&prefix).await?;
        let page = self.store.list(&prefix, None, None, Some(2)).await?;
        if page.objects.iter().any(|o| o.key != prefix) || self.pending_below(&path) {
            return Err(FsError::NotEmpty);
        }
        if !page.objects.is_empty() {
            self.store.delete(&prefix).await?;
        }
        let until = Instant::now() + self.cfg.metadata_ttl;
        self.table.lock().remove_path(&path, until);
        self.dir_times.lock().remove(&attr.ino);
        self.entries_changed(parent);
        Ok(())
    }

    /// Renames a file or a directory tree. `noreplace` is RENAME_NOREPLACE.
    pub async fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
        noreplace: bool,
    ) -> FsResult<()> {
        // Paths are resolved under the namespace lock. A file rename holds
        // it for reading (keeping directory renames out); a directory
        // rename for writing, after uploading what is dirty below it
        // without the lock, so one slow upload does not stall every create
        // of the mount.
        let read = self.ns.read().await;
        let from = self.new_child(parent, name)?;
        let mut src = self.lookup_path(parent, from.clone()).await?;
        let (_read, _write) = if src.kind == FileKind::Dir {
            drop(read);
            for ino in self.writers_below(&from) {
                self.sync_ino(ino).await?;
            }
            let write = self.ns.write().await;
            let from = self.new_child(parent, name)?;
            src = self.lookup_path(parent, from).await?;
            (None, Some(write))
        } else {
            (Some(read), None)
        };
        let from = self.new_child(parent, name)?;
        let to = self.new_child(new_parent, new_name)?;
        let dst = match self.lookup_path(new_parent, to.clone()).await {
            Ok(a) => Some(a),
            Err(FsError::NotFound) => None,
            Err(e) => return Err(e),
        };
        if from == to {
            return Ok(());
        }
        if let Some(d) = &dst {
            if noreplace {
                return Err(FsError::Exists);
            }
            match (src.kind == FileKind::Dir, d.kind == FileKind::Dir) {
                (true, false) => return Err(FsError::NotDir),
                (false, true) => return Err(FsError::IsDir),
                _ => {}
            }
        }
        // The write states of the files moved stay locked until the table
        // has the new paths: an upload (a close of another handle, the
        // retrier) takes its key from the table, and would otherwise send
        // the file to its old name in between.
        let held: Vec<StateGuard>;
        let mut detaching = None;
        if src.kind == FileKind::Dir {
            if to.starts_with(&format!("{from}/")) {
                return Err(FsError::Invalid);
            }
            // Files removed while still read, in either directory: deleted
            // now, so they neither move nor count (their readers keep
            // their bytes on the cache disk).
            self.settle_deferred(&format!("{}/", self.key_of(&from)))
                .await?;
            if dst.is_some() {
                let prefix = format!("{}/", self.key_of(&to));
                self.settle_deferred(&prefix).await?;
                let page = self.store.list(&prefix, None, None, Some(2)).await?;
                if page.objects.iter().any(|o| o.key != prefix) || self.pending_below(&to) {
                    return Err(FsError::NotEmpty);
                }
            }
            held = self.rename_tree(&from, &to, dst.is_some()).await?;
        } else {
            let replaced = dst.as_ref().filter(|d| d.ino != src.ino);
            if let Some(d) = replaced {
                detaching = Some(self.detaching(d.ino).await);
            }
            held = self
                .rename_file(src.ino, replaced.map(|d| d.ino), &from, &to)
                .await?;
        }
        self.versions.forget(&from);
        self.versions.forget(&to);
        if src.kind == FileKind::Dir {
            self.versions.clear();
        }
        let replaced = {
            let mut t = self.table.lock();
            let replaced = t.rename(&from, &to, new_parent);
            if src.kind == FileKind::Dir {
                // Cached objects below still name the old keys.
                t.expire_below(&to);
            }
            // A rename changes the node (ctime), kept in memory: the copy
            // keeps the object's headers as they were.
            if let Some(n) = t.get_mut(src.ino) {
                n.attr.ctime = SystemTime::now();
            }
            replaced
        };
        drop(held);
        drop(detaching);
        // A writer that came late, of the file replaced as looked up or as
        // found at the name when it was replaced (a create on another
        // thread may have come between).
        for d in [dst.map(|d| d.ino), replaced].into_iter().flatten() {
            self.discard_writer_if_nameless(d).await;
        }
        self.entries_changed(parent);
        if new_parent != parent {
            self.entries_changed(new_parent);
        }
        Ok(())
    }

    /// Renames one file: under its write state's lock (and that of the
    /// file it replaces, in inode order), what is dirty goes up, the object
    /// is copied and the original deleted, then the state moves with it.
    /// The replaced file's pending data is discarded after its upload
    /// finished, so a stale upload never lands over the renamed file.
    /// Returns the states' guards: the caller drops them once the table
    /// has the new path.
    async fn rename_file(
        &self,
        src: u64,
        dst: Option<u64>,
        from: &str,
        to: &str,
    ) -> FsResult<Vec<StateGuard>> {
        let (mut s, mut d) = match dst.filter(|d| *d != src) {
            Some(d) if d < src => {
                let dg = self.live(d).await;
                (self.live(src).await, dg)
            }
            Some(d) => {
                let sg = self.live(src).await;
                (sg, self.live(d).await)
            }
            None => (self.live(src).await, None),
        };
        // The file renamed over is being replaced: journaled first, so a
        // kill once the new object landed drops its staged data instead
        // of keeping it beside the key.
        if let Some(st) = d.as_mut() {
            st.staged.removing()?;
        }
        let r = self.move_file(src, dst, from, to, &mut s, &mut d).await;
        if r.is_err()
            && let Some(st) = d.as_mut()
        {
            st.staged.kept();
        }
        r.map(|()| s.into_iter().chain(d).collect())
    }

    /// `rename_file` once the states are held.
    async fn move_file(
        &self,
        src: u64,
        dst: Option<u64>,
        from: &str,
        to: &str,
        s: &mut Option<StateGuard>,
        d: &mut Option<StateGuard>,
    ) -> FsResult<()> {
        let (fk, tk) = (self.key_of(from), self.key_of(to));
        let replaced = dst.filter(|d| *d != src);
        let never_uploaded = self
            .table
            .lock()
            .get(src)
            .is_some_and(|n| n.object.is_none());
        match s.as_mut() {
            // A new file not sent yet (written and closed under
            // writeback=async, or still open): it just goes to the new
            // name when it is sent. rsync's temporary file then costs one
            // PUT, at its final name.
            Some(st) if st.dirty && never_uploaded && st.staged.unsent() => {
                // A file removed there while still read is deleted first
                // (failing, the rename fails before anything changed).
                self.clear_the_way(&tk, replaced).await?;
                // The new key journaled first, with what the key holds of
                // the file replaced: a kill before that is deleted still
                // puts this file there. A full cache disk fails the
                // rename before what it replaces is touched.
                let over = replaced.map(|d| {
                    let t = self.table.lock();
                    let object = t.get(d).and_then(|n| n.object.as_ref());
                    object.map(|o| o.etag.clone()).into_iter().collect()
                });
                st.staged.rekey(&tk, over)?;
                // What it replaces is gone now, as after any rename: were
                // it left until the upload, an unlink before that would
                // bring it back.
                let replaced_landed = replaced
                    .is_some_and(|d| self.table.lock().get(d).is_some_and(|n| n.object.is_some()))
                    || d.as_ref().is_some_and(|st| st.staged.may_have_landed());
                if replaced_landed && let Err(e) = self.delete_present(&tk).await {
                    // The rename fails: the file keeps its name. Said
                    // first in room its journal took ahead, so a kill
                    // before the old name is journaled back never puts
                    // this file over the one it did not replace.
                    st.staged.kept();
                    if let Err(back) = st.staged.rekey(&fk, None) {
                        tracing::warn!(key = %fk, error = %back, "could not journal the old name back");
                    }
                    return Err(e);
                }
                // What it replaced is gone: an object put at the key from
                // now on, even with the same bytes, is another client's,
                // and a recovery no longer puts this file over it. Not
                // journaled (a full disk): only that stays as it was.
                if replaced.is_some()
                    && let Err(e) = st.staged.rekey(&tk, None)
                {
                    tracing::debug!(key = %tk, error = %e, "rename over: journal not settled");
                }
                if let Some(st) = d.as_mut() {
                    self.abort_leftover(st.discard());
                }
                self.retry_wake.notify_one();
                return Ok(());
            }
            // A deferred change of attributes (rsync sets mode and times
            // on its temporary file after the close, then renames it)
            // rides on the rename's copy: no self-copy of its own.
            Some(st) if st.dirty && st.staged.meta_only() && !never_uploaded => {
                self.clear_the_way(&tk, replaced).await?;
                let meta = self
                    .table
                    .lock()
                    .get(src)
                    .map(|n| n.attr.to_metadata())
                    .ok_or(FsError::NotFound)?;
                let put = self.store.copy(&fk, &tk, Some(&meta), None).await?;
                st.landed(&tk, &put);
                self.own_copy(src, Some(&mut *st), &tk, &put, Some(&meta));
                self.delete_present(&fk).await?;
                self.end_if_idle(src, st);
                if let Some(st) = d.as_mut() {
                    self.abort_leftover(st.discard());
                }
                return Ok(());
            }
            Some(st) => self.upload_if_dirty(src, st).await?,
            None => {}
        }
        let uploaded = self
            .table
            .lock()
            .get(src)
            .is_some_and(|n| n.object.is_some());
        if uploaded {
            self.clear_the_way(&tk, replaced).await?;
            let put = self.store.copy(&fk, &tk, None, None).await?;
            self.own_copy(src, s.as_deref_mut(), &tk, &put, None);
            self.delete_present(&fk).await?;
            if let Some(st) = s.as_mut() {
                self.end_if_idle(src, st);
            }
        }
        if let Some(st) = d.as_mut() {
            self.abort_leftover(st.discard());
        }
        Ok(())
    }

    /// Before this mount writes over `key`: a removed file still read there
    /// is deleted now, and the readers of `replaced` (the file at `key`)
    /// keep their bytes.
    async fn clear_the_way(&self, key: &str, replaced: Option<u64>) -> FsResult<()> {
        self.settle_deferred(key).await?;
        if let Some(d) = replaced {
            self.keep_for_readers(d).await;
        }
        Ok(())
    }

    /// DeleteObject of the key of a file this mount may hold data of
    /// (`st`), journaled first (`Staged::removing`): a kill once it landed
    /// drops that data instead of keeping it beside the key. A failed
    /// delete leaves the file as it was.
    async fn delete_staged(&self, st: Option<&mut WriteState>, key: &str) -> FsResult<()> {
        let Some(st) = st else {
            return self.delete_present(key).await;
        };
        st.staged.removing()?;
        let r = self.delete_present(key).await;
        if r.is_err() {
            st.staged.kept();
        }
        r
    }

    /// DeleteObject; a key already gone is not an error.
    async fn delete_present(&self, key: &str) -> FsResult<()> {
        // One that landed unanswered counts: a rename failing there would
        // have lost the file it left at the name.
        Ok(crate::store::delete_gone(&*self.store, key).await?)
    }

    /// Copies every key below `from/` to `to/`, then deletes the originals.
    /// The caller holds `ns` for writing; the write states of the files
    /// below are locked for the whole move, so none uploads between the
    /// copy and the delete, and each moves with its file. An empty
    /// directory replaced (`replace`) loses its marker only once the dirty
    /// files have gone up: a rename failing there changes nothing.
    /// Returns the states' guards, for the caller to drop once the table
    /// has the new paths.
    async fn rename_tree(&self, from: &str, to: &str, replace: bool) -> FsResult<Vec<StateGuard>> {
        let (src_prefix, dst_prefix) = (
            format!("{}/", self.key_of(from)),
            format!("{}/", self.key_of(to)),
        );
        // Dirty files below go up first, so their current bytes move.
        let mut writers = self.writers_below(from);
        writers.sort_unstable();
        let mut states = Vec::new();
        for ino in writers {
            if let Some(mut st) = self.live(ino).await {
                self.upload_if_dirty(ino, &mut st).await?;
                let key = self
                    .table
                    .lock()
                    .get(ino)
                    .and_then(|n| n.path().map(|p| self.key_of(p)));
                states.push((ino, key, st));
            }
        }
        if replace {
            self.store.delete(&dst_prefix).await?;
        }
        let mut keys = Vec::new();
        let mut token = None;
        loop {
            let page = self.store.list(&src_prefix, None, token, None).await?;
            keys.extend(page.objects.into_iter().map(|o| o.key));
            token = page.next_token;
            if token.is_none() {
                break;
            }
        }
        let pairs: Vec<(String, String)> = keys
            .iter()
            .map(|k| (k.clone(), format!("{dst_prefix}{}", &k[src_prefix.len()..])))
            .collect();
        let copies = pairs.into_iter().map(|(src, dst)| {
            let store = self.store.clone();
            async move {
                let put = store.copy(&src, &dst, None, None).await?;
                Ok::<_, StoreError>((src, dst, put))
            }
        });
        let copied: Vec<(String, String, crate::store::PutResult)> = futures::stream::iter(copies)
            .buffer_unordered(RENAME_CONCURRENCY)
            .try_collect()
            .await?;
        // Each open file's state now rests on its copy, and each reader
        // reads the copy before the original goes.
        for (ino, key, st) in states.iter_mut() {
            if let Some((_, dst, put)) = copied.iter().find(|(s, _, _)| Some(s) == key.as_ref()) {
                self.own_copy(*ino, Some(&mut *st), dst, put, None);
                self.end_if_idle(*ino, st);
            }
        }
        self.readers_follow(&copied);
        let deletes = keys.into_iter().map(|k| {
            let store = self.store.clone();
            async move {
                match store.delete(&k).await {
                    Err(StoreError::NotFound) => Ok(()),
                    r => r,
                }
            }
        });
        futures::stream::iter(deletes)
            .buffer_unordered(RENAME_CONCURRENCY)
            .try_collect::<()>()
            .await?;
        Ok(states.into_iter().map(|(_, _, st)| st).collect())
    }

    /// chmod, chown, truncate, utimens.
    pub async fn setattr(&self, ino: u64, s: SetAttr) -> FsResult<Attr> {
        self.set_stored_attr(ino, s)
            .await
            .map(|a| self.with_links(a))
    }

    async fn set_stored_attr(&self, ino: u64, s: SetAttr) -> FsResult<Attr> {
        let path = self.change_target(ino)?;
        let mut s = self.without_object_metadata(s)?;
        let attr = self.getattr(ino).await?;
        if s.kill_suid && attr.kind != FileKind::Dir {
            let perm = s.mode.map_or(attr.perm, |m| (m & 0o7777) as u16);
            let killed = super::files::killed_perm(perm);
            if killed != perm {
                s.mode = Some(killed.into());
            }
        }
        if let Some(size) = s.size {
            if attr.kind == FileKind::Dir {
                return Err(FsError::IsDir);
            }
            if attr.size != size || self.has_write_state(ino) {
                self.set_size(ino, size).await?;
                if let Some(fh) = s.fh {
                    self.mark_handle_wrote(fh);
                }
            }
        }
        if s.mode.is_none()
            && s.uid.is_none()
            && s.gid.is_none()
            && s.atime.is_none()
            && s.mtime.is_none()
        {
            return self.attr_now(ino);
        }
        // A chmod, chown or utimes that changes nothing (`chmod 644` of a
        // 0644 file, a file manager setting the owner it already has)
        // costs no request; only ctime moves.
        let unchanged = s.mode.is_none_or(|m| (m & 0o7777) as u16 == attr.perm)
            && s.uid.is_none_or(|u| u == attr.uid)
            && s.gid.is_none_or(|g| g == attr.gid)
            && s.atime.is_none_or(|t| t == attr.atime)
            && s.mtime.is_none_or(|t| t == attr.mtime);
        if unchanged {
            let mut t = self.table.lock();
            let n = t.get_mut(ino).ok_or(FsError::NotFound)?;
            n.attr.ctime = SystemTime::now();
            return Ok(n.attr.clone());
        }
        // The node shows the new attributes only once they are stored: a
        // chmod whose copy fails changes nothing visible.
        let ctime = SystemTime::now();
        let change = |a: &mut Attr| {
            if let Some(m) = s.mode {
                a.perm = (m & 0o7777) as u16;
                super::acl::chmod_xattrs(&mut a.xattrs, a.perm);
            }
            if let Some(u) = s.uid {
                a.uid = u;
            }
            if let Some(g) = s.gid {
                a.gid = g;
            }
            if let Some(t) = s.atime {
                a.atime = t;
            }
            if let Some(t) = s.mtime {
                a.mtime = t;
            }
            a.ctime = ctime;
        };
        self.store_change(ino, path, change).await
    }

    /// Where a change of `ino`'s attributes goes: `Some(path)`, stored
    /// with the file or directory there; `None`, a file unlinked or
    /// replaced while open, which keeps it in memory for its open
    /// descriptors (`fchmod`, `ftruncate` or `fsetxattr` of a temporary
    /// file; it is never uploaded). EROFS under `.versions` and on a
    /// read-only mount.
    pub(super) fn change_target(&self, ino: u64) -> FsResult<Option<String>> {
        match self.node_key(ino)? {
            _ if self.read_only() => Err(FsError::ReadOnly),
            NodeKey::Path(path) => Ok(Some(path)),
            NodeKey::Detached(_) => Ok(None),
            _ => Err(FsError::ReadOnly),
        }
    }

    /// Stores a change of a node's attributes (mode, owner, times,
    /// extended attributes), then shows it: on an open file's dirty data
    /// (through its write state, under its lock), else by a self-copy of
    /// the object or its `dir/` marker (a directory without one gets one);
    /// the root, which has no object, and a nameless file (`path` None,
    /// see `change_target`) keep it in memory.
    pub(super) async fn store_change(
        &self,
        ino: u64,
        path: Option<String>,
        change: impl Fn(&mut Attr),
    ) -> FsResult<Attr> {
        // A directory's marker is also copied by the deferred store of its
        // times: one at a time, each from the attributes as they are then,
        // so neither lands an older mode or time over the other's.
        let is_dir = self
            .table
            .lock()
            .get(ino)
            .is_some_and(|n| n.attr.kind == FileKind::Dir);
        let _marker = if is_dir {
            Some(self.marker_meta.lock().await)
        } else {
            None
        };
        let commit = || -> FsResult<Attr> {
            let mut t = self.table.lock();
            let n = t.get_mut(ino).ok_or(FsError::NotFound)?;
            change(&mut n.attr);
            Ok(n.attr.clone())
        };
        let new = {
            let t = self.table.lock();
            let mut a = t.get(ino).ok_or(FsError::NotFound)?.attr.clone();
            change(&mut a);
            a
        };
        let Some(path) = path.filter(|p| !p.is_empty()) else {
            return commit();
        };
        // An open file: its state decides, under its lock. Dirty data
        // carries the new metadata; a clean one is copied onto itself and
        // the state rebased on the copy (its ETag changed).
        let mut st = self.live(ino).await;
        if let Some(st) = st.as_mut().filter(|st| st.dirty) {
            st.staged.set_meta(&new.to_metadata())?;
            return commit();
        }
        // A file this mount just wrote: the tools that set owner, mode and
        // times one after another after the close (GIO, rsync) share one
        // self-copy, deferred and journaled.
        if st.is_none() && new.kind == FileKind::File && self.just_written(ino) {
            match self.defer_meta(ino, &new.to_metadata()).await {
                Ok(true) => return commit(),
                Ok(false) => {}
                // No room to journal it (a full cache disk): stored now.
                Err(e) => tracing::debug!(ino, error = %e, "cannot defer a change of attributes"),
            }
        }
        // Not open: store the new metadata on the object itself.
        let meta = new.to_metadata();
        let (object, marker) = {
            let t = self.table.lock();
            let n = t.get(ino).ok_or(FsError::NotFound)?;
            (n.object.clone(), n.dir_marker)
        };
        let put = if new.kind == FileKind::Dir {
            let key = format!("{}/", self.key_of(&path));
            let r = if marker {
                self.store.copy(&key, &key, Some(&meta), None).await?
            } else {
                self.store
                    .put(&key, PutBody::Bytes(Bytes::new()), &meta, None)
                    .await?
            };
            if let Some(n) = self.table.lock().get_mut(ino) {
                n.dir_marker = true;
            }
            // These times are stored now: no deferred copy for them.
            self.dir_times.lock().remove(&ino);
            r
        } else {
            let key = self.key_of(&path);
            let put = self.store.copy(&key, &key, Some(&meta), None).await?;
            let new = commit()?;
            self.own_copy(ino, st.as_deref_mut(), &key, &put, Some(&meta));
            self.versions.forget(&path);
            return Ok(new);
        };
        let new = commit()?;
        self.versions.forget(&path);
        let size = object.as_ref().map_or(0, |o| o.size);
        let okey = object.map_or_else(|| format!("{}/", self.key_of(&path)), |o| o.key);
        let fresh = self.fresh_until();
        if let Some(n) = self.table.lock().get_mut(ino) {
            n.object = Some(Self::object_info(
                okey,
                size,
                meta,
                put.etag,
                put.version_id,
            ));
            n.fresh_until = fresh;
            n.generation += 1;
        }
        Ok(new)
    }
}
