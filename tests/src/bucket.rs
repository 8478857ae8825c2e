//! The test's own view of the bucket, through the real aws-sdk-s3 client,
//! for setting up objects and inspecting what the agent left behind.

use std::collections::HashMap;
use std::future::Future;

use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{BucketLocationConstraint, CreateBucketConfiguration};
use aws_sdk_s3::Client;
use tokio::runtime::Runtime;

/// Credentials of the test's own client. They differ from the agent's
/// secrets so that a leak in the agent's output cannot come from here.
const HARNESS_ACCESS_KEY_ID: &str = "harness-access-key";
const HARNESS_SECRET_ACCESS_KEY: &str = "harness-secret-key";

/// Key of the pointer to the newest snapshot, relative to the prefix.
pub const LATEST: &str = "system/db/latest";
/// Key of the machine metadata, relative to the prefix.
pub const VPS_META: &str = "system/vps-meta.json";
/// Folder of the snapshots, relative to the prefix.
pub const SNAPSHOTS: &str = "system/db/snapshots/";
/// Folder of the multipart uploads in progress, relative to the prefix.
pub const STAGING: &str = "system/db/staging/";

/// Checks whether `key` matches the pattern the platform validates pointers with,
/// `^system/db/snapshots/\d{4}-\d{2}-\d{2}T\d{4}Z\.dump$`, with ASCII
/// digits only.
pub fn is_snapshot_key(key: &str) -> bool {
    let Some(stamp) = key
        .strip_prefix(SNAPSHOTS)
        .and_then(|rest| rest.strip_suffix(".dump"))
    else {
        return false;
    };
    let shape = "dddd-dd-ddTddddZ";
    stamp.len() == shape.len()
        && stamp
            .bytes()
            .zip(shape.bytes())
            .all(|(byte, expected)| match expected {
                b'd' => byte.is_ascii_digit(),
                other => byte == other,
            })
}

/// Builds the snapshot key for a UTC minute, e.g.
/// `system/db/snapshots/2026-04-26T1800Z.dump`.
pub fn snapshot_key(time: chrono::DateTime<chrono::Utc>) -> String {
    format!("{SNAPSHOTS}{}.dump", time.format("%Y-%m-%dT%H%MZ"))
}

/// What a HEAD request returns about one object.
#[derive(Clone, Debug)]
pub struct ObjectHead {
    pub size: u64,
    pub etag: String,
    pub metadata: HashMap<String, String>,
}

/// A bucket on an S3 endpoint and the customer prefix inside it.
///
/// Methods block on a runtime of their own, so tests stay synchronous, and
/// take keys relative to the prefix unless their name says otherwise.
pub struct Bucket {
    runtime: Runtime,
    client: Client,
    endpoint: String,
    name: String,
    prefix: String,
}

impl Bucket {
    /// Creates the bucket `name` at `endpoint` (path-style, region `auto`).
    pub fn create(endpoint: &str, name: &str, prefix: &str) -> Bucket {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("building the S3 client's runtime");

        // Built by hand, not with aws-config: its default credential chain
        // may query the cloud metadata service.
        let config = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .endpoint_url(endpoint)
            .region(Region::new("auto"))
            .force_path_style(true)
            .credentials_provider(Credentials::from_keys(
                HARNESS_ACCESS_KEY_ID,
                HARNESS_SECRET_ACCESS_KEY,
                None,
            ))
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .build();
        let bucket = Bucket {
            runtime,
            client: Client::from_conf(config),
            endpoint: endpoint.to_owned(),
            name: name.to_owned(),
            prefix: prefix.to_owned(),
        };

        // moto, like S3, rejects a bucket without a location constraint
        // when the request is not for us-east-1.
        let location = CreateBucketConfiguration::builder()
            .location_constraint(BucketLocationConstraint::from("auto"))
            .build();
        let request = bucket
            .client
            .create_bucket()
            .bucket(name)
            .create_bucket_configuration(location);
        bucket.block_on(request.send()).unwrap_or_else(|error| {
            panic!("creating bucket {name} at {endpoint} failed: {error:?}")
        });
        bucket
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Prepends the prefix to a key relative to it.
    pub fn full_key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn block_on<F: Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }

    pub fn put(&self, key: &str, body: &[u8]) {
        self.put_with_metadata(key, body, &HashMap::new());
    }

    /// Writes an object with user metadata (`x-amz-meta-*`).
    pub fn put_with_metadata(&self, key: &str, body: &[u8], metadata: &HashMap<String, String>) {
        let full_key = self.full_key(key);
        let request = self
            .client
            .put_object()
            .bucket(&self.name)
            .key(&full_key)
            .set_metadata(Some(metadata.clone()))
            .body(ByteStream::from(body.to_vec()));
        self.block_on(request.send())
            .unwrap_or_else(|error| panic!("PUT {full_key} failed: {error:?}"));
    }

    /// Reads an object, or returns `None` when it does not exist.
    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        let full_key = self.full_key(key);
        let request = self.client.get_object().bucket(&self.name).key(&full_key);
        match self.block_on(request.send()) {
            Ok(output) => {
                let body = self
                    .block_on(output.body.collect())
                    .unwrap_or_else(|error| panic!("reading {full_key} failed: {error:?}"));
                Some(body.into_bytes().to_vec())
            }
            Err(error) if error.as_service_error().is_some_and(|e| e.is_no_such_key()) => None,
            Err(error) => panic!("GET {full_key} failed: {error:?}"),
        }
    }

    /// Reads `system/db/latest` and trims it; `None` when it does not exist.
    pub fn latest_pointer(&self) -> Option<String> {
        self.get(LATEST)
            .map(|body| String::from_utf8_lossy(&body).trim().to_owned())
    }

    /// Sends HEAD for an object, or returns `None` when it does not exist.
    pub fn head(&self, key: &str) -> Option<ObjectHead> {
        let full_key = self.full_key(key);
        let request = self.client.head_object().bucket(&self.name).key(&full_key);
        match self.block_on(request.send()) {
            Ok(output) => Some(ObjectHead {
                size: output.content_length().unwrap_or(0) as u64,
                etag: output.e_tag().unwrap_or_default().to_owned(),
                metadata: output.metadata().cloned().unwrap_or_default(),
            }),
            Err(error) if error.as_service_error().is_some_and(|e| e.is_not_found()) => None,
            Err(error) => panic!("HEAD {full_key} failed: {error:?}"),
        }
    }

    pub fn delete(&self, key: &str) {
        let full_key = self.full_key(key);
        let request = self
            .client
            .delete_object()
            .bucket(&self.name)
            .key(&full_key);
        self.block_on(request.send())
            .unwrap_or_else(|error| panic!("DELETE {full_key} failed: {error:?}"));
    }

    /// Lists the keys under `folder`, relative to the prefix, sorted.
    pub fn list(&self, folder: &str) -> Vec<String> {
        let full_keys = self.list_full_keys(&self.full_key(folder));
        full_keys
            .into_iter()
            .map(|key| key[self.prefix.len()..].to_owned())
            .collect()
    }

    /// Lists every full key in the bucket that starts with `key_prefix`,
    /// sorted.
    pub fn list_full_keys(&self, key_prefix: &str) -> Vec<String> {
        let mut keys = Vec::new();
        let mut continuation = None;
        loop {
            let request = self
                .client
                .list_objects_v2()
                .bucket(&self.name)
                .prefix(key_prefix)
                .set_continuation_token(continuation);
            let page = self
                .block_on(request.send())
                .unwrap_or_else(|error| panic!("listing {key_prefix} failed: {error:?}"));
            keys.extend(
                page.contents()
                    .iter()
                    .filter_map(|object| object.key().map(str::to_owned)),
            );
            continuation = page.next_continuation_token().map(str::to_owned);
            if continuation.is_none() {
                break;
            }
        }
        keys.sort();
        keys
    }

    /// Lists the full keys of the multipart uploads that were started and
    /// neither completed nor aborted.
    pub fn multipart_uploads(&self) -> Vec<String> {
        let request = self.client.list_multipart_uploads().bucket(&self.name);
        let output = self
            .block_on(request.send())
            .unwrap_or_else(|error| panic!("listing multipart uploads failed: {error:?}"));
        output
            .uploads()
            .iter()
            .filter_map(|upload| upload.key().map(str::to_owned))
            .collect()
    }
}
