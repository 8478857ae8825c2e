//! Malformed environments: every missing, empty or invalid setting makes
//! the agent exit 2 with one line that names the variable. The agent must
//! not touch the bucket, the database or the restore marker first, and
//! must print no secret, which the harness checks in every run's output.

use std::collections::BTreeMap;
use std::path::PathBuf;

use matrix_agent_tests::agent::{
    Agent, ACCESS_KEY_ID, DATABASE_PASSWORD, SECRET_ACCESS_KEY, SESSION_TOKEN,
};
use matrix_agent_tests::host::{user_prefix, BUCKET_NAME, USER_ID};
use matrix_agent_tests::loopback::ConnectionCounter;
use matrix_agent_tests::postgres::{DATABASE, OWNER};
use tempfile::TempDir;

/// The commands that read the whole configuration.
const EVERY_COMMAND: &[&str] = &["backup", "restore", "heartbeat"];

/// The command that also reads the heartbeat's own settings.
const HEARTBEAT: &[&str] = &["heartbeat"];

/// The registration token of the environment, which the agent must never
/// print either.
const REGISTRATION_TOKEN: &str = "matrix-test-registration-token-3f9a61c0";

/// A complete, valid environment whose bucket, database and platform are
/// connection counters on 127.0.0.1, so a test can tell that the agent
/// contacted none of them.
struct Environment {
    bucket: ConnectionCounter,
    database: ConnectionCounter,
    platform: ConnectionCounter,
    dir: TempDir,
    vars: BTreeMap<String, String>,
}

impl Environment {
    fn new() -> Environment {
        let bucket = ConnectionCounter::start();
        let database = ConnectionCounter::start();
        let platform = ConnectionCounter::start();
        let dir = tempfile::Builder::new()
            .prefix("matrix-input-")
            .tempdir()
            .expect("creating the host directory");
        let path = |name: &str| dir.path().join(name).display().to_string();
        let env_dir = path("env");
        std::fs::create_dir(&env_dir).expect("creating the env directory");

        let vars = [
            ("MATRIX_MACHINE_ID", uuid::Uuid::new_v4().to_string()),
            ("MATRIX_CLERK_USER_ID", USER_ID.to_owned()),
            ("MATRIX_R2_BUCKET", BUCKET_NAME.to_owned()),
            ("MATRIX_R2_PREFIX", user_prefix()),
            ("R2_ENDPOINT", bucket.url()),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID.to_owned()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY.to_owned()),
            ("AWS_SESSION_TOKEN", SESSION_TOKEN.to_owned()),
            ("AWS_DEFAULT_REGION", "auto".to_owned()),
            ("POSTGRES_DB", DATABASE.to_owned()),
            ("POSTGRES_USER", OWNER.to_owned()),
            ("POSTGRES_PASSWORD", DATABASE_PASSWORD.to_owned()),
            ("PGHOST", "127.0.0.1".to_owned()),
            ("PGPORT", database.port().to_string()),
            ("MATRIX_STATE_DIR", path("var-lib-matrix")),
            ("MATRIX_RESTORE_MARKER", path("restore-complete")),
            ("MATRIX_ENV_DIR", env_dir),
            ("MATRIX_PG_WAIT", "2s".to_owned()),
            (
                "MATRIX_PLATFORM_REGISTER_URL",
                format!("{}/vps/register", platform.url()),
            ),
            ("MATRIX_REGISTRATION_TOKEN", REGISTRATION_TOKEN.to_owned()),
            ("MATRIX_STATUS_LISTEN", "127.0.0.1:0".to_owned()),
            ("MATRIX_INSTANCE_DATA", path("instance-data.json")),
        ]
        .into_iter()
        .map(|(name, value)| (name.to_owned(), value))
        .collect();
        Environment {
            bucket,
            database,
            platform,
            dir,
            vars,
        }
    }

    /// Returns the agent with each `(name, value)` change applied; `None`
    /// removes the variable.
    fn agent(&self, changes: &[(&str, Option<String>)]) -> Agent {
        let mut vars = self.vars.clone();
        for (name, value) in changes {
            match value {
                Some(value) => vars.insert((*name).to_owned(), value.clone()),
                None => vars.remove(*name),
            };
        }
        Agent::new(vars)
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("var-lib-matrix")
    }

    fn marker(&self) -> PathBuf {
        self.dir.path().join("restore-complete")
    }
}

