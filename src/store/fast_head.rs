//! HeadObject, and GetObject of a range, without the SDK's per-request
//! machinery.
//!
//! `ls -l` of a directory costs a HEAD per object (each object's own mode
//! and owner), 64 in flight. Through the SDK's orchestrator (interceptors,
//! runtime plugins, endpoint rules, auth scheme resolution per request) a
//! HEAD costs about three times the CPU of the request itself, and on a
//! small machine sharing its cores with a local store that CPU is the
//! listing's time. A random read is a GET of 64 KiB, one after another,
//! and the orchestrator and its signing were 30% of the daemon's CPU for
//! them (`perf`, 1,000 random 4 KiB reads on Garage). This path sends the
//! same requests with the SDK's own parts: its HTTP connector (same TLS,
//! same timeouts), its SigV4 signer, its endpoint resolver (asked once,
//! for the bucket), and the mount's credentials provider (asked again
//! before the credentials expire).
//!
//! It only ever answers the plain cases: for HEAD the object (200) and no
//! object (404), for GET the range (206) and a range past the end (416).
//! Anything else (an error status, a connection failure, a header it
//! cannot read) is `Fast::AskSdk`, and the caller asks again through the
//! SDK, which retries, classifies and reports as for every other call. A GET
//! body that breaks off, stalls or comes short is an error the caller's
//! retry asks again for. Mounts it does not serve (SSE-C keys, endpoints
//! signed other than with SigV4 for `s3`) never build one.

use std::collections::HashMap;
use std::ops::Range;
use std::time::{Duration, Instant, SystemTime};

use aws_credential_types::Credentials;
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use aws_sdk_s3::config::endpoint::{DefaultResolver, Params, ResolveEndpoint};
use aws_sigv4::http_request::{
    PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest, SigningSettings,
    UriPathNormalizationMode, sign,
};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::http::{HttpConnector, HttpConnectorSettings};
use aws_smithy_runtime_api::client::identity::Identity;
use aws_smithy_runtime_api::client::orchestrator::{HttpRequest, HttpResponse};
use aws_smithy_runtime_api::http::Headers;
use aws_smithy_types::Document;
use aws_smithy_types::body::SdkBody;
use aws_smithy_types::byte_stream::ByteStream;
use aws_smithy_types::date_time::{DateTime, Format as DateTimeFormat};
use bytes::Bytes;
use futures::FutureExt;
use tracing::debug;

use super::s3::{range_ignored, range_start, read_body};
use super::{ObjectHeaders, ObjectInfo, ReadPin, StoreError, StoreResult};

/// Credentials are asked for again this long before they expire.
const REFRESH_BEFORE_EXPIRY: Duration = Duration::from_secs(300);

/// How long a connection of this path is kept open unused. A cold
/// `ls -l` opens one per HEAD in flight (64), each with its buffers and
/// task; with hyper's default (90 s, and its reaper's period more) all 64
/// were still open two minutes after a listing. A listing's HEADs follow
/// one another far closer than this.
const IDLE_CONNECTION: Duration = Duration::from_secs(10);

/// How long every request goes through the SDK after S3 refused one of
/// this path's (403): the credentials are asked for again then, not on
/// every request, and a clock the SDK corrects for (RequestTimeTooSkewed)
/// costs one request more a minute, not one more each time.
const REST_AFTER_REFUSAL: Duration = Duration::from_secs(60);

pub(super) struct FastHead {
    connector: aws_smithy_http_client::Connector,
    /// The bucket's URL, without a trailing `/`: the key follows.
    base: String,
    signing_region: String,
    provider: SharedCredentialsProvider,
    identity: tokio::sync::Mutex<Option<(Identity, Option<SystemTime>)>>,
    requester_pays: bool,
    /// When S3 last refused a request of this path.
    refused: parking_lot::Mutex<Option<Instant>>,
}

/// What this path made of a request.
pub(super) enum Fast<T> {
    /// The answer, read as the SDK reads it.
    Answer(StoreResult<T>),
    /// The SDK is to ask. `sent`: a request of this path went out first,
    /// and is counted apart from the SDK's.
    AskSdk { sent: bool },
}

impl<T> Fast<T> {
    /// What became of a request that was sent: None to ask the SDK.
    fn of_sent(answer: Option<StoreResult<T>>) -> Self {
        answer.map_or(Fast::AskSdk { sent: true }, Fast::Answer)
    }
}

/// Why a request got no answer.
enum Unanswered {
    TimedOut,
    Failed,
}

