//! `S3Store`: the `ObjectStore` over aws-sdk-s3. The only module that
//! imports the SDK; every SDK error is classified here into `StoreError`.
//!
//! Credentials come from aws-config's default chain (environment, profiles,
//! SSO, web identity, container and instance metadata) unless static keys are
//! given (s3fs-style `passwd_file`). Each attempt is bounded by a connect and
//! a read timeout, and the SDK's standard retry (exponential backoff with
//! jitter) retries transient failures, so no call waits forever.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use aws_config::BehaviorVersion;
use aws_config::environment::region::EnvironmentVariableRegionProvider;
use aws_config::meta::region::RegionProviderChain;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::{
    Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::{ByteStream, DateTime, Length};
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, EncodingType, MetadataDirective};
use bytes::Bytes;
use tracing::debug;

use super::{
    Counters, ListPage, Metadata, ObjectInfo, ObjectStore, Op, PutBody, PutResult, ReadPin,
    StoreError, StoreResult, VersionInfo, VersionPage,
};

/// How to reach the bucket.
#[derive(Clone, Debug)]
pub struct S3Settings {
    pub bucket: String,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub path_style: bool,
    pub profile: Option<String>,
    /// Access key id and secret, e.g. from a passwd_file.
    pub static_keys: Option<(String, String)>,
    /// Connect and per-read timeout of one attempt.
    pub attempt_timeout: Duration,
    /// Attempts per call, the first included.
    pub max_attempts: u32,
}

/// The S3 implementation of `ObjectStore`.
#[derive(Debug)]
pub struct S3Store {
    client: Client,
    bucket: String,
    counters: Counters,
    max_attempts: u32,
    /// The store answered ListObjectVersions with 501 Not Implemented.
    no_versions_api: AtomicBool,
    /// The credentials chain (for `access_key_id`).
    credentials: Option<aws_sdk_s3::config::SharedCredentialsProvider>,
}

const DEFAULT_REGION: &str = "us-east-1";

impl S3Store {
    /// Builds the client. When no region is configured anywhere, the
    /// bucket's own region is discovered with one HeadBucket.
    pub async fn connect(s: &S3Settings) -> StoreResult<S3Store> {
        let mut loader = aws_config::defaults(BehaviorVersion::latest());
        if let Some(p) = &s.profile {
            loader = loader.profile_name(p);
        }
        // Region: the option, else environment or profile. Never instance
        // metadata: a mount must not reach for the network to find it.
        let configured_region = match &s.region {
            Some(r) => Some(r.clone()),
            None => {
                let mut profile = aws_config::profile::ProfileFileRegionProvider::builder();
                if let Some(p) = &s.profile {
                    profile = profile.profile_name(p);
                }
                RegionProviderChain::first_try(EnvironmentVariableRegionProvider::new())
                    .or_else(profile.build())
                    .region()
                    .await
                    .map(|r| r.to_string())
            }
        };
        let region = configured_region
            .clone()
            .unwrap_or_else(|| DEFAULT_REGION.to_string());
        loader = loader.region(Region::new(region.clone()));
        if let Some((id, secret)) = &s.static_keys {
            loader = loader.credentials_provider(Credentials::new(
                id.clone(),
                secret.clone(),
                None,
                None,
                "bucketfs-passwd-file",
            ));
        }
        let sdk = loader.load().await;
        let store = Self::with_region(s, &sdk, &region);
        if configured_region.is_some() || s.endpoint.is_some() {
            return Ok(store);
        }
        match store.discover_region().await {
            Some(r) if r != region => {
                debug!(region = %r, "bucket region discovered");
                Ok(Self::with_region(s, &sdk, &r))
            }
            _ => Ok(store),
        }
    }

    /// The access key id the client signs with, if credentials resolve:
    /// the identity local caches are keyed by (never logged).
    pub async fn access_key_id(&self) -> Option<String> {
        use aws_sdk_s3::config::ProvideCredentials;
        let creds = self
            .credentials
            .as_ref()?
            .provide_credentials()
            .await
            .ok()?;
        Some(creds.access_key_id().to_string())
    }

