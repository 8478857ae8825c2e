//! What the agent remembers under the state directory, for `status`, the
//! heartbeat and metrics: the last restore, the last backup, registration.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

const RESTORE_FILE: &str = "restore-result.json";
const BACKUP_FILE: &str = "last-backup.json";
const REGISTRATION_FILE: &str = "registration.json";
const HEARTBEAT_FILE: &str = "heartbeat.json";

/// How the restore gate opened, or why it did not.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RestoreOutcome {
    Restored,
    FreshHost,
    Failed,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RestoreRecord {
    pub outcome: RestoreOutcome,
    pub snapshot: Option<String>,
    pub size: Option<u64>,
    pub sha256: Option<String>,
    pub finished_at: DateTime<Utc>,
    pub duration_seconds: f64,
    pub error: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BackupSuccess {
    pub snapshot: String,
    pub size: u64,
    pub sha256: String,
    pub part_size: u64,
    pub parts: u32,
    pub finished_at: DateTime<Utc>,
    pub duration_seconds: f64,
    /// False when another writer had already moved `latest` past this
    /// snapshot.
    pub pointer_moved: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Failure {
    pub at: DateTime<Utc>,
    pub error: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct BackupRecord {
    pub last_success: Option<BackupSuccess>,
    pub last_failure: Option<Failure>,
    pub failures_total: u64,
    pub consecutive_failures: u64,
}

/// Where registration with the platform stands.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RegistrationState {
    /// Attempts continue.
    Pending,
    Registered,
    /// The platform refused (400, 401, 404, 409) or the deadline passed;
    /// no further attempt is made.
    Rejected,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RegistrationRecord {
    pub machine_id: String,
    pub state: RegistrationState,
    pub attempts: u32,
    pub first_attempt_at: DateTime<Utc>,
    pub last_attempt_at: DateTime<Utc>,
    pub registered_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    /// The platform registered this machine but could not store
    /// `vps-meta.json`; the heartbeat writes it and then clears this.
    #[serde(default)]
    pub vps_meta_pending: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct HeartbeatRecord {
    pub last_success_at: Option<DateTime<Utc>>,
    pub last_failure: Option<Failure>,
    pub failures_total: u64,
    /// The machine that superseded this host, once one did.
    pub superseded_by: Option<String>,
}

/// The state directory and the records in it.
#[derive(Clone, Debug)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// Opens the directory, creating it when missing.
    pub fn open(root: &Path) -> anyhow::Result<StateDir> {
        fs::create_dir_all(root).with_context(|| {
            format!(
                "cannot create the state directory {}; check MATRIX_STATE_DIR and \
                 that the agent's user may write there",
                root.display()
            )
        })?;
        Ok(StateDir { root: root.into() })
    }

    /// Opens the directory for reading only; records read as absent when
    /// it does not exist.
    pub fn existing(root: &Path) -> StateDir {
        StateDir { root: root.into() }
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    /// Returns the scratch directory for downloads, created when missing.
    pub fn download_dir(&self) -> anyhow::Result<PathBuf> {
        let dir = self.root.join("download");
        fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create the download directory {}", dir.display()))?;
        Ok(dir)
    }

    pub fn restore(&self) -> Option<RestoreRecord> {
        read_json(&self.root.join(RESTORE_FILE))
    }

    pub fn save_restore(&self, record: &RestoreRecord) -> anyhow::Result<()> {
        write_json(&self.root.join(RESTORE_FILE), record)
    }

    pub fn backup(&self) -> BackupRecord {
        read_json(&self.root.join(BACKUP_FILE)).unwrap_or_default()
    }

    pub fn save_backup(&self, record: &BackupRecord) -> anyhow::Result<()> {
        write_json(&self.root.join(BACKUP_FILE), record)
    }

    /// Returns this machine's registration record; one left by another
    /// machine (a reused disk image) does not count.
    pub fn registration(&self, machine_id: &str) -> Option<RegistrationRecord> {
        read_json::<RegistrationRecord>(&self.root.join(REGISTRATION_FILE))
            .filter(|record| record.machine_id.eq_ignore_ascii_case(machine_id))
    }

    /// Tells whether this machine registered with the platform and
    /// `vps-meta.json` was written for it. Until then, metadata naming
    /// another machine describes the machine this host replaces.
    pub fn is_registered(&self, machine_id: &str) -> bool {
        self.registration(machine_id).is_some_and(|record| {
            record.state == RegistrationState::Registered && !record.vps_meta_pending
        })
    }

    pub fn heartbeat(&self) -> HeartbeatRecord {
        read_json(&self.root.join(HEARTBEAT_FILE)).unwrap_or_default()
    }

    pub fn save_heartbeat(&self, record: &HeartbeatRecord) -> anyhow::Result<()> {
        write_json(&self.root.join(HEARTBEAT_FILE), record)
    }

    pub fn save_registration(&self, record: &RegistrationRecord) -> anyhow::Result<()> {
        write_json(&self.root.join(REGISTRATION_FILE), record)
    }
}

fn read_json<T: DeserializeOwned>(path: &Path) -> Option<T> {
    let bytes = fs::read(path).ok()?;
    match serde_json::from_slice(&bytes) {
        Ok(value) => Some(value),
        Err(error) => {
            tracing::warn!("ignoring unreadable state file {}: {error}", path.display());
            None
        }
    }
}

/// Writes by temporary file and rename, so a reader sees the old record or
/// the new one, never half of one.
fn write_json<T: Serialize>(path: &Path, value: &T) -> anyhow::Result<()> {
    let temp = path.with_extension("json.tmp");
    let write = || -> std::io::Result<()> {
        let mut file = File::create(&temp)?;
        file.write_all(&serde_json::to_vec_pretty(value)?)?;
        file.write_all(b"\n")?;
        file.sync_all()?;
        fs::rename(&temp, path)
    };
    write().with_context(|| format!("cannot write the state file {}", path.display()))
}
