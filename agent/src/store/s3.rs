//! The S3-compatible bucket, configured for Cloudflare R2.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_s3::config::interceptors::BeforeDeserializationInterceptorContextRef;
use aws_sdk_s3::config::{
    BehaviorVersion, ConfigBag, Credentials, Intercept, Region, RequestChecksumCalculation,
    ResponseChecksumValidation, RuntimeComponents, StalledStreamProtectionConfig,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart as SdkCompletedPart};
use aws_sdk_s3::Client;
use aws_smithy_runtime_api::client::interceptors::context::InterceptorContext;
use aws_smithy_runtime_api::client::retries::classifiers::{
    ClassifyRetry, RetryAction, RetryClassifierPriority,
};
use aws_smithy_types::retry::RetryConfig;
use aws_smithy_types::timeout::TimeoutConfig;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::StreamExt;

use super::{
    BodyStream, CompletedPart, FailureKind, Object, ObjectInfo, ObjectStore, PendingUpload,
    StoreError, WriteCondition,
};
use crate::config::S3Config;

/// A bucket reached through the AWS SDK with R2's restrictions applied.
pub struct S3Store {
    client: Client,
    bucket: String,
    endpoint: String,
    clock: ServerClock,
}

/// Records how far the bucket's clock (the `Date` header of the last
/// response) is ahead of this host's.
#[derive(Clone, Debug, Default)]
struct ServerClock {
    offset: Arc<Mutex<Option<chrono::Duration>>>,
}

impl Intercept for ServerClock {
    fn name(&self) -> &'static str {
        "ServerClock"
    }

    fn read_after_transmit(
        &self,
        context: &BeforeDeserializationInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), aws_smithy_runtime_api::box_error::BoxError> {
        let server_time = context
            .response()
            .headers()
            .get("date")
            .and_then(|date| DateTime::parse_from_rfc2822(date).ok());
        if let Some(server_time) = server_time {
            let offset = server_time.with_timezone(&Utc) - Utc::now();
            *self.offset.lock().unwrap_or_else(|e| e.into_inner()) = Some(offset);
        }
        Ok(())
    }
}

/// Retries HTTP 429 as throttling. The SDK's own classifiers retry only
/// 500, 502, 503 and 504 by status, and 429 only under the error codes AWS
/// uses, which other S3 implementations need not send.
#[derive(Debug)]
struct TooManyRequestsClassifier;

impl ClassifyRetry for TooManyRequestsClassifier {
    fn classify_retry(&self, context: &InterceptorContext) -> RetryAction {
        match context.response() {
            Some(response) if response.status().as_u16() == 429 => RetryAction::throttling_error(),
            _ => RetryAction::NoActionIndicated,
        }
    }

    fn name(&self) -> &'static str {
        "HTTP 429 Too Many Requests"
    }

    fn priority(&self) -> RetryClassifierPriority {
        RetryClassifierPriority::run_after(RetryClassifierPriority::http_status_code_classifier())
    }
}

impl S3Store {
    /// Builds the client from explicit settings only: no shared config
    /// files, no environment lookups by the SDK and no instance metadata.
    pub fn new(config: &S3Config) -> S3Store {
        let credentials = Credentials::new(
            config.access_key_id.expose(),
            config.secret_access_key.expose(),
            config
                .session_token
                .as_ref()
                .map(|token| token.expose().to_string()),
            None,
            "matrix-agent-environment",
        );
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(config.timeouts.connect)
            .read_timeout(config.timeouts.read)
            .operation_attempt_timeout(config.timeouts.attempt)
            .build();
        let retries = RetryConfig::standard()
            .with_max_attempts(config.timeouts.max_attempts)
            .with_initial_backoff(Duration::from_millis(500))
            .with_max_backoff(Duration::from_secs(20));
        // Part bodies are whole in memory before a request starts, so a
        // pg_dump that pauses on a lock delays the next part but never stalls
        // a request body; stall protection therefore cannot cut a healthy
        // upload, and on downloads it turns a dead connection into a resume.
        let stall = StalledStreamProtectionConfig::enabled()
            .grace_period(config.timeouts.stall_grace)
            .build();
        let clock = ServerClock::default();
        let sdk_config = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(config.region.clone()))
            .endpoint_url(&config.endpoint)
            .force_path_style(true)
            .credentials_provider(credentials)
            // R2 rejects the x-amz-checksum-* and x-amz-trailer headers that
            // the SDK sends by default since early 2025.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .timeout_config(timeouts)
            .retry_config(retries)
            .retry_classifier(TooManyRequestsClassifier)
            .stalled_stream_protection(stall)
            .interceptor(clock.clone())
            .build();
        S3Store {
            client: Client::from_conf(sdk_config),
            bucket: config.bucket.clone(),
            endpoint: config.endpoint.clone(),
            clock,
        }
    }
}

