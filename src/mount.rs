//! Mounting and the process lifecycle: checks before mounting, the fuser
//! session, backgrounding with readiness, logging, signals and a clean
//! unmount.
//!
//! Without `-f` the process forks before any thread exists; the parent
//! waits on a pipe and exits 0 only once the child reports the mount live
//! (or exits non-zero with the child's one-line reason). SIGTERM, SIGINT
//! and `umount` upload every dirty file before the process exits; the exit
//! code says whether anything could not be uploaded.

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fuser::{Config, MountOption, Session, SessionACL};
use sha2::Digest;
use tracing::{debug, error, info, warn};
use tracing_subscriber::EnvFilter;

use crate::buckets::Buckets;
use crate::config::Options;
use crate::fs::{Defaults, Fs, FsConfig};
use crate::fuse::FuseFs;
use crate::store::s3::{RequestOptions, S3Account, S3Settings, S3Store, SseCKey};
use crate::store::{Account, ObjectStore, StoreError};
use crate::write::UploadOptions;

/// Exit codes.
pub const EXIT_OK: u8 = 0;
pub const EXIT_MOUNT_FAILED: u8 = 1;
pub const EXIT_DATA_NOT_UPLOADED: u8 = 2;

/// A failure before the mount is live: one line for the user.
#[derive(Debug)]
pub struct MountError(pub String);

/// Checks the mountpoint: it must exist, be a directory, and not be a
/// live or dead mount already.
pub fn check_mountpoint(mp: &Path, nonempty: bool) -> Result<PathBuf, MountError> {
    match std::fs::metadata(mp) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            return Err(MountError(format!(
                "{}: transport endpoint is not connected: a previous mount died; clear it with `umount -l {}` (or `fusermount3 -uz {}`) and mount again",
                mp.display(),
                mp.display(),
                mp.display()
            )));
        }
        Err(e) => return Err(MountError(format!("mountpoint {}: {e}", mp.display()))),
        Ok(m) if !m.is_dir() => {
            return Err(MountError(format!(
                "mountpoint {} is not a directory",
                mp.display()
            )));
        }
        Ok(_) => {}
    }
    let abs = std::fs::canonicalize(mp)
        .map_err(|e| MountError(format!("mountpoint {}: {e}", mp.display())))?;
    if is_mounted(&abs) {
        return Err(MountError(format!(
            "{} is already a mountpoint; unmount it first",
            abs.display()
        )));
    }
    if !nonempty && std::fs::read_dir(mp).is_ok_and(|mut d| d.next().is_some()) {
        return Err(MountError(format!(
            "mountpoint {} is not empty; mounting would hide its files (use -o nonempty to do it anyway)",
            mp.display()
        )));
    }
    Ok(abs)
}

/// Whether a path is a mountpoint, from /proc/self/mountinfo.
pub fn is_mounted(path: &Path) -> bool {
    mount_id_of(path).is_some()
}

/// Field `n` of the /proc/self/mountinfo line of the mount on `path` (the
/// topmost one): 0 is the mount's id, 2 its device (`major:minor`). Read
/// without touching the mount, which may not be served yet.
fn mountinfo_field(path: &Path, n: usize) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = path.to_string_lossy();
    info.lines()
        .rfind(|l| {
            l.split(' ')
                .nth(4)
                .is_some_and(|mp| unescape_mountinfo(mp) == want)
        })?
        .split(' ')
        .nth(n)
        .map(str::to_string)
}

/// The kernel's id of the mount on `path` (the topmost one).
fn mount_id_of(path: &Path) -> Option<u64> {
    mountinfo_field(path, 0)?.parse().ok()
}

/// Kernel read-ahead of a bucketfs mount, in KiB: reads of a file being
/// read through come as 1 MiB requests, not 128 KiB ones (FUSE takes the
/// block device default at init and ignores what the filesystem asks).
const KERNEL_READ_AHEAD_KB: u32 = 1024;

/// Sets the kernel's read-ahead of the mount on `path` (its backing
/// device's `read_ahead_kb`). Only root may: for others it stays at the
/// kernel's default, said at debug level.
fn raise_kernel_read_ahead(path: &Path) {
    let Some(dev) = mountinfo_field(path, 2) else {
        return;
    };
    let knob = format!("/sys/class/bdi/{dev}/read_ahead_kb");
    match std::fs::write(&knob, KERNEL_READ_AHEAD_KB.to_string()) {
        Ok(()) => debug!(knob, kb = KERNEL_READ_AHEAD_KB, "kernel read-ahead set"),
        Err(e) => debug!(knob, error = %e, "kernel read-ahead left at its default"),
    }
}

