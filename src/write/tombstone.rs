//! Deferred deletes. `rm` of a file that handles still read, on a bucket
//! whose reads are pinned by ETag (no versions), would pull the object from
//! under them: the DeleteObject waits for the last of them to close. Until
//! then the name is gone from this mount (unlisted, ENOENT), and a
//! tombstone under the cache dir (`unlink-<id>`, flock-owned like a
//! staging file) records key and ETag, so a killed daemon's next mount
//! finishes the delete: a removed file never comes back. The delete is
//! done only if the key still holds that ETag and no newer Last-Modified (a
//! file written there since is not touched, even with the same bytes).

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::{debug, warn};

use crate::store::{ObjectStore, StoreError};

pub const PREFIX: &str = "unlink-";

/// A delete waiting for the last reader.
#[derive(Debug)]
pub struct Tombstone {
    pub key: String,
    pub etag: String,
    /// The object's Last-Modified, in whole seconds since the epoch.
    modified: Option<u64>,
    path: PathBuf,
    /// Holds the lock while this mount owns the tombstone.
    _file: File,
}

impl Tombstone {
    /// Records that `key` (at `etag`, last modified at `modified` by the
    /// server's clock, where known) is to be deleted.
    pub fn create(
        dir: &Path,
        key: &str,
        etag: &str,
        modified: Option<SystemTime>,
    ) -> io::Result<Tombstone> {
        let (mut file, path) = super::new_locked_file(dir, PREFIX)?;
        let modified = modified.map(secs);
        // `ETAG SECS` on the first line: an older daemon's parser takes
        // the pair for an ETag no object has, and deletes nothing.
        let first = match modified {
            Some(m) => format!("{etag} {m}"),
            None => etag.to_string(),
        };
        file.write_all(format!("{first}\n{key}").as_bytes())?;
        Ok(Tombstone {
            key: key.to_string(),
            etag: etag.to_string(),
            modified,
            path,
            _file: file,
        })
    }

    /// Deletes the object if it is still the one unlinked; the tombstone
    /// goes once that is settled. On a failure it is handed back, still
    /// locked: the caller keeps it (the delete is done before anything is
    /// written at the key) or drops it for the next try.
    pub async fn complete(self, store: &dyn ObjectStore) -> Result<(), (StoreError, Tombstone)> {
        match delete_if_same(store, &self.key, &self.etag, self.modified).await {
            Ok(()) => {
                let _ = std::fs::remove_file(&self.path);
                Ok(())
            }
            Err(e) => Err((e, self)),
        }
    }
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

async fn delete_if_same(
    store: &dyn ObjectStore,
    key: &str,
    etag: &str,
    modified: Option<u64>,
) -> Result<(), StoreError> {
    match store.head(key, None).await {
        // The same bytes written again since (a new file with the old
        // one's contents) are a newer object: left alone.
        Ok(o)
            if super::same_etag(&o.etag, etag)
                && modified.is_none_or(|m| secs(o.last_modified) <= m) =>
        {
            crate::store::delete_gone(store, key).await
        }
        Ok(_) => {
            debug!(
                key,
                "deferred delete: the key holds a newer object; left alone"
            );
            Ok(())
        }
        Err(StoreError::NotFound) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Finishes a dead mount's deferred delete (a tombstone nobody holds).
/// Failed, the tombstone is handed back locked, with the error: a live
/// mount keeps it as its own (a write at the key waits for it, the retrier
/// tries it again); dropped, it stays for the next try.
pub async fn recover(store: &dyn ObjectStore, path: &Path) -> Result<(), (String, Tombstone)> {
    let Ok(mut file) = File::open(path) else {
        return Ok(());
    };
    if !super::try_lock(&file).unwrap_or(false) {
        return Ok(()); // a live mount's
    }
    let mut text = String::new();
    if let Err(e) = file.read_to_string(&mut text) {
        warn!(path = %path.display(), error = %e, "a deferred delete cannot be read; left for the next try");
        return Ok(());
    }
    let Some((first, key)) = text.split_once('\n') else {
        let _ = std::fs::remove_file(path);
        return Ok(());
    };
    // An older daemon's tombstone has the ETag alone.
    let (etag, modified) = match first.split_once(' ') {
        Some((e, m)) => (e, m.parse().ok()),
        None => (first, None),
    };
    let t = Tombstone {
        key: key.to_string(),
        etag: etag.to_string(),
        modified,
        path: path.to_path_buf(),
        _file: file,
    };
    t.complete(store).await.map_err(|(e, t)| {
        (
            format!("{}: deferred delete: {e} (kept for the next try)", t.key),
            t,
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Metadata;
    use crate::store::memory::MemStore;
    use std::time::Duration;

    /// A dead mount's deferred delete removes the object it was made for,
    /// not a file written at the key since with the same bytes (same
    /// ETag, later Last-Modified): that one was acknowledged to its writer.
    #[tokio::test]
    async fn a_deferred_delete_spares_a_newer_object_with_the_same_bytes() {
        for (older, deleted) in [(Duration::ZERO, true), (Duration::from_secs(5), false)] {
            let dir = tempfile::tempdir().unwrap();
            let s = MemStore::unversioned();
            let put = s.insert("y", b"same bytes", Metadata::new());
            let now = s.head("y", None).await.unwrap().last_modified;
            // `older`: the object removed was last modified that long
            // before the one at the key now.
            let t = Tombstone::create(dir.path(), "y", &put.etag, Some(now - older)).unwrap();
            drop(t);
            let path = std::fs::read_dir(dir.path())
                .unwrap()
                .next()
                .unwrap()
                .unwrap()
                .path();
            recover(&s, &path).await.unwrap();
            assert_eq!(s.object("y").is_none(), deleted, "older by {older:?}");
            assert!(!path.exists(), "settled");
        }
        // An older daemon's tombstone (the ETag alone) deletes by ETag.
        let dir = tempfile::tempdir().unwrap();
        let s = MemStore::unversioned();
        let put = s.insert("y", b"old", Metadata::new());
        let path = dir.path().join(format!("{PREFIX}old"));
        std::fs::write(&path, format!("{}\ny", put.etag)).unwrap();
        recover(&s, &path).await.unwrap();
        assert!(s.object("y").is_none());
    }
}
