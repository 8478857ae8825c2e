//! Storage faults during `matrix-agent backup`: errors, resets, stalls and
//! races on every request of the backup path, each followed by the checks
//! that show nothing was lost.
//!
//! A backup first reads `vps-meta.json` and `latest`, sends HEAD for the
//! new snapshot's key and lists unfinished uploads. It then uploads the
//! dump as a staging object (CreateMultipartUpload, UploadPart for each
//! part, CompleteMultipartUpload) and copies it to the snapshot key the
//! same way, with UploadPartCopy. Last come DELETE of the staging object,
//! HEAD of the snapshot, a second read of `vps-meta.json` and the
//! conditional PUT of `latest`.
//!
//! A transient fault (the first request only) must be retried and the
//! backup must succeed; a lasting one must fail the backup with a one-line
//! reason, after which a clean backup must succeed and leave nothing open.

use std::time::{Duration, Instant};

use chrono::Utc;
use matrix_agent_tests::agent::AgentRun;
use matrix_agent_tests::bucket::{snapshot_key, LATEST};
use matrix_agent_tests::fault_proxy::{Fault, Hold, Operation, Rule};
use matrix_agent_tests::fault_scenario::{
    publish_complete_snapshot, BackupScene, PREVIOUS_SNAPSHOT,
};
use matrix_agent_tests::invariants::Ending;

/// Payload of the scenarios on parts: with the notes table the dump is a
/// little over 11 MiB, so three parts of 5 MiB, the last one short.
const MULTIPART_PAYLOAD_MIB: usize = 11;

/// Payload of the other scenarios: none, so the dump is a few KiB in one
/// part and the scenario spends its time on the fault, not the upload.
const SMALL_PAYLOAD_MIB: usize = 0;

const STAGING: &str = "system/db/staging/";
const SNAPSHOTS: &str = "system/db/snapshots/";
const VPS_META: &str = "system/vps-meta.json";

/// Runs a backup of a database with `payload_mib` MiB of payload while
/// `fault` hits the requests `rule` picks, and
/// expects the agent to retry its way to a complete snapshot.
fn backup_survives(payload_mib: usize, rule: Rule, fault: Fault) -> (BackupScene, AgentRun) {
    let scene = BackupScene::new(payload_mib);
    let rule_id = scene.proxy().inject(rule, fault);
    let run = {
        let mut invariants = scene.invariants();
        let run = scene.agent().run(&["backup"]);
        invariants.check_backup(&run, Ending::Succeeded);
        assert!(
            invariants.pointer() > Some(PREVIOUS_SNAPSHOT),
            "the backup did not move system/db/latest\n{run}"
        );
        invariants.assert_nothing_pending(&run.command_line);
        run
    };
    assert!(
        scene.proxy().fired(rule_id) > 0,
        "the fault never fired, so the scenario tested nothing\n{run}"
    );
    (scene, run)
}

/// Runs a backup of a database with `payload_mib` MiB of payload while
/// `fault` hits every request `rule` picks, expects it
/// to fail with an error line naming each of `words`, then runs a clean
/// backup that must succeed and leave no upload open.
fn backup_fails_then_recovers(
    payload_mib: usize,
    rule: Rule,
    fault: Fault,
    words: &[&str],
) -> AgentRun {
    let scene = BackupScene::new(payload_mib);
    let rule_id = scene.proxy().inject(rule, fault);
    let mut invariants = scene.invariants();

    let run = scene.agent().run(&["backup"]);

    invariants.check_backup(&run, Ending::Failed(words));
    assert_eq!(
        invariants.pointer(),
        Some(PREVIOUS_SNAPSHOT),
        "the failed backup moved system/db/latest\n{run}"
    );
    assert!(
        scene.proxy().fired(rule_id) > 0,
        "the fault never fired, so the scenario tested nothing\n{run}"
    );
    scene.finish(&mut invariants);
    run
}

#[test]
fn vps_meta_read_error_fails_backup() {
    backup_fails_then_recovers(
        SMALL_PAYLOAD_MIB,
        Rule::on(Operation::GetObject).key_contains(VPS_META),
        Fault::error(500),
        &["machine metadata", "server error"],
    );
}