fn set(value: &str) -> Option<String> {
    Some(value.to_owned())
}

const UNSET: Option<String> = None;

/// Runs each of `commands` with `changes` applied to a valid environment
/// and checks that it exits 2 with one line naming `variable` and touches
/// nothing.
fn assert_rejected(commands: &[&str], changes: &[(&str, Option<String>)], variable: &str) {
    let environment = Environment::new();
    let agent = environment.agent(changes);

    for command in commands {
        let run = agent.run(&[command]);

        run.assert_exit_code(2);
        let lines: Vec<&str> = run.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "expected one line of output\n{run}");
        assert!(
            lines[0].contains("ERROR invalid configuration: "),
            "the line is not a configuration error\n{run}"
        );
        assert!(
            lines[0].contains(variable),
            "the error does not name {variable}\n{run}"
        );
        assert!(
            !lines[0].contains(REGISTRATION_TOKEN),
            "the error shows the registration token\n{run}"
        );
        assert_eq!(run.stdout, "", "unexpected output on stdout\n{run}");
    }

    assert_eq!(environment.bucket.accepted(), 0, "the bucket was contacted");
    assert_eq!(
        environment.database.accepted(),
        0,
        "the database was contacted"
    );
    assert_eq!(
        environment.platform.accepted(),
        0,
        "the platform was contacted"
    );
    assert!(
        !environment.marker().exists(),
        "a restore marker was written"
    );
    assert!(
        !environment.state_dir().exists(),
        "the state directory was created"
    );
}

/// Declares one test per malformed setting: the commands to run, the
/// changes to a valid environment, and the variable the error must name.
macro_rules! rejected {
    ($($test:ident: $commands:expr, [$(($name:expr, $value:expr)),+ $(,)?] => $variable:expr;)+) => {
        $(
            #[test]
            fn $test() {
                assert_rejected($commands, &[$(($name, $value)),+], $variable);
            }
        )+
    };
}

/// The control for every test below: the unchanged environment passes the
/// configuration check, so a rejection comes from the one change a test
/// makes. Backup then fails because the restore gate is shut.
#[test]
fn valid_environment_passes_configuration() {
    let environment = Environment::new();

    let run = environment.agent(&[]).run(&["backup"]);

    run.assert_exit_code(1);
    assert!(
        run.stderr.contains("the restore gate is shut"),
        "the backup did not get past the configuration\n{run}"
    );
}

