//! A real S3 API: moto's standalone server, one per test.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tempfile::TempDir;

use crate::loopback::free_port;
use crate::process::{kill_with_parent, stop_child};

const START_TIMEOUT: Duration = Duration::from_secs(60);
const START_ATTEMPTS: usize = 3;

/// A `moto_server` process listening on 127.0.0.1.
///
/// Its state lives in memory, so every test starts with no buckets.
/// Dropping the value kills the server.
pub struct MotoServer {
    port: u16,
    child: Child,
    log_dir: TempDir,
    recording: bool,
}

/// One request as moto's recorder wrote it, without the body.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub method: String,
    /// The URL as sent, with the query string and percent-encoding.
    pub url: String,
    headers: HashMap<String, String>,
}

impl RecordedRequest {
    /// Returns a header's value; names compare case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    /// Returns the value of a query parameter, as sent.
    pub fn query_parameter(&self, name: &str) -> Option<&str> {
        let (_, query) = self.url.split_once('?')?;
        query.split('&').find_map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (key == name).then_some(value)
        })
    }
}

impl MotoServer {
    /// Starts `moto_server` from `PATH` on a free port and waits until it
    /// responds to HTTP requests.
    pub fn start() -> MotoServer {
        MotoServer::start_with(false)
    }

    /// Starts the server with moto's request recorder on, so that a test
    /// can read back every request with [`MotoServer::recorded_requests`].
    /// The recording includes the bodies, so use it only for tests that
    /// send a few tens of MiB at most.
    pub fn start_recording() -> MotoServer {
        MotoServer::start_with(true)
    }

    fn start_with(recording: bool) -> MotoServer {
        let log_dir = tempfile::Builder::new()
            .prefix("matrix-moto-")
            .tempdir()
            .expect("creating the moto log directory");

        for attempt in 1..=START_ATTEMPTS {
            let port = free_port();
            match try_start(port, &log_dir, recording) {
                Ok(child) => {
                    return MotoServer {
                        port,
                        child,
                        log_dir,
                        recording,
                    }
                }
                Err(message) if attempt < START_ATTEMPTS => {
                    eprintln!("moto_server did not start on port {port}, retrying: {message}")
                }
                Err(message) => panic!("moto_server did not start on port {port}: {message}"),
            }
        }
        unreachable!("the last attempt panics")
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Returns the endpoint URL for path-style requests.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Returns the temporary directory that contains the server's log.
    pub fn log_dir(&self) -> &Path {
        self.log_dir.path()
    }

    /// Reads the server's log, for failure messages.
    pub fn log(&self) -> String {
        fs::read_to_string(log_path(&self.log_dir)).unwrap_or_default()
    }

    /// Reads every request recorded so far, the test's own included, oldest
    /// first. Requires [`MotoServer::start_recording`].
    pub fn recorded_requests(&self) -> Vec<RecordedRequest> {
        assert!(
            self.recording,
            "this moto_server was started without recording"
        );
        let recording = fs::read_to_string(recording_path(&self.log_dir)).unwrap_or_default();
        recording
            .lines()
            .map(|line| {
                let entry: serde_json::Value =
                    serde_json::from_str(line).expect("moto's recording is JSON lines");
                let text = |field: &str| entry[field].as_str().unwrap_or_default().to_owned();
                let headers = entry["headers"]
                    .as_object()
                    .map(|headers| {
                        headers
                            .iter()
                            .map(|(name, value)| {
                                (name.clone(), value.as_str().unwrap_or_default().to_owned())
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                RecordedRequest {
                    method: text("method"),
                    url: text("url"),
                    headers,
                }
            })
            .collect()
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        stop_child(&mut self.child, Signal::SIGKILL, Duration::from_secs(5));
    }
}

fn log_path(log_dir: &TempDir) -> PathBuf {
    log_dir.path().join("moto.log")
}

fn recording_path(log_dir: &TempDir) -> PathBuf {
    log_dir.path().join("requests.jsonl")
}

fn try_start(port: u16, log_dir: &TempDir, recording: bool) -> Result<Child, String> {
    let log = File::create(log_path(log_dir)).expect("creating the moto log");
    let mut command = Command::new("moto_server");
    if recording {
        command
            .env("MOTO_ENABLE_RECORDING", "true")
            .env("MOTO_RECORDER_FILEPATH", recording_path(log_dir));
    }
    command
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("duplicating the log handle"))
        .stderr(log);
    kill_with_parent(&mut command, Signal::SIGKILL);
    let mut child = command.spawn().map_err(|error| {
        format!(
            "cannot run moto_server ({error}); install it with \
             `pip install 'moto[server]'`"
        )
    })?;

    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let log = fs::read_to_string(log_path(log_dir)).unwrap_or_default();
            return Err(format!("moto_server exited with {status}:\n{log}"));
        }
        if answers_http(port) {
            return Ok(child);
        }
        if Instant::now() > deadline {
            stop_child(&mut child, Signal::SIGKILL, Duration::from_secs(5));
            return Err(format!("no HTTP response within {START_TIMEOUT:?}"));
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Sends one plain HTTP request and reports whether a response came back.
fn answers_http(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect((Ipv4Addr::LOCALHOST, port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let request = "GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }

    let mut head = [0u8; 5];
    stream.read_exact(&mut head).is_ok() && &head == b"HTTP/"
}
