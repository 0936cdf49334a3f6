//! The benchmark behind `scripts/bench`: each workload through a bucketfs
//! mount and the same transfer by a raw aws-sdk-s3 client on the same
//! server, in the same run, with their ratio and the S3 requests bucketfs
//! made (from `bucketfs status`). Never a test: it reports, it asserts
//! nothing. Only 127.0.0.1 is used.
//!
//!     bench --bucketfs PATH --endpoint URL --bucket NAME [--size-mib N]
//!           [--files N] [--entries N] [--concurrency N] [--region R] [--no-peers]
//!           [--peers-only mountpoint-s3,s3fs-fuse,rclone mount] [--rounds N]
//!
//! Mountpoint for Amazon S3 (`mount-s3`), s3fs-fuse and rclone, where
//! installed, run the same workloads on the same server in the same run,
//! each in its own directory of the bucket.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_s3::Client;
use aws_sdk_s3::config::{BehaviorVersion, Region};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use futures::{StreamExt, TryStreamExt};

const MIB: u64 = 1024 * 1024;
const PART: u64 = 8 * MIB;

#[derive(Clone)]
struct Args {
    bucketfs: PathBuf,
    endpoint: String,
    bucket: String,
    region: String,
    size_mib: u64,
    files: usize,
    entries: usize,
    /// A directory this large (0: none), listed by names only.
    huge: usize,
    concurrency: usize,
    /// Run the same workloads through s3fs-fuse and rclone when installed.
    peers: bool,
    /// Only these peers (`--peers-only mountpoint-s3,s3fs-fuse`), for a
    /// shorter run; None: every installed one.
    only: Option<Vec<String>>,
    /// CPU-bound processes kept running beside the whole run.
    load: usize,
    /// Rounds of every workload, the tools interleaved in each; a cell is
    /// the median round's.
    rounds: usize,
}

fn args() -> Args {
    let mut a = Args {
        bucketfs: PathBuf::from("target/release/bucketfs"),
        endpoint: String::new(),
        bucket: String::new(),
        region: "us-east-1".into(),
        size_mib: 1024,
        files: 1000,
        entries: 10_000,
        huge: 0,
        concurrency: 8,
        peers: true,
        only: None,
        load: 0,
        rounds: 1,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--no-peers" {
            a.peers = false;
            continue;
        }
        let val = it.next().unwrap_or_default();
        match flag.as_str() {
            "--bucketfs" => a.bucketfs = PathBuf::from(val),
            "--endpoint" => a.endpoint = val,
            "--bucket" => a.bucket = val,
            "--region" => a.region = val,
            "--size-mib" => a.size_mib = val.parse().expect("--size-mib N"),
            "--files" => a.files = val.parse().expect("--files N"),
            "--entries" => a.entries = val.parse().expect("--entries N"),
            "--huge" => a.huge = val.parse().expect("--huge N"),
            "--concurrency" => a.concurrency = val.parse().expect("--concurrency N"),
            "--load" => a.load = val.parse().expect("--load N"),
            "--rounds" => a.rounds = val.parse::<usize>().expect("--rounds N").max(1),
            "--peers-only" => a.only = Some(val.split(',').map(str::to_string).collect()),
            other => panic!("unknown argument {other}"),
        }
    }
    assert!(
        !a.endpoint.is_empty() && !a.bucket.is_empty(),
        "--endpoint and --bucket are needed"
    );
    a
}

fn client(a: &Args) -> Client {
    let conf = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .endpoint_url(&a.endpoint)
        .region(Region::new(a.region.clone()))
        .force_path_style(true)
        .credentials_provider(aws_sdk_s3::config::Credentials::new(
            std::env::var("AWS_ACCESS_KEY_ID").unwrap_or_default(),
            std::env::var("AWS_SECRET_ACCESS_KEY").unwrap_or_default(),
            None,
            None,
            "bench",
        ))
        .build();
    Client::from_conf(conf)
}

/// A filesystem the workloads run through.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Tool {
    Bucketfs,
    Mountpoint,
    S3fs,
    Rclone,
}

impl Tool {
    fn name(self) -> &'static str {
        match self {
            Tool::Bucketfs => "bucketfs",
            Tool::Mountpoint => "mountpoint-s3",
            Tool::S3fs => "s3fs-fuse",
            Tool::Rclone => "rclone mount",
        }
    }

    /// The peers installed on this machine (Mountpoint for Amazon S3 as
    /// `mount-s3`, s3fs and rclone as Debian packages them), unless
    /// `--no-peers`.
    fn all(a: &Args) -> Vec<Tool> {
        let mut v = vec![Tool::Bucketfs];
        if a.peers {
            for (t, bin) in [
                (Tool::Mountpoint, "mount-s3"),
                (Tool::S3fs, "s3fs"),
                (Tool::Rclone, "rclone"),
            ] {
                if a.only
                    .as_ref()
                    .is_some_and(|o| !o.iter().any(|n| n == t.name()))
                {
                    continue;
                }
                let found = Command::new("sh")
                    .args(["-c", &format!("command -v {bin}")])
                    .stdout(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
                if found {
                    v.push(t);
                } else {
                    eprintln!("{bin} not installed: its column is left out");
                }
            }
        }
        v
    }
}

/// A running mount of one tool.
struct Mount {
    tool: Tool,
    dir: PathBuf,
    bin: PathBuf,
    child: Option<Child>,
}