    fn with_region(s: &S3Settings, sdk: &aws_config::SdkConfig, region: &str) -> S3Store {
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(s.attempt_timeout)
            .read_timeout(s.attempt_timeout)
            .build();
        let retry = RetryConfig::standard()
            .with_max_attempts(s.max_attempts.max(1))
            .with_initial_backoff(Duration::from_millis(200))
            .with_max_backoff(Duration::from_secs(5));
        let mut b = aws_sdk_s3::config::Builder::from(sdk)
            .region(Region::new(region.to_string()))
            .timeout_config(timeouts)
            .retry_config(retry)
            .force_path_style(s.path_style)
            // Checksums only where S3 requires them: the SDK's default
            // aws-chunked trailers are refused by several S3-compatible
            // stores (Garage: "Invalid payload signature").
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        if let Some(e) = &s.endpoint {
            b = b.endpoint_url(e);
        }
        S3Store {
            credentials: sdk.credentials_provider(),
            client: Client::from_conf(b.build()),
            bucket: s.bucket.clone(),
            counters: Counters::default(),
            max_attempts: s.max_attempts.max(1),
            no_versions_api: AtomicBool::new(false),
        }
    }

    async fn discover_region(&self) -> Option<String> {
        match self.client.head_bucket().bucket(&self.bucket).send().await {
            Ok(out) => out.bucket_region().map(str::to_string),
            Err(e) => e
                .raw_response()
                .and_then(|r| r.headers().get("x-amz-bucket-region"))
                .map(str::to_string),
        }
    }

    fn copy_source(&self, key: &str, version: Option<&str>) -> String {
        let enc = percent_encoding::utf8_percent_encode(key, KEY_ENCODE);
        match version {
            Some(v) => format!("{}/{enc}?versionId={v}", self.bucket),
            None => format!("{}/{enc}", self.bucket),
        }
    }
}

/// Everything but unreserved characters and `/` is escaped in a copy source.
const KEY_ENCODE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'/')
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Classifies any SDK error. The message carries codes, never credentials.
fn classify<E>(err: SdkError<E, aws_sdk_s3::config::http::HttpResponse>) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    match &err {
        SdkError::TimeoutError(_) => StoreError::Transient("request timed out".into()),
        SdkError::DispatchFailure(d) => {
            let detail = format!("{}", aws_sdk_s3::error::DisplayErrorContext(&err));
            if detail.contains("credentials") {
                StoreError::AccessDenied("no usable credentials found (environment, profile, passwd_file or instance role)".into())
            } else if d.is_timeout() {
                StoreError::Transient("connect timed out".into())
            } else {
                StoreError::Transient("cannot connect to the endpoint".into())
            }
        }
        SdkError::ResponseError(_) => {
            StoreError::Transient("malformed or cut-short response".into())
        }
        SdkError::ServiceError(se) => {
            let status = se.raw().status().as_u16();
            let code = se.err().code().unwrap_or("");
            let msg = match se.err().message() {
                Some(m) if !m.is_empty() => format!("{status} {code} {m}"),
                _ if code.is_empty() => {
                    format!("{status} {}", aws_sdk_s3::error::DisplayErrorContext(&err))
                }
                _ => format!("{status} {code}"),
            };
            match (status, code) {
                (_, "NoSuchKey" | "NoSuchVersion" | "NoSuchUpload") => StoreError::NotFound,
                (_, "NoSuchBucket") => StoreError::NoSuchBucket,
                (404, _) => StoreError::NotFound,
                (_, "AccessDenied" | "InvalidAccessKeyId" | "SignatureDoesNotMatch")
                | (401 | 403, _) => StoreError::AccessDenied(msg),
                (412, _) | (_, "PreconditionFailed") => StoreError::PreconditionFailed,
                (_, "KeyTooLongError" | "InvalidArgument" | "InvalidRequest") => {
                    StoreError::InvalidRequest(msg)
                }
                (408 | 429, _) | (500..=599, _) | (_, "SlowDown" | "RequestTimeout") => {
                    StoreError::Transient(msg)
                }
                _ => StoreError::Other(msg),
            }
        }
        _ => StoreError::Other(format!("{}", aws_sdk_s3::error::DisplayErrorContext(&err))),
    }
}

fn to_system_time(t: Option<&DateTime>) -> std::time::SystemTime {
    t.and_then(|t| std::time::SystemTime::try_from(*t).ok())
        .unwrap_or(std::time::UNIX_EPOCH)
}

