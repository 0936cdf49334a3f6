//! Deferred deletes. `rm` of a file that handles still read, on a bucket
//! whose reads are pinned by ETag (no versions), would pull the object from
//! under them: the DeleteObject waits for the last of them to close. Until
//! then the name is gone from this mount (unlisted, ENOENT), and a
//! tombstone under the cache dir (`unlink-<id>`, flock-owned like a
//! staging file) records key and ETag, so a killed daemon's next mount
//! finishes the delete: a removed file never comes back. The delete is
//! done only if the key still holds that ETag (a file written there since
//! is not touched).

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use tracing::{debug, warn};

use crate::store::{ObjectStore, StoreError};

pub const PREFIX: &str = "unlink-";

/// A delete waiting for the last reader.
#[derive(Debug)]
pub struct Tombstone {
    pub key: String,
    pub etag: String,
    path: PathBuf,
    /// Holds the lock while this mount owns the tombstone.
    _file: File,
}

impl Tombstone {
    /// Records that `key` (at `etag`) is to be deleted.
    pub fn create(dir: &Path, key: &str, etag: &str) -> io::Result<Tombstone> {
        let (mut file, path) = super::new_locked_file(dir, PREFIX)?;
        file.write_all(format!("{etag}\n{key}").as_bytes())?;
        Ok(Tombstone {
            key: key.to_string(),
            etag: etag.to_string(),
            path,
            _file: file,
        })
    }

    /// Deletes the object if it is still the one unlinked; the tombstone
    /// goes once that is settled. On a failure it stays for recovery.
    pub async fn complete(self, store: &dyn ObjectStore) {
        match delete_if_same(store, &self.key, &self.etag).await {
            Ok(()) => {
                let _ = std::fs::remove_file(&self.path);
            }
            Err(e) => warn!(key = %self.key, error = %e,
                "deferred delete failed; the next mount finishes it"),
        }
    }
}

async fn delete_if_same(store: &dyn ObjectStore, key: &str, etag: &str) -> Result<(), StoreError> {
    match store.head(key, None).await {
        Ok(o) if super::same_etag(&o.etag, etag) => match store.delete(key).await {
            Ok(()) | Err(StoreError::NotFound) => Ok(()),
            Err(e) => Err(e),
        },
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
pub async fn recover(store: &dyn ObjectStore, path: &Path) -> Result<(), String> {
    let Ok(mut file) = File::open(path) else {
        return Ok(());
    };
    if !super::try_lock(&file).unwrap_or(false) {
        return Ok(()); // a live mount's
    }
    let mut text = String::new();
    file.read_to_string(&mut text)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let Some((etag, key)) = text.split_once('\n') else {
        let _ = std::fs::remove_file(path);
        return Ok(());
    };
    delete_if_same(store, key, etag)
        .await
        .map_err(|e| format!("{key}: deferred delete: {e} (kept for the next try)"))?;
    let _ = std::fs::remove_file(path);
    Ok(())
}
