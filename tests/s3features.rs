//! S3 object features through a real mount, checked on the server with
//! the S3 API (never through the mount): server-side encryption, storage
//! class, canned ACLs, requester pays, SSE-C headers, Content-Type from
//! the extension, headers kept through the copies the mount makes, and
//! a checksum on every upload (an Object Lock bucket takes single PUTs).
//!
//! Every write path is checked: a small file, a multipart upload, an
//! append to a large object (UploadPartCopy), rename, chmod, touch and
//! an overwrite of an object written by another client.

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;

use aws_sdk_s3::operation::head_object::HeadObjectOutput;
use aws_sdk_s3::primitives::ByteStream;
use common::proxy::{Fault, Proxy, header_of};
use common::*;

const MIB: usize = 1024 * 1024;

fn head(b: &Bucket, key: &str) -> HeadObjectOutput {
    rt().block_on(b.client.head_object().bucket(&b.name).key(key).send())
        .unwrap_or_else(|e| panic!("HEAD {key}: {e:?}"))
}

/// The write paths, prepared before the mount starts: objects written by
/// another client (plain: no encryption, STANDARD, no ACL) that the mount
/// then copies or rewrites.
fn seed_write_paths(b: &Bucket) {
    for k in [
        "torename.txt",
        "chmodded.txt",
        "touched.txt",
        "overwritten.txt",
    ] {
        b.put(k, b"from another client");
    }
    b.put("appended.bin", &pattern(11 * MIB, 1));
}

/// Runs every write path through the mount (part_size=5M); the keys
/// written, each with the path that wrote it.
fn run_write_paths(m: &Mount) -> Vec<(&'static str, &'static str)> {
    fs::write(m.path("small.txt"), b"small").unwrap();
    fs::write(m.path("big.bin"), pattern(12 * MIB, 2)).unwrap();
    let copies = requests(m, "UPLOAD_PART_COPY");
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(m.path("appended.bin"))
        .unwrap();
    f.write_all(b"tail").unwrap();
    close(f).unwrap();
    assert!(
        requests(m, "UPLOAD_PART_COPY") > copies,
        "the append reused the object's parts server-side"
    );
    fs::rename(m.path("torename.txt"), m.path("renamed.txt")).unwrap();
    fs::set_permissions(m.path("chmodded.txt"), fs::Permissions::from_mode(0o600)).unwrap();
    sh(&m.dir, "touch -m -d @1600000000 touched.txt");
    fs::write(m.path("overwritten.txt"), b"new contents").unwrap();
    // A chmod right after the write: merged, stored by a deferred copy.
    fs::write(m.path("fresh.txt"), b"fresh").unwrap();
    fs::set_permissions(m.path("fresh.txt"), fs::Permissions::from_mode(0o600)).unwrap();
    let stored = poll(std::time::Duration::from_secs(60), || {
        m.bucket
            .metadata("fresh.txt")
            .get("mode")
            .map(String::as_str)
            == Some("33152")
    });
    assert!(
        stored,
        "the deferred chmod: {:?}",
        m.bucket.metadata("fresh.txt")
    );
    vec![
        ("fresh.txt", "chmod after write (deferred copy)"),
        ("small.txt", "small file"),
        ("big.bin", "multipart"),
        ("appended.bin", "append (UploadPartCopy)"),
        ("renamed.txt", "rename"),
        ("chmodded.txt", "chmod"),
        ("touched.txt", "touch"),
        ("overwritten.txt", "overwrite"),
    ]
}

#[test]
fn sse_kms_with_a_key_lands_on_every_write_path() {
    let b = Bucket::new(server(), "ssekms", false);
    seed_write_paths(&b);
    assert_eq!(head(&b, "chmodded.txt").ssekms_key_id(), None);
    let key_id = "arn:aws:kms:us-east-1:123456789012:key/bucketfs-test";
    let m = Mount::new(
        &b,
        &format!("part_size=5M,sse=aws:kms,sse_kms_key_id={key_id}"),
    );
    for (key, path) in run_write_paths(&m) {
        let h = head(&b, key);
        assert_eq!(
            h.server_side_encryption().map(|e| e.as_str()),
            Some("aws:kms"),
            "{path}: {key}"
        );
        assert_eq!(h.ssekms_key_id(), Some(key_id), "{path}: {key}");
    }
}

/// A mount writing with SSE-KMS is killed with files not yet uploaded
/// (one a single PUT, one multipart): the next mount on the same cache
/// dir, started without any encryption option, uploads them encrypted
/// with the writer's key (before, they went up without: the bucket's
/// default).
#[test]
fn data_a_killed_sse_kms_mount_staged_goes_up_encrypted_by_a_mount_without_sse() {
    let b = Bucket::new(server(), "ssekmsrec", false);
    let tmp = tempfile::tempdir().unwrap();
    let cache = format!("cache_dir={}", tmp.path().join("cache").display());
    let key_id = "arn:aws:kms:us-east-1:123456789012:key/bucketfs-recovered";
    let m = Mount::new(
        &b,
        &format!("{cache},part_size=5M,sse=aws:kms,sse_kms_key_id={key_id}"),
    );
    let (small, large) = (pattern(1000, 3), pattern(6 * MIB, 4));
    let mut f1 = fs::File::create(m.path("small.bin")).unwrap();
    f1.write_all(&small).unwrap();
    let mut f2 = fs::File::create(m.path("large.bin")).unwrap();
    f2.write_all(&large).unwrap();
    kill9(&m);
    drop((f1, f2, m));
    assert!(b.get("small.bin").is_none(), "not uploaded before the kill");
    let m = Mount::new(&b, &cache);
    wait_until(
        std::time::Duration::from_secs(60),
        "the staged files to land",
        || {
            b.get("small.bin").map(|d| sha256(&d)) == Some(sha256(&small))
                && b.get("large.bin").map(|d| sha256(&d)) == Some(sha256(&large))
        },
    );
    for key in ["small.bin", "large.bin"] {
        let h = head(&b, key);
        assert_eq!(
            h.server_side_encryption().map(|e| e.as_str()),
            Some("aws:kms"),
            "{key}: {}",
            m.log_text()
        );
        assert_eq!(h.ssekms_key_id(), Some(key_id), "{key}");
    }
    drop(m);
}

#[test]
fn use_sse_sends_sse_s3_on_every_write_path() {
    let (proxy, b, m) = {
        let b = Bucket::new(server(), "sses3", false);
        seed_write_paths(&b);
        let proxy = Proxy::start(server().endpoint.trim_start_matches("http://"));
        let via = Bucket {
            endpoint: proxy.endpoint.clone(),
            ..b.clone()
        };
        let m = Mount::new(&via, "part_size=5M,use_sse");
        (proxy, b, m)
    };
    for (key, path) in run_write_paths(&m) {
        assert_eq!(
            head(&b, key).server_side_encryption().map(|e| e.as_str()),
            Some("AES256"),
            "{path}: {key}"
        );
    }
    // A single PUT carries the CRC32C of its bytes too (the standard
    // check value of "123456789" is 0xE3069283).
    fs::write(m.path("check.txt"), b"123456789").unwrap();
    // Whatever moto does by default, the requests themselves asked for it.
    let heads = proxy.heads();
    let writes: Vec<&String> = heads.iter().filter(|h| is_new_object_request(h)).collect();
    assert!(writes.len() >= 6, "{} writes", writes.len());
    for h in writes {
        assert_eq!(
            header_of(h, "x-amz-server-side-encryption").as_deref(),
            Some("AES256"),
            "{}",
            h.lines().next().unwrap()
        );
    }
    // Every upload carries its checksum: a PutObject Content-MD5 (and
    // CRC32C), an UploadPart its CRC32C.
    let uploads: Vec<&String> = heads
        .iter()
        .filter(|h| h.starts_with("PUT ") && header_of(h, "x-amz-copy-source").is_none())
        .collect();
    assert!(
        uploads
            .iter()
            .any(|h| h.lines().next().unwrap().contains("partNumber=")),
        "parts were sent"
    );
    for h in uploads {
        let line = h.lines().next().unwrap();
        let checksum = if line.contains("partNumber=") {
            "x-amz-checksum-crc32c"
        } else {
            "content-md5"
        };
        assert!(header_of(h, checksum).is_some(), "no {checksum}: {line}");
    }
    let put = heads
        .iter()
        .find(|h| h.starts_with(&format!("PUT /{}/check.txt", b.name)))
        .expect("the PUT of check.txt");
    assert_eq!(
        header_of(put, "x-amz-checksum-crc32c").as_deref(),
        Some("4waSgw==")
    );
}

/// PutObject, CreateMultipartUpload or CopyObject: a request that makes
/// an object.
fn is_new_object_request(head: &str) -> bool {
    let line = head.lines().next().unwrap_or("");
    let is_part = line.contains("partNumber=");
    (line.starts_with("PUT ") && !is_part && !line.contains("?acl") && !line.contains("tagging"))
        || (line.starts_with("POST ") && line.contains("?uploads"))
}

#[test]
fn storage_class_in_any_case_lands_on_every_write_path() {
    let b = Bucket::new(server(), "sclass", false);
    seed_write_paths(&b);
    let m = Mount::new(&b, "part_size=5M,storage_class=standard_ia");
    for (key, path) in run_write_paths(&m) {
        assert_eq!(
            head(&b, key).storage_class().map(|c| c.as_str()),
            Some("STANDARD_IA"),
            "{path}: {key}"
        );
    }
}

fn is_public_read(b: &Bucket, key: &str) -> bool {
    let acl = rt()
        .block_on(b.client.get_object_acl().bucket(&b.name).key(key).send())
        .unwrap_or_else(|e| panic!("GetObjectAcl {key}: {e:?}"));
    acl.grants().iter().any(|g| {
        g.grantee().and_then(|x| x.uri()) == Some("http://acs.amazonaws.com/groups/global/AllUsers")
            && g.permission().map(|p| p.as_str()) == Some("READ")
    })
}

#[test]
fn default_acl_lands_on_every_write_path_and_none_is_sent_without_it() {
    let b = Bucket::new(server(), "acl", false);
    seed_write_paths(&b);
    assert!(!is_public_read(&b, "chmodded.txt"));
    let m = Mount::new(&b, "part_size=5M,default_acl=public-read");
    for (key, path) in run_write_paths(&m) {
        assert!(is_public_read(&b, key), "{path}: {key}");
    }
    drop(m);
    // Without the option, no x-amz-acl goes out at all.
    let (proxy, _b, m) = through_proxy("noacl", false, "");
    fs::write(m.path("f.txt"), b"x").unwrap();
    fs::set_permissions(m.path("f.txt"), fs::Permissions::from_mode(0o600)).unwrap();
    // The chmod's copy (a PUT with a copy source) goes a second later.
    let copied = poll(std::time::Duration::from_secs(60), || {
        proxy.requests("PUT") >= 2
    });
    assert!(
        copied,
        "the PUT and the chmod's copy: {}",
        proxy.requests("PUT")
    );
    for h in proxy.heads() {
        assert_eq!(header_of(&h, "x-amz-acl"), None, "{h}");
    }
}

