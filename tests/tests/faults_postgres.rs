//! PostgreSQL faults: a server that is down or goes away during a dump,
//! client tools that are killed, fail half-way or are too old. After each
//! scenario the bucket invariants hold and a normal run recovers.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use matrix_agent_tests::agent::{Agent, RunningAgent};
use matrix_agent_tests::fault_proxy::{Fault, Hold, Operation, Rule};
use matrix_agent_tests::fault_scenario::{BackupScene, RestoreScene};
use matrix_agent_tests::install_root::FakeInstallRoot;
use matrix_agent_tests::invariants::{Ending, Invariants};
use matrix_agent_tests::postgres::Cluster;
use matrix_agent_tests::process::{children_of, command_name};
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use tempfile::TempDir;

/// MiB of incompressible data in the table `payload` of the mid-dump
/// scenarios: more than the one 5 MiB part the agent reads before the
/// proxy holds it, so pg_dump is blocked writing that table.
const MID_DUMP_PAYLOAD_MIB: usize = 10;

/// How long a held request may wait for the test before the scenario
/// fails.
const HOLD_WAIT: Duration = Duration::from_secs(60);

/// Returns the scene's agent with one part in flight and a read timeout
/// longer than the test keeps the first part held.
fn one_part_at_a_time(scene: &BackupScene) -> Agent {
    let mut agent = scene.agent();
    agent
        .set("MATRIX_UPLOAD_CONCURRENCY", "1")
        .set("MATRIX_S3_READ_TIMEOUT", "30s");
    agent
}

/// Starts a backup whose first part the proxy holds, and waits until it is
/// held: pg_dump has written at least one part and is blocked half-way.
fn start_backup_held_at_first_part(scene: &BackupScene) -> (RunningAgent, Hold) {
    let hold = Hold::new();
    scene.proxy().inject(
        Rule::on(Operation::UploadPart).nth(1),
        Fault::Hold(hold.clone()),
    );
    let running = one_part_at_a_time(scene).spawn(&["backup"]);
    assert!(
        hold.wait_until_held(HOLD_WAIT),
        "the backup never sent its first part"
    );
    (running, hold)
}

/// Returns the pid of the agent's `pg_dump` child.
fn pg_dump_of(agent_pid: u32) -> u32 {
    children_of(agent_pid)
        .into_iter()
        .find(|&pid| command_name(pid).as_deref() == Some("pg_dump"))
        .unwrap_or_else(|| panic!("agent {agent_pid} has no pg_dump child"))
}

/// Adds a small table whose rows pg_dump copies after `payload`'s, since it
/// copies tables in name order. A dump blocked in `payload` has yet to ask
/// the server for this table's rows, so it cannot complete once the server
/// is gone, even when the socket buffers already hold the rest of
/// `payload`.
fn add_table_dumped_last(cluster: &Cluster) {
    cluster.psql(
        "CREATE TABLE zz_dumped_last (id integer PRIMARY KEY);
         INSERT INTO zz_dumped_last VALUES (1)",
    );
}

/// Returns the query of the agent's pg_dump session, as pg_stat_activity
/// reports it.
fn pg_dump_query(cluster: &Cluster) -> String {
    cluster.psql_as_superuser(
        "SELECT query FROM pg_stat_activity
         WHERE application_name = 'matrix-agent' AND backend_type = 'client backend'",
    )
}

/// Writes an executable stand-in for a PostgreSQL client program that
/// reports version 12 and does nothing else, alone in a directory that
/// can serve as the agent's whole `PATH`.
fn old_client_on_path(program: &str) -> TempDir {
    let dir = tempfile::Builder::new()
        .prefix("matrix-old-client-")
        .tempdir()
        .expect("creating the stand-in directory");
    let path = dir.path().join(program);
    fs::write(
        &path,
        format!("#!/bin/sh\necho '{program} (PostgreSQL) 12.22'\n"),
    )
    .expect("writing the stand-in");
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755))
        .expect("making the stand-in executable");
    dir
}

/// Makes `agent` find PostgreSQL's client programs only in `path_dir`: an
/// empty install root and a `PATH` of that one directory.
fn only_clients_in(agent: &mut Agent, path_dir: &Path, empty_root: &Path) {
    agent
        .set("MATRIX_PG_INSTALL_ROOT", empty_root.display().to_string())
        .set("PATH", path_dir.display().to_string());
}

