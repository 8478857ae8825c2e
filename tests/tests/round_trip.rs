//! A backup from one host restored on its replacement gives back the same
//! database.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use matrix_agent_tests::agent::assert_no_secrets_in_files;
use matrix_agent_tests::bucket::{is_snapshot_key, SNAPSHOTS, STAGING};
use matrix_agent_tests::contents::DatabaseContents;
use matrix_agent_tests::fixtures;
use matrix_agent_tests::host::{Host, ObjectStore};
use sha2::{Digest, Sha256};

const PART_SIZE: u64 = 5 << 20;

/// Files under `dir` whose name ends in `.dump`, at any depth.
fn dump_files(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.to_string_lossy().ends_with(".dump") {
                found.push(path.display().to_string());
            }
        }
    }
    found
}

#[test]
fn round_trip_preserves_fidelity_fixture() {
    let store = ObjectStore::start();
    let old_host = Host::new(&store);
    old_host.write_marker();
    store.register(old_host.machine_id());
    fixtures::load_fidelity(&old_host.cluster);
    let expected = DatabaseContents::capture(&old_host.cluster);

    let backup = old_host.backup();
    backup.assert_exit_code(0);
    let snapshot = store
        .bucket
        .latest_pointer()
        .expect("the backup set the pointer");
    assert!(is_snapshot_key(&snapshot), "bad pointer {snapshot:?}");
    assert_eq!(
        store.bucket.get("system/db/latest").as_deref(),
        Some(format!("{snapshot}\n").as_bytes()),
        "the pointer is not the key and a newline"
    );
    let body = store.bucket.get(&snapshot).expect("the snapshot exists");
    let head = store.bucket.head(&snapshot).expect("the snapshot exists");
    assert_eq!(
        head.metadata.get("sha256"),
        Some(&hex::encode(Sha256::digest(&body)))
    );
    assert_eq!(head.metadata.get("size"), Some(&body.len().to_string()));
    assert_eq!(
        head.metadata.get("machine-id").map(String::as_str),
        Some(old_host.machine_id())
    );
    assert_eq!(
        store.bucket.list(STAGING),
        Vec::<String>::new(),
        "staging left behind"
    );
    assert!(
        old_host.state_dir().join("last-backup.json").is_file(),
        "no last-backup.json after\n{backup}"
    );

    let new_host = Host::new(&store);
    let restore = new_host.restore();

    restore.assert_exit_code(0);
    assert!(new_host.has_regular_marker(), "no marker after\n{restore}");
    expected.assert_same_as(&DatabaseContents::capture(&new_host.cluster));
    assert!(
        new_host.state_dir().join("restore-result.json").is_file(),
        "no restore-result.json after\n{restore}"
    );
    assert_eq!(
        dump_files(&new_host.state_dir()),
        Vec::<String>::new(),
        "the downloaded dump was left behind"
    );
    assert_no_secrets_in_files(&old_host.state_dir());
    assert_no_secrets_in_files(&new_host.state_dir());
}

/// Sizes of the parts sent with UploadPart (not UploadPartCopy), by
/// upload id and then part number. A retried part counts once, with the
/// size of its last attempt.
fn uploaded_part_sizes(store: &ObjectStore) -> BTreeMap<String, BTreeMap<u32, u64>> {
    let mut uploads: BTreeMap<String, BTreeMap<u32, u64>> = BTreeMap::new();
    for request in store.server.recorded_requests() {
        let (Some(upload_id), Some(part_number)) = (
            request.query_parameter("uploadId"),
            request.query_parameter("partNumber"),
        ) else {
            continue;
        };
        if request.method != "PUT" || request.header("x-amz-copy-source").is_some() {
            continue;
        }
        let size = request
            .header("x-amz-decoded-content-length")
            .or(request.header("Content-Length"))
            .and_then(|length| length.parse().ok())
            .unwrap_or_else(|| panic!("UploadPart without a length: {}", request.url));
        uploads
            .entry(upload_id.to_owned())
            .or_default()
            .insert(part_number.parse().expect("partNumber is a number"), size);
    }
    uploads
}

/// About 20 MiB of incompressible data in 5 MiB parts. R2 rejects a
/// multipart upload whose parts, all but the last, differ in size.
#[test]
fn multipart_backup_round_trips_with_equal_parts() {
    let store = ObjectStore::start_recording();
    let old_host = Host::new(&store);
    old_host.write_marker();
    store.register(old_host.machine_id());
    fixtures::load_notes(&old_host.cluster);
    fixtures::load_payload(&old_host.cluster, 20);
    let expected = DatabaseContents::capture(&old_host.cluster);
    let mut agent = old_host.agent();
    agent.set("MATRIX_PART_SIZE", "5MiB");

    let backup = agent.run(&["backup"]);

    backup.assert_exit_code(0);
    let snapshot = store
        .bucket
        .latest_pointer()
        .expect("the backup set the pointer");
    let head = store.bucket.head(&snapshot).expect("the snapshot exists");
    assert_eq!(
        head.metadata.get("part-size"),
        Some(&PART_SIZE.to_string()),
        "part-size metadata"
    );
    // The staging upload is deleted once the snapshot exists, so its parts
    // are read from moto's record of the requests.
    let uploads = uploaded_part_sizes(&store);
    assert_eq!(
        uploads.len(),
        1,
        "expected one upload with UploadPart: {uploads:?}"
    );
    let parts = uploads.into_values().next().expect("one upload");
    let part_numbers: Vec<u32> = parts.keys().copied().collect();
    let part_sizes: Vec<u64> = parts.values().copied().collect();
    assert_eq!(
        part_numbers,
        (1..=part_numbers.len() as u32).collect::<Vec<u32>>(),
        "part numbers are not 1..N"
    );
    assert!(
        part_sizes.len() > 3,
        "expected more than 3 parts, got {part_sizes:?}"
    );
    let (last, leading) = part_sizes.split_last().expect("at least one part");
    assert!(
        leading.iter().all(|&size| size == PART_SIZE),
        "parts before the last differ from {PART_SIZE} bytes: {part_sizes:?}"
    );
    assert!(
        (1..=PART_SIZE).contains(last),
        "the last part has {last} bytes"
    );
    assert_eq!(
        part_sizes.iter().sum::<u64>(),
        head.size,
        "the parts do not add up to the snapshot"
    );

    let new_host = Host::new(&store);
    let restore = new_host.restore();

    restore.assert_exit_code(0);
    assert!(new_host.has_regular_marker(), "no marker after\n{restore}");
    expected.assert_same_as(&DatabaseContents::capture(&new_host.cluster));
}

/// An operator removes the marker to restore again over the same data.
#[test]
fn restore_twice_gives_same_database() {
    let store = ObjectStore::start();
    let old_host = Host::new(&store);
    old_host.write_marker();
    store.register(old_host.machine_id());
    fixtures::load_fidelity(&old_host.cluster);
    let expected = DatabaseContents::capture(&old_host.cluster);
    old_host.backup().assert_exit_code(0);
    let new_host = Host::new(&store);
    new_host.restore().assert_exit_code(0);
    let after_first = DatabaseContents::capture(&new_host.cluster);
    new_host.remove_marker();

    let second = new_host.restore();

    second.assert_exit_code(0);
    assert!(new_host.has_regular_marker(), "no marker after\n{second}");
    let after_second = DatabaseContents::capture(&new_host.cluster);
    after_first.assert_same_as(&after_second);
    expected.assert_same_as(&after_second);
    assert_eq!(
        store.bucket.list(SNAPSHOTS).len(),
        1,
        "restore changed the snapshots"
    );
}