fn unescape_mountinfo(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// Reads an s3fs-format passwd file (`ACCESS:SECRET` or
/// `BUCKET:ACCESS:SECRET` lines); refused unless mode 0600 or stricter.
pub fn read_passwd_file(path: &Path, bucket: &str) -> Result<(String, String), MountError> {
    let meta = std::fs::metadata(path)
        .map_err(|e| MountError(format!("passwd_file {}: {e}", path.display())))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(MountError(format!(
            "passwd_file {} is readable by others (mode {:o}); chmod 600 it",
            path.display(),
            meta.permissions().mode() & 0o777
        )));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| MountError(format!("passwd_file {}: {e}", path.display())))?;
    let mut fallback = None;
    for line in text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let parts: Vec<&str> = line.split(':').collect();
        match parts.as_slice() {
            [b, a, s] if *b == bucket => return Ok((a.to_string(), s.to_string())),
            [a, s] => fallback = Some((a.to_string(), s.to_string())),
            _ => {}
        }
    }
    fallback.ok_or_else(|| {
        MountError(format!(
            "passwd_file {}: no ACCESS:SECRET line for this bucket",
            path.display()
        ))
    })
}

/// Reads an SSE-C key file (32 bytes, raw or base64); refused unless
/// mode 0600 or stricter. The error never shows the file's contents.
pub fn read_sse_c_key_file(path: &Path) -> Result<SseCKey, MountError> {
    let meta = std::fs::metadata(path)
        .map_err(|e| MountError(format!("sse_c_key_file {}: {e}", path.display())))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(MountError(format!(
            "sse_c_key_file {} is readable by others (mode {:o}); chmod 600 it",
            path.display(),
            meta.permissions().mode() & 0o777
        )));
    }
    let data = std::fs::read(path)
        .map_err(|e| MountError(format!("sse_c_key_file {}: {e}", path.display())))?;
    SseCKey::from_file_bytes(&data)
        .map_err(|e| MountError(format!("sse_c_key_file {} {e}", path.display())))
}

/// Whether `-o passthrough` can work with staged files under `cache_dir`:
/// their stamps must tell every write (fine-grained change times). Says
/// why not, as a warning.
fn passthrough_usable(cache_dir: &Path) -> bool {
    match crate::write::outside::fine_grained_times(cache_dir) {
        Ok(true) => {
            // The write-lease probe of a staged file (`written_elsewhere`)
            // makes this process the file's SIGIO owner while it holds the
            // lease: an open of it then must not kill the daemon.
            // SAFETY: setting a signal's disposition to ignore.
            unsafe { libc::signal(libc::SIGIO, libc::SIG_IGN) };
            true
        }
        Ok(false) => {
            warn!(cache_dir = %cache_dir.display(),
                "passthrough is off: the cache directory's file system does not give each write its own change time (needs Linux 6.13+ on ext4, xfs or btrfs; not tmpfs)");
            false
        }
        Err(e) => {
            warn!(cache_dir = %cache_dir.display(), error = %e, "passthrough is off: cannot write in the cache directory");
            false
        }
    }
}

/// The cache directory: `cache_dir=`, else `$XDG_CACHE_HOME/bucketfs`,
/// `/var/cache/bucketfs` for root, `$HOME/.cache/bucketfs`. Never a shared
/// directory such as /tmp, where another user could plant files first.
pub fn cache_root(o: &Options) -> Result<PathBuf, MountError> {
    if let Some(d) = &o.cache_dir {
        return Ok(d.clone());
    }
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(x) = var("XDG_CACHE_HOME") {
        return Ok(PathBuf::from(x).join("bucketfs"));
    }
    if unsafe { libc::geteuid() } == 0 {
        return Ok(PathBuf::from("/var/cache/bucketfs"));
    }
    match var("HOME") {
        Some(h) => Ok(PathBuf::from(h).join(".cache/bucketfs")),
        None => Err(MountError(
            "no cache directory: neither XDG_CACHE_HOME nor HOME is set; give one with -o cache_dir=PATH".into(),
        )),
    }
}

/// Disk for cached blocks when `cache_size` is not given: 4 GiB, at most a
/// quarter of the space free under `cache_dir` now (a small disk keeps room
/// for everything else on it), in whole MiB; 1 GiB if that cannot be told.
pub fn default_cache_size(cache_dir: &Path) -> u64 {
    const MIB: u64 = 1024 * 1024;
    let free = crate::private::free_bytes(cache_dir).unwrap_or(4 * 1024 * MIB);
    (free / 4).min(4 * 1024 * MIB) / MIB * MIB
}

fn short_hash(s: &str) -> String {
    crate::hex(&sha2::Sha256::digest(s.as_bytes())[..8])
}

/// The core's configuration for these options, with the cache under
/// `cache_dir` and cached blocks keyed by `identity` (the credentials'
/// access key id, or "" without credentials) and the SSE-C key's MD5.
pub fn fs_config(
    o: &Options,
    cache_dir: &Path,
    identity: &str,
    sse_c_md5: Option<&str>,
) -> FsConfig {
    bucket_config(o, &o.bucket, &o.prefix, cache_dir, identity, sse_c_md5)
}