#[test]
fn requester_pays_sends_the_payer_on_every_request() {
    // Without the option, a requester-pays bucket refuses the mount.
    let b = Bucket::new(server(), "payer", false);
    b.put("dir/existing.txt", b"old");
    let proxy = Proxy::start(server().endpoint.trim_start_matches("http://"));
    proxy.require_requester_pays();
    let via = Bucket {
        endpoint: proxy.endpoint.clone(),
        ..b.clone()
    };
    let (tmp, mp) = scratch_mountpoint();
    let opts = base_options(
        &proxy.endpoint,
        &tmp.path().join("c"),
        &tmp.path().join("log"),
    );
    let out = command()
        .args(["-o", &opts, &b.name])
        .arg(&mp)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success(), "the proxy refuses like AWS");
    assert!(!is_mounted(&mp));
    // With it, everything works: list, read, write, multipart, rename,
    // chmod, delete, versions listing.
    let refused_requests = proxy.heads().len();
    let m = Mount::new(&via, "requester_pays,part_size=5M");
    assert_eq!(fs::read_dir(m.path("dir")).unwrap().count(), 1, "listing");
    assert_eq!(fs::read(m.path("dir/existing.txt")).unwrap(), b"old");
    fs::write(m.path("dir/new.txt"), b"new").unwrap();
    fs::write(m.path("big.bin"), pattern(11 * MIB, 3)).unwrap();
    fs::rename(m.path("dir/new.txt"), m.path("dir/moved.txt")).unwrap();
    fs::set_permissions(m.path("dir/moved.txt"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::remove_file(m.path("dir/existing.txt")).unwrap();
    let _ = fs::read_dir(m.path("dir/.versions")).unwrap().count();
    assert_eq!(b.get("dir/moved.txt").as_deref(), Some(&b"new"[..]));
    assert_eq!(b.get("big.bin").map(|v| v.len()), Some(11 * MIB));
    assert_eq!(b.get("dir/existing.txt"), None);
    let heads = proxy.heads();
    let methods: std::collections::HashSet<&str> =
        heads.iter().filter_map(|h| h.split(' ').next()).collect();
    for m in ["GET", "HEAD", "PUT", "POST", "DELETE"] {
        assert!(methods.contains(m), "a {m} was made");
    }
    assert!(requests(&m, "LIST_VERSIONS") > 0, "versions listed");
    let m_heads = proxy.heads();
    let unpaid: Vec<&str> = m_heads[refused_requests..]
        .iter()
        .filter(|h| header_of(h, "x-amz-request-payer").as_deref() != Some("requester"))
        .filter_map(|h| h.lines().next())
        .collect();
    assert_eq!(unpaid, Vec::<&str>::new(), "requests without the payer");
}

/// Writes an SSE-C key file (base64) of mode `mode`.
fn key_file(dir: &std::path::Path, mode: u32) -> (std::path::PathBuf, String) {
    use base64::Engine;
    let key: Vec<u8> = (0u8..32)
        .map(|i| i.wrapping_mul(7).wrapping_add(3))
        .collect();
    let b64 = base64::engine::general_purpose::STANDARD;
    let path = dir.join("sse-c.key");
    fs::write(&path, b64.encode(&key)).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
    use md5::Digest;
    let md5 = b64.encode(md5::Md5::digest(&key));
    (path, md5)
}

/// moto ignores SSE-C: what is checked here is that every request that
/// touches object data carries the key (its MD5 identifies it), copies
/// the copy-source key too (the proxy answers HEAD as S3 does for an
/// SSE-C object), and that the key never reaches the log.
#[test]
fn sse_c_key_goes_on_every_data_request_and_never_into_the_log() {
    let keydir = tempfile::tempdir().unwrap();
    let (path, md5) = key_file(keydir.path(), 0o600);
    let b = Bucket::new(server(), "ssec", true);
    b.put("appended.bin", &pattern(11 * MIB, 4));
    let proxy = Proxy::start(server().endpoint.trim_start_matches("http://"));
    proxy.echo_sse_c();
    let via = Bucket {
        endpoint: proxy.endpoint.clone(),
        ..b.clone()
    };
    let m = Mount::new(
        &via,
        &format!(
            "part_size=5M,allow_http_sse_c,use_sse=custom:{}",
            path.display()
        ),
    );
    fs::write(m.path("small.txt"), b"small").unwrap();
    fs::write(m.path("big.bin"), pattern(12 * MIB, 5)).unwrap();
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(m.path("appended.bin"))
        .unwrap();
    f.write_all(b"tail").unwrap();
    close(f).unwrap();
    fs::rename(m.path("small.txt"), m.path("renamed.txt")).unwrap();
    sh(&m.dir, "touch -m -d @1600000000 renamed.txt");
    let mut log = m.log_text();
    drop(m);
    let m = Mount::new(
        &via,
        &format!("allow_http_sse_c,load_sse_c={}", path.display()),
    );
    assert_eq!(fs::read(m.path("renamed.txt")).unwrap(), b"small");
    let vdir = m.path(".versions/renamed.txt");
    let version = fs::read_dir(&vdir).unwrap().next().unwrap().unwrap().path();
    assert_eq!(fs::read(version).unwrap(), b"small");
    log.push_str(&m.log_text());
    drop(m);
    let heads = proxy.heads();
    let mut seen = std::collections::HashSet::new();
    for h in &heads {
        let line = h.lines().next().unwrap();
        let method = line.split(' ').next().unwrap();
        let path = line.split(' ').nth(1).unwrap();
        let object = path.trim_start_matches('/').contains('/')
            && !path.contains("?list-type")
            && !path.contains("?versions")
            && !path.contains("?uploads&prefix")
            // ACL, tags and the bucket's ownership controls are not
            // object data: no key.
            && !path.contains("?acl")
            && !path.contains("?tagging")
            && !path.contains("?ownershipControls");
        let data = match method {
            "GET" | "HEAD" => object,
            "PUT" => true,
            "POST" => path.contains("?uploads") && !path.contains("prefix"),
            _ => false,
        };
        if !data {
            continue;
        }
        let kind = if header_of(h, "x-amz-copy-source").is_some() {
            if path.contains("partNumber") {
                "UploadPartCopy"
            } else {
                "CopyObject"
            }
        } else if path.contains("partNumber") {
            "UploadPart"
        } else if method == "POST" {
            "CreateMultipartUpload"
        } else if method == "PUT" {
            "PutObject"
        } else if method == "GET" && path.contains("versionId=") {
            "GET of a version"
        } else {
            method
        };
        seen.insert(kind);
        assert_eq!(
            header_of(h, "x-amz-server-side-encryption-customer-key-md5").as_deref(),
            Some(md5.as_str()),
            "{kind}: {line}"
        );
        if kind == "CopyObject" || kind == "UploadPartCopy" {
            assert_eq!(
                header_of(
                    h,
                    "x-amz-copy-source-server-side-encryption-customer-key-md5"
                )
                .as_deref(),
                Some(md5.as_str()),
                "{kind}: {line}"
            );
        }
    }
    for kind in [
        "PutObject",
        "CreateMultipartUpload",
        "UploadPart",
        "UploadPartCopy",
        "CopyObject",
        "GET of a version",
        "HEAD",
    ] {
        assert!(seen.contains(kind), "no {kind} seen: {seen:?}");
    }
    let key_b64 = fs::read_to_string(&path).unwrap();
    assert!(!log.is_empty());
    assert!(!log.contains(key_b64.trim()), "the key is in the log");
}

/// A mount that cannot honour its options fails with one line and
/// nothing mounted.
fn refused(endpoint: &str, bucket: &str, extra: &str) -> String {
    let (tmp, mp) = scratch_mountpoint();
    let opts = format!(
        "{},{extra}",
        base_options(endpoint, &tmp.path().join("c"), &tmp.path().join("log"))
    );
    let out = command()
        .args(["-o", &opts, bucket])
        .arg(&mp)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success(), "{extra}: mounted");
    assert!(!is_mounted(&mp), "{extra}: mounted");
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert_eq!(err.lines().count(), 1, "{extra}: {err}");
    err
}

#[test]
fn bad_s3_options_and_unsafe_key_files_fail_the_mount_in_one_line() {
    let b = Bucket::new(server(), "refuse", false);
    let keydir = tempfile::tempdir().unwrap();
    let (key, _) = key_file(keydir.path(), 0o644);
    let e = &b.endpoint;
    let err = refused(
        e,
        &b.name,
        &format!("allow_http_sse_c,sse_c_key_file={}", key.display()),
    );
    assert!(err.contains("chmod 600"), "{err}");
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
    let err = refused(e, &b.name, &format!("sse_c_key_file={}", key.display()));
    assert!(err.contains("allow_http_sse_c"), "{err}");
    let short = keydir.path().join("short.key");
    fs::write(&short, b"too short").unwrap();
    fs::set_permissions(&short, fs::Permissions::from_mode(0o600)).unwrap();
    let err = refused(
        e,
        &b.name,
        &format!("allow_http_sse_c,load_sse_c={}", short.display()),
    );
    assert!(err.contains("32"), "{err}");
    assert!(
        !err.contains("too short"),
        "the key file's contents are not shown"
    );
    for (opt, word) in [
        ("sse=aes256", "sse"),
        ("use_sse=custom", "use_sse"),
        ("storage_class=COLDEST", "storage_class"),
        ("default_acl=everyone", "default_acl"),
        ("sse_kms_key_id=k", "sse_kms_key_id"),
    ] {
        let err = refused(e, &b.name, opt);
        assert!(err.contains(word), "{opt}: {err}");
    }
}

#[test]
fn content_type_comes_from_the_extension_and_copies_keep_every_header() {
    let b = Bucket::new(server(), "ctype", false);
    // An object another client wrote with all the headers a website or
    // download needs, foreign metadata and a tag, in STANDARD_IA.
    for key in ["site/page.html", "site/other.html"] {
        rt().block_on(
            b.client
                .put_object()
                .bucket(&b.name)
                .key(key)
                .body(ByteStream::from_static(b"<p>hi</p>"))
                .content_type("text/html; charset=utf-8")
                .cache_control("max-age=60")
                .content_disposition("inline; filename=page.html")
                .content_encoding("identity")
                .content_language("fr")
                .expires(aws_sdk_s3::primitives::DateTime::from_secs(2_000_000_000))
                .metadata("owner-app", "cms")
                .tagging("team=web")
                .storage_class(aws_sdk_s3::types::StorageClass::StandardIa)
                .server_side_encryption(aws_sdk_s3::types::ServerSideEncryption::AwsKms)
                .ssekms_key_id("arn:aws:kms:us-east-1:123456789012:key/site")
                .send(),
        )
        .unwrap();
    }
    let m = Mount::new(&b, "part_size=5M");
    fs::write(m.path("index.html"), b"<html></html>").unwrap();
    fs::write(m.path("notes.unknownext"), b"x").unwrap();
    fs::write(m.path("movie.mp4"), pattern(11 * MIB, 6)).unwrap();
    assert_eq!(head(&b, "index.html").content_type(), Some("text/html"));
    assert_eq!(
        head(&b, "notes.unknownext").content_type(),
        Some("application/octet-stream")
    );
    assert_eq!(
        head(&b, "movie.mp4").content_type(),
        Some("video/mp4"),
        "multipart"
    );

    let check = |key: &str, what: &str, tags: bool| {
        let h = head(&b, key);
        assert_eq!(h.content_type(), Some("text/html; charset=utf-8"), "{what}");
        assert_eq!(h.cache_control(), Some("max-age=60"), "{what}");
        assert_eq!(
            h.content_disposition(),
            Some("inline; filename=page.html"),
            "{what}"
        );
        assert_eq!(h.content_encoding(), Some("identity"), "{what}");
        assert_eq!(h.content_language(), Some("fr"), "{what}");
        assert!(h.expires_string().is_some(), "{what}: Expires");
        assert_eq!(
            h.metadata()
                .and_then(|m| m.get("owner-app"))
                .map(String::as_str),
            Some("cms"),
            "{what}"
        );
        assert_eq!(
            h.storage_class().map(|c| c.as_str()),
            Some("STANDARD_IA"),
            "{what}"
        );
        assert_eq!(
            h.ssekms_key_id(),
            Some("arn:aws:kms:us-east-1:123456789012:key/site"),
            "{what}"
        );
        if !tags {
            return;
        }
        let tags = rt()
            .block_on(
                b.client
                    .get_object_tagging()
                    .bucket(&b.name)
                    .key(key)
                    .send(),
            )
            .unwrap();
        assert_eq!(
            tags.tag_set()
                .iter()
                .map(|t| format!("{}={}", t.key(), t.value()))
                .collect::<Vec<_>>(),
            vec!["team=web"],
            "{what}"
        );
    };
    fs::set_permissions(m.path("site/page.html"), fs::Permissions::from_mode(0o600)).unwrap();
    check("site/page.html", "chmod", true);
    let meta = b.metadata("site/page.html");
    assert_eq!(
        meta.get("mode").map(String::as_str),
        Some("33152"),
        "the chmod landed"
    );
    sh(&m.dir, "touch -m -d @1600000000 site/page.html");
    check("site/page.html", "touch", true);
    sh(&m.dir, "chown 1234:1234 site/page.html");
    check("site/page.html", "chown", true);
    assert_eq!(
        b.metadata("site/page.html").get("uid").map(String::as_str),
        Some("1234")
    );
    fs::rename(m.path("site/page.html"), m.path("site/moved.html")).unwrap();
    check("site/moved.html", "rename", true);
    // An overwrite keeps them too, tags included.
    fs::write(m.path("site/moved.html"), b"<p>new</p>").unwrap();
    assert_eq!(
        b.get("site/moved.html").as_deref(),
        Some(&b"<p>new</p>"[..])
    );
    check("site/moved.html", "overwrite", true);
    // And an overwrite of an object the mount had not looked at before.
    fs::write(m.path("site/other.html"), b"<p>again</p>").unwrap();
    check("site/other.html", "overwrite of an unseen object", true);
}

