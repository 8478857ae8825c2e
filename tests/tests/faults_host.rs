//! Host faults: the agent killed with SIGKILL at random points, too little
//! free disk for a download, and a restore marker that cannot be written.
//! After each scenario the bucket invariants hold and a normal run
//! recovers.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use matrix_agent_tests::agent::{binary_path, Agent, AgentRun};
use matrix_agent_tests::fault_proxy::{Fault, Operation, Rule};
use matrix_agent_tests::fault_scenario::{BackupScene, RestoreScene};
use matrix_agent_tests::host::{Host, ObjectStore};
use matrix_agent_tests::invariants::{downloaded_dumps, Ending, Invariants};
use matrix_agent_tests::process::kill_process_tree;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tempfile::TempDir;

/// Backups killed in the SIGKILL scenario.
const BACKUP_KILLS: usize = 50;

/// MiB of incompressible data in the SIGKILL backup scenario: two parts,
/// so that kills land between parts too, while one run stays short.
const BACKUP_PAYLOAD_MIB: usize = 6;

/// Restores killed in the SIGKILL restore scenario.
const RESTORE_KILLS: usize = 10;

/// Returns the seed for a randomised scenario: `MATRIX_TEST_SEED` when set,
/// so that a failure can be replayed, else a fresh one. Either way it is
/// printed.
fn seed() -> u64 {
    let seed = match std::env::var("MATRIX_TEST_SEED") {
        Ok(text) => text
            .parse()
            .unwrap_or_else(|_| panic!("MATRIX_TEST_SEED is {text:?}; expected a number")),
        Err(_) => rand::random(),
    };
    eprintln!("seed {seed}; set MATRIX_TEST_SEED={seed} to replay this run");
    seed
}

/// Starts `command`, kills the agent and everything it started with SIGKILL
/// after `delay` (as systemd kills a unit's control group), and returns
/// the run however it ended.
fn run_killed_after(agent: &Agent, command: &str, delay: Duration) -> AgentRun {
    let running = agent.spawn(&[command]);
    thread::sleep(delay);
    // A run that already ended is a zombie until `wait` reaps it, so its
    // pid cannot have been reused by another process.
    kill_process_tree(running.id());
    running.wait()
}

/// Describes how far a run got: the first words of its last log line,
/// without the time stamp, the level and words with digits (keys, sizes),
/// so that runs stopped at the same step count together.
fn last_step(run: &AgentRun) -> String {
    let line = run.stderr.lines().last().unwrap_or("(nothing logged)");
    let message = line
        .split_once(" INFO ")
        .or_else(|| line.split_once(" WARN "))
        .or_else(|| line.split_once(" ERROR "))
        .map_or(line, |(_, message)| message)
        .trim();
    message
        .split_whitespace()
        .filter(|word| !word.chars().any(|c| c.is_ascii_digit()))
        .take(4)
        .collect::<Vec<_>>()
        .join(" ")
}

fn print_steps(title: &str, steps: &BTreeMap<String, usize>) {
    eprintln!("{title}:");
    for (step, count) in steps {
        eprintln!("  {count:3}  {step}");
    }
}

/// Places where Debian and Ubuntu install libfaketime's multi-threaded
/// library.
const LIBFAKETIME_CANDIDATES: [&str; 2] = [
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
];

fn libfaketime() -> &'static str {
    LIBFAKETIME_CANDIDATES
        .into_iter()
        .find(|path| Path::new(path).is_file())
        .unwrap_or_else(|| {
            panic!(
                "libfaketime is missing (looked for {LIBFAKETIME_CANDIDATES:?}); install the \
                 Debian package libfaketime"
            )
        })
}