/// The core's configuration of one bucket (for an `s3://` mount, each
/// bucket's; its root is then a bucket's root, not the mount's).
pub fn bucket_config(
    o: &Options,
    bucket: &str,
    prefix: &str,
    cache_dir: &Path,
    identity: &str,
    sse_c_md5: Option<&str>,
) -> FsConfig {
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let umask = o.umask;
    // Staged data of different buckets or endpoints never share a
    // directory (the same directory whether the bucket is mounted alone
    // or under s3://); cached blocks are also apart per set of
    // credentials, so one never reads what only another may read. A
    // mount with an SSE-C key has its own of both: its staged data is
    // recovered only by a mount with the same key (one without would
    // upload it unencrypted), and its blocks, held in clear, are not
    // served to a mount without the key.
    let mut store_id = format!("{}\n{bucket}", o.endpoint.as_deref().unwrap_or("aws"));
    if let Some(md5) = sse_c_md5 {
        store_id.push_str(&format!("\nsse-c {md5}"));
    }
    let store_hash = short_hash(&store_id);
    let blocks_hash = short_hash(&format!("{store_id}\n{}", short_hash(identity)));
    FsConfig {
        root_prefix: prefix.to_string(),
        defaults: Defaults {
            uid: o.uid.unwrap_or(uid),
            gid: o.gid.unwrap_or(gid),
            file_perm: umask.map_or(0o644, |m| (0o666 & !m) as u16),
            dir_perm: umask.map_or(0o755, |m| (0o777 & !m) as u16),
            dir_mtime: std::time::SystemTime::now(),
        },
        root_perm: if o.all_buckets {
            None
        } else {
            o.mp_umask.map(|m| (0o777 & !m) as u16)
        },
        metadata_ttl: o.metadata_ttl,
        read_only: o.read_only,
        staging_dir: cache_dir.join("staging").join(&store_hash),
        block_size_bytes: o.block_size_bytes,
        mem_cache_bytes: o.mem_cache_bytes,
        disk_cache_dir: cache_dir.join("blocks").join(blocks_hash),
        disk_cache_bytes: o
            .cache_size_bytes
            .unwrap_or_else(|| default_cache_size(cache_dir)),
        readahead_max_blocks: o.readahead_max_blocks,
        readahead_budget_bytes: o.readahead_budget_bytes,
        upload: UploadOptions {
            part_size_bytes: o.part_size_bytes,
            concurrency: o.upload_concurrency,
        },
        upload_retry_max: o.upload_retry_max,
        writeback_async: o.writeback_async,
        versions_visible: o.versions_visible,
        as_of: o.as_of,
        object_metadata: o.object_metadata,
        written_with: crate::write::WrittenWith {
            sse: o.sse.map(|s| s.header().to_string()),
            sse_kms_key_id: o.sse_kms_key_id.clone(),
            storage_class: o.storage_class.clone(),
        },
    }
}

/// The one line for a mount whose credentials chain found nothing.
fn no_credentials_message(o: &Options) -> String {
    let profile = o
        .profile
        .clone()
        .or_else(|| std::env::var("AWS_PROFILE").ok().filter(|p| !p.is_empty()))
        .unwrap_or_else(|| "default".into());
    format!(
        "no credentials found (looked in: environment AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, \
         profile {profile:?} in ~/.aws/credentials and ~/.aws/config, web identity, container and \
         instance metadata); set them or use -o passwd_file="
    )
}

fn describe_connect_error(o: &Options, e: &StoreError) -> String {
    let endpoint = o.endpoint.as_deref().unwrap_or("AWS S3");
    match e {
        StoreError::NoSuchBucket => format!("bucket {:?} does not exist at {endpoint}", o.bucket),
        StoreError::AccessDenied(m) => format!(
            "access to bucket {:?} denied ({m}): check the credentials (environment, profile, passwd_file)",
            o.bucket
        ),
        StoreError::Transient(m) => format!("cannot reach {endpoint}: {m}"),
        StoreError::WrongRegion(r) => format!(
            "bucket {:?} is in region {r}, not {}: use -o region={r}",
            o.bucket,
            o.region.as_deref().unwrap_or("the one configured")
        ),
        StoreError::NotFound => format!(
            "bucket {:?} not found at {endpoint} (is that an S3 endpoint?)",
            o.bucket
        ),
        other => format!(
            "bucket {:?} at {endpoint}: {other} (is that an S3 endpoint?)",
            o.bucket
        ),
    }
}

/// The `log_file=`, reopened on SIGHUP (after logrotate moved it).
struct LogFile {
    path: PathBuf,
    file: parking_lot::Mutex<std::fs::File>,
}

impl LogFile {
    fn open(path: &Path) -> std::io::Result<std::fs::File> {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
    }

    fn reopen(&self) -> std::io::Result<()> {
        *self.file.lock() = Self::open(&self.path)?;
        Ok(())
    }
}

impl Write for &LogFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.file.lock().write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.lock().flush()
    }
}

