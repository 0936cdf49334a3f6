//! `bucketfs status MOUNTPOINT`: a live mount answers on a unix socket
//! (mode 0600, under $XDG_RUNTIME_DIR/bucketfs or /run/bucketfs) with a
//! plain-text report: bucket, endpoint, uptime, files with data not yet in
//! S3, cache use and hit rate, S3 requests by type. Never credentials.
//!
//! The client writes its request and closes its side: nothing is the
//! report; `url\tPATH\tSECONDS` asks for a presigned GET URL of the file
//! at PATH (relative to the mountpoint), made by the daemon, which holds
//! the credentials (`bucketfs url`).

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::warn;

use crate::buckets::Buckets;

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
pub fn report(b: &Buckets, info: &MountInfo) -> String {
    let mut s = String::new();
    let up = b.started.elapsed().as_secs();
    s += &format!("mountpoint: {}\n", info.mountpoint.display());
    if b.is_all() {
        let open = b.open_buckets();
        s += &format!(
            "buckets:    s3:// (every bucket of the account; {} opened{}{})\n",
            open.len(),
            if open.is_empty() { "" } else { ": " },
            open.join(", ")
        );
    } else {
        s += &format!(
            "bucket:     {}{}\n",
            info.bucket,
            if info.prefix.is_empty() {
                String::new()
            } else {
                format!(":/{}", info.prefix)
            }
        );
    }
    s += &format!("endpoint:   {}\n", info.endpoint);
    s += &format!(
        "uptime:     {}h{:02}m{:02}s\n",
        up / 3600,
        up / 60 % 60,
        up % 60
    );
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        s += &format!("io threads: {}\n", rt.metrics().num_workers());
    }
    let dirty = b.dirty_files();
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
    let deletes = b.failed_deletes();
    if !deletes.is_empty() {
        s += &format!(
            "deletes not yet in S3: {} (files removed while read; retried)\n",
            deletes.len()
        );
        for (key, e) in deletes {
            s += &format!("  {key}\n    last error: {e}\n");
        }
    }
    let (mem, disk, hits, disk_hits, misses) = b.cache_totals();
    let all = hits + disk_hits + misses;
    let rate = if all == 0 {
        0.0
    } else {
        100.0 * (hits + disk_hits) as f64 / all as f64
    };
    s += &format!(
        "block cache: {mem} bytes in memory, {disk} bytes on disk; {hits} memory hits, {disk_hits} disk hits, {misses} misses ({rate:.1}% hit rate)\n",
    );
    s += &format!(
        "directory reads answered: {} (none while the kernel serves a listing it kept)\n",
        b.dir_reads()
    );
    s += "S3 requests:\n";
    let counts = b.requests();
    if counts.is_empty() {
        s += "  none\n";
    }
    for (op, n) in counts {
        s += &format!("  {:<20} {n}\n", op.name());
    }
    let (sent, received) = b.bytes();
    s += &format!("bytes sent: {sent}\nbytes received: {received}\n");
    s += &format!("bytes sent from memory: {}\n", b.sent_from_memory());
    s
}

/// Longest request a client may send.
const REQUEST_MAX_BYTES: u64 = 64 * 1024;

/// Longest a presigned URL may live: SigV4's limit, seven days.
pub const URL_MAX_EXPIRES_SECS: u64 = 7 * 24 * 3600;

/// The answer to one request: the report, or `url ...`'s
/// `OK URL` / `ERR message` line.
async fn answer(b: &Buckets, info: &MountInfo, request: &str) -> String {
    let request = request.trim_end_matches('\n');
    if request.is_empty() {
        return report(b, info);
    }
    let parts: Vec<&str> = request.split('\t').collect();
    match parts.as_slice() {
        ["url", path, secs] => {
            let Some(secs) = secs
                .parse::<u64>()
                .ok()
                .filter(|s| (1..=URL_MAX_EXPIRES_SECS).contains(s))
            else {
                return format!("ERR --expires must be 1..={URL_MAX_EXPIRES_SECS} seconds\n");
            };
            match b.presign(path, Duration::from_secs(secs)).await {
                Ok(url) => format!("OK {url}\n"),
                Err(e) => format!("ERR {}\n", e.replace('\n', " ")),
            }
        }
        _ => "ERR unknown request\n".to_string(),
    }
}