/// What the endpoint rules say of a bucket: its URL and SigV4 region, when
/// it is signed with plain SigV4 for `s3` and needs no extra headers.
fn bucket_endpoint(params: &Params) -> Option<(String, String)> {
    let endpoint = DefaultResolver::new()
        .resolve_endpoint(params)
        .now_or_never()?
        .ok()?;
    if endpoint.headers().next().is_some() {
        return None;
    }
    let text = |d: Option<&Document>| match d {
        Some(Document::String(s)) => Some(s.clone()),
        _ => None,
    };
    // The rules' first auth scheme, as a field or (older releases) as the
    // `authSchemes` property.
    let (name, signing_name, region) = match endpoint.auth_schemes().first() {
        Some(a) => (
            a.name().to_string(),
            text(a.get("signingName")),
            text(a.get("signingRegion")),
        ),
        None => match endpoint.properties().get("authSchemes") {
            Some(Document::Array(list)) => match list.first() {
                Some(Document::Object(first)) => (
                    text(first.get("name"))?,
                    text(first.get("signingName")),
                    text(first.get("signingRegion")),
                ),
                _ => return None,
            },
            _ => return None,
        },
    };
    if name != "sigv4" || signing_name.as_deref() != Some("s3") {
        return None;
    }
    Some((endpoint.url().trim_end_matches('/').to_string(), region?))
}

/// Names where requests go; never the credentials.
impl std::fmt::Debug for FastHead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FastHead")
            .field("base", &self.base)
            .finish()
    }
}

