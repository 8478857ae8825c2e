//! The object store the snapshots live in: an S3-compatible bucket, or a
//! local directory with the same semantics for demos and tests by hand.
//!
//! Callers pass full keys (prefix included). Reads distinguish a definite
//! "not found" (`Ok(None)`) from every other failure, because the restore
//! gate must never mistake an outage for an empty bucket.

mod local;
mod s3;

use std::collections::HashMap;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::Stream;

use crate::config::StoreConfig;

pub use local::LocalStore;
pub use s3::S3Store;

/// What a HEAD or GET returns about an object.
#[derive(Clone, Debug, Default)]
pub struct ObjectInfo {
    pub size: u64,
    pub etag: Option<String>,
    /// User metadata (`x-amz-meta-*`), keys in lower case without the prefix.
    pub metadata: HashMap<String, String>,
    pub parts_count: Option<u32>,
}

/// A small object read whole (pointer, metadata).
#[derive(Clone, Debug)]
pub struct Object {
    pub body: Bytes,
    pub info: ObjectInfo,
}

/// A precondition on a write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WriteCondition {
    /// Write whatever is there.
    Unconditional,
    /// Write only if no object has the key (`If-None-Match: *`).
    IfAbsent,
    /// Write only if the object still has this ETag (`If-Match`).
    IfMatch(String),
}

/// A multipart upload that was started and neither completed nor aborted.
#[derive(Clone, Debug)]
pub struct PendingUpload {
    pub key: String,
    pub upload_id: String,
    pub initiated: Option<DateTime<Utc>>,
}

/// A part as CompleteMultipartUpload needs it.
#[derive(Clone, Debug)]
pub struct CompletedPart {
    pub number: i32,
    pub etag: String,
}

/// A stream of body chunks from a GET.
pub type BodyStream = Pin<Box<dyn Stream<Item = Result<Bytes, StoreError>> + Send>>;

/// Why a store call failed, in the terms the protocols decide on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// The write's precondition did not hold (412).
    PreconditionFailed,
    /// The object or upload does not exist where it had to.
    NotFound,
    /// The credentials were refused (401/403).
    Denied,
    /// Connection refused, reset or broken before a response.
    Network,
    /// No response in time.
    Timeout,
    /// The server failed (5xx) or asked to slow down (429/503).
    Server,
    /// Anything else, including requests the server rejects as invalid.
    Other,
}

/// A failed store call: which operation, on which key, and why.
///
/// The detail is the error code and message the provider sent, or the
/// transport error; never a raw response body and never a credential.
#[derive(Clone, Debug)]
pub struct StoreError {
    pub kind: FailureKind,
    pub operation: &'static str,
    pub key: String,
    pub detail: String,
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.kind {
            FailureKind::PreconditionFailed => "precondition failed",
            FailureKind::NotFound => "not found",
            FailureKind::Denied => "access denied",
            FailureKind::Network => "network error",
            FailureKind::Timeout => "timed out",
            FailureKind::Server => "server error",
            FailureKind::Other => "failed",
        };
        write!(f, "{} {}: {what}", self.operation, self.key)?;
        if !self.detail.is_empty() {
            write!(f, " ({})", self.detail)?;
        }
        Ok(())
    }
}

impl std::error::Error for StoreError {}

impl StoreError {
    pub fn new(
        kind: FailureKind,
        operation: &'static str,
        key: &str,
        detail: impl Into<String>,
    ) -> StoreError {
        StoreError {
            kind,
            operation,
            key: key.to_string(),
            detail: detail.into(),
        }
    }

    pub fn is_precondition_failed(&self) -> bool {
        self.kind == FailureKind::PreconditionFailed
    }
}

/// The operations the agent needs, each one request where the store has
/// requests. Implementations retry transient failures themselves.
#[async_trait]
pub trait ObjectStore: Send + Sync {
    /// Describes the store for logs, without credentials.
    fn describe(&self) -> String;

    /// Returns how far the store's clock is ahead of this host's, as of the
    /// last response, when the store has a clock of its own.
    fn clock_offset(&self) -> Option<chrono::Duration> {
        None
    }

    /// Reads a small object whole; `Ok(None)` only on a definite not-found.
    async fn get(&self, key: &str) -> Result<Option<Object>, StoreError>;

    /// Reads an object's size and metadata; `Ok(None)` only on not-found.
    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, StoreError>;

    /// Reads the size of one part of a multipart object (HEAD with partNumber).
    async fn head_part(&self, key: &str, part_number: i32) -> Result<u64, StoreError>;

    /// Streams an object's body from `offset`, failing if its ETag changed.
    async fn read_from(
        &self,
        key: &str,
        offset: u64,
        expected_etag: Option<&str>,
    ) -> Result<BodyStream, StoreError>;

    /// Writes a small object and returns its new ETag.
    async fn put(
        &self,
        key: &str,
        body: Bytes,
        content_type: &str,
        condition: WriteCondition,
    ) -> Result<Option<String>, StoreError>;

    async fn delete(&self, key: &str) -> Result<(), StoreError>;

    /// Starts a multipart upload carrying the given user metadata.
    async fn create_multipart(
        &self,
        key: &str,
        metadata: &HashMap<String, String>,
    ) -> Result<String, StoreError>;

    /// Uploads one part and returns its ETag.
    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        body: Bytes,
    ) -> Result<String, StoreError>;

    /// Copies bytes `first..=last` of `source` into a part, server-side.
    async fn copy_part(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        source: &str,
        first: u64,
        last: u64,
    ) -> Result<String, StoreError>;

    /// Completes an upload; with [`WriteCondition::IfAbsent`] it fails with
    /// a precondition failure when the key exists.
    async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[CompletedPart],
        condition: WriteCondition,
    ) -> Result<(), StoreError>;

    async fn abort_multipart(&self, key: &str, upload_id: &str) -> Result<(), StoreError>;

    /// Lists uploads in progress under a key prefix.
    async fn list_multipart_uploads(&self, prefix: &str) -> Result<Vec<PendingUpload>, StoreError>;

    /// Lists object keys under a prefix.
    async fn list_keys(&self, prefix: &str) -> Result<Vec<String>, StoreError>;
}

/// Opens the store the configuration names.
pub async fn open(config: &StoreConfig) -> anyhow::Result<Arc<dyn ObjectStore>> {
    Ok(match config {
        StoreConfig::S3(s3) => Arc::new(S3Store::new(s3)),
        StoreConfig::Local { root } => Arc::new(LocalStore::open(root)?),
    })
}