async fn byte_stream(body: PutBody) -> StoreResult<ByteStream> {
    match body {
        PutBody::Bytes(b) => Ok(ByteStream::from(b)),
        PutBody::File { path, offset, len } => ByteStream::read_from()
            .path(path)
            .offset(offset)
            .length(Length::Exact(len))
            .build()
            .await
            .map_err(|e| StoreError::Other(format!("staging file: {e}"))),
    }
}

/// Decodes a key listed with `encoding-type=url`.
fn url_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// A little jitter for retry backoff, without a random-number crate.
fn rand_jitter() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
}

impl S3Store {
    /// Counts a request that sends `body`; its length and stream.
    async fn counted_body(&self, op: Op, body: PutBody) -> StoreResult<(i64, ByteStream)> {
        self.counters.record(op);
        let len = body.len();
        self.counters.add_sent(len);
        Ok((len as i64, byte_stream(body).await?))
    }

    /// ListObjectVersions emulated with ListObjectsV2, for stores without
    /// versions. The continuation token travels as the key marker.
    async fn versions_from_listing(
        &self,
        prefix: &str,
        delimiter: Option<&str>,
        marker: Option<(String, String)>,
    ) -> StoreResult<VersionPage> {
        let page = self
            .list(prefix, delimiter, marker.map(|m| m.0), None)
            .await?;
        Ok(VersionPage {
            versions: page
                .objects
                .into_iter()
                .map(|o| VersionInfo {
                    key: o.key,
                    version_id: "null".into(),
                    is_latest: true,
                    last_modified: o.last_modified,
                    size: o.size,
                    etag: o.etag,
                    delete_marker: false,
                })
                .collect(),
            prefixes: page.prefixes,
            next: page.next_token.map(|t| (t, String::new())),
        })
    }

    async fn get_range_once(
        &self,
        key: &str,
        range: Range<u64>,
        pin: &ReadPin,
    ) -> StoreResult<Bytes> {
        self.counters.record(Op::Get);
        let mut req = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .range(format!("bytes={}-{}", range.start, range.end - 1));
        match pin {
            ReadPin::Latest => {}
            ReadPin::Etag(e) => req = req.if_match(e),
            ReadPin::Version(v) => req = req.version_id(v),
        }
        let out = match req.send().await {
            Ok(out) => out,
            // A range starting at or past the end of the object.
            Err(SdkError::ServiceError(se)) if se.raw().status().as_u16() == 416 => {
                return Ok(Bytes::new());
            }
            Err(e) => return Err(classify(e)),
        };
        let expected = out.content_length().unwrap_or(-1);
        let data = out
            .body
            .collect()
            .await
            .map_err(|e| StoreError::Transient(format!("reading body: {e}")))?
            .into_bytes();
        self.counters.add_received(data.len() as u64);
        // A body cut short must never be served as data.
        if expected >= 0 && data.len() as i64 != expected {
            return Err(StoreError::Transient(format!(
                "body cut short: {} of {expected} bytes",
                data.len()
            )));
        }
        Ok(data)
    }
}

#[async_trait]
impl ObjectStore for S3Store {
    async fn list(
        &self,
        prefix: &str,
        delimiter: Option<&str>,
        token: Option<String>,
        max_keys: Option<i32>,
    ) -> StoreResult<ListPage> {
        self.counters.record(Op::List);
        let out = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(prefix)
            .set_delimiter(delimiter.map(str::to_string))
            .set_continuation_token(token)
            .set_max_keys(max_keys)
            // Keys come URL-encoded: XML 1.0 cannot carry control characters.
            .encoding_type(EncodingType::Url)
            .send()
            .await
            .map_err(classify)?;
        let objects = out
            .contents()
            .iter()
            .map(|o| ObjectInfo {
                key: url_decode(o.key().unwrap_or_default()),
                size: o.size().unwrap_or(0).max(0) as u64,
                etag: o.e_tag().unwrap_or_default().to_string(),
                last_modified: to_system_time(o.last_modified()),
                version_id: None,
                storage_class: o.storage_class().map(|c| c.as_str().to_string()),
                metadata: None,
            })
            .collect();
        let prefixes = out
            .common_prefixes()
            .iter()
            .filter_map(|p| p.prefix().map(url_decode))
            .collect();
        let next_token = if out.is_truncated() == Some(true) {
            out.next_continuation_token().map(str::to_string)
        } else {
            None
        };
        Ok(ListPage {
            objects,
            prefixes,
            next_token,
        })
    }