static LOG_FILE: std::sync::OnceLock<Arc<LogFile>> = std::sync::OnceLock::new();

/// How long unmount and SIGTERM wait for each dirty file to upload; what
/// does not make it stays staged for the next mount.
const SHUTDOWN_UPLOAD_LIMIT: std::time::Duration = std::time::Duration::from_secs(120);

/// Sends each log line to syslog with the priority of its level.
struct SyslogWriter {
    line: Vec<u8>,
    priority: libc::c_int,
}

impl Write for SyslogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.line.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for SyslogWriter {
    fn drop(&mut self) {
        let line = String::from_utf8_lossy(&self.line)
            .trim_end()
            .replace('\0', " ");
        if let Ok(c) = CString::new(line) {
            unsafe { libc::syslog(self.priority, c"%s".as_ptr(), c.as_ptr()) };
        }
    }
}

/// Makes a `SyslogWriter` per event, with the event's level as priority.
struct Syslog;

impl Syslog {
    fn priority(level: &tracing::Level) -> libc::c_int {
        match *level {
            tracing::Level::ERROR => libc::LOG_ERR,
            tracing::Level::WARN => libc::LOG_WARNING,
            tracing::Level::INFO => libc::LOG_INFO,
            _ => libc::LOG_DEBUG,
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Syslog {
    type Writer = SyslogWriter;

    fn make_writer(&'a self) -> SyslogWriter {
        SyslogWriter {
            line: Vec::new(),
            priority: libc::LOG_INFO,
        }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> SyslogWriter {
        SyslogWriter {
            line: Vec::new(),
            priority: Self::priority(meta.level()),
        }
    }
}

const JOURNALD_SOCKET: &str = "/run/systemd/journal/socket";
const SYSLOG_SOCKET: &str = "/dev/log";

/// Where the log goes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum LogTarget {
    /// `log_file=`, or `<cache_dir>/bucketfs.log` in the background when
    /// there is neither a journal nor a syslog socket.
    File(PathBuf),
    /// The systemd journal, natively, as `bucketfs`.
    Journald,
    /// syslog(3), as `bucketfs`, facility daemon.
    Syslog,
    /// The terminal (`-f` without `log_file=`).
    Stderr,
}

impl LogTarget {
    fn choose(o: &Options, background: bool) -> Result<LogTarget, MountError> {
        Ok(if let Some(path) = &o.log_file {
            LogTarget::File(path.clone())
        } else if !background {
            LogTarget::Stderr
        } else if Path::new(JOURNALD_SOCKET).exists() {
            LogTarget::Journald
        } else if Path::new(SYSLOG_SOCKET).exists() {
            LogTarget::Syslog
        } else {
            LogTarget::File(cache_root(o)?.join("bucketfs.log"))
        })
    }

    /// One line for the user, before the process leaves the terminal.
    fn describe(&self) -> String {
        match self {
            LogTarget::File(p) => format!("logging to {}", p.display()),
            LogTarget::Journald => "logging to journald (journalctl -t bucketfs)".into(),
            LogTarget::Syslog => format!(
                "logging to syslog via {SYSLOG_SOCKET} (identifier bucketfs, facility daemon)"
            ),
            LogTarget::Stderr => "logging to stderr".into(),
        }
    }
}

/// The default filter: bucketfs at info, fuser only at error (it logs
/// "Unmount failed" at a clean unmount and a multi-line WARN for each
/// operation it does not implement), and not its "Failed to send FUSE
/// reply" (a reply the kernel no longer waits for: a release answered
/// after the unmount began, an interrupted request; nothing is lost),
/// everything else at warn. `-v`: bucketfs at debug and fuser at warn.
/// RUST_LOG overrides both.
fn default_filter(verbose: bool) -> &'static str {
    if verbose {
        "bucketfs=debug,fuser=warn,warn"
    } else {
        "bucketfs=info,fuser=error,fuser::reply=off,warn"
    }
}

fn init_logging(target: &LogTarget, verbose: bool) -> Result<(), MountError> {
    use std::io::IsTerminal;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;

    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(default_filter(verbose)));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let result = match target {
        LogTarget::File(path) => {
            let file = LogFile::open(path)
                .map_err(|e| MountError(format!("log file {}: {e}", path.display())))?;
            let log = Arc::new(LogFile {
                path: path.clone(),
                file: parking_lot::Mutex::new(file),
            });
            let _ = LOG_FILE.set(log.clone());
            builder.with_ansi(false).with_writer(log).try_init()
        }
        LogTarget::Journald => {
            use tracing_journald::{Priority, PriorityMappings};
            let layer = tracing_journald::layer()
                .map_err(|e| MountError(format!("journald ({JOURNALD_SOCKET}): {e}")))?
                .with_syslog_identifier("bucketfs".into())
                .with_priority_mappings(PriorityMappings {
                    error: Priority::Error,
                    warn: Priority::Warning,
                    info: Priority::Informational,
                    debug: Priority::Debug,
                    trace: Priority::Debug,
                });
            let filter = EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new(default_filter(verbose)));
            tracing_subscriber::registry()
                .with(filter)
                .with(layer)
                .try_init()
                .map_err(|e| MountError(format!("logging: {e}")))?;
            return Ok(());
        }
        LogTarget::Syslog => {
            unsafe { libc::openlog(c"bucketfs".as_ptr(), libc::LOG_PID, libc::LOG_DAEMON) };
            builder
                .with_ansi(false)
                .without_time()
                .with_writer(Syslog)
                .try_init()
        }
        LogTarget::Stderr => builder
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .try_init(),
    };
    result.map_err(|e| MountError(format!("logging: {e}")))
}

