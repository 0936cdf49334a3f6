//! A directory's mtime and ctime, moved when an entry is created, removed
//! or renamed in or out (POSIX).
//!
//! The new times show at once through this mount: they are set on the
//! directory's node, and win over older ones read from S3
//! (`Inode::entries_changed`). Where they are kept:
//!
//! - A directory without a marker object (a bare prefix, the root) has no
//!   object to hold them: they live in memory only, for as long as the
//!   node is in the table. No request is made for them, so a create in
//!   such a directory costs what it cost before.
//! - A directory with a `dir/` marker gets them stored on the marker
//!   (`x-amz-meta-mtime`, `-ctime`, as s3fs-fuse does), deferred and
//!   batched: the first change queues the directory, and a background
//!   task copies each queued marker onto itself with its current times
//!   `DIR_TIMES_BATCH` later, so a burst of creates in one directory costs
//!   one CopyObject. `fsync` of the directory and unmount store them at
//!   once. A failed copy is logged and left: the times are still right
//!   in this mount, and the next change queues the directory again.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tracing::{debug, warn};

use super::inodes::NodeKey;
use super::{FileKind, Fs, FsResult};
use crate::store::StoreError;

/// How long a changed directory waits before its marker is updated:
/// changes within it share one copy.
pub const DIR_TIMES_BATCH: Duration = Duration::from_secs(1);

impl Fs {
    /// An entry of directory `ino` was added or removed now.
    pub(super) fn entries_changed(&self, ino: u64) {
        let now = SystemTime::now();
        let marker = {
            let mut t = self.table.lock();
            let Some(n) = t.get_mut(ino) else { return };
            if n.attr.kind != FileKind::Dir || !matches!(n.key, NodeKey::Path(_)) {
                return;
            }
            n.attr.mtime = now;
            n.attr.ctime = now;
            n.entries_changed = Some(now);
            n.dir_marker
        };
        if marker && self.dir_times.lock().insert(ino) {
            self.dir_times_wake.notify_one();
        }
    }

    /// Stores the times of every queued directory on its marker.
    pub async fn store_dir_times(&self) {
        let queued: Vec<u64> = self.dir_times.lock().drain().collect();
        for ino in queued {
            if let Err(e) = self.store_dir_time(ino).await {
                warn!(ino, error = %e, "could not store a directory's times on its marker");
            }
        }
    }

    /// fsync of a directory: its times, if queued, are stored now.
    pub async fn fsyncdir(&self, ino: u64) -> FsResult<()> {
        if self.dir_times.lock().remove(&ino) {
            self.store_dir_time(ino).await?;
        }
        Ok(())
    }

    /// Copies the marker of `ino` onto itself with the node's attributes.
    async fn store_dir_time(&self, ino: u64) -> FsResult<()> {
        // No directory rename or rmdir meanwhile: the marker stays put.
        let _ns = self.ns.read().await;
        // No chmod, chown or xattr change of the directory meanwhile: the
        // copy carries the attributes as they are now, and lands before
        // theirs (see `store_change`).
        let _marker = self.marker_meta.lock().await;
        let (path, attr) = {
            let t = self.table.lock();
            let Some(n) = t.get(ino) else { return Ok(()) };
            match &n.key {
                NodeKey::Path(p) if n.dir_marker && !p.is_empty() => (p.clone(), n.attr.clone()),
                _ => return Ok(()),
            }
        };
        let key = format!("{}/", self.key_of(&path));
        let meta = attr.to_metadata();
        let put = match self.store.copy(&key, &key, Some(&meta), None).await {
            Ok(p) => p,
            // Removed meanwhile (by another client): nothing to keep.
            Err(StoreError::NotFound) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        debug!(key, "directory times stored on its marker");
        self.versions.forget(&path);
        let mut t = self.table.lock();
        if let Some(n) = t.get_mut(ino) {
            if let Some(o) = n.object.as_mut() {
                o.etag = put.etag;
                o.version_id = put.version_id;
                o.metadata = Some(meta);
            }
            n.generation += 1;
        }
        Ok(())
    }

    /// Runs `store_dir_times` `DIR_TIMES_BATCH` after a directory is
    /// queued, for the life of the mount.
    pub fn spawn_dir_times(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let fs = Arc::downgrade(self);
        let wake = self.dir_times_wake.clone();
        tokio::spawn(async move {
            loop {
                wake.notified().await;
                tokio::time::sleep(DIR_TIMES_BATCH).await;
                let Some(f) = fs.upgrade() else { return };
                f.store_dir_times().await;
            }
        })
    }
}
