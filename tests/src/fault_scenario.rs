//! Starting points for the fault scenarios: a host whose agent reaches the
//! bucket through a [`FaultProxy`], with S3 limits short enough for a fault
//! to play out in seconds, and a complete snapshot already in the bucket.

use std::collections::HashMap;

use sha2::{Digest, Sha256};

use crate::agent::Agent;
use crate::bucket::{Bucket, LATEST};
use crate::contents::DatabaseContents;
use crate::fault_proxy::{s3_flavour, FaultProxy};
use crate::fixtures;
use crate::host::{Host, ObjectStore};
use crate::invariants::Invariants;
use crate::moto::MotoServer;

/// A snapshot an earlier backup left, older than any the agent makes.
pub const PREVIOUS_SNAPSHOT: &str = "system/db/snapshots/2020-01-01T0000Z.dump";

/// The part size of every scenario backup: the smallest S3 allows, so that
/// a dump of a few MiB already has several parts.
pub const PART_SIZE: u64 = 5 << 20;

impl ObjectStore {
    /// Starts moto and a fault proxy in front of it, in R2 mode when
    /// `MATRIX_TEST_S3=r2`.
    pub fn start_with_proxy() -> ObjectStore {
        let server = MotoServer::start();
        let bucket = Bucket::create(
            &server.endpoint(),
            crate::host::BUCKET_NAME,
            &crate::host::user_prefix(),
        );
        let proxy = FaultProxy::start(&server.endpoint(), s3_flavour());
        ObjectStore {
            bucket,
            proxy: Some(proxy),
            server,
        }
    }

    /// Returns the proxy the agent reaches the bucket through.
    pub fn fault_proxy(&self) -> &FaultProxy {
        self.proxy
            .as_ref()
            .expect("this store was started without a proxy; use start_with_proxy")
    }
}

/// Uploads `dump` as the snapshot `key` with the size and SHA-256 metadata
/// the agent gives snapshots, and points `system/db/latest` at it.
pub fn publish_complete_snapshot(bucket: &Bucket, key: &str, dump: &[u8]) {
    let metadata = HashMap::from([
        ("sha256".to_owned(), hex::encode(Sha256::digest(dump))),
        ("size".to_owned(), dump.len().to_string()),
    ]);
    bucket.put_with_metadata(key, dump, &metadata);
    bucket.put(LATEST, format!("{key}\n").as_bytes());
}

/// Returns the host's agent with short S3 limits: three attempts per
/// request, a 3 s wait for a response's first byte, a download idle for
/// 2 s resumed, and 5 MiB parts.
pub fn impatient_agent(host: &Host) -> Agent {
    let mut agent = host.agent();
    agent
        .set("MATRIX_S3_CONNECT_TIMEOUT", "2s")
        .set("MATRIX_S3_READ_TIMEOUT", "3s")
        .set("MATRIX_S3_ATTEMPT_TIMEOUT", "30s")
        .set("MATRIX_S3_MAX_ATTEMPTS", "3")
        .set("MATRIX_S3_STALL_GRACE", "2s")
        .set("MATRIX_PART_SIZE", "5MiB");
    agent
}

/// A registered host with an open gate, some incompressible data and an
/// earlier complete snapshot, behind a fault proxy: the start of every
/// backup fault scenario.
pub struct BackupScene {
    pub host: Host,
    pub store: ObjectStore,
}

impl BackupScene {
    /// Sets up the scene with `payload_mebibytes` MiB in the table
    /// `payload`, so that a dump has that many MiB and a few KiB more.
    pub fn new(payload_mebibytes: usize) -> BackupScene {
        let store = ObjectStore::start_with_proxy();
        let host = Host::new(&store);
        host.write_marker();
        store.register(host.machine_id());
        fixtures::load_notes(&host.cluster);
        publish_complete_snapshot(
            &store.bucket,
            PREVIOUS_SNAPSHOT,
            &host.cluster.dump_custom_format(),
        );
        if payload_mebibytes > 0 {
            fixtures::load_payload(&host.cluster, payload_mebibytes);
        }
        BackupScene { host, store }
    }

    pub fn proxy(&self) -> &FaultProxy {
        self.store.fault_proxy()
    }

    /// Returns the agent with short S3 limits.
    pub fn agent(&self) -> Agent {
        impatient_agent(&self.host)
    }

    pub fn invariants(&self) -> Invariants<'_> {
        Invariants::new(&self.store.bucket, &self.host)
    }

    /// Stops every fault and runs the backup that must clean up after the
    /// scenario, checking the invariants.
    pub fn finish(&self, invariants: &mut Invariants<'_>) {
        self.proxy().clear_faults();
        invariants.finish_with_backup(&self.agent());
    }
}

/// A fresh host whose bucket holds a complete snapshot of its own database
/// as it was before the database changed: a restore must bring back
/// `expected`, and a failed one must leave `changed`.
pub struct RestoreScene {
    pub host: Host,
    pub store: ObjectStore,
    pub expected: DatabaseContents,
    pub changed: DatabaseContents,
    pub snapshot_size: u64,
}

impl RestoreScene {
    /// Sets up the scene with `payload_mebibytes` MiB of incompressible
    /// data in the snapshot.
    pub fn new(payload_mebibytes: usize) -> RestoreScene {
        let store = ObjectStore::start_with_proxy();
        let host = Host::new(&store);
        store.register(host.machine_id());
        fixtures::load_notes(&host.cluster);
        if payload_mebibytes > 0 {
            fixtures::load_payload(&host.cluster, payload_mebibytes);
        }
        let expected = DatabaseContents::capture(&host.cluster);
        let dump = host.cluster.dump_custom_format();
        publish_complete_snapshot(&store.bucket, PREVIOUS_SNAPSHOT, &dump);

        host.cluster.psql(
            "DROP TABLE IF EXISTS payload;
             INSERT INTO notes VALUES (3, 'written after the snapshot')",
        );
        let changed = DatabaseContents::capture(&host.cluster);
        RestoreScene {
            host,
            store,
            expected,
            changed,
            snapshot_size: dump.len() as u64,
        }
    }

    pub fn proxy(&self) -> &FaultProxy {
        self.store.fault_proxy()
    }

    pub fn agent(&self) -> Agent {
        impatient_agent(&self.host)
    }

    pub fn invariants(&self) -> Invariants<'_> {
        Invariants::new(&self.store.bucket, &self.host)
    }

    /// Asserts that the database holds what the snapshot holds.
    pub fn assert_restored(&self) {
        self.expected
            .assert_same_as(&DatabaseContents::capture(&self.host.cluster));
    }

    /// Asserts that the database is as it was before the restore ran.
    pub fn assert_untouched(&self) {
        self.changed
            .assert_same_as(&DatabaseContents::capture(&self.host.cluster));
    }
}