/// Mounts /dev/fuse on `mountpoint` as type `fuse.s3fs` with `source` as
/// its source, as libfuse does for a subtype. `None` where mount(2) is not
/// permitted (not root): fusermount3 mounts it then, as type `fuse`.
fn mount_fuse_s3fs(
    mountpoint: &Path,
    source: &str,
    o: &Options,
    acl: SessionACL,
) -> std::io::Result<Option<OwnedFd>> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/fuse")?;
    let mode = std::fs::metadata(mountpoint)?.permissions().mode();
    let mut data = format!(
        "fd={},rootmode={:o},user_id={},group_id={}",
        dev.as_raw_fd(),
        mode & libc::S_IFMT,
        unsafe { libc::getuid() },
        unsafe { libc::getgid() }
    );
    if o.default_permissions {
        data += ",default_permissions";
    }
    if acl != SessionACL::Owner {
        data += ",allow_other";
    }
    let mut flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOATIME;
    if o.read_only {
        flags |= libc::MS_RDONLY;
    }
    if o.noexec {
        flags |= libc::MS_NOEXEC;
    }
    let c = |s: &[u8]| CString::new(s).map_err(std::io::Error::other);
    let (src, target) = (
        c(source.as_bytes())?,
        c(mountpoint.as_os_str().as_encoded_bytes())?,
    );
    let (fstype, data) = (c(b"fuse.s3fs")?, c(data.as_bytes())?);
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EPERM) => Ok(None),
            _ => Err(e),
        };
    }
    Ok(Some(dev.into()))
}

/// Forks; the parent waits for the child's readiness report and exits.
/// Returns the write end of the pipe in the child. Once the mount is live
/// the parent prints `where_logs_go` (the one line a user sees, since the
/// daemon has no terminal); a failure stays the one line of its reason.
fn daemonize(where_logs_go: &str) -> Result<OwnedFd, MountError> {
    let mut fds = [0; 2];
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(MountError(format!(
            "pipe: {}",
            std::io::Error::last_os_error()
        )));
    }
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    match unsafe { libc::fork() } {
        -1 => Err(MountError(format!(
            "fork: {}",
            std::io::Error::last_os_error()
        ))),
        0 => {
            drop(r);
            unsafe { libc::setsid() };
            Ok(w)
        }
        _ => {
            drop(w);
            let mut msg = String::new();
            let _ = std::fs::File::from(r).read_to_string(&mut msg);
            if msg == "OK" {
                eprintln!("bucketfs: {where_logs_go}");
                std::process::exit(EXIT_OK.into());
            }
            if msg.is_empty() {
                msg = "bucketfs exited before the mount was ready".into();
            }
            eprintln!("bucketfs: {}", msg.trim_end());
            std::process::exit(EXIT_MOUNT_FAILED.into());
        }
    }
}

fn detach_stdio() {
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        use std::os::fd::AsRawFd;
        for fd in 0..3 {
            unsafe { libc::dup2(null.as_raw_fd(), fd) };
        }
    }
}

/// Mounts and serves until unmounted. Returns the process exit code.
pub fn run(o: Options, verbose: bool) -> u8 {
    let mut ready = None;
    let result = (|| {
        let mountpoint = check_mountpoint(&o.mountpoint, o.nonempty)?;
        crate::private::check_cache_dir(&cache_root(&o)?).map_err(MountError)?;
        let static_keys = match &o.passwd_file {
            Some(p) => Some(read_passwd_file(p, &o.bucket)?),
            None => None,
        };
        let sse_c = match &o.sse_c_key_file {
            Some(p) => Some(read_sse_c_key_file(p)?),
            None => None,
        };
        let log_target = LogTarget::choose(&o, !o.foreground)?;
        if !o.foreground {
            ready = Some(daemonize(&log_target.describe())?);
        }
        init_logging(&log_target, verbose)?;
        crate::fs::start_background_purge();
        serve(&o, &mountpoint, static_keys, sse_c, &mut ready)
    })();
    match result {
        Ok(code) => code,
        Err(MountError(msg)) => {
            match ready.take() {
                Some(w) => {
                    let _ = std::fs::File::from(w).write_all(msg.as_bytes());
                }
                None => eprintln!("bucketfs: {msg}"),
            }
            error!("{msg}");
            EXIT_MOUNT_FAILED
        }
    }
}