rejected! {
    machine_id_missing: EVERY_COMMAND, [("MATRIX_MACHINE_ID", UNSET)] => "MATRIX_MACHINE_ID is not set";
    machine_id_empty: EVERY_COMMAND, [("MATRIX_MACHINE_ID", set(""))] => "MATRIX_MACHINE_ID is empty";
    machine_id_not_uuid: EVERY_COMMAND, [("MATRIX_MACHINE_ID", set("machine-0001"))]
        => "MATRIX_MACHINE_ID is invalid: expected a UUID";
    machine_id_holding_secret: EVERY_COMMAND, [("MATRIX_MACHINE_ID", set(SECRET_ACCESS_KEY))]
        => "MATRIX_MACHINE_ID is invalid";
    machine_id_unrendered_template: EVERY_COMMAND, [("MATRIX_MACHINE_ID", set("{{machineId}}"))]
        => "MATRIX_MACHINE_ID is invalid";

    user_id_missing: EVERY_COMMAND, [("MATRIX_CLERK_USER_ID", UNSET)] => "MATRIX_CLERK_USER_ID is not set";
    user_id_empty: EVERY_COMMAND, [("MATRIX_CLERK_USER_ID", set(" "))] => "MATRIX_CLERK_USER_ID is empty";
    user_id_with_slash: EVERY_COMMAND, [("MATRIX_CLERK_USER_ID", set("user_2x/../other"))]
        => "MATRIX_CLERK_USER_ID is invalid";
    user_id_too_short: EVERY_COMMAND, [("MATRIX_CLERK_USER_ID", set("ab"))]
        => "MATRIX_CLERK_USER_ID is invalid";

    prefix_missing: EVERY_COMMAND, [("MATRIX_R2_PREFIX", UNSET)] => "MATRIX_R2_PREFIX (or R2_PREFIX) is not set";
    prefix_empty: EVERY_COMMAND, [("MATRIX_R2_PREFIX", set(""))] => "MATRIX_R2_PREFIX is empty";
    prefix_without_trailing_slash: EVERY_COMMAND,
        [("MATRIX_R2_PREFIX", set("matrixos-sync/user_2xMatrixTests01"))]
        => "MATRIX_R2_PREFIX is invalid: must have the form matrixos-sync/<userId>/";
    prefix_outside_sync_folder: EVERY_COMMAND,
        [("MATRIX_R2_PREFIX", set("backups/user_2xMatrixTests01/"))]
        => "MATRIX_R2_PREFIX is invalid: must have the form matrixos-sync/<userId>/";
    prefix_with_parent_segment: EVERY_COMMAND,
        [("MATRIX_R2_PREFIX", set("matrixos-sync/user_2xMatrixTests01/../user_2xOther01/"))]
        => "MATRIX_R2_PREFIX is invalid";
    prefix_of_another_user: EVERY_COMMAND,
        [("MATRIX_R2_PREFIX", set("matrixos-sync/user_2xSomeoneElse01/"))]
        => "MATRIX_R2_PREFIX is invalid: belongs to another customer";
    r2_prefix_of_another_user: EVERY_COMMAND,
        [("MATRIX_R2_PREFIX", UNSET), ("R2_PREFIX", set("matrixos-sync/user_2xSomeoneElse01/"))]
        => "R2_PREFIX is invalid: belongs to another customer";

    bucket_missing: EVERY_COMMAND, [("MATRIX_R2_BUCKET", UNSET)] => "MATRIX_R2_BUCKET (or R2_BUCKET) is not set";
    bucket_invalid: EVERY_COMMAND, [("MATRIX_R2_BUCKET", set("Matrix_Backups"))]
        => "MATRIX_R2_BUCKET is invalid";
    r2_bucket_too_short: EVERY_COMMAND, [("MATRIX_R2_BUCKET", UNSET), ("R2_BUCKET", set("mb"))]
        => "R2_BUCKET is invalid";

    endpoint_missing: EVERY_COMMAND, [("R2_ENDPOINT", UNSET)] => "R2_ENDPOINT (or R2_ACCOUNT_ID) is not set";
    endpoint_not_http: EVERY_COMMAND, [("R2_ENDPOINT", set("ftp://127.0.0.1:9000"))]
        => "R2_ENDPOINT is invalid: expected an http:// or https:// URL";
    endpoint_not_url: EVERY_COMMAND, [("R2_ENDPOINT", set("the R2 endpoint"))]
        => "R2_ENDPOINT is invalid";
    endpoint_without_host: EVERY_COMMAND, [("R2_ENDPOINT", set("https://"))]
        => "R2_ENDPOINT is invalid: the URL has no host";
    endpoint_with_credentials: EVERY_COMMAND,
        [("R2_ENDPOINT", Some(format!("http://{ACCESS_KEY_ID}:{SECRET_ACCESS_KEY}@127.0.0.1:9")))]
        => "R2_ENDPOINT is invalid: the URL must not carry credentials";
    endpoint_with_query: EVERY_COMMAND, [("R2_ENDPOINT", set("http://127.0.0.1:9/?region=auto"))]
        => "R2_ENDPOINT is invalid";
    account_id_invalid: EVERY_COMMAND, [("R2_ENDPOINT", UNSET), ("R2_ACCOUNT_ID", set("my-account"))]
        => "R2_ACCOUNT_ID is invalid: expected 32 hexadecimal characters";

    access_key_missing: EVERY_COMMAND, [("AWS_ACCESS_KEY_ID", UNSET)] => "AWS_ACCESS_KEY_ID is not set";
    secret_key_missing: EVERY_COMMAND, [("AWS_SECRET_ACCESS_KEY", UNSET)] => "AWS_SECRET_ACCESS_KEY is not set";
    secret_key_empty: EVERY_COMMAND, [("AWS_SECRET_ACCESS_KEY", set(""))] => "AWS_SECRET_ACCESS_KEY is empty";

    postgres_db_missing: EVERY_COMMAND, [("POSTGRES_DB", UNSET)] => "POSTGRES_DB is not set";
    postgres_user_empty: EVERY_COMMAND, [("POSTGRES_USER", set(""))] => "POSTGRES_USER is empty";
    pgport_not_number: EVERY_COMMAND, [("PGPORT", set("54x2"))] => "PGPORT is invalid";
    pgport_zero: EVERY_COMMAND, [("PGPORT", set("0"))] => "PGPORT is invalid";
    pgport_too_large: EVERY_COMMAND, [("PGPORT", set("70000"))] => "PGPORT is invalid";

    pg_wait_not_duration: EVERY_COMMAND, [("MATRIX_PG_WAIT", set("soon"))] => "MATRIX_PG_WAIT is invalid";
    pg_wait_unknown_unit: EVERY_COMMAND, [("MATRIX_PG_WAIT", set("5 fortnights"))]
        => "MATRIX_PG_WAIT is invalid: unknown unit";
    disk_reserve_not_size: EVERY_COMMAND, [("MATRIX_DISK_RESERVE", set("plenty"))]
        => "MATRIX_DISK_RESERVE is invalid";
    disk_reserve_unknown_unit: EVERY_COMMAND, [("MATRIX_DISK_RESERVE", set("1PB"))]
        => "MATRIX_DISK_RESERVE is invalid: unknown unit";
    disk_reserve_overflowing: EVERY_COMMAND, [("MATRIX_DISK_RESERVE", set("99999999TiB"))]
        => "MATRIX_DISK_RESERVE is invalid: size is too large";
    part_size_below_minimum: EVERY_COMMAND, [("MATRIX_PART_SIZE", set("1MiB"))]
        => "MATRIX_PART_SIZE is invalid: must be between 5MiB and 5GiB";
    part_size_not_size: EVERY_COMMAND, [("MATRIX_PART_SIZE", set("large"))]
        => "MATRIX_PART_SIZE is invalid";
    upload_concurrency_zero: EVERY_COMMAND, [("MATRIX_UPLOAD_CONCURRENCY", set("0"))]
        => "MATRIX_UPLOAD_CONCURRENCY is invalid";
    upload_concurrency_too_high: EVERY_COMMAND, [("MATRIX_UPLOAD_CONCURRENCY", set("65"))]
        => "MATRIX_UPLOAD_CONCURRENCY is invalid";
    dump_compression_out_of_range: EVERY_COMMAND, [("MATRIX_DUMP_COMPRESSION", set("10"))]
        => "MATRIX_DUMP_COMPRESSION is invalid";
    restore_jobs_zero: EVERY_COMMAND, [("MATRIX_RESTORE_JOBS", set("0"))]
        => "MATRIX_RESTORE_JOBS is invalid";

    s3_connect_timeout_zero: EVERY_COMMAND, [("MATRIX_S3_CONNECT_TIMEOUT", set("0s"))]
        => "MATRIX_S3_CONNECT_TIMEOUT is invalid: must be longer than zero";
    s3_read_timeout_not_duration: EVERY_COMMAND, [("MATRIX_S3_READ_TIMEOUT", set("fast"))]
        => "MATRIX_S3_READ_TIMEOUT is invalid";
    s3_attempt_timeout_unknown_unit: EVERY_COMMAND, [("MATRIX_S3_ATTEMPT_TIMEOUT", set("3 weeks"))]
        => "MATRIX_S3_ATTEMPT_TIMEOUT is invalid: unknown unit";
    s3_stall_grace_zero: EVERY_COMMAND, [("MATRIX_S3_STALL_GRACE", set("0"))]
        => "MATRIX_S3_STALL_GRACE is invalid";
    s3_max_attempts_zero: EVERY_COMMAND, [("MATRIX_S3_MAX_ATTEMPTS", set("0"))]
        => "MATRIX_S3_MAX_ATTEMPTS is invalid";
    s3_max_attempts_too_high: EVERY_COMMAND, [("MATRIX_S3_MAX_ATTEMPTS", set("21"))]
        => "MATRIX_S3_MAX_ATTEMPTS is invalid";

    state_dir_relative: EVERY_COMMAND, [("MATRIX_STATE_DIR", set("var/lib/matrix"))]
        => "MATRIX_STATE_DIR is invalid: must be an absolute path";
    marker_relative: EVERY_COMMAND, [("MATRIX_RESTORE_MARKER", set("restore-complete"))]
        => "MATRIX_RESTORE_MARKER is invalid: must be an absolute path";
    pg_install_root_relative: EVERY_COMMAND, [("MATRIX_PG_INSTALL_ROOT", set("usr/lib/postgresql"))]
        => "MATRIX_PG_INSTALL_ROOT is invalid: must be an absolute path";

    register_url_missing: HEARTBEAT, [("MATRIX_PLATFORM_REGISTER_URL", UNSET)]
        => "MATRIX_PLATFORM_REGISTER_URL is not set";
    register_url_empty: HEARTBEAT, [("MATRIX_PLATFORM_REGISTER_URL", set(""))]
        => "MATRIX_PLATFORM_REGISTER_URL is empty";
    register_url_without_scheme: HEARTBEAT,
        [("MATRIX_PLATFORM_REGISTER_URL", set("127.0.0.1/vps/register"))]
        => "MATRIX_PLATFORM_REGISTER_URL is invalid: expected an http:// or https:// URL";
    register_url_with_credentials: HEARTBEAT,
        [("MATRIX_PLATFORM_REGISTER_URL", Some(format!("http://host:{REGISTRATION_TOKEN}@127.0.0.1:9/vps/register")))]
        => "MATRIX_PLATFORM_REGISTER_URL is invalid: the URL must not carry credentials";
    heartbeat_interval_zero: HEARTBEAT, [("MATRIX_HEARTBEAT_INTERVAL", set("0s"))]
        => "MATRIX_HEARTBEAT_INTERVAL is invalid: must be longer than zero";
    heartbeat_interval_not_duration: HEARTBEAT, [("MATRIX_HEARTBEAT_INTERVAL", set("often"))]
        => "MATRIX_HEARTBEAT_INTERVAL is invalid";
    backup_interval_unknown_unit: HEARTBEAT, [("MATRIX_BACKUP_INTERVAL", set("1 fortnight"))]
        => "MATRIX_BACKUP_INTERVAL is invalid: unknown unit";
    register_deadline_not_duration: HEARTBEAT, [("MATRIX_REGISTER_DEADLINE", set("tomorrow"))]
        => "MATRIX_REGISTER_DEADLINE is invalid";
    status_listen_invalid: HEARTBEAT, [("MATRIX_STATUS_LISTEN", set("everywhere"))]
        => "MATRIX_STATUS_LISTEN is invalid";
    server_id_zero: HEARTBEAT, [("MATRIX_HETZNER_SERVER_ID", set("0"))]
        => "MATRIX_HETZNER_SERVER_ID is invalid";
    public_ipv4_invalid: HEARTBEAT, [("MATRIX_PUBLIC_IPV4", set("1.2.3"))]
        => "MATRIX_PUBLIC_IPV4 is invalid";
    public_ipv6_invalid: HEARTBEAT, [("MATRIX_PUBLIC_IPV6", set("2a01::zz"))]
        => "MATRIX_PUBLIC_IPV6 is invalid";
    instance_data_relative: HEARTBEAT, [("MATRIX_INSTANCE_DATA", set("instance-data.json"))]
        => "MATRIX_INSTANCE_DATA is invalid: must be an absolute path";
}
