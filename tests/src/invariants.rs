//! What must hold after every agent run, however it ended: the checks
//! that show a fault lost nothing.
//!
//! - `system/db/latest`, when present, names a snapshot whose body matches
//!   its `x-amz-meta-size` and `x-amz-meta-sha256`, and it never names an
//!   older snapshot than at the previous check.
//! - Every snapshot seen before still exists with the same ETag.
//! - The restore marker exists only after a restore or fresh-host decision
//!   completed, and a backup never touches it.
//! - A failed run exits 1 and its last stderr line is the error, naming
//!   what failed.
//! - No secret appears in the state directory (the harness checks the
//!   output of every run itself).
//! - After the next successful backup, no multipart upload is open and no
//!   staging object is left.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::agent::{assert_no_secrets_in_files, AgentRun};
use crate::bucket::{is_snapshot_key, Bucket, SNAPSHOTS, STAGING};
use crate::host::Host;

/// How a scenario expects a run to end.
#[derive(Clone, Copy, Debug)]
pub enum Ending<'a> {
    Succeeded,
    /// Exit status 1, with a last stderr line that contains each of these
    /// words (compared in lower case).
    Failed(&'a [&'a str]),
    /// Ended by a signal the test sent.
    Killed,
}

/// Which command a run was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Command {
    Backup,
    Restore,
}

/// The state of one bucket and host between runs, checked after each run.
pub struct Invariants<'a> {
    bucket: &'a Bucket,
    marker: PathBuf,
    state_dir: PathBuf,
    pointer: Option<String>,
    snapshots: BTreeMap<String, String>,
    marker_present: bool,
}

