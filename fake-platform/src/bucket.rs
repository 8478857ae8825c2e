//! Writes `vps-meta.json` into the customer's bucket, as the platform does
//! after a successful registration.

use std::time::Duration;

use aws_credential_types::Credentials;
use aws_sdk_s3::config::{
    BehaviorVersion, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::DisplayErrorContext;
use aws_sdk_s3::primitives::ByteStream;
use aws_smithy_types::retry::RetryConfig;
use aws_smithy_types::timeout::TimeoutConfig;
use serde_json::Value;

/// The customer's bucket on an S3-compatible endpoint, and whose it is.
///
/// The key prefix follows from the customer's id as on the real platform:
/// `matrixos-sync/<user id>/`.
#[derive(Clone, Debug)]
pub struct BucketTarget {
    /// Endpoint URL, reached with path-style requests, e.g.
    /// `http://127.0.0.1:9000`.
    pub endpoint: String,
    pub bucket: String,
    /// The customer's id, written as `userId` into `vps-meta.json`.
    pub user_id: String,
    pub access_key_id: String,
    pub secret_access_key: String,
}

impl BucketTarget {
    /// Returns the key prefix of the customer's objects.
    pub fn prefix(&self) -> String {
        format!("matrixos-sync/{}/", self.user_id)
    }

    /// Returns the full key of `system/vps-meta.json`.
    pub fn vps_meta_key(&self) -> String {
        format!("{}system/vps-meta.json", self.prefix())
    }
}

/// An S3 client configured from a [`BucketTarget`] alone.
#[derive(Clone, Debug)]
pub(crate) struct MetaWriter {
    client: aws_sdk_s3::Client,
    target: BucketTarget,
}

impl MetaWriter {
    /// Builds the client from explicit settings only. The SDK reads no
    /// environment variable, shared config file or instance metadata.
    pub(crate) fn new(target: BucketTarget) -> MetaWriter {
        let credentials = Credentials::new(
            &target.access_key_id,
            &target.secret_access_key,
            None,
            None,
            "matrix-fake-platform",
        );
        // One attempt with short timeouts: a test that points the bucket at
        // a closed port wants the persistence warning at once, not after
        // the SDK's retries.
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(Duration::from_secs(5))
            .operation_attempt_timeout(Duration::from_secs(20))
            .build();
        let config = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("auto"))
            .endpoint_url(&target.endpoint)
            .force_path_style(true)
            .credentials_provider(credentials)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .timeout_config(timeouts)
            .retry_config(RetryConfig::disabled())
            .build();
        MetaWriter {
            client: aws_sdk_s3::Client::from_conf(config),
            target,
        }
    }

    pub(crate) fn target(&self) -> &BucketTarget {
        &self.target
    }

    /// Stores `document` as `<prefix>system/vps-meta.json`, replacing any
    /// earlier version unconditionally, as the platform does.
    pub(crate) async fn write_vps_meta(&self, document: &Value) -> Result<(), String> {
        let key = self.target.vps_meta_key();
        let body = serde_json::to_vec_pretty(document)
            .map_err(|error| format!("cannot serialize {key}: {error}"))?;
        self.client
            .put_object()
            .bucket(&self.target.bucket)
            .key(&key)
            .content_type("application/json")
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(|error| {
                format!(
                    "writing s3://{}/{key} failed: {}",
                    self.target.bucket,
                    DisplayErrorContext(&error)
                )
            })?;
        Ok(())
    }
}
