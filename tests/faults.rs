//! Faults between the mount and S3, injected by a proxy on 127.0.0.1:
//! throttling, resets, stalls and bodies cut short are retried with backoff
//! and the data lands whole; a failure that outlasts the retries is EIO at
//! close, in bounded time, with no object and no multipart upload left.

mod common;

use std::fs;
use std::io::Write;
use std::time::{Duration, Instant};

use common::proxy::{Fault, Proxy};
use common::*;

fn through_proxy(tag: &str) -> (Proxy, Bucket, Mount) {
    let b = Bucket::new(server(), tag, false);
    let proxy = Proxy::start(server().endpoint.trim_start_matches("http://"));
    let via = Bucket {
        endpoint: proxy.endpoint.clone(),
        ..b.clone()
    };
    let m = Mount::new(&via, "timeout=2,retries=3");
    (proxy, b, m)
}

#[test]
fn throttling_resets_and_stalls_are_retried_and_writes_land() {
    let (proxy, b, m) = through_proxy("retry-write");
    proxy.inject("PUT", 2, Fault::Status(503));
    fs::write(m.path("a"), b"after two SlowDowns").unwrap();
    assert_eq!(b.get("a").as_deref(), Some(&b"after two SlowDowns"[..]));
    proxy.inject("PUT", 1, Fault::Reset);
    fs::write(m.path("b"), b"after a reset").unwrap();
    assert_eq!(b.get("b").as_deref(), Some(&b"after a reset"[..]));
    proxy.inject("PUT", 1, Fault::Stall);
    let t = Instant::now();
    fs::write(m.path("c"), b"after a stall").unwrap();
    assert_eq!(b.get("c").as_deref(), Some(&b"after a stall"[..]));
    assert!(t.elapsed() < Duration::from_secs(30));
    // A multipart upload with a failing part.
    let big = pattern(20 * 1024 * 1024, 4);
    proxy.inject("PUT", 1, Fault::Status(500));
    fs::write(m.path("big"), &big).unwrap();
    assert_eq!(sha256(&b.get("big").unwrap()), sha256(&big));
    assert_eq!(proxy.faults_injected(), 5);
    assert_eq!(b.open_multipart_uploads(), 0);
}

#[test]
fn reads_survive_resets_and_bodies_cut_short() {
    let (proxy, b, m) = through_proxy("retry-read");
    let data = pattern(3 * 1024 * 1024 + 17, 8);
    b.put("f", &data);
    proxy.inject("GET", 1, Fault::CutShort);
    proxy.inject("GET", 1, Fault::Reset);
    proxy.inject("GET", 1, Fault::Status(503));
    assert_eq!(
        sha256_file(&m.path("f")),
        sha256(&data),
        "never served a short body"
    );
    assert_eq!(proxy.faults_injected(), 3);
}

/// A read-ahead GET (several blocks in one range) whose body breaks off
/// half-way: the blocks that arrived whole are kept, the retry asks only
/// for the rest, and the reader gets every byte right.
#[test]
fn a_read_ahead_get_cut_short_resumes_where_it_broke() {
    let (proxy, b, m) = through_proxy("resume-read");
    let data = pattern(24 * 1024 * 1024 + 5, 9);
    b.put("f", &data);
    proxy.inject_get_longer_than(1024 * 1024, 1, Fault::CutShort);
    assert_eq!(
        sha256_file(&m.path("f")),
        sha256(&data),
        "never served a short body"
    );
    assert_eq!(proxy.faults_injected(), 1, "no read-ahead GET was cut");
    let ranges: Vec<std::ops::Range<u64>> = proxy
        .heads()
        .iter()
        .filter(|h| h.starts_with("GET "))
        .filter_map(|h| common::proxy::range_of(h.as_bytes()))
        .collect();
    let cut = ranges
        .iter()
        .find(|r| r.end - r.start > 1024 * 1024)
        .unwrap()
        .clone();
    assert!(
        ranges
            .iter()
            .any(|r| r.end == cut.end && r.start > cut.start && r.start % (1024 * 1024) == 0),
        "no GET resumed {cut:?} at a block past its start: {ranges:?}"
    );
}

#[test]
fn a_failure_past_the_retries_is_eio_at_close_and_leaves_nothing_behind() {
    let (proxy, b, m) = through_proxy("giveup");
    proxy.inject("PUT", 1000, Fault::Status(503));
    let t = Instant::now();
    let mut f = fs::File::create(m.path("big")).unwrap();
    f.write_all(&pattern(12 * 1024 * 1024, 2)).unwrap();
    let err = f.sync_all().unwrap_err();
    assert_eq!(errno(err), libc::EIO);
    assert!(
        t.elapsed() < Duration::from_secs(60),
        "bounded: {:?}",
        t.elapsed()
    );
    assert_eq!(b.get("big"), None, "no object, and no truncated one");
    assert_eq!(
        b.open_multipart_uploads(),
        0,
        "the failed multipart upload was aborted"
    );
    // The data is still staged: once S3 is back, the next fsync lands it.
    proxy.clear();
    f.sync_all().unwrap();
    drop(f);
    assert_eq!(
        sha256(&b.get("big").unwrap()),
        sha256(&pattern(12 * 1024 * 1024, 2))
    );
}
