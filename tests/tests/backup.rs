//! `matrix-agent backup`: when it refuses to run, and that the pointer only
//! ever moves to a whole, new snapshot.

use std::thread;
use std::time::{Duration, Instant};

use chrono::{Timelike, Utc};
use matrix_agent_tests::bucket::{
    is_snapshot_key, snapshot_key, ObjectHead, LATEST, SNAPSHOTS, STAGING,
};
use matrix_agent_tests::fixtures;
use matrix_agent_tests::host::{Host, ObjectStore};
use matrix_agent_tests::install_root::FakeInstallRoot;
use matrix_agent_tests::loopback::ConnectionCounter;
use sha2::{Digest, Sha256};

/// A snapshot that an earlier backup left, older than any the agent makes.
const OLD_SNAPSHOT: &str = "system/db/snapshots/2020-01-01T0000Z.dump";

/// Reads the pointer's content and ETag.
fn pointer_state(store: &ObjectStore) -> (Option<String>, Option<String>) {
    let head = store.bucket.head(LATEST).map(|head: ObjectHead| head.etag);
    (store.bucket.latest_pointer(), head)
}

#[test]
fn backup_refuses_before_restore_completed() {
    let store = ObjectStore::start();
    let host = Host::new(&store);
    store.register(host.machine_id());
    fixtures::load_notes(&host.cluster);

    let run = host.backup();

    run.assert_exit_code(1);
    assert_eq!(
        store.bucket.list_full_keys(""),
        vec![store.bucket.full_key("system/vps-meta.json")],
        "the backup uploaded something\n{run}"
    );
    assert!(
        store.bucket.multipart_uploads().is_empty(),
        "the backup started an upload\n{run}"
    );
}

#[test]
fn backup_refuses_foreign_vps_meta() {
    let store = ObjectStore::start();
    let host = Host::new(&store);
    host.write_marker();
    fixtures::load_notes(&host.cluster);
    store.publish_snapshot(OLD_SNAPSHOT, &host.cluster.dump_custom_format());
    let replacement = uuid::Uuid::new_v4().to_string();
    store.register(&replacement);
    let meta_before = store.bucket.get("system/vps-meta.json");
    let pointer_before = pointer_state(&store);

    let run = host.backup();

    run.assert_exit_code(1);
    assert_eq!(
        pointer_state(&store),
        pointer_before,
        "the pointer moved\n{run}"
    );
    assert_eq!(
        store.bucket.list(SNAPSHOTS),
        vec![OLD_SNAPSHOT.to_owned()],
        "a snapshot was added\n{run}"
    );
    assert!(
        store.bucket.multipart_uploads().is_empty(),
        "the backup started an upload\n{run}"
    );
    assert_eq!(
        store.bucket.get("system/vps-meta.json"),
        meta_before,
        "vps-meta.json changed\n{run}"
    );
}

/// pg_dump passes on 7 MiB, more than one 5 MiB part, and then fails.
#[test]
fn backup_aborts_upload_when_pg_dump_fails() {
    let store = ObjectStore::start();
    let host = Host::new(&store);
    host.write_marker();
    store.register(host.machine_id());
    fixtures::load_notes(&host.cluster);
    store.publish_snapshot(OLD_SNAPSHOT, &host.cluster.dump_custom_format());
    fixtures::load_payload(&host.cluster, 12);
    let pointer_before = pointer_state(&store);
    let install_root = FakeInstallRoot::failing_pg_dump(host.cluster.bin(), 7 << 20);
    let mut agent = host.agent();
    agent.set(
        "MATRIX_PG_INSTALL_ROOT",
        install_root.path().display().to_string(),
    );
    agent.set("MATRIX_PART_SIZE", "5MiB");

    let run = agent.run(&["backup"]);

    run.assert_failed();
    assert!(
        run.output_lowercase().contains("pg_dump"),
        "the output does not name pg_dump\n{run}"
    );
    assert_eq!(
        pointer_state(&store),
        pointer_before,
        "the pointer moved\n{run}"
    );
    assert_eq!(
        store.bucket.list(SNAPSHOTS),
        vec![OLD_SNAPSHOT.to_owned()],
        "a snapshot was added\n{run}"
    );
    assert_eq!(
        store.bucket.list(STAGING),
        Vec::<String>::new(),
        "a staging object was left\n{run}"
    );
    assert_eq!(
        store.bucket.multipart_uploads(),
        Vec::<String>::new(),
        "the multipart upload was not aborted\n{run}"
    );
}