#[test]
fn pointer_read_reset_is_retried() {
    backup_survives(
        SMALL_PAYLOAD_MIB,
        Rule::on(Operation::GetObject).key_contains(LATEST).nth(1),
        Fault::Reset,
    );
}

#[test]
fn pointer_read_error_fails_backup() {
    backup_fails_then_recovers(
        SMALL_PAYLOAD_MIB,
        Rule::on(Operation::GetObject).key_contains(LATEST),
        Fault::error(503),
        &["latest pointer", "server error"],
    );
}

#[test]
fn pointer_read_stall_is_retried() {
    // Longer than MATRIX_S3_READ_TIMEOUT (3 s): the first attempt times
    // out and the second gets the pointer.
    let started = Instant::now();
    backup_survives(
        SMALL_PAYLOAD_MIB,
        Rule::on(Operation::GetObject).key_contains(LATEST).nth(1),
        Fault::Stall(Duration::from_secs(20)),
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the agent waited out the stall instead of timing out"
    );
}

#[test]
fn snapshot_name_check_error_fails_backup() {
    // The first HEAD of the snapshot's key asks whether the minute's name
    // is free, before anything is uploaded.
    let run = backup_fails_then_recovers(
        SMALL_PAYLOAD_MIB,
        Rule::on(Operation::HeadObject).key_contains(SNAPSHOTS),
        Fault::error(503),
        &["snapshot name is free", "HTTP 503"],
    );
    assert!(
        !run.stderr.contains("dumping into"),
        "the backup started the dump without a free name\n{run}"
    );
}

#[test]
fn create_upload_throttling_is_retried() {
    backup_survives(
        SMALL_PAYLOAD_MIB,
        Rule::on(Operation::CreateMultipartUpload)
            .key_contains(STAGING)
            .nth(1),
        Fault::error(429),
    );
}

#[test]
fn create_upload_error_fails_backup() {
    let run = backup_fails_then_recovers(
        SMALL_PAYLOAD_MIB,
        Rule::on(Operation::CreateMultipartUpload).key_contains(STAGING),
        Fault::error(500),
        &["cannot start the upload", "CreateMultipartUpload"],
    );
    assert!(
        !run.stderr.contains("InternalError</"),
        "the agent printed a raw response body\n{run}"
    );
}

#[test]
fn first_part_reset_is_retried() {
    let (scene, run) = backup_survives(
        MULTIPART_PAYLOAD_MIB,
        Rule::on(Operation::UploadPart).nth(1),
        Fault::Reset,
    );
    let parts = scene.proxy().exchanges_of(Operation::UploadPart);
    assert!(
        parts.len() >= 4,
        "three parts and one retry expected, saw {} UploadPart requests\n{run}",
        parts.len()
    );
}

#[test]
fn middle_part_503_is_retried() {
    backup_survives(
        MULTIPART_PAYLOAD_MIB,
        Rule::on(Operation::UploadPart).nth(2),
        Fault::error(503),
    );
}

#[test]
fn last_part_reset_after_forward_is_retried() {
    // The bucket stored the part but the agent never heard; the retry
    // replaces it with the same bytes.
    backup_survives(
        MULTIPART_PAYLOAD_MIB,
        Rule::on(Operation::UploadPart).nth(3),
        Fault::ResetAfterForward,
    );
}

#[test]
fn part_stall_is_retried() {
    backup_survives(
        MULTIPART_PAYLOAD_MIB,
        Rule::on(Operation::UploadPart).nth(2),
        Fault::Stall(Duration::from_secs(20)),
    );
}

#[test]
fn part_errors_abort_upload() {
    let scene = BackupScene::new(MULTIPART_PAYLOAD_MIB);
    scene
        .proxy()
        .inject(Rule::on(Operation::UploadPart).from(2), Fault::error(500));
    let mut invariants = scene.invariants();

    let run = scene.agent().run(&["backup"]);

    invariants.check_backup(
        &run,
        Ending::Failed(&["cannot upload the dump", "UploadPart", "server error"]),
    );
    assert_eq!(
        scene.store.bucket.multipart_uploads(),
        Vec::<String>::new(),
        "the failed upload was not aborted\n{run}"
    );
    assert!(
        scene
            .proxy()
            .exchanges_of(Operation::CompleteMultipartUpload)
            .is_empty(),
        "the agent completed an upload with a failed part\n{run}"
    );
    scene.finish(&mut invariants);
}

