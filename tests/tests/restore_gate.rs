//! `matrix-agent restore`, the gate before the gateway: when it opens (the
//! marker appears and the exit status is 0) and when it must stay shut.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::symlink;
use std::thread;
use std::time::Duration;

use matrix_agent_tests::bucket::{LATEST, SNAPSHOTS};
use matrix_agent_tests::contents::DatabaseContents;
use matrix_agent_tests::fixtures;
use matrix_agent_tests::host::{Host, ObjectStore};
use matrix_agent_tests::loopback::{ClosedPort, ConnectionCounter};
use sha2::{Digest, Sha256};

/// A snapshot name the tests use for objects they upload themselves.
const OLD_SNAPSHOT: &str = "system/db/snapshots/2020-01-01T0000Z.dump";

#[test]
fn restore_on_empty_bucket_opens_gate() {
    let store = ObjectStore::start();
    let host = Host::new(&store);
    fixtures::load_notes(&host.cluster);
    let before = DatabaseContents::capture(&host.cluster);

    let run = host.restore();

    run.assert_exit_code(0);
    assert!(host.has_regular_marker(), "no marker after\n{run}");
    before.assert_same_as(&DatabaseContents::capture(&host.cluster));
}

#[test]
fn restore_with_only_metadata_opens_gate() {
    let store = ObjectStore::start();
    let host = Host::new(&store);
    store.register(host.machine_id());
    fixtures::load_notes(&host.cluster);
    let before = DatabaseContents::capture(&host.cluster);

    let run = host.restore();

    run.assert_exit_code(0);
    assert!(host.has_regular_marker(), "no marker after\n{run}");
    before.assert_same_as(&DatabaseContents::capture(&host.cluster));
}

#[test]
fn restore_with_marker_touches_nothing() {
    let store = ObjectStore::start();
    let host = Host::new(&store);
    host.write_marker();
    let marker_before = fs::read(host.marker_path()).expect("reading the marker");
    let bucket_endpoint = ConnectionCounter::start();
    let database_port = ConnectionCounter::start();
    let mut agent = host.agent();
    agent.set("R2_ENDPOINT", bucket_endpoint.url());
    agent.set("PGPORT", database_port.port().to_string());

    let run = agent.run(&["restore"]);

    run.assert_exit_code(0);
    assert_eq!(
        bucket_endpoint.accepted(),
        0,
        "the bucket was contacted\n{run}"
    );
    assert_eq!(
        database_port.accepted(),
        0,
        "the database was contacted\n{run}"
    );
    assert_eq!(
        fs::read(host.marker_path()).expect("reading the marker"),
        marker_before,
        "the marker was rewritten"
    );
}

/// What a test puts where the marker belongs.
#[derive(Debug)]
enum NotRegularFile {
    SymlinkToRegularFile,
    DanglingSymlink,
    Directory,
}

/// A marker that is not a regular file keeps the gate shut even on a fresh
/// host, where restore would otherwise write the marker.
#[test]
fn restore_rejects_non_file_marker() {
    let store = ObjectStore::start();
    let host = Host::new(&store);
    let marker = host.marker_path();
    let elsewhere = host.state_dir().join("elsewhere");
    fs::write(&elsewhere, b"not a marker\n").expect("writing the symlink target");

    for case in [
        NotRegularFile::SymlinkToRegularFile,
        NotRegularFile::DanglingSymlink,
        NotRegularFile::Directory,
    ] {
        match case {
            NotRegularFile::SymlinkToRegularFile => symlink(&elsewhere, &marker),
            NotRegularFile::DanglingSymlink => symlink(host.state_dir().join("missing"), &marker),
            NotRegularFile::Directory => fs::create_dir(&marker),
        }
        .expect("creating the marker stand-in");

        let run = host.restore();

        assert!(
            run.exit_code().is_some_and(|code| code != 0),
            "{case:?}: expected a non-zero exit status\n{run}"
        );
        assert!(
            !host.has_regular_marker(),
            "{case:?}: a regular marker appeared\n{run}"
        );
        assert_eq!(
            fs::read(&elsewhere).expect("reading the symlink target"),
            b"not a marker\n",
            "{case:?}: the symlink target was written"
        );

        match case {
            NotRegularFile::Directory => fs::remove_dir(&marker),
            _ => fs::remove_file(&marker),
        }
        .expect("removing the marker stand-in");
    }
}

