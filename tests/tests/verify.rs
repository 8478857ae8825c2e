//! `matrix-agent verify`: checks the snapshot `system/db/latest` names,
//! without touching the database.

use std::collections::HashMap;

use matrix_agent_tests::bucket::SNAPSHOTS;
use matrix_agent_tests::contents::DatabaseContents;
use matrix_agent_tests::fixtures;
use matrix_agent_tests::host::{Host, ObjectStore};

#[test]
fn verify_detects_changed_snapshot() {
    let store = ObjectStore::start();
    let host = Host::new(&store);
    host.write_marker();
    store.register(host.machine_id());
    fixtures::load_notes(&host.cluster);
    host.backup().assert_exit_code(0);
    let snapshot = store
        .bucket
        .latest_pointer()
        .expect("the backup set the pointer");
    let before = DatabaseContents::capture(&host.cluster);

    let good = host.agent().run(&["verify"]);

    good.assert_exit_code(0);
    before.assert_same_as(&DatabaseContents::capture(&host.cluster));

    // Same size and metadata, one byte different.
    let head = store.bucket.head(&snapshot).expect("the snapshot exists");
    let mut body = store.bucket.get(&snapshot).expect("the snapshot exists");
    let middle = body.len() / 2;
    body[middle] ^= 0xff;
    let metadata: HashMap<String, String> = head.metadata.clone();
    store.bucket.put_with_metadata(&snapshot, &body, &metadata);

    let bad = host.agent().run(&["verify"]);

    bad.assert_failed();
    assert!(
        bad.output_lowercase().contains("sha-256") || bad.output_lowercase().contains("sha256"),
        "the output does not mention the checksum\n{bad}"
    );
    assert_eq!(
        store.bucket.list(SNAPSHOTS),
        vec![snapshot],
        "verify changed the bucket"
    );
}