#[test]
fn backup_with_postgres_down_fails_after_wait() {
    let mut scene = BackupScene::new(0);
    let mut invariants = Invariants::new(&scene.store.bucket, &scene.host);
    scene.host.cluster.stop();
    let mut agent = scene.agent();
    agent.set("MATRIX_PG_WAIT", "3s");

    let started = Instant::now();
    let run = agent.run(&["backup"]);
    let elapsed = started.elapsed();

    invariants.check_backup(
        &run,
        Ending::Failed(&["PostgreSQL", "did not accept connections within 3s"]),
    );
    assert!(
        elapsed >= Duration::from_secs(3),
        "the backup gave up before MATRIX_PG_WAIT ({elapsed:?})\n{run}"
    );
    assert!(
        elapsed < Duration::from_secs(10),
        "the backup waited far beyond MATRIX_PG_WAIT ({elapsed:?})\n{run}"
    );
    assert!(
        scene
            .proxy()
            .exchanges_of(Operation::CreateMultipartUpload)
            .is_empty(),
        "the backup started an upload without a database\n{run}"
    );

    scene.host.cluster.start_again();
    scene.finish(&mut invariants);
}

#[test]
fn restore_with_postgres_down_fails_closed() {
    let mut scene = RestoreScene::new(0);
    let mut invariants = Invariants::new(&scene.store.bucket, &scene.host);
    scene.host.cluster.stop();
    let mut agent = scene.agent();
    agent.set("MATRIX_PG_WAIT", "3s");

    let run = agent.run(&["restore"]);

    invariants.check_restore(
        &run,
        Ending::Failed(&["PostgreSQL", "did not accept connections within 3s"]),
    );

    scene.host.cluster.start_again();
    scene.assert_untouched();
    let run = scene.agent().run(&["restore"]);
    invariants.check_restore(&run, Ending::Succeeded);
    scene.assert_restored();
}

#[test]
fn postgres_stopped_mid_dump_aborts_upload() {
    let mut scene = BackupScene::new(MID_DUMP_PAYLOAD_MIB);
    add_table_dumped_last(&scene.host.cluster);
    let mut invariants = Invariants::new(&scene.store.bucket, &scene.host);
    let (running, hold) = start_backup_held_at_first_part(&scene);
    let query = pg_dump_query(&scene.host.cluster);
    assert!(
        query.starts_with("COPY public.payload "),
        "pg_dump was expected to be copying the table payload, not {query:?}"
    );

    scene.host.cluster.stop();
    hold.release();
    let run = running.wait();

    invariants.check_backup(&run, Ending::Failed(&["pg_dump", "upload was aborted"]));
    assert!(
        run.stderr.contains("aborted the upload"),
        "the agent did not report the aborted upload\n{run}"
    );
    invariants.assert_nothing_pending(&run.command_line);

    scene.host.cluster.start_again();
    scene.finish(&mut invariants);
}

#[test]
fn pg_dump_killed_by_signal_aborts_upload() {
    let scene = BackupScene::new(MID_DUMP_PAYLOAD_MIB);
    let mut invariants = scene.invariants();
    let (running, hold) = start_backup_held_at_first_part(&scene);

    let pg_dump = pg_dump_of(running.id());
    signal::kill(Pid::from_raw(pg_dump as i32), Signal::SIGKILL).expect("killing pg_dump");
    hold.release();
    let run = running.wait();

    invariants.check_backup(
        &run,
        Ending::Failed(&["pg_dump", "SIGKILL", "upload was aborted"]),
    );
    invariants.assert_nothing_pending(&run.command_line);
    scene.finish(&mut invariants);
}

#[test]
fn sigterm_mid_backup_aborts_upload() {
    let scene = BackupScene::new(MID_DUMP_PAYLOAD_MIB);
    let mut invariants = scene.invariants();
    let (running, hold) = start_backup_held_at_first_part(&scene);

    // `systemctl stop` sends SIGTERM; the agent must clean up, not vanish.
    signal::kill(Pid::from_raw(running.id() as i32), Signal::SIGTERM).expect("sending SIGTERM");
    hold.release();
    let run = running.wait();

    invariants.check_backup(&run, Ending::Failed(&["interrupted by SIGTERM", "aborted"]));
    invariants.assert_nothing_pending(&run.command_line);
    let record = std::fs::read_to_string(scene.host.state_dir().join("last-backup.json"))
        .expect("reading last-backup.json");
    assert!(
        record.contains("interrupted by SIGTERM"),
        "last-backup.json does not record the interrupted run:\n{record}"
    );
    scene.finish(&mut invariants);
}