#[test]
fn restore_fails_when_bucket_unreachable() {
    let store = ObjectStore::start();
    let host = Host::new(&store);
    fixtures::load_notes(&host.cluster);
    let before = DatabaseContents::capture(&host.cluster);
    let closed = ClosedPort::new();
    let mut agent = host.agent();
    agent.set("R2_ENDPOINT", closed.url());

    let run = agent.run(&["restore"]);

    run.assert_failed();
    assert!(!host.has_regular_marker(), "a marker appeared\n{run}");
    before.assert_same_as(&DatabaseContents::capture(&host.cluster));
}

/// At boot PostgreSQL may come up after the restore unit starts.
#[test]
fn restore_waits_for_postgres_to_start() {
    let store = ObjectStore::start();
    let mut host = Host::new(&store);
    host.cluster.stop();
    let restore = host.agent().spawn(&["restore"]);
    thread::sleep(Duration::from_secs(3));
    host.cluster.start_again();

    let run = restore.wait();

    run.assert_exit_code(0);
    assert!(host.has_regular_marker(), "no marker after\n{run}");
}

#[test]
fn restore_fails_when_postgres_never_starts() {
    let store = ObjectStore::start();
    let mut host = Host::new(&store);
    host.cluster.stop();
    let mut agent = host.agent();
    agent.set("MATRIX_PG_WAIT", "2s");

    let run = agent.run(&["restore"]);

    run.assert_failed();
    assert!(!host.has_regular_marker(), "a marker appeared\n{run}");
    assert!(
        run.output_lowercase().contains("postgresql"),
        "the output does not name PostgreSQL\n{run}"
    );
}

/// What a bad-pointer case leaves at the key the pointer names.
enum AtPointedKey {
    Nothing,
    EmptyObject,
    /// A good snapshot, so that only validation of the name can fail.
    GoodSnapshot,
}

/// Each pointer names nothing restorable: a missing or empty object, or a
/// name outside the platform's pattern.
#[test]
fn restore_rejects_bad_pointers() {
    let store = ObjectStore::start();
    let host = Host::new(&store);
    fixtures::load_notes(&host.cluster);
    let good_snapshot = host.cluster.dump_custom_format();
    // A restore of the snapshot would remove this row.
    host.cluster
        .psql("INSERT INTO notes VALUES (3, 'written after the snapshot')");
    let before = DatabaseContents::capture(&host.cluster);
    let closed = ClosedPort::new();
    let url = format!("{}/{OLD_SNAPSHOT}", closed.url());
    let prefixed = store.bucket.full_key(OLD_SNAPSHOT);

    let cases: Vec<(&str, AtPointedKey)> = vec![
        (OLD_SNAPSHOT, AtPointedKey::Nothing),
        (
            "system/db/snapshots/2020-01-02T0000Z.dump",
            AtPointedKey::EmptyObject,
        ),
        (
            "/system/db/snapshots/2020-01-03T0000Z.dump",
            AtPointedKey::Nothing,
        ),
        (
            "system/db/snapshots/../snapshots/2020-01-03T0000Z.dump",
            AtPointedKey::Nothing,
        ),
        (&url, AtPointedKey::Nothing),
        (
            "system/db/snapshots/2020-01-03T00\u{7}00Z.dump",
            AtPointedKey::Nothing,
        ),
        (
            "system/db/snapshots/2020-01-03T0000Z.dump\u{1b}[2K",
            AtPointedKey::Nothing,
        ),
        (
            "system/db/snapshots/2020-01-04T000000Z.dump",
            AtPointedKey::GoodSnapshot,
        ),
        (
            "system/db/snapshots/2020-01-04T0000Z.dump.bak",
            AtPointedKey::GoodSnapshot,
        ),
        (
            "system/db/snapshots/2020-1-04T0000Z.dump",
            AtPointedKey::GoodSnapshot,
        ),
        (
            "system/db/snapshots/latest.dump",
            AtPointedKey::GoodSnapshot,
        ),
        (
            "system/db/backups/2020-01-04T0000Z.dump",
            AtPointedKey::GoodSnapshot,
        ),
        // Arabic-Indic digits, which a Unicode-aware \d would accept.
        (
            "system/db/snapshots/٢٠٢٠-01-04T0000Z.dump",
            AtPointedKey::GoodSnapshot,
        ),
        // The full key instead of the key relative to the prefix.
        (&prefixed, AtPointedKey::GoodSnapshot),
    ];

    for (pointer, at_pointed_key) in cases {
        match at_pointed_key {
            AtPointedKey::Nothing => {}
            AtPointedKey::EmptyObject => store.bucket.put(pointer, b""),
            AtPointedKey::GoodSnapshot => store.bucket.put(pointer, &good_snapshot),
        }
        store.bucket.put(LATEST, format!("{pointer}\n").as_bytes());

        let run = host.restore();

        assert!(
            run.exit_code().is_some_and(|code| code != 0),
            "pointer {pointer:?}: expected a non-zero exit status\n{run}"
        );
        assert!(
            !host.has_regular_marker(),
            "pointer {pointer:?}: a marker appeared\n{run}"
        );
        assert!(
            before == DatabaseContents::capture(&host.cluster),
            "pointer {pointer:?}: the database changed\n{run}"
        );
    }
}