impl FastHead {
    /// A HEAD path for `bucket` as the SDK client configured from `sdk`
    /// with these settings would address and sign it; None where this
    /// path does not apply.
    pub(super) fn new(
        sdk: &aws_config::SdkConfig,
        s: &super::s3::S3Settings,
        region: &str,
    ) -> Option<FastHead> {
        if s.requests.sse_c.is_some() {
            return None;
        }
        let provider = sdk.credentials_provider()?;
        let mut p = Params::builder()
            .bucket(&s.bucket)
            .region(region)
            .force_path_style(s.path_style)
            .use_fips(sdk.use_fips().unwrap_or(false))
            .use_dual_stack(sdk.use_dual_stack().unwrap_or(false))
            .accelerate(false);
        if let Some(e) = &s.endpoint {
            p = p.endpoint(e);
        }
        let (base, signing_region) = bucket_endpoint(&p.build().ok()?)?;
        let connector = aws_smithy_http_client::Connector::builder()
            .connector_settings(
                HttpConnectorSettings::builder()
                    .connect_timeout(s.attempt_timeout)
                    .read_timeout(s.attempt_timeout)
                    .build(),
            )
            .sleep_impl(aws_smithy_async::rt::sleep::TokioSleep::new())
            .pool_idle_timeout(IDLE_CONNECTION)
            .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                aws_smithy_http_client::tls::rustls_provider::CryptoMode::AwsLc,
            ))
            .build();
        Some(FastHead {
            connector,
            base,
            signing_region,
            provider,
            identity: tokio::sync::Mutex::new(None),
            requester_pays: s.requests.requester_pays,
            refused: parking_lot::Mutex::new(None),
        })
    }

    /// The credentials to sign with, asked for again when they are about
    /// to expire (or after S3 refused them).
    async fn identity(&self) -> Option<Identity> {
        let mut cached = self.identity.lock().await;
        let fresh = |expiry: &Option<SystemTime>| {
            expiry.is_none_or(|e| e > SystemTime::now() + REFRESH_BEFORE_EXPIRY)
        };
        if let Some((id, expiry)) = cached.as_ref()
            && fresh(expiry)
        {
            return Some(id.clone());
        }
        let creds: Credentials = self.provider.provide_credentials().await.ok()?;
        let expiry = creds.expiry();
        let id: Identity = creds.into();
        *cached = Some((id.clone(), expiry));
        Some(id)
    }

    /// A request of `method` for `key` (a version of it, when given),
    /// with `headers`, signed with the mount's credentials; None when it
    /// cannot be built here, or S3 refused one lately (the caller asks
    /// the SDK).
    async fn signed(
        &self,
        method: &str,
        key: &str,
        version: Option<&str>,
        headers: &[(&str, &str)],
    ) -> Option<HttpRequest> {
        if self
            .refused
            .lock()
            .is_some_and(|at| at.elapsed() < REST_AFTER_REFUSAL)
        {
            return None;
        }
        let identity = self.identity().await?;
        let enc =
            |s: &str| percent_encoding::utf8_percent_encode(s, super::s3::KEY_ENCODE).to_string();
        let mut uri = format!("{}/{}", self.base, enc(key));
        if let Some(v) = version {
            uri.push_str(&format!("?versionId={}", enc(v)));
        }
        let payer = ("x-amz-request-payer", "requester");
        let headers: Vec<(&str, &str)> = headers
            .iter()
            .copied()
            .chain(self.requester_pays.then_some(payer))
            .collect();
        let mut settings = SigningSettings::default();
        settings.percent_encoding_mode = PercentEncodingMode::Single;
        settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
        settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.signing_region)
            .name("s3")
            .time(SystemTime::now())
            .settings(settings)
            .build()
            .ok()?
            .into();
        let signable = SignableRequest::new(
            method,
            &uri,
            headers.iter().copied(),
            SignableBody::Bytes(&[]),
        )
        .ok()?;
        let (instructions, _) = sign(signable, &params).ok()?.into_parts();
        let mut req = http::Request::builder().method(method).uri(&uri);
        for (name, value) in &headers {
            req = req.header(*name, *value);
        }
        let mut req = req.body(SdkBody::empty()).ok()?;
        instructions.apply_to_request_http1x(&mut req);
        req.try_into().ok()
    }

    /// Sends `req`: the answer, or why there was none.
    async fn send(&self, key: &str, req: HttpRequest) -> Result<HttpResponse, Unanswered> {
        self.connector.call(req).await.map_err(|e| {
            debug!(key, error = %e, "no answer");
            if e.is_timeout() {
                Unanswered::TimedOut
            } else {
                Unanswered::Failed
            }
        })
    }

    /// An answer this path does not read: after a refusal every request
    /// goes through the SDK for a while, and the credentials are asked for
    /// again; the caller asks the SDK.
    async fn other<T>(&self, key: &str, status: u16) -> Option<T> {
        if status == 403 {
            *self.refused.lock() = Some(Instant::now());
            *self.identity.lock().await = None;
        }
        debug!(key, status, "asked again through the SDK");
        None
    }

    /// HEAD of `key` (a version of it, when given): the object, NotFound,
    /// or the SDK to ask.
    pub(super) async fn head(&self, key: &str, version: Option<&str>) -> Fast<ObjectInfo> {
        match self.signed("HEAD", key, version, &[]).await {
            Some(req) => Fast::of_sent(self.head_signed(key, req).await),
            None => Fast::AskSdk { sent: false },
        }
    }

    async fn head_signed(&self, key: &str, req: HttpRequest) -> Option<StoreResult<ObjectInfo>> {
        let resp = self.send(key, req).await.ok()?;
        match resp.status().as_u16() {
            200 => object_of(key, resp.headers()).map(Ok),
            404 => Some(Err(StoreError::NotFound)),
            status => self.other(key, status).await,
        }
    }

    /// GET of bytes `range` (not empty) of `key` as pinned (a range ending
    /// past the object's end comes short, one starting there comes empty),
    /// each chunk of the body within `stall` of the last (and its length
    /// told to `received`): the bytes. An error when the body broke off,
    /// stalled or came short, on a timeout, 5xx or throttling (the
    /// caller's retry waits and asks again), when the object changed (412)
    /// or the answer is not the range (a 200, a 206 of other bytes). The
    /// SDK to ask: no answer, or one it classifies (403, 404...).
    pub(super) async fn get(
        &self,
        key: &str,
        range: Range<u64>,
        pin: &ReadPin,
        stall: Duration,
        received: &(dyn Fn(u64) + Send + Sync),
    ) -> Fast<Bytes> {
        debug_assert!(!range.is_empty());
        let bytes = format!("bytes={}-{}", range.start, range.end - 1);
        let mut headers = vec![("range", bytes.as_str())];
        let version = match pin {
            ReadPin::Latest => None,
            ReadPin::Etag(e) => {
                headers.push(("if-match", e.as_str()));
                None
            }
            ReadPin::Version(v) => Some(v.as_str()),
        };
        match self.signed("GET", key, version, &headers).await {
            Some(req) => Fast::of_sent(self.get_signed(key, req, range, stall, received).await),
            None => Fast::AskSdk { sent: false },
        }
    }

    async fn get_signed(
        &self,
        key: &str,
        req: HttpRequest,
        range: Range<u64>,
        stall: Duration,
        received: &(dyn Fn(u64) + Send + Sync),
    ) -> Option<StoreResult<Bytes>> {
        let resp = match self.send(key, req).await {
            Ok(r) => r,
            Err(Unanswered::TimedOut) => {
                return Some(Err(StoreError::Transient(
                    "timed out connecting or waiting for the answer".into(),
                )));
            }
            Err(Unanswered::Failed) => return None,
        };
        match resp.status().as_u16() {
            206 => {}
            // A range starting at or past the end of the object.
            416 => return Some(Ok(Bytes::new())),
            412 => return Some(Err(StoreError::PreconditionFailed)),
            // A 200 is the whole object: the store ignored the range.
            200 => return Some(Err(range_ignored())),
            status @ (408 | 429 | 500 | 502..=599) => {
                return Some(Err(StoreError::Transient(format!("{status} from S3"))));
            }
            status => return self.other(key, status).await,
        }
        // What the answer says it holds must be what was asked for: the
        // range's start, and no more than the range.
        let h = resp.headers();
        let len = h.get("content-length")?.parse::<u64>().ok()?;
        let from = h.get("content-range").and_then(range_start);
        let max = range.end - range.start;
        if from != Some(range.start) || len > max {
            return Some(Err(range_ignored()));
        }
        let mut out = bytes::BytesMut::with_capacity(len as usize);
        let body = ByteStream::new(resp.into_body());
        let read = read_body(body, stall, Some(len), max, &mut |c| {
            received(c.len() as u64);
            out.extend_from_slice(&c);
        })
        .await;
        Some(read.map(|()| out.freeze()))
    }
}

