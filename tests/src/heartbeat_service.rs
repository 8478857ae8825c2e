//! Running `matrix-agent heartbeat`, the long-lived service, the way
//! systemd runs it: a clean environment, output that the test can watch
//! while the service runs, the local endpoint probed over HTTP, and
//! SIGTERM to stop it.

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;

use crate::agent::{binary_path, Agent, AgentRun, SECRETS};
use crate::loopback::free_port;
use crate::process::{kill_with_parent, stop_child};

/// The one-time registration token the tests give the agent. It must
/// appear only in the Authorization header of registration requests.
pub const REGISTRATION_TOKEN: &str = "regtok-matrix-test-3f9b27c1e6d4";

/// `MATRIX_IMAGE_VERSION` of every test host.
pub const IMAGE_VERSION: &str = "matrix-os-host-2026.04.26-1";

/// The Hetzner server id in `fixtures/instance-data.json`.
pub const FIXTURE_SERVER_ID: u64 = 48151623;
/// The public IPv4 address in `fixtures/instance-data.json`.
pub const FIXTURE_IPV4: &str = "203.0.113.42";
/// The public IPv6 address in `fixtures/instance-data.json`, without the
/// prefix length its subnet is written with.
pub const FIXTURE_IPV6: &str = "2001:db8:4a2f:1c00::1";

/// The service's interval between heartbeats in the tests.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);

const START_TIMEOUT: Duration = Duration::from_secs(20);
const START_ATTEMPTS: usize = 3;
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The environment variables passed from an [`Agent`] to the service: the
/// documented interface of `matrix-agent`, plus the ones systemd sets.
// NOTE: `Agent` does not expose its whole environment, so a variable that
// is missing from this list is not passed to the service.
const PASSED_VARIABLES: &[&str] = &[
    "MATRIX_MACHINE_ID",
    "MATRIX_CLERK_USER_ID",
    "MATRIX_HANDLE",
    "MATRIX_IMAGE_VERSION",
    "MATRIX_R2_BUCKET",
    "R2_BUCKET",
    "MATRIX_R2_PREFIX",
    "R2_PREFIX",
    "R2_ENDPOINT",
    "R2_ACCOUNT_ID",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "POSTGRES_DB",
    "POSTGRES_USER",
    "POSTGRES_PASSWORD",
    "PGHOST",
    "PGPORT",
    "MATRIX_STATE_DIR",
    "MATRIX_RESTORE_MARKER",
    "MATRIX_STORE_DIR",
    "MATRIX_PG_INSTALL_ROOT",
    "MATRIX_PART_SIZE",
    "MATRIX_UPLOAD_CONCURRENCY",
    "MATRIX_PG_WAIT",
    "MATRIX_DISK_RESERVE",
    "MATRIX_DUMP_COMPRESSION",
    "MATRIX_RESTORE_JOBS",
    "MATRIX_S3_CONNECT_TIMEOUT",
    "MATRIX_S3_READ_TIMEOUT",
    "MATRIX_S3_ATTEMPT_TIMEOUT",
    "MATRIX_S3_MAX_ATTEMPTS",
    "MATRIX_S3_STALL_GRACE",
    "MATRIX_ENV_DIR",
    "MATRIX_LOG",
    "MATRIX_PLATFORM_REGISTER_URL",
    "MATRIX_REGISTRATION_TOKEN",
    "MATRIX_REGISTER_DEADLINE",
    "MATRIX_HEARTBEAT_INTERVAL",
    "MATRIX_BACKUP_INTERVAL",
    "MATRIX_INSTANCE_DATA",
    "MATRIX_HETZNER_SERVER_ID",
    "MATRIX_PUBLIC_IPV4",
    "MATRIX_PUBLIC_IPV6",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
];

/// Returns the path of the instance data fixture, shaped like the
/// `/run/cloud-init/instance-data.json` that cloud-init writes on a
/// Hetzner server.
pub fn instance_data_fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/instance-data.json")
}

/// Adds the heartbeat's settings to `agent`: registration at
/// `register_url` with [`REGISTRATION_TOKEN`], [`IMAGE_VERSION`], the
/// instance data fixture and a heartbeat every [`HEARTBEAT_INTERVAL`].
pub fn configure_heartbeat(agent: &mut Agent, register_url: &str) {
    agent
        .set("MATRIX_PLATFORM_REGISTER_URL", register_url)
        .set("MATRIX_REGISTRATION_TOKEN", REGISTRATION_TOKEN)
        .set("MATRIX_IMAGE_VERSION", IMAGE_VERSION)
        .set(
            "MATRIX_INSTANCE_DATA",
            instance_data_fixture().display().to_string(),
        )
        .set(
            "MATRIX_HEARTBEAT_INTERVAL",
            format!("{}s", HEARTBEAT_INTERVAL.as_secs()),
        );
}