    async fn head(&self, key: &str, version: Option<&str>) -> StoreResult<ObjectInfo> {
        self.counters.record(Op::Head);
        let out = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .set_version_id(version.map(str::to_string))
            .send()
            .await
            .map_err(classify)?;
        Ok(ObjectInfo {
            key: key.to_string(),
            size: out.content_length().unwrap_or(0).max(0) as u64,
            etag: out.e_tag().unwrap_or_default().to_string(),
            last_modified: to_system_time(out.last_modified()),
            version_id: out.version_id().map(str::to_string),
            storage_class: Some(
                out.storage_class()
                    .map_or("STANDARD", |c| c.as_str())
                    .to_string(),
            ),
            metadata: Some(out.metadata().cloned().unwrap_or_default()),
        })
    }

    async fn get_range(&self, key: &str, range: Range<u64>, pin: &ReadPin) -> StoreResult<Bytes> {
        if range.is_empty() {
            return Ok(Bytes::new());
        }
        // The SDK retries failed requests; a body that breaks off or comes
        // short after a good start is retried here, never served.
        let mut attempt = 0;
        loop {
            match self.get_range_once(key, range.clone(), pin).await {
                Err(StoreError::Transient(m)) if attempt + 1 < self.max_attempts => {
                    attempt += 1;
                    let backoff = Duration::from_millis(100 << attempt.min(5));
                    let jitter = Duration::from_millis(u64::from(rand_jitter()) % 100);
                    debug!(key, attempt, error = %m, "GET body failed; retrying");
                    tokio::time::sleep(backoff + jitter).await;
                }
                other => return other,
            }
        }
    }

    async fn put(&self, key: &str, body: PutBody, meta: &Metadata) -> StoreResult<PutResult> {
        let (len, body) = self.counted_body(Op::Put, body).await?;
        let out = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_length(len)
            .body(body)
            .set_metadata(Some(meta.clone()))
            .send()
            .await
            .map_err(classify)?;
        Ok(PutResult {
            etag: out.e_tag().unwrap_or_default().to_string(),
            version_id: out.version_id().map(str::to_string),
        })
    }

    async fn copy(
        &self,
        src: &str,
        dst: &str,
        meta: Option<&Metadata>,
        src_version: Option<&str>,
    ) -> StoreResult<PutResult> {
        self.counters.record(Op::Copy);
        let mut req = self
            .client
            .copy_object()
            .bucket(&self.bucket)
            .key(dst)
            .copy_source(self.copy_source(src, src_version));
        if let Some(m) = meta {
            req = req
                .metadata_directive(MetadataDirective::Replace)
                .set_metadata(Some(m.clone()));
        }
        let out = req.send().await.map_err(classify)?;
        Ok(PutResult {
            etag: out
                .copy_object_result()
                .and_then(|r| r.e_tag())
                .unwrap_or_default()
                .to_string(),
            version_id: out.version_id().map(str::to_string),
        })
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        self.counters.record(Op::Delete);
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(classify)?;
        Ok(())
    }