/// Serves the report on the mount's socket until the runtime ends.
pub fn serve(b: Arc<Buckets>, info: MountInfo) -> Option<Socket> {
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
            let (b, info) = (b.clone(), info.clone());
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut limited = (&mut conn).take(REQUEST_MAX_BYTES);
                let read = limited.read_to_end(&mut request);
                let _ = tokio::time::timeout(Duration::from_secs(5), read).await;
                let text = answer(&b, &info, &String::from_utf8_lossy(&request)).await;
                let _ =
                    tokio::time::timeout(Duration::from_secs(5), conn.write_all(text.as_bytes()))
                        .await;
            });
        }
    });
    Some(Socket { path, id })
}

/// Connects to a status socket served by this user or root, no one else:
/// without XDG_RUNTIME_DIR the socket's directory is a predictable name
/// under /tmp, which another user may have made first, with a socket of
/// their own in it answering with what they like.
fn connect(path: &Path) -> std::io::Result<UnixStream> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    // The socket itself, not a link another user put there to another
    // mount's socket (whose server would pass the check below).
    let md = std::fs::symlink_metadata(path)?;
    if !md.file_type().is_socket() || (md.uid() != me && md.uid() != 0) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!("{} is not a socket of this user or root", path.display()),
        ));
    }
    let conn = UnixStream::connect(path)?;
    let mut cred = libc::ucred {
        pid: 0,
        uid: u32::MAX,
        gid: u32::MAX,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` is a ucred and `len` its size, as SO_PEERCRED wants.
    let r = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if cred.uid != me && cred.uid != 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!("served by uid {}, neither this user nor root", cred.uid),
        ));
    }
    Ok(conn)
}

/// The client: prints the report of the mount on `mountpoint`.
pub fn print(mountpoint: &Path) -> Result<(), String> {
    let abs =
        std::fs::canonicalize(mountpoint).map_err(|e| format!("{}: {e}", mountpoint.display()))?;
    let path = socket_path(&abs);
    let mut conn = connect(&path).map_err(|e| {
        format!(
            "no live bucketfs mount on {} ({}: {e})",
            abs.display(),
            path.display()
        )
    })?;
    conn.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let _ = conn.shutdown(std::net::Shutdown::Write);
    let mut text = String::new();
    conn.read_to_string(&mut text)
        .map_err(|e| format!("reading status: {e}"))?;
    std::io::stdout()
        .write_all(text.as_bytes())
        .map_err(|e| e.to_string())
}

/// The client of `bucketfs url`: a presigned GET URL of the file at
/// `path`, from the bucketfs mount it lives under.
pub fn presigned_url(path: &Path, expires_secs: u64) -> Result<String, String> {
    let abs = std::fs::canonicalize(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if !abs.is_file() {
        return Err(format!("{}: not a file", abs.display()));
    }
    // The innermost ancestor with a live status socket is the mount.
    let (mountpoint, mut conn) = abs
        .ancestors()
        .skip(1)
        .find_map(|dir| Some((dir, connect(&socket_path(dir)).ok()?)))
        .ok_or_else(|| format!("{} is not under a live bucketfs mount", abs.display()))?;
    let rel = abs
        .strip_prefix(mountpoint)
        .map_err(|_| format!("{} is not under {}", abs.display(), mountpoint.display()))?;
    let rel = rel
        .to_str()
        .ok_or_else(|| format!("{}: not a UTF-8 name", abs.display()))?;
    conn.set_read_timeout(Some(Duration::from_secs(30))).ok();
    conn.write_all(format!("url\t{rel}\t{expires_secs}\n").as_bytes())
        .map_err(|e| format!("asking {}: {e}", mountpoint.display()))?;
    let _ = conn.shutdown(std::net::Shutdown::Write);
    let mut text = String::new();
    conn.read_to_string(&mut text)
        .map_err(|e| format!("reading the answer: {e}"))?;
    match text.trim_end().split_once(' ') {
        Some(("OK", url)) => Ok(url.to_string()),
        Some(("ERR", e)) => Err(e.to_string()),
        _ => Err(format!(
            "{} did not answer (a bucketfs older than `bucketfs url`?)",
            mountpoint.display()
        )),
    }
}