/// Connects to one bucket (following it to its region unless -o region=
/// was given) and starts its core, recovering what a killed mount staged.
fn connect_one(
    o: &Options,
    rt: &tokio::runtime::Runtime,
    mut settings: S3Settings,
) -> Result<Buckets, MountError> {
    let mut store = rt
        .block_on(S3Store::connect(&settings))
        .map_err(|e| MountError(describe_connect_error(o, &e)))?;
    // No credentials at all is said as such, not as the "access denied"
    // the first request would end in.
    let identity = rt
        .block_on(store.access_key_id())
        .ok_or_else(|| MountError(no_credentials_message(o)))?;
    match rt.block_on(store.check_bucket()) {
        // The region came from the environment or a profile (as `aws
        // configure` sets it), not from -o region=: the bucket's own wins.
        Err(StoreError::WrongRegion(r)) if o.region.is_none() && !r.is_empty() => {
            info!(region = %r, "following the bucket to its region");
            settings.region = Some(r);
            store = rt
                .block_on(S3Store::connect(&settings))
                .map_err(|e| MountError(describe_connect_error(o, &e)))?;
            rt.block_on(store.check_bucket())
                .map_err(|e| MountError(describe_connect_error(o, &e)))?;
        }
        r => r.map_err(|e| MountError(describe_connect_error(o, &e)))?,
    }
    let store: Arc<dyn ObjectStore> = Arc::new(store);
    let sse_c_md5 = settings.requests.sse_c.as_ref().map(SseCKey::md5_b64);
    let cfg = fs_config(o, &cache_root(o)?, &identity, sse_c_md5);
    crate::private::create_private_dir(&cfg.staging_dir)
        .map_err(|e| MountError(format!("cache dir {}: {e}", cfg.staging_dir.display())))?;
    let fs = Arc::new(Fs::new(store, cfg));
    // What a killed daemon staged is taken over (served from its staged
    // copy at once) and uploaded in the background once the mount is live;
    // what cannot be looked at yet (S3 down) is tried again later.
    rt.block_on(crate::buckets::start_core(&fs));
    Ok(Buckets::one(fs))
}

/// Connects to the account of an `s3://` mount: its buckets are listed
/// (which checks the credentials), and those with data a killed mount
/// staged are opened now to recover it.
fn connect_all(
    o: &Options,
    rt: &tokio::runtime::Runtime,
    settings: S3Settings,
) -> Result<Buckets, MountError> {
    let account = rt.block_on(S3Account::connect(&settings));
    let identity = rt
        .block_on(account.access_key_id())
        .ok_or_else(|| MountError(no_credentials_message(o)))?;
    let endpoint = o.endpoint.as_deref().unwrap_or("AWS S3");
    let names = rt
        .block_on(account.list_buckets())
        .map_err(|e| MountError(match e {
            StoreError::AccessDenied(m) => format!(
                "listing the buckets of the account at {endpoint} was denied ({m}): check the credentials (environment, profile, passwd_file), and that they may ListBuckets"
            ),
            StoreError::Transient(m) => format!("cannot reach {endpoint}: {m}"),
            other => format!("listing the buckets at {endpoint}: {other} (is that an S3 endpoint?)"),
        }))?;
    debug!(buckets = names.len(), "account listed");
    let cache_dir = cache_root(o)?;
    let opts = o.clone();
    let sse_c_md5 = settings
        .requests
        .sse_c
        .as_ref()
        .map(|k| k.md5_b64().to_string());
    let config_for: crate::buckets::ConfigFor = Box::new(move |bucket| {
        bucket_config(
            &opts,
            bucket,
            "",
            &cache_dir,
            &identity,
            sse_c_md5.as_deref(),
        )
    });
    let d = fs_config(o, &cache_root(o)?, "", None).defaults;
    let top = crate::buckets::TopConfig {
        defaults: d,
        root_perm: o.mp_umask.map(|m| (0o777 & !m) as u16),
        ttl: o.metadata_ttl,
        read_only: o.read_only || o.as_of.is_some(),
        block_size: o.block_size_bytes,
    };
    let buckets = Buckets::all(Arc::new(account), config_for, top);
    if let Err(e) = rt.block_on(buckets.recover_all()) {
        warn!(error = %e, "could not look for what a killed mount staged; buckets recover when opened");
    }
    Ok(buckets)
}