#[test]
fn an_object_lock_bucket_with_default_retention_takes_every_write() {
    use aws_sdk_s3::types::{
        DefaultRetention, ObjectLockConfiguration, ObjectLockEnabled, ObjectLockRetentionMode,
        ObjectLockRule,
    };
    let b = Bucket::new(server(), "lock-src", false);
    let name = format!("{}-lock", b.name);
    rt().block_on(async {
        b.client
            .create_bucket()
            .bucket(&name)
            .object_lock_enabled_for_bucket(true)
            .send()
            .await
            .unwrap();
        b.client
            .put_object_lock_configuration()
            .bucket(&name)
            .object_lock_configuration(
                ObjectLockConfiguration::builder()
                    .object_lock_enabled(ObjectLockEnabled::Enabled)
                    .rule(
                        ObjectLockRule::builder()
                            .default_retention(
                                DefaultRetention::builder()
                                    .mode(ObjectLockRetentionMode::Governance)
                                    .days(1)
                                    .build(),
                            )
                            .build(),
                    )
                    .build(),
            )
            .send()
            .await
            .unwrap();
        // What a client without a checksum gets: the refusal this test is about.
        let conf = b
            .client
            .config()
            .to_builder()
            .request_checksum_calculation(
                aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired,
            )
            .build();
        let bare = aws_sdk_s3::Client::from_conf(conf)
            .put_object()
            .bucket(&name)
            .key("probe")
            .body(ByteStream::from_static(b"x"))
            .send()
            .await;
        assert!(bare.is_err(), "the server enforces Object Lock checksums");
    });
    let lock = Bucket { name, ..b.clone() };
    let m = Mount::new(&lock, "part_size=5M");
    fs::write(m.path("small.txt"), b"locked").unwrap();
    fs::write(m.path("big.bin"), pattern(11 * MIB, 7)).unwrap();
    assert_eq!(lock.get("small.txt").as_deref(), Some(&b"locked"[..]));
    assert_eq!(lock.get("big.bin").map(|v| v.len()), Some(11 * MIB));
    // The lock shows as read-only xattrs.
    rt().block_on(
        lock.client
            .put_object_legal_hold()
            .bucket(&lock.name)
            .key("small.txt")
            .legal_hold(
                aws_sdk_s3::types::ObjectLockLegalHold::builder()
                    .status(aws_sdk_s3::types::ObjectLockLegalHoldStatus::On)
                    .build(),
            )
            .send(),
    )
    .unwrap();
    let h = head(&lock, "small.txt");
    let until = h
        .object_lock_retain_until_date()
        .expect("moto applied the default retention");
    let out = sh(&m.dir, "getfattr -d small.txt");
    assert!(out.contains("user.s3.legal_hold=\"ON\""), "{out}");
    assert!(
        out.contains("user.s3.object_lock_mode=\"GOVERNANCE\""),
        "{out}"
    );
    let until = until
        .fmt(aws_sdk_s3::primitives::DateTimeFormat::DateTime)
        .unwrap();
    assert!(
        out.contains(&format!("user.s3.object_lock_retain_until=\"{until}\"")),
        "{until} in {out}"
    );
}

#[test]
fn an_archived_object_is_eacces_with_restore_it_first_and_shows_its_restore() {
    let b = Bucket::new(server(), "glacier", false);
    for k in ["cold.bin", "thawed.bin"] {
        rt().block_on(
            b.client
                .put_object()
                .bucket(&b.name)
                .key(k)
                .body(ByteStream::from_static(b"frozen"))
                .storage_class(aws_sdk_s3::types::StorageClass::Glacier)
                .send(),
        )
        .unwrap();
    }
    rt().block_on(
        b.client
            .restore_object()
            .bucket(&b.name)
            .key("thawed.bin")
            .restore_request(aws_sdk_s3::types::RestoreRequest::builder().days(1).build())
            .send(),
    )
    .unwrap();
    let m = Mount::new(&b, "");
    let err = fs::read(m.path("cold.bin")).unwrap_err();
    assert_eq!(errno(err), libc::EACCES);
    let log = m.log_text();
    assert!(log.contains("archived: restore it first"), "{log}");
    assert_eq!(fs::read(m.path("thawed.bin")).unwrap(), b"frozen");
    let out = sh(
        &m.dir,
        "getfattr -n user.s3.restore --only-values thawed.bin",
    );
    assert!(out.contains("ongoing-request=\"false\""), "{out}");
}

#[test]
fn xattrs_show_type_encryption_and_foreign_metadata_and_accept_their_own_value() {
    let b = Bucket::new(server(), "xattrs", false);
    rt().block_on(
        b.client
            .put_object()
            .bucket(&b.name)
            .key("doc.pdf")
            .body(ByteStream::from_static(b"%PDF"))
            .content_type("application/pdf")
            .metadata("project", "apollo")
            .metadata("mode", "33188")
            .server_side_encryption(aws_sdk_s3::types::ServerSideEncryption::AwsKms)
            .ssekms_key_id("arn:aws:kms:us-east-1:123456789012:key/doc")
            .send(),
    )
    .unwrap();
    let m = Mount::new(&b, "");
    let out = sh(&m.dir, "getfattr -d doc.pdf");
    for want in [
        "user.s3.content_type=\"application/pdf\"",
        "user.s3.sse=\"aws:kms\"",
        "user.s3.sse_kms_key_id=\"arn:aws:kms:us-east-1:123456789012:key/doc\"",
        "user.s3.meta.project=\"apollo\"",
    ] {
        assert!(out.contains(want), "{want} in {out}");
    }
    assert!(
        !out.contains("user.s3.meta.mode"),
        "mode is the mount's: {out}"
    );
    // Setting one to the value it has succeeds (rsync -aX, cp -a);
    // another value is refused and changes nothing.
    sh(&m.dir, "setfattr -n user.s3.meta.project -v apollo doc.pdf");
    sh(
        &m.dir,
        "setfattr -n user.s3.content_type -v application/pdf doc.pdf",
    );
    let refused = std::process::Command::new("setfattr")
        .args(["-n", "user.s3.content_type", "-v", "text/plain", "doc.pdf"])
        .current_dir(&m.dir)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert_eq!(head(&b, "doc.pdf").content_type(), Some("application/pdf"));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("Operation not permitted"),
        "EPERM: {}",
        String::from_utf8_lossy(&refused.stderr)
    );
    // On a version (read-only): the same value succeeds, another is EROFS.
    let vdir = m.path(".versions/doc.pdf");
    let version = fs::read_dir(&vdir).unwrap().next().unwrap().unwrap().path();
    let etag = sh(
        &vdir,
        &format!(
            "getfattr -n user.s3.etag --only-values '{}'",
            version.display()
        ),
    );
    sh(
        &vdir,
        &format!(
            "setfattr -n user.s3.etag -v '{etag}' '{}'",
            version.display()
        ),
    );
    let other = std::process::Command::new("setfattr")
        .args(["-n", "user.s3.etag", "-v", "0000"])
        .arg(&version)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&other.stderr).contains("Read-only file system"),
        "EROFS: {}",
        String::from_utf8_lossy(&other.stderr)
    );
    // A file the mount writes shows its type at once.
    fs::write(m.path("new.json"), b"{}").unwrap();
    let out = sh(
        &m.dir,
        "getfattr -n user.s3.content_type --only-values new.json",
    );
    assert_eq!(out, "application/json");
}

/// A Garage server started by scripts/garage-server; killed on drop.
struct Garage {
    endpoint: String,
    bucket: String,
    key_id: String,
    secret: String,
    pid: i32,
}

impl Garage {
    fn start(bucket: &str) -> Garage {
        let out = std::process::Command::new(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/garage-server"),
        )
        .arg(bucket)
        .stderr(Stdio::inherit())
        .output()
        .expect("scripts/garage-server");
        assert!(out.status.success(), "garage did not start");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let get = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .unwrap_or_else(|| panic!("{k} in {text}"))
                .to_string()
        };
        Garage {
            endpoint: get("ENDPOINT"),
            bucket: get("BUCKET"),
            key_id: get("KEY_ID"),
            secret: get("SECRET"),
            pid: get("PID").parse().unwrap(),
        }
    }

    fn client(&self) -> aws_sdk_s3::Client {
        let conf = aws_sdk_s3::Config::builder()
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
            .endpoint_url(&self.endpoint)
            .region(aws_sdk_s3::config::Region::new("garage"))
            .force_path_style(true)
            .credentials_provider(aws_sdk_s3::config::Credentials::new(
                &self.key_id,
                &self.secret,
                None,
                None,
                "test",
            ))
            .build();
        aws_sdk_s3::Client::from_conf(conf)
    }
}

impl Drop for Garage {
    /// Stops the server and removes its data directory (the one holding
    /// the config file it was started with).
    fn drop(&mut self) {
        let cmdline = fs::read(format!("/proc/{}/cmdline", self.pid)).unwrap_or_default();
        let args: Vec<String> = cmdline
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let dir = args
            .iter()
            .position(|a| a == "-c")
            .and_then(|i| args.get(i + 1))
            .and_then(|c| std::path::Path::new(c).parent().map(|d| d.to_path_buf()));
        unsafe { libc::kill(self.pid, libc::SIGTERM) };
        let gone = poll(std::time::Duration::from_secs(10), || {
            !std::path::Path::new(&format!("/proc/{}", self.pid)).exists()
        });
        if !gone {
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
        }
        if let Some(d) = dir.filter(|d| d.to_string_lossy().contains("bucketfs-garage.")) {
            let _ = fs::remove_dir_all(d);
        }
    }
}

