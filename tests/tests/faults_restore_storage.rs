//! Storage faults during `matrix-agent restore`: errors, resets, stalls
//! and short bodies on every request of the restore path.
//!
//! A restore makes these requests, in order: GET `vps-meta.json`, GET
//! `latest`, HEAD of the snapshot, then GET of its body, resumed with a
//! ranged GET from the last byte written when the body breaks.
//!
//! A transient fault must be retried or resumed and the restore must
//! succeed. A lasting one must keep the gate shut with a one-line reason,
//! leave the database as it was and no download behind, and a later
//! restore without the fault must succeed.

use std::time::{Duration, Instant};

use matrix_agent_tests::agent::AgentRun;
use matrix_agent_tests::bucket::LATEST;
use matrix_agent_tests::fault_proxy::{Fault, Operation, Rule};
use matrix_agent_tests::fault_scenario::RestoreScene;
use matrix_agent_tests::invariants::Ending;

/// Payload of every scenario snapshot: enough for a fault a mebibyte into
/// the body to hit the middle of it.
const PAYLOAD_MIB: usize = 2;

/// Where body faults strike: past the first chunks, before the end.
const ONE_MIB: u64 = 1 << 20;

const SNAPSHOTS: &str = "system/db/snapshots/";
const VPS_META: &str = "system/vps-meta.json";

/// Runs a restore while `fault` hits the requests `rule` picks, and
/// expects it to restore the snapshot anyway.
fn restore_survives(rule: Rule, fault: Fault) -> (RestoreScene, AgentRun) {
    let scene = RestoreScene::new(PAYLOAD_MIB);
    let rule_id = scene.proxy().inject(rule, fault);
    let run = {
        let mut invariants = scene.invariants();
        let run = scene.agent().run(&["restore"]);
        invariants.check_restore(&run, Ending::Succeeded);
        run
    };
    scene.assert_restored();
    assert!(
        scene.proxy().fired(rule_id) > 0,
        "the fault never fired, so the scenario tested nothing\n{run}"
    );
    (scene, run)
}

/// Runs a restore while `fault` hits every request `rule` picks, expects
/// the gate to stay shut with an error line naming each of `words` and the
/// database untouched, then restores without the fault.
fn restore_fails_closed(rule: Rule, fault: Fault, words: &[&str]) -> AgentRun {
    let scene = RestoreScene::new(PAYLOAD_MIB);
    let rule_id = scene.proxy().inject(rule, fault);
    let mut invariants = scene.invariants();

    let run = scene.agent().run(&["restore"]);

    invariants.check_restore(&run, Ending::Failed(words));
    scene.assert_untouched();
    assert!(
        scene.proxy().fired(rule_id) > 0,
        "the fault never fired, so the scenario tested nothing\n{run}"
    );

    scene.proxy().clear_faults();
    let retry = scene.agent().run(&["restore"]);
    invariants.check_restore(&retry, Ending::Succeeded);
    scene.assert_restored();
    run
}

/// Returns the ranged GETs of the snapshot: the resumed downloads.
fn resumed_reads(scene: &RestoreScene) -> usize {
    scene
        .proxy()
        .exchanges_of(Operation::GetObject)
        .iter()
        .filter(|exchange| exchange.key.contains(SNAPSHOTS) && exchange.header("range").is_some())
        .count()
}

#[test]
fn vps_meta_read_error_keeps_gate_shut() {
    restore_fails_closed(
        Rule::on(Operation::GetObject).key_contains(VPS_META),
        Fault::error(500),
        &["vps-meta.json", "server error", "gate stays shut"],
    );
}

#[test]
fn vps_meta_read_reset_is_retried() {
    restore_survives(
        Rule::on(Operation::GetObject).key_contains(VPS_META).nth(1),
        Fault::Reset,
    );
}

#[test]
fn pointer_read_error_keeps_gate_shut() {
    restore_fails_closed(
        Rule::on(Operation::GetObject).key_contains(LATEST),
        Fault::error(503),
        &["system/db/latest", "server error", "gate stays shut"],
    );
}

#[test]
fn pointer_read_throttling_is_retried() {
    restore_survives(
        Rule::on(Operation::GetObject).key_contains(LATEST).nth(1),
        Fault::error(429),
    );
}

