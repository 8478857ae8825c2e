//! The harness itself: servers start, respond, and leave no process or
//! directory behind.

use std::thread;
use std::time::{Duration, Instant};

use matrix_agent_tests::agent::DATABASE_PASSWORD;
use matrix_agent_tests::bucket::Bucket;
use matrix_agent_tests::moto::MotoServer;
use matrix_agent_tests::postgres::Cluster;
use matrix_agent_tests::process::{children_of, is_running};

#[test]
fn cluster_and_moto_stop_on_drop() {
    let cluster = Cluster::start(DATABASE_PASSWORD);
    let moto = MotoServer::start();
    let bucket = Bucket::create(&moto.endpoint(), "harness", "matrixos-sync/user_harness/");

    assert_eq!(cluster.psql("SELECT current_user"), "matrix_owner");
    assert_eq!(cluster.psql("SELECT 'grüße ' || 1 + 1"), "grüße 2");
    bucket.put("system/probe", b"hello");
    assert_eq!(bucket.get("system/probe").as_deref(), Some(&b"hello"[..]));
    assert_eq!(bucket.get("system/absent"), None);

    let postmaster = cluster.server_pid().expect("the server runs");
    let backends = children_of(postmaster);
    let moto_pid = moto.pid();
    let data_dir = cluster.socket_dir().to_owned();
    assert!(
        !backends.is_empty(),
        "the postmaster has no child processes"
    );

    drop(bucket);
    drop(moto);
    drop(cluster);

    assert!(
        !is_running(postmaster),
        "postmaster {postmaster} still runs"
    );
    for pid in backends {
        assert!(!is_running(pid), "server process {pid} still runs");
    }
    assert!(!is_running(moto_pid), "moto_server {moto_pid} still runs");
    assert!(!data_dir.exists(), "{} was not removed", data_dir.display());
}

#[test]
fn cluster_restarts_on_same_port() {
    let mut cluster = Cluster::start(DATABASE_PASSWORD);
    cluster.psql("CREATE TABLE kept (value text); INSERT INTO kept VALUES ('still here')");
    let port = cluster.port();

    cluster.stop();
    cluster.start_again();

    assert_eq!(cluster.port(), port);
    assert_eq!(cluster.psql("SELECT value FROM kept"), "still here");
}

/// A server whose guard is never dropped (as when a test binary is killed)
/// still stops: it gets a signal when the thread that started it exits.
#[test]
fn servers_die_with_spawning_thread() {
    let (postmaster, moto_pid, directories) = thread::spawn(|| {
        let cluster = Cluster::start(DATABASE_PASSWORD);
        let moto = MotoServer::start();
        let pids = (
            cluster.server_pid().expect("the server runs"),
            moto.pid(),
            [cluster.socket_dir().to_owned(), moto.log_dir().to_owned()],
        );
        std::mem::forget(cluster);
        std::mem::forget(moto);
        pids
    })
    .join()
    .expect("the spawning thread panicked");

    let deadline = Instant::now() + Duration::from_secs(20);
    while (is_running(postmaster) || is_running(moto_pid)) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
    }
    // The forgotten guards cannot delete their directory.
    for directory in directories {
        let _ = std::fs::remove_dir_all(directory);
    }

    assert!(
        !is_running(postmaster),
        "postmaster {postmaster} outlived its thread"
    );
    assert!(
        !is_running(moto_pid),
        "moto_server {moto_pid} outlived its thread"
    );
}