/// The runtime's threads: one per CPU (tokio's own default). Fewer
/// (`io_threads=1` on two CPUs) keeps a request that waits for the one
/// before it on the thread that sent it: 1,000 random reads beside two
/// CPU-bound loops went from 107 to 124 reads/s. But 1,000 small files
/// were written 10-20% slower, each upload waiting its turn on the one
/// thread, so the default stays.
fn io_threads_default() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn serve(
    o: &Options,
    mountpoint: &Path,
    static_keys: Option<(String, String)>,
    sse_c: Option<SseCKey>,
    ready: &mut Option<OwnedFd>,
) -> Result<u8, MountError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(o.io_threads.unwrap_or_else(io_threads_default))
        .enable_all()
        .thread_name("bucketfs-io")
        .on_thread_park(crate::fs::thread_idle)
        .build()
        .map_err(|e| MountError(format!("runtime: {e}")))?;
    let settings = S3Settings {
        bucket: o.bucket.clone(),
        endpoint: o.endpoint.clone(),
        region: o.region.clone(),
        path_style: o.path_style,
        profile: o.profile.clone(),
        static_keys,
        attempt_timeout: o.timeout,
        max_attempts: o.max_attempts,
        retry_time: o.retry_time,
        long_timeout: o.long_timeout,
        requests: RequestOptions {
            sse: o.sse.map(|s| s.header().to_string()),
            sse_kms_key_id: o.sse_kms_key_id.clone(),
            sse_c,
            storage_class: o.storage_class.clone(),
            acl: o.default_acl.clone(),
            requester_pays: o.requester_pays,
        },
        fast_head: true,
        send_memory: o.upload_memory_bytes,
    };
    let buckets = if o.all_buckets {
        connect_all(o, &rt, settings)?
    } else {
        connect_one(o, &rt, settings)?
    };
    let buckets = Arc::new(buckets);

    let mut mount_options = vec![
        MountOption::FSName(if o.all_buckets {
            "s3://".to_string()
        } else {
            format!(
                "{}{}",
                o.bucket,
                if o.prefix.is_empty() {
                    String::new()
                } else {
                    format!(":/{}", o.prefix.trim_end_matches('/'))
                }
            )
        }),
        MountOption::Subtype("s3fs".into()),
        MountOption::NoAtime,
    ];
    if o.default_permissions {
        mount_options.push(MountOption::DefaultPermissions);
    }
    if o.read_only {
        mount_options.push(MountOption::RO);
    }
    for (on, opt) in [
        (o.nosuid, MountOption::NoSuid),
        (o.nodev, MountOption::NoDev),
        (o.noexec, MountOption::NoExec),
    ] {
        if on {
            mount_options.push(opt);
        }
    }
    let mut config = Config::default();
    config.mount_options = mount_options;
    // Several threads take requests, each on its own clone of the device:
    // the kernel wakes a waiting one, and with one per CPU a writer's
    // next request is picked up on its own CPU rather than by a thread
    // parked on an idle one (100,000 small writes: 3x faster on 2 vCPUs).
    config.n_threads = Some(o.fuse_threads.unwrap_or_else(|| {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        (cpus + 1).clamp(2, 16)
    }));
    // A clone per thread needs /dev/fuse opened again by this process
    // (not only by fusermount3): where it cannot be, the threads share
    // the one descriptor (slower for small writes, not wrong).
    config.clone_fd = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .is_ok();
    config.acl = if o.allow_other {
        SessionACL::All
    } else if o.allow_root {
        SessionACL::RootAndOwner
    } else {
        SessionACL::Owner
    };
    let posix_acl = o.default_permissions && o.object_metadata;
    let fuse = FuseFs::new(
        buckets.clone(),
        rt.handle().clone(),
        posix_acl,
        o.passthrough && passthrough_usable(&cache_root(o)?),
    );
    let kernel = fuse.kernel_slot();
    let source = match &config.mount_options[0] {
        MountOption::FSName(s) => s.clone(),
        _ => o.bucket.clone(),
    };
    let mount_err =
        |e: std::io::Error| MountError(format!("mounting on {}: {e}", mountpoint.display()));
    // As root, mount(2) directly as type fuse.s3fs (findmnt -t, df -t and
    // monitoring tell the mount apart); otherwise fusermount3 mounts it.
    let (session, mut unmounter) =
        match mount_fuse_s3fs(mountpoint, &source, o, config.acl).map_err(mount_err)? {
            Some(fd) => (
                Session::from_fd(fuse, fd, config.acl, config.clone()).map_err(mount_err)?,
                None,
            ),
            None => {
                let mut s = Session::new(fuse, mountpoint, &config).map_err(mount_err)?;
                let u = s.unmount_callable();
                (s, Some(u))
            }
        };
    let _ = kernel.set(session.notifier());
    buckets.set_mount_id(mount_id_of(mountpoint).unwrap_or(0));
    raise_kernel_read_ahead(mountpoint);
    let info = crate::status::MountInfo {
        bucket: o.bucket.clone(),
        prefix: o.prefix.clone(),
        endpoint: o.endpoint.clone().unwrap_or_else(|| "AWS S3".into()),
        mountpoint: mountpoint.to_path_buf(),
    };
    let info_for_signals = info.clone();
    let socket = {
        let _guard = rt.enter();
        crate::status::serve(buckets.clone(), info)
    };
    info!(bucket = %if o.all_buckets { "s3://" } else { &o.bucket }, prefix = %o.prefix, mountpoint = %mountpoint.display(), "mounted");
    if let Some(w) = ready.take() {
        let _ = std::fs::File::from(w).write_all(b"OK");
        detach_stdio();
    }

    // SIGTERM / SIGINT: upload everything dirty, then unmount. Files still
    // open keep working on the detached mount and are uploaded when closed;
    // a second signal ends the process at once (after one more upload).
    let fs_sig = buckets.clone();
    let mp = mountpoint.to_path_buf();
    rt.spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: uploading dirty files, then unmounting"),
            _ = int.recv() => info!("SIGINT: uploading dirty files, then unmounting"),
        }
        let failed = fs_sig.sync_all(SHUTDOWN_UPLOAD_LIMIT).await;
        if !failed.is_empty() {
            error!(files = ?failed, "not uploaded; kept for the next mount");
        }
        let unmounted = match unmounter.as_mut() {
            Some(u) => u.unmount().is_ok(),
            None => CString::new(mp.as_os_str().as_encoded_bytes())
                .is_ok_and(|c| unsafe { libc::umount2(c.as_ptr(), 0) } == 0),
        };
        if !unmounted {
            // Busy: detach now; the session ends when the last file closes.
            if let Ok(c) = CString::new(mp.as_os_str().as_encoded_bytes()) {
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
            info!(mountpoint = %mp.display(), "detached; waiting for open files to close");
        }
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        let failed = fs_sig.sync_all(SHUTDOWN_UPLOAD_LIMIT).await;
        error!(not_uploaded = ?failed, "second signal: exiting with files still open");
        std::process::exit(
            if failed.is_empty() {
                EXIT_OK
            } else {
                EXIT_DATA_NOT_UPLOADED
            }
            .into(),
        );
    });

    // SIGHUP reopens the log file (logrotate); SIGUSR1 writes the status to
    // the log; SIGUSR2 is ignored. None of them ends the daemon.
    let fs_usr = buckets.clone();
    let usr_info = info_for_signals;
    rt.spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut hup), Ok(mut usr1), Ok(mut usr2)) = (
            signal(SignalKind::hangup()),
            signal(SignalKind::user_defined1()),
            signal(SignalKind::user_defined2()),
        ) else {
            return;
        };
        loop {
            tokio::select! {
                _ = hup.recv() => match LOG_FILE.get().map(|l| l.reopen()) {
                    Some(Err(e)) => error!(error = %e, "SIGHUP: could not reopen the log file"),
                    Some(Ok(())) => info!("SIGHUP: log file reopened"),
                    None => info!("SIGHUP: nothing to reopen (logging to the journal, syslog or stderr)"),
                },
                _ = usr1.recv() => {
                    for line in crate::status::report(&fs_usr, &usr_info).lines() {
                        info!("status: {line}");
                    }
                }
                _ = usr2.recv() => debug!("SIGUSR2 ignored"),
            }
        }
    });

    let run = session.run();
    let failed = rt.block_on(async {
        let failed = buckets.sync_all(SHUTDOWN_UPLOAD_LIMIT).await;
        buckets.settle(std::time::Duration::from_secs(5)).await;
        failed
    });
    if let Some(s) = socket {
        s.remove();
    }
    match run {
        // A connection aborted (`umount -l`, `fusectl abort`): with several
        // threads reading, one of them may see ECONNABORTED where fuser
        // only takes ENODEV as the end. The uploads above ran all the same.
        Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => {
            debug!(error = %e, "FUSE connection aborted")
        }
        Err(e) => error!(error = %e, "FUSE session ended with an error"),
        Ok(()) => {}
    }
    info!("unmounted");
    rt.shutdown_timeout(std::time::Duration::from_secs(5));
    if failed.is_empty() {
        Ok(EXIT_OK)
    } else {
        error!(files = ?failed, "these files could not be uploaded");
        Ok(EXIT_DATA_NOT_UPLOADED)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without `cache_size`, the disk tier takes 4 GiB, or a quarter of
    /// what is free where it lives when that is less; a cache directory
    /// not made yet is measured on the nearest directory that exists.
    #[test]
    fn the_default_disk_cache_fits_the_disk_it_is_on() {
        const MIB: u64 = 1024 * 1024;
        let dir = tempfile::tempdir().unwrap();
        let not_yet = dir.path().join("a/b/cache");
        let before = crate::private::free_bytes(&not_yet).unwrap();
        let size = default_cache_size(&not_yet);
        let after = crate::private::free_bytes(dir.path()).unwrap();
        let (lo, hi) = (before.min(after), before.max(after));
        assert_eq!(size % MIB, 0);
        assert!(
            size <= 4 * 1024 * MIB && size <= hi / 4,
            "{size} of {hi} free"
        );
        assert!(
            size + MIB >= (lo / 4).min(4 * 1024 * MIB),
            "{size} of {lo} free"
        );
        assert!(crate::private::free_bytes(Path::new("/no/such/dir/at/all")).is_some());
    }
}
