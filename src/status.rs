//! `bucketfs status MOUNTPOINT`: a live mount answers on a unix socket
//! (mode 0600, under $XDG_RUNTIME_DIR/bucketfs or /run/bucketfs) with a
//! plain-text report: bucket, endpoint, uptime, files with data not yet in
//! S3, cache use and hit rate, S3 requests by type. Never credentials.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tracing::warn;

use crate::fs::Fs;

/// What the report says about the mount itself.
#[derive(Clone, Debug)]
pub struct MountInfo {
    pub bucket: String,
    pub prefix: String,
    pub endpoint: String,
    pub mountpoint: PathBuf,
}

fn runtime_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
        return PathBuf::from(d).join("bucketfs");
    }
    if unsafe { libc::geteuid() } == 0 {
        PathBuf::from("/run/bucketfs")
    } else {
        std::env::temp_dir().join(format!("bucketfs-{}", unsafe { libc::geteuid() }))
    }
}

/// The socket of the mount on `mountpoint` (an absolute, canonical
/// path): named by a hash of the path, so no two mountpoints share one
/// (`/x/x_y` and `/x/x/y` did when `/` became `_`).
pub fn socket_path(mountpoint: &Path) -> PathBuf {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(mountpoint.as_os_str().as_encoded_bytes());
    let name = crate::hex(&digest[..16]);
    runtime_dir().join(format!("{name}.sock"))
}

/// A status socket this mount created; removed only if it is still the
/// same file (a later mount of the same path may have replaced it).
#[derive(Debug)]
pub struct Socket {
    path: PathBuf,
    id: (u64, u64),
}

fn file_id(p: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(p)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

impl Socket {
    pub fn remove(&self) {
        if file_id(&self.path) == Some(self.id) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The report text.
pub fn report(fs: &Fs, info: &MountInfo) -> String {
    let mut s = String::new();
    let up = fs.started.elapsed().as_secs();
    s += &format!("mountpoint: {}\n", info.mountpoint.display());
    s += &format!(
        "bucket:     {}{}\n",
        info.bucket,
        if info.prefix.is_empty() {
            String::new()
        } else {
            format!(":/{}", info.prefix)
        }
    );
    s += &format!("endpoint:   {}\n", info.endpoint);
    s += &format!(
        "uptime:     {}h{:02}m{:02}s\n",
        up / 3600,
        up / 60 % 60,
        up % 60
    );
    let dirty = fs.dirty_files();
    s += &format!("not yet in S3: {} file(s)\n", dirty.len());
    for f in dirty {
        let (path, size) = (&f.path, f.size);
        match f.progress {
            Some((done, total)) => {
                s += &format!(
                    "  {path} ({size} bytes staged, uploading: {done} of {total} bytes sent)\n"
                )
            }
            None => s += &format!("  {path} ({size} bytes staged)\n"),
        }
        if let Some(e) = &f.last_error {
            s += &format!("    last error: {e}\n");
        }
        if let Some(n) = f.next_try_secs {
            s += &format!("    next try in {n} s\n");
        }
    }
    let c = fs.block_cache();
    let hits = c.stats.hits.load(Ordering::Relaxed);
    let disk_hits = c.stats.disk_hits.load(Ordering::Relaxed);
    let misses = c.stats.misses.load(Ordering::Relaxed);
    let all = hits + disk_hits + misses;
    let rate = if all == 0 {
        0.0
    } else {
        100.0 * (hits + disk_hits) as f64 / all as f64
    };
    s += &format!(
        "block cache: {} bytes in memory, {} bytes on disk; {hits} memory hits, {disk_hits} disk hits, {misses} misses ({rate:.1}% hit rate)\n",
        c.mem_bytes(),
        c.disk_bytes()
    );
    s += "S3 requests:\n";
    let counts = fs.store().counters().snapshot();
    if counts.is_empty() {
        s += "  none\n";
    }
    for (op, n) in counts {
        s += &format!("  {:<20} {n}\n", op.name());
    }
    let (sent, received) = fs.store().counters().bytes();
    s += &format!("bytes sent: {sent}\nbytes received: {received}\n");
    s
}

/// Serves the report on the mount's socket until the runtime ends.
pub fn serve(fs: Arc<Fs>, info: MountInfo) -> Option<Socket> {
    let path = socket_path(&info.mountpoint);
    let dir = path.parent()?.to_path_buf();
    if let Err(e) = crate::private::create_private_dir(&dir) {
        warn!(dir = %dir.display(), error = %e, "no status socket");
        return None;
    }
    // A socket left by a killed mount of this same mountpoint.
    let _ = std::fs::remove_file(&path);
    let listener = match tokio::net::UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            warn!(path = %path.display(), error = %e, "no status socket");
            return None;
        }
    };
    let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
    let id = file_id(&path)?;
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let text = report(&fs, &info);
            let _ =
                tokio::time::timeout(Duration::from_secs(5), conn.write_all(text.as_bytes())).await;
        }
    });
    Some(Socket { path, id })
}

/// The client: prints the report of the mount on `mountpoint`.
pub fn print(mountpoint: &Path) -> Result<(), String> {
    let abs =
        std::fs::canonicalize(mountpoint).map_err(|e| format!("{}: {e}", mountpoint.display()))?;
    let path = socket_path(&abs);
    let mut conn = UnixStream::connect(&path).map_err(|e| {
        format!(
            "no live bucketfs mount on {} ({}: {e})",
            abs.display(),
            path.display()
        )
    })?;
    conn.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let mut text = String::new();
    conn.read_to_string(&mut text)
        .map_err(|e| format!("reading status: {e}"))?;
    std::io::stdout()
        .write_all(text.as_bytes())
        .map_err(|e| e.to_string())
}