#[test]
fn part_retries_exhausted_fails_backup() {
    let scene = BackupScene::new(MULTIPART_PAYLOAD_MIB);
    scene
        .proxy()
        .inject(Rule::on(Operation::UploadPart), Fault::error(503));
    let mut invariants = scene.invariants();
    let mut agent = scene.agent();
    // One part in flight: with more, another part can run out of attempts
    // first and abort the upload before part 1 is retried.
    agent
        .set("MATRIX_S3_MAX_ATTEMPTS", "2")
        .set("MATRIX_UPLOAD_CONCURRENCY", "1");

    let run = agent.run(&["backup"]);

    invariants.check_backup(
        &run,
        Ending::Failed(&["cannot upload the dump", "UploadPart", "server error"]),
    );
    let first_part_attempts = scene
        .proxy()
        .exchanges_of(Operation::UploadPart)
        .iter()
        .filter(|exchange| exchange.query_parameter("partNumber") == Some("1"))
        .count();
    assert_eq!(
        first_part_attempts, 2,
        "MATRIX_S3_MAX_ATTEMPTS=2 must mean two attempts per part\n{run}"
    );
    scene.finish(&mut invariants);
}

#[test]
fn staging_completion_reset_is_retried() {
    backup_survives(
        SMALL_PAYLOAD_MIB,
        Rule::on(Operation::CompleteMultipartUpload)
            .key_contains(STAGING)
            .nth(1),
        Fault::Reset,
    );
}

#[test]
fn staging_completion_lost_response_is_recovered() {
    // The bucket completed the upload but the response never arrived.
    // moto answers the retried completion as it answered the first.
    backup_survives(
        SMALL_PAYLOAD_MIB,
        Rule::on(Operation::CompleteMultipartUpload)
            .key_contains(STAGING)
            .nth(1),
        Fault::ResetAfterForward,
    );
}

/// Loses the response to the first completion on keys containing
/// `folder`, then answers the retry as a store that forgets completed
/// uploads would: 404 NoSuchUpload.
fn lose_completion_then_forget_upload(scene: &BackupScene, folder: &str) {
    let completions = Rule::on(Operation::CompleteMultipartUpload).key_contains(folder);
    scene
        .proxy()
        .inject(completions.clone().nth(1), Fault::ResetAfterForward);
    scene.proxy().inject(
        completions.nth(2),
        Fault::Error {
            status: 404,
            code: "NoSuchUpload",
        },
    );
}

#[test]
fn staging_completion_forgotten_upload_is_recovered() {
    let scene = BackupScene::new(SMALL_PAYLOAD_MIB);
    lose_completion_then_forget_upload(&scene, STAGING);
    let mut invariants = scene.invariants();

    let run = scene.agent().run(&["backup"]);

    invariants.check_backup(&run, Ending::Succeeded);
    assert!(invariants.pointer() > Some(PREVIOUS_SNAPSHOT), "{run}");
    invariants.assert_nothing_pending(&run.command_line);
}

#[test]
fn snapshot_completion_forgotten_upload_is_recovered() {
    let scene = BackupScene::new(SMALL_PAYLOAD_MIB);
    lose_completion_then_forget_upload(&scene, SNAPSHOTS);
    let mut invariants = scene.invariants();

    let run = scene.agent().run(&["backup"]);

    invariants.check_backup(&run, Ending::Succeeded);
    assert!(invariants.pointer() > Some(PREVIOUS_SNAPSHOT), "{run}");
    assert_eq!(
        scene.store.bucket.list(SNAPSHOTS).len(),
        2,
        "the backup made more than one snapshot\n{run}"
    );
    invariants.assert_nothing_pending(&run.command_line);
}