#[test]
fn pg_restore_fails_then_retry_succeeds() {
    let scene = RestoreScene::new(1);
    // The first restore creates the tables, loads no row and fails as a
    // restore that loses its connection would; later ones run as usual.
    let install_root = FakeInstallRoot::with_program_script(
        scene.host.cluster.bin(),
        "pg_restore",
        "for arg in \"$@\"; do\n\
         \tcase \"$arg\" in --list|-l) exec \"$real_program\" \"$@\" ;; esac\n\
         done\n\
         if [ ! -e \"$state/failed-once\" ]; then\n\
         \t: > \"$state/failed-once\"\n\
         \t\"$real_program\" --section=pre-data \"$@\"\n\
         \techo 'pg_restore: error: could not execute query: server closed the connection unexpectedly' >&2\n\
         \texit 1\n\
         fi\n\
         exec \"$real_program\" \"$@\"",
    );
    let mut agent = scene.agent();
    agent.set(
        "MATRIX_PG_INSTALL_ROOT",
        install_root.path().display().to_string(),
    );
    let mut invariants = Invariants::new(&scene.store.bucket, &scene.host);

    let run = agent.run(&["restore"]);

    invariants.check_restore(
        &run,
        Ending::Failed(&["pg_restore failed", "gate stays shut"]),
    );
    assert_eq!(
        scene.host.cluster.psql("SELECT count(*) FROM notes"),
        "0",
        "the failed restore was expected to stop after creating the tables\n{run}"
    );

    let run = agent.run(&["restore"]);

    invariants.check_restore(&run, Ending::Succeeded);
    scene.assert_restored();
}

#[test]
fn older_pg_dump_is_refused() {
    let scene = BackupScene::new(0);
    let mut invariants = scene.invariants();
    let old_client = old_client_on_path("pg_dump");
    let empty_root = TempDir::new().expect("creating an empty install root");
    let mut agent = scene.agent();
    only_clients_in(&mut agent, old_client.path(), empty_root.path());

    let run = agent.run(&["backup"]);

    let server_major = scene.host.cluster.bin().major().to_string();
    invariants.check_backup(
        &run,
        Ending::Failed(&[
            "no pg_dump for PostgreSQL",
            &server_major,
            "is version 12",
            "older pg_dump cannot handle a newer server",
        ]),
    );
    assert!(
        scene.proxy().exchanges_of(Operation::UploadPart).is_empty(),
        "the backup uploaded a dump made by an older pg_dump\n{run}"
    );
    scene.finish(&mut invariants);
}

#[test]
fn older_pg_restore_is_refused() {
    let scene = RestoreScene::new(0);
    let mut invariants = scene.invariants();
    let old_client = old_client_on_path("pg_restore");
    let empty_root = TempDir::new().expect("creating an empty install root");
    let mut agent = scene.agent();
    only_clients_in(&mut agent, old_client.path(), empty_root.path());

    let run = agent.run(&["restore"]);

    invariants.check_restore(
        &run,
        Ending::Failed(&["no pg_restore for PostgreSQL", "is version 12"]),
    );
    scene.assert_untouched();

    let run = scene.agent().run(&["restore"]);
    invariants.check_restore(&run, Ending::Succeeded);
    scene.assert_restored();
}

/// A password the server rejects is not worth waiting for: the backup
/// fails at once, long before MATRIX_PG_WAIT, and prints neither password.
#[test]
fn backup_with_wrong_password_fails_at_once() {
    const WRONG_PASSWORD: &str = "matrix-test-wrong-password-7c1e";
    let scene = BackupScene::new(0);
    let mut invariants = scene.invariants();
    let mut agent = scene.agent();
    agent
        .set("POSTGRES_PASSWORD", WRONG_PASSWORD)
        .set("MATRIX_PG_WAIT", "60s");

    let started = Instant::now();
    let run = agent.run(&["backup"]);
    let elapsed = started.elapsed();

    invariants.check_backup(
        &run,
        Ending::Failed(&[
            "PostgreSQL rejected the connection",
            "password authentication failed",
        ]),
    );
    assert!(
        elapsed < Duration::from_secs(30),
        "the backup waited for a server that had already rejected it ({elapsed:?})\n{run}"
    );
    assert!(
        !run.stderr.contains(WRONG_PASSWORD),
        "the backup printed the password it was given\n{run}"
    );
    scene.finish(&mut invariants);
}

#[test]
fn restore_with_missing_database_fails_closed() {
    let scene = RestoreScene::new(0);
    let mut invariants = scene.invariants();
    let mut agent = scene.agent();
    agent.set("POSTGRES_DB", "matrix_missing");

    let run = agent.run(&["restore"]);

    invariants.check_restore(
        &run,
        Ending::Failed(&[
            "PostgreSQL rejected the connection",
            "database \"matrix_missing\" does not exist",
        ]),
    );
    scene.assert_untouched();
}
