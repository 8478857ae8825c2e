//! The record of every request the fake platform received.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use tokio::sync::watch;

/// Path of the registration endpoint.
pub const REGISTER_PATH: &str = "/vps/register";

/// One request as the fake platform received it, and the response it got.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RecordedRequest {
    /// Position among all requests to this server, from 1.
    pub sequence: u64,
    pub received_at: DateTime<Utc>,
    pub method: String,
    /// The path without the query string.
    pub path: String,
    /// Header names in lower case. A header sent more than once has its
    /// values joined with ", ". `authorization` is recorded as sent, token
    /// included, so that tests can check it.
    pub headers: BTreeMap<String, String>,
    /// The body parsed as JSON, or `None` when it is empty or not JSON.
    pub body: Option<Value>,
    /// The body as text (invalid UTF-8 replaced), when it is not JSON.
    pub body_text: Option<String>,
    /// The status sent, or `None` when the connection was dropped without
    /// a response.
    pub status: Option<u16>,
    /// Why the request got this response, e.g. which scripted response was
    /// used or which field was invalid.
    pub detail: String,
}

impl RecordedRequest {
    /// Returns a header's value; the name compares case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }

    /// Returns whether this is a `POST /vps/register`.
    pub fn is_registration(&self) -> bool {
        self.method == "POST" && self.path == REGISTER_PATH
    }
}

/// The requests received so far, with an optional JSON-lines copy on disk
/// and a counter that waiters watch.
pub(crate) struct RequestLog {
    requests: Mutex<Vec<RecordedRequest>>,
    file: Option<Mutex<File>>,
    count: watch::Sender<usize>,
}

impl RequestLog {
    /// Creates the log; `path`, when given, is created or truncated.
    pub(crate) fn new(path: Option<&Path>) -> std::io::Result<RequestLog> {
        let file = match path {
            Some(path) => Some(Mutex::new(File::create(path)?)),
            None => None,
        };
        Ok(RequestLog {
            requests: Mutex::new(Vec::new()),
            file,
            count: watch::Sender::new(0),
        })
    }

    /// Appends a request, writes its JSON line and wakes the waiters.
    pub(crate) fn push(&self, mut request: RecordedRequest) {
        let count = {
            let mut requests = lock(&self.requests);
            request.sequence = requests.len() as u64 + 1;
            if let Some(file) = &self.file {
                let line = serde_json::to_string(&request).expect("a request serializes");
                let mut file = lock(file);
                if let Err(error) = writeln!(file, "{line}").and_then(|()| file.flush()) {
                    tracing::warn!("cannot append to the request log: {error}");
                }
            }
            requests.push(request);
            requests.len()
        };
        self.count.send_replace(count);
    }

    pub(crate) fn snapshot(&self) -> Vec<RecordedRequest> {
        lock(&self.requests).clone()
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<usize> {
        self.count.subscribe()
    }
}

/// Locks a mutex, ignoring poisoning: the data are plain records that a
/// panicking writer cannot leave half-updated.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
