//! Test harness: a real S3 server (moto's server mode) on 127.0.0.1, real
//! FUSE mounts of the `bucketfs` binary, and a raw S3 client to check what
//! really landed in the bucket.
//!
//! The server is started once per test binary, from a thread that lives as
//! long as the process, with PR_SET_PDEATHSIG so it dies with the tests
//! even when they fail. Each test mounts its own bucket; a `Mount` always
//! unmounts and reaps its daemon on drop, panics included. Every wait is
//! bounded.
//!
//! moto quirk: on a *versioned* bucket its ListObjectsV2 keeps showing the
//! common prefix of deleted keys. Real S3 does not; tests that delete
//! whole directories use unversioned buckets.
//!
//! moto quirk: CopyObject of a multipart object with a composite CRC32C
//! (what bucketfs uploads) keeps the checksum's value but not its type,
//! so a GET of the copy answers a `-N`-less composite as if it were the
//! whole object's CRC32C, and an SDK that validates responses refuses the
//! (correct) bytes. The raw client checks checksums only where S3
//! requires them; tests compare the bytes themselves.
#![allow(dead_code)]

pub mod proxy;

use std::collections::HashMap;
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use aws_sdk_s3::Client;
use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::primitives::ByteStream;
use sha2::{Digest, Sha256};

pub const ACCESS_KEY: &str = "testing";
pub const SECRET_KEY: &str = "testing-secret-do-not-log";

/// A running S3 server.
pub struct Server {
    pub endpoint: String,
    pid: u32,
}

impl Server {
    /// Starts a moto server on a free port; it dies with this process.
    pub fn start() -> Server {
        let port = free_port();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut cmd = Command::new(python());
            cmd.args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
            unsafe {
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
            let mut child = cmd
                .spawn()
                .expect("start moto (run scripts/deps: it installs moto into .venv/)");
            tx.send(child.id()).unwrap();
            // This thread is the server's parent for PDEATHSIG: keep it alive.
            let _ = child.wait();
        });
        let pid = rx.recv().unwrap();
        let endpoint = format!("http://127.0.0.1:{port}");
        wait_until(Duration::from_secs(60), "moto to listen", || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        Server { endpoint, pid }
    }

    /// Kills the server (for tests of an unreachable endpoint).
    pub fn kill(&self) {
        unsafe { libc::kill(self.pid as i32, libc::SIGKILL) };
    }
}

/// The python that has moto: `.venv/bin/python3` of the repository (where
/// scripts/deps installs it), else `python3` from PATH.
pub fn python() -> PathBuf {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python3");
    if venv.exists() {
        venv
    } else {
        PathBuf::from("python3")
    }
}

/// The server shared by the tests of one binary.
pub fn server() -> &'static Server {
    static S: OnceLock<Server> = OnceLock::new();
    S.get_or_init(Server::start)
}

pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

pub fn wait_until(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn rt() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap()
    })
}

/// A raw S3 client on a server, to look at buckets without the mount.
pub fn client(endpoint: &str) -> Client {
    let conf = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .region(Region::new("us-east-1"))
        .force_path_style(true)
        .credentials_provider(Credentials::new(ACCESS_KEY, SECRET_KEY, None, None, "test"))
        .response_checksum_validation(aws_sdk_s3::config::ResponseChecksumValidation::WhenRequired)
        .build();
    Client::from_conf(conf)
}

pub fn sha256(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub fn sha256_file(p: &Path) -> String {
    sha256(&std::fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display())))
}

/// Deterministic pseudo-random bytes.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A bucket on a server, with raw S3 helpers.
#[derive(Clone)]
pub struct Bucket {
    pub name: String,
    pub endpoint: String,
    pub client: Client,
}

static SEQ: AtomicU64 = AtomicU64::new(0);