#[test]
fn staging_completion_error_fails_backup() {
    backup_fails_then_recovers(
        SMALL_PAYLOAD_MIB,
        Rule::on(Operation::CompleteMultipartUpload).key_contains(STAGING),
        Fault::error(500),
        &["cannot complete the upload", "CompleteMultipartUpload"],
    );
}

#[test]
fn snapshot_copy_503_is_retried() {
    backup_survives(
        SMALL_PAYLOAD_MIB,
        Rule::on(Operation::UploadPartCopy).nth(1),
        Fault::error(503),
    );
}

#[test]
fn snapshot_copy_lost_response_is_retried() {
    backup_survives(
        SMALL_PAYLOAD_MIB,
        Rule::on(Operation::UploadPartCopy).nth(1),
        Fault::ResetAfterForward,
    );
}

#[test]
fn snapshot_copy_error_fails_backup() {
    let scene = BackupScene::new(SMALL_PAYLOAD_MIB);
    scene
        .proxy()
        .inject(Rule::on(Operation::UploadPartCopy), Fault::error(500));
    let mut invariants = scene.invariants();

    let run = scene.agent().run(&["backup"]);

    invariants.check_backup(
        &run,
        Ending::Failed(&["cannot create the snapshot", "UploadPartCopy"]),
    );
    assert_eq!(
        scene.store.bucket.list(SNAPSHOTS),
        vec![PREVIOUS_SNAPSHOT.to_owned()],
        "a snapshot appeared although the copy failed\n{run}"
    );
    assert_eq!(
        scene.store.bucket.list(STAGING),
        Vec::<String>::new(),
        "the staging object was left behind\n{run}"
    );
    scene.finish(&mut invariants);
}

#[test]
fn snapshot_completion_lost_response_is_recovered() {
    // The snapshot exists after the first attempt, so the retry must count
    // as this run's snapshot, not as a name another writer took.
    let (scene, run) = backup_survives(
        SMALL_PAYLOAD_MIB,
        Rule::on(Operation::CompleteMultipartUpload)
            .key_contains(SNAPSHOTS)
            .nth(1),
        Fault::ResetAfterForward,
    );
    assert_eq!(
        scene.store.bucket.list(SNAPSHOTS).len(),
        2,
        "the backup made more than one snapshot\n{run}"
    );
}

#[test]
fn snapshot_check_error_keeps_pointer() {
    // The second HEAD of the snapshot's key is the check after the copy;
    // the first asked whether the name was free.
    let scene = BackupScene::new(SMALL_PAYLOAD_MIB);
    scene.proxy().inject(
        Rule::on(Operation::HeadObject)
            .key_contains(SNAPSHOTS)
            .from(2),
        Fault::error(500),
    );
    let mut invariants = scene.invariants();

    let run = scene.agent().run(&["backup"]);

    invariants.check_backup(
        &run,
        Ending::Failed(&["cannot check the stored snapshot", "HEAD", "HTTP 500"]),
    );
    assert!(
        !run.stderr.contains("unhandled error"),
        "the error describes the bodiless HEAD response with SDK noise\n{run}"
    );
    assert_eq!(invariants.pointer(), Some(PREVIOUS_SNAPSHOT));
    scene.finish(&mut invariants);
}

#[test]
fn pointer_write_reset_is_retried() {
    backup_survives(
        SMALL_PAYLOAD_MIB,
        Rule::on(Operation::PutObject).key_contains(LATEST).nth(1),
        Fault::Reset,
    );
}

#[test]
fn pointer_write_lost_response_is_recovered() {
    // The pointer moved, but the agent never heard; its retry fails the
    // If-Match and must find its own snapshot named there.
    let (_scene, run) = backup_survives(
        SMALL_PAYLOAD_MIB,
        Rule::on(Operation::PutObject).key_contains(LATEST).nth(1),
        Fault::ResetAfterForward,
    );
    assert!(
        run.stderr.contains("system/db/latest now names"),
        "the agent did not report the pointer it moved\n{run}"
    );
}

#[test]
fn pointer_write_error_fails_backup() {
    backup_fails_then_recovers(
        SMALL_PAYLOAD_MIB,
        Rule::on(Operation::PutObject).key_contains(LATEST),
        Fault::error(503),
        &["system/db/latest was not moved", "server error"],
    );
}