/// An object as a 200 answer to HEAD describes it, read as the SDK reads
/// the same headers; None when a header is not what S3 sends (the SDK
/// then decides).
fn object_of(key: &str, h: &Headers) -> Option<ObjectInfo> {
    let mut metadata = HashMap::new();
    for (name, value) in h.iter() {
        if let Some(m) = name.strip_prefix("x-amz-meta-") {
            // Two values of one name: as the SDK sees it, or an error.
            if metadata.insert(m.to_string(), value.to_string()).is_some() {
                return None;
            }
        }
    }
    let one = |name: &str| -> Option<Option<String>> {
        let mut all = h.get_all(name);
        let first = all.next();
        if all.next().is_some() {
            return None;
        }
        Some(first.map(str::to_string))
    };
    let date = |v: Option<String>, f: DateTimeFormat| -> Option<Option<DateTime>> {
        v.map(|v| DateTime::from_str(&v, f).ok())
            .map_or(Some(None), |d| d.map(Some))
    };
    let size = match one("content-length")? {
        Some(v) => v.parse::<i64>().ok()?.max(0) as u64,
        None => 0,
    };
    let last_modified = date(one("last-modified")?, DateTimeFormat::HttpDate)?
        .and_then(|t| SystemTime::try_from(t).ok())
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let class = one("x-amz-storage-class")?;
    let lock_until = date(
        one("x-amz-object-lock-retain-until-date")?,
        DateTimeFormat::DateTime,
    )?;
    let tag_count = match one("x-amz-tagging-count")? {
        Some(v) => v.parse::<i32>().ok()?.max(0) as u32,
        None => 0,
    };
    let headers = ObjectHeaders {
        content_type: one("content-type")?,
        cache_control: one("cache-control")?,
        content_disposition: one("content-disposition")?,
        content_encoding: one("content-encoding")?,
        content_language: one("content-language")?,
        expires: one("expires")?,
        storage_class: class.clone().filter(|c| c != "STANDARD"),
        sse: one("x-amz-server-side-encryption")?,
        sse_kms_key_id: one("x-amz-server-side-encryption-aws-kms-key-id")?,
        sse_c: one("x-amz-server-side-encryption-customer-algorithm")?.is_some(),
        restore: one("x-amz-restore")?,
        lock_mode: one("x-amz-object-lock-mode")?,
        lock_retain_until: match lock_until {
            Some(t) => Some(t.fmt(DateTimeFormat::DateTime).ok()?),
            None => None,
        },
        legal_hold: one("x-amz-object-lock-legal-hold")?,
        tag_count,
    };
    Some(ObjectInfo {
        key: key.to_string(),
        size,
        etag: one("etag")?.unwrap_or_default(),
        last_modified,
        version_id: one("x-amz-version-id")?,
        storage_class: Some(class.unwrap_or_else(|| "STANDARD".to_string())),
        metadata: Some(metadata),
        headers: Some(Box::new(headers)),
    })
}