impl Mount {
    /// Mounts `tool` on `dir` with a fresh cache: every start is cold.
    fn start_with(a: &Args, tool: Tool, dir: &Path, cache: &Path, extra: &str) -> Mount {
        let _ = std::fs::remove_dir_all(cache);
        std::fs::create_dir_all(cache).unwrap();
        let log = cache.with_extension(format!("{}.log", tool.name().replace(' ', "-")));
        let mut cmd = match tool {
            Tool::Bucketfs => {
                let opts = format!(
                    "endpoint={},path_style,region={},cache_dir={},log_file={},upload_concurrency={}{extra}",
                    a.endpoint,
                    a.region,
                    cache.display(),
                    log.display(),
                    a.concurrency
                );
                let mut c = Command::new(&a.bucketfs);
                c.args(["-f", "-o", &opts, &a.bucket]).arg(dir);
                c
            }
            Tool::Mountpoint => {
                // Its defaults (no local cache), allowed to overwrite and
                // delete as the other tools are.
                let mut c = Command::new("mount-s3");
                c.arg(&a.bucket)
                    .arg(dir)
                    .args(["--foreground", "--force-path-style", "--allow-delete"])
                    .args(["--allow-overwrite", "--endpoint-url", &a.endpoint])
                    .args(["--region", &a.region, "--log-directory"])
                    .arg(&log);
                c
            }
            Tool::S3fs => {
                let pass = cache.join("passwd");
                std::fs::write(
                    &pass,
                    format!(
                        "{}:{}\n",
                        std::env::var("AWS_ACCESS_KEY_ID").unwrap_or_default(),
                        std::env::var("AWS_SECRET_ACCESS_KEY").unwrap_or_default()
                    ),
                )
                .unwrap();
                std::fs::set_permissions(
                    &pass,
                    std::os::unix::fs::PermissionsExt::from_mode(0o600),
                )
                .unwrap();
                let mut c = Command::new("s3fs");
                c.arg(&a.bucket).arg(dir).args([
                    "-f",
                    "-o",
                    &format!(
                        "url={},use_path_request_style,endpoint={},passwd_file={},dbglevel=err",
                        a.endpoint,
                        a.region,
                        pass.display()
                    ),
                ]);
                c
            }
            Tool::Rclone => {
                let mut c = Command::new("rclone");
                // rclone 1.60 cannot load AWS_CA_BUNDLE with its own
                // transport, and the server is plain http on 127.0.0.1.
                c.env_remove("AWS_CA_BUNDLE")
                    .arg("mount")
                    .arg(format!(":s3:{}", a.bucket))
                    .arg(dir)
                    .args(["--vfs-cache-mode", "writes", "--cache-dir"])
                    .arg(cache)
                    .args(["--log-file"])
                    .arg(&log)
                    .env("RCLONE_S3_PROVIDER", "Other")
                    .env("RCLONE_S3_ENDPOINT", &a.endpoint)
                    .env("RCLONE_S3_REGION", &a.region)
                    .env("RCLONE_S3_NO_CHECK_BUCKET", "true")
                    .env(
                        "RCLONE_S3_ACCESS_KEY_ID",
                        std::env::var("AWS_ACCESS_KEY_ID").unwrap_or_default(),
                    )
                    .env(
                        "RCLONE_S3_SECRET_ACCESS_KEY",
                        std::env::var("AWS_SECRET_ACCESS_KEY").unwrap_or_default(),
                    );
                c
            }
        };
        let err_path = log.with_extension("stderr");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&err_path).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", tool.name()));
        let start = Instant::now();
        while !bucketfs::mount::is_mounted(dir) {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{} did not mount: {}",
                tool.name(),
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Mount {
            tool,
            dir: dir.to_path_buf(),
            bin: a.bucketfs.clone(),
            child: Some(child),
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Unmounts; a tool still busy 30 s later (s3fs-fuse, HEADing a
    /// listing's objects after the connection was aborted) is killed.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("umount").arg(&self.dir).status();
            let t = Instant::now();
            while c.try_wait().ok().flatten().is_none() {
                if t.elapsed() > Duration::from_secs(30) {
                    let _ = c.kill();
                    let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Requests by type and bytes sent so far (bucketfs only).
    fn counters(&self) -> BTreeMap<String, u64> {
        let mut m = BTreeMap::new();
        if self.tool != Tool::Bucketfs {
            return m;
        }
        let out = Command::new(&self.bin)
            .arg("status")
            .arg(&self.dir)
            .output()
            .expect("bucketfs status");
        let text = String::from_utf8_lossy(&out.stdout);
        let mut in_requests = false;
        for line in text.lines() {
            if line.starts_with("S3 requests:") {
                in_requests = true;
                continue;
            }
            if let Some(n) = line.strip_prefix("bytes sent: ") {
                m.insert("bytes sent".into(), n.trim().parse().unwrap_or(0));
                in_requests = false;
            }
            if let Some(n) = line.strip_prefix("bytes received: ") {
                m.insert("bytes received".into(), n.trim().parse().unwrap_or(0));
            }
            if in_requests && line.starts_with("  ") {
                let mut it = line.split_whitespace();
                if let (Some(k), Some(v)) = (it.next(), it.next())
                    && let Ok(v) = v.parse()
                {
                    m.insert(k.to_string(), v);
                }
            }
        }
        m
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `ls FLAG DIR`, timed; its output must have `lines` lines. A tool that
/// takes more than `limit` is stopped and shown as such: its FUSE
/// connection is aborted, since an `ls` waiting on a FUSE reply cannot be
/// killed (s3fs-fuse kept one 10 minutes in a 200,000-entry listing).
fn timed_ls(tool: Tool, flag: &str, dir: &Path, lines: usize, limit: Duration) -> (String, f64) {
    use std::os::unix::fs::MetadataExt;
    // Its device, while the tool still answers.
    let dev = std::fs::metadata(dir).unwrap().dev();
    let t = Instant::now();
    let out = tempfile::tempfile().unwrap();
    let mut child = Command::new("ls")
        .arg(flag)
        .arg(dir)
        .stdout(out.try_clone().unwrap())
        .spawn()
        .unwrap();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if t.elapsed() > limit {
            abort_fuse(dev);
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let d = t.elapsed().as_secs_f64();
    if !status.is_some_and(|s| s.success()) {
        return (format!("stopped after {} s", limit.as_secs()), f64::NAN);
    }
    let mut text = String::new();
    let mut out = out;
    out.seek(SeekFrom::Start(0)).unwrap();
    out.read_to_string(&mut text).unwrap();
    assert_eq!(
        text.lines().count(),
        lines,
        "{} listed a wrong count",
        tool.name()
    );
    (format!("{d:.2} s"), d)
}

/// Aborts the FUSE connection of the mount on device `dev` (its requests
/// fail at once), through /sys/fs/fuse/connections/<minor device>.
fn abort_fuse(dev: u64) {
    let minor = libc::minor(dev);
    let _ = std::fs::write(format!("/sys/fs/fuse/connections/{minor}/abort"), "1");
}

/// A TCP relay on 127.0.0.1 to the server that counts the bytes the
/// server sends through it: what a tool downloads, for any tool (only
/// bucketfs reports its own). Used for an untimed pass only: its copies
/// would slow the tools that download most. Every socket is `nodelay`;
/// it stops taking connections when dropped.
struct Relay {
    endpoint: String,
    down: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    addr: std::net::SocketAddr,
}

impl Relay {
    fn start(upstream: &str) -> Relay {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        // host:port of an http:// endpoint (the bench's servers are plain
        // http on 127.0.0.1).
        let up = upstream
            .strip_prefix("http://")
            .expect("the relay takes an http:// endpoint")
            .split('/')
            .next()
            .unwrap()
            .to_string();
        let down = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (d, st) = (down.clone(), stop.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if st.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(client) = client else {
                    // Out of descriptors, say: not a busy loop.
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                let Ok(server) = std::net::TcpStream::connect(&up) else {
                    eprintln!("bench: the relay cannot reach {up}");
                    continue;
                };
                let _ = (client.set_nodelay(true), server.set_nodelay(true));
                let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
                    continue;
                };
                let d = d.clone();
                std::thread::spawn(move || relay_pipe(client, server, None));
                std::thread::spawn(move || relay_pipe(s2, c2, Some(d)));
            }
        });
        Relay {
            endpoint: format!("http://{addr}"),
            down,
            stop,
            addr,
        }
    }

    fn down(&self) -> u64 {
        self.down.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// `down` once nothing more has come for a second (at most 30 s):
    /// what a tool still fetches after the reads is counted too.
    fn settled(&self) -> u64 {
        let t = Instant::now();
        let mut last = self.down();
        loop {
            std::thread::sleep(Duration::from_secs(1));
            let now = self.down();
            if now == last || t.elapsed() > Duration::from_secs(30) {
                return now;
            }
            last = now;
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        // Wakes the accepting thread, which then sees `stop`.
        let _ = std::net::TcpStream::connect(self.addr);
    }
}

/// Copies `from` into `to` until either closes, adding what it copied to
/// `count`.
fn relay_pipe(
    mut from: std::net::TcpStream,
    mut to: std::net::TcpStream,
    count: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
) {
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        // Sent by the server, whether or not the tool still takes it.
        if let Some(c) = &count {
            c.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
    let _ = from.shutdown(std::net::Shutdown::Both);
}

fn drop_page_cache() {
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

fn diff(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> String {
    let mut parts = Vec::new();
    for (k, v) in after {
        let d = v - before.get(k).copied().unwrap_or(0);
        if d > 0 && !k.starts_with("bytes ") {
            parts.push(format!("{k} {d}"));
        }
    }
    for (k, shown) in [("bytes sent", "sent"), ("bytes received", "received")] {
        let n = after.get(k).copied().unwrap_or(0) - before.get(k).copied().unwrap_or(0);
        if n > 0 {
            parts.push(format!("{shown} {:.1} MiB", n as f64 / MIB as f64));
        }
    }
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(", ")
    }
}

struct Row {
    name: String,
    /// One cell per tool, in `Tool::all` order.
    cells: Vec<String>,
    raw: String,
    ratio: String,
    requests: String,
}

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / MIB as f64 / d.as_secs_f64()
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Polls the bucket (bounded) until `key` holds `size` bytes: a tool that
/// uploads after close (rclone) is timed until its data is in S3.
/// `dd bs=4k` of `mib` MiB of zeros into `key` under the mount `dir`,
/// timed until the object is in S3.
fn dd_into(
    rt: &tokio::runtime::Runtime,
    s3: &Client,
    bucket: &str,
    dir: &Path,
    key: &str,
    mib: u64,
    tool: Tool,
) -> (String, f64) {
    let t = Instant::now();
    let status = Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", dir.join(key).display()))
        .arg("bs=4k")
        .arg(format!("count={}", mib * 256))
        .arg("status=none")
        .status()
        .unwrap();
    assert!(status.success(), "dd through {}", tool.name());
    wait_in_s3(rt, s3, bucket, key, mib * MIB);
    let d = t.elapsed().as_secs_f64();
    (format!("{:.0} MiB/s", mib as f64 / d), d)
}

/// 100,000 writes of 18 bytes into `key` under the mount `dir`, timed
/// until the object is in S3.
fn small_writes_into(
    rt: &tokio::runtime::Runtime,
    s3: &Client,
    bucket: &str,
    dir: &Path,
    key: &str,
) -> (String, f64) {
    let t = Instant::now();
    let mut f = std::fs::File::create(dir.join(key)).unwrap();
    for i in 0..100_000u32 {
        f.write_all(format!("line {i:012}\n").as_bytes()).unwrap();
    }
    drop(f);
    wait_in_s3(rt, s3, bucket, key, 1_800_000);
    let d = t.elapsed().as_secs_f64();
    (format!("{d:.2} s"), d)
}

fn wait_in_s3(rt: &tokio::runtime::Runtime, s3: &Client, bucket: &str, key: &str, size: u64) {
    let start = Instant::now();
    rt.block_on(async {
        loop {
            if let Ok(h) = s3.head_object().bucket(bucket).key(key).send().await
                && h.content_length() == Some(size as i64)
            {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(600),
                "{key} never reached S3"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
}

/// Waits (at most 10 minutes) until `n` keys under `prefix` are in S3.
fn wait_for_keys(rt: &tokio::runtime::Runtime, s3: &Client, bucket: &str, prefix: &str, n: usize) {
    let start = Instant::now();
    while rt.block_on(list_keys(s3, bucket, prefix, None)).len() < n {
        assert!(
            start.elapsed() < Duration::from_secs(600),
            "files never landed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every key under `prefix` (all pages), rolled up at `delimiter`.
async fn list_keys(
    s3: &Client,
    bucket: &str,
    prefix: &str,
    delimiter: Option<&str>,
) -> Vec<String> {
    let mut keys = Vec::new();
    let mut token = None;
    loop {
        let p = s3
            .list_objects_v2()
            .bucket(bucket)
            .prefix(prefix)
            .set_delimiter(delimiter.map(str::to_string))
            .set_continuation_token(token)
            .send()
            .await
            .unwrap();
        keys.extend(
            p.contents()
                .iter()
                .filter_map(|o| o.key().map(str::to_string)),
        );
        token = p.next_continuation_token().map(str::to_string);
        if token.is_none() {
            return keys;
        }
    }
}

/// CPU time (user and system) a process has used so far, in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // After the command name (which may hold spaces and parentheses):
    // utime and stime are the 12th and 13th fields.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let ticks: u64 = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|t| t.parse::<u64>().ok())
        .sum();
    ticks as f64 / clock_ticks()
}

/// CPU time (user and system) this process has used so far, in seconds.
fn own_cpu_secs() -> f64 {
    cpu_secs(std::process::id())
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    let n = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if n > 0 { n as f64 } else { 100.0 }
}

/// Peak resident memory of a process, in bytes.
fn read_rss(pid: u32) -> u64 {
    status_bytes(pid, "VmHWM:")
}

/// Resident memory of a process now, in bytes.
fn rss_now(pid: u32) -> u64 {
    status_bytes(pid, "VmRSS:")
}

fn status_bytes(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with(field)).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|n| n.parse::<u64>().ok())
            })
        })
        .unwrap_or(0)
        * 1024
}

/// One workload's result through one tool.
struct Cell {
    shown: String,
    secs: f64,
    requests: String,
}

/// `n` busy processes, killed when dropped: a loaded machine.
struct Load(Vec<Child>);

impl Load {
    fn start(n: usize) -> Load {
        Load(
            (0..n)
                .map(|_| {
                    Command::new("sh")
                        .args(["-c", "while :; do :; done"])
                        .spawn()
                        .expect("a load process")
                })
                .collect(),
        )
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn main() {
    let a = args();
    if a.load > 0 {
        println!("with {} CPU-bound processes running beside", a.load);
    }
    let _load = Load::start(a.load);
    let tools = Tool::all(&a);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let s3 = client(&a);
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("mnt");
    let cache = work.path().join("cache");
    std::fs::create_dir_all(&dir).unwrap();
    let size = a.size_mib * MIB;
    let data = pattern(size as usize, 42);
    let offsets: Vec<u64> = (0..1000u64)
        .map(|i| (i * 7919 * 4096 + i * 13) % (size - 4096))
        .collect();
    let small = pattern(4096, 7);
    let tail = pattern(MIB as usize, 9);

    // The raw client, once per workload.
    let raw_write = rt.block_on(async {
        let t = Instant::now();
        let up = s3
            .create_multipart_upload()
            .bucket(&a.bucket)
            .key("raw/big")
            .send()
            .await
            .unwrap();
        let id = up.upload_id().unwrap().to_string();
        let parts: Vec<CompletedPart> =
            futures::stream::iter((0..size).step_by(PART as usize).enumerate())
                .map(|(i, off)| {
                    let body = data[off as usize..(off + PART).min(size) as usize].to_vec();
                    let (s3, bucket, id) = (s3.clone(), a.bucket.clone(), id.clone());
                    async move {
                        let r = s3
                            .upload_part()
                            .bucket(bucket)
                            .key("raw/big")
                            .upload_id(id)
                            .part_number(i as i32 + 1)
                            .body(ByteStream::from(body))
                            .send()
                            .await?;
                        Ok::<_, aws_sdk_s3::Error>(
                            CompletedPart::builder()
                                .part_number(i as i32 + 1)
                                .e_tag(r.e_tag().unwrap_or_default())
                                .build(),
                        )
                    }
                })
                .buffered(a.concurrency)
                .try_collect()
                .await
                .unwrap();
        s3.complete_multipart_upload()
            .bucket(&a.bucket)
            .key("raw/big")
            .upload_id(id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .unwrap();
        t.elapsed()
    });
    let raw_cpu = own_cpu_secs();
    let raw_read = rt.block_on(async {
        let t = Instant::now();
        let n: usize = futures::stream::iter((0..size).step_by(PART as usize))
            .map(|off| {
                let (s3, bucket) = (s3.clone(), a.bucket.clone());
                async move {
                    let end = (off + PART).min(size) - 1;
                    let o = s3
                        .get_object()
                        .bucket(bucket)
                        .key("raw/big")
                        .range(format!("bytes={off}-{end}"))
                        .send()
                        .await
                        .unwrap();
                    o.body.collect().await.unwrap().into_bytes().len()
                }
            })
            .buffered(a.concurrency)
            .fold(0, |acc, n| async move { acc + n })
            .await;
        assert_eq!(n as u64, size);
        t.elapsed()
    });
    // What the raw client's read cost in CPU (this process does nothing
    // else meanwhile), against what each tool's daemon uses for its cold
    // read: on a machine whose cores the server shares, CPU is throughput.
    let raw_cpu = own_cpu_secs() - raw_cpu;
    let raw_rand = rt.block_on(async {
        let t = Instant::now();
        for off in &offsets {
            let o = s3
                .get_object()
                .bucket(&a.bucket)
                .key("raw/big")
                .range(format!("bytes={off}-{}", off + 4095))
                .send()
                .await
                .unwrap();
            o.body.collect().await.unwrap();
        }
        t.elapsed()
    });
    let raw_create = rt.block_on(async {
        let t = Instant::now();
        for i in 0..a.files {
            s3.put_object()
                .bucket(&a.bucket)
                .key(format!("raw/small/{i}"))
                .body(ByteStream::from(small.clone()))
                .send()
                .await
                .unwrap();
        }
        t.elapsed()
    });
    // A large directory of objects carrying s3fs-style metadata, as the
    // AWS CLI or boto3 would leave it, listed by every tool.
    rt.block_on(async {
        futures::stream::iter(0..a.entries)
            .map(|i| {
                let (s3, bucket) = (s3.clone(), a.bucket.clone());
                async move {
                    s3.put_object()
                        .bucket(bucket)
                        .key(format!("many/f{i:06}"))
                        .metadata("mode", "33184")
                        .metadata("uid", "1000")
                        .metadata("gid", "1000")
                        .metadata("mtime", (1_600_000_000 + i).to_string())
                        .body(ByteStream::from(vec![1u8]))
                        .send()
                        .await
                        .unwrap();
                }
            })
            .buffer_unordered(32)
            .collect::<Vec<_>>()
            .await;
    });
    let raw_list = rt.block_on(async {
        let t = Instant::now();
        let n = list_keys(&s3, &a.bucket, "many/", Some("/")).await.len();
        assert_eq!(n, a.entries);
        t.elapsed()
    });
    // What `ls -l` with per-object metadata needs at least: the LIST and
    // a HEAD of every entry, 64 in flight.
    let raw_list_head = rt.block_on(async {
        let t = Instant::now();
        let keys = list_keys(&s3, &a.bucket, "many/", Some("/")).await;
        futures::stream::iter(keys)
            .map(|k| {
                let (s3, bucket) = (s3.clone(), a.bucket.clone());
                async move { s3.head_object().bucket(bucket).key(k).send().await.unwrap() }
            })
            .buffer_unordered(64)
            .collect::<Vec<_>>()
            .await;
        t.elapsed()
    });
    let raw_put = rt.block_on(async {
        let t = Instant::now();
        s3.put_object()
            .bucket(&a.bucket)
            .key("raw/tail")
            .body(ByteStream::from(tail.clone()))
            .send()
            .await
            .unwrap();
        t.elapsed()
    });

    // Each tool in turn, each workload on a fresh mount where it says cold.
    let mut names: Vec<(String, String, Option<Duration>)> = Vec::new();
    // [round][tool][row]
    let mut rounds: Vec<Vec<Vec<Cell>>> = Vec::new();
    let mut peaks: Vec<u64> = vec![0; tools.len()];
    for round in 0..a.rounds {
        let mut results: Vec<Vec<Cell>> = Vec::new();
        for (ti, &tool) in tools.iter().enumerate() {
            let slug = tool.name().split(['-', ' ']).next().unwrap().to_string();
            // Each round in directories of its own: a later round must not
            // find the files of an earlier one already in S3.
            let own = if round == 0 {
                format!("t/{slug}")
            } else {
                format!("t/{slug}-{round}")
            };
            let big_key = format!("{own}/big");
            let big = dir.join(&big_key);
            let mut cells: Vec<Cell> = Vec::new();
            let mut peak = 0u64;
            let mut row = |m: &Mount,
                           name: String,
                           raw: (String, Option<Duration>),
                           f: &mut dyn FnMut() -> (String, f64)| {
                let before = m.counters();
                let (shown, secs) = f();
                let requests = diff(&before, &m.counters());
                if round == 0 && results.is_empty() {
                    names.push((name, raw.0, raw.1));
                }
                cells.push(Cell {
                    shown,
                    secs,
                    requests,
                });
            };

            let mut m = Mount::start_with(&a, tool, &dir, &cache, "");
            std::fs::create_dir_all(dir.join(&own)).unwrap();
            row(
                &m,
                format!("sequential write {} MiB, until in S3", a.size_mib),
                (
                    format!("{:.0} MiB/s", mbps(size, raw_write)),
                    Some(raw_write),
                ),
                &mut || {
                    let t = Instant::now();
                    let mut f = std::fs::File::create(&big).unwrap();
                    for c in data.chunks(MIB as usize) {
                        f.write_all(c).unwrap();
                    }
                    f.sync_all().expect("upload of the big file");
                    drop(f);
                    wait_in_s3(&rt, &s3, &a.bucket, &big_key, size);
                    let d = t.elapsed().as_secs_f64();
                    (format!("{:.0} MiB/s", size as f64 / MIB as f64 / d), d)
                },
            );
            peak = peak.max(read_rss(m.pid()));
            let seq_read = || {
                let t = Instant::now();
                let mut f = std::fs::File::open(&big).unwrap();
                let mut buf = vec![0u8; MIB as usize];
                let mut total = 0u64;
                loop {
                    let n = f.read(&mut buf).unwrap();
                    if n == 0 {
                        break;
                    }
                    total += n as u64;
                }
                assert_eq!(total, size);
                let d = t.elapsed().as_secs_f64();
                (format!("{:.0} MiB/s", size as f64 / MIB as f64 / d), d)
            };
            m.stop();
            m = Mount::start_with(&a, tool, &dir, &cache, "");
            drop_page_cache();
            let raw = (format!("{:.0} MiB/s", mbps(size, raw_read)), Some(raw_read));
            let cpu = cpu_secs(m.pid());
            row(&m, "sequential read, cold".into(), raw.clone(), &mut || {
                seq_read()
            });
            let cpu = cpu_secs(m.pid()) - cpu;
            row(
                &m,
                "CPU time of the tool's process for that cold read".into(),
                (
                    format!("{raw_cpu:.2} s"),
                    Some(Duration::from_secs_f64(raw_cpu)),
                ),
                &mut || (format!("{cpu:.2} s"), cpu),
            );
            peak = peak.max(read_rss(m.pid()));
            drop_page_cache();
            row(
                &m,
                "sequential read, warm (tool's cache)".into(),
                raw,
                &mut || seq_read(),
            );

            m.stop();
            m = Mount::start_with(&a, tool, &dir, &cache, "");
            drop_page_cache();
            let random_reads = || {
                let t = Instant::now();
                let f = std::fs::File::open(&big).unwrap();
                let mut buf = vec![0u8; 4096];
                for off in &offsets {
                    f.read_exact_at(&mut buf, *off).unwrap();
                }
                t.elapsed().as_secs_f64()
            };
            row(
                &m,
                "1,000 random 4 KiB reads, cold".into(),
                (
                    format!("{:.0} reads/s", 1000.0 / raw_rand.as_secs_f64()),
                    Some(raw_rand),
                ),
                &mut || {
                    let d = random_reads();
                    (format!("{:.0} reads/s", 1000.0 / d), d)
                },
            );
            // The same reads again, untimed, through a relay that counts
            // what the server sends: what each tool downloads for 4 MiB
            // read, read-ahead that goes on after the last read included.
            m.stop();
            let relay = Relay::start(&a.endpoint);
            let relayed = Args {
                endpoint: relay.endpoint.clone(),
                ..a.clone()
            };
            m = Mount::start_with(&relayed, tool, &dir, &cache, "");
            drop_page_cache();
            row(
                &m,
                "MiB the server sent for those 1,000 random reads (untimed, through a relay)"
                    .into(),
                ("3.9 MiB (4 KiB each)".into(), None),
                &mut || {
                    let down = relay.down();
                    random_reads();
                    let mib = (relay.settled() - down) as f64 / MIB as f64;
                    (format!("{mib:.1} MiB"), mib)
                },
            );
            m.stop();
            drop(relay);
            m = Mount::start_with(&a, tool, &dir, &cache, "");
            drop_page_cache();
            row(
                &m,
                "4 parallel readers, a quarter each, cold".into(),
                (format!("{:.0} MiB/s", mbps(size, raw_read)), Some(raw_read)),
                &mut || {
                    let t = Instant::now();
                    let quarter = size / 4;
                    std::thread::scope(|sc| {
                        for q in 0..4u64 {
                            let big = &big;
                            sc.spawn(move || {
                                let f = std::fs::File::open(big).unwrap();
                                let mut buf = vec![0u8; MIB as usize];
                                let mut off = q * quarter;
                                while off < (q + 1) * quarter {
                                    let n = f.read_at(&mut buf, off).unwrap();
                                    assert!(n > 0);
                                    off += n as u64;
                                }
                            });
                        }
                    });
                    let d = t.elapsed().as_secs_f64();
                    (format!("{:.0} MiB/s", size as f64 / MIB as f64 / d), d)
                },
            );

            std::fs::create_dir(dir.join(&own).join("small")).unwrap();
            row(
                &m,
                format!("create {} files of 4 KiB, until in S3", a.files),
                (
                    format!("{:.0} PUTs/s", a.files as f64 / raw_create.as_secs_f64()),
                    Some(raw_create),
                ),
                &mut || {
                    let t = Instant::now();
                    for i in 0..a.files {
                        std::fs::write(dir.join(&own).join(format!("small/{i}")), &small).unwrap();
                    }
                    let prefix = format!("{own}/small/");
                    wait_for_keys(&rt, &s3, &a.bucket, &prefix, a.files);
                    let d = t.elapsed().as_secs_f64();
                    (format!("{:.0} files/s", a.files as f64 / d), d)
                },
            );

            let dd_mib = a.size_mib.min(100);
            // The raw client's large write, scaled to the dd's size.
            let raw_dd = (
                format!("{:.0} MiB/s", mbps(size, raw_write)),
                Some(raw_write.mul_f64(dd_mib as f64 / a.size_mib as f64)),
            );
            row(
                &m,
                format!("dd bs=4k of {dd_mib} MiB into a new file, until in S3"),
                raw_dd.clone(),
                &mut || {
                    dd_into(
                        &rt,
                        &s3,
                        &a.bucket,
                        &dir,
                        &format!("{own}/dd"),
                        dd_mib,
                        tool,
                    )
                },
            );
            row(
                &m,
                "100,000 writes of 18 bytes, until in S3".into(),
                ("—".into(), None),
                &mut || small_writes_into(&rt, &s3, &a.bucket, &dir, &format!("{own}/log")),
            );
            if tool == Tool::Bucketfs {
                m.stop();
                m = Mount::start_with(&a, tool, &dir, &cache, ",writeback=async");
            }
            std::fs::create_dir(dir.join(&own).join("async")).unwrap();
            row(
                &m,
                format!(
                    "create {} files of 4 KiB, until in S3; bucketfs with writeback=async",
                    a.files
                ),
                (
                    format!("{:.0} PUTs/s", a.files as f64 / raw_create.as_secs_f64()),
                    Some(raw_create),
                ),
                &mut || {
                    let t = Instant::now();
                    for i in 0..a.files {
                        std::fs::write(dir.join(&own).join(format!("async/{i}")), &small).unwrap();
                    }
                    let closed = t.elapsed().as_secs_f64();
                    let prefix = format!("{own}/async/");
                    wait_for_keys(&rt, &s3, &a.bucket, &prefix, a.files);
                    let d = t.elapsed().as_secs_f64();
                    (
                        format!(
                            "{:.0} files/s (all closed in {closed:.2} s)",
                            a.files as f64 / d
                        ),
                        d,
                    )
                },
            );
            // The small writes again, bucketfs with `-o passthrough` (the
            // kernel writes to the staged file); the peers as before.
            if tool == Tool::Bucketfs {
                m.stop();
                m = Mount::start_with(&a, tool, &dir, &cache, ",passthrough");
            }
            row(
                &m,
                format!(
                    "dd bs=4k of {dd_mib} MiB into a new file, until in S3; bucketfs with passthrough"
                ),
                raw_dd,
                &mut || {
                    dd_into(
                        &rt,
                        &s3,
                        &a.bucket,
                        &dir,
                        &format!("{own}/dd-pt"),
                        dd_mib,
                        tool,
                    )
                },
            );
            row(
                &m,
                "100,000 writes of 18 bytes, until in S3; bucketfs with passthrough".into(),
                ("—".into(), None),
                &mut || small_writes_into(&rt, &s3, &a.bucket, &dir, &format!("{own}/log-pt")),
            );
            if tool == Tool::Bucketfs {
                m.stop();
                m = Mount::start_with(&a, tool, &dir, &cache, "");
            }

            // `ls -l` prints a total line first.
            let ls = || {
                timed_ls(
                    tool,
                    "-l",
                    &dir.join("many"),
                    a.entries + 1,
                    Duration::from_secs(600),
                )
            };
            m.stop();
            m = Mount::start_with(&a, tool, &dir, &cache, "");
            drop_page_cache();
            let raw = (
                format!("{:.2} s (LIST only)", raw_list.as_secs_f64()),
                Some(raw_list),
            );
            let raw_heads = (
                format!("{:.2} s (LIST + a HEAD each)", raw_list_head.as_secs_f64()),
                Some(raw_list_head),
            );
            row(
                &m,
                format!("ls -l of {} entries with metadata, cold", a.entries),
                raw_heads,
                &mut || ls(),
            );
            row(
                &m,
                format!("ls -l of {} entries, again", a.entries),
                raw.clone(),
                &mut || ls(),
            );
            // An older build (a before/after run) may not have the option.
            let nom = tool == Tool::Bucketfs
                && Command::new(&a.bucketfs)
                    .arg("--help")
                    .output()
                    .is_ok_and(|o| {
                        String::from_utf8_lossy(&o.stdout).contains("no_object_metadata")
                    });
            if nom {
                m.stop();
                m = Mount::start_with(&a, tool, &dir, &cache, ",no_object_metadata");
            }
            row(
                &m,
                format!(
                    "ls -l of {} entries, cold, bucketfs with no_object_metadata",
                    a.entries
                ),
                raw,
                &mut || {
                    if nom { ls() } else { ("—".into(), f64::NAN) }
                },
            );
            if nom {
                m.stop();
                m = Mount::start_with(&a, tool, &dir, &cache, "");
            }

            row(
                &m,
                format!("append 1 MiB to the {} MiB file, until in S3", a.size_mib),
                (
                    format!("{:.2} s (1 MiB PUT)", raw_put.as_secs_f64()),
                    Some(raw_put),
                ),
                &mut || {
                    let t = Instant::now();
                    // Mountpoint for Amazon S3 does not append to an object.
                    let append = || -> std::io::Result<()> {
                        let mut f = std::fs::OpenOptions::new().append(true).open(&big)?;
                        f.seek(SeekFrom::End(0))?;
                        f.write_all(&tail)?;
                        f.sync_all()
                    };
                    if let Err(e) = append() {
                        assert!(tool != Tool::Bucketfs, "append through bucketfs: {e}");
                        return (format!("fails: {e}"), f64::NAN);
                    }
                    wait_in_s3(&rt, &s3, &a.bucket, &big_key, size + MIB);
                    let d = t.elapsed().as_secs_f64();
                    (format!("{d:.2} s"), d)
                },
            );
            peak = peak.max(read_rss(m.pid()));
            m.stop();
            results.push(cells);
            peaks[ti] = peaks[ti].max(peak);
        }
        if a.rounds > 1 {
            // Every round's figures on stderr: the table shows medians.
            for (row, (name, _, _)) in names.iter().enumerate() {
                let cells: Vec<String> = tools
                    .iter()
                    .zip(&results)
                    .map(|(t, r)| format!("{} {}", t.name(), r[row].shown))
                    .collect();
                eprintln!("round {}: {name}: {}", round + 1, cells.join("; "));
            }
        }
        rounds.push(results);
    }
    // Each cell: the round with the median time (a failure counts as the
    // slowest).
    let mut results: Vec<Vec<Cell>> = (0..tools.len())
        .map(|ti| {
            (0..names.len())
                .map(|row| {
                    let mut all: Vec<&Cell> = rounds.iter().map(|r| &r[ti][row]).collect();
                    all.sort_by(|x, y| {
                        let key = |c: &Cell| {
                            if c.secs.is_nan() {
                                f64::INFINITY
                            } else {
                                c.secs
                            }
                        };
                        key(x).total_cmp(&key(y))
                    });
                    let m = all[all.len() / 2];
                    Cell {
                        shown: m.shown.clone(),
                        secs: m.secs,
                        requests: m.requests.clone(),
                    }
                })
                .collect()
        })
        .collect();
    if a.rounds > 1 {
        println!(
            "medians of {} rounds, the tools interleaved in each",
            a.rounds
        );
    }

    // The large directory last, in a pass of its own: created earlier,
    // its objects would slow the server's answers in every row before.
    if a.huge > 0 {
        // A directory of plain objects (no metadata), as a data pipeline
        // leaves it: listed by names only, for the inode table's scale.
        let raw_huge = rt.block_on(async {
            futures::stream::iter(0..a.huge)
                .map(|i| {
                    let (s3, bucket) = (s3.clone(), a.bucket.clone());
                    async move {
                        s3.put_object()
                            .bucket(bucket)
                            .key(format!("huge/f{i:07}"))
                            .body(ByteStream::from(vec![1u8]))
                            .send()
                            .await
                            .unwrap();
                    }
                })
                .buffer_unordered(64)
                .collect::<Vec<_>>()
                .await;
            let t = Instant::now();
            assert_eq!(
                list_keys(&s3, &a.bucket, "huge/", Some("/")).await.len(),
                a.huge
            );
            t.elapsed()
        });
        for (ti, &tool) in tools.iter().enumerate() {
            let mut m = Mount::start_with(&a, tool, &dir, &cache, "");
            drop_page_cache();
            let start = rss_now(m.pid());
            let before = m.counters();
            // `ls -f` lists . and .. too.
            let (shown, secs) = timed_ls(
                tool,
                "-f",
                &dir.join("huge"),
                a.huge + 2,
                Duration::from_secs(180),
            );
            let requests = diff(&before, &m.counters());
            let listed = rss_now(m.pid());
            // The kernel forgets every inode it was given; the daemon's
            // table should let them go as well.
            drop_page_cache();
            let deadline = Instant::now() + Duration::from_secs(100);
            let mut forgot = rss_now(m.pid());
            while Instant::now() < deadline {
                std::thread::sleep(Duration::from_secs(5));
                forgot = forgot.min(rss_now(m.pid()));
            }
            m.stop();
            results[ti].push(Cell {
                shown,
                secs,
                requests,
            });
            results[ti].push(Cell {
                // One decimal: the aim (within 20% of the start) is a
                // matter of a MiB or two.
                shown: format!(
                    "{:.1} / {:.1} / {:.1} MiB",
                    start as f64 / MIB as f64,
                    listed as f64 / MIB as f64,
                    forgot as f64 / MIB as f64
                ),
                secs: f64::NAN,
                requests: String::new(),
            });
            if ti == 0 {
                names.push((
                    format!("`ls -f` of {} plain objects, cold", a.huge),
                    format!("{:.2} s (LIST only)", raw_huge.as_secs_f64()),
                    Some(raw_huge),
                ));
                names.push((
                    "daemon RSS: mounted / after that listing / least in the 100 s after drop_caches".into(),
                    String::new(),
                    None,
                ));
            }
        }
    }

    let mut rows: Vec<Row> = Vec::new();
    for (i, (name, raw, raw_secs)) in names.into_iter().enumerate() {
        let ours = &results[0][i];
        rows.push(Row {
            name,
            cells: results.iter().map(|r| r[i].shown.clone()).collect(),
            raw,
            ratio: match raw_secs {
                Some(d) if ours.secs.is_finite() => format!("{:.2}", d.as_secs_f64() / ours.secs),
                _ => "—".into(),
            },
            requests: ours.requests.clone(),
        });
    }
    let head: Vec<&str> = tools.iter().map(|t| t.name()).collect();
    println!(
        "| workload | {} | raw aws-sdk-s3 | raw time ÷ bucketfs time | bucketfs S3 requests |",
        head.join(" | ")
    );
    println!("|---{}|---|---|---|", "|---".repeat(tools.len()));
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {} |",
            r.name,
            r.cells.join(" | "),
            r.raw,
            r.ratio,
            r.requests
        );
    }
    let rss: Vec<String> = peaks
        .iter()
        .map(|p| format!("{:.0} MiB", *p as f64 / MIB as f64))
        .collect();
    println!(
        "| peak RSS of the daemon (the large directory aside) | {} | | | |",
        rss.join(" | ")
    );
}
