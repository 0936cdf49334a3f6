//! `S3Store`: the `ObjectStore` over aws-sdk-s3. The only module that
//! imports the SDK; every SDK error is classified here into `StoreError`.
//!
//! Credentials come from aws-config's default chain (environment, profiles,
//! SSO, web identity, container and instance metadata) unless static keys are
//! given (s3fs-style `passwd_file`).
//!
//! Time budgets. Each attempt is bounded by a connect timeout and a
//! first-byte timeout (`timeout=`); a GET body that stalls for that long
//! between chunks is cut too. Calls S3 may legitimately take minutes to
//! answer (CompleteMultipartUpload, CopyObject, UploadPartCopy) get
//! `long_timeout=` for their first byte instead. There is one retry layer,
//! here (the SDK's own is off): transient failures (throttling, 5xx,
//! timeouts, resets, bodies cut short) are retried with capped exponential
//! backoff and jitter while the call's time budget (`retry_time=`) and
//! attempt count (`retries=`) last. So a stalled server costs one call at
//! most `retry_time` plus one attempt's timeout.

use std::future::Future;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_config::BehaviorVersion;
use aws_config::environment::region::EnvironmentVariableRegionProvider;
use aws_config::meta::region::RegionProviderChain;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::interceptors::BeforeTransmitInterceptorContextMut;
use aws_sdk_s3::config::{
    ConfigBag, Credentials, Intercept, Region, RequestChecksumCalculation,
    ResponseChecksumValidation, RuntimeComponents,
};
use aws_sdk_s3::error::{BoxError, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::operation::create_multipart_upload::CreateMultipartUploadOutput;
use aws_sdk_s3::operation::head_object::{HeadObjectError, HeadObjectOutput};
use aws_sdk_s3::primitives::{ByteStream, DateTime, DateTimeFormat, Length};
use aws_sdk_s3::types::{
    ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart, EncodingType, MetadataDirective,
    ObjectCannedAcl, ServerSideEncryption, StorageClass, TaggingDirective,
};
use bytes::Bytes;
use tracing::{debug, warn};

use super::fast_head::Fast;
use super::{
    Counters, ListPage, Metadata, ObjectHeaders, ObjectInfo, ObjectStore, Op, Part, PutBody,
    PutResult, ReadPin, StoreError, StoreResult, Upload, VersionInfo, VersionPage,
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
    /// Time budget of the retries of one call.
    pub retry_time: Duration,
    /// First-byte timeout of long server-side operations.
    pub long_timeout: Duration,
    /// Encryption, storage class, ACL and payer of every request.
    pub requests: RequestOptions,
    /// HEAD and ranged GET without the SDK's per-request machinery where
    /// it applies (`store::fast_head`); off, each goes through the SDK.
    pub fast_head: bool,
    /// Memory for bodies being sent (see `S3Store::ready`); 0: every
    /// staged range is read from its file as it is sent.
    pub send_memory: u64,
}

/// What the mount adds to its requests, mount-wide: set by mount options,
/// applied here so the `ObjectStore` calls stay small.
#[derive(Clone, Debug, Default)]
pub struct RequestOptions {
    /// `x-amz-server-side-encryption` of every object written or copied.
    pub sse: Option<String>,
    /// `x-amz-server-side-encryption-aws-kms-key-id` with it.
    pub sse_kms_key_id: Option<String>,
    /// SSE-C: the customer key, on every request that touches object data.
    pub sse_c: Option<SseCKey>,
    /// `x-amz-storage-class` of every object written or copied.
    pub storage_class: Option<String>,
    /// Canned `x-amz-acl` of every object written or copied.
    pub acl: Option<String>,
    /// `x-amz-request-payer: requester` on every request.
    pub requester_pays: bool,
}

/// An SSE-C key, kept as S3 wants it (base64 key and base64 MD5 of the
/// key). Its `Debug` shows neither: it never reaches a log.
#[derive(Clone)]
pub struct SseCKey {
    key_b64: String,
    md5_b64: String,
}

impl SseCKey {
    /// The length of an AES-256 key.
    pub const KEY_BYTES: usize = 32;

    /// The key's MD5 (base64), as S3 is told it: names the key, not it.
    pub fn md5_b64(&self) -> &str {
        &self.md5_b64
    }

    /// A key from the contents of a key file: 32 raw bytes, or a line of
    /// 32 bytes or of their base64. s3fs's files list one key per line
    /// (the key history); the first is the one to use.
    pub fn from_file_bytes(data: &[u8]) -> Result<SseCKey, String> {
        use base64::Engine;
        use md5::Digest;
        let b64 = base64::engine::general_purpose::STANDARD;
        let key = if data.len() == Self::KEY_BYTES {
            data.to_vec()
        } else {
            let first = data
                .split(|&b| b == b'\n')
                .map(|l| l.trim_ascii())
                .find(|l| !l.is_empty())
                .ok_or_else(|| "is empty".to_string())?;
            if first.len() == Self::KEY_BYTES {
                first.to_vec()
            } else {
                b64.decode(first).map_err(|_| {
                    format!(
                        "is neither 32 raw bytes nor base64 ({} bytes on its first line)",
                        first.len()
                    )
                })?
            }
        };
        if key.len() != Self::KEY_BYTES {
            return Err(format!(
                "holds a {}-byte key; SSE-C needs 32 bytes (AES-256)",
                key.len()
            ));
        }
        Ok(SseCKey {
            key_b64: b64.encode(&key),
            md5_b64: b64.encode(md5::Md5::digest(&key)),
        })
    }
}

impl std::fmt::Debug for SseCKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SseCKey(..)")
    }
}

/// The SSE-C algorithm, the only one S3 has.
const SSE_C_ALGORITHM: &str = "AES256";

const REQUEST_PAYER: &str = "x-amz-request-payer";
const REQUEST_PAYER_QUERY: &str = "x-amz-request-payer=requester";

/// Adds `x-amz-request-payer: requester` to every request the client
/// sends, listings and multipart calls included.
#[derive(Debug)]
struct RequesterPays;

impl Intercept for RequesterPays {
    fn name(&self) -> &'static str {
        "RequesterPays"
    }

    fn modify_before_signing(
        &self,
        context: &mut BeforeTransmitInterceptorContextMut<'_>,
        _: &RuntimeComponents,
        _: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let req = context.request_mut();
        // A presigned URL carries it in its query instead.
        if !req.uri().contains(REQUEST_PAYER_QUERY) {
            req.headers_mut().insert(REQUEST_PAYER, "requester");
        }
        Ok(())
    }
}

/// Adds the mount's SSE-C key, if any, to a request that reads or writes
/// object data.
macro_rules! with_sse_c {
    ($req:expr, $opts:expr) => {{
        let k = $opts.sse_c.as_ref();
        $req.set_sse_customer_algorithm(k.map(|_| SSE_C_ALGORITHM.to_string()))
            .set_sse_customer_key(k.map(|k| k.key_b64.clone()))
            .set_sse_customer_key_md5(k.map(|k| k.md5_b64.clone()))
    }};
}

/// Adds the SSE-C key of a copy's source, when it has one.
macro_rules! with_copy_source_sse_c {
    ($req:expr, $key:expr) => {{
        let k: Option<&SseCKey> = $key;
        $req.set_copy_source_sse_customer_algorithm(k.map(|_| SSE_C_ALGORITHM.to_string()))
            .set_copy_source_sse_customer_key(k.map(|k| k.key_b64.clone()))
            .set_copy_source_sse_customer_key_md5(k.map(|k| k.md5_b64.clone()))
    }};
}

/// Adds what a new object gets (PutObject, CreateMultipartUpload,
/// CopyObject): encryption, storage class, canned ACL.
macro_rules! with_new_object {
    ($req:expr, $opts:expr) => {{
        let o: &RequestOptions = $opts;
        with_sse_c!($req, o)
            .set_server_side_encryption(o.sse.as_deref().map(ServerSideEncryption::from))
            .set_ssekms_key_id(o.sse_kms_key_id.clone())
            .set_storage_class(o.storage_class.as_deref().map(StorageClass::from))
            .set_acl(o.acl.as_deref().map(ObjectCannedAcl::from))
    }};
}

