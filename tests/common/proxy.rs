//! A fault-injecting HTTP proxy on 127.0.0.1 between a mount and the S3
//! server. Every request gets its own upstream connection (the proxy asks
//! for `Connection: close`), so faults land on exactly the requests chosen:
//! the next N requests of a method fail with a status, are reset, stall, or
//! get a response whose body is cut short.
//!
//! It also keeps every request head it saw (to check which headers each
//! request carried) and can answer as a Requester Pays bucket does: 403
//! AccessDenied to any request without `x-amz-request-payer: requester`.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Fault {
    /// Answer with this status (503 is S3's SlowDown) without forwarding.
    Status(u16),
    /// Close the connection as soon as the request head arrived.
    Reset,
    /// Never answer (until the client gives up).
    Stall,
    /// Forward, but pass on only half of the response body, then close.
    CutShort,
    /// Forward, pass on the head and half of the response body, then
    /// hold the connection open without sending more (a body that stalls).
    StallBody,
    /// Answer with this status and S3 error code, without forwarding.
    Error(u16, &'static str),
    /// Forward (the request lands), then hold the response this many
    /// seconds before passing it on: a slow answer to a request that
    /// succeeded (a long CompleteMultipartUpload).
    Delay(u64),
    /// Forward (the request lands), then drop the connection without
    /// passing the answer on: a timeout after the store did the work.
    Landed,
}

#[derive(Default)]
struct Plan {
    /// (method or "" for any, remaining count, fault)
    rules: Vec<(String, u32, Fault)>,
    /// Requests seen, by method.
    seen: Vec<String>,
    faults_injected: u32,
    /// Every request head, in order of arrival.
    heads: Vec<String>,
    /// Answer 403 to requests without `x-amz-request-payer: requester`.
    requester_pays: bool,
    /// Say in HEAD answers that the object is SSE-C encrypted when the
    /// request gave a key, as S3 does (moto ignores SSE-C).
    echo_sse_c: bool,
    /// The region the bucket is in: a request signed for another gets
    /// AWS's 301 PermanentRedirect with `x-amz-bucket-region`.
    bucket_region: Option<String>,
    /// (text in the request line, header present, status, code): every
    /// such request is refused, as a store that does not take it would.
    refusals: Vec<(String, String, u16, &'static str)>,
    /// Request line and body of every POST (multipart create/complete).
    posts: Vec<(String, String)>,
}

pub struct Proxy {
    pub endpoint: String,
    plan: Arc<Mutex<Plan>>,
}

impl Proxy {
    /// Starts a proxy to `upstream` ("127.0.0.1:PORT") on the test runtime.
    pub fn start(upstream: &str) -> Proxy {
        let plan = Arc::new(Mutex::new(Plan::default()));
        let upstream = upstream.to_string();
        let listener = super::rt()
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let p = plan.clone();
        super::rt().spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    return;
                };
                let (p, up) = (p.clone(), upstream.clone());
                tokio::spawn(async move {
                    let _ =
                        tokio::time::timeout(Duration::from_secs(120), handle(conn, &up, p)).await;
                });
            }
        });
        Proxy { endpoint, plan }
    }

    /// The next `n` requests with this method ("" = any) get `fault`.
    pub fn inject(&self, method: &str, n: u32, fault: Fault) {
        self.plan.lock().rules.push((method.to_string(), n, fault));
    }

    /// The next `n` GETs of a range longer than `len` bytes get `fault`.
    pub fn inject_get_longer_than(&self, len: u64, n: u32, fault: Fault) {
        self.plan
            .lock()
            .rules
            .push((format!("GET>{len}"), n, fault));
    }

    /// The next `n` requests with this method that meet every condition
    /// get `fault`: `+HEADER` (carries it), `!HEADER` (does not),
    /// `~TEXT` (the request line contains it).
    pub fn inject_when(&self, method: &str, conditions: &[&str], n: u32, fault: Fault) {
        let rule = std::iter::once(method)
            .chain(conditions.iter().copied())
            .collect::<Vec<_>>()
            .join(" ");
        self.plan.lock().rules.push((rule, n, fault));
    }

    pub fn clear(&self) {
        self.plan.lock().rules.clear();
    }

    pub fn faults_injected(&self) -> u32 {
        self.plan.lock().faults_injected
    }

    /// Refuse, as AWS does for a Requester Pays bucket, every request
    /// that does not say the requester pays.
    pub fn require_requester_pays(&self) {
        self.plan.lock().requester_pays = true;
    }

    /// Answer a HEAD that carries an SSE-C key as S3 answers it for an
    /// SSE-C object: with `x-amz-server-side-encryption-customer-algorithm`.
    pub fn echo_sse_c(&self) {
        self.plan.lock().echo_sse_c = true;
    }

    /// Answer as AWS does for a bucket in `region`: 301 to requests
    /// signed for another region.
    pub fn bucket_in_region(&self, region: &str) {
        self.plan.lock().bucket_region = Some(region.to_string());
    }

    /// Refuse every request whose request line contains `line` and that
    /// carries `header`, with `status` and S3 error `code`.
    pub fn refuse_with_header(&self, line: &str, header: &str, status: u16, code: &'static str) {
        self.plan
            .lock()
            .refusals
            .push((line.to_string(), header.to_string(), status, code));
    }

    /// Request line and body of every POST so far.
    pub fn posts(&self) -> Vec<(String, String)> {
        self.plan.lock().posts.clone()
    }

    /// Every request head seen so far (request line and headers).
    pub fn heads(&self) -> Vec<String> {
        self.plan.lock().heads.clone()
    }

    pub fn requests(&self, method: &str) -> usize {
        self.plan
            .lock()
            .seen
            .iter()
            .filter(|m| *m == method)
            .count()
    }
}