/// Sorts an SDK error into the kinds the protocols decide on.
fn classify<E>(
    error: SdkError<E, aws_smithy_runtime_api::http::Response>,
    operation: &'static str,
    key: &str,
) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let status = error
        .raw_response()
        .map(|response| response.status().as_u16());
    match &error {
        SdkError::ServiceError(context) => {
            let service_error = context.err();
            let status = status.unwrap_or_default();
            let kind = match status {
                404 => FailureKind::NotFound,
                412 => FailureKind::PreconditionFailed,
                401 | 403 => FailureKind::Denied,
                429 | 500..=599 => FailureKind::Server,
                _ => FailureKind::Other,
            };
            // An error response without an S3 error code, such as the
            // bodiless answer to a HEAD, says nothing the status does not;
            // a success that failed to parse keeps the parser's reason.
            let detail = match (service_error.code(), service_error.message()) {
                (Some(code), Some(message)) => format!("HTTP {status} {code}: {message}"),
                (Some(code), None) => format!("HTTP {status} {code}"),
                (None, _) if status >= 300 => format!("HTTP {status}"),
                (None, _) => format!("HTTP {status}: {}", cause_chain(service_error)),
            };
            StoreError::new(kind, operation, key, detail)
        }
        SdkError::TimeoutError(_) => {
            StoreError::new(FailureKind::Timeout, operation, key, cause_chain(&error))
        }
        SdkError::DispatchFailure(failure) => {
            let kind = if failure.is_timeout() {
                FailureKind::Timeout
            } else {
                FailureKind::Network
            };
            StoreError::new(kind, operation, key, cause_chain(&error))
        }
        SdkError::ResponseError(_) => {
            StoreError::new(FailureKind::Network, operation, key, cause_chain(&error))
        }
        _ => StoreError::new(FailureKind::Other, operation, key, cause_chain(&error)),
    }
}

/// Describes an error by its chain of causes, each once, without the
/// Debug dumps that the SDK's `DisplayErrorContext` appends.
fn cause_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut current = Some(error);
    while let Some(error) = current {
        let text = error.to_string();
        if !text.is_empty() && !parts.iter().any(|part| part.contains(&text)) {
            parts.push(text);
        }
        current = error.source();
    }
    truncate(&parts.join(": "), 300)
}

/// Shortens an SDK description, which can quote a whole unparsed response.
fn truncate(text: &str, limit: usize) -> String {
    match text.char_indices().nth(limit) {
        Some((end, _)) => format!("{}...", &text[..end]),
        None => text.to_string(),
    }
}

/// Turns a failure that is a definite not-found into `Ok(None)`.
fn absent_if_not_found<T>(result: Result<T, StoreError>) -> Result<Option<T>, StoreError> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(error) if error.kind == FailureKind::NotFound => Ok(None),
        Err(error) => Err(error),
    }
}

fn to_utc(time: &aws_smithy_types::DateTime) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(time.secs(), time.subsec_nanos())
}

#[async_trait]
impl ObjectStore for S3Store {
    fn describe(&self) -> String {
        format!("bucket {} at {}", self.bucket, self.endpoint)
    }