/// Returns the scene's agent with its wall clock `minutes_behind` minutes
/// behind the host's, and makes the bucket's `Date` header agree, so that
/// the clock-skew guard lets the run go on.
///
/// Snapshot names come from the agent's clock, one a minute. A run killed
/// after it created its snapshot takes that minute's name, and every later
/// run in the same minute would wait for the next one instead of doing
/// work. Each killed run therefore gets a minute of its own: the clock of
/// run `i` is `BACKUP_KILLS + 5 - i` minutes behind, so the names it picks
/// keep rising and all stay older than the real time of the final backup.
fn agent_minutes_behind(scene: &BackupScene, minutes_behind: u64) -> Agent {
    let seconds = (minutes_behind * 60) as i64;
    scene.proxy().clear_faults();
    scene
        .proxy()
        .inject(Rule::any(), Fault::ShiftDate { seconds: -seconds });
    let mut agent = scene.agent();
    agent
        .set("LD_PRELOAD", libfaketime())
        .set("FAKETIME", format!("-{seconds}"))
        // Timers and timeouts keep the real monotonic clock.
        .set("FAKETIME_DONT_FAKE_MONOTONIC", "1");
    agent
}

#[test]
fn backup_survives_random_sigkills() {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let scene = BackupScene::new(BACKUP_PAYLOAD_MIB);
    let mut invariants = scene.invariants();

    let started = Instant::now();
    let run = agent_minutes_behind(&scene, BACKUP_KILLS as u64 + 10).run(&["backup"]);
    let full_run = started.elapsed();
    invariants.check_backup(&run, Ending::Succeeded);
    eprintln!("an uninterrupted backup takes {full_run:?}");
    let mut steps = BTreeMap::new();

    for run_index in 0..BACKUP_KILLS {
        let agent = agent_minutes_behind(&scene, (BACKUP_KILLS + 5 - run_index) as u64);
        let delay = full_run.mul_f64(rng.random_range(0.0..1.0));

        let run = run_killed_after(&agent, "backup", delay);

        let ending = match run.exit_code() {
            None => Ending::Killed,
            Some(0) => Ending::Succeeded,
            Some(_) => panic!("a backup failed without a fault after {delay:?}\n{run}"),
        };
        invariants.check_backup(&run, ending);
        let step = match ending {
            Ending::Killed => last_step(&run),
            _ => "(finished before the kill)".to_owned(),
        };
        *steps.entry(step).or_insert(0) += 1;
    }
    print_steps("kills by the last step logged", &steps);

    scene.finish(&mut invariants);
}

/// Restores `scene`'s changes to the database and removes the marker, so
/// that the next restore has work to do again.
fn undo_restore(scene: &RestoreScene) {
    scene.host.remove_marker();
    scene.host.cluster.psql(
        "DROP TABLE IF EXISTS payload;
         INSERT INTO notes VALUES (3, 'written after the snapshot')",
    );
    scene.assert_untouched();
}

#[test]
fn restore_after_random_sigkills_succeeds() {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let scene = RestoreScene::new(8);
    let agent = scene.agent();

    let started = Instant::now();
    let run = agent.run(&["restore"]);
    let full_run = started.elapsed();
    run.assert_exit_code(0);
    eprintln!("an uninterrupted restore takes {full_run:?}");
    undo_restore(&scene);
    let mut invariants = scene.invariants();
    let mut steps = BTreeMap::new();

    for _ in 0..RESTORE_KILLS {
        let delay = full_run.mul_f64(rng.random_range(0.0..1.0));

        let run = run_killed_after(&agent, "restore", delay);

        let ending = match run.exit_code() {
            None => Ending::Killed,
            Some(0) => Ending::Succeeded,
            Some(_) => panic!("a restore failed without a fault after {delay:?}\n{run}"),
        };
        invariants.check_restore(&run, ending);
        *steps.entry(last_step(&run)).or_insert(0) += 1;
        if scene.host.has_regular_marker() {
            // The marker is written last, so this run restored everything
            // before the kill.
            scene.assert_restored();
            undo_restore(&scene);
        }
    }
    print_steps("kills by the last step logged", &steps);
    // A restore killed while it downloaded a snapshot that latest no longer
    // names leaves a file that no later download overwrites.
    let download_dir = scene.host.state_dir().join("download");
    fs::create_dir_all(&download_dir).expect("creating the download directory");
    fs::write(
        download_dir.join("2019-12-31T2359Z.dump"),
        vec![0u8; 1 << 20],
    )
    .expect("writing the download of a killed restore");

    let run = agent.run(&["restore"]);

    invariants.check_restore(&run, Ending::Succeeded);
    scene.assert_restored();
    assert_eq!(
        downloaded_dumps(&scene.host.state_dir()),
        Vec::<PathBuf>::new(),
        "downloads of killed restores are left\n{run}"
    );
}