impl Bucket {
    pub fn new(server: &Server, tag: &str, versioned: bool) -> Bucket {
        let name = format!(
            "{}-{}-{}",
            tag.replace('_', "-"),
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let client = client(&server.endpoint);
        rt().block_on(client.create_bucket().bucket(&name).send())
            .unwrap();
        let b = Bucket {
            name,
            endpoint: server.endpoint.clone(),
            client,
        };
        if versioned {
            b.enable_versioning();
        }
        b
    }

    /// Turns versioning on (what was there is its "null" version).
    pub fn enable_versioning(&self) {
        use aws_sdk_s3::types::{BucketVersioningStatus, VersioningConfiguration};
        rt().block_on(
            self.client
                .put_bucket_versioning()
                .bucket(&self.name)
                .versioning_configuration(
                    VersioningConfiguration::builder()
                        .status(BucketVersioningStatus::Enabled)
                        .build(),
                )
                .send(),
        )
        .unwrap();
    }

    pub fn put(&self, key: &str, data: &[u8]) {
        self.put_meta(key, data, &[]);
    }

    /// Deletes `key`, as another client would.
    pub fn delete(&self, key: &str) {
        rt().block_on(
            self.client
                .delete_object()
                .bucket(&self.name)
                .key(key)
                .send(),
        )
        .unwrap();
    }

    pub fn put_meta(&self, key: &str, data: &[u8], meta: &[(&str, &str)]) {
        let mut req = self
            .client
            .put_object()
            .bucket(&self.name)
            .key(key)
            .body(ByteStream::from(data.to_vec()));
        for (k, v) in meta {
            req = req.metadata(*k, *v);
        }
        rt().block_on(req.send()).unwrap();
    }

    /// The current bytes of a key, or None.
    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        rt().block_on(async {
            match self
                .client
                .get_object()
                .bucket(&self.name)
                .key(key)
                .send()
                .await
            {
                Ok(o) => Some(o.body.collect().await.unwrap().into_bytes().to_vec()),
                Err(_) => None,
            }
        })
    }

    pub fn metadata(&self, key: &str) -> HashMap<String, String> {
        rt().block_on(self.client.head_object().bucket(&self.name).key(key).send())
            .unwrap_or_else(|e| panic!("HEAD {key}: {e}"))
            .metadata()
            .cloned()
            .unwrap_or_default()
    }

    /// Every key under a prefix (no delimiter).
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut token = None;
        loop {
            let page = rt()
                .block_on(
                    self.client
                        .list_objects_v2()
                        .bucket(&self.name)
                        .prefix(prefix)
                        .set_continuation_token(token)
                        .send(),
                )
                .unwrap();
            out.extend(
                page.contents()
                    .iter()
                    .filter_map(|o| o.key().map(str::to_string)),
            );
            token = page.next_continuation_token().map(str::to_string);
            if token.is_none() {
                break;
            }
        }
        out
    }

    /// (version id, is delete marker) of a key, newest first.
    pub fn versions(&self, key: &str) -> Vec<(String, bool)> {
        let out = rt()
            .block_on(
                self.client
                    .list_object_versions()
                    .bucket(&self.name)
                    .prefix(key)
                    .send(),
            )
            .unwrap();
        let mut v: Vec<(aws_sdk_s3::primitives::DateTime, String, bool)> = out
            .versions()
            .iter()
            .filter(|v| v.key() == Some(key))
            .map(|v| {
                (
                    *v.last_modified().unwrap(),
                    v.version_id().unwrap().to_string(),
                    false,
                )
            })
            .chain(
                out.delete_markers()
                    .iter()
                    .filter(|d| d.key() == Some(key))
                    .map(|d| {
                        (
                            *d.last_modified().unwrap(),
                            d.version_id().unwrap().to_string(),
                            true,
                        )
                    }),
            )
            .collect();
        v.sort_by_key(|x| std::cmp::Reverse(x.0));
        v.into_iter().map(|(_, id, dm)| (id, dm)).collect()
    }

    pub fn open_multipart_uploads(&self) -> usize {
        rt().block_on(
            self.client
                .list_multipart_uploads()
                .bucket(&self.name)
                .send(),
        )
        .unwrap()
        .uploads()
        .len()
    }
}

/// A live bucketfs mount; unmounts on drop.
pub struct Mount {
    pub dir: PathBuf,
    pub bucket: Bucket,
    pub log: PathBuf,
    child: Mutex<Option<Child>>,
    _tmp: tempfile::TempDir,
    cache: PathBuf,
    extra: String,
    /// Start the daemon without RUST_LOG: the filter a user gets.
    default_log_filter: bool,
    /// More environment of the daemon.
    env: Vec<(String, String)>,
    /// What is mounted, if not the bucket (`s3://`, `s3://B/P/`).
    source: Mutex<Option<String>>,
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_bucketfs")
}