/// The first backup's pg_dump sleeps, so the second starts while the
/// first holds the lock. The second must neither wait nor reach the bucket.
#[test]
fn concurrent_backup_exits_75() {
    let store = ObjectStore::start();
    let host = Host::new(&store);
    host.write_marker();
    store.register(host.machine_id());
    fixtures::load_notes(&host.cluster);
    let install_root = FakeInstallRoot::slow_pg_dump(host.cluster.bin(), Duration::from_secs(5));
    let mut slow_agent = host.agent();
    slow_agent.set(
        "MATRIX_PG_INSTALL_ROOT",
        install_root.path().display().to_string(),
    );
    let untouched_bucket = ConnectionCounter::start();
    let mut second_agent = host.agent();
    second_agent.set("R2_ENDPOINT", untouched_bucket.url());

    let first = slow_agent.spawn(&["backup"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !install_root.dump_started().exists() {
        assert!(
            Instant::now() < deadline,
            "the first backup never started pg_dump"
        );
        thread::sleep(Duration::from_millis(50));
    }
    let second = second_agent.run(&["backup"]);
    let first = first.wait();

    second.assert_exit_code(75);
    assert!(
        second
            .output_lowercase()
            .contains("another backup is running"),
        "the second run does not say another backup is running\n{second}"
    );
    assert_eq!(
        untouched_bucket.accepted(),
        0,
        "the second run contacted the bucket\n{second}"
    );
    first.assert_exit_code(0);
    let snapshots = store.bucket.list(SNAPSHOTS);
    assert_eq!(snapshots.len(), 1, "expected one snapshot: {snapshots:?}");
    assert_eq!(store.bucket.latest_pointer().as_ref(), Some(&snapshots[0]));
}

/// Snapshot names carry the minute only, so a second backup in the same
/// minute must wait for the next one rather than overwrite the first.
#[test]
fn same_minute_backup_keeps_first_snapshot() {
    let store = ObjectStore::start();
    let host = Host::new(&store);
    host.write_marker();
    store.register(host.machine_id());
    fixtures::load_notes(&host.cluster);
    // Leave the first backup time to finish within the minute it starts in.
    let now = Utc::now();
    if now.second() > 40 {
        thread::sleep(Duration::from_secs(u64::from(61 - now.second())));
    }

    let first = host.backup();
    first.assert_exit_code(0);
    let first_key = store
        .bucket
        .latest_pointer()
        .expect("the first backup set the pointer");
    let first_head = store
        .bucket
        .head(&first_key)
        .expect("the first snapshot exists");
    let first_body = store
        .bucket
        .get(&first_key)
        .expect("the first snapshot exists");
    host.cluster
        .psql("INSERT INTO notes VALUES (3, 'only in the second snapshot')");
    let second_started = Utc::now();
    let second = host.backup();

    assert_eq!(
        first_key,
        snapshot_key(second_started),
        "the first backup ended in a later minute than it started, so this \
         run did not test two backups in one minute\n{first}"
    );
    second.assert_exit_code(0);
    let first_head_after = store
        .bucket
        .head(&first_key)
        .expect("the first snapshot exists");
    assert_eq!(
        first_head_after.etag, first_head.etag,
        "the first snapshot was replaced"
    );
    assert_eq!(
        Sha256::digest(
            store
                .bucket
                .get(&first_key)
                .expect("the first snapshot exists")
        ),
        Sha256::digest(&first_body),
        "the first snapshot's bytes changed"
    );
    let second_key = store.bucket.latest_pointer().expect("the pointer exists");
    assert!(is_snapshot_key(&second_key), "bad pointer {second_key:?}");
    assert!(
        second_key > first_key,
        "the pointer names {second_key}, not a snapshot newer than {first_key}\n{second}"
    );
    assert_eq!(
        store.bucket.list(SNAPSHOTS),
        vec![first_key, second_key],
        "expected exactly the two snapshots"
    );
}