/// Reads until the end of the request head; returns (head, extra bytes).
async fn read_head(conn: &mut TcpStream) -> Option<(Vec<u8>, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = conn.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(i + 4);
            return Some((buf, rest));
        }
        if buf.len() > 1 << 20 {
            return None;
        }
    }
}

/// Whether a rule ("" for any, a method, `GET>LEN`, then the conditions
/// of `inject_when`) takes this request.
fn rule_matches(rule: &str, method: &str, head: &[u8]) -> bool {
    let mut words = rule.split(' ');
    let m = words.next().unwrap_or("");
    let method_ok = m.is_empty()
        || m == method
        || m.strip_prefix("GET>").is_some_and(|len| {
            method == "GET"
                && range_of(head).is_some_and(|r| r.end - r.start > len.parse::<u64>().unwrap())
        });
    method_ok
        && words.all(|w| match w.split_at(w.len().min(1)) {
            ("+", h) => header(head, h).is_some(),
            ("!", h) => header(head, h).is_none(),
            ("~", text) => String::from_utf8_lossy(head)
                .lines()
                .next()
                .is_some_and(|l| l.contains(text)),
            _ => panic!("a proxy rule's condition is +HEADER, !HEADER or ~TEXT: {w:?}"),
        })
}

/// A header's value in a request head.
pub fn header_of(head: &str, name: &str) -> Option<String> {
    header(head.as_bytes(), name)
}

/// The bytes a request's `Range: bytes=A-B` asks for (A..B+1).
pub fn range_of(head: &[u8]) -> Option<std::ops::Range<u64>> {
    let r = header(head, "range")?;
    let (a, b) = r.strip_prefix("bytes=")?.split_once('-')?;
    Some(a.parse().ok()?..b.parse::<u64>().ok()? + 1)
}

fn header(head: &[u8], name: &str) -> Option<String> {
    let text = String::from_utf8_lossy(head);
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_string())
    })
}