    fn clock_offset(&self) -> Option<chrono::Duration> {
        *self.clock.offset.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn get(&self, key: &str) -> Result<Option<Object>, StoreError> {
        let result = async {
            let output = self
                .client
                .get_object()
                .bucket(&self.bucket)
                .key(key)
                .send()
                .await
                .map_err(|e| classify(e, "GET", key))?;
            let info = ObjectInfo {
                size: output.content_length().unwrap_or_default().max(0) as u64,
                etag: output.e_tag().map(str::to_string),
                metadata: output.metadata().cloned().unwrap_or_default(),
                parts_count: output.parts_count().map(|n| n.max(0) as u32),
            };
            let body = output
                .body
                .collect()
                .await
                .map_err(|e| StoreError::new(FailureKind::Network, "GET", key, e.to_string()))?
                .into_bytes();
            Ok(Object { body, info })
        }
        .await;
        absent_if_not_found(result)
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, StoreError> {
        let result = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| classify(e, "HEAD", key))
            .map(|output| ObjectInfo {
                size: output.content_length().unwrap_or_default().max(0) as u64,
                etag: output.e_tag().map(str::to_string),
                metadata: output.metadata().cloned().unwrap_or_default(),
                parts_count: output.parts_count().map(|n| n.max(0) as u32),
            });
        absent_if_not_found(result)
    }

    async fn head_part(&self, key: &str, part_number: i32) -> Result<u64, StoreError> {
        let output = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .part_number(part_number)
            .send()
            .await
            .map_err(|e| classify(e, "HEAD part", key))?;
        Ok(output.content_length().unwrap_or_default().max(0) as u64)
    }

    async fn read_from(
        &self,
        key: &str,
        offset: u64,
        expected_etag: Option<&str>,
    ) -> Result<BodyStream, StoreError> {
        let mut request = self.client.get_object().bucket(&self.bucket).key(key);
        if offset > 0 {
            request = request.range(format!("bytes={offset}-"));
        }
        if let Some(etag) = expected_etag {
            request = request.if_match(etag);
        }
        let output = request.send().await.map_err(|e| classify(e, "GET", key))?;
        let key = key.to_string();
        let stream = futures::stream::unfold(Some(output.body), move |body| {
            let key = key.clone();
            async move {
                let mut body: ByteStream = body?;
                match body.next().await {
                    None => None,
                    Some(Ok(chunk)) => Some((Ok(chunk), Some(body))),
                    Some(Err(error)) => Some((
                        Err(StoreError::new(
                            FailureKind::Network,
                            "GET body",
                            &key,
                            cause_chain(&error),
                        )),
                        None,
                    )),
                }
            }
        });
        Ok(stream.boxed())
    }

    async fn put(
        &self,
        key: &str,
        body: Bytes,
        content_type: &str,
        condition: WriteCondition,
    ) -> Result<Option<String>, StoreError> {
        let mut request = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type(content_type)
            .body(ByteStream::from(body));
        request = match condition {
            WriteCondition::Unconditional => request,
            WriteCondition::IfAbsent => request.if_none_match("*"),
            WriteCondition::IfMatch(etag) => request.if_match(etag),
        };
        let output = request.send().await.map_err(|e| classify(e, "PUT", key))?;
        Ok(output.e_tag().map(str::to_string))
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| classify(e, "DELETE", key))?;
        Ok(())
    }