#[test]
fn pointer_read_stall_keeps_gate_shut() {
    // Every attempt stalls past MATRIX_S3_READ_TIMEOUT (3 s): the restore
    // must give up after its three attempts, not wait out the stall.
    let started = Instant::now();
    restore_fails_closed(
        Rule::on(Operation::GetObject).key_contains(LATEST),
        Fault::Stall(Duration::from_secs(60)),
        &["system/db/latest", "timed out", "gate stays shut"],
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the restore waited out the stall instead of timing out"
    );
}

#[test]
fn snapshot_head_error_keeps_gate_shut() {
    restore_fails_closed(
        Rule::on(Operation::HeadObject).key_contains(SNAPSHOTS),
        Fault::error(500),
        &["cannot read the snapshot", "HTTP 500", "gate stays shut"],
    );
}

#[test]
fn snapshot_head_reset_is_retried() {
    restore_survives(
        Rule::on(Operation::HeadObject)
            .key_contains(SNAPSHOTS)
            .nth(1),
        Fault::Reset,
    );
}

#[test]
fn body_503_is_retried() {
    restore_survives(
        Rule::on(Operation::GetObject)
            .key_contains(SNAPSHOTS)
            .nth(1),
        Fault::error(503),
    );
}

#[test]
fn body_reset_midway_resumes() {
    let (scene, run) = restore_survives(
        Rule::on(Operation::GetObject)
            .key_contains(SNAPSHOTS)
            .nth(1),
        Fault::ResetBody { after: ONE_MIB },
    );
    assert!(
        resumed_reads(&scene) >= 1,
        "the download started over instead of resuming with a Range\n{run}"
    );
}

#[test]
fn truncated_body_resumes() {
    let (scene, run) = restore_survives(
        Rule::on(Operation::GetObject)
            .key_contains(SNAPSHOTS)
            .nth(1),
        Fault::TruncateBody { after: ONE_MIB },
    );
    assert!(
        resumed_reads(&scene) >= 1,
        "the download did not resume after the short body\n{run}"
    );
}

#[test]
fn body_stall_resumes() {
    // The body stops for longer than MATRIX_S3_STALL_GRACE and the read
    // timeout; the agent must drop the connection and resume.
    let started = Instant::now();
    let (scene, run) = restore_survives(
        Rule::on(Operation::GetObject)
            .key_contains(SNAPSHOTS)
            .nth(1),
        Fault::StallBody {
            after: ONE_MIB,
            pause: Duration::from_secs(60),
        },
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the restore waited out the stall\n{run}"
    );
    assert!(
        resumed_reads(&scene) >= 1,
        "the download did not resume\n{run}"
    );
}

#[test]
fn body_response_stall_is_retried() {
    restore_survives(
        Rule::on(Operation::GetObject)
            .key_contains(SNAPSHOTS)
            .nth(1),
        Fault::Stall(Duration::from_secs(60)),
    );
}

#[test]
fn resumed_read_error_is_retried() {
    let scene = RestoreScene::new(PAYLOAD_MIB);
    scene.proxy().inject(
        Rule::on(Operation::GetObject)
            .key_contains(SNAPSHOTS)
            .ranged(false),
        Fault::ResetBody { after: ONE_MIB },
    );
    scene.proxy().inject(
        Rule::on(Operation::GetObject)
            .key_contains(SNAPSHOTS)
            .ranged(true)
            .nth(1),
        Fault::error(500),
    );
    let mut invariants = scene.invariants();

    let run = scene.agent().run(&["restore"]);

    invariants.check_restore(&run, Ending::Succeeded);
    scene.assert_restored();
    assert!(
        resumed_reads(&scene) >= 2,
        "the ranged read was not retried\n{run}"
    );
}

#[test]
fn body_resets_every_time_keep_gate_shut() {
    restore_fails_closed(
        Rule::on(Operation::GetObject).key_contains(SNAPSHOTS),
        Fault::ResetBody { after: ONE_MIB / 4 },
        &["download of the snapshot failed", "gate stays shut"],
    );
}

#[test]
fn truncated_every_time_keeps_gate_shut() {
    restore_fails_closed(
        Rule::on(Operation::GetObject).key_contains(SNAPSHOTS),
        Fault::TruncateBody { after: 0 },
        &["download of the snapshot failed", "gate stays shut"],
    );
}