/// The options every test mount gets.
pub fn base_options(endpoint: &str, cache: &Path, log: &Path) -> String {
    format!(
        "endpoint={endpoint},path_style,cache_dir={},log_file={},timeout=5,retries=2",
        cache.display(),
        log.display()
    )
}

/// The environment of a bucketfs process: test credentials only.
pub fn command() -> Command {
    let mut cmd = Command::new(bin());
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        .env("AWS_REGION", "us-east-1")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "bucketfs=debug".into()),
        );
    cmd
}

impl Mount {
    pub fn new(bucket: &Bucket, extra: &str) -> Mount {
        Self::new_with(bucket, extra, false)
    }

    /// A mount logging (to `log`) with the default filter a user gets,
    /// not the tests' `bucketfs=debug`.
    pub fn with_default_log_filter(bucket: &Bucket, extra: &str) -> Mount {
        Self::new_with(bucket, extra, true)
    }

    /// A mount whose daemon gets these environment variables too.
    pub fn with_env(bucket: &Bucket, extra: &str, env: &[(&str, &str)]) -> Mount {
        Self::build(bucket, extra, false, env)
    }

    fn new_with(bucket: &Bucket, extra: &str, default_log_filter: bool) -> Mount {
        Self::build(bucket, extra, default_log_filter, &[])
    }

    /// A mount of `source` (`s3://` for every bucket of the server,
    /// `s3://BUCKET/PREFIX/`) on `bucket`'s server.
    pub fn with_source(bucket: &Bucket, source: &str, extra: &str) -> Mount {
        Self::build_from(bucket, Some(source.to_string()), extra, false, &[])
    }

    fn build(
        bucket: &Bucket,
        extra: &str,
        default_log_filter: bool,
        env: &[(&str, &str)],
    ) -> Mount {
        Self::build_from(bucket, None, extra, default_log_filter, env)
    }

    fn build_from(
        bucket: &Bucket,
        source: Option<String>,
        extra: &str,
        default_log_filter: bool,
        env: &[(&str, &str)],
    ) -> Mount {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("mnt");
        let cache = tmp.path().join("cache");
        std::fs::create_dir_all(&dir).unwrap();
        let log = tmp.path().join("bucketfs.log");
        let m = Mount {
            dir,
            bucket: bucket.clone(),
            log,
            child: Mutex::new(None),
            _tmp: tmp,
            cache,
            extra: extra.to_string(),
            default_log_filter,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            source: Mutex::new(source),
        };
        m.start();
        m
    }

    fn source(&self) -> String {
        self.source
            .lock()
            .unwrap()
            .clone()
            .unwrap_or_else(|| self.bucket.name.clone())
    }

    /// Starts the daemon again on the same mountpoint and cache dir, now
    /// mounting `source` (after it was killed or unmounted).
    pub fn restart_as(&self, source: &str) {
        *self.source.lock().unwrap() = Some(source.to_string());
        self.start();
    }

    /// Starts the daemon again on the same mountpoint and cache dir (after
    /// it was killed).
    pub fn restart(&self) {
        self.start();
    }

