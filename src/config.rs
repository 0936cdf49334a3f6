//! Mount options: one vocabulary for `-o`, /etc/fstab and the mount(8)
//! helper, with defaults and validation. No I/O here.
//!
//! s3fs-fuse's common option names are accepted as aliases so an existing
//! fstab line keeps working; options that mean nothing to bucketfs are
//! accepted with a notice, never silently.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

const MIB: u64 = 1024 * 1024;
const TIB: u64 = 1024 * 1024 * MIB;
/// S3's smallest part of a multipart upload (all but the last).
const MIN_PART_BYTES: u64 = 5 * MIB;
/// S3's largest part.
const MAX_PART_BYTES: u64 = 5 * 1024 * MIB;

/// Everything a mount is configured with.
#[derive(Clone, Debug, PartialEq)]
pub struct Options {
    /// The bucket; empty for `s3://` (every bucket of the account).
    pub bucket: String,
    /// `s3://`: every bucket of the account, each a top-level directory.
    pub all_buckets: bool,
    /// Key prefix mounted as the root: "" or ending with '/'.
    pub prefix: String,
    pub mountpoint: PathBuf,
    pub foreground: bool,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub path_style: bool,
    pub profile: Option<String>,
    pub passwd_file: Option<PathBuf>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub umask: Option<u32>,
    pub mp_umask: Option<u32>,
    pub allow_other: bool,
    pub allow_root: bool,
    pub read_only: bool,
    pub default_permissions: bool,
    pub nosuid: bool,
    pub nodev: bool,
    pub noexec: bool,
    /// Mount over a directory that is not empty (hiding its contents).
    pub nonempty: bool,
    pub metadata_ttl: Duration,
    pub cache_dir: Option<PathBuf>,
    pub mem_cache_bytes: u64,
    /// Disk for cached blocks (`None`: `DEFAULT_CACHE_SIZE`, at most a
    /// quarter of the space free under `cache_dir` at mount).
    pub cache_size_bytes: Option<u64>,
    pub block_size_bytes: u64,
    pub part_size_bytes: u64,
    pub upload_concurrency: usize,
    /// Memory for staged bytes being sent (0: each part is read from its
    /// staged file as it is sent).
    pub upload_memory_bytes: u64,
    /// Threads reading FUSE requests (`None`: the CPUs plus one, 2..=16).
    pub fuse_threads: Option<usize>,
    /// Threads running S3 requests and the tasks around them (`None`:
    /// one per CPU; see `io_threads_default`).
    pub io_threads: Option<usize>,
    pub readahead_max_blocks: u64,
    /// Read-ahead in flight across all open files (None: half of mem_cache).
    pub readahead_budget_bytes: Option<u64>,
    pub versions_visible: bool,
    pub as_of: Option<SystemTime>,
    /// Use objects' x-amz-meta-* mode/uid/gid/mtime (off: mount defaults).
    pub object_metadata: bool,
    pub log_file: Option<PathBuf>,
    /// Per-attempt connect and read timeout.
    pub timeout: Duration,
    /// Attempts per S3 call (the first included).
    pub max_attempts: u32,
    /// Time budget of the retries of one S3 call.
    pub retry_time: Duration,
    /// First-byte timeout of calls S3 may take minutes to answer
    /// (CompleteMultipartUpload, CopyObject, UploadPartCopy).
    pub long_timeout: Duration,
    /// Cap of the backoff between background retries of a failed upload.
    pub upload_retry_max: Duration,
    /// `writeback=async`: close() returns once the data is staged and
    /// journaled; the upload runs in the background.
    pub writeback_async: bool,
    /// `passthrough`: the kernel writes (and reads) a file created or
    /// emptied through this mount straight to its staged copy.
    pub passthrough: bool,
    /// Server-side encryption with S3- or KMS-managed keys (`sse=`).
    pub sse: Option<Sse>,
    /// The KMS key of `sse=aws:kms` (`sse_kms_key_id=`); None: the
    /// bucket's default key.
    pub sse_kms_key_id: Option<String>,
    /// A file holding the SSE-C key (`sse_c_key_file=`); read at mount.
    pub sse_c_key_file: Option<PathBuf>,
    /// SSE-C over plain http (the key would cross the network in clear).
    pub allow_http_sse_c: bool,
    /// Storage class of every object written, upper case.
    pub storage_class: Option<String>,
    /// `x-amz-request-payer: requester` on every request.
    pub requester_pays: bool,
    /// Canned ACL of every object written; None: none sent.
    pub default_acl: Option<String>,
    /// `use_sse=custom` was given (its key file may come with `load_sse_c=`).
    pub sse_c_wanted: bool,
}

/// Server-side encryption with keys S3 or KMS manage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sse {
    /// `AES256` (SSE-S3).
    S3,
    /// `aws:kms` (SSE-KMS).
    Kms,
    /// `aws:kms:dsse` (dual-layer SSE-KMS).
    KmsDsse,
}

impl Sse {
    /// The `x-amz-server-side-encryption` value.
    pub fn header(self) -> &'static str {
        match self {
            Sse::S3 => "AES256",
            Sse::Kms => "aws:kms",
            Sse::KmsDsse => "aws:kms:dsse",
        }
    }
}