/// The SDK's configuration for these settings: credentials (an explicit
/// profile or passwd_file first), and the region: the option, else the
/// environment or profile (never instance metadata: a mount must not reach
/// for the network to find it), else us-east-1. Also whether a region was
/// configured at all.
async fn load_sdk(s: &S3Settings) -> (aws_config::SdkConfig, String, bool) {
    let mut loader = aws_config::defaults(BehaviorVersion::latest());
    if let Some(p) = &s.profile {
        loader = loader.profile_name(p);
    }
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
    } else if let Some(p) = &s.profile {
        // An explicit profile wins over keys in the environment, as in
        // boto3 and the AWS CLI (the default chain asks the environment
        // first).
        loader = loader.credentials_provider(
            aws_config::profile::ProfileFileCredentialsProvider::builder()
                .profile_name(p)
                .build(),
        );
    }
    (loader.load().await, region, configured_region.is_some())
}

impl Default for S3Settings {
    fn default() -> Self {
        S3Settings {
            bucket: String::new(),
            endpoint: None,
            region: None,
            path_style: false,
            profile: None,
            static_keys: None,
            attempt_timeout: Duration::from_secs(10),
            max_attempts: 11,
            retry_time: Duration::from_secs(45),
            long_timeout: Duration::from_secs(300),
            requests: RequestOptions::default(),
            fast_head: true,
            send_memory: 64 << 20,
        }
    }
}

/// The S3 implementation of `ObjectStore`.
#[derive(Debug)]
pub struct S3Store {
    client: Client,
    bucket: String,
    counters: Counters,
    max_attempts: u32,
    retry_time: Duration,
    attempt_timeout: Duration,
    long_timeout: Duration,
    /// The store answered ListObjectVersions with 501 Not Implemented.
    no_versions_api: AtomicBool,
    /// GetObjectAcl failed once (not implemented, not allowed): copies
    /// stop asking.
    no_acl_api: AtomicBool,
    /// The store refused CRC32C on a multipart upload: parts carry
    /// Content-MD5 from then on.
    no_part_checksums: AtomicBool,
    /// Whether the bucket's objects can have ACLs (not when its Object
    /// Ownership is BucketOwnerEnforced), once known.
    acls_enabled: tokio::sync::OnceCell<bool>,
    /// The credentials chain (for `access_key_id`).
    credentials: Option<aws_sdk_s3::config::SharedCredentialsProvider>,
    /// Where the credentials come from, for a log line when they expire.
    credentials_source: String,
    requests: RequestOptions,
    /// HEADs without the SDK's per-request machinery, where it applies.
    fast_head: Option<super::fast_head::FastHead>,
    /// Memory for bodies being sent (`ready`).
    send_memory: super::SendMemory,
}

const DEFAULT_REGION: &str = "us-east-1";