    fn start(&self) {
        let mut opts = base_options(&self.bucket.endpoint, &self.cache, &self.log);
        if !self.extra.is_empty() {
            opts = format!("{opts},{}", self.extra);
        }
        let mut cmd = command();
        if self.default_log_filter {
            cmd.env_remove("RUST_LOG");
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        let mut child = cmd
            .args(["-f", "-o", &opts, &self.source()])
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let start = Instant::now();
        loop {
            if is_mounted(&self.dir) {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                let mut err = String::new();
                use std::io::Read;
                child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err)
                    .unwrap();
                panic!(
                    "bucketfs exited with {status}: {err}\nlog:\n{}",
                    self.log_text()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "mount did not come up"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        *self.child.lock().unwrap() = Some(child);
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    /// The mount's cache_dir.
    pub fn cache_dir(&self) -> &Path {
        &self.cache
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The daemon's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.lock().unwrap().as_ref().map(|c| c.id())
    }

    /// Waits for the daemon to exit by itself; its exit code.
    pub fn wait_exit(&self, limit: Duration) -> Option<i32> {
        let mut guard = self.child.lock().unwrap();
        let child = guard.as_mut()?;
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                guard.take();
                return status.code();
            }
            if start.elapsed() > limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Unmounts and waits for the daemon; returns its exit code.
    pub fn unmount(&self) -> Option<i32> {
        let mut guard = self.child.lock().unwrap();
        let mut child = guard.take()?;
        let start = Instant::now();
        while is_mounted(&self.dir) {
            let ok = Command::new("umount")
                .arg(&self.dir)
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success());
            if matches!(ok, Ok(true)) {
                break;
            }
            if start.elapsed() > Duration::from_secs(10) {
                let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            if start.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Unmounts and mounts again (same cache dir).
    pub fn remount(&self) {
        assert_eq!(self.unmount(), Some(0), "clean exit\n{}", self.log_text());
        self.start();
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        self.unmount();
        // A failed test shows what the daemon said, so a failure seen
        // once on CI can be read without a rerun (only the lines above
        // debug, and the last of them).
        if std::thread::panicking() {
            let log = self.log_text();
            let lines: Vec<&str> = log
                .lines()
                .filter(|l| !l.contains(" DEBUG ") && !l.contains(" TRACE "))
                .collect();
            let from = lines.len().saturating_sub(40);
            eprintln!(
                "--- daemon log of {} (last {} lines above debug) ---\n{}",
                self.dir.display(),
                lines.len() - from,
                lines[from..].join("\n")
            );
        }
    }
}

/// A temp dir with an empty `mnt` directory in it, to mount on.
pub fn scratch_mountpoint() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let mp = tmp.path().join("mnt");
    std::fs::create_dir(&mp).unwrap();
    (tmp, mp)
}

pub fn is_mounted(dir: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let want = dir.to_string_lossy().replace(' ', "\\040");
    info.lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
}

/// Runs a shell command, panicking with its output if it fails.
pub fn sh(cwd: &Path, script: &str) -> String {
    let out = Command::new("bash")
        .arg("-c")
        .arg(script)
        .current_dir(cwd)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "`{script}` failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What `bucketfs status` prints for the mount.
pub fn status_of(m: &Mount) -> String {
    let out = command().arg("status").arg(&m.dir).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// S3 requests of one type the mount made, from `bucketfs status`.
pub fn requests(m: &Mount, op: &str) -> u64 {
    let text = status_of(m);
    let prefix = format!("{op} ");
    text.lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix(&prefix)
                .map(|n| n.trim().parse().unwrap())
        })
        .unwrap_or(0)
}

/// The errno of an io::Error.
pub fn errno(e: std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(-1)
}

// ---- helpers of the durability tests (durability.rs, attack.rs) ----

/// close(2), with its result (dropping a File ignores it).
pub fn close(f: std::fs::File) -> std::io::Result<()> {
    let fd = std::os::unix::io::IntoRawFd::into_raw_fd(f);
    if unsafe { libc::close(fd) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// kill -9 of the daemon, then the lazy unmount its dead mountpoint needs.
pub fn kill9(m: &Mount) {
    let pid = m.pid().expect("a running daemon");
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    m.wait_exit(Duration::from_secs(30));
    let _ = Command::new("umount").arg("-l").arg(&m.dir).status();
}

/// Polls `f` every 100 ms for at most `limit`.
pub fn poll(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if f() {
            return true;
        }
        if start.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What `key` holds now, described against `want`.
pub fn state(b: &Bucket, key: &str, want: &[u8]) -> Result<(), String> {
    match b.get(key) {
        None => Err(format!("{key}: no object")),
        Some(got) if sha256(&got) == sha256(want) => Ok(()),
        Some(got) => Err(format!(
            "{key}: {} bytes, want {} (sha {} vs {})",
            got.len(),
            want.len(),
            &sha256(&got)[..12],
            &sha256(want)[..12]
        )),
    }
}

/// Waits (bounded) until `key` holds exactly `want`; panics with the last
/// state seen.
pub fn assert_lands(b: &Bucket, key: &str, want: &[u8], limit: Duration, ctx: &str) {
    let mut last = Ok(());
    let ok = poll(limit, || {
        last = state(b, key, want);
        last.is_ok()
    });
    assert!(
        ok,
        "{ctx}: not in S3 within {limit:?}: {last:?}; keys {:?}",
        b.keys("")
    );
}

pub fn recovered_keys(b: &Bucket) -> Vec<String> {
    b.keys("")
        .into_iter()
        .filter(|k| k.contains("bucketfs-recovered"))
        .collect()
}

pub fn through_proxy(tag: &str, versioned: bool, extra: &str) -> (proxy::Proxy, Bucket, Mount) {
    let b = Bucket::new(server(), tag, versioned);
    let proxy = proxy::Proxy::start(server().endpoint.trim_start_matches("http://"));
    let via = Bucket {
        endpoint: proxy.endpoint.clone(),
        ..b.clone()
    };
    let m = Mount::new(&via, extra);
    (proxy, b, m)
}

/// Runs `script` with bash as `uid` (gid the same, no other groups):
/// whether it succeeded, and its stdout then stderr.
pub fn as_user(uid: u32, script: &str) -> (bool, String) {
    let id = uid.to_string();
    let out = Command::new("setpriv")
        .args(["--reuid", &id, "--regid", &id, "--clear-groups"])
        .args(["bash", "-c", script])
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// A C string of a test's path or name (no NUL inside).
pub fn c_str(s: &str) -> std::ffi::CString {
    std::ffi::CString::new(s).unwrap()
}

/// removexattr(2) on a path; the errno on failure.
pub fn remove_xattr(path: &std::path::Path, name: &str) -> Result<(), i32> {
    let p = c_str(path.to_str().unwrap());
    if unsafe { libc::removexattr(p.as_ptr(), c_str(name).as_ptr()) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap())
    }
}

/// setxattr(2) on a path; the errno on failure.
pub fn set_xattr(path: &std::path::Path, name: &str, value: &[u8]) -> Result<(), i32> {
    let p = c_str(path.to_str().unwrap());
    let r = unsafe {
        libc::setxattr(
            p.as_ptr(),
            c_str(name).as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap())
    }
}

/// getxattr(2) on a path, up to 4 KiB; the errno on failure.
pub fn get_xattr(path: &std::path::Path, name: &str) -> Result<Vec<u8>, i32> {
    let p = c_str(path.to_str().unwrap());
    let mut buf = vec![0u8; 4096];
    let r = unsafe {
        libc::getxattr(
            p.as_ptr(),
            c_str(name).as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap());
    }
    buf.truncate(r as usize);
    Ok(buf)
}

/// A mount other uids can reach (the tests' temp dirs are 0700).
pub fn shared_mount(b: &Bucket, extra: &str) -> Mount {
    let m = Mount::new(b, &format!("allow_other,{extra}"));
    let parent = m.dir.parent().unwrap();
    std::fs::set_permissions(
        parent,
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o755),
    )
    .unwrap();
    m
}

/// Every file below a directory (staged copies, journals, cached blocks).
pub fn files_below(d: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_below(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Passthrough needs Linux 6.13+ (fine-grained change times of the
/// staged files): on an older kernel there is nothing to test.
pub fn passthrough_available() -> bool {
    let r = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut v = r
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>().unwrap_or(0));
    let (major, minor) = (v.next().unwrap_or(0), v.next().unwrap_or(0));
    if (major, minor) < (6, 13) {
        eprintln!(
            "kernel {} has no passthrough of this kind: skipped",
            r.trim()
        );
        return false;
    }
    // The mounts' cache directories go under the temporary directory:
    // on tmpfs, passthrough is refused (no time moves at a mapped store).
    let tmp = std::env::temp_dir();
    let path = std::ffi::CString::new(tmp.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: statfs fills the zeroed struct; the path is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(path.as_ptr(), &mut st) } == 0 && st.f_type == libc::TMPFS_MAGIC {
        eprintln!(
            "{} is tmpfs, where passthrough is off: skipped",
            tmp.display()
        );
        return false;
    }
    true
}
