//! Throwaway PostgreSQL clusters made with the real `initdb`, one per test.

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::{self, Gid, Uid, User};
use tempfile::TempDir;

use crate::loopback::free_port;
use crate::process::{kill_with_parent, stop_child};

/// Where Debian and Ubuntu install each PostgreSQL major version.
pub const INSTALL_ROOT: &str = "/usr/lib/postgresql";

/// Superuser created by `initdb`, reachable only over the unix socket.
pub const SUPERUSER: &str = "postgres";

/// Login role that owns the customer database, as on a host.
pub const OWNER: &str = "matrix_owner";

/// The customer database.
pub const DATABASE: &str = "matrix";

const START_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
const START_ATTEMPTS: usize = 3;

/// The `bin` directory of one installed PostgreSQL major version.
#[derive(Clone, Debug)]
pub struct PgBin {
    major: u32,
    dir: PathBuf,
}

impl PgBin {
    /// Finds the newest `<INSTALL_ROOT>/<major>/bin` that has a server.
    pub fn newest() -> PgBin {
        let entries = fs::read_dir(INSTALL_ROOT).unwrap_or_else(|error| {
            panic!(
                "cannot list {INSTALL_ROOT} ({error}); install the PostgreSQL \
                 server, e.g. `apt-get install postgresql postgresql-contrib`"
            )
        });

        let newest = entries
            .filter_map(|entry| entry.ok())
            .filter_map(|entry| {
                let major: u32 = entry.file_name().to_str()?.parse().ok()?;
                let dir = entry.path().join("bin");
                dir.join("postgres")
                    .is_file()
                    .then_some(PgBin { major, dir })
            })
            .max_by_key(|bin| bin.major);

        newest.unwrap_or_else(|| {
            panic!("no {INSTALL_ROOT}/<major>/bin/postgres found; install the PostgreSQL server")
        })
    }