/// SSE-C end to end on a store that enforces it (moto does not): what
/// the mount writes is encrypted with the key (unreadable without it),
/// reads back through the mount on every path, the bucket's unencrypted
/// objects stay readable and editable, and a mount without the key gets
/// EACCES with the reason in the log.
#[test]
fn sse_c_on_garage_encrypts_and_reads_back_and_without_the_key_is_eacces() {
    let (g, _tmp, passwd, key, bucket) = garage_with_sse_c_key("ssec");
    let auth = format!("region=garage,passwd_file={}", passwd.display());
    let m = Mount::new(
        &bucket,
        &format!(
            "{auth},part_size=5M,allow_http_sse_c,sse_c_key_file={}",
            key.display()
        ),
    );
    let big = pattern(12 * MIB, 8);
    fs::write(m.path("small.txt"), b"secret").unwrap();
    fs::write(m.path("big.bin"), &big).unwrap();
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(m.path("big.bin"))
        .unwrap();
    f.write_all(b"tail").unwrap();
    close(f).unwrap();
    fs::rename(m.path("small.txt"), m.path("moved.txt")).unwrap();
    fs::set_permissions(m.path("moved.txt"), fs::Permissions::from_mode(0o600)).unwrap();
    sh(&m.dir, "touch -m -d @1600000000 moved.txt");
    assert!(
        !m.log_text()
            .contains(fs::read_to_string(&key).unwrap().trim())
    );
    // CompleteMultipartUpload carries the key, as S3 needs with a checksum
    // algorithm: Garage refused it without, which read as a store refusing
    // CRC32C (each upload sent twice, and CRC32C dropped).
    assert!(!m.log_text().contains("refuses CRC32C"), "{}", m.log_text());
    drop(m);
    // Encrypted: a GET without the key is refused by the server.
    for k in ["moved.txt", "big.bin"] {
        let r = rt().block_on(bucket.client.get_object().bucket(&g.bucket).key(k).send());
        assert!(r.is_err(), "{k} readable without the key");
    }
    bucket.put("plain.txt", b"not encrypted");
    bucket.put("plain-big.bin", &pattern(11 * MIB, 9));
    let m = Mount::new(
        &bucket,
        &format!("{auth},allow_http_sse_c,load_sse_c={}", key.display()),
    );
    assert_eq!(fs::read(m.path("moved.txt")).unwrap(), b"secret");
    assert_eq!(
        sh(&m.dir, "getfattr -n user.s3.sse --only-values moved.txt"),
        "SSE-C"
    );
    // The bucket's unencrypted objects stay readable and editable.
    assert_eq!(fs::read(m.path("plain.txt")).unwrap(), b"not encrypted");
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(m.path("plain-big.bin"))
        .unwrap();
    f.write_all(b"tail").unwrap();
    close(f).unwrap();
    let mut want_plain = pattern(11 * MIB, 9);
    want_plain.extend_from_slice(b"tail");
    assert_eq!(sha256_file(&m.path("plain-big.bin")), sha256(&want_plain));
    // An object under another key: EACCES, also when its attributes were
    // cached before another client replaced it (the read's GET then meets
    // Garage's "Invalid encryption key", which was EINVAL).
    bucket.put("other-key.txt", b"plain at first");
    assert_eq!(fs::metadata(m.path("other-key.txt")).unwrap().len(), 14);
    put_sse_c(&bucket, "other-key.txt", b"under another key", &OTHER_KEY);
    let err = fs::read(m.path("other-key.txt")).unwrap_err();
    assert_eq!(errno(err), libc::EACCES, "{}", m.log_text());
    let mut want = big.clone();
    want.extend_from_slice(b"tail");
    assert_eq!(sha256_file(&m.path("big.bin")), sha256(&want));
    assert!(!m.log_text().contains("refuses CRC32C"), "{}", m.log_text());
    drop(m);
    let m = Mount::new(&bucket, &auth);
    let err = fs::read(m.path("moved.txt")).unwrap_err();
    assert_eq!(errno(err), libc::EACCES);
    assert!(
        m.log_text().contains("SSE-C"),
        "the log says why: {}",
        m.log_text()
    );
}

/// A second SSE-C key, not the mounts'.
const OTHER_KEY: [u8; 32] = [0x5a; 32];

/// A key's SSE-C headers: the key and its MD5, in base64.
fn sse_c_headers(sse_key: &[u8]) -> (String, String) {
    use base64::Engine;
    use md5::Digest;
    let b64 = base64::engine::general_purpose::STANDARD;
    (b64.encode(sse_key), b64.encode(md5::Md5::digest(sse_key)))
}

/// PutObject with an SSE-C key, as another client does.
fn put_sse_c(b: &Bucket, key: &str, data: &[u8], sse_key: &[u8; 32]) {
    let (k, md5) = sse_c_headers(sse_key);
    let req = b.client.put_object().bucket(&b.name).key(key);
    let req = req.sse_customer_algorithm("AES256").sse_customer_key(k);
    let req = req.sse_customer_key_md5(md5);
    rt().block_on(req.body(ByteStream::from(data.to_vec())).send())
        .unwrap();
}

/// GetObject with an SSE-C key: the bytes, or None if refused.
fn get_sse_c(b: &Bucket, key: &str, sse_key: &[u8]) -> Option<Vec<u8>> {
    let (k, md5) = sse_c_headers(sse_key);
    let req = b.client.get_object().bucket(&b.name).key(key);
    let req = req.sse_customer_algorithm("AES256").sse_customer_key(k);
    let req = req.sse_customer_key_md5(md5);
    rt().block_on(async {
        let out = req.send().await.ok()?;
        Some(out.body.collect().await.ok()?.into_bytes().to_vec())
    })
}

/// A Garage with its bucket, a private passwd file of its key and a
/// private SSE-C key file (`key_file`), in a temp dir.
fn garage_with_sse_c_key(
    name: &str,
) -> (
    Garage,
    tempfile::TempDir,
    std::path::PathBuf,
    std::path::PathBuf,
    Bucket,
) {
    let g = Garage::start(name);
    let tmp = tempfile::tempdir().unwrap();
    let passwd = tmp.path().join("passwd");
    fs::write(&passwd, format!("{}:{}", g.key_id, g.secret)).unwrap();
    fs::set_permissions(&passwd, fs::Permissions::from_mode(0o600)).unwrap();
    let (key, _) = key_file(tmp.path(), 0o600);
    let bucket = Bucket {
        name: g.bucket.clone(),
        endpoint: g.endpoint.clone(),
        client: g.client(),
    };
    (g, tmp, passwd, key, bucket)
}

/// What an SSE-C mount staged and could not upload (killed) goes to S3
/// only through a mount with the same key: a mount without it neither
/// shows nor uploads it (it went up unencrypted, found by an attack),
/// nor serves the first mount's cached blocks; the key's next mount
/// uploads it, encrypted.
#[test]
fn staged_data_of_an_sse_c_mount_is_recovered_only_by_a_mount_with_its_key() {
    use base64::Engine;
    let (_g, tmp, passwd, key, bucket) = garage_with_sse_c_key("ssecrec");
    let raw_key = base64::engine::general_purpose::STANDARD
        .decode(fs::read_to_string(&key).unwrap().trim())
        .unwrap();
    let cache = tmp.path().join("shared-cache");
    let plain = format!(
        "region=garage,passwd_file={},cache_dir={}",
        passwd.display(),
        cache.display()
    );
    let keyed = format!("{plain},allow_http_sse_c,sse_c_key_file={}", key.display());
    let data = pattern(3 * MIB, 31);
    let m = Mount::new(&bucket, &keyed);
    fs::write(m.path("read.bin"), b"cached in clear").unwrap();
    assert_eq!(fs::read(m.path("read.bin")).unwrap(), b"cached in clear");
    let mut f = fs::File::create(m.path("secret.bin")).unwrap();
    f.write_all(&data).unwrap();
    let mut raced = fs::File::create(m.path("raced.bin")).unwrap();
    raced.write_all(b"mine").unwrap();
    kill9(&m);
    drop((f, raced, m));
    assert!(
        bucket.get("secret.bin").is_none(),
        "not uploaded before the kill"
    );
    // Without the key, on the same cache dir: nothing of it.
    let m = Mount::new(&bucket, &plain);
    assert_eq!(
        errno(fs::metadata(m.path("secret.bin")).unwrap_err()),
        libc::ENOENT,
        "{}",
        m.log_text()
    );
    // Listed first, so the read may go by the listing alone.
    assert_eq!(fs::read_dir(&m.dir).unwrap().count(), 1);
    assert_eq!(
        errno(fs::read(m.path("read.bin")).unwrap_err()),
        libc::EACCES
    );
    drop(m);
    assert!(
        bucket
            .keys("")
            .iter()
            .all(|k| !k.contains("secret") && !k.contains("raced")),
        "{:?}",
        bucket.keys("")
    );
    // Another client puts raced.bin under another key meanwhile.
    put_sse_c(&bucket, "raced.bin", b"theirs", &OTHER_KEY);
    // With the key: uploaded, encrypted; raced.bin's data beside the
    // other client's object, which this mount cannot read (it was retried
    // for ever, found by an attack).
    let m = Mount::new(&bucket, &keyed);
    wait_until(
        std::time::Duration::from_secs(60),
        "the staged files to land",
        || {
            get_sse_c(&bucket, "secret.bin", &raw_key).map(|d| sha256(&d)) == Some(sha256(&data))
                && bucket
                    .keys("raced.bin.bucketfs-recovered-")
                    .first()
                    .and_then(|k| get_sse_c(&bucket, k, &raw_key))
                    .as_deref()
                    == Some(&b"mine"[..])
        },
    );
    assert_eq!(
        get_sse_c(&bucket, "raced.bin", &OTHER_KEY).as_deref(),
        Some(&b"theirs"[..]),
        "never overwritten"
    );
    assert!(
        rt().block_on(
            bucket
                .client
                .get_object()
                .bucket(&bucket.name)
                .key("secret.bin")
                .send()
        )
        .is_err(),
        "stored encrypted"
    );
    drop(m);
}

/// An SSE-C mount reads and appends to the bucket's unencrypted objects
/// by sending a request again without the key when S3 says the key does
/// not apply (400). When that second request meets a passing fault (a
/// 503 here), the fault is what counts: it is retried and the read and
/// the append succeed. (It was reported as the first 400: EINVAL, never
/// retried; CI saw close() fail that way once.)
#[test]
fn an_sse_c_mount_retries_a_throttled_request_sent_again_without_the_key() {
    let keydir = tempfile::tempdir().unwrap();
    let (path, _) = key_file(keydir.path(), 0o600);
    let b = Bucket::new(server(), "ssecplain", false);
    let small = pattern(100_000, 21);
    let big = pattern(6 * MIB, 22);
    b.put("plain.bin", &small);
    b.put("plain-big.bin", &big);
    let proxy = Proxy::start(server().endpoint.trim_start_matches("http://"));
    let via = Bucket {
        endpoint: proxy.endpoint.clone(),
        ..b.clone()
    };
    // As S3 answers for objects that are not SSE-C encrypted (moto
    // takes any key).
    const KEY: &str = "x-amz-server-side-encryption-customer-key";
    const SOURCE_KEY: &str = "x-amz-copy-source-server-side-encryption-customer-key";
    let (get, big_key) = (
        format!("GET /{}/plain", b.name),
        format!("/{}/plain-big.bin?", b.name),
    );
    proxy.refuse_with_header(&get, KEY, 400, "InvalidRequest");
    proxy.refuse_with_header(&big_key, SOURCE_KEY, 400, "InvalidRequest");
    let m = Mount::new(
        &via,
        &format!(
            "part_size=5M,allow_http_sse_c,sse_c_key_file={}",
            path.display()
        ),
    );
    // The first GET of the object sent without the key is throttled.
    proxy.inject_when(
        "GET",
        &[&format!("~/{}/plain.bin", b.name), &format!("!{KEY}")],
        1,
        Fault::Status(503),
    );
    assert_eq!(sha256_file(&m.path("plain.bin")), sha256(&small));
    assert_eq!(proxy.faults_injected(), 1, "the fault was met");
    // The append copies the first 5 MiB server-side: the first copy
    // sent without the source key is throttled.
    proxy.inject_when(
        "PUT",
        &[
            &format!("~{big_key}"),
            "+x-amz-copy-source",
            &format!("!{SOURCE_KEY}"),
        ],
        1,
        Fault::Status(503),
    );
    let appended = [&big[..], b"tail"].concat();
    fs::OpenOptions::new()
        .append(true)
        .open(m.path("plain-big.bin"))
        .and_then(|mut f| f.write_all(b"tail").map(|()| f))
        .and_then(close)
        .unwrap();
    assert_eq!(proxy.faults_injected(), 2, "the fault was met");
    let landed = b.get("plain-big.bin").map(|d| sha256(&d));
    assert_eq!(landed, Some(sha256(&appended)));
    assert!(
        proxy
            .heads()
            .iter()
            .any(|h| line_of(h).contains("partNumber=")
                && header_of(h, "x-amz-copy-source").is_some()),
        "the append copied a part server-side"
    );
}

