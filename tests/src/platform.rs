//! The Matrix platform's host API, played by `matrix-fake-platform` on
//! 127.0.0.1, wired to the customer's bucket of a test.

use matrix_fake_platform::{BucketTarget, FakePlatform, PlatformConfig};

use crate::host::{ObjectStore, BUCKET_NAME, USER_ID};

/// Credentials the platform writes `vps-meta.json` with. They differ from
/// the agent's and the harness's, so a leak can be traced to its source.
const PLATFORM_ACCESS_KEY_ID: &str = "platform-access-key";
const PLATFORM_SECRET_ACCESS_KEY: &str = "platform-secret-key";

/// Returns the customer's bucket in `store` as the platform addresses it.
pub fn platform_bucket(store: &ObjectStore) -> BucketTarget {
    BucketTarget {
        endpoint: store.bucket.endpoint().to_owned(),
        bucket: BUCKET_NAME.to_owned(),
        user_id: USER_ID.to_owned(),
        access_key_id: PLATFORM_ACCESS_KEY_ID.to_owned(),
        secret_access_key: PLATFORM_SECRET_ACCESS_KEY.to_owned(),
    }
}

/// Starts the fake platform from `config`, writing `vps-meta.json` into
/// `store`'s bucket after each successful registration, as the real
/// platform does.
pub fn start_platform(store: &ObjectStore, config: PlatformConfig) -> FakePlatform {
    FakePlatform::start_blocking(config.bucket(platform_bucket(store)))
        .unwrap_or_else(|error| panic!("the fake platform did not start: {error:#}"))
}
