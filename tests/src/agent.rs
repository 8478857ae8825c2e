//! Running the `matrix-agent` binary the way systemd does: a clean
//! environment with only the documented variables, output captured.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};
use std::{env, fmt};

use nix::sys::signal::Signal;

use crate::process::{kill_with_parent, stop_child};

/// Bucket access key id given to the agent.
pub const ACCESS_KEY_ID: &str = "AKIAMATRIXTEST7Q3ZXK";
/// Bucket secret key given to the agent.
pub const SECRET_ACCESS_KEY: &str = "matrix-test-secret-key-c4a1f7e93b";
/// Bucket session token given to the agent.
pub const SESSION_TOKEN: &str = "matrix-test-session-token-5e82d0b6a7";
/// Password of the database owner.
pub const DATABASE_PASSWORD: &str = "matrix-test-db-password-91f3c2d8e4";

/// Values that must never appear in anything the agent prints.
pub const SECRETS: [&str; 4] = [
    ACCESS_KEY_ID,
    SECRET_ACCESS_KEY,
    SESSION_TOKEN,
    DATABASE_PASSWORD,
];

/// What each entry of [`SECRETS`] is, for messages that must not show it.
const SECRET_NAMES: [&str; 4] = [
    "bucket access key id",
    "bucket secret key",
    "bucket session token",
    "database password",
];

/// Asserts that no file under `dir` (the agent's state directory, say)
/// contains a secret value.
pub fn assert_no_secrets_in_files(dir: &Path) {
    let mut pending = vec![dir.to_owned()];
    while let Some(dir) = pending.pop() {
        let entries = fs::read_dir(&dir)
            .unwrap_or_else(|error| panic!("cannot list {}: {error}", dir.display()));
        for entry in entries {
            let path = entry.expect("reading a directory entry").path();
            if path.is_dir() {
                pending.push(path);
                continue;
            }
            let content = fs::read(&path).unwrap_or_default();
            let content = String::from_utf8_lossy(&content);
            for (secret, name) in SECRETS.iter().zip(SECRET_NAMES) {
                assert!(
                    !content.contains(secret),
                    "{} contains the {name}",
                    path.display()
                );
            }
        }
    }
}

/// How long one run may take before the test kills it and fails. The
/// slowest run waits for the next minute before it uploads.
const RUN_TIMEOUT: Duration = Duration::from_secs(240);

/// Finds the agent binary: `MATRIX_AGENT_BIN`, or `matrix-agent` in the
/// workspace's debug target directory.
pub fn binary_path() -> PathBuf {
    if let Some(path) = env::var_os("MATRIX_AGENT_BIN") {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "MATRIX_AGENT_BIN is set to {}, which is not a file",
            path.display()
        );
        return path;
    }

    let target_dir = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let path = target_dir.join("debug/matrix-agent");
    assert!(
        path.is_file(),
        "the agent binary {} is missing; run `cargo build -p matrix-agent` \
         first, or set MATRIX_AGENT_BIN to its path",
        path.display()
    );
    path
}

/// The agent binary and the environment it runs with.
#[derive(Clone, Debug)]
pub struct Agent {
    binary: PathBuf,
    env: BTreeMap<String, String>,
}

impl Agent {
    /// Creates an agent that runs with exactly `env` plus the test's `PATH`.
    pub fn new(env: BTreeMap<String, String>) -> Agent {
        Agent {
            binary: binary_path(),
            env,
        }
    }

    /// Sets or replaces one environment variable.
    pub fn set(&mut self, name: &str, value: impl Into<String>) -> &mut Agent {
        self.env.insert(name.to_owned(), value.into());
        self
    }

    /// Runs `program` in place of the agent binary: a wrapper script that
    /// prepares the process (a private mount namespace, say) and then
    /// executes [`binary_path`] with the arguments it was given.
    pub fn set_program(&mut self, program: impl Into<PathBuf>) -> &mut Agent {
        self.binary = program.into();
        self
    }

    pub fn remove(&mut self, name: &str) -> &mut Agent {
        self.env.remove(name);
        self
    }