/// S3's storage classes, as `x-amz-storage-class` spells them.
pub const STORAGE_CLASSES: [&str; 11] = [
    "STANDARD",
    "REDUCED_REDUNDANCY",
    "STANDARD_IA",
    "ONEZONE_IA",
    "INTELLIGENT_TIERING",
    "GLACIER",
    "DEEP_ARCHIVE",
    "OUTPOSTS",
    "GLACIER_IR",
    "SNOW",
    "EXPRESS_ONEZONE",
];

/// S3's canned ACLs.
pub const CANNED_ACLS: [&str; 7] = [
    "private",
    "public-read",
    "public-read-write",
    "authenticated-read",
    "aws-exec-read",
    "bucket-owner-read",
    "bucket-owner-full-control",
];

impl Default for Options {
    fn default() -> Self {
        Options {
            bucket: String::new(),
            all_buckets: false,
            prefix: String::new(),
            mountpoint: PathBuf::new(),
            foreground: false,
            endpoint: None,
            region: None,
            path_style: false,
            profile: None,
            passwd_file: None,
            uid: None,
            gid: None,
            umask: None,
            mp_umask: None,
            allow_other: false,
            allow_root: false,
            read_only: false,
            default_permissions: true,
            nosuid: false,
            nodev: false,
            noexec: false,
            nonempty: false,
            metadata_ttl: Duration::from_secs(5),
            cache_dir: None,
            mem_cache_bytes: 64 * MIB,
            cache_size_bytes: None,
            block_size_bytes: MIB,
            part_size_bytes: 8 * MIB,
            upload_concurrency: 8,
            upload_memory_bytes: 64 * MIB,
            fuse_threads: None,
            io_threads: None,
            readahead_max_blocks: 32,
            readahead_budget_bytes: None,
            versions_visible: false,
            as_of: None,
            object_metadata: true,
            log_file: None,
            timeout: Duration::from_secs(10),
            max_attempts: 11,
            retry_time: Duration::from_secs(45),
            long_timeout: Duration::from_secs(300),
            upload_retry_max: Duration::from_secs(300),
            writeback_async: false,
            passthrough: false,
            sse: None,
            sse_kms_key_id: None,
            sse_c_key_file: None,
            allow_http_sse_c: false,
            storage_class: None,
            requester_pays: false,
            default_acl: None,
            sse_c_wanted: false,
        }
    }
}

