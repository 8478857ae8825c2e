//! A stand-in for systemd's notification socket (`NOTIFY_SOCKET`), to see
//! what a `Type=notify` service reports: `READY=1`, `WATCHDOG=1`,
//! `STATUS=...` and the rest.

use std::io::ErrorKind;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// One datagram the service sent, split into its `KEY=VALUE` lines.
#[derive(Clone, Debug)]
pub struct Notification {
    pub received_at: Instant,
    pub assignments: Vec<(String, String)>,
}

impl Notification {
    /// Checks whether the datagram contains the line `key=value`.
    pub fn has(&self, key: &str, value: &str) -> bool {
        self.assignments
            .iter()
            .any(|(own_key, own_value)| own_key == key && own_value == value)
    }

    /// Returns the value assigned to `key`, if any.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.assignments
            .iter()
            .find(|(own_key, _)| own_key == key)
            .map(|(_, value)| value.as_str())
    }
}

/// A Unix datagram socket bound in a temporary directory, removed on drop.
pub struct NotifySocket {
    socket: UnixDatagram,
    path: PathBuf,
    received: Vec<Notification>,
    /// Datagrams that were not `KEY=VALUE` lines, kept for the failure
    /// message.
    malformed: Vec<String>,
    _dir: TempDir,
}

impl NotifySocket {
    pub fn bind() -> NotifySocket {
        let dir = tempfile::Builder::new()
            .prefix("matrix-notify-")
            .tempdir()
            .expect("creating the notify socket directory");
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path)
            .unwrap_or_else(|error| panic!("binding {}: {error}", path.display()));
        NotifySocket {
            socket,
            path,
            received: Vec::new(),
            malformed: Vec::new(),
            _dir: dir,
        }
    }

    /// Returns the value for `NOTIFY_SOCKET`.
    pub fn path(&self) -> String {
        self.path.display().to_string()
    }

    /// Receives datagrams until `done` holds for all received so far, or
    /// until `timeout`. Returns whether `done` held.
    pub fn receive_until(
        &mut self,
        timeout: Duration,
        done: impl Fn(&[Notification]) -> bool,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        let mut buffer = vec![0u8; 4096];
        loop {
            if done(&self.received) {
                return true;
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return false;
            }
            self.socket
                .set_read_timeout(Some(remaining))
                .expect("setting the read timeout");
            match self.socket.recv(&mut buffer) {
                Ok(length) => self.record(&buffer[..length]),
                Err(error)
                    if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(error) => panic!("receiving on {}: {error}", self.path.display()),
            }
        }
    }

    fn record(&mut self, datagram: &[u8]) {
        let text = String::from_utf8_lossy(datagram);
        let mut assignments = Vec::new();
        for line in text.lines().filter(|line| !line.is_empty()) {
            match line.split_once('=') {
                Some((key, value)) => assignments.push((key.to_owned(), value.to_owned())),
                None => self.malformed.push(line.to_owned()),
            }
        }
        self.received.push(Notification {
            received_at: Instant::now(),
            assignments,
        });
    }

    /// Returns every datagram received so far, oldest first.
    pub fn received(&self) -> &[Notification] {
        &self.received
    }

    /// Returns the lines that were not `KEY=VALUE`.
    pub fn malformed(&self) -> &[String] {
        &self.malformed
    }
}