#[test]
fn restore_without_free_disk_fails_closed() {
    let scene = RestoreScene::new(0);
    let mut invariants = scene.invariants();
    let mut agent = scene.agent();
    agent.set("MATRIX_DISK_RESERVE", "1000000TiB");

    let run = agent.run(&["restore"]);

    invariants.check_restore(
        &run,
        Ending::Failed(&["not enough free disk", "MATRIX_DISK_RESERVE"]),
    );
    scene.assert_untouched();
    assert!(
        scene
            .proxy()
            .exchanges_of(Operation::GetObject)
            .iter()
            .all(|exchange| !exchange.key.contains("snapshots/")),
        "the snapshot was downloaded although the disk is too small\n{run}"
    );

    let run = scene.agent().run(&["restore"]);
    invariants.check_restore(&run, Ending::Succeeded);
    scene.assert_restored();
}

/// Makes the marker's directory read-only for the agent and returns the
/// error text the agent's write then gets.
///
/// The tests usually run as root, for whom mode bits do not count
/// (CAP_DAC_OVERRIDE), so for root the agent runs in a private mount
/// namespace where that directory is bind-mounted read-only: writes there
/// fail with EROFS, as on a read-only root file system, and nothing outside
/// the agent's namespace changes. Another user gets mode 0555 and EACCES.
fn read_only_marker_directory(agent: &mut Agent, marker: &Path, scratch: &Path) -> &'static str {
    let directory = marker.parent().expect("the marker has a directory");
    if !nix::unistd::geteuid().is_root() {
        fs::set_permissions(directory, fs::Permissions::from_mode(0o555))
            .expect("making the marker directory read-only");
        return "permission denied";
    }
    let wrapper = scratch.join("agent-with-read-only-marker-directory");
    fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\n\
             exec unshare --mount --propagation private -- sh -c \
             'mount --bind -o ro \"$0\" \"$0\" && exec \"$@\"' '{}' '{}' \"$@\"\n",
            directory.display(),
            binary_path().display()
        ),
    )
    .expect("writing the namespace wrapper");
    fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755))
        .expect("making the namespace wrapper executable");
    agent.set_program(wrapper);
    "read-only file system"
}

#[test]
fn marker_in_read_only_directory_keeps_gate_shut() {
    let scene = RestoreScene::new(0);
    let mut invariants = scene.invariants();
    let scratch = TempDir::new().expect("creating a scratch directory");
    let mut agent = scene.agent();
    let error = read_only_marker_directory(&mut agent, &scene.host.marker_path(), scratch.path());

    let run = agent.run(&["restore"]);

    invariants.check_restore(
        &run,
        Ending::Failed(&["cannot write the restore marker", error]),
    );
    let directory = scene.host.marker_path();
    let directory = directory.parent().expect("the marker has a directory");
    fs::set_permissions(directory, fs::Permissions::from_mode(0o755))
        .expect("making the marker directory writable again");

    let run = scene.agent().run(&["restore"]);
    invariants.check_restore(&run, Ending::Succeeded);
    scene.assert_restored();
}

/// A marker path whose directory does not exist fails the same way on a
/// fresh host, where nothing was restored: the fresh-host decision only
/// counts once its marker is written.
#[test]
fn marker_directory_missing_keeps_gate_shut() {
    let store = ObjectStore::start_with_proxy();
    let host = Host::new(&store);
    let mut invariants = Invariants::new(&store.bucket, &host);
    let directory = host.marker_path();
    let directory = directory.parent().expect("the marker has a directory");
    fs::remove_dir(directory).expect("removing the marker directory");

    let run = host.restore();

    invariants.check_restore(
        &run,
        Ending::Failed(&[
            "cannot write the restore marker",
            "no such file or directory",
        ]),
    );
    fs::create_dir(directory).expect("creating the marker directory again");

    let run = host.restore();
    invariants.check_restore(&run, Ending::Succeeded);
}