    async fn create_multipart(
        &self,
        key: &str,
        metadata: &HashMap<String, String>,
    ) -> Result<String, StoreError> {
        let output = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .content_type("application/octet-stream")
            .set_metadata(Some(metadata.clone()))
            .send()
            .await
            .map_err(|e| classify(e, "CreateMultipartUpload", key))?;
        output.upload_id().map(str::to_string).ok_or_else(|| {
            StoreError::new(
                FailureKind::Other,
                "CreateMultipartUpload",
                key,
                "the response carried no upload id",
            )
        })
    }

    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        body: Bytes,
    ) -> Result<String, StoreError> {
        let output = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .part_number(number)
            .content_length(body.len() as i64)
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(|e| classify(e, "UploadPart", key))?;
        output.e_tag().map(str::to_string).ok_or_else(|| {
            StoreError::new(
                FailureKind::Other,
                "UploadPart",
                key,
                "the response carried no ETag",
            )
        })
    }

    async fn copy_part(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        source: &str,
        first: u64,
        last: u64,
    ) -> Result<String, StoreError> {
        // Keys are built from [A-Za-z0-9_./-] only, so they need no escaping.
        let output = self
            .client
            .upload_part_copy()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .part_number(number)
            .copy_source(format!("{}/{}", self.bucket, source))
            .copy_source_range(format!("bytes={first}-{last}"))
            .send()
            .await
            .map_err(|e| classify(e, "UploadPartCopy", key))?;
        output
            .copy_part_result()
            .and_then(|result| result.e_tag())
            .map(str::to_string)
            .ok_or_else(|| {
                StoreError::new(
                    FailureKind::Other,
                    "UploadPartCopy",
                    key,
                    "the response carried no ETag",
                )
            })
    }

    async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[CompletedPart],
        condition: WriteCondition,
    ) -> Result<(), StoreError> {
        let parts = parts
            .iter()
            .map(|part| {
                SdkCompletedPart::builder()
                    .part_number(part.number)
                    .e_tag(&part.etag)
                    .build()
            })
            .collect();
        let mut request = self
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
        request = match condition {
            WriteCondition::Unconditional => request,
            WriteCondition::IfAbsent => request.if_none_match("*"),
            WriteCondition::IfMatch(etag) => request.if_match(etag),
        };
        request
            .send()
            .await
            .map_err(|e| classify(e, "CompleteMultipartUpload", key))?;
        Ok(())
    }

    async fn abort_multipart(&self, key: &str, upload_id: &str) -> Result<(), StoreError> {
        let result = self
            .client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .send()
            .await
            .map_err(|e| classify(e, "AbortMultipartUpload", key));
        // An upload that is already gone needs no abort.
        absent_if_not_found(result).map(|_| ())
    }

    async fn list_multipart_uploads(&self, prefix: &str) -> Result<Vec<PendingUpload>, StoreError> {
        let mut uploads = Vec::new();
        let mut key_marker: Option<String> = None;
        let mut upload_id_marker: Option<String> = None;
        loop {
            let output = self
                .client
                .list_multipart_uploads()
                .bucket(&self.bucket)
                .prefix(prefix)
                .set_key_marker(key_marker.take())
                .set_upload_id_marker(upload_id_marker.take())
                .send()
                .await
                .map_err(|e| classify(e, "ListMultipartUploads", prefix))?;
            for upload in output.uploads() {
                if let (Some(key), Some(upload_id)) = (upload.key(), upload.upload_id()) {
                    uploads.push(PendingUpload {
                        key: key.to_string(),
                        upload_id: upload_id.to_string(),
                        initiated: upload.initiated().and_then(to_utc),
                    });
                }
            }
            if output.is_truncated() != Some(true) {
                return Ok(uploads);
            }
            key_marker = output.next_key_marker().map(str::to_string);
            upload_id_marker = output.next_upload_id_marker().map(str::to_string);
            if key_marker.is_none() {
                return Ok(uploads);
            }
        }
    }

    async fn list_keys(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let mut keys = Vec::new();
        let mut continuation: Option<String> = None;
        loop {
            let output = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(prefix)
                .set_continuation_token(continuation.take())
                .send()
                .await
                .map_err(|e| classify(e, "ListObjectsV2", prefix))?;
            keys.extend(
                output
                    .contents()
                    .iter()
                    .filter_map(|object| object.key().map(str::to_string)),
            );
            continuation = output.next_continuation_token().map(str::to_string);
            if output.is_truncated() != Some(true) || continuation.is_none() {
                return Ok(keys);
            }
        }
    }
}