    pub fn major(&self) -> u32 {
        self.major
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of one program, e.g. `pg_dump`.
    pub fn program(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// The account server processes run as: `initdb` rejects root, so a test
/// running as root hands the cluster to the `postgres` system user.
#[derive(Clone, Copy, Debug)]
struct ServerAccount {
    uid: Uid,
    gid: Gid,
}

impl ServerAccount {
    fn for_current_user() -> Option<ServerAccount> {
        if !unistd::geteuid().is_root() {
            return None;
        }

        let user = User::from_name("postgres")
            .expect("looking up the postgres system user")
            .expect(
                "tests run as root need the `postgres` system user, which \
                 the Debian postgresql packages create",
            );
        Some(ServerAccount {
            uid: user.uid,
            gid: user.gid,
        })
    }

    fn apply(&self, command: &mut Command) {
        command.uid(self.uid.as_raw()).gid(self.gid.as_raw());
    }
}

/// A running PostgreSQL cluster on 127.0.0.1 with a password-protected
/// database owner.
///
/// The data directory, the unix socket and the server log live in one
/// temporary directory. Dropping the cluster stops the server the way
/// `pg_ctl stop -m immediate` does (SIGQUIT) and deletes the directory.
pub struct Cluster {
    bin: PgBin,
    port: u16,
    password: String,
    account: Option<ServerAccount>,
    server: Option<Child>,
    // Declared last so that the server stops before its files go.
    dir: TempDir,
}

impl Cluster {
    /// Creates a cluster with `initdb`, starts it, and creates the role
    /// [`OWNER`] with `password` (SCRAM) and the database [`DATABASE`]
    /// owned by it.
    pub fn start(password: &str) -> Cluster {
        let bin = PgBin::newest();
        let account = ServerAccount::for_current_user();
        let dir = tempfile::Builder::new()
            .prefix("matrix-pg-")
            .tempdir()
            .expect("creating the cluster directory");
        if let Some(account) = account {
            unistd::chown(dir.path(), Some(account.uid), Some(account.gid))
                .expect("handing the cluster directory to the postgres user");
        }

        let mut cluster = Cluster {
            bin,
            port: 0,
            password: password.to_owned(),
            account,
            server: None,
            dir,
        };
        cluster.init_data_directory();
        cluster.start_with_new_port();
        cluster.create_owner_and_database();
        cluster
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn bin(&self) -> &PgBin {
        &self.bin
    }

    /// Process id of the postmaster, while the server runs.
    pub fn server_pid(&self) -> Option<u32> {
        self.server.as_ref().map(Child::id)
    }

    /// Returns the directory that contains the server's unix socket.
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    fn init_data_directory(&self) {
        let mut command = Command::new(self.bin.program("initdb"));
        command
            .arg("--pgdata")
            .arg(self.data_dir())
            .args(["--username", SUPERUSER])
            .args(["--auth-local", "trust", "--auth-host", "scram-sha-256"])
            .args(["--encoding", "UTF8", "--locale", "C", "--no-sync"])
            .current_dir(self.dir.path())
            .env_clear()
            .env("PATH", system_path());
        if let Some(account) = self.account {
            account.apply(&mut command);
        }

        let output = command.output().expect("running initdb");
        assert!(
            output.status.success(),
            "initdb failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }

    fn start_with_new_port(&mut self) {
        for attempt in 1..=START_ATTEMPTS {
            self.port = free_port();
            match self.try_start() {
                Ok(()) => return,
                Err(log) if attempt < START_ATTEMPTS => {
                    eprintln!(
                        "PostgreSQL did not start on port {}, retrying:\n{log}",
                        self.port
                    )
                }
                Err(log) => panic!("PostgreSQL did not start on port {}:\n{log}", self.port),
            }
        }
    }

    /// Starts the server again on the same port after [`Cluster::stop`].
    pub fn start_again(&mut self) {
        if let Err(log) = self.try_start() {
            panic!("PostgreSQL did not restart on port {}:\n{log}", self.port);
        }
    }

    /// Starts the server and waits until it accepts connections; on
    /// failure returns the server log.
    fn try_start(&mut self) -> Result<(), String> {
        assert!(self.server.is_none(), "the server is already running");

        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("opening the server log");
        let mut command = Command::new(self.bin.program("postgres"));
        command
            .arg("-D")
            .arg(self.data_dir())
            .args(["-p", &self.port.to_string()])
            .arg("-k")
            .arg(self.socket_dir())
            .args(["-c", "listen_addresses=127.0.0.1"])
            // Durability is not under test, and skipping fsync keeps the
            // suite fast on small machines.
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off"])
            .current_dir(self.dir.path())
            .env_clear()
            .env("PATH", system_path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("duplicating the log handle"))
            .stderr(log);
        if let Some(account) = self.account {
            account.apply(&mut command);
        }
        // SIGQUIT is PostgreSQL's immediate shutdown, which also ends the
        // backends and releases shared memory.
        kill_with_parent(&mut command, Signal::SIGQUIT);
        self.server = Some(command.spawn().expect("spawning postgres"));

        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let server = self.server.as_mut().expect("server was just spawned");
            if let Ok(Some(status)) = server.try_wait() {
                self.server = None;
                return Err(format!(
                    "postgres exited with {status}\n{}",
                    self.server_log()
                ));
            }
            if self.is_ready() {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.stop_immediately();
                return Err(format!(
                    "postgres did not accept connections within {START_TIMEOUT:?}\n{}",
                    self.server_log()
                ));
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    fn is_ready(&self) -> bool {
        Command::new(self.bin.program("pg_isready"))
            .args([
                "--quiet",
                "--host",
                "127.0.0.1",
                "--port",
                &self.port.to_string(),
            ])
            .env_clear()
            .status()
            .map(|status| status.success())
            .unwrap_or(false)
    }

    /// Stops the server with a fast shutdown (SIGINT) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut server) = self.server.take() {
            stop_child(&mut server, Signal::SIGINT, STOP_TIMEOUT);
        }
    }

    fn stop_immediately(&mut self) {
        if let Some(mut server) = self.server.take() {
            stop_child(&mut server, Signal::SIGQUIT, Duration::from_secs(10));
        }
    }

    /// Reads the last lines of the server log, for failure messages.
    pub fn server_log(&self) -> String {
        let log = fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    fn create_owner_and_database(&self) {
        let password = self.password.replace('\'', "''");
        self.psql_as_superuser(&format!("CREATE ROLE {OWNER} LOGIN PASSWORD '{password}'"));
        self.psql_as_superuser(&format!("CREATE DATABASE {DATABASE} OWNER {OWNER}"));
    }

    /// Builds a client command (`psql`, `pg_dump`, ...) that connects to
    /// [`DATABASE`] as [`OWNER`] over TCP with the password.
    pub fn owner_command(&self, program: &str) -> Command {
        let mut command = Command::new(self.bin.program(program));
        command
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--username", OWNER, "--no-password"])
            .env_clear()
            .env("PATH", system_path())
            .env("PGPASSWORD", &self.password)
            .env("PGCLIENTENCODING", "UTF8")
            .env("PGDATABASE", DATABASE);
        command
    }

    /// Runs SQL as [`OWNER`] and returns the unaligned, tuples-only output
    /// without the trailing newline. Panics when psql fails.
    pub fn psql(&self, sql: &str) -> String {
        let mut command = self.owner_command("psql");
        command.args(["-X", "--no-align", "--tuples-only", "-v", "ON_ERROR_STOP=1"]);
        command.args(["--command", sql]);
        run_psql(command, sql)
    }

    /// Runs a query as [`OWNER`] and returns its rows. Rows are split on NUL
    /// bytes, which no text value can contain, and fields on the ASCII unit
    /// separator (0x1F), which the queries here never return.
    pub fn psql_rows(&self, sql: &str) -> Vec<Vec<String>> {
        let mut command = self.owner_command("psql");
        command.args(["-X", "--no-align", "--tuples-only", "-v", "ON_ERROR_STOP=1"]);
        command.args(["--field-separator", "\x1f", "--record-separator-zero"]);
        command.args(["--command", sql]);
        let output = command.output().expect("running psql");
        assert_success(&format!("psql {sql}"), &output);

        let stdout = String::from_utf8(output.stdout).expect("psql output is UTF-8");
        let records: Vec<&str> = stdout.trim_end_matches('\n').split('\0').collect();
        records
            .into_iter()
            .filter(|record| !record.is_empty())
            .map(|record| record.split('\x1f').map(str::to_owned).collect())
            .collect()
    }

    /// Runs a SQL file as [`OWNER`] in one transaction.
    pub fn psql_file(&self, path: &Path) -> String {
        let mut command = self.owner_command("psql");
        command.args(["-X", "--quiet", "--no-align", "--tuples-only"]);
        command.args(["-v", "ON_ERROR_STOP=1", "--single-transaction", "--file"]);
        command.arg(path);
        run_psql(command, &path.display().to_string())
    }

    /// Runs SQL as [`SUPERUSER`] in the `postgres` database over the unix
    /// socket.
    pub fn psql_as_superuser(&self, sql: &str) -> String {
        let mut command = Command::new(self.bin.program("psql"));
        command
            .arg("--host")
            .arg(self.socket_dir())
            .args(["--port", &self.port.to_string()])
            .args(["--username", SUPERUSER, "--dbname", "postgres"])
            .args(["-X", "--no-align", "--tuples-only", "-v", "ON_ERROR_STOP=1"])
            .args(["--command", sql])
            .env_clear()
            .env("PATH", system_path())
            .env("PGCLIENTENCODING", "UTF8");
        run_psql(command, sql)
    }

    /// Dumps [`DATABASE`] in custom format with the real `pg_dump`, as the
    /// owner: the bytes a snapshot object contains.
    pub fn dump_custom_format(&self) -> Vec<u8> {
        let mut command = self.owner_command("pg_dump");
        command.args(["--format", "custom"]);
        let output = command.output().expect("running pg_dump");
        assert_success("pg_dump --format custom", &output);
        output.stdout
    }

    /// Restores a custom-format dump into [`DATABASE`] the way a host
    /// restores a snapshot: as the owner, with
    /// `--clean --if-exists --exit-on-error`.
    pub fn restore_custom_format(&self, dump: &[u8]) {
        let mut command = self.owner_command("pg_restore");
        command
            .args(["--clean", "--if-exists", "--exit-on-error"])
            .args(["--dbname", DATABASE])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("spawning pg_restore");
        child
            .stdin
            .take()
            .expect("pg_restore stdin is piped")
            .write_all(dump)
            .expect("writing the dump to pg_restore");
        let output = child.wait_with_output().expect("waiting for pg_restore");
        assert_success("pg_restore --clean --if-exists --exit-on-error", &output);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop_immediately();
    }
}

fn run_psql(mut command: Command, what: &str) -> String {
    let output = command.output().expect("running psql");
    assert_success(&format!("psql {what}"), &output);
    let stdout = String::from_utf8(output.stdout).expect("psql output is UTF-8");
    stdout.strip_suffix('\n').unwrap_or(&stdout).to_owned()
}

fn assert_success(what: &str, output: &Output) {
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Returns the `PATH` that PostgreSQL programs run with: the system
/// directories only, so that no user's configuration leaks into a test.
pub fn system_path() -> &'static str {
    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
}