impl S3Store {
    /// Builds the client. When no region is configured anywhere, the
    /// bucket's own region is discovered with one HeadBucket.
    pub async fn connect(s: &S3Settings) -> StoreResult<S3Store> {
        let (sdk, region, configured) = load_sdk(s).await;
        let memory = super::SendMemory::new(s.send_memory);
        let store = Self::with_region(s, &sdk, &region, memory.clone());
        if configured || s.endpoint.is_some() {
            return Ok(store);
        }
        match store.discover_region().await {
            Some(r) if r != region => {
                debug!(region = %r, "bucket region discovered");
                Ok(Self::with_region(s, &sdk, &r, memory))
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

    /// `send_memory`: the mount's (an `s3://` mount's buckets share one).
    fn with_region(
        s: &S3Settings,
        sdk: &aws_config::SdkConfig,
        region: &str,
        send_memory: super::SendMemory,
    ) -> S3Store {
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(s.attempt_timeout)
            .read_timeout(s.attempt_timeout)
            .build();
        // Retries are ours (`S3Store::retry`): one layer, with a time budget.
        let retry = RetryConfig::disabled();
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
        if s.requests.requester_pays {
            b = b.interceptor(RequesterPays);
        }
        S3Store {
            credentials: sdk.credentials_provider(),
            client: Client::from_conf(b.build()),
            bucket: s.bucket.clone(),
            counters: Counters::default(),
            max_attempts: s.max_attempts.max(1),
            retry_time: s.retry_time,
            attempt_timeout: s.attempt_timeout,
            long_timeout: s.long_timeout,
            no_versions_api: AtomicBool::new(false),
            no_acl_api: AtomicBool::new(false),
            no_part_checksums: AtomicBool::new(false),
            acls_enabled: tokio::sync::OnceCell::new(),
            requests: s.requests.clone(),
            credentials_source: credentials_source(s),
            send_memory,
            fast_head: if s.fast_head {
                super::fast_head::FastHead::new(sdk, s, region)
            } else {
                None
            },
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

    /// Hashes a body for its Content-MD5 (when `md5`) and
    /// x-amz-checksum-crc32c headers: every upload carries a checksum (and
    /// S3 refuses a PUT without one in a bucket with Object Lock). A
    /// staged file's range that fits in what is left of `send_memory` is
    /// read once, into one of its buffers, hashed there and sent (and sent
    /// again on a retry) from there; otherwise the file is hashed in one
    /// pass and read again as it is sent. Never waits for memory: a range
    /// that does not fit takes the file path at once.
    ///
    /// Hashing a part of several MiB takes milliseconds of CPU: it runs on
    /// a blocking thread, not on the runtime's workers (which serve the
    /// FUSE requests and the other parts' transfers).
    async fn ready(&self, body: &PutBody, md5: bool) -> StoreResult<Ready> {
        use base64::Engine;
        let memory = match body {
            PutBody::File { len, .. } => usize::try_from(*len)
                .ok()
                .and_then(|len| self.send_memory.take(len)),
            PutBody::Bytes(_) => None,
        };
        if memory.is_some() {
            self.counters.add_sent_from_memory(body.len());
        }
        let task_body = body.clone();
        let (body, md5, crc) = tokio::task::spawn_blocking(move || match memory {
            Some(mut buf) => {
                let (md5, crc) = task_body.read_hashed(buf.as_mut(), md5)?;
                Ok((PutBody::Bytes(buf.freeze()), md5, crc))
            }
            None => {
                let (md5, crc) = task_body.checksums(md5)?;
                Ok::<_, std::io::Error>((task_body, md5, crc))
            }
        })
        .await
        .map_err(|e| StoreError::Other(format!("checksum task: {e}")))?
        .map_err(|e| StoreError::Other(format!("staging file: {e}")))?;
        let b64 = base64::engine::general_purpose::STANDARD;
        Ok(Ready {
            body,
            md5: md5.map(|m| b64.encode(m)),
            crc32c: b64.encode(crc.to_be_bytes()),
            sent_crc32c: crc,
        })
    }

    /// The store refused CRC32C on a multipart upload: said once, and its
    /// later uploads carry Content-MD5 instead.
    fn refuse_part_checksums(&self, why: &str) {
        if !self.no_part_checksums.swap(true, Ordering::Relaxed) {
            warn!(bucket = %self.bucket, refusal = why, "the store refuses CRC32C on multipart uploads; parts carry Content-MD5 instead");
        }
    }

    /// The request options of an object that keeps `keep`'s storage
    /// class and encryption: a mount option wins, else the kept value.
    fn options_keeping(&self, keep: Option<&ObjectHeaders>) -> RequestOptions {
        let mut o = self.requests.clone();
        if let Some(k) = keep {
            if o.sse.is_none() && o.sse_c.is_none() {
                o.sse = k.sse.clone();
                o.sse_kms_key_id = k.sse_kms_key_id.clone();
            }
            if o.storage_class.is_none() {
                o.storage_class = k.storage_class.clone();
            }
        }
        o
    }

    /// The standard headers of a new object at `key`: those kept, the
    /// Content-Type from the extension when none is.
    fn standard_headers(key: &str, keep: Option<&ObjectHeaders>) -> ObjectHeaders {
        let mut h = keep.cloned().unwrap_or_default();
        if h.content_type.is_none() {
            h.content_type = super::content_type_for(key);
        }
        h
    }

    /// The tags of the object an upload replaces, as the `x-amz-tagging`
    /// of the new one; None when it has none or they cannot be read (said
    /// in the log: the overwrite goes on without them).
    async fn tags_to_keep(&self, key: &str, keep: Option<&ObjectHeaders>) -> Option<String> {
        if keep.is_none_or(|k| k.tag_count == 0) {
            return None;
        }
        let req = self
            .client
            .get_object_tagging()
            .bucket(&self.bucket)
            .key(key);
        let out = self
            .retry(Op::GetTagging, key, || async {
                req.clone().send().await.map_err(classify)
            })
            .await;
        match out {
            Ok(out) => {
                let enc =
                    |s: &str| percent_encoding::utf8_percent_encode(s, TAG_ENCODE).to_string();
                let tags: Vec<String> = out
                    .tag_set()
                    .iter()
                    .map(|t| format!("{}={}", enc(t.key()), enc(t.value())))
                    .collect();
                (!tags.is_empty()).then(|| tags.join("&"))
            }
            Err(e) => {
                warn!(key, error = %e, "cannot read the tags of the object being replaced; the new one has none");
                None
            }
        }
    }

    /// Whether the bucket's objects can have ACLs of their own: not when
    /// its Object Ownership is BucketOwnerEnforced (the default of every
    /// bucket made since April 2023), asked once per mount with
    /// GetBucketOwnershipControls. A bucket without ownership controls
    /// (older ones), a store without the call, or no permission to ask:
    /// they can (GetObjectAcl then tells, or stops being asked).
    async fn bucket_has_acls(&self) -> bool {
        let req = self
            .client
            .get_bucket_ownership_controls()
            .bucket(&self.bucket);
        let known = self
            .acls_enabled
            .get_or_try_init(|| async {
                let r = self
                    .retry(Op::GetOwnership, "", || async {
                        match req.clone().send().await {
                            // Not implemented is an answer, not a failure
                            // to retry.
                            Err(e) if status_of(&e) == Some(501) => Err(StoreError::Other(
                                "501 GetBucketOwnershipControls not implemented".into(),
                            )),
                            r => r.map_err(classify),
                        }
                    })
                    .await;
                match r {
                    Ok(out) => Ok(!out.ownership_controls().is_some_and(|c| {
                        c.rules()
                            .iter()
                            .any(|r| r.object_ownership().as_str() == "BucketOwnerEnforced")
                    })),
                    // Not known this time: asked again later.
                    Err(StoreError::Transient(_)) => Err(()),
                    Err(e) => {
                        debug!(error = %e, "no bucket ownership controls; objects may have ACLs");
                        Ok(true)
                    }
                }
            })
            .await;
        known.copied().unwrap_or(true)
    }

    /// The grants of the object at `key` (a copy's source, or the object
    /// an upload replaces) that the new object would otherwise lose (it
    /// gets the private ACL): None when it has only its owner's
    /// FULL_CONTROL (always so on buckets with ACLs disabled, which refuse
    /// grant headers, and which are not asked), when `default_acl=`
    /// decides, or when the ACL cannot be read.
    async fn grants_to_keep(&self, key: &str, version: Option<&str>) -> Option<Grants> {
        if self.requests.acl.is_some()
            || self.no_acl_api.load(Ordering::Relaxed)
            || !self.bucket_has_acls().await
        {
            return None;
        }
        let req = self
            .client
            .get_object_acl()
            .bucket(&self.bucket)
            .key(key)
            .set_version_id(version.map(str::to_string));
        let out = match self
            .retry(Op::GetAcl, key, || async {
                match req.clone().send().await {
                    // Not implemented is an answer, not a failure to retry.
                    Err(e) if status_of(&e) == Some(501) => {
                        Err(StoreError::Other("501 GetObjectAcl not implemented".into()))
                    }
                    r => r.map_err(classify),
                }
            })
            .await
        {
            Ok(out) => out,
            Err(e) => {
                debug!(key, error = %e, "cannot read the object's ACL; the copy gets the default ACL");
                if !matches!(e, StoreError::NotFound | StoreError::Transient(_)) {
                    self.no_acl_api.store(true, Ordering::Relaxed);
                }
                return None;
            }
        };
        let owner = out.owner().and_then(|o| o.id());
        let mut g = Grants::default();
        let mut only_owner = true;
        for grant in out.grants() {
            let (Some(who), Some(perm)) = (grant.grantee(), grant.permission()) else {
                continue;
            };
            let name = match (who.id(), who.uri(), who.email_address()) {
                (Some(id), _, _) => format!("id=\"{id}\""),
                (_, Some(uri), _) => format!("uri=\"{uri}\""),
                (_, _, Some(mail)) => format!("emailAddress=\"{mail}\""),
                _ => continue,
            };
            let full = perm.as_str() == "FULL_CONTROL";
            if !(full && who.id().is_some() && who.id() == owner) {
                only_owner = false;
            }
            let list = match perm.as_str() {
                "FULL_CONTROL" => &mut g.full_control,
                "READ" => &mut g.read,
                "READ_ACP" => &mut g.read_acp,
                "WRITE_ACP" => &mut g.write_acp,
                _ => continue,
            };
            list.push(name);
        }
        (!only_owner).then_some(g)
    }

    /// The grants of the object an upload replaces (`keep` is its headers;
    /// None for a new key), to keep them (see `grants_to_keep`).
    async fn grants_replaced(&self, key: &str, keep: Option<&ObjectHeaders>) -> Option<Grants> {
        keep?;
        self.grants_to_keep(key, None).await
    }

    /// HeadObject, with the mount's SSE-C key when it has one. An object
    /// the key does not apply to (not SSE-C encrypted: S3 answers 400) is
    /// asked again without it, so an SSE-C mount still reads the bucket's
    /// other objects.
    async fn head_object(&self, key: &str, version: Option<&str>) -> StoreResult<HeadObjectOutput> {
        let plain = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .set_version_id(version.map(str::to_string));
        let keyed = with_sse_c!(plain.clone(), &self.requests);
        self.retry(Op::Head, key, || async {
            match keyed.clone().send().await {
                Err(e) if self.requests.sse_c.is_some() && status_of(&e) == Some(400) => plain
                    .clone()
                    .send()
                    .await
                    .map_err(|p| classify_head(unkeyed_error(e, p))),
                r => r.map_err(classify_head),
            }
        })
        .await
    }

    fn copy_source(&self, key: &str, version: Option<&str>) -> String {
        let enc = percent_encoding::utf8_percent_encode(key, KEY_ENCODE);
        match version {
            Some(v) => format!("{}/{enc}?versionId={v}", self.bucket),
            None => format!("{}/{enc}", self.bucket),
        }
    }
}

/// Adds an ACL's grants (`x-amz-grant-*`) to a request that makes an
/// object (PutObject, CreateMultipartUpload, CopyObject).
macro_rules! with_grants {
    ($req:expr, $g:expr) => {{
        let g: Option<&Grants> = $g;
        $req.set_grant_full_control(g.and_then(|g| Grants::header(&g.full_control)))
            .set_grant_read(g.and_then(|g| Grants::header(&g.read)))
            .set_grant_read_acp(g.and_then(|g| Grants::header(&g.read_acp)))
            .set_grant_write_acp(g.and_then(|g| Grants::header(&g.write_acp)))
    }};
}

/// Adds an object's standard HTTP headers (PutObject,
/// CreateMultipartUpload, CopyObject with REPLACE).
macro_rules! with_standard_headers {
    ($req:expr, $h:expr) => {{
        let h: &ObjectHeaders = $h;
        $req.set_content_type(h.content_type.clone())
            .set_cache_control(h.cache_control.clone())
            .set_content_disposition(h.content_disposition.clone())
            .set_content_encoding(h.content_encoding.clone())
            .set_content_language(h.content_language.clone())
            .set_expires(
                h.expires
                    .as_deref()
                    .and_then(|t| DateTime::from_str(t, DateTimeFormat::HttpDate).ok()),
            )
    }};
}

/// What HEAD says of an object's headers.
fn headers_of(out: &HeadObjectOutput) -> ObjectHeaders {
    let s = |v: Option<&str>| v.map(str::to_string);
    ObjectHeaders {
        content_type: s(out.content_type()),
        cache_control: s(out.cache_control()),
        content_disposition: s(out.content_disposition()),
        content_encoding: s(out.content_encoding()),
        content_language: s(out.content_language()),
        expires: s(out.expires_string()),
        storage_class: out
            .storage_class()
            .map(|c| c.as_str().to_string())
            .filter(|c| c != "STANDARD"),
        sse: out.server_side_encryption().map(|e| e.as_str().to_string()),
        sse_kms_key_id: s(out.ssekms_key_id()),
        sse_c: out.sse_customer_algorithm().is_some(),
        restore: s(out.restore()),
        lock_mode: out.object_lock_mode().map(|m| m.as_str().to_string()),
        lock_retain_until: out
            .object_lock_retain_until_date()
            .and_then(|t| t.fmt(DateTimeFormat::DateTime).ok()),
        legal_hold: out
            .object_lock_legal_hold_status()
            .map(|h| h.as_str().to_string()),
        tag_count: out.tag_count().unwrap_or(0).max(0) as u32,
    }
}

/// A body ready to send, with its checksum headers (`S3Store::ready`).
struct Ready {
    body: PutBody,
    /// Content-MD5 (base64), when asked for.
    md5: Option<String>,
    /// `x-amz-checksum-crc32c` (base64 of the big-endian value).
    crc32c: String,
    /// The same CRC32C, for `Part`/`PutResult::sent_crc32c`.
    sent_crc32c: u32,
}

/// A failed multipart call: as `classify`, except that when it carried
/// CRC32C (`crc`) and the store answers as one that does not take it (501,
/// or a 400 about the request rather than the data: a bad digest is the
/// checksum doing its job), it is `ChecksumRefused`.
fn classify_checksum<E>(
    err: SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
    crc: bool,
) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    if crc && let SdkError::ServiceError(se) = &err {
        let status = se.raw().status().as_u16();
        let code = se.err().code().unwrap_or("");
        let redirect = se.raw().headers().get("x-amz-bucket-region").is_some();
        // A 400 about encryption (an SSE-C key missing) is not about CRC32C.
        let about_sse = mentions_encryption(se.err().message().unwrap_or(""));
        let refused = status == 501
            || (status == 400
                && !redirect
                && !about_sse
                && matches!(
                    code,
                    "" | "InvalidArgument"
                        | "InvalidRequest"
                        | "NotImplemented"
                        | "MalformedXML"
                        | "InvalidPart"
                ));
        if refused {
            return StoreError::ChecksumRefused(
                format!("{status} {code} {}", se.err().message().unwrap_or(""))
                    .trim()
                    .to_string(),
            );
        }
    }
    classify(err)
}

/// Where a mount's credentials come from, in words.
fn credentials_source(s: &S3Settings) -> String {
    if s.static_keys.is_some() {
        "passwd_file".into()
    } else if let Some(p) = &s.profile {
        format!("profile {p:?}")
    } else if std::env::var_os("AWS_ACCESS_KEY_ID").is_some() {
        "the environment (AWS_ACCESS_KEY_ID)".into()
    } else {
        "the default chain (shared profile, SSO, web identity, instance role)".into()
    }
}

/// S3's codes for credentials that expired or never were valid.
const TOKEN_CODES: [&str; 4] = [
    "ExpiredToken",
    "ExpiredTokenException",
    "InvalidToken",
    "TokenRefreshRequired",
];

/// Start of the message of a refusal for expired or invalid credentials.
const CREDENTIALS_REFUSED: &str = "credentials expired or invalid";

/// Everything but unreserved characters and `/` is escaped in a copy source.
pub(super) const KEY_ENCODE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'/')
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// An object's ACL as CopyObject's `x-amz-grant-*` headers: the
/// grantees of each permission (`id="..."`, `uri="..."`).
#[derive(Debug, Default)]
struct Grants {
    full_control: Vec<String>,
    read: Vec<String>,
    read_acp: Vec<String>,
    write_acp: Vec<String>,
}

impl Grants {
    fn header(list: &[String]) -> Option<String> {
        (!list.is_empty()).then(|| list.join(", "))
    }
}

/// Escaped in a tag key or value of `x-amz-tagging` (a query string).
const TAG_ENCODE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Longest error text kept from an error chain.
const ERROR_LINE_MAX_CHARS: usize = 300;

/// An error and its `source()` chain as one line: the messages joined with
/// ": " (a message already contained in the one before it is skipped),
/// whitespace collapsed, at most `ERROR_LINE_MAX_CHARS` characters. The
/// SDK's `DisplayErrorContext` runs to a thousand characters over several
/// lines, which does not belong in a log line or a mount error.
pub(crate) fn error_line(err: &(dyn std::error::Error + 'static)) -> String {
    let line = error_chain(err);
    if line.chars().count() <= ERROR_LINE_MAX_CHARS {
        return line;
    }
    let mut cut: String = line.chars().take(ERROR_LINE_MAX_CHARS - 3).collect();
    cut.push_str("...");
    cut
}

/// `error_line` without the length cap.
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(err);
    while let Some(e) = next {
        let text = e
            .to_string()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        if !text.is_empty() && !parts.last().is_some_and(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = e.source();
    }
    parts.join(": ")
}

/// Classifies any SDK error. The message carries codes, never credentials.
fn classify<E>(err: SdkError<E, aws_sdk_s3::config::http::HttpResponse>) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    match &err {
        SdkError::TimeoutError(_) => StoreError::Transient("request timed out".into()),
        SdkError::DispatchFailure(d) => {
            let detail = error_chain(&err);
            if detail.contains("credentials") {
                StoreError::AccessDenied("no usable credentials found (environment, profile, passwd_file or instance role)".into())
            } else if d.is_timeout() {
                // The connector's timeouts: the connect's, and the read
                // timeout while the request is sent or its answer awaited
                // (a slow server, not only an unreachable one).
                StoreError::Transient("timed out connecting or waiting for the answer".into())
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
                    format!("{status} {}", error_line(&err))
                }
                _ => format!("{status} {code}"),
            };
            let bucket_region = se
                .raw()
                .headers()
                .get("x-amz-bucket-region")
                .map(str::to_string);
            match (status, code) {
                (301 | 400, _) if bucket_region.is_some() => {
                    StoreError::WrongRegion(bucket_region.unwrap_or_default())
                }
                (_, "InvalidObjectState") => StoreError::AccessDenied(ARCHIVED.into()),
                (_, c) if TOKEN_CODES.contains(&c) => {
                    StoreError::AccessDenied(format!("{CREDENTIALS_REFUSED} ({c})"))
                }
                (400, _) if mentions_encryption(&msg) => {
                    StoreError::AccessDenied(super::SSE_C_REFUSED.into())
                }
                (_, "NoSuchKey" | "NoSuchVersion" | "NoSuchUpload") => StoreError::NotFound,
                (_, "NoSuchBucket") => StoreError::NoSuchBucket,
                (_, "BucketNotEmpty") => StoreError::BucketNotEmpty,
                (_, "BucketAlreadyExists" | "BucketAlreadyOwnedByYou") => StoreError::AlreadyExists,
                (404, _) => StoreError::NotFound,
                (_, "AccessDenied" | "InvalidAccessKeyId" | "SignatureDoesNotMatch")
                | (401 | 403, _) => StoreError::AccessDenied(msg),
                (412, _) | (_, "PreconditionFailed") => StoreError::PreconditionFailed,
                (
                    _,
                    "KeyTooLongError" | "InvalidArgument" | "InvalidRequest" | "InvalidBucketName",
                ) => StoreError::InvalidRequest(msg),
                (408 | 429, _)
                | (500..=599, _)
                | (
                    _,
                    "SlowDown"
                    | "RequestTimeout"
                    | "InternalError"
                    | "ServiceUnavailable"
                    | "Throttling"
                    | "ThrottlingException"
                    | "RequestTimeTooSkewed",
                ) => StoreError::Transient(msg),
                _ => StoreError::Other(msg),
            }
        }
        _ => StoreError::Other(error_line(&err)),
    }
}

/// A read of a GLACIER or DEEP_ARCHIVE object not restored.
const ARCHIVED: &str = "archived: restore it first (the object is in GLACIER or DEEP_ARCHIVE)";

/// S3 refusing a read of an SSE-C object without its key: 400
/// InvalidRequest "The object was stored using a form of Server Side
/// Encryption...".
fn mentions_encryption(msg: &str) -> bool {
    let m = msg.to_ascii_lowercase();
    m.contains("server side encryption")
        || m.contains("sse-c")
        || m.contains("customer key")
        // Garage: without a key, and with another key than the object's.
        || m.contains("object is encrypted")
        || m.contains("invalid encryption key")
}

/// A HEAD error: as `classify`, except that a bare 400 (a HEAD answer
/// has no body to say more) is what S3 answers to a HEAD of an SSE-C
/// object without its key.
fn classify_head(
    err: SdkError<HeadObjectError, aws_sdk_s3::config::http::HttpResponse>,
) -> StoreError {
    if let SdkError::ServiceError(se) = &err
        && se.raw().status().as_u16() == 400
        && matches!(se.err().code(), None | Some("BadRequest"))
    {
        return StoreError::AccessDenied(super::SSE_C_REFUSED.into());
    }
    classify(err)
}

/// Which error a request gets that S3 refused with the mount's SSE-C key
/// (400: the key does not apply, the object is not SSE-C) and that was
/// sent again without it (`plain`): the second answer's own, so a
/// throttled, dropped or stale retry is retried or reported as what it
/// is, not as the first 400 (which made a passing 503 a permanent
/// EINVAL). When the second is a 400 too, the first says more: the key
/// was given and did not fit.
fn unkeyed_error<E>(
    keyed: SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
    plain: SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> SdkError<E, aws_sdk_s3::config::http::HttpResponse> {
    if status_of(&plain) == Some(400) {
        keyed
    } else {
        plain
    }
}

/// The HTTP status of a failed call, when there was an answer.
fn status_of<E>(err: &SdkError<E, aws_sdk_s3::config::http::HttpResponse>) -> Option<u16> {
    err.raw_response().map(|r| r.status().as_u16())
}

fn to_system_time(t: Option<&DateTime>) -> std::time::SystemTime {
    t.and_then(|t| std::time::SystemTime::try_from(*t).ok())
        .unwrap_or(std::time::UNIX_EPOCH)
}

async fn byte_stream(body: &PutBody) -> StoreResult<ByteStream> {
    match body {
        PutBody::Bytes(b) => Ok(ByteStream::from(b.clone())),
        // The descriptor's /proc link opens the same file even when its
        // name is gone (a removed cache directory).
        PutBody::File { file, offset, len } => ByteStream::read_from()
            .path(format!(
                "/proc/self/fd/{}",
                std::os::fd::AsRawFd::as_raw_fd(&**file)
            ))
            .offset(*offset)
            .length(Length::Exact(*len))
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

/// The wait before retry `n` (0-based): exponential from 200 ms, capped
/// at 5 s, half of it fixed and half random ("equal jitter"), so clients
/// throttled together spread out yet each keeps backing off.
fn backoff(n: u32) -> Duration {
    let full_ms = (200u64 << n.min(5)).min(5_000);
    let half = full_ms / 2;
    Duration::from_millis(half + u64::from(rand_jitter()) % (half + 1))
}

impl S3Store {
    /// Runs `attempt` until it succeeds, fails for good, or the retry
    /// budget (count and time) is spent. Every attempt is counted.
    async fn retry<T, F, Fut>(&self, op: Op, key: &str, mut attempt: F) -> StoreResult<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = StoreResult<T>>,
    {
        let start = Instant::now();
        let mut n = 0;
        loop {
            self.counters.record(op);
            match attempt().await {
                Err(e) if e.is_transient() && n + 1 < self.max_attempts => {
                    let wait = backoff(n);
                    if start.elapsed() + wait > self.retry_time {
                        return Err(e);
                    }
                    n += 1;
                    debug!(op = op.name(), key, attempt = n, error = %e, "retrying");
                    tokio::time::sleep(wait).await;
                }
                // Expired credentials name where they came from.
                Err(StoreError::AccessDenied(m)) if m.starts_with(CREDENTIALS_REFUSED) => {
                    return Err(StoreError::AccessDenied(format!(
                        "{m} (from {}): renew them",
                        self.credentials_source
                    )));
                }
                other => return other,
            }
        }
    }

    /// Per-call config for the calls S3 may take minutes to answer.
    fn long_call(&self) -> aws_sdk_s3::config::Builder {
        aws_sdk_s3::config::Builder::default().timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(self.attempt_timeout)
                .read_timeout(self.long_timeout)
                .build(),
        )
    }

    /// Counts the bytes of a request that sends `body`; its length.
    fn count_body(&self, body: &PutBody) -> i64 {
        let len = body.len();
        self.counters.add_sent(len);
        len as i64
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

    /// One GET of `range`, its body handed to `on_chunk` as it arrives.
    /// A body that stalls or comes short is an error (transient).
    async fn get_body_once(
        &self,
        key: &str,
        range: Range<u64>,
        pin: &ReadPin,
        on_chunk: &mut (dyn FnMut(Bytes) + Send),
    ) -> StoreResult<()> {
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
        let keyed = with_sse_c!(req.clone(), &self.requests);
        let sent = match keyed.send().await {
            // Not an SSE-C object: read without the key (see head_object).
            Err(e) if self.requests.sse_c.is_some() && status_of(&e) == Some(400) => {
                req.send().await.map_err(|p| unkeyed_error(e, p))
            }
            r => r,
        };
        let out = match sent {
            Ok(out) => out,
            // A range starting at or past the end of the object.
            Err(SdkError::ServiceError(se)) if se.raw().status().as_u16() == 416 => {
                return Ok(());
            }
            Err(e) => return Err(classify(e)),
        };
        // The answer must be the range: a 206 from its start (a 200 is the
        // whole object, only the range when that starts at 0), never more.
        let from = out.content_range().map_or(Some(0), range_start);
        let expected = out.content_length().and_then(|l| u64::try_from(l).ok());
        let max = range.end - range.start;
        if from != Some(range.start) || expected.is_some_and(|l| l > max) {
            return Err(range_ignored());
        }
        read_body(out.body, self.attempt_timeout, expected, max, &mut |c| {
            self.counters.add_received(c.len() as u64);
            on_chunk(c);
        })
        .await
    }
}

/// Where the bytes of a `Content-Range: bytes A-B/N` start (A).
pub(super) fn range_start(content_range: &str) -> Option<u64> {
    let (from, _) = content_range.strip_prefix("bytes ")?.split_once('-')?;
    from.parse().ok()
}

/// An answer that is not the range asked for (a 200 of the whole
/// object, a 206 of other bytes): an error, never data.
pub(super) fn range_ignored() -> StoreError {
    StoreError::Other("the store answered a ranged GET with other bytes than asked for".into())
}

/// Reads a GET's `body` to its end, handing each chunk to `on_chunk`: an
/// error (worth retrying) when a chunk does not come within `stall` of
/// the last (a stalled body is cut), when the body breaks off, and when
/// it is not `expected` bytes long (when said) or is longer than `max`.
/// A body cut short is never served as data.
pub(super) async fn read_body(
    mut body: ByteStream,
    stall: Duration,
    expected: Option<u64>,
    max: u64,
    on_chunk: &mut (dyn FnMut(Bytes) + Send),
) -> StoreResult<()> {
    let mut got = 0u64;
    loop {
        match tokio::time::timeout(stall, body.next()).await {
            Err(_) => return Err(StoreError::Transient("GET body stalled".into())),
            Ok(None) => break,
            Ok(Some(Ok(chunk))) => {
                got += chunk.len() as u64;
                on_chunk(chunk);
            }
            Ok(Some(Err(e))) => {
                return Err(StoreError::Transient(format!("reading body: {e}")));
            }
        }
    }
    match expected {
        Some(e) if got != e => Err(StoreError::Transient(format!(
            "body cut short: {got} of {e} bytes"
        ))),
        _ if got > max => Err(StoreError::Transient(format!(
            "body longer than the range: {got} of {max} bytes"
        ))),
        _ => Ok(()),
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
        let req = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(prefix)
            .set_delimiter(delimiter.map(str::to_string))
            .set_continuation_token(token)
            .set_max_keys(max_keys)
            // Keys come URL-encoded: XML 1.0 cannot carry control characters.
            .encoding_type(EncodingType::Url);
        let out = self
            .retry(Op::List, prefix, || async {
                req.clone().send().await.map_err(classify)
            })
            .await?;
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
                headers: None,
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
        if let Some(fast) = &self.fast_head {
            // Otherwise asked again through the SDK, which retries,
            // classifies and counts its own requests.
            match fast.head(key, version).await {
                Fast::Answer(answer) => {
                    self.counters.record(Op::Head);
                    return answer;
                }
                Fast::AskSdk { sent: true } => self.counters.record(Op::Head),
                Fast::AskSdk { sent: false } => {}
            }
        }
        let out = self.head_object(key, version).await?;
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
            headers: Some(Box::new(headers_of(&out))),
        })
    }

    async fn get_range(&self, key: &str, range: Range<u64>, pin: &ReadPin) -> StoreResult<Bytes> {
        if range.is_empty() {
            return Ok(Bytes::new());
        }
        // A body that breaks off, stalls or comes short is retried like a
        // failed request, never served.
        self.retry(Op::Get, key, || async {
            // Otherwise asked again through the SDK, in this attempt: a
            // second request, counted (`retry` counts the first).
            let received = |n| self.counters.add_received(n);
            if let Some(fast) = &self.fast_head {
                match fast
                    .get(key, range.clone(), pin, self.attempt_timeout, &received)
                    .await
                {
                    Fast::Answer(got) => return got,
                    Fast::AskSdk { sent: true } => self.counters.record(Op::Get),
                    Fast::AskSdk { sent: false } => {}
                }
            }
            let mut buf = bytes::BytesMut::with_capacity((range.end - range.start) as usize);
            self.get_body_once(key, range.clone(), pin, &mut |c| buf.extend_from_slice(&c))
                .await?;
            Ok(buf.freeze())
        })
        .await
    }

    async fn get_range_pieces(
        &self,
        key: &str,
        range: Range<u64>,
        pin: &ReadPin,
        piece: u64,
        sink: &mut (dyn FnMut(Bytes) + Send),
    ) -> StoreResult<()> {
        // Bytes handed on so far: a retry asks only for the rest (a piece
        // is handed on whole, so what a broken body left half is fetched
        // again).
        let done = parking_lot::Mutex::new((0u64, sink));
        let len = range.end - range.start;
        self.retry(Op::Get, key, || async {
            let from = range.start + done.lock().0;
            if from >= range.end {
                return Ok(());
            }
            // Each piece is read into a buffer of its own size: one copy,
            // aligned for the cache disk.
            let mut buf: Option<super::PieceBuf> = None;
            self.get_body_once(key, from..range.end, pin, &mut |c| {
                let mut d = done.lock();
                let mut c = &c[..];
                while !c.is_empty() {
                    let want = piece.min(len - d.0) as usize;
                    if want == 0 {
                        break; // more than asked for
                    }
                    let b = buf.get_or_insert_with(|| super::PieceBuf::new(want));
                    c = &c[b.fill(c)..];
                    if b.room() == 0 {
                        let p = buf.take().expect("filled").freeze();
                        d.0 += want as u64;
                        (d.1)(p);
                    }
                }
            })
            .await
        })
        .await
    }

    async fn put(
        &self,
        key: &str,
        body: PutBody,
        meta: &Metadata,
        keep: Option<&ObjectHeaders>,
    ) -> StoreResult<PutResult> {
        let len = self.count_body(&body);
        // What the replaced object had is asked while the body is hashed.
        let (ready, tags, grants) = tokio::join!(
            self.ready(&body, true),
            self.tags_to_keep(key, keep),
            self.grants_replaced(key, keep),
        );
        let ready = ready?;
        let md5 = ready.md5.clone().unwrap_or_default();
        let opts = self.options_keeping(keep);
        let headers = Self::standard_headers(key, keep);
        let out = self
            .retry(Op::Put, key, || async {
                let stream = byte_stream(&ready.body).await?;
                let req = self
                    .client
                    .put_object()
                    .bucket(&self.bucket)
                    .key(key)
                    .content_length(len)
                    .content_md5(&md5)
                    .checksum_crc32_c(&ready.crc32c)
                    .set_metadata(Some(meta.clone()))
                    .set_tagging(tags.clone())
                    .body(stream);
                let req = with_grants!(req, grants.as_ref());
                let req = with_standard_headers!(req, &headers);
                // The body is covered by its Content-MD5 and CRC32C, which
                // are signed: hashing it for SigV4 too would cost a SHA-256
                // pass over every byte sent from memory.
                with_new_object!(req, &opts)
                    .customize()
                    .disable_payload_signing()
                    .send()
                    .await
                    .map_err(classify)
            })
            .await?;
        Ok(PutResult {
            etag: out.e_tag().unwrap_or_default().to_string(),
            version_id: out.version_id().map(str::to_string),
            sent_crc32c: Some(ready.sent_crc32c),
        })
    }

    async fn copy(
        &self,
        src: &str,
        dst: &str,
        meta: Option<&Metadata>,
        src_version: Option<&str>,
    ) -> StoreResult<PutResult> {
        // CopyObject keeps none of the source's storage class, encryption
        // or ACL, and with new metadata (REPLACE) none of its headers: they
        // are read first and sent again.
        let source = self.head_object(src, src_version).await?;
        let kept = headers_of(&source);
        let opts = self.options_keeping(Some(&kept));
        let req = self
            .client
            .copy_object()
            .bucket(&self.bucket)
            .key(dst)
            .copy_source(self.copy_source(src, src_version))
            .tagging_directive(TaggingDirective::Copy);
        let mut req = with_new_object!(req, &opts);
        req = with_copy_source_sse_c!(req, self.requests.sse_c.as_ref().filter(|_| kept.sse_c));
        let grants = self.grants_to_keep(src, src_version).await;
        req = with_grants!(req, grants.as_ref());
        if let Some(m) = meta {
            let merged = super::merge_metadata(&source.metadata().cloned().unwrap_or_default(), m);
            req = with_standard_headers!(req, &kept)
                .metadata_directive(MetadataDirective::Replace)
                .set_metadata(Some(merged));
        }
        let out = self
            .retry(Op::Copy, dst, || async {
                req.clone()
                    .customize()
                    .config_override(self.long_call())
                    .send()
                    .await
                    .map_err(classify)
            })
            .await?;
        Ok(PutResult {
            etag: out
                .copy_object_result()
                .and_then(|r| r.e_tag())
                .unwrap_or_default()
                .to_string(),
            version_id: out.version_id().map(str::to_string),
            sent_crc32c: None,
        })
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        let req = self.client.delete_object().bucket(&self.bucket).key(key);
        self.retry(Op::Delete, key, || async {
            req.clone().send().await.map_err(classify)
        })
        .await?;
        Ok(())
    }

    async fn create_multipart(
        &self,
        key: &str,
        meta: &Metadata,
        keep: Option<&ObjectHeaders>,
    ) -> StoreResult<Upload> {
        let (tags, grants) = tokio::join!(
            self.tags_to_keep(key, keep),
            self.grants_replaced(key, keep)
        );
        let req = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .set_metadata(Some(meta.clone()))
            .set_tagging(tags);
        let req = with_grants!(req, grants.as_ref());
        let req = with_standard_headers!(req, &Self::standard_headers(key, keep));
        let req = with_new_object!(req, &self.options_keeping(keep));
        let upload = |out: CreateMultipartUploadOutput, crc32c: bool| {
            out.upload_id()
                .map(|id| Upload {
                    id: id.to_string(),
                    crc32c,
                })
                .ok_or_else(|| StoreError::Other("no upload id returned".into()))
        };
        let plain = || async {
            self.retry(Op::CreateMultipart, key, || async {
                req.clone().send().await.map_err(classify)
            })
            .await
        };
        if self.no_part_checksums.load(Ordering::Relaxed) {
            return upload(plain().await?, false);
        }
        let with_crc = req.clone().checksum_algorithm(ChecksumAlgorithm::Crc32C);
        match self
            .retry(Op::CreateMultipart, key, || async {
                with_crc
                    .clone()
                    .send()
                    .await
                    .map_err(|e| classify_checksum(e, true))
            })
            .await
        {
            Ok(out) => upload(out, true),
            // Refused with CRC32C: if the store takes it without, that
            // was the reason.
            Err(StoreError::ChecksumRefused(why)) => {
                let out = plain().await?;
                self.refuse_part_checksums(&why);
                upload(out, false)
            }
            Err(e) => Err(e),
        }
    }

    async fn upload_part(
        &self,
        key: &str,
        upload: &Upload,
        part_number: i32,
        body: PutBody,
    ) -> StoreResult<Part> {
        let len = self.count_body(&body);
        // An upload declared with CRC32C takes each part's CRC32C (and,
        // with `x-amz-sdk-checksum-algorithm`, an Object Lock bucket needs
        // no Content-MD5); one without gets Content-MD5.
        let ready = self.ready(&body, !upload.crc32c).await?;
        let crc = upload.crc32c.then(|| ready.crc32c.clone());
        let out = self
            .retry(Op::UploadPart, key, || async {
                let stream = byte_stream(&ready.body).await?;
                let req = self
                    .client
                    .upload_part()
                    .bucket(&self.bucket)
                    .key(key)
                    .upload_id(&upload.id)
                    .part_number(part_number)
                    .content_length(len)
                    .set_content_md5(ready.md5.clone())
                    .set_checksum_algorithm(crc.as_ref().map(|_| ChecksumAlgorithm::Crc32C))
                    .set_checksum_crc32_c(crc.clone())
                    .body(stream);
                // Unsigned as a PUT's (see `put`).
                with_sse_c!(req, &self.requests)
                    .customize()
                    .disable_payload_signing()
                    .send()
                    .await
                    .map_err(|e| classify_checksum(e, upload.crc32c))
            })
            .await
            .inspect_err(|e| {
                if let StoreError::ChecksumRefused(why) = e {
                    self.refuse_part_checksums(why);
                }
            })?;
        Ok(Part {
            number: part_number,
            etag: out.e_tag().unwrap_or_default().to_string(),
            crc32c: crc,
            sent_crc32c: Some(ready.sent_crc32c),
        })
    }

    async fn upload_part_copy(
        &self,
        key: &str,
        upload: &Upload,
        part_number: i32,
        src: &str,
        range: Range<u64>,
        src_etag: Option<&str>,
    ) -> StoreResult<Part> {
        let req = self
            .client
            .upload_part_copy()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(&upload.id)
            .part_number(part_number)
            .copy_source(self.copy_source(src, None))
            .copy_source_range(format!("bytes={}-{}", range.start, range.end - 1))
            .set_copy_source_if_match(src_etag.map(str::to_string));
        let req = with_sse_c!(req, &self.requests);
        // The base is SSE-C encrypted unless S3 says the key does not
        // apply to it (400): then it is copied without the source key.
        let keyed = with_copy_source_sse_c!(req.clone(), self.requests.sse_c.as_ref());
        let out = self
            .retry(Op::UploadPartCopy, key, || async {
                let sent = keyed
                    .clone()
                    .customize()
                    .config_override(self.long_call())
                    .send()
                    .await;
                match sent {
                    Err(e) if self.requests.sse_c.is_some() && status_of(&e) == Some(400) => req
                        .clone()
                        .customize()
                        .config_override(self.long_call())
                        .send()
                        .await
                        .map_err(|p| classify(unkeyed_error(e, p))),
                    r => r.map_err(classify),
                }
            })
            .await?;
        let result = out.copy_part_result();
        Ok(Part {
            number: part_number,
            etag: result
                .and_then(|r| r.e_tag())
                .unwrap_or_default()
                .to_string(),
            // S3 computes a copied part's checksum and says it; a store
            // that does not (Garage, moto) takes the part without one.
            crc32c: result
                .and_then(|r| r.checksum_crc32_c())
                .filter(|_| upload.crc32c)
                .map(str::to_string),
            sent_crc32c: None,
        })
    }

    async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: Vec<Part>,
    ) -> StoreResult<PutResult> {
        let crc = parts.iter().any(|p| p.crc32c.is_some());
        let parts: Vec<CompletedPart> = parts
            .into_iter()
            .map(|p| {
                CompletedPart::builder()
                    .part_number(p.number)
                    .e_tag(p.etag)
                    .set_checksum_crc32_c(p.crc32c)
                    .build()
            })
            .collect();
        let req = self
            .client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            );
        // S3 needs the SSE-C key here when the upload has a checksum
        // algorithm; Garage refuses the Complete without it (400 "Object
        // is encrypted"), which read as a store refusing CRC32C: the
        // whole upload was sent again, and CRC32C dropped for the mount.
        let req = with_sse_c!(req, &self.requests);
        // A 200 answer whose body is an error is an error (the SDK parses
        // it as one); an answer without an ETag is not a success either.
        let out = self
            .retry(Op::CompleteMultipart, key, || async {
                req.clone()
                    .customize()
                    .config_override(self.long_call())
                    .send()
                    .await
                    .map_err(|e| classify_checksum(e, crc))
            })
            .await
            .inspect_err(|e| {
                if let StoreError::ChecksumRefused(why) = e {
                    self.refuse_part_checksums(why);
                }
            })?;
        let etag = out
            .e_tag()
            .filter(|e| !e.is_empty())
            .ok_or_else(|| StoreError::Transient("CompleteMultipartUpload: no ETag".into()))?;
        Ok(PutResult {
            etag: etag.to_string(),
            version_id: out.version_id().map(str::to_string),
            sent_crc32c: None,
        })
    }

    async fn abort_multipart(&self, key: &str, upload_id: &str) -> StoreResult<()> {
        let req = self
            .client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id);
        self.retry(Op::AbortMultipart, key, || async {
            req.clone().send().await.map_err(classify)
        })
        .await?;
        Ok(())
    }