/// The head with `Connection: close` instead of any Connection header, and
/// without `Expect` (the proxy answers 100-continue itself).
fn closing(head: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(head);
    let mut out = String::new();
    for l in text.split("\r\n") {
        if l.is_empty() {
            continue;
        }
        let lower = l.to_ascii_lowercase();
        if lower.starts_with("connection:") || lower.starts_with("expect:") {
            continue;
        }
        out.push_str(l);
        out.push_str("\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    out.into_bytes()
}

async fn handle(mut conn: TcpStream, upstream: &str, plan: Arc<Mutex<Plan>>) {
    let Some((head, rest)) = read_head(&mut conn).await else {
        return;
    };
    let method = String::from_utf8_lossy(&head)
        .split(' ')
        .next()
        .unwrap_or("")
        .to_string();
    // AWS takes the payer as a header or, in a presigned URL, in the query.
    let request_line = String::from_utf8_lossy(&head)
        .lines()
        .next()
        .unwrap_or("")
        .to_string();
    let payer_missing = header(&head, "x-amz-request-payer").as_deref() != Some("requester")
        && !request_line.contains("x-amz-request-payer=requester");
    let (fault, refuse, echo, redirect) = {
        let mut p = plan.lock();
        p.seen.push(method.clone());
        p.heads.push(String::from_utf8_lossy(&head).into_owned());
        let refuse = p.requester_pays && payer_missing;
        let redirect = p.bucket_region.clone().filter(|r| {
            let signed = header(&head, "authorization").unwrap_or_default();
            !signed.contains(&format!("/{r}/s3/"))
        });
        let echo = p.echo_sse_c
            && method == "HEAD"
            && header(&head, "x-amz-server-side-encryption-customer-algorithm").is_some();
        let f = p
            .rules
            .iter_mut()
            .find(|(m, n, _)| *n > 0 && rule_matches(m, &method, &head))
            .map(|(_, n, f)| {
                *n -= 1;
                *f
            });
        if f.is_some() {
            p.faults_injected += 1;
        }
        let f = f.or_else(|| {
            p.refusals
                .iter()
                .find(|(line, h, _, _)| {
                    request_line.contains(line.as_str()) && header(&head, h).is_some()
                })
                .map(|(_, _, status, code)| Fault::Error(*status, code))
        });
        (f, refuse, echo, redirect)
    };
    if header(&head, "expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue")) {
        let _ = conn.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await;
    }
    // Read the body the client sends (Content-Length framed).
    let body_len: usize = header(&head, "content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = rest;
    while body.len() < body_len {
        let mut chunk = vec![0u8; 65536];
        match conn.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
        }
    }
    if method == "POST" {
        plan.lock().posts.push((
            request_line.clone(),
            String::from_utf8_lossy(&body).into_owned(),
        ));
    }
    if let Some(region) = redirect {
        let xml = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>PermanentRedirect</Code><Message>The bucket you are attempting to access must be addressed using the specified endpoint.</Message></Error>";
        let body = if method == "HEAD" { "" } else { xml };
        let resp = format!(
            "HTTP/1.1 301 Moved Permanently\r\nx-amz-bucket-region: {region}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = conn.write_all(resp.as_bytes()).await;
        let _ = conn.shutdown().await;
        return;
    }
    if refuse {
        let xml = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>";
        let resp = format!(
            "HTTP/1.1 403 Forbidden\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
            if method == "HEAD" { 0 } else { xml.len() },
            if method == "HEAD" { "" } else { xml }
        );
        let _ = conn.write_all(resp.as_bytes()).await;
        let _ = conn.shutdown().await;
        return;
    }
    if let Some(Fault::Error(status, code)) = fault {
        let xml = format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code><Message>injected</Message></Error>"
        );
        let resp = format!(
            "HTTP/1.1 {status} Injected\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{xml}",
            xml.len()
        );
        let _ = conn.write_all(resp.as_bytes()).await;
        let _ = conn.shutdown().await;
        return;
    }
    match fault {
        Some(Fault::Status(code)) => {
            let xml = format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{}</Code><Message>injected</Message></Error>",
                if code == 503 {
                    "SlowDown"
                } else {
                    "InternalError"
                }
            );
            let resp = format!(
                "HTTP/1.1 {code} Injected\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{xml}",
                xml.len()
            );
            let _ = conn.write_all(resp.as_bytes()).await;
            let _ = conn.shutdown().await;
        }
        // Answered above.
        Some(Fault::Error(..)) => {}
        Some(Fault::Reset) => drop(conn),
        Some(Fault::Stall) => {
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
        Some(Fault::CutShort)
        | Some(Fault::StallBody)
        | Some(Fault::Delay(_))
        | Some(Fault::Landed)
        | None => {
            let Ok(mut up) = TcpStream::connect(upstream).await else {
                return;
            };
            if up.write_all(&closing(&head)).await.is_err() || up.write_all(&body).await.is_err() {
                return;
            }
            let mut resp = Vec::new();
            let _ = up.read_to_end(&mut resp).await;
            if matches!(fault, Some(Fault::CutShort | Fault::StallBody))
                && let Some(i) = resp.windows(4).position(|w| w == b"\r\n\r\n")
            {
                let body_len = resp.len() - (i + 4);
                resp.truncate(i + 4 + body_len / 2);
            }
            if echo && let Some(i) = resp.windows(2).position(|w| w == b"\r\n") {
                let extra = b"\r\nx-amz-server-side-encryption-customer-algorithm: AES256";
                resp.splice(i..i, extra.iter().copied());
            }
            if fault == Some(Fault::Landed) {
                drop(conn);
                return;
            }
            if let Some(Fault::Delay(secs)) = fault {
                tokio::time::sleep(Duration::from_secs(secs)).await;
            }
            let _ = conn.write_all(&resp).await;
            if fault == Some(Fault::StallBody) {
                let _ = conn.flush().await;
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
            let _ = conn.shutdown().await;
        }
    }
}