/// A bad option or value, said in one line.
#[derive(Debug, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// Every option, its default and meaning: `--help` and README print this.
pub const OPTION_HELP: &str = "\
Mount options (-o a,b=c; the same names work in /etc/fstab):
  endpoint=URL          S3 endpoint (default: AWS). s3fs alias: url=URL.
                        A value that is not a URL is taken as a region (s3fs).
  region=NAME           region (default: environment/profile, else discovered); under
                        s3:// the region mkdir creates buckets in
  path_style            path-style addressing (MinIO, Ceph, Garage, moto).
                        s3fs alias: use_path_request_style
  profile=NAME          AWS profile from the shared config/credentials files
  passwd_file=PATH      s3fs-format ACCESS:SECRET or BUCKET:ACCESS:SECRET; must be 0600
  uid=N, gid=N          owner of objects without ownership metadata (default: mounting user)
  umask=OOO             mode of objects without mode metadata: 0666/0777 & ~umask
                        (default: files 0644, directories 0755)
  mp_umask=OOO          mode of the mount root: 0777 & ~mp_umask
  allow_other           let other users access the mount
  allow_root            let root access the mount
  ro | rw               read-only mount (default rw)
  nosuid, nodev, noexec the usual mount flags
  nonempty              mount over a directory that is not empty (refused otherwise)
  no_default_permissions  do not let the kernel check modes (default: it does)
  metadata_ttl=SECS     how long attributes and listings are trusted (default 5)
  no_object_metadata    ignore x-amz-meta-mode/uid/gid/mtime: every object has the
                        mount's uid, gid and umask; chmod/chown fail (EPERM);
                        ls -l costs LISTs only (no HEAD per entry)
  cache_dir=PATH        staging and cache directory (default $XDG_CACHE_HOME/bucketfs
                        or /var/cache/bucketfs as root). s3fs alias: use_cache=
  mem_cache=SIZE        memory for cached blocks (default 64M)
  cache_size=SIZE       disk for cached blocks under cache_dir (default 4G, at most a
                        quarter of the space free there at mount; 0 = none)
  block_size=SIZE       read block size, 64K..64M (default 1M)
  readahead=N           read-ahead window, in blocks (default 32; 0 = none; max 256)
  readahead_budget=SIZE read-ahead in flight across all open files, 1M..1T
                        (default: half of mem_cache)
  part_size=SIZE        multipart part size, 5M..5G (default 8M; grows to fit 10,000 parts).
                        s3fs alias: multipart_size=MB
  upload_concurrency=N  parts uploaded in parallel (default 8). s3fs alias: parallel_count=
  upload_memory=SIZE    memory for parts and files being sent, across all files and
                        buckets (default 64M): each is read from its staged file once,
                        into it; what does not fit is read from the file as it is sent
                        (0 = always so)
  fuse_threads=N        threads taking requests from the kernel, 1..64 (default: the
                        CPUs plus one, 2..16; a small write then wakes a thread on its
                        own CPU, not an idle one elsewhere)
  io_threads=N          threads running S3 requests, 1..64 (default: one per CPU; 1 on a
                        small, busy machine speeds up random reads, slows small files)
  versions=visible      list .versions in readdir (default: hidden, reachable by name)
  as_of=RFC3339         read-only view of the bucket at that moment
  timeout=SECS          connect/read timeout of one S3 attempt (default 10)
  retries=N             retries of a failed S3 call (default 10), with backoff
  retry_time=SECS       time budget of one S3 call's retries (default 45)
  long_timeout=SECS     first-byte timeout of CompleteMultipartUpload, CopyObject and
                        UploadPartCopy, which S3 may take minutes to answer (default 300)
  upload_retry_max=SECS longest wait between background retries of a failed upload
                        (default 300; staged data is kept and retried until it lands)
  writeback=async       close() returns once the data is staged and journaled on the
                        cache disk (a kill -9 still loses nothing); uploads run in the
                        background; fsync and unmount wait for them; a rename, chmod
                        or utimes before the upload only changes it. Default: sync
                        (close() returns once the data is in S3)
  passthrough           a file created or emptied (O_TRUNC) through this mount is
                        written by the kernel straight to its staged copy (FUSE
                        passthrough): small writes at local-disk speed, still
                        uploaded at close and kept through a kill -9. Its upload
                        starts at close (no parts sent while it is written). Needs
                        Linux 6.13+, root, a cache_dir with fine-grained times
                        (ext4, xfs, btrfs; not tmpfs); off with a warning otherwise
  sse=AES256|aws:kms|aws:kms:dsse
                        server-side encryption of every object written (and copied).
                        s3fs aliases: use_sse, use_sse=1, use_sse=kmsid[:KEY_ID]
  sse_kms_key_id=ID     KMS key of sse=aws:kms (default: the bucket's AWS managed key)
  sse_c_key_file=PATH   SSE-C: encrypt and read with the 32-byte key in PATH (raw or
                        base64; the file must be 0600 or stricter). s3fs aliases:
                        use_sse=custom:PATH, load_sse_c=PATH. Refused over http://
                        unless allow_http_sse_c is given
  storage_class=CLASS   storage class of every object written (STANDARD_IA, GLACIER_IR...)
  requester_pays        send x-amz-request-payer on every request (Requester Pays buckets)
  default_acl=CANNED    canned ACL of every object written (private, public-read...);
                        none is sent unless given. Alias: acl=
  log_file=PATH         log here instead of the journal, syslog or stderr
                        (reopened on SIGHUP, for logrotate)
Ignored (fstab/systemd): defaults, _netdev, nofail, auto, noauto, user, users,
  x-systemd.*, comment=*, dev, suid, exec, atime, noatime, async
SIZE takes K, M, G suffixes (powers of 1024).

Logs: with -f, to stderr. In the background, to the systemd journal when it
runs (read them with: journalctl -t bucketfs), else to syslog (identifier
bucketfs), else to CACHE_DIR/bucketfs.log; the command says which once mounted.
-o log_file=PATH sends them to a file instead. The level is info (fuser's own
messages: errors only); -v adds debug; RUST_LOG overrides both, e.g.
RUST_LOG=bucketfs=debug or RUST_LOG=bucketfs=trace,fuser=debug.";

/// Options that mount(8), fstab and systemd pass but mean nothing here.
fn is_ignored(name: &str) -> bool {
    matches!(
        name,
        "defaults"
            | "_netdev"
            | "nofail"
            | "auto"
            | "noauto"
            | "user"
            | "users"
            | "dev"
            | "suid"
            | "exec"
            | "atime"
            | "noatime"
            | "relatime"
            | "async"
            | "rw"
    ) || name.starts_with("x-systemd.")
        || name.starts_with("x-")
        || name == "comment"
}

/// s3fs-fuse options we accept but that have no effect here.
fn is_noop_s3fs(name: &str) -> bool {
    matches!(
        name,
        "dbglevel"
            | "curldbg"
            | "stat_cache_expire"
            | "enable_noobj_cache"
            | "complement_stat"
            | "use_xattr"
            | "nomultipart"
            | "sigv2"
            | "sigv4"
            | "retries_s3fs"
            | "connect_timeout"
            | "readwrite_timeout"
            | "max_stat_cache_size"
            | "del_cache"
            | "ensure_diskfree"
            | "mp_umask_s3fs"
            | "iam_role"
            | "instance_name"
    )
}

pub fn parse_size(v: &str) -> Result<u64, String> {
    let v = v.trim();
    let (num, mult) = match v.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1024,
                'M' => MIB,
                'G' => 1024 * MIB,
                'T' => 1024 * 1024 * MIB,
                _ => return Err(format!("bad size {v:?}")),
            };
            (&v[..i], m)
        }
        _ => (v, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("bad size {v:?}"))
}

fn parse_num<T: std::str::FromStr>(name: &str, v: &str) -> Result<T, ConfigError> {
    v.trim()
        .parse()
        .map_err(|_| ConfigError(format!("option {name}: {v:?} is not a valid number")))
}

/// A number within `lo..=hi`; the error names the option and the range.
fn num_in<T>(name: &str, v: &str, lo: T, hi: T, unit: &str) -> Result<T, ConfigError>
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy,
{
    let n: T = parse_num(name, v)?;
    if n >= lo && n <= hi {
        Ok(n)
    } else {
        Err(ConfigError(format!(
            "option {name}: {v} is outside {lo}..={hi}{unit}"
        )))
    }
}