/// The body is a valid dump, changed only in a comment inside its table
/// of contents, so only the SHA-256 from the metadata can tell.
#[test]
fn restore_rejects_snapshot_whose_body_changed() {
    let store = ObjectStore::start();
    let source = Host::new(&store);
    fixtures::load_notes(&source.cluster);
    source
        .cluster
        .psql("COMMENT ON TABLE notes IS 'checksum-canary-AAAA'");
    let original = source.cluster.dump_custom_format();
    let metadata = HashMap::from([
        ("sha256".to_owned(), hex::encode(Sha256::digest(&original))),
        ("size".to_owned(), original.len().to_string()),
    ]);
    let tampered = replace_once(&original, b"checksum-canary-AAAA", b"checksum-canary-BBBB");
    store
        .bucket
        .put_with_metadata(OLD_SNAPSHOT, &tampered, &metadata);
    store
        .bucket
        .put(LATEST, format!("{OLD_SNAPSHOT}\n").as_bytes());
    let target = Host::new(&store);

    let run = target.restore();

    run.assert_failed();
    assert!(!target.has_regular_marker(), "a marker appeared\n{run}");
    assert_eq!(
        target
            .cluster
            .psql("SELECT count(*) FROM pg_class WHERE relname = 'notes'"),
        "0",
        "the tampered snapshot was restored\n{run}"
    );
}

/// Snapshots made before the agent added metadata, or by hand with
/// `pg_dump --format custom`, restore like any other.
#[test]
fn restore_accepts_snapshot_without_metadata() {
    let store = ObjectStore::start();
    let source = Host::new(&store);
    fixtures::load_notes(&source.cluster);
    let expected = DatabaseContents::capture(&source.cluster);
    store
        .bucket
        .put(OLD_SNAPSHOT, &source.cluster.dump_custom_format());
    store
        .bucket
        .put(LATEST, format!("{OLD_SNAPSHOT}\n").as_bytes());
    let target = Host::new(&store);

    let run = target.restore();

    run.assert_exit_code(0);
    assert!(target.has_regular_marker(), "no marker after\n{run}");
    expected.assert_same_as(&DatabaseContents::capture(&target.cluster));
    assert_eq!(
        store.bucket.list(SNAPSHOTS),
        vec![OLD_SNAPSHOT.to_owned()],
        "restore changed the snapshots"
    );
}

fn replace_once(haystack: &[u8], needle: &[u8], replacement: &[u8]) -> Vec<u8> {
    assert_eq!(needle.len(), replacement.len(), "the size must not change");
    let positions: Vec<usize> = haystack
        .windows(needle.len())
        .enumerate()
        .filter(|(_, window)| *window == needle)
        .map(|(position, _)| position)
        .collect();
    assert_eq!(
        positions.len(),
        1,
        "expected the canary exactly once in the dump"
    );

    let mut changed = haystack.to_vec();
    changed[positions[0]..positions[0] + needle.len()].copy_from_slice(replacement);
    changed
}