impl<'a> Invariants<'a> {
    /// Records what the bucket and the host hold now, and checks that it
    /// already satisfies the invariants.
    pub fn new(bucket: &'a Bucket, host: &Host) -> Invariants<'a> {
        let mut invariants = Invariants {
            bucket,
            marker: host.marker_path(),
            state_dir: host.state_dir(),
            pointer: None,
            snapshots: BTreeMap::new(),
            marker_present: host.has_regular_marker(),
        };
        invariants.check_bucket("before the scenario");
        invariants
    }

    /// Returns the snapshot `system/db/latest` named at the last check.
    pub fn pointer(&self) -> Option<&str> {
        self.pointer.as_deref()
    }

    /// Checks everything after a `backup` run.
    pub fn check_backup(&mut self, run: &AgentRun, ending: Ending) {
        self.check(run, ending, Command::Backup);
    }

    /// Checks everything after a `restore` run.
    pub fn check_restore(&mut self, run: &AgentRun, ending: Ending) {
        self.check(run, ending, Command::Restore);
    }

    fn check(&mut self, run: &AgentRun, ending: Ending, command: Command) {
        check_ending(run, ending);
        let pointer_before = self.pointer.clone();
        self.check_bucket(&run.command_line);

        let marker_now = is_regular_file(&self.marker);
        match (command, ending) {
            (Command::Backup, _) => assert_eq!(
                marker_now, self.marker_present,
                "the backup changed the restore marker\n{run}"
            ),
            (Command::Restore, Ending::Killed) => {}
            (Command::Restore, _) => {
                let completed = run.exit_code() == Some(0);
                assert_eq!(
                    marker_now, completed,
                    "the marker must exist exactly when the restore completed\n{run}"
                );
                assert_eq!(
                    self.pointer, pointer_before,
                    "the restore moved system/db/latest\n{run}"
                );
                if !completed {
                    assert_eq!(
                        downloaded_dumps(&self.state_dir),
                        Vec::<PathBuf>::new(),
                        "the failed restore left its download behind\n{run}"
                    );
                }
            }
        }
        self.marker_present = marker_now;
        if self.state_dir.is_dir() {
            assert_no_secrets_in_files(&self.state_dir);
        }
    }

    /// Checks the pointer and the snapshots, and remembers them.
    fn check_bucket(&mut self, after: &str) {
        let pointer = self.bucket.latest_pointer();
        match (&self.pointer, &pointer) {
            (Some(before), None) => {
                panic!("system/db/latest named {before} and is gone after {after}")
            }
            (Some(before), Some(now)) => assert!(
                now >= before,
                "system/db/latest moved backwards from {before} to {now} after {after}"
            ),
            _ => {}
        }
        if let Some(key) = &pointer {
            assert_complete_snapshot(self.bucket, key, after);
        }

        let mut snapshots = BTreeMap::new();
        for key in self.bucket.list(SNAPSHOTS) {
            if let Some(head) = self.bucket.head(&key) {
                snapshots.insert(key, head.etag);
            }
        }
        for (key, etag) in &self.snapshots {
            assert_eq!(
                snapshots.get(key),
                Some(etag),
                "the snapshot {key} was deleted or replaced after {after}"
            );
        }
        self.pointer = pointer;
        self.snapshots = snapshots;
    }

    /// Asserts that no multipart upload is open and no staging object is
    /// left, as after any successful backup.
    pub fn assert_nothing_pending(&self, after: &str) {
        assert_eq!(
            self.bucket.multipart_uploads(),
            Vec::<String>::new(),
            "multipart uploads are still open after {after}"
        );
        assert_eq!(
            self.bucket.list(STAGING),
            Vec::<String>::new(),
            "staging objects are left after {after}"
        );
    }

    /// Runs `backup` with `agent`'s environment and checks that it
    /// succeeds, moves the pointer to a new snapshot and leaves nothing
    /// pending: the run that cleans up after a failed one.
    pub fn finish_with_backup(&mut self, agent: &crate::agent::Agent) -> AgentRun {
        let before = self.pointer.clone();
        let run = agent.run(&["backup"]);
        self.check_backup(&run, Ending::Succeeded);
        assert!(
            self.pointer > before,
            "the follow-up backup did not move system/db/latest past {before:?}\n{run}"
        );
        self.assert_nothing_pending(&run.command_line);
        run
    }
}

/// Asserts that `key` is a snapshot key whose object exists and whose body
/// matches the size and SHA-256 in its metadata.
pub fn assert_complete_snapshot(bucket: &Bucket, key: &str, after: &str) {
    assert!(
        is_snapshot_key(key),
        "system/db/latest names {key:?}, not a snapshot key, after {after}"
    );
    let head = bucket
        .head(key)
        .unwrap_or_else(|| panic!("system/db/latest names {key}, which is missing, after {after}"));
    let body = bucket
        .get(key)
        .unwrap_or_else(|| panic!("{key} vanished between HEAD and GET after {after}"));
    assert!(!body.is_empty(), "{key} is empty after {after}");
    assert_eq!(
        head.metadata.get("size"),
        Some(&body.len().to_string()),
        "{key}: x-amz-meta-size does not match the body after {after}"
    );
    assert_eq!(
        head.metadata.get("sha256"),
        Some(&hex::encode(Sha256::digest(&body))),
        "{key}: x-amz-meta-sha256 does not match the body after {after}"
    );
    assert!(
        body.starts_with(b"PGDMP"),
        "{key} is not a custom-format dump after {after}"
    );
}

/// Asserts how the run ended and, for a failure, that the last stderr line
/// is the error and names what failed.
fn check_ending(run: &AgentRun, ending: Ending) {
    match ending {
        Ending::Succeeded => run.assert_exit_code(0),
        Ending::Killed => assert_eq!(
            run.exit_code(),
            None,
            "expected the run to end by a signal\n{run}"
        ),
        Ending::Failed(words) => {
            run.assert_exit_code(1);
            let last_line = run.stderr.lines().last().unwrap_or_default();
            assert!(
                last_line.contains("ERROR"),
                "the last stderr line is not the error\n{run}"
            );
            let last_line = last_line.to_lowercase();
            for word in words {
                assert!(
                    last_line.contains(&word.to_lowercase()),
                    "the error line does not name {word:?}\n{run}"
                );
            }
        }
    }
}

fn is_regular_file(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok_and(|meta| meta.file_type().is_file())
}

/// Lists the files a restore downloads into, under the state directory.
pub fn downloaded_dumps(state_dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(state_dir.join("download")) else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.is_file())
        .collect()
}