/// The access key a request was signed with.
fn signed_by(head: &str) -> Option<String> {
    let auth = header_of(head, "authorization")?;
    let cred = auth.split("Credential=").nth(1)?;
    Some(cred.split('/').next()?.to_string())
}

#[test]
fn an_explicit_profile_wins_over_keys_in_the_environment() {
    let tmp = tempfile::tempdir().unwrap();
    let creds = tmp.path().join("credentials");
    fs::write(
        &creds,
        "[other]\naws_access_key_id = AKIAPROFILEKEY\naws_secret_access_key = profile-secret\n",
    )
    .unwrap();
    let config = tmp.path().join("config");
    fs::write(&config, "").unwrap();
    let b = Bucket::new(server(), "profile", false);
    let proxy = Proxy::start(server().endpoint.trim_start_matches("http://"));
    let via = Bucket {
        endpoint: proxy.endpoint.clone(),
        ..b.clone()
    };
    let env = [
        ("AWS_SHARED_CREDENTIALS_FILE", creds.to_str().unwrap()),
        ("AWS_CONFIG_FILE", config.to_str().unwrap()),
    ];
    // The environment's keys (the harness sets them) without profile=...
    let m = Mount::with_env(&via, "", &env);
    fs::write(m.path("a"), b"a").unwrap();
    drop(m);
    let before = proxy.heads().len();
    assert!(
        proxy
            .heads()
            .iter()
            .all(|h| signed_by(h).as_deref() == Some(ACCESS_KEY))
    );
    // ...and the profile's with it.
    let m = Mount::with_env(&via, "profile=other", &env);
    fs::write(m.path("b"), b"b").unwrap();
    drop(m);
    let heads = proxy.heads();
    assert!(heads.len() > before);
    for h in &heads[before..] {
        assert_eq!(
            signed_by(h).as_deref(),
            Some("AKIAPROFILEKEY"),
            "{}",
            h.lines().next().unwrap()
        );
    }
    assert_eq!(b.get("b").as_deref(), Some(&b"b"[..]));
}

#[test]
fn expired_credentials_are_eacces_with_a_line_naming_their_source() {
    let (proxy, b, m) = through_proxy("expired", false, "");
    b.put("f", b"data");
    proxy.inject("", 20, common::proxy::Fault::Error(400, "ExpiredToken"));
    let err = fs::read(m.path("f")).unwrap_err();
    assert_eq!(errno(err), libc::EACCES);
    proxy.clear();
    let log = m.log_text();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("credentials expired or invalid (ExpiredToken)"))
        .collect();
    assert!(!lines.is_empty(), "{log}");
    assert!(
        lines
            .iter()
            .all(|l| l.contains("the environment (AWS_ACCESS_KEY_ID)")),
        "{lines:?}"
    );
    assert!(!log.contains(SECRET_KEY));
    assert_eq!(
        fs::read(m.path("f")).unwrap(),
        b"data",
        "renewed: works again"
    );
}

/// The region a request was signed for.
fn signed_for(head: &str) -> Option<String> {
    let auth = header_of(head, "authorization")?;
    let cred = auth.split("Credential=").nth(1)?;
    Some(cred.split('/').nth(2)?.to_string())
}

#[test]
fn a_bucket_in_another_region_is_followed_unless_region_was_given() {
    let b = Bucket::new(server(), "region", false);
    let proxy = Proxy::start(server().endpoint.trim_start_matches("http://"));
    proxy.bucket_in_region("eu-west-3");
    // -o region= says where the bucket is: a wrong one fails the mount
    // with the bucket's region named.
    let err = refused(&proxy.endpoint, &b.name, "region=us-east-1");
    assert!(
        err.contains("eu-west-3") && err.contains("region=eu-west-3"),
        "{err}"
    );
    // A region from the environment (AWS_REGION=us-east-1, as `aws
    // configure` would set) gives way to the bucket's.
    let via = Bucket {
        endpoint: proxy.endpoint.clone(),
        ..b.clone()
    };
    let before = proxy.heads().len();
    let m = Mount::new(&via, "");
    fs::write(m.path("f"), b"here").unwrap();
    assert_eq!(fs::read(m.path("f")).unwrap(), b"here");
    assert_eq!(b.get("f").as_deref(), Some(&b"here"[..]));
    let heads = proxy.heads();
    let last = heads.last().unwrap();
    assert_eq!(signed_for(last).as_deref(), Some("eu-west-3"));
    assert_eq!(
        signed_for(&heads[before]).as_deref(),
        Some("us-east-1"),
        "the first request went to the configured region"
    );
    assert!(m.log_text().contains("eu-west-3"));
}