    async fn create_multipart(&self, key: &str, meta: &Metadata) -> StoreResult<String> {
        self.counters.record(Op::CreateMultipart);
        let out = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .set_metadata(Some(meta.clone()))
            .send()
            .await
            .map_err(classify)?;
        out.upload_id()
            .map(str::to_string)
            .ok_or_else(|| StoreError::Other("no upload id returned".into()))
    }

    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        part_number: i32,
        body: PutBody,
    ) -> StoreResult<String> {
        let (len, body) = self.counted_body(Op::UploadPart, body).await?;
        let out = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .part_number(part_number)
            .content_length(len)
            .body(body)
            .send()
            .await
            .map_err(classify)?;
        Ok(out.e_tag().unwrap_or_default().to_string())
    }

    async fn upload_part_copy(
        &self,
        key: &str,
        upload_id: &str,
        part_number: i32,
        src: &str,
        range: Range<u64>,
        src_etag: Option<&str>,
    ) -> StoreResult<String> {
        self.counters.record(Op::UploadPartCopy);
        let out = self
            .client
            .upload_part_copy()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .part_number(part_number)
            .copy_source(self.copy_source(src, None))
            .copy_source_range(format!("bytes={}-{}", range.start, range.end - 1))
            .set_copy_source_if_match(src_etag.map(str::to_string))
            .send()
            .await
            .map_err(classify)?;
        Ok(out
            .copy_part_result()
            .and_then(|r| r.e_tag())
            .unwrap_or_default()
            .to_string())
    }

    async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: Vec<(i32, String)>,
    ) -> StoreResult<PutResult> {
        self.counters.record(Op::CompleteMultipart);
        let parts = parts
            .into_iter()
            .map(|(n, etag)| CompletedPart::builder().part_number(n).e_tag(etag).build())
            .collect();
        let out = self
            .client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map_err(classify)?;
        Ok(PutResult {
            etag: out.e_tag().unwrap_or_default().to_string(),
            version_id: out.version_id().map(str::to_string),
        })
    }

    async fn abort_multipart(&self, key: &str, upload_id: &str) -> StoreResult<()> {
        self.counters.record(Op::AbortMultipart);
        self.client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .send()
            .await
            .map_err(classify)?;
        Ok(())
    }

    async fn list_versions(
        &self,
        prefix: &str,
        delimiter: Option<&str>,
        marker: Option<(String, String)>,
    ) -> StoreResult<VersionPage> {
        if self.no_versions_api.load(Ordering::Relaxed) {
            return self.versions_from_listing(prefix, delimiter, marker).await;
        }
        self.counters.record(Op::ListVersions);
        let (key_marker, version_marker) = marker.clone().unzip();
        let out = match self
            .client
            .list_object_versions()
            .bucket(&self.bucket)
            .prefix(prefix)
            .set_delimiter(delimiter.map(str::to_string))
            .set_key_marker(key_marker)
            .set_version_id_marker(version_marker.filter(|v| !v.is_empty()))
            .send()
            .await
        {
            Ok(out) => out,
            // A store without versions (Garage...): every object is its
            // one version, "null".
            Err(SdkError::ServiceError(se)) if se.raw().status().as_u16() == 501 => {
                debug!(
                    "the store has no ListObjectVersions; showing current objects as version null"
                );
                self.no_versions_api.store(true, Ordering::Relaxed);
                return self.versions_from_listing(prefix, delimiter, marker).await;
            }
            Err(e) => return Err(classify(e)),
        };
        let mut versions: Vec<VersionInfo> = out
            .versions()
            .iter()
            .map(|v| VersionInfo {
                key: v.key().unwrap_or_default().to_string(),
                version_id: v.version_id().unwrap_or("null").to_string(),
                is_latest: v.is_latest().unwrap_or(false),
                last_modified: to_system_time(v.last_modified()),
                size: v.size().unwrap_or(0).max(0) as u64,
                etag: v.e_tag().unwrap_or_default().to_string(),
                delete_marker: false,
            })
            .collect();
        versions.extend(out.delete_markers().iter().map(|d| VersionInfo {
            key: d.key().unwrap_or_default().to_string(),
            version_id: d.version_id().unwrap_or("null").to_string(),
            is_latest: d.is_latest().unwrap_or(false),
            last_modified: to_system_time(d.last_modified()),
            size: 0,
            etag: String::new(),
            delete_marker: true,
        }));
        let prefixes = out
            .common_prefixes()
            .iter()
            .filter_map(|p| p.prefix().map(str::to_string))
            .collect();
        let next = if out.is_truncated() == Some(true) {
            out.next_key_marker().map(|k| {
                (
                    k.to_string(),
                    out.next_version_id_marker().unwrap_or_default().to_string(),
                )
            })
        } else {
            None
        };
        Ok(VersionPage {
            versions,
            prefixes,
            next,
        })
    }

    async fn check_bucket(&self) -> StoreResult<()> {
        self.counters.record(Op::HeadBucket);
        // ListObjectsV2 rather than HeadBucket: its errors carry a code
        // (NoSuchBucket vs AccessDenied), and it is what a mount needs anyway.
        self.client
            .list_objects_v2()
            .bucket(&self.bucket)
            .max_keys(1)
            .send()
            .await
            .map_err(classify)?;
        Ok(())
    }

    fn counters(&self) -> &Counters {
        &self.counters
    }
}
