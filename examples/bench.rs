//! The benchmark behind `scripts/bench`: each workload through a bucketfs
//! mount and the same transfer by a raw aws-sdk-s3 client on the same
//! server, in the same run, with their ratio and the S3 requests bucketfs
//! made (from `bucketfs status`). Never a test: it reports, it asserts
//! nothing. Only 127.0.0.1 is used.
//!
//!     bench --bucketfs PATH --endpoint URL --bucket NAME [--size-mib N]
//!           [--files N] [--entries N] [--concurrency N] [--region R]

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

struct Args {
    bucketfs: PathBuf,
    endpoint: String,
    bucket: String,
    region: String,
    size_mib: u64,
    files: usize,
    entries: usize,
    concurrency: usize,
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
        concurrency: 8,
    };
    let v: Vec<String> = std::env::args().skip(1).collect();
    for pair in v.chunks(2) {
        let val = pair.get(1).cloned().unwrap_or_default();
        match pair[0].as_str() {
            "--bucketfs" => a.bucketfs = PathBuf::from(val),
            "--endpoint" => a.endpoint = val,
            "--bucket" => a.bucket = val,
            "--region" => a.region = val,
            "--size-mib" => a.size_mib = val.parse().expect("--size-mib N"),
            "--files" => a.files = val.parse().expect("--files N"),
            "--entries" => a.entries = val.parse().expect("--entries N"),
            "--concurrency" => a.concurrency = val.parse().expect("--concurrency N"),
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

/// A running mount.
struct Mount {
    dir: PathBuf,
    bin: PathBuf,
    child: Option<Child>,
}

impl Mount {
    fn start(a: &Args, dir: &Path, cache: &Path) -> Mount {
        Self::start_with(a, dir, cache, "")
    }

    fn start_with(a: &Args, dir: &Path, cache: &Path, extra: &str) -> Mount {
        let opts = format!(
            "endpoint={},path_style,region={},cache_dir={},log_file={},upload_concurrency={}{extra}",
            a.endpoint,
            a.region,
            cache.display(),
            cache.with_extension("log").display(),
            a.concurrency
        );
        let child = Command::new(&a.bucketfs)
            .args(["-f", "-o", &opts, &a.bucket])
            .arg(dir)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start bucketfs");
        let start = Instant::now();
        while !mounted(dir) {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "mount did not come up"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Mount {
            dir: dir.to_path_buf(),
            bin: a.bucketfs.clone(),
            child: Some(child),
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("umount").arg(&self.dir).status();
            let _ = c.wait();
        }
    }

    /// Requests by type and bytes sent so far.
    fn counters(&self) -> BTreeMap<String, u64> {
        let out = Command::new(&self.bin)
            .arg("status")
            .arg(&self.dir)
            .output()
            .expect("bucketfs status");
        let text = String::from_utf8_lossy(&out.stdout);
        let mut m = BTreeMap::new();
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

fn mounted(dir: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let want = dir.to_string_lossy();
    info.lines().any(|l| l.split(' ').nth(4) == Some(&*want))
}

fn drop_page_cache() {
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

fn diff(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> String {
    let mut parts = Vec::new();
    for (k, v) in after {
        let d = v - before.get(k).copied().unwrap_or(0);
        if d > 0 && k != "bytes sent" {
            parts.push(format!("{k} {d}"));
        }
    }
    let sent = after.get("bytes sent").copied().unwrap_or(0)
        - before.get("bytes sent").copied().unwrap_or(0);
    if sent > 0 {
        parts.push(format!("sent {:.1} MiB", sent as f64 / MIB as f64));
    }
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(", ")
    }
}

struct Row {
    name: String,
    ours: String,
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

fn main() {
    let a = args();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let s3 = client(&a);
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("mnt");
    let cache = work.path().join("cache");
    std::fs::create_dir_all(&dir).unwrap();
    let size = a.size_mib * MIB;
    let data = pattern(size as usize, 42);
    let mut rows: Vec<Row> = Vec::new();
    let mut rss_peak = 0u64;
    let mut m = Mount::start(&a, &dir, &cache);
    let read_rss = |pid: u32| -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                    l.split_whitespace()
                        .nth(1)
                        .and_then(|n| n.parse::<u64>().ok())
                })
            })
            .unwrap_or(0)
            * 1024
    };

    // 1. Sequential write.
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
    let before = m.counters();
    let t = Instant::now();
    {
        let mut f = std::fs::File::create(dir.join("big")).unwrap();
        for c in data.chunks(MIB as usize) {
            f.write_all(c).unwrap();
        }
        f.sync_all().expect("upload of the big file");
    }
    let ours = t.elapsed();
    rss_peak = rss_peak.max(read_rss(m.pid()));
    rows.push(Row {
        name: format!("sequential write {} MiB", a.size_mib),
        ours: format!("{:.0} MiB/s", mbps(size, ours)),
        raw: format!("{:.0} MiB/s", mbps(size, raw_write)),
        ratio: format!("{:.2}", raw_write.as_secs_f64() / ours.as_secs_f64()),
        requests: diff(&before, &m.counters()),
    });

    // 2. Sequential read, cold then warm.
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
    m.stop();
    let _ = std::fs::remove_dir_all(cache.join("blocks"));
    m = Mount::start(&a, &dir, &cache);
    drop_page_cache();
    let seq_read = |label: &str, m: &Mount, rows: &mut Vec<Row>| {
        let before = m.counters();
        let t = Instant::now();
        let mut f = std::fs::File::open(dir.join("big")).unwrap();
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
        let d = t.elapsed();
        rows.push(Row {
            name: format!("sequential read, {label}"),
            ours: format!("{:.0} MiB/s", mbps(size, d)),
            raw: format!("{:.0} MiB/s", mbps(size, raw_read)),
            ratio: format!("{:.2}", raw_read.as_secs_f64() / d.as_secs_f64()),
            requests: diff(&before, &m.counters()),
        });
    };
    seq_read("cold", &m, &mut rows);
    rss_peak = rss_peak.max(read_rss(m.pid()));
    drop_page_cache();
    seq_read("warm (block cache)", &m, &mut rows);

    // 3. 1,000 random 4 KiB reads.
    let offsets: Vec<u64> = (0..1000u64)
        .map(|i| (i * 7919 * 4096 + i * 13) % (size - 4096))
        .collect();
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
    m.stop();
    let _ = std::fs::remove_dir_all(cache.join("blocks"));
    m = Mount::start(&a, &dir, &cache);
    drop_page_cache();
    let before = m.counters();
    let t = Instant::now();
    {
        let f = std::fs::File::open(dir.join("big")).unwrap();
        let mut buf = vec![0u8; 4096];
        for off in &offsets {
            f.read_exact_at(&mut buf, *off).unwrap();
        }
    }
    let d = t.elapsed();
    rows.push(Row {
        name: "1,000 random 4 KiB reads (cold)".into(),
        ours: format!("{:.0} reads/s", 1000.0 / d.as_secs_f64()),
        raw: format!("{:.0} reads/s", 1000.0 / raw_rand.as_secs_f64()),
        ratio: format!("{:.2}", raw_rand.as_secs_f64() / d.as_secs_f64()),
        requests: diff(&before, &m.counters()),
    });

    // 4. Create small files.
    let small = pattern(4096, 7);
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
    std::fs::create_dir(dir.join("small")).unwrap();
    let before = m.counters();
    let t = Instant::now();
    for i in 0..a.files {
        std::fs::write(dir.join(format!("small/{i}")), &small).unwrap();
    }
    let d = t.elapsed();
    rows.push(Row {
        name: format!("create {} files of 4 KiB", a.files),
        ours: format!("{:.0} files/s", a.files as f64 / d.as_secs_f64()),
        raw: format!("{:.0} PUTs/s", a.files as f64 / raw_create.as_secs_f64()),
        ratio: format!("{:.2}", raw_create.as_secs_f64() / d.as_secs_f64()),
        requests: diff(&before, &m.counters()),
    });

    // 5. ls -l of a large directory of objects carrying s3fs metadata,
    // cold and warm, and with no_object_metadata (LISTs only).
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
        let mut token = None;
        let mut n = 0;
        loop {
            let p = s3
                .list_objects_v2()
                .bucket(&a.bucket)
                .prefix("many/")
                .delimiter("/")
                .set_continuation_token(token)
                .send()
                .await
                .unwrap();
            n += p.contents().len();
            token = p.next_continuation_token().map(str::to_string);
            if token.is_none() {
                break;
            }
        }
        assert_eq!(n, a.entries);
        t.elapsed()
    });
    m.stop();
    m = Mount::start(&a, &dir, &cache);
    for label in ["cold", "warm", "no_object_metadata"] {
        if label == "no_object_metadata" {
            m.stop();
            m = Mount::start_with(&a, &dir, &cache, ",no_object_metadata");
        }
        let before = m.counters();
        let t = Instant::now();
        let out = Command::new("ls")
            .arg("-l")
            .arg(dir.join("many"))
            .stdout(Stdio::piped())
            .output()
            .unwrap();
        let d = t.elapsed();
        let lines = String::from_utf8_lossy(&out.stdout).lines().count();
        assert_eq!(lines, a.entries + 1);
        rows.push(Row {
            name: format!("ls -l of {} entries, {label}", a.entries),
            ours: format!("{:.2} s", d.as_secs_f64()),
            raw: format!("{:.2} s (LIST only)", raw_list.as_secs_f64()),
            ratio: format!("{:.2}", raw_list.as_secs_f64() / d.as_secs_f64()),
            requests: diff(&before, &m.counters()),
        });
    }

    // 6. Append 1 MiB to the big file.
    let tail = pattern(MIB as usize, 9);
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
    let before = m.counters();
    let t = Instant::now();
    {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.join("big"))
            .unwrap();
        f.seek(SeekFrom::End(0)).unwrap();
        f.write_all(&tail).unwrap();
        f.sync_all().expect("upload of the append");
    }
    let d = t.elapsed();
    rows.push(Row {
        name: format!("append 1 MiB to the {} MiB file", a.size_mib),
        ours: format!("{:.2} s", d.as_secs_f64()),
        raw: format!("{:.2} s (1 MiB PUT)", raw_put.as_secs_f64()),
        ratio: format!("{:.2}", raw_put.as_secs_f64() / d.as_secs_f64()),
        requests: diff(&before, &m.counters()),
    });
    rss_peak = rss_peak.max(read_rss(m.pid()));
    m.stop();

    println!(
        "| workload | bucketfs | raw aws-sdk-s3 | ratio (raw time / ours) | bucketfs S3 requests |"
    );
    println!("| --- | --- | --- | --- | --- |");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {} |",
            r.name, r.ours, r.raw, r.ratio, r.requests
        );
    }
    println!(
        "| daemon peak RSS | {:.0} MiB | | | |",
        rss_peak as f64 / MIB as f64
    );
}