/// A size (K, M, G, T suffixes) within `lo..=hi` bytes, or 0 when
/// `zero_ok`; the error names the option and the range.
fn size_in(name: &str, v: &str, lo: u64, hi: u64, zero_ok: bool) -> Result<u64, ConfigError> {
    let n = parse_size(v).map_err(|e| ConfigError(format!("option {name}: {e}")))?;
    if (lo..=hi).contains(&n) || (zero_ok && n == 0) {
        Ok(n)
    } else {
        Err(ConfigError(format!(
            "option {name}: {v} is outside {}{}..={}",
            if zero_ok { "0 (none) or " } else { "" },
            show_size(lo),
            show_size(hi)
        )))
    }
}

/// 5242880 -> "5M".
fn show_size(n: u64) -> String {
    for (unit, m) in [
        ("T", 1024 * 1024 * MIB),
        ("G", 1024 * MIB),
        ("M", MIB),
        ("K", 1024),
    ] {
        if n >= m && n.is_multiple_of(m) {
            return format!("{}{unit}", n / m);
        }
    }
    n.to_string()
}

fn parse_octal(name: &str, v: &str) -> Result<u32, ConfigError> {
    u32::from_str_radix(v.trim(), 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| {
            ConfigError(format!(
                "option {name}: {v:?} is not an octal mode within 0..=7777"
            ))
        })
}

fn need<'a>(name: &str, v: Option<&'a str>) -> Result<&'a str, ConfigError> {
    v.filter(|v| !v.is_empty())
        .ok_or_else(|| ConfigError(format!("option {name} needs a value ({name}=...)")))
}

fn is_url(v: &str) -> bool {
    v.starts_with("http://") || v.starts_with("https://")
}

impl Options {
    /// Splits `BUCKET[:/PREFIX]` (or `s3://BUCKET/PREFIX/`, the form of
    /// Mountpoint for Amazon S3 and the AWS CLI) into bucket and prefix;
    /// `s3://` alone is every bucket of the account.
    pub fn set_source(&mut self, spec: &str) -> Result<(), ConfigError> {
        if let Some(rest) = spec.strip_prefix("s3://")
            && rest.trim_matches('/').is_empty()
        {
            self.bucket = String::new();
            self.prefix = String::new();
            self.all_buckets = true;
            return Ok(());
        }
        let spec = spec.strip_prefix("s3://").unwrap_or(spec);
        let (bucket, prefix) = match spec.split_once(':') {
            Some((b, p)) => (b, p),
            None => match spec.split_once('/') {
                Some((b, p)) => (b, p),
                None => (spec, ""),
            },
        };
        if bucket.is_empty() || bucket.contains(['/', ' ']) || bucket.starts_with('-') {
            return Err(ConfigError(format!(
                "invalid bucket name {bucket:?} (BUCKET, BUCKET:/PREFIX, s3://BUCKET/PREFIX/ or s3:// for every bucket)"
            )));
        }
        self.bucket = bucket.to_string();
        self.all_buckets = false;
        let p = prefix.trim_matches('/');
        self.prefix = if p.is_empty() {
            String::new()
        } else {
            format!("{p}/")
        };
        Ok(())
    }