    /// Returns the value of one environment variable of the run.
    pub fn var(&self, name: &str) -> Option<&str> {
        self.env.get(name).map(String::as_str)
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.binary);
        command
            .args(args)
            .env_clear()
            .env("PATH", env::var_os("PATH").unwrap_or_default())
            .envs(&self.env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        kill_with_parent(&mut command, Signal::SIGKILL);
        command
    }

    /// Runs the agent to completion and checks that its output contains no
    /// secret.
    pub fn run(&self, args: &[&str]) -> AgentRun {
        self.spawn(args).wait()
    }

    /// Starts the agent without waiting for it.
    pub fn spawn(&self, args: &[&str]) -> RunningAgent {
        let mut child = self
            .command(args)
            .spawn()
            .unwrap_or_else(|error| panic!("cannot run {}: {error}", self.binary.display()));
        let stdout = read_in_background(child.stdout.take().expect("stdout is piped"));
        let stderr = read_in_background(child.stderr.take().expect("stderr is piped"));

        RunningAgent {
            command_line: format!("matrix-agent {}", args.join(" ")),
            child,
            stdout,
            stderr,
        }
    }
}

fn read_in_background(mut stream: impl Read + Send + 'static) -> JoinHandle<String> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stream.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// An agent process that is still running.
pub struct RunningAgent {
    command_line: String,
    child: Child,
    stdout: JoinHandle<String>,
    stderr: JoinHandle<String>,
}

impl RunningAgent {
    /// Returns the process id, for sending the agent a signal.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the run to end, kills it after the run timeout, and
    /// checks that its output contains no secret.
    pub fn wait(mut self) -> AgentRun {
        let deadline = Instant::now() + RUN_TIMEOUT;
        let mut timed_out = false;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("waiting for the agent") {
                break status;
            }
            if Instant::now() > deadline {
                timed_out = true;
                stop_child(&mut self.child, Signal::SIGKILL, Duration::ZERO);
                break self.child.wait().expect("reaping the agent");
            }
            thread::sleep(Duration::from_millis(20));
        };

        let run = AgentRun {
            command_line: self.command_line,
            status,
            stdout: self.stdout.join().expect("stdout reader panicked"),
            stderr: self.stderr.join().expect("stderr reader panicked"),
        };
        // Checked before the output is printed, so that a leak fails the
        // test without showing the secret.
        run.assert_no_secrets();
        // The test harness shows this only for failing tests, where every
        // run of the test helps explain the failure.
        eprintln!("{run}\n");
        assert!(
            !timed_out,
            "the agent ran longer than {RUN_TIMEOUT:?}\n{run}"
        );
        run
    }
}

/// One finished agent run as an operator sees it: exit status and output.
#[derive(Debug)]
pub struct AgentRun {
    pub command_line: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl AgentRun {
    /// Returns the exit code, or `None` when a signal ended the process.
    pub fn exit_code(&self) -> Option<i32> {
        self.status.code()
    }

    pub fn assert_exit_code(&self, expected: i32) {
        assert_eq!(
            self.exit_code(),
            Some(expected),
            "expected exit status {expected}\n{self}"
        );
    }

    /// Asserts that the run failed with an exit code of its own, not a
    /// signal.
    pub fn assert_failed(&self) {
        let code = self.exit_code();
        assert!(
            code.is_some_and(|code| code != 0),
            "expected a non-zero exit status\n{self}"
        );
    }

    /// Stdout and stderr together, lower-cased, for matching messages.
    pub fn output_lowercase(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr).to_lowercase()
    }

    /// Asserts that no secret value appears in stdout or stderr. [`Agent`]
    /// calls this on every run before it returns the run.
    pub fn assert_no_secrets(&self) {
        for (secret, name) in SECRETS.iter().zip(SECRET_NAMES) {
            assert!(
                !self.stdout.contains(secret),
                "{} printed the {name} on stdout",
                self.command_line
            );
            assert!(
                !self.stderr.contains(secret),
                "{} printed the {name} on stderr",
                self.command_line
            );
        }
    }
}

impl fmt::Display for AgentRun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "$ {}  # {}", self.command_line, self.status)?;
        writeln!(f, "--- stdout ---\n{}", self.stdout)?;
        write!(f, "--- stderr ---\n{}", self.stderr)
    }
}