    async fn list_uploads(&self, key: &str) -> StoreResult<Vec<(String, std::time::SystemTime)>> {
        let req = self
            .client
            .list_multipart_uploads()
            .bucket(&self.bucket)
            .prefix(key);
        let out = self
            .retry(Op::ListUploads, key, || async {
                req.clone().send().await.map_err(classify)
            })
            .await?;
        Ok(out
            .uploads()
            .iter()
            .filter(|u| u.key() == Some(key))
            .filter_map(|u| Some((u.upload_id()?.to_string(), to_system_time(u.initiated()))))
            .collect())
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
        let (key_marker, version_marker) = marker.clone().unzip();
        let req = self
            .client
            .list_object_versions()
            .bucket(&self.bucket)
            .prefix(prefix)
            .set_delimiter(delimiter.map(str::to_string))
            .set_key_marker(key_marker)
            .set_version_id_marker(version_marker.filter(|v| !v.is_empty()));
        let out = match self
            .retry(Op::ListVersions, prefix, || async {
                match req.clone().send().await {
                    Ok(out) => Ok(Some(out)),
                    // A store without versions (Garage...): every object
                    // is its one version, "null".
                    Err(SdkError::ServiceError(se)) if se.raw().status().as_u16() == 501 => {
                        Ok(None)
                    }
                    Err(e) => Err(classify(e)),
                }
            })
            .await?
        {
            Some(out) => out,
            None => {
                debug!(
                    "the store has no ListObjectVersions; showing current objects as version null"
                );
                self.no_versions_api.store(true, Ordering::Relaxed);
                return self.versions_from_listing(prefix, delimiter, marker).await;
            }
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

    async fn presign_get(
        &self,
        key: &str,
        version: Option<&str>,
        expires: Duration,
    ) -> StoreResult<String> {
        let config = aws_sdk_s3::presigning::PresigningConfig::expires_in(expires)
            .map_err(|e| StoreError::InvalidRequest(format!("expiry: {e}")))?;
        let mut req = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .set_version_id(version.map(str::to_string))
            .customize();
        if self.requests.requester_pays {
            // In the signed query, not as a header the fetcher would have
            // to send (S3 takes either). Whichever of this and the
            // client's RequesterPays interceptor runs first, the header
            // ends up gone and the query parameter there.
            req = req.mutate_request(|r| {
                r.headers_mut().remove(REQUEST_PAYER);
                if !r.uri().contains(REQUEST_PAYER_QUERY) {
                    let sep = if r.uri().contains('?') { '&' } else { '?' };
                    let uri = format!("{}{sep}{REQUEST_PAYER_QUERY}", r.uri());
                    let _ = r.set_uri(uri);
                }
            });
        }
        let signed = req
            .presigned(config)
            .await
            .map_err(|e| StoreError::Other(error_line(&e)))?;
        Ok(signed.uri().to_string())
    }

    async fn check_bucket(&self) -> StoreResult<()> {
        // ListObjectsV2 rather than HeadBucket: its errors carry a code
        // (NoSuchBucket vs AccessDenied), and it is what a mount needs anyway.
        let req = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .max_keys(1);
        self.retry(Op::HeadBucket, "", || async {
            req.clone().send().await.map_err(classify)
        })
        .await?;
        Ok(())
    }

    fn counters(&self) -> &Counters {
        &self.counters
    }
}

/// Every bucket of an account, for `s3://` mounts: ListBuckets,
/// CreateBucket (in the mount's region) and DeleteBucket, and an
/// `S3Store` per bucket, in whatever region the bucket is.
#[derive(Debug)]
pub struct S3Account {
    /// Signs the account-level calls, in the mount's region.
    base: S3Store,
    settings: S3Settings,
    sdk: aws_config::SdkConfig,
    region: String,
    /// Each bucket's region, as ListBuckets or a redirect told it.
    regions: parking_lot::Mutex<std::collections::HashMap<String, String>>,
}

impl S3Account {
    pub async fn connect(s: &S3Settings) -> S3Account {
        let (sdk, region, _) = load_sdk(s).await;
        let settings = S3Settings {
            bucket: String::new(),
            ..s.clone()
        };
        S3Account {
            base: S3Store::with_region(
                &settings,
                &sdk,
                &region,
                super::SendMemory::new(s.send_memory),
            ),
            settings,
            sdk,
            region,
            regions: Default::default(),
        }
    }

    /// The access key id the account's requests are signed with.
    pub async fn access_key_id(&self) -> Option<String> {
        self.base.access_key_id().await
    }

    /// The store of `bucket` in `region`.
    fn store_in(&self, bucket: &str, region: &str) -> S3Store {
        let s = S3Settings {
            bucket: bucket.to_string(),
            ..self.settings.clone()
        };
        S3Store::with_region(&s, &self.sdk, region, self.base.send_memory.clone())
    }

    /// The region `bucket` is known to be in, else the mount's.
    fn region_of(&self, bucket: &str) -> String {
        self.regions
            .lock()
            .get(bucket)
            .cloned()
            .unwrap_or_else(|| self.region.clone())
    }
}

#[async_trait]
impl super::Account for S3Account {
    async fn list_buckets(&self) -> StoreResult<Vec<String>> {
        let mut names = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let req = self
                .base
                .client
                .list_buckets()
                .set_continuation_token(token.clone());
            let out = self
                .base
                .retry(Op::ListBuckets, "", || async {
                    req.clone().send().await.map_err(classify)
                })
                .await?;
            let mut regions = self.regions.lock();
            for b in out.buckets() {
                let Some(name) = b.name() else { continue };
                if let Some(r) = b.bucket_region().filter(|r| !r.is_empty()) {
                    regions.insert(name.to_string(), r.to_string());
                }
                names.push(name.to_string());
            }
            drop(regions);
            token = out
                .continuation_token()
                .filter(|t| !t.is_empty())
                .map(str::to_string);
            if token.is_none() {
                break;
            }
        }
        names.sort();
        names.dedup();
        Ok(names)
    }

    async fn create_bucket(&self, name: &str) -> StoreResult<()> {
        use aws_sdk_s3::types::{BucketLocationConstraint, CreateBucketConfiguration};
        let mut req = self.base.client.create_bucket().bucket(name);
        // us-east-1 is the one region S3 refuses as a location constraint.
        if self.region != DEFAULT_REGION {
            req = req.create_bucket_configuration(
                CreateBucketConfiguration::builder()
                    .location_constraint(BucketLocationConstraint::from(self.region.as_str()))
                    .build(),
            );
        }
        self.base
            .retry(Op::CreateBucket, name, || async {
                req.clone().send().await.map_err(classify)
            })
            .await?;
        self.regions
            .lock()
            .insert(name.to_string(), self.region.clone());
        Ok(())
    }

    async fn delete_bucket(&self, name: &str) -> StoreResult<()> {
        let delete = |store: S3Store| async move {
            let req = store.client.delete_bucket().bucket(name);
            store
                .retry(Op::DeleteBucket, name, || async {
                    req.clone().send().await.map_err(classify)
                })
                .await
                .map(|_| ())
        };
        let r = match delete(self.store_in(name, &self.region_of(name))).await {
            Err(StoreError::WrongRegion(r)) if !r.is_empty() => {
                delete(self.store_in(name, &r)).await
            }
            r => r,
        };
        // Counted with the account's requests.
        self.base.counters.record(Op::DeleteBucket);
        r?;
        self.regions.lock().remove(name);
        Ok(())
    }

    async fn open_bucket(&self, name: &str) -> StoreResult<Arc<dyn ObjectStore>> {
        let store = self.store_in(name, &self.region_of(name));
        match store.check_bucket().await {
            Ok(()) => Ok(Arc::new(store)),
            // Each bucket is followed to its region, whatever region the
            // mount was given (that one is where mkdir creates buckets).
            Err(StoreError::WrongRegion(r)) if !r.is_empty() => {
                debug!(bucket = name, region = %r, "bucket region followed");
                let store = self.store_in(name, &r);
                store.check_bucket().await?;
                self.regions.lock().insert(name.to_string(), r);
                Ok(Arc::new(store))
            }
            Err(e) => Err(e),
        }
    }

    fn counters(&self) -> &Counters {
        &self.base.counters
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Chain(&'static str, Option<Box<Chain>>);

    impl std::fmt::Display for Chain {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Chain {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|c| c as _)
        }
    }

    #[test]
    fn sse_c_key_files_raw_base64_or_s3fs_lines() {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD;
        let key: Vec<u8> = (100u8..132).collect();
        let want = SseCKey::from_file_bytes(&key).unwrap();
        let same = |data: Vec<u8>| {
            let k = SseCKey::from_file_bytes(&data).unwrap();
            assert_eq!(
                (k.key_b64, k.md5_b64),
                (want.key_b64.clone(), want.md5_b64.clone())
            );
        };
        same(b64.encode(&key).into_bytes());
        same(format!("{}\n", b64.encode(&key)).into_bytes());
        // s3fs's key history: the first line is used.
        same(format!("\n{}\n{}\n", b64.encode(&key), b64.encode([7u8; 32])).into_bytes());
        let mut raw_line = key.clone();
        raw_line.extend_from_slice(b"\nsecond-key-line-of-32-bytes-xxxx\n");
        same(raw_line);
        for bad in [&b""[..], b"short", b"c2hvcnQ="] {
            let e = SseCKey::from_file_bytes(bad).unwrap_err();
            assert!(!e.contains("short"), "the contents never show: {e}");
        }
        assert_eq!(format!("{want:?}"), "SseCKey(..)");
    }

    #[test]
    fn an_error_chain_is_one_short_line() {
        let e = Chain(
            "dispatch failure",
            Some(Box::new(Chain(
                "io error:\n  connection refused",
                Some(Box::new(Chain("connection refused", None))),
            ))),
        );
        assert_eq!(
            error_line(&e),
            "dispatch failure: io error: connection refused"
        );
        let long: &'static str = Box::leak("x ".repeat(400).into_boxed_str());
        let e = Chain("outer", Some(Box::new(Chain(long, None))));
        let line = error_line(&e);
        assert_eq!(line.chars().count(), ERROR_LINE_MAX_CHARS);
        assert!(line.ends_with("...") && !line.contains('\n'));
    }
}