    /// Checks what no single option can: called once every option is in.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.sse_c_wanted && self.sse_c_key_file.is_none() {
            return Err(ConfigError(
                "option use_sse=custom: needs the key file: use_sse=custom:PATH or load_sse_c=PATH"
                    .into(),
            ));
        }
        if self.sse_c_key_file.is_some() {
            if let Some(s) = self.sse {
                return Err(ConfigError(format!(
                    "option sse: {} and a customer key (sse_c_key_file) cannot both encrypt an object; choose one",
                    s.header()
                )));
            }
            if let Some(e) = self
                .endpoint
                .as_deref()
                .filter(|e| e.starts_with("http://"))
                && !self.allow_http_sse_c
            {
                return Err(ConfigError(format!(
                    "option sse_c_key_file: the endpoint {e} is plain http and the key would cross the network in clear; use https or add allow_http_sse_c"
                )));
            }
        }
        if self.sse_kms_key_id.is_some() && !matches!(self.sse, Some(Sse::Kms | Sse::KmsDsse)) {
            return Err(ConfigError(
                "option sse_kms_key_id: needs sse=aws:kms or sse=aws:kms:dsse".into(),
            ));
        }
        if self.mem_cache_bytes < self.block_size_bytes {
            return Err(ConfigError(format!(
                "option mem_cache: {} is smaller than block_size ({}); it must hold at least one block",
                show_size(self.mem_cache_bytes),
                show_size(self.block_size_bytes)
            )));
        }
        Ok(())
    }

    /// s3fs-fuse's `use_sse`: `use_sse` or `use_sse=1` is SSE-S3;
    /// `kmsid[:ID]` (or `k:ID`) SSE-KMS; `custom:PATH` (or `c:PATH`) SSE-C
    /// with the key in PATH; `custom` alone takes the key from `load_sse_c=`.
    fn apply_use_sse(&mut self, value: Option<&str>) -> Result<(), ConfigError> {
        let v = value.unwrap_or("1");
        let (kind, arg) = match v.split_once(':') {
            Some((k, a)) => (k, Some(a)),
            None => (v, None),
        };
        match (kind, arg) {
            ("1" | "AES256", None) => self.sse = Some(Sse::S3),
            ("kmsid" | "k", arg) => {
                self.sse = Some(Sse::Kms);
                if let Some(id) = arg {
                    if id.is_empty() {
                        return Err(ConfigError("option use_sse: kmsid: needs a key id".into()));
                    }
                    self.sse_kms_key_id = Some(id.to_string());
                }
            }
            ("custom" | "c", Some(path)) if !path.is_empty() => {
                self.sse_c_key_file = Some(PathBuf::from(path))
            }
            // The key file comes with load_sse_c=; validate() checks it did.
            ("custom" | "c", None) => {}
            _ => {
                return Err(ConfigError(format!(
                    "option use_sse: {v:?} is not 1, kmsid[:KEY_ID] or custom:KEY_FILE"
                )));
            }
        }
        // Remembered so validate() can say custom needs a key file.
        if matches!(kind, "custom" | "c") {
            self.sse_c_wanted = true;
        }
        Ok(())
    }

    /// Applies a comma-separated option string. Returns notices to print
    /// (options accepted without effect).
    pub fn apply(&mut self, opts: &str) -> Result<Vec<String>, ConfigError> {
        let mut notices = Vec::new();
        for opt in opts.split(',').map(str::trim).filter(|o| !o.is_empty()) {
            let (name, value) = match opt.split_once('=') {
                Some((n, v)) => (n.trim(), Some(v.trim())),
                None => (opt, None),
            };
            match name {
                "endpoint" | "url" => {
                    let v = need(name, value)?;
                    if is_url(v) {
                        self.endpoint = Some(v.trim_end_matches('/').to_string());
                    } else if name == "endpoint" {
                        // s3fs-fuse's endpoint= is a region name.
                        self.region = Some(v.to_string());
                    } else {
                        return Err(ConfigError(format!(
                            "option url: {v:?} is not an http:// or https:// URL"
                        )));
                    }
                }
                "region" => self.region = Some(need(name, value)?.to_string()),
                "path_style" | "use_path_request_style" => self.path_style = true,
                "profile" => self.profile = Some(need(name, value)?.to_string()),
                "passwd_file" => self.passwd_file = Some(PathBuf::from(need(name, value)?)),
                // u32::MAX is (uid_t)-1, "no owner" to the kernel.
                "uid" => self.uid = Some(num_in(name, need(name, value)?, 0, u32::MAX - 1, "")?),
                "gid" => self.gid = Some(num_in(name, need(name, value)?, 0, u32::MAX - 1, "")?),
                "umask" => self.umask = Some(parse_octal(name, need(name, value)?)?),
                "mp_umask" => self.mp_umask = Some(parse_octal(name, need(name, value)?)?),
                "allow_other" => self.allow_other = true,
                "allow_root" => self.allow_root = true,
                "ro" => self.read_only = true,
                "default_permissions" => self.default_permissions = true,
                "no_default_permissions" => self.default_permissions = false,
                "nosuid" => self.nosuid = true,
                "nodev" => self.nodev = true,
                "noexec" => self.noexec = true,
                "nonempty" => self.nonempty = true,
                "no_object_metadata" => self.object_metadata = false,
                "passthrough" => self.passthrough = true,
                "metadata_ttl" => {
                    let s = num_in(name, need(name, value)?, 0.0, 86_400.0, " seconds")?;
                    self.metadata_ttl = Duration::from_secs_f64(s);
                }
                "cache_dir" | "use_cache" => {
                    self.cache_dir = Some(PathBuf::from(need(name, value)?))
                }
                "mem_cache" => {
                    self.mem_cache_bytes = size_in(name, need(name, value)?, MIB, TIB, false)?
                }
                "cache_size" => {
                    self.cache_size_bytes =
                        Some(size_in(name, need(name, value)?, MIB, 1024 * TIB, true)?)
                }
                "block_size" => {
                    self.block_size_bytes =
                        size_in(name, need(name, value)?, 64 * 1024, 64 * MIB, false)?
                }
                "writeback" => {
                    self.writeback_async = match need(name, value)? {
                        "async" => true,
                        "sync" => false,
                        v => {
                            return Err(ConfigError(format!(
                                "option writeback: {v:?} is not sync or async"
                            )));
                        }
                    }
                }
                // 0: no read-ahead, each read fetches only its own blocks.
                "readahead" => {
                    self.readahead_max_blocks =
                        num_in(name, need(name, value)?, 0, 256, " blocks (0: none)")?
                }
                "upload_memory" => {
                    self.upload_memory_bytes = size_in(name, need(name, value)?, MIB, TIB, true)?
                }
                "readahead_budget" => {
                    self.readahead_budget_bytes =
                        Some(size_in(name, need(name, value)?, MIB, TIB, false)?)
                }
                // S3's limits: parts of 5 MiB to 5 GiB (the last may be smaller).
                "part_size" => {
                    self.part_size_bytes = size_in(
                        name,
                        need(name, value)?,
                        MIN_PART_BYTES,
                        MAX_PART_BYTES,
                        false,
                    )?
                }
                "multipart_size" => {
                    let mb: u64 = num_in(
                        name,
                        need(name, value)?,
                        MIN_PART_BYTES / MIB,
                        MAX_PART_BYTES / MIB,
                        " MB",
                    )?;
                    self.part_size_bytes = mb * MIB;
                }
                "upload_concurrency" | "parallel_count" => {
                    self.upload_concurrency = num_in(name, need(name, value)?, 1, 256, "")?
                }
                "fuse_threads" => {
                    self.fuse_threads = Some(num_in(name, need(name, value)?, 1, 64, "")?)
                }
                "io_threads" => {
                    self.io_threads = Some(num_in(name, need(name, value)?, 1, 64, "")?)
                }
                "versions" => match need(name, value)? {
                    "visible" => self.versions_visible = true,
                    "hidden" => self.versions_visible = false,
                    v => {
                        return Err(ConfigError(format!(
                            "option versions: {v:?} is not visible or hidden"
                        )));
                    }
                },
                "as_of" => {
                    let v = need(name, value)?;
                    let t = humantime::parse_rfc3339_weak(v).map_err(|_| {
                        ConfigError(format!(
                            "option as_of: {v:?} is not an RFC 3339 time (2026-11-21T10:00:00Z)"
                        ))
                    })?;
                    self.as_of = Some(t);
                    self.read_only = true;
                }
                "timeout" => {
                    let s = num_in(name, need(name, value)?, 1, 3600, " seconds")?;
                    self.timeout = Duration::from_secs(s);
                }
                "retries" => {
                    self.max_attempts = num_in::<u32>(name, need(name, value)?, 0, 100, "")? + 1
                }
                "retry_time" | "long_timeout" | "upload_retry_max" => {
                    let s = num_in(name, need(name, value)?, 1, 86_400, " seconds")?;
                    let d = Duration::from_secs(s);
                    match name {
                        "retry_time" => self.retry_time = d,
                        "long_timeout" => self.long_timeout = d,
                        _ => self.upload_retry_max = d,
                    }
                }
                "sse" => {
                    self.sse = Some(match need(name, value)? {
                        "AES256" => Sse::S3,
                        "aws:kms" => Sse::Kms,
                        "aws:kms:dsse" => Sse::KmsDsse,
                        v => {
                            return Err(ConfigError(format!(
                                "option sse: {v:?} is not AES256, aws:kms or aws:kms:dsse"
                            )));
                        }
                    })
                }
                "sse_kms_key_id" => self.sse_kms_key_id = Some(need(name, value)?.to_string()),
                "use_sse" => self.apply_use_sse(value)?,
                "sse_c_key_file" | "load_sse_c" => {
                    self.sse_c_key_file = Some(PathBuf::from(need(name, value)?))
                }
                "allow_http_sse_c" => self.allow_http_sse_c = true,
                "storage_class" => {
                    let v = need(name, value)?.to_ascii_uppercase();
                    if !STORAGE_CLASSES.contains(&v.as_str()) {
                        return Err(ConfigError(format!(
                            "option storage_class: {v:?} is not one of {}",
                            STORAGE_CLASSES.join(", ")
                        )));
                    }
                    self.storage_class = Some(v);
                }
                "requester_pays" => self.requester_pays = true,
                "default_acl" | "acl" => {
                    let v = need(name, value)?;
                    if !CANNED_ACLS.contains(&v) {
                        return Err(ConfigError(format!(
                            "option {name}: {v:?} is not a canned ACL ({})",
                            CANNED_ACLS.join(", ")
                        )));
                    }
                    self.default_acl = Some(v.to_string());
                }
                "log_file" => self.log_file = Some(PathBuf::from(need(name, value)?)),
                n if is_ignored(n) => {}
                n if is_noop_s3fs(n) => notices.push(format!(
                    "option {n} is accepted but has no effect in bucketfs"
                )),
                n => {
                    return Err(ConfigError(format!(
                        "unknown option {n:?} (see bucketfs --help)"
                    )));
                }
            }
        }
        Ok(notices)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn s3fs_fstab_line_parses() {
        let mut o = Options::default();
        let n = o
            .apply("_netdev,allow_other,url=http://127.0.0.1:9000/,use_path_request_style,endpoint=eu-west-1,uid=1000,umask=022,multipart_size=16,parallel_count=4,x-systemd.automount,use_sse,dbglevel=info")
            .unwrap();
        assert_eq!(o.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(o.region.as_deref(), Some("eu-west-1"));
        assert!(o.path_style && o.allow_other);
        assert_eq!((o.uid, o.umask), (Some(1000), Some(0o22)));
        assert_eq!((o.part_size_bytes, o.upload_concurrency), (16 * MIB, 4));
        assert_eq!(o.sse, Some(Sse::S3));
        assert_eq!(n.len(), 1, "dbglevel gets a notice, use_sse none");
    }

    #[test]
    fn bad_options_are_refused_with_their_name() {
        for (opt, word) in [
            ("frobnicate", "frobnicate"),
            ("uid=abc", "uid"),
            ("umask=999", "umask"),
            ("region", "region"),
            ("as_of=yesterday", "as_of"),
            ("versions=maybe", "versions"),
            ("url=ftp://x", "url"),
        ] {
            let err = Options::default().apply(opt).unwrap_err();
            assert!(err.0.contains(word), "{opt}: {err}");
        }
    }

    /// Every numeric option is checked by range at mount time, and the
    /// refusal names the option and the range in one line.
    #[test]
    fn numeric_options_are_bounded() {
        let ok = |opt: &str| {
            let mut o = Options::default();
            o.apply(opt).unwrap_or_else(|e| panic!("{opt}: {e}"));
            o
        };
        let refused = |opt: &str, range: &str| {
            let err = Options::default().apply(opt).unwrap_err().0;
            let name = opt.split('=').next().unwrap();
            assert!(
                err.starts_with(&format!("option {name}: ")) && err.contains(range),
                "{opt}: {err:?} should name {range:?}"
            );
            assert!(!err.contains('\n'));
        };
        // S3's part limits, in both spellings.
        assert_eq!(ok("part_size=5M").part_size_bytes, 5 * MIB);
        assert_eq!(ok("part_size=5G").part_size_bytes, 5 * 1024 * MIB);
        refused("part_size=4M", "5M..=5G");
        refused("part_size=6G", "5M..=5G");
        refused("part_size=0", "5M..=5G");
        assert_eq!(ok("multipart_size=5").part_size_bytes, 5 * MIB);
        refused("multipart_size=4", "5..=5120 MB");
        refused("multipart_size=5121", "5..=5120 MB");
        // Concurrency, retries, read-ahead.
        assert_eq!(ok("upload_concurrency=1").upload_concurrency, 1);
        refused("upload_concurrency=0", "1..=256");
        refused("parallel_count=257", "1..=256");
        assert_eq!(ok("fuse_threads=1").fuse_threads, Some(1));
        assert_eq!(ok("").fuse_threads, None);
        refused("fuse_threads=0", "1..=64");
        refused("fuse_threads=65", "1..=64");
        assert_eq!(ok("io_threads=3").io_threads, Some(3));
        assert_eq!(ok("").io_threads, None);
        refused("io_threads=0", "1..=64");
        refused("io_threads=65", "1..=64");
        assert_eq!(ok("readahead=0").readahead_max_blocks, 0);
        assert_eq!(ok("readahead=256").readahead_max_blocks, 256);
        refused("readahead=257", "0..=256 blocks");
        assert_eq!(
            ok("readahead_budget=256M").readahead_budget_bytes,
            Some(256 * MIB)
        );
        refused("readahead_budget=0", "1M..=1T");
        assert_eq!(ok("upload_memory=0").upload_memory_bytes, 0);
        assert_eq!(ok("upload_memory=1G").upload_memory_bytes, 1024 * MIB);
        refused("upload_memory=1K", "1M..=1T");
        assert!(ok("writeback=async").writeback_async);
        assert!(!ok("writeback=sync").writeback_async);
        assert!(ok("passthrough").passthrough && !ok("ro").passthrough);
        refused("writeback=later", "is not sync or async");
        refused("readahead=-1", "is not a valid number");
        assert_eq!(ok("retries=0").max_attempts, 1);
        refused("retries=101", "0..=100");
        // Sizes.
        assert_eq!(ok("block_size=64K").block_size_bytes, 64 * 1024);
        refused("block_size=32K", "64K..=64M");
        refused("block_size=128M", "64K..=64M");
        refused("mem_cache=0", "1M..=1T");
        refused("mem_cache=2T", "1M..=1T");
        assert_eq!(ok("cache_size=0").cache_size_bytes, Some(0));
        refused("cache_size=1K", "0 (none) or 1M..=1024T");
        // Timeouts are > 0.
        for t in ["timeout", "retry_time", "long_timeout", "upload_retry_max"] {
            ok(&format!("{t}=1"));
            refused(&format!("{t}=0"), "1..=");
        }
        refused("timeout=3601", "1..=3600 seconds");
        refused("long_timeout=86401", "1..=86400 seconds");
        assert_eq!(ok("metadata_ttl=0").metadata_ttl, Duration::ZERO);
        refused("metadata_ttl=-1", "0..=86400 seconds");
        refused("metadata_ttl=NaN", "0..=86400 seconds");
        refused("metadata_ttl=inf", "0..=86400 seconds");
        // Owners and modes.
        assert_eq!(ok("uid=0").uid, Some(0));
        refused("uid=4294967295", "0..=4294967294");
        refused("gid=-1", "is not a valid number");
        refused("umask=10000", "0..=7777");
        // What depends on two options is checked once all are in.
        let mut o = ok("block_size=4M");
        o.apply("mem_cache=2M").unwrap();
        let err = o.validate().unwrap_err().0;
        assert!(
            err.contains("mem_cache") && err.contains("block_size"),
            "{err}"
        );
        assert!(Options::default().validate().is_ok());
    }

    /// Every S3 feature option and s3fs alias lands in the options, and
    /// a bad value is one line naming the option.
    #[test]
    fn s3_feature_options_parse_and_refuse() {
        let ok = |opt: &str| {
            let mut o = Options::default();
            o.apply(opt).unwrap_or_else(|e| panic!("{opt}: {e}"));
            o.validate().unwrap_or_else(|e| panic!("{opt}: {e}"));
            o
        };
        let refused = |opt: &str, word: &str| {
            let mut o = Options::default();
            let err = match o.apply(opt) {
                Err(e) => e.0,
                Ok(_) => o.validate().expect_err(opt).0,
            };
            assert!(err.contains(word), "{opt}: {err:?} should name {word:?}");
            assert!(!err.contains('\n'), "{opt}: one line");
        };
        assert_eq!(ok("sse=AES256").sse, Some(Sse::S3));
        assert_eq!(ok("use_sse").sse, Some(Sse::S3));
        assert_eq!(ok("use_sse=1").sse, Some(Sse::S3));
        let o = ok("sse=aws:kms,sse_kms_key_id=arn:aws:kms:eu-west-1:1:key/k");
        assert_eq!(
            (o.sse, o.sse_kms_key_id.as_deref()),
            (Some(Sse::Kms), Some("arn:aws:kms:eu-west-1:1:key/k"))
        );
        let o = ok("use_sse=kmsid:arn:aws:kms:eu-west-1:1:key/k");
        assert_eq!(
            (o.sse, o.sse_kms_key_id.as_deref()),
            (Some(Sse::Kms), Some("arn:aws:kms:eu-west-1:1:key/k"))
        );
        assert_eq!(ok("use_sse=kmsid").sse_kms_key_id, None);
        assert_eq!(ok("sse=aws:kms:dsse").sse, Some(Sse::KmsDsse));
        for opt in [
            "sse_c_key_file=/k",
            "load_sse_c=/k",
            "use_sse=custom:/k",
            "use_sse=custom,load_sse_c=/k",
        ] {
            let o = ok(opt);
            assert_eq!(o.sse_c_key_file.as_deref(), Some(Path::new("/k")), "{opt}");
            assert_eq!(o.sse, None);
        }
        assert_eq!(
            ok("storage_class=standard_ia").storage_class.as_deref(),
            Some("STANDARD_IA")
        );
        assert!(ok("requester_pays").requester_pays);
        assert_eq!(
            ok("default_acl=private").default_acl.as_deref(),
            Some("private")
        );
        assert_eq!(
            ok("acl=public-read").default_acl.as_deref(),
            Some("public-read")
        );
        assert_eq!(Options::default().default_acl, None, "no ACL unless given");
        refused("sse=aes256", "option sse");
        refused("sse=", "option sse");
        refused("use_sse=2", "option use_sse");
        refused("use_sse=kmsid:", "option use_sse");
        refused("use_sse=custom", "use_sse=custom");
        refused("sse_kms_key_id=k", "sse_kms_key_id");
        refused("sse=AES256,sse_kms_key_id=k", "sse_kms_key_id");
        refused("sse=AES256,sse_c_key_file=/k", "option sse");
        refused("storage_class=COLD", "option storage_class");
        refused("default_acl=public", "option default_acl");
        refused("acl=everyone", "option acl");
        refused(
            "endpoint=http://127.0.0.1:9000,sse_c_key_file=/k",
            "allow_http_sse_c",
        );
        let o = ok("endpoint=http://127.0.0.1:9000,sse_c_key_file=/k,allow_http_sse_c");
        assert!(o.allow_http_sse_c);
        ok("endpoint=https://s3.example,sse_c_key_file=/k");
    }

    #[test]
    fn source_splits_bucket_and_prefix() {
        let mut o = Options::default();
        o.set_source("b:/photos/2024/").unwrap();
        assert_eq!(
            (o.bucket.as_str(), o.prefix.as_str()),
            ("b", "photos/2024/")
        );
        o.set_source("b").unwrap();
        assert_eq!(o.prefix, "");
        assert!(o.set_source(":/x").is_err());
        // s3://BUCKET/PREFIX/ is BUCKET:/PREFIX (fstab lines of Mountpoint
        // for Amazon S3, the AWS CLI's spelling).
        for spec in [
            "s3://b/photos/2024/",
            "s3://b/photos/2024",
            "b:/photos/2024",
        ] {
            let mut o = Options::default();
            o.set_source(spec).unwrap();
            assert_eq!(
                (o.bucket.as_str(), o.prefix.as_str(), o.all_buckets),
                ("b", "photos/2024/", false),
                "{spec}"
            );
        }
        let mut o = Options::default();
        o.set_source("s3://status/").unwrap();
        assert_eq!((o.bucket.as_str(), o.prefix.as_str()), ("status", ""));
        // s3:// alone: every bucket.
        for spec in ["s3://", "s3:///"] {
            let mut o = Options::default();
            o.set_source(spec).unwrap();
            assert!(o.all_buckets && o.bucket.is_empty(), "{spec}");
        }
        assert!(Options::default().set_source("-o").is_err());
        assert!(Options::default().set_source("s3://-o/x").is_err());
    }

    #[test]
    fn sizes_take_suffixes() {
        assert_eq!(parse_size("8M"), Ok(8 * MIB));
        assert_eq!(parse_size("512"), Ok(512));
        assert!(parse_size("8Q").is_err());
        assert!(parse_size("").is_err());
    }

    #[test]
    fn as_of_implies_read_only() {
        let mut o = Options::default();
        o.apply("as_of=2026-11-21T10:00:00Z").unwrap();
        assert!(o.read_only && o.as_of.is_some());
    }

    /// Random option strings never panic the parser, and every refusal
    /// says which option.
    #[test]
    fn fuzzed_option_strings_are_refused_cleanly() {
        let words = [
            "ro",
            "uid=",
            "uid=12",
            "umask=0777",
            "umask=9",
            "endpoint=",
            "endpoint=http://x",
            "url=ftp:",
            "part_size=8Q",
            "part_size=1G",
            "=",
            ",",
            "as_of=",
            "as_of=2026-01-01T00:00:00Z",
            "timeout=0",
            "retries=x",
            "x-systemd.idle",
            "versions=",
            "cache_size=10T",
            "metadata_ttl=-1",
            "\u{1}",
            "é=é",
        ];
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let n = 1 + (x % 4) as usize;
            let opts: Vec<&str> = (0..n)
                .map(|i| words[((x >> (i * 8)) % words.len() as u64) as usize])
                .collect();
            let line = opts.join(",");
            if let Err(e) = Options::default().apply(&line) {
                assert!(
                    e.0.starts_with("option ") || e.0.starts_with("unknown option"),
                    "{line:?}: {e}"
                );
            }
        }
    }
}