/// Holds the backup's pointer write while another writer moves the
/// pointer to `other`, a complete snapshot, then lets the write go on.
fn race_pointer_write(scene: &BackupScene, other: &str) -> AgentRun {
    let other_dump = scene.host.cluster.dump_custom_format();
    let hold = Hold::new();
    scene.proxy().inject(
        Rule::on(Operation::PutObject).key_contains(LATEST).nth(1),
        Fault::Hold(hold.clone()),
    );
    // Long enough that the held write is not retried while it waits, so
    // the write the other writer races is the one the agent sent first.
    let mut agent = scene.agent();
    agent.set("MATRIX_S3_READ_TIMEOUT", "60s");

    let running = agent.spawn(&["backup"]);
    assert!(
        hold.wait_until_held(Duration::from_secs(120)),
        "the backup never wrote the pointer"
    );
    publish_complete_snapshot(&scene.store.bucket, other, &other_dump);
    hold.release();
    running.wait()
}

#[test]
fn pointer_race_with_newer_keeps_newer() {
    let scene = BackupScene::new(SMALL_PAYLOAD_MIB);
    let mut invariants = scene.invariants();
    // A snapshot from an hour ahead: newer than any this backup can name.
    let newer = snapshot_key(Utc::now() + chrono::Duration::hours(1));

    let run = race_pointer_write(&scene, &newer);

    invariants.check_backup(&run, Ending::Succeeded);
    assert_eq!(
        invariants.pointer(),
        Some(newer.as_str()),
        "the backup moved system/db/latest back from the newer snapshot\n{run}"
    );
    let writes = scene
        .proxy()
        .exchanges_of(Operation::PutObject)
        .into_iter()
        .filter(|exchange| exchange.key.ends_with(LATEST))
        .collect::<Vec<_>>();
    assert_eq!(
        writes.first().and_then(|write| write.status),
        Some(412),
        "the held write was not rejected by its If-Match\n{run}"
    );
    invariants.assert_nothing_pending(&run.command_line);
}

#[test]
fn pointer_race_with_older_moves_forward() {
    let scene = BackupScene::new(SMALL_PAYLOAD_MIB);
    let mut invariants = scene.invariants();
    let older = "system/db/snapshots/2021-06-01T1200Z.dump";

    let run = race_pointer_write(&scene, older);

    invariants.check_backup(&run, Ending::Succeeded);
    let pointer = invariants.pointer().unwrap_or_default();
    assert!(
        pointer > older,
        "the backup left system/db/latest at {pointer}, not its newer snapshot\n{run}"
    );
    assert!(
        run.stderr.contains("changed while this backup ran"),
        "the agent did not report the race\n{run}"
    );
    invariants.assert_nothing_pending(&run.command_line);
}

#[test]
fn bucket_clock_ahead_refuses_backup() {
    let scene = BackupScene::new(SMALL_PAYLOAD_MIB);
    scene
        .proxy()
        .inject(Rule::any(), Fault::ShiftDate { seconds: 600 });
    let mut invariants = scene.invariants();

    let run = scene.agent().run(&["backup"]);

    invariants.check_backup(&run, Ending::Failed(&["backup refused", "clock", "behind"]));
    assert!(
        scene
            .proxy()
            .exchanges_of(Operation::CreateMultipartUpload)
            .is_empty(),
        "the backup uploaded under clock skew\n{run}"
    );
    scene.finish(&mut invariants);
}

#[test]
fn bucket_clock_behind_refuses_backup() {
    let scene = BackupScene::new(SMALL_PAYLOAD_MIB);
    scene
        .proxy()
        .inject(Rule::any(), Fault::ShiftDate { seconds: -600 });
    let mut invariants = scene.invariants();

    let run = scene.agent().run(&["backup"]);

    invariants.check_backup(
        &run,
        Ending::Failed(&["backup refused", "clock", "ahead of"]),
    );
    scene.finish(&mut invariants);
}

#[test]
fn small_clock_skew_is_accepted() {
    backup_survives(
        SMALL_PAYLOAD_MIB,
        Rule::any(),
        Fault::ShiftDate { seconds: 120 },
    );
}