#[test]
fn bucketfs_url_prints_a_presigned_get_made_by_the_daemon() {
    let b = Bucket::new(server(), "presign", false);
    let m = Mount::new(&b, "");
    fs::create_dir(m.path("dir")).unwrap();
    fs::write(m.path("dir/report é.pdf"), b"%PDF-1.7 report").unwrap();
    let url = |args: &[&str]| {
        command()
            .arg("url")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let file = m.path("dir/report é.pdf");
    let out = url(&[file.to_str().unwrap(), "--expires", "120"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let link = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(link.starts_with(&b.endpoint), "{link}");
    assert!(
        link.contains("X-Amz-Expires=120") && link.contains("X-Amz-Signature="),
        "{link}"
    );
    // Anyone can GET it: no credentials, not through the mount.
    let got = std::process::Command::new(python())
        .args([
            "-c",
            "import sys, urllib.request; sys.stdout.buffer.write(urllib.request.urlopen(sys.argv[1]).read())",
            &link,
        ])
        .env_clear()
        .output()
        .unwrap();
    assert!(
        got.status.success(),
        "{}",
        String::from_utf8_lossy(&got.stderr)
    );
    assert_eq!(got.stdout, b"%PDF-1.7 report");
    // An hour by default.
    let out = url(&[file.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("X-Amz-Expires=3600"));
    // Outside any bucketfs mount, or too long: one line, non-zero.
    let tmp = tempfile::tempdir().unwrap();
    let local = tmp.path().join("local.txt");
    fs::write(&local, b"x").unwrap();
    for args in [
        vec![local.to_str().unwrap()],
        vec![file.to_str().unwrap(), "--expires", "604801"],
    ] {
        let out = url(&args);
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(out.stdout.is_empty());
    }
    let help = command().arg("--help").output().unwrap();
    assert!(String::from_utf8_lossy(&help.stdout).contains("bucketfs url PATH"));
}

#[test]
fn a_large_overwrite_written_in_one_pass_keeps_the_headers() {
    let b = Bucket::new(server(), "bigover", false);
    rt().block_on(
        b.client
            .put_object()
            .bucket(&b.name)
            .key("media/clip.bin")
            .body(ByteStream::from(pattern(6 * MIB, 10)))
            .content_type("video/x-custom")
            .cache_control("no-cache")
            .metadata("camera", "a7")
            .tagging("project=film&stage=raw%20cut")
            .storage_class(aws_sdk_s3::types::StorageClass::StandardIa)
            .send(),
    )
    .unwrap();
    let m = Mount::new(&b, "part_size=5M");
    let data = pattern(23 * MIB, 11);
    let mut f = fs::File::create(m.path("media/clip.bin")).unwrap();
    for chunk in data.chunks(MIB) {
        f.write_all(chunk).unwrap();
    }
    close(f).unwrap();
    assert_eq!(
        b.get("media/clip.bin").map(|d| sha256(&d)),
        Some(sha256(&data))
    );
    // It was streamed while written (not sent whole at close), and not
    // fixed up afterwards by a copy onto itself.
    assert!(requests(&m, "CREATE_MULTIPART") > 0);
    assert!(!m.log_text().contains("multipart upload"), "sent at close");
    assert_eq!(requests(&m, "COPY"), 0);
    let h = head(&b, "media/clip.bin");
    assert_eq!(h.content_type(), Some("video/x-custom"));
    assert_eq!(h.cache_control(), Some("no-cache"));
    assert_eq!(h.storage_class().map(|c| c.as_str()), Some("STANDARD_IA"));
    assert_eq!(
        h.metadata()
            .and_then(|m| m.get("camera"))
            .map(String::as_str),
        Some("a7")
    );
    let tags = rt()
        .block_on(
            b.client
                .get_object_tagging()
                .bucket(&b.name)
                .key("media/clip.bin")
                .send(),
        )
        .unwrap();
    let mut tags: Vec<String> = tags
        .tag_set()
        .iter()
        .map(|t| format!("{}={}", t.key(), t.value()))
        .collect();
    tags.sort();
    assert_eq!(tags, vec!["project=film", "stage=raw cut"]);
}

#[test]
fn chmod_touch_and_rename_keep_a_public_read_acl() {
    let b = Bucket::new(server(), "keepacl", false);
    for k in ["pub.txt", "plain.txt"] {
        b.put(k, b"x");
    }
    rt().block_on(
        b.client
            .put_object_acl()
            .bucket(&b.name)
            .key("pub.txt")
            .acl(aws_sdk_s3::types::ObjectCannedAcl::PublicRead)
            .send(),
    )
    .unwrap();
    assert!(is_public_read(&b, "pub.txt"));
    let m = Mount::new(&b, "");
    fs::set_permissions(m.path("pub.txt"), fs::Permissions::from_mode(0o600)).unwrap();
    assert!(is_public_read(&b, "pub.txt"), "chmod");
    sh(&m.dir, "touch -m -d @1600000000 pub.txt");
    assert!(is_public_read(&b, "pub.txt"), "touch");
    fs::rename(m.path("pub.txt"), m.path("moved.txt")).unwrap();
    assert!(is_public_read(&b, "moved.txt"), "rename");
    // A private object stays private, with no grant header sent.
    fs::set_permissions(m.path("plain.txt"), fs::Permissions::from_mode(0o600)).unwrap();
    assert!(!is_public_read(&b, "plain.txt"));
}

/// Runs `bucketfs url PATH`: (success, stdout, stderr).
fn url_of(path: &std::path::Path) -> (bool, String, String) {
    let out = command()
        .arg("url")
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    )
}

/// GETs a URL with no credentials and no extra headers.
fn fetch(link: &str) -> Result<Vec<u8>, String> {
    let got = std::process::Command::new(python())
        .args([
            "-c",
            "import sys, urllib.request; sys.stdout.buffer.write(urllib.request.urlopen(sys.argv[1]).read())",
            link,
        ])
        .env_clear()
        .output()
        .unwrap();
    if got.status.success() {
        Ok(got.stdout)
    } else {
        Err(String::from_utf8_lossy(&got.stderr).into_owned())
    }
}

/// `bucketfs url` of an old version signs its version id; on a
/// requester_pays mount the payer is in the signed query, so a plain GET
/// works against a bucket that refuses requests without it; a delete
/// marker and an SSE-C object are refused in one line.
#[test]
fn bucketfs_url_of_a_version_and_on_a_requester_pays_bucket() {
    let b = Bucket::new(server(), "urlpay", true);
    b.put("doc.txt", b"version one");
    b.put("doc.txt", b"version two");
    b.put("gone.txt", b"soon deleted");
    b.delete("gone.txt");
    let proxy = Proxy::start(server().endpoint.trim_start_matches("http://"));
    proxy.require_requester_pays();
    let via = Bucket {
        endpoint: proxy.endpoint.clone(),
        ..b.clone()
    };
    let m = Mount::new(&via, "requester_pays");
    let (ok, link, err) = url_of(&m.path("doc.txt"));
    assert!(ok, "{err}");
    assert!(link.starts_with(&proxy.endpoint), "{link}");
    assert!(link.contains("x-amz-request-payer=requester"), "{link}");
    assert!(
        link.contains("X-Amz-SignedHeaders=host&") || link.ends_with("X-Amz-SignedHeaders=host"),
        "only the host is a signed header: {link}"
    );
    assert_eq!(fetch(&link).unwrap(), b"version two");
    // Without the payer the proxy refuses, as AWS does: the URL's own
    // parameter is what let it through.
    let stripped = link.replace("x-amz-request-payer=requester&", "");
    assert!(fetch(&stripped).is_err(), "{stripped}");
    // Each version by its own URL.
    let vdir = m.path(".versions/doc.txt");
    let mut fetched = std::collections::HashSet::new();
    for v in fs::read_dir(&vdir).unwrap() {
        let v = v.unwrap().path();
        let (ok, link, err) = url_of(&v);
        assert!(ok, "{}: {err}", v.display());
        assert!(link.contains("versionId="), "{link}");
        let body = fetch(&link).unwrap();
        assert_eq!(body, fs::read(&v).unwrap(), "{}", v.display());
        fetched.insert(body);
    }
    let want: std::collections::HashSet<Vec<u8>> =
        [b"version one".to_vec(), b"version two".to_vec()].into();
    assert_eq!(fetched, want);
    // A delete marker has no data: one line, non-zero.
    let marker = fs::read_dir(m.path(".versions/gone.txt"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with(".deleted"))
        .expect("the delete marker is listed");
    let (ok, out, err) = url_of(&marker);
    assert!(!ok && out.is_empty(), "{out}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("delete marker"), "{err}");
    drop(m);

    // SSE-C: a URL cannot carry the key. The proxy answers a HEAD with a
    // key as S3 does for an SSE-C object (moto ignores SSE-C).
    let keydir = tempfile::tempdir().unwrap();
    let (key, _) = key_file(keydir.path(), 0o600);
    let proxy = Proxy::start(server().endpoint.trim_start_matches("http://"));
    proxy.echo_sse_c();
    let via = Bucket {
        endpoint: proxy.endpoint.clone(),
        ..b.clone()
    };
    let m = Mount::new(
        &via,
        &format!("allow_http_sse_c,sse_c_key_file={}", key.display()),
    );
    fs::write(m.path("secret.txt"), b"encrypted").unwrap();
    let (ok, out, err) = url_of(&m.path("secret.txt"));
    assert!(!ok && out.is_empty(), "{out}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("SSE-C"), "{err}");
}

/// CRC32C of `data` as S3 writes it (base64 of the big-endian value).
fn crc32c(data: &[u8]) -> String {
    use base64::Engine;
    let c = crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, data) as u32;
    base64::engine::general_purpose::STANDARD.encode(c.to_be_bytes())
}

/// The request line of a head.
fn line_of(head: &str) -> &str {
    head.lines().next().unwrap_or("")
}

/// The part number in an UploadPart request line.
fn part_number(line: &str) -> Option<usize> {
    let q = line.split("partNumber=").nth(1)?;
    q.split(['&', ' ']).next()?.parse().ok()
}

/// Every multipart upload declares CRC32C when it is created, every part
/// carries the CRC32C of its bytes (Content-MD5 no more), and
/// CompleteMultipartUpload repeats each: a streamed new file, and an
/// append whose untouched parts are copied server-side.
#[test]
fn every_part_carries_its_crc32c_declared_at_create_and_repeated_at_complete() {
    let (proxy, b, m) = through_proxy("partcrc", false, "part_size=5M");
    let base = pattern(11 * MIB, 12);
    b.put("appended.bin", &base);
    let data = pattern(12 * MIB, 13);
    fs::write(m.path("big.bin"), &data).unwrap();
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(m.path("appended.bin"))
        .unwrap();
    f.write_all(b"tail").unwrap();
    close(f).unwrap();
    assert_eq!(b.get("big.bin").map(|d| sha256(&d)), Some(sha256(&data)));
    let mut appended = base.clone();
    appended.extend_from_slice(b"tail");
    assert_eq!(
        b.get("appended.bin").map(|d| sha256(&d)),
        Some(sha256(&appended))
    );

    let heads = proxy.heads();
    let creates: Vec<&String> = heads
        .iter()
        .filter(|h| h.starts_with("POST ") && line_of(h).contains("?uploads"))
        .collect();
    assert_eq!(creates.len(), 2, "one upload per file");
    for h in &creates {
        assert_eq!(
            header_of(h, "x-amz-checksum-algorithm").as_deref(),
            Some("CRC32C"),
            "{}",
            line_of(h)
        );
    }
    let parts: Vec<&String> = heads
        .iter()
        .filter(|h| {
            h.starts_with("PUT ")
                && line_of(h).contains("partNumber=")
                && header_of(h, "x-amz-copy-source").is_none()
        })
        .collect();
    let mut big_parts = std::collections::BTreeMap::new();
    for h in &parts {
        let line = line_of(h);
        assert_eq!(header_of(h, "content-md5"), None, "{line}");
        assert_eq!(
            header_of(h, "x-amz-sdk-checksum-algorithm").as_deref(),
            Some("CRC32C"),
            "{line}"
        );
        let crc = header_of(h, "x-amz-checksum-crc32c").unwrap_or_else(|| panic!("{line}"));
        if line.contains("/big.bin?") {
            big_parts.insert(part_number(line).unwrap(), crc);
        }
    }
    // Each part's CRC32C is of its own bytes (parts of 5 MiB, the tail).
    assert_eq!(big_parts.len(), 3, "{big_parts:?}");
    for (n, crc) in &big_parts {
        let start = (n - 1) * 5 * MIB;
        let end = (n * 5 * MIB).min(data.len());
        assert_eq!(crc, &crc32c(&data[start..end]), "part {n}");
    }
    // Complete repeats them.
    let posts = proxy.posts();
    let complete = posts
        .iter()
        .find(|(l, _)| l.contains("/big.bin?uploadId="))
        .expect("the Complete of big.bin");
    for (n, crc) in &big_parts {
        assert!(
            complete
                .1
                .contains(&format!("<ChecksumCRC32C>{crc}</ChecksumCRC32C>")),
            "part {n}: {}",
            complete.1
        );
    }
    let complete = posts
        .iter()
        .find(|(l, _)| l.contains("/appended.bin?uploadId="))
        .expect("the Complete of appended.bin");
    assert!(
        complete.1.contains(&format!(
            "<ChecksumCRC32C>{}</ChecksumCRC32C>",
            crc32c(b"tail")
        )),
        "the sent part's checksum: {}",
        complete.1
    );
}

/// A store that refuses CRC32C, when the upload is created or on its
/// parts, gets Content-MD5 instead, with one line in the log: the file
/// lands, close() succeeds.
#[test]
fn a_store_that_refuses_crc32c_gets_content_md5_and_the_upload_lands() {
    for (what, line, header, status, code) in [
        (
            "create",
            "?uploads",
            "x-amz-checksum-algorithm",
            400,
            "InvalidArgument",
        ),
        (
            "part",
            "partNumber=",
            "x-amz-checksum-crc32c",
            501,
            "NotImplemented",
        ),
    ] {
        let (proxy, b, m) = through_proxy("crcrefused", false, "part_size=5M");
        proxy.refuse_with_header(line, header, status, code);
        let data = pattern(12 * MIB, 14);
        fs::write(m.path("big.bin"), &data).unwrap();
        let second = pattern(11 * MIB, 15);
        fs::write(m.path("second.bin"), &second).unwrap();
        assert_eq!(
            b.get("big.bin").map(|d| sha256(&d)),
            Some(sha256(&data)),
            "{what}"
        );
        assert_eq!(
            b.get("second.bin").map(|d| sha256(&d)),
            Some(sha256(&second)),
            "{what}"
        );
        let log = m.log_text();
        assert_eq!(
            log.lines()
                .filter(|l| l.contains("refuses CRC32C on multipart uploads"))
                .count(),
            1,
            "{what}: one notice\n{log}"
        );
        assert_eq!(b.open_multipart_uploads(), 0, "{what}");
        // The second file's parts carried Content-MD5 only.
        for h in proxy.heads() {
            let l = line_of(&h);
            if h.starts_with("PUT ") && l.contains("/second.bin?") && l.contains("partNumber=") {
                assert!(header_of(&h, "content-md5").is_some(), "{what}: {l}");
                assert_eq!(header_of(&h, "x-amz-checksum-crc32c"), None, "{what}: {l}");
            }
        }
    }
}

/// A daemon killed while CompleteMultipartUpload was on its way (every
/// part sent and journaled with its CRC32C): the next mount completes
/// that upload, with the checksums, and sends no part again.
#[test]
fn a_killed_daemons_upload_is_completed_from_the_journal_with_its_checksums() {
    let (proxy, b, m) = through_proxy("resume", false, "part_size=5M");
    let data = pattern(12 * MIB, 16);
    let mut f = fs::File::create(m.path("big.bin")).unwrap();
    f.write_all(&data).unwrap();
    // The Complete (the next POST: the upload was created while writing)
    // never gets an answer.
    proxy.inject("POST", 1, common::proxy::Fault::Stall);
    let closer = std::thread::spawn(move || close(f));
    assert!(
        poll(std::time::Duration::from_secs(60), || proxy
            .faults_injected()
            == 1),
        "the Complete was sent"
    );
    kill9(&m);
    let _ = closer.join();
    assert_eq!(b.get("big.bin"), None, "it never landed");
    assert_eq!(b.open_multipart_uploads(), 1);
    let before = proxy.heads().len();
    m.restart();
    assert_lands(
        &b,
        "big.bin",
        &data,
        std::time::Duration::from_secs(60),
        "completed by the next mount",
    );
    let after: Vec<String> = proxy.heads()[before..].to_vec();
    assert!(
        !after.iter().any(|h| line_of(h).contains("partNumber=")
            || (h.starts_with("POST ") && line_of(h).contains("?uploads"))),
        "no part sent again, no new upload: {:?}",
        after.iter().map(|h| line_of(h)).collect::<Vec<_>>()
    );
    let posts = proxy.posts();
    let (_, body) = posts
        .iter()
        .rev()
        .find(|(l, _)| l.contains("/big.bin?uploadId="))
        .unwrap();
    for n in 1..=3usize {
        let end = (n * 5 * MIB).min(data.len());
        let crc = crc32c(&data[(n - 1) * 5 * MIB..end]);
        assert!(
            body.contains(&format!("<ChecksumCRC32C>{crc}</ChecksumCRC32C>")),
            "part {n}: {body}"
        );
    }
    assert!(
        m.log_text()
            .contains("completed the multipart upload a killed mount had sent")
    );
    assert_eq!(b.open_multipart_uploads(), 0);
}

/// On a store that checks CRC32C (Garage: a wrong one is refused), a
/// streamed new file, an append with parts copied server-side, and a
/// mount killed before its Complete landed all carry it: the objects are
/// exact and their checksum is the composite CRC32C of their parts.
#[test]
fn part_checksums_on_garage() {
    let g = Garage::start("crc");
    let tmp = tempfile::tempdir().unwrap();
    let passwd = tmp.path().join("passwd");
    fs::write(&passwd, format!("{}:{}", g.key_id, g.secret)).unwrap();
    fs::set_permissions(&passwd, fs::Permissions::from_mode(0o600)).unwrap();
    let bucket = Bucket {
        name: g.bucket.clone(),
        endpoint: g.endpoint.clone(),
        client: g.client(),
    };
    let base = pattern(11 * MIB, 17);
    bucket.put("appended.bin", &base);
    let auth = format!("region=garage,passwd_file={}", passwd.display());
    let m = Mount::new(&bucket, &format!("{auth},part_size=5M"));
    let data = pattern(12 * MIB, 18);
    fs::write(m.path("big.bin"), &data).unwrap();
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(m.path("appended.bin"))
        .unwrap();
    f.write_all(b"tail").unwrap();
    close(f).unwrap();
    assert!(!m.log_text().contains("refuses CRC32C"), "{}", m.log_text());
    let checksum = |key: &str| {
        rt().block_on(
            bucket
                .client
                .head_object()
                .bucket(&bucket.name)
                .key(key)
                .checksum_mode(aws_sdk_s3::types::ChecksumMode::Enabled)
                .send(),
        )
        .unwrap()
        .checksum_crc32_c()
        .map(str::to_string)
    };
    // The composite checksum: CRC32C of the parts' CRC32Cs, dash, count.
    let composite = |parts: &[&[u8]]| {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut all = Vec::new();
        for p in parts {
            all.extend(b64.decode(crc32c(p)).unwrap());
        }
        format!("{}-{}", crc32c(&all), parts.len())
    };
    assert_eq!(
        bucket.get("big.bin").map(|d| sha256(&d)),
        Some(sha256(&data))
    );
    assert_eq!(
        checksum("big.bin"),
        Some(composite(&[
            &data[..5 * MIB],
            &data[5 * MIB..10 * MIB],
            &data[10 * MIB..]
        ]))
    );
    let mut appended = base.clone();
    appended.extend_from_slice(b"tail");
    assert_eq!(
        bucket.get("appended.bin").map(|d| sha256(&d)),
        Some(sha256(&appended))
    );
    assert!(
        checksum("appended.bin").is_some_and(|c| c.ends_with("-2")),
        "{:?}",
        checksum("appended.bin")
    );
}

/// Makes `key` public-read, as another client would.
fn make_public(b: &Bucket, key: &str) {
    rt().block_on(
        b.client
            .put_object_acl()
            .bucket(&b.name)
            .key(key)
            .acl(aws_sdk_s3::types::ObjectCannedAcl::PublicRead)
            .send(),
    )
    .unwrap();
}

/// An overwrite keeps a non-default ACL, as copies do: a small file, a
/// multipart one written in one pass, an append that copies the old
/// parts; a private object stays private. It costs one GetObjectAcl per
/// overwrite, and none at all on a bucket whose Object Ownership is
/// BucketOwnerEnforced (no object there has an ACL of its own), which one
/// GetBucketOwnershipControls per mount tells.
#[test]
fn an_overwrite_keeps_a_public_read_acl() {
    let b = Bucket::new(server(), "overacl", false);
    b.put("pub.txt", b"old");
    b.put("pub-big.bin", &pattern(6 * MIB, 19));
    b.put("pub-appended.bin", &pattern(11 * MIB, 20));
    b.put("plain.txt", b"old");
    for k in ["pub.txt", "pub-big.bin", "pub-appended.bin"] {
        make_public(&b, k);
    }
    let m = Mount::new(&b, "part_size=5M");
    fs::write(m.path("pub.txt"), b"new contents").unwrap();
    let big = pattern(12 * MIB, 21);
    let mut f = fs::File::create(m.path("pub-big.bin")).unwrap();
    for chunk in big.chunks(MIB) {
        f.write_all(chunk).unwrap();
    }
    close(f).unwrap();
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(m.path("pub-appended.bin"))
        .unwrap();
    f.write_all(b"tail").unwrap();
    close(f).unwrap();
    fs::write(m.path("plain.txt"), b"new contents").unwrap();
    assert_eq!(b.get("pub.txt").as_deref(), Some(&b"new contents"[..]));
    assert_eq!(b.get("pub-big.bin").map(|d| sha256(&d)), Some(sha256(&big)));
    assert_eq!(
        b.get("pub-appended.bin").map(|d| d.len()),
        Some(11 * MIB + 4)
    );
    for (k, path) in [
        ("pub.txt", "single PUT"),
        ("pub-big.bin", "multipart, streamed"),
        ("pub-appended.bin", "append (UploadPartCopy)"),
    ] {
        assert!(is_public_read(&b, k), "{path}: {k}");
    }
    assert!(
        !is_public_read(&b, "plain.txt"),
        "a private object stays private"
    );
    assert_eq!(requests(&m, "GET_OWNERSHIP"), 1, "asked once per mount");
    assert_eq!(requests(&m, "GET_ACL"), 4, "one per overwrite");
    drop(m);

    // Object Ownership BucketOwnerEnforced: no ACL is ever asked for.
    let name = format!("{}-owner", b.name);
    rt().block_on(
        b.client
            .create_bucket()
            .bucket(&name)
            .object_ownership(aws_sdk_s3::types::ObjectOwnership::BucketOwnerEnforced)
            .send(),
    )
    .unwrap();
    let owned = Bucket { name, ..b.clone() };
    owned.put("f.txt", b"old");
    owned.put("g.bin", &pattern(11 * MIB, 22));
    let m = Mount::new(&owned, "part_size=5M");
    fs::write(m.path("f.txt"), b"new").unwrap();
    fs::write(m.path("g.bin"), pattern(11 * MIB, 23)).unwrap();
    fs::set_permissions(m.path("f.txt"), fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(owned.get("f.txt").as_deref(), Some(&b"new"[..]));
    // A chmod right after the write is stored a second later (merged).
    let stored = poll(std::time::Duration::from_secs(60), || {
        owned.metadata("f.txt").get("mode").map(String::as_str) == Some("33152")
    });
    assert!(stored, "{:?}", owned.metadata("f.txt"));
    assert_eq!(requests(&m, "GET_OWNERSHIP"), 1);
    assert_eq!(requests(&m, "GET_ACL"), 0, "no ACL to keep there");
}

/// A store on `endpoint` for `bucket`, HEADs through the SDK or not.
fn store_on(
    endpoint: &str,
    bucket: &str,
    fast_head: bool,
    requester_pays: bool,
) -> bucketfs::store::s3::S3Store {
    store_timing_out(endpoint, bucket, fast_head, requester_pays, 10)
}

/// `store_on` with an attempt timeout of `timeout_secs`.
fn store_timing_out(
    endpoint: &str,
    bucket: &str,
    fast_head: bool,
    requester_pays: bool,
    timeout_secs: u64,
) -> bucketfs::store::s3::S3Store {
    use bucketfs::store::s3::{S3Settings, S3Store};
    let mut s = S3Settings {
        attempt_timeout: std::time::Duration::from_secs(timeout_secs),
        bucket: bucket.to_string(),
        endpoint: Some(endpoint.to_string()),
        region: Some("us-east-1".into()),
        path_style: true,
        static_keys: Some((ACCESS_KEY.into(), SECRET_KEY.into())),
        max_attempts: 2,
        fast_head,
        ..S3Settings::default()
    };
    s.requests.requester_pays = requester_pays;
    rt().block_on(S3Store::connect(&s)).unwrap()
}

/// `ls -l` costs a HEAD per object, so HEAD has a path of its own without
/// the SDK's per-request machinery (`store::fast_head`). What it reports
/// must be exactly what the SDK reports, for every header this mount
/// reads, on odd keys, by version, and for a missing key; anything but
/// 200 or 404 (here: SlowDown, a refusal, a broken connection) must end
/// in the SDK's own answer, retried and classified as before.
#[test]
fn a_head_without_the_sdk_reports_exactly_what_the_sdk_reports() {
    use aws_sdk_s3::types::{ServerSideEncryption, StorageClass};
    use bucketfs::store::{ObjectStore, Op, StoreError};
    let b = Bucket::new(server(), "fast-head", true);
    let keys = [
        "plain",
        "dir/sub/with space and +plus",
        "odd/%25 percent ? query # hash & amp = eq",
        "unicode/été ✓ 日本",
        "slashes//double/./dot/../up",
        " leading and trailing ",
        "tilde~star*paren()quote'\"comma,semi;colon:at@dollar$",
    ];
    rt().block_on(async {
        for (i, key) in keys.iter().enumerate() {
            let mut req = b
                .client
                .put_object()
                .bucket(&b.name)
                .key(*key)
                .body(ByteStream::from(vec![b'x'; i * 10]))
                .metadata("mode", "33188")
                .metadata("uid", "1000")
                .metadata("mtime", "1600000000")
                .metadata("x-foreign", "some value");
            if i % 2 == 1 {
                req = req
                    .content_type("text/html; charset=utf-8")
                    .cache_control("max-age=60")
                    .content_disposition("attachment; filename=\"a b.txt\"")
                    .content_encoding("gzip")
                    .content_language("fr")
                    .expires(aws_sdk_s3::primitives::DateTime::from_secs(1_900_000_000))
                    .storage_class(StorageClass::StandardIa)
                    .server_side_encryption(ServerSideEncryption::Aes256)
                    .tagging("a=1&b=2");
            }
            req.send().await.unwrap();
        }
        // A second version of one key, to HEAD the first by its id.
        b.client
            .put_object()
            .bucket(&b.name)
            .key("plain")
            .body(ByteStream::from_static(b"second"))
            .send()
            .await
            .unwrap();
    });
    let first_version = b
        .versions("plain")
        .into_iter()
        .map(|(v, _)| v)
        .collect::<Vec<_>>();
    assert_eq!(first_version.len(), 2, "two versions of plain");

    let proxy = Proxy::start(b.endpoint.trim_start_matches("http://"));
    let fast = store_on(&proxy.endpoint, &b.name, true, false);
    let sdk = store_on(&b.endpoint, &b.name, false, false);
    let both = |key: &str, version: Option<&str>| {
        rt().block_on(async { (fast.head(key, version).await, sdk.head(key, version).await) })
    };
    for key in keys {
        let (f, s) = both(key, None);
        let (f, s) = (f.unwrap(), s.unwrap());
        assert_eq!(f, s, "HEAD {key:?}");
    }
    for v in &first_version {
        let (f, s) = both("plain", Some(v));
        assert_eq!(f.unwrap(), s.unwrap(), "HEAD plain version {v}");
    }
    let (f, s) = both("no/such key", None);
    assert!(matches!(f, Err(StoreError::NotFound)), "{f:?}");
    assert!(matches!(s, Err(StoreError::NotFound)), "{s:?}");
    // The fast path was taken: its requests carry none of the SDK's
    // invocation headers, and each HEAD was one request.
    let heads: Vec<String> = proxy
        .heads()
        .into_iter()
        .filter(|h| h.starts_with("HEAD "))
        .collect();
    assert_eq!(
        heads.len(),
        keys.len() + first_version.len() + 1,
        "{heads:#?}"
    );
    assert!(
        heads
            .iter()
            .all(|h| header_of(h, "amz-sdk-invocation-id").is_none()),
        "every HEAD went around the SDK"
    );

    // Anything but 200 or 404 is asked again through the SDK, which
    // retries what is transient and classifies the rest.
    proxy.inject("HEAD", 1, common::proxy::Fault::Status(503));
    let (f, _) = both("plain", None);
    assert_eq!(f.unwrap().size, 6, "SlowDown, then the SDK's answer");
    proxy.inject("HEAD", 1, common::proxy::Fault::Reset);
    let (before, counted) = (proxy.requests("HEAD"), fast.counters().get(Op::Head));
    let (f, _) = both("plain", None);
    assert_eq!(f.unwrap().size, 6, "a reset, then the SDK's answer");
    assert_eq!(
        proxy.requests("HEAD") - before,
        2,
        "the reset, then the SDK"
    );
    assert_eq!(
        fast.counters().get(Op::Head) - counted,
        2,
        "both HEADs counted"
    );
    proxy.inject("HEAD", 3, common::proxy::Fault::Error(403, "AccessDenied"));
    let (f, _) = both("plain", None);
    assert!(matches!(f, Err(StoreError::AccessDenied(_))), "{f:?}");
    proxy.clear();

    // Requester pays: the payer header is on the fast HEAD too.
    proxy.require_requester_pays();
    let payer = store_on(&proxy.endpoint, &b.name, true, true);
    let before = proxy.requests("HEAD");
    let got = rt().block_on(payer.head("plain", None)).unwrap();
    assert_eq!(got.size, 6);
    assert_eq!(proxy.requests("HEAD") - before, 1, "one HEAD, not refused");
}

/// A random read costs a ranged GET of 64 KiB, and the SDK's machinery
/// was a third of the daemon's CPU for it: a GET of a range goes the same
/// way as HEAD. What it reads must be what the SDK reads: every byte, on
/// odd keys, pinned by ETag or by version, past the end (short) and from
/// the end (empty); a stale ETag, SlowDown or a reset ends in the SDK's
/// own answer, and a body cut short is never served.
#[test]
fn a_ranged_get_without_the_sdk_reads_exactly_what_the_sdk_reads() {
    use bucketfs::store::{ObjectStore, Op, ReadPin, StoreError};
    let b = Bucket::new(server(), "fast-get", true);
    let keys = [
        "plain",
        "dir/sub/with space and +plus",
        "odd/%25 percent ? query # hash & amp = eq",
        "unicode/été ✓ 日本",
        "tilde~star*paren()quote'\"comma,semi;colon:at@dollar$",
    ];
    let data: Vec<Vec<u8>> = (0..keys.len())
        .map(|i| pattern(5000 + i * 1000, i as u64))
        .collect();
    for (k, d) in keys.iter().zip(&data) {
        b.put(k, d);
    }
    let second = pattern(3000, 99);
    b.put("plain", &second);
    let versions: Vec<String> = b.versions("plain").into_iter().map(|(v, _)| v).collect();
    assert_eq!(versions.len(), 2, "two versions of plain");

    let proxy = Proxy::start(b.endpoint.trim_start_matches("http://"));
    let fast = store_on(&proxy.endpoint, &b.name, true, false);
    let sdk = store_on(&b.endpoint, &b.name, false, false);
    let get = |s: &bucketfs::store::s3::S3Store, k: &str, r: std::ops::Range<u64>, p: &ReadPin| {
        rt().block_on(s.get_range(k, r, p))
    };
    let mut calls = 0;
    for (i, k) in keys.iter().enumerate() {
        let now = if i == 0 { &second } else { &data[i] };
        let len = now.len() as u64;
        let etag = rt().block_on(sdk.head(k, None)).unwrap().etag;
        for pin in [ReadPin::Latest, ReadPin::Etag(etag.clone())] {
            for r in [0..10, 100..4196, len - 10..len + 100, len..len + 10] {
                let f = get(&fast, k, r.clone(), &pin).unwrap();
                let s = get(&sdk, k, r.clone(), &pin).unwrap();
                calls += 1;
                let want = &now[r.start.min(len) as usize..r.end.min(len) as usize];
                assert_eq!(sha256(&f), sha256(want), "{k:?} {r:?} {pin:?}");
                assert_eq!(f, s, "{k:?} {r:?} {pin:?}: as the SDK reads it");
            }
        }
    }
    // The first version of plain, by its id.
    let first = versions.iter().find(|v| {
        rt().block_on(sdk.get_range("plain", 0..10, &ReadPin::Version((*v).clone())))
            .unwrap()[..]
            == data[0][..10]
    });
    let first = ReadPin::Version(first.expect("the first version").clone());
    let f = get(&fast, "plain", 1000..5000, &first).unwrap();
    calls += 1;
    assert_eq!(sha256(&f), sha256(&data[0][1000..5000]), "by version");
    // Each went around the SDK, one request each.
    let gets: Vec<String> = proxy
        .heads()
        .into_iter()
        .filter(|h| h.starts_with("GET "))
        .collect();
    assert_eq!(gets.len(), calls, "{gets:#?}");
    assert!(
        gets.iter()
            .all(|h| header_of(h, "amz-sdk-invocation-id").is_none()),
        "every GET went around the SDK"
    );

    // A stale ETag: the SDK's answer.
    let stale = ReadPin::Etag("\"0123456789abcdef0123456789abcdef\"".into());
    let f = get(&fast, "plain", 0..10, &stale);
    assert!(matches!(f, Err(StoreError::PreconditionFailed)), "{f:?}");
    // SlowDown is waited for and asked again the same way; a reset is
    // asked again through the SDK.
    let via_sdk = || {
        let last = proxy.heads().into_iter().rfind(|h| h.starts_with("GET "));
        header_of(&last.unwrap(), "amz-sdk-invocation-id").is_some()
    };
    for (fault, sdk_after) in [
        (common::proxy::Fault::Status(503), false),
        (common::proxy::Fault::Reset, true),
    ] {
        proxy.inject("GET", 1, fault);
        let before = proxy.requests("GET");
        let counted = fast.counters().get(Op::Get);
        let f = get(&fast, "plain", 0..100, &ReadPin::Latest).unwrap();
        assert_eq!(f, second[..100], "after {fault:?}");
        assert_eq!(proxy.requests("GET") - before, 2, "{fault:?}, then again");
        assert_eq!(via_sdk(), sdk_after, "after {fault:?}");
        assert_eq!(
            fast.counters().get(Op::Get) - counted,
            2,
            "{fault:?}: both requests counted"
        );
    }
    // A body cut short is retried, never served.
    proxy.inject("GET", 1, common::proxy::Fault::CutShort);
    let before = proxy.requests("GET");
    let f = get(&fast, "plain", 0..3000, &ReadPin::Latest).unwrap();
    assert_eq!(sha256(&f), sha256(&second), "after a body cut short");
    assert_eq!(
        proxy.requests("GET") - before,
        2,
        "the cut body, then again"
    );
    // A body that stalls half-way is given up after the attempt timeout
    // and asked again, never served.
    let quick = store_timing_out(&proxy.endpoint, &b.name, true, false, 2);
    proxy.inject("GET", 1, common::proxy::Fault::StallBody);
    let (before, counted) = (proxy.requests("GET"), quick.counters().get(Op::Get));
    let t = std::time::Instant::now();
    let f = get(&quick, "plain", 0..3000, &ReadPin::Latest).unwrap();
    assert_eq!(sha256(&f), sha256(&second), "after a body that stalled");
    // Given up by the 2 s timeout, not ended by the proxy, which holds the
    // connection 60 s.
    assert!(
        t.elapsed() < std::time::Duration::from_secs(50),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(
        proxy.requests("GET") - before,
        2,
        "the stalled body, then again"
    );
    assert_eq!(quick.counters().get(Op::Get) - counted, 2);
    assert!(!via_sdk(), "asked again the same way");
    // A store that ignores the range (a 200 of other bytes) is an error,
    // on either path, never data.
    let sdk_via_proxy = store_on(&proxy.endpoint, &b.name, false, false);
    for (s, name) in [(&fast, "fast"), (&sdk_via_proxy, "sdk")] {
        for r in [0..10, 100..200] {
            proxy.inject("GET", 1, common::proxy::Fault::Status(200));
            let f = get(s, "plain", r.clone(), &ReadPin::Latest);
            assert!(
                matches!(&f, Err(StoreError::Other(m)) if m.contains("other bytes")),
                "{name} {r:?}: {f:?}"
            );
        }
    }
    // Refused (403): the SDK's answer, and the SDK for what follows a
    // while (credentials asked for again then, not on every request).
    proxy.inject("GET", 1, common::proxy::Fault::Error(403, "AccessDenied"));
    let (before, counted) = (proxy.requests("GET"), fast.counters().get(Op::Get));
    let f = get(&fast, "plain", 0..100, &ReadPin::Latest).unwrap();
    assert_eq!(f, second[..100], "the SDK's answer after a refusal");
    assert_eq!(proxy.requests("GET") - before, 2, "refused, then the SDK");
    assert_eq!(fast.counters().get(Op::Get) - counted, 2, "both counted");
    let f = get(&fast, "plain", 100..200, &ReadPin::Latest).unwrap();
    assert_eq!(f, second[100..200]);
    assert!(via_sdk(), "the next GET through the SDK");
    proxy.clear();
}

/// Moto does not check signatures; Garage does. Every HEAD and ranged GET
/// of an odd key is signed right by the path without the SDK: one request
/// each, none refused and asked again through the SDK.
#[test]
fn a_head_without_the_sdk_is_signed_right_for_odd_keys_on_garage() {
    use bucketfs::store::ObjectStore;
    use bucketfs::store::s3::{S3Settings, S3Store};
    let g = Garage::start("fasthead");
    let keys = [
        "plain",
        "with space and +plus",
        "odd %25 percent ? query # hash & amp = eq",
        "été ✓ 日本",
        "tilde~star*paren()quote'\"comma,semi;colon:at@dollar$",
        "a[b]{c}|d^e`f<g>h",
        "dir/sub/x y",
    ];
    let client = g.client();
    rt().block_on(async {
        for k in keys {
            client
                .put_object()
                .bucket(&g.bucket)
                .key(k)
                .metadata("mode", "33184")
                .body(ByteStream::from_static(b"x"))
                .send()
                .await
                .unwrap();
        }
    });
    let proxy = Proxy::start(g.endpoint.trim_start_matches("http://"));
    let s = S3Settings {
        bucket: g.bucket.clone(),
        endpoint: Some(proxy.endpoint.clone()),
        region: Some("garage".into()),
        path_style: true,
        static_keys: Some((g.key_id.clone(), g.secret.clone())),
        max_attempts: 2,
        ..S3Settings::default()
    };
    let store = rt().block_on(S3Store::connect(&s)).unwrap();
    for k in keys {
        let info = rt().block_on(store.head(k, None)).unwrap();
        assert_eq!(
            info.metadata.unwrap().get("mode").map(String::as_str),
            Some("33184"),
            "{k:?}"
        );
        // A ranged GET pinned by ETag signs its range and If-Match too.
        let pin = bucketfs::store::ReadPin::Etag(info.etag);
        let got = rt().block_on(store.get_range(k, 0..1, &pin)).unwrap();
        assert_eq!(&got[..], b"x", "{k:?}");
    }
    for method in ["HEAD ", "GET "] {
        let sent: Vec<String> = proxy
            .heads()
            .into_iter()
            .filter(|h| h.starts_with(method))
            .collect();
        assert_eq!(sent.len(), keys.len(), "one {method}per key: {sent:#?}");
        assert!(
            sent.iter()
                .all(|h| header_of(h, "amz-sdk-invocation-id").is_none()),
            "none asked again through the SDK"
        );
    }
}