/// Asserts that a finished run printed neither the registration token nor
/// any other secret.
pub fn assert_no_token_in_run(run: &AgentRun) {
    run.assert_no_secrets();
    assert!(
        !run.stdout.contains(REGISTRATION_TOKEN),
        "{} printed the registration token on stdout",
        run.command_line
    );
    assert!(
        !run.stderr.contains(REGISTRATION_TOKEN),
        "{} printed the registration token on stderr",
        run.command_line
    );
}

/// Replaces the registration token and the other secrets in `text`, so that
/// what a failing test prints never shows them, even when the agent leaked
/// them.
pub fn redact(text: &str) -> String {
    let mut redacted = text.replace(REGISTRATION_TOKEN, "[registration token]");
    for secret in SECRETS {
        redacted = redacted.replace(secret, "[secret]");
    }
    redacted
}

/// Asserts that no file under `dir` contains the registration token.
pub fn assert_no_token_in_files(dir: &Path) {
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
            assert!(
                !String::from_utf8_lossy(&content).contains(REGISTRATION_TOKEN),
                "{} contains the registration token",
                path.display()
            );
        }
    }
}

/// Calls `probe` every 50 ms until it returns a value or `timeout` passes.
pub fn poll_until<T>(timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// One response of the service's local endpoint.
#[derive(Clone, Debug)]
pub struct EndpointResponse {
    pub status: u16,
    pub content_type: Option<String>,
    pub body: String,
}

/// Output of the service collected so far, shared with the reader threads.
type SharedOutput = Arc<Mutex<String>>;

/// A running `matrix-agent heartbeat`. Dropping it kills the process;
/// [`HeartbeatService::stop`] ends it the way systemd does.
pub struct HeartbeatService {
    child: Child,
    status_listen: String,
    http: reqwest::blocking::Client,
    stdout: SharedOutput,
    stderr: SharedOutput,
    readers: Vec<JoinHandle<()>>,
}

impl HeartbeatService {
    /// Starts the service with `agent`'s environment and the local
    /// endpoint on a free port of 127.0.0.1, and waits until the endpoint
    /// responds.
    ///
    /// Panics unless the platform URL points at 127.0.0.1 and the server
    /// identity comes from a file or the override variables, so that no
    /// test reaches a real platform or metadata service.
    pub fn start(agent: &Agent) -> HeartbeatService {
        let register_url = agent
            .var("MATRIX_PLATFORM_REGISTER_URL")
            .expect("MATRIX_PLATFORM_REGISTER_URL is set; see configure_heartbeat");
        assert!(
            register_url.starts_with("http://127.0.0.1:")
                || register_url.starts_with("https://127.0.0.1:"),
            "the tests register only with servers on 127.0.0.1, not {register_url}"
        );
        let identity_overridden = agent.var("MATRIX_HETZNER_SERVER_ID").is_some()
            && agent.var("MATRIX_PUBLIC_IPV4").is_some();
        assert!(
            agent.var("MATRIX_INSTANCE_DATA").is_some() || identity_overridden,
            "set MATRIX_INSTANCE_DATA or the identity overrides; see configure_heartbeat"
        );

        for attempt in 1..=START_ATTEMPTS {
            let status_listen = format!("127.0.0.1:{}", free_port());
            let mut service = HeartbeatService::spawn(agent, &status_listen);
            match service.wait_until_listening() {
                Ok(()) => return service,
                Err(problem) if attempt < START_ATTEMPTS && problem.contains("cannot listen") => {
                    eprintln!("the heartbeat did not start on {status_listen}, retrying");
                }
                Err(problem) => {
                    service.kill();
                    panic!(
                        "the heartbeat did not start: {problem}\n{}",
                        service.output()
                    );
                }
            }
        }
        unreachable!("the last attempt panics")
    }

    fn spawn(agent: &Agent, status_listen: &str) -> HeartbeatService {
        let mut command = Command::new(binary_path());
        command
            .arg("heartbeat")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default());
        for name in PASSED_VARIABLES {
            if let Some(value) = agent.var(name) {
                command.env(name, value);
            }
        }
        command
            .env("MATRIX_STATUS_LISTEN", status_listen)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        kill_with_parent(&mut command, Signal::SIGKILL);

        let mut child = command
            .spawn()
            .unwrap_or_else(|error| panic!("cannot run matrix-agent heartbeat: {error}"));
        let stdout = SharedOutput::default();
        let stderr = SharedOutput::default();
        let readers = vec![
            collect_lines(child.stdout.take().expect("stdout is piped"), &stdout),
            collect_lines(child.stderr.take().expect("stderr is piped"), &stderr),
        ];
        let http = reqwest::blocking::Client::builder()
            .no_proxy()
            .timeout(REQUEST_TIMEOUT)
            .build()
            .expect("building the HTTP client");

        HeartbeatService {
            child,
            status_listen: status_listen.to_owned(),
            http,
            stdout,
            stderr,
            readers,
        }
    }

    /// Waits until the endpoint responds; on failure returns why.
    fn wait_until_listening(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                // Let the readers drain what the process wrote before it
                // exited.
                thread::sleep(Duration::from_millis(100));
                return Err(format!(
                    "it exited with {status}: {}",
                    redact(&self.stderr())
                ));
            }
            if self.http.get(self.url("/healthz")).send().is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("no response within {START_TIMEOUT:?}"));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Returns `http://<MATRIX_STATUS_LISTEN><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.status_listen)
    }

    /// Sends `GET <path>` to the local endpoint.
    pub fn get(&self, path: &str) -> EndpointResponse {
        let response = self
            .http
            .get(self.url(path))
            .send()
            .unwrap_or_else(|error| panic!("GET {path} failed: {error}\n{}", self.output()));
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned());
        let bytes = response
            .bytes()
            .unwrap_or_else(|error| panic!("reading the body of GET {path} failed: {error}"));
        let body = String::from_utf8(bytes.to_vec())
            .unwrap_or_else(|error| panic!("the body of GET {path} is not UTF-8: {error}"));
        EndpointResponse {
            status,
            content_type,
            body,
        }
    }

    /// Returns what the service wrote to stderr so far, its log.
    pub fn stderr(&self) -> String {
        self.stderr.lock().expect("output lock").clone()
    }

    /// Returns stdout and stderr so far, secrets redacted, for failure
    /// messages.
    pub fn output(&self) -> String {
        redact(&format!(
            "--- stdout ---\n{}\n--- stderr ---\n{}",
            self.stdout.lock().expect("output lock"),
            self.stderr.lock().expect("output lock")
        ))
    }

    /// Counts the log lines that contain `needle`.
    pub fn log_lines_containing(&self, needle: &str) -> usize {
        self.stderr()
            .lines()
            .filter(|line| line.contains(needle))
            .count()
    }

    /// Waits until a log line contains `needle` and returns that line;
    /// panics with the output after `timeout`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> String {
        let found = poll_until(timeout, || {
            self.stderr()
                .lines()
                .find(|line| line.contains(needle))
                .map(str::to_owned)
        });
        found.unwrap_or_else(|| {
            panic!(
                "no log line containing {needle:?} within {timeout:?}\n{}",
                self.output()
            )
        })
    }

    /// Checks whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends SIGTERM as `systemctl stop` does, waits for the exit, checks
    /// that the output contains no secret, and asserts exit status 0.
    pub fn stop(mut self) -> AgentRun {
        let pid = Pid::from_raw(self.child.id() as i32);
        if self.is_running() {
            signal::kill(pid, Signal::SIGTERM).expect("sending SIGTERM to the heartbeat");
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        let mut timed_out = false;
        while self.is_running() {
            if Instant::now() > deadline {
                timed_out = true;
                self.kill();
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let status = self.child.wait().expect("reaping the heartbeat");
        for reader in self.readers.drain(..) {
            reader.join().expect("an output reader panicked");
        }

        let run = AgentRun {
            command_line: "matrix-agent heartbeat".to_owned(),
            status,
            stdout: self.stdout.lock().expect("output lock").clone(),
            stderr: self.stderr.lock().expect("output lock").clone(),
        };
        // The test harness shows this only for failing tests.
        eprintln!("{}\n", redact(&run.to_string()));
        assert_no_token_in_run(&run);
        assert!(
            !timed_out,
            "the heartbeat did not exit within {STOP_TIMEOUT:?} of SIGTERM\n{run}"
        );
        run.assert_exit_code(0);
        run
    }

    fn kill(&mut self) {
        stop_child(&mut self.child, Signal::SIGKILL, Duration::ZERO);
    }
}

impl Drop for HeartbeatService {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Appends each line of `stream` to `output` as it arrives.
fn collect_lines(stream: impl Read + Send + 'static, output: &SharedOutput) -> JoinHandle<()> {
    let output = Arc::clone(output);
    thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut line = Vec::new();
        while reader.read_until(b'\n', &mut line).unwrap_or(0) > 0 {
            output
                .lock()
                .expect("output lock")
                .push_str(&String::from_utf8_lossy(&line));
            line.clear();
        }
    })
}
